//! The `ficus` command: serve, rules check / explain, demo, and the admin API clients
//! (divergences, groups, report). Start-up and exit codes live here.

mod client;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use ficus::route::{self, RequestHead};
use ficus::rules::{self, Severity};
use ficus::telemetry::{self, LogFormat};
use ficus::{Config, TlsFiles};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ficus: a reverse proxy for strangler-fig migrations.
///
/// ficus stands in front of a legacy HTTP system and routes each request, by rules kept in
/// git, to the side that is authoritative for it: legacy or new.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "FICUS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `warn,ficus=debug`).
    /// `ficus::access=off` silences the per-request line.
    #[arg(long, global = true, env = "FICUS_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of the legacy and new upstreams.
    Serve(Box<ServeArgs>),
    /// Validate and explain routing rules.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Start two example backends and ficus in front of them, and show what to try.
    Demo(DemoArgs),
    /// Work through divergences on a running ficus (through its admin API).
    Divergences {
        #[command(flatten)]
        admin: client::AdminArgs,
        #[command(subcommand)]
        command: client::DivergencesCommand,
    },
    /// Divergences grouped by root cause (fingerprint) on a running ficus.
    Groups {
        #[command(flatten)]
        admin: client::AdminArgs,
        #[command(subcommand)]
        command: client::GroupsCommand,
    },
    /// Emergency overrides of routes on a running fleet.
    Routes {
        #[command(flatten)]
        admin: client::AdminArgs,
        #[command(subcommand)]
        command: client::RoutesCommand,
    },
    /// The readiness report of a running ficus: a verdict per route.
    Report {
        #[command(flatten)]
        admin: client::AdminArgs,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 unless this route's verdict is `ready` (a CI gate for shifting authority).
        #[arg(long, value_name = "ROUTE")]
        fail_unless_ready: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Routing rules: a TOML file or a directory of *.toml files (reloaded when they change).
    #[arg(long, env = "FICUS_RULES", value_name = "PATH")]
    rules: PathBuf,
    /// URL of the legacy system, e.g. http://legacy:8080.
    #[arg(long, env = "FICUS_LEGACY", value_name = "URL")]
    legacy: Uri,
    /// URL of the new system.
    #[arg(long, env = "FICUS_NEW", value_name = "URL")]
    new: Uri,
    #[command(flatten)]
    listen: ListenArgs,
    /// PEM certificate chain: serve HTTPS (with HTTP/2 by ALPN) on --listen. Read again
    /// when it or the key changes (checked every 30 s, and on SIGHUP).
    #[arg(
        long,
        env = "FICUS_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(
        long,
        env = "FICUS_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Extra PEM CA certificates to trust for https:// upstreams (besides the system and
    /// webpki roots).
    #[arg(long, env = "FICUS_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Time allowed to connect to an upstream, TLS handshake included (rules may override
    /// per upstream).
    #[arg(long, env = "FICUS_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Time allowed until an upstream's response head arrives (rules may override).
    #[arg(long, env = "FICUS_UPSTREAM_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "FICUS_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// Do not watch the rules path (reload on SIGHUP only).
    #[arg(long, env = "FICUS_NO_WATCH")]
    no_watch: bool,
    /// Proxy worker threads, each with its own listener (SO_REUSEPORT) and upstream pools;
    /// 0 means one per CPU.
    #[arg(long, env = "FICUS_WORKERS", value_name = "N", default_value_t = 0)]
    workers: usize,
    #[command(flatten)]
    shadow: ShadowArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Token required as `Authorization: Bearer TOKEN` on the admin API (/api/*); `NAME=TOKEN`
    /// names it in record histories. Repeatable; the variable takes a comma-separated list.
    #[arg(
        long,
        env = "FICUS_ADMIN_TOKEN",
        value_name = "TOKEN",
        value_delimiter = ','
    )]
    admin_token: Vec<String>,
}

/// Where divergence records go, and how long they stay.
#[derive(Args)]
struct StoreArgs {
    /// Record store: sqlite:PATH (embedded, default), redis://[:PASSWORD@]HOST:PORT/DB,
    /// rediss://... (TLS) or redis+cluster://HOST:PORT,HOST:PORT (shared by replicas).
    #[arg(
        long,
        env = "FICUS_STORE",
        value_name = "URL",
        default_value = "sqlite:ficus.db"
    )]
    store: String,
    /// Prefix of every Redis key.
    #[arg(
        long,
        env = "FICUS_STORE_PREFIX",
        value_name = "PREFIX",
        default_value = "ficus:"
    )]
    store_prefix: String,
    /// Directory of the local spool that holds records while the store is down (one per
    /// process: a second ficus on a spool in use refuses to start).
    #[arg(
        long,
        env = "FICUS_SPOOL_DIR",
        value_name = "DIR",
        default_value = "ficus-spool"
    )]
    spool_dir: PathBuf,
    /// Largest spool; beyond it records are dropped (and counted).
    #[arg(long, env = "FICUS_SPOOL_MAX", value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    spool_max: usize,
    /// How long divergence records are kept (counters are kept at least 400 days).
    #[arg(long, env = "FICUS_RETENTION", value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Most records kept per route; the oldest go first.
    #[arg(
        long,
        env = "FICUS_RETENTION_PER_ROUTE",
        value_name = "N",
        default_value_t = 100_000
    )]
    retention_per_route: usize,
    /// Bodies longer than this are cut in records (and marked so).
    #[arg(long, env = "FICUS_RECORD_BODY_LIMIT", value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    record_body_limit: usize,
    /// Name of this replica in records (default: the host name).
    #[arg(long, env = "FICUS_INSTANCE", value_name = "NAME")]
    instance: Option<String>,
}

/// What one client may take, and which peers are trusted proxies.
#[derive(Args)]
struct LimitArgs {
    /// Open client connections (all workers together); more are closed at once.
    #[arg(
        long,
        env = "FICUS_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 10_000
    )]
    max_connections: usize,
    /// Time to send a request head; also the longest idle keep-alive (HTTP/1.1) or HTTP/2
    /// connection without an open stream.
    #[arg(long, env = "FICUS_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1, at least 8 KiB: hyper's smallest read buffer) or
    /// header list (HTTP/2); more gets 431.
    #[arg(long, env = "FICUS_MAX_HEADER_BYTES", value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    max_header_bytes: usize,
    /// Most header fields in an HTTP/1.1 request; more gets 431 (HTTP/2 header lists are
    /// bounded by --max-header-bytes).
    #[arg(
        long,
        env = "FICUS_MAX_HEADERS",
        value_name = "N",
        default_value_t = 100
    )]
    max_headers: usize,
    /// Longest request target (path and query); more gets 414.
    #[arg(long, env = "FICUS_MAX_URI_BYTES", value_name = "SIZE", default_value = "8KiB", value_parser = parse_size)]
    max_uri_bytes: usize,
    /// Largest request body when a route sets no `max_request_body`; more gets 413
    /// (default: no limit; bodies stream).
    #[arg(long, env = "FICUS_MAX_REQUEST_BODY", value_name = "SIZE", value_parser = parse_size)]
    max_request_body: Option<usize>,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(
        long,
        env = "FICUS_H2_MAX_STREAMS",
        value_name = "N",
        default_value_t = 100
    )]
    h2_max_streams: u32,
    /// Longest a client may leave an answer's next bytes unread (its socket or HTTP/2 window
    /// full) before its connection is closed, freeing the upstream connection; 0 for none.
    #[arg(long, env = "FICUS_CLIENT_SEND_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    client_send_timeout: Duration,
    /// Peers (CIDRs) whose X-Forwarded-For/-Proto/-Host are kept and extended, e.g. a load
    /// balancer's subnet; from anyone else they are replaced.
    #[arg(long, env = "FICUS_TRUSTED_PROXIES", value_name = "CIDR", value_delimiter = ',', value_parser = parse_net)]
    trusted_proxies: Vec<ipnet::IpNet>,
}

/// A CIDR (`10.0.0.0/8`) or one address (`10.1.2.3`).
fn parse_net(raw: &str) -> Result<ipnet::IpNet, String> {
    let raw = raw.trim();
    raw.parse::<ipnet::IpNet>()
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("bad address or CIDR `{raw}`: write e.g. 10.0.0.0/8 or 192.168.1.7"))
}

/// Global limits of shadowing (mirroring to the non-authoritative side).
#[derive(Args)]
struct ShadowArgs {
    /// Most shadow requests in flight at once; beyond it new shadows are dropped and counted.
    #[arg(
        long,
        env = "FICUS_SHADOW_MAX_INFLIGHT",
        value_name = "N",
        default_value_t = 256
    )]
    shadow_max_inflight: usize,
    /// Most memory held by shadow bodies at once (e.g. 64MiB); beyond it shadows are dropped.
    #[arg(long, env = "FICUS_SHADOW_MAX_MEMORY", value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    shadow_max_memory: usize,
    /// Largest body (request or response) kept for a comparison; larger ones skip the shadow.
    #[arg(long, env = "FICUS_SHADOW_BODY_LIMIT", value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    shadow_body_limit: usize,
    /// Time allowed for a whole shadow exchange (routes may override with shadow.timeout).
    #[arg(long, env = "FICUS_SHADOW_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    shadow_timeout: Duration,
    /// Header set to "1" on every shadow request, so the shadow side can suppress side effects.
    #[arg(
        long,
        env = "FICUS_SHADOW_HEADER",
        value_name = "NAME",
        default_value = "x-ficus-shadow"
    )]
    shadow_header: HeaderName,
}

fn parse_size(raw: &str) -> Result<usize, String> {
    rules::parse_size(raw)
}

#[derive(Args)]
struct ListenArgs {
    /// Address of the proxy listener.
    #[arg(
        long,
        env = "FICUS_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    /// Address of the admin listener (/healthz, /readyz).
    #[arg(
        long,
        env = "FICUS_ADMIN_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9901"
    )]
    admin_listen: SocketAddr,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Check rules; print every error and warning as FILE:LINE:COL; exit 1 on errors.
    Check {
        /// A TOML file or a directory of *.toml files.
        path: PathBuf,
    },
    /// Show which route a request matches, and why each other route does not.
    Explain {
        /// A TOML file or a directory of *.toml files.
        path: PathBuf,
        /// Request method, e.g. GET.
        method: String,
        /// Request URL (http://host/path?query) or path (/path?query).
        url: String,
        /// Request header, as 'name: value' (repeatable).
        #[arg(short = 'H', long = "header", value_name = "HEADER")]
        headers: Vec<String>,
        /// Client IP, for canaries keyed by client-ip.
        #[arg(long, default_value = "127.0.0.1")]
        client_ip: IpAddr,
    },
    /// Before merging a rules change: how many divergences on record (of a running ficus) its
    /// compare settings would no longer report, per route and group.
    Impact {
        /// The candidate rules: a TOML file or a directory of *.toml files.
        path: PathBuf,
        #[command(flatten)]
        admin: client::AdminArgs,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    listen: ListenArgs,
    /// Rules to use (default: ./routing-rules if present, else the built-in examples).
    #[arg(long, value_name = "PATH")]
    rules: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print reports keep stderr for real problems only.
    let filter = match cli.command {
        Command::Rules(_)
        | Command::Divergences { .. }
        | Command::Groups { .. }
        | Command::Routes { .. }
        | Command::Report { .. } => "warn",
        _ => cli.log.as_str(),
    };
    if let Err(e) = telemetry::init(cli.log_format, filter) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Rules(RulesCommand::Check { path }) => return check(&path),
        Command::Rules(RulesCommand::Explain {
            path,
            method,
            url,
            headers,
            client_ip,
        }) => explain(&path, &method, &url, &headers, client_ip),
        Command::Rules(RulesCommand::Impact { path, admin, json }) => {
            runtime().and_then(|rt| rt.block_on(client::impact(&admin, &path, json)))
        }
        Command::Demo(args) => demo(args),
        Command::Divergences { admin, command } => {
            runtime().and_then(|rt| rt.block_on(client::divergences(&admin, command)))
        }
        Command::Routes { admin, command } => {
            runtime().and_then(|rt| rt.block_on(client::routes(&admin, command)))
        }
        Command::Groups { admin, command } => {
            runtime().and_then(|rt| rt.block_on(client::groups(&admin, command)))
        }
        Command::Report {
            admin,
            json,
            fail_unless_ready,
        } => match runtime()
            .and_then(|rt| rt.block_on(client::report(&admin, json, fail_unless_ready)))
        {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `writeln!` into a report buffer (writing to a `String` cannot fail).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// The control runtime: admin API, record writer, rules watch. Proxy traffic runs on the
/// worker threads that `Ficus::start` creates, one single-threaded runtime each.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ficus-control")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut config = Config::new(args.rules, args.legacy, args.new);
    config.listen = args.listen.listen;
    config.admin_listen = args.listen.admin_listen;
    config.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    config.upstream_ca = args.upstream_ca;
    config.connect_timeout = args.connect_timeout;
    config.upstream_timeout = args.upstream_timeout;
    config.shutdown_timeout = args.shutdown_timeout;
    config.watch_rules = !args.no_watch;
    config.workers = args.workers;
    // `FICUS_ADMIN_TOKEN="s1, s2"`: the space after a comma is not part of the token (the
    // server and the CLI trim the token they are sent or read, so it could never match), nor
    // of a name (`alice=s1, bob=s2`).
    config.admin_tokens = args
        .admin_token
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| match client::split_token(t) {
            (Some(name), token) => (name.to_string(), token.to_string()),
            (None, token) => ("admin".to_string(), token.to_string()),
        })
        .collect();
    config.shadow = ficus::shadow::Settings {
        max_inflight: args.shadow.shadow_max_inflight.max(1),
        max_memory: args.shadow.shadow_max_memory,
        body_limit: args.shadow.shadow_body_limit,
        timeout: args.shadow.shadow_timeout,
        header: args.shadow.shadow_header,
    };
    let store = args.store;
    config.store = store.store;
    config.store_prefix = store.store_prefix;
    config.writer.spool_dir = store.spool_dir;
    config.writer.spool_max_bytes = store.spool_max as u64;
    config.writer.retention = ficus::store::Retention {
        records_ms: u64::try_from(store.retention.as_millis()).unwrap_or(u64::MAX),
        per_route_cap: store.retention_per_route,
    };
    config.records.body_limit = store.record_body_limit;
    if let Some(instance) = store.instance {
        config.records.instance = instance.into();
    }
    let limits = args.limits;
    config.limits = ficus::server::Limits {
        max_connections: limits.max_connections.max(1),
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers.max(1),
        max_uri_bytes: limits.max_uri_bytes,
        max_request_body: limits.max_request_body.map(|n| n as u64),
        h2_max_streams: limits.h2_max_streams.max(1),
        send_timeout: limits.client_send_timeout,
        trusted_proxies: limits.trusted_proxies,
    };
    runtime()?.block_on(ficus::run(config))?;
    Ok(())
}

fn check(path: &std::path::Path) -> ExitCode {
    let mut out = String::new();
    let (diags, routes) = match rules::load(path) {
        Ok(loaded) => (loaded.warnings, Some(loaded.rules.routes.len())),
        Err(errors) => (errors, None),
    };
    for d in &diags {
        say!(out, "{d}");
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = plural(diags.len() - errors, "warning");
    let code = match routes {
        Some(n) => {
            say!(out, "ok: {}, {warnings}", plural(n, "route"));
            ExitCode::SUCCESS
        }
        None => {
            say!(out, "failed: {}, {warnings}", plural(errors, "error"));
            ExitCode::FAILURE
        }
    };
    emit(&out);
    code
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Writes a report to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn explain(
    path: &std::path::Path,
    method: &str,
    url: &str,
    header_args: &[String],
    client_ip: IpAddr,
) -> Result<()> {
    let loaded = rules::load(path).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid rules:\n{}", lines.join("\n"))
    })?;
    let rules = loaded.rules;
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("bad method `{method}`"))?;
    let mut uri: Uri = url.parse().with_context(|| format!("bad URL `{url}`"))?;
    // Match what the proxy matches: the canonical path.
    match ficus::proxy::canonical_uri(&uri) {
        Ok(Some(canonical)) => {
            println!("path as matched and forwarded: {}", canonical.path());
            uri = canonical;
        }
        Ok(None) => {}
        Err(e) => bail!("ficus answers 400 to this request: {e}"),
    }
    let mut headers = HeaderMap::new();
    for h in header_args {
        let Some((name, value)) = h.split_once(':') else {
            bail!("bad header `{h}`: write -H 'name: value'");
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("bad header name in `{h}`"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("bad header value in `{h}`"))?;
        headers.append(name, value);
    }
    // What the proxy refuses before routing. A `Host` given with -H is checked as HTTP/1.1
    // checks it; without one, the URL's host plays HTTP/2's `:authority`.
    let version = if headers.contains_key(http::header::HOST) {
        http::Version::HTTP_11
    } else {
        http::Version::HTTP_2
    };
    if let Some(e) = ficus::proxy::refused_before_routing(&method, &uri, version, &headers) {
        bail!("ficus answers {} to this request: {e}", e.status().as_u16());
    }
    let head = RequestHead::new(&method, &uri, &headers, client_ip);
    let mut out = String::new();
    let ex = route::explain(&rules, &head);
    let d = ex.decision;
    let at = d
        .route
        .location
        .as_ref()
        .map_or("built-in".to_string(), ToString::to_string);
    say!(
        out,
        "{method} {} host={} client-ip={client_ip}",
        uri.path_and_query().map_or("/", |p| p.as_str()),
        head.host.unwrap_or("-"),
    );
    say!(
        out,
        "route: {} ({at}), priority {}",
        d.route.name,
        if d.route.location.is_some() {
            d.route.priority.to_string()
        } else {
            "-".into()
        }
    );
    let upstream = &rules.upstreams[d.authority_upstream()].name;
    say!(out, "authority: {} (upstream {upstream})", d.authority);
    if let (Some(canary), Some(position)) = (&d.route.canary, ex.cohort) {
        match position {
            Some(pos) => say!(
                out,
                "canary: {}% by {}; this key is at {:.2}%, so it {} {}",
                canary.percent,
                canary.key,
                pos * 100.0,
                if d.canaried { "moves to" } else { "stays on" },
                d.authority
            ),
            None => say!(
                out,
                "canary: {}% by {}; the request has no such key, so it stays on {}",
                canary.percent,
                canary.key,
                d.authority
            ),
        }
    }
    if let Some(shadow) = &d.route.shadow {
        say!(
            out,
            "shadow: {} of requests to {} (writes {})",
            shadow.sample,
            d.authority.other(),
            if shadow.writes {
                "mirrored"
            } else {
                "not mirrored"
            }
        );
    }
    if d.route.location.is_none() {
        say!(
            out,
            "no route matches: the request passes through to legacy untouched"
        );
    }
    say!(out, "routes in precedence order:");
    let width = ex
        .routes
        .iter()
        .map(|(r, _)| r.name.len())
        .max()
        .unwrap_or(0);
    for (r, why) in &ex.routes {
        let verdict = if std::ptr::eq(*r, d.route) {
            "matches (selected)".to_string()
        } else if why.is_empty() {
            format!(
                "matches, but `{}` comes first (priority {} vs {})",
                d.route.name, d.route.priority, r.priority
            )
        } else {
            format!("no: {}", why.join("; "))
        };
        say!(out, "  {:width$}  {verdict}", r.name);
    }
    emit(&out);
    Ok(())
}

fn demo(args: DemoArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let legacy = ficus::demo::start_backend(rules::Side::Legacy).await?;
        let new = ficus::demo::start_backend(rules::Side::New).await?;
        let rules_path = match args.rules {
            Some(p) => p,
            None => ficus::demo::rules_dir()?,
        };
        let mut config = Config::new(
            rules_path.clone(),
            format!("http://{legacy}").parse()?,
            format!("http://{new}").parse()?,
        );
        config.listen = args.listen.listen;
        config.admin_listen = args.listen.admin_listen;
        let running = ficus::Ficus::start(config).await?;
        let p = running.proxy_addr();
        println!(
            "\nficus demo\n\
             \x20 proxy     http://{p}\n\
             \x20 workbench http://{admin}/ui/  (divergences, groups, readiness)\n\
             \x20 admin     http://{admin}/readyz\n\
             \x20 legacy    http://{legacy}  (example backend)\n\
             \x20 new       http://{new}  (example backend; differs a little)\n\
             \x20 rules     {rules}  (edit a file: ficus reloads it live)\n\
             \x20 records   ficus.db (SQLite) in this directory; each divergence is logged too\n\n\
             Try (the x-backend response header says which side answered):\n\
             \x20 curl -i http://{p}/api/orders/42                     # orders-read: legacy is the authority\n\
             \x20 curl -i http://{p}/api/customers/7                   # customers: new is the authority\n\
             \x20 curl -i -H 'x-customer-id: 42' http://{p}/api/catalog/lamp   # canary: customer 42 is in the 25% that get new\n\
             \x20 curl -i -H 'x-customer-id: 7' http://{p}/api/catalog/lamp    # customer 7 stays on legacy, every time\n\
             \x20 curl -i http://{p}/api/orders/43                     # mirrored to new too: diverges on /tracking, odd ids on /total too (see the log)\n\
             \x20 curl -i http://{p}/anything/else                     # no rule matches: default route to legacy\n\
             \x20 ficus rules explain {rules} GET http://{p}/api/catalog/lamp -H 'x-customer-id: 42'\n\n\
             Ctrl-C stops.",
            admin = running.admin_addr(),
            rules = rules_path.display(),
        );
        ficus::wait_for_signals(&running).await;
        running.shutdown().await;
        Ok(())
    })
}
