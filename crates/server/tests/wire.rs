//! `lockstep serve` speaks today's wire formats (embedded default: 4 decoder layers, layer 2
//! dense, top-2 of 8): current vLLM's `routed_experts` (`vllm/entrypoints/openai/completion/
//! protocol.py`, `chat_completion/protocol.py`), `prompt_token_ids` where vLLM puts it, the
//! token-in-token-out `/inference/v1/generate` (`vllm/entrypoints/serve/disagg/protocol.py`,
//! prime-rl's `serving_tokens.py`), SGLang's `/generate` (`io_struct.py`), top-n log-probability
//! keys that never collapse, `text_offset` in characters — each read back with lockstep-trace's
//! importers and compared with lockstep's complete trace of the same request.

mod common;

use common::{check_vllm_routes, ids, post, trace};
use lockstep_server::{start, ServerConfig};
use lockstep_trace::interop::{prime_rl, sglang, vllm, ImportMeta, ModelLayout};
use serde_json::json;

fn layout() -> ModelLayout {
    ModelLayout::from_config_json(lockstep_model::init::DEFAULT_CONFIG_JSON.as_bytes(), "default").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_sglang_and_prime_rl_clients_read_the_routes() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    let prompt: Vec<u32> = "0123456789".bytes().map(u32::from).collect();
    let base = json!({"prompt": prompt, "seed": 3, "max_tokens": 6, "temperature": 1.0});
    let full = post(addr, "/v1/completions", &base).await.json();
    let ch = &full["choices"][0];
    let t = trace(ch);
    let n = t.num_tokens();
    assert_eq!(n, 16);
    // default: current vLLM's string, prompt_token_ids on the completions choice
    check_vllm_routes(ch["routed_experts"].as_str().unwrap(), &t, 0);
    assert_eq!(ids(&ch["prompt_token_ids"]), prompt);
    // read back as a vLLM response: the trace's rows, the last token unknown (N - 1)
    let back = vllm::from_json(full.to_string().as_bytes(), &ImportMeta::default().with_layout(&layout()).unwrap()).unwrap();
    assert_eq!((back.num_tokens(), back.missing().iter().filter(|&&m| m).count()), (n, 1));
    for tok in 0..n - 1 {
        for l in 0..3 {
            assert_eq!(back.row(tok, l), t.row(tok, l));
        }
    }
    // vLLM's / SGLang's start fields: rows from there on
    for field in ["routed_experts_prompt_start", "routed_experts_start_len"] {
        let mut b = base.clone();
        b[field] = json!(4);
        let r = post(addr, "/v1/completions", &b).await.json();
        check_vllm_routes(r["choices"][0]["routed_experts"].as_str().unwrap(), &t, 4);
        assert_eq!(r["choices"][0]["routes_start"], 4);
    }
    // off on request
    let mut b = base.clone();
    b["return_routed_experts"] = json!(false);
    assert!(post(addr, "/v1/completions", &b).await.json()["choices"][0].get("routed_experts").is_none());

    // /inference/v1/generate: the same sampling, token ids in and out
    let g = json!({"token_ids": prompt, "sampling_params": {"seed": 3, "max_tokens": 6, "temperature": 1.0, "logprobs": 1, "routed_experts_prompt_start": 2}});
    let r = post(addr, "/inference/v1/generate", &g).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = r.json();
    let gc = &r["choices"][0];
    assert_eq!(gc["token_ids"], ch["token_ids"]);
    assert_eq!(r["usage"]["prompt_tokens"], 10);
    assert_eq!(gc["logprobs"]["content"].as_array().unwrap().len(), 6);
    check_vllm_routes(gc["routed_experts"].as_str().unwrap(), &t, 2);
    let meta = ImportMeta { start: Some(2), ..ImportMeta::default() }.with_layout(&layout()).unwrap();
    let back = vllm::from_json(r.to_string().as_bytes(), &meta).unwrap();
    assert_eq!(back.num_tokens(), n, "N from usage.prompt_tokens + token_ids");
    // prime-rl's object form, decoded the way its consumer does
    let mut g2 = g.clone();
    g2["sampling_params"]["routed_experts_format"] = json!("prime-rl");
    let r = post(addr, "/inference/v1/generate", &g2).await.json();
    let p = &r["choices"][0]["routed_experts"];
    assert_eq!((p["dtype"].clone(), p["start"].clone(), p["shape"].clone()), (json!("uint8"), json!(2), json!([n - 1 - 2, 4, 2])));
    let back = prime_rl::from_json(r.to_string().as_bytes(), &ImportMeta::default().with_layout(&layout()).unwrap()).unwrap();
    for tok in 2..n - 1 {
        assert_eq!(back.row(tok, 1), t.row(tok, 1));
    }

    // SGLang /generate: int32 rows [start_len, seqlen - 1), every decoder layer
    let s = json!({"input_ids": prompt, "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 3},
                   "return_logprob": true, "return_routed_experts": true, "routed_experts_start_len": 3});
    let r = post(addr, "/generate", &s).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = r.json();
    assert_eq!(r["output_ids"], ch["token_ids"]);
    let mi = &r["meta_info"];
    assert_eq!((mi["prompt_tokens"].clone(), mi["completion_tokens"].clone(), mi["routed_experts_start_len"].clone()), (json!(10), json!(6), json!(3)));
    assert_eq!(mi["output_token_logprobs"].as_array().unwrap().len(), 6);
    assert_eq!(mi["finish_reason"]["type"], "length");
    let back = sglang::from_json(r.to_string().as_bytes(), &ImportMeta::default().with_layout(&layout()).unwrap()).unwrap();
    assert_eq!((back.num_tokens(), back.num_missing()), (n, 3 + 1));
    for tok in 3..n - 1 {
        for l in 0..3 {
            assert_eq!(back.row(tok, l), t.row(tok, l));
        }
    }
    // n > 1: a list, one response per sample
    let s2 = json!({"text": "abc", "sampling_params": {"max_new_tokens": 2, "n": 2}});
    assert_eq!(post(addr, "/generate", &s2).await.json().as_array().unwrap().len(), 2);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_prompt_ids_logprob_keys_and_offsets() {
    let srv = start(&ServerConfig::default(), "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;
    // chat: prompt_token_ids at the top (as vLLM), not on the choice; the first stream chunk
    let c = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1});
    let w = post(addr, "/v1/chat/completions", &c).await.json();
    assert!(w["prompt_token_ids"].as_array().is_some_and(|p| !p.is_empty()));
    assert!(w["choices"][0].get("prompt_token_ids").is_none());
    assert!(w["choices"][0]["routed_experts"].is_string());
    let mut cs = c.clone();
    cs["stream"] = json!(true);
    let ev = post(addr, "/v1/chat/completions", &cs).await.events();
    assert_eq!(ev[0]["prompt_token_ids"], w["prompt_token_ids"]);
    // top-20 over a byte vocabulary: many bytes >= 0x80 decode to the same U+FFFD text, yet
    // every alternative keeps its own entry; text_offset counts characters
    let r = post(addr, "/v1/completions", &json!({"prompt": "ab", "max_tokens": 8, "seed": 2, "logprobs": 20})).await.json();
    let lp = &r["choices"][0]["logprobs"];
    for top in lp["top_logprobs"].as_array().unwrap() {
        assert_eq!(top.as_object().unwrap().len(), 20, "{top}");
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let mut at = 0;
    for (o, tok) in offsets.iter().zip(lp["tokens"].as_array().unwrap()) {
        assert_eq!(*o, at);
        at += tok.as_str().unwrap().chars().count() as u64;
    }
    // vLLM's return_tokens_as_token_ids
    let r = post(addr, "/v1/completions", &json!({"prompt": "ab", "max_tokens": 3, "seed": 2, "logprobs": 2, "return_tokens_as_token_ids": true})).await.json();
    let lp = &r["choices"][0]["logprobs"];
    let toks = ids(&r["choices"][0]["token_ids"]);
    for (i, t) in lp["tokens"].as_array().unwrap().iter().enumerate() {
        assert_eq!(t.as_str().unwrap(), format!("token_id:{}", toks[i]));
    }
    assert!(lp["top_logprobs"][0].as_object().unwrap().keys().all(|k| k.starts_with("token_id:")));
    // a no-op value of an unsupported field is accepted
    let ok = post(addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "response_format": {"type": "text"}, "min_p": 0})).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    srv.shutdown().await;
}
