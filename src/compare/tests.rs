use std::io::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::*;

pub(super) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    h
}

pub(super) const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

fn compile(spec: CompareSpec) -> Comparator {
    spec.compile().unwrap()
}

/// Compares two full responses and returns the differences as JSON values.
pub(super) fn compare_full(
    cmp: &Comparator,
    (status_a, headers_a, body_a): (u16, &HeaderMap, &[u8]),
    (status_b, headers_b, body_b): (u16, &HeaderMap, &[u8]),
) -> Vec<Value> {
    let legacy = Response {
        status: status_a,
        headers: headers_a,
        body: body_a,
    };
    let new = Response {
        status: status_b,
        headers: headers_b,
        body: body_b,
    };
    let c = cmp.compare(&legacy, &new);
    let v = serde_json::to_value(&c).unwrap();
    // Every comparison survives a serialisation round trip.
    let back: Comparison = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back, c);
    match v {
        Value::Object(mut o) => match o.remove("diffs") {
            Some(Value::Array(d)) => d,
            other => panic!("no diffs array: {other:?}"),
        },
        other => panic!("not an object: {other}"),
    }
}

/// Compares two bodies sent with the same headers and status 200.
pub(super) fn compare_bodies(
    cmp: &Comparator,
    h: &[(&str, &str)],
    a: &[u8],
    b: &[u8],
) -> Vec<Value> {
    let h = headers(h);
    compare_full(cmp, (200, &h, a), (200, &h, b))
}

fn json_diff(spec: CompareSpec, a: Value, b: Value) -> Vec<Value> {
    compare_bodies(
        &compile(spec),
        JSON,
        a.to_string().as_bytes(),
        b.to_string().as_bytes(),
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(data).unwrap();
    }
    out
}

// ---- status and headers ----

#[test]
fn status_codes_differ_unless_equivalent() {
    let h = HeaderMap::new();
    let d = compare_full(&Comparator::default(), (200, &h, b""), (500, &h, b""));
    assert_eq!(d, vec![json!({"in": "status", "old": 200, "value": 500})]);
    assert!(compare_full(&Comparator::default(), (404, &h, b""), (404, &h, b"")).is_empty());

    let cmp = compile(CompareSpec {
        status_equivalent: vec![vec![200, 204], vec![404, 410]],
        ..CompareSpec::default()
    });
    assert!(compare_full(&cmp, (200, &h, b""), (204, &h, b"")).is_empty());
    assert!(compare_full(&cmp, (410, &h, b""), (404, &h, b"")).is_empty());
    assert_eq!(compare_full(&cmp, (200, &h, b""), (404, &h, b"")).len(), 1);
}

#[test]
fn content_type_compares_by_media_type() {
    let cmp = Comparator::default();
    let a = headers(&[("content-type", "application/json; charset=utf-8")]);
    let b = headers(&[("content-type", "Application/JSON")]);
    assert!(compare_full(&cmp, (200, &a, b"{}"), (200, &b, b"{}")).is_empty());

    let c = headers(&[("content-type", "text/html")]);
    let d = compare_full(&cmp, (200, &a, b""), (200, &c, b""));
    assert_eq!(
        d,
        vec![json!({"in": "header", "path": "content-type",
                    "old": "application/json; charset=utf-8", "value": "text/html"})]
    );
}

#[test]
fn absent_header_is_null_and_only_listed_headers_count() {
    let cmp = Comparator::default();
    let a = headers(&[("content-type", "text/plain"), ("x-version", "1")]);
    let b = headers(&[("x-version", "2")]);
    let d = compare_full(&cmp, (200, &a, b""), (200, &b, b""));
    assert_eq!(
        d,
        vec![json!({"in": "header", "path": "content-type", "old": "text/plain", "value": null})]
    );

    let cmp = compile(CompareSpec {
        headers: vec!["X-Version".into(), "Cache-Control".into()],
        ..CompareSpec::default()
    });
    let a = headers(&[
        ("x-version", "1"),
        ("cache-control", "no-store"),
        ("cache-control", "private"),
    ]);
    let b = headers(&[("x-version", "1"), ("cache-control", "no-store, private")]);
    // Multiple values are joined with ", "; content-type is not listed, so not compared.
    assert!(compare_full(&cmp, (200, &a, b""), (200, &b, b"")).is_empty());
    let b = headers(&[("X-VERSION", "1 ")]);
    let d = compare_full(&cmp, (200, &a, b""), (200, &b, b""));
    assert_eq!(
        d,
        vec![
            json!({"in": "header", "path": "x-version", "old": "1", "value": "1 "}),
            json!({"in": "header", "path": "cache-control", "old": "no-store, private", "value": null}),
        ]
    );
}

// ---- JSON bodies ----

#[test]
fn key_order_never_matters() {
    let cmp = Comparator::default();
    let d = compare_bodies(
        &cmp,
        JSON,
        br#"{"a":1,"b":{"x":[1,2],"y":null}}"#,
        br#"{"b":{"y":null,"x":[1,2]},"a":1}"#,
    );
    assert!(d.is_empty(), "{d:?}");
}

#[test]
fn numbers_compare_by_value_and_large_integers_exactly() {
    assert!(
        json_diff(
            CompareSpec::default(),
            json!({"n": 1, "f": 2.50}),
            json!({"n": 1.0, "f": 2.5})
        )
        .is_empty()
    );
    let cmp = Comparator::default();
    // 2^53 + 1 and 2^53 are the same f64, but not the same integer.
    let d = compare_bodies(&cmp, JSON, b"[9007199254740993]", b"[9007199254740992]");
    assert_eq!(d.len(), 1);
    let d = compare_bodies(
        &cmp,
        JSON,
        b"[18446744073709551615]",
        b"[18446744073709551614]",
    );
    assert_eq!(d.len(), 1);
    let d = compare_bodies(
        &cmp,
        JSON,
        b"[-9223372036854775808]",
        b"[-9223372036854775808.0]",
    );
    assert!(d.is_empty(), "{d:?}");
    assert!(compare_bodies(&cmp, JSON, b"[1e2]", b"[100]").is_empty());
    assert_eq!(
        compare_bodies(&cmp, JSON, b"[0.1]", b"[0.10000001]").len(),
        1
    );
}

#[test]
fn numeric_tolerance_is_absolute() {
    let spec = || CompareSpec {
        numeric_tolerance: Some(0.01),
        ..CompareSpec::default()
    };
    assert!(
        json_diff(
            spec(),
            json!({"p": 10.5, "q": 3}),
            json!({"p": 10.509, "q": 3})
        )
        .is_empty()
    );
    let d = json_diff(spec(), json!({"p": 10.5}), json!({"p": 10.52}));
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "replace", "path": "/p", "old": 10.5, "value": 10.52})]
    );
    let spec = CompareSpec {
        numeric_tolerance: Some(1.0),
        ..CompareSpec::default()
    };
    assert!(json_diff(spec, json!([100, 7]), json!([101, 6.5])).is_empty());
}

#[test]
fn replace_add_remove_serialise_as_in_the_contract() {
    let d = json_diff(
        CompareSpec::default(),
        json!({"items": [{"id": 1, "price": 10.5}, {"id": 2}], "meta": {"legacy_flag": true}}),
        json!({"items": [{"id": 1, "price": 11}, {"id": 2}, {"id": 7}], "meta": {}}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/items/0/price", "old": 10.5, "value": 11}),
            json!({"in": "body", "op": "add", "path": "/items/2", "value": {"id": 7}}),
            json!({"in": "body", "op": "remove", "path": "/meta/legacy_flag", "old": true}),
        ]
    );
    let text = serde_json::to_string(&Difference::Body(BodyDiff::Op(PatchOp::Replace {
        path: "/items/0/price".into(),
        old: json!(10.5),
        value: json!(11),
    })))
    .unwrap();
    assert_eq!(
        text,
        r#"{"in":"body","op":"replace","path":"/items/0/price","old":10.5,"value":11}"#
    );
}

#[test]
fn type_changes_and_nulls_are_replacements() {
    let d = json_diff(
        CompareSpec::default(),
        json!({"a": null, "b": [1], "c": "1"}),
        json!({"a": 0, "b": {"0": 1}, "c": 1}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/a", "old": null, "value": 0}),
            json!({"in": "body", "op": "replace", "path": "/b", "old": [1], "value": {"0": 1}}),
            json!({"in": "body", "op": "replace", "path": "/c", "old": "1", "value": 1}),
        ]
    );
    let d = json_diff(CompareSpec::default(), json!([1]), json!({"a": 1}));
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "replace", "path": "", "old": [1], "value": {"a": 1}})]
    );
}

#[test]
fn keys_with_slash_and_tilde_are_escaped() {
    let d = json_diff(
        CompareSpec::default(),
        json!({"a/b": 1, "m~n": {"~/": 2}}),
        json!({"a/b": 2, "m~n": {"~/": 3}}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/a~1b", "old": 1, "value": 2}),
            json!({"in": "body", "op": "replace", "path": "/m~0n/~0~1", "old": 2, "value": 3}),
        ]
    );
}

#[test]
fn ignore_patterns_cover_the_path_and_below() {
    let spec = CompareSpec {
        ignore: vec![
            "/meta".into(),
            "/items/*/updated_at".into(),
            "/**/trace_id".into(),
        ],
        ..CompareSpec::default()
    };
    let cmp = compile(spec.clone());
    let a = json!({"meta": {"x": 1}, "items": [{"id": 1, "updated_at": 5, "tags": {"trace_id": "a"}}], "trace_id": 1, "v": 1});
    let b = json!({"meta": [2], "items": [{"id": 1, "updated_at": 6, "tags": {"trace_id": "b"}}], "v": 2});
    let d = json_diff(spec, a, b);
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "replace", "path": "/v", "old": 1, "value": 2})]
    );

    assert!(cmp.is_ignored("/meta"));
    assert!(cmp.is_ignored("/meta/x/0"));
    assert!(cmp.is_ignored("/items/3/updated_at"));
    assert!(cmp.is_ignored("/a/b/trace_id/c"));
    assert!(cmp.is_ignored("/trace_id"));
    assert!(!cmp.is_ignored("/metadata"));
    assert!(!cmp.is_ignored("/items/3"));
    assert!(!cmp.is_ignored("/items/x/y/updated_at"));
    assert!(!cmp.is_ignored("meta"));
}

#[test]
fn ignored_fields_do_not_break_array_alignment() {
    let spec = CompareSpec {
        ignore: vec!["/items/*/ts".into()],
        ..CompareSpec::default()
    };
    let d = json_diff(
        spec,
        json!({"items": [{"id": 1, "ts": 1}, {"id": 2, "ts": 1}]}),
        json!({"items": [{"id": 0, "ts": 9}, {"id": 1, "ts": 9}, {"id": 2, "ts": 9}]}),
    );
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "add", "path": "/items/0", "value": {"id": 0, "ts": 9}})]
    );
}

#[test]
fn ignoring_the_root_ignores_every_body() {
    for pattern in ["", "/**"] {
        let cmp = compile(CompareSpec {
            ignore: vec![pattern.into()],
            ..CompareSpec::default()
        });
        assert!(compare_bodies(&cmp, JSON, b"{\"a\":1}", b"[2]").is_empty());
        assert!(compare_bodies(&cmp, &[], b"\x00\x01", b"text").is_empty());
        let h = headers(&[("content-encoding", "gzip")]);
        assert!(compare_full(&cmp, (200, &h, b"junk"), (200, &h, b"other junk")).is_empty());
    }
}

#[test]
fn plain_array_insertion_in_the_middle_is_one_add() {
    let d = json_diff(
        CompareSpec::default(),
        json!([1, 2, 3, 4]),
        json!([1, 2, 9, 3, 4]),
    );
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "add", "path": "/2", "value": 9})]
    );
}

#[test]
fn trailing_removals_go_from_the_highest_index_down() {
    let d = json_diff(
        CompareSpec::default(),
        json!({"a": [1, 2, 3, 4, 5]}),
        json!({"a": [1, 2]}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "remove", "path": "/a/4", "old": 5}),
            json!({"in": "body", "op": "remove", "path": "/a/3", "old": 4}),
            json!({"in": "body", "op": "remove", "path": "/a/2", "old": 3}),
        ]
    );
}

fn keyed(pattern: &str, field: &str) -> CompareSpec {
    CompareSpec {
        array_keys: vec![(pattern.into(), field.into())],
        ..CompareSpec::default()
    }
}

#[test]
fn array_keys_insertion_in_the_middle_is_one_add() {
    let a = json!({"items": [{"id": 1, "p": 1}, {"id": 2, "p": 2}, {"id": 3, "p": 3}]});
    let b = json!({"items": [{"id": 1, "p": 1}, {"id": 7, "p": 0}, {"id": 2, "p": 2}, {"id": 3, "p": 3}]});
    let d = json_diff(keyed("/items", "id"), a.clone(), b.clone());
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "add", "path": "/items/1", "value": {"id": 7, "p": 0}})]
    );

    // Elements with the same key are compared field by field, at their new index.
    let mut b2 = b;
    b2["items"][3]["p"] = json!(30);
    let d = json_diff(keyed("/items", "id"), a, b2);
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "add", "path": "/items/1", "value": {"id": 7, "p": 0}}),
            json!({"in": "body", "op": "replace", "path": "/items/3/p", "old": 3, "value": 30}),
        ]
    );
}

#[test]
fn array_keys_replaced_entity_is_remove_and_add() {
    let d = json_diff(
        keyed("/**", "id"),
        json!([{"id": 1, "v": 1}, {"id": 2, "v": 1}]),
        json!([{"id": 1, "v": 1}, {"id": 3, "v": 1}]),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "remove", "path": "/1", "old": {"id": 2, "v": 1}}),
            json!({"in": "body", "op": "add", "path": "/1", "value": {"id": 3, "v": 1}}),
        ]
    );
    // Without keys the same change is an edit inside the element.
    let d = json_diff(
        CompareSpec::default(),
        json!([{"id": 1, "v": 1}, {"id": 2, "v": 1}]),
        json!([{"id": 1, "v": 1}, {"id": 3, "v": 1}]),
    );
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "replace", "path": "/1/id", "old": 2, "value": 3})]
    );
}

fn unordered(pattern: &str) -> CompareSpec {
    CompareSpec {
        unordered: vec![pattern.into()],
        ..CompareSpec::default()
    }
}

#[test]
fn unordered_arrays_compare_as_multisets() {
    assert!(
        json_diff(
            unordered("/tags"),
            json!({"tags": ["a", "b", "a"]}),
            json!({"tags": ["b", "a", "a"]})
        )
        .is_empty()
    );
    // Order matters elsewhere.
    assert_eq!(
        json_diff(
            unordered("/tags"),
            json!({"other": [1, 2]}),
            json!({"other": [2, 1]})
        )
        .len(),
        2
    );
    // Multiplicity matters.
    let d = json_diff(
        unordered("/tags"),
        json!({"tags": ["a", "b", "a"]}),
        json!({"tags": ["b", "a", "c", "b"]}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/tags/2", "old": "a", "value": "c"}),
            json!({"in": "body", "op": "add", "path": "/tags/3", "value": "b"}),
        ]
    );
}

#[test]
fn unordered_patch_gives_the_new_array_up_to_order() {
    let a = json!({"s": [1, 2, 3, 4, 5, 6]});
    let b = json!({"s": [6, 9, 4, 2]});
    let d = json_diff(unordered("/s"), a.clone(), b);
    // Removals come from the highest index down, additions are appended.
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/s/0", "old": 1, "value": 9}),
            json!({"in": "body", "op": "remove", "path": "/s/4", "old": 5}),
            json!({"in": "body", "op": "remove", "path": "/s/2", "old": 3}),
        ]
    );
    let patched = super::prop_tests::apply_all(&a, &d).unwrap();
    let mut s: Vec<i64> = patched["s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    s.sort();
    assert_eq!(s, vec![2, 4, 6, 9]);
}

#[test]
fn unordered_keyed_arrays_match_entities_anywhere() {
    let spec = CompareSpec {
        unordered: vec!["/users".into()],
        array_keys: vec![("/users".into(), "id".into())],
        ..CompareSpec::default()
    };
    let d = json_diff(
        spec,
        json!({"users": [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 3}]}),
        json!({"users": [{"id": "c", "n": 3}, {"id": "d", "n": 4}, {"id": "a", "n": 10}]}),
    );
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "op": "replace", "path": "/users/0/n", "old": 1, "value": 10}),
            json!({"in": "body", "op": "remove", "path": "/users/1", "old": {"id": "b", "n": 2}}),
            json!({"in": "body", "op": "add", "path": "/users/2", "value": {"id": "d", "n": 4}}),
        ]
    );
}

#[test]
fn deep_nesting_neither_overflows_nor_panics() {
    let cmp = Comparator::default();
    // As deep as serde_json accepts (127 levels), alternating arrays that need aligning and
    // objects, with the difference at the bottom.
    let deep = |leaf: &str| {
        let mut s = leaf.to_string();
        for level in 0..127 {
            s = if level % 2 == 0 {
                format!("[0,{s},1]")
            } else {
                format!("{{\"k\":{s}}}")
            };
        }
        s
    };
    assert!(serde_json::from_str::<Value>(&format!("[{}]", deep("1"))).is_err());
    let d = compare_bodies(&cmp, JSON, deep("1").as_bytes(), deep("2").as_bytes());
    assert_eq!(d.len(), 1, "{d:?}");
    let expected: String = (0..127)
        .rev()
        .map(|l| if l % 2 == 0 { "/1" } else { "/k" })
        .collect();
    assert_eq!(d[0]["path"], json!(expected));
    // Far beyond the limit: malformed, on both sides.
    let deeper = |leaf: &str| format!("{}{leaf}{}", "[".repeat(100_000), "]".repeat(100_000));
    let d = compare_bodies(&cmp, JSON, deeper("1").as_bytes(), deeper("2").as_bytes());
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|d| d["kind"] == "malformed_json"), "{d:?}");
}

// ---- body kinds ----

#[test]
fn malformed_json_on_either_side() {
    let cmp = Comparator::default();
    let d = compare_bodies(&cmp, JSON, b"{\"a\":", b"{\"a\":1}");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["in"], "body");
    assert_eq!(d[0]["kind"], "malformed_json");
    assert_eq!(d[0]["side"], "legacy");
    assert_eq!(
        d[0]["error"],
        "EOF while parsing a value at line 1 column 5"
    );
    let d = compare_bodies(&cmp, JSON, b"{}", b"<html>");
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "kind": "malformed_json", "side": "new",
                    "error": "expected value at line 1 column 1"})
        ]
    );
}

#[test]
fn json_against_non_json_is_a_content_type_difference() {
    let cmp = Comparator::default();
    let a = headers(JSON);
    let b = headers(&[("content-type", "text/html")]);
    let d = compare_full(&cmp, (200, &a, b"{}"), (200, &b, b"<html></html>"));
    assert_eq!(
        d,
        vec![
            json!({"in": "header", "path": "content-type", "old": "application/json", "value": "text/html"}),
            json!({"in": "body", "kind": "content_type", "old": "json", "value": "text"}),
        ]
    );
    let c = headers(&[("content-type", "image/png")]);
    let d = compare_full(&cmp, (200, &c, b"\x89PNG"), (200, &a, b"[]"));
    assert_eq!(
        d[1],
        json!({"in": "body", "kind": "content_type", "old": "binary", "value": "json"})
    );
}

#[test]
fn json_is_detected_by_suffix_and_by_sniffing() {
    let cmp = Comparator::default();
    let problem = [("content-type", "application/problem+json")];
    assert!(compare_bodies(&cmp, &problem, br#"{"a":1,"b":2}"#, br#"{"b":2,"a":1}"#).is_empty());
    // No content-type: the first non-blank byte decides.
    assert!(compare_bodies(&cmp, &[], b" \n{\"a\":1,\"b\":2}", br#"{"b":2,"a":1}"#).is_empty());
    assert!(compare_bodies(&cmp, &[], b"[1,2]", b"\t[1, 2]").is_empty());
    let d = compare_bodies(&cmp, &[], b"[1,2]", b"[1,3]");
    assert_eq!(
        d,
        vec![json!({"in": "body", "op": "replace", "path": "/1", "old": 2, "value": 3})]
    );
    // A sniffed body that does not parse is text, not malformed JSON.
    let d = compare_bodies(&cmp, &[], b"[INFO] started", b"[INFO] stopped");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["kind"], "text");
}

#[test]
fn text_bodies_get_a_unified_diff() {
    let cmp = Comparator::default();
    let text = [("content-type", "text/plain; charset=utf-8")];
    let d = compare_bodies(
        &cmp,
        &text,
        b"a\nb\nc\nd\ne\nf\ng\nh\n",
        b"a\nb\nc\nd\nE\nf\ng\nh\ni",
    );
    assert_eq!(
        d,
        vec![json!({"in": "body", "kind": "text", "diff":
            "--- legacy\n+++ new\n@@ -2,7 +2,8 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n+i\n\\ No newline at end of file\n"})]
    );
    // Valid UTF-8 of an unknown type is text too; identical text is a match.
    assert!(
        compare_bodies(
            &cmp,
            &[("content-type", "application/xml")],
            b"<a/>",
            b"<a/>"
        )
        .is_empty()
    );
    let d = compare_bodies(
        &cmp,
        &[("content-type", "application/xml")],
        b"<a/>",
        b"<b/>",
    );
    assert_eq!(
        d[0]["diff"],
        "--- legacy\n+++ new\n@@ -1 +1 @@\n-<a/>\n\\ No newline at end of file\n+<b/>\n\\ No newline at end of file\n"
    );
}

#[test]
fn text_diff_is_bounded() {
    let cmp = Comparator::default();
    let a: String = (0..5000).map(|i| format!("line {i}\n")).collect();
    let b: String = (0..5000).map(|i| format!("line {}\n", i * 7)).collect();
    let d = compare_bodies(
        &cmp,
        &[("content-type", "text/plain")],
        a.as_bytes(),
        b.as_bytes(),
    );
    let diff = d[0]["diff"].as_str().unwrap();
    assert!(diff.lines().count() <= 101, "{}", diff.lines().count());
    assert!(diff.len() <= 8 * 1024);
    assert!(diff.ends_with("... diff truncated (over 100 lines or 8 KiB)\n"));
    assert!(diff.starts_with("--- legacy\n+++ new\n@@ -1,5000 +1,5000 @@\n line 0\n-line 1\n"));

    // One enormous line is cut too.
    let a = "x".repeat(100_000);
    let b = "y".repeat(100_000);
    let d = compare_bodies(
        &cmp,
        &[("content-type", "text/plain")],
        a.as_bytes(),
        b.as_bytes(),
    );
    let diff = d[0]["diff"].as_str().unwrap();
    assert!(diff.len() <= 8 * 1024);
    assert!(diff.ends_with("truncated (over 100 lines or 8 KiB)\n"));
}

#[test]
fn binary_bodies_compare_by_length_and_sha256() {
    let cmp = Comparator::default();
    let png = [("content-type", "image/png")];
    assert!(compare_bodies(&cmp, &png, b"abc", b"abc").is_empty());
    let d = compare_bodies(&cmp, &png, b"abc", b"abcd");
    assert_eq!(
        d,
        vec![json!({"in": "body", "kind": "binary",
            "old": {"len": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
            "value": {"len": 4, "sha256": "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"}})]
    );
    // Invalid UTF-8 without a type is binary.
    let d = compare_bodies(&cmp, &[], b"\xff\xfe", b"\xff\xff");
    assert_eq!(d[0]["kind"], "binary");
}

// ---- content encodings ----

const DOC: &[u8] = br#"{"items":[{"id":1,"price":10.5}],"total":10.5}"#;
const DOC_REORDERED: &[u8] = br#"{"total":10.5,"items":[{"price":10.5,"id":1}]}"#;

#[test]
fn gzip_deflate_and_br_are_decoded_before_comparing() {
    let cmp = Comparator::default();
    let plain = headers(JSON);
    let bodies: [(&str, Vec<u8>); 5] = [
        ("gzip", gzip(DOC)),
        ("x-gzip", gzip(DOC)),
        ("deflate", zlib(DOC)),
        ("deflate", raw_deflate(DOC)),
        ("br", brotli(DOC)),
    ];
    for (coding, body) in &bodies {
        let enc = headers(&[
            ("content-type", "application/json"),
            ("content-encoding", coding),
        ]);
        let d = compare_full(&cmp, (200, &enc, body), (200, &plain, DOC_REORDERED));
        assert!(d.is_empty(), "{coding}: {d:?}");
    }
    // Stacked codings are undone last first.
    let enc = headers(&[
        ("content-type", "application/json"),
        ("content-encoding", "gzip, br"),
    ]);
    let body = brotli(&gzip(DOC));
    assert!(compare_full(&cmp, (200, &enc, &body), (200, &plain, DOC)).is_empty());
    let enc = headers(&[
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
        ("content-encoding", "identity"),
    ]);
    assert!(compare_full(&cmp, (200, &enc, &gzip(b"[1]")), (200, &plain, b"[1]")).is_empty());
}

#[test]
fn decompression_over_the_cap_is_too_large() {
    let cmp = compile(CompareSpec {
        max_decompressed_bytes: 1024,
        ..CompareSpec::default()
    });
    let big = vec![b' '; 1025];
    let exact = vec![b' '; 1024];
    for (coding, body, fits) in [
        ("gzip", gzip(&big), gzip(&exact)),
        ("deflate", zlib(&big), zlib(&exact)),
        ("br", brotli(&big), brotli(&exact)),
    ] {
        let enc = headers(&[("content-type", "text/plain"), ("content-encoding", coding)]);
        let plain = headers(&[("content-type", "text/plain")]);
        let d = compare_full(&cmp, (200, &plain, b"x"), (200, &enc, &body));
        assert_eq!(
            d,
            vec![
                json!({"in": "body", "kind": "too_large", "side": "new", "encoding": coding, "limit": 1024})
            ]
        );
        let d = compare_full(&cmp, (200, &enc, &fits), (200, &plain, &exact));
        assert!(d.is_empty(), "{coding}: {d:?}");
    }
}

#[test]
fn decompression_bomb_stays_bounded() {
    // 16 MiB of zeros in a few KiB: reported, not inflated.
    let cmp = Comparator::default();
    let bomb = gzip(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 100_000);
    let enc = headers(&[("content-encoding", "gzip")]);
    let d = compare_full(&cmp, (200, &enc, &bomb), (200, &HeaderMap::new(), b""));
    assert_eq!(
        d,
        vec![
            json!({"in": "body", "kind": "too_large", "side": "legacy", "encoding": "gzip", "limit": 8 << 20})
        ]
    );
}

#[test]
fn corrupt_or_truncated_compressed_bodies_are_undecodable() {
    let cmp = Comparator::default();
    let doc = br#"{"a":"some text long enough to be compressed, some text long enough"}"#;
    for (coding, good) in [
        ("gzip", gzip(doc)),
        ("deflate", zlib(doc)),
        ("br", brotli(doc)),
    ] {
        let enc = headers(&[
            ("content-type", "application/json"),
            ("content-encoding", coding),
        ]);
        let truncated = &good[..good.len() / 2];
        let d = compare_full(&cmp, (200, &enc, &good), (200, &enc, truncated));
        assert_eq!(d.len(), 1, "{coding}: {d:?}");
        assert_eq!(d[0]["kind"], "undecodable", "{coding}: {d:?}");
        assert_eq!(d[0]["side"], "new");
        assert_eq!(d[0]["encoding"], coding);
        let d = compare_full(
            &cmp,
            (200, &enc, b"\xff\xff\xff\xff garbage"),
            (200, &enc, truncated),
        );
        assert_eq!(d.len(), 2, "{coding}: {d:?}");
        assert_eq!(d[0]["kind"], "undecodable");
        assert_eq!(d[0]["side"], "legacy");

        // Flipped bytes: gzip and zlib catch them by checksum; brotli has none and may decode
        // to other bytes. Either way a difference, never a panic.
        for at in [good.len() / 3, good.len() / 2, good.len() - 2] {
            let mut corrupt = good.clone();
            corrupt[at] ^= 0xa5;
            let d = compare_full(&cmp, (200, &enc, &good), (200, &enc, &corrupt));
            assert!(!d.is_empty(), "{coding}: {d:?}");
            if coding != "br" {
                assert_eq!(d[0]["kind"], "undecodable", "{coding}: {d:?}");
            }
        }
    }
}

#[test]
fn unknown_encodings_compare_as_opaque_bytes() {
    let cmp = Comparator::default();
    let enc = headers(&[
        ("content-type", "application/json"),
        ("content-encoding", "zstd"),
    ]);
    assert!(compare_full(&cmp, (200, &enc, b"\x28\xb5"), (200, &enc, b"\x28\xb5")).is_empty());
    let d = compare_full(&cmp, (200, &enc, b"\x28\xb5"), (200, &enc, b"\x28\xb6"));
    assert_eq!(d[0]["kind"], "binary");
}

#[test]
fn empty_compressed_bodies_are_empty() {
    let cmp = Comparator::default();
    let enc = headers(&[("content-encoding", "gzip")]);
    assert!(compare_full(&cmp, (204, &enc, b""), (204, &HeaderMap::new(), b"")).is_empty());
}

// ---- serialisation of every kind ----

#[test]
fn every_difference_kind_has_its_json_shape_and_round_trips() {
    let cases = [
        (
            Difference::Status {
                old: 200,
                value: 500,
            },
            r#"{"in":"status","old":200,"value":500}"#,
        ),
        (
            Difference::Header {
                path: "content-type".into(),
                old: Some("application/json".into()),
                value: Some("text/html".into()),
            },
            r#"{"in":"header","path":"content-type","old":"application/json","value":"text/html"}"#,
        ),
        (
            Difference::Header {
                path: "etag".into(),
                old: None,
                value: Some("x".into()),
            },
            r#"{"in":"header","path":"etag","old":null,"value":"x"}"#,
        ),
        (
            Difference::Body(BodyDiff::Op(PatchOp::Add {
                path: "/items/2".into(),
                value: json!({"id": 7}),
            })),
            r#"{"in":"body","op":"add","path":"/items/2","value":{"id":7}}"#,
        ),
        (
            Difference::Body(BodyDiff::Op(PatchOp::Remove {
                path: "/meta/legacy_flag".into(),
                old: json!(true),
            })),
            r#"{"in":"body","op":"remove","path":"/meta/legacy_flag","old":true}"#,
        ),
        (
            Difference::Body(BodyDiff::Op(PatchOp::Replace {
                path: "/a".into(),
                old: Value::Null,
                value: json!(null),
            })),
            r#"{"in":"body","op":"replace","path":"/a","old":null,"value":null}"#,
        ),
        (
            Difference::Body(BodyDiff::Text {
                diff: "--- legacy\n+++ new\n".into(),
            }),
            r#"{"in":"body","kind":"text","diff":"--- legacy\n+++ new\n"}"#,
        ),
        (
            Difference::Body(BodyDiff::Binary {
                old: BinarySummary {
                    len: 0,
                    sha256: "e3b0".into(),
                },
                value: BinarySummary {
                    len: 1,
                    sha256: "6e34".into(),
                },
            }),
            r#"{"in":"body","kind":"binary","old":{"len":0,"sha256":"e3b0"},"value":{"len":1,"sha256":"6e34"}}"#,
        ),
        (
            Difference::Body(BodyDiff::MalformedJson {
                side: Side::Legacy,
                error: "EOF".into(),
            }),
            r#"{"in":"body","kind":"malformed_json","side":"legacy","error":"EOF"}"#,
        ),
        (
            Difference::Body(BodyDiff::ContentType {
                old: BodyKind::Json,
                value: BodyKind::Binary,
            }),
            r#"{"in":"body","kind":"content_type","old":"json","value":"binary"}"#,
        ),
        (
            Difference::Body(BodyDiff::TooLarge {
                side: Side::New,
                encoding: "br".into(),
                limit: 8,
            }),
            r#"{"in":"body","kind":"too_large","side":"new","encoding":"br","limit":8}"#,
        ),
        (
            Difference::Body(BodyDiff::Undecodable {
                side: Side::New,
                encoding: "gzip".into(),
                error: "corrupt deflate stream".into(),
            }),
            r#"{"in":"body","kind":"undecodable","side":"new","encoding":"gzip","error":"corrupt deflate stream"}"#,
        ),
    ];
    for (diff, text) in cases {
        assert_eq!(serde_json::to_string(&diff).unwrap(), text);
        let back: Difference = serde_json::from_str(text).unwrap();
        assert_eq!(back, diff);
    }
    let c = Comparison {
        diffs: vec![Difference::Status { old: 1, value: 2 }],
        ..Comparison::default()
    };
    assert_eq!(
        serde_json::to_string(&c).unwrap(),
        r#"{"diffs":[{"in":"status","old":1,"value":2}]}"#
    );
    assert!(serde_json::from_str::<Difference>(r#"{"in":"body","kind":"nope"}"#).is_err());
}

#[test]
fn body_paths_lists_json_differences_only() {
    let c = Comparison {
        diffs: vec![
            Difference::Status {
                old: 200,
                value: 201,
            },
            Difference::Body(BodyDiff::Op(PatchOp::Add {
                path: "/a/1".into(),
                value: json!(1),
            })),
            Difference::Body(BodyDiff::Text {
                diff: String::new(),
            }),
            Difference::Body(BodyDiff::Op(PatchOp::Remove {
                path: "/b".into(),
                old: json!(1),
            })),
        ],
        ..Comparison::default()
    };
    assert_eq!(c.body_paths().collect::<Vec<_>>(), vec!["/a/1", "/b"]);
    assert!(!c.is_match());
    assert!(Comparison::default().is_match());
}

// ---- spec validation ----

#[test]
fn spec_errors_name_the_field_and_entry() {
    let spec = CompareSpec {
        ignore: vec!["/ok".into(), "no-slash".into()],
        unordered: vec!["/a/**/**".into()],
        array_keys: vec![
            ("/items".into(), String::new()),
            ("/x*".into(), "id".into()),
        ],
        headers: vec!["content-type".into(), "bad header".into()],
        status_equivalent: vec![vec![200, 204], vec![], vec![204, 42]],
        numeric_tolerance: Some(f64::NAN),
        max_decompressed_bytes: 0,
        redact: vec!["/card/number".into(), "card".into()],
        redact_query: vec![String::new()],
    };
    let errors = spec.compile().unwrap_err();
    let got: Vec<(&str, usize)> = errors.iter().map(|e| (e.field, e.index)).collect();
    assert_eq!(
        got,
        vec![
            ("ignore", 1),
            ("redact", 1),
            ("redact_query", 0),
            ("unordered", 0),
            ("array_keys", 0),
            ("array_keys", 1),
            ("headers", 1),
            ("status_equivalent", 1),
            ("status_equivalent", 2),
            ("status_equivalent", 2),
            ("numeric_tolerance", 0),
            ("max_decompressed_bytes", 0),
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| !e.message.is_empty() && !e.hint.is_empty())
    );
    assert_eq!(errors[0].to_string(), errors[0].message);

    for t in [-1.0, f64::INFINITY] {
        let spec = CompareSpec {
            numeric_tolerance: Some(t),
            ..CompareSpec::default()
        };
        assert_eq!(spec.compile().unwrap_err()[0].field, "numeric_tolerance");
    }
    let ok = CompareSpec {
        ignore: vec![
            "".into(),
            "/**".into(),
            "/a/*/b".into(),
            "/m~0n/a~1b".into(),
        ],
        numeric_tolerance: Some(0.0),
        ..CompareSpec::default()
    };
    assert!(ok.compile().is_ok());
    assert_eq!(
        CompareSpec::default().max_decompressed_bytes,
        8 * 1024 * 1024
    );
}

#[test]
fn a_stack_of_codings_is_undone_only_to_a_small_depth() {
    // Every layer may inflate to the cap: a body stacked hundreds of codings deep would cost
    // that many full-size inflations. Two layers decode; more than four are undecodable.
    let cmp = Comparator::default();
    let plain = headers(JSON);
    let doc = br#"{"a":1}"#;
    let two = gzip(&brotli(doc));
    let enc = headers(&[
        ("content-encoding", "br, gzip"),
        ("content-type", "application/json"),
    ]);
    assert!(compare_full(&cmp, (200, &enc, &two), (200, &plain, doc)).is_empty());
    let mut deep = doc.to_vec();
    for _ in 0..5 {
        deep = gzip(&deep);
    }
    let enc = headers(&[
        ("content-encoding", "gzip, gzip, gzip"),
        ("content-encoding", "gzip, gzip"),
        ("content-type", "application/json"),
    ]);
    let d = compare_full(&cmp, (200, &enc, &deep), (200, &plain, doc));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["kind"], "undecodable", "{d:?}");
    assert_eq!(d[0]["side"], "legacy", "{d:?}");
    assert_eq!(d[0]["encoding"], "gzip, gzip, gzip, gzip, gzip", "{d:?}");
}
