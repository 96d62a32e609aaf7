//! End to end: what the proxy does to requests and responses on their way through.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use support::{Backend, TestProxy, backend_of, client, dead_addr, full};
use tokio::sync::{mpsc, oneshot};

const ANY_TO_LEGACY: &str = "[[route]]\nname = \"all\"\n";

#[tokio::test]
async fn headers_are_rewritten_like_a_proper_proxy() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("keep-alive", "timeout=5")
            .header("x-from-backend", "1")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;

    let resp = client()
        .get(proxy.url("/p?q=1"))
        .header("host", "shop.example.com")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("proxy-authorization", "Basic Zm9v")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = legacy.last();
    let h = &seen.headers;
    assert_eq!(
        h["host"], "shop.example.com",
        "Host is preserved by default"
    );
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "client-sent XFF is not trusted"
    );
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example.com");
    assert_eq!(h["via"], "1.1 ficus");
    assert_eq!(h["x-custom"], "kept");
    for gone in [
        "x-hop",
        "proxy-authorization",
        "connection",
        "keep-alive",
        "te",
    ] {
        assert!(!h.contains_key(gone), "{gone} must not reach the upstream");
    }
    let id = h["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID request id is created: {id}");
    assert_eq!(resp.headers()["x-request-id"].to_str().unwrap(), id);
    assert_eq!(resp.headers()["via"], "1.1 ficus");
    assert_eq!(resp.headers()["x-from-backend"], "1");
    assert!(!resp.headers().contains_key("keep-alive"));

    // A client-supplied request id is passed on and returned.
    let resp = client()
        .get(proxy.url("/p"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");
    assert_eq!(legacy.last().headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn host_can_be_rewritten_per_upstream() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = format!("[upstreams]\nlegacy = {{ preserve_host = false }}\n{ANY_TO_LEGACY}");
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    client()
        .get(proxy.url("/"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.last().headers["host"], legacy.addr.to_string());
}

async fn error_json(resp: reqwest::Response) -> Value {
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn upstream_down_gives_502_with_json() {
    let new = Backend::start("new").await;
    let legacy = format!("http://{}", dead_addr()).parse().unwrap();
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = error_json(resp).await;
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["route"], "all");
    assert_eq!(body["side"], "legacy");
    assert_eq!(body["upstream"], "legacy");
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(
        new.count(),
        0,
        "an error on the authority never falls over to the other side"
    );
}

/// An upstream whose answer head is larger than ficus reads (64 KiB and a read) gets a 502
/// that says so; the message used to end at hyper-util's outer layer, "client error
/// (SendRequest)", and a refused connection at "client error (Connect)".
#[tokio::test]
async fn an_upstream_answer_head_too_large_is_a_502_that_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let pad = "a".repeat(40_000);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: {pad}\r\nx-b: {pad}\r\nx-c: {pad}\r\n\r\nok"
                );
                let _ = s.write_all(head.as_bytes()).await;
            });
        }
    });
    let new = Backend::start("new").await;
    let legacy = format!("http://{addr}").parse().unwrap();
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = error_json(resp).await;
    assert_eq!(body["error"], "upstream_error");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("message head is too large"), "{message}");

    let legacy = format!("http://{}", dead_addr()).parse().unwrap();
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    let message = error_json(resp).await["message"].to_string();
    assert!(message.contains("refused"), "{message}");
}

#[tokio::test]
async fn slow_upstream_gives_504_with_json() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Response::new(full("late"))
    })
    .await;
    let new = Backend::start("new").await;
    let rules = format!("[upstreams]\nlegacy = {{ timeout = \"300ms\" }}\n{ANY_TO_LEGACY}");
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = error_json(resp).await;
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(body["upstream"], "legacy");
}

#[tokio::test]
async fn named_upstream_errors_name_the_upstream() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = format!(
        "[upstreams]\nbilling = \"http://{}\"\n[[route]]\nname = \"bills\"\nauthority = \"new\"\nnew = \"billing\"\n",
        dead_addr()
    );
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = error_json(resp).await;
    assert_eq!(
        (body["side"].as_str(), body["upstream"].as_str()),
        (Some("new"), Some("billing"))
    );
}

/// An upstream that sends its head and the start of its body, then hangs: the upstream
/// timeout also bounds the silence in the middle of a body, so the client's connection is
/// cut (the answer is truncated, as a proxy cannot change its status any more) instead of
/// hanging for as long as the client waits. A body that keeps coming is not cut, however long.
#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_its_timeout() {
    let legacy = Backend::with_handler("legacy", |req| async move {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, support::BoxError>>(2);
        let slow_but_steady = req.uri().path() == "/steady";
        tokio::spawn(async move {
            for _ in 0..if slow_but_steady { 8 } else { 1 } {
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"part;"))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !slow_but_steady {
                // Hangs, holding the body open.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            drop(tx);
        });
        Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
    })
    .await;
    let new = Backend::start("new").await;
    let rules = format!("[upstreams]\nlegacy = {{ timeout = \"300ms\" }}\n{ANY_TO_LEGACY}");
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;

    let mut resp = client().get(proxy.url("/stall")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.chunk().await.unwrap().unwrap(), "part;");
    let rest = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the stalled answer was cut off, not left hanging");
    assert!(
        rest.is_err(),
        "the truncated answer ends in an error: {rest:?}"
    );

    // 8 parts 100 ms apart: 800 ms in all, but never 300 ms of silence.
    let text = client()
        .get(proxy.url("/steady"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "part;".repeat(8));
}

/// The backend sends one chunk, then waits until the client has it before sending the rest:
/// a proxy that buffered the whole body would never deliver the first chunk.
#[tokio::test]
async fn large_download_streams_without_buffering() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 48;
    let (got_first_tx, got_first_rx) = oneshot::channel::<()>();
    let got_first_rx = std::sync::Mutex::new(Some(got_first_rx));
    let legacy = Backend::with_handler("legacy", move |_req| {
        let got_first = got_first_rx.lock().unwrap().take();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, support::BoxError>>(2);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; CHUNK]);
                tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
                got_first.unwrap().await.unwrap();
                for _ in 1..CHUNKS {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream_from(rx);
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let mut resp = client().get(proxy.url("/big")).send().await.unwrap();
    let mut total = resp.chunk().await.unwrap().unwrap().len();
    got_first_tx.send(()).unwrap();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, CHUNK * CHUNKS);
}

/// Mirror image for uploads: the client sends the rest only once the backend has the start.
#[tokio::test]
async fn large_upload_streams_without_buffering() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 48;
    let (got_first_tx, got_first_rx) = oneshot::channel::<()>();
    let got_first_tx = std::sync::Mutex::new(Some(got_first_tx));
    let legacy = Backend::with_handler("legacy", move |req| {
        let got_first = got_first_tx.lock().unwrap().take();
        async move {
            let mut body = req.into_body();
            let mut total = 0usize;
            let mut signal = got_first;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                    if let Some(s) = signal.take() {
                        s.send(()).unwrap();
                    }
                }
            }
            Response::new(full(total.to_string()))
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'y'; CHUNK]);
        tx.send(Ok(chunk.clone())).await.unwrap();
        got_first_rx.await.unwrap();
        for _ in 1..CHUNKS {
            tx.send(Ok(chunk.clone())).await.unwrap();
        }
    });
    let body = reqwest::Body::wrap_stream(tokio_stream_from_bytes(rx));
    let resp = client()
        .post(proxy.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), (CHUNK * CHUNKS).to_string());
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn tokio_stream_from_bytes(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    tokio_stream_from(rx)
}

/// A client that goes away cancels the upstream request.
#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (dropped_tx, mut dropped_rx) = mpsc::channel::<()>(1);
    struct OnDrop(mpsc::Sender<()>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.try_send(());
        }
    }
    let legacy = Backend::with_handler("legacy", move |_req| {
        let guard = OnDrop(dropped_tx.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(guard);
            Response::new(full("late"))
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let url = proxy.url("/slow");
    let request = tokio::spawn(async move { client().get(url).send().await });
    assert!(support::eventually(Duration::from_secs(5), || async { legacy.count() == 1 }).await);
    request.abort();
    let cancelled = tokio::time::timeout(Duration::from_secs(5), dropped_rx.recv()).await;
    assert!(cancelled.is_ok(), "the upstream request was not cancelled");
}

#[tokio::test]
async fn h2c_clients_are_served_and_forwarded_as_http1() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let h2 = h2_client();
    let resp = h2.get(proxy.url("/h2?x=1")).send().await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(backend_of(&resp), "legacy");
    let seen = legacy.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/h2?x=1");
    assert_eq!(seen.headers["host"], proxy.ficus.proxy_addr().to_string());
    assert_eq!(seen.headers["via"], "2 ficus");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Response::new(full("finished"))
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let url = proxy.url("/slow");
    let addr = proxy.ficus.proxy_addr();
    let in_flight =
        tokio::spawn(async move { client().get(url).send().await.unwrap().text().await });
    assert!(support::eventually(Duration::from_secs(5), || async { legacy.count() == 1 }).await);
    let support::TestProxy {
        ficus, dir: _dir, ..
    } = proxy;
    ficus.shutdown().await;
    assert_eq!(in_flight.await.unwrap().unwrap(), "finished");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn websocket_upgrades_pass_through_to_the_authority() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let legacy = Backend::start("legacy").await;
    let rules = "[[route]]\nname = \"ws\"\nauthority = \"new\"\n[route.match]\npath = \"/ws\"\n";
    let proxy = TestProxy::start(
        rules,
        legacy.url(),
        format!("http://{ws_addr}").parse().unwrap(),
    )
    .await;
    let url = format!("ws://{}/ws", proxy.ficus.proxy_addr());
    let (mut ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    ws.close(None).await.unwrap();
    assert_eq!(legacy.count(), 0);
}

/// The upstream timeout counts from the last request byte: an upload that takes longer than
/// the timeout succeeds as long as the upstream answers in time once it has the body.
#[tokio::test]
async fn upstream_timeout_counts_from_the_end_of_the_upload() {
    let legacy = Backend::with_handler("legacy", |req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(body.len().to_string()))
    })
    .await;
    let new = Backend::start("new").await;
    let rules = format!("[upstreams]\nlegacy = {{ timeout = \"300ms\" }}\n{ANY_TO_LEGACY}");
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        for _ in 0..5 {
            tx.send(Ok(Bytes::from_static(b"0123456789")))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    });
    let body = reqwest::Body::wrap_stream(tokio_stream_from_bytes(rx));
    let resp = client()
        .post(proxy.url("/slow-upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "50");
}

/// A client that stops in the middle of its upload is the client's failure: 408, counted as a
/// client error, never as an upstream timeout (which would page the team owning the upstream).
/// The same upload with a shadow ends the shadow as `aborted`, not `authority_error`.
#[tokio::test]
async fn stalled_upload_is_a_client_timeout_not_an_upstream_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let legacy = Backend::with_handler("legacy", |req| async move {
        let body = req.into_body().collect().await;
        Response::new(full(format!("{}", body.is_ok())))
    })
    .await;
    let new = Backend::start("new").await;
    let rules = "[upstreams]\nlegacy = { timeout = \"300ms\" }\n[[route]]\nname = \"stalled-upload\"\n\
                 [route.shadow]\nsample = 1.0\nwrites = true\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("ficus answers a stalled upload")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#""error":"client_body_timeout""#),
        "{answer}"
    );

    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            r#"ficus_upstream_errors_total{route="stalled-upload",side="legacy",kind="client"} 1"#
        ),
        "{metrics}"
    );
    let timeouts =
        r#"ficus_upstream_errors_total{route="stalled-upload",side="legacy",kind="timeout"}"#;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with(timeouts) && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"ficus_requests_total{route="stalled-upload",authority="legacy",status="4xx"} 1"#
        ),
        "{metrics}"
    );
    let aborted = r#"ficus_shadow_total{route="stalled-upload",outcome="aborted"} 1"#;
    let settled = support::eventually(Duration::from_secs(5), || async {
        proxy.metrics().await.contains(aborted)
    })
    .await;
    assert!(settled, "{}", proxy.metrics().await);
}

/// A client that goes away in the middle of its upload: counted as a client error, not as the
/// upstream's failure (`kind="upstream"` and a 5xx would blame it).
#[tokio::test]
async fn upload_cut_by_the_client_is_a_client_error() {
    use tokio::io::AsyncWriteExt;
    let (seen_tx, seen_rx) = oneshot::channel::<()>();
    let seen_tx = std::sync::Mutex::new(Some(seen_tx));
    let legacy = Backend::with_handler("legacy", move |req| {
        if let Some(tx) = seen_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
        async move {
            let body = req.into_body().collect().await;
            Response::new(full(format!("{}", body.is_ok())))
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(
        "[[route]]\nname = \"cut-upload\"\n",
        legacy.url(),
        new.url(),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), seen_rx)
        .await
        .expect("the upload reaches the upstream")
        .unwrap();
    drop(s);
    let counted =
        r#"ficus_upstream_errors_total{route="cut-upload",side="legacy",kind="client"} 1"#;
    let settled = support::eventually(Duration::from_secs(5), || async {
        proxy.metrics().await.contains(counted)
    })
    .await;
    let metrics = proxy.metrics().await;
    assert!(settled, "{metrics}");
    assert!(
        metrics.contains(
            r#"ficus_requests_total{route="cut-upload",authority="legacy",status="4xx"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn connect_method_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = "[[route]]\nname = \"connect\"\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(legacy.count(), 0);
    // A refusal before any upstream, as docs/metrics.md lists it: not an upstream error.
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"ficus_requests_rejected_total{reason="method_not_allowed"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"ficus_upstream_errors_total{route="connect""#),
        "{metrics}"
    );
}

/// An absolute-form request line wins over `Host` (RFC 9112 3.2.2), for routing and forwarding.
#[tokio::test]
async fn absolute_form_authority_wins_over_host_for_routing_and_forwarding() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = "[[route]]\nname = \"shop\"\nauthority = \"new\"\n[route.match]\nhost = \"shop.example.com\"\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    s.write_all(b"GET http://shop.example.com/x HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert_eq!(legacy.count(), 0);
    assert_eq!(new.last().headers["host"], "shop.example.com");
}

/// An upstream that resets the connection after reading the request: a 502 that says so.
#[tokio::test]
async fn upstream_reset_gives_502_upstream_reset() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            // SO_LINGER 0: the close is a reset (RST), which is the point here.
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(
        ANY_TO_LEGACY,
        format!("http://{addr}").parse().unwrap(),
        new.url(),
    )
    .await;
    let resp = client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = error_json(resp).await;
    assert_eq!(body["error"], "upstream_reset", "{body}");
}

/// RFC 9113 8.2.3: an HTTP/2 client may split `Cookie` into one field per cookie; they MUST be
/// joined with "; " before the request goes to an HTTP/1.1 connection. RFC 6265 5.4 allows
/// one `Cookie` line only, and many HTTP/1.1 stacks read only the first one (or join them with
/// ","), so the upstream loses the session cookie.
#[tokio::test]
async fn split_http2_cookies_reach_the_http1_upstream_as_one_header() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;
    let h2 = h2_client();
    let resp = h2
        .get(proxy.url("/account"))
        .header("cookie", "session=abc")
        .header("cookie", "theme=dark")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen = legacy.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    let cookies: Vec<&str> = seen
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["session=abc; theme=dark"]);
}

/// A client speaking HTTP/2 by prior knowledge (h2c), as a gRPC or service-mesh client does.
fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends `raw` on a fresh connection and reads until the proxy closes it (or 10 s pass).
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the proxy answers and closes in time")
        .unwrap();
    String::from_utf8_lossy(&buf).to_string()
}

/// A body of `data` followed by the trailer `x-checksum: <checksum>`.
fn body_with_trailer(data: &'static str, checksum: &'static str) -> support::RespBody {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static(checksum));
    let frames = vec![
        Ok::<_, support::BoxError>(Frame::data(Bytes::from_static(data.as_bytes()))),
        Ok(Frame::trailers(trailers)),
    ];
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// Trailers are end-to-end (RFC 9110 6.5): checksums, signatures and gRPC's `grpc-status`
/// travel in them. `Trailer` is no hop-by-hop field, and HTTP/1.1 stacks (hyper among them)
/// only write the trailer fields it declares; and an upstream sends trailers only to a
/// client that said `TE: trailers`. Dropping either loses every trailer on the way.
#[tokio::test]
async fn trailers_pass_through_in_both_directions() {
    let legacy = Backend::with_handler("legacy", |req| async move {
        let collected = req.into_body().collect().await.unwrap();
        let got = collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| "none".into());
        Response::builder()
            .header("trailer", "x-checksum")
            .header("x-request-trailer", got)
            .body(body_with_trailer("hello", "abc"))
            .unwrap()
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;

    // HTTP/1.1 client, chunked both ways.
    let text = raw_exchange(
        proxy.ficus.proxy_addr(),
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTrailer: x-checksum\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: def\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("x-request-trailer: def\r\n"),
        "the request trailer reaches the upstream: {text}"
    );
    assert!(
        text.ends_with("0\r\nx-checksum: abc\r\n\r\n"),
        "the response trailer reaches the client: {text}"
    );

    // HTTP/2 client asking for trailers, as gRPC clients do.
    let tcp = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://a/rpc")
        .header("te", "trailers")
        .body(full("ping"))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(
        collected.trailers().map(|t| t["x-checksum"].clone()),
        Some(http::HeaderValue::from_static("abc"))
    );
    assert_eq!(collected.to_bytes(), "hello");
}

/// A GET may carry a body (search APIs take their query in one). hyper's client sends a GET
/// or HEAD body of unannounced length only when the request says `Transfer-Encoding:
/// chunked`; ficus strips that header as hop-by-hop, so a chunked GET body (or an HTTP/2
/// GET body without `content-length`) reached the upstream as no body at all.
#[tokio::test]
async fn a_get_body_of_unannounced_length_reaches_the_upstream() {
    let legacy = Backend::with_handler("legacy", |req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(body))
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy.url(), new.url()).await;

    let text = raw_exchange(
        proxy.ficus.proxy_addr(),
        b"GET /_search HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n7\r\n{\"q\":1}\r\n0\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n{\"q\":1}"), "{text}");

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, support::BoxError>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"{\"q\":2}"))))
        .await
        .unwrap();
    drop(tx);
    let resp = h2_client()
        .get(proxy.url("/_search"))
        .body(reqwest::Body::wrap(StreamBody::new(tokio_stream_from(rx))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "{\"q\":2}");
}

/// An upstream on raw TCP: reads each request head, writes `answer`, and closes.
async fn raw_upstream(answer: &'static [u8]) -> http::Uri {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
            });
        }
    });
    format!("http://{addr}").parse().unwrap()
}

/// Reads one response with a `content-length` body from `s`.
async fn read_sized_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

/// ficus speaks HTTP/1.1 to its clients whatever its upstream speaks (RFC 9110 6.2: a server
/// sends the highest version it conforms to). Copying an HTTP/1.0 upstream's version onto
/// the answer made every answer from an old legacy server close the client's connection,
/// and an answer without `content-length` close-delimited, so that a cut one looked whole.
#[tokio::test]
async fn an_http10_upstream_is_answered_as_http11_on_a_kept_alive_connection() {
    use tokio::io::AsyncWriteExt;
    let legacy = raw_upstream(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /old HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let text = read_sized_response(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
        assert!(text.contains("via: 1.0 ficus\r\n"), "{text}");
    }
    // An HTTP/1.0 client is still answered in HTTP/1.0.
    let text = raw_exchange(
        proxy.ficus.proxy_addr(),
        b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nhello"), "{text}");
}

/// An upstream may repeat `Content-Length` (two fields, or `2, 2`), which RFC 9110 8.6 lets a
/// recipient repair into one value. Passed on as is, it killed the answer to a HEAD request
/// (hyper refuses to write a second length and drops the connection, the client gets no
/// answer at all), and HTTP/2 clients such as Go's and nghttp2's reject the stream.
#[tokio::test]
async fn a_repeated_content_length_reaches_the_client_as_one() {
    use tokio::io::AsyncWriteExt;
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"[..],
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"[..],
    ] {
        let legacy = raw_upstream(answer).await;
        let new = Backend::start("new").await;
        let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
        let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
            .await
            .unwrap();
        s.write_all(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        // A HEAD answer's content-length announces no body: read the head only.
        let mut text = String::new();
        while !text.ends_with("\r\n\r\n") {
            let mut byte = [0u8; 1];
            use tokio::io::AsyncReadExt;
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
                Ok(Ok(1)) => text.push(char::from(byte[0])),
                _ => break,
            }
        }
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert_eq!(text.matches("content-length: 2\r\n").count(), 1, "{text}");

        let resp = h2_client().get(proxy.url("/x")).send().await.unwrap();
        let lengths: Vec<_> = resp.headers().get_all("content-length").iter().collect();
        assert_eq!(lengths, ["2"]);
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
}

/// A transfer coding other than chunked (`Transfer-Encoding: gzip, chunked`) is undone by no
/// one on the way: hyper's client removes the chunking only, and `Transfer-Encoding` is
/// hop-by-hop, so the client got the still-compressed bytes as if they were the answer.
/// ficus cannot pass such an answer on faithfully (HTTP/2 has no transfer codings); like
/// nginx, it refuses it as an invalid upstream answer.
#[tokio::test]
async fn an_answer_in_an_unknown_transfer_coding_is_a_502_not_a_corrupt_body() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nhello"[..],
        // Chunked twice: decoded once, the client would get chunk framing as the body.
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n\
           f\r\n5\r\nhello\r\n0\r\n\r\n\r\n0\r\n\r\n"[..],
    ] {
        let legacy = raw_upstream(answer).await;
        let new = Backend::start("new").await;
        let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
        let resp = client().get(proxy.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = error_json(resp).await;
        assert_eq!(body["error"], "upstream_error", "{body}");
        assert_eq!(body["side"], "legacy", "{body}");
    }
}

/// RFC 9110 8.6: no `Content-Length` in a 204. HTTP/2 clients built on nghttp2 (curl among
/// them) reset a stream whose 204 announces a length other than 0, so an upstream's stray
/// length, passed on, failed answers that carry no content at all.
#[tokio::test]
async fn a_204_reaches_the_client_without_content_length() {
    let legacy = raw_upstream(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let resp = h2_client()
        .delete(proxy.url("/item/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert!(!resp.headers().contains_key("content-length"), "{resp:?}");
    let resp = client().head(proxy.url("/item/1")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(!resp.headers().contains_key("content-length"), "{resp:?}");
}

/// `Upgrade: h2c` asks to turn the connection into HTTP/2 with whoever answers. Passed on, an
/// upstream that accepts (Go's h2c handler does) switches, and ficus, taking it for a
/// tunnel, pipes bytes from then on: every later request of that client goes straight to
/// that upstream, past routing, shadowing and every header rewrite. Like Envoy, ficus does
/// not offer h2c upstream; the client stays on HTTP/1.1 (RFC 9113 3.1 has retired h2c).
#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on_and_later_requests_are_still_proxied() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upgrades = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen_upgrades = upgrades.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let upgrades = seen_upgrades.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        buf.drain(..end + 4);
                        let answer: &[u8] = if head.contains("upgrade: h2c") {
                            upgrades.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlegacy"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(
        ANY_TO_LEGACY,
        format!("http://{addr}").parse().unwrap(),
        new.url(),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.ficus.proxy_addr())
        .await
        .unwrap();
    s.write_all(
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let first = read_sized_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    s.write_all(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let second = read_sized_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
    assert!(second.contains("via: 1.1 ficus\r\n"), "{second}");
    assert_eq!(upgrades.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// An answer with both `Transfer-Encoding: chunked` and `Content-Length` is framed by the
/// chunking, and a proxy MUST remove the `Content-Length` before forwarding it (RFC 9112
/// 6.3). ficus removed the chunking header only: the client read the body by the stale
/// length, a silently truncated answer on a connection kept alive (HTTP/1.1), or a reset
/// stream (HTTP/2).
#[tokio::test]
async fn a_chunked_answer_that_also_announces_a_length_is_passed_on_whole() {
    let legacy = raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let text = raw_exchange(
        proxy.ficus.proxy_addr(),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains("content-length"), "{text}");
    assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{text}");
    let resp = h2_client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "hello");
}

/// A 101 is an answer to an upgrade request only. An upstream that switches protocols
/// unasked left the client with an interim answer and nothing after it (HTTP/1.1: the client
/// waits for a final answer that never comes; HTTP/2 has no 101 at all): a 502 says what
/// happened.
#[tokio::test]
async fn an_unasked_101_is_a_502() {
    let legacy = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(ANY_TO_LEGACY, legacy, new.url()).await;
    let text = raw_exchange(
        proxy.ficus.proxy_addr(),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
    let resp = h2_client().get(proxy.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_json(resp).await["error"], "upstream_error");
}
