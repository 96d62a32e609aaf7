//! Fuzzes the routing rules loader (`rules::load_sources`): any text, as one rules file, is
//! either a rule set or a list of diagnostics, never a panic. A rule set that loads is then
//! exercised by the route matcher on a few fixed requests, and `find` (the index) must agree
//! with `explain` (every route one by one) on the winner, as `src/route/tests.rs` requires.
//!
//! A line `#> /some/path` (a TOML comment, so the parser ignores it) adds a request for that
//! path, which lets the fuzzer steer requests into the routes it wrote.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ficus::route::{self, RequestHead};
use ficus::rules::{self, RuleSet};
use http::{HeaderMap, HeaderValue, Method, header};
use libfuzzer_sys::fuzz_target;

/// A fixed environment: one set URL, one empty and one malformed value, the rest unset.
fn env(name: &str) -> Option<String> {
    match name {
        "ORDERS_URL" => Some("http://127.0.0.1:7001".to_string()),
        "BILLING_URL" => Some("https://billing.internal:8443".to_string()),
        "EMPTY" => Some(String::new()),
        "BAD_URL" => Some("not a url ${ORDERS_URL}".to_string()),
        _ => None,
    }
}

struct Request {
    method: Method,
    path: String,
    query: Option<&'static str>,
    host: Option<&'static str>,
    headers: HeaderMap,
    client_ip: IpAddr,
}

fn fixed_requests() -> Vec<Request> {
    let mut customer = HeaderMap::new();
    customer.insert("x-customer-id", HeaderValue::from_static("7"));
    customer.insert("x-tenant", HeaderValue::from_static("acme"));
    customer.insert(
        header::COOKIE,
        HeaderValue::from_static("session=abc; uid=42"),
    );
    vec![
        Request {
            method: Method::GET,
            path: "/api/orders/42".to_string(),
            query: Some("v=2&uid=9"),
            host: Some("shop.example.com"),
            headers: customer.clone(),
            client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
        },
        Request {
            method: Method::POST,
            path: "/api/orders/42/items".to_string(),
            query: None,
            host: None,
            headers: HeaderMap::new(),
            client_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        },
        Request {
            method: Method::GET,
            path: "/".to_string(),
            query: Some(""),
            host: Some("[::1]"),
            headers: customer,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
    ]
}

fn check(rules: &RuleSet, req: &Request) {
    let head = RequestHead {
        method: &req.method,
        path: &req.path,
        query: req.query,
        host: req.host,
        headers: &req.headers,
        client_ip: req.client_ip,
    };
    let found = route::find(rules, &head);
    let explained = route::explain(rules, &head);
    assert_eq!(
        found.route.name, explained.decision.route.name,
        "find and explain disagree on {} {}",
        req.method, req.path
    );
    assert_eq!(found.authority, explained.decision.authority);
    assert_eq!(found.canaried, explained.decision.canaried);
    // The upstream indices must point into the rule set's upstreams.
    assert!(found.authority_upstream() < rules.upstreams.len());
    assert!(found.other_upstream() < rules.upstreams.len());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sources = vec![(PathBuf::from("fuzz.toml"), text.to_string())];
    let Ok(loaded) = rules::load_sources(sources, &env) else {
        return;
    };
    let mut requests = fixed_requests();
    for line in text.lines() {
        let Some(path) = line.strip_prefix("#>") else {
            continue;
        };
        // The proxy matches the canonical path; a path without one is answered 400.
        if let Ok(path) = route::path::normalize(path.trim()) {
            requests.push(Request {
                method: Method::GET,
                path: path.into_owned(),
                query: Some("v=2"),
                host: Some("shop.example.com"),
                headers: HeaderMap::new(),
                client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            });
        }
    }
    for req in &requests {
        check(&loaded.rules, req);
    }
});
