//! Route matching cost: `route::find` over rule sets of 10, 1,000 and 10,000 routes, for a
//! request that hits a route near the end of the precedence list, one that matches no route
//! (the default route to legacy) and one on a canary route (which also hashes the cohort key).
//!
//! `find` runs once for every proxied request, and the route index promises a cost that follows
//! the depth of the request path, not the number of routes. Flat figures across the three sizes
//! keep that promise; a figure that grows with the size means a linear scan crept back in.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use ficus::route::{self, RequestHead};
use ficus::rules::{self, RuleSet};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// Routes per generated file, as a team would split a large rule set into a directory.
const ROUTES_PER_FILE: usize = 1_000;

/// What route `i` of a generated rule set looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `path = "/api/svc{i}/items/{id}"` with a method list: most routes.
    Items,
    /// `path_prefix = "/static/svc{i}/"`.
    Prefix,
    /// A template that also needs `x-tenant`, at a higher priority (tenant-by-tenant moves).
    Tenant,
    /// `/api/svc{i}/catalog/**` with a 5% canary keyed by `x-customer-id`.
    Canary,
}

fn kind(i: usize) -> Kind {
    match (i % 100, i % 10) {
        (5, _) => Kind::Canary,
        (_, 3) => Kind::Prefix,
        (_, 8) => Kind::Tenant,
        _ => Kind::Items,
    }
}

fn route_toml(i: usize, out: &mut String) {
    let authority = if i.is_multiple_of(2) { "legacy" } else { "new" };
    let methods = [
        "\"GET\", \"HEAD\"",
        "\"GET\", \"POST\"",
        "\"GET\", \"PUT\", \"DELETE\"",
    ][i % 3];
    let _ = writeln!(out, "[[route]]\nname = \"svc{i}-{}\"", name_suffix(kind(i)));
    match kind(i) {
        Kind::Items => {
            let _ = writeln!(
                out,
                "authority = \"{authority}\"\n[route.match]\npath = \"/api/svc{i}/items/{{id}}\"\nmethods = [{methods}]"
            );
        }
        Kind::Prefix => {
            let _ = writeln!(
                out,
                "authority = \"{authority}\"\n[route.match]\npath_prefix = \"/static/svc{i}/\""
            );
        }
        Kind::Tenant => {
            let _ = writeln!(
                out,
                "priority = 10\nauthority = \"new\"\n[route.match]\npath = \"/api/svc{i}/orders/{{id}}\"\n\
                 methods = [\"GET\"]\nheaders = {{ \"x-tenant\" = \"tenant-{i}\" }}"
            );
        }
        Kind::Canary => {
            let _ = writeln!(
                out,
                "authority = \"legacy\"\n[route.match]\npath = \"/api/svc{i}/catalog/**\"\n\
                 [route.canary]\npercent = 5.0\nkey = \"header:x-customer-id\""
            );
        }
    }
    out.push('\n');
}

fn name_suffix(kind: Kind) -> &'static str {
    match kind {
        Kind::Items => "items",
        Kind::Prefix => "static",
        Kind::Tenant => "tenant-orders",
        Kind::Canary => "catalog-canary",
    }
}

/// Builds a rule set of `n` routes through the real loader (parse, validate, index).
fn rule_set(n: usize) -> RuleSet {
    let mut sources = Vec::new();
    for start in (0..n).step_by(ROUTES_PER_FILE) {
        let mut text = String::new();
        for i in start..n.min(start + ROUTES_PER_FILE) {
            route_toml(i, &mut text);
        }
        let file = PathBuf::from(format!(
            "routing-rules/{:02}-bench.toml",
            start / ROUTES_PER_FILE
        ));
        sources.push((file, text));
    }
    match rules::load_sources(sources, &|_| None) {
        Ok(loaded) => loaded.rules,
        Err(diags) => {
            let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
            panic!("generated rules are invalid:\n{}", lines.join("\n"));
        }
    }
}

/// The last route of `kind` among the first `n` (the end of the precedence list for that kind).
fn last_of(n: usize, wanted: Kind) -> usize {
    match (0..n).rev().find(|&i| kind(i) == wanted) {
        Some(i) => i,
        None => panic!("no route of the wanted kind among {n}"),
    }
}

/// Request headers a browser or API client behind a load balancer typically sends.
fn client_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "shop.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) ficus-bench"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("x-request-id", "3f1c2a9e-6b1d-4c55-9a53-0d6f1e2b7c44"),
        ("x-forwarded-for", "198.51.100.23"),
        ("x-tenant", "tenant-unknown"),
        ("x-customer-id", "1001"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

struct Case {
    id: &'static str,
    uri: Uri,
    /// The route `find` must pick, checked once before timing.
    expect: String,
}

fn cases(n: usize) -> Vec<Case> {
    let hit = last_of(n, Kind::Items);
    let canary = last_of(n, Kind::Canary);
    let parse = |s: String| match s.parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => panic!("bad bench URI {s}: {e}"),
    };
    vec![
        Case {
            id: "hit_last",
            uri: parse(format!("/api/svc{hit}/items/42?expand=price")),
            expect: format!("svc{hit}-items"),
        },
        // Shares the first two segments with real routes, then falls through to the default.
        Case {
            id: "no_match",
            uri: parse(format!("/api/svc{hit}/invoices/42")),
            expect: "default".to_string(),
        },
        Case {
            id: "canary",
            uri: parse(format!("/api/svc{canary}/catalog/lamps/7")),
            expect: format!("svc{canary}-catalog-canary"),
        },
    ]
}

fn bench_find(c: &mut Criterion) {
    let method = Method::GET;
    let headers = client_headers();
    let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 23));
    let mut group = c.benchmark_group("route_find");
    for n in SIZES {
        let rules = rule_set(n);
        assert_eq!(rules.routes.len(), n, "every generated route must load");
        for case in cases(n) {
            let head = RequestHead::new(&method, &case.uri, &headers, ip);
            let decision = route::find(&rules, &head);
            assert_eq!(
                &*decision.route.name, case.expect,
                "{} with {n} routes",
                case.id
            );
            group.bench_with_input(BenchmarkId::new(case.id, n), &head, |b, head| {
                b.iter(|| route::find(black_box(&rules), black_box(head)));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_find);
criterion_main!(benches);
