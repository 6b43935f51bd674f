//! `rerankd score`: rank documents for a query with the base model or an adapter.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rerankd::model::device::DeviceChoice;
use rerankd::model::{LoraSet, Reranker};

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Checkpoint directory or Hugging Face repo id (resolved in the local HF cache).
    #[arg(long, default_value = "Qwen/Qwen3-Reranker-0.6B")]
    pub model: String,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub instruction: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    #[arg(long)]
    pub query: String,
    /// A document text; repeat for several.
    #[arg(long = "doc", required = true)]
    pub docs: Vec<String>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// One JSON line per document, in input order.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let device = a.device.open()?;
    let mut r = Reranker::load(&a.model, &device)?;
    if let Some(i) = a.instruction {
        r.instruction = i;
    }
    let lora = match &a.adapter {
        Some(dir) => Some(
            LoraSet::load(dir, &r.model.cfg, &device).with_context(|| format!("loading adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let pairs: Vec<(&str, &str)> = a.docs.iter().map(|d| (a.query.as_str(), d.as_str())).collect();
    let scores = r.score_pairs(&pairs, a.max_length, a.batch_size, lora.as_ref())?;
    if a.json {
        for (i, s) in scores.iter().enumerate() {
            let line =
                serde_json::json!({"index": i, "score": s.score, "yes_logit": s.yes_logit, "no_logit": s.no_logit});
            println!("{line}");
        }
    } else {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&x, &y| scores[y].score.total_cmp(&scores[x].score));
        println!("{:>4}  {:>8}  {:>5}  document", "rank", "score", "index");
        for (rank, &i) in order.iter().enumerate() {
            println!("{:>4}  {:>8.4}  {:>5}  {}", rank + 1, scores[i].score, i, preview(&a.docs[i]));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn preview(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 70 {
        format!("{}...", one_line.chars().take(67).collect::<String>())
    } else {
        one_line
    }
}
