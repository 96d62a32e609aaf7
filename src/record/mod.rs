//! Divergence records: what a diverged comparison leaves behind for people to inspect,
//! classify, replay and reconcile, often days later and across replicas. This module owns the
//! record's shape, its id, fingerprint and redaction, and the recorder interface the
//! comparison stage hands records to (the store-backed writer lives in `store/`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Uri};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::compare::{BodyDiff, Comparator, Difference, REDACTED, SECRET_HEADERS, generalize};
use crate::rules::Side;

/// Where a record is in its review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    Open,
    Acknowledged,
    /// The difference is intended (a deliberate change); it does not count against readiness.
    Expected,
    Resolved,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Open,
        State::Acknowledged,
        State::Expected,
        State::Resolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Open => "open",
            State::Acknowledged => "acknowledged",
            State::Expected => "expected",
            State::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A request as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    #[serde(flatten)]
    pub body: RecordedBody,
}

/// One side's response as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(flatten)]
    pub body: RecordedBody,
    pub latency_ms: f64,
}

/// A body as recorded: UTF-8 text (redacted, then cut at the record body limit), or only its
/// length when it is not text, or when its route redacts and it is not a JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RecordedBody {
    pub body: Option<String>,
    /// Length of the body as received, in bytes.
    pub body_len: usize,
    /// The stored body is cut at the record body limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_truncated: bool,
}

/// One diverged comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Sortable by time (UUIDv7) and unique across replicas.
    pub id: String,
    pub route: String,
    /// RFC 3339, UTC.
    pub at: String,
    pub request_id: String,
    /// "legacy" | "new": whose response the client got.
    pub authority: String,
    pub request: RecordedRequest,
    pub legacy: RecordedResponse,
    pub new: RecordedResponse,
    /// Differences from legacy to new, outside ignored and noisy paths.
    pub diffs: Vec<Difference>,
    /// Differences on paths learned as noise for the route (not counted as divergence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noisy_diffs: Vec<Difference>,
    /// Route and the set of differing paths (array indices generalised): one root cause, one
    /// fingerprint, however many records.
    pub fingerprint: String,
    /// The differing paths behind the fingerprint.
    pub paths: Vec<String>,
    pub class: Option<String>,
    pub state: State,
    pub note: Option<String>,
    /// The replica that saw it.
    pub instance: String,
    /// Who changed state, class or note, when, and what.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Change>,
}

/// One change to a record, made through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The admin token's name, or "anonymous" when the API has no token.
    pub who: String,
    /// RFC 3339, UTC.
    pub at: String,
    /// The fields set, e.g. `{"state": "expected"}`.
    pub what: serde_json::Value,
}

impl Record {
    /// Milliseconds since the Unix epoch of `at` (read from the UUIDv7 id).
    pub fn at_ms(&self) -> u64 {
        uuid::Uuid::parse_str(&self.id)
            .ok()
            .and_then(|u| u.get_timestamp())
            .map_or(0, |ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
    }
}

/// Where diverged comparisons go. `record` must not block: it is called from the comparison
/// task, off the request path, but still on the runtime.
pub trait Recorder: Send + Sync {
    fn record(&self, record: Record);

    /// Counts one comparison of a route (the evidence behind divergence rates).
    fn count(&self, _route: &Arc<str>, _diverged: bool) {}
}

/// How records are written: the body limit and who is writing.
#[derive(Debug, Clone)]
pub struct Policy {
    pub body_limit: usize,
    pub instance: Arc<str>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            body_limit: 64 << 10,
            instance: Arc::from(hostname()),
        }
    }
}

/// This machine's host name, for `instance`.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ficus".to_string())
}

/// A response as captured for comparison.
pub struct CapturedRef<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub latency: Duration,
}

/// Everything a record is built from.
pub struct Exchange<'a> {
    pub route: &'a str,
    pub authority: Side,
    pub request_id: &'a str,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub request_headers: &'a HeaderMap,
    pub request_body: &'a [u8],
    pub legacy: CapturedRef<'a>,
    pub new: CapturedRef<'a>,
    pub diffs: Vec<Difference>,
    pub noisy_diffs: Vec<Difference>,
    pub comparator: &'a Comparator,
}

impl Record {
    /// Builds a redacted, size-limited record of a diverged exchange.
    pub fn build(ex: Exchange<'_>, policy: &Policy, now: SystemTime) -> Record {
        let c = ex.comparator;
        let body = |bytes: &[u8]| recorded_body(bytes, c, policy.body_limit);
        let mut diffs = ex.diffs;
        let mut noisy_diffs = ex.noisy_diffs;
        for d in diffs.iter_mut().chain(noisy_diffs.iter_mut()) {
            c.redact_diff(d);
        }
        let paths = paths(&diffs);
        Record {
            id: new_id(now),
            route: ex.route.to_string(),
            at: humantime::format_rfc3339_millis(now).to_string(),
            request_id: ex.request_id.to_string(),
            authority: ex.authority.as_str().to_string(),
            request: RecordedRequest {
                method: ex.method.to_string(),
                path: ex.uri.path().to_string(),
                query: ex.uri.query().map(|q| c.redact_query(q).into_owned()),
                headers: header_pairs(ex.request_headers),
                body: body(ex.request_body),
            },
            legacy: response(&ex.legacy, body(ex.legacy.body)),
            new: response(&ex.new, body(ex.new.body)),
            fingerprint: fingerprint(ex.route, &paths),
            paths,
            diffs,
            noisy_diffs,
            class: None,
            state: State::Open,
            note: None,
            instance: policy.instance.to_string(),
            history: Vec::new(),
        }
    }
}

fn response(captured: &CapturedRef<'_>, body: RecordedBody) -> RecordedResponse {
    RecordedResponse {
        status: captured.status,
        headers: header_pairs(captured.headers),
        body,
        latency_ms: captured.latency.as_micros() as f64 / 1e3,
    }
}

/// A UUIDv7: 48 bits of Unix milliseconds, then random bits.
pub fn new_id(now: SystemTime) -> String {
    let ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random: [u8; 10] = std::array::from_fn(|_| fastrand::u8(..));
    uuid::Builder::from_unix_timestamp_millis(ms, &random)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// The differing paths of a record, generalised and sorted: `status`, `header:NAME`, body
/// pointers with array indices as `*`, or `body:KIND` for non-JSON body differences.
fn paths(diffs: &[Difference]) -> Vec<String> {
    let set: BTreeSet<String> = diffs
        .iter()
        .map(|d| match d {
            Difference::Status { .. } => "status".to_string(),
            Difference::Header { path, .. } => format!("header:{path}"),
            Difference::Body(BodyDiff::Op(op)) => generalize(op.path()),
            Difference::Body(other) => format!("body:{}", body_kind(other)),
        })
        .collect();
    set.into_iter().collect()
}

fn body_kind(diff: &BodyDiff) -> &'static str {
    match diff {
        BodyDiff::Op(_) => "json",
        BodyDiff::Text { .. } => "text",
        BodyDiff::Binary { .. } => "binary",
        BodyDiff::MalformedJson { .. } => "malformed_json",
        BodyDiff::ContentType { .. } => "content_type",
        BodyDiff::TooLarge { .. } => "too_large",
        BodyDiff::Undecodable { .. } => "undecodable",
    }
}

/// Route plus differing paths, hashed: stable across replicas and versions.
pub fn fingerprint(route: &str, paths: &[String]) -> String {
    let mut key = String::from(route);
    for p in paths {
        key.push('\n');
        key.push_str(p);
    }
    format!("{:016x}", xxh3_64(key.as_bytes()))
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            let value = if SECRET_HEADERS.contains(&k.as_str()) {
                REDACTED.to_string()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (k.to_string(), value)
        })
        .collect()
}

fn recorded_body(bytes: &[u8], comparator: &Comparator, limit: usize) -> RecordedBody {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return RecordedBody {
            body: None,
            body_len: bytes.len(),
            body_truncated: false,
        };
    };
    let mut text = std::borrow::Cow::Borrowed(text);
    if comparator.redacts() && !text.is_empty() {
        // A body the redaction cannot read (malformed or truncated JSON, nested too deep, or
        // not JSON at all) may still hold the values it exists to hide: keep its length only.
        // A UTF-8 BOM before the document is allowed (RFC 8259 lets a parser ignore it).
        let json = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(json) else {
            return RecordedBody {
                body: None,
                body_len: bytes.len(),
                body_truncated: false,
            };
        };
        comparator.redact_value("", &mut value);
        text = std::borrow::Cow::Owned(value.to_string());
    }
    let truncated = text.len() > limit;
    let mut cut = text.len().min(limit);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    RecordedBody {
        body: Some(text[..cut].to_string()),
        body_len: bytes.len(),
        body_truncated: truncated,
    }
}

#[cfg(test)]
mod tests;
