//! Engine errors, naming the request field at fault.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] lockstep_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("request {id}: {field}: {msg}")]
    Request { id: u64, field: String, msg: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;
