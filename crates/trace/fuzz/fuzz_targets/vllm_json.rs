//! vLLM OpenAI-response nested lists: never panics; what parses round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{vllm, ImportMeta};

fuzz_target!(|data: &[u8]| {
    let meta = ImportMeta { max_ids: 1 << 20, ..ImportMeta::default() };
    if let Ok(t) = vllm::from_json(data, &meta) {
        let v = vllm::to_json(&t).expect("exports");
        let text = serde_json::to_vec(&v).expect("json");
        let back =
            vllm::from_json(&text, &ImportMeta { num_experts: Some(t.meta().num_experts), ..meta }).expect("re-parses");
        assert!(back.bits_eq(&t));
    }
});
