//! How big the paged KV cache is: block size, number of blocks (given, or sized from the
//! device's memory), the token budget of one step (chunked prefill), and prefix caching.

use candle_core::{DType, Device};
use lockstep_model::{KvPool, ModelConfig};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// tokens per block (default 16)
    pub block_size: usize,
    /// blocks in the pool; `None`: room for `max_running` sequences of `max_model_len` tokens,
    /// at most what memory allows (on a GPU `gpu_memory_fraction` of its memory less what is in
    /// use when the pool is made; on the CPU 512 MiB)
    pub num_blocks: Option<usize>,
    /// the longest sequence (prompt + completion) the pool is sized for (default 32,768)
    pub max_model_len: usize,
    /// share of the GPU's total memory the process may fill, weights and activations in use
    /// included (default 0.85)
    pub gpu_memory_fraction: f64,
    /// most tokens one step forwards (prompt chunks + decode tokens; default 8,192): a longer
    /// prompt is prefilled over several steps
    pub max_batched_tokens: usize,
    /// keep full blocks of finished sequences for later prompts with the same prefix, and share
    /// one prompt's blocks among the samples of a group (default on)
    pub prefix_caching: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { block_size: 16, num_blocks: None, max_model_len: 32_768, gpu_memory_fraction: 0.85, max_batched_tokens: 8192, prefix_caching: true }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(EngineError::Request { id: 0, field: field.into(), msg });
        if self.block_size == 0 || self.block_size > 1024 {
            return bad("block_size", format!("{}: must be in 1..=1024", self.block_size));
        }
        if self.num_blocks == Some(0) {
            return bad("num_blocks", "must be >= 1".into());
        }
        if !(self.gpu_memory_fraction > 0.0 && self.gpu_memory_fraction <= 1.0) {
            return bad("gpu_memory_fraction", format!("{}: must be in (0, 1]", self.gpu_memory_fraction));
        }
        if self.max_model_len == 0 {
            return bad("max_model_len", "must be >= 1".into());
        }
        if self.max_batched_tokens == 0 {
            return bad("max_batched_tokens", "must be >= 1".into());
        }
        Ok(())
    }

    /// The number of blocks to allocate for a model on `device`.
    pub fn blocks_for(&self, cfg: &ModelConfig, dtype: DType, device: &Device, max_running: usize) -> Result<usize> {
        if let Some(n) = self.num_blocks {
            return Ok(n);
        }
        let per_block = KvPool::bytes_per_block(cfg, dtype, self.block_size).max(1);
        let budget = match lockstep_model::memory_info(device)? {
            Some((free, total)) => free.saturating_sub(((1.0 - self.gpu_memory_fraction) * total as f64) as usize),
            None => 512 << 20,
        };
        let want = max_running.max(1) * self.max_model_len.div_ceil(self.block_size);
        let n = (budget / per_block).min(want);
        if n == 0 {
            return Err(EngineError::Request {
                id: 0,
                field: "gpu_memory_fraction".into(),
                msg: format!("no room for one KV block ({per_block} bytes) after the weights; raise it or free memory"),
            });
        }
        Ok(n)
    }
}
