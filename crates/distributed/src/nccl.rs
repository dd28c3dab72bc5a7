//! The NCCL process group: one process per GPU, bootstrapped by an NCCL unique id that rank 0
//! made and published in the rendezvous store (or one handed to every rank in
//! `LOCKSTEP_NCCL_ID`; see `launch_env`). Implements [`Collective`] on CUDA tensors:
//!
//! - `all_to_all_rows`: one NCCL group of point-to-point sends and receives (the row blocks to
//!   and from every peer, moved as bytes, any dtype) — the uneven all-to-all (alltoallv) that
//!   the dispatch and combine stages need;
//! - `exchange_counts`, `all_gather_host`: `ncclAllGather`;
//! - `all_reduce_sum`: `ncclAllReduce` (sum), in the tensor's own dtype.
//!
//! Every call is enqueued on candle's stream for the device, so it is ordered with the kernels
//! before and after it and nothing waits on the host (the counts exchange and the host gather
//! read their small results back, which synchronises). Outputs are fresh tensors that NCCL
//! writes into before anyone else sees them.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use cudarc::driver::{CudaStream, DevicePtr};
use cudarc::nccl::{result, sys};
use lockstep_collective::{offsets, Collective, CollectiveError, Result as CollectiveResult};

use crate::launch_env::RankEnv;

/// The NCCL library's version, e.g. 22803 for 2.28.3.
pub fn version() -> Result<i32> {
    result::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))
}

fn nccl_err(what: &str, e: result::NcclError) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what} failed: {e:?} (run with NCCL_DEBUG=WARN for details)"))
}

struct RawComm(sys::ncclComm_t);

// SAFETY: `ncclComm_t` is a raw pointer to NCCL's communicator, which is not tied to the thread
// that created it: NCCL may be called on it from any thread as long as no two calls on it run at
// once. A RawComm lives only inside `NcclComm::comm`'s Mutex and is used under `NcclComm::lock`
// (one NCCL call sequence at a time), so moving it to another thread is sound; `Sync` comes
// from the Mutex, not from RawComm.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // abort, not destroy: destroy waits for peers, which may already have gone away
        // SAFETY: self.0 is the communicator a successful ncclCommInitRank returned (the only way
        // a RawComm is built), aborted exactly once, here, and never used after.
        unsafe {
            let _ = result::comm_abort(self.0);
        }
    }
}

/// One rank of an NCCL process group, on one CUDA device.
pub struct NcclComm {
    comm: Mutex<RawComm>,
    rank: usize,
    world: usize,
    device: CudaDevice,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm {{ rank: {}, world: {}, device: {:?} }}", self.rank, self.world, self.device.id())
    }
}

impl NcclComm {
    /// Join the group described by `env` on its GPU (`cuda:local_rank`). Every rank must call
    /// this; it returns once all have joined.
    pub fn init(env: &RankEnv) -> Result<(Self, Device)> {
        let dev = Device::new_cuda(env.local_rank)?;
        if let Device::Cuda(d) = &dev {
            lockstep_model::device::untracked_events(d);
            lockstep_model::gpu::keep_freed_memory(d)?;
        }
        let comm = Self::init_on(env, &dev)?;
        Ok((comm, dev))
    }

    pub fn init_on(env: &RankEnv, dev: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = dev else { bail!("NCCL needs a CUDA device, got {dev:?}") };
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread().map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        let id = sys::ncclUniqueId { internal: env.nccl_id.map(|b| b as ::core::ffi::c_char) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm.as_mut_ptr()` points to writable space for one ncclComm_t, which NCCL fills
        // on success; the unique id is passed by value; rank < world_size (RankEnv::from_env
        // checks it, and NCCL rejects a bad rank with an error). The device's CUDA context is
        // bound to this thread (above), the device NCCL attaches the communicator to.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), env.world_size as i32, id, env.rank as i32) }
            .map_err(|e| nccl_err(&format!("ncclCommInitRank (rank {} of {})", env.rank, env.world_size), e))?;
        // SAFETY: reached only when ncclCommInitRank returned success (the `?` above), which
        // wrote the communicator into `comm`.
        let comm = unsafe { comm.assume_init() };
        Ok(NcclComm { comm: Mutex::new(RawComm(comm)), rank: env.rank, world: env.world_size, device: cuda.clone(), stream })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RawComm>> {
        self.comm.lock().map_err(|_| candle_core::Error::Msg("NCCL communicator: a thread panicked mid-call".into()))
    }

    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Device address of a contiguous CUDA tensor's first element on this rank's device.
    fn addr(&self, t: &Tensor) -> Result<u64> {
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*st else { bail!("NCCL: tensor on {:?}, not on this rank's GPU", t.device()) };
        if c.device.id() != self.device.id() {
            bail!("NCCL: tensor on another CUDA device than this rank's");
        }
        let Some((start, _)) = l.contiguous_offsets() else { bail!("NCCL: tensor not contiguous") };
        let s = &self.stream;
        let base = match &c.slice {
            CudaStorageSlice::U8(x) => x.device_ptr(s).0,
            CudaStorageSlice::U32(x) => x.device_ptr(s).0,
            CudaStorageSlice::I16(x) => x.device_ptr(s).0,
            CudaStorageSlice::I32(x) => x.device_ptr(s).0,
            CudaStorageSlice::I64(x) => x.device_ptr(s).0,
            CudaStorageSlice::BF16(x) => x.device_ptr(s).0,
            CudaStorageSlice::F16(x) => x.device_ptr(s).0,
            CudaStorageSlice::F32(x) => x.device_ptr(s).0,
            CudaStorageSlice::F64(x) => x.device_ptr(s).0,
            _ => bail!("NCCL: dtype {:?} not supported", t.dtype()),
        };
        Ok(base + (start * t.dtype().size_in_bytes()) as u64)
    }

    /// An uneven all-to-all of raw bytes between preallocated buffers: `send_bytes[w]` bytes
    /// from `send + send_off[w]` to rank w, `recv_bytes[w]` from rank w into `recv + ...`.
    /// Public for the benchmark's plain-NCCL baseline.
    pub fn all_to_all_bytes(&self, send: &Tensor, send_bytes: &[usize], recv: &Tensor, recv_bytes: &[usize]) -> Result<()> {
        let (sp, rp) = (self.addr(send)?, self.addr(recv)?);
        let total = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        if send_bytes.len() != self.world || recv_bytes.len() != self.world
            || send_bytes.iter().sum::<usize>() > total(send) || recv_bytes.iter().sum::<usize>() > total(recv) {
            bail!("NCCL all-to-all: byte counts {send_bytes:?} / {recv_bytes:?} do not fit the buffers or {} ranks", self.world);
        }
        self.grouped_send_recv(sp, send_bytes, rp, recv_bytes)
    }

    /// One NCCL group: `send_bytes[w]` bytes from `sp + offset` to rank w, `recv_bytes[w]`
    /// from rank w into `rp + offset`.
    fn grouped_send_recv(&self, sp: u64, send_bytes: &[usize], rp: u64, recv_bytes: &[usize]) -> Result<()> {
        let (so, ro) = (offsets(send_bytes), offsets(recv_bytes));
        let comm = self.lock()?;
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let mut status = Ok(());
        for peer in 0..self.world {
            if status.is_err() {
                break;
            }
            if send_bytes[peer] > 0 {
                // SAFETY: sp + so[peer] .. + send_bytes[peer] lies in the send buffer: the offsets
                // are the prefix sums of send_bytes, whose total the callers check against it
                // (`all_to_all_bytes`: at most its bytes; `exchange_storage`: exactly its rows).
                // The buffer is borrowed by the caller for the whole call and cudarc frees device
                // memory in stream order (cuMemFreeAsync on its stream, or after a sync), so it
                // outlives the send enqueued on the same stream. The communicator is held locked.
                status = unsafe {
                    result::send((sp + so[peer] as u64) as *const _, send_bytes[peer], sys::ncclDataType_t::ncclUint8, peer as i32, comm.0, self.cu_stream())
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclSend", e));
            }
            if status.is_ok() && recv_bytes[peer] > 0 {
                // SAFETY: as for the send: rp + ro[peer] .. + recv_bytes[peer] lies in the receive
                // buffer (prefix sums of recv_bytes, total checked by the callers), which outlives
                // the receive enqueued on its stream. The peer must send exactly recv_bytes[peer]:
                // the callers take recv counts from `exchange_counts`, i.e. the peers' own send
                // counts.
                status = unsafe {
                    result::recv((rp + ro[peer] as u64) as *mut _, recv_bytes[peer], sys::ncclDataType_t::ncclUint8, peer as i32, comm.0, self.cu_stream())
                }
                .map(|_| ())
                .map_err(|e| nccl_err("ncclRecv", e));
            }
        }
        // always close the group, even after a failed call inside it
        let end = result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        status.and(end.map(|_| ()))
    }

    fn all_gather_bytes(&self, send: &Tensor) -> Result<Tensor> {
        let send = send.contiguous()?;
        let n = send.elem_count();
        let out = Tensor::zeros(n * self.world, send.dtype(), send.device())?;
        let bytes = n * send.dtype().size_in_bytes();
        let comm = self.lock()?;
        // SAFETY: send is contiguous with `bytes` bytes from its first element (addr), out is a
        // fresh contiguous tensor of world · bytes bytes of the same dtype, both on this rank's
        // device (addr checks) and alive across the call; the enqueued gather runs on the stream
        // their frees are ordered on. Every rank must pass the same element count, as NCCL
        // requires: all_gather_host sends one length, then values padded to the longest;
        // exchange_counts the E per-expert counts (ep.rs: W blocks of L local experts), E being
        // the same model on every rank.
        unsafe {
            result::all_gather(self.addr(&send)? as *const _, self.addr(&out)? as *mut _, bytes, sys::ncclDataType_t::ncclUint8, comm.0, self.cu_stream())
        }
        .map_err(|e| nccl_err("ncclAllGather", e))?;
        Ok(out)
    }
}

impl NcclComm {
    /// The row all-to-all into fresh, uninitialised device memory (every byte is received).
    fn exchange_storage(&self, send: &candle_core::CudaStorage, layout: &candle_core::Layout, send_rows: &[usize], recv_rows: &[usize])
        -> Result<candle_core::CudaStorage> {
        let dims = layout.dims();
        let w = self.world;
        if dims.is_empty() || send_rows.len() != w || recv_rows.len() != w || send_rows.iter().sum::<usize>() != dims[0] {
            bail!("all_to_all_rows: {dims:?} to split as {send_rows:?} / receive {recv_rows:?} over {w} ranks");
        }
        if send.device.id() != self.device.id() {
            bail!("NCCL all-to-all: tensor on another CUDA device than this rank's");
        }
        let Some((start, _)) = layout.contiguous_offsets() else { bail!("NCCL all-to-all: input not contiguous") };
        let row: usize = dims[1..].iter().product();
        let elt = send.dtype().size_in_bytes();
        let n_out = recv_rows.iter().sum::<usize>() * row;
        let s = &self.stream;
        macro_rules! go {
            ($x:expr, $T:ty) => {{
                // SAFETY: uninitialised, but the grouped receive below fills all n_out elements
                // (recv_rows · row · elt bytes, back to back) before the storage is handed out;
                // on an NCCL error `?` returns first and `out` is dropped unread. n_out = 0: the
                // 1-element buffer of a zero-row tensor, never read.
                let out = unsafe { self.device.alloc::<$T>(n_out.max(1))? };
                let sp = $x.device_ptr(s).0 + (start * elt) as u64;
                let rp = out.device_ptr(s).0;
                let bytes = |rows: &[usize]| rows.iter().map(|r| r * row * elt).collect::<Vec<_>>();
                self.grouped_send_recv(sp, &bytes(send_rows), rp, &bytes(recv_rows))?;
                candle_core::CudaStorage::wrap_cuda_slice(out, self.device.clone())
            }};
        }
        Ok(match &send.slice {
            CudaStorageSlice::U8(x) => go!(x, u8),
            CudaStorageSlice::U32(x) => go!(x, u32),
            CudaStorageSlice::I64(x) => go!(x, i64),
            CudaStorageSlice::BF16(x) => go!(x, half::bf16),
            CudaStorageSlice::F16(x) => go!(x, half::f16),
            CudaStorageSlice::F32(x) => go!(x, f32),
            CudaStorageSlice::F64(x) => go!(x, f64),
            _ => bail!("NCCL all-to-all: dtype {:?} not supported", send.dtype()),
        })
    }
}

/// `exchange_storage` as a (non-differentiable) op, so the tensor-level all-to-all also
/// receives into fresh memory.
struct Exchange<'a> {
    comm: &'a NcclComm,
    send_rows: &'a [usize],
    recv_rows: &'a [usize],
}

impl candle_core::CustomOp1 for Exchange<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-to-all"
    }
    fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("NCCL all-to-all: tensor on the CPU, not on this rank's GPU")
    }
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let out = self.comm.exchange_storage(s, l, self.send_rows, self.recv_rows)?;
        let mut dims = l.dims().to_vec();
        dims[0] = self.recv_rows.iter().sum();
        Ok((out, candle_core::Shape::from(dims)))
    }
}

fn nccl_dtype(dt: DType) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as N;
    Ok(match dt {
        DType::F32 => N::ncclFloat32,
        DType::F64 => N::ncclFloat64,
        DType::BF16 => N::ncclBfloat16,
        DType::F16 => N::ncclFloat16,
        DType::U32 => N::ncclUint32,
        DType::I32 => N::ncclInt32,
        DType::I64 => N::ncclInt64,
        DType::U8 => N::ncclUint8,
        other => bail!("NCCL all-reduce: dtype {other:?} not supported"),
    })
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_to_all_rows(&self, send: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> CollectiveResult<Tensor> {
        Ok(send.detach().contiguous()?.apply_op1_no_bwd(&Exchange { comm: self, send_rows, recv_rows })?)
    }
    fn exchange_counts(&self, counts: &[usize]) -> CollectiveResult<Vec<usize>> {
        let w = self.world;
        if counts.is_empty() || counts.len() % w != 0 {
            return Err(CollectiveError::Mismatch(format!("exchange_counts: {} counts are not {w} equal blocks (one per rank)", counts.len())));
        }
        let b = counts.len() / w;
        let c: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
        let t = Tensor::from_vec(c, counts.len(), &Device::Cuda(self.device.clone()))?;
        let all = self.all_gather_bytes(&t)?.to_vec1::<i64>()?;
        // all[(from · W + to) · B ..][..B]: the block `from` sends to `to`
        Ok((0..w).flat_map(|from| &all[(from * w + self.rank) * b..(from * w + self.rank + 1) * b]).map(|&c| c as usize).collect())
    }
    fn all_reduce_sum(&self, t: &Tensor) -> CollectiveResult<Tensor> {
        let src = t.detach().contiguous()?;
        let out = Tensor::zeros(src.shape(), src.dtype(), src.device())?;
        let comm = self.lock()?;
        // SAFETY: src and out are contiguous tensors of the same shape and dtype (nccl_dtype maps
        // it to NCCL's), elem_count elements each from their first element, on this rank's device
        // (addr checks) and alive across the call; the reduction runs on the stream their frees
        // are ordered on. Each rank reduces its same-shaped tensor (the Collective contract).
        unsafe {
            result::all_reduce(
                self.addr(&src)? as *const _,
                self.addr(&out)? as *mut _,
                src.elem_count(),
                nccl_dtype(src.dtype())?,
                sys::ncclRedOp_t::ncclSum,
                comm.0,
                self.cu_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok(out)
    }
    fn exchanges_cuda_storage(&self) -> bool {
        true
    }
    fn all_to_all_cuda(&self, send: &candle_core::CudaStorage, layout: &candle_core::Layout, send_rows: &[usize], recv_rows: &[usize])
        -> CollectiveResult<candle_core::CudaStorage> {
        Ok(self.exchange_storage(send, layout, send_rows, recv_rows)?)
    }
    fn all_gather_host(&self, values: &[f64]) -> CollectiveResult<Vec<Vec<f64>>> {
        let dev = Device::Cuda(self.device.clone());
        // lengths first (ranks may send different numbers of values), then the padded values
        let lens = self.all_gather_bytes(&Tensor::new(&[values.len() as i64], &dev)?)?.to_vec1::<i64>()?;
        let max = *lens.iter().max().unwrap_or(&0) as usize;
        if max == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = values.to_vec();
        padded.resize(max, 0.0);
        let all = self.all_gather_bytes(&Tensor::from_vec(padded, max, &dev)?)?.to_vec1::<f64>()?;
        Ok(lens.iter().enumerate().map(|(r, &n)| all[r * max..r * max + n as usize].to_vec()).collect())
    }
}
