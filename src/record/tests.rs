use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::json;

use super::*;
use crate::compare::{CompareSpec, PatchOp};

fn exchange<'a>(
    comparator: &'a Comparator,
    headers: &'a HeaderMap,
    uri: &'a Uri,
    body: &'a [u8],
    diffs: Vec<Difference>,
) -> Exchange<'a> {
    Exchange {
        route: "orders",
        authority: Side::Legacy,
        request_id: "r1",
        method: &Method::GET,
        uri,
        request_headers: headers,
        request_body: b"",
        legacy: CapturedRef {
            status: 200,
            headers,
            body,
            latency: Duration::from_millis(3),
        },
        new: CapturedRef {
            status: 200,
            headers,
            body,
            latency: Duration::from_millis(4),
        },
        diffs,
        noisy_diffs: Vec::new(),
        comparator,
    }
}

fn replace(path: &str) -> Difference {
    Difference::Body(BodyDiff::Op(PatchOp::Replace {
        path: path.into(),
        old: json!(1),
        value: json!(2),
    }))
}

#[test]
fn fingerprint_groups_records_that_differ_at_the_same_generalised_paths() {
    let c = Comparator::default();
    let h = HeaderMap::new();
    let uri: Uri = "/api/orders/1?x=1".parse().unwrap();
    let policy = Policy::default();
    let now = SystemTime::now();
    let a = Record::build(
        exchange(&c, &h, &uri, b"{}", vec![replace("/items/0/price")]),
        &policy,
        now,
    );
    let b = Record::build(
        exchange(&c, &h, &uri, b"{}", vec![replace("/items/7/price")]),
        &policy,
        now,
    );
    let other = Record::build(
        exchange(&c, &h, &uri, b"{}", vec![replace("/total")]),
        &policy,
        now,
    );
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_ne!(a.fingerprint, other.fingerprint);
    assert_eq!(a.paths, ["/items/*/price"]);
    assert_ne!(a.id, b.id);
    assert_eq!(a.state, State::Open);
    assert_eq!(a.request.query.as_deref(), Some("x=1"));
}

#[test]
fn ids_sort_by_time_and_carry_it() {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_000);
    let t1 = t0 + Duration::from_millis(1);
    let a = new_id(t0);
    let b = new_id(t1);
    assert!(a < b);
    let c = Comparator::default();
    let h = HeaderMap::new();
    let uri: Uri = "/".parse().unwrap();
    let r = Record::build(exchange(&c, &h, &uri, b"", vec![]), &Policy::default(), t0);
    assert_eq!(r.at_ms(), 1_790_000_000_000);
    assert_eq!(r.at, "2026-09-21T14:13:20.000Z");
}

#[test]
fn secret_headers_and_redacted_body_paths_never_reach_the_record() {
    let c = CompareSpec {
        redact: vec!["/card/number".into()],
        ..CompareSpec::default()
    }
    .compile()
    .unwrap();
    let mut h = HeaderMap::new();
    for name in [
        "authorization",
        "cookie",
        "set-cookie",
        "proxy-authorization",
    ] {
        h.insert(name, HeaderValue::from_static("secret"));
    }
    h.insert("x-ok", HeaderValue::from_static("visible"));
    let uri: Uri = "/".parse().unwrap();
    let body = br#"{"card":{"number":"4111111111111111"},"total":1}"#;
    let diffs = vec![Difference::Body(BodyDiff::Op(PatchOp::Replace {
        path: "/card/number".into(),
        old: json!("4111111111111111"),
        value: json!("4222222222222222"),
    }))];
    let r = Record::build(
        exchange(&c, &h, &uri, body, diffs),
        &Policy::default(),
        SystemTime::now(),
    );
    let text = serde_json::to_string(&r).unwrap();
    assert!(!text.contains("secret"), "{text}");
    assert!(!text.contains("4111") && !text.contains("4222"), "{text}");
    assert!(text.contains("visible"));
    assert_eq!(
        r.paths,
        ["/card/number"],
        "a redacted field still counts as differing"
    );
}

#[test]
fn bodies_are_cut_at_the_limit_on_a_char_boundary() {
    let c = Comparator::default();
    let h = HeaderMap::new();
    let uri: Uri = "/".parse().unwrap();
    let body = "é".repeat(10);
    let policy = Policy {
        body_limit: 5,
        ..Policy::default()
    };
    let r = Record::build(
        exchange(&c, &h, &uri, body.as_bytes(), vec![]),
        &policy,
        SystemTime::now(),
    );
    assert_eq!(r.legacy.body.body.as_deref(), Some("éé"));
    assert!(r.legacy.body.body_truncated);
    assert_eq!(r.legacy.body.body_len, 20);
    let binary = [0xffu8, 0xfe, 0x00];
    let r = Record::build(
        exchange(&c, &h, &uri, &binary, vec![]),
        &policy,
        SystemTime::now(),
    );
    assert_eq!(r.legacy.body.body, None);
    assert_eq!(r.legacy.body.body_len, 3);
}

#[test]
fn compared_secret_headers_are_redacted_in_header_differences() {
    // A route may compare `set-cookie` (or `authorization`): the difference it reports must
    // not carry the values the record's header lists always redact.
    let c = CompareSpec {
        headers: vec!["set-cookie".into(), "x-version".into()],
        ..CompareSpec::default()
    }
    .compile()
    .unwrap();
    let h = HeaderMap::new();
    let uri: Uri = "/".parse().unwrap();
    let diffs = vec![
        Difference::Header {
            path: "set-cookie".into(),
            old: Some("session=legacy-secret".into()),
            value: Some("session=new-secret".into()),
        },
        Difference::Header {
            path: "authorization".into(),
            old: None,
            value: Some("Bearer tok-secret".into()),
        },
        Difference::Header {
            path: "x-version".into(),
            old: Some("1".into()),
            value: Some("2".into()),
        },
    ];
    let mut ex = exchange(&c, &h, &uri, b"", diffs.clone());
    ex.noisy_diffs = diffs;
    let r = Record::build(ex, &Policy::default(), SystemTime::now());
    let text = serde_json::to_string(&r).unwrap();
    assert!(!text.contains("secret"), "{text}");
    assert_eq!(
        r.diffs[1],
        Difference::Header {
            path: "authorization".into(),
            old: None,
            value: Some(REDACTED.into()),
        },
        "an absent side stays absent"
    );
    assert_eq!(
        r.diffs[2],
        Difference::Header {
            path: "x-version".into(),
            old: Some("1".into()),
            value: Some("2".into()),
        }
    );
    assert!(r.paths.contains(&"header:set-cookie".to_string()));
}

#[test]
fn a_body_redaction_cannot_parse_is_not_stored_verbatim() {
    let c = CompareSpec {
        redact: vec!["/card/number".into()],
        ..CompareSpec::default()
    }
    .compile()
    .unwrap();
    let h = HeaderMap::new();
    let uri: Uri = "/".parse().unwrap();
    // A UTF-8 BOM before the document: still redacted (and stored without the BOM).
    let bom = b"\xef\xbb\xbf{\"card\":{\"number\":\"4111111111111111\"},\"total\":1}";
    let r = Record::build(
        exchange(&c, &h, &uri, bom, vec![]),
        &Policy::default(),
        SystemTime::now(),
    );
    assert_eq!(
        r.legacy.body.body.as_deref(),
        Some(r#"{"card":{"number":"[redacted]"},"total":1}"#)
    );
    assert_eq!(r.legacy.body.body_len, bom.len());
    // A truncated document: it cannot be redacted, so only its length is kept.
    let cut = br#"{"card":{"number":"4111111111111111"},"tot"#;
    let r = Record::build(
        exchange(&c, &h, &uri, cut, vec![]),
        &Policy::default(),
        SystemTime::now(),
    );
    let text = serde_json::to_string(&r).unwrap();
    assert!(!text.contains("4111"), "{text}");
    assert_eq!(r.legacy.body.body, None);
    assert_eq!(r.legacy.body.body_len, cut.len());
    // Without redaction, the same bytes are stored as they came.
    let plain = Comparator::default();
    let r = Record::build(
        exchange(&plain, &h, &uri, cut, vec![]),
        &Policy::default(),
        SystemTime::now(),
    );
    assert_eq!(r.legacy.body.body.as_deref(), std::str::from_utf8(cut).ok());
}
