//! SGLang `meta_info.routed_experts` base64 payload: never panics; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{sglang, ExportMeta, ImportMeta};

fuzz_target!(|data: &[u8]| {
    let (flag, body) = data.split_first().map(|(f, b)| (*f, b)).unwrap_or((0, data));
    let layers = (flag & 7) as u32;
    let top_k = (flag >> 3) as u32 & 7;
    let meta = ImportMeta {
        layers: if layers > 0 { Some((0..layers).collect()) } else { None },
        top_k: if top_k > 0 { Some(top_k) } else { None },
        max_ids: 1 << 20,
        ..ImportMeta::default()
    };
    if let Ok(t) = sglang::from_json(body, &meta) {
        let Ok((v, _)) = sglang::to_json(&t, &ExportMeta { num_hidden_layers: None, compact: true }) else { return };
        let text = serde_json::to_vec(&v).expect("json");
        let m2 = ImportMeta {
            num_experts: Some(t.meta().num_experts),
            layers: Some(t.layers().to_vec()),
            top_k: t.top_k().map(|k| k as u32),
            num_hidden_layers: None,
            ..meta
        };
        if let Ok(back) = sglang::from_json(&text, &m2) {
            assert_eq!(back.ids(), t.ids());
        }
    }
});
