//! `corpora/<c>/policy.json`: whether serve captures the corpus's rankings, and when the daemon
//! retrains it by itself. Optional; an unknown field or a bad value is an error naming it.
//!
//! ```json
//! {"capture": true, "retrain_after_events": 20, "min_interval_s": 600, "job": "job.json"}
//! ```

use crate::ids::CorpusName;
use std::path::PathBuf;

use serde::Deserialize;

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

/// A bad policy.json: the file, the field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct PolicyError {
    pub path: PathBuf,
    pub message: String,
}

pub const DEFAULT_MIN_INTERVAL_S: f64 = 600.0;

pub fn path(root: &Root, corpus: &CorpusName) -> PathBuf {
    root.corpus_home(corpus).join("policy.json")
}

/// The corpus's policy, `None` when it has no policy.json.
pub fn read(root: &Root, corpus: &CorpusName) -> Result<Option<Policy>, PolicyError> {
    let path = path(root, corpus);
    let err = |message: String| PolicyError { path: path.clone(), message };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot read: {e}"))),
    };
    if text.len() > 64 << 10 {
        return Err(err("is over 64 KB".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(&text);
    let f: PolicyFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { err(e.into_inner().to_string()) } else { err(format!("field `{path}`: {}", e.into_inner())) }
    })?;
    if f.retrain_after_events == Some(0) {
        return Err(err("field `retrain_after_events` must be at least 1".into()));
    }
    let min_interval_s = f.min_interval_s.unwrap_or(DEFAULT_MIN_INTERVAL_S);
    if !min_interval_s.is_finite() || !(0.0..=365.0 * 86400.0).contains(&min_interval_s) {
        return Err(err(format!("field `min_interval_s` must be from 0 to a year in seconds, got {min_interval_s}")));
    }
    let job = PathBuf::from(f.job.unwrap_or_else(|| "job.json".into()));
    if job.is_absolute() || job.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(err(format!("field `job` must be a file in the corpus directory, got {}", job.display())));
    }
    Ok(Some(Policy { capture: f.capture, retrain_after_events: f.retrain_after_events, min_interval_s, job }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root { dir: dir.path().to_path_buf() };
        let c = CorpusName::parse("c").unwrap();
        assert_eq!(read(&root, &c).unwrap(), None);
        std::fs::create_dir_all(root.corpus_home(&c)).unwrap();
        let write = |t: &str| std::fs::write(path(&root, &c), t).unwrap();
        write(r#"{"capture": true, "retrain_after_events": 5, "min_interval_s": 0}"#);
        let p = read(&root, &c).unwrap().unwrap();
        assert!(p.capture && p.retrain_after_events == Some(5) && p.min_interval_s == 0.0);
        assert_eq!(p.job, PathBuf::from("job.json"));
        for (text, needle) in [
            (r#"{"capture": 1}"#, "capture"),
            (r#"{"retrain_after_event": 5}"#, "retrain_after_event"),
            (r#"{"retrain_after_events": 0}"#, "retrain_after_events"),
            (r#"{"min_interval_s": -1}"#, "min_interval_s"),
            (r#"{"job": "../x.json"}"#, "job"),
        ] {
            write(text);
            let e = read(&root, &c).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("policy.json"), "{text}: {e}");
        }
    }
}
