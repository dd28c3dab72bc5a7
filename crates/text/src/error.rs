//! Errors of loading a tokenizer or rendering a chat template, naming the file at fault.

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A tokenizer file that is missing, not JSON, or not a tokenizer.
    #[error("{file}: {msg}")]
    Tokenizer { file: String, msg: String },
    /// A chat template that does not parse.
    #[error("chat template: {0}")]
    Template(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, TextError>;
