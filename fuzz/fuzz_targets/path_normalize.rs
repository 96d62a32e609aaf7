//! Fuzzes `route::path::normalize`, the one canonical form of a request path used both to
//! match routes and to forward. Beyond "never panics", it checks the properties the proxy's
//! safety rests on: a canonical path is a fixed point (returned borrowed, not copied), starts
//! with `/`, has no empty, `.` or `..` segment, and no escape of an unreserved character
//! (which would give a second spelling of the same path).
#![no_main]

use std::borrow::Cow;

use ficus::route::path::normalize;
use libfuzzer_sys::fuzz_target;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn check_canonical(input: &str, out: &str) {
    assert!(out.starts_with('/'), "{input:?} -> {out:?}: no leading /");
    assert!(!out.contains("//"), "{input:?} -> {out:?}: contains //");
    assert!(
        !out.contains('\\'),
        "{input:?} -> {out:?}: contains a backslash"
    );
    for seg in out.split('/').skip(1) {
        // A dot segment with parameters (`..;x`) counts as a dot segment too.
        let name = seg.split(';').next().unwrap_or_default();
        assert!(
            name != "." && name != "..",
            "{input:?} -> {out:?}: dot segment {seg:?}"
        );
    }
    let bytes = out.as_bytes();
    for (i, _) in out.match_indices('%') {
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            panic!("{input:?} -> {out:?}: bad escape at {i}");
        };
        let c = hi << 4 | lo;
        assert!(
            !is_unreserved(c) && c != b'/' && c != b'\\' && c != 0,
            "{input:?} -> {out:?}: escape of {:?} at {i}",
            char::from(c)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let result = normalize(input);
    if !input.starts_with('/') {
        // Not origin-form (`*`, empty): documented to come back unchanged.
        assert!(
            matches!(result, Ok(Cow::Borrowed(s)) if s == input),
            "{input:?} -> {result:?}: non-origin-form path changed"
        );
        return;
    }
    let Ok(out) = result else {
        return;
    };
    // Borrowed means unchanged: an unchanged path must not be copied (the proxy rebuilds the
    // URI of every Owned one). fuzz/regressions/path_normalize/owned-canonical-escape.
    if let Cow::Owned(copy) = &out {
        assert_ne!(copy, input, "{input:?}: unchanged but copied");
    }
    check_canonical(input, &out);
    match normalize(&out) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*out, "{input:?}: not idempotent"),
        other => panic!("{input:?} -> {out:?} -> {other:?}: not a fixed point"),
    }
});
