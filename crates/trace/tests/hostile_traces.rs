//! Hostile `.lstrace` input, counted: bit flips, byte overwrites, truncations and length-field
//! edits of valid encodings — of whole files (`Reader`, `scan_blocks`) and of single blocks
//! re-sealed with a valid CRC so the decoder behind the checksum sees the damage
//! (`decode_block`). Every input must be an error naming a field, or decode to a trace that
//! re-encodes and decodes back bit for bit; nothing may panic. Prints `hostile_traces: tried N,
//! refused R, decoded-and-round-tripped D, panics P`. Deterministic (seeded xorshift).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{make, make_variable, Rng, Spec};
use lockstep_trace::{decode_block, encode_block, encode_file, scan_blocks, DecodeLimits, ProbDtype, Reader, RouteTrace, TraceError};

fn limits() -> DecodeLimits {
    DecodeLimits { max_ids: 1 << 20 }
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

/// A block with its CRC recomputed over the (edited) body, so the decoder sees the edit.
fn reseal(mut block: Vec<u8>) -> Vec<u8> {
    let n = block.len();
    if n >= 16 {
        let crc = crc32(&block[12..n - 4]);
        block[n - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    block
}

fn traces() -> Vec<RouteTrace> {
    vec![
        make(&Spec::default()),
        make(&Spec { tokens: 3, ordered: false, probs: Some(ProbDtype::Bf16), ..Spec::default() }),
        make(&Spec { ordered: true, probs: Some(ProbDtype::F16), missing: vec![2], ..Spec::default() }),
        make(&Spec { ordered: false, e: 128, k: 8, layers: vec![0, 1], seed: 7, ..Spec::default() }),
        make(&Spec { e: 65535, k: 8, probs: Some(ProbDtype::F32), tokens: 4, ..Spec::default() }),
        make_variable(6, 2, 9, 1, &[3]),
        make_variable(4, 3, 8, 5, &[]),
    ]
}

#[derive(Default)]
struct Count {
    tried: usize,
    refused: usize,
    decoded: usize,
    panics: usize,
    failures: Vec<String>,
}

impl Count {
    /// Runs one input; `f` returns the number of traces decoded (each already round-tripped).
    fn run(&mut self, what: &str, f: impl FnOnce() -> Result<usize, String>) {
        self.tried += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(0)) => self.refused += 1,
            Ok(Ok(_)) => self.decoded += 1,
            Ok(Err(e)) => self.failures.push(format!("{what}: {e}")),
            Err(p) => {
                self.panics += 1;
                let m = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                self.failures.push(format!("{what}: PANIC {m}"));
            }
        }
    }
}

fn named(e: &TraceError) -> Result<usize, String> {
    if e.field().is_empty() {
        Err(format!("error without a field: {e}"))
    } else {
        Ok(0)
    }
}

/// A decoded trace must re-encode and decode back to itself.
fn round_trip(t: &RouteTrace) -> Result<(), String> {
    let b = encode_block(t);
    let (back, used) = decode_block(&b, "re-encoded", limits()).map_err(|e| format!("re-encoded block does not decode: {e}"))?;
    if used != b.len() || !back.bits_eq(t) {
        return Err("re-encoded trace differs".into());
    }
    Ok(())
}

/// One block: an error naming a field, or a trace that round-trips.
fn block(b: &[u8]) -> Result<usize, String> {
    match decode_block(b, "hostile", limits()) {
        Err(e) => named(&e),
        Ok((t, used)) => {
            if used > b.len() {
                return Err(format!("used {used} of {} bytes", b.len()));
            }
            round_trip(&t).map(|()| 1)
        }
    }
}

/// A whole file: the reader (every sequence) and the block scanner.
fn file(f: &[u8]) -> Result<usize, String> {
    let (scanned, _) = scan_blocks(f, limits());
    for t in &scanned {
        round_trip(t)?;
    }
    let r = match Reader::from_bytes(f.to_vec()) {
        Err(e) => return named(&e),
        Ok(r) => r,
    };
    let mut n = 0;
    for i in 0..r.len() {
        match r.get(i) {
            Err(e) => {
                named(&e)?;
            }
            Ok(t) => {
                round_trip(&t)?;
                n += 1;
            }
        }
    }
    Ok(if n == r.len() && n > 0 { n } else { 0 })
}

#[test]
fn hostile_traces_are_errors_or_round_trips_never_panics() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut c = Count::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let ts = traces();
    let blocks: Vec<Vec<u8>> = ts.iter().map(encode_block).collect();
    let f = encode_file(&ts);
    // blocks: every bit of the first 64 bytes flipped and re-sealed, then random flips
    for (bi, b) in blocks.iter().enumerate() {
        for bit in 0..(b.len().min(64) * 8) {
            let mut m = b.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            let m = if bit >= 16 * 8 { reseal(m) } else { m };
            c.run(&format!("block {bi} bit {bit}"), || block(&m));
        }
        for i in 0..200 {
            let mut m = b.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(m.len() as u64) as usize;
                m[at] ^= 1 << rng.below(8);
            }
            let m = reseal(m);
            c.run(&format!("block {bi} random flips {i}"), || block(&m));
        }
        for i in 0..60 {
            let mut m = b.clone();
            let at = 12 + rng.below((m.len() - 16) as u64) as usize;
            let x = [0u8, 0xff, 0x7f, 0x80][rng.below(4) as usize];
            for y in m.iter_mut().skip(at).take(1 + rng.below(8) as usize) {
                *y = x;
            }
            let m = reseal(m);
            c.run(&format!("block {bi} overwrite {i}"), || block(&m));
        }
        // every truncation, sealed and not
        for n in 0..b.len() {
            let m = b[..n].to_vec();
            c.run(&format!("block {bi} truncated to {n}"), || block(&m));
            if n >= 16 && n % 3 == 0 {
                let m = reseal(b[..n].to_vec());
                c.run(&format!("block {bi} truncated to {n}, resealed"), || block(&m));
            }
        }
        // 32-bit fields set to extremes (lengths, counts), re-sealed
        for at in (4..b.len().saturating_sub(8).min(80)).step_by(4) {
            for v in [0u32, 1, u32::MAX, 0x8000_0000, 1 << 24] {
                let mut m = b.clone();
                m[at..at + 4].copy_from_slice(&v.to_le_bytes());
                let m = if at >= 12 { reseal(m) } else { m };
                c.run(&format!("block {bi} u32 at {at} = {v}"), || block(&m));
            }
        }
        // trailing bytes and two blocks back to back
        let mut m = b.clone();
        m.extend_from_slice(&[0xab; 7]);
        c.run(&format!("block {bi} + trailing"), || block(&m));
    }
    // whole files: random flips (unsealed: the CRCs must catch them), header bytes, truncations
    for i in 0..400 {
        let mut m = f.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(m.len() as u64) as usize;
            m[at] ^= 1 << rng.below(8);
        }
        c.run(&format!("file random flips {i}"), || file(&m));
    }
    for at in 0..32.min(f.len()) {
        for x in [0u8, 0xff] {
            let mut m = f.clone();
            m[at] = x;
            c.run(&format!("file byte {at} = {x}"), || file(&m));
        }
    }
    for i in 0..300 {
        let n = rng.below(f.len() as u64) as usize;
        let m = f[..n].to_vec();
        c.run(&format!("file truncated {i} to {n}"), || file(&m));
    }
    for i in 0..64 {
        let tail = f.len() - 8 - i;
        let mut m = f.clone();
        m[tail..tail + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        c.run(&format!("file u64::MAX at end - {}", 8 + i), || file(&m));
    }
    c.run("empty file", || file(&[]));
    c.run("file of zeros", || file(&[0u8; 4096]));
    std::panic::set_hook(prev);
    eprintln!(
        "hostile_traces: tried {}, refused {} (error naming a field), decoded-and-round-tripped {}, panics {}, mishandled {}",
        c.tried,
        c.refused,
        c.decoded,
        c.panics,
        c.failures.len()
    );
    assert!(c.tried >= 500, "{} inputs", c.tried);
    assert_eq!(c.panics, 0, "panics:\n{}", c.failures.join("\n"));
    assert!(c.failures.is_empty(), "{} mishandled:\n{}", c.failures.len(), c.failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n"));
}
