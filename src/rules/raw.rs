//! The rules files as written: serde structs that mirror the TOML one to one. They never leave
//! `rules/`; `rules::load` validates them into the types of `rules::model`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

/// An upstream is a URL string, or a table with the URL and its settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawUpstream {
    Url(String),
    Table(RawUpstreamTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTable {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    pub preserve_host: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub name: Spanned<String>,
    pub priority: Option<i64>,
    pub authority: Option<Spanned<String>>,
    pub legacy: Option<Spanned<String>>,
    pub new: Option<Spanned<String>>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub canary: Option<RawCanary>,
    pub shadow: Option<RawShadow>,
    pub compare: Option<Spanned<RawCompare>>,
    pub gate: Option<RawGate>,
    #[serde(default)]
    pub classify: Vec<RawClassify>,
    /// Largest request body, e.g. "10MiB"; more gets 413.
    pub max_request_body: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClassify {
    pub class: Spanned<String>,
    pub paths: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGate {
    pub min_samples: Option<u64>,
    pub max_divergence_rate: Option<Spanned<f64>>,
    pub window: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub headers: Option<BTreeMap<String, Spanned<String>>>,
    pub query: Option<BTreeMap<String, Spanned<String>>>,
    pub host: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCanary {
    pub percent: Spanned<f64>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadow {
    pub sample: Option<Spanned<f64>>,
    pub writes: Option<bool>,
    pub key: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub noise_probe: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompare {
    pub ignore: Option<Vec<Spanned<String>>>,
    pub headers: Option<Vec<Spanned<String>>>,
    pub unordered: Option<Vec<Spanned<String>>>,
    pub array_keys: Option<BTreeMap<String, String>>,
    pub status_equivalent: Option<Vec<Vec<u16>>>,
    pub numeric_tolerance: Option<f64>,
    pub redact: Option<Vec<Spanned<String>>>,
    pub redact_query: Option<Vec<Spanned<String>>>,
}
