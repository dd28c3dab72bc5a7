//! Continuous batching: requests join between steps; each step packs, per running sequence,
//! the tokens not yet forwarded (a whole prompt, one sampled token, or — once finished — its
//! last token, forwarded only so its route row exists) into one row, runs the model over the
//! sequences' KV caches, samples, and records every token's route.

use std::collections::{BTreeMap, VecDeque};

use candle_core::{DType, Tensor, D};
use lockstep_model::config::{Pool, RoutingStrategy};
use lockstep_model::moe::router::expert_choice::capacity;
use lockstep_model::logprobs::at_temperature;
use lockstep_model::{Batch, KvCache, LayerRoute, MoeCausalLm, RoutingPlan};
use lockstep_trace::{fingerprint_of, ProbDtype, Probs, RouteTrace, TraceMeta};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};
use crate::sampling::{sample, top_n, SamplingParams};

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

#[derive(Debug, Clone)]
pub struct Completion {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// log π_T(token) of each completion token: log-softmax(logits / T) at the request's
    /// temperature T (T = 1 for greedy requests), before top-k / top-p filtering
    pub logprobs: Vec<f32>,
    /// every MoE layer's route of every token (prompt + completion, no missing row), router
    /// probabilities in f32, stamped with the policy version and the config fingerprint; `None`
    /// when route capture is off
    pub routes: Option<RouteTrace>,
    /// per completion token, the `params.logprobs` most likely (token, log π) — empty when
    /// `params.logprobs` is 0
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
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
    top_logprobs: Vec<Vec<(u32, f32)>>,
    /// route rows of every token fed so far, `[token][layer][w]`, cut from each step's
    /// [`forward_trace`]
    route_layers: Vec<u32>,
    route_ids: Vec<u32>,
    route_probs: Vec<f32>,
    finished: Option<FinishReason>,
}

/// A token sampled in the last step (see [`Engine::sampled`]): what a streaming server sends
/// before the request completes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u64,
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// set when this token ends the request (its completion follows after the route flush)
    pub finish: Option<FinishReason>,
}

pub struct Engine {
    model: MoeCausalLm,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    /// most sequences in one step
    pub max_running: usize,
    pub policy_version: u64,
    capture: bool,
    sampled: Vec<Sampled>,
    /// of the model config, stamped into every route trace
    fingerprint: u64,
}

/// Experts per token in a generated sequence's routes: top-k for token choice; for expert choice
/// over one-token pools (`block:1`, the only expert choice that generates token by token) each
/// expert takes C = min(1, ceil(capacity_factor / E)) of every token, so E·C (every expert).
pub fn route_width(model: &MoeCausalLm) -> usize {
    let r = &model.cfg.moe.router;
    match r.strategy {
        RoutingStrategy::ExpertChoice { capacity_factor, pool: Pool::Block(1) } => r.num_experts * capacity(capacity_factor, 1, r.num_experts),
        _ => r.top_k,
    }
}

/// A layer's route as token-major rows of `width` experts: (ids, router probabilities), row n
/// = token slot n. Token choice rows are in selection order; expert choice assignments are
/// grouped by token (in expert order) and every token must have `width` of them.
pub fn token_rows(route: &LayerRoute, width: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let ids: Vec<u32> = route.expert_A.to_vec1()?;
    let probs: Vec<f32> = route.prob_A.to_dtype(DType::F32)?.to_vec1()?;
    if route.top_k.is_some() {
        return Ok((ids, probs));
    }
    let tok: Vec<u32> = route.token_A.to_vec1()?;
    let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::with_capacity(width); route.num_tokens];
    for ((&t, &e), &p) in tok.iter().zip(&ids).zip(&probs) {
        rows[t as usize].push((e, p));
    }
    if let Some((n, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(EngineError::Request { id: 0, field: "routes".into(), msg: format!("token slot {n} has {} experts, expected {width}", r.len()) });
    }
    Ok(rows.into_iter().flatten().unzip())
}

impl Completion {
    /// Prompt followed by completion.
    pub fn sequence(&self) -> Vec<u32> {
        let mut s = self.prompt.clone();
        s.extend_from_slice(&self.tokens);
        s
    }
}

impl Seq {
    /// The sequence's routes as a route trace (`[token][layer][w]`, no missing row).
    fn route_trace(&self, width: usize, num_experts: usize, fingerprint: u64, policy_version: u64) -> Result<RouteTrace> {
        let n = self.tokens.len();
        let meta = TraceMeta { num_experts: num_experts as u32, top_k: width as u32, prompt_len: self.prompt_len as u32, fingerprint, policy_version, ordered: true };
        let probs = Some(Probs::from_f32(ProbDtype::F32, &self.route_probs));
        RouteTrace::from_u32(meta, self.route_layers.clone(), n, &self.route_ids, vec![false; n], probs)
            .map_err(|e| EngineError::Request { id: self.id, field: "routes".into(), msg: e.to_string() })
    }
}

/// One host row per running sequence.
type HostRows = Vec<Vec<f32>>;

/// The routes of a forward as a route trace over its slots (`[slot][layer][width]`, router
/// probabilities in f32, no missing row): what the engine cuts every sequence's rows from and
/// what [`crate::consistency`] compares; `None` when nothing was recorded.
pub fn forward_trace(routes: &BTreeMap<usize, LayerRoute>, width: usize, num_experts: usize) -> Result<Option<RouteTrace>> {
    let Some(n) = routes.values().next().map(|r| r.num_tokens) else { return Ok(None) };
    let per_layer: Vec<(Vec<u32>, Vec<f32>)> = routes.values().map(|r| token_rows(r, width)).collect::<Result<_>>()?;
    let (mut ids, mut probs) = (Vec::with_capacity(n * per_layer.len() * width), Vec::with_capacity(n * per_layer.len() * width));
    for t in 0..n {
        for (i, p) in &per_layer {
            ids.extend_from_slice(&i[t * width..(t + 1) * width]);
            probs.extend_from_slice(&p[t * width..(t + 1) * width]);
        }
    }
    let meta = TraceMeta::top_k(num_experts as u32, width as u32);
    let layers = routes.keys().map(|&l| l as u32).collect();
    let trace = RouteTrace::from_u32(meta, layers, n, &ids, vec![false; n], Some(Probs::from_f32(ProbDtype::F32, &probs)))
        .map_err(|e| EngineError::Request { id: 0, field: "routes".into(), msg: e.to_string() })?;
    Ok(Some(trace))
}

impl Engine {
    /// An engine over `model` (use `Kernels::Invariant` for lockstep with the trainer).
    pub fn new(model: MoeCausalLm) -> Self {
        let fingerprint = fingerprint_of(model.cfg.to_json_string().as_bytes());
        Self {
            fingerprint,
            model,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            max_running: 64,
            policy_version: 0,
            capture: true,
            sampled: Vec::new(),
        }
    }

    /// Route capture on (the default) or off. Off, steps route without recording, completions
    /// carry no routes and a finished sequence completes at once (no step forwards its last
    /// token only for its route row). Only between requests.
    pub fn set_capture_routes(&mut self, on: bool) -> Result<()> {
        if !self.is_idle() {
            return Err(EngineError::Request { id: 0, field: "capture_routes".into(), msg: "requests are in flight; drain first".into() });
        }
        self.capture = on;
        Ok(())
    }

    pub fn captures_routes(&self) -> bool {
        self.capture
    }

    /// Sequences in the running batch / queued behind it.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Tokens sampled by the last [`Engine::step`], in batch order.
    pub fn sampled(&self) -> &[Sampled] {
        &self.sampled
    }

    /// End request `id` now, as if a stop token had been sampled (a server's stop strings): its
    /// completion (tokens so far, finish `Stop`) comes from the next step, after its last
    /// token's route row. False if it is not running or already completing.
    pub fn stop(&mut self, id: u64) -> bool {
        match self.running.iter_mut().find(|s| s.id == id) {
            Some(s) if s.fed < s.tokens.len() && s.finished != Some(FinishReason::Stop) => {
                s.finished = Some(FinishReason::Stop);
                true
            }
            _ => false,
        }
    }

    /// Drop request `id` (queued or running) without a completion (a client went away).
    pub fn abort(&mut self, id: u64) -> bool {
        let (w, r) = (self.waiting.len(), self.running.len());
        self.waiting.retain(|s| s.id != id);
        self.running.retain(|s| s.id != id);
        w != self.waiting.len() || r != self.running.len()
    }

    pub fn model(&self) -> &MoeCausalLm {
        &self.model
    }

    /// Swap in new weights between steps (no request may be in flight); bumps the policy version.
    pub fn load_weights(&mut self, model: MoeCausalLm, version: u64) -> Result<()> {
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return Err(EngineError::Request { id: 0, field: "weights".into(), msg: "requests are in flight; drain first".into() });
        }
        self.fingerprint = fingerprint_of(model.cfg.to_json_string().as_bytes());
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
        // token-by-token generation needs causal routes (expert choice: one-token pools)
        self.model.check_incremental()?;
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
            top_logprobs: Vec::new(),
            route_layers: Vec::new(),
            route_ids: Vec::new(),
            route_probs: Vec::new(),
            finished: None,
        });
        Ok(id)
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The logits and log-probabilities of each running sequence's last position (where it
    /// samples), one row each: log-softmax(logits / T) at the sequence's temperature (greedy:
    /// T = 1), as the trainer scores it — one batched op per distinct temperature of the step,
    /// over only the sampled rows.
    fn sampled_rows(&self, logits_BTV: &Tensor, cu: &[usize]) -> Result<(HostRows, HostRows)> {
        let r = self.running.len();
        let rows: Vec<u32> = (0..r).map(|i| cu[i + 1] as u32 - 1).collect();
        let dev = logits_BTV.device();
        let logits_RV = logits_BTV.squeeze(0)?.index_select(&Tensor::from_vec(rows, r, dev)?, 0)?;
        let logits: Vec<Vec<f32>> = logits_RV.to_dtype(DType::F32)?.to_vec2()?;
        let mut logprobs = vec![Vec::new(); r];
        let mut temps: Vec<f32> = self.running.iter().map(|s| s.params.temperature).collect();
        temps.sort_by(f32::total_cmp);
        temps.dedup();
        for t in temps {
            let members: Vec<u32> = (0..r as u32).filter(|&i| self.running[i as usize].params.temperature == t).collect();
            let picked = logits_RV.index_select(&Tensor::from_vec(members.clone(), members.len(), dev)?, 0)?;
            let lp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&at_temperature(&picked, t as f64)?, D::Minus1)?.to_vec2()?;
            for (i, row) in members.into_iter().zip(lp) {
                logprobs[i as usize] = row;
            }
        }
        Ok((logits, logprobs))
    }

    /// One batched forward; returns the requests that completed.
    pub fn step(&mut self) -> Result<Vec<Completion>> {
        self.sampled.clear();
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
        let step = Batch::packed(&toks, Some(&pos), &cu, self.model.device())?;
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let plan = if self.capture { RoutingPlan::record() } else { RoutingPlan::compute() };
        let out = self.model.forward_cached(&step, &mut caches, &plan)?;
        let k = route_width(&self.model);
        let step_routes = forward_trace(&out.routes, k, self.model.cfg.moe.router.num_experts)?;
        let (logits_RV, logprobs_RV) = self.sampled_rows(&out.logits, &cu)?;
        for (i, s) in self.running.iter_mut().enumerate() {
            let (a, b) = (cu[i], cu[i + 1]);
            if let Some(r) = &step_routes {
                // this sequence's slots a..b of the step, appended to its rows
                let row = r.num_layers() * k;
                let p = r.probs().ok_or_else(|| EngineError::Request { id: s.id, field: "routes".into(), msg: "recorded without probabilities".into() })?;
                s.route_layers = r.layers().to_vec();
                s.route_ids.extend(r.ids()[a * row..b * row].iter().map(|&x| u32::from(x)));
                s.route_probs.extend((a * row..b * row).map(|j| p.get_f32(j)));
            }
            s.fed = s.tokens.len();
            if s.finished.is_some() {
                continue; // that was the flush of the last token's route
            }
            let (row, lp) = (&logits_RV[i], &logprobs_RV[i]);
            let tok = sample(row, &s.params, &mut s.rng);
            s.tokens.push(tok);
            s.logprobs.push(lp[tok as usize]);
            let top = top_n(lp, s.params.logprobs);
            if s.params.logprobs > 0 {
                s.top_logprobs.push(top.clone());
            }
            if s.params.stop_token_ids.contains(&tok) {
                s.finished = Some(FinishReason::Stop);
            } else if s.tokens.len() - s.prompt_len >= s.params.max_tokens {
                s.finished = Some(FinishReason::Length);
            }
            if s.finished.is_some() && !self.capture {
                s.fed = s.tokens.len(); // no route row to flush
            }
            self.sampled.push(Sampled { id: s.id, token: tok, logprob: lp[tok as usize], top_logprobs: top, finish: s.finished });
        }
        let mut done = Vec::new();
        let mut keep = Vec::new();
        let num_experts = self.model.cfg.moe.router.num_experts;
        for s in std::mem::take(&mut self.running) {
            match s.finished {
                Some(finish) if s.fed == s.tokens.len() => {
                    let routes = if self.capture { Some(s.route_trace(k, num_experts, self.fingerprint, self.policy_version)?) } else { None };
                    done.push(Completion {
                        id: s.id,
                        prompt: s.tokens[..s.prompt_len].to_vec(),
                        tokens: s.tokens[s.prompt_len..].to_vec(),
                        logprobs: s.logprobs,
                        routes,
                        top_logprobs: s.top_logprobs,
                        finish,
                        policy_version: self.policy_version,
                    })
                }
                _ => keep.push(s),
            }
        }
        self.running = keep;
        Ok(done)
    }

    /// [`Engine::generate`] on one rank of a model whose experts are spread over ranks: every
    /// forward is then a collective all ranks take part in, so the ranks step together.
    /// `any_busy(busy)` is that agreement (itself a collective): given whether this rank has
    /// work, it says whether any rank has. A rank with nothing left runs [`Engine::idle_step`]
    /// until every rank is done. On one rank this is `generate`.
    pub fn generate_lockstep(&mut self, reqs: Vec<Request>, any_busy: &mut dyn FnMut(bool) -> Result<bool>) -> Result<Vec<Completion>> {
        let ids: Vec<u64> = reqs.into_iter().map(|r| self.submit(r)).collect::<Result<_>>()?;
        let mut done: BTreeMap<u64, Completion> = BTreeMap::new();
        loop {
            let busy = !self.is_idle();
            if !any_busy(busy)? {
                break;
            }
            if busy {
                for c in self.step()? {
                    done.insert(c.id, c);
                }
            } else {
                self.idle_step()?;
            }
        }
        Ok(ids.iter().filter_map(|id| done.remove(id)).collect())
    }

    /// A forward of one pad token with a throw-away cache, its output dropped: what a rank
    /// with no sequence left runs while other ranks still step (their expert-parallel layers
    /// exchange tokens with this one).
    pub fn idle_step(&mut self) -> Result<()> {
        let step = Batch::packed(&[0], Some(&[0]), &[0, 1], self.model.device())?;
        let mut cache = KvCache::default();
        self.model.forward_cached(&step, &mut [&mut cache], &RoutingPlan::compute())?;
        Ok(())
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
