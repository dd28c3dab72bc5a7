//! The trainable parameters of a model, under transformers' in-memory names (experts fused:
//! `mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]; every other name
//! is the checkpoint's). `map_params` swaps every parameter for another tensor of the same
//! shape — the trainer uses it to put `Var`s in. The expert bias (`e_score_correction_bias`)
//! is a buffer, not a parameter.

use candle_core::{Result, Tensor};
use candle_nn::Embedding;

use crate::nn::linear::Linear;

use crate::model::{Mlp, MoeCausalLm};
use crate::nn::attention::Attention;
use crate::nn::mlp::SwiGlu;

type MapFn<'a> = dyn FnMut(&str, &Tensor) -> Result<Tensor> + 'a;

fn map_linear(f: &mut MapFn, name: &str, lin: &mut Linear) -> Result<()> {
    let w = f(&format!("{name}.weight"), lin.weight())?;
    let b = match lin.bias() {
        Some(b) => Some(f(&format!("{name}.bias"), b)?),
        None => None,
    };
    *lin = lin.with_params(w, b);
    Ok(())
}

fn map_tensor(f: &mut MapFn, name: &str, t: &mut Tensor) -> Result<()> {
    *t = f(name, t)?;
    Ok(())
}

fn map_swiglu(f: &mut MapFn, p: &str, m: &mut SwiGlu) -> Result<()> {
    map_linear(f, &format!("{p}.gate_proj"), &mut m.gate_proj)?;
    map_linear(f, &format!("{p}.up_proj"), &mut m.up_proj)?;
    map_linear(f, &format!("{p}.down_proj"), &mut m.down_proj)
}

fn map_attention(f: &mut MapFn, p: &str, a: &mut Attention) -> Result<()> {
    for (n, lin) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj), ("o_proj", &mut a.o_proj)] {
        map_linear(f, &format!("{p}.{n}"), lin)?;
    }
    if let Some(n) = &mut a.q_norm {
        map_tensor(f, &format!("{p}.q_norm.weight"), &mut n.weight)?;
    }
    if let Some(n) = &mut a.k_norm {
        map_tensor(f, &format!("{p}.k_norm.weight"), &mut n.weight)?;
    }
    Ok(())
}

impl MoeCausalLm {
    /// Replace every trainable parameter by `f(name, current)` (same shape expected).
    pub fn map_params(&mut self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        let f: &mut MapFn = &mut f;
        let hidden = self.cfg.hidden_size;
        let e = f("model.embed_tokens.weight", self.embed_tokens.embeddings())?;
        self.embed_tokens = Embedding::new(e, hidden);
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            map_tensor(f, &format!("{p}.input_layernorm.weight"), &mut layer.input_layernorm.weight)?;
            map_tensor(f, &format!("{p}.post_attention_layernorm.weight"), &mut layer.post_attention_layernorm.weight)?;
            map_attention(f, &format!("{p}.self_attn"), &mut layer.self_attn)?;
            match &mut layer.mlp {
                Mlp::Dense(m) => map_swiglu(f, &format!("{p}.mlp"), m)?,
                Mlp::Moe(b) => {
                    map_linear(f, &format!("{p}.mlp.gate"), &mut b.router.gate)?;
                    map_tensor(f, &format!("{p}.mlp.experts.gate_up_proj"), &mut b.experts.gate_up_proj)?;
                    map_tensor(f, &format!("{p}.mlp.experts.down_proj"), &mut b.experts.down_proj)?;
                    if let Some(s) = &mut b.shared {
                        let name = self.cfg.moe.shared_expert.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                        map_swiglu(f, &format!("{p}.mlp.{name}"), &mut s.mlp)?;
                        if let Some(g) = &mut s.gate {
                            map_linear(f, &format!("{p}.mlp.{name}_gate"), g)?;
                        }
                    }
                }
            }
        }
        map_tensor(f, "model.norm.weight", &mut self.norm.weight)?;
        if let Some(h) = &mut self.lm_head {
            map_linear(f, "lm_head", h)?;
        }
        Ok(())
    }

    /// Every trainable parameter with its in-memory name, in model order.
    pub fn named_params(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.map_params(|n, t| {
            out.push((n.to_string(), t.clone()));
            Ok(t.clone())
        })?;
        Ok(out)
    }
}
