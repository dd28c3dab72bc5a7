//! `lockstep trace ...` subcommands: `inspect` a `.lstrace` file, `convert` between route
//! payload formats (vLLM `.npy` / nested-list JSON, SGLang JSON, prime-rl JSON, lockstep).

use anyhow::{bail, Context};
use lockstep_trace::interop::{prime_rl, sglang, vllm, ImportMeta};
use lockstep_trace::npy::NpyDtype;
use lockstep_trace::stats::TraceStats;
use lockstep_trace::{IdCodec, Reader, RouteTrace, Writer};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(clap::Subcommand)]
enum TraceCmd {
    /// Summarise a .lstrace file: sequences, tokens, bytes/token, per-layer expert histogram,
    /// max_vio, missing rows.
    Inspect {
        file: PathBuf,
        /// Omit the per-layer histogram lines.
        #[arg(long)]
        no_histogram: bool,
    },
    /// Convert routes between formats (vllm: .npy, or .json nested lists; sglang / prime-rl:
    /// a JSON file holding the payload; lockstep: a .lstrace file).
    Convert(ConvertArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fmt {
    Vllm,
    Sglang,
    #[value(name = "prime-rl")]
    PrimeRl,
    Lockstep,
}

#[derive(clap::Args)]
struct ConvertArgs {
    #[arg(long, value_enum)]
    from: Fmt,
    #[arg(long, value_enum)]
    to: Fmt,
    input: PathBuf,
    output: PathBuf,
    /// Experts per layer (default for foreign inputs: max id + 1).
    #[arg(long)]
    num_experts: Option<u32>,
    /// MoE decoder-layer ids, e.g. `1,3,5` or `0-47` (default 0..layers in payload).
    #[arg(long)]
    layers: Option<String>,
    /// Experts per token (needed for SGLang input unless derivable).
    #[arg(long)]
    top_k: Option<u32>,
    /// Tokens in the sequence (default: the format's convention, rows + 1 for vLLM / SGLang).
    #[arg(long)]
    num_tokens: Option<usize>,
    #[arg(long)]
    prompt_len: Option<u32>,
    #[arg(long, default_value_t = 0)]
    policy_version: u64,
    /// Model-config fingerprint (decimal or 0x-hex).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Output dtype: int16 | int32 for vllm .npy (default int32), uint8 | uint16 for prime-rl.
    #[arg(long)]
    dtype: Option<String>,
    /// Sequence of a multi-sequence lockstep input to convert.
    #[arg(long)]
    index: Option<usize>,
    /// Store a lockstep output as expert sets (sorted rows; smaller) instead of selection order.
    #[arg(long)]
    unordered: bool,
}

pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    match args.cmd {
        TraceCmd::Inspect { file, no_histogram } => inspect(&file, !no_histogram),
        TraceCmd::Convert(c) => convert(c),
    }
}

fn inspect(path: &Path, histogram: bool) -> anyhow::Result<()> {
    let r = Reader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut stats = TraceStats::new();
    let mut shapes = std::collections::BTreeSet::new();
    println!("file        {} ({} bytes, {} sequences)", path.display(), r.file_len(), r.len());
    for i in 0..r.len() {
        let t = r.get(i)?;
        let m = t.meta();
        if r.len() <= 16 {
            println!(
                "  seq {i:>3}: tokens {} (prompt {}), missing rows {}, layers {}, top_k {}, experts {}, policy v{}, fingerprint {:016x}, {}{}, codec {:?}",
                t.num_tokens(),
                m.prompt_len,
                t.num_missing(),
                t.num_layers(),
                if m.top_k == 0 { "variable".to_string() } else { m.top_k.to_string() },
                m.num_experts,
                m.policy_version,
                m.fingerprint,
                if m.ordered { "ordered" } else { "unordered" },
                t.prob_dtype().map(|d| format!(", probs {d:?}")).unwrap_or_default(),
                IdCodec::choose(m),
            );
        }
        shapes.insert((t.num_layers(), m.top_k, m.num_experts));
        stats.add(&t);
    }
    let per_tok = if stats.tokens > 0 { r.file_len() as f64 / stats.tokens as f64 } else { 0.0 };
    println!("sequences   {}", stats.sequences);
    println!("tokens      {}", stats.tokens);
    println!(
        "missing     {} rows ({:.2}%)",
        stats.missing_rows,
        100.0 * stats.missing_rows as f64 / stats.tokens.max(1) as f64
    );
    for (l, k, e) in &shapes {
        let u8_eq = l * (*k as usize);
        println!(
            "shape       {l} MoE layers x top-{k} of {e} experts (uint8 {u8_eq} bytes/token, int32 {})",
            u8_eq * 4
        );
    }
    println!("bytes/token {per_tok:.2} (whole file)");
    println!("max_vio     max {:.4}, mean {:.4} over layers", stats.max_vio_max(), stats.max_vio_mean());
    if histogram {
        println!("per-layer expert histogram (tokens per expert):");
        for l in stats.layers() {
            let counts: Vec<String> = l.counts.iter().map(|c| c.to_string()).collect();
            println!("  layer {:>3} max_vio {:.4}: {}", l.layer, l.max_vio(), counts.join(" "));
        }
    }
    Ok(())
}

fn parse_layers(s: &str) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u32, u32) = (a.trim().parse().context("--layers")?, b.trim().parse().context("--layers")?);
            out.extend(a..=b);
        } else {
            out.push(part.parse::<u32>().with_context(|| format!("--layers: {part:?} is not a layer id"))?);
        }
    }
    Ok(out)
}

fn is_json(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

fn convert(c: ConvertArgs) -> anyhow::Result<()> {
    let fingerprint = match &c.fingerprint {
        None => 0,
        Some(s) => match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).context("--fingerprint")?,
            None => s.parse().context("--fingerprint")?,
        },
    };
    let meta = ImportMeta {
        num_experts: c.num_experts,
        layers: c.layers.as_deref().map(parse_layers).transpose()?,
        top_k: c.top_k,
        num_tokens: c.num_tokens,
        prompt_len: c.prompt_len,
        fingerprint,
        policy_version: c.policy_version,
        ordered: true,
        ..ImportMeta::default()
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let input = c.input.as_path();
    let trace: RouteTrace = match c.from {
        Fmt::Vllm if is_json(input) => vllm::from_json(&read(input)?, &meta)?,
        Fmt::Vllm => vllm::from_npy(&read(input)?, &meta)?,
        Fmt::Sglang => sglang::from_json(&read(input)?, &meta)?,
        Fmt::PrimeRl => prime_rl::from_json(&read(input)?, &meta)?,
        Fmt::Lockstep => {
            let r = Reader::open(input).with_context(|| format!("reading {}", input.display()))?;
            let i = match (c.index, r.len()) {
                (Some(i), _) => i,
                (None, 1) => 0,
                (None, n) => bail!("{}: {n} sequences; pick one with --index", input.display()),
            };
            r.get(i)?
        }
    };
    let trace = if c.unordered && trace.meta().ordered {
        let mut m = trace.meta().clone();
        m.ordered = false;
        match trace.top_k() {
            Some(_) => RouteTrace::new(
                m,
                trace.layers().to_vec(),
                trace.num_tokens(),
                trace.ids().to_vec(),
                trace.missing().to_vec(),
                trace.probs().cloned(),
            )?,
            None => RouteTrace::new_variable(
                m,
                trace.layers().to_vec(),
                trace.num_tokens(),
                &trace.counts(),
                trace.ids().to_vec(),
                trace.missing().to_vec(),
                trace.probs().cloned(),
            )?,
        }
    } else {
        trace
    };
    let out = c.output.as_path();
    let write = |bytes: &[u8]| std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()));
    match c.to {
        Fmt::Vllm => {
            if is_json(out) {
                write(&serde_json::to_vec(&vllm::to_json(&trace)?)?)?;
            } else {
                let dt = match c.dtype.as_deref() {
                    None => NpyDtype::I32,
                    Some(s) => match NpyDtype::parse(s) {
                        Some(d @ (NpyDtype::I16 | NpyDtype::I32)) => d,
                        _ => bail!("--dtype {s:?}: vLLM arrays are int16 or int32"),
                    },
                };
                write(&vllm::to_npy(&trace, dt)?)?;
            }
        }
        Fmt::Sglang => {
            let (v, dropped) = sglang::to_json(&trace)?;
            if dropped {
                eprintln!("warning: SGLang payloads have seqlen-1 rows; the last token's route was dropped");
            }
            write(&serde_json::to_vec(&v)?)?;
        }
        Fmt::PrimeRl => {
            let dt = match c.dtype.as_deref() {
                None => None,
                Some("uint8") => Some(prime_rl::PrimeDtype::U8),
                Some("uint16") => Some(prime_rl::PrimeDtype::U16),
                Some(s) => bail!("--dtype {s:?}: prime-rl payloads are uint8 or uint16"),
            };
            write(&serde_json::to_vec(&prime_rl::to_json(&trace, dt)?)?)?;
        }
        Fmt::Lockstep => {
            let mut w = Writer::create(out)?;
            w.push(&trace)?;
            w.finish()?;
        }
    }
    eprintln!(
        "converted {} tokens ({} missing rows) x {} MoE layers -> {}",
        trace.num_tokens(),
        trace.num_missing(),
        trace.num_layers(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_trace::npy::{write_npy, NpyArray};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lockstep-trace-cli-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    fn args(from: Fmt, to: Fmt, input: &Path, output: &Path) -> ConvertArgs {
        ConvertArgs {
            from,
            to,
            input: input.into(),
            output: output.into(),
            num_experts: Some(64),
            layers: Some("1,3-4".into()),
            top_k: Some(4),
            num_tokens: None,
            prompt_len: Some(2),
            policy_version: 9,
            fingerprint: Some("0xabc".into()),
            dtype: None,
            index: None,
            unordered: false,
        }
    }

    #[test]
    fn convert_chain_is_bitwise_and_inspect_runs() {
        // 5 rows of [3 layers x top-4] distinct ids: vLLM's N-1 rows for 6 tokens
        let data: Vec<i32> = (0..5 * 3).flat_map(|r| (0..4).map(move |j| (r * 7 + j * 13) % 64)).collect();
        let arr = NpyArray { dtype: NpyDtype::I32, shape: vec![5, 3, 4], data };
        let npy = tmp("a.npy");
        std::fs::write(&npy, write_npy(&arr).unwrap()).unwrap();
        let (ls, sg, pr, back) = (tmp("a.lstrace"), tmp("s.json"), tmp("p.json"), tmp("b.npy"));
        convert(args(Fmt::Vllm, Fmt::Lockstep, &npy, &ls)).unwrap();
        inspect(&ls, true).unwrap();
        convert(args(Fmt::Lockstep, Fmt::Sglang, &ls, &sg)).unwrap();
        convert(args(Fmt::Sglang, Fmt::PrimeRl, &sg, &pr)).unwrap();
        let mut a = args(Fmt::PrimeRl, Fmt::Vllm, &pr, &back);
        a.num_tokens = Some(6);
        convert(a).unwrap();
        assert_eq!(std::fs::read(&npy).unwrap(), std::fs::read(&back).unwrap());
        let t = Reader::open(&ls).unwrap().get(0).unwrap();
        assert_eq!((t.num_tokens(), t.num_missing(), t.layers()), (6, 1, &[1u32, 3, 4][..]));
        t.check_policy(9, 0xabc).unwrap();
        // errors name the field
        let mut bad = args(Fmt::Vllm, Fmt::Lockstep, &npy, &ls);
        bad.num_experts = Some(10);
        let e = convert(bad).unwrap_err().to_string();
        assert!(e.contains("routed_experts["), "{e}");
        let _ = std::fs::remove_dir_all(npy.parent().unwrap());
    }

    #[test]
    fn layer_lists_parse() {
        assert_eq!(parse_layers("0-2, 5,7").unwrap(), vec![0, 1, 2, 5, 7]);
        assert!(parse_layers("a").is_err());
    }
}
