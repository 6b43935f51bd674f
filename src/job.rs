//! The job file: deserialized from what a user dropped into a raw [`JobFile`] of optional fields
//! (the one schema of what a user may write), then resolved once into the effective [`Job`] with
//! every range checked, every default filled in and every data path made absolute and checked.
//! Every rejection names the field (crate::settings).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::CorpusName;

use crate::model::device::DeviceChoice;
use crate::model::lora::Target;
use crate::settings::{SettingsError, Upper, command, from_json, int, num};

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

/// What a job file may hold, as written: every field optional, unknown ones refused, enum
/// spellings from serde. [`JobFile::resolve`] makes the effective [`Job`] of it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    corpus: Option<String>,
    model: Option<String>,
    data: Option<DataFile>,
    train: Option<TrainFile>,
    lora: Option<LoraFile>,
    eval: Option<EvalFile>,
    promote: Option<Promote>,
    device: Option<DeviceChoice>,
    memory_budget_mb: Option<u64>,
    if_busy: Option<IfBusy>,
    instruction: Option<String>,
    origin: Option<Origin>,
    on_finish: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    triplets: Option<String>,
    feedback: Option<String>,
    documents: Option<String>,
    doc_chars: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainFile {
    epochs: Option<u64>,
    batch_size: Option<u64>,
    grad_accum: Option<u64>,
    max_length: Option<u64>,
    lr: Option<f64>,
    warmup_ratio: Option<f64>,
    negative_ratio: Option<u64>,
    seed: Option<u64>,
    max_grad_norm: Option<f64>,
    weight_decay: Option<f64>,
    checkpoint_every_s: Option<u64>,
    hard_negatives: Option<HardNegativesFile>,
}

/// Where hard negatives come from: only the baseline today.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum NegativesFrom {
    Baseline,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HardNegativesFile {
    #[allow(dead_code)]
    from: Option<NegativesFrom>,
    top_k: Option<u64>,
    skip_top: Option<u64>,
    pool: Option<u64>,
    max_pairs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraFile {
    r: Option<u64>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    target_modules: Option<Vec<Target>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalFile {
    primary_metric: Option<String>,
    dev_fraction: Option<f64>,
    list_size: Option<u64>,
    epsilon: Option<f64>,
    min_dev_queries: Option<u64>,
    confidence: Option<f64>,
    resamples: Option<u64>,
    heldout_max_queries: Option<u64>,
}

/// A run's job.json written before budgets were recorded reads as the machine's default.
fn budget_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or_else(crate::budget::machine_default_mb))
}

const DATA_HINT: &str = "{\"triplets\": path} or {\"feedback\": path, \"documents\": path}";

/// Parses and validates a spool job file's text into the effective job. `corpus_home(corpus)` is
/// where relative data paths resolve (ROOT/corpora/<corpus>/; data files must exist and be
/// readable); `default_budget_mb` fills a missing `memory_budget_mb`.
pub fn parse_job(
    text: &str,
    corpus_home: impl Fn(&CorpusName) -> PathBuf,
    default_budget_mb: u64,
) -> Result<Job, SettingsError> {
    let raw: JobFile =
        from_json(text.as_bytes()).map_err(|e| e.hint("a job file is one JSON object, see docs/operations.md"))?;
    raw.resolve(corpus_home, default_budget_mb)
}

impl JobFile {
    /// Checks every range, fills every default, resolves and checks the data paths.
    pub fn resolve(
        self,
        corpus_home: impl Fn(&CorpusName) -> PathBuf,
        default_budget_mb: u64,
    ) -> Result<Job, SettingsError> {
        let corpus = self.corpus.ok_or_else(|| SettingsError::at("corpus", "is required"))?;
        let corpus = CorpusName::parse(&corpus).map_err(|e| {
            SettingsError::at("corpus", format!("`{}` is not a valid corpus name", e.shown)).hint(e.rule)
        })?;
        let home = corpus_home(&corpus);
        let model = self.model.unwrap_or_else(|| DEFAULT_MODEL.to_string());
        if model.is_empty() {
            return Err(SettingsError::at("model", "must not be empty"));
        }
        let data = self.data.ok_or_else(|| SettingsError::at("data", "is required").hint(DATA_HINT))?.resolve(&home)?;
        Ok(Job {
            corpus,
            model,
            data,
            train: self.train.unwrap_or_default().resolve()?,
            lora: self.lora.unwrap_or_default().resolve()?,
            eval: self.eval.unwrap_or_default().resolve()?,
            promote: self.promote.unwrap_or(Promote::IfSignificant),
            device: self.device.unwrap_or_default(),
            memory_budget_mb: int(
                "memory_budget_mb",
                self.memory_budget_mb,
                crate::budget::MIN_MB,
                crate::budget::MAX_MB,
                default_budget_mb,
            )?,
            if_busy: self.if_busy.unwrap_or(IfBusy::Queue),
            instruction: self.instruction,
            origin: self.origin.unwrap_or_default(),
            on_finish: command("on_finish", self.on_finish)?,
        })
    }
}

/// A data file the job names: absolute (relative ones resolve in the corpus home), present, and
/// a regular file that opens without blocking (or, where `dir_ok`, a listable directory).
fn data_path(field: &str, s: String, home: &Path, dir_ok: bool) -> Result<PathBuf, SettingsError> {
    let at = |m: String| SettingsError::at(field, m);
    if s.is_empty() {
        return Err(at("must not be empty".into()));
    }
    let p = Path::new(&s);
    let p = if p.is_absolute() { p.to_path_buf() } else { home.join(p) };
    let meta = std::fs::metadata(&p).map_err(|e| {
        at(format!("cannot read {}: {e}", p.display())).hint("relative paths resolve in ROOT/corpora/<corpus>/")
    })?;
    if meta.is_dir() {
        if !dir_ok {
            return Err(at(format!("{} is a directory, expected a JSONL file", p.display())));
        }
        std::fs::read_dir(&p).map_err(|e| at(format!("cannot list {}: {e}", p.display())))?;
    } else if !meta.is_file() {
        // A FIFO would block whoever opens it; a device could stream forever.
        return Err(at(format!("{} is not a regular file (a FIFO, device or socket)", p.display())));
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: should the path turn into a FIFO after the check, opening still returns.
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .map_err(|e| at(format!("cannot open {}: {e}", p.display())))?;
    }
    Ok(p)
}

impl DataFile {
    fn resolve(self, home: &Path) -> Result<Data, SettingsError> {
        let (has_t, has_f) = (self.triplets.is_some(), self.feedback.is_some());
        if has_t == has_f {
            let msg = if has_t {
                "give `triplets` or `feedback`, not both"
            } else {
                "needs `triplets`, or `feedback` and `documents`"
            };
            return Err(SettingsError::at("data", msg).hint(DATA_HINT));
        }
        if has_f && self.documents.is_none() {
            return Err(SettingsError::at("data.documents", "is required with `feedback`").hint(DATA_HINT));
        }
        let path = |field, v: Option<String>, dir_ok| v.map(|s| data_path(field, s, home, dir_ok)).transpose();
        Ok(Data {
            triplets: path("data.triplets", self.triplets, false)?,
            feedback: path("data.feedback", self.feedback, false)?,
            documents: path("data.documents", self.documents, true)?,
            doc_chars: int("data.doc_chars", self.doc_chars, 1, 1_000_000, 2000)?,
        })
    }
}

impl TrainFile {
    fn resolve(self) -> Result<Train, SettingsError> {
        Ok(Train {
            epochs: int("train.epochs", self.epochs, 1, 1000, 2)?,
            batch_size: int("train.batch_size", self.batch_size, 1, 4096, 16)?,
            grad_accum: int("train.grad_accum", self.grad_accum, 1, 4096, 1)?,
            max_length: int("train.max_length", self.max_length, 32, 32768, 512)?,
            lr: num("train.lr", self.lr, 1e-9, Upper::Closed(1.0), 2e-5)?,
            warmup_ratio: num("train.warmup_ratio", self.warmup_ratio, 0.0, Upper::Open(1.0), 0.1)?,
            negative_ratio: int("train.negative_ratio", self.negative_ratio, 1, 1000, 5)?,
            seed: self.seed.unwrap_or(0),
            max_grad_norm: num("train.max_grad_norm", self.max_grad_norm, 0.0, Upper::Closed(1e6), 1.0)?,
            weight_decay: num("train.weight_decay", self.weight_decay, 0.0, Upper::Open(1.0), 0.0)?,
            checkpoint_every_s: int(
                "train.checkpoint_every_s",
                self.checkpoint_every_s,
                0,
                7 * 86_400,
                default_checkpoint_every_s(),
            )?,
            hard_negatives: self.hard_negatives.map(HardNegativesFile::resolve).transpose()?,
        })
    }
}

impl HardNegativesFile {
    fn resolve(self) -> Result<HardNegatives, SettingsError> {
        let f = |k: &str| format!("train.hard_negatives.{k}");
        Ok(HardNegatives {
            top_k: int(&f("top_k"), self.top_k, 1, 1000, 20)?,
            skip_top: int(&f("skip_top"), self.skip_top, 0, 1000, 2)?,
            pool: int(&f("pool"), self.pool, 2, 100_000, 100)?,
            max_pairs: int(&f("max_pairs"), self.max_pairs, 1, 10_000_000, 20_000)?,
        })
    }
}

impl LoraFile {
    fn resolve(self) -> Result<Lora, SettingsError> {
        let r = int("lora.r", self.r, 1, 1024, 16)?;
        let target_modules = match self.target_modules {
            None => vec![Target::Q, Target::K, Target::V, Target::O],
            Some(t) if t.is_empty() => {
                return Err(SettingsError::at("lora.target_modules", "must be a non-empty list of module names")
                    .hint("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"));
            }
            Some(t) => t,
        };
        Ok(Lora {
            r,
            alpha: num("lora.alpha", self.alpha, 1e-6, Upper::Closed(1e6), 2.0 * r as f64)?,
            dropout: num("lora.dropout", self.dropout, 0.0, Upper::Open(1.0), 0.05)?,
            target_modules,
        })
    }
}

impl EvalFile {
    fn resolve(self) -> Result<Eval, SettingsError> {
        let primary_metric = self.primary_metric.unwrap_or_else(|| "ndcg@10".to_string());
        if !METRICS.contains(&primary_metric.as_str()) {
            return Err(SettingsError::at("eval.primary_metric", format!("unknown metric `{primary_metric}`"))
                .hint("ndcg@10, mrr@10, recall@10 or map"));
        }
        Ok(Eval {
            primary_metric,
            dev_fraction: num("eval.dev_fraction", self.dev_fraction, 0.0, Upper::Closed(0.9), 0.1)?,
            list_size: int("eval.list_size", self.list_size, 2, 1000, 20)?,
            epsilon: num("eval.epsilon", self.epsilon, 0.0, Upper::Closed(1.0), 0.0)?,
            min_dev_queries: int("eval.min_dev_queries", self.min_dev_queries, 0, 100_000, default_min_dev_queries())?,
            confidence: num("eval.confidence", self.confidence, 0.5, Upper::Open(1.0), default_confidence())?,
            resamples: int("eval.resamples", self.resamples, 100, 1_000_000, default_resamples())?,
            heldout_max_queries: int(
                "eval.heldout_max_queries",
                self.heldout_max_queries,
                0,
                100_000,
                default_heldout_max_queries(),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, home: &Path) -> Result<Job, SettingsError> {
        parse_job(text, |_| home.to_path_buf(), 4096)
    }

    #[test]
    fn an_unknown_target_module_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.jsonl"), "").unwrap();
        let text =
            r#"{"corpus": "c", "data": {"triplets": "t.jsonl"}, "lora": {"target_modules": ["q_proj", "lm_head"]}}"#;
        let e = parse(text, dir.path()).unwrap_err();
        assert!(e.message.contains("lm_head"), "{e}");
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
        assert!(parse("not json", dir.path()).unwrap_err().message.contains("not valid JSON"));
    }
}
