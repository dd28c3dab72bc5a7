//! Expert parallelism + data parallelism over 2 (and 4) thread ranks equal one rank for the
//! same global batch, on the CPU (harness and what it compares: `common/mod.rs`). Token choice
//! and expert choice (pools per sequence: sequences are not split across ranks).

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
