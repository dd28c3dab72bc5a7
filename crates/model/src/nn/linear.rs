//! Linear layer `y = x·Wᵀ (+ b)` with a kernel switch: candle's matmul (gradients, fast), or
//! the batch-invariant kernel (`nn::invariant`) that makes engine and trainer agree bit for bit.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::invariant::matmul_nt;
use super::Kernels;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    kernels: Kernels,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, kernels: Kernels::Autograd }
    }
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
    }
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
    /// y plus the bias, if any (broadcast over the rows): the end of [`Module::forward`], for
    /// callers that computed x · Wᵀ another way.
    pub fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    /// Same parameters, other tensors (keeps the kernel choice).
    pub fn with_params(&self, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, kernels: self.kernels }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.kernels {
            Kernels::Invariant => matmul_nt(x, &self.weight)?,
            _ => match x.dims() {
                [b, _, _] => x.matmul(&self.weight.broadcast_left(*b)?.t()?)?,
                _ => x.matmul(&self.weight.t()?)?,
            },
        };
        self.add_bias(y)
    }
}

pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}
