//! The HTTP API: TEI's `POST /rerank`, the Cohere/Jina `POST /v1/rerank` and `/v2/rerank`,
//! `/health`, `/v1/models` and `/metrics`, on axum. Request bodies are read up to
//! `serve.max_body_kb` and parsed with serde (unknown fields ignored); every error is JSON with
//! its 4xx/5xx status: TEI's `{"error", "error_type"}` on the TEI routes, `{"error": {"message",
//! "type"}}` elsewhere.
//!
//! Before any route: a request from a browser page of another origin is refused (`Origin`), a
//! loopback listener answers only loopback `Host` names (DNS rebinding), and a POST must say
//! `Content-Type: application/json` (a page cannot send that without the CORS preflight it fails).

use crate::ids::CorpusName;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Requests whose handler is running (SIGTERM waits for these, not for idle connections).
    pub in_flight: Arc<AtomicUsize>,
    /// One permit per core: requests tokenizing at once.
    pub tokenizing: tokio::sync::Semaphore,
    /// Request body bytes held at once, in KiB: a body's bytes take permits as they arrive and
    /// keep them until its answer (past the budget, uploads wait).
    pub bodies: Arc<tokio::sync::Semaphore>,
}

/// Request bodies held at once: this many times `serve.max_body_kb` (at start).
pub const BODIES_IN_FLIGHT: usize = 16;

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

    /// The same error as TEI answers it: its `error_type` and the status TEI gives that type
    /// (validation 422, empty 400, overloaded 429, unhealthy 503, backend 424); a size limit
    /// stays 413 and an unknown corpus 404, as TEI's own schema lists 413 and rerankd has routes
    /// TEI has not.
    fn tei(self) -> TeiError {
        let (status, error_type) = match self.kind {
            "invalid_request" => (StatusCode::UNPROCESSABLE_ENTITY, "Validation"),
            "empty" => (StatusCode::BAD_REQUEST, "Empty"),
            "tokenizer" => (StatusCode::UNPROCESSABLE_ENTITY, "Tokenizer"),
            "payload_too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "Validation"),
            "overloaded" => (StatusCode::TOO_MANY_REQUESTS, "Overloaded"),
            "unavailable" => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
            "internal" => (StatusCode::FAILED_DEPENDENCY, "Backend"),
            _ => (self.status, "Validation"),
        };
        TeiError(Self { status, ..self }, error_type)
    }
}

/// An error on a TEI route, in TEI's shape `{"error": "...", "error_type": "Validation"}`.
pub struct TeiError(ApiError, &'static str);

impl IntoResponse for TeiError {
    fn into_response(self) -> Response {
        let TeiError(e, error_type) = self;
        let mut r = e.headers((e.status, Json(json!({"error": e.message, "error_type": error_type}))).into_response());
        r.extensions_mut().insert(ErrorKind(e.kind));
        r
    }
}

impl ApiError {
    /// `Retry-After` and `WWW-Authenticate` where the error calls for them.
    fn headers(&self, mut r: Response) -> Response {
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"message": self.message, "type": self.kind}}));
        let mut r = self.headers((self.status, body).into_response());
        r.extensions_mut().insert(ErrorKind(self.kind));
        r
    }
}

impl From<CaptureError> for ApiError {
    fn from(e: CaptureError) -> Self {
        match e {
            CaptureError::Invalid(m) => ApiError::bad_request(m),
            CaptureError::Unknown(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
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

/// Which `Host` names a listener answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HostGuard {
    /// A loopback TCP listener: localhost, loopback addresses and `serve.allowed_hosts` only.
    Loopback,
    /// A Unix socket (0600) or an address that needs the API key: any.
    Any,
}

pub fn router(app: Arc<App>, hosts: HostGuard) -> Router {
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
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state((app.clone(), hosts), guard))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        // Bodies are read by `read_json` under the limit in force (it changes on SIGHUP).
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

/// Counts every request by endpoint and status, its errors by type, and its latency, and holds
/// its place in `in_flight` while it runs.
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    struct InFlight(Arc<AtomicUsize>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    app.in_flight.fetch_add(1, Ordering::AcqRel);
    let _in_flight = InFlight(app.in_flight.clone());
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

/// Whether `host` (a `Host` header: name or address, maybe with a port) is a loopback name, a
/// loopback address, or one of `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    // `[::1]:8181`, `127.0.0.1:8181`, `localhost:8181`, `box.lan`.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host.as_str(), |(n, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) { n } else { host.as_str() }
        }),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || allowed.iter().any(|a| *a == name || *a == host)
}

/// The checks before any route: the `Origin` of a browser page must be configured (CORS answers
/// follow for those that are), a loopback listener answers only loopback `Host` names, and a
/// POST body must be declared JSON.
async fn guard(State((app, hosts)): State<(Arc<App>, HostGuard)>, req: Request, next: Next) -> Response {
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", m).into_response();
    let origin = req.headers().get(header::ORIGIN).map(|o| String::from_utf8_lossy(o.as_bytes()).to_ascii_lowercase());
    // (The settings' lists are read in place: nothing is cloned per request.)
    let (origin_ok, host_ok) = {
        let s = app.settings.read().unwrap_or_else(|e| e.into_inner());
        let origin_ok = origin.as_ref().is_none_or(|o| s.allowed_origins.iter().any(|a| a == o));
        let host_ok = hosts == HostGuard::Any
            || req
                .headers()
                .get(header::HOST)
                .is_none_or(|h| host_allowed(&String::from_utf8_lossy(h.as_bytes()), &s.allowed_hosts));
        (origin_ok, host_ok)
    };
    if !origin_ok {
        let shown: String = origin.as_deref().unwrap_or_default().chars().take(100).collect();
        return forbidden(format!(
            "requests from the web page origin `{shown}` are refused; add it to serve.allowed_origins to allow it"
        ));
    }
    if !host_ok && let Some(h) = req.headers().get(header::HOST) {
        let shown: String = String::from_utf8_lossy(h.as_bytes()).chars().take(100).collect();
        return forbidden(format!(
            "this server listens on loopback and does not answer for host `{shown}`; add it to serve.allowed_hosts \
             to allow it"
        ));
    }
    // A configured origin's CORS preflight.
    if req.method() == axum::http::Method::OPTIONS
        && let Some(o) = &origin
    {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_str(o).unwrap_or(HeaderValue::from_static("null")),
        );
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return r;
    }
    if req.method() == axum::http::Method::POST {
        let ct = req.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).to_string());
        let media = ct.as_deref().map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
        if media.as_deref() != Some("application/json") {
            let shown: String = ct.unwrap_or_else(|| "none".into()).chars().take(100).collect();
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body must be sent with `Content-Type: application/json` (this request says {shown})"),
            )
            .into_response();
        }
    }
    let mut resp = next.run(req).await;
    if let Some(o) = origin
        && let Ok(v) = HeaderValue::from_str(&o)
    {
        resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

/// `Authorization: Bearer <key>` (the scheme in any case), compared in constant time, when a key
/// is configured.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let key = app.api_key.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(key) = key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| {
                let v = v.as_bytes();
                let space = v.iter().position(|&b| b == b' ')?;
                v[..space].eq_ignore_ascii_case(b"bearer").then(|| v[space..].trim_ascii())
            })
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

/// A request body's place in [`App::bodies`], held until its answer.
pub struct BodyPermit(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

/// The body, up to `limit` bytes kept, parsed as JSON; a body still arriving after
/// [`BODY_TIMEOUT`] is a 408, so a client that stalls holds nothing for long.
async fn read_json<T: DeserializeOwned>(app: &App, body: Body, limit: usize) -> Result<(T, BodyPermit), ApiError> {
    let (kept, permit) = tokio::time::timeout(BODY_TIMEOUT, read_body(app, body, limit)).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )
    })??;
    let v = serde_json::from_slice(&kept).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    Ok((v, permit))
}

async fn read_body(app: &App, mut body: Body, limit: usize) -> Result<(Vec<u8>, BodyPermit), ApiError> {
    use http_body_util::BodyExt;
    let (mut kept, mut seen) = (Vec::new(), 0usize);
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= limit {
            // KiB permits for what is kept so far (rounded up), taken as the bytes arrive.
            let need = kept.len().saturating_add(data.len()).div_ceil(1024);
            let have = permit.as_ref().map_or(0, |p| p.num_permits());
            if need > have {
                let more = app
                    .bodies
                    .clone()
                    .acquire_many_owned((need - have) as u32)
                    .await
                    .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
                match &mut permit {
                    Some(p) => p.merge(more),
                    None => permit = Some(more),
                }
            }
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
    Ok((kept, BodyPermit(permit)))
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
    /// How many of the ranked documents the response returns (`top_n`): only those were shown.
    returned: usize,
}

struct Ranked {
    scorer: Arc<Scorer>,
    scores: Vec<PairLogits>,
    tokens: usize,
    /// The response id, which is also the captured event's id.
    id: String,
    /// What became of capturing this ranking (None: not captured).
    capture: Option<Result<(), String>>,
}

impl Ranked {
    /// Indices by score, best first (ties in input order).
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.scores.len()).collect();
        order.sort_by(|&a, &b| self.scores[b].score.total_cmp(&self.scores[a].score));
        order
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        put("x-rerankd-adapter", self.scorer.adapter());
        put("x-rerankd-event-id", &self.id);
        match &self.capture {
            Some(Ok(())) => put("x-rerankd-capture", "recorded"),
            Some(Err(_)) => put("x-rerankd-capture", "failed"),
            None => {}
        }
        h
    }

    fn meta(&self) -> Value {
        let mut m = json!({"corpus": self.scorer.corpus, "adapter": self.scorer.adapter(),
               "base_model": self.scorer.base.spec, "max_length": self.scorer.max_length});
        match &self.capture {
            Some(Ok(())) => m["capture"] = json!({"status": "recorded"}),
            Some(Err(e)) => m["capture"] = json!({"status": "failed", "error": e}),
            None => {}
        }
        m
    }
}

/// Validates, admits, tokenizes and scores one request.
async fn rank(app: &Arc<App>, ask: Ask) -> Result<Ranked, ApiError> {
    if app.draining.load(Ordering::Acquire) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let n = ask.docs.len();
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty",
            format!("`{}` is empty: give at least one document", ask.field),
        ));
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
    let admission = app.batcher.admit(n).map_err(|full| {
        if n > full.max {
            return ApiError::too_large(format!(
                "{n} documents can never fit the scoring queue of {} pairs (serve.max_queue_pairs)",
                full.max
            ));
        }
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "the scoring queue is full ({} of {} pairs, serve.max_queue_pairs); retry shortly",
                    full.admitted, full.max
                ),
            )
        }
    })?;
    let models = app.models.clone();
    let model = ask.model.clone();
    let scorer = tokio::task::spawn_blocking(move || models.resolve(&model))
        .await
        .map_err(|e| ApiError::internal(format!("loading the model: {e}")))??;
    let s = scorer.clone();
    // Tokenizing runs on at most one blocking thread per core: what a flood of requests can make
    // serve hold at once is their bodies, not their tokenizations.
    let _tokenizing =
        app.tokenizing.acquire().await.map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    let (seqs, ask) = tokio::task::spawn_blocking(move || tokenize(&s, &ask).map(|seqs| (seqs, ask)))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))??;
    drop(_tokenizing);
    let tokens = seqs.iter().map(Vec::len).sum();
    let (reply, rx) = oneshot::channel();
    app.batcher.submit(Work { scorer: scorer.clone(), seqs, reply, admission });
    let scores = rx
        .await
        .map_err(|_| ApiError::internal("the scoring thread dropped the request"))?
        .map_err(|e| ApiError::internal(format!("scoring failed: {e}")))?;
    let mut r = Ranked { scorer, scores, tokens, id: response_id(), capture: None };
    if let Some(corpus) = r.scorer.corpus.clone() {
        // The ranking is answered whatever becomes of its capture: a capture problem is reported
        // in the response, counted and logged, never turned into an error.
        let (capture, id, adapter, mut shown) =
            (app.capture.clone(), r.id.clone(), r.scorer.adapter().to_string(), r.order());
        shown.truncate(ask.returned);
        let prompt = r.scorer.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Option<Result<(), String>> {
            if !capture.enabled(&corpus) {
                return None;
            }
            // Recorded as scored: each text cut where nothing past it could have been read.
            let p = &prompt.base.reranker.prompt;
            let docs: Vec<(String, &str)> = ask
                .docs
                .iter()
                .zip(&ask.ids)
                .map(|(text, id)| {
                    let text = p.cap(text, prompt.max_length);
                    (id.clone().unwrap_or_else(|| content_id(text)), text)
                })
                .collect();
            let query = p.cap(&ask.query, prompt.max_length);
            Some(capture.record(&corpus, &id, query, &docs, &shown, &adapter).map_err(|e| e.to_string()))
        })
        .await
        .unwrap_or_else(|e| Some(Err(format!("the capture task failed: {e}"))));
        if let Some(Err(e)) = &outcome {
            app.telemetry.capture_failures.inc();
            tracing::warn!(event = %r.id, "capture failed; the ranking was answered: {e}");
        }
        r.capture = outcome;
    }
    Ok(r)
}

/// The prompts of one request, built and truncated exactly as `rerankd score` builds them.
fn tokenize(s: &Scorer, ask: &Ask) -> Result<Vec<Vec<u32>>, ApiError> {
    let p = &s.base.reranker.prompt;
    let fail = |e: crate::model::ModelError| {
        ApiError::new(StatusCode::BAD_REQUEST, "tokenizer", format!("cannot tokenize: {e}"))
    };
    ask.docs
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            let doc = match ask.max_tokens_per_doc {
                Some(k) => p.truncate_tokens(doc, k).map_err(fail)?,
                None => doc.clone(),
            };
            if ask.refuse_long {
                let len = p.prompt_len(&s.instruction, &ask.query, &doc, s.max_length).map_err(fail)?;
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

async fn tei(State(app): State<Arc<App>>, body: Body) -> Result<Response, TeiError> {
    let model = default_model(&app);
    tei_for(app, model, body).await.map_err(ApiError::tei)
}

async fn tei_corpus(State(app): State<Arc<App>>, Path(corpus): Path<String>, body: Body) -> Result<Response, TeiError> {
    tei_for(app, corpus, body).await.map_err(ApiError::tei)
}

async fn tei_for(app: Arc<App>, model: String, body: Body) -> Result<Response, ApiError> {
    let (req, _body): (TeiRequest, _) = read_json(&app, body, app.settings().max_body_bytes).await?;
    let ask = Ask {
        model,
        query: req.query,
        ids: vec![None; req.texts.len()],
        docs: req.texts,
        field: "texts",
        refuse_long: req.truncate == Some(false),
        max_tokens_per_doc: None,
        returned: usize::MAX,
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
    let (req, _body): (CohereRequest, _) = read_json(&app, body, app.settings().max_body_bytes).await?;
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
        returned: req.top_n.unwrap_or(usize::MAX),
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
    let (req, _body): (FeedbackRequest, _) = read_json(&app, body, MAX_FEEDBACK_BODY).await?;
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
    let (capture, mut snapshot) = (app.capture.clone(), app.models.snapshot());
    // Only what a request would be answered with (a corpus removed since it was loaded is a 404).
    snapshot.retain(|(c, _, _)| app.models.is_servable(c));
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
                match capture.online_if_ready(&corpus) {
                    Ok(Some(m)) if !m.is_empty() => o["online"] = json!(m),
                    Ok(Some(_)) => {}
                    // The capture index is still reading a large feedback file (at start).
                    Ok(None) => o["online_pending"] = true.into(),
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
