//! The orchestrator: one exchange, top to bottom. Route the request, rewrite its head,
//! forward it to the authority, stream the response back. Later stages (shadow, compare,
//! record) hook in here: the decision already names the other side, and both bodies pass
//! through this function as streams that can be teed.

mod body;
pub mod error;
pub mod headers;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::route::{self, Decision, RequestHead};
use crate::rules::{RuleSet, Side};
use crate::shadow::{
    Admission, AuthorityResult, MirroredHead, Outcome, RouteContext, Shadower, Ticket,
};
use crate::upstream::{Body, BoxError, ClientCache, Defaults, Upstream};
use body::{Progress, ProgressClock};
use error::{ProxyError, rescue};
use metrics::SnapshotMetrics;

/// What one published rules snapshot needs at request time: rules and their upstreams.
pub struct Live {
    pub rules: RuleSet,
    pub upstreams: Vec<Upstream>,
    metrics: SnapshotMetrics,
}

impl Live {
    fn new(rules: RuleSet, upstreams: Vec<Upstream>) -> Live {
        let metrics = SnapshotMetrics::new(rules.routes.len());
        Live {
            rules,
            upstreams,
            metrics,
        }
    }
}

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer is in `--trusted-proxies`: its `X-Forwarded-*` headers are believed.
    pub trusted: bool,
}

/// A fleet-wide emergency override in force on this replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteOverride {
    pub authority: Option<Side>,
    pub shadow: Option<bool>,
    pub until_ms: u64,
}

/// Shared proxy state. Requests read the live snapshot once; reloads publish a new one.
pub struct Proxy {
    live: ArcSwap<Live>,
    /// Overrides by route name, synced from the store every second.
    overrides: ArcSwap<std::collections::HashMap<Arc<str>, RouteOverride>>,
    clients: Arc<ClientCache>,
    defaults: Defaults,
    shadow: Arc<Shadower>,
    limits: crate::server::Limits,
}

impl Proxy {
    pub fn new(
        rules: RuleSet,
        clients: Arc<ClientCache>,
        defaults: Defaults,
        shadow: Arc<Shadower>,
        limits: crate::server::Limits,
    ) -> Proxy {
        let upstreams = clients.upstreams(&rules.upstreams, &defaults);
        Proxy {
            live: ArcSwap::from_pointee(Live::new(rules, upstreams)),
            overrides: ArcSwap::default(),
            clients,
            defaults,
            shadow,
            limits,
        }
    }

    /// The client-facing limits this proxy enforces.
    pub fn limits(&self) -> &crate::server::Limits {
        &self.limits
    }

    pub fn shadow(&self) -> &Arc<Shadower> {
        &self.shadow
    }

    /// Publishes a new rule set atomically: requests already routed keep the old snapshot.
    pub fn install(&self, rules: RuleSet) {
        let upstreams = self.clients.upstreams(&rules.upstreams, &self.defaults);
        self.live.store(Arc::new(Live::new(rules, upstreams)));
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The overrides this replica applies now.
    pub fn overrides(&self) -> Arc<std::collections::HashMap<Arc<str>, RouteOverride>> {
        self.overrides.load_full()
    }

    /// Reads the overrides from the store and applies the unexpired ones.
    pub async fn sync_overrides(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<(), crate::store::StoreError> {
        let now = crate::store::writer::now_ms();
        let stored = store.overrides().await?;
        let map: std::collections::HashMap<Arc<str>, RouteOverride> = stored
            .into_iter()
            .filter(|o| o.until_ms > now)
            .map(|o| {
                let authority = match o.authority.as_deref() {
                    Some("legacy") => Some(Side::Legacy),
                    Some("new") => Some(Side::New),
                    _ => None,
                };
                (
                    Arc::from(o.route.as_str()),
                    RouteOverride {
                        authority,
                        shadow: o.shadow,
                        until_ms: o.until_ms,
                    },
                )
            })
            .collect();
        let old = self.overrides.load_full();
        if *old != map {
            for route in old.keys().filter(|r| !map.contains_key(*r)) {
                ::metrics::gauge!(crate::telemetry::ROUTE_OVERRIDE, "route" => route.clone())
                    .set(0.0);
            }
            for route in map.keys() {
                ::metrics::gauge!(crate::telemetry::ROUTE_OVERRIDE, "route" => route.clone())
                    .set(1.0);
            }
            if !map.is_empty() {
                tracing::warn!(routes = ?map.keys().collect::<Vec<_>>(), "emergency overrides in force");
            }
            self.overrides.store(Arc::new(map));
        }
        Ok(())
    }

    /// Handles one exchange. Never fails: every error becomes a response.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let live = self.live.load_full();
        let request_id = headers::ensure_request_id(req.headers_mut());
        // The shadow marker is ficus's to set: a client that sends it would make the authority
        // treat its real request as a mirror (and skip its side effects).
        req.headers_mut().remove(&self.shadow.settings().header);
        // One path for matching and forwarding: no spelling of a path can match one route
        // and reach the upstream as a path another route owns.
        let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > self.limits.max_uri_bytes {
            let limit = self.limits.max_uri_bytes;
            return reject(ProxyError::UriTooLong { limit }, &req, &request_id);
        }
        if let Err(e) = canonicalize(&mut req) {
            return reject(e, &req, &request_id);
        }
        if let Some(e) =
            refused_before_routing(req.method(), req.uri(), req.version(), req.headers())
        {
            return reject(e, &req, &request_id);
        }
        let trace_id = headers::ensure_traceparent(req.headers_mut());
        let upgrade = headers::is_upgrade_request(&req);
        let client_ip = self.limits.client_ip(&conn, req.headers());
        let head = RequestHead::from_request(&req, client_ip);
        let mut decision = route::find(&live.rules, &head);
        // An emergency override beats the rules (and the canary) until it expires.
        let mut shadow_off = false;
        let overrides = self.overrides.load();
        if !overrides.is_empty()
            && let Some(o) = overrides.get(&*decision.route.name)
            && o.until_ms > crate::store::writer::now_ms()
        {
            if let Some(side) = o.authority {
                decision.authority = side;
                decision.canaried = false;
            }
            shadow_off = o.shadow == Some(false);
        }
        drop(overrides);
        let route = decision.route;
        let side = decision.authority;
        let upstream = &live.upstreams[decision.authority_upstream()];
        let route_metrics = live.metrics.route(route.rank, &route.name);
        // Shadowing is decided up front and never waited on.
        let admission = match (&route.shadow, &route.comparator) {
            (Some(_), Some(_)) if !shadow_off => Some(self.shadow.admit(route, &head, upgrade)),
            _ => None,
        };
        let method = req.method().clone();
        let uri = req.uri().clone();
        // A body announced over the limit is refused before any upstream sees it; one of
        // unannounced size is cut off when it passes the limit.
        let body_limit = route.max_request_body.or(self.limits.max_request_body);
        if let Some(limit) = body_limit
            && hyper::body::Body::size_hint(req.body()).lower() > limit
        {
            // Every request of a shadowed route still ends in exactly one outcome.
            let counters = || route_metrics.shadow(&self.shadow, &route.name);
            match admission {
                Some(Admission::Mirror(_)) => counters().count(Outcome::SkippedBodyLimit),
                Some(Admission::Skip(outcome)) => counters().count(outcome),
                None => {}
            }
            let mut resp = reject(ProxyError::BodyTooLarge { limit }, &req, &request_id);
            announce_close(&mut resp, req.version());
            return resp;
        }
        let version = req.version();
        let req = req.map(|b| body::Capped::new(b, body_limit));

        let result = match admission {
            Some(Admission::Mirror(ticket)) => {
                self.forward_mirrored(ticket, req, &live, &decision, conn, &request_id)
                    .await
            }
            Some(Admission::Skip(outcome)) => {
                route_metrics
                    .shadow(&self.shadow, &route.name)
                    .count(outcome);
                forward(req, upstream, side, conn, &request_id).await
            }
            None => forward(req, upstream, side, conn, &request_id).await,
        };
        let response = match result {
            Ok(resp) => {
                route_metrics.upstream(side, start.elapsed());
                resp
            }
            Err(e) => {
                ::metrics::counter!(
                    crate::telemetry::UPSTREAM_ERRORS_TOTAL,
                    "route" => route.name.clone(),
                    "side" => side.as_str(),
                    "kind" => e.kind(),
                )
                .increment(1);
                if e.is_client() {
                    debug!(
                        error = %e,
                        route = %route.name,
                        request_id = request_id.to_str().unwrap_or_default(),
                        "request failed on the client's side"
                    );
                } else {
                    warn!(
                        error = %e,
                        route = %route.name,
                        side = side.as_str(),
                        upstream = %upstream.name,
                        request_id = request_id.to_str().unwrap_or_default(),
                        "upstream request failed"
                    );
                }
                let mut resp = rescue(&e, &route.name, Some(&upstream.name), &request_id);
                if e.leaves_body_unread() {
                    announce_close(&mut resp, version);
                }
                resp
            }
        };
        let elapsed = start.elapsed();
        route_metrics.request(side, response.status().as_u16(), elapsed);
        info!(
            target: "ficus::access",
            route = %route.name,
            authority = side.as_str(),
            canary = decision.canaried,
            method = %method,
            path = uri.path(),
            status = response.status().as_u16(),
            latency_ms = elapsed.as_micros() as f64 / 1e3,
            request_id = request_id.to_str().unwrap_or_default(),
            trace_id = %trace_id,
        );
        response
    }

    /// Forwards to the authority while teeing both bodies to a shadow task that calls the
    /// other side and compares. The client's response does not wait on the shadow.
    #[allow(clippy::too_many_arguments)]
    async fn forward_mirrored(
        &self,
        ticket: Ticket,
        req: Request<body::Capped<Incoming>>,
        live: &Live,
        decision: &Decision<'_>,
        conn: ConnInfo,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let route = decision.route;
        let upstream = &live.upstreams[decision.authority_upstream()];
        let (parts, body) = req.into_parts();
        let head = MirroredHead {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            conn,
            request_id: request_id.clone(),
        };
        let (body, request_body) = self.shadow.tee_request(&ticket, body);
        let reservation = ticket.reservation().clone();
        let (authority_tx, authority_rx) = oneshot::channel();
        let counters = live.metrics.route(route.rank, &route.name);
        let context = RouteContext {
            name: route.name.clone(),
            counters: counters.shadow(&self.shadow, &route.name).clone(),
            authority: decision.authority,
            comparator: route.comparator.clone().unwrap_or_default(),
            noise_probe: route.shadow.as_ref().map_or(0.0, |s| s.noise_probe),
            timeout: route
                .shadow
                .as_ref()
                .and_then(|s| s.timeout)
                .unwrap_or(self.shadow.settings().timeout),
            classify: route.classify.clone(),
            shadow: live.upstreams[decision.other_upstream()].clone(),
            legacy: live.upstreams[route.legacy].clone(),
        };
        tokio::spawn(
            self.shadow
                .clone()
                .run(ticket, context, head, request_body, authority_rx),
        );
        let req = Request::from_parts(parts, body);
        match forward(req, upstream, decision.authority, conn, request_id).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let (body, response_body) = self.shadow.tee_response(&reservation, body);
                let _ = authority_tx.send(AuthorityResult::Response {
                    status: parts.status,
                    headers: parts.headers.clone(),
                    body: response_body,
                });
                Ok(Response::from_parts(parts, body.boxed_unsync()))
            }
            Err(e) => {
                // A client that failed its upload aborts the shadow; it is no authority error.
                // A body cut off at the route's limit skips it, as one refused before
                // forwarding does.
                if let ProxyError::BodyTooLarge { .. } = e {
                    let _ = authority_tx.send(AuthorityResult::BodyTooLarge);
                } else if !e.is_client() {
                    let _ = authority_tx.send(AuthorityResult::Failed);
                }
                Err(e)
            }
        }
    }
}

/// Rewrites a client request for `upstream`: URI, version, hop-by-hop headers,
/// `X-Forwarded-*`, `Via` and `Host`. Shared by the authority call and the shadow call.
pub(crate) fn upstream_request<B>(
    mut req: Request<B>,
    upstream: &Upstream,
    conn: ConnInfo,
    upgrade: bool,
) -> Result<Request<B>, ProxyError> {
    let client_version = req.version();
    let host = original_host(&req);
    *req.uri_mut() = upstream_uri(upstream, req.uri())?;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    let trailers = headers::accepts_trailers(h);
    headers::strip_hop_by_hop(h, upgrade);
    if trailers {
        headers::offer_trailers(h);
    }
    if client_version == Version::HTTP_2 {
        headers::join_cookies(h);
    }
    headers::set_forwarded(h, conn.peer.ip(), conn.tls, host.as_ref(), conn.trusted);
    headers::append_via(h, client_version);
    headers::child_traceparent(h);
    match host {
        Some(host) if upstream.preserve_host => {
            h.insert(header::HOST, host);
        }
        _ => {
            h.insert(header::HOST, upstream.host.clone());
        }
    }
    Ok(req)
}

/// Sends the request to `upstream` and returns its response head with the body streaming.
async fn forward<B>(
    mut req: Request<B>,
    upstream: &Upstream,
    side: Side,
    conn: ConnInfo,
    request_id: &HeaderValue,
) -> Result<Response<Body>, ProxyError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let upgrade = headers::is_upgrade_request(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // An upgraded connection outlives the HTTP connection: it keeps its connection slot.
    let slot = req
        .extensions_mut()
        .remove::<crate::server::ConnectionSlot>();
    let mut req = upstream_request(req, upstream, conn, upgrade)?;
    // A body of unannounced length (chunked, or HTTP/2 without `content-length`) goes on
    // chunked. hyper adds that on its own except for GET and HEAD, whose body it would drop
    // unless the request says so.
    let body = req.body();
    if !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    // The timeout runs from the last request byte sent: a long upload is not cut short, and
    // an upstream that stops reading the body still times out.
    let clock = ProgressClock::start();
    let req = req.map(|body| {
        Progress::new(body, clock.clone())
            .map_err(Into::into)
            .boxed_unsync()
    });
    let mut sent = std::pin::pin!(upstream.request(req));
    let mut resp = loop {
        let last = clock.last();
        match tokio::time::timeout_at((last + upstream.timeout).into(), &mut sent).await {
            Ok(Ok(resp)) => break resp,
            Ok(Err(e)) => return Err(ProxyError::from_client(side, e)),
            Err(_) if clock.last() == last && clock.waiting_on_client() => {
                return Err(ProxyError::ClientBodyTimeout {
                    timeout: upstream.timeout,
                });
            }
            Err(_) if clock.last() == last => {
                return Err(ProxyError::Timeout {
                    side,
                    timeout: upstream.timeout,
                });
            }
            Err(_) => continue,
        }
    };

    // Nobody would undo such a coding: the client would get the coded bytes as the answer.
    if !hyper::body::Body::is_end_stream(resp.body())
        && let Some(coding) = headers::other_transfer_coding(resp.headers())
    {
        return Err(ProxyError::Upstream {
            side,
            source: format!(
                "the answer is in transfer coding {coding:?}, which cannot be passed on"
            )
            .into(),
        });
    }
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    // Passed on, an unasked 101 leaves the client waiting for a final answer.
    if upgraded && client_upgrade.is_none() {
        return Err(ProxyError::Upstream {
            side,
            source: "the upstream switched protocols unasked (101)".into(),
        });
    }
    if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        debug!(error = %e, "upgraded connection closed");
                    }
                }
                Err(e) => debug!(error = %e, "protocol upgrade failed"),
            }
        });
    }
    headers::prepare_response(&mut resp, request_id, upgraded);
    let timeout = upstream.timeout;
    Ok(resp.map(|b| body::Stalled::new(b, timeout).boxed_unsync()))
}

/// Rewrites the request's path to its canonical form ([`route::path::normalize`]).
fn canonicalize<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    if let Some(uri) = canonical_uri(req.uri())? {
        *req.uri_mut() = uri;
    }
    Ok(())
}

/// Why ficus refuses a request (its path already in canonical form) before choosing a route,
/// whatever the rules. `rules explain` asks too, so that it never names a route for a request
/// the proxy would refuse.
pub fn refused_before_routing(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &http::HeaderMap,
) -> Option<ProxyError> {
    // Userinfo in the request target (`GET http://a@b/`, or an HTTP/2 `:authority` with
    // one) is an error (RFC 9110 4.2.4, RFC 9113 8.3.1): routing reads the host after the
    // `@`, and the upstream would get all of it as its `Host`, a host it was not routed by.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some(ProxyError::BadRequest(
            "the request target carries userinfo",
        ));
    }
    // An HTTP/1.1 request has exactly one `Host`, and a valid one (RFC 9112 3.2: 400
    // otherwise). With two, routing reads the first, and an upstream (or a cache on the
    // way) may believe the other: a host ficus did not route by. HTTP/1.0 may omit it;
    // HTTP/2 names the host in `:authority`.
    if version == Version::HTTP_11 && !headers::has_one_valid_host(headers) {
        return Some(ProxyError::BadRequest(
            "an HTTP/1.1 request needs exactly one valid Host header",
        ));
    }
    // A tunnel to anywhere is not ficus's to open: refused before any route or upstream.
    if method == Method::CONNECT {
        return Some(ProxyError::MethodNotAllowed("CONNECT"));
    }
    // hyper undoes the chunking only; the upstream would get the still-coded bytes as the
    // body, since `Transfer-Encoding` does not go on (RFC 9112 6.1: 501).
    headers::other_transfer_coding(headers).map(ProxyError::UnsupportedTransferCoding)
}

/// The URI with its path in canonical form, or `None` when it already is; the error a client
/// gets for a path without one. `rules explain` uses it too, to match what the proxy matches.
pub fn canonical_uri(uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    let path = match route::path::normalize(uri.path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(None),
        std::borrow::Cow::Owned(path) => path,
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?,
    );
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

/// Says `Connection: close` on an HTTP/1.x answer sent before the request body was read to
/// its end: hyper closes such a connection rather than read the rest, and RFC 9110 10.1.1
/// asks the server to tell the client, which would otherwise reuse a closing connection.
fn announce_close(resp: &mut Response<Body>, version: Version) {
    if version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The answer to a request refused before routing: counted, logged, never forwarded.
fn reject<B>(e: ProxyError, req: &Request<B>, request_id: &HeaderValue) -> Response<Body> {
    let reason = match &e {
        ProxyError::BadPath(p) => p.code(),
        other => other.code(),
    };
    ::metrics::counter!(crate::telemetry::REQUESTS_REJECTED_TOTAL, "reason" => reason).increment(1);
    info!(
        target: "ficus::access",
        method = %req.method(),
        status = e.status().as_u16(),
        rejected = reason,
        request_id = request_id.to_str().unwrap_or_default(),
    );
    rescue(&e, "", None, request_id)
}

/// The authority the client addressed: the URI's authority (HTTP/2, or an absolute-form
/// request line, which RFC 9112 3.2.2 says wins over `Host`), else the `Host` header. Routing
/// reads the host in the same order.
fn original_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    req.uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| req.headers().get(header::HOST).cloned())
}

/// The upstream URI: the upstream's scheme and authority with the request's path and query.
fn upstream_uri(upstream: &Upstream, uri: &Uri) -> Result<Uri, ProxyError> {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}
