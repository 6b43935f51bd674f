//! Stopping a run: the one type for every way a run is asked to stop ([`StopRequest`]), with one
//! reader ([`RunFiles::stop_request`]) and one writer and one clearer per kind of sentinel. Every
//! sentinel is written through [`write_atomic`](super::write_atomic); none is told apart by
//! comparing reason strings.
//!
//! | request | sentinel in the run directory | written by | a run stopped by it ends |
//! |---|---|---|---|
//! | cancel | `cancel` (its text, if any, is the reason) | anyone: `rerankd cancel`, `stop`, `touch`, a superseding job | `cancelled`, final |
//! | pause | `pause` | `rerankd pause` | `paused`, with its checkpoint |
//! | shutdown | `shutdown` (the attempt it stops) | the daemon, when it stops | `queued`, to resume |
//! | terminated | none: SIGTERM/SIGINT to the run's process | a service manager, the daemon's escalation | `queued`, to resume |
//!
//! A shutdown request names the attempt it was written for and means nothing to any other, so it
//! never outlives the attempt it stopped, even when nothing got to remove it (a crash, a kill).
//! When several requests stand, the strongest wins: cancel, then pause, then shutdown.

use super::paths::RunFiles;
use super::{Result, RunState};

/// Why a run is asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopRequest {
    /// An explicit cancel: always final.
    Cancel { reason: String },
    /// `rerankd pause`: checkpoint and park, until `rerankd resume`.
    Pause,
    /// The daemon is stopping: checkpoint and go back to the queue.
    Shutdown,
    /// The run's own process was told to stop by a signal: checkpoint and go back to the queue.
    Terminated,
}

/// The reason recorded when a cancel sentinel gives none.
pub const DEFAULT_CANCEL_REASON: &str = "cancelled by user";
/// How much of a cancel sentinel is read as its reason.
pub const MAX_CANCEL_BYTES: u64 = 4096;
/// What an older daemon wrote into `cancel` when it stopped (there was no `shutdown` sentinel):
/// such a file stopped an attempt that is over, so it is read as no request at all.
const LEGACY_SHUTDOWN_CANCEL: &str = "daemon shutdown";

impl StopRequest {
    /// The state a run stopped by this request records.
    pub fn outcome(&self) -> RunState {
        match self {
            Self::Cancel { .. } => RunState::Cancelled,
            Self::Pause => RunState::Paused,
            Self::Shutdown | Self::Terminated => RunState::Queued,
        }
    }

    /// The reason as people read it (a cancel's own text).
    pub fn reason(&self) -> &str {
        match self {
            Self::Cancel { reason } => reason,
            Self::Pause => "paused by `rerankd pause`",
            Self::Shutdown => "daemon shutdown",
            Self::Terminated => "terminated by a signal (SIGTERM/SIGINT)",
        }
    }
}

impl std::fmt::Display for StopRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl RunFiles {
    /// The standing request from the sentinels, the strongest first. `attempt`: the attempt the
    /// reader belongs to (a shutdown request counts only for the attempt it names); `None` reads
    /// only the requests a user makes (cancel, pause), as for a run with no live attempt.
    pub fn stop_request(&self, attempt: Option<u32>) -> Option<StopRequest> {
        if let Some(reason) = self.cancel_requested() {
            return Some(StopRequest::Cancel { reason });
        }
        if self.pause_requested() {
            return Some(StopRequest::Pause);
        }
        attempt.filter(|&a| self.shutdown_requested(a)).map(|_| StopRequest::Shutdown)
    }

    /// The cancel sentinel's reason, if it exists. Whatever stands at that path (a FIFO, a link
    /// to `/dev/zero`, a directory) means "cancel"; only a regular file is read, without following
    /// links, without blocking, and at most [`MAX_CANCEL_BYTES`] of it.
    pub fn cancel_requested(&self) -> Option<String> {
        let p = self.cancel();
        let meta = match p.symlink_metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(_) => return Some(DEFAULT_CANCEL_REASON.to_string()),
            Ok(m) => m,
        };
        let text = if meta.is_file() { read_capped(&p) } else { String::new() };
        match text.trim() {
            "" => Some(DEFAULT_CANCEL_REASON.to_string()),
            LEGACY_SHUTDOWN_CANCEL => None,
            t => Some(t.to_string()),
        }
    }

    /// Writes the cancel sentinel with `reason`, unless one exists already (the first reason
    /// stands; an older daemon's shutdown note is replaced). Returns whether this call wrote it.
    pub fn request_cancel(&self, reason: &str) -> Result<bool> {
        let p = self.cancel();
        if p.symlink_metadata().is_ok() && self.cancel_requested().is_some() {
            return Ok(false);
        }
        super::write_atomic(&p, reason.as_bytes())?;
        Ok(true)
    }

    /// Whether `rerankd pause` asked the run to pause (anything standing at the path counts).
    pub fn pause_requested(&self) -> bool {
        self.pause().symlink_metadata().is_ok()
    }

    /// Asks the run to checkpoint and stop as `paused`.
    pub fn request_pause(&self) -> Result<()> {
        super::write_atomic(&self.pause(), b"paused by rerankd pause\n")
    }

    /// Withdraws a pause request (answered, or no longer wanted). Returns whether one stood.
    pub fn clear_pause(&self) -> bool {
        std::fs::remove_file(self.pause()).is_ok()
    }

    /// Whether the daemon asked `attempt` to stop because it is shutting down.
    pub fn shutdown_requested(&self, attempt: u32) -> bool {
        read_capped(&self.shutdown()).trim().parse::<u32>() == Ok(attempt)
    }

    /// Asks `attempt` of the run to checkpoint and go back to the queue: the daemon is stopping.
    pub fn request_shutdown(&self, attempt: u32) -> Result<()> {
        super::write_atomic(&self.shutdown(), format!("{attempt}\n").as_bytes())
    }

    /// Removes a shutdown request once its attempt has ended (a stale one is ignored anyway).
    pub fn clear_shutdown(&self) {
        let _ = std::fs::remove_file(self.shutdown());
    }
}

/// A sentinel's text: a regular file only, never following a link, never blocking, capped.
fn read_capped(p: &std::path::Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = Vec::new();
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .and_then(|f| Ok((f.metadata()?.is_file(), f)));
    if let Ok((true, f)) = opened {
        let _ = f.take(MAX_CANCEL_BYTES).read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, RunFiles) {
        let d = tempfile::tempdir().unwrap();
        let f = RunFiles::new(d.path());
        (d, f)
    }

    #[test]
    fn the_strongest_request_wins_and_a_shutdown_belongs_to_one_attempt() {
        let (_d, f) = files();
        assert_eq!(f.stop_request(Some(1)), None);
        f.request_shutdown(2).unwrap();
        assert_eq!(f.stop_request(Some(2)), Some(StopRequest::Shutdown));
        assert_eq!(f.stop_request(Some(3)), None, "a shutdown of attempt 2 means nothing to attempt 3");
        assert_eq!(f.stop_request(None), None);
        f.request_pause().unwrap();
        assert_eq!(f.stop_request(Some(2)), Some(StopRequest::Pause));
        assert!(f.request_cancel("enough").unwrap());
        assert!(!f.request_cancel("again").unwrap(), "the first reason stands");
        let cancel = StopRequest::Cancel { reason: "enough".into() };
        assert_eq!(f.stop_request(Some(2)), Some(cancel.clone()));
        assert_eq!(cancel.outcome(), RunState::Cancelled);
        assert_eq!(StopRequest::Pause.outcome(), RunState::Paused);
        assert_eq!(StopRequest::Shutdown.outcome(), RunState::Queued);
        assert!(f.clear_pause() && !f.clear_pause());
        f.clear_shutdown();
        assert!(!f.shutdown_requested(2));
    }

    #[test]
    fn a_cancel_sentinel_is_read_safely_and_an_old_shutdown_note_is_no_cancel() {
        let (_d, f) = files();
        std::fs::write(f.cancel(), "").unwrap();
        assert_eq!(f.cancel_requested().as_deref(), Some(DEFAULT_CANCEL_REASON));
        std::fs::write(f.cancel(), "x".repeat(10_000)).unwrap();
        assert_eq!(f.cancel_requested().map(|r| r.len()), Some(MAX_CANCEL_BYTES as usize));
        std::fs::remove_file(f.cancel()).unwrap();
        std::fs::create_dir(f.cancel()).unwrap();
        assert_eq!(f.cancel_requested().as_deref(), Some(DEFAULT_CANCEL_REASON), "a directory means cancel too");
        std::fs::remove_dir(f.cancel()).unwrap();
        std::fs::write(f.cancel(), "daemon shutdown\n").unwrap();
        assert_eq!(f.stop_request(Some(4)), None, "written by an older daemon for an attempt that is over");
        assert!(f.request_cancel("by user").unwrap(), "a real cancel replaces it");
        assert_eq!(f.cancel_requested().as_deref(), Some("by user"));
    }
}
