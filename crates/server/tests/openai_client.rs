//! The official `openai` Python package against the server on the embedded default
//! (`scripts/clients/openai_client.py`: completions, chat, streaming, n > 1, `routed_experts`
//! decoded with `np.load(io.BytesIO(base64.b64decode(s)))` to current vLLM's documented shape).
//!
//! The venv (`python3 -m venv`, `pip install openai numpy`) is made once under the target
//! directory and reused, so reruns take a few seconds. It needs `python3` and PyPI; set
//! `LOCKSTEP_SKIP_PYTHON_CLIENT=1` to skip it where neither exists (it says so, loudly).

use std::path::{Path, PathBuf};
use std::process::Command;

use lockstep_server::{start, ServerConfig};

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed ({}):\n{}\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// `<target>/tmp/openai-venv` with openai + numpy, made if missing.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = dir.join("bin").join("python");
    let ready = dir.join(".ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir), "python3 -m venv");
        run(Command::new(&py).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "openai", "numpy"]), "pip install openai numpy");
        std::fs::write(&ready, "").unwrap();
    }
    py
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_reads_the_routes() {
    if std::env::var_os("LOCKSTEP_SKIP_PYTHON_CLIENT").is_some() {
        eprintln!("SKIPPED: LOCKSTEP_SKIP_PYTHON_CLIENT is set; the openai client test did not run");
        return;
    }
    let py = tokio::task::spawn_blocking(venv).await.unwrap();
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", srv.addr);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/clients/openai_client.py");
    let out = tokio::task::spawn_blocking(move || Command::new(py).arg(script).arg(url).output()).await.unwrap().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client failed ({}):\n{so}\n{se}", out.status);
    assert!(so.contains("openai client: ok"), "{so}\n{se}");
    srv.shutdown().await;
}
