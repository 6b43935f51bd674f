//! One run, in its own process (`rerankd run <run_dir>`): takes the corpus lock and holds it to
//! its last write, loads the model, materialises the training pairs, trains, saves the adapter,
//! and records every state change. A crash here costs this run only; the daemon records it.

mod plan;
mod saved;

use plan::{Plan, govern, replan};
pub use saved::write_checkpoint;
use saved::{EpochEval, Restored, Saved};

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::job::Job;
use crate::model::checkpoint::CheckpointDir;
use crate::model::lora::LoraConfig;
use crate::model::{LoraSet, Reranker};
use crate::store::atomic::{read_json, read_jsonl, write_json, write_jsonl};
use crate::store::checkpoint;
use crate::store::events::{self, Event, FeedbackSnapshot, Log, SnapshotFields, Split, Which};
use crate::store::feedback::CorpusFeedback;
use crate::store::models;
use crate::store::paths::RunFiles;
use crate::store::{self, FileLock, MetricsLog, Root, RunState, Status, StopRequest};
use crate::testhooks;
use crate::train::Cancelled;
use crate::train::data::TrainPair;
use crate::train::dataset::{
    DevList, Documents, Judged, QueryRows, Source, dev_lists, group_by_query, normalise, read_triplets, split_dev,
    train_pairs,
};
use crate::train::eval::{EvalResult, evaluate};
use crate::train::optim::AdamW;
use crate::train::promotion::{self, Evidence, Paired, Settings};
use crate::train::trainer::{Cursor, Reporter, Resume, TrainConfig, train};
use crate::train::{hard_negatives, mining};

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
        self.log.append(Event::Log(Log::info(message)))?;
        Ok(())
    }

    fn warn(&mut self, log: Log) -> anyhow::Result<()> {
        self.log.append(Event::Log(log))?;
        Ok(())
    }

    /// `Err(Cancelled)` if cancellation was requested.
    fn check_cancel(&mut self) -> anyhow::Result<()> {
        crate::train::check_cancel(self)
    }
}

impl Reporter for RunContext {
    fn event(&mut self, event: Event) -> anyhow::Result<()> {
        self.log.append(event)?;
        Ok(())
    }

    fn stop_requested(&mut self) -> Option<StopRequest> {
        if self.ignore_cancel {
            return None;
        }
        self.files
            .stop_request(Some(self.status.attempt))
            .or_else(|| self.terminated.load(Ordering::Relaxed).then_some(StopRequest::Terminated))
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
    // Evidence of memory pressure in the last attempt (an older status says only `shrink_memory`).
    let shrink = std::mem::take(&mut ctx.status.shrink_memory).then(|| {
        std::mem::take(&mut ctx.status.memory_evidence).unwrap_or_else(|| "its death looked like memory".into())
    });
    ctx.status.needs_space_mb = None;
    ctx.set_state(RunState::Running, None, None)?;
    testhooks::crash_point("run.after_running");
    let _ballast: Vec<u8> = testhooks::alloc_mb().map(|mb| vec![1u8; mb << 20]).unwrap_or_default();
    let outcome = execute(&mut ctx, root, shrink);
    let result = match outcome {
        Ok(summary) => {
            ctx.status.summary = Some(summary);
            let r = ctx.set_state(RunState::Completed, None, None);
            checkpoint::remove(&ctx.files);
            r
        }
        Err(e) => {
            // A run that promoted itself and then did not complete must not stay current (an
            // attempt that resumes promotes again if it gets that far).
            let why = format!("{} did not complete", ctx.status.run_id);
            if let Err(u) = models::undo(root, &ctx.status.corpus, &ctx.status.run_id, &why) {
                eprintln!("rerankd run: undoing the promotion: {u}");
            }
            if disk_full(&e) {
                return Ok(wait_for_space(&mut ctx, root, &e));
            }
            // The strongest request standing now wins over the one that stopped the run (a
            // cancel that came while it was pausing is still a cancel).
            let stopped = e.downcast_ref::<Cancelled>().map(|Cancelled(seen)| {
                ctx.files.stop_request(Some(ctx.status.attempt)).unwrap_or_else(|| seen.clone())
            });
            match stopped.as_ref().map(|req| (req, req.outcome())) {
                Some((req, kind @ (RunState::Queued | RunState::Paused))) => {
                    let at = match checkpoint::latest::<checkpoint::Header>(&ctx.files) {
                        Some((_, Ok(h))) => format!("at step {}; resumes from its checkpoint", h.cursor.step),
                        _ => "before its first checkpoint; starts over".to_string(),
                    };
                    let why = if kind == RunState::Paused {
                        format!("paused {at}")
                    } else {
                        format!("interrupted ({req}) {at}")
                    };
                    let r = ctx.set_state(kind, Some(why), None);
                    // The request is answered: a resumed run must not stop on it again.
                    ctx.files.clear_pause();
                    ctx.files.clear_shutdown();
                    r
                }
                Some((req, _)) => {
                    checkpoint::remove(&ctx.files);
                    ctx.set_state(RunState::Cancelled, Some(req.reason().to_string()), None)
                }
                None => {
                    checkpoint::remove(&ctx.files);
                    ctx.set_state(RunState::Failed, None, Some(format!("{e:#}")))
                }
            }
        }
    };
    drop(lock); // after the last write
    result.map(|_| 0)
}

/// Whether the disk refused a write anywhere in the error's chain (`sys::is_disk_full`): the
/// store's errors, plain I/O errors, and candle's (a tensor file being saved).
fn disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<store::StoreError>().is_some_and(store::StoreError::is_disk_full)
            || c.downcast_ref::<std::io::Error>().is_some_and(crate::sys::is_disk_full)
            || c.downcast_ref::<candle_core::Error>().is_some_and(candle_disk_full)
    })
}

fn candle_disk_full(e: &candle_core::Error) -> bool {
    match e {
        candle_core::Error::Io(io) => crate::sys::is_disk_full(io),
        candle_core::Error::WithBacktrace { inner, .. } | candle_core::Error::Context { inner, .. } => {
            candle_disk_full(inner)
        }
        _ => false,
    }
}

/// A run that met a full disk keeps its checkpoints and goes back in line, to resume from the
/// latest once [`checkpoint::space_needed_mb`] are free on the root's file system (the daemon
/// checks before starting it). Returns the exit status: 0 when recorded, [`store::EXIT_DISK_FULL`]
/// when even that could not be written (the daemon then records it).
fn wait_for_space(ctx: &mut RunContext, root: &Root, e: &anyhow::Error) -> i32 {
    let need = checkpoint::space_needed_mb(&ctx.files);
    let at = match checkpoint::latest::<checkpoint::Header>(&ctx.files) {
        Some((_, Ok(h))) => format!("resumes from its checkpoint at step {}", h.cursor.step),
        _ => "starts over (no checkpoint yet)".to_string(),
    };
    let why = format!("the disk is full ({e:#}); {at} once {need} MB are free on {}", root.dir.display());
    ctx.status.needs_space_mb = Some(need);
    match ctx.set_state(RunState::Queued, Some(why), None) {
        Ok(()) => 0,
        Err(e2) => {
            eprintln!("rerankd run: the disk is full and the run could not record it: {e2:#}");
            store::EXIT_DISK_FULL
        }
    }
}

/// The baseline: the corpus's promoted adapter or the base model, loaded once (for hard-negative
/// mining and evaluation), or why it could not be (nothing is then promoted automatically).
struct BaselineModel {
    what: String,
    adapter: Result<Option<LoraSet>, String>,
}

/// What the baseline scored: on dev (None without a dev split or a usable baseline) and on the
/// held-out lists of earlier promotions.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Baseline {
    what: String,
    dev: Result<EvalResult, String>,
    heldout: Option<EvalResult>,
}

fn execute(ctx: &mut RunContext, root: &Root, shrink: Option<String>) -> anyhow::Result<Value> {
    ctx.check_cancel()?;
    let job: Job = read_json(&ctx.files.job())?;
    let device = job.device.open()?;
    let ck = CheckpointDir::resolve(&job.model)?; // its errors name the model already
    let checked = checkpoint::checked::<Saved>(&ctx.files);
    for (dir, why) in &checked.damaged {
        ctx.warn(Log::warn(format!("checkpoint {} is damaged and skipped: {why}", dir.display())))?;
    }
    if checked.found.is_none() && !checked.damaged.is_empty() {
        ctx.warn(Log::warn("no checkpoint of this run proves itself: it starts over"))?;
    }
    let saved = checked
        .found
        .map(|(dir, state)| state.map(|s| (dir, s)))
        .transpose()
        .context("reading the run's checkpoint")?;
    let job = match &saved {
        Some((_, s)) => replan(ctx, job, &s.plan, s.planned.unwrap_or(s.plan.micro), shrink.as_deref())?,
        None => govern(ctx, job, &ck, device.is_cpu())?,
    };
    ctx.info(&format!("loading model {} on {:?}", job.model, device.location()))?;
    let mut r = Reranker::open(&ck, &device).with_context(|| format!("loading model `{}`", job.model))?;
    if let Some(i) = &job.instruction {
        r.instruction = i.clone();
    }
    let max_len = job.train.max_length as usize;
    let (data, baseline, heldout, resume) = match saved {
        Some((dir, s)) => {
            let data = restore_data(&ctx.files, &s)?;
            let heldout = read_jsonl::<DevList>(&ctx.files.heldout_lists())?;
            let baseline = s.baseline.clone();
            (data, baseline, heldout, Some((dir, s)))
        }
        None => {
            let mut data = materialise(ctx, root, &job)?;
            ctx.check_cancel()?;
            let base = baseline_model(ctx, root, &job, &r)?;
            if let Some(h) = &job.train.hard_negatives {
                mine_hard_negatives(ctx, &job, &r, &base, &mut data, h)?;
            }
            write_triplets(ctx, &data)?;
            write_jsonl(&ctx.files.dev_lists(), &data.dev_lists)?;
            let heldout = heldout_lists(ctx, root, &job, &data)?;
            write_jsonl(&ctx.files.heldout_lists(), &heldout)?;
            let baseline = evaluate_baseline(ctx, &job, &r, &base, &data, &heldout)?;
            (data, baseline, heldout, None)
        }
    };
    let train_q: Vec<&QueryRows> = data.queries.iter().zip(&data.dev).filter(|(_, d)| !**d).map(|(q, _)| q).collect();
    let (text_pairs, sources) = train_pairs(&train_q, job.train.negative_ratio as usize);
    if resume.is_none() {
        let negatives: BTreeMap<String, u64> =
            sources.iter().map(|(s, n)| (json!(s).as_str().unwrap_or("").to_string(), *n as u64)).collect();
        let used: Vec<String> = negatives.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let message = format!(
            "{} training pairs; negatives by source: {}",
            text_pairs.len(),
            if used.is_empty() { "none".to_string() } else { used.join(", ") }
        );
        ctx.event(Event::Log(Log { negatives: Some(negatives), ..Log::info(message) }))?;
    }
    let pairs: Vec<TrainPair> = text_pairs
        .iter()
        .map(|p| Ok(TrainPair { ids: r.encode(&p.query, &p.doc, max_len)?, label: p.label }))
        .collect::<anyhow::Result<_>>()?;
    ctx.check_cancel()?;
    let trained = train_and_select(ctx, &job, &r, &pairs, &data, &baseline, resume)?;
    let cand_heldout = match (&trained.best, heldout.is_empty()) {
        (Some(_), false) => {
            let res = evaluate(&r, Some(&trained.candidate), &heldout, max_len, &mut || ctx.stop_requested())?;
            ctx.log.append(eval_event(Split::Heldout, Which::Candidate, None, Some(res.queries), &res, None))?;
            Some(res)
        }
        _ => None,
    };
    let primary = &job.eval.primary_metric;
    let cand_metric = trained.best.as_ref().and_then(|(_, res)| res.metrics.get(primary).copied());
    let base_metric = baseline.dev.as_ref().ok().and_then(|res| res.metrics.get(primary).copied());
    let evidence = Evidence {
        primary,
        dev: match (&trained.best, &baseline.dev) {
            (Some((_, c)), Ok(b)) => Ok(Paired { candidate: c.per_query(primary), baseline: b.per_query(primary) }),
            (None, Ok(_)) => Err("no candidate evaluation".into()),
            (_, Err(why)) => Err(why.clone()),
        },
        heldout: match (&cand_heldout, &baseline.heldout) {
            (Some(c), Some(b)) => Some(Paired { candidate: c.per_query(primary), baseline: b.per_query(primary) }),
            _ => None,
        },
    };
    let settings = Settings {
        epsilon: job.eval.epsilon,
        min_dev_queries: job.eval.min_dev_queries as usize,
        confidence: job.eval.confidence,
        resamples: job.eval.resamples as usize,
        seed: job.train.seed,
        dev_fraction: job.eval.dev_fraction,
    };
    let decision = promotion::decide(job.promote, &evidence, &settings);
    write_outputs(ctx, &job, &r, &trained, &baseline, &data, &decision, cand_heldout.as_ref())?;
    ctx.check_cancel()?;

    let eps = job.eval.epsilon;
    let promote = decision.promoted;
    let mut path = None;
    if promote {
        let details = json!({"primary": primary, "candidate": cand_metric, "baseline": base_metric,
            "reason": decision.reason, "dev": decision.dev});
        path = Some(models::promote(root, &job.corpus, &ctx.status.run_id, &ctx.files.adapter(), "auto", details)?);
    }
    ctx.log.append(Event::Promote(events::Promote {
        promoted: promote,
        primary: primary.clone(),
        candidate: cand_metric,
        baseline: base_metric,
        epsilon: eps,
        path,
        reason: decision.reason.clone(),
        rule: decision.rule.clone(),
        policy: json!(job.promote).as_str().unwrap_or_default().to_string(),
        dev_queries: data.dev_lists.len() as u64,
        dev: decision.dev.clone(),
        heldout: decision.heldout.clone(),
    }))?;
    testhooks::crash_point("run.after_promote_event");
    Ok(json!({"steps": trained.steps, "last_loss": trained.last_loss, "pairs": pairs.len(),
        "dev_queries": data.dev_lists.len(), "primary_metric": primary, "candidate": cand_metric,
        "baseline": base_metric, "promoted": promote, "reason": decision.reason}))
}

fn lora_config(job: &Job) -> LoraConfig {
    LoraConfig::new(job.lora.r as usize, job.lora.alpha, job.lora.dropout, &job.lora.target_modules)
}

/// The corpus's promoted adapter (if it belongs to this job's base model and loads), else the
/// base model.
fn baseline_model(ctx: &mut RunContext, root: &Root, job: &Job, r: &Reranker) -> anyhow::Result<BaselineModel> {
    let (what, adapter) = match models::current(root, &job.corpus) {
        None => ("base model".to_string(), Ok(None)),
        Some((id, dir)) => (format!("promoted adapter of {id}"), load_baseline_adapter(&dir, job, r).map(Some)),
    };
    if let Err(why) = &adapter {
        ctx.warn(Log::warn(format!("baseline unknown: {why}")))?;
    }
    Ok(BaselineModel { what, adapter })
}

/// `train.hard_negatives`: the baseline ranks candidates for every training query.
fn mine_hard_negatives(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    base: &BaselineModel,
    data: &mut Materialised,
    cfg: &crate::job::HardNegatives,
) -> anyhow::Result<()> {
    let adapter = match &base.adapter {
        Ok(a) => a.as_ref(),
        Err(why) => {
            ctx.warn(Log::warn(format!("hard negatives skipped: the baseline is unknown ({why})")))?;
            return Ok(());
        }
    };
    let mut train: Vec<QueryRows> = Vec::new();
    let mut at = Vec::new();
    for (i, (q, &d)) in data.queries.iter().zip(&data.dev).enumerate() {
        if !d {
            train.push(q.clone());
            at.push(i);
        }
    }
    let pool = hard_negatives::pool_size(cfg, train.len(), data.pool.len());
    ctx.info(&format!(
        "hard negatives: the {} scores up to {} pairs ({} training queries x {pool} candidates of {} documents)",
        base.what,
        train.len() * pool,
        train.len(),
        data.pool.len()
    ))?;
    let t0 = std::time::Instant::now();
    let max_len = job.train.max_length as usize;
    let m = hard_negatives::mine(r, adapter, &mut train, &data.pool, cfg, max_len, job.train.seed, &mut || {
        ctx.stop_requested()
    })?;
    for (q, i) in train.into_iter().zip(at) {
        data.queries[i] = q;
    }
    let secs = t0.elapsed().as_secs_f64();
    let message = format!(
        "hard negatives: {} mined for {} queries from {} pairs scored in {secs:.1} s",
        m.added, m.queries, m.pairs_scored
    );
    ctx.event(Event::Log(Log { hard_negatives: Some(m), seconds: Some(secs), ..Log::info(message) }))?;
    Ok(())
}

/// The held-out lists of the corpus's earlier promotions: the newest list of each query, without
/// the queries this run trains on, at most `eval.heldout_max_queries` (a seeded sample).
fn heldout_lists(ctx: &mut RunContext, root: &Root, job: &Job, data: &Materialised) -> anyhow::Result<Vec<DevList>> {
    let files = models::heldout_files(root, &job.corpus);
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let trained: std::collections::HashSet<String> =
        data.queries.iter().zip(&data.dev).filter(|(_, d)| !**d).map(|(q, _)| normalise(&q.query)).collect();
    let mut by_query: BTreeMap<String, DevList> = BTreeMap::new();
    let mut skipped = 0;
    for (_, path) in &files {
        for l in read_jsonl::<DevList>(path)? {
            by_query.insert(normalise(&l.query), l);
        }
    }
    by_query.retain(|q, _| {
        let keep = !trained.contains(q);
        skipped += usize::from(!keep);
        keep
    });
    let mut lists: Vec<DevList> = by_query.into_values().collect();
    let cap = job.eval.heldout_max_queries as usize;
    if lists.len() > cap {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        lists.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.train.seed ^ 0x4e1d));
        lists.truncate(cap);
    }
    ctx.info(&format!(
        "held-out lists: {} queries from {} earlier promotion(s) ({skipped} left out: this run trains on them)",
        lists.len(),
        files.len()
    ))?;
    Ok(lists)
}

/// Scores the dev lists (and the held-out lists) with the baseline.
fn evaluate_baseline(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    base: &BaselineModel,
    data: &Materialised,
    heldout: &[DevList],
) -> anyhow::Result<Baseline> {
    let what = base.what.clone();
    let adapter = match &base.adapter {
        Ok(a) => a.as_ref(),
        Err(why) => {
            let dev = Err(format!("baseline unknown ({why}); not promoting without a comparison"));
            return Ok(Baseline { what, dev, heldout: None });
        }
    };
    let max_len = job.train.max_length as usize;
    let dev = match &data.no_dev {
        Some(why) => Err(format!("no evaluation ({why})")),
        None => {
            let res = evaluate(r, adapter, &data.dev_lists, max_len, &mut || ctx.stop_requested())?;
            ctx.log.append(eval_event(Split::Dev, Which::Baseline, None, None, &res, Some(&what)))?;
            Ok(res)
        }
    };
    let heldout = if heldout.is_empty() {
        None
    } else {
        let res = evaluate(r, adapter, heldout, max_len, &mut || ctx.stop_requested())?;
        ctx.log.append(eval_event(Split::Heldout, Which::Baseline, None, Some(res.queries), &res, Some(&what)))?;
        Some(res)
    };
    Ok(Baseline { what, dev, heldout })
}

/// The outcome of training: the best epoch on dev (the candidate) and every epoch's metrics.
struct Trained {
    steps: usize,
    last_loss: f32,
    /// (epoch, its evaluation); None when there is no dev split.
    best: Option<(usize, EvalResult)>,
    candidate: LoraSet,
    epochs: Vec<EpochEval>,
}

/// The best epoch so far and every epoch's metrics: what evaluation after each epoch keeps.
#[derive(Default)]
struct Selection {
    best: Option<(usize, EvalResult, LoraSet)>,
    epochs: Vec<EpochEval>,
}

/// Trains, evaluating every epoch on dev and keeping the best epoch's adapter (by the locked
/// primary metric). Checkpoints at its start, every `train.checkpoint_every_s` and at a
/// cooperative stop; `resume` continues from a checkpoint.
fn train_and_select(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    pairs: &[TrainPair],
    data: &Materialised,
    baseline: &Baseline,
    resume: Option<(std::path::PathBuf, Saved)>,
) -> anyhow::Result<Trained> {
    let device = r.model.device();
    let effective =
        resume.as_ref().map(|(_, s)| s.plan.effective).unwrap_or(job.train.batch_size * job.train.grad_accum);
    let (lora, sel, from) = match &resume {
        None => (LoraSet::init(&lora_config(job), &r.model.cfg, job.train.seed, device)?, Selection::default(), None),
        Some((dir, s)) => {
            let lora = LoraSet::load(&dir.join("lora"), &r.model.cfg, device)?;
            let best = match &s.best {
                Some((e, res)) => Some((*e, res.clone(), LoraSet::load(&dir.join("best"), &r.model.cfg, device)?)),
                None => None,
            };
            let mut opt = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
            let n = lora.vars().len();
            let mut take = |k: &str| -> anyhow::Result<Vec<candle_core::Tensor>> {
                (0..n).map(|i| opt.remove(&format!("{k}.{i}")).context("optimizer state incomplete")).collect()
            };
            let (m, v) = (take("m")?, take("v")?);
            let from = Resume { cursor: s.cursor, m, v, t: s.optimizer_t };
            (lora, Selection { best, epochs: s.epochs.clone() }, Some(from))
        }
    };
    // The micro-batch the run was planned with (the governor's, before any shrink), and the epoch
    // this attempt starts in: the plan returns to it at the next epoch boundary.
    let planned = resume.as_ref().map_or(job.train.batch_size, |(_, s)| s.planned.unwrap_or(s.plan.micro));
    let first_epoch = resume.as_ref().map_or(0, |(_, s)| s.cursor.epoch);
    let cfg = TrainConfig {
        epochs: job.train.epochs as usize,
        effective: effective as usize,
        micro_batch: job.train.batch_size as usize,
        planned_micro: (planned > job.train.batch_size).then_some(planned as usize),
        lr: job.train.lr,
        warmup_ratio: job.train.warmup_ratio,
        seed: job.train.seed,
        max_grad_norm: job.train.max_grad_norm,
        weight_decay: job.train.weight_decay,
        dropout: job.lora.dropout,
    };
    let (primary, max_len) = (&job.eval.primary_metric, job.train.max_length as usize);
    let lists = &data.dev_lists;
    let sel = std::cell::RefCell::new(sel);
    let mut after_epoch = |epoch: usize, rep: &mut dyn Reporter| -> anyhow::Result<()> {
        if lists.is_empty() {
            return Ok(());
        }
        let res = evaluate(r, Some(&lora), lists, max_len, &mut || rep.stop_requested())?;
        rep.event(eval_event(Split::Dev, Which::Epoch, Some(epoch), None, &res, None))?;
        let mut sel = sel.borrow_mut();
        sel.epochs.push(EpochEval { epoch, metrics: res.metrics.clone() });
        let m = |r: &EvalResult| r.metrics.get(primary).copied().unwrap_or(f64::NEG_INFINITY);
        if sel.best.as_ref().is_none_or(|(_, b, _)| m(&res) > m(b)) {
            sel.best = Some((epoch, res, lora.snapshot()?));
        }
        Ok(())
    };
    let files = ctx.files.clone();
    let attempt = ctx.status.attempt;
    let mut plan_restored = false;
    let every = std::time::Duration::from_secs(job.train.checkpoint_every_s);
    let mut last = std::time::Instant::now();
    let mut save = |cur: &Cursor, opt: &AdamW, now: bool, rep: &mut dyn Reporter| -> anyhow::Result<()> {
        if !now && last.elapsed() < every {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let micro = cfg.micro_for(first_epoch, cur.epoch) as u64;
        if micro == planned && micro != job.train.batch_size && !plan_restored {
            // Back to the planned micro-batch: `status` no longer shows a reduced plan.
            if let Ok(mut st) = Status::read(&files.status()) {
                st.plan = None;
                st.write(&files.status())?;
            }
            plan_restored = true;
        }
        let sel = sel.borrow();
        let state = Saved {
            version: checkpoint::SEALED_SINCE,
            attempt,
            cursor: *cur,
            optimizer_t: opt.state().2,
            plan: Plan { micro, effective, max_length: job.train.max_length },
            planned: Some(planned),
            baseline: baseline.clone(),
            materialised: Restored {
                skipped: data.skipped.clone(),
                no_dev: data.no_dev.clone(),
                feedback: data.feedback.clone(),
            },
            epochs: sel.epochs.clone(),
            best: sel.best.as_ref().map(|(e, res, _)| (*e, res.clone())),
        };
        let best = sel.best.as_ref().map(|(_, _, b)| b);
        let size = write_checkpoint(&files, &lora, best, opt, &state, cur.step as u64)?;
        rep.event(Event::Checkpoint(events::Checkpoint {
            step: cur.step as u64,
            epoch: cur.epoch as u64,
            size_bytes: size,
            attempt,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        }))?;
        last = std::time::Instant::now();
        Ok(())
    };
    let fresh = from.is_none();
    if fresh {
        // The first checkpoint holds the baseline's evaluation: a resumed run never repeats it.
        save(&Cursor::default(), &AdamW::new(lora.vars().into_iter().cloned().collect(), 0.0)?, true, ctx)?;
    }
    let done = train(r, &lora, pairs, &cfg, ctx, &mut after_epoch, from, &mut save)?;
    if plan_restored {
        // (status.json was updated when it happened; this keeps the run's own copy in step.)
        ctx.status.plan = None;
    }
    let (steps, last_loss) = (done.steps, done.last_loss);
    let Selection { best, epochs } = sel.into_inner();
    let (best, candidate) = match best {
        Some((e, res, l)) => (Some((e, res)), l),
        None => (None, lora),
    };
    if let Some((epoch, res)) = &best {
        ctx.log.append(eval_event(Split::Dev, Which::Candidate, Some(*epoch), None, res, None))?;
    }
    Ok(Trained { steps, last_loss, best, candidate, epochs })
}

/// The candidate adapter with its manifest, `eval.json`, and the dev lists in full.
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    ctx: &mut RunContext,
    job: &Job,
    r: &Reranker,
    t: &Trained,
    baseline: &Baseline,
    data: &Materialised,
    decision: &promotion::Decision,
    cand_heldout: Option<&EvalResult>,
) -> anyhow::Result<()> {
    let cand = t.best.as_ref().map(|(_, res)| res);
    let best_epoch = t.best.as_ref().map(|(e, _)| *e);
    let manifest = models::Manifest {
        model: job.model.clone(),
        corpus: Some(job.corpus.clone()),
        run_id: Some(ctx.status.run_id.clone()),
        max_length: Some(job.train.max_length as usize),
        instruction: Some(r.instruction.clone()),
        primary_metric: Some(job.eval.primary_metric.clone()),
        metrics: cand.map(|c| c.metrics.iter().map(|(k, v)| (k.clone(), Some(*v).filter(|v| v.is_finite()))).collect()),
        best_epoch,
        files: None, // sealed by `write`
    };
    t.candidate.save(&ctx.files.adapter(), Some(&job.model))?;
    manifest.write(&ctx.files.adapter())?;
    let base_what = match &baseline.dev {
        Ok(_) => baseline.what.clone(),
        Err(why) => format!("{}: {why}", baseline.what),
    };
    let heldout = baseline.heldout.as_ref().map(|b| {
        json!({"queries": b.queries, "baseline": b.metrics, "candidate": cand_heldout.map(|c| &c.metrics),
               "comparison": decision.heldout})
    });
    let eval_doc = json!({"primary_metric": job.eval.primary_metric, "dev_queries": data.dev_lists.len(),
        "list_size": job.eval.list_size,
        "baseline": {"what": base_what, "metrics": baseline.dev.as_ref().ok().map(|b| &b.metrics)},
        "candidate": {"best_epoch": best_epoch, "metrics": cand.map(|c| &c.metrics)},
        "promotion": {"policy": job.promote, "rule": decision.rule, "promoted": decision.promoted,
                      "reason": decision.reason, "dev": decision.dev},
        "heldout": heldout,
        "epochs": t.epochs, "lists": cand.map(|c| &c.lists), "skipped": data.skipped,
        "feedback": data.feedback});
    write_json(&ctx.files.eval(), &eval_doc)?;
    Ok(())
}

/// The promoted adapter, if it belongs to this job's base model and loads.
fn load_baseline_adapter(dir: &Path, job: &Job, r: &Reranker) -> Result<LoraSet, String> {
    let adapter = models::Adapter::open(dir).map_err(|e| e.to_string())?;
    adapter.check_base(&job.model).map_err(|e| e.to_string())?;
    adapter.lora(&r.model.cfg, r.model.device()).map_err(|e| e.to_string())
}

struct Materialised {
    /// Every query with its judged documents, and whether it is in the dev split.
    queries: Vec<QueryRows>,
    dev: Vec<bool>,
    dev_lists: Vec<DevList>,
    /// The documents negatives and dev lists are drawn from: the corpus, else every text judged.
    pool: Vec<(Option<String>, String)>,
    skipped: BTreeMap<String, usize>,
    /// Why there is no dev split, when there is none.
    no_dev: Option<String>,
    /// The feedback snapshot mined, when the data is feedback: events and the byte offset.
    feedback: Option<SnapshotFields>,
}

/// Reads the job's data (triplets, or feedback mined against the documents) and splits it by
/// query.
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
            let at = SnapshotFields { path: f.clone(), events: snap.events as u64, offset: snap.offset };
            let message =
                format!("feedback snapshot: {} events, bytes 0..{} of {}", snap.events, snap.offset, f.display());
            ctx.event(Event::FeedbackSnapshot(FeedbackSnapshot { message, at: at.clone() }))?;
            snapshot = Some(at);
            let bytes = snap.bytes;
            // Feedback is appended by many writers: a line that is not UTF-8 is skipped and
            // counted like any other garbage line, never the end of the run.
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
            let j = |id: &String, label: u8, source: Source| Judged {
                id: Some(id.clone()),
                text: docs.text[id].clone(),
                label,
                source,
            };
            mined
                .triplets
                .iter()
                .map(|t| QueryRows {
                    query: t.query.clone(),
                    positives: vec![j(&t.positive, 1, Source::Signal)],
                    negatives: t.negatives.iter().map(|(n, s)| j(n, 0, *s)).collect(),
                })
                .collect()
        }
        (None, None) => anyhow::bail!("the job has no data source"),
    };
    if !skipped.is_empty() {
        let skipped = skipped.iter().map(|(k, n)| (k.clone(), *n as u64)).collect();
        ctx.warn(Log { skipped: Some(skipped), ..Log::warn("skipped feedback events") })?;
    }
    let queries = group_by_query(rows);
    anyhow::ensure!(!queries.is_empty(), "no usable training data (no query with a positive)");
    let dev = split_dev(&queries, job.eval.dev_fraction, job.train.seed);
    let pool: Vec<(Option<String>, String)> = match &docs {
        Some(docs) => docs.ids.iter().map(|id| (Some(id.clone()), docs.text[id].clone())).collect(),
        None => {
            let mut seen = std::collections::HashSet::new();
            queries
                .iter()
                .flat_map(|q| q.positives.iter().chain(&q.negatives))
                .filter(|j| seen.insert(j.text.clone()))
                .map(|j| (j.id.clone(), j.text.clone()))
                .collect()
        }
    };
    let dev_q: Vec<&QueryRows> = queries.iter().zip(&dev).filter(|(_, d)| **d).map(|(q, _)| q).collect();
    let dev_lists = dev_lists(&dev_q, &pool, job.eval.list_size as usize, job.train.seed);
    ctx.info(&format!(
        "materialised {} queries ({} train, {} dev)",
        queries.len(),
        queries.len() - dev_q.len(),
        dev_q.len(),
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
    Ok(Materialised { queries, dev, dev_lists, pool, skipped, no_dev, feedback: snapshot })
}

/// Records the rows used, each with its split and every document's source, in `triplets.jsonl`.
fn write_triplets(ctx: &mut RunContext, data: &Materialised) -> anyhow::Result<()> {
    let mut out = String::new();
    for (q, &is_dev) in data.queries.iter().zip(&data.dev) {
        let side = |v: &Vec<Judged>| {
            v.iter()
                .map(|j| json!({"id": j.id, "text": j.text, "label": j.label, "source": j.source}))
                .collect::<Vec<_>>()
        };
        let row = json!({"query": q.query, "positives": side(&q.positives), "negatives": side(&q.negatives),
                         "split": if is_dev { "dev" } else { "train" }});
        out.push_str(&row.to_string());
        out.push('\n');
    }
    crate::store::write_atomic(&ctx.files.triplets(), out.as_bytes())?;
    Ok(())
}

/// A resumed run's data, read back from what its first attempt wrote: every query with its
/// judged documents (sources included) and split, and the dev lists.
fn restore_data(files: &RunFiles, s: &Saved) -> anyhow::Result<Materialised> {
    #[derive(serde::Deserialize)]
    struct Row {
        query: String,
        positives: Vec<Judged>,
        negatives: Vec<Judged>,
        split: String,
    }
    let (mut queries, mut dev) = (Vec::new(), Vec::new());
    for row in read_jsonl::<Row>(&files.triplets())? {
        dev.push(row.split == "dev");
        queries.push(QueryRows { query: row.query, positives: row.positives, negatives: row.negatives });
    }
    let m = &s.materialised;
    Ok(Materialised {
        queries,
        dev,
        dev_lists: read_jsonl(&files.dev_lists())?,
        pool: Vec::new(),
        skipped: m.skipped.clone(),
        no_dev: m.no_dev.clone(),
        feedback: m.feedback.clone(),
    })
}

/// An `eval` event of `res`.
fn eval_event(
    split: Split,
    which: Which,
    epoch: Option<usize>,
    queries: Option<usize>,
    res: &EvalResult,
    adapter: Option<&str>,
) -> Event {
    Event::Eval(events::Eval {
        split,
        which,
        epoch: epoch.map(|e| e as u64),
        queries: queries.map(|q| q as u64),
        metrics: res.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        adapter: adapter.map(str::to_string),
    })
}
