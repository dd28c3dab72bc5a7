//! Rotary position embeddings (non-interleaved, "rotate half"), computed from position ids so
//! packed sequences restart at 0. Only the first `rotary_dim` channels of a head rotate
//! (partial rotary); with `rotary_dim == head_dim` this is plain RoPE.
//!
//! Shapes: N tokens (flattened B*T), Dh head dim, R rotary dim.

use candle_core::{DType, Device, Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Rope {
    /// [R/2] inverse frequencies, f32 as transformers computes them.
    inv_freq: Tensor,
    rotary_dim: usize,
}

/// cos / sin for one batch: [B, 1, T, R].
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(theta: f64, rotary_dim: usize, device: &Device) -> Result<Self> {
        // transformers: 1 / theta ** (arange(0, dim, 2).float() / dim), in f32.
        let inv: Vec<f32> =
            (0..rotary_dim / 2).map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32)).collect();
        Ok(Self { inv_freq: Tensor::from_vec(inv, rotary_dim / 2, device)?, rotary_dim })
    }

    pub fn tables(&self, positions: &[u32], b: usize, t: usize, dtype: DType) -> Result<RopeTables> {
        let dev = self.inv_freq.device();
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos_N1 = Tensor::from_vec(pos, (b * t, 1), dev)?;
        let freqs_NH = pos_N1.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let emb_NR = Tensor::cat(&[&freqs_NH, &freqs_NH], D::Minus1)?;
        let shape = (b, 1, t, self.rotary_dim);
        Ok(RopeTables {
            cos: emb_NR.cos()?.reshape(shape)?.to_dtype(dtype)?,
            sin: emb_NR.sin()?.reshape(shape)?.to_dtype(dtype)?,
        })
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

impl RopeTables {
    /// x: [B, heads, T, Dh] -> same shape, first R channels rotated.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let r = self.cos.dim(D::Minus1)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            x.broadcast_mul(&self.cos)?.add(&rotate_half(x)?.broadcast_mul(&self.sin)?)
        };
        if r == dh {
            return rotate(x);
        }
        let x_rot = x.narrow(D::Minus1, 0, r)?;
        let x_pass = x.narrow(D::Minus1, r, dh - r)?;
        Tensor::cat(&[&rotate(&x_rot)?, &x_pass], D::Minus1)
    }
}
