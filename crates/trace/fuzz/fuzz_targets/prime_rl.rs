//! prime-rl `{data, shape, start, dtype}` payloads / `/generate` responses and the msgpack
//! trainer transport: never panic; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{prime_rl, ExportMeta, ImportMeta};

fuzz_target!(|data: &[u8]| {
    let meta = ImportMeta { max_ids: 1 << 20, ..ImportMeta::default() };
    let ex = ExportMeta { num_hidden_layers: None, compact: true };
    if let Ok(t) = prime_rl::from_json(data, &meta) {
        if let Ok((v, _)) = prime_rl::to_json(&t, None, &ex) {
            let text = serde_json::to_vec(&v).expect("json");
            let m2 = ImportMeta {
                num_experts: Some(t.meta().num_experts),
                layers: Some(t.layers().to_vec()),
                num_tokens: Some(t.num_tokens()),
                ..meta.clone()
            };
            let back = prime_rl::from_json(&text, &m2).expect("re-parses");
            assert_eq!(back.ids(), t.ids());
        }
    }
    if let Ok(t) = prime_rl::from_msgpack(data, &meta) {
        if let Ok(b) = prime_rl::to_msgpack(&t, None, &ex) {
            let m2 = ImportMeta { num_experts: Some(t.meta().num_experts), layers: Some(t.layers().to_vec()), ..meta };
            if let Ok(back) = prime_rl::from_msgpack(&b, &m2) {
                assert_eq!(back.missing(), t.missing());
            }
        }
    }
});
