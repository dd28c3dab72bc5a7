//! Errors of the RL loop, naming the config key or file at fault.

#[derive(Debug, thiserror::Error)]
pub enum RlError {
    #[error("config: `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    /// The stop flag was set (Ctrl-C): the run stopped after `after` and wrote `checkpoint`
    /// (with its run_state.json); `RunOptions::resume` with it continues bit for bit.
    #[error("interrupted after {after}; checkpoint: {}", checkpoint.display())]
    Interrupted { after: String, checkpoint: std::path::PathBuf },
    #[error(transparent)]
    Model(#[from] lockstep_model::ModelError),
    #[error(transparent)]
    Train(#[from] lockstep_trainer::TrainError),
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    #[error(transparent)]
    Trace(#[from] lockstep_trace::TraceError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective of the ranks failed, or stopped because another rank failed
    /// (`CollectiveError::Aborted`).
    #[error(transparent)]
    Collective(#[from] lockstep_collective::CollectiveError),
}

pub type Result<T> = std::result::Result<T, RlError>;

impl RlError {
    pub fn io(path: &std::path::Path, e: impl ToString) -> Self {
        RlError::Io { path: path.display().to_string(), msg: e.to_string() }
    }
}
