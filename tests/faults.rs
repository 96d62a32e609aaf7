//! Faults a user can expect, each end to end on loopback: a shadow side that answers garbage,
//! an authority that is down or too slow and then comes back, a Redis that stalls, a spool that
//! fills, file descriptors running out, and secrets that must never reach the logs.
//! The tests in this file run one at a time: two of them count the process's descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Response;
use serde_json::{Value, json};
use support::{Backend, RedisServer, TestProxy, client, dead_addr, eventually, free_port, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHADOWED: &str = r#"
[[route]]
name = "orders"
[route.match]
path_prefix = "/api/"
[route.shadow]
"#;

const PLAIN: &str = r#"
[[route]]
name = "orders"
[route.match]
path_prefix = "/api/"
"#;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

async fn json_backend(name: &str, body: Value) -> Backend {
    Backend::with_handler(name, move |_req| {
        let body = body.to_string();
        async move {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        }
    })
    .await
}

#[tokio::test]
async fn a_shadow_side_answering_garbage_changes_nothing_for_clients() {
    let _serial = SERIAL.lock().await;
    // Not HTTP at all: a line of noise, then the connection closes.
    let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"SPDY/9 ??? {{{{ not http\r\n\x00\x01\x02\r\n\r\n")
                    .await;
            });
        }
    });
    let legacy = json_backend("legacy", json!({"id": 1})).await;
    let new_url = format!("http://{garbage_addr}").parse().unwrap();
    let proxy = TestProxy::start(SHADOWED, legacy.url(), new_url).await;
    let c = client();
    for i in 0..20 {
        let resp = c
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"id": 1}));
    }
    // Every one of them ends as a counted shadow error, and as a divergence: as the
    // authority, this new side would have given each client a 502.
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.ficus.proxy().shadow().stats("orders").outcomes["shadow_error"] == 20
        })
        .await
    );
    let records = proxy.wait_records(20).await;
    assert_eq!(records.len(), 20);
    assert!(
        records
            .iter()
            .all(|r| r.new.status == 502 && r.legacy.status == 200)
    );
    task.abort();
}

#[tokio::test]
async fn an_authority_that_is_down_then_back_gets_502_then_200_and_leaks_nothing() {
    let _serial = SERIAL.lock().await;
    let addr = dead_addr();
    let new = Backend::start("new").await;
    let legacy_url = format!("http://{addr}").parse().unwrap();
    let proxy = TestProxy::start(PLAIN, legacy_url, new.url()).await;
    let c = client();
    let before = open_fds();
    for i in 0..200 {
        let resp = c
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "upstream_unavailable");
        assert_eq!(body["side"], "legacy");
    }
    // Refused connects leave no descriptor behind.
    let after_down = open_fds();
    assert!(
        after_down <= before + 8,
        "descriptors grew from {before} to {after_down} while the authority was down"
    );

    // The authority comes back on its old address: the very next requests succeed.
    let legacy = Backend::start_at(addr, "legacy").await;
    let resp = c.get(proxy.url("/api/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    for i in 0..300 {
        let resp = c
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(legacy.count(), 301);
    // Pooled upstream connections are reused, not opened per request.
    let after_up = open_fds();
    assert!(
        after_up <= after_down + 16,
        "descriptors grew from {after_down} to {after_up} over 300 requests"
    );
}

#[tokio::test]
async fn an_authority_that_times_out_gets_504_then_recovers() {
    let _serial = SERIAL.lock().await;
    let slow = Arc::new(AtomicBool::new(true));
    let flag = slow.clone();
    let legacy = Backend::with_handler("legacy", move |_req| {
        let slow = flag.load(Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Response::builder().body(full("ok")).unwrap()
        }
    })
    .await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start_with(PLAIN, legacy.url(), new.url(), |c| {
        c.upstream_timeout = Duration::from_millis(300);
    })
    .await;
    let c = client();
    for _ in 0..3 {
        let resp = c.get(proxy.url("/api/orders/1")).send().await.unwrap();
        assert_eq!(resp.status(), 504);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "upstream_timeout");
    }
    slow.store(false, Ordering::SeqCst);
    let resp = c.get(proxy.url("/api/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

fn redis_cli(port: &str, args: &[&str]) -> std::process::Child {
    Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_stalled_redis_and_a_full_spool_never_fail_a_client_and_every_drop_is_counted() {
    let _serial = SERIAL.lock().await;
    // Redis 7 refuses DEBUG (so DEBUG SLEEP stalled nothing) unless told otherwise.
    let mut redis = RedisServer::start_with(&["--enable-debug-command", "local"]).await;
    let port = redis
        .url()
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let legacy = json_backend("legacy", json!({"total": 10})).await;
    let new = json_backend("new", json!({"total": 11})).await;
    let url = redis.url();
    let proxy = TestProxy::start_with(SHADOWED, legacy.url(), new.url(), |c| {
        c.store = url;
        c.writer.store_timeout = Duration::from_millis(500);
        // Room for a few records only.
        c.writer.spool_max_bytes = 16 << 10;
    })
    .await;
    let c = client();

    // Redis stalls for 3 s (DEBUG SLEEP blocks it): clients do not notice, records wait in
    // the spool and arrive afterwards.
    let mut sleeper = redis_cli(&port, &["DEBUG", "SLEEP", "3"]);
    let addr = format!("127.0.0.1:{port}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            !support::redis_ping(&addr).await
        })
        .await,
        "Redis never stalled"
    );
    // Fewer records than the small spool holds (about 15 of these), so that none is dropped
    // whether they reach the writer during the stall (spooled) or after it.
    for i in 0..10 {
        let resp = c
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Waits without blocking this runtime's thread, which also runs ficus's writer.
    while sleeper.try_wait().unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        proxy.wait_records(10).await.len(),
        10,
        "every record arrives"
    );
    let writer = proxy.ficus.writer().stats();
    assert_eq!(writer.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(
        writer.spooled.load(Ordering::Relaxed),
        10,
        "the records waited in the spool"
    );

    // Redis down and a spool that fills: clients still get every answer, and what cannot be
    // kept is counted, by reason, never silently lost.
    let spooled0 = writer.spooled.load(Ordering::Relaxed);
    redis.kill();
    for i in 0..120 {
        let resp = c
            .get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            writer.spooled.load(Ordering::Relaxed) - spooled0
                + writer.dropped.load(Ordering::Relaxed)
                >= 120
        })
        .await
    );
    let dropped = writer.dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "a 16 KiB spool cannot hold 120 records");
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "ficus_store_dropped_total{reason=\"spool_full\"}") as u64,
        dropped
    );

    // Redis back: everything the spool held is delivered; kept + dropped = diverged.
    redis.restart().await;
    let expected = 130 - dropped as usize;
    let records = proxy.wait_records(expected).await;
    assert_eq!(records.len(), expected);
}

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

/// A child process that is killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn out_of_file_descriptors_ficus_keeps_running_and_recovers_and_logs_no_secret() {
    let _serial = SERIAL.lock().await;
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), SHADOWED).unwrap();
    let (port, admin) = (free_port(), free_port());
    // A low descriptor limit, as a badly configured container would have.
    let mut child = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 128 && exec \"$0\" \"$@\"")
            .arg(FICUS)
            .arg("serve")
            .env("FICUS_RULES", dir.path())
            .env("FICUS_LEGACY", legacy.url().to_string())
            .env("FICUS_NEW", new.url().to_string())
            .env("FICUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("FICUS_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env(
                "FICUS_STORE",
                format!("sqlite:{}", dir.path().join("r.db").display()),
            )
            .env("FICUS_SPOOL_DIR", dir.path().join("spool"))
            .env("FICUS_WORKERS", "1")
            .env("FICUS_HEADER_READ_TIMEOUT", "2s")
            .env("FICUS_ADMIN_TOKEN", "ops=admin-secret-123")
            .env("FICUS_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "ficus never became ready"
    );
    let url = format!("http://127.0.0.1:{port}/api/orders/1");
    let resp = c
        .get(&url)
        .header("authorization", "Bearer client-secret-xyz")
        .header("cookie", "session=cookie-secret-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let api = c
        .get(format!("http://127.0.0.1:{admin}/api/divergences"))
        .bearer_auth("admin-secret-123")
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);

    // Flood: far more connections than descriptors. Each gets a request head started, so
    // ficus must read them; those it cannot accept wait in the backlog.
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            let _ = s.write_all(b"GET /api/orders/1 HTTP/1.1\r\n").await;
            flood.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "ficus exited when descriptors ran out"
    );
    drop(flood);

    // The flood gone (and the half-sent heads timed out), ficus serves again.
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "ficus did not recover after the descriptor flood"
    );
    assert!(c.get(&ready).send().await.unwrap().status().is_success());

    // Stop it and read everything it logged.
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let mut stderr = child.0.stderr.take().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
    assert!(
        logs.contains("accept failed"),
        "the test never ran ficus out of descriptors"
    );
    for secret in ["client-secret-xyz", "cookie-secret-abc", "admin-secret-123"] {
        assert!(!logs.contains(secret), "`{secret}` reached the logs");
    }
}
