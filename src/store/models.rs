//! Promoted adapters: `models/<corpus>/adapters/<run_id>/` (copies, never rewritten),
//! `models/<corpus>/current` (a symlink swapped atomically by rename, so readers never see a
//! half-written adapter), `models/<corpus>/promotions.jsonl` (every change, append-only), and
//! `models/<corpus>/heldout/<run_id>.jsonl`: the dev lists of every promoted run, frozen at its
//! promotion, which later runs also evaluate on (so a new adapter cannot quietly forget).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::atomic::sync_dir;
use super::time::now_rfc3339;
use super::{Result, Root, StoreError};
use crate::ids::{CorpusName, RunId};

fn adapters_dir(root: &Root, corpus: &CorpusName) -> PathBuf {
    root.models(corpus).join("adapters")
}

fn heldout_dir(root: &Root, corpus: &CorpusName) -> PathBuf {
    root.models(corpus).join("heldout")
}

/// Freezes a run's dev lists (its `dev_lists.jsonl`, if it has one) as held-out lists.
fn freeze_heldout(root: &Root, corpus: &CorpusName, run_id: &RunId) -> Result<()> {
    let src = super::paths::RunFiles::new(&root.run_dir(run_id)).dev_lists();
    let bytes = match std::fs::read(&src) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(&src, "reading", e)),
    };
    let dir = heldout_dir(root, corpus);
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, "creating", e))?;
    super::atomic::write_atomic(&dir.join(format!("{run_id}.jsonl")), &bytes)
}

/// The held-out lists of the corpus's promotions, oldest promotion first: (run id, file). Only
/// runs the promotion log names count (a file left by a crash before the log entry does not).
pub fn heldout_files(root: &Root, corpus: &CorpusName) -> Vec<(RunId, PathBuf)> {
    let history = promotions(root, corpus);
    let mut seen: Vec<RunId> = Vec::new();
    for e in &history {
        if let Some(id) = e["run_id"].as_str().and_then(|s| RunId::parse(s).ok())
            && e["how"] != "rollback"
            && !seen.contains(&id)
        {
            seen.push(id);
        }
    }
    let dir = heldout_dir(root, corpus);
    seen.into_iter()
        .filter_map(|id| {
            let path = dir.join(format!("{id}.jsonl"));
            path.is_file().then_some((id, path))
        })
        .collect()
}

/// An adapter's `manifest.json`, written by its run beside it and read by everyone who scores
/// with it: the base model it was trained on, the instruction and max_length, what it was
/// trained for and how it did. One type for writing and reading.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub model: String,
    #[serde(default)]
    pub corpus: Option<CorpusName>,
    #[serde(default)]
    pub run_id: Option<RunId>,
    pub max_length: Option<usize>,
    pub instruction: Option<String>,
    #[serde(default)]
    pub primary_metric: Option<String>,
    /// The candidate's dev metrics, as evaluated (`null` where a metric was not a number).
    #[serde(default)]
    pub metrics: Option<std::collections::BTreeMap<String, Option<f64>>>,
    #[serde(default)]
    pub best_epoch: Option<usize>,
    /// The sha256 of every other file of the adapter directory, by name, filled in by
    /// [`Manifest::write`] and checked by [`Manifest::read`] (absent in an older rerankd's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<std::collections::BTreeMap<String, String>>,
}

const MANIFEST: &str = "manifest.json";

impl Manifest {
    /// The adapter's manifest, after every file it seals proved itself (a flipped byte, a file
    /// missing or added is an error naming the file): the one way an adapter is opened, to train
    /// on, promote, serve, score or export.
    pub fn read(adapter_dir: &Path) -> Result<Self> {
        let m: Self = super::atomic::read_json(&adapter_dir.join(MANIFEST))?;
        if let Some(files) = &m.files {
            let on_disk = adapter_files(adapter_dir)?;
            if let Some(extra) = on_disk.iter().find(|f| !files.contains_key(*f)) {
                let message = format!("not sealed by {MANIFEST}: the adapter directory was changed");
                return Err(StoreError::Corrupt { path: adapter_dir.join(extra), message });
            }
            for (name, want) in files {
                let path = adapter_dir.join(name);
                if !on_disk.contains(name) {
                    return Err(StoreError::Corrupt { path, message: format!("missing (sealed by {MANIFEST})") });
                }
                let got = super::atomic::sha256_file(&path)?;
                if &got != want {
                    let message = format!("damaged: sha256 {got}, {MANIFEST} sealed {want}");
                    return Err(StoreError::Corrupt { path, message });
                }
            }
        }
        Ok(m)
    }

    /// [`Manifest::read`], or `None` where the directory has no manifest (a PEFT adapter
    /// directory from elsewhere).
    pub fn read_if_present(adapter_dir: &Path) -> Result<Option<Self>> {
        if !adapter_dir.join(MANIFEST).exists() {
            return Ok(None);
        }
        Self::read(adapter_dir).map(Some)
    }

    /// Seals every other file of `adapter_dir` (written before it) and writes the manifest.
    pub fn write(&self, adapter_dir: &Path) -> Result<()> {
        let mut files = std::collections::BTreeMap::new();
        for name in adapter_files(adapter_dir)? {
            let digest = super::atomic::sha256_file(&adapter_dir.join(&name))?;
            files.insert(name, digest);
        }
        let sealed = Self { files: Some(files), ..self.clone() };
        super::atomic::write_json(&adapter_dir.join(MANIFEST), &sealed)
    }
}

/// An adapter directory, opened: its manifest read and every file it seals proved (or, for a
/// PEFT directory from elsewhere that [`Adapter::open_foreign`] accepts, no manifest). The one
/// way an adapter is resolved (adapter directory -> manifest -> base model, instruction,
/// max_length -> LoRA set), by serve, `score`, `export` and runs alike.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub manifest: Option<Manifest>,
}

impl Adapter {
    /// An adapter rerankd wrote (a run's candidate, a promoted one): its manifest is required.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self { dir: dir.to_path_buf(), manifest: Some(Manifest::read(dir)?) })
    }

    /// The promoted adapter `run` of `corpus` (current or not).
    pub fn promoted(root: &Root, corpus: &CorpusName, run: &RunId) -> Result<Self> {
        let dir = adapter_dir(root, corpus, run).ok_or_else(|| StoreError::Corrupt {
            path: adapters_dir(root, corpus).join(run.as_str()),
            message: format!("adapter {run} is missing"),
        })?;
        Self::open(&dir)
    }

    /// Any adapter directory a user names: a manifest, when present, is checked; a PEFT
    /// directory without one is taken as it is.
    pub fn open_foreign(dir: &Path) -> Result<Self> {
        Ok(Self { dir: dir.to_path_buf(), manifest: Manifest::read_if_present(dir)? })
    }

    /// The base model it was trained on, where its manifest says.
    pub fn base_model(&self) -> Option<&str> {
        self.manifest.as_ref().map(|m| m.model.as_str())
    }

    /// Its own instruction, where its manifest gives one.
    pub fn instruction(&self) -> Option<&str> {
        self.manifest.as_ref().and_then(|m| m.instruction.as_deref())
    }

    /// Its own max_length, where its manifest gives one.
    pub fn max_length(&self) -> Option<usize> {
        self.manifest.as_ref().and_then(|m| m.max_length)
    }

    /// The instruction prompts are built with: its own, else the template's.
    pub fn scoring_instruction(&self) -> String {
        self.instruction().unwrap_or(crate::model::prompt::DEFAULT_INSTRUCTION).to_string()
    }

    /// The max_length pairs are cut to: its own, else [`DEFAULT_MAX_LENGTH`].
    pub fn scoring_max_length(&self) -> usize {
        self.max_length().unwrap_or(DEFAULT_MAX_LENGTH)
    }

    /// Refuses an adapter trained on another base model than `model`.
    pub fn check_base(&self, model: &str) -> Result<()> {
        match self.base_model() {
            Some(m) if m != model => Err(StoreError::Corrupt {
                path: self.dir.clone(),
                message: format!("the adapter was trained on model `{m}`, this job uses `{model}`"),
            }),
            _ => Ok(()),
        }
    }

    /// Its LoRA weights on `device`, shaped for the model `cfg` describes.
    pub fn lora(
        &self,
        cfg: &crate::model::Qwen3Config,
        device: &candle_core::Device,
    ) -> Result<crate::model::lora::LoraSet> {
        crate::model::lora::LoraSet::load(&self.dir, cfg, device)
            .map_err(|e| StoreError::Corrupt { path: self.dir.clone(), message: format!("loading the adapter: {e}") })
    }
}

/// The regular files of an adapter directory but its manifest (an adapter is one flat directory).
fn adapter_files(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, "listing", e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST && !name.starts_with('.') && e.path().is_file() {
            out.insert(name);
        }
    }
    Ok(out)
}

/// max_length for a model with nothing to say otherwise (no manifest, no export info): what
/// serve, `score` and `export` all fall back to.
pub const DEFAULT_MAX_LENGTH: usize = 512;

/// The run id `current` points at, read from the link alone (a cheap probe for a change).
pub fn current_run(root: &Root, corpus: &CorpusName) -> Option<RunId> {
    let target = std::fs::read_link(root.models(corpus).join("current")).ok()?;
    RunId::parse(target.file_name()?.to_str()?).ok()
}

/// A promoted adapter (current or not) of a corpus: `models/<corpus>/adapters/<run_id>`.
pub fn adapter_dir(root: &Root, corpus: &CorpusName, run_id: &RunId) -> Option<PathBuf> {
    let dir = adapters_dir(root, corpus).join(run_id.as_str());
    dir.is_dir().then_some(dir)
}

/// The promoted run and its adapter directory, if the corpus has one.
pub fn current(root: &Root, corpus: &CorpusName) -> Option<(RunId, PathBuf)> {
    let run_id = current_run(root, corpus)?;
    let dir = adapters_dir(root, corpus).join(run_id.as_str());
    dir.is_dir().then_some((run_id, dir))
}

/// Copies a run's adapter directory into `models/<corpus>/adapters/<run_id>/` (once).
fn install(root: &Root, corpus: &CorpusName, run_id: &RunId, src: &Path) -> Result<PathBuf> {
    let dest = adapters_dir(root, corpus).join(run_id.as_str());
    if dest.is_dir() {
        return Ok(dest);
    }
    let parent = adapters_dir(root, corpus);
    std::fs::create_dir_all(&parent).map_err(|e| StoreError::io(&parent, "creating", e))?;
    let tmp = parent.join(super::atomic::temp_name(run_id));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| StoreError::io(&tmp, "creating", e))?;
    for entry in std::fs::read_dir(src).map_err(|e| StoreError::io(src, "listing", e))? {
        let p = entry.map_err(|e| StoreError::io(src, "listing", e))?.path();
        if p.is_file() {
            let to = tmp.join(p.file_name().unwrap_or_default());
            std::fs::copy(&p, &to).map_err(|e| StoreError::io(&to, "copying", e))?;
            std::fs::File::open(&to).and_then(|f| f.sync_all()).map_err(|e| StoreError::io(&to, "syncing", e))?;
        }
    }
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, "renaming into place", e))?;
    sync_dir(&parent)?;
    Ok(dest)
}

/// Points `current` at `adapters/<run_id>` by renaming a fresh symlink over it.
fn point_current(root: &Root, corpus: &CorpusName, run_id: &RunId) -> Result<()> {
    super::atomic::swap_symlink(&root.models(corpus), "current", &Path::new("adapters").join(run_id.as_str()))
}

fn log(root: &Root, corpus: &CorpusName, mut entry: Value) -> Result<()> {
    let path = root.models(corpus).join("promotions.jsonl");
    entry["ts"] = now_rfc3339().into();
    let mut line = entry.to_string();
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, "opening", e))?;
    f.write_all(line.as_bytes()).map_err(|e| StoreError::io(&path, "appending", e))?;
    f.sync_data().map_err(|e| StoreError::io(&path, "syncing", e))
}

/// Every promotion, rollback and undo of a corpus, oldest first (torn lines skipped).
pub fn promotions(root: &Root, corpus: &CorpusName) -> Vec<Value> {
    std::fs::read_to_string(root.models(corpus).join("promotions.jsonl"))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// The adapters a corpus has served, replayed from its history: a promotion pushes its run, a
/// rollback or an undo pops the run it replaced. The top is what `current` must point at.
/// Replaying a stack (rather than following `previous` links) is what makes rollback walk back
/// one promotion per call and stop at the first, however often a run was promoted.
pub fn served(history: &[Value]) -> Vec<RunId> {
    let mut stack: Vec<RunId> = Vec::new();
    for e in history {
        let run = e["run_id"].as_str().and_then(|s| RunId::parse(s).ok());
        match e["how"].as_str() {
            Some("rollback" | "undo") => {
                if stack.last().map(|r| r.as_str()) == e["previous"].as_str() {
                    stack.pop();
                }
                if let Some(r) = run
                    && stack.last() != Some(&r)
                {
                    stack.push(r); // an inconsistent old history: trust what was restored
                }
            }
            _ => stack.extend(run),
        }
    }
    stack
}

/// Makes `run_id`'s adapter the corpus's current one; `details` (metrics, reason) are logged.
/// Order: copy the adapter in, log the promotion (write-ahead), then swap `current`. A crash
/// after the log line and before the swap is repaired by [`reconcile`] (or undone by [`undo`]
/// if the run never completed). Returns the promoted adapter directory.
pub fn promote(
    root: &Root,
    corpus: &CorpusName,
    run_id: &RunId,
    adapter: &Path,
    how: &str,
    details: Value,
) -> Result<PathBuf> {
    let previous = current(root, corpus).map(|(id, _)| id);
    // Both the run's adapter and the installed copy prove themselves before anything points at
    // them (an older rerankd's unsealed adapter passes as it is).
    Manifest::read_if_present(adapter)?;
    let dest = install(root, corpus, run_id, adapter)?;
    Manifest::read_if_present(&dest)?;
    freeze_heldout(root, corpus, run_id)?;
    let mut entry = json!({"run_id": run_id, "previous": previous, "how": how, "path": dest});
    if let (Value::Object(e), Value::Object(d)) = (&mut entry, details) {
        e.extend(d);
    }
    crate::testhooks::crash_point("promote.before_log");
    log(root, corpus, entry)?;
    crate::testhooks::crash_point("promote.after_log");
    point_current(root, corpus, run_id)?;
    crate::testhooks::crash_point("promote.after_swap");
    Ok(dest)
}

/// Why a rollback cannot happen.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("corpus `{0}` has no promoted adapter")]
    NothingPromoted(CorpusName),
    #[error("nothing to roll back to: {0} is the first adapter promoted for `{1}`")]
    First(RunId, CorpusName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Restores the adapter that was served before the current one: one promotion back per call,
/// stopping at the first. Returns (from, to).
pub fn rollback(root: &Root, corpus: &CorpusName) -> std::result::Result<(RunId, RunId), RollbackError> {
    reconcile(root, corpus)?;
    let stack = served(&promotions(root, corpus));
    let (cur, prev) = match stack.as_slice() {
        [] => return Err(RollbackError::NothingPromoted(corpus.clone())),
        [only] => return Err(RollbackError::First(only.clone(), corpus.clone())),
        [.., p, c] => (c.clone(), p.clone()),
    };
    log(root, corpus, json!({"run_id": prev, "previous": cur, "how": "rollback"}))?;
    point_current(root, corpus, &prev)?;
    Ok((cur, prev))
}

/// A run that promoted itself and then did not complete (killed, cancelled by escalation, a
/// write that failed after the swap) must not stay current: restore what was served before it
/// (or no adapter, if it was the first) and log an `undo` with the reason. Idempotent; does
/// nothing unless `run_id` is on top of the served stack. Returns whether it changed anything.
pub fn undo(root: &Root, corpus: &CorpusName, run_id: &RunId, reason: &str) -> Result<bool> {
    let stack = served(&promotions(root, corpus));
    if stack.last() != Some(run_id) {
        // Not logged as promoted: `current` cannot point at it (the log comes first), unless an
        // older build swapped first; repair that too.
        if current(root, corpus).is_some_and(|(c, _)| &c == run_id) {
            return reconcile(root, corpus).map(|r| r.is_some());
        }
        return Ok(false);
    }
    let restore = stack.len().checked_sub(2).map(|i| stack[i].clone());
    log(root, corpus, json!({"run_id": restore, "previous": run_id, "how": "undo", "reason": reason}))?;
    match &restore {
        Some(prev) => point_current(root, corpus, prev)?,
        None => {
            let link = root.models(corpus).join("current");
            match std::fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::io(&link, "removing", e));
                }
                _ => sync_dir(&root.models(corpus))?,
            }
        }
    }
    Ok(true)
}

/// Points `current` at the top of the served stack if it points elsewhere (a crash between the
/// log line and the swap). Returns the run now current when it changed anything.
pub fn reconcile(root: &Root, corpus: &CorpusName) -> Result<Option<RunId>> {
    let Some(top) = served(&promotions(root, corpus)).pop() else { return Ok(None) };
    if current(root, corpus).is_some_and(|(c, _)| c == top) || !adapters_dir(root, corpus).join(top.as_str()).is_dir() {
        return Ok(None);
    }
    point_current(root, corpus, &top)?;
    Ok(Some(top))
}

/// The corpora that have a `models/<corpus>/` directory.
pub fn corpora(root: &Root) -> Vec<CorpusName> {
    super::paths::names_in(&root.dir.join("models"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(run: &str, prev: Option<&str>, how: &str) -> Value {
        json!({"run_id": run, "previous": prev, "how": how})
    }

    #[test]
    fn rollback_after_a_manual_repromotion_ends() {
        // A (auto), B (auto), A by hand: rollback walks B, A, then stops.
        let mut h = vec![ev("A", None, "auto"), ev("B", Some("A"), "auto"), ev("A", Some("B"), "manual")];
        let mut seen = Vec::new();
        loop {
            let s = served(&h);
            let [.., p, c] = s.as_slice() else { break };
            seen.push(p.clone());
            h.push(ev(p, Some(c), "rollback"));
        }
        assert_eq!(seen, ["B", "A"]);
    }

    #[test]
    fn undo_pops_the_unfinished_run() {
        let h = vec![
            ev("A", None, "auto"),
            ev("B", Some("A"), "auto"),
            json!({"run_id": "A", "previous": "B", "how": "undo"}),
        ];
        assert_eq!(served(&h), ["A"]);
        let h = vec![ev("A", None, "auto"), json!({"run_id": null, "previous": "A", "how": "undo"})];
        assert!(served(&h).is_empty());
    }
}
