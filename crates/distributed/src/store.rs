//! A small key-value store over TCP, for the rendezvous of a process group (`rendezvous`):
//! rank 0 hosts it ([`StoreServer`]) on `MASTER_ADDR:MASTER_PORT`, every rank (rank 0 too)
//! connects to it as a [`StoreClient`], retrying until the rendezvous timeout. Rank 0 publishes
//! what the others need to join (the NCCL unique id, the port of the TCP collective); the others
//! fetch it with a blocking `get`; `barrier` waits until every rank arrived.
//!
//! Why not NCCL's or torch's: NCCL needs its unique id handed to every rank by someone, and
//! lockstep carries no torch; this is the few hundred lines that do it with `std::net` and
//! threads (one per connection).
//!
//! Listening: rank 0 binds the address `MASTER_ADDR` resolves to; when that is not one of this
//! host's addresses (EADDRNOTAVAIL: a NAT or load-balancer address, a name that resolves
//! elsewhere), it listens on `0.0.0.0` (every interface) with the same port instead.
//!
//! Wire format: every message is one frame, a u32 little-endian length N then N bytes, with
//! N ≤ [`MAX_FRAME_BYTES`] (1 MiB: a larger length is refused before anything is allocated, and
//! the body is read as it arrives, so a hostile peer cannot make the store allocate more than it
//! actually sends). A request is `op u8, key length u16 LE, key (UTF-8, ≤ 1 KiB), arguments`:
//!
//! | op | name | arguments | reply body |
//! |----|------|-----------|------------|
//! | 1 | set  | the value (the rest of the frame) | — |
//! | 2 | get  | wait ms u64 | the value, once it is set |
//! | 3 | add  | delta u64   | the counter's new value u64 |
//! | 4 | wait | target u64, wait ms u64 | —, once the counter reaches the target |
//!
//! A reply is `status u8` and the body: 0 ok, 1 refused (the body is the UTF-8 reason), 2 the
//! wait timed out. The store holds at most [`MAX_STORE_BYTES`] of keys and values and serves at most 1024 connections.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Largest frame the store reads or writes.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Most bytes of keys and values the store holds.
pub const MAX_STORE_BYTES: usize = 64 << 20;
const MAX_CONNECTIONS: usize = 1024;
/// Added to a client's read timeout beyond the wait it asked the server for.
const SLACK: Duration = Duration::from_secs(5);

const SET: u8 = 1;
const GET: u8 = 2;
const ADD: u8 = 3;
const WAIT: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No store answered at `addr` before the timeout.
    #[error("rank {rank}: no store at {addr} after {secs} s ({cause})")]
    NoStore { rank: usize, addr: String, secs: String, cause: String },
    /// Rank 0 could not listen.
    #[error("rank 0: cannot listen on {addr}: {cause}")]
    Listen { addr: String, cause: String },
    /// The store did not answer, or what was waited for did not happen, in time.
    #[error("rank {rank}: timed out after {secs} s waiting for {what} at {addr}")]
    Timeout { rank: usize, addr: String, secs: String, what: String },
    /// The connection failed, or the store refused the request.
    #[error("rank {rank}: store at {addr}: {cause}")]
    Failed { rank: usize, addr: String, cause: String },
}

/// `d` in seconds as people write it: `300`, `0.5`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// ---- frames (shared with the TCP collective) ----

#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the connection.
    Closed,
    /// The read or write timeout expired.
    TimedOut,
    /// A frame longer than the cap.
    TooBig { len: u64, cap: usize },
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Closed => write!(f, "connection closed"),
            FrameError::TimedOut => write!(f, "timed out"),
            FrameError::TooBig { len, cap } => write!(f, "a frame of {len} bytes exceeds the cap of {cap} bytes"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => FrameError::TimedOut,
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => FrameError::Closed,
            _ => FrameError::Io(e),
        }
    }
}

/// One frame: u32 LE length, then the payload.
pub(crate) fn write_frame(s: &mut impl Write, payload: &[u8], cap: usize) -> Result<(), FrameError> {
    if payload.len() > cap {
        return Err(FrameError::TooBig { len: payload.len() as u64, cap });
    }
    let mut head = (payload.len() as u32).to_le_bytes().to_vec();
    if payload.len() <= 64 << 10 {
        head.extend_from_slice(payload);
        s.write_all(&head)?;
    } else {
        s.write_all(&head)?;
        s.write_all(payload)?;
    }
    s.flush()?;
    Ok(())
}

/// One frame of at most `cap` bytes, read as it arrives (nothing allocated up front beyond 64 KiB).
pub(crate) fn read_frame(s: &mut impl Read, cap: usize) -> Result<Vec<u8>, FrameError> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head) as usize;
    if len > cap {
        return Err(FrameError::TooBig { len: len as u64, cap });
    }
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    s.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(FrameError::Closed);
    }
    Ok(buf)
}

/// A bounds-checked reader over a frame's bytes.
pub(crate) struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("truncated message: {n} bytes wanted, {} left", self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().map_err(|_| "u16")?))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().map_err(|_| "u32")?))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().map_err(|_| "u64")?))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

// ---- the server ----

#[derive(Default)]
struct Data {
    values: HashMap<String, Vec<u8>>,
    counters: HashMap<String, u64>,
    bytes: usize,
}

#[derive(Default)]
struct Shared {
    data: Mutex<Data>,
    changed: Condvar,
    stop: AtomicBool,
    connections: AtomicUsize,
}

/// The store, served by threads of this process until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreServer {{ addr: {} }}", self.addr)
    }
}

impl StoreServer {
    /// Listen on `host:port` (port 0: any free port), or on `0.0.0.0:port` when `host` is not
    /// one of this machine's addresses.
    pub fn listen(host: &str, port: u16) -> Result<Self, StoreError> {
        let listener = bind(host, port)?;
        let addr = listener.local_addr().map_err(|e| StoreError::Listen { addr: display_addr(host, port), cause: e.to_string() })?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("lockstep-store".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| StoreError::Listen { addr: addr.to_string(), cause: format!("starting its thread: {e}") })?;
        Ok(StoreServer { addr, shared })
    }

    /// The address it listens on (`0.0.0.0:port` after the fallback).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// An address this machine reaches it on (loopback for an unspecified address).
    pub fn reachable_addr(&self) -> SocketAddr {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        a
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // wake the accept loop, which then sees `stop`
        let _ = TcpStream::connect_timeout(&self.reachable_addr(), Duration::from_millis(200));
    }
}

/// Bind `host:port`; `0.0.0.0:port` when `host` is not an address of this machine.
pub(crate) fn bind(host: &str, port: u16) -> Result<TcpListener, StoreError> {
    let shown = display_addr(host, port);
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| StoreError::Listen { addr: shown.clone(), cause: format!("cannot resolve {host}: {e}") })?.collect();
    let mut last = format!("{host} resolves to no address");
    for a in &addrs {
        match TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == ErrorKind::AddrNotAvailable => last = e.to_string(),
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                return Err(StoreError::Listen { addr: shown, cause: format!("{e} (another job on this node? set MASTER_PORT or LOCKSTEP_STORE_PORT)") });
            }
            Err(e) => return Err(StoreError::Listen { addr: shown, cause: e.to_string() }),
        }
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map_err(|e| StoreError::Listen { addr: shown, cause: format!("{last}; on 0.0.0.0:{port}: {e}") })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            continue; // dropped: closed
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("lockstep-store-conn".into()).spawn(move || {
            serve(stream, &s);
            s.connections.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    loop {
        let req = match read_frame(&mut stream, MAX_FRAME_BYTES) {
            Ok(r) => r,
            Err(e @ FrameError::TooBig { .. }) => {
                let _ = reply(&mut stream, Outcome::Refused(e.to_string()));
                return;
            }
            Err(_) => return,
        };
        let r = handle(&req, shared).unwrap_or_else(Outcome::Refused);
        if reply(&mut stream, r).is_err() || shared.stop.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// What a request ends in: the reply body, an error message, or a wait that timed out.
enum Outcome {
    Done(Vec<u8>),
    Refused(String),
    TimedOut,
}

impl From<String> for Outcome {
    fn from(msg: String) -> Self {
        Outcome::Refused(msg)
    }
}

fn reply(stream: &mut TcpStream, r: Outcome) -> Result<(), FrameError> {
    let mut out = Vec::new();
    match r {
        Outcome::Done(body) => {
            out.push(0);
            out.extend(body);
        }
        Outcome::Refused(msg) => {
            out.push(1);
            out.extend(msg.into_bytes().into_iter().take(MAX_FRAME_BYTES - 1));
        }
        Outcome::TimedOut => out.push(2),
    }
    write_frame(stream, &out, MAX_FRAME_BYTES)
}

fn handle(req: &[u8], shared: &Shared) -> Result<Outcome, String> {
    let mut c = Cursor(req);
    let op = c.u8()?;
    let klen = c.u16()? as usize;
    if klen > MAX_KEY_BYTES {
        return Err(format!("a key of {klen} bytes exceeds the cap of {MAX_KEY_BYTES}"));
    }
    let key = std::str::from_utf8(c.bytes(klen)?).map_err(|_| "the key is not UTF-8".to_string())?.to_string();
    let lock = || shared.data.lock().unwrap_or_else(PoisonError::into_inner);
    // wait on the condition variable until `ready` or the deadline (or the server stops)
    let wait_for = |ms: u64, ready: &dyn Fn(&Data) -> Option<Vec<u8>>| -> Outcome {
        let deadline = Instant::now() + Duration::from_millis(ms.min(24 * 3600 * 1000));
        let mut d = lock();
        loop {
            if let Some(v) = ready(&d) {
                return Outcome::Done(v);
            }
            let now = Instant::now();
            if now >= deadline || shared.stop.load(Ordering::SeqCst) {
                return Outcome::TimedOut;
            }
            d = shared.changed.wait_timeout(d, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    };
    let full = || format!("the store is full ({MAX_STORE_BYTES} bytes)");
    Ok(match op {
        SET => {
            let value = c.rest();
            let mut d = lock();
            let old = d.values.get(&key).map_or(0, |v| v.len() + key.len());
            let new = d.bytes - old + value.len() + key.len();
            if new > MAX_STORE_BYTES {
                return Err(full());
            }
            d.bytes = new;
            d.values.insert(key, value.to_vec());
            drop(d);
            shared.changed.notify_all();
            Outcome::Done(Vec::new())
        }
        GET => {
            let ms = c.u64()?;
            wait_for(ms, &|d| d.values.get(&key).cloned())
        }
        ADD => {
            let delta = c.u64()?;
            let mut d = lock();
            if !d.counters.contains_key(&key) {
                if d.bytes + key.len() + 8 > MAX_STORE_BYTES {
                    return Err(full());
                }
                d.bytes += key.len() + 8;
            }
            let n = d.counters.entry(key).or_insert(0);
            *n = n.saturating_add(delta);
            let v = *n;
            drop(d);
            shared.changed.notify_all();
            Outcome::Done(v.to_le_bytes().to_vec())
        }
        WAIT => {
            let (target, ms) = (c.u64()?, c.u64()?);
            wait_for(ms, &|d| (d.counters.get(&key).copied().unwrap_or(0) >= target).then(Vec::new))
        }
        other => return Err(format!("unknown operation {other}")),
    })
}

// ---- the client ----

/// One rank's connection to the store.
#[derive(Debug)]
pub struct StoreClient {
    stream: TcpStream,
    rank: usize,
    addr: String,
    timeout: Duration,
}

/// Connect to `host:port` within `timeout`, retrying (the store may not be up yet, a name may
/// not resolve yet). `rank` names this process in errors.
pub(crate) fn connect_retrying(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + timeout;
    let mut last = "nothing tried".to_string();
    loop {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, left) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(s);
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve {host}: {e}"),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(last);
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

impl StoreClient {
    /// Connect to the store at `host:port`, retrying until `timeout`.
    pub fn connect(host: &str, port: u16, rank: usize, timeout: Duration) -> Result<Self, StoreError> {
        let addr = display_addr(host, port);
        let stream = connect_retrying(host, port, timeout).map_err(|cause| StoreError::NoStore { rank, addr: addr.clone(), secs: secs(timeout), cause })?;
        Ok(StoreClient { stream, rank, addr, timeout })
    }

    /// The store's address, as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn failed(&self, cause: impl Into<String>) -> StoreError {
        StoreError::Failed { rank: self.rank, addr: self.addr.clone(), cause: cause.into() }
    }

    fn request(&mut self, op: u8, key: &str, args: &[u8], wait: Duration, what: impl Fn() -> String) -> Result<Vec<u8>, StoreError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(self.failed(format!("a key of {} bytes exceeds the cap of {MAX_KEY_BYTES}", key.len())));
        }
        let mut req = vec![op];
        req.extend((key.len() as u16).to_le_bytes());
        req.extend(key.as_bytes());
        req.extend(args);
        let timeout = |this: &Self| StoreError::Timeout { rank: this.rank, addr: this.addr.clone(), secs: secs(this.timeout), what: what() };
        let _ = self.stream.set_write_timeout(Some(wait + SLACK));
        let _ = self.stream.set_read_timeout(Some(wait + SLACK));
        match write_frame(&mut self.stream, &req, MAX_FRAME_BYTES) {
            Ok(()) => {}
            Err(FrameError::TimedOut) => return Err(timeout(self)),
            Err(e) => return Err(self.failed(e.to_string())),
        }
        let rep = match read_frame(&mut self.stream, MAX_FRAME_BYTES) {
            Ok(r) => r,
            Err(FrameError::TimedOut) => return Err(timeout(self)),
            Err(e) => return Err(self.failed(e.to_string())),
        };
        match rep.split_first() {
            Some((0, body)) => Ok(body.to_vec()),
            Some((2, _)) => Err(timeout(self)),
            Some((1, msg)) => Err(self.failed(String::from_utf8_lossy(msg).into_owned())),
            _ => Err(self.failed("malformed reply")),
        }
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let t = self.timeout;
        self.request(SET, key, value, t, || format!("the store to take `{key}`")).map(|_| ())
    }

    /// The value of `key`, waiting until some rank sets it (at most the timeout).
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        let t = self.timeout;
        self.request(GET, key, &(t.as_millis() as u64).to_le_bytes(), t, || format!("key `{key}`"))
    }

    /// Add `delta` to the counter `key` (0 when new); its new value.
    pub fn add(&mut self, key: &str, delta: u64) -> Result<u64, StoreError> {
        let t = self.timeout;
        let v = self.request(ADD, key, &delta.to_le_bytes(), t, || format!("the store to add to `{key}`"))?;
        v.try_into().map(u64::from_le_bytes).map_err(|_| self.failed("malformed counter"))
    }

    /// Wait until `world` ranks called `barrier(name, world)` (at most the timeout).
    pub fn barrier(&mut self, name: &str, world: usize) -> Result<(), StoreError> {
        let key = format!("barrier/{name}");
        let t = self.timeout;
        let n = self.add(&key, 1)?;
        let mut args = (world as u64).to_le_bytes().to_vec();
        args.extend((t.as_millis() as u64).to_le_bytes());
        self.request(WAIT, &key, &args, t, || format!("barrier `{name}`: {n} of {world} ranks had arrived when this one did")).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_add_barrier() {
        let server = StoreServer::listen("127.0.0.1", 0).unwrap();
        let port = server.local_addr().port();
        let t = Duration::from_secs(5);
        let waiter = std::thread::spawn(move || StoreClient::connect("127.0.0.1", port, 1, t).unwrap().get("id").unwrap());
        std::thread::sleep(Duration::from_millis(100));
        let mut c = StoreClient::connect("127.0.0.1", port, 0, t).unwrap();
        c.set("id", &[1, 2, 3]).unwrap();
        assert_eq!(waiter.join().unwrap(), vec![1, 2, 3]);
        assert_eq!(c.get("id").unwrap(), vec![1, 2, 3]);
        assert_eq!(c.add("n", 2).unwrap(), 2);
        assert_eq!(c.add("n", 3).unwrap(), 5);
        let others: Vec<_> = (1..3).map(|r| std::thread::spawn(move || StoreClient::connect("127.0.0.1", port, r, t).unwrap().barrier("b", 3))).collect();
        c.barrier("b", 3).unwrap();
        for o in others {
            o.join().unwrap().unwrap();
        }
    }

    #[test]
    fn timeouts_name_the_address_and_what_timed_out() {
        // nothing listens: the error names the rank, the address and the timeout
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t0 = Instant::now();
        let e = StoreClient::connect("127.0.0.1", free, 3, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().starts_with(&format!("rank 3: no store at 127.0.0.1:{free} after 0.3 s (")), "{e}");
        // a key nobody sets
        let server = StoreServer::listen("127.0.0.1", 0).unwrap();
        let port = server.local_addr().port();
        let mut c = StoreClient::connect("127.0.0.1", port, 2, Duration::from_millis(200)).unwrap();
        let e = c.get("lockstep/nccl_id").unwrap_err();
        assert_eq!(e.to_string(), format!("rank 2: timed out after 0.2 s waiting for key `lockstep/nccl_id` at 127.0.0.1:{port}"));
        let e = c.barrier("start", 2).unwrap_err();
        assert!(e.to_string().contains("barrier `start`: 1 of 2 ranks"), "{e}");
        // a port in use
        let e = StoreServer::listen("127.0.0.1", port).unwrap_err();
        assert!(e.to_string().starts_with(&format!("rank 0: cannot listen on 127.0.0.1:{port}:")), "{e}");
    }

    #[test]
    fn an_oversize_frame_is_refused_without_allocating_it() {
        let server = StoreServer::listen("127.0.0.1", 0).unwrap();
        let mut raw = TcpStream::connect(server.reachable_addr()).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // claims 4 GiB - 1 and sends nothing more
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let rep = read_frame(&mut raw, MAX_FRAME_BYTES).unwrap();
        assert_eq!(rep[0], 1);
        assert!(String::from_utf8_lossy(&rep[1..]).contains("exceeds the cap of 1048576 bytes"), "{rep:?}");
        // and then closes the connection
        assert!(matches!(read_frame(&mut raw, MAX_FRAME_BYTES), Err(FrameError::Closed)));
        // the client refuses to send one
        let mut c = StoreClient::connect("127.0.0.1", server.local_addr().port(), 0, Duration::from_secs(2)).unwrap();
        let e = c.set("big", &vec![0u8; MAX_FRAME_BYTES]).unwrap_err();
        assert!(e.to_string().contains("exceeds the cap"), "{e}");
        // garbage: an error reply, the store keeps serving
        let mut c = StoreClient::connect("127.0.0.1", server.local_addr().port(), 0, Duration::from_secs(2)).unwrap();
        let e = c.request(9, "k", &[], Duration::from_secs(1), || "x".into()).unwrap_err();
        assert!(e.to_string().contains("unknown operation 9"), "{e}");
        c.set("k", b"v").unwrap();
        assert_eq!(c.get("k").unwrap(), b"v");
    }

    #[test]
    fn a_host_that_is_not_ours_falls_back_to_every_interface() {
        // 192.0.2.1 (TEST-NET-1) is nobody's address
        match StoreServer::listen("192.0.2.1", 0) {
            Ok(s) => assert!(s.local_addr().ip().is_unspecified(), "{:?}", s.local_addr()),
            Err(e) => panic!("{e}"),
        }
    }
}
