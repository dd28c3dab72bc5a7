//! The `.lstrace` decoder: any bytes must decode or fail with an error, never panic; whatever
//! decodes must re-encode and decode to the same trace.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::{decode_block, encode_block, encode_file, scan_blocks, DecodeLimits, Reader};

const LIMITS: DecodeLimits = DecodeLimits { max_ids: 1 << 20 };

fn check(t: &lockstep_trace::RouteTrace) {
    let b = encode_block(t);
    let (back, used) = decode_block(&b, "re", LIMITS).expect("re-encoded block decodes");
    assert_eq!(used, b.len());
    assert!(back.bits_eq(t), "block round trip");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Reader::from_bytes(data.to_vec()) {
        let r = r.with_limits(LIMITS);
        let mut ok = Vec::new();
        for t in r.iter().flatten() {
            check(&t);
            ok.push(t);
        }
        if ok.len() == r.len() {
            let f = encode_file(&ok);
            let r2 = Reader::from_bytes(f).expect("re-encoded file opens");
            assert_eq!(r2.len(), ok.len());
        }
    }
    let (seqs, _err) = scan_blocks(data, LIMITS);
    for t in &seqs {
        check(t);
    }
    // a bare block too (skipping the file header exercises the body parser directly)
    if let Ok((t, _)) = decode_block(data, "raw", LIMITS) {
        check(&t);
    }
});
