//! Feedback capture: each ranking served for a corpus with capture on becomes a query event in
//! its feedback.jsonl (`event_id` = the response id, `shown` = the order returned, `documents` =
//! the request's order, `adapter` = what scored it), its new documents are appended once to
//! documents.jsonl (a document whose id was recorded with another text, an edited article, is
//! recorded as a new version under `<id>#<digest>`), and `POST /v1/feedback` appends signals on
//! those events. Every append goes
//! through `store::feedback` (the corpus's lock, one write per line).

use crate::ids::CorpusName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::store::feedback::{CorpusFeedback, Impression, MAX_LINE, Online, check_signal, signal_line};
use crate::store::feedback_index::FeedbackIndex;
use crate::store::time::now_rfc3339;
use crate::store::{Root, policy};

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
    /// Opened at first use (an index that cannot be opened is retried at the next). It orders
    /// its own readers and writers: lookups do not wait for this state's lock.
    index: Option<Arc<FeedbackIndex>>,
}

impl CorpusState {
    fn index(&mut self) -> Result<Arc<FeedbackIndex>, CaptureError> {
        if self.index.is_none() {
            self.index = Some(Arc::new(FeedbackIndex::open(&self.fb).map_err(|e| CaptureError::Io(e.to_string()))?));
        }
        Ok(self.index.clone().expect("just opened"))
    }
}

pub struct Capture {
    root: Root,
    /// `--capture`: every corpus, whatever its policy says.
    all: bool,
    corpora: Mutex<HashMap<CorpusName, Arc<Mutex<CorpusState>>>>,
}

impl Capture {
    pub fn new(root: &Root, all: bool) -> Self {
        Self { root: root.clone(), all, corpora: Mutex::new(HashMap::new()) }
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
                Arc::new(Mutex::new(CorpusState { fb: CorpusFeedback::new(&self.root, corpus), index: None }))
            })
            .clone()
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
        let recorded = st.index()?.resolve(docs).map_err(io)?;
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
        let feedback = st.fb.feedback.clone();
        st.fb.append(&feedback, &[line]).map_err(io)?;
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
        let candidates: Vec<CorpusName> = match corpus {
            Some(c) => vec![c.clone()],
            // Feedback files live in the corpus homes.
            None => self.root.corpus_homes().into_iter().filter(|c| self.enabled(c)).collect(),
        };
        for c in candidates {
            let index = self.state(&c).lock().unwrap_or_else(|e| e.into_inner()).index()?;
            if let Some(ev) = index.event(event_id).map_err(|e| CaptureError::Io(e.to_string()))? {
                return Ok(ev);
            }
        }
        Err(unknown())
    }

    /// Brings the capture index of every corpus that captures up to date (at start, on a thread
    /// of its own: a first pass over a large feedback file takes a while; see docs/api.md).
    pub fn warm(&self) {
        for c in self.root.corpus_homes().into_iter().filter(|c| self.enabled(c)) {
            if let Err(e) = self.online(&c) {
                tracing::warn!(corpus = %c, "the capture index: {e}");
            }
        }
    }

    /// Online counts per adapter of `corpus` (none when it has no feedback file).
    pub fn online(&self, corpus: &CorpusName) -> Result<std::collections::BTreeMap<String, Online>, CaptureError> {
        let Some(index) = self.index_of_feedback(corpus)? else { return Ok(Default::default()) };
        index.online().map_err(|e| CaptureError::Io(e.to_string()))
    }

    /// [`Self::online`], or `None` while the index is still reading the feedback file (the
    /// first pass over a large one, at start): `/v1/models` does not wait for it.
    pub fn online_if_ready(
        &self,
        corpus: &CorpusName,
    ) -> Result<Option<std::collections::BTreeMap<String, Online>>, CaptureError> {
        let Some(index) = self.index_of_feedback(corpus)? else { return Ok(Some(Default::default())) };
        index.online_if_ready().map_err(|e| CaptureError::Io(e.to_string()))
    }

    /// The capture index of `corpus`, when it has a feedback file.
    fn index_of_feedback(&self, corpus: &CorpusName) -> Result<Option<Arc<FeedbackIndex>>, CaptureError> {
        let state = self.state(corpus);
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.fb.feedback.exists() {
            return Ok(None);
        }
        st.index().map(Some)
    }
}
