//! Hostile checkpoint directories, counted: each is the tiny Qwen3-MoE fixture with one thing
//! broken (the safetensors bytes, its header, its tensors, `config.json`, the files themselves),
//! and `MoeCausalLm::load` must refuse every one with an error — never a panic or an abort.
//! Cases with huge sizes in `config.json` run in a child process under a 4 GiB address-space
//! limit, so an allocation the loader should never have tried shows up as a counted abort, not a
//! machine out of memory. Prints `hostile_checkpoints: tried N, refused R, panics P,
//! accepted-wrongly A` and the known gaps (accepted today; printed, not asserted).

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lockstep_model::MoeCausalLm;
use serde_json::{json, Value};

/// Broken checkpoints the loader accepts today (see the printed report).
/// (`extra tensor` and `extra tensor with a hostile name` were accepted before the loader's
/// unused-tensor check landed; both are refused now.)
const KNOWN_GAPS: &[&str] = &[];

const CHILD_ENV: &str = "LOCKSTEP_HOSTILE_CKPT_DIR";
const ST: &str = "model.safetensors";
const CFG: &str = "config.json";
const Q: &str = "model.layers.0.self_attn.q_proj.weight";
static DEEP: [u8; 100_000] = [b'['; 100_000];

type Edit = Box<dyn Fn(&Path)>;

fn fresh() -> tempfile::TempDir {
    let src = common::fixture("qwen3_moe_tiny");
    let dst = tempfile::tempdir().unwrap();
    for f in [CFG, ST] {
        std::fs::copy(src.join(f), dst.path().join(f)).unwrap();
    }
    dst
}

fn load(dir: &Path) -> Result<(), String> {
    MoeCausalLm::load(dir, DType::F32, &Device::Cpu).map(|_| ()).map_err(|e| e.to_string())
}

fn edit_config(f: impl Fn(&mut Value) + 'static) -> Edit {
    Box::new(move |d: &Path| {
        let p = d.join(CFG);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    })
}

fn set(key: &'static str, value: Value) -> Edit {
    edit_config(move |v| v[key] = value.clone())
}

fn tensors(f: impl Fn(&mut HashMap<String, Tensor>) + 'static) -> Edit {
    Box::new(move |d: &Path| {
        let p = d.join(ST);
        let mut ts = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        f(&mut ts);
        candle_core::safetensors::save(&ts, &p).unwrap();
    })
}

fn poke(name: &'static str, at: usize, x: f32) -> Edit {
    tensors(move |ts| {
        let t = &ts[name];
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[at] = x;
        let shape = t.shape().clone();
        ts.insert(name.into(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    })
}

/// The safetensors file split into (declared header length, header JSON, data).
fn split(bytes: &[u8]) -> (u64, Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let h = serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap();
    (n, h, bytes[8 + n as usize..].to_vec())
}

fn header(f: impl Fn(&mut Value) + 'static) -> Edit {
    Box::new(move |d: &Path| {
        let p = d.join(ST);
        let (_, mut h, data) = split(&std::fs::read(&p).unwrap());
        f(&mut h);
        let text = h.to_string().into_bytes();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(data);
        std::fs::write(&p, out).unwrap();
    })
}

fn raw(f: impl Fn(Vec<u8>) -> Vec<u8> + 'static) -> Edit {
    Box::new(move |d: &Path| {
        let p = d.join(ST);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, f(b)).unwrap();
    })
}

fn write(file: &'static str, bytes: &'static [u8]) -> Edit {
    Box::new(move |d: &Path| std::fs::write(d.join(file), bytes).unwrap())
}

fn symlink(file: &'static str, target: &'static str) -> Edit {
    Box::new(move |d: &Path| {
        let _ = std::fs::remove_file(d.join(file));
        std::os::unix::fs::symlink(target, d.join(file)).unwrap();
    })
}

fn index(weight_map: Value) -> Edit {
    Box::new(move |d: &Path| std::fs::write(d.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap())
}

/// (what, edit, isolate: run in a child process under a memory limit)
fn cases() -> Vec<(String, Edit, bool)> {
    let mut v: Vec<(String, Edit, bool)> = Vec::new();
    // the safetensors bytes
    let total = std::fs::metadata(common::fixture("qwen3_moe_tiny").join(ST)).unwrap().len() as usize;
    let hlen = 10_992usize;
    for (what, at) in [
        ("0 bytes", 0),
        ("4 bytes", 4),
        ("7 bytes", 7),
        ("the length only", 8),
        ("9 bytes", 9),
        ("mid-header", 8 + hlen / 2),
        ("the header only", 8 + hlen),
        ("one data byte", 9 + hlen),
        ("half", total / 2),
        ("one byte short", total - 1),
    ] {
        v.push((format!("truncated safetensors: {what}"), raw(move |b| b[..at.min(b.len())].to_vec()), false));
    }
    v.push((
        "one byte too many".into(),
        raw(|mut b| {
            b.push(0);
            b
        }),
        false,
    ));
    for (what, n) in
        [("u64::MAX", u64::MAX), ("2^40", 1 << 40), ("file length", total as u64), ("header + 1", hlen as u64 + 1), ("header - 1", hlen as u64 - 1), ("0", 0), ("1", 1)]
    {
        v.push((
            format!("header length {what}"),
            raw(move |mut b| {
                b[..8].copy_from_slice(&n.to_le_bytes());
                b
            }),
            false,
        ));
    }
    v.push((
        "header bytes garbage".into(),
        raw(|mut b| {
            b[8..40].copy_from_slice(&[b'#'; 32]);
            b
        }),
        false,
    ));
    v.push((
        "header non-UTF-8".into(),
        raw(|mut b| {
            b[10] = 0xff;
            b[11] = 0xfe;
            b
        }),
        false,
    ));
    v.push((
        "header a JSON array".into(),
        raw(|b| {
            let (_, _, data) = split(&b);
            let h = b"[]";
            let mut o = (h.len() as u64).to_le_bytes().to_vec();
            o.extend(h);
            o.extend(data);
            o
        }),
        false,
    ));
    // the header's entries
    v.push(("dtype F64 over F32 data".into(), header(|h| h[Q]["dtype"] = json!("F64")), false));
    v.push(("dtype I32 over F32 data".into(), header(|h| h[Q]["dtype"] = json!("I32")), false));
    v.push(("dtype U8 over F32 data".into(), header(|h| h[Q]["dtype"] = json!("U8")), false));
    v.push(("dtype BOOL".into(), header(|h| h[Q]["dtype"] = json!("BOOL")), false));
    v.push(("dtype unknown".into(), header(|h| h[Q]["dtype"] = json!("F128")), false));
    v.push(("shape disagrees with the bytes".into(), header(|h| h[Q]["shape"] = json!([64, 65])), false));
    v.push((
        "shape transposed (k_proj [32, 64] as [64, 32])".into(),
        header(|h| {
            let k = "model.layers.0.self_attn.k_proj.weight";
            let s = h[k]["shape"].clone();
            h[k]["shape"] = json!([s[1], s[0]]);
        }),
        false,
    ));
    v.push(("shape with a huge dimension".into(), header(|h| h[Q]["shape"] = json!([u64::MAX, 2])), false));
    v.push(("shape negative".into(), header(|h| h[Q]["shape"] = json!([-64, 64])), false));
    v.push(("offsets beyond the file".into(), header(|h| h[Q]["data_offsets"][1] = json!(1u64 << 40)), false));
    v.push((
        "offsets reversed".into(),
        header(|h| {
            let o = h[Q]["data_offsets"].clone();
            h[Q]["data_offsets"] = json!([o[1], o[0]]);
        }),
        false,
    ));
    v.push((
        "offsets overlapping".into(),
        header(|h| {
            let o = h["lm_head.weight"]["data_offsets"].clone();
            h["model.embed_tokens.weight"]["data_offsets"] = o;
        }),
        false,
    ));
    v.push((
        "entry without offsets".into(),
        header(|h| {
            h[Q].as_object_mut().unwrap().remove("data_offsets");
        }),
        false,
    ));
    v.push((
        "entry removed from the header".into(),
        header(|h| {
            h.as_object_mut().unwrap().remove("model.norm.weight");
        }),
        false,
    ));
    v.push(("__metadata__ not a map".into(), header(|h| h["__metadata__"] = json!(5)), false));
    // tensors
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
    ] {
        v.push((
            format!("missing tensor {name}"),
            tensors(move |ts| {
                ts.remove(name);
            }),
            false,
        ));
    }
    v.push((
        "extra tensor".into(),
        tensors(|ts| {
            ts.insert("model.layers.99.bogus.weight".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
        }),
        false,
    ));
    v.push((
        "extra tensor with a hostile name".into(),
        tensors(|ts| {
            ts.insert("../../etc/passwd".into(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
        }),
        false,
    ));
    for (name, shape) in [
        ("model.embed_tokens.weight", vec![383, 64]),
        ("lm_head.weight", vec![384, 63]),
        ("model.norm.weight", vec![65]),
        ("model.layers.0.mlp.gate.weight", vec![9, 64]),
        (Q, vec![64 * 64]),
        ("model.layers.1.mlp.experts.0.up_proj.weight", vec![1, 32, 64]),
    ] {
        v.push((
            format!("wrong shape {name} {shape:?}"),
            tensors(move |ts| {
                ts.insert(name.into(), Tensor::zeros(shape.clone(), DType::F32, &Device::Cpu).unwrap());
            }),
            false,
        ));
    }
    for dt in [DType::U8, DType::U32, DType::I64] {
        v.push((
            format!("weights stored as {dt:?}"),
            tensors(move |ts| {
                let t = ts[Q].to_dtype(dt).unwrap();
                ts.insert(Q.into(), t);
            }),
            false,
        ));
    }
    for (name, at, x) in [
        (Q, 3, f32::NAN),
        ("model.norm.weight", 0, f32::INFINITY),
        ("model.embed_tokens.weight", 100, f32::NEG_INFINITY),
        ("lm_head.weight", 5, f32::NAN),
        ("model.layers.2.mlp.gate.weight", 7, f32::INFINITY),
        ("model.layers.1.mlp.experts.3.up_proj.weight", 11, f32::NAN),
    ] {
        v.push((format!("{x} in {name}"), poke(name, at, x), false));
    }
    // config.json values
    for (what, key, val, iso) in [
        ("num_hidden_layers = 10^9", "num_hidden_layers", json!(1_000_000_000u64), true),
        ("num_hidden_layers = 0", "num_hidden_layers", json!(0), false),
        ("num_hidden_layers = -1", "num_hidden_layers", json!(-1), false),
        ("num_hidden_layers = 4 (one layer short of tensors)", "num_hidden_layers", json!(4), false),
        ("num_hidden_layers a string", "num_hidden_layers", json!("3"), false),
        ("rms_norm_eps = -1", "rms_norm_eps", json!(-1.0), false),
        ("rms_norm_eps = 1e30", "rms_norm_eps", json!(1e30), false),
        ("rms_norm_eps = 0", "rms_norm_eps", json!(0.0), false),
        ("rms_norm_eps \"NaN\"", "rms_norm_eps", json!("NaN"), false),
        ("max_position_embeddings \"big\"", "max_position_embeddings", json!("big"), false),
        ("max_position_embeddings = -5", "max_position_embeddings", json!(-5), false),
        ("max_position_embeddings = 0", "max_position_embeddings", json!(0), false),
        ("max_position_embeddings = 10^18", "max_position_embeddings", json!(1_000_000_000_000_000_000u64), true),
        ("vocab_size = 0", "vocab_size", json!(0), false),
        ("vocab_size = 10^12", "vocab_size", json!(1_000_000_000_000u64), true),
        ("vocab_size = 383", "vocab_size", json!(383), false),
        ("hidden_size = 0", "hidden_size", json!(0), false),
        ("hidden_size = 10^12", "hidden_size", json!(1_000_000_000_000u64), true),
        ("hidden_size = 63", "hidden_size", json!(63), false),
        ("num_attention_heads = 0", "num_attention_heads", json!(0), false),
        ("num_key_value_heads = 3 (does not divide 4 heads)", "num_key_value_heads", json!(3), false),
        ("num_key_value_heads = 0", "num_key_value_heads", json!(0), false),
        ("num_key_value_heads = 8 (> heads)", "num_key_value_heads", json!(8), false),
        ("head_dim = 0", "head_dim", json!(0), false),
        ("head_dim = 10^9", "head_dim", json!(1_000_000_000u64), true),
        ("head_dim = 15 (odd rotary)", "head_dim", json!(15), false),
        ("num_local_experts = 0", "num_local_experts", json!(0), false),
        ("num_local_experts = 10^9", "num_local_experts", json!(1_000_000_000u64), true),
        ("num_experts_per_tok = 0", "num_experts_per_tok", json!(0), false),
        ("num_experts_per_tok = 9", "num_experts_per_tok", json!(9), false),
        ("moe_intermediate_size = 0", "moe_intermediate_size", json!(0), false),
        ("moe_intermediate_size = 10^12", "moe_intermediate_size", json!(1_000_000_000_000u64), true),
        ("intermediate_size = -1", "intermediate_size", json!(-1), false),
        ("decoder_sparse_step = 0", "decoder_sparse_step", json!(0), false),
        ("mlp_only_layers = [99]", "mlp_only_layers", json!([99]), false),
        ("architectures = []", "architectures", json!([]), false),
        ("architectures a number", "architectures", json!(5), false),
        ("architectures Llama", "architectures", json!(["LlamaForCausalLM"]), false),
        ("model_type llama", "model_type", json!("llama"), false),
        ("hidden_act gelu", "hidden_act", json!("gelu"), false),
        ("tie_word_embeddings a string", "tie_word_embeddings", json!("yes"), false),
    ] {
        v.push((format!("config {what}"), set(key, val), iso));
    }
    v.push(("config rope_theta = -1".into(), edit_config(|c| c["rope_parameters"]["rope_theta"] = json!(-1.0)), false));
    v.push(("config rope_theta = 0".into(), edit_config(|c| c["rope_parameters"]["rope_theta"] = json!(0.0)), false));
    v.push(("config rope_type yarn".into(), edit_config(|c| c["rope_parameters"]["rope_type"] = json!("yarn")), false));
    v.push((
        "config without hidden_size".into(),
        edit_config(|c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        }),
        false,
    ));
    v.push((
        "config without vocab_size".into(),
        edit_config(|c| {
            c.as_object_mut().unwrap().remove("vocab_size");
        }),
        false,
    ));
    // the config file itself
    let files: [(&str, &'static [u8]); 7] = [
        ("empty", b""),
        ("not JSON", b"not json"),
        ("a JSON array", b"[1, 2]"),
        ("truncated", b"{\"architectures\": [\"Qwen3MoeForCausalLM\""),
        ("non-UTF-8", b"{\"model_type\": \"\xff\xfe\"}"),
        ("null", b"null"),
        ("deeply nested", &DEEP),
    ];
    for (what, bytes) in files {
        v.push((format!("config.json {what}"), write(CFG, bytes), false));
    }
    v.push(("config.json missing".into(), Box::new(|d: &Path| std::fs::remove_file(d.join(CFG)).unwrap()), false));
    v.push((
        "config.json a directory".into(),
        Box::new(|d: &Path| {
            std::fs::remove_file(d.join(CFG)).unwrap();
            std::fs::create_dir(d.join(CFG)).unwrap();
        }),
        false,
    ));
    // the weights file itself
    v.push(("model.safetensors missing".into(), Box::new(|d: &Path| std::fs::remove_file(d.join(ST)).unwrap()), false));
    v.push(("model.safetensors empty".into(), write(ST, b""), false));
    v.push((
        "model.safetensors a directory".into(),
        Box::new(|d: &Path| {
            std::fs::remove_file(d.join(ST)).unwrap();
            std::fs::create_dir(d.join(ST)).unwrap();
        }),
        false,
    ));
    v.push((
        "model.safetensors is config.json".into(),
        Box::new(|d: &Path| {
            std::fs::copy(d.join(CFG), d.join(ST)).unwrap();
        }),
        false,
    ));
    // symlinks
    v.push(("model.safetensors dangling symlink".into(), symlink(ST, "/nonexistent/model.safetensors"), false));
    v.push((
        "model.safetensors symlink loop".into(),
        Box::new(|d: &Path| {
            std::fs::remove_file(d.join(ST)).unwrap();
            std::os::unix::fs::symlink(d.join("loop"), d.join(ST)).unwrap();
            std::os::unix::fs::symlink(d.join(ST), d.join("loop")).unwrap();
        }),
        false,
    ));
    v.push(("model.safetensors symlink to /dev/null".into(), symlink(ST, "/dev/null"), false));
    v.push(("model.safetensors symlink to /dev/zero".into(), symlink(ST, "/dev/zero"), false));
    v.push(("model.safetensors symlink to a directory".into(), symlink(ST, "/"), false));
    v.push(("config.json symlink to /dev/null".into(), symlink(CFG, "/dev/null"), false));
    v.push(("config.json dangling symlink".into(), symlink(CFG, "/nonexistent/config.json"), false));
    // a sharded index
    v.push(("index not JSON".into(), write("model.safetensors.index.json", b"{oops"), false));
    v.push(("index without weight_map".into(), write("model.safetensors.index.json", b"{\"metadata\": {}}"), false));
    v.push(("index weight_map empty".into(), index(json!({})), false));
    v.push(("index weight_map a list".into(), index(json!(["model.safetensors"])), false));
    v.push(("index file name a number".into(), index(json!({"lm_head.weight": 5})), false));
    v.push(("index naming a missing shard".into(), index(json!({"lm_head.weight": "model-00001-of-00002.safetensors"})), false));
    v.push(("index naming a file outside".into(), index(json!({"lm_head.weight": "../../../../etc/hostname"})), false));
    v.push(("index naming a directory".into(), index(json!({"lm_head.weight": "."})), false));
    v
}

/// In a child: load the directory the parent prepared, exit 10 refused / 11 accepted.
#[test]
fn isolated_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    match load(Path::new(&dir)) {
        Err(e) => {
            eprintln!("refused: {e}");
            std::process::exit(10)
        }
        Ok(()) => std::process::exit(11),
    }
}

enum Outcome {
    Refused(String),
    Accepted,
    Panicked(String),
}

fn run_isolated(dir: &Path) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh").arg("-c").arg("ulimit -v 4194304; exec \"$0\" isolated_child --exact --nocapture --test-threads=1").arg(exe).env(CHILD_ENV, dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(10) => Outcome::Refused(err.lines().find(|l| l.starts_with("refused: ")).unwrap_or("").to_string()),
        Some(11) => Outcome::Accepted,
        code => Outcome::Panicked(format!("child exited {code:?}: {}", err.lines().rev().take(6).collect::<Vec<_>>().join(" | "))),
    }
}

#[test]
fn hostile_checkpoints_are_refused_without_panics() {
    // the base is valid
    let base = fresh();
    load(base.path()).expect("the fixture loads");
    let cases = cases();
    assert!(cases.len() >= 70, "{} cases", cases.len());
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let (mut refused, mut accepted, mut panics) = (0, 0, 0);
    let (mut failures, mut gaps, mut fixed) = (Vec::new(), Vec::new(), Vec::new());
    for (what, edit, isolate) in &cases {
        let d = fresh();
        edit(d.path());
        let outcome = if *isolate {
            run_isolated(d.path())
        } else {
            match catch_unwind(AssertUnwindSafe(|| load(d.path()))) {
                Ok(Err(e)) => Outcome::Refused(e),
                Ok(Ok(())) => Outcome::Accepted,
                Err(p) => Outcome::Panicked(p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()),
            }
        };
        let gap = KNOWN_GAPS.contains(&what.as_str());
        match outcome {
            Outcome::Refused(e) => {
                refused += 1;
                if gap {
                    fixed.push(what.clone());
                }
                if std::env::var_os("HOSTILE_VERBOSE").is_some() {
                    eprintln!("  {what}: {e}");
                }
            }
            Outcome::Accepted if gap => {
                accepted += 1;
                gaps.push(what.clone());
            }
            Outcome::Accepted => {
                accepted += 1;
                failures.push(format!("{what}: accepted"));
            }
            Outcome::Panicked(m) => {
                panics += 1;
                failures.push(format!("{what}: PANIC {m}"));
            }
        }
    }
    std::panic::set_hook(prev);
    eprintln!("hostile_checkpoints: tried {}, refused {refused}, panics {panics}, accepted-wrongly {accepted}; data lost 0 (the fixture is never written)", cases.len());
    for g in &gaps {
        eprintln!("hostile_checkpoints: KNOWN_GAP accepted: {g}");
    }
    for f in &fixed {
        eprintln!("hostile_checkpoints: known gap now refused: {f}");
    }
    assert!(failures.is_empty(), "{} hostile checkpoints mishandled:\n{}", failures.len(), failures.join("\n"));
    // nothing was written back into the fixture
    load(&common::fixture("qwen3_moe_tiny")).expect("the fixture still loads");
}
