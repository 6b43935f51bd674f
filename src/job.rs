//! The job file: parsed from what a user dropped into plain values, validated once
//! into an effective [`Job`] with every default filled in. Every rejection names the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::device::DeviceChoice;
use crate::model::lora::Target;

/// Why a job file was rejected: the `.error.json` beside it in `spool/rejected/`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobError {
    pub error: String,
    pub field: Option<String>,
    pub hint: Option<String>,
}

impl JobError {
    fn at(field: &str, error: impl Into<String>, hint: Option<&str>) -> Self {
        Self { error: error.into(), field: Some(field.to_string()), hint: hint.map(str::to_string) }
    }
    pub fn whole(error: impl Into<String>, hint: Option<&str>) -> Self {
        Self { error: error.into(), field: None, hint: hint.map(str::to_string) }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.error)?,
            None => write!(f, "{}", self.error)?,
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Where the training data comes from: `triplets` (texts, or document ids when `documents` is
/// given), or `feedback` + `documents`. Paths are absolute in the effective job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Data {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triplets: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<PathBuf>,
    /// Characters of each document kept (files of a documents directory, and JSONL texts).
    pub doc_chars: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Train {
    pub epochs: u64,
    pub batch_size: u64,
    pub grad_accum: u64,
    pub max_length: u64,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub negative_ratio: u64,
    pub seed: u64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Seconds between checkpoints (0: after every optimizer step).
    #[serde(default = "default_checkpoint_every_s")]
    pub checkpoint_every_s: u64,
    /// Negatives mined by the baseline before training; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_negatives: Option<HardNegatives>,
}

/// `train.hard_negatives`: the baseline (the promoted adapter, else the base model) scores
/// candidate documents for each training query; the highest-scored ones that are not positives,
/// after skipping the first `skip_top`, become up to `top_k` negatives, after the explicit ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardNegatives {
    pub top_k: u64,
    pub skip_top: u64,
    /// Candidates per query: every document when the corpus has at most this many, else the
    /// query's judged documents plus a seeded sample.
    pub pool: u64,
    /// The most (query, candidate) pairs scored in all; the pool shrinks to fit.
    pub max_pairs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lora {
    pub r: u64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<Target>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub primary_metric: String,
    pub dev_fraction: f64,
    pub list_size: u64,
    pub epsilon: f64,
    /// Below this many dev queries nothing is promoted automatically.
    #[serde(default = "default_min_dev_queries")]
    pub min_dev_queries: u64,
    /// The bootstrap interval's level.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Bootstrap (and sampled randomization) resamples.
    #[serde(default = "default_resamples")]
    pub resamples: u64,
    /// At most this many queries of earlier promotions' held-out lists are evaluated (a seeded
    /// sample when there are more).
    #[serde(default = "default_heldout_max_queries")]
    pub heldout_max_queries: u64,
}

fn default_checkpoint_every_s() -> u64 {
    300
}
fn default_min_dev_queries() -> u64 {
    10
}
fn default_confidence() -> f64 {
    0.95
}
fn default_resamples() -> u64 {
    10_000
}
fn default_heldout_max_queries() -> u64 {
    200
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Promote {
    /// The candidate's dev improvement's bootstrap interval lies above `eval.epsilon`, and it is
    /// not significantly worse on earlier promotions' held-out lists.
    IfSignificant,
    IfImproves,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IfBusy {
    Queue,
    Reject,
    Supersede,
}

/// Who asked for a run: a user's job file, or the corpus's retraining policy (the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    #[default]
    User,
    Policy,
}

/// The effective job: what `runs/<id>/job.json` holds. Data paths are absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub corpus: CorpusName,
    pub model: String,
    pub data: Data,
    pub train: Train,
    pub lora: Lora,
    pub eval: Eval,
    pub promote: Promote,
    pub device: DeviceChoice,
    /// The effective budget: the job's own, else the daemon's default at intake. Never absent in
    /// a run's job.json (an old one without it reads as the machine's default).
    #[serde(deserialize_with = "budget_or_default", default = "crate::budget::machine_default_mb")]
    pub memory_budget_mb: u64,
    pub if_busy: IfBusy,
    pub instruction: Option<String>,
    #[serde(default)]
    pub origin: Origin,
    /// A command run after this run ends (instead of config.toml's `on_finish`).
    #[serde(default)]
    pub on_finish: Option<String>,
}

pub const DEFAULT_MODEL: &str = "Qwen/Qwen3-Reranker-0.6B";
pub const METRICS: [&str; 4] = ["ndcg@10", "mrr@10", "recall@10", "map"];
/// A job file is a few hundred bytes; anything past this is not a job.
pub const MAX_JOB_BYTES: u64 = 1 << 20;

/// `[A-Za-z0-9._-]{1,64}`, no leading dot.
use crate::ids::CorpusName;

/// A JSON object whose keys are checked off as they are read, so unknown ones can be named.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    seen: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Self, JobError> {
        match v.as_object() {
            Some(map) => Ok(Self { map, path: path.to_string(), seen: Vec::new() }),
            None => Err(JobError::at(if path.is_empty() { "(root)" } else { path }, "must be a JSON object", None)),
        }
    }
    fn field(&self, k: &str) -> String {
        if self.path.is_empty() { k.to_string() } else { format!("{}.{k}", self.path) }
    }
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.seen.push(k);
        self.map.get(k).filter(|v| !v.is_null())
    }
    fn int(&mut self, k: &'static str, default: u64, lo: u64, hi: u64) -> Result<u64, JobError> {
        Ok(self.opt_int(k, lo, hi)?.unwrap_or(default))
    }
    fn opt_int(&mut self, k: &'static str, lo: u64, hi: u64) -> Result<Option<u64>, JobError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
                _ => Err(JobError::at(&self.field(k), format!("must be an integer from {lo} to {hi}, got {v}"), None)),
            },
        }
    }
    fn num(&mut self, k: &'static str, default: f64, lo: f64, hi: f64, hi_open: bool) -> Result<f64, JobError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x >= lo && (x < hi || (!hi_open && x == hi)) => Ok(x),
                _ => {
                    let range = if hi_open { format!("[{lo}, {hi})") } else { format!("[{lo}, {hi}]") };
                    Err(JobError::at(&self.field(k), format!("must be a number in {range}, got {v}"), None))
                }
            },
        }
    }
    fn string(&mut self, k: &'static str) -> Result<Option<&'a str>, JobError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(JobError::at(&self.field(k), format!("must be a string, got {v}"), None)),
        }
    }
    fn choice<T>(&mut self, k: &'static str, default: T, options: &[(&str, T)]) -> Result<T, JobError>
    where
        T: Copy,
    {
        match self.string(k)? {
            None => Ok(default),
            Some(s) => options.iter().find(|(n, _)| *n == s).map(|(_, t)| *t).ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                JobError::at(
                    &self.field(k),
                    format!("unknown value `{s}`"),
                    Some(&format!("one of {}", names.join(", "))),
                )
            }),
        }
    }
    fn finish(self) -> Result<(), JobError> {
        match self.map.keys().find(|k| !self.seen.contains(&k.as_str())) {
            Some(k) => Err(JobError::at(
                &self.field(k),
                "unknown field",
                Some(&format!("known fields here: {}", self.seen.join(", "))),
            )),
            None => Ok(()),
        }
    }
}

/// Parses and validates a job file's text. `corpus_home(corpus)` is where relative data paths
/// resolve (ROOT/corpora/<corpus>/); data files must exist and be readable.
fn budget_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or_else(crate::budget::machine_default_mb))
}

/// Validates a spool job file into the effective job; `default_budget_mb` fills a missing
/// `memory_budget_mb`.
pub fn parse_job(
    text: &str,
    corpus_home: impl Fn(&CorpusName) -> PathBuf,
    default_budget_mb: u64,
) -> Result<Job, JobError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        JobError::whole(format!("not valid JSON: {e}"), Some("a job file is one JSON object, see docs/operations.md"))
    })?;
    let mut o = Obj::new(&v, "")?;
    let corpus = o.string("corpus")?.ok_or_else(|| JobError::at("corpus", "is required", None))?;
    let corpus = CorpusName::parse(corpus)
        .map_err(|e| JobError::at("corpus", format!("`{}` is not a valid corpus name", e.shown), Some(e.rule)))?;
    let home = corpus_home(&corpus);
    let model = o.string("model")?.unwrap_or(DEFAULT_MODEL).to_string();
    if model.is_empty() {
        return Err(JobError::at("model", "must not be empty", None));
    }
    let data = parse_data(
        o.get("data").ok_or_else(|| {
            JobError::at(
                "data",
                "is required",
                Some("{\"triplets\": path} or {\"feedback\": path, \"documents\": path}"),
            )
        })?,
        &home,
    )?;
    let train = parse_train(o.get("train"))?;
    let lora = parse_lora(o.get("lora"))?;
    let eval = parse_eval(o.get("eval"))?;
    let promote = o.choice(
        "promote",
        Promote::IfSignificant,
        &[
            ("if_significant", Promote::IfSignificant),
            ("if_improves", Promote::IfImproves),
            ("always", Promote::Always),
            ("never", Promote::Never),
        ],
    )?;
    let device = o.choice(
        "device",
        DeviceChoice::Auto,
        &[
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda),
            ("metal", DeviceChoice::Metal),
        ],
    )?;
    let memory_budget_mb =
        o.opt_int("memory_budget_mb", crate::budget::MIN_MB, crate::budget::MAX_MB)?.unwrap_or(default_budget_mb);
    let if_busy = o.choice(
        "if_busy",
        IfBusy::Queue,
        &[("queue", IfBusy::Queue), ("reject", IfBusy::Reject), ("supersede", IfBusy::Supersede)],
    )?;
    let instruction = o.string("instruction")?.map(str::to_string);
    let origin = o.choice("origin", Origin::User, &[("user", Origin::User), ("policy", Origin::Policy)])?;
    let on_finish = o.string("on_finish")?.map(str::to_string);
    if on_finish.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(JobError::at("on_finish", "must be a command, got an empty string", None));
    }
    o.finish()?;
    Ok(Job {
        corpus,
        model,
        data,
        train,
        lora,
        eval,
        promote,
        device,
        memory_budget_mb,
        if_busy,
        instruction,
        origin,
        on_finish,
    })
}

fn data_path(o: &mut Obj, k: &'static str, home: &Path, dir_ok: bool) -> Result<PathBuf, JobError> {
    let s = o.string(k)?.ok_or_else(|| JobError::at(&o.field(k), "is required", None))?;
    if s.is_empty() {
        return Err(JobError::at(&o.field(k), "must not be empty", None));
    }
    let p = Path::new(s);
    let p = if p.is_absolute() { p.to_path_buf() } else { home.join(p) };
    let meta = std::fs::metadata(&p).map_err(|e| {
        JobError::at(
            &o.field(k),
            format!("cannot read {}: {e}", p.display()),
            Some("relative paths resolve in ROOT/corpora/<corpus>/"),
        )
    })?;
    if meta.is_dir() {
        if !dir_ok {
            return Err(JobError::at(
                &o.field(k),
                format!("{} is a directory, expected a JSONL file", p.display()),
                None,
            ));
        }
        std::fs::read_dir(&p)
            .map_err(|e| JobError::at(&o.field(k), format!("cannot list {}: {e}", p.display()), None))?;
    } else if !meta.is_file() {
        // A FIFO would block whoever opens it; a device could stream forever.
        return Err(JobError::at(
            &o.field(k),
            format!("{} is not a regular file (a FIFO, device or socket)", p.display()),
            None,
        ));
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: should the path turn into a FIFO after the check, opening still returns.
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .map_err(|e| JobError::at(&o.field(k), format!("cannot open {}: {e}", p.display()), None))?;
    }
    Ok(p)
}

fn parse_data(v: &Value, home: &Path) -> Result<Data, JobError> {
    let mut o = Obj::new(v, "data")?;
    let (has_t, has_f) = (o.map.contains_key("triplets"), o.map.contains_key("feedback"));
    let hint = Some("{\"triplets\": path} or {\"feedback\": path, \"documents\": path}");
    if has_t == has_f {
        let msg = if has_t {
            "give `triplets` or `feedback`, not both"
        } else {
            "needs `triplets`, or `feedback` and `documents`"
        };
        return Err(JobError::at("data", msg, hint));
    }
    if has_f && !o.map.contains_key("documents") {
        return Err(JobError::at("data.documents", "is required with `feedback`", hint));
    }
    let triplets = if has_t { Some(data_path(&mut o, "triplets", home, false)?) } else { None };
    let feedback = if has_f { Some(data_path(&mut o, "feedback", home, false)?) } else { None };
    let documents =
        if o.map.contains_key("documents") { Some(data_path(&mut o, "documents", home, true)?) } else { None };
    let doc_chars = o.int("doc_chars", 2000, 1, 1_000_000)?;
    o.finish()?;
    Ok(Data { triplets, feedback, documents, doc_chars })
}

fn parse_train(v: Option<&Value>) -> Result<Train, JobError> {
    let empty = Value::Object(Map::new());
    let mut o = Obj::new(v.unwrap_or(&empty), "train")?;
    let t = Train {
        epochs: o.int("epochs", 2, 1, 1000)?,
        batch_size: o.int("batch_size", 16, 1, 4096)?,
        grad_accum: o.int("grad_accum", 1, 1, 4096)?,
        max_length: o.int("max_length", 512, 32, 32768)?,
        lr: o.num("lr", 2e-5, 1e-9, 1.0, false)?,
        warmup_ratio: o.num("warmup_ratio", 0.1, 0.0, 1.0, true)?,
        negative_ratio: o.int("negative_ratio", 5, 1, 1000)?,
        seed: o.int("seed", 0, 0, u64::MAX)?,
        max_grad_norm: o.num("max_grad_norm", 1.0, 0.0, 1e6, false)?,
        weight_decay: o.num("weight_decay", 0.0, 0.0, 1.0, true)?,
        checkpoint_every_s: o.int("checkpoint_every_s", default_checkpoint_every_s(), 0, 7 * 86_400)?,
        hard_negatives: match o.get("hard_negatives") {
            None => None,
            Some(v) => Some(parse_hard_negatives(v)?),
        },
    };
    o.finish()?;
    Ok(t)
}

fn parse_hard_negatives(v: &Value) -> Result<HardNegatives, JobError> {
    let mut o = Obj::new(v, "train.hard_negatives")?;
    o.choice("from", (), &[("baseline", ())])?;
    let h = HardNegatives {
        top_k: o.int("top_k", 20, 1, 1000)?,
        skip_top: o.int("skip_top", 2, 0, 1000)?,
        pool: o.int("pool", 100, 2, 100_000)?,
        max_pairs: o.int("max_pairs", 20_000, 1, 10_000_000)?,
    };
    o.finish()?;
    Ok(h)
}

fn parse_lora(v: Option<&Value>) -> Result<Lora, JobError> {
    let empty = Value::Object(Map::new());
    let mut o = Obj::new(v.unwrap_or(&empty), "lora")?;
    let r = o.int("r", 16, 1, 1024)?;
    let alpha = o.num("alpha", 2.0 * r as f64, 1e-6, 1e6, false)?;
    let dropout = o.num("dropout", 0.05, 0.0, 1.0, true)?;
    let target_modules = match o.get("target_modules") {
        None => vec![Target::Q, Target::K, Target::V, Target::O],
        Some(Value::Array(a)) if !a.is_empty() => {
            let parse = |t: &Value| {
                t.as_str().and_then(Target::parse).ok_or_else(|| {
                    JobError::at(
                        "lora.target_modules",
                        format!("unknown module {t}"),
                        Some("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
                    )
                })
            };
            a.iter().map(parse).collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(JobError::at("lora.target_modules", "must be a non-empty list of module names", None)),
    };
    o.finish()?;
    Ok(Lora { r, alpha, dropout, target_modules })
}

fn parse_eval(v: Option<&Value>) -> Result<Eval, JobError> {
    let empty = Value::Object(Map::new());
    let mut o = Obj::new(v.unwrap_or(&empty), "eval")?;
    let primary_metric = o.string("primary_metric")?.unwrap_or("ndcg@10").to_string();
    if !METRICS.contains(&primary_metric.as_str()) {
        return Err(JobError::at(
            "eval.primary_metric",
            format!("unknown metric `{primary_metric}`"),
            Some("ndcg@10, mrr@10, recall@10 or map"),
        ));
    }
    let e = Eval {
        primary_metric,
        dev_fraction: o.num("dev_fraction", 0.1, 0.0, 0.9, false)?,
        list_size: o.int("list_size", 20, 2, 1000)?,
        epsilon: o.num("epsilon", 0.0, 0.0, 1.0, false)?,
        min_dev_queries: o.int("min_dev_queries", default_min_dev_queries(), 0, 100_000)?,
        confidence: o.num("confidence", default_confidence(), 0.5, 1.0, true)?,
        resamples: o.int("resamples", default_resamples(), 100, 1_000_000)?,
        heldout_max_queries: o.int("heldout_max_queries", default_heldout_max_queries(), 0, 100_000)?,
    };
    o.finish()?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, home: &Path) -> Result<Job, JobError> {
        parse_job(text, |_| home.to_path_buf(), 4096)
    }

    #[test]
    fn an_unknown_target_module_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.jsonl"), "").unwrap();
        let text =
            r#"{"corpus": "c", "data": {"triplets": "t.jsonl"}, "lora": {"target_modules": ["q_proj", "lm_head"]}}"#;
        let e = parse(text, dir.path()).unwrap_err();
        assert!(e.error.contains("lm_head"), "{e}");
        // A FIFO as a data file is refused at intake, never opened.
        let fifo = dir.path().join("f.jsonl");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = parse(r#"{"corpus": "c", "data": {"triplets": "f.jsonl"}}"#, dir.path()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("data.triplets"));
    }

    #[test]
    fn defaults_and_errors_name_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.jsonl"), "").unwrap();
        let j = parse(r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}}"#, dir.path()).unwrap();
        assert_eq!(j.model, DEFAULT_MODEL);
        assert_eq!(j.train.batch_size, 16);
        assert_eq!(j.data.triplets, Some(dir.path().join("t.jsonl")));
        assert_eq!(j.data.doc_chars, 2000);
        let cases = [
            (r#"[1]"#, "(root)"),
            (r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "colour": 1}"#, "colour"),
            (r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "train": {"epochs": "2"}}"#, "train.epochs"),
            (r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "train": {"lr": -1}}"#, "train.lr"),
            (r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "train": {"batch_size": 1e12}}"#, "train.batch_size"),
            (r#"{"corpus": "../x", "data": {"triplets": "t.jsonl"}}"#, "corpus"),
            (r#"{"corpus": "", "data": {"triplets": "t.jsonl"}}"#, "corpus"),
            (r#"{"corpus": "c1", "data": {"triplets": "missing.jsonl"}}"#, "data.triplets"),
            (
                r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "lora": {"target_modules": ["qq"]}}"#,
                "lora.target_modules",
            ),
            (r#"{"corpus": "c1", "data": {"triplets": "t.jsonl"}, "if_busy": "maybe"}"#, "if_busy"),
        ];
        for (text, field) in cases {
            let e = parse(text, dir.path()).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
        }
        assert!(parse("not json", dir.path()).unwrap_err().error.contains("not valid JSON"));
    }
}
