//! `ROOT/config.toml`: daemon settings, and `rerankd serve`'s under `[serve]`. Optional; a missing
//! file means defaults. Read in the settings idiom (crate::settings): a raw serde struct, so an
//! unknown key is an error naming it (and listing the known ones), then one `resolve()` that
//! range-checks every value, once, so nothing downstream can meet a duration it cannot represent.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::budget::{MAX_MB, MIN_MB};
use crate::settings::{SettingsError, command, from_toml, int, seconds};

/// What `config.toml` says, as typed (absent keys are `None`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    max_concurrent_runs: Option<usize>,
    cancel_grace_s: Option<f64>,
    rescan_s: Option<f64>,
    shutdown_timeout_s: Option<f64>,
    memory_budget_mb: Option<u64>,
    run_nice: Option<i32>,
    on_finish: Option<String>,
    on_finish_timeout_s: Option<f64>,
    serve: Option<ServeFile>,
}

/// The `[serve]` table as typed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    max_documents: Option<usize>,
    max_body_kb: Option<usize>,
    max_queue_pairs: Option<usize>,
    batch_size: Option<usize>,
    batch_tokens: Option<usize>,
    max_connections: Option<usize>,
    header_timeout_s: Option<f64>,
    allowed_hosts: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
}

/// `rerankd serve`'s limits (`[serve]` in config.toml), resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Most documents one request may rank (413 past it).
    pub max_documents: usize,
    /// Largest request body in bytes (413 past it).
    pub max_body_bytes: usize,
    /// Most pairs waiting or being scored across all requests (429 past it).
    pub max_queue_pairs: usize,
    /// Most pairs in one forward (the batch of `rerankd score` and evaluation by default).
    pub batch_size: usize,
    /// Most padded tokens (rows x longest row) in one forward: bounds scoring memory.
    pub batch_tokens: usize,
    /// Most open client connections; past it a connection is answered 503 and closed (also cut
    /// to the open-file limit less a reserve).
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers, counted from when it is
    /// ready for one (accepted, or answered on keep-alive): idle and half-sent connections close.
    pub header_timeout: Duration,
    /// `Host` names a loopback listener also answers besides localhost and loopback addresses
    /// (DNS rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) whose requests are answered; a request with any
    /// other `Origin` header is refused (cross-site requests from web pages).
    pub allowed_origins: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_documents: 1000,
            max_body_bytes: 4 << 20,
            max_queue_pairs: 2048,
            batch_size: crate::model::reranker::SCORE_BATCH,
            batch_tokens: crate::model::reranker::SCORE_BATCH * 512,
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

/// The daemon's settings, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub max_concurrent_runs: usize,
    /// How long a run may ignore its cancel sentinel before SIGTERM.
    pub cancel_grace: Duration,
    /// The safety-net rescan of the spool (the watcher is only a hint).
    pub rescan: Duration,
    /// How long SIGTERM waits for runs to record "daemon shutdown" (below launchd's ExitTimeOut).
    pub shutdown_timeout: Duration,
    /// Memory budget for a job that names none (default: half the machine, at least 4 GB free).
    pub memory_budget_mb: u64,
    /// The nice value run processes give themselves (0 = as the daemon; 19 = only idle cycles).
    pub run_nice: i32,
    /// A command (`sh -c`) run after each run's terminal state is recorded, unless its job names
    /// its own `on_finish`.
    pub on_finish: Option<String>,
    /// How long a hook may run before it (and its process group) is killed.
    pub on_finish_timeout: Duration,
    pub serve: ServeConfig,
}

/// The longest duration any setting takes: a week.
const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 1,
            cancel_grace: Duration::from_secs(30),
            rescan: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(20),
            memory_budget_mb: crate::budget::machine_default_mb(),
            run_nice: 10,
            on_finish: None,
            on_finish_timeout: Duration::from_secs(60),
            serve: ServeConfig::default(),
        }
    }
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(SettingsError::whole(format!("cannot read: {e}")).in_file(path)),
        };
        let text = String::from_utf8(text).map_err(|_| SettingsError::whole("is not UTF-8 text").in_file(path))?;
        Self::parse_at(path, &text)
    }

    /// Parses config text as if read from `path`: the rules of [`Self::load`].
    pub fn parse_at(path: &Path, text: &str) -> Result<Self, SettingsError> {
        from_toml::<ConfigFile>(text).and_then(Self::resolve).map_err(|e| e.in_file(path))
    }

    /// [`Self::parse_at`] for text with no file behind it (tests).
    pub fn parse(text: &str) -> Result<Self, SettingsError> {
        Self::parse_at(Path::new("config.toml"), text)
    }

    fn resolve(f: ConfigFile) -> Result<Self, SettingsError> {
        let serve = resolve_serve(f.serve.unwrap_or_default())?;
        let d = Self::default();
        Ok(Self {
            max_concurrent_runs: int("max_concurrent_runs", f.max_concurrent_runs, 1, 64, 1)?,
            cancel_grace: seconds("cancel_grace_s", f.cancel_grace_s, 0.0, MAX_SECONDS, d.cancel_grace)?,
            rescan: seconds("rescan_s", f.rescan_s, 1.0, MAX_SECONDS, d.rescan)?,
            shutdown_timeout: seconds(
                "shutdown_timeout_s",
                f.shutdown_timeout_s,
                1.0,
                MAX_SECONDS,
                d.shutdown_timeout,
            )?,
            memory_budget_mb: int("memory_budget_mb", f.memory_budget_mb, MIN_MB, MAX_MB, d.memory_budget_mb)?,
            run_nice: int("run_nice", f.run_nice, 0, 19, d.run_nice)?,
            on_finish: command("on_finish", f.on_finish)?,
            on_finish_timeout: seconds(
                "on_finish_timeout_s",
                f.on_finish_timeout_s,
                0.1,
                MAX_SECONDS,
                d.on_finish_timeout,
            )?,
            serve,
        })
    }
}

fn resolve_serve(f: ServeFile) -> Result<ServeConfig, SettingsError> {
    let d = ServeConfig::default();
    let c = ServeConfig {
        max_documents: int("serve.max_documents", f.max_documents, 1, 100_000, d.max_documents)?,
        max_body_bytes: int("serve.max_body_kb", f.max_body_kb, 1, 1 << 20, d.max_body_bytes >> 10)? << 10,
        max_queue_pairs: int("serve.max_queue_pairs", f.max_queue_pairs, 1, 1 << 20, d.max_queue_pairs)?,
        batch_size: int("serve.batch_size", f.batch_size, 1, 1024, d.batch_size)?,
        batch_tokens: int("serve.batch_tokens", f.batch_tokens, 16, 1 << 22, d.batch_tokens)?,
        max_connections: int("serve.max_connections", f.max_connections, 1, 1 << 20, d.max_connections)?,
        header_timeout: seconds("serve.header_timeout_s", f.header_timeout_s, 0.1, 3600.0, d.header_timeout)?,
        allowed_hosts: names("serve.allowed_hosts", f.allowed_hosts, |h| {
            !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c))
        })?,
        allowed_origins: names("serve.allowed_origins", f.allowed_origins, |o| {
            (o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && !o.contains(char::is_whitespace)
        })?,
    };
    if c.max_queue_pairs < c.max_documents {
        return Err(SettingsError::at(
            "serve.max_queue_pairs",
            format!(
                "is {} but serve.max_documents is {}: a request with that many documents could never be admitted",
                c.max_queue_pairs, c.max_documents
            ),
        ));
    }
    Ok(c)
}

/// A list of names, each checked by `ok`, lowercased (hosts and origins compare without case).
fn names(field: &str, v: Option<Vec<String>>, ok: impl Fn(&str) -> bool) -> Result<Vec<String>, SettingsError> {
    let v = v.unwrap_or_default();
    match v.iter().find(|x| !ok(x)) {
        Some(bad) => Err(SettingsError::at(field, format!("`{bad}` is not a valid entry"))),
        None => Ok(v.into_iter().map(|x| x.to_ascii_lowercase()).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key docs/operations.md documents is accepted (a derive cannot forget one; this proves it).
    #[test]
    fn every_documented_key() {
        let c = DaemonConfig::parse(
            "max_concurrent_runs = 2\ncancel_grace_s = 1.5\nrescan_s = 10\nshutdown_timeout_s = 5\n\
             memory_budget_mb = 4096\nrun_nice = 5\non_finish = \"notify-send done\"\non_finish_timeout_s = 5\n[serve]\nmax_documents = 50\nmax_body_kb = 64\n\
             max_queue_pairs = 100\nbatch_size = 8\nbatch_tokens = 2048\nmax_connections = 64\nheader_timeout_s = 5\n\
             allowed_hosts = [\"Box.lan\"]\nallowed_origins = [\"http://localhost:3000\"]\n",
        )
        .unwrap();
        assert_eq!(c.max_concurrent_runs, 2);
        assert_eq!(c.cancel_grace, Duration::from_millis(1500));
        assert_eq!(c.rescan, Duration::from_secs(10));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.memory_budget_mb, 4096);
        assert_eq!(c.run_nice, 5);
        assert_eq!(c.on_finish.as_deref(), Some("notify-send done"));
        assert_eq!(c.on_finish_timeout, Duration::from_secs(5));
        let s = ServeConfig {
            max_documents: 50,
            max_body_bytes: 65536,
            max_queue_pairs: 100,
            batch_size: 8,
            batch_tokens: 2048,
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            allowed_hosts: vec!["box.lan".into()],
            allowed_origins: vec!["http://localhost:3000".into()],
        };
        assert_eq!(c.serve, s);
        assert_eq!(DaemonConfig::parse("").unwrap(), DaemonConfig::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("cancel_grace_s = inf", "cancel_grace_s"),
            ("cancel_grace_s = 1e20", "cancel_grace_s"),
            ("cancel_grace_s = nan", "cancel_grace_s"),
            ("shutdown_timeout_s = 1e300", "shutdown_timeout_s"),
            ("rescan_s = -1", "rescan_s"),
            ("max_concurrent_runs = 0", "max_concurrent_runs"),
            ("run_nice = 40", "run_nice"),
            ("memory_budget_mb = 1", "memory_budget_mb"),
            ("[serve]\nbatch_size = 0", "serve.batch_size"),
            ("[serve]\nmax_documents = 100\nmax_queue_pairs = 50", "serve.max_queue_pairs"),
            ("[serve]\nheader_timeout_s = 0", "serve.header_timeout_s"),
            ("[serve]\nallowed_origins = [\"localhost:3000\"]", "serve.allowed_origins"),
        ] {
            let e = DaemonConfig::parse(text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(key), "{text}: {e}");
        }
        let e = DaemonConfig::parse("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = DaemonConfig::parse("rescan_s = \"10\"").unwrap_err().to_string();
        assert!(e.contains("rescan_s"), "{e}");
    }
}
