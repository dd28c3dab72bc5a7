//! Environments: a prompt source and a reward function. Users add their own by implementing
//! [`Environment`]; [`Addition`] is the built-in verifiable task and
//! [`crate::text_env::TextEnv`] a dataset through the model's tokenizer and `[[reward]]`s.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::reward::Scored;

/// One task instance: the prompt tokens, the warm-up's supervised answer tokens, and the text
/// the rewards see.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub prompt: Vec<u32>,
    /// the supervised completion of the warm-up (its stop token included)
    pub answer: Vec<u32>,
    /// the prompt as the model sees it (chat template applied)
    pub prompt_text: String,
    /// the reference answer
    pub answer_text: String,
    pub metadata: serde_json::Value,
}

/// A scored completion and how many of its tokens count (those before a stop string).
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub scored: Scored,
    pub keep: usize,
}

pub trait Environment: Send + Sync {
    fn name(&self) -> &str;
    /// Training instance number `index` of the run (the RNG is the step's, for tasks drawn at
    /// random; a dataset walks its records by index).
    fn sample(&self, index: u64, rng: &mut ChaCha8Rng) -> Task;
    /// Held-out instances for evaluation (never sampled for training).
    fn eval_set(&self) -> Vec<Task>;
    /// Rewards of completions (generated tokens, stop token included if any), one per pair.
    /// An error stops the run (a failing external verifier).
    fn judge(&self, items: &[(&Task, &[u32])]) -> Result<Vec<Judged>>;
    /// Tokens that end a completion.
    fn stop_tokens(&self) -> Vec<u32>;
    /// Tokens → text (for reports).
    fn decode(&self, tokens: &[u32]) -> String;
    /// Training instances in one pass (epochs); `None`: unbounded.
    fn train_size(&self) -> Option<usize> {
        None
    }
    /// Records skipped as invalid when loading (`task.skip_invalid`).
    fn skipped(&self) -> usize {
        0
    }
    /// Names of the reward parts of [`Scored::parts`].
    fn reward_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Byte-level text ↔ tokens for the embedded default's 256-token vocabulary (lockstep-text's
/// byte tokenizer).
pub fn encode(text: &str) -> Vec<u32> {
    lockstep_text::byte_encode(text)
}

pub fn decode(tokens: &[u32]) -> String {
    lockstep_text::byte_decode(tokens)
}

/// `a+b=` → `c\n` with `digits`-digit operands; exact-match reward (1 or 0). Operand pairs
/// whose index is ≡ 0 mod 5 are held out for evaluation.
#[derive(Debug, Clone)]
pub struct Addition {
    pub digits: u32,
}

impl Addition {
    fn max(&self) -> u64 {
        10u64.pow(self.digits)
    }
    fn held_out(&self, a: u64, b: u64) -> bool {
        (a * self.max() + b) % 5 == 0
    }
    fn task(a: u64, b: u64) -> Task {
        let (p, s) = (format!("{a}+{b}="), (a + b).to_string());
        Task { prompt: encode(&p), answer: encode(&format!("{s}\n")), prompt_text: p, answer_text: s, metadata: serde_json::Value::Null }
    }
    /// Exact match of the completion tokens with `c\n`.
    pub fn reward(&self, task: &Task, completion: &[u32]) -> f32 {
        f32::from(u8::from(completion == task.answer.as_slice()))
    }
}

impl Environment for Addition {
    fn name(&self) -> &str {
        "addition"
    }
    fn sample(&self, _index: u64, rng: &mut ChaCha8Rng) -> Task {
        loop {
            let (a, b) = (rng.random_range(0..self.max()), rng.random_range(0..self.max()));
            if !self.held_out(a, b) {
                return Self::task(a, b);
            }
        }
    }
    fn eval_set(&self) -> Vec<Task> {
        let m = self.max();
        let mut out = Vec::new();
        for a in 0..m {
            for b in 0..m {
                if self.held_out(a, b) {
                    out.push(Self::task(a, b));
                }
            }
        }
        // at most 200 instances, spread evenly
        let step = out.len().div_ceil(200).max(1);
        out.into_iter().step_by(step).collect()
    }
    fn judge(&self, items: &[(&Task, &[u32])]) -> Result<Vec<Judged>> {
        Ok(items.iter().map(|(t, c)| Judged { scored: Scored { reward: self.reward(t, c), ..Scored::default() }, keep: c.len() }).collect())
    }
    fn stop_tokens(&self) -> Vec<u32> {
        vec![u32::from(b'\n')]
    }
    fn decode(&self, tokens: &[u32]) -> String {
        decode(tokens)
    }
}
