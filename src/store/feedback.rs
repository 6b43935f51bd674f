//! A corpus's feedback: `corpora/<c>/feedback.jsonl` (query events and signal events) and
//! `corpora/<c>/documents.jsonl` (`{id, text}`), appended by serve, `rerankd feedback add` and
//! scripts while runs read them.
//!
//! The append rule, for every writer including scripts: one `write` of one complete line ending
//! in `\n`, on a file opened with O_APPEND. rerankd's own writers also hold the corpus's feedback
//! lock (`locks/feedback/<corpus>.lock`) and first cut a torn tail that a crashed writer left, so
//! nothing is ever glued onto half a line. A run reads a snapshot: the file's length taken under
//! the lock, cut back to its last complete line.

use crate::ids::CorpusName;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::lock::FileLock;
use super::time::now_rfc3339;
use super::{Result, Root, StoreError};

/// The signals the miner understands: positives thumbsup, click, star4, star5; negatives
/// thumbsdown, star1, star2; star3 is neutral.
pub const SIGNALS: [&str; 8] = ["thumbsup", "thumbsdown", "click", "star1", "star2", "star3", "star4", "star5"];
pub const POSITIVE: [&str; 4] = ["thumbsup", "click", "star4", "star5"];
pub const NEGATIVE: [&str; 3] = ["thumbsdown", "star1", "star2"];

/// The longest line rerankd appends (a query event with its ids, a document): past it the
/// request is refused rather than the file grown by megabytes a line.
pub const MAX_LINE: usize = 1 << 20;

pub fn valid_signal(s: &str) -> bool {
    SIGNALS.contains(&s)
}

/// The id of a document sent without one: a hash of its text.
pub fn content_id(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    format!("sha256:{}", hex(&h[..12]))
}

/// Bytes as lowercase hex digits.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn text_digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// The feedback files of one corpus.
#[derive(Debug, Clone)]
pub struct CorpusFeedback {
    pub corpus: CorpusName,
    pub feedback: PathBuf,
    pub documents: PathBuf,
    lock: PathBuf,
}

impl CorpusFeedback {
    pub fn new(root: &Root, corpus: &CorpusName) -> Self {
        let home = root.corpus_home(corpus);
        Self {
            corpus: corpus.clone(),
            feedback: home.join("feedback.jsonl"),
            documents: home.join("documents.jsonl"),
            lock: root.locks().join("feedback").join(format!("{corpus}.lock")),
        }
    }

    /// The feedback file's size (0 when absent) and last change.
    pub fn stat(&self) -> (u64, Option<std::time::SystemTime>) {
        match std::fs::metadata(&self.feedback) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (0, None),
        }
    }

    /// Whether `path` (as a snapshot event recorded it) names this corpus's feedback file.
    pub fn is_this_file(&self, path: &Path) -> bool {
        let (a, b) = (std::fs::canonicalize(path), std::fs::canonicalize(&self.feedback));
        a.is_ok() && a.ok() == b.ok()
    }

    /// The corpus's feedback lock, held for one append or one snapshot.
    pub fn lock(&self) -> Result<FileLock> {
        if let Some(dir) = self.lock.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "creating", e))?;
        }
        FileLock::acquire(&self.lock)
    }

    /// Appends `lines` (each without its newline) to `path`: the torn tail of a crashed writer
    /// is cut first, then one `write` per line. The caller holds [`Self::lock`].
    pub fn append(&self, path: &Path, lines: &[String]) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "creating", e))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| StoreError::io(path, "opening", e))?;
        cut_torn_tail(&mut f, path)?;
        for l in lines {
            let mut line = Vec::with_capacity(l.len() + 1);
            line.extend_from_slice(l.as_bytes());
            line.push(b'\n');
            let n = f.write(&line).map_err(|e| StoreError::io(path, "appending", e))?;
            if n != line.len() {
                // A short write (disk full): cut it back so the file stays whole lines.
                let _ = cut_torn_tail(&mut f, path);
                return Err(StoreError::io(path, "appending", std::io::Error::other("short write (disk full?)")));
            }
        }
        Ok(())
    }

    /// A consistent prefix of feedback.jsonl for a run: its complete lines as of now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.snapshot_at(&self.feedback)
    }

    /// [`Self::snapshot`] of a feedback file at another path (a job may name any file), under
    /// this corpus's lock.
    pub fn snapshot_at(&self, path: &Path) -> Result<Snapshot> {
        let _lock = self.lock()?;
        snapshot_of(path)
    }
}

/// Truncates `f` back to just after its last `\n` (or to empty) when it does not end with one.
fn cut_torn_tail(f: &mut std::fs::File, path: &Path) -> Result<()> {
    let len = f.metadata().map_err(|e| StoreError::io(path, "reading metadata", e))?.len();
    if len == 0 {
        return Ok(());
    }
    let mut back = 0u64;
    let mut buf = [0u8; 4096];
    loop {
        let chunk = (len - back).min(buf.len() as u64);
        if chunk == 0 {
            break;
        }
        let at = len - back - chunk;
        f.seek(SeekFrom::Start(at)).map_err(|e| StoreError::io(path, "seeking", e))?;
        f.read_exact(&mut buf[..chunk as usize]).map_err(|e| StoreError::io(path, "reading", e))?;
        if let Some(i) = buf[..chunk as usize].iter().rposition(|&b| b == b'\n') {
            let keep = at + i as u64 + 1;
            if keep < len {
                tracing::warn!(file = %path.display(), bytes = len - keep, "cutting a torn last line");
                f.set_len(keep).map_err(|e| StoreError::io(path, "truncating a torn line", e))?;
            }
            return Ok(());
        }
        back += chunk;
    }
    tracing::warn!(file = %path.display(), bytes = len, "cutting a torn only line");
    f.set_len(0).map_err(|e| StoreError::io(path, "truncating a torn line", e))
}

/// Complete lines of a feedback file and where they end.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub bytes: Vec<u8>,
    /// Byte offset just past the last complete line.
    pub offset: u64,
    /// Non-blank lines in the snapshot.
    pub events: usize,
}

fn snapshot_of(path: &Path) -> Result<Snapshot> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StoreError::io(path, "reading", e)),
    };
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(end);
    let events = bytes.split(|&b| b == b'\n').filter(|l| l.iter().any(|b| !b.is_ascii_whitespace())).count();
    Ok(Snapshot { offset: end as u64, events, bytes })
}

/// The file at `path`, or `None` when there is none (no feedback yet).
fn open_existing(path: &Path) -> Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path, "opening", e)),
    }
}

/// Signal events in `path` after byte `from` (complete lines only), and where they end.
pub fn signals_after(path: &Path, from: u64) -> Result<(u64, u64)> {
    let Some(mut f) = open_existing(path)? else { return Ok((0, from)) };
    let len = f.metadata().map_err(|e| StoreError::io(path, "reading metadata", e))?.len();
    if from >= len {
        return Ok((0, from.min(len)));
    }
    f.seek(SeekFrom::Start(from)).map_err(|e| StoreError::io(path, "seeking", e))?;
    let mut reader = std::io::BufReader::new(f);
    let (mut count, mut at, mut line) = (0u64, from, Vec::new());
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(|e| StoreError::io(path, "reading", e))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        at += n as u64;
        if serde_json::from_slice::<Value>(&line).is_ok_and(|v| v.get("signal").is_some_and(Value::is_string)) {
            count += 1;
        }
    }
    Ok((count, at))
}

/// A query event as captured: its id, the documents in request order, the adapter.
#[derive(Debug, Clone)]
pub struct Impression {
    pub corpus: CorpusName,
    pub docs: Vec<String>,
}

/// Finds query event `event_id` in a feedback file (streamed, line by line): its documents in
/// request order (`documents`, else `shown`).
pub fn find_event(fb: &CorpusFeedback, event_id: &str) -> Result<Option<Impression>> {
    let Some(f) = open_existing(&fb.feedback)? else { return Ok(None) };
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.map_err(|e| StoreError::io(&fb.feedback, "reading", e))?;
        let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
        if v.get("query").is_none() || v.get("event_id").and_then(Value::as_str) != Some(event_id) {
            continue;
        }
        let ids = |k: &str| -> Option<Vec<String>> {
            v.get(k)?.as_array().map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
        };
        let docs = ids("documents").or_else(|| ids("shown")).unwrap_or_default();
        return Ok(Some(Impression { corpus: fb.corpus.clone(), docs }));
    }
    Ok(None)
}

/// Checks a signal against its query event and returns the document it names, if any: `index`
/// is a position in the request's documents (as rerank results' `index`), `doc_id` one of them.
/// The rules of `POST /v1/feedback` and `rerankd feedback add` alike.
pub fn check_signal(
    ev: &Impression,
    signal: &str,
    index: Option<usize>,
    doc_id: Option<&str>,
) -> std::result::Result<Option<String>, String> {
    if !valid_signal(signal) {
        let shown: String = signal.chars().take(40).collect();
        return Err(format!("unknown signal `{shown}`: one of {}", SIGNALS.join(", ")));
    }
    let by_index = match index {
        Some(i) => Some(
            ev.docs
                .get(i)
                .cloned()
                .ok_or_else(|| format!("index {i} is out of range: the ranking had {} documents", ev.docs.len()))?,
        ),
        None => None,
    };
    match (by_index, doc_id) {
        (Some(a), Some(b)) if !same_document(&a, b) => Err(format!("index points at `{a}`, not at doc_id `{b}`")),
        (Some(a), _) => Ok(Some(a)),
        (None, Some(b)) if ev.docs.iter().any(|d| d == b) => Ok(Some(b.to_string())),
        // The client's own id for a document recorded as a version of it.
        (None, Some(b)) if let Some(d) = ev.docs.iter().find(|d| same_document(d, b)) => Ok(Some(d.clone())),
        (None, Some(b)) => {
            let shown: String = b.chars().take(80).collect();
            Err(format!("document `{shown}` was not in that ranking"))
        }
        (None, None) => Ok(None),
    }
}

/// A signal event line.
pub fn signal_line(event_id: &str, signal: &str, doc_id: Option<&str>) -> String {
    let mut v = json!({"event_id": event_id, "ts": now_rfc3339(), "signal": signal});
    if let Some(d) = doc_id {
        v["doc_id"] = d.into();
    }
    v.to_string()
}

/// The id a document's text is recorded under when its own id was first recorded with another
/// text (an edited article): `<id>#<the first 12 hex digits of the text's sha256>`, the same for
/// the same text every time.
pub fn version_id(id: &str, digest: &[u8; 32]) -> String {
    format!("{id}#{}", hex(&digest[..6]))
}

/// Whether `recorded` is `id` or a version of it ([`version_id`]).
pub fn same_document(recorded: &str, id: &str) -> bool {
    recorded == id
        || recorded
            .strip_prefix(id)
            .and_then(|r| r.strip_prefix('#'))
            .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

/// Where a ranking's documents are recorded: the id of each (its own, or a version id), and the
/// lines to append for those not recorded yet (`FeedbackIndex::resolve`).
pub struct Recorded {
    pub ids: Vec<String>,
    pub lines: Vec<String>,
}

/// Online counts of one adapter: rankings served, and the signals given on them.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Online {
    pub impressions: u64,
    pub positive: u64,
    pub negative: u64,
    pub positive_rate: f64,
    pub negative_rate: f64,
}

/// Per adapter (a run id, or `base`): impressions and signals, counted from feedback.jsonl in one
/// streamed pass. Query events without an `adapter` (written by applications) are not counted.
pub fn online(path: &Path) -> Result<BTreeMap<String, Online>> {
    let Some(f) = open_existing(path)? else { return Ok(BTreeMap::new()) };
    let mut adapter_of: HashMap<String, String> = HashMap::new();
    let mut out: BTreeMap<String, Online> = BTreeMap::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.map_err(|e| StoreError::io(path, "reading", e))?;
        let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
        let Some(id) = v.get("event_id").and_then(Value::as_str) else { continue };
        if v.get("query").is_some() {
            if let Some(a) = v.get("adapter").and_then(Value::as_str) {
                adapter_of.insert(id.to_string(), a.to_string());
                out.entry(a.to_string()).or_default().impressions += 1;
            }
        } else if let Some(sig) = v.get("signal").and_then(Value::as_str)
            && let Some(a) = adapter_of.get(id)
        {
            let o = out.entry(a.clone()).or_default();
            if POSITIVE.contains(&sig) {
                o.positive += 1;
            } else if NEGATIVE.contains(&sig) {
                o.negative += 1;
            }
        }
    }
    for o in out.values_mut() {
        *o = Online::from_counts(o.impressions, o.positive, o.negative);
    }
    Ok(out)
}

impl Online {
    /// The counts with their rates (to three decimals).
    pub fn from_counts(impressions: u64, positive: u64, negative: u64) -> Self {
        let n = impressions.max(1) as f64;
        let rate = |k: u64| (k as f64 / n * 1000.0).round() / 1000.0;
        Self { impressions, positive, negative, positive_rate: rate(positive), negative_rate: rate(negative) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_is_cut_before_the_next_append_and_left_out_of_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root { dir: dir.path().to_path_buf() };
        let fb = CorpusFeedback::new(&root, &crate::ids::CorpusName::parse("c").unwrap());
        std::fs::create_dir_all(fb.feedback.parent().unwrap()).unwrap();
        std::fs::write(&fb.feedback, "{\"event_id\": \"a\", \"query\": \"q\"}\n{\"event_id\": \"b\", \"sig").unwrap();
        let s = fb.snapshot().unwrap();
        assert_eq!((s.events, s.offset), (1, "{\"event_id\": \"a\", \"query\": \"q\"}\n".len() as u64));
        let _l = fb.lock().unwrap();
        fb.append(&fb.feedback, &[signal_line("a", "click", None)]).unwrap();
        let text = std::fs::read_to_string(&fb.feedback).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{text}");
        assert_eq!(signals_after(&fb.feedback, 0).unwrap().0, 1);
        assert_eq!(signals_after(&fb.feedback, s.offset).unwrap(), (1, text.len() as u64));
    }
}
