//! Rotary position embeddings (non-interleaved, "rotate half"), computed from position ids so
//! packed sequences restart at 0. Only the first `rotary_dim` channels of a head rotate
//! (partial rotary); with `rotary_dim == head_dim` this is plain RoPE.
//!
//! [`RopeTables::apply`] is one op (CPU, and one kernel on CUDA: `gpu/rope.cu`) with the
//! arithmetic of the composed candle ops bit for bit — round(round(x · cos) + round(rot · sin))
//! in the storage dtype, rot = rotate_half(x) — and its (linear) backward one op as well, in
//! f32 with the bits of the composed f32 backward ([`RopeBwdOp`]).
//!
//! Shapes: N tokens (flattened B*T), B rows, n heads, T slots, Dh head dim, R rotary dim.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

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

#[cfg(test)]
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

impl RopeTables {
    /// cos and sin [B, 1, T, R].
    pub(crate) fn cos_sin(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// The same tables on another device (the same bits).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self { cos: self.cos.to_device(device)?, sin: self.sin.to_device(device)? })
    }

    /// x: [B, heads, T, Dh] -> same shape, first R channels rotated.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, t, dh) = x.dims4()?;
        let r = self.cos.dim(D::Minus1)?;
        if r > dh || r % 2 != 0 || self.cos.dims() != [b, 1, t, r] || self.sin.dims() != self.cos.dims() || x.dtype() != self.cos.dtype() {
            candle_core::bail!("rope: x {:?} {:?} with tables {:?} {:?}", x.dims(), x.dtype(), self.cos.dims(), self.cos.dtype());
        }
        x.contiguous()?.apply_op3(&self.cos.contiguous()?, &self.sin.contiguous()?, RopeOp { dims: (b, n, t, dh, r), token_major: false })
    }

    /// x: [B, T, heads, Dh] (token-major: the projections' layout, no transpose) -> same shape,
    /// first R channels rotated: per element the bits of [`RopeTables::apply`] on the
    /// transposed x, forward and backward.
    pub fn apply_token_major(&self, x_BTND: &Tensor) -> Result<Tensor> {
        let (b, t, n, dh) = x_BTND.dims4()?;
        let r = self.cos.dim(D::Minus1)?;
        if r > dh || r % 2 != 0 || self.cos.dims() != [b, 1, t, r] || self.sin.dims() != self.cos.dims() || x_BTND.dtype() != self.cos.dtype() {
            candle_core::bail!("rope: x {:?} {:?} (token-major) with tables {:?} {:?}", x_BTND.dims(), x_BTND.dtype(), self.cos.dims(), self.cos.dtype());
        }
        x_BTND.contiguous()?.apply_op3(&self.cos.contiguous()?, &self.sin.contiguous()?, RopeOp { dims: (b, n, t, dh, r), token_major: true })
    }

    /// The composed candle ops the fused op reproduces (the tests' reference).
    #[cfg(test)]
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dh = x.dim(D::Minus1)?;
        let r = self.cos.dim(D::Minus1)?;
        let rotate = |x: &Tensor| -> Result<Tensor> { x.broadcast_mul(&self.cos)?.add(&rotate_half(x)?.broadcast_mul(&self.sin)?) };
        if r == dh {
            return rotate(x);
        }
        Tensor::cat(&[&rotate(&x.narrow(D::Minus1, 0, r)?)?, &x.narrow(D::Minus1, r, dh - r)?], D::Minus1)
    }
}

struct RopeOp {
    dims: (usize, usize, usize, usize, usize),
    /// x is [B, T, n, Dh] (token-major) instead of [B, n, T, Dh]
    token_major: bool,
}

/// The table row (b · T + t) of the `tok`-th Dh-vector of x: x [B, n, T, Dh] (head-major) or
/// [B, T, n, Dh] (token-major).
fn table_row(tok: usize, n: usize, t: usize, token_major: bool) -> usize {
    if token_major {
        tok / n
    } else {
        (tok / t / n) * t + tok % t
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n, t, dh, r) = self.dims;
        let (x, c, s) = (super::cpu_f32("rope", s1, l1, "x")?, super::cpu_f32("rope", s2, l2, "cos")?, super::cpu_f32("rope", s3, l3, "sin")?);
        let bf = matches!(s1, CpuStorage::BF16(_));
        let rnd = |v: f32| if bf { half::bf16::from_f32(v).to_f32() } else { v };
        let h = r / 2;
        let mut out = x.to_vec();
        if dh > 0 {
            for (tok, (o, xr)) in out.chunks_mut(dh).zip(x.chunks(dh)).enumerate() {
                let at = table_row(tok, n, t, self.token_major) * r;
                for i in 0..r {
                    let rot = if i < h { -xr[i + h] } else { xr[i - h] };
                    o[i] = rnd(rnd(xr[i] * c[at + i]) + rnd(rot * s[at + i]));
                }
            }
        }
        let shape = l1.shape().clone();
        Ok(if bf { (CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()), shape) } else { (CpuStorage::F32(out), shape) })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::rope::rope((s1, l1), (s2, l2), (s3, l3), self.dims, false, self.token_major)
    }

    /// Linear in x: dx_j = g_j cos_j + (g_{j+h} sin_{j+h} if j < h else −g_{j−h} sin_{j−h}) on
    /// the rotary channels, g_j past them (f32, then x's dtype); the tables take no gradient.
    /// One op ([`RopeBwdOp`]) when g has x's dtype (always, from autograd), else the composed
    /// f32 ops (the same bits).
    fn bwd(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if g.dtype() == x.dtype() && g.dims() == x.dims() {
            let dx = g.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &RopeBwdOp { dims: self.dims, token_major: self.token_major })?;
            return Ok((Some(dx), None, None));
        }
        if self.token_major {
            // the composed reference is head-major: through the transposes
            let dx = composed_bwd(self.dims, x.dtype(), cos, sin, &g.transpose(1, 2)?.contiguous()?)?;
            return Ok((Some(dx.transpose(1, 2)?.contiguous()?), None, None));
        }
        Ok((Some(composed_bwd(self.dims, x.dtype(), cos, sin, g)?), None, None))
    }
}

/// The backward of [`RopeOp`] composed of candle ops in f32: the reference [`RopeBwdOp`] has
/// the bits of.
fn composed_bwd(dims: (usize, usize, usize, usize, usize), dtype: DType, cos: &Tensor, sin: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (_, _, _, dh, r) = dims;
    let h = r / 2;
    let gf = g.to_dtype(DType::F32)?;
    let g_rot = gf.narrow(D::Minus1, 0, r)?;
    let gc = g_rot.broadcast_mul(&cos.to_dtype(DType::F32)?)?;
    let gs = g_rot.broadcast_mul(&sin.to_dtype(DType::F32)?)?;
    let back = Tensor::cat(&[&gs.narrow(D::Minus1, h, h)?, &gs.narrow(D::Minus1, 0, h)?.neg()?], D::Minus1)?;
    let d_rot = (gc + back)?;
    let dx = if r == dh { d_rot } else { Tensor::cat(&[&d_rot, &gf.narrow(D::Minus1, r, dh - r)?], D::Minus1)? };
    dx.to_dtype(dtype)
}

/// The input's gradient of [`RopeOp`] from the output's gradient g [B, n, T, Dh] and the tables
/// (g and the tables of one dtype): per element, in f32, round(g_j · cos_j) ±
/// round(g_{j∓h} · sin_{j∓h}) then rounded once to g's dtype ([`composed_bwd`]'s bits).
struct RopeBwdOp {
    dims: (usize, usize, usize, usize, usize),
    token_major: bool,
}

impl CustomOp3 for RopeBwdOp {
    fn name(&self) -> &'static str {
        "rope-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n, t, dh, r) = self.dims;
        let (g, c, s) = (super::cpu_f32("rope backward", s1, l1, "g")?, super::cpu_f32("rope backward", s2, l2, "cos")?, super::cpu_f32("rope backward", s3, l3, "sin")?);
        let h = r / 2;
        let mut out = g.to_vec();
        if dh > 0 {
            for (tok, (o, gr)) in out.chunks_mut(dh).zip(g.chunks(dh)).enumerate() {
                let at = table_row(tok, n, t, self.token_major) * r;
                for i in 0..r {
                    let back = if i < h { gr[i + h] * s[at + i + h] } else { -(gr[i - h] * s[at + i - h]) };
                    o[i] = gr[i] * c[at + i] + back;
                }
            }
        }
        let shape = l1.shape().clone();
        Ok(match s1 {
            CpuStorage::BF16(_) => (CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()), shape),
            _ => (CpuStorage::F32(out), shape),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::rope::rope((s1, l1), (s2, l2), (s3, l3), self.dims, true, self.token_major)
    }
}

#[cfg(test)]
mod tests {
    use super::Rope;
    use candle_core::{DType, Device, Tensor, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn fused_rope_equals_the_composed_ops_bit_for_bit_with_gradients() {
        let dev = Device::Cpu;
        for (dh, rd) in [(16usize, 16usize), (16, 8)] {
            for dtype in [DType::F32, DType::BF16] {
                let rope = Rope::new(10_000.0, rd, &dev).unwrap();
                let tables = rope.tables(&[0, 1, 2, 7, 0, 3], 2, 3, dtype).unwrap();
                let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 3, dh), &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
                let (a, b) = (tables.apply(x.as_tensor()).unwrap(), tables.composed(x.as_tensor()).unwrap());
                assert_eq!(bits(&a), bits(&b), "dh {dh} R {rd} {dtype:?}");
                let g = Tensor::randn(0f32, 1.0, (2, 3, 3, dh), &dev).unwrap();
                let grad = |y: Tensor| {
                    let gs = (y.to_dtype(DType::F32).unwrap() * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    gs.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap()
                };
                // the fused backward has the composed f32 backward's bits
                let gd = g.to_dtype(dtype).unwrap();
                let dims = (2, 3, 3, dh, rd);
                let fused = gd.apply_op3_no_bwd(&tables.cos, &tables.sin, &super::RopeBwdOp { dims, token_major: false }).unwrap();
                let composed = super::composed_bwd(dims, dtype, &tables.cos, &tables.sin, &gd).unwrap();
                assert_eq!(bits(&fused), bits(&composed), "dh {dh} R {rd} {dtype:?}: backward");
                let (ga, gb) = (grad(a), grad(b));
                let d = (&ga - &gb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < if dtype == DType::F32 { 1e-5 } else { 5e-2 }, "dh {dh} R {rd} {dtype:?}: gradient differs by {d}");
            }
        }
    }

    /// The token-major op ([B, T, n, Dh], the projections' layout) is the head-major op on the
    /// transposed tensor, bit for bit, forward and backward.
    #[test]
    fn token_major_equals_head_major_transposed() {
        let dev = Device::Cpu;
        for (dh, rd) in [(16usize, 16usize), (16, 8)] {
            for dtype in [DType::F32, DType::BF16] {
                let tables = Rope::new(10_000.0, rd, &dev).unwrap().tables(&[0, 1, 2, 7, 0, 3], 2, 3, dtype).unwrap();
                let x_bnt = Tensor::randn(0f32, 1.0, (2, 4, 3, dh), &dev).unwrap().to_dtype(dtype).unwrap();
                let g_bnt = Tensor::randn(0f32, 1.0, (2, 4, 3, dh), &dev).unwrap();
                let head = Var::from_tensor(&x_bnt).unwrap();
                let tok = Var::from_tensor(&x_bnt.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
                let (yh, yt) = (tables.apply(head.as_tensor()).unwrap(), tables.apply_token_major(tok.as_tensor()).unwrap());
                assert_eq!(bits(&yh), bits(&yt.transpose(1, 2).unwrap().contiguous().unwrap()), "dh {dh} R {rd} {dtype:?}: forward");
                let sh = (yh.to_dtype(DType::F32).unwrap() * &g_bnt).unwrap().sum_all().unwrap();
                let st = (yt.to_dtype(DType::F32).unwrap() * g_bnt.transpose(1, 2).unwrap()).unwrap().sum_all().unwrap();
                let (gh, gt) = (sh.backward().unwrap(), st.backward().unwrap());
                let dh_ = gh.get(head.as_tensor()).unwrap();
                let dt_ = gt.get(tok.as_tensor()).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                assert_eq!(bits(dh_), bits(&dt_), "dh {dh} R {rd} {dtype:?}: backward");
            }
        }
    }
}
