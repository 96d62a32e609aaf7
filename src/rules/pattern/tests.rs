use super::*;
use proptest::prelude::*;

fn t(s: &str) -> PathPattern {
    PathPattern::template(s).unwrap()
}
fn p(s: &str) -> PathPattern {
    PathPattern::prefix(s).unwrap()
}

#[test]
fn templates_match_as_documented() {
    let table: &[(&str, &str, bool)] = &[
        ("/api/orders", "/api/orders", true),
        ("/api/orders", "/api/orders/", false),
        ("/api/orders", "/api/Orders", false),
        ("/api/orders/{id}", "/api/orders/42", true),
        ("/api/orders/{id}", "/api/orders/", false),
        ("/api/orders/{id}", "/api/orders/42/items", false),
        ("/api/{a}/x/{b}", "/api/1/x/2", true),
        ("/api/**", "/api", true),
        ("/api/**", "/api/", true),
        ("/api/**", "/api/a/b/c", true),
        ("/api/**", "/apis", false),
        ("/**", "/", true),
        ("/**", "/anything/at/all", true),
        ("/", "/", true),
        ("/", "/a", false),
    ];
    for (pattern, path, want) in table {
        assert_eq!(t(pattern).matches(path), *want, "{pattern} vs {path}");
    }
}

#[test]
fn prefixes_are_string_prefixes() {
    let table: &[(&str, &str, bool)] = &[
        ("/api/orders/", "/api/orders/1", true),
        ("/api/orders/", "/api/orders/", true),
        ("/api/orders/", "/api/orders", false),
        ("/api/ord", "/api/orders/1", true),
        ("/api/ord", "/api/or", false),
        ("/", "/", true),
        ("/", "/x/y", true),
    ];
    for (pattern, path, want) in table {
        assert_eq!(p(pattern).matches(path), *want, "{pattern} vs {path}");
    }
}

#[test]
fn bad_templates_are_rejected_with_hints() {
    for bad in [
        "api/x",
        "/a/{id",
        "/a/{}",
        "/a/x{id}",
        "/a/**/b",
        "/a/{id}/{id}",
        "/a/*",
        "/a?x=1",
    ] {
        let (msg, hint) = PathPattern::template(bad).unwrap_err();
        assert!(!msg.is_empty() && !hint.is_empty(), "{bad}");
    }
    assert!(PathPattern::prefix("/a/{id}").is_err());
}

#[test]
fn covering_and_overlap() {
    assert!(t("/api/**").covers(&t("/api/orders/{id}")));
    assert!(t("/api/{x}").covers(&t("/api/orders")));
    assert!(!t("/api/{x}").covers(&t("/api/**")));
    assert!(p("/api/").covers(&t("/api/orders/{id}")));
    assert!(p("/api/o").covers(&p("/api/orders")));
    assert!(!p("/api/orders").covers(&p("/api/o")));
    assert!(t("/api/orders/{id}").intersects(&t("/api/{kind}/42")));
    assert!(!t("/api/orders/{id}").intersects(&t("/api/users/{id}")));
    assert!(p("/api/or").intersects(&p("/api/orders/x")));
}

fn arb_seg() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("ab".to_string()),
        Just("b".to_string()),
        Just(String::new()),
        Just("{p}".to_string()),
    ]
}

fn arb_pattern() -> impl Strategy<Value = PathPattern> {
    (prop::collection::vec(arb_seg(), 0..4), 0..3u8).prop_filter_map(
        "valid patterns",
        |(segs, kind)| {
            // Give every `{p}` a distinct name.
            let segs: Vec<String> = segs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if s == "{p}" {
                        format!("{{p{i}}}")
                    } else {
                        s.clone()
                    }
                })
                .collect();
            let joined = format!("/{}", segs.join("/"));
            match kind {
                0 => PathPattern::template(&joined).ok(),
                1 => PathPattern::template(&format!("{}/**", joined.trim_end_matches('/'))).ok(),
                _ => PathPattern::prefix(&joined.replace(['{', '}'], "")).ok(),
            }
        },
    )
}

fn arb_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![Just("a"), Just("ab"), Just("abc"), Just("b"), Just("")],
        1..6,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    /// `covers` and `intersects` agree with `matches` on concrete paths.
    #[test]
    fn analysis_agrees_with_matching(a in arb_pattern(), b in arb_pattern(), paths in prop::collection::vec(arb_path(), 1..40)) {
        for path in &paths {
            let (ma, mb) = (a.matches(path), b.matches(path));
            if a.covers(&b) && mb {
                prop_assert!(ma, "{} covers {} but not {}", a, b, path);
            }
            if ma && mb {
                prop_assert!(a.intersects(&b), "{} and {} both match {}", a, b, path);
            }
        }
    }
}
