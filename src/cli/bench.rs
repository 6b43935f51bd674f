//! `rerankd bench`: LoRA training micro-steps and scoring forwards on random weights of a config,
//! timed after one warm-up; one JSON line with medians, pairs/s, achieved GFLOP/s and peak RSS.
//! With `--docs N`: one query's N documents scored whole and with the shared prefix computed
//! once, alternating, with both pairs/s.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rerankd::model::Qwen3Config;
use rerankd::model::cpu::{Precision, set_precision};
use rerankd::model::device::DeviceChoice;
use rerankd::model::lora::{LoraConfig, LoraSet, Target};
use rerankd::model::qwen3::{Adapters, Batch, Qwen3, yes_no_loss};
use rerankd::model::random::RandomWeights;
use rerankd::train::metrics::{agreement_ndcg10, kendall_tau};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A Qwen3 config.json (e.g. tests/fixtures/qwen3-0.6b.config.json).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub length: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Scoring mode: one query with this many documents (0: the training/scoring bench).
    #[arg(long, default_value_t = 0)]
    pub docs: usize,
    /// Tokens of each document (scoring mode).
    #[arg(long, default_value_t = 200)]
    pub doc_len: usize,
    /// Tokens of the query (scoring mode); the prompt template adds 60 more to the shared prefix.
    #[arg(long, default_value_t = 16)]
    pub query_len: usize,
    /// Rows per scoring forward (scoring mode; evaluation and `score` use 16).
    #[arg(long, default_value_t = 16)]
    pub score_batch: usize,
    /// Time only training micro-steps or only scoring forwards (default: both).
    #[arg(long, value_enum)]
    pub only: Option<Only>,
    /// The precision of the frozen products (as `serve --precision`); bf16 times scoring only.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Ranking agreement of `--precision bf16` with f32 instead of timing: this many queries,
    /// each with `--docs` documents of `--doc-len` tokens (random), scored by the model packed
    /// both ways; prints the score differences, nDCG@10 of the bf16 order with the f32 order as
    /// the reference, Kendall's tau and top-1 agreement.
    #[arg(long, default_value_t = 0)]
    pub agreement: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Only {
    Train,
    Score,
}

/// Tokens of the prompt template and default instruction before the query.
const TEMPLATE_TOKENS: usize = 60;

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let cfg = Qwen3Config::from_file(&a.config)?;
    let device = a.device.open()?;
    let w = RandomWeights { seed: 0, dtype: candle_core::DType::BF16, device: device.clone() };
    if a.agreement > 0 {
        return agreement(&a, &cfg, &w, &device);
    }
    anyhow::ensure!(
        a.precision == Precision::F32 || a.only == Some(Only::Score) || a.docs > 0,
        "--precision bf16 is for scoring: add --only score (or --docs)"
    );
    set_precision(a.precision).map_err(anyhow::Error::msg)?;
    let model = Qwen3::load(&cfg, &w, 9693, 2152, &device)?;
    let lcfg = LoraConfig::new(a.lora_r, 2.0 * a.lora_r as f64, 0.0, &[Target::Q, Target::K, Target::V, Target::O]);
    let lora = LoraSet::init(&lcfg, &cfg, 0, &device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    if a.docs > 0 {
        return score_mode(&a, &cfg, &model, &lora, &mut rng, &device);
    }
    let seqs: Vec<Vec<u32>> =
        (0..a.batch).map(|_| (0..a.length).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect()).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let batch = Batch::new(&refs, 151643, &device)?;
    let labels: Vec<f32> = (0..a.batch).map(|i| (i % 2) as f32).collect();
    let weights = vec![1.0 / a.batch as f32; a.batch];

    let (mut step_ms, mut fwd_ms) = (Vec::new(), Vec::new());
    if a.only != Some(Only::Score) {
        model.ready_for_training();
    }
    for i in 0..=a.steps {
        if a.only == Some(Only::Score) {
            break;
        }
        let t0 = Instant::now();
        // The same work as `Qwen3::micro_step`, with the forward timed on its own.
        let t_fwd = rerankd::model::kernels::training(|| -> anyhow::Result<_> {
            let mut ad = Adapters { lora: Some(&lora), dropout: None, train: true };
            let loss = yes_no_loss(&model.yes_no_logits(&batch, &mut ad)?, &labels, &weights)?;
            device.synchronize()?;
            let t_fwd = t0.elapsed();
            let grads = loss.backward()?;
            device.synchronize()?;
            drop((grads, loss));
            Ok(t_fwd)
        })?;
        if i > 0 {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            fwd_ms.push(t_fwd.as_secs_f64() * 1e3);
        }
    }
    let mut score_ms = Vec::new();
    for i in 0..=a.steps {
        if a.only == Some(Only::Train) {
            break;
        }
        let t0 = Instant::now();
        let mut ad = Adapters { lora: Some(&lora), dropout: None, train: false };
        let l = model.yes_no_logits(&batch, &mut ad)?;
        let _ = l.to_vec2::<f32>()?;
        if i > 0 {
            score_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let step = median(&mut step_ms);
    let score_pairs_per_s = (a.batch as f64 / (median(&mut score_ms) / 1e3) * 1000.0).round() / 1000.0;
    let flops = train_flops(&cfg, a.batch, a.length, a.lora_r);
    let line = serde_json::json!({
        "step_ms_median": round1(step),
        "train_fwd_ms_median": round1(median(&mut fwd_ms)),
        "score_ms_median": round1(median(&mut score_ms)),
        "score_pairs_per_s": score_pairs_per_s,
        "peak_rss_mb": rerankd::sys::peak_memory_mb(),
        "gflops": round1(flops / (step / 1e3) / 1e9),
        "batch": a.batch,
        "length": a.length,
        "lora_r": a.lora_r,
        "steps": a.steps,
        "device": format!("{:?}", device.location()),
        "threads": rayon::current_num_threads(),
        "weights": model.weights_kind(),
        "cpu": rerankd::model::cpu::describe(),
        "matmul": rerankd::model::kernels::training(rerankd::model::kernels::matmul_kind),
        "score_matmul": rerankd::model::kernels::matmul_kind(),
        "precision": a.precision,
    });
    if super::json() {
        println!("{line}");
    } else {
        println!("{}", serde_json::to_string_pretty(&line)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// One query's documents, scored whole (batches of `score_batch`) and after a shared prefix,
/// alternating; medians and pairs/s of both.
fn score_mode(
    a: &BenchArgs,
    cfg: &Qwen3Config,
    model: &Qwen3,
    lora: &LoraSet,
    rng: &mut rand::rngs::StdRng,
    device: &candle_core::Device,
) -> anyhow::Result<ExitCode> {
    let mut tok = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect() };
    let prefix = tok(TEMPLATE_TOKENS + a.query_len);
    let docs: Vec<Vec<u32>> = (0..a.docs).map(|_| tok(a.doc_len)).collect();
    let whole: Vec<Vec<u32>> = docs.iter().map(|d| [prefix.as_slice(), d.as_slice()].concat()).collect();
    let (mut whole_ms, mut shared_ms) = (Vec::new(), Vec::new());
    for i in 0..=a.steps {
        let t0 = Instant::now();
        for chunk in whole.chunks(a.score_batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let mut ad = Adapters { lora: Some(lora), dropout: None, train: false };
            let _ = model.yes_no_logits(&Batch::new(&refs, 151643, device)?, &mut ad)?.to_vec2::<f32>()?;
        }
        let t1 = Instant::now();
        let mut ad = Adapters { lora: Some(lora), dropout: None, train: false };
        let cache = model.prefix_cache(&prefix, &mut ad)?;
        for chunk in docs.chunks(a.score_batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let _ =
                model.yes_no_logits_after(&cache, &Batch::new(&refs, 151643, device)?, &mut ad)?.to_vec2::<f32>()?;
        }
        if i > 0 {
            whole_ms.push((t1 - t0).as_secs_f64() * 1e3);
            shared_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (w, s) = (median(&mut whole_ms), median(&mut shared_ms));
    let line = serde_json::json!({
        "docs": a.docs, "doc_len": a.doc_len, "prefix_len": prefix.len(), "score_batch": a.score_batch,
        "whole_ms_median": round1(w), "shared_prefix_ms_median": round1(s),
        "whole_pairs_per_s": (a.docs as f64 / (w / 1e3) * 1000.0).round() / 1000.0,
        "shared_prefix_pairs_per_s": (a.docs as f64 / (s / 1e3) * 1000.0).round() / 1000.0,
        "speedup": (w / s * 1000.0).round() / 1000.0,
        "lora_r": a.lora_r, "steps": a.steps, "peak_rss_mb": rerankd::sys::peak_memory_mb(),
        "device": format!("{:?}", device.location()), "threads": rayon::current_num_threads(),
        "weights": model.weights_kind(),
        "cpu": rerankd::model::cpu::describe(),
        "matmul": rerankd::model::kernels::matmul_kind(),
        "precision": a.precision,
    });
    if super::json() {
        println!("{line}");
    } else {
        println!("{}", serde_json::to_string_pretty(&line)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--agreement`: the same random model packed for f32 and for bf16, the same queries and
/// documents scored by both (each query's documents after its shared prefix, as serve does).
fn agreement(
    a: &BenchArgs,
    cfg: &Qwen3Config,
    w: &RandomWeights,
    device: &candle_core::Device,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.docs >= 2, "--agreement needs --docs of at least 2");
    set_precision(Precision::F32).map_err(anyhow::Error::msg)?;
    let exact = Qwen3::load(cfg, w, 9693, 2152, device)?;
    set_precision(Precision::Bf16).map_err(anyhow::Error::msg)?;
    let reduced = Qwen3::load(cfg, w, 9693, 2152, device)?;
    set_precision(Precision::F32).map_err(anyhow::Error::msg)?;
    let lcfg = LoraConfig::new(a.lora_r, 2.0 * a.lora_r as f64, 0.0, &[Target::Q, Target::K, Target::V, Target::O]);
    // A trained adapter's B is not zero: a random B as well as A, so the LoRA path counts.
    let lora = LoraSet::init(&lcfg, cfg, 3, device)?;
    for layer in 0..cfg.num_hidden_layers {
        for t in [Target::Q, Target::K, Target::V, Target::O] {
            if let Some(p) = lora.get(layer, t) {
                let b = candle_core::Tensor::randn(0f32, 0.02, p.b.as_tensor().dims(), device)?;
                p.b.set(&b)?;
            }
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let scores = |model: &Qwen3, prefix: &[u32], docs: &[Vec<u32>]| -> anyhow::Result<Vec<f64>> {
        let mut ad = Adapters { lora: Some(&lora), dropout: None, train: false };
        let cache = model.prefix_cache(prefix, &mut ad)?;
        let mut out = Vec::new();
        for chunk in docs.chunks(a.score_batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let l =
                model.yes_no_logits_after(&cache, &Batch::new(&refs, 151643, device)?, &mut ad)?.to_vec2::<f32>()?;
            out.extend(l.iter().map(|r| f64::from(r[1] - r[0])));
        }
        Ok(out)
    };
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (mut max_diff, mut sum_diff, mut max_logit_diff, mut n) = (0f64, 0f64, 0f64, 0usize);
    let (mut ndcg, mut tau, mut top1) = (Vec::new(), Vec::new(), 0usize);
    for _ in 0..a.agreement {
        let mut tok = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect() };
        let prefix = tok(TEMPLATE_TOKENS + a.query_len);
        let docs: Vec<Vec<u32>> = (0..a.docs).map(|_| tok(a.doc_len)).collect();
        let (f, b) = (scores(&exact, &prefix, &docs)?, scores(&reduced, &prefix, &docs)?);
        for (x, y) in f.iter().zip(&b) {
            let d = (sigmoid(*x) - sigmoid(*y)).abs();
            (max_diff, sum_diff, n) = (max_diff.max(d), sum_diff + d, n + 1);
            max_logit_diff = max_logit_diff.max((x - y).abs());
        }
        ndcg.push(agreement_ndcg10(&f, &b));
        tau.push(kendall_tau(&f, &b));
        top1 += usize::from(argmax(&f) == argmax(&b));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let line = serde_json::json!({
        "agreement": "bf16 against f32", "queries": a.agreement, "docs": a.docs, "doc_len": a.doc_len,
        "prefix_len": TEMPLATE_TOKENS + a.query_len,
        "score_abs_diff_max": max_diff, "score_abs_diff_mean": sum_diff / n as f64,
        "logit_abs_diff_max": max_logit_diff,
        "ndcg10_mean": mean(&ndcg), "ndcg10_min": min(&ndcg),
        "kendall_tau_mean": mean(&tau), "kendall_tau_min": min(&tau),
        "top1_agreement": top1 as f64 / a.agreement as f64,
        "weights_f32": exact.weights_kind(), "weights_bf16": reduced.weights_kind(),
        "cpu": rerankd::model::cpu::describe(), "threads": rayon::current_num_threads(),
    });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap_or(0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// Analytic FLOPs of one LoRA training micro-step: the forward (2 per multiply-add over the
/// projections, full QK^T and PV), the backward's input gradients (same again for projections,
/// twice the attention), and LoRA's own small matmuls (x3 for forward + both gradients).
pub fn train_flops(c: &Qwen3Config, b: usize, t: usize, r: usize) -> f64 {
    let n = (b * t) as f64;
    let proj = c.body_params() as f64;
    let attn = 2.0 * 2.0 * (b * c.num_attention_heads * t * t * c.head_dim) as f64;
    let (d, q, kv) = (
        c.hidden_size as f64,
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
    );
    let lora = c.num_hidden_layers as f64 * r as f64 * ((d + q) + 2.0 * (d + kv) + (q + d));
    2.0 * n * proj * 2.0 + attn * 3.0 + 2.0 * n * lora * 3.0
}
