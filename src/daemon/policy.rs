//! Retraining by policy: for each corpus whose `policy.json` has `retrain_after_events`, the
//! daemon counts the signal events appended to its feedback.jsonl after the last run's snapshot
//! and, once there are enough, the corpus is idle and `min_interval_s` has passed since its last
//! run (or the last policy drop), it drops the corpus's job template into the spool with
//! `"origin": "policy"`. From there it is a normal job: intake, receipt, run.
//!
//! A policy run that failed is not started again until more feedback arrives (and the interval
//! has passed), so a job that cannot succeed never loops.
//!
//! Looked at on the daemon's rescan timer (and at SIGHUP), never in a busy loop; a corpus whose
//! feedback file and runs have not changed since the last look is not read again.

use crate::ids::{CorpusName, RunId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::job::{Job, Origin};
use crate::store::atomic::read_json;
use crate::store::feedback::{CorpusFeedback, signals_after};
use crate::store::metrics::read_events;
use crate::store::paths::RunFiles;
use crate::store::{Root, Status, policy};

#[derive(Default)]
struct Watched {
    /// (feedback.jsonl size, number of the corpus's runs) at the last look that did not trigger.
    looked_at: Option<(u64, usize)>,
    /// Signals counted: (from the snapshot at this byte, up to this byte, how many), so that
    /// feedback arriving is counted once, not re-read from the snapshot at every look.
    counted: Option<(u64, u64, u64)>,
    last_drop: Option<SystemTime>,
    /// The last policy.json or template problem logged (each is logged once).
    last_error: Option<String>,
}

#[derive(Default)]
pub struct Policies {
    watched: HashMap<CorpusName, Watched>,
    /// Corpus -> why its policy job was dropped and the file, until the job is accepted (the
    /// reason is then logged in the run) or leaves the spool otherwise (rejected).
    pub reasons: HashMap<CorpusName, (String, PathBuf)>,
}

/// The byte offset where the newest run of the corpus that took a feedback snapshot stopped
/// reading (0 when none did), from that run's snapshot event.
fn last_snapshot(root: &Root, runs: &[&Status], fb: &CorpusFeedback) -> u64 {
    for st in runs {
        let events = read_events(&RunFiles::new(&root.run_dir(&st.run_id)).metrics()).unwrap_or_default();
        let snap = events.iter().rev().find_map(|e| {
            let at = e.event.snapshot()?;
            fb.is_this_file(&at.path).then_some(at.offset)
        });
        if let Some(off) = snap {
            return off;
        }
    }
    0
}

/// When a run was created.
fn created(root: &Root, run_id: &RunId) -> Option<SystemTime> {
    RunFiles::new(&root.run_dir(run_id)).created()
}

impl Policies {
    /// One look at every corpus with a policy; `busy` are the corpora with a run active, queued,
    /// or waiting to be recorded. Returns the jobs it dropped.
    pub fn pass(&mut self, root: &Root, busy: &[CorpusName]) {
        // Every run's status, read only once a corpus with a retraining policy needs it.
        let mut all: Option<Vec<Status>> = None;
        // A dropped job that left the spool without being accepted (rejected): forget it; the
        // interval since the drop still holds the next try back.
        self.reasons.retain(|_, (_, file)| crate::store::spool::still_waiting(file));
        for corpus in root.corpus_homes() {
            let w = self.watched.entry(corpus.clone()).or_default();
            let p = match policy::read(root, &corpus) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    let msg = e.to_string();
                    if w.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("retraining policy ignored: {msg}");
                        w.last_error = Some(msg);
                    }
                    continue;
                }
            };
            let Some(threshold) = p.retrain_after_events else { continue };
            if busy.contains(&corpus) || self.reasons.contains_key(&corpus) {
                continue;
            }
            let all = all.get_or_insert_with(|| crate::store::all_runs(root));
            let mut runs: Vec<&Status> = all.iter().filter(|s| s.corpus == corpus).collect();
            runs.sort_by(|a, b| b.created_at.cmp(&a.created_at));
            let fb = CorpusFeedback::new(root, &corpus);
            let (size, changed) = fb.stat();
            if w.looked_at == Some((size, runs.len())) {
                continue;
            }
            // A policy run that failed is not retried on the same feedback: only once more arrives.
            if let Some(last) = runs.first()
                && last.state == crate::store::RunState::Failed
                && read_json::<Job>(&RunFiles::new(&root.run_dir(&last.run_id)).job())
                    .is_ok_and(|j| j.origin == Origin::Policy)
                && changed.is_none_or(|t| created(root, &last.run_id).is_some_and(|c| t <= c))
            {
                w.looked_at = Some((size, runs.len()));
                continue;
            }
            let since = runs.first().and_then(|r| created(root, &r.run_id)).into_iter().chain(w.last_drop).max();
            let interval = Duration::from_secs_f64(p.min_interval_s);
            if let Some(t) = since
                && SystemTime::now().duration_since(t).unwrap_or_default() < interval
            {
                continue; // not looked at: the interval, not the data, holds it back
            }
            let from = last_snapshot(root, &runs, &fb);
            let (base, start) = match w.counted {
                Some((f, upto, n)) if f == from && upto <= size => (n, upto),
                _ => (0, from),
            };
            let signals = match signals_after(&fb.feedback, start) {
                Ok((n, upto)) => {
                    w.counted = Some((from, upto, base + n));
                    base + n
                }
                Err(e) => {
                    tracing::error!(corpus = %corpus, "counting new feedback: {e}");
                    continue;
                }
            };
            if signals < threshold {
                w.looked_at = Some((size, runs.len()));
                continue;
            }
            let reason = format!(
                "retraining policy: {signals} new signal events since byte {from} of {} (retrain_after_events {threshold})",
                fb.feedback.display()
            );
            w.last_drop = Some(SystemTime::now());
            match drop_job(root, &corpus, &p) {
                Ok(file) => {
                    w.last_error = None;
                    tracing::info!(corpus = %corpus, file = %file.display(), "{reason}");
                    self.reasons.insert(corpus, (reason, file));
                }
                Err(e) => {
                    let msg = format!("retraining policy of `{corpus}`: {e}");
                    if w.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        w.last_error = Some(msg);
                    }
                }
            }
        }
    }
}

/// Writes the corpus's job template, with `"origin": "policy"`, into the spool.
fn drop_job(root: &Root, corpus: &CorpusName, p: &policy::Policy) -> Result<PathBuf, String> {
    let text = policy::read_template(root, corpus, p).map_err(|e| e.to_string())?;
    let shown = p.job.display();
    let mut job: Value =
        serde_json::from_slice(&text).map_err(|e| format!("the job template {shown} is not JSON: {e}"))?;
    let Value::Object(o) = &mut job else {
        return Err(format!("the job template {shown} is not a JSON object"));
    };
    match o.get("corpus").and_then(Value::as_str) {
        None => {
            o.insert("corpus".into(), json!(corpus));
        }
        Some(c) if c == corpus.as_str() => {}
        Some(c) => return Err(format!("the job template {shown} is for corpus `{c}`")),
    }
    o.insert("origin".into(), json!("policy"));
    let name = format!("policy-{corpus}-{}.json", crate::store::time::compact(SystemTime::now()));
    crate::store::spool::drop_job(root, &name, job.to_string().as_bytes()).map_err(|e| e.to_string())
}
