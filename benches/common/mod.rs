#![allow(dead_code)] // each bench uses part of it

//! What both benches set up: a checkpoint of random weights of a config (with the fixture's
//! tokenizer) and a state root whose corpus `bench` has a LoRA r16 q/k/v/o adapter promoted on it,
//! as a run leaves it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rerankd::model::Qwen3Config;
use rerankd::model::lora::{LoraConfig, LoraSet, Target};
use rerankd::model::random::write_random_checkpoint;
use serde_json::json;

pub const RUN: &str = "bench__20261127_000000";

pub struct Setup {
    /// The checkpoint directory.
    pub model: PathBuf,
    pub root: PathBuf,
    /// The promoted adapter's directory.
    pub adapter: PathBuf,
}

pub fn setup(config: &Path, dir: &Path) -> anyhow::Result<Setup> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = dir.join("model");
    write_random_checkpoint(config, &here.join("tests/fixtures/tiny-qwen3/tokenizer.json"), &model)?;
    let cfg = Qwen3Config::from_file(config)?;
    let root = dir.join("root");
    let adapter = root.join("models/bench/adapters").join(RUN);
    let lcfg = LoraConfig::new(16, 32.0, 0.0, &[Target::Q, Target::K, Target::V, Target::O]);
    LoraSet::init(&lcfg, &cfg, 0, &Device::Cpu)?.save(&adapter, Some(&model.display().to_string()))?;
    let manifest = json!({"model": model.display().to_string(), "corpus": "bench", "run_id": RUN, "max_length": 512});
    std::fs::write(adapter.join("manifest.json"), manifest.to_string())?;
    std::os::unix::fs::symlink(Path::new("adapters").join(RUN), root.join("models/bench/current"))?;
    Ok(Setup { model, root, adapter })
}
