//! Test support: real loopback backends that record what they received, a `TestProxy` that
//! runs the real ficus in-process, and small helpers. Never fixed ports; never sleeps to wait.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use ficus::{Config, Ficus};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = BoxBody<Bytes, BoxError>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<RespBody>> + Send>>
        + Send
        + Sync,
>;

/// What a backend saw of one request (the head; handlers may record bodies themselves).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// A real HTTP/1.1 + HTTP/2 server on 127.0.0.1 that records every request head.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response naming the backend, method and path.
pub fn named_response(name: &str, req: &Request<Incoming>) -> Response<RespBody> {
    let body = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-backend", name)
        .body(full(body.to_string()))
        .unwrap()
}

impl Backend {
    /// Answers every request with [`named_response`].
    pub async fn start(name: &str) -> Backend {
        let n = name.to_string();
        Self::with_handler(name, move |req| {
            let resp = named_response(&n, &req);
            async move { resp }
        })
        .await
    }

    pub async fn with_handler<F, Fut>(name: &str, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        Self::serve(name, handler, None).await
    }

    pub async fn serve<F, Fut>(name: &str, handler: F, tls: Option<TlsAcceptor>) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        Self::serve_at("127.0.0.1:0".parse().unwrap(), name, handler, tls).await
    }

    /// [`Backend::start`] on a given address (an upstream that comes back on its old port).
    pub async fn start_at(addr: SocketAddr, name: &str) -> Backend {
        let n = name.to_string();
        Self::serve_at(
            addr,
            name,
            move |req| {
                let resp = named_response(&n, &req);
                async move { resp }
            },
            None,
        )
        .await
    }

    pub async fn serve_at<F, Fut>(
        bind: SocketAddr,
        name: &str,
        handler: F,
        tls: Option<TlsAcceptor>,
    ) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let record = record.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        record.lock().unwrap().push(Seen {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            seen,
            task,
        }
    }

    pub fn url(&self) -> Uri {
        format!("http://{}", self.addr).parse().unwrap()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the backend saw no request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// An address where nothing listens (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// ficus running in-process in front of two backends, with its rules in a temp dir.
pub struct TestProxy {
    pub ficus: Ficus,
    pub dir: tempfile::TempDir,
    pub base: String,
}

impl TestProxy {
    pub async fn start(rules: &str, legacy: Uri, new: Uri) -> TestProxy {
        Self::start_with(rules, legacy, new, |_| {}).await
    }

    pub async fn start_with(
        rules: &str,
        legacy: Uri,
        new: Uri,
        configure: impl FnOnce(&mut Config),
    ) -> TestProxy {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
        let mut config = Config::new(dir.path(), legacy, new);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin_listen = "127.0.0.1:0".parse().unwrap();
        config.shutdown_timeout = Duration::from_secs(10);
        config.store = format!("sqlite:{}", dir.path().join("records.db").display());
        config.writer.spool_dir = dir.path().join("spool");
        configure(&mut config);
        let ficus = Ficus::start(config).await.unwrap();
        let base = format!("http://{}", ficus.proxy_addr());
        TestProxy { ficus, dir, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ficus.admin_addr())
    }

    /// The text of the admin `/metrics` page now.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// An admin GET answered with JSON, now (without a token).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The admin `/api/report` now (without a token).
    pub async fn report(&self) -> serde_json::Value {
        self.admin_json("/api/report").await
    }

    /// The records in the store now, newest first.
    pub async fn records(&self) -> Vec<ficus::record::Record> {
        let filter = ficus::store::Filter {
            limit: 1000,
            ..Default::default()
        };
        self.ficus.store().list(&filter).await.unwrap().items
    }

    /// Waits until the store holds `n` records, and returns them. Store errors (a Redis that
    /// was just restarted, a connection being re-established) only mean "not yet".
    pub async fn wait_records(&self, n: usize) -> Vec<ficus::record::Record> {
        let filter = ficus::store::Filter {
            limit: 1000,
            ..Default::default()
        };
        let mut found = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < end {
            if let Ok(page) = self.ficus.store().list(&filter).await {
                found = page.items;
                if found.len() >= n {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found
    }

    pub fn rules_file(&self) -> std::path::PathBuf {
        self.dir.path().join("rules.toml")
    }

    /// Replaces the rules file atomically (write aside, then rename), as editors and git do.
    pub fn replace_rules(&self, text: &str) {
        replace_file(&self.rules_file(), text);
    }
}

pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Polls `check` until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `x-backend` header of a response.
pub fn backend_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn status_ok() -> StatusCode {
    StatusCode::OK
}

/// A real `redis-server` on a free loopback port, with its data in a temp dir (append-only
/// file, fsync always), so that it can be killed and started again without losing data.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

/// The value of the sample `series` (name and labels, exactly as exported) in a `/metrics`
/// page, if it is there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(&[]).await
    }

    /// Starts on a given port (one a test handed out before the server existed).
    pub async fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: Vec::new(),
        };
        server.restart().await;
        server
    }

    /// [`RedisServer::start_with`] on a given port.
    pub async fn start_on_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on the same port and data directory, and waits until it answers.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        assert!(
            eventually(Duration::from_secs(10), || async {
                redis_ping(&addr).await
            })
            .await,
            "redis-server did not start on {addr}"
        );
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers PING at `addr` (raw RESP, no client library needed).
pub async fn redis_ping(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
    )
}

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1.
pub fn pki(dir: &Path) -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL (redis-server, redis-cli) insists on these; rustls does not.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ficus test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.use_authority_key_identifier_extension = true;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}
