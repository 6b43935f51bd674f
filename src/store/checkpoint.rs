//! A run's checkpoint: `runs/<id>/checkpoint` is a symlink to a complete directory
//! `ckpt-<step>-<n>/` (the LoRA tensors, the optimizer's moments, the best epoch's adapter,
//! `state.json`: cursor, attempt, evaluations so far, and `seal.json`: the sha256 of every other
//! file). A checkpoint is built in a temporary directory, its seal written last, every file
//! fsynced, renamed to its final name, and only then does the symlink swap to it.
//!
//! A checkpoint proves itself: [`latest`] takes the newest one whose every file matches its seal,
//! and names each it skipped ([`Checked::damaged`]: a flipped byte, a missing or extra file, a
//! torn state). The one before the latest is kept until a newer one is committed and verified, so
//! that a damaged latest falls back to it rather than to nothing. A checkpoint torn by a crash is
//! never pointed at, so it is never loaded. Checkpoints of a version before [`SEALED_SINCE`] (an
//! older rerankd's) have no seal and are taken as they are.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::atomic::{remove_stale_temps, sha256_file, swap_symlink, sync_dir, temp_name, write_atomic};
use super::paths::RunFiles;
use super::{Result, StoreError};

const LINK: &str = "checkpoint";
const STATE: &str = "state.json";
const SEAL: &str = "seal.json";

/// The first checkpoint version that is sealed: one of it or later without a seal is damaged.
pub const SEALED_SINCE: u32 = 2;

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

/// `seal.json`: the digest of every other file of the checkpoint, by its path inside it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Seal {
    files: std::collections::BTreeMap<String, String>,
}

/// What [`latest`] found: the newest checkpoint that proved itself (its directory and its
/// `state.json` read as `T`, or the error naming the file when it does not have `T`'s shape), and
/// every newer one it skipped, with why.
pub struct Checked<T> {
    pub found: Option<(PathBuf, Result<T>)>,
    pub damaged: Vec<(PathBuf, String)>,
}

/// The latest checkpoint of a run that proves itself, newest first: the one the link points at,
/// then the others by step. `None` when there is none; see [`checked`] for those skipped.
pub fn latest<T: DeserializeOwned>(files: &RunFiles) -> Option<(PathBuf, Result<T>)> {
    checked(files).found
}

/// [`latest`], with the checkpoints it skipped as damaged.
pub fn checked<T: DeserializeOwned>(files: &RunFiles) -> Checked<T> {
    let mut damaged = Vec::new();
    for dir in candidates(files) {
        match verify(&dir) {
            Ok(()) => {}
            Err(why) => {
                damaged.push((dir, why));
                continue;
            }
        }
        let path = dir.join(STATE);
        let found = match std::fs::read(&path).map(|b| serde_json::from_slice::<T>(&b)) {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(e)) if e.is_data() => Err(StoreError::Corrupt { path, message: e.to_string() }),
            Ok(Err(e)) => {
                damaged.push((dir, format!("{STATE} is not JSON: {e}")));
                continue;
            }
            Err(e) => {
                damaged.push((dir, format!("{STATE} cannot be read: {e}")));
                continue;
            }
        };
        return Checked { found: Some((dir, found)), damaged };
    }
    Checked { found: None, damaged }
}

/// The run's complete checkpoints, newest first: the link's target, then every other
/// `ckpt-<step>-<n>` by step and `n`, descending.
fn candidates(files: &RunFiles) -> Vec<PathBuf> {
    let linked = std::fs::read_link(files.dir.join(LINK)).ok().map(|t| files.dir.join(t));
    let mut others: Vec<((u64, u128), PathBuf)> = std::fs::read_dir(&files.dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (step, n) = name.strip_prefix("ckpt-")?.split_once('-')?;
            Some(((step.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .filter(|(_, p)| Some(p) != linked.as_ref())
        .collect();
    others.sort_by_key(|o| std::cmp::Reverse(o.0));
    linked.into_iter().chain(others.into_iter().map(|(_, p)| p)).collect()
}

/// That every file of the checkpoint `dir` matches its seal and none is missing or unsealed; a
/// checkpoint older than [`SEALED_SINCE`] without a seal passes as it is.
fn verify(dir: &Path) -> std::result::Result<(), String> {
    let seal_path = dir.join(SEAL);
    let seal: Seal = match std::fs::read(&seal_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{SEAL} is damaged: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match std::fs::read(dir.join(STATE)).map(|b| serde_json::from_slice::<Header>(&b)) {
                Ok(Ok(h)) if h.version < SEALED_SINCE => Ok(()),
                Ok(Ok(h)) => Err(format!("{SEAL} is missing (a version {} checkpoint is sealed)", h.version)),
                Ok(Err(e)) => Err(format!("{SEAL} is missing and {STATE} is damaged: {e}")),
                Err(e) => Err(format!("{SEAL} and {STATE} cannot be read: {e}")),
            };
        }
        Err(e) => return Err(format!("{SEAL} cannot be read: {e}")),
    };
    let on_disk = file_list(dir).map_err(|e| e.to_string())?;
    for rel in &on_disk {
        if !seal.files.contains_key(rel) {
            return Err(format!("{rel} is not in its seal"));
        }
    }
    for (rel, want) in &seal.files {
        if !on_disk.contains(rel) {
            return Err(format!("{rel} is missing"));
        }
        let got = sha256_file(&dir.join(rel)).map_err(|e| e.to_string())?;
        if &got != want {
            return Err(format!("{rel} does not match its seal (sha256 {got}, sealed {want})"));
        }
    }
    Ok(())
}

/// Every file under `dir` but the seal, by its `/`-separated path inside it.
fn file_list(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeSet<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, "listing", e))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out)?;
            } else if let Ok(rel) = p.strip_prefix(base) {
                let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                if rel != SEAL {
                    out.insert(rel);
                }
            }
        }
        Ok(())
    }
    let mut out = std::collections::BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
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
    /// Writes `state`, then the seal of every file, syncs everything, and swaps the run's
    /// `checkpoint` link to it; once it reads back whole from its final place, every checkpoint
    /// but it and the one before it goes. Returns the checkpoint's size in bytes.
    pub fn commit(self, state: &impl Serialize, step: u64) -> Result<u64> {
        let mut bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Corrupt { path: self.dir.clone(), message: e.to_string() })?;
        bytes.push(b'\n');
        write_atomic(&self.dir.join(STATE), &bytes)?;
        let mut seal = Seal { files: Default::default() };
        for rel in file_list(&self.dir)? {
            let digest = sha256_file(&self.dir.join(&rel))?;
            seal.files.insert(rel, digest);
        }
        write_atomic(&self.dir.join(SEAL), &serde_json::to_vec_pretty(&seal).unwrap_or_default())?;
        let size = sync_tree(&self.dir)?;
        let name = format!("ckpt-{step}-{}", unique());
        let dest = self.run_dir.join(&name);
        std::fs::rename(&self.dir, &dest).map_err(|e| StoreError::io(&dest, "renaming into place", e))?;
        sync_dir(&self.run_dir)?;
        crate::testhooks::crash_point("checkpoint.before_swap");
        swap_symlink(&self.run_dir, LINK, Path::new(&name))?;
        // Older checkpoints (and a crashed writer's leftovers) go once the new one is in place
        // and proves itself; the newest older one that proves itself stays, for a latest that
        // turns out damaged.
        if verify(&dest).is_ok() {
            let files = RunFiles::new(&self.run_dir);
            let keep = candidates(&files).into_iter().find(|d| *d != dest && verify(d).is_ok());
            for e in std::fs::read_dir(&self.run_dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("ckpt-") && n != name && Some(e.path()) != keep {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        remove_stale_temps(&self.run_dir);
        Ok(size)
    }
}

impl Drop for Pending {
    /// A checkpoint that was not committed (its writer failed: a full disk) leaves nothing behind
    /// to fill the disk further; a committed one was renamed away and this finds nothing.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The free space, in MB, a run that met a full disk waits for before its next attempt: room
/// for two of its checkpoints (the new one is written beside the old) and 1 MB for its logs.
pub fn space_needed_mb(files: &RunFiles) -> u64 {
    let size = candidates(files).first().map_or(0, |d| tree_bytes(d));
    (2 * size).div_ceil(1 << 20) + 1
}

/// The bytes in the files under `dir` (0 for what cannot be read).
fn tree_bytes(dir: &Path) -> u64 {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
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

    fn ckpts(d: &Path) -> usize {
        std::fs::read_dir(d).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-")).count()
    }

    fn commit(files: &RunFiles, step: u64, content: &[u8]) -> PathBuf {
        let p = begin(files).unwrap();
        std::fs::write(p.dir.join("a"), content).unwrap();
        std::fs::create_dir(p.dir.join("best")).unwrap();
        std::fs::write(p.dir.join("best/b"), content).unwrap();
        p.commit(&serde_json::json!({"version": SEALED_SINCE, "attempt": 1, "cursor": {"step": step}}), step).unwrap();
        latest::<Header>(files).unwrap().0
    }

    #[test]
    fn only_a_committed_checkpoint_is_loaded_and_the_last_two_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let files = RunFiles::new(d.path());
        assert!(latest::<Header>(&files).is_none());
        commit(&files, 1, b"one");
        // A second one, torn before its commit: never seen.
        let p = begin(&files).unwrap();
        std::fs::write(p.dir.join("a"), b"two").unwrap();
        let (dir, state) = latest::<Header>(&files).unwrap();
        assert_eq!(state.unwrap().cursor.step, 1);
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"one");
        p.commit(&serde_json::json!({"version": SEALED_SINCE, "attempt": 1, "cursor": {"step": 2}}), 2).unwrap();
        let (dir, state) = latest::<Header>(&files).unwrap();
        assert_eq!(state.unwrap().cursor.step, 2);
        // A state of another shape is an error naming the file, not "no checkpoint".
        let (_, wrong) = latest::<Position>(&files).unwrap();
        assert!(wrong.unwrap_err().to_string().contains("state.json"));
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"two");
        assert_eq!(ckpts(d.path()), 2);
        commit(&files, 3, b"three");
        assert_eq!(ckpts(d.path()), 2, "the latest and the one before it");
        remove(&files);
        assert!(latest::<Header>(&files).is_none());
    }

    /// A flipped byte in any file (a tensor, one in a subdirectory, the state, the seal), a file
    /// missing or added, or a sealed version's seal removed: the latest is named as damaged and
    /// the one before it taken; with both damaged, none.
    #[test]
    fn a_damaged_checkpoint_is_named_and_the_one_before_it_taken() {
        let flip = |p: &Path| {
            let mut b = std::fs::read(p).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x10;
            std::fs::write(p, b).unwrap();
        };
        type Damage = fn(&Path, &dyn Fn(&Path));
        let cases: [(&str, Damage); 7] = [
            ("a", |d, flip| flip(&d.join("a"))),
            ("best/b", |d, flip| flip(&d.join("best/b"))),
            ("state.json", |d, _| {
                let s = std::fs::read_to_string(d.join("state.json")).unwrap().replace("\"step\": 2", "\"step\": 9");
                std::fs::write(d.join("state.json"), s).unwrap();
            }),
            ("seal (flipped)", |d, flip| flip(&d.join("seal.json"))),
            ("a is missing", |d, _| std::fs::remove_file(d.join("a")).unwrap()),
            ("extra is not in its seal", |d, _| std::fs::write(d.join("extra"), b"x").unwrap()),
            ("seal.json is missing", |d, _| std::fs::remove_file(d.join("seal.json")).unwrap()),
        ];
        for (what, damage) in cases {
            let d = tempfile::tempdir().unwrap();
            let files = RunFiles::new(d.path());
            let first = commit(&files, 1, b"one");
            let second = commit(&files, 2, b"two two");
            damage(&second, &flip);
            let c = checked::<Header>(&files);
            let (dir, state) = c.found.expect(what);
            assert_eq!((dir, state.unwrap().cursor.step), (first.clone(), 1), "{what}");
            assert_eq!(c.damaged.len(), 1, "{what}");
            assert_eq!(c.damaged[0].0, second, "{what}");
            let name = what.split(' ').next().unwrap();
            assert!(c.damaged[0].1.contains(name), "{what}: {}", c.damaged[0].1);
            flip(&first.join("a"));
            let c = checked::<Header>(&files);
            assert!(c.found.is_none(), "{what}: both damaged");
            assert_eq!(c.damaged.len(), 2, "{what}");
        }
    }

    /// An older rerankd's checkpoint (version 1, no seal) is taken as it is.
    #[test]
    fn a_checkpoint_from_before_seals_is_taken_as_it_is() {
        let d = tempfile::tempdir().unwrap();
        let files = RunFiles::new(d.path());
        let dir = d.path().join("ckpt-5-1");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("state.json"), br#"{"version": 1, "attempt": 1, "cursor": {"step": 5}}"#).unwrap();
        std::os::unix::fs::symlink("ckpt-5-1", d.path().join(LINK)).unwrap();
        let c = checked::<Header>(&files);
        assert_eq!(c.found.unwrap().1.unwrap().cursor.step, 5);
        assert!(c.damaged.is_empty());
    }
}
