//! lockstep-rl: the RL loop that ties engine, route transport and trainer together
//! (`lockstep train`).

pub mod config;
pub mod env;
pub mod error;
pub mod metrics;
pub mod remote;
pub mod report;
pub mod rollout;
pub mod run;

pub use config::RunConfig;
pub use error::{Result, RlError};
pub use run::{run, RunOptions, RunSummary};
