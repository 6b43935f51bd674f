//! flock-based locks (std's `File::try_lock`): held exactly as long as the holder lives, so a
//! crash leaves nothing to clean. Lock files are never deleted.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{Result, StoreError};

/// A held exclusive lock; dropping it (or dying) releases it.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    pub path: PathBuf,
}

impl FileLock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io(path, "opening lock file", e))
    }

    /// Takes the lock without waiting: `Ok(None)` when another process holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { file, path: path.to_path_buf() })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(StoreError::io(path, "locking", e)),
        }
    }

    /// Takes the lock, waiting for the holder to release it (for short critical sections such
    /// as one feedback append, never for a whole run).
    pub fn acquire(path: &Path) -> Result<Self> {
        let file = Self::open(path)?;
        file.lock().map_err(|e| StoreError::io(path, "locking", e))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    /// Records the holder's pid in the lock file (for messages; the lock itself is the truth).
    pub fn write_pid(&mut self) -> Result<()> {
        let pid = std::process::id().to_string();
        self.file.set_len(0).map_err(|e| StoreError::io(&self.path, "truncating", e))?;
        self.file.rewind().map_err(|e| StoreError::io(&self.path, "seeking", e))?;
        self.file.write_all(pid.as_bytes()).map_err(|e| StoreError::io(&self.path, "writing pid", e))?;
        self.file.sync_all().map_err(|e| StoreError::io(&self.path, "syncing", e))
    }
}

/// Another process holds a lock that admits one holder per root (the daemon's, serve's).
#[derive(Debug, thiserror::Error)]
#[error("another rerankd {what} ({}) holds {}; one {what} per root", pid.map_or("another process".to_string(), |p| format!("pid {p}")), lock.display())]
pub struct Held {
    pub what: &'static str,
    pub pid: Option<u32>,
    pub lock: PathBuf,
}

impl Held {
    /// The refusal for `lock`, naming its holder's pid when the file records one.
    pub fn at(what: &'static str, lock: &Path) -> Self {
        Self { what, pid: holder_pid(lock), lock: lock.to_path_buf() }
    }
}

/// Whether some process holds the lock at `path` now (probing takes and drops it).
pub fn is_held(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    Ok(FileLock::try_acquire(path)?.is_none())
}

/// The pid written in a lock file, if any.
pub fn holder_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}
