//! Command-line parsing into plain structs, and dispatch: one file per subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rerankd::ids::{CorpusName, RunId};
use rerankd::store::paths::RunFiles;
use rerankd::store::{Root, Status};

mod bench;
mod daemon;
mod demo;
mod doctor;
mod export;
mod feedback;
mod install;
mod promote;
mod runs;
mod score;
mod serve;
mod submit;
mod watch;

/// The command failed (bad input, I/O, a model that would not load).
pub const EXIT_FAILURE: u8 = 1;
/// Not found: no such run or corpus.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Refused: the root is held by a daemon, or the job was rejected.
pub const EXIT_REFUSED: u8 = 4;
/// `watch`: the run ended cancelled.
pub const EXIT_CANCELLED: u8 = 5;

static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether `--json` was given: results as JSON objects a line on stdout, errors as JSON on stderr.
pub fn json() -> bool {
    JSON.get().copied().unwrap_or(false)
}

/// A command's result: its JSON object with `--json`, else the text for people.
pub fn say(text: impl std::fmt::Display, obj: serde_json::Value) {
    if json() {
        println!("{obj}");
    } else {
        println!("{text}");
    }
}

/// A refusal or a failure, on stderr: `rerankd: message`, or with `--json` `{"error": message}`.
pub fn complain(message: impl std::fmt::Display) {
    if json() {
        eprintln!("{}", serde_json::json!({"error": message.to_string()}));
    } else {
        eprintln!("rerankd: {message}");
    }
}

/// A run named on the command line: its files and status, or the exit code already reported
/// (a malformed id, or no such run). The one "no run `X`" lookup of the CLI.
pub fn find_run(root: &Root, run: &str) -> Result<(RunFiles, Status), ExitCode> {
    let Ok(run) = RunId::parse(run) else {
        complain(format!("`{run}` is not a run id (like corpus__20261127_120000)"));
        return Err(ExitCode::from(EXIT_FAILURE));
    };
    let files = RunFiles::new(&root.run_dir(&run));
    match Status::read(&files.status()) {
        Ok(st) => Ok((files, st)),
        Err(_) => {
            complain(format!("no run `{run}` under {}", root.runs().display()));
            Err(ExitCode::from(EXIT_NOT_FOUND))
        }
    }
}

/// A corpus named on the command line, parsed: a corpus name, never a path.
pub fn check_corpus(corpus: &str) -> Result<CorpusName, ExitCode> {
    CorpusName::parse(corpus).map_err(|e| {
        complain(e);
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Commands that only read the root refuse one that is not a directory, instead of printing
/// nothing as if it were empty.
pub fn check_root(root: &Root) -> anyhow::Result<()> {
    match std::fs::metadata(&root.dir) {
        Ok(m) if !m.is_dir() => anyhow::bail!("the root {} is not a directory", root.dir.display()),
        _ => Ok(()),
    }
}

#[derive(Parser, Debug)]
#[command(name = "rerankd", version, about = "Fine-tune a Qwen3 reranker on your own relevance feedback")]
pub struct Cli {
    /// State root (default: $RERANKD_ROOT, else the platform's state directory).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Results as one JSON object a line on stdout; errors as `{"error": ...}` on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (what launchd/systemd start).
    Daemon(daemon::DaemonArgs),
    /// (internal) Execute one run; started by the daemon.
    #[command(hide = true)]
    Run {
        run_dir: PathBuf,
        /// Lower this process's CPU (and, on Linux, I/O) priority first.
        #[arg(long)]
        nice: Option<i32>,
    },
    /// Submit a job file: copied through spool/tmp and renamed into the spool.
    Submit(submit::SubmitArgs),
    /// Show one run, or the runs of a corpus.
    Status(runs::StatusArgs),
    /// List all runs.
    Runs(runs::RunsArgs),
    /// Follow a run: progress, loss, ETA, evaluation; exits when it ends (0/1/5).
    Watch {
        /// The run to follow.
        #[arg(required_unless_present = "corpus")]
        run: Option<String>,
        /// Follow the corpus's run: the one not ended yet, else the next one it gets.
        #[arg(long, conflicts_with = "run")]
        corpus: Option<String>,
    },
    /// (Re)draw a run's report.svg: loss, learning rate, gradient norm, step time, memory,
    /// the dev metric per epoch against the baseline, the promotion decision and the caps.
    Report {
        run: String,
        /// Write the SVG here instead of runs/<id>/report.svg.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Pause a run: it checkpoints and stops as `paused`, keeping its corpus, until `resume`.
    Pause {
        run: String,
        /// Seconds to wait for the run to say it paused.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Queue a paused run again; it continues from its checkpoint.
    Resume { run: String },
    /// Request cancellation of a run.
    Cancel { run: String },
    /// Cancel a corpus's active and queued runs.
    Stop { corpus: String },
    /// The boot sweep on demand (refused while a daemon holds the root).
    Sweep,
    /// Check the root, the daemon, the runs, the promoted models and this build.
    Doctor,
    /// Score documents against a query with a corpus's promoted adapter, an adapter or a model.
    Score(score::ScoreArgs),
    /// Export an adapter merged into its base as a Hugging Face checkpoint (merged or seq-cls).
    Export(export::ExportArgs),
    /// Record feedback on a captured ranking (the same checks as POST /v1/feedback).
    #[command(subcommand)]
    Feedback(feedback::FeedbackCmd),
    /// Serve the promoted rerankers over HTTP (TEI /rerank, Cohere/Jina /v1/rerank and /v2/rerank).
    Serve(serve::ServeArgs),
    /// Promote a completed run's adapter to its corpus's current adapter, by hand.
    Promote { run: String },
    /// Restore the adapter that was current before the current one.
    Rollback { corpus: String },
    /// Time LoRA training micro-steps and scoring on random weights of a config.
    Bench(bench::BenchArgs),
    /// Write a launchd LaunchAgent plist for this root and print the launchctl lines.
    InstallLaunchd(install::InstallArgs),
    /// Write a systemd user unit for this root and print the systemctl lines.
    InstallSystemd(install::InstallArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man page (roff): to --out, else to standard output.
    Man {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Train on the shipped demo corpus with the tiny fixture model, end to end.
    Demo(demo::DemoArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let _ = JSON.set(cli.json);
    let root = Root::resolve(cli.root.as_deref());
    match cli.command {
        Command::Daemon(a) => daemon::run(&root, a),
        Command::Run { run_dir, nice } => Ok(ExitCode::from(rerankd::runner::run(&root, &run_dir, nice)? as u8)),
        Command::Submit(a) => submit::run(&root, a),
        Command::Status(a) => runs::status(&root, a),
        Command::Runs(a) => runs::list(&root, a),
        Command::Watch { run, corpus } => watch::run(&root, run.as_deref(), corpus.as_deref()),
        Command::Report { run, out } => runs::report(&root, &run, out.as_deref()),
        Command::Pause { run, wait } => runs::pause(&root, &run, wait),
        Command::Resume { run } => runs::resume(&root, &run),
        Command::Cancel { run } => runs::cancel(&root, &run),
        Command::Stop { corpus } => runs::stop(&root, &corpus),
        Command::Sweep => daemon::sweep(&root),
        Command::Doctor => doctor::run(&root),
        Command::Score(a) => score::run(&root, a),
        Command::Serve(a) => serve::run(&root, a),
        Command::Feedback(c) => feedback::run(&root, c),
        Command::Export(a) => export::run(&root, a),
        Command::Promote { run } => promote::promote(&root, &run),
        Command::Rollback { corpus } => promote::rollback(&root, &corpus),
        Command::Bench(a) => bench::run(a),
        Command::InstallLaunchd(a) => install::launchd(&root, a),
        Command::InstallSystemd(a) => install::systemd(&root, a),
        Command::Demo(a) => demo::run(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "rerankd", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            match out {
                Some(p) => std::fs::write(&p, page).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?,
                None => std::io::Write::write_all(&mut std::io::stdout(), &page)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
