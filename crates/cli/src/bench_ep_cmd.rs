//! `lockstep launch --gpus W -- bench-ep`: expert parallelism over NCCL, timed on every rank
//! with CUDA events (median of `--iters` after `--warmup`, every iteration started together
//! behind a barrier):
//!
//! 1. dispatch (route host copy, order by owner, counts, ids, rows) and combine (rows back,
//!    weight, sum per token) of one MoE layer at T tokens per rank, forward, with the bytes they
//!    move and the achieved GB/s; beside a plain NCCL all-to-all (grouped ncclSend/ncclRecv,
//!    preallocated buffers) of exactly the same per-peer bytes, in the same process;
//! 2. one whole MoE layer (router → top-k → dispatch → experts → combine) forward + backward
//!    with EP = W on T tokens per rank, against the same layer with every expert on one GPU
//!    over the global batch (W·T tokens), run on each rank alone; and the EP output's error
//!    against that single-GPU output.
//!
//! Default shape: T 4096 per rank, H 2048, E 128, K 8, F 768 (Qwen3-30B-A3B's MoE layer), bf16.
//! GB/s counts the payload bytes a rank sends (rows × H × dtype size, ids excluded), the
//! rows it keeps included ("all") and without them ("off-rank").
#![allow(non_snake_case)] // shape-suffixed names (x_ND, token_A) as in lockstep-model

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchEpArgs {
    /// Tokens per rank.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    #[arg(long, default_value_t = 128)]
    pub experts: usize,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Expert FFN width.
    #[arg(long, default_value_t = 768)]
    pub ffn: usize,
    /// bf16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Write rank 0's records (with every rank's numbers) as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[cfg(not(feature = "nccl"))]
pub fn run(_: BenchEpArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-ep times expert parallelism over NCCL: build with `--features cuda,nccl` (scripts/cuda/build.sh) and run it under `lockstep launch`")
}

#[cfg(feature = "nccl")]
pub fn run(args: BenchEpArgs) -> anyhow::Result<()> {
    imp::run(args)
}

#[cfg(feature = "nccl")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Arc;

    use anyhow::{bail, Context};
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use lockstep_dist::nccl::NcclComm;
    use lockstep_dist::{Collective, ExpertParallelism};
    use lockstep_model::init::Preset;
    use lockstep_model::moe::MoeBlock;
    use lockstep_model::{Batch, ModelConfig, RouteMode};
    use serde_json::json;

    use super::BenchEpArgs;

    /// The MoE block of layer 0 with random weights (the same on every rank: seeded curand).
    fn block(cfg: &ModelConfig, dtype: DType, dev: &Device) -> anyhow::Result<MoeBlock> {
        let prefix = "model.layers.0.mlp.";
        let mut ws = HashMap::new();
        for (name, shape) in lockstep_model::checkpoint::tensor_specs(cfg) {
            if let Some(short) = name.strip_prefix(prefix) {
                let fan_in = *shape.last().unwrap_or(&1) as f64;
                ws.insert(short.to_string(), (Tensor::randn(0f32, 1f32, shape, dev)? * (1.0 / fan_in.sqrt()))?);
            }
        }
        let vb = VarBuilder::from_tensors(ws, dtype, dev);
        Ok(MoeBlock::new(&cfg.moe, cfg.hidden_size, vb)?)
    }

    struct Timer<'a> {
        dev: &'a Device,
        comm: &'a NcclComm,
        warmup: usize,
        iters: usize,
    }

    impl Timer<'_> {
        /// Median ms of `f` on this rank, every iteration behind a barrier.
        fn time<F: FnMut() -> anyhow::Result<()>>(&self, mut f: F) -> anyhow::Result<f64> {
            let stream = crate::gpu_timer::stream(self.dev)?;
            let one = Tensor::ones(1, DType::F32, self.dev)?;
            let mut ms = Vec::with_capacity(self.iters);
            for i in 0..self.warmup + self.iters {
                self.comm.all_reduce_sum(&one)?;
                stream.synchronize()?;
                let t = crate::gpu_timer::event_ms(&stream, &mut f)?;
                if i >= self.warmup {
                    ms.push(t);
                }
            }
            ms.sort_by(|a, b| a.total_cmp(b));
            Ok(ms[ms.len() / 2])
        }
    }

    /// Every rank's value, in rank order.
    fn gather(comm: &NcclComm, v: f64) -> anyhow::Result<Vec<f64>> {
        Ok(comm.all_gather_host(&[v])?.into_iter().map(|x| x[0]).collect())
    }

    fn fmt(v: &[f64], unit: &str) -> String {
        v.iter().map(|x| format!("{x:.3}{unit}")).collect::<Vec<_>>().join(" / ")
    }

    /// Layer forward + backward: the loss Σ out·g reaches x, the router and the experts.
    fn fwd_bwd(b: &MoeBlock, x: &Var, g: &Tensor, batch: &Batch) -> anyhow::Result<Tensor> {
        let (out, _) = b.forward(x.as_tensor(), &RouteMode::Compute, 0, batch)?;
        let loss = (out.to_dtype(DType::F32)? * g)?.sum_all()?;
        let grads = loss.backward()?;
        grads.get(x.as_tensor()).cloned().context("no gradient reached x")?;
        Ok(out)
    }

    pub fn run(args: BenchEpArgs) -> anyhow::Result<()> {
        let env = lockstep_dist::launch_env::RankEnv::from_env()?
            .context("bench-ep runs under `lockstep launch --gpus W -- bench-ep` (W = 1 is allowed)")?;
        let dtype = crate::args::dtype(&args.dtype)?;
        if args.iters == 0 {
            bail!("--iters: at least 1");
        }
        let (comm, dev) = NcclComm::init(&env).context("joining the NCCL process group")?;
        let comm = Arc::new(comm);
        let (w, rank) = (env.world_size, env.rank);
        let cfg = Preset::MoeLayer { hidden: args.hidden, ffn: args.ffn, experts: args.experts, top_k: args.top_k }.config()?;
        if args.experts % w != 0 {
            bail!("--experts {}: not divisible by the {w} ranks", args.experts);
        }
        let t = args.tokens;
        let (h, e, k, f) = (args.hidden, args.experts, args.top_k, args.ffn);
        let elt = dtype.size_in_bytes();
        dev.set_seed(1234)?;
        let full = block(&cfg, dtype, &dev)?;
        // every rank's tokens (seeded), so each rank can also run the global batch alone
        let xs: Vec<Tensor> = (0..w)
            .map(|r| {
                dev.set_seed(99 + r as u64)?;
                Tensor::randn(0f32, 1f32, (t, h), &dev)?.to_dtype(dtype)
            })
            .collect::<candle_core::Result<_>>()?;
        dev.set_seed(7)?;
        let g_all = Tensor::randn(0f32, 1f32, (w * t, h), &dev)?;
        let timer = Timer { dev: &dev, comm: &comm, warmup: args.warmup, iters: args.iters };
        let ep = ExpertParallelism { comm: comm.clone() as Arc<dyn Collective>, num_experts: e };
        let mut sharded = full.clone();
        lockstep_dist::dp::shard_block(&mut sharded, Arc::new(ep.clone()), rank, w).map_err(anyhow::Error::msg)?;
        let rows = |n: usize| Batch::padded(&vec![vec![0u32; n]], &[vec![1u8; n]], &dev);
        let (batch_rank, batch_all) = (rows(t)?, rows(w * t)?);
        let mut records = Vec::new();
        if rank == 0 {
            crate::out::say!(
                "lockstep bench-ep: {w} rank(s), NCCL; T {t} tokens per rank, H {h}, E {e} ({} per rank), K {k}, F {f}, {dtype:?}; median of {} after {} warm-up",
                e / w, args.iters, args.warmup
            );
        }

        // 1. dispatch / combine beside plain NCCL
        let x = &xs[rank];
        let (_, route) = sharded.forward(x, &RouteMode::Record, 0, &batch_rank)?;
        let d = ep.dispatch(0, x, &route.token_A, &route.expert_A, sharded.experts.backend())?;
        let y_RD = ep.experts(&d, &sharded.experts)?;
        let t_dispatch = timer.time(|| ep.dispatch(0, x, &route.token_A, &route.expert_A, sharded.experts.backend()).map(|_| ()).map_err(Into::into))?;
        let t_combine = timer.time(|| ep.combine(&d, &y_RD, &route.weight_A).map(|_| ()).map_err(Into::into))?;
        let row = h * elt;
        let sent: usize = d.send_rows.iter().sum::<usize>() * row;
        let off_rank: usize = d.send_rows.iter().enumerate().filter(|(p, _)| *p != rank).map(|(_, r)| r * row).sum();
        let received: usize = d.recv_rows.iter().sum::<usize>() * row;
        let send_b: Vec<usize> = d.send_rows.iter().map(|r| r * row).collect();
        let recv_b: Vec<usize> = d.recv_rows.iter().map(|r| r * row).collect();
        let sbuf = Tensor::zeros(sent / elt, dtype, &dev)?;
        let rbuf = Tensor::zeros(received.max(elt) / elt, dtype, &dev)?;
        let t_plain = timer.time(|| comm.all_to_all_bytes(&sbuf, &send_b, &rbuf, &recv_b).map_err(Into::into))?;
        // combine sends back what dispatch received
        let t_plain_back = timer.time(|| comm.all_to_all_bytes(&rbuf, &recv_b, &sbuf, &send_b).map_err(Into::into))?;
        let gbs = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
        let comb_sent = received;
        let comb_off: usize = d.recv_rows.iter().enumerate().filter(|(p, _)| *p != rank).map(|(_, r)| r * row).sum();
        let vals = [
            ("dispatch_ms", t_dispatch),
            ("dispatch_GBps_all", gbs(sent, t_dispatch)),
            ("dispatch_GBps_off_rank", gbs(off_rank, t_dispatch)),
            ("nccl_a2a_dispatch_bytes_ms", t_plain),
            ("nccl_a2a_dispatch_bytes_GBps_all", gbs(sent, t_plain)),
            ("nccl_a2a_dispatch_bytes_GBps_off_rank", gbs(off_rank, t_plain)),
            ("combine_ms", t_combine),
            ("combine_GBps_all", gbs(comb_sent, t_combine)),
            ("combine_GBps_off_rank", gbs(comb_off, t_combine)),
            ("nccl_a2a_combine_bytes_ms", t_plain_back),
            ("nccl_a2a_combine_bytes_GBps_all", gbs(comb_sent, t_plain_back)),
            ("nccl_a2a_combine_bytes_GBps_off_rank", gbs(comb_off, t_plain_back)),
            ("dispatch_bytes_sent_all", sent as f64),
            ("dispatch_bytes_sent_off_rank", off_rank as f64),
        ];
        // where the dispatch time goes (each step alone, same inputs)
        let groups = lockstep_model::gpu::RowGroups::new(&route.token_A, &route.expert_A, t, e)?;
        let x_AD = groups.gather(x)?;
        let counts_E = groups.counts()?.to_vec();
        let stages = [
            ("plan (expert counts to host)", timer.time(|| lockstep_model::gpu::RowGroups::new(&route.token_A, &route.expert_A, t, e).and_then(|g| g.counts().map(|_| ())).map_err(Into::into))?),
            ("gather rows", timer.time(|| groups.gather(x).map(|_| ()).map_err(Into::into))?),
            ("exchange counts", timer.time(|| comm.exchange_counts(&counts_E).map(|_| ()).map_err(Into::into))?),
            ("rows all-to-all", timer.time(|| comm.all_to_all_rows(&x_AD, &d.send_rows, &d.recv_rows).map(|_| ()).map_err(Into::into))?),
            ("experts (rows)", timer.time(|| ep.experts(&d, &sharded.experts).map(|_| ()).map_err(Into::into))?),
        ];
        let mut stage_ms = Vec::new();
        for (name, ms) in stages {
            stage_ms.push((name, gather(&comm, ms)?));
        }
        if rank == 0 {
            crate::out::say!("dispatch steps alone (ms per rank): {}", stage_ms.iter().map(|(n, v)| format!("{n} {}", fmt(v, ""))).collect::<Vec<_>>().join(", "));
        }
        let mut all = HashMap::new();
        for (name, v) in vals {
            all.insert(name, gather(&comm, v)?);
        }
        if rank == 0 {
            let p = |name: &str| fmt(&all[name], "");
            crate::out::say!("per rank (rank 0 / rank 1 / ...):");
            crate::out::say!("  bytes dispatched: {} all, {} off-rank", p("dispatch_bytes_sent_all"), p("dispatch_bytes_sent_off_rank"));
            crate::out::say!("  dispatch  {} ms   {} GB/s all   {} GB/s off-rank", p("dispatch_ms"), p("dispatch_GBps_all"), p("dispatch_GBps_off_rank"));
            crate::out::say!("  NCCL a2a  {} ms   {} GB/s all   {} GB/s off-rank   (same bytes as dispatch)", p("nccl_a2a_dispatch_bytes_ms"), p("nccl_a2a_dispatch_bytes_GBps_all"), p("nccl_a2a_dispatch_bytes_GBps_off_rank"));
            crate::out::say!("  combine   {} ms   {} GB/s all   {} GB/s off-rank", p("combine_ms"), p("combine_GBps_all"), p("combine_GBps_off_rank"));
            crate::out::say!("  NCCL a2a  {} ms   {} GB/s all   {} GB/s off-rank   (same bytes as combine)", p("nccl_a2a_combine_bytes_ms"), p("nccl_a2a_combine_bytes_GBps_all"), p("nccl_a2a_combine_bytes_GBps_off_rank"));
            records.push(json!({"kind": "dispatch_combine", "world": w, "T": t, "H": h, "E": e, "K": k, "dtype": args.dtype,
                "per_rank": all.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()}));
        }

        // 2. the whole layer, forward + backward: EP = W on T per rank vs one GPU on W·T
        let x_rank = Var::from_tensor(x)?;
        let g_rank = g_all.narrow(0, rank * t, t)?;
        let x_all = Var::from_tensor(&Tensor::cat(&xs, 0)?)?;
        let out_ep = fwd_bwd(&sharded, &x_rank, &g_rank, &batch_rank)?;
        let out_one = fwd_bwd(&full, &x_all, &g_all, &batch_all)?;
        let err = lockstep_dist::check::rel(&out_ep, &out_one.narrow(0, rank * t, t)?)?;
        let t_ep = timer.time(|| fwd_bwd(&sharded, &x_rank, &g_rank, &batch_rank).map(|_| ()))?;
        let t_one = timer.time(|| fwd_bwd(&full, &x_all, &g_all, &batch_all).map(|_| ()))?;
        let flops_one = 18.0 * (w * t * k * h * f) as f64; // expert GEMMs only
        let (ep_all, one_all, err_all) = (gather(&comm, t_ep)?, gather(&comm, t_one)?, gather(&comm, err)?);
        if rank == 0 {
            let ep_max = ep_all.iter().cloned().fold(0.0, f64::max);
            let one_med = one_all[0];
            crate::out::say!("MoE layer fwd+bwd (router, top-k, dispatch, experts, combine):");
            crate::out::say!("  EP={w}, {t} tokens per rank:    {} ms per rank (slowest {ep_max:.3} ms)", fmt(&ep_all, ""));
            crate::out::say!("  1 GPU, all {e} experts, {} tokens: {one_med:.3} ms (each rank alone: {} ms)", w * t, fmt(&one_all, ""));
            crate::out::say!("  global batch per second: EP={w} {:.0} tokens/s, 1 GPU {:.0} tokens/s ({:.2}x); expert-GEMM TFLOP/s 1 GPU {:.0}",
                (w * t) as f64 / (ep_max * 1e-3), (w * t) as f64 / (one_med * 1e-3), one_med / ep_max, flops_one / (one_med * 1e-3) / 1e12);
            crate::out::say!("  EP output vs 1-GPU output, max|Δ|/max|ref| per rank: {}", err_all.iter().map(|x| format!("{x:.2e}")).collect::<Vec<_>>().join(" / "));
            records.push(json!({"kind": "layer_fwd_bwd", "world": w, "T_per_rank": t, "H": h, "E": e, "K": k, "F": f, "dtype": args.dtype,
                "ep_ms_per_rank": ep_all, "one_gpu_ms_per_rank": one_all, "ep_vs_one_rel_err": err_all}));
            if let Some(p) = &args.json {
                std::fs::write(p, serde_json::to_string_pretty(&records)?).with_context(|| format!("--json {}", p.display()))?;
            }
        }
        Ok(())
    }
}
