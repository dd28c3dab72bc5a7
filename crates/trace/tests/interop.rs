//! vLLM / SGLang / prime-rl: bitwise round trips (directly and through a lockstep block) and
//! named errors.

mod common;
use common::{make, Spec};
use lockstep_trace::interop::{prime_rl, sglang, vllm, ImportMeta};
use lockstep_trace::npy::{read_npy, write_npy, NpyArray, NpyDtype};
use lockstep_trace::{decode_block, encode_block, DecodeLimits, RouteTrace, TraceError};

fn via_block(t: &RouteTrace) -> RouteTrace {
    let (b, _) = decode_block(&encode_block(t), "b", DecodeLimits::default()).unwrap();
    assert!(b.bits_eq(t));
    b
}

fn vllm_array(rows: usize, l: usize, k: usize, e: i32, dtype: NpyDtype, seed: u64) -> NpyArray {
    let mut rng = common::Rng(seed);
    let ids = common::random_ids(&mut rng, rows * l, k, e as u32);
    NpyArray { dtype, shape: vec![rows, l, k], data: ids.into_iter().map(|x| x as i32).collect() }
}

/// A numpy-written header (np.save of int32 [3, 2, 4]), byte for byte.
fn numpy_bytes(arr: &NpyArray) -> Vec<u8> {
    let descr = if arr.dtype == NpyDtype::I16 { "<i2" } else { "<i4" };
    let mut h = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}, {}), }}",
        arr.shape[0], arr.shape[1], arr.shape[2]
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    for &x in &arr.data {
        if arr.dtype == NpyDtype::I16 {
            out.extend_from_slice(&(x as i16).to_le_bytes());
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

#[test]
fn vllm_npy_round_trips_bitwise_int16_int32() {
    for dtype in [NpyDtype::I16, NpyDtype::I32] {
        let arr = vllm_array(7, 3, 4, 128, dtype, 9);
        let bytes = numpy_bytes(&arr);
        assert_eq!(write_npy(&arr).unwrap(), bytes, "header layout matches numpy");
        let meta = ImportMeta { num_experts: Some(128), layers: Some(vec![1, 5, 9]), ..ImportMeta::default() };
        let t = vllm::from_npy(&bytes, &meta).unwrap();
        // N - 1 convention: 7 rows -> 8 tokens, the last explicitly missing
        assert_eq!(t.num_tokens(), 8);
        assert_eq!(t.missing().iter().filter(|&&m| m).count(), 1);
        assert!(t.is_missing(7));
        assert_eq!(t.layers(), &[1, 5, 9]);
        let back = via_block(&t);
        assert_eq!(vllm::to_npy(&back, dtype).unwrap(), bytes, "bitwise through lockstep");
        // full N rows when told so
        let full = vllm::from_npy(&bytes, &ImportMeta { num_tokens: Some(7), ..meta.clone() }).unwrap();
        assert_eq!(full.num_missing(), 0);
        assert_eq!(vllm::to_npy(&full, dtype).unwrap(), bytes);
    }
}

#[test]
fn vllm_prompt_completion_and_json() {
    let p = vllm_array(3, 2, 2, 16, NpyDtype::I32, 3);
    let c = vllm_array(4, 2, 2, 16, NpyDtype::I32, 4);
    let meta = ImportMeta { num_experts: Some(16), ..ImportMeta::default() };
    let t = vllm::from_prompt_and_completion(&p, &c, &meta).unwrap();
    assert_eq!((t.num_tokens(), t.meta().prompt_len), (8, 3));
    let (p2, c2) = vllm::to_prompt_and_completion(&via_block(&t), NpyDtype::I32).unwrap();
    assert_eq!((p2, c2), (p.clone(), c.clone()));
    // OpenAI-response nested lists
    let j = vllm::to_json(&t).unwrap();
    let text = serde_json::to_vec(&j).unwrap();
    let t2 = vllm::from_json(&text, &meta).unwrap();
    assert!(t2.bits_eq(&t));
    assert_eq!(serde_json::to_vec(&vllm::to_json(&via_block(&t2)).unwrap()).unwrap(), text);
    // bare list form
    let bare = serde_json::to_vec(&j["routed_experts"]).unwrap();
    let t3 = vllm::from_json(&bare, &meta).unwrap();
    assert_eq!(t3.num_tokens(), 5);
    // ragged list -> named JSON error
    let e = vllm::from_json(b"[[[1,2],[3]]]", &meta).err().unwrap();
    assert!(matches!(&e, TraceError::Json { field, .. } if field == "routed_experts"), "{e}");
}

#[test]
fn vllm_dense_zero_filled_layers_are_dropped_explicitly() {
    // 4 decoder layers, layers 0 and 2 dense (zero-filled), 1 and 3 MoE
    let mut arr = vllm_array(3, 4, 2, 8, NpyDtype::I32, 5);
    for r in 0..3 {
        for c in [0, 2] {
            for j in 0..2 {
                arr.data[(r * 4 + c) * 2 + j] = 0;
            }
        }
    }
    let meta = ImportMeta { num_experts: Some(8), layers: Some(vec![1, 3]), ..ImportMeta::default() };
    let t = vllm::from_array(&arr, &meta).unwrap();
    assert_eq!(t.layers(), &[1, 3]);
    assert_eq!(
        t.row(0, 1).unwrap().iter().map(|&x| x as i32).collect::<Vec<_>>(),
        arr.data[(3) * 2..(3) * 2 + 2].to_vec()
    );
    arr.data[0] = 5; // a "dense" column with routes is not silently dropped
    let e = vllm::from_array(&arr, &meta).err().unwrap();
    assert_eq!(e.field(), "routed_experts[0][0]");
}

#[test]
fn vllm_errors_name_fields() {
    let meta = ImportMeta { num_experts: Some(8), ..ImportMeta::default() };
    let mut arr = vllm_array(3, 2, 2, 8, NpyDtype::I32, 6);
    arr.data[5] = 8;
    let e = vllm::from_array(&arr, &meta).err().unwrap();
    assert!(
        matches!(&e, TraceError::ExpertOutOfRange { field, id: 8, .. } if field == "routed_experts[1][0][1]"),
        "{e}"
    );
    arr.data[5] = -1;
    assert!(matches!(vllm::from_array(&arr, &meta).err().unwrap(), TraceError::ExpertOutOfRange { id: -1, .. }));
    let flat = NpyArray { dtype: NpyDtype::I32, shape: vec![12], data: vec![0; 12] };
    let e = vllm::from_array(&flat, &meta).err().unwrap();
    assert!(matches!(&e, TraceError::Shape { field, .. } if field == "routed_experts"));
    // truncated npy data, bad magic, header
    let bytes = write_npy(&vllm_array(3, 2, 2, 8, NpyDtype::I32, 6)).unwrap();
    assert_eq!(read_npy(&bytes[..bytes.len() - 1]).err().unwrap().field(), "npy.data");
    assert_eq!(read_npy(b"\x93NUMPX\x01\x00\x00\x00").err().unwrap().field(), "npy.magic");
    assert_eq!(read_npy(&bytes[..20]).err().unwrap().field(), "npy.header");
    let wrong_rows = ImportMeta { num_tokens: Some(10), ..meta.clone() };
    assert!(matches!(vllm::from_npy(&bytes, &wrong_rows).err().unwrap(), TraceError::Shape { .. }));
    // duplicate ids within a row (e.g. ambiguous zero padding) are refused
    let pad = NpyArray { dtype: NpyDtype::I32, shape: vec![1, 1, 3], data: vec![4, 0, 0] };
    assert!(vllm::from_array(&pad, &meta).err().unwrap().field().starts_with("routed_experts"));
    // a missing row in the middle cannot be written as a vLLM array
    let t = make(&Spec { missing: vec![2], ..Spec::default() });
    assert_eq!(vllm::to_npy(&t, NpyDtype::I32).err().unwrap().field(), "missing[2]");
}

#[test]
fn sglang_round_trips_bitwise() {
    let t = make(&Spec { tokens: 12, missing: vec![11], e: 64, k: 4, ..Spec::default() });
    let (v, dropped) = sglang::to_json(&t).unwrap();
    assert!(!dropped);
    let b64 = v["meta_info"]["routed_experts"].as_str().unwrap().to_string();
    let text = serde_json::to_vec(&v).unwrap();
    let meta = ImportMeta {
        num_experts: Some(64),
        layers: Some(t.layers().to_vec()),
        top_k: Some(4),
        fingerprint: t.meta().fingerprint,
        policy_version: t.meta().policy_version,
        ..ImportMeta::default()
    };
    let back = sglang::from_json(&text, &meta).unwrap();
    assert!(back.bits_eq(&t), "{:?}\n{:?}", back.meta(), t.meta());
    let (v2, _) = sglang::to_json(&via_block(&back)).unwrap();
    assert_eq!(v2["meta_info"]["routed_experts"].as_str().unwrap(), b64);
    assert_eq!(serde_json::to_vec(&v2).unwrap(), text);
    // layers derived from prompt_tokens + completion_tokens when only top_k is known
    let m2 = ImportMeta { num_experts: Some(64), top_k: Some(4), ..ImportMeta::default() };
    assert_eq!(sglang::from_json(&text, &m2).unwrap().num_layers(), 3);
}

#[test]
fn sglang_errors_name_fields() {
    let meta = ImportMeta { top_k: Some(2), layers: Some(vec![0]), ..ImportMeta::default() };
    let e = sglang::from_json(br#"{"meta_info": {"routed_experts": "!!notbase64"}}"#, &meta).err().unwrap();
    assert!(matches!(&e, TraceError::Base64 { field, .. } if field == "meta_info.routed_experts"), "{e}");
    let e = sglang::from_json(br#"{"meta_info": {"routed_experts": "AAAA"}}"#, &meta).err().unwrap(); // 3 bytes
    assert!(matches!(&e, TraceError::Shape { field, .. } if field == "meta_info.routed_experts"), "{e}");
    let e = sglang::from_json(br#"{"meta_info": {}}"#, &meta).err().unwrap();
    assert_eq!(e.field(), "meta_info.routed_experts");
    let e = sglang::from_json(b"{not json", &meta).err().unwrap();
    assert!(matches!(e, TraceError::Json { .. }));
    // 3 int32 values for 1 layer x top-2 -> shape error
    let e = sglang::from_json(br#"{"meta_info": {"routed_experts": "AQAAAAIAAAADAAAA"}}"#, &meta).err().unwrap();
    assert!(matches!(e, TraceError::Shape { .. }), "{e}");
    // seqlen disagreeing with the rows
    let e = sglang::from_json(
        br#"{"meta_info": {"routed_experts": "AQAAAAIAAAA=", "prompt_tokens": 3, "completion_tokens": 3}}"#,
        &meta,
    )
    .err()
    .unwrap();
    assert!(matches!(e, TraceError::Shape { .. }), "{e}");
}

#[test]
fn prime_rl_round_trips_bitwise() {
    for (e, dt) in [(128, prime_rl::PrimeDtype::U8), (300, prime_rl::PrimeDtype::U16)] {
        let t = make(&Spec { tokens: 10, missing: vec![0, 1, 2], e, k: 4, ..Spec::default() });
        let v = prime_rl::to_json(&t, None).unwrap();
        assert_eq!(v["dtype"], dt.name());
        assert_eq!(v["start"], 3);
        let text = serde_json::to_vec(&v).unwrap();
        let meta = ImportMeta {
            num_experts: Some(e),
            layers: Some(t.layers().to_vec()),
            prompt_len: Some(t.meta().prompt_len),
            fingerprint: t.meta().fingerprint,
            policy_version: t.meta().policy_version,
            ..ImportMeta::default()
        };
        let back = prime_rl::from_json(&text, &meta).unwrap();
        assert!(back.bits_eq(&t));
        assert_eq!(serde_json::to_vec(&prime_rl::to_json(&via_block(&back), None).unwrap()).unwrap(), text);
    }
}

#[test]
fn prime_rl_errors_name_fields() {
    let m = ImportMeta::default();
    let e = prime_rl::from_json(br#"{"data": "AQI=", "shape": [1, 1, 3], "start": 0, "dtype": "uint8"}"#, &m)
        .err()
        .unwrap();
    assert!(matches!(&e, TraceError::Shape { field, .. } if field == "shape"), "{e}");
    let e = prime_rl::from_json(br#"{"data": "A*I=", "shape": [1, 1, 2], "start": 0, "dtype": "uint8"}"#, &m)
        .err()
        .unwrap();
    assert!(matches!(&e, TraceError::Base64 { field, .. } if field == "data"), "{e}");
    let e =
        prime_rl::from_json(br#"{"data": "AQI=", "shape": [1, 1, 2], "start": 0, "dtype": "int8"}"#, &m).err().unwrap();
    assert_eq!(e.field(), "dtype");
    let m8 = ImportMeta { num_experts: Some(2), ..ImportMeta::default() };
    let e = prime_rl::from_json(br#"{"data": "AQI=", "shape": [1, 1, 2], "start": 0, "dtype": "uint8"}"#, &m8)
        .err()
        .unwrap();
    assert!(matches!(e, TraceError::ExpertOutOfRange { id: 2, .. }), "{e}");
    let t = make(&Spec { e: 300, ..Spec::default() });
    assert_eq!(prime_rl::to_json(&t, Some(prime_rl::PrimeDtype::U8)).err().unwrap().field(), "dtype");
}

/// Fuzz finding: a payload with no rows but a huge claimed `layers x topk` allocated the
/// column list before any size check.
#[test]
fn fuzz_regression_huge_empty_shapes_are_refused() {
    let m = ImportMeta { max_ids: 1 << 20, ..ImportMeta::default() };
    let e = prime_rl::from_json(br#"{"data":"", "shape": [0,83333333333373, 255555], "dtype": "uint8"}"#, &m)
        .expect_err("refused");
    assert_eq!(e.field(), "num_tokens");
    let npy = NpyArray { dtype: NpyDtype::I32, shape: vec![0, 1 << 30, 1 << 20], data: vec![] };
    assert!(vllm::from_array(&npy, &m).is_err());
    // zero MoE layers: vLLM JSON keeps the rows
    let t = make(&Spec { layers: vec![], ..Spec::default() });
    let v = vllm::to_json(&t).unwrap();
    assert_eq!(v["routed_experts"].as_array().unwrap().len(), 9 - 3);
    assert!(vllm::from_json(b"[[]]", &m).is_err());
}
