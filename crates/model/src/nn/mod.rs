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
pub mod rope;
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
