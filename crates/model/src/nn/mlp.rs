//! SwiGLU MLP: `down(silu(gate(x)) * up(x))`, the dense layers' MLP and the shared expert.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{linear_no_bias, Linear};
use super::Kernels;

#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl SwiGlu {
    pub fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }
}

impl SwiGlu {
    pub fn set_kernels(&mut self, k: Kernels) {
        for l in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            l.set_kernels(k);
        }
    }
}

impl Module for SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.gate_proj.forward(x)?.silu()?.mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}
