//! `install-launchd` / `install-systemd`: write the service file with this user's paths and print
//! the commands that load it. Nothing is loaded unless `--load` is given.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rerankd::store::Root;

const PLIST: &str = include_str!("../../launchd/rerankd.plist.template");
const UNIT: &str = include_str!("../../systemd/rerankd.service.template");
const SERVE_PLIST: &str = include_str!("../../launchd/rerankd-serve.plist.template");
const SERVE_UNIT: &str = include_str!("../../systemd/rerankd-serve.service.template");
const LABEL: &str = "io.rerankd.daemon";
const SERVE_LABEL: &str = "io.rerankd.serve";

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The file to write, or a directory to write it into (default: ~/Library/LaunchAgents or
    /// ~/.config/systemd/user).
    #[arg(long)]
    pub dest: Option<PathBuf>,
    /// Also run the load commands.
    #[arg(long)]
    pub load: bool,
    /// Write the unit of `rerankd serve` (a second service) instead of the daemon's.
    #[arg(long)]
    pub serve: bool,
    /// Arguments for `rerankd serve` in the unit, after `--` (e.g. `-- --default-corpus docs`).
    #[arg(last = true, requires = "serve")]
    pub serve_args: Vec<String>,
}

/// The service's template, label and unit name: the daemon's or serve's.
fn which(a: &InstallArgs, plist: bool) -> (&'static str, &'static str, &'static str) {
    match (a.serve, plist) {
        (false, true) => (PLIST, LABEL, "rerankd"),
        (true, true) => (SERVE_PLIST, SERVE_LABEL, "rerankd-serve"),
        (false, false) => (UNIT, LABEL, "rerankd"),
        (true, false) => (SERVE_UNIT, SERVE_LABEL, "rerankd-serve"),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One word of a systemd `ExecStart=`, always double-quoted: backslash and quote escaped, `%`
/// (specifiers) and `$` (variables) doubled, so any path or argument is passed as it is.
fn systemd_word(s: &str) -> String {
    let inner = s.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
    format!("\"{inner}\"")
}

/// A value as the template wants it: escaped for the plist's XML, or a quoted systemd word.
fn word(s: &str, plist: bool) -> String {
    if plist { xml_escape(s) } else { systemd_word(s) }
}

/// Serve's extra arguments as the template wants them: plist `<string>` lines or a unit's words.
fn args_text(args: &[String], plist: bool) -> String {
    if plist {
        args.iter().map(|a| format!("    <string>{}</string>\n", xml_escape(a))).collect()
    } else {
        args.iter().map(|a| format!(" {}", systemd_word(a))).collect()
    }
}

/// `--dest` as the file to write, or a directory (existing, or written with a trailing `/`) to
/// write the usual file name into; without it, the usual place.
fn dest_file(dest: Option<PathBuf>, default_dir: PathBuf, name: &str) -> PathBuf {
    match dest {
        Some(d) if d.is_dir() || d.as_os_str().to_string_lossy().ends_with('/') => d.join(name),
        Some(d) => d,
        None => default_dir.join(name),
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// The template with this installation's values, every path quoted for the file's syntax.
fn fill(template: &str, label: &str, args: &str, root: &Root, plist: bool) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding the rerankd executable")?;
    let logdir = root.dir.join("logs");
    std::fs::create_dir_all(&logdir).with_context(|| format!("creating {}", logdir.display()))?;
    Ok(template
        .replace("@LABEL@", label)
        .replace("@ARGS@", args)
        .replace("@EXE@", &word(&exe.display().to_string(), plist))
        .replace("@ROOT@", &word(&root.dir.display().to_string(), plist))
        .replace("@LOGDIR@", &word(&logdir.display().to_string(), plist)))
}

fn write(dest: &std::path::Path, text: &str) -> anyhow::Result<()> {
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    rerankd::store::write_atomic(dest, text.as_bytes())?;
    Ok(())
}

/// Reports what was written and the commands that load it (running the first ones with
/// `--load`); `more` are shown, never run.
fn report(dest: &std::path::Path, heading: &str, lines: &[String], more: &[String], load: bool) -> anyhow::Result<()> {
    if load {
        for l in lines {
            let ok = std::process::Command::new("sh").arg("-c").arg(l).status()?.success();
            anyhow::ensure!(ok, "`{l}` failed");
        }
    }
    let all: Vec<&String> = lines.iter().chain(more).collect();
    let text = format!(
        "wrote {}\n{heading}\n{}",
        dest.display(),
        all.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
    );
    super::say(text, serde_json::json!({"wrote": dest, "commands": all, "loaded": load}));
    Ok(())
}

pub fn launchd(root: &Root, a: InstallArgs) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let (template, label, _) = which(&a, true);
    let dest = dest_file(a.dest.clone(), home().join("Library/LaunchAgents"), &format!("{label}.plist"));
    write(&dest, &fill(template, label, &args_text(&a.serve_args, true), root, true)?)?;
    let d = dest.display();
    report(
        &dest,
        "load, restart and unload with:",
        &[format!("launchctl bootstrap gui/$(id -u) {d}")],
        &[format!("launchctl kickstart -k gui/$(id -u)/{label}"), format!("launchctl bootout gui/$(id -u)/{label}")],
        a.load,
    )?;
    Ok(ExitCode::SUCCESS)
}

pub fn systemd(root: &Root, a: InstallArgs) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let (template, label, unit) = which(&a, false);
    let dest = dest_file(a.dest.clone(), home().join(".config/systemd/user"), &format!("{unit}.service"));
    write(&dest, &fill(template, label, &args_text(&a.serve_args, false), root, false)?)?;
    report(
        &dest,
        "enable and start with:",
        &["systemctl --user daemon-reload".into(), format!("systemctl --user enable --now {unit}.service")],
        &[format!("journalctl --user -u {unit} -f      # logs")],
        a.load,
    )?;
    Ok(ExitCode::SUCCESS)
}
