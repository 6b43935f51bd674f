//! Spool intake: job files become runs or rejections, never both and never neither.
//!
//! Only regular `*.json` files directly in `spool/` are jobs (dotfiles, `tmp/` and other names are
//! ignored). A file is claimed by renaming it into `spool/.claimed/`, so two daemons, or a restart,
//! can never take it twice. Anything left in `.claimed/` (a crash, or a write that failed: a full
//! disk, a deleted directory) is processed again at the next pass; a run records the claim it
//! came from, so re-processing never makes a second run or a second receipt. A file written in
//! place (not through `tmp/`) that does not parse yet is retried until its size and mtime have
//! been stable for a second, or for ten when it looks cut short (a writer that paused). A name
//! that is not UTF-8 or is longer than [`MAX_NAME_BYTES`] is rejected under a safe name.

use crate::ids::RunId;
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::job::{Job, MAX_JOB_BYTES, parse_job};
use crate::settings::SettingsError;
use crate::store::atomic::{read_json, sync_dir, temp_name, write_json};
use crate::store::events::{Event, Log};
use crate::store::paths::{RunFiles, error_name, free_rejection_name, name_variants};
use crate::store::{MetricsLog, Root, RunState, Status, all_runs};
use crate::testhooks::crash_point;

/// A job that passed validation and now has a queued run.
#[derive(Debug)]
pub struct Accepted {
    pub run_id: RunId,
    pub job: Job,
}

/// What intake needs from the scheduler: may this job start (or queue) now?
pub trait Admission {
    /// `Err(error)` rejects the job (e.g. `if_busy: reject` on a busy corpus). Called before the
    /// run is created; `supersede` is handled by the caller after acceptance.
    fn admit(&mut self, job: &Job) -> Result<(), SettingsError>;
}

/// The longest job file name intake takes (the claim adds about 30 bytes; NAME_MAX is 255).
pub const MAX_NAME_BYTES: usize = 200;

/// Remembers in-place files that did not parse yet: (size, mtime, since when unchanged).
pub struct Intake {
    pending: HashMap<OsString, (u64, SystemTime, Instant)>,
    counter: u64,
    /// Filled into jobs that name no `memory_budget_mb`, so job.json holds the effective budget.
    pub default_budget_mb: u64,
    /// A claim could not be settled (a write failed): when to try again.
    retry_at: Option<Instant>,
    /// In-place files are settling: when to look at them again.
    recheck_at: Option<Instant>,
}

const SETTLE: Duration = Duration::from_secs(1);
/// A file that parses as the start of a JSON document (cut short) waits longer: its writer may
/// have paused, and rejecting it would split the job in two.
const SETTLE_TRUNCATED: Duration = Duration::from_secs(10);
/// How often settling in-place files are looked at.
const RECHECK: Duration = Duration::from_millis(250);
/// How soon a claim that could not be settled is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Only `*.json` names that are not dotfiles are jobs (compared as bytes: any name counts).
pub fn is_job_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    b.ends_with(b".json") && !b.starts_with(b".")
}

/// Why this job file's name cannot be used as a name under the root, if it cannot.
fn bad_name(name: &std::ffi::OsStr) -> Option<String> {
    let Some(s) = name.to_str() else {
        return Some("the file name is not UTF-8".into());
    };
    (s.len() > MAX_NAME_BYTES).then(|| format!("the file name is {} bytes long; at most {MAX_NAME_BYTES}", s.len()))
}

/// What became of one claimed file.
#[derive(Debug)]
pub enum Verdict {
    Accepted(Box<Accepted>),
    /// Rejected, or a run already existed for it (a crash after creating it): nothing to queue.
    Settled,
    /// A write failed; the file stays claimed and is tried again.
    Retry,
}

impl Intake {
    pub fn new(default_budget_mb: u64) -> Self {
        Self { pending: HashMap::new(), counter: 0, default_budget_mb, retry_at: None, recheck_at: None }
    }

    /// When intake next needs a pass of its own (a settling in-place file, a claim to retry).
    pub fn next_due(&self) -> Option<Instant> {
        [self.recheck_at, self.retry_at].into_iter().flatten().min()
    }

    /// Claims left in `.claimed/` are due again (at boot, or after a failed write).
    pub fn claims_due(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Processes every file left in `spool/.claimed/`, oldest claim first. Idempotent.
    pub fn reprocess_claimed(&mut self, root: &Root, adm: &mut dyn Admission) -> Vec<Accepted> {
        self.retry_at = None;
        let Ok(rd) = std::fs::read_dir(root.claimed()) else { return Vec::new() };
        let mut claimed: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        if claimed.is_empty() {
            return Vec::new();
        }
        claimed.sort();
        // Which claims already became runs: read every run's status once for the whole batch.
        let made: HashMap<String, RunId> =
            all_runs(root).into_iter().filter_map(|s| Some((s.source?, s.run_id))).collect();
        let mut out = Vec::new();
        for path in claimed {
            tracing::warn!(file = %path.display(), "re-processing a claimed job file");
            let cname = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match self.process_claimed(root, &path, adm, made.get(&cname).cloned()) {
                Verdict::Accepted(a) => out.push(*a),
                Verdict::Settled => {}
                Verdict::Retry => self.retry_at = Some(Instant::now() + RETRY),
            }
        }
        out
    }

    /// One pass over `spool/`; returns the runs created, in arrival (mtime, then name) order.
    pub fn scan(&mut self, root: &Root, adm: &mut dyn Admission) -> Vec<Accepted> {
        let mut entries: Vec<(SystemTime, OsString, std::fs::Metadata)> = match std::fs::read_dir(root.spool()) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter(|e| is_job_name(&e.file_name()))
                .filter_map(|e| {
                    let meta = e.path().symlink_metadata().ok()?;
                    Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), e.file_name(), meta))
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
        let mut out = Vec::new();
        for (_, name, meta) in entries {
            match self.consider(root, &name, &meta, adm) {
                Some(Verdict::Accepted(a)) => out.push(*a),
                Some(Verdict::Retry) => self.retry_at = Some(Instant::now() + RETRY),
                _ => {}
            }
        }
        self.recheck_at = (!self.pending.is_empty()).then(|| Instant::now() + RECHECK);
        out
    }

    fn consider(
        &mut self,
        root: &Root,
        name: &std::ffi::OsStr,
        meta: &std::fs::Metadata,
        adm: &mut dyn Admission,
    ) -> Option<Verdict> {
        if let Some(why) = bad_name(name) {
            return Some(reject_bad_name(root, name, &why));
        }
        if meta.file_type().is_file() && meta.len() <= MAX_JOB_BYTES {
            let text = std::fs::read(root.spool().join(name)).ok()?;
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&text) {
                let wait = if e.is_eof() { SETTLE_TRUNCATED } else { SETTLE };
                if !self.settled(name, meta, wait) {
                    return None; // still being written, probably: look again later
                }
            }
        }
        self.pending.remove(name);
        let claimed = self.claim(root, name)?;
        crash_point("intake.after_claim");
        // Claimed just now by this process: no run can exist for it yet.
        Some(self.process_claimed(root, &claimed, adm, None))
    }

    /// Whether an unparsable file has kept its size and mtime for `wait`.
    fn settled(&mut self, name: &std::ffi::OsStr, meta: &std::fs::Metadata, wait: Duration) -> bool {
        let (len, mtime) = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        let now = Instant::now();
        let entry = self.pending.entry(name.to_os_string()).or_insert((len, mtime, now));
        if entry.0 != len || entry.1 != mtime {
            *entry = (len, mtime, now);
        }
        let young = SystemTime::now().duration_since(mtime).map(|d| d < wait).unwrap_or(true);
        !young && now.duration_since(entry.2) >= wait
    }

    /// Renames `spool/<name>` into `spool/.claimed/` under a unique name; None if it vanished
    /// (another daemon claimed it) or the rename failed (logged; the next pass tries again).
    fn claim(&mut self, root: &Root, name: &std::ffi::OsStr) -> Option<PathBuf> {
        self.counter += 1;
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = name.to_string_lossy(); // UTF-8: checked by bad_name
        let claimed = root.claimed().join(format!("{nanos}-{}-{}__{name}", std::process::id(), self.counter));
        match std::fs::rename(root.spool().join(&*name), &claimed) {
            Ok(()) => {
                let _ = sync_dir(&root.spool());
                Some(claimed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "could not claim a job file; will retry at the next scan");
                None
            }
        }
    }

    /// Accepts or rejects a claimed file. `existing`: the run already made from this claim (a
    /// crash between creating the run and removing the claim), which then only gets its receipt.
    fn process_claimed(
        &mut self,
        root: &Root,
        claimed: &Path,
        adm: &mut dyn Admission,
        existing: Option<RunId>,
    ) -> Verdict {
        let cname = claimed.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let original = cname.split_once("__").map(|(_, n)| n.to_string()).unwrap_or(cname.clone());
        if let Some(run_id) = existing {
            let job: Option<Job> = read_json(&RunFiles::new(&root.run_dir(&run_id)).job()).ok();
            return match write_receipt(root, &original, &run_id, job.as_ref()) {
                Ok(()) => unclaim(claimed),
                Err(e) => {
                    tracing::error!(file = %original, error = %e, "writing the receipt; will retry");
                    Verdict::Retry
                }
            };
        }
        let job = read_claimed(claimed)
            .and_then(|text| parse_job(&text, |c| root.corpus_home(c), self.default_budget_mb))
            .and_then(|j| adm.admit(&j).map(|_| j));
        let job = match job {
            Err(err) => return reject(root, claimed, &original, &err),
            Ok(j) => j,
        };
        let run_id = match create_run(root, &job, &cname) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(file = %original, error = %e, "creating the run failed; will retry");
                return Verdict::Retry;
            }
        };
        crash_point("intake.after_create_run");
        tracing::info!(file = %original, run_id = %run_id, corpus = %job.corpus, "job accepted");
        if let Err(e) = write_receipt(root, &original, &run_id, Some(&job)) {
            // The run exists and is queued; the claim stays until its receipt is written.
            tracing::error!(file = %original, error = %e, "writing the receipt; will retry");
            self.retry_at = Some(Instant::now() + RETRY);
            return Verdict::Accepted(Box::new(Accepted { run_id, job }));
        }
        crash_point("intake.after_receipt");
        unclaim(claimed);
        Verdict::Accepted(Box::new(Accepted { run_id, job }))
    }
}

fn unclaim(claimed: &Path) -> Verdict {
    if let Err(e) = std::fs::remove_file(claimed)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::error!(file = %claimed.display(), error = %e, "removing a settled claim");
    }
    Verdict::Settled
}

fn read_claimed(path: &Path) -> Result<String, SettingsError> {
    let meta = path.symlink_metadata().map_err(|e| SettingsError::whole(format!("cannot stat: {e}")))?;
    if meta.file_type().is_symlink() {
        return Err(
            SettingsError::whole("is a symbolic link, not a regular file").hint("copy the job file into the spool")
        );
    }
    if meta.is_dir() {
        return Err(SettingsError::whole("is a directory, not a job file"));
    }
    if !meta.is_file() {
        return Err(SettingsError::whole("is not a regular file"));
    }
    if meta.len() > MAX_JOB_BYTES {
        return Err(SettingsError::whole(format!("is {} bytes; a job file is at most {MAX_JOB_BYTES}", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| SettingsError::whole(format!("cannot read: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|_| SettingsError::whole("is not UTF-8 text").hint("a job file is one JSON object"))
}

/// Moves `from` (a claimed file, or a spool file whose name cannot be kept) into `rejected/` as
/// `original` (or a free variant). The reason first, then the file: if the reason cannot be
/// written (a full disk), the file stays where it is and is judged again later, so a rejection
/// never lacks its reason.
fn reject(root: &Root, from: &Path, original: &str, err: &SettingsError) -> Verdict {
    let dest_name = free_rejection_name(&root.rejected(), original);
    if let Err(e) = write_json(&root.rejected().join(error_name(&dest_name)), err) {
        tracing::error!(file = %original, error = %e, "writing the rejection reason; will retry");
        return Verdict::Retry;
    }
    crash_point("intake.after_reason");
    match std::fs::rename(from, root.rejected().join(&dest_name)) {
        Ok(()) => tracing::warn!(file = %original, reason = %err, "job rejected"),
        Err(e) => {
            tracing::error!(file = %original, error = %e, "moving a rejected job; will retry");
            return Verdict::Retry;
        }
    }
    let _ = sync_dir(&root.rejected());
    Verdict::Settled
}

/// A job file whose name cannot be kept (not UTF-8, too long) goes straight from the spool into
/// `rejected/` under a safe name (the name lossily decoded, cut to fit), with the reason.
fn reject_bad_name(root: &Root, name: &std::ffi::OsStr, why: &str) -> Verdict {
    let lossy = name.to_string_lossy().replace(['/', '\u{fffd}'], "_");
    let mut stem = lossy.strip_suffix(".json").unwrap_or(&lossy).to_string();
    while stem.len() > 100 {
        stem.pop();
    }
    let err = SettingsError::whole(why).hint("rename the file to a short UTF-8 name ending in .json");
    reject(root, &root.spool().join(name), &format!("{stem}.json"), &err)
}

/// The receipt `accepted/<name>.json` (or `name.N.json` on a collision). Written once per run:
/// walking the names a receipt for `original` may have, one that already holds this run (a crash
/// after the receipt, before the claim was removed) is kept rather than doubled.
fn write_receipt(root: &Root, original: &str, run_id: &RunId, job: Option<&Job>) -> crate::store::Result<()> {
    let dir = root.accepted();
    for name in name_variants(original) {
        let path = dir.join(&name);
        if path.symlink_metadata().is_err() {
            return write_json(&path, &json!({"run_id": run_id, "run_dir": root.run_dir(run_id), "job": job}));
        }
        if read_json::<serde_json::Value>(&path).is_ok_and(|v| v["run_id"] == run_id.as_str()) {
            return Ok(());
        }
    }
    unreachable!("name_variants never ends")
}

/// Creates `runs/<corpus>__<UTC time>[__N]/` with job.json, metrics.jsonl (the locked primary
/// metric, then the `queued` state) and status.json, all inside a hidden temporary directory
/// renamed into place at the end: a crash leaves either a whole run or a temp that the boot
/// sweep removes, never a run directory without a status.
fn create_run(root: &Root, job: &Job, source: &str) -> anyhow::Result<RunId> {
    let time = crate::store::time::compact(SystemTime::now());
    let run_id = (1..)
        .map(|n| RunId::new(&job.corpus, &time, n))
        .find(|id| root.run_dir(id).symlink_metadata().is_err())
        .expect("a free run id");
    let tmp = root.runs().join(temp_name(&run_id));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)?;
    let files = RunFiles::new(&tmp);
    write_json(&files.job(), job)?;
    let mut log = MetricsLog::open(&files.metrics(), &run_id)?;
    log.append(Event::Log(Log::info(format!("primary metric locked: {}", job.eval.primary_metric))))?;
    log.append(Event::State { state: RunState::Queued, reason: None, attempt: None, error: None })?;
    log.sync()?;
    Status::new_queued(&run_id, &job.corpus, Some(source.to_string())).write(&files.status())?;
    crash_point("intake.before_publish_run");
    std::fs::rename(&tmp, root.run_dir(&run_id))?;
    sync_dir(&root.runs())?;
    Ok(run_id)
}
