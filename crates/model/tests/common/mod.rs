//! Shared helpers for the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `testdata/fixtures/<name>`: checkpoints + references dumped by transformers 5.17
/// (`testdata/fixtures/make_fixtures.py` made them; see its README).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fixtures").join(name)
}

/// `testdata/extra_fixtures/<name>`: made by `scripts/make_extra_fixtures.py`.
pub fn extra_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/extra_fixtures").join(name)
}
