//! Combine stage: weight each expert output and add it back to its token row.
//!
//! out[n] = Σ_{assignments a of token n, ascending expert} weight[a] · y[a]

use candle_core::{Result, Tensor};

use super::dispatch::Dispatch;

/// y_AD in assignment order → out_ND (zero for tokens no expert took).
pub fn combine(y_AD: &Tensor, dispatch: &Dispatch, num_tokens: usize) -> Result<Tensor> {
    let w_A1 = dispatch.weight_A.to_dtype(y_AD.dtype())?.unsqueeze(1)?;
    let weighted_AD = y_AD.broadcast_mul(&w_A1)?;
    let d = y_AD.dim(1)?;
    Tensor::zeros((num_tokens, d), y_AD.dtype(), y_AD.device())?.index_add(&dispatch.token_A, &weighted_AD, 0)
}
