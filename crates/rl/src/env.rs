//! Environments: a prompt source and a reward function. Users add their own by implementing
//! [`Environment`]; [`Addition`] is the built-in verifiable task.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One task instance: the prompt and whatever the reward needs (here the expected answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

pub trait Environment {
    fn name(&self) -> &str;
    /// A training instance.
    fn sample(&self, rng: &mut ChaCha8Rng) -> Task;
    /// Held-out instances for evaluation (never sampled for training).
    fn eval_set(&self) -> Vec<Task>;
    /// Reward of a completion (generated tokens, stop token included if any).
    fn reward(&self, task: &Task, completion: &[u32]) -> f32;
    /// Token that ends an answer.
    fn stop_token(&self) -> u32;
}

/// Byte-level text ↔ tokens for the embedded default's 256-token vocabulary.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

pub fn decode(tokens: &[u32]) -> String {
    tokens.iter().map(|&t| if t < 128 { t as u8 as char } else { '?' }).collect()
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
        Task { prompt: encode(&format!("{a}+{b}=")), answer: encode(&format!("{}\n", a + b)) }
    }
}

impl Environment for Addition {
    fn name(&self) -> &str {
        "addition"
    }
    fn sample(&self, rng: &mut ChaCha8Rng) -> Task {
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
    fn reward(&self, task: &Task, completion: &[u32]) -> f32 {
        f32::from(u8::from(completion == task.answer.as_slice()))
    }
    fn stop_token(&self) -> u32 {
        u32::from(b'\n')
    }
}
