//! A run's view of its files while it runs: its status, its event log, and the stop requests it
//! answers (the sentinels, and SIGTERM/SIGINT).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::store::events::{Event, Log};
use crate::store::paths::RunFiles;
use crate::store::{self, MetricsLog, RunState, Status, StopRequest};
use crate::train::trainer::Reporter;

/// The run's view of its files while it runs.
pub struct RunContext {
    pub files: RunFiles,
    pub status: Status,
    pub log: MetricsLog,
    pub(super) ignore_cancel: bool,
    /// Set by SIGTERM/SIGINT: treated like the cancel sentinel, at the next boundary.
    pub(super) terminated: Arc<AtomicBool>,
}

impl RunContext {
    pub(super) fn set_state(
        &mut self,
        state: RunState,
        reason: Option<String>,
        error: Option<String>,
    ) -> anyhow::Result<()> {
        store::record(&self.files, &mut self.log, &mut self.status, state, reason, error)?;
        Ok(())
    }

    pub fn info(&mut self, message: &str) -> anyhow::Result<()> {
        self.log.append(Event::Log(Log::info(message)))?;
        Ok(())
    }

    pub(super) fn warn(&mut self, log: Log) -> anyhow::Result<()> {
        self.log.append(Event::Log(log))?;
        Ok(())
    }

    /// `Err(Cancelled)` if cancellation was requested.
    pub(super) fn check_cancel(&mut self) -> anyhow::Result<()> {
        crate::train::check_cancel(self)
    }
}

impl Reporter for RunContext {
    fn event(&mut self, event: Event) -> anyhow::Result<()> {
        self.log.append(event)?;
        Ok(())
    }

    fn stop_requested(&mut self) -> Option<StopRequest> {
        if self.ignore_cancel {
            return None;
        }
        self.files
            .stop_request(Some(self.status.attempt))
            .or_else(|| self.terminated.load(Ordering::Relaxed).then_some(StopRequest::Terminated))
    }

    fn peak_mem_mb(&mut self) -> u64 {
        crate::sys::peak_memory_mb()
    }
}
