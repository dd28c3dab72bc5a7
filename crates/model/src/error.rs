//! Errors of the model crate. Every variant names what was wrong: the file, the tensor, the
//! config field or the routing-plan layer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` unreadable, malformed, or a field with an unsupported value.
    #[error("config {file}: field `{field}`: {msg}")]
    Config { file: String, field: String, msg: String },

    /// A weight file could not be opened or parsed (missing, truncated, corrupt header).
    #[error("weights {}: {msg}", path.display())]
    WeightFile { path: PathBuf, msg: String },

    /// A tensor is missing from the checkpoint or has the wrong shape / dtype.
    #[error("checkpoint {}: tensor `{tensor}`: {msg}", dir.display())]
    Tensor { dir: PathBuf, tensor: String, msg: String },

    /// A routing plan that does not fit the model or the batch.
    #[error("routing plan, layer {layer}: {msg}")]
    Routing { layer: usize, msg: String },

    /// A batch whose parts disagree (lengths, boundaries, masks).
    #[error("batch: {field}: {msg}")]
    Batch { field: String, msg: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn config(file: &str, field: &str, msg: impl Into<String>) -> Self {
        ModelError::Config { file: file.to_string(), field: field.to_string(), msg: msg.into() }
    }
    pub fn routing(layer: usize, msg: impl Into<String>) -> Self {
        ModelError::Routing { layer, msg: msg.into() }
    }
    pub(crate) fn batch(field: &str, msg: impl Into<String>) -> Self {
        ModelError::Batch { field: field.to_string(), msg: msg.into() }
    }
}
