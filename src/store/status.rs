//! `status.json`: a run's current state. Transitions go through [`Status::transition`] and the
//! file is always replaced atomically. Terminal states are final.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::atomic::{read_json, write_json};
use super::events::Event;
use super::metrics::MetricsLog;
use super::paths::RunFiles;
use super::state::RunState;
use super::time::now_rfc3339;
use super::{Result, Root};
use crate::ids::{CorpusName, RunId};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub run_id: RunId,
    pub corpus: CorpusName,
    pub state: RunState,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    /// When its first attempt started (each attempt's start is in `attempts`).
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub pid: Option<u32>,
    pub attempt: u32,
    pub summary: Option<Value>,
    /// The spool file this run came from (its claimed name), so intake is idempotent.
    #[serde(default)]
    pub source: Option<String>,
    /// The last attempt died with evidence of memory pressure (`memory_evidence`): the next one
    /// runs under a smaller memory plan.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shrink_memory: bool,
    /// The evidence of memory pressure behind `shrink_memory` (for the `cap` event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_evidence: Option<String>,
    /// The last attempt met a full disk: the daemon starts the next one once this many MB are
    /// free on the root's file system (`checkpoint::space_needed_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_space_mb: Option<u64>,
    /// Attempts in a row that died (nobody recording why) without an optimizer step: the crash
    /// loop guard parks the run at 2 (`daemon::ending::settle_dead`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stalled: u32,
    /// When each attempt started, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<String>,
    /// The plan the run trains under when it is not the job's (a micro-batch reduced after a
    /// death under memory pressure), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Status {
    pub fn new_queued(run_id: &RunId, corpus: &CorpusName, source: Option<String>) -> Self {
        Self {
            run_id: run_id.clone(),
            corpus: corpus.clone(),
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
            shrink_memory: false,
            memory_evidence: None,
            needs_space_mb: None,
            stalled: 0,
            attempts: Vec::new(),
            plan: None,
        }
    }

    /// Parked by the crash loop guard (paused after two attempts in a row died without an
    /// optimizer step): unlike a pause someone asked for, it does not hold its corpus, so the
    /// corpus's other runs go on; `rerankd resume` retries it.
    pub fn parked(&self) -> bool {
        self.state == RunState::Paused && self.stalled >= 2
    }

    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }

    /// Moves to `state` (the fields that come with it); refuses to leave a terminal state
    /// (returns false, nothing changes). Only [`record`] calls it, after checking the table.
    fn transition(&mut self, state: RunState, reason: Option<String>, error: Option<String>) -> bool {
        if self.state.is_terminal() {
            return false;
        }
        match state {
            RunState::Running => {
                let now = now_rfc3339();
                self.started_at.get_or_insert_with(|| now.clone());
                self.attempts.push(now);
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

/// Records a state change of a run: the one way any process (the run itself, the daemon, the
/// sweep) does it. The `state` event is appended and synced first (with an `error` event before
/// it when there is an error), then status.json is replaced: status.json is the commit point.
/// A crash in between leaves a terminal event with a non-terminal status; the next `record` for
/// that run finds the event ([`MetricsLog::terminal`]) and completes *that* commit instead of
/// writing a second terminal event, so a run has exactly one. Returns whether `state` was
/// recorded (false when the run had already ended, or had ended in the log); a change that
/// [`RunState::allows`] refuses is an error, and nothing is written.
pub fn record(
    files: &RunFiles,
    log: &mut MetricsLog,
    st: &mut Status,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
) -> Result<bool> {
    if st.state.is_terminal() {
        return Ok(false);
    }
    if let Some(Event::State { state: logged, reason, error, .. }) = log.terminal().map(|l| l.event.clone()) {
        let mut done = st.clone();
        done.transition(logged, reason, error);
        done.write(&files.status())?;
        *st = done;
        return Ok(false);
    }
    if !st.state.allows(state) {
        return Err(super::StoreError::Transition { run_id: st.run_id.clone(), from: st.state, to: state });
    }
    let mut next = st.clone();
    next.transition(state, reason.clone(), error.clone());
    if let Some(e) = &error {
        log.append(Event::Error { message: e.clone() })?;
    }
    log.append(Event::State { state, reason, attempt: Some(next.attempt), error })?;
    log.sync()?;
    crate::testhooks::crash_point(&format!("record.{}.after_event", state.as_str()));
    next.write(&files.status())?;
    *st = next;
    Ok(true)
}

/// [`record`] for a process that does not hold the run's log open (the daemon, the sweep).
pub fn settle(
    files: &RunFiles,
    st: &mut Status,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
) -> Result<bool> {
    let mut log = MetricsLog::open(&files.metrics(), &st.run_id)?;
    record(files, &mut log, st, state, reason, error)
}

/// Every run under the root with a readable status, oldest first (creation time, then id). The
/// one lister of `runs/`: hidden entries (runs being created) are skipped.
pub fn all_runs(root: &Root) -> Vec<Status> {
    let mut v: Vec<Status> = std::fs::read_dir(root.runs())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| Status::read(&RunFiles::new(&e.path()).status()).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| (&a.created_at, &a.run_id).cmp(&(&b.created_at, &b.run_id)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    /// A crash after the terminal event and before status.json: the next record completes the
    /// logged state and never adds a second terminal event.
    #[test]
    fn a_logged_terminal_state_wins() {
        let d = tempfile::tempdir().unwrap();
        let files = RunFiles::new(d.path());
        let st = Status::new_queued(&RunId::parse("r").unwrap(), &CorpusName::parse("c").unwrap(), None);
        st.write(&files.status()).unwrap();
        let mut log = MetricsLog::open(&files.metrics(), &RunId::parse("r").unwrap()).unwrap();
        let failed = Event::State { state: RunState::Failed, reason: None, attempt: None, error: Some("boom".into()) };
        log.append(failed).unwrap();
        drop(log);
        // status.json still says queued, as after the crash.
        let mut st = Status::read(&files.status()).unwrap();
        assert!(!settle(&files, &mut st, RunState::Cancelled, Some("orphaned".into()), None).unwrap());
        let st = Status::read(&files.status()).unwrap();
        assert_eq!((st.state, st.error.as_deref()), (RunState::Failed, Some("boom")));
        let ev = super::super::metrics::read_events(&files.metrics()).unwrap();
        assert_eq!(ev.iter().filter(|e| e.event.state().is_some()).count(), 1);
    }

    fn arb_state() -> impl proptest::strategy::Strategy<Value = RunState> {
        use RunState::*;
        proptest::sample::select(vec![Queued, Running, Paused, Completed, Failed, Cancelled])
    }

    proptest::proptest! {
        /// Random sequences of state changes through `record`: what the table refuses is an
        /// error that writes nothing, a change after the end is ignored, and after every step
        /// status.json and the log's last `state` event agree, with at most one terminal event.
        #[test]
        fn record_follows_the_table_and_the_log_agrees_with_the_status(
            seq in proptest::collection::vec((arb_state(), proptest::bool::ANY), 0..12)
        ) {
            let d = tempfile::tempdir().unwrap();
            let files = RunFiles::new(d.path());
            let id = RunId::parse("c__20261203_120000").unwrap();
            let mut st = Status::new_queued(&id, &CorpusName::parse("c").unwrap(), None);
            st.write(&files.status()).unwrap();
            let mut log = MetricsLog::open(&files.metrics(), &id).unwrap();
            log.append(Event::State { state: RunState::Queued, reason: None, attempt: None, error: None }).unwrap();
            let mut model = RunState::Queued;
            for (to, with_error) in seq {
                let error = with_error.then(|| "boom".to_string());
                let lines = super::super::metrics::read_events(&files.metrics()).unwrap().len();
                let got = record(&files, &mut log, &mut st, to, Some("why".into()), error);
                let now = super::super::metrics::read_events(&files.metrics()).unwrap();
                if model.is_terminal() {
                    proptest::prop_assert!(matches!(got, Ok(false)));
                    proptest::prop_assert_eq!(now.len(), lines);
                } else if model.allows(to) {
                    proptest::prop_assert!(matches!(got, Ok(true)), "{:?} -> {:?}: {:?}", model, to, got);
                    model = to;
                } else {
                    proptest::prop_assert!(matches!(got, Err(StoreError::Transition { .. })), "{:?} -> {:?}", model, to);
                    proptest::prop_assert_eq!(now.len(), lines, "a refused change writes nothing");
                }
                let on_disk = Status::read(&files.status()).unwrap();
                proptest::prop_assert_eq!(on_disk.state, model);
                proptest::prop_assert_eq!(&on_disk, &st);
                let last = now.iter().rev().find_map(|e| e.event.state()).unwrap();
                proptest::prop_assert_eq!(last, model);
                let ends = now.iter().filter(|e| e.event.is_terminal_state());
                proptest::prop_assert!(ends.count() <= 1);
            }
        }
    }

    #[test]
    fn the_table_allows_exactly_the_documented_changes() {
        use RunState::*;
        let all = [Queued, Running, Paused, Completed, Failed, Cancelled];
        let allowed: Vec<(RunState, RunState)> =
            all.iter().flat_map(|&a| all.iter().map(move |&b| (a, b))).filter(|&(a, b)| a.allows(b)).collect();
        assert_eq!(allowed.len(), 4 + 5 + 2);
        assert!(all.iter().filter(|s| s.is_terminal()).all(|&t| all.iter().all(|&b| !t.allows(b))));
        assert!(!Queued.allows(Completed) && !Paused.allows(Running) && !Running.allows(Running));
    }
}
