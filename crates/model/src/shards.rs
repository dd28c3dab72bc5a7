//! Sharded Hugging Face safetensors checkpoints with random weights, written tensor by tensor:
//! what `lockstep init` makes. The layout is transformers' `save_pretrained`:
//! `model-00001-of-0000N.safetensors` files plus `model.safetensors.index.json`
//! (`{"metadata": {"total_parameters", "total_size"}, "weight_map": {tensor: file}}`, keys
//! sorted), or one `model.safetensors` and no index when everything fits one shard. Tensors are
//! split into shards in checkpoint order as `huggingface_hub.split_torch_state_dict_into_shards`
//! does: a tensor that would tip the current shard over `max_shard_size` starts a new one; a
//! tensor larger than `max_shard_size` gets a shard of its own. Sizes are decimal (`5GB` =
//! 5·10⁹ bytes, transformers' default; `GiB` = 2³⁰).
//!
//! Names and values: under the names [`MoeCausalLm::save`](crate::MoeCausalLm::save) writes
//! (Qwen-style, one tensor per expert; LLaDA2-MoE under its hub names with the fused QKV). The
//! values are drawn as the in-memory random models draw them, tensor by tensor in
//! [`tensor_specs`] order: on the CPU from one ChaCha8 stream ([`crate::init::random_weights`]:
//! `init --seed S` loads to exactly `MoeCausalLm::random(cfg, S, ..)`), on a GPU from the
//! device's generator seeded with the seed ([`crate::MoeCausalLm::random_on_device`]). Only
//! one tensor at a time is in memory (plus the q / k / v parts of a fused QKV), so neither the
//! host nor the device ever holds the model.
//!
//! Reading a sharded checkpoint needs nothing from here: `checkpoint::weight_files` follows the
//! index. [`read_index`] and [`check_checkpoint`] verify what was written.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::{llada2_source, tensor_specs, Llada2Source};
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, ParseError, Result};

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// A size as `max_shard_size` takes it: `5GB`, `500MB`, `2GiB`, `64KB`, or a byte count.
pub fn parse_size(s: &str) -> std::result::Result<u64, ParseError> {
    let bad = || ParseError::new(s, "a size such as 5GB, 500MB, 2GiB or a byte count > 0");
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (v * mult).round();
    if bytes.is_nan() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// The safetensors spelling of a dtype a checkpoint is written in.
fn st_dtype(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("F32"),
        DType::BF16 => Ok("BF16"),
        DType::F16 => Ok("F16"),
        other => Err(ModelError::config("<init>", "dtype", format!("{other:?}: checkpoints are written in f32, bf16 or f16"))),
    }
}

/// One tensor of the checkpoint file: its name, shape, and the model tensors (indices into
/// [`tensor_specs`]) it is made of, concatenated along dim 0 — one, or q / k / v for
/// LLaDA2's fused `attention.query_key_value`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub parts: Vec<usize>,
}

impl FileTensor {
    pub fn numel(&self) -> u128 {
        self.shape.iter().map(|&d| d as u128).product()
    }
}

/// The checkpoint's tensors in write order (the order their last part is drawn in), under the
/// names `MoeCausalLm::save` uses.
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Result<Vec<FileTensor>> {
    let specs = tensor_specs(cfg);
    let llada = cfg.architecture == Architecture::Llada2Moe;
    let mut out = Vec::with_capacity(specs.len());
    let mut pending: HashMap<String, [Option<usize>; 3]> = HashMap::new();
    for (i, (name, shape)) in specs.iter().enumerate() {
        if !llada {
            out.push(FileTensor { name: name.clone(), shape: shape.clone(), parts: vec![i] });
            continue;
        }
        match llada2_source(cfg, name) {
            Llada2Source::Renamed(n) => out.push(FileTensor { name: n, shape: shape.clone(), parts: vec![i] }),
            Llada2Source::Qkv { fused, part, total, .. } => {
                let slot = pending.entry(fused.clone()).or_default();
                slot[part] = Some(i);
                if let [Some(q), Some(k), Some(v)] = *slot {
                    let mut shape = specs[q].1.clone();
                    shape[0] = total;
                    out.push(FileTensor { name: fused.clone(), shape, parts: vec![q, k, v] });
                    pending.remove(&fused);
                }
            }
        }
    }
    if let Some(fused) = pending.keys().next() {
        return Err(ModelError::config("<init>", fused, "q, k and v are not all in the config's tensors"));
    }
    Ok(out)
}

/// Which shard each tensor goes to, and the files' names.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    /// file names, in shard order
    pub files: Vec<String>,
    /// per checkpoint tensor (as [`checkpoint_tensors`] lists them): its shard
    pub shard_of: Vec<usize>,
    /// tensor bytes of each shard (headers not counted)
    pub shard_bytes: Vec<u64>,
    /// tensor bytes of all shards (the index's `total_size`)
    pub total_size: u64,
    pub total_parameters: u64,
}

impl ShardPlan {
    pub fn is_sharded(&self) -> bool {
        self.files.len() > 1
    }
}

/// Shards as `huggingface_hub.split_torch_state_dict_into_shards` makes them (module doc).
pub fn plan_shards(tensors: &[FileTensor], dtype: DType, max_shard_size: u64) -> Result<ShardPlan> {
    let elem = dtype.size_in_bytes() as u64;
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    let (mut total_size, mut total_parameters) = (0u64, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let n = u64::try_from(t.numel()).map_err(|_| ModelError::config("<init>", &t.name, "too many elements"))?;
        let size = n * elem;
        total_size += size;
        total_parameters += n;
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    let n = shards.len();
    let files: Vec<String> =
        if n == 1 { vec![SINGLE_FILE.to_string()] } else { (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect() };
    let mut shard_of = vec![0; tensors.len()];
    let mut shard_bytes = vec![0u64; n];
    for (s, members) in shards.iter().enumerate() {
        for &i in members {
            shard_of[i] = s;
            shard_bytes[s] += tensors[i].numel() as u64 * elem;
        }
    }
    Ok(ShardPlan { files, shard_of, shard_bytes, total_size, total_parameters })
}

/// What a config's checkpoint holds, computed per layer kind (no list of every tensor: a config
/// can be refused for its size before anything is made).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightSizes {
    pub parameters: u128,
    pub tensors: u128,
    /// the largest checkpoint tensor: name (of its first instance) and elements
    pub largest: (String, u128),
}

impl WeightSizes {
    /// Bytes of the tensors in `dtype` (the index's `total_size`).
    pub fn bytes(&self, dtype: DType) -> u128 {
        self.parameters * dtype.size_in_bytes() as u128
    }
    /// Bytes on disk: tensors plus a generous allowance for the safetensors headers and index.
    pub fn disk_bytes(&self, dtype: DType) -> u128 {
        self.bytes(dtype) + self.tensors * 256 + (1 << 20)
    }
}

/// The checkpoint's parameter count, tensor count and largest tensor: one MoE layer and one
/// dense layer listed through [`checkpoint_tensors`], times their counts, plus the rest.
pub fn weight_sizes(cfg: &ModelConfig) -> Result<WeightSizes> {
    let one_layer = |moe: bool| -> Result<Vec<FileTensor>> {
        let mut c = cfg.clone();
        c.num_layers = 1;
        c.moe_layers = if moe { vec![0] } else { Vec::new() };
        checkpoint_tensors(&c)
    };
    let n_moe = cfg.moe_layers.len() as u128;
    let n_dense = cfg.num_layers as u128 - n_moe;
    let (mut parameters, mut tensors) = (0u128, 0u128);
    let mut largest = (String::new(), 0u128);
    // the embeddings, final norm and head are counted once (from the MoE layer's list)
    for (list, layers, with_rest) in [(one_layer(true)?, n_moe, true), (one_layer(false)?, n_dense, false)] {
        for t in list {
            let times = match (t.name.starts_with("model.layers."), with_rest) {
                (true, _) => layers,
                (false, true) => 1,
                (false, false) => 0,
            };
            parameters += t.numel() * times;
            tensors += times;
            if times > 0 && t.numel() > largest.1 {
                largest = (t.name.clone(), t.numel());
            }
        }
    }
    Ok(WeightSizes { parameters, tensors, largest })
}

/// Draws the model's tensors as the random models do ([`crate::init::random_weights`] on the
/// CPU, [`crate::MoeCausalLm::random_on_device`] on a GPU), one at a time, in
/// [`tensor_specs`] order.
pub struct RandomSource {
    rng: Option<ChaCha8Rng>,
    device: Device,
}

impl RandomSource {
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Self { rng: Some(ChaCha8Rng::seed_from_u64(seed)), device: device.clone() });
        }
        device.set_seed(seed)?;
        Ok(Self { rng: None, device: device.clone() })
    }

    /// The next tensor (f32, on the source's device): weights N(0, 0.08²), norms U(0.8, 1.2),
    /// biases 0, expert-score biases U(−0.1, 0.1).
    pub fn draw(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(rng) = &mut self.rng else {
            let d = &self.device;
            return Ok(if name.ends_with("norm.weight") {
                Tensor::rand(0.8f32, 1.2, shape, d)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, d)?
            } else if name.ends_with("e_score_correction_bias") {
                Tensor::rand(-0.1f32, 0.1, shape, d)?
            } else {
                Tensor::randn(0f32, 0.08, shape, d)?
            });
        };
        let n: usize = shape.iter().product();
        let normal = Normal::new(0.0f32, 0.08).expect("valid normal");
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| rng.random_range(0.8f32..1.2)).collect()
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("e_score_correction_bias") {
            (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
        } else {
            (0..n).map(|_| normal.sample(rng)).collect()
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::WeightFile { path: path.to_path_buf(), msg: e.to_string() }
}

/// A shard being written: header first (offsets from the plan), then its tensors in order.
struct OpenShard {
    path: PathBuf,
    w: BufWriter<File>,
    /// the tensors still to come, in order
    next: std::collections::VecDeque<usize>,
}

/// The safetensors header of a shard: `{"__metadata__": {"format": "pt"}, name: {dtype, shape,
/// data_offsets}}`, padded with spaces to a multiple of 8 bytes.
fn shard_header(tensors: &[FileTensor], members: &[usize], dtype: DType) -> Result<Vec<u8>> {
    let dt = st_dtype(dtype)?;
    let elem = dtype.size_in_bytes() as u64;
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut at = 0u64;
    for &i in members {
        let t = &tensors[i];
        let end = at + t.numel() as u64 * elem;
        map.insert(t.name.clone(), serde_json::json!({"dtype": dt, "shape": t.shape, "data_offsets": [at, end]}));
        at = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|e| ModelError::config("<init>", "<header>", e.to_string()))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    Ok(out)
}

/// Write `t` (in `dtype`, any device) as little-endian bytes.
fn write_tensor_bytes(w: &mut impl Write, t: &Tensor, dtype: DType, path: &Path) -> Result<()> {
    let t = t.to_dtype(dtype)?.flatten_all()?.to_device(&Device::Cpu)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    const CHUNK: usize = 1 << 18;
    macro_rules! dump {
        ($ty:ty, $bytes:expr) => {{
            let v = t.to_vec1::<$ty>()?;
            for c in v.chunks(CHUNK) {
                buf.clear();
                for x in c {
                    buf.extend_from_slice(&$bytes(x));
                }
                w.write_all(&buf).map_err(|e| io_err(path, e))?;
            }
        }};
    }
    match dtype {
        DType::F32 => dump!(f32, |x: &f32| x.to_le_bytes()),
        DType::BF16 => dump!(half::bf16, |x: &half::bf16| x.to_bits().to_le_bytes()),
        DType::F16 => dump!(half::f16, |x: &half::f16| x.to_bits().to_le_bytes()),
        other => return Err(ModelError::config("<init>", "dtype", format!("{other:?}: not a checkpoint dtype"))),
    }
    Ok(())
}

/// What [`write_random`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub plan: ShardPlan,
    /// the weight files, then the index when sharded
    pub files: Vec<PathBuf>,
}

/// Write random weights for `cfg` into `dir` (an existing directory): the shards and, when
/// there is more than one, the index. `progress` gets the bytes of every tensor written.
pub fn write_random(
    dir: &Path,
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
    max_shard_size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Written> {
    st_dtype(dtype)?;
    let tensors = checkpoint_tensors(cfg)?;
    let specs = tensor_specs(cfg);
    let plan = plan_shards(&tensors, dtype, max_shard_size)?;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); plan.files.len()];
    for (i, &s) in plan.shard_of.iter().enumerate() {
        members[s].push(i);
    }
    // spec i → (checkpoint tensor, its part)
    let mut owner = vec![(usize::MAX, 0usize); specs.len()];
    for (j, t) in tensors.iter().enumerate() {
        for (p, &i) in t.parts.iter().enumerate() {
            owner[i] = (j, p);
        }
    }
    let mut src = RandomSource::new(seed, device)?;
    let mut open: BTreeMap<usize, OpenShard> = BTreeMap::new();
    let mut pending: HashMap<usize, Vec<Option<Tensor>>> = HashMap::new();
    for (i, (name, shape)) in specs.iter().enumerate() {
        let (j, p) = owner[i];
        let drawn = src.draw(name, shape)?.to_dtype(dtype)?;
        let parts = &tensors[j].parts;
        let t = if parts.len() == 1 {
            drawn
        } else {
            let slot = pending.entry(j).or_insert_with(|| vec![None; parts.len()]);
            slot[p] = Some(drawn);
            if slot.iter().any(Option::is_none) {
                continue;
            }
            let got: Vec<Tensor> = pending.remove(&j).unwrap_or_default().into_iter().flatten().collect();
            Tensor::cat(&got, 0)?
        };
        let s = plan.shard_of[j];
        let shard = match open.entry(s) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let path = dir.join(&plan.files[s]);
                let mut w = BufWriter::with_capacity(8 << 20, File::create(&path).map_err(|e| io_err(&path, e))?);
                w.write_all(&shard_header(&tensors, &members[s], dtype)?).map_err(|e| io_err(&path, e))?;
                e.insert(OpenShard { path, w, next: members[s].iter().copied().collect() })
            }
        };
        if shard.next.pop_front() != Some(j) {
            return Err(io_err(&shard.path, format!("tensor `{}` out of its shard's order", tensors[j].name)));
        }
        if t.dims() != tensors[j].shape.as_slice() {
            return Err(io_err(&shard.path, format!("tensor `{}`: shape {:?}, planned {:?}", tensors[j].name, t.dims(), tensors[j].shape)));
        }
        write_tensor_bytes(&mut shard.w, &t, dtype, &shard.path)?;
        progress(t.elem_count() as u64 * dtype.size_in_bytes() as u64);
        if shard.next.is_empty() {
            let OpenShard { path, w, .. } = open.remove(&s).expect("present");
            let f = w.into_inner().map_err(|e| io_err(&path, e.error()))?;
            f.sync_all().map_err(|e| io_err(&path, e))?;
        }
    }
    if let Some(s) = open.values().next() {
        return Err(io_err(&s.path, "not every planned tensor was written"));
    }
    let mut files: Vec<PathBuf> = plan.files.iter().map(|f| dir.join(f)).collect();
    if plan.is_sharded() {
        let map: serde_json::Map<String, serde_json::Value> =
            tensors.iter().zip(&plan.shard_of).map(|(t, &s)| (t.name.clone(), serde_json::Value::from(plan.files[s].clone()))).collect();
        let index = serde_json::json!({
            "metadata": {"total_parameters": plan.total_parameters, "total_size": plan.total_size},
            "weight_map": map,
        });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|e| io_err(&path, e))? + "\n";
        std::fs::write(&path, text).map_err(|e| io_err(&path, e))?;
        files.push(path);
    }
    Ok(Written { plan, files })
}

/// A sharded checkpoint's index.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    pub total_size: u64,
    pub total_parameters: Option<u64>,
    pub weight_map: BTreeMap<String, String>,
}

/// Read `dir/model.safetensors.index.json`; errors name the file and the field.
pub fn read_index(dir: &Path) -> Result<ShardIndex> {
    let path = dir.join(INDEX_FILE);
    let file = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::config(&file, "<file>", e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::config(&file, "<json>", e.to_string()))?;
    let total_size = v.pointer("/metadata/total_size").and_then(serde_json::Value::as_u64).ok_or_else(|| ModelError::config(&file, "metadata.total_size", "missing or not a number"))?;
    let total_parameters = v.pointer("/metadata/total_parameters").and_then(serde_json::Value::as_u64);
    let map = v.get("weight_map").and_then(serde_json::Value::as_object).ok_or_else(|| ModelError::config(&file, "weight_map", "missing or not an object"))?;
    let mut weight_map = BTreeMap::new();
    for (k, f) in map {
        let f = f.as_str().ok_or_else(|| ModelError::config(&file, &format!("weight_map.{k}"), "not a file name"))?;
        weight_map.insert(k.clone(), f.to_string());
    }
    Ok(ShardIndex { total_size, total_parameters, weight_map })
}

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: (u64, u64),
}

/// The tensors a safetensors file's header lists (the file's length checked against them).
pub fn read_header(path: &Path) -> Result<BTreeMap<String, HeaderEntry>> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| io_err(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(io_err(path, format!("header of {n} bytes in a file of {len}")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|e| io_err(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&h).map_err(|e| io_err(path, format!("header: {e}")))?;
    let obj = v.as_object().ok_or_else(|| io_err(path, "header is not an object"))?;
    let mut out = BTreeMap::new();
    let mut end_max = 0u64;
    for (k, e) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = || io_err(path, format!("header entry `{k}` malformed"));
        let dtype = e.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?.to_string();
        let shape = e.get("shape").and_then(|s| s.as_array()).ok_or_else(bad)?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
        let off = e.get("data_offsets").and_then(|s| s.as_array()).ok_or_else(bad)?;
        let (a, b) = match off.as_slice() {
            [a, b] => (a.as_u64().ok_or_else(bad)?, b.as_u64().ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        end_max = end_max.max(b);
        out.insert(k.clone(), HeaderEntry { dtype, shape, data_offsets: (a, b) });
    }
    if 8 + n + end_max != len {
        return Err(io_err(path, format!("{len} bytes, the header describes {}", 8 + n + end_max)));
    }
    Ok(out)
}

/// Check a checkpoint directory written as transformers writes one: a lone `model.safetensors`,
/// or an index whose `weight_map` names exactly the tensors in each shard it lists and whose
/// `total_size` is their bytes. Returns every tensor's header entry.
pub fn check_checkpoint(dir: &Path) -> Result<BTreeMap<String, HeaderEntry>> {
    if !dir.join(INDEX_FILE).exists() {
        return read_header(&dir.join(SINGLE_FILE));
    }
    let index = read_index(dir)?;
    let file = dir.join(INDEX_FILE).display().to_string();
    let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (t, f) in &index.weight_map {
        by_file.entry(f.as_str()).or_default().push(t.as_str());
    }
    let mut all = BTreeMap::new();
    let mut bytes = 0u64;
    for (f, names) in by_file {
        let header = read_header(&dir.join(f))?;
        let listed: Vec<&str> = header.keys().map(String::as_str).collect();
        if listed != names {
            return Err(ModelError::config(&file, "weight_map", format!("{f} holds {listed:?}, the index maps {names:?} to it")));
        }
        for (k, e) in header {
            bytes += e.data_offsets.1 - e.data_offsets.0;
            all.insert(k, e);
        }
    }
    if bytes != index.total_size {
        return Err(ModelError::config(&file, "metadata.total_size", format!("{}, the shards hold {bytes} bytes of tensors", index.total_size)));
    }
    Ok(all)
}
