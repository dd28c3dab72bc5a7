//! Dataset records for `[task] kind = "dataset"`: JSONL (one JSON object a line) or Parquet
//! (every row group; nested columns such as a `messages` list of structs become JSON), mapped
//! by the configured fields to a prompt (text, or chat messages), an answer, an optional
//! system prompt and the remaining fields as metadata. A bad record is an error naming the
//! file, the line (or row) and the field — or, with `skip_invalid`, counted and skipped.
//! The held-out split is a second file or a seeded fraction of the first.

use std::path::Path;

use lockstep_text::TemplateMessage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::config::TaskSection;
use crate::error::{Result, RlError};

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<TemplateMessage>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub prompt: Prompt,
    pub answer: String,
    pub system: Option<String>,
    /// the record's other fields
    pub metadata: Value,
}

/// Records of one file and how many bad ones were skipped.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub skipped: usize,
}

fn data_err(file: &Path, at: &str, msg: impl Into<String>) -> RlError {
    RlError::Dataset { file: file.display().to_string(), at: at.to_string(), msg: msg.into() }
}

/// A string field, or a number / bool written as text (answers are often numbers).
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn messages_of(v: &Value, field: &str) -> std::result::Result<Vec<TemplateMessage>, String> {
    let list = v.as_array().ok_or_else(|| format!("field `{field}`: expected a list of {{role, content}} messages"))?;
    if list.is_empty() {
        return Err(format!("field `{field}`: no messages"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("field `{field}[{i}].{k}`: missing or not a string"));
            Ok(TemplateMessage { role: get("role")?, content: get("content")?, name: None })
        })
        .collect()
}

/// One record from a JSON object by the task's field mapping.
pub fn record_of(v: &Value, task: &TaskSection) -> std::result::Result<Record, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let (prompt, used) = match &task.messages_field {
        Some(f) => (Prompt::Messages(messages_of(obj.get(f).ok_or_else(|| format!("field `{f}`: missing"))?, f)?), f.as_str()),
        None => {
            let f = &task.prompt_field;
            let p = obj.get(f).ok_or_else(|| format!("field `{f}`: missing"))?;
            (Prompt::Text(p.as_str().ok_or_else(|| format!("field `{f}`: not a string"))?.to_string()), f.as_str())
        }
    };
    let f = &task.answer_field;
    let answer = text_of(obj.get(f).ok_or_else(|| format!("field `{f}`: missing"))?).ok_or_else(|| format!("field `{f}`: not a string or number"))?;
    let system = match &task.system_field {
        Some(f) => match obj.get(f) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(format!("field `{f}`: not a string")),
        },
        None => None,
    }
    .or_else(|| task.system.clone());
    let mut meta = obj.clone();
    for k in [Some(used), Some(task.answer_field.as_str()), task.system_field.as_deref()].into_iter().flatten() {
        meta.remove(k);
    }
    Ok(Record { prompt, answer, system, metadata: Value::Object(meta) })
}

fn parquet_values(path: &Path) -> Result<Vec<(String, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| RlError::io(path, e))?;
    let reader = SerializedFileReader::new(f).map_err(|e| data_err(path, "footer", format!("not a Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| data_err(path, "row 1", e.to_string()))?;
    rows.enumerate().map(|(i, r)| r.map(|r| (format!("row {}", i + 1), r.to_json_value())).map_err(|e| data_err(path, &format!("row {}", i + 1), e.to_string()))).collect()
}

fn jsonl_values(path: &Path) -> Result<Vec<(String, std::result::Result<Value, String>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| RlError::io(path, e))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (format!("line {}", i + 1), serde_json::from_str(l).map_err(|e| format!("not JSON: {e}"))))
        .collect())
}

/// Every record of a `.jsonl` or `.parquet` file.
pub fn load(path: &Path, task: &TaskSection) -> Result<Loaded> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let values: Vec<(String, std::result::Result<Value, String>)> = match ext.as_str() {
        "jsonl" | "json" | "ndjson" => jsonl_values(path)?,
        "parquet" => parquet_values(path)?.into_iter().map(|(at, v)| (at, Ok(v))).collect(),
        _ => return Err(data_err(path, "name", "expected a .jsonl or .parquet file")),
    };
    let mut out = Loaded::default();
    for (at, v) in values {
        match v.and_then(|v| record_of(&v, task)) {
            Ok(r) => out.records.push(r),
            Err(_) if task.skip_invalid => out.skipped += 1,
            Err(msg) => return Err(data_err(path, &at, format!("{msg} (set task.skip_invalid = true to skip bad records)"))),
        }
    }
    if out.records.is_empty() {
        return Err(data_err(path, "records", format!("no usable record ({} skipped)", out.skipped)));
    }
    Ok(out)
}

/// The training and held-out records: `test_path`, or a seeded `test_fraction` of `path`
/// (at least one record each side), and the records skipped in both.
pub fn split(task: &TaskSection, seed: u64) -> Result<(Vec<Record>, Vec<Record>, usize)> {
    let path = Path::new(task.path.as_deref().unwrap_or(""));
    let train = load(path, task)?;
    match &task.test_path {
        Some(t) => {
            let test = load(Path::new(t), task)?;
            Ok((train.records, test.records, train.skipped + test.skipped))
        }
        None => {
            let n = train.records.len();
            if n < 2 {
                return Err(data_err(path, "records", format!("{n} record: too few to hold out a test_fraction (set task.test_path)")));
            }
            let held = ((n as f64 * task.test_fraction).round() as usize).clamp(1, n - 1);
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5e1f_7e57));
            let mut is_test = vec![false; n];
            for &i in &idx[..held] {
                is_test[i] = true;
            }
            let (mut tr, mut te) = (Vec::new(), Vec::new());
            for (r, t) in train.records.into_iter().zip(is_test) {
                if t {
                    te.push(r)
                } else {
                    tr.push(r)
                }
            }
            Ok((tr, te, train.skipped))
        }
    }
}

/// The training record at draw `index`: epoch `index / n` visits the records in a seeded
/// order of its own (file order without shuffling).
pub fn order(n: usize, epoch: u64, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x2545_f491).wrapping_add(epoch)));
    }
    idx
}
