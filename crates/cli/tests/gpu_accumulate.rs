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

/// The fused in-place AdamW update on CUDA (`crates/model/src/gpu/adamw.cu`, through
/// `StepHyper::apply`) has the bits of the composed candle ops (`StepHyper::update`) on the GPU
/// and on the CPU, over three steps, clipped and not, with and without weight decay; and
/// `AdamW::update_param` writes a bf16 parameter as its f32 master rounded.
#[test]
fn fused_adamw_equals_the_composed_ops_on_the_gpu() {
    use candle_core::Var;
    use lockstep_trainer::optim::{AdamW, AdamWConfig, StepHyper};
    let dev = gpu();
    let n = 3_000_017;
    for (scale, wd) in [(1.0, 0.0), (0.41, 0.01)] {
        let theta0 = randn(&[n], 1, &dev);
        let (mut t_gpu, mut m_gpu, mut v_gpu) = (theta0.clone(), None::<Tensor>, None::<Tensor>);
        let (mut t_cpu, mut m_cpu, mut v_cpu) = (theta0.to_device(&Device::Cpu).unwrap(), None::<Tensor>, None::<Tensor>);
        let fused = theta0.copy().unwrap();
        let (mut m_f, mut v_f) = (None, None);
        for step in 1..=3 {
            let g = (randn(&[n], 10 + step as u64, &dev) * 4.0).unwrap();
            let (b1, b2) = (0.9f64, 0.999f64);
            let h = StepHyper { scale, lr: 1e-3, beta1: b1, beta2: b2, c1: 1.0 - b1.powi(step), c2: 1.0 - b2.powi(step), eps: 1e-8, weight_decay: wd };
            let (a, b, c) = h.update(&t_gpu, &g, m_gpu.as_ref(), v_gpu.as_ref()).unwrap();
            (t_gpu, m_gpu, v_gpu) = (a, Some(b), Some(c));
            let (a, b, c) = h.update(&t_cpu, &g.to_device(&Device::Cpu).unwrap(), m_cpu.as_ref(), v_cpu.as_ref()).unwrap();
            (t_cpu, m_cpu, v_cpu) = (a, Some(b), Some(c));
            let (a, b) = h.apply(&fused, &g, m_f.take(), v_f.take()).unwrap();
            (m_f, v_f) = (Some(a), Some(b));
            let fb = bits(&fused);
            assert_eq!(fb, bits(&t_gpu), "scale {scale} wd {wd} step {step}: theta vs the composed GPU ops");
            assert_eq!(fb, bits(&t_cpu), "scale {scale} wd {wd} step {step}: theta vs the composed CPU ops");
            assert_eq!(bits(m_f.as_ref().unwrap()), bits(m_cpu.as_ref().unwrap()), "step {step}: m");
            assert_eq!(bits(v_f.as_ref().unwrap()), bits(v_cpu.as_ref().unwrap()), "step {step}: v");
        }
    }
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let w32 = randn(&[n], 3, &dev);
    let var = Var::from_tensor(&w32.to_dtype(DType::BF16).unwrap()).unwrap();
    opt.master.insert("w".into(), w32.copy().unwrap());
    let h = opt.begin_step(1.0);
    let g = randn(&[n], 4, &dev);
    let (want, _, _) = h.update(&w32, &g, None, None).unwrap();
    opt.update_param("w", &var, &g, &h).unwrap();
    assert_eq!(bits(&opt.master["w"]), bits(&want));
    assert_eq!(bits(var.as_tensor()), bits(&want.to_dtype(DType::BF16).unwrap()));
}
