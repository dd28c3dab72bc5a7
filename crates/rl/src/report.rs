//! The run report: one self-contained HTML page of SVG line plots (reward, eval accuracy, KL
//! estimate, extreme-token fraction, routing confidence / max_vio / route agreement per layer),
//! one or several runs on the same axes (e.g. replay off vs on). A metric whose positive values
//! span two decades or more is drawn on a logarithmic axis. With a [`Header`]: the run's
//! config, wall time, tokens/s and final metrics above the plots, and a table of the last
//! eval's sample completions below them.

use std::fmt::Write;
use std::path::Path;

use crate::config::RunConfig;
use crate::error::{Result, RlError};
use crate::metrics::StepRecord;
use crate::rollout::EvalSample;

/// What the report shows about a single run beyond its plots.
pub struct Header {
    pub config_toml: String,
    pub wall_seconds: f64,
    pub samples: Vec<EvalSample>,
}

impl Header {
    pub fn of(cfg: &RunConfig, wall_seconds: f64, samples: Vec<EvalSample>) -> Self {
        Self { config_toml: cfg.to_toml(), wall_seconds, samples }
    }
}

/// `<`, `>`, `&`, `"` as entities.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Whether points belong on a log axis: all positive (and finite), spanning ≥ 2 decades.
pub fn wants_log(points: &[f64]) -> bool {
    let pos: Vec<f64> = points.iter().copied().filter(|v| v.is_finite()).collect();
    if pos.is_empty() || pos.iter().any(|&v| v <= 0.0) {
        return false;
    }
    let (lo, hi) = pos.iter().fold((f64::MAX, f64::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    hi / lo >= 100.0
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

struct Series {
    label: String,
    dashed: bool,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

fn plot(title: &str, series: &[Series]) -> String {
    let (w, h, ml, mr, mt, mb) = (520.0, 260.0, 50.0, 150.0, 24.0, 30.0);
    let log = wants_log(&series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect::<Vec<_>>());
    let tf = |y: f64| if log { y.log10() } else { y };
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| &s.points).filter(|p| p.1.is_finite()).map(|p| (p.0, tf(p.1))).collect();
    let mut svg = String::new();
    let _ = write!(svg, r#"<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">"#);
    let _ = write!(svg, r#"<text x="{ml}" y="14" style="font-weight:bold">{title}{}</text>"#, if log { " (log axis)" } else { "" });
    if pts.is_empty() {
        let _ = write!(svg, r#"<text x="{ml}" y="60">no data</text></svg>"#);
        return svg;
    }
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    if (y1 - y0).abs() < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + if x1 > x0 { (x - x0) / (x1 - x0) * pw } else { pw / 2.0 };
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    let _ = write!(svg, r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>"##);
    for (v, y) in [(y0, sy(y0)), (y1, sy(y1)), ((y0 + y1) / 2.0, sy((y0 + y1) / 2.0))] {
        let _ = write!(svg, r#"<text x="4" y="{:.1}">{}</text>"#, y + 4.0, fmt(if log { 10f64.powf(v) } else { v }));
    }
    let _ = write!(svg, r#"<text x="{ml}" y="{}">step {:.0}</text><text x="{}" y="{}" text-anchor="end">step {:.0}</text>"#, h - 8.0, x0, ml + pw, h - 8.0, x1);
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s.points.iter().filter(|p| p.1.is_finite()).map(|p| format!("{:.1},{:.1}", sx(p.0), sy(tf(p.1)))).collect();
        let dash = if s.dashed { r#" stroke-dasharray="5,3""# } else { "" };
        let _ = write!(svg, r#"<polyline fill="none" stroke="{}" stroke-width="1.5"{dash} points="{}"/>"#, s.color, path.join(" "));
        let ly = mt + 12.0 * i as f64 + 8.0;
        let _ = write!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}"{dash}/><text x="{}" y="{}">{}</text>"#,
            ml + pw + 8.0,
            ml + pw + 28.0,
            s.color,
            ml + pw + 32.0,
            ly + 4.0,
            s.label
        );
    }
    svg.push_str("</svg>");
    svg
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Write `report.html` for runs given as (label, records).
pub fn write(path: &Path, runs: &[(String, Vec<StepRecord>)], title: &str) -> Result<()> {
    write_with(path, runs, title, None)
}

/// The header block: config, wall time, tokens/s, the final metrics of each run.
fn header_html(h: &Header, runs: &[(String, Vec<StepRecord>)]) -> String {
    let mut out = String::new();
    let _ = write!(out, "<h3>Run</h3><p>wall time {:.1} s", h.wall_seconds);
    for (label, recs) in runs {
        let rl: Vec<&StepRecord> = recs.iter().filter(|r| r.phase == "rl").collect();
        let tokens: usize = rl.iter().map(|r| r.completion_tokens).sum();
        let secs: f64 = rl.iter().map(|r| r.seconds).sum();
        let _ = write!(out, "; {}: {tokens} completion tokens in {secs:.1} s of RL steps ({:.1} tokens/s)", escape(label), if secs > 0.0 { tokens as f64 / secs } else { 0.0 });
    }
    out.push_str("</p><table border=\"1\" cellpadding=\"3\" style=\"border-collapse:collapse\"><tr><th>run</th><th>final metric</th><th>value</th></tr>");
    for (label, recs) in runs {
        let Some(last) = recs.iter().rev().find(|r| r.phase == "rl").or(recs.last()) else { continue };
        let eval = recs.iter().rev().find(|r| r.eval_reward.is_some() || r.eval_accuracy.is_some());
        let mut rows: Vec<(String, f64)> = vec![("step".into(), last.step as f64), ("reward (mean)".into(), last.reward_mean), ("KL".into(), last.kl), ("extreme-token fraction".into(), last.extreme_fraction)];
        if let Some(e) = eval {
            rows.extend(e.eval_reward.map(|v| ("eval reward (held out)".to_string(), v)));
            rows.extend(e.eval_accuracy.map(|v| ("eval accuracy (held out)".to_string(), v)));
            rows.extend(e.eval_pass_at.iter().map(|(k, v)| (format!("eval {k}"), *v)));
        }
        rows.extend(last.reward_parts.iter().map(|(k, v)| (format!("reward {k}"), *v)));
        rows.extend(last.reward_metrics.iter().map(|(k, v)| (format!("reward metric {k}"), *v)));
        for (k, v) in rows {
            let _ = write!(out, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", escape(label), escape(&k), fmt(v));
        }
    }
    let _ = write!(out, "</table><details><summary>config</summary><pre>{}</pre></details>", escape(&h.config_toml));
    out
}

fn samples_html(samples: &[EvalSample]) -> String {
    let mut out = String::from("<h3>Sample completions (last eval, greedy)</h3><table border=\"1\" cellpadding=\"3\" style=\"border-collapse:collapse;font-family:monospace\"><tr><th>prompt</th><th>completion</th><th>answer</th><th>reward</th></tr>");
    for s in samples {
        let _ = write!(out, "<tr><td><pre>{}</pre></td><td><pre>{}</pre></td><td>{}</td><td>{}</td></tr>", escape(&s.prompt), escape(&s.completion), escape(&s.answer), fmt(s.reward));
    }
    out.push_str("</table>");
    out
}

/// [`write`] with a run's [`Header`] (config, wall time, tokens/s, final metrics, samples).
pub fn write_with(path: &Path, runs: &[(String, Vec<StepRecord>)], title: &str, header: Option<&Header>) -> Result<()> {
    let scalar = |name: &str, f: &dyn Fn(&StepRecord) -> Option<f64>| -> String {
        let series: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(ri, (label, recs))| Series {
                label: label.clone(),
                dashed: ri > 0,
                color: COLORS[ri % COLORS.len()],
                points: recs.iter().filter(|r| r.phase == "rl").filter_map(|r| f(r).map(|v| (r.step as f64, v))).collect(),
            })
            .collect();
        plot(name, &series)
    };
    let per_layer = |name: &str, f: &dyn Fn(&crate::metrics::LayerRecord) -> f64| -> String {
        let mut series = Vec::new();
        for (ri, (label, recs)) in runs.iter().enumerate() {
            let layers: Vec<usize> = recs.iter().flat_map(|r| r.layers.keys().copied()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            for (li, l) in layers.iter().enumerate() {
                series.push(Series {
                    label: format!("{label} L{l}"),
                    dashed: ri > 0,
                    color: COLORS[li % COLORS.len()],
                    points: recs.iter().filter(|r| r.phase == "rl").filter_map(|r| r.layers.get(l).map(|x| (r.step as f64, f(x)))).collect(),
                });
            }
        }
        plot(name, &series)
    };
    let mut html = String::new();
    let _ = write!(html, "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body style=\"font-family:sans-serif\"><h2>{title}</h2>");
    if let Some(h) = header {
        html.push_str(&header_html(h, runs));
    }
    let _ = write!(html, "<p>x axis: RL step. Runs: {}.</p><div style=\"display:flex;flex-wrap:wrap\">", runs.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join(", "));
    for svg in [
        scalar("reward (mean)", &|r| Some(r.reward_mean)),
        scalar("eval accuracy (greedy, held out)", &|r| r.eval_accuracy),
        scalar("eval reward (greedy, held out)", &|r| r.eval_reward),
        scalar("train–inference KL (first update, π_θ vs π_infer)", &|r| Some(r.train_infer_kl)),
        scalar("train–inference F(τ) (first update)", &|r| Some(r.train_infer_extreme_fraction)),
        scalar("KL estimate mean(ρ−1−log ρ)", &|r| Some(r.kl)),
        scalar("KL of the most off-policy mini-step", &|r| Some(r.kl_max)),
        scalar("extreme-token fraction F(τ)", &|r| Some(r.extreme_fraction)),
        scalar("clip fraction", &|r| Some(r.clip_fraction)),
        per_layer("routing confidence", &|l| l.confidence),
        per_layer("max_vio", &|l| l.max_vio),
        per_layer("max_vio as prime-rl logs it", &|l| l.max_vio_prime_rl),
        per_layer("route agreement (trainer's free routes vs inference routes)", &|l| l.route_agreement),
    ] {
        let _ = write!(html, "<div style=\"margin:6px\">{svg}</div>");
    }
    let pass_keys: std::collections::BTreeSet<&String> = runs.iter().flat_map(|(_, recs)| recs.iter().flat_map(|r| r.eval_pass_at.keys())).collect();
    for k in pass_keys {
        let svg = scalar(&format!("eval {k} (held out)"), &|r| r.eval_pass_at.get(k).copied());
        let _ = write!(html, "<div style=\"margin:6px\">{svg}</div>");
    }
    html.push_str("</div>");
    if let Some(h) = header.filter(|h| !h.samples.is_empty()) {
        html.push_str(&samples_html(&h.samples));
    }
    html.push_str("</body></html>");
    std::fs::write(path, html).map_err(|e| RlError::io(path, e))
}

/// A markdown table of runs side by side: means over the RL steps of the train–inference KL and
/// F(τ) (first update of each step), the update KL, route agreement (mean over layers), and
/// the reward of the first / last 5 steps and the final eval accuracy.
pub fn compare_table(runs: &[(String, Vec<StepRecord>)]) -> String {
    let mut t = String::from("| run | train–inference KL | train–inference F(τ) | max \\|Δ logprob\\| | update KL | route agreement | reward first 5 → last 5 | eval final |\n|---|---|---|---|---|---|---|---|\n");
    for (label, recs) in runs {
        let rl: Vec<&StepRecord> = recs.iter().filter(|r| r.phase == "rl").collect();
        let n = rl.len().max(1) as f64;
        let mean = |f: &dyn Fn(&StepRecord) -> f64| rl.iter().map(|r| f(r)).sum::<f64>() / n;
        let agree = mean(&|r| if r.layers.is_empty() { 0.0 } else { r.layers.values().map(|l| l.route_agreement).sum::<f64>() / r.layers.len() as f64 });
        let max_diff = rl.iter().map(|r| r.train_infer_logprob_diff_max).fold(0.0, f64::max);
        let k = rl.len().clamp(1, 5) as f64;
        let head = rl.iter().take(5).map(|r| r.reward_mean).sum::<f64>() / k;
        let tail = rl.iter().rev().take(5).map(|r| r.reward_mean).sum::<f64>() / k;
        let eval = rl.iter().rev().find_map(|r| r.eval_accuracy).unwrap_or(0.0);
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {} | {:.4} | {head:.3} → {tail:.3} | {eval:.3} |",
            fmt(mean(&|r| r.train_infer_kl)),
            fmt(mean(&|r| r.train_infer_extreme_fraction)),
            fmt(max_diff),
            fmt(mean(&|r| r.kl)),
            agree
        );
    }
    t
}
