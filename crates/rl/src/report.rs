//! The run report: one self-contained HTML page of SVG line plots (reward, eval accuracy, KL
//! estimate, extreme-token fraction, routing confidence / max_vio / route agreement per layer),
//! one or several runs on the same axes (e.g. replay off vs on).

use std::fmt::Write;
use std::path::Path;

use crate::error::{Result, RlError};
use crate::metrics::StepRecord;

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

struct Series {
    label: String,
    dashed: bool,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

fn plot(title: &str, series: &[Series]) -> String {
    let (w, h, ml, mr, mt, mb) = (520.0, 260.0, 50.0, 150.0, 24.0, 30.0);
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|s| &s.points).filter(|p| p.1.is_finite()).collect();
    let mut svg = String::new();
    let _ = write!(svg, r#"<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" style="font:11px sans-serif">"#);
    let _ = write!(svg, r#"<text x="{ml}" y="14" style="font-weight:bold">{title}</text>"#);
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
        let _ = write!(svg, r#"<text x="4" y="{:.1}">{}</text>"#, y + 4.0, fmt(v));
    }
    let _ = write!(svg, r#"<text x="{ml}" y="{}">step {:.0}</text><text x="{}" y="{}" text-anchor="end">step {:.0}</text>"#, h - 8.0, x0, ml + pw, h - 8.0, x1);
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s.points.iter().filter(|p| p.1.is_finite()).map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
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
    let _ = write!(html, "<p>x axis: RL step. Runs: {}.</p><div style=\"display:flex;flex-wrap:wrap\">", runs.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join(", "));
    for svg in [
        scalar("reward (mean)", &|r| Some(r.reward_mean)),
        scalar("eval accuracy (greedy, held out)", &|r| r.eval_accuracy),
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
    html.push_str("</div></body></html>");
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
