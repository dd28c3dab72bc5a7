//! `lockstep train` as CPU ranks over TCP, started the way torchrun starts them (MASTER_ADDR,
//! MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) and by `lockstep launch --nproc`: the run is the
//! single-process run (the same completions — rewards, token counts, held-out accuracy — and
//! losses within 1e-4), rank 0 alone reports it; a rank whose store is nowhere fails within
//! the rendezvous timeout, naming the address.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn lockstep() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep"));
    for k in lockstep_dist::rendezvous::VARS {
        c.env_remove(k);
    }
    c
}

fn output(c: &mut Command) -> (bool, String) {
    let out = c.output().expect("lockstep runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The short run every test trains: 4 warm-up steps, 2 RL steps, on the CPU.
const TRAIN: &[&str] = &["train", "--quiet", "--steps", "2", "--warmup-steps", "4", "--device", "cpu"];

/// Per step: (reward, completion tokens, eval accuracy) exactly, and the loss.
type Steps = Vec<((u64, u64, Option<u64>), f64)>;

fn steps(out: &Path) -> Steps {
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let exact = (v["reward_mean"].as_f64().unwrap().to_bits(), v["completion_tokens"].as_u64().unwrap(), v["eval_accuracy"].as_f64().map(f64::to_bits));
            (exact, v["loss"].as_f64().unwrap_or(0.0))
        })
        .collect()
}

/// The single-process run, once for all tests here.
fn one_rank() -> &'static Steps {
    static ONE: OnceLock<Steps> = OnceLock::new();
    ONE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("one");
        let (ok, text) = output(lockstep().args(TRAIN).arg("--out").arg(&out));
        assert!(ok, "{text}");
        steps(&out)
    })
}

fn assert_same_run(one: &Steps, many: &Steps, what: &str) {
    assert_eq!(one.len(), 3, "{what}: warm-up + 2 RL steps");
    assert_eq!(one.len(), many.len(), "{what}");
    for (i, ((a, la), (b, lb))) in one.iter().zip(many).enumerate() {
        assert_eq!(a, b, "{what}: step record {i}: rewards / tokens / eval differ");
        assert!((la - lb).abs() <= 1e-4 * la.abs().max(lb.abs()).max(1e-3), "{what}: step record {i}: loss {la} vs {lb}");
    }
}

#[test]
fn four_torchrun_style_cpu_ranks_train_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("four");
    let port = free_port().to_string();
    let ranks: Vec<Child> = (0..4)
        .map(|r| {
            lockstep()
                .args(TRAIN)
                .arg("--out")
                .arg(&out)
                .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("RANK", &r.to_string()), ("WORLD_SIZE", "4"), ("LOCAL_RANK", &r.to_string())])
                .env("LOCKSTEP_RENDEZVOUS_TIMEOUT_S", "120")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let text: Vec<String> = outs.iter().map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))).collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", text[r]);
    }
    // rank 0 alone reports the run
    assert_eq!(text[0].matches("eval accuracy after warm-up").count(), 1, "{}", text[0]);
    assert!(text[1..].iter().all(|t| !t.contains("eval accuracy after warm-up")), "{text:?}");
    assert_same_run(one_rank(), &steps(&out), "4 TCP ranks");
}

/// Rank 1 is killed mid-run (after the warm-up): rank 0's next collective fails naming it, at
/// once rather than after the timeout.
#[test]
fn a_killed_rank_makes_the_other_fail_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let port = free_port().to_string();
    let mut ranks: Vec<Child> = (0..2)
        .map(|r| {
            lockstep()
                .args(["train", "--quiet", "--warmup-steps", "4", "--device", "cpu", "--steps", "200", "--out"])
                .arg(&out)
                .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("RANK", &r.to_string()), ("WORLD_SIZE", "2")])
                .env("LOCKSTEP_RENDEZVOUS_TIMEOUT_S", "120")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // rank 0 writes the warm-up's record once both ranks are training
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no warm-up record");
        std::thread::sleep(Duration::from_millis(20));
    }
    ranks[1].kill().unwrap();
    let _ = ranks.pop().unwrap().wait();
    let t1 = Instant::now();
    let o = ranks.pop().unwrap().wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("rank 1 disconnected"), "{text}");
    assert!(t1.elapsed() < Duration::from_secs(30), "{:?}", t1.elapsed());
}

#[test]
fn launch_nproc_starts_cpu_ranks_through_the_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("two");
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--"]).args(TRAIN).arg("--out").arg(&out));
    assert!(ok, "{text}");
    assert!(text.contains("[rank 0] replay on: eval accuracy"), "{text}");
    assert_eq!(text.matches("eval accuracy after warm-up").count(), 1, "{text}");
    assert_same_run(one_rank(), &steps(&out), "launch --nproc 2");
}

#[test]
fn launch_refuses_what_does_not_fit_and_a_failed_rank_stops_the_others() {
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--", "train"]));
    assert!(!ok && text.contains("--nproc starts CPU ranks: the command must say `--device cpu`"), "{text}");
    let (ok, text) = output(lockstep().args(["launch", "--gpus", "2", "--", "train", "--device", "cpu"]));
    assert!(!ok && text.contains("(CPU ranks: --nproc N)"), "{text}");
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--nnodes", "2", "--", "dist-check", "--device", "cpu"]));
    assert!(!ok && text.contains("--master-addr: needed with --nnodes 2"), "{text}");
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--", "dist-check", "--device", "cpu"]));
    assert!(!ok && text.contains("--node-rank 2: not below --nnodes 2"), "{text}");
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--rendezvous-timeout-s", "never", "--", "dist-check", "--device", "cpu"]));
    assert!(!ok && text.contains("--rendezvous-timeout-s: "), "{text}");
    // every rank refuses --ranks under a launcher; the first to fail stops the other
    let t0 = Instant::now();
    let (ok, text) = output(lockstep().args(["launch", "--nproc", "2", "--", "train", "--device", "cpu", "--ranks", "2"]));
    assert!(!ok, "{text}");
    assert!(text.contains("--ranks 2: under a launcher the ranks are the launched processes"), "{text}");
    assert!(text.contains("failed (exit status: 1); the other ranks were stopped"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(60));
    // CPU ranks of a 2-node launch, node 1: its ranks are 2 and 3 of 4 (and find no store)
    let port = free_port().to_string();
    let (ok, text) = output(
        lockstep()
            .args(["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", &port, "--rendezvous-timeout-s", "1", "--"])
            .args(["dist-check", "--device", "cpu"]),
    );
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("no store at 127.0.0.1:{port} after 1 s")) && (text.contains("[rank 2] ") || text.contains("[rank 3] ")), "{text}");
    assert!(text.contains("launch: rank 2 failed") || text.contains("launch: rank 3 failed"), "{text}");
}

#[test]
fn a_rank_whose_store_is_nowhere_fails_within_the_timeout_naming_it() {
    for host in ["127.0.0.1", "192.0.2.1"] {
        let port = free_port().to_string();
        let t0 = Instant::now();
        let (ok, text) = output(lockstep().args(TRAIN).envs([("MASTER_ADDR", host), ("MASTER_PORT", &port), ("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCKSTEP_RENDEZVOUS_TIMEOUT_S", "1.5")]));
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("rank 1: no store at {host}:{port} after 1.5 s")), "{text}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{host}: {:?}", t0.elapsed());
    }
    // the flag overrides the variable
    let port = free_port().to_string();
    let (ok, text) = output(lockstep().args(["dist-check", "--device", "cpu", "--rendezvous-timeout-s", "0.5"]).envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("RANK", "3"), ("WORLD_SIZE", "4")]));
    assert!(!ok && text.contains(&format!("rank 3: no store at 127.0.0.1:{port} after 0.5 s")), "{text}");
    // bad variables are named
    let (ok, text) = output(lockstep().args(TRAIN).envs([("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "two")]));
    assert!(!ok && text.contains("WORLD_SIZE: \"two\" is not a non-negative integer"), "{text}");
    let (ok, text) = output(lockstep().args(TRAIN).envs([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", "node[01-")]));
    assert!(!ok && text.contains("SLURM_JOB_NODELIST: `node[01-`: unclosed `[`"), "{text}");
    // a single-rank command refuses to run as one of several ranks
    let (ok, text) = output(lockstep().args(["demo"]).envs([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]));
    assert!(!ok && text.contains("demo does not run over several ranks"), "{text}");
}

#[cfg(not(feature = "nccl"))]
#[test]
fn gpu_ranks_without_nccl_say_so_at_once() {
    let port = free_port().to_string();
    let t0 = Instant::now();
    let (ok, text) = output(lockstep().args(["dist-check"]).envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("RANK", "1"), ("WORLD_SIZE", "2")]));
    assert!(!ok && text.contains("built without it") && text.contains("--device cpu"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}
