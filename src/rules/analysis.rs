//! Static checks over a valid rule set: routes that can never match, and routes of equal
//! priority that overlap (where only the order of appearance decides).

use super::diag::{Diagnostic, Location, Severity};
use super::model::Route;

/// Upper bound on routes analysed pairwise; beyond it the check is skipped with a note, as
/// the pairwise comparison grows quadratically.
const MAX_ANALYSED_ROUTES: usize = 5_000;

pub(super) fn warnings(routes: &[Route]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if routes.len() > MAX_ANALYSED_ROUTES {
        if let Some(loc) = routes.first().and_then(|r| r.location.as_ref()) {
            out.push(warning(
                loc,
                format!(
                    "{} routes: the check for unreachable and overlapping routes is skipped above {MAX_ANALYSED_ROUTES}",
                    routes.len()
                ),
                "split the rules and check the parts separately to analyse them",
            ));
        }
        return out;
    }
    for (j, later) in routes.iter().enumerate() {
        let Some(loc) = &later.location else { continue };
        // `routes` is in precedence order, so every earlier route wins over `later`.
        if let Some(winner) = routes[..j].iter().find(|w| covers(w, later)) {
            out.push(warning(
                loc,
                format!(
                    "route `{}` can never match: `{}`{} wins for every request it matches",
                    later.name,
                    winner.name,
                    at(winner)
                ),
                "narrow the covering route, or raise this route's priority",
            ));
            continue;
        }
        if let Some(other) = routes[..j]
            .iter()
            .find(|o| o.priority == later.priority && intersects(o, later))
        {
            out.push(warning(
                loc,
                format!(
                    "route `{}` overlaps `{}`{} at equal priority {}; the one written first wins",
                    later.name,
                    other.name,
                    at(other),
                    later.priority
                ),
                "give the more specific route a higher priority to make the intent explicit",
            ));
        }
    }
    // Report in file order, as a reader goes through the files.
    out.sort_by(|a, b| {
        let (a, b) = (&a.location, &b.location);
        (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col))
    });
    out
}

fn at(route: &Route) -> String {
    route
        .location
        .as_ref()
        .map(|l| format!(" ({l})"))
        .unwrap_or_default()
}

fn warning(loc: &Location, message: String, hint: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Warning,
        location: loc.clone(),
        message,
        hint: Some(hint.into()),
    }
}

/// Whether every request `b` matches is matched by `a` too (conditions of `a` are a subset).
fn covers(a: &Route, b: &Route) -> bool {
    let methods = match (&a.methods, &b.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(am), Some(bm)) => bm.iter().all(|m| am.contains(m)),
    };
    let host = match (&a.host, &b.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ah), Some(bh)) => ah.covers(bh),
    };
    methods
        && host
        && a.headers.iter().all(|h| b.headers.contains(h))
        && a.query.iter().all(|q| b.query.contains(q))
        && a.path.covers(&b.path)
}

/// Whether some request matches both routes.
fn intersects(a: &Route, b: &Route) -> bool {
    let methods = match (&a.methods, &b.methods) {
        (Some(am), Some(bm)) => am.iter().any(|m| bm.contains(m)),
        _ => true,
    };
    let host = match (&a.host, &b.host) {
        (Some(ah), Some(bh)) => ah.intersects(bh),
        _ => true,
    };
    let headers = a
        .headers
        .iter()
        .all(|(k, v)| b.headers.iter().all(|(bk, bv)| bk != k || bv == v));
    let query = a
        .query
        .iter()
        .all(|(k, v)| b.query.iter().all(|(bk, bv)| bk != k || bv == v));
    methods && host && headers && query && a.path.intersects(&b.path)
}
