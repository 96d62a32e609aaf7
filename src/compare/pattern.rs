//! JSON Pointer patterns (`/items/*/price`, `/**/updated_at`) and the pointer helpers the diff
//! engine shares with fingerprints and metrics: escaping, parsing, [`generalize`].
//!
//! A pattern is an RFC 6901 pointer whose segments may also be `*` (exactly one segment) or `**`
//! (zero or more segments). Wildcards match whole segments only; a literal segment matches an
//! object key with that name or, when it is a canonical decimal number, the array index.

use std::borrow::Cow;

/// One step of a concrete path while walking a document: an object key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A pattern segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatSeg {
    /// A literal key (unescaped), with its value as an array index when it is one.
    Lit { text: String, index: Option<usize> },
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// A compiled pointer pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    segs: Vec<PatSeg>,
}

/// Why a pattern was rejected: a message and a hint for the person who wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PatternError {
    pub message: String,
    pub hint: String,
}

impl Pattern {
    /// Parses a pattern: `""` is the root, anything else starts with `/`.
    pub(crate) fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        if pattern.is_empty() {
            return Ok(Pattern { segs: Vec::new() });
        }
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(PatternError {
                message: format!("pattern `{pattern}` must start with `/`"),
                hint: format!(
                    "JSON Pointer patterns start at the body's root: write `/{pattern}`, or `\"\"` for the whole body"
                ),
            });
        };
        let mut segs = Vec::new();
        for raw in rest.split('/') {
            let seg = match raw {
                "*" => PatSeg::One,
                "**" => {
                    if segs.last() == Some(&PatSeg::Any) {
                        return Err(PatternError {
                            message: format!("pattern `{pattern}` has `**` right after `**`"),
                            hint:
                                "one `**` already matches any number of segments: drop the second"
                                    .into(),
                        });
                    }
                    PatSeg::Any
                }
                _ if raw.contains('*') => {
                    return Err(PatternError {
                        message: format!(
                            "pattern `{pattern}`: segment `{raw}` mixes `*` with other characters"
                        ),
                        hint: "wildcards match whole segments only: `*` is one segment, `**` any depth (e.g. `/items/*/price`, `/**/updated_at`)"
                            .into(),
                    });
                }
                _ => {
                    let text = unescape(raw).ok_or_else(|| PatternError {
                        message: format!(
                            "pattern `{pattern}`: `~` in segment `{raw}` is not followed by 0 or 1"
                        ),
                        hint: "RFC 6901 escapes: write `~0` for `~` and `~1` for `/`".into(),
                    })?;
                    let index = parse_index(&text);
                    PatSeg::Lit {
                        text: text.into_owned(),
                        index,
                    }
                }
            };
            segs.push(seg);
        }
        Ok(Pattern { segs })
    }

    /// The same pattern extended to everything beneath what it matches (`p` -> `p/**`).
    pub(crate) fn and_below(mut self) -> Pattern {
        if self.segs.last() != Some(&PatSeg::Any) {
            self.segs.push(PatSeg::Any);
        }
        self
    }

    /// Whether the pattern matches the whole path.
    pub(crate) fn matches(&self, path: &[Seg<'_>]) -> bool {
        self.matches_by(path, seg_matches)
    }

    fn matches_by(&self, path: &[Seg<'_>], seg_matches: fn(&PatSeg, Seg<'_>) -> bool) -> bool {
        // Wildcard matching with backtracking to the last `**`: O(len(pattern) * len(path))
        // at worst, which is tiny for pointers.
        let pat = &self.segs;
        let (mut p, mut s) = (0, 0);
        let mut backtrack: Option<(usize, usize)> = None;
        loop {
            if p < pat.len() && pat[p] == PatSeg::Any {
                backtrack = Some((p, s));
                p += 1;
                continue;
            }
            if p < pat.len() && s < path.len() && seg_matches(&pat[p], path[s]) {
                p += 1;
                s += 1;
                continue;
            }
            if p == pat.len() && s == path.len() {
                return true;
            }
            match backtrack {
                Some((bp, bs)) if bs < path.len() => {
                    backtrack = Some((bp, bs + 1));
                    p = bp + 1;
                    s = bs + 1;
                }
                _ => return false,
            }
        }
    }
}

fn seg_matches(pat: &PatSeg, seg: Seg<'_>) -> bool {
    match (pat, seg) {
        (PatSeg::One | PatSeg::Any, _) => true,
        (PatSeg::Lit { text, .. }, Seg::Key(key)) => text == key,
        (PatSeg::Lit { index, .. }, Seg::Index(i)) => *index == Some(i),
    }
}

/// As [`seg_matches`], but a path segment that is an index matches any literal index.
fn seg_matches_any_index(pat: &PatSeg, seg: Seg<'_>) -> bool {
    match (pat, seg) {
        (PatSeg::Lit { index: Some(_), .. }, Seg::Key(key)) if parse_index(key).is_some() => true,
        _ => seg_matches(pat, seg),
    }
}

/// A canonical array index (`0`, `17`; not `01`, `-1` or `+1`).
fn parse_index(s: &str) -> Option<usize> {
    let canonical = s == "0" || (!s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()));
    if canonical && !s.is_empty() {
        s.parse().ok()
    } else {
        None
    }
}

/// RFC 6901 unescaping of one segment; `None` for a `~` not followed by `0` or `1`.
fn unescape(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.contains('~') {
        return Some(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(Cow::Owned(out))
}

/// Appends `/segment` with RFC 6901 escaping (`~` -> `~0`, `/` -> `~1`).
pub(crate) fn push_escaped(out: &mut String, seg: Seg<'_>) {
    out.push('/');
    match seg {
        Seg::Index(i) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{i}");
        }
        Seg::Key(key) => {
            for c in key.chars() {
                match c {
                    '~' => out.push_str("~0"),
                    '/' => out.push_str("~1"),
                    c => out.push(c),
                }
            }
        }
    }
}

/// Renders a path as an RFC 6901 pointer (`""` for the root).
pub(crate) fn render(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        push_escaped(&mut out, *seg);
    }
    out
}

/// Splits an RFC 6901 pointer into unescaped segments; `None` if it is not a valid pointer.
pub(crate) fn split_pointer(path: &str) -> Option<Vec<Cow<'_, str>>> {
    if path.is_empty() {
        return Some(Vec::new());
    }
    path.strip_prefix('/')?.split('/').map(unescape).collect()
}

/// Whether a concrete pointer is matched by the (compiled) pattern; `false` for an invalid
/// pointer.
pub(crate) fn matches_pointer(pattern: &Pattern, path: &str) -> bool {
    let Some(segs) = split_pointer(path) else {
        return false;
    };
    let segs: Vec<Seg<'_>> = segs.iter().map(|s| Seg::Key(s)).collect();
    pattern.matches(&segs)
}

/// Whether the pattern matches the pointer with its index segments read as any index: the
/// path of a JSON Patch operation, whose indices are those of the array as the operations
/// before it left it, not of either document. Used where matching too much is the safe side
/// (redaction).
pub(crate) fn matches_pointer_at_any_index(pattern: &Pattern, path: &str) -> bool {
    let Some(segs) = split_pointer(path) else {
        return false;
    };
    let segs: Vec<Seg<'_>> = segs.iter().map(|s| Seg::Key(s)).collect();
    pattern.matches_by(&segs, seg_matches_any_index)
}

/// Turns array indices into `*`: `/items/3/price` -> `/items/*/price`.
///
/// For fingerprints and metric labels, where `/items/3` and `/items/4` are the same kind of
/// difference. A segment is taken for an index when it is a canonical decimal number, so an
/// object key such as `"2024"` generalises too; the text is not otherwise changed (escapes stay).
pub fn generalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if i > 0 && parse_index(seg).is_some() {
            out.push('*');
        } else {
            out.push_str(seg);
        }
    }
    out
}

/// Whether `pattern` matches the concrete RFC 6901 pointer `path` exactly (not what lies beneath
/// it: ignore rules add that themselves). `*` is one segment, `**` zero or more. An invalid
/// pattern or pointer matches nothing.
pub fn pattern_matches(pattern: &str, path: &str) -> bool {
    Pattern::parse(pattern).is_ok_and(|p| matches_pointer(&p, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_segments() {
        let cases = [
            ("", "", true),
            ("", "/a", false),
            ("/a", "/a", true),
            ("/a", "/a/b", false),
            ("/*", "/a", true),
            ("/*", "", false),
            ("/*", "/a/b", false),
            ("/items/*/price", "/items/3/price", true),
            ("/items/*/price", "/items/price", false),
            ("/**", "", true),
            ("/**", "/a/b/c", true),
            ("/**/ts", "/ts", true),
            ("/**/ts", "/a/0/ts", true),
            ("/**/ts", "/a/0/ts/x", false),
            ("/a/**/c", "/a/c", true),
            ("/a/**/c", "/a/b/b/c", true),
            ("/a/**/c", "/a/b/c/d", false),
            ("/a/**/b/**/c", "/a/x/b/y/z/c", true),
            ("/a/**/b/**/c", "/a/x/c/y/z/b", false),
            ("/*/**", "", false),
            ("/a~1b", "/a~1b", true),
            ("/m~0n", "/m~0n", true),
            ("/m~0n", "/m~1n", false),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(
                pattern_matches(pattern, path),
                expected,
                "{pattern} vs {path}"
            );
        }
    }

    #[test]
    fn literal_segments_match_indices_canonically() {
        let p = Pattern::parse("/items/1").unwrap();
        assert!(p.matches(&[Seg::Key("items"), Seg::Index(1)]));
        assert!(!p.matches(&[Seg::Key("items"), Seg::Index(10)]));
        let p = Pattern::parse("/items/01").unwrap();
        assert!(!p.matches(&[Seg::Key("items"), Seg::Index(1)]));
        assert!(p.matches(&[Seg::Key("items"), Seg::Key("01")]));
    }

    #[test]
    fn and_below_adds_descendants() {
        let p = Pattern::parse("/meta").unwrap().and_below();
        assert!(p.matches(&[Seg::Key("meta")]));
        assert!(p.matches(&[Seg::Key("meta"), Seg::Index(0), Seg::Key("x")]));
        assert!(!p.matches(&[Seg::Key("metadata")]));
        assert!(
            Pattern::parse("")
                .unwrap()
                .and_below()
                .matches(&[Seg::Key("x")])
        );
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_hint() {
        for bad in ["items", "/a/~2", "/a~", "/item*", "/a/**/**", "/***"] {
            let err = Pattern::parse(bad).unwrap_err();
            assert!(!err.hint.is_empty(), "{bad}");
        }
        assert!(!pattern_matches("items", "/items"));
    }

    #[test]
    fn rendering_escapes_tilde_and_slash() {
        let path = [
            Seg::Key("a/b"),
            Seg::Index(2),
            Seg::Key("m~n"),
            Seg::Key(""),
        ];
        assert_eq!(render(&path), "/a~1b/2/m~0n/");
        assert_eq!(
            split_pointer("/a~1b/2/m~0n/").unwrap(),
            vec!["a/b", "2", "m~n", ""]
        );
        assert_eq!(split_pointer("a"), None);
    }

    #[test]
    fn generalize_replaces_indices() {
        assert_eq!(generalize("/items/3/price"), "/items/*/price");
        assert_eq!(generalize("/0/10/x01/01"), "/*/*/x01/01");
        assert_eq!(generalize(""), "");
        assert_eq!(generalize("/a~1b/-"), "/a~1b/-");
    }
}
