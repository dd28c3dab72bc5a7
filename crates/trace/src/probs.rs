//! Router probabilities of the selected experts, in their stored precision.

use half::{bf16, f16};

/// Storage precision of router probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbDtype {
    F32,
    Bf16,
    F16,
}

impl ProbDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            ProbDtype::F32 => 4,
            ProbDtype::Bf16 | ProbDtype::F16 => 2,
        }
    }
    pub(crate) fn code(self) -> u8 {
        match self {
            ProbDtype::F32 => 1,
            ProbDtype::Bf16 => 2,
            ProbDtype::F16 => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(ProbDtype::F32),
            2 => Some(ProbDtype::Bf16),
            3 => Some(ProbDtype::F16),
            _ => None,
        }
    }
}

/// Probabilities aligned one-to-one with a trace's flat id buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Probs {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Probs {
    pub fn dtype(&self) -> ProbDtype {
        match self {
            Probs::F32(_) => ProbDtype::F32,
            Probs::Bf16(_) => ProbDtype::Bf16,
            Probs::F16(_) => ProbDtype::F16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Probs::F32(v) => v.len(),
            Probs::Bf16(v) => v.len(),
            Probs::F16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Value `i` widened to f32 (exact for every dtype).
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Probs::F32(v) => v[i],
            Probs::Bf16(v) => v[i].to_f32(),
            Probs::F16(v) => v[i].to_f32(),
        }
    }
    /// A zero buffer of `len` values.
    pub fn zeros(dtype: ProbDtype, len: usize) -> Self {
        match dtype {
            ProbDtype::F32 => Probs::F32(vec![0.0; len]),
            ProbDtype::Bf16 => Probs::Bf16(vec![bf16::ZERO; len]),
            ProbDtype::F16 => Probs::F16(vec![f16::ZERO; len]),
        }
    }
    /// Narrow f32 values to `dtype` (exact when they came from that dtype).
    pub fn from_f32(dtype: ProbDtype, v: &[f32]) -> Self {
        match dtype {
            ProbDtype::F32 => Probs::F32(v.to_vec()),
            ProbDtype::Bf16 => Probs::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            ProbDtype::F16 => Probs::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }
    pub(crate) fn set_raw_from(&mut self, dst: usize, src: &Probs, i: usize) {
        match (self, src) {
            (Probs::F32(a), Probs::F32(b)) => a[dst] = b[i],
            (Probs::Bf16(a), Probs::Bf16(b)) => a[dst] = b[i],
            (Probs::F16(a), Probs::F16(b)) => a[dst] = b[i],
            _ => unreachable_dtype(),
        }
    }
    /// Append value `i` as little-endian bytes.
    pub(crate) fn put_le(&self, i: usize, out: &mut Vec<u8>) {
        match self {
            Probs::F32(v) => out.extend_from_slice(&v[i].to_bits().to_le_bytes()),
            Probs::Bf16(v) => out.extend_from_slice(&v[i].to_bits().to_le_bytes()),
            Probs::F16(v) => out.extend_from_slice(&v[i].to_bits().to_le_bytes()),
        }
    }
    /// Set value `i` from little-endian bytes of the matching size.
    pub(crate) fn set_le(&mut self, i: usize, b: &[u8]) {
        match self {
            Probs::F32(v) => v[i] = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Probs::Bf16(v) => v[i] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            Probs::F16(v) => v[i] = f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
        }
    }
    /// Bitwise equality (NaN-safe), used by tests and round-trip checks.
    pub fn bits_eq(&self, other: &Probs) -> bool {
        match (self, other) {
            (Probs::F32(a), Probs::F32(b)) => a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits())),
            (Probs::Bf16(a), Probs::Bf16(b)) => a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits())),
            (Probs::F16(a), Probs::F16(b)) => a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits())),
            _ => false,
        }
    }
}

// Callers construct both sides with the same dtype; a mismatch is a bug in this crate.
#[cold]
fn unreachable_dtype() {
    debug_assert!(false, "probability dtype mismatch");
}
