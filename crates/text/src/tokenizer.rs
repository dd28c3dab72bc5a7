//! Text ↔ tokens and chat templates. A checkpoint's `tokenizer.json` goes through HF
//! `tokenizers` (pure Rust: fancy-regex, no oniguruma); its chat template (`chat_template` in
//! `tokenizer_config.json`, or `chat_template.jinja`) through minijinja with Python string
//! methods and HF's `trim_blocks` / `lstrip_blocks`. The embedded default model uses the
//! built-in byte-level tokenizer (vocabulary 256: token = byte) and a plain template.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Result, TextError};

/// Byte-level text → tokens (the embedded default's vocabulary of 256: token = byte).
pub fn byte_encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Byte-level tokens → text (ids ≥ 256 are not bytes: U+FFFD; invalid UTF-8 likewise).
pub fn byte_decode(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().map(|&t| u8::try_from(t).unwrap_or(0xFF)).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Chat template of the byte-level tokenizer.
pub const BYTE_CHAT_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

enum Kind {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

pub struct Tokenizer {
    kind: Kind,
    template: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// tokens that end a sequence (stop tokens unless `ignore_eos`)
    pub eos_token_ids: Vec<u32>,
}

/// A chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn template_env(source: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template_owned("chat", source).map_err(|e| TextError::Template(e.to_string()))?;
    Ok(env)
}

/// `"<s>"` or `{"content": "<s>", ...}` (an AddedToken) in tokenizer_config.json.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` as an integer or a list of them.
fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TextError::Io { what: path.display().to_string(), source: e })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TextError::Tokenizer { file: path.display().to_string(), msg: e.to_string() })
}

impl Tokenizer {
    /// The byte-level tokenizer of the embedded default (no end-of-sequence token).
    pub fn bytes() -> Self {
        Self {
            kind: Kind::Bytes,
            template: template_env(BYTE_CHAT_TEMPLATE.to_string()).expect("the built-in template parses"),
            bos_token: None,
            eos_token: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// A checkpoint directory's tokenizer: `tokenizer.json` (required unless `vocab_size` ≥ 256,
    /// which falls back to bytes), `tokenizer_config.json` (chat template, bos / eos tokens),
    /// end-of-sequence ids from `generation_config.json` and `config.json`.
    pub fn from_dir(dir: &Path, vocab_size: usize) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let mut tok = if tj.exists() {
            let hf = tokenizers::Tokenizer::from_file(&tj).map_err(|e| TextError::Tokenizer { file: tj.display().to_string(), msg: e.to_string() })?;
            Self { kind: Kind::Hf(Box::new(hf)), ..Self::bytes() }
        } else if vocab_size >= 256 {
            tracing::warn!("{}: no tokenizer.json; using the byte-level tokenizer", dir.display());
            Self::bytes()
        } else {
            return Err(TextError::Tokenizer { file: tj.display().to_string(), msg: format!("missing, and vocab_size {vocab_size} < 256 rules out bytes") });
        };
        let cfg = read_json(&dir.join("tokenizer_config.json"))?;
        let mut template = None;
        if let Some(cfg) = &cfg {
            tok.bos_token = token_string(cfg.get("bos_token"));
            tok.eos_token = token_string(cfg.get("eos_token"));
            template = match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // a list of named templates: take "default"
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            template = Some(std::fs::read_to_string(&jinja).map_err(|e| TextError::Io { what: jinja.display().to_string(), source: e })?);
        }
        if let Some(t) = template {
            tok.template = template_env(t)?;
        }
        let mut eos = Vec::new();
        for f in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(f))? {
                eos.extend(ids_of(v.get("eos_token_id")));
            }
        }
        if let (Some(e), Kind::Hf(hf)) = (&tok.eos_token, &tok.kind) {
            eos.extend(hf.token_to_id(e));
        }
        eos.sort_unstable();
        eos.dedup();
        tok.eos_token_ids = eos.into_iter().filter(|&t| (t as usize) < vocab_size).collect();
        Ok(tok)
    }

    pub fn is_bytes(&self) -> bool {
        matches!(self.kind, Kind::Bytes)
    }

    /// The EOS string of `tokenizer_config.json` (`None` for bytes or when it names none).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The vocabulary size including added tokens (256 for bytes).
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Bytes => 256,
            Kind::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// Render a prompt as a chat: an optional system message, then the user's, with the
    /// model's generation prompt (`add_generation_prompt = true`).
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> std::result::Result<String, String> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(TemplateMessage { role: "system".into(), content: s.into(), name: None });
        }
        messages.push(TemplateMessage { role: "user".into(), content: user.into(), name: None });
        self.apply_chat_template(&messages, true, &serde_json::Map::new())
    }

    /// Text → token ids (`special`: add the tokenizer's BOS / EOS as its post-processor says;
    /// off for rendered chat templates, which carry their own).
    pub fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String> {
        match &self.kind {
            Kind::Bytes => Ok(byte_encode(text)),
            Kind::Hf(t) => t.encode(text, special).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()),
        }
    }

    /// Token ids → text (special tokens skipped; invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.kind {
            Kind::Bytes => byte_decode(ids),
            Kind::Hf(t) => t.decode(ids, true).unwrap_or_default(),
        }
    }

    /// One token's text and bytes, for log-probability listings (special tokens shown).
    pub fn token_piece(&self, id: u32) -> (String, Vec<u8>) {
        match &self.kind {
            Kind::Bytes => (String::from_utf8_lossy(&[id as u8]).into_owned(), vec![id as u8]),
            Kind::Hf(t) => {
                let s = t.decode(&[id], false).ok().filter(|s| !s.is_empty()).or_else(|| t.id_to_token(id)).unwrap_or_default();
                let b = s.as_bytes().to_vec();
                (s, b)
            }
        }
    }

    /// Render the chat template (`messages`, `add_generation_prompt`, `bos_token`,
    /// `eos_token` and the request's `chat_template_kwargs`).
    pub fn apply_chat_template(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<String, String> {
        let mut ctx = kwargs.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages).map_err(|e| e.to_string())?);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().unwrap_or_default().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().unwrap_or_default().into());
        let t = self.template.get_template("chat").map_err(|e| e.to_string())?;
        t.render(Value::from_serialize(&ctx)).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                msg = format!("{msg}: {d}");
            }
            msg
        })
    }
}
