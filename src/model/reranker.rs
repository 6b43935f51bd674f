//! The reranker: tokenizer + Qwen3 body + yes/no head, scoring (query, document) pairs in padded
//! batches. Training steps are `Qwen3::micro_step` on `Reranker::model`.

use candle_core::{Device, Tensor};

/// Batch size of scoring everywhere: evaluation, `rerankd score` and serve's default, so all of
/// them compute the same numbers.
pub const SCORE_BATCH: usize = 16;

use super::Result;
use super::checkpoint::{CheckpointDir, SafetensorsWeights};
use super::lora::LoraSet;
use super::prompt::PromptBuilder;
pub use super::qwen3::Batch;
use super::qwen3::{Adapters, PrefixCache, Qwen3};

/// The yes/no logits of one pair and its score, sigmoid(yes - no).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairLogits {
    pub yes_logit: f32,
    pub no_logit: f32,
    pub score: f32,
}

/// Below this many shared tokens a query's pairs are scored whole: the saving would not pay
/// for the separate pass.
pub const MIN_SHARED_PREFIX: usize = 16;

pub struct Reranker {
    pub model: Qwen3,
    pub prompt: PromptBuilder,
    pub instruction: String,
    /// The max_length the checkpoint was trained for, when it says so (an export does).
    pub max_length: Option<usize>,
}

impl Reranker {
    /// Loads a checkpoint directory or HF repo id.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::open(&CheckpointDir::resolve(spec)?, device)
    }

    /// Loads a checkpoint directory already resolved.
    pub fn open(ck: &CheckpointDir, device: &Device) -> Result<Self> {
        let cfg = ck.read_config()?;
        let prompt = PromptBuilder::from_file(&ck.tokenizer)?;
        let w = SafetensorsWeights::open(&ck.weights, device)?;
        let model = Qwen3::load(&cfg, &w, prompt.yes_id, prompt.no_id, device)?;
        let info = super::export::ExportInfo::read(&ck.dir);
        let instruction =
            info.as_ref().map_or_else(|| super::prompt::DEFAULT_INSTRUCTION.to_string(), |i| i.instruction.clone());
        Ok(Self { model, prompt, instruction, max_length: info.map(|i| i.max_length) })
    }

    pub fn encode(&self, query: &str, doc: &str, max_length: usize) -> Result<Vec<u32>> {
        self.prompt.encode_pair(&self.instruction, query, doc, max_length)
    }

    /// Right-pads `seqs` into one `[batch, longest]` tensor.
    pub fn batch(&self, seqs: &[&[u32]]) -> Result<Batch> {
        Batch::new(seqs, self.prompt.pad_id, self.model.device())
    }

    /// `[batch, 2]` logits `[no, yes]`, with LoRA when given, without dropout.
    pub fn logits(&self, batch: &Batch, lora: Option<&LoraSet>) -> Result<Tensor> {
        let mut ad = Adapters { lora, dropout: None, train: false };
        self.model.yes_no_logits(batch, &mut ad)
    }

    /// Scores tokenized prompts in one forward pass.
    pub fn score_ids(&self, seqs: &[&[u32]], lora: Option<&LoraSet>) -> Result<Vec<PairLogits>> {
        let batch = self.batch(seqs)?;
        pair_logits(&self.logits(&batch, lora)?)
    }

    /// The keys and values of `prefix` at every layer, for [`Reranker::score_after`].
    pub fn prefix_cache(&self, prefix: &[u32], lora: Option<&LoraSet>) -> Result<PrefixCache> {
        self.model.prefix_cache(prefix, &mut Adapters { lora, dropout: None, train: false })
    }

    /// The cache of `prefix`, reusing the longest beginning it shares with `earlier` (the
    /// template and instruction every prompt starts with, or the same query again) when that is
    /// at least [`MIN_SHARED_PREFIX`] tokens: only the rest is computed. Exact, because a
    /// position's keys and values depend only on the tokens up to it. `earlier` must have been
    /// computed with the same adapter.
    pub fn prefix_cache_reusing(
        &self,
        earlier: Option<&PrefixCache>,
        prefix: &[u32],
        lora: Option<&LoraSet>,
    ) -> Result<PrefixCache> {
        let common = earlier.map_or(0, |e| common_len(&e.tokens, prefix));
        let Some(earlier) = earlier.filter(|_| common >= MIN_SHARED_PREFIX) else {
            return self.prefix_cache(prefix, lora);
        };
        let mut base = earlier.truncated(common)?;
        if common == prefix.len() {
            base.reused = common;
            return Ok(base);
        }
        self.model.extend_prefix(&base, &prefix[common..], &mut Adapters { lora, dropout: None, train: false })
    }

    /// Scores prompts that are `cache`'s prefix followed by each of `tails`, in one forward pass
    /// over the tails' tokens only.
    pub fn score_after(
        &self,
        cache: &PrefixCache,
        tails: &[&[u32]],
        lora: Option<&LoraSet>,
    ) -> Result<Vec<PairLogits>> {
        let batch = self.batch(tails)?;
        let mut ad = Adapters { lora, dropout: None, train: false };
        pair_logits(&self.model.yes_no_logits_after(cache, &batch, &mut ad)?)
    }

    /// Scores prompts that all begin with `cache`'s prefix: each batch runs only the tokens
    /// after it. `rest[i]` must not be empty.
    pub fn score_after_prefix(
        &self,
        cache: &PrefixCache,
        rest: &[&[u32]],
        batch_size: usize,
        lora: Option<&LoraSet>,
    ) -> Result<Vec<PairLogits>> {
        in_length_batches(rest, batch_size, |seqs| self.score_after(cache, seqs, lora))
    }

    /// Scores (query, doc) pairs in batches of `batch_size` (grouped by length to pad little).
    /// Pairs of the same query share their prompt's beginning (template, instruction, query):
    /// when at least [`MIN_SHARED_PREFIX`] tokens are shared, that prefix is computed once per
    /// query ([`Reranker::score_after_prefix`]), and its template part once per call
    /// ([`Reranker::prefix_cache_reusing`]).
    pub fn score_pairs(
        &self,
        query_docs: &[(&str, &str)],
        max_length: usize,
        batch_size: usize,
        lora: Option<&LoraSet>,
    ) -> Result<Vec<PairLogits>> {
        let ids: Vec<Vec<u32>> =
            query_docs.iter().map(|(q, d)| self.encode(q, d, max_length)).collect::<Result<_>>()?;
        let mut out = vec![None; ids.len()];
        // Pairs by query, in first-seen order.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (q, _)) in query_docs.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| g == q) {
                Some((_, v)) => v.push(i),
                None => groups.push((q, vec![i])),
            }
        }
        let mut rest: Vec<usize> = Vec::new();
        // Each query's prefix reuses the template and instruction of the one before.
        let mut earlier: Option<PrefixCache> = None;
        for (_, members) in &groups {
            let first = &ids[members[0]];
            let seqs: Vec<&[u32]> = members.iter().map(|&i| ids[i].as_slice()).collect();
            let Some(p) = shared_prefix(&seqs) else {
                rest.extend(members);
                continue;
            };
            let tails: Vec<&[u32]> = members.iter().map(|&i| &ids[i][p..]).collect();
            let cache = self.prefix_cache_reusing(earlier.as_ref(), &first[..p], lora)?;
            for (&i, s) in members.iter().zip(self.score_after_prefix(&cache, &tails, batch_size, lora)?) {
                out[i] = Some(s);
            }
            earlier = Some(cache);
        }
        let seqs: Vec<&[u32]> = rest.iter().map(|&i| ids[i].as_slice()).collect();
        for (&i, s) in rest.iter().zip(in_length_batches(&seqs, batch_size, |b| self.score_ids(b, lora))?) {
            out[i] = Some(s);
        }
        Ok(out.into_iter().map(|s| s.expect("every pair scored")).collect())
    }
}

/// Scores `seqs` in batches of `batch_size`, shortest first so a batch pads little, with
/// `score` on each batch; the results in `seqs`' order.
fn in_length_batches(
    seqs: &[&[u32]],
    batch_size: usize,
    mut score: impl FnMut(&[&[u32]]) -> Result<Vec<PairLogits>>,
) -> Result<Vec<PairLogits>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out = vec![None; seqs.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i]).collect();
        for (&i, s) in chunk.iter().zip(score(&batch)?) {
            out[i] = Some(s);
        }
    }
    Ok(out.into_iter().map(|s| s.expect("every prompt scored")).collect())
}

/// How many leading tokens `a` and `b` share.
fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The longest token prefix all of `seqs` share, leaving each at least one token of its own,
/// when there are two or more and it is at least [`MIN_SHARED_PREFIX`] long: worth computing once.
pub fn shared_prefix(seqs: &[&[u32]]) -> Option<usize> {
    let (first, others) = seqs.split_first()?;
    let mut p = seqs.iter().map(|s| s.len().saturating_sub(1)).min()?;
    for s in others {
        p = p.min(common_len(first, s));
    }
    (seqs.len() >= 2 && p >= MIN_SHARED_PREFIX).then_some(p)
}

/// `[batch, 2]` logits `[no, yes]` as one [`PairLogits`] a row.
fn pair_logits(logits: &Tensor) -> Result<Vec<PairLogits>> {
    let l: Vec<Vec<f32>> = logits.detach().to_vec2()?;
    Ok(l.into_iter().map(|r| PairLogits { no_logit: r[0], yes_logit: r[1], score: sigmoid(r[1] - r[0]) }).collect())
}

pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) }
}
