//! One run, in its own process (`rerankd run <run_dir>`): takes the corpus lock and holds it to
//! its last write, loads the model, materialises the training pairs, trains, saves the adapter,
//! and records every state change. A crash here costs this run only; the daemon records it.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use crate::job::{Data, Job};
use crate::model::lora::LoraConfig;
use crate::model::{LoraSet, Reranker};
use crate::store::atomic::read_json;
use crate::store::paths::RunFiles;
use crate::store::{FileLock, MetricsLog, Root, RunState, Status};
use crate::train::data::TrainPair;
use crate::train::trainer::{Outcome, Reporter, TrainConfig, train};

/// Test-only fault injection: the child neither checks the cancel sentinel nor obeys SIGTERM, so
/// tests can prove the daemon's escalation. Never set it outside tests.
pub const TEST_IGNORE_CANCEL_ENV: &str = "RERANKD_TEST_IGNORE_CANCEL";

/// The run's view of its files while it runs.
pub struct RunContext {
    pub files: RunFiles,
    pub status: Status,
    pub log: MetricsLog,
    ignore_cancel: bool,
}

impl RunContext {
    fn set_state(&mut self, state: RunState, reason: Option<String>, error: Option<String>) -> anyhow::Result<()> {
        if self.status.transition(state, reason.clone(), error) {
            self.status.write(&self.files.status())?;
            self.log.append("state", json!({"state": state.as_str(), "reason": reason}))?;
            self.log.sync()?;
        }
        Ok(())
    }

    pub fn info(&mut self, message: &str) -> anyhow::Result<()> {
        self.log.append("log", json!({"level": "info", "message": message}))?;
        Ok(())
    }
}

impl Reporter for RunContext {
    fn event(&mut self, kind: &str, fields: Value) -> anyhow::Result<()> {
        self.log.append(kind, fields)?;
        Ok(())
    }

    fn cancel_requested(&mut self) -> Option<String> {
        if self.ignore_cancel { None } else { self.files.cancel_requested() }
    }

    fn peak_mem_mb(&mut self) -> u64 {
        peak_rss_mb()
    }
}

/// Peak resident set size of this process in MB (Linux `VmHWM`; 0 where unknown).
pub fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Entry point of `rerankd run`. Returns the process exit code: 0 when the run reached a
/// terminal state it recorded itself (completed, failed or cancelled), 3 when it could not start.
pub fn run(root: &Root, run_dir: &Path) -> anyhow::Result<i32> {
    let files = RunFiles::new(run_dir);
    let status = Status::read(&files.status())?;
    if status.state.is_terminal() {
        return Ok(0);
    }
    let ignore_cancel = std::env::var_os(TEST_IGNORE_CANCEL_ENV).is_some();
    if ignore_cancel {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let lock_path = root.corpus_lock(&status.corpus);
    let Some(mut lock) = FileLock::try_acquire(&lock_path)? else {
        anyhow::bail!("corpus `{}` is locked by another run ({})", status.corpus, lock_path.display());
    };
    lock.write_pid()?;
    let log = MetricsLog::open(&files.metrics(), &status.run_id)?;
    let mut ctx = RunContext { files, status, log, ignore_cancel };
    ctx.set_state(RunState::Running, None, None)?;
    let outcome = execute(&mut ctx);
    let result = match outcome {
        Ok(Finished::Completed(summary)) => {
            ctx.status.summary = Some(summary);
            ctx.set_state(RunState::Completed, None, None)
        }
        Ok(Finished::Cancelled(reason)) => ctx.set_state(RunState::Cancelled, Some(reason), None),
        Err(e) => {
            let message = format!("{e:#}");
            let _ = ctx.log.append("error", json!({"message": message}));
            ctx.set_state(RunState::Failed, None, Some(message))
        }
    };
    drop(lock); // after the last write
    result.map(|_| 0)
}

enum Finished {
    Completed(Value),
    Cancelled(String),
}

macro_rules! check_cancel {
    ($ctx:expr) => {
        if let Some(reason) = $ctx.cancel_requested() {
            return Ok(Finished::Cancelled(reason));
        }
    };
}

fn execute(ctx: &mut RunContext) -> anyhow::Result<Finished> {
    check_cancel!(ctx);
    let job: Job = read_json(&ctx.files.job())?;
    let device = job.device.open()?;
    ctx.info(&format!("loading model {} on {:?}", job.model, device.location()))?;
    let mut r = Reranker::load(&job.model, &device).with_context(|| format!("loading model `{}`", job.model))?;
    if let Some(i) = &job.instruction {
        r.instruction = i.clone();
    }
    let pairs = materialise(ctx, &r, &job)?;
    check_cancel!(ctx);
    let lcfg = LoraConfig::new(job.lora.r as usize, job.lora.alpha, job.lora.dropout, &job.lora.target_modules);
    let lora = LoraSet::init(&lcfg, &r.model.cfg, job.train.seed, &device)?;
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
    match train(&r, &lora, &pairs, &cfg, ctx, &mut |_, _| Ok(()))? {
        Outcome::Cancelled { reason } => Ok(Finished::Cancelled(reason)),
        Outcome::Completed { steps, last_loss } => {
            check_cancel!(ctx);
            lora.save(&ctx.files.adapter(), Some(&job.model))?;
            Ok(Finished::Completed(json!({"steps": steps, "last_loss": last_loss, "pairs": pairs.len()})))
        }
    }
}

/// Reads the job's data into tokenized pairs and records them in `triplets.jsonl`.
fn materialise(ctx: &mut RunContext, r: &Reranker, job: &Job) -> anyhow::Result<Vec<TrainPair>> {
    let Data::Triplets { triplets } = &job.data else {
        anyhow::bail!("feedback data is not supported by this build yet; give `data.triplets`");
    };
    let text = std::fs::read_to_string(triplets).with_context(|| format!("reading {}", triplets.display()))?;
    let max_len = job.train.max_length as usize;
    let mut pairs = Vec::new();
    let mut out = String::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: line {}: not JSON", triplets.display(), n + 1))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let (Some(q), Some(pos)) = (field("query"), field("positive")) else {
            anyhow::bail!("{}: line {}: needs `query` and `positive` strings", triplets.display(), n + 1);
        };
        let negs: Vec<&str> = v
            .get("negatives")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        pairs.push(TrainPair { ids: r.encode(q, pos, max_len)?, label: 1.0 });
        for neg in negs.iter().take(job.train.negative_ratio as usize) {
            pairs.push(TrainPair { ids: r.encode(q, neg, max_len)?, label: 0.0 });
        }
        out.push_str(&json!({"query": q, "positive": pos, "negatives": negs, "split": "train"}).to_string());
        out.push('\n');
    }
    crate::store::write_atomic(&ctx.files.triplets(), out.as_bytes())?;
    ctx.info(&format!("materialised {} training pairs", pairs.len()))?;
    Ok(pairs)
}
