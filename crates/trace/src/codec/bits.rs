//! Fixed-width little-endian bit packing.

/// Appends values of up to 64 bits, least significant bit first.
pub(crate) struct BitWriter {
    out: Vec<u8>,
    acc: u128,
    n: u32,
}

impl BitWriter {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        BitWriter { out: Vec::with_capacity(bytes), acc: 0, n: 0 }
    }
    #[inline]
    pub(crate) fn put(&mut self, v: u64, w: u32) {
        debug_assert!(w <= 64 && (w == 64 || v >> w == 0));
        self.acc |= (v as u128) << self.n;
        self.n += w;
        if self.n >= 64 {
            self.out.extend_from_slice(&(self.acc as u64).to_le_bytes());
            self.acc >>= 64;
            self.n -= 64;
        }
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        while self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n = self.n.saturating_sub(8);
        }
        self.out
    }
}

#[inline]
pub(crate) fn mask(w: u32) -> u64 {
    if w >= 64 {
        u64::MAX
    } else {
        (1u64 << w) - 1
    }
}

/// Reads `w <= 64` bits at `bitpos`. Bits past the end of `data` read as zero; callers check
/// the total length beforehand.
#[inline(always)]
pub(crate) fn get(data: &[u8], bitpos: usize, w: u32) -> u64 {
    let byte = bitpos >> 3;
    let sh = (bitpos & 7) as u32;
    if w <= 56 {
        if let Some(b) = data.get(byte..byte + 8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            return (u64::from_le_bytes(a) >> sh) & mask(w);
        }
    } else if let Some(b) = data.get(byte..byte + 16) {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        return ((u128::from_le_bytes(a) >> sh) as u64) & mask(w);
    }
    let mut a = [0u8; 16];
    let tail = data.get(byte..).unwrap_or(&[]);
    let n = tail.len().min(16);
    a[..n].copy_from_slice(&tail[..n]);
    ((u128::from_le_bytes(a) >> sh) as u64) & mask(w)
}

/// Bits needed to represent every value in `0..n` (at least 1).
pub(crate) fn bits_for_count(n: u64) -> u32 {
    if n <= 2 {
        1
    } else {
        64 - (n - 1).leading_zeros()
    }
}
