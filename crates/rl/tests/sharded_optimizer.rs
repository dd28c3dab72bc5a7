//! The sharded optimizer state (`TrainerConfig::shard_optimizer`, `lockstep_trainer::zero`)
//! over thread ranks: W ranks with it equal W ranks without (bitwise without clipping, to the
//! rounding of the clip factor with it) and one rank (summation order), f32 and bf16 (f32
//! masters), the replicated weights bitwise the same on every rank after every step; each
//! rank holds ≈ 1/W of the replicated state; a sharded checkpoint is an ordinary one (bitwise
//! the unsharded run's) and resumes on 2 ranks bit for bit, on 1 rank (unsharded) and on 4
//! (sharded) to 1e-4; and the option is a no-op on one rank.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use lockstep_dist::{run_threads, RankGroup};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::loss::{LossConfig, Objective};
use lockstep_trainer::optim::{AdamWConfig, Schedule};
use lockstep_trainer::parallel::DataParallel;
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};
use lockstep_trainer::TrainError;

/// Four micro-batches (two packed sequences each, distinct tokens), routes recorded from the
/// initial model.
fn micro_batches(model: &MoeCausalLm) -> Vec<TrainBatch> {
    (0..4u32)
        .map(|k| {
            let seqs: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 11 + 5 + 7 * k) % 256).collect(), (0..9).map(|i| (i * 17 + 2 + 13 * k) % 256).collect()];
            let tokens: Vec<u32> = seqs.concat();
            let cu = vec![0, 12, 21];
            let batch = Batch::packed(&tokens, None, &cu, &Device::Cpu).unwrap();
            let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
            let (logp, _) = token_logprobs(&rec.logits, &batch).unwrap();
            let mut mask = vec![0f32; tokens.len()];
            let mut adv = vec![0f32; tokens.len()];
            for (s, w) in cu.windows(2).enumerate() {
                for i in w[0] + 3..w[1] {
                    mask[i] = 1.0;
                    adv[i] = if (s + k as usize) % 2 == 0 { 1.0 } else { -0.5 };
                }
            }
            TrainBatch {
                batch,
                logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(),
                advantages: adv,
                loss_mask: mask,
                routes: replay_from_recording(&rec.routes).unwrap(),
                old: None,
            }
        })
        .collect()
}

fn model() -> MoeCausalLm {
    MoeCausalLm::embedded_default(3, DType::F32, &Device::Cpu).unwrap()
}

/// A clip of 0.05 is active at every step here (the test checks the norms); `None`: no clip.
fn cfg(dtype: DType, shard: bool, clip: Option<f64>) -> TrainerConfig {
    TrainerConfig {
        loss: LossConfig { objective: Objective::PolicyGradient, ..LossConfig::default() },
        optimizer: AdamWConfig { lr: 1e-3, warmup_steps: 2, schedule: Schedule::Cosine { total_steps: 20, min_lr_ratio: 0.1 }, weight_decay: 0.01, max_grad_norm: clip, ..AdamWConfig::default() },
        dtype,
        shard_optimizer: shard,
        ..TrainerConfig::default()
    }
}

const CLIP: Option<f64> = Some(0.05);

#[derive(Debug, Clone, Default)]
struct Out {
    losses: Vec<f64>,
    norms: Vec<f64>,
    /// per step: a hash of every replicated parameter's bits (must agree across the ranks)
    replicated: Vec<Vec<u64>>,
    /// the whole f32 (master) model after the last step
    whole: Vec<(String, Vec<f32>)>,
    /// elements of this rank's optimizer state: (replicated parameters', experts')
    state: (usize, usize),
    replicated_params: usize,
    /// Σ ⌈n / W⌉ over the replicated parameters
    owned: usize,
    /// replicated parameters (tensors)
    replicated_tensors: usize,
}

fn hash(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3))
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn is_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// `steps` steps of `t` on its share of `micro`, then (optionally) a save into `save`.
fn drive(t: &mut Trainer, micro: &[TrainBatch], steps: usize, save: Option<&Path>) -> Result<Out, TrainError> {
    let (w, r) = t.parallel.as_ref().map_or((1, 0), |dp| (dp.world_size(), dp.rank()));
    let share = &micro[r * micro.len() / w..(r + 1) * micro.len() / w];
    let mut out = Out::default();
    for _ in 0..steps {
        // RL steps (policy gradient: no clip range to leave) and, every third update, a
        // supervised one
        let (loss, norm, skipped) = if t.optimizer.step % 3 == 2 {
            let m = t.sft_step_checked(share)?;
            (m.loss, m.grad_norm, m.skipped_nonfinite)
        } else {
            let m = t.step(share)?;
            (m.loss, m.grad_norm, m.skipped_nonfinite)
        };
        assert!(!skipped);
        out.losses.push(loss);
        out.norms.push(norm);
        out.replicated.push(t.params.iter().filter(|(n, _)| !is_expert(n)).map(|(_, v)| hash(&flat(v.as_tensor()))).collect());
    }
    let whole = match t.parallel.clone() {
        Some(dp) => t.whole_model(dp.as_ref())?,
        None => t.master_model()?,
    };
    out.whole = whole.named_params()?.iter().map(|(n, x)| (n.clone(), flat(x))).collect();
    let count = |m: &std::collections::HashMap<String, candle_core::Tensor>, expert: bool| m.iter().filter(|(n, _)| is_expert(n) == expert).map(|(_, x)| x.elem_count()).sum::<usize>();
    let o = &t.optimizer;
    let zero = t.zero_state().map_or(0, |z| z.elements());
    out.state = (count(&o.m, false) + count(&o.v, false) + count(&o.master, false) + zero, count(&o.m, true) + count(&o.v, true) + count(&o.master, true));
    out.replicated_params = t.params.iter().filter(|(n, _)| !is_expert(n)).map(|(_, v)| v.elem_count()).sum();
    out.owned = t.params.iter().filter(|(n, _)| !is_expert(n)).map(|(_, v)| v.elem_count().div_ceil(w)).sum();
    out.replicated_tensors = t.params.iter().filter(|(n, _)| !is_expert(n)).count();
    if let Some(dir) = save {
        t.save(dir)?;
    }
    Ok(out)
}

/// Every rank's output of `steps` steps on `world` thread ranks (0: one plain trainer, no
/// ranks), from a fresh model or resuming `resume`.
fn run(world: usize, c: TrainerConfig, steps: usize, resume: Option<&Path>, save: Option<&Path>) -> Vec<Out> {
    let micro = micro_batches(&model());
    if world == 0 {
        let mut t = match resume {
            Some(d) => Trainer::resume(d, c, &Device::Cpu).unwrap(),
            None => Trainer::new(model(), c).unwrap(),
        };
        return vec![drive(&mut t, &micro, steps, save).unwrap()];
    }
    run_threads(world, |comm| {
        let dp: Arc<dyn DataParallel> = Arc::new(RankGroup::new(Arc::new(comm)));
        let mut t = match resume {
            Some(d) => Trainer::resume_parallel(d, c, &Device::Cpu, dp)?,
            None => Trainer::new_parallel(model(), c, dp)?,
        };
        drive(&mut t, &micro, steps, save)
    })
    .unwrap()
}

/// Another rank count sums the gradients in another order: f32 weights part by ~1e-7 a step
/// and losses stay within 1e-4; in bf16 that flips the rounding of some bf16 weights, which
/// moves the next losses by up to ~1e-3 (bf16's resolution is 2⁻⁸) — as much without sharding
/// (checked), so the bf16 yardstick is bf16's own.
fn one_rank_tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-4
    } else {
        5e-3
    }
}

/// Weights (f32 masters) relative to each parameter's largest: in bf16 the masters follow
/// gradients taken at bf16 weights that differ by an ulp here and there (~1e-2 after 3 steps).
fn weights_tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        2e-5
    } else {
        2e-2
    }
}

fn close(a: f64, b: f64, what: &str) {
    close_to(a, b, 1e-4, what)
}

fn close_to(a: f64, b: f64, tol: f64, what: &str) {
    let d = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
    println!("{what}: {a} vs {b} (rel {d:e})");
    assert!(d <= tol, "{what}: {a} vs {b}");
}

/// max over parameters of max |a − b| / max |b|.
fn weights_rel(a: &Out, b: &Out) -> f64 {
    assert_eq!(a.whole.len(), b.whole.len());
    a.whole
        .iter()
        .zip(&b.whole)
        .map(|((n, x), (m, y))| {
            assert_eq!((n, x.len()), (m, y.len()));
            let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            let s = y.iter().map(|q| q.abs()).fold(0f32, f32::max).max(1e-12);
            (d / s) as f64
        })
        .fold(0.0, f64::max)
}

fn same_bits(a: &Out, b: &Out) -> bool {
    a.whole.iter().zip(&b.whole).all(|((n, x), (m, y))| n == m && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

/// The replicated weights of every rank agree bitwise after every step.
fn replicated_agree(outs: &[Out], what: &str) {
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.replicated, outs[0].replicated, "{what}: rank {r}'s replicated weights differ from rank 0's");
    }
}

#[test]
fn sharded_ranks_equal_unsharded_ranks_and_one_rank() {
    for dtype in [DType::F32, DType::BF16] {
        let one = run(0, cfg(dtype, false, CLIP), 3, None, None).remove(0);
        assert!(one.norms.iter().all(|&n| n > 0.05), "the clip must be active: {:?}", one.norms);
        for world in [2, 4] {
            let what = format!("{dtype:?} W={world}");
            let plain = run(world, cfg(dtype, false, CLIP), 3, None, None);
            let sharded = run(world, cfg(dtype, true, CLIP), 3, None, None);
            replicated_agree(&sharded, &what);
            replicated_agree(&plain, &what);
            let (s, p) = (&sharded[0], &plain[0]);
            // the first step's norm: the same squares summed in another order
            assert!((s.norms[0] - p.norms[0]).abs() <= 1e-12 * p.norms[0], "{what}: norm {} vs {}", s.norms[0], p.norms[0]);
            for i in 0..3 {
                close(s.losses[i], p.losses[i], &format!("{what} step {} loss vs unsharded", i + 1));
                close_to(s.losses[i], one.losses[i], one_rank_tol(dtype), &format!("{what} step {} loss vs one rank", i + 1));
                close_to(s.norms[i], one.norms[i], one_rank_tol(dtype), &format!("{what} step {} grad norm vs one rank", i + 1));
                close(s.norms[i], p.norms[i], &format!("{what} step {} grad norm vs unsharded", i + 1));
            }
            let (vs_plain, vs_one) = (weights_rel(s, p), weights_rel(s, &one));
            println!("{what}: weights vs unsharded {vs_plain:e}, vs one rank {vs_one:e}; losses {:?}", s.losses);
            assert!(vs_plain <= 1e-6, "{what}: weights vs unsharded {vs_plain:e}");
            assert!(vs_one <= weights_tol(dtype), "{what}: weights vs one rank {vs_one:e}");
            // the unsharded W ranks are as far from one rank
            assert!((weights_rel(p, &one) - vs_one).abs() <= 1e-6, "{what}");
        }
    }
}

#[test]
fn without_clipping_sharding_is_bitwise_and_saves_the_same_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (a, b) = (dir.path().join(format!("plain-{dtype:?}")), dir.path().join(format!("sharded-{dtype:?}")));
        let plain = run(2, cfg(dtype, false, None), 3, None, Some(&a));
        let sharded = run(2, cfg(dtype, true, None), 3, None, Some(&b));
        replicated_agree(&sharded, "sharded");
        assert_eq!(sharded[0].losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), plain[0].losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{dtype:?}");
        assert_eq!(sharded[0].replicated, plain[0].replicated, "{dtype:?}: replicated weights");
        assert!(same_bits(&sharded[0], &plain[0]), "{dtype:?}: whole weights");
        for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
            assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{dtype:?}: {f} differs");
        }
    }
}

#[test]
fn a_sharded_checkpoint_resumes_on_two_ranks_bit_for_bit_and_on_one_and_four() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let straight = run(2, cfg(dtype, true, CLIP), 4, None, None).remove(0);
        let ck = dir.path().join(format!("step-2-{dtype:?}"));
        run(2, cfg(dtype, true, CLIP), 2, None, Some(&ck));
        let two = run(2, cfg(dtype, true, CLIP), 2, Some(&ck), None);
        replicated_agree(&two, "resumed on 2");
        assert_eq!(two[0].losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), straight.losses[2..].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{dtype:?}");
        assert!(same_bits(&two[0], &straight), "{dtype:?}: resumed on 2 ranks, weights");
        let one = run(0, cfg(dtype, false, CLIP), 2, Some(&ck), None).remove(0);
        let four = run(4, cfg(dtype, true, CLIP), 2, Some(&ck), None);
        replicated_agree(&four, "resumed on 4");
        for (o, what) in [(&one, "one rank"), (&four[0], "four ranks")] {
            for i in 0..2 {
                close_to(o.losses[i], straight.losses[2 + i], one_rank_tol(dtype), &format!("{dtype:?} resumed on {what}: step {} loss", 3 + i));
            }
            let rel = weights_rel(o, &straight);
            println!("{dtype:?} resumed on {what}: weights {rel:e}");
            assert!(rel <= weights_tol(dtype), "{dtype:?} resumed on {what}: weights {rel:e}");
        }
    }
}

#[test]
fn each_rank_holds_its_slice_of_the_replicated_state() {
    for dtype in [DType::F32, DType::BF16] {
        // m and v, and the f32 master of a bf16 parameter
        let per = if dtype == DType::F32 { 2 } else { 3 };
        let plain = run(2, cfg(dtype, false, CLIP), 1, None, None);
        assert_eq!(plain[0].state.0, per * plain[0].replicated_params);
        for world in [2, 4] {
            for (r, o) in run(world, cfg(dtype, true, CLIP), 1, None, None).iter().enumerate() {
                // ⌈n / W⌉ of each parameter: at most W − 1 padding elements per parameter
                assert_eq!(o.state.0, per * o.owned, "{dtype:?} W={world} rank {r}");
                assert!(o.owned * world >= o.replicated_params && o.owned * world < o.replicated_params + world * o.replicated_tensors, "{dtype:?} W={world}");
                println!("{dtype:?} W={world} rank {r}: replicated state {} elements, unsharded {}", o.state.0, plain[0].state.0);
                // the experts' state is the rank's own, as without sharding
                assert_eq!(o.state.1 * world, plain[0].state.1 * 2, "{dtype:?} W={world} rank {r}: expert state");
            }
        }
    }
}

#[test]
fn the_option_is_a_no_op_on_one_rank_and_the_plan_shows_the_slices() {
    let micro = micro_batches(&model());
    let mut a = Trainer::new(model(), cfg(DType::BF16, false, CLIP)).unwrap();
    let mut b = Trainer::new(model(), cfg(DType::BF16, true, CLIP)).unwrap();
    for _ in 0..2 {
        assert_eq!(a.step(&micro).unwrap().loss.to_bits(), b.step(&micro).unwrap().loss.to_bits());
    }
    assert!(b.zero_state().is_none());
    assert_eq!(a.memory_plan(1024), b.memory_plan(1024));
    // one thread rank: nothing sharded either
    let solo = run_threads(1, |comm| {
        let t = Trainer::new_parallel(model(), cfg(DType::BF16, true, CLIP), Arc::new(RankGroup::new(Arc::new(comm))))?;
        Ok::<_, TrainError>((t.zero_state().is_none(), t.memory_plan(1024).state_ranks))
    })
    .unwrap();
    assert_eq!(solo, vec![(true, 1)]);
    // two ranks: the plan counts this rank's slices
    let plan = |shard: bool| {
        run_threads(2, |comm| Ok::<_, TrainError>(Trainer::new_parallel(model(), cfg(DType::BF16, shard, CLIP), Arc::new(RankGroup::new(Arc::new(comm))))?.memory_plan(1024)))
            .unwrap()
            .remove(0)
    };
    let (p, u) = (plan(true), plan(false));
    assert_eq!((p.state_ranks, u.state_ranks), (2, 1));
    assert_eq!((p.parameters, p.weights, p.gradients), (u.parameters, u.weights, u.gradients));
    assert_eq!((p.master, p.moments), (4 * p.state_parameters, 8 * p.state_parameters));
    assert!(p.state_parameters < u.parameters && p.state_parameters > u.parameters / 2, "{p}");
    assert!(p.to_string().contains("sharded over 2 ranks"), "{p}");
}

/// The RL loop with `[trainer] shard_optimizer = true` on 2 ranks (the warm-up's reconfigured
/// trainer, checkpoints and all) runs the unsharded 2-rank run.
#[test]
fn the_rl_loop_with_a_sharded_optimizer_runs_the_unsharded_run() {
    use lockstep_dist::run_ranks;
    use lockstep_rl::config::RunConfig;
    use lockstep_rl::{run as run_rl, RunOptions, RunSummary};
    let dir = tempfile::tempdir().unwrap();
    let go = |shard: bool| -> RunSummary {
        let out = dir.path().join(format!("shard-{shard}"));
        let mut c = RunConfig::default_config();
        (c.steps, c.warmup.steps, c.rollout.prompts_per_step, c.rollout.group_size, c.eval.every) = (2, 10, 4, 4, 2);
        c.output.dir = out.display().to_string();
        c.output.checkpoint_every = 2;
        c.trainer.shard_optimizer = shard;
        let mut all = run_ranks(2, |comm| {
            let opts = RunOptions { parallel: Some(Arc::new(RankGroup::new(Arc::new(comm)))), ..RunOptions::default() };
            run_rl(&c, &out, true, &opts)
        });
        all.swap_remove(0).expect("rank 0 did not panic").expect("rank 0 ran")
    };
    let (plain, sharded) = (go(false), go(true));
    assert_eq!(plain.warmup_eval, sharded.warmup_eval);
    let rl = |s: &RunSummary| s.records.iter().filter(|r| r.phase == "rl").cloned().collect::<Vec<_>>();
    let (a, b) = (rl(&plain), rl(&sharded));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.step, x.reward_mean, x.completion_tokens), (y.step, y.reward_mean, y.completion_tokens));
        close(x.loss, y.loss, "loss");
        close(x.grad_norm, y.grad_norm, "grad_norm");
    }
    assert!(dir.path().join("shard-true/checkpoints/step-2/optimizer.safetensors").exists());
}
