//! Forward throughput on the embedded default model: tokens/s for compute vs record vs replay
//! (recomputed and given weights), CPU f32, both kernel sets. Run:
//! `cargo bench -p lockstep-model --bench forward` (median of 10 runs after 2 warm-ups).

use std::time::Instant;

use candle_core::{DType, Device};
use lockstep_model::{Batch, Kernels, MoeCausalLm, RoutingPlan};

fn median_secs(mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut times: Vec<f64> = (0..10)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    let dev = Device::Cpu;
    let (rows, len) = (8usize, 256usize);
    let seqs: Vec<Vec<u32>> = (0..rows).map(|r| (0..len).map(|i| ((i * 37 + r * 101) % 256) as u32).collect()).collect();
    let batch = Batch::from_sequences(&seqs, 0, &dev).unwrap();
    let tokens = (rows * len) as f64;
    println!("embedded default, batch {rows} x {len} tokens, CPU f32, threads {}", candle_core::utils::get_num_threads());
    for kernels in [Kernels::Autograd, Kernels::Inference] {
        let mut model = MoeCausalLm::embedded_default(0, DType::F32, &dev).unwrap();
        model.set_kernels(kernels);
        let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
        let plans = [
            ("compute", RoutingPlan::compute()),
            ("record", RoutingPlan::record()),
            ("replay (recompute weights)", RoutingPlan::replay(&rec.routes, true).unwrap()),
            ("replay (given weights)", RoutingPlan::replay(&rec.routes, false).unwrap()),
        ];
        for (name, plan) in plans {
            let s = median_secs(|| {
                model.forward(&batch, &plan).unwrap();
            });
            println!("{kernels:?} {name:<28} {:>9.0} tokens/s  ({:.2} ms / forward)", tokens / s, s * 1e3);
        }
    }
}
