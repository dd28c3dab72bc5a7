//! Id stream codecs: how the expert ids of the present rows of a trace become bits.
//!
//! | codec     | rows                    | bits per `(token, layer)` row                 |
//! |-----------|-------------------------|-----------------------------------------------|
//! | `Subset`  | fixed k, unordered      | `ceil(log2 C(E, k))` (41 at 128/8)            |
//! | `Ordered` | fixed k, ordered        | `ceil(log2(C(E, k) * k!))` (56 at 128/8)      |
//! | `Plain`   | fixed k, when the above overflow u64 or k > 32 | `k * ceil(log2 E)` |
//! | `Variable`| expert choice           | `ceil(log2(E + 1))` count + count x `ceil(log2 E)` |
//!
//! Only tokens not marked missing are encoded, in `[token][layer]` order.

mod bits;
pub(crate) mod subset;

use crate::error::{Result, TraceError};
use crate::trace::{TraceMeta, MISSING_ID};
use bits::{bits_for_count, get, BitWriter};
use subset::SubsetTables;

/// Which codec a block's id stream uses (stored as one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdCodec {
    Subset = 1,
    Ordered = 2,
    Plain = 3,
    Variable = 4,
}

impl IdCodec {
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(IdCodec::Subset),
            2 => Some(IdCodec::Ordered),
            3 => Some(IdCodec::Plain),
            4 => Some(IdCodec::Variable),
            _ => None,
        }
    }

    /// The most compact codec for this metadata.
    pub fn choose(meta: &TraceMeta) -> IdCodec {
        if meta.top_k == 0 {
            return IdCodec::Variable;
        }
        match SubsetTables::get(meta.num_experts as usize, meta.top_k as usize) {
            Some(_) if !meta.ordered => IdCodec::Subset,
            Some(t) if t.ordered_total.is_some() => IdCodec::Ordered,
            _ => IdCodec::Plain,
        }
    }

    /// Bits per row for fixed-k codecs (`None` for `Variable`, or when not applicable).
    pub fn row_bits(self, meta: &TraceMeta) -> Option<u32> {
        let (e, k) = (meta.num_experts as usize, meta.top_k as usize);
        match self {
            IdCodec::Subset => SubsetTables::get(e, k).map(|t| bits_for_count(t.total)),
            IdCodec::Ordered => SubsetTables::get(e, k).and_then(|t| t.ordered_total).map(bits_for_count),
            IdCodec::Plain => Some(k as u32 * bits_for_count(e as u64)),
            IdCodec::Variable => None,
        }
    }
}

/// Encodes the present rows of `ids` (`[token][layer][k]`, or variable rows via `offsets`).
pub(crate) fn encode(
    codec: IdCodec,
    meta: &TraceMeta,
    num_layers: usize,
    missing: &[bool],
    offsets: Option<&[u64]>,
    ids: &[u16],
) -> Vec<u8> {
    let (e, k) = (meta.num_experts as usize, meta.top_k as usize);
    let present = missing.iter().filter(|&&m| !m).count();
    let id_bits = bits_for_count(e as u64);
    match codec {
        IdCodec::Subset | IdCodec::Ordered => {
            let t = match SubsetTables::get(e, k) {
                Some(t) => t,
                None => return encode(IdCodec::Plain, meta, num_layers, missing, offsets, ids),
            };
            let w = match codec.row_bits(meta) {
                Some(w) => w,
                None => return encode(IdCodec::Plain, meta, num_layers, missing, offsets, ids),
            };
            let mut bw = BitWriter::with_capacity(present * num_layers * w as usize / 8 + 16);
            let mut scratch = Vec::with_capacity(k);
            let tok = num_layers * k;
            for (tk, &m) in missing.iter().enumerate() {
                if m {
                    continue;
                }
                for row in ids[tk * tok..(tk + 1) * tok].chunks_exact(k.max(1)) {
                    let v =
                        if codec == IdCodec::Subset { t.rank_sorted(row) } else { t.rank_ordered(row, &mut scratch) };
                    bw.put(v, w);
                }
            }
            bw.finish()
        }
        IdCodec::Plain => {
            let mut bw = BitWriter::with_capacity(present * num_layers * k * id_bits as usize / 8 + 16);
            let tok = num_layers * k;
            for (tk, &m) in missing.iter().enumerate() {
                if !m {
                    for &id in &ids[tk * tok..(tk + 1) * tok] {
                        bw.put(id as u64, id_bits);
                    }
                }
            }
            bw.finish()
        }
        IdCodec::Variable => {
            let cbits = bits_for_count(e as u64 + 1);
            let mut bw = BitWriter::with_capacity(ids.len() * 2 + 16);
            let offsets = offsets.unwrap_or(&[]);
            for (tk, &m) in missing.iter().enumerate() {
                if m {
                    continue;
                }
                for l in 0..num_layers {
                    let r = tk * num_layers + l;
                    let (a, b) = (offsets[r] as usize, offsets[r + 1] as usize);
                    bw.put((b - a) as u64, cbits);
                    for &id in &ids[a..b] {
                        bw.put(id as u64, id_bits);
                    }
                }
            }
            bw.finish()
        }
    }
}

/// Decoded ids (and row offsets for variable rows).
pub(crate) struct Decoded {
    pub(crate) ids: Vec<u16>,
    pub(crate) offsets: Option<Vec<u64>>,
    /// Whether rows still need the duplicate / order checks (codecs that cannot express
    /// invalid rows skip them).
    pub(crate) needs_row_check: bool,
}

fn out_of_range(field: &str, t: usize, l: usize, id: u64, e: u32) -> TraceError {
    TraceError::ExpertOutOfRange {
        field: format!("{field}[token {t}][layer index {l}]"),
        id: id.min(i64::MAX as u64) as i64,
        num_experts: e,
    }
}

/// Decodes an id stream; `field` names the stream in errors (e.g. `block[3].ids`).
pub(crate) fn decode(
    codec: IdCodec,
    meta: &TraceMeta,
    num_layers: usize,
    missing: &[bool],
    data: &[u8],
    field: &str,
) -> Result<Decoded> {
    let (e, k) = (meta.num_experts as usize, meta.top_k as usize);
    let n = missing.len();
    let present = missing.iter().filter(|&&m| !m).count();
    if codec != IdCodec::Variable {
        if k == 0 {
            return Err(TraceError::invalid(format!("{field}.codec"), "fixed-k codec with top_k = 0"));
        }
        let w = codec.row_bits(meta).ok_or_else(|| {
            TraceError::invalid(format!("{field}.codec"), format!("{codec:?} cannot code {k} of {e}"))
        })?;
        if codec == IdCodec::Subset && meta.ordered {
            return Err(TraceError::invalid(
                format!("{field}.codec"),
                "subset codec cannot keep order of an ordered trace",
            ));
        }
        let total_bits = (present as u128) * (num_layers as u128) * (w as u128);
        let want = total_bits.div_ceil(8);
        if data.len() as u128 != want {
            return Err(TraceError::shape(
                field,
                vec![data.len()],
                format!("{want} bytes for {present} present tokens x {num_layers} layers x {w} bits"),
            ));
        }
        let len = n * num_layers * k;
        let mut ids = vec![MISSING_ID; len];
        let tok = num_layers * k;
        match codec {
            IdCodec::Subset | IdCodec::Ordered => {
                let t = SubsetTables::get(e, k)
                    .ok_or_else(|| TraceError::invalid(format!("{field}.codec"), "table overflow"))?;
                let rows = present * num_layers;
                let dense = if present == n { &mut ids[..] } else { &mut vec![0u16; rows * k][..] };
                decode_fixed(&t, codec == IdCodec::Ordered, data, w, rows, dense).map_err(|(j, v)| {
                    let l = j % num_layers.max(1);
                    let tk = missing.iter().enumerate().filter(|(_, &m)| !m).nth(j / num_layers.max(1)).map(|x| x.0);
                    let rank = if codec == IdCodec::Ordered { v / t.k_fact.max(1) } else { v };
                    // the largest id of the set this code stands for: largest c with C(c, k) <= rank
                    let mut c = e as u64;
                    while subset::binomial(c + 1, k as u64).is_some_and(|b| b <= rank) {
                        c += 1;
                    }
                    out_of_range(field, tk.unwrap_or(0), l, c, meta.num_experts)
                })?;
                if present != n && tok > 0 {
                    let dense = dense.to_vec();
                    let mut src = dense.chunks_exact(tok);
                    for (tk, &m) in missing.iter().enumerate() {
                        if !m {
                            if let Some(s) = src.next() {
                                ids[tk * tok..(tk + 1) * tok].copy_from_slice(s);
                            }
                        }
                    }
                }
                Ok(Decoded { ids, offsets: None, needs_row_check: false })
            }
            _ => {
                let ib = bits_for_count(e as u64);
                let mut pos = 0usize;
                for (tk, &m) in missing.iter().enumerate() {
                    if m {
                        continue;
                    }
                    for (j, slot) in ids[tk * tok..(tk + 1) * tok].iter_mut().enumerate() {
                        let v = get(data, pos, ib);
                        pos += ib as usize;
                        if v >= e as u64 {
                            return Err(out_of_range(field, tk, j / k, v, meta.num_experts));
                        }
                        *slot = v as u16;
                    }
                }
                Ok(Decoded { ids, offsets: None, needs_row_check: true })
            }
        }
    } else {
        if k != 0 {
            return Err(TraceError::invalid(format!("{field}.codec"), "variable codec needs top_k = 0"));
        }
        let cbits = bits_for_count(e as u64 + 1);
        let ib = bits_for_count(e as u64);
        let avail = data.len() as u128 * 8;
        let mut pos = 0u128;
        let mut take = |w: u32, what: &str, t: usize, l: usize| -> Result<u64> {
            if pos + w as u128 > avail {
                return Err(TraceError::Truncated {
                    field: format!("{field}[token {t}][layer index {l}].{what}"),
                    need: (pos + w as u128).div_ceil(8) as u64,
                    have: data.len() as u64,
                });
            }
            let v = get(data, pos as usize, w);
            pos += w as u128;
            Ok(v)
        };
        let mut ids = Vec::new();
        let mut offsets = Vec::with_capacity(n * num_layers + 1);
        offsets.push(0u64);
        for (tk, &m) in missing.iter().enumerate() {
            for l in 0..num_layers {
                if !m {
                    let c = take(cbits, "count", tk, l)?;
                    if c > e as u64 {
                        return Err(TraceError::invalid(
                            format!("{field}[token {tk}][layer index {l}].count"),
                            format!("{c} > num_experts {e}"),
                        ));
                    }
                    for _ in 0..c {
                        let v = take(ib, "id", tk, l)?;
                        if v >= e as u64 {
                            return Err(out_of_range(field, tk, l, v, meta.num_experts));
                        }
                        ids.push(v as u16);
                    }
                }
                offsets.push(ids.len() as u64);
            }
        }
        if pos.div_ceil(8) != data.len() as u128 {
            return Err(TraceError::invalid(field, format!("{} trailing bytes", data.len() as u128 - pos.div_ceil(8))));
        }
        Ok(Decoded { ids, offsets: Some(offsets), needs_row_check: true })
    }
}

/// Decodes `rows` fixed-k rows from `data` into `out` (`rows * k` ids), four at a time.
/// On a row code out of range returns the row's index and code.
fn decode_fixed(
    t: &SubsetTables,
    ordered: bool,
    data: &[u8],
    w: u32,
    rows: usize,
    out: &mut [u16],
) -> Result<(), (usize, u64)> {
    const N: usize = 4;
    let k = out.len().checked_div(rows).unwrap_or(0);
    if k == 0 {
        return Ok(());
    }
    let limit = if ordered { t.ordered_total.unwrap_or(0) } else { t.total };
    let mut pos = 0usize;
    let mut sorted = vec![0u16; N * k];
    for (g, group) in out.chunks_mut(N * k).enumerate() {
        let lanes = group.len() / k;
        let mut v = [0u64; N];
        for (lane, slot) in v.iter_mut().enumerate().take(lanes) {
            *slot = get(data, pos, w);
            pos += w as usize;
            if *slot >= limit {
                return Err((g * N + lane, *slot));
            }
        }
        if !ordered {
            if lanes == N {
                t.unrank_sorted_n(v, group);
            } else {
                for (lane, row) in group.chunks_exact_mut(k).enumerate() {
                    t.unrank_sorted(v[lane], row);
                }
            }
        } else {
            let mut r = [0u64; N];
            let mut lehmer = [0u64; N];
            for lane in 0..lanes {
                r[lane] = v[lane] / t.k_fact;
                lehmer[lane] = v[lane] - r[lane] * t.k_fact;
            }
            if lanes == N {
                t.unrank_sorted_n(r, &mut sorted);
            } else {
                for (lane, row) in sorted.chunks_exact_mut(k).enumerate().take(lanes) {
                    t.unrank_sorted(r[lane], row);
                }
            }
            for (lane, row) in group.chunks_exact_mut(k).enumerate() {
                t.apply_lehmer(lehmer[lane], &sorted[lane * k..(lane + 1) * k], row);
            }
        }
    }
    Ok(())
}
