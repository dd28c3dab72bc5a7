//! Benchmark (not a test): a synthetic 32K-token, 48-layer, top-8, 128-expert trace.
//! Prints bytes/token and encode / decode throughput (MB/s of uint8-equivalent ids:
//! tokens x layers x k bytes) for unordered (set) and ordered (selection order) traces.
//!
//! `cargo bench -p lockstep-trace --bench trace`

use lockstep_trace::{decode_block, encode_block, DecodeLimits, RouteTrace, TraceMeta};
use std::time::Instant;

const TOKENS: usize = 32 * 1024;
const LAYERS: usize = 48;
const K: usize = 8;
const E: u32 = 128;

/// Deterministic xorshift ids with a skewed (Zipf-like) expert popularity, distinct per row.
fn synthetic_ids() -> Vec<u16> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut ids = Vec::with_capacity(TOKENS * LAYERS * K);
    for _ in 0..TOKENS * LAYERS {
        let mut row: Vec<u16> = Vec::with_capacity(K);
        while row.len() < K {
            let r = next();
            let a = (r % E as u64) as u16;
            let b = ((r >> 20) % E as u64) as u16;
            let id = a.min(b.max(a / 2)); // mild skew toward low ids
            if !row.contains(&id) {
                row.push(id);
            }
        }
        ids.extend_from_slice(&row);
    }
    ids
}

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..n {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap_or_else(f))
}

fn run(ordered: bool, ids: &[u16]) {
    let meta =
        TraceMeta { num_experts: E, top_k: K as u32, prompt_len: 1024, fingerprint: 7, policy_version: 3, ordered };
    let layers: Vec<u32> = (0..LAYERS as u32).collect();
    let trace = RouteTrace::new(meta, layers, TOKENS, ids.to_vec(), vec![false; TOKENS], None).expect("trace");
    let u8_bytes = (TOKENS * LAYERS * K) as f64;
    let (enc_s, block) = best_of(5, || encode_block(&trace));
    let (dec_s, back) = best_of(10, || decode_block(&block, "bench", DecodeLimits::default()).expect("decode").0);
    assert!(back.bits_eq(&trace), "round trip");
    let name = if ordered { "ordered  " } else { "unordered" };
    println!(
        "{name}: {:8.2} bytes/token (block {} bytes; uint8 384, int32 1536) | encode {:7.1} MB/s ({:6.2} ms) | decode {:7.1} MB/s ({:6.2} ms per 32K-token sample)",
        block.len() as f64 / TOKENS as f64,
        block.len(),
        u8_bytes / enc_s / 1e6,
        enc_s * 1e3,
        u8_bytes / dec_s / 1e6,
        dec_s * 1e3,
    );
}

fn main() {
    println!("synthetic trace: {TOKENS} tokens x {LAYERS} MoE layers x top-{K} of {E} experts (single thread)");
    let bound = (1..=K).fold(1f64, |a, i| a * (E as f64 - K as f64 + i as f64) / i as f64).log2() * LAYERS as f64 / 8.0;
    println!("k-subset information bound: {bound:.1} bytes/token");
    let ids = synthetic_ids();
    run(false, &ids);
    run(true, &ids);
}
