//! Upstreams: pooled keep-alive HTTP/1.1 clients (plain or rustls TLS) per connect timeout,
//! shared across rules reloads so that a reload never drops warm connections.
//!
//! Each worker thread has its own clients (and so its own connection pools): a request and the
//! upstream connection it uses are always driven by the same thread, with no cross-thread
//! wake-ups on the hot path.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::rules::{LEGACY_UPSTREAM, NEW_UPSTREAM, UpstreamDef};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type ficus sends and returns: upstream and client bodies stream through as is.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
pub type HttpClient = Client<Deadline<HttpsConnector<HttpConnector>>, Body>;

/// Settings for upstreams that the rules do not override.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub legacy: Uri,
    pub new: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
}

/// A live upstream: where to send requests and with which settings.
#[derive(Clone)]
pub struct Upstream {
    pub name: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
    pub timeout: Duration,
    pub preserve_host: bool,
    /// The `Host` header for this upstream (the authority without a default port), made
    /// once instead of on every request.
    pub host: HeaderValue,
    connect_timeout: Duration,
    clients: Arc<ClientCache>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Sends a request through this thread's pooled client (without a clone of the client
    /// of our own: `request` takes the one it needs).
    pub fn request(&self, req: http::Request<Body>) -> ResponseFuture {
        self.clients
            .with_client(self.connect_timeout, |client| client.request(req))
    }
}

/// What [`Upstream::request`] returns.
pub type ResponseFuture = hyper_util::client::legacy::ResponseFuture;

/// Largest read buffer of an upstream connection (hyper's default is about 400 KiB). Each
/// read of an answer body that the client is slow to take is held until it has been sent: a
/// client that reads nothing held up to a megabyte per connection.
const UPSTREAM_READ_BUFFER: usize = 64 << 10;

thread_local! {
    /// Clients of this thread, by (cache id, connect timeout). A list, not a map: it holds
    /// one entry per distinct connect timeout (usually one or two), and it is searched on
    /// every upstream call, where hashing the key cost more than comparing it.
    static CLIENTS: std::cell::RefCell<Vec<((u64, Duration), HttpClient)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {0} holds no usable certificate")]
    NoCertificate(String),
    #[error("TLS client setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds clients on demand and keeps them, keyed by connect timeout (the only connector
/// setting that differs between upstreams), so pools survive reloads.
pub struct ClientCache {
    id: u64,
    tls: rustls::ClientConfig,
    pool_idle_timeout: Duration,
}

impl ClientCache {
    /// Trusts the webpki roots, the system's roots and, if given, the CA certificates in `ca_file`.
    pub fn new(ca_file: Option<&Path>, pool_idle_timeout: Duration) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // System roots are a convenience: a missing or partly unreadable store is not fatal.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = ca_file {
            let display = path.display().to_string();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|source| TlsSetupError::CaFile {
                    path: display.clone(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsSetupError::NoCertificate(display));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // ALPN is left to the connector, which refuses a preset one. With HTTP/1.1 only
        // (`enable_http1`) it offers none, and servers then speak HTTP/1.1, which carries
        // upgrades (WebSocket) as well.
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tls,
            pool_idle_timeout,
        })
    }

    /// Runs `f` with this thread's client for a connect timeout, created on first use.
    fn with_client<R>(&self, connect_timeout: Duration, f: impl FnOnce(&HttpClient) -> R) -> R {
        let key = (self.id, connect_timeout);
        CLIENTS.with_borrow_mut(|clients| {
            let i = match clients.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    clients.push((key, self.build_client(connect_timeout)));
                    clients.len() - 1
                }
            };
            f(&clients[i].1)
        })
    }

    fn build_client(&self, connect_timeout: Duration) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            .build(Deadline {
                inner: https,
                timeout: connect_timeout,
            })
    }

    /// Turns the rules' upstream definitions into live upstreams.
    pub fn upstreams(self: &Arc<Self>, defs: &[UpstreamDef], defaults: &Defaults) -> Vec<Upstream> {
        defs.iter()
            .enumerate()
            .map(|(i, def)| {
                let url = match (i, &def.url) {
                    (_, Some(url)) => url,
                    (LEGACY_UPSTREAM, None) => &defaults.legacy,
                    (NEW_UPSTREAM, None) => &defaults.new,
                    // Validation gives every named upstream a URL.
                    (_, None) => &defaults.legacy,
                };
                let (scheme, authority) = scheme_and_authority(url);
                let host = host_header(&scheme, &authority);
                Upstream {
                    name: def.name.clone(),
                    scheme,
                    authority,
                    timeout: def.timeout.unwrap_or(defaults.timeout),
                    preserve_host: def.preserve_host,
                    host,
                    connect_timeout: def.connect_timeout.unwrap_or(defaults.connect_timeout),
                    clients: self.clone(),
                }
            })
            .collect()
    }
}

/// The `Host` header a request to this authority carries: the authority, without the
/// scheme's default port (RFC 9110 7.2), as hyper's client would write it.
fn host_header(scheme: &Scheme, authority: &Authority) -> HeaderValue {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let value = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    // An authority's host and port are valid header text.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// Scheme and authority of a URL validated by `rules::parse_upstream_url`.
fn scheme_and_authority(url: &Uri) -> (Scheme, Authority) {
    let scheme = url.scheme().cloned().unwrap_or(Scheme::HTTP);
    let authority = url
        .authority()
        .cloned()
        .unwrap_or_else(|| Authority::from_static("127.0.0.1"));
    (scheme, authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_leaves_out_the_default_port_only() {
        let host = |url: &str| {
            let (scheme, authority) = scheme_and_authority(&url.parse().unwrap());
            host_header(&scheme, &authority)
        };
        assert_eq!(host("http://legacy.internal"), "legacy.internal");
        assert_eq!(host("http://legacy.internal:80"), "legacy.internal");
        assert_eq!(host("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host("https://new.internal:443"), "new.internal");
        assert_eq!(host("https://new.internal:80"), "new.internal:80");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
        assert_eq!(host("http://user@h.example:81"), "h.example:81");
    }
}

/// A connector whose connections must be ready (TCP connected and, for https, the TLS
/// handshake done) within `timeout`: `HttpConnector`'s own timeout covers the TCP connect
/// only, and hyper-rustls has none, so an upstream that accepted and then never answered the
/// handshake was only given up at the upstream timeout (30 s), as a 504 `upstream_timeout`
/// instead of `upstream_connect_timeout`.
#[derive(Clone)]
pub struct Deadline<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower_service::Service<Uri> for Deadline<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect and TLS handshake not done within {timeout:?}"),
                )) as BoxError),
            }
        })
    }
}
