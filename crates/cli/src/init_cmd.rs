//! `lockstep init --config config.json --out DIR`: a checkpoint with random weights for any
//! supported architecture (Qwen3-MoE, Qwen2-MoE, GLM-4.5, LLaDA2-MoE), written as transformers
//! writes one (`lockstep_model::shards`): `model-0000i-of-0000N.safetensors` shards of at most
//! `--max-shard-size` (default 5GB, transformers' default) plus `model.safetensors.index.json`,
//! or one `model.safetensors` when it all fits one shard; `config.json` (the given one with
//! `dtype` set to what was written) and the tokenizer files found beside the given config.
//!
//! Weights are drawn tensor by tensor and written as they come: the host and the device hold
//! one tensor at a time, never the model. `--device cpu` draws from the seeded ChaCha8 stream
//! of `MoeCausalLm::random` (loading the checkpoint gives exactly that model), `--device cuda`
//! from the GPU's generator seeded with `--seed` (as `MoeCausalLm::random_on_device`). The same
//! seed gives the same bytes. Before anything is drawn the sizes are checked: the weights
//! against the free space of `--out`'s filesystem, the largest tensor against the device's
//! free memory (and the host's available memory), each refusal naming both numbers.
//! The directory appears whole: it is written into a temporary sibling and renamed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_model::shards::{self, WeightSizes};
use lockstep_model::ModelConfig;

#[derive(clap::Args)]
pub struct InitArgs {
    /// config.json of a supported architecture (tokenizer files beside it are copied).
    #[arg(long)]
    config: PathBuf,
    /// The checkpoint directory to make (absent or empty, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// f32 or bf16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the weights are drawn: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest shard (decimal units as transformers: 5GB = 5e9 bytes; 2GiB, 500MB, bytes).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Replace a non-empty --out.
    #[arg(long)]
    force: bool,
}

/// Files of a checkpoint beside its config.json that are copied as they are.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    // LLaDA2-MoE's remote code
    "configuration_llada2_moe.py",
    "modeling_llada2_moe.py",
];

/// Bytes in words: `61.1 GB`, `350.2 MB`, `12.0 kB`.
pub fn size(b: u128) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Free space where `--out` will be: the nearest existing ancestor's filesystem.
fn free_space(out: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let abs = if out.is_absolute() { out.to_path_buf() } else { std::env::current_dir()?.join(out) };
    let probe = abs.ancestors().find(|p| p.exists()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let free = fs2::available_space(&probe).with_context(|| format!("--out {}: free space of {}", out.display(), probe.display()))?;
    Ok((probe, free))
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is none).
fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Memory one tensor takes while it is drawn and written: f32 draw, the dtype copy, the host
/// copy of that (or the concatenation of a fused QKV).
fn per_tensor_bytes(sizes: &WeightSizes, dtype: DType) -> u128 {
    sizes.largest.1 * (4 + 2 * dtype.size_in_bytes() as u128)
}

/// Refuse, with both numbers, what would not fit: the weights on the disk, the largest tensor
/// in the device's (`device`: name, free bytes) or the host's free memory.
pub fn check_fits(sizes: &WeightSizes, dtype: DType, disk: (&Path, u64), device: Option<(&str, u64)>, host: Option<u64>) -> anyhow::Result<()> {
    let need = sizes.disk_bytes(dtype);
    if need > disk.1 as u128 {
        bail!(
            "the weights need {} ({:.2}B parameters in {dtype:?}), {} has {} free",
            size(need),
            sizes.parameters as f64 / 1e9,
            disk.0.display(),
            size(disk.1 as u128)
        );
    }
    let one = per_tensor_bytes(sizes, dtype);
    if let Some((name, free)) = device {
        if one > free as u128 {
            bail!("the largest tensor ({}, {} elements) needs {} of device memory while it is drawn, {name} has {} free", sizes.largest.0, sizes.largest.1, size(one), size(free as u128));
        }
    }
    if let Some(free) = host {
        if one > free as u128 {
            bail!("the largest tensor ({}, {} elements) needs {} of host memory while it is written, the host has {} available", sizes.largest.0, sizes.largest.1, size(one), size(free as u128));
        }
    }
    Ok(())
}

/// The config as written: the given JSON with `dtype` (and `torch_dtype`, when present) set to
/// the weights' dtype and `architectures` filled in when missing.
fn normalised_config(cfg: &ModelConfig, dtype: DType) -> anyhow::Result<String> {
    let mut v = cfg.raw.clone();
    let obj = v.as_object_mut().ok_or_else(|| anyhow!("--config: not a JSON object"))?;
    obj.insert("dtype".into(), dtype_name(dtype).into());
    if obj.contains_key("torch_dtype") {
        obj.insert("torch_dtype".into(), dtype_name(dtype).into());
    }
    obj.entry("architectures").or_insert_with(|| serde_json::json!([cfg.architecture.hf_name()]));
    Ok(serde_json::to_string_pretty(&v)? + "\n")
}

/// `--out` must be absent or an empty directory (or `--force`).
fn check_out(out: &Path, force: bool) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("--out {}: exists and is not a directory", out.display());
    }
    let empty = std::fs::read_dir(out).with_context(|| format!("--out {}", out.display()))?.next().is_none();
    if !empty && !force {
        bail!("--out {}: exists and is not empty (pass --force to replace it)", out.display());
    }
    Ok(())
}

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dtype = crate::args::dtype(&args.dtype)?;
    let max_shard = shards::parse_size(&args.max_shard_size).map_err(|e| anyhow!("--max-shard-size {e}"))?;
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("--config {}", args.config.display()))?;
    let cfg = ModelConfig::from_json_str(&text, &args.config.display().to_string())?;
    check_out(&args.out, args.force)?;
    let sizes = shards::weight_sizes(&cfg)?;
    let (probe, free) = free_space(&args.out)?;
    // the disk first: a config too big for it is refused before a device is even opened
    check_fits(&sizes, dtype, (&probe, free), None, None)?;
    let dev = crate::device::parse(&args.device)?;
    let dev_free = lockstep_model::memory_info(&dev)?.map(|(f, _)| f as u64);
    check_fits(&sizes, dtype, (&probe, free), dev_free.map(|f| (args.device.as_str(), f)), host_available())?;
    eprintln!(
        "init: {} ({} layers), {:.2}B parameters, {} in {dtype:?}, seed {} on {}",
        cfg.architecture.hf_name(),
        cfg.num_layers,
        sizes.parameters as f64 / 1e9,
        size(sizes.bytes(dtype)),
        args.seed,
        args.device
    );
    let config_json = normalised_config(&cfg, dtype)?;
    let side: Vec<PathBuf> = args.config.parent().map(|d| SIDE_FILES.iter().map(|f| d.join(f)).filter(|p| p.is_file()).collect()).unwrap_or_default();

    let bar = ProgressBar::new(u64::try_from(sizes.bytes(dtype)).unwrap_or(u64::MAX));
    bar.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}").expect("valid template"));
    // written into a temporary sibling, renamed over --out at the end (removed on failure)
    let out = &args.out;
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).ok_or_else(|| anyhow!("--out {}: no directory name", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("--out {}", out.display()))?;
    let tmp = parent.join(format!(".{name}.init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("--out {}: {}", out.display(), tmp.display()))?;
    let fill = || -> anyhow::Result<shards::Written> {
        std::fs::write(tmp.join("config.json"), &config_json).with_context(|| format!("{}", tmp.display()))?;
        for f in &side {
            let to = tmp.join(f.file_name().expect("a file name"));
            std::fs::copy(f, &to).with_context(|| format!("copying {}", f.display()))?;
        }
        Ok(shards::write_random(&tmp, &cfg, args.seed, dtype, &dev, max_shard, &mut |b| bar.inc(b))?)
    };
    let written = match fill() {
        Ok(w) => w,
        Err(e) => {
            bar.abandon();
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("--out {}", out.display())));
        }
    };
    bar.finish_and_clear();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("--out {}: removing the old directory", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("--out {}: renaming {} to it", out.display(), tmp.display()))?;
    let p = &written.plan;
    println!(
        "wrote {}: {} weight file{} ({}{}), {} parameters, {} of tensors, config.json{} in {:.1} s",
        out.display(),
        p.files.len(),
        if p.files.len() == 1 { "" } else { "s" },
        p.files.first().map(String::as_str).unwrap_or("-"),
        if p.is_sharded() { format!(" .. {}, {}", p.files.last().map(String::as_str).unwrap_or("-"), shards::INDEX_FILE) } else { String::new() },
        p.total_parameters,
        size(p.total_size as u128),
        if side.is_empty() { String::new() } else { format!(" + {} tokenizer / side files", side.len()) },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(parameters: u128, largest: u128) -> WeightSizes {
        WeightSizes { parameters, tensors: 10, largest: ("model.embed_tokens.weight".into(), largest) }
    }

    #[test]
    fn refusals_name_both_sizes() {
        let s = sizes(30_532_122_624, 311_164_928);
        let e = check_fits(&s, DType::BF16, (Path::new("/out"), 40_200_000_000), None, None).unwrap_err().to_string();
        assert_eq!(e, "the weights need 61.1 GB (30.53B parameters in BF16), /out has 40.2 GB free");
        let e = check_fits(&s, DType::BF16, (Path::new("/out"), 100_000_000_000), Some(("cuda", 500_000_000)), None).unwrap_err().to_string();
        assert_eq!(e, "the largest tensor (model.embed_tokens.weight, 311164928 elements) needs 2.5 GB of device memory while it is drawn, cuda has 500.0 MB free");
        let e = check_fits(&s, DType::F32, (Path::new("/out"), 200_000_000_000), None, Some(1_000_000_000)).unwrap_err().to_string();
        assert!(e.starts_with("the largest tensor (model.embed_tokens.weight, 311164928 elements) needs 3.7 GB of host memory"), "{e}");
        check_fits(&s, DType::BF16, (Path::new("/out"), 100_000_000_000), Some(("cuda", 80_000_000_000)), Some(16_000_000_000)).unwrap();
    }

    #[test]
    fn config_is_normalised() {
        let cfg = lockstep_model::init::default_config();
        let v: serde_json::Value = serde_json::from_str(&normalised_config(&cfg, DType::BF16).unwrap()).unwrap();
        assert_eq!(v["dtype"], "bfloat16");
        assert_eq!(v["torch_dtype"], "bfloat16");
        assert_eq!(v["architectures"][0], "Qwen3MoeForCausalLM");
        assert_eq!(v["num_hidden_layers"], 4);
    }
}
