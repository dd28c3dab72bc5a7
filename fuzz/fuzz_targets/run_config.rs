//! The RL run config: bytes → `RunConfig::from_toml` (parse + validate). Never panics; a config
//! that parses serialises (`to_toml`), parses again, and serialises to the same text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_rl::config::RunConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = RunConfig::from_toml(text) else {
        return;
    };
    for ranks in [1, 2, 3] {
        let _ = cfg.validate_ranks(ranks);
    }
    let _ = cfg.rollout.server_specs();
    let out = cfg.to_toml();
    let back = RunConfig::from_toml(&out).unwrap_or_else(|e| panic!("re-parse of to_toml failed: {e}\n{out}"));
    assert_eq!(back.to_toml(), out, "round trip");
    let _ = back.loss_config();
});
