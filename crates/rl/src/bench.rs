//! The fixed synthetic RL workload of `lockstep bench-rl`: what one RL step of `lockstep train`
//! does, timed by phase, on made-up prompts so that any model (a checkpoint, or a full-size
//! config with random weights) runs it.
//!
//! One step: **rollout** — `prompts` prompts of `prompt_len` pseudo-random token ids, each
//! sampled `group` times for exactly `gen_len` tokens (no stop tokens: ignore_eos) through the
//! in-process engine with route capture; a synthetic reward (the share of even token ids in
//! the completion) and GRPO advantages; samples packed into micro-batches of at most
//! `micro_batch_tokens` tokens, `mini_steps` updates of whole groups (as `rl::run`).
//! **π_old scoring** — [`Trainer::score`] over every micro-batch (decoupled PPO, replayed
//! routes). **fwd + bwd + optimizer** — one [`Trainer::step`] per mini-step (PPO, replay on).
//! **weight sync** — the next step's engine model: [`Trainer::inference_model`] (an engine in
//! the trainer's compute dtype shares its storage; another dtype gets a cast copy, the transfer
//! a separate inference engine would need) and a new [`Engine`] (its KV pool is made in the
//! rollout).
//! Every phase ends with a device synchronisation, so its time is its own.
//!
//! **FLOPs** (model FLOPs: nothing recomputed is counted). Per token, a forward's matmuls cost
//! 2 · N_act, N_act = the matmul weights the token passes through: per layer q, k, v, o
//! (d·H·Dh + 2·d·G·Dh + H·Dh·d), the router (d·E), its experts (k · 3·d·F for token choice;
//! E·C/P per token for expert choice, C = min(P, ⌈cf·P/E⌉) over pools of P tokens), shared
//! experts (3·d·F_s, + d for a gated one), dense MLPs (3·d·F); the LM head V·d once (the
//! embedding lookup, norms and biases are not matmuls). Attention of a token that sees c keys
//! costs 2·c·d_attn (Q·Kᵀ) + 2·c·d_attn (P·V) per layer, d_attn = H·Dh. Training (forward +
//! backward = 3 forwards) is therefore
//!
//! ```text
//! FLOPs = Σ_tokens [ 6 · N_act + L · 6 · (2 · c · d_attn) ]
//! ```
//!
//! with c = t + 1 for the token at position t under causal attention (a sequence of T tokens:
//! Σ c = T(T+1)/2, i.e. 6·L·d_attn·T(T+1) for its attention), c = T for bidirectional
//! attention, c = the end of the token's block for block attention. MFU = training FLOPs /
//! (time of fwd + bwd + optimizer) / peak.
//!
//! The optimizer's share cannot be read from `Trainer::step` (it is one call); [`optimizer_probe`]
//! times one AdamW update of every parameter separately after the run, and the report
//! splits `train_step_s` into fwd + bwd (the rest) and optimizer with it.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lockstep_engine::{Engine, Request, SamplingParams};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};
use lockstep_trace::pack::{pack, PackConfig, Sample};
use lockstep_trainer::optim::GradAccumulator;
use lockstep_trainer::trainer::{TrainBatch, Trainer};

use crate::error::{bad, Result};
use crate::rollout::grpo_advantages;

/// The workload's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchConfig {
    pub prompts: usize,
    pub group: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// most tokens per micro-batch
    pub micro_batch_tokens: usize,
    pub mini_steps: usize,
    pub steps: usize,
    pub seed: u64,
    pub temperature: f32,
    /// the rollout engine's weight dtype: the trainer's compute dtype shares its weights, another
    /// casts a copy at every weight sync
    pub engine_dtype: DType,
    pub engine_kernels: Kernels,
    /// the engine's token budget per step (chunked prefill)
    pub max_batched_tokens: usize,
}

impl BenchConfig {
    /// Every size > 0, a sequence fits a micro-batch, at most one mini-step per prompt.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [("prompts", self.prompts), ("group", self.group), ("prompt_len", self.prompt_len), ("gen_len", self.gen_len), ("mini_steps", self.mini_steps), ("steps", self.steps), ("max_batched_tokens", self.max_batched_tokens)] {
            if v == 0 {
                return Err(bad(k, "must be > 0"));
            }
        }
        if self.micro_batch_tokens < self.seq_len() {
            return Err(bad("micro_batch_tokens", format!("{}: a sequence is prompt_len + gen_len = {} tokens and must fit one micro-batch", self.micro_batch_tokens, self.seq_len())));
        }
        if self.mini_steps > self.prompts {
            return Err(bad("mini_steps", format!("{} > prompts {}: every update takes whole groups", self.mini_steps, self.prompts)));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(bad("temperature", "must be > 0 (the trainer scores at the rollout temperature)"));
        }
        Ok(())
    }

    pub fn seq_len(&self) -> usize {
        self.prompt_len + self.gen_len
    }
}

/// Experts one token passes through in an MoE layer (module doc).
pub fn experts_per_token(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let e = cfg.moe.router.num_experts as f64;
    match cfg.moe.router.strategy {
        RoutingStrategy::TokenChoice => cfg.moe.router.top_k as f64,
        RoutingStrategy::ExpertChoice { capacity_factor, pool } => {
            let p = match pool {
                Pool::Block(n) => n.min(seq_len.max(1)),
                Pool::Sequence | Pool::Batch => seq_len.max(1),
            } as f64;
            let c = (capacity_factor * p / e).ceil().min(p);
            e * c / p
        }
    }
}

/// N_act: matmul weights one token passes through in a forward (module doc).
pub fn active_matmul_params(cfg: &ModelConfig, seq_len: usize) -> f64 {
    let d = cfg.hidden_size as f64;
    let a = &cfg.attention;
    let (q, kv) = ((a.num_heads * a.head_dim) as f64, (a.num_kv_heads * a.head_dim) as f64);
    let attn = 2.0 * d * q + 2.0 * d * kv;
    let m = &cfg.moe;
    let shared = m.shared_expert.as_ref().map_or(0.0, |s| 3.0 * d * s.intermediate_size as f64 + if s.gated { d } else { 0.0 });
    let moe = d * m.router.num_experts as f64 + experts_per_token(cfg, seq_len) * 3.0 * d * m.expert_intermediate_size as f64 + shared;
    let dense = 3.0 * d * cfg.dense_intermediate_size as f64;
    let n_moe = cfg.moe_layers.len() as f64;
    let n_dense = (cfg.num_layers - cfg.moe_layers.len()) as f64;
    cfg.num_layers as f64 * attn + n_moe * moe + n_dense * dense + cfg.vocab_size as f64 * d
}

/// Σ over a sequence's T tokens of the keys each sees (module doc).
pub fn attention_keys(t: usize, mode: AttentionMode) -> f64 {
    let t64 = t as f64;
    match mode {
        AttentionMode::Causal => t64 * (t64 + 1.0) / 2.0,
        AttentionMode::Bidirectional => t64 * t64,
        AttentionMode::Block(b) => (0..t).map(|i| ((i / b + 1) * b).min(t) as f64).sum(),
    }
}

/// Training FLOPs (forward + backward) of sequences of these lengths (module doc).
pub fn train_flops(cfg: &ModelConfig, seq_lens: &[usize]) -> f64 {
    let d_attn = (cfg.attention.num_heads * cfg.attention.head_dim) as f64;
    let l = cfg.num_layers as f64;
    seq_lens.iter().map(|&t| 6.0 * active_matmul_params(cfg, t) * t as f64 + l * 6.0 * 2.0 * d_attn * attention_keys(t, cfg.attention.mode)).sum()
}

/// Peak memory so far ([`lockstep_model::memory_peak`]): on CUDA the high watermark of the
/// device's memory pool (every allocation, the peak inside a backward included), on the CPU the
/// process's peak resident set (VmHWM). Where the pool has no watermark, the most device memory
/// seen in use (total − free) after any phase.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PeakMemory {
    pub bytes: u64,
    /// how `bytes` was measured
    pub source: &'static str,
}

impl PeakMemory {
    pub fn sample(&mut self, dev: &Device) -> Result<()> {
        let (now, source) = match lockstep_model::memory_peak(dev, false)? {
            Some(b) if dev.is_cpu() => (b, "VmHWM of /proc/self/status (peak resident set of the process)"),
            Some(b) => (b, "high watermark of the CUDA memory pool (CU_MEMPOOL_ATTR_USED_MEM_HIGH)"),
            None => match lockstep_model::memory_info(dev)? {
                Some((free, total)) => ((total - free.min(total)) as u64, "device memory in use (total - free), the most seen after any phase"),
                None => (vm_hwm().unwrap_or(0), "VmHWM of /proc/self/status (peak resident set of the process)"),
            },
        };
        self.bytes = self.bytes.max(now);
        self.source = source;
        Ok(())
    }
}

fn vm_hwm() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// One step's measurements.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepReport {
    pub step: usize,
    pub rollout_s: f64,
    pub pi_old_score_s: f64,
    /// `Trainer::step` for every mini-step: forward + backward + optimizer
    pub train_step_s: f64,
    pub weight_sync_s: f64,
    /// completion tokens generated
    pub rollout_tokens: usize,
    /// real tokens (prompt + completion) through forward + backward, over the mini-steps
    pub trainer_tokens: usize,
    pub train_flops: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub reward_mean: f64,
    /// per mini-step, per micro-batch: the sequence lengths packed into it
    pub micro_batches: Shapes,
    pub peak_memory_bytes: u64,
    /// the CUDA pool's high watermark over π_old scoring and the updates alone (reset after the
    /// rollout, whose KV pool is gone by then): the trainer's peak, to set beside its memory
    /// plan; None off CUDA
    pub train_peak_bytes: Option<u64>,
    /// seconds per trainer phase over the step's updates (`TrainerConfig::time_phases`; empty
    /// when off)
    pub phases: lockstep_trainer::phases::PhaseSeconds,
}

/// The step's prompts: `prompt_len` pseudo-random ids per prompt (as `bench-serve`'s).
pub fn prompts(cfg: &BenchConfig, vocab: usize, step: usize) -> Vec<Vec<u32>> {
    let v = vocab.max(2) as u64;
    (0..cfg.prompts as u64)
        .map(|r| (0..cfg.prompt_len as u64).map(|i| ((i * 2_654_435_761 + (r + 1 + step as u64 * 7919) * 40_503 + 17 + cfg.seed) % v) as u32).collect())
        .collect()
}

/// The synthetic reward: the share of even token ids in a completion.
pub fn reward(tokens: &[u32]) -> f32 {
    tokens.iter().filter(|&&t| t % 2 == 0).count() as f32 / tokens.len().max(1) as f32
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// The engine of a step: the trainer's weights in the engine's dtype and kernels.
pub fn engine_for(trainer: &Trainer, cfg: &BenchConfig, version: u64) -> Result<Engine> {
    let mut model: MoeCausalLm = trainer.inference_model()?;
    if model.dtype() != cfg.engine_dtype {
        model.cast(cfg.engine_dtype)?;
    }
    model.set_kernels(cfg.engine_kernels);
    let mut e = Engine::new(model);
    e.max_running = cfg.prompts * cfg.group;
    e.cache.max_model_len = cfg.seq_len();
    e.cache.max_batched_tokens = cfg.max_batched_tokens;
    // the trainer holds most of the device: the pool is capped by what the step needs
    // (max_running × max_model_len), so let it use whatever memory is free
    e.cache.gpu_memory_fraction = 1.0;
    e.policy_version = version;
    Ok(e)
}

/// Rollouts of one step: grouped samples with rewards, advantages and the engine's routes.
fn rollout(engine: &mut Engine, cfg: &BenchConfig, step: usize) -> Result<(Vec<Vec<Sample>>, usize, f64)> {
    let vocab = engine.model().cfg.vocab_size;
    let mut reqs = Vec::new();
    for (pi, p) in prompts(cfg, vocab, step).into_iter().enumerate() {
        for j in 0..cfg.group {
            let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add((step * cfg.prompts * cfg.group + pi * cfg.group + j) as u64);
            let params = SamplingParams { temperature: cfg.temperature, seed, max_tokens: cfg.gen_len, ..SamplingParams::default() };
            reqs.push(Request { prompt: p.clone(), params });
        }
    }
    let done = engine.generate(reqs)?;
    let mut groups = Vec::new();
    let (mut tokens, mut rsum) = (0usize, 0f64);
    for comps in done.chunks(cfg.group) {
        let rewards: Vec<f32> = comps.iter().map(|c| reward(&c.tokens)).collect();
        rsum += rewards.iter().map(|&r| f64::from(r)).sum::<f64>();
        let adv = grpo_advantages(&rewards);
        let mut group = Vec::new();
        for (c, &a) in comps.iter().zip(&adv) {
            let seq = c.sequence();
            let p = c.prompt.len();
            tokens += c.tokens.len();
            let mut logprobs = vec![0f32; p];
            logprobs.extend_from_slice(&c.logprobs);
            group.push(Sample { loss_mask: (0..seq.len()).map(|i| i >= p).collect(), advantages: vec![a; seq.len()], logprobs, routes: c.routes.clone(), tokens: seq });
        }
        groups.push(group);
    }
    Ok((groups, tokens, rsum / done.len().max(1) as f64))
}

/// Per mini-step, per micro-batch: the sequence lengths packed into it.
pub type Shapes = Vec<Vec<Vec<usize>>>;

/// Micro-batches of every mini-step (whole groups per update, as `rl::run`).
fn micro_batches(groups: &[Vec<Sample>], cfg: &BenchConfig, dev: &Device) -> Result<(Vec<Vec<TrainBatch>>, Shapes)> {
    let per = groups.len().div_ceil(cfg.mini_steps);
    let (mut minis, mut shapes) = (Vec::new(), Vec::new());
    for chunk in groups.chunks(per.max(1)) {
        let samples: Vec<Sample> = chunk.iter().flatten().cloned().collect();
        let mbs = pack(&samples, &PackConfig { token_budget: cfg.micro_batch_tokens, pad_to_multiple: 1, pad_token: 0 })?;
        shapes.push(mbs.iter().map(|mb| mb.sequences.iter().map(|s| s.len).collect()).collect());
        minis.push(mbs.iter().map(|mb| TrainBatch::from_micro_batch(mb, dev)).collect::<std::result::Result<Vec<_>, _>>()?);
    }
    Ok((minis, shapes))
}

/// Run `cfg.steps` steps on `trainer` (its config decides the loss: PPO with π_old recomputed
/// is what `bench-rl` sets). `each` sees every step's report as it finishes.
pub fn run(trainer: &mut Trainer, cfg: &BenchConfig, each: &mut dyn FnMut(&StepReport)) -> Result<Vec<StepReport>> {
    cfg.validate()?;
    let dev = trainer.model.device().clone();
    let mut peak = PeakMemory::default();
    let mut out = Vec::new();
    let t = Instant::now();
    let mut engine = engine_for(trainer, cfg, 0)?;
    sync(&dev)?;
    let mut sync_s = t.elapsed().as_secs_f64();
    for step in 0..cfg.steps {
        let mut r = StepReport { step: step + 1, weight_sync_s: sync_s, ..StepReport::default() };
        let t = Instant::now();
        let (groups, tokens, reward_mean) = rollout(&mut engine, cfg, step)?;
        drop(engine); // the KV pool goes back (to CUDA's pool, for the trainer's activations)
        sync(&dev)?;
        r.rollout_s = t.elapsed().as_secs_f64();
        (r.rollout_tokens, r.reward_mean) = (tokens, reward_mean);
        peak.sample(&dev)?;

        if dev.is_cuda() {
            lockstep_model::memory_peak(&dev, true)?;
        }
        let t = Instant::now();
        let (mut minis, shapes) = micro_batches(&groups, cfg, &dev)?;
        for tbs in &mut minis {
            trainer.score(tbs)?;
        }
        sync(&dev)?;
        r.pi_old_score_s = t.elapsed().as_secs_f64();
        peak.sample(&dev)?;

        let lens: Vec<usize> = shapes.iter().flatten().flatten().copied().collect();
        r.trainer_tokens = lens.iter().sum();
        r.train_flops = train_flops(&trainer.model.cfg, &lens);
        r.micro_batches = shapes;
        let t = Instant::now();
        let mut updates = 0f64;
        for tbs in &minis {
            let m = trainer.step(tbs)?;
            r.loss += m.loss;
            r.grad_norm += m.grad_norm;
            for (k, v) in &m.phases {
                *r.phases.entry(k).or_default() += v;
            }
            updates += 1.0;
        }
        sync(&dev)?;
        r.train_step_s = t.elapsed().as_secs_f64();
        (r.loss, r.grad_norm) = (r.loss / updates.max(1.0), r.grad_norm / updates.max(1.0));
        drop(minis);
        if dev.is_cuda() {
            r.train_peak_bytes = lockstep_model::memory_peak(&dev, false)?;
        }
        peak.sample(&dev)?;

        // weight sync for the next step (timed into it; the first step's is the initial build)
        let t = Instant::now();
        engine = engine_for(trainer, cfg, step as u64 + 1)?;
        sync(&dev)?;
        sync_s = t.elapsed().as_secs_f64();
        peak.sample(&dev)?;
        r.peak_memory_bytes = peak.bytes;
        each(&r);
        out.push(r);
    }
    Ok(out)
}

/// Seconds of one AdamW update of every trainable parameter (zero gradients: the update's
/// cost does not depend on the values). It changes the weights and the optimizer's step, so
/// run it after the measured steps. Returns the seconds.
pub fn optimizer_probe(trainer: &mut Trainer) -> Result<f64> {
    let dev = trainer.model.device().clone();
    let mut acc = GradAccumulator::default();
    for (name, v) in &trainer.params {
        // gradients are accumulated in f32 whatever the compute dtype
        acc.set(name, Tensor::zeros(v.as_tensor().shape(), DType::F32, &dev)?);
    }
    sync(&dev)?;
    let t = Instant::now();
    trainer.optimizer.apply(&trainer.params, &acc)?;
    sync(&dev)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Means over the steps after the first (the warm-up: kernels loaded, pools made), or over all
/// when there is one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    pub averaged_steps: Vec<usize>,
    pub rollout_tokens_per_s: f64,
    pub trainer_tokens_per_s: f64,
    pub train_tflops_per_s: f64,
    pub mfu: f64,
    pub rollout_s: f64,
    pub pi_old_score_s: f64,
    pub train_step_s: f64,
    pub fwd_bwd_s: f64,
    pub optimizer_s: f64,
    pub weight_sync_s: f64,
    pub step_s: f64,
}

/// Means of `steps` (the first left out when there are more), MFU against `peak_tflops`.
pub fn summarize(steps: &[StepReport], optimizer_s: f64, peak_tflops: f64) -> Summary {
    let used: Vec<&StepReport> = if steps.len() > 1 { steps[1..].iter().collect() } else { steps.iter().collect() };
    let n = used.len().max(1) as f64;
    let mean = |f: &dyn Fn(&StepReport) -> f64| used.iter().map(|r| f(r)).sum::<f64>() / n;
    let (rollout_s, score_s, train_s, sync_s) = (mean(&|r| r.rollout_s), mean(&|r| r.pi_old_score_s), mean(&|r| r.train_step_s), mean(&|r| r.weight_sync_s));
    let updates = mean(&|r| r.micro_batches.len() as f64);
    let optimizer_s = (optimizer_s * updates).min(train_s);
    let flops = mean(&|r| r.train_flops);
    let tflops = if train_s > 0.0 { flops / train_s / 1e12 } else { 0.0 };
    Summary {
        averaged_steps: used.iter().map(|r| r.step).collect(),
        rollout_tokens_per_s: mean(&|r| r.rollout_tokens as f64) / rollout_s.max(1e-12),
        trainer_tokens_per_s: mean(&|r| r.trainer_tokens as f64) / train_s.max(1e-12),
        train_tflops_per_s: tflops,
        mfu: if peak_tflops > 0.0 { tflops / peak_tflops } else { 0.0 },
        rollout_s,
        pi_old_score_s: score_s,
        train_step_s: train_s,
        fwd_bwd_s: train_s - optimizer_s,
        optimizer_s,
        weight_sync_s: sync_s,
        step_s: rollout_s + score_s + train_s + sync_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_count_causal_attention_and_active_experts() {
        let cfg = lockstep_model::init::default_config();
        // default: d 64, 4 heads / 2 kv of 16, 4 layers (layer 2 dense), 8 experts top-2, F 48, dense 128, V 256
        let attn = 2.0 * 64.0 * 64.0 + 2.0 * 64.0 * 32.0;
        let moe = 64.0 * 8.0 + 2.0 * 3.0 * 64.0 * 48.0;
        let dense = 3.0 * 64.0 * 128.0;
        let n_act = 4.0 * attn + 3.0 * moe + dense + 256.0 * 64.0;
        assert_eq!(active_matmul_params(&cfg, 10), n_act);
        assert_eq!(attention_keys(4, AttentionMode::Causal), 10.0);
        assert_eq!(attention_keys(4, AttentionMode::Bidirectional), 16.0);
        assert_eq!(attention_keys(5, AttentionMode::Block(2)), 2.0 + 2.0 + 4.0 + 4.0 + 5.0);
        let f = train_flops(&cfg, &[4, 4]);
        assert_eq!(f, 2.0 * (6.0 * n_act * 4.0 + 4.0 * 6.0 * 2.0 * 64.0 * 10.0));
    }

    #[test]
    fn summary_skips_the_warm_up_step() {
        let s = |step, secs: f64| StepReport { step, rollout_s: secs, pi_old_score_s: secs, train_step_s: secs, weight_sync_s: secs, rollout_tokens: 10, trainer_tokens: 20, train_flops: 4e12, micro_batches: vec![vec![vec![5]]], ..Default::default() };
        let sum = summarize(&[s(1, 100.0), s(2, 2.0), s(3, 2.0)], 0.5, 1.0);
        assert_eq!(sum.averaged_steps, vec![2, 3]);
        assert_eq!(sum.rollout_tokens_per_s, 5.0);
        assert_eq!(sum.trainer_tokens_per_s, 10.0);
        assert_eq!((sum.fwd_bwd_s, sum.optimizer_s), (1.5, 0.5));
        assert_eq!(sum.mfu, 2.0);
        assert_eq!(sum.step_s, 8.0);
    }
}
