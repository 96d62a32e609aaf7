//! Body comparison: undo the content encoding (bounded), decide what each body is (JSON, text,
//! binary) and hand it to the matching diff.

use std::borrow::Cow;
use std::io::Read;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::head::media_type;
use super::{BinarySummary, BodyDiff, BodyKind, Comparator, Difference, Response, Side};
use super::{json, text};

/// Compares the two bodies and appends the body differences.
/// Compares the bodies; `true` if the JSON walk ran out of its work budget.
pub(super) fn compare(
    cmp: &Comparator,
    legacy: &Response<'_>,
    new: &Response<'_>,
    out: &mut Vec<Difference>,
) -> bool {
    let (old_codings, new_codings) = (codings(legacy.headers), codings(new.headers));
    // The common case, identical bytes, costs one memcmp and no decompression.
    if legacy.body == new.body && old_codings == new_codings {
        return false;
    }
    let cap = cmp.max_decompressed_bytes;
    let decoded = (
        decode(Side::Legacy, &old_codings, legacy.body, cap),
        decode(Side::New, &new_codings, new.body, cap),
    );
    let (old_raw, new_raw) = match decoded {
        (Ok(o), Ok(n)) => (o, n),
        (o, n) => {
            out.extend(o.err().into_iter().chain(n.err()).map(Difference::Body));
            return false;
        }
    };
    if old_raw.bytes == new_raw.bytes {
        return false;
    }
    let old = parse(classify(legacy.headers, &old_raw), &old_raw.bytes);
    let value = parse(classify(new.headers, &new_raw), &new_raw.bytes);
    let diff = match (old, value) {
        (Parsed::Json(a), Parsed::Json(b)) => {
            let budget = json::budget_for(old_raw.bytes.len() + new_raw.bytes.len());
            let diffed = json::diff(&cmp.rules, &a, &b, budget);
            out.extend(
                diffed
                    .ops
                    .into_iter()
                    .map(|op| Difference::Body(BodyDiff::Op(op))),
            );
            return diffed.exhausted;
        }
        (a, b) if a.is_malformed() || b.is_malformed() => {
            for (side, r) in [(Side::Legacy, a), (Side::New, b)] {
                if let Parsed::Malformed(error) = r {
                    out.push(Difference::Body(BodyDiff::MalformedJson { side, error }));
                }
            }
            return false;
        }
        (a, b) if a.kind() == BodyKind::Json || b.kind() == BodyKind::Json => {
            BodyDiff::ContentType {
                old: a.kind(),
                value: b.kind(),
            }
        }
        (Parsed::Text(a), Parsed::Text(b)) => BodyDiff::Text {
            diff: text::unified(a, b),
        },
        // Neither side is JSON here.
        (a, b) => BodyDiff::Binary {
            old: summary(a.bytes()),
            value: summary(b.bytes()),
        },
    };
    out.push(Difference::Body(diff));
    false
}

/// A body after content decoding.
struct Decoded<'a> {
    bytes: Cow<'a, [u8]>,
    /// Encoded with something this module cannot undo: compared as opaque bytes.
    opaque: bool,
}

/// The codings applied to the body, in the order they were applied (`identity` dropped).
pub(super) fn codings(headers: &HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    for value in headers.get_all(http::header::CONTENT_ENCODING) {
        for coding in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let coding = coding.trim().to_ascii_lowercase();
            if !coding.is_empty() && coding != "identity" {
                out.push(coding);
            }
        }
    }
    out
}

/// The most content codings undone on one body.
const MAX_CODINGS: usize = 4;

fn decode<'a>(
    side: Side,
    codings: &[String],
    body: &'a [u8],
    cap: usize,
) -> Result<Decoded<'a>, BodyDiff> {
    let known = |c: &String| matches!(c.as_str(), "gzip" | "x-gzip" | "deflate" | "br");
    if body.is_empty() || codings.is_empty() || !codings.iter().all(known) {
        return Ok(Decoded {
            bytes: Cow::Borrowed(body),
            opaque: !codings.iter().all(known),
        });
    }
    // Each layer may inflate to the cap, so a body claiming hundreds of codings would cost
    // hundreds of full-size inflations: real servers apply one, rarely two.
    if codings.len() > MAX_CODINGS {
        return Err(BodyDiff::Undecodable {
            side,
            encoding: codings.join(", "),
            error: format!("more than {MAX_CODINGS} stacked content codings"),
        });
    }
    let mut bytes = Cow::Borrowed(body);
    // Codings are listed in the order they were applied: undo them last first.
    for coding in codings.iter().rev() {
        bytes = Cow::Owned(inflate(side, coding, &bytes, cap)?);
    }
    Ok(Decoded {
        bytes,
        opaque: false,
    })
}

fn inflate(side: Side, coding: &str, input: &[u8], cap: usize) -> Result<Vec<u8>, BodyDiff> {
    // Read at most one byte past the cap: enough to know the body is too large, never more.
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::new();
    let read = match coding {
        "br" => brotli_decompressor::Decompressor::new(input, 4096)
            .take(limit)
            .read_to_end(&mut out),
        // HTTP's `deflate` is zlib-wrapped, but some servers send raw deflate.
        "deflate" if is_zlib(input) => flate2::read::ZlibDecoder::new(input)
            .take(limit)
            .read_to_end(&mut out),
        "deflate" => flate2::read::DeflateDecoder::new(input)
            .take(limit)
            .read_to_end(&mut out),
        _ => flate2::read::MultiGzDecoder::new(input)
            .take(limit)
            .read_to_end(&mut out),
    };
    if out.len() > cap {
        return Err(BodyDiff::TooLarge {
            side,
            encoding: coding.to_owned(),
            limit: cap,
        });
    }
    match read {
        Ok(_) => Ok(out),
        Err(e) => Err(BodyDiff::Undecodable {
            side,
            encoding: coding.to_owned(),
            error: e.to_string(),
        }),
    }
}

/// A zlib header: deflate method, a window of at most 32 KiB, and a valid check value.
fn is_zlib(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// What a body should be read as, before parsing.
enum Class {
    /// JSON by its media type (a parse failure is malformed JSON) or by sniffing (a parse
    /// failure makes it text or binary).
    Json {
        declared: bool,
    },
    Text,
    Binary,
}

fn classify(headers: &HeaderMap, body: &Decoded<'_>) -> Class {
    if body.opaque {
        return Class::Binary;
    }
    let media = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type)
        .filter(|m| m.contains('/'));
    let Some(media) = media else {
        let first = body.bytes.iter().find(|b| !b.is_ascii_whitespace());
        return if matches!(first, Some(b'{' | b'[')) {
            Class::Json { declared: false }
        } else {
            text_or_binary(&body.bytes)
        };
    };
    let (kind, subtype) = media.split_once('/').unwrap_or((media.as_str(), ""));
    match kind {
        // `text/json` too: older stacks (ASP.NET among them) still send it.
        "application" | "text" if subtype == "json" || subtype.ends_with("+json") => {
            Class::Json { declared: true }
        }
        "text" => Class::Text,
        "image" | "audio" | "video" | "font" | "model" => Class::Binary,
        "application" if BINARY_APPLICATION_TYPES.contains(&subtype) => Class::Binary,
        _ => text_or_binary(&body.bytes),
    }
}

/// `application/*` types that are binary even when the bytes happen to be valid UTF-8.
const BINARY_APPLICATION_TYPES: &[&str] = &[
    "octet-stream",
    "pdf",
    "zip",
    "gzip",
    "zstd",
    "x-protobuf",
    "protobuf",
    "grpc",
    "msgpack",
    "x-msgpack",
    "cbor",
    "wasm",
];

fn text_or_binary(bytes: &[u8]) -> Class {
    if std::str::from_utf8(bytes).is_ok() {
        Class::Text
    } else {
        Class::Binary
    }
}

/// A body as read for comparison.
enum Parsed<'a> {
    Json(serde_json::Value),
    Malformed(String),
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

impl Parsed<'_> {
    fn is_malformed(&self) -> bool {
        matches!(self, Parsed::Malformed(_))
    }

    fn kind(&self) -> BodyKind {
        match self {
            Parsed::Json(_) | Parsed::Malformed(_) => BodyKind::Json,
            Parsed::Text(_) => BodyKind::Text,
            Parsed::Binary(_) => BodyKind::Binary,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Parsed::Text(b) | Parsed::Binary(b) => b,
            Parsed::Json(_) | Parsed::Malformed(_) => &[],
        }
    }
}

fn parse(class: Class, bytes: &[u8]) -> Parsed<'_> {
    match class {
        // serde_json keeps its recursion limit (128): a deeply nested body is a parse error,
        // not a stack overflow.
        Class::Json { declared } => match serde_json::from_slice(bytes) {
            Ok(v) => Parsed::Json(v),
            Err(e) if declared => Parsed::Malformed(e.to_string()),
            Err(_) => match text_or_binary(bytes) {
                Class::Text => Parsed::Text(bytes),
                _ => Parsed::Binary(bytes),
            },
        },
        Class::Text => Parsed::Text(bytes),
        Class::Binary => Parsed::Binary(bytes),
    }
}

fn summary(bytes: &[u8]) -> BinarySummary {
    use std::fmt::Write as _;
    let digest = Sha256::digest(bytes);
    let mut sha256 = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(sha256, "{b:02x}");
    }
    BinarySummary {
        len: bytes.len() as u64,
        sha256,
    }
}
