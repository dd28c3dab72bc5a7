//! A forward batch: padded rows with an attention mask, or packed sequences (token ids +
//! position ids + sequence boundaries) as training micro-batches arrive.
//!
//! Both reduce to the same three things per row slot: a token id, a position id, and a segment
//! id (0 = padding, 1.. = which sequence). A query attends to a key iff both are in the same
//! non-padding segment and the key is not after the query; padding slots attend only to
//! themselves so that nothing becomes NaN. Tokens are flattened batch-major (`n = b * T + t`),
//! which is the row order of every routing tensor.

use candle_core::{Device, Tensor};

use crate::config::AttentionMode;
use crate::nn::attention::AttentionLayout;
use crate::nn::varlen::KeyLayout;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone)]
pub struct Batch {
    /// [B, T] u32
    pub input_ids_BT: Tensor,
    /// [B, T] position ids (host copy)
    positions: Vec<u32>,
    /// [B, T] segment ids, 0 = padding
    segments: Vec<u32>,
    b: usize,
    t: usize,
}

impl Batch {
    /// Rows of equal length `T` with an attention mask (1 = real token, 0 = padding), left or
    /// right padding. Positions follow transformers' generate convention:
    /// `cumsum(mask) - 1`, padding slots at 0.
    pub fn padded(ids: &[Vec<u32>], attention_mask: &[Vec<u8>], device: &Device) -> Result<Self> {
        let b = ids.len();
        if b == 0 {
            return Err(ModelError::batch("input_ids", "empty batch"));
        }
        let t = ids[0].len();
        if t == 0 {
            return Err(ModelError::batch("input_ids", "empty rows"));
        }
        if attention_mask.len() != b {
            return Err(ModelError::batch("attention_mask", format!("{} rows for {b} rows of input_ids", attention_mask.len())));
        }
        let mut flat = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        let mut segments = Vec::with_capacity(b * t);
        for (r, (row, mask)) in ids.iter().zip(attention_mask).enumerate() {
            if row.len() != t || mask.len() != t {
                return Err(ModelError::batch(
                    "input_ids",
                    format!("row {r} has {} ids and {} mask entries, expected {t}", row.len(), mask.len()),
                ));
            }
            let mut pos = 0u32;
            for (&id, &m) in row.iter().zip(mask) {
                flat.push(id);
                match m {
                    0 => {
                        positions.push(0);
                        segments.push(0);
                    }
                    1 => {
                        positions.push(pos);
                        pos += 1;
                        segments.push(1);
                    }
                    other => return Err(ModelError::batch("attention_mask", format!("row {r}: value {other} is not 0 or 1"))),
                }
            }
        }
        let input_ids_BT = Tensor::from_vec(flat, (b, t), device)?;
        Ok(Batch { input_ids_BT, positions, segments, b, t })
    }

    /// Unpadded sequences of any lengths, right-padded with `pad_id` into one [B, T] batch.
    pub fn from_sequences(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seqs.iter().any(Vec::is_empty) {
            return Err(ModelError::batch("input_ids", "empty sequence"));
        }
        let ids: Vec<Vec<u32>> =
            seqs.iter().map(|s| s.iter().copied().chain(std::iter::repeat(pad_id)).take(t).collect()).collect();
        let mask: Vec<Vec<u8>> =
            seqs.iter().map(|s| (0..t).map(|i| u8::from(i < s.len())).collect()).collect();
        Self::padded(&ids, &mask, device)
    }

    /// One packed row: `tokens` holds several sequences back to back; `cu_seqlens` are the
    /// boundaries (`[0, len0, len0+len1, ..]`); `cu_seqlens.last()` may be smaller than
    /// `tokens.len()`, the rest being padding. `position_ids` default to 0.. per sequence.
    pub fn packed(tokens: &[u32], position_ids: Option<&[u32]>, cu_seqlens: &[usize], device: &Device) -> Result<Self> {
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::batch("tokens", "empty"));
        }
        if cu_seqlens.first() != Some(&0) {
            return Err(ModelError::batch("cu_seqlens", "must start at 0"));
        }
        if cu_seqlens.windows(2).any(|w| w[1] <= w[0]) {
            return Err(ModelError::batch("cu_seqlens", "must be strictly increasing (no empty sequence)"));
        }
        let end = *cu_seqlens.last().unwrap_or(&0);
        if end > t {
            return Err(ModelError::batch("cu_seqlens", format!("last boundary {end} beyond {t} tokens")));
        }
        let mut segments = vec![0u32; t];
        let mut positions = vec![0u32; t];
        for (s, w) in cu_seqlens.windows(2).enumerate() {
            for i in w[0]..w[1] {
                segments[i] = s as u32 + 1;
                positions[i] = (i - w[0]) as u32;
            }
        }
        if let Some(p) = position_ids {
            if p.len() != t {
                return Err(ModelError::batch("position_ids", format!("{} entries for {t} tokens", p.len())));
            }
            positions.copy_from_slice(p);
        }
        let input_ids_BT = Tensor::from_vec(tokens.to_vec(), (1, t), device)?;
        Ok(Batch { input_ids_BT, positions, segments, b: 1, t })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// Number of token slots `B * T` (rows of every routing tensor).
    pub fn num_slots(&self) -> usize {
        self.b * self.t
    }

    /// Per slot: true for real tokens, false for padding.
    pub fn real_mask(&self) -> Vec<bool> {
        self.segments.iter().map(|&s| s != 0).collect()
    }

    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    pub fn segments(&self) -> &[u32] {
        &self.segments
    }

    /// How this batch's tokens see each other: a packed row is cut into its sequences (attention
    /// cost Σ len² instead of T²); padded rows use one dense bias.
    pub(crate) fn attention_layout(&self, mode: AttentionMode, device: &Device) -> Result<AttentionLayout> {
        if self.b != 1 {
            return Ok(AttentionLayout::Dense(self.attention_bias(mode, device)?));
        }
        let mut runs = Vec::new();
        let mut start = 0;
        while start < self.t {
            let mut end = start + 1;
            while end < self.t && self.segments[end] == self.segments[start] {
                end += 1;
            }
            let part = Batch {
                input_ids_BT: self.input_ids_BT.narrow(1, start, end - start)?,
                positions: self.positions[start..end].to_vec(),
                segments: self.segments[start..end].to_vec(),
                b: 1,
                t: end - start,
            };
            runs.push((start, end - start, part.attention_bias(mode, device)?));
            start = end;
        }
        if runs.len() == 1 {
            return Ok(AttentionLayout::Dense(runs.remove(0).2));
        }
        Ok(AttentionLayout::Runs(runs))
    }

    /// Which keys each slot sees, as the batch-invariant attention takes it
    /// ([`crate::nn::varlen::KeyLayout`] over the batch's own B·T slots, block size 1): a slot
    /// sees a prefix of its sequence's slots (those of its row and segment, in slot order) —
    /// by mode up to itself (causal), all of them (bidirectional), or those in its block or an
    /// earlier one (block); a padding slot sees only itself. The same visibility as
    /// [`Batch::attention_bias`].
    pub(crate) fn key_layout(&self, mode: AttentionMode) -> Result<KeyLayout> {
        let (b, t) = (self.b, self.t);
        let n = b * t;
        let (mut table, mut q_start, mut q_keys) = (Vec::with_capacity(n), vec![0u32; n], vec![0u32; n]);
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            let pos = &self.positions[r * t..(r + 1) * t];
            let mut lists: std::collections::BTreeMap<u32, Vec<usize>> = std::collections::BTreeMap::new();
            for (i, &s) in seg.iter().enumerate() {
                if s == 0 {
                    q_start[r * t + i] = table.len() as u32;
                    q_keys[r * t + i] = 1;
                    table.push((r * t + i) as u32);
                } else {
                    lists.entry(s).or_default().push(i);
                }
            }
            for slots in lists.values() {
                let at = table.len() as u32;
                table.extend(slots.iter().map(|&i| (r * t + i) as u32));
                for (k, &i) in slots.iter().enumerate() {
                    let keys = match mode {
                        AttentionMode::Causal => k + 1,
                        AttentionMode::Bidirectional => slots.len(),
                        AttentionMode::Block(bl) => {
                            let keys = slots.iter().take_while(|&&j| pos[j] as usize / bl <= pos[i] as usize / bl).count();
                            if slots[keys..].iter().any(|&j| pos[j] as usize / bl <= pos[i] as usize / bl) {
                                return Err(ModelError::batch("position_ids", format!("row {r}: block attention needs positions that do not go back within a sequence")));
                            }
                            keys
                        }
                    };
                    q_start[r * t + i] = at;
                    q_keys[r * t + i] = keys as u32;
                }
            }
        }
        Ok(KeyLayout::new(table, q_start, q_keys, 1, n)?)
    }

    /// [B, 1, T, T] additive attention bias: 0 where a query may attend a key, -inf elsewhere.
    /// Keys must be in the query's sequence and, by mode, at or before it (causal), anywhere
    /// (bidirectional), or in its block or an earlier one (block).
    pub(crate) fn attention_bias(&self, mode: AttentionMode, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.b, self.t);
        let mut bias = vec![f32::NEG_INFINITY; b * t * t];
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            let pos = &self.positions[r * t..(r + 1) * t];
            for i in 0..t {
                let row = &mut bias[(r * t + i) * t..(r * t + i + 1) * t];
                if seg[i] == 0 {
                    row[i] = 0.0;
                    continue;
                }
                for j in 0..t {
                    let visible = seg[j] == seg[i]
                        && match mode {
                            AttentionMode::Causal => j <= i,
                            AttentionMode::Bidirectional => true,
                            AttentionMode::Block(n) => pos[j] as usize / n <= pos[i] as usize / n,
                        };
                    if visible {
                        row[j] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?)
    }
}
