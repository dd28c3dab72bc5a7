//! Rollouts: group sampling through the in-process engine, the environment's rewards,
//! group-normalised advantages (GRPO), and samples carrying the engine's routes; evaluation on
//! the held-out set (greedy mean reward and accuracy, pass@k, sample completions).
//!
//! GRPO advantage of sample i in a group of G: A_i = (r_i − mean(r)) / (std(r) + 1e-6), the
//! same for every completion token of the sample (0 when all rewards in the group are equal).
//!
//! Over ranks (`lockstep train --ranks N`, or under `lockstep launch`), every rank draws the
//! same tasks and generates the groups g ≡ rank (mod N) — the sampling seed of a request is its
//! index in the global batch, and the kernels are batch-invariant, so a completion is the one a
//! single rank would sample — with its engine stepping in lockstep with the others (the
//! experts are spread over the ranks); rewards and token counts are summed over the ranks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use lockstep_engine::{Completion, Engine, Request, SamplingParams};
use lockstep_trace::pack::Sample;
use rand_chacha::ChaCha8Rng;

use lockstep_trainer::parallel::{sum_over_ranks, Parallel};

use crate::config::RunConfig;
use crate::env::{Environment, Task};
use crate::error::{Result, RlError};

pub struct Rollouts {
    /// grouped: `groups[i]` holds `group_size` samples of one task — this rank's groups
    pub groups: Vec<Vec<Sample>>,
    /// index of `groups[i]` in the step's global batch of groups
    pub index: Vec<usize>,
    pub reward_mean: f64,
    pub completion_tokens: usize,
    /// mean of each `[[reward]]` table's own reward, by name
    pub reward_parts: BTreeMap<String, f64>,
    /// mean of each metric the rewards returned (an `http` verifier's, `http_failures`)
    pub reward_metrics: BTreeMap<String, f64>,
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
/// parallel run, stepping together), lockstep servers by URL, or vLLM / SGLang servers.
pub enum Rollouter {
    Local(Box<Engine>, Parallel),
    Remote(crate::remote::RemoteEngine),
    Foreign(crate::foreign::ForeignEngine),
}

/// Every prompt sent to the engine, in order (`RunOptions::prompt_log`).
pub type PromptLog = Arc<Mutex<Vec<Vec<u32>>>>;

impl Rollouter {
    /// Generate, first appending the prompts to `log` if one is given.
    pub fn generate_logged(&mut self, reqs: Vec<Request>, log: Option<&PromptLog>) -> Result<Vec<Completion>> {
        if let Some(l) = log {
            l.lock().unwrap_or_else(|e| e.into_inner()).extend(reqs.iter().map(|r| r.prompt.clone()));
        }
        self.generate(reqs)
    }

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
            Rollouter::Foreign(f) => f.generate(&reqs),
        }
    }

    fn parallel(&self) -> Parallel {
        match self {
            Rollouter::Local(_, p) => p.clone(),
            Rollouter::Remote(_) | Rollouter::Foreign(_) => None,
        }
    }
}

/// (rank, world size) of a rollouter.
fn shard_of(p: &Parallel) -> (usize, usize) {
    p.as_ref().map(|d| (d.rank(), d.world_size())).unwrap_or((0, 1))
}

/// Sum `xs` over the ranks (the values themselves on one rank).
fn sum_ranks(dp: &Parallel, xs: Vec<f64>) -> Result<Vec<f64>> {
    match dp {
        Some(dp) => Ok(sum_over_ranks(dp.as_ref(), &xs)?),
        None => Ok(xs),
    }
}

/// The step's rollouts: `prompts_per_step` tasks (training instances `first_index..`), each
/// sampled `group_size` times; a completion's tokens after a stop string are out of the loss.
#[allow(clippy::too_many_arguments)]
pub fn collect(
    engine: &mut Rollouter,
    env: &dyn Environment,
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    seed_base: u64,
    first_index: u64,
    log: Option<&PromptLog>,
) -> Result<Rollouts> {
    let g = cfg.rollout.group_size;
    let dp = engine.parallel();
    let (rank, world) = shard_of(&dp);
    let all_tasks: Vec<Task> = (0..cfg.rollout.prompts_per_step).map(|i| env.sample(first_index + i as u64, rng)).collect();
    let index: Vec<usize> = (0..all_tasks.len()).filter(|i| i % world == rank).collect();
    let stop = env.stop_tokens();
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
                    stop_token_ids: stop.clone(),
                    ..SamplingParams::default()
                },
            });
        }
    }
    let done: Vec<Completion> = engine.generate_logged(reqs, log)?;
    let items: Vec<(&Task, &[u32])> = index.iter().enumerate().flat_map(|(i, &ti)| done[i * g..(i + 1) * g].iter().map(move |c| (ti, c))).map(|(ti, c)| (&all_tasks[ti], c.tokens.as_slice())).collect();
    let judged = env.judge(&items)?;
    let names = env.reward_names();
    let mut parts = vec![0f64; names.len()];
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    let mut groups = Vec::new();
    let (mut rsum, mut ntok) = (0f64, 0usize);
    for (i, _) in index.iter().enumerate() {
        let comps = &done[i * g..(i + 1) * g];
        let js = &judged[i * g..(i + 1) * g];
        let rewards: Vec<f32> = js.iter().map(|j| j.scored.reward).collect();
        rsum += rewards.iter().map(|&r| r as f64).sum::<f64>();
        for j in js {
            for (p, v) in parts.iter_mut().zip(&j.scored.parts) {
                *p += f64::from(*v);
            }
            for (k, v) in &j.scored.metrics {
                *metrics.entry(k.clone()).or_default() += v;
            }
        }
        let adv = grpo_advantages(&rewards);
        let mut group = Vec::new();
        for ((c, &a), j) in comps.iter().zip(&adv).zip(js) {
            let tokens = c.sequence();
            let p = c.prompt.len();
            let mut logprobs = vec![0f32; p];
            logprobs.extend_from_slice(&c.logprobs);
            ntok += j.keep;
            group.push(Sample {
                // the prompt, and the completion's tokens after a stop string, are not trained
                loss_mask: (0..tokens.len()).map(|i| i >= p && i < p + j.keep).collect(),
                advantages: vec![a; tokens.len()],
                logprobs,
                // the engine's route trace, as it sent it (stamped with its policy version)
                routes: c.routes.clone(),
                tokens,
            });
        }
        groups.push(group);
    }
    let n = (all_tasks.len() * g) as f64;
    let mut sums = vec![rsum, ntok as f64];
    sums.extend(&parts);
    let sums = sum_ranks(&dp, sums)?;
    let reward_parts = names.iter().zip(&sums[2..]).map(|(k, v)| (k.clone(), v / n)).collect();
    // over ranks `http` rewards are refused (`RunConfig::validate_ranks`): the metrics are this rank's, i.e. all
    let reward_metrics = metrics.into_iter().map(|(k, v)| (k, v / n)).collect();
    Ok(Rollouts { groups, index, reward_mean: sums[0] / n, completion_tokens: sums[1] as usize, reward_parts, reward_metrics })
}

/// One held-out completion for the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalSample {
    pub prompt: String,
    pub completion: String,
    pub answer: String,
    pub reward: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalResult {
    /// mean reward of the greedy completions
    pub reward: f64,
    /// share of greedy completions with reward >= `eval.pass_threshold`
    pub accuracy: f64,
    /// `pass@k` → its estimate
    pub pass_at: BTreeMap<String, f64>,
    /// the first `eval.samples` held-out records' greedy completions (this rank's share)
    pub samples: Vec<EvalSample>,
}

/// Unbiased pass@k from `n` samples of which `c` pass: 1 − C(n−c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n.saturating_sub(c) < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// Evaluate on the environment's held-out set: greedy completions (mean reward, accuracy,
/// samples) and, for `eval.pass_k`, `group_size` samples per record at the rollout
/// temperature (seeded by `seed`).
pub fn evaluate(engine: &mut Rollouter, env: &dyn Environment, cfg: &RunConfig, seed: u64, log: Option<&PromptLog>) -> Result<EvalResult> {
    let max_tokens = cfg.rollout.max_tokens;
    let dp = engine.parallel();
    let (rank, world) = shard_of(&dp);
    let all = env.eval_set();
    let total = all.len().max(1) as f64;
    // this rank's share of the held-out set
    let set: Vec<Task> = all.into_iter().enumerate().filter(|(i, _)| i % world == rank).map(|(_, t)| t).collect();
    let stop = env.stop_tokens();
    let greedy = |t: &Task| Request { prompt: t.prompt.clone(), params: SamplingParams { temperature: 0.0, max_tokens, stop_token_ids: stop.clone(), ..SamplingParams::default() } };
    let done = engine.generate_logged(set.iter().map(greedy).collect(), log)?;
    let items: Vec<(&Task, &[u32])> = set.iter().zip(&done).map(|(t, c)| (t, c.tokens.as_slice())).collect();
    let judged = env.judge(&items)?;
    let thr = cfg.eval.pass_threshold;
    let reward: f64 = judged.iter().map(|j| f64::from(j.scored.reward)).sum();
    let passed = judged.iter().filter(|j| f64::from(j.scored.reward) >= thr).count() as f64;
    let samples = set
        .iter()
        .zip(&done)
        .zip(&judged)
        .take(cfg.eval.samples)
        .map(|((t, c), j)| EvalSample { prompt: t.prompt_text.clone(), completion: env.decode(&c.tokens[..j.keep.min(c.tokens.len())]), answer: t.answer_text.clone(), reward: f64::from(j.scored.reward) })
        .collect();
    let mut sums = vec![reward, passed];
    let ks = &cfg.eval.pass_k;
    if !ks.is_empty() {
        let g = cfg.rollout.group_size;
        let mut reqs = Vec::new();
        for (i, t) in set.iter().enumerate() {
            let gi = i * world + rank; // the record's index in the whole held-out set
            for j in 0..g {
                let params = SamplingParams {
                    temperature: cfg.rollout.temperature,
                    seed: seed.wrapping_mul(1_000_003).wrapping_add((gi * g + j) as u64),
                    max_tokens,
                    stop_token_ids: stop.clone(),
                    ..SamplingParams::default()
                };
                reqs.push(Request { prompt: t.prompt.clone(), params });
            }
        }
        let sampled = engine.generate_logged(reqs, log)?;
        let items: Vec<(&Task, &[u32])> = sampled.iter().enumerate().map(|(i, c)| (&set[i / g], c.tokens.as_slice())).collect();
        let js = env.judge(&items)?;
        for &k in ks {
            let s: f64 = js.chunks(g).map(|grp| pass_at_k(g, grp.iter().filter(|j| f64::from(j.scored.reward) >= thr).count(), k)).sum();
            sums.push(s);
        }
    }
    let sums = sum_ranks(&dp, sums)?;
    let pass_at = ks.iter().zip(&sums[2..]).map(|(k, v)| (format!("pass@{k}"), v / total)).collect();
    Ok(EvalResult { reward: sums[0] / total, accuracy: sums[1] / total, pass_at, samples })
}

/// The last eval's sample completions: `<out>/eval_samples.json` (the report's table).
pub fn write_samples(out: &Path, ev: &EvalResult) -> Result<()> {
    let p = out.join("eval_samples.json");
    let text = serde_json::to_string_pretty(&ev.samples).map_err(|e| RlError::io(&p, e))?;
    std::fs::write(&p, text).map_err(|e| RlError::io(&p, e))
}

/// The samples [`write_samples`] left (none when there are none or they do not parse).
pub fn read_samples(out: &Path) -> Vec<EvalSample> {
    std::fs::read_to_string(out.join("eval_samples.json")).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}
