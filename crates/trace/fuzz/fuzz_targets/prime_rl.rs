//! prime-rl `{data, shape, start, dtype}` payload: never panics; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{prime_rl, ImportMeta};

fuzz_target!(|data: &[u8]| {
    let meta = ImportMeta { max_ids: 1 << 20, ..ImportMeta::default() };
    if let Ok(t) = prime_rl::from_json(data, &meta) {
        let v = prime_rl::to_json(&t, None).expect("exports");
        let text = serde_json::to_vec(&v).expect("json");
        let m2 = ImportMeta { num_experts: Some(t.meta().num_experts), num_tokens: Some(t.num_tokens()), ..meta };
        let back = prime_rl::from_json(&text, &m2).expect("re-parses");
        assert!(back.bits_eq(&t));
    }
});
