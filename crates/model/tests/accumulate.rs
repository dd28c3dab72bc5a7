//! The in-place f32 gradient sum (`lockstep_model::accumulate`) on the CPU: the bits of
//! `acc + g.to_dtype(F32)` for f32 and bf16 gradients, contiguous or not, at any start offset,
//! and errors that name what was wrong.
#![allow(non_snake_case)]

use candle_core::{DType, Device, Tensor};
use lockstep_model::accumulate::{add_into, check, AccumulateError};

/// n deterministic f32 values over many magnitudes, with ±0, ±∞, NaN and subnormals mixed in.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => f32::MIN_POSITIVE / 8.0,
                _ => {
                    let m = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    m * 2f32.powi(((s >> 8) % 40) as i32 - 20)
                }
            }
        })
        .collect()
}

fn tensor(n: usize, seed: u64, dims: &[usize]) -> Tensor {
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// add_into(acc, g) against a fresh `acc + g.to_dtype(F32)`, bit for bit.
fn assert_same_as_add(acc: &Tensor, g: &Tensor) {
    let want = (acc + g.to_dtype(DType::F32).unwrap()).unwrap();
    add_into(acc, g).unwrap();
    assert_eq!(bits(acc), bits(&want), "acc {:?} += g {:?} {:?}", acc.dims(), g.dims(), g.dtype());
}

#[test]
fn f32_and_bf16_sums_have_the_bits_of_add() {
    // 0, small, and past the parallel chunk (1 << 16) with a ragged end
    for n in [0, 1, 7, 1000, (1 << 16) * 3 + 5] {
        for dtype in [DType::F32, DType::BF16] {
            let acc = tensor(n, 1 + n as u64, &[n]);
            let g = tensor(n, 2 + n as u64, &[n]).to_dtype(dtype).unwrap();
            assert_same_as_add(&acc, &g);
        }
    }
}

#[test]
fn repeated_sums_match_the_out_of_place_chain() {
    let acc = tensor(3 * 41, 5, &[3, 41]);
    let mut want = acc.copy().unwrap();
    for k in 0..5u64 {
        let g = tensor(3 * 41, 10 + k, &[3, 41]);
        let g = if k % 2 == 0 { g.to_dtype(DType::BF16).unwrap() } else { g };
        want = (want + g.to_dtype(DType::F32).unwrap()).unwrap();
        add_into(&acc, &g).unwrap();
    }
    assert_eq!(bits(&acc), bits(&want));
}

#[test]
fn a_strided_gradient_is_read_through_its_layout() {
    for dtype in [DType::F32, DType::BF16] {
        // g [41, 13]: the transpose of a [13, 41] tensor
        let g = tensor(13 * 41, 3, &[13, 41]).to_dtype(dtype).unwrap().t().unwrap();
        assert!(!g.is_contiguous());
        let acc = tensor(41 * 13, 4, &[41, 13]);
        assert_same_as_add(&acc, &g);
        // a narrow along the inner dimension (strided, with a start offset)
        let g = tensor(9 * 50, 6, &[9, 50]).to_dtype(dtype).unwrap().narrow(1, 7, 30).unwrap();
        assert!(!g.is_contiguous());
        let acc = tensor(9 * 30, 8, &[9, 30]);
        assert_same_as_add(&acc, &g);
    }
}

#[test]
fn start_offsets_of_acc_and_g_are_respected() {
    for dtype in [DType::F32, DType::BF16] {
        // acc: rows 3..7 of a [10, 37] tensor (contiguous, start offset 3 · 37)
        let big = tensor(10 * 37, 11, &[10, 37]);
        let before = bits(&big);
        let acc = big.narrow(0, 3, 4).unwrap();
        assert!(acc.is_contiguous());
        // g: rows 2..6 of another, so its start offset differs from acc's
        let g = tensor(8 * 37, 12, &[8, 37]).to_dtype(dtype).unwrap().narrow(0, 2, 4).unwrap();
        let want = (&acc + g.to_dtype(DType::F32).unwrap()).unwrap();
        add_into(&acc, &g).unwrap();
        assert_eq!(bits(&acc), bits(&want));
        // only rows 3..7 of the larger tensor changed, to the sum
        let after = bits(&big);
        assert_eq!(after[..3 * 37], before[..3 * 37]);
        assert_eq!(after[3 * 37..7 * 37], bits(&want)[..]);
        assert_eq!(after[7 * 37..], before[7 * 37..]);
    }
}

#[test]
fn a_strided_acc_is_refused_by_name() {
    let acc = tensor(6 * 8, 1, &[6, 8]).narrow(1, 2, 4).unwrap();
    let g = tensor(6 * 4, 2, &[6, 4]);
    assert!(matches!(check(&acc, &g), Err(AccumulateError::NotContiguous { .. })));
    let e = add_into(&acc, &g).unwrap_err().to_string();
    assert!(e.contains("not contiguous") && e.contains("[6, 4]") && e.contains("[8, 1]"), "{e}");
    let acc_t = tensor(6 * 8, 1, &[6, 8]).t().unwrap();
    let e = add_into(&acc_t, &tensor(48, 2, &[8, 6])).unwrap_err().to_string();
    assert!(e.contains("not contiguous"), "{e}");
}

#[test]
fn shape_mismatches_name_both_shapes() {
    let acc = tensor(6, 1, &[2, 3]);
    let g = tensor(6, 2, &[3, 2]);
    let before = bits(&acc);
    assert_eq!(check(&acc, &g), Err(AccumulateError::Shape { acc: (2, 3).into(), g: (3, 2).into() }));
    let e = add_into(&acc, &g).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = add_into(&acc, &tensor(5, 2, &[5])).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[5]"), "{e}");
    assert_eq!(bits(&acc), before, "a refused sum leaves acc as it was");
}

#[test]
fn dtypes_other_than_f32_acc_and_f32_or_bf16_g_are_named() {
    let acc = tensor(4, 1, &[4]);
    let g = tensor(4, 2, &[4]);
    let acc_bf16 = acc.to_dtype(DType::BF16).unwrap();
    assert_eq!(check(&acc_bf16, &g), Err(AccumulateError::AccDtype(DType::BF16)));
    let e = add_into(&acc_bf16, &g).unwrap_err().to_string();
    assert!(e.contains("acc is BF16") && e.contains("f32"), "{e}");
    for bad in [DType::F16, DType::F64, DType::U32] {
        assert_eq!(check(&acc, &g.to_dtype(bad).unwrap()), Err(AccumulateError::GradDtype(bad)));
        let e = add_into(&acc, &g.to_dtype(bad).unwrap()).unwrap_err().to_string();
        assert!(e.contains(&format!("g is {bad:?}")), "{e}");
    }
}

#[test]
fn a_gradient_sharing_the_accumulators_storage_is_refused() {
    let acc = tensor(8, 1, &[8]);
    let before = bits(&acc);
    assert!(add_into(&acc, &acc).is_err());
    assert!(add_into(&acc, &acc.clone()).is_err());
    assert_eq!(bits(&acc), before);
    // a strided view of acc's own storage is copied first (contiguous), so it is a distinct g
    let acc2 = tensor(16, 3, &[4, 4]);
    let g = acc2.t().unwrap();
    let want = (&acc2 + &g).unwrap();
    add_into(&acc2, &g).unwrap();
    assert_eq!(bits(&acc2), bits(&want));
}
