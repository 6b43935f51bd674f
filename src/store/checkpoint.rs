//! A run's checkpoint: `runs/<id>/checkpoint` is a symlink to a complete directory
//! `ckpt-<step>-<n>/` (the LoRA tensors, the optimizer's moments, the best epoch's adapter and
//! `state.json`: cursor, attempt, evaluations so far). A checkpoint is built in a temporary
//! directory, every file fsynced, renamed to its final name, and only then does the symlink swap
//! to it; older ones are removed after. A checkpoint torn by a crash is never pointed at, so
//! it is never loaded: the previous one is. Only the latest is kept.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::atomic::{remove_stale_temps, swap_symlink, sync_dir, temp_name, write_atomic};
use super::paths::RunFiles;
use super::{Result, StoreError};

const LINK: &str = "checkpoint";
const STATE: &str = "state.json";

/// What every checkpoint's `state.json` holds besides the run's own state: the attempt that
/// wrote it and where training stood. Those who do not resume the run (the daemon settling a dead
/// one, a run saying where it stopped) read only this.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Header {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub attempt: u32,
    pub cursor: Position,
}

/// Where training stood: optimizer steps done, and the epoch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Position {
    pub step: u64,
    #[serde(default)]
    pub epoch: u64,
}

/// The latest complete checkpoint of a run: its directory and its `state.json` read as `T` (the
/// run's whole state, or just the [`Header`]), or the error naming the file when it does not have
/// `T`'s shape. A `state.json` that cannot be read or is not JSON at all counts as no checkpoint.
pub fn latest<T: DeserializeOwned>(files: &RunFiles) -> Option<(PathBuf, Result<T>)> {
    let link = files.dir.join(LINK);
    let target = std::fs::read_link(&link).ok()?;
    let dir = files.dir.join(target);
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<T>(&bytes) {
        Ok(state) => Some((dir, Ok(state))),
        Err(e) if e.is_data() => Some((dir, Err(StoreError::Corrupt { path, message: e.to_string() }))),
        Err(_) => None,
    }
}

/// A checkpoint being written: files go into [`Pending::dir`]; [`Pending::commit`] makes it the
/// latest.
pub struct Pending {
    run_dir: PathBuf,
    pub dir: PathBuf,
}

/// Starts a checkpoint in a fresh temporary directory of the run.
pub fn begin(files: &RunFiles) -> Result<Pending> {
    let dir = files.dir.join(temp_name("ckpt"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| StoreError::io(&dir, "clearing", e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, "creating", e))?;
    Ok(Pending { run_dir: files.dir.clone(), dir })
}

impl Pending {
    /// Writes `state` last, syncs everything, and swaps the run's `checkpoint` link to it.
    /// Returns the checkpoint's size in bytes.
    pub fn commit(self, state: &impl Serialize, step: u64) -> Result<u64> {
        let mut bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Corrupt { path: self.dir.clone(), message: e.to_string() })?;
        bytes.push(b'\n');
        write_atomic(&self.dir.join(STATE), &bytes)?;
        let size = sync_tree(&self.dir)?;
        let name = format!("ckpt-{step}-{}", unique());
        let dest = self.run_dir.join(&name);
        std::fs::rename(&self.dir, &dest).map_err(|e| StoreError::io(&dest, "renaming into place", e))?;
        sync_dir(&self.run_dir)?;
        crate::testhooks::crash_point("checkpoint.before_swap");
        swap_symlink(&self.run_dir, LINK, Path::new(&name))?;
        // Older checkpoints (and a crashed writer's leftovers) go once the new one is in place.
        for e in std::fs::read_dir(&self.run_dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ckpt-") && n != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        remove_stale_temps(&self.run_dir);
        Ok(size)
    }
}

/// Removes a run's checkpoints (the run has ended; they are no longer needed).
pub fn remove(files: &RunFiles) {
    let _ = std::fs::remove_file(files.dir.join(LINK));
    for e in std::fs::read_dir(&files.dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("ckpt-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn unique() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}{:09}", t.as_secs(), t.subsec_nanos())
}

/// fsyncs every file and directory under `dir`; returns the bytes in files.
fn sync_tree(dir: &Path) -> Result<u64> {
    let mut size = 0;
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, "listing", e))?.flatten() {
        let p = e.path();
        if p.is_dir() {
            size += sync_tree(&p)?;
        } else {
            let f = std::fs::File::open(&p).map_err(|e| StoreError::io(&p, "opening", e))?;
            f.sync_all().map_err(|e| StoreError::io(&p, "syncing", e))?;
            size += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    sync_dir(dir)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_committed_checkpoint_is_loaded_and_only_the_latest_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let files = RunFiles::new(d.path());
        assert!(latest::<Header>(&files).is_none());
        let p = begin(&files).unwrap();
        std::fs::write(p.dir.join("a"), b"one").unwrap();
        p.commit(&serde_json::json!({"attempt": 1, "cursor": {"step": 1}}), 1).unwrap();
        // A second one, torn before its commit: never seen.
        let p = begin(&files).unwrap();
        std::fs::write(p.dir.join("a"), b"two").unwrap();
        let (dir, state) = latest::<Header>(&files).unwrap();
        assert_eq!(state.unwrap().cursor.step, 1);
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"one");
        p.commit(&serde_json::json!({"attempt": 1, "cursor": {"step": 2}}), 2).unwrap();
        let (dir, state) = latest::<Header>(&files).unwrap();
        assert_eq!(state.unwrap().cursor.step, 2);
        // A state of another shape is an error naming the file, not "no checkpoint".
        let (_, wrong) = latest::<Position>(&files).unwrap();
        assert!(wrong.unwrap_err().to_string().contains("state.json"));
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"two");
        let ckpts = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
            .count();
        assert_eq!(ckpts, 1);
        remove(&files);
        assert!(latest::<Header>(&files).is_none());
    }
}
