//! Defects found by an audit of the proxying path (server/, proxy/, upstream/). Each test fails
//! on the code it was written against and states the promise it checks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{Backend, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ANY_TO_LEGACY: &str = "[[route]]\nname = \"all\"\n";

const GET_CLOSE: &[u8] = b"GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";

/// Writes `raw`, then reads until the proxy closes the connection (at most 10 s). `None`: the
/// connection was still open after 10 s.
async fn send_and_read_to_end(addr: SocketAddr, raw: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

/// Slow-loris at its simplest: connect and send nothing (or one byte of the HTTP/2 preface).
/// `--header-read-timeout` promises that a client that does not send a request head in time
/// is cut off; otherwise such sockets hold a `--max-connections` permit and a descriptor
/// forever, and a few thousand of them lock every client out.
#[tokio::test]
async fn a_connection_that_sends_no_request_head_is_cut_off_by_the_header_read_timeout() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(ANY_TO_LEGACY, legacy.url(), new.url(), |c| {
        c.limits.max_connections = 2;
        c.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = proxy.ficus.proxy_addr();

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"P").await.unwrap();
    for (what, s) in [("nothing", &mut silent), ("one byte", &mut partial)] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "a client that sent {what} was still connected 10 s later (header read timeout 300 ms)"
        );
    }
    drop((silent, partial));

    // And the permits they held are free again.
    let mut served = false;
    for _ in 0..100 {
        if let Some(buf) = send_and_read_to_end(addr, GET_CLOSE).await
            && buf.starts_with(b"HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "the proxy serves again once the silent clients are cut off"
    );
}

/// An echo WebSocket server on loopback.
async fn ws_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `--max-connections` bounds the open client connections. A WebSocket (or any upgraded)
/// connection stays open for hours and holds two descriptors, so it must count; otherwise a
/// flood of upgrades walks straight past the limit.
#[tokio::test]
async fn an_upgraded_connection_counts_against_max_connections() {
    let ws_addr = ws_echo().await;
    let legacy = Backend::start("legacy").await;
    let rules = "[[route]]\nname = \"ws\"\nauthority = \"new\"\n[route.match]\npath = \"/ws\"\n\n\
                 [[route]]\nname = \"rest\"\n";
    let proxy = TestProxy::start_with(
        rules,
        legacy.url(),
        format!("http://{ws_addr}").parse().unwrap(),
        |c| c.limits.max_connections = 1,
    )
    .await;
    let addr = proxy.ficus.proxy_addr();

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    // The one connection allowed is the WebSocket: another one is closed unanswered.
    let got = send_and_read_to_end(addr, GET_CLOSE)
        .await
        .expect("a connection past the limit is closed at once");
    assert!(
        got.is_empty(),
        "served a second connection while a WebSocket held the only one of --max-connections 1: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(legacy.count(), 0);

    // Once the WebSocket is closed, its place is free again.
    ws.close(None).await.unwrap();
    drop(ws);
    let mut served = false;
    for _ in 0..100 {
        if let Some(buf) = send_and_read_to_end(addr, GET_CLOSE).await
            && buf.starts_with(b"HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the WebSocket's permit is released when it closes");
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
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
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
