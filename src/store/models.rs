//! Promoted adapters: `models/<corpus>/adapters/<run_id>/` (copies, never rewritten),
//! `models/<corpus>/current` (a symlink swapped atomically by rename, so readers never see a
//! half-written adapter), and `models/<corpus>/promotions.jsonl` (every change, append-only).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::atomic::sync_dir;
use super::time::now_rfc3339;
use super::{Result, Root, StoreError};

fn adapters_dir(root: &Root, corpus: &str) -> PathBuf {
    root.models(corpus).join("adapters")
}

/// The promoted run and its adapter directory, if the corpus has one.
pub fn current(root: &Root, corpus: &str) -> Option<(String, PathBuf)> {
    let link = root.models(corpus).join("current");
    let target = std::fs::read_link(&link).ok()?;
    let run_id = target.file_name()?.to_string_lossy().into_owned();
    let dir = adapters_dir(root, corpus).join(&run_id);
    dir.is_dir().then_some((run_id, dir))
}

/// Copies a run's adapter directory into `models/<corpus>/adapters/<run_id>/` (once).
fn install(root: &Root, corpus: &str, run_id: &str, src: &Path) -> Result<PathBuf> {
    let dest = adapters_dir(root, corpus).join(run_id);
    if dest.is_dir() {
        return Ok(dest);
    }
    let parent = adapters_dir(root, corpus);
    std::fs::create_dir_all(&parent).map_err(|e| StoreError::io(&parent, "creating", e))?;
    let tmp = parent.join(format!(".{run_id}.tmp.{}", std::process::id()));
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
fn point_current(root: &Root, corpus: &str, run_id: &str) -> Result<()> {
    let dir = root.models(corpus);
    let tmp = dir.join(format!(".current.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new("adapters").join(run_id), &tmp)
        .map_err(|e| StoreError::io(&tmp, "creating symlink", e))?;
    std::fs::rename(&tmp, dir.join("current")).map_err(|e| StoreError::io(&dir, "swapping current", e))?;
    sync_dir(&dir)
}

fn log(root: &Root, corpus: &str, mut entry: Value) -> Result<()> {
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

/// Every promotion, rollback and manual promotion of a corpus, oldest first.
pub fn promotions(root: &Root, corpus: &str) -> Vec<Value> {
    std::fs::read_to_string(root.models(corpus).join("promotions.jsonl"))
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Makes `run_id`'s adapter the corpus's current one; `details` (metrics, reason) are logged.
/// Returns the promoted adapter directory.
pub fn promote(root: &Root, corpus: &str, run_id: &str, adapter: &Path, how: &str, details: Value) -> Result<PathBuf> {
    let previous = current(root, corpus).map(|(id, _)| id);
    let dest = install(root, corpus, run_id, adapter)?;
    point_current(root, corpus, run_id)?;
    let mut entry = json!({"run_id": run_id, "previous": previous, "how": how, "path": dest});
    if let (Value::Object(e), Value::Object(d)) = (&mut entry, details) {
        e.extend(d);
    }
    log(root, corpus, entry)?;
    Ok(dest)
}

/// Restores the adapter that was current before the current one. Walks back one promotion per
/// call. Returns (from, to).
pub fn rollback(root: &Root, corpus: &str) -> std::result::Result<(String, String), String> {
    let (cur, _) = current(root, corpus).ok_or_else(|| format!("corpus `{corpus}` has no promoted adapter"))?;
    let history = promotions(root, corpus);
    let prev = history
        .iter()
        .rev()
        .find(|e| e["run_id"] == cur.as_str() && e["how"] != "rollback")
        .and_then(|e| e["previous"].as_str().map(str::to_string))
        .ok_or_else(|| format!("nothing to roll back to: {cur} was the first adapter promoted for `{corpus}`"))?;
    point_current(root, corpus, &prev).map_err(|e| e.to_string())?;
    log(root, corpus, json!({"run_id": prev, "previous": cur, "how": "rollback"})).map_err(|e| e.to_string())?;
    Ok((cur, prev))
}
