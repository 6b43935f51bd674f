//! `status`, `runs`, `report`, `cancel`, `stop`: reading and poking the run store.

use rerankd::ids::CorpusName;
use std::process::ExitCode;

use clap::Args;
use rerankd::store::paths::RunFiles;
use rerankd::store::{Root, RunState, Status};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A run id; without it, every run (or those of --corpus).
    pub run: Option<String>,
    #[arg(long)]
    pub corpus: Option<String>,
}

#[derive(Args, Debug)]
pub struct RunsArgs {}

use rerankd::store::all_runs;

fn print(runs: &[Status], json: bool) {
    if json {
        for r in runs {
            println!("{}", serde_json::to_string(r).expect("status serialises"));
        }
        return;
    }
    println!("{:<40} {:<10} {:<28} reason", "run", "state", "created");
    for r in runs {
        let why = r.reason.as_deref().or(r.error.as_deref()).unwrap_or("");
        println!("{:<40} {:<10} {:<28} {}", r.run_id, r.state.as_str(), r.created_at, why);
        // A run that needed more than one attempt, or trains under a reduced plan, says so.
        if r.attempts.len() > 1 {
            println!("    attempt {}, started at {}", r.attempt, r.attempts.join(", "));
        }
        if let Some(p) = &r.plan {
            println!("    plan: {p}");
        }
    }
}

pub fn status(root: &Root, a: StatusArgs) -> anyhow::Result<ExitCode> {
    // The corpus named (when no run is), parsed once.
    let corpus = match (&a.run, &a.corpus) {
        (None, Some(c)) => match super::check_corpus(c) {
            Ok(c) => Some(c),
            Err(code) => return Ok(code),
        },
        _ => None,
    };
    let runs: Vec<Status> = match (&a.run, &corpus) {
        (Some(id), _) => match super::find_run(root, id) {
            Ok((_, s)) => vec![s],
            Err(code) => return Ok(code),
        },
        (None, Some(c)) => all_runs(root).into_iter().filter(|s| &s.corpus == c).collect(),
        (None, None) => all_runs(root),
    };
    print(&runs, super::json());
    if let Some(c) = &corpus {
        print_online(root, c, super::json())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Per adapter that served the corpus: impressions and signals, from its feedback.jsonl.
fn print_online(root: &Root, corpus: &CorpusName, json: bool) -> anyhow::Result<()> {
    let fb = rerankd::store::feedback::CorpusFeedback::new(root, corpus);
    let online = rerankd::store::feedback::online(&fb.feedback)?;
    if json {
        if !online.is_empty() {
            println!("{}", serde_json::json!({"corpus": corpus, "online": online}));
        }
        return Ok(());
    }
    if online.is_empty() {
        return Ok(());
    }
    let current = rerankd::store::models::current_run(root, corpus);
    println!("\nonline feedback per adapter (from {}):", fb.feedback.display());
    println!("{:<40} {:>11} {:>9} {:>9} {:>9} {:>9}", "adapter", "impressions", "positive", "rate", "negative", "rate");
    for (adapter, o) in &online {
        let mark = if current.as_deref() == Some(adapter.as_str()) { " (current)" } else { "" };
        println!(
            "{:<40} {:>11} {:>9} {:>9.3} {:>9} {:>9.3}",
            format!("{adapter}{mark}"),
            o.impressions,
            o.positive,
            o.positive_rate,
            o.negative,
            o.negative_rate
        );
    }
    Ok(())
}

pub fn list(root: &Root, _a: RunsArgs) -> anyhow::Result<ExitCode> {
    super::check_root(root)?;
    print(&all_runs(root), super::json());
    Ok(ExitCode::SUCCESS)
}

/// `rerankd report RUN [--out FILE]`: (re)draws the run's report.svg, at any state.
pub fn report(root: &Root, run: &str, out: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let files = match super::find_run(root, run) {
        Ok((files, _)) => files,
        Err(code) => return Ok(code),
    };
    let path = rerankd::report::draw(&files, out)?;
    super::say(path.display(), serde_json::json!({"run_id": run, "report": path}));
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(root: &Root, run: &str) -> anyhow::Result<ExitCode> {
    let (files, st) = match super::find_run(root, run) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    if st.state.is_terminal() {
        super::say(
            format!("{run} is already {}", st.state.as_str()),
            serde_json::json!({"run_id": run, "cancel": "not needed", "state": st.state.as_str()}),
        );
        return Ok(ExitCode::SUCCESS);
    }
    // A failure to write the sentinel is the command's failure, never a silent "requested".
    files.request_cancel(rerankd::store::stop::DEFAULT_CANCEL_REASON)?;
    if st.state == RunState::Paused {
        // No process holds a paused run: the daemon cancels it on its next look.
        poke_daemon(root);
    }
    super::say(
        format!("cancel requested for {run}"),
        serde_json::json!({"run_id": run, "cancel": "requested", "state": st.state.as_str()}),
    );
    Ok(ExitCode::SUCCESS)
}

/// Wakes a running daemon to look at the runs now (SIGHUP: rescan) rather than on its timer.
fn poke_daemon(root: &Root) {
    if rerankd::store::lock::is_held(&root.daemon_lock()).unwrap_or(false)
        && let Some(pid) = rerankd::store::lock::holder_pid(&root.daemon_lock())
    {
        let _ = rerankd::sys::signal(pid, libc::SIGHUP);
    }
}

/// `rerankd pause RUN`: a running run checkpoints and stops as `paused`; a queued one is paused
/// before it starts. Waits (up to `wait` seconds) for the run to say so.
pub fn pause(root: &Root, run: &str, wait: u64) -> anyhow::Result<ExitCode> {
    let (files, st) = match super::find_run(root, run) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    if st.state.is_terminal() || st.state == RunState::Paused {
        super::say(
            format!("{run} is {}: nothing to pause", st.state.as_str()),
            serde_json::json!({"run_id": run, "pause": "not needed", "state": st.state.as_str()}),
        );
        return Ok(ExitCode::SUCCESS);
    }
    files.request_pause()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut now = st;
    while now.state != RunState::Paused && !now.state.is_terminal() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
        now = Status::read(&files.status()).unwrap_or(now);
    }
    let state = now.state.as_str();
    let text = match now.state {
        RunState::Paused => format!("{run} paused ({})", now.reason.as_deref().unwrap_or("")),
        _ => format!("pause requested for {run} ({state}; it pauses at its next step)"),
    };
    super::say(text, serde_json::json!({"run_id": run, "pause": "requested", "state": state, "reason": now.reason}));
    Ok(ExitCode::SUCCESS)
}

/// `rerankd resume RUN`: a paused run is queued again; it continues from its checkpoint.
pub fn resume(root: &Root, run: &str) -> anyhow::Result<ExitCode> {
    let (files, mut st) = match super::find_run(root, run) {
        Ok(found) => found,
        Err(code) => return Ok(code),
    };
    if st.state != RunState::Paused {
        // A pause not yet taken is withdrawn; anything else has nothing to resume.
        if files.clear_pause() {
            super::say(
                format!("{run} is {}: pause request withdrawn", st.state.as_str()),
                serde_json::json!({"run_id": run, "resume": "pause request withdrawn", "state": st.state.as_str()}),
            );
            return Ok(ExitCode::SUCCESS);
        }
        super::complain(format!("{run} is {}, not paused: nothing to resume", st.state.as_str()));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    files.clear_pause();
    // A run the crash loop guard parked gets two more tries.
    st.stalled = 0;
    rerankd::store::settle(&files, &mut st, RunState::Queued, Some("resumed by rerankd resume".into()), None)?;
    poke_daemon(root);
    super::say(
        format!("{run} queued again; it continues from its checkpoint"),
        serde_json::json!({"run_id": run, "resume": "queued", "state": "queued"}),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn stop(root: &Root, corpus: &str) -> anyhow::Result<ExitCode> {
    let corpus = match super::check_corpus(corpus) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let live: Vec<Status> =
        all_runs(root).into_iter().filter(|s| s.corpus == corpus && !s.state.is_terminal()).collect();
    for s in &live {
        RunFiles::new(&root.run_dir(&s.run_id)).request_cancel(&format!("corpus {corpus} stopped by user"))?;
        if s.state == RunState::Paused {
            poke_daemon(root);
        }
        super::say(
            format!("cancel requested for {} ({})", s.run_id, s.state.as_str()),
            serde_json::json!({"run_id": s.run_id, "cancel": "requested", "state": s.state.as_str()}),
        );
    }
    if live.is_empty() {
        super::say(
            format!("no active or queued run for corpus {corpus}"),
            serde_json::json!({"corpus": corpus, "stopped": 0}),
        );
    }
    Ok(ExitCode::SUCCESS)
}
