//! The Prometheus exporter: one global recorder (metrics facade), rendered by `GET /metrics`
//! on the admin listener. Every metric is described here, with buckets suited to proxy
//! latencies (half a millisecond to thirty seconds).

use std::sync::OnceLock;

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::*;

/// Latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once per process (tests start several ficus in one process)
/// and returns the handle that renders it; `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok()?;
            describe();
            zero_event_counters();
            ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .clone()
}

/// Counters of rare events, exported at 0 from start: the alerts on them use `increase()`,
/// which sees nothing when a series first appears already at 1 (one rejected reload, one
/// burst of dropped records would never fire).
fn zero_event_counters() {
    for result in ["ok", "error"] {
        ::metrics::counter!(RULES_RELOADS_TOTAL, "result" => result).increment(0);
    }
    for reason in ["queue_full", "spool_full", "spool_error", "spool_corrupt"] {
        ::metrics::counter!(STORE_DROPPED_TOTAL, "reason" => reason).increment(0);
    }
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Client requests by route, authority and status class."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Client-visible time to the response head, by route and authority."
    );
    describe_histogram!(
        UPSTREAM_DURATION_SECONDS,
        Unit::Seconds,
        "Time to the upstream's response head, by route and side."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed upstream calls by route, side and kind."
    );
    describe_histogram!(
        NOISE_PROBE_DURATION_SECONDS,
        Unit::Seconds,
        "Time to legacy's response head of noise probes (not traffic), by route."
    );
    describe_counter!(
        NOISE_PROBE_ERRORS_TOTAL,
        "Failed noise probes by route and kind."
    );
    describe_counter!(
        REQUESTS_REJECTED_TOTAL,
        "Requests refused before reaching any upstream, by reason."
    );
    describe_counter!(SHADOW_TOTAL, "Requests of shadowed routes by outcome.");
    describe_counter!(
        COMPARISONS_TOTAL,
        "Comparisons by route and result (match, diverged)."
    );
    describe_counter!(
        STATUS_PAIRS_TOTAL,
        "Compared exchanges by route and the status classes of legacy and new."
    );
    describe_counter!(DIVERGENCES_TOTAL, "Divergence records by route and class.");
    describe_counter!(
        DIVERGENT_FIELDS_TOTAL,
        "Differing fields by route and generalised path (capped per route; the rest is _other)."
    );
    describe_gauge!(STORE_QUEUE_DEPTH, "Records waiting for the writer.");
    describe_gauge!(
        STORE_SPOOLED_RECORDS,
        "Records in the local spool, waiting for the store."
    );
    describe_counter!(STORE_DROPPED_TOTAL, "Divergence records lost, by reason.");
    describe_counter!(RULES_RELOADS_TOTAL, "Rules reloads by result (ok, error).");
    describe_counter!(
        TLS_CERT_RELOADS_TOTAL,
        "Reloads of the listener's TLS certificate by result (ok, error); on error the one in force stays."
    );
    describe_gauge!(
        RULES_LOADED_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last successful rules load."
    );
    describe_gauge!(
        RULES_LAST_RELOAD_SUCCESS,
        "1 if the last rules load succeeded, 0 if it was rejected and older rules stay in force."
    );
    describe_gauge!(SHADOW_INFLIGHT, "Shadow exchanges running now.");
    describe_counter!(
        SHADOW_COMPARE_OFFLOADED_TOTAL,
        "Comparisons run on a comparison thread instead of a proxy worker (large or compressed bodies)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version is a label.");
    describe_gauge!(
        ROUTE_OVERRIDE,
        "1 while an emergency override is in force on a route."
    );
}

/// The exposition `text` without the samples whose `route` label names a route that
/// `exists` refuses. The recorder keeps every series it ever made (it cannot delete one), so a
/// route removed or renamed by a reload would otherwise be exported for as long as the
/// process runs: a dashboard row, a `by (route)` ratio, an override gauge still at 1 for a
/// route that no longer exists. Left out here, its series go stale in Prometheus at the next
/// scrape. Should the route come back, its counters go on from where they were: they were
/// never reset, only hidden, so `rate()` across the gap stays right.
pub fn without_removed_routes(text: &str, exists: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if route_label(line).is_some_and(|route| !exists(route)) {
            continue;
        }
        out.push_str(line);
    }
    out
}

/// The value of the `route` label of one sample line (`name{a="x",route="y"} 1`), if it has
/// one. Label values are scanned with their escapes (`\"`, `\\`), so that a `route="..."`
/// inside another label's value (a divergent field's path comes from a response body) is
/// never taken for the label.
fn route_label(line: &str) -> Option<&str> {
    if line.starts_with('#') {
        return None;
    }
    let open = line.find(['{', ' '])?;
    let mut rest = line.get(open..)?.strip_prefix('{')?;
    loop {
        let (name, after) = rest.split_once("=\"")?;
        let bytes = after.as_bytes();
        let mut i = 0;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        if i >= bytes.len() {
            return None;
        }
        let value = after.get(..i)?;
        if name == "route" {
            return Some(value);
        }
        rest = after.get(i + 1..)?;
        rest = rest.strip_prefix(',')?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_label_is_found_whatever_its_place_and_never_inside_another_value() {
        for (line, want) in [
            (
                r#"ficus_requests_total{route="a",authority="legacy"} 1"#,
                Some("a"),
            ),
            (
                r#"ficus_x_bucket{side="new",route="b.c",le="0.5"} 3"#,
                Some("b.c"),
            ),
            (
                r#"ficus_x{path="/k\",route=\"evil",route="real"} 1"#,
                Some("real"),
            ),
            (r#"ficus_x{path="\\",route="d"} 1"#, Some("d")),
            (r#"ficus_x{path="route=\"e\""} 1"#, None),
            ("ficus_store_queue_depth 0", None),
            (r#"ficus_build_info{version="0.1.0"} 1"#, None),
            (r#"# HELP ficus_route_override route="f""#, None),
            (r#"ficus_x{route="unterminated"#, None),
        ] {
            assert_eq!(route_label(line), want, "{line}");
        }
    }

    #[test]
    fn only_the_samples_of_removed_routes_are_left_out() {
        let text = "# HELP a A.\n# TYPE a counter\na{route=\"kept\"} 1\na{route=\"gone\"} 2\nb 3\n";
        assert_eq!(
            without_removed_routes(text, |r| r == "kept"),
            "# HELP a A.\n# TYPE a counter\na{route=\"kept\"} 1\nb 3\n"
        );
    }
}
