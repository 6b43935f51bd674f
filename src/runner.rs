//! One run, in its own process (`rerankd run <run_dir>`): takes the corpus lock and holds it to
//! its last write, loads the model, materialises the training pairs, trains, saves the adapter,
//! and records every state change. A crash here costs this run only; the daemon records it.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::job::{Job, Promote};
use crate::model::checkpoint::{CheckpointDir, SafetensorsWeights};
use crate::model::lora::LoraConfig;
use crate::model::{LoraSet, Reranker};
use crate::store::atomic::{read_json, write_json};
use crate::store::feedback::CorpusFeedback;
use crate::store::models;
use crate::store::paths::RunFiles;
use crate::store::{self, FileLock, MetricsLog, Root, RunState, Status};
use crate::testhooks;
use crate::train::Cancelled;
use crate::train::data::TrainPair;
use crate::train::dataset::{
    DevList, Documents, Judged, QueryRows, TextPair, dev_lists, group_by_query, read_triplets, split_dev, train_pairs,
};
use crate::train::eval::{EvalResult, evaluate};
use crate::train::memory::{self, Estimate};
use crate::train::mining;
use crate::train::trainer::{Reporter, TrainConfig, train};

/// The run's view of its files while it runs.
pub struct RunContext {
    pub files: RunFiles,
    pub status: Status,
    pub log: MetricsLog,
    ignore_cancel: bool,
    /// Set by SIGTERM/SIGINT: treated like the cancel sentinel, at the next boundary.
    terminated: Arc<AtomicBool>,
}

impl RunContext {
    fn set_state(&mut self, state: RunState, reason: Option<String>, error: Option<String>) -> anyhow::Result<()> {
        store::record(&self.files, &mut self.log, &mut self.status, state, reason, error)?;
        Ok(())
    }

    pub fn info(&mut self, message: &str) -> anyhow::Result<()> {
        self.log.append("log", json!({"level": "info", "message": message}))?;
        Ok(())
    }

    fn warn(&mut self, message: &str, extra: Value) -> anyhow::Result<()> {
        let mut ev = json!({"level": "warn", "message": message});
        if let (Value::Object(e), Value::Object(x)) = (&mut ev, extra) {
            e.extend(x);
        }
        self.log.append("log", ev)?;
        Ok(())
    }

    /// `Err(Cancelled)` if cancellation was requested.
    fn check_cancel(&mut self) -> anyhow::Result<()> {
        crate::train::check_cancel(self)
    }
}

impl Reporter for RunContext {
    fn event(&mut self, kind: &str, fields: Value) -> anyhow::Result<()> {
        self.log.append(kind, fields)?;
        Ok(())
    }

    fn cancel_requested(&mut self) -> Option<String> {
        if self.ignore_cancel {
            return None;
        }
        self.files.cancel_requested().or_else(|| {
            self.terminated.load(Ordering::Relaxed).then(|| "terminated by a signal (SIGTERM/SIGINT)".to_string())
        })
    }

    fn peak_mem_mb(&mut self) -> u64 {
        crate::sys::peak_memory_mb()
    }
}

/// Entry point of `rerankd run`. Returns the process exit code, 0, once the run has recorded its
/// terminal state itself (completed, failed or cancelled); an error only when it could not even
/// read or write its own files (the daemon then records the death, with this error as the
/// process's last words). `nice`: the CPU priority to lower itself to first.
pub fn run(root: &Root, run_dir: &Path, nice: Option<i32>) -> anyhow::Result<i32> {
    if let Some(n) = nice
        && let Err(e) = crate::sys::lower_priority(n)
    {
        eprintln!("rerankd run: could not lower priority to nice {n}: {e}");
    }
    let files = RunFiles::new(run_dir);
    let status = Status::read(&files.status())?;
    if status.state.is_terminal() {
        return Ok(0);
    }
    let ignore_cancel = testhooks::ignore_cancel();
    let terminated = Arc::new(AtomicBool::new(false));
    if ignore_cancel {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    } else {
        // A SIGTERM (the daemon's escalation, or a service manager signalling the whole group)
        // ends the run at its next boundary, recorded, rather than mid-write.
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&terminated))?;
        }
    }
    let lock_path = root.corpus_lock(&status.corpus);
    let log = MetricsLog::open(&files.metrics(), &status.run_id)?;
    let mut ctx = RunContext { files, status, log, ignore_cancel, terminated };
    // The daemon starts a run only when the lock is free, but a `promote`/`rollback` by hand may
    // hold it for a moment: wait a little before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut lock = loop {
        if let Some(l) = FileLock::try_acquire(&lock_path)? {
            break l;
        }
        if std::time::Instant::now() >= deadline {
            let msg =
                format!("corpus `{}` stayed locked by another process ({})", ctx.status.corpus, lock_path.display());
            ctx.set_state(RunState::Failed, None, Some(msg))?;
            return Ok(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    lock.write_pid()?;
    ctx.set_state(RunState::Running, None, None)?;
    testhooks::crash_point("run.after_running");
    let _ballast: Vec<u8> = testhooks::alloc_mb().map(|mb| vec![1u8; mb << 20]).unwrap_or_default();
    let outcome = execute(&mut ctx, root);
    let result = match outcome {
        Ok(summary) => {
            ctx.status.summary = Some(summary);
            ctx.set_state(RunState::Completed, None, None)
        }
        Err(e) => {
            let ended = match e.downcast_ref::<Cancelled>() {
                Some(Cancelled(reason)) => (RunState::Cancelled, Some(reason.clone()), None),
                None => (RunState::Failed, None, Some(format!("{e:#}"))),
            };
            // A run that promoted itself and then failed must not stay current.
            let why = format!("{} did not complete", ctx.status.run_id);
            if let Err(u) = models::undo(root, &ctx.status.corpus, &ctx.status.run_id, &why) {
                eprintln!("rerankd run: undoing the promotion: {u}");
            }
            ctx.set_state(ended.0, ended.1, ended.2)
        }
    };
    drop(lock); // after the last write
    result.map(|_| 0)
}

/// What the baseline is: the corpus's promoted adapter, the base model, or unknown (it could not
/// be evaluated; `if_improves` then does not promote).
enum Baseline {
    Known {
        what: String,
        metrics: BTreeMap<String, f64>,
    },
    Unknown(String),
    /// No dev split, and why.
    NotEvaluated(String),
}

fn execute(ctx: &mut RunContext, root: &Root) -> anyhow::Result<Value> {
    ctx.check_cancel()?;
    let job: Job = read_json(&ctx.files.job())?;
    let device = job.device.open()?;
    let ck = CheckpointDir::resolve(&job.model)?; // its errors name the model already
    let job = govern(ctx, job, &ck)?;
    ctx.info(&format!("loading model {} on {:?}", job.model, device.location()))?;
    let mut r = Reranker::open(&ck, &device).with_context(|| format!("loading model `{}`", job.model))?;
    if let Some(i) = &job.instruction {
        r.instruction = i.clone();
    }
    let max_len = job.train.max_length as usize;
    let data = materialise(ctx, root, &job)?;
    ctx.check_cancel()?;
    let pairs: Vec<TrainPair> = data
        .train_pairs
        .iter()
        .map(|p| Ok(TrainPair { ids: r.encode(&p.query, &p.doc, max_len)?, label: p.label }))
        .collect::<anyhow::Result<_>>()?;
    ctx.check_cancel()?;
    let baseline = evaluate_baseline(ctx, root, &job, &r, &data)?;
    ctx.check_cancel()?;
    let trained = train_and_select(ctx, &job, &r, &pairs, &data.dev_lists)?;
    let primary = &job.eval.primary_metric;
    let cand_metric = trained.best.as_ref().and_then(|(_, res)| res.metrics.get(primary).copied());
    let base_metric = match &baseline {
        Baseline::Known { metrics, .. } => metrics.get(primary).copied(),
        _ => None,
    };
    write_outputs(ctx, &job, &r, &trained, &baseline, &data)?;
    ctx.check_cancel()?;

    let eps = job.eval.epsilon;
    let (promote, reason) = decide(job.promote, cand_metric, base_metric, eps, primary, &baseline);
    let mut path = Value::Null;
    if promote {
        let details = json!({"primary": primary, "candidate": cand_metric, "baseline": base_metric, "reason": reason});
        let dest = models::promote(root, &job.corpus, &ctx.status.run_id, &ctx.files.adapter(), "auto", details)?;
        path = dest.display().to_string().into();
    }
    ctx.log.append(
        "promote",
        json!({"promoted": promote, "primary": primary, "candidate": cand_metric,
        "baseline": base_metric, "epsilon": eps, "path": path, "reason": reason}),
    )?;
    testhooks::crash_point("run.after_promote_event");
    Ok(json!({"steps": trained.steps, "last_loss": trained.last_loss, "pairs": pairs.len(),
        "dev_queries": data.dev_lists.len(), "primary_metric": primary, "candidate": cand_metric,
        "baseline": base_metric, "promoted": promote}))
}

/// The memory governor, before anything big is loaded: estimates one micro-step from the
/// checkpoint's config and picks the largest micro-batch (then max_length) under the budget,
/// keeping the effective batch. Every change is a `cap` event; the returned job carries them.
fn govern(ctx: &mut RunContext, mut job: Job, ck: &CheckpointDir) -> anyhow::Result<Job> {
    let cfg = ck.read_config()?;
    let embed_bytes = SafetensorsWeights::open(&ck.weights, &candle_core::Device::Cpu)?
        .dtype_bytes("model.embed_tokens.weight")
        .unwrap_or(4) as u64;
    let est = Estimate::for_model(&cfg, lora_config(&job).param_count(&cfg), embed_bytes);
    let budget = job.memory_budget_mb;
    let t = &job.train;
    let p = memory::plan(&est, budget, t.batch_size as usize, t.grad_accum as usize, t.max_length as usize)
        .map_err(|e| anyhow::anyhow!("memory governor: {e}; raise memory_budget_mb or use a smaller model"))?;
    ctx.info(&format!(
        "memory: a micro-step of {} x {} tokens needs about {:.0} MB of the {budget} MB budget",
        p.micro_batch, p.max_length, p.estimate_mb
    ))?;
    for cap in &p.caps {
        ctx.log.append("cap", serde_json::to_value(cap)?)?;
    }
    job.train.batch_size = p.micro_batch as u64;
    job.train.grad_accum = p.grad_accum as u64;
    job.train.max_length = p.max_length as u64;
    Ok(job)
}

fn lora_config(job: &Job) -> LoraConfig {
    LoraConfig::new(job.lora.r as usize, job.lora.alpha, job.lora.dropout, &job.lora.target_modules)
}

/// Scores the dev lists with the corpus's promoted adapter, or the base model when none is
/// promoted.
fn evaluate_baseline(
    ctx: &mut RunContext,
    root: &Root,
    job: &Job,
    r: &Reranker,
    data: &Materialised,
) -> anyhow::Result<Baseline> {
    let lists = &data.dev_lists;
    if let Some(why) = &data.no_dev {
        return Ok(Baseline::NotEvaluated(why.clone()));
    }
    let (what, adapter) = match models::current(root, &job.corpus) {
        None => ("base model".to_string(), Ok(None)),
        Some((id, dir)) => (format!("promoted adapter of {id}"), load_baseline_adapter(&dir, job, r).map(Some)),
    };
    let adapter = match adapter {
        Ok(a) => a,
        Err(why) => {
            ctx.warn(&format!("baseline unknown: {why}"), Value::Null)?;
            return Ok(Baseline::Unknown(why));
        }
    };
    let max_len = job.train.max_length as usize;
    let res = evaluate(r, adapter.as_ref(), lists, max_len, &mut || ctx.cancel_requested())?;
    ctx.log.append("eval", json!({"split": "dev", "which": "baseline", "metrics": res.metrics, "adapter": what}))?;
    Ok(Baseline::Known { what, metrics: res.metrics })
}

/// The outcome of training: the best epoch on dev (the candidate) and every epoch's metrics.
struct Trained {
    steps: usize,
    last_loss: f32,
    /// (epoch, its evaluation); None when there is no dev split.
    best: Option<(usize, EvalResult)>,
    candidate: LoraSet,
    epochs: Vec<Value>,
}

/// Trains, evaluating every epoch on dev and keeping the best epoch's adapter (by the locked
/// primary metric).
fn train_and_select(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    pairs: &[TrainPair],
    lists: &[DevList],
) -> anyhow::Result<Trained> {
    let lora = LoraSet::init(&lora_config(job), &r.model.cfg, job.train.seed, r.model.device())?;
    let cfg = TrainConfig {
        epochs: job.train.epochs as usize,
        micro_batch: job.train.batch_size as usize,
        grad_accum: job.train.grad_accum as usize,
        lr: job.train.lr,
        warmup_ratio: job.train.warmup_ratio,
        seed: job.train.seed,
        max_grad_norm: job.train.max_grad_norm,
        weight_decay: job.train.weight_decay,
        dropout: job.lora.dropout,
    };
    let (primary, max_len) = (&job.eval.primary_metric, job.train.max_length as usize);
    let mut best: Option<(usize, EvalResult, LoraSet)> = None;
    let mut epochs: Vec<Value> = Vec::new();
    let mut after_epoch = |epoch: usize, rep: &mut dyn Reporter| -> anyhow::Result<()> {
        if lists.is_empty() {
            return Ok(());
        }
        let res = evaluate(r, Some(&lora), lists, max_len, &mut || rep.cancel_requested())?;
        rep.event("eval", json!({"split": "dev", "which": "epoch", "epoch": epoch, "metrics": res.metrics}))?;
        epochs.push(json!({"epoch": epoch, "metrics": res.metrics}));
        let m = |r: &EvalResult| r.metrics.get(primary).copied().unwrap_or(f64::NEG_INFINITY);
        if best.as_ref().is_none_or(|(_, b, _)| m(&res) > m(b)) {
            best = Some((epoch, res, lora.snapshot()?));
        }
        Ok(())
    };
    let done = train(r, &lora, pairs, &cfg, ctx, &mut after_epoch)?;
    let (steps, last_loss) = (done.steps, done.last_loss);
    let (best, candidate) = match best {
        Some((e, res, l)) => (Some((e, res)), l),
        None => (None, lora),
    };
    if let Some((epoch, res)) = &best {
        ctx.log
            .append("eval", json!({"split": "dev", "which": "candidate", "epoch": epoch, "metrics": res.metrics}))?;
    }
    Ok(Trained { steps, last_loss, best, candidate, epochs })
}

/// The candidate adapter with its manifest, and `eval.json`.
fn write_outputs(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    t: &Trained,
    baseline: &Baseline,
    data: &Materialised,
) -> anyhow::Result<()> {
    let cand = t.best.as_ref().map(|(_, res)| res);
    let best_epoch = t.best.as_ref().map(|(e, _)| *e);
    let manifest = json!({"model": job.model, "corpus": job.corpus, "run_id": ctx.status.run_id,
        "max_length": job.train.max_length, "instruction": r.instruction, "primary_metric": job.eval.primary_metric,
        "metrics": cand.map(|c| &c.metrics), "best_epoch": best_epoch});
    t.candidate.save(&ctx.files.adapter(), Some(&job.model))?;
    write_json(&ctx.files.adapter().join("manifest.json"), &manifest)?;
    let (base_what, base_metrics) = match baseline {
        Baseline::Known { what, metrics } => (what.clone(), Some(metrics)),
        Baseline::Unknown(why) => (format!("unknown: {why}"), None),
        Baseline::NotEvaluated(why) => (format!("not evaluated: {why}"), None),
    };
    let eval_doc = json!({"primary_metric": job.eval.primary_metric, "dev_queries": data.dev_lists.len(),
        "list_size": job.eval.list_size, "baseline": {"what": base_what, "metrics": base_metrics},
        "candidate": {"best_epoch": best_epoch, "metrics": cand.map(|c| &c.metrics)},
        "epochs": t.epochs, "lists": cand.map(|c| &c.lists), "skipped": data.skipped,
        "feedback": data.feedback});
    write_json(&ctx.files.eval(), &eval_doc)?;
    Ok(())
}

fn decide(
    policy: Promote,
    cand: Option<f64>,
    base: Option<f64>,
    eps: f64,
    primary: &str,
    baseline: &Baseline,
) -> (bool, String) {
    match policy {
        Promote::Never => (false, "policy `never`".into()),
        Promote::Always => (true, "policy `always`".into()),
        Promote::IfImproves => match (cand, base, baseline) {
            (Some(c), Some(b), _) if c > b + eps => (true, format!("{primary} {c:.4} > baseline {b:.4} + {eps}")),
            (Some(c), Some(b), _) => (false, format!("{primary} {c:.4} is not above baseline {b:.4} + {eps}")),
            (_, _, Baseline::Unknown(why)) => {
                (false, format!("baseline unknown ({why}); not promoting without a comparison"))
            }
            (_, _, Baseline::NotEvaluated(why)) => {
                (false, format!("no evaluation ({why}); `if_improves` cannot promote"))
            }
            _ => (false, "no candidate evaluation; `if_improves` cannot promote".into()),
        },
    }
}

/// The promoted adapter, if it belongs to this job's base model and loads.
fn load_baseline_adapter(dir: &Path, job: &Job, r: &Reranker) -> Result<LoraSet, String> {
    let manifest: Value = read_json(&dir.join("manifest.json")).map_err(|e| e.to_string())?;
    if manifest["model"].as_str() != Some(job.model.as_str()) {
        return Err(format!(
            "the promoted adapter was trained on model `{}`, this job uses `{}`",
            manifest["model"], job.model
        ));
    }
    LoraSet::load(dir, &r.model.cfg, r.model.device()).map_err(|e| e.to_string())
}

struct Materialised {
    train_pairs: Vec<TextPair>,
    dev_lists: Vec<DevList>,
    skipped: BTreeMap<String, usize>,
    /// Why there is no dev split, when there is none.
    no_dev: Option<String>,
    /// The feedback snapshot mined, when the data is feedback: events and the byte offset.
    feedback: Option<Value>,
}

/// Reads the job's data (triplets, or feedback mined against the documents), splits it by query,
/// and records the rows used, each with its split, in `triplets.jsonl`.
fn materialise(ctx: &mut RunContext, root: &Root, job: &Job) -> anyhow::Result<Materialised> {
    let d = &job.data;
    let docs = match &d.documents {
        Some(p) => Some(Documents::load(p, d.doc_chars as usize)?),
        None => None,
    };
    let mut skipped = BTreeMap::new();
    let mut snapshot = None;
    let rows = match (&d.triplets, &d.feedback) {
        (Some(t), _) => read_triplets(t, docs.as_ref())?,
        (None, Some(f)) => {
            let docs = docs.as_ref().context("feedback needs documents")?;
            // Writers append while this reads: the complete lines as of now, under the lock.
            let snap = CorpusFeedback::new(root, &job.corpus).snapshot_at(f)?;
            anyhow::ensure!(snap.offset > 0 || f.exists(), "reading {}: no such file", f.display());
            let fields = json!({"path": f, "events": snap.events, "offset": snap.offset});
            let message =
                format!("feedback snapshot: {} events, bytes 0..{} of {}", snap.events, snap.offset, f.display());
            ctx.event("log", json!({"level": "info", "message": message, "feedback": fields}))?;
            snapshot = Some(fields);
            let bytes = snap.bytes;
            // Feedback is appended by many writers: a line that is not UTF-8 is skipped and
            // counted like any other garbage line, never the end of the run (review F18).
            let mut not_utf8 = 0;
            let text: String = bytes
                .split(|&b| b == b'\n')
                .filter_map(|l| std::str::from_utf8(l).map_err(|_| not_utf8 += 1).ok())
                .flat_map(|l| [l, "\n"])
                .collect();
            let mined = mining::mine(&text, &docs.ids, job.train.negative_ratio as usize, job.train.seed);
            skipped = mined.skipped;
            if not_utf8 > 0 {
                skipped.insert("not UTF-8".into(), not_utf8);
            }
            let j = |id: &String, label: u8| Judged { id: Some(id.clone()), text: docs.text[id].clone(), label };
            mined
                .triplets
                .iter()
                .map(|t| QueryRows {
                    query: t.query.clone(),
                    positives: vec![j(&t.positive, 1)],
                    negatives: t.negatives.iter().map(|n| j(n, 0)).collect(),
                })
                .collect()
        }
        (None, None) => anyhow::bail!("the job has no data source"),
    };
    if !skipped.is_empty() {
        ctx.warn("skipped feedback events", json!({"skipped": skipped}))?;
    }
    let queries = group_by_query(rows);
    anyhow::ensure!(!queries.is_empty(), "no usable training data (no query with a positive)");
    let dev = split_dev(&queries, job.eval.dev_fraction, job.train.seed);
    let mut out = String::new();
    for (q, &is_dev) in queries.iter().zip(&dev) {
        let side = |v: &Vec<Judged>| {
            v.iter().map(|j| json!({"id": j.id, "text": j.text, "label": j.label})).collect::<Vec<_>>()
        };
        let row = json!({"query": q.query, "positives": side(&q.positives), "negatives": side(&q.negatives),
                         "split": if is_dev { "dev" } else { "train" }});
        out.push_str(&row.to_string());
        out.push('\n');
    }
    crate::store::write_atomic(&ctx.files.triplets(), out.as_bytes())?;
    let train_q: Vec<&QueryRows> = queries.iter().zip(&dev).filter(|(_, d)| !**d).map(|(q, _)| q).collect();
    let dev_q: Vec<&QueryRows> = queries.iter().zip(&dev).filter(|(_, d)| **d).map(|(q, _)| q).collect();
    let train_pairs = train_pairs(&train_q, job.train.negative_ratio as usize);
    let pool: Vec<(Option<String>, String)> = match &docs {
        Some(docs) => docs.ids.iter().map(|id| (Some(id.clone()), docs.text[id].clone())).collect(),
        None => queries
            .iter()
            .flat_map(|q| q.positives.iter().chain(&q.negatives))
            .map(|j| (j.id.clone(), j.text.clone()))
            .collect(),
    };
    let dev_lists = dev_lists(&dev_q, &pool, job.eval.list_size as usize, job.train.seed);
    ctx.info(&format!(
        "materialised {} queries ({} train, {} dev), {} training pairs",
        queries.len(),
        train_q.len(),
        dev_q.len(),
        train_pairs.len()
    ))?;
    let no_dev = dev_q.is_empty().then(|| {
        if job.eval.dev_fraction <= 0.0 {
            "eval.dev_fraction is 0".to_string()
        } else {
            format!("only {} distinct queries (fewer than 5)", queries.len())
        }
    });
    if let Some(why) = &no_dev {
        ctx.info(&format!("no dev split ({why}): evaluation skipped"))?;
    }
    Ok(Materialised { train_pairs, dev_lists, skipped, no_dev, feedback: snapshot })
}
