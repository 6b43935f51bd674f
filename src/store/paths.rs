//! Where everything lives under the state root (DESIGN §3).

use std::path::{Path, PathBuf};

use super::{Result, StoreError};

#[derive(Debug, Clone)]
pub struct Root {
    pub dir: PathBuf,
}

impl Root {
    /// `--root`, else `$RERANKD_ROOT`, else the platform default.
    pub fn resolve(arg: Option<&Path>) -> Self {
        let dir = arg
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("RERANKD_ROOT").map(PathBuf::from))
            .unwrap_or_else(default_root);
        Self { dir }
    }

    /// Creates what is missing of the layout, 0700 whatever the umask. Idempotent; existing
    /// directories keep their modes (the daemon checks them and says what is wrong).
    pub fn ensure(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dirs = [
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
        ];
        for d in dirs.iter().filter(|d| !d.is_dir()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| StoreError::io(d, "creating directory", e))?;
        }
        Ok(())
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn daemon_lock(&self) -> PathBuf {
        self.dir.join("daemon.lock")
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
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.runs().join(run_id)
    }
    pub fn locks(&self) -> PathBuf {
        self.dir.join("locks")
    }
    pub fn corpus_lock(&self, corpus: &str) -> PathBuf {
        self.locks().join(format!("{corpus}.lock"))
    }
    pub fn models(&self, corpus: &str) -> PathBuf {
        self.dir.join("models").join(corpus)
    }
    pub fn corpus_home(&self, corpus: &str) -> PathBuf {
        self.dir.join("corpora").join(corpus)
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
    /// The cancel sentinel's text (the reason), if the file exists.
    pub fn cancel_requested(&self) -> Option<String> {
        let p = self.cancel();
        match std::fs::read_to_string(&p) {
            Ok(s) => Some(if s.trim().is_empty() { "cancelled by user".to_string() } else { s.trim().to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => p.exists().then(|| "cancelled by user".to_string()),
        }
    }
}
