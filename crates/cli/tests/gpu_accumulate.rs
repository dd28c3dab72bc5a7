//! The in-place f32 gradient sum on CUDA (`crates/model/src/gpu/accumulate.cu`, through
//! `lockstep_model::accumulate::add_into`): the bits of `acc + g.to_dtype(F32)` for f32 and bf16
//! gradients, on the vector path (acc and g equally aligned) and the scalar one (not), at start
//! offsets into larger tensors, and past 2³¹ elements.
//!
//! (In the cli crate so that it builds with the binary's exact features: no second CUDA kernel
//! build.) Needs the `cuda` feature and a GPU: built by `scripts/cuda/build.sh`, run on the GPU
//! machine by `scripts/cuda/gpu_check.sh`. Without the feature this file compiles to nothing.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use lockstep_model::accumulate::add_into;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test runs on the GPU machine)")
}

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// `[at, at + len)` of a flat tensor, on the host
fn window(t: &Tensor, at: usize, len: usize) -> Tensor {
    t.narrow(0, at, len).unwrap().to_device(&Device::Cpu).unwrap()
}

#[test]
fn accumulate_in_place_equals_add_on_the_gpu() {
    let dev = gpu();
    // 10⁷ + 3 elements: a ragged end after the float4 steps
    let n = 10_000_003;
    for dtype in [DType::F32, DType::BF16] {
        let acc = randn(&[n], 1, &dev);
        let g = randn(&[n], 2, &dev).to_dtype(dtype).unwrap();
        let want = (&acc + g.to_dtype(DType::F32).unwrap()).unwrap();
        add_into(&acc, &g).unwrap();
        assert_eq!(bits(&acc), bits(&want), "{n} elements, g {dtype:?}");
        // a second micro-batch into the same accumulator, g at a start offset this time
        let g2 = randn(&[n + 5], 3, &dev).to_dtype(dtype).unwrap().narrow(0, 5, n).unwrap();
        // a strided (transposed) g
        let gt = randn(&[1000, 1001], 4, &dev).to_dtype(dtype).unwrap().t().unwrap();
        let acc_t = randn(&[1001, 1000], 5, &dev);
        let want_t = (&acc_t + gt.to_dtype(DType::F32).unwrap()).unwrap();
        add_into(&acc_t, &gt).unwrap();
        assert_eq!(bits(&acc_t), bits(&want_t), "transposed g {dtype:?}");
        let want = (&acc + g2.to_dtype(DType::F32).unwrap()).unwrap();
        add_into(&acc, &g2).unwrap();
        assert_eq!(bits(&acc), bits(&want), "second sum, g {dtype:?}");
    }

    // start offsets: acc a narrow of a larger tensor at offsets of every misalignment within a
    // float4, g a narrow at equal (vector path) and other (scalar path) misalignments; the rest
    // of the larger tensor stays as it was
    let (len, base) = (1_000_003, 3_000_000);
    let big_g = randn(&[2 * base], 7, &dev);
    let big_src = randn(&[2 * base], 6, &dev);
    let before = bits(&big_src);
    for dtype in [DType::F32, DType::BF16] {
        let big_g = big_g.to_dtype(dtype).unwrap();
        for off_a in [0, 1, 2, 3] {
            for off_g in [0, 1, 3] {
                let big = big_src.copy().unwrap();
                let at = base + off_a;
                let acc = big.narrow(0, at, len).unwrap();
                let g = big_g.narrow(0, base / 2 + off_g, len).unwrap();
                let want = (&acc + g.to_dtype(DType::F32).unwrap()).unwrap();
                add_into(&acc, &g).unwrap();
                let after = bits(&big);
                let what = format!("acc at {at}, g at {}, g {dtype:?}", base / 2 + off_g);
                assert_eq!(after[at..at + len], bits(&want)[..], "{what}");
                assert_eq!(after[..at], before[..at], "{what}: below acc");
                assert_eq!(after[at + len..], before[at + len..], "{what}: above acc");
            }
        }
    }

    // past 2³¹ elements (size_t indices; ≈ 13 GB of acc and bf16 g): windows at the start,
    // across 2³¹ and at the end against the host's f32 add of the same values
    let huge = (1usize << 31) + 4099;
    let acc = Tensor::rand(0f32, 1f32, huge, &dev).unwrap();
    let g = Tensor::rand(0f32, 1f32, huge, &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let spots = [(0, 4096), ((1 << 31) - 2048, 4096), (huge - 4096, 4096)];
    let want: Vec<Tensor> = spots.iter().map(|&(at, w)| (window(&acc, at, w) + window(&g, at, w).to_dtype(DType::F32).unwrap()).unwrap()).collect();
    add_into(&acc, &g).unwrap();
    for (&(at, w), want) in spots.iter().zip(&want) {
        assert_eq!(bits(&window(&acc, at, w)), bits(want), "{huge} elements, window at {at}");
    }
}
