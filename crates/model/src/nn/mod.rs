//! Dense building blocks shared by every architecture: RMSNorm, RoPE, attention, SwiGLU MLP.
//!
//! Everything here is written with candle ops that carry gradients, so the trainer runs the
//! very same forward. candle's fused fast ops (`softmax_last_dim`, `rms_norm`) have no backward;
//! they are used only when the caller selects [`Kernels::Inference`] explicitly.

pub mod attention;
pub mod invariant;
pub mod kv_write;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod paged_qk;
pub mod rope;
pub mod swiglu;
pub mod varlen;

/// Which kernels a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Composed ops with gradients (training and parity).
    #[default]
    Autograd,
    /// candle's fused inference ops where they exist; no gradients flow through them.
    Inference,
    /// Batch-invariant f32 CPU kernels (matmul, attention): a row's result does not depend on
    /// the batch around it, so an engine's decode step equals the trainer's packed forward bit
    /// for bit. Carries gradients.
    Invariant,
}

/// A CPU op's contiguous f32 or bf16 input as f32 values (borrowed when f32): `op` and `what` name
/// the op and the input in the error for a strided view or another dtype.
pub(crate) fn cpu_f32<'a>(op: &str, s: &'a candle_core::CpuStorage, l: &candle_core::Layout, what: &str) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    use candle_core::CpuStorage;
    use std::borrow::Cow;
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: {what} must be contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        _ => candle_core::bail!("{op}: {what} must be f32 or bf16"),
    })
}
