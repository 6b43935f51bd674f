//! `status`, `runs`, `cancel`, `stop`: reading and poking the run store.

use std::process::ExitCode;

use clap::Args;
use rerankd::store::paths::RunFiles;
use rerankd::store::{Root, Status};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A run id; without it, every run (or those of --corpus).
    pub run: Option<String>,
    #[arg(long)]
    pub corpus: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[arg(long)]
    pub json: bool,
}

/// Every run's status, oldest first.
pub fn all_runs(root: &Root) -> Vec<Status> {
    let mut v: Vec<Status> = std::fs::read_dir(root.runs())
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| Status::read(&e.path().join("status.json")).ok()).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| (&a.created_at, &a.run_id).cmp(&(&b.created_at, &b.run_id)));
    v
}

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
    }
}

pub fn status(root: &Root, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let runs: Vec<Status> = match (&a.run, &a.corpus) {
        (Some(id), _) => match Status::read(&RunFiles::new(&root.run_dir(id)).status()) {
            Ok(s) => vec![s],
            Err(_) => {
                eprintln!("rerankd: no run `{id}` under {}", root.runs().display());
                return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
            }
        },
        (None, Some(c)) => all_runs(root).into_iter().filter(|s| &s.corpus == c).collect(),
        (None, None) => all_runs(root),
    };
    print(&runs, a.json);
    Ok(ExitCode::SUCCESS)
}

pub fn list(root: &Root, a: RunsArgs) -> anyhow::Result<ExitCode> {
    print(&all_runs(root), a.json);
    Ok(ExitCode::SUCCESS)
}

pub fn cancel(root: &Root, run: &str) -> anyhow::Result<ExitCode> {
    let files = RunFiles::new(&root.run_dir(run));
    let Ok(st) = Status::read(&files.status()) else {
        eprintln!("rerankd: no run `{run}`");
        return Ok(ExitCode::from(super::EXIT_NOT_FOUND));
    };
    if st.state.is_terminal() {
        println!("{run} is already {}", st.state.as_str());
        return Ok(ExitCode::SUCCESS);
    }
    rerankd::daemon::request_cancel(root, run, "cancelled by user");
    println!("cancel requested for {run}");
    Ok(ExitCode::SUCCESS)
}

pub fn stop(root: &Root, corpus: &str) -> anyhow::Result<ExitCode> {
    let live: Vec<Status> =
        all_runs(root).into_iter().filter(|s| s.corpus == corpus && !s.state.is_terminal()).collect();
    for s in &live {
        rerankd::daemon::request_cancel(root, &s.run_id, &format!("corpus {corpus} stopped by user"));
        println!("cancel requested for {} ({})", s.run_id, s.state.as_str());
    }
    if live.is_empty() {
        println!("no active or queued run for corpus {corpus}");
    }
    Ok(ExitCode::SUCCESS)
}
