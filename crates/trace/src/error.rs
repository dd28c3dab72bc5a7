//! The one error type of the crate: every variant names the field (or file part) at fault.

/// Result alias used throughout the crate.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

/// Errors from building, encoding, decoding, converting or packing route traces.
///
/// Every variant carries `field`: a dotted path such as `block[3].ids`,
/// `meta_info.routed_experts`, `npy.header.shape` or `sample[7].loss_mask`.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A value is out of its allowed domain or inconsistent with another field.
    #[error("{field}: {msg}")]
    Invalid { field: String, msg: String },
    /// The input ended before `field` could be read.
    #[error("{field}: truncated input (need {need} bytes, {have} available)")]
    Truncated { field: String, need: u64, have: u64 },
    /// A magic number did not match.
    #[error("{field}: wrong magic (expected {expected:?}, found {found:?})")]
    BadMagic { field: String, expected: String, found: String },
    /// An unsupported format version.
    #[error("{field}: unsupported version {found} (this build reads {supported})")]
    Version { field: String, found: u32, supported: u32 },
    /// A stored CRC32 disagrees with the data.
    #[error("{field}: checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { field: String, stored: u32, computed: u32 },
    /// An expert id is not below `num_experts` (or is negative).
    #[error("{field}: expert id {id} out of range (num_experts = {num_experts})")]
    ExpertOutOfRange { field: String, id: i64, num_experts: u32 },
    /// An array shape disagrees with the header / metadata.
    #[error("{field}: shape {found:?} disagrees with {expected}")]
    Shape { field: String, found: Vec<usize>, expected: String },
    /// Invalid base64 text.
    #[error("{field}: invalid base64: {msg}")]
    Base64 { field: String, msg: String },
    /// Malformed JSON, or JSON of the wrong structure.
    #[error("{field}: {msg}")]
    Json { field: String, msg: String },
    /// Routes were made by another policy version or model config.
    #[error("{field}: stale routes (trace has {found}, expected {expected})")]
    Stale { field: String, found: String, expected: String },
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl TraceError {
    pub(crate) fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        TraceError::Invalid { field: field.into(), msg: msg.into() }
    }
    pub(crate) fn json(field: impl Into<String>, msg: impl Into<String>) -> Self {
        TraceError::Json { field: field.into(), msg: msg.into() }
    }
    pub(crate) fn shape(field: impl Into<String>, found: Vec<usize>, expected: impl Into<String>) -> Self {
        TraceError::Shape { field: field.into(), found, expected: expected.into() }
    }
    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        TraceError::Io { path: path.into(), source }
    }
    /// The field path this error names (for `Io`, the path of the file).
    pub fn field(&self) -> &str {
        match self {
            TraceError::Invalid { field, .. }
            | TraceError::Truncated { field, .. }
            | TraceError::BadMagic { field, .. }
            | TraceError::Version { field, .. }
            | TraceError::Checksum { field, .. }
            | TraceError::ExpertOutOfRange { field, .. }
            | TraceError::Shape { field, .. }
            | TraceError::Base64 { field, .. }
            | TraceError::Json { field, .. }
            | TraceError::Stale { field, .. } => field,
            TraceError::Io { path, .. } => path,
        }
    }
}
