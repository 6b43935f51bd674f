//! The daemon: one per root (`daemon.lock`), boot sweep, spool intake, scheduling (one active run
//! per corpus, `max_concurrent_runs` overall, arrival order), supervision of run processes with
//! cancel escalation, and signals (TERM/INT: cancel runs as "daemon shutdown" and exit 0; HUP:
//! reload config and rescan). It runs in the foreground: launchd and systemd track its pid.

pub mod config;
pub mod intake;
pub mod sweep;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::job::{IfBusy, Job, JobError};
use crate::store::paths::RunFiles;
use crate::store::{FileLock, Root, RunState, Status};
use config::DaemonConfig;
use intake::{Admission, Intake};
use sweep::settle;

pub const SHUTDOWN_REASON: &str = "daemon shutdown";

/// Another daemon holds this root's `daemon.lock`.
#[derive(Debug, thiserror::Error)]
#[error("another rerankd daemon ({}) holds {}; one daemon per root", pid.map_or("another process".to_string(), |p| format!("pid {p}")), lock.display())]
pub struct AlreadyRunning {
    pub pid: Option<u32>,
    pub lock: PathBuf,
}

/// How long after SIGTERM a child that ignores it gets SIGKILL.
const TERM_TO_KILL: Duration = Duration::from_secs(3);

/// What wakes the loop early.
enum Wake {
    Signal(i32),
    Spool,
}

struct Active {
    run_id: String,
    corpus: String,
    child: Child,
    cancel_seen: Option<Instant>,
    term_sent: Option<Instant>,
    /// Resident memory past which the daemon kills the run (from its memory budget).
    hard_limit_mb: u64,
    /// Why the daemon killed it, if it did (recorded as the run's error).
    killed_for: Option<String>,
}

/// The hard limit for a run with this budget: a quarter above it, and at least 512 MB above.
pub fn hard_limit_mb(budget_mb: u64) -> u64 {
    (budget_mb + budget_mb / 4).max(budget_mb + 512)
}

struct Daemon {
    root: Root,
    cfg: DaemonConfig,
    queue: VecDeque<(String, String)>, // (run_id, corpus), arrival order
    active: Vec<Active>,
    intake: Intake,
}

/// Runs the daemon until a stop signal (or, with `until_idle`, until nothing is left to do).
pub fn run(root: &Root, until_idle: bool) -> anyhow::Result<()> {
    root.ensure()?;
    if let Some(problem) = permission_problems(root).into_iter().next() {
        anyhow::bail!("refusing to run: {problem}");
    }
    let Some(mut lock) = FileLock::try_acquire(&root.daemon_lock())? else {
        return Err(AlreadyRunning {
            pid: crate::store::lock::holder_pid(&root.daemon_lock()),
            lock: root.daemon_lock(),
        }
        .into());
    };
    lock.write_pid()?;
    let cfg = DaemonConfig::load(&root.config())?;
    tracing::info!(root = %root.dir.display(), pid = std::process::id(), "daemon starting");

    let (tx, rx) = mpsc::channel();
    let _signals = install_signals(tx.clone())?;
    let _watcher = watch_spool(root, tx);

    let (queued, settled) = sweep::sweep(root)?;
    if settled > 0 {
        tracing::warn!(settled, "boot sweep settled orphaned runs");
    }
    let intake = Intake::new(cfg.memory_budget_mb);
    let mut d = Daemon { root: root.clone(), cfg, queue: VecDeque::new(), active: Vec::new(), intake };
    for id in queued {
        if let Ok(st) = Status::read(&RunFiles::new(&root.run_dir(&id)).status()) {
            d.queue.push_back((id, st.corpus));
        }
    }
    d.reprocess_claimed();
    d.intake_pass();
    let mut last_scan = Instant::now();
    loop {
        // Wait for the first wake-up (or 100 ms), then take every other one already queued.
        let wakes: Vec<Wake> = rx.recv_timeout(Duration::from_millis(100)).into_iter().chain(rx.try_iter()).collect();
        let mut rescan = false;
        for w in wakes {
            match w {
                Wake::Spool => rescan = true,
                Wake::Signal(signal_hook::consts::SIGHUP) => {
                    d.reload_config();
                    rescan = true;
                }
                Wake::Signal(sig) => {
                    tracing::info!(signal = sig, "stopping: cancelling active runs");
                    d.shutdown();
                    return Ok(());
                }
            }
        }
        // Watcher events are a hint; a periodic rescan is the guarantee. In-place writes that
        // are still settling need another look within a second.
        let every = if d.intake.has_pending() { 1 } else { d.cfg.rescan_s };
        if rescan || last_scan.elapsed() >= Duration::from_secs(every) {
            d.intake_pass();
            last_scan = Instant::now();
        }
        d.supervise();
        d.cancel_queued();
        d.start_runs();
        if until_idle && d.active.is_empty() && d.queue.is_empty() && spool_is_empty(root) {
            tracing::info!("idle: exiting");
            return Ok(());
        }
    }
}

/// The corpora that are busy (active or queued) when a job arrives.
struct Busy<'a> {
    corpora: &'a [String],
}

impl Admission for Busy<'_> {
    fn admit(&mut self, job: &Job) -> Result<(), JobError> {
        if job.if_busy == IfBusy::Reject && self.corpora.contains(&job.corpus) {
            return Err(JobError {
                error: format!("corpus `{}` has an active or queued run", job.corpus),
                field: Some("if_busy".into()),
                hint: Some("use \"queue\" to wait or \"supersede\" to replace it".into()),
            });
        }
        Ok(())
    }
}

impl Daemon {
    fn reload_config(&mut self) {
        tracing::info!("SIGHUP: reloading config and rescanning");
        match DaemonConfig::load(&self.root.config()) {
            Ok(c) => {
                self.intake.default_budget_mb = c.memory_budget_mb;
                self.cfg = c;
            }
            Err(e) => tracing::error!(error = %e, "config not reloaded"),
        }
    }

    fn busy_corpora(&self) -> Vec<String> {
        self.active.iter().map(|a| a.corpus.clone()).chain(self.queue.iter().map(|q| q.1.clone())).collect()
    }

    fn reprocess_claimed(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.root.claimed()) else { return };
        let mut claimed: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        claimed.sort();
        for path in claimed {
            tracing::warn!(file = %path.display(), "re-processing a job claimed before a crash");
            let busy = self.busy_corpora();
            if let Some(a) = self.intake.process_claimed(&self.root, &path, &mut Busy { corpora: &busy }, true) {
                self.enqueue(a);
            }
        }
    }

    fn intake_pass(&mut self) {
        let busy = self.busy_corpora();
        let mut adm = Busy { corpora: &busy };
        let accepted = self.intake.scan(&self.root, &mut adm);
        for a in accepted {
            self.enqueue(a);
        }
    }

    fn enqueue(&mut self, a: intake::Accepted) {
        if a.job.if_busy == IfBusy::Supersede {
            for act in self.active.iter().filter(|x| x.corpus == a.job.corpus) {
                request_cancel(&self.root, &act.run_id, &format!("superseded by {}", a.run_id));
            }
            for (id, _) in self.queue.iter().filter(|q| q.1 == a.job.corpus) {
                request_cancel(&self.root, id, &format!("superseded by {}", a.run_id));
            }
        }
        self.queue.push_back((a.run_id, a.job.corpus));
    }

    /// Queued runs with a cancel sentinel are cancelled without ever starting.
    fn cancel_queued(&mut self) {
        let root = self.root.clone();
        self.queue.retain(|(id, _)| {
            let files = RunFiles::new(&root.run_dir(id));
            let Some(reason) = files.cancel_requested() else { return true };
            if let Ok(mut st) = Status::read(&files.status())
                && let Err(e) = settle(&files, &mut st, RunState::Cancelled, Some(reason), None)
            {
                tracing::error!(run_id = %id, error = %e, "recording a cancelled queued run");
            }
            tracing::info!(run_id = %id, "queued run cancelled");
            false
        });
    }

    fn start_runs(&mut self) {
        let mut i = 0;
        while i < self.queue.len() && self.active.len() < self.cfg.max_concurrent_runs {
            let corpus = self.queue[i].1.clone();
            let busy = self.active.iter().any(|a| a.corpus == corpus)
                || self.queue.iter().take(i).any(|q| q.1 == corpus)
                || crate::store::lock::is_held(&self.root.corpus_lock(&corpus)).unwrap_or(true);
            if busy {
                i += 1;
                continue;
            }
            let (run_id, corpus) = self.queue.remove(i).expect("index in range");
            match self.spawn(&run_id) {
                Ok(child) => {
                    let job: Option<crate::job::Job> =
                        crate::store::atomic::read_json(&RunFiles::new(&self.root.run_dir(&run_id)).job()).ok();
                    let budget = job.and_then(|j| j.memory_budget_mb).unwrap_or(self.cfg.memory_budget_mb);
                    let hard_limit_mb = hard_limit_mb(budget);
                    tracing::info!(run_id = %run_id, pid = child.id(), hard_limit_mb, "run started");
                    self.active.push(Active {
                        run_id,
                        corpus,
                        child,
                        cancel_seen: None,
                        term_sent: None,
                        hard_limit_mb,
                        killed_for: None,
                    });
                }
                Err(e) => {
                    tracing::error!(run_id = %run_id, error = %e, "could not start the run");
                    let files = RunFiles::new(&self.root.run_dir(&run_id));
                    if let Ok(mut st) = Status::read(&files.status()) {
                        let _ =
                            settle(&files, &mut st, RunState::Failed, None, Some(format!("could not start: {e:#}")));
                    }
                }
            }
        }
    }

    fn spawn(&self, run_id: &str) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("finding the rerankd executable")?;
        Command::new(exe)
            .arg("--root")
            .arg(&self.root.dir)
            .arg("run")
            .arg(self.root.run_dir(run_id))
            .stdin(Stdio::null())
            .spawn()
            .context("spawning the run process")
    }

    /// Reaps finished children (recording a terminal state they could not) and escalates cancels.
    fn supervise(&mut self) {
        let grace = Duration::from_secs_f64(self.cfg.cancel_grace_s);
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            let files = RunFiles::new(&self.root.run_dir(&a.run_id));
            match a.child.try_wait() {
                Ok(Some(exit)) => {
                    let a = self.active.remove(i);
                    finish(&files, &a, exit);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(run_id = %a.run_id, error = %e, "waiting on a run"),
            }
            // The watchdog: a run past its hard memory limit is killed at once, not asked.
            if a.killed_for.is_none()
                && let Some(rss) = crate::train::memory::process_rss_mb(a.child.id())
                && rss > a.hard_limit_mb
            {
                let why = format!(
                    "killed by the daemon: resident memory {rss} MB passed the hard limit of {} MB \
                     (memory budget x 1.25, at least +512 MB)",
                    a.hard_limit_mb
                );
                tracing::error!(run_id = %a.run_id, rss_mb = rss, limit_mb = a.hard_limit_mb, "memory limit: SIGKILL");
                let _ = a.child.kill();
                a.killed_for = Some(why);
            }
            if a.cancel_seen.is_none() && files.cancel_requested().is_some() {
                a.cancel_seen = Some(Instant::now());
            }
            if let Some(seen) = a.cancel_seen {
                if a.term_sent.is_none() && seen.elapsed() >= grace {
                    tracing::warn!(run_id = %a.run_id, "run ignored cancel for the grace period: SIGTERM");
                    // SAFETY: signalling our own child by pid.
                    unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) };
                    a.term_sent = Some(Instant::now());
                } else if a.term_sent.is_some_and(|t| t.elapsed() >= TERM_TO_KILL) {
                    tracing::warn!(run_id = %a.run_id, "run ignored SIGTERM: SIGKILL");
                    let _ = a.child.kill();
                }
            }
            i += 1;
        }
    }

    /// Cancels every active run as "daemon shutdown", waits (bounded) for them to record it,
    /// kills what is left and records it. Queued runs stay queued for the next start.
    fn shutdown(&mut self) {
        for a in &self.active {
            request_cancel(&self.root, &a.run_id, SHUTDOWN_REASON);
        }
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.shutdown_timeout_s);
        while !self.active.is_empty() && Instant::now() < deadline {
            self.supervise();
            std::thread::sleep(Duration::from_millis(50));
        }
        for mut a in std::mem::take(&mut self.active) {
            let _ = a.child.kill();
            if let Ok(exit) = a.child.wait() {
                finish(&RunFiles::new(&self.root.run_dir(&a.run_id)), &a, exit);
            }
        }
        tracing::info!("daemon stopped");
    }
}

/// After a child exits: if it left its run non-terminal, record why.
fn finish(files: &RunFiles, a: &Active, exit: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    let Ok(mut st) = Status::read(&files.status()) else { return };
    if st.state.is_terminal() {
        tracing::info!(run_id = %a.run_id, state = st.state.as_str(), "run finished");
        return;
    }
    let how = match (exit.code(), exit.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown exit".to_string(),
    };
    let result = match (&a.killed_for, files.cancel_requested()) {
        (Some(why), _) => settle(files, &mut st, RunState::Failed, None, Some(why.clone())),
        (None, Some(reason)) => settle(files, &mut st, RunState::Cancelled, Some(reason), None),
        (None, None) => {
            settle(files, &mut st, RunState::Failed, None, Some(format!("run process died without a result ({how})")))
        }
    };
    if let Err(e) = result {
        tracing::error!(run_id = %a.run_id, error = %e, "recording the end of a run");
    }
    tracing::warn!(run_id = %a.run_id, %how, "run process ended without recording a result; recorded for it");
}

/// Creates the cancel sentinel with a reason (if none exists yet).
pub fn request_cancel(root: &Root, run_id: &str, reason: &str) {
    let p = RunFiles::new(&root.run_dir(run_id)).cancel();
    if !p.exists()
        && let Err(e) = crate::store::write_atomic(&p, reason.as_bytes())
    {
        tracing::error!(run_id, error = %e, "writing the cancel sentinel");
    }
}

fn spool_is_empty(root: &Root) -> bool {
    let claimed_empty = std::fs::read_dir(root.claimed()).map(|mut r| r.next().is_none()).unwrap_or(true);
    let spool_jobs = std::fs::read_dir(root.spool())
        .map(|rd| rd.filter_map(|e| e.ok()).any(|e| intake::is_job_name(&e.file_name().to_string_lossy())))
        .unwrap_or(false);
    claimed_empty && !spool_jobs
}

/// Why the root or its spool is unsafe to run on: owned by someone else, or writable by others
/// (who could then make this daemon train on anything). Empty when all is well.
pub fn permission_problems(root: &Root) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut out = Vec::new();
    for dir in [root.dir.clone(), root.spool()] {
        match std::fs::metadata(&dir) {
            Err(e) => out.push(format!("{}: {e}", dir.display())),
            Ok(m) if m.uid() != uid => {
                out.push(format!("{} is owned by uid {}, not by you (uid {uid})", dir.display(), m.uid()))
            }
            Ok(m) if m.mode() & 0o022 != 0 => out.push(format!(
                "{} is writable by other users (mode {:o}); run `chmod go-w {}`",
                dir.display(),
                m.mode() & 0o777,
                dir.display()
            )),
            Ok(_) => {}
        }
    }
    out
}

fn install_signals(tx: mpsc::Sender<Wake>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    Ok(std::thread::spawn(move || {
        for s in signals.forever() {
            if tx.send(Wake::Signal(s)).is_err() {
                break;
            }
        }
    }))
}

fn watch_spool(root: &Root, tx: mpsc::Sender<Wake>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |_ev: notify::Result<notify::Event>| {
        // Any event, an error, or a rescan flag: all mean "look at the spool".
        let _ = tx.send(Wake::Spool);
    })
    .map_err(|e| tracing::warn!(error = %e, "file watcher unavailable; relying on rescans"))
    .ok()?;
    if let Err(e) = w.watch(&root.spool(), notify::RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, "cannot watch the spool; relying on rescans");
    }
    Some(w)
}
