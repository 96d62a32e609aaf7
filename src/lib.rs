//! ficus: a reverse proxy for strangler-fig migrations.
//!
//! A request flows through the modules in this order (see `docs/flow.md`):
//! `server` (accept, TLS, HTTP/1.1 + HTTP/2) -> `proxy` (the exchange) -> `route` (pure
//! matching over the `rules` snapshot) -> `upstream` (pooled clients) -> back to the client.
//! [`Ficus::start`] wires them together; the binary and the tests share it.

pub mod admin;
pub mod compare;
pub mod demo;
pub mod proxy;
pub mod record;
pub mod report;
pub mod route;
pub mod rules;
pub mod server;
pub mod shadow;
pub mod store;
pub mod telemetry;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use http::Uri;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use admin::AdminState;
use proxy::Proxy;
use rules::Diagnostic;

/// Everything `ficus serve` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub rules: PathBuf,
    pub legacy: Uri,
    pub new: Uri,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// How often the TLS certificate files are checked for a change (then read again).
    pub tls_check_interval: Duration,
    /// Extra CA certificates trusted for `https://` upstreams.
    pub upstream_ca: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_timeout: Duration,
    /// Reload the rules when files under `rules` change.
    pub watch_rules: bool,
    /// With `watch_rules`, how often the rules files are also read again in case the watch
    /// missed a change (a symlink to a file elsewhere, a filesystem without inotify).
    pub rules_poll_interval: Duration,
    /// Proxy worker threads, each with its own runtime, listener and upstream pools
    /// (0: one per CPU).
    pub workers: usize,
    /// `(name, token)` pairs accepted as `Authorization: Bearer TOKEN` on `/api/*`; empty
    /// leaves the API open (ficus warns when the admin address is not loopback).
    pub admin_tokens: Vec<(String, String)>,
    /// Global shadowing limits.
    pub shadow: shadow::Settings,
    /// Where divergence records go: `sqlite:PATH`, `redis://...`, `rediss://...`,
    /// `redis+cluster://H:P,H:P`.
    pub store: String,
    /// Key prefix in Redis.
    pub store_prefix: String,
    /// Queue, spool and retention of the record writer.
    pub writer: store::writer::WriterConfig,
    /// Record body limit and the instance name written into records.
    pub records: record::Policy,
    /// What one client may take (connections, header and body sizes, time), and which peers
    /// are trusted proxies.
    pub limits: server::Limits,
}

impl Config {
    /// Defaults for everything but the three required settings.
    pub fn new(rules: impl Into<PathBuf>, legacy: Uri, new: Uri) -> Config {
        Config {
            rules: rules.into(),
            legacy,
            new,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            tls: None,
            tls_check_interval: Duration::from_secs(30),
            upstream_ca: None,
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            watch_rules: true,
            rules_poll_interval: rules::watch::POLL_INTERVAL,
            workers: 0,
            admin_tokens: Vec::new(),
            shadow: shadow::Settings::default(),
            store: "sqlite:ficus.db".to_string(),
            store_prefix: "ficus:".to_string(),
            writer: store::writer::WriterConfig::default(),
            records: record::Policy::default(),
            limits: server::Limits::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid rules:\n{}", render(.0))]
    Rules(Vec<Diagnostic>),
    #[error("bad --{flag} URL: {message}; hint: {hint}")]
    UpstreamUrl {
        flag: &'static str,
        message: String,
        hint: String,
    },
    #[error(transparent)]
    Listen(#[from] std::io::Error),
    #[error("listener TLS: {0}")]
    Tls(#[from] server::TlsConfigError),
    #[error("upstream TLS: {0}")]
    UpstreamTls(#[from] upstream::TlsSetupError),
    #[error("cannot watch the rules path: {0}")]
    Watch(#[from] notify::Error),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot open the spool: {0}")]
    Spool(std::io::Error),
}

fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Outcomes of rules reloads since start (the initial load is not counted).
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// Held from reading the rules to installing them: the watch, SIGHUP and the admin API
    /// may reload at once, and a slow load of older files must not install after a quicker
    /// load of newer ones. It holds the [`rules::Sources::fingerprint`] of the files the last
    /// load read, valid or not.
    serial: std::sync::Mutex<Option<u128>>,
}

/// A running ficus: proxy and admin listeners, rules watch.
pub struct Ficus {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    config: Config,
    proxy: Arc<Proxy>,
    writer: Arc<store::writer::Writer>,
    reloads: Arc<ReloadStats>,
    /// The listener's certificate, when it terminates TLS.
    cert: Option<Arc<server::ServerCert>>,
    shutdown: watch::Sender<bool>,
    /// One per worker thread; resolves when the worker has drained and stopped.
    server: Vec<tokio::sync::oneshot::Receiver<()>>,
    admin: JoinHandle<()>,
    _watch: Option<rules::watch::RulesWatch>,
}

impl Ficus {
    /// Loads the rules, binds both listeners and starts serving. Fails before serving
    /// anything if the rules are invalid or an address cannot be bound.
    pub async fn start(config: Config) -> Result<Ficus, StartError> {
        // The first user of rustls picks the provider; ficus uses ring everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = telemetry::exporter::install();
        for (flag, uri) in [("legacy", &config.legacy), ("new", &config.new)] {
            rules::parse_upstream_url(&uri.to_string()).map_err(|(message, hint)| {
                StartError::UpstreamUrl {
                    flag,
                    message,
                    hint,
                }
            })?;
        }
        let sources = rules::read(&config.rules);
        let fingerprint = sources.fingerprint();
        let loaded = sources
            .load(&|name| std::env::var(name).ok())
            .map_err(StartError::Rules)?;
        for w in &loaded.warnings {
            warn!("{w}");
        }
        let route_count = loaded.rules.routes.len();
        record_load_time(&loaded.rules);
        let clients = Arc::new(upstream::ClientCache::new(
            config.upstream_ca.as_deref(),
            config.pool_idle_timeout,
        )?);
        let defaults = upstream::Defaults {
            legacy: config.legacy.clone(),
            new: config.new.clone(),
            connect_timeout: config.connect_timeout,
            timeout: config.upstream_timeout,
            pool_idle_timeout: config.pool_idle_timeout,
        };
        // The store connects lazily (Redis) so that ficus starts, and spools, while it is down.
        let store = store::open(&config.store, &config.store_prefix).await?;
        let writer = store::writer::Writer::start(store, config.writer.clone())
            .map_err(StartError::Spool)?;
        let shadower = Arc::new(shadow::Shadower::new(
            config.shadow.clone(),
            writer.clone(),
            config.records.clone(),
        ));
        let proxy = Arc::new(Proxy::new(
            loaded.rules,
            clients,
            defaults,
            shadower,
            config.limits.clone(),
        ));
        let connections = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
        let (tls, cert) = match &config.tls {
            Some(files) => {
                let (acceptor, cert) = server::tls_acceptor(&files.cert, &files.key)?;
                metrics::counter!(telemetry::TLS_CERT_RELOADS_TOTAL, "result" => "error")
                    .increment(0);
                (Some(acceptor), Some(cert))
            }
            None => (None, None),
        };

        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let listeners = server::bind_workers(config.listen, workers)?;
        let admin_listener = server::bind(config.admin_listen, "admin").await?;
        let proxy_addr = listeners
            .first()
            .map(std::net::TcpListener::local_addr)
            .transpose()?
            .unwrap_or(config.listen);
        let admin_addr = admin_listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);

        let reloads = Arc::new(ReloadStats {
            serial: std::sync::Mutex::new(Some(fingerprint)),
            ..ReloadStats::default()
        });
        if config.admin_tokens.is_empty() && !admin_addr.ip().is_loopback() {
            warn!(
                admin = %admin_addr,
                "the admin API is readable from the network without a token (changes are refused \
                 from non-loopback peers): set --admin-token"
            );
        }
        let reload_now: admin::Reload = {
            let (proxy, path, stats) = (proxy.clone(), config.rules.clone(), reloads.clone());
            Arc::new(move || reload(&proxy, &path, &stats))
        };
        let state = Arc::new(AdminState {
            proxy: proxy.clone(),
            ready: false.into(),
            store: writer.store().clone(),
            tokens: config.admin_tokens.clone(),
            reload: reload_now,
            metrics: metrics.clone(),
            replaying: Default::default(),
        });
        {
            // Fleet-wide overrides and group marks live in the store; every replica syncs
            // them each second.
            let (proxy, store, mut stop) =
                (proxy.clone(), writer.store().clone(), shutdown_rx.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = every.tick() => {
                            if let Err(e) = proxy.sync_overrides(&*store).await {
                                tracing::debug!(error = %e, "cannot read overrides from the store");
                            }
                            if let Err(e) = proxy.shadow().sync_group_marks(&*store).await {
                                tracing::debug!(error = %e, "cannot read group marks from the store");
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        if let Some(cert) = cert.clone() {
            // The certificate files are checked for changes (a rotation) and read again when
            // they have; reading them is file I/O and a key parse, not for this thread.
            let mut stop = shutdown_rx.clone();
            let every = config.tls_check_interval;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(every);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = every.tick() => {
                            let cert = cert.clone();
                            let _ = tokio::task::spawn_blocking(move || cert.refresh(false)).await;
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        if let Some(handle) = metrics {
            // The exporter drains histograms only when asked to.
            let mut stop = shutdown_rx.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = every.tick() => handle.run_upkeep(),
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        let mut admin_shutdown = shutdown_rx.clone();
        let app = admin::router(state.clone());
        let admin = tokio::spawn(async move {
            let stop = async move {
                let _ = admin_shutdown.wait_for(|stop| *stop).await;
            };
            let app = app.into_make_service_with_connect_info::<admin::listener::Peer>();
            let admin_listener = admin::listener::AdminListener::new(
                admin_listener,
                admin::listener::MAX_CONNECTIONS,
                admin::listener::IDLE_TIMEOUT,
            );
            if let Err(e) = axum::serve(admin_listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                error!(error = %e, "admin listener failed");
            }
        });
        // Thread per core: each worker runs a single-threaded runtime with its own listener
        // (SO_REUSEPORT) and its own upstream pools, so an exchange never hops threads.
        let mut server = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let (proxy, tls, stop) = (proxy.clone(), tls.clone(), shutdown_rx.clone());
            let connections = connections.clone();
            let drain = config.shutdown_timeout;
            std::thread::Builder::new()
                .name(format!("ficus-worker-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => return error!(error = %e, "cannot start a worker runtime"),
                    };
                    runtime.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                server::serve(listener, tls, proxy, stop, drain, connections).await
                            }
                            Err(e) => error!(error = %e, "cannot adopt the proxy listener"),
                        }
                    });
                    let _ = done.send(());
                })?;
            server.push(finished);
        }

        let watch = if config.watch_rules {
            let proxy = proxy.clone();
            let path = config.rules.clone();
            let stats = reloads.clone();
            // The watch wakes for changes beside the rules too (a ConfigMap swaps `..data`
            // next to them; a store or a log may live in the same directory): only files
            // that read differently from the last load are loaded again.
            Some(rules::watch::spawn(
                &config.rules,
                config.rules_poll_interval,
                move || {
                    let _ = reload_from(&proxy, &path, &stats, Trigger::Watch);
                },
            )?)
        } else {
            None
        };
        // Rules are loaded and the listener is bound (the kernel queues connections already).
        state.ready.store(true, Ordering::Release);
        info!(
            listen = %proxy_addr,
            admin = %admin_addr,
            routes = route_count,
            legacy = %config.legacy,
            new = %config.new,
            tls = config.tls.is_some(),
            workers,
            "ficus is serving"
        );
        Ok(Ficus {
            proxy_addr,
            admin_addr,
            config,
            proxy,
            writer,
            reloads,
            cert,
            shutdown,
            server,
            admin,
            _watch: watch,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Reloads the rules now (what SIGHUP does). On error the rules in force stay.
    pub fn reload(&self) -> Result<usize, Vec<Diagnostic>> {
        reload(&self.proxy, &self.config.rules, &self.reloads)
    }

    /// Reads the listener's certificate and key again (what SIGHUP does besides the rules).
    /// On error the pair in force stays. Without TLS, nothing to do.
    pub fn reload_tls(&self) -> Result<(), server::TlsConfigError> {
        self.cert.as_ref().map_or(Ok(()), |c| c.reload())
    }

    /// The record writer (and through it, the store).
    pub fn writer(&self) -> &Arc<store::writer::Writer> {
        &self.writer
    }

    pub fn store(&self) -> &Arc<dyn store::Store> {
        self.writer.store()
    }

    pub fn reload_stats(&self) -> &ReloadStats {
        &self.reloads
    }

    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout), returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for worker in self.server {
            let _ = worker.await;
        }
        let _ = self.admin.await;
        // Records of exchanges that finished are written (or spooled) before exiting.
        self.writer.close().await;
        info!("ficus stopped");
    }
}

/// Loads the rules at `path` and publishes them; logs and counts the outcome.
fn reload(
    proxy: &Proxy,
    path: &std::path::Path,
    stats: &ReloadStats,
) -> Result<usize, Vec<Diagnostic>> {
    match reload_from(proxy, path, stats, Trigger::Asked) {
        Some(result) => result,
        // Only a watch reload is ever skipped.
        None => Ok(proxy.live().rules.routes.len()),
    }
}

/// Who asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP or the admin API: always load, even files that did not change.
    Asked,
    /// The file watch: skip files that read the same as at the last load.
    Watch,
}

/// Like [`reload`]; `None` when the watch found the files as the last load read them.
fn reload_from(
    proxy: &Proxy,
    path: &std::path::Path,
    stats: &ReloadStats,
    trigger: Trigger,
) -> Option<Result<usize, Vec<Diagnostic>>> {
    let mut last = stats
        .serial
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let sources = rules::read(path);
    let fingerprint = sources.fingerprint();
    if trigger == Trigger::Watch && *last == Some(fingerprint) {
        tracing::debug!("rules files unchanged, not reloaded");
        return None;
    }
    *last = Some(fingerprint);
    Some(match sources.load(&|name| std::env::var(name).ok()) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                warn!("{w}");
            }
            let count = loaded.rules.routes.len();
            record_load_time(&loaded.rules);
            proxy.install(loaded.rules);
            stats.succeeded.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::RULES_RELOADS_TOTAL, "result" => "ok").increment(1);
            info!(routes = count, "rules reloaded");
            Ok(count)
        }
        Err(errors) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::RULES_RELOADS_TOTAL, "result" => "error").increment(1);
            // Until a load succeeds: the counter's increase ages out of an alert's window
            // while the broken files are still there.
            metrics::gauge!(telemetry::RULES_LAST_RELOAD_SUCCESS).set(0.0);
            error!(
                errors = errors.iter().filter(|d| d.is_error()).count(),
                "rules rejected, the previous rules stay in force"
            );
            for e in &errors {
                error!("{e}");
            }
            Err(errors)
        }
    })
}

/// Records a successful load: its time, and that the files on disk are the rules in force.
fn record_load_time(rules: &rules::RuleSet) {
    let at = rules
        .loaded_at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(telemetry::RULES_LOADED_TIMESTAMP_SECONDS).set(at);
    metrics::gauge!(telemetry::RULES_LAST_RELOAD_SUCCESS).set(1.0);
}

/// Runs until SIGTERM or Ctrl-C, reloading the rules on SIGHUP, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), StartError> {
    // Before anything slow. Until a handler is in place, SIGHUP's default action ends the
    // process: a deploy that updates the rules and sends SIGHUP while a large rule set is
    // still loading would kill ficus without a word. A SIGHUP received during start-up
    // reloads once ficus serves (the files may have changed since they were read).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    info!(rules = %config.rules.display(), "loading the rules");
    let ficus = Ficus::start(config).await?;
    wait_for_signals_with(&ficus, hup).await;
    ficus.shutdown().await;
    Ok(())
}

/// Returns on SIGTERM or SIGINT; reloads on SIGHUP meanwhile.
pub async fn wait_for_signals(ficus: &Ficus) {
    wait_for_signals_with(ficus, None).await;
}

/// [`wait_for_signals`] with the SIGHUP stream installed earlier, if any.
async fn wait_for_signals_with(ficus: &Ficus, hup: Option<tokio::signal::unix::Signal>) {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = match hup {
        Some(hup) => Ok(hup),
        None => signal(SignalKind::hangup()),
    };
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), hup) else {
        warn!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); return; }
            _ = tokio::signal::ctrl_c() => { info!("interrupted: shutting down"); return; }
            _ = hup.recv() => {
                info!("SIGHUP: reloading rules");
                // Reading and compiling rules is blocking work, and may wait for a reload
                // already under way: not on this runtime's thread.
                let (proxy, path) = (ficus.proxy.clone(), ficus.config.rules.clone());
                let stats = ficus.reloads.clone();
                tokio::task::spawn_blocking(move || reload(&proxy, &path, &stats));
                if let Some(cert) = ficus.cert.clone() {
                    tokio::task::spawn_blocking(move || cert.refresh(true));
                }
            }
        }
    }
}
