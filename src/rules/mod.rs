//! Routing rules: read every `*.toml` under the rules path, validate them into a [`RuleSet`]
//! (with file:line:col diagnostics), compile the route index, and watch for changes.
//!
//! Loading is all-or-nothing: a set with any error is rejected whole, so the rules in force
//! are always a set that passed validation.

mod analysis;
pub mod diag;
mod model;
pub mod pattern;
mod raw;
pub mod watch;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, Method, Uri};
use toml::Spanned;

use crate::compare::{Comparator, CompareSpec};
use diag::SourceMap;
pub use diag::{Diagnostic, Location, Severity};
pub use model::*;
use pattern::PathPattern;
use raw::{RawCompare, RawFile, RawRoute, RawUpstream};

/// A successfully loaded rule set, with the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub rules: RuleSet,
    pub warnings: Vec<Diagnostic>,
}

/// Loads and validates the rules at `path` (a file or a directory of `*.toml` files), reading
/// environment variables from the process environment.
pub fn load(path: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// Parses `1048576`, `512KiB`, `64MiB` or `1GiB` (rules and command-line sizes).
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("bad size `{raw}`: write e.g. 1048576, 512KiB, 64MiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "K" | "k" => 10,
        "MiB" | "M" | "m" => 20,
        "GiB" | "G" | "g" => 30,
        other => return Err(format!("bad size unit `{other}`: use KiB, MiB or GiB")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size `{raw}` is too large"))
}

/// Like [`load`], with the environment given as a function (tests, tools).
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Vec<Diagnostic>> {
    read(path).load(env)
}

/// The rules files at a path as read from disk, before validation: what a load sees.
#[derive(Debug)]
pub struct Sources {
    /// `(file, text)` in load order, or why the path could not be listed.
    files: Result<Vec<(PathBuf, String)>, Vec<Diagnostic>>,
    /// Files that were listed but could not be read.
    unreadable: Vec<Diagnostic>,
}

/// Reads every rules file at `path` (see [`rule_files`]), keeping read errors for the load.
pub fn read(path: &Path) -> Sources {
    let files = match rule_files(path) {
        Ok(files) => files,
        Err(errors) => {
            return Sources {
                files: Err(errors),
                unreadable: Vec::new(),
            };
        }
    };
    let mut unreadable = Vec::new();
    let mut sources = Vec::new();
    for file in files {
        match read_rules_file(&file) {
            Ok(text) => sources.push((file, text)),
            Err(message) => unreadable.push(Diagnostic {
                severity: Severity::Error,
                location: diag::file_location(&file),
                message,
                hint: None,
            }),
        }
    }
    Sources {
        files: Ok(sources),
        unreadable,
    }
}

impl Sources {
    /// A digest of what was read: the files' names and texts, and the read errors. Two reads
    /// with the same digest load the same rules (the environment of the process does not
    /// change), so the file watch skips a reload that would only repeat the last one.
    pub fn fingerprint(&self) -> u128 {
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        // Lengths first, so that no two different lists hash the same bytes.
        let mut put = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        match &self.files {
            Ok(files) => {
                put(b"files");
                for (file, text) in files {
                    put(file.as_os_str().as_encoded_bytes());
                    put(text.as_bytes());
                }
            }
            Err(errors) => {
                put(b"unlisted");
                for e in errors {
                    put(e.to_string().as_bytes());
                }
            }
        }
        for e in &self.unreadable {
            put(e.to_string().as_bytes());
        }
        h.digest128()
    }

    /// Validates and compiles what was read (see [`load_sources`]).
    pub fn load(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, Vec<Diagnostic>> {
        let mut errors = self.unreadable;
        let sources = match self.files {
            Ok(sources) => sources,
            Err(mut unlisted) => {
                unlisted.append(&mut errors);
                return Err(unlisted);
            }
        };
        match load_sources(sources, env) {
            Err(mut more) => {
                errors.append(&mut more);
                Err(errors)
            }
            Ok(_) if !errors.is_empty() => Err(errors),
            Ok(loaded) => Ok(loaded),
        }
    }
}

/// The longest readiness window: the Redis store reads at most this many days of hourly
/// counts in one round trip, and both stores must give the same evidence for the same rules.
pub const MAX_GATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(62 * 24 * 3600);

/// The largest rules file read. Reloads are serialised and read files whole, so a runaway
/// generator's output must not take the memory or the time of every later reload.
pub const MAX_RULES_FILE_BYTES: u64 = 16 << 20;

/// Reads one rules file: a regular file (a FIFO or a device named `*.toml` would block the
/// reload, and every one after it, for ever) of at most [`MAX_RULES_FILE_BYTES`].
fn read_rules_file(file: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read rules file: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file: rules files must be plain files".into());
    }
    let mut text = String::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_RULES_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read rules file: {e}"))?;
    if text.len() as u64 > MAX_RULES_FILE_BYTES {
        return Err(format!(
            "rules file larger than {} MiB: split it, or check what wrote it",
            MAX_RULES_FILE_BYTES >> 20
        ));
    }
    Ok(text)
}

/// Validates and compiles rules from in-memory sources `(file name, text)`, in load order.
pub fn load_sources(
    sources: Vec<(PathBuf, String)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    let files: Vec<PathBuf> = sources.iter().map(|(f, _)| f.clone()).collect();
    for (file, text) in &sources {
        let map = SourceMap::new(file, text);
        match toml::from_str::<RawFile>(text) {
            Ok(raw) => parsed.push((map, raw)),
            Err(e) => errors.push(parse_error(&map, &e)),
        }
    }

    let mut builder = Builder {
        env,
        errors,
        upstreams: vec![builtin_upstream("legacy"), builtin_upstream("new")],
        upstream_names: HashMap::from([
            (Arc::from("legacy"), LEGACY_UPSTREAM),
            (Arc::from("new"), NEW_UPSTREAM),
        ]),
        upstream_defined: HashMap::new(),
        routes: Vec::new(),
        route_names: HashMap::new(),
    };
    // Upstreams first: a route may name an upstream defined in a later file.
    for (map, raw) in &parsed {
        for (name, value) in &raw.upstreams {
            builder.add_upstream(map, name, value);
        }
    }
    for (map, raw) in parsed {
        for route in raw.route {
            builder.add_route(&map, route);
        }
    }
    if !builder.errors.is_empty() {
        let mut errors = builder.errors;
        // In file order, as a reader goes through the files (stable for equal locations).
        errors.sort_by(|a, b| {
            let (a, b) = (&a.location, &b.location);
            (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col))
        });
        return Err(errors);
    }

    let mut routes = builder.routes;
    // Precedence: higher priority first; ties keep the order of appearance (stable sort).
    routes.sort_by_key(|r| std::cmp::Reverse(r.priority));
    for (rank, route) in routes.iter_mut().enumerate() {
        route.rank = u32::try_from(rank).unwrap_or(u32::MAX);
    }
    let warnings = analysis::warnings(&routes);
    let index = crate::route::Index::build(&routes);
    Ok(Loaded {
        rules: RuleSet {
            routes,
            default_route: Route::default_route(),
            upstreams: builder.upstreams,
            sources: files,
            loaded_at: SystemTime::now(),
            index,
        },
        warnings,
    })
}

/// The files a rules path stands for: the file itself, or every `*.toml` below the directory
/// (recursively, hidden files skipped) in path order.
pub fn rule_files(path: &Path) -> Result<Vec<PathBuf>, Vec<Diagnostic>> {
    let fail = |message: String, hint: Option<&str>| {
        vec![Diagnostic {
            severity: Severity::Error,
            location: diag::file_location(path),
            message,
            hint: hint.map(str::to_string),
        }]
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        fail(
            format!("cannot read rules path: {e}"),
            Some("give a *.toml file or a directory of them"),
        )
    })?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut unfollowed = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    // Symlinked directories are followed once: a link loop must not hang a reload.
    let mut visited = std::collections::HashSet::new();
    while let Some(dir) = dirs.pop() {
        if !visited.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
            continue;
        }
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| fail(format!("cannot list {}: {e}", dir.display()), None))?;
        for entry in entries {
            // An entry the listing could not read may be a rules file: loading without it
            // would drop its routes.
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    return Err(fail(format!("cannot list {}: {e}", dir.display()), None));
                }
            };
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Followed through symlinks. A link that cannot be followed (its target gone
            // for a moment during a checkout or a remount) may stand for a directory of
            // rules: skipping it would install the set without that directory's routes.
            match std::fs::metadata(&p) {
                Ok(meta) if meta.is_dir() => dirs.push(p),
                _ if p.extension().is_some_and(|e| e == "toml") => files.push(p),
                Ok(_) => {}
                Err(e) => unfollowed.push(Diagnostic {
                    severity: Severity::Error,
                    location: diag::file_location(&p),
                    message: if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                        format!("cannot follow the link: {e}")
                    } else {
                        format!("cannot read: {e}")
                    },
                    hint: Some(
                        "fix or remove the link; rules files and directories must be readable"
                            .into(),
                    ),
                }),
            }
        }
    }
    if !unfollowed.is_empty() {
        unfollowed.sort_by(|a, b| a.location.file.cmp(&b.location.file));
        return Err(unfollowed);
    }
    if files.is_empty() {
        return Err(fail(
            "no *.toml rules files found".into(),
            Some(
                "an empty rule set would send everything to legacy; add a file with [[route]] entries",
            ),
        ));
    }
    files.sort();
    Ok(files)
}

fn parse_error(map: &SourceMap, e: &toml::de::Error) -> Diagnostic {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().to_string();
    let hint = if message.contains("untagged enum RawUpstream") {
        Some(
            "an upstream is a URL string, or a table { url, connect_timeout, timeout, preserve_host }"
                .to_string(),
        )
    } else if message.starts_with("unknown field") {
        Some("check the spelling against docs/routing-rules.md".to_string())
    } else if message.contains("missing field `name`") {
        Some("every [[route]] needs a `name`".to_string())
    } else if message.contains("missing field") {
        Some("see docs/routing-rules.md for the required keys of this table".to_string())
    } else {
        None
    };
    let message = message.replace("untagged enum RawUpstream", "an upstream");
    map.error(&span, message, hint)
}

fn builtin_upstream(name: &str) -> UpstreamDef {
    UpstreamDef {
        name: Arc::from(name),
        url: None,
        connect_timeout: None,
        timeout: None,
        preserve_host: true,
    }
}

struct Builder<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    errors: Vec<Diagnostic>,
    upstreams: Vec<UpstreamDef>,
    upstream_names: HashMap<Arc<str>, usize>,
    /// Where each upstream of the rules files is defined (duplicates are errors).
    upstream_defined: HashMap<String, Location>,
    routes: Vec<Route>,
    route_names: HashMap<Arc<str>, Location>,
}

impl Builder<'_> {
    fn error(&mut self, map: &SourceMap, span: &Range<usize>, msg: String, hint: Option<String>) {
        self.errors.push(map.error(span, msg, hint));
    }

    fn add_upstream(&mut self, map: &SourceMap, name: &str, value: &Spanned<RawUpstream>) {
        let span = value.span();
        let (url, connect_timeout, timeout, preserve_host) = match value.get_ref() {
            RawUpstream::Url(url) => (Some(url.as_str()), None, None, None),
            RawUpstream::Table(t) => (
                t.url.as_deref(),
                t.connect_timeout.as_deref(),
                t.timeout.as_deref(),
                t.preserve_host,
            ),
        };
        if let Some(first) = self.upstream_defined.get(name) {
            let first = first.clone();
            return self.error(
                map,
                &span,
                format!("upstream `{name}` is defined twice, first at {first}"),
                Some("upstream names are shared by all rules files; keep one definition".into()),
            );
        }
        self.upstream_defined
            .insert(name.to_string(), map.locate(&span));
        let builtin = match name {
            "legacy" => Some(LEGACY_UPSTREAM),
            "new" => Some(NEW_UPSTREAM),
            _ => None,
        };
        let url = match (builtin, url) {
            (Some(_), Some(_)) => {
                self.error(
                    map,
                    &span,
                    format!("the URL of `{name}` comes from --{name}, not from the rules"),
                    Some(format!(
                        "drop the URL; a table `{name} = {{ timeout = \"10s\" }}` may set its timeouts"
                    )),
                );
                None
            }
            (Some(_), None) => None,
            (None, None) => {
                self.error(
                    map,
                    &span,
                    format!("upstream `{name}` has no URL"),
                    Some(format!("write `{name} = \"http://host:port\"`")),
                );
                None
            }
            (None, Some(url)) => match self.upstream_url(url) {
                Ok(uri) => Some(uri),
                Err((msg, hint)) => {
                    self.error(map, &span, msg, Some(hint));
                    None
                }
            },
        };
        let connect_timeout = connect_timeout.and_then(|d| self.duration(map, &span, d));
        let timeout = timeout.and_then(|d| self.duration(map, &span, d));
        let def = UpstreamDef {
            name: Arc::from(name),
            url,
            connect_timeout,
            timeout,
            preserve_host: preserve_host.unwrap_or(true),
        };
        match builtin {
            Some(i) => {
                let slot = &mut self.upstreams[i];
                slot.connect_timeout = def.connect_timeout;
                slot.timeout = def.timeout;
                slot.preserve_host = def.preserve_host;
            }
            // Registered even when invalid, so that routes naming it do not pile up
            // "unknown upstream" errors on top of the real one.
            None => {
                self.upstream_names
                    .insert(def.name.clone(), self.upstreams.len());
                self.upstreams.push(def);
            }
        }
    }

    fn upstream_url(&self, raw: &str) -> Result<Uri, (String, String)> {
        let url = expand_env(raw, self.env)?;
        parse_upstream_url(&url)
    }

    fn duration(&mut self, map: &SourceMap, span: &Range<usize>, raw: &str) -> Option<Duration> {
        match humantime::parse_duration(raw) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.error(map, span, "a timeout must be positive".into(), None);
                None
            }
            Err(e) => {
                self.error(
                    map,
                    span,
                    format!("bad duration `{raw}`: {e}"),
                    Some("write e.g. \"500ms\", \"5s\" or \"2m\"".into()),
                );
                None
            }
        }
    }

    fn upstream_ref(
        &mut self,
        map: &SourceMap,
        raw: Option<&Spanned<String>>,
        default: usize,
    ) -> usize {
        let Some(raw) = raw else { return default };
        match self.upstream_names.get(raw.get_ref().as_str()) {
            Some(&i) => i,
            None => {
                let mut known: Vec<&str> = self.upstream_names.keys().map(|k| &**k).collect();
                known.sort_unstable();
                self.error(
                    map,
                    &raw.span(),
                    format!("unknown upstream `{}`", raw.get_ref()),
                    Some(format!(
                        "define it under [upstreams]; known upstreams: {}",
                        known.join(", ")
                    )),
                );
                default
            }
        }
    }

    fn add_route(&mut self, map: &SourceMap, raw: RawRoute) {
        let errors_before = self.errors.len();
        let name_span = raw.name.span();
        let name: Arc<str> = Arc::from(raw.name.get_ref().as_str());
        let location = map.locate(&name_span);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.error(
                map,
                &name_span,
                format!("bad route name `{name}`"),
                Some(
                    "use letters, digits, `-`, `_` and `.` (names appear in metrics and URLs)"
                        .into(),
                ),
            );
        } else if &*name == "default" {
            self.error(
                map,
                &name_span,
                "`default` is the built-in route for unmatched requests".into(),
                Some("choose another name".into()),
            );
        } else if let Some(first) = self.route_names.get(&name) {
            let first = first.clone();
            self.error(
                map,
                &name_span,
                format!("duplicate route name `{name}`, first defined at {first}"),
                Some("route names must be unique across all rules files".into()),
            );
        } else {
            self.route_names.insert(name.clone(), location.clone());
        }

        let authority = match raw
            .authority
            .as_ref()
            .map(|a| (a.get_ref().as_str(), a.span()))
        {
            None | Some(("legacy", _)) => Side::Legacy,
            Some(("new", _)) => Side::New,
            Some((other, span)) => {
                self.error(
                    map,
                    &span,
                    format!("unknown authority `{other}`"),
                    Some("authority is \"legacy\" or \"new\"".into()),
                );
                Side::Legacy
            }
        };
        let legacy = self.upstream_ref(map, raw.legacy.as_ref(), LEGACY_UPSTREAM);
        let new = self.upstream_ref(map, raw.new.as_ref(), NEW_UPSTREAM);

        let m = raw.matcher;
        let path = match (&m.path, &m.path_prefix) {
            (Some(_), Some(prefix)) => {
                self.error(
                    map,
                    &prefix.span(),
                    "`path` and `path_prefix` are exclusive".into(),
                    Some("keep one; `path = \"/a/**\"` matches /a and everything under it".into()),
                );
                None
            }
            (Some(p), None) => self.pattern(map, p, PathPattern::template),
            (None, Some(p)) => self.pattern(map, p, PathPattern::prefix),
            (None, None) => Some(PathPattern::any()),
        };
        let methods = m.methods.as_ref().map(|methods| {
            if methods.get_ref().is_empty() {
                self.error(
                    map,
                    &methods.span(),
                    "`methods` is empty, so the route could never match".into(),
                    Some("list methods, or remove `methods` to match any".into()),
                );
            }
            let mut out = Vec::new();
            for method in methods.get_ref() {
                let upper = method.get_ref().to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(m) if !upper.is_empty() => out.push(m),
                    _ => self.error(
                        map,
                        &method.span(),
                        format!("bad method `{}`", method.get_ref()),
                        Some("e.g. \"GET\", \"POST\"".into()),
                    ),
                }
            }
            out
        });
        let host = m.host.as_ref().and_then(|h| self.host(map, h));
        let mut headers = Vec::new();
        for (k, v) in m.headers.iter().flatten() {
            let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes());
            let value = HeaderValue::from_str(v.get_ref());
            match (name, value) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                (Err(_), _) => self.error(
                    map,
                    &v.span(),
                    format!("bad header name `{k}`"),
                    Some("header names are tokens such as \"x-tenant\"".into()),
                ),
                (_, Err(_)) => self.error(
                    map,
                    &v.span(),
                    format!("bad value for header `{k}`"),
                    Some("header values are visible ASCII".into()),
                ),
            }
        }
        let query = m
            .query
            .iter()
            .flatten()
            .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.get_ref().as_str())))
            .collect();

        let canary = raw.canary.and_then(|c| {
            let percent = *c.percent.get_ref();
            if !(0.0..=100.0).contains(&percent) {
                self.error(
                    map,
                    &c.percent.span(),
                    format!("canary percent {percent} is outside 0..100"),
                    Some("`percent = 5.0` moves 5% of keys to the other side".into()),
                );
            }
            let key = match &c.key {
                Some(k) => self.cohort_key(map, k)?,
                None => CohortKey::ClientIp,
            };
            Some(Canary { percent, key })
        });
        let shadow = raw.shadow.and_then(|s| {
            let sample = s.sample.as_ref().map_or(1.0, |v| *v.get_ref());
            if let Some(v) = &s.sample
                && !(0.0..=1.0).contains(&sample)
            {
                self.error(
                    map,
                    &v.span(),
                    format!("shadow sample {sample} is outside 0..1"),
                    Some("`sample = 0.1` mirrors one request in ten".into()),
                );
            }
            let noise_probe = s.noise_probe.as_ref().map_or(0.0, |v| *v.get_ref());
            if let Some(v) = &s.noise_probe
                && !(0.0..=1.0).contains(&noise_probe)
            {
                self.error(
                    map,
                    &v.span(),
                    format!("noise_probe {noise_probe} is outside 0..1"),
                    Some(
                        "`noise_probe = 0.05` asks legacy twice for 5% of compared requests".into(),
                    ),
                );
            }
            let key = match &s.key {
                Some(k) => Some(self.cohort_key(map, k)?),
                None => None,
            };
            let timeout = s
                .timeout
                .as_ref()
                .and_then(|t| self.duration(map, &t.span(), t.get_ref()));
            Some(Shadow {
                sample,
                writes: s.writes.unwrap_or(false),
                key,
                timeout,
                noise_probe,
            })
        });
        let mut gate = Gate::default();
        if let Some(g) = &raw.gate {
            if let Some(n) = g.min_samples {
                gate.min_samples = n;
            }
            if let Some(rate) = &g.max_divergence_rate {
                let r = *rate.get_ref();
                if (0.0..=1.0).contains(&r) {
                    gate.max_divergence_rate = r;
                } else {
                    self.error(
                        map,
                        &rate.span(),
                        format!("max_divergence_rate {r} is outside 0..1"),
                        Some(
                            "`max_divergence_rate = 0.001` allows one divergence in a thousand"
                                .into(),
                        ),
                    );
                }
            }
            if let Some(w) = &g.window
                && let Some(d) = self.duration(map, &w.span(), w.get_ref())
            {
                if d > MAX_GATE_WINDOW {
                    self.error(
                        map,
                        &w.span(),
                        format!("gate window `{}` is longer than 62 days", w.get_ref()),
                        Some(
                            "the verdict reads at most 62 days of hourly counts (on Redis as on SQLite); use e.g. window = \"7d\""
                                .into(),
                        ),
                    );
                }
                gate.window = d.min(MAX_GATE_WINDOW);
            }
        }
        let mut classify = Vec::new();
        for rule in &raw.classify {
            let class = rule.class.get_ref().trim();
            if class.is_empty() {
                self.error(
                    map,
                    &rule.class.span(),
                    "empty class".into(),
                    Some("name the class, e.g. \"benign-timing\"".into()),
                );
                continue;
            }
            if rule.paths.get_ref().is_empty() {
                self.error(
                    map,
                    &rule.paths.span(),
                    "`paths` is empty, so the rule could never apply".into(),
                    Some("list JSON Pointer patterns such as \"/meta/**\"".into()),
                );
                continue;
            }
            let mut paths = Vec::new();
            for p in rule.paths.get_ref() {
                let text = p.get_ref();
                let valid = text == "status"
                    || text.strip_prefix("header:").is_some_and(|h| !h.is_empty())
                    || (text.starts_with('/')
                        && CompareSpec {
                            ignore: vec![text.clone()],
                            ..CompareSpec::default()
                        }
                        .compile()
                        .is_ok());
                if valid {
                    // Differences name headers in lower case; names in rules are
                    // case-insensitive.
                    match text.strip_prefix("header:") {
                        Some(name) => {
                            paths.push(format!("header:{}", name.to_ascii_lowercase()).into());
                        }
                        None => paths.push(text.as_str().into()),
                    }
                } else {
                    self.error(
                        map,
                        &p.span(),
                        format!("bad classify path `{text}`"),
                        Some("a JSON Pointer pattern (\"/items/*/etag\", \"/meta/**\"), `status` or `header:NAME`".into()),
                    );
                }
            }
            classify.push(ClassifyRule {
                class: Arc::from(class),
                paths,
            });
        }
        let (compare, comparator) = self.compare(map, raw.compare.as_ref());
        let comparator = comparator.filter(|_| shadow.is_some()).map(Arc::new);
        let max_request_body =
            raw.max_request_body
                .as_ref()
                .and_then(|size| match parse_size(size.get_ref()) {
                    Ok(n) if n > 0 => Some(n as u64),
                    Ok(_) => {
                        self.error(
                            map,
                            &size.span(),
                            "max_request_body must be positive".into(),
                            None,
                        );
                        None
                    }
                    Err(e) => {
                        self.error(
                            map,
                            &size.span(),
                            e,
                            Some("write e.g. \"10MiB\" or \"512KiB\"".into()),
                        );
                        None
                    }
                });

        if self.errors.len() != errors_before {
            return;
        }
        let Some(path) = path else { return };
        self.routes.push(Route {
            name,
            priority: raw.priority.unwrap_or(0),
            rank: 0,
            location: Some(location),
            authority,
            legacy,
            new,
            path,
            methods,
            host,
            headers,
            query,
            canary,
            shadow,
            compare,
            comparator,
            gate,
            classify: classify.into(),
            max_request_body,
        });
    }

    /// Builds and compiles `[route.compare]`; errors point at the offending entry when it
    /// is known, else at the table.
    fn compare(
        &mut self,
        map: &SourceMap,
        raw: Option<&Spanned<RawCompare>>,
    ) -> (CompareSpec, Option<Comparator>) {
        let Some(raw) = raw else {
            let spec = CompareSpec::default();
            let compiled = spec.compile().ok();
            return (spec, compiled);
        };
        let table = raw.span();
        let c = raw.get_ref();
        let strings = |v: &Option<Vec<Spanned<String>>>| -> Vec<String> {
            v.iter().flatten().map(|s| s.get_ref().clone()).collect()
        };
        let spec = CompareSpec {
            ignore: strings(&c.ignore),
            unordered: strings(&c.unordered),
            array_keys: c
                .array_keys
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            headers: strings(&c.headers),
            status_equivalent: c.status_equivalent.clone().unwrap_or_default(),
            numeric_tolerance: c.numeric_tolerance,
            redact: strings(&c.redact),
            redact_query: strings(&c.redact_query),
            ..CompareSpec::default()
        };
        match spec.compile() {
            Ok(compiled) => (spec, Some(compiled)),
            Err(errors) => {
                for e in errors {
                    let element = match e.field {
                        "ignore" => c.ignore.as_ref(),
                        "unordered" => c.unordered.as_ref(),
                        "headers" => c.headers.as_ref(),
                        "redact" => c.redact.as_ref(),
                        "redact_query" => c.redact_query.as_ref(),
                        _ => None,
                    }
                    .and_then(|list| list.get(e.index));
                    let span = element.map_or(table.clone(), Spanned::span);
                    self.error(
                        map,
                        &span,
                        format!("compare.{}: {}", e.field, e.message),
                        Some(e.hint),
                    );
                }
                (spec, None)
            }
        }
    }

    fn pattern(
        &mut self,
        map: &SourceMap,
        raw: &Spanned<String>,
        parse: fn(&str) -> Result<PathPattern, (String, String)>,
    ) -> Option<PathPattern> {
        parse(raw.get_ref())
            .map_err(|(msg, hint)| self.error(map, &raw.span(), msg, Some(hint)))
            .ok()
    }

    fn host(&mut self, map: &SourceMap, raw: &Spanned<String>) -> Option<HostMatch> {
        let host = raw.get_ref().to_ascii_lowercase();
        let (wild, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host.as_str()),
        };
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            self.error(
                map,
                &raw.span(),
                format!("bad host `{}`", raw.get_ref()),
                Some(
                    "a host name such as \"shop.example.com\" or \"*.example.com\", without port"
                        .into(),
                ),
            );
            return None;
        }
        Some(if wild {
            HostMatch::Suffix(format!(".{name}").into())
        } else {
            HostMatch::Exact(name.into())
        })
    }

    fn cohort_key(&mut self, map: &SourceMap, raw: &Spanned<String>) -> Option<CohortKey> {
        match parse_cohort_key(raw.get_ref()) {
            Some(key) => Some(key),
            None => {
                self.error(
                    map,
                    &raw.span(),
                    format!("bad key `{}`", raw.get_ref()),
                    Some("use header:NAME, cookie:NAME, query:NAME or client-ip".into()),
                );
                None
            }
        }
    }
}

fn parse_cohort_key(raw: &str) -> Option<CohortKey> {
    if raw == "client-ip" {
        return Some(CohortKey::ClientIp);
    }
    let (kind, name) = raw.split_once(':')?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    match kind.trim() {
        "header" => HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .ok()
            .map(CohortKey::Header),
        "cookie" => Some(CohortKey::Cookie(name.into())),
        "query" => Some(CohortKey::Query(name.into())),
        _ => None,
    }
}

/// Expands `${NAME}` and `${NAME:-default}` from `env`.
pub(crate) fn expand_env(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err((
                format!("unclosed `${{` in `{raw}`"),
                "write `${NAME}` or `${NAME:-default}`".into(),
            ));
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err((
                    format!("environment variable `{name}` is not set"),
                    format!("set {name}, or give a default: `${{{name}:-http://host:port}}`"),
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Validates an upstream URL: `http` or `https`, a host, and no path, query or credentials.
pub fn parse_upstream_url(url: &str) -> Result<Uri, (String, String)> {
    let hint = || "write the upstream as \"http://host:port\" or \"https://host\"".to_string();
    let uri: Uri = url
        .parse()
        .map_err(|e| (format!("bad upstream URL `{url}`: {e}"), hint()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err((
                format!("upstream URL `{url}` must be http:// or https://"),
                hint(),
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err((format!("upstream URL `{url}` has no host"), hint()));
    };
    if let Some((userinfo, _)) = authority.as_str().rsplit_once('@') {
        // Named without them: the URL may come from the environment (`${ORDERS_URL}`), and
        // this message goes to the logs and to the admin API's reload answer.
        let shown = url.replacen(userinfo, "***", 1);
        return Err((
            format!("upstream URL `{shown}` carries credentials"),
            "ficus forwards the client's Authorization; credentials in upstream URLs are not supported".into(),
        ));
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err((
            format!("upstream URL `{url}` has a path or query"),
            "requests keep their own path; give only scheme, host and port".into(),
        ));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests;
