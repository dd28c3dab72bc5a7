//! vLLM `.npy` parser: never panics; what parses round-trips bitwise through a lockstep block.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_trace::interop::{vllm, ExportMeta, ImportMeta};
use lockstep_trace::npy::{read_npy, write_npy};
use lockstep_trace::{decode_block, encode_block, DecodeLimits};

fuzz_target!(|data: &[u8]| {
    if let Ok(arr) = read_npy(data) {
        let bytes = write_npy(&arr).expect("parsed array writes");
        assert_eq!(read_npy(&bytes).expect("written array parses"), arr);
    }
    let (flag, body) = data.split_first().map(|(f, b)| (*f, b)).unwrap_or((0, data));
    let meta = ImportMeta {
        num_experts: if flag & 1 == 1 { Some(flag as u32 >> 1) } else { None },
        max_ids: 1 << 20,
        ..ImportMeta::default()
    };
    if let Ok(t) = vllm::from_npy(body, &meta) {
        let (back, _) = decode_block(&encode_block(&t), "re", DecodeLimits::default()).expect("block");
        assert!(back.bits_eq(&t));
        let arr = read_npy(body).expect("parsed before");
        // exports; where the layout says the same (no unknown rows, no trailing dense column,
        // a dtype vLLM writes) the ids are the payload's
        if let Ok((out, w)) = vllm::to_array(&back, Some(arr.dtype), &ExportMeta::default()) {
            if w.start == 0 && out.shape == arr.shape && t.num_missing() == 1 {
                assert_eq!(out.data, arr.data);
            }
        }
    }
});
