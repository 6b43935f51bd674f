//! `cargo bench --bench checkpoint -- [--config C] [--n N] [--step-s S]`
//!
//! What a run's checkpoint costs on the Qwen3-0.6B shape (default) with LoRA r16 q/k/v/o: the
//! same `write_checkpoint` a run calls (LoRA tensors, the best epoch's adapter, AdamW's moments,
//! state.json, every file fsynced, the link swapped), N times; its size and median time, and the
//! overhead at the default interval (one checkpoint per `train.checkpoint_every_s` = 300 s of
//! training). `--step-s` adds the overhead per optimizer step of that many seconds when
//! checkpointing after every step (`checkpoint_every_s: 0`).

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use rerankd::model::Qwen3Config;
use rerankd::model::lora::{LoraConfig, LoraSet, Target};
use rerankd::store::paths::RunFiles;
use rerankd::train::optim::AdamW;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = arg("--config").map(Into::into).unwrap_or_else(|| here.join("tests/fixtures/qwen3-0.6b.config.json"));
    let n: usize = arg("--n").and_then(|v| v.parse().ok()).unwrap_or(9);
    let step_s: f64 = arg("--step-s").and_then(|v| v.parse().ok()).unwrap_or(4.0);
    let cfg = Qwen3Config::from_file(&config)?;
    let lcfg = LoraConfig::new(16, 32.0, 0.05, &[Target::Q, Target::K, Target::V, Target::O]);
    let lora = LoraSet::init(&lcfg, &cfg, 0, &Device::Cpu)?;
    let best = lora.snapshot()?;
    let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), 0.0)?;
    // Non-zero moments, as after a step.
    let grads: Vec<candle_core::Tensor> =
        lora.vars().iter().map(|v| v.as_tensor().ones_like()).collect::<candle_core::Result<_>>()?;
    opt.step(&grads, 1e-5)?;
    let params: usize = lora.vars().iter().map(|v| v.as_tensor().elem_count()).sum();
    let dir = tempfile::tempdir()?;
    let files = RunFiles::new(dir.path());
    let state = serde_json::json!({"version": 1, "attempt": 1, "cursor": {"step": 0}});
    let mut ms = Vec::new();
    let mut size = 0;
    for i in 0..n {
        let t0 = Instant::now();
        size = rerankd::runner::write_checkpoint(&files, &lora, Some(&best), &opt, &state, i as u64)?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "config": config.display().to_string(), "lora_params": params, "checkpoint_mb": size as f64 / 1e6,
            "checkpoints": n, "median_ms": median, "min_ms": ms[0], "max_ms": ms[ms.len() - 1],
            "overhead_at_300s": median / 300_000.0,
            "overhead_every_step": median / (step_s * 1000.0), "step_s": step_s,
        })
    );
    Ok(())
}
