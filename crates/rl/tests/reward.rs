//! Reward functions: exact, math (boxed / last number, commas, fractions, \frac, decimals,
//! tolerance), regex, format, length, weighted sums — malformed completions score 0 — and the
//! `http` reward against a small server on 127.0.0.1 (metrics, timeouts, retries, bounded
//! concurrency, the run-stopping error naming the URL).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_rl::config::RewardSpec;
use lockstep_rl::reward::{final_answer, math_equal, parse_number, Input, RewardSet};
use lockstep_rl::RlError;
use serde_json::{json, Value};

fn input<'a>(completion: &'a str, answer: &'a str, meta: &'a Value) -> Input<'a> {
    Input { prompt: "p", completion, answer, metadata: meta, tokens: completion.len() }
}

fn score(specs: &[RewardSpec], completion: &str, answer: &str) -> f32 {
    let set = RewardSet::new(specs).unwrap();
    set.score(&[input(completion, answer, &Value::Null)]).unwrap()[0].reward
}

fn spec(kind: &str, f: impl FnOnce(&mut RewardSpec)) -> RewardSpec {
    let mut s = RewardSpec::of(kind);
    f(&mut s);
    s
}

#[test]
fn math_reads_the_final_answer() {
    assert_eq!(final_answer("first 3, then \\boxed{1,234}. Done 5"), Some("1,234"));
    assert_eq!(final_answer("so 3 + 4 = 7."), Some("7"));
    assert_eq!(final_answer("no number here"), None);
    assert_eq!(final_answer("\\boxed{12"), None, "an unclosed box is no answer");
    assert_eq!(final_answer("\\boxed{\\frac{3}{4}}"), Some("\\frac{3}{4}"));
    assert_eq!(parse_number("1,234"), Some(1234.0));
    assert_eq!(parse_number("\\frac{3}{4}"), Some(0.75));
    assert_eq!(parse_number("-\\dfrac{1}{2}"), Some(-0.5));
    assert_eq!(parse_number("3/4"), Some(0.75));
    assert_eq!(parse_number("$-2.50$."), Some(-2.5));
    assert_eq!(parse_number("1/0"), None, "not finite");
    assert_eq!(parse_number("\\frac{1}{"), None);
    assert_eq!(parse_number("seven"), None);
    for (c, a, want) in [
        ("The total is \\boxed{1,234}.", "1234", true),
        ("It is \\frac{3}{4}", "0.75", true),
        ("answer 0.75", "3/4", true),
        ("so 2 then 9", "9", true),
        ("so 9 then 2", "9", false),
        ("1.0000001", "1", true),
        ("1.01", "1", false),
        ("", "3", false),
        ("\\boxed{", "3", false),
        ("\\boxed{x+1}", "x + 1", true),
        ("∞ ☃ \u{FFFD}", "3", false),
    ] {
        assert_eq!(math_equal(c, a, 1e-6), want, "{c:?} vs {a:?}");
    }
    assert!(math_equal("1.01", "1", 0.02), "a looser tolerance");
    // relative to the answer: 1% of 100
    assert_eq!(score(&[spec("math", |s| s.tolerance = Some(0.01))], "about 102", "100"), 0.0);
    assert_eq!(score(&[spec("math", |s| s.tolerance = Some(0.01))], "about 100.5", "100"), 1.0);
}

#[test]
fn exact_regex_format_and_length() {
    let exact = [RewardSpec::of("exact")];
    assert_eq!(score(&exact, "  Paris \n", "paris"), 1.0);
    assert_eq!(score(&exact, "New   York", "new york"), 1.0);
    assert_eq!(score(&exact, "Paris!", "paris"), 0.0);
    assert_eq!(score(&exact, "", "paris"), 0.0);
    let re = [spec("regex", |s| s.pattern = Some(r"Answer: (\d+)".into()))];
    assert_eq!(score(&re, "I think. Answer: 7", "7"), 1.0);
    assert_eq!(score(&re, "Answer: 8", "7"), 0.0);
    assert_eq!(score(&re, "7", "7"), 0.0, "no match");
    let any = [spec("regex", |s| {
        s.pattern = Some(r"\d".into());
        s.answer = Some(false)
    })];
    assert_eq!(score(&any, "x 3", "7"), 1.0, "answer = false: a match is enough");
    let fmt = [spec("format", |s| s.pattern = Some(r"<think>.*</think>\s*\d+".into()))];
    assert_eq!(score(&fmt, "<think>4+3</think> 7", "7"), 1.0);
    assert_eq!(score(&fmt, "ok <think>4+3</think> 7", "7"), 0.0, "anchored at the start");
    assert_eq!(score(&fmt, "<think>4+3</think> 7 and more", "7"), 0.0, "anchored at the end");
    assert_eq!(score(&fmt, "<think>unclosed 7", "7"), 0.0);
    let len = RewardSet::new(&[spec("length", |s| s.target = Some(4))]).unwrap();
    let m = Value::Null;
    let at = |tokens| len.score(&[Input { tokens, ..input("x", "x", &m) }]).unwrap()[0].reward;
    assert_eq!((at(3), at(4), at(6), at(100)), (0.0, 0.0, -0.5, -1.0));
    // weighted sum, each part kept
    let set = RewardSet::new(&[spec("math", |s| s.weight = 0.9), spec("format", |s| {
        s.weight = 0.1;
        s.pattern = Some(r"\d+".into())
    })])
    .unwrap();
    assert_eq!(set.names, vec!["math", "format"]);
    let s = &set.score(&[input("7", "7", &m), input("it is 7", "7", &m), input("it is 8", "7", &m)]).unwrap();
    assert_eq!(s.iter().map(|x| x.parts.clone()).collect::<Vec<_>>(), vec![vec![1.0, 1.0], vec![1.0, 0.0], vec![0.0, 0.0]]);
    assert!((s[0].reward - 1.0).abs() < 1e-6 && (s[1].reward - 0.9).abs() < 1e-6 && s[2].reward == 0.0);
    let twice = RewardSet::new(&[RewardSpec::of("exact"), RewardSpec::of("exact")]).unwrap();
    assert_eq!(twice.names, vec!["exact#0", "exact#1"]);
}

/// What the test server does with request number `n` (from 0) and its body.
type Handler = dyn Fn(usize, &Value) -> (u16, String, Duration) + Send + Sync;

struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 (one thread per connection, `Connection: close`).
fn serve(handler: Arc<Handler>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", l.local_addr().unwrap());
    let (requests, open, max_open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r2, m2) = (requests.clone(), max_open.clone());
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let (handler, requests, open, max_open) = (handler.clone(), r2.clone(), open.clone(), m2.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body_at = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..body_at]).to_lowercase();
                let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < body_at + len {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: Value = serde_json::from_slice(&buf[body_at..]).unwrap_or(Value::Null);
                // in flight: from the whole request read to just before the answer is written
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                max_open.fetch_max(now, Ordering::SeqCst);
                let n = requests.fetch_add(1, Ordering::SeqCst);
                let (status, text, delay) = handler(n, &body);
                std::thread::sleep(delay);
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = write!(s, "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}", text.len());
            });
        }
    });
    Server { url, requests, max_open }
}

fn http(url: &str, f: impl FnOnce(&mut RewardSpec)) -> RewardSet {
    let mut s = RewardSpec { url: Some(url.into()), timeout_s: Some(2.0), ..RewardSpec::of("http") };
    f(&mut s);
    RewardSet::new(&[s]).unwrap()
}

#[test]
fn http_reward_posts_the_completion_and_reads_reward_and_metrics() {
    // the verifier: reward 1 when the completion contains the answer; echoes metadata.k
    let srv = serve(Arc::new(|_, b: &Value| {
        let ok = b["completion"].as_str().unwrap().contains(b["answer"].as_str().unwrap()) && b["prompt"] == "p";
        let text = json!({"reward": if ok { 1.0 } else { 0.25 }, "metrics": {"k": b["metadata"]["k"], "len": b["completion"].as_str().unwrap().len()}}).to_string();
        (200, text, Duration::from_millis(30))
    }));
    let set = http(&srv.url, |s| s.concurrency = Some(3));
    let meta = json!({"k": 2.5});
    let items: Vec<Input> = (0..12).map(|i| input(if i % 2 == 0 { "is 7" } else { "is 8" }, "7", &meta)).collect();
    let out = set.score(&items).unwrap();
    assert_eq!(out.iter().map(|s| s.reward).collect::<Vec<_>>(), (0..12).map(|i| if i % 2 == 0 { 1.0 } else { 0.25 }).collect::<Vec<_>>());
    assert!(out.iter().all(|s| s.metrics["k"] == 2.5 && s.metrics["len"] == 4.0), "{:?}", out[0].metrics);
    assert_eq!(srv.requests.load(Ordering::SeqCst), 12);
    let open = srv.max_open.load(Ordering::SeqCst);
    assert!((2..=3).contains(&open), "requests overlap, at most `concurrency` = 3 at a time; saw {open}");
}

#[test]
fn http_reward_retries_then_counts_failures_then_stops_the_run() {
    // every first try of a request fails with 503; the retry succeeds
    let srv = serve(Arc::new(|n, _: &Value| if n % 2 == 0 { (503, "busy".into(), Duration::ZERO) } else { (200, r#"{"reward": 0.5}"#.into(), Duration::ZERO) }));
    let set = http(&srv.url, |s| {
        s.retries = Some(1);
        s.concurrency = Some(1)
    });
    let m = Value::Null;
    let out = set.score(&[input("a", "b", &m), input("c", "d", &m)]).unwrap();
    assert_eq!((out[0].reward, out[1].reward), (0.5, 0.5));
    assert!(out[0].metrics.is_empty());
    assert_eq!(srv.requests.load(Ordering::SeqCst), 4);

    // a server answering garbage: each failed request scores 0 and counts, until
    // max_failures in a row stop the run with the URL and the last failure
    let bad = serve(Arc::new(|n, _: &Value| match n % 3 {
        0 => (500, "boom".into(), Duration::ZERO),
        1 => (200, "not json".into(), Duration::ZERO),
        _ => (200, r#"{"score": 1}"#.into(), Duration::ZERO),
    }));
    let set = http(&bad.url, |s| {
        s.retries = Some(0);
        s.concurrency = Some(1);
        s.max_failures = Some(4)
    });
    let out = set.score(&[input("a", "b", &m), input("a", "b", &m), input("a", "b", &m)]).unwrap();
    assert!(out.iter().all(|s| s.reward == 0.0 && s.metrics["http_failures"] == 1.0));
    let e = set.score(&[input("a", "b", &m)]).unwrap_err();
    let RlError::Reward { url, msg } = &e else { panic!("{e}") };
    assert_eq!(url, &bad.url);
    assert!(msg.contains("4 requests in a row") && msg.contains("HTTP 500"), "{msg}");
    assert!(e.to_string().contains(&bad.url));
}

#[test]
fn http_reward_times_out_and_a_success_resets_the_count() {
    // request 0 hangs past the timeout; the others answer at once
    let srv = serve(Arc::new(|n, _: &Value| (200, r#"{"reward": 1}"#.into(), if n == 0 { Duration::from_secs(3) } else { Duration::ZERO })));
    let set = http(&srv.url, |s| {
        s.timeout_s = Some(0.3);
        s.retries = Some(0);
        s.concurrency = Some(1);
        s.max_failures = Some(2)
    });
    let m = Value::Null;
    let t0 = std::time::Instant::now();
    let out = set.score(&[input("a", "b", &m), input("a", "b", &m)]).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "the hung request is cut at the timeout");
    assert_eq!((out[0].reward, out[1].reward), (0.0, 1.0));
    assert_eq!(out[0].metrics["http_failures"], 1.0);
    // nothing listens: connection refused, twice in a row → stop
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/x", l.local_addr().unwrap())
    };
    let set = http(&dead, |s| {
        s.retries = Some(0);
        s.max_failures = Some(2)
    });
    let e = set.score(&[input("a", "b", &m), input("a", "b", &m)]).unwrap_err().to_string();
    assert!(e.contains(&dead) && e.contains("2 requests in a row"), "{e}");
}
