//! The one canonical form of a request path, used both to match routes and to forward, so that
//! no spelling of a path can match one route and reach the upstream as a path another route
//! owns. Pure: no I/O, fuzzed (`fuzz/`) and property-tested.
//!
//! The policy (see `docs/routing-rules.md`):
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every other
//!   escape is kept, with upper-case hex digits;
//! - `%2F` (an encoded `/`), `\` and `%5C`, and `%00` are rejected: upstreams disagree on what
//!   they mean;
//! - `.` segments are removed and `..` segments remove the one before (after decoding, so
//!   `%2e%2e` is `..`); a `..` above the root is rejected, as is a dot segment carrying
//!   parameters (`..;x`, which some servlet containers read as `..`);
//! - runs of `/` become one;
//! - letters keep their case: paths are case-sensitive, and route patterns match them as they are.

use std::borrow::Cow;

/// Why a path has no canonical form; the client gets a 400 naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains an encoded NUL (%00)")]
    Nul,
    #[error("the path contains a `%` not followed by two hex digits")]
    BadEscape,
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("the path has a dot segment with parameters (`..;`)")]
    DotParameters,
}

impl PathError {
    /// Stable, machine-readable code for the error body and the metric label.
    pub fn code(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "encoded_slash",
            PathError::Backslash => "backslash",
            PathError::Nul => "nul",
            PathError::BadEscape => "bad_escape",
            PathError::AboveRoot => "above_root",
            PathError::DotParameters => "dot_parameters",
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` may already be canonical: the cheap check that lets nearly every request
/// through without allocating.
fn plainly_canonical(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' if prev == b'/' => return false,
            // A segment starting with '.' may be a dot segment: take the slow path.
            b'.' if prev == b'/' => {
                let rest = &path[i..];
                let seg = rest.split(|&c| c == b'/').next().unwrap_or_default();
                let name = seg.split(|&c| c == b';').next().unwrap_or_default();
                if name == b"." || name == b".." {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

/// The canonical form of an origin-form path (`/...`). Anything else (`*`, an empty path) is
/// returned unchanged: it matches no path rule but the default route's.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || plainly_canonical(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Escapes: decode the unreserved, refuse the ambiguous, normalise the rest.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let c = hi << 4 | lo;
                match c {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0 => return Err(PathError::Nul),
                    c if is_unreserved(c) => decoded.push(char::from(c)),
                    c => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(char::from(HEX[usize::from(c >> 4)]));
                        decoded.push(char::from(HEX[usize::from(c & 15)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // Copy the run up to the next escape or backslash as it is (it may be UTF-8).
                let end = bytes[i..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\')
                    .map_or(bytes.len(), |p| i + p);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // 2. Segments: drop empty and `.` ones, resolve `..`.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        let name = seg.split(';').next().unwrap_or_default();
        match name {
            "" if seg.is_empty() => trailing = true,
            "." | ".." if seg.len() != name.len() => return Err(PathError::DotParameters),
            "." => trailing = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            _ => segments.push(seg),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    // Borrowed means unchanged (`/%C3%A9` takes the slow path but is already canonical).
    if out == path {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tricky_paths() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/api/orders/1", Ok("/api/orders/1")),
            ("/api/orders/", Ok("/api/orders/")),
            ("//api///orders//1", Ok("/api/orders/1")),
            ("/api/./orders/1", Ok("/api/orders/1")),
            ("/api/admin/../orders/1", Ok("/api/orders/1")),
            ("/api/orders/1/..", Ok("/api/orders/")),
            ("/api/orders/1/.", Ok("/api/orders/1/")),
            ("/api/%2e%2e/admin", Ok("/admin")),
            ("/api/%2E%2e/admin", Ok("/admin")),
            ("/api/.%2e/admin", Ok("/admin")),
            ("/%61pi/orders", Ok("/api/orders")),
            ("/api/caf%c3%a9", Ok("/api/caf%C3%A9")),
            ("/api/a%20b", Ok("/api/a%20b")),
            ("/api/%7euser", Ok("/api/~user")),
            ("/api/...", Ok("/api/...")),
            ("/api/.hidden", Ok("/api/.hidden")),
            ("/api/a;b/c", Ok("/api/a;b/c")),
            ("/API/Orders", Ok("/API/Orders")),
            ("/..", Err(PathError::AboveRoot)),
            ("/api/../../etc/passwd", Err(PathError::AboveRoot)),
            ("/%2e%2e/etc", Err(PathError::AboveRoot)),
            ("/api%2forders", Err(PathError::EncodedSlash)),
            ("/api%2Forders", Err(PathError::EncodedSlash)),
            ("/api\\orders", Err(PathError::Backslash)),
            ("/api%5corders", Err(PathError::Backslash)),
            ("/api%00", Err(PathError::Nul)),
            ("/api%", Err(PathError::BadEscape)),
            ("/api%2", Err(PathError::BadEscape)),
            ("/api%zz", Err(PathError::BadEscape)),
            ("/api/..;x/admin", Err(PathError::DotParameters)),
            ("/api/.;x/admin", Err(PathError::DotParameters)),
            ("*", Ok("*")),
            ("", Ok("")),
        ];
        for (input, want) in cases {
            let got = normalize(input);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input}");
        }
    }

    #[test]
    fn canonical_paths_are_not_copied() {
        assert!(matches!(normalize("/api/orders/1?x"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/a/.b/c"), Ok(Cow::Borrowed(_))));
        // Found by the fuzzer: canonical escapes are not copied either.
        assert!(matches!(normalize("/%25"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize("/caf%C3%A9/"), Ok(Cow::Borrowed(_))));
    }

    fn path() -> impl Strategy<Value = String> {
        let segment = prop_oneof![
            Just("".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just("%41".to_string()),
            Just("%c3%a9".to_string()),
            Just("..;x".to_string()),
            Just("%2f".to_string()),
            "[a-zA-Z0-9._~;-]{1,6}",
        ];
        prop::collection::vec(segment, 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #[test]
        fn canonical_form_is_stable_and_clean(p in path()) {
            if let Ok(once) = normalize(&p) {
                let twice = normalize(&once);
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))), "not idempotent: {:?}", twice);
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                for seg in once.split('/') {
                    prop_assert!(seg != "." && seg != "..", "dot segment left in {}", once);
                }
                for (i, _) in once.match_indices('%') {
                    let c = u8::from_str_radix(&once[i + 1..i + 3], 16).unwrap();
                    prop_assert!(!is_unreserved(c), "unreserved left encoded in {}", once);
                }
            }
        }

        #[test]
        fn arbitrary_input_never_panics(p in "/[ -~]{0,40}") {
            let _ = normalize(&p);
        }
    }
}
