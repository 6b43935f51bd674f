//! The training loop: epochs of length-grouped micro-batches, gradient accumulation to the
//! effective batch, clipping, AdamW with warmup + cosine. Cancellation is checked before each
//! epoch, before each micro-batch and after each epoch; nothing but summed gradients is carried
//! between micro-batches, so memory per step is that of one micro-batch.

use std::time::Instant;

use crate::store::events::{self, Event, Log};

use super::data::{TrainPair, epoch_groups};
use super::optim::{Accumulator, AdamW, Schedule, clip_grad_norm};
use crate::model::qwen3::Dropout;
use crate::model::{LoraSet, Reranker};

/// Where the loop sends its events and asks whether to stop.
pub trait Reporter {
    /// An event of the run's log.
    fn event(&mut self, event: Event) -> anyhow::Result<()>;
    /// `Some(request)` once the run was asked to stop.
    fn stop_requested(&mut self) -> Option<crate::store::StopRequest>;
    /// Peak memory of this process so far, in MB.
    fn peak_mem_mb(&mut self) -> u64 {
        0
    }
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Pairs per optimizer step (the effective batch).
    pub effective: usize,
    /// Pairs per forward/backward pass (memory); an optimizer step sums ceil(effective / micro).
    pub micro_batch: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub seed: u64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub dropout: f64,
    /// The micro-batch the run was planned with, when this attempt runs under a smaller one
    /// (after a death under memory pressure): from the next epoch boundary on it trains with the
    /// planned one again ([`Self::micro_for`]).
    pub planned_micro: Option<usize>,
}

impl TrainConfig {
    /// The micro-batch of `epoch` in an attempt that started in `first_epoch`: the reduced one
    /// until the attempt crosses an epoch boundary, the planned one after.
    pub fn micro_for(&self, first_epoch: usize, epoch: usize) -> usize {
        match self.planned_micro {
            Some(m) if epoch > first_epoch => m,
            _ => self.micro_batch,
        }
    }
}

/// Where training stands: what a checkpoint records and a resumed run starts from.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Index, within `epoch`, of the next optimizer step.
    pub group: usize,
    /// `epoch`'s steps are done but its evaluation is not.
    pub eval_pending: bool,
    pub last_loss: Option<f32>,
}

/// A checkpoint's training state: the cursor and the optimizer's moments.
pub struct Resume {
    pub cursor: Cursor,
    pub m: Vec<candle_core::Tensor>,
    pub v: Vec<candle_core::Tensor>,
    pub t: i32,
}

/// Called after every optimizer step (`forced` false: the callee decides whether one is due) and
/// at a cooperative stop (`forced` true), with the state as of the last completed step.
pub type Checkpoint<'a> = dyn FnMut(&Cursor, &AdamW, bool, &mut dyn Reporter) -> anyhow::Result<()> + 'a;

/// What a completed training loop did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub steps: usize,
    pub last_loss: f32,
}

/// Trains `lora` in place on `pairs`, from `resume` when given. `after_epoch(epoch)` runs after
/// every epoch (evaluation, keeping the best epoch). A cancel request ends it with a
/// [`super::Cancelled`] error, after `checkpoint` was given the state of the last step.
#[allow(clippy::too_many_arguments)]
pub fn train(
    r: &Reranker,
    lora: &LoraSet,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    rep: &mut dyn Reporter,
    after_epoch: &mut dyn FnMut(usize, &mut dyn Reporter) -> anyhow::Result<()>,
    resume: Option<Resume>,
    checkpoint: &mut Checkpoint,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!pairs.is_empty(), "no training pairs");
    let per_epoch = pairs.len().div_ceil(cfg.effective.max(1));
    let total = per_epoch * cfg.epochs;
    let sched =
        Schedule { lr: cfg.lr, warmup_steps: (total as f64 * cfg.warmup_ratio).round() as usize, total_steps: total };
    let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), cfg.weight_decay)?;
    let mut cur = Cursor::default();
    match resume {
        Some(res) => {
            opt.restore(res.m, res.v, res.t)?;
            cur = res.cursor;
            let message = format!(
                "training resumed at step {} of {total} (epoch {}, step {} of {per_epoch} in it)",
                cur.step,
                cur.epoch + 1,
                cur.group
            );
            rep.event(training_log(message, total, pairs.len()))?;
        }
        None => {
            let message = format!("training: {total} optimizer steps over {} epochs", cfg.epochs);
            rep.event(training_log(message, total, pairs.len()))?
        }
    }
    match run_epochs(r, lora, pairs, cfg, rep, after_epoch, &mut opt, &mut cur, &sched, checkpoint) {
        Err(e) if e.downcast_ref::<super::Cancelled>().is_some() => {
            checkpoint(&cur, &opt, true, rep)?;
            Err(e)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(Outcome { steps: cur.step, last_loss: cur.last_loss.unwrap_or(f32::NAN) }),
    }
}

/// The loop proper; `cur` is always the state after the last completed step.
#[allow(clippy::too_many_arguments)]
fn run_epochs(
    r: &Reranker,
    lora: &LoraSet,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    rep: &mut dyn Reporter,
    after_epoch: &mut dyn FnMut(usize, &mut dyn Reporter) -> anyhow::Result<()>,
    opt: &mut AdamW,
    cur: &mut Cursor,
    sched: &Schedule,
    checkpoint: &mut Checkpoint,
) -> anyhow::Result<()> {
    let (first_step, first_epoch) = (cur.step, cur.epoch);
    for epoch in cur.epoch..cfg.epochs {
        super::check_cancel(rep)?;
        if !cur.eval_pending {
            let micro = cfg.micro_for(first_epoch, epoch);
            if micro != cfg.micro_batch && epoch == first_epoch + 1 {
                rep.event(Event::Log(Log::info(format!(
                    "back to the planned micro-batch of {micro} from epoch {}: this attempt trained under the \
                     reduced one ({}) without dying",
                    epoch + 1,
                    cfg.micro_batch
                ))))?;
            }
            let groups = epoch_groups(pairs, cfg.effective, micro, cfg.seed.wrapping_add(epoch as u64));
            for group in &groups[cur.group.min(groups.len())..] {
                let t0 = Instant::now();
                let step = cur.step;
                let n_pairs: usize = group.iter().map(Vec::len).sum();
                let mut acc = Accumulator::default();
                let (mut loss, mut tokens) = (0f32, 0usize);
                let mut dropout = Dropout::for_step(cfg.dropout, cfg.seed ^ 0x5eed, step as u64);
                for mb in group {
                    super::check_cancel(rep)?;
                    crate::testhooks::step_sleep();
                    crate::testhooks::alloc_at_step(step, first_step);
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
                anyhow::ensure!(
                    loss.is_finite() && grad_norm.is_finite(),
                    "loss or gradient is not finite at step {step}"
                );
                let lr = sched.lr_at(step);
                opt.step(&grads, lr)?;
                *cur =
                    Cursor { step: step + 1, epoch, group: cur.group + 1, eval_pending: false, last_loss: Some(loss) };
                let peak = rep.peak_mem_mb();
                rep.event(Event::Step(events::Step {
                    step: step as u64,
                    epoch: epoch as u64,
                    loss,
                    lr,
                    grad_norm,
                    step_time_ms: t0.elapsed().as_secs_f64() * 1e3,
                    pairs: n_pairs as u64,
                    tokens: tokens as u64,
                    peak_mem_mb: Some(peak),
                }))?;
                checkpoint(cur, opt, false, rep)?;
            }
            cur.eval_pending = true;
        }
        after_epoch(epoch, rep)?;
        *cur = Cursor { epoch: epoch + 1, group: 0, eval_pending: false, ..*cur };
        super::check_cancel(rep)?;
    }
    Ok(())
}

/// The `log` event that says how many optimizer steps the run takes (what `watch` sizes its bar by).
fn training_log(message: String, total: usize, pairs: usize) -> Event {
    Event::Log(Log { total_steps: Some(total as u64), pairs: Some(pairs as u64), ..Log::info(message) })
}
