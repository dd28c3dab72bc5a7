//! Fault injection into checkpoint saves: the Nth filesystem operation of a save (a write, an
//! fsync, a rename, a removal) fails — and, as after a crash, every one after it — for every N
//! of a whole save. Afterwards, once the stale siblings are cleaned (what a restart does), the
//! directory holds the old or the new checkpoint, complete, manifest-checked and resumable;
//! never a torn one.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};
use lockstep_trainer::checkpoint::{clean_stale_siblings, CheckpointFs, RealFs, MANIFEST};
use lockstep_trainer::logprobs::token_logprobs;
use lockstep_trainer::optim::AdamWConfig;
use lockstep_trainer::trainer::{replay_from_recording, TrainBatch, Trainer, TrainerConfig};

/// The real filesystem until operation `fail_at` (0-based), which fails — a failing write
/// leaves half its file behind (torn) — and so does every later one (the process is gone).
struct FaultyFs {
    fail_at: usize,
    log: RefCell<Vec<String>>,
}

impl FaultyFs {
    fn new(fail_at: usize) -> Self {
        Self { fail_at, log: RefCell::new(Vec::new()) }
    }
    /// Count an operation; Err once at or past `fail_at`.
    fn op(&self, what: String) -> std::io::Result<()> {
        let mut log = self.log.borrow_mut();
        let n = log.len();
        log.push(what.clone());
        if n >= self.fail_at {
            return Err(std::io::Error::other(format!("injected failure at operation {n} ({what})")));
        }
        Ok(())
    }
    fn fired(&self) -> bool {
        self.log.borrow().len() > self.fail_at
    }
}

impl CheckpointFs for FaultyFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.op(format!("mkdir {}", path.display()))?;
        RealFs.create_dir_all(path)
    }
    fn write_file(&self, path: &Path, write: &dyn Fn(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
        if let Err(e) = self.op(format!("write {}", path.display())) {
            // torn: the write got halfway
            if self.log.borrow().len() == self.fail_at + 1 && write(path).is_ok() {
                let len = std::fs::metadata(path)?.len();
                std::fs::OpenOptions::new().write(true).open(path)?.set_len(len / 2)?;
            }
            return Err(e);
        }
        RealFs.write_file(path, write)
    }
    fn sync(&self, path: &Path) -> std::io::Result<()> {
        self.op(format!("fsync {}", path.display()))?;
        RealFs.sync(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.op(format!("rename {} -> {}", from.display(), to.display()))?;
        RealFs.rename(from, to)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.op(format!("rm -r {}", path.display()))?;
        RealFs.remove_dir_all(path)
    }
}

fn micro_batch(model: &MoeCausalLm) -> TrainBatch {
    let tokens: Vec<u32> = (0..14).map(|i| (i * 7 + 3) % 256).collect();
    let batch = Batch::packed(&tokens, None, &[0, 14], &Device::Cpu).unwrap();
    let rec = model.forward(&batch, &RoutingPlan::record()).unwrap();
    let (logp, _) = token_logprobs(&rec.logits, &batch).unwrap();
    let mask: Vec<f32> = (0..14).map(|i| if i >= 5 { 1.0 } else { 0.0 }).collect();
    TrainBatch { batch, logp_infer: logp.flatten_all().unwrap().to_vec1().unwrap(), advantages: mask.clone(), loss_mask: mask, routes: replay_from_recording(&rec.routes).unwrap(), old: None }
}

fn cfg() -> TrainerConfig {
    TrainerConfig { optimizer: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }, ..TrainerConfig::default() }
}

/// Bits of every parameter and the optimizer step: what identifies a checkpoint's state.
fn state(t: &Trainer) -> (u64, Vec<Vec<u32>>) {
    (t.optimizer.step, t.params.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()).collect())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

#[test]
fn a_save_failing_at_any_operation_leaves_the_old_or_the_new_checkpoint_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let model = MoeCausalLm::embedded_default(4, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model);
    let mut t = Trainer::new(model, cfg()).unwrap();
    t.step(std::slice::from_ref(&mb)).unwrap();
    let old_state = state(&t);
    let run_state = |s: &str| vec![("run_state.json", s.as_bytes().to_vec())];
    let golden = tmp.path().join("golden");
    t.save_with(&golden, &run_state("old")).unwrap();
    t.step(std::slice::from_ref(&mb)).unwrap();
    let new_state = state(&t);
    assert_ne!(old_state, new_state);

    for replace in [true, false] {
        let root = tmp.path().join(if replace { "replace" } else { "fresh" });
        let ck: PathBuf = root.join("step");
        let mut total = None;
        for n in 0.. {
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            if replace {
                copy_dir(&golden, &ck);
            }
            let fs = FaultyFs::new(n);
            let res = t.save_with_fs(&fs, &ck, &run_state("new"));
            if !fs.fired() {
                res.unwrap();
                total = Some(n);
                break;
            }
            // a crash at operation n; the restart cleans the leftovers
            clean_stale_siblings(&ck).unwrap();
            assert_eq!(names(&root).iter().filter(|n| n.starts_with('.')).count(), 0, "n = {n}: stale siblings left: {:?}", names(&root));
            if !ck.exists() {
                assert!(!replace, "n = {n}: the old checkpoint is gone ({:?})", fs.log.borrow());
                continue;
            }
            let resumed = Trainer::resume(&ck, cfg(), &Device::Cpu).unwrap_or_else(|e| panic!("n = {n}: not resumable: {e}\n{:?}", fs.log.borrow()));
            let got = state(&resumed);
            let marker = std::fs::read_to_string(ck.join("run_state.json")).unwrap();
            match marker.as_str() {
                "old" => assert_eq!(got, old_state, "n = {n}: old run_state with other weights"),
                "new" => assert_eq!(got, new_state, "n = {n}: new run_state with other weights"),
                other => panic!("n = {n}: run_state.json {other:?}"),
            }
            assert!(ck.join(MANIFEST).exists(), "n = {n}");
        }
        let total = total.unwrap();
        // mkdirs, 6 writes (config, model, optimizer, trainer_state, run_state, manifest), 6
        // fsyncs, the directory's, renames, the parent's fsync, the removal
        assert!(total >= 15, "{replace}: only {total} operations in a save");
        assert_eq!(state(&Trainer::resume(&ck, cfg(), &Device::Cpu).unwrap()), new_state);
        assert_eq!(std::fs::read_to_string(ck.join("run_state.json")).unwrap(), "new");
        assert_eq!(names(&root), vec!["step".to_string()]);
    }
}

#[test]
fn resume_checks_the_optimizer_state_against_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let model = MoeCausalLm::embedded_default(5, DType::F32, &Device::Cpu).unwrap();
    let mb = micro_batch(&model);
    let mut t = Trainer::new(model, cfg()).unwrap();
    t.step(std::slice::from_ref(&mb)).unwrap();
    let ck = tmp.path().join("ck");
    t.save(&ck).unwrap();
    let m = lockstep_model::manifest::read(&ck).unwrap().unwrap();
    assert_eq!(m.keys().collect::<Vec<_>>(), vec!["model.safetensors", "optimizer.safetensors"]);
    let opt = ck.join("optimizer.safetensors");
    let mut b = std::fs::read(&opt).unwrap();
    let n = b.len();
    b[n - 4] ^= 1;
    std::fs::write(&opt, b).unwrap();
    let e = Trainer::resume(&ck, cfg(), &Device::Cpu).err().expect("refused").to_string();
    assert!(e.contains("optimizer.safetensors") && e.contains("sha256"), "{e}");
    // extra files cannot shadow the checkpoint's own
    assert!(t.save_with(&tmp.path().join("x"), &[("trainer_state.json", vec![])]).is_err());
    assert!(t.save_with(&tmp.path().join("x"), &[(MANIFEST, vec![])]).is_err());
}
