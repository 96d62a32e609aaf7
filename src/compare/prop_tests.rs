//! Property tests over random JSON documents, with a tiny RFC 6902 `apply` to check that the
//! body differences are a patch from the legacy body to the new one.

use http::HeaderMap;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::*;

/// Applies serialised body differences (`{"in":"body","op":...}`) in order. Fails on a path
/// that does not exist, an index out of range, or an `old` that is not the value found there.
pub(super) fn apply_all(doc: &Value, diffs: &[Value]) -> Result<Value, String> {
    let mut doc = doc.clone();
    for d in diffs {
        if d["in"] == "body" && d.get("op").is_some() {
            apply(&mut doc, d)?;
        }
    }
    Ok(doc)
}

fn apply(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = op["op"].as_str().ok_or("no op")?;
    let path = op["path"].as_str().ok_or("no path")?;
    let segs: Vec<String> = if path.is_empty() {
        Vec::new()
    } else {
        let rest = path
            .strip_prefix('/')
            .ok_or(format!("bad pointer {path}"))?;
        rest.split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect()
    };
    let value = op.get("value").cloned();
    let old = op.get("old");
    let check_old = |found: &Value| match old {
        Some(old) if old != found => Err(format!("{path}: old {old} but found {found}")),
        _ => Ok(()),
    };
    let Some((last, parents)) = segs.split_last() else {
        check_old(doc)?;
        *doc = value.unwrap_or(Value::Null);
        return Ok(());
    };
    let mut target = doc;
    for s in parents {
        target = match target {
            Value::Object(m) => m.get_mut(s),
            Value::Array(a) => s.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or(format!("{path}: no {s}"))?;
    }
    match target {
        Value::Object(m) => match kind {
            "add" => {
                m.insert(last.clone(), value.ok_or("add without value")?);
            }
            "remove" => check_old(&m.remove(last).ok_or(format!("{path}: nothing to remove"))?)?,
            "replace" => {
                let slot = m
                    .get_mut(last)
                    .ok_or(format!("{path}: nothing to replace"))?;
                check_old(slot)?;
                *slot = value.ok_or("replace without value")?;
            }
            _ => return Err(format!("unknown op {kind}")),
        },
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("{path}: bad index"))?;
            match kind {
                "add" if i <= a.len() => a.insert(i, value.ok_or("add without value")?),
                "remove" if i < a.len() => check_old(&a.remove(i))?,
                "replace" if i < a.len() => {
                    check_old(&a[i])?;
                    a[i] = value.ok_or("replace without value")?;
                }
                _ => return Err(format!("{path}: {kind} out of range ({})", a.len())),
            }
        }
        _ => return Err(format!("{path}: parent is not a container")),
    }
    Ok(())
}

/// Compares two documents as JSON bodies and returns the serialised differences.
fn diffs(cmp: &Comparator, a: &Value, b: &Value) -> Vec<Value> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let (a, b) = (a.to_string(), b.to_string());
    let c = cmp.compare(
        &Response {
            status: 200,
            headers: &h,
            body: a.as_bytes(),
        },
        &Response {
            status: 200,
            headers: &h,
            body: b.as_bytes(),
        },
    );
    let v = serde_json::to_value(&c.diffs).unwrap_or_default();
    let back: Vec<Difference> = serde_json::from_value(v.clone()).unwrap_or_default();
    assert_eq!(back, c.diffs, "serialisation round trip");
    match v {
        Value::Array(d) => d,
        _ => Vec::new(),
    }
}

const KEYS: &[&str] = &["a", "b", "id", "ts", "a/b", "m~n", ""];

/// Numbers are integers or halves, so documents that are equal by value are also equal as
/// `serde_json::Value`s (no `1` against `1.0`), which lets the checks below use `==`.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..4).prop_map(|n| json!(n)),
        (-3i64..4).prop_map(|n| json!(n as f64 + 0.5)),
        Just(json!(9_007_199_254_740_993u64)),
        prop::sample::select(vec!["", "x", "y", "a/b", "~"]).prop_map(|s| json!(s)),
    ]
}

fn doc() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..5).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A deterministic stream of choices for mutating a document.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }

    fn leaf(&mut self) -> Value {
        match self.below(6) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.below(7) as i64 - 3),
            3 => json!(self.below(7) as f64 - 2.5),
            4 => json!({"id": self.below(4), "ts": self.below(3)}),
            _ => json!(["x", "y", "a/b", "~"][self.below(4)]),
        }
    }
}

/// A document like `v` with random edits: changed leaves, dropped and added members, removed,
/// inserted, duplicated and swapped array elements.
fn mutate(v: &Value, rng: &mut Rng) -> Value {
    match v {
        Value::Object(m) => {
            if rng.below(12) == 0 {
                return rng.leaf();
            }
            let mut out = Map::new();
            for (k, x) in m {
                match rng.below(8) {
                    0 => {}
                    1 | 2 => {
                        out.insert(k.clone(), mutate(x, rng));
                    }
                    _ => {
                        out.insert(k.clone(), x.clone());
                    }
                }
            }
            if rng.below(4) == 0 {
                out.insert(KEYS[rng.below(KEYS.len())].to_string(), rng.leaf());
            }
            Value::Object(out)
        }
        Value::Array(a) => {
            let mut out: Vec<Value> = a
                .iter()
                .map(|x| {
                    if rng.below(4) == 0 {
                        mutate(x, rng)
                    } else {
                        x.clone()
                    }
                })
                .collect();
            for _ in 0..rng.below(3) {
                let len = out.len();
                match rng.below(4) {
                    0 if len > 0 => {
                        out.remove(rng.below(len));
                    }
                    1 => {
                        let v = rng.leaf();
                        out.insert(rng.below(len + 1), v);
                    }
                    2 if len > 0 => {
                        let v = out[rng.below(len)].clone();
                        out.insert(rng.below(len + 1), v);
                    }
                    3 if len > 1 => out.swap(rng.below(len), rng.below(len)),
                    _ => {}
                }
            }
            Value::Array(out)
        }
        leaf => {
            if rng.below(2) == 0 {
                rng.leaf()
            } else {
                leaf.clone()
            }
        }
    }
}

/// A legacy document and a new one: either an edited copy or an unrelated document.
fn pair() -> impl Strategy<Value = (Value, Value)> {
    prop_oneof![
        3 => (doc(), any::<u64>()).prop_map(|(d, seed)| {
            let new = mutate(&d, &mut Rng(seed | 1));
            (d, new)
        }),
        1 => (doc(), doc()),
    ]
}

fn spec(f: impl FnOnce(&mut CompareSpec)) -> Comparator {
    let mut s = CompareSpec::default();
    f(&mut s);
    s.compile().unwrap_or_default()
}

/// The specs of ordered comparison: plain, and with every array keyed by `id`.
fn ordered_specs() -> Vec<Comparator> {
    vec![
        Comparator::default(),
        spec(|s| s.array_keys = vec![("/**".into(), "id".into())]),
        spec(|s| s.array_keys = vec![("/*".into(), "id".into())]),
    ]
}

/// Every array as a multiset, plain and keyed.
fn unordered_specs() -> Vec<Comparator> {
    vec![
        spec(|s| s.unordered = vec!["/**".into()]),
        spec(|s| {
            s.unordered = vec!["/**".into()];
            s.array_keys = vec![("/**".into(), "id".into())];
        }),
    ]
}

/// Ignore rules whose wildcards cover every index alike (a rule naming one index is tied to
/// positions, which the patch shifts).
fn ignoring_specs() -> Vec<Comparator> {
    [
        vec!["/**/ts"],
        vec!["/a/*", "/**/m~0n"],
        vec!["/*/b", "/id"],
        vec!["/*"],
        vec!["/**/a/**/id"],
    ]
    .into_iter()
    .map(|patterns| spec(|s| s.ignore = patterns.into_iter().map(String::from).collect()))
    .collect()
}

/// `v` without the members and elements under ignored paths.
fn mask(cmp: &Comparator, v: &Value, path: &str) -> Value {
    let escape = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k, format!("{path}/{}", escape(k)), x))
                .filter(|(_, p, _)| !cmp.is_ignored(p))
                .map(|(k, p, x)| (k.clone(), mask(cmp, x, &p)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| (format!("{path}/{i}"), x))
                .filter(|(p, _)| !cmp.is_ignored(p))
                .map(|(p, x)| mask(cmp, x, &p))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `v` with every array sorted (by its elements' text), so multisets compare equal.
pub(super) fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), sorted(x))).collect()),
        Value::Array(a) => {
            let mut items: Vec<Value> = a.iter().map(sorted).collect();
            items.sort_by_cached_key(Value::to_string);
            Value::Array(items)
        }
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn a_document_against_itself_has_no_differences(d in doc()) {
        for cmp in ordered_specs().iter().chain(&unordered_specs()).chain(&ignoring_specs()) {
            prop_assert_eq!(diffs(cmp, &d, &d), Vec::<Value>::new());
        }
    }

    #[test]
    fn body_differences_patch_legacy_into_new((a, b) in pair()) {
        for cmp in ordered_specs() {
            let d = diffs(&cmp, &a, &b);
            let patched = apply_all(&a, &d).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&patched, &b, "diffs: {:?}", d);
            prop_assert_eq!(d.is_empty(), a == b);
        }
    }

    #[test]
    fn with_ignore_rules_the_patch_holds_outside_ignored_paths((a, b) in pair()) {
        for cmp in ignoring_specs() {
            let d = diffs(&cmp, &a, &b);
            prop_assert!(d.iter().filter_map(|d| d["path"].as_str()).all(|p| !cmp.is_ignored(p)));
            let patched = apply_all(&a, &d).map_err(TestCaseError::fail)?;
            prop_assert_eq!(mask(&cmp, &patched, ""), mask(&cmp, &b, ""), "diffs: {:?}", d);
        }
    }

    /// Unordered arrays: removals and additions cannot say where an element goes, so the
    /// patched document equals the new one up to the order of those arrays' elements.
    #[test]
    fn unordered_patch_holds_up_to_element_order((a, b) in pair()) {
        for cmp in unordered_specs() {
            let d = diffs(&cmp, &a, &b);
            let patched = apply_all(&a, &d).map_err(TestCaseError::fail)?;
            prop_assert_eq!(sorted(&patched), sorted(&b), "diffs: {:?}", d);
            if sorted(&a) == sorted(&b) {
                prop_assert!(d.is_empty(), "equal as multisets, yet: {:?}", d);
            }
        }
    }

    /// Shuffling an unordered array is never a difference.
    #[test]
    fn shuffled_unordered_arrays_match(items in prop::collection::vec(leaf(), 0..12), seed in any::<u64>()) {
        let mut shuffled = items.clone();
        let mut rng = Rng(seed | 1);
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i + 1));
        }
        for cmp in unordered_specs() {
            prop_assert_eq!(diffs(&cmp, &json!({"s": items}), &json!({"s": shuffled})), Vec::<Value>::new());
        }
    }
}
