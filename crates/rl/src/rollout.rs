//! Rollouts: group sampling through the in-process engine, exact-match rewards,
//! group-normalised advantages (GRPO), and samples carrying the engine's routes.
//!
//! GRPO advantage of sample i in a group of G: A_i = (r_i − mean(r)) / (std(r) + 1e-6), the
//! same for every completion token of the sample (0 when all rewards in the group are equal).

use lockstep_engine::{Completion, Engine, Request, SamplingParams};
use lockstep_trace::pack::Sample;
use rand_chacha::ChaCha8Rng;

use crate::config::RunConfig;
use crate::env::{Environment, Task};
use crate::error::Result;

pub struct Rollouts {
    /// grouped: `groups[g]` holds `group_size` samples of one task
    pub groups: Vec<Vec<Sample>>,
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

/// Where rollouts come from: the in-process engine or lockstep servers by URL.
pub enum Rollouter {
    Local(Box<Engine>),
    Remote(crate::remote::RemoteEngine),
}

impl Rollouter {
    pub fn generate(&mut self, reqs: Vec<Request>) -> Result<Vec<Completion>> {
        match self {
            Rollouter::Local(e) => Ok(e.generate(reqs)?),
            Rollouter::Remote(r) => r.generate(&reqs),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn collect(
    engine: &mut Rollouter,
    env: &dyn Environment,
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    seed_base: u64,
    num_experts: usize,
    fingerprint: u64,
) -> Result<Rollouts> {
    let g = cfg.rollout.group_size;
    let tasks: Vec<Task> = (0..cfg.rollout.prompts_per_step).map(|_| env.sample(rng)).collect();
    let mut reqs = Vec::new();
    for (ti, t) in tasks.iter().enumerate() {
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
    for (ti, t) in tasks.iter().enumerate() {
        let comps = &done[ti * g..(ti + 1) * g];
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
                routes: Some(c.route_trace(num_experts, fingerprint)?),
                tokens,
            });
        }
        groups.push(group);
    }
    Ok(Rollouts { groups, reward_mean: rsum / (tasks.len() * g) as f64, completion_tokens: ntok })
}

/// Greedy accuracy on the environment's held-out set.
pub fn evaluate(engine: &mut Rollouter, env: &dyn Environment, max_tokens: usize) -> Result<f64> {
    let set = env.eval_set();
    let reqs: Vec<Request> = set
        .iter()
        .map(|t| Request {
            prompt: t.prompt.clone(),
            params: SamplingParams { temperature: 0.0, max_tokens, stop_token_ids: vec![env.stop_token()], ..SamplingParams::default() },
        })
        .collect();
    let done = engine.generate(reqs)?;
    let correct: f32 = set.iter().zip(&done).map(|(t, c)| env.reward(t, &c.tokens)).sum();
    Ok(correct as f64 / set.len().max(1) as f64)
}
