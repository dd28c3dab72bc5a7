//! `lockstep trace ...` subcommands: `inspect` a `.lstrace` file, `convert` between route
//! payload formats (vLLM current / 0.21, SGLang, prime-rl payload and msgpack transport,
//! lockstep). Output survives a closed pipe (`trace inspect FILE | head -1`).

use anyhow::{bail, Context};
use lockstep_trace::interop::{prime_rl, sglang, vllm, ExportMeta, ImportMeta, ModelLayout, Written};
use lockstep_trace::npy::NpyDtype;
use lockstep_trace::stats::TraceStats;
use lockstep_trace::{IdCodec, Reader, RouteTrace, Writer};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(clap::Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum TraceCmd {
    /// Summarise a .lstrace file: sequences, tokens, bytes/token, per-layer expert histogram,
    /// max_vio, missing rows.
    Inspect {
        file: PathBuf,
        /// Omit the per-layer histogram lines.
        #[arg(long)]
        no_histogram: bool,
    },
    /// Convert routes between formats. Inputs: vllm / vllm-0.21 (a .npy file, the base64 .npy
    /// string, nested lists, a choice or a whole completions / chat / /inference/v1/generate
    /// response), sglang (a /generate response or its meta_info), prime-rl (the {data, shape,
    /// start, dtype} payload, a whole /inference/v1/generate response, or msgpack
    /// RoutedExperts), lockstep (.lstrace). Outputs: vllm (.npy, else JSON
    /// {"routed_experts": "<base64 .npy>"}), vllm-0.21 (nested lists, -1 rows for missing
    /// tokens), sglang ({"meta_info": ...}), prime-rl (.msgpack: the trainer transport, else
    /// the JSON payload), lockstep.
    Convert(ConvertArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fmt {
    Vllm,
    #[value(name = "vllm-0.21")]
    Vllm021,
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
    /// The model's config.json: decoder layers, MoE layer ids, experts and top-k (so nothing is
    /// guessed; needed where a payload is ambiguous, e.g. top-1 with a zero column or flattened
    /// SGLang data).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Experts per layer (default for foreign inputs: the model config's, else max id + 1).
    #[arg(long)]
    num_experts: Option<u32>,
    /// MoE decoder-layer ids, e.g. `1,3,5` or `0-47` (default: the model config's, else
    /// detected: a column repeating one value in every row is dense).
    #[arg(long)]
    layers: Option<String>,
    /// Experts per token (needed for SGLang input unless derivable).
    #[arg(long)]
    top_k: Option<u32>,
    /// Tokens in the sequence (default: the format's convention; vLLM / SGLang / prime-rl rows
    /// cover tokens [start, N - 1)).
    #[arg(long)]
    num_tokens: Option<usize>,
    /// First token of the rows where the input does not say (vLLM's
    /// routed_experts_prompt_start of the request).
    #[arg(long)]
    start: Option<usize>,
    #[arg(long)]
    prompt_len: Option<u32>,
    #[arg(long, default_value_t = 0)]
    policy_version: u64,
    /// Model-config fingerprint (decimal or 0x-hex).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Output dtype: uint8 | uint16 | int16 | int32 for vllm .npy (default: uint8 up to 256
    /// experts, uint16 up to 65536, as vLLM), uint8 | uint16 for prime-rl (also int32 | int64
    /// for the msgpack transport).
    #[arg(long)]
    dtype: Option<String>,
    /// Sequence of a multi-sequence lockstep input to convert.
    #[arg(long)]
    index: Option<usize>,
    /// Choice of a whole response (`choices[i]`) to convert.
    #[arg(long, default_value_t = 0)]
    choice: usize,
    /// Write the MoE layers only (lockstep's compact layout) instead of every decoder layer.
    #[arg(long)]
    compact: bool,
    /// Store a lockstep output as expert sets (sorted rows; smaller) instead of selection order.
    #[arg(long)]
    unordered: bool,
}

pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    let r = match args.cmd {
        TraceCmd::Inspect { file, no_histogram } => inspect(&file, !no_histogram, &mut std::io::stdout().lock()),
        TraceCmd::Convert(c) => convert(c),
    };
    quiet_on_closed_pipe(r)
}

/// A closed stdout (`| head -1`) ends the command quietly, as other Unix tools do.
fn quiet_on_closed_pipe(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        r => r,
    }
}

fn inspect(path: &Path, histogram: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let r = Reader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut stats = TraceStats::new();
    let mut shapes = std::collections::BTreeSet::new();
    writeln!(out, "file        {} ({} bytes, {} sequences)", path.display(), r.file_len(), r.len())?;
    for i in 0..r.len() {
        let t = r.get(i)?;
        let m = t.meta();
        if r.len() <= 16 {
            writeln!(
                out,
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
            )?;
        }
        shapes.insert((t.num_layers(), m.top_k, m.num_experts));
        stats.add(&t);
    }
    let per_tok = if stats.tokens > 0 { r.file_len() as f64 / stats.tokens as f64 } else { 0.0 };
    writeln!(out, "sequences   {}", stats.sequences)?;
    writeln!(out, "tokens      {}", stats.tokens)?;
    writeln!(
        out,
        "missing     {} rows ({:.2}%)",
        stats.missing_rows,
        100.0 * stats.missing_rows as f64 / stats.tokens.max(1) as f64
    )?;
    for (l, k, e) in &shapes {
        let u8_eq = l * (*k as usize);
        writeln!(
            out,
            "shape       {l} MoE layers x top-{k} of {e} experts (uint8 {u8_eq} bytes/token, int32 {})",
            u8_eq * 4
        )?;
    }
    writeln!(out, "bytes/token {per_tok:.2} (whole file)")?;
    writeln!(out, "max_vio     max {:.4}, mean {:.4} over layers", stats.max_vio_max(), stats.max_vio_mean())?;
    if histogram {
        writeln!(out, "per-layer expert histogram (tokens per expert):")?;
        for l in stats.layers() {
            let counts: Vec<String> = l.counts.iter().map(|c| c.to_string()).collect();
            writeln!(out, "  layer {:>3} max_vio {:.4}: {}", l.layer, l.max_vio(), counts.join(" "))?;
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

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension().is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn report(w: &Written, format: &str) {
    if w.start > 0 {
        eprintln!(
            "note: {format} rows start at token {} (pass it as routed_experts_prompt_start / --start when reading)",
            w.start
        );
    }
    if w.last_dropped {
        eprintln!("warning: {format} rows cover tokens [start, N - 1); the last token's route was dropped");
    }
}

fn convert(c: ConvertArgs) -> anyhow::Result<()> {
    let fingerprint = match &c.fingerprint {
        None => 0,
        Some(s) => match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).context("--fingerprint")?,
            None => s.parse().context("--fingerprint")?,
        },
    };
    let layout = c.model_config.as_deref().map(ModelLayout::from_config_file).transpose()?;
    let mut meta = ImportMeta {
        num_experts: c.num_experts,
        layers: c.layers.as_deref().map(parse_layers).transpose()?,
        top_k: c.top_k,
        num_tokens: c.num_tokens,
        start: c.start,
        prompt_len: c.prompt_len,
        choice: c.choice,
        fingerprint,
        policy_version: c.policy_version,
        ordered: true,
        ..ImportMeta::default()
    };
    if let Some(l) = &layout {
        meta = meta.with_layout(l).map_err(|e| anyhow::anyhow!("--{}: {e}", e.field().replace('_', "-")))?;
    }
    let ex = ExportMeta { num_hidden_layers: layout.as_ref().map(|l| l.num_hidden_layers), compact: c.compact };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let input = c.input.as_path();
    let trace: RouteTrace = match c.from {
        Fmt::Vllm | Fmt::Vllm021 => {
            let b = read(input)?;
            if b.starts_with(b"\x93NUMPY") {
                vllm::from_npy(&b, &meta)?
            } else {
                vllm::from_json(&b, &meta)?
            }
        }
        Fmt::Sglang => sglang::from_json(&read(input)?, &meta)?,
        Fmt::PrimeRl => {
            let b = read(input)?;
            if b.iter().find(|x| !x.is_ascii_whitespace()) == Some(&b'{') {
                prime_rl::from_json(&b, &meta)?
            } else {
                prime_rl::from_msgpack(&b, &meta)?
            }
        }
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
            let dt = match c.dtype.as_deref() {
                None => None,
                Some(s) => match NpyDtype::parse(s) {
                    Some(d @ (NpyDtype::U8 | NpyDtype::U16 | NpyDtype::I16 | NpyDtype::I32)) => Some(d),
                    _ => bail!("--dtype {s:?}: vLLM arrays are uint8, uint16, int16 or int32"),
                },
            };
            let w = if has_ext(out, &["npy"]) {
                let (b, w) = vllm::to_npy(&trace, dt, &ex)?;
                write(&b)?;
                w
            } else {
                let (s, w) = vllm::to_b64(&trace, dt, &ex)?;
                write(&serde_json::to_vec(&serde_json::json!({ "routed_experts": s }))?)?;
                w
            };
            report(&w, "vLLM");
        }
        Fmt::Vllm021 => {
            let (v, w) = vllm::to_json_v021(&trace, &ex)?;
            write(&serde_json::to_vec(&v)?)?;
            report(&w, "vLLM 0.21");
        }
        Fmt::Sglang => {
            let (v, w) = sglang::to_json(&trace, &ex)?;
            write(&serde_json::to_vec(&v)?)?;
            report(&w, "SGLang");
        }
        Fmt::PrimeRl => {
            let dt = match c.dtype.as_deref() {
                None => None,
                Some(s) => Some(
                    prime_rl::PrimeDtype::parse(s).with_context(|| format!("--dtype {s:?}: not an integer dtype"))?,
                ),
            };
            if has_ext(out, &["msgpack", "mp", "bin"]) {
                write(&prime_rl::to_msgpack(&trace, dt, &ex)?)?;
            } else {
                let (v, w) = prime_rl::to_json(&trace, dt, &ex)?;
                write(&serde_json::to_vec(&v)?)?;
                report(&w, "prime-rl");
            }
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
        // one folder per test (the harness names each test's thread after it): a test that
        // removes its folder never takes another's files
        let test = std::thread::current().name().unwrap_or("main").replace("::", "-");
        let d = std::env::temp_dir().join(format!("lockstep-trace-cli-{}-{test}", std::process::id()));
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
            start: None,
            prompt_len: Some(2),
            policy_version: 9,
            fingerprint: Some("0xabc".into()),
            dtype: None,
            index: None,
            choice: 0,
            compact: true,
            unordered: false,
            model_config: None,
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
        inspect(&ls, true, &mut Vec::new()).unwrap();
        convert(args(Fmt::Lockstep, Fmt::Sglang, &ls, &sg)).unwrap();
        convert(args(Fmt::Sglang, Fmt::PrimeRl, &sg, &pr)).unwrap();
        let mut a = args(Fmt::PrimeRl, Fmt::Vllm, &pr, &back);
        a.num_tokens = Some(6);
        a.dtype = Some("int32".into());
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

    /// The embedded default's layout (4 decoder layers, layer 2 dense, top-2 of 8): a current
    /// vLLM string with its zero dense column converts to SGLang, prime-rl msgpack and back,
    /// bit for bit, with the layout from --model-config; without it the dense column is
    /// detected (top-2).
    #[test]
    fn full_layouts_round_trip_through_every_format() {
        let cfg = tmp("config.json");
        std::fs::write(
            &cfg,
            r#"{"num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [2]}"#,
        )
        .unwrap();
        // 6 rows (N = 7 tokens), columns 0, 1, 3 routed, column 2 zero as vLLM leaves it
        let data: Vec<i32> =
            (0..6 * 4).flat_map(|r| if r % 4 == 2 { vec![0, 0] } else { vec![r % 8, (r + 3) % 8] }).collect();
        let arr = NpyArray { dtype: NpyDtype::U8, shape: vec![6, 4, 2], data };
        let npy = tmp("full.npy");
        std::fs::write(&npy, write_npy(&arr).unwrap()).unwrap();
        let full = |from, to, i: &Path, o: &Path| ConvertArgs {
            model_config: Some(cfg.clone()),
            num_experts: None,
            layers: None,
            top_k: None,
            prompt_len: None,
            fingerprint: None,
            compact: false,
            ..args(from, to, i, o)
        };
        let (sg, mp, ls, back) = (tmp("full_sg.json"), tmp("full.msgpack"), tmp("full.lstrace"), tmp("full_back.npy"));
        convert(full(Fmt::Vllm, Fmt::Sglang, &npy, &sg)).unwrap();
        convert(full(Fmt::Sglang, Fmt::PrimeRl, &sg, &mp)).unwrap();
        convert(full(Fmt::PrimeRl, Fmt::Lockstep, &mp, &ls)).unwrap();
        let t = Reader::open(&ls).unwrap().get(0).unwrap();
        assert_eq!((t.num_tokens(), t.num_missing(), t.layers()), (7, 1, &[0u32, 1, 3][..]));
        convert(full(Fmt::Lockstep, Fmt::Vllm, &ls, &back)).unwrap();
        assert_eq!(std::fs::read(&npy).unwrap(), std::fs::read(&back).unwrap());
        // without the config: the zero column is dense (a top-2 row never repeats an id)
        let mut bare = full(Fmt::Vllm, Fmt::Lockstep, &npy, &ls);
        bare.model_config = None;
        convert(bare).unwrap();
        assert_eq!(Reader::open(&ls).unwrap().get(0).unwrap().layers(), &[0, 1, 3]);
        // a model config that disagrees with a flag is refused, naming the flag
        let mut bad = full(Fmt::Vllm, Fmt::Lockstep, &npy, &ls);
        bad.top_k = Some(3);
        assert!(convert(bad).unwrap_err().to_string().contains("--top-k"));
    }

    /// `trace inspect FILE | head -1`: a closed stdout ends the command quietly.
    #[test]
    fn inspect_survives_a_closed_pipe() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "closed"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let data: Vec<i32> = (0..3 * 2).flat_map(|r| vec![r % 8, (r + 1) % 8]).collect();
        let npy = tmp("pipe.npy");
        std::fs::write(&npy, write_npy(&NpyArray { dtype: NpyDtype::I32, shape: vec![3, 2, 2], data }).unwrap())
            .unwrap();
        let ls = tmp("pipe.lstrace");
        let mut a = args(Fmt::Vllm, Fmt::Lockstep, &npy, &ls);
        a.layers = None;
        a.top_k = None;
        a.num_experts = None;
        convert(a).unwrap();
        let r = inspect(&ls, true, &mut Closed);
        assert!(r.is_err());
        assert!(quiet_on_closed_pipe(r).is_ok());
        assert!(quiet_on_closed_pipe(Err(anyhow::anyhow!("other"))).is_err());
    }

    #[test]
    fn layer_lists_parse() {
        assert_eq!(parse_layers("0-2, 5,7").unwrap(), vec![0, 1, 2, 5, 7]);
        assert!(parse_layers("a").is_err());
    }
}
