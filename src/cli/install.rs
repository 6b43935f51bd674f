//! `install-launchd` / `install-systemd`: write the service file with this user's paths and print
//! the commands that load it. Nothing is loaded unless `--load` is given.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rerankd::store::Root;

const PLIST: &str = include_str!("../../launchd/rerankd.plist.template");
const UNIT: &str = include_str!("../../systemd/rerankd.service.template");
const LABEL: &str = "io.rerankd.daemon";

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Where to write the file (default: ~/Library/LaunchAgents or ~/.config/systemd/user).
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// Also run the load commands.
    #[arg(long)]
    pub load: bool,
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn fill(template: &str, root: &Root) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding the rerankd executable")?;
    let logdir = root.dir.join("logs");
    std::fs::create_dir_all(&logdir).with_context(|| format!("creating {}", logdir.display()))?;
    Ok(template
        .replace("@LABEL@", LABEL)
        .replace("@EXE@", &exe.display().to_string())
        .replace("@ROOT@", &root.dir.display().to_string())
        .replace("@LOGDIR@", &logdir.display().to_string()))
}

fn write(dest: &std::path::Path, text: &str) -> anyhow::Result<()> {
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    rerankd::store::write_atomic(dest, text.as_bytes())?;
    println!("wrote {}", dest.display());
    Ok(())
}

fn run_lines(lines: &[String], load: bool) -> anyhow::Result<()> {
    for l in lines {
        println!("  {l}");
        if load {
            let ok = std::process::Command::new("sh").arg("-c").arg(l).status()?.success();
            anyhow::ensure!(ok, "`{l}` failed");
        }
    }
    Ok(())
}

pub fn launchd(root: &Root, a: InstallArgs) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let dest = a.dest.unwrap_or_else(|| home().join(format!("Library/LaunchAgents/{LABEL}.plist")));
    write(&dest, &fill(PLIST, root)?)?;
    println!("load, restart and unload with:");
    let d = dest.display();
    let lines = [format!("launchctl bootstrap gui/$(id -u) {d}")];
    run_lines(&lines, a.load)?;
    println!("  launchctl kickstart -k gui/$(id -u)/{LABEL}");
    println!("  launchctl bootout gui/$(id -u)/{LABEL}");
    Ok(ExitCode::SUCCESS)
}

pub fn systemd(root: &Root, a: InstallArgs) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let dest = a.dest.unwrap_or_else(|| home().join(".config/systemd/user/rerankd.service"));
    write(&dest, &fill(UNIT, root)?)?;
    println!("enable and start with:");
    run_lines(
        &["systemctl --user daemon-reload".into(), "systemctl --user enable --now rerankd.service".into()],
        a.load,
    )?;
    println!("  journalctl --user -u rerankd -f      # logs");
    Ok(ExitCode::SUCCESS)
}
