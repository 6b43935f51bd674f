//! What serve scores with: each base model loaded once and shared, one scorer per corpus (its
//! promoted LoRA set on that base, with the instruction and max_length it was trained with), and
//! the hot reload that swaps a corpus's scorer when `models/<corpus>/current` changes.
//!
//! A request takes an `Arc<Scorer>` when it is admitted and every one of its pairs is scored with
//! that one: a swap between batches can neither fail nor mix a request in flight, and the
//! response names the adapter that really scored it.

use crate::ids::{CorpusName, RunId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock, Weak};

use candle_core::Device;

use crate::model::qwen3::PrefixCache;
use crate::model::{LoraSet, Reranker};
use crate::store::{Root, models};

pub use crate::store::models::DEFAULT_MAX_LENGTH;

/// A base model, loaded once per process whatever number of corpora share it.
pub struct Base {
    pub spec: String,
    pub reranker: Reranker,
}

/// One servable model: a base, an optional LoRA set, and how prompts are built for it.
pub struct Scorer {
    /// The corpus it serves; `None` for the bare `base` model.
    pub corpus: Option<CorpusName>,
    /// The promoted run whose adapter this is, or `None` for the base model.
    pub run_id: Option<RunId>,
    pub base: Arc<Base>,
    pub lora: Option<LoraSet>,
    pub instruction: String,
    pub max_length: usize,
    /// The prompt prefix (template, instruction, query) of the last request with one: the next
    /// request reuses what it shares (the template and instruction at least). One per scorer;
    /// a reloaded adapter is a new scorer, so a cache never outlives its adapter.
    pub last_prefix: Mutex<Option<PrefixCache>>,
}

impl Scorer {
    /// The adapter label of responses: the run id, or `base`.
    pub fn adapter(&self) -> &str {
        self.run_id.as_deref().unwrap_or("base")
    }
}

/// Why a model name could not be served: unknown (404) or failed to load (503).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Unavailable(String),
}

struct Entry {
    /// What requests for the corpus get now; `None` only when nothing could ever be loaded.
    serving: Option<Arc<Scorer>>,
    /// The run `current` pointed at when last looked (`None`: nothing promoted).
    seen: Option<RunId>,
    /// Why the promoted adapter is not the one serving.
    error: Option<String>,
}

/// One reload's outcome, for the log and the metrics.
pub struct Reload {
    pub corpus: CorpusName,
    pub from: String,
    pub to: String,
    pub error: Option<String>,
}

pub struct Models {
    root: Root,
    device: Device,
    /// The base model of a corpus with nothing promoted, and of `base`.
    default_model: String,
    /// `--corpus`: only these are served (any corpus with a home or models when empty).
    only: BTreeSet<CorpusName>,
    bases: Mutex<HashMap<String, Weak<Base>>>,
    corpora: RwLock<BTreeMap<CorpusName, Entry>>,
    /// `<corpus>@<run_id>` scorers asked for by name, most recent last (a few kept).
    pinned: Mutex<Vec<Arc<Scorer>>>,
    bare: Mutex<Option<Arc<Scorer>>>,
    /// Serialises loads, so two first requests for one corpus load it once.
    loading: Mutex<()>,
}

const PINNED_KEPT: usize = 4;

impl Models {
    pub fn new(root: &Root, device: Device, default_model: String, only: BTreeSet<CorpusName>) -> Self {
        Self {
            root: root.clone(),
            device,
            default_model,
            only,
            bases: Mutex::new(HashMap::new()),
            corpora: RwLock::new(BTreeMap::new()),
            pinned: Mutex::new(Vec::new()),
            bare: Mutex::new(None),
            loading: Mutex::new(()),
        }
    }

    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    /// The corpora to load at start: `--corpus`, else every corpus with a promoted adapter.
    pub fn startup_corpora(&self) -> Vec<CorpusName> {
        if !self.only.is_empty() {
            return self.only.iter().cloned().collect();
        }
        models::corpora(&self.root).into_iter().filter(|c| models::current_run(&self.root, c).is_some()).collect()
    }

    /// Whether a request for `corpus` would be served now rather than answered 404 (what
    /// `/v1/models` lists).
    pub fn is_servable(&self, corpus: &CorpusName) -> bool {
        self.servable(corpus.as_str()).is_ok()
    }

    /// Whether `corpus` may be served: a valid name, allowed by `--corpus`, and known here (it has
    /// a home under corpora/ or promoted models), so a typo is a 404, not the base model.
    fn servable(&self, name: &str) -> Result<CorpusName, ResolveError> {
        let corpus = CorpusName::parse(name).map_err(|e| ResolveError::Unknown(e.to_string()))?;
        if !self.only.is_empty() {
            return if self.only.contains(&corpus) {
                Ok(corpus)
            } else {
                Err(ResolveError::Unknown(format!(
                    "corpus `{corpus}` is not served here (serving: {})",
                    self.only.iter().cloned().collect::<Vec<_>>().join(", ")
                )))
            };
        }
        if self.root.models(&corpus).is_dir() || self.root.corpus_home(&corpus).is_dir() {
            Ok(corpus)
        } else {
            Err(ResolveError::Unknown(format!(
                "unknown corpus `{corpus}`: it has no {} and no promoted models",
                self.root.corpus_home(&corpus).display()
            )))
        }
    }

    /// The scorer for a request's model name: a corpus, `<corpus>@<run_id>` (a promoted adapter of
    /// that corpus, current or not), or `base`. May load (call off the async threads).
    pub fn resolve(&self, name: &str) -> Result<Arc<Scorer>, ResolveError> {
        if name == "base" {
            return self.bare();
        }
        if let Some((corpus, run)) = name.split_once('@') {
            let corpus = self.servable(corpus)?;
            return self.pinned(&corpus, run);
        }
        let name = self.servable(name)?;
        if let Some(s) = self.serving(&name)? {
            return Ok(s);
        }
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = self.serving(&name)? {
            return Ok(s);
        }
        self.load_corpus(&name);
        self.serving(&name)?.ok_or_else(|| ResolveError::Unavailable(format!("corpus `{name}` could not be loaded")))
    }

    fn serving(&self, corpus: &CorpusName) -> Result<Option<Arc<Scorer>>, ResolveError> {
        let map = self.corpora.read().unwrap_or_else(|e| e.into_inner());
        match map.get(corpus) {
            None => Ok(None),
            Some(Entry { serving: Some(s), .. }) => Ok(Some(s.clone())),
            Some(Entry { error, .. }) => Err(ResolveError::Unavailable(format!(
                "corpus `{corpus}` has no model loaded: {}",
                error.as_deref().unwrap_or("not loaded")
            ))),
        }
    }

    /// Loads a corpus's entry for the first time (its promoted adapter, else the base model).
    pub fn load_corpus(&self, corpus: &CorpusName) {
        let seen = models::current_run(&self.root, corpus);
        let (serving, error) = match self.build(corpus, seen.as_ref()) {
            Ok(s) => (Some(Arc::new(s)), None),
            Err(e) => (None, Some(e)),
        };
        match &error {
            None => tracing::info!(corpus = %corpus, adapter = seen.as_deref().unwrap_or("base"), "serving"),
            Some(e) => tracing::error!(corpus = %corpus, "cannot serve: {e}"),
        }
        self.corpora.write().unwrap_or_else(|e| e.into_inner()).insert(corpus.clone(), Entry { serving, seen, error });
    }

    fn bare(&self) -> Result<Arc<Scorer>, ResolveError> {
        let mut bare = self.bare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = &*bare {
            return Ok(s.clone());
        }
        let s = Arc::new(self.build_base(None).map_err(ResolveError::Unavailable)?);
        *bare = Some(s.clone());
        Ok(s)
    }

    fn pinned(&self, corpus: &CorpusName, run: &str) -> Result<Arc<Scorer>, ResolveError> {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pinned.iter().position(|s| s.corpus.as_ref() == Some(corpus) && s.adapter() == run) {
            let s = pinned.remove(i);
            pinned.push(s.clone());
            return Ok(s);
        }
        let unknown = || ResolveError::Unknown(format!("corpus `{corpus}` has no promoted adapter `{run}`"));
        let run = RunId::parse(run).map_err(|_| unknown())?;
        if models::adapter_dir(&self.root, corpus, &run).is_none() {
            return Err(unknown());
        }
        let s = Arc::new(self.build(corpus, Some(&run)).map_err(ResolveError::Unavailable)?);
        if pinned.len() >= PINNED_KEPT {
            pinned.remove(0);
        }
        pinned.push(s.clone());
        Ok(s)
    }

    /// A base model by spec: the one already loaded if any scorer still holds it.
    fn base(&self, spec: &str) -> Result<Arc<Base>, String> {
        let mut bases = self.bases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = bases.get(spec).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let reranker = Reranker::load(spec, &self.device).map_err(|e| format!("loading base model {spec}: {e}"))?;
        let b = Arc::new(Base { spec: spec.to_string(), reranker });
        bases.retain(|_, w| w.strong_count() > 0);
        bases.insert(spec.to_string(), Arc::downgrade(&b));
        tracing::info!(model = spec, "base model loaded");
        Ok(b)
    }

    fn build_base(&self, corpus: Option<&CorpusName>) -> Result<Scorer, String> {
        // An exported checkpoint carries its own instruction and max_length (rerankd_export.json).
        let base = self.base(&self.default_model)?;
        Ok(Scorer {
            corpus: corpus.cloned(),
            run_id: None,
            instruction: base.reranker.instruction.clone(),
            max_length: base.reranker.max_length.unwrap_or(DEFAULT_MAX_LENGTH),
            base,
            lora: None,
            last_prefix: Mutex::new(None),
        })
    }

    /// The scorer of `corpus` at a promoted run (its manifest's base, instruction, max_length, and
    /// its LoRA set), or the base model when no run is named.
    fn build(&self, corpus: &CorpusName, run: Option<&RunId>) -> Result<Scorer, String> {
        let Some(run) = run else { return self.build_base(Some(corpus)) };
        let adapter = models::Adapter::promoted(&self.root, corpus, run).map_err(|e| e.to_string())?;
        let base = self.base(adapter.base_model().unwrap_or_default())?;
        let lora = adapter.lora(&base.reranker.model.cfg, &self.device).map_err(|e| e.to_string())?;
        Ok(Scorer {
            corpus: Some(corpus.clone()),
            run_id: Some(run.clone()),
            base,
            lora: Some(lora),
            instruction: adapter.scoring_instruction(),
            max_length: adapter.scoring_max_length(),
            last_prefix: Mutex::new(None),
        })
    }

    /// Looks at every loaded corpus's `current` and swaps in what changed (loaded beside the old
    /// scorer, which keeps serving until the swap and stays if the new one fails). `retry` also
    /// retries a promoted adapter that failed to load before (SIGHUP).
    pub fn refresh(&self, retry: bool) -> Vec<Reload> {
        let seen: Vec<(CorpusName, Option<RunId>, bool)> = {
            let map = self.corpora.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(c, e)| (c.clone(), e.seen.clone(), e.error.is_some())).collect()
        };
        let mut out = Vec::new();
        for (corpus, before, failed) in seen {
            let now = models::current_run(&self.root, &corpus);
            if now == before && !(retry && failed) {
                continue;
            }
            let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            let built = self.build(&corpus, now.as_ref());
            let mut map = self.corpora.write().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = map.get_mut(&corpus) else { continue };
            let from = entry.serving.as_ref().map_or("none", |s| s.adapter()).to_string();
            let to = now.as_deref().unwrap_or("base").to_string();
            entry.seen = now;
            match built {
                Ok(s) => {
                    entry.serving = Some(Arc::new(s));
                    entry.error = None;
                    out.push(Reload { corpus, from, to, error: None });
                }
                Err(e) => {
                    entry.error = Some(e.clone());
                    out.push(Reload { corpus, from, to, error: Some(e) });
                }
            }
        }
        out
    }

    /// What `/v1/models` and serve.json show: per corpus, the scorer serving and any load error.
    pub fn snapshot(&self) -> Vec<(CorpusName, Option<Arc<Scorer>>, Option<String>)> {
        let map = self.corpora.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(c, e)| (c.clone(), e.serving.clone(), e.error.clone())).collect()
    }

    /// Whether any model is loaded (what `/health` answers).
    pub fn any_loaded(&self) -> bool {
        self.snapshot().iter().any(|(_, s, _)| s.is_some())
            || self.bare.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Loads the bare base model now (at start, so `base` and new corpora answer at once).
    pub fn preload_base(&self) -> Result<(), String> {
        self.bare().map(|_| ()).map_err(|e| e.to_string())
    }
}
