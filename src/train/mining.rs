//! Feedback mining: query events and signal events become triplets (query, positive, negatives).
//!
//! A positive signal (thumbsup, click with a doc_id, star4, star5) on a query event gives a
//! positive: the signalled doc, else the top shown doc. Negatives for that query, in order of
//! preference: docs with a negative signal (thumbsdown, star1, star2), docs shown above the
//! positive with no positive signal, the other shown docs, then random corpus docs. A doc is never
//! both positive and negative for a query. Every skipped event is counted with its reason.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::SeedableRng;
use rand::seq::IndexedRandom;
use serde_json::Value;

use super::dataset::Source;
use crate::store::feedback::{NEGATIVE, POSITIVE};

#[derive(Debug, Clone, PartialEq)]
pub struct Triplet {
    pub query: String,
    pub positive: String,
    /// In order of preference, each with where it came from.
    pub negatives: Vec<(String, Source)>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mined {
    pub triplets: Vec<Triplet>,
    /// reason -> count of skipped events or lines
    pub skipped: BTreeMap<String, usize>,
}

struct QueryEvent {
    query: String,
    shown: Vec<String>,
    positives: Vec<String>,
    negatives: Vec<String>,
}

/// Mines `feedback` (JSONL text) against the corpus `doc_ids`; `negatives` per triplet at most.
pub fn mine(feedback: &str, doc_ids: &[String], negatives: usize, seed: u64) -> Mined {
    let known: HashSet<&str> = doc_ids.iter().map(String::as_str).collect();
    let mut out = Mined::default();
    let mut skip = |why: &str| *out.skipped.entry(why.to_string()).or_default() += 1;
    let mut events: HashMap<String, QueryEvent> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut signals: Vec<(String, String, Option<String>)> = Vec::new();
    for line in feedback.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            skip("not JSON");
            continue;
        };
        let Some(id) = v
            .get("event_id")
            .and_then(|x| x.as_str().map(str::to_string).or_else(|| x.as_u64().map(|n| n.to_string())))
        else {
            skip("no event_id");
            continue;
        };
        if let Some(q) = v.get("query").and_then(Value::as_str) {
            let shown: Vec<String> = v
                .get("shown")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if !events.contains_key(&id) {
                order.push(id.clone());
            }
            events.insert(id, QueryEvent { query: q.to_string(), shown, positives: Vec::new(), negatives: Vec::new() });
        } else if let Some(sig) = v.get("signal").and_then(Value::as_str) {
            signals.push((id, sig.to_string(), v.get("doc_id").and_then(Value::as_str).map(str::to_string)));
        } else {
            skip("neither a query nor a signal event");
        }
    }
    for (id, sig, doc) in signals {
        let Some(ev) = events.get_mut(&id) else {
            skip("signal for an unknown event_id");
            continue;
        };
        let positive = POSITIVE.contains(&sig.as_str());
        if !positive && !NEGATIVE.contains(&sig.as_str()) {
            skip("unknown signal");
            continue;
        }
        let doc = match (doc, sig.as_str()) {
            (Some(d), _) => d,
            (None, "click") => {
                skip("click without doc_id");
                continue;
            }
            (None, _) if positive => match ev.shown.first() {
                Some(d) => d.clone(),
                None => {
                    skip("positive signal with nothing shown");
                    continue;
                }
            },
            (None, _) => {
                skip("negative signal without doc_id");
                continue;
            }
        };
        if !known.contains(doc.as_str()) {
            skip("missing doc");
            continue;
        }
        let list = if positive { &mut ev.positives } else { &mut ev.negatives };
        if !list.contains(&doc) {
            list.push(doc);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for id in order {
        let ev = &events[&id];
        for pos in &ev.positives {
            let mut negs: Vec<(String, Source)> = Vec::new();
            let push = |d: &String, source: Source, negs: &mut Vec<(String, Source)>| {
                if negs.len() < negatives
                    && !ev.positives.contains(d)
                    && !negs.iter().any(|(n, _)| n == d)
                    && known.contains(d.as_str())
                {
                    negs.push((d.clone(), source));
                }
            };
            for d in &ev.negatives {
                push(d, Source::Signal, &mut negs);
            }
            let pos_rank = ev.shown.iter().position(|d| d == pos).unwrap_or(ev.shown.len());
            for d in &ev.shown[..pos_rank] {
                push(d, Source::ShownAbove, &mut negs);
            }
            for d in &ev.shown {
                push(d, Source::Shown, &mut negs);
            }
            let mut tries = 0;
            while negs.len() < negatives && tries < negatives * 10 && !doc_ids.is_empty() {
                if let Some(d) = doc_ids.choose(&mut rng) {
                    push(d, Source::Random, &mut negs);
                }
                tries += 1;
            }
            out.triplets.push(Triplet { query: ev.query.clone(), positive: pos.clone(), negatives: negs });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    fn feedback(lines: &[&str]) -> String {
        lines.join("\n")
    }

    #[test]
    fn click_gives_the_clicked_doc_and_shown_above_as_negatives() {
        let fb = feedback(&[
            r#"{"event_id": "e1", "query": "q", "shown": ["d1", "d2", "d3", "d4"]}"#,
            r#"{"event_id": "e1", "signal": "click", "doc_id": "d3"}"#,
        ]);
        let m = mine(&fb, &docs(10), 2, 0);
        assert_eq!(
            m.triplets,
            vec![Triplet {
                query: "q".into(),
                positive: "d3".into(),
                negatives: vec![("d1".into(), Source::ShownAbove), ("d2".into(), Source::ShownAbove)]
            }]
        );
    }

    #[test]
    fn thumbs_down_comes_first_and_is_never_positive() {
        let fb = feedback(&[
            r#"{"event_id": "e1", "query": "q", "shown": ["d1", "d2", "d3"]}"#,
            r#"{"event_id": "e1", "signal": "thumbsdown", "doc_id": "d3"}"#,
            r#"{"event_id": "e1", "signal": "thumbsup"}"#,
        ]);
        let m = mine(&fb, &docs(10), 3, 0);
        assert_eq!(m.triplets.len(), 1, "thumbs-down makes no triplet of its own");
        let t = &m.triplets[0];
        assert_eq!(t.positive, "d1", "thumbsup without doc_id: the top shown doc");
        assert_eq!(t.negatives[0], ("d3".to_string(), Source::Signal));
        assert!(!t.negatives.iter().any(|(n, _)| *n == t.positive));
        assert_eq!(t.negatives.len(), 3, "filled from shown, then random docs");
        assert_eq!(t.negatives[1], ("d2".to_string(), Source::Shown));
        assert_eq!(t.negatives[2].1, Source::Random);
    }

    #[test]
    fn positive_and_negative_never_coincide() {
        let fb = feedback(&[
            r#"{"event_id": "e1", "query": "q", "shown": ["d1", "d2"]}"#,
            r#"{"event_id": "e1", "signal": "star5", "doc_id": "d2"}"#,
            r#"{"event_id": "e1", "signal": "star1", "doc_id": "d2"}"#,
        ]);
        let m = mine(&fb, &docs(3), 5, 0);
        for t in &m.triplets {
            assert!(!t.negatives.iter().any(|(n, _)| *n == t.positive));
        }
    }

    #[test]
    fn skipped_events_are_counted_with_reasons() {
        let fb = feedback(&[
            r#"{"event_id": "e1", "query": "q", "shown": ["d1"]}"#,
            r#"{"event_id": "e1", "signal": "click", "doc_id": "nope"}"#,
            r#"{"query": "q2", "shown": ["d1"]}"#,
            r#"{"event_id": "e1", "signal": "meh", "doc_id": "d1"}"#,
            r#"{"event_id": "e9", "signal": "click", "doc_id": "d1"}"#,
            "garbage",
        ]);
        let m = mine(&fb, &docs(2), 1, 0);
        assert!(m.triplets.is_empty());
        for why in ["missing doc", "no event_id", "unknown signal", "signal for an unknown event_id", "not JSON"] {
            assert_eq!(m.skipped.get(why), Some(&1), "{why}: {:?}", m.skipped);
        }
    }
}
