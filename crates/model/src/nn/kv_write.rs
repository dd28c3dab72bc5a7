//! The in-place write of new key / value rows into a paged pool (`crate::kv_cache`'s pools,
//! `Attention::forward_paged`'s writes): pool[slots[t]] = rows[t], on the CPU and on CUDA
//! (`gpu/paged.cu`'s `kv_write`).

use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor};

/// pool[slots[t]] = rows[t]: the in-place write of new key / value rows into a pool.
struct KvWrite;

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(&self, pool: &mut CpuStorage, lp: &Layout, src: &CpuStorage, ls: &Layout, slots: &CpuStorage, lsl: &Layout) -> candle_core::Result<()> {
        let width: usize = lp.dims()[1..].iter().product();
        let (Some((p0, _)), Some((s0, s1)), Some((i0, i1))) = (lp.contiguous_offsets(), ls.contiguous_offsets(), lsl.contiguous_offsets()) else {
            candle_core::bail!("kv write: pool, rows and slots must be contiguous");
        };
        let CpuStorage::U32(slots) = slots else { candle_core::bail!("kv write: slots must be u32") };
        let slots = &slots[i0..i1];
        macro_rules! copy {
            ($p:expr, $s:expr) => {{
                let src = &$s[s0..s1];
                for (t, &slot) in slots.iter().enumerate() {
                    let at = p0 + slot as usize * width;
                    $p[at..at + width].copy_from_slice(&src[t * width..(t + 1) * width]);
                }
            }};
        }
        match (pool, src) {
            (CpuStorage::F32(p), CpuStorage::F32(s)) => copy!(p, s),
            (CpuStorage::BF16(p), CpuStorage::BF16(s)) => copy!(p, s),
            (CpuStorage::F16(p), CpuStorage::F16(s)) => copy!(p, s),
            _ => candle_core::bail!("kv write: pool and rows must share a dtype (f32, bf16, f16)"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        lp: &Layout,
        src: &candle_core::CudaStorage,
        ls: &Layout,
        slots: &candle_core::CudaStorage,
        lsl: &Layout,
    ) -> candle_core::Result<()> {
        crate::gpu::paged::kv_write(pool, lp, src, ls, slots, lsl)
    }
}

/// Write `rows` [T, ..] into `pool` [R, ..] at `slots` [T] (u32, each < R — the caller's
/// checked slots).
pub fn write_rows(pool: &Tensor, rows: &Tensor, slots: &Tensor) -> candle_core::Result<()> {
    if rows.dims()[1..] != pool.dims()[1..] || rows.dim(0)? != slots.dim(0)? || rows.dtype() != pool.dtype() {
        candle_core::bail!("kv write: rows {:?} {:?} into a pool {:?} {:?} at {} slots", rows.dims(), rows.dtype(), pool.dims(), pool.dtype(), slots.dim(0)?);
    }
    pool.inplace_op3(&rows.contiguous()?, slots, &KvWrite)
}

