//! How a dead run ends: a run whose process is gone without recording its end is recorded by
//! the daemon (its supervisor, or the boot sweep), or queued again to resume from its
//! checkpoint; an end that cannot be recorded yet (a full disk) is kept and retried.

use crate::ids::{CorpusName, RunId};
use crate::store::checkpoint;
use crate::store::events::Event;
use crate::store::lock::is_held;
use crate::store::metrics::read_events;
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
    pub resume: MayResume,
    /// Evidence that it died of memory pressure (`supervise::Active::memory_evidence`): only then
    /// does its next attempt run under a smaller plan.
    pub memory: Option<Box<str>>,
}

/// Whether a run whose process died may go back to the queue to resume from its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MayResume {
    /// No: it was cancelled, or killed for a reason that would recur.
    No,
    /// Yes; the daemon knows why it died (its own shutdown).
    Explained,
    /// Yes: it died without anyone recording why (under a smaller memory plan only with
    /// evidence of memory pressure).
    Unexplained,
    /// Yes, once there is space: it met a full disk and could not record it
    /// ([`crate::store::EXIT_DISK_FULL`]). Never counts against the run.
    DiskFull,
}

/// Whether a run's process is alive: its pid exists and its corpus lock is held (a recycled pid
/// holds no lock).
pub fn run_is_alive(root: &Root, corpus: &CorpusName, pid: u32) -> bool {
    crate::sys::pid_alive(pid) && is_held(&root.corpus_lock(corpus)).unwrap_or(true)
}

/// Records the end of a run whose process is gone without recording it. A run that may resume
/// (`resume` is not `No`) and has a checkpoint goes back to `queued` instead, to continue from it,
/// unless it is a crash loop: two attempts in a row that died without progress ([`progressed`]:
/// counted in the attempt's own `step` events, not in checkpoints; the daemon's shutdown and a
/// full disk never count) park it `paused`, its checkpoint kept, for `rerankd resume` to retry. With
/// evidence of memory pressure (`memory`) the next attempt runs under a smaller memory plan. A
/// run that does not end completed gives back a promotion it made.
#[allow(clippy::too_many_arguments)]
pub fn settle_dead(
    root: &Root,
    files: &RunFiles,
    st: &mut Status,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
    resume: MayResume,
    memory: Option<String>,
) -> crate::store::Result<()> {
    let checked = (resume != MayResume::No).then(|| checkpoint::checked::<checkpoint::Header>(files));
    let (ckpt, damaged) = checked.map_or((None, Vec::new()), |c| (c.found, c.damaged));
    if ckpt.is_none() && !damaged.is_empty() {
        // Every checkpoint it has is damaged: it starts over (its next attempt names them).
        let how = error.clone().or(reason.clone()).unwrap_or_default();
        let why = format!("interrupted ({how}); its checkpoints are damaged, so it starts over");
        settle(files, st, RunState::Queued, Some(why), None)?;
    } else if let Some((_, Ok(ck))) = ckpt {
        let step = ck.cursor.step;
        let how = error.clone().or(reason.clone()).unwrap_or_default();
        let counts = resume == MayResume::Unexplained;
        st.stalled = if !counts || progressed(files, st.attempt) { 0 } else { st.stalled + 1 };
        if st.stalled < 2 {
            st.shrink_memory = memory.is_some();
            st.memory_evidence = memory;
            let plan = if st.shrink_memory { " under a smaller memory plan" } else { "" };
            let mut why = format!("interrupted at step {step} ({how}); resumes from its checkpoint{plan}");
            if resume == MayResume::DiskFull {
                let need = checkpoint::space_needed_mb(files);
                st.needs_space_mb = Some(need);
                why = format!("{why} once {need} MB are free on {}", root.dir.display());
            }
            settle(files, st, RunState::Queued, Some(why), None)?;
        } else {
            let why = format!(
                "interrupted twice without progress (attempts {} and {} died without a step, or at the step the \
                 attempt before them did); parked \
                 with its checkpoint at step {step}: `rerankd resume {}` retries it. Last: {how}",
                st.attempt - 1,
                st.attempt,
                st.run_id
            );
            settle(files, st, RunState::Paused, Some(why), None)?;
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
    match settle_dead(
        root,
        &files,
        &mut st,
        u.state,
        u.reason.clone(),
        u.error.clone(),
        u.resume,
        u.memory.as_deref().map(str::to_string),
    ) {
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

/// Whether `attempt` made progress, by the run's own log: it logged optimizer steps, and its
/// last step is not where the attempt before it died (a run that always dies at the same step, a
/// crash at its promotion say, is a loop however many steps each attempt redoes).
fn progressed(files: &RunFiles, attempt: u32) -> bool {
    let Ok(events) = read_events(&files.metrics()) else { return false };
    let mut last: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut current = None;
    for e in &events {
        match &e.event {
            Event::State { state: RunState::Running, attempt: Some(a), .. } => current = Some(*a),
            Event::Step(s) => {
                if let Some(a) = current {
                    last.insert(a, s.step);
                }
            }
            _ => {}
        }
    }
    match (last.get(&attempt), attempt.checked_sub(1).and_then(|p| last.get(&p))) {
        (None, _) => false,
        (Some(this), Some(before)) => this != before,
        (Some(_), None) => true,
    }
}
