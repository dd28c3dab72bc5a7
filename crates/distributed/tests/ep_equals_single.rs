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

/// bf16: held to one rank's own error against an f32 reference (`check::AgainstF32`).
#[test]
fn bf16_two_ranks_equal_one() {
    common::check_dtype(2, false, &Device::Cpu, candle_core::DType::BF16);
}

/// ... and that yardstick catches a rank whose gradient all-reduce counts a contribution twice.
#[test]
fn bf16_check_reports_a_doubled_gradient() {
    use candle_core::DType;
    let case = lockstep_dist::check::CheckCase { dtype: DType::BF16, ..Default::default() };
    let reports = common::run_case(2, case, &Device::Cpu, Some(1));
    let f = reports[1].failures(DType::BF16);
    assert!(f.iter().any(|m| m.contains("vs f32")), "{f:?}");
    assert!(reports[0].failures(DType::BF16).iter().all(|m| !m.contains("vs f32")), "rank 0 is intact");
}
