//! Path patterns: exact paths, templates (`{name}` for one segment, trailing `/**` for the rest)
//! and string prefixes, all normalised to one shape so that matching, the route index and the
//! overlap analysis of `rules check` share a single definition.
//!
//! A request path `/a/b` is seen as the segments `["a", "b"]`; `/` is `[""]` and `/a/` is
//! `["a", ""]`. Matching is case-sensitive and works on the path as received (no decoding).

use std::fmt;

/// One segment condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// Exactly this text.
    Lit(Box<str>),
    /// `{name}`: any non-empty segment.
    Param(Box<str>),
    /// Last segment of a `path_prefix`: a segment starting with this text (possibly empty).
    StartsWith(Box<str>),
}

/// A compiled path condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    /// The pattern as written in the rules, for messages.
    pub source: Box<str>,
    pub segs: Vec<Seg>,
    /// Any number (zero or more) of further segments may follow `segs`.
    pub open: bool,
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Iterates the segments of a request path as defined in the module docs.
pub fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

impl PathPattern {
    /// The pattern that matches every path (a route without a path condition).
    pub fn any() -> Self {
        Self {
            source: "/**".into(),
            segs: Vec::new(),
            open: true,
        }
    }

    /// Parses `match.path`: an exact path or a template. On error returns a message and a hint.
    pub fn template(source: &str) -> Result<Self, (String, String)> {
        check_common(source, "path")?;
        let mut segs = Vec::new();
        let mut open = false;
        let parts: Vec<&str> = segments(source).collect();
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if *part == "**" {
                if i + 1 != parts.len() {
                    return Err((
                        format!("`**` may only be the last segment of a path template: `{source}`"),
                        "use `{name}` for one segment in the middle, `/**` at the end for the rest"
                            .into(),
                    ));
                }
                open = true;
            } else if part.contains(['{', '}']) {
                let name = part
                    .strip_prefix('{')
                    .and_then(|p| p.strip_suffix('}'))
                    .filter(|n| is_identifier(n))
                    .ok_or_else(|| {
                        (
                            format!("bad template segment `{part}` in `{source}`"),
                            "a segment is either literal text or a whole `{name}` (letters, digits, `_`)"
                                .to_string(),
                        )
                    })?;
                if names.contains(&name) {
                    return Err((
                        format!("parameter `{{{name}}}` appears twice in `{source}`"),
                        "give each `{name}` in a template a distinct name".into(),
                    ));
                }
                names.push(name);
                segs.push(Seg::Param(name.into()));
            } else if part.contains('*') {
                return Err((
                    format!("bad template segment `{part}` in `{source}`"),
                    "`*` is not a wildcard here: use `{name}` for one segment or a trailing `/**`"
                        .into(),
                ));
            } else {
                segs.push(Seg::Lit((*part).into()));
            }
        }
        check_canonical(source, "path", false)?;
        Ok(Self {
            source: source.into(),
            segs,
            open,
        })
    }

    /// Parses `match.path_prefix`: a plain string prefix of the path.
    pub fn prefix(source: &str) -> Result<Self, (String, String)> {
        check_common(source, "path_prefix")?;
        if source.contains(['{', '}']) {
            return Err((
                format!("`path_prefix` is plain text, `{source}` has a template"),
                "use `path = \"/a/{id}/**\"` to combine templates with a prefix".into(),
            ));
        }
        check_canonical(source, "path_prefix", true)?;
        let mut segs: Vec<Seg> = segments(source).map(|s| Seg::Lit(s.into())).collect();
        // `segments` always yields at least one item: the partial last segment.
        if let Some(Seg::Lit(last)) = segs.pop() {
            segs.push(Seg::StartsWith(last));
        }
        Ok(Self {
            source: source.into(),
            segs,
            open: true,
        })
    }

    /// Whether `path` matches. Used by `rules explain` and as the reference for the route index.
    pub fn matches(&self, path: &str) -> bool {
        // `*` (OPTIONS) and an empty path are not paths: only "any path" takes them.
        if !path.starts_with('/') {
            return self.segs.is_empty() && self.open;
        }
        let mut parts = segments(path);
        for seg in &self.segs {
            match parts.next() {
                Some(part) if seg_matches(seg, part) => {}
                _ => return false,
            }
        }
        self.open || parts.next().is_none()
    }

    /// Whether every path matched by `other` is matched by `self`.
    pub fn covers(&self, other: &PathPattern) -> bool {
        let lengths_fit = match (self.open, other.open) {
            (false, false) => self.segs.len() == other.segs.len(),
            (true, _) => self.segs.len() <= other.segs.len(),
            (false, true) => false,
        };
        lengths_fit
            && self
                .segs
                .iter()
                .zip(&other.segs)
                .all(|(a, b)| seg_covers(a, b))
    }

    /// Whether some path is matched by both patterns.
    pub fn intersects(&self, other: &PathPattern) -> bool {
        let lengths_fit = match (self.open, other.open) {
            (false, false) => self.segs.len() == other.segs.len(),
            (true, false) => self.segs.len() <= other.segs.len(),
            (false, true) => other.segs.len() <= self.segs.len(),
            (true, true) => true,
        };
        lengths_fit
            && self
                .segs
                .iter()
                .zip(&other.segs)
                .all(|(a, b)| seg_intersects(a, b))
    }
}

fn check_common(source: &str, key: &str) -> Result<(), (String, String)> {
    if !source.starts_with('/') {
        return Err((
            format!("`{key}` must start with `/`, got `{source}`"),
            format!("write `{key} = \"/{}\"`", source.trim_start_matches('/')),
        ));
    }
    if source.contains(['?', '#']) {
        return Err((
            format!("`{key}` must not contain a query or fragment: `{source}`"),
            "put query conditions in `match.query`".into(),
        ));
    }
    Ok(())
}

/// Requests are matched in their canonical form (`route::path::normalize`), so a pattern
/// in another spelling of a path could never match: reject it, naming the canonical form.
/// A prefix is a string prefix, so it is checked as the start of a longer path, and a
/// trailing incomplete escape (`/a/%2`) is allowed.
fn check_canonical(source: &str, key: &str, prefix: bool) -> Result<(), (String, String)> {
    let (body, tail) = if prefix {
        let b = source.as_bytes();
        let n = b.len();
        let cut = if n >= 1 && b[n - 1] == b'%' {
            n - 1
        } else if n >= 2 && b[n - 2] == b'%' && b[n - 1].is_ascii_hexdigit() {
            n - 2
        } else {
            n
        };
        (&source[..cut], &source[cut..])
    } else {
        (source, "")
    };
    let probe = if prefix {
        format!("{body}x")
    } else {
        body.to_string()
    };
    match crate::route::path::normalize(&probe) {
        Ok(std::borrow::Cow::Borrowed(_)) => Ok(()),
        Ok(std::borrow::Cow::Owned(canonical)) => {
            let canonical = if prefix {
                format!(
                    "{}{tail}",
                    canonical.strip_suffix('x').unwrap_or(&canonical)
                )
            } else {
                canonical
            };
            Err((
                format!("`{key}` `{source}` is not in canonical form, so no request can match it"),
                format!("requests are matched in canonical form; write `{key} = \"{canonical}\"`"),
            ))
        }
        Err(e) => Err((
            format!("`{key}` `{source}` can never match: {e}"),
            "ficus refuses such request paths with 400 bad_path".into(),
        )),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn seg_matches(seg: &Seg, part: &str) -> bool {
    match seg {
        Seg::Lit(lit) => **lit == *part,
        Seg::Param(_) => !part.is_empty(),
        Seg::StartsWith(prefix) => part.starts_with(&**prefix),
    }
}

fn seg_covers(a: &Seg, b: &Seg) -> bool {
    match (a, b) {
        (Seg::Param(_), Seg::Lit(l)) => !l.is_empty(),
        (Seg::Param(_), Seg::Param(_)) => true,
        (Seg::Param(_), Seg::StartsWith(p)) => !p.is_empty(),
        (Seg::Lit(x), Seg::Lit(y)) => x == y,
        (Seg::Lit(_), _) => false,
        (Seg::StartsWith(p), Seg::Lit(l)) => l.starts_with(&**p),
        (Seg::StartsWith(p), Seg::Param(_)) => p.is_empty(),
        (Seg::StartsWith(p), Seg::StartsWith(q)) => q.starts_with(&**p),
    }
}

fn seg_intersects(a: &Seg, b: &Seg) -> bool {
    match (a, b) {
        (Seg::Param(_), Seg::Param(_) | Seg::StartsWith(_)) => true,
        (Seg::StartsWith(_), Seg::Param(_)) => true,
        (Seg::Param(_), Seg::Lit(l)) | (Seg::Lit(l), Seg::Param(_)) => !l.is_empty(),
        (Seg::Lit(x), Seg::Lit(y)) => x == y,
        (Seg::Lit(l), Seg::StartsWith(p)) | (Seg::StartsWith(p), Seg::Lit(l)) => {
            l.starts_with(&**p)
        }
        (Seg::StartsWith(p), Seg::StartsWith(q)) => p.starts_with(&**q) || q.starts_with(&**p),
    }
}

#[cfg(test)]
mod tests;
