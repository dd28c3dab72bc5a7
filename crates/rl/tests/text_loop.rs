//! The RL loop on a checkpoint with a real tokenizer: the shipped tiny BPE `tokenizer.json` and
//! its ChatML chat template beside random weights, the shipped word problems as a dataset with
//! `chat = true`. Every prompt the engine saw (rollouts, greedy eval, pass@k samples) is
//! exactly the template's output for a record, tokenized — checked against a rendering and
//! tokenization done here independently (string formatting + `tokenizers` itself).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use lockstep_model::{ModelConfig, MoeCausalLm};
use lockstep_rl::config::{RewardSpec, RunConfig, TaskSection};
use lockstep_rl::{run, RunOptions};

fn tasks_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tasks")
}

#[test]
fn engine_prompts_are_the_chat_templates_output() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut cfg: serde_json::Value = serde_json::from_str(lockstep_model::init::DEFAULT_CONFIG_JSON).unwrap();
    cfg["vocab_size"] = serde_json::json!(384);
    let model = MoeCausalLm::random(&ModelConfig::from_json_str(&cfg.to_string(), "cfg").unwrap(), 5, DType::F32, &Device::Cpu).unwrap();
    model.save(&ckpt).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tasks_dir().join("tiny-bpe").join(f), ckpt.join(f)).unwrap();
    }

    let mut c = RunConfig::default();
    c.model.checkpoint = Some(ckpt.display().to_string());
    c.task = TaskSection {
        kind: "dataset".into(),
        path: Some(tasks_dir().join("word_problems_train.jsonl").display().to_string()),
        test_path: Some(tasks_dir().join("word_problems_test.parquet").display().to_string()),
        chat: true,
        max_eval: 4,
        ..TaskSection::default()
    };
    c.reward = vec![RewardSpec::of("math")];
    c.steps = 2;
    c.warmup.steps = 2;
    c.warmup.batch = 4;
    c.rollout.prompts_per_step = 2;
    c.rollout.group_size = 2;
    c.rollout.max_tokens = 3;
    c.trainer.mini_steps = 1;
    c.eval.every = 1;
    c.eval.pass_k = vec![1, 2];
    c.validate().unwrap();
    let out = dir.path().join("run");
    let log = Arc::new(Mutex::new(Vec::new()));
    let s = run(&c, &out, true, &RunOptions { prompt_log: Some(log.clone()), ..RunOptions::default() }).unwrap();

    // the template's output, rendered and tokenized independently
    let hf = tokenizers::Tokenizer::from_file(tasks_dir().join("tiny-bpe/tokenizer.json")).unwrap();
    let mut expected = HashSet::new();
    for f in ["word_problems_train.jsonl", "word_problems_test.jsonl"] {
        for line in std::fs::read_to_string(tasks_dir().join(f)).unwrap().lines() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", r["prompt"].as_str().unwrap());
            expected.insert(hf.encode(text.as_str(), false).unwrap().get_ids().to_vec());
        }
    }
    let seen = log.lock().unwrap().clone();
    // warm-up eval and 2 step evals: 4 greedy + 4 × 2 samples each; 2 steps of 2 × 2 rollouts
    assert_eq!(seen.len(), 3 * (4 + 8) + 2 * 4);
    for p in &seen {
        assert!(expected.contains(p), "a prompt that is not the template's output: {:?}", hf.decode(p, false));
    }
    let im_start = hf.token_to_id("<|im_start|>").unwrap();
    assert!(seen.iter().all(|p| p[0] == im_start && p.iter().filter(|&&t| t == im_start).count() == 2));
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 4 + 4, "4 held-out prompts and 2 × 2 training prompts");

    // the metrics carry eval reward, pass@k and the reward part; the report the samples
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 2);
    assert!(rl.iter().all(|r| r.eval_reward.is_some() && r.eval_pass_at.len() == 2 && r.reward_parts.contains_key("math")), "{rl:?}");
    assert!(rl.iter().all(|r| r.eval_pass_at["pass@1"] <= r.eval_pass_at["pass@2"] + 1e-12));
    let samples: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(out.join("eval_samples.json")).unwrap()).unwrap();
    assert_eq!(samples.len(), 4);
    assert!(samples[0]["prompt"].as_str().unwrap().starts_with("<|im_start|>user\n"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Sample completions") && html.contains("tokens/s") && html.contains("&lt;|im_start|&gt;user"), "report header and samples");
}
