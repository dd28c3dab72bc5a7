//! vLLM JSON (current base64 `.npy` strings, 0.21 nested lists, whole responses): never panics;
//! what parses round-trips through the 0.21 form.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{vllm, ExportMeta, ImportMeta};

fuzz_target!(|data: &[u8]| {
    let meta = ImportMeta { max_ids: 1 << 20, ..ImportMeta::default() };
    // (a trace without layer columns has nothing nested lists can carry the top-k of)
    if let Some(t) = vllm::from_json(data, &meta).ok().filter(|t| t.num_layers() > 0) {
        let ex = ExportMeta { num_hidden_layers: None, compact: true };
        let (v, _) = vllm::to_json_v021(&t, &ex).expect("exports");
        let text = serde_json::to_vec(&v).expect("json");
        let m2 = ImportMeta {
            num_experts: Some(t.meta().num_experts),
            layers: Some(t.layers().to_vec()),
            num_tokens: Some(t.num_tokens()),
            ..meta
        };
        let back = vllm::from_json(&text, &m2).expect("re-parses");
        assert_eq!(back.ids(), t.ids());
        assert_eq!(back.missing(), t.missing());
    }
});
