//! Prometheus text exposition (`/metrics`): requests by endpoint and status, prompt and
//! generated tokens, request latency and time to first token (histograms), route capture
//! bytes returned, engine steps, running / waiting sequences, the policy version; and for
//! admission: open and refused connections, KV blocks held, and the engine steps each sequence
//! took from its request's arrival to its completion (what fair admission bounds).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Seconds.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Engine steps.
pub const STEP_BUCKETS: [f64; 14] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 16384.0];

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// sum in millionths
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(&BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(), count: AtomicU64::new(0), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count.load(Relaxed));
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count.load(Relaxed));
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub capture_bytes: AtomicU64,
    pub engine_steps: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub policy_version: AtomicU64,
    pub weight_loads: AtomicU64,
    pub latency: Histogram,
    pub ttft: Histogram,
    /// connections closed at once for `max_connections` or while draining
    pub refused_connections: AtomicU64,
    /// KV-cache blocks held by sequences
    pub kv_blocks_held: AtomicU64,
    /// engine steps from a request's arrival at the engine thread to each of its sequences'
    /// completion
    pub sequence_steps: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            capture_bytes: AtomicU64::new(0),
            engine_steps: AtomicU64::new(0),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            policy_version: AtomicU64::new(0),
            weight_loads: AtomicU64::new(0),
            latency: Histogram::default(),
            ttft: Histogram::default(),
            refused_connections: AtomicU64::new(0),
            kv_blocks_held: AtomicU64::new(0),
            sequence_steps: Histogram::new(&STEP_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP lockstep_requests_total HTTP requests by endpoint and status.\n# TYPE lockstep_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((e, s), n) in m.iter() {
                let _ = writeln!(out, "lockstep_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}");
            }
        }
        let counters = [
            ("lockstep_prompt_tokens_total", "Prompt tokens of admitted requests.", &self.prompt_tokens),
            ("lockstep_generation_tokens_total", "Tokens sampled by the engine.", &self.generation_tokens),
            ("lockstep_route_capture_bytes_total", "Bytes of encoded route traces returned.", &self.capture_bytes),
            ("lockstep_engine_steps_total", "Batched engine steps.", &self.engine_steps),
            ("lockstep_weight_loads_total", "Weight reloads.", &self.weight_loads),
            ("lockstep_refused_connections_total", "Connections answered 503 and closed (max_connections, draining).", &self.refused_connections),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        let gauges = [
            ("lockstep_running_sequences", "Sequences in the running batch.", &self.running),
            ("lockstep_waiting_sequences", "Sequences queued behind it.", &self.waiting),
            ("lockstep_policy_version", "Policy version stamped into routes.", &self.policy_version),
            ("lockstep_kv_blocks_held", "KV-cache blocks held by sequences.", &self.kv_blocks_held),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Relaxed));
        }
        self.latency.render(&mut out, "lockstep_request_duration_seconds", "End-to-end generation request latency.");
        self.ttft.render(&mut out, "lockstep_time_to_first_token_seconds", "Time to the first sampled token.");
        self.sequence_steps.render(&mut out, "lockstep_sequence_engine_steps", "Engine steps from a request's arrival to each of its sequences' completion.");
        out
    }
}
