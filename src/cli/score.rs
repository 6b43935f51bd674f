//! `rerankd score`: rank documents for a query with a corpus's promoted adapter, an adapter
//! directory, or the base model. It calls the same `score_pairs` (same batch size) as evaluation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rerankd::model::Reranker;
use rerankd::model::device::DeviceChoice;
use rerankd::model::reranker::SCORE_BATCH;
use rerankd::store::{Root, models};
use rerankd::train::dataset::jsonl_documents;
use serde_json::json;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Checkpoint directory or Hugging Face repo id (default: the corpus adapter's base model,
    /// else Qwen/Qwen3-Reranker-0.6B).
    #[arg(long)]
    pub model: Option<String>,
    /// Use this corpus's promoted adapter (models/<corpus>/current).
    #[arg(long)]
    pub corpus: Option<String>,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long, conflicts_with = "corpus")]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub instruction: Option<String>,
    /// Default: the adapter's training max_length, else 512.
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub query: String,
    /// A document text; repeat for several.
    #[arg(long = "doc", required_unless_present = "docs")]
    pub doc: Vec<String>,
    /// Documents as JSONL `{id, text}`.
    #[arg(long, conflicts_with = "doc")]
    pub docs: Option<PathBuf>,
    #[arg(long, default_value_t = SCORE_BATCH)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// f32 (default), or bf16 (opt-in, as `serve --precision`).
    #[arg(long, default_value = "f32")]
    pub precision: rerankd::model::cpu::Precision,
}

pub fn run(root: &Root, a: ScoreArgs) -> anyhow::Result<ExitCode> {
    if let Err(why) = rerankd::model::cpu::set_precision(a.precision) {
        super::complain(why);
        return Ok(ExitCode::from(super::EXIT_REFUSED));
    }
    let adapter_dir = match (&a.corpus, &a.adapter) {
        (Some(c), _) => match models::current(root, &rerankd::ids::CorpusName::parse(c)?) {
            Some((_, dir)) => Some(dir),
            None if a.model.is_some() => {
                super::complain(format!("corpus `{c}` has no promoted adapter; scoring with the base model"));
                None
            }
            None => anyhow::bail!("corpus `{c}` has no promoted adapter (and no --model given)"),
        },
        (None, a) => a.clone(),
    };
    let adapter = adapter_dir.as_deref().map(models::Adapter::open_foreign).transpose()?;
    let model = a
        .model
        .clone()
        .or_else(|| adapter.as_ref().and_then(|m| m.base_model()).map(str::to_string))
        .unwrap_or_else(|| rerankd::job::DEFAULT_MODEL.into());
    let device = a.device.open()?;
    let mut r = Reranker::load(&model, &device)?;
    let max_length = a
        .max_length
        .or_else(|| adapter.as_ref().and_then(|m| m.max_length()))
        .or(r.max_length)
        .unwrap_or(models::DEFAULT_MAX_LENGTH);
    if let Some(i) =
        a.instruction.clone().or_else(|| adapter.as_ref().and_then(|m| m.instruction()).map(str::to_string))
    {
        r.instruction = i;
    }
    let lora = adapter.as_ref().map(|d| d.lora(&r.model.cfg, &device)).transpose()?;
    let (ids, texts): (Vec<Option<String>>, Vec<String>) = match &a.docs {
        Some(path) => {
            // Every input line, duplicates included: one output line per input.
            jsonl_documents(path, usize::MAX)?.into_iter().map(|(_, id, text)| (Some(id), text)).unzip()
        }
        None => a.doc.iter().map(|t| (None, t.clone())).unzip(),
    };
    let pairs: Vec<(&str, &str)> = texts.iter().map(|d| (a.query.as_str(), d.as_str())).collect();
    let scores = r.score_pairs(&pairs, max_length, a.batch_size, lora.as_ref())?;
    if super::json() {
        for (i, s) in scores.iter().enumerate() {
            let mut line = json!({"index": i, "score": s.score, "yes_logit": s.yes_logit, "no_logit": s.no_logit});
            if let Some(id) = &ids[i] {
                line["id"] = id.clone().into();
            }
            println!("{line}");
        }
    } else {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&x, &y| scores[y].score.total_cmp(&scores[x].score));
        println!("{:>4}  {:>8}  {:<24}  document", "rank", "score", "id");
        for (rank, &i) in order.iter().enumerate() {
            let id = ids[i].clone().unwrap_or_else(|| format!("#{i}"));
            println!("{:>4}  {:>8.4}  {:<24}  {}", rank + 1, scores[i].score, id, preview(&texts[i]));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn preview(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 60 {
        format!("{}...", one_line.chars().take(57).collect::<String>())
    } else {
        one_line
    }
}
