//! The MoE expert stages on CUDA: dispatch → grouped GEMMs with SwiGLU → weighted combine, and
//! their backward, as candle custom ops (`ops`). Same stage boundaries as `crate::moe`, whose CPU
//! code stays the reference; `MoeBlock::forward` takes this path for CUDA tensors (under the
//! batch-invariant kernels: the plan's gather and combine around `invariant`'s products).
//!
//! - `plan`: the dispatch plan, computed on the device from the routing decision;
//! - `gemm`: per-expert GEMMs through cuBLAS (grouped, padded strided-batched, or a loop);
//! - `grouped_bwd`: the invariant grouped product's backward as two cuBLAS grouped GEMMs;
//! - `ops`: the custom ops with their backward;
//! - `route`: token-choice top-k, expert-choice selection and replay checks on the device;
//! - `invariant`: the batch-invariant matmul and attention (`crate::nn::invariant` on CUDA);
//! - `paged`: the paged KV cache's writes and the variable-length attention (`crate::nn::varlen`);
//! - `flash`: the tensor-core bf16 variable-length attention (`crate::nn::varlen` in bf16);
//! - `sample`: the Gumbel-max draw of a step's tokens (`crate::gumbel`);
//! - `head`: the LM head's log-prob / entropy surrogate and its gradient (`crate::head_grad`);
//! - `norm`, `rope`: the fused RMSNorm and rotary embedding (`crate::nn::norm`, `crate::nn::rope`);
//! - `accumulate`: in-place f32 gradient sums (`crate::accumulate`);
//! - `adamw`: the AdamW update's in-place element-wise ops (`crate::adamw`);
//! - `swiglu`: the experts' fused SwiGLU and its backward (`crate::nn::swiglu`);
//! - `kernels.cu`, `route.cu`, `invariant.cu`, `paged.cu`, `sample.cu`, `flash.cu`, `head.cu`,
//!   `norm.cu`, `rope.cu`, `accumulate.cu`, `adamw.cu`: the kernels (compiled to PTX by build.rs).
//!
//! Legend: N tokens, D hidden, F expert intermediate, E experts, A assignments, R rows.

pub(crate) mod accumulate;
pub(crate) mod adamw;
pub(crate) mod flash;
pub(crate) mod gemm;
pub(crate) mod grouped_bwd;
pub(crate) mod head;
pub(crate) mod invariant;
pub(crate) mod norm;
pub(crate) mod ops;
pub(crate) mod paged;
pub(crate) mod plan;
pub(crate) mod rope;
pub(crate) mod route;
pub(crate) mod sample;
pub(crate) mod swiglu;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchArgs};
use candle_core::{CudaDevice, DType, Result, Tensor};


const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_kernels.ptx"));
const MODULE: &str = "lockstep_moe";
const ROUTE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/route_kernels.ptx"));
const ROUTE_MODULE: &str = "lockstep_route";
const INVARIANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/invariant_kernels.ptx"));
const INVARIANT_MODULE: &str = "lockstep_invariant";
const PAGED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_kernels.ptx"));
const PAGED_MODULE: &str = "lockstep_paged";
const SAMPLE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample_kernels.ptx"));
const SAMPLE_MODULE: &str = "lockstep_sample";
const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_kernels.ptx"));
const FLASH_MODULE: &str = "lockstep_flash";
const HEAD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/head_kernels.ptx"));
const HEAD_MODULE: &str = "lockstep_head";
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_kernels.ptx"));
const NORM_MODULE: &str = "lockstep_norm";
const ROPE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope_kernels.ptx"));
const ROPE_MODULE: &str = "lockstep_rope";
const ACCUMULATE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/accumulate_kernels.ptx"));
const ACCUMULATE_MODULE: &str = "lockstep_accumulate";
const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw_kernels.ptx"));
const ADAMW_MODULE: &str = "lockstep_adamw";

/// A kernel of `kernels.cu`, launched on the device's stream.
pub(crate) struct Kernel {
    f: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.f)
    }

    /// Lets the kernel launch with `smem` bytes of dynamic shared memory (above the default 48 KiB).
    pub(crate) fn allow_smem(&self, smem: u32) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        use candle_core::cuda_backend::WrapErr;
        if smem > 48 * 1024 {
            self.f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
        }
        Ok(())
    }
}

/// A kernel of `kernels.cu`.
pub(crate) fn func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `route.cu`.
pub(crate) fn route_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, ROUTE_MODULE, ROUTE_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `invariant.cu`.
pub(crate) fn invariant_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, INVARIANT_MODULE, INVARIANT_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `sample.cu`.
pub(crate) fn sample_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, SAMPLE_MODULE, SAMPLE_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `flash.cu`.
pub(crate) fn flash_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, FLASH_MODULE, FLASH_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `head.cu`.
pub(crate) fn head_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, HEAD_MODULE, HEAD_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `norm.cu`.
pub(crate) fn norm_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, NORM_MODULE, NORM_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `rope.cu`.
pub(crate) fn rope_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, ROPE_MODULE, ROPE_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `accumulate.cu`.
pub(crate) fn accumulate_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, ACCUMULATE_MODULE, ACCUMULATE_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `adamw.cu`.
pub(crate) fn adamw_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, ADAMW_MODULE, ADAMW_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// A kernel of `paged.cu`.
pub(crate) fn paged_func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(name, PAGED_MODULE, PAGED_PTX)?.into_cuda_function();
    Ok(Kernel { f, stream: dev.cuda_stream() })
}

/// Keep freed device memory in the device's memory pool instead of handing it back to the
/// driver at every synchronisation (the pool's default release threshold is 0). candle
/// allocates through cudarc's stream-ordered `cuMemAllocAsync`; with the default, every copy
/// back to the host (the MoE plan's counts, a loss value) returns the pool's free memory and the
/// next large allocation maps it again. PyTorch's caching allocator keeps it likewise.
/// `LOCKSTEP_CUDA_POOL=release` keeps the driver default (for comparisons).
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    if std::env::var("LOCKSTEP_CUDA_POOL").is_ok_and(|v| v == "release") {
        return Ok(());
    }
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the device's context is bound to this thread (above) and `cu_device()` is its
    // device, so the pool is that device's default memory pool, live as long as the context;
    // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes a pointer to a cuuint64_t, and `threshold` is a
    // u64 that outlives the call.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device()).map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _)
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    }
    Ok(())
}

/// How the per-expert GEMMs are issued (see `gemm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmImpl {
    /// `Padded` when padding wastes at most half the rows (balanced routes, training-size
    /// batches), else `Grouped` (skewed routes, decode-size batches)
    #[default]
    Auto,
    /// one cuBLAS grouped GEMM call per product, compact rows
    Grouped,
    /// every expert padded to the largest expert's rows, one strided-batched GEMM per product
    Padded,
    /// one cuBLAS GEMM per expert
    Loop,
}

impl std::str::FromStr for GemmImpl {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "grouped" => Ok(Self::Grouped),
            "padded" => Ok(Self::Padded),
            "loop" => Ok(Self::Loop),
            other => Err(format!("unknown grouped GEMM implementation {other:?} (auto, grouped, padded, loop)")),
        }
    }
}

impl GemmImpl {
    /// `LOCKSTEP_MOE_GEMM` (auto | grouped | padded | loop), else `Auto`: read once per process
    /// (the experts backend is chosen when a model is built or its kernels set, never per call).
    pub fn from_env() -> Self {
        static CHOSEN: std::sync::OnceLock<GemmImpl> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| std::env::var("LOCKSTEP_MOE_GEMM").ok().and_then(|s| s.parse().ok()).unwrap_or_default())
    }
}

/// The experts stage of one layer on the GPU: x_ND and the layer's assignments → out_ND.
/// Carries gradients to x, the expert weights and the routing weights.
pub fn experts_forward(
    x_ND: &Tensor,
    token_A: &Tensor,
    expert_A: &Tensor,
    weight_A: &Tensor,
    gate_up_EFD: &Tensor,
    down_EDF: &Tensor,
    imp: GemmImpl,
) -> Result<Tensor> {
    let n = x_ND.dim(0)?;
    let e = gate_up_EFD.dim(0)?;
    let plan = Arc::new(plan::Plan::build(token_A, expert_A, n, e, imp)?);
    let (dtype, out_dtype) = (gate_up_EFD.dtype(), x_ND.dtype());
    let x_ND = x_ND.to_dtype(dtype)?.contiguous()?;
    // dispatch → gate_up → SwiGLU → down, one op (activations kept for its backward)
    let y_RD = x_ND.apply_op3(gate_up_EFD, down_EDF, ops::ExpertMlp::new(plan.clone()))?;
    // combine
    let w_A = weight_A.to_dtype(DType::F32)?.contiguous()?;
    y_RD.apply_op2(&w_A, ops::Combine(plan))?.to_dtype(out_dtype)
}

/// The experts stage on rows that arrive grouped by source, each source's rows grouped by
/// expert (expert parallelism, after the dispatch all-to-all): `counts_SE[s · E + e]` rows of
/// expert `e` from source `s`. Returns every row's expert output in arrival order (unweighted:
/// the weights are applied at home). The rows go through the same `ExpertMlp` op as
/// `experts_forward`, each expert's rows in the same order as on one device when the sources
/// are the ranks in order; when they already sit in that order (one source, compact layout)
/// neither the permute nor its inverse runs.
pub fn experts_rows(x_RD: &Tensor, counts_SE: &[usize], gate_up_EFD: &Tensor, down_EDF: &Tensor, imp: GemmImpl) -> Result<Tensor> {
    let dev = match x_RD.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => candle_core::bail!("experts_rows: not a CUDA tensor"),
    };
    let plan = Arc::new(plan::Plan::sorted_rows(&dev, counts_SE, gate_up_EFD.dim(0)?, imp)?);
    if plan.num_tokens != x_RD.dim(0)? {
        candle_core::bail!("experts_rows: {} rows, the counts say {}", x_RD.dim(0)?, plan.num_tokens);
    }
    let (dtype, out_dtype) = (gate_up_EFD.dtype(), x_RD.dtype());
    let x_RD = x_RD.to_dtype(dtype)?.contiguous()?;
    let y = x_RD.apply_op3(gate_up_EFD, down_EDF, ops::ExpertMlp::new(plan.clone()))?;
    let y_RD = if plan.identity { y } else { y.apply_op1(ops::Unpermute(plan))? };
    y_RD.to_dtype(out_dtype)
}

/// Assignments grouped on the device (expert parallelism: the groups are the experts, so the
/// owner ranks in order):
/// `gather` places every assignment's token row in its group, in stable assignment order, and
/// `combine` sums weighted group-ordered rows back per token — in ascending assignment order
/// and in f32, exactly as the local combine does — both with their backward.
#[derive(Debug, Clone)]
pub struct RowGroups(Arc<plan::Plan>);

impl RowGroups {
    /// `group_A` [A] u32 < `groups`; nothing comes back to the host (a deferred plan: the
    /// group sizes are copied back only when [`RowGroups::counts`] asks).
    pub fn new(token_A: &Tensor, group_A: &Tensor, num_tokens: usize, groups: usize) -> Result<Self> {
        Ok(Self(Arc::new(plan::Plan::build_deferred(token_A, group_A, num_tokens, groups)?)))
    }

    /// rows of each group (copied back and checked on first use)
    pub fn counts(&self) -> Result<&[usize]> {
        self.0.host_counts()
    }

    /// x_AD (the grouped rows) · w[g]ᵀ for each group's rows (w [G, N, K]) → y_AD: the
    /// batch-invariant grouped product (`nn::invariant::grouped_matmul_nt`'s bits), its tile
    /// table built on the device. Backward as `grouped_matmul_nt`'s (the counts come back then).
    pub fn grouped_matmul_nt(&self, x_AD: &Tensor, w_GNK: &Tensor) -> Result<Tensor> {
        x_AD.contiguous()?.apply_op2(&w_GNK.contiguous()?, PlannedGrouped(self.0.clone()))
    }

    /// x_ND → x_AD, grouped
    pub fn gather(&self, x_ND: &Tensor) -> Result<Tensor> {
        x_ND.contiguous()?.apply_op1(ops::Gather(self.0.clone()))
    }

    /// (y_AD grouped, weight_A in assignment order) → out_ND = Σ_a weight_a · y[row of a]
    pub fn combine(&self, y_AD: &Tensor, weight_A: &Tensor) -> Result<Tensor> {
        let w_A = weight_A.to_dtype(DType::F32)?.contiguous()?;
        y_AD.contiguous()?.apply_op2(&w_A, ops::Combine(self.0.clone()))
    }
}

/// The invariant grouped product over a deferred plan's groups (see [`RowGroups::grouped_matmul_nt`]).
struct PlannedGrouped(Arc<plan::Plan>);

impl candle_core::CustomOp2 for PlannedGrouped {
    fn name(&self) -> &'static str {
        "invariant-grouped-matmul-nt-planned"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("{}: CUDA only", self.name())
    }
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &candle_core::Layout, s2: &candle_core::CudaStorage, l2: &candle_core::Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        invariant::grouped_nt_planned(s1, l1, s2, l2, &self.0)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::nn::invariant::grouped_bwd(x, w, g, self.0.host_counts()?)
    }
}

thread_local! {
    /// The page-locked staging buffer of `to_host_f32`, per thread (candle's stream is too).
    static STAGE: std::cell::RefCell<Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>> = const { std::cell::RefCell::new(None) };
}

/// A contiguous f32 CUDA tensor to the host through the thread's page-locked staging buffer.
pub(crate) fn to_host_f32(t: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else { candle_core::bail!("to_host_f32: not a CUDA tensor") };
    let Some((o1, o2)) = layout.contiguous_offsets() else { candle_core::bail!("to_host_f32: not contiguous") };
    let n = o2 - o1;
    if n == 0 {
        return Ok(Vec::new());
    }
    let view = cs.as_cuda_slice::<f32>()?.slice(o1..o2);
    let stream = candle_core::backend::BackendStorage::device(cs).cuda_stream();
    let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| candle_core::Error::Cuda(Box::new(e));
    STAGE.with(|stage| {
        let mut stage = stage.borrow_mut();
        if stage.as_ref().is_none_or(|p| p.len() < n) {
            // SAFETY: the buffer's contents are unset, but it is only read after the copy below
            // has filled its first n values (and only those are read). Flags 0: ordinary
            // page-locked memory (not write-combined, which the host reads slowly).
            *stage = Some(unsafe { stream.context().alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0) }.map_err(err)?);
        }
        let p = stage.as_mut().expect("staging buffer made above");
        // exactly n values (a copy sized by the whole buffer would read past the source)
        let host = &mut p.as_mut_slice().map_err(err)?[..n];
        stream.memcpy_dtoh(&view, host).map_err(err)?;
        stream.synchronize().map_err(err)?;
        Ok(host.to_vec())
    })
}
