//! Datasets: the shipped word-problem set reads the same from JSONL and Parquet; a bad record
//! is an error naming the file, line and field (or, with `skip_invalid`, counted); the
//! held-out fraction is seeded and disjoint; epochs visit every record in a seeded order; the
//! dataset environment renders prompts through the tiny BPE tokenizer's chat template, stops
//! on its EOS token and cuts completions at stop strings.

use std::path::PathBuf;
use std::sync::Arc;

use lockstep_rl::config::{RunConfig, TaskSection};
use lockstep_rl::dataset::{self, Prompt};
use lockstep_rl::env::Environment;
use lockstep_rl::text_env::TextEnv;
use lockstep_rl::RlError;
use lockstep_text::Tokenizer;

fn tasks_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tasks")
}

fn task_of(path: &std::path::Path) -> TaskSection {
    TaskSection { kind: "dataset".into(), path: Some(path.display().to_string()), ..TaskSection::default() }
}

#[test]
fn shipped_jsonl_and_parquet_hold_the_same_records() {
    for split in ["train", "test"] {
        let j = tasks_dir().join(format!("word_problems_{split}.jsonl"));
        let p = tasks_dir().join(format!("word_problems_{split}.parquet"));
        let a = dataset::load(&j, &task_of(&j)).unwrap();
        let b = dataset::load(&p, &task_of(&p)).unwrap();
        assert_eq!(a.records.len(), if split == "train" { 2000 } else { 200 });
        assert_eq!(a.records, b.records, "{split}");
        assert_eq!(a.skipped + b.skipped, 0);
        let r = &a.records[0];
        assert!(matches!(&r.prompt, Prompt::Text(t) if t.ends_with("? ")), "{r:?}");
        assert!(r.answer.parse::<u32>().unwrap() <= 18 && r.metadata.get("op").is_some());
    }
    // no held-out prompt is a training prompt
    let tr = dataset::load(&tasks_dir().join("word_problems_train.jsonl"), &task_of(&tasks_dir().join("x.jsonl"))).unwrap();
    let te = dataset::load(&tasks_dir().join("word_problems_test.jsonl"), &task_of(&tasks_dir().join("x.jsonl"))).unwrap();
    let train: std::collections::HashSet<_> = tr.records.iter().map(|r| format!("{:?}", r.prompt)).collect();
    assert!(te.records.iter().all(|r| !train.contains(&format!("{:?}", r.prompt))));
}

#[test]
fn bad_records_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    let lines = [r#"{"prompt": "1+1=", "answer": 2}"#, "", r#"{"prompt": "2+2=", "answr": "4"}"#, r#"{"prompt": 5, "answer": "5"}"#, "not json", r#"["a"]"#, r#"{"prompt": "3+3=", "answer": "6", "id": 9}"#];
    std::fs::write(&f, lines.join("\n")).unwrap();
    let e = dataset::load(&f, &task_of(&f)).unwrap_err();
    let RlError::Dataset { file, at, msg } = &e else { panic!("{e}") };
    assert!(file.ends_with("d.jsonl") && at == "line 3" && msg.contains("field `answer`: missing"), "{e}");
    // skip_invalid: the four bad lines are counted, the good ones kept (a number answer as text)
    let t = TaskSection { skip_invalid: true, ..task_of(&f) };
    let got = dataset::load(&f, &t).unwrap();
    assert_eq!(got.skipped, 4);
    assert_eq!(got.records.iter().map(|r| r.answer.as_str()).collect::<Vec<_>>(), vec!["2", "6"]);
    assert_eq!(got.records[1].metadata, serde_json::json!({"id": 9}));
    // the other messages
    for (line, want) in [(r#"{"prompt": 5, "answer": "5"}"#, "field `prompt`: not a string"), ("not json", "not JSON"), (r#"["a"]"#, "not a JSON object")] {
        std::fs::write(&f, line).unwrap();
        let e = dataset::load(&f, &task_of(&f)).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains(want), "{e}");
    }
    // messages: each message needs a string role and content
    std::fs::write(&f, r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "user"}], "answer": "x"}"#).unwrap();
    let t = TaskSection { messages_field: Some("messages".into()), ..task_of(&f) };
    let e = dataset::load(&f, &t).unwrap_err().to_string();
    assert!(e.contains("field `messages[1].content`"), "{e}");
    // not a dataset file
    let e = dataset::load(&dir.path().join("d.csv"), &task_of(&f)).unwrap_err().to_string();
    assert!(e.contains("d.csv") && e.contains(".jsonl or .parquet"), "{e}");
    std::fs::write(dir.path().join("bad.parquet"), b"PAR1 nope").unwrap();
    let e = dataset::load(&dir.path().join("bad.parquet"), &task_of(&f)).unwrap_err().to_string();
    assert!(e.contains("bad.parquet") && e.contains("not a Parquet file"), "{e}");
}

#[test]
fn held_out_fraction_is_seeded_and_disjoint_and_epochs_reshuffle() {
    let p = tasks_dir().join("word_problems_test.jsonl");
    let t = TaskSection { test_fraction: 0.25, ..task_of(&p) };
    let (tr, te, _) = dataset::split(&t, 3).unwrap();
    assert_eq!((tr.len(), te.len()), (150, 50));
    let (tr2, te2, _) = dataset::split(&t, 3).unwrap();
    assert_eq!((&tr, &te), (&tr2, &te2), "the same seed, the same split");
    let (_, te3, _) = dataset::split(&t, 4).unwrap();
    assert_ne!(te, te3, "another seed, another split");
    let a = dataset::order(50, 0, 1, true);
    let b = dataset::order(50, 1, 1, true);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "an epoch visits every record once");
    assert_ne!(a, b, "each epoch its own order");
    assert_eq!(a, dataset::order(50, 0, 1, true));
    assert_eq!(dataset::order(5, 3, 1, false), vec![0, 1, 2, 3, 4]);
}

fn bpe_cfg(chat: bool) -> RunConfig {
    let task = TaskSection {
        kind: "dataset".into(),
        path: Some(tasks_dir().join("word_problems_train.jsonl").display().to_string()),
        test_path: Some(tasks_dir().join("word_problems_test.parquet").display().to_string()),
        chat,
        system: Some("Answer with a number.".into()),
        stop: vec!["\n".into(), " So".into()],
        ..TaskSection::default()
    };
    RunConfig { task, ..RunConfig::default() }
}

#[test]
fn dataset_env_renders_the_chat_template_and_cuts_at_stops() {
    let tok = Arc::new(Tokenizer::from_dir(&tasks_dir().join("tiny-bpe"), 400).unwrap());
    let env = TextEnv::new(&bpe_cfg(true), tok.clone()).unwrap();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let t = env.sample(0, &mut rng);
    let user = t.prompt_text.split("<|im_start|>user\n").nth(1).unwrap().split("<|im_end|>").next().unwrap();
    assert_eq!(t.prompt_text, format!("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(t.prompt, tok.encode(&t.prompt_text, false).unwrap());
    // the warm-up answer: the answer, then EOS
    let im_end = tok.eos_token_ids[0];
    assert_eq!(t.answer, [tok.encode(&t.answer_text, false).unwrap(), vec![im_end]].concat());
    // stops: EOS and "\n" (one token here) stop generation; " So" (two tokens) cuts after
    let nl = tok.encode("\n", false).unwrap();
    assert_eq!(nl.len(), 1);
    let mut stops = vec![im_end, nl[0]];
    stops.sort_unstable();
    assert_eq!(env.stop_tokens(), stops);
    let c = tok.encode(&format!("{} So it is 99", t.answer_text), false).unwrap();
    let (text, keep) = env.cut(&c);
    assert_eq!(text, t.answer_text);
    assert!(keep < c.len() && tok.decode(&c[..keep]).ends_with(" So"), "{keep} of {}", c.len());
    let j = env.judge(&[(&t, c.as_slice()), (&t, &[im_end][..])]).unwrap();
    assert_eq!((j[0].scored.reward, j[0].keep), (1.0, keep), "exact match on the text before the stop");
    assert_eq!(j[1].scored.reward, 0.0, "an empty completion");
    assert_eq!(env.train_size(), Some(2000));
    assert_eq!(env.eval_set().len(), 200);
    // no chat: the system line, then the prompt as is
    let plain = TextEnv::new(&bpe_cfg(false), tok).unwrap().sample(0, &mut rng);
    assert!(plain.prompt_text.starts_with("Answer with a number.\n") && !plain.prompt_text.contains("<|im_start|>"), "{}", plain.prompt_text);
}

/// `task.epochs = 1` ends the run after one pass over the training records (before `steps`),
/// and that pass rolls out every training record once; the held-out record is never trained.
#[test]
fn one_epoch_visits_every_training_record_once_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.jsonl");
    let lines: Vec<String> = (0..5).map(|i| format!(r#"{{"prompt": "{i}+1=", "answer": "{}"}}"#, i + 1)).collect();
    std::fs::write(&f, lines.join("\n")).unwrap();
    let task = TaskSection { test_fraction: 0.2, epochs: 1, stop: vec!["\n".into()], ..task_of(&f) };
    let mut c = RunConfig { task, steps: 10, ..RunConfig::default() };
    c.warmup.steps = 1;
    c.warmup.batch = 2;
    c.rollout.prompts_per_step = 2;
    c.rollout.group_size = 2;
    c.trainer.mini_steps = 1;
    c.output.checkpoint_every = 0;
    c.validate().unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = dir.path().join("run");
    let s = lockstep_rl::run(&c, &out, true, &lockstep_rl::RunOptions { prompt_log: Some(log.clone()), ..Default::default() }).unwrap();
    let rl: Vec<_> = s.records.iter().filter(|r| r.phase == "rl").collect();
    assert_eq!(rl.len(), 2, "4 training records / 2 per step = 2 steps, not 10");
    // the prompts of the run: eval (1 held-out record) after the warm-up, 2 steps × 2 × 2
    // rollouts, the final eval
    let seen: Vec<String> = log.lock().unwrap().iter().map(|p| lockstep_rl::env::decode(p)).collect();
    assert_eq!(seen.len(), 1 + 8 + 1);
    let held = &seen[0];
    assert_eq!(&seen[9], held);
    let mut rollouts: Vec<&String> = seen[1..9].iter().step_by(2).collect();
    assert!(seen[1..9].chunks(2).all(|g| g[0] == g[1]), "a group samples one prompt");
    rollouts.sort();
    rollouts.dedup();
    assert_eq!(rollouts.len(), 4, "every training record once: {rollouts:?}");
    assert!(!rollouts.contains(&held), "the held-out record is not trained on");
}
