//! Experts stage: SwiGLU per expert over its contiguous slice of dispatched tokens.
//!
//! Weights are held stacked like transformers' in-memory module (and its gradient names):
//! `gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `down_proj` [E, D, F]. They load from
//! the per-expert checkpoint tensors `experts.{e}.{gate,up,down}_proj.weight`.
//!
//! Legend: A assignments, D hidden, F expert intermediate, E experts.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::invariant::matmul_nt;
use crate::nn::Kernels;

/// How the experts stage runs (`moe::parallel::local_experts`), chosen once — from the weights'
/// device and the kernels, when the experts are built and when their kernels are set — never
/// per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertsBackend {
    /// The reference stages on the host: dispatch (`moe::dispatch`) → per-expert products
    /// (candle's or the batch-invariant CPU kernels) → combine.
    Reference,
    /// CUDA: the device dispatch plan and per-expert cuBLAS GEMMs as custom ops
    /// (`gpu::experts_forward`), issued as the chosen [`crate::gpu::GemmImpl`].
    #[cfg(feature = "cuda")]
    Grouped(crate::gpu::GemmImpl),
    /// CUDA with the batch-invariant kernels: the device plan's gather and f32 combine around
    /// the invariant per-expert products.
    #[cfg(feature = "cuda")]
    DeviceInvariant,
}

impl ExpertsBackend {
    fn choose(device: &candle_core::Device, kernels: Kernels) -> Self {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            return if kernels == Kernels::Invariant { Self::DeviceInvariant } else { Self::Grouped(crate::gpu::GemmImpl::from_env()) };
        }
        let _ = (device, kernels);
        Self::Reference
    }
}

#[derive(Debug, Clone)]
pub struct Experts {
    /// [E, 2F, D]
    pub gate_up_proj: Tensor,
    /// [E, D, F]
    pub down_proj: Tensor,
    intermediate: usize,
    kernels: Kernels,
    backend: ExpertsBackend,
}

impl Experts {
    pub fn new(num_experts: usize, hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        let mut gate_up = Vec::with_capacity(num_experts);
        let mut down = Vec::with_capacity(num_experts);
        for e in 0..num_experts {
            let vb = vb.pp(e);
            let g = vb.get((intermediate, hidden), "gate_proj.weight")?;
            let u = vb.get((intermediate, hidden), "up_proj.weight")?;
            gate_up.push(Tensor::cat(&[&g, &u], 0)?);
            down.push(vb.get((hidden, intermediate), "down_proj.weight")?);
        }
        Ok(Self {
            gate_up_proj: Tensor::stack(&gate_up, 0)?,
            down_proj: Tensor::stack(&down, 0)?,
            intermediate,
            kernels: Kernels::Autograd,
            backend: ExpertsBackend::choose(vb.device(), Kernels::Autograd),
        })
    }

    /// From stacked weights: `gate_up_proj` [E, 2F, D], `down_proj` [E, D, F].
    pub fn from_stacked(gate_up_proj: Tensor, down_proj: Tensor) -> Result<Self> {
        let (e, f2, d) = gate_up_proj.dims3()?;
        if down_proj.dims3()? != (e, d, f2 / 2) || f2 % 2 != 0 {
            candle_core::bail!("experts: gate_up_proj {:?} and down_proj {:?} do not fit", gate_up_proj.dims(), down_proj.dims());
        }
        let backend = ExpertsBackend::choose(gate_up_proj.device(), Kernels::Autograd);
        Ok(Self { gate_up_proj, down_proj, intermediate: f2 / 2, kernels: Kernels::Autograd, backend })
    }

    /// The kernels of the per-expert products; re-chooses the backend.
    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
        self.backend = ExpertsBackend::choose(self.gate_up_proj.device(), k);
    }

    /// The backend the experts stage runs on (the weights keep their device when mapped, so it
    /// stays valid).
    pub fn backend(&self) -> ExpertsBackend {
        self.backend
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// x [n, D] · w[e]ᵀ with the selected kernel.
    fn mm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Invariant => matmul_nt(x, w),
            _ => x.matmul(&w.t()?),
        }
    }

    pub fn num_experts(&self) -> usize {
        self.gate_up_proj.dims()[0]
    }

    /// x_AD in assignment order, `counts[e]` rows per expert → y_AD.
    pub fn forward(&self, x_AD: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let f = self.intermediate;
        if self.kernels == Kernels::Invariant {
            // every expert in one grouped product each side (one launch on CUDA)
            // (the fused SwiGLU: one rounding, one launch; `nn::swiglu`)
            let h = crate::nn::invariant::grouped_matmul_nt(x_AD, &self.gate_up_proj, counts)?;
            return crate::nn::invariant::grouped_matmul_nt(&crate::nn::swiglu::swiglu(&h)?, &self.down_proj, counts);
        }
        let mut outs = Vec::new();
        let mut offset = 0;
        for (e, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let x = x_AD.narrow(0, offset, c)?;
            offset += c;
            let h = self.mm(&x, &self.gate_up_proj.get(e)?)?;
            let act = h.narrow(1, 0, f)?.silu()?.mul(&h.narrow(1, f, f)?)?;
            outs.push(self.mm(&act, &self.down_proj.get(e)?)?);
        }
        if outs.is_empty() {
            return x_AD.zeros_like();
        }
        Tensor::cat(&outs, 0)
    }
}
