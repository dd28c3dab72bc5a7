//! The RL loop against a lockstep server by URL: rollouts over HTTP, weight sync through
//! `/v1/load_weights` — and still exactly on-policy (the served model runs the batch-invariant
//! kernels): the first update of every step sees KL estimate 0.

use lockstep_rl::config::RunConfig;
use lockstep_rl::{run, RunOptions};

#[test]
fn rollouts_from_a_server_by_url_are_on_policy() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(lockstep_server::start(&lockstep_server::ServerConfig::default(), "127.0.0.1:0")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = RunConfig::default_config();
    c.steps = 3;
    c.warmup.steps = 10;
    c.rollout.prompts_per_step = 4;
    c.rollout.group_size = 4;
    c.trainer.mini_steps = 1;
    c.eval.every = 3;
    c.output.checkpoint_every = 0;
    c.rollout.servers = vec![format!("http://{}", server.addr)];
    let remote = run(&c, dir.path(), true, &RunOptions::default()).unwrap();
    let rl: Vec<_> = remote.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 3);
    for r in &rl {
        assert_eq!(r.kl, 0.0, "step {}: served logprobs equal the trainer's", r.step);
        assert!(r.layers.values().all(|l| l.route_agreement == 1.0));
    }
    // the same run in process gives the same rewards (same seeds, same weights)
    c.rollout.servers.clear();
    let local = run(&c, &dir.path().join("local"), true, &RunOptions::default()).unwrap();
    let rewards = |s: &lockstep_rl::RunSummary| s.records.iter().map(|r| r.reward_mean.to_bits()).collect::<Vec<_>>();
    assert_eq!(rewards(&remote), rewards(&local));
    rt.block_on(server.shutdown());
}

// --- servers that are down or answer garbage: clear errors naming the URL, no hang, no panic

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use lockstep_rl::remote::RemoteEngine;

/// A one-thread HTTP server answering every request with `answer(path)`: (status line, body).
fn fake_server(answer: fn(&str) -> (&'static str, &'static str)) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // headers, then the body by Content-Length
            let (head_end, len) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (buf.len(), 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let path = String::from_utf8_lossy(&buf).split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = answer(&path);
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    format!("http://{addr}")
}

fn remote_run_error(url: &str) -> (String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = RunConfig::default_config();
    c.steps = 1;
    c.warmup.steps = 60;
    c.rollout.servers = vec![url.to_string()];
    let t0 = Instant::now();
    let e = run(&c, dir.path(), true, &RunOptions::default()).unwrap_err().to_string();
    (e, t0.elapsed())
}

#[test]
fn unreachable_server_fails_fast_naming_the_url() {
    // nothing listens on port 1: refused at once, before the warm-up
    let (e, took) = remote_run_error("http://127.0.0.1:1");
    eprintln!("{e}");
    assert!(e.contains("http://127.0.0.1:1/health") && e.contains("unreachable") && e.to_lowercase().contains("refused"), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn garbage_answers_are_named() {
    // HTTP 500
    let url = fake_server(|_| ("500 Internal Server Error", "boom"));
    let (e, _) = remote_run_error(&url);
    eprintln!("{e}");
    assert!(e.contains(&format!("{url}/health")) && e.contains("HTTP 500") && e.contains("boom"), "{e}");
    // 200 but not JSON
    let url = fake_server(|_| ("200 OK", "<html>hello</html>"));
    let (e, _) = remote_run_error(&url);
    eprintln!("{e}");
    assert!(e.contains(&format!("{url}/health")) && e.contains("not JSON") && e.contains("<html>hello"), "{e}");
    // healthy, but completions answer JSON without the fields
    let url = fake_server(|p| if p == "/health" { ("200 OK", r#"{"status": "ok"}"#) } else { ("200 OK", r#"{"choices": [{"token_ids": "x"}]}"#) });
    let remote = RemoteEngine::new(vec![url.clone()]);
    remote.check().unwrap();
    let req = lockstep_engine::Request { prompt: vec![1, 2], params: lockstep_engine::SamplingParams::default() };
    let e = remote.generate(std::slice::from_ref(&req)).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains(&format!("{url}/v1/completions")) && e.contains("choices[0].prompt_token_ids"), "{e}");
    // completions answering 500 / non-JSON
    let url = fake_server(|p| if p == "/health" { ("200 OK", r#"{"status": "ok"}"#) } else { ("503 Service Unavailable", "overloaded") });
    let e = RemoteEngine::new(vec![url.clone()]).generate(std::slice::from_ref(&req)).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains(&format!("{url}/v1/completions")) && e.contains("HTTP 503") && e.contains("overloaded"), "{e}");
    let url = fake_server(|p| if p == "/health" { ("200 OK", r#"{"status": "ok"}"#) } else { ("200 OK", "not json") });
    let e = RemoteEngine::new(vec![url.clone()]).generate(&[req]).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains(&format!("{url}/v1/completions")) && e.contains("not JSON"), "{e}");
}

#[test]
fn silent_server_times_out_naming_the_url() {
    // accepts connections, never answers
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let _keep = std::thread::spawn(move || {
        let conns: Vec<_> = l.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(conns);
    });
    let remote = RemoteEngine::with_timeouts(vec![url.clone()], Duration::from_secs(1), Duration::from_secs(60));
    let t0 = Instant::now();
    let e = remote.check_within(Duration::from_secs(1)).unwrap_err().to_string();
    eprintln!("{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(e.contains(&format!("{url}/health")) && e.to_lowercase().contains("timed out"), "{e}");
}
