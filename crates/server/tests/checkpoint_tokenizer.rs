//! A checkpoint directory with a real `tokenizer.json` (byte-level BPE with a merge and
//! ChatML special tokens), a `tokenizer_config.json` chat template using Python string methods,
//! and `eos_token_id` in config.json: served through `tokenizers` + minijinja, in lockstep with
//! the trainer.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::{completion, f32s, ids, post};
use lockstep_engine::consistency::rescore;
use lockstep_model::{Kernels, ModelConfig, MoeCausalLm};
use lockstep_server::{start, ServerConfig};
use serde_json::{json, Value};

/// GPT-2's byte → printable character table.
fn byte_chars() -> Vec<char> {
    let keep: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if keep.contains(&b) {
            out[b as usize] = char::from_u32(b).unwrap();
        } else {
            out[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    out
}

const SPECIALS: [&str; 3] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"];

fn tokenizer_json() -> Value {
    let chars = byte_chars();
    let mut vocab = BTreeMap::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    vocab.insert("he".to_string(), 256);
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": 257 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": [["h", "e"]]}
    })
}

const TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_through_a_checkpoints_tokenizer_and_template() {
    let dir = std::env::temp_dir().join(format!("lockstep-server-tok-{}", std::process::id()));
    let mut cfg: Value = serde_json::from_str(lockstep_model::init::DEFAULT_CONFIG_JSON).unwrap();
    cfg["vocab_size"] = json!(264);
    cfg["eos_token_id"] = json!(258);
    let mut model = MoeCausalLm::random(&ModelConfig::from_json_str(&cfg.to_string(), "cfg").unwrap(), 4, DType::F32, &Device::Cpu).unwrap();
    model.save(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": TEMPLATE}).to_string()).unwrap();
    model.set_kernels(Kernels::Invariant);

    let name = dir.display().to_string();
    let srv = start(&ServerConfig { model: name.clone(), served_model_name: Some("tiny-chatml".into()), ..ServerConfig::default() }, "127.0.0.1:0").await.unwrap();
    let addr = srv.addr;

    // completions: "hello" → the merge "he" then bytes
    let r = post(addr, "/v1/completions", &json!({"model": "tiny-chatml", "prompt": "hello", "max_tokens": 6, "seed": 2, "logprobs": 0, "return_router_probs": true})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ch = r.json()["choices"][0].clone();
    assert_eq!(ids(&ch["prompt_token_ids"]), vec![256, b'l' as u32, b'l' as u32, b'o' as u32]);

    // chat: the template renders ChatML with special tokens, `.strip()` via pycompat
    let messages = json!([{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "hello"}]);
    let mut chs = vec![ch];
    for seed in 0..4 {
        let r = post(
            addr,
            "/v1/chat/completions",
            &json!({"model": "tiny-chatml", "messages": messages, "max_tokens": 12, "seed": seed, "logprobs": true, "return_router_probs": true}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json();
        let ch = body["choices"][0].clone();
        // chat: prompt_token_ids at the top of the response, as vLLM puts them
        assert!(ch.get("prompt_token_ids").is_none());
        let p = ids(&body["prompt_token_ids"]);
        let mut expect = vec![257];
        expect.extend("system\nbe brief".bytes().map(u32::from));
        expect.extend([258, 10, 257]);
        expect.extend([b'u', b's', b'e', b'r', b'\n'].map(u32::from));
        expect.extend([256, b'l' as u32, b'l' as u32, b'o' as u32, 258, 10, 257]);
        expect.extend("assistant\n".bytes().map(u32::from));
        assert_eq!(p, expect);
        // the end-of-sequence token (eos_token_id / eos_token) stops, and is never shown
        let toks = ids(&ch["token_ids"]);
        assert!(toks[..toks.len() - 1].iter().all(|&t| t != 258));
        assert_eq!(ch["finish_reason"] == "stop", *toks.last().unwrap() == 258);
        assert!(!ch["message"]["content"].as_str().unwrap().contains("<|im_end|>"));
        let lp: Vec<f32> = ch["logprobs"]["content"].as_array().unwrap().iter().map(|x| x["logprob"].as_f64().unwrap() as f32).collect();
        chs.push(json!({"routes": ch["routes"], "prompt_token_ids": body["prompt_token_ids"], "token_ids": ch["token_ids"],
                         "finish_reason": ch["finish_reason"], "logprobs": {"token_logprobs": lp}}));
    }
    let comps: Vec<_> = chs.iter().map(|c| completion(c, &f32s(&c["logprobs"]["token_logprobs"]))).collect();
    let rep = rescore(&model, &comps).unwrap();
    assert_eq!((rep.max_abs_logprob_diff, rep.route_agreement, rep.prob_rows_differing), (0.0, 1.0, 0), "{rep:?}");

    // a template error is the request's fault (400, messages)
    let bad = post(addr, "/v1/chat/completions", &json!({"messages": [{"role": "user"}], "chat_template_kwargs": {"x": 1}, "max_tokens": 2})).await;
    assert_eq!(bad.status, 200, "a message without content renders as empty");
    srv.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
