//! The entries of `[rollout] servers`: which server speaks at a URL (lockstep, vLLM, SGLang),
//! parsed from a string (`http://...`, `kind+http://...`) or a `{url, kind}` table.

use serde::Deserialize;

use crate::error::{bad, Result};

/// What speaks at a rollout server's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Lockstep,
    Vllm,
    Sglang,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Lockstep => "lockstep",
            ServerKind::Vllm => "vllm",
            ServerKind::Sglang => "sglang",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "lockstep" => Some(ServerKind::Lockstep),
            "vllm" => Some(ServerKind::Vllm),
            "sglang" => Some(ServerKind::Sglang),
            _ => None,
        }
    }
}

/// One entry of `rollout.servers`, parsed: `http://...` (lockstep) or `kind+http://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub kind: ServerKind,
    pub url: String,
}

impl ServerSpec {
    /// Parses entry `i` of `rollout.servers`; errors name `rollout.servers[i]` (`.kind` for an
    /// unknown kind).
    pub fn parse(i: usize, s: &str) -> Result<Self> {
        let (kind, url) = match s.split_once('+') {
            Some((k, rest)) if !k.contains(':') && !k.contains('/') => match ServerKind::parse(k) {
                Some(kind) => (kind, rest),
                None => return Err(bad(&format!("rollout.servers[{i}].kind"), format!("`{k}`: expected lockstep, vllm or sglang"))),
            },
            _ => (ServerKind::Lockstep, s),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(&format!("rollout.servers[{i}]"), format!("`{s}`: expected an http:// URL")));
        }
        let host = url.split_once("://").map_or("", |(_, r)| r).split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() {
            return Err(bad(&format!("rollout.servers[{i}]"), format!("`{s}`: no host")));
        }
        Ok(ServerSpec { kind, url: url.trim_end_matches('/').to_string() })
    }

    /// The `rollout.servers` string of this entry.
    pub fn to_entry(&self) -> String {
        match self.kind {
            ServerKind::Lockstep => self.url.clone(),
            k => format!("{}+{}", k.name(), self.url),
        }
    }
}

/// `rollout.servers`: strings (lockstep URLs, or `kind+URL`) and tables `{url, kind}` (kind
/// default lockstep), each kept as its string form; unknown keys and kinds are refused naming
/// `rollout.servers[i]` / `rollout.servers[i].kind`.
pub(crate) fn de_servers<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Url(String),
        Table(std::collections::BTreeMap<String, toml::Value>),
    }
    let entries = Vec::<Entry>::deserialize(d)?;
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let s = match e {
            Entry::Url(s) => s,
            Entry::Table(t) => {
                if let Some(k) = t.keys().find(|k| !matches!(k.as_str(), "url" | "kind")) {
                    return Err(D::Error::custom(format!("rollout.servers[{i}]: unknown key `{k}` (expected url, kind)")));
                }
                let url = match t.get("url") {
                    Some(toml::Value::String(u)) => u.clone(),
                    Some(_) => return Err(D::Error::custom(format!("rollout.servers[{i}].url: expected a string"))),
                    None => return Err(D::Error::custom(format!("rollout.servers[{i}].url: missing"))),
                };
                let kind = match t.get("kind") {
                    None => ServerKind::Lockstep,
                    Some(toml::Value::String(k)) => ServerKind::parse(k).ok_or_else(|| D::Error::custom(format!("rollout.servers[{i}].kind: `{k}`: expected lockstep, vllm or sglang")))?,
                    Some(_) => return Err(D::Error::custom(format!("rollout.servers[{i}].kind: expected a string"))),
                };
                ServerSpec { kind, url }.to_entry()
            }
        };
        out.push(s);
    }
    Ok(out)
}

