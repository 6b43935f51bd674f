//! `rerankd serve`: the promoted rerankers as a resident HTTP service, a process of its own (a
//! crash or memory kill of serve or of the training daemon never takes the other down).
//!
//! - [`models`]: base models loaded once, one scorer per corpus, hot reload on promotion.
//! - [`batcher`]: the bounded queue and the one scoring thread that batches across requests.
//! - [`capture`]: served rankings and signals into the corpus's feedback files.
//! - [`api`]: the HTTP endpoints (TEI, Cohere/Jina/Infinity, health, models, metrics).
//! - [`telemetry`]: the Prometheus counters.
//!
//! Threads: tokio (two workers) answers HTTP and never scores; tokenizing and model loads run on
//! its blocking pool; the scoring thread runs the forwards on all cores; a watcher thread looks at
//! `models/<corpus>/current` once a second (a readlink per corpus) and swaps what changed.

pub mod api;
pub mod batcher;
pub mod capture;
pub mod listen;
pub mod models;
pub mod telemetry;

use crate::ids::CorpusName;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;

use crate::config::{DaemonConfig, ServeConfig};
use crate::store::serving::ServeInfo;
use crate::store::time::now_rfc3339;
use crate::store::{FileLock, Root};
use api::App;
use batcher::{Batcher, Limits};
use models::Models;
use telemetry::{ReloadLabels, Telemetry};

/// Where serve listens when told nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8181";
/// How often `current` is looked at: a promotion is served within this plus a load.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often serve.json's resident size is refreshed when nothing else changes.
const INFO_EVERY: Duration = Duration::from_secs(30);
/// How long SIGTERM waits for in-flight requests before exiting anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Options {
    pub listen: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub api_key_file: Option<PathBuf>,
    pub corpora: Vec<CorpusName>,
    pub default_corpus: Option<CorpusName>,
    pub model: String,
    pub device: Device,
    /// Capture every corpus's rankings (else only those whose policy.json says `capture`).
    pub capture: bool,
}

/// A refused start: a setting that cannot be honoured (named, with what to do).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn limits(c: &ServeConfig) -> Limits {
    Limits { max_queue_pairs: c.max_queue_pairs, batch_size: c.batch_size, batch_tokens: c.batch_tokens }
}

/// The bearer token in `path`: its text, trimmed; an empty or unreadable file is an error.
fn read_api_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
    let key = text.trim();
    anyhow::ensure!(!key.is_empty(), "the API key file {} is empty", path.display());
    Ok(key.as_bytes().to_vec())
}

/// The addresses to bind, after the loopback rule: a non-loopback address only with a key.
fn check_listen(o: &Options) -> Result<Option<SocketAddr>, Refused> {
    let listen = match (o.listen, &o.socket) {
        (Some(a), _) => Some(a),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_LISTEN.parse().expect("a valid address")),
    };
    if let Some(a) = listen
        && !a.ip().is_loopback()
        && o.api_key_file.is_none()
    {
        return Err(Refused(format!(
            "refusing to listen on {a}, which is not a loopback address, without --api-key-file: \
             anyone who can reach it could use the models"
        )));
    }
    Ok(listen)
}

pub fn run(root: &Root, o: Options) -> anyhow::Result<()> {
    let listen = check_listen(&o)?;
    let api_key = o.api_key_file.as_deref().map(read_api_key).transpose()?;
    root.ensure()?;
    let Some(mut lock) = FileLock::try_acquire(&root.serve_lock())? else {
        return Err(crate::store::lock::Held::at("serve", &root.serve_lock()).into());
    };
    lock.write_pid()?;
    let cfg = DaemonConfig::load(&root.config())?.serve;
    // Bound before the models load: a taken address or socket path fails at once, and only a
    // socket this process bound is ever removed.
    let bound = listen::Bound::bind(listen, o.socket.as_deref())?;
    tracing::info!(root = %root.dir.display(), pid = std::process::id(), "serve starting");
    for hook in crate::testhooks::active() {
        tracing::warn!(variable = hook, "a test-only fault hook is set in serve's environment; unset it");
    }

    let only: BTreeSet<CorpusName> = o.corpora.iter().cloned().collect();
    let models = Arc::new(Models::new(root, o.device.clone(), o.model.clone(), only));
    for c in models.startup_corpora() {
        models.load_corpus(&c);
    }
    if let Some(c) = &o.default_corpus
        && models.snapshot().iter().all(|(name, _, _)| name != c)
    {
        models.load_corpus(c);
    }
    if let Err(e) = models.preload_base() {
        // Not fatal: corpora with a promoted adapter on another base still serve.
        tracing::warn!("the base model for `base` and new corpora is not loaded: {e}");
    }

    let telemetry = Arc::new(Telemetry::default());
    let conns = Arc::new(listen::Connections::new(cfg.max_connections, cfg.header_timeout, telemetry.clone()));
    let (batcher, scorer_thread) = Batcher::start(limits(&cfg), telemetry.clone());
    let cfg_bodies = cfg.max_body_bytes;
    let app = Arc::new(App {
        models: models.clone(),
        batcher: batcher.clone(),
        telemetry: telemetry.clone(),
        settings: RwLock::new(cfg),
        api_key: RwLock::new(api_key),
        default_corpus: o.default_corpus.clone(),
        capture: Arc::new(capture::Capture::new(root, o.capture)),
        draining: Default::default(),
        in_flight: conns.in_flight.clone(),
        tokenizing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
        bodies: Arc::new(tokio::sync::Semaphore::new((api::BODIES_IN_FLIGHT * cfg_bodies).div_ceil(1024))),
    });

    {
        let capture = app.capture.clone();
        std::thread::Builder::new().name("capture-index".into()).spawn(move || capture.warm())?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (result, socket) = rt.block_on(serve(root, &o, bound, app.clone(), conns));
    // Requests still held by a connection past the drain are not waited for.
    rt.shutdown_timeout(Duration::from_millis(100));
    batcher.stop();
    let _ = scorer_thread.join();
    let _ = std::fs::remove_file(root.serve_json());
    drop(socket);
    drop(lock);
    result
}

async fn serve(
    root: &Root,
    o: &Options,
    bound: listen::Bound,
    app: Arc<App>,
    conns: Arc<listen::Connections>,
) -> (anyhow::Result<()>, Option<listen::SocketFile>) {
    let mut socket = None;
    let r = serve_on(root, o, bound, app, conns, &mut socket).await;
    (r, socket)
}

async fn serve_on(
    root: &Root,
    o: &Options,
    bound: listen::Bound,
    app: Arc<App>,
    conns: Arc<listen::Connections>,
    socket: &mut Option<listen::SocketFile>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut info = ServeInfo { pid: std::process::id(), started_at: now_rfc3339(), ..Default::default() };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    if let Some((l, addr)) = bound.tcp {
        let l = tokio::net::TcpListener::from_std(l)?;
        info.listen = Some(format!("http://{addr}"));
        eprintln!("rerankd serve: listening on http://{addr}");
        let guard = if addr.ip().is_loopback() { api::HostGuard::Loopback } else { api::HostGuard::Any };
        servers.spawn(listen::accept_loop(l, api::router(app.clone(), guard), conns.clone(), stop_rx.clone()));
    }
    if let Some((l, file)) = bound.unix {
        let path = o.socket.as_deref().expect("a socket was bound");
        let l = tokio::net::UnixListener::from_std(l)?;
        *socket = Some(file);
        info.socket = Some(path.display().to_string());
        eprintln!("rerankd serve: listening on unix:{}", path.display());
        servers.spawn(listen::accept_loop(
            l,
            api::router(app.clone(), api::HostGuard::Any),
            conns.clone(),
            stop_rx.clone(),
        ));
    }

    describe(root, &app, &mut info);
    // The watcher thread: hot reload and serve.json.
    let (hup_tx, hup_rx) = mpsc::channel::<()>();
    let watcher = {
        let (root, app, info) = (root.clone(), app.clone(), info.clone());
        std::thread::Builder::new()
            .name("watch-models".into())
            .spawn(move || watch_models(&root, &app, info, &hup_rx))?
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                reload_settings(root, o, &app);
                let _ = hup_tx.send(());
            }
            Some(r) = servers.join_next() => {
                r.context("a listener task failed")?;
                anyhow::bail!("a listener stopped unexpectedly");
            }
        }
    }
    tracing::info!("SIGTERM: draining in-flight requests");
    app.draining.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    if !conns.drained(DRAIN_TIMEOUT).await {
        tracing::warn!("requests still open after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    drop(hup_tx);
    let _ = watcher.join();
    tracing::info!("serve stopped");
    Ok(())
}

/// SIGHUP: the `[serve]` limits and the API key file are read again; a bad config or key file
/// keeps the old ones (and says why).
fn reload_settings(root: &Root, o: &Options, app: &App) {
    match DaemonConfig::load(&root.config()) {
        Ok(c) => {
            app.batcher.set_limits(limits(&c.serve));
            *app.settings.write().unwrap_or_else(|e| e.into_inner()) = c.serve;
            tracing::info!("SIGHUP: settings re-read");
        }
        Err(e) => tracing::error!("SIGHUP: keeping the previous settings: {e}"),
    }
    if let Some(path) = &o.api_key_file {
        match read_api_key(path) {
            Ok(k) => *app.api_key.write().unwrap_or_else(|e| e.into_inner()) = Some(k),
            Err(e) => tracing::error!("SIGHUP: keeping the previous API key: {e:#}"),
        }
    }
}

/// Looks at every served corpus's `current` each second, swaps what changed, and keeps
/// serve.json current. Ends when the HUP channel closes (shutdown).
fn watch_models(root: &Root, app: &App, mut info: ServeInfo, hup: &mpsc::Receiver<()>) {
    let mut written = Instant::now();
    loop {
        let retry = match hup.recv_timeout(WATCH_EVERY) {
            Ok(()) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let reloads = app.models.refresh(retry);
        for r in &reloads {
            let result = if r.error.is_some() { "failed" } else { "ok" };
            app.telemetry
                .reloads
                .get_or_create(&ReloadLabels { corpus: r.corpus.to_string(), result: result.into() })
                .inc();
            match &r.error {
                None => tracing::info!(corpus = %r.corpus, from = r.from, to = r.to, "adapter reloaded"),
                Some(e) => tracing::error!(corpus = %r.corpus, from = r.from, to = r.to, "keeping {}: {e}", r.from),
            }
        }
        if !reloads.is_empty() || retry || written.elapsed() >= INFO_EVERY {
            describe(root, app, &mut info);
            written = Instant::now();
        }
    }
}

/// Writes serve.json: addresses, resident memory, and what each corpus is served with.
fn describe(root: &Root, app: &App, info: &mut ServeInfo) {
    info.adapters.clear();
    info.load_errors.clear();
    for (corpus, s, e) in app.models.snapshot() {
        if let Some(s) = s {
            info.adapters.insert(corpus.to_string(), s.adapter().to_string());
        }
        if let Some(e) = e {
            info.load_errors.insert(corpus.to_string(), e);
        }
    }
    info.rss_mb = crate::sys::process_memory_mb(std::process::id()).unwrap_or(0);
    info.updated_at = now_rfc3339();
    if let Err(e) = info.write(root) {
        tracing::warn!("writing serve.json: {e}");
    }
}
