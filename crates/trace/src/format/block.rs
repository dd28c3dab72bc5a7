//! One sequence block: encode / decode with CRC32 over the body.

use super::{magic_str, BLOCK_MAGIC};
use crate::bytes::{put_u32, put_u64, Cursor};
use crate::codec::{self, IdCodec};
use crate::error::{Result, TraceError};
use crate::probs::{ProbDtype, Probs};
use crate::trace::{RouteTrace, TraceMeta};

/// Bounds on what a decoder will allocate (protects against tiny inputs that claim huge shapes).
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest number of ids (including rows of missing tokens) one block may expand to.
    pub max_ids: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_ids: 1 << 31 }
    }
}

/// Serialises one trace as a block (magic, length, body, CRC32) using the most compact codec.
pub fn encode_block(trace: &RouteTrace) -> Vec<u8> {
    let meta = &trace.meta;
    let codec = IdCodec::choose(meta);
    let mut body = Vec::with_capacity(64 + trace.ids.len() * 2);
    put_u32(&mut body, meta.num_experts);
    put_u32(&mut body, meta.top_k);
    put_u32(&mut body, trace.num_tokens as u32);
    put_u32(&mut body, meta.prompt_len);
    put_u64(&mut body, meta.fingerprint);
    put_u64(&mut body, meta.policy_version);
    let flags = (meta.ordered as u8) | ((trace.probs.is_some() as u8) << 1);
    body.push(flags);
    body.push(codec as u8);
    body.push(trace.probs.as_ref().map(|p| p.dtype().code()).unwrap_or(0));
    body.push(0);
    put_u32(&mut body, trace.layers.len() as u32);
    for &l in &trace.layers {
        put_u32(&mut body, l);
    }
    let mut bitmap = vec![0u8; trace.num_tokens.div_ceil(8)];
    for (t, &m) in trace.missing.iter().enumerate() {
        if m {
            bitmap[t / 8] |= 1 << (t % 8);
        }
    }
    body.extend_from_slice(&bitmap);
    let ids = codec::encode(codec, meta, trace.layers.len(), &trace.missing, trace.offsets.as_deref(), &trace.ids);
    put_u64(&mut body, ids.len() as u64);
    body.extend_from_slice(&ids);
    let mut probs = Vec::new();
    if let Some(p) = &trace.probs {
        for t in 0..trace.num_tokens {
            if trace.missing[t] || trace.layers.is_empty() {
                continue;
            }
            let start = trace.row_range(t, 0).start;
            for i in start..start + row_span(trace, t) {
                p.put_le(i, &mut probs);
            }
        }
    }
    put_u64(&mut body, probs.len() as u64);
    body.extend_from_slice(&probs);

    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(BLOCK_MAGIC);
    put_u64(&mut out, body.len() as u64);
    out.extend_from_slice(&body);
    put_u32(&mut out, crc32fast::hash(&body));
    out
}

/// Decodes one block from the start of `data`; returns the trace and the block's length.
/// `ctx` prefixes field names in errors (e.g. `block[4]`).
pub fn decode_block(data: &[u8], ctx: &str, limits: DecodeLimits) -> Result<(RouteTrace, usize)> {
    let mut c = Cursor::new(data, ctx);
    let magic = c.take(4, "magic")?;
    if magic != BLOCK_MAGIC {
        return Err(TraceError::BadMagic {
            field: c.field("magic"),
            expected: magic_str(BLOCK_MAGIC),
            found: magic_str(magic),
        });
    }
    let body_len = c.len_u64("body_len")?;
    let body = c.take(body_len, "body")?;
    let stored = c.u32("crc32")?;
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(TraceError::Checksum { field: c.field("crc32"), stored, computed });
    }
    let total = 4 + 8 + body_len + 4;
    let trace = decode_body(body, ctx, limits)?;
    Ok((trace, total))
}

fn decode_body(body: &[u8], ctx: &str, limits: DecodeLimits) -> Result<RouteTrace> {
    let mut c = Cursor::new(body, ctx);
    let num_experts = c.u32("num_experts")?;
    let top_k = c.u32("top_k")?;
    let num_tokens = c.u32("num_tokens")? as usize;
    let prompt_len = c.u32("prompt_len")?;
    let fingerprint = c.u64("fingerprint")?;
    let policy_version = c.u64("policy_version")?;
    let flags = c.u8("flags")?;
    if flags & !3 != 0 {
        return Err(TraceError::invalid(c.field("flags"), format!("unknown flag bits {flags:#04x}")));
    }
    let codec_byte = c.u8("codec")?;
    let codec = IdCodec::from_code(codec_byte)
        .ok_or_else(|| TraceError::invalid(c.field("codec"), format!("unknown codec {codec_byte}")))?;
    let dtype_byte = c.u8("prob_dtype")?;
    let has_probs = flags & 2 != 0;
    let dtype = match (has_probs, dtype_byte) {
        (false, 0) => None,
        (true, d) => Some(
            ProbDtype::from_code(d)
                .ok_or_else(|| TraceError::invalid(c.field("prob_dtype"), format!("unknown dtype {d}")))?,
        ),
        (false, d) => return Err(TraceError::invalid(c.field("prob_dtype"), format!("{d} without has_probs flag"))),
    };
    let reserved = c.u8("reserved")?;
    if reserved != 0 {
        return Err(TraceError::invalid(c.field("reserved"), "must be 0"));
    }
    let meta = TraceMeta { num_experts, top_k, prompt_len, fingerprint, policy_version, ordered: flags & 1 != 0 };
    let num_layers = c.u32("num_layers")? as usize;
    if num_layers.saturating_mul(4) > c.remaining() {
        return Err(TraceError::Truncated {
            field: c.field("layers"),
            need: num_layers as u64 * 4,
            have: c.remaining() as u64,
        });
    }
    let mut layers = Vec::with_capacity(num_layers);
    for _ in 0..num_layers {
        layers.push(c.u32("layers")?);
    }
    let bitmap = c.take(num_tokens.div_ceil(8), "missing")?;
    let missing: Vec<bool> = (0..num_tokens).map(|t| bitmap[t / 8] >> (t % 8) & 1 == 1).collect();
    if num_tokens % 8 != 0 && bitmap.last().is_some_and(|&b| b >> (num_tokens % 8) != 0) {
        return Err(TraceError::invalid(c.field("missing"), "bits set past num_tokens"));
    }
    let ids_len = c.len_u64("ids_len")?;
    let ids_data = c.take(ids_len, "ids")?;
    let probs_len = c.len_u64("probs_len")?;
    let probs_data = c.take(probs_len, "probs")?;
    c.finish("probs")?;

    // cheap metadata checks before any large allocation
    let mut shell =
        RouteTrace { meta: meta.clone(), layers, num_tokens, missing, offsets: None, ids: Vec::new(), probs: None };
    shell.validate_meta().map_err(|e| prefix(e, ctx))?;
    {
        let cells = (num_tokens as u64).checked_mul(num_layers as u64).and_then(|x| x.checked_mul(top_k.max(1) as u64));
        match cells {
            Some(n) if n <= limits.max_ids => {}
            _ => {
                return Err(TraceError::invalid(
                    format!("{ctx}.num_tokens"),
                    format!(
                        "{num_tokens} tokens x {num_layers} layers x {top_k} exceeds the decode limit of {} ids",
                        limits.max_ids
                    ),
                ))
            }
        }
    }
    let field = format!("{ctx}.ids");
    let dec = codec::decode(codec, &meta, num_layers, &shell.missing, ids_data, &field)?;
    shell.ids = dec.ids;
    shell.offsets = dec.offsets;
    if let Some(dt) = dtype {
        let present: usize = (0..num_tokens).filter(|&t| !shell.missing[t]).map(|t| row_span(&shell, t)).sum();
        let want = present as u128 * dt.size() as u128;
        if probs_data.len() as u128 != want {
            return Err(TraceError::shape(
                format!("{ctx}.probs"),
                vec![probs_data.len()],
                format!("{want} bytes ({present} ids x {} bytes)", dt.size()),
            ));
        }
        let mut p = Probs::zeros(dt, shell.ids.len());
        let mut chunks = probs_data.chunks_exact(dt.size());
        for t in 0..num_tokens {
            if shell.missing[t] || num_layers == 0 {
                continue;
            }
            let start = shell.row_range(t, 0).start;
            for i in start..start + row_span(&shell, t) {
                if let Some(b) = chunks.next() {
                    p.set_le(i, b);
                }
            }
        }
        shell.probs = Some(p);
    } else if !probs_data.is_empty() {
        return Err(TraceError::invalid(format!("{ctx}.probs"), "probability bytes without has_probs flag"));
    }
    if dec.needs_row_check || (!meta.ordered && codec != IdCodec::Subset) {
        let before = shell.ids.clone();
        shell.validate().map_err(|e| prefix(e, ctx))?;
        if shell.ids != before {
            return Err(TraceError::invalid(format!("{ctx}.ids"), "unordered trace with rows not in ascending order"));
        }
    }
    Ok(shell)
}

/// Number of ids of token `t` (all layers).
fn row_span(t: &RouteTrace, tok: usize) -> usize {
    let nl = t.layers.len();
    if nl == 0 {
        return 0;
    }
    t.row_range(tok, nl - 1).end - t.row_range(tok, 0).start
}

fn prefix(e: TraceError, ctx: &str) -> TraceError {
    if ctx.is_empty() {
        return e;
    }
    match e {
        TraceError::Invalid { field, msg } => TraceError::Invalid { field: format!("{ctx}.{field}"), msg },
        TraceError::Shape { field, found, expected } => {
            TraceError::Shape { field: format!("{ctx}.{field}"), found, expected }
        }
        TraceError::ExpertOutOfRange { field, id, num_experts } => {
            TraceError::ExpertOutOfRange { field: format!("{ctx}.{field}"), id, num_experts }
        }
        other => other,
    }
}
