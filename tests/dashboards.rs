//! The dashboards and alerts are proven against the real tools: `promtool` checks and unit-tests
//! the alerting rules and the `/metrics` output, and a real Prometheus on loopback scrapes a
//! ficus under traffic and evaluates every PromQL expression of the dashboards, which must be
//! valid and return series.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use http::Response;
use serde_json::{Value, json};
use support::{Backend, TestProxy, client, dead_addr, free_port, full};

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (scripts/test installs Debian's prometheus)");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alerting_rules_are_valid_and_pass_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert!(ok, "{out}");
}

/// Every `expr` in the dashboards, with Grafana's variables given test values.
fn dashboard_expressions() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards");
    let mut out = Vec::new();
    for file in ["migration-overview.json", "proxy-health.json"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$route", ".*");
                out.push((format!("{file}: {}", panel["title"]), expr));
            }
        }
    }
    assert!(
        out.len() >= 20,
        "expected the dashboards' expressions, found {}",
        out.len()
    );
    out
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_evaluates_every_dashboard_expression() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                json!({"items": [{"price": 1}], "ok": true}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |req| async move {
        // Half the answers differ, so that both comparison results exist.
        let price = if req.uri().path().ends_with('0') {
            1
        } else {
            2
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                json!({"items": [{"price": price}], "ok": true}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let rules = format!(
        "[upstreams]\nbroken = \"http://{}\"\n\n[[route]]\nname = \"orders\"\n[route.match]\npath_prefix = \"/api/\"\n[route.shadow]\n\n[[route]]\nname = \"down\"\nlegacy = \"broken\"\n[route.match]\npath_prefix = \"/down/\"\n",
        dead_addr()
    );
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    // Reloads, one rejected and one accepted, so that both series exist.
    let good = std::fs::read_to_string(proxy.rules_file()).unwrap();
    // `ficus_rules_last_reload_success` says whether the files on disk are the rules in
    // force, for as long as they are not: the counter's increase ages out of any window.
    let last_success = |text: String| {
        text.lines()
            .find_map(|l| l.strip_prefix("ficus_rules_last_reload_success "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(last_success(proxy.metrics().await), Some(1.0));
    std::fs::write(proxy.rules_file(), "not [ toml").unwrap();
    assert!(proxy.ficus.reload().is_err());
    assert_eq!(last_success(proxy.metrics().await), Some(0.0));
    std::fs::write(proxy.rules_file(), &good).unwrap();
    assert!(proxy.ficus.reload().is_ok());
    assert_eq!(last_success(proxy.metrics().await), Some(1.0));

    // Prometheus scraping the admin port every second.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ficus\n    static_configs:\n      - targets: [\"{}\"]\n",
            proxy.ficus.admin_addr()
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus must be installed (scripts/test installs Debian's prometheus)"),
    );
    let c = client();
    let query = |expr: String| {
        let c = c.clone();
        let encoded: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let url = format!("http://127.0.0.1:{port}/api/v1/query?query={encoded}");
        async move {
            match c.get(url).send().await {
                Ok(resp) => resp.json::<Value>().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        }
    };

    // Traffic while Prometheus scrapes, until it has several samples of everything.
    // Bounded: at most 60 s, the time a slow machine may need to start Prometheus.
    let mut scraped = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while tokio::time::Instant::now() < deadline {
        for _ in 0..10 {
            i += 1;
            c.get(proxy.url(&format!("/api/{i}"))).send().await.unwrap();
            c.get(proxy.url("/down/x")).send().await.unwrap();
        }
        let up = query(r#"count_over_time(up{job="ficus"}[1m])"#.into()).await;
        if up["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<u32>().ok())
            >= Some(4)
        {
            scraped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(scraped, "Prometheus never scraped ficus four times");

    let mut failures = Vec::new();
    for (panel, expr) in dashboard_expressions() {
        let answer = query(expr.clone()).await;
        let ok = answer["status"] == "success"
            && answer["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty());
        if !ok {
            failures.push(format!("{panel}\n  {expr}\n  -> {answer}"));
        }
    }
    assert!(
        failures.is_empty(),
        "expressions invalid or empty:\n{}",
        failures.join("\n")
    );

    // And promtool is happy with the exposition itself.
    let text = proxy.metrics().await;
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "{out}");
}
