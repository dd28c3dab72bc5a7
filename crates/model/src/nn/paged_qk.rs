//! The engine's q / k step of a paged forward in one launch: QK-norm, RoPE and the two KV-pool
//! writes of `Attention::forward_paged` — six launches a layer (`rms_norm` x 2, `rope` x 2,
//! `kv_write` x 2) — as `gpu/rope.cu`'s `qk_norm_rope_write`, with the bits of the six: the GPU
//! tests `kv_cached_decoding_equals_full_forward_on_the_gpu` (the wide bf16 model, Dh 128: paged
//! decode logits equal the trainer's composed forward) and
//! `trainer_equals_engine_at_the_30b_width_in_bf16` (`crates/cli/tests/gpu_invariant.rs`). No
//! gradient: the engine's forward only; elsewhere (CPU, f32, no QK-norm, partial rotary) the
//! caller composes.
//!
//! Legend: N new tokens, H query heads, G key / value heads, Dh head dim, R pool rows.

use candle_core::{Result, Tensor};

use super::norm::RmsNorm;
use super::rope::RopeTables;

/// q [N, H, Dh], k, v [N, G, Dh] (the projections): q normalised and rotated [N, H, Dh], with k
/// normalised and rotated and v written into the pools [R, G, Dh] at `slots` [N] (u32, each
/// below R: the caller's checked slots) — when the fused kernel applies (CUDA, bf16, tables over
/// the full head width, Dh 128: the width the GPU tests run); `None` otherwise, nothing written. The pools must be
/// the forward's alone (`KvPool`, borrowed mutably by `MoeCausalLm::forward_paged`).
pub(crate) fn norm_rope_write([q, k, v]: [&Tensor; 3], norms: (&RmsNorm, &RmsNorm), rope: &RopeTables, pools: (&Tensor, &Tensor), slots: &Tensor) -> Result<Option<Tensor>> {
    let (cos, _) = rope.cos_sin();
    let dh = q.dim(2)?;
    let bf16 = [q, k, v, cos, pools.0, pools.1].iter().all(|t| t.dtype() == candle_core::DType::BF16);
    if !q.device().is_cuda() || !bf16 || dh != 128 || cos.dim(3)? != dh {
        return Ok(None);
    }
    fused(q, k, v, norms, rope, pools, slots).map(Some)
}

#[cfg(not(feature = "cuda"))]
fn fused(_: &Tensor, _: &Tensor, _: &Tensor, _: (&RmsNorm, &RmsNorm), _: &RopeTables, _: (&Tensor, &Tensor), _: &Tensor) -> Result<Tensor> {
    candle_core::bail!("paged q/k: CUDA only")
}

#[cfg(feature = "cuda")]
fn fused(q: &Tensor, k: &Tensor, v: &Tensor, (qn, kn): (&RmsNorm, &RmsNorm), rope: &RopeTables, (k_pool, v_pool): (&Tensor, &Tensor), slots: &Tensor) -> Result<Tensor> {
    let (cos, sin) = rope.cos_sin();
    let op = PagedQk {
        held: [k.clone(), v.clone(), qn.weight.clone(), kn.weight.clone(), cos.clone(), sin.clone(), k_pool.clone(), v_pool.clone(), slots.clone()],
        eps: (qn.eps() as f32, kn.eps() as f32),
        heads: (q.dim(1)?, k.dim(1)?),
    };
    q.apply_op1_no_bwd(&op)
}

/// [`norm_rope_write`]'s op on q: k, v, the two norm weights, cos, sin, the two pools and the
/// slots held (their storage read at launch).
#[cfg(feature = "cuda")]
struct PagedQk {
    held: [Tensor; 9],
    eps: (f32, f32),
    heads: (usize, usize),
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for PagedQk {
    fn name(&self) -> &'static str {
        "paged-qk-norm-rope-write"
    }

    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("paged q/k: CUDA only (norm_rope_write returns None elsewhere)")
    }

    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use crate::gpu::rope::{qk_norm_rope_write, PagedWrite};
        const NAMES: [&str; 9] = ["k", "v", "q norm weight", "k norm weight", "cos", "sin", "key pool", "value pool", "slots"];
        let guards: Vec<_> = self.held.iter().map(|t| t.storage_and_layout()).collect();
        let mut args = Vec::with_capacity(9);
        for (i, (st, tl)) in guards.iter().enumerate() {
            match &**st {
                candle_core::Storage::Cuda(c) => args.push((c, *tl)),
                _ => candle_core::bail!("paged q/k: {} is not on the GPU", NAMES[i]),
            }
        }
        let &[n, _, dh] = l.dims() else { candle_core::bail!("paged q/k: q {:?}, expected [N, H, Dh]", l.dims()) };
        let out = PagedWrite { k_pool: args[6], v_pool: args[7], slots: args[8] };
        let q_out = qk_norm_rope_write((s, l), args[0], args[1], (args[2], args[3]), self.eps, (args[4], args[5]), out, (n, self.heads.0, self.heads.1, dh))?;
        Ok((q_out, candle_core::Shape::from((n, self.heads.0, dh))))
    }
}
