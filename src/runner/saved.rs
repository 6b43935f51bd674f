//! A run's checkpoint as the run writes and reads it: the files (`write_checkpoint`) and the
//! state file's format (`Saved`, sealed by `store::checkpoint`).

use std::collections::BTreeMap;

use super::plan::CheckpointPlan;
use crate::model::LoraSet;
use crate::store::checkpoint;
use crate::store::events::SnapshotFields;
use crate::store::paths::RunFiles;
use crate::train::eval::EvalResult;
use crate::train::optim::AdamW;
use crate::train::trainer::Cursor;

/// What materialising found that a resumed run cannot recompute from its files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Restored {
    pub(super) skipped: BTreeMap<String, usize>,
    pub(super) no_dev: Option<String>,
    pub(super) feedback: Option<SnapshotFields>,
}

/// One epoch's evaluation on the dev lists, as the checkpoint keeps it and eval.json lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct EpochEval {
    pub(super) epoch: usize,
    pub(super) metrics: BTreeMap<String, f64>,
}

/// A checkpoint's `state.json`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Saved {
    pub(super) version: u32,
    /// The attempt that wrote it: a run interrupted again before writing a newer one made no
    /// progress.
    pub(super) attempt: u32,
    pub(super) cursor: Cursor,
    pub(super) optimizer_t: i32,
    pub(super) plan: CheckpointPlan,
    /// The micro-batch the run was first planned with, when `plan` is smaller (a shrink after a
    /// death under memory pressure; absent in checkpoints of older runs: `plan.micro`).
    #[serde(default)]
    pub(super) planned: Option<u64>,
    pub(super) baseline: Baseline,
    pub(super) materialised: Restored,
    pub(super) epochs: Vec<EpochEval>,
    pub(super) best: Option<(usize, EvalResult)>,
}

/// Writes one checkpoint of a run: the LoRA tensors, the best epoch's adapter, the optimizer's
/// moments, then `state` (the commit); returns its size in bytes.
pub fn write_checkpoint(
    files: &RunFiles,
    lora: &LoraSet,
    best: Option<&LoraSet>,
    opt: &AdamW,
    state: &impl serde::Serialize,
    step: u64,
) -> anyhow::Result<u64> {
    let p = checkpoint::begin(files)?;
    lora.save(&p.dir.join("lora"), None)?;
    if let Some(b) = best {
        b.save(&p.dir.join("best"), None)?;
    }
    let (m, v, _) = opt.state();
    let mut moments = std::collections::HashMap::new();
    for (i, (m, v)) in m.iter().zip(v).enumerate() {
        moments.insert(format!("m.{i}"), m.clone());
        moments.insert(format!("v.{i}"), v.clone());
    }
    candle_core::safetensors::save(&moments, p.dir.join("optimizer.safetensors"))?;
    Ok(p.commit(state, step)?)
}

/// What the baseline scored: on dev (None without a dev split or a usable baseline) and on the
/// held-out lists of earlier promotions.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Baseline {
    pub(super) what: String,
    pub(super) dev: Result<EvalResult, String>,
    pub(super) heldout: Option<EvalResult>,
}
