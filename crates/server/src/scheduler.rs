//! The engine task: one OS thread owns the [`Engine`] and steps it while it has work
//! (continuous batching: requests that arrive join between steps). Handlers talk to it over a
//! channel; every request gets its own event channel: each sampled token (for streams), then
//! its completion. Stop strings are checked on the engine thread right after each step, so a
//! request ends at the token that completed one, batch or no batch. A weight load waits for
//! the running requests to finish (new ones are held), swaps the model and bumps the policy
//! version stamped into routes. A client that goes away (or whose `request_timeout` passes:
//! the handler drops its event channels) has its sequences aborted after the next step, their
//! KV blocks freed. Each submission (one client request: its prompts × `n`) is one fairness
//! group in the engine (`Engine::submit_in_group`), so a request of many long samples cannot
//! starve a short one.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use lockstep_engine::{Completion, Engine, FinishReason, Request, Sampled, SamplingParams};
use lockstep_model::MoeCausalLm;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::text::find_stop;
use crate::tokenizer::Tokenizer;

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// stop strings (checked on the decoded completion after every token)
    pub stops: Vec<String>,
    /// send every sampled token (else only the first, then the completion)
    pub stream: bool,
}

#[derive(Debug)]
pub enum Event {
    Token(Sampled),
    Done(Box<Completion>),
    Failed(ApiError),
}

pub type Events = tmpsc::UnboundedReceiver<Event>;

enum Command {
    Submit(Vec<(Job, tmpsc::UnboundedSender<Event>)>),
    Load { model: Box<MoeCausalLm>, version: Option<u64>, allow_same: bool, reply: oneshot::Sender<Result<u64, ApiError>> },
}

/// A handle on the engine thread (cheap to clone); the thread ends when every handle is gone
/// and its requests are done.
#[derive(Clone)]
pub struct Scheduler {
    tx: Sender<Command>,
}

/// A submission's fairness group and the engine step it arrived at.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    group: u64,
    step: u64,
}

type PendingLoad = (Box<MoeCausalLm>, Option<u64>, bool, oneshot::Sender<Result<u64, ApiError>>);

struct Active {
    events: tmpsc::UnboundedSender<Event>,
    /// engine steps done when its request arrived
    since: u64,
    stops: Vec<String>,
    tokens: Vec<u32>,
    stream: bool,
    sent: usize,
}

struct Loop {
    engine: Engine,
    tok: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
    active: HashMap<u64, Active>,
    held: Vec<(Job, tmpsc::UnboundedSender<Event>, Arrival)>,
    loads: Vec<PendingLoad>,
    /// submissions so far (the next fairness group)
    groups: u64,
    /// engine steps so far
    steps: u64,
    /// most sequences queued behind the running batch (admission control)
    max_waiting: usize,
}

/// The policy version a load moves to: `requested` if above `current` (or equal to it, with
/// `allow_same`), `current + 1` when none is requested; never wrapping. Else 409.
pub fn next_version(current: u64, requested: Option<u64>, allow_same: bool) -> Result<u64, ApiError> {
    match requested {
        None => current.checked_add(1).ok_or_else(|| ApiError::conflict("version", format!("the policy version is {current}, the largest there is: it cannot increase"))),
        Some(v) if v > current || (allow_same && v == current) => Ok(v),
        Some(v) => Err(ApiError::conflict("version", format!("{v} does not increase the current policy version {current}"))),
    }
}

impl Scheduler {
    pub fn start(engine: Engine, tok: Arc<Tokenizer>, metrics: Arc<Metrics>) -> (Self, JoinHandle<()>) {
        Self::start_bounded(engine, tok, metrics, usize::MAX)
    }

    /// [`Scheduler::start`] with admission control: a submission that would queue more than
    /// `max_waiting` sequences behind the running batch is refused whole (503 naming
    /// `max_waiting`), never queued without bound.
    pub fn start_bounded(engine: Engine, tok: Arc<Tokenizer>, metrics: Arc<Metrics>, max_waiting: usize) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        metrics.policy_version.store(engine.policy_version, Relaxed);
        let mut l = Loop { engine, tok, metrics, active: HashMap::new(), held: Vec::new(), loads: Vec::new(), groups: 0, steps: 0, max_waiting };
        let join = std::thread::Builder::new()
            .name("lockstep-engine".into())
            .spawn(move || l.run(rx))
            .expect("spawning the engine thread");
        (Self { tx }, join)
    }

    /// Queue jobs together (they join the batch at the same step); one event channel each.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<Vec<Events>, ApiError> {
        let mut rxs = Vec::with_capacity(jobs.len());
        let mut cmd = Vec::with_capacity(jobs.len());
        for j in jobs {
            let (tx, rx) = tmpsc::unbounded_channel();
            cmd.push((j, tx));
            rxs.push(rx);
        }
        self.tx.send(Command::Submit(cmd)).map_err(|_| ApiError::unavailable("the engine has stopped"))?;
        Ok(rxs)
    }

    /// Swap weights once the running requests are done; the new policy version.
    /// `version`: above the current one (or equal, with `allow_same`); `None`: current + 1.
    pub async fn load_weights(&self, model: MoeCausalLm, version: Option<u64>, allow_same: bool) -> Result<u64, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Load { model: Box::new(model), version, allow_same, reply }).map_err(|_| ApiError::unavailable("the engine has stopped"))?;
        rx.await.map_err(|_| ApiError::unavailable("the engine has stopped"))?
    }
}

impl Loop {
    fn run(&mut self, rx: Receiver<Command>) {
        loop {
            if self.engine.is_idle() && self.loads.is_empty() {
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.handle(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.engine.is_idle() && self.loads.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if !self.loads.is_empty() && self.engine.is_idle() {
                self.swap();
            }
            if !self.engine.is_idle() {
                self.step();
            }
            self.metrics.running.store(self.engine.num_running() as u64, Relaxed);
            self.metrics.kv_blocks_held.store(self.engine.cache_usage().1 as u64, Relaxed);
            self.metrics.waiting.store((self.engine.num_waiting() + self.held.len()) as u64, Relaxed);
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(jobs) if self.queued() + jobs.len() > self.max_waiting => {
                let msg = format!(
                    "max_waiting: {} sequences are queued and this request brings {} (at most {}); retry later",
                    self.queued(),
                    jobs.len(),
                    self.max_waiting
                );
                for (_, tx) in jobs {
                    let _ = tx.send(Event::Failed(ApiError::overloaded("max_waiting", msg.clone(), crate::limits::RETRY_AFTER_S)));
                }
            }
            Command::Submit(jobs) => {
                let at = Arrival { group: self.groups, step: self.steps };
                self.groups += 1;
                if self.loads.is_empty() {
                    for (job, tx) in jobs {
                        self.admit(job, tx, at);
                    }
                } else {
                    self.held.extend(jobs.into_iter().map(|(j, tx)| (j, tx, at)));
                }
            }
            Command::Load { model, version, allow_same, reply } => self.loads.push((model, version, allow_same, reply)),
        }
    }

    /// Sequences waiting: queued in the engine or held behind a weight load.
    fn queued(&self) -> usize {
        self.engine.num_waiting() + self.held.len()
    }

    fn admit(&mut self, job: Job, events: tmpsc::UnboundedSender<Event>, at: Arrival) {
        if events.is_closed() {
            return; // its client went away while it was held
        }
        let n = job.prompt.len() as u64;
        match self.engine.submit_in_group(Request { prompt: job.prompt, params: job.params }, at.group) {
            Ok(id) => {
                self.metrics.prompt_tokens.fetch_add(n, Relaxed);
                self.active.insert(id, Active { events, since: at.step, stops: job.stops, tokens: Vec::new(), stream: job.stream, sent: 0 });
            }
            Err(e) => {
                let _ = events.send(Event::Failed(ApiError::from_engine(&e)));
            }
        }
    }

    fn swap(&mut self) {
        for (model, version, allow_same, reply) in std::mem::take(&mut self.loads) {
            let r = next_version(self.engine.policy_version, version, allow_same)
                .and_then(|v| self.engine.load_weights(*model, v).map(|()| v).map_err(|e| ApiError::from_engine(&e)));
            if let Ok(v) = r {
                self.metrics.policy_version.store(v, Relaxed);
                self.metrics.weight_loads.fetch_add(1, Relaxed);
                tracing::info!("weights loaded, policy version {v}");
            }
            let _ = reply.send(r);
        }
        for (job, tx, at) in std::mem::take(&mut self.held) {
            self.admit(job, tx, at);
        }
    }

    fn step(&mut self) {
        let done = match self.engine.step() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, a) in self.active.drain() {
                    self.engine.abort(id);
                    let _ = a.events.send(Event::Failed(ApiError::internal(format!("engine: {e}"))));
                }
                return;
            }
        };
        self.metrics.engine_steps.fetch_add(1, Relaxed);
        self.steps += 1;
        let mut to_stop = Vec::new();
        for s in self.engine.sampled() {
            self.metrics.generation_tokens.fetch_add(1, Relaxed);
            let Some(a) = self.active.get_mut(&s.id) else { continue };
            if !a.stops.is_empty() && s.finish != Some(FinishReason::Stop) {
                a.tokens.push(s.token);
                // a stop string completed by this token lies in the last few tokens' text
                let longest = a.stops.iter().map(|x| x.len()).max().unwrap_or(0);
                let from = a.tokens.len().saturating_sub(2 * longest + 8);
                if find_stop(&self.tok.decode(&a.tokens[from..]), &a.stops).is_some() {
                    to_stop.push(s.id);
                }
            }
            if a.stream || a.sent == 0 {
                let _ = a.events.send(Event::Token(s.clone()));
                a.sent += 1;
            }
        }
        for id in to_stop {
            self.engine.stop(id);
        }
        for c in done {
            if let Some(a) = self.active.remove(&c.id) {
                self.metrics.sequence_steps.observe((self.steps - a.since) as f64);
                let _ = a.events.send(Event::Done(Box::new(c)));
            }
        }
        let gone: Vec<u64> = self.active.iter().filter(|(_, a)| a.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.engine.abort(id);
            self.active.remove(&id);
        }
    }
}
