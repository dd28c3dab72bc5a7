//! The engine's face: requests in, completions out, with continuous batching over the paged
//! KV cache. Requests join between steps; each step (`crate::step`) packs, per scheduled
//! sequence, the tokens not yet forwarded (a prompt chunk, one sampled token, or — once
//! finished — its last token, forwarded only so its route row exists) into one row, runs the
//! model over the sequences' block tables, samples, and records every token's route.

use std::collections::{BTreeMap, VecDeque};

use lockstep_model::{Batch, KvPool, MoeCausalLm, PagedSeq, RoutingPlan};
use lockstep_trace::{fingerprint_of, RouteTrace};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::blocks::BlockManager;
use crate::cache::CacheConfig;
use crate::error::{EngineError, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::seq::Seq;

pub use crate::routes::{forward_trace, route_width, token_rows};
pub(crate) use crate::routes::forward_rows;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

pub use crate::seq::FinishReason;

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
    pub(crate) model: MoeCausalLm,
    pub(crate) waiting: VecDeque<Seq>,
    pub(crate) running: Vec<Seq>,
    next_id: u64,
    /// most sequences in one step
    pub max_running: usize,
    pub policy_version: u64,
    pub(crate) capture: bool,
    /// how temperature draws are made (chosen with the engine, by the model's device)
    pub(crate) sampler: Sampler,
    pub(crate) sampled: Vec<Sampled>,
    /// of the model config, stamped into every route trace
    pub(crate) fingerprint: u64,
    /// the paged KV cache's shape; read when the pool is made (the first step after `new` or
    /// a weight load)
    pub cache: CacheConfig,
    pub(crate) pool: Option<(KvPool, BlockManager)>,
    /// sequences preempted (their blocks given back, to be recomputed) since the engine began
    pub(crate) preemptions: u64,
    /// tokens forwarded since the engine began (prefix-cache hits are not forwarded)
    pub(crate) forwarded: u64,
    pub(crate) times: StepTimes,
}

/// Where the steps' wall time went, summed over steps (host clocks around the step's phases;
/// the first read of a device result waits for the device, so `device_s` is the forward's
/// device time not hidden behind the launches).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// admission, scheduling, block allocation
    pub schedule_s: f64,
    /// enqueueing the forward (host side of every layer)
    pub launch_s: f64,
    /// waiting for the forward's results and cutting route rows
    pub device_s: f64,
    /// sampling: device argmax or logits rows to the host and the draws, the log-probabilities
    /// gathered at the sampled tokens
    pub logits_s: f64,
    /// the sampled tokens' bookkeeping (stop / length checks, streaming records)
    pub sample_s: f64,
}

impl Engine {
    /// An engine over `model` (use `Kernels::Invariant` for lockstep with the trainer).
    pub fn new(model: MoeCausalLm) -> Self {
        let fingerprint = fingerprint_of(model.cfg.to_json_string().as_bytes());
        let sampler = Sampler::for_device(model.device());
        Self {
            fingerprint,
            model,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            max_running: 64,
            policy_version: 0,
            capture: true,
            sampler,
            sampled: Vec::new(),
            cache: CacheConfig::default(),
            pool: None,
            preemptions: 0,
            forwarded: 0,
            times: StepTimes::default(),
        }
    }

    /// Route capture on (the default) or off. Off, steps route without recording, completions
    /// carry no routes and a finished sequence completes at once (no step forwards its last
    /// token only for its route row). Only between requests.
    pub fn set_capture_routes(&mut self, on: bool) -> Result<()> {
        if !self.is_idle() {
            return Err(EngineError::Request { id: 0, field: "capture_routes".into(), msg: "requests are in flight; drain first".into() });
        }
        if on != self.capture {
            // cached blocks carry routes only when captured
            if let Some((_, blocks)) = &mut self.pool {
                blocks.clear_cache();
            }
        }
        self.capture = on;
        Ok(())
    }

    /// Draw temperature samples with `sampler` ([`Sampler`]; the default follows the device).
    /// Only between requests: a request's tokens come from one stream.
    pub fn set_sampler(&mut self, sampler: Sampler) -> Result<()> {
        if !self.is_idle() {
            return Err(EngineError::Request { id: 0, field: "sampler".into(), msg: "requests are in flight; drain first".into() });
        }
        self.sampler = sampler;
        Ok(())
    }

    pub fn sampler(&self) -> Sampler {
        self.sampler
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

    /// Sequences preempted so far (blocks given back when the pool ran out; recomputed later).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Where the steps' time went so far ([`StepTimes`]).
    pub fn step_times(&self) -> StepTimes {
        self.times
    }

    /// Tokens forwarded so far (a prefix-cache hit's tokens are not).
    pub fn num_forwarded_tokens(&self) -> u64 {
        self.forwarded
    }

    /// (blocks in the pool, blocks held by sequences, blocks in the prefix cache); zeros before
    /// the first step.
    pub fn cache_usage(&self) -> (usize, usize, usize) {
        self.pool.as_ref().map(|(_, b)| (b.num_blocks(), b.num_held(), b.num_cached())).unwrap_or_default()
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

    /// Drop request `id` (queued or running) without a completion (a client went away); its
    /// blocks go back to the pool.
    pub fn abort(&mut self, id: u64) -> bool {
        let (w, r) = (self.waiting.len(), self.running.len());
        let (mut gone, keep): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.waiting).into_iter().partition(|s| s.id == id);
        self.waiting = keep.into();
        let (out, keep): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running).into_iter().partition(|s| s.id == id);
        self.running = keep;
        gone.extend(out);
        for mut s in gone {
            self.release(&mut s);
        }
        w != self.waiting.len() || r != self.running.len()
    }

    pub fn model(&self) -> &MoeCausalLm {
        &self.model
    }

    /// Swap in new weights between steps (no request may be in flight); bumps the policy
    /// version. The KV pool and its prefix cache go (their keys are the old weights').
    pub fn load_weights(&mut self, model: MoeCausalLm, version: u64) -> Result<()> {
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return Err(EngineError::Request { id: 0, field: "weights".into(), msg: "requests are in flight; drain first".into() });
        }
        self.fingerprint = fingerprint_of(model.cfg.to_json_string().as_bytes());
        self.pool = None;
        self.model = model;
        self.policy_version = version;
        Ok(())
    }

    /// Queue a request; it joins the batch at a later step (when there is room in the pool).
    /// It is a fairness group of its own (see [`Engine::submit_in_group`]).
    pub fn submit(&mut self, req: Request) -> Result<u64> {
        self.submit_to(req, None)
    }

    /// [`Engine::submit`] as a member of `group` (a server's client request: its prompts × `n`
    /// samples). Admission is fair between groups (`crate::step`): a waiting group holding no
    /// running sequence while the batch is full gets a slot from the group holding the most,
    /// and free slots go to the groups holding the fewest. Outputs never depend on it (the
    /// kernels are batch invariant); only when each sequence runs.
    pub fn submit_in_group(&mut self, req: Request, group: u64) -> Result<u64> {
        self.submit_to(req, Some(group))
    }

    fn submit_to(&mut self, req: Request, group: Option<u64>) -> Result<u64> {
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
        self.cache.validate()?;
        if let Some((_, blocks)) = &self.pool {
            // never admissible: refused now rather than queued forever
            let need = (req.prompt.len() + req.params.max_tokens).div_ceil(blocks.block_size());
            if need > blocks.num_blocks() {
                return Err(bad(
                    "max_tokens",
                    format!("prompt ({}) + max_tokens ({}) need {need} KV blocks; the pool has {}", req.prompt.len(), req.params.max_tokens, blocks.num_blocks()),
                ));
            }
        }
        self.next_id += 1;
        let rng = ChaCha8Rng::seed_from_u64(req.params.seed);
        let mut s = Seq::new(id, req.prompt, req.params, rng);
        s.group = group;
        self.waiting.push_back(s);
        Ok(id)
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
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
        let mut pool = KvPool::new(&self.model, 1, 1)?;
        self.model.forward_paged(&step, &[PagedSeq { blocks: &[0], cached: 0 }], &mut pool, &RoutingPlan::compute())?;
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

impl Completion {
    /// Prompt followed by completion.
    pub fn sequence(&self) -> Vec<u32> {
        let mut s = self.prompt.clone();
        s.extend_from_slice(&self.tokens);
        s
    }
}

