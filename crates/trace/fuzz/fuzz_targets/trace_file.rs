//! The `.lstrace` decoder: any bytes must decode or fail with an error, never panic; whatever
//! decodes must re-encode and decode to the same trace.
//!
//! First byte selects the entry point: `0` a whole file (reader, index, scan), `1` a block
//! *body* that the target seals with a correct CRC32 (so mutations reach the body parser and
//! the id codecs instead of stopping at the checksum), anything else a raw block.
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

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    match mode {
        0 => {
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
        }
        1 => {
            let mut block = b"LSQB".to_vec();
            block.extend_from_slice(&(data.len() as u64).to_le_bytes());
            block.extend_from_slice(data);
            block.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
            if let Ok((t, used)) = decode_block(&block, "body", LIMITS) {
                assert_eq!(used, block.len());
                check(&t);
                // canonical encodings re-encode to the same bytes
                if encode_block(&t) != block {
                    let again = encode_block(&t);
                    let (t2, _) = decode_block(&again, "again", LIMITS).expect("canonical");
                    assert!(t2.bits_eq(&t));
                }
            }
        }
        _ => {
            if let Ok((t, _)) = decode_block(data, "raw", LIMITS) {
                check(&t);
            }
        }
    }
});
