//! Sampling by the Gumbel-max trick, the same on the host and on the device: a row's token is
//!
//! ```text
//! argmax_i  x_i / T + g_i,   g_i = −ln(−ln u_i),   u_i = (h(key, i) >> 11 + ½) · 2⁻⁵³
//! ```
//!
//! — an exact draw from softmax(x / T) — where `h` is a counter-based hash (splitmix64's
//! finaliser) of the row's key and the vocabulary index, and the key mixes the request's seed
//! with the draw's counter (its position among the request's sampled tokens). So a token depends
//! on its own logits row, seed and position only: not on the batch around it, not on the order
//! of earlier draws of other requests, and a preempted sequence recomputed later draws the
//! same tokens. Scores are f64; the largest wins, ties to the lower index; NaN never wins; a row
//! of −∞ / NaN only gives token 0.
//!
//! The device kernel (`gpu/sample.cu`) evaluates the same formula in the same precision (CUDA's
//! double `log` is within 1 ulp of the host's), so host and device draw the same token unless two
//! candidates' scores lie within an ulp of each other. It runs one block per row over the whole
//! vocabulary: sampling costs one launch and leaves only the tokens to copy back — no logits row
//! travels to the host.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const COUNTER: u64 = 0xD1B5_4A32_D192_ED03;

/// splitmix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of one draw: the request's seed and the draw's counter.
pub fn key(seed: u64, counter: u64) -> u64 {
    mix(mix(seed.wrapping_add(GOLDEN)) ^ counter.wrapping_mul(COUNTER))
}

/// The Gumbel noise of vocabulary entry `i` under `key`.
pub fn noise(key: u64, i: u32) -> f64 {
    let h = mix(key ^ (i as u64).wrapping_mul(GOLDEN));
    let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    -(-u.ln()).ln()
}

/// One row's draw on the host (the device kernel's definition).
pub fn draw_row(logits: &[f32], key: u64, temperature: f32) -> u32 {
    let t = temperature as f64;
    let (mut best, mut at) = (f64::NEG_INFINITY, u32::MAX);
    for (i, &x) in logits.iter().enumerate() {
        let s = x as f64 / t + noise(key, i as u32);
        if s > best || (s == best && (i as u32) < at) {
            best = s;
            at = i as u32;
        }
    }
    if at == u32::MAX { 0 } else { at }
}

/// One draw per row of `logits_RV` (f32 or bf16, [R, V]): `rows[r]` = (key, temperature > 0).
/// Returns [R] u32 token ids on the logits' device.
pub fn sample(logits_RV: &Tensor, rows: &[(u64, f32)]) -> Result<Tensor> {
    let (r, _) = logits_RV.dims2()?;
    if rows.len() != r {
        candle_core::bail!("gumbel sample: {} rows of logits, {} keys", r, rows.len());
    }
    if let Some((_, t)) = rows.iter().find(|(_, t)| !(*t > 0.0 && t.is_finite())) {
        candle_core::bail!("gumbel sample: temperature {t} (must be finite and > 0; greedy rows take the argmax)");
    }
    logits_RV.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&GumbelArgmax { rows: rows.to_vec() })
}

struct GumbelArgmax {
    rows: Vec<(u64, f32)>,
}

impl CustomOp1 for GumbelArgmax {
    fn name(&self) -> &'static str {
        "gumbel-argmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, v) = l.shape().dims2()?;
        let CpuStorage::F32(all) = s else { candle_core::bail!("gumbel sample: logits must be f32") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("gumbel sample: logits must be contiguous") };
        let x = &all[a..b];
        let out = (0..r).map(|i| draw_row(&x[i * v..(i + 1) * v], self.rows[i].0, self.rows[i].1)).collect();
        Ok((CpuStorage::U32(out), Shape::from(r)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::gpu::sample::gumbel_argmax(s, l, &self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The draws follow softmax(x / T): frequencies over many keys within a few standard errors.
    #[test]
    fn draws_follow_the_softmax() {
        let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0];
        for t in [1.0f32, 0.7] {
            let w: Vec<f64> = logits.iter().map(|&x| (x as f64 / t as f64).exp()).collect();
            let z: f64 = w.iter().sum();
            let n = 40_000;
            let mut count = [0usize; 5];
            for c in 0..n {
                count[draw_row(&logits, key(7, c), t) as usize] += 1;
            }
            for (i, &k) in count.iter().enumerate() {
                let p = w[i] / z;
                let se = (p * (1.0 - p) / n as f64).sqrt();
                let got = k as f64 / n as f64;
                assert!((got - p).abs() < 5.0 * se, "T {t} token {i}: {got} vs {p}");
            }
        }
    }

    /// A row's token depends on its logits, seed and counter only: the same alone and in any
    /// batch; different seeds / counters give different streams.
    #[test]
    fn a_rows_draw_is_its_own() {
        let dev = Device::Cpu;
        let v = 300;
        let rows: Vec<Vec<f32>> = (0..6).map(|r| (0..v).map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.3).collect()).collect();
        let keys: Vec<(u64, f32)> = (0..6).map(|r| (key(r as u64, 3), 1.0)).collect();
        let all = Tensor::from_vec(rows.concat(), (6, v), &dev).unwrap();
        let batch: Vec<u32> = sample(&all, &keys).unwrap().to_vec1().unwrap();
        for r in 0..6 {
            let one = Tensor::from_vec(rows[r].clone(), (1, v), &dev).unwrap();
            assert_eq!(sample(&one, &keys[r..r + 1]).unwrap().to_vec1::<u32>().unwrap(), vec![batch[r]]);
        }
        let a: Vec<u32> = (0..50).map(|c| draw_row(&rows[0], key(1, c), 1.0)).collect();
        let b: Vec<u32> = (0..50).map(|c| draw_row(&rows[0], key(2, c), 1.0)).collect();
        assert_ne!(a, b);
        assert!(sample(&all, &keys[..2]).is_err());
        assert!(sample(&all, &[(0, 0.0); 6]).is_err());
    }

    /// −∞ entries are never drawn while a finite one exists; NaN never; a row of −∞ gives 0.
    #[test]
    fn masked_and_nan_entries() {
        let x = [f32::NEG_INFINITY, f32::NAN, 0.0, f32::NEG_INFINITY];
        for c in 0..200 {
            assert_eq!(draw_row(&x, key(0, c), 1.0), 2);
        }
        assert_eq!(draw_row(&[f32::NEG_INFINITY; 4], key(0, 0), 1.0), 0);
        assert_eq!(draw_row(&[f32::NAN; 4], key(0, 0), 1.0), 0);
    }
}
