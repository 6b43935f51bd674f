//! The memory plan of a run: the governor's first plan under the budget, and the plan a resumed
//! run trains under (its checkpoint's, reduced after a death under memory pressure).

use super::context::RunContext;
use crate::job::Job;
use crate::model::checkpoint::{CheckpointDir, SafetensorsWeights};
use crate::model::lora::LoraConfig;
use crate::store::events::{Cap, Event};
use crate::train::memory::{self, Estimate};

/// The memory plan a checkpoint was made under (the micro-batch may shrink on resume; the
/// effective batch never changes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct CheckpointPlan {
    pub(super) micro: u64,
    pub(super) effective: u64,
    pub(super) max_length: u64,
}

/// The memory governor, before anything big is loaded: estimates one micro-step from the
/// checkpoint's config and picks the largest micro-batch (then max_length) under the budget,
/// keeping the effective batch. Every change is a `cap` event; the returned job carries them.
/// `cpu`: the run is on the CPU, where attention is tiled (nothing quadratic in the length) and
/// the fused blocks keep less for the backward.
pub(super) fn govern(ctx: &mut RunContext, mut job: Job, ck: &CheckpointDir, cpu: bool) -> anyhow::Result<Job> {
    let cfg = ck.read_config()?;
    let embed_bytes = SafetensorsWeights::open(&ck.weights, &candle_core::Device::Cpu)?
        .dtype_bytes("model.embed_tokens.weight")
        .unwrap_or(4) as u64;
    let lcfg = lora_config(&job);
    let blocks = memory::Blocks::for_run(cpu, &lcfg.targets);
    let est = Estimate::for_model(&cfg, lcfg.param_count(&cfg), embed_bytes, blocks);
    let budget = job.memory_budget_mb;
    let t = &job.train;
    let p = memory::plan(&est, budget, t.batch_size as usize, t.grad_accum as usize, t.max_length as usize)
        .map_err(|e| anyhow::anyhow!("memory governor: {e}; raise memory_budget_mb or use a smaller model"))?;
    ctx.info(&format!(
        "memory: a micro-step of {} x {} tokens needs about {:.0} MB of the {budget} MB budget",
        p.micro_batch, p.max_length, p.estimate_mb
    ))?;
    for cap in &p.caps {
        ctx.log.append(Event::Cap(cap.clone()))?;
    }
    job.train.batch_size = p.micro_batch as u64;
    job.train.grad_accum = p.grad_accum as u64;
    job.train.max_length = p.max_length as u64;
    Ok(job)
}

/// A resumed run trains under its checkpoint's plan, not a new one (a new plan would change the
/// steps); after a death with evidence of memory pressure (`shrink`), under a micro-batch of at most 3/4 of it,
/// until the attempt crosses an epoch boundary (then the `planned` one again).
pub(super) fn replan(
    ctx: &mut RunContext,
    mut job: Job,
    plan: &CheckpointPlan,
    planned: u64,
    shrink: Option<&str>,
) -> anyhow::Result<Job> {
    let mut micro = plan.micro;
    if let Some(evidence) = shrink {
        let to = crate::budget::shrunk_micro_batch(plan.micro);
        let why = if to < plan.micro {
            format!(
                "the previous attempt died under memory pressure ({evidence}): resumed with at most 3/4 of its \
                 micro-batch, the same effective batch"
            )
        } else {
            // The same plan would meet the same end: say so, instead of dying again.
            anyhow::bail!(
                "the previous attempt died under memory pressure ({evidence}) with a micro-batch of {} row, which \
                 cannot shrink: raise memory_budget_mb or lower train.max_length",
                plan.micro
            );
        };
        ctx.log.append(Event::Cap(Cap { field: "train.batch_size".into(), from: plan.micro, to, why }))?;
        micro = to;
    }
    job.train.batch_size = micro;
    job.train.grad_accum = plan.effective.div_ceil(micro);
    // Shown by `status` while the run trains under less than it was planned with (until the next
    // epoch boundary, where it returns to the plan).
    let reduced = (micro < planned).then(|| {
        format!(
            "micro-batch {micro} (planned {planned}), effective batch {}: reduced after a death under memory \
             pressure, back to {planned} at the next epoch",
            plan.effective
        )
    });
    if reduced != ctx.status.plan {
        ctx.status.plan = reduced;
        ctx.status.write(&ctx.files.status())?;
    }
    job.train.max_length = plan.max_length;
    // The effective batch is the plan's, whatever batch_size x grad_accum rounds to.
    ctx.info(&format!(
        "resuming under the checkpoint's plan: micro-batch {micro}, effective batch {}, max_length {}",
        plan.effective, plan.max_length
    ))?;
    Ok(job)
}

/// The adapter the job asks for.
pub(super) fn lora_config(job: &Job) -> LoraConfig {
    LoraConfig::new(job.lora.r as usize, job.lora.alpha, job.lora.dropout, &job.lora.target_modules)
}
