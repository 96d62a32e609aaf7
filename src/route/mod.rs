//! Pure route matching: `find(&RuleSet, &RequestHead) -> Decision`. No I/O, no clock, no
//! randomness: the same request head and rules always give the same decision, which is what
//! makes canary cohorts sticky and lets `rules explain` say exactly what the proxy will do.

mod index;
pub mod path;

use std::net::IpAddr;

use http::{HeaderMap, Method, Uri};
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub(crate) use index::Index;

use crate::rules::{CohortKey, Route, RuleSet, Side};

/// What matching needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Host without port, as the client sent it (URI authority, else the `Host` header).
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub client_ip: IpAddr,
}

impl<'a> RequestHead<'a> {
    pub fn new(
        method: &'a Method,
        uri: &'a Uri,
        headers: &'a HeaderMap,
        client_ip: IpAddr,
    ) -> Self {
        let host = uri.host().or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
        });
        Self {
            method,
            path: uri.path(),
            query: uri.query(),
            host,
            headers,
            client_ip,
        }
    }

    pub fn from_request<B>(req: &'a http::Request<B>, client_ip: IpAddr) -> Self {
        Self::new(req.method(), req.uri(), req.headers(), client_ip)
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// The outcome of routing one request.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'r> {
    pub route: &'r Route,
    /// The side whose response the client gets (the route's authority, or the other side for
    /// requests in the canary cohort).
    pub authority: Side,
    pub canaried: bool,
}

impl Decision<'_> {
    /// Index into `RuleSet::upstreams` of the upstream that answers the client.
    pub fn authority_upstream(&self) -> usize {
        self.route.upstream(self.authority)
    }

    /// Index of the upstream on the other side (the shadow target).
    pub fn other_upstream(&self) -> usize {
        self.route.upstream(self.authority.other())
    }
}

/// Routes a request: the best matching route (highest priority, then first written), or the
/// default route to legacy; then the canary decides the authority.
pub fn find<'r>(rules: &'r RuleSet, req: &RequestHead<'_>) -> Decision<'r> {
    let route = rules
        .index
        .best(&rules.routes, req)
        .map_or(&rules.default_route, |rank| &rules.routes[rank]);
    decide(route, req)
}

fn decide<'r>(route: &'r Route, req: &RequestHead<'_>) -> Decision<'r> {
    let canaried = route.canary.as_ref().is_some_and(|c| {
        cohort_position(&route.name, &c.key, req).is_some_and(|pos| pos * 100.0 < c.percent)
    });
    let authority = if canaried {
        route.authority.other()
    } else {
        route.authority
    };
    Decision {
        route,
        authority,
        canaried,
    }
}

/// "ficus" in ASCII.
const COHORT_SEED: u64 = 0x0066_6963_7573;

/// A request's stable position in `[0, 1)` for a route's cohort key, or `None` when the
/// request does not carry the key. Canary and shadow sampling share it, so the keys shadowed
/// at `sample = 0.05` are the keys a `percent = 5` canary moves later.
pub fn cohort_position(route: &str, key: &CohortKey, req: &RequestHead<'_>) -> Option<f64> {
    // The seed is fixed forever: changing it would reshuffle every cohort.
    let seed = xxh3_64_with_seed(route.as_bytes(), COHORT_SEED);
    let hash = match key {
        CohortKey::Header(name) => xxh3_64_with_seed(req.headers.get(name)?.as_bytes(), seed),
        CohortKey::Cookie(name) => xxh3_64_with_seed(cookie(req.headers, name)?.as_bytes(), seed),
        CohortKey::Query(name) => xxh3_64_with_seed(query_value(req.query, name)?.as_bytes(), seed),
        CohortKey::ClientIp => match req.client_ip.to_canonical() {
            IpAddr::V4(ip) => xxh3_64_with_seed(&ip.octets(), seed),
            IpAddr::V6(ip) => xxh3_64_with_seed(&ip.octets(), seed),
        },
    };
    // The top 53 bits make an exactly representable, uniform f64 in [0, 1).
    Some((hash >> 11) as f64 / (1u64 << 53) as f64)
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Every condition of `route` except the path (which the index has already checked).
pub(crate) fn conditions_match(route: &Route, req: &RequestHead<'_>) -> bool {
    route
        .methods
        .as_ref()
        .is_none_or(|m| m.contains(req.method))
        && route
            .host
            .as_ref()
            .is_none_or(|h| req.host.is_some_and(|host| h.matches(host)))
        && route
            .headers
            .iter()
            .all(|(k, v)| req.headers.get_all(k).iter().any(|have| have == v))
        && (route.query.is_empty() || query_matches(route, req.query))
}

fn query_matches(route: &Route, query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    route.query.iter().all(|(k, v)| {
        form_urlencoded::parse(query.as_bytes()).any(|(qk, qv)| qk == **k && qv == **v)
    })
}

/// Why each route does or does not match a request, for `ficus rules explain`.
#[derive(Debug)]
pub struct Explanation<'r> {
    pub decision: Decision<'r>,
    /// Every route in precedence order with the conditions it failed (empty when it matched).
    pub routes: Vec<(&'r Route, Vec<String>)>,
    /// The canary key's value position, when the winning route has a canary.
    pub cohort: Option<Option<f64>>,
}

/// Evaluates every route one by one, independent of the index, and reports why each one
/// does not match. The winner is the first matching route, as [`find`] decides.
pub fn explain<'r>(rules: &'r RuleSet, req: &RequestHead<'_>) -> Explanation<'r> {
    let routes: Vec<(&Route, Vec<String>)> = rules
        .routes
        .iter()
        .map(|r| (r, mismatches(r, req)))
        .collect();
    let route = routes
        .iter()
        .find(|(_, why)| why.is_empty())
        .map_or(&rules.default_route, |(r, _)| *r);
    let cohort = route
        .canary
        .as_ref()
        .map(|c| cohort_position(&route.name, &c.key, req));
    Explanation {
        decision: decide(route, req),
        routes,
        cohort,
    }
}

fn mismatches(route: &Route, req: &RequestHead<'_>) -> Vec<String> {
    let mut why = Vec::new();
    if !route.path.matches(req.path) {
        why.push(format!("path {} does not match `{}`", req.path, route.path));
    }
    if let Some(methods) = &route.methods
        && !methods.contains(req.method)
    {
        let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
        why.push(format!(
            "method {} is not in [{}]",
            req.method,
            list.join(", ")
        ));
    }
    if let Some(host) = &route.host
        && !req.host.is_some_and(|h| host.matches(h))
    {
        why.push(format!(
            "host {} is not {host}",
            req.host.unwrap_or("(none)")
        ));
    }
    for (k, v) in &route.headers {
        if !req.headers.get_all(k).iter().any(|have| have == v) {
            let have = req
                .headers
                .get(k)
                .map_or("absent".to_string(), |h| format!("{h:?}"));
            why.push(format!("header {k} is {have}, wants {v:?}"));
        }
    }
    for (k, v) in &route.query {
        // Any occurrence may match, as in `query_matches`.
        let values: Vec<String> = req
            .query
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .filter(|(qk, _)| qk == &**k)
                    .map(|(_, qv)| qv.into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !values.iter().any(|have| have == &**v) {
            let have = if values.is_empty() {
                "absent".to_string()
            } else {
                format!("{values:?}")
            };
            why.push(format!("query {k} is {have}, wants {v:?}"));
        }
    }
    why
}

#[cfg(test)]
mod tests;
