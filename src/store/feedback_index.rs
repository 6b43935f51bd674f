//! The capture index of a corpus, `corpora/<c>/feedback.index`: a B-tree (redb) derived from
//! feedback.jsonl and documents.jsonl, so that what a client can make serve look up — a captured
//! event by its id, the online counts per adapter, whether a document id is recorded and with
//! which text — costs O(log n) in the size of those files instead of a pass over them, and no
//! memory in proportion to them.
//!
//! It holds nothing of its own: for each file it records the inode and how far it has read, reads
//! what was appended since at each use (complete lines only, so a line being written is read next
//! time), and starts that file over when it was replaced or cut. Deleting it is always safe: the
//! next use rebuilds it in one pass. Commits are not flushed to disk one by one (every
//! [`DURABLE_EVERY`]th is): after a crash the index is back at an older consistent point and
//! catches up again. Only serve opens it (redb holds it exclusively); `rerankd feedback add`
//! reads the files directly.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::feedback::{CorpusFeedback, Impression, NEGATIVE, Online, POSITIVE, Recorded, hex, text_digest, version_id};
use super::{Result, StoreError};

/// Event id -> (the byte offset of its line in feedback.jsonl, the adapter that served it or "").
const EVENTS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("events");
/// Adapter -> (impressions, positive signals, negative signals).
const ADAPTERS: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("adapters");
/// Document id -> the sha256 of the text it was first recorded with.
const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
/// File ("feedback" | "documents") -> (its inode, the bytes read).
const FILES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("files");

/// One in this many small commits is flushed to disk (the others cost no fsync, and their freed
/// pages are reclaimed at the next flushed one).
const DURABLE_EVERY: u32 = 64;
/// A commit of more than this many bytes read is flushed.
const BULK_BYTES: u64 = 1 << 20;
/// redb's page cache (its default, 1 GiB, would be resident memory of serve).
const CACHE_BYTES: usize = 32 << 20;
/// A catch-up commits after this many bytes read (a first pass over a large file holds bounded
/// memory).
const COMMIT_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Feedback = 0,
    Documents = 1,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Feedback => "feedback",
            Kind::Documents => "documents",
        }
    }
}

/// The fields of a feedback line the index reads.
#[derive(Deserialize)]
struct FeedbackLine<'a> {
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
    query: Option<IgnoredAny>,
    #[serde(borrow)]
    adapter: Option<Cow<'a, str>>,
    #[serde(borrow)]
    signal: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DocumentLine<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

/// A write transaction's open tables for the lines of one file.
enum Tables<'t> {
    Feedback {
        events: redb::Table<'t, &'static str, (u64, &'static str)>,
        adapters: redb::Table<'t, &'static str, (u64, u64, u64)>,
    },
    Documents {
        docs: redb::Table<'t, &'static str, &'static [u8]>,
    },
}

pub struct FeedbackIndex {
    db: Database,
    fb: CorpusFeedback,
    path: PathBuf,
    commits: AtomicU32,
    /// One catch-up per file at a time (two would count the same lines twice).
    reading: [std::sync::Mutex<()>; 2],
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { path: path.to_path_buf(), message: format!("the capture index: {e}") }
}

impl FeedbackIndex {
    /// The index of `fb`'s files, created if missing; one that cannot be opened (damaged, or of
    /// another format) is deleted and rebuilt.
    pub fn open(fb: &CorpusFeedback) -> Result<Self> {
        let path = fb.feedback.with_file_name("feedback.index");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "creating", e))?;
        }
        let create = || redb::Builder::new().set_cache_size(CACHE_BYTES).create(&path);
        let db = match create() {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(db_err(&path, "open in another process")),
            Err(e) => {
                tracing::warn!("{}: {e}; rebuilding it from the feedback files", path.display());
                std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, "removing", e))?;
                create().map_err(|e| db_err(&path, e))?
            }
        };
        Ok(Self { db, fb: fb.clone(), path, commits: AtomicU32::new(0), reading: Default::default() })
    }

    fn file(&self, kind: Kind) -> &Path {
        match kind {
            Kind::Feedback => &self.fb.feedback,
            Kind::Documents => &self.fb.documents,
        }
    }

    fn write(&self) -> Result<redb::WriteTransaction> {
        self.db.begin_write().map_err(|e| db_err(&self.path, e))
    }

    /// Commits `tx`, which read `bytes` of a file: flushed when it was bulk or every
    /// [`DURABLE_EVERY`]th time.
    fn commit(&self, mut tx: redb::WriteTransaction, bytes: u64) -> Result<()> {
        let n = self.commits.fetch_add(1, Ordering::Relaxed);
        let flush = bytes > BULK_BYTES || n.is_multiple_of(DURABLE_EVERY);
        tx.set_durability(if flush { Durability::Immediate } else { Durability::None });
        tx.commit().map_err(|e| db_err(&self.path, e))
    }

    /// Reads what was appended to the file of `kind` since the last call.
    fn catch_up(&self, kind: Kind) -> Result<()> {
        let _one = self.reading[kind as usize].lock().unwrap_or_else(|e| e.into_inner());
        self.catch_up_held(kind)
    }

    /// [`Self::catch_up`], its file's reading lock held by the caller.
    fn catch_up_held(&self, kind: Kind) -> Result<()> {
        let path = self.file(kind).to_path_buf();
        let (ino, len) = match std::fs::metadata(&path) {
            Ok(m) => (m.ino(), m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(StoreError::io(&path, "reading metadata", e)),
        };
        let known = {
            let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
            match tx.open_table(FILES) {
                Ok(t) => t.get(kind.name()).map_err(|e| db_err(&self.path, e))?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(db_err(&self.path, e)),
            }
        };
        let (mut at, fresh) = match known {
            Some((i, read)) if i == ino && read <= len => (read, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        if at == len && !fresh {
            return Ok(());
        }
        let (start, mut tx) = (at, self.write()?);
        let mut committed = at;
        if fresh {
            // Replaced or cut by hand: start that file over.
            match kind {
                Kind::Feedback => {
                    tx.delete_table(EVENTS).map_err(|e| db_err(&self.path, e))?;
                    tx.delete_table(ADAPTERS).map_err(|e| db_err(&self.path, e))?;
                }
                Kind::Documents => {
                    tx.delete_table(DOCUMENTS).map_err(|e| db_err(&self.path, e))?;
                }
            }
        }
        let mut reader = if len > at {
            let mut f = std::fs::File::open(&path).map_err(|e| StoreError::io(&path, "opening", e))?;
            f.seek(SeekFrom::Start(at)).map_err(|e| StoreError::io(&path, "seeking", e))?;
            Some(std::io::BufReader::with_capacity(1 << 20, f))
        } else {
            None
        };
        let mut line = Vec::new();
        loop {
            // One transaction per COMMIT_BYTES read, its tables opened once.
            let mut done = true;
            {
                let mut tables = self.tables(&tx, kind)?;
                while let Some(r) = reader.as_mut() {
                    line.clear();
                    let n = r.read_until(b'\n', &mut line).map_err(|e| StoreError::io(&path, "reading", e))?;
                    if n == 0 || line.last() != Some(&b'\n') {
                        break;
                    }
                    self.apply(&mut tables, &line, at)?;
                    at += n as u64;
                    if at - committed >= COMMIT_BYTES {
                        done = false;
                        break;
                    }
                }
            }
            self.mark(&tx, kind, ino, at)?;
            self.commit(tx, at - committed)?;
            committed = at;
            if done {
                break;
            }
            tx = self.write()?;
        }
        if at - start > COMMIT_BYTES {
            tracing::info!(file = %path.display(), mb = (at - start) >> 20, "capture index caught up");
        }
        Ok(())
    }

    /// The tables the lines of the file of `kind` go into, opened in `tx`.
    fn tables<'t>(&self, tx: &'t redb::WriteTransaction, kind: Kind) -> Result<Tables<'t>> {
        let e = |x: redb::TableError| db_err(&self.path, x);
        Ok(match kind {
            Kind::Feedback => Tables::Feedback {
                events: tx.open_table(EVENTS).map_err(e)?,
                adapters: tx.open_table(ADAPTERS).map_err(e)?,
            },
            Kind::Documents => Tables::Documents { docs: tx.open_table(DOCUMENTS).map_err(e)? },
        })
    }

    fn mark(&self, tx: &redb::WriteTransaction, kind: Kind, ino: u64, at: u64) -> Result<()> {
        let mut files = tx.open_table(FILES).map_err(|e| db_err(&self.path, e))?;
        files.insert(kind.name(), (ino, at)).map_err(|e| db_err(&self.path, e))?;
        Ok(())
    }

    /// One complete line of the file `tables` are of, at byte `offset`.
    fn apply(&self, tables: &mut Tables, line: &[u8], offset: u64) -> Result<()> {
        let e = |x: redb::StorageError| db_err(&self.path, x);
        match tables {
            Tables::Feedback { events, adapters } => {
                let Ok(l) = serde_json::from_slice::<FeedbackLine>(line) else { return Ok(()) };
                let Some(id) = l.event_id else { return Ok(()) };
                let query = l.query.is_some();
                let adapter = if query {
                    let adapter = l.adapter.as_deref().unwrap_or_default();
                    events.insert(id.as_ref(), (offset, adapter)).map_err(e)?;
                    adapter.to_string()
                } else if l.signal.is_some() {
                    events.get(id.as_ref()).map_err(e)?.map(|v| v.value().1.to_string()).unwrap_or_default()
                } else {
                    return Ok(());
                };
                if adapter.is_empty() {
                    return Ok(());
                }
                let (mut i, mut p, mut n) = adapters.get(adapter.as_str()).map_err(e)?.map_or((0, 0, 0), |v| v.value());
                match l.signal.as_deref() {
                    _ if query => i += 1,
                    Some(sig) if POSITIVE.contains(&sig) => p += 1,
                    Some(sig) if NEGATIVE.contains(&sig) => n += 1,
                    _ => {}
                }
                adapters.insert(adapter.as_str(), (i, p, n)).map_err(e)?;
            }
            Tables::Documents { docs } => {
                let Ok(DocumentLine { id: Some(id), text: Some(text) }) = serde_json::from_slice::<DocumentLine>(line)
                else {
                    return Ok(());
                };
                if docs.get(id.as_ref()).map_err(e)?.is_none() {
                    docs.insert(id.as_ref(), text_digest(&text).as_slice()).map_err(e)?;
                }
            }
        }
        Ok(())
    }

    /// The query event `event_id`: its documents in request order (`documents`, else `shown`).
    pub fn event(&self, event_id: &str) -> Result<Option<Impression>> {
        self.catch_up(Kind::Feedback)?;
        let offset = {
            let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
            let events = match tx.open_table(EVENTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err(&self.path, e)),
            };
            match events.get(event_id).map_err(|e| db_err(&self.path, e))? {
                Some(v) => v.value().0,
                None => return Ok(None),
            }
        };
        let path = &self.fb.feedback;
        let mut f = std::fs::File::open(path).map_err(|e| StoreError::io(path, "opening", e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| StoreError::io(path, "seeking", e))?;
        let mut line = Vec::new();
        std::io::BufReader::new(f).read_until(b'\n', &mut line).map_err(|e| StoreError::io(path, "reading", e))?;
        let v: Value = serde_json::from_slice(&line).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: format!("the line at byte {offset} that the capture index names is not JSON: {e}"),
        })?;
        if v.get("event_id").and_then(Value::as_str) != Some(event_id) {
            return Err(StoreError::Corrupt {
                path: path.clone(),
                message: format!("the line at byte {offset} is not event {event_id}"),
            });
        }
        let ids = |k: &str| -> Option<Vec<String>> {
            v.get(k)?.as_array().map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect())
        };
        let docs = ids("documents").or_else(|| ids("shown")).unwrap_or_default();
        Ok(Some(Impression { corpus: self.fb.corpus.clone(), docs }))
    }

    /// Per adapter (a run id, or `base`): impressions and signals (as `feedback::online`).
    pub fn online(&self) -> Result<BTreeMap<String, Online>> {
        self.catch_up(Kind::Feedback)?;
        self.counts()
    }

    /// [`Self::online`], or `None` while another thread is reading the feedback file (a first pass
    /// over a large one): a listing does not wait for it.
    pub fn online_if_ready(&self) -> Result<Option<BTreeMap<String, Online>>> {
        let Ok(_one) = self.reading[Kind::Feedback as usize].try_lock() else { return Ok(None) };
        self.catch_up_held(Kind::Feedback)?;
        self.counts().map(Some)
    }

    fn counts(&self) -> Result<BTreeMap<String, Online>> {
        let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let adapters = match tx.open_table(ADAPTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(db_err(&self.path, e)),
        };
        let mut out = BTreeMap::new();
        for row in adapters.iter().map_err(|e| db_err(&self.path, e))? {
            let (k, v) = row.map_err(|e| db_err(&self.path, e))?;
            let (impressions, positive, negative) = v.value();
            out.insert(k.value().to_string(), Online::from_counts(impressions, positive, negative));
        }
        Ok(out)
    }

    /// Where each of `docs` (id, text) is recorded: its own id when new or recorded with this
    /// text, else a version id ([`version_id`]); and the lines to append for those not recorded
    /// yet. The caller holds the corpus's lock and appends the lines (read back at the next use).
    pub fn resolve(&self, docs: &[(String, &str)]) -> Result<Recorded> {
        self.catch_up(Kind::Documents)?;
        let tx = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let table = match tx.open_table(DOCUMENTS) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(db_err(&self.path, e)),
        };
        let mut out = Recorded { ids: Vec::with_capacity(docs.len()), lines: Vec::new() };
        let mut fresh: Vec<(String, [u8; 32])> = Vec::new();
        for (id, text) in docs {
            let d = text_digest(text);
            let mut chosen = id.clone();
            for candidate in [id.clone(), version_id(id, &d), format!("{id}#{}", hex(&d))] {
                chosen = candidate;
                let known: Option<Vec<u8>> = match &table {
                    Some(t) => t.get(chosen.as_str()).map_err(|e| db_err(&self.path, e))?.map(|v| v.value().to_vec()),
                    None => None,
                }
                .or_else(|| fresh.iter().find(|(f, _)| *f == chosen).map(|(_, d)| d.to_vec()));
                match known {
                    Some(old) if old == d => break,
                    Some(_) => continue,
                    None => {
                        out.lines.push(json!({"id": chosen, "text": text}).to_string());
                        fresh.push((chosen.clone(), d));
                        break;
                    }
                }
            }
            out.ids.push(chosen);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Root;
    use crate::store::feedback::{check_signal, content_id, online, same_document, signal_line};

    fn corpus() -> (tempfile::TempDir, CorpusFeedback) {
        let dir = tempfile::tempdir().unwrap();
        let root = Root { dir: dir.path().to_path_buf() };
        let fb = CorpusFeedback::new(&root, &crate::ids::CorpusName::parse("c").unwrap());
        (dir, fb)
    }

    #[test]
    fn documents_are_recorded_once_and_an_edited_text_is_a_new_version() {
        let (_d, fb) = corpus();
        let idx = FeedbackIndex::open(&fb).unwrap();
        let docs = vec![("a".to_string(), "alpha"), ("b".to_string(), "beta"), ("a".to_string(), "alpha")];
        let r = idx.resolve(&docs).unwrap();
        assert_eq!((r.ids.clone(), r.lines.len()), (vec!["a".to_string(), "b".into(), "a".into()], 2));
        fb.append(&fb.documents, &r.lines).unwrap();
        assert!(idx.resolve(&docs).unwrap().lines.is_empty());
        // b edited: a version of b, the same id for the same text every time and after a rebuild.
        let edited = vec![("b".to_string(), "beta, edited")];
        let r = idx.resolve(&edited).unwrap();
        let v = r.ids[0].clone();
        assert!(v.starts_with("b#") && same_document(&v, "b") && !same_document(&v, "a"), "{v}");
        fb.append(&fb.documents, &r.lines).unwrap();
        drop(idx);
        std::fs::remove_file(fb.feedback.with_file_name("feedback.index")).unwrap();
        let again = FeedbackIndex::open(&fb).unwrap().resolve(&edited).unwrap();
        assert_eq!((again.ids, again.lines.len()), (vec![v.clone()], 0));
        // The documents file stays loadable: no id twice with two texts.
        let texts: Vec<Value> =
            std::fs::read_to_string(&fb.documents).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let ids: std::collections::HashSet<&str> = texts.iter().map(|t| t["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), texts.len(), "{texts:?}");
        // A signal by the client's id finds the version the ranking showed.
        let ev = Impression { corpus: fb.corpus.clone(), docs: vec!["a".into(), v.clone()] };
        assert_eq!(check_signal(&ev, "click", None, Some("b")).unwrap(), Some(v.clone()));
        assert_eq!(check_signal(&ev, "click", Some(1), Some("b")).unwrap(), Some(v));
        assert_ne!(content_id("alpha"), content_id("beta"));
    }

    /// Events and online counts through the index equal a pass over the file, as the file grows,
    /// after a torn tail is completed, and after the file is replaced by hand.
    #[test]
    fn events_and_counts_follow_the_file_as_it_grows_and_is_replaced() {
        let (_d, fb) = corpus();
        let idx = FeedbackIndex::open(&fb).unwrap();
        let event = |id: &str, adapter: &str| {
            json!({"event_id": id, "query": "q", "shown": ["x"], "documents": ["x", "y"], "adapter": adapter})
                .to_string()
        };
        assert!(idx.event("e1").unwrap().is_none());
        fb.append(&fb.feedback, &[event("e1", "base"), signal_line("e1", "thumbsup", Some("x"))]).unwrap();
        assert_eq!(idx.event("e1").unwrap().unwrap().docs, vec!["x", "y"]);
        assert_eq!(idx.online().unwrap(), online(&fb.feedback).unwrap());
        // A line being written is not read until it is complete.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&fb.feedback).unwrap();
        let e2 = event("e2", "r1");
        f.write_all(&e2.as_bytes()[..10]).unwrap();
        assert!(idx.event("e2").unwrap().is_none());
        f.write_all(&e2.as_bytes()[10..]).unwrap();
        f.write_all(b"\n").unwrap();
        let lines: Vec<String> = (0..50).map(|i| signal_line("e2", ["click", "thumbsdown"][i % 2], None)).collect();
        fb.append(&fb.feedback, &lines).unwrap();
        assert_eq!(idx.event("e2").unwrap().unwrap().docs, vec!["x", "y"]);
        let counts = idx.online().unwrap();
        assert_eq!((counts["r1"].impressions, counts["r1"].positive, counts["r1"].negative), (1, 25, 25));
        assert_eq!(counts, online(&fb.feedback).unwrap());
        // Replaced by hand (a new file): the index starts over.
        let tmp = fb.feedback.with_extension("new");
        std::fs::write(&tmp, format!("{}\n", event("e3", "r2"))).unwrap();
        std::fs::rename(&tmp, &fb.feedback).unwrap();
        assert!(idx.event("e1").unwrap().is_none());
        assert!(idx.event("e3").unwrap().is_some());
        assert_eq!(idx.online().unwrap(), online(&fb.feedback).unwrap());
    }
}
