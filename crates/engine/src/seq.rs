//! One request inside the engine: its tokens (prompt + sampled), how many of them the KV pool
//! holds, its block table, sampling state, and the route rows of every token forwarded so far.

use lockstep_trace::{ProbDtype, Probs, RouteTrace, TraceMeta};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};
use crate::sampling::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// max_tokens reached
    Length,
    /// a stop token was sampled
    Stop,
}

pub(crate) struct Seq {
    pub id: u64,
    pub prompt_len: usize,
    pub tokens: Vec<u32>,
    /// tokens whose keys and values are in the pool (the next one to forward)
    pub fed: usize,
    /// pool blocks, in order, holding tokens 0..fed (and room for the next ones)
    pub blocks: Vec<u32>,
    /// prefix-cache hashes of the full blocks registered or hit so far, in order
    pub hashes: Vec<u64>,
    pub rng: ChaCha8Rng,
    pub params: SamplingParams,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// route rows of every token forwarded so far, `[token][layer][w]`, cut from each step's
    /// forward trace (or copied from cached blocks). A preempted sequence keeps them: the
    /// recomputation does not append rows it already has.
    pub route_ids: Vec<u32>,
    pub route_probs: Vec<f32>,
    pub finished: Option<FinishReason>,
    /// the client request it belongs to ([`crate::Engine::submit_in_group`]): admission is fair
    /// between groups; `None`: a group of its own
    pub group: Option<u64>,
}

impl Seq {
    pub fn new(id: u64, prompt: Vec<u32>, params: SamplingParams, rng: ChaCha8Rng) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            fed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            rng,
            params,
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            route_ids: Vec::new(),
            route_probs: Vec::new(),
            finished: None,
            group: None,
        }
    }

    /// Its fairness group: the request's, or its own (ungrouped sequences never share one).
    pub fn group_key(&self) -> (bool, u64) {
        self.group.map_or((false, self.id), |g| (true, g))
    }

    /// Tokens with route rows.
    pub fn route_rows(&self, row: usize) -> usize {
        self.route_ids.len().checked_div(row).unwrap_or(0)
    }

    /// The sequence's routes as a route trace (`[token][layer][w]`, no missing row).
    pub fn route_trace(&self, layers: Vec<u32>, width: usize, num_experts: usize, fingerprint: u64, policy_version: u64) -> Result<RouteTrace> {
        let n = self.tokens.len();
        let meta = TraceMeta { num_experts: num_experts as u32, top_k: width as u32, prompt_len: self.prompt_len as u32, fingerprint, policy_version, ordered: true };
        let probs = Some(Probs::from_f32(ProbDtype::F32, &self.route_probs));
        RouteTrace::from_u32(meta, layers, n, &self.route_ids, vec![false; n], probs)
            .map_err(|e| EngineError::Request { id: self.id, field: "routes".into(), msg: e.to_string() })
    }
}
