//! The states of a run and the one table of the changes between them. `status.json` holds the
//! state a run is in, `record` (in `status.rs`) is the one way it changes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    /// Stopped by `rerankd pause` with a checkpoint; `rerankd resume` queues it again. Holds
    /// its corpus like an active run.
    Paused,
    Completed,
    Failed,
    Cancelled,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether a run may move from `self` to `to`: the state machine's one table, checked by
    /// [`record`] for every state change of every process.
    ///
    /// - queued: started, paused or cancelled before it starts, or failed (its corpus stayed
    ///   locked);
    /// - running: ends (completed, failed, cancelled), pauses, or goes back to the queue
    ///   (interrupted, to resume from its checkpoint);
    /// - paused: queued again by `resume`, or cancelled;
    /// - completed, failed and cancelled are final.
    pub fn allows(self, to: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, to),
            (Queued, Running | Paused | Cancelled | Failed)
                | (Running, Queued | Paused | Completed | Failed | Cancelled)
                | (Paused, Queued | Cancelled)
        )
    }

    /// The state a `state` event or status.json names (serde's own mapping, so there is one).
    pub fn parse(s: &str) -> Option<Self> {
        crate::settings::spelled(s).ok()
    }

    /// Serde's spelling (a unit test holds the two together).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunState::{self, *};

    #[test]
    fn as_str_is_serdes_spelling() {
        for s in [Queued, Running, Paused, Completed, Failed, Cancelled] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(RunState::parse(s.as_str()), Some(s));
        }
    }
}
