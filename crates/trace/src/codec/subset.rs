//! Combinatorial (ranked-subset) coding of k distinct experts out of E.
//!
//! A sorted set `c_1 < c_2 < ... < c_k` has rank `sum_i C(c_i, i)` in `0..C(E, k)` (the
//! combinatorial number system); `log2 C(128, 8) = 40.4`, so a 48-layer top-8 token takes
//! 48 x 41 bits = 246 bytes. An *ordered* selection additionally stores its Lehmer code
//! (`0..k!`) in the same number: `rank * k! + lehmer`, `ceil(log2(C(128,8) * 8!)) = 56` bits.
//!
//! Unranking is greedy (largest `c` with `C(c, i) <= r`, for `i = k..1`); a lookup table keyed
//! by the exponent and top mantissa bits of `r` gives a starting `c` at most a step or two
//! below the answer, so each id costs a table load and a couple of compares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const MBITS: u32 = 6;
const MMASK: u64 = (1 << MBITS) - 1;
const NKEYS: usize = 65 << MBITS;
/// Sentinel columns past `e` in each binomial row, so correction steps never index out.
const PAD: usize = 8;
/// Subset coding is used for `k <= MAX_K` (larger k: plain ids).
pub(crate) const MAX_K: usize = 32;
/// Bound on the binomial table (`(k + 1) x (E + 1 + PAD)` u64s, 8 MB).
const MAX_BINOM_ENTRIES: usize = 1 << 20;
/// Tables kept per process.
const MAX_CACHED: usize = 64;

/// Binomial and guess tables for one `(E, k)`.
pub(crate) struct SubsetTables {
    k: usize,
    /// Row width of `binom`: `e + 1 + PAD`.
    w: usize,
    /// Fixed number of branchless correction steps after the guess (max over all buckets).
    steps: usize,
    /// Reciprocals `ceil(2^32 / r)` for radices `r in 0..=k` (Lehmer digits when `k! < 2^16`).
    recip: Vec<u64>,
    /// `binom[i * w + c] = C(c, i)` (saturating), `i in 0..=k`, `c in 0..=e`; `u64::MAX` past `e`.
    binom: Vec<u64>,
    /// `guess[i * NKEYS + key(r)]`: a lower bound of the largest `c` with `C(c, i) <= r`.
    guess: Vec<u16>,
    /// `C(e, k)`: ranks are below this.
    pub(crate) total: u64,
    /// `k!` (only meaningful when `ordered_total` is `Some`).
    pub(crate) k_fact: u64,
    /// `C(e, k) * k!` when it fits in u64.
    pub(crate) ordered_total: Option<u64>,
}

/// Bucket of `r`: its bit length and the `MBITS` bits after the leading one (branch-free).
#[inline(always)]
fn key(r: u64) -> usize {
    let b = 64 - r.leading_zeros();
    let mant = ((((r as u128) << (MBITS + 1)) >> b) as u64) & MMASK;
    ((b as usize) << MBITS) | mant as usize
}

/// Smallest `r` with `key(r) == k` (or a value below it for keys no `r` maps to).
fn key_min(k: usize) -> u64 {
    let b = (k >> MBITS) as u32;
    let mant = k as u64 & MMASK;
    if b == 0 {
        0
    } else if b > MBITS + 1 {
        (1u64 << (b - 1)) | (mant << (b - 1 - MBITS))
    } else {
        ((1u64 << MBITS) | mant) >> (MBITS + 1 - b)
    }
}

/// `C(n, k)` if it fits in u64.
pub(crate) fn binomial(n: u64, k: u64) -> Option<u64> {
    if k > n {
        return Some(0);
    }
    let k = k.min(n - k);
    let mut acc: u128 = 1;
    for i in 0..k {
        acc = acc * (n - i) as u128 / (i + 1) as u128;
        if acc > u64::MAX as u128 {
            return None;
        }
    }
    Some(acc as u64)
}

impl SubsetTables {
    /// Tables for `k` of `e` experts, or `None` when `C(e, k)` does not fit in u64.
    fn build(e: usize, k: usize) -> Option<SubsetTables> {
        if k > MAX_K || (k + 1) * (e + 1 + PAD) > MAX_BINOM_ENTRIES {
            return None;
        }
        let total = binomial(e as u64, k as u64)?;
        let w = e + 1 + PAD;
        let mut binom = vec![u64::MAX; (k + 1) * w];
        binom[..=e].fill(1);
        for i in 1..=k {
            binom[i * w] = 0;
            for c in 1..=e {
                binom[i * w + c] = binom[(i - 1) * w + c - 1].saturating_add(binom[i * w + c - 1]);
            }
        }
        let mut guess = vec![0u16; (k + 1) * NKEYS];
        let mut steps = 0usize;
        for i in 2..=k {
            let row = &binom[i * w..i * w + e + 1];
            // largest c < e with C(c, i) <= r, for r = the smallest value of each key
            let mut c = 0usize;
            let mut prev = usize::MAX;
            for key in 0..NKEYS {
                let rmin = key_min(key);
                while c + 1 < e && row[c + 1] <= rmin {
                    c += 1;
                }
                guess[i * NKEYS + key] = c as u16;
                // every r of the previous bucket is below rmin, so its answer is at most `c`
                if prev != usize::MAX {
                    steps = steps.max(c - prev);
                }
                prev = c;
            }
        }
        let steps = steps.max(1);
        let k_fact = (1..=k as u64).try_fold(1u64, |a, x| a.checked_mul(x));
        let ordered_total = k_fact.and_then(|f| total.checked_mul(f));
        let recip = (0..=k as u64).map(|r| if r == 0 { 0 } else { (1u64 << 32).div_ceil(r) }).collect();
        Some(SubsetTables { k, w, steps, recip, binom, guess, total, k_fact: k_fact.unwrap_or(0), ordered_total })
    }

    /// Shared tables for `(e, k)` (built once per process).
    pub(crate) fn get(e: usize, k: usize) -> Option<Arc<SubsetTables>> {
        type Cache = Mutex<HashMap<(usize, usize), Option<Arc<SubsetTables>>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut g = match cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(t) = g.get(&(e, k)) {
            return t.clone();
        }
        let t = SubsetTables::build(e, k).map(Arc::new);
        if g.len() < MAX_CACHED {
            g.insert((e, k), t.clone());
        }
        t
    }

    /// Rank of a strictly ascending row.
    #[inline]
    pub(crate) fn rank_sorted(&self, sorted: &[u16]) -> u64 {
        let w = self.w;
        let mut r = 0u64;
        for (i, &c) in sorted.iter().enumerate() {
            r += self.binom[(i + 1) * w + c as usize];
        }
        r
    }

    /// Writes the ascending row of rank `r < total` into `out` (length k).
    #[inline(always)]
    pub(crate) fn unrank_sorted(&self, mut r: u64, out: &mut [u16]) {
        let w = self.w;
        for i in (2..=self.k).rev() {
            let row = &self.binom[i * w..(i + 1) * w];
            let mut c = self.guess[i * NKEYS + key(r)] as usize;
            if self.steps < PAD {
                for _ in 0..self.steps {
                    c += (row[c + 1] <= r) as usize;
                }
            } else {
                while c + 1 < row.len() && row[c + 1] <= r {
                    c += 1;
                }
            }
            out[i - 1] = c as u16;
            r = r.wrapping_sub(row[c]);
        }
        if self.k >= 1 {
            out[0] = r as u16;
        }
    }

    /// Unranks `N` rows at once (independent dependency chains interleave in the pipeline);
    /// `out` holds `N` rows of `k`, every `r[lane] < total`.
    #[inline(always)]
    pub(crate) fn unrank_sorted_n<const N: usize>(&self, mut r: [u64; N], out: &mut [u16]) {
        let (w, k) = (self.w, self.k);
        if self.steps != 1 {
            for (lane, row) in out.chunks_exact_mut(k).enumerate().take(N) {
                self.unrank_sorted(r[lane], row);
            }
            return;
        }
        for i in (2..=k).rev() {
            let row = &self.binom[i * w..(i + 1) * w];
            let guess = &self.guess[i * NKEYS..(i + 1) * NKEYS];
            for lane in 0..N {
                let rl = r[lane];
                let c = guess[key(rl)] as usize;
                let (lo, hi) = (row[c], row[c + 1]);
                let up = hi <= rl;
                out[lane * k + i - 1] = (c + up as usize) as u16;
                r[lane] = rl.wrapping_sub(if up { hi } else { lo });
            }
        }
        if k >= 1 {
            for lane in 0..N {
                out[lane * k] = r[lane] as u16;
            }
        }
    }

    /// Applies the Lehmer code `lehmer < k!` to the ascending row `sorted`, writing `out`.
    #[inline(always)]
    pub(crate) fn apply_lehmer(&self, lehmer: u64, sorted: &[u16], out: &mut [u16]) {
        match self.k {
            2 => apply_lehmer_k::<2>(lehmer, sorted, out),
            4 => apply_lehmer_k::<4>(lehmer, sorted, out),
            6 => apply_lehmer_k::<6>(lehmer, sorted, out),
            8 => apply_perm_table::<8>(perm_table(8), lehmer, sorted, out),
            _ => self.apply_lehmer_any(lehmer, sorted, out),
        }
    }

    fn apply_lehmer_any(&self, mut lehmer: u64, sorted: &[u16], out: &mut [u16]) {
        let k = self.k;
        let mut buf = [0u16; 64];
        let mut digits = [0u8; 64];
        if k > 64 {
            return out.copy_from_slice(sorted);
        }
        buf[..k].copy_from_slice(sorted);
        if self.k_fact < 1 << 16 {
            for j in (0..k).rev() {
                let radix = (k - j) as u64;
                let q = (lehmer * self.recip[k - j]) >> 32;
                digits[j] = (lehmer - q * radix) as u8;
                lehmer = q;
            }
        } else {
            for j in (0..k).rev() {
                let radix = (k - j) as u64;
                digits[j] = (lehmer % radix) as u8;
                lehmer /= radix;
            }
        }
        let mut n = k;
        for j in 0..k {
            let d = digits[j] as usize;
            out[j] = buf[d];
            for m in d..n - 1 {
                buf[m] = buf[m + 1];
            }
            n -= 1;
        }
    }

    /// `rank * k! + lehmer` of an ordered row of distinct ids (needs `ordered_total`).
    pub(crate) fn rank_ordered(&self, row: &[u16], scratch: &mut Vec<u16>) -> u64 {
        let (r, lehmer) = match row.len() {
            2 => self.rank_ordered_k::<2>(row),
            4 => self.rank_ordered_k::<4>(row),
            6 => self.rank_ordered_k::<6>(row),
            8 => self.rank_ordered_k::<8>(row),
            _ => return self.rank_ordered_any(row, scratch),
        };
        r * self.k_fact + lehmer
    }

    /// `(subset rank, Lehmer code)` of an ordered row of `K` distinct ids.
    #[inline(always)]
    fn rank_ordered_k<const K: usize>(&self, row: &[u16]) -> (u64, u64) {
        let mut a = [0u16; K];
        a.copy_from_slice(&row[..K]);
        let mut sorted = [0u16; K];
        let mut lehmer = 0u64;
        for j in 0..K {
            let mut below = 0usize;
            let mut later = 0u64;
            for (m, &x) in a.iter().enumerate() {
                let lt = (x < a[j]) as usize;
                below += lt;
                later += (lt & (m > j) as usize) as u64;
            }
            sorted[below.min(K - 1)] = a[j];
            lehmer = lehmer * (K - j) as u64 + later;
        }
        (self.rank_sorted(&sorted), lehmer)
    }

    fn rank_ordered_any(&self, row: &[u16], scratch: &mut Vec<u16>) -> u64 {
        let k = row.len();
        scratch.clear();
        scratch.resize(k, 0);
        let mut lehmer = 0u64;
        for j in 0..k {
            // position in sorted order = number of smaller ids; Lehmer digit = smaller ids later
            let mut below = 0usize;
            let mut later = 0u64;
            for (m, &x) in row.iter().enumerate() {
                let lt = (x < row[j]) as usize;
                below += lt;
                later += (lt & (m > j) as usize) as u64;
            }
            scratch[below] = row[j];
            lehmer = lehmer * (k - j) as u64 + later;
        }
        let r = self.rank_sorted(scratch);
        r * self.k_fact + lehmer
    }

    /// Inverse of [`SubsetTables::rank_ordered`] for `v < ordered_total`.
    #[inline]
    #[cfg(test)]
    pub(crate) fn unrank_ordered(&self, v: u64, out: &mut [u16]) {
        let k = self.k.min(64);
        let mut sorted = [0u16; 64];
        self.unrank_sorted(v / self.k_fact, &mut sorted[..k]);
        self.apply_lehmer(v % self.k_fact, &sorted[..k], out);
    }
}

/// For `k <= 8`: Lehmer code -> packed source positions (3 bits per output slot), built once.
fn perm_table(k: usize) -> &'static [u32] {
    static TABLES: [OnceLock<Vec<u32>>; 9] = [const { OnceLock::new() }; 9];
    TABLES[k.min(8)].get_or_init(|| {
        let k = k.min(8);
        let n: usize = (1..=k).product();
        (0..n as u64)
            .map(|code| {
                let mut digits = [0usize; 8];
                let mut c = code;
                for j in (0..k).rev() {
                    digits[j] = (c % (k - j) as u64) as usize;
                    c /= (k - j) as u64;
                }
                let mut remaining: Vec<u32> = (0..k as u32).collect();
                let mut packed = 0u32;
                for (j, &d) in digits[..k].iter().enumerate() {
                    packed |= remaining.remove(d) << (3 * j);
                }
                packed
            })
            .collect()
    })
}

#[inline(always)]
fn apply_perm_table<const K: usize>(table: &[u32], lehmer: u64, sorted: &[u16], out: &mut [u16]) {
    let p = table.get(lehmer as usize).copied().unwrap_or(0);
    let src: &[u16; K] = match sorted.get(..K).and_then(|s| s.try_into().ok()) {
        Some(a) => a,
        None => return,
    };
    for (j, o) in out[..K].iter_mut().enumerate() {
        *o = src[((p >> (3 * j)) & 7) as usize % K];
    }
}

/// [`SubsetTables::apply_lehmer`] for a compile-time `K <= 8`: the remaining ids live in the
/// 16-bit lanes of a u128, so removing the chosen one is branch-free.
#[inline(always)]
fn apply_lehmer_k<const K: usize>(mut lehmer: u64, sorted: &[u16], out: &mut [u16]) {
    let mut digits = [0u32; K];
    for j in (0..K).rev() {
        let radix = (K - j) as u64;
        digits[j] = (lehmer % radix) as u32;
        lehmer /= radix;
    }
    let mut x: u128 = 0;
    for (i, &v) in sorted[..K].iter().enumerate() {
        x |= (v as u128) << (16 * i);
    }
    for (j, o) in out[..K].iter_mut().enumerate() {
        let d = (digits[j].min((K - 1 - j) as u32)) * 16;
        *o = (x >> d) as u16;
        let low = x & ((1u128 << d) - 1);
        x = low | ((x >> d >> 16) << d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_monotone_and_key_min_is_a_lower_bound() {
        let mut prev = 0;
        for r in 0..5000u64 {
            let k = key(r);
            assert!(key_min(k) <= r, "r={r}");
            assert!(k >= prev);
            prev = k;
        }
        for r in (0..2000).map(|i| i * 1_000_003_917u64) {
            assert!(key_min(key(r)) <= r, "r={r}");
        }
    }

    #[test]
    fn unrank_inverts_rank_exhaustive_small() {
        for e in 1..=12usize {
            for k in 1..=e.min(5) {
                let t = SubsetTables::get(e, k).unwrap();
                let mut out = vec![0u16; k];
                for r in 0..t.total {
                    t.unrank_sorted(r, &mut out);
                    assert!(out.windows(2).all(|w| w[0] < w[1]));
                    assert!((*out.last().unwrap() as usize) < e);
                    assert_eq!(t.rank_sorted(&out), r);
                }
                let mut scratch = Vec::new();
                for v in 0..t.ordered_total.unwrap() {
                    t.unrank_ordered(v, &mut out);
                    assert_eq!(t.rank_ordered(&out, &mut scratch), v);
                }
                let mut out4 = vec![0u16; 4 * k];
                for r in 0..t.total.saturating_sub(4) {
                    t.unrank_sorted_n([r, r + 1, r + 2, r + 3], &mut out4);
                    for lane in 0..4 {
                        assert_eq!(t.rank_sorted(&out4[lane * k..(lane + 1) * k]), r + lane as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn ordered_round_trip_const_k_paths() {
        let mut s = 0x1234_5678_9abc_def1u64;
        for (e, k) in [(128usize, 8usize), (64, 6), (40, 4), (9, 2), (200, 8), (20, 7), (65535, 2), (1000, 4), (64, 16)] {
            let t = SubsetTables::get(e, k).unwrap();
            let (mut out, mut scratch) = (vec![0u16; k], Vec::new());
            let mut out4 = vec![0u16; 4 * k];
            for _ in 0..20_000 {
                let mut row: Vec<u16> = Vec::new();
                while row.len() < k {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let id = (s % e as u64) as u16;
                    if !row.contains(&id) {
                        row.push(id);
                    }
                }
                let mut sorted = row.clone();
                sorted.sort_unstable();
                let r = t.rank_sorted(&sorted);
                t.unrank_sorted_n([r, r / 2, r / 3, 0], &mut out4);
                assert_eq!(&out4[..k], &sorted[..]);
                for (lane, d) in [(1usize, 2u64), (2, 3)] {
                    assert_eq!(t.rank_sorted(&out4[lane * k..(lane + 1) * k]), r / d);
                }
                let Some(total) = t.ordered_total else { continue };
                let v = t.rank_ordered(&row, &mut scratch);
                assert!(v < total);
                t.unrank_ordered(v, &mut out);
                assert_eq!(out, row);
            }
        }
    }

    #[test]
    fn widths_at_128_top8() {
        let t = SubsetTables::get(128, 8).unwrap();
        assert!(t.steps < PAD, "steps {}", t.steps);
        assert_eq!(64 - (t.total - 1).leading_zeros(), 41);
        assert_eq!(64 - (t.ordered_total.unwrap() - 1).leading_zeros(), 56);
    }
}
