//! Validated routing rules: what a request is matched against and what the proxy acts on.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, Method, Uri};

use super::diag::Location;
use super::pattern::PathPattern;
use crate::compare::{Comparator, CompareSpec};
use crate::route::Index;

/// The two sides of a migration. Whichever is the authority answers the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Legacy,
    New,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Legacy => Side::New,
            Side::New => Side::Legacy,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Legacy => "legacy",
            Side::New => "new",
        }
    }

    /// 0 for legacy, 1 for new: the index of per-side arrays.
    pub fn index(self) -> usize {
        match self {
            Side::Legacy => 0,
            Side::New => 1,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Index of the built-in upstreams in [`RuleSet::upstreams`].
pub const LEGACY_UPSTREAM: usize = 0;
pub const NEW_UPSTREAM: usize = 1;

/// An upstream as the rules describe it. The proxy turns it into a live client.
#[derive(Debug, Clone)]
pub struct UpstreamDef {
    pub name: Arc<str>,
    /// `None` for `legacy` and `new`: their URLs come from `--legacy` / `--new`.
    pub url: Option<Uri>,
    pub connect_timeout: Option<Duration>,
    /// Time allowed until the upstream's response head arrives.
    pub timeout: Option<Duration>,
    /// Forward the client's `Host` (default) or use the upstream URL's authority.
    pub preserve_host: bool,
}

/// Where a cohort key (canary, shadow sampling) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CohortKey {
    Header(HeaderName),
    Cookie(Box<str>),
    Query(Box<str>),
    ClientIp,
}

impl fmt::Display for CohortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CohortKey::Header(name) => write!(f, "header:{name}"),
            CohortKey::Cookie(name) => write!(f, "cookie:{name}"),
            CohortKey::Query(name) => write!(f, "query:{name}"),
            CohortKey::ClientIp => f.write_str("client-ip"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Canary {
    /// Share of keys, 0..=100, that get the other side as authority.
    pub percent: f64,
    pub key: CohortKey,
}

/// `[route.shadow]`: which requests are mirrored to the other side.
#[derive(Debug, Clone)]
pub struct Shadow {
    /// Share of requests mirrored, 0..=1.
    pub sample: f64,
    /// Mirror non-safe methods too.
    pub writes: bool,
    /// Sample deterministically by this key instead of at random.
    pub key: Option<CohortKey>,
    /// Overrides the global shadow timeout.
    pub timeout: Option<Duration>,
    /// Share of compared safe requests sent to legacy a second time to learn noisy fields.
    pub noise_probe: f64,
}

/// `[[route.classify]]`: divergences whose differing paths all fall under `paths` get `class`
/// when they are recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyRule {
    pub class: Arc<str>,
    /// JSON Pointer patterns (`*` one segment, `**` any depth), or `status` / `header:NAME`.
    pub paths: Vec<Box<str>>,
}

impl ClassifyRule {
    /// Whether every one of a record's differing paths is covered by this rule.
    pub fn covers(&self, paths: &[String]) -> bool {
        !paths.is_empty()
            && paths.iter().all(|path| {
                self.paths.iter().any(|p| {
                    **p == **path
                        || (p.starts_with('/') && crate::compare::pattern_matches(p, path))
                })
            })
    }
}

/// `[route.gate]`: when the evidence says the new side may take authority.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// Comparisons needed in the window before any verdict but `insufficient-data`.
    pub min_samples: u64,
    /// Highest acceptable divergence rate (its 95% upper bound is compared).
    pub max_divergence_rate: f64,
    /// The evaluation window.
    pub window: Duration,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            min_samples: 1000,
            max_divergence_rate: 0.001,
            window: Duration::from_secs(24 * 3600),
        }
    }
}

/// `match.host`: an exact host name or `*.suffix`, compared without the port, case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(Box<str>),
    /// `*.example.com` stored as `.example.com`: any host ending with it.
    Suffix(Box<str>),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }

    /// Whether every host this matches is matched by `self`.
    pub fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a.eq_ignore_ascii_case(b),
            (HostMatch::Suffix(_), HostMatch::Exact(b)) => self.matches(b),
            (HostMatch::Suffix(a), HostMatch::Suffix(b)) => {
                b.to_ascii_lowercase().ends_with(&a.to_ascii_lowercase())
            }
            (HostMatch::Exact(_), HostMatch::Suffix(_)) => false,
        }
    }

    pub fn intersects(&self, other: &HostMatch) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    pub priority: i64,
    /// Position in precedence order: 0 wins over everything else.
    pub rank: u32,
    /// Where the route is defined; `None` for the built-in default route.
    pub location: Option<Location>,
    pub authority: Side,
    /// Upstreams playing `legacy` and `new` for this route (indices into [`RuleSet::upstreams`]).
    pub legacy: usize,
    pub new: usize,
    pub path: PathPattern,
    pub methods: Option<Vec<Method>>,
    pub host: Option<HostMatch>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub query: Vec<(Box<str>, Box<str>)>,
    pub canary: Option<Canary>,
    pub shadow: Option<Shadow>,
    /// `[route.compare]` as written (defaults when absent).
    pub compare: CompareSpec,
    /// The compiled comparison rules; present on routes with a `[route.shadow]`.
    pub comparator: Option<Arc<Comparator>>,
    pub gate: Gate,
    /// `[[route.classify]]` rules, first match wins.
    pub classify: Arc<[ClassifyRule]>,
    /// Largest request body (bytes); `None`: the global `--max-request-body`.
    pub max_request_body: Option<u64>,
}

impl Route {
    pub fn upstream(&self, side: Side) -> usize {
        match side {
            Side::Legacy => self.legacy,
            Side::New => self.new,
        }
    }

    /// The route requests fall back to when no rule matches: legacy, untouched.
    pub(crate) fn default_route() -> Route {
        Route {
            name: Arc::from("default"),
            priority: i64::MIN,
            rank: u32::MAX,
            location: None,
            authority: Side::Legacy,
            legacy: LEGACY_UPSTREAM,
            new: NEW_UPSTREAM,
            path: PathPattern::any(),
            methods: None,
            host: None,
            headers: Vec::new(),
            query: Vec::new(),
            canary: None,
            shadow: None,
            compare: CompareSpec::default(),
            comparator: None,
            gate: Gate::default(),
            classify: Arc::from(Vec::new()),
            max_request_body: None,
        }
    }
}

/// A complete, validated and compiled set of rules: what one reload publishes.
#[derive(Debug)]
pub struct RuleSet {
    /// Routes in precedence order (`routes[i].rank == i`).
    pub routes: Vec<Route>,
    pub default_route: Route,
    pub upstreams: Vec<UpstreamDef>,
    /// Files the rules were read from, in load order.
    pub sources: Vec<PathBuf>,
    pub loaded_at: SystemTime,
    pub(crate) index: Index,
}

impl RuleSet {
    pub fn route_by_name(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| &*r.name == name)
    }
}
