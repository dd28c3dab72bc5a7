//! One TOML file configures a whole run; sections mirror the modules. Every key is optional
//! (its default is the value [`DEFAULT_TOML`] spells out; a file naming one key runs the
//! default with that key changed); unknown keys and bad values are refused up front with an
//! error naming the key. `DEFAULT_TOML` is the embedded
//! default (`lockstep train` with no `--config`), and `lockstep train --print-config` prints the
//! effective configuration.

use serde::{Deserialize, Serialize};

use crate::error::Result;
pub use crate::task_config::{EvalSection, RewardSpec, TaskSection};
pub use crate::trainer_section::TrainerSection;

pub const DEFAULT_TOML: &str = r#"# lockstep train: the embedded default run
seed = 0
# RL steps (each: rollouts → rewards → advantages → `mini_steps` updates)
steps = 100
# --resume refuses a checkpoint written under a config that differs in a key that shapes the
# run (run_state.json's config_fingerprint names them; steps, [eval], [output] do not count);
# true: continue under this config anyway
allow_config_change = false

[model]
# checkpoint = "path/to/hf-checkpoint"   # default: the embedded tiny Qwen3-MoE
seed = 0
# invariant: batch-invariant kernels (CPU and CUDA), the engine's log-probs equal the trainer's
# bit for bit; standard: candle's kernels (cuBLAS on a GPU), faster at size, equal to rounding
kernels = "invariant"
# f32 | bf16: the trainer's and the in-process engine's weights and activations (bf16: f32
# master weights, AdamW moments and gradient sums; router scores, log-softmax, loss in f32).
# Default f32 on every device; bf16 is what a CUDA run at size wants (half the weight memory)
dtype = "f32"

[task]
# addition: the built-in `a+b=` task (byte tokenizer, exact match); dataset: prompts and
# answers from `path` (JSONL or Parquet) through the model's tokenizer — examples/dataset.toml
kind = "addition"
digits = 1

[warmup]            # supervised warm-up so rewards are not all zero
steps = 60
batch = 32
lr = 3e-3

[rollout]
prompts_per_step = 16
group_size = 8
max_tokens = 4
temperature = 1.0
# lockstep servers to roll out on (e.g. ["http://127.0.0.1:8000"]); empty: the in-process engine.
# Weights are synced after every update through POST /v1/load_weights (same filesystem).
# vLLM / SGLang servers: [{url = "http://127.0.0.1:8000", kind = "vllm"}] (kind: lockstep |
# vllm | sglang; also written "vllm+http://..."); weights go to <output.dir>/weights-sync, then
# SGLang's /update_weights_from_disk or vLLM's /collective_rpc reload_weights (README)
servers = []
# none: the engine runs the trainer's weights and kernels (bitwise lockstep); bf16 / standard:
# roll out with bf16 weights or candle's kernels while the trainer stays f32 / invariant —
# the train–inference mismatch routing replay is for (what --compare-replay's arms use)
mismatch = "none"
# drop groups whose rewards are all equal (no GRPO signal) from the updates
filter_zero_variance = false

[trainer]
lr = 5e-4
weight_decay = 0.0
max_grad_norm = 1.0
warmup_steps = 0
# updates per rollout batch: the 2nd and later are off-policy (where replay matters)
mini_steps = 2
token_budget = 1024
# passes over the same rollout batch (each pass: `mini_steps` updates)
epochs = 1
# an update whose loss or gradient norm is NaN / inf is skipped (weights and AdamW state kept,
# counted as `skipped_nonfinite` in metrics.jsonl); this many skipped in a row stop the run,
# its last good checkpoint intact (optional, default 3, >= 1)
max_nonfinite_steps = 3
# drop each decoder layer's activations after its forward and recompute them in the backward
# (bitwise the same gradients, one more forward of compute)
activation_checkpointing = false
# token positions per chunk of the LM head + log-softmax and its backward (0: a micro-batch at once)
logits_chunk_tokens = 1024
# over more than one rank: each rank keeps a 1/W slice of the replicated parameters' f32
# master copies and AdamW moments (reduce-scattered gradients, all-gathered updates; ignored
# on one rank)
shard_optimizer = false

[replay]
enabled = true

[loss]
objective = "ppo"      # ppo | gspo (sequence-level ratio) | policy_gradient
clip_low = 0.2
clip_high = 0.28
# what PPO is centred on: infer (the engine's log-probs) | recompute (decoupled PPO: the
# trainer scores the rollouts before the first update; is_correction weighs π_old / π_infer)
pi_old = "infer"
is_correction = "none" # none | tis | mis
tis_cap = 2.0
mis_low = 0.5
mis_high = 2.0
# token | joint_sum | joint_mean (token × Plackett–Luce route probability; needs replay and a
# softmax router) | router_shift (RSPO weight on the token ratio)
ratio = "token"
router_shift_floor = 0.1
extreme_tau = 2.0
kl_coef = 0.0          # KL penalty to the reference (the model after the warm-up)
kl_estimator = "k3"    # k1 | k3
entropy_coef = 0.0     # entropy bonus

[eval]
every = 5
# pass_k = [1, 4]     # pass@k on the held-out set (k <= rollout.group_size); default none
# pass_threshold = 0.5  # a completion passes when its reward >= this
# samples = 8           # sample completions of the last eval in the report

# [[reward]] tables (none: the task's exact match), e.g.
# [[reward]]
# kind = "math"       # exact | math | regex | format | length | http (see examples/)
# weight = 1.0

[output]
dir = "runs/default"
# a checkpoint every this many RL steps (and the last), and every this many warm-up steps
# (`warmup-<n>`, which --resume continues mid-warm-up); 0: only when stopped (Ctrl-C)
checkpoint_every = 20
"#;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub seed: u64,
    pub steps: u64,
    /// resume under a config whose fingerprint differs from the checkpoint's (default false)
    pub allow_config_change: bool,
    pub model: ModelSection,
    pub task: TaskSection,
    pub warmup: WarmupSection,
    pub rollout: RolloutSection,
    pub trainer: TrainerSection,
    pub replay: ReplaySection,
    pub loss: LossSection,
    pub eval: EvalSection,
    pub output: OutputSection,
    /// `[[reward]]` tables: the weighted sum of their rewards scores a completion (none: the
    /// task's own exact match)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reward: Vec<RewardSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    pub seed: u64,
    /// "invariant" (default) | "standard"
    #[serde(default = "default_kernels")]
    pub kernels: String,
    /// "f32" (default) | "bf16"
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_dtype() -> String {
    "f32".to_string()
}

fn default_kernels() -> String {
    "invariant".to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmupSection {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSection {
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    /// Rollout servers: a lockstep server's URL, or `kind+URL` for a vLLM / SGLang server
    /// (`vllm+http://...`; a TOML table `{url, kind}` reads as that). See [`ServerSpec`].
    #[serde(default, deserialize_with = "crate::server_spec::de_servers")]
    pub servers: Vec<String>,
    /// "none" (default) | "bf16" | "standard"
    #[serde(default = "default_none")]
    pub mismatch: String,
    #[serde(default)]
    pub filter_zero_variance: bool,
}

pub use crate::server_spec::{ServerKind, ServerSpec};

impl RolloutSection {
    /// `servers`, parsed (errors name `rollout.servers[i]`).
    pub fn server_specs(&self) -> Result<Vec<ServerSpec>> {
        self.servers.iter().enumerate().map(|(i, s)| ServerSpec::parse(i, s)).collect()
    }
}

fn default_none() -> String {
    "none".to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplaySection {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSection {
    pub objective: String,
    pub clip_low: f64,
    pub clip_high: f64,
    /// "infer" (default) | "recompute"
    #[serde(default = "default_infer")]
    pub pi_old: String,
    pub is_correction: String,
    pub tis_cap: f64,
    pub mis_low: f64,
    pub mis_high: f64,
    pub ratio: String,
    /// γ's floor for ratio = "router_shift" (default 0.1)
    #[serde(default = "default_shift_floor")]
    pub router_shift_floor: f64,
    pub extreme_tau: f64,
    /// default 0 (no penalty)
    #[serde(default)]
    pub kl_coef: f64,
    /// "k1" | "k3" (default)
    #[serde(default = "default_k3")]
    pub kl_estimator: String,
    /// default 0 (no bonus)
    #[serde(default)]
    pub entropy_coef: f64,
}

fn default_infer() -> String {
    "infer".to_string()
}

fn default_shift_floor() -> f64 {
    0.1
}

fn default_k3() -> String {
    "k3".to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    pub dir: String,
    pub checkpoint_every: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 100,
            allow_config_change: false,
            model: ModelSection::default(),
            task: TaskSection::default(),
            warmup: WarmupSection::default(),
            rollout: RolloutSection::default(),
            trainer: TrainerSection::default(),
            replay: ReplaySection::default(),
            loss: LossSection::default(),
            eval: EvalSection::default(),
            output: OutputSection::default(),
            reward: Vec::new(),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { checkpoint: None, seed: 0, kernels: default_kernels(), dtype: default_dtype() }
    }
}

impl Default for WarmupSection {
    fn default() -> Self {
        Self { steps: 60, batch: 32, lr: 3e-3 }
    }
}

impl Default for RolloutSection {
    fn default() -> Self {
        Self { prompts_per_step: 16, group_size: 8, max_tokens: 4, temperature: 1.0, servers: Vec::new(), mismatch: default_none(), filter_zero_variance: false }
    }
}

impl Default for ReplaySection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            objective: "ppo".into(),
            clip_low: 0.2,
            clip_high: 0.28,
            pi_old: default_infer(),
            is_correction: "none".into(),
            tis_cap: 2.0,
            mis_low: 0.5,
            mis_high: 2.0,
            ratio: "token".into(),
            router_shift_floor: default_shift_floor(),
            extreme_tau: 2.0,
            kl_coef: 0.0,
            kl_estimator: default_k3(),
            entropy_coef: 0.0,
        }
    }
}

impl Default for OutputSection {
    fn default() -> Self {
        Self { dir: "runs/default".into(), checkpoint_every: 20 }
    }
}

/// The dotted key a toml error is about: the `[section]` above the error's line plus the key
/// on that line (a bad value), or the key toml names in backticks (unknown / missing field,
/// whose span is the key or the section).
fn key_of_error(text: &str, span: Option<std::ops::Range<usize>>, msg: &str) -> String {
    let named = msg.split('`').nth(1).filter(|_| msg.contains("unknown field") || msg.contains("missing field"));
    let Some(span) = span else {
        return named.unwrap_or("<toml>").to_string();
    };
    let at = span.start.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| l.strip_prefix('[').and_then(|l| l.split(']').next()).map(|h| h.trim().to_string());
    let section = text[..line_start].lines().rev().find_map(|l| header(l.trim()));
    let join = |sec: Option<String>, key: &str| match sec {
        Some(sec) if !sec.is_empty() => format!("{sec}.{key}"),
        _ => key.to_string(),
    };
    if let Some(h) = header(line) {
        // the span is a whole table: a field missing in it, or an unknown section
        return match named {
            Some(k) if msg.contains("missing field") => join(Some(h), k),
            Some(k) => k.to_string(),
            None => h,
        };
    }
    let key = if line.starts_with('#') { "" } else { line.split('=').next().unwrap_or("").trim().trim_matches('"') };
    match (key.is_empty(), named) {
        (false, _) => join(section, key),
        (true, Some(k)) => join(section, k),
        (true, None) => "<toml>".into(),
    }
}

pub(crate) use crate::error::bad;

impl RunConfig {
    /// The embedded default: every key at its documented default (what [`DEFAULT_TOML`] spells
    /// out, `tests/config.rs` checks the two agree).
    pub fn default_config() -> Self {
        Self::default()
    }

    /// Parse and validate; errors name the key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            bad(&key_of_error(text, e.span(), &msg), msg)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig serialises")
    }

    // `!(x > 0.0)` on purpose: NaN fails every check
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        self.check_bounds()?;
        if !matches!(self.model.kernels.as_str(), "invariant" | "standard") {
            return Err(bad("model.kernels", format!("`{}`: expected invariant or standard", self.model.kernels)));
        }
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16") {
            return Err(bad("model.dtype", format!("`{}`: expected f32 or bf16", self.model.dtype)));
        }
        self.task.validate()?;
        crate::task_config::validate_rewards(&self.reward)?;
        if self.task.kind == "addition" && !self.reward.is_empty() {
            return Err(bad("reward", "[[reward]] tables score text tasks (task.kind = \"dataset\"); the addition task has its own exact match"));
        }
        self.eval.validate(self.rollout.group_size)?;
        if self.warmup.steps > 0 && self.warmup.batch == 0 {
            return Err(bad("warmup.batch", "must be > 0"));
        }
        if !(self.warmup.lr > 0.0) {
            return Err(bad("warmup.lr", "must be > 0"));
        }
        if self.rollout.prompts_per_step == 0 {
            return Err(bad("rollout.prompts_per_step", "must be > 0"));
        }
        if self.rollout.group_size < 2 {
            return Err(bad("rollout.group_size", "must be >= 2 (group-normalised advantages)"));
        }
        if self.rollout.max_tokens == 0 {
            return Err(bad("rollout.max_tokens", "must be > 0"));
        }
        if !(self.rollout.temperature > 0.0 && self.rollout.temperature.is_finite()) {
            return Err(bad("rollout.temperature", "must be > 0"));
        }
        if !(self.trainer.lr > 0.0) {
            return Err(bad("trainer.lr", "must be > 0"));
        }
        let specs = self.rollout.server_specs()?;
        if let Some(i) = specs.iter().position(|s| (s.kind == ServerKind::Lockstep) != (specs[0].kind == ServerKind::Lockstep)) {
            return Err(bad(&format!("rollout.servers[{i}].kind"), "lockstep servers and vLLM / SGLang servers cannot be mixed in one run"));
        }
        if self.trainer.mini_steps == 0 {
            return Err(bad("trainer.mini_steps", "must be > 0"));
        }
        if self.trainer.mini_steps > self.rollout.prompts_per_step {
            return Err(bad("trainer.mini_steps", "cannot exceed rollout.prompts_per_step (each update takes whole groups)"));
        }
        if self.trainer.token_budget < 16 {
            return Err(bad("trainer.token_budget", "must be >= 16"));
        }
        if !(self.trainer.max_grad_norm > 0.0) {
            return Err(bad("trainer.max_grad_norm", "must be > 0"));
        }
        if !["ppo", "gspo", "policy_gradient"].contains(&self.loss.objective.as_str()) {
            return Err(bad("loss.objective", format!("`{}`: expected ppo, gspo or policy_gradient", self.loss.objective)));
        }
        if !["infer", "recompute"].contains(&self.loss.pi_old.as_str()) {
            return Err(bad("loss.pi_old", format!("`{}`: expected infer or recompute", self.loss.pi_old)));
        }
        if !["none", "bf16", "standard"].contains(&self.rollout.mismatch.as_str()) {
            return Err(bad("rollout.mismatch", format!("`{}`: expected none, bf16 or standard", self.rollout.mismatch)));
        }
        if self.rollout.mismatch != "none" && !self.rollout.servers.is_empty() {
            return Err(bad("rollout.mismatch", "applies to the in-process engine; leave rollout.servers empty"));
        }
        if !(1..=1_000_000).contains(&self.trainer.max_nonfinite_steps) {
            return Err(bad("trainer.max_nonfinite_steps", "must be in 1..=1000000"));
        }
        if self.trainer.epochs == 0 {
            return Err(bad("trainer.epochs", "must be > 0"));
        }
        if !["k1", "k3"].contains(&self.loss.kl_estimator.as_str()) {
            return Err(bad("loss.kl_estimator", format!("`{}`: expected k1 or k3", self.loss.kl_estimator)));
        }
        if !(self.loss.kl_coef >= 0.0 && self.loss.kl_coef.is_finite()) {
            return Err(bad("loss.kl_coef", "must be a finite number >= 0"));
        }
        if !self.loss.entropy_coef.is_finite() {
            return Err(bad("loss.entropy_coef", "must be finite"));
        }
        if !(self.loss.router_shift_floor >= 0.0 && self.loss.router_shift_floor <= 1.0) {
            return Err(bad("loss.router_shift_floor", "must be in [0, 1]"));
        }
        if !["none", "tis", "mis"].contains(&self.loss.is_correction.as_str()) {
            return Err(bad("loss.is_correction", format!("`{}`: expected none, tis or mis", self.loss.is_correction)));
        }
        if !["token", "joint_sum", "joint_mean", "router_shift"].contains(&self.loss.ratio.as_str()) {
            return Err(bad("loss.ratio", format!("`{}`: expected token, joint_sum, joint_mean or router_shift", self.loss.ratio)));
        }
        if self.loss.ratio.starts_with("joint") && !self.replay.enabled {
            return Err(bad("loss.ratio", format!("`{}` with replay.enabled = false compares different events (the trainer's own experts vs the inference experts): enable replay or use ratio = token / router_shift", self.loss.ratio)));
        }
        if !(self.loss.clip_low > 0.0 && self.loss.clip_low < 1.0) {
            return Err(bad("loss.clip_low", "must be in (0, 1)"));
        }
        if !(self.loss.clip_high > 0.0) {
            return Err(bad("loss.clip_high", "must be > 0"));
        }
        if !(self.loss.tis_cap > 0.0) {
            return Err(bad("loss.tis_cap", "must be > 0"));
        }
        if !(self.loss.mis_low < self.loss.mis_high && self.loss.mis_low >= 0.0) {
            return Err(bad("loss.mis_low", "need 0 <= mis_low < mis_high"));
        }
        if !(self.loss.extreme_tau > 1.0) {
            return Err(bad("loss.extreme_tau", "must be > 1"));
        }
        if self.output.dir.is_empty() {
            return Err(bad("output.dir", "must not be empty"));
        }
        Ok(())
    }

    /// What a run over `ranks` ranks needs beyond [`RunConfig::validate`]: the in-process
    /// engine (rollout servers are one engine each; their weights would not be sharded), and
    /// at least one warm-up instance and one rollout group per rank.
    pub fn validate_ranks(&self, ranks: usize) -> Result<()> {
        if ranks == 0 {
            return Err(bad("<ranks>", "must be > 0"));
        }
        if !self.rollout.servers.is_empty() {
            return Err(bad("rollout.servers", format!("a run over {ranks} ranks generates on its own ranks; leave servers empty")));
        }
        if ranks > 1 {
            if let Some(i) = self.reward.iter().position(|r| r.kind == "http") {
                return Err(bad(&format!("reward[{i}].kind"), format!("`http` rewards run on one rank (not over {ranks} ranks) for now")));
            }
        }
        if self.rollout.prompts_per_step < ranks {
            return Err(bad("rollout.prompts_per_step", format!("{} groups cannot give each of {ranks} ranks a group", self.rollout.prompts_per_step)));
        }
        if self.warmup.steps > 0 && self.warmup.batch < ranks {
            return Err(bad("warmup.batch", format!("{} instances cannot give each of {ranks} ranks one", self.warmup.batch)));
        }
        Ok(())
    }

    pub fn loss_config(&self) -> lockstep_trainer::loss::LossConfig {
        use lockstep_trainer::loss::{ExpertAggregation, IsCorrection, KlEstimator, LossConfig, Objective, PiOld, RatioMode};
        LossConfig {
            objective: match self.loss.objective.as_str() {
                "policy_gradient" => Objective::PolicyGradient,
                "gspo" => Objective::Gspo { clip_low: self.loss.clip_low, clip_high: self.loss.clip_high },
                _ => Objective::Ppo { clip_low: self.loss.clip_low, clip_high: self.loss.clip_high },
            },
            is_correction: match self.loss.is_correction.as_str() {
                "tis" => IsCorrection::Tis { cap: self.loss.tis_cap },
                "mis" => IsCorrection::Mis { low: self.loss.mis_low, high: self.loss.mis_high },
                _ => IsCorrection::None,
            },
            ratio: match self.loss.ratio.as_str() {
                "joint_sum" => RatioMode::Joint(ExpertAggregation::Sum),
                "joint_mean" => RatioMode::Joint(ExpertAggregation::Mean),
                "router_shift" => RatioMode::RouterShift { floor: self.loss.router_shift_floor },
                _ => RatioMode::Token,
            },
            pi_old: if self.loss.pi_old == "recompute" { PiOld::Recompute } else { PiOld::Infer },
            extreme_tau: self.loss.extreme_tau,
            kl_coef: self.loss.kl_coef,
            kl_estimator: if self.loss.kl_estimator == "k1" { KlEstimator::K1 } else { KlEstimator::K3 },
            entropy_coef: self.loss.entropy_coef,
        }
    }
}
