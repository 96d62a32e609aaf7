//! End to end: the reconciliation API over real records from real traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use http::Response;
use serde_json::{Value, json};
use support::{Backend, TestProxy, client, full};

const RULES: &str = r#"
[[route]]
name = "orders"
[route.match]
path_prefix = "/api/orders/"
[route.shadow]

[[route]]
name = "users"
[route.match]
path_prefix = "/api/users/"
[route.shadow]
"#;

async fn diverging(name: &'static str, total: u32) -> Backend {
    Backend::with_handler(name, move |req| {
        let path = req.uri().path().to_string();
        async move {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"path": path, "total": total}).to_string()))
                .unwrap()
        }
    })
    .await
}

async fn setup(tokens: &[(&str, &str)]) -> (Backend, Backend, TestProxy) {
    let legacy = diverging("legacy", 1).await;
    let new = diverging("new", 2).await;
    let tokens: Vec<(String, String)> = tokens
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let proxy =
        TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.admin_tokens = tokens).await;
    let c = client();
    for i in 0..3 {
        c.get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
    }
    for i in 0..2 {
        c.get(proxy.url(&format!("/api/users/{i}")))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(proxy.wait_records(5).await.len(), 5);
    (legacy, new, proxy)
}

#[tokio::test]
async fn token_guards_the_api_but_not_health() {
    let (_l, _n, proxy) = setup(&[("alice", "s3cret")]).await;
    let c = client();
    let resp = c
        .get(proxy.admin_url("/api/divergences"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "unauthorized");
    let resp = c
        .get(proxy.admin_url("/api/divergences"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .get(proxy.admin_url("/api/divergences"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for open in ["/healthz", "/readyz"] {
        assert_eq!(
            c.get(proxy.admin_url(open)).send().await.unwrap().status(),
            200
        );
    }
}

/// A path or method the API does not have is a JSON error like every other (axum's own
/// answers were an empty 405 and a 404 without a body).
#[tokio::test]
async fn unknown_endpoints_and_methods_are_json_errors() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let c = client();
    let resp = c.get(proxy.admin_url("/api/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "not_found");
    let resp = c
        .delete(proxy.admin_url("/api/divergences"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
}

/// Without a token, a loopback client may make changes, but not a web page in a browser on
/// that machine: a cross-site form, another origin, or a host name rebound to 127.0.0.1.
#[tokio::test]
async fn without_a_token_changes_from_a_browser_page_of_another_origin_are_refused() {
    let (_l, _n, proxy) = setup(&[]).await;
    let c = client();
    let id = proxy.records().await[0].id.clone();
    let url = proxy.admin_url(&format!("/api/divergences/{id}"));
    let port = proxy.ficus.admin_addr().port();
    let evil = format!("evil.example:{port}");
    let forged: [&[(&str, &str)]; 4] = [
        &[("sec-fetch-site", "cross-site")],
        &[("origin", "http://127.0.0.1:8080")],
        &[("host", &evil), ("origin", "http://evil.example")],
        &[("host", &evil)],
    ];
    for headers in forged {
        let mut req = c.patch(&url).json(&json!({"state": "expected"}));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 403, "{headers:?}");
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            "cross_origin",
            "{headers:?}"
        );
    }
    let record = proxy.ficus.store().get(&id).await.unwrap().unwrap();
    assert_eq!(
        record.state,
        ficus::record::State::Open,
        "nothing was changed"
    );
    // Reads stay open; the CLI (no browser headers) and the workbench's own origin may change.
    let read = c
        .get(&url)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let own = format!("http://127.0.0.1:{port}");
    let resp = c
        .patch(&url)
        .header("origin", own)
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"state": "expected"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn list_filter_paginate_get_and_classify() {
    let (_l, _n, proxy) = setup(&[("alice", "s3cret")]).await;
    let c = client();
    let get = |path: String| {
        let c = c.clone();
        let url = proxy.admin_url(&path);
        async move { c.get(url).bearer_auth("s3cret").send().await.unwrap() }
    };

    let page: Value = get("/api/divergences?route=orders&limit=2".into())
        .await
        .json()
        .await
        .unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|r| r["route"] == "orders"));
    let cursor = page["next"].as_str().unwrap().to_string();
    let rest: Value = get(format!(
        "/api/divergences?route=orders&limit=2&cursor={cursor}"
    ))
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next"], Value::Null);

    let id = items[0]["id"].as_str().unwrap().to_string();
    let record: Value = get(format!("/api/divergences/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        record["diffs"],
        json!([{"in": "body", "op": "replace", "path": "/total", "old": 1, "value": 2}])
    );
    let missing = get("/api/divergences/nope".into()).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "not_found");

    let patched: Value = c
        .patch(proxy.admin_url(&format!("/api/divergences/{id}")))
        .bearer_auth("s3cret")
        .json(&json!({"state": "expected", "class": "rounding", "note": "new side rounds up"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["state"], "expected");
    assert_eq!(patched["history"][0]["who"], "alice");
    assert_eq!(patched["history"][0]["what"]["class"], "rounding");

    let expected: Value = get("/api/divergences?state=expected".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(expected["items"].as_array().unwrap().len(), 1);
    let open: Value = get("/api/divergences?state=open".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(open["items"].as_array().unwrap().len(), 4);
    let by_class: Value = get("/api/divergences?class=rounding".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_class["items"][0]["id"], id.as_str());

    for bad in [
        "/api/divergences?state=done",
        "/api/divergences?since=yesterday",
        "/api/divergences?colour=red",
    ] {
        assert_eq!(get(bad.into()).await.status(), 400, "{bad}");
    }
    let bad_patch = c
        .patch(proxy.admin_url(&format!("/api/divergences/{id}")))
        .bearer_auth("s3cret")
        .json(&json!({"state": "closed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_patch.status(), 400);
}

#[tokio::test]
async fn rules_in_force_and_reload() {
    let (_l, _n, proxy) = setup(&[]).await;
    let c = client();
    let rules: Value = c
        .get(proxy.admin_url("/api/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rules["routes"][0]["name"], "orders");
    assert_eq!(rules["routes"][0]["shadow"]["sample"], 1.0);
    assert!(
        rules["sources"][0]
            .as_str()
            .unwrap()
            .ends_with("rules.toml")
    );

    std::fs::write(
        proxy.rules_file(),
        "[[route]]\nname = \"x\"\nauthority = \"both\"\n",
    )
    .unwrap();
    let resp = c
        .post(proxy.admin_url("/api/rules/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("rules.toml:3:13: error: unknown authority")
    );

    std::fs::write(proxy.rules_file(), "[[route]]\nname = \"only\"\n").unwrap();
    let resp = c
        .post(proxy.admin_url("/api/rules/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["routes"], 1);
}

#[tokio::test]
async fn report_gives_a_verdict_per_route_from_the_evidence() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"v": 1}).to_string()))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |req| async move {
        let v = if req.uri().path().starts_with("/ready/") {
            1
        } else {
            2
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"v": v}).to_string()))
            .unwrap()
    })
    .await;
    let rules = r#"
[[route]]
name = "ready-route"
[route.match]
path_prefix = "/ready/"
[route.shadow]
[route.gate]
min_samples = 20
max_divergence_rate = 0.2
window = "1h"

[[route]]
name = "diverging"
[route.match]
path_prefix = "/diverging/"
[route.shadow]
[route.gate]
min_samples = 5

[[route]]
name = "sparse"
[route.match]
path_prefix = "/sparse/"
[route.shadow]
"#;
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    for i in 0..60 {
        c.get(proxy.url(&format!("/ready/{i}")))
            .send()
            .await
            .unwrap();
    }
    for i in 0..6 {
        c.get(proxy.url(&format!("/diverging/{i}")))
            .send()
            .await
            .unwrap();
    }
    for i in 0..3 {
        c.get(proxy.url(&format!("/sparse/{i}")))
            .send()
            .await
            .unwrap();
    }
    let records = proxy.wait_records(9).await;
    let defect = records.iter().find(|r| r.route == "diverging").unwrap();
    let resp = c
        .patch(proxy.admin_url(&format!("/api/divergences/{}", defect.id)))
        .json(&json!({"class": "defect"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Counters reach the store within a second or so.
    let mut report = Value::Null;
    for _ in 0..100 {
        report = proxy.report().await;
        if report["routes"][0]["comparisons"]["window"] == 60
            && report["routes"][2]["comparisons"]["window"] == 3
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let route = |name: &str| {
        report["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == name)
            .cloned()
            .unwrap()
    };
    let ready = route("ready-route");
    assert_eq!(ready["comparisons"]["window"], 60, "{report}");
    assert_eq!(ready["verdict"], "ready", "{ready}");
    assert!(ready["divergence_rate_upper_95"].as_f64().unwrap() < 0.2);
    assert!(ready["latency_ms"]["legacy"]["p99"].as_f64().unwrap() > 0.0);

    let diverging = route("diverging");
    assert_eq!(diverging["verdict"], "not-ready");
    assert_eq!(diverging["divergences"]["open_defects"], 1);
    assert_eq!(diverging["divergences"]["by_state"]["open"], 6);
    let reasons = diverging["reasons"].to_string();
    assert!(
        reasons.contains("defect") && reasons.contains("above the gate"),
        "{reasons}"
    );
    // Acknowledging a defect does not clear it: it blocks until resolved or reclassified.
    c.patch(proxy.admin_url(&format!("/api/divergences/{}", defect.id)))
        .json(&json!({"state": "acknowledged"}))
        .send()
        .await
        .unwrap();
    let acknowledged: Value = proxy.report().await;
    let diverging = acknowledged["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "diverging")
        .cloned()
        .unwrap();
    assert_eq!(diverging["divergences"]["open_defects"], 1, "{diverging}");
    assert!(diverging["reasons"].to_string().contains("defect"));

    let sparse = route("sparse");
    assert_eq!(sparse["verdict"], "insufficient-data");
    assert_eq!(sparse["gate"]["min_samples"], 1000);

    // Records marked expected leave the rate, and the hourly history, alike.
    for r in records.iter().filter(|r| r.route == "sparse").take(2) {
        c.patch(proxy.admin_url(&format!("/api/divergences/{}", r.id)))
            .json(&json!({"state": "expected"}))
            .send()
            .await
            .unwrap();
    }
    let report: Value = proxy.report().await;
    let sparse = report["routes"][2].clone();
    assert_eq!(sparse["route"], "sparse");
    assert!((sparse["divergence_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    let sum = |field: &str| -> u64 {
        sparse["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h[field].as_u64().unwrap())
            .sum()
    };
    let history = ["comparisons", "divergences", "expected", "counted"].map(sum);
    assert_eq!(history, [3, 3, 2, 1], "{sparse}");
    assert_eq!(sparse["history_truncated"], false);
}

#[tokio::test]
async fn replay_resolves_a_record_once_the_new_side_is_fixed_and_refuses_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fixed = Arc::new(AtomicBool::new(false));
    let legacy = diverging("legacy", 1).await;
    let flag = fixed.clone();
    let new = Backend::with_handler("new", move |req| {
        let total = if flag.load(Ordering::Relaxed) { 1 } else { 2 };
        let path = req.uri().path().to_string();
        async move {
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"path": path, "total": total}).to_string()))
                .unwrap()
        }
    })
    .await;
    let rules = "[[route]]\nname = \"orders\"\n[route.shadow]\nwrites = true\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    c.get(proxy.url("/api/orders/7?x=1"))
        .header("authorization", "Bearer secret")
        .send()
        .await
        .unwrap();
    c.post(proxy.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let records = proxy.wait_records(2).await;
    let get_id = records
        .iter()
        .find(|r| r.request.method == "GET")
        .unwrap()
        .id
        .clone();
    let post_id = records
        .iter()
        .find(|r| r.request.method == "POST")
        .unwrap()
        .id
        .clone();

    // Still broken: the replay reports the difference and leaves the record open.
    let replay = |id: String, query: &'static str| {
        let c = c.clone();
        let url = proxy.admin_url(&format!("/api/divergences/{id}/replay{query}"));
        async move { c.post(url).send().await.unwrap() }
    };
    let answer: Value = replay(get_id.clone(), "").await.json().await.unwrap();
    assert_eq!(answer["match"], false);
    assert_eq!(answer["record"]["state"], "open");
    let seen = new.last();
    assert_eq!(
        seen.uri.path_and_query().unwrap().as_str(),
        "/api/orders/7?x=1"
    );
    assert_eq!(seen.headers["x-ficus-replay"], "1");
    assert!(
        !seen.headers.contains_key("authorization"),
        "redacted secrets are not replayed"
    );

    // Fixed: the replay matches and resolves the record.
    fixed.store(true, Ordering::Relaxed);
    let answer: Value = replay(get_id.clone(), "").await.json().await.unwrap();
    assert_eq!(answer["match"], true, "{answer}");
    assert_eq!(answer["record"]["state"], "resolved");
    let history = answer["record"]["history"].as_array().unwrap();
    assert_eq!(
        history.last().unwrap()["what"]["resolution"],
        "replay matched"
    );

    // Writes are refused unless asked for.
    let resp = replay(post_id.clone(), "").await;
    assert_eq!(resp.status(), 409);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "unsafe_method"
    );
    // A match leaves a record marked expected as it is: resolved, its divergence would count
    // again in the route's rate.
    c.patch(proxy.admin_url(&format!("/api/divergences/{post_id}")))
        .json(&json!({"state": "expected"}))
        .send()
        .await
        .unwrap();
    let resp = replay(post_id, "?allow_writes=true").await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["match"], true, "{answer}");
    assert_eq!(answer["record"]["state"], "expected", "{answer}");
    assert_eq!(replay("nope".into(), "").await.status(), 404);

    // An emergency override that stops shadowing stops replays too: they call both sides.
    let resp = c
        .post(proxy.admin_url("/api/routes/orders/override"))
        .json(&json!({"shadow": false, "ttl": "1h", "reason": "new side corrupts orders"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let calls = new.count();
    let resp = replay(get_id.clone(), "").await;
    assert_eq!(resp.status(), 409);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "shadow_stopped"
    );
    assert_eq!(new.count(), calls, "no call reached the new side");
    c.delete(proxy.admin_url("/api/routes/orders/override"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay(get_id, "").await.status(), 200);
}

#[tokio::test]
async fn groups_gather_one_root_cause_and_change_together() {
    let (_l, _n, proxy) = setup(&[("bob", "t0ken")]).await;
    let c = client();
    let groups: Value = c
        .get(proxy.admin_url("/api/groups"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = groups["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{groups}");
    assert_eq!(items[0]["route"], "orders");
    assert_eq!(items[0]["count"], 3);
    assert_eq!(items[0]["paths"], json!(["/total"]));
    assert_eq!(items[0]["states"]["open"], 3);
    assert_eq!(groups["truncated"], false);
    let fp = items[0]["fingerprint"].as_str().unwrap().to_string();

    let resp: Value = c
        .patch(proxy.admin_url(&format!("/api/groups/{fp}")))
        .bearer_auth("t0ken")
        .json(&json!({"state": "expected", "class": "rounding"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["updated"], 3);
    let expected: Value = c
        .get(proxy.admin_url("/api/groups?state=expected"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(expected["items"][0]["count"], 3);
    assert_eq!(expected["items"][0]["classes"]["rounding"], 3);
    let users: Value = c
        .get(proxy.admin_url("/api/groups?route=users&state=open"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users["items"].as_array().unwrap().len(), 1);
    let missing = c
        .patch(proxy.admin_url("/api/groups/0000"))
        .bearer_auth("t0ken")
        .json(&json!({"state": "expected"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// A group marked expected stays so: its divergences recorded later, on any replica sharing
/// the store, are written expected (with the mark's class and note), so that an intended
/// difference does not hold the verdict back again with every new record. Another state lifts
/// the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_marked_expected_keeps_its_later_records_expected() {
    let redis = support::RedisServer::start().await;
    let legacy = diverging("legacy", 1).await;
    let new = diverging("new", 2).await;
    let url = redis.url();
    let a = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.store = url.clone()).await;
    let b = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.store = url.clone()).await;
    let c = client();
    let order = |p: &TestProxy, i: u32| {
        let (c, url) = (c.clone(), p.url(&format!("/api/orders/{i}")));
        async move { assert_eq!(c.get(url).send().await.unwrap().status(), 200) }
    };
    order(&a, 0).await;
    let first = a.wait_records(1).await;
    let fp = first[0].fingerprint.clone();
    let resp: Value = c
        .patch(a.admin_url(&format!("/api/groups/{fp}")))
        .json(&json!({"state": "expected", "class": "rounding", "note": "the new side rounds"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (resp["updated"].as_u64(), resp["marked_expected"].as_bool()),
        (Some(1), Some(true)),
        "{resp}"
    );

    // On the replica that took the call at once; on the other once it has read the store.
    order(&a, 1).await;
    let expected_on_a = || async {
        a.records()
            .await
            .into_iter()
            .find(|r| r.request.path == "/api/orders/1")
    };
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            order(&b, 2).await;
            b.records().await.iter().any(|r| {
                r.request.path == "/api/orders/2" && r.state == ficus::record::State::Expected
            })
        })
        .await,
        "the other replica writes the group's new records expected"
    );
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            expected_on_a().await.is_some()
        })
        .await
    );
    let later = expected_on_a().await.unwrap();
    assert_eq!(later.state, ficus::record::State::Expected);
    assert_eq!(later.class.as_deref(), Some("rounding"));
    assert_eq!(later.note.as_deref(), Some("the new side rounds"));
    assert_eq!(later.history[0].what["group_mark"], fp.as_str());
    let groups: Value = c
        .get(a.admin_url("/api/groups?route=orders"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        groups["items"][0]["marked_expected"]["class"], "rounding",
        "{groups}"
    );
    // The verdict leaves them out (b's records from before it read the mark stay open).
    let report: Value = c
        .get(a.admin_url("/api/report"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let orders = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "orders")
        .unwrap();
    assert!(
        orders["divergences"]["expected_in_window"]
            .as_u64()
            .unwrap()
            >= 3,
        "{orders}"
    );

    // Reopened, the group is no longer marked, and what comes next is open.
    let resp: Value = c
        .patch(a.admin_url(&format!("/api/groups/{fp}")))
        .json(&json!({"state": "open"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["marked_expected"], false, "{resp}");
    order(&a, 3).await;
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            a.records()
                .await
                .iter()
                .any(|r| r.request.path == "/api/orders/3" && r.state == ficus::record::State::Open)
        })
        .await,
        "a record after the mark is lifted is open"
    );
    let audit: Value = c
        .get(a.admin_url("/api/audit"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(
        events.contains(&"group_marked_expected") && events.contains(&"group_mark_lifted"),
        "{audit}"
    );
}

/// The CLI against a running ficus: list, show, set, groups, report and its CI gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_wraps_the_api() {
    let (_l, _n, proxy) = setup(&[("carol", "cli-token")]).await;
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let run = move |args: Vec<String>| {
        let admin = admin.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
                    .args(&args)
                    .env("FICUS_ADMIN", &admin)
                    .env("FICUS_ADMIN_TOKEN", "carol=cli-token")
                    .output()
                    .unwrap();
                (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
            .await
            .unwrap()
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();

    let (code, out, err) = run(args("divergences list --route orders --json")).await;
    assert_eq!(code, 0, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let id = page["items"][0]["id"].as_str().unwrap().to_string();

    let (code, out, _) = run(args("divergences list")).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    assert_eq!(out.lines().count(), 6, "a header and five rows:\n{out}");

    let (code, out, _) = run(args(&format!("divergences show {id}"))).await;
    assert_eq!(code, 0);
    assert!(out.contains("replace /total: 1 -> 2"), "{out}");

    let (code, out, err) = run(args(&format!(
        "divergences set {id} --state acknowledged --class rounding"
    )))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("is acknowledged (rounding)"), "{out}");
    let record: Value = client()
        .get(proxy.admin_url(&format!("/api/divergences/{id}")))
        .bearer_auth("cli-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["history"][0]["who"], "carol");

    let (code, out, _) = run(args("groups list")).await;
    assert_eq!(code, 0);
    assert!(out.contains("orders") && out.contains("/total"), "{out}");

    // Five comparisons are far from the default gate of 1,000: not ready, exit 1.
    let (code, out, _) = run(args("report --fail-unless-ready orders")).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("insufficient-data"), "{out}");
    let (code, _, err) = run(args("report --fail-unless-ready nosuch")).await;
    assert_eq!(code, 1);
    assert!(err.contains("not in the rules"), "{err}");

    // The emergency override from the shell.
    let (code, out, err) = run(args(
        "routes override orders --authority legacy --no-shadow --ttl 1h --reason on-call",
    ))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("override in force (authority legacy, shadow off)"),
        "{out}"
    );
    let (code, out, _) = run(args("routes release orders")).await;
    assert_eq!(code, 0);
    assert!(out.contains("lifted"), "{out}");
    let (code, _, err) = run(args("routes release orders")).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // A wrong token is a clear error, not a crash.
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, _, err) =
        ficus_cli(&["divergences", "list", "--admin", &admin, "--token", "wrong"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test]
async fn classify_rules_class_new_records_on_arrival() {
    let legacy = Backend::with_handler("legacy", |_req| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"meta": {"t": 1}, "v": 1}).to_string()))
            .unwrap()
    })
    .await;
    let new = Backend::with_handler("new", |req| async move {
        let v = if req.uri().path().starts_with("/real/") {
            2
        } else {
            1
        };
        Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"meta": {"t": 2}, "v": v}).to_string()))
            .unwrap()
    })
    .await;
    let rules = r#"
[[route]]
name = "orders"
[route.shadow]
[[route.classify]]
class = "benign-timing"
paths = ["/meta/**"]
"#;
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    c.get(proxy.url("/timing/1")).send().await.unwrap();
    c.get(proxy.url("/real/1")).send().await.unwrap();
    let records = proxy.wait_records(2).await;
    let timing = records
        .iter()
        .find(|r| r.request.path == "/timing/1")
        .unwrap();
    let real = records
        .iter()
        .find(|r| r.request.path == "/real/1")
        .unwrap();
    assert_eq!(timing.class.as_deref(), Some("benign-timing"));
    assert_eq!(
        real.class, None,
        "a difference outside the rule's paths stays unclassified"
    );
}

/// A UUIDv7-shaped id at `ms` (Unix ms), unique by `n`: a record's time is read from its id.
/// Runs the ficus binary with `args` (off the runtime's threads); its exit code, stdout and
/// stderr.
async fn ficus_cli(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn id_at(ms: u64, n: u16) -> String {
    let t = format!("{ms:012x}");
    format!("{}-{}-7000-8000-{n:012x}", &t[..8], &t[8..])
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A copy of `r` stored under a new id at `ms`, changed by `edit`.
async fn put_copy(
    proxy: &TestProxy,
    r: &ficus::record::Record,
    ms: u64,
    n: u16,
    edit: impl FnOnce(&mut ficus::record::Record),
) -> String {
    let mut copy = r.clone();
    copy.id = id_at(ms, n);
    copy.at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
    )
    .to_string();
    edit(&mut copy);
    proxy.ficus.store().put(&[copy.clone()]).await.unwrap();
    copy.id
}

#[tokio::test]
async fn a_group_replay_reports_each_record_and_counts_only_real_replays() {
    let (legacy, _n, proxy) = setup(&[]).await;
    let c = client();
    let records = proxy.records().await;
    let orders: Vec<_> = records.iter().filter(|r| r.route == "orders").collect();
    let fp = orders[0].fingerprint.clone();
    // One record already resolved; in the same group, a POST (fingerprints ignore the method)
    // and one whose route has left the rules.
    let resolved = orders[2].id.clone();
    c.patch(proxy.admin_url(&format!("/api/divergences/{resolved}")))
        .json(&json!({"state": "resolved"}))
        .send()
        .await
        .unwrap();
    let now = now_ms();
    let post = put_copy(&proxy, orders[0], now, 1, |r| {
        r.request.method = "POST".into()
    })
    .await;
    let gone = put_copy(&proxy, orders[0], now, 2, |r| r.route = "gone".into()).await;
    let replay = |query: &'static str| {
        let c = c.clone();
        let url = proxy.admin_url(&format!("/api/groups/{fp}/replay{query}"));
        async move {
            let resp = c.post(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let outcome = |answer: &Value, id: &str| {
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };

    // By default: every record not resolved; the write is skipped, the lost route fails with
    // its reason, and only the two real replays count as replayed.
    let before = legacy.count();
    let answer = replay("?sample=20").await;
    assert_eq!(answer["results"].as_array().unwrap().len(), 4, "{answer}");
    assert_eq!(answer["replayed"], 2, "{answer}");
    assert_eq!(answer["matched"], 0, "the backends still disagree");
    assert_eq!(answer["still_diverged"], 2);
    assert_eq!(answer["failed"], 1);
    assert_eq!(answer["skipped_writes"], 1);
    assert_eq!(outcome(&answer, &post)["outcome"], "skipped_write");
    let failed = outcome(&answer, &gone);
    assert_eq!(failed["outcome"], "failed");
    assert_eq!(failed["error"], "unreplayable");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("no longer in the rules"),
        "{failed}"
    );
    assert_eq!(
        outcome(&answer, &resolved),
        Value::Null,
        "resolved ones are left alone"
    );
    assert_eq!(
        legacy.count(),
        before + 2,
        "only the two GETs reached the backends"
    );

    // With allow_writes the POST goes too.
    let answer = replay("?sample=20&allow_writes=true").await;
    assert_eq!(
        (
            &answer["replayed"],
            &answer["skipped_writes"],
            &answer["failed"]
        ),
        (&json!(3), &json!(0), &json!(1)),
        "{answer}"
    );
    assert_eq!(outcome(&answer, &post)["outcome"], "still_diverges");
    assert!(
        legacy.seen().iter().any(|s| s.method == http::Method::POST),
        "the write reached legacy"
    );

    // `state` picks the records instead; `sample` bounds them.
    let answer = replay("?state=resolved").await;
    assert_eq!(answer["results"].as_array().unwrap().len(), 1);
    assert_eq!(answer["results"][0]["id"], resolved.as_str());
    let answer = replay("?sample=1").await;
    assert_eq!(answer["results"].as_array().unwrap().len(), 1);
    let answer = replay("?state=expected").await;
    assert_eq!(
        (&answer["replayed"], &answer["results"]),
        (&json!(0), &json!([]))
    );

    let missing = c
        .post(proxy.admin_url("/api/groups/0000/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = c
        .post(proxy.admin_url(&format!("/api/groups/{fp}/replay?state=done")))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn groups_filter_by_class_and_time() {
    let (_l, _n, proxy) = setup(&[]).await;
    let c = client();
    let get = |query: String| {
        let c = c.clone();
        let url = proxy.admin_url(&format!("/api/groups{query}"));
        async move { c.get(url).send().await.unwrap() }
    };
    let count = |answer: Value| -> Vec<u64> {
        answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["count"].as_u64().unwrap())
            .collect()
    };
    let records = proxy.records().await;
    let order = records.iter().find(|r| r.route == "orders").unwrap();
    // One more of the orders group, three hours old, classified.
    let old = now_ms() - 3 * 3_600_000;
    put_copy(&proxy, order, old, 1, |r| {
        r.class = Some("legacy-bug".into())
    })
    .await;

    let all: Value = get("?route=orders".into()).await.json().await.unwrap();
    assert_eq!(count(all.clone()), [4]);
    assert_eq!(all["items"][0]["methods"], json!({"GET": 4}));
    let hour_ago = now_ms() - 3_600_000;
    let recent = get(format!("?route=orders&since={hour_ago}")).await;
    assert_eq!(count(recent.json().await.unwrap()), [3]);
    let rfc3339 = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(hour_ago),
    );
    let older = get(format!("?route=orders&until={rfc3339}")).await;
    assert_eq!(count(older.json().await.unwrap()), [1]);
    let classed = get("?class=legacy-bug".into()).await;
    assert_eq!(count(classed.json().await.unwrap()), [1]);
    assert_eq!(
        count(get("?class=defect".into()).await.json().await.unwrap()),
        Vec::<u64>::new()
    );
    // Without a route: both groups, narrowed by time as well.
    let both: Value = get(format!("?since={hour_ago}&state=open"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count(both), [3, 2]);

    let bad = get("?since=yesterday".into()).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "bad_time");
    let unknown = get("?colour=red".into()).await;
    assert_eq!(unknown.status(), 400);

    // Bulk actions take the same filters: only what such a view shows is changed or replayed.
    let fp = &order.fingerprint;
    let patched: Value = c
        .patch(proxy.admin_url(&format!("/api/groups/{fp}?class=legacy-bug")))
        .json(&json!({"note": "seen in 2019 too"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["updated"], 1, "{patched}");
    let replayed: Value = c
        .post(proxy.admin_url(&format!(
            "/api/groups/{fp}/replay?since={hour_ago}&sample=20"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        replayed["replayed"], 3,
        "the old record is outside the view: {replayed}"
    );
    let old_id = proxy
        .records()
        .await
        .into_iter()
        .find(|r| r.class.as_deref() == Some("legacy-bug"))
        .unwrap();
    assert!(
        replayed["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != old_id.id.as_str()),
        "{replayed}"
    );
    assert_eq!(old_id.note.as_deref(), Some("seen in 2019 too"));
    let bad = c
        .post(proxy.admin_url(&format!("/api/groups/{fp}/replay?until=soon")))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_shows_what_a_compare_change_would_hide() {
    let (_l, _n, proxy) = setup(&[]).await;
    let candidate = r#"
[[route]]
name = "orders"
[route.match]
path_prefix = "/api/orders/"
[route.shadow]
[route.compare]
ignore = ["/total"]

[[route]]
name = "users"
[route.match]
path_prefix = "/api/users/"
[route.shadow]
"#;
    let answer: Value = client()
        .post(proxy.admin_url("/api/rules/impact"))
        .json(&json!({"files": {"candidate.toml": candidate}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let route = |name: &str| {
        answer["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        route("orders")["totals"],
        json!({"would_match": 3, "would_remain": 0, "unknown": 0}),
        "{answer}"
    );
    assert_eq!(
        route("users")["totals"],
        json!({"would_match": 0, "would_remain": 2, "unknown": 0})
    );
    assert_eq!(route("orders")["groups"][0]["would_match"], 3);

    let bad = client()
        .post(proxy.admin_url("/api/rules/impact"))
        .json(&json!({"files": {"c.toml": "[[route]]\nname = 1\n"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);

    // The same through the CLI, from a file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("candidate.toml"), candidate).unwrap();
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let path = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ficus"))
            .args(["rules", "impact"])
            .arg(&path)
            .args(["--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("orders")
            && l.split_whitespace().collect::<Vec<_>>() == ["orders", "3", "3", "0", "0"]),
        "{text}"
    );
}

/// The 3 a.m. rollback: one call flips a route on every replica sharing the store, until it is
/// lifted or expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_flips_a_route_on_every_replica() {
    let redis = support::RedisServer::start().await;
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = "[[route]]\nname = \"orders\"\nauthority = \"new\"\n[route.match]\npath_prefix = \"/api/\"\n";
    let url = redis.url();
    let a = TestProxy::start_with(rules, legacy.url(), new.url(), |c| c.store = url.clone()).await;
    let b = TestProxy::start_with(rules, legacy.url(), new.url(), |c| c.store = url.clone()).await;
    let c = client();
    let side = |p: &TestProxy| {
        let url = p.url("/api/x");
        let c = c.clone();
        async move { support::backend_of(&c.get(url).send().await.unwrap()) }
    };
    assert_eq!(side(&b).await, "new");

    let resp = c
        .post(a.admin_url("/api/routes/orders/override"))
        .json(&json!({"authority": "legacy", "ttl": "1h", "reason": "new side returns 500s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        side(&a).await,
        "legacy",
        "at once on the replica that took the call"
    );
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            side(&b).await == "legacy"
        })
        .await,
        "the other replica follows through the store"
    );
    let rules_now: Value = c
        .get(b.admin_url("/api/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rules_now["overrides"][0]["reason"], "new side returns 500s");
    let report: Value = b.report().await;
    assert_eq!(report["routes"][0]["override"]["authority"], "legacy");
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(r#"ficus_route_override{route="orders"} 1"#),
        "{metrics}"
    );

    let lifted = c
        .delete(b.admin_url("/api/routes/orders/override"))
        .send()
        .await
        .unwrap();
    assert_eq!(lifted.status(), 200);
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            side(&a).await == "new"
        })
        .await
    );

    // Overrides expire by themselves.
    c.post(a.admin_url("/api/routes/orders/override"))
        .json(&json!({"authority": "legacy", "ttl": "1s", "reason": "short"}))
        .send()
        .await
        .unwrap();
    assert_eq!(side(&a).await, "legacy");
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            side(&a).await == "new"
        })
        .await
    );
    // Lifting an override that already ended says so, instead of "lifted".
    let late = c
        .delete(a.admin_url("/api/routes/orders/override"))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 404);

    for (body, status) in [
        (
            json!({"authority": "both", "ttl": "1h", "reason": "x"}),
            400,
        ),
        (
            json!({"authority": "legacy", "ttl": "30d", "reason": "x"}),
            400,
        ),
        (
            json!({"authority": "legacy", "ttl": "1h", "reason": " "}),
            400,
        ),
    ] {
        let resp = c
            .post(a.admin_url("/api/routes/orders/override"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{body}");
    }
    let resp = c
        .post(a.admin_url("/api/routes/nosuch/override"))
        .json(&json!({"authority": "legacy", "ttl": "1h", "reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// Pagination is by id (time order), so records written between pages neither repeat nor push
/// older ones out of the walk.
#[tokio::test]
async fn pagination_is_stable_while_records_arrive() {
    let (_l, _n, proxy) = setup(&[]).await;
    let c = client();
    let page = |cursor: Option<String>| {
        let c = c.clone();
        let url = proxy.admin_url(&format!(
            "/api/divergences?limit=2{}",
            cursor.map(|x| format!("&cursor={x}")).unwrap_or_default()
        ));
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = page(None).await;
    let mut seen: Vec<String> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    // New records arrive between the pages.
    for i in 0..4 {
        c.get(proxy.url(&format!("/api/orders/new-{i}")))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(proxy.wait_records(9).await.len(), 9);
    let mut cursor = first["next"].as_str().map(str::to_string);
    while let Some(cur) = cursor {
        let p = page(Some(cur)).await;
        seen.extend(
            p["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
        cursor = p["next"].as_str().map(str::to_string);
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no record twice");
    assert_eq!(
        seen.len(),
        5,
        "exactly the five records older than the first page's start"
    );
}

/// The OpenAPI document is served, and names every route the admin router has.
#[tokio::test]
async fn openapi_document_covers_the_api() {
    let (_l, _n, proxy) = setup(&[]).await;
    let doc: Value = client()
        .get(proxy.admin_url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let source = include_str!("../src/admin/mod.rs");
    let mut routes = 0;
    for line in source.lines() {
        let line = line.trim();
        let Some(rest) = line
            .strip_prefix(".route(\"")
            .or_else(|| line.strip_prefix('"').filter(|r| r.starts_with('/')))
        else {
            continue;
        };
        let Some(path) = rest.split('"').next() else {
            continue;
        };
        if path.starts_with('/') {
            routes += 1;
            assert!(
                doc["paths"][path].is_object(),
                "{path} is not in docs/openapi.json"
            );
        }
    }
    assert!(routes >= 15, "found {routes} routes in the router");
}

/// A replay that fails after the legacy side was called says so, alone and in a group, so that
/// nobody retries a write believing it was never sent.
#[tokio::test]
async fn a_replay_that_fails_after_a_request_went_out_says_it_was_sent() {
    let (legacy, new, proxy) = setup(&[]).await;
    drop(new); // the new side is gone: legacy answers, then new cannot be reached
    let c = client();
    let orders: Vec<_> = proxy
        .records()
        .await
        .into_iter()
        .filter(|r| r.route == "orders")
        .collect();
    let before = legacy.count();
    let resp = c
        .post(proxy.admin_url(&format!("/api/divergences/{}/replay", orders[0].id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "replay_failed", "{body}");
    assert_eq!(body["sent"], true, "{body}");
    assert_eq!(legacy.count(), before + 1, "legacy did get the request");

    let fp = &orders[0].fingerprint;
    let group: Value = c
        .post(proxy.admin_url(&format!("/api/groups/{fp}/replay")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(group["replayed"], 0, "{group}");
    assert_eq!(group["failed"], 3, "{group}");
    assert_eq!(group["failed_after_sending"], 3, "{group}");
    for r in group["results"].as_array().unwrap() {
        assert_eq!(r["sent"], true, "{r}");
    }
    // A refusal before anything is sent carries no such flag.
    let unknown = c
        .post(proxy.admin_url("/api/divergences/no-such-id/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.json::<Value>().await.unwrap().get("sent").is_none());
}

/// A backend that answers with its name and keeps every request body it received.
async fn body_keeping(
    name: &'static str,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> Backend {
    use http_body_util::BodyExt;
    Backend::with_handler(name, move |req| {
        let bodies = bodies.clone();
        async move {
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            bodies
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&bytes).into_owned());
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"side": name}).to_string()))
                .unwrap()
        }
    })
    .await
}

/// A route that mirrors writes and redacts `/password`, in front of two backends that keep
/// the request bodies they get; `body` is POSTed through it once, and both sides got it. The
/// backends come back too: they serve as long as they are kept.
async fn replay_setup_with_one_write(
    body: &'static str,
) -> (
    TestProxy,
    [Backend; 2],
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ficus::record::Record,
) {
    let bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let legacy = body_keeping("legacy", bodies.clone()).await;
    let new = body_keeping("new", bodies.clone()).await;
    let rules = "[[route]]\nname = \"accounts\"\n[route.shadow]\nwrites = true\n[route.compare]\nredact = [\"/password\"]\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    client()
        .post(proxy.url("/api/accounts"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let records = proxy.wait_records(1).await;
    assert_eq!(records.len(), 1);
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            bodies.lock().unwrap().len() == 2
        })
        .await
    );
    let record = records.into_iter().next().unwrap();
    (proxy, [legacy, new], bodies, record)
}

/// A request body is stored with its `compare.redact` values replaced by `"[redacted]"`; a
/// replay of it would send that placeholder instead of the real value (a password, a card
/// number) to both production sides. Such a record cannot be replayed faithfully.
#[tokio::test]
async fn replay_never_sends_a_redacted_request_body_placeholder_upstream() {
    let (proxy, _backends, bodies, record) =
        replay_setup_with_one_write(r#"{"user":"ann","password":"hunter2"}"#).await;
    let stored = record.request.body.body.clone().unwrap_or_default();
    assert!(stored.contains("[redacted]"), "{stored}");
    let resp = client()
        .post(proxy.admin_url(&format!(
            "/api/divergences/{}/replay?allow_writes=true",
            record.id
        )))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap();
    let sent = bodies.lock().unwrap().clone();
    assert!(
        !sent.iter().any(|b| b.contains("[redacted]")),
        "the replay wrote the redaction placeholder to the upstreams ({status} {answer}): {sent:?}"
    );
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"], "unreplayable", "{answer}");
}

/// The same for a query: `access_token` is stored as `[redacted]`, and a replay would send
/// that to both sides (a 401 on legacy, which then reads as "not reproduced").
#[tokio::test]
async fn replay_never_sends_a_redacted_query_placeholder_upstream() {
    let bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let legacy = body_keeping("legacy", bodies.clone()).await;
    let new = body_keeping("new", bodies.clone()).await;
    let rules = "[[route]]\nname = \"feed\"\n[route.shadow]\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let resp = client()
        .get(proxy.url("/feed?access_token=abc123&page=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let records = proxy.wait_records(1).await;
    let record = &records[0];
    assert_eq!(
        record.request.query.as_deref(),
        Some("access_token=[redacted]&page=1")
    );
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            bodies.lock().unwrap().len() == 2
        })
        .await
    );
    let resp = client()
        .post(proxy.admin_url(&format!("/api/divergences/{}/replay", record.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"], "unreplayable", "{answer}");
    assert_eq!(bodies.lock().unwrap().len(), 2, "nothing was sent again");
}

/// A replay takes as long as both upstreams do; an operator's change to the record made
/// meanwhile (state, note) must not be overwritten by the replay's copy of the record, read
/// before the upstreams were called.
#[tokio::test]
async fn a_change_made_while_a_replay_is_in_flight_is_not_lost() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let legacy = diverging("legacy", 1).await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let (gate, seen) = (release.clone(), replays.clone());
    let new = Backend::with_handler("new", move |req| {
        let replay = req.headers().contains_key("x-ficus-replay");
        let path = req.uri().path().to_string();
        let (gate, seen) = (gate.clone(), seen.clone());
        async move {
            if replay {
                seen.fetch_add(1, Ordering::SeqCst);
                let _permit = gate.acquire().await.unwrap();
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"path": path, "total": 2}).to_string()))
                .unwrap()
        }
    })
    .await;
    let proxy = TestProxy::start(RULES, legacy.url(), new.url()).await;
    let c = client();
    c.get(proxy.url("/api/orders/1")).send().await.unwrap();
    let id = proxy.wait_records(1).await[0].id.clone();

    let replay = tokio::spawn({
        let (c, url) = (
            c.clone(),
            proxy.admin_url(&format!("/api/divergences/{id}/replay")),
        );
        async move { c.post(url).send().await.unwrap().status() }
    });
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            replays.load(Ordering::SeqCst) == 1
        })
        .await,
        "the replay never reached the new side"
    );
    let patched = c
        .patch(proxy.admin_url(&format!("/api/divergences/{id}")))
        .json(&json!({"state": "expected", "note": "intended: new totals"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    release.add_permits(1);
    assert_eq!(replay.await.unwrap(), 200);

    let record: Value = proxy.admin_json(&format!("/api/divergences/{id}")).await;
    assert_eq!(
        record["state"], "expected",
        "the PATCH was overwritten: {record}"
    );
    assert_eq!(record["note"], "intended: new totals", "{record}");
    let history = record["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "both the change and the replay: {record}");
}

/// `POST /api/rules/impact` loads candidate rules sent by the caller, expanding `${VAR}` from
/// ficus's own environment; the errors it answers with quote the expanded value. A caller
/// must not be able to read the process environment (store passwords, other admin tokens,
/// cloud credentials) by naming a variable as an upstream.
#[tokio::test]
async fn rules_impact_does_not_reveal_the_process_environment() {
    let (_l, _n, proxy) = setup(&[]).await;
    let secret = std::env::var("PATH").expect("PATH is set for tests");
    assert!(secret.len() > 3);
    let candidate = "[upstreams]\nleak = \"${PATH}\"\n[[route]]\nname = \"orders\"\nnew = \"leak\"\n[route.match]\npath_prefix = \"/api/orders/\"\n";
    let resp = client()
        .post(proxy.admin_url("/api/rules/impact"))
        .json(&json!({"files": {"leak.toml": candidate}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(
        !body.contains(&secret),
        "the answer ({status}) quotes the value of $PATH: {body}"
    );
}

/// On a route with `compare.redact`, a JSON request body is stored re-serialised (compact),
/// so its length is not the recorded `content-length` any more. A replay must send a body
/// and a length that agree: otherwise the upstream reads a cut body (or waits for bytes
/// that never come, and the rest of the body is left on the connection).
#[tokio::test]
async fn replay_sends_a_content_length_that_matches_the_replayed_body() {
    let (proxy, _backends, bodies, record) =
        replay_setup_with_one_write(r#"{ "user": "ann", "plan": "pro" }"#).await;
    let id = record.id;
    let resp = client()
        .post(proxy.admin_url(&format!("/api/divergences/{id}/replay?allow_writes=true")))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let sent = bodies.lock().unwrap().clone();
    assert_eq!(sent.len(), 4, "{sent:?}");
    for body in &sent[2..] {
        let parsed: Result<Value, _> = serde_json::from_str(body);
        assert_eq!(
            parsed.ok(),
            Some(json!({"user": "ann", "plan": "pro"})),
            "the upstream got a cut body: {body:?}"
        );
    }
}

/// The gate's window is counted in whole hours, the current one included: a 24 h window is
/// the current hour and the 23 before it, the same hours as the report's 24-hour history. The
/// hour that began 24 hours ago is stale evidence: clean comparisons made then must not make a
/// route that has barely been compared since look ready.
#[tokio::test]
async fn report_window_leaves_out_the_hour_before_the_window() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = r#"
[[route]]
name = "w-stale"
[route.shadow]
[route.gate]
min_samples = 100
max_divergence_rate = 0.01
window = "24h"
"#;
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let now_hour = ficus::store::hour_of(ficus::store::writer::now_ms());
    let delta = |hour: u64, comparisons: u64| ficus::store::CountDelta {
        route: "w-stale".into(),
        hour,
        counts: ficus::store::Counts {
            comparisons,
            divergences: 0,
        },
    };
    proxy
        .ficus
        .store()
        .add_counts(
            "test-writer",
            1,
            &[delta(now_hour - 24, 10_000), delta(now_hour, 50)],
        )
        .await
        .unwrap();
    let report = proxy.report().await;
    let route = report["routes"][0].clone();
    assert_eq!(route["route"], "w-stale");
    let history: u64 = route["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["comparisons"].as_u64().unwrap())
        .sum();
    assert_eq!(history, 50, "{route}");
    assert_eq!(route["comparisons"]["window"], 50, "{route}");
    assert_eq!(route["verdict"], "insufficient-data", "{route}");
}

/// Record contents come from clients and upstreams. Markup in them must never become markup
/// in the operator's browser: the workbench builds its DOM from text nodes under a policy
/// without inline script, and every API answer (which carries those contents) is JSON that a
/// browser may not sniff into HTML, with a policy that runs nothing should it render anyway.
#[tokio::test]
async fn markup_in_records_is_never_served_as_markup() {
    const XSS: &str = "<img src=x onerror=alert(document.domain)>";
    let backend = |name: &'static str| {
        Backend::with_handler(name, move |_req| async move {
            Response::builder()
                .header("content-type", "text/html")
                .header("x-evil", XSS)
                .body(full(format!("{XSS}{name}")))
                .unwrap()
        })
    };
    let legacy = backend("legacy").await;
    let new = backend("new").await;
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| {
        c.admin_tokens = vec![("alice".into(), "s3cret".into())];
    })
    .await;
    let c = client();
    c.get(proxy.url(
        "/api/orders/%3Cimg%20src=x%20onerror=alert(1)%3E?q=%3Cscript%3Ealert(1)%3C/script%3E",
    ))
    .header("x-client", XSS)
    .send()
    .await
    .unwrap();
    assert_eq!(proxy.wait_records(1).await.len(), 1);

    let nosniff_json = |resp: &reqwest::Response, what: &str| {
        let h = resp.headers();
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}: {h:?}"
        );
        assert_eq!(
            h.get("x-content-type-options").map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{what} must not be sniffed as HTML: {h:?}"
        );
        let csp = h
            .get("content-security-policy")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{what} carries no policy that would stop a rendered body: {csp:?}"
        );
    };
    let list = c
        .get(proxy.admin_url("/api/divergences"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    nosniff_json(&list, "the list");
    let page: Value = list.json().await.unwrap();
    let id = page["items"][0]["id"].as_str().unwrap().to_string();
    let one = c
        .get(proxy.admin_url(&format!("/api/divergences/{id}")))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    nosniff_json(&one, "one record");
    let text = one.text().await.unwrap();
    assert!(
        text.contains("onerror"),
        "the record holds the markup: {text}"
    );
    let refused = c
        .get(proxy.admin_url("/api/divergences"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    nosniff_json(&refused, "a 401");
    for path in ["/api/groups", "/api/report", "/api/rules", "/api/audit"] {
        let resp = c
            .get(proxy.admin_url(path))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        nosniff_json(&resp, path);
    }

    // The page: its own script only, nothing inline, no framing, and a script that never
    // parses strings as HTML.
    let page = c.get(proxy.admin_url("/ui/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    let handler = html.split(" on").skip(1).any(|rest| {
        let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        !name.is_empty() && rest[name.len()..].starts_with('=')
    });
    assert!(
        !html.contains("<script>") && !handler,
        "inline script in {html}"
    );
    let js = c
        .get(proxy.admin_url("/ui/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let code: String = js
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "DOMParser",
        "createContextualFragment",
        "srcdoc",
        "eval(",
        "new Function",
        "javascript:",
    ] {
        assert!(!code.contains(sink), "app.js uses {sink}");
    }
}

/// `PATCH /api/groups/{fp}` changes every record of the group, not only its newest 10,000 (the
/// bound of the groups listing): a group marked expected must leave the rate whole, and
/// sending the patch again could only ever reach the same newest records.
#[tokio::test]
async fn a_group_patch_reaches_every_record_of_a_large_group() {
    let (_l, _n, proxy) = setup(&[]).await;
    let records = proxy.records().await;
    let order = records.iter().find(|r| r.route == "orders").unwrap();
    let fp = order.fingerprint.clone();
    let start = now_ms() - 2 * 3_600_000;
    let copies: Vec<ficus::record::Record> = (0..10_050u64)
        .map(|i| {
            let mut copy = order.clone();
            copy.id = id_at(start + i, 1);
            copy
        })
        .collect();
    proxy.ficus.store().put(&copies).await.unwrap();
    let total = 10_050 + 3;
    let patched: Value = client()
        .patch(proxy.admin_url(&format!("/api/groups/{fp}")))
        .json(&json!({"state": "expected"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["updated"], total, "{patched}");
    assert_eq!(patched["truncated"], false, "{patched}");
    let expected = proxy
        .ficus
        .store()
        .count(&ficus::store::Filter {
            fingerprint: Some(fp),
            state: Some(ficus::record::State::Expected),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(expected, total);
}

/// Evidence stamped after the current hour (a replica whose clock runs ahead) is outside the
/// window on either store, its comparisons and divergences as well as its records marked
/// expected: subtracting those records from divergences the window does not hold made a route
/// with 3% of its divergences unexplained look ready on Redis (and SQLite counted the hour).
#[tokio::test]
async fn report_leaves_evidence_after_the_current_hour_out_on_both_stores() {
    let redis = support::RedisServer::start().await;
    for store in ["sqlite", "redis"] {
        let legacy = Backend::start("legacy").await;
        let new = Backend::start("new").await;
        let rules = r#"
[[route]]
name = "w-ahead"
[route.shadow]
[route.gate]
min_samples = 100
max_divergence_rate = 0.01
"#;
        let url = redis.url();
        let proxy = TestProxy::start_with(rules, legacy.url(), new.url(), |c| {
            if store == "redis" {
                c.store = url;
                c.store_prefix = "ahead:".into();
            }
        })
        .await;
        let now_hour = ficus::store::hour_of(now_ms());
        let delta = |hour: u64, comparisons: u64, divergences: u64| ficus::store::CountDelta {
            route: "w-ahead".into(),
            hour,
            counts: ficus::store::Counts {
                comparisons,
                divergences,
            },
        };
        // This hour: 1,000 comparisons, 30 divergences nobody explained. The next hour, from
        // a clock ahead: 30 divergences, each marked expected.
        proxy
            .ficus
            .store()
            .add_counts(
                "ahead-writer",
                1,
                &[delta(now_hour, 1000, 30), delta(now_hour + 1, 30, 30)],
            )
            .await
            .unwrap();
        let template = expected_record("w-ahead");
        let ahead = (now_hour + 1) * 3_600_000 + 60_000;
        for n in 0..30 {
            put_copy(&proxy, &template, ahead + u64::from(n), n, |_| {}).await;
        }
        let report = proxy.report().await;
        let route = report["routes"][0].clone();
        assert_eq!(route["route"], "w-ahead");
        assert_eq!(route["comparisons"]["window"], 1000, "{store}: {route}");
        assert_eq!(route["divergences"]["window"], 30, "{store}: {route}");
        assert_eq!(
            route["divergences"]["expected_in_window"], 0,
            "{store}: {route}"
        );
        assert_eq!(route["verdict"], "not-ready", "{store}: {route}");
    }
}

/// A record of `route` marked expected, built as the proxy builds one.
fn expected_record(route: &str) -> ficus::record::Record {
    let comparator = ficus::compare::Comparator::default();
    let headers = http::HeaderMap::new();
    let uri: http::Uri = "/x".parse().unwrap();
    let captured = || ficus::record::CapturedRef {
        status: 200,
        headers: &headers,
        body: b"{}",
        latency: std::time::Duration::from_millis(1),
    };
    let mut r = ficus::record::Record::build(
        ficus::record::Exchange {
            route,
            authority: ficus::rules::Side::Legacy,
            request_id: "rid",
            method: &http::Method::GET,
            uri: &uri,
            request_headers: &headers,
            request_body: b"",
            legacy: captured(),
            new: captured(),
            diffs: vec![ficus::compare::Difference::Status {
                old: 200,
                value: 500,
            }],
            noisy_diffs: Vec::new(),
            comparator: &comparator,
        },
        &ficus::record::Policy::default(),
        std::time::SystemTime::now(),
    );
    r.state = ficus::record::State::Expected;
    r
}

/// On Redis a page of the listing reads a bounded number of index entries, so a selective
/// filter can answer a short or empty page with a cursor to go on. `ficus divergences list`
/// follows that cursor: three open records behind 2,100 newer acknowledged ones of the same
/// route are listed, not an empty table that reads as "nothing open".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_what_a_selective_filter_finds_past_a_short_redis_page() {
    let redis = support::RedisServer::start().await;
    let legacy = diverging("legacy", 1).await;
    let new = diverging("new", 2).await;
    let url = redis.url();
    let proxy = TestProxy::start_with(RULES, legacy.url(), new.url(), |c| c.store = url).await;
    let c = client();
    for i in 0..3 {
        c.get(proxy.url(&format!("/api/orders/{i}")))
            .send()
            .await
            .unwrap();
    }
    let open = proxy.wait_records(3).await;
    assert_eq!(open.len(), 3);
    let newer: Vec<ficus::record::Record> = (0..2_100u64)
        .map(|i| {
            let mut r = open[0].clone();
            r.id = id_at(now_ms() + 60_000 + i, 1);
            r.state = ficus::record::State::Acknowledged;
            r
        })
        .collect();
    proxy.ficus.store().put(&newer).await.unwrap();
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, out, err) = ficus_cli(&[
        "divergences",
        "list",
        "--route",
        "orders",
        "--state",
        "open",
        "--admin",
        &admin,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    for r in &open {
        assert!(out.contains(&r.id), "{} missing from:\n{out}", r.id);
    }
    assert_eq!(out.lines().count(), 4, "a header and three rows:\n{out}");
}

/// The groups listing reads at most the newest 10,000 matching records. `ficus groups list`
/// says so when that cut a group short, as the workbench does, instead of printing a partial
/// count as if it were the group's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_group_counts_are_partial() {
    let (_l, _n, proxy) = setup(&[]).await;
    let records = proxy.records().await;
    let order = records.iter().find(|r| r.route == "orders").unwrap();
    let start = now_ms() - 2 * 3_600_000;
    let copies: Vec<ficus::record::Record> = (0..10_050u64)
        .map(|i| {
            let mut copy = order.clone();
            copy.id = id_at(start + i, 2);
            copy
        })
        .collect();
    proxy.ficus.store().put(&copies).await.unwrap();
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, out, err) =
        ficus_cli(&["groups", "list", "--route", "orders", "--admin", &admin]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10000"), "{out}");
    assert!(
        err.contains("newest 10,000") && err.contains("partial"),
        "no word that the count is partial:\n{out}\n{err}"
    );
}

/// A class set through the API is trimmed, as the classify rules' classes are: `defect ` typed
/// with a trailing space (or pasted) is the class `defect`, and blocks the verdict.
#[tokio::test]
async fn a_class_set_with_stray_spaces_is_the_class_itself() {
    let (_l, _n, proxy) = setup(&[]).await;
    let records = proxy.records().await;
    let order = records.iter().find(|r| r.route == "orders").unwrap();
    let patched: Value = client()
        .patch(proxy.admin_url(&format!("/api/divergences/{}", order.id)))
        .json(&json!({"class": " defect "}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["class"], "defect", "{patched}");
    let report = proxy.report().await;
    let orders = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "orders")
        .cloned()
        .unwrap();
    assert_eq!(orders["divergences"]["open_defects"], 1, "{orders}");
    // Only spaces clear the class, as an empty string does.
    let cleared: Value = client()
        .patch(proxy.admin_url(&format!("/api/divergences/{}", order.id)))
        .json(&json!({"class": "  "}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["class"], Value::Null, "{cleared}");
}

/// A replay goes without the redacted `authorization`: upstreams that check it refuse it on
/// both sides alike. Two identical 401s are no evidence that the divergence is gone; resolving
/// on them would close a defect nobody fixed and lift its block on the verdict.
#[tokio::test]
async fn a_replay_that_only_matches_on_a_refusal_resolves_nothing() {
    let authed = |name: &'static str, total: u32| {
        Backend::with_handler(name, move |req| {
            let signed_in = req.headers().contains_key("authorization");
            async move {
                let (status, body) = if signed_in {
                    (200, json!({"total": total}))
                } else {
                    (401, json!({"error": "sign in"}))
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(full(body.to_string()))
                    .unwrap()
            }
        })
    };
    let (legacy, new) = (authed("legacy", 1).await, authed("new", 2).await);
    let rules = "[[route]]\nname = \"replay-authed\"\n[route.shadow]\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    c.get(proxy.url("/api/statements/1"))
        .header("authorization", "Bearer user-secret")
        .send()
        .await
        .unwrap();
    let id = proxy.wait_records(1).await[0].id.clone();
    let resp = c
        .patch(proxy.admin_url(&format!("/api/divergences/{id}")))
        .json(&json!({"class": "defect"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let resp = c
        .post(proxy.admin_url(&format!("/api/divergences/{id}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["legacy"]["status"], 401, "{answer}");
    assert_eq!(answer["match"], true, "both sides refused alike: {answer}");
    assert_eq!(answer["reproduced"], false, "{answer}");
    assert!(
        answer["unconfirmed"].as_str().unwrap().contains("401"),
        "{answer}"
    );
    assert_eq!(
        answer["record"]["state"], "open",
        "a match on two refusals resolved the defect: {answer}"
    );
    let history = answer["record"]["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["what"]["replay"], "matched");
    let report = proxy.report().await;
    let route = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "replay-authed")
        .cloned()
        .unwrap();
    assert_eq!(route["divergences"]["open_defects"], 1, "{route}");

    // The same in a group, and from the CLI: neither says "resolved".
    let fp = proxy.records().await[0].fingerprint.clone();
    let group: Value = c
        .post(proxy.admin_url(&format!("/api/groups/{fp}/replay")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&group["matched"], &group["unconfirmed"], &group["replayed"]),
        (&json!(0), &json!(1), &json!(1)),
        "{group}"
    );
    assert_eq!(group["results"][0]["outcome"], "unconfirmed", "{group}");
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, out, err) = ficus_cli(&["divergences", "replay", &id, "--admin", &admin]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("is resolved"), "{out}");
    assert!(out.contains("stays open"), "{out}");
    let stored = proxy.ficus.store().get(&id).await.unwrap().unwrap();
    assert_eq!(stored.state, ficus::record::State::Open);
}

/// A new side that holds every replayed request until `release` gets permits, counting them
/// in `replays`; other requests it answers at once, diverging from `diverging("legacy", 1)`.
async fn held_new_side() -> (
    Backend,
    std::sync::Arc<tokio::sync::Semaphore>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let (gate, seen) = (release.clone(), replays.clone());
    let new = Backend::with_handler("new", move |req| {
        let replay = req.headers().contains_key("x-ficus-replay");
        let (gate, seen) = (gate.clone(), seen.clone());
        async move {
            if replay {
                seen.fetch_add(1, Ordering::SeqCst);
                let _permit = gate.acquire().await.unwrap();
            }
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json!({"total": 2}).to_string()))
                .unwrap()
        }
    })
    .await;
    (new, release, replays)
}

/// Records one write through `first`, replays it there (the new side holds it), and while it
/// waits replays it through `second`'s admin API, alone and as part of its group: both are
/// refused at once with `replay_in_progress`, and nothing goes out again. Returns the replay
/// path and the first replay, still waiting for `release`.
async fn a_second_replay_is_refused_while_the_first_waits(
    first: &TestProxy,
    second: &TestProxy,
    legacy: &Backend,
    replays: &std::sync::atomic::AtomicUsize,
) -> (String, tokio::task::JoinHandle<http::StatusCode>) {
    use std::sync::atomic::Ordering;
    let c = client();
    c.post(first.url("/api/payments"))
        .body("{\"amount\": 10}")
        .send()
        .await
        .unwrap();
    let record = first.wait_records(1).await.remove(0);
    let path = format!("/api/divergences/{}/replay?allow_writes=true", record.id);
    let pending = tokio::spawn({
        let (c, url) = (c.clone(), first.admin_url(&path));
        async move { c.post(url).send().await.unwrap().status() }
    });
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            replays.load(Ordering::SeqCst) == 1
        })
        .await,
        "the first replay never reached the new side"
    );
    let legacy_calls = legacy.count();
    // Refused at once; sent to the upstreams, it would wait on the held new side.
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.post(second.admin_url(&path)).send(),
    )
    .await
    .expect("the second replay went out too: it waits on the upstream")
    .unwrap();
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"], "replay_in_progress", "{body}");
    assert!(body.get("sent").is_none(), "{body}");
    let group: Value = c
        .post(second.admin_url(&format!(
            "/api/groups/{}/replay?allow_writes=true",
            record.fingerprint
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        group["results"][0]["error"], "replay_in_progress",
        "{group}"
    );
    assert_eq!(legacy.count(), legacy_calls, "the write went out again");
    assert_eq!(
        replays.load(Ordering::SeqCst),
        1,
        "the write went out again"
    );
    (path, pending)
}

/// A second replay of a record sent while the first still waits on the upstreams (a double
/// click, a script retrying after its own timeout) must not send the request again: for a
/// write, that is one more write on each side.
#[tokio::test]
async fn a_record_is_not_replayed_twice_at_once() {
    let legacy = diverging("legacy", 1).await;
    let (new, release, replays) = held_new_side().await;
    let rules = "[[route]]\nname = \"replay-once\"\n[route.shadow]\nwrites = true\n";
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let (path, first) =
        a_second_replay_is_refused_while_the_first_waits(&proxy, &proxy, &legacy, &replays).await;
    release.add_permits(10);
    assert_eq!(first.await.unwrap(), 200);
    // Once it has answered, the record can be replayed again.
    let again = client().post(proxy.admin_url(&path)).send().await.unwrap();
    assert_eq!(again.status(), 200);
}

/// Replicas share one Redis, and a replay can be sent to any of them (a load balancer in
/// front of the admin ports, a retry that lands elsewhere): the guard against two replays of
/// one record at once must hold across replicas, not only on the one that took the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_not_replayed_twice_at_once_across_replicas() {
    use std::sync::atomic::Ordering;
    let redis = support::RedisServer::start().await;
    let legacy = diverging("legacy", 1).await;
    let (new, release, replays) = held_new_side().await;
    let rules = "[[route]]\nname = \"replay-fleet\"\n[route.shadow]\nwrites = true\n";
    let start = |name: &'static str| {
        let (url, l, n) = (redis.url(), legacy.url(), new.url());
        async move {
            TestProxy::start_with(rules, l, n, |c| {
                c.store = url;
                c.records.instance = name.into();
            })
            .await
        }
    };
    let a = start("replica-a").await;
    let b = start("replica-b").await;
    let (path, first) =
        a_second_replay_is_refused_while_the_first_waits(&a, &b, &legacy, &replays).await;
    release.add_permits(10);
    assert_eq!(first.await.unwrap(), 200);
    // Once the first has answered, the claim is released: the other replica may replay.
    let c = client();
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || async {
            c.post(b.admin_url(&path)).send().await.unwrap().status() == 200
        })
        .await,
        "the claim of the first replay was never released"
    );
    assert_eq!(replays.load(Ordering::SeqCst), 2);
}

/// The CLI's error for a replay that failed after a request went out says so, as the API does
/// with `sent: true`: "502 ... (replay_failed)" alone reads as "nothing happened", and the
/// operator replays the write again.
#[tokio::test]
async fn the_cli_says_when_a_failed_replay_had_already_sent_its_request() {
    let (legacy, new, proxy) = setup(&[]).await;
    drop(new); // legacy answers, then new cannot be reached
    let id = proxy
        .records()
        .await
        .into_iter()
        .find(|r| r.route == "orders")
        .unwrap()
        .id;
    let before = legacy.count();
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, _, err) = ficus_cli(&["divergences", "replay", &id, "--admin", &admin]).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(legacy.count(), before + 1, "legacy did get the request");
    assert!(err.contains("replay_failed"), "{err}");
    assert!(err.contains("already gone out"), "{err}");
    // A refusal before anything was sent says nothing of the kind.
    let (code, _, err) =
        ficus_cli(&["divergences", "replay", "no-such-id", "--admin", &admin]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && !err.contains("gone out"), "{err}");
}

/// Without a token, reads are open, but not to a web page in a browser on this machine whose
/// name was rebound to 127.0.0.1 (DNS rebinding): to the browser, that page and the API are
/// one origin, so it would read every record. Its requests name the page's host.
#[tokio::test]
async fn without_a_token_a_page_with_a_rebound_name_cannot_read_the_records() {
    let (_l, _n, proxy) = setup(&[]).await;
    let c = client();
    let port = proxy.ficus.admin_addr().port();
    let evil = format!("evil.example:{port}");
    for path in ["/api/divergences", "/api/report", "/api/groups"] {
        let resp = c
            .get(proxy.admin_url(path))
            .header("host", &evil)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "cross_origin", "{path}: {body}");
    }
    // The workbench opened at localhost or 127.0.0.1, and the CLI, still read.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let resp = c
            .get(proxy.admin_url("/api/divergences"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
    }
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, _, err) = ficus_cli(&["divergences", "list", "--admin", &admin]).await;
    assert_eq!(code, 0, "{err}");
    // Health stays open whatever the Host.
    let resp = c
        .get(proxy.admin_url("/healthz"))
        .header("host", &evil)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// With the store out of reach, `GET /api/rules` must not answer "no overrides" while one is
/// in force (replicas keep applying what they last read): it answers 503, as documented.
#[tokio::test]
async fn the_rules_in_force_do_not_hide_an_override_when_the_store_is_down() {
    let mut redis = support::RedisServer::start().await;
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = "[[route]]\nname = \"rules-override\"\n[route.match]\npath_prefix = \"/api/\"\n";
    let url = redis.url();
    let proxy = TestProxy::start_with(rules, legacy.url(), new.url(), |c| c.store = url).await;
    let c = client();
    let resp = c
        .post(proxy.admin_url("/api/routes/rules-override/override"))
        .json(&json!({"authority": "new", "ttl": "1h", "reason": "legacy is down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rules: Value = proxy.admin_json("/api/rules").await;
    assert_eq!(rules["overrides"].as_array().unwrap().len(), 1, "{rules}");

    redis.kill();
    let resp = c.get(proxy.admin_url("/api/rules")).send().await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    // The override is still applied meanwhile.
    assert_eq!(
        support::backend_of(&c.get(proxy.url("/api/x")).send().await.unwrap()),
        "new"
    );
}

/// `divergences show` escapes the control characters of what it prints, so that a record
/// cannot send escape sequences to the operator's terminal: the note too, which anyone who
/// may change records writes (anonymously, from this machine, without a token).
#[tokio::test]
async fn the_cli_shows_a_note_without_its_control_characters() {
    let (_l, _n, proxy) = setup(&[]).await;
    let id = proxy.records().await[0].id.clone();
    let resp = client()
        .patch(proxy.admin_url(&format!("/api/divergences/{id}")))
        .json(&json!({"note": "looks fine\u{1b}]0;owned\u{7}\u{1b}[2J"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let admin = format!("http://{}", proxy.ficus.admin_addr());
    let (code, out, err) = ficus_cli(&["divergences", "show", &id, "--admin", &admin]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("note: looks fine"), "{out}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n'),
        "control characters reach the terminal: {out:?}"
    );
}

/// The admin port shares the process's file descriptors with the proxy, and `axum::serve`
/// bounds neither the connections nor how long one may sit idle: clients that opened
/// connections and left them could take the descriptors the proxy needs. A slow answer is
/// not idleness.
#[tokio::test]
async fn the_admin_listener_bounds_its_connections_and_closes_idle_ones() {
    use ficus::admin::listener::{AdminListener, Peer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = AdminListener::new(tcp, 2, std::time::Duration::from_millis(300));
    let app = axum::Router::new()
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
                "done"
            }),
        )
        .layer(axum::middleware::from_fn(ficus::admin::listener::busy));
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await
    });
    // An answer that takes longer than the idle timeout still arrives, and the connection
    // it came on stays usable.
    let c = client();
    let url = format!("http://{addr}/slow");
    for _ in 0..2 {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "done");
    }
    drop(c);
    // A connection that sends nothing is closed after the idle timeout.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("an idle admin connection was still open 10 s later");
    assert!(matches!(read, Ok(0) | Err(_)));
    // Past the limit (2), a connection is closed at once, unanswered.
    let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("the connection past the limit was still open 10 s later");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.abort();
}
