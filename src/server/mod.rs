//! The client-facing listener: TCP accept loop, optional rustls termination (ALPN h2 and
//! http/1.1), HTTP/1.1 and HTTP/2 (also h2c with prior knowledge) on one port, and graceful
//! shutdown that stops accepting and lets in-flight exchanges finish within a deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::proxy::{ConnInfo, Proxy};

/// Most bytes of an answer buffered per HTTP/2 stream ahead of the socket.
const H2_STREAM_SEND_BUFFER: usize = 64 << 10;

/// Time a client gets to finish a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client may take: connections, time, header and body sizes, streams; and which
/// peers may speak for others in `X-Forwarded-*`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections, all workers together; more are closed at once and counted.
    pub max_connections: usize,
    /// Time to send a request head; also the longest a connection may sit idle: an HTTP/1.1
    /// keep-alive before its next request, an HTTP/2 connection with no stream open
    /// (slow-loris guard).
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2); more gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request; more gets 431.
    pub max_headers: usize,
    /// Longest request target (path and query); more gets 414.
    pub max_uri_bytes: usize,
    /// Largest request body when the route sets none; more gets 413. `None`: no limit (bodies
    /// stream, so size costs no memory).
    pub max_request_body: Option<u64>,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// Longest a client may leave an answer's next bytes unread (HTTP/1.1: its socket full;
    /// HTTP/2: its flow-control window shut) before its connection is closed, as nginx's
    /// `send_timeout`; otherwise a client that never reads holds the exchange's upstream
    /// connection for ever. Zero: no limit.
    pub send_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are kept and extended rather than replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            max_uri_bytes: 8 << 10,
            max_request_body: None,
            h2_max_streams: 100,
            send_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Limits {
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address as routing sees it: the peer, or behind trusted proxies the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_ip(&self, conn: &ConnInfo, headers: &http::HeaderMap) -> std::net::IpAddr {
        let peer = conn.peer.ip().to_canonical();
        if !conn.trusted {
            return peer;
        }
        let chain = headers
            .get_all(crate::proxy::headers::X_FORWARDED_FOR.clone())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        let mut client = peer;
        for hop in chain.iter().rev() {
            match hop.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    client = ip.to_canonical();
                    if !self.trusts(client) {
                        break;
                    }
                }
                // An entry that is not an address ends what can be believed.
                Err(_) => break,
            }
        }
        client
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read certificate {path}: {source}")]
    Cert {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot read private key {path}: {source}")]
    Key {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {0} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)")]
    NoCertificate(String),
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The listener's certificate and key, read again when their files change: certificates are
/// rotated (cert-manager, ACME) while the process runs, and a proxy that kept the one it
/// started with would serve it past its expiry. A pair that fails to load (a half-written
/// file, a key that does not match the certificate) leaves the pair in force.
#[derive(Debug)]
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// What the files looked like when `current` was read from them.
    stamp: Mutex<Option<[FileStamp; 2]>>,
}

/// Identity, length and modification time of a file, following symlinks: a Kubernetes secret
/// mount swaps a symlink to a new directory, an editor renames a new file over the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

impl ServerCert {
    /// Reads the pair; fails if either file is unreadable, or the key does not match.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamp = Self::stamps(cert, key);
        let current = read_pair(cert, key, &provider)?;
        Ok(ServerCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(current),
            stamp: Mutex::new(stamp),
        })
    }

    fn stamps(cert: &Path, key: &Path) -> Option<[FileStamp; 2]> {
        Some([FileStamp::of(cert)?, FileStamp::of(key)?])
    }

    /// Reads the pair again and puts it in force for new handshakes. On error the pair in
    /// force stays.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let stamp = Self::stamps(&self.cert, &self.key);
        let pair = read_pair(&self.cert, &self.key, &self.provider);
        // Stamped even when it fails: a broken pair is reported once, not at every check,
        // and read again when either file changes.
        *self.stamp.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        self.current.store(Arc::new(pair?));
        Ok(())
    }

    /// Reloads if either file changed since it was last read. `None` if nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsConfigError>> {
        let now = Self::stamps(&self.cert, &self.key);
        let changed = *self.stamp.lock().unwrap_or_else(PoisonError::into_inner) != now;
        changed.then(|| self.reload())
    }

    /// Reloads (when `force`, or when the files changed), logs and counts the outcome.
    pub fn refresh(&self, force: bool) {
        let outcome = if force {
            Some(self.reload())
        } else {
            self.reload_if_changed()
        };
        match outcome {
            None => {}
            Some(Ok(())) => {
                info!(cert = %self.cert.display(), "TLS certificate reloaded");
                metrics::counter!(crate::telemetry::TLS_CERT_RELOADS_TOTAL, "result" => "ok")
                    .increment(1);
            }
            Some(Err(e)) => {
                error!(error = %e, "TLS certificate not reloaded; the one in force stays");
                metrics::counter!(crate::telemetry::TLS_CERT_RELOADS_TOTAL, "result" => "error")
                    .increment(1);
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|source| TlsConfigError::Cert {
            path: cert.display().to_string(),
            source,
        })?;
    // Without this, rustls reports an empty chain as "peer sent no certificates", naming
    // neither the file nor the mistake (a key or a DER file given as the certificate).
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsConfigError::Key {
        path: key.display().to_string(),
        source,
    })?;
    // Checks that the key is the certificate's: during a rotation the two files may be
    // caught one old and one new.
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

/// Builds the listener's TLS acceptor from PEM files, with the certificate handle that
/// reloads them.
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
) -> Result<(TlsAcceptor, Arc<ServerCert>), TlsConfigError> {
    let certs = Arc::new(ServerCert::load(cert, key)?);
    let mut config = rustls::ServerConfig::builder_with_provider(certs.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), certs))
}

/// Accepts connections until `shutdown` turns true, then drains in-flight exchanges for at
/// most `drain` before returning.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    connections: Arc<tokio::sync::Semaphore>,
) {
    let limits = proxy.limits().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buf_size(H2_STREAM_SEND_BUFFER)
        // Dead peers are found by PING and their connection closed.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    // Every connection task holds a receiver: `true` asks it to shut down gracefully, and the
    // drain below ends when the last receiver is gone.
    let (drain_tx, drain_rx) = watch::channel(false);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // At the connection limit, close at once: a refused connection costs the client one
        // round trip, a queued one costs it a timeout and us a file descriptor.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            ::metrics::counter!(crate::telemetry::REQUESTS_REJECTED_TOTAL, "reason" => "max_connections")
                .increment(1);
            debug!(%peer, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
        let conn = ConnInfo {
            peer,
            tls: tls.is_some(),
            trusted: limits.trusts(peer.ip()),
        };
        let proxy = proxy.clone();
        let builder = builder.clone();
        let drain = drain_rx.clone();
        let slot = ConnectionSlot {
            _permit: Arc::new(permit),
        };
        let head_timeout = limits.header_read_timeout;
        match tls.clone() {
            None => {
                tokio::spawn(async move {
                    let stream = FirstBytesDeadline::new(stream, head_timeout);
                    serve_connection(stream, conn, proxy, builder, drain, slot).await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            let stream = FirstBytesDeadline::new(stream, head_timeout);
                            serve_connection(stream, conn, proxy, builder, drain, slot).await;
                        }
                        Ok(Err(e)) => debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    info!(deadline = ?drain, "draining in-flight requests");
    let deadline = tokio::time::Instant::now() + drain;
    drop(drain_rx);
    drain_tx.send_replace(true);
    if tokio::time::timeout_at(deadline, drain_tx.closed())
        .await
        .is_err()
    {
        warn!("shutdown deadline reached with requests still in flight");
    }
    // Shadows of finished exchanges run in tasks of this worker's runtime: let them end
    // (compare, record) before the runtime, and they with it, is dropped.
    if tokio::time::timeout_at(deadline, proxy.shadow().drained())
        .await
        .is_err()
    {
        warn!("shutdown deadline reached with shadows still in flight");
    }
}

/// Resolves once shutdown is requested (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_connection<S>(
    stream: S,
    conn: ConnInfo,
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut drain: watch::Receiver<bool>,
    slot: ConnectionSlot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_limit = proxy.limits().header_read_timeout;
    let send_limit = proxy.limits().send_timeout;
    let streams = u64::from(proxy.limits().h2_max_streams);
    let activity = Arc::new(Activity::new((2 * streams).max(RESET_FLOOD_FLOOR)));
    let tracker = activity.clone();
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        // Taken before the exchange starts, given back when its answer's body is done (or
        // dropped): the connection is idle only with no exchange open.
        let busy = Busy::new(&tracker);
        // A request asking to switch protocols carries the connection's slot, so that the
        // tunnel keeps it for as long as it lives. Others go without: extensions cost an
        // allocation on every request.
        if crate::proxy::headers::is_upgrade_request(&req) {
            req.extensions_mut().insert(slot.clone());
        }
        async move {
            let resp = proxy.handle(req, conn).await;
            let busy = busy.answered();
            Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked::new(inner, busy)))
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    // hyper bounds an idle HTTP/1.1 keep-alive with its header read timeout, but has no idle
    // limit for HTTP/2: a client answering PINGs would keep a connection without streams,
    // and its `--max-connections` slot, for ever. This one covers both (for HTTP/1.1 it
    // agrees with hyper's), and ends the connection as a shutdown does: GOAWAY, then close.
    let idle = activity.idle_for(idle_limit);
    let mut idle = std::pin::pin!(idle);
    let unread = activity.unread_for(send_limit);
    let mut unread = std::pin::pin!(unread);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = &mut idle => {
                if closing {
                    // A graceful HTTP/2 GOAWAY waits for the client to answer a PING before
                    // it closes; a client that never answers kept the connection open.
                    debug!(peer = %conn.peer, "still idle after GOAWAY; dropping the connection");
                    return;
                }
                debug!(peer = %conn.peer, limit = ?idle_limit, "idle connection; closing");
                connection.as_mut().graceful_shutdown();
                closing = true;
                idle.set(activity.idle_for(idle_limit));
            }
            () = &mut unread => {
                // Not a GOAWAY either: the stream left unread would keep a graceful close
                // waiting as long as the client likes. Dropping the connection drops the
                // answers' upstream bodies, and with them their upstream connections.
                ::metrics::counter!(crate::telemetry::REQUESTS_REJECTED_TOTAL, "reason" => "client_send_timeout")
                    .increment(1);
                debug!(peer = %conn.peer, limit = ?send_limit, "client left its answer unread; closing the connection");
                return;
            }
            () = activity.flood.notified() => {
                // Not a GOAWAY: a graceful one lets a client that never answers its PING go
                // on opening streams.
                ::metrics::counter!(crate::telemetry::REQUESTS_REJECTED_TOTAL, "reason" => "reset_flood")
                    .increment(1);
                warn!(peer = %conn.peer, "client cancels most of its requests (HTTP/2 rapid reset?); closing the connection");
                return;
            }
            _ = drain.wait_for(|stop| *stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                idle.set(activity.idle_for(idle_limit));
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, peer = %conn.peer, "connection closed with error");
    }
}

/// Fewest requests a client must cancel before they are answered for its connection to be
/// closed as a reset flood (twice `--h2-max-streams` when that is more).
const RESET_FLOOD_FLOOR: u64 = 200;

/// How many exchanges a connection has open, and when the last one ended; how many it
/// started and how many of those the client cancelled before they were answered.
struct Activity {
    born: tokio::time::Instant,
    open: AtomicUsize,
    /// Milliseconds after `born` at which an exchange last ended.
    last_end_ms: AtomicU64,
    started: AtomicU64,
    cancelled: AtomicU64,
    /// Cancelled exchanges from which on, if they are half of all or more, the connection
    /// is a reset flood.
    flood_floor: u64,
    /// Signalled when it is one.
    flood: tokio::sync::Notify,
    /// Answer bodies that hyper has been given (the head, or a frame) and has not yet asked
    /// for more, by the parity of the check period in which they were given it.
    unread: [AtomicUsize; 2],
    /// Check periods of [`Activity::unread_for`] begun.
    period: AtomicUsize,
}

impl Activity {
    fn new(flood_floor: u64) -> Self {
        Activity {
            born: tokio::time::Instant::now(),
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            started: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            flood_floor,
            flood: tokio::sync::Notify::new(),
            unread: [AtomicUsize::new(0), AtomicUsize::new(0)],
            period: AtomicUsize::new(0),
        }
    }

    /// Marks an answer body as waiting for hyper to ask for its next frame; returns the mark
    /// to give back when it does.
    fn wait_unread(&self) -> usize {
        let mark = self.period.load(Ordering::Acquire) & 1;
        self.unread[mark].fetch_add(1, Ordering::AcqRel);
        mark
    }

    fn read(&self, mark: usize) {
        self.unread[mark].fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves once an answer body has waited at least `limit` (and at most twice that) for
    /// hyper to ask for its next frame. hyper asks as soon as it has sent the last one, unless
    /// the client does not read: an HTTP/1.1 client's socket is full, or an HTTP/2 client
    /// gives the stream no window. A body waiting on its upstream is asked already, so a slow
    /// upstream never counts here. Never resolves for a zero `limit`.
    async fn unread_for(&self, limit: Duration) {
        if limit.is_zero() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(limit).await;
            let period = self.period.load(Ordering::Acquire);
            // Marks of the period before the current one: given at least `limit` ago. Checked
            // before the new period begins, so none of its own marks land there first.
            if self.unread[(period + 1) & 1].load(Ordering::Acquire) > 0 {
                return;
            }
            self.period.store(period.wrapping_add(1), Ordering::Release);
        }
    }

    /// Resolves once the connection has had no exchange open for `limit`, counting from now
    /// at the earliest.
    async fn idle_for(&self, limit: Duration) {
        let mut check = tokio::time::Instant::now() + limit;
        loop {
            tokio::time::sleep_until(check).await;
            let now = tokio::time::Instant::now();
            if self.open.load(Ordering::Acquire) > 0 {
                check = now + limit;
                continue;
            }
            let last_end = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
            let end = self.born + last_end + limit;
            if end <= now {
                return;
            }
            check = end;
        }
    }
}

/// One open exchange of a connection's [`Activity`].
struct Busy {
    activity: Arc<Activity>,
    answered: bool,
}

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.started.fetch_add(1, Ordering::Relaxed);
        Busy {
            activity: activity.clone(),
            answered: false,
        }
    }

    /// The exchange has its answer; dropped before this, the client cancelled it.
    fn answered(mut self) -> Self {
        self.answered = true;
        self
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.activity;
        // HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and resets them at
        // once stays under the concurrent stream limit, yet each stream still starts an
        // upstream request, which the upstream goes on serving after ficus gives it up.
        // h2 catches the resets that arrive before hyper accepts the stream; these are the
        // ones after. A client that cancels at least half of many requests is closed.
        if !self.answered {
            let cancelled = a.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
            if cancelled >= a.flood_floor
                && cancelled.saturating_mul(2) >= a.started.load(Ordering::Relaxed)
            {
                a.flood.notify_one();
            }
        }
        // The end time is stored before the count drops, so that whoever sees no exchange
        // open also sees when the last one ended.
        let ms = u64::try_from(a.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its exchange counted as open until it is done or dropped, and
/// marked as unread from the moment it is handed to hyper (with its head) or has handed hyper
/// a frame, until hyper asks for the next one.
struct Tracked<B> {
    inner: B,
    busy: Busy,
    unread: Option<usize>,
}

impl<B: hyper::body::Body> Tracked<B> {
    fn new(inner: B, busy: Busy) -> Self {
        // An empty body is never asked for (hyper ends the answer with its head).
        let unread = (!inner.is_end_stream()).then(|| busy.activity.wait_unread());
        Tracked {
            inner,
            busy,
            unread,
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if let Some(mark) = self.unread.take() {
            self.busy.activity.read(mark);
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(mark) = this.unread.take() {
            this.busy.activity.read(mark);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled
            && !this.inner.is_end_stream()
        {
            this.unread = Some(this.busy.activity.wait_unread());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's place under `--max-connections`. The connection task holds it, and
/// so does an upgraded (tunnelled) connection, which outlives the HTTP connection it came from.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// The HTTP/2 connection preface; hyper-util's auto builder reads up to this many bytes to
/// choose the protocol.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Fails reads with `TimedOut` when the client has not sent enough to choose the protocol
/// within the header read timeout. hyper's `header_read_timeout` only runs once the HTTP/1
/// connection exists; before that, while hyper-util reads the first bytes to tell HTTP/1 from
/// HTTP/2, nothing bounds the wait, and a client that sends nothing would hold its
/// connection (and its `--max-connections` permit) forever. The deadline is disarmed as soon
/// as the bytes read leave the HTTP/2 preface (HTTP/1: hyper's own timeout takes over) or
/// complete it (HTTP/2).
struct FirstBytesDeadline<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    seen: usize,
}

impl<S> FirstBytesDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            seen: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytesDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let n = new.len().min(H2_PREFACE.len() - this.seen);
                let still_preface = H2_PREFACE[this.seen..this.seen + n] == new[..n];
                this.seen += n;
                if new.is_empty() || !still_preface || this.seen == H2_PREFACE.len() {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request head within the header read timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytesDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Binds `n` listeners to one address with `SO_REUSEPORT`, one per worker thread, so that the
/// kernel spreads connections over the workers. Must run inside a Tokio runtime; the
/// listeners come back as std listeners, to be adopted by each worker's runtime.
pub fn bind_workers(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let named = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} (proxy): {e}"))
    };
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(named)?;
        socket.set_reuseaddr(true).map_err(named)?;
        socket.set_reuseport(true).map_err(named)?;
        socket.bind(addr).map_err(named)?;
        let listener = socket.listen(1024).map_err(named)?;
        // Port 0 picks a port once; the other workers join it.
        addr = listener.local_addr()?;
        out.push(listener.into_std()?);
    }
    Ok(out)
}

/// Binds a TCP listener with a clear error naming the address.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(peer: &str, trusted: bool) -> ConnInfo {
        ConnInfo {
            peer: SocketAddr::new(peer.parse().unwrap_or([0, 0, 0, 0].into()), 1234),
            tls: false,
            trusted,
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let limits = Limits {
            trusted_proxies: vec![
                "10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
                "192.168.1.7/32".parse().unwrap_or_else(|_| unreachable!()),
            ],
            ..Limits::default()
        };
        let xff = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                "x-forwarded-for",
                http::HeaderValue::from_str(v).unwrap_or_else(|_| unreachable!()),
            );
            h
        };
        let ip = |s: &str| {
            s.parse::<std::net::IpAddr>()
                .unwrap_or_else(|_| unreachable!())
        };
        let lb = conn("10.1.1.1", limits.trusts(ip("10.1.1.1")));
        assert!(lb.trusted);
        // A forged entry left of the real client is ignored.
        assert_eq!(
            limits.client_ip(&lb, &xff("6.6.6.6, 203.0.113.9, 192.168.1.7")),
            ip("203.0.113.9")
        );
        assert_eq!(
            limits.client_ip(&lb, &xff("203.0.113.9")),
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the last address believed.
        assert_eq!(
            limits.client_ip(&lb, &xff("203.0.113.9, nonsense")),
            ip("10.1.1.1")
        );
        assert_eq!(
            limits.client_ip(&lb, &http::HeaderMap::new()),
            ip("10.1.1.1")
        );
        // An untrusted peer's header is never read.
        let direct = conn("198.51.100.4", false);
        assert_eq!(
            limits.client_ip(&direct, &xff("203.0.113.9")),
            ip("198.51.100.4")
        );
    }
}
