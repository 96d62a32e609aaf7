//! Redaction of sensitive body values in what is stored and shown. The comparison itself sees
//! the real values (a differing redacted field is still reported as differing); only what
//! leaves the comparison (records, logs) is redacted.

use std::borrow::Cow;

use serde_json::Value;

use super::pattern::{self, Pattern};
use super::{BodyDiff, Comparator, Difference, PatchOp};

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

/// Headers whose values never leave the comparison: not in records, not in differences.
pub const SECRET_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Query parameters whose values never reach a record, whatever the route says: the query
/// form of an OAuth bearer token (RFC 6750 2.3).
pub const SECRET_QUERY_PARAMS: [&str; 1] = ["access_token"];

impl Comparator {
    /// `query` (without the `?`) as a record keeps it: the value of every parameter named in
    /// `compare.redact_query` (or of all, with `*`), and of `access_token`, is replaced by
    /// `[redacted]`. Names are matched percent-decoded and ASCII case-insensitively, so no
    /// spelling of a name passes its value through; the rest of the query stays as written.
    pub fn redact_query<'q>(&self, query: &'q str) -> Cow<'q, str> {
        let hidden = |name: &str| {
            let decoded: String = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(n, _)| n.into_owned())
                .unwrap_or_default();
            self.redact_query.all
                || SECRET_QUERY_PARAMS
                    .iter()
                    .any(|s| decoded.eq_ignore_ascii_case(s))
                || self
                    .redact_query
                    .names
                    .iter()
                    .any(|s| decoded.eq_ignore_ascii_case(s))
        };
        let redacts = |pair: &str| {
            pair.split_once('=')
                .is_some_and(|(name, value)| value != REDACTED && hidden(name))
        };
        if !query.split('&').any(redacts) {
            return Cow::Borrowed(query);
        }
        let mut out = String::with_capacity(query.len());
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if redacts(pair) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
        Cow::Owned(out)
    }

    /// Whether this route redacts any body path.
    pub fn redacts(&self) -> bool {
        !self.redact.is_empty()
    }

    /// Replaces, in `value` (found at pointer `base` in the body), every value whose path
    /// matches a redact pattern, with `"[redacted]"`.
    pub fn redact_value(&self, base: &str, value: &mut Value) {
        if self.redact.is_empty() {
            return;
        }
        let mut path = base.to_string();
        redact_walk(&self.redact, pattern::matches_pointer, &mut path, value);
    }

    /// As [`Self::redact_value`], for a value a JSON Patch operation at `path` carries. Its
    /// indices are those of the array as the earlier operations left it (after an `add` at
    /// `/items/0`, legacy's `/items/1` is reported at `/items/2`), so a literal index in a
    /// pattern matches any index there: hiding a neighbour too is the safe side.
    fn redact_op_value(&self, path: &str, value: &mut Value) {
        if self.redact.is_empty() {
            return;
        }
        let mut path = path.to_string();
        redact_walk(
            &self.redact,
            pattern::matches_pointer_at_any_index,
            &mut path,
            value,
        );
    }

    /// Redacts the values a difference carries. On a route that redacts, a text line diff
    /// is replaced whole: it quotes the bodies, which no path can be found in. A secret
    /// header that a route compares keeps its path (it still counts) but not its values.
    pub fn redact_diff(&self, diff: &mut Difference) {
        if let Difference::Header { path, old, value } = diff
            && SECRET_HEADERS.contains(&path.as_str())
        {
            for side in [old, value].into_iter().flatten() {
                *side = REDACTED.to_string();
            }
        }
        if let Difference::Body(BodyDiff::Text { diff }) = diff
            && self.redacts()
        {
            *diff = REDACTED.to_string();
        }
        if let Difference::Body(BodyDiff::Op(op)) = diff {
            match op {
                PatchOp::Add { path, value } => self.redact_op_value(path, value),
                PatchOp::Remove { path, old } => self.redact_op_value(path, old),
                PatchOp::Replace { path, old, value } => {
                    self.redact_op_value(path, old);
                    self.redact_op_value(path, value);
                }
            }
        }
    }
}

fn redact_walk(
    patterns: &[Pattern],
    matches: fn(&Pattern, &str) -> bool,
    path: &mut String,
    value: &mut Value,
) {
    if patterns.iter().any(|p| matches(p, path)) {
        *value = Value::String(REDACTED.to_string());
        return;
    }
    let len = path.len();
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                path.push('/');
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                redact_walk(patterns, matches, path, child);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                path.push('/');
                path.push_str(&i.to_string());
                redact_walk(patterns, matches, path, child);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::CompareSpec;
    use serde_json::json;

    fn comparator(redact: &[&str]) -> Comparator {
        CompareSpec {
            redact: redact.iter().map(|s| s.to_string()).collect(),
            ..CompareSpec::default()
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn redacts_named_query_values_in_any_spelling_and_keeps_the_rest() {
        let c = CompareSpec {
            redact_query: vec!["Sig".into(), "key".into()],
            ..CompareSpec::default()
        }
        .compile()
        .unwrap();
        assert_eq!(c.redact_query("page=2&sort=asc"), "page=2&sort=asc");
        assert!(matches!(c.redact_query("page=2"), Cow::Borrowed(_)));
        assert_eq!(
            c.redact_query("sig=abc&page=2&SIG=x&%73ig=y&key&key=&access_token=t"),
            "sig=[redacted]&page=2&SIG=[redacted]&%73ig=[redacted]&key&key=[redacted]&access_token=[redacted]"
        );
        // Without a route setting, the bearer token is hidden all the same.
        let default = Comparator::default();
        assert_eq!(
            default.redact_query("a=1&Access_Token=t"),
            "a=1&Access_Token=[redacted]"
        );
        let all = CompareSpec {
            redact_query: vec!["*".into()],
            ..CompareSpec::default()
        }
        .compile()
        .unwrap();
        assert_eq!(all.redact_query("a=1&b&c=3"), "a=[redacted]&b&c=[redacted]");
    }

    #[test]
    fn query_names_that_are_not_names_are_refused() {
        for bad in ["", "a=b", "?a", "a&b"] {
            let errors = CompareSpec {
                redact_query: vec!["ok".into(), bad.into()],
                ..CompareSpec::default()
            }
            .compile()
            .unwrap_err();
            assert_eq!(errors.len(), 1, "{bad}");
            assert_eq!((errors[0].field, errors[0].index), ("redact_query", 1));
        }
    }

    #[test]
    fn redacts_matching_values_at_any_depth() {
        let c = comparator(&["/card/number", "/**/ssn"]);
        let mut v = json!({"card": {"number": "4111", "exp": "12/30"}, "people": [{"ssn": "1"}, {"name": "a", "x": {"ssn": 2}}]});
        c.redact_value("", &mut v);
        assert_eq!(
            v,
            json!({"card": {"number": "[redacted]", "exp": "12/30"}, "people": [{"ssn": "[redacted]"}, {"name": "a", "x": {"ssn": "[redacted]"}}]})
        );
    }

    #[test]
    fn a_redacted_path_covers_differences_found_beneath_it() {
        // `redact = ["/card"]` hides the whole card; a difference reported deeper inside it
        // (its path starts below the pattern) must not carry the card's values either.
        let c = comparator(&["/card", "/people/*/secret"]);
        let mut d = Difference::Body(BodyDiff::Op(PatchOp::Replace {
            path: "/card/number".into(),
            old: json!("4111"),
            value: json!("4222"),
        }));
        c.redact_diff(&mut d);
        let text = serde_json::to_string(&d).unwrap();
        assert!(!text.contains("4111") && !text.contains("4222"), "{text}");
        let mut d = Difference::Body(BodyDiff::Op(PatchOp::Add {
            path: "/people/0/secret/pin".into(),
            value: json!({"digits": "1234"}),
        }));
        c.redact_diff(&mut d);
        assert!(!serde_json::to_string(&d).unwrap().contains("1234"));
        // Siblings of the redacted path keep their values.
        let mut v = json!({"card": {"number": "4111"}, "cardholder": "Ann"});
        c.redact_value("", &mut v);
        assert_eq!(v, json!({"card": "[redacted]", "cardholder": "Ann"}));
    }

    /// Body differences apply in order (RFC 6902): after a `remove` from an array, the later
    /// operations name the elements that follow by their shifted index. A pattern with a
    /// literal index must still hide the element it named in the document.
    #[test]
    fn a_literal_index_covers_an_element_reported_at_a_shifted_index() {
        let c = comparator(&["/items/1/card"]);
        let mut h = http::HeaderMap::new();
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        let legacy = br#"{"items":[{"card":"AAAA"},{"card":"BBBB"}]}"#;
        let new = br#"{"items":[{"card":"XXXX"},{"card":"AAAA"},{"card":"B2B2"}]}"#;
        let response = |body: &'static [u8]| crate::compare::Response {
            status: 200,
            headers: &h,
            body,
        };
        let mut diffs = c.compare(&response(legacy), &response(new)).diffs;
        assert!(!diffs.is_empty());
        for d in &mut diffs {
            c.redact_diff(d);
        }
        let text = serde_json::to_string(&diffs).unwrap();
        assert!(!text.contains("BBBB"), "{text}");
        // The stored document itself is redacted at its own positions only.
        let mut v: Value = serde_json::from_slice(legacy).unwrap();
        c.redact_value("", &mut v);
        assert_eq!(
            v,
            json!({"items": [{"card": "AAAA"}, {"card": "[redacted]"}]})
        );
    }

    #[test]
    fn a_text_diff_on_a_redacting_route_does_not_quote_the_body() {
        // A JSON answer sent as `text/plain` is compared as text, and a line diff would quote
        // the values the route redacts.
        let c = comparator(&["/card/number"]);
        let mut h = http::HeaderMap::new();
        h.insert("content-type", http::HeaderValue::from_static("text/plain"));
        let legacy = br#"{"card":{"number":"4111111111111111"},"total":1}"#;
        let new = br#"{"card":{"number":"4111111111111111"},"total":2}"#;
        let response = |body: &'static [u8]| crate::compare::Response {
            status: 200,
            headers: &h,
            body,
        };
        let mut diffs = c.compare(&response(legacy), &response(new)).diffs;
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        c.redact_diff(&mut diffs[0]);
        let text = serde_json::to_string(&diffs[0]).unwrap();
        assert!(!text.contains("4111"), "{text}");
        assert_eq!(
            serde_json::to_value(&diffs[0]).unwrap(),
            json!({"in": "body", "kind": "text", "diff": REDACTED})
        );
        // A route without redaction keeps its line diffs.
        let plain = comparator(&[]);
        let mut d = plain.compare(&response(legacy), &response(new)).diffs;
        plain.redact_diff(&mut d[0]);
        assert!(serde_json::to_string(&d[0]).unwrap().contains("4111"));
    }

    #[test]
    fn secret_header_differences_lose_their_values_on_every_route() {
        // What a replay answers with goes through here too, not only what is stored.
        let c = comparator(&[]);
        let mut d = Difference::Header {
            path: "set-cookie".into(),
            old: Some("session=abc".into()),
            value: None,
        };
        c.redact_diff(&mut d);
        assert_eq!(
            d,
            Difference::Header {
                path: "set-cookie".into(),
                old: Some(REDACTED.into()),
                value: None,
            }
        );
        let mut d = Difference::Header {
            path: "x-version".into(),
            old: Some("1".into()),
            value: Some("2".into()),
        };
        let before = d.clone();
        c.redact_diff(&mut d);
        assert_eq!(d, before);
    }

    #[test]
    fn redacts_values_inside_differences() {
        let c = comparator(&["/card/number"]);
        let mut d = Difference::Body(BodyDiff::Op(PatchOp::Replace {
            path: "/card/number".into(),
            old: json!("4111"),
            value: json!("4222"),
        }));
        c.redact_diff(&mut d);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"in": "body", "op": "replace", "path": "/card/number", "old": "[redacted]", "value": "[redacted]"})
        );
        let mut d = Difference::Body(BodyDiff::Op(PatchOp::Add {
            path: "/card".into(),
            value: json!({"number": "4111"}),
        }));
        c.redact_diff(&mut d);
        assert_eq!(
            serde_json::to_value(&d).unwrap()["value"],
            json!({"number": "[redacted]"})
        );
    }
}
