//! The pure diff engine: given the legacy and the new response to one request, say how they
//! differ (status, chosen headers, body) under a route's comparison rules. It sits after the
//! shadow call in the flow and before the divergence record. No I/O, no clock, no randomness:
//! the same two responses and rules always give the same [`Comparison`].
//!
//! JSON bodies are compared as documents and their differences are RFC 6902 operations;
//! text bodies get a bounded unified diff, other bodies a length and SHA-256 summary.
//! Bodies are decompressed first (gzip, deflate, br), never past a size cap.

mod body;
mod head;
mod json;
mod myers;
mod pattern;
mod redact;
mod text;

#[cfg(test)]
mod edge_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::collections::HashSet;

use http::HeaderName;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

pub use pattern::{generalize, pattern_matches};
pub use redact::{REDACTED, SECRET_HEADERS, SECRET_QUERY_PARAMS};

use pattern::Pattern;

/// The default cap on a decompressed body: 8 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 8 * 1024 * 1024;

/// One side's response, as captured by the proxy.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    pub headers: &'a http::HeaderMap,
    /// The body as received, still content-encoded.
    pub body: &'a [u8],
}

/// A route's comparison rules as written; [`CompareSpec::compile`] validates them.
///
/// Patterns are JSON Pointers (`/items/0/price`) whose segments may also be `*` (exactly one
/// segment) or `**` (zero or more); `""` is the whole body.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    /// Paths whose differences do not count, nor anything beneath them. `""` (or `/**`)
    /// ignores the body altogether, whatever its type.
    pub ignore: Vec<String>,
    /// Arrays compared as multisets: element order does not matter.
    pub unordered: Vec<String>,
    /// Arrays whose object elements are matched by a key field (`("/items", "id")`): an
    /// inserted element is one `add`, and elements with the same key are compared field by
    /// field. Order still matters (a moved element is a `remove` and an `add`) unless the
    /// array is also `unordered`. The first matching entry wins.
    pub array_keys: Vec<(String, String)>,
    /// Header names compared (case-insensitive); empty means `["content-type"]`.
    pub headers: Vec<String>,
    /// Groups of status codes treated as equal (`[[200, 204]]`).
    pub status_equivalent: Vec<Vec<u16>>,
    /// Absolute tolerance when comparing numbers.
    pub numeric_tolerance: Option<f64>,
    /// Cap for a decompressed body; larger bodies give a `too_large` difference.
    pub max_decompressed_bytes: usize,
    /// Body paths whose values, and everything beneath them, are replaced by `"[redacted]"`
    /// in records (the comparison still sees them).
    pub redact: Vec<String>,
    /// Query parameter names (percent-decoded, ASCII case-insensitive; `*` for all) whose
    /// values are replaced by `[redacted]` in records. `access_token` always is.
    pub redact_query: Vec<String>,
}

impl Default for CompareSpec {
    fn default() -> Self {
        CompareSpec {
            ignore: Vec::new(),
            unordered: Vec::new(),
            array_keys: Vec::new(),
            headers: Vec::new(),
            status_equivalent: Vec::new(),
            numeric_tolerance: None,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            redact: Vec::new(),
            redact_query: Vec::new(),
        }
    }
}

/// A rejected entry of a [`CompareSpec`]: `field` names the spec field, `index` the entry in
/// it (0 for single-valued fields).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub field: &'static str,
    pub index: usize,
    pub message: String,
    pub hint: String,
}

impl CompareSpec {
    /// Validates every entry and compiles the patterns; reports all errors, not the first.
    pub fn compile(&self) -> Result<Comparator, Vec<SpecError>> {
        let mut errors = Vec::new();
        let mut error = |field, index, message: String, hint: String| {
            errors.push(SpecError {
                field,
                index,
                message,
                hint,
            });
        };

        let mut ignore = Vec::new();
        for (index, raw) in self.ignore.iter().enumerate() {
            match Pattern::parse(raw) {
                Ok(p) => ignore.push(p.and_below()),
                Err(e) => error("ignore", index, e.message, e.hint),
            }
        }
        let mut redact = Vec::new();
        for (index, raw) in self.redact.iter().enumerate() {
            // A redacted value is hidden whole: a difference found inside it (its path
            // below the pattern) must not show the parts either.
            match Pattern::parse(raw) {
                Ok(p) => redact.push(p.and_below()),
                Err(e) => error("redact", index, e.message, e.hint),
            }
        }
        let mut redact_query = QueryRedaction::default();
        for (index, raw) in self.redact_query.iter().enumerate() {
            match raw.as_str() {
                "*" => redact_query.all = true,
                "" => error(
                    "redact_query",
                    index,
                    "empty query parameter name".to_string(),
                    "write the parameter's name, as in `redact_query = [\"token\"]`, or `*` for every parameter".to_string(),
                ),
                name if name.contains(['&', '=', '?', '#']) => error(
                    "redact_query",
                    index,
                    format!("`{name}` is not a query parameter name"),
                    "write the name alone, without `?`, `=` or a value".to_string(),
                ),
                name => redact_query.names.push(name.to_ascii_lowercase()),
            }
        }
        let mut unordered = Vec::new();
        for (index, raw) in self.unordered.iter().enumerate() {
            match Pattern::parse(raw) {
                Ok(p) => unordered.push(p),
                Err(e) => error("unordered", index, e.message, e.hint),
            }
        }
        let mut keyed = Vec::new();
        for (index, (raw, field)) in self.array_keys.iter().enumerate() {
            match Pattern::parse(raw) {
                Ok(p) => keyed.push((p, field.clone())),
                Err(e) => error("array_keys", index, e.message, e.hint),
            }
            if field.is_empty() {
                error(
                    "array_keys",
                    index,
                    format!("array `{raw}` has an empty key field"),
                    "name the member that identifies elements, e.g. `id`".into(),
                );
            }
        }

        let mut headers = Vec::new();
        for (index, name) in self.headers.iter().enumerate() {
            match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(h) if !headers.contains(&h) => headers.push(h),
                Ok(_) => {}
                Err(_) => error(
                    "headers",
                    index,
                    format!("`{name}` is not a valid header name"),
                    "header names are tokens such as `content-type` or `x-request-id`".into(),
                ),
            }
        }
        if self.headers.is_empty() {
            headers.push(http::header::CONTENT_TYPE);
        }

        let mut seen = HashSet::new();
        for (index, group) in self.status_equivalent.iter().enumerate() {
            if group.is_empty() {
                error(
                    "status_equivalent",
                    index,
                    "empty status group".into(),
                    "list the codes treated as equal, e.g. `[200, 204]`".into(),
                );
            }
            for &code in group {
                if !(100..=999).contains(&code) {
                    error(
                        "status_equivalent",
                        index,
                        format!("{code} is not an HTTP status code"),
                        "status codes are three digits, 100 to 999".into(),
                    );
                } else if !seen.insert(code) {
                    error(
                        "status_equivalent",
                        index,
                        format!("status {code} is in more than one group"),
                        "merge the groups that share it: equivalence groups must not overlap"
                            .into(),
                    );
                }
            }
        }
        if let Some(t) = self.numeric_tolerance
            && !(t.is_finite() && t >= 0.0)
        {
            error(
                "numeric_tolerance",
                0,
                format!("numeric tolerance {t} is not a finite number >= 0"),
                "an absolute tolerance such as `0.001`; leave it out for exact comparison".into(),
            );
        }
        if self.max_decompressed_bytes == 0 {
            error(
                "max_decompressed_bytes",
                0,
                "the decompressed body cap is 0".into(),
                format!("the default is {DEFAULT_MAX_DECOMPRESSED_BYTES} (8 MiB)"),
            );
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Comparator {
            rules: json::Rules {
                ignore,
                unordered,
                keyed,
                tolerance: self.numeric_tolerance,
            },
            headers,
            status_equivalent: self.status_equivalent.clone(),
            max_decompressed_bytes: self.max_decompressed_bytes,
            redact,
            redact_query,
        })
    }
}

/// Compiled comparison rules for one route: cheap to share, safe to call from any thread.
#[derive(Debug, Clone)]
pub struct Comparator {
    rules: json::Rules,
    headers: Vec<HeaderName>,
    status_equivalent: Vec<Vec<u16>>,
    max_decompressed_bytes: usize,
    redact: Vec<Pattern>,
    redact_query: QueryRedaction,
}

/// The query parameters whose values a route's records hide.
#[derive(Debug, Clone, Default)]
struct QueryRedaction {
    /// `*`: every value.
    all: bool,
    /// Lowercased names.
    names: Vec<String>,
}

impl Default for Comparator {
    /// What `CompareSpec::default().compile()` gives: status, `content-type` and body, exactly.
    fn default() -> Self {
        Comparator {
            rules: json::Rules::default(),
            headers: vec![http::header::CONTENT_TYPE],
            status_equivalent: Vec::new(),
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            redact: Vec::new(),
            redact_query: QueryRedaction::default(),
        }
    }
}

impl Comparator {
    /// Compares the legacy response with the new one. Never fails and never panics on input:
    /// whatever cannot be compared (malformed JSON, a corrupt or oversized compressed body)
    /// is a difference of its own kind.
    ///
    /// Differences come in this order: status, headers (in the order listed), body.
    pub fn compare(&self, legacy: &Response<'_>, new: &Response<'_>) -> Comparison {
        let mut diffs = Vec::new();
        if let Some(d) = head::status(&self.status_equivalent, legacy.status, new.status) {
            diffs.push(d);
        }
        head::headers(&self.headers, legacy.headers, new.headers, &mut diffs);
        let mut exhausted = false;
        if !self.rules.ignored(&[]) {
            exhausted = body::compare(self, legacy, new, &mut diffs);
        }
        Comparison { diffs, exhausted }
    }

    /// Whether a body with these headers is compressed (any `Content-Encoding` line naming a
    /// coding other than `identity`): what [`Comparator::compare`] decodes first.
    pub fn is_encoded(headers: &http::HeaderMap) -> bool {
        !body::codings(headers).is_empty()
    }

    /// Whether a concrete body path (RFC 6901 pointer) is ignored by this route's rules: it,
    /// or a path above it, matches an ignore pattern. `false` for an invalid pointer.
    pub fn is_ignored(&self, path: &str) -> bool {
        self.rules
            .ignore
            .iter()
            .any(|p| pattern::matches_pointer(p, path))
    }
}

/// The outcome of comparing two responses: empty when they match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub diffs: Vec<Difference>,
    /// The JSON walk ran out of its work budget: `diffs` is a correct patch but may be longer
    /// than the shortest one (elements reported as changed that a longer search would have
    /// paired). Not to be learned from as noise.
    #[serde(skip)]
    pub exhausted: bool,
}

impl Comparison {
    /// Whether the responses match (no differences).
    pub fn is_match(&self) -> bool {
        self.diffs.is_empty()
    }

    /// The paths of the JSON body differences, in order.
    pub fn body_paths(&self) -> impl Iterator<Item = &str> {
        self.diffs.iter().filter_map(|d| match d {
            Difference::Body(b) => b.path(),
            _ => None,
        })
    }
}

/// One difference between the legacy and the new response. `old` is always the legacy side,
/// `value` the new one.
///
/// The JSON shape is a contract used by tests outside this repository: keep field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "in", rename_all = "snake_case")]
pub enum Difference {
    /// `{"in":"status","old":200,"value":500}`
    Status { old: u16, value: u16 },
    /// `{"in":"header","path":"content-type","old":"application/json","value":"text/html"}`;
    /// `path` is the lowercase header name, an absent side is `null`, several values are
    /// joined with `", "`.
    Header {
        path: String,
        old: Option<String>,
        value: Option<String>,
    },
    /// `{"in":"body", ...}`: see [`BodyDiff`].
    Body(BodyDiff),
}

/// A JSON body difference as an RFC 6902 operation. Applying a comparison's operations in
/// order to the legacy body gives the new body, outside ignored paths (and up to element order
/// in `unordered` arrays). `path` is an RFC 6901 pointer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PatchOp {
    /// `{"op":"add","path":"/items/2","value":{"id":7}}`
    Add { path: String, value: Value },
    /// `{"op":"remove","path":"/meta/legacy_flag","old":true}`
    Remove { path: String, old: Value },
    /// `{"op":"replace","path":"/items/0/price","old":10.5,"value":11}`
    Replace {
        path: String,
        old: Value,
        value: Value,
    },
}

impl PatchOp {
    pub fn path(&self) -> &str {
        match self {
            PatchOp::Add { path, .. }
            | PatchOp::Remove { path, .. }
            | PatchOp::Replace { path, .. } => path,
        }
    }
}

/// Which response a difference is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Legacy,
    New,
}

/// How a body was read: as a JSON document, as text, or as opaque bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyKind {
    Json,
    Text,
    Binary,
}

/// What identifies a binary body: `{"len":1024,"sha256":"<64 hex digits>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinarySummary {
    pub len: u64,
    pub sha256: String,
}

/// A body difference. JSON documents give [`BodyDiff::Op`]s (`"op"` in the JSON); everything
/// else gives one difference with a `"kind"`:
///
/// - `{"kind":"text","diff":"--- legacy\n+++ new\n@@ -1 +1 @@\n-a\n+b\n"}` (unified line diff,
///   at most 100 lines / 8 KiB, then a `... diff truncated` line)
/// - `{"kind":"binary","old":{"len":3,"sha256":"..."},"value":{"len":4,"sha256":"..."}}`
/// - `{"kind":"malformed_json","side":"new","error":"expected value at line 1 column 1"}`
/// - `{"kind":"content_type","old":"json","value":"text"}` (one side JSON, the other not)
/// - `{"kind":"too_large","side":"legacy","encoding":"gzip","limit":8388608}`
/// - `{"kind":"undecodable","side":"new","encoding":"br","error":"..."}`
#[derive(Debug, Clone, PartialEq)]
pub enum BodyDiff {
    Op(PatchOp),
    Text {
        diff: String,
    },
    Binary {
        old: BinarySummary,
        value: BinarySummary,
    },
    MalformedJson {
        side: Side,
        error: String,
    },
    ContentType {
        old: BodyKind,
        value: BodyKind,
    },
    /// The body decompressed to more than the cap.
    TooLarge {
        side: Side,
        encoding: String,
        limit: usize,
    },
    /// The body could not be decompressed (corrupt or truncated).
    Undecodable {
        side: Side,
        encoding: String,
        error: String,
    },
}

impl BodyDiff {
    /// The JSON path of an [`BodyDiff::Op`]; `None` for the other kinds.
    pub fn path(&self) -> Option<&str> {
        match self {
            BodyDiff::Op(op) => Some(op.path()),
            _ => None,
        }
    }
}

/// The `"kind"` shapes, for deserialising (serialisation writes them by hand to avoid a copy).
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum KindRepr {
    Text {
        diff: String,
    },
    Binary {
        old: BinarySummary,
        value: BinarySummary,
    },
    MalformedJson {
        side: Side,
        error: String,
    },
    ContentType {
        old: BodyKind,
        value: BodyKind,
    },
    TooLarge {
        side: Side,
        encoding: String,
        limit: usize,
    },
    Undecodable {
        side: Side,
        encoding: String,
        error: String,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BodyRepr {
    Op(PatchOp),
    Kind(KindRepr),
}

impl Serialize for BodyDiff {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let (kind, len) = match self {
            BodyDiff::Op(op) => return op.serialize(s),
            BodyDiff::Text { .. } => ("text", 2),
            BodyDiff::Binary { .. } => ("binary", 3),
            BodyDiff::MalformedJson { .. } => ("malformed_json", 3),
            BodyDiff::ContentType { .. } => ("content_type", 3),
            BodyDiff::TooLarge { .. } => ("too_large", 4),
            BodyDiff::Undecodable { .. } => ("undecodable", 4),
        };
        let mut st = s.serialize_struct("BodyDiff", len)?;
        st.serialize_field("kind", kind)?;
        match self {
            BodyDiff::Op(_) => {}
            BodyDiff::Text { diff } => st.serialize_field("diff", diff)?,
            BodyDiff::Binary { old, value } => {
                st.serialize_field("old", old)?;
                st.serialize_field("value", value)?;
            }
            BodyDiff::MalformedJson { side, error } => {
                st.serialize_field("side", side)?;
                st.serialize_field("error", error)?;
            }
            BodyDiff::ContentType { old, value } => {
                st.serialize_field("old", old)?;
                st.serialize_field("value", value)?;
            }
            BodyDiff::TooLarge {
                side,
                encoding,
                limit,
            } => {
                st.serialize_field("side", side)?;
                st.serialize_field("encoding", encoding)?;
                st.serialize_field("limit", limit)?;
            }
            BodyDiff::Undecodable {
                side,
                encoding,
                error,
            } => {
                st.serialize_field("side", side)?;
                st.serialize_field("encoding", encoding)?;
                st.serialize_field("error", error)?;
            }
        }
        st.end()
    }
}

impl<'de> Deserialize<'de> for BodyDiff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match BodyRepr::deserialize(d)? {
            BodyRepr::Op(op) => BodyDiff::Op(op),
            BodyRepr::Kind(k) => match k {
                KindRepr::Text { diff } => BodyDiff::Text { diff },
                KindRepr::Binary { old, value } => BodyDiff::Binary { old, value },
                KindRepr::MalformedJson { side, error } => BodyDiff::MalformedJson { side, error },
                KindRepr::ContentType { old, value } => BodyDiff::ContentType { old, value },
                KindRepr::TooLarge {
                    side,
                    encoding,
                    limit,
                } => BodyDiff::TooLarge {
                    side,
                    encoding,
                    limit,
                },
                KindRepr::Undecodable {
                    side,
                    encoding,
                    error,
                } => BodyDiff::Undecodable {
                    side,
                    encoding,
                    error,
                },
            },
        })
    }
}
