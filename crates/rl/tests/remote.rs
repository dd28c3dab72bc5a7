//! The RL loop against a lockstep server by URL: rollouts over HTTP, weight sync through
//! `/v1/load_weights` — and still exactly on-policy (the served model runs the batch-invariant
//! kernels): the first update of every step sees KL estimate 0.

use lockstep_rl::config::RunConfig;
use lockstep_rl::{run, RunOptions};

#[test]
fn rollouts_from_a_server_by_url_are_on_policy() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(lockstep_server::start(&lockstep_server::ServerConfig::default(), "127.0.0.1:0")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = RunConfig::default_config();
    c.steps = 3;
    c.warmup.steps = 10;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.trainer.mini_steps = 1;
    c.eval.every = 3;
    c.output.checkpoint_every = 0;
    c.rollout.servers = vec![format!("http://{}", server.addr)];
    let remote = run(&c, dir.path(), true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = remote.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 3);
    for r in &rl {
        assert_eq!(r.kl, 0.0, "step {}: served logprobs equal the trainer's", r.step);
        assert!(r.layers.values().all(|l| l.route_agreement == 1.0));
    }
    // the same run in process gives the same rewards (same seeds, same weights)
    c.rollout.servers.clear();
    let local = run(&c, &dir.path().join("local"), true, &RunOptions::default()).unwrap();
    let rewards = |s: &lockstep_rl::RunSummary| s.records.iter().map(|r| r.reward_mean.to_bits()).collect::<Vec<_>>();
    assert_eq!(rewards(&remote), rewards(&local));
    rt.block_on(server.shutdown());
}
