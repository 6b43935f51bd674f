//! Listwise evaluation: every dev query's candidate list is scored with the reranker (the same
//! `score_pairs` that `rerankd score` uses), ranked, and measured; metrics are query means.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::dataset::DevList;
use super::metrics::rank_and_measure;
use crate::model::{LoraSet, Reranker};

pub use crate::model::reranker::SCORE_BATCH;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredList {
    pub query: String,
    /// Each document's id: its own, or for a text without one a content id (`sha256:...`).
    pub ids: Vec<String>,
    /// Each document's first 80 characters, so a person can tell which got which score.
    pub texts: Vec<String>,
    pub labels: Vec<u8>,
    pub scores: Vec<f32>,
    /// This query's own metric values (the result's metrics are their means).
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    /// ndcg@10, mrr@10, recall@10, map: means over the dev queries.
    pub metrics: BTreeMap<String, f64>,
    pub queries: usize,
    pub lists: Vec<ScoredList>,
}

impl EvalResult {
    /// `metric`'s value on each query, in list order: what significance tests pair up.
    pub fn per_query(&self, metric: &str) -> Vec<f64> {
        self.lists.iter().map(|l| l.metrics.get(metric).copied().unwrap_or(0.0)).collect()
    }
}

const METRIC_NAMES: [&str; 4] = ["ndcg@10", "mrr@10", "recall@10", "map"];

/// Scores and measures `lists`; a [`super::Cancelled`] error if `cancelled()` gives a stop request
/// between lists.
pub fn evaluate(
    r: &Reranker,
    lora: Option<&LoraSet>,
    lists: &[DevList],
    max_length: usize,
    cancelled: &mut dyn FnMut() -> Option<crate::store::StopRequest>,
) -> anyhow::Result<EvalResult> {
    let mut sums = [0f64; 4];
    let mut scored = Vec::with_capacity(lists.len());
    for l in lists {
        if let Some(req) = cancelled() {
            return Err(super::Cancelled(req).into());
        }
        let pairs: Vec<(&str, &str)> = l.docs.iter().map(|d| (l.query.as_str(), d.as_str())).collect();
        let scores: Vec<f32> = r.score_pairs(&pairs, max_length, SCORE_BATCH, lora)?.iter().map(|s| s.score).collect();
        let m = rank_and_measure(&scores, &l.labels, 10);
        let values = [m.ndcg, m.mrr, m.recall, m.ap];
        for (s, v) in sums.iter_mut().zip(values) {
            *s += v;
        }
        let metrics = METRIC_NAMES.iter().zip(values).map(|(k, v)| (k.to_string(), v)).collect();
        let ids = l
            .ids
            .iter()
            .zip(&l.docs)
            .map(|(id, text)| id.clone().unwrap_or_else(|| crate::store::feedback::content_id(text)))
            .collect();
        let texts = l.docs.iter().map(|d| d.chars().take(80).collect()).collect();
        scored.push(ScoredList { query: l.query.clone(), ids, texts, labels: l.labels.clone(), scores, metrics });
    }
    let n = lists.len().max(1) as f64;
    let metrics = METRIC_NAMES.iter().zip(sums).map(|(k, s)| (k.to_string(), s / n)).collect();
    Ok(EvalResult { metrics, queries: lists.len(), lists: scored })
}
