//! One engine step over the paged KV cache — the scheduler and the model runner:
//!
//! 1. **admit** waiting sequences while there is room (`max_running`, free blocks for the
//!    prompt): their prompt's full blocks are looked up in the prefix cache first (a hit brings
//!    the blocks' keys and route rows; the G samples of one prompt wait one step for the first
//!    sample to fill the blocks they will share). Admission is fair between request groups
//!    ([`Engine::submit_in_group`]): while the batch is full and a waiting group holds no
//!    running sequence, the group holding the most (at least 2) gives back its most recently
//!    admitted unfinished one (preempted: recomputed later, nothing lost), and each free slot
//!    goes to the first waiting sequence of a group holding the fewest — so one request of
//!    `n = 256` long samples delays a newcomer by one step, not by its whole generation.
//!    Ungrouped sequences are groups of one: plain FIFO;
//! 2. **schedule** the step's tokens under `max_batched_tokens`: every decoding sequence its one
//!    token first, then prompt chunks (chunked prefill); each scheduled sequence gets the blocks
//!    its new tokens need, and when the pool runs out the most recently admitted sequence is
//!    preempted — its blocks given back, its tokens recomputed later (never an OOM, never a lost
//!    request);
//! 3. **run** one packed forward over the block tables (`MoeCausalLm::forward_paged`), register
//!    the blocks that became full in the prefix cache, cut each sequence's route rows, and
//!    sample the sequences whose chunk reached their last token.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use candle_core::{Tensor, D};
use lockstep_model::head_grad::token_stats;
use lockstep_model::logprobs::at_temperature;
use lockstep_model::{Batch, KvPool, PagedSeq, RoutingPlan};
use rayon::prelude::*;

use crate::blocks::{block_hash, BlockManager, BlockRoutes};
use crate::engine::{forward_rows, route_width, Completion, Engine, FinishReason, Sampled};
use crate::error::{EngineError, Result};
use crate::sampling::{sample, top_n, Sampler, SamplingParams};
use lockstep_model::gumbel::key as gumbel_key;
use crate::seq::Seq;

/// The prefix-cache hashes of the full blocks `s` has yet to fill, in order (the chain goes on
/// from its last registered or hit block).
fn blocks_to_fill(s: &Seq, bs: usize) -> Vec<u64> {
    let mut parent = s.hashes.last().copied().unwrap_or(0);
    (s.hashes.len()..s.tokens.len() / bs)
        .map(|b| {
            parent = block_hash(parent, &s.tokens[b * bs..(b + 1) * bs]);
            parent
        })
        .collect()
}

/// One sampled token: (token, log π(token), top-n (token, log π)).
type Draw = (u32, f32, Vec<(u32, f32)>);

impl Engine {
    /// The pool and its block manager, made on first use (from `self.cache`).
    pub(crate) fn ensure_pool(&mut self) -> Result<()> {
        if self.pool.is_none() {
            self.cache.validate()?;
            let bs = self.cache.block_size;
            let n = self.cache.blocks_for(&self.model.cfg, self.model.dtype(), self.model.device(), self.max_running)?;
            let pool = KvPool::new(&self.model, n, bs)?;
            self.pool = Some((pool, BlockManager::new(n, bs)));
        }
        Ok(())
    }

    /// Give a sequence's blocks back (finished, aborted or preempted).
    pub(crate) fn release(&mut self, s: &mut Seq) {
        if let Some((_, blocks)) = &mut self.pool {
            for b in s.blocks.drain(..) {
                blocks.release(b);
            }
        }
        s.hashes.clear();
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.release(&mut s);
        s.fed = 0;
        self.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Route row width of one token (all MoE layers).
    fn row_width(&self) -> usize {
        self.model.cfg.moe_layers.len() * route_width(&self.model)
    }

    /// Hashes of the prompt blocks that running sequences will fill (being prefilled): a
    /// waiting sequence whose next block is one of them waits for it instead of computing it too.
    fn pending_hashes(&self) -> HashSet<u64> {
        let Some((_, blocks)) = &self.pool else { return HashSet::new() };
        let bs = blocks.block_size();
        let mut out = HashSet::new();
        for s in self.running.iter().filter(|s| s.fed < s.tokens.len()) {
            out.extend(blocks_to_fill(s, bs));
        }
        out
    }

    /// Running sequences by fairness group.
    fn held_by_group(&self) -> BTreeMap<(bool, u64), usize> {
        let mut held = BTreeMap::new();
        for s in &self.running {
            *held.entry(s.group_key()).or_default() += 1;
        }
        held
    }

    /// The waiting sequence to admit next: the first of a group holding the fewest running.
    fn fairest_waiting(&self, held: &BTreeMap<(bool, u64), usize>) -> usize {
        let mut best = (usize::MAX, 0);
        for (i, s) in self.waiting.iter().enumerate() {
            let n = held.get(&s.group_key()).copied().unwrap_or(0);
            if n < best.0 {
                best = (n, i);
                if n == 0 {
                    break;
                }
            }
        }
        best.1
    }

    /// A full batch makes room for waiting groups that hold none of it (module doc, 1).
    fn preempt_for_starved(&mut self) {
        if self.running.len() < self.max_running {
            return;
        }
        let mut held = self.held_by_group();
        let starved: Vec<(bool, u64)> = self.waiting.iter().map(|s| s.group_key()).filter(|g| !held.contains_key(g)).collect();
        let mut seen = HashSet::new();
        for g in starved {
            if !seen.insert(g) {
                continue;
            }
            // the largest group (the first such in key order: deterministic)
            let Some((&big, &n)) = held.iter().rev().max_by_key(|(_, &n)| n) else { break };
            if n < 2 {
                break;
            }
            let Some(i) = self.running.iter().rposition(|s| s.group_key() == big && s.finished.is_none()) else { break };
            self.preempt(i);
            held.insert(big, n - 1);
            held.insert(g, 0);
        }
    }

    /// Waiting → running while there is room (module doc, 1).
    fn admit(&mut self) -> Result<()> {
        self.preempt_for_starved();
        let mut held = self.held_by_group();
        let mut pending = if self.cache.prefix_caching { self.pending_hashes() } else { HashSet::new() };
        let row = self.row_width();
        while self.running.len() < self.max_running {
            let next = self.fairest_waiting(&held);
            let Some(mut s) = self.waiting.remove(next) else { break };
            let (_, blocks) = self.pool.as_mut().ok_or_else(|| EngineError::Request { id: s.id, field: "kv_pool".into(), msg: "no pool".into() })?;
            let bs = blocks.block_size();
            let mut wait = false;
            let rows_before = s.route_rows(row);
            if self.cache.prefix_caching && s.fed == 0 {
                // full blocks before the last token (its logits are needed: always computed)
                let mut parent = 0u64;
                for b in 0..(s.tokens.len() - 1) / bs {
                    let toks = &s.tokens[b * bs..(b + 1) * bs];
                    match blocks.lookup(parent, toks) {
                        Some((blk, routes)) => {
                            if self.capture && s.route_rows(row) == b * bs {
                                match routes {
                                    Some(r) => {
                                        s.route_ids.extend_from_slice(&r.ids);
                                        s.route_probs.extend_from_slice(&r.probs);
                                    }
                                    None => {
                                        // cached without routes: compute instead
                                        blocks.release(blk);
                                        break;
                                    }
                                }
                            }
                            parent = block_hash(parent, toks);
                            s.blocks.push(blk);
                            s.hashes.push(parent);
                            s.fed += bs;
                        }
                        None => {
                            wait = pending.contains(&block_hash(parent, toks));
                            break;
                        }
                    }
                }
            }
            let need = s.tokens.len().div_ceil(bs).saturating_sub(s.blocks.len()) + usize::from(s.tokens.len() % bs == 0);
            if wait || blocks.num_available() < need {
                for b in s.blocks.drain(..) {
                    blocks.release(b);
                }
                s.hashes.clear();
                // rows copied from the cache are copied again at the next try
                s.route_ids.truncate(rows_before * row);
                s.route_probs.truncate(rows_before * row);
                s.fed = 0;
                self.waiting.push_front(s);
                break;
            }
            if self.cache.prefix_caching {
                // the blocks it will fill: later admissions of this step wait for them
                pending.extend(blocks_to_fill(&s, bs));
            }
            *held.entry(s.group_key()).or_default() += 1;
            self.running.push(s);
        }
        Ok(())
    }

    /// The step's (running index, tokens) under the token budget, with blocks allocated
    /// (module doc, 2).
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.cache.max_batched_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() {
                let (fed, len, held) = (self.running[i].fed, self.running[i].tokens.len(), self.running[i].blocks.len());
                let remaining = len - fed;
                let is_decode = remaining == 1;
                if is_decode != decode_pass || remaining == 0 || plan.iter().any(|p| p.0 == i) {
                    i += 1;
                    continue;
                }
                let chunk = remaining.min(budget);
                if chunk == 0 {
                    break;
                }
                let bs = self.cache.block_size;
                let need = (fed + chunk).div_ceil(bs).saturating_sub(held);
                // preempt from the back (the most recent admission) until the blocks fit; a
                // sequence already scheduled this step is never the victim
                let mut fits = true;
                while self.pool.as_ref().map_or(0, |p| p.1.num_available()) < need {
                    let victim = self.running.len() - 1;
                    if victim == i || plan.iter().any(|p| p.0 == victim) {
                        fits = false;
                        break;
                    }
                    self.preempt(victim);
                }
                if !fits {
                    // this one waits (recomputed later); those scheduled keep their blocks
                    self.preempt(i);
                    continue;
                }
                let (_, blocks) = self.pool.as_mut().expect("pool");
                let s = &mut self.running[i];
                for _ in 0..need {
                    s.blocks.push(blocks.allocate().expect("counted available"));
                }
                plan.push((i, chunk));
                budget -= chunk;
                i += 1;
            }
        }
        plan.sort_unstable();
        plan
    }

    /// Sample the members (logits row j, running index i) of the step: greedy ones by the
    /// device's argmax; temperature ones by the engine's [`Sampler`] — Gumbel-max on the
    /// logits' device, or (`Sampler::Exact`, and any request with top-k / top-p) on the host
    /// from their logits rows (the only full rows that travel), each with its own RNG; then the
    /// log-probabilities log-softmax(logits / T) at each member's temperature (greedy: T = 1),
    /// as the trainer scores them — one batched op per distinct temperature on the device —
    /// gathered there at the sampled tokens, which never leave the device in between. Tokens
    /// and log-probabilities come back in one copy; only members asking for top-n
    /// log-probabilities bring their whole row back.
    /// Returns per member (token, log π(token), top-n).
    fn sample_members(&mut self, logits_1SV: &Tensor, members: &[(usize, usize)]) -> Result<Vec<Draw>> {
        let r = members.len();
        let dev = logits_1SV.device().clone();
        let idx = |v: &[u32]| -> Result<Tensor> { Ok(Tensor::from_vec(v.to_vec(), v.len(), &dev)?) };
        let logits_RV = logits_1SV.squeeze(0)?.index_select(&idx(&members.iter().map(|m| m.0 as u32).collect::<Vec<_>>())?, 0)?;
        let params = |k: usize| &self.running[members[k].1].params;
        let on_device = |p: &SamplingParams| self.sampler == Sampler::Gumbel && p.top_k == 0 && p.top_p >= 1.0;
        let (mut greedy, mut gumbel, mut host) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..r as u32 {
            let p = params(k as usize);
            match () {
                _ if p.temperature == 0.0 => greedy.push(k),
                _ if on_device(p) => gumbel.push(k),
                _ => host.push(k),
            }
        }
        // the members' tokens on the device, in the order greedy ++ gumbel ++ host
        let mut parts: Vec<Tensor> = Vec::new();
        if !greedy.is_empty() {
            parts.push(logits_RV.index_select(&idx(&greedy)?, 0)?.argmax(D::Minus1)?);
        }
        if !gumbel.is_empty() {
            let rows: Vec<(u64, f32)> = gumbel
                .iter()
                .map(|&k| {
                    let s = &self.running[members[k as usize].1];
                    (gumbel_key(s.params.seed, (s.tokens.len() - s.prompt_len) as u64), s.params.temperature)
                })
                .collect();
            parts.push(lockstep_model::gumbel::sample(&logits_RV.index_select(&idx(&gumbel)?, 0)?, &rows)?);
        }
        if !host.is_empty() {
            let v = logits_RV.dim(1)?;
            let flat = lockstep_model::to_host_f32(&logits_RV.index_select(&idx(&host)?, 0)?)?;
            let rows: Vec<&[f32]> = flat.chunks(v.max(1)).collect();
            // (running index, row p of `rows`), ascending in the running index as the members are
            let want: Vec<(usize, usize)> = host.iter().enumerate().map(|(p, &k)| (members[k as usize].1, p)).collect();
            let mut picked: Vec<(usize, &mut Seq)> = Vec::with_capacity(want.len());
            let mut w = want.iter().peekable();
            for (i, s) in self.running.iter_mut().enumerate() {
                while let Some(&&(wi, p)) = w.peek() {
                    if wi < i {
                        w.next();
                    } else {
                        if wi == i {
                            picked.push((p, s));
                            w.next();
                        }
                        break;
                    }
                }
            }
            let drawn: Vec<(usize, u32)> = picked.par_iter_mut().map(|(p, s)| (*p, sample(rows[*p], &s.params, &mut s.rng))).collect();
            let mut host_tokens = vec![0u32; host.len()];
            for (p, t) in drawn {
                host_tokens[p] = t;
            }
            parts.push(idx(&host_tokens)?);
        }
        let order: Vec<u32> = greedy.iter().chain(&gumbel).chain(&host).copied().collect();
        let mut inverse = vec![0u32; r];
        for (p, &k) in order.iter().enumerate() {
            inverse[k as usize] = p as u32;
        }
        let tokens_R = Tensor::cat(&parts, 0)?.index_select(&idx(&inverse)?, 0)?;
        // log π at each member's temperature, per distinct temperature, gathered at the tokens
        let temp = |k: usize| self.running[members[k].1].params.temperature;
        let mut temps: Vec<f32> = (0..r).map(temp).collect();
        temps.sort_by(f32::total_cmp);
        temps.dedup();
        let mut lp_parts = Vec::new();
        let mut lp_order: Vec<u32> = Vec::with_capacity(r);
        let mut tops: Vec<(usize, Tensor)> = Vec::new();
        for t in temps {
            let pick: Vec<u32> = (0..r as u32).filter(|&k| temp(k as usize) == t).collect();
            // the tokens' log-probabilities by the op the trainer scores with (`token_stats`: the
            // same bits); the full rows only for members that asked for top log-probabilities
            let rows_PV = logits_RV.index_select(&idx(&pick)?, 0)?;
            let toks = tokens_R.index_select(&idx(&pick)?, 0)?;
            let stats_P3 = token_stats(&rows_PV, &toks, t as f64)?;
            lp_parts.push(stats_P3.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?);
            if pick.iter().any(|&k| self.running[members[k as usize].1].params.logprobs > 0) {
                let lp = at_temperature(&rows_PV, t as f64)?.broadcast_sub(&stats_P3.narrow(1, 2, 1)?)?;
                for (j, &k) in pick.iter().enumerate() {
                    if self.running[members[k as usize].1].params.logprobs > 0 {
                        tops.push((k as usize, lp.get(j)?));
                    }
                }
            }
            lp_order.extend(pick);
        }
        // one copy back: the tokens (as f32: exact below 2^24) then the log-probabilities
        let exact = logits_RV.dim(1)? <= 1 << 24;
        let lp_R = Tensor::cat(&lp_parts, 0)?;
        let (tokens, lps): (Vec<u32>, Vec<f32>) = if exact {
            let both: Vec<f32> = Tensor::cat(&[tokens_R.to_dtype(candle_core::DType::F32)?, lp_R], 0)?.to_vec1()?;
            (both[..r].iter().map(|&t| t as u32).collect(), both[r..].to_vec())
        } else {
            (tokens_R.to_vec1()?, lp_R.to_vec1()?)
        };
        let mut out: Vec<Draw> = tokens.iter().map(|&t| (t, 0.0, Vec::new())).collect();
        for (&k, &lp) in lp_order.iter().zip(&lps) {
            out[k as usize].1 = lp;
        }
        for (k, row) in tops {
            let n = self.running[members[k].1].params.logprobs;
            out[k].2 = top_n(&row.to_vec1::<f32>()?, n);
        }
        Ok(out)
    }

    /// One batched forward; returns the requests that completed.
    pub fn step(&mut self) -> Result<Vec<Completion>> {
        self.sampled.clear();
        if self.is_idle() {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        self.ensure_pool()?;
        self.admit()?;
        let plan = self.schedule();
        let ts = Instant::now();
        self.times.schedule_s += (ts - t0).as_secs_f64();
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let (mut toks, mut pos, mut cu) = (Vec::new(), Vec::new(), vec![0usize]);
        for &(i, chunk) in &plan {
            let s = &self.running[i];
            toks.extend_from_slice(&s.tokens[s.fed..s.fed + chunk]);
            pos.extend((s.fed..s.fed + chunk).map(|p| p as u32));
            cu.push(toks.len());
        }
        self.forwarded += toks.len() as u64;
        let step = Batch::packed(&toks, Some(&pos), &cu, self.model.device())?;
        let routing = if self.capture { RoutingPlan::record() } else { RoutingPlan::compute() };
        let out = {
            let seqs: Vec<PagedSeq> = plan.iter().map(|&(i, _)| PagedSeq { blocks: &self.running[i].blocks, cached: self.running[i].fed }).collect();
            let (pool, _) = self.pool.as_mut().expect("pool");
            self.model.forward_paged(&step, &seqs, pool, &routing)?
        };
        let t1 = Instant::now();
        self.times.launch_s += (t1 - ts).as_secs_f64();
        let k = route_width(&self.model);
        let num_experts = self.model.cfg.moe.router.num_experts;
        let step_routes = forward_rows(&out.routes, k, num_experts)?.map(|(_, rows)| rows);
        let row = self.row_width();
        // route rows, fed counts, full blocks into the prefix cache
        for (j, &(i, chunk)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            if let Some(r) = &step_routes {
                // a recomputation (after preemption) keeps the rows it has
                let from = s.route_rows(row).max(s.fed).min(s.fed + chunk);
                let (a, b) = (cu[j] + from - s.fed, cu[j + 1]);
                s.route_ids.extend_from_slice(&r.ids[a * row..b * row]);
                s.route_probs.extend_from_slice(&r.probs[a * row..b * row]);
            }
            s.fed += chunk;
            if self.cache.prefix_caching {
                let (_, blocks) = self.pool.as_mut().expect("pool");
                let bs = blocks.block_size();
                while (s.hashes.len() + 1) * bs <= s.fed {
                    let b = s.hashes.len();
                    let parent = s.hashes.last().copied().unwrap_or(0);
                    let routes = (self.capture && s.route_rows(row) >= (b + 1) * bs)
                        .then(|| BlockRoutes { ids: s.route_ids[b * bs * row..(b + 1) * bs * row].to_vec(), probs: s.route_probs[b * bs * row..(b + 1) * bs * row].to_vec() });
                    let h = blocks.register(s.blocks[b], parent, &s.tokens[b * bs..(b + 1) * bs], routes);
                    s.hashes.push(h);
                }
            }
        }
        // sampling: the scheduled sequences whose chunk reached their last token
        let members: Vec<(usize, usize)> = plan
            .iter()
            .enumerate()
            .filter(|(_, &(i, _))| {
                let s = &self.running[i];
                s.fed == s.tokens.len() && s.finished.is_none()
            })
            .map(|(j, &(i, _))| (j, i))
            .collect();
        let t2 = Instant::now();
        self.times.device_s += (t2 - t1).as_secs_f64();
        let sampled = if members.is_empty() { Vec::new() } else { self.sample_members(&out.logits, &members)? };
        let t3 = Instant::now();
        self.times.logits_s += (t3 - t2).as_secs_f64();
        for (k, (tok, logprob, top)) in sampled.into_iter().enumerate() {
            let s = &mut self.running[members[k].1];
            s.tokens.push(tok);
            s.logprobs.push(logprob);
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
            self.sampled.push(Sampled { id: s.id, token: tok, logprob, top_logprobs: top, finish: s.finished });
        }
        self.times.sample_s += t3.elapsed().as_secs_f64();
        self.complete()
    }

    /// Remove and return the sequences that finished with every route row in.
    fn complete(&mut self) -> Result<Vec<Completion>> {
        let k = route_width(&self.model);
        let num_experts = self.model.cfg.moe.router.num_experts;
        let layers: Vec<u32> = self.model.cfg.moe_layers.iter().map(|&l| l as u32).collect();
        let mut done = Vec::new();
        let mut keep = Vec::new();
        for mut s in std::mem::take(&mut self.running) {
            match s.finished {
                Some(finish) if s.fed == s.tokens.len() => {
                    self.release(&mut s);
                    let routes = if self.capture { Some(s.route_trace(layers.clone(), k, num_experts, self.fingerprint, self.policy_version)?) } else { None };
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
}
