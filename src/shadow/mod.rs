//! Shadowing: mirror a sample of a route's requests to the side that is not the authority,
//! compare the two responses once both are known, and hand divergences to the recorder.
//!
//! The client's exchange never waits on anything here: admission is a non-blocking check,
//! the bodies are teed as they stream, and the shadow call, the comparison and the recording
//! run in a task of their own. The work is bounded (in-flight permits and a memory budget)
//! and every request of a shadowed route ends in exactly one counted [`Outcome`].

pub mod offload;
pub mod tee;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics::{Counter, Gauge, Histogram};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{debug, info, warn};

use crate::compare::{self, Comparator, Comparison, Difference};
use crate::proxy::ConnInfo;
use crate::record::{CapturedRef, Exchange, Policy, Record, Recorder};
use crate::route::{RequestHead, cohort_position};
use crate::rules::{Route, Side};
use crate::telemetry;
use crate::upstream::Upstream;
use tee::{MemoryBudget, Reservation, Teed};

/// How one request of a shadowed route ended, as far as shadowing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both responses were complete and compared.
    Compared,
    /// Not in the sample.
    SkippedSample,
    /// A non-safe method on a route without `shadow.writes = true`.
    SkippedWrite,
    /// A body (request, authority's or shadow's response) over the body limit, or a request
    /// body refused (413) for passing the route's `max_request_body`.
    SkippedBodyLimit,
    /// Protocol upgrades (WebSocket) are never mirrored.
    SkippedUpgrade,
    /// The in-flight limit or the memory budget was reached.
    DroppedOverload,
    /// The shadow side failed (connect, reset, bad response).
    ShadowError,
    /// The shadow side did not answer within the shadow timeout.
    ShadowTimeout,
    /// The authority failed, so there is nothing to compare.
    AuthorityError,
    /// The client went away, its request body came or it read the answer too slowly (past the
    /// shadow timeout), or a body failed, before both sides were complete.
    Aborted,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Compared,
        Outcome::SkippedSample,
        Outcome::SkippedWrite,
        Outcome::SkippedBodyLimit,
        Outcome::SkippedUpgrade,
        Outcome::DroppedOverload,
        Outcome::ShadowError,
        Outcome::ShadowTimeout,
        Outcome::AuthorityError,
        Outcome::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Compared => "compared",
            Outcome::SkippedSample => "skipped_sample",
            Outcome::SkippedWrite => "skipped_write",
            Outcome::SkippedBodyLimit => "skipped_body_limit",
            Outcome::SkippedUpgrade => "skipped_upgrade",
            Outcome::DroppedOverload => "dropped_overload",
            Outcome::ShadowError => "shadow_error",
            Outcome::ShadowTimeout => "shadow_timeout",
            Outcome::AuthorityError => "authority_error",
            Outcome::Aborted => "aborted",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Global shadowing limits (flags of `ficus serve`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_inflight: usize,
    pub max_memory: usize,
    pub body_limit: usize,
    pub timeout: Duration,
    pub header: HeaderName,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_inflight: 256,
            max_memory: 64 << 20,
            body_limit: 1 << 20,
            timeout: Duration::from_secs(5),
            header: HeaderName::from_static("x-ficus-shadow"),
        }
    }
}

/// Per-route counts since start (this replica).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteStats {
    pub outcomes: HashMap<&'static str, u64>,
    pub matched: u64,
    pub diverged: u64,
    /// Latency to the complete response of compared exchanges, per side: (p50, p99) in ms.
    pub latency_ms: SideFigures<(f64, f64)>,
    /// Share of compared exchanges answered with a 5xx, per side.
    pub error_rate: SideFigures<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SideFigures<T> {
    pub legacy: T,
    pub new: T,
}

/// Upper bounds (ms) of the latency buckets; the last bucket is everything above.
const LATENCY_BOUNDS_MS: [f64; 18] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 120000.0, 300000.0,
];

/// A coarse latency histogram: quantiles come out as bucket upper bounds.
#[derive(Debug, Default)]
struct LatencyHist {
    buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    errors: AtomicU64,
}

impl LatencyHist {
    fn record(&self, latency: Duration, status: StatusCode) {
        let ms = latency.as_secs_f64() * 1e3;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (p50, p99) in ms and the share of 5xx answers, from one read of the buckets.
    fn figures(&self) -> ((f64, f64), f64) {
        let buckets = self.buckets.each_ref().map(|b| b.load(Ordering::Relaxed));
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return ((0.0, 0.0), 0.0);
        }
        let quantile = |q: f64| {
            let target = (q * total as f64).ceil() as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= target {
                    return LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY);
                }
            }
            f64::INFINITY
        };
        let errors = self.errors.load(Ordering::Relaxed);
        (
            (quantile(0.5), quantile(0.99)),
            errors as f64 / total as f64,
        )
    }
}

/// One route's shadow accounting since start: atomics and metric handles made once, so that
/// counting an outcome costs two atomic additions instead of a lock and a metric lookup on
/// every request of a shadowed route (most of which end skipped or dropped). Kept by route
/// name across reloads; each rules snapshot caches its routes' handles.
#[derive(Debug)]
pub struct RouteCounters {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    outcome_metrics: [Counter; Outcome::ALL.len()],
    matched: AtomicU64,
    diverged: AtomicU64,
    legacy: LatencyHist,
    new: LatencyHist,
    /// `ficus_comparisons_total` by result: match, diverged.
    comparisons: [Counter; 2],
    /// `ficus_upstream_duration_seconds` of shadow calls, by side: legacy, new.
    shadow_duration: [Histogram; 2],
    /// `ficus_status_pairs_total` by legacy and new status class, made on first use.
    status_pairs: [[OnceLock<Counter>; 5]; 5],
    /// `ficus_noise_probe_duration_seconds`, made on the route's first probe.
    noise_probe_duration: OnceLock<Histogram>,
}

impl RouteCounters {
    fn new(route: &Arc<str>) -> RouteCounters {
        RouteCounters {
            outcomes: Default::default(),
            outcome_metrics: Outcome::ALL.map(|o| {
                metrics::counter!(telemetry::SHADOW_TOTAL, "route" => route.clone(), "outcome" => o.as_str())
            }),
            matched: AtomicU64::new(0),
            diverged: AtomicU64::new(0),
            legacy: LatencyHist::default(),
            new: LatencyHist::default(),
            comparisons: ["match", "diverged"].map(|result| {
                metrics::counter!(telemetry::COMPARISONS_TOTAL, "route" => route.clone(), "result" => result)
            }),
            shadow_duration: [Side::Legacy, Side::New].map(|side| {
                metrics::histogram!(telemetry::UPSTREAM_DURATION_SECONDS, "route" => route.clone(), "side" => side.as_str())
            }),
            status_pairs: Default::default(),
            noise_probe_duration: OnceLock::new(),
        }
    }

    /// Counts one outcome (also as the `ficus_shadow_total` metric).
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.outcome_metrics[outcome.index()].increment(1);
    }

    fn status_pair(&self, route: &Arc<str>, legacy: StatusCode, new: StatusCode) -> &Counter {
        let class = |s: StatusCode| telemetry::status_class_index(s.as_u16());
        let (l, n) = (class(legacy), class(new));
        self.status_pairs[l][n].get_or_init(|| {
            metrics::counter!(
                telemetry::STATUS_PAIRS_TOTAL,
                "route" => route.clone(),
                "legacy" => telemetry::STATUS_CLASSES[l],
                "new" => telemetry::STATUS_CLASSES[n],
            )
        })
    }

    fn stats(&self) -> RouteStats {
        let (legacy_latency, legacy_errors) = self.legacy.figures();
        let (new_latency, new_errors) = self.new.figures();
        RouteStats {
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.outcomes[o.index()].load(Ordering::Relaxed)))
                .collect(),
            matched: self.matched.load(Ordering::Relaxed),
            diverged: self.diverged.load(Ordering::Relaxed),
            latency_ms: SideFigures {
                legacy: legacy_latency,
                new: new_latency,
            },
            error_rate: SideFigures {
                legacy: legacy_errors,
                new: new_errors,
            },
        }
    }
}

/// Body paths learned as noise per route: paths where two legacy answers to the same request
/// differed, with how often.
#[derive(Debug, Default)]
pub struct NoiseTable {
    routes: Mutex<HashMap<Arc<str>, HashMap<String, u64>>>,
}

/// Distinct noisy paths kept per route. Array indices are generalised away, but object keys
/// are not: a legacy answer keyed by session ids or timestamps would otherwise grow the
/// table by a path per probe, for ever.
pub const MAX_NOISY_PATHS_PER_ROUTE: usize = 1_000;

impl NoiseTable {
    fn learn(&self, route: &Arc<str>, paths: impl Iterator<Item = String>) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let table = routes.entry(route.clone()).or_default();
        let was_full = table.len() >= MAX_NOISY_PATHS_PER_ROUTE;
        let mut refused = 0usize;
        for path in paths {
            if let Some(n) = table.get_mut(&path) {
                *n += 1;
            } else if table.len() < MAX_NOISY_PATHS_PER_ROUTE {
                table.insert(path, 1);
            } else {
                refused += 1;
            }
        }
        if refused > 0 && !was_full {
            warn!(
                route = %route,
                limit = MAX_NOISY_PATHS_PER_ROUTE,
                "the route's table of noisy fields is full; new noisy paths are no longer learned (dynamic object keys?)"
            );
        }
    }

    fn is_noisy(&self, route: &str, path: &str) -> bool {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .get(route)
            .is_some_and(|t| t.contains_key(&compare::generalize(path)))
    }

    /// The noisy paths of a route (generalised, array indices as `*`) with their counts.
    pub fn paths(&self, route: &str) -> Vec<(String, u64)> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = routes
            .get(route)
            .map(|t| t.iter().map(|(p, n)| (p.clone(), *n)).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// The decision for one request of a shadowed route.
pub enum Admission {
    Skip(Outcome),
    Mirror(Ticket),
}

/// Permission to mirror one request: an in-flight slot and a share of the memory budget.
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    reservation: Arc<Reservation>,
    inflight: Gauge,
}

impl Ticket {
    pub(crate) fn reservation(&self) -> &Arc<Reservation> {
        &self.reservation
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The shadow has ended: its bytes go back now, even while the client's answer (and
        // the tee on it, which points at the reservation) streams on.
        self.reservation.close();
        self.inflight.decrement(1.0);
    }
}

/// The client request's head as the shadow needs it.
pub struct MirroredHead {
    pub method: Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub conn: ConnInfo,
    pub request_id: HeaderValue,
}

/// The authority's side of one exchange, as the shadow task learns it.
pub enum AuthorityResult {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: oneshot::Receiver<Teed>,
    },
    Failed,
    /// The client's body passed the route's `max_request_body` and was refused with 413.
    BodyTooLarge,
}

/// What a mirrored exchange needs from its route, captured when it starts.
pub struct RouteContext {
    pub name: Arc<str>,
    /// The route's counters (see [`Shadower::counters`]).
    pub counters: Arc<RouteCounters>,
    pub authority: Side,
    pub comparator: Arc<Comparator>,
    pub noise_probe: f64,
    /// The upstream on the other side (the shadow target).
    pub shadow: Upstream,
    /// The legacy upstream, for noise probes.
    pub legacy: Upstream,
    /// Time allowed for the whole shadow exchange.
    pub timeout: Duration,
    /// Automatic classification of new records.
    pub classify: Arc<[crate::rules::ClassifyRule]>,
}

/// The shadowing stage: admission, the mirrored call, comparison, recording.
pub struct Shadower {
    settings: Settings,
    inflight: Arc<Semaphore>,
    budget: Arc<MemoryBudget>,
    /// Per-route counters by name; the request path reaches them through its snapshot's cache.
    routes: Mutex<HashMap<Arc<str>, Arc<RouteCounters>>>,
    inflight_gauge: Gauge,
    noise: NoiseTable,
    recorder: Arc<dyn Recorder>,
    policy: Policy,
    /// Divergent-field paths per route that have a series of their own.
    field_paths: Mutex<HashMap<Arc<str>, std::collections::HashSet<String>>>,
    /// Threads for comparisons too large for a proxy worker; `None` if none could be started
    /// (comparisons then run inline, as small ones always do).
    compare_pool: Option<offload::Pool>,
    compare_offloaded: Counter,
    /// Groups marked expected, by fingerprint, as last read from the store.
    group_marks: arc_swap::ArcSwap<HashMap<String, crate::store::GroupMark>>,
}

impl Shadower {
    pub fn new(settings: Settings, recorder: Arc<dyn Recorder>, policy: Policy) -> Self {
        // Half the cores: large comparisons wait for a thread rather than take CPU from the
        // workers that serve clients.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() / 2);
        let compare_pool = offload::Pool::new(threads)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no comparison threads; large comparisons run inline")
            })
            .ok();
        Self {
            compare_pool,
            compare_offloaded: metrics::counter!(telemetry::SHADOW_COMPARE_OFFLOADED_TOTAL),
            policy,
            inflight: Arc::new(Semaphore::new(settings.max_inflight)),
            budget: Arc::new(MemoryBudget::new(settings.max_memory)),
            settings,
            routes: Mutex::default(),
            inflight_gauge: metrics::gauge!(telemetry::SHADOW_INFLIGHT),
            field_paths: Mutex::default(),
            noise: NoiseTable::default(),
            recorder,
            group_marks: Default::default(),
        }
    }

    /// Reads the group marks from the store (every replica, each second, and the replica
    /// that sets or lifts one at once). On error the marks last read stay.
    pub async fn sync_group_marks(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<(), crate::store::StoreError> {
        let marks: HashMap<String, crate::store::GroupMark> = store
            .group_marks()
            .await?
            .into_iter()
            .map(|m| (m.fingerprint.clone(), m))
            .collect();
        if **self.group_marks.load() != marks {
            self.group_marks.store(Arc::new(marks));
        }
        Ok(())
    }

    /// A record of a group marked expected is written expected, with the mark's class and
    /// note, and says so in its history.
    fn apply_group_mark(&self, record: &mut Record) {
        let marks = self.group_marks.load();
        let Some(mark) = marks.get(&record.fingerprint) else {
            return;
        };
        record.state = crate::record::State::Expected;
        if mark.class.is_some() {
            record.class.clone_from(&mark.class);
        }
        if mark.note.is_some() {
            record.note.clone_from(&mark.note);
        }
        record.history.push(crate::record::Change {
            who: mark.who.clone(),
            at: mark.at.clone(),
            what: serde_json::json!({"state": "expected", "group_mark": mark.fingerprint}),
        });
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Shadows running now.
    pub fn inflight(&self) -> usize {
        self.settings.max_inflight - self.inflight.available_permits()
    }

    /// Bytes of bodies held by shadows now.
    pub fn memory_used(&self) -> usize {
        self.budget.used()
    }

    pub fn noise(&self) -> &NoiseTable {
        &self.noise
    }

    /// Counts per route since start.
    pub fn stats(&self, route: &str) -> RouteStats {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        match routes.get(route) {
            Some(c) => c.stats(),
            None => RouteStats {
                outcomes: Outcome::ALL.iter().map(|o| (o.as_str(), 0)).collect(),
                ..RouteStats::default()
            },
        }
    }

    /// The counters of a route, made on its first use and kept across reloads. Takes a lock:
    /// the request path calls it once per route and rules snapshot, and keeps the handle.
    pub fn counters(&self, route: &Arc<str>) -> Arc<RouteCounters> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .entry(route.clone())
            .or_insert_with(|| Arc::new(RouteCounters::new(route)))
            .clone()
    }

    /// Decides whether this request of a shadowed route is mirrored. Never waits.
    pub fn admit(&self, route: &Route, req: &RequestHead<'_>, upgrade: bool) -> Admission {
        let Some(spec) = &route.shadow else {
            return Admission::Skip(Outcome::SkippedSample);
        };
        let in_sample = match &spec.key {
            Some(key) => cohort_position(&route.name, key, req).is_some_and(|p| p < spec.sample),
            None => spec.sample >= 1.0 || fastrand::f64() < spec.sample,
        };
        if !in_sample {
            return Admission::Skip(Outcome::SkippedSample);
        }
        if upgrade {
            return Admission::Skip(Outcome::SkippedUpgrade);
        }
        if !spec.writes && !is_safe(req.method) {
            return Admission::Skip(Outcome::SkippedWrite);
        }
        // When every slot is taken (a slow shadow side), most requests end here: a plain load
        // first, so that they do not all write the semaphore's shared word to learn it.
        if self.inflight.available_permits() == 0 {
            return Admission::Skip(Outcome::DroppedOverload);
        }
        match self.inflight.clone().try_acquire_owned() {
            Ok(permit) => {
                self.inflight_gauge.increment(1.0);
                Admission::Mirror(Ticket {
                    _permit: permit,
                    reservation: Reservation::new(self.budget.clone()),
                    inflight: self.inflight_gauge.clone(),
                })
            }
            Err(_) => Admission::Skip(Outcome::DroppedOverload),
        }
    }

    /// Tees the request body for the shadow. Returns the body to forward to the authority.
    pub fn tee_request<B>(&self, ticket: &Ticket, body: B) -> (tee::Tee<B>, oneshot::Receiver<Teed>)
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
    {
        tee::Tee::new(body, self.settings.body_limit, ticket.reservation.clone())
    }

    /// Tees the authority's response body for the comparison.
    pub fn tee_response<B>(
        &self,
        ticket_reservation: &Arc<Reservation>,
        body: B,
    ) -> (tee::Tee<B>, oneshot::Receiver<Teed>)
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
    {
        tee::Tee::new(body, self.settings.body_limit, ticket_reservation.clone())
    }

    /// Runs one mirrored exchange to its outcome: the shadow call (as soon as the request
    /// body is complete), then the comparison once the authority's response is complete.
    pub async fn run(
        self: Arc<Self>,
        ticket: Ticket,
        route: RouteContext,
        head: MirroredHead,
        request_body: oneshot::Receiver<Teed>,
        authority: oneshot::Receiver<AuthorityResult>,
    ) {
        // A task cancelled before its end (a runtime shut down) still counts one outcome.
        struct Unfinished<'a>(Option<&'a RouteCounters>);
        impl Drop for Unfinished<'_> {
            fn drop(&mut self) {
                if let Some(counters) = self.0 {
                    counters.count(Outcome::Aborted);
                }
            }
        }
        let mut unfinished = Unfinished(Some(&*route.counters));
        let outcome = self
            .mirror(&ticket, &route, &head, request_body, authority)
            .await;
        unfinished.0 = None;
        route.counters.count(outcome);
        drop(ticket);
    }

    /// Resolves once no shadow is in flight (every in-flight permit is back). Shutdown waits
    /// on it, within its deadline, so that shadows of finished exchanges end and record.
    ///
    /// The permits are watched, not acquired: a waiting `acquire_many` takes each permit as it
    /// comes back, so other workers, still serving their last exchanges within the drain,
    /// would find none and end those exchanges' shadows `dropped_overload`.
    pub async fn drained(&self) {
        while self.inflight.available_permits() < self.settings.max_inflight {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn mirror(
        &self,
        ticket: &Ticket,
        route: &RouteContext,
        head: &MirroredHead,
        request_body: oneshot::Receiver<Teed>,
        authority: oneshot::Receiver<AuthorityResult>,
    ) -> Outcome {
        // The shadow call needs the whole request body, which comes only as fast as the client
        // sends it (and the authority reads it): a client that uploads slowly, or stopped,
        // must not hold this shadow's permit (and memory) past the shadow timeout, as it must
        // not by reading slowly.
        let body = match tokio::time::timeout(route.timeout, request_body).await {
            Ok(Ok(Teed::Complete(body))) => body,
            // The body failed, or the tee was dropped before it ended: the client went away,
            // its body passed the route's limit (the client then got a 413, as for a body
            // refused before forwarding), or the authority failed before reading all of it
            // (the client then got a 502/504).
            Ok(Ok(Teed::Failed) | Err(_)) => {
                return match authority.await {
                    Ok(AuthorityResult::Failed) => Outcome::AuthorityError,
                    Ok(AuthorityResult::BodyTooLarge) => Outcome::SkippedBodyLimit,
                    _ => Outcome::Aborted,
                };
            }
            Ok(Ok(teed)) => return teed_outcome(&teed),
            Err(_) => return Outcome::Aborted,
        };
        // Both sides' latencies run from here, the complete request, to the complete answer:
        // the client's upload is no upstream's latency, and the shadow side never waits on it.
        let complete = Instant::now();
        // The shadow call starts now, concurrently with the authority's response.
        let shadow = self.call(
            route,
            Call::Shadow(route.authority.other()),
            &route.shadow,
            head,
            body.clone(),
            &ticket.reservation,
        );
        let authority = async {
            let (status, headers, body) = match authority.await.map_err(|_| Outcome::Aborted)? {
                AuthorityResult::Response {
                    status,
                    headers,
                    body,
                } => (status, headers, body),
                AuthorityResult::Failed => return Err(Outcome::AuthorityError),
                AuthorityResult::BodyTooLarge => return Err(Outcome::SkippedBodyLimit),
            };
            // The authority's body reaches the tee only as fast as the client reads it: a
            // client that reads slowly, or stopped, must not hold this shadow's permit and
            // memory past the shadow timeout.
            match tokio::time::timeout(route.timeout, body).await {
                Ok(Ok(Teed::Complete(body))) => Ok(Captured {
                    status,
                    headers,
                    body,
                    latency: complete.elapsed(),
                }),
                Ok(Ok(teed)) => Err(teed_outcome(&teed)),
                Ok(Err(_)) | Err(_) => Err(Outcome::Aborted),
            }
        };
        let (shadow, authority) = tokio::join!(shadow, authority);
        let authority = match authority {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        // The new side failing where legacy answered is the strongest evidence against its
        // readiness: as the authority it would have given the client a 502 or 504. Left out
        // of the comparisons, a new side that failed one request in three could still read
        // ready on the two it answered. It is compared as the answer the client would have
        // got, and recorded; the outcome still says what happened. A failing legacy shadow
        // (the new side is the authority) says nothing about the new side.
        let (shadow, failed) = match shadow {
            Ok(s) => (s, None),
            Err(outcome @ (Outcome::ShadowError | Outcome::ShadowTimeout))
                if route.authority == Side::Legacy =>
            {
                let answer = failed_answer(outcome, route, complete.elapsed());
                (answer, Some(outcome))
            }
            Err(outcome) => return outcome,
        };
        let done = failed.unwrap_or(Outcome::Compared);
        // Shadow work yields to client work: when many slow shadows complete at once, their
        // comparisons queue behind the exchanges that are waiting, instead of ahead of them.
        tokio::task::yield_now().await;
        // Comparisons always read from legacy to new.
        let (legacy, new) = match route.authority {
            Side::Legacy => (authority, shadow),
            Side::New => (shadow, authority),
        };
        let (comparison, legacy, new) = if failed.is_some() {
            // Only the status can be told apart: the body is ficus's error, not the new side's.
            let (old, value) = (legacy.status.as_u16(), new.status.as_u16());
            let diffs = if old == value {
                Vec::new()
            } else {
                vec![Difference::Status { old, value }]
            };
            let comparison = compare::Comparison {
                diffs,
                exhausted: false,
            };
            (comparison, legacy, new)
        } else {
            let Some(compared) = self.compare(&route.comparator, legacy, new).await else {
                return Outcome::Aborted;
            };
            compared
        };
        route.counters.legacy.record(legacy.latency, legacy.status);
        route.counters.new.record(new.latency, new.status);
        // A sampled trace of comparisons for debugging: paths and counts, never values.
        if fastrand::u8(..) == 0 {
            debug!(
                target: "ficus::comparison",
                route = %route.name,
                request_id = head.request_id.to_str().unwrap_or_default(),
                differences = comparison.diffs.len(),
                paths = ?comparison.body_paths().take(5).collect::<Vec<_>>(),
                "compared (1 in 256 sampled)"
            );
        }
        if !comparison.is_match()
            && failed.is_none()
            && route.noise_probe > 0.0
            && is_safe(&head.method)
            && fastrand::f64() < route.noise_probe
        {
            self.probe_noise(route, head, &body, &legacy, &ticket.reservation)
                .await;
        }
        let (diffs, noisy_diffs) = self.split_noise(&route.name, comparison);
        self.recorder.count(&route.name, !diffs.is_empty());
        let counters = &route.counters;
        counters
            .status_pair(&route.name, legacy.status, new.status)
            .increment(1);
        if diffs.is_empty() {
            counters.matched.fetch_add(1, Ordering::Relaxed);
            counters.comparisons[0].increment(1);
        } else {
            counters.diverged.fetch_add(1, Ordering::Relaxed);
            counters.comparisons[1].increment(1);
            let Some(record) = self
                .build_record(route, head, &body, legacy, new, diffs, noisy_diffs)
                .await
            else {
                // Only a panic gets here (logged where it happened); the comparison itself is
                // done and counted, so its outcome stays `compared`.
                tracing::error!(route = %route.name, "a divergence record could not be built");
                return done;
            };
            // Paths only: values are body data, and bodies never go to logs.
            info!(
                target: "ficus::divergence",
                route = %route.name,
                request_id = %record.request_id,
                id = %record.id,
                fingerprint = %record.fingerprint,
                paths = ?record.paths,
                "responses diverged"
            );
            let mut record = record;
            record.class = route
                .classify
                .iter()
                .find(|rule| rule.covers(&record.paths))
                .map(|rule| rule.class.to_string());
            self.apply_group_mark(&mut record);
            self.count_fields(&route.name, &record.paths);
            let class = record
                .class
                .clone()
                .unwrap_or_else(|| "unclassified".into());
            metrics::counter!(telemetry::DIVERGENCES_TOTAL, "route" => route.name.clone(), "class" => class)
                .increment(1);
            self.recorder.record(record);
        }
        done
    }

    /// Sends the request to `upstream` as a shadow and captures the response (bounded).
    async fn call(
        &self,
        route: &RouteContext,
        purpose: Call,
        upstream: &Upstream,
        head: &MirroredHead,
        body: Bytes,
        reservation: &Reservation,
    ) -> Result<Captured, Outcome> {
        let started = Instant::now();
        let exchange = async {
            let mut req = Request::new(
                Full::new(body)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = head.uri.clone();
            *req.version_mut() = head.version;
            *req.headers_mut() = head.headers.clone();
            let mut req = crate::proxy::upstream_request(req, upstream, head.conn, false)
                .map_err(|_| Outcome::ShadowError)?;
            req.headers_mut()
                .insert(self.settings.header.clone(), HeaderValue::from_static("1"));
            let resp = upstream.request(req).await.map_err(|e| {
                debug!(error = %e, upstream = %upstream.name, "shadow request failed");
                let kind = if e.is_connect() {
                    "connect"
                } else {
                    "upstream"
                };
                purpose.count_error(&route.name, kind);
                Outcome::ShadowError
            })?;
            let to_head = started.elapsed().as_secs_f64();
            match purpose {
                Call::Shadow(side) => route.counters.shadow_duration[side.index()].record(to_head),
                Call::NoiseProbe => route
                    .counters
                    .noise_probe_duration
                    .get_or_init(|| {
                        metrics::histogram!(telemetry::NOISE_PROBE_DURATION_SECONDS, "route" => route.name.clone())
                    })
                    .record(to_head),
            }
            let (parts, mut body) = resp.into_parts();
            // The authority's answer is captured as the client gets it, after ficus's own edits
            // (hop-by-hop fields out, `Via` and `x-request-id` in, lengths repaired): this one
            // is edited the same way, so that those edits never read as a difference.
            let mut edited = http::Response::from_parts(parts, ());
            crate::proxy::headers::prepare_response(&mut edited, &head.request_id, false);
            let (parts, ()) = edited.into_parts();
            let mut buf = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| Outcome::ShadowError)?;
                if let Some(data) = frame.data_ref() {
                    if buf.len() + data.len() > self.settings.body_limit {
                        return Err(Outcome::SkippedBodyLimit);
                    }
                    if !reservation.try_grow(data.len()) {
                        return Err(Outcome::DroppedOverload);
                    }
                    buf.extend_from_slice(data);
                }
            }
            Ok(Captured {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
                latency: started.elapsed(),
            })
        };
        match tokio::time::timeout(route.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                purpose.count_error(&route.name, "timeout");
                Err(Outcome::ShadowTimeout)
            }
        }
    }

    /// Compares two captured answers: inline when they are small, else on a comparison
    /// thread (see [`offload`]), handing them back with the result. `None` only if the
    /// comparison could not run to its end.
    async fn compare(
        &self,
        comparator: &Arc<Comparator>,
        legacy: Captured,
        new: Captured,
    ) -> Option<(Comparison, Captured, Captured)> {
        let large = offload::worth_offloading(
            (&legacy.headers, legacy.body.len()),
            (&new.headers, new.body.len()),
        );
        match &self.compare_pool {
            Some(pool) if large => {
                self.compare_offloaded.increment(1);
                let comparator = comparator.clone();
                pool.run(move || {
                    let c = comparator.compare(&legacy.as_compare(), &new.as_compare());
                    (c, legacy, new)
                })
                .await
            }
            _ => {
                let c = comparator.compare(&legacy.as_compare(), &new.as_compare());
                Some((c, legacy, new))
            }
        }
    }

    /// The record of a diverged exchange. Building it reads the bodies (UTF-8 checks, and
    /// redaction parses JSON), so large ones are built where large comparisons run.
    #[allow(clippy::too_many_arguments)]
    async fn build_record(
        &self,
        route: &RouteContext,
        head: &MirroredHead,
        body: &Bytes,
        legacy: Captured,
        new: Captured,
        diffs: Vec<Difference>,
        noisy_diffs: Vec<Difference>,
    ) -> Option<Record> {
        let large = offload::worth_offloading(
            (&legacy.headers, legacy.body.len() + body.len()),
            (&new.headers, new.body.len()),
        );
        let now = SystemTime::now();
        let build = {
            let (name, authority, comparator) = (
                route.name.clone(),
                route.authority,
                route.comparator.clone(),
            );
            let request_id = head.request_id.to_str().unwrap_or_default().to_string();
            let (method, uri, headers) =
                (head.method.clone(), head.uri.clone(), head.headers.clone());
            let (body, policy) = (body.clone(), self.policy.clone());
            move || {
                Record::build(
                    Exchange {
                        route: &name,
                        authority,
                        request_id: &request_id,
                        method: &method,
                        uri: &uri,
                        request_headers: &headers,
                        request_body: &body,
                        legacy: legacy.captured(),
                        new: new.captured(),
                        diffs,
                        noisy_diffs,
                        comparator: &comparator,
                    },
                    &policy,
                    now,
                )
            }
        };
        match &self.compare_pool {
            Some(pool) if large => pool.run(build).await,
            _ => Some(build()),
        }
    }

    /// Asks legacy a second time; paths where its two answers differ are noise.
    async fn probe_noise(
        &self,
        route: &RouteContext,
        head: &MirroredHead,
        body: &Bytes,
        legacy: &Captured,
        reservation: &Reservation,
    ) {
        let Ok(again) = self
            .call(
                route,
                Call::NoiseProbe,
                &route.legacy,
                head,
                body.clone(),
                reservation,
            )
            .await
        else {
            return;
        };
        let Some((noise, _, _)) = self.compare(&route.comparator, legacy.clone(), again).await
        else {
            return;
        };
        // Out of budget, an insertion can come out as a run of changes at every later index:
        // learning those paths would hide real differences there from then on.
        if noise.exhausted {
            debug!(route = %route.name, "noise probe ran out of comparison budget; nothing learned");
            return;
        }
        // Noise is what differs between two answers of the same kind. A probe that legacy
        // answers with another status (a 503 under load, a 429) differs in every field, and
        // learning those would hide real differences on them from then on.
        if noise
            .diffs
            .iter()
            .any(|d| matches!(d, Difference::Status { .. }))
        {
            debug!(route = %route.name, "noise probe answered with another status; nothing learned");
            return;
        }
        let paths: Vec<String> = noise.body_paths().map(compare::generalize).collect();
        if !paths.is_empty() {
            debug!(route = %route.name, paths = ?paths, "learned noisy fields");
            self.noise.learn(&route.name, paths.into_iter());
        }
    }

    /// Counts differing fields per generalised path, with a cap on distinct paths per route.
    fn count_fields(&self, route: &Arc<str>, paths: &[String]) {
        let mut seen = self
            .field_paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known = seen.entry(route.clone()).or_default();
        for path in paths {
            let label = if known.contains(path) {
                path.clone()
            } else if known.len() < telemetry::MAX_FIELD_PATHS_PER_ROUTE {
                known.insert(path.clone());
                path.clone()
            } else {
                "_other".to_string()
            };
            metrics::counter!(telemetry::DIVERGENT_FIELDS_TOTAL, "route" => route.clone(), "path" => label)
                .increment(1);
        }
    }

    fn split_noise(
        &self,
        route: &str,
        comparison: Comparison,
    ) -> (Vec<Difference>, Vec<Difference>) {
        comparison.diffs.into_iter().partition(|d| match d {
            Difference::Body(b) => b.path().is_none_or(|p| !self.noise.is_noisy(route, p)),
            _ => true,
        })
    }
}

/// What a call of [`Shadower::call`] is for, which decides the metrics it counts in.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// The mirrored request, to the side that is not the authority.
    Shadow(Side),
    /// Legacy asked a second time to learn noisy fields: ficus's own extra call, kept out of
    /// legacy's upstream metrics, which would otherwise count it as traffic (a higher request
    /// rate, latency percentiles bent by a tail of probes the new side never gets).
    NoiseProbe,
}

impl Call {
    fn count_error(self, route: &Arc<str>, kind: &'static str) {
        match self {
            Call::Shadow(side) => metrics::counter!(telemetry::UPSTREAM_ERRORS_TOTAL, "route" => route.clone(), "side" => side.as_str(), "kind" => kind)
                .increment(1),
            Call::NoiseProbe => metrics::counter!(telemetry::NOISE_PROBE_ERRORS_TOTAL, "route" => route.clone(), "kind" => kind)
                .increment(1),
        }
    }
}

fn teed_outcome(teed: &Teed) -> Outcome {
    match teed {
        Teed::Complete(_) => Outcome::Compared,
        Teed::OverLimit => Outcome::SkippedBodyLimit,
        Teed::OverBudget => Outcome::DroppedOverload,
        Teed::Failed => Outcome::Aborted,
    }
}

/// Safe methods (RFC 9110 9.2.1): the only ones mirrored unless a route allows writes.
pub fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// A complete response held for comparison.
/// The answer a client would have got from ficus had the new side been the authority and
/// failed as it did under the shadow (see [`Shadower`]'s comparison of such failures).
fn failed_answer(outcome: Outcome, route: &RouteContext, latency: Duration) -> Captured {
    let (status, code, message) = if outcome == Outcome::ShadowTimeout {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!(
                "the new side sent no complete answer within the shadow timeout ({})",
                humantime::format_duration(route.timeout)
            ),
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the new side failed: no connection, a reset, or a broken answer".to_string(),
        )
    };
    let body = serde_json::json!({
        "error": code,
        "message": message,
        "route": &*route.name,
        "side": "new",
        "shadow": true,
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Captured {
        status,
        headers,
        body: Bytes::from(body.to_string()),
        latency,
    }
}

#[derive(Clone)]
struct Captured {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    latency: Duration,
}

impl Captured {
    fn as_compare(&self) -> compare::Response<'_> {
        compare::Response {
            status: self.status.as_u16(),
            headers: &self.headers,
            body: &self.body,
        }
    }

    fn captured(&self) -> CapturedRef<'_> {
        CapturedRef {
            status: self.status.as_u16(),
            headers: &self.headers,
            body: &self.body,
            latency: self.latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;
    impl Recorder for Nowhere {
        fn record(&self, _record: Record) {}
    }

    /// One worker's drain waits for every shadow in flight, other workers' too; meanwhile
    /// those workers still serve their last exchanges, whose shadows need permits.
    #[tokio::test]
    async fn waiting_for_the_drain_takes_no_permit_from_other_workers() {
        let settings = Settings {
            max_inflight: 2,
            ..Settings::default()
        };
        let policy = Policy::default();
        let shadower = Arc::new(Shadower::new(settings, Arc::new(Nowhere), policy));
        let held = shadower.inflight.clone().try_acquire_owned().unwrap();
        let draining = tokio::spawn({
            let shadower = shadower.clone();
            async move { shadower.drained().await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let other = shadower.inflight.clone().try_acquire_owned();
        assert!(other.is_ok(), "a permit is free while the drain waits");
        assert!(!draining.is_finished());
        drop((held, other));
        tokio::time::timeout(Duration::from_secs(10), draining)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_routes_table_of_noisy_paths_is_bounded() {
        let table = NoiseTable::default();
        let route: Arc<str> = "sessions".into();
        table.learn(
            &route,
            (0..MAX_NOISY_PATHS_PER_ROUTE + 500).map(|i| format!("/by_id/k{i}")),
        );
        // Known paths still count up; new ones are refused.
        table.learn(
            &route,
            ["/by_id/k0".to_string(), "/late".to_string()].into_iter(),
        );
        let paths = table.paths("sessions");
        assert_eq!(paths.len(), MAX_NOISY_PATHS_PER_ROUTE);
        assert!(paths.contains(&("/by_id/k0".to_string(), 2)));
        assert!(table.is_noisy("sessions", "/by_id/k0"));
        assert!(!table.is_noisy("sessions", "/late"));
        // Other routes have tables of their own.
        table.learn(&"other".into(), std::iter::once("/late".to_string()));
        assert!(table.is_noisy("other", "/late"));
    }
}
