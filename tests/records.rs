//! End to end: divergences from real traffic become durable records, in SQLite and in Redis,
//! and nothing is lost or doubled when Redis dies, when ficus restarts, or when it crashes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use http::Response;
use serde_json::json;
use support::{Backend, RedisServer, TestProxy, client, eventually, free_port, full};

const RULES: &str = r#"
[[route]]
name = "orders"
[route.shadow]
[route.compare]
redact = ["/card/number"]
redact_query = ["sig"]
"#;

/// Legacy and new disagree on `total`, so every mirrored request diverges.
async fn backends() -> (Backend, Backend) {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                json!({"total": 10, "card": {"number": "4111111111111111"}}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                json!({"total": 11, "card": {"number": "4222222222222222"}}).to_string(),
            ))
            .unwrap()
    })
    .await;
    (legacy, new)
}

async fn traffic(proxy: &TestProxy, n: usize) {
    let c = client();
    for i in 0..n {
        let resp = c
            .get(proxy.url(&format!(
                "/api/orders/{i}?page=2&sig=t0psecretsig&access_token=t0ken"
            )))
            .header("authorization", "Bearer s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "a client request failed");
    }
}

#[tokio::test]
async fn sqlite_records_survive_a_restart_and_are_redacted() {
    let (legacy, new) = backends().await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    traffic(&proxy, 5).await;
    let records = proxy.wait_records(5).await;
    assert_eq!(records.len(), 5);
    let text = serde_json::to_string(&records).unwrap();
    assert!(
        // Whole numbers: ids and fingerprints are hex, and may hold "4111" by chance.
        !text.contains("s3cret")
            && !text.contains("4111111111111111")
            && !text.contains("4222222222222222")
            && !text.contains("t0psecretsig")
            && !text.contains("t0ken"),
        "{text}"
    );
    assert!(text.contains("[redacted]"));
    assert_eq!(
        records[0].request.query.as_deref(),
        Some("page=2&sig=[redacted]&access_token=[redacted]")
    );
    // The same fingerprint for the same root cause.
    assert!(
        records
            .iter()
            .all(|r| r.fingerprint == records[0].fingerprint)
    );

    let TestProxy { ficus, dir, .. } = proxy;
    ficus.shutdown().await;
    let mut config = ficus::Config::new(dir.path(), legacy.url(), new.url());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.store = format!("sqlite:{}", dir.path().join("records.db").display());
    config.writer.spool_dir = dir.path().join("spool");
    let again = ficus::Ficus::start(config).await.unwrap();
    let page = again
        .store()
        .list(&ficus::store::Filter::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 5);
    let (total, _) = again.store().counts("orders", 0).await.unwrap();
    assert_eq!((total.comparisons, total.divergences), (5, 5));
    again.shutdown().await;
}

#[tokio::test]
async fn two_replicas_share_one_redis() {
    let redis = RedisServer::start().await;
    let (legacy, new) = backends().await;
    let start = |name: &'static str| {
        let url = redis.url();
        let (l, n) = (legacy.url(), new.url());
        async move {
            TestProxy::start_with(RULES, l, n, |c| {
                c.store = url;
                c.records.instance = name.into();
            })
            .await
        }
    };
    let a = start("replica-a").await;
    let b = start("replica-b").await;
    traffic(&a, 4).await;
    traffic(&b, 6).await;
    // Each replica sees the other's records.
    let seen_by_a = a.wait_records(10).await;
    assert_eq!(seen_by_a.len(), 10);
    assert_eq!(
        seen_by_a
            .iter()
            .filter(|r| r.instance == "replica-b")
            .count(),
        6
    );
    assert_eq!(b.records().await.len(), 10);
    // Counters add up across replicas.
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.ficus
                .store()
                .counts("orders", 0)
                .await
                .unwrap()
                .0
                .comparisons
                == 10
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_traffic_loses_and_doubles_nothing() {
    let mut redis = RedisServer::start().await;
    let (legacy, new) = backends().await;
    let url = redis.url();
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.store = url).await;
    traffic(&proxy, 20).await;
    assert_eq!(proxy.wait_records(20).await.len(), 20);

    redis.kill();
    traffic(&proxy, 30).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy
                .ficus
                .writer()
                .stats()
                .spooled
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 30
        })
        .await,
        "records were not spooled while Redis was down"
    );

    redis.restart().await;
    traffic(&proxy, 10).await;
    let records = proxy.wait_records(60).await;
    assert_eq!(records.len(), 60, "every record arrives once Redis is back");
    let ids: std::collections::HashSet<_> = records.iter().map(|r| &r.id).collect();
    assert_eq!(ids.len(), 60, "no duplicates");
    let stats = proxy.ficus.writer().stats();
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

/// A child process that is killed however the test ends (a panic included).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// ficus is SIGKILLed with records in its spool (Redis down); the next start delivers them.
#[tokio::test]
async fn a_spool_left_by_a_crash_is_delivered_on_the_next_start() {
    let (legacy, new) = backends().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let redis_port = free_port();
    let spawn = |store: String| {
        let (port, admin) = (free_port(), free_port());
        let child = KillOnDrop(
            Command::new(FICUS)
                .arg("serve")
                .args(["--rules", dir.path().to_str().unwrap()])
                .args([
                    "--legacy",
                    &legacy.url().to_string(),
                    "--new",
                    &new.url().to_string(),
                ])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--store", &store])
                .arg("--spool-dir")
                .arg(dir.path().join("spool"))
                .args(["--log", "warn"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        (child, port, admin)
    };
    let redis_url = format!("redis://127.0.0.1:{redis_port}/0");
    let (first, port, admin) = spawn(redis_url.clone());
    let c = client();
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.get(format!("http://127.0.0.1:{admin}/readyz"))
                .send()
                .await
                .is_ok()
        })
        .await
    );
    for i in 0..8 {
        let resp = c
            .get(format!("http://127.0.0.1:{port}/api/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let spool = dir.path().join("spool").join("records.jsonl");
    assert!(
        eventually(Duration::from_secs(15), || async {
            std::fs::read_to_string(&spool).is_ok_and(|s| s.lines().count() == 8)
        })
        .await,
        "records never reached the spool"
    );
    drop(first); // SIGKILL

    // Redis comes up on the address ficus was given; a new ficus delivers the spool.
    let redis = RedisServer::start_on(redis_port).await;
    let (second, _, _) = spawn(redis_url.clone());
    let store = ficus::store::open(&redis.url(), "ficus:").await.unwrap();
    let delivered = eventually(Duration::from_secs(20), || async {
        store
            .list(&ficus::store::Filter::default())
            .await
            .is_ok_and(|p| p.items.len() == 8)
    })
    .await;
    drop(second);
    assert!(delivered, "the spool was not delivered after the restart");
}

/// `rediss://` with a password, against a real TLS redis-server whose certificate comes from a
/// private CA (trusted through SSL_CERT_FILE, as an operator would add it to the trust store).
#[tokio::test]
async fn records_reach_redis_over_tls_with_a_password() {
    let (legacy, new) = backends().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = support::pki(dir.path());
    let redis_port = free_port();
    let _redis = KillOnDrop(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--requirepass",
                "s3cret",
                "--save",
                "",
            ])
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .spawn()
            .unwrap(),
    );
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&pki.ca)
            .args([
                "-h",
                "localhost",
                "-p",
                &redis_port.to_string(),
                "-a",
                "s3cret",
                "--no-auth-warning",
            ])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            cli(&["PING"]) == "PONG"
        })
        .await,
        "TLS redis-server did not start: {} / cli: {}",
        std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default(),
        cli(&["PING"])
    );
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let (port, admin) = (free_port(), free_port());
    let _ficus = KillOnDrop(
        Command::new(FICUS)
            .arg("serve")
            .args(["--rules", dir.path().join("rules.toml").to_str().unwrap()])
            .args([
                "--legacy",
                &legacy.url().to_string(),
                "--new",
                &new.url().to_string(),
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args([
                "--store",
                &format!("rediss://:s3cret@localhost:{redis_port}/0"),
            ])
            .arg("--spool-dir")
            .arg(dir.path().join("spool"))
            .args(["--log", "warn"])
            .env("SSL_CERT_FILE", &pki.ca)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.get(format!("http://127.0.0.1:{admin}/readyz"))
                .send()
                .await
                .is_ok()
        })
        .await
    );
    for i in 0..3 {
        let resp = c
            .get(format!("http://127.0.0.1:{port}/api/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let stored = eventually(Duration::from_secs(15), || async {
        cli(&["ZCARD", "ficus:idx:all"]) == "3"
    })
    .await;
    assert!(stored, "records did not reach Redis over TLS");
}
