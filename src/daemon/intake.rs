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
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::job::{Job, parse_job};
use crate::settings::SettingsError;
use crate::store::atomic::read_json;
use crate::store::paths::RunFiles;
use crate::store::spool::{self, Waiting};
use crate::store::{Root, all_runs};
use crate::testhooks::crash_point;

/// A job that passed validation and now has a queued run.
#[derive(Debug)]
pub struct Accepted {
    pub run_id: RunId,
    pub job: Job,
}

/// What intake needs from the scheduler: may this job start (or queue) now?
pub trait Admit {
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
    pub fn reprocess_claimed(&mut self, root: &Root, adm: &mut dyn Admit) -> Vec<Accepted> {
        self.retry_at = None;
        let claimed = spool::claims(root);
        if claimed.is_empty() {
            return Vec::new();
        }
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
    pub fn scan(&mut self, root: &Root, adm: &mut dyn Admit) -> Vec<Accepted> {
        let entries = match spool::waiting(root) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the spool");
                return Vec::new();
            }
        };
        // Forget files that were removed while they settled.
        self.pending.retain(|name, _| entries.iter().any(|e| &e.name == name));
        let mut out = Vec::new();
        for w in entries {
            match self.consider(root, &w, adm) {
                Some(Verdict::Accepted(a)) => out.push(*a),
                Some(Verdict::Retry) => self.retry_at = Some(Instant::now() + RETRY),
                _ => {}
            }
        }
        self.recheck_at = (!self.pending.is_empty()).then(|| Instant::now() + RECHECK);
        out
    }

    fn consider(&mut self, root: &Root, w: &Waiting, adm: &mut dyn Admit) -> Option<Verdict> {
        let name = &w.name;
        if let Some(why) = bad_name(name) {
            let err = SettingsError::whole(why).hint("rename the file to a short UTF-8 name ending in .json");
            return Some(settle_rejection(spool::reject_bad_name(root, name, &err), &name.to_string_lossy(), &err));
        }
        if let Some(text) = spool::peek(root, w)
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&text)
        {
            let wait = if e.is_eof() { SETTLE_TRUNCATED } else { SETTLE };
            if !self.settled(name, &w.meta, wait) {
                return None; // still being written, probably: look again later
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
        let unique = format!("{nanos}-{}-{}", std::process::id(), self.counter);
        spool::claim(root, &name, &unique).unwrap_or_else(|e| {
            tracing::warn!(file = %name, error = %e, "could not claim a job file; will retry at the next scan");
            None
        })
    }

    /// Accepts or rejects a claimed file. `existing`: the run already made from this claim (a
    /// crash between creating the run and removing the claim), which then only gets its receipt.
    fn process_claimed(
        &mut self,
        root: &Root,
        claimed: &Path,
        adm: &mut dyn Admit,
        existing: Option<RunId>,
    ) -> Verdict {
        let cname = claimed.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let original = spool::original_name(claimed);
        if let Some(run_id) = existing {
            let job: Option<Job> = read_json(&RunFiles::new(&root.run_dir(&run_id)).job()).ok();
            return match spool::write_receipt(root, &original, &run_id, job.as_ref()) {
                Ok(()) => unclaim(claimed),
                Err(e) => {
                    tracing::error!(file = %original, error = %e, "writing the receipt; will retry");
                    Verdict::Retry
                }
            };
        }
        let job = spool::read_claimed(claimed)
            .and_then(|text| parse_job(&text, |c| root.corpus_home(c), self.default_budget_mb))
            .and_then(|j| adm.admit(&j).map(|_| j));
        let job = match job {
            Err(err) => return settle_rejection(spool::reject(root, claimed, &original, &err), &original, &err),
            Ok(j) => j,
        };
        let run_id = match spool::create_run(root, &job.corpus, &job, &job.eval.primary_metric, &cname) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(file = %original, error = %e, "creating the run failed; will retry");
                return Verdict::Retry;
            }
        };
        crash_point("intake.after_create_run");
        tracing::info!(file = %original, run_id = %run_id, corpus = %job.corpus, "job accepted");
        if let Err(e) = spool::write_receipt(root, &original, &run_id, Some(&job)) {
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
    if let Err(e) = spool::unclaim(claimed) {
        tracing::error!(error = %e, "removing a settled claim");
    }
    Verdict::Settled
}

/// A rejection written (settled), or not yet (a write failed: retried later).
fn settle_rejection(written: crate::store::Result<()>, file: &str, err: &SettingsError) -> Verdict {
    match written {
        Ok(()) => {
            tracing::warn!(file = %file, reason = %err, "job rejected");
            Verdict::Settled
        }
        Err(e) => {
            tracing::error!(file = %file, error = %e, "rejecting a job; will retry");
            Verdict::Retry
        }
    }
}
