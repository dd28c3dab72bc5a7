//! Errors of the RL loop, naming the config key or file at fault.

#[derive(Debug, thiserror::Error)]
pub enum RlError {
    #[error("config: `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    /// A bad dataset record: the file, where in it (`line 12`, `row 3`) and the field.
    #[error("{file}: {at}: {msg}")]
    Dataset { file: String, at: String, msg: String },
    /// A reward that stops the run (an `http` reward failing `max_failures` times in a row).
    #[error("reward {url}: {msg}")]
    Reward { url: String, msg: String },
    #[error(transparent)]
    Text(#[from] lockstep_text::TextError),
    /// The stop flag was set (Ctrl-C): the run stopped after `after` and wrote `checkpoint`
    /// (with its run_state.json); `RunOptions::resume` with it continues bit for bit.
    #[error("interrupted after {after}; checkpoint: {}", checkpoint.display())]
    Interrupted { after: String, checkpoint: std::path::PathBuf },
    /// `count` updates in a row had a non-finite loss or gradient norm and were skipped (the
    /// weights and optimizer state are those before them); the run stopped. The checkpoint
    /// named (if any) was written before the skipped updates and is intact: resume from it
    /// (with a lower `trainer.lr`, say).
    #[error("stopped after {count} consecutive updates with a non-finite loss or gradient norm (the last at {at}; trainer.max_nonfinite_steps = {count}); {}", match checkpoint {
        Some(c) => format!("the last good checkpoint {} is intact: resume from it", c.display()),
        None => "no checkpoint of this run was written before them".to_string(),
    })]
    NonFinite { count: u64, at: String, checkpoint: Option<std::path::PathBuf> },
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

/// A config error naming `key`.
pub(crate) fn bad(key: &str, msg: impl Into<String>) -> RlError {
    RlError::Config { key: key.into(), msg: msg.into() }
}
