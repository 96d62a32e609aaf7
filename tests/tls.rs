//! End to end: TLS on the listener (HTTP/1.1 and HTTP/2 by ALPN) and to https:// upstreams,
//! with certificates generated for the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{Backend, Pki, TestProxy, named_response, pki};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

type TlsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

fn tls_client(pki: &Pki, h2: bool) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

#[tokio::test]
async fn tls_on_the_listener_and_to_the_upstream() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let legacy = Backend::serve(
        "legacy",
        |req| async move { named_response("legacy", &req) },
        Some(acceptor(&pki)),
    )
    .await;
    let new = Backend::start("new").await;
    let legacy_url = format!("https://localhost:{}", legacy.addr.port())
        .parse()
        .unwrap();
    let proxy = TestProxy::start_with("[[route]]\nname = \"all\"\n", legacy_url, new.url(), |c| {
        c.tls = Some(ficus::TlsFiles {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
        c.upstream_ca = Some(pki.ca.clone());
    })
    .await;
    let url = format!(
        "https://localhost:{}/secure?x=1",
        proxy.ficus.proxy_addr().port()
    );

    for (h2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
        let resp = tls_client(&pki, h2)
            .request(Request::get(&url).body(Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), version, "ALPN negotiates {version:?}");
        assert_eq!(resp.headers()["x-backend"], "legacy");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("/secure"));
        let seen = legacy.last();
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert_eq!(seen.uri.query(), Some("x=1"));
    }
}

#[tokio::test]
async fn untrusted_upstream_certificate_gives_502() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let legacy = Backend::serve(
        "legacy",
        |req| async move { named_response("legacy", &req) },
        Some(acceptor(&pki)),
    )
    .await;
    let new = Backend::start("new").await;
    let legacy_url = format!("https://localhost:{}", legacy.addr.port())
        .parse()
        .unwrap();
    // No --upstream-ca: the test CA is not trusted.
    let proxy = TestProxy::start("[[route]]\nname = \"all\"\n", legacy_url, new.url()).await;
    let resp = support::client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
}

/// An https upstream that accepts the connection and never answers the TLS handshake was
/// only given up at the upstream timeout (30 s), as a 504 `upstream_timeout`: the connect
/// timeout covered the TCP connect alone. It now covers the handshake too.
#[tokio::test]
async fn a_tls_handshake_that_never_ends_is_a_connect_timeout() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let new = Backend::start("new").await;
    let legacy_url = format!("https://localhost:{port}").parse().unwrap();
    let proxy = TestProxy::start_with("[[route]]\nname = \"all\"\n", legacy_url, new.url(), |c| {
        c.connect_timeout = std::time::Duration::from_millis(300);
        c.upstream_timeout = std::time::Duration::from_secs(20);
    })
    .await;
    let resp = support::client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "upstream_connect_timeout", "{body}");
    hold.abort();
}

/// A certificate file without a certificate (the key given twice, the files swapped, a DER
/// file) is refused at start-up with an error that names the file and the mistake, not
/// rustls's "peer sent no certificates".
#[test]
fn a_certificate_file_without_a_certificate_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for cert in [&pki.key, &empty] {
        let err = match ficus::server::tls_acceptor(cert, &pki.key) {
            Ok(_) => panic!("{} holds no certificate but was accepted", cert.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&cert.display().to_string()),
            "the error names the file: {err}"
        );
        assert!(err.contains("no certificate"), "{err}");
        assert!(!err.contains("peer"), "no peer is involved: {err}");
    }
    // The real pair still loads.
    assert!(ficus::server::tls_acceptor(&pki.cert, &pki.key).is_ok());
}

/// Whether a fresh connection that trusts `pki`'s CA is served.
async fn served_trusting(pki: &Pki, port: u16) -> bool {
    let url = format!("https://localhost:{port}/x");
    tls_client(pki, false)
        .request(Request::get(&url).body(Empty::new()).unwrap())
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// Certificates are rotated while the proxy runs (cert-manager renews at two thirds of the
/// lifetime): the files are checked and read again, by a Kubernetes-style swap of the
/// directory as by a write in place, and a pair that does not load (a key from another
/// rotation, a half-written file) leaves the one in force.
#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let (old, new_pki) = (pki(&one), pki(&two));
    // The listener reads `live/`, a symlink swapped to another directory, as in a secret mount.
    let live = dir.path().join("live");
    std::os::unix::fs::symlink(&one, &live).unwrap();
    let backend = Backend::start("legacy").await;
    let other = Backend::start("new").await;
    let proxy = TestProxy::start_with(
        "[[route]]\nname = \"all\"\n",
        backend.url(),
        other.url(),
        |c| {
            c.tls = Some(ficus::TlsFiles {
                cert: live.join("cert.pem"),
                key: live.join("key.pem"),
            });
            c.tls_check_interval = std::time::Duration::from_millis(50);
        },
    )
    .await;
    let port = proxy.ficus.proxy_addr().port();
    assert!(served_trusting(&old, port).await);
    assert!(!served_trusting(&new_pki, port).await);

    let swapped = dir.path().join("live.tmp");
    std::os::unix::fs::symlink(&two, &swapped).unwrap();
    std::fs::rename(&swapped, &live).unwrap();
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || served_trusting(
            &new_pki, port
        ))
        .await,
        "the rotated certificate is served"
    );
    assert!(!served_trusting(&old, port).await);

    // A key that is not the certificate's (caught mid-rotation), then a truncated certificate:
    // each is refused, and the pair in force still serves.
    let key = std::fs::read(&new_pki.key).unwrap();
    std::fs::copy(&old.key, &new_pki.key).unwrap();
    let err = proxy.ficus.reload_tls().unwrap_err().to_string();
    assert!(err.contains("key"), "{err}");
    std::fs::write(&new_pki.key, &key).unwrap();
    let cert = std::fs::read_to_string(&new_pki.cert).unwrap();
    std::fs::write(&new_pki.cert, &cert[..cert.len() / 2]).unwrap();
    assert!(proxy.ficus.reload_tls().is_err());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        served_trusting(&new_pki, port).await,
        "the pair in force stays"
    );

    // Written whole again in place, and read again.
    std::fs::write(&new_pki.cert, &cert).unwrap();
    assert!(proxy.ficus.reload_tls().is_ok());
    assert!(served_trusting(&new_pki, port).await);
}
