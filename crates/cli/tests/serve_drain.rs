//! `lockstep serve` under SIGTERM, the real binary: a streaming request in flight finishes
//! whole, a new connection gets 503 `draining`, and the server exits 0.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

fn kill(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// The child's stderr lines, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_exit(mut child: Child, limit: Duration) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["serve", "--model", "default", "--port", "0"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(&mut child);
    let mut seen = Vec::new();
    let port: u16 = loop {
        let l = err.recv_timeout(LIMIT).unwrap_or_else(|_| panic!("no address printed: {seen:?}"));
        if let Some(p) = l.split("http://127.0.0.1:").nth(1) {
            break p.trim().parse().unwrap();
        }
        seen.push(l);
    };
    // a streaming request, its first event in
    let body = r#"{"prompt": "ab", "n": 4, "max_tokens": 1000, "ignore_eos": true, "stream": true}"#;
    let mut s = connect(port);
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    kill(&child, "-TERM");
    // the drain has begun once it says so; then new connections are refused
    let l = loop {
        let l = err.recv_timeout(LIMIT).expect("no drain message");
        if l.contains("draining") {
            break l;
        }
    };
    assert!(l.contains("draining"), "{l}");
    let mut n = connect(port);
    n.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut r = String::new();
    let _ = n.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 503") && r.contains("draining"), "{r}");
    // the stream finishes whole
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.contains("data: [DONE]"), "{text}");
    assert_eq!(wait_exit(child, LIMIT), Some(0));
}
