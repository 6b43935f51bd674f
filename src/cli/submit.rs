//! `rerankd submit FILE`: the Maildir rule done for you (spool/tmp, then rename into spool/), then
//! wait for the daemon's verdict and print the receipt (or the rejection).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rerankd::store::{Root, spool};

#[derive(Args, Debug)]
pub struct SubmitArgs {
    pub file: PathBuf,
    /// Seconds to wait for a running daemon to accept or reject the job (0: do not wait).
    #[arg(long, default_value_t = 10.0, value_parser = parse_wait)]
    pub wait: f64,
}

/// `--wait`: a finite number of seconds from 0 to a day (checked before anything is submitted).
fn parse_wait(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if w.is_finite() && (0.0..=86_400.0).contains(&w) => Ok(w),
        _ => Err(format!("`{s}` is not a number of seconds from 0 to 86400")),
    }
}

/// The spool name for a submitted file: its stem made safe (no leading dots, which intake
/// ignores by design; only the corpus alphabet; short), stamped and unique.
fn spool_name(file: &std::path::Path) -> String {
    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let safe: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' { c } else { '_' })
        .collect::<String>()
        .trim_start_matches('.')
        .chars()
        .take(100)
        .collect();
    let base = if safe.is_empty() { "job".to_string() } else { safe };
    let stamp = rerankd::store::time::compact(std::time::SystemTime::now());
    format!("{base}-{stamp}-{}.json", std::process::id())
}

pub fn run(root: &Root, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    root.ensure()?;
    let text = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let name = spool_name(&a.file);
    spool::drop_job(root, &name, &text)?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.wait);
    loop {
        match spool::outcome(root, &name) {
            spool::Outcome::Accepted(r) => {
                match serde_json::from_str::<serde_json::Value>(&r) {
                    Ok(v) if super::json() => println!("{v}"),
                    _ => print!("{r}"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            spool::Outcome::Rejected(why) => {
                match serde_json::from_str::<serde_json::Value>(&why) {
                    // With --json, the rejection's own {error, field, hint} on stderr.
                    Ok(v) if super::json() => eprintln!("{v}"),
                    _ => super::complain(format!("job rejected: {}", why.trim())),
                }
                return Ok(ExitCode::from(super::EXIT_REFUSED));
            }
            spool::Outcome::Waiting => {}
        }
        if Instant::now() >= deadline {
            let msg = if a.wait > 0.0 { " (no daemon answered yet)" } else { "" };
            println!("{{\"submitted\": {:?}, \"spool\": {:?}}}", name, root.spool().join(&name));
            if !super::json() {
                eprintln!("submitted {name}{msg}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
