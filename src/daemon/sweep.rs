//! The boot sweep: every run left `running` by a dead process becomes `cancelled` (reason
//! `orphaned: ...`) before new work starts; `queued` runs are returned in their original order.

use serde_json::json;

use crate::store::lock::is_held;
use crate::store::paths::RunFiles;
use crate::store::{MetricsLog, Root, RunState, Status};

pub const ORPHANED: &str = "orphaned: found running at boot with no live owner";

/// Settles orphans; returns the queued runs' ids, oldest first, and how many runs were settled.
pub fn sweep(root: &Root) -> anyhow::Result<(Vec<String>, usize)> {
    let mut queued: Vec<(String, String)> = Vec::new();
    let mut settled = 0;
    let Ok(rd) = std::fs::read_dir(root.runs()) else { return Ok((Vec::new(), 0)) };
    for entry in rd.filter_map(|e| e.ok()) {
        let files = RunFiles::new(&entry.path());
        let Ok(mut st) = Status::read(&files.status()) else { continue };
        match st.state {
            RunState::Queued => queued.push((st.created_at.clone(), st.run_id.clone())),
            RunState::Running => {
                let owner_alive = st.pid.is_some_and(pid_alive);
                if is_held(&root.corpus_lock(&st.corpus))? && owner_alive {
                    continue; // a live run outside this daemon's knowledge: leave it be
                }
                settle(&files, &mut st, RunState::Cancelled, Some(ORPHANED.to_string()), None)?;
                settled += 1;
            }
            _ => {}
        }
    }
    queued.sort();
    Ok((queued.into_iter().map(|(_, id)| id).collect(), settled))
}

/// Writes a terminal (or any) state for a run whose own process cannot: status + `state` event.
pub fn settle(
    files: &RunFiles,
    st: &mut Status,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
) -> anyhow::Result<()> {
    if !st.transition(state, reason.clone(), error.clone()) {
        return Ok(());
    }
    let mut log = MetricsLog::open(&files.metrics(), &st.run_id)?;
    if let Some(e) = &error {
        log.append("error", json!({"message": e}))?;
    }
    log.append("state", json!({"state": state.as_str(), "reason": reason}))?;
    log.sync()?;
    st.write(&files.status())?;
    Ok(())
}

/// Whether a process with this pid exists (signal 0 probes without sending).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
