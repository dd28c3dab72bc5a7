//! `lockstep trace inspect FILE | head -1` and other report commands: a reader that closes the
//! pipe ends the command quietly (no "Broken pipe" panic).

use std::io::Read;
use std::process::{Command, Stdio};

use lockstep_trace::{encode_file, RouteTrace, TraceMeta};

#[test]
fn a_closed_stdout_ends_trace_inspect_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lstrace");
    let traces: Vec<RouteTrace> = (0..3000)
        .map(|s| {
            let n = 40;
            let ids: Vec<u16> = (0..n * 2 * 2).map(|i| ((i / 2 * 3 + s + i % 2) % 8) as u16).collect();
            let ids: Vec<u16> = ids.chunks(2).flat_map(|c| if c[0] == c[1] { vec![c[0], (c[1] + 1) % 8] } else { c.to_vec() }).collect();
            RouteTrace::new(TraceMeta::top_k(8, 2), vec![0, 2], n, ids, vec![false; n], None).unwrap()
        })
        .collect();
    std::fs::write(&path, encode_file(&traces)).unwrap();
    // the whole report works
    let full = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(["trace", "inspect"]).arg(&path).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));
    // a reader that takes one line and goes away
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["trace", "inspect"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    let mut out = child.stdout.take().unwrap();
    out.read_exact(&mut first).unwrap();
    drop(out);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_ne!(status.code(), Some(101), "no panic exit");
}

/// Start `lockstep ARGS` with its stdout a pipe whose reader is already gone: the first write
/// fails (EPIPE) — `println!` would panic there.
fn run_with_closed_stdout(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap(), err)
}

#[test]
fn train_prints_best_effort_to_a_closed_stdout() {
    // train keeps SIGPIPE ignored (its sockets must see EPIPE): the write fails, the command
    // goes on and succeeds
    let (status, err) = run_with_closed_stdout(&["train", "--print-config"]);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

#[test]
fn bench_serve_ends_quietly_on_a_closed_stdout() {
    let (status, err) = run_with_closed_stdout(&["bench-serve", "--device", "cpu", "--dtype", "f32", "--prompt-len", "4", "--output-len", "2", "--concurrency", "1", "--capture", "on"]);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_ne!(status.code(), Some(101), "no panic exit: {err}");
}
