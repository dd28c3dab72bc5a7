//! Rollouts: group sampling through the in-process engine, exact-match rewards,
//! group-normalised advantages (GRPO), and samples carrying the engine's routes.
//!
//! GRPO advantage of sample i in a group of G: A_i = (r_i − mean(r)) / (std(r) + 1e-6), the
//! same for every completion token of the sample (0 when all rewards in the group are equal).
//!
//! Over ranks (`lockstep train --ranks N`, or under `lockstep launch`), every rank draws the
//! same tasks and generates the groups g ≡ rank (mod N) — the sampling seed of a request is its
//! index in the global batch, and the kernels are batch-invariant, so a completion is the one a
//! single rank would sample — with its engine stepping in lockstep with the others (the
//! experts are spread over the ranks); rewards and token counts are summed over the ranks.

use lockstep_engine::{Completion, Engine, Request, SamplingParams};
use lockstep_trace::pack::Sample;
use rand_chacha::ChaCha8Rng;

use lockstep_trainer::parallel::{sum_over_ranks, Parallel};

use crate::config::RunConfig;
use crate::env::{Environment, Task};
use crate::error::Result;

pub struct Rollouts {
    /// grouped: `groups[i]` holds `group_size` samples of one task — this rank's groups
    pub groups: Vec<Vec<Sample>>,
    /// index of `groups[i]` in the step's global batch of groups
    pub index: Vec<usize>,
    pub reward_mean: f64,
    pub completion_tokens: usize,
}

pub fn grpo_advantages(rewards: &[f32]) -> Vec<f32> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
    let var = rewards.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    rewards.iter().map(|&r| ((r as f64 - mean) / (std + 1e-6)) as f32).collect()
}

/// Whether a group carries a GRPO signal: its rewards are not all equal (else every advantage
/// is 0 and the group only dilutes the token mean).
pub fn has_signal(group: &[Sample]) -> bool {
    let a: Vec<f32> = group.iter().filter_map(|s| s.advantages.first().copied()).collect();
    a.iter().any(|&x| x != 0.0)
}

/// Where rollouts come from: the in-process engine (on one rank, or on every rank of a
/// parallel run, stepping together) or lockstep servers by URL.
pub enum Rollouter {
    Local(Box<Engine>, Parallel),
    Remote(crate::remote::RemoteEngine),
}

impl Rollouter {
    pub fn generate(&mut self, reqs: Vec<Request>) -> Result<Vec<Completion>> {
        match self {
            Rollouter::Local(e, None) => Ok(e.generate(reqs)?),
            Rollouter::Local(e, Some(dp)) => {
                let mut any_busy = |busy: bool| -> lockstep_engine::Result<bool> {
                    let all = dp.all_gather_host(&[f64::from(u8::from(busy))]).map_err(|e| lockstep_engine::EngineError::Model(candle_core::Error::Msg(format!("ranks: {e}")).into()))?;
                    Ok(all.iter().any(|r| r[0] > 0.0))
                };
                Ok(e.generate_lockstep(reqs, &mut any_busy)?)
            }
            Rollouter::Remote(r) => r.generate(&reqs),
        }
    }

    fn parallel(&self) -> Parallel {
        match self {
            Rollouter::Local(_, p) => p.clone(),
            Rollouter::Remote(_) => None,
        }
    }
}

/// (rank, world size) of a rollouter.
fn shard_of(p: &Parallel) -> (usize, usize) {
    p.as_ref().map(|d| (d.rank(), d.world_size())).unwrap_or((0, 1))
}

#[allow(clippy::too_many_arguments)]
pub fn collect(
    engine: &mut Rollouter,
    env: &dyn Environment,
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    seed_base: u64,
) -> Result<Rollouts> {
    let g = cfg.rollout.group_size;
    let dp = engine.parallel();
    let (rank, world) = shard_of(&dp);
    let all_tasks: Vec<Task> = (0..cfg.rollout.prompts_per_step).map(|_| env.sample(rng)).collect();
    let index: Vec<usize> = (0..all_tasks.len()).filter(|i| i % world == rank).collect();
    let mut reqs = Vec::new();
    for &ti in &index {
        let t = &all_tasks[ti];
        for j in 0..g {
            reqs.push(Request {
                prompt: t.prompt.clone(),
                params: SamplingParams {
                    temperature: cfg.rollout.temperature,
                    seed: seed_base.wrapping_mul(1_000_003).wrapping_add((ti * g + j) as u64),
                    max_tokens: cfg.rollout.max_tokens,
                    stop_token_ids: vec![env.stop_token()],
                    ..SamplingParams::default()
                },
            });
        }
    }
    let done: Vec<Completion> = engine.generate(reqs)?;
    let mut groups = Vec::new();
    let (mut rsum, mut ntok) = (0f64, 0usize);
    for (i, &ti) in index.iter().enumerate() {
        let t = &all_tasks[ti];
        let comps = &done[i * g..(i + 1) * g];
        let rewards: Vec<f32> = comps.iter().map(|c| env.reward(t, &c.tokens)).collect();
        rsum += rewards.iter().map(|&r| r as f64).sum::<f64>();
        let adv = grpo_advantages(&rewards);
        let mut group = Vec::new();
        for (c, &a) in comps.iter().zip(&adv) {
            let tokens = c.sequence();
            let p = c.prompt.len();
            let mut logprobs = vec![0f32; p];
            logprobs.extend_from_slice(&c.logprobs);
            ntok += c.tokens.len();
            group.push(Sample {
                loss_mask: (0..tokens.len()).map(|i| i >= p).collect(),
                advantages: vec![a; tokens.len()],
                logprobs,
                // the engine's route trace, as it sent it (stamped with its policy version)
                routes: c.routes.clone(),
                tokens,
            });
        }
        groups.push(group);
    }
    if let Some(dp) = &dp {
        let sum = sum_over_ranks(dp.as_ref(), &[rsum, ntok as f64])?;
        (rsum, ntok) = (sum[0], sum[1] as usize);
    }
    Ok(Rollouts { groups, index, reward_mean: rsum / (all_tasks.len() * g) as f64, completion_tokens: ntok })
}

/// Greedy accuracy on the environment's held-out set.
pub fn evaluate(engine: &mut Rollouter, env: &dyn Environment, max_tokens: usize) -> Result<f64> {
    let dp = engine.parallel();
    let (rank, world) = shard_of(&dp);
    let all = env.eval_set();
    let total = all.len();
    // this rank's share of the held-out set
    let set: Vec<Task> = all.into_iter().enumerate().filter(|(i, _)| i % world == rank).map(|(_, t)| t).collect();
    let reqs: Vec<Request> = set
        .iter()
        .map(|t| Request {
            prompt: t.prompt.clone(),
            params: SamplingParams { temperature: 0.0, max_tokens, stop_token_ids: vec![env.stop_token()], ..SamplingParams::default() },
        })
        .collect();
    let done = engine.generate(reqs)?;
    let mut correct: f64 = set.iter().zip(&done).map(|(t, c)| env.reward(t, &c.tokens) as f64).sum();
    if let Some(dp) = &dp {
        correct = sum_over_ranks(dp.as_ref(), &[correct])?[0];
    }
    Ok(correct / total.max(1) as f64)
}
