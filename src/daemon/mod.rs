//! The daemon: one per root (`daemon.lock`), boot sweep, spool intake, scheduling (one active run
//! per corpus, `max_concurrent_runs` overall, arrival order), supervision of run processes
//! (`supervise.rs`), and signals (TERM/INT: cancel runs as "daemon shutdown" and exit 0; HUP:
//! reload config and rescan; CHLD: reap). It runs in the foreground: launchd and systemd track
//! its pid.
//!
//! It sleeps until something happens: a file created, moved or written in `spool/` (the watcher
//! ignores opens and reads, including the daemon's own scans), a signal, a child's
//! exit, or a timer it set itself (the next rescan; while runs are active, the watchdog's
//! half-second tick; while runs wait, a one-second tick).

pub mod ending;
pub mod hooks;
pub mod intake;
pub mod policy;
pub mod runs;
pub mod supervise;
pub mod sweep;

use crate::ids::{CorpusName, RunId};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::DaemonConfig;
use crate::job::{IfBusy, Job};
use crate::settings::SettingsError;
use crate::store::events::{Event, Log};
use crate::store::paths::RunFiles;
use crate::store::{FileLock, Root, RunState, Status, StopRequest};
use ending::Unsettled;
use intake::{Accepted, Admit, Intake};
use runs::{Queued, Run, Runs};
use supervise::{Active, Proc};

/// The watchdog's sampling interval while runs are active.
const ACTIVE_TICK: Duration = Duration::from_millis(500);
/// The tick while runs wait (for a corpus lock, a cancel of a queued run) or ends wait to be
/// recorded.
const WAITING_TICK: Duration = Duration::from_secs(1);

/// What wakes the loop early.
enum Wake {
    Signal(i32),
    Spool,
    /// A corpus's feedback.jsonl changed: its retraining policy may be due.
    Feedback,
}

/// How often feedback arriving re-evaluates the retraining policies, at most.
const FEEDBACK_SETTLE: Duration = Duration::from_secs(1);

struct Daemon {
    root: Root,
    cfg: DaemonConfig,
    /// Every run the daemon knows: queued, active, ending unrecorded, paused.
    runs: Runs,
    /// Shutting down: interrupted runs stay queued for the next daemon.
    stopping: bool,
    intake: Intake,
    policies: policy::Policies,
    hooks: hooks::Hooks,
}

/// Runs the daemon until a stop signal (or, with `until_idle`, until nothing is left to do).
pub fn run(root: &Root, until_idle: bool) -> anyhow::Result<()> {
    let made = root.ensure();
    if let Some(problem) = root.permission_problems().into_iter().next() {
        anyhow::bail!("refusing to run: {problem}");
    }
    made?;
    let Some(mut lock) = FileLock::try_acquire(&root.daemon_lock())? else {
        return Err(crate::store::lock::Held::at("daemon", &root.daemon_lock()).into());
    };
    lock.write_pid()?;
    let cfg = DaemonConfig::load(&root.config())?;
    tracing::info!(root = %root.dir.display(), pid = std::process::id(), "daemon starting");
    for hook in crate::testhooks::active() {
        tracing::warn!(variable = hook, "a test-only fault hook is set in the daemon's environment; unset it");
    }

    let (tx, rx) = mpsc::channel();
    let _signals = install_signals(tx.clone())?;
    let _watcher = watch_spool(root, tx.clone());
    let _feedback_watcher = watch_feedback(root, tx);

    let swept = sweep::sweep(root)?;
    if swept.settled.len() + swept.temps_removed + swept.adopted.len() > 0 {
        tracing::warn!(
            settled = swept.settled.len(),
            adopted = swept.adopted.len(),
            temps_removed = swept.temps_removed,
            "boot sweep"
        );
    }
    let intake = Intake::new(cfg.memory_budget_mb);
    let mut d = Daemon {
        root: root.clone(),
        cfg,
        runs: Runs::default(),
        stopping: false,
        intake,
        policies: Default::default(),
        hooks: Default::default(),
    };
    for st in swept.paused.into_iter().filter(|st| !st.parked()) {
        d.runs.put(Run::Paused { run_id: st.run_id, corpus: st.corpus });
    }
    for a in swept.adopted {
        tracing::warn!(run_id = %a.run_id, pid = a.pid, "adopting a run that outlived the previous daemon");
        let budget = d.budget_of(&a.run_id);
        d.runs.started(Active::new(a.run_id, a.corpus, Proc::Adopted { pid: a.pid }, budget));
    }
    for st in swept.queued {
        let budget_mb = d.budget_of(&st.run_id);
        d.runs.put(Run::Queued(Queued {
            run_id: st.run_id,
            corpus: st.corpus,
            budget_mb,
            needs_space_mb: st.needs_space_mb,
        }));
    }
    // Runs the sweep settled ended like any other: their report and hook.
    for id in &swept.settled {
        d.finished(id);
    }
    d.intake_pass(true);
    let mut last_scan = Instant::now();
    // Feedback arrived and the policies have not looked at it yet (evaluated at most once per
    // FEEDBACK_SETTLE, so a burst of signals costs one pass).
    let (mut feedback_pending, mut last_policy) = (false, Instant::now());
    loop {
        let next_scan = last_scan + d.cfg.rescan;
        let mut wake_at = d.next_tick(next_scan);
        if feedback_pending {
            wake_at = wake_at.min(last_policy + FEEDBACK_SETTLE);
        }
        let timeout = wake_at.saturating_duration_since(Instant::now());
        // Sleep until the first wake-up or the timer, then take every other one already queued.
        let wakes: Vec<Wake> = rx.recv_timeout(timeout).into_iter().chain(rx.try_iter()).collect();
        let mut rescan = Instant::now() >= next_scan;
        let mut policies = rescan;
        for w in wakes {
            match w {
                Wake::Spool => rescan = true,
                Wake::Feedback => feedback_pending = true,
                Wake::Signal(signal_hook::consts::SIGHUP) => {
                    d.reload_config();
                    rescan = true;
                    policies = true;
                }
                Wake::Signal(signal_hook::consts::SIGCHLD) => {} // reaped below
                Wake::Signal(sig) => {
                    tracing::info!(signal = sig, "stopping: cancelling active runs");
                    d.shutdown();
                    return Ok(());
                }
            }
        }
        if feedback_pending && last_policy.elapsed() >= FEEDBACK_SETTLE {
            policies = true;
        }
        if policies {
            d.policy_pass();
            (feedback_pending, last_policy) = (false, Instant::now());
        }
        let due = d.intake.next_due().is_some_and(|t| t <= Instant::now());
        if rescan || due {
            d.intake_pass(rescan || d.intake.claims_due());
            last_scan = Instant::now();
        }
        if rescan {
            d.reconcile_runs();
        }
        d.supervise();
        d.cancel_queued();
        d.start_runs();
        if until_idle
            && d.runs.active_count() == 0
            && d.runs.queued().next().is_none()
            && !d.runs.any_unsettled()
            && crate::store::spool::is_idle(root)
        {
            tracing::info!("idle: exiting");
            return Ok(());
        }
    }
}

/// The corpora that are busy (active or queued) when a job arrives.
struct BusyCorpora<'a> {
    corpora: &'a [CorpusName],
}

impl Admit for BusyCorpora<'_> {
    fn admit(&mut self, job: &Job) -> Result<(), SettingsError> {
        if job.if_busy == IfBusy::Reject && self.corpora.contains(&job.corpus) {
            return Err(SettingsError::at("if_busy", format!("corpus `{}` has an active or queued run", job.corpus))
                .hint("use \"queue\" to wait or \"supersede\" to replace it"));
        }
        Ok(())
    }
}

impl Daemon {
    /// When the loop must wake even if nothing happens.
    fn next_tick(&self, next_scan: Instant) -> Instant {
        let now = Instant::now();
        let tick = if self.runs.active_count() > 0 {
            Some(now + ACTIVE_TICK)
        } else if self.runs.queued().next().is_some() || self.runs.any_unsettled() {
            Some(now + WAITING_TICK)
        } else {
            None
        };
        [Some(next_scan), tick, self.intake.next_due(), self.hooks.next_due()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_scan)
    }

    fn reload_config(&mut self) {
        tracing::info!("SIGHUP: reloading config and rescanning");
        match DaemonConfig::load(&self.root.config()) {
            Ok(c) => {
                self.cfg = c;
            }
            Err(e) => tracing::error!(error = %e, "config not reloaded; keeping the previous settings"),
        }
    }

    /// The budget of a job that names none: the configured (or machine-derived) default, less
    /// what a running `rerankd serve` holds resident, since both share one machine.
    fn default_budget_mb(&self) -> u64 {
        match crate::store::serving::resident_mb(&self.root) {
            Some((_, serve_mb)) => crate::budget::beside_serve_mb(self.cfg.memory_budget_mb, serve_mb),
            None => self.cfg.memory_budget_mb,
        }
    }

    /// The effective memory budget a run's job.json holds.
    fn budget_of(&self, run_id: &RunId) -> u64 {
        crate::store::atomic::read_json::<Job>(&RunFiles::new(&self.root.run_dir(run_id)).job())
            .map(|j| j.memory_budget_mb)
            .unwrap_or(self.cfg.memory_budget_mb)
    }

    /// What other processes did to runs while the daemon was not looking: a paused run resumed
    /// (`rerankd resume` queues it) or cancelled. Read on every rescan (the timer, a spool
    /// change, SIGHUP), not on every tick.
    fn reconcile_runs(&mut self) {
        // Paused runs are read afresh: the disk says which are paused now.
        self.runs.take_where(|r| matches!(r, Run::Paused { .. }));
        let mut ended = Vec::new();
        let mut paused = Vec::new();
        for mut st in crate::store::all_runs(&self.root) {
            match st.state {
                RunState::Queued if !self.runs.knows(&st.run_id) => {
                    tracing::info!(run_id = %st.run_id, "run queued again (resumed)");
                    let budget_mb = self.budget_of(&st.run_id);
                    let needs_space_mb = st.needs_space_mb;
                    self.runs.put(Run::Queued(Queued {
                        run_id: st.run_id,
                        corpus: st.corpus,
                        budget_mb,
                        needs_space_mb,
                    }));
                }
                RunState::Paused => {
                    let files = RunFiles::new(&self.root.run_dir(&st.run_id));
                    match files.cancel_requested() {
                        Some(reason) => {
                            match crate::store::settle(&files, &mut st, RunState::Cancelled, Some(reason), None) {
                                Ok(_) => {
                                    crate::store::checkpoint::remove(&files);
                                    ended.push(st.run_id);
                                }
                                Err(e) => tracing::error!(run_id = %st.run_id, error = %e, "cancelling a paused run"),
                            }
                        }
                        None if !st.parked() => paused.push(Run::Paused { run_id: st.run_id, corpus: st.corpus }),
                        None => {}
                    }
                }
                _ => {}
            }
        }
        for p in paused {
            self.runs.put(p);
        }
        for id in ended {
            self.finished(&id);
        }
    }

    /// Re-creates a layout someone deleted, settles leftover claims when due (`claims`), and
    /// scans the spool.
    fn intake_pass(&mut self, claims: bool) {
        if let Err(e) = self.root.ensure() {
            tracing::error!(error = %e, "re-creating the root's layout");
        }
        let budget = self.default_budget_mb();
        if budget != self.intake.default_budget_mb {
            tracing::info!(from = self.intake.default_budget_mb, to = budget, "default memory budget of new runs");
            self.intake.default_budget_mb = budget;
        }
        let busy = self.runs.busy_corpora();
        let mut adm = BusyCorpora { corpora: &busy };
        let mut accepted = if claims { self.intake.reprocess_claimed(&self.root, &mut adm) } else { Vec::new() };
        accepted.extend(self.intake.scan(&self.root, &mut adm));
        for a in accepted {
            self.enqueue(a);
        }
    }

    /// Drops the job of every corpus whose retraining policy is due (see `policy.rs`).
    fn policy_pass(&mut self) {
        let busy = self.runs.busy_corpora();
        self.policies.pass(&self.root, &busy);
    }

    fn enqueue(&mut self, a: Accepted) {
        if a.job.origin == crate::job::Origin::Policy {
            let reason = self.policies.reasons.remove(&a.job.corpus).map(|(r, _)| r);
            let message = reason.unwrap_or_else(|| "started by the corpus's retraining policy".into());
            let files = RunFiles::new(&self.root.run_dir(&a.run_id));
            let logged = crate::store::MetricsLog::open(&files.metrics(), &a.run_id).and_then(|mut log| {
                log.append(Event::Log(Log { origin: Some("policy".into()), ..Log::info(message) }))
            });
            if let Err(e) = logged {
                tracing::error!(run_id = %a.run_id, error = %e, "logging why the policy started this run");
            }
        }
        if a.job.if_busy == IfBusy::Supersede {
            let reason = format!("superseded by {}", a.run_id);
            let superseded = self.runs.on_corpus(&a.job.corpus).filter(|r| !matches!(r, Run::Unsettled(_)));
            for id in superseded.map(Run::run_id) {
                if let Err(e) = RunFiles::new(&self.root.run_dir(id)).request_cancel(&reason) {
                    tracing::error!(run_id = %id, error = %e, "writing the cancel sentinel");
                }
            }
        }
        let budget_mb = a.job.memory_budget_mb;
        self.runs.put(Run::Queued(Queued { run_id: a.run_id, corpus: a.job.corpus, budget_mb, needs_space_mb: None }));
    }

    /// Queued runs with a cancel sentinel are cancelled without ever starting (and those with a
    /// pause request paused).
    fn cancel_queued(&mut self) {
        let root = self.root.clone();
        // A queued run has no live attempt: only a user's cancel or pause stops it.
        let stop_of = |q: &Queued| match RunFiles::new(&root.run_dir(&q.run_id)).stop_request(None) {
            Some(StopRequest::Cancel { reason }) => Some((RunState::Cancelled, reason)),
            Some(StopRequest::Pause) => Some((RunState::Paused, "paused while queued".to_string())),
            _ => None,
        };
        let stopped: Vec<(RunId, RunState, String)> =
            self.runs.queued().filter_map(|q| stop_of(q).map(|(s, r)| (q.run_id.clone(), s, r))).collect();
        for (run_id, state, reason) in stopped {
            let files = RunFiles::new(&root.run_dir(&run_id));
            match Status::read(&files.status()) {
                Ok(mut st) => match crate::store::settle(&files, &mut st, state, Some(reason), None) {
                    Ok(_) if state == RunState::Paused => {
                        files.clear_pause();
                        tracing::info!(run_id = %run_id, "queued run paused");
                        self.runs.put(Run::Paused { run_id, corpus: st.corpus });
                    }
                    Ok(_) => {
                        tracing::info!(run_id = %run_id, "queued run cancelled");
                        crate::store::checkpoint::remove(&files);
                        self.runs.take(&run_id);
                        self.finished(&run_id);
                    }
                    Err(e) => {
                        tracing::error!(run_id = %run_id, error = %e, "recording a cancelled queued run; will retry");
                    }
                },
                Err(e) => {
                    tracing::error!(run_id = %run_id, error = %e, "a queued run's status is unreadable");
                    self.runs.take(&run_id);
                }
            }
        }
    }

    fn start_runs(&mut self) {
        while self.runs.active_count() < self.cfg.max_concurrent_runs {
            let root = &self.root;
            // What the table knows first; the lock (a `promote` by hand) is probed last, and only
            // for a run that could otherwise start: not once per waiting run and tick. A run that
            // met a full disk waits for space (the disk is asked at each tick; the queue keeps the
            // daemon ticking), holding its corpus, without counting an attempt.
            let next = self.runs.next_to_start(|q| {
                let locked = crate::store::lock::is_held(&root.corpus_lock(&q.corpus)).unwrap_or_else(|e| {
                    tracing::error!(corpus = %q.corpus, error = %e, "cannot probe the corpus lock; the run waits");
                    true
                });
                let no_space = q
                    .needs_space_mb
                    .is_some_and(|need| crate::sys::free_space_mb(&root.dir).is_some_and(|free| free < need));
                !locked && !no_space
            });
            let Some(Run::Queued(q)) = next.and_then(|id| self.runs.take(&id)) else { return };
            match self.spawn(&q.run_id) {
                Ok(mut child) => {
                    tracing::info!(run_id = %q.run_id, pid = child.id(), budget_mb = q.budget_mb, "run started");
                    let stderr = supervise::capture_stderr(&q.run_id, &mut child);
                    self.runs.started(Active::new(q.run_id, q.corpus, Proc::Child { child, stderr }, q.budget_mb));
                }
                Err(e) => {
                    tracing::error!(run_id = %q.run_id, error = %e, "could not start the run");
                    let error = Some(format!("could not start: {e:#}"));
                    let u = Unsettled {
                        run_id: q.run_id,
                        corpus: q.corpus,
                        state: RunState::Failed,
                        reason: None,
                        error,
                        resume: ending::MayResume::No,
                        memory: None,
                    };
                    if let Err(u) = ending::retry(&self.root, u) {
                        self.runs.put(Run::Unsettled(u));
                    }
                }
            }
        }
    }

    fn spawn(&self, run_id: &RunId) -> anyhow::Result<std::process::Child> {
        let exe = std::env::current_exe().context("finding the rerankd executable")?;
        Command::new(exe)
            .arg("--root")
            .arg(&self.root.dir)
            .arg("run")
            .arg("--nice")
            .arg(self.cfg.run_nice.to_string())
            .arg(self.root.run_dir(run_id))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning the run process")
    }

    /// Reaps ended runs (recording what they could not), polices live ones, retries ends not
    /// yet recorded, and files each run by the state it is in now.
    fn supervise(&mut self) {
        let (root, grace) = (self.root.clone(), self.cfg.cancel_grace);
        let exited: Vec<(RunId, supervise::Exit)> =
            self.runs.active_mut().filter_map(|a| a.tick(&root, grace).map(|e| (a.run_id.clone(), e))).collect();
        let mut now: Vec<(RunId, CorpusName, Result<RunState, Unsettled>)> = Vec::new();
        for (id, exit) in exited {
            if let Some(Run::Active(a)) = self.runs.take(&id) {
                now.push((id, a.corpus.clone(), supervise::finish(&root, &a, &exit)));
            }
        }
        for r in self.runs.take_where(|r| matches!(r, Run::Unsettled(_))) {
            if let Run::Unsettled(u) = r {
                now.push((u.run_id.clone(), u.corpus.clone(), ending::retry(&root, u)));
            }
        }
        for (run_id, corpus, state) in now {
            match state {
                // Interrupted runs go back in line (a shutting-down daemon leaves them for the
                // next one).
                Ok(RunState::Queued) if self.stopping => {}
                Ok(RunState::Queued) => {
                    tracing::info!(run_id = %run_id, "run interrupted; queued again to resume from its checkpoint");
                    let budget_mb = self.budget_of(&run_id);
                    let needs_space_mb = Status::read(&RunFiles::new(&root.run_dir(&run_id)).status())
                        .ok()
                        .and_then(|st| st.needs_space_mb);
                    self.runs.put(Run::Queued(Queued { run_id, corpus, budget_mb, needs_space_mb }));
                }
                // A run the crash loop guard parked does not hold its corpus.
                Ok(RunState::Paused) => {
                    if !Status::read(&RunFiles::new(&root.run_dir(&run_id)).status()).is_ok_and(|st| st.parked()) {
                        self.runs.put(Run::Paused { run_id, corpus });
                    }
                }
                // Runs whose terminal state is now recorded: their on_finish hooks.
                Ok(_) => self.finished(&run_id),
                Err(u) => self.runs.put(Run::Unsettled(u)),
            }
        }
        self.hooks.poll(&self.root);
    }

    /// A run's terminal state is recorded: draw its report.svg (before the hook, which may
    /// want it), then start its on_finish hook.
    fn finished(&mut self, run_id: &RunId) {
        let files = RunFiles::new(&self.root.run_dir(run_id));
        // A picture is never worth the daemon: a failure (or a panic in the plotting crate) is
        // logged and the run stays as recorded.
        match std::panic::catch_unwind(|| crate::report::draw(&files, None)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(run_id = %run_id, error = %e, "drawing report.svg"),
            Err(_) => tracing::error!(run_id = %run_id, "drawing report.svg panicked"),
        }
        self.hooks.start(&self.root, run_id, self.cfg.on_finish.as_deref(), self.cfg.on_finish_timeout);
    }

    /// Asks every active run's attempt to stop for the shutdown (it checkpoints and goes back to
    /// the queue), waits (bounded) for them to record it, kills what is left and records it as
    /// interrupted. Queued runs stay queued for the next start.
    fn shutdown(&mut self) {
        self.stopping = true;
        self.hooks.stop_all(&self.root);
        for a in self.runs.active_mut() {
            a.shutdown = true;
            let files = RunFiles::new(&self.root.run_dir(&a.run_id));
            // The attempt running now, or the one about to start (its process has not yet
            // recorded `running`, which counts the attempt).
            let attempt = match Status::read(&files.status()) {
                Ok(st) if st.state == RunState::Running => st.attempt,
                Ok(st) => st.attempt + 1,
                Err(_) => continue,
            };
            if let Err(e) = files.request_shutdown(attempt) {
                tracing::error!(run_id = %a.run_id, error = %e, "writing the shutdown request");
            }
        }
        let deadline = Instant::now() + self.cfg.shutdown_timeout;
        while self.runs.active_count() > 0 && Instant::now() < deadline {
            self.supervise();
            std::thread::sleep(Duration::from_millis(50));
        }
        for a in self.runs.active_mut() {
            a.signal(&self.root, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.runs.active_count() > 0 && Instant::now() < deadline {
            self.supervise();
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!("daemon stopped");
    }
}

fn install_signals(tx: mpsc::Sender<Wake>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD])
        .context("installing signal handlers")?;
    Ok(std::thread::spawn(move || {
        for s in signals.forever() {
            if tx.send(Wake::Signal(s)).is_err() {
                break;
            }
        }
    }))
}

/// Whether a watcher event can mean a new or changed job file. Opens, reads and closes without
/// writing are what the daemon's own scans cause: waking on them was a busy loop.
fn is_spool_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

/// Watches `corpora/` for writes to a `feedback.jsonl`, so that a retraining policy is evaluated
/// within [`FEEDBACK_SETTLE`] of its threshold being crossed (the rescan stays the safety net).
fn watch_feedback(root: &Root, tx: mpsc::Sender<Wake>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(e) = ev else { return };
        if is_spool_change(&e.kind) && e.paths.iter().any(|p| p.file_name().is_some_and(|n| n == "feedback.jsonl")) {
            let _ = tx.send(Wake::Feedback);
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "file watcher unavailable; feedback waits for rescans"))
    .ok()?;
    if let Err(e) = w.watch(&root.dir.join("corpora"), notify::RecursiveMode::Recursive) {
        tracing::warn!(error = %e, "cannot watch corpora/; feedback waits for rescans");
    }
    Some(w)
}

fn watch_spool(root: &Root, tx: mpsc::Sender<Wake>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // An error or a rescan flag also means "look at the spool".
        if ev.as_ref().is_ok_and(|e| !e.need_rescan() && !is_spool_change(&e.kind)) {
            return;
        }
        let _ = tx.send(Wake::Spool);
    })
    .map_err(|e| tracing::warn!(error = %e, "file watcher unavailable; relying on rescans"))
    .ok()?;
    if let Err(e) = w.watch(&root.spool(), notify::RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, "cannot watch the spool; relying on rescans");
    }
    Some(w)
}
