//! The LM head's log-probability / entropy surrogate as one fused op, for the trainer's staged
//! backward: per row of logits z, at temperature T (x = z / T, p = softmax(x)),
//!
//! ```text
//! lp = x_t − lse                      lse = log Σ_j exp x_j
//! h  = lse − Σ_j p_j x_j              (the entropy −Σ_j p_j log p_j)
//! value = g_lp · lp + g_h · h
//! ∂value/∂z_j = [g_lp · (1[j = t] − p_j) − g_h · p_j · (log p_j + h)] / T
//! ```
//!
//! The backward of `at_temperature → log_softmax → gather / entropy` as candle autograd builds
//! it holds several f32 [C, V] tensors per chunk; this op keeps only the logits (in their own
//! dtype) and writes the gradient in one pass over them. Everything is f32 arithmetic whatever
//! the logits' dtype (f32 or bf16): per row the max m, S = Σ exp(x − m) and W = Σ exp(x − m)·(x −
//! m), so lse = m + ln S and h = ln S − W / S. A −∞ logit has p = 0 and contributes nothing (no
//! 0 · ∞). T ≤ 0 or T = 1 means T = 1, and x = z · (1 / T), as in
//! [`crate::logprobs::at_temperature`]. The values are those of the candle chain to rounding,
//! not bitwise.
//!
//! [`token_stats`] is the forward of the same statistics (lp, h, lse) without a gradient: the
//! one place the engine's recorded log-probabilities and the trainer's scores are computed.
//!
//! On the CPU rows run in parallel (rayon); on CUDA one block per row (`gpu/head.cu`).
//!
//! Legend: C rows (positions of a head chunk), V vocabulary.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// [C] f32 per-row surrogate values `g_lp · lp + g_h · h` of the logits [C, V] (f32 or bf16) at
/// `temperature`, with the logits' graph: the backward gives ∂/∂logits in the logits' dtype
/// ([module doc](self)). `target_C` are the rows' target ids (each below V, checked here on the
/// host: no copy back from the device), `g_lp_C` and `g_h_C` [C] f32 on the logits' device;
/// without `g_h_C` the entropy term is left out (neither computed nor differentiated).
pub fn logprob_entropy_surrogate(logits_CV: &Tensor, target_C: &[u32], g_lp_C: &Tensor, g_h_C: Option<&Tensor>, temperature: f64) -> Result<Tensor> {
    const OP: &str = "logprob_entropy_surrogate";
    let (c, v) = match logits_CV.dims() {
        &[c, v] => (c, v),
        d => candle_core::bail!("{OP}: logits_CV must be [C, V], got {d:?}"),
    };
    if !matches!(logits_CV.dtype(), DType::F32 | DType::BF16) {
        candle_core::bail!("{OP}: logits_CV dtype {:?} (f32 or bf16)", logits_CV.dtype());
    }
    if v == 0 {
        candle_core::bail!("{OP}: logits_CV [{c}, 0]: an empty vocabulary has no distribution");
    }
    if target_C.len() != c {
        candle_core::bail!("{OP}: target_C holds {} ids for {c} rows of logits", target_C.len());
    }
    if let Some((row, &t)) = target_C.iter().enumerate().find(|(_, &t)| t as usize >= v) {
        candle_core::bail!("{OP}: target_C[{row}] = {t} is not below the vocabulary size {v}");
    }
    if !temperature.is_finite() {
        candle_core::bail!("{OP}: temperature {temperature} (must be finite)");
    }
    let dev = logits_CV.device();
    let per_row = |t: &Tensor, what: &str| -> Result<Tensor> {
        if t.dims() != [c] || t.dtype() != DType::F32 {
            candle_core::bail!("{OP}: {what} must be [{c}] f32 (one per row of logits), got {:?} {:?}", t.dims(), t.dtype());
        }
        if !t.device().same_device(dev) {
            candle_core::bail!("{OP}: {what} is on {:?}, the logits on {:?}", t.device(), dev);
        }
        t.detach().contiguous()
    };
    let g_lp = per_row(g_lp_C, "g_lp_C")?;
    let g_h = g_h_C.map(|g| per_row(g, "g_h_C")).transpose()?;
    let inv_t = if temperature == 1.0 || temperature <= 0.0 { 1.0 } else { (1.0 / temperature) as f32 };
    let terms = RowTerms { target: Tensor::from_slice(target_C, c, dev)?, g_lp, g_h, inv_t };
    logits_CV.contiguous()?.apply_op1(Surrogate(terms))
}

/// The forward at temperature T of logits [C, V] (f32 or bf16) for targets [C] u32 (on the
/// logits' device): per row [C, 3] f32 (lp, h, lse) — the target's log-probability x_t − lse,
/// the entropy and the log-sum-exp, with x = z · (1 / T) (T ≤ 0 or 1: x = z). One op, the same
/// arithmetic for a row whatever the rows around it (one block per row on CUDA), so what the
/// engine records as a token's log-probability and what the trainer scores are the same bits;
/// no gradient. A target id ≥ V gives NaN for that row's lp (the engine's tokens are below V by
/// construction, the trainer checks its targets).
pub fn token_stats(logits_CV: &Tensor, target_C: &Tensor, temperature: f64) -> Result<Tensor> {
    const OP: &str = "token_stats";
    let (c, v) = match logits_CV.dims() {
        &[c, v] => (c, v),
        d => candle_core::bail!("{OP}: logits_CV must be [C, V], got {d:?}"),
    };
    if v == 0 || !matches!(logits_CV.dtype(), DType::F32 | DType::BF16) {
        candle_core::bail!("{OP}: logits_CV [{c}, {v}] {:?} (V >= 1, f32 or bf16)", logits_CV.dtype());
    }
    if target_C.dims() != [c] || target_C.dtype() != DType::U32 || !target_C.device().same_device(logits_CV.device()) {
        candle_core::bail!("{OP}: target_C must be [{c}] u32 on the logits' device, got {:?} {:?}", target_C.dims(), target_C.dtype());
    }
    if !temperature.is_finite() {
        candle_core::bail!("{OP}: temperature {temperature} (must be finite)");
    }
    let inv_t = if temperature == 1.0 || temperature <= 0.0 { 1.0 } else { (1.0 / temperature) as f32 };
    logits_CV.detach().contiguous()?.apply_op1_no_bwd(&Stats { target: target_C.detach().contiguous()?, inv_t })
}

/// [`token_stats`] as an op on the logits.
struct Stats {
    target: Tensor,
    inv_t: f32,
}

fn stats_rows<T: Elem + candle_core::WithDType>(s: &CpuStorage, l: &Layout, target: &[u32], inv_t: f32) -> Result<(CpuStorage, Shape)> {
    let (z, c, v) = cpu_rows::<T>(s, l, "token stats")?;
    let out: Vec<f32> = (0..c)
        .into_par_iter()
        .flat_map_iter(|r| {
            let row = &z[r * v..(r + 1) * v];
            let st = row_stats(row, inv_t);
            let t = target[r] as usize;
            let lp = if t < v { row[t].get() * inv_t - st.lse } else { f32::NAN };
            [lp, st.h, st.lse]
        })
        .collect();
    Ok((CpuStorage::F32(out), Shape::from((c, 3))))
}

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "token-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let target: Vec<u32> = self.target.to_vec1()?;
        match s {
            CpuStorage::F32(_) => stats_rows::<f32>(s, l, &target, self.inv_t),
            CpuStorage::BF16(_) => stats_rows::<bf16>(s, l, &target, self.inv_t),
            other => candle_core::bail!("{}: logits dtype {:?} (f32 or bf16)", self.name(), other.dtype()),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::head::stats(s, l, &self.target, self.inv_t)
    }
}

/// Per row of the op: its target id, the weights of lp and h, and 1 / T (the input checks of
/// [`logprob_entropy_surrogate`] passed: target [C] u32 < V, the weights [C] f32, all
/// contiguous on the logits' device).
pub(crate) struct RowTerms {
    pub(crate) target: Tensor,
    pub(crate) g_lp: Tensor,
    pub(crate) g_h: Option<Tensor>,
    pub(crate) inv_t: f32,
}

/// logits [C, V] → the [C] f32 values, backward [`SurrogateGrad`].
struct Surrogate(RowTerms);

/// logits [C, V] → ∂(Σ values)/∂logits [C, V] in the logits' dtype (no backward of its own).
struct SurrogateGrad(RowTerms);

/// An element type of the logits, read and written through f32.
trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}

impl Elem for f32 {
    fn get(self) -> f32 {
        self
    }
    fn put(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// One row's statistics: lse and (ln S, W / S) for h.
#[derive(Debug, Clone, Copy)]
struct Row {
    lse: f32,
    h: f32,
}

fn row_stats<T: Elem>(z: &[T], inv_t: f32) -> Row {
    // the max (a NaN logit makes the whole row NaN, as in the softmax)
    let mut m = f32::NEG_INFINITY;
    for &x in z {
        let x = x.get() * inv_t;
        if x.is_nan() {
            m = x;
            break;
        }
        m = m.max(x);
    }
    let (mut s, mut w) = (0f32, 0f32);
    for &x in z {
        let x = x.get() * inv_t;
        if x == f32::NEG_INFINITY {
            continue;
        }
        let d = x - m;
        let e = d.exp();
        s += e;
        w += e * d;
    }
    let ls = s.ln();
    Row { lse: m + ls, h: ls - w / s }
}

/// The op's per-row inputs on the host.
struct HostTerms {
    target: Vec<u32>,
    g_lp: Vec<f32>,
    g_h: Option<Vec<f32>>,
}

impl RowTerms {
    /// The terms as the CUDA kernels' launch takes them (borrowed).
    #[cfg(feature = "cuda")]
    fn device_terms(&self) -> crate::gpu::head::Terms<'_> {
        crate::gpu::head::Terms { target: &self.target, g_lp: &self.g_lp, g_h: self.g_h.as_ref(), inv_t: self.inv_t }
    }

    fn host(&self) -> Result<HostTerms> {
        Ok(HostTerms { target: self.target.to_vec1()?, g_lp: self.g_lp.to_vec1()?, g_h: self.g_h.as_ref().map(|g| g.to_vec1()).transpose()? })
    }
}

/// The contiguous [C, V] logits of a CPU op's input.
fn cpu_rows<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<(&'a [T], usize, usize)> {
    let (c, v) = l.shape().dims2()?;
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{name}: logits must be contiguous") };
    Ok((&s.as_slice::<T>()?[a..b], c, v))
}

fn values<T: Elem + candle_core::WithDType>(s: &CpuStorage, l: &Layout, terms: &RowTerms) -> Result<(CpuStorage, Shape)> {
    let (z, c, v) = cpu_rows::<T>(s, l, "head surrogate")?;
    let ht = terms.host()?;
    let out: Vec<f32> = (0..c)
        .into_par_iter()
        .map(|r| {
            let row = &z[r * v..(r + 1) * v];
            let st = row_stats(row, terms.inv_t);
            let t = ht.target[r] as usize;
            let lp = if t < v { row[t].get() * terms.inv_t - st.lse } else { f32::NAN };
            let mut val = ht.g_lp[r] * lp;
            if let Some(g_h) = &ht.g_h {
                val += g_h[r] * st.h;
            }
            val
        })
        .collect();
    Ok((CpuStorage::F32(out), Shape::from(c)))
}

fn grads<T: Elem + candle_core::WithDType>(s: &CpuStorage, l: &Layout, terms: &RowTerms) -> Result<(CpuStorage, Shape)> {
    let (z, c, v) = cpu_rows::<T>(s, l, "head surrogate gradient")?;
    let ht = terms.host()?;
    let inv_t = terms.inv_t;
    let mut out = vec![T::put(0.0); c * v];
    out.par_chunks_mut(v.max(1)).enumerate().for_each(|(r, dz)| {
        let row = &z[r * v..(r + 1) * v];
        let st = row_stats(row, inv_t);
        let t = ht.target[r] as usize;
        let gl = if t < v { ht.g_lp[r] } else { f32::NAN };
        let gh = ht.g_h.as_ref().map(|g| g[r]);
        for (j, (d, &x)) in dz.iter_mut().zip(row).enumerate() {
            let lpj = x.get() * inv_t - st.lse;
            let p = lpj.exp();
            let mut g = (if j == t { gl } else { 0.0 }) - gl * p;
            if let Some(gh) = gh {
                if p > 0.0 {
                    g -= gh * p * (lpj + st.h);
                }
            }
            *d = T::put(g * inv_t);
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((c, v))))
}

impl CustomOp1 for Surrogate {
    fn name(&self) -> &'static str {
        "logprob-entropy-surrogate"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => values::<f32>(s, l, &self.0),
            CpuStorage::BF16(_) => values::<bf16>(s, l, &self.0),
            other => candle_core::bail!("{}: logits dtype {:?} (f32 or bf16)", self.name(), other.dtype()),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::head::value(s, l, &self.0.device_terms())
    }
    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // the upstream gradient of each row's value scales that row's weights
        let g = grad_res.detach().to_dtype(DType::F32)?;
        let terms = RowTerms {
            target: self.0.target.clone(),
            g_lp: (&self.0.g_lp * &g)?.contiguous()?,
            g_h: self.0.g_h.as_ref().map(|h| (h * &g)?.contiguous()).transpose()?,
            inv_t: self.0.inv_t,
        };
        Ok(Some(logits.detach().contiguous()?.apply_op1_no_bwd(&SurrogateGrad(terms))?))
    }
}

impl CustomOp1 for SurrogateGrad {
    fn name(&self) -> &'static str {
        "logprob-entropy-surrogate-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => grads::<f32>(s, l, &self.0),
            CpuStorage::BF16(_) => grads::<bf16>(s, l, &self.0),
            other => candle_core::bail!("{}: logits dtype {:?} (f32 or bf16)", self.name(), other.dtype()),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::head::grad(s, l, &self.0.device_terms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logprobs::at_temperature;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    const C: usize = 7;
    const V: usize = 50;

    fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    fn targets(seed: u64) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..C).map(|_| rng.random_range(0..V as u32)).collect()
    }

    /// The candle chain the op replaces: at_temperature → log_softmax → gather / entropy.
    fn reference(logits: &Tensor, target: &[u32], g_lp: &Tensor, g_h: Option<&Tensor>, t: f64) -> Tensor {
        let x = at_temperature(logits, t).unwrap();
        let logsm = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        let idx = Tensor::from_slice(target, (target.len(), 1), logits.device()).unwrap();
        let lp = logsm.gather(&idx, 1).unwrap().squeeze(1).unwrap();
        let mut v = (lp * g_lp).unwrap();
        if let Some(g_h) = g_h {
            let h = (logsm.exp().unwrap() * &logsm).unwrap().sum(D::Minus1).unwrap().neg().unwrap();
            v = (v + (h * g_h).unwrap()).unwrap();
        }
        v
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// Values and gradients of the op against the candle chain's, f32 and bf16 logits, T = 1 and
    /// 0.7, with and without the entropy term, summed plainly and weighted per row.
    #[test]
    fn matches_the_candle_chain() {
        let dev = Device::Cpu;
        let mut seed = 1;
        for dtype in [DType::F32, DType::BF16] {
            for t in [1.0, 0.7] {
                for with_h in [false, true] {
                    for weighted in [false, true] {
                        seed += 10;
                        let z = Tensor::from_vec(random(C * V, 4.0, seed), (C, V), &dev).unwrap().to_dtype(dtype).unwrap();
                        let target = targets(seed + 1);
                        let g_lp = Tensor::from_vec(random(C, 1.0, seed + 2), C, &dev).unwrap();
                        let g_h = Tensor::from_vec(random(C, 1.0, seed + 3), C, &dev).unwrap();
                        let w = Tensor::from_vec(random(C, 2.0, seed + 4), C, &dev).unwrap();
                        let g_h = with_h.then_some(&g_h);
                        let case = format!("{dtype:?} T {t} entropy {with_h} weighted {weighted}");
                        // values
                        let ours = logprob_entropy_surrogate(&z, &target, &g_lp, g_h, t).unwrap();
                        let theirs = reference(&z, &target, &g_lp, g_h, t);
                        let (a, b): (Vec<f32>, Vec<f32>) = (ours.to_vec1().unwrap(), theirs.to_vec1().unwrap());
                        for (r, (a, b)) in a.iter().zip(&b).enumerate() {
                            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{case} row {r}: {a} vs {b}");
                        }
                        // gradients
                        let grad = |f: &dyn Fn(&Tensor) -> Tensor| -> Tensor {
                            let var = Var::from_tensor(&z).unwrap();
                            let vals = f(var.as_tensor());
                            let loss = if weighted { (vals * &w).unwrap().sum_all().unwrap() } else { vals.sum_all().unwrap() };
                            loss.backward().unwrap().get(var.as_tensor()).unwrap().clone()
                        };
                        let ga = grad(&|x| logprob_entropy_surrogate(x, &target, &g_lp, g_h, t).unwrap());
                        let gb = grad(&|x| reference(x, &target, &g_lp, g_h, t));
                        assert_eq!(ga.dtype(), dtype, "{case}");
                        assert_eq!(ga.dims(), [C, V], "{case}");
                        let scale = max_abs(&gb).max(1e-6);
                        let diff = max_abs(&(ga.to_dtype(DType::F32).unwrap() - gb.to_dtype(DType::F32).unwrap()).unwrap());
                        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                        assert!(diff <= tol * scale, "{case}: gradient max |Δ| {diff} (scale {scale})");
                    }
                }
            }
        }
    }

    /// T ≤ 0 is T = 1 (as `at_temperature`); −∞ logits take no probability and no gradient, and
    /// leave the finite entries' values as without them.
    #[test]
    fn temperature_one_and_masked_entries() {
        let dev = Device::Cpu;
        let row = random(V, 3.0, 5);
        let z = Tensor::from_vec(row.clone(), (1, V), &dev).unwrap();
        let (g_lp, g_h) = (Tensor::new(&[0.5f32], &dev).unwrap(), Tensor::new(&[-1.5f32], &dev).unwrap());
        let at = |z: &Tensor, t: f64| logprob_entropy_surrogate(z, &[3], &g_lp, Some(&g_h), t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(at(&z, 0.0), at(&z, 1.0));
        let mut masked = row.clone();
        masked.extend([f32::NEG_INFINITY; 5]);
        let zm = Tensor::from_vec(masked, (1, V + 5), &dev).unwrap();
        let (a, b) = (at(&z, 0.7)[0], at(&zm, 0.7)[0]);
        assert!(a.is_finite() && (a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
        let var = Var::from_tensor(&zm).unwrap();
        let s = logprob_entropy_surrogate(var.as_tensor(), &[3], &g_lp, Some(&g_h), 0.7).unwrap().sum_all().unwrap();
        let g: Vec<f32> = s.backward().unwrap().get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g[..V].iter().all(|x| x.is_finite()) && g[..V].iter().any(|&x| x != 0.0));
        assert!(g[V..].iter().all(|&x| x == 0.0), "{:?}", &g[V..]);
    }

    /// Bad inputs are named errors, never panics.
    #[test]
    fn bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let z = Tensor::zeros((C, V), DType::F32, &dev).unwrap();
        let g = Tensor::zeros(C, DType::F32, &dev).unwrap();
        let mut target = vec![0u32; C];
        target[4] = V as u32;
        let err = logprob_entropy_surrogate(&z, &target, &g, None, 1.0).unwrap_err().to_string();
        assert!(err.contains("target_C[4] = 50") && err.contains("vocabulary size 50"), "{err}");
        let ok = vec![0u32; C];
        let err = logprob_entropy_surrogate(&z, &ok[..C - 1], &g, None, 1.0).unwrap_err().to_string();
        assert!(err.contains("target_C"), "{err}");
        let short = Tensor::zeros(C - 1, DType::F32, &dev).unwrap();
        let err = logprob_entropy_surrogate(&z, &ok, &short, None, 1.0).unwrap_err().to_string();
        assert!(err.contains("g_lp_C"), "{err}");
        let f64s = Tensor::zeros(C, DType::F64, &dev).unwrap();
        let err = logprob_entropy_surrogate(&z, &ok, &g, Some(&f64s), 1.0).unwrap_err().to_string();
        assert!(err.contains("g_h_C"), "{err}");
        let err = logprob_entropy_surrogate(&z.flatten_all().unwrap(), &ok, &g, None, 1.0).unwrap_err().to_string();
        assert!(err.contains("logits_CV"), "{err}");
        let err = logprob_entropy_surrogate(&z.to_dtype(DType::F16).unwrap(), &ok, &g, None, 1.0).unwrap_err().to_string();
        assert!(err.contains("logits_CV dtype"), "{err}");
        assert!(logprob_entropy_surrogate(&z, &ok, &g, None, f64::NAN).is_err());
        let empty = Tensor::zeros((0, V), DType::F32, &dev).unwrap();
        let none = Tensor::zeros(0, DType::F32, &dev).unwrap();
        assert_eq!(logprob_entropy_surrogate(&empty, &[], &none, None, 1.0).unwrap().dims(), [0]);
    }
}
