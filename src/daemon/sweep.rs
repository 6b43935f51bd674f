//! The boot sweep, before new work starts:
//! - a run left `running` whose process is alive and still holds its corpus lock is *adopted*:
//!   the daemon supervises it from now on (memory watchdog, cancel escalation, and recording its
//!   end if it dies without doing so: review F3);
//! - any other `running` run becomes `cancelled` (reason `orphaned: ...`), and if it had made
//!   itself current its promotion is undone;
//! - a run whose log already holds its terminal state gets status.json to match (a crash
//!   between the two writes), through the one recorder;
//! - every corpus's `current` is reconciled with its promotion log;
//! - temporary files left by crashed writers are removed (review F19);
//! - `queued` runs are returned in their original order.

use crate::ids::{CorpusName, RunId};
use crate::store::atomic::remove_stale_temps;
use crate::store::checkpoint;
use crate::store::lock::is_held;
use crate::store::metrics::{read_events, terminal_state};
use crate::store::paths::RunFiles;

use super::supervise::Resume;
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
    let mut out = Swept { temps_removed: remove_temps(root), ..Swept::default() };
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
                    Some(StopRequest::Cancel { reason }) => (reason, Resume::No),
                    Some(StopRequest::Shutdown) => (StopRequest::Shutdown.reason().to_string(), Resume::Explained),
                    _ => (ORPHANED.to_string(), Resume::Unexplained),
                };
                settle_dead(root, &files, &mut st, RunState::Cancelled, Some(reason), None, resume)?;
                match st.state {
                    RunState::Queued => out.queued.push(st),
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

/// Whether a run's process is alive: its pid exists and its corpus lock is held (a recycled pid
/// holds no lock).
pub fn run_is_alive(root: &Root, corpus: &CorpusName, pid: u32) -> bool {
    crate::sys::pid_alive(pid) && is_held(&root.corpus_lock(corpus)).unwrap_or(true)
}

/// Records the end of a run whose process is gone without recording it. A run that may resume
/// (`resume` is not `No`) and has a checkpoint goes back to `queued` instead, to continue from it,
/// if that checkpoint was written in the attempt that just died; if not, the run was interrupted
/// twice without progress and fails (a run that froze the machine would freeze it again). After
/// an unexplained death the next attempt runs under a smaller memory plan. A run that does not
/// end completed gives back a promotion it made.
pub fn settle_dead(
    root: &Root,
    files: &RunFiles,
    st: &mut Status,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
    resume: Resume,
) -> crate::store::Result<()> {
    let ckpt = (resume != Resume::No).then(|| checkpoint::latest(files)).flatten();
    if let Some((_, ck)) = ckpt {
        let step = ck["cursor"]["step"].as_u64().unwrap_or(0);
        let written_in = ck["attempt"].as_u64().unwrap_or(0) as u32;
        let how = error.clone().or(reason.clone()).unwrap_or_default();
        if written_in == st.attempt {
            st.shrink_memory = resume == Resume::Unexplained;
            let plan = if st.shrink_memory { " under a smaller memory plan" } else { "" };
            let why = format!("interrupted at step {step} ({how}); resumes from its checkpoint{plan}");
            settle(files, st, RunState::Queued, Some(why), None)?;
        } else {
            let why = format!(
                "interrupted twice at step {step} without progress (attempt {}; its last checkpoint is from attempt \
                 {written_in}); not resumed. Last: {how}",
                st.attempt
            );
            settle(files, st, RunState::Failed, None, Some(why))?;
        }
    } else {
        settle(files, st, state, reason, error)?;
    }
    if st.state.is_terminal() {
        checkpoint::remove(files);
    }
    // Whatever stopped the attempt that died is answered with it.
    files.clear_shutdown();
    // A promotion made by an attempt that did not complete is given back, also when the run
    // resumes: the next attempt promotes again if it gets that far.
    if st.state != RunState::Completed
        && let Ok(Some(_lock)) = FileLock::try_acquire(&root.corpus_lock(&st.corpus))
        && models::undo(root, &st.corpus, &st.run_id, &format!("{} ended {}", st.run_id, st.state.as_str()))?
    {
        let now = models::current(root, &st.corpus).map(|(id, _)| id);
        tracing::warn!(run_id = %st.run_id, current = ?now, "undid the promotion of a run that did not complete");
    }
    Ok(())
}

/// Removes crashed writers' temporary files wherever the store makes them.
fn remove_temps(root: &Root) -> usize {
    let mut dirs = vec![root.runs(), root.accepted(), root.rejected(), root.dir.clone()];
    for parent in [root.runs(), root.dir.join("models")] {
        if let Ok(rd) = std::fs::read_dir(&parent) {
            dirs.extend(rd.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
    }
    for c in models::corpora(root) {
        dirs.push(root.models(&c).join("adapters"));
    }
    dirs.iter().map(|d| remove_stale_temps(d)).sum()
}
