//! Status and header comparison.

use http::{HeaderMap, HeaderName};

use super::Difference;

/// A status difference, unless the codes are equal or share an equivalence group.
pub(super) fn status(groups: &[Vec<u16>], old: u16, value: u16) -> Option<Difference> {
    let equivalent = old == value
        || groups
            .iter()
            .any(|g| g.contains(&old) && g.contains(&value));
    (!equivalent).then_some(Difference::Status { old, value })
}

/// Compares the listed headers: `content-type` by media type (parameters such as `charset`
/// and letter case do not count), the others by exact value with all values joined by `", "`.
pub(super) fn headers(
    names: &[HeaderName],
    legacy: &HeaderMap,
    new: &HeaderMap,
    out: &mut Vec<Difference>,
) {
    for name in names {
        // Byte-equal values are equal under either rule, and they are the common case.
        if legacy.get_all(name).iter().eq(new.get_all(name).iter()) {
            continue;
        }
        let (old, value) = (joined(legacy, name), joined(new, name));
        let same = if name == http::header::CONTENT_TYPE {
            old.as_deref().map(media_type) == value.as_deref().map(media_type)
        } else {
            old == value
        };
        if !same {
            out.push(Difference::Header {
                path: name.as_str().to_owned(),
                old,
                value,
            });
        }
    }
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for v in values {
        out.push_str(", ");
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(out)
}

/// The media type of a `Content-Type` value, lowercase, without parameters:
/// `Application/JSON; charset=utf-8` -> `application/json`.
pub(super) fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}
