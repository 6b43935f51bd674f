//! Is a candidate really better than the baseline? Both are measured on the same dev queries, so
//! the question is about the per-query differences `d_i = candidate_i - baseline_i`:
//!
//! - a **paired bootstrap** percentile interval of their mean: resample the queries with
//!   replacement `resamples` times (seeded), take each resample's mean difference, and read the
//!   `(1 - level) / 2` and `(1 + level) / 2` quantiles of those means;
//! - a **paired randomization** (sign-flip) two-sided p-value: under "no difference" each `d_i`
//!   is as likely to have come out as `-d_i`; the p-value is the share of sign assignments whose
//!   |mean| is at least the observed |mean|. Exact (all `2^n` assignments) up to
//!   [`EXACT_MAX_QUERIES`] queries, else `resamples` seeded random assignments with the usual
//!   `(1 + hits) / (1 + resamples)` correction.
//!
//! Both are deterministic for a seed.

use rand::{Rng, SeedableRng};

/// Up to this many queries the randomization test enumerates every sign assignment (2^16).
pub const EXACT_MAX_QUERIES: usize = 16;

/// What the comparison found: the event log's type, since the `promote` event carries it.
pub use crate::store::events::Comparison;

/// Compares per-query values of the same queries, in the same order.
pub fn compare(candidate: &[f64], baseline: &[f64], resamples: usize, level: f64, seed: u64) -> Comparison {
    assert_eq!(candidate.len(), baseline.len(), "paired values");
    let diffs: Vec<f64> = candidate.iter().zip(baseline).map(|(c, b)| c - b).collect();
    Comparison {
        difference: mean(&diffs),
        ci: bootstrap_ci(&diffs, resamples, level, seed),
        level,
        p_value: randomization_p(&diffs, resamples, seed ^ 0x5eed),
        queries: diffs.len(),
        resamples,
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// The percentile bootstrap interval of the mean of `diffs`. Quantile `q` of the sorted means
/// `m[0..R]` is `m[floor(q (R - 1) + 0.5)]` (the nearest rank).
pub fn bootstrap_ci(diffs: &[f64], resamples: usize, level: f64, seed: u64) -> [f64; 2] {
    let n = diffs.len();
    if n == 0 || resamples == 0 {
        return [0.0, 0.0];
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> =
        (0..resamples).map(|_| (0..n).map(|_| diffs[rng.random_range(0..n)]).sum::<f64>() / n as f64).collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (resamples - 1) as f64) + 0.5).floor() as usize];
    [at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)]
}

/// The two-sided paired randomization (sign-flip) p-value of the mean of `diffs`.
pub fn randomization_p(diffs: &[f64], resamples: usize, seed: u64) -> f64 {
    let n = diffs.len();
    if n == 0 {
        return 1.0;
    }
    let observed = diffs.iter().sum::<f64>().abs();
    // A flipped sum that equals the observed one up to rounding counts as "at least as extreme".
    let tol = 1e-12 * diffs.iter().map(|d| d.abs()).sum::<f64>().max(1.0);
    let extreme = |signs: &mut dyn FnMut(usize) -> bool| {
        let s: f64 = diffs.iter().enumerate().map(|(i, d)| if signs(i) { -d } else { *d }).sum();
        s.abs() >= observed - tol
    };
    if n <= EXACT_MAX_QUERIES {
        let total = 1u64 << n;
        let hits = (0..total).filter(|mask| extreme(&mut |i| mask >> i & 1 == 1)).count();
        return hits as f64 / total as f64;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let hits = (0..resamples).filter(|_| extreme(&mut |_| rng.random_bool(0.5))).count();
    (1 + hits) as f64 / (1 + resamples) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P(X <= k) for X ~ Binomial(n, p), computed directly.
    fn binom_cdf(k: usize, n: usize, p: f64) -> f64 {
        let mut c = 1f64; // C(n, 0)
        let mut sum = 0.0;
        for i in 0..=k {
            if i > 0 {
                c = c * (n - i + 1) as f64 / i as f64;
            }
            sum += c * p.powi(i as i32) * (1.0 - p).powi((n - i) as i32);
        }
        sum
    }

    #[test]
    fn bootstrap_of_a_zero_one_difference_matches_the_binomial_quantiles() {
        // 10 of 20 queries improved by exactly 1: a resample's mean is Binomial(20, 0.5) / 20,
        // whose 2.5% and 97.5% quantiles are known exactly.
        let diffs: Vec<f64> = (0..20).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let q = |target: f64| (0..=20).find(|&k| binom_cdf(k, 20, 0.5) >= target).unwrap() as f64 / 20.0;
        let (lo, hi) = (q(0.025), q(0.975));
        assert_eq!((lo, hi), (0.3, 0.7), "the binomial quantiles, by hand: P(X<=5)=0.021, P(X<=6)=0.058");
        for seed in 0..5 {
            assert_eq!(bootstrap_ci(&diffs, 10_000, 0.95, seed), [lo, hi], "seed {seed}");
        }
    }

    #[test]
    fn bootstrap_of_a_normal_sample_has_the_textbook_width() {
        // 400 draws of N(0.05, 0.2^2) (Box-Muller on a seeded generator): the interval of the
        // mean is close to mean +- 1.96 * s / sqrt(n).
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let diffs: Vec<f64> = (0..400)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                0.05 + 0.2 * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
            })
            .collect();
        let m = mean(&diffs);
        let s = (diffs.iter().map(|d| (d - m).powi(2)).sum::<f64>() / 399.0).sqrt();
        let half = 1.96 * s / 20.0;
        let [lo, hi] = bootstrap_ci(&diffs, 10_000, 0.95, 7);
        assert!(((hi - lo) / (2.0 * half) - 1.0).abs() < 0.06, "width {} vs {}", hi - lo, 2.0 * half);
        assert!(((lo + hi) / 2.0 - m).abs() < 0.1 * half, "centre {} vs mean {m}", (lo + hi) / 2.0);
    }

    #[test]
    fn bootstrap_is_deterministic_and_one_changed_query_in_fifteen_leaves_zero_inside() {
        let mut diffs = vec![0.0; 15];
        diffs[3] = 0.6;
        // A resample misses query 3 with probability (14/15)^15 = 0.355 > 0.025: the lower bound
        // is exactly 0.
        let ci = bootstrap_ci(&diffs, 10_000, 0.95, 1);
        assert_eq!(ci[0], 0.0);
        assert!(ci[1] > 0.0);
        assert_eq!(ci, bootstrap_ci(&diffs, 10_000, 0.95, 1));
        assert_eq!(bootstrap_ci(&[0.25; 7], 1000, 0.95, 3), [0.25, 0.25]);
    }

    #[test]
    fn exact_randomization_p_values_by_hand() {
        // Five equal improvements: only all-plus and all-minus reach |sum| 5: 2 of 32.
        assert_eq!(randomization_p(&[1.0; 5], 0, 0), 2.0 / 32.0);
        // [3, 1, 1]: sums of +-3 +-1 +-1 are 5, 3, 3, 1 and their negatives; |sum| >= 5 in 2 of 8.
        assert_eq!(randomization_p(&[3.0, 1.0, 1.0], 0, 0), 2.0 / 8.0);
        // [2, -1]: sums 1, 3, -3, -1: |sum| >= 1 always.
        assert_eq!(randomization_p(&[2.0, -1.0], 0, 0), 1.0);
        // One non-zero difference: every flip has the same |sum|: p = 1.
        let mut d = vec![0.0; 15];
        d[0] = 0.4;
        assert_eq!(randomization_p(&d, 0, 0), 1.0);
    }

    #[test]
    fn sampled_randomization_agrees_with_the_exact_one() {
        // 20 queries: sampled; the exact value for the same differences comes from enumerating
        // all 2^20 assignments here.
        let diffs: Vec<f64> = (0..20).map(|i| ((i * 7 % 11) as f64 - 3.0) / 10.0).collect();
        let observed = diffs.iter().sum::<f64>().abs();
        let exact = (0u64..1 << 20)
            .filter(|mask| {
                let s: f64 = diffs.iter().enumerate().map(|(i, d)| if mask >> i & 1 == 1 { -d } else { *d }).sum();
                s.abs() >= observed - 1e-9
            })
            .count() as f64
            / (1u64 << 20) as f64;
        let sampled = randomization_p(&diffs, 20_000, 9);
        assert!((sampled - exact).abs() < 0.01, "sampled {sampled} exact {exact}");
        assert_eq!(sampled, randomization_p(&diffs, 20_000, 9));
    }
}
