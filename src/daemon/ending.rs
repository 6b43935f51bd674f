//! How a dead run ends: a run whose process is gone without recording its end is recorded by
//! the daemon (its supervisor, or the boot sweep), or queued again to resume from its
//! checkpoint; an end that cannot be recorded yet (a full disk) is kept and retried.

use crate::ids::{CorpusName, RunId};
use crate::store::checkpoint;
use crate::store::lock::is_held;
use crate::store::paths::RunFiles;
use crate::store::{FileLock, Root, RunState, Status, models, settle};

/// A run's end that could not be recorded yet; retried every tick.
pub struct Unsettled {
    pub run_id: RunId,
    pub corpus: CorpusName,
    pub state: RunState,
    pub reason: Option<String>,
    pub error: Option<String>,
    /// Whether the run may resume from a checkpoint instead.
    pub resume: Resume,
}

/// Whether a run whose process died may go back to the queue to resume from its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No: it was cancelled, or killed for a reason that would recur.
    No,
    /// Yes; the daemon knows why it died (its own shutdown).
    Explained,
    /// Yes, under a smaller memory plan: it died without anyone recording why.
    Unexplained,
}

/// Whether a run's process is alive: its pid exists and its corpus lock is held (a recycled pid
/// holds no lock).
pub fn run_is_alive(root: &Root, corpus: &CorpusName, pid: u32) -> bool {
    crate::sys::pid_alive(pid) && is_held(&root.corpus_lock(corpus)).unwrap_or(true)
}

/// Records the end of a run whose process is gone without recording it. A run that may resume
/// (`resume` is not `No`) and has a checkpoint goes back to `queued` instead, to continue from it,
/// if that checkpoint was written in the attempt that just died or the daemon's own shutdown
/// stopped it; if not, the run was interrupted twice without progress and fails (a run that froze
/// the machine would freeze it again). After
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
    let ckpt = (resume != Resume::No).then(|| checkpoint::latest::<checkpoint::Header>(files)).flatten();
    if let Some((_, Ok(ck))) = ckpt {
        let step = ck.cursor.step;
        let written_in = ck.attempt;
        let how = error.clone().or(reason.clone()).unwrap_or_default();
        // The daemon's own shutdown never counts against a run: an attempt it stopped resumes
        // whether or not it got as far as a checkpoint of its own.
        if written_in == st.attempt || resume == Resume::Explained {
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

/// Tries to record an unsettled end; gives it back if that failed again.
pub fn retry(root: &Root, u: Unsettled) -> Result<RunState, Unsettled> {
    let files = RunFiles::new(&root.run_dir(&u.run_id));
    let mut st = match Status::read(&files.status()) {
        Ok(st) => st,
        Err(e) => {
            tracing::error!(run_id = %u.run_id, error = %e, "reading a finished run's status; will retry");
            return Err(u);
        }
    };
    if st.state != RunState::Running {
        tracing::info!(run_id = %u.run_id, state = st.state.as_str(), "run process ended");
        return Ok(st.state);
    }
    match settle_dead(root, &files, &mut st, u.state, u.reason.clone(), u.error.clone(), u.resume) {
        Ok(()) => {
            tracing::warn!(run_id = %u.run_id, state = st.state.as_str(), "run ended without recording it; recorded for it");
            Ok(st.state)
        }
        Err(e) => {
            tracing::error!(run_id = %u.run_id, error = %e, "recording the end of a run failed; will retry");
            Err(u)
        }
    }
}
