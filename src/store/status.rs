//! `status.json`: a run's current state. Transitions go through [`Status::transition`] and the
//! file is always replaced atomically. Terminal states are final.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Result;
use super::atomic::{read_json, write_json};
use super::time::now_rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub run_id: String,
    pub corpus: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub pid: Option<u32>,
    pub attempt: u32,
    pub summary: Option<Value>,
    /// The spool file this run came from (its claimed name), so intake is idempotent.
    #[serde(default)]
    pub source: Option<String>,
}

impl Status {
    pub fn new_queued(run_id: &str, corpus: &str, source: Option<String>) -> Self {
        Self {
            run_id: run_id.into(),
            corpus: corpus.into(),
            state: RunState::Queued,
            reason: None,
            error: None,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            pid: None,
            attempt: 0,
            summary: None,
            source,
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }

    /// Moves to `state`; refuses to leave a terminal state (returns false, nothing changes).
    pub fn transition(&mut self, state: RunState, reason: Option<String>, error: Option<String>) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        match state {
            RunState::Running => {
                self.started_at = Some(now_rfc3339());
                self.pid = Some(std::process::id());
                self.attempt += 1;
            }
            s if s.is_terminal() => self.finished_at = Some(now_rfc3339()),
            _ => {}
        }
        self.state = state;
        self.reason = reason;
        self.error = error;
        true
    }
}
