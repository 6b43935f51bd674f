//! Where everything lives under the state root.

use std::path::{Path, PathBuf};

use super::{Result, StoreError};
use crate::ids::{CorpusName, RunId};

#[derive(Debug, Clone)]
pub struct Root {
    pub dir: PathBuf,
}

impl Root {
    /// Removes crashed writers' temporary files wherever the store makes them; how many.
    pub fn remove_stale_temps(&self) -> usize {
        let mut dirs = vec![self.runs(), self.accepted(), self.rejected(), self.dir.clone()];
        for parent in [self.runs(), self.dir.join("models")] {
            if let Ok(rd) = std::fs::read_dir(&parent) {
                dirs.extend(rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        // Each corpus's promoted adapters: models/<corpus>/adapters.
        if let Ok(rd) = std::fs::read_dir(self.dir.join("models")) {
            dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join("adapters")).filter(|p| p.is_dir()));
        }
        dirs.iter().map(|d| super::atomic::remove_stale_temps(d)).sum()
    }

    /// `--root`, else `$RERANKD_ROOT`, else the platform default.
    pub fn resolve(arg: Option<&Path>) -> Self {
        let dir = arg
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("RERANKD_ROOT").map(PathBuf::from))
            .unwrap_or_else(default_root);
        Self { dir }
    }

    /// Every directory of the layout, the root first.
    fn layout(&self) -> [PathBuf; 10] {
        [
            self.dir.clone(),
            self.spool(),
            self.spool_tmp(),
            self.claimed(),
            self.accepted(),
            self.rejected(),
            self.runs(),
            self.locks(),
            self.dir.join("models"),
            self.dir.join("corpora"),
        ]
    }

    /// Creates what is missing of the layout, 0700 whatever the umask. Idempotent; existing
    /// directories keep their modes (the daemon checks them and says what is wrong).
    pub fn ensure(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in self.layout().iter().filter(|d| d.symlink_metadata().is_err()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| StoreError::io(d, "creating directory", e))?;
        }
        Ok(())
    }

    /// Why the root is unsafe to run on: a directory under it owned by someone else, or writable
    /// by others (who could then plant jobs, data, runs or cancel sentinels and make this daemon
    /// train on anything), or not a directory at all. Checks the root, every directory of the
    /// layout and each corpus's data and models directory. Empty when all is well.
    pub fn permission_problems(&self) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let uid = crate::sys::uid();
        let mut dirs = self.layout().to_vec();
        for parent in [self.dir.join("corpora"), self.dir.join("models")] {
            if let Ok(rd) = std::fs::read_dir(&parent) {
                dirs.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
        let mut out = Vec::new();
        for dir in dirs {
            let shown = dir.display();
            match std::fs::metadata(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => out.push(format!("{shown}: {e}")),
                Ok(m) if !m.is_dir() => {
                    out.push(format!("{shown} is not a directory; move it away so the layout can be created"))
                }
                Ok(m) if m.uid() != uid => out.push(format!(
                    "{shown} is owned by uid {}, not by you (uid {uid}); run `chown -R $(id -un) {shown}` as its owner or root",
                    m.uid()
                )),
                Ok(m) if m.mode() & 0o022 != 0 => out.push(format!(
                    "{shown} is writable by other users (mode {:o}); run `chmod go-w {shown}`",
                    m.mode() & 0o777
                )),
                Ok(_) => {}
            }
        }
        out
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn daemon_lock(&self) -> PathBuf {
        self.dir.join("daemon.lock")
    }
    /// Held by the running `rerankd serve` (one per root).
    pub fn serve_lock(&self) -> PathBuf {
        self.dir.join("serve.lock")
    }
    pub fn serve_json(&self) -> PathBuf {
        self.dir.join("serve.json")
    }
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }
    pub fn spool_tmp(&self) -> PathBuf {
        self.spool().join("tmp")
    }
    /// Job files taken from the spool by rename, not yet accepted or rejected.
    pub fn claimed(&self) -> PathBuf {
        self.spool().join(".claimed")
    }
    pub fn accepted(&self) -> PathBuf {
        self.spool().join("accepted")
    }
    pub fn rejected(&self) -> PathBuf {
        self.spool().join("rejected")
    }
    pub fn runs(&self) -> PathBuf {
        self.dir.join("runs")
    }
    pub fn run_dir(&self, run_id: &RunId) -> PathBuf {
        self.runs().join(run_id.as_str())
    }
    pub fn locks(&self) -> PathBuf {
        self.dir.join("locks")
    }
    /// Where a detached daemon's output goes.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// Opens `logs/<name>` for appending (creating the directory).
    pub fn open_log(&self, name: &str) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(self.logs())?;
        std::fs::OpenOptions::new().create(true).append(true).open(self.logs().join(name))
    }
    /// The pid file of a detached daemon.
    pub fn daemon_pid_file(&self) -> PathBuf {
        self.dir.join("daemon.pid")
    }
    pub fn corpus_lock(&self, corpus: &CorpusName) -> PathBuf {
        self.locks().join(format!("{corpus}.lock"))
    }
    pub fn models(&self, corpus: &CorpusName) -> PathBuf {
        self.dir.join("models").join(corpus.as_str())
    }
    pub fn corpus_home(&self, corpus: &CorpusName) -> PathBuf {
        self.dir.join("corpora").join(corpus.as_str())
    }
    /// The corpora with a home under `corpora/` (valid names only).
    pub fn corpus_homes(&self) -> Vec<CorpusName> {
        names_in(&self.dir.join("corpora"))
    }
}

fn default_root() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    if cfg!(target_os = "macos") {
        home.join("Library/Application Support/rerankd")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".local/state"))
            .join("rerankd")
    }
}

/// The files of one run directory.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }
    pub fn job(&self) -> PathBuf {
        self.dir.join("job.json")
    }
    /// The output of the run's on_finish hook.
    pub fn hook_log(&self) -> PathBuf {
        self.dir.join("on_finish.log")
    }
    /// Creates (or empties) the hook's output file.
    pub fn create_hook_log(&self) -> std::io::Result<std::fs::File> {
        std::fs::File::create(self.hook_log())
    }
    /// The last `bytes` of the hook's output, as text.
    pub fn hook_log_tail(&self, bytes: usize) -> String {
        let all = std::fs::read(self.hook_log()).unwrap_or_default();
        String::from_utf8_lossy(&all[all.len().saturating_sub(bytes)..]).into_owned()
    }
    /// When the run was created: its job.json, which is never rewritten.
    pub fn created(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(self.job()).and_then(|m| m.modified()).ok()
    }
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn cancel(&self) -> PathBuf {
        self.dir.join("cancel")
    }
    pub fn triplets(&self) -> PathBuf {
        self.dir.join("triplets.jsonl")
    }
    pub fn eval(&self) -> PathBuf {
        self.dir.join("eval.json")
    }
    pub fn adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }
    /// `rerankd pause` asks a run to checkpoint and stop as `paused` by creating this file
    /// (see [`super::stop`]).
    pub fn pause(&self) -> PathBuf {
        self.dir.join("pause")
    }
    /// The daemon asks one attempt of a run to stop because it is shutting down (see
    /// [`super::stop`]).
    pub fn shutdown(&self) -> PathBuf {
        self.dir.join("shutdown")
    }
    /// The held-out lists of earlier promotions this run evaluates on, fixed at its start.
    pub fn heldout_lists(&self) -> PathBuf {
        self.dir.join("heldout_lists.jsonl")
    }
    /// The run's dev lists in full (texts and labels): frozen as held-out lists if promoted.
    pub fn dev_lists(&self) -> PathBuf {
        self.dir.join("dev_lists.jsonl")
    }
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.svg")
    }
}

/// The entries of `dir` whose names parse as `T` (a corpus name, a run id), sorted; anything
/// else there is not ours and is skipped.
pub fn names_in<T: std::str::FromStr + Ord>(dir: &Path) -> Vec<T> {
    let mut out: Vec<T> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort();
    out
}

/// The rejection reason's name beside a rejected job file: `x.json` -> `x.error.json` (exactly
/// one `.json` is replaced; a name without it gets `.error.json` appended). `submit` and intake
/// both use this one rule.
pub fn error_name(job_name: &str) -> String {
    format!("{}.error.json", job_name.strip_suffix(".json").unwrap_or(job_name))
}

/// The names a file called `name` may take in a directory, in order: `name`, then `stem.2.json`,
/// `stem.3.json`, ... (collisions in `accepted/` and `rejected/`).
pub fn name_variants(name: &str) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = name.strip_suffix(".json").map_or((name, ""), |s| (s, ".json"));
    std::iter::once(name.to_string()).chain((2u64..).map(move |n| format!("{stem}.{n}{ext}")))
}

/// A name in `dir` for a rejected job whose file *and* reason file are both free (so nothing
/// already in `rejected/`, a user's file or an earlier reason, is ever overwritten).
pub fn free_rejection_name(dir: &Path, name: &str) -> String {
    let free =
        |n: &String| dir.join(n).symlink_metadata().is_err() && dir.join(error_name(n)).symlink_metadata().is_err();
    name_variants(name).find(free).expect("some free name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_names_never_collide() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(error_name("x.json"), "x.error.json");
        assert_eq!(error_name("a.json.json"), "a.json.error.json");
        // A user's `x.error.json` was rejected first; `x.json` must not take its name.
        std::fs::write(d.path().join("x.error.json"), "user file").unwrap();
        assert_eq!(free_rejection_name(d.path(), "x.json"), "x.2.json");
        std::fs::write(d.path().join("y.json"), "").unwrap();
        assert_eq!(free_rejection_name(d.path(), "y.json"), "y.2.json");
        assert_eq!(free_rejection_name(d.path(), "z.json"), "z.json");
    }
}
