//! From a job's data to what training and evaluation use: documents (JSONL or a directory),
//! labelled rows per query (from triplets or mined feedback), the train/dev split by query, the
//! training pairs and the listwise dev candidate lists.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::Value;

/// The corpus's documents: id -> text (first `doc_chars` characters).
#[derive(Debug, Default, Clone)]
pub struct Documents {
    pub ids: Vec<String>,
    pub text: HashMap<String, String>,
}

fn clip(s: &str, chars: usize) -> String {
    s.chars().take(chars).collect()
}

impl Documents {
    /// JSONL `{id, text}`, or a directory whose files are documents (id = relative path).
    pub fn load(path: &Path, doc_chars: usize) -> anyhow::Result<Self> {
        let mut d = Documents::default();
        if path.is_dir() {
            let base = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
            let mut files = Vec::new();
            walk(&base, &base, &mut files)?;
            files.sort();
            for (id, p) in files {
                let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                d.insert(id, clip(&String::from_utf8_lossy(&bytes), doc_chars));
            }
        } else {
            for (n, id, text) in jsonl_documents(path, doc_chars)? {
                if d.text.get(&id).is_some_and(|old| *old != text) {
                    // The last text silently winning hid a user's mistake.
                    bail!("{}: line {}: document id `{id}` appears again with another text", path.display(), n + 1);
                }
                d.insert(id, text);
            }
        }
        Ok(d)
    }

    fn insert(&mut self, id: String, text: String) {
        if self.text.insert(id.clone(), text).is_none() {
            self.ids.push(id);
        }
    }
}

/// Every `{id, text}` line of a JSONL documents file, in order, duplicates included: (0-based
/// line, id, text clipped to `doc_chars`). `score --docs` prints one line for each of these.
pub fn jsonl_documents(path: &Path, doc_chars: usize) -> anyhow::Result<Vec<(usize, String, String)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in jsonl_lines(path, &bytes)? {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: line {}: not JSON", path.display(), n + 1))?;
        let id = match v.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            _ => bail!("{}: line {}: field `id` must be a string", path.display(), n + 1),
        };
        let Some(t) = v.get("text").and_then(Value::as_str) else {
            bail!("{}: line {}: field `text` must be a string", path.display(), n + 1);
        };
        out.push((n, id, clip(t, doc_chars)));
    }
    Ok(out)
}

/// The non-blank lines of a JSONL file with their 0-based numbers; a line that is not UTF-8 is an
/// error naming the file and the line (not "stream did not contain valid UTF-8" for the file).
pub fn jsonl_lines<'a>(path: &Path, bytes: &'a [u8]) -> anyhow::Result<Vec<(usize, &'a str)>> {
    let mut out = Vec::new();
    for (n, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(raw)
            .map_err(|_| anyhow::anyhow!("{}: line {}: not UTF-8 text", path.display(), n + 1))?;
        if !line.trim().is_empty() {
            out.push((n, line));
        }
    }
    Ok(out)
}

/// Regular files under `dir`, as (id relative to `base`, path). Symlinks that resolve outside
/// `base` are refused, never followed out of the corpus.
fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let real = std::fs::canonicalize(&p).with_context(|| format!("resolving {}", p.display()))?;
        if !real.starts_with(base) {
            bail!("{} points outside the documents directory {}", p.display(), base.display());
        }
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if real.is_dir() {
            // A link back to this directory or one above it would recurse until ELOOP: name it.
            let here = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
            if here.starts_with(&real) {
                bail!("{} links back to {} (a loop)", p.display(), real.display());
            }
            walk(base, &p, out)?;
        } else if real.is_file() {
            let id = p.strip_prefix(base).unwrap_or(&p).to_string_lossy().into_owned();
            out.push((id, real));
        }
    }
    Ok(())
}

/// Where a judged document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Written in a triplets file.
    Given,
    /// A feedback signal on it (a click, a thumbs-down, a star rating).
    Signal,
    /// Shown above the clicked document and not chosen.
    ShownAbove,
    /// Shown with the query and not chosen.
    Shown,
    /// Ranked high by the baseline although not a positive (`train.hard_negatives`).
    Hard,
    /// A random corpus document.
    Random,
}

impl Source {
    /// Judged by a person (or written as such): hard negatives go after these.
    pub fn explicit(self) -> bool {
        matches!(self, Self::Given | Self::Signal | Self::ShownAbove)
    }
}

/// One judged document for a query: its text, id (when known), graded label 0..=3 and source.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judged {
    pub id: Option<String>,
    pub text: String,
    pub label: u8,
    pub source: Source,
}

/// Everything judged for one query, positives first.
#[derive(Debug, Clone)]
pub struct QueryRows {
    pub query: String,
    pub positives: Vec<Judged>,
    pub negatives: Vec<Judged>,
}

/// Reads `triplets` rows `{query, positive, negatives[]}`; each document is a text, or a document
/// id when `docs` has it, or an object `{"text"|"id", "label": 0..3}`.
pub fn read_triplets(path: &Path, docs: Option<&Documents>) -> anyhow::Result<Vec<QueryRows>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (n, line) in jsonl_lines(path, &bytes)? {
        let at = || format!("{}: line {}", path.display(), n + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let Some(query) = v.get("query").and_then(Value::as_str) else {
            bail!("{}: field `query` must be a string", at());
        };
        let pos = v.get("positive").with_context(|| format!("{}: field `positive` is required", at()))?;
        let positive = judged(pos, 1, docs).with_context(|| format!("{}: field `positive`", at()))?;
        let negatives = match v.get("negatives") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| judged(x, 0, docs))
                .collect::<anyhow::Result<_>>()
                .with_context(|| format!("{}: field `negatives`", at()))?,
            Some(_) => bail!("{}: field `negatives` must be a list", at()),
        };
        rows.push(QueryRows { query: query.to_string(), positives: vec![positive], negatives });
    }
    Ok(rows)
}

fn judged(v: &Value, default_label: u8, docs: Option<&Documents>) -> anyhow::Result<Judged> {
    let resolve = |s: &str| match docs.and_then(|d| d.text.get(s)) {
        Some(t) => Judged { id: Some(s.to_string()), text: t.clone(), label: default_label, source: Source::Given },
        None => Judged { id: None, text: s.to_string(), label: default_label, source: Source::Given },
    };
    match v {
        Value::String(s) => Ok(resolve(s)),
        Value::Object(o) => {
            let mut j = match (o.get("id").and_then(Value::as_str), o.get("text").and_then(Value::as_str)) {
                (Some(id), _) => match docs.and_then(|d| d.text.get(id)) {
                    Some(t) => Judged {
                        id: Some(id.to_string()),
                        text: t.clone(),
                        label: default_label,
                        source: Source::Given,
                    },
                    None => bail!("document id `{id}` is not in the documents"),
                },
                (None, Some(t)) => {
                    Judged { id: None, text: t.to_string(), label: default_label, source: Source::Given }
                }
                (None, None) => bail!("needs `text` or `id`"),
            };
            if let Some(l) = o.get("label") {
                j.label = l.as_u64().filter(|&l| l <= 3).context("`label` must be an integer 0..3")? as u8;
            }
            Ok(j)
        }
        _ => bail!("must be a text, a document id or an object"),
    }
}

/// Merges rows of the same query (normalised) so each query is one unit for the split.
pub fn group_by_query(rows: Vec<QueryRows>) -> Vec<QueryRows> {
    let mut by: BTreeMap<String, QueryRows> = BTreeMap::new();
    let mut order = Vec::new();
    for r in rows {
        let key = normalise(&r.query);
        match by.get_mut(&key) {
            Some(g) => {
                for p in r.positives {
                    if !g.positives.iter().any(|x| x.text == p.text) {
                        g.positives.push(p);
                    }
                }
                for n in r.negatives {
                    if !g.negatives.iter().chain(&g.positives).any(|x| x.text == n.text) {
                        g.negatives.push(n);
                    }
                }
            }
            None => {
                order.push(key.clone());
                by.insert(key, r);
            }
        }
    }
    order.into_iter().filter_map(|k| by.remove(&k)).collect()
}

/// Lower-case, whitespace collapsed: what makes two queries the same query.
pub fn normalise(q: &str) -> String {
    q.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn split_hash(q: &str, seed: u64) -> u64 {
    // FNV-1a over seed and the normalised text: stable across runs, platforms and versions.
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in normalise(q).bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    // FNV's high bits barely depend on the last bytes: finish with splitmix64's mixer so the
    // fraction test (`h < dev_fraction * 2^64`) sees uniform values.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

/// Which queries are dev: those whose hash falls under `dev_fraction`, at least one when there
/// are 5 or more queries, none with fewer (too few to evaluate anything).
pub fn split_dev(queries: &[QueryRows], dev_fraction: f64, seed: u64) -> Vec<bool> {
    if queries.len() < 5 || dev_fraction <= 0.0 {
        return vec![false; queries.len()];
    }
    let hashes: Vec<u64> = queries.iter().map(|q| split_hash(&q.query, seed)).collect();
    let cut = (dev_fraction * u64::MAX as f64) as u64;
    let mut dev: Vec<bool> = hashes.iter().map(|&h| h < cut).collect();
    if !dev.contains(&true) {
        let i = (0..hashes.len()).min_by_key(|&i| hashes[i]).expect("non-empty");
        dev[i] = true;
    }
    if dev.iter().all(|&d| d) {
        let i = (0..hashes.len()).max_by_key(|&i| hashes[i]).expect("non-empty");
        dev[i] = false;
    }
    dev
}

/// A training pair before tokenization.
#[derive(Debug, Clone)]
pub struct TextPair {
    pub query: String,
    pub doc: String,
    pub label: f32,
}

/// 1 positive + up to `negative_ratio` negatives (the first ones) per (query, positive), and
/// how many of the negatives used came from each source.
pub fn train_pairs(queries: &[&QueryRows], negative_ratio: usize) -> (Vec<TextPair>, BTreeMap<Source, usize>) {
    let mut out = Vec::new();
    let mut sources = BTreeMap::new();
    for q in queries {
        for p in &q.positives {
            out.push(TextPair { query: q.query.clone(), doc: p.text.clone(), label: 1.0 });
            for n in q.negatives.iter().take(negative_ratio) {
                out.push(TextPair { query: q.query.clone(), doc: n.text.clone(), label: 0.0 });
                *sources.entry(n.source).or_default() += 1;
            }
        }
    }
    (out, sources)
}

/// Inserts `hard` negatives (texts not already judged for the query) after the explicit ones.
pub fn insert_hard(q: &mut QueryRows, hard: Vec<Judged>) -> usize {
    let at = q.negatives.iter().position(|n| !n.source.explicit()).unwrap_or(q.negatives.len());
    let new: Vec<Judged> =
        hard.into_iter().filter(|h| !q.positives.iter().chain(&q.negatives).any(|x| x.text == h.text)).collect();
    let n = new.len();
    q.negatives.splice(at..at, new);
    n
}

/// One dev query's candidate list: its judged documents plus random corpus documents (label 0),
/// up to `list_size`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevList {
    pub query: String,
    pub docs: Vec<String>,
    pub ids: Vec<Option<String>>,
    pub labels: Vec<u8>,
}

pub fn dev_lists(
    queries: &[&QueryRows],
    pool: &[(Option<String>, String)],
    list_size: usize,
    seed: u64,
) -> Vec<DevList> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xd1ce);
    queries
        .iter()
        .map(|q| {
            let mut l = DevList { query: q.query.clone(), docs: vec![], ids: vec![], labels: vec![] };
            for j in q.positives.iter().chain(&q.negatives) {
                if l.docs.len() < list_size && !l.docs.contains(&j.text) {
                    l.docs.push(j.text.clone());
                    l.ids.push(j.id.clone());
                    l.labels.push(j.label);
                }
            }
            let mut tries = 0;
            while l.docs.len() < list_size && tries < list_size * 20 {
                tries += 1;
                let Some((id, text)) = pool.choose(&mut rng) else { break };
                if !l.docs.contains(text) {
                    l.docs.push(text.clone());
                    l.ids.push(id.clone());
                    l.labels.push(0);
                }
            }
            // The list's order must not give away the labels.
            let mut idx: Vec<usize> = (0..l.docs.len()).collect();
            idx.shuffle(&mut rng);
            DevList {
                query: l.query,
                docs: idx.iter().map(|&i| l.docs[i].clone()).collect(),
                ids: idx.iter().map(|&i| l.ids[i].clone()).collect(),
                labels: idx.iter().map(|&i| l.labels[i]).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_loop_in_a_documents_directory_is_named_at_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "text").unwrap();
        std::os::unix::fs::symlink(".", d.path().join("loop")).unwrap();
        let e = format!("{:#}", Documents::load(d.path(), 100).unwrap_err());
        assert!(e.contains("a loop") && e.len() < 200, "{e}");
    }

    fn q(text: &str) -> QueryRows {
        QueryRows { query: text.into(), positives: vec![], negatives: vec![] }
    }

    #[test]
    fn split_is_by_query_and_never_both_sides() {
        let qs: Vec<QueryRows> = (0..200).map(|i| q(&format!("query number {i}"))).collect();
        let dev = split_dev(&qs, 0.2, 7);
        let n_dev = dev.iter().filter(|&&d| d).count();
        assert!((20..=60).contains(&n_dev), "{n_dev}");
        assert_eq!(dev, split_dev(&qs, 0.2, 7), "reproducible");
        // The same query, written differently, lands on the same side: grouping makes it one unit.
        let rows = vec![q("Hello   World"), q("hello world"), q("other")];
        assert_eq!(group_by_query(rows).len(), 2);
        let a = split_hash("Hello   World", 3);
        assert_eq!(a, split_hash("hello world", 3));
    }

    #[test]
    fn few_queries_get_no_dev_and_five_get_at_least_one() {
        let four: Vec<QueryRows> = (0..4).map(|i| q(&i.to_string())).collect();
        assert!(split_dev(&four, 0.1, 0).iter().all(|&d| !d));
        let five: Vec<QueryRows> = (0..5).map(|i| q(&i.to_string())).collect();
        let d = split_dev(&five, 0.01, 0);
        assert_eq!(d.iter().filter(|&&x| x).count(), 1);
    }

    #[test]
    fn documents_directory_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        std::fs::write(docs.join("a.txt"), "alpha ".repeat(1000)).unwrap();
        std::fs::write(docs.join("sub/b.txt"), "beta").unwrap();
        let d = Documents::load(&docs, 10).unwrap();
        assert_eq!(d.ids, vec!["a.txt".to_string(), "sub/b.txt".to_string()]);
        assert_eq!(d.text["a.txt"].chars().count(), 10);
        std::fs::write(tmp.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), docs.join("link")).unwrap();
        let e = Documents::load(&docs, 10).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn dev_lists_fill_with_random_docs_and_keep_labels() {
        let rows = QueryRows {
            query: "q".into(),
            positives: vec![Judged { id: None, text: "good".into(), label: 2, source: Source::Given }],
            negatives: vec![Judged { id: None, text: "bad".into(), label: 0, source: Source::Given }],
        };
        let pool: Vec<(Option<String>, String)> =
            (0..50).map(|i| (Some(format!("d{i}")), format!("doc {i}"))).collect();
        let l = &dev_lists(&[&rows], &pool, 20, 0)[0];
        assert_eq!(l.docs.len(), 20);
        let i = l.docs.iter().position(|d| d == "good").unwrap();
        assert_eq!(l.labels[i], 2);
        assert_eq!(l.labels.iter().filter(|&&x| x > 0).count(), 1);
    }
}
