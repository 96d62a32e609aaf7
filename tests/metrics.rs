//! End to end: `/metrics` on the admin port, in Prometheus text format, with the contract names.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use http::Response;
use serde_json::json;
use support::{Backend, TestProxy, client, dead_addr, full, metric_value};

#[tokio::test]
async fn metrics_expose_traffic_shadow_outcomes_and_divergences() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(
                json!({"items": [{"price": 1}], "total": 1}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |_req| async {
        Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(full(
                json!({"items": [{"price": 2}], "total": 1}).to_string(),
            ))
            .unwrap()
    })
    .await;
    let rules = format!(
        "[upstreams]\nbroken = \"http://{}\"\n\n[[route]]\nname = \"m-orders\"\n[route.match]\npath_prefix = \"/api/\"\n[route.shadow]\n\n[[route]]\nname = \"m-down\"\nlegacy = \"broken\"\n[route.match]\npath_prefix = \"/down/\"\n",
        dead_addr()
    );
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    let c = client();
    for i in 0..3 {
        assert_eq!(
            c.get(proxy.url(&format!("/api/{i}")))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    c.post(proxy.url("/api/x")).send().await.unwrap();
    assert_eq!(
        c.get(proxy.url("/down/x")).send().await.unwrap().status(),
        502
    );
    assert_eq!(proxy.wait_records(3).await.len(), 3);

    // The store and the writer settle within a second; poll until the records are counted.
    let mut text = String::new();
    let mut complete = false;
    for _ in 0..200 {
        let resp = c.get(proxy.admin_url("/metrics")).send().await.unwrap();
        assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4");
        text = resp.text().await.unwrap();
        if metric_value(
            &text,
            r#"ficus_divergences_total{route="m-orders",class="unclassified"}"#,
        ) == Some(3.0)
        {
            complete = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(complete, "{text}");
    let expect = |series: &str, want: f64| {
        assert_eq!(
            metric_value(&text, series),
            Some(want),
            "{series} in\n{text}"
        );
    };
    expect(
        r#"ficus_requests_total{route="m-orders",authority="legacy",status="2xx"}"#,
        4.0,
    );
    expect(
        r#"ficus_requests_total{route="m-down",authority="legacy",status="5xx"}"#,
        1.0,
    );
    expect(
        r#"ficus_upstream_errors_total{route="m-down",side="legacy",kind="connect"}"#,
        1.0,
    );
    expect(
        r#"ficus_shadow_total{route="m-orders",outcome="compared"}"#,
        3.0,
    );
    expect(
        r#"ficus_shadow_total{route="m-orders",outcome="skipped_write"}"#,
        1.0,
    );
    expect(
        r#"ficus_comparisons_total{route="m-orders",result="diverged"}"#,
        3.0,
    );
    // Outcomes and results that did not happen are exported at 0, so that ratios are defined.
    expect(
        r#"ficus_shadow_total{route="m-orders",outcome="shadow_timeout"}"#,
        0.0,
    );
    expect(
        r#"ficus_comparisons_total{route="m-orders",result="match"}"#,
        0.0,
    );
    expect(
        r#"ficus_status_pairs_total{route="m-orders",legacy="2xx",new="5xx"}"#,
        3.0,
    );
    expect(
        r#"ficus_divergent_fields_total{route="m-orders",path="/items/*/price"}"#,
        3.0,
    );
    expect(
        r#"ficus_divergent_fields_total{route="m-orders",path="status"}"#,
        3.0,
    );
    expect(
        r#"ficus_request_duration_seconds_count{route="m-orders",authority="legacy"}"#,
        4.0,
    );
    expect(
        r#"ficus_upstream_duration_seconds_count{route="m-orders",side="new"}"#,
        3.0,
    );
    // A gauge shared with the other test of this binary, which may have shadows in flight.
    assert!(
        metric_value(&text, "ficus_shadow_inflight").is_some(),
        "{text}"
    );
    expect(r#"ficus_build_info{version="0.1.0"}"#, 1.0);
    assert!(text.contains(r#"ficus_request_duration_seconds_bucket{route="m-orders",authority="legacy",le="0.0005"}"#), "{text}");
    assert!(text.contains("# TYPE ficus_requests_total counter"));
    assert!(text.contains("ficus_store_queue_depth"));
}

/// Random payload paths cannot blow up label cardinality: at most 100 paths per route have a
/// series of their own, the rest are counted under `_other`.
#[tokio::test]
async fn divergent_field_labels_stay_bounded() {
    let legacy = Backend::with_handler("legacy", |req| async move {
        let key = req.uri().path().trim_start_matches('/').replace('/', "-");
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({ key: 1 }).to_string()))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full("{}"))
            .unwrap()
    })
    .await;
    let rules = "[[route]]\nname = \"m-cardinality\"\n[route.shadow]\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    for i in 0..150 {
        c.get(proxy.url(&format!("/field/{i}")))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(proxy.wait_records(150).await.len(), 150);
    let text = proxy.metrics().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(r#"ficus_divergent_fields_total{route="m-cardinality""#))
        .collect();
    assert_eq!(series.len(), 101, "100 paths and _other");
    assert_eq!(
        metric_value(
            &text,
            r#"ficus_divergent_fields_total{route="m-cardinality",path="_other"}"#
        ),
        Some(50.0)
    );
}

/// The alerts on rejected reloads and dropped records use `increase()`, which needs a sample
/// before the first event: a counter that only appears, at 1, with the first rejected reload
/// never shows an increase, and the alert never fires. So these series exist at 0 from start.
#[tokio::test]
async fn reload_and_drop_counters_are_exported_at_zero_before_the_first_event() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start("[[route]]\nname = \"m-quiet\"\n", legacy.url(), new.url()).await;
    let text = proxy.metrics().await;
    for series in [
        r#"ficus_rules_reloads_total{result="ok"}"#,
        r#"ficus_rules_reloads_total{result="error"}"#,
        r#"ficus_store_dropped_total{reason="queue_full"}"#,
        r#"ficus_store_dropped_total{reason="spool_full"}"#,
        r#"ficus_store_dropped_total{reason="spool_error"}"#,
        r#"ficus_store_dropped_total{reason="spool_corrupt"}"#,
    ] {
        assert_eq!(
            metric_value(&text, series),
            Some(0.0),
            "{series} in\n{text}"
        );
    }
}

/// Noise probes (`shadow.noise_probe`: legacy asked a second time to learn noisy fields) are
/// ficus's own extra calls, not traffic: counted with legacy's upstream calls, they inflated
/// its request rate and bent its latency percentiles on the dashboards (the legacy-vs-new
/// panel compared legacy with a tail of probes against new without). They have metrics of
/// their own, and legacy's series count only the calls that served or shadowed a request.
#[tokio::test]
async fn noise_probes_are_not_counted_as_legacy_traffic() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = calls.clone();
    let legacy = Backend::with_handler("legacy", move |req| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            // The probe of `/p/slow` outlasts the shadow timeout.
            if req.headers().contains_key("x-ficus-shadow") && req.uri().path().ends_with("slow") {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"n": n, "price": 1}).to_string()))
                .unwrap()
        }
    })
    .await;
    let new = Backend::with_handler("new", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"n": 0, "price": 2}).to_string()))
            .unwrap()
    })
    .await;
    let rules =
        "[[route]]\nname = \"m-probed\"\n[route.shadow]\nnoise_probe = 1.0\ntimeout = \"500ms\"\n";
    // The store and the spool out of the rules directory: this test outlasts the watcher's
    // settle time after its records are written, and a reload they set off would move the
    // reload counters that another test of this binary expects at 0.
    let data = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start_with(rules, legacy.url(), new.url(), |config| {
        config.store = format!("sqlite:{}", data.path().join("records.db").display());
        config.writer.spool_dir = data.path().join("spool");
    })
    .await;
    let c = client();
    for path in ["/p/1", "/p/2", "/p/slow"] {
        assert_eq!(c.get(proxy.url(path)).send().await.unwrap().status(), 200);
    }
    // Each outcome is counted once its probe has ended. One rendering reads the series one
    // after the other while the last exchange may be counting: the page after the one that
    // shows the three outcomes holds everything counted before them.
    for _ in 0..200 {
        let text = proxy.metrics().await;
        if metric_value(
            &text,
            r#"ficus_shadow_total{route="m-probed",outcome="compared"}"#,
        ) == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = proxy.metrics().await;
    assert_eq!(legacy.count(), 6, "three requests and three probes");
    let expect = |series: &str, want: Option<f64>| {
        assert_eq!(metric_value(&text, series), want, "{series} in\n{text}");
    };
    expect(
        r#"ficus_upstream_duration_seconds_count{route="m-probed",side="legacy"}"#,
        Some(3.0),
    );
    expect(
        r#"ficus_upstream_errors_total{route="m-probed",side="legacy",kind="timeout"}"#,
        None,
    );
    expect(
        r#"ficus_noise_probe_duration_seconds_count{route="m-probed"}"#,
        Some(2.0),
    );
    expect(
        r#"ficus_noise_probe_errors_total{route="m-probed",kind="timeout"}"#,
        Some(1.0),
    );
}
