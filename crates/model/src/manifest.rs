//! Checkpoint integrity: the manifest of a checkpoint's tensor files and the atomic directory
//! writer every lockstep checkpoint goes through.
//!
//! **Manifest.** `lockstep-manifest.json` beside the weights maps every `*.safetensors` file of
//! the directory to its size and SHA-256: `{"model.safetensors": {"bytes": 1234, "sha256":
//! "9f86…"}}`. lockstep writes it with each checkpoint (HF exports, trainer checkpoints) and
//! checks it when it reads a tensor file ([`verify`]): a size or digest mismatch, or a tensor
//! file the manifest does not list, is an error naming the file. A directory without a manifest
//! is a foreign (Hugging Face) checkpoint and is read as it is. Only tensor files are covered:
//! `config.json` and the JSON states stay editable by hand (README: routing strategies are a
//! `config.json` setting).
//!
//! **Atomic writes.** [`write_dir_atomically_with`] fills a fresh temporary sibling
//! `.<name>.tmp-<pid>` of the checkpoint directory, writes the manifest, fsyncs every file and
//! the temporary directory, moves the old checkpoint aside to `.<name>.old-<pid>`, renames the
//! temporary directory into place, fsyncs the parent and removes the old one. A crash at any
//! point leaves the old or the new checkpoint complete — between the two renames the old one
//! sits aside, and [`clean_stale_siblings`] / [`clean_stale_in`] (run before every save and at
//! the start of a run) move it back. Every write, fsync, rename and removal goes through a
//! [`CheckpointFs`], so tests can make the Nth operation fail ([`RealFs`] is the real one).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "lockstep-manifest.json";

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub bytes: u64,
    /// lower-case hex
    pub sha256: String,
}

/// File name (relative to the checkpoint directory) → size and digest.
pub type Manifest = BTreeMap<String, FileEntry>;

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and SHA-256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<FileEntry> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry { bytes, sha256: hex(&h.finalize()) })
}

fn is_tensor_file(name: &str) -> bool {
    name.ends_with(".safetensors")
}

/// The manifest of the tensor files directly in `dir`.
pub fn build(dir: &Path) -> std::io::Result<Manifest> {
    let mut m = Manifest::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type()?.is_file() && is_tensor_file(&name) {
            m.insert(name, sha256_file(&e.path())?);
        }
    }
    Ok(m)
}

/// `<dir>/lockstep-manifest.json`, or `None` when there is none (a foreign checkpoint).
pub fn read(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::WeightFile { path, msg: e.to_string() }),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| ModelError::WeightFile { path, msg: format!("not a lockstep manifest: {e}") })
}

/// Check the tensor files among `files` (paths inside `dir`) against `dir`'s manifest, when it
/// has one: each must be listed, of the listed size and SHA-256. Other files are not checked.
pub fn verify(dir: &Path, files: &[PathBuf]) -> Result<()> {
    let Some(manifest) = read(dir)? else { return Ok(()) };
    for f in files {
        let name = f.strip_prefix(dir).unwrap_or(f).to_string_lossy().to_string();
        if !is_tensor_file(&name) {
            continue;
        }
        let bad = |msg: String| ModelError::WeightFile { path: f.clone(), msg };
        let Some(want) = manifest.get(&name) else {
            return Err(bad(format!("not listed in {MANIFEST} (a file added to a lockstep checkpoint after it was written)")));
        };
        let got = sha256_file(f).map_err(|e| bad(e.to_string()))?;
        if got.bytes != want.bytes {
            return Err(bad(format!("{} bytes, {MANIFEST} says {} (truncated or replaced)", got.bytes, want.bytes)));
        }
        if got.sha256 != want.sha256 {
            return Err(bad(format!("sha256 {}, {MANIFEST} says {} (corrupt or modified)", got.sha256, want.sha256)));
        }
    }
    Ok(())
}

/// The filesystem operations a checkpoint save makes, one call each, so that tests can fail
/// any one of them. Reads (listing, hashing) are not operations here.
pub trait CheckpointFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()>;
    /// Create the file `path` by running `write` (which writes it at that path).
    fn write_file(&self, path: &Path, write: &dyn Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()>;
    /// fsync a file or a directory.
    fn sync(&self, path: &Path) -> std::io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl CheckpointFs for RealFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn write_file(&self, path: &Path, write: &dyn Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
        write(path)
    }
    fn sync(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir_all(path)
    }
}

/// The temporary directory of a save in progress: files go in through its [`CheckpointFs`].
pub struct DirWriter<'a> {
    fs: &'a dyn CheckpointFs,
    dir: PathBuf,
}

impl DirWriter<'_> {
    /// The temporary directory (complete files only become visible through the final rename).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Write file `name` with `write` (given its path).
    pub fn write_with(&self, name: &str, write: &dyn Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." || name == MANIFEST {
            return Err(std::io::Error::other(format!("`{name}`: a plain file name (not {MANIFEST}) expected")));
        }
        self.fs.write_file(&self.dir.join(name), write)
    }

    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.write_with(name, &|p| std::fs::write(p, bytes))
    }

    /// A safetensors file of `tensors` (host tensors).
    pub fn write_tensors(&self, name: &str, tensors: &HashMap<String, Tensor>) -> std::io::Result<()> {
        self.write_with(name, &|p| candle_core::safetensors::save(tensors, p).map_err(std::io::Error::other))
    }
}

/// The parent of `dir` and `dir`'s name (`checkpoint` when it has none).
fn split(dir: &Path) -> (PathBuf, String) {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "checkpoint".into());
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    (parent, name)
}

/// The checkpoint name and kind of a sibling `.<name>.tmp-<pid>` / `.<name>.old-<pid>`.
fn stale_sibling(file_name: &str) -> Option<(&str, bool)> {
    let rest = file_name.strip_prefix('.')?;
    for (marker, tmp) in [(".tmp-", true), (".old-", false)] {
        if let Some(i) = rest.rfind(marker) {
            let pid = &rest[i + marker.len()..];
            if i > 0 && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                return Some((&rest[..i], tmp));
            }
        }
    }
    None
}

/// Remove what interrupted saves left in `parent`: every `.<name>.tmp-<pid>` (never complete
/// until renamed) and every `.<name>.old-<pid>` — unless `<name>` itself is missing (a save
/// killed between its two renames), when the displaced old checkpoint is moved back instead.
pub fn clean_stale_in(parent: &Path) -> Result<()> {
    clean(parent, None)
}

/// [`clean_stale_in`] for the siblings of checkpoint `dir` only.
pub fn clean_stale_siblings(dir: &Path) -> Result<()> {
    let (parent, name) = split(dir);
    clean(&parent, Some(&name))
}

fn clean(parent: &Path, only: Option<&str>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let io = |p: &Path, what: &str, e: std::io::Error| ModelError::WeightFile { path: p.to_path_buf(), msg: format!("{what}: {e}") };
    let mut olds = Vec::new();
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().to_string();
        let Some((name, tmp)) = stale_sibling(&file_name) else { continue };
        if only.is_some_and(|o| o != name) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if tmp {
            std::fs::remove_dir_all(e.path()).map_err(|err| io(&e.path(), "remove a stale temporary checkpoint", err))?;
        } else {
            olds.push((e.path(), parent.join(name)));
        }
    }
    olds.sort();
    for (old, dir) in olds {
        if !dir.exists() {
            std::fs::rename(&old, &dir).map_err(|err| io(&old, "restore the displaced checkpoint", err))?;
            eprintln!("warning: {}: restored from {} (a save was interrupted between its renames)", dir.display(), old.display());
        } else {
            std::fs::remove_dir_all(&old).map_err(|err| io(&old, "remove a stale old checkpoint", err))?;
        }
    }
    Ok(())
}

/// Write checkpoint directory `dir` atomically on the real filesystem (see the module doc).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&DirWriter) -> std::io::Result<()>) -> Result<()> {
    write_dir_atomically_with(&RealFs, dir, fill)
}

/// [`write_dir_atomically`] through `fs`: stale siblings of `dir` cleaned, the temporary
/// sibling created and filled, the manifest written, every file and the temporary directory
/// fsynced, the old `dir` moved aside, the temporary one renamed into place, the parent fsynced,
/// the old one removed (a failure to remove it is left to the next clean). Errors name `dir` and
/// the step that failed.
pub fn write_dir_atomically_with(fs: &dyn CheckpointFs, dir: &Path, fill: impl FnOnce(&DirWriter) -> std::io::Result<()>) -> Result<()> {
    let io = |what: &'static str| move |e: std::io::Error| ModelError::WeightFile { path: dir.to_path_buf(), msg: format!("{what}: {e}") };
    let (parent, name) = split(dir);
    fs.create_dir_all(&parent).map_err(io("create the parent directory"))?;
    clean_stale_siblings(dir)?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    fs.create_dir_all(&tmp).map_err(io("create the temporary directory"))?;
    fill(&DirWriter { fs, dir: tmp.clone() }).map_err(io("write"))?;
    let manifest = build(&tmp).map_err(io("checksum the tensor files"))?;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| io("manifest")(std::io::Error::other(e)))?;
    fs.write_file(&tmp.join(MANIFEST), &|p| std::fs::write(p, &text)).map_err(io("write the manifest"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(&tmp).map_err(io("list the temporary directory"))? {
        let e = e.map_err(io("list the temporary directory"))?;
        if e.file_type().map_err(io("list the temporary directory"))?.is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    for f in &files {
        fs.sync(f).map_err(io("fsync"))?;
    }
    fs.sync(&tmp).map_err(io("fsync the temporary directory"))?;
    if dir.exists() {
        fs.rename(dir, &old).map_err(io("move the old checkpoint aside"))?;
    }
    if let Err(e) = fs.rename(&tmp, dir) {
        // put the old checkpoint back where it was (best effort: else the next clean does)
        if old.exists() && !dir.exists() {
            let _ = fs.rename(&old, dir);
        }
        return Err(io("rename into place")(e));
    }
    fs.sync(&parent).map_err(io("fsync the parent directory"))?;
    if old.exists() {
        let _ = fs.remove_dir_all(&old);
    }
    Ok(())
}
