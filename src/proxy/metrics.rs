//! Per-route metric handles, created on a route's first request and kept with the rules
//! snapshot, so that the request path increments atomics instead of building label sets.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};

use crate::rules::Side;
use crate::shadow::{RouteCounters, Shadower};
use crate::telemetry;

const SIDES: [Side; 2] = [Side::Legacy, Side::New];

/// Handles of one route: requests by authority and status class, client-visible and
/// upstream durations by side.
pub struct RouteMetrics {
    requests: [[Counter; 5]; 2],
    duration: [Histogram; 2],
    upstream: [Histogram; 2],
    /// The route's shadow counters, looked up by name once per snapshot.
    shadow: OnceLock<Arc<RouteCounters>>,
}

impl RouteMetrics {
    fn new(route: &Arc<str>) -> RouteMetrics {
        RouteMetrics {
            requests: SIDES.map(|side| {
                telemetry::STATUS_CLASSES.map(|class| {
                    counter!(telemetry::REQUESTS_TOTAL, "route" => route.clone(), "authority" => side.as_str(), "status" => class)
                })
            }),
            duration: SIDES.map(|side| {
                histogram!(telemetry::REQUEST_DURATION_SECONDS, "route" => route.clone(), "authority" => side.as_str())
            }),
            upstream: SIDES.map(|side| {
                histogram!(telemetry::UPSTREAM_DURATION_SECONDS, "route" => route.clone(), "side" => side.as_str())
            }),
            shadow: OnceLock::new(),
        }
    }

    /// The route's shadow counters (outcomes, comparisons), from `shadower` on first use.
    pub fn shadow(&self, shadower: &Shadower, route: &Arc<str>) -> &Arc<RouteCounters> {
        self.shadow.get_or_init(|| shadower.counters(route))
    }

    pub fn request(&self, authority: Side, status: u16, elapsed: Duration) {
        let class = telemetry::status_class_index(status);
        self.requests[authority.index()][class].increment(1);
        self.duration[authority.index()].record(elapsed.as_secs_f64());
    }

    pub fn upstream(&self, side: Side, elapsed: Duration) {
        self.upstream[side.index()].record(elapsed.as_secs_f64());
    }
}

/// One lazily created [`RouteMetrics`] per route of a snapshot (the default route last).
pub struct SnapshotMetrics {
    routes: Vec<OnceLock<RouteMetrics>>,
}

impl SnapshotMetrics {
    pub fn new(routes: usize) -> SnapshotMetrics {
        SnapshotMetrics {
            routes: (0..=routes).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The handles of the route of rank `rank` (`u32::MAX` for the default route).
    pub fn route(&self, rank: u32, name: &Arc<str>) -> &RouteMetrics {
        let last = self.routes.len() - 1;
        let i = usize::try_from(rank).map_or(last, |r| r.min(last));
        self.routes[i].get_or_init(|| RouteMetrics::new(name))
    }
}
