//! `ROOT/config.toml`: daemon settings. Optional; a missing file means defaults. A minimal
//! `key = value` reader (numbers only) keeps a TOML parser out of the dependency tree.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub max_concurrent_runs: usize,
    pub cancel_grace_s: f64,
    pub rescan_s: u64,
    /// How long SIGTERM waits for runs to record "daemon shutdown" (below launchd's ExitTimeOut).
    pub shutdown_timeout_s: f64,
    /// Memory budget for a job that names none (default: half the machine, at least 4 GB free).
    pub memory_budget_mb: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 1,
            cancel_grace_s: 30.0,
            rescan_s: 30,
            shutdown_timeout_s: 20.0,
            memory_budget_mb: crate::train::memory::default_budget_mb(),
        }
    }
}

impl DaemonConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut c = Self::default();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(c),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                anyhow::bail!("{}: line {}: expected `key = value`", path.display(), n + 1);
            };
            let (k, v) = (k.trim(), v.trim());
            let num: f64 =
                v.parse().map_err(|_| anyhow::anyhow!("{}: field `{k}`: `{v}` is not a number", path.display()))?;
            let bad = |what: &str| anyhow::anyhow!("{}: field `{k}`: {what}", path.display());
            match k {
                "max_concurrent_runs" if num >= 1.0 && num.fract() == 0.0 => c.max_concurrent_runs = num as usize,
                "cancel_grace_s" if num >= 0.0 => c.cancel_grace_s = num,
                "rescan_s" if num >= 1.0 => c.rescan_s = num as u64,
                "shutdown_timeout_s" if num >= 1.0 => c.shutdown_timeout_s = num,
                "max_concurrent_runs" | "cancel_grace_s" | "rescan_s" | "shutdown_timeout_s" => {
                    return Err(bad("out of range"));
                }
                _ => return Err(bad("unknown setting")),
            }
        }
        Ok(c)
    }
}
