//! Hard negatives mined by the model (`train.hard_negatives`): before training, the baseline
//! scores candidate documents for each training query; the highest-scored ones that are not
//! positives, after skipping the first `skip_top` (often unlabeled positives), become up to
//! `top_k` negatives of the query, placed after its explicit ones. Scoring goes through the same
//! batched `score_pairs` as evaluation, and the number of pairs is bounded by `max_pairs`.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::dataset::{Judged, QueryRows, Source, insert_hard};
use crate::job::HardNegatives;
use crate::model::reranker::SCORE_BATCH;
use crate::model::{LoraSet, Reranker};

/// What mining did: the type the run's `log` event carries.
pub use crate::store::events::HardNegativesMined;

/// The candidates per query that fit the budget: `pool`, shrunk so all queries together score
/// at most `max_pairs` pairs (never below 2).
pub fn pool_size(cfg: &HardNegatives, queries: usize, corpus: usize) -> usize {
    let per = (cfg.max_pairs as usize / queries.max(1)).max(2);
    (cfg.pool as usize).min(per).min(corpus)
}

/// The candidate documents of one query: the whole corpus when it fits in `size`, else the
/// query's judged documents plus a seeded sample of the corpus.
fn candidates<'a>(
    q: &QueryRows,
    corpus: &'a [(Option<String>, String)],
    size: usize,
    seed: u64,
) -> Vec<&'a (Option<String>, String)> {
    if corpus.len() <= size {
        return corpus.iter().collect();
    }
    let judged: HashSet<&str> = q.positives.iter().chain(&q.negatives).map(|j| j.text.as_str()).collect();
    let mut out: Vec<&(Option<String>, String)> = corpus.iter().filter(|d| judged.contains(d.1.as_str())).collect();
    let mut rest: Vec<&(Option<String>, String)> = corpus.iter().filter(|d| !judged.contains(d.1.as_str())).collect();
    rest.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let room = size.saturating_sub(out.len());
    out.extend(rest.into_iter().take(room));
    out
}

/// The mined negatives of one query from its candidates' scores, best first.
pub fn pick(q: &QueryRows, cands: &[&(Option<String>, String)], scores: &[f32], cfg: &HardNegatives) -> Vec<Judged> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    // Highest score first; ties keep the candidates' order, so the result is deterministic.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let positive = |t: &str| q.positives.iter().any(|p| p.text == t);
    order
        .into_iter()
        .map(|i| cands[i])
        .filter(|d| !positive(&d.1))
        .skip(cfg.skip_top as usize)
        .filter(|d| !q.negatives.iter().any(|n| n.text == d.1))
        .take(cfg.top_k as usize)
        .map(|(id, text)| Judged { id: id.clone(), text: text.clone(), label: 0, source: Source::Hard })
        .collect()
}

/// Mines hard negatives for `queries` (the training queries) with the baseline `lora` (None: the
/// base model) over `corpus` documents. `cancelled` is asked between queries.
#[allow(clippy::too_many_arguments)]
pub fn mine(
    r: &Reranker,
    lora: Option<&LoraSet>,
    queries: &mut [QueryRows],
    corpus: &[(Option<String>, String)],
    cfg: &HardNegatives,
    max_length: usize,
    seed: u64,
    cancelled: &mut dyn FnMut() -> Option<crate::store::StopRequest>,
) -> anyhow::Result<HardNegativesMined> {
    let size = pool_size(cfg, queries.len(), corpus.len());
    let mut m = HardNegativesMined { queries: queries.len(), pool: size, ..HardNegativesMined::default() };
    for (i, q) in queries.iter_mut().enumerate() {
        if let Some(req) = cancelled() {
            return Err(super::Cancelled(req).into());
        }
        let cands = candidates(q, corpus, size, seed.wrapping_add(i as u64));
        let pairs: Vec<(&str, &str)> = cands.iter().map(|d| (q.query.as_str(), d.1.as_str())).collect();
        let scores: Vec<f32> = r.score_pairs(&pairs, max_length, SCORE_BATCH, lora)?.iter().map(|s| s.score).collect();
        m.pairs_scored += pairs.len();
        let hard = pick(q, &cands, &scores, cfg);
        m.added += insert_hard(q, hard);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(text: &str, source: Source) -> Judged {
        Judged { id: None, text: text.into(), label: 0, source }
    }

    #[test]
    fn picks_skip_positives_and_the_very_top_and_go_after_explicit_negatives() {
        let cfg = HardNegatives { top_k: 2, skip_top: 1, pool: 100, max_pairs: 1000 };
        let mut q = QueryRows {
            query: "q".into(),
            positives: vec![Judged { label: 1, ..j("pos", Source::Given) }],
            negatives: vec![j("told", Source::Signal), j("shown", Source::Shown), j("rand", Source::Random)],
        };
        let corpus: Vec<(Option<String>, String)> =
            ["pos", "a", "b", "c", "told", "d"].iter().map(|t| (None, t.to_string())).collect();
        let cands: Vec<&(Option<String>, String)> = corpus.iter().collect();
        // Ranked: pos (a positive), a (skipped: the very top), told (already a negative), c, b, d.
        let scores = [0.99, 0.9, 0.5, 0.6, 0.8, 0.1];
        let hard = pick(&q, &cands, &scores, &cfg);
        assert_eq!(hard.iter().map(|h| h.text.as_str()).collect::<Vec<_>>(), ["c", "b"]);
        assert_eq!(insert_hard(&mut q, hard), 2);
        let order: Vec<(&str, Source)> = q.negatives.iter().map(|n| (n.text.as_str(), n.source)).collect();
        assert_eq!(
            order,
            [
                ("told", Source::Signal),
                ("c", Source::Hard),
                ("b", Source::Hard),
                ("shown", Source::Shown),
                ("rand", Source::Random)
            ]
        );
    }

    #[test]
    fn the_pool_shrinks_to_the_pair_budget_and_keeps_judged_documents() {
        let cfg = HardNegatives { top_k: 5, skip_top: 0, pool: 100, max_pairs: 300 };
        assert_eq!(pool_size(&cfg, 10, 1000), 30);
        assert_eq!(pool_size(&cfg, 1000, 1000), 2);
        assert_eq!(pool_size(&cfg, 1, 40), 40);
        let corpus: Vec<(Option<String>, String)> = (0..1000).map(|i| (None, format!("doc {i}"))).collect();
        let q = QueryRows {
            query: "q".into(),
            positives: vec![Judged { label: 1, ..j("doc 977", Source::Given) }],
            negatives: vec![j("doc 5", Source::Signal)],
        };
        let c = candidates(&q, &corpus, 30, 7);
        assert_eq!(c.len(), 30);
        assert!(c.iter().any(|d| d.1 == "doc 977") && c.iter().any(|d| d.1 == "doc 5"));
        assert_eq!(c, candidates(&q, &corpus, 30, 7), "seeded");
    }
}
