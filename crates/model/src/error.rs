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

    /// A decoder layer asked for a part it does not have (the MoE block of a dense layer, a
    /// layer past the last).
    #[error("layer {layer}: {msg}")]
    Layer { layer: usize, msg: String },

    /// A device that could not be opened or set up.
    #[error("{device}: {msg}")]
    Device { device: String, msg: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A collective of the ranks failed (expert parallelism), or stopped because another rank
    /// failed (`CollectiveError::Aborted`).
    #[error(transparent)]
    Collective(#[from] lockstep_collective::CollectiveError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A value (of a command-line flag, a config field) that is none of the accepted spellings;
/// the message lists them. Callers prefix the flag or field: `--pool `x`: expected ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}`: expected {expected}")]
pub struct ParseError {
    /// what was given
    pub value: String,
    /// the accepted values, in words
    pub expected: &'static str,
}

impl ParseError {
    pub fn new(value: &str, expected: &'static str) -> Self {
        Self { value: value.to_string(), expected }
    }
}

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
