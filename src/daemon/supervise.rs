//! Supervision of run processes: the daemon's own children and runs adopted after a restart.
//! Reaps them, records the end of a run that could not record it itself (with the process's
//! last words from stderr), enforces the hard memory limit, and escalates ignored cancels
//! (SIGTERM after `cancel_grace_s`, SIGKILL 3 s later). A state that cannot be recorded (a full
//! disk) is kept and retried until it is, and the corpus stays busy until then.

use crate::ids::{CorpusName, RunId};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::paths::RunFiles;
use crate::store::{EXIT_DISK_FULL, Root, RunState, StopRequest};

use super::ending::{MayResume, Unsettled, retry, run_is_alive};

/// How long after SIGTERM a run that ignores it gets SIGKILL.
pub const TERM_TO_KILL: Duration = Duration::from_secs(3);
/// How much of a run's stderr is kept as its last words.
const LAST_WORDS_BYTES: usize = 2048;

/// The last bytes a child wrote to stderr, and the thread that reads them.
pub type StderrTail = (Arc<Mutex<VecDeque<u8>>>, JoinHandle<()>);

/// The process behind an active run.
pub enum Proc {
    /// Started by this daemon: reaped with `wait`, its stderr read by a thread.
    Child { child: Child, stderr: Option<StderrTail> },
    /// Found alive at boot (it outlived the previous daemon): polled by pid and corpus lock.
    Adopted { pid: u32 },
}

/// A run whose process is alive (or was, until this tick).
pub struct Active {
    pub run_id: RunId,
    pub corpus: CorpusName,
    pub proc: Proc,
    /// When this daemon first saw the cancel sentinel.
    pub cancel_seen: Option<Instant>,
    pub term_sent: Option<Instant>,
    /// Memory past which the daemon kills the run (from its memory budget).
    pub hard_limit_mb: u64,
    /// Why the daemon killed it, if it did (recorded as the run's error).
    pub killed_for: Option<String>,
    /// The daemon asked it to stop because the daemon is shutting down: however it ends
    /// without recording it, it may resume.
    pub shutdown: bool,
    /// Its memory budget, and its memory at the last tick: evidence of memory pressure if it
    /// dies (see [`Active::memory_evidence`]).
    budget_mb: u64,
    last_mb: Option<u64>,
    /// The cgroup's OOM kills when the daemon started watching it.
    oom_kills_at_start: Option<u64>,
}

impl Active {
    pub fn new(run_id: RunId, corpus: CorpusName, proc: Proc, budget_mb: u64) -> Self {
        Self {
            run_id,
            corpus,
            proc,
            cancel_seen: None,
            term_sent: None,
            hard_limit_mb: crate::budget::hard_limit_mb(budget_mb),
            killed_for: None,
            shutdown: false,
            budget_mb,
            last_mb: None,
            oom_kills_at_start: crate::sys::cgroup_oom_kills(),
        }
    }

    /// Why its death may have been memory, if there is evidence: the kernel's OOM killer acted in
    /// the cgroup since the run started, or its last sampled memory was at or over its budget (the
    /// plan did not hold; the governor plans a run to fit within it). A death without evidence (a
    /// reboot, a power loss, a kill -9) is not memory.
    pub fn memory_evidence(&self) -> Option<String> {
        if let (Some(a), Some(b)) = (self.oom_kills_at_start, crate::sys::cgroup_oom_kills())
            && b > a
        {
            return Some(format!(
                "the kernel's OOM killer acted in the daemon's cgroup (memory.events oom_kill {a} -> {b})"
            ));
        }
        let mb = self.last_mb?;
        (mb >= self.budget_mb)
            .then(|| format!("its last sampled memory, {mb} MB, was at or over its budget of {} MB", self.budget_mb))
    }

    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child { child, .. } => child.id(),
            Proc::Adopted { pid } => *pid,
        }
    }

    /// `Some(how it ended)` once the process is gone.
    fn exited(&mut self, root: &Root) -> Option<Exit> {
        match &mut self.proc {
            Proc::Child { child, stderr } => match child.try_wait() {
                Ok(Some(exit)) => {
                    let words = stderr.take().map(|(buf, t)| {
                        let _ = t.join(); // the pipe is closed: the reader is at EOF
                        last_words(&buf)
                    });
                    let how = describe(exit) + &words.flatten().map(|w| format!("; it said: {w}")).unwrap_or_default();
                    Some(Exit { how, disk_full: exit.code() == Some(EXIT_DISK_FULL) })
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(run_id = %self.run_id, error = %e, "waiting on a run");
                    None
                }
            },
            Proc::Adopted { pid } => (!run_is_alive(root, &self.corpus, *pid)).then(|| Exit {
                how: "exit status unknown: adopted after a daemon restart".to_string(),
                disk_full: false,
            }),
        }
    }

    /// Signals the process (SIGTERM, SIGKILL). A child is signalled only while unreaped, an
    /// adopted pid only while it holds the run's lock, so the pid cannot have been recycled.
    pub fn signal(&mut self, root: &Root, sig: i32) {
        let ok = match &mut self.proc {
            Proc::Child { child, .. } if sig == libc::SIGKILL => child.kill().is_ok(),
            Proc::Child { child, .. } => crate::sys::signal(child.id(), sig).is_ok(),
            Proc::Adopted { pid } => run_is_alive(root, &self.corpus, *pid) && crate::sys::signal(*pid, sig).is_ok(),
        };
        if !ok {
            tracing::debug!(run_id = %self.run_id, sig, "signal not delivered (already gone?)");
        }
    }

    /// One supervision tick: `Some(how it ended)` once the process is gone (to be recorded
    /// with [`finish`]), else the memory watchdog and cancel escalation.
    pub fn tick(&mut self, root: &Root, grace: Duration) -> Option<Exit> {
        if let Some(exit) = self.exited(root) {
            return Some(exit);
        }
        self.police(root, grace);
        None
    }

    /// The memory watchdog, then cancel escalation.
    fn police(&mut self, root: &Root, grace: Duration) {
        let files = RunFiles::new(&root.run_dir(&self.run_id));
        let sampled = crate::sys::process_memory_mb(self.pid());
        if sampled.is_some() {
            self.last_mb = sampled;
        }
        if self.killed_for.is_none()
            && let Some(mb) = sampled
            && mb > self.hard_limit_mb
        {
            let why = format!(
                "killed by the daemon: memory {mb} MB passed the hard limit of {} MB \
                 (memory budget x 1.25, at least +512 MB)",
                self.hard_limit_mb
            );
            tracing::error!(run_id = %self.run_id, mem_mb = mb, limit_mb = self.hard_limit_mb, "memory limit: SIGKILL");
            self.signal(root, libc::SIGKILL);
            self.killed_for = Some(why);
        }
        if self.cancel_seen.is_none() && files.cancel_requested().is_some() {
            self.cancel_seen = Some(Instant::now());
        }
        let Some(seen) = self.cancel_seen else { return };
        if self.term_sent.is_none() && seen.elapsed() >= grace {
            tracing::warn!(run_id = %self.run_id, "run ignored cancel for the grace period: SIGTERM");
            self.signal(root, libc::SIGTERM);
            self.term_sent = Some(Instant::now());
        } else if self.term_sent.is_some_and(|t| t.elapsed() >= TERM_TO_KILL) {
            tracing::warn!(run_id = %self.run_id, "run ignored SIGTERM: SIGKILL");
            self.signal(root, libc::SIGKILL);
        }
    }
}

/// Reads a child's stderr on a thread: every line goes on to the daemon's stderr (the log), and
/// the last [`LAST_WORDS_BYTES`] are kept for the run's error if it dies without a result.
pub fn capture_stderr(run_id: &RunId, child: &mut Child) -> Option<StderrTail> {
    let pipe = child.stderr.take()?;
    let buf = Arc::new(Mutex::new(VecDeque::with_capacity(LAST_WORDS_BYTES)));
    let keep = Arc::clone(&buf);
    let id = run_id.to_string();
    let t = std::thread::spawn(move || {
        for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
            eprintln!("[run {id}] {}", String::from_utf8_lossy(&line));
            if let Ok(mut b) = keep.lock() {
                b.extend(line.iter().chain(b"\n"));
                let over = b.len().saturating_sub(LAST_WORDS_BYTES);
                b.drain(..over);
            }
        }
    });
    Some((buf, t))
}

fn last_words(buf: &Mutex<VecDeque<u8>>) -> Option<String> {
    let mut b = buf.lock().ok()?;
    let text = String::from_utf8_lossy(b.make_contiguous()).into_owned();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    (!tail.is_empty()).then_some(tail)
}

/// How a run's process ended: said for its error, and whether it met a full disk it could not
/// record ([`EXIT_DISK_FULL`]).
pub struct Exit {
    how: String,
    disk_full: bool,
}

fn describe(exit: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (exit.code(), exit.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit".to_string(),
    }
}

/// After a run's process is gone: if it left its run running, record why, or queue it again to
/// resume from its checkpoint. Returns the state the run is in now, or the pending record.
pub fn finish(root: &Root, a: &Active, exit: &Exit) -> Result<RunState, Unsettled> {
    let files = RunFiles::new(&root.run_dir(&a.run_id));
    let how = &exit.how;
    let (state, reason, error, resume) = match (&a.killed_for, files.cancel_requested()) {
        // The watchdog's kill is evidence of memory pressure: it resumes from its checkpoint
        // under a smaller plan (and fails when the plan cannot shrink).
        (Some(why), _) => (RunState::Failed, None, Some(why.clone()), MayResume::Unexplained),
        (None, Some(reason)) => (RunState::Cancelled, Some(reason), None, MayResume::No),
        (None, None) if exit.disk_full => {
            (RunState::Failed, None, Some(format!("the disk is full ({how})")), MayResume::DiskFull)
        }
        (None, None) if a.shutdown => {
            (RunState::Cancelled, Some(StopRequest::Shutdown.reason().to_string()), None, MayResume::Explained)
        }
        (None, None) => {
            (RunState::Failed, None, Some(format!("run process died without a result ({how})")), MayResume::Unexplained)
        }
    };
    let memory = match &a.killed_for {
        Some(why) => Some(why.clone().into_boxed_str()),
        None => (resume == MayResume::Unexplained).then(|| a.memory_evidence()).flatten().map(String::into_boxed_str),
    };
    let u = Unsettled { run_id: a.run_id.clone(), corpus: a.corpus.clone(), state, reason, error, resume, memory };
    retry(root, u)
}
