//! Trainer errors, naming the tensor, field or file at fault.

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] lockstep_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of the ranks failed, or stopped because another rank failed
    /// (`CollectiveError::Aborted`).
    #[error(transparent)]
    Collective(#[from] lockstep_collective::CollectiveError),
    /// A reference / checkpoint file problem.
    #[error("{file}: {what}: {msg}")]
    File { file: String, what: String, msg: String },
    /// Inputs that disagree (lengths, shapes).
    #[error("{field}: {msg}")]
    Input { field: String, msg: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn input(field: &str, msg: impl Into<String>) -> Self {
        TrainError::Input { field: field.into(), msg: msg.into() }
    }
}
