//! `rerankd daemon` and `rerankd sweep`.

use std::process::ExitCode;

use clap::Args;
use rerankd::store::{FileLock, Root};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Exit once the spool is empty and no run is queued or active (for scripts and the demo).
    #[arg(long)]
    pub until_idle: bool,
    /// Fork into the background (pidfile ROOT/daemon.pid, logs in ROOT/logs/daemon.log). Only for a
    /// manual start outside a service manager: launchd and systemd must get the foreground process.
    #[arg(long)]
    pub detach: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

pub fn run(root: &Root, a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let root = if a.detach {
        root.ensure()?;
        // The daemon's working directory becomes the root: make the path absolute first.
        let abs = Root { dir: std::fs::canonicalize(&root.dir)? };
        detach(&abs)?;
        abs
    } else {
        root.clone()
    };
    init_logging(a.log_format);
    match rerankd::daemon::run(&root, a.until_idle) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is::<rerankd::store::lock::Held>() => {
            super::complain(format!("{e:#}"));
            Ok(ExitCode::from(super::EXIT_REFUSED))
        }
        Err(e) => Err(e),
    }
}

/// How the daemon and serve write their logs.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object a line (for log shippers).
    Json,
}

/// Structured logs to stderr (launchd's StandardErrorPath, journald), filtered by `RUST_LOG`;
/// colour only on a terminal and never with `NO_COLOR` set.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(color);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

pub fn sweep(root: &Root) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let Some(_lock) = FileLock::try_acquire(&root.daemon_lock())? else {
        super::complain(format!("a daemon holds {}; it sweeps at boot by itself", root.daemon_lock().display()));
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    };
    let s = rerankd::daemon::sweep::sweep(root)?;
    super::say(
        format!(
            "settled {} orphaned run(s); {} queued run(s) wait for a daemon; {} run(s) still alive; {} stale temp file(s) removed",
            s.settled.len(),
            s.queued.len(),
            s.adopted.len(),
            s.temps_removed
        ),
        serde_json::json!({"settled": s.settled.len(), "queued": s.queued.len(), "alive": s.adopted.len(), "temps_removed": s.temps_removed}),
    );
    Ok(ExitCode::SUCCESS)
}

/// Daemonizes before any thread exists (the watcher and signal threads start later).
fn detach(root: &Root) -> anyhow::Result<()> {
    use anyhow::Context;
    let logs = root.logs();
    let open = |name: &str| root.open_log(name).with_context(|| format!("opening {}", logs.join(name).display()));
    let (out, err) = (open("daemon.out.log")?, open("daemon.log")?);
    println!("rerankd: detaching; pid in {}, logs in {}", root.daemon_pid_file().display(), logs.display());
    daemonize::Daemonize::new()
        .pid_file(root.daemon_pid_file())
        .chown_pid_file(false)
        .working_directory(&root.dir)
        .stdout(out)
        .stderr(err)
        .start()
        .context("detaching into the background")?;
    Ok(())
}
