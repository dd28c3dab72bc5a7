//! Per-expert GEMMs over the expert-sorted row buffer, through cuBLAS, in three ways:
//!
//! - `Grouped`: one `cublasGemmGroupedBatchedEx` call (a group per expert with rows), compact rows;
//! - `Padded`: every expert padded to the same row count, one `cublasGemmStridedBatchedEx`;
//! - `Loop`: one `cublasGemmEx` per expert (the baseline).
//!
//! All tensors are row-major; cuBLAS is column-major, so a row-major `C = A·B` is issued as the
//! column-major `Cᵀ = Bᵀ·Aᵀ`. The three products of an expert MLP (legend: R rows of one expert,
//! K in features, N out features, W [N, K] an expert's weight):
//!
//! - `Nt` forward:      y_RN  = x_RK · Wᵀ
//! - `Nn` input grad:   dx_RK = dy_RN · W
//! - `Tn` weight grad:  dW_NK = dy_RNᵀ · x_RK   (experts without rows get zeros)
//!
//! bf16 runs with f32 accumulation (`CUBLAS_COMPUTE_32F`), f32 in plain f32 (no TF32).

use std::ffi::{c_int, c_longlong, c_void};

use candle_core::cuda_backend::cudarc::cublas::sys;
use candle_core::{CudaDevice, DType, Result};

use super::plan::RowLayout;
use super::GemmImpl;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    Nt,
    Nn,
    Tn,
}

/// One column-major GEMM problem: C[m, n] = op(A) · op(B).
#[derive(Debug, Clone, Copy)]
struct Problem {
    ta: sys::cublasOperation_t,
    tb: sys::cublasOperation_t,
    m: c_int,
    n: c_int,
    k: c_int,
    a: u64,
    lda: c_int,
    b: u64,
    ldb: c_int,
    c: u64,
    ldc: c_int,
}

use sys::cublasOperation_t::{CUBLAS_OP_N as N_, CUBLAS_OP_T as T_};

/// The problem of expert `e`, `rows` rows starting at `row0`; `lhs` is the row buffer operand
/// (x for Nt, dy for Nn and Tn), `rhs` the other (W for Nt / Nn, x for Tn); `out` the result.
#[allow(clippy::too_many_arguments)]
fn problem(p: Product, e: usize, row0: usize, rows: usize, kdim: usize, ndim: usize, el: usize, lhs: u64, rhs: u64, out: u64) -> Problem {
    let (kd, nd, r) = (kdim as c_int, ndim as c_int, rows as c_int);
    let at = |base: u64, elems: usize| base + (elems * el) as u64;
    let w_e = e * ndim * kdim;
    match p {
        // y[row0.., N] = x[row0.., K] · W_eᵀ  ⇒  col-major: C[N, R] = op_T(W_e as [K, N]) · x as [K, R]
        Product::Nt => Problem { ta: T_, tb: N_, m: nd, n: r, k: kd, a: at(rhs, w_e), lda: kd, b: at(lhs, row0 * kdim), ldb: kd, c: at(out, row0 * ndim), ldc: nd },
        // dx[row0.., K] = dy[row0.., N] · W_e  ⇒  C[K, R] = (W_e as [K, N]) · (dy as [N, R])
        Product::Nn => Problem { ta: N_, tb: N_, m: kd, n: r, k: nd, a: at(rhs, w_e), lda: kd, b: at(lhs, row0 * ndim), ldb: nd, c: at(out, row0 * kdim), ldc: kd },
        // dW_e[N, K] = dyᵀ · x  ⇒  C[K, N] = (x as [K, R]) · op_T(dy as [N, R])
        Product::Tn => Problem { ta: N_, tb: T_, m: kd, n: nd, k: r, a: at(rhs, row0 * kdim), lda: kd, b: at(lhs, row0 * ndim), ldb: nd, c: at(out, w_e), ldc: kd },
    }
}

fn types(dtype: DType) -> Result<(sys::cudaDataType_t, sys::cublasComputeType_t, usize)> {
    Ok(match dtype {
        DType::BF16 => (sys::cudaDataType_t::CUDA_R_16BF, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, 2),
        DType::F32 => (sys::cudaDataType_t::CUDA_R_32F, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, 4),
        DType::F16 => (sys::cudaDataType_t::CUDA_R_16F, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, 2),
        other => candle_core::bail!("moe grouped gemm: dtype {other:?} not supported (bf16, f16, f32)"),
    })
}

fn check(status: sys::cublasStatus_t, what: &str) -> Result<()> {
    if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("moe grouped gemm: {what} failed: {status:?}")
    }
}

/// Run product `p` for every expert with rows. `lhs`, `rhs`, `out` are raw device pointers of
/// `dtype` data laid out as described in the module doc; `kdim`, `ndim` the weight's [N, K].
/// `out` must be zero-filled beforehand for `Tn` (experts without rows are skipped).
///
/// # Safety
/// The pointers must be valid device allocations of the right sizes on `dev`'s stream.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run(
    dev: &CudaDevice,
    imp: GemmImpl,
    layout: &RowLayout,
    p: Product,
    dtype: DType,
    kdim: usize,
    ndim: usize,
    lhs: u64,
    rhs: u64,
    out: u64,
) -> Result<()> {
    let (dt, ct, el) = types(dtype)?;
    let blas = dev.cublas_handle();
    let handle = *blas.handle();
    let one = 1f32;
    let zero = 0f32;
    let alpha = &one as *const f32 as *const c_void;
    let beta = &zero as *const f32 as *const c_void;
    let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;

    if let (GemmImpl::Padded, Some(pad)) = (imp, layout.padded) {
        let e = layout.counts.len();
        if pad == 0 || e == 0 {
            return Ok(());
        }
        let p0 = problem(p, 0, 0, pad, kdim, ndim, el, lhs, rhs, out);
        let p1 = problem(p, 1.min(e - 1), pad.min(layout.rows), pad, kdim, ndim, el, lhs, rhs, out);
        let stride = |x0: u64, x1: u64| if e > 1 { ((x1 - x0) / el as u64) as c_longlong } else { 0 };
        return check(
            sys::cublasGemmStridedBatchedEx(
                handle, p0.ta, p0.tb, p0.m, p0.n, p0.k, alpha,
                p0.a as *const c_void, dt, p0.lda, stride(p0.a, p1.a),
                p0.b as *const c_void, dt, p0.ldb, stride(p0.b, p1.b),
                beta, p0.c as *mut c_void, dt, p0.ldc, stride(p0.c, p1.c),
                e as c_int, ct, algo,
            ),
            "cublasGemmStridedBatchedEx",
        );
    }

    let probs: Vec<Problem> = layout
        .counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(e, &c)| problem(p, e, layout.offsets[e], c, kdim, ndim, el, lhs, rhs, out))
        .collect();
    if probs.is_empty() {
        return Ok(());
    }
    match imp {
        GemmImpl::Loop | GemmImpl::Padded | GemmImpl::Auto => {
            for q in &probs {
                check(
                    sys::cublasGemmEx(
                        handle, q.ta, q.tb, q.m, q.n, q.k, alpha,
                        q.a as *const c_void, dt, q.lda, q.b as *const c_void, dt, q.ldb,
                        beta, q.c as *mut c_void, dt, q.ldc, ct, algo,
                    ),
                    "cublasGemmEx",
                )?;
            }
            Ok(())
        }
        GemmImpl::Grouped => {
            let g = probs.len();
            let col = |f: fn(&Problem) -> c_int| probs.iter().map(f).collect::<Vec<c_int>>();
            let (ms, ns, ks) = (col(|q| q.m), col(|q| q.n), col(|q| q.k));
            let (ldas, ldbs, ldcs) = (col(|q| q.lda), col(|q| q.ldb), col(|q| q.ldc));
            let tas: Vec<_> = probs.iter().map(|q| q.ta).collect();
            let tbs: Vec<_> = probs.iter().map(|q| q.tb).collect();
            let alphas = vec![1f32; g];
            let betas = vec![0f32; g];
            let sizes = vec![1 as c_int; g];
            // the pointer arrays live on the device: [A ptrs][B ptrs][C ptrs]
            let packed: Vec<u64> = probs.iter().map(|q| q.a).chain(probs.iter().map(|q| q.b)).chain(probs.iter().map(|q| q.c)).collect();
            let packed_d = dev.clone_htod(&packed)?;
            let stream = dev.cuda_stream();
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let (base, _guard) = packed_d.device_ptr(&stream);
            let a_arr = base as *const *const c_void;
            let b_arr = (base + (g * 8) as u64) as *const *const c_void;
            let c_arr = (base + (2 * g * 8) as u64) as *const *mut c_void;
            check(
                sys::cublasGemmGroupedBatchedEx(
                    handle, tas.as_ptr(), tbs.as_ptr(), ms.as_ptr(), ns.as_ptr(), ks.as_ptr(),
                    alphas.as_ptr() as *const c_void, a_arr, dt, ldas.as_ptr(), b_arr, dt, ldbs.as_ptr(),
                    betas.as_ptr() as *const c_void, c_arr, dt, ldcs.as_ptr(), g as c_int, sizes.as_ptr(), ct,
                ),
                "cublasGemmGroupedBatchedEx",
            )
        }
    }
}
