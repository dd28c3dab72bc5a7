//! `lockstep train` under Ctrl-C, the real binary: SIGINT after the first RL step → exit 130, a
//! checkpoint with run_state.json, the printed resume command completes the run; two SIGINTs
//! abort at once.

#![cfg(unix)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_rl::RunConfig;

/// A tiny run: 2 warm-up steps, many short RL steps (it is interrupted long before the end).
fn tiny_config(dir: &Path, warmup_steps: u64, warmup_batch: usize) -> std::path::PathBuf {
    let mut c = RunConfig::default_config();
    c.steps = 1000;
    c.warmup.steps = warmup_steps;
    c.warmup.batch = warmup_batch;
    c.rollout.prompts_per_step = 2;
    c.rollout.group_size = 2;
    c.trainer.mini_steps = 1;
    c.eval.every = 1000;
    c.output.checkpoint_every = 0;
    c.output.dir = dir.join("run").display().to_string();
    let path = dir.join("run.toml");
    std::fs::write(&path, c.to_toml()).unwrap();
    path
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn sigint(child: &Child) {
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (exit code, stderr) of a child that must end within `limit`.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn ctrl_c_leaves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path(), 2, 4);
    let run = dir.path().join("run");
    let child = spawn(&["train", "--config", cfg.to_str().unwrap(), "--quiet"]);
    // the first RL step's metrics line appears, then Ctrl-C
    let metrics = run.join("metrics.jsonl");
    wait_for("the first RL step", Duration::from_secs(120), || std::fs::read_to_string(&metrics).unwrap_or_default().contains("\"phase\":\"rl\""));
    sigint(&child);
    let (code, err) = finish(child, Duration::from_secs(60));
    assert_eq!(code, Some(130), "{err}");
    // the checkpoint it names, with its run state
    let line = err.lines().find(|l| l.starts_with("interrupted after step ")).unwrap_or_else(|| panic!("{err}"));
    let ckpt = Path::new(line.rsplit("checkpoint written: ").next().unwrap()).to_path_buf();
    let step: u64 = ckpt.file_name().unwrap().to_str().unwrap().strip_prefix("step-").unwrap().parse().unwrap();
    assert!(step >= 1 && ckpt.starts_with(&run), "{err}");
    for f in ["run_state.json", "model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(ckpt.join(f).exists(), "{f} missing in {}", ckpt.display());
    }
    // the printed command resumes it (one more step, so the test is short)
    let cmd = err.lines().skip_while(|l| !l.starts_with("resume with:")).nth(1).unwrap_or_else(|| panic!("{err}")).trim().to_string();
    assert!(cmd.contains(" train --config ") && cmd.contains(" --resume "), "{cmd}");
    let out = Command::new("sh").arg("-c").arg(format!("{cmd} --quiet --steps {}", step + 1)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("\"phase\":\"rl\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=step + 1).collect::<Vec<_>>(), "metrics of the steps before the checkpoint kept, the next appended");
    assert!(String::from_utf8_lossy(&out.stdout).contains("report: "));
}

#[test]
fn second_ctrl_c_aborts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // long warm-up steps: the second signal lands while the first step still runs
    let cfg = tiny_config(dir.path(), 100_000, 1024);
    let mut child = spawn(&["train", "--config", cfg.to_str().unwrap(), "--quiet"]);
    let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (err, mut pipe) = (err.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = std::io::Read::read(&mut pipe, &mut buf) {
                err.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // config.toml is written once the handler is installed and the run has started
    wait_for("the run to start", Duration::from_secs(60), || dir.path().join("run/config.toml").exists());
    sigint(&child);
    // (two signals sent back to back can merge into one: wait for the first to be handled)
    wait_for("the first Ctrl-C to be handled", Duration::from_secs(10), || err.lock().unwrap().contains("finishing the current step"));
    sigint(&child);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "still running after the second Ctrl-C");
        std::thread::sleep(Duration::from_millis(10));
    };
    reader.join().unwrap();
    let err = err.lock().unwrap().clone();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("second Ctrl-C") && !err.contains("resume with"), "{err}");
}
