//! Continuous batching: requests join between steps; each step packs, per running sequence,
//! the tokens not yet forwarded (a whole prompt, one sampled token, or — once finished — its
//! last token, forwarded only so its route row exists) into one row, runs the model over the
//! sequences' KV caches, samples, and records every token's route.

use std::collections::{BTreeMap, VecDeque};

use candle_core::{DType, Device, IndexOp, D};
use lockstep_model::{Batch, KvCache, MoeCausalLm, RoutingPlan};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};
use crate::sampling::{sample, SamplingParams};

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// max_tokens reached
    Length,
    /// a stop token was sampled
    Stop,
}

/// Routes of one MoE layer for every token of a sequence (prompt + completion): row n holds
/// the K experts of token n in selection order and their router probabilities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerRoutes {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// log π(token) of each completion token under the model (temperature 1)
    pub logprobs: Vec<f32>,
    /// keyed by decoder layer; rows = prompt + completion tokens
    pub routes: BTreeMap<usize, LayerRoutes>,
    pub top_k: usize,
    pub finish: FinishReason,
    /// weights version that produced it
    pub policy_version: u64,
}

struct Seq {
    id: u64,
    prompt_len: usize,
    tokens: Vec<u32>,
    fed: usize,
    cache: KvCache,
    rng: ChaCha8Rng,
    params: SamplingParams,
    logprobs: Vec<f32>,
    routes: BTreeMap<usize, LayerRoutes>,
    finished: Option<FinishReason>,
}

pub struct Engine {
    model: MoeCausalLm,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    /// most sequences in one step
    pub max_running: usize,
    pub policy_version: u64,
}

impl Completion {
    /// Prompt followed by completion.
    pub fn sequence(&self) -> Vec<u32> {
        let mut s = self.prompt.clone();
        s.extend_from_slice(&self.tokens);
        s
    }

    /// The routes as a lockstep route trace (`[token][layer][k]`, router probabilities in f32,
    /// ordered rows, no missing row), stamped with the policy version and a config fingerprint.
    pub fn route_trace(&self, num_experts: usize, fingerprint: u64) -> lockstep_trace::Result<lockstep_trace::RouteTrace> {
        let n = self.prompt.len() + self.tokens.len();
        let k = self.top_k;
        let layers: Vec<u32> = self.routes.keys().map(|&l| l as u32).collect();
        let mut ids = Vec::with_capacity(n * layers.len() * k);
        let mut probs = Vec::with_capacity(ids.capacity());
        for t in 0..n {
            for r in self.routes.values() {
                ids.extend_from_slice(&r.ids[t * k..(t + 1) * k]);
                probs.extend_from_slice(&r.probs[t * k..(t + 1) * k]);
            }
        }
        let meta = lockstep_trace::TraceMeta {
            num_experts: num_experts as u32,
            top_k: k as u32,
            prompt_len: self.prompt.len() as u32,
            fingerprint,
            policy_version: self.policy_version,
            ordered: true,
        };
        let probs = lockstep_trace::Probs::from_f32(lockstep_trace::ProbDtype::F32, &probs);
        lockstep_trace::RouteTrace::from_u32(meta, layers, n, &ids, vec![false; n], Some(probs))
    }
}

impl Engine {
    /// An engine over `model` (use `Kernels::Invariant` for lockstep with the trainer).
    pub fn new(model: MoeCausalLm) -> Self {
        Self { model, waiting: VecDeque::new(), running: Vec::new(), next_id: 0, max_running: 64, policy_version: 0 }
    }

    pub fn model(&self) -> &MoeCausalLm {
        &self.model
    }

    /// Swap in new weights between steps (no request may be in flight); bumps the policy version.
    pub fn load_weights(&mut self, model: MoeCausalLm, version: u64) -> Result<()> {
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return Err(EngineError::Request { id: 0, field: "weights".into(), msg: "requests are in flight; drain first".into() });
        }
        self.model = model;
        self.policy_version = version;
        Ok(())
    }

    /// Queue a request; it joins the batch at the next step.
    pub fn submit(&mut self, req: Request) -> Result<u64> {
        let id = self.next_id;
        let bad = |field: &str, msg: String| EngineError::Request { id, field: field.into(), msg };
        if req.prompt.is_empty() {
            return Err(bad("prompt", "empty".into()));
        }
        let v = self.model.cfg.vocab_size;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= v) {
            return Err(bad("prompt", format!("token id {t} >= vocab_size {v}")));
        }
        req.params.validate().map_err(|(f, m)| bad(&f, m))?;
        self.next_id += 1;
        let rng = ChaCha8Rng::seed_from_u64(req.params.seed);
        self.waiting.push_back(Seq {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            fed: 0,
            cache: KvCache::default(),
            rng,
            params: req.params,
            logprobs: Vec::new(),
            routes: BTreeMap::new(),
            finished: None,
        });
        Ok(id)
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// One batched forward; returns the requests that completed.
    pub fn step(&mut self) -> Result<Vec<Completion>> {
        while self.running.len() < self.max_running {
            match self.waiting.pop_front() {
                Some(s) => self.running.push(s),
                None => break,
            }
        }
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let (mut toks, mut pos, mut cu) = (Vec::new(), Vec::new(), vec![0usize]);
        for s in &self.running {
            toks.extend_from_slice(&s.tokens[s.fed..]);
            pos.extend((s.fed..s.tokens.len()).map(|p| p as u32));
            cu.push(toks.len());
        }
        let step = Batch::packed(&toks, Some(&pos), &cu, &Device::Cpu)?;
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let out = self.model.forward_cached(&step, &mut caches, &RoutingPlan::record())?;
        let logsm = candle_nn::ops::log_softmax(&out.logits.to_dtype(DType::F32)?, D::Minus1)?;
        let k = self.model.cfg.moe.router.top_k;
        let step_routes: Vec<(usize, Vec<u32>, Vec<f32>)> = out
            .routes
            .iter()
            .map(|(&l, r)| Ok((l, r.expert_A.to_vec1()?, r.prob_A.to_dtype(DType::F32)?.to_vec1()?)))
            .collect::<Result<_>>()?;
        for (i, s) in self.running.iter_mut().enumerate() {
            let (a, b) = (cu[i], cu[i + 1]);
            for (l, ids, probs) in &step_routes {
                let r = s.routes.entry(*l).or_default();
                r.ids.extend_from_slice(&ids[a * k..b * k]);
                r.probs.extend_from_slice(&probs[a * k..b * k]);
            }
            s.fed = s.tokens.len();
            if s.finished.is_some() {
                continue; // that was the flush of the last token's route
            }
            let row: Vec<f32> = out.logits.i((0, b - 1))?.to_vec1()?;
            let lp: Vec<f32> = logsm.i((0, b - 1))?.to_vec1()?;
            let tok = sample(&row, &s.params, &mut s.rng);
            s.tokens.push(tok);
            s.logprobs.push(lp[tok as usize]);
            if s.params.stop_token_ids.contains(&tok) {
                s.finished = Some(FinishReason::Stop);
            } else if s.tokens.len() - s.prompt_len >= s.params.max_tokens {
                s.finished = Some(FinishReason::Length);
            }
        }
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for s in self.running.drain(..) {
            match s.finished {
                Some(finish) if s.fed == s.tokens.len() => done.push(Completion {
                    id: s.id,
                    prompt: s.tokens[..s.prompt_len].to_vec(),
                    tokens: s.tokens[s.prompt_len..].to_vec(),
                    logprobs: s.logprobs,
                    routes: s.routes,
                    top_k: k,
                    finish,
                    policy_version: self.policy_version,
                }),
                _ => keep.push(s),
            }
        }
        self.running = keep;
        Ok(done)
    }

    /// Submit all and step until every request completes; completions in request order.
    pub fn generate(&mut self, reqs: Vec<Request>) -> Result<Vec<Completion>> {
        let ids: Vec<u64> = reqs.into_iter().map(|r| self.submit(r)).collect::<Result<_>>()?;
        let mut done: BTreeMap<u64, Completion> = BTreeMap::new();
        while !self.is_idle() {
            for c in self.step()? {
                done.insert(c.id, c);
            }
        }
        Ok(ids.iter().filter_map(|id| done.remove(id)).collect())
    }
}
