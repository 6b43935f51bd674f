//! `cargo bench --bench export -- [--config C]`
//!
//! `rerankd export` of a random-weight checkpoint of the config (default: the Qwen3-0.6B shape,
//! bf16) with a promoted LoRA r16 q/k/v/o adapter, in both forms and in bf16 and f32: the real
//! binary, one JSON line each with the exported size, the export's peak resident memory and
//! their ratio (the goal: under 2, since tensors are streamed, never two copies of the model).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(Into::into)
        .unwrap_or_else(|| here.join("tests/fixtures/qwen3-0.6b.config.json"));
    let tmp = tempfile::tempdir()?;
    let root = common::setup(&config, tmp.path())?.root;
    for (format, dtype) in [("merged", "bf16"), ("seq-cls", "bf16"), ("merged", "f32")] {
        let out = tmp.path().join(format!("{format}-{dtype}"));
        let t0 = Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_rerankd"))
            .arg("--root")
            .arg(&root)
            .args(["export", "--corpus", "bench", "--format", format, "--dtype", dtype, "--out"])
            .arg(&out)
            .output()?;
        anyhow::ensure!(o.status.success(), "export failed: {}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout)?;
        let mb = r["bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let peak = r["peak_rss_mb"].as_f64().unwrap_or(0.0) * 1.048576;
        println!(
            "{}",
            json!({"format": format, "dtype": dtype, "exported_mb": mb.round(), "peak_rss_mb": peak.round(),
                   "peak_over_size": ((peak / mb) * 100.0).round() / 100.0, "seconds": (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0})
        );
        std::fs::remove_dir_all(&out)?;
    }
    Ok(())
}
