//! The one way a state file is written: temp file in the same directory, fsync, rename over the
//! target, fsync the directory. Readers see the old file or the new one, never a mix.

use std::io::Write;
use std::path::Path;

use super::{Result, StoreError};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(temp_name(&name));
    let mut f = std::fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, "creating", e))?;
    f.write_all(bytes).map_err(|e| StoreError::io(&tmp, "writing", e))?;
    f.sync_all().map_err(|e| StoreError::io(&tmp, "syncing", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, "renaming into place", e))?;
    sync_dir(dir)
}

/// Points `dir/name` at `target` (relative to `dir`) by renaming a new symlink over it: readers
/// see the old target or the new one, never neither.
pub fn swap_symlink(dir: &Path, name: &str, target: &Path) -> Result<()> {
    let tmp = dir.join(temp_name(name));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| StoreError::io(&tmp, "creating symlink", e))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| StoreError::io(dir, "swapping a symlink", e))?;
    sync_dir(dir)
}

/// fsync a directory so a rename or create in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| StoreError::io(dir, "opening directory", e))?;
    d.sync_all().map_err(|e| StoreError::io(dir, "syncing directory", e))
}

/// `write_atomic` of a JSON value, pretty-printed with a trailing newline.
pub fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| StoreError::Corrupt { path: path.into(), message: e.to_string() })?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Reads a JSON file into `T`, naming the file on error.
/// A JSONL file of `T`, every non-blank line (an absent file is empty); a bad line is an error
/// naming the file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(path, "reading", e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: format!("line {}: {e}", i + 1) })
        })
        .collect()
}

/// Writes `items` as JSONL, atomically.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut out = String::new();
    for x in items {
        let line = serde_json::to_string(x)
            .map_err(|e| StoreError::Corrupt { path: path.to_path_buf(), message: format!("serializing: {e}") })?;
        out.push_str(&line);
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| StoreError::io(path, "reading", e))?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt { path: path.into(), message: e.to_string() })
}

/// The name of a temporary sibling of `name` owned by this process: `.<name>.tmp.<pid>`. Every
/// temporary file and directory under the root is named this way, so [`remove_stale_temps`] can
/// tell a crashed writer's leftovers from a live writer's work.
pub fn temp_name(name: &str) -> String {
    format!(".{name}.tmp.{}", std::process::id())
}

/// Removes `.<name>.tmp.<pid>` files and directories in `dir` whose writer (`pid`) is dead: the
/// leftovers of crashes. A live pid's temp is left alone. Returns how many went.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp.")).and_then(|(_, p)| p.parse().ok())
        else {
            continue;
        };
        if crate::sys::pid_alive(pid) {
            continue;
        }
        let p = e.path();
        let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `sha256:<hex>` of a file's bytes, read in blocks.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| StoreError::io(path, "opening", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| StoreError::io(path, "reading", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()))
}
