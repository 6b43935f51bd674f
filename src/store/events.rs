//! The event log's one type: every line of `metrics.jsonl` is a [`Logged`] (`ts`, `seq`,
//! `run_id`) around an [`Event`], tagged by `type`. Every writer constructs a variant, every reader
//! (`watch`, `report`, `status`, the sweep, the retraining policy) matches one: a renamed field is a
//! compile error, not a silent zero. A line of a type this build does not know reads as
//! [`Event::Other`]; a line that is not an event at all (torn, garbled) is skipped by every reader.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::state::RunState;

/// One line of the log as read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logged {
    pub ts: String,
    pub seq: u64,
    pub run_id: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What happened in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A state change, recorded by `store::record` (the run's birth by intake).
    State {
        state: RunState,
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The error a failed state carries, logged just before it.
    Error { message: String },
    /// Something to tell the person watching, with what it counted.
    Log(Log),
    /// The feedback the run read: the complete lines of `path` up to byte `offset` (what the
    /// retraining policy counts new feedback from).
    FeedbackSnapshot(FeedbackSnapshot),
    /// One optimizer step.
    Step(Step),
    /// An evaluation: of the baseline, an epoch or the candidate, on dev or held-out lists.
    Eval(Eval),
    /// A change the memory governor made to the job.
    Cap(Cap),
    /// A checkpoint written.
    Checkpoint(Checkpoint),
    /// The promotion decision.
    Promote(Promote),
    /// A type this build does not know (written by a newer one).
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
}

/// A `log` event: a message, and the numbers behind it where it has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    pub level: Level,
    pub message: String,
    /// The optimizer steps the run will take (set when training starts or resumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Training pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<u64>,
    /// Training negatives by where they came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negatives: Option<BTreeMap<String, u64>>,
    /// What hard-negative mining did, and in how many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_negatives: Option<HardNegativesMined>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Feedback events skipped, by why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<BTreeMap<String, u64>>,
    /// `policy` when the corpus's retraining policy started the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The on_finish hook this is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// How runs before the `feedback_snapshot` event recorded their snapshot: a `log` event
    /// with this object. Read (by the policy), never written.
    #[serde(default, skip_serializing)]
    pub feedback: Option<SnapshotFields>,
}

impl Log {
    pub fn info(message: impl Into<String>) -> Self {
        Self::new(Level::Info, message)
    }

    pub fn warn(message: impl Into<String>) -> Self {
        Self::new(Level::Warn, message)
    }

    pub fn new(level: Level, message: impl Into<String>) -> Self {
        Self {
            level,
            message: message.into(),
            total_steps: None,
            pairs: None,
            negatives: None,
            hard_negatives: None,
            seconds: None,
            skipped: None,
            origin: None,
            hook: None,
            feedback: None,
        }
    }
}

/// An on_finish hook: its command, and the tail of its output once it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

/// Where a snapshot of a feedback file stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFields {
    pub path: PathBuf,
    pub events: u64,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackSnapshot {
    pub message: String,
    #[serde(flatten)]
    pub at: SnapshotFields,
}

/// What hard-negative mining did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardNegativesMined {
    pub queries: usize,
    /// Candidates scored per query (at most).
    pub pool: usize,
    pub pairs_scored: usize,
    pub added: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: u64,
    pub epoch: u64,
    #[serde(deserialize_with = "num32")]
    pub loss: f32,
    #[serde(deserialize_with = "num")]
    pub lr: f64,
    #[serde(deserialize_with = "num")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "num")]
    pub step_time_ms: f64,
    pub pairs: u64,
    pub tokens: u64,
    #[serde(default)]
    pub peak_mem_mb: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Dev,
    Heldout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Baseline,
    Epoch,
    Candidate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub split: Split,
    pub which: Which,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<u64>,
    #[serde(deserialize_with = "metrics")]
    pub metrics: BTreeMap<String, f64>,
    /// What the baseline was (`base model`, or the promoted adapter's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// One change the governor made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cap {
    pub field: String,
    pub from: u64,
    pub to: u64,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub epoch: u64,
    pub size_bytes: u64,
    pub attempt: u32,
    #[serde(deserialize_with = "num")]
    pub ms: f64,
}

/// A paired comparison of candidate and baseline, query by query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Mean of the per-query differences (candidate - baseline).
    #[serde(deserialize_with = "num")]
    pub difference: f64,
    /// The bootstrap interval of that mean, at `level`.
    #[serde(deserialize_with = "num2")]
    pub ci: [f64; 2],
    #[serde(deserialize_with = "num")]
    pub level: f64,
    #[serde(deserialize_with = "num")]
    pub p_value: f64,
    pub queries: usize,
    pub resamples: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promote {
    pub promoted: bool,
    pub primary: String,
    pub candidate: Option<f64>,
    pub baseline: Option<f64>,
    pub epsilon: f64,
    /// Where the promoted adapter was installed.
    pub path: Option<PathBuf>,
    pub reason: String,
    pub rule: String,
    /// The job's `promote` policy.
    pub policy: String,
    pub dev_queries: u64,
    pub dev: Option<Comparison>,
    pub heldout: Option<Comparison>,
}

/// A number that may have been written as `null` (serde_json writes NaN and infinities so).
fn num<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn num32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

fn num2<'de, D: Deserializer<'de>>(d: D) -> Result<[f64; 2], D::Error> {
    let [a, b] = <[Option<f64>; 2]>::deserialize(d)?;
    Ok([a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)])
}

fn metrics<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

impl Event {
    /// The state a `state` event records, if this is one.
    pub fn state(&self) -> Option<RunState> {
        match self {
            Self::State { state, .. } => Some(*state),
            _ => None,
        }
    }

    /// Whether this records a terminal state.
    pub fn is_terminal_state(&self) -> bool {
        self.state().is_some_and(RunState::is_terminal)
    }

    /// Where the feedback this run read stops, if this records it (as today's
    /// `feedback_snapshot`, or an older run's `log` event with a `feedback` object).
    pub fn snapshot(&self) -> Option<&SnapshotFields> {
        match self {
            Self::FeedbackSnapshot(s) => Some(&s.at),
            Self::Log(l) => l.feedback.as_ref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_every_type_read_back_as_written() {
        let lines = [
            r#"{"ts":"t","seq":0,"run_id":"c__1","type":"state","state":"queued","reason":null}"#,
            r#"{"ts":"t","seq":1,"run_id":"c__1","type":"step","step":0,"epoch":0,"loss":0.5,"lr":0.001,"grad_norm":1.5,"step_time_ms":12.0,"pairs":8,"tokens":900,"peak_mem_mb":300}"#,
            r#"{"ts":"t","seq":2,"run_id":"c__1","type":"eval","split":"dev","which":"epoch","epoch":0,"metrics":{"map":0.5,"ndcg@10":null}}"#,
            r#"{"ts":"t","seq":3,"run_id":"c__1","type":"log","level":"info","message":"m","total_steps":40,"pairs":12}"#,
            r#"{"ts":"t","seq":4,"run_id":"c__1","type":"something_newer","x":1}"#,
        ];
        let read: Vec<Logged> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(read[0].event.state(), Some(RunState::Queued));
        let Event::Step(s) = &read[1].event else { panic!("{:?}", read[1]) };
        assert_eq!((s.step, s.peak_mem_mb), (0, Some(300)));
        let Event::Eval(e) = &read[2].event else { panic!() };
        assert!(e.metrics["ndcg@10"].is_nan() && e.which == Which::Epoch);
        let Event::Log(l) = &read[3].event else { panic!() };
        assert_eq!((l.total_steps, l.pairs), (Some(40), Some(12)));
        assert_eq!(read[4].event, Event::Other);
        // What is written reads back the same.
        for l in &read[..4] {
            let again: Logged = serde_json::from_str(&serde_json::to_string(l).unwrap()).unwrap();
            assert_eq!(format!("{again:?}"), format!("{l:?}"));
        }
    }

    #[test]
    fn an_older_runs_feedback_log_line_is_a_snapshot() {
        let old = r#"{"ts":"t","seq":5,"run_id":"c__1","type":"log","level":"info","message":"feedback snapshot: 3 events","feedback":{"path":"/r/corpora/c/feedback.jsonl","events":3,"offset":120}}"#;
        let e: Logged = serde_json::from_str(old).unwrap();
        assert_eq!(e.event.snapshot().map(|s| s.offset), Some(120));
        let new = Event::FeedbackSnapshot(FeedbackSnapshot {
            message: "m".into(),
            at: SnapshotFields { path: "/f".into(), events: 1, offset: 7 },
        });
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""type":"feedback_snapshot""#) && text.contains(r#""offset":7"#), "{text}");
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap().snapshot().map(|s| s.offset), Some(7));
    }
}
