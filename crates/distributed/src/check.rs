//! "W ranks equal one rank": expert parallelism + data parallelism over a process group against
//! one rank holding every expert and the whole batch, on the same device type. Every rank runs
//! the single-rank reference itself (the check model is small), then its shard, and compares
//! its own part:
//!
//! - logits of its rows, relative to the largest reference logit (below f32: both the W-rank
//!   and the one-rank logits against an f32 reference, `AgainstF32`; gradients likewise);
//! - routes: the (token, expert) pairs of every MoE layer, identical;
//! - gradients of every parameter (loss Σ logits·R, R a fixed random cotangent of the global
//!   batch), replicated ones after the all-reduce, expert ones on their owner;
//! - replicated gradients bitwise identical on every rank (a hash of each, gathered);
//! - record → replay of its own route reproduces its logits bitwise;
//! - routing health reduced over the ranks equals the single rank's (tokens per expert,
//!   max_vio, token-weighted confidence);
//! - one AdamW step with clipping (`dp::step`): the global gradient norm equals the single
//!   rank's, every parameter afterwards too, and the replicated ones are bitwise identical on
//!   every rank.
//!
//! Used by the CPU tests (`tests/ep_equals_single.rs`, thread ranks), the GPU test
//! (`crates/cli/tests/gpu_ep.rs`) and `lockstep dist-check` (NCCL ranks, one per GPU).
//! Legend: B rows of the global batch, T tokens per row, V vocabulary.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lockstep_model::config::{AttentionMode, Pool, RoutingStrategy};
use lockstep_model::metrics::{layer_health, LayerHealth};
use lockstep_collective::Collective;
use lockstep_model::{Batch, MoeCausalLm, Recording, Result, RoutingPlan};
use lockstep_trainer::optim::{AdamW, AdamWConfig, GradAccumulator};

use crate::dp::{is_expert_param, shard_experts, train_err};

#[derive(Debug, Clone)]
pub struct CheckCase {
    /// rows of the global batch (a multiple of the world size)
    pub rows: usize,
    pub seq: usize,
    pub expert_choice: bool,
    pub dtype: DType,
    pub seed: u64,
}

impl Default for CheckCase {
    fn default() -> Self {
        CheckCase { rows: 4, seq: 24, expert_choice: false, dtype: DType::F32, seed: 5 }
    }
}

/// Deterministic stream (splitmix64): the same tokens and cotangent on every rank and machine.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

impl CheckCase {
    pub fn model(&self, dev: &Device) -> Result<MoeCausalLm> {
        let mut m = MoeCausalLm::embedded_default(3, self.dtype, dev)?;
        if self.expert_choice {
            let s = RoutingStrategy::ExpertChoice { capacity_factor: 1.5, pool: Pool::Sequence };
            m.set_routing(s, AttentionMode::Bidirectional, false)?;
        }
        Ok(m)
    }

    pub fn global_rows(&self, vocab: usize) -> Vec<Vec<u32>> {
        let mut s = Stream(self.seed);
        (0..self.rows).map(|_| (0..self.seq).map(|_| 1 + (s.next() % (vocab as u64 - 1)) as u32).collect()).collect()
    }

    /// R_BTV, on the CPU (f32).
    fn cotangent(&self, vocab: usize) -> Result<Tensor> {
        let mut s = Stream(self.seed ^ 0xC0DE);
        let data: Vec<f32> = (0..self.rows * self.seq * vocab).map(|_| s.unit()).collect();
        Ok(Tensor::from_vec(data, (self.rows, self.seq, vocab), &Device::Cpu)?)
    }
}

/// What one rank computed on its rows.
pub struct RankRun {
    pub logits: Tensor,
    /// layer → (global token slot, expert) pairs, sorted
    pub routes: HashMap<usize, Vec<(u32, u32)>>,
    pub grads: HashMap<String, Tensor>,
    pub replay_diff: f64,
    /// layer → routing health of the global batch (reduced over the ranks)
    pub health: HashMap<usize, LayerHealth>,
    /// the global gradient norm the optimizer step clipped against
    pub grad_norm: f64,
    /// every parameter after one AdamW step
    pub updated: HashMap<String, Tensor>,
    /// the routes the forward applied
    pub recording: Recording,
}

/// Forward (recorded), loss, backward and gradient all-reduce on rows `first_row..` of the
/// global batch; with `comm`, the experts are sharded over its ranks first.
pub fn run_rank(case: &CheckCase, m: MoeCausalLm, comm: Option<Arc<dyn Collective>>, rows: &[Vec<u32>], first_row: usize) -> Result<RankRun> {
    run_rank_routed(case, m, comm, rows, first_row, &RoutingPlan::record())
}

/// `run_rank` under a routing plan (the f32 reference of a bf16 check replays the bf16 route).
fn run_rank_routed(case: &CheckCase, mut m: MoeCausalLm, comm: Option<Arc<dyn Collective>>, rows: &[Vec<u32>], first_row: usize, plan: &RoutingPlan)
    -> Result<RankRun> {
    let dev = m.device().clone();
    let t = case.seq;
    if let Some(c) = &comm {
        shard_experts(&mut m, c.clone())?;
    }
    let mut params: Vec<(String, Var)> = Vec::new();
    m.map_params(|name, p| {
        let v = Var::from_tensor(p)?;
        params.push((name.to_string(), v.clone()));
        Ok(v.as_tensor().clone())
    })?;
    let batch = Batch::padded(rows, &vec![vec![1u8; t]; rows.len()], &dev)?;
    let out = m.forward(&batch, plan)?;
    let v = out.logits.dim(2)?;
    let r = case.cotangent(v)?.narrow(0, first_row, rows.len())?.to_device(&dev)?;
    let loss = (out.logits.to_dtype(DType::F32)? * r)?.sum_all()?;
    let grads = loss.backward()?;
    // replay before the update changes the weights
    let replay = m.forward(&batch, &RoutingPlan::replay(&out.routes, true)?)?;
    let replay_diff = lockstep_model::parity::max_abs_diff(&replay.logits, &out.logits)?;
    // one AdamW step, clipping active (the norm must then be the global one on every rank)
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-3, max_grad_norm: Some(1e-3), ..AdamWConfig::default() }).map_err(train_err)?;
    let (stats, acc) = match &comm {
        Some(c) => crate::dp::step(c.as_ref(), &mut opt, &params, grads)?,
        None => {
            let mut acc = GradAccumulator::default();
            acc.add(&params, &grads).map_err(train_err)?;
            (opt.apply(&params, &acc).map_err(train_err)?, acc)
        }
    };
    let grads = params.iter().filter_map(|(n, _)| acc.get(n).map(|g| (n.clone(), g.clone()))).collect();
    let updated = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    let mut routes = HashMap::new();
    let mut health = HashMap::new();
    let score = m.cfg.moe.router.score_function;
    for (&l, route) in out.routes.iter() {
        let (tok, exp) = route.pairs()?;
        let off = (first_row * t) as u32;
        let mut p: Vec<(u32, u32)> = tok.iter().zip(&exp).map(|(&t, &e)| (t + off, e)).collect();
        p.sort_unstable();
        routes.insert(l, p);
        let local = layer_health(route, &vec![true; rows.len() * t], score)?;
        let h = match &comm {
            Some(c) => crate::metrics::reduce_health(c.as_ref(), &local)?.health,
            None => local,
        };
        health.insert(l, h);
    }
    Ok(RankRun { logits: out.logits.detach(), routes, grads, replay_diff, health, grad_norm: stats.grad_norm, updated, recording: out.routes })
}

/// max |a − b| / max |b|, in f32 on the CPU.
pub fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let f = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let (a, b) = (f(a)?, f(b)?);
    let d = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(d / s.max(1e-30))
}

/// One rank's comparison with the single-rank reference.
#[derive(Debug, Clone)]
pub struct RankReport {
    pub rank: usize,
    pub world: usize,
    pub logits_rel: f64,
    /// the worst gradient: (parameter, relative error)
    pub worst_grad: (String, f64),
    pub grads_compared: usize,
    /// MoE layers whose routes differ from the reference's
    pub route_mismatch_layers: Vec<usize>,
    pub replay_diff: f64,
    pub reference_replay_diff: f64,
    /// health fields that differ: "layer 1 max_vio", ...
    pub health_mismatches: Vec<String>,
    /// replicated parameters whose gradient differs bitwise between ranks
    pub replicated_differ: Vec<String>,
    /// global gradient norm: this rank's and the single rank's
    pub grad_norm: (f64, f64),
    /// the worst parameter after one AdamW step: (parameter, error relative to its max |value|)
    pub worst_update: (String, f64),
    /// replicated parameters that differ bitwise between ranks after the step
    pub updated_differ: Vec<String>,
    /// problems that are not numbers (a missing gradient, ...)
    pub missing: Vec<String>,
    /// below f32: the errors against an f32 reference
    pub against_f32: Option<AgainstF32>,
}

/// Below f32 the W-rank result is held to one rank's own rounding error rather than to a fixed
/// tolerance: both are compared with an f32 run of the same weights (rounded to the check's
/// dtype) on the single rank's route, and the W-rank error may be at most twice the one-rank
/// error plus 1e-3 (two runs of different summation orders each carry their own rounding; a
/// lost or doubled contribution is far larger).
#[derive(Debug, Clone)]
pub struct AgainstF32 {
    /// logits: (W ranks, one rank) relative to the f32 reference
    pub logits: (f64, f64),
    /// the gradient closest to (or past) its bound: (parameter, W ranks, one rank)
    pub worst_grad: (String, f64, f64),
}

impl AgainstF32 {
    /// how far `w_ranks` is past its bound (negative: within it)
    pub fn excess(w_ranks: f64, one_rank: f64) -> f64 {
        w_ranks - (2.0 * one_rank + 1e-3)
    }
}

/// Tolerances of the check against the single rank: f32 (1e-5 logits, 1e-4 gradients), and
/// below f32 3e-2 — used for the parameters after the step (logits and gradients are held to
/// `AgainstF32` there).
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 | DType::F64 => (1e-5, 1e-4),
        _ => (3e-2, 3e-2),
    }
}

impl RankReport {
    pub fn failures(&self, dtype: DType) -> Vec<String> {
        let (tl, tg) = tolerance(dtype);
        let mut f = self.missing.clone();
        match &self.against_f32 {
            Some(a) => {
                if AgainstF32::excess(a.logits.0, a.logits.1) > 0.0 {
                    f.push(format!("logits vs f32 {:.3e}, more than 2 × one rank's {:.3e} + 1e-3", a.logits.0, a.logits.1));
                }
                let (name, e_run, e_one) = &a.worst_grad;
                if AgainstF32::excess(*e_run, *e_one) > 0.0 {
                    f.push(format!("gradient of {name} vs f32 {e_run:.3e}, more than 2 × one rank's {e_one:.3e} + 1e-3"));
                }
            }
            None => {
                if self.logits_rel > tl {
                    f.push(format!("logits rel {:.3e} > {tl:.0e}", self.logits_rel));
                }
                if self.worst_grad.1 > tg {
                    f.push(format!("gradient of {} rel {:.3e} > {tg:.0e}", self.worst_grad.0, self.worst_grad.1));
                }
            }
        }
        if !self.route_mismatch_layers.is_empty() {
            f.push(format!("routes differ in layers {:?}", self.route_mismatch_layers));
        }
        if self.replay_diff != 0.0 || self.reference_replay_diff != 0.0 {
            f.push(format!("record → replay not bitwise ({:e} sharded, {:e} single)", self.replay_diff, self.reference_replay_diff));
        }
        f.extend(self.health_mismatches.iter().map(|h| format!("routing health differs: {h}")));
        f.extend(self.replicated_differ.iter().map(|n| format!("gradient of {n} differs across ranks")));
        let norm_rel = (self.grad_norm.0 - self.grad_norm.1).abs() / self.grad_norm.1.max(1e-30);
        if norm_rel > tg {
            f.push(format!("global gradient norm {} vs {} on one rank", self.grad_norm.0, self.grad_norm.1));
        }
        if self.worst_update.1 > tg {
            f.push(format!("{} after the AdamW step: rel {:.3e} > {tg:.0e}", self.worst_update.0, self.worst_update.1));
        }
        f.extend(self.updated_differ.iter().map(|n| format!("{n} differs across ranks after the AdamW step")));
        f
    }

    pub fn summary(&self) -> String {
        let f32_part = match &self.against_f32 {
            Some(a) => format!(
                "; against f32: logits {:.2e} (1 rank {:.2e}), closest gradient to its bound {} {:.2e} (1 rank {:.2e})",
                a.logits.0, a.logits.1, a.worst_grad.0, a.worst_grad.1, a.worst_grad.2
            ),
            None => String::new(),
        };
        let s = format!(
            "rank {}/{}: logits rel {:.2e}, worst of {} gradients {:.2e} ({}), routes {}, replay {}, health {}, replicated grads {}; AdamW step: grad norm {:.6e} (1 rank {:.6e}), worst param {:.2e}, replicated params {}",
            self.rank,
            self.world,
            self.logits_rel,
            self.grads_compared,
            self.worst_grad.1,
            self.worst_grad.0,
            if self.route_mismatch_layers.is_empty() { "identical" } else { "DIFFER" },
            if self.replay_diff == 0.0 { "bitwise" } else { "NOT bitwise" },
            if self.health_mismatches.is_empty() { "equal" } else { "DIFFERS" },
            if self.replicated_differ.is_empty() { "identical on all ranks" } else { "DIFFER across ranks" },
            self.grad_norm.0,
            self.grad_norm.1,
            self.worst_update.1,
            if self.updated_differ.is_empty() { "identical on all ranks" } else { "DIFFER across ranks" },
        );
        s + &f32_part
    }
}

/// FNV-1a of a tensor's bytes as f32 (exact in an f64: 32 bits).
fn hash(t: &Tensor) -> Result<f64> {
    let v = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut h: u32 = 0x811C_9DC5;
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ b as u32).wrapping_mul(0x0100_0193);
        }
    }
    Ok(h as f64)
}

/// The whole check on one rank of `comm` (every rank calls it): reference, shard, compare.
pub fn check_rank(case: &CheckCase, comm: Arc<dyn Collective>, dev: &Device) -> Result<RankReport> {
    let (w, r) = (comm.world_size(), comm.rank());
    if case.rows % w != 0 {
        return Err(lockstep_model::ModelError::config("<check>", "rows", format!("{} rows do not split over {w} ranks", case.rows)));
    }
    let probe = case.model(dev)?;
    let rows = case.global_rows(probe.cfg.vocab_size);
    let single = run_rank(case, probe, None, &rows, 0)?;
    let per = case.rows / w;
    let run = run_rank(case, case.model(dev)?, Some(comm.clone()), &rows[r * per..(r + 1) * per], r * per)?;
    // below f32, the yardstick is one rank's own error: an f32 run of the same (rounded)
    // weights on the single rank's route
    let reference = if case.dtype == DType::F32 {
        None
    } else {
        let f32_case = CheckCase { dtype: DType::F32, ..case.clone() };
        let mut m = f32_case.model(dev)?;
        m.map_params(|_, p| p.to_dtype(case.dtype)?.to_dtype(DType::F32))?;
        Some(run_rank_routed(&f32_case, m, None, &rows, 0, &RoutingPlan::replay(&single.recording, true)?)?)
    };
    compare(case, &single, &run, reference.as_ref(), comm.as_ref())
}

fn compare(case: &CheckCase, single: &RankRun, run: &RankRun, reference: Option<&RankRun>, comm: &dyn Collective) -> Result<RankReport> {
    let (w, r) = (comm.world_size(), comm.rank());
    let per = case.rows / w;
    let t = case.seq;
    let mut rep = RankReport {
        rank: r,
        world: w,
        logits_rel: rel(&run.logits, &single.logits.narrow(0, r * per, per)?)?,
        worst_grad: (String::new(), 0.0),
        grads_compared: 0,
        route_mismatch_layers: Vec::new(),
        replay_diff: run.replay_diff,
        reference_replay_diff: single.replay_diff,
        health_mismatches: Vec::new(),
        replicated_differ: Vec::new(),
        grad_norm: (run.grad_norm, single.grad_norm),
        worst_update: (String::new(), 0.0),
        updated_differ: Vec::new(),
        missing: Vec::new(),
        against_f32: None,
    };
    if let Some(f) = reference {
        let logits = f.logits.narrow(0, r * per, per)?;
        rep.against_f32 = Some(AgainstF32 {
            logits: (rel(&run.logits, &logits)?, rel(&single.logits.narrow(0, r * per, per)?, &logits)?),
            worst_grad: (String::new(), 0.0, 0.0),
        });
    }
    let mut layers: Vec<usize> = single.routes.keys().copied().collect();
    layers.sort_unstable();
    for l in &layers {
        let want: Vec<(u32, u32)> = single.routes[l].iter().copied().filter(|&(tok, _)| tok as usize / t / per == r).collect();
        if run.routes.get(l) != Some(&want) {
            rep.route_mismatch_layers.push(*l);
        }
        let (h, want) = match (run.health.get(l), single.health.get(l)) {
            (Some(h), Some(want)) => (h, want),
            _ => {
                rep.missing.push(format!("no routing health for layer {l}"));
                continue;
            }
        };
        if (h.tokens, &h.load) != (want.tokens, &want.load) {
            rep.health_mismatches.push(format!("layer {l} tokens per expert"));
        }
        if h.max_vio != want.max_vio {
            rep.health_mismatches.push(format!("layer {l} max_vio {} vs {}", h.max_vio, want.max_vio));
        }
        if (h.confidence - want.confidence).abs() > 1e-6 {
            rep.health_mismatches.push(format!("layer {l} confidence {} vs {}", h.confidence, want.confidence));
        }
        if (h.mean_experts_per_token - want.mean_experts_per_token).abs() > 1e-12 {
            rep.health_mismatches.push(format!("layer {l} experts per token"));
        }
    }
    let mut names: Vec<&String> = single.grads.keys().collect();
    names.sort();
    let mut hashes = Vec::new();
    for name in &names {
        let g_single = &single.grads[*name];
        let Some(got) = run.grads.get(*name) else {
            rep.missing.push(format!("no gradient for {name}"));
            continue;
        };
        let want = if is_expert_param(name) {
            let l = g_single.dim(0)? / w;
            g_single.narrow(0, r * l, l)?
        } else {
            hashes.push(hash(got)?);
            g_single.clone()
        };
        let e = rel(got, &want)?;
        rep.grads_compared += 1;
        if e >= rep.worst_grad.1 {
            rep.worst_grad = ((*name).clone(), e);
        }
        if let (Some(a), Some(g_f32)) = (rep.against_f32.as_mut(), reference.and_then(|f| f.grads.get(*name))) {
            let g_f32 = if is_expert_param(name) { g_f32.narrow(0, r * (g_f32.dim(0)? / w), g_f32.dim(0)? / w)? } else { g_f32.clone() };
            let (e_run, e_one) = (rel(got, &g_f32)?, rel(&want, &g_f32)?);
            if a.worst_grad.0.is_empty() || AgainstF32::excess(e_run, e_one) > AgainstF32::excess(a.worst_grad.1, a.worst_grad.2) {
                a.worst_grad = ((*name).clone(), e_run, e_one);
            }
        }
    }
    // replicated gradients: bitwise the same on every rank after the all-reduce
    let all = comm.all_gather_host(&hashes)?;
    let replicated: Vec<&&String> = names.iter().filter(|n| !is_expert_param(n) && run.grads.contains_key(**n)).collect();
    for (i, name) in replicated.iter().enumerate() {
        if all.iter().any(|h| h.get(i) != Some(&hashes[i])) {
            rep.replicated_differ.push((**name).clone());
        }
    }
    // after the optimizer step: every parameter against one rank's, replicated ones bitwise
    // identical across the ranks
    let mut names: Vec<&String> = single.updated.keys().collect();
    names.sort();
    let mut hashes = Vec::new();
    let mut replicated = Vec::new();
    for name in names {
        let Some(got) = run.updated.get(name) else {
            rep.missing.push(format!("no parameter {name} after the step"));
            continue;
        };
        let p_single = &single.updated[name];
        let want = if is_expert_param(name) {
            let l = p_single.dim(0)? / w;
            p_single.narrow(0, r * l, l)?
        } else {
            hashes.push(hash(got)?);
            replicated.push(name.clone());
            p_single.clone()
        };
        let e = rel(got, &want)?;
        if e >= rep.worst_update.1 {
            rep.worst_update = (name.clone(), e);
        }
    }
    let all = comm.all_gather_host(&hashes)?;
    for (i, name) in replicated.into_iter().enumerate() {
        if all.iter().any(|h| h.get(i) != Some(&hashes[i])) {
            rep.updated_differ.push(name);
        }
    }
    Ok(rep)
}
