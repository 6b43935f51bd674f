//! Whether a run's candidate replaces the corpus's adapter: the `promote` policy applied to the
//! evidence, per-query metric values of candidate and baseline on the dev lists and on earlier
//! promotions' held-out lists. A pure function, so every rule is tested on constructed values.
//!
//! - `if_significant` (the default): at least `eval.min_dev_queries` dev queries, the paired
//!   bootstrap interval of the dev difference lies above `eval.epsilon`, and the candidate is not
//!   significantly worse on the held-out lists (their interval's upper bound below 0).
//! - `if_improves`: at least `eval.min_dev_queries` dev queries and the dev mean above the
//!   baseline's by more than `eval.epsilon`.
//! - `always`, `never`: as said. Every policy reports the comparisons it has.

use serde::Serialize;

use super::significance::{Comparison, compare};
use crate::job::Promote;

/// Per-query values of the primary metric, paired: the same queries in the same order.
#[derive(Debug, Clone, Default)]
pub struct Paired {
    pub candidate: Vec<f64>,
    pub baseline: Vec<f64>,
}

/// What the decision is made from.
#[derive(Debug, Clone)]
pub struct Evidence<'a> {
    pub primary: &'a str,
    /// Dev values, or why there are none (no dev split, baseline unknown, no candidate).
    pub dev: Result<Paired, String>,
    /// Held-out values of earlier promotions, when there are any.
    pub heldout: Option<Paired>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub epsilon: f64,
    pub min_dev_queries: usize,
    pub confidence: f64,
    pub resamples: usize,
    pub seed: u64,
    pub dev_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub promoted: bool,
    /// The rule applied, in words.
    pub rule: String,
    /// Why, in words, with the numbers.
    pub reason: String,
    pub dev: Option<Comparison>,
    pub heldout: Option<Comparison>,
}

/// "+0.031 ndcg@10, 95% CI [-0.012, +0.074] over 15 queries (p = 0.2100)".
pub fn describe(c: &Comparison, metric: &str) -> String {
    format!(
        "{:+.3} {metric}, {:.0}% CI [{:+.3}, {:+.3}] over {} queries ({})",
        c.difference,
        c.level * 100.0,
        c.ci[0],
        c.ci[1],
        c.queries,
        p_text(c.p_value)
    )
}

fn p_text(p: f64) -> String {
    if p < 1e-4 { "p < 0.0001".into() } else { format!("p = {p:.4}") }
}

pub fn decide(policy: Promote, ev: &Evidence, s: &Settings) -> Decision {
    let cmp = |p: &Paired| compare(&p.candidate, &p.baseline, s.resamples, s.confidence, s.seed);
    let dev = ev.dev.as_ref().ok().map(cmp);
    let heldout = ev.heldout.as_ref().filter(|h| !h.candidate.is_empty()).map(cmp);
    let m = ev.primary;
    let level = format!("{:.0}%", s.confidence * 100.0);
    let (rule, verdict): (String, Result<String, String>) = match policy {
        Promote::Never => ("never".into(), Err("policy `never`".into())),
        Promote::Always => ("always".into(), Ok("policy `always`".into())),
        Promote::IfImproves => {
            let rule = format!("if_improves: dev mean above the baseline's + {}", s.epsilon);
            let v = gate(ev, s, &dev).and_then(|c| {
                let (cand, base) = means(ev.dev.as_ref().expect("gate passed"));
                if cand > base + s.epsilon {
                    Ok(format!("{m} {cand:.4} > baseline {base:.4} + {} ({})", s.epsilon, describe(c, m)))
                } else {
                    Err(format!("{m} {cand:.4} is not above baseline {base:.4} + {} ({})", s.epsilon, describe(c, m)))
                }
            });
            (rule, v)
        }
        Promote::IfSignificant => {
            let rule = format!(
                "if_significant: the {level} interval of the dev difference above {}, and not significantly worse on held-out lists",
                s.epsilon
            );
            let v = gate(ev, s, &dev).and_then(|c| {
                if c.ci[0] <= s.epsilon {
                    return Err(format!("{}; the interval's lower bound is not above {}", describe(c, m), s.epsilon));
                }
                match &heldout {
                    Some(h) if h.ci[1] < 0.0 => Err(format!(
                        "better on new feedback ({}) but significantly worse on the held-out lists of earlier promotions ({})",
                        describe(c, m),
                        describe(h, m)
                    )),
                    Some(h) => Ok(format!("{}; held-out lists: {}", describe(c, m), describe(h, m))),
                    None => Ok(describe(c, m)),
                }
            });
            (rule, v)
        }
    };
    let (promoted, why) = match verdict {
        Ok(w) => (true, w),
        Err(w) => (false, w),
    };
    Decision {
        promoted,
        rule,
        reason: format!("{}: {why}", if promoted { "promoted" } else { "not promoted" }),
        dev,
        heldout,
    }
}

/// The conditions every metric-based rule needs: dev values, and enough dev queries.
fn gate<'c>(ev: &Evidence, s: &Settings, dev: &'c Option<Comparison>) -> Result<&'c Comparison, String> {
    let c = match (&ev.dev, dev) {
        (Err(why), _) => return Err(why.clone()),
        (Ok(_), Some(c)) => c,
        (Ok(_), None) => unreachable!("dev comparison exists when dev values do"),
    };
    if c.queries < s.min_dev_queries {
        let short = s.min_dev_queries - c.queries;
        let more = (short as f64 / s.dev_fraction.max(1e-9)).ceil() as u64;
        return Err(format!(
            "{} dev queries, fewer than eval.min_dev_queries {}: feedback on about {more} more queries is needed \
             ({short} more dev queries at dev_fraction {})",
            c.queries, s.min_dev_queries, s.dev_fraction
        ));
    }
    Ok(c)
}

fn means(p: &Paired) -> (f64, f64) {
    let n = p.candidate.len().max(1) as f64;
    (p.candidate.iter().sum::<f64>() / n, p.baseline.iter().sum::<f64>() / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { epsilon: 0.0, min_dev_queries: 10, confidence: 0.95, resamples: 10_000, seed: 0, dev_fraction: 0.2 }
    }

    fn paired(candidate: Vec<f64>, baseline: Vec<f64>) -> Paired {
        Paired { candidate, baseline }
    }

    #[test]
    fn one_better_query_in_fifteen_passes_if_improves_but_not_if_significant() {
        let base: Vec<f64> = (0..15).map(|i| 0.3 + 0.03 * i as f64).collect();
        let mut cand = base.clone();
        cand[7] += 0.5;
        let ev = Evidence { primary: "ndcg@10", dev: Ok(paired(cand, base)), heldout: None };
        let sig = decide(Promote::IfSignificant, &ev, &settings());
        assert!(!sig.promoted, "{}", sig.reason);
        let c = sig.dev.as_ref().unwrap();
        assert_eq!(c.ci[0], 0.0, "most resamples miss the one query");
        assert_eq!(c.p_value, 1.0);
        assert!(sig.reason.starts_with("not promoted: +0.033 ndcg@10, 95% CI [+0.000, "), "{}", sig.reason);
        assert!(sig.reason.contains("over 15 queries (p = 1.0000)"), "{}", sig.reason);
        let imp = decide(Promote::IfImproves, &ev, &settings());
        assert!(imp.promoted, "{}", imp.reason);
    }

    #[test]
    fn a_clearly_better_candidate_passes_both() {
        let base: Vec<f64> = (0..15).map(|i| 0.2 + 0.02 * i as f64).collect();
        let cand: Vec<f64> = base.iter().enumerate().map(|(i, b)| b + 0.2 + 0.01 * (i % 3) as f64).collect();
        let ev = Evidence { primary: "ndcg@10", dev: Ok(paired(cand, base)), heldout: None };
        for policy in [Promote::IfSignificant, Promote::IfImproves] {
            let d = decide(policy, &ev, &settings());
            assert!(d.promoted, "{policy:?}: {}", d.reason);
        }
        let d = decide(Promote::IfSignificant, &ev, &settings());
        assert!(d.dev.as_ref().unwrap().ci[0] > 0.19 && d.dev.as_ref().unwrap().p_value < 1e-4, "{d:?}");
    }

    #[test]
    fn significantly_worse_on_held_out_lists_is_refused() {
        let base = vec![0.3; 12];
        let cand = vec![0.6; 12];
        let held = paired(vec![0.2; 20], vec![0.7; 20]);
        let ev = Evidence { primary: "ndcg@10", dev: Ok(paired(cand.clone(), base.clone())), heldout: Some(held) };
        let d = decide(Promote::IfSignificant, &ev, &settings());
        assert!(!d.promoted);
        assert!(d.reason.contains("significantly worse on the held-out lists"), "{}", d.reason);
        // Within the noise on the held-out lists: promoted, and the numbers are reported.
        let mut hc = vec![0.7; 20];
        hc[0] = 0.2;
        let ev = Evidence { primary: "ndcg@10", dev: Ok(paired(cand, base)), heldout: Some(paired(hc, vec![0.7; 20])) };
        let d = decide(Promote::IfSignificant, &ev, &settings());
        assert!(d.promoted, "{}", d.reason);
        assert!(d.reason.contains("held-out lists: -0.025"), "{}", d.reason);
    }

    #[test]
    fn too_few_dev_queries_say_how_many_more_are_needed() {
        let ev = Evidence { primary: "ndcg@10", dev: Ok(paired(vec![1.0; 6], vec![0.0; 6])), heldout: None };
        for policy in [Promote::IfSignificant, Promote::IfImproves] {
            let d = decide(policy, &ev, &settings());
            assert!(!d.promoted);
            assert!(d.reason.contains("6 dev queries, fewer than eval.min_dev_queries 10"), "{}", d.reason);
            assert!(d.reason.contains("about 20 more queries"), "{}", d.reason);
        }
        assert!(decide(Promote::Always, &ev, &settings()).promoted);
        let ev = Evidence { primary: "ndcg@10", dev: Err("no dev split".into()), heldout: None };
        let d = decide(Promote::IfSignificant, &ev, &settings());
        assert_eq!(d.reason, "not promoted: no dev split");
    }
}
