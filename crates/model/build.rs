//! With the `cuda` feature, compile `src/gpu/kernels.cu` (MoE dispatch / SwiGLU / combine) and
//! `src/gpu/route.cu` (top-k, expert choice, replay checks) and `src/gpu/invariant.cu` (the
//! batch-invariant matmul and attention) and `src/gpu/paged.cu` (paged KV writes, variable-length
//! attention) and `src/gpu/sample.cu` (Gumbel-max sampling) and `src/gpu/flash.cu` (tensor-core
//! bf16 attention) and `src/gpu/head.cu` (the LM head's log-prob / entropy gradient) and
//! `src/gpu/norm.cu`, `src/gpu/rope.cu` (fused RMSNorm, rotary embedding) and `src/gpu/accumulate.cu`
//! (in-place f32 gradient sums) and `src/gpu/adamw.cu` (the AdamW update in place) to PTX
//! with nvcc; the PTX is embedded and loaded by the driver at first use. Without the feature
//! nothing happens (CI and CPU builds need no CUDA toolkit).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/gpu/kernels.cu");
    println!("cargo:rerun-if-changed=src/gpu/route.cu");
    println!("cargo:rerun-if-changed=src/gpu/invariant.cu");
    println!("cargo:rerun-if-changed=src/gpu/invariant_mma.cuh");
    println!("cargo:rerun-if-changed=src/gpu/paged.cu");
    println!("cargo:rerun-if-changed=src/gpu/sample.cu");
    println!("cargo:rerun-if-changed=src/gpu/flash.cu");
    println!("cargo:rerun-if-changed=src/gpu/norm.cu");
    println!("cargo:rerun-if-changed=src/gpu/norm_row.cuh");
    println!("cargo:rerun-if-changed=src/gpu/rope.cu");
    println!("cargo:rerun-if-changed=src/gpu/head.cu");
    println!("cargo:rerun-if-changed=src/gpu/accumulate.cu");
    println!("cargo:rerun-if-changed=src/gpu/adamw.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| match std::env::var("CUDA_HOME") {
        Ok(h) => format!("{h}/bin/nvcc"),
        Err(_) => "nvcc".to_string(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    for (src, ptx) in [("src/gpu/kernels.cu", "moe_kernels.ptx"), ("src/gpu/route.cu", "route_kernels.ptx"), ("src/gpu/invariant.cu", "invariant_kernels.ptx"), ("src/gpu/paged.cu", "paged_kernels.ptx"), ("src/gpu/sample.cu", "sample_kernels.ptx"), ("src/gpu/flash.cu", "flash_kernels.ptx"), ("src/gpu/norm.cu", "norm_kernels.ptx"), ("src/gpu/rope.cu", "rope_kernels.ptx"), ("src/gpu/head.cu", "head_kernels.ptx"), ("src/gpu/accumulate.cu", "accumulate_kernels.ptx"), ("src/gpu/adamw.cu", "adamw_kernels.ptx")] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
            .arg(out_dir.join(ptx))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("could not run {nvcc} (set NVCC or CUDA_HOME; see scripts/cuda/build.sh): {e}"));
        assert!(status.success(), "{nvcc} failed to compile {src}");
    }
}
