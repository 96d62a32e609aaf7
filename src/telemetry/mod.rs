//! Logging setup and metric names. Metric names live here, as constants, so that dashboards
//! and alerts have one place to check against.

pub mod exporter;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// `ficus_requests_total{route, authority, status}` (status class `2xx`...).
pub const REQUESTS_TOTAL: &str = "ficus_requests_total";
/// `ficus_request_duration_seconds{route, authority}`: client-visible, to the response head.
pub const REQUEST_DURATION_SECONDS: &str = "ficus_request_duration_seconds";
/// `ficus_upstream_duration_seconds{route, side}`.
pub const UPSTREAM_DURATION_SECONDS: &str = "ficus_upstream_duration_seconds";
/// `ficus_upstream_errors_total{route, side, kind}`.
pub const UPSTREAM_ERRORS_TOTAL: &str = "ficus_upstream_errors_total";
/// `ficus_noise_probe_duration_seconds{route}`: noise probes (legacy asked again), to the
/// response head. Kept out of `ficus_upstream_duration_seconds`: they are not traffic.
pub const NOISE_PROBE_DURATION_SECONDS: &str = "ficus_noise_probe_duration_seconds";
/// `ficus_noise_probe_errors_total{route, kind}`: failed noise probes.
pub const NOISE_PROBE_ERRORS_TOTAL: &str = "ficus_noise_probe_errors_total";
/// `ficus_status_pairs_total{route, legacy, new}` (status classes).
pub const STATUS_PAIRS_TOTAL: &str = "ficus_status_pairs_total";
/// `ficus_divergences_total{route, class}`.
pub const DIVERGENCES_TOTAL: &str = "ficus_divergences_total";
/// `ficus_divergent_fields_total{route, path}`.
pub const DIVERGENT_FIELDS_TOTAL: &str = "ficus_divergent_fields_total";
/// `ficus_store_queue_depth`.
pub const STORE_QUEUE_DEPTH: &str = "ficus_store_queue_depth";
/// `ficus_store_spooled_records`.
pub const STORE_SPOOLED_RECORDS: &str = "ficus_store_spooled_records";
/// `ficus_shadow_inflight`.
pub const SHADOW_INFLIGHT: &str = "ficus_shadow_inflight";
pub const SHADOW_COMPARE_OFFLOADED_TOTAL: &str = "ficus_shadow_compare_offloaded_total";
/// `ficus_route_override{route}`: 1 while an emergency override is in force.
pub const ROUTE_OVERRIDE: &str = "ficus_route_override";
/// `ficus_build_info{version}`.
pub const BUILD_INFO: &str = "ficus_build_info";
/// Distinct divergent-field paths counted per route before the rest go to `_other`.
pub const MAX_FIELD_PATHS_PER_ROUTE: usize = 100;

/// The status-class label values, in order: labels stay bounded whatever the status codes are.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index of a status code's class in [`STATUS_CLASSES`]: 1 (`"2xx"`) for 204; anything
/// past 599 counts as 5xx.
pub fn status_class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// `ficus_rules_reloads_total{result="ok"|"error"}`.
pub const RULES_RELOADS_TOTAL: &str = "ficus_rules_reloads_total";
/// `ficus_shadow_total{route, outcome}`: how each request of a shadowed route ended.
pub const SHADOW_TOTAL: &str = "ficus_shadow_total";
/// `ficus_comparisons_total{route, result="match"|"diverged"}`.
pub const COMPARISONS_TOTAL: &str = "ficus_comparisons_total";
/// `ficus_store_dropped_total{reason}`: divergence records lost (queue or spool full).
pub const STORE_DROPPED_TOTAL: &str = "ficus_store_dropped_total";
/// `ficus_tls_cert_reloads_total{result="ok"|"error"}`: the listener's certificate read again.
pub const TLS_CERT_RELOADS_TOTAL: &str = "ficus_tls_cert_reloads_total";
/// Unix time of the last successful rules load.
pub const RULES_LOADED_TIMESTAMP_SECONDS: &str = "ficus_rules_loaded_timestamp_seconds";
/// 1 when the last load of the rules succeeded, 0 while the files on disk are rejected (and
/// older rules stay in force).
pub const RULES_LAST_RELOAD_SUCCESS: &str = "ficus_rules_last_reload_success";

/// `ficus_requests_rejected_total{reason}`: requests refused before any routing (a path without
/// a canonical form, a target too long, a body over its limit, a `CONNECT`, too many
/// connections).
pub const REQUESTS_REJECTED_TOTAL: &str = "ficus_requests_rejected_total";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` uses `EnvFilter` syntax (e.g. `info,ficus=debug`);
/// notify's harmless notices about removed watches are kept below `warn`.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(format!("{filter},notify=warn"))
        .map_err(|e| format!("bad log filter `{filter}`: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}
