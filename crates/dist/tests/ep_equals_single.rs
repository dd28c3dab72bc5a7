//! Expert parallelism + data parallelism over 2 (and 4) thread ranks equal one rank for the
//! same global batch, on the CPU (what is compared: `lockstep_dist::check`). Token choice and
//! expert choice (pools per sequence: sequences are not split across ranks).

mod common;

use candle_core::Device;

#[test]
fn token_choice_two_ranks_equal_one() {
    common::check(2, false, &Device::Cpu);
}

#[test]
fn token_choice_four_ranks_equal_one() {
    common::check(4, false, &Device::Cpu);
}

#[test]
fn expert_choice_two_ranks_equal_one() {
    common::check(2, true, &Device::Cpu);
}

/// The check must be able to fail: dropping one rank's expert gradients' share (scaling a
/// replicated gradient on one rank) is reported.
#[test]
fn check_reports_a_broken_rank() {
    let reports = common::run(2, false, &Device::Cpu, Some(1));
    let f = reports[1].failures(candle_core::DType::F32);
    assert!(f.iter().any(|m| m.contains("differs across ranks")), "{f:?}");
}
