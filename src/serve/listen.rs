//! Where serve listens and how it holds its client connections: binding (a TCP address, a Unix
//! socket that is removed on exit only if it is still the one this process bound), the connection
//! cap, the header-read timeout that closes idle and half-sent connections, and the stop that
//! lets requests in flight finish and drops connections that have none.
//!
//! Each connection is served by hyper's HTTP/1 server with axum's router as its service (what
//! `axum::serve` does, plus the limits it does not offer).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Semaphore, watch};

use super::telemetry::Telemetry;

/// File descriptors kept back from the connection cap for everything else serve opens (model
/// files, feedback files, the listeners, the runtime's own).
const FD_RESERVE: u64 = 128;

/// The answer to a connection over the cap, written once (if the socket takes it) before closing.
fn over_cap(cap: usize) -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": format!(
        "{cap} connections are open, the most this server holds (serve.max_connections); retry shortly"),
        "type": "overloaded"}})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A Unix socket file this process bound. Dropping it removes the file only if it is still that
/// socket (same device and inode): never a file someone else put there since, never another
/// server's live socket.
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The listeners, bound before anything else is loaded so that a taken address fails at once.
pub struct Bound {
    pub tcp: Option<(std::net::TcpListener, SocketAddr)>,
    pub unix: Option<(std::os::unix::net::UnixListener, SocketFile)>,
}

impl Bound {
    /// Binds `listen` and/or the socket at `socket`. On any error nothing bound stays behind, and
    /// no file that was at `socket` before is touched unless it was a stale socket (its server
    /// is gone: connecting is refused).
    pub fn bind(listen: Option<SocketAddr>, socket: Option<&Path>) -> anyhow::Result<Self> {
        let tcp = match listen {
            Some(addr) => {
                let l = tcp_listener(addr).with_context(|| format!("binding {addr}"))?;
                let bound = l.local_addr()?;
                Some((l, bound))
            }
            None => None,
        };
        let unix = socket.map(bind_socket).transpose()?;
        Ok(Self { tcp, unix })
    }
}

/// A TCP listener with a backlog of [`BACKLOG`] (std's is 128: a burst of connections would
/// wait for SYN retries before serve even saw them).
fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Connections the kernel may hold for serve before it accepts them.
const BACKLOG: i32 = 1024;

/// Binds the Unix socket at `path` with mode 0600, replacing a stale socket file left by a
/// dead server (never a live one, never another kind of file).
fn bind_socket(path: &Path) -> anyhow::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(m.file_type().is_socket(), "{} exists and is not a socket; not replacing it", path.display());
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{} is a live socket: another server listens there",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // (std's backlog for Unix sockets is 128 too; kept: one local user, not a public port.)
    let l = std::os::unix::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let m = std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SocketFile { path: path.to_path_buf(), id: (m.dev(), m.ino()) };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok((l, file))
}

/// The limits every connection is held to, shared by the listeners.
pub struct Connections {
    permits: Arc<Semaphore>,
    /// The cap in force: `serve.max_connections`, cut to the open-file limit less a reserve.
    pub cap: usize,
    pub header_timeout: Duration,
    /// Requests whose handler is running (set by the API's middleware).
    pub in_flight: Arc<AtomicUsize>,
    telemetry: Arc<Telemetry>,
}

impl Connections {
    /// Raises the open-file limit to its hard limit and sizes the cap under it.
    pub fn new(max_connections: usize, header_timeout: Duration, telemetry: Arc<Telemetry>) -> Self {
        let files = crate::sys::raise_open_files_limit();
        let cap = match files {
            Some(n) => max_connections.min(n.saturating_sub(FD_RESERVE).max(1) as usize),
            None => max_connections,
        };
        if cap < max_connections {
            tracing::warn!(
                "serve.max_connections is {max_connections} but the open-file limit is {}: holding at most {cap} \
                 connections (raise LimitNOFILE / ulimit -n)",
                files.unwrap_or_default()
            );
        }
        tracing::info!(cap, header_timeout_s = header_timeout.as_secs_f64(), "connection limits");
        Self { permits: Arc::new(Semaphore::new(cap)), cap, header_timeout, in_flight: Arc::default(), telemetry }
    }

    fn open(&self) -> usize {
        self.cap - self.permits.available_permits()
    }

    /// After `stop`: waits until every connection is closed, or no request has been in flight for
    /// a moment (what is left is idle or half-sent and is dropped), or `limit` passes. Whether
    /// everything in flight was answered.
    pub async fn drained(&self, limit: Duration) -> bool {
        let (start, mut quiet_since) = (Instant::now(), None::<Instant>);
        loop {
            if self.open() == 0 {
                return true;
            }
            if self.in_flight.load(Ordering::Acquire) == 0 {
                let q = *quiet_since.get_or_insert_with(Instant::now);
                if q.elapsed() >= Duration::from_millis(300) {
                    return true;
                }
            } else {
                quiet_since = None;
            }
            if start.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Accepts connections on `listener` until `stop` turns true, serving each with `router` under
/// the limits of `conns`. A connection over the cap is answered 503 and closed.
pub async fn accept_loop<L>(mut listener: L, router: Router, conns: Arc<Connections>, mut stop: watch::Receiver<bool>)
where
    L: axum::serve::Listener,
{
    loop {
        let (io, _addr) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            c = listener.accept() => c,
        };
        let Ok(permit) = conns.permits.clone().try_acquire_owned() else {
            conns.telemetry.connections_refused.inc();
            let answer = over_cap(conns.cap);
            tokio::spawn(async move {
                let mut io = io;
                let _ = tokio::time::timeout(Duration::from_millis(200), io.write_all(&answer)).await;
            });
            continue;
        };
        conns.telemetry.connections.set(conns.open() as i64);
        let (svc, conns, mut stop) = (TowerToHyperService::new(router.clone()), conns.clone(), stop.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(conns.header_timeout);
            let conn = http.serve_connection(TokioIo::new(JsonProtocolErrors::new(io)), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
            conns.telemetry.connections.set(conns.open() as i64);
        });
    }
}

/// Resolves when `stop` is (or turns) true, or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// A connection's stream that gives hyper's own answers to requests it cannot parse (400, 414,
/// 431: written before any route runs, with an empty body) a JSON body like every other error.
/// They are recognised by what only they are: a response head with `connection: close` and
/// `content-length: 0`, written as one buffer (writes are not vectored here, so hyper flattens).
struct JsonProtocolErrors<T> {
    io: T,
    /// Bytes of a rewritten answer still to be written (reported written to hyper already).
    pending: Vec<u8>,
}

impl<T> JsonProtocolErrors<T> {
    fn new(io: T) -> Self {
        Self { io, pending: Vec::new() }
    }
}

/// `head` with a JSON body naming its status, when it is one of hyper's bodiless error answers.
fn with_json_body(head: &[u8]) -> Option<Vec<u8>> {
    const MARK: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\n";
    if !head.starts_with(b"HTTP/1.1 4") || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let at = head.windows(MARK.len()).position(|w| w == MARK)?;
    let text = std::str::from_utf8(head).ok()?;
    let status = text.lines().next()?.strip_prefix("HTTP/1.1 ")?;
    let body = serde_json::json!({"error": {
        "message": format!("{status}: the request line or headers could not be read (malformed, or over the server's limits)"),
        "type": "bad_request"}})
    .to_string();
    let mut out = head[..at].to_vec();
    out.extend_from_slice(
        format!("\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", body.len())
            .as_bytes(),
    );
    out.extend_from_slice(&head[at + MARK.len()..]);
    out.extend_from_slice(body.as_bytes());
    Some(out)
}

impl<T: AsyncWrite + Unpin> JsonProtocolErrors<T> {
    /// Writes what is pending; Ready(Ok) once nothing is.
    fn drain(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(std::pin::Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonProtocolErrors<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonProtocolErrors<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(rewritten) = with_json_body(buf) {
            self.pending = rewritten;
            // The whole answer is taken; it goes out with the next write or flush.
            let _ = self.drain(cx)?;
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::with_json_body;

    #[test]
    fn only_hypers_bodiless_error_answers_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(with_json_body(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.contains("content-type: application/json") && h.contains("date: x"), "{out}");
        let len: usize = h.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().starts_with("431 Request Header Fields Too Large"));
        // Anything else passes unchanged: a response with a body, a 2xx, a partial head.
        for other in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"[..],
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
            &b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n"[..],
        ] {
            assert!(with_json_body(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }
}
