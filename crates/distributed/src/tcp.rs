//! The collectives over TCP between processes, for CPU ranks (`lockstep train --device cpu`
//! under torchrun, `srun` or `lockstep launch --nproc N`): [`TcpComm`] implements
//! [`Collective`] as a star through rank 0 — every rank sends rank 0 its part, rank 0 combines
//! them in rank order and sends every rank its result. So a sum is added in rank order exactly
//! as `local` adds it (`acc = t_0; acc = acc + t_1; ...`), and every rank gets the same bytes.
//! Fine for CPU-sized groups and models; GPUs use NCCL.
//!
//! Joining ([`TcpComm::join`]): rank 0 listens on a free port of the address the store listens
//! on and publishes it in the store (`lockstep/tcp/port`); the others connect to `MASTER_ADDR`
//! at that port and say who they are; `join` returns once every rank is in.
//!
//! Failures: a rank that disconnects (it exited, crashed, was killed) or sends nothing within
//! the timeout makes rank 0 tell every other rank, and every rank's pending and later
//! collectives return [`CollectiveError::Aborted`] naming it; if rank 0 goes, the others' name
//! rank 0. Nobody waits for ever.
//!
//! Wire format: frames as in `store` (u32 LE length, then the bytes; at most
//! [`MAX_FRAME_BYTES`], read as they arrive). Hello: `"LSTC"`, version u32, rank u32, world
//! u32; rank 0 answers `"LSTC"` once all are in. A contribution: `op u8` (1 all-to-all, 2
//! counts, 3 sum, 4 host gather), `seq u64` (the collective's number: every rank must call the
//! same ones in the same order), the body; a result: status u8 (0 ok, then the body; 1 the group
//! failed, then the failed rank u32 and the cause, UTF-8). Bodies are a u32 count of items,
//! each a tensor — dtype u8 (0 u8, 1 u32, 2 i16, 3 i32, 4 i64, 5 bf16, 6 f16, 7 f32, 8 f64),
//! rank u8 (≤ 8), dims u64 each, then the elements, little-endian, row-major — or a list of
//! 64-bit words (u64 count, then u64 LE: counts, or f64 bit patterns).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lockstep_collective::{offsets, Collective, CollectiveError, Result};

use crate::store::{connect_retrying, display_addr, read_frame, secs, write_frame, Cursor, FrameError, StoreClient, StoreError};

/// Largest frame sent or accepted (256 MiB): a larger tensor is refused with an error.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
const MAGIC: &[u8; 4] = b"LSTC";
const VERSION: u32 = 1;
const PORT_KEY: &str = "lockstep/tcp/port";

const A2A: u8 = 1;
const COUNTS: u8 = 2;
const SUM: u8 = 3;
const HOST: u8 = 4;

#[derive(Debug)]
enum Links {
    /// rank 0: the connection to rank r at r - 1
    Hub(Vec<TcpStream>),
    Peer(TcpStream),
}

#[derive(Debug)]
struct State {
    links: Links,
    seq: u64,
    /// the rank that failed first and why; every later collective returns it
    failed: Option<(usize, String)>,
}

/// One rank of a TCP process group (CPU tensors; others are copied to the CPU and back).
#[derive(Debug)]
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// rank 0's address, for errors
    hub: String,
    state: Mutex<State>,
}

/// Why a rank could not join the TCP group.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Group(#[from] CollectiveError),
    #[error("{0}")]
    Listen(String),
}

fn aborted(rank: usize, cause: impl Into<String>) -> CollectiveError {
    CollectiveError::Aborted { rank, cause: cause.into() }
}

impl TcpComm {
    /// Join the group through the store: rank 0 listens beside it (on `bind_ip`, the store's
    /// address) and publishes its port; the others connect to `host` at that port.
    pub fn join(rank: usize, world: usize, host: &str, bind_ip: std::net::IpAddr, store: &mut StoreClient, timeout: Duration) -> std::result::Result<Self, JoinError> {
        if rank == 0 {
            let listener = TcpListener::bind((bind_ip, 0)).map_err(|e| JoinError::Listen(format!("rank 0: listening for the TCP group on {bind_ip}: {e}")))?;
            let port = listener.local_addr().map_err(|e| JoinError::Listen(format!("rank 0: {e}")))?.port();
            store.set(PORT_KEY, &port.to_le_bytes())?;
            Ok(Self::hub(listener, world, timeout)?)
        } else {
            let p = store.get(PORT_KEY)?;
            let port = <[u8; 2]>::try_from(p.as_slice()).map(u16::from_le_bytes).map_err(|_| JoinError::Listen(format!("rank {rank}: `{PORT_KEY}` in the store at {}: {} bytes, not a port", store.addr(), p.len())))?;
            Ok(Self::connect(host, port, rank, world, timeout)?)
        }
    }

    /// Rank 0 of a group of `world` on `listener`: waits (at most `timeout`) for the others.
    pub fn hub(listener: TcpListener, world: usize, timeout: Duration) -> Result<Self> {
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        listener.set_nonblocking(true).map_err(|e| candle_core::Error::Msg(format!("TCP group at {at}: {e}")))?;
        while peers.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((s, from)) => {
                    // a peer that does not say hello properly is dropped; the rest keep joining
                    if let Ok(r) = hello_from(&s, world, deadline, from) {
                        if peers[r - 1].is_none() {
                            peers[r - 1] = Some(s);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = peers.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| i + 1).collect();
                        return Err(aborted(missing[0], format!("rank 0: ranks {missing:?} of {world} did not join the TCP group at {at} within {} s", secs(timeout))));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(candle_core::Error::Msg(format!("TCP group at {at}: accepting: {e}")).into()),
            }
        }
        let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
        for (i, p) in peers.iter_mut().enumerate() {
            p.set_nonblocking(false).and_then(|_| p.set_write_timeout(Some(timeout))).map_err(|e| candle_core::Error::Msg(format!("TCP group at {at}: {e}")))?;
            write_frame(p, MAGIC, MAX_FRAME_BYTES).map_err(|e| aborted(i + 1, format!("rank 0: greeting rank {}: {e}", i + 1)))?;
        }
        Ok(TcpComm { rank: 0, world, timeout, hub: at, state: Mutex::new(State { links: Links::Hub(peers), seq: 0, failed: None }) })
    }

    /// Rank `rank` of `world`: connects to rank 0 at `host:port` (retrying until `timeout`)
    /// and waits until every rank is in.
    pub fn connect(host: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        let at = display_addr(host, port);
        if rank == 0 || rank >= world {
            return Err(CollectiveError::Mismatch(format!("TCP group: rank {rank} of {world} cannot connect to rank 0")));
        }
        let mut s = connect_retrying(host, port, timeout).map_err(|cause| aborted(0, format!("rank {rank}: no TCP group at {at} after {} s ({cause})", secs(timeout))))?;
        let mut hello = MAGIC.to_vec();
        for v in [VERSION, rank as u32, world as u32] {
            hello.extend(v.to_le_bytes());
        }
        let lost = |e: FrameError| aborted(0, format!("rank {rank}: joining the TCP group at {at}: {e}"));
        s.set_write_timeout(Some(timeout)).and_then(|_| s.set_read_timeout(Some(timeout))).map_err(|e| lost(FrameError::Io(e)))?;
        write_frame(&mut s, &hello, MAX_FRAME_BYTES).map_err(lost)?;
        match read_frame(&mut s, 64) {
            Ok(m) if m == MAGIC => {}
            Ok(_) => return Err(lost(FrameError::Io(std::io::Error::other("not a lockstep TCP group")))),
            Err(FrameError::TimedOut) => return Err(aborted(0, format!("rank {rank}: the TCP group at {at} was not complete within {} s", secs(timeout)))),
            Err(e) => return Err(lost(e)),
        }
        Ok(TcpComm { rank, world, timeout, hub: at, state: Mutex::new(State { links: Links::Peer(s), seq: 0, failed: None }) })
    }

    /// One collective: send `body` (tagged `op`) and return this rank's result body. On rank 0,
    /// `combine` turns every rank's body (in rank order) into every rank's result, or names the
    /// rank whose body was wrong.
    fn round(&self, op: u8, body: Vec<u8>, combine: impl FnOnce(Vec<Vec<u8>>) -> std::result::Result<Vec<Vec<u8>>, (usize, String)>) -> Result<Vec<u8>> {
        let mut st = self.state.lock().map_err(|_| CollectiveError::Poisoned)?;
        if let Some((r, c)) = &st.failed {
            return Err(aborted(*r, c.clone()));
        }
        st.seq += 1;
        let seq = st.seq;
        let r = match &mut st.links {
            Links::Hub(peers) => hub_round(peers, op, seq, body, self.timeout, combine),
            Links::Peer(s) => peer_round(s, self.rank, &self.hub, op, seq, body, self.timeout),
        };
        if let Err((rank, cause)) = &r {
            st.failed = Some((*rank, cause.clone()));
        }
        r.map_err(|(rank, cause)| aborted(rank, cause))
    }
}

/// Read a peer's hello; its rank.
fn hello_from(s: &TcpStream, world: usize, deadline: Instant, from: SocketAddr) -> std::result::Result<usize, String> {
    let mut s = s;
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    // a peer says hello as soon as it connects: a connection that does not is not left to
    // hold up the others for long
    let wait = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), Duration::from_secs(2));
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let m = read_frame(&mut s, 64).map_err(|e| format!("{from}: {e}"))?;
    let mut c = Cursor(&m);
    if c.bytes(4)? != MAGIC || c.u32()? != VERSION {
        return Err(format!("{from}: not a lockstep TCP peer of this version"));
    }
    let (rank, w) = (c.u32()? as usize, c.u32()? as usize);
    if w != world || rank == 0 || rank >= world {
        return Err(format!("{from}: rank {rank} of {w}, in a group of {world}"));
    }
    Ok(rank)
}

fn contribution(op: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(9 + body.len());
    m.push(op);
    m.extend(seq.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn failure(rank: usize, cause: &str) -> Vec<u8> {
    let mut m = vec![1u8];
    m.extend((rank as u32).to_le_bytes());
    m.extend(cause.as_bytes().iter().take(4096));
    m
}

fn hub_round(
    peers: &mut [TcpStream], op: u8, seq: u64, body: Vec<u8>, timeout: Duration,
    combine: impl FnOnce(Vec<Vec<u8>>) -> std::result::Result<Vec<Vec<u8>>, (usize, String)>,
) -> std::result::Result<Vec<u8>, (usize, String)> {
    let deadline = Instant::now() + timeout;
    let mut bodies = vec![body];
    let mut fail = None;
    for (i, p) in peers.iter_mut().enumerate() {
        let r = i + 1;
        let _ = p.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))));
        match read_frame(p, MAX_FRAME_BYTES) {
            Ok(m) => {
                let mut c = Cursor(&m);
                match (c.u8(), c.u64()) {
                    (Ok(o), Ok(s)) if o == op && s == seq => bodies.push(c.rest().to_vec()),
                    (Ok(o), Ok(s)) => {
                        fail = Some((r, format!("rank {r} called collective #{s} (op {o}) while rank 0 called #{seq} (op {op}): the ranks' collectives differ")));
                        break;
                    }
                    _ => {
                        fail = Some((r, format!("rank {r} sent a malformed message")));
                        break;
                    }
                }
            }
            Err(FrameError::TimedOut) => {
                fail = Some((r, format!("rank {r} sent nothing to rank 0 within {} s", secs(timeout))));
                break;
            }
            Err(FrameError::Closed) => {
                fail = Some((r, format!("rank {r} disconnected (it exited or crashed)")));
                break;
            }
            Err(e) => {
                fail = Some((r, format!("rank {r}: {e}")));
                break;
            }
        }
    }
    let results = match fail {
        Some(f) => Err(f),
        None => combine(bodies),
    };
    let results = match results {
        Ok(res) if res.len() == peers.len() + 1 => res,
        Ok(res) => Err((0, format!("rank 0: {} results for {} ranks", res.len(), peers.len() + 1)))?,
        Err((rank, cause)) => {
            let msg = failure(rank, &cause);
            // every peer: the failed one too, when it is alive (its message was wrong)
            for p in peers.iter_mut() {
                let _ = write_frame(p, &msg, MAX_FRAME_BYTES);
            }
            return Err((rank, cause));
        }
    };
    let mut results = results.into_iter();
    let mine = results.next().unwrap_or_default();
    for (i, (p, res)) in peers.iter_mut().zip(results).enumerate() {
        let mut m = Vec::with_capacity(1 + res.len());
        m.push(0u8);
        m.extend(res);
        if let Err(e) = write_frame(p, &m, MAX_FRAME_BYTES) {
            let r = i + 1;
            // a rank that exits between sending its part and taking the result is as gone as
            // one that never sent: the same words (a race decides which of the two it is)
            let cause = match e {
                FrameError::Closed => format!("rank {r} disconnected (it exited or crashed) before taking its result"),
                e => format!("rank {r}: sending its result: {e}"),
            };
            return Err((r, cause));
        }
    }
    Ok(mine)
}

fn peer_round(s: &mut TcpStream, rank: usize, hub: &str, op: u8, seq: u64, body: Vec<u8>, timeout: Duration) -> std::result::Result<Vec<u8>, (usize, String)> {
    let lost = |e: FrameError| match e {
        FrameError::Closed => (0, format!("rank {rank}: rank 0 ({hub}) disconnected (it exited or crashed)")),
        FrameError::TimedOut => (0, format!("rank {rank}: no answer from rank 0 ({hub}) within {} s", secs(timeout))),
        e => (0, format!("rank {rank}: to rank 0 ({hub}): {e}")),
    };
    write_frame(s, &contribution(op, seq, &body), MAX_FRAME_BYTES).map_err(|e| match e {
        FrameError::TooBig { .. } => (rank, format!("rank {rank}: {e}")),
        e => lost(e),
    })?;
    // longer than rank 0 waits for the others, so its verdict on a missing rank arrives first
    let _ = s.set_read_timeout(Some(timeout + timeout.min(Duration::from_secs(5))));
    let m = read_frame(s, MAX_FRAME_BYTES).map_err(lost)?;
    let mut c = Cursor(&m);
    match c.u8() {
        Ok(0) => Ok(c.rest().to_vec()),
        Ok(1) => {
            let r = c.u32().map_err(|e| (0, e))? as usize;
            Err((r, String::from_utf8_lossy(c.rest()).into_owned()))
        }
        _ => Err((0, format!("rank {rank}: a malformed answer from rank 0 ({hub})"))),
    }
}

// ---- bodies ----

fn dtype_code(dt: DType) -> Result<u8> {
    Ok(match dt {
        DType::U8 => 0,
        DType::U32 => 1,
        DType::I16 => 2,
        DType::I32 => 3,
        DType::I64 => 4,
        DType::BF16 => 5,
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        other => return Err(CollectiveError::Unsupported(format!("TCP collective: dtype {other:?} not supported"))),
    })
}

/// Append a CPU tensor's elements, little-endian, row-major.
fn put_elems(out: &mut Vec<u8>, t: &Tensor) -> candle_core::Result<()> {
    macro_rules! le {
        ($T:ty) => {
            for x in t.to_vec1::<$T>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match t.dtype() {
        DType::U8 => out.extend(t.to_vec1::<u8>()?),
        DType::U32 => le!(u32),
        DType::I16 => le!(i16),
        DType::I32 => le!(i32),
        DType::I64 => le!(i64),
        DType::BF16 => le!(half::bf16),
        DType::F16 => le!(half::f16),
        DType::F32 => le!(f32),
        DType::F64 => le!(f64),
        other => candle_core::bail!("TCP collective: dtype {other:?} not supported"),
    }
    Ok(())
}

fn encode_tensors(ts: &[Tensor]) -> Result<Vec<u8>> {
    let mut out = (ts.len() as u32).to_le_bytes().to_vec();
    for t in ts {
        let dims = t.dims();
        if dims.len() > 8 {
            return Err(CollectiveError::Unsupported(format!("TCP collective: a tensor of rank {} (at most 8)", dims.len())));
        }
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        out.push(dtype_code(t.dtype())?);
        out.push(dims.len() as u8);
        for &d in dims {
            out.extend((d as u64).to_le_bytes());
        }
        put_elems(&mut out, &flat)?;
        if out.len() > MAX_FRAME_BYTES {
            return Err(CollectiveError::Unsupported(format!("TCP collective: {} bytes to send exceed the cap of {MAX_FRAME_BYTES} bytes", out.len())));
        }
    }
    Ok(out)
}

fn decode_tensors(b: &[u8]) -> std::result::Result<Vec<Tensor>, String> {
    let mut c = Cursor(b);
    let n = c.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let code = c.u8()?;
        let rank = c.u8()? as usize;
        if rank > 8 {
            return Err(format!("a tensor of rank {rank}"));
        }
        let dims = (0..rank).map(|_| c.u64().map(|d| d as usize)).collect::<std::result::Result<Vec<_>, _>>()?;
        let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("a tensor's shape overflows")?;
        let dt = [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64, DType::BF16, DType::F16, DType::F32, DType::F64].get(code as usize).copied().ok_or_else(|| format!("unknown dtype {code}"))?;
        let bytes = c.bytes(count.checked_mul(dt.size_in_bytes()).ok_or("a tensor's size overflows")?)?;
        macro_rules! le {
            ($T:ty, $n:expr) => {
                Tensor::from_vec(bytes.chunks_exact($n).map(|x| <$T>::from_le_bytes(x.try_into().unwrap_or([0; $n]))).collect::<Vec<$T>>(), dims.as_slice(), &Device::Cpu)
            };
        }
        let t = match dt {
            DType::U8 => Tensor::from_vec(bytes.to_vec(), dims.as_slice(), &Device::Cpu),
            DType::U32 => le!(u32, 4),
            DType::I16 => le!(i16, 2),
            DType::I32 => le!(i32, 4),
            DType::I64 => le!(i64, 8),
            DType::BF16 => le!(half::bf16, 2),
            DType::F16 => le!(half::f16, 2),
            DType::F32 => le!(f32, 4),
            _ => le!(f64, 8),
        };
        out.push(t.map_err(|e| e.to_string())?);
    }
    if !c.rest().is_empty() {
        return Err("trailing bytes after the tensors".into());
    }
    Ok(out)
}

fn encode_words(lists: &[Vec<u64>]) -> Vec<u8> {
    let mut out = (lists.len() as u32).to_le_bytes().to_vec();
    for l in lists {
        out.extend((l.len() as u64).to_le_bytes());
        for w in l {
            out.extend(w.to_le_bytes());
        }
    }
    out
}

fn decode_words(b: &[u8]) -> std::result::Result<Vec<Vec<u64>>, String> {
    let mut c = Cursor(b);
    let n = c.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let len = c.u64()? as usize;
        let raw = c.bytes(len.checked_mul(8).ok_or("a list's size overflows")?)?;
        out.push(raw.chunks_exact(8).map(|x| u64::from_le_bytes(x.try_into().unwrap_or([0; 8]))).collect());
    }
    if !c.rest().is_empty() {
        return Err("trailing bytes after the lists".into());
    }
    Ok(out)
}

/// A result body this rank cannot read: rank 0 sent it, so rank 0 is named.
fn bad_reply(e: String) -> CollectiveError {
    aborted(0, format!("a malformed result from rank 0: {e}"))
}

impl Collective for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_to_all_rows(&self, send: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> Result<Tensor> {
        let w = self.world;
        if send_rows.len() != w || recv_rows.len() != w || send_rows.iter().sum::<usize>() != send.dim(0)? {
            return Err(CollectiveError::Mismatch(format!("all_to_all_rows: {} rows to split as {send_rows:?} / receive {recv_rows:?} over {w} ranks", send.dim(0)?)));
        }
        let dev = send.device().clone();
        let send = send.detach();
        let blocks = offsets(send_rows).iter().zip(send_rows).map(|(&o, &r)| send.narrow(0, o, r)).collect::<candle_core::Result<Vec<_>>>()?;
        let got = self.round(A2A, encode_tensors(&blocks)?, |bodies| {
            let all = bodies.iter().enumerate().map(|(r, b)| decode_tensors(b).map_err(|e| (r, format!("rank {r}: {e}")))).collect::<std::result::Result<Vec<_>, _>>()?;
            if let Some(r) = all.iter().position(|b| b.len() != w) {
                return Err((r, format!("all_to_all_rows: rank {r} sent {} blocks for {w} ranks", all[r].len())));
            }
            (0..w).map(|to| encode_tensors(&all.iter().map(|b| b[to].clone()).collect::<Vec<_>>()).map_err(|e| (0, e.to_string()))).collect()
        })?;
        let got = decode_tensors(&got).map_err(bad_reply)?;
        if got.len() != w {
            return Err(bad_reply(format!("{} blocks for {w} ranks", got.len())));
        }
        for (from, (t, &want)) in got.iter().zip(recv_rows).enumerate() {
            if t.dim(0)? != want {
                return Err(CollectiveError::Mismatch(format!("all_to_all_rows: rank {from} sent {} rows, {want} expected", t.dim(0)?)));
            }
        }
        Ok(Tensor::cat(&got, 0)?.contiguous()?.to_device(&dev)?)
    }
    fn exchange_counts(&self, counts: &[usize]) -> Result<Vec<usize>> {
        let w = self.world;
        if counts.is_empty() || counts.len() % w != 0 {
            return Err(CollectiveError::Mismatch(format!("exchange_counts: {} counts are not {w} equal blocks (one per rank)", counts.len())));
        }
        let b = counts.len() / w;
        let mine: Vec<Vec<u64>> = counts.chunks(b).map(|c| c.iter().map(|&c| c as u64).collect()).collect();
        let got = self.round(COUNTS, encode_words(&mine), |bodies| {
            let all = bodies.iter().enumerate().map(|(r, x)| decode_words(x).map_err(|e| (r, format!("rank {r}: {e}")))).collect::<std::result::Result<Vec<_>, _>>()?;
            if let Some(r) = all.iter().position(|x| x.len() != w || x.iter().any(|blk| blk.len() != b)) {
                return Err((r, format!("exchange_counts: rank {r} sent other blocks than rank 0's {w} × {b}")));
            }
            Ok((0..w).map(|to| encode_words(&all.iter().map(|x| x[to].clone()).collect::<Vec<_>>())).collect())
        })?;
        let got = decode_words(&got).map_err(bad_reply)?;
        Ok(got.into_iter().flatten().map(|c| c as usize).collect())
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let dev = t.device().clone();
        let w = self.world;
        let got = self.round(SUM, encode_tensors(std::slice::from_ref(&t.detach()))?, |bodies| {
            let mut acc: Option<Tensor> = None;
            for (r, b) in bodies.iter().enumerate() {
                let x = decode_tensors(b).map_err(|e| (r, format!("rank {r}: {e}")))?;
                let [x] = <[Tensor; 1]>::try_from(x).map_err(|x| (r, format!("all_reduce_sum: rank {r} sent {} tensors", x.len())))?;
                // in rank order, as `local` adds them
                acc = Some(match acc {
                    None => x,
                    Some(a) => (a + x).map_err(|e| (r, format!("all_reduce_sum: rank {r}'s tensor: {e}")))?,
                });
            }
            let sum = encode_tensors(&acc.into_iter().collect::<Vec<_>>()).map_err(|e| (0, e.to_string()))?;
            Ok(vec![sum; w])
        })?;
        let got = decode_tensors(&got).map_err(bad_reply)?;
        let [sum] = <[Tensor; 1]>::try_from(got).map_err(|g| bad_reply(format!("{} tensors", g.len())))?;
        Ok(sum.to_device(&dev)?)
    }
    fn all_gather_host(&self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let w = self.world;
        let mine = vec![values.iter().map(|v| v.to_bits()).collect::<Vec<u64>>()];
        let got = self.round(HOST, encode_words(&mine), |bodies| {
            let mut all = Vec::with_capacity(w);
            for (r, b) in bodies.iter().enumerate() {
                let x = decode_words(b).map_err(|e| (r, format!("rank {r}: {e}")))?;
                let [x] = <[Vec<u64>; 1]>::try_from(x).map_err(|_| (r, format!("all_gather_host: rank {r} sent a malformed list")))?;
                all.push(x);
            }
            Ok(vec![encode_words(&all); w])
        })?;
        Ok(decode_words(&got).map_err(bad_reply)?.into_iter().map(|l| l.into_iter().map(f64::from_bits).collect()).collect())
    }
}
