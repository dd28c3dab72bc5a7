//! Gradient parity with PyTorch on a training reference laid out like
//! `testdata/fixtures/*/grads.safetensors` (made by `testdata/fixtures/make_fixtures.py`):
//! routers perturbed (`perturbed.layerL.router_weight` from the reference dump), experts forced
//! to the unperturbed capture (`layerL.topk_idx`) with live recomputed weights, and
//!
//! ```text
//! loss = −Σ mask · adv · logp / Σ mask,  logp[b, t] = log_softmax(logits[b, t])[ids[b, t+1]]
//! ```
//!
//! Compared: the loss, the token log-probabilities and every parameter's gradient under
//! transformers' in-memory names (fused experts). A replay that detached the router would fail
//! on `mlp.gate.weight`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lockstep_model::parity::{rel_error, Check};
use lockstep_model::{Batch, MoeCausalLm, Replay, ReplayWeights, RouteMode, RoutingPlan};

use crate::error::{Result, TrainError};
use crate::logprobs::token_logprobs;

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TrainError::File {
        file: path.display().to_string(),
        what: "safetensors".into(),
        msg: e.to_string(),
    })
}

fn get<'a>(m: &'a HashMap<String, Tensor>, file: &Path, name: &str) -> Result<&'a Tensor> {
    m.get(name).ok_or_else(|| TrainError::File {
        file: file.display().to_string(),
        what: format!("tensor `{name}`"),
        msg: "missing".into(),
    })
}

fn check(quantity: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> Result<Check> {
    if ours.elem_count() != reference.elem_count() {
        return Err(TrainError::input(quantity, format!("shape {:?}, reference {:?}", ours.dims(), reference.dims())));
    }
    let (max_abs, max_rel) = rel_error(ours, &reference.reshape(ours.dims())?)?;
    Ok(Check { case: "grads".into(), quantity: quantity.into(), max_abs, max_rel, agreement: None, pass: max_rel <= tol })
}

/// Run the training reference `grads` (with the forward reference `reference` for inputs,
/// perturbed routers and forced ids) against `model` (f32).
pub fn run_grads_reference(model: &MoeCausalLm, grads: &Path, reference: &Path, tol: f64) -> Result<Vec<Check>> {
    let g = load(grads)?;
    let r = load(reference)?;
    let dev = model.device().clone();
    let moe = model.cfg.moe_layers.clone();
    let perturbed: HashMap<String, Tensor> = moe
        .iter()
        .enumerate()
        .map(|(li, &l)| {
            let w = get(&r, reference, &format!("perturbed.layer{li}.router_weight"))?.to_device(&dev)?;
            Ok((format!("model.layers.{l}.mlp.gate.weight"), w))
        })
        .collect::<Result<_>>()?;
    // every parameter becomes a Var; routers take the perturbed weights
    let mut m = model.clone();
    let mut vars: Vec<(String, Var)> = Vec::new();
    m.map_params(|name, t| {
        let src = perturbed.get(name).unwrap_or(t);
        let v = Var::from_tensor(&src.to_dtype(DType::F32)?)?;
        vars.push((name.to_string(), v.clone()));
        Ok(v.as_tensor().clone())
    })?;

    let ids = get(&r, reference, "input_ids")?.to_dtype(DType::U32)?;
    let (b, t) = ids.dims2()?;
    let batch = Batch::padded(&ids.to_vec2()?, &vec![vec![1u8; t]; b], &dev)?;
    let mut plan = RoutingPlan::compute();
    for (li, &l) in moe.iter().enumerate() {
        let forced = get(&r, reference, &format!("layer{li}.topk_idx"))?.to_dtype(DType::U32)?.to_device(&dev)?;
        plan = plan.with_layer(l, RouteMode::Replay(Replay::top_k(forced, ReplayWeights::Recompute)));
    }
    let out = m.forward(&batch, &plan)?;
    let (logp_BT, _) = token_logprobs(&out.logits, &batch)?;
    // the reference aligns logp[b, t] with the prediction of token t + 1
    let logp = logp_BT.narrow(1, 1, t - 1)?;
    let adv = get(&g, grads, "advantages")?.to_device(&dev)?;
    let mask = get(&g, grads, "loss_mask")?.to_device(&dev)?;
    let loss = ((&mask * &adv)? * &logp)?.sum_all()?.neg()?.broadcast_div(&mask.sum_all()?)?;
    let mut checks = vec![
        check("loss", &loss, get(&g, grads, "loss")?, tol)?,
        check("token_logprobs", &logp, get(&g, grads, "token_logprobs")?, tol)?,
    ];
    let store = loss.backward()?;
    for (name, var) in &vars {
        let reference = get(&g, grads, &format!("grad.{name}"))?;
        let ours = match store.get(var.as_tensor()) {
            Some(gr) => gr.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        checks.push(check(&format!("grad.{name}"), &ours, reference, tol)?);
    }
    let ours: std::collections::HashSet<String> = vars.iter().map(|(n, _)| format!("grad.{n}")).collect();
    if let Some(extra) = g.keys().find(|k| k.starts_with("grad.") && !ours.contains(*k)) {
        return Err(TrainError::File {
            file: grads.display().to_string(),
            what: format!("tensor `{extra}`"),
            msg: "a gradient for a parameter this model does not have".into(),
        });
    }
    Ok(checks)
}
