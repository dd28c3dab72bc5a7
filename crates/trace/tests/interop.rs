//! vLLM (current and 0.21) / SGLang / prime-rl: payloads built the way the upstream code builds
//! them, bitwise round trips (directly and through a lockstep block), the `[start, N - 1)` row
//! conventions, dense decoder-layer columns, and named errors.

mod common;
use base64::Engine as _;
use common::{make, Spec};
use lockstep_trace::interop::{prime_rl, sglang, vllm, ExportMeta, ImportMeta, ModelLayout};
use lockstep_trace::npy::{read_npy, write_npy, NpyArray, NpyDtype};
use lockstep_trace::{decode_block, encode_block, DecodeLimits, RouteTrace, TraceError, ROUTE_FREE};
use proptest::prelude::*;
use serde_json::json;

fn via_block(t: &RouteTrace) -> RouteTrace {
    let (b, _) = decode_block(&encode_block(t), "b", DecodeLimits::default()).unwrap();
    assert!(b.bits_eq(t));
    b
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The embedded default's layout: 4 decoder layers, layer 2 dense, top-2 of 8.
const CONFIG: &str = r#"{"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [2]}"#;

fn layout() -> ModelLayout {
    ModelLayout::from_config_json(CONFIG.as_bytes(), "config.json").unwrap()
}

/// A capture buffer as vLLM's `routed_experts_capturer.py` and SGLang's
/// `routed_experts_capturer.py` fill it: `torch.zeros((tokens, num_hidden_layers, top_k),
/// int32)`, topk ids written into the MoE layers' columns only (dense columns stay 0).
fn capture(rows: usize, layers: usize, moe: &[usize], k: usize, e: u32, seed: u64) -> Vec<i32> {
    let mut rng = common::Rng(seed | 1);
    let mut out = vec![0i32; rows * layers * k];
    for r in 0..rows {
        for &l in moe {
            let ids = common::random_ids(&mut rng, 1, k, e);
            for (j, id) in ids.into_iter().enumerate() {
                out[(r * layers + l) * k + j] = id as i32;
            }
        }
    }
    out
}

/// `np.save` bytes (numpy's v1 header: dict literal space-padded to 64 bytes, then `\n`).
fn numpy_bytes(dtype: NpyDtype, shape: &[usize], data: &[i32]) -> Vec<u8> {
    let descr = match dtype {
        NpyDtype::U8 => "|u1",
        NpyDtype::U16 => "<u2",
        NpyDtype::I16 => "<i2",
        _ => "<i4",
    };
    let mut h = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}, {}), }}",
        shape[0], shape[1], shape[2]
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    for &x in data {
        match dtype {
            NpyDtype::U8 => out.push(x as u8),
            NpyDtype::U16 | NpyDtype::I16 => out.extend_from_slice(&(x as u16).to_le_bytes()),
            _ => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    out
}

/// Current vLLM (`vllm/entrypoints/openai/completion/protocol.py`, `chat_completion/protocol.py`,
/// `vllm/entrypoints/serve/disagg/protocol.py`): `routed_experts` = base64 of `np.save` bytes,
/// `(num_tokens - 1, num_hidden_layers, num_experts_per_tok)`, in every response form.
#[test]
fn vllm_current_string_round_trips_in_every_response_form() {
    for (dtype, e) in [(NpyDtype::U8, 8u32), (NpyDtype::U16, 300), (NpyDtype::I32, 300)] {
        let (prompt, completion) = (vec![5u32, 6, 7, 8], vec![9u32, 10, 11]);
        let n = prompt.len() + completion.len();
        for start in [0usize, 2] {
            let rows = n - 1 - start;
            let data = capture(rows, 4, &[0, 1, 3], 2, e, 7 + start as u64);
            let s = b64(&numpy_bytes(dtype, &[rows, 4, 2], &data));
            let completions = json!({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
                {"index": 0, "text": "x", "finish_reason": "length", "prompt_token_ids": prompt, "token_ids": completion, "routed_experts": s}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}});
            let chat = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "prompt_token_ids": prompt, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x"}, "token_ids": completion, "routed_experts": s}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}});
            let generate = json!({"request_id": "r", "choices": [{"index": 0, "finish_reason": "length", "token_ids": completion, "routed_experts": s}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}});
            let meta = ImportMeta { num_experts: Some(e), start: Some(start), ..ImportMeta::default() };
            for body in [completions, chat, generate, json!(s)] {
                let t = vllm::from_json(body.to_string().as_bytes(), &meta).unwrap();
                assert_eq!((t.num_tokens(), t.layers()), (n, &[0u32, 1, 3][..]), "dense column 2 detected");
                assert_eq!(t.missing(), &(0..n).map(|i| i < start || i == n - 1).collect::<Vec<_>>()[..]);
                let (back, w) = vllm::to_b64(&via_block(&t), Some(dtype), &ExportMeta::default()).unwrap();
                assert_eq!(back, s, "bitwise");
                assert_eq!((w.start, w.rows, w.last_dropped), (start, rows, false));
            }
            // a response whose rows disagree with its tokens: never silently off by a row
            let bad = json!({"choices": [{"prompt_token_ids": [1, 2, 3, 4, 5], "token_ids": completion, "routed_experts": s}]});
            assert!(matches!(
                vllm::from_json(bad.to_string().as_bytes(), &meta).unwrap_err(),
                TraceError::Shape { .. }
            ));
        }
    }
    // the .npy file itself, numpy's header byte for byte
    let data = capture(5, 4, &[0, 1, 3], 2, 8, 3);
    let bytes = numpy_bytes(NpyDtype::U8, &[5, 4, 2], &data);
    assert_eq!(write_npy(&read_npy(&bytes).unwrap()).unwrap(), bytes);
    let t = vllm::from_npy(&bytes, &ImportMeta::default()).unwrap();
    assert_eq!(vllm::to_npy(&t, None, &ExportMeta::of(&layout())).unwrap().0, bytes, "uint8 chosen for 8 experts");
}

/// vLLM 0.21: response-level `prompt_routed_experts` (a row per prompt token), per-choice
/// `routed_experts` (the completion but its last token), nested int16 lists, `-1` rows for
/// prefix-cached positions: missing rows, never expert ids.
#[test]
fn vllm_021_split_lists_with_cached_rows() {
    let (p, c) = (5usize, 4usize);
    let mut rows: Vec<i32> = capture(p + c - 1, 4, &[0, 1, 3], 2, 8, 11);
    for x in &mut rows[..2 * 4 * 2] {
        *x = -1; // tokens 0 and 1 came from the prefix cache
    }
    let nest = |from: usize, to: usize| -> serde_json::Value {
        json!((from..to)
            .map(|r| (0..4).map(|l| rows[(r * 4 + l) * 2..(r * 4 + l + 1) * 2].to_vec()).collect::<Vec<_>>())
            .collect::<Vec<_>>())
    };
    let resp = json!({"id": "chatcmpl-1", "object": "chat.completion", "prompt_routed_experts": nest(0, p),
        "prompt_token_ids": (0..p).collect::<Vec<_>>(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "token_ids": (0..c).collect::<Vec<_>>(), "routed_experts": nest(p, p + c - 1)}]});
    let meta = ImportMeta { num_experts: Some(8), ..ImportMeta::default() }.with_layout(&layout()).unwrap();
    let t = vllm::from_json(resp.to_string().as_bytes(), &meta).unwrap();
    assert_eq!((t.num_tokens(), t.meta().prompt_len), (p + c, p as u32));
    assert_eq!(t.missing(), &[true, true, false, false, false, false, false, false, true]);
    let ids = t.ids_u32().unwrap();
    assert!(ids[..2 * 3 * 2].iter().all(|&x| x == ROUTE_FREE), "cached rows are ROUTE_FREE, never expert ids");
    assert!(ids[2 * 3 * 2..8 * 3 * 2].iter().all(|&x| x < 8));
    let (v, w) = vllm::to_json_v021(&via_block(&t), &ExportMeta::of(&layout())).unwrap();
    assert_eq!(v["prompt_routed_experts"], resp["prompt_routed_experts"]);
    assert_eq!(v["routed_experts"], resp["choices"][0]["routed_experts"]);
    assert!(!w.last_dropped);
    // the current (uint8) form cannot mark them: a cached prefix becomes the rows' start
    let (_, w) = vllm::to_b64(&t, None, &ExportMeta::default()).unwrap();
    assert_eq!((w.start, w.rows), (2, p + c - 1 - 2));
    // a -1 inside a routed row is not a cached row
    let mut bad = resp.clone();
    bad["prompt_routed_experts"][3][0][1] = json!(-1);
    assert!(matches!(
        vllm::from_json(bad.to_string().as_bytes(), &meta).unwrap_err(),
        TraceError::ExpertOutOfRange { id: -1, .. }
    ));
    // arrays too
    let a = |from: usize, to: usize| NpyArray {
        dtype: NpyDtype::I16,
        shape: vec![to - from, 4, 2],
        data: rows[from * 8..to * 8].to_vec(),
    };
    let t2 = vllm::from_prompt_and_completion(&a(0, p), &a(p, p + c - 1), &meta).unwrap();
    assert!(t2.bits_eq(&t));
    let (pa, ca, _) = vllm::to_prompt_and_completion(&t2, NpyDtype::I16, &ExportMeta::of(&layout())).unwrap();
    assert_eq!((pa, ca), (a(0, p), a(p, p + c - 1)));
}

#[test]
fn dense_columns_and_top1_ambiguity() {
    // top-1 with a zero column: a dense layer or every token on expert 0? refused, naming the fix
    let data = vec![3, 0, 5, 0, 1, 0];
    let arr = NpyArray { dtype: NpyDtype::I32, shape: vec![3, 2, 1], data };
    let e = vllm::from_array(&arr, &ImportMeta::default()).unwrap_err();
    assert!(e.to_string().contains("--model-config"), "{e}");
    let t = vllm::from_array(&arr, &ImportMeta { layers: Some(vec![0]), ..ImportMeta::default() }).unwrap();
    assert_eq!(t.layers(), &[0]);
    let t = vllm::from_array(&arr, &ImportMeta { layers: Some(vec![0, 1]), ..ImportMeta::default() }).unwrap();
    assert_eq!(t.row(0, 1), Some(&[0u16][..]), "told: layer 1 routes to expert 0");
    // a "dense" column with routes is not silently dropped
    let mut data = capture(3, 4, &[1, 3], 2, 8, 5);
    data[0] = 5;
    let arr = NpyArray { dtype: NpyDtype::I32, shape: vec![3, 4, 2], data };
    let e = vllm::from_array(&arr, &ImportMeta { layers: Some(vec![1, 3]), ..ImportMeta::default() }).unwrap_err();
    assert_eq!(e.field(), "routed_experts[0][0]");
    // the model config's decoder-layer count is checked
    let e = vllm::from_array(
        &arr,
        &ImportMeta { num_hidden_layers: Some(5), layers: Some(vec![1, 3]), ..ImportMeta::default() },
    )
    .unwrap_err();
    assert!(matches!(e, TraceError::Shape { .. }), "{e}");
    // exports: every decoder layer, or the MoE ones when asked
    let t = make(&Spec { layers: vec![1, 3], missing: vec![8], ..Spec::default() });
    let (a, _) = vllm::to_array(&t, None, &ExportMeta { num_hidden_layers: Some(5), compact: false }).unwrap();
    assert_eq!(a.shape, vec![8, 5, 4]);
    assert!(a.data[..4].iter().all(|&x| x == 0) && a.data[4 * 4..5 * 4].iter().all(|&x| x == 0));
    let (a, _) = vllm::to_array(&t, None, &ExportMeta { num_hidden_layers: None, compact: true }).unwrap();
    assert_eq!(a.shape, vec![8, 2, 4]);
    let e = vllm::to_array(&t, None, &ExportMeta { num_hidden_layers: Some(3), compact: false }).unwrap_err();
    assert_eq!(e.field(), "num_hidden_layers");
}

/// SGLang `/generate` (`python/sglang/srt/managers/io_struct.py`: `return_routed_experts`,
/// `routed_experts_start_len`, the response covering `[start_len, seqlen - 1)`), int32 base64
/// of the capturer's `[tokens, num_hidden_layers, top_k]` buffer.
#[test]
fn sglang_generate_responses_round_trip() {
    for start in [0usize, 3] {
        let (p, c) = (6usize, 5usize);
        let rows = p + c - 1 - start;
        let data = capture(rows, 4, &[0, 1, 3], 2, 8, 21 + start as u64);
        let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut mi = json!({"id": "abc", "finish_reason": {"type": "length", "length": 5}, "prompt_tokens": p, "completion_tokens": c,
            "cached_tokens": 0, "routed_experts": b64(&raw)});
        if start > 0 {
            mi["routed_experts_start_len"] = json!(start);
        }
        let resp = json!({"text": "hello", "output_ids": [1, 2, 3, 4, 5], "meta_info": mi});
        let text = resp.to_string();
        // with the model config, or only top-k (seqlen gives the rows, the rows the columns)
        for meta in [
            ImportMeta::default().with_layout(&layout()).unwrap(),
            ImportMeta { top_k: Some(2), ..ImportMeta::default() },
        ] {
            let t = sglang::from_json(text.as_bytes(), &meta).unwrap();
            assert_eq!((t.num_tokens(), t.meta().prompt_len, t.layers()), (p + c, p as u32, &[0u32, 1, 3][..]));
            assert_eq!(t.num_missing(), start + 1);
            let (v, w) = sglang::to_json(&via_block(&t), &ExportMeta::of(&layout())).unwrap();
            assert_eq!(v["meta_info"]["routed_experts"], resp["meta_info"]["routed_experts"], "bitwise");
            assert_eq!(
                v["meta_info"].get("routed_experts_start_len"),
                resp["meta_info"].get("routed_experts_start_len")
            );
            assert_eq!((w.start, w.rows), (start, rows));
        }
        // flattened data without the model: refused, naming the fix
        let e = sglang::from_json(text.as_bytes(), &ImportMeta::default()).unwrap_err();
        assert!(e.to_string().contains("--model-config"), "{e}");
    }
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
    let e = sglang::from_json(
        br#"{"meta_info": {"routed_experts": "", "prompt_tokens": 3, "completion_tokens": 3, "routed_experts_start_len": 9}}"#,
        &meta,
    )
    .err()
    .unwrap();
    assert_eq!(e.field(), "meta_info.routed_experts_start_len");
}

/// prime-rl's `serialize_routed_experts` (`src/prime_rl/inference/vllm/routed_experts.py`):
/// uint8 while ids fit, else uint16; `start` = the request's `routed_experts_prompt_start`;
/// inside `/inference/v1/generate` (`serving_tokens.py`) with `usage.prompt_tokens`.
#[test]
fn prime_rl_payload_and_generate_response_round_trip() {
    for (e, dtype) in [(8u32, "uint8"), (300, "uint16")] {
        for start in [0usize, 2] {
            let (p, c) = (4usize, 4usize);
            let rows = p + c - 1 - start;
            let data = capture(rows, 4, &[0, 1, 3], 2, e, 31);
            let raw: Vec<u8> = if dtype == "uint8" {
                data.iter().map(|&x| x as u8).collect()
            } else {
                data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect()
            };
            let payload = json!({"data": b64(&raw), "shape": [rows, 4, 2], "start": start, "dtype": dtype});
            let resp = json!({"request_id": "r", "choices": [{"index": 0, "finish_reason": "length", "token_ids": (0..c).collect::<Vec<_>>(),
                "logprobs": null, "routed_experts": payload}], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
            let meta = ImportMeta { num_experts: Some(e), ..ImportMeta::default() };
            for body in [&payload, &resp] {
                let t = prime_rl::from_json(body.to_string().as_bytes(), &meta).unwrap();
                // N - 1 convention as vLLM's: the last token is an explicit missing row
                assert_eq!((t.num_tokens(), t.num_missing()), (p + c, start + 1));
                assert!(t.is_missing(p + c - 1));
                let (v, w) = prime_rl::to_json(&via_block(&t), None, &ExportMeta::of(&layout())).unwrap();
                assert_eq!(v, payload, "bitwise");
                assert_eq!(w.start, start);
            }
            // the response fixes N: a payload a row short is refused
            let mut bad = resp.clone();
            bad["usage"]["prompt_tokens"] = json!(p + 1);
            assert!(matches!(
                prime_rl::from_json(bad.to_string().as_bytes(), &meta).unwrap_err(),
                TraceError::Shape { .. }
            ));
        }
    }
}

/// msgpack the way msgspec writes prime-rl's `RoutedExperts` (`array_like=True`:
/// `[data: bin, shape: [..], dtype: str]`, `src/prime_rl/transports/rollouts/types.py`), rows
/// for every token, the last zero-padded (`orchestrator/trajectories.py`).
fn msgspec_bytes(data: &[u8], shape: [usize; 3], dtype: &str) -> Vec<u8> {
    let mut out = vec![0x93];
    if data.len() < 256 {
        out.extend_from_slice(&[0xc4, data.len() as u8]);
    } else {
        out.push(0xc5);
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(data);
    out.push(0x93);
    for d in shape {
        assert!(d < 128);
        out.push(d as u8);
    }
    out.push(0xa0 | dtype.len() as u8);
    out.extend_from_slice(dtype.as_bytes());
    out
}

#[test]
fn prime_rl_msgpack_transport_round_trips() {
    let n = 7;
    let mut data = capture(n, 4, &[0, 1, 3], 2, 8, 41);
    for x in &mut data[(n - 1) * 8..] {
        *x = 0; // the zero-padded last row
    }
    let raw: Vec<u8> = data.iter().map(|&x| x as u8).collect();
    let bytes = msgspec_bytes(&raw, [n, 4, 2], "uint8");
    let t = prime_rl::from_msgpack(&bytes, &ImportMeta::default()).unwrap();
    assert_eq!((t.num_tokens(), t.layers()), (n, &[0u32, 1, 3][..]));
    assert_eq!(t.missing().iter().position(|&m| m), Some(n - 1), "the zero pad is a missing row (top-2)");
    assert_eq!(prime_rl::to_msgpack(&via_block(&t), None, &ExportMeta::of(&layout())).unwrap(), bytes, "bitwise");
    // larger payloads: bin16, uint16 ids
    let data = capture(40, 4, &[0, 1, 3], 2, 300, 43);
    let raw: Vec<u8> = data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect();
    let bytes = msgspec_bytes(&raw, [40, 4, 2], "uint16");
    let t = prime_rl::from_msgpack(&bytes, &ImportMeta::default()).unwrap();
    assert_eq!(t.num_missing(), 0);
    assert_eq!(prime_rl::to_msgpack(&t, None, &ExportMeta::default()).unwrap(), bytes);
    // a map encoding reads too
    let named = rmp_serde::to_vec_named(&prime_rl::to_transport(&t, None, &ExportMeta::default()).unwrap()).unwrap();
    assert!(prime_rl::from_msgpack(&named, &ImportMeta::default()).unwrap().bits_eq(&t));
    // top-1: a zero last row is ambiguous
    let bytes = msgspec_bytes(&[1, 0, 2, 0, 0, 0], [3, 2, 1], "uint8");
    let meta = ImportMeta { layers: Some(vec![0]), ..ImportMeta::default() };
    let e = prime_rl::from_msgpack(&bytes, &meta).unwrap_err();
    assert!(e.to_string().contains("num_tokens"), "{e}");
    let t = prime_rl::from_msgpack(&bytes, &ImportMeta { num_tokens: Some(3), ..meta }).unwrap();
    assert_eq!(t.row(2, 0), Some(&[0u16][..]));
    let e = prime_rl::from_msgpack(b"\x93\xc4", &ImportMeta::default()).unwrap_err();
    assert_eq!(e.field(), "routed_experts");
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
    let e = prime_rl::from_json(br#"{"choices": [{"routed_experts": {"data": "AQI=", "shape": [1, 1, 2]}}]}"#, &m)
        .err()
        .unwrap();
    assert_eq!(e.field(), "choices[0].routed_experts.dtype");
    let m8 = ImportMeta { num_experts: Some(2), ..ImportMeta::default() };
    let e = prime_rl::from_json(br#"{"data": "AQI=", "shape": [1, 1, 2], "start": 0, "dtype": "uint8"}"#, &m8)
        .err()
        .unwrap();
    assert!(matches!(e, TraceError::ExpertOutOfRange { id: 2, .. }), "{e}");
    let t = make(&Spec { e: 300, missing: vec![8], ..Spec::default() });
    assert_eq!(
        prime_rl::to_json(&t, Some(prime_rl::PrimeDtype::U8), &ExportMeta::default()).err().unwrap().field(),
        "dtype"
    );
}

#[test]
fn vllm_errors_name_fields() {
    let meta = ImportMeta { num_experts: Some(8), ..ImportMeta::default() };
    let data = capture(3, 2, &[0, 1], 2, 8, 6);
    let mut arr = NpyArray { dtype: NpyDtype::I32, shape: vec![3, 2, 2], data };
    arr.data[5] = 8;
    let e = vllm::from_array(&arr, &meta).err().unwrap();
    assert!(
        matches!(&e, TraceError::ExpertOutOfRange { field, id: 8, .. } if field == "routed_experts[1][0][1]"),
        "{e}"
    );
    let flat = NpyArray { dtype: NpyDtype::I32, shape: vec![12], data: vec![0; 12] };
    let e = vllm::from_array(&flat, &meta).err().unwrap();
    assert!(matches!(&e, TraceError::Shape { field, .. } if field == "routed_experts"));
    let bytes =
        write_npy(&NpyArray { dtype: NpyDtype::I32, shape: vec![3, 2, 2], data: capture(3, 2, &[0, 1], 2, 8, 6) })
            .unwrap();
    assert_eq!(read_npy(&bytes[..bytes.len() - 1]).err().unwrap().field(), "npy.data");
    assert_eq!(read_npy(b"\x93NUMPX\x01\x00\x00\x00").err().unwrap().field(), "npy.magic");
    assert_eq!(read_npy(&bytes[..20]).err().unwrap().field(), "npy.header");
    let wrong_rows = ImportMeta { num_tokens: Some(10), ..meta.clone() };
    assert!(matches!(vllm::from_npy(&bytes, &wrong_rows).err().unwrap(), TraceError::Shape { .. }));
    // duplicate ids within a routed row are refused
    let pad = NpyArray { dtype: NpyDtype::I32, shape: vec![1, 1, 3], data: vec![4, 0, 0] };
    assert!(vllm::from_array(&pad, &meta).err().unwrap().field().starts_with("routed_experts"));
    // a missing row in the middle cannot be written in the current form
    let t = make(&Spec { missing: vec![2], ..Spec::default() });
    assert_eq!(vllm::to_npy(&t, None, &ExportMeta::default()).err().unwrap().field(), "missing[2]");
    let e = vllm::from_json(br#"{"choices": [{"index": 0, "routed_experts": null}]}"#, &meta).unwrap_err();
    assert_eq!(e.field(), "choices[0].routed_experts");
    let e = vllm::from_json(br#"{"choices": []}"#, &meta).unwrap_err();
    assert_eq!(e.field(), "choices[0]");
    let e = vllm::from_json(br#""!!""#, &meta).unwrap_err();
    assert_eq!(e.field(), "routed_experts");
    let e = ImportMeta { top_k: Some(3), ..ImportMeta::default() }.with_layout(&layout()).unwrap_err();
    assert_eq!(e.field(), "top_k");
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
    assert!(vllm::from_json(b"[[]]", &m).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Any trace whose rows are `[start, N - 1)` goes through every foreign format and back
    /// bit for bit, dense layers interleaved, with the model layout given.
    #[test]
    fn every_format_round_trips(n in 2usize..12, start_frac in 0usize..3, k in 1u32..4, e in prop::sample::select(vec![8u32, 200, 300]), seed in 0u64..1000) {
        let moe = vec![1u32, 2, 4];
        let layout = ModelLayout { num_hidden_layers: 6, moe_layers: moe.clone(), num_experts: e, top_k: k };
        let start = (start_frac * (n - 1)) / 3;
        let mut missing: Vec<usize> = (0..start).collect();
        missing.push(n - 1);
        let mut t = make(&Spec { tokens: n, layers: moe, k, e, missing, seed, ..Spec::default() });
        t = RouteTrace::new(lockstep_trace::TraceMeta { prompt_len: 0, fingerprint: 0, policy_version: 0, ..t.meta().clone() }, t.layers().to_vec(), n, t.ids().to_vec(), t.missing().to_vec(), None).unwrap();
        let ex = ExportMeta::of(&layout);
        let meta = ImportMeta { start: Some(start), ..ImportMeta::default() }.with_layout(&layout).unwrap();
        let (s, _) = vllm::to_b64(&t, None, &ex).unwrap();
        prop_assert!(vllm::from_json(json!(s).to_string().as_bytes(), &meta).unwrap().bits_eq(&t));
        let (v, _) = vllm::to_json_v021(&t, &ex).unwrap();
        let back = vllm::from_json(v.to_string().as_bytes(), &meta).unwrap();
        prop_assert_eq!(back.ids(), t.ids());
        prop_assert_eq!(back.missing(), t.missing());
        let (v, _) = sglang::to_json(&t, &ex).unwrap();
        prop_assert!(sglang::from_json(v.to_string().as_bytes(), &meta).unwrap().bits_eq(&t));
        let (v, _) = prime_rl::to_json(&t, None, &ex).unwrap();
        prop_assert!(prime_rl::from_json(v.to_string().as_bytes(), &meta).unwrap().bits_eq(&t));
        if k >= 2 {
            let b = prime_rl::to_msgpack(&t, None, &ex).unwrap();
            let m2 = ImportMeta { start: None, ..meta.clone() };
            prop_assert!(prime_rl::from_msgpack(&b, &m2).unwrap().bits_eq(&t));
        }
    }
}
