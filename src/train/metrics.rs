//! Listwise ranking metrics on one query's ranked list: nDCG@k (graded gains 2^rel - 1), MRR@k,
//! Recall@k and average precision. Labels are graded 0..=3; relevant means label > 0.

/// Metrics of one ranking: `labels` in ranked order (best first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListMetrics {
    pub ndcg: f64,
    pub mrr: f64,
    pub recall: f64,
    pub ap: f64,
}

fn dcg(labels: &[u8], k: usize) -> f64 {
    labels.iter().take(k).enumerate().map(|(i, &l)| (2f64.powi(l as i32) - 1.0) / ((i + 2) as f64).log2()).sum()
}

/// Metrics at cutoff `k` (AP over the whole list). A list without any relevant item scores 0
/// everywhere (callers skip such lists).
pub fn list_metrics(ranked_labels: &[u8], k: usize) -> ListMetrics {
    let mut ideal = ranked_labels.to_vec();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg = dcg(&ideal, k);
    let ndcg = if idcg > 0.0 { dcg(ranked_labels, k) / idcg } else { 0.0 };
    let mrr = ranked_labels.iter().take(k).position(|&l| l > 0).map(|p| 1.0 / (p + 1) as f64).unwrap_or(0.0);
    let relevant = ranked_labels.iter().filter(|&&l| l > 0).count();
    let found = ranked_labels.iter().take(k).filter(|&&l| l > 0).count();
    let recall = if relevant > 0 { found as f64 / relevant as f64 } else { 0.0 };
    let (mut hits, mut sum) = (0usize, 0f64);
    for (i, &l) in ranked_labels.iter().enumerate() {
        if l > 0 {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    let ap = if relevant > 0 { sum / relevant as f64 } else { 0.0 };
    ListMetrics { ndcg, mrr, recall, ap }
}

/// Orders `labels` by `scores`, best first (ties keep input order), and computes the metrics.
pub fn rank_and_measure(scores: &[f32], labels: &[u8], k: usize) -> ListMetrics {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let ranked: Vec<u8> = order.iter().map(|&i| labels[i]).collect();
    list_metrics(&ranked, k)
}

/// How far a second scoring (`got`, e.g. `--precision bf16`) keeps a reference ranking (`want`):
/// nDCG@10 of the order `got` gives, the reference order `want` giving the gains: its top
/// document 10, the next 9, ..., its eleventh and below 0 (1.0 when the top 10 agree in order).
pub fn agreement_ndcg10(want: &[f64], got: &[f64]) -> f64 {
    let order = |s: &[f64]| {
        let mut o: Vec<usize> = (0..s.len()).collect();
        o.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
        o
    };
    let mut gain = vec![0f64; want.len()];
    for (rank, &i) in order(want).iter().enumerate().take(10) {
        gain[i] = (10 - rank) as f64;
    }
    let dcg = |o: &[usize]| o.iter().take(10).enumerate().map(|(r, &i)| gain[i] / (r as f64 + 2.0).log2()).sum::<f64>();
    dcg(&order(got)) / dcg(&order(want))
}

/// Kendall's tau-b of two score lists.
pub fn kendall_tau(x: &[f64], y: &[f64]) -> f64 {
    let (mut c, mut d, mut tx, mut ty) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            let (a, b) = ((x[i] - x[j]).signum(), (y[i] - y[j]).signum());
            match (x[i] == x[j], y[i] == y[j]) {
                (true, true) => {}
                (true, false) => tx += 1.0,
                (false, true) => ty += 1.0,
                _ if a == b => c += 1.0,
                _ => d += 1.0,
            }
        }
    }
    (c - d) / ((c + d + tx) * (c + d + ty)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_measures() {
        let a = [0.9, 0.1, 0.5, 0.3];
        assert_eq!(kendall_tau(&a, &a), 1.0);
        assert_eq!(kendall_tau(&a, &[0.1, 0.9, 0.5, 0.7]), -1.0);
        assert!((agreement_ndcg10(&a, &a) - 1.0).abs() < 1e-12);
        // The reversed order: gains 7, 8, 9, 10 where the reference has 10, 9, 8, 7.
        let dcg = |g: [f64; 4]| g.iter().enumerate().map(|(r, x)| x / (r as f64 + 2.0).log2()).sum::<f64>();
        let want = dcg([7.0, 8.0, 9.0, 10.0]) / dcg([10.0, 9.0, 8.0, 7.0]);
        assert!((agreement_ndcg10(&a, &[0.1, 0.9, 0.5, 0.7]) - want).abs() < 1e-12);
        assert!(want < 0.95);
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn binary_lists_by_hand() {
        // Relevant at ranks 2 and 4 of 5.
        let m = list_metrics(&[0, 1, 0, 1, 0], 10);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2();
        close(m.ndcg, dcg / idcg);
        close(m.mrr, 0.5);
        close(m.recall, 1.0);
        close(m.ap, (1.0 / 2.0 + 2.0 / 4.0) / 2.0);
        // Perfect and worst orders.
        close(list_metrics(&[1, 0, 0], 10).ndcg, 1.0);
        close(list_metrics(&[0, 0, 1], 10).mrr, 1.0 / 3.0);
    }

    #[test]
    fn graded_ndcg_by_hand() {
        // Gains 2^rel - 1: ranking [1, 3, 0, 2] vs ideal [3, 2, 1, 0].
        let m = list_metrics(&[1, 3, 0, 2], 10);
        let dcg = 1.0 / 1.0 + 7.0 / 3f64.log2() + 0.0 + 3.0 / 5f64.log2();
        let idcg = 7.0 / 1.0 + 3.0 / 3f64.log2() + 1.0 / 2.0;
        close(m.ndcg, dcg / idcg);
    }

    #[test]
    fn cutoff_at_ten() {
        // The only relevant item at rank 11: nothing within @10.
        let mut labels = vec![0u8; 12];
        labels[10] = 1;
        let m = list_metrics(&labels, 10);
        close(m.ndcg, 0.0);
        close(m.mrr, 0.0);
        close(m.recall, 0.0);
        close(m.ap, 1.0 / 11.0);
        // Two relevant, one inside the cutoff.
        labels[0] = 1;
        close(list_metrics(&labels, 10).recall, 0.5);
    }

    #[test]
    fn ranking_by_scores() {
        let m = rank_and_measure(&[0.1, 0.9, 0.5], &[1, 0, 0], 10);
        close(m.mrr, 1.0 / 3.0);
    }
}
