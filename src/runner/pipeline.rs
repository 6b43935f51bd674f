//! The run's work, from job to result: the model and baseline loaded, the data materialised (or
//! restored), hard negatives mined, training with evaluation at each epoch and checkpoints, the
//! candidate written, promotion decided.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use std::collections::BTreeMap;

use crate::job::Job;
use crate::model::checkpoint::CheckpointDir;
use crate::model::{LoraSet, Reranker};
use crate::store::atomic::{read_json, read_jsonl, write_json, write_jsonl};
use crate::store::checkpoint;
use crate::store::events::{self, Event, Log, Split, Which};
use crate::store::models;
use crate::store::{Root, Status};
use crate::testhooks;
use crate::train::data::TrainPair;
use crate::train::dataset::{DevList, QueryRows, train_pairs};
use crate::train::eval::{EvalResult, evaluate};
use crate::train::hard_negatives;
use crate::train::optim::AdamW;
use crate::train::promotion::{self, Evidence, Paired, Settings};
use crate::train::trainer::{Cursor, Reporter, Resume, TrainConfig, train};

use super::context::RunContext;
use super::data::{Materialised, heldout_lists, materialise, restore_data, write_triplets};
use super::plan::lora_config;
use super::plan::{CheckpointPlan, govern, replan};
use super::saved::{Baseline, EpochEval, Restored, Saved, write_checkpoint};

/// The baseline: the corpus's promoted adapter or the base model, loaded once (for hard-negative
/// mining and evaluation), or why it could not be (nothing is then promoted automatically).
struct BaselineModel {
    what: String,
    adapter: Result<Option<LoraSet>, String>,
}

pub(super) fn execute(ctx: &mut RunContext, root: &Root, shrink: Option<String>) -> anyhow::Result<Value> {
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
            plan: CheckpointPlan { micro, effective, max_length: job.train.max_length },
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
