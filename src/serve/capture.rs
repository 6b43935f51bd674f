//! Feedback capture: each ranking served for a corpus with capture on becomes a query event in
//! its feedback.jsonl (`event_id` = the response id, `shown` = the order returned, `documents` =
//! the request's order, `adapter` = what scored it), its new documents are appended once to
//! documents.jsonl (a document whose id was recorded with another text, an edited article, is
//! recorded as a new version under `<id>#<digest>`), and `POST /v1/feedback` appends signals on
//! those events. Every append goes
//! through `store::feedback` (the corpus's lock, one write per line).

use crate::ids::CorpusName;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::store::feedback::{
    CorpusFeedback, DocumentIndex, Impression, MAX_LINE, check_signal, find_event, signal_line,
};
use crate::store::time::now_rfc3339;
use crate::store::{Root, policy};

/// Events kept in memory to answer feedback without reading the file (older ones are found by
/// scanning it): at most this many, holding at most [`RECENT_IDS`] document ids in all.
const RECENT_EVENTS: usize = 100_000;
const RECENT_IDS: usize = 1_000_000;

/// Why capture or a signal was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The client's input (400).
    #[error("{0}")]
    Invalid(String),
    /// No such event (404).
    #[error("{0}")]
    Unknown(String),
    /// The files (500).
    #[error("{0}")]
    Io(String),
}

struct CorpusState {
    fb: CorpusFeedback,
    docs: DocumentIndex,
}

pub struct Capture {
    root: Root,
    /// `--capture`: every corpus, whatever its policy says.
    all: bool,
    corpora: Mutex<HashMap<CorpusName, Arc<Mutex<CorpusState>>>>,
    recent: Mutex<Recent>,
}

/// Recently captured events, oldest first, bounded in events and in document ids.
#[derive(Default)]
struct Recent {
    map: HashMap<String, Impression>,
    order: VecDeque<String>,
    ids: usize,
}

impl Capture {
    pub fn new(root: &Root, all: bool) -> Self {
        Self { root: root.clone(), all, corpora: Mutex::new(HashMap::new()), recent: Default::default() }
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Whether rankings of `corpus` are captured: `--capture`, or `"capture": true` in its
    /// policy.json (read each time, so turning it on needs no restart).
    pub fn enabled(&self, corpus: &CorpusName) -> bool {
        self.all
            || match policy::read(&self.root, corpus) {
                Ok(p) => p.is_some_and(|p| p.capture),
                Err(e) => {
                    tracing::warn!("{e}; not capturing");
                    false
                }
            }
    }

    fn state(&self, corpus: &CorpusName) -> Arc<Mutex<CorpusState>> {
        let mut map = self.corpora.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(corpus.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(CorpusState {
                    fb: CorpusFeedback::new(&self.root, corpus),
                    docs: DocumentIndex::default(),
                }))
            })
            .clone()
    }

    fn remember(&self, event_id: &str, ev: Impression) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.ids += ev.docs.len();
        match r.map.insert(event_id.to_string(), ev) {
            Some(old) => r.ids -= old.docs.len(),
            None => r.order.push_back(event_id.to_string()),
        }
        while r.order.len() > RECENT_EVENTS || (r.ids > RECENT_IDS && r.order.len() > 1) {
            let Some(old) = r.order.pop_front() else { break };
            if let Some(ev) = r.map.remove(&old) {
                r.ids -= ev.docs.len();
            }
        }
    }

    /// Records one served ranking: documents (id, text) in request order, `shown` = the request
    /// indices of the documents returned, in the order returned. New documents first, then the
    /// query event, both under the corpus's lock.
    pub fn record(
        &self,
        corpus: &CorpusName,
        event_id: &str,
        query: &str,
        docs: &[(String, &str)],
        shown: &[usize],
        adapter: &str,
    ) -> Result<(), CaptureError> {
        let state = self.state(corpus);
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let io = |e: crate::store::StoreError| CaptureError::Io(e.to_string());
        let _lock = st.fb.lock().map_err(io)?;
        let documents = st.fb.documents.clone();
        let recorded = st.docs.resolve(&documents, docs).map_err(io)?;
        let ids = recorded.ids.clone();
        let line = json!({"event_id": event_id, "ts": now_rfc3339(), "query": query,
                          "shown": shown.iter().map(|&i| &ids[i]).collect::<Vec<_>>(),
                          "documents": ids, "adapter": adapter})
        .to_string();
        if let Some(l) = recorded.lines.iter().chain([&line]).find(|l| l.len() > MAX_LINE) {
            return Err(CaptureError::Invalid(format!(
                "a line of {} bytes would be over the {MAX_LINE} byte line limit of the feedback files",
                l.len()
            )));
        }
        st.fb.append(&documents, &recorded.lines).map_err(io)?;
        st.docs.commit(recorded);
        let feedback = st.fb.feedback.clone();
        st.fb.append(&feedback, &[line]).map_err(io)?;
        drop(_lock);
        drop(st);
        self.remember(event_id, Impression { corpus: corpus.clone(), docs: ids });
        Ok(())
    }

    /// Appends a signal on event `event_id` (of `corpus` when given, else of any corpus this
    /// server captured or that has capture on). Returns the corpus and the document signalled.
    pub fn signal(
        &self,
        corpus: Option<&CorpusName>,
        event_id: &str,
        signal: &str,
        index: Option<usize>,
        doc_id: Option<&str>,
    ) -> Result<(CorpusName, Option<String>), CaptureError> {
        let ev = self.find(corpus, event_id)?;
        let doc = check_signal(&ev, signal, index, doc_id).map_err(CaptureError::Invalid)?;
        let state = self.state(&ev.corpus);
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        let io = |e: crate::store::StoreError| CaptureError::Io(e.to_string());
        let _lock = st.fb.lock().map_err(io)?;
        st.fb.append(&st.fb.feedback, &[signal_line(event_id, signal, doc.as_deref())]).map_err(io)?;
        Ok((ev.corpus, doc))
    }

    fn find(&self, corpus: Option<&CorpusName>, event_id: &str) -> Result<Impression, CaptureError> {
        let unknown = || {
            let shown: String = event_id.chars().take(80).collect();
            CaptureError::Unknown(format!("unknown event id `{shown}`: give the `id` of a captured rerank response"))
        };
        if event_id.is_empty() || event_id.len() > 256 {
            return Err(unknown());
        }
        if let Some(ev) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).map.get(event_id)
            && corpus.is_none_or(|c| *c == ev.corpus)
        {
            return Ok(ev.clone());
        }
        let candidates: Vec<CorpusName> = match corpus {
            Some(c) => vec![c.clone()],
            // Feedback files live in the corpus homes.
            None => self.root.corpus_homes().into_iter().filter(|c| self.enabled(c)).collect(),
        };
        for c in candidates {
            let fb = CorpusFeedback::new(&self.root, &c);
            if let Some(ev) = find_event(&fb, event_id).map_err(|e| CaptureError::Io(e.to_string()))? {
                self.remember(event_id, ev.clone());
                return Ok(ev);
            }
        }
        Err(unknown())
    }
}
