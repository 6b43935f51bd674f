//! The training loop: epochs of length-grouped micro-batches, gradient accumulation to the
//! effective batch, clipping, AdamW with warmup + cosine. Cancellation is checked before each
//! epoch, before each micro-batch and after each epoch; nothing but summed gradients is carried
//! between micro-batches, so memory per step is that of one micro-batch.

use std::time::Instant;

use serde_json::{Value, json};

use super::data::{TrainPair, epoch_batches};
use super::optim::{Accumulator, AdamW, Schedule, clip_grad_norm};
use crate::model::qwen3::Dropout;
use crate::model::{LoraSet, Reranker};

/// Where the loop sends its events and asks whether to stop.
pub trait Reporter {
    /// A metrics event (`step`, `log`, `cap`, ...), fields as in DESIGN §6.
    fn event(&mut self, kind: &str, fields: Value) -> anyhow::Result<()>;
    /// `Some(reason)` once cancellation was requested.
    fn cancel_requested(&mut self) -> Option<String>;
    /// Peak memory of this process so far, in MB.
    fn peak_mem_mb(&mut self) -> u64 {
        0
    }
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub seed: u64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub dropout: f64,
}

/// What a completed training loop did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub steps: usize,
    pub last_loss: f32,
}

/// Trains `lora` in place on `pairs`. `after_epoch(epoch)` runs after every epoch (evaluation,
/// keeping the best epoch). A cancel request ends it with a [`super::Cancelled`] error.
pub fn train(
    r: &Reranker,
    lora: &LoraSet,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    rep: &mut dyn Reporter,
    after_epoch: &mut dyn FnMut(usize, &mut dyn Reporter) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!pairs.is_empty(), "no training pairs");
    let micro = cfg.micro_batch.max(1);
    // epoch_batches cuts windows of a multiple of `micro`, so an epoch has ceil(n / micro) batches.
    let per_epoch = pairs.len().div_ceil(micro).div_ceil(cfg.grad_accum.max(1));
    let total = per_epoch * cfg.epochs;
    let sched =
        Schedule { lr: cfg.lr, warmup_steps: (total as f64 * cfg.warmup_ratio).round() as usize, total_steps: total };
    rep.event(
        "log",
        json!({"level": "info", "message": format!("training: {total} optimizer steps over {} epochs", cfg.epochs),
               "total_steps": total, "pairs": pairs.len()}),
    )?;
    let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), cfg.weight_decay)?;
    let mut dropout = Dropout::new(cfg.dropout, cfg.seed ^ 0x5eed);
    let mut step = 0;
    let mut last_loss = f32::NAN;
    for epoch in 0..cfg.epochs {
        super::check_cancel(rep)?;
        let batches = epoch_batches(pairs, micro, cfg.seed.wrapping_add(epoch as u64));
        for group in batches.chunks(cfg.grad_accum.max(1)) {
            let t0 = Instant::now();
            let n_pairs: usize = group.iter().map(Vec::len).sum();
            let mut acc = Accumulator::default();
            let (mut loss, mut tokens) = (0f32, 0usize);
            for mb in group {
                super::check_cancel(rep)?;
                crate::testhooks::step_sleep();
                let seqs: Vec<&[u32]> = mb.iter().map(|&i| pairs[i].ids.as_slice()).collect();
                let labels: Vec<f32> = mb.iter().map(|&i| pairs[i].label).collect();
                let batch = r.batch(&seqs)?;
                tokens += batch.tokens;
                let weights = vec![1.0 / n_pairs as f32; mb.len()];
                let (l, grads) = r.model.micro_step(&batch, &labels, &weights, lora, Some(&mut dropout))?;
                loss += l;
                acc.add(grads)?;
            }
            let mut grads = acc.take().expect("a group has at least one micro-batch");
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            anyhow::ensure!(loss.is_finite() && grad_norm.is_finite(), "loss or gradient is not finite at step {step}");
            let lr = sched.lr_at(step);
            opt.step(&grads, lr)?;
            last_loss = loss;
            let peak = rep.peak_mem_mb();
            rep.event(
                "step",
                json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "step_time_ms": t0.elapsed().as_secs_f64() * 1e3, "pairs": n_pairs, "tokens": tokens,
                       "peak_mem_mb": peak}),
            )?;
            step += 1;
        }
        after_epoch(epoch, rep)?;
        super::check_cancel(rep)?;
    }
    Ok(Outcome { steps: step, last_loss })
}
