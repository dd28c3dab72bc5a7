//! Rollouts from vLLM and SGLang servers (`rollout.servers` entries of `kind = "vllm"` /
//! `"sglang"`): token-id prompts in, token ids, log-probs and routed experts in the server's
//! own wire format out, decoded by the trace crate's importers
//! ([`lockstep_trace::interop::vllm`], [`lockstep_trace::interop::sglang`]) with the model's
//! [`ModelLayout`] (so dense-layer columns are dropped, never guessed) into the same
//! [`Completion`] the in-process engine and [`crate::remote::RemoteEngine`] produce.
//!
//! Both formats cover tokens `[0, N - 1)`: the last sampled token was never forwarded, so its
//! row stays a missing row (replayed as `ROUTE_FREE`: it routes freely), never invented. The
//! routes carry no router probabilities (neither server sends them): objectives that need them
//! (`loss.ratio = "joint_*"`) fail in the trainer naming the probabilities.
//!
//! **Requests.** vLLM: `POST /v1/completions` (`vllm/entrypoints/openai/completion/protocol.py`,
//! `CompletionRequest`): `prompt` a list of token ids, `n`, `max_tokens`, `temperature`,
//! `top_p`, `top_k`, `seed`, `stop_token_ids`, `logprobs: 0` (the sampled token's log-prob),
//! `return_token_ids: true` (`choices[i].prompt_token_ids` / `token_ids`),
//! `routed_experts_prompt_start: 0`; the response's `choices[i].routed_experts` is base64 `.npy`
//! (server started with `--enable-return-routed-experts`). SGLang: `POST /generate`
//! (`python/sglang/srt/managers/io_struct.py`, `GenerateReqInput`): `input_ids`,
//! `sampling_params` (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `stop_token_ids`,
//! `sampling_seed`), `return_logprob: true`, `return_routed_experts: true`; read `output_ids`,
//! `meta_info.output_token_logprobs` (`[logprob, token_id, text]` triples),
//! `meta_info.finish_reason.type` and `meta_info.routed_experts` (base64 int32,
//! `routed_experts_start_len`).
//!
//! **Weight sync.** Before every step's rollouts the trainer's weights are written to a new
//! directory `<output.dir>/weights-sync.<n>` and published atomically by renaming a symlink
//! `<output.dir>/weights-sync` onto it (readers see the old checkpoint or the new one, never a
//! partial one); then every server is told to reload:
//! * SGLang: `POST /update_weights_from_disk {"model_path": DIR}` (`UpdateWeightFromDiskReqInput`
//!   in `io_struct.py`; the answer `{"success": true, "message": ...}`), DIR the new version's
//!   directory.
//! * vLLM has **no stable HTTP endpoint** for reloading full weights. What its source offers is
//!   the development endpoint `POST /collective_rpc {"method": "reload_weights"}`
//!   (`vllm/entrypoints/serve/dev/rpc/api_router.py`, enabled by `VLLM_SERVER_DEV_MODE=1`;
//!   earlier in `vllm/entrypoints/openai/api_server.py`), which calls each worker's
//!   `reload_weights` (`vllm/v1/worker/gpu_worker.py` → the model runner), re-reading the
//!   weights from the path the server was started with (its HTTP arguments are strings only,
//!   so no new path can be passed). So a vLLM server must be started with
//!   `--model <output.dir>/weights-sync` (the symlink; any checkpoint of the same architecture
//!   to begin with), and after the reload `POST /reset_prefix_cache` drops KV computed with the
//!   old weights.
//!
//! Errors name the URL and what failed (connection refused, HTTP status and body, the missing
//! field).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_engine::{Completion, FinishReason, Request};
use lockstep_trace::interop::{sglang, vllm, ImportMeta, ModelLayout};
use lockstep_trace::RouteTrace;
use serde_json::{json, Value};

use crate::config::{ServerKind, ServerSpec};
use crate::error::{Result, RlError};
use crate::remote::CONNECT_TIMEOUT;

/// In-flight requests per server.
const PER_SERVER: usize = 16;

/// vLLM and SGLang servers by URL (one kind each; a run may mix them).
pub struct ForeignEngine {
    pub servers: Vec<ServerSpec>,
    layout: ModelLayout,
    agent: ureq::Agent,
    /// stamped on the completions and their routes (the step's policy version)
    pub policy_version: u64,
}

fn err(url: &str, msg: impl ToString) -> RlError {
    RlError::Io {
        path: url.to_string(),
        msg: msg.to_string(),
    }
}

/// What failed, without the URL: `HTTP 500: <body>`, `connection refused`, `timed out`, ...
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => format!(
            "HTTP {code}: {}",
            snippet(&r.into_string().unwrap_or_default())
        ),
        ureq::Error::Transport(t) => {
            let mut msg = t.kind().to_string();
            if let Some(m) = t.message() {
                msg = format!("{msg}: {m}");
            }
            let mut src = std::error::Error::source(&t);
            let mut last = None;
            while let Some(s) = src {
                last = Some(s.to_string());
                src = s.source();
            }
            match last {
                Some(l) if !msg.contains(&l) => format!("{msg}: {l}"),
                _ => msg,
            }
        }
    }
}

fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None if t.is_empty() => "(empty body)".into(),
        None => t.to_string(),
    }
}

/// `GET /health` on every server (vLLM and SGLang answer 200 with an empty body): errors name
/// the URL and what failed.
pub fn check(servers: &[ServerSpec]) -> Result<()> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout(crate::remote::HEALTH_TIMEOUT)
        .build();
    for s in servers {
        let url = format!("{}/health", s.url.trim_end_matches('/'));
        agent.get(&url).call().map_err(|e| {
            let what = if matches!(e, ureq::Error::Status(..)) {
                "rollout server failed"
            } else {
                "rollout server unreachable"
            };
            err(
                &url,
                format!("{what} ({} server): {}", s.kind.name(), describe(e)),
            )
        })?;
    }
    Ok(())
}

/// The layout of a model config (`config.json` text): which decoder layers route.
pub fn layout_of(cfg: &lockstep_model::ModelConfig) -> Result<ModelLayout> {
    Ok(ModelLayout::from_config_json(
        cfg.to_json_string().as_bytes(),
        "model config.json",
    )?)
}

impl ForeignEngine {
    /// `servers`: vLLM / SGLang entries (lockstep ones are [`crate::remote::RemoteEngine`]'s).
    pub fn new(servers: Vec<ServerSpec>, layout: ModelLayout) -> Self {
        Self::with_timeouts(servers, layout, CONNECT_TIMEOUT, Duration::from_secs(600))
    }

    pub fn with_timeouts(
        servers: Vec<ServerSpec>,
        layout: ModelLayout,
        connect: Duration,
        request: Duration,
    ) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout(request)
            .build();
        let servers = servers
            .into_iter()
            .map(|s| ServerSpec {
                kind: s.kind,
                url: s.url.trim_end_matches('/').to_string(),
            })
            .collect();
        Self {
            servers,
            layout,
            agent,
            policy_version: 0,
        }
    }

    fn post(&self, url: &str, body: Value) -> Result<Value> {
        let text = self
            .agent
            .post(url)
            .send_json(body)
            .map_err(|e| err(url, describe(e)))?
            .into_string()
            .map_err(|e| err(url, format!("reading the answer: {e}")))?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            err(
                url,
                format!("the answer is not JSON ({e}): {}", snippet(&text)),
            )
        })
    }

    /// Publish `model` as the checkpoint `<out>/weights-sync` (module docs) and tell every
    /// server to reload it. Returns the version's directory.
    pub fn sync_weights(&self, model: &lockstep_model::MoeCausalLm, out: &Path) -> Result<PathBuf> {
        let dir = publish_checkpoint(model, out)?;
        self.reload(&dir)?;
        Ok(dir)
    }

    /// Tell every server to reload: SGLang from `dir`, vLLM from the path it was started with
    /// (the symlink `<output.dir>/weights-sync`, onto `dir`).
    pub fn reload(&self, dir: &Path) -> Result<()> {
        for s in &self.servers {
            match s.kind {
                ServerKind::Sglang => {
                    let url = format!("{}/update_weights_from_disk", s.url);
                    let v = self.post(&url, json!({"model_path": dir.display().to_string()}))?;
                    match v.get("success").and_then(Value::as_bool) {
                        Some(true) => {}
                        Some(false) => {
                            return Err(err(
                                &url,
                                format!(
                                    "reload failed: {}",
                                    v.get("message")
                                        .and_then(Value::as_str)
                                        .unwrap_or("(no message)")
                                ),
                            ))
                        }
                        None => {
                            return Err(err(
                                &url,
                                format!("success missing: {}", snippet(&v.to_string())),
                            ))
                        }
                    }
                }
                ServerKind::Vllm => {
                    let url = format!("{}/collective_rpc", s.url);
                    self.post(&url, json!({"method": "reload_weights"}))?;
                    let url = format!("{}/reset_prefix_cache", s.url);
                    self.post(&url, json!({}))?;
                }
                ServerKind::Lockstep => {
                    return Err(err(
                        &s.url,
                        "a lockstep server among foreign ones (internal)",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Generate every request; completions in request order.
    pub fn generate(&self, reqs: &[Request]) -> Result<Vec<Completion>> {
        let lanes = self.servers.len() * PER_SERVER;
        let mut out: Vec<Option<Completion>> = vec![None; reqs.len()];
        std::thread::scope(|sc| -> Result<()> {
            let handles: Vec<_> = (0..lanes.min(reqs.len().max(1)))
                .map(|lane| {
                    let s = &self.servers[lane % self.servers.len()];
                    sc.spawn(move || -> Result<Vec<(usize, Completion)>> {
                        (lane..reqs.len())
                            .step_by(lanes)
                            .map(|i| Ok((i, self.one(s, &reqs[i], i as u64)?)))
                            .collect()
                    })
                })
                .collect();
            for h in handles {
                for (i, c) in h
                    .join()
                    .map_err(|_| err("rollout", "a request thread panicked"))??
                {
                    out[i] = Some(c);
                }
            }
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|c| c.expect("every request answered"))
            .collect())
    }

    fn meta(&self, url: &str) -> Result<ImportMeta> {
        let m = ImportMeta {
            policy_version: self.policy_version,
            ..ImportMeta::default()
        };
        m.with_layout(&self.layout)
            .map_err(|e| err(url, format!("model layout: {e}")))
    }

    /// One request on server `s`.
    pub fn one(&self, s: &ServerSpec, r: &Request, id: u64) -> Result<Completion> {
        let (prompt, tokens, logprobs, routes, finish) = match s.kind {
            ServerKind::Vllm => self.one_vllm(&s.url, r)?,
            ServerKind::Sglang => self.one_sglang(&s.url, r)?,
            ServerKind::Lockstep => {
                return Err(err(
                    &s.url,
                    "a lockstep server among foreign ones (internal)",
                ))
            }
        };
        Ok(Completion {
            id,
            prompt,
            tokens,
            logprobs,
            routes: Some(routes),
            top_logprobs: Vec::new(),
            finish,
            policy_version: self.policy_version,
        })
    }

    #[allow(clippy::type_complexity)]
    fn one_vllm(
        &self,
        base: &str,
        r: &Request,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>, RouteTrace, FinishReason)> {
        let url = format!("{base}/v1/completions");
        let p = &r.params;
        let mut body = json!({
            "prompt": r.prompt,
            "n": 1,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "stop_token_ids": p.stop_token_ids,
            "logprobs": 0,
            "return_token_ids": true,
            "routed_experts_prompt_start": 0,
        });
        if p.top_k > 0 {
            body["top_k"] = json!(p.top_k);
        }
        let resp = self.post(&url, body)?;
        let choice = resp
            .pointer("/choices/0")
            .ok_or_else(|| err(&url, "choices[0]: missing"))?;
        let ids = |v: Option<&Value>, key: &str| -> Result<Vec<u32>> {
            let v = v.ok_or_else(|| {
                err(
                    &url,
                    format!("{key}: missing (return_token_ids unsupported? vLLM >= 0.10.2)"),
                )
            })?;
            serde_json::from_value(v.clone()).map_err(|e| err(&url, format!("{key}: {e}")))
        };
        let prompt = ids(
            choice
                .get("prompt_token_ids")
                .or(resp.get("prompt_token_ids")),
            "choices[0].prompt_token_ids",
        )?;
        let tokens = ids(choice.get("token_ids"), "choices[0].token_ids")?;
        let lp = choice
            .pointer("/logprobs/token_logprobs")
            .ok_or_else(|| err(&url, "choices[0].logprobs.token_logprobs: missing"))?;
        let logprobs: Vec<Option<f32>> = serde_json::from_value(lp.clone())
            .map_err(|e| err(&url, format!("choices[0].logprobs.token_logprobs: {e}")))?;
        let logprobs = finite(logprobs, &url, "choices[0].logprobs.token_logprobs")?;
        let finish = match choice.get("finish_reason").and_then(Value::as_str) {
            Some("stop") => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        let bytes = serde_json::to_vec(&resp).expect("a JSON value serialises");
        let trace = vllm::from_json(&bytes, &self.meta(&url)?).map_err(|e| err(&url, e))?;
        self.checked(&url, r, prompt, tokens, logprobs, trace, finish)
    }

    #[allow(clippy::type_complexity)]
    fn one_sglang(
        &self,
        base: &str,
        r: &Request,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>, RouteTrace, FinishReason)> {
        let url = format!("{base}/generate");
        let p = &r.params;
        let mut sp = json!({
            "max_new_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stop_token_ids": p.stop_token_ids,
            "sampling_seed": p.seed,
        });
        if p.top_k > 0 {
            sp["top_k"] = json!(p.top_k);
        }
        let body = json!({
            "input_ids": r.prompt,
            "sampling_params": sp,
            "return_logprob": true,
            "return_routed_experts": true,
        });
        let resp = self.post(&url, body)?;
        let resp = match resp {
            Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
            v => v,
        };
        let tokens: Vec<u32> = serde_json::from_value(
            resp.get("output_ids")
                .cloned()
                .ok_or_else(|| err(&url, "output_ids: missing"))?,
        )
        .map_err(|e| err(&url, format!("output_ids: {e}")))?;
        let mi = resp
            .get("meta_info")
            .ok_or_else(|| err(&url, "meta_info: missing"))?;
        let lp = mi.get("output_token_logprobs").ok_or_else(|| {
            err(
                &url,
                "meta_info.output_token_logprobs: missing (return_logprob)",
            )
        })?;
        let triples: Vec<(Option<f32>, u32, Value)> = serde_json::from_value(lp.clone())
            .map_err(|e| err(&url, format!("meta_info.output_token_logprobs: {e}")))?;
        if let Some((i, _)) = triples
            .iter()
            .zip(&tokens)
            .enumerate()
            .find(|(_, (t, &id))| t.1 != id)
        {
            return Err(err(
                &url,
                format!(
                    "meta_info.output_token_logprobs[{i}]: token id disagrees with output_ids[{i}]"
                ),
            ));
        }
        let logprobs = finite(
            triples.into_iter().map(|t| t.0).collect(),
            &url,
            "meta_info.output_token_logprobs",
        )?;
        let finish = match mi.pointer("/finish_reason/type").and_then(Value::as_str) {
            Some("stop") => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        let bytes = serde_json::to_vec(&resp).expect("a JSON value serialises");
        let mut meta = self.meta(&url)?;
        meta.prompt_len = Some(r.prompt.len() as u32);
        let trace = sglang::from_json(&bytes, &meta).map_err(|e| err(&url, e))?;
        self.checked(&url, r, r.prompt.clone(), tokens, logprobs, trace, finish)
    }

    /// The answer agrees with itself and the request: the prompt echoed, one log-prob per token,
    /// a route row per token but the last (which stays missing).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn checked(
        &self,
        url: &str,
        r: &Request,
        prompt: Vec<u32>,
        tokens: Vec<u32>,
        logprobs: Vec<f32>,
        trace: RouteTrace,
        finish: FinishReason,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<f32>, RouteTrace, FinishReason)> {
        if prompt != r.prompt {
            return Err(err(
                url,
                format!(
                    "the prompt's token ids came back different ({} ids sent, {} echoed)",
                    r.prompt.len(),
                    prompt.len()
                ),
            ));
        }
        if logprobs.len() != tokens.len() {
            return Err(err(
                url,
                format!("{} log-probs for {} tokens", logprobs.len(), tokens.len()),
            ));
        }
        let n = prompt.len() + tokens.len();
        if trace.num_tokens() != n {
            return Err(err(
                url,
                format!(
                    "routed experts cover {} tokens, the sequence has {n}",
                    trace.num_tokens()
                ),
            ));
        }
        if trace.top_k().is_none() {
            return Err(err(url, "routed experts: variable-count rows"));
        }
        if trace.layers() != self.layout.moe_layers.as_slice() {
            return Err(err(
                url,
                format!(
                    "routed experts: layers {:?}, the model's MoE layers are {:?}",
                    trace.layers(),
                    self.layout.moe_layers
                ),
            ));
        }
        if let Some(t) = (0..n.saturating_sub(1)).find(|&t| trace.is_missing(t)) {
            return Err(err(url, format!("routed experts: token {t} has no row")));
        }
        Ok((
            prompt,
            tokens,
            logprobs,
            trace.with_policy_version(self.policy_version),
            finish,
        ))
    }
}

fn finite(v: Vec<Option<f32>>, url: &str, key: &str) -> Result<Vec<f32>> {
    v.into_iter()
        .enumerate()
        .map(|(i, x)| {
            x.filter(|x| x.is_finite())
                .ok_or_else(|| err(url, format!("{key}[{i}]: not a finite number")))
        })
        .collect()
}

/// Write `model` to a new directory `<out>/weights-sync.<n>` (`n` one past the highest there:
/// never one a server may be reading; through a temporary directory renamed into place), point
/// the symlink `<out>/weights-sync` at it (a rename: atomic), and remove all but the previous
/// one. Returns the new directory (absolute).
pub fn publish_checkpoint(model: &lockstep_model::MoeCausalLm, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| RlError::io(out, e))?;
    let out = std::fs::canonicalize(out).map_err(|e| RlError::io(out, e))?;
    let index_of = |name: &std::ffi::OsStr| {
        name.to_str()
            .and_then(|s| s.strip_prefix("weights-sync."))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let existing: Vec<(u64, PathBuf)> = std::fs::read_dir(&out)
        .map_err(|e| RlError::io(&out, e))?
        .flatten()
        .filter_map(|e| index_of(&e.file_name()).map(|i| (i, e.path())))
        .collect();
    let n = existing.iter().map(|(i, _)| i + 1).max().unwrap_or(1);
    let name = format!("weights-sync.{n}");
    let dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| RlError::io(&tmp, e))?;
    }
    model.save(&tmp)?;
    std::fs::rename(&tmp, &dir).map_err(|e| RlError::io(&dir, e))?;
    let link = out.join("weights-sync");
    let tmp_link = out.join(".weights-sync.link.tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(Path::new(&name), &tmp_link)?;
    if link.is_dir() && !link.is_symlink() {
        // an earlier run's plain directory (lockstep servers' sync): out of the way first
        std::fs::remove_dir_all(&link).map_err(|e| RlError::io(&link, e))?;
    }
    std::fs::rename(&tmp_link, &link).map_err(|e| RlError::io(&link, e))?;
    // the previous version may still be read by a server that has not reloaded yet: kept
    for (i, p) in existing {
        if i + 1 < n {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(dir)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| RlError::io(link, e))
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> Result<()> {
    let _ = target;
    Err(RlError::io(
        link,
        "foreign rollout servers need symlinks (unix)",
    ))
}
