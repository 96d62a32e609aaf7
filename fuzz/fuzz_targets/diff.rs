//! Fuzzes the diff engine (`compare::Comparator::compare`): two arbitrary responses give a
//! list of differences, never a panic.
//!
//! Input layout: `[legacy][new][spec] legacy body 0xFF new body`. The `legacy`/`new` bytes pick
//! each side's content type (bits 0-2), content encoding (bits 3-5) and status (bits 6-7), so
//! JSON, text, binary, gzip/deflate (compressed here, so the decoded body is the fuzzer's) and
//! corrupt or unknown encodings are all reached; `spec` picks the comparison rules (0 is
//! `Comparator::default()`). 0xFF never occurs in UTF-8, so JSON and text seeds stay readable.
//!
//! Checks beyond "no panic": the differences survive a JSON round trip (their serialised form
//! is a contract), JSON body paths are RFC 6901 pointers, and two JSON bodies that are equal
//! documents give no body difference. Applying the differences as an RFC 6902 patch is not
//! checked: the repository has no public patch helper (the one in `src/compare/prop_tests.rs`
//! is test-only).
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use ficus::compare::{BodyDiff, Comparator, CompareSpec, Difference, Response};
use flate2::Compression;
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some("application/json"),
    Some("application/problem+json; charset=utf-8"),
    Some("text/plain; charset=utf-8"),
    Some("text/html"),
    Some("application/octet-stream"),
    Some("image/png"),
    Some("nonsense"),
];

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Identity,
    /// Compressed here; the header says `gzip`.
    Gzip,
    /// zlib-wrapped, as HTTP's `deflate` should be.
    Zlib,
    /// Raw deflate, as some servers send it.
    RawDeflate,
    /// The body as it is, labelled with the header (mostly corrupt input to the decoder).
    Raw(&'static str),
    /// Gzip applied twice: `content-encoding: gzip, gzip`.
    GzipTwice,
}

const ENCODINGS: [Encoding; 8] = [
    Encoding::Identity,
    Encoding::Gzip,
    Encoding::Zlib,
    Encoding::RawDeflate,
    Encoding::Raw("br"),
    Encoding::Raw("gzip"),
    Encoding::GzipTwice,
    Encoding::Raw("zstd, identity"),
];

const STATUSES: [u16; 4] = [200, 200, 404, 500];

fn comparators() -> &'static [Comparator] {
    static CMPS: OnceLock<Vec<Comparator>> = OnceLock::new();
    CMPS.get_or_init(|| {
        let specs = [
            CompareSpec {
                unordered: vec!["/items".into(), "/**/tags".into()],
                array_keys: vec![("/items".into(), "id".into()), ("/**".into(), "id".into())],
                status_equivalent: vec![vec![200, 404]],
                ..CompareSpec::default()
            },
            CompareSpec {
                ignore: vec![
                    "/meta/generated_at".into(),
                    "/items/*/etag".into(),
                    "/a/**/b".into(),
                ],
                headers: vec!["content-type".into(), "content-encoding".into()],
                numeric_tolerance: Some(0.5),
                redact: vec!["/password".into()],
                ..CompareSpec::default()
            },
            CompareSpec {
                // Small enough for the fuzzer's inputs to inflate past it.
                max_decompressed_bytes: 1024,
                ..CompareSpec::default()
            },
        ];
        let mut out = vec![Comparator::default()];
        for spec in specs {
            match spec.compile() {
                Ok(c) => out.push(c),
                Err(e) => panic!("fuzz comparison spec does not compile: {e:?}"),
            }
        }
        out
    })
}

fn compress(body: &[u8], encoding: Encoding) -> Vec<u8> {
    let finish = |r: std::io::Result<Vec<u8>>| r.unwrap_or_default();
    match encoding {
        Encoding::Identity | Encoding::Raw(_) => body.to_vec(),
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
            finish(e.write_all(body).and_then(|()| e.finish()))
        }
        Encoding::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::fast());
            finish(e.write_all(body).and_then(|()| e.finish()))
        }
        Encoding::RawDeflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
            finish(e.write_all(body).and_then(|()| e.finish()))
        }
        Encoding::GzipTwice => compress(&compress(body, Encoding::Gzip), Encoding::Gzip),
    }
}

struct Side {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    declared_json: bool,
    /// Declared JSON, or with no usable media type (then the body is sniffed).
    may_be_json: bool,
    identity: bool,
}

fn side(selector: u8, body: &[u8]) -> Side {
    let content_type = CONTENT_TYPES[usize::from(selector & 7)];
    let encoding = ENCODINGS[usize::from((selector >> 3) & 7)];
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    let label = match encoding {
        Encoding::Identity => None,
        Encoding::Gzip => Some("gzip"),
        Encoding::Zlib | Encoding::RawDeflate => Some("deflate"),
        Encoding::Raw(label) => Some(label),
        Encoding::GzipTwice => Some("gzip, gzip"),
    };
    if let Some(label) = label {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(label));
    }
    let declared_json =
        content_type.is_some_and(|ct| ct.starts_with("application/") && ct.contains("json"));
    Side {
        status: STATUSES[usize::from(selector >> 6)],
        headers,
        body: compress(body, encoding),
        declared_json,
        may_be_json: declared_json || content_type.is_none_or(|ct| !ct.contains('/')),
        identity: encoding == Encoding::Identity,
    }
}

fn is_pointer(path: &str) -> bool {
    let escapes_ok = path
        .split('~')
        .skip(1)
        .all(|rest| rest.starts_with('0') || rest.starts_with('1'));
    (path.is_empty() || path.starts_with('/')) && escapes_ok
}

fuzz_target!(|data: &[u8]| {
    let [legacy_sel, new_sel, spec, rest @ ..] = data else {
        return;
    };
    let (legacy_body, new_body) = match rest.iter().position(|&b| b == 0xFF) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let cmps = comparators();
    let cmp = &cmps[usize::from(*spec) % cmps.len()];
    let legacy = side(*legacy_sel, legacy_body);
    let new = side(*new_sel, new_body);
    let comparison = cmp.compare(
        &Response {
            status: legacy.status,
            headers: &legacy.headers,
            body: &legacy.body,
        },
        &Response {
            status: new.status,
            headers: &new.headers,
            body: &new.body,
        },
    );

    // The serialised differences are a contract: they must read back as they were.
    let json = match serde_json::to_value(&comparison.diffs) {
        Ok(v) => v,
        Err(e) => panic!("differences do not serialise: {e}"),
    };
    let back: Vec<Difference> = match serde_json::from_value(json.clone()) {
        Ok(v) => v,
        Err(e) => panic!("differences do not deserialise: {e}\n{json}"),
    };
    assert_eq!(back, comparison.diffs, "serialisation round trip");

    for path in comparison.body_paths() {
        assert!(is_pointer(path), "body path {path:?} is not a JSON pointer");
    }

    // Two bodies declared JSON, sent as they are, that parse to equal documents: no body
    // difference, whatever the rules (ignore, tolerance and unordered only remove some).
    if legacy.declared_json && new.declared_json && legacy.identity && new.identity {
        let parsed = (
            serde_json::from_slice::<Value>(legacy_body),
            serde_json::from_slice::<Value>(new_body),
        );
        if let (Ok(a), Ok(b)) = parsed
            && a == b
        {
            let body: Vec<&Difference> = comparison
                .diffs
                .iter()
                .filter(|d| matches!(d, Difference::Body(_)))
                .collect();
            assert!(body.is_empty(), "equal documents differ: {body:?}");
        }
    }
    // Whatever the bodies, a difference of kind `op` only comes from two JSON documents.
    if !legacy.may_be_json || !new.may_be_json {
        assert!(
            !comparison
                .diffs
                .iter()
                .any(|d| matches!(d, Difference::Body(BodyDiff::Op(_)))),
            "a JSON patch from a body that is not JSON"
        );
    }
});
