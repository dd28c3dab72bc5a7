//! `--allow-unused` (`ServerConfig::allow_unused`): a checkpoint tensor with no place in the
//! config — here `lm_head.weight` beside `tie_word_embeddings: true` — is refused by name when
//! the server loads (or reloads) weights, and ignored when allowed.

use candle_core::{DType, Device};
use lockstep_model::MoeCausalLm;

#[test]
fn unused_tensors_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let m = MoeCausalLm::embedded_default(0, DType::F32, &Device::Cpu).unwrap();
    assert!(m.lm_head.is_some(), "the default has its own LM head");
    m.save(dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = serde_json::Value::Bool(true);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let e = lockstep_server::state::load_weights(dir.path(), DType::F32, &Device::Cpu, false).unwrap_err().to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    let tied = lockstep_server::state::load_weights(dir.path(), DType::F32, &Device::Cpu, true).unwrap();
    assert!(tied.lm_head.is_none(), "allowed: the embeddings are tied and the file's head ignored");
}
