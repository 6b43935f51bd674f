//! `rerankd doctor`: what state the root, the daemon, the runs, the models and this build are in,
//! one line each, with what to do about anything wrong. Exit 0 when nothing is wrong, 1 otherwise.

use std::process::ExitCode;

use rerankd::store::lock::{holder_pid, is_held};
use rerankd::store::{Root, RunState, models};

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        super::say(format!("ok    {what}"), serde_json::json!({"level": "ok", "what": what}));
    }
    fn warn(&mut self, what: &str, fix: &str) {
        self.problems += 1;
        super::say(
            format!("WARN  {what}\n      -> {fix}"),
            serde_json::json!({"level": "warn", "what": what, "fix": fix}),
        );
    }
    fn info(&self, what: &str) {
        super::say(format!("info  {what}"), serde_json::json!({"level": "info", "what": what}));
    }
}

pub fn run(root: &Root) -> anyhow::Result<ExitCode> {
    let mut r = Report { problems: 0 };
    r.info(&format!("root: {}", root.dir.display()));
    for hook in rerankd::testhooks::active() {
        r.warn(&format!("the test-only fault hook {hook} is set"), "unset it: it exists for the test suite only");
    }
    if !root.dir.is_dir() {
        r.warn("the root does not exist yet", "start the daemon (it creates the layout) or `rerankd submit` a job");
        return Ok(ExitCode::from(super::EXIT_FAILURE));
    }
    let problems = root.permission_problems();
    if problems.is_empty() {
        r.ok("the root and every directory of its layout are yours and private");
    }
    for p in problems {
        r.warn(&p, "the daemon refuses to run until this is fixed");
    }
    match is_held(&root.daemon_lock()) {
        Ok(true) => r.ok(&format!(
            "a daemon runs (pid {})",
            holder_pid(&root.daemon_lock()).map_or("?".into(), |p| p.to_string())
        )),
        Ok(false) => r.warn("no daemon holds this root", "`rerankd daemon`, or install-launchd / install-systemd"),
        Err(e) => r.warn(&format!("cannot probe the daemon lock: {e}"), "check the root's permissions"),
    }
    match rerankd::store::serving::live(root) {
        Some(s) => {
            let mut at: Vec<String> = s.listen.clone().into_iter().collect();
            at.extend(s.socket.iter().map(|p| format!("unix:{p}")));
            let adapters: Vec<String> = s.adapters.iter().map(|(c, a)| format!("{c}={a}")).collect();
            r.ok(&format!(
                "serve runs (pid {}) at {}, {} MB resident, serving {}",
                s.pid,
                at.join(" and "),
                s.rss_mb,
                if adapters.is_empty() { "no corpus yet".to_string() } else { adapters.join(", ") }
            ));
            for (c, e) in &s.load_errors {
                r.warn(
                    &format!("serve keeps the previous adapter of {c}: the promoted one failed to load: {e}"),
                    &format!("fix or `rerankd rollback {c}`, then SIGHUP serve to retry"),
                );
            }
        }
        None => r.info("serve is not running (`rerankd serve`, or install-launchd / install-systemd --serve)"),
    }
    let (waiting, claimed) = rerankd::store::spool::counts(root);
    if claimed + waiting > 0 {
        r.info(&format!("{waiting} job file(s) waiting in the spool, {claimed} claimed but not judged yet"));
    }
    let runs = rerankd::store::all_runs(root);
    let count = |s: RunState| runs.iter().filter(|r| r.state == s).count();
    r.info(&format!(
        "runs: {} queued, {} running, {} paused, {} completed, {} failed, {} cancelled",
        count(RunState::Queued),
        count(RunState::Running),
        count(RunState::Paused),
        count(RunState::Completed),
        count(RunState::Failed),
        count(RunState::Cancelled)
    ));
    for s in runs.iter().filter(|s| s.state == RunState::Running && !s.pid.is_some_and(rerankd::sys::pid_alive)) {
        let fix = if is_held(&root.daemon_lock()).unwrap_or(false) {
            "the daemon records it within a second; if it stays, restart the daemon"
        } else {
            "start the daemon (its boot sweep settles it) or `rerankd sweep`"
        };
        r.warn(&format!("{} is `running` but its process is gone", s.run_id), fix);
    }
    for name in models::corpora(root) {
        match models::current(root, &name) {
            Some((id, _)) => r.ok(&format!("corpus {name}: serves {id}")),
            None if root.models(&name).join("current").symlink_metadata().is_ok() => r.warn(
                &format!("corpus {name}: `current` points at a missing adapter"),
                &format!("`rerankd rollback {name}`"),
            ),
            None => {}
        }
    }
    let features: Vec<&str> = [("cuda", cfg!(feature = "cuda")), ("metal", cfg!(feature = "metal"))]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    r.info(&format!("this build: cpu{}", features.iter().map(|f| format!(" + {f}")).collect::<String>()));
    r.info(&format!("CPU kernel path: {}", rerankd::model::cpu::describe()));
    match rerankd::model::checkpoint::hf_hub_cache() {
        Some(p) if p.is_dir() => r.info(&format!("Hugging Face cache: {}", p.display())),
        Some(p) => r.info(&format!("no Hugging Face cache at {} (jobs must name checkpoint directories)", p.display())),
        None => {}
    }
    Ok(if r.problems == 0 { ExitCode::SUCCESS } else { ExitCode::from(super::EXIT_FAILURE) })
}
