//! Logging setup and metric names. Metric names live here, as constants, so that dashboards
//! and alerts have one place to check against.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// `ficus_rules_reloads_total{result="ok"|"error"}`.
pub const RULES_RELOADS_TOTAL: &str = "ficus_rules_reloads_total";
/// `ficus_shadow_total{route, outcome}`: how each request of a shadowed route ended.
pub const SHADOW_TOTAL: &str = "ficus_shadow_total";
/// `ficus_comparisons_total{route, result="match"|"diverged"}`.
pub const COMPARISONS_TOTAL: &str = "ficus_comparisons_total";
/// `ficus_store_dropped_total{reason}`: divergence records lost (queue or spool full).
pub const STORE_DROPPED_TOTAL: &str = "ficus_store_dropped_total";
/// Unix time of the last successful rules load.
pub const RULES_LOADED_TIMESTAMP_SECONDS: &str = "ficus_rules_loaded_timestamp_seconds";

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
