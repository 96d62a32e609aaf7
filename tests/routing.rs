//! End to end: every rule feature routes real requests to the right real backend.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use support::{Backend, TestProxy, backend_of, client};

const RULES: &str = r#"
[upstreams]
orders-svc = "${FICUS_TEST_SURELY_UNSET:-http://ORDERS_ADDR}"

[[route]]
name = "exact"
priority = 30
authority = "new"
[route.match]
path = "/api/orders/special"

[[route]]
name = "orders-read"
priority = 10
authority = "new"
new = "orders-svc"
[route.match]
path = "/api/orders/{id}"
methods = ["GET", "HEAD"]

[[route]]
name = "catalog-prefix"
authority = "new"
[route.match]
path_prefix = "/api/catalog/"

[[route]]
name = "tenant"
priority = 20
authority = "new"
[route.match]
path = "/api/**"
headers = { "X-Tenant" = "acme" }

[[route]]
name = "beta"
priority = 20
authority = "new"
[route.match]
path = "/api/**"
query = { "beta" = "yes please" }

[[route]]
name = "shop-host"
priority = 5
authority = "new"
[route.match]
host = "shop.example.com"

[[route]]
name = "legacy-owned"
priority = 40
authority = "legacy"
[route.match]
path = "/api/catalog/legacy-only"
"#;

async fn setup() -> (Backend, Backend, Backend, TestProxy) {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let orders = Backend::start("orders").await;
    let rules = RULES.replace("ORDERS_ADDR", &orders.addr.to_string());
    let proxy = TestProxy::start(&rules, legacy.url(), new.url()).await;
    (legacy, new, orders, proxy)
}

#[tokio::test]
async fn every_rule_feature_routes_to_the_right_side() {
    let (legacy, new, orders, proxy) = setup().await;
    let c = client();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        // exact beats template by priority
        ("GET", "/api/orders/special", &[], "new"),
        // template + methods -> the named upstream playing "new"
        ("GET", "/api/orders/17", &[], "orders"),
        ("HEAD", "/api/orders/17", &[], "orders"),
        // method not listed: falls through to the default route (legacy)
        ("POST", "/api/orders/17", &[], "legacy"),
        // template segment must be non-empty and exactly one segment
        ("GET", "/api/orders/17/lines", &[], "legacy"),
        // prefix
        ("GET", "/api/catalog/lamp", &[], "new"),
        ("GET", "/api/catalogue", &[], "legacy"),
        // a higher-priority legacy-owned carve-out inside the prefix
        ("GET", "/api/catalog/legacy-only", &[], "legacy"),
        // header condition (name case-insensitive) outranks the template route
        ("GET", "/api/orders/17", &[("x-tenant", "acme")], "new"),
        ("GET", "/api/other", &[("X-TENANT", "acme")], "new"),
        ("GET", "/api/other", &[("x-tenant", "globex")], "legacy"),
        // query condition, percent-decoded
        ("GET", "/api/other?beta=yes%20please", &[], "new"),
        ("GET", "/api/other?beta=yes+please&x=1", &[], "new"),
        ("GET", "/api/other?beta=no", &[], "legacy"),
        // host condition (case-insensitive, port ignored)
        (
            "GET",
            "/anything",
            &[("host", "Shop.Example.com:8080")],
            "new",
        ),
        (
            "GET",
            "/anything",
            &[("host", "other.example.com")],
            "legacy",
        ),
        // default route
        ("GET", "/", &[], "legacy"),
    ];
    for (method, path, headers, want) in cases {
        let mut req = c.request(method.parse().unwrap(), proxy.url(path));
        for (k, v) in *headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{method} {path}");
        assert_eq!(backend_of(&resp), *want, "{method} {path} {headers:?}");
    }
    assert!(legacy.count() > 0 && new.count() > 0 && orders.count() == 2);
    // Path and query reach the upstream untouched.
    let last = legacy
        .seen()
        .into_iter()
        .find(|s| s.uri.query() == Some("beta=no"))
        .unwrap();
    assert_eq!(last.uri.path(), "/api/other");
}

#[tokio::test]
async fn canary_keys_stick_to_one_side() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let rules = r#"
[[route]]
name = "catalog"
[route.match]
path_prefix = "/api/catalog/"
[route.canary]
percent = 50.0
key = "header:x-customer-id"
"#;
    let proxy = TestProxy::start(rules, legacy.url(), new.url()).await;
    let c = client();
    let mut sides = std::collections::HashSet::new();
    for customer in 0..40 {
        let mut first = None;
        for _ in 0..3 {
            let resp = c
                .get(proxy.url("/api/catalog/lamp"))
                .header("x-customer-id", format!("customer-{customer}"))
                .send()
                .await
                .unwrap();
            let side = backend_of(&resp);
            assert_eq!(
                first.get_or_insert(side.clone()),
                &side,
                "customer {customer}"
            );
        }
        sides.insert(first.unwrap());
    }
    // With 40 keys at 50%, both sides are used (the chance of one side only is 2^-39).
    assert_eq!(sides.len(), 2);
    // Without the key, the request stays on the route's authority.
    for _ in 0..5 {
        let resp = c.get(proxy.url("/api/catalog/lamp")).send().await.unwrap();
        assert_eq!(backend_of(&resp), "legacy");
    }
}
