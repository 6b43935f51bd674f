//! Spool intake: job files become runs or rejections, never both and never neither.
//!
//! Only regular `*.json` files directly in `spool/` are jobs (dotfiles, `tmp/` and other names are
//! ignored). A file is claimed by renaming it into `spool/.claimed/`, so two daemons, or a restart,
//! can never take it twice; a claimed file left by a crash is processed again at boot. A file
//! written in place (not through `tmp/`) that does not parse yet is retried until its size and
//! mtime have been stable for a second.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::job::{Job, JobError, MAX_JOB_BYTES, parse_job};
use crate::store::atomic::{sync_dir, write_json};
use crate::store::{Root, Status};

/// A job that passed validation and now has a queued run.
#[derive(Debug)]
pub struct Accepted {
    pub run_id: String,
    pub job: Job,
}

/// What intake needs from the scheduler: may this job start (or queue) now?
pub trait Admission {
    /// `Err(error)` rejects the job (e.g. `if_busy: reject` on a busy corpus). Called before the
    /// run is created; `supersede` is handled by the caller after acceptance.
    fn admit(&mut self, job: &Job) -> Result<(), JobError>;
}

/// Remembers in-place files that did not parse yet: (size, mtime, since when unchanged).
pub struct Intake {
    pending: HashMap<String, (u64, SystemTime, Instant)>,
    counter: u64,
    /// Filled into jobs that name no `memory_budget_mb`, so job.json holds the effective budget.
    pub default_budget_mb: u64,
}

const SETTLE: Duration = Duration::from_secs(1);

/// Only `*.json` names that are not dotfiles are jobs.
pub fn is_job_name(name: &str) -> bool {
    name.ends_with(".json") && !name.starts_with('.')
}

impl Intake {
    pub fn new(default_budget_mb: u64) -> Self {
        Self { pending: HashMap::new(), counter: 0, default_budget_mb }
    }

    /// Whether some in-place file is waiting to settle.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// One pass over `spool/`; returns the runs created, in arrival (mtime, then name) order.
    pub fn scan(&mut self, root: &Root, adm: &mut dyn Admission) -> Vec<Accepted> {
        let mut entries: Vec<(SystemTime, String, std::fs::Metadata)> = match std::fs::read_dir(root.spool()) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let meta = e.path().symlink_metadata().ok()?;
                    is_job_name(&name).then(|| (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), name, meta))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(spool = %root.spool().display(), error = %e, "cannot list the spool");
                return Vec::new();
            }
        };
        entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        // Forget files that were removed while they settled.
        self.pending.retain(|name, _| entries.iter().any(|e| &e.1 == name));
        entries.into_iter().filter_map(|(_, name, meta)| self.consider(root, &name, &meta, adm)).collect()
    }

    fn consider(
        &mut self,
        root: &Root,
        name: &str,
        meta: &std::fs::Metadata,
        adm: &mut dyn Admission,
    ) -> Option<Accepted> {
        if meta.file_type().is_file() && meta.len() <= MAX_JOB_BYTES {
            let text = std::fs::read(root.spool().join(name)).ok()?;
            let parses = serde_json::from_slice::<serde_json::Value>(&text).is_ok();
            if !parses && !self.settled(name, meta) {
                return None; // still being written, probably: look again later
            }
        }
        self.pending.remove(name);
        let claimed = self.claim(root, name)?;
        // Claimed just now by this process: no run can exist for it yet.
        self.process_claimed(root, &claimed, adm, false)
    }

    /// Whether an unparsable file has kept its size and mtime for `SETTLE`.
    fn settled(&mut self, name: &str, meta: &std::fs::Metadata) -> bool {
        let (len, mtime) = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        let now = Instant::now();
        let entry = self.pending.entry(name.to_string()).or_insert((len, mtime, now));
        if entry.0 != len || entry.1 != mtime {
            *entry = (len, mtime, now);
        }
        let young = SystemTime::now().duration_since(mtime).map(|d| d < SETTLE).unwrap_or(true);
        !young && now.duration_since(entry.2) >= SETTLE
    }

    /// Renames `spool/<name>` into `spool/.claimed/` under a unique name; None if it vanished
    /// (another daemon claimed it).
    fn claim(&mut self, root: &Root, name: &str) -> Option<PathBuf> {
        self.counter += 1;
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let claimed = root.claimed().join(format!("{nanos}-{}-{}__{name}", std::process::id(), self.counter));
        match std::fs::rename(root.spool().join(name), &claimed) {
            Ok(()) => {
                let _ = sync_dir(&root.spool());
                Some(claimed)
            }
            Err(e) => {
                tracing::debug!(file = name, error = %e, "could not claim (taken by someone else?)");
                None
            }
        }
    }

    /// Accepts or rejects a claimed file. With `after_crash`, idempotent: a claimed file whose run
    /// already exists (a crash between creating the run and removing the claim) only gets its
    /// receipt. That check reads every run's status, so only boot-time re-processing asks for it.
    pub fn process_claimed(
        &mut self,
        root: &Root,
        claimed: &Path,
        adm: &mut dyn Admission,
        after_crash: bool,
    ) -> Option<Accepted> {
        let cname = claimed.file_name()?.to_string_lossy().into_owned();
        let original = cname.split_once("__").map(|(_, n)| n.to_string()).unwrap_or(cname.clone());
        if let Some(run_id) = after_crash.then(|| existing_run_for(root, &cname)).flatten() {
            let _ = write_receipt(root, &original, &run_id, None);
            let _ = std::fs::remove_file(claimed);
            return None;
        }
        let job = read_claimed(claimed).and_then(|text| parse_job(&text, |c| root.corpus_home(c)));
        let job = job.and_then(|j| adm.admit(&j).map(|_| j)).map(|mut j| {
            j.memory_budget_mb.get_or_insert(self.default_budget_mb);
            j
        });
        match job {
            Err(err) => {
                reject(root, claimed, &original, &err);
                None
            }
            Ok(job) => match create_run(root, &job, &cname) {
                Ok(run_id) => {
                    if let Err(e) = write_receipt(root, &original, &run_id, Some(&job)) {
                        tracing::error!(error = %e, "writing the receipt");
                    }
                    let _ = std::fs::remove_file(claimed);
                    tracing::info!(file = %original, run_id = %run_id, corpus = %job.corpus, "job accepted");
                    Some(Accepted { run_id, job })
                }
                Err(e) => {
                    // The run could not be created (disk full?): leave the claim for a later pass.
                    tracing::error!(file = %original, error = %e, "creating the run failed; will retry");
                    None
                }
            },
        }
    }
}

fn read_claimed(path: &Path) -> Result<String, JobError> {
    let meta = path.symlink_metadata().map_err(|e| JobError::whole(format!("cannot stat: {e}"), None))?;
    if meta.file_type().is_symlink() {
        return Err(JobError::whole(
            "is a symbolic link, not a regular file",
            Some("copy the job file into the spool"),
        ));
    }
    if meta.is_dir() {
        return Err(JobError::whole("is a directory, not a job file", None));
    }
    if !meta.is_file() {
        return Err(JobError::whole("is not a regular file", None));
    }
    if meta.len() > MAX_JOB_BYTES {
        return Err(JobError::whole(format!("is {} bytes; a job file is at most {MAX_JOB_BYTES}", meta.len()), None));
    }
    let bytes = std::fs::read(path).map_err(|e| JobError::whole(format!("cannot read: {e}"), None))?;
    String::from_utf8(bytes).map_err(|_| JobError::whole("is not UTF-8 text", Some("a job file is one JSON object")))
}

/// A name under `dir` that does not exist yet: `name`, else `stem.N.ext`.
fn unique_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if p.symlink_metadata().is_err() {
        return p;
    }
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    (2..)
        .map(|n| dir.join(format!("{stem}.{n}.{ext}")))
        .find(|p| p.symlink_metadata().is_err())
        .expect("some free name")
}

fn reject(root: &Root, claimed: &Path, original: &str, err: &JobError) {
    let dest = unique_in(&root.rejected(), original);
    let dest_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let error_path = root.rejected().join(format!("{}.error.json", dest_name.trim_end_matches(".json")));
    // The reason first, then the file: a crash in between leaves the file claimed, to be redone.
    if let Err(e) = write_json(&error_path, err) {
        tracing::error!(error = %e, "writing the rejection reason");
    }
    match std::fs::rename(claimed, &dest) {
        Ok(()) => tracing::warn!(file = %original, reason = %err, "job rejected"),
        Err(e) => tracing::error!(file = %original, error = %e, "moving a rejected job"),
    }
    let _ = sync_dir(&root.rejected());
}

fn write_receipt(root: &Root, original: &str, run_id: &str, job: Option<&Job>) -> crate::store::Result<()> {
    let dest = unique_in(&root.accepted(), original);
    let run_dir = root.run_dir(run_id);
    write_json(&dest, &json!({"run_id": run_id, "run_dir": run_dir, "job": job}))
}

fn existing_run_for(root: &Root, claimed_name: &str) -> Option<String> {
    std::fs::read_dir(root.runs()).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let st = Status::read(&e.path().join("status.json")).ok()?;
        (st.source.as_deref() == Some(claimed_name)).then_some(st.run_id)
    })
}

/// Creates `runs/<corpus>__<UTC time>[__N]/` with job.json, status.json (queued) and the first
/// events: the locked primary metric, then the state.
fn create_run(root: &Root, job: &Job, source: &str) -> anyhow::Result<String> {
    let base = format!("{}__{}", job.corpus, crate::store::time::compact(SystemTime::now()));
    let mut n = 1;
    let run_id = loop {
        let id = if n == 1 { base.clone() } else { format!("{base}__{n}") };
        match std::fs::create_dir(root.run_dir(&id)) {
            Ok(()) => break id,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e.into()),
        }
    };
    let files = crate::store::paths::RunFiles::new(&root.run_dir(&run_id));
    write_json(&files.job(), job)?;
    let mut log = crate::store::MetricsLog::open(&files.metrics(), &run_id)?;
    log.append(
        "log",
        json!({"level": "info", "message": format!("primary metric locked: {}", job.eval.primary_metric)}),
    )?;
    log.append("state", json!({"state": "queued", "reason": null}))?;
    log.sync()?;
    Status::new_queued(&run_id, &job.corpus, Some(source.to_string())).write(&files.status())?;
    sync_dir(&root.runs())?;
    Ok(run_id)
}
