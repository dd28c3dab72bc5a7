//! The run report: a header with the config, wall time, tokens/s and final metrics; log axes
//! for metrics spanning decades; the sample completions table, HTML-escaped.

use lockstep_rl::config::RunConfig;
use lockstep_rl::metrics::StepRecord;
use lockstep_rl::report::{wants_log, write_with, Header};
use lockstep_rl::rollout::{pass_at_k, EvalSample};

#[test]
fn log_axes_only_for_positive_metrics_spanning_decades() {
    assert!(wants_log(&[1e-6, 3e-4, 0.02]));
    assert!(!wants_log(&[0.2, 0.5, 0.9]), "one decade");
    assert!(!wants_log(&[0.0, 1e-6, 1.0]), "a zero has no log");
    assert!(!wants_log(&[-1e-3, 1.0]));
    assert!(!wants_log(&[]));
}

#[test]
fn pass_at_k_is_the_unbiased_estimator() {
    // n = 4 samples, c = 1 correct: pass@1 = 1/4, pass@2 = 1 − C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
    assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
    assert_eq!(pass_at_k(4, 1, 4), 1.0);
    assert_eq!(pass_at_k(8, 0, 3), 0.0);
    assert_eq!(pass_at_k(8, 8, 1), 1.0);
    assert!((pass_at_k(8, 2, 3) - (1.0 - 20.0 / 56.0)).abs() < 1e-12, "1 − C(6,3)/C(8,3)");
}

#[test]
fn report_has_header_log_axes_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let recs: Vec<StepRecord> = (1..=4)
        .map(|s| StepRecord {
            phase: "rl".into(),
            step: s,
            reward_mean: 0.1 * s as f64,
            kl: 10f64.powi(-(s as i32) * 2),
            completion_tokens: 100,
            seconds: 2.0,
            eval_reward: (s == 4).then_some(0.625),
            eval_pass_at: [("pass@2".to_string(), 0.5)].into(),
            ..StepRecord::default()
        })
        .collect();
    let h = Header { config_toml: RunConfig::default().to_toml(), wall_seconds: 12.5, samples: vec![EvalSample { prompt: "<b>3+4=</b>".into(), completion: "7".into(), answer: "7".into(), reward: 1.0 }] };
    let p = dir.path().join("report.html");
    write_with(&p, &[("replay on".into(), recs)], "t", Some(&h)).unwrap();
    let html = std::fs::read_to_string(&p).unwrap();
    assert!(html.contains("wall time 12.5 s"), "wall time");
    assert!(html.contains("400 completion tokens in 8.0 s of RL steps (50.0 tokens/s)"), "tokens/s");
    assert!(html.contains("eval reward (held out)</td><td>0.625"), "final metrics");
    assert!(html.contains("prompts_per_step = 16"), "the config");
    assert!(html.contains("KL estimate mean(ρ−1−log ρ) (log axis)"), "KL spans 6 decades");
    assert!(!html.contains("reward (mean) (log axis)"));
    assert!(html.contains("eval pass@2 (held out)") && html.contains("eval pass@2</td><td>0.500"), "pass@k plotted and in the final metrics");
    assert!(html.contains("&lt;b&gt;3+4=&lt;/b&gt;") && !html.contains("<b>3+4="), "samples escaped");
}
