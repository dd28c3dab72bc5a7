//! AdamW with decoupled weight decay, global grad-norm clipping and a warmup + constant / cosine
//! learning-rate schedule, f32. Its state (step, first and second moments) is plain tensors so a
//! checkpoint can save it and a resumed run continues bit for bit.
//!
//! Mixed precision: a parameter held in bf16 has an f32 master copy here (`master`); the update
//! is computed in f32 on the master and the bf16 parameter is written as its rounding. Gradients
//! are accumulated in f32 whatever the parameter's dtype.
//!
//! At step t (1-based), for each parameter θ with gradient g (after clipping):
//!
//! ```text
//! g ← g · min(1, max_norm / (‖g_all‖₂ + 1e-6))
//! m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²
//! θ ← θ − lr_t · (wd · θ + (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε))
//! ```
//!
//! lr_t = lr · t / warmup for t ≤ warmup; then lr (constant) or
//! lr · (min_ratio + (1 − min_ratio) · ½ (1 + cos(π · p))), p = (t − warmup) / (total − warmup).

use std::collections::{HashMap, HashSet};

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use lockstep_model::accumulate::add_into;
use lockstep_model::adamw::AdamWScalars;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Cosine { total_steps: u64, min_lr_ratio: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global grad-norm clip; none when absent.
    pub max_grad_norm: Option<f64>,
    pub warmup_steps: u64,
    pub schedule: Schedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            schedule: Schedule::Constant,
        }
    }
}

impl AdamWConfig {
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine { total_steps, min_lr_ratio } => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let p = ((step.saturating_sub(self.warmup_steps)) as f64 / span).min(1.0);
                self.lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: &str| Err(TrainError::input(&format!("optimizer.{f}"), m));
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be > 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must be in [0, 1)");
        }
        if self.eps <= 0.0 {
            return bad("eps", "must be > 0");
        }
        if self.weight_decay < 0.0 {
            return bad("weight_decay", "must be >= 0");
        }
        if self.max_grad_norm.is_some_and(|c| c <= 0.0) {
            return bad("max_grad_norm", "must be > 0");
        }
        if let Schedule::Cosine { min_lr_ratio, .. } = self.schedule {
            if !(0.0..=1.0).contains(&min_lr_ratio) {
                return bad("schedule.min_lr_ratio", "must be in [0, 1]");
            }
        }
        Ok(())
    }
}

/// Gradients summed over micro-batches, per parameter, in f32: the first micro-batch's
/// gradient is copied into a fresh f32 tensor, later ones are added into it in place
/// ([`lockstep_model::accumulate::add_into`]: the bits of `acc + g.to_dtype(F32)`, without the
/// conversion kernel and the new tensor per parameter per micro-batch).
#[derive(Default)]
pub struct GradAccumulator {
    grads: HashMap<String, Tensor>,
    /// the names whose sum is a tensor made here (so summed into in place); a gradient put in
    /// by [`GradAccumulator::set`] may be held elsewhere too, so the next `add` sums it into a
    /// fresh tensor instead
    owned: HashSet<String>,
}

impl GradAccumulator {
    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (name, v) in params {
            let Some(g) = store.get(v.as_tensor()) else { continue };
            // detached: a gradient must not keep the step's autograd graph alive; summed in f32
            let g = g.detach();
            match self.grads.get(name) {
                Some(acc) if self.owned.contains(name) => {
                    // f32 and bf16 are added as they are (widened exactly in the op)
                    let g = if matches!(g.dtype(), DType::F32 | DType::BF16) { g } else { g.to_dtype(DType::F32)? };
                    add_into(acc, &g)?;
                }
                Some(acc) => {
                    let sum = (acc + g.to_dtype(DType::F32)?)?;
                    self.grads.insert(name.clone(), sum);
                    self.owned.insert(name.clone());
                }
                None => {
                    // a fresh contiguous f32 copy: for an f32 gradient `to_dtype` would share the
                    // gradient store's tensor, which the in-place sums must never write into
                    let first = if g.dtype() == DType::F32 { g.force_contiguous()? } else { g.to_dtype(DType::F32)? };
                    self.grads.insert(name.clone(), first);
                    self.owned.insert(name.clone());
                }
            }
        }
        Ok(())
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }
    /// Replace a parameter's gradient (the data-parallel all-reduce writes the sum back).
    pub fn set(&mut self, name: &str, grad: Tensor) {
        self.owned.remove(name);
        self.grads.insert(name.to_string(), grad);
    }
    /// Take a parameter's gradient out (the sharded optimizer keeps only its reduced slice).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.owned.remove(name);
        self.grads.remove(name)
    }
}

/// Σ g² over the named parameters' gradients (f64).
pub fn grad_sq_sum<'a>(names: impl IntoIterator<Item = &'a str>, grads: &GradAccumulator) -> Result<f64> {
    let mut sq = 0f64;
    for name in names {
        if let Some(g) = grads.get(name) {
            sq += sq_sum(g)?;
        }
    }
    Ok(sq)
}

/// Rows of the two-stage sum of squares on a GPU.
const SQ_ROW: usize = 4096;

/// Σ x² of one tensor. CPU: in f64 element by element. CUDA: candle reduces a whole tensor with
/// one thread block (≈ 0.2 s for an expert-weight gradient of 4·10⁸ elements), so the squares
/// are summed in f32 over rows of 4096 first (many blocks), then the row sums in f64.
pub(crate) fn sq_sum(g: &Tensor) -> Result<f64> {
    let n = g.elem_count();
    if g.device().is_cpu() || n < 2 * SQ_ROW {
        return Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?);
    }
    let flat = g.to_dtype(DType::F32)?.flatten_all()?;
    let whole = n / SQ_ROW * SQ_ROW;
    let rows = flat.narrow(0, 0, whole)?.reshape((whole / SQ_ROW, SQ_ROW))?.sqr()?.sum(1)?;
    let mut total = rows.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if whole < n {
        total += flat.narrow(0, whole, n - whole)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total)
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// steps taken
    pub step: u64,
    /// first / second moments per parameter name
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
    /// f32 master weights of the parameters held in a lower precision (bf16)
    pub master: HashMap<String, Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, step: 0, m: HashMap::new(), v: HashMap::new(), master: HashMap::new() })
    }

    /// One update of every parameter that has a gradient.
    pub fn apply(&mut self, params: &[(String, Var)], grads: &GradAccumulator) -> Result<StepStats> {
        let sq = grad_sq_sum(params.iter().map(|(n, _)| n.as_str()), grads)?;
        self.apply_with_grad_norm(params, grads, sq.sqrt())
    }

    /// One update, clipping against a given global gradient norm: under expert parallelism
    /// each rank holds only its experts' gradients, so the norm is reduced over the ranks
    /// (`lockstep_dist::dp::global_grad_norm`) and every rank clips by the same factor.
    pub fn apply_with_grad_norm(&mut self, params: &[(String, Var)], grads: &GradAccumulator, grad_norm: f64) -> Result<StepStats> {
        let h = self.begin_step(grad_norm);
        for (name, var) in params {
            if let Some(g) = grads.get(name) {
                self.update_param(name, var, g, &h)?;
            }
        }
        Ok(StepStats { grad_norm, lr: h.lr })
    }

    /// Start step t + 1 against the global gradient norm: the step counter advances and the
    /// step's clip factor, learning rate and bias corrections are fixed for every parameter.
    pub fn begin_step(&mut self, grad_norm: f64) -> StepHyper {
        let scale = match self.cfg.max_grad_norm {
            Some(c) => (c / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        StepHyper { scale, lr: self.cfg.lr_at(self.step), beta1: b1, beta2: b2, c1: 1.0 - b1.powi(t), c2: 1.0 - b2.powi(t), eps: self.cfg.eps, weight_decay: self.cfg.weight_decay }
    }

    /// The update of one (whole or expert-shard) parameter with gradient `g` (f32), by the
    /// fused in-place ops ([`StepHyper::apply`]): the f32 master where the parameter is bf16,
    /// else the f32 parameter itself, updated in place; a bf16 parameter is then overwritten
    /// with its master rounded. No autograd graph is recorded through the Var.
    pub fn update_param(&mut self, name: &str, var: &Var, g: &Tensor, h: &StepHyper) -> Result<()> {
        let p = var.as_tensor();
        // a bf16 parameter without a master copy is updated in f32 and rounded back
        let (theta, in_place) = match self.master.get(name) {
            Some(w) => (w.clone(), false),
            None if p.dtype() == DType::F32 && p.is_contiguous() => (p.clone(), true),
            None => (p.detach().to_dtype(DType::F32)?.copy()?, false),
        };
        let (m, v) = h.apply(&theta, g, self.m.remove(name), self.v.remove(name))?;
        if !in_place {
            if p.is_contiguous() {
                lockstep_model::adamw::cast_into(p, &theta)?;
            } else {
                var.set(&theta.to_dtype(p.dtype())?)?;
            }
        }
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        Ok(())
    }
}

/// What one AdamW step applies to every parameter ([`AdamW::begin_step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepHyper {
    /// the clip factor min(1, max_norm / (‖g‖ + 1e-6))
    pub scale: f64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// bias corrections 1 − β₁ᵗ, 1 − β₂ᵗ
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl StepHyper {
    /// The step's f32 scalars, rounded as candle's scalar ops round them.
    pub fn scalars(&self) -> AdamWScalars {
        AdamWScalars::new(self.scale, self.beta1, self.beta2, self.c1, self.c2, self.eps, self.weight_decay, self.lr)
    }

    /// The update of f32 weights `theta` **in place** with the (unclipped) f32 gradient `g` and
    /// the previous moments (none before the first update), which are updated in place too (or
    /// made): returns the new (m, v). Four fused element-wise ops (`lockstep_model::adamw`)
    /// with exactly the bits of [`StepHyper::update`]; a non-contiguous m or v is copied first.
    /// `theta` must be a tensor the caller owns (a master copy, or the parameter itself).
    pub fn apply(&self, theta: &Tensor, g: &Tensor, m: Option<Tensor>, v: Option<Tensor>) -> Result<(Tensor, Tensor)> {
        use lockstep_model::adamw::{moment1_into, moment2_into, theta_into};
        let s = self.scalars();
        let g = g.to_dtype(DType::F32)?.contiguous()?.reshape(theta.shape())?;
        let owned = |t: Option<Tensor>| -> Result<(Tensor, bool)> {
            Ok(match t {
                Some(t) if t.is_contiguous() => (t.reshape(theta.shape())?, false),
                Some(t) => (t.copy()?.reshape(theta.shape())?, false),
                None => (Tensor::zeros(theta.shape(), DType::F32, theta.device())?, true),
            })
        };
        let ((m, m_first), (v, v_first)) = (owned(m)?, owned(v)?);
        moment1_into(&m, &g, &s, m_first)?;
        moment2_into(&v, &g, &s, v_first)?;
        theta_into(theta, &m, &v, &s)?;
        Ok((m, v))
    }

    /// The reference: the element-wise AdamW update ([module doc](self)) composed of candle
    /// ops, which [`StepHyper::apply`] reproduces bit for bit. Of f32 weights `theta` with the
    /// (unclipped) gradient `g` and the previous moments (none before the first update):
    /// (next weights, m, v), all f32 and of `theta`'s shape. Element-wise only, so a flat
    /// slice of a parameter updates bit for bit as the same elements of the whole one.
    pub fn update(&self, theta: &Tensor, g: &Tensor, m: Option<&Tensor>, v: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
        let (b1, b2) = (self.beta1, self.beta2);
        let g = if self.scale < 1.0 { (g * self.scale)? } else { g.clone() };
        let m = match m {
            Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
            None => (&g * (1.0 - b1))?,
        };
        let v = match v {
            Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
            None => (g.sqr()? * (1.0 - b2))?,
        };
        let update = ((&m / self.c1)? / ((&v / self.c2)?.sqrt()? + self.eps)?)?;
        let update = (update + (theta * self.weight_decay)?)?;
        let next = (theta - (update * self.lr)?)?;
        Ok((next, m, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// The fused in-place update ([`StepHyper::apply`]) gives exactly the bits of the composed
    /// candle ops ([`StepHyper::update`]) over several steps: first step (no moments), clipped
    /// and unclipped gradients, with and without weight decay, zeros and signed zeros included;
    /// and `AdamW::update_param` writes a bf16 parameter as its master rounded.
    #[test]
    fn fused_update_has_the_bits_of_the_composed_ops() {
        let dev = Device::Cpu;
        let n = 70_001; // more than one rayon chunk, a ragged end
        let vals = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| {
                    let x = (i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(97)) % 20_011) as f32 / 20_011.0 - 0.5;
                    match i % 97 {
                        0 => 0.0,
                        1 => -0.0,
                        2 => x * 1e-30,
                        _ => x * 3.0,
                    }
                })
                .collect()
        };
        for (scale, wd) in [(1.0, 0.0), (0.37, 0.01), (1.0, 0.1), (0.02, 0.0)] {
            let theta0 = Tensor::from_vec(vals(1), n, &dev).unwrap();
            let (mut t_ref, mut m_ref, mut v_ref) = (theta0.clone(), None::<Tensor>, None::<Tensor>);
            let t_fused = theta0.copy().unwrap();
            let (mut m_f, mut v_f) = (None, None);
            for step in 1..=3 {
                let g = Tensor::from_vec(vals(10 + step as u32), n, &dev).unwrap();
                let (b1, b2) = (0.9f64, 0.95f64);
                let h = StepHyper { scale, lr: 1e-3 * step as f64, beta1: b1, beta2: b2, c1: 1.0 - b1.powi(step), c2: 1.0 - b2.powi(step), eps: 1e-8, weight_decay: wd };
                let (t2, m2, v2) = h.update(&t_ref, &g, m_ref.as_ref(), v_ref.as_ref()).unwrap();
                (t_ref, m_ref, v_ref) = (t2, Some(m2), Some(v2));
                let (m2, v2) = h.apply(&t_fused, &g, m_f.take(), v_f.take()).unwrap();
                (m_f, v_f) = (Some(m2), Some(v2));
                assert_eq!(bits(&t_fused), bits(&t_ref), "scale {scale} wd {wd} step {step}: theta");
                assert_eq!(bits(m_f.as_ref().unwrap()), bits(m_ref.as_ref().unwrap()), "step {step}: m");
                assert_eq!(bits(v_f.as_ref().unwrap()), bits(v_ref.as_ref().unwrap()), "step {step}: v");
            }
        }
        // a bf16 parameter with an f32 master: the parameter is the master rounded
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let w32 = Tensor::from_vec(vals(3), n, &dev).unwrap();
        let var = Var::from_tensor(&w32.to_dtype(DType::BF16).unwrap()).unwrap();
        opt.master.insert("w".into(), w32.copy().unwrap());
        let h = opt.begin_step(1.0);
        let g = Tensor::from_vec(vals(4), n, &dev).unwrap();
        let (want, _, _) = h.update(&w32, &g, None, None).unwrap();
        opt.update_param("w", &var, &g, &h).unwrap();
        assert_eq!(bits(&opt.master["w"]), bits(&want));
        assert_eq!(bits(&var.as_tensor().to_dtype(DType::F32).unwrap()), bits(&want.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()));
    }

    /// Micro-batches summed in place give the bits of the out-of-place chain, and never write
    /// into the gradient store's tensors (an f32 gradient is copied, not shared) nor into a
    /// tensor put in by `set`.
    #[test]
    fn accumulation_in_place_sums_as_before_and_writes_only_its_own_tensors() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.25, 3.0], [2.0, 0.1, -0.7]], &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let params = vec![("w".to_string(), w.clone())];
            let mut acc = GradAccumulator::default();
            let mut want: Option<Tensor> = None;
            let mut stores = Vec::new();
            for k in 0..3 {
                let x = Tensor::new(&[[1.0f32 + k as f32, 0.3], [-0.2, 0.7 * k as f32]], &dev).unwrap().to_dtype(dtype).unwrap();
                let loss = x.matmul(w.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
                let store = loss.backward().unwrap();
                let g = store.get(w.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                want = Some(match want {
                    Some(s) => (s + &g).unwrap(),
                    None => g.copy().unwrap(),
                });
                acc.add(&params, &store).unwrap();
                stores.push((store, bits(&g)));
            }
            assert_eq!(bits(acc.get("w").unwrap()), bits(want.as_ref().unwrap()), "{dtype:?}");
            for (store, g) in &stores {
                assert_eq!(&bits(&store.get(w.as_tensor()).unwrap().to_dtype(DType::F32).unwrap()), g, "{dtype:?}: a stored gradient was written");
            }
            // a tensor put in by `set` is summed into a fresh one, not in place
            let put = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
            acc.set("w", put.clone());
            acc.add(&params, &stores[0].0).unwrap();
            assert_eq!(bits(&put), vec![0; 6]);
            assert_eq!(bits(acc.get("w").unwrap()), stores[0].1);
        }
    }
}
