//! lockstep-rl: the RL loop that ties engine, route transport and trainer together
//! (`lockstep train`).

pub mod bench;
pub mod config;
mod config_bounds;
pub mod dataset;
pub mod env;
pub mod error;
pub mod foreign;
pub mod http_reward;
pub mod metrics;
pub mod remote;
pub mod report;
pub mod reward;
pub mod reward_input;
pub mod rollout;
pub mod run;
mod warmup;
mod run_state;
pub mod server_spec;
pub mod task_config;
pub mod text_env;
mod trainer_section;

pub use config::RunConfig;
pub use error::{Result, RlError};
pub use run::{run, RunOptions, RunSummary};
