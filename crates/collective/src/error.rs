//! What a collective reports. A rank whose group was aborted gets [`CollectiveError::Aborted`]
//! naming the rank that failed first: that rank's own error is the real one.
//!
//! Inside a tensor op (the EP all-to-all runs in candle's forward and backward) the error
//! travels as a `candle_core::Error` (`From` below boxes it, typed); [`CollectiveError::in_candle`]
//! finds it again.

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Another rank of the group failed (returned an error or panicked), so this rank's
    /// collective gave up instead of waiting for it for ever. `cause`: what that rank reported.
    #[error("collective: rank {rank} failed: {cause}")]
    Aborted { rank: usize, cause: String },
    /// A rank thread panicked; `cause`: the panic's message.
    #[error("rank {rank} panicked: {cause}")]
    Panicked { rank: usize, cause: String },
    /// The group's shared memory was left poisoned: a rank panicked inside a collective.
    #[error("collective: another rank panicked")]
    Poisoned,
    /// The ranks or the caller disagree on what is exchanged (lengths, row counts, shapes).
    #[error("{0}")]
    Mismatch(String),
    /// What this collective (or this build) cannot do.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

impl CollectiveError {
    /// This rank stopped because another rank failed (its own error is not the cause).
    pub fn is_abort(&self) -> bool {
        matches!(self, CollectiveError::Aborted { .. } | CollectiveError::Poisoned)
    }

    /// The collective error a candle error carries, if a collective raised it inside a tensor
    /// op (through the `From` below), under any backtrace, path or context candle added.
    pub fn in_candle(e: &candle_core::Error) -> Option<&CollectiveError> {
        use candle_core::Error as E;
        match e {
            E::Cuda(boxed) => boxed.downcast_ref::<CollectiveError>(),
            E::WithBacktrace { inner, .. } | E::WithPath { inner, .. } | E::Context { inner, .. } => Self::in_candle(inner),
            _ => None,
        }
    }
}

/// For a collective called inside a candle op: a candle error passes through as it was; any
/// other is boxed as candle's boxed-error variant (displayed as itself), typed, for
/// [`CollectiveError::in_candle`].
impl From<CollectiveError> for candle_core::Error {
    fn from(e: CollectiveError) -> Self {
        match e {
            CollectiveError::Candle(e) => e,
            other => candle_core::Error::Cuda(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_survives_a_trip_through_candle() {
        let e: candle_core::Error = CollectiveError::Aborted { rank: 3, cause: "boom".into() }.into();
        assert_eq!(e.to_string(), "collective: rank 3 failed: boom");
        let e = e.context("backward").bt();
        assert!(matches!(CollectiveError::in_candle(&e), Some(CollectiveError::Aborted { rank: 3, .. })), "{e:?}");
        assert!(CollectiveError::in_candle(&e).unwrap().is_abort());
        // a candle error passes through unchanged, and carries no collective error
        let e: candle_core::Error = CollectiveError::Candle(candle_core::Error::Msg("shape".into())).into();
        assert!(matches!(&e, candle_core::Error::Msg(m) if m == "shape"));
        assert!(CollectiveError::in_candle(&e).is_none());
        assert!(!CollectiveError::Mismatch("x".into()).is_abort());
    }
}
