//! `rerankd daemon` and `rerankd sweep`.

use std::process::ExitCode;

use clap::Args;
use rerankd::store::{FileLock, Root};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Exit once the spool is empty and no run is queued or active (for scripts and the demo).
    #[arg(long)]
    pub until_idle: bool,
}

pub fn run(root: &Root, a: DaemonArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    match rerankd::daemon::run(root, a.until_idle) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.to_string().contains("holds") => {
            eprintln!("rerankd: {e:#}");
            Ok(ExitCode::from(super::EXIT_REFUSED))
        }
        Err(e) => Err(e),
    }
}

/// Structured logs to stderr (launchd's StandardErrorPath, journald), filtered by `RUST_LOG`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn sweep(root: &Root) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let Some(_lock) = FileLock::try_acquire(&root.daemon_lock())? else {
        eprintln!("rerankd: a daemon holds {}; it sweeps at boot by itself", root.daemon_lock().display());
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    };
    let (queued, settled) = rerankd::daemon::sweep::sweep(root)?;
    println!("settled {settled} orphaned run(s); {} queued run(s) wait for a daemon", queued.len());
    Ok(ExitCode::SUCCESS)
}
