//! The run store: the files under the state root, their paths and formats. Paths, atomic writes,
//! the run states and their table, the event log, status, stop requests, checkpoints, promoted
//! models, feedback (and its capture index), the spool (drops, claims, receipts, rejections, run
//! creation) and locks: every file under the state root is read and written here.

pub mod atomic;
pub mod checkpoint;
pub mod events;
pub mod feedback;
pub mod feedback_index;
pub mod lock;
pub mod metrics;
pub mod models;
pub mod paths;
pub mod policy;
pub mod serving;
pub mod spool;
pub mod state;
pub mod status;
pub mod stop;
pub mod time;

pub use atomic::write_atomic;
pub use events::{Event, Logged};
pub use lock::FileLock;
pub use metrics::MetricsLog;
pub use paths::Root;
pub use state::RunState;
pub use status::{Status, all_runs, record, settle};
pub use stop::StopRequest;

use std::path::{Path, PathBuf};

/// Store errors carry the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The cause is part of the message and deliberately not a `source()`: error chains print
    /// it once, not twice.
    #[error("I/O error at {path} while {action}: {cause}")]
    Io { path: PathBuf, action: &'static str, cause: std::io::Error },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("run {run_id} cannot go from {from:?} to {to:?}")]
    Transition { run_id: crate::ids::RunId, from: RunState, to: RunState },
}

impl StoreError {
    pub fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), action, cause: source }
    }

    /// Whether this is the disk refusing a write (`sys::is_disk_full`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { cause, .. } if crate::sys::is_disk_full(cause))
    }
}

/// The exit status of a run process that met a full disk and could not even record it: the
/// daemon queues the run again, to resume once there is space (EX_TEMPFAIL).
pub const EXIT_DISK_FULL: i32 = 75;

pub type Result<T> = std::result::Result<T, StoreError>;
