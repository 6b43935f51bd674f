//! A run's data: the job's triplets, or its feedback mined against the documents, grouped by
//! query and split (`materialise`); written to the run directory (`triplets.jsonl`, the dev
//! lists) for a resumed attempt to read back (`restore_data`); and the held-out lists of earlier
//! promotions.

use anyhow::Context;

use std::collections::BTreeMap;

use crate::job::Job;
use crate::store::Root;
use crate::store::atomic::{read_jsonl, write_jsonl};
use crate::store::events::{Event, FeedbackSnapshot, Log, SnapshotFields};
use crate::store::feedback::CorpusFeedback;
use crate::store::models;
use crate::store::paths::RunFiles;
use crate::train::dataset::{
    DevList, Documents, Judged, QueryRows, Source, dev_lists, group_by_query, normalise, read_triplets, split_dev,
};
use crate::train::mining;
use crate::train::trainer::Reporter;

use super::context::RunContext;
use super::saved::Saved;

pub(super) struct Materialised {
    /// Every query with its judged documents, and whether it is in the dev split.
    pub(super) queries: Vec<QueryRows>,
    pub(super) dev: Vec<bool>,
    pub(super) dev_lists: Vec<DevList>,
    /// The documents negatives and dev lists are drawn from: the corpus, else every text judged.
    pub(super) pool: Vec<(Option<String>, String)>,
    pub(super) skipped: BTreeMap<String, usize>,
    /// Why there is no dev split, when there is none.
    pub(super) no_dev: Option<String>,
    /// The feedback snapshot mined, when the data is feedback: events and the byte offset.
    pub(super) feedback: Option<SnapshotFields>,
}

/// Reads the job's data (triplets, or feedback mined against the documents) and splits it by
/// query.
pub(super) fn materialise(ctx: &mut RunContext, root: &Root, job: &Job) -> anyhow::Result<Materialised> {
    let d = &job.data;
    let docs = match &d.documents {
        Some(p) => Some(Documents::load(p, d.doc_chars as usize)?),
        None => None,
    };
    let mut skipped = BTreeMap::new();
    let mut snapshot = None;
    let rows = match (&d.triplets, &d.feedback) {
        (Some(t), _) => read_triplets(t, docs.as_ref())?,
        (None, Some(f)) => {
            let docs = docs.as_ref().context("feedback needs documents")?;
            // Writers append while this reads: the complete lines as of now, under the lock.
            let snap = CorpusFeedback::new(root, &job.corpus).snapshot_at(f)?;
            anyhow::ensure!(snap.offset > 0 || f.exists(), "reading {}: no such file", f.display());
            let at = SnapshotFields { path: f.clone(), events: snap.events as u64, offset: snap.offset };
            let message =
                format!("feedback snapshot: {} events, bytes 0..{} of {}", snap.events, snap.offset, f.display());
            ctx.event(Event::FeedbackSnapshot(FeedbackSnapshot { message, at: at.clone() }))?;
            snapshot = Some(at);
            let bytes = snap.bytes;
            // Feedback is appended by many writers: a line that is not UTF-8 is skipped and
            // counted like any other garbage line, never the end of the run.
            let mut not_utf8 = 0;
            let text: String = bytes
                .split(|&b| b == b'\n')
                .filter_map(|l| std::str::from_utf8(l).map_err(|_| not_utf8 += 1).ok())
                .flat_map(|l| [l, "\n"])
                .collect();
            let mined = mining::mine(&text, &docs.ids, job.train.negative_ratio as usize, job.train.seed);
            skipped = mined.skipped;
            if not_utf8 > 0 {
                skipped.insert("not UTF-8".into(), not_utf8);
            }
            let j = |id: &String, label: u8, source: Source| Judged {
                id: Some(id.clone()),
                text: docs.text[id].clone(),
                label,
                source,
            };
            mined
                .triplets
                .iter()
                .map(|t| QueryRows {
                    query: t.query.clone(),
                    positives: vec![j(&t.positive, 1, Source::Signal)],
                    negatives: t.negatives.iter().map(|(n, s)| j(n, 0, *s)).collect(),
                })
                .collect()
        }
        (None, None) => anyhow::bail!("the job has no data source"),
    };
    if !skipped.is_empty() {
        let skipped = skipped.iter().map(|(k, n)| (k.clone(), *n as u64)).collect();
        ctx.warn(Log { skipped: Some(skipped), ..Log::warn("skipped feedback events") })?;
    }
    let queries = group_by_query(rows);
    anyhow::ensure!(!queries.is_empty(), "no usable training data (no query with a positive)");
    let dev = split_dev(&queries, job.eval.dev_fraction, job.train.seed);
    let pool: Vec<(Option<String>, String)> = match &docs {
        Some(docs) => docs.ids.iter().map(|id| (Some(id.clone()), docs.text[id].clone())).collect(),
        None => {
            let mut seen = std::collections::HashSet::new();
            queries
                .iter()
                .flat_map(|q| q.positives.iter().chain(&q.negatives))
                .filter(|j| seen.insert(j.text.clone()))
                .map(|j| (j.id.clone(), j.text.clone()))
                .collect()
        }
    };
    let dev_q: Vec<&QueryRows> = queries.iter().zip(&dev).filter(|(_, d)| **d).map(|(q, _)| q).collect();
    let dev_lists = dev_lists(&dev_q, &pool, job.eval.list_size as usize, job.train.seed);
    ctx.info(&format!(
        "materialised {} queries ({} train, {} dev)",
        queries.len(),
        queries.len() - dev_q.len(),
        dev_q.len(),
    ))?;
    let no_dev = dev_q.is_empty().then(|| {
        if job.eval.dev_fraction <= 0.0 {
            "eval.dev_fraction is 0".to_string()
        } else {
            format!("only {} distinct queries (fewer than 5)", queries.len())
        }
    });
    if let Some(why) = &no_dev {
        ctx.info(&format!("no dev split ({why}): evaluation skipped"))?;
    }
    Ok(Materialised { queries, dev, dev_lists, pool, skipped, no_dev, feedback: snapshot })
}

/// A line of `triplets.jsonl`: a query, its judged documents (each with its source) and its split.
#[derive(serde::Serialize, serde::Deserialize)]
struct TripletRow<S, D, T> {
    query: S,
    positives: D,
    negatives: D,
    split: T,
}
type OwnedTripletRow = TripletRow<String, Vec<Judged>, String>;

/// Records the rows used, each with its split and every document's source, in `triplets.jsonl`.
pub(super) fn write_triplets(ctx: &mut RunContext, data: &Materialised) -> anyhow::Result<()> {
    let rows: Vec<TripletRow<&str, &Vec<Judged>, &str>> = data
        .queries
        .iter()
        .zip(&data.dev)
        .map(|(q, &is_dev)| TripletRow {
            query: q.query.as_str(),
            positives: &q.positives,
            negatives: &q.negatives,
            split: if is_dev { "dev" } else { "train" },
        })
        .collect();
    write_jsonl(&ctx.files.triplets(), &rows)?;
    Ok(())
}

/// A resumed run's data, read back from what its first attempt wrote: every query with its
/// judged documents (sources included) and split, and the dev lists.
pub(super) fn restore_data(files: &RunFiles, s: &Saved) -> anyhow::Result<Materialised> {
    let (mut queries, mut dev) = (Vec::new(), Vec::new());
    for row in read_jsonl::<OwnedTripletRow>(&files.triplets())? {
        dev.push(row.split == "dev");
        queries.push(QueryRows { query: row.query, positives: row.positives, negatives: row.negatives });
    }
    let m = &s.materialised;
    Ok(Materialised {
        queries,
        dev,
        dev_lists: read_jsonl(&files.dev_lists())?,
        pool: Vec::new(),
        skipped: m.skipped.clone(),
        no_dev: m.no_dev.clone(),
        feedback: m.feedback.clone(),
    })
}

/// The held-out lists of the corpus's earlier promotions: the newest list of each query, without
/// the queries this run trains on, at most `eval.heldout_max_queries` (a seeded sample).
pub(super) fn heldout_lists(
    ctx: &mut RunContext,
    root: &Root,
    job: &Job,
    data: &Materialised,
) -> anyhow::Result<Vec<DevList>> {
    let files = models::heldout_files(root, &job.corpus);
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let trained: std::collections::HashSet<String> =
        data.queries.iter().zip(&data.dev).filter(|(_, d)| !**d).map(|(q, _)| normalise(&q.query)).collect();
    let mut by_query: BTreeMap<String, DevList> = BTreeMap::new();
    let mut skipped = 0;
    for (_, path) in &files {
        for l in read_jsonl::<DevList>(path)? {
            by_query.insert(normalise(&l.query), l);
        }
    }
    by_query.retain(|q, _| {
        let keep = !trained.contains(q);
        skipped += usize::from(!keep);
        keep
    });
    let mut lists: Vec<DevList> = by_query.into_values().collect();
    let cap = job.eval.heldout_max_queries as usize;
    if lists.len() > cap {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        lists.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.train.seed ^ 0x4e1d));
        lists.truncate(cap);
    }
    ctx.info(&format!(
        "held-out lists: {} queries from {} earlier promotion(s) ({skipped} left out: this run trains on them)",
        lists.len(),
        files.len()
    ))?;
    Ok(lists)
}
