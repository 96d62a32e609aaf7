//! The orchestrator: one exchange, top to bottom. Route the request, rewrite its head,
//! forward it to the authority, stream the response back. Later stages (shadow, compare,
//! record) hook in here: the decision already names the other side, and both bodies pass
//! through this function as streams that can be teed.

mod body;
pub mod error;
pub mod headers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::route::{self, RequestHead};
use crate::rules::{RuleSet, Side};
use crate::upstream::{Body, BoxError, ClientCache, Defaults, Upstream};
use body::{Progress, ProgressClock};
use error::{ProxyError, rescue};

/// What one published rules snapshot needs at request time: rules and their upstreams.
pub struct Live {
    pub rules: RuleSet,
    pub upstreams: Vec<Upstream>,
}

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Shared proxy state. Requests read the live snapshot once; reloads publish a new one.
pub struct Proxy {
    live: ArcSwap<Live>,
    clients: ClientCache,
    defaults: Defaults,
}

impl Proxy {
    pub fn new(rules: RuleSet, clients: ClientCache, defaults: Defaults) -> Proxy {
        let upstreams = clients.upstreams(&rules.upstreams, &defaults);
        Proxy {
            live: ArcSwap::from_pointee(Live { rules, upstreams }),
            clients,
            defaults,
        }
    }

    /// Publishes a new rule set atomically: requests already routed keep the old snapshot.
    pub fn install(&self, rules: RuleSet) {
        let upstreams = self.clients.upstreams(&rules.upstreams, &self.defaults);
        self.live.store(Arc::new(Live { rules, upstreams }));
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Handles one exchange. Never fails: every error becomes a response.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let live = self.live.load_full();
        let request_id = headers::ensure_request_id(req.headers_mut());
        let decision = route::find(
            &live.rules,
            &RequestHead::from_request(&req, conn.peer.ip()),
        );
        let route = decision.route;
        let side = decision.authority;
        let upstream = &live.upstreams[decision.authority_upstream()];
        let method = req.method().clone();
        let uri = req.uri().clone();

        let response = match forward(req, upstream, side, conn, &request_id).await {
            Ok(resp) => resp,
            Err(e) => {
                warn!(
                    error = %e,
                    route = %route.name,
                    side = side.as_str(),
                    upstream = %upstream.name,
                    request_id = request_id.to_str().unwrap_or_default(),
                    "upstream request failed"
                );
                rescue(&e, &route.name, Some(&upstream.name), &request_id)
            }
        };
        info!(
            target: "ficus::access",
            route = %route.name,
            authority = side.as_str(),
            canary = decision.canaried,
            method = %method,
            path = uri.path(),
            status = response.status().as_u16(),
            latency_ms = start.elapsed().as_micros() as f64 / 1e3,
            request_id = request_id.to_str().unwrap_or_default(),
        );
        response
    }
}

/// Sends the request to `upstream` and returns its response head with the body streaming.
async fn forward(
    mut req: Request<Incoming>,
    upstream: &Upstream,
    side: Side,
    conn: ConnInfo,
    request_id: &HeaderValue,
) -> Result<Response<Body>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed("CONNECT"));
    }
    let upgrade = headers::is_upgrade_request(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_version = req.version();
    let host = original_host(&req);
    *req.uri_mut() = upstream_uri(upstream, req.uri())?;
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    headers::strip_hop_by_hop(h, upgrade);
    headers::set_forwarded(h, conn.peer.ip(), conn.tls, host.as_ref());
    headers::append_via(h, client_version);
    match host {
        Some(host) if upstream.preserve_host => {
            h.insert(header::HOST, host);
        }
        // Without a Host header the client derives it from the upstream URI.
        _ => {
            h.remove(header::HOST);
        }
    }
    // The timeout runs from the last request byte sent: a long upload is not cut short, and
    // an upstream that stops reading the body still times out.
    let clock = ProgressClock::start();
    let req = req.map(|body| {
        Progress::new(body, clock.clone())
            .map_err(BoxError::from)
            .boxed_unsync()
    });
    let mut sent = std::pin::pin!(upstream.client.request(req));
    let mut resp = loop {
        let last = clock.last();
        match tokio::time::timeout_at((last + upstream.timeout).into(), &mut sent).await {
            Ok(Ok(resp)) => break resp,
            Ok(Err(e)) => return Err(ProxyError::from_client(side, e)),
            Err(_) if clock.last() == last => {
                return Err(ProxyError::Timeout {
                    side,
                    timeout: upstream.timeout,
                });
            }
            Err(_) => continue,
        }
    };

    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
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
    Ok(resp.map(|body| body.map_err(BoxError::from).boxed_unsync()))
}

/// The authority the client addressed: the `Host` header, or the URI's authority (HTTP/2).
fn original_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(host) = req.headers().get(header::HOST) {
        return Some(host.clone());
    }
    req.uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
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
