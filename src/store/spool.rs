//! The spool's files: job files dropped into `spool/` (through `spool/tmp/` and a rename), the
//! claims in `spool/.claimed/`, the receipts in `spool/accepted/`, the rejections (with their
//! `.error.json`) in `spool/rejected/`, and the creation of a run from an accepted job. What the
//! daemon decides about them (when a file has settled, whether a job is admitted) is
//! `daemon::intake`'s; every byte read or written here.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::atomic::{read_json, sync_dir, temp_name, write_atomic, write_json};
use super::events::{Event, Log};
use super::paths::{RunFiles, error_name, free_rejection_name, name_variants};
use super::{MetricsLog, Result, Root, RunState, Status, StoreError};
use crate::ids::{CorpusName, RunId};
use crate::settings::SettingsError;
use crate::testhooks::crash_point;

/// A job file is a few hundred bytes; anything past this is not a job.
pub const MAX_JOB_BYTES: u64 = 1 << 20;

/// Only `*.json` names that are not dotfiles are jobs (compared as bytes: any name counts).
pub fn is_job_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.ends_with(b".json") && !b.starts_with(b".")
}

/// Writes a job file into the spool as every writer must: whole into `spool/tmp/`, then renamed
/// in (so intake never sees half of it). Returns its path in the spool.
pub fn drop_job(root: &Root, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = root.spool_tmp().join(name);
    write_atomic(&tmp, bytes)?;
    let dest = root.spool().join(name);
    std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, "renaming a job file into the spool", e))?;
    sync_dir(&root.spool())?;
    Ok(dest)
}

/// Whether a job file dropped at `dropped` is still in the spool (not yet claimed).
pub fn still_waiting(dropped: &Path) -> bool {
    dropped.symlink_metadata().is_ok()
}

/// A job file waiting in `spool/`.
pub struct Waiting {
    pub name: OsString,
    pub meta: std::fs::Metadata,
}

impl Waiting {
    pub fn modified(&self) -> SystemTime {
        self.meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// The job files waiting in `spool/`, in arrival order (mtime, then name).
pub fn waiting(root: &Root) -> Result<Vec<Waiting>> {
    let rd = std::fs::read_dir(root.spool()).map_err(|e| StoreError::io(&root.spool(), "listing the spool", e))?;
    let mut out: Vec<Waiting> = rd
        .filter_map(|e| e.ok())
        .filter(|e| is_job_name(&e.file_name()))
        .filter_map(|e| Some(Waiting { meta: e.path().symlink_metadata().ok()?, name: e.file_name() }))
        .collect();
    out.sort_by(|a, b| (a.modified(), &a.name).cmp(&(b.modified(), &b.name)));
    Ok(out)
}

/// The bytes of a waiting job file, if it is a regular file of at most [`MAX_JOB_BYTES`] that can
/// be read now.
pub fn peek(root: &Root, w: &Waiting) -> Option<Vec<u8>> {
    (w.meta.file_type().is_file() && w.meta.len() <= MAX_JOB_BYTES)
        .then(|| std::fs::read(root.spool().join(&w.name)).ok())
        .flatten()
}

/// The claims left in `spool/.claimed/`, oldest first.
pub fn claims(root: &Root) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(root.claimed()) else { return Vec::new() };
    let mut claimed: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    claimed.sort();
    claimed
}

/// How many job files wait in the spool and how many are claimed but not judged.
pub fn counts(root: &Root) -> (usize, usize) {
    let waiting = waiting(root).map(|w| w.len()).unwrap_or(0);
    (waiting, claims(root).len())
}

/// Renames `spool/<name>` into `spool/.claimed/` under a name no other claim has (`unique`, then
/// `__<name>`); `Ok(None)` if it vanished (another daemon claimed it).
pub fn claim(root: &Root, name: &str, unique: &str) -> Result<Option<PathBuf>> {
    let claimed = root.claimed().join(format!("{unique}__{name}"));
    match std::fs::rename(root.spool().join(name), &claimed) {
        Ok(()) => {
            let _ = sync_dir(&root.spool());
            Ok(Some(claimed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(&claimed, "claiming a job file", e)),
    }
}

/// The name a claimed file was dropped under.
pub fn original_name(claimed: &Path) -> String {
    let cname = claimed.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    cname.split_once("__").map(|(_, n)| n.to_string()).unwrap_or(cname)
}

/// A claimed file's text: a regular file (not a link, directory, FIFO or device) of at most
/// [`MAX_JOB_BYTES`], UTF-8. Why not, as the rejection's reason.
pub fn read_claimed(path: &Path) -> std::result::Result<String, SettingsError> {
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

/// Removes a settled claim (one already gone is fine).
pub fn unclaim(claimed: &Path) -> Result<()> {
    match std::fs::remove_file(claimed) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(claimed, "removing a claim", e)),
        _ => Ok(()),
    }
}

/// Moves `from` (a claimed file, or a spool file whose name cannot be kept) into `rejected/` as
/// `original` (or a free variant). The reason first, then the file: if the reason cannot be
/// written (a full disk), the file stays where it is and is judged again later, so a rejection
/// never lacks its reason.
pub fn reject(root: &Root, from: &Path, original: &str, err: &SettingsError) -> Result<()> {
    let dest_name = free_rejection_name(&root.rejected(), original);
    write_json(&root.rejected().join(error_name(&dest_name)), err)?;
    crash_point("intake.after_reason");
    let dest = root.rejected().join(&dest_name);
    std::fs::rename(from, &dest).map_err(|e| StoreError::io(&dest, "moving a rejected job", e))?;
    let _ = sync_dir(&root.rejected());
    Ok(())
}

/// A job file whose name cannot be kept (not UTF-8, too long) goes straight from the spool into
/// `rejected/` under a safe name (the name lossily decoded, cut to fit), with the reason.
pub fn reject_bad_name(root: &Root, name: &OsStr, err: &SettingsError) -> Result<()> {
    let lossy = name.to_string_lossy().replace(['/', '\u{fffd}'], "_");
    let mut stem = lossy.strip_suffix(".json").unwrap_or(&lossy).to_string();
    while stem.len() > 100 {
        stem.pop();
    }
    reject(root, &root.spool().join(name), &format!("{stem}.json"), err)
}

/// A receipt, `spool/accepted/<name>.json`: the run a job file became, and its effective job.
#[derive(Debug, Serialize, Deserialize)]
pub struct Receipt<J> {
    pub run_id: RunId,
    pub run_dir: PathBuf,
    pub job: Option<J>,
}

/// Writes the receipt `accepted/<name>.json` (or `name.N.json` on a collision). Written once per
/// run: walking the names a receipt for `original` may have, one that already holds this run (a
/// crash after the receipt, before the claim was removed) is kept rather than doubled.
pub fn write_receipt<J: Serialize>(root: &Root, original: &str, run_id: &RunId, job: Option<&J>) -> Result<()> {
    #[derive(Deserialize)]
    struct Head {
        run_id: Option<RunId>,
    }
    let dir = root.accepted();
    for name in name_variants(original) {
        let path = dir.join(&name);
        if path.symlink_metadata().is_err() {
            let receipt = Receipt { run_id: run_id.clone(), run_dir: root.run_dir(run_id), job };
            return write_json(&path, &receipt);
        }
        if read_json::<Head>(&path).is_ok_and(|h| h.run_id.as_ref() == Some(run_id)) {
            return Ok(());
        }
    }
    unreachable!("name_variants never ends")
}

/// The receipt of a job file dropped as `name`, if it was accepted.
pub fn read_receipt<J: serde::de::DeserializeOwned>(root: &Root, name: &str) -> Result<Receipt<J>> {
    read_json(&root.accepted().join(name))
}

/// What became of a job file dropped as `name`, as its writer sees it: the receipt's text, or the
/// rejection's reason (its `.error.json` text), or neither yet.
pub enum Outcome {
    Accepted(String),
    Rejected(String),
    Waiting,
}

pub fn outcome(root: &Root, name: &str) -> Outcome {
    if let Ok(text) = std::fs::read_to_string(root.accepted().join(name)) {
        return Outcome::Accepted(text);
    }
    if root.rejected().join(name).exists() {
        let why = std::fs::read_to_string(root.rejected().join(error_name(name))).unwrap_or_default();
        return Outcome::Rejected(why);
    }
    Outcome::Waiting
}

/// Whether nothing waits in the spool or its claims.
pub fn is_idle(root: &Root) -> bool {
    claims(root).is_empty() && waiting(root).map(|w| w.is_empty()).unwrap_or(true)
}

/// Creates `runs/<corpus>__<UTC time>[__N]/` with job.json (`job`), metrics.jsonl (the locked
/// primary metric, then the `queued` state) and status.json (naming the claim it came from), all
/// inside a hidden temporary directory renamed into place at the end: a crash leaves either a
/// whole run or a temp that the boot sweep removes, never a run directory without a status.
pub fn create_run(
    root: &Root,
    corpus: &CorpusName,
    job: &impl Serialize,
    primary_metric: &str,
    source: &str,
) -> Result<RunId> {
    let time = super::time::compact(SystemTime::now());
    let run_id = (1..)
        .map(|n| RunId::new(corpus, &time, n))
        .find(|id| root.run_dir(id).symlink_metadata().is_err())
        .expect("a free run id");
    let tmp = root.runs().join(temp_name(&run_id));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| StoreError::io(&tmp, "creating a run", e))?;
    let files = RunFiles::new(&tmp);
    write_json(&files.job(), job)?;
    let mut log = MetricsLog::open(&files.metrics(), &run_id)?;
    log.append(Event::Log(Log::info(format!("primary metric locked: {primary_metric}"))))?;
    log.append(Event::State { state: RunState::Queued, reason: None, attempt: None, error: None })?;
    log.sync()?;
    Status::new_queued(&run_id, corpus, Some(source.to_string())).write(&files.status())?;
    crash_point("intake.before_publish_run");
    let dest = root.run_dir(&run_id);
    std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, "publishing a run", e))?;
    sync_dir(&root.runs())?;
    Ok(run_id)
}
