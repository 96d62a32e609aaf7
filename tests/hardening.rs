//! Hostile input, end to end on loopback: tricky paths cannot reach a route they do not match,
//! smuggling attempts are refused before any upstream sees them. Requests are written byte for
//! byte on a raw TCP socket, since real HTTP clients clean paths up before sending them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::{Backend, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[route]]
name = "admin"
authority = "new"
[route.match]
path_prefix = "/admin/"

[[route]]
name = "public"
[route.match]
path_prefix = "/public/"
"#;

/// Sends `raw` as is and reads until the server closes or a whole response has arrived.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if complete(&buf) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A response head plus a body of its `content-length`.
fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

fn body_json(text: &str) -> Value {
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn every_spelling_of_a_path_is_matched_and_forwarded_as_one_canonical_path() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let addr = proxy.ficus.proxy_addr();

    // (path sent, backend that must answer, path it must see)
    let routed = [
        ("/admin/users", "new", "/admin/users"),
        ("/public/../admin/users", "new", "/admin/users"),
        ("/public/%2e%2e/admin/users", "new", "/admin/users"),
        ("/public/.%2E/admin/users", "new", "/admin/users"),
        ("//admin//users", "new", "/admin/users"),
        ("/./admin/./users", "new", "/admin/users"),
        ("/%61dmin/users", "new", "/admin/users"),
        ("/admin/users/..", "new", "/admin/"),
        ("/public/a%20b", "legacy", "/public/a%20b"),
        ("/public/caf%c3%a9", "legacy", "/public/caf%C3%A9"),
        ("/Admin/users", "legacy", "/Admin/users"),
        ("/admin/../public/x?q=%2F..", "legacy", "/public/x"),
    ];
    for (sent, side, seen) in routed {
        let before = (legacy.count(), new.count());
        let (status, text) = exchange(addr, &get(sent)).await;
        assert_eq!(status, 200, "{sent}: {text}");
        assert_eq!(
            body_json(&text)["backend"],
            side,
            "{sent} went to the wrong side"
        );
        let backend = if side == "new" { &new } else { &legacy };
        assert_eq!(backend.last().uri.path(), seen, "{sent}");
        assert_eq!(
            legacy.count() + new.count(),
            before.0 + before.1 + 1,
            "{sent}: exactly one upstream request"
        );
    }
    // The query string is forwarded untouched.
    assert_eq!(legacy.last().uri.query(), Some("q=%2F.."));

    // Paths without a canonical form are refused with a JSON 400 before any upstream.
    let refused = [
        ("/public/..%2fadmin/users", "encoded slash"),
        ("/public/..%2Fadmin/users", "encoded slash"),
        ("/public%5c..%5cadmin/users", "backslash"),
        ("/../admin/users", "above the root"),
        ("/public/%2e%2e/%2e%2e/admin", "above the root"),
        ("/public/..;/admin/users", "dot segment with parameters"),
        ("/public/%00", "NUL"),
        ("/public/%zz", "two hex digits"),
    ];
    let before = (legacy.count(), new.count());
    for (sent, why) in refused {
        let (status, text) = exchange(addr, &get(sent)).await;
        assert_eq!(status, 400, "{sent}: {text}");
        let body = body_json(&text);
        assert_eq!(body["error"], "bad_path", "{sent}: {text}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{sent}: {text}"
        );
    }
    assert_eq!(
        (legacy.count(), new.count()),
        before,
        "no upstream saw them"
    );
}

#[tokio::test]
async fn smuggling_attempts_are_refused_before_any_upstream() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let addr = proxy.ficus.proxy_addr();
    let attempts: [&[u8]; 9] = [
        // Two hosts: routing would read one, an upstream or a cache perhaps the other.
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        // No host at all, a host with userinfo, a list of hosts (RFC 9112 3.2).
        b"GET /public/x HTTP/1.1\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: evil@a\r\n\r\n",
        b"GET /public/x HTTP/1.1\r\nHost: a, b\r\n\r\n",
        // Two different lengths.
        b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        // Obsolete line folding.
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        // A control byte in a header value.
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n",
        // A space before the colon.
        b"GET /public/x HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nabcde",
        // A transfer coding other than chunked, last.
        b"POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ];
    for raw in attempts {
        let (status, text) = exchange(addr, raw).await;
        let shown = String::from_utf8_lossy(raw);
        assert_eq!(status, 400, "{shown:?} got: {text:?}");
    }
    assert_eq!(
        (legacy.count(), new.count()),
        (0, 0),
        "no upstream saw them"
    );

    // CL.TE: a front end reading Content-Length and a back end reading chunked would disagree
    // on where the next request starts. hyper follows RFC 9112 6.3: chunked wins, the length
    // is dropped, and the connection closes after the answer, so the bytes after the chunked
    // body (here a request for the admin route) are never read as a request.
    let smuggle = b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n\
                    Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                    GET /admin/secret HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(smuggle).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("the connection closes")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        (legacy.count(), new.count()),
        (1, 0),
        "the admin request was never made"
    );
    assert_eq!(legacy.last().uri.path(), "/public/x");

    // The same length twice is one length (RFC 9112 6.3), and goes out as one field (hyper
    // writes the body's length itself): many upstreams refuse two `Content-Length` lines.
    let (status, text) = exchange(
        addr,
        b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\
          Connection: close\r\n\r\nabcde",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = legacy.last();
    let lengths: Vec<_> = seen.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, ["5"]);
}

#[tokio::test]
async fn limits_answer_with_clear_errors_and_nothing_reaches_an_upstream() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = RULES.replace(
        "name = \"public\"",
        "name = \"public\"\nmax_request_body = \"1KiB\"",
    );
    let proxy = TestProxy::start_with(&rules, legacy.url(), new.url(), |c| {
        c.limits.max_uri_bytes = 200;
        c.limits.max_headers = 20;
        c.limits.max_header_bytes = 8192;
        c.limits.max_request_body = Some(4096);
    })
    .await;
    let addr = proxy.ficus.proxy_addr();

    // Request target over --max-uri-bytes: 414 with a JSON body.
    let (status, text) = exchange(addr, &get(&format!("/public/{}", "a".repeat(300)))).await;
    assert_eq!(status, 414, "{text}");
    assert_eq!(body_json(&text)["error"], "uri_too_long");

    // Too many header fields, or a head too large: 431 from the parser.
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let raw = format!("GET /public/x HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n");
    assert_eq!(exchange(addr, raw.as_bytes()).await.0, 431);
    let big = format!(
        "GET /public/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(10_000)
    );
    assert_eq!(exchange(addr, big.as_bytes()).await.0, 431);

    // A body announced over the route's limit (1 KiB on `public`): 413 before any upstream.
    let raw = format!(
        "POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{}",
        "x".repeat(2000)
    );
    let (status, text) = exchange(addr, raw.as_bytes()).await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(body_json(&text)["error"], "body_too_large");
    assert_eq!(
        (legacy.count(), new.count()),
        (0, 0),
        "no upstream saw them"
    );

    // A chunked body that grows past the limit is cut off and answered 413.
    let chunk = "y".repeat(1500);
    let raw = format!(
        "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let (status, text) = exchange(addr, raw.as_bytes()).await;
    assert_eq!(status, 413, "{text}");

    // Routes without their own limit use --max-request-body (4 KiB here); under it, fine.
    let raw = format!(
        "POST /admin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\nConnection: close\r\n\r\n{}",
        "z".repeat(3000)
    );
    assert_eq!(exchange(addr, raw.as_bytes()).await.0, 200);
    let raw = format!(
        "POST /admin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n{}",
        "z".repeat(5000)
    );
    assert_eq!(exchange(addr, raw.as_bytes()).await.0, 413);

    // Every refusal is counted by reason.
    let metrics = proxy.metrics().await;
    for reason in ["uri_too_long", "body_too_large"] {
        assert!(
            metrics.contains(&format!(
                "ficus_requests_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted"
        );
    }
}

#[tokio::test]
async fn slow_clients_and_connection_floods_cannot_hold_the_proxy() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.max_connections = 4;
        c.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = proxy.ficus.proxy_addr();

    // Slowloris: half a request head, then nothing. The connection is closed.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf))
        .await
        .expect("the slow client is cut off")
        .ok();
    drop(slow);

    // Slowloris at its simplest: connect and send nothing, or one byte of the HTTP/2 preface
    // (before the protocol is known, hyper's own header timeout does not run yet). Cut off
    // too: a few thousand such sockets would otherwise hold every connection permit.
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

    // Flood: at the connection limit, a new connection is closed at once, unanswered.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A request on each makes sure the proxy has accepted it (and holds a permit).
        s.write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let _ = extra.write_all(&get("/public/x")).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut got))
        .await
        .expect("the extra connection is closed");
    assert!(got.is_empty(), "no answer past the limit");

    // Held connections are idle now: the header timeout frees their permits, and the proxy
    // serves again without a restart.
    drop(held);
    let mut ok = false;
    for _ in 0..100 {
        if exchange(addr, &get("/public/x")).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the proxy recovers once connections close");
}

#[tokio::test]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let spoof = "GET /public/x HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 203.0.113.9\r\n\
                 X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\
                 Forwarded: for=203.0.113.9;proto=https;host=evil.test\r\n\
                 X-Real-IP: 203.0.113.9\r\nX-Forwarded-Port: 443\r\nConnection: close\r\n\r\n";

    // Not trusted (the default): the client's values are replaced.
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    assert_eq!(
        exchange(proxy.ficus.proxy_addr(), spoof.as_bytes()).await.0,
        200
    );
    let seen = legacy.last().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.test");
    // RFC 7239's field says the same things: ficus does not write it, so it goes.
    assert!(!seen.contains_key("forwarded"), "{seen:?}");
    // As are the address and port fields ficus does not write either.
    assert!(!seen.contains_key("x-real-ip"), "{seen:?}");
    assert!(!seen.contains_key("x-forwarded-port"), "{seen:?}");
    drop(proxy);

    // Loopback trusted: the chain is kept and extended, proto and host kept.
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    assert_eq!(
        exchange(proxy.ficus.proxy_addr(), spoof.as_bytes()).await.0,
        200
    );
    let seen = legacy.last().headers;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "evil.test");
    assert_eq!(
        seen["forwarded"],
        "for=203.0.113.9;proto=https;host=evil.test"
    );
    assert_eq!(seen["x-real-ip"], "203.0.113.9");
    assert_eq!(seen["x-forwarded-port"], "443");
}

/// One HTTP/2 frame: its 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GET request head as HPACK without the dynamic table: indexed `:method GET` and
/// `:scheme http`, literal values for `:path` and `:authority` (RFC 7541, appendix A names).
fn h2_get(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (index, value) in [(4u8, path), (1, "shop.test")] {
        block.push(index); // literal without indexing, indexed name
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// Reads frames until `stop` says so (or 10 s pass); returns (type, flags, stream, payload).
async fn h2_read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    frames: &mut Vec<(u8, u8, u32, Vec<u8>)>,
    stop: impl Fn(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) {
    let read = async {
        while !stop(frames) {
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
                buf.drain(..9 + len);
            }
            if stop(frames) {
                break;
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the proxy answers in time");
}

#[tokio::test]
async fn an_h2_client_past_the_stream_limit_is_refused_and_the_rest_is_served() {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const END_STREAM_HEADERS: u8 = 0x1 | 0x4;
    // The backend holds every request until released, so that streams stay open.
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let legacy = Backend::with_handler("legacy", move |req| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire().await.unwrap();
            support::named_response("legacy", &req)
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.h2_max_streams = 2;
    })
    .await;

    // h2c with prior knowledge, written frame by frame: a client that ignores the advertised
    // limit, as a hostile one would. Streams 1 and 3 fit the limit of 2; stream 5 does not.
    let mut s = TcpStream::connect(proxy.ficus.proxy_addr()).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    for stream in [1, 3, 5] {
        out.extend(h2_frame(
            HEADERS,
            END_STREAM_HEADERS,
            stream,
            &h2_get("/public/x"),
        ));
    }
    s.write_all(&out).await.unwrap();
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    h2_read_until(&mut s, &mut buf, &mut frames, |f| {
        f.iter()
            .any(|(kind, _, id, _)| *kind == RST_STREAM && *id == 5)
    })
    .await;
    let settings = frames
        .iter()
        .find(|(kind, flags, _, _)| *kind == SETTINGS && flags & 1 == 0)
        .expect("the proxy sends its settings");
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) = 2 is advertised.
    let advertised = settings
        .3
        .chunks(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(advertised, Some(2), "the limit is advertised");
    let reset = frames
        .iter()
        .find(|(kind, _, id, _)| *kind == RST_STREAM && *id == 5)
        .expect("the stream past the limit is reset");
    assert_eq!(reset.3, 7u32.to_be_bytes(), "RST_STREAM(REFUSED_STREAM)");
    assert!(
        !frames.iter().any(|(kind, ..)| *kind == GOAWAY),
        "the connection itself stays up"
    );
    assert!(
        support::eventually(Duration::from_secs(10), || async { legacy.count() == 2 }).await,
        "the two streams within the limit reach the upstream"
    );

    // Released, the two streams within the limit are answered on the same connection.
    release.add_permits(2);
    h2_read_until(&mut s, &mut buf, &mut frames, |f| {
        [1, 3].iter().all(|id| {
            f.iter()
                .any(|(kind, flags, sid, _)| *kind == HEADERS && sid == id && flags & 0x4 != 0)
        })
    })
    .await;
    for id in [1, 3] {
        assert!(
            frames
                .iter()
                .any(|(kind, _, sid, _)| *kind == HEADERS && *sid == id),
            "stream {id} answered"
        );
    }
    assert_eq!(
        legacy.count(),
        2,
        "the refused stream never reached the upstream"
    );
}

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
    let served = support::eventually(Duration::from_secs(5), || async {
        send_and_read_to_end(addr, GET_CLOSE)
            .await
            .is_some_and(|buf| buf.starts_with(b"HTTP/1.1 200"))
    })
    .await;
    assert!(served, "the WebSocket's permit is released when it closes");
}

/// hyper's server reads `Transfer-Encoding: gzip, chunked` by undoing the chunking alone, and
/// `Transfer-Encoding` is hop-by-hop: the upstream got the still-compressed bytes as if they
/// were the body. RFC 9112 6.1: a server that does not understand a transfer coding answers
/// 501, and nothing reaches an upstream.
#[tokio::test]
async fn a_request_in_an_unknown_transfer_coding_is_refused_with_501() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let (status, text) = exchange(
        proxy.ficus.proxy_addr(),
        b"POST /public/upload HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: gzip, chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 501, "{text}");
    assert_eq!(body_json(&text)["error"], "unsupported_transfer_coding");
    assert_eq!(legacy.count() + new.count(), 0);
}

/// A 413 sent before the body was read ends the connection (hyper closes it rather than read
/// an unwanted body), and RFC 9110 10.1.1 asks the server to say so. Without `Connection:
/// close` the client keeps the connection for its next request, which then fails on a
/// closed socket: a POST it cannot safely retry.
#[tokio::test]
async fn an_early_413_says_that_the_connection_closes() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = RULES.replace(
        "name = \"public\"",
        "name = \"public\"\nmax_request_body = \"1KiB\"",
    );
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    for raw in [
        // Announced over the limit, the client waiting for 100 Continue before its body.
        "POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n\r\n"
            .to_string(),
        // Chunked, cut off once past the limit, with more of it still to come.
        format!(
            "POST /public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n",
            1500,
            "y".repeat(1500)
        ),
    ] {
        let (status, text) = exchange(proxy.ficus.proxy_addr(), raw.as_bytes()).await;
        assert_eq!(status, 413, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{text}"
        );
    }
}

/// `Transfer-Encoding: chunked, chunked` says the body was chunked twice (which RFC 9112 7
/// forbids a sender to do). hyper undoes the chunking once, so the upstream got chunk
/// framing (`5\r\nhello\r\n0\r\n\r\n`) as the body: a corrupted write, and the kind of
/// disagreement about framing that request smuggling lives on. Refused like any other
/// unsupported coding.
#[tokio::test]
async fn a_request_chunked_twice_is_refused_with_501() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let (status, text) = exchange(
        proxy.ficus.proxy_addr(),
        b"POST /public/upload HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked, chunked\r\n\
          Connection: close\r\n\r\nf\r\n5\r\nhello\r\n0\r\n\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 501, "{text}");
    assert_eq!(body_json(&text)["error"], "unsupported_transfer_coding");
    assert_eq!(legacy.count() + new.count(), 0);
}

/// Reads frames until the proxy closes the connection, answering its PINGs as a live client
/// would when `pong`. `None`: still open when `within` passed.
async fn h2_read_to_close(
    s: &mut TcpStream,
    pong: bool,
    within: Duration,
) -> Option<Vec<(u8, u8, u32, Vec<u8>)>> {
    const PING: u8 = 6;
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let read = async {
        loop {
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let frame = (buf[3], buf[4], stream, buf[9..9 + len].to_vec());
                buf.drain(..9 + len);
                if pong && frame.0 == PING && frame.1 & 1 == 0 {
                    let _ = s.write_all(&h2_frame(PING, 1, 0, &frame.3)).await;
                }
                frames.push(frame);
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(frames)
}

/// HTTP/1.1 keep-alive connections are closed after `--header-read-timeout` without a
/// request; an HTTP/2 connection had no such limit, so a client that opens connections and
/// leaves them idle (answering PINGs) held `--max-connections` slots for ever.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_the_header_read_timeout() {
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const GOAWAY: u8 = 7;
    // The upstream takes longer than the idle limit: an open stream is not idleness.
    let legacy = Backend::with_handler("legacy", |req| async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        support::named_response("legacy", &req)
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = proxy.ficus.proxy_addr();
    let preface = || {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(SETTINGS, 0, 0, &[]));
        out
    };

    // One request served, however long it takes, then nothing: the connection is closed with
    // a GOAWAY, after the answer.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = preface();
    out.extend(h2_frame(HEADERS, 0x1 | 0x4, 1, &h2_get("/public/x")));
    s.write_all(&out).await.unwrap();
    let frames = h2_read_to_close(&mut s, true, Duration::from_secs(10))
        .await
        .expect("an idle h2 connection was still open 10 s later (header read timeout 300 ms)");
    let answered = frames
        .iter()
        .position(|(k, _, id, _)| *k == HEADERS && *id == 1)
        .expect("the slow request is answered");
    let goaway = frames
        .iter()
        .position(|(k, ..)| *k == GOAWAY)
        .expect("closed with GOAWAY");
    assert!(answered < goaway, "GOAWAY only once the stream was done");
    assert_eq!(legacy.count(), 1);

    // A connection that never sends a request at all is closed too, also when it does not
    // answer the PING with which a graceful GOAWAY waits for streams still in flight.
    for pong in [true, false] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&preface()).await.unwrap();
        assert!(
            h2_read_to_close(&mut s, pong, Duration::from_secs(10))
                .await
                .is_some(),
            "an h2 connection without a request (answering PINGs: {pong}) was still open 10 s later"
        );
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at once never count against
/// `--h2-max-streams`, yet each one the proxy has accepted starts an upstream request. h2
/// closes a connection resetting streams it has not accepted yet (a burst in one write); a
/// client pacing its resets a little got past that, and 2,000 reset streams made about 1,900
/// upstream requests on one connection.
#[tokio::test]
async fn an_h2_client_resetting_every_stream_is_disconnected() {
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const CANCEL: u32 = 8;
    let legacy = Backend::with_handler("legacy", |req| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        support::named_response("legacy", &req)
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let addr = proxy.ficus.proxy_addr();

    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    s.write_all(&out).await.unwrap();
    let streams = 1000u32;
    let mut sent = 0;
    for id in (1..).step_by(2).take(streams as usize) {
        let head = h2_frame(HEADERS, 0x1 | 0x4, id, &h2_get("/public/x"));
        if s.write_all(&head).await.is_err() {
            break;
        }
        // Long enough for the proxy to accept the stream before it is reset.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let reset = h2_frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        if s.write_all(&reset).await.is_err() {
            break;
        }
        sent += 1;
    }
    let frames = h2_read_to_close(&mut s, true, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!("a client that reset all {sent} of its streams was still connected")
        });
    assert!(
        legacy.count() < streams as usize / 2,
        "{} upstream requests for {streams} streams reset at once",
        legacy.count()
    );
    // ficus's guard closes the connection and counts it. On a loaded machine the proxy may
    // not accept the streams before their resets arrive; h2's own guard then closes it first,
    // with a GOAWAY `ENHANCE_YOUR_CALM`.
    const GOAWAY: u8 = 7;
    const ENHANCE_YOUR_CALM: [u8; 4] = 11u32.to_be_bytes();
    let calmed = frames
        .iter()
        .any(|(k, _, _, p)| *k == GOAWAY && p.get(4..8) == Some(&ENHANCE_YOUR_CALM[..]));
    let metrics = proxy.metrics().await;
    assert!(
        calmed || metrics.contains("ficus_requests_rejected_total{reason=\"reset_flood\"}"),
        "closed by ficus's guard (counted) or by h2's"
    );

    // Other clients are served as before.
    let (status, _) = exchange(addr, &get("/public/x")).await;
    assert_eq!(status, 200);
}

/// On shutdown an HTTP/2 client is told with a GOAWAY, and its stream in flight is answered
/// before the connection closes.
#[tokio::test]
async fn shutdown_sends_an_h2_client_goaway_and_finishes_its_stream() {
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const GOAWAY: u8 = 7;
    let legacy = Backend::with_handler("legacy", |req| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        support::named_response("legacy", &req)
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let mut s = TcpStream::connect(proxy.ficus.proxy_addr()).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(h2_frame(HEADERS, 0x1 | 0x4, 1, &h2_get("/public/x")));
    s.write_all(&out).await.unwrap();
    assert!(support::eventually(Duration::from_secs(5), || async { legacy.count() == 1 }).await);

    let support::TestProxy {
        ficus, dir: _dir, ..
    } = proxy;
    let stopping = tokio::spawn(ficus.shutdown());
    let frames = h2_read_to_close(&mut s, true, Duration::from_secs(10))
        .await
        .expect("the connection closes after its stream");
    let goaway = frames
        .iter()
        .position(|(k, ..)| *k == GOAWAY)
        .expect("GOAWAY sent");
    let end = frames
        .iter()
        .position(|(k, flags, id, _)| (*k == DATA || *k == HEADERS) && *id == 1 && flags & 1 != 0)
        .expect("the stream in flight is answered to its end");
    assert!(goaway < end, "GOAWAY came first, then the answer");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown ends")
        .unwrap();
}

/// A backend whose answer to every request is `chunks` 16 KiB chunks (`None`: without end),
/// `gap` apart. The notify fires once the proxy stops taking them: it dropped the upstream
/// body, and with it the upstream connection.
async fn streaming_backend(
    chunks: Option<usize>,
    gap: Duration,
) -> (Backend, std::sync::Arc<tokio::sync::Notify>) {
    use http_body_util::BodyExt;
    let freed = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = freed.clone();
    let backend = Backend::with_handler("legacy", move |_req| {
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, support::BoxError>(hyper::body::Frame::data(chunk)),
                rx,
            ))
        });
        let freed = notify.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while chunks.is_none_or(|n| sent < n) {
                if tx.send(vec![b'x'; 16 << 10].into()).await.is_err() {
                    freed.notify_one();
                    return;
                }
                sent += 1;
                tokio::time::sleep(gap).await;
            }
        });
        async move {
            http::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(BodyExt::boxed(http_body_util::StreamBody::new(body)))
                .unwrap()
        }
    })
    .await;
    (backend, freed)
}

/// A client that stops reading its answer held the answer's upstream connection for as
/// long as it stayed connected (and its `--max-connections` slot): an HTTP/1.1 client by
/// leaving its socket full, an HTTP/2 client by giving the stream no window.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_its_upstream_freed() {
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const INITIAL_WINDOW_SIZE: u16 = 4;
    let (legacy, freed) = streaming_backend(None, Duration::ZERO).await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.send_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = proxy.ficus.proxy_addr();
    let within = |what: &'static str| {
        let freed = freed.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), freed.notified())
                .await
                .unwrap_or_else(|_| panic!("{what}: the upstream body was still held 10 s later"));
        }
    };

    // HTTP/1.1: the answer starts, then the client reads nothing more.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&get("/public/endless")).await.unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "answered");
    within("HTTP/1.1").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the HTTP/1.1 connection was still open 10 s later"
    );

    // HTTP/2: a window of 0 for every stream; the head comes, no data can.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut window = INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
    window.extend(0u32.to_be_bytes());
    out.extend(h2_frame(SETTINGS, 0, 0, &window));
    out.extend(h2_frame(HEADERS, 0x1 | 0x4, 1, &h2_get("/public/endless")));
    s.write_all(&out).await.unwrap();
    within("HTTP/2").await;
    let frames = h2_read_to_close(&mut s, true, Duration::from_secs(10))
        .await
        .expect("the HTTP/2 connection was still open 10 s later");
    assert!(frames.iter().any(|(k, _, id, _)| *k == HEADERS && *id == 1));
    assert!(!frames.iter().any(|(k, _, id, _)| *k == DATA && *id == 1));

    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("ficus_requests_rejected_total{reason=\"client_send_timeout\"} 2"),
        "both counted"
    );

    // Other clients are served as before.
    let (status, _) = exchange(addr, &get("/admin/x")).await;
    assert_eq!(status, 200);
}

/// The send timeout counts only the client's silence: an answer whose upstream pauses
/// longer than it between chunks reaches a reading client whole, over both protocols.
#[tokio::test]
async fn a_slow_upstream_answer_is_not_cut_by_the_send_timeout() {
    let (legacy, _) = streaming_backend(Some(5), Duration::from_millis(250)).await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.limits.send_timeout = Duration::from_millis(100);
    })
    .await;
    let h1 = support::client();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (client, version) in [(h1, http::Version::HTTP_11), (h2, http::Version::HTTP_2)] {
        let resp = client.get(proxy.url("/public/slow")).send().await.unwrap();
        assert_eq!(resp.version(), version);
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), 5 * (16 << 10), "{version:?}: the whole answer");
    }
}

/// Resident memory of a process, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kib << 10
}

/// ficus as its own process (so that its resident memory is its own) in front of a legacy
/// backend whose answers never end, killed when dropped.
struct SpawnedFicus {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _backends: (Backend, Backend),
}

impl Drop for SpawnedFicus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SpawnedFicus {
    async fn start() -> SpawnedFicus {
        let (legacy, _) = streaming_backend(None, Duration::ZERO).await;
        let new = Backend::start("new").await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
        let port = support::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
            .arg("serve")
            .arg("--rules")
            .arg(dir.path())
            .args(["--legacy", &legacy.url().to_string()])
            .args(["--new", &new.url().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", support::free_port()),
            ])
            .arg("--store")
            .arg(format!("sqlite:{}", dir.path().join("r.db").display()))
            .arg("--spool-dir")
            .arg(dir.path().join("spool"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let ficus = SpawnedFicus {
            child,
            addr,
            _dir: dir,
            _backends: (legacy, new),
        };
        assert!(
            support::eventually(Duration::from_secs(20), || async {
                TcpStream::connect(addr).await.is_ok()
            })
            .await,
            "ficus never listened"
        );
        assert_eq!(exchange(addr, &get("/admin/x")).await.0, 200);
        ficus
    }

    /// How much ficus's resident memory grew while `attack` ran and its buffers filled,
    /// in MiB. The sockets `attack` returns stay open, unread, until then.
    async fn growth_under<F, Fut>(&self, attack: F) -> u64
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Vec<TcpStream>>,
    {
        let pid = self.child.id();
        let before = rss_bytes(pid);
        let sockets = attack(self.addr).await;
        // The buffers fill within a second or so; watch until the memory stops growing.
        let mut peak = before;
        let mut steady = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = rss_bytes(pid);
            if now > peak {
                peak = now;
                steady = 0;
            } else {
                steady += 1;
                if steady >= 20 {
                    break;
                }
            }
        }
        drop(sockets);
        peak.saturating_sub(before) >> 20
    }
}

/// A client socket that takes in little before its window closes.
async fn small_window_connect(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An HTTP/2 client that opens its windows wide and then reads nothing got every stream's
/// answer buffered in ficus up to hyper's default of 400 KiB a stream, and each stream's
/// upstream read buffer grew to as much again: one such connection of 100 streams grew ficus
/// by about 134 MiB (release build), so a few dozen of them could take a replica's memory.
#[tokio::test]
async fn an_h2_client_that_reads_nothing_costs_bounded_memory() {
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const WINDOW_UPDATE: u8 = 8;
    const INITIAL_WINDOW_SIZE: u16 = 4;
    const STREAMS: usize = 100;
    let ficus = SpawnedFicus::start().await;
    let grown = ficus
        .growth_under(|addr| async move {
            let mut s = small_window_connect(addr).await;
            let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let mut window = INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
            window.extend((i32::MAX as u32).to_be_bytes());
            out.extend(h2_frame(SETTINGS, 0, 0, &window));
            let more = i32::MAX as u32 - 65_535;
            out.extend(h2_frame(WINDOW_UPDATE, 0, 0, &more.to_be_bytes()));
            for id in (1..).step_by(2).take(STREAMS) {
                out.extend(h2_frame(HEADERS, 0x1 | 0x4, id, &h2_get("/public/endless")));
            }
            s.write_all(&out).await.unwrap();
            vec![s]
        })
        .await;
    assert!(
        grown < 64,
        "one HTTP/2 connection of {STREAMS} unread streams grew ficus by {grown} MiB"
    );
}

/// The same over HTTP/1.1: each connection whose client reads nothing held the upstream
/// connection's read buffer, grown to about 400 KiB, and the chunks read into it; 100 such
/// connections grew ficus by about 112 MiB (release build), and `--max-connections` allows
/// 10,000.
#[tokio::test]
async fn http1_clients_that_read_nothing_cost_bounded_memory() {
    const CONNECTIONS: usize = 100;
    let ficus = SpawnedFicus::start().await;
    let grown = ficus
        .growth_under(|addr| async move {
            let mut sockets = Vec::new();
            for _ in 0..CONNECTIONS {
                let mut s = small_window_connect(addr).await;
                s.write_all(&get("/public/endless")).await.unwrap();
                sockets.push(s);
            }
            sockets
        })
        .await;
    assert!(
        grown < 64,
        "{CONNECTIONS} HTTP/1.1 connections left unread grew ficus by {grown} MiB"
    );
}

#[tokio::test]
async fn a_request_target_with_userinfo_is_refused() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    // Routing would read `shop.test`; the upstream would get `Host: evil.test@shop.test`.
    let raw = b"GET http://evil.test@shop.test/public/x HTTP/1.1\r\nHost: shop.test\r\n\
                Connection: close\r\n\r\n";
    let (status, text) = exchange(proxy.ficus.proxy_addr(), raw).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("userinfo"), "{text}");
    assert_eq!(legacy.count(), 0);
    // Without userinfo, the absolute form is served.
    let raw =
        b"GET http://shop.test/public/x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    assert_eq!(exchange(proxy.ficus.proxy_addr(), raw).await.0, 200);
    assert_eq!(legacy.last().headers["host"], "shop.test");
}
