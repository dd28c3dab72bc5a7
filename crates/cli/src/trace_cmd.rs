//! `lockstep trace ...` subcommands (owned by the route-transport work).

#[derive(clap::Args)]
pub struct TraceArgs {}

pub fn run(_args: TraceArgs) -> anyhow::Result<()> {
    anyhow::bail!("lockstep trace: not built yet")
}
