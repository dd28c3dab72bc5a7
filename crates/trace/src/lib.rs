//! Route transport (see crate description).
