//! The HTTP API: TEI's `POST /rerank`, the Cohere/Jina/Infinity `POST /v1/rerank` and
//! `/v2/rerank`, `/health`, `/v1/models` and `/metrics`, on axum. Request bodies are read up to
//! `serve.max_body_kb` and parsed with serde (unknown fields ignored); every error is JSON
//! `{"error": {"message", "type"}}` with its 4xx/5xx status.

use crate::ids::CorpusName;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::batcher::{Batcher, Work};
use super::capture::{Capture, CaptureError};
use super::models::{Models, ResolveError, Scorer};
use super::telemetry::{ErrorLabels, RequestLabels, Telemetry};
use crate::config::ServeConfig;
use crate::model::reranker::PairLogits;
use crate::store::feedback::content_id;

/// Everything a handler needs.
pub struct App {
    pub models: Arc<Models>,
    pub batcher: Batcher,
    pub telemetry: Arc<Telemetry>,
    pub settings: RwLock<ServeConfig>,
    /// The bearer token every endpoint but `/health` requires, when one is configured.
    pub api_key: RwLock<Option<Vec<u8>>>,
    pub default_corpus: Option<CorpusName>,
    pub capture: Arc<Capture>,
    /// Set by SIGTERM: new scoring requests get 503 while in-flight ones finish.
    pub draining: AtomicBool,
}

impl App {
    fn settings(&self) -> ServeConfig {
        self.settings.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An error response: status, a machine-readable type, a message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

/// The error type, carried to the metrics middleware.
#[derive(Clone)]
struct ErrorKind(&'static str);

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), retry_after: None }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"message": self.message, "type": self.kind}}));
        let mut r = (self.status, body).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r.extensions_mut().insert(ErrorKind(self.kind));
        r
    }
}

impl From<CaptureError> for ApiError {
    fn from(e: CaptureError) -> Self {
        match e {
            CaptureError::Invalid(m) => ApiError::bad_request(m),
            CaptureError::Unknown(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            CaptureError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            CaptureError::Io(m) => ApiError::internal(format!("recording feedback: {m}")),
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Unknown(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            ResolveError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/rerank", post(tei))
        .route("/corpora/{corpus}/rerank", post(tei_corpus))
        .route("/v1/rerank", post(cohere_v1))
        .route("/v2/rerank", post(cohere_v2))
        .route("/v1/feedback", post(feedback))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(protected)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        // Bodies are read by `read_json` under the limit in force (it changes on SIGHUP).
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

/// Counts every request by endpoint and status, its errors by type, and its latency.
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let t = &app.telemetry;
    t.latency.observe(t0.elapsed().as_secs_f64());
    t.requests.get_or_create(&RequestLabels { endpoint: endpoint.clone(), status: resp.status().as_u16() }).inc();
    if let Some(ErrorKind(kind)) = resp.extensions().get::<ErrorKind>() {
        t.errors.get_or_create(&ErrorLabels { endpoint, r#type: kind.to_string() }).inc();
    }
    resp
}

/// `Authorization: Bearer <key>`, compared in constant time, when a key is configured.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let key = app.api_key.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(key) = key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !bool::from(given.ct_eq(&key)) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token")
                .into_response();
        }
    }
    next.run(req).await
}

/// How much of an over-long body is read and thrown away before the 413, so that a client still
/// sending it gets the answer instead of a reset connection (past it, the connection is cut).
const DRAIN_BYTES: usize = 64 << 20;

/// How long a client may take to send its request body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The body, up to `limit` bytes kept, parsed as JSON; a body still arriving after
/// [`BODY_TIMEOUT`] is a 408, so a client that stalls holds nothing for long.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let kept = tokio::time::timeout(BODY_TIMEOUT, read_body(body, limit)).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )
    })??;
    serde_json::from_slice(&kept).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let (mut kept, mut seen) = (Vec::new(), 0usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > limit + DRAIN_BYTES {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(format!(
            "the request body is over {limit} bytes (serve.max_body_kb = {})",
            limit >> 10
        )));
    }
    Ok(kept)
}

/// What a rerank request asks of the scorer, whatever its API shape.
struct Ask {
    model: String,
    query: String,
    docs: Vec<String>,
    /// The client's document ids (Cohere `{text, id}`), for capture; others get a content hash.
    ids: Vec<Option<String>>,
    /// The documents' field name in this API, for messages.
    field: &'static str,
    /// TEI `truncate: false`: a pair longer than max_length is an error instead of being cut.
    refuse_long: bool,
    max_tokens_per_doc: Option<usize>,
}

struct Ranked {
    scorer: Arc<Scorer>,
    scores: Vec<PairLogits>,
    tokens: usize,
    /// The response id, which is also the captured event's id.
    id: String,
}

impl Ranked {
    /// Indices by score, best first (ties in input order).
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.scores.len()).collect();
        order.sort_by(|&a, &b| self.scores[b].score.total_cmp(&self.scores[a].score));
        order
    }

    fn headers(&self) -> [(&'static str, String); 2] {
        [("x-rerankd-adapter", self.scorer.adapter().to_string()), ("x-rerankd-event-id", self.id.clone())]
    }

    fn meta(&self) -> Value {
        json!({"corpus": self.scorer.corpus, "adapter": self.scorer.adapter(),
               "base_model": self.scorer.base.spec, "max_length": self.scorer.max_length})
    }
}

/// Validates, admits, tokenizes and scores one request.
async fn rank(app: &Arc<App>, ask: Ask) -> Result<Ranked, ApiError> {
    if app.draining.load(Ordering::Acquire) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let n = ask.docs.len();
    if n == 0 {
        return Err(ApiError::bad_request(format!("`{}` is empty: give at least one document", ask.field)));
    }
    let max_docs = app.settings().max_documents;
    if n > max_docs {
        return Err(ApiError::too_large(format!(
            "{n} documents in `{}`; this server ranks at most {max_docs} per request (serve.max_documents)",
            ask.field
        )));
    }
    if ask.max_tokens_per_doc == Some(0) {
        return Err(ApiError::bad_request("`max_tokens_per_doc` must be at least 1"));
    }
    if let Some(i) = ask.ids.iter().position(|id| id.as_ref().is_some_and(|id| id.is_empty() || id.len() > 256)) {
        return Err(ApiError::bad_request(format!("`{}[{i}].id` must be 1 to 256 bytes", ask.field)));
    }
    let admission = app.batcher.admit(n).map_err(|full| ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "the scoring queue is full ({} of {} pairs, serve.max_queue_pairs); retry shortly",
                full.admitted, full.max
            ),
        )
    })?;
    let models = app.models.clone();
    let model = ask.model.clone();
    let scorer = tokio::task::spawn_blocking(move || models.resolve(&model))
        .await
        .map_err(|e| ApiError::internal(format!("loading the model: {e}")))??;
    let s = scorer.clone();
    let (seqs, ask) = tokio::task::spawn_blocking(move || tokenize(&s, &ask).map(|seqs| (seqs, ask)))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))??;
    let tokens = seqs.iter().map(Vec::len).sum();
    let (reply, rx) = oneshot::channel();
    app.batcher.submit(Work { scorer: scorer.clone(), seqs, reply, admission });
    let scores = rx
        .await
        .map_err(|_| ApiError::internal("the scoring thread dropped the request"))?
        .map_err(|e| ApiError::internal(format!("scoring failed: {e}")))?;
    let r = Ranked { scorer, scores, tokens, id: response_id() };
    if let Some(corpus) = r.scorer.corpus.clone() {
        let (capture, id, adapter, order) =
            (app.capture.clone(), r.id.clone(), r.scorer.adapter().to_string(), r.order());
        tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
            if !capture.enabled(&corpus) {
                return Ok(());
            }
            let docs: Vec<(String, &str)> = ask
                .docs
                .iter()
                .zip(&ask.ids)
                .map(|(text, id)| (id.clone().unwrap_or_else(|| content_id(text)), text.as_str()))
                .collect();
            Ok(capture.record(&corpus, &id, &ask.query, &docs, &order, &adapter)?)
        })
        .await
        .map_err(|e| ApiError::internal(format!("recording feedback: {e}")))??;
    }
    Ok(r)
}

/// The prompts of one request, built and truncated exactly as `rerankd score` builds them.
fn tokenize(s: &Scorer, ask: &Ask) -> Result<Vec<Vec<u32>>, ApiError> {
    let p = &s.base.reranker.prompt;
    let fail = |e: crate::model::ModelError| ApiError::bad_request(format!("cannot tokenize: {e}"));
    ask.docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            let doc = match ask.max_tokens_per_doc {
                Some(k) => p.truncate_tokens(doc, k).map_err(fail)?,
                None => doc.clone(),
            };
            if ask.refuse_long {
                let len = p.prompt_len(&s.instruction, &ask.query, &doc).map_err(fail)?;
                if len > s.max_length {
                    return Err(ApiError::too_large(format!(
                        "`{}[{i}]` makes a prompt of {len} tokens, over this model's max_length {}, and `truncate` is false",
                        ask.field, s.max_length
                    )));
                }
            }
            p.encode_pair(&s.instruction, &ask.query, &doc, s.max_length).map_err(fail)
        })
        .collect()
}

fn default_model(app: &App) -> String {
    app.default_corpus.as_deref().unwrap_or("base").to_string()
}

#[derive(Deserialize)]
struct TeiRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    truncate: Option<bool>,
}

async fn tei(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let model = default_model(&app);
    tei_for(app, model, body).await
}

async fn tei_corpus(State(app): State<Arc<App>>, Path(corpus): Path<String>, body: Body) -> Result<Response, ApiError> {
    tei_for(app, corpus, body).await
}

async fn tei_for(app: Arc<App>, model: String, body: Body) -> Result<Response, ApiError> {
    let req: TeiRequest = read_json(body, app.settings().max_body_bytes).await?;
    let ask = Ask {
        model,
        query: req.query,
        ids: vec![None; req.texts.len()],
        docs: req.texts,
        field: "texts",
        refuse_long: req.truncate == Some(false),
        max_tokens_per_doc: None,
    };
    let texts = req.return_text.then(|| ask.docs.clone());
    let r = rank(&app, ask).await?;
    let out: Vec<Value> = r
        .order()
        .into_iter()
        .map(|i| {
            let s = &r.scores[i];
            let mut o = json!({"index": i, "score": if req.raw_scores { s.yes_logit - s.no_logit } else { s.score }});
            if let Some(t) = &texts {
                o["text"] = t[i].clone().into();
            }
            o
        })
        .collect();
    Ok((r.headers(), Json(out)).into_response())
}

/// A Cohere/Jina document: a string, or an object with `text` (and an `id`, kept for capture).
#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String, id: Option<String> },
}

#[derive(Deserialize)]
struct CohereRequest {
    model: Option<String>,
    query: String,
    documents: Vec<Document>,
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: bool,
    max_tokens_per_doc: Option<usize>,
}

async fn cohere_v1(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    cohere(app, body, "1").await
}

async fn cohere_v2(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    cohere(app, body, "2").await
}

async fn cohere(app: Arc<App>, body: Body, version: &str) -> Result<Response, ApiError> {
    let req: CohereRequest = read_json(body, app.settings().max_body_bytes).await?;
    if req.top_n == Some(0) {
        return Err(ApiError::bad_request("`top_n` must be at least 1"));
    }
    let model = req.model.filter(|m| !m.is_empty()).unwrap_or_else(|| default_model(&app));
    let (docs, ids): (Vec<String>, Vec<Option<String>>) = req
        .documents
        .into_iter()
        .map(|d| match d {
            Document::Text(t) => (t, None),
            Document::Object { text, id } => (text, id),
        })
        .unzip();
    let ask = Ask {
        model: model.clone(),
        query: req.query,
        docs,
        ids,
        field: "documents",
        refuse_long: false,
        max_tokens_per_doc: req.max_tokens_per_doc,
    };
    let texts = req.return_documents.then(|| ask.docs.clone());
    let r = rank(&app, ask).await?;
    let mut order = r.order();
    order.truncate(req.top_n.unwrap_or(usize::MAX));
    let results: Vec<Value> = order
        .into_iter()
        .map(|i| {
            let mut o = json!({"index": i, "relevance_score": r.scores[i].score});
            if let Some(t) = &texts {
                o["document"] = json!({"text": t[i]});
            }
            o
        })
        .collect();
    let mut meta = json!({"api_version": {"version": version}, "billed_units": {"search_units": 1}});
    if let (Value::Object(m), Value::Object(extra)) = (&mut meta, r.meta()) {
        m.extend(extra);
    }
    let body = json!({"id": r.id, "model": model, "results": results, "meta": meta,
                      "usage": {"total_tokens": r.tokens}});
    Ok((r.headers(), Json(body)).into_response())
}

/// The largest feedback body: a signal is a few short fields.
const MAX_FEEDBACK_BODY: usize = 64 << 10;

#[derive(Deserialize)]
struct FeedbackRequest {
    /// The rerank response's id (the captured event).
    id: String,
    signal: String,
    index: Option<usize>,
    doc_id: Option<String>,
    corpus: Option<CorpusName>,
}

/// `POST /v1/feedback {id, signal, index | doc_id}`: a signal on a captured ranking.
async fn feedback(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiError> {
    let req: FeedbackRequest = read_json(body, MAX_FEEDBACK_BODY).await?;
    let capture = app.capture.clone();
    let (corpus, doc) = tokio::task::spawn_blocking(move || {
        capture.signal(req.corpus.as_ref(), &req.id, &req.signal, req.index, req.doc_id.as_deref()).map(|r| (r, req))
    })
    .await
    .map_err(|e| ApiError::internal(format!("recording feedback: {e}")))?
    .map(|((corpus, doc), req)| (corpus, json!({"event_id": req.id, "signal": req.signal, "doc_id": doc})))?;
    let mut out = doc;
    out["corpus"] = corpus.as_str().into();
    out["status"] = "recorded".into();
    Ok(Json(out).into_response())
}

/// A random 128-bit id for a response (the event id feedback refers to).
fn response_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::Acquire) {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    let models = app.models.clone();
    let loaded = tokio::task::spawn_blocking(move || models.any_loaded()).await.unwrap_or(false);
    if loaded {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::unavailable("no model is loaded yet").into_response()
    }
}

async fn list_models(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let (root, snapshot) = (app.capture.root().clone(), app.models.snapshot());
    // Online counts per adapter, from each corpus's feedback.jsonl (a streamed pass).
    let mut data: Vec<Value> = tokio::task::spawn_blocking(move || {
        snapshot
            .into_iter()
            .map(|(corpus, s, error)| {
                let mut o = json!({"id": corpus, "object": "model", "owned_by": "rerankd"});
                if let Some(s) = s {
                    o["adapter"] = s.adapter().into();
                    o["base_model"] = s.base.spec.clone().into();
                    o["max_length"] = s.max_length.into();
                    o["instruction"] = s.instruction.clone().into();
                }
                if let Some(e) = error {
                    o["load_error"] = e.into();
                }
                let fb = crate::store::feedback::CorpusFeedback::new(&root, &corpus);
                match crate::store::feedback::online(&fb.feedback) {
                    Ok(m) if !m.is_empty() => o["online"] = json!(m),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("online counts of {corpus}: {e}"),
                }
                o
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(format!("listing models: {e}")))?;
    data.push(json!({"id": "base", "object": "model", "owned_by": "rerankd", "adapter": "base",
                     "base_model": app.models.default_model(), "max_length": super::models::DEFAULT_MAX_LENGTH}));
    Ok(Json(json!({"object": "list", "data": data, "default": app.default_corpus})))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let rss = crate::sys::process_memory_mb(std::process::id()).unwrap_or(0);
    app.telemetry.resident.set((rss << 20) as i64);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    (headers, app.telemetry.encode())
}
