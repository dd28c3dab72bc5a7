//! `[task] kind = "dataset"`: records of a JSONL / Parquet file as prompts through the model's
//! tokenizer — with `chat = true` rendered by its chat template with the generation prompt —
//! scored by the `[[reward]]` tables (none: `exact`) on the decoded completion cut at the
//! first stop string. Generation stops at the tokenizer's EOS tokens and at stop strings that
//! are one token; a longer stop string cuts the completion after generation (the tokens after
//! it are neither rewarded nor trained).

use std::sync::{Arc, Mutex};

use lockstep_text::{TemplateMessage, Tokenizer};
use rand_chacha::ChaCha8Rng;

use crate::config::{RewardSpec, RunConfig};
use crate::dataset::{self, Prompt, Record};
use crate::env::{Environment, Judged, Task};
use crate::error::{Result, RlError};
use crate::reward::{Input, RewardSet};

pub struct TextEnv {
    tok: Arc<Tokenizer>,
    train: Vec<Task>,
    test: Vec<Task>,
    stop: Vec<String>,
    stop_ids: Vec<u32>,
    rewards: RewardSet,
    seed: u64,
    shuffle: bool,
    /// the visiting order of the last epoch asked for
    order: Mutex<Option<(u64, Vec<usize>)>>,
    /// records skipped for `skip_invalid`
    pub skipped: usize,
}

/// The prompt text of a record as the model sees it.
pub fn prompt_text(tok: &Tokenizer, r: &Record, chat: bool) -> std::result::Result<String, String> {
    match (&r.prompt, chat) {
        (Prompt::Text(p), false) => Ok(match &r.system {
            Some(s) => format!("{s}\n{p}"),
            None => p.clone(),
        }),
        (Prompt::Text(p), true) => tok.chat_prompt(r.system.as_deref(), p),
        (Prompt::Messages(_), false) => Err("a `messages` prompt needs task.chat = true (the chat template renders it)".into()),
        (Prompt::Messages(m), true) => {
            let mut msgs: Vec<TemplateMessage> = Vec::new();
            if let Some(s) = &r.system {
                if m.first().is_none_or(|x| x.role != "system") {
                    msgs.push(TemplateMessage { role: "system".into(), content: s.clone(), name: None });
                }
            }
            msgs.extend(m.iter().cloned());
            tok.apply_chat_template(&msgs, true, &serde_json::Map::new())
        }
    }
}

impl TextEnv {
    pub fn new(cfg: &RunConfig, tok: Arc<Tokenizer>) -> Result<Self> {
        let task = &cfg.task;
        let (train, test, skipped) = dataset::split(task, cfg.seed)?;
        if skipped > 0 {
            eprintln!("warning: task.skip_invalid: {skipped} bad records skipped");
        }
        let specs = if cfg.reward.is_empty() { vec![RewardSpec::of("exact")] } else { cfg.reward.clone() };
        let rewards = RewardSet::new(&specs)?;
        let mut stop_ids = tok.eos_token_ids.clone();
        for s in &task.stop {
            if let Ok(ids) = tok.encode(s, false) {
                if ids.len() == 1 {
                    stop_ids.push(ids[0]);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        // the warm-up's answer ends as a completion should: EOS, else the first stop string
        let end: Vec<u32> = match (tok.eos_token_ids.first(), task.stop.first()) {
            (Some(&e), _) => vec![e],
            (None, Some(s)) => tok.encode(s, false).map_err(|e| crate::error::bad("task.stop", format!("`{s}`: {e}")))?,
            (None, None) => Vec::new(),
        };
        let file = task.path.clone().unwrap_or_default();
        let build = |records: Vec<Record>, which: &str| -> Result<Vec<Task>> {
            records
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let at = format!("{which} record {}", i + 1);
                    let bad = |msg: String| RlError::Dataset { file: file.clone(), at: at.clone(), msg };
                    let text = prompt_text(&tok, &r, task.chat).map_err(|e| bad(format!("prompt: {e}")))?;
                    let prompt = tok.encode(&text, !task.chat).map_err(|e| bad(format!("tokenizing the prompt: {e}")))?;
                    if prompt.is_empty() {
                        return Err(bad("the prompt has no tokens".into()));
                    }
                    let mut answer = tok.encode(&task.target.replace("{answer}", &r.answer), false).map_err(|e| bad(format!("tokenizing the answer: {e}")))?;
                    answer.extend_from_slice(&end);
                    Ok(Task { prompt, answer, prompt_text: text, answer_text: r.answer, metadata: r.metadata })
                })
                .collect()
        };
        let train = build(train, "train")?;
        let mut test = build(test, "test")?;
        let step = test.len().div_ceil(task.max_eval).max(1);
        test = test.into_iter().step_by(step).collect();
        Ok(Self { tok, train, test, stop: task.stop.clone(), stop_ids, rewards, seed: cfg.seed, shuffle: task.shuffle, order: Mutex::new(None), skipped })
    }

    /// The completion's text cut at the first stop string, and the tokens it takes (all of
    /// them when no stop string occurs; trailing EOS tokens are not text).
    pub fn cut(&self, completion: &[u32]) -> (String, usize) {
        let text = self.tok.decode(completion);
        let first = self.stop.iter().filter_map(|s| text.find(s.as_str()).map(|i| (i, s.len()))).min();
        let Some((at, len)) = first else { return (text, completion.len()) };
        // the fewest tokens whose text holds the stop string
        let keep = (1..=completion.len()).find(|&k| self.tok.decode(&completion[..k]).len() >= at + len).unwrap_or(completion.len());
        (text[..at].to_string(), keep)
    }
}

impl Environment for TextEnv {
    fn name(&self) -> &str {
        "dataset"
    }
    fn sample(&self, index: u64, _rng: &mut ChaCha8Rng) -> Task {
        let n = self.train.len() as u64;
        let (epoch, pos) = (index / n, (index % n) as usize);
        let mut cache = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            *cache = Some((epoch, dataset::order(self.train.len(), epoch, self.seed, self.shuffle)));
        }
        let i = cache.as_ref().map_or(pos, |(_, o)| o[pos]);
        self.train[i].clone()
    }
    fn eval_set(&self) -> Vec<Task> {
        self.test.clone()
    }
    fn judge(&self, items: &[(&Task, &[u32])]) -> Result<Vec<Judged>> {
        let cuts: Vec<(String, usize)> = items.iter().map(|(_, c)| self.cut(c)).collect();
        let inputs: Vec<Input> = items
            .iter()
            .zip(&cuts)
            .map(|((t, _), (text, keep))| Input { prompt: &t.prompt_text, completion: text, answer: &t.answer_text, metadata: &t.metadata, tokens: *keep })
            .collect();
        let scored = self.rewards.score(&inputs)?;
        Ok(scored.into_iter().zip(cuts).map(|(scored, (_, keep))| Judged { scored, keep }).collect())
    }
    fn stop_tokens(&self) -> Vec<u32> {
        self.stop_ids.clone()
    }
    fn decode(&self, tokens: &[u32]) -> String {
        self.tok.decode(tokens)
    }
    fn train_size(&self) -> Option<usize> {
        Some(self.train.len())
    }
    fn skipped(&self) -> usize {
        self.skipped
    }
    fn reward_names(&self) -> Vec<String> {
        self.rewards.names.clone()
    }
}

/// The tokenizer of a run: the checkpoint's (`tokenizer.json` beside the weights), or the
/// embedded default's bytes.
pub fn tokenizer_for(cfg: &RunConfig) -> Result<Tokenizer> {
    let Some(dir) = &cfg.model.checkpoint else { return Ok(Tokenizer::bytes()) };
    let dir = std::path::Path::new(dir);
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| RlError::io(&cfg_path, e))?;
    let vocab = lockstep_model::ModelConfig::from_json_str(&text, &cfg_path.display().to_string())?.vocab_size;
    let tok = Tokenizer::from_dir(dir, vocab)?;
    if tok.vocab_size() > vocab {
        return Err(RlError::io(&dir.join("tokenizer.json"), format!("{} tokens, more than the model's vocab_size {vocab}", tok.vocab_size())));
    }
    Ok(tok)
}

/// The run's environment.
pub fn build(cfg: &RunConfig) -> Result<Box<dyn Environment>> {
    match cfg.task.kind.as_str() {
        "dataset" => Ok(Box::new(TextEnv::new(cfg, Arc::new(tokenizer_for(cfg)?))?)),
        _ => Ok(Box::new(crate::env::Addition { digits: cfg.task.digits })),
    }
}
