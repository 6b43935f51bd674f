//! `corpora/<c>/policy.json`: whether serve captures the corpus's rankings, and when the daemon
//! retrains it by itself. Optional; an unknown field or a bad value is an error naming it.
//!
//! ```json
//! {"capture": true, "retrain_after_events": 20, "min_interval_s": 600, "job": "job.json"}
//! ```

use crate::ids::CorpusName;
use std::path::PathBuf;

use serde::Deserialize;

use crate::settings::{SettingsError, Upper, from_json, num};

use super::Root;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    capture: bool,
    retrain_after_events: Option<u64>,
    min_interval_s: Option<f64>,
    job: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub capture: bool,
    /// Retraining by policy: after this many new signal events (None: never by itself).
    pub retrain_after_events: Option<u64>,
    /// At least this long between two runs of the corpus started by the policy.
    pub min_interval_s: f64,
    /// The job template, relative to the corpus home (default `job.json`).
    pub job: PathBuf,
}

pub const DEFAULT_MIN_INTERVAL_S: f64 = 600.0;

pub fn path(root: &Root, corpus: &CorpusName) -> PathBuf {
    root.corpus_home(corpus).join("policy.json")
}

/// The corpus's policy, `None` when it has no policy.json.
pub fn read(root: &Root, corpus: &CorpusName) -> Result<Option<Policy>, SettingsError> {
    let path = path(root, corpus);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SettingsError::whole(format!("cannot read: {e}")).in_file(&path)),
    };
    if text.len() > 64 << 10 {
        return Err(SettingsError::whole("is over 64 KB").in_file(&path));
    }
    from_json::<PolicyFile>(&text).and_then(PolicyFile::resolve).map(Some).map_err(|e| e.in_file(&path))
}

impl PolicyFile {
    fn resolve(self) -> Result<Policy, SettingsError> {
        if self.retrain_after_events == Some(0) {
            return Err(SettingsError::at("retrain_after_events", "must be at least 1"));
        }
        let min_interval_s =
            num("min_interval_s", self.min_interval_s, 0.0, Upper::Closed(365.0 * 86400.0), DEFAULT_MIN_INTERVAL_S)?;
        let job = PathBuf::from(self.job.unwrap_or_else(|| "job.json".into()));
        if job.is_absolute() || job.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(SettingsError::at(
                "job",
                format!("must be a file in the corpus directory, got {}", job.display()),
            ));
        }
        Ok(Policy { capture: self.capture, retrain_after_events: self.retrain_after_events, min_interval_s, job })
    }
}

/// The text of the corpus's job template (`policy.job`, in the corpus home), at most 1 MB.
pub fn read_template(root: &Root, corpus: &CorpusName, policy: &Policy) -> Result<Vec<u8>, SettingsError> {
    let path = root.corpus_home(corpus).join(&policy.job);
    let text = std::fs::read(&path).map_err(|e| SettingsError::whole(format!("cannot read: {e}")).in_file(&path))?;
    if text.len() as u64 > super::spool::MAX_JOB_BYTES {
        return Err(SettingsError::whole("is over 1 MB").in_file(&path));
    }
    Ok(text)
}
