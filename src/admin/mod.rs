//! The admin listener, on its own port: liveness, readiness and `/metrics`, and the
//! reconciliation API over the record store (`/api/*`, behind bearer tokens when configured):
//! divergences, groups, replay, the readiness report, rules, impact, overrides, audit; and the
//! workbench UI over that API (`/ui/`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

pub mod listener;
mod ui;

use crate::proxy::Proxy;
use crate::record::{Change, State as RecordState};
use crate::rules::Diagnostic;
use crate::store::{Filter, Store, StoreError};

/// Reloads the rules now; returns the number of routes or every error.
pub type Reload = Arc<dyn Fn() -> Result<usize, Vec<Diagnostic>> + Send + Sync>;

/// What the admin handlers read.
pub struct AdminState {
    pub proxy: Arc<Proxy>,
    /// Set once the rules are loaded and the proxy listener accepts connections.
    pub ready: AtomicBool,
    pub store: Arc<dyn Store>,
    /// `(name, token)` pairs; empty means the API is open.
    pub tokens: Vec<(String, String)>,
    pub reload: Reload,
    /// Renders the Prometheus exposition; `None` if another recorder owns the process.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Ids of the records this replica is replaying (see [`ReplayClaim`]).
    pub replaying: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One record's replay in flight on this replica. A second replay of that record sent
/// meanwhile (a double click, a script's retry after its own timeout, a group replay that
/// crosses a single one) would send the request again to both sides, a write too, before the
/// first has even told what happened: it is refused instead, until the first one ends.
struct ReplayClaim<'a> {
    held: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl<'a> ReplayClaim<'a> {
    fn take(
        held: &'a std::sync::Mutex<std::collections::HashSet<String>>,
        id: &str,
    ) -> Option<ReplayClaim<'a>> {
        let mut ids = held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.insert(id.to_string()).then(|| ReplayClaim {
            held,
            id: id.to_string(),
        })
    }
}

impl Drop for ReplayClaim<'_> {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The same claim for every replica sharing the store (a replay sent to another replica's
/// admin port, by a load balancer or a retry, would otherwise go out again): held in Redis
/// (`SET NX PX`) while the record is replayed, released when the replay ends, however it
/// ends; should the replica die first, it expires after the longest a replay can take. On
/// SQLite, which one replica uses, the store grants it always and [`ReplayClaim`] does the work.
struct FleetClaim {
    store: Arc<dyn Store>,
    name: String,
    token: String,
}

impl FleetClaim {
    async fn take(
        store: &Arc<dyn Store>,
        id: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<FleetClaim>, StoreError> {
        let name = format!("replay:{id}");
        Ok(store.claim(&name, ttl).await?.map(|token| FleetClaim {
            store: store.clone(),
            name,
            token,
        }))
    }
}

impl Drop for FleetClaim {
    fn drop(&mut self) {
        // Released off this task: the handler may be dropped mid-replay (the caller went
        // away), and a release that fails only leaves the claim to expire.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, name, token) = (
            self.store.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            let released = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                store.release(&name, &token),
            )
            .await;
            if !matches!(released, Ok(Ok(()))) {
                tracing::warn!(claim = %name, "cannot release a replay claim; it expires by itself");
            }
        });
    }
}

/// Beyond the upstreams' timeouts, how long a replay's claim lasts: writing the outcome to the
/// store (a few round trips, each bounded by the store's response timeout), with room to spare.
const REPLAY_CLAIM_MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

/// The caller, as the token named it.
#[derive(Clone)]
struct Who(String);

pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/api/divergences", get(list))
        .route("/api/divergences/{id}", get(one).patch(patch))
        .route("/api/divergences/{id}/replay", post(replay))
        .route("/api/groups", get(groups))
        .route(
            "/api/groups/{fingerprint}",
            axum::routing::patch(patch_group),
        )
        .route("/api/groups/{fingerprint}/replay", post(replay_group))
        .route(
            "/api/routes/{name}/override",
            post(set_override).delete(lift_override),
        )
        .route("/api/openapi.json", get(openapi))
        .route("/api/audit", get(audit))
        .route("/api/report", get(report))
        .route("/api/rules", get(rules))
        .route("/api/rules/reload", post(reload))
        .route("/api/rules/impact", post(impact))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(ui::router())
        .merge(api)
        // Errors of the API are JSON, also for a path or method it does not have (axum's own
        // answers have an empty or plain-text body, which clients cannot read as an error).
        .fallback(|method: http::Method, uri: http::Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {method} {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: http::Method, uri: http::Uri| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} does not take {method}", uri.path()),
            )
        })
        .layer(middleware::map_response(harden))
        .layer(middleware::from_fn(listener::busy))
        .with_state(state)
}

/// Every admin response carries `X-Content-Type-Options: nosniff`, so a body built from
/// record contents (client paths, headers and bodies, upstream answers) is never sniffed into
/// markup; a response without a policy of its own (the API's JSON, errors, metrics) also gets
/// one that runs nothing and cannot be framed, should a browser render it anyway. The
/// workbench's assets keep their own policy.
async fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'; sandbox"),
        );
    }
    resp
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

fn store_error(e: &StoreError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        e.to_string(),
    )
}

/// Bearer-token check for `/api/*`, comparing against every token in constant time.
/// Without any token configured, reads are open but changes are accepted only from a
/// loopback peer: an admin port exposed by mistake cannot be used to flip a route.
async fn auth(State(state): State<Arc<AdminState>>, mut req: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<listener::Peer>>()
            .map(|c| c.0.addr.ip());
        if !open_change_allowed(req.method(), peer) {
            return error(
                StatusCode::FORBIDDEN,
                "token_required",
                "changes from a non-loopback address need a token: start ficus with --admin-token",
            );
        }
        if !crate::shadow::is_safe(req.method())
            && let Some(why) = browser_forgery(req.headers())
        {
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "{why}: a change without a token is taken only from this admin port's own pages or from a client that is not a browser (or start ficus with --admin-token)"
                ),
            );
        }
        // A read is open, but not to a web page that rebound its own name to this machine
        // (DNS rebinding): to the browser the page and the API are then one origin, and the
        // page reads every record (request bodies, both sides' answers). Its requests come from
        // a loopback peer and name the page's host; the CLI, curl and the workbench opened at
        // 127.0.0.1 or localhost name an address or localhost.
        if peer.is_some_and(|ip| ip.to_canonical().is_loopback())
            && addressed_to_a_name(req.headers())
        {
            return error(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "a request from this machine addressed to a host name (a web page's name rebound to 127.0.0.1 would read the records): use 127.0.0.1 or localhost, or start ficus with --admin-token",
            );
        }
        req.extensions_mut().insert(Who("anonymous".into()));
        return next.run(req).await;
    }
    let given = bearer(req.headers()).unwrap_or_default();
    let mut who = None;
    for (name, token) in &state.tokens {
        // An empty token configured never matches a missing or empty one.
        if !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            who = Some(name.clone());
        }
    }
    match who {
        Some(name) => {
            req.extensions_mut().insert(Who(name));
            next.run(req).await
        }
        None => {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer TOKEN (see --admin-token)",
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

/// Without tokens: reads from anyone (the admin port should still be private), changes only
/// from loopback. An unknown peer is treated as remote.
fn open_change_allowed(method: &http::Method, peer: Option<std::net::IpAddr>) -> bool {
    crate::shadow::is_safe(method) || peer.is_some_and(|ip| ip.to_canonical().is_loopback())
}

/// Without a token, the loopback check alone would let any web page open in an operator's
/// browser on the same machine make changes (a form posted across sites, or a name of its own
/// rebound to 127.0.0.1). Such a request is told apart by what browsers add to it: a
/// `Sec-Fetch-Site` other than `same-origin` or `none`, an `Origin` that is not this port, or
/// a `Host` that is a name rather than an address. The CLI, curl and the workbench itself pass.
fn browser_forgery(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some("a request from another site");
    }
    let host = text(header::HOST.as_str()).unwrap_or_default();
    if let Some(origin) = text(header::ORIGIN.as_str()) {
        let own = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if own != Some(host) {
            return Some("a request from another origin");
        }
    }
    if addressed_to_a_name(headers) {
        return Some("a request addressed to a host name");
    }
    None
}

/// Whether the `Host` is a name other than `localhost`: a name rebound to a loopback address
/// still arrives with that name as its Host.
fn addressed_to_a_name(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .map_or("", |v| v.to_str().unwrap_or("\u{fffd}"));
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let address = name.parse::<std::net::IpAddr>().is_ok();
    !(host.is_empty() || address || name.eq_ignore_ascii_case("localhost"))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

async fn metrics_text(State(state): State<Arc<AdminState>>) -> Response {
    match &state.metrics {
        Some(handle) => {
            // Only the routes of the rules in force: see `without_removed_routes`.
            let live = state.proxy.live();
            let rules = &live.rules;
            let routes: std::collections::HashSet<&str> = rules
                .routes
                .iter()
                .chain(std::iter::once(&rules.default_route))
                .map(|r| &*r.name)
                .collect();
            let text = crate::telemetry::exporter::without_removed_routes(&handle.render(), |r| {
                routes.contains(r)
            });
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "another metrics recorder is installed in this process",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
}

/// The audit log of overrides, newest first.
async fn audit(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameter: limit",
        );
    };
    match state
        .store
        .audit(q.limit.unwrap_or(100).clamp(1, 1000))
        .await
    {
        Ok(items) => Json(json!({ "items": items })).into_response(),
        Err(e) => store_error(&e),
    }
}

/// The API's OpenAPI 3 description, kept in `docs/openapi.json`.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../docs/openapi.json"),
    )
        .into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Value>) {
    if !state.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting" })),
        );
    }
    let live = state.proxy.live();
    (
        StatusCode::OK,
        Json(json!({ "status": "ready", "routes": live.rules.routes.len() })),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    route: Option<String>,
    state: Option<String>,
    class: Option<String>,
    fingerprint: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn bad_state() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "bad_state",
        "state is open, acknowledged, expected or resolved",
    )
}

/// An optional `state` parameter; a 400 response when it names no state.
#[allow(clippy::result_large_err)]
fn parse_state(raw: Option<&str>) -> Result<Option<RecordState>, Response> {
    match raw {
        None => Ok(None),
        Some(raw) => RecordState::parse(raw).map(Some).ok_or_else(bad_state),
    }
}

/// A time bound: RFC 3339 or Unix milliseconds.
fn time_ms(raw: &str) -> Option<u64> {
    if let Ok(ms) = raw.parse::<u64>() {
        return Some(ms);
    }
    // humantime reads UTC only (`Z`, `+00:00` or no zone): an RFC 3339 offset such as
    // `+01:00` (sent as `%2B01:00` in a query string) is applied here.
    let (local, offset_ms) = match utc_offset_ms(raw) {
        Some((local, offset)) => (local, offset),
        None => (raw, 0),
    };
    let ms = humantime::parse_rfc3339_weak(local)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i128::try_from(d.as_millis()).ok())?;
    u64::try_from(ms - offset_ms).ok()
}

/// A trailing `+HH:MM` or `-HH:MM` offset of an RFC 3339 time: the rest, and the offset in ms.
fn utc_offset_ms(raw: &str) -> Option<(&str, i128)> {
    let at = raw.len().checked_sub(6)?;
    let (local, zone) = (raw.get(..at)?, raw.get(at..)?.as_bytes());
    let sign = match zone.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = |a: usize, b: usize| -> Option<i128> {
        let (x, y) = (zone.get(a)?, zone.get(b)?);
        (x.is_ascii_digit() && y.is_ascii_digit()).then(|| i128::from((x - b'0') * 10 + (y - b'0')))
    };
    if zone.get(3) != Some(&b':') || !local.contains(['T', 't', ' ']) {
        return None;
    }
    let (hours, minutes) = (digits(1, 2)?, digits(4, 5)?);
    Some((local, sign * (hours * 60 + minutes) * 60_000))
}

/// Optional `since` and `until` parameters as Unix ms; a 400 response when one is neither
/// RFC 3339 nor Unix milliseconds.
#[allow(clippy::result_large_err)]
fn time_bounds(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(Option<u64>, Option<u64>), Response> {
    let parse = |raw: Option<&str>| match raw {
        None => Ok(None),
        Some(raw) => time_ms(raw).map(Some).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_time",
                format!("`{raw}` is neither RFC 3339 nor Unix milliseconds"),
            )
        }),
    };
    Ok((parse(since)?, parse(until)?))
}

async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameters: route, state, class, fingerprint, since, until, limit, cursor",
        );
    };
    let record_state = match parse_state(q.state.as_deref()) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let (since_ms, until_ms) = match time_bounds(q.since.as_deref(), q.until.as_deref()) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let filter = Filter {
        route: q.route,
        state: record_state,
        class: q.class,
        fingerprint: q.fingerprint,
        since_ms,
        until_ms,
        limit: q.limit.unwrap_or(0),
        cursor: q.cursor,
    };
    match state.store.list(&filter).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => store_error(&e),
    }
}

async fn one(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    match load_record(&state, &id).await {
        Ok(record) => Json(record).into_response(),
        Err(resp) => resp,
    }
}

/// A record by id, or the 404 / 503 response to give instead.
#[allow(clippy::result_large_err)]
async fn load_record(state: &AdminState, id: &str) -> Result<crate::record::Record, Response> {
    match state.store.get(id).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no divergence `{id}`"),
        )),
        Err(e) => Err(store_error(&e)),
    }
}

async fn patch(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(changes)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "send a JSON object with any of state, class, note",
        );
    };
    let edit = match parse_edit(&changes, &who) {
        Ok(edit) => edit,
        Err(resp) => return resp,
    };
    match state.store.modify(&id, edit.change()).await {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no divergence `{id}`"),
        ),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayQuery {
    allow_writes: Option<bool>,
}

/// Largest response body read during a replay.
const REPLAY_BODY_LIMIT: usize = 8 << 20;

/// Sends the recorded request to both sides now, compares, and resolves the record when they
/// agree. Non-safe methods need `?allow_writes=true`: a replayed write happens twice.
async fn replay(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
    query: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameter: allow_writes",
        );
    };
    let record = match load_record(&state, &id).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match replay_record(&state, &who, record, q.allow_writes.unwrap_or(false)).await {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// Why a record was not replayed: the status, a stable code and a sentence. One record's
/// refusal is the whole answer of a single replay, and one line of a group replay.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// A replay failed after a request went out to an upstream: it may have been processed
    /// there, and trying again repeats it (a write, for a non-safe method).
    sent: bool,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            sent: false,
        }
    }

    fn after_sending(self) -> Refusal {
        Refusal { sent: true, ..self }
    }

    fn store(e: &StoreError) -> Refusal {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        if !self.sent {
            return error(self.status, self.code, self.message);
        }
        let body = json!({"error": self.code, "message": self.message, "sent": true});
        (self.status, Json(body)).into_response()
    }
}

/// Replays one record; the answer, or why it could not be replayed.
async fn replay_record(
    state: &AdminState,
    who: &Who,
    record: crate::record::Record,
    allow_writes: bool,
) -> Result<Value, Refusal> {
    let Ok(method) = http::Method::from_bytes(record.request.method.as_bytes()) else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            "the recorded method is not valid",
        ));
    };
    if !crate::shadow::is_safe(&method) && !allow_writes {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unsafe_method",
            format!(
                "{method} is not a safe method: replaying it repeats the write on both sides; add ?allow_writes=true"
            ),
        ));
    }
    if record.request.body.body_truncated
        || (record.request.body.body.is_none() && record.request.body.body_len > 0)
    {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            "the recorded request body is incomplete (cut at the record body limit, or not text)",
        ));
    }
    // A body stored with `compare.redact` values replaced would write the placeholder in place
    // of the real value (a password, a card number).
    if record
        .request
        .body
        .body
        .as_deref()
        .is_some_and(|b| b.contains(&format!("\"{}\"", crate::compare::REDACTED)))
    {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            "the recorded request body has redacted values: replaying it would send the placeholder",
        ));
    }
    // Likewise a query stored with `compare.redact_query` (or `access_token`) values hidden.
    if record.request.query.as_deref().is_some_and(|q| {
        q.split('&').any(|p| {
            p.split_once('=')
                .is_some_and(|(_, v)| v == crate::compare::REDACTED)
        })
    }) {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            "the recorded query has redacted values: replaying it would send the placeholder",
        ));
    }
    let live = state.proxy.live();
    let Some(route) = live.rules.route_by_name(&record.route) else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            format!("route `{}` is no longer in the rules", record.route),
        ));
    };
    // An emergency override that stops shadowing on the route is there because calling the
    // other side hurts (a new side corrupting shared data, a legacy side overloaded): a
    // replay calls both sides, so it waits until the override is lifted or runs out.
    if let Some(o) = state.proxy.overrides().get(&*route.name)
        && o.shadow == Some(false)
        && o.until_ms > crate::store::writer::now_ms()
    {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "shadow_stopped",
            format!(
                "an emergency override stops shadowing on `{}`, and a replay calls both sides; lift it first (DELETE /api/routes/{}/override)",
                route.name, route.name
            ),
        ));
    }
    let comparator = route.comparator.clone().unwrap_or_default();
    let target = match &record.request.query {
        Some(q) => format!("{}?{q}", record.request.path),
        None => record.request.path.clone(),
    };
    let body = bytes::Bytes::from(record.request.body.body.clone().unwrap_or_default());
    // Everything that can refuse the replay as a whole is checked before the first call.
    let Ok(uri) = target.parse::<http::Uri>() else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "unreplayable",
            "the recorded path is not a valid URI",
        ));
    };
    // Held until the outcome is written to the record: on this replica, then for all.
    let in_progress = || {
        Refusal::new(
            StatusCode::CONFLICT,
            "replay_in_progress",
            format!(
                "divergence `{}` is being replayed already; its outcome will be in the record's history",
                record.id
            ),
        )
    };
    let Some(_claim) = ReplayClaim::take(&state.replaying, &record.id) else {
        return Err(in_progress());
    };
    let ttl = live.upstreams[route.legacy].timeout
        + live.upstreams[route.new].timeout
        + REPLAY_CLAIM_MARGIN;
    // Without the claim, another replica may be replaying the record: nothing is sent.
    let _fleet_claim = match FleetClaim::take(&state.store, &record.id, ttl).await {
        Ok(Some(claim)) => claim,
        Ok(None) => return Err(in_progress()),
        Err(e) => return Err(Refusal::store(&e)),
    };
    let mut answers = Vec::with_capacity(2);
    for upstream in [&live.upstreams[route.legacy], &live.upstreams[route.new]] {
        let mut req = http::Request::new(crate::proxy::error::full(body.clone()));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        for (name, value) in &record.request.headers {
            // Redacted secrets are not replayed: the upstream sees the request without them.
            if value == crate::compare::REDACTED {
                continue;
            }
            // The stored body may be re-serialised (redaction): its length is the body's own.
            if name.eq_ignore_ascii_case("content-length") {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                req.headers_mut().append(n, v);
            }
        }
        req.headers_mut()
            .insert("x-ficus-replay", http::HeaderValue::from_static("1"));
        let conn = crate::proxy::ConnInfo {
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
            trusted: false,
        };
        let req = match crate::proxy::upstream_request(req, upstream, conn, false) {
            Ok(r) => r,
            Err(e) => {
                let refusal = Refusal::new(StatusCode::CONFLICT, "unreplayable", e.to_string());
                // For new, legacy has been called already.
                return Err(if answers.is_empty() {
                    refusal
                } else {
                    refusal.after_sending()
                });
            }
        };
        let call = async {
            let resp = upstream.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, REPLAY_BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        // From here on a request may have reached an upstream: a failure says so.
        match tokio::time::timeout(upstream.timeout, call).await {
            Ok(Ok(answer)) => answers.push(answer),
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "replay_failed",
                    format!("{}: {e}", upstream.name),
                )
                .after_sending());
            }
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "replay_timeout",
                    format!("{} did not answer in time", upstream.name),
                )
                .after_sending());
            }
        }
    }
    let (new, legacy) = match (answers.pop(), answers.pop()) {
        (Some(n), Some(l)) => (n, l),
        _ => {
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "replay_failed",
                "missing answer",
            )
            .after_sending());
        }
    };
    let mut comparison = comparator.compare(&as_compare(&legacy), &as_compare(&new));
    for d in &mut comparison.diffs {
        comparator.redact_diff(d);
    }
    let matched = comparison.is_match();
    let outcome = if matched { "matched" } else { "still diverges" };
    // A match is evidence only when the replay reproduced the recorded exchange. The replay
    // goes without the redacted credentials (`authorization`, `cookie`), and the resource may
    // be gone or the write already done: both sides then agree on a 401, 404 or 409, which
    // says nothing about the divergence, and resolving on it would close a defect (and lift
    // its block on the verdict) that nobody fixed. Legacy is the reference: it must answer
    // the replay as it answered the recorded request.
    let (replayed_status, recorded_status) = (legacy.0.status.as_u16(), record.legacy.status);
    let reproduced = replayed_status == recorded_status;
    let unconfirmed = (matched && !reproduced).then(|| {
        format!(
            "legacy answered the replay {replayed_status}, the recorded request {recorded_status}: the match does not show the divergence is gone"
        )
    });
    let (who, at) = (
        who.0.clone(),
        humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    );
    // The upstreams took time: the outcome is applied to the record as stored when it is
    // written, so a state or note set meanwhile is kept. A match resolves the record, except
    // one marked expected: an expected divergence leaves the rate, a resolved one counts (it
    // did diverge), so resolving it would make the route look worse for a match.
    let why_unconfirmed = unconfirmed.clone();
    let change: crate::store::RecordChange = Arc::new(move |r: &mut crate::record::Record| {
        let mut what = json!({ "replay": outcome });
        if let Some(why) = &why_unconfirmed {
            what["unconfirmed"] = json!(why);
        } else if matched && r.state != RecordState::Expected {
            r.state = RecordState::Resolved;
            what["state"] = json!("resolved");
            what["resolution"] = json!("replay matched");
        }
        r.history.push(Change {
            who: who.clone(),
            at: at.clone(),
            what,
        });
    });
    let record = match state.store.modify(&record.id, change).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "replayed ({outcome}), but the record has expired or been deleted meanwhile"
                ),
            )
            .after_sending());
        }
        Err(e) => {
            // Both sides answered; only the record's new state and history are lost.
            let mut refusal = Refusal::store(&e).after_sending();
            refusal.message = format!(
                "replayed ({outcome}), but the record could not be saved: {}",
                refusal.message
            );
            return Err(refusal);
        }
    };
    Ok(json!({
        "match": matched,
        "reproduced": reproduced,
        "unconfirmed": unconfirmed,
        "diffs": comparison.diffs,
        "legacy": {"status": legacy.0.status.as_u16()},
        "new": {"status": new.0.status.as_u16()},
        "record": record,
    }))
}

fn as_compare(a: &(http::response::Parts, bytes::Bytes)) -> crate::compare::Response<'_> {
    crate::compare::Response {
        status: a.0.status.as_u16(),
        headers: &a.0.headers,
        body: &a.1,
    }
}

/// Hours of per-hour counts the report carries (the workbench's charts).
const HISTORY_HOURS: u64 = 24;

/// Per route: the evidence over the gate's window, the divergences by state, this replica's
/// latency and error figures, the noisy fields, and the verdict.
async fn report(State(state): State<Arc<AdminState>>) -> Response {
    let live = state.proxy.live();
    let now = crate::store::writer::now_ms();
    let mut routes = Vec::new();
    for route in &live.rules.routes {
        let name = route.name.to_string();
        let gate = route.gate;
        // The window in whole hours, the current one included: a 24 h window is the current
        // hour and the 23 before it (the hours of the history below), not 25 of them.
        let window_hours = u64::try_from(gate.window.as_millis().div_ceil(3_600_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let window_first_hour = crate::store::hour_of(now).saturating_sub(window_hours - 1);
        let since = window_first_hour.saturating_mul(3_600_000);
        // The window ends with the current hour, for records as for counters: a replica whose
        // clock runs ahead stamps both later, and records marked expected whose divergences
        // the window does not hold must not be subtracted from those it does.
        let until = crate::store::hour_of(now)
            .saturating_add(1)
            .saturating_mul(3_600_000);
        let store = &state.store;
        let count = |f: Filter| async move { store.count(&f).await };
        let route_filter = |st: Option<RecordState>| Filter {
            route: Some(name.clone()),
            state: st,
            ..Filter::default()
        };
        let gathered = async {
            let (total, window) = store.counts(&name, window_first_hour).await?;
            let mut by_state = Map::new();
            for st in RecordState::ALL {
                by_state.insert(
                    st.as_str().into(),
                    json!(count(route_filter(Some(st))).await?),
                );
            }
            let expected = count(Filter {
                since_ms: Some(since),
                until_ms: Some(until),
                ..route_filter(Some(RecordState::Expected))
            })
            .await?;
            // A defect blocks until it is resolved (or classified otherwise): acknowledging
            // one says someone is on it, not that the new side may take authority with it.
            let mut open_defects = 0;
            for st in [RecordState::Open, RecordState::Acknowledged] {
                open_defects += count(Filter {
                    class: Some("defect".into()),
                    ..route_filter(Some(st))
                })
                .await?;
            }
            let first_hour = crate::store::hour_of(now).saturating_sub(HISTORY_HOURS - 1);
            let hourly = store.hourly(&name, first_hour).await?;
            // The chart subtracts expected records hour by hour, as the rate does over the
            // window: the times of those records, from the store's indexes (bounded).
            let (at, truncated) = store
                .record_times(
                    &name,
                    RecordState::Expected,
                    first_hour * 3_600_000,
                    GROUP_SCAN_LIMIT,
                )
                .await?;
            let history = (crate::report::hours(&hourly, &at), truncated);
            Ok::<_, StoreError>((total, window, by_state, expected, open_defects, history))
        };
        let (total, window, by_state, expected, open_defects, history) = match gathered.await {
            Ok(g) => g,
            Err(e) => return store_error(&e),
        };
        let evidence = crate::report::Evidence {
            comparisons: window.comparisons,
            divergences: window.divergences,
            expected,
            open_defects,
        };
        let verdict = crate::report::verdict(&evidence, &gate);
        let stats = state.proxy.shadow().stats(&name);
        let noisy: Vec<Value> = state
            .proxy
            .shadow()
            .noise()
            .paths(&name)
            .into_iter()
            .map(|(path, n)| json!({"path": path, "count": n}))
            .collect();
        routes.push(json!({
            "route": name,
            "authority": route.authority.as_str(),
            "shadowed": route.shadow.is_some(),
            "gate": {
                "min_samples": gate.min_samples,
                "max_divergence_rate": gate.max_divergence_rate,
                "window": humantime::format_duration(gate.window).to_string(),
            },
            "comparisons": {"total": total.comparisons, "window": window.comparisons},
            "divergences": {
                "total": total.divergences,
                "window": window.divergences,
                "expected_in_window": expected,
                "open_defects": open_defects,
                "by_state": by_state,
            },
            "divergence_rate": verdict.divergence_rate,
            "divergence_rate_upper_95": verdict.divergence_rate_upper_95,
            "noisy_fields": noisy,
            "history": history.0,
            "history_truncated": history.1,
            "latency_ms": {
                "legacy": {"p50": stats.latency_ms.legacy.0, "p99": stats.latency_ms.legacy.1},
                "new": {"p50": stats.latency_ms.new.0, "p99": stats.latency_ms.new.1},
            },
            "error_rate": {"legacy": stats.error_rate.legacy, "new": stats.error_rate.new},
            "override": state.proxy.overrides().get(&*route.name).map(|o| json!({
                "authority": o.authority.map(|a| a.as_str()),
                "shadow": o.shadow,
                "until_ms": o.until_ms,
            })),
            "verdict": verdict.verdict,
            "reasons": verdict.reasons,
        }));
    }
    Json(json!({ "routes": routes })).into_response()
}

/// Applies a `{"state", "class", "note"}` patch to a record and notes it in its history.
#[allow(clippy::result_large_err)]
fn parse_edit(changes: &Map<String, Value>, who: &Who) -> Result<Edit, Response> {
    if changes.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "nothing to change",
        ));
    }
    let mut edit = Edit {
        state: None,
        class: None,
        note: None,
        entry: Change {
            who: who.0.clone(),
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            what: Value::Object(changes.clone()),
        },
    };
    for (key, value) in changes {
        let text = match value {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("`{key}` must be a string (or null to clear class or note)"),
                ));
            }
        };
        match key.as_str() {
            "state" => match parse_state(Some(text.as_deref().unwrap_or_default()))? {
                Some(s) => edit.state = Some(s),
                None => return Err(bad_state()),
            },
            // Trimmed, as the classify rules' classes are: `defect ` must still block.
            "class" => {
                edit.class = Some(text.map(|c| c.trim().to_string()).filter(|c| !c.is_empty()));
            }
            "note" => edit.note = Some(text),
            other => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("unknown field `{other}`: use state, class, note"),
                ));
            }
        }
    }
    Ok(edit)
}

/// A checked change of state, class or note, with its history entry. It is applied by the
/// store to the record as stored when it writes (see [`Store::modify`]), so that it never
/// undoes a change made meanwhile by someone else.
#[derive(Clone)]
struct Edit {
    state: Option<RecordState>,
    class: Option<Option<String>>,
    note: Option<Option<String>>,
    entry: Change,
}

impl Edit {
    fn change(self) -> crate::store::RecordChange {
        Arc::new(move |record: &mut crate::record::Record| {
            if let Some(state) = self.state {
                record.state = state;
            }
            if let Some(class) = &self.class {
                record.class.clone_from(class);
            }
            if let Some(note) = &self.note {
                record.note.clone_from(note);
            }
            record.history.push(self.entry.clone());
        })
    }
}

/// Records read at most to build groups or to change a group (newest first).
const GROUP_SCAN_LIMIT: usize = 10_000;

/// Pages through the records a filter selects, newest first, up to [`GROUP_SCAN_LIMIT`] of
/// them or 20 pages; `true` when it stopped short.
async fn scan(
    store: &dyn Store,
    mut filter: Filter,
) -> Result<(Vec<crate::record::Record>, bool), StoreError> {
    // Pages, not only matches, are bounded: a selective filter over a large index (Redis
    // checks the conditions its index does not hold record by record) could otherwise walk
    // the whole store on every refresh of the workbench.
    const MAX_PAGES: usize = 20;
    filter.limit = 1000;
    filter.cursor = None;
    let mut out = Vec::new();
    for _ in 0..MAX_PAGES {
        let page = store.list(&filter).await?;
        out.extend(page.items);
        match page.next {
            Some(next) if out.len() < GROUP_SCAN_LIMIT => filter.cursor = Some(next),
            Some(_) => return Ok((out, true)),
            None => return Ok((out, false)),
        }
    }
    Ok((out, true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupQuery {
    route: Option<String>,
    state: Option<String>,
    class: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// Divergences grouped by fingerprint: one root cause per group.
async fn groups(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<GroupQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameters: route, state, class, since, until",
        );
    };
    let record_state = match parse_state(q.state.as_deref()) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let (since_ms, until_ms) = match time_bounds(q.since.as_deref(), q.until.as_deref()) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let filter = Filter {
        route: q.route,
        state: record_state,
        class: q.class,
        since_ms,
        until_ms,
        ..Filter::default()
    };
    let (records, truncated) = match scan(&*state.store, filter).await {
        Ok(r) => r,
        Err(e) => return store_error(&e),
    };
    // Records come newest first: the first of a group is its last seen.
    let mut order: Vec<String> = Vec::new();
    let mut groups: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    for r in &records {
        let g = groups.entry(r.fingerprint.clone()).or_insert_with(|| {
            order.push(r.fingerprint.clone());
            json!({
                "fingerprint": r.fingerprint,
                "route": r.route,
                "paths": r.paths,
                "count": 0,
                "first_seen": r.at,
                "last_seen": r.at,
                "example": r.id,
                "states": {},
                "classes": {},
                "methods": {},
            })
        });
        g["count"] = json!(g["count"].as_u64().unwrap_or(0) + 1);
        g["first_seen"] = json!(r.at);
        let st = r.state.as_str();
        g["states"][st] = json!(g["states"][st].as_u64().unwrap_or(0) + 1);
        if let Some(class) = &r.class {
            g["classes"][class] = json!(g["classes"][class].as_u64().unwrap_or(0) + 1);
        }
        // A fingerprint ignores the method: the page needs them to know a replay would write.
        let m = &r.request.method;
        g["methods"][m] = json!(g["methods"][m].as_u64().unwrap_or(0) + 1);
    }
    let marks: std::collections::HashMap<String, crate::store::GroupMark> =
        match state.store.group_marks().await {
            Ok(marks) => marks
                .into_iter()
                .map(|m| (m.fingerprint.clone(), m))
                .collect(),
            Err(e) => return store_error(&e),
        };
    let mut items: Vec<Value> = order
        .into_iter()
        .filter_map(|fp| groups.remove(&fp))
        .map(|mut g| {
            // Whether later divergences of the group are written expected, since when, by whom.
            let mark = g["fingerprint"].as_str().and_then(|fp| marks.get(fp));
            g["marked_expected"] = mark.map_or(
                Value::Null,
                |m| json!({"who": m.who, "at": m.at, "class": m.class, "note": m.note}),
            );
            g
        })
        .collect();
    items.sort_by_key(|g| std::cmp::Reverse(g["count"].as_u64().unwrap_or(0)));
    Json(json!({ "items": items, "truncated": truncated })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchGroupQuery {
    state: Option<String>,
    class: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// The records of a group that a bulk action applies to: those the workbench's view shows
/// (state, class, time), so that nothing it did not show is changed or replayed.
#[allow(clippy::result_large_err)]
fn group_scope(
    fingerprint: &str,
    state: Option<&str>,
    class: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<Filter, Response> {
    let state = parse_state(state)?;
    let (since_ms, until_ms) = time_bounds(since, until)?;
    Ok(Filter {
        fingerprint: Some(fingerprint.to_string()),
        state,
        class: class.filter(|c| !c.is_empty()).map(str::to_string),
        since_ms,
        until_ms,
        ..Filter::default()
    })
}

/// Applies one patch to every record of a group, or to those in `?state=` only.
async fn patch_group(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(fingerprint): Path<String>,
    query: Result<Query<PatchGroupQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameters: state, class, since, until",
        );
    };
    let filter = match group_scope(
        &fingerprint,
        q.state.as_deref(),
        q.class.as_deref(),
        q.since.as_deref(),
        q.until.as_deref(),
    ) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let Ok(Json(changes)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "send a JSON object with any of state, class, note",
        );
    };
    let edit = match parse_edit(&changes, &who) {
        Ok(edit) => edit,
        Err(resp) => return resp,
    };
    let change = edit.clone().change();
    let mut route: Option<String> = None;
    // Every record of the group, a page at a time: not only the newest 10,000 that the
    // listing of groups reads, which sending the patch again would only ever reach again.
    // Pages go by id, so a record the patch moves out of `?state=` is not met twice.
    let mut filter = Filter {
        limit: 1000,
        ..filter
    };
    let mut updated: u64 = 0;
    loop {
        let page = match state.store.list(&filter).await {
            Ok(page) => page,
            Err(e) => return store_error(&e),
        };
        for record in page.items {
            route.get_or_insert_with(|| record.route.clone());
            match state.store.modify(&record.id, change.clone()).await {
                Ok(Some(_)) => updated += 1,
                // Expired or deleted since it was listed.
                Ok(None) => {}
                Err(e) => return store_error(&e),
            }
        }
        match page.next {
            Some(next) => filter.cursor = Some(next),
            None => break,
        }
    }
    if updated == 0 {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no divergences with fingerprint `{fingerprint}`"),
        );
    }
    // Marked expected, the group stays so: the divergences of it recorded later are written
    // expected too, or a team would mark the same intended difference again every day while
    // its new records held the verdict back. Another state lifts the mark.
    let marked = match (edit.state, route) {
        (Some(RecordState::Expected), Some(route)) => {
            let mark = crate::store::GroupMark {
                fingerprint: fingerprint.clone(),
                route,
                class: edit.class.clone().flatten(),
                note: edit.note.clone().flatten(),
                who: edit.entry.who.clone(),
                at: edit.entry.at.clone(),
            };
            if let Err(e) = state.store.put_group_mark(&mark).await {
                return store_error(&e);
            }
            let entry = json!({"event": "group_marked_expected", "fingerprint": fingerprint,
                "route": mark.route, "who": mark.who, "at": mark.at});
            if let Err(e) = state.store.append_audit(&entry).await {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
            true
        }
        (Some(_), _) => {
            match state.store.delete_group_mark(&fingerprint).await {
                Ok(true) => {
                    let entry = json!({"event": "group_mark_lifted", "fingerprint": fingerprint,
                        "who": edit.entry.who, "at": edit.entry.at});
                    if let Err(e) = state.store.append_audit(&entry).await {
                        tracing::warn!(error = %e, "cannot write the audit log");
                    }
                }
                Ok(false) => {}
                Err(e) => return store_error(&e),
            }
            false
        }
        (None, _) => false,
    };
    if edit.state.is_some() {
        let _ = state.proxy.shadow().sync_group_marks(&*state.store).await;
    }
    // `truncated` stays in the answer for clients that read it: nothing is left out now.
    Json(
        json!({ "fingerprint": fingerprint, "updated": updated, "truncated": false,
        "marked_expected": marked }),
    )
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupReplayQuery {
    sample: Option<usize>,
    allow_writes: Option<bool>,
    state: Option<String>,
    class: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// Replays a bounded sample of a group: its newest records that are not resolved, or with
/// `?state=` those in that state (default 5, at most 20). Each record's outcome is reported
/// on its own, so a refusal or an upstream failure is never counted as replayed; records
/// with a non-safe method are skipped unless `allow_writes` is set.
async fn replay_group(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(fingerprint): Path<String>,
    query: Result<Query<GroupReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "known parameters: sample, allow_writes, state, class, since, until",
        );
    };
    let scope = match group_scope(
        &fingerprint,
        q.state.as_deref(),
        q.class.as_deref(),
        q.since.as_deref(),
        q.until.as_deref(),
    ) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let sample = q.sample.unwrap_or(5).clamp(1, 20);
    let records = match group_sample(&*state.store, scope, sample).await {
        Ok(r) => r,
        Err(e) => return store_error(&e),
    };
    if records.is_empty() {
        let any = Filter {
            fingerprint: Some(fingerprint.clone()),
            ..Filter::default()
        };
        match state.store.count(&any).await {
            Ok(0) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no divergences with fingerprint `{fingerprint}`"),
                );
            }
            Ok(_) => {}
            Err(e) => return store_error(&e),
        }
    }
    let allow_writes = q.allow_writes.unwrap_or(false);
    let mut results = Vec::with_capacity(records.len());
    let [
        mut matched,
        mut unconfirmed,
        mut diverged,
        mut failed,
        mut sent,
        mut skipped,
    ] = [0u64; 6];
    for record in records {
        let id = record.id.clone();
        let method = record.request.method.clone();
        let write =
            http::Method::from_bytes(method.as_bytes()).is_ok_and(|m| !crate::shadow::is_safe(&m));
        if write && !allow_writes {
            skipped += 1;
            results.push(json!({"id": id, "method": method, "outcome": "skipped_write"}));
            continue;
        }
        match replay_record(&state, &who, record, true).await {
            Ok(answer) if answer["match"] == true && answer["unconfirmed"].is_string() => {
                unconfirmed += 1;
                results.push(json!({"id": id, "method": method, "outcome": "unconfirmed",
                    "match": true, "message": answer["unconfirmed"]}));
            }
            Ok(answer) if answer["match"] == true => {
                matched += 1;
                results
                    .push(json!({"id": id, "method": method, "outcome": "matched", "match": true}));
            }
            Ok(answer) => {
                diverged += 1;
                let differences = answer["diffs"].as_array().map_or(0, Vec::len);
                results.push(
                    json!({"id": id, "method": method, "outcome": "still_diverges",
                    "match": false, "differences": differences}),
                );
            }
            Err(refusal) => {
                failed += 1;
                sent += u64::from(refusal.sent);
                results.push(json!({"id": id, "method": method, "outcome": "failed",
                    "status": refusal.status.as_u16(), "error": refusal.code,
                    "message": refusal.message, "sent": refusal.sent}));
            }
        }
    }
    Json(json!({
        "fingerprint": fingerprint,
        "replayed": matched + unconfirmed + diverged,
        "matched": matched,
        "unconfirmed": unconfirmed,
        "still_diverged": diverged,
        "failed": failed,
        "failed_after_sending": sent,
        "skipped_writes": skipped,
        "results": results,
    }))
    .into_response()
}

/// The newest `n` records of a group that `filter` selects and, when it names no state, that
/// are not resolved (the store filters on one state at most, so those are picked here, page
/// by page).
async fn group_sample(
    store: &dyn Store,
    mut filter: Filter,
    n: usize,
) -> Result<Vec<crate::record::Record>, StoreError> {
    const PAGE: usize = 100;
    let only = filter.state;
    filter.limit = PAGE;
    let mut out = Vec::with_capacity(n);
    for _ in 0..GROUP_SCAN_LIMIT / PAGE {
        let page = store.list(&filter).await?;
        out.extend(
            page.items
                .into_iter()
                .filter(|r| only.is_some() || r.state != RecordState::Resolved),
        );
        match page.next {
            Some(next) if out.len() < n => filter.cursor = Some(next),
            _ => break,
        }
    }
    out.truncate(n);
    Ok(out)
}

async fn rules(State(state): State<Arc<AdminState>>) -> Response {
    // Read first: with the store out of reach, "no override" would tell the operator on call
    // that nothing overrides the rules while one is in force (each replica keeps applying the
    // overrides it last read).
    let stored = match state.store.overrides().await {
        Ok(stored) => stored,
        Err(e) => return store_error(&e),
    };
    let live = state.proxy.live();
    let rules = &live.rules;
    let routes: Vec<Value> = rules
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "priority": r.priority,
                "authority": r.authority.as_str(),
                "defined_at": r.location.as_ref().map(ToString::to_string),
                "path": &*r.path.source,
                "methods": r.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
                "host": r.host.as_ref().map(ToString::to_string),
                "legacy": &*rules.upstreams[r.legacy].name,
                "new": &*rules.upstreams[r.new].name,
                "canary": r.canary.as_ref().map(|c| json!({"percent": c.percent, "key": c.key.to_string()})),
                "shadow": r.shadow.as_ref().map(|s| json!({"sample": s.sample, "writes": s.writes, "noise_probe": s.noise_probe})),
            })
        })
        .collect();
    let overrides: Vec<Value> = stored
        .into_iter()
        .filter(|o| o.until_ms > crate::store::writer::now_ms())
        .map(|o| json!(o))
        .collect();
    Json(json!({
        "routes": routes,
        "overrides": overrides,
        "sources": rules.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "loaded_at": humantime::format_rfc3339_millis(rules.loaded_at).to_string(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideRequest {
    authority: Option<String>,
    shadow: Option<bool>,
    ttl: String,
    reason: String,
}

/// Longest an override may last: it is an emergency measure, not a rules change.
const MAX_OVERRIDE_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Flips a route on every replica sharing the store, until the TTL runs out or it is lifted.
async fn set_override(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
    body: Result<Json<OverrideRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "send {\"authority\": \"legacy\"|\"new\", \"shadow\": false?, \"ttl\": \"1h\", \"reason\": \"...\"}",
        );
    };
    if state.proxy.live().rules.route_by_name(&name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route `{name}` in the rules"),
        );
    }
    if !matches!(req.authority.as_deref(), None | Some("legacy" | "new")) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_authority",
            "authority is \"legacy\" or \"new\"",
        );
    }
    if req.authority.is_none() && req.shadow.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "override the authority, the shadow, or both",
        );
    }
    if req.reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "say why: `reason` is required",
        );
    }
    let ttl = match humantime::parse_duration(&req.ttl) {
        Ok(d) if !d.is_zero() && d <= MAX_OVERRIDE_TTL => d,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_ttl",
                "ttl is a duration such as \"1h\", at most 7 days",
            );
        }
    };
    let o = crate::store::Override {
        route: name.clone(),
        authority: req.authority,
        shadow: req.shadow,
        until_ms: crate::store::writer::now_ms()
            + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        reason: req.reason,
        who: who.0,
        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    };
    if let Err(e) = state.store.put_override(&o).await {
        return store_error(&e);
    }
    tracing::warn!(route = %name, who = %o.who, reason = %o.reason, authority = ?o.authority, shadow = ?o.shadow, ttl = %req.ttl, "emergency override set");
    let entry = json!({"event": "override_set", "route": name, "who": o.who, "at": o.at, "reason": o.reason,
        "authority": o.authority, "shadow": o.shadow, "ttl": req.ttl});
    if let Err(e) = state.store.append_audit(&entry).await {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
    let _ = state.proxy.sync_overrides(&*state.store).await;
    Json(json!(o)).into_response()
}

async fn lift_override(
    State(state): State<Arc<AdminState>>,
    Extension(who): Extension<Who>,
    Path(name): Path<String>,
) -> Response {
    // An override past its end no longer applies: lifting it changes nothing, and saying
    // "lifted" (with an audit entry) would tell the operator on call that it did.
    let in_force = match state.store.overrides().await {
        Ok(all) => all
            .iter()
            .any(|o| o.route == name && o.until_ms > crate::store::writer::now_ms()),
        Err(e) => return store_error(&e),
    };
    if !in_force {
        let _ = state.store.delete_override(&name).await;
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no override in force on `{name}`"),
        );
    }
    match state.store.delete_override(&name).await {
        Ok(true) => {
            tracing::warn!(route = %name, who = %who.0, "emergency override lifted");
            let entry = json!({"event": "override_lifted", "route": name, "who": who.0,
                "at": humantime::format_rfc3339_millis(SystemTime::now()).to_string()});
            if let Err(e) = state.store.append_audit(&entry).await {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
            let _ = state.proxy.sync_overrides(&*state.store).await;
            Json(json!({"route": name, "lifted": true})).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no override on `{name}`"),
        ),
        Err(e) => store_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImpactRequest {
    /// Candidate rules files: name -> TOML text.
    files: std::collections::BTreeMap<String, String>,
}

/// A stored response, rebuilt for comparison; `None` when the record lacks what a faithful
/// comparison needs (a body cut at the limit, or not text).
fn stored_response(
    r: &crate::record::RecordedResponse,
) -> Option<(u16, http::HeaderMap, bytes::Bytes)> {
    if r.body.body_truncated || (r.body.body.is_none() && r.body.body_len > 0) {
        return None;
    }
    let mut headers = http::HeaderMap::new();
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            headers.append(k, v);
        }
    }
    Some((
        r.status,
        headers,
        bytes::Bytes::from(r.body.body.clone().unwrap_or_default()),
    ))
}

/// What a rules change would do to the divergences on record: the stored answers are
/// compared again with the candidate `compare` rules, per route and per group.
async fn impact(
    State(state): State<Arc<AdminState>>,
    body: Result<Json<ImpactRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "send {\"files\": {\"name.toml\": \"...rules...\"}}",
        );
    };
    let sources = req
        .files
        .into_iter()
        .map(|(name, text)| (std::path::PathBuf::from(name), text))
        .collect();
    // Variables are checked for presence only: their values (secrets of this process) must
    // not come back in the answer's errors.
    let placeholder = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(|_| "http://env-value.invalid".to_string())
    };
    let candidate = match crate::rules::load_sources(sources, &placeholder) {
        Ok(loaded) => loaded.rules,
        Err(errors) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({
                    "error": "invalid_rules",
                    "message": "the candidate rules are invalid",
                    "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })),
            )
                .into_response();
        }
    };
    let mut routes = Vec::new();
    for route in &candidate.routes {
        let comparator = crate::compare::CompareSpec::compile(&route.compare).unwrap_or_default();
        let filter = Filter {
            route: Some(route.name.to_string()),
            ..Filter::default()
        };
        let (records, truncated) = match scan(&*state.store, filter).await {
            Ok(r) => r,
            Err(e) => return store_error(&e),
        };
        if records.is_empty() {
            continue;
        }
        let count = records.len();
        // Up to 10,000 comparisons of bodies up to the record limit: seconds of CPU, which on
        // the control runtime's one thread would hold up the record writer, `/readyz` and the
        // override sync meanwhile.
        let Ok((totals, groups)) = tokio::task::spawn_blocking(move || {
            let mut groups: std::collections::BTreeMap<String, [u64; 3]> = Default::default();
            let mut totals = [0u64; 3];
            for r in &records {
                // Redacted values read the same on both sides: such records cannot be judged.
                let redacted = serde_json::to_string(&r.diffs)
                    .is_ok_and(|t| t.contains(crate::compare::REDACTED));
                let outcome = match (stored_response(&r.legacy), stored_response(&r.new)) {
                    (Some(l), Some(n)) if !redacted => {
                        let legacy = crate::compare::Response {
                            status: l.0,
                            headers: &l.1,
                            body: &l.2,
                        };
                        let new = crate::compare::Response {
                            status: n.0,
                            headers: &n.1,
                            body: &n.2,
                        };
                        if comparator.compare(&legacy, &new).is_match() {
                            0
                        } else {
                            1
                        }
                    }
                    _ => 2,
                };
                totals[outcome] += 1;
                groups.entry(r.fingerprint.clone()).or_default()[outcome] += 1;
            }
            (totals, groups)
        })
        .await
        else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "impact_failed",
                "the comparison of the stored records failed",
            );
        };
        let figures =
            |c: &[u64; 3]| json!({"would_match": c[0], "would_remain": c[1], "unknown": c[2]});
        routes.push(json!({
            "route": &*route.name,
            "records": count,
            "truncated": truncated,
            "totals": figures(&totals),
            "groups": groups.iter().map(|(fp, c)| {
                let mut g = figures(c);
                g["fingerprint"] = json!(fp);
                g
            }).collect::<Vec<_>>(),
        }));
    }
    Json(json!({ "routes": routes })).into_response()
}

async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    let reload = state.reload.clone();
    match tokio::task::spawn_blocking(move || reload()).await {
        Ok(Ok(routes)) => Json(json!({ "status": "reloaded", "routes": routes })).into_response(),
        Ok(Err(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "error": "invalid_rules",
                "message": "the rules were rejected; the previous rules stay in force",
                "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reload_failed",
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3339 times may carry any offset, not only `Z`: the same instant either way.
    #[test]
    fn time_bounds_read_rfc3339_offsets() {
        let utc = time_ms("2026-11-22T01:00:00Z");
        assert_eq!(utc, Some(1_795_309_200_000));
        assert_eq!(time_ms("2026-11-22T02:00:00+01:00"), utc);
        assert_eq!(time_ms("2026-11-21T20:00:00-05:00"), utc);
        assert_eq!(
            time_ms("2026-11-22T01:30:00.5+00:30"),
            Some(1_795_309_200_500)
        );
        assert_eq!(time_ms("2026-11-22T01:00:00+00:00"), utc);
        assert_eq!(time_ms("1795309200000"), utc);
        for bad in [
            "2026-11-22",
            "yesterday+01:00",
            "2026-11-22T01:00:00+1:00",
            "+01:00",
            "",
        ] {
            assert_eq!(time_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn without_tokens_only_loopback_may_change_anything() {
        let local = Some(std::net::IpAddr::from([127, 0, 0, 1]));
        let mapped = "::ffff:127.0.0.1".parse().ok();
        let remote = Some(std::net::IpAddr::from([10, 0, 0, 5]));
        assert!(open_change_allowed(&http::Method::GET, remote));
        assert!(open_change_allowed(&http::Method::POST, local));
        assert!(open_change_allowed(&http::Method::PATCH, mapped));
        assert!(!open_change_allowed(&http::Method::POST, remote));
        assert!(!open_change_allowed(&http::Method::DELETE, remote));
        assert!(!open_change_allowed(&http::Method::PATCH, None));
    }

    #[test]
    fn browser_forgeries_are_told_from_the_workbench_and_the_cli() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.insert(*n, header::HeaderValue::from_static(v));
            }
            h
        };
        // The CLI and curl: no browser headers.
        assert_eq!(
            browser_forgery(&headers(&[("host", "127.0.0.1:9901")])),
            None
        );
        assert_eq!(
            browser_forgery(&headers(&[("host", "localhost:9901")])),
            None
        );
        assert_eq!(browser_forgery(&headers(&[("host", "[::1]:9901")])), None);
        assert_eq!(browser_forgery(&HeaderMap::new()), None);
        // The workbench, served by this port.
        let own = [
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:9901"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(browser_forgery(&headers(&own)), None);
        // Another site's page posting here, with or without Fetch metadata.
        for forged in [
            &[("host", "127.0.0.1:9901"), ("sec-fetch-site", "cross-site")][..],
            &[("host", "127.0.0.1:9901"), ("sec-fetch-site", "same-site")],
            &[
                ("host", "127.0.0.1:9901"),
                ("origin", "http://127.0.0.1:8080"),
            ],
            &[("host", "127.0.0.1:9901"), ("origin", "null")],
            // DNS rebinding: the browser thinks it talks to evil.example.
            &[
                ("host", "evil.example:9901"),
                ("origin", "http://evil.example:9901"),
            ],
            &[("host", "evil.example:9901")],
        ] {
            assert!(browser_forgery(&headers(forged)).is_some(), "{forged:?}");
        }
    }
}
