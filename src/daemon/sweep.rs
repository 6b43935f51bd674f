//! The boot sweep, before new work starts:
//! - a run left `running` whose process is alive and still holds its corpus lock is *adopted*:
//!   the daemon supervises it from now on (memory watchdog, cancel escalation, and recording its
//!   end if it dies without doing so);
//! - any other `running` run becomes `cancelled` (reason `orphaned: ...`), and if it had made
//!   itself current its promotion is undone;
//! - a run whose log already holds its terminal state gets status.json to match (a crash
//!   between the two writes), through the one recorder;
//! - every corpus's `current` is reconciled with its promotion log;
//! - temporary files left by crashed writers are removed;
//! - `queued` runs are returned in their original order.

use crate::ids::{CorpusName, RunId};
use crate::store::metrics::{read_events, terminal_state};
use crate::store::paths::RunFiles;

use super::ending::{MayResume, run_is_alive, settle_dead};
use crate::store::{FileLock, Root, RunState, Status, StopRequest, all_runs, models, settle};

pub const ORPHANED: &str = "orphaned: found running at boot with no live owner";

/// A run whose process outlived a previous daemon.
#[derive(Debug, Clone)]
pub struct Adopted {
    pub run_id: RunId,
    pub corpus: CorpusName,
    pub pid: u32,
}

/// What the sweep found and did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Queued runs, oldest first.
    pub queued: Vec<Status>,
    pub adopted: Vec<Adopted>,
    /// Paused runs: they keep their corpus.
    pub paused: Vec<Status>,
    /// Runs settled as orphaned (or completed from their log).
    pub settled: Vec<RunId>,
    pub temps_removed: usize,
}

pub fn sweep(root: &Root) -> anyhow::Result<Swept> {
    let mut out = Swept { temps_removed: root.remove_stale_temps(), ..Swept::default() };
    for mut st in all_runs(root) {
        let files = RunFiles::new(&root.run_dir(&st.run_id));
        if st.state.is_terminal() {
            continue;
        }
        match st.state {
            // A queued run whose end is already in its log (a crash while cancelling it): record
            // completes that state. Only a queued run needs the look; a dead running one gets it
            // from settle_dead below, and a live one records its own end.
            RunState::Queued if terminal_state(&read_events(&files.metrics())?).is_some() => {
                settle(&files, &mut st, RunState::Cancelled, None, None)?;
                out.settled.push(st.run_id.clone());
            }
            RunState::Queued => out.queued.push(st),
            RunState::Paused => out.paused.push(st),
            RunState::Running => {
                if let Some(pid) = st.pid.filter(|p| run_is_alive(root, &st.corpus, *p)) {
                    out.adopted.push(Adopted { run_id: st.run_id.clone(), corpus: st.corpus.clone(), pid });
                    continue;
                }
                // A cancel asked for while no daemon ran is answered; an attempt the last daemon
                // stopped for its shutdown resumes as interrupted; any other orphan may resume.
                let (reason, resume) = match files.stop_request(Some(st.attempt)) {
                    Some(StopRequest::Cancel { reason }) => (reason, MayResume::No),
                    Some(StopRequest::Shutdown) => (StopRequest::Shutdown.reason().to_string(), MayResume::Explained),
                    _ => (ORPHANED.to_string(), MayResume::Unexplained),
                };
                // No evidence of memory pressure survives a daemon's death (a reboot, a power
                // loss): the plan stays.
                settle_dead(root, &files, &mut st, RunState::Cancelled, Some(reason), None, resume, None)?;
                match st.state {
                    RunState::Queued => out.queued.push(st),
                    RunState::Paused => out.paused.push(st),
                    _ => out.settled.push(st.run_id.clone()),
                }
            }
            _ => {}
        }
    }
    for corpus in models::corpora(root) {
        // Under the corpus lock, so a live (adopted) run's promotion is never second-guessed.
        if let Ok(Some(_lock)) = FileLock::try_acquire(&root.corpus_lock(&corpus))
            && let Some(fixed) = models::reconcile(root, &corpus)?
        {
            tracing::warn!(corpus = %corpus, current = %fixed, "`current` did not match the promotion log; repaired");
        }
    }
    Ok(out)
}
