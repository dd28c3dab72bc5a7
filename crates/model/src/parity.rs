//! Parity against a golden reference dumped from transformers, laid out like
//! `testdata/fixtures/*/reference.safetensors` (made by `testdata/fixtures/make_fixtures.py`):
//! logits; per MoE layer the router probabilities, top-k ids and weights; a perturbed-router
//! free-routing case; and a replay case (perturbed routers, experts forced to the unperturbed
//! capture, weights recomputed from the live router).
//!
//! `L` in reference names counts MoE layers in model order; it maps to decoder layer
//! `cfg.moe_layers[L]`. Relative error of a tensor = max|ours − ref| / max|ref|.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::batch::Batch;
use crate::error::{ModelError, Result};
use crate::model::MoeCausalLm;
use crate::routing::{Recording, Replay, ReplayWeights, RouteMode, RoutingPlan};

/// One compared quantity.
#[derive(Debug, Clone)]
pub struct Check {
    pub case: String,
    pub quantity: String,
    pub max_abs: f64,
    pub max_rel: f64,
    /// For expert ids: share of token rows whose ids match exactly (in selection order).
    pub agreement: Option<f64>,
    pub pass: bool,
}

#[derive(Debug, Clone)]
pub struct ParityReport {
    pub checks: Vec<Check>,
    /// (token, layer) routes whose expert set changed after the perturbation, ours.
    pub changed_routes: usize,
    pub total_routes: usize,
    /// The same count as the reference's `reference.json` states it, if present.
    pub reference_changed_routes: Option<usize>,
    /// How far the two counts may differ: 0 at full route agreement.
    pub changed_routes_slack: usize,
}

impl ParityReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
            && self.changed_routes > 0
            && self.reference_changed_routes.is_none_or(|r| r.abs_diff(self.changed_routes) <= self.changed_routes_slack)
    }
}

struct Reference {
    file: String,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            dir: self.file.clone().into(),
            tensor: name.to_string(),
            msg: "missing from the reference file".into(),
        })
    }
}

/// max|a − b| and max|a − b| / max|b| over all elements.
pub fn rel_error(ours: &Tensor, reference: &Tensor) -> Result<(f64, f64)> {
    let a = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
    let b = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
    if a.dims() != b.dims() {
        return Err(ModelError::batch("reference", format!("{} elements vs {} in the reference", a.elem_count(), b.elem_count())));
    }
    let max_abs = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok((max_abs, if scale > 0.0 { max_abs / scale } else { max_abs }))
}

fn float_check(case: &str, quantity: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> Result<Check> {
    if ours.elem_count() != reference.elem_count() {
        return Err(ModelError::batch(quantity, format!("shape {:?} vs reference {:?}", ours.dims(), reference.dims())));
    }
    let (max_abs, max_rel) = rel_error(ours, reference)?;
    Ok(Check { case: case.into(), quantity: quantity.into(), max_abs, max_rel, agreement: None, pass: max_rel <= tol })
}

fn id_rows(t: &Tensor) -> Result<Vec<Vec<i64>>> {
    let k = t.dim(1)?;
    let v: Vec<i64> = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    Ok(v.chunks(k).map(<[i64]>::to_vec).collect())
}

/// Rows of ids and of their weights, each row sorted by id when `as_sets` (routers that select
/// with `topk(sorted=False)`: only the set is defined), weights carried along.
fn canonical(ids: &Tensor, weights: &Tensor, as_sets: bool) -> Result<(Vec<Vec<i64>>, Tensor)> {
    let rows = id_rows(ids)?;
    let w: Vec<f32> = weights.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let k = ids.dim(1)?;
    let (mut out_ids, mut out_w) = (Vec::with_capacity(rows.len()), Vec::with_capacity(w.len()));
    for (r, row) in rows.iter().enumerate() {
        let mut idx: Vec<usize> = (0..k).collect();
        if as_sets {
            idx.sort_by_key(|&j| row[j]);
        }
        out_ids.push(idx.iter().map(|&j| row[j]).collect());
        out_w.extend(idx.iter().map(|&j| w[r * k + j]));
    }
    let n = out_ids.len();
    Ok((out_ids, Tensor::from_vec(out_w, (n, k), &Device::Cpu)?))
}

fn ids_check(case: &str, quantity: &str, a: &[Vec<i64>], b: &[Vec<i64>], min_agreement: f64) -> Result<Check> {
    if a.len() != b.len() || a.first().map(Vec::len) != b.first().map(Vec::len) {
        return Err(ModelError::batch(quantity, format!("{} rows vs {} in the reference", a.len(), b.len())));
    }
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    let agreement = same as f64 / a.len().max(1) as f64;
    let wrong = (a.len() - same) as f64;
    let pass = same == a.len() || agreement >= min_agreement;
    Ok(Check { case: case.into(), quantity: quantity.into(), max_abs: wrong, max_rel: wrong, agreement: Some(agreement), pass })
}

/// ids (exact, or as sets) and the weights that go with them.
#[allow(clippy::too_many_arguments)]
fn route_checks(
    case: &str,
    ids_name: &str,
    weights_name: Option<&str>,
    route: &crate::routing::LayerRoute,
    r: &Reference,
    as_sets: bool,
    tol: Tolerance,
    out: &mut Vec<Check>,
) -> Result<()> {
    let (ours_ids, ours_w) = canonical(&route.ids_NK()?, &route.weights_NK()?, as_sets)?;
    let ref_ids = r.get(ids_name)?;
    let ref_w = match weights_name {
        Some(w) => r.get(w)?.clone(),
        None => Tensor::zeros(ref_ids.dims(), DType::F32, &Device::Cpu)?,
    };
    let (theirs_ids, theirs_w) = canonical(ref_ids, &ref_w, as_sets)?;
    let suffix = if as_sets { " (as sets)" } else { "" };
    out.push(ids_check(case, &format!("{ids_name}{suffix}"), &ours_ids, &theirs_ids, tol.min_route_agreement)?);
    if let Some(w) = weights_name {
        // weights are compared on the rows whose experts agree (all rows, when the ids pass at
        // full agreement)
        let rows: Vec<u32> =
            ours_ids.iter().zip(&theirs_ids).enumerate().filter(|(_, (a, b))| a == b).map(|(i, _)| i as u32).collect();
        let quantity = if rows.len() == ours_ids.len() { w.to_string() } else { format!("{w} (rows with equal ids)") };
        let keep = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        let (ours_w, theirs_w) = (ours_w.index_select(&keep, 0)?, theirs_w.index_select(&keep, 0)?);
        out.push(float_check(case, &quantity, &ours_w, &theirs_w, tol.rel)?);
    }
    Ok(())
}

fn changed_sets(a: &Tensor, b: &Tensor) -> Result<usize> {
    let sorted = |t: &Tensor| -> Result<Vec<Vec<i64>>> {
        Ok(id_rows(t)?.into_iter().map(|mut r| {
            r.sort_unstable();
            r
        }).collect())
    };
    Ok(sorted(a)?.iter().zip(sorted(b)?.iter()).filter(|(x, y)| x != y).count())
}

/// Router checks of one layer. A reference's `router_probs` holds, depending on the
/// transformers version that dumped it, either the probabilities (rows on the simplex) or the raw
/// router logits (transformers 5.17's softmax routers return their logits first); the latter is
/// compared against our logits, and its softmax against our probabilities. When a separate
/// `router_logits` tensor is present (sigmoid routers), `router_probs` holds the scores and both
/// are compared directly.
fn router_checks(route: &crate::routing::LayerRoute, r: &Reference, li: usize, tol: f64) -> Result<Vec<Check>> {
    let name = format!("layer{li}.router_probs");
    let reference = r.get(&name)?.to_dtype(DType::F32)?;
    let mut out = Vec::new();
    let min = reference.flatten_all()?.min(0)?.to_scalar::<f32>()?;
    let row_sums: Vec<f32> = reference.sum(1)?.to_vec1()?;
    let on_simplex = min >= 0.0 && row_sums.iter().all(|s| (s - 1.0).abs() < 1e-4);
    let has_logits = r.tensors.contains_key(&format!("layer{li}.router_logits"));
    if on_simplex || has_logits {
        out.push(float_check("forward", &name, &route.scores_NE, &reference, tol)?);
    } else {
        out.push(float_check("forward", &format!("{name} (ref = logits)"), &route.logits_NE, &reference, tol)?);
        let probs = candle_nn::ops::softmax(&reference, 1)?;
        out.push(float_check("forward", &format!("{name} (softmax of ref)"), &route.scores_NE, &probs, tol)?);
    }
    if let Some(logits) = r.tensors.get(&format!("layer{li}.router_logits")) {
        out.push(float_check("forward", &format!("layer{li}.router_logits"), &route.logits_NE, logits, tol)?);
    }
    Ok(out)
}

/// What `run_reference_with` accepts.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// largest max|ours − ref| / max|ref| of every float quantity
    pub rel: f64,
    /// the same for the free-routing cases ("forward", "perturbed"): in bf16 a near-tie that
    /// rounds the other way sends a token to another expert, and everything after it differs
    pub rel_free: f64,
    /// smallest fraction of tokens whose experts must equal the reference's (1 in f32; bf16
    /// rounding flips near-ties, see README "GPU")
    pub min_route_agreement: f64,
}

/// Run every case of a reference file against `model` (f32) with relative tolerance `tol` and
/// every route equal to the reference's.
pub fn run_reference(model: &MoeCausalLm, reference: &Path, tol: f64) -> Result<ParityReport> {
    run_reference_with(model, reference, Tolerance { rel: tol, rel_free: tol, min_route_agreement: 1.0 })
}

/// `run_reference` under any tolerance (e.g. a bf16 model).
pub fn run_reference_with(model: &MoeCausalLm, reference: &Path, tol: Tolerance) -> Result<ParityReport> {
    let file = reference.display().to_string();
    let tensors = candle_core::safetensors::load(reference, &Device::Cpu)
        .map_err(|e| ModelError::WeightFile { path: reference.into(), msg: e.to_string() })?;
    let r = Reference { file, tensors };
    let dev = model.device();
    let ids = r.get("input_ids")?.to_dtype(DType::U32)?;
    let (b, t) = ids.dims2()?;
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let batch = Batch::padded(&rows, &vec![vec![1u8; t]; b], dev)?;
    let moe_layers = model.cfg.moe_layers.clone();
    if model.cfg.moe.router.strategy != crate::config::RoutingStrategy::TokenChoice {
        return Err(ModelError::batch("routing_strategy", "reference dumps are token-choice; verify a token-choice config"));
    }
    // sigmoid routers select with topk(sorted=False) in transformers: compare ids as sets
    let as_sets = model.cfg.moe.router.score_function == crate::config::ScoreFunction::Sigmoid;
    let mut checks = Vec::new();
    let free = Tolerance { rel: tol.rel_free, ..tol };
    let tol_free = free;

    // 1. plain forward, recorded
    let out = model.forward(&batch, &RoutingPlan::record())?;
    checks.push(float_check("forward", "logits", &out.logits, r.get("logits")?, tol.rel_free)?);
    for (li, &layer) in moe_layers.iter().enumerate() {
        let route = &out.routes[&layer];
        let q = |s: &str| format!("layer{li}.{s}");
        checks.extend(router_checks(route, &r, li, tol.rel_free)?);
        route_checks("forward", &q("topk_idx"), Some(&q("topk_weights")), route, &r, as_sets, free, &mut checks)?;
    }

    // 2. perturbed routers, free routing
    let mut perturbed = model.clone();
    for (li, &layer) in moe_layers.iter().enumerate() {
        let w = r.get(&format!("perturbed.layer{li}.router_weight"))?.to_dtype(model.dtype())?.to_device(dev)?;
        let block = perturbed.moe_block_checked_mut(layer)?;
        if w.dims() != block.router.gate.weight().dims() {
            return Err(ModelError::batch(
                &format!("perturbed.layer{li}.router_weight"),
                format!("shape {:?}, router is {:?}", w.dims(), block.router.gate.weight().dims()),
            ));
        }
        block.router.gate = block.router.gate.with_params(w, None);
    }
    let free = perturbed.forward(&batch, &RoutingPlan::record())?;
    checks.push(float_check("perturbed", "free_logits", &free.logits, r.get("perturbed.free_logits")?, tol.rel_free)?);
    let mut changed = 0;
    for (li, &layer) in moe_layers.iter().enumerate() {
        let q = format!("perturbed.layer{li}.free_topk_idx");
        route_checks("perturbed", &q, None, &free.routes[&layer], &r, as_sets, tol_free, &mut checks)?;
        changed += changed_sets(&free.routes[&layer].ids_NK()?, &out.routes[&layer].ids_NK()?)?;
    }

    // 3. replay: perturbed routers, experts forced to the reference's unperturbed capture
    let mut plan = RoutingPlan::compute();
    for (li, &layer) in moe_layers.iter().enumerate() {
        let forced = r.get(&format!("layer{li}.topk_idx"))?.to_dtype(DType::U32)?.to_device(dev)?;
        plan = plan.with_layer(layer, RouteMode::Replay(Replay::top_k(forced, ReplayWeights::Recompute)));
    }
    let replay = perturbed.forward(&batch, &plan)?;
    checks.push(float_check("replay", "logits", &replay.logits, r.get("replay.logits")?, tol.rel)?);
    for (li, &layer) in moe_layers.iter().enumerate() {
        // replayed ids are the reference's forced ids, in the reference's order
        let q = format!("replay.layer{li}.topk_weights");
        checks.push(float_check("replay", &q, &replay.routes[&layer].weights_NK()?, r.get(&q)?, tol.rel)?);
    }

    let reference_changed_routes = reference
        .parent()
        .map(|d| d.join("reference.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("tokens_with_changed_routing_after_perturbation")?.as_u64())
        .map(|v| v as usize);
    Ok(ParityReport {
        checks,
        changed_routes: changed,
        total_routes: b * t * moe_layers.len(),
        reference_changed_routes,
        changed_routes_slack: ((1.0 - tol.min_route_agreement) * (b * t * moe_layers.len()) as f64).floor() as usize,
    })
}

/// Largest |a − b| between two recordings' logits or any tensor pair (0 means bitwise equal
/// values, NaNs aside).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Unused layers of a recording are an error for callers that expect every MoE layer.
pub fn expect_all_layers(model: &MoeCausalLm, rec: &Recording) -> Result<()> {
    for &l in &model.cfg.moe_layers {
        if !rec.contains_key(&l) {
            return Err(ModelError::routing(l, "missing from the recording"));
        }
    }
    Ok(())
}
