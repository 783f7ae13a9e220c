//! [`Application`]: the whole daemon, built in one place and run, the same
//! for `skillsync serve`, the demo and the tests. [`Application::build`]
//! (or [`Application::builder`], to pass in listeners the caller bound, as
//! tests binding port 0 and systemd socket activation do) binds the
//! listeners, opens the store, wires the [`Pipeline`], and prepares the
//! health state and the TLS acceptor: everything that can fail on a config
//! or an environment fails there, before anything runs.
//! [`Application::run`] then starts the background work (fetch workers,
//! schedules, retention: a `Generation`; the PostgreSQL sink; the health
//! probe; the report rebuild), serves both listeners until the shutdown
//! token is cancelled, and stops cleanly. [`run`] is the two in one call.
//!
//! Two listeners: the public one (webhook path and `/healthz` only) and,
//! unless `server.metrics_listen = "off"`, the metrics one (`/metrics`,
//! detailed `/healthz`). SIGHUP re-reads the whole config file and applies
//! it (tenants, secrets, credentials, fetch, reconciliation and retention
//! settings, schedules, `[reporting]`, `[postgres]`, the TLS certificate)
//! without a restart, or keeps the old config when the new one is invalid;
//! what is bound or opened at start (listen addresses, database) is named
//! in the log as needing a restart. It never stops the daemon.
//!
//! Work proportional to the database (refilling the report tables after a
//! `[reporting]` change) runs after READY, in bounded batches.
//!
//! The background work of one config is a [`Generation`]; a reload starts
//! the next before retiring the previous, whose in-flight fetches and runs
//! finish under the config they started with.
//!
//! Stop order: the HTTP server stops accepting and finishes in-flight
//! requests (their events are committed or refused), fetchers finish what is
//! in flight within a deadline and release the rest, scheduled runs are
//! marked interrupted, then the WAL is checkpointed.

pub mod oneshot;
mod pipeline;
pub mod verify;

pub use pipeline::{Pipeline, open_store};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::health::{Health, PROBE_INTERVAL};
use crate::http::{WebhookParts, WebhookState, metrics_routes, routes};
use crate::server::{self, Limits};
use crate::store::{ReportRole, Store, run_blocking};

/// Binds `server.metrics_listen` (`None` when it is "off"); the error names the key.
pub async fn bind_metrics(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    match config.server.metrics_listen {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr).await.map(Some).with_context(|| {
            format!("config error at `server.metrics_listen`: cannot listen on {addr}")
        }),
    }
}

/// Binds `server.listen`; the error names the key.
pub async fn bind_public(config: &Config) -> anyhow::Result<TcpListener> {
    let addr = config.server.listen;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("config error at `server.listen`: cannot listen on {addr}"))
}

/// Builds the daemon on `config` with `listener` as its public socket (and
/// the metrics one bound from the config), then runs it until `shutdown` is
/// cancelled and it has stopped cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Application::builder(config)
        .listener(listener)
        .build()
        .await?
        .run(shutdown)
        .await
}

/// What [`Application::build`] takes besides the config; see
/// [`Application::builder`].
pub struct Builder {
    config: Config,
    /// The public socket; `None`: bind `server.listen`.
    listener: Option<TcpListener>,
    /// The metrics socket (`Some(None)`: no metrics listener); `None`: bind
    /// `server.metrics_listen`.
    metrics_listener: Option<Option<TcpListener>>,
    /// The file SIGHUP re-reads; `None`: SIGHUP reloads only the TLS certificate.
    config_path: Option<PathBuf>,
}

impl Builder {
    /// Serve on this socket instead of binding `server.listen` (port 0 in
    /// tests; the socket systemd passed).
    pub fn listener(mut self, listener: TcpListener) -> Builder {
        self.listener = Some(listener);
        self
    }

    /// Serve metrics on this socket (`None`: no metrics listener) instead of
    /// binding `server.metrics_listen`.
    pub fn metrics_listener(mut self, listener: Option<TcpListener>) -> Builder {
        self.metrics_listener = Some(listener);
        self
    }

    /// On SIGHUP, read and apply the whole file at `path` again (see `reload`).
    pub fn reload_from(mut self, path: PathBuf) -> Builder {
        self.config_path = Some(path);
        self
    }

    /// Binds what was not passed in, opens the store as the owner of the
    /// report tables, wires the pipeline, loads the TLS certificate.
    pub async fn build(self) -> anyhow::Result<Application> {
        crate::upstream::install_crypto();
        // Before anything can take a while: from here on SIGHUP never stops us.
        let hangups = hangup_signals();
        let listener = match self.listener {
            Some(l) => l,
            None => bind_public(&self.config).await?,
        };
        let metrics_listener = match self.metrics_listener {
            Some(l) => l,
            None => bind_metrics(&self.config).await?,
        };
        let pipeline = Pipeline::build(Arc::new(self.config), ReportRole::Owner).await?;
        let config = &pipeline.config;
        let watchdog = watchdog_interval();
        let probe_every = watchdog.map_or(PROBE_INTERVAL, |w| w.min(PROBE_INTERVAL));
        let health = Health::new(
            probe_every,
            Duration::from_millis(config.database.busy_timeout_ms),
        );
        let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
            (Some(cert), Some(key)) => Some(
                crate::tls::Tls::new(cert, key)
                    .context("config error at `server.tls_cert_file`")?,
            ),
            _ => None,
        };
        Ok(Application {
            pipeline,
            listener,
            metrics_listener,
            health,
            probe_every,
            pings_watchdog: watchdog.is_some(),
            tls,
            hangups,
            config_path: self.config_path,
        })
    }
}

/// The whole daemon, built and not yet running: its listeners are bound
/// (their addresses known), its store open, its pipeline wired. Dropped
/// without [`Application::run`], nothing of it has started.
pub struct Application {
    pipeline: Pipeline,
    listener: TcpListener,
    /// `None` when `server.metrics_listen = "off"`.
    metrics_listener: Option<TcpListener>,
    /// What `/healthz` answers from; the probe and every webhook commit feed it.
    health: Health,
    /// How often the health probe writes (at least as often as systemd's
    /// watchdog wants a ping).
    probe_every: Duration,
    /// Whether systemd asked for watchdog pings (the probe sends them).
    pings_watchdog: bool,
    /// Built-in HTTPS, when `server.tls_cert_file` is set.
    tls: Option<crate::tls::Tls>,
    /// SIGHUP, registered first thing in the build.
    hangups: Option<tokio::signal::unix::Signal>,
    /// The file a SIGHUP re-reads; `None`: only the certificate.
    config_path: Option<PathBuf>,
}

impl Application {
    /// Builds the daemon on `config`, binding `server.listen` and
    /// `server.metrics_listen` itself.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        Application::builder(config).build().await
    }

    /// A [`Builder`], for listeners bound by the caller or a config file to
    /// reload from.
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            listener: None,
            metrics_listener: None,
            config_path: None,
        }
    }

    /// The public listener's address.
    pub fn address(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The metrics listener's address; `None` when it is off.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The daemon's store (a cheap handle on the same pool and writer).
    pub fn store(&self) -> &Store {
        &self.pipeline.store
    }

    /// Runs the daemon until `shutdown` is cancelled, then stops cleanly.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            pipeline,
            listener,
            metrics_listener,
            health,
            probe_every,
            pings_watchdog,
            tls,
            hangups,
            config_path,
        } = self;
        let tasks = TaskTracker::new();
        let mut generation = Generation::start(&pipeline, &shutdown).await?;
        let (config, store) = (pipeline.config.clone(), pipeline.store.clone());

        let pg_sink = match crate::pgmirror::sink::serve_start(&config, &store).await {
            Ok(sink) => sink,
            Err(e) => {
                // Nothing is served yet: stop what the generation started
                // (schedules, fetch workers, retention) before giving up.
                generation.retire().await;
                return Err(e);
            }
        };

        // One probe before serving, so `/healthz` is right from the first request.
        health.probe(&store).await;
        tasks.spawn(health.clone().run(
            store.clone(),
            probe_every,
            pings_watchdog,
            shutdown.clone(),
        ));

        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = metrics_listener {
            let routes = metrics_routes(store.clone(), pipeline.metrics.clone(), health.clone());
            let limits = Limits {
                max_connections: 64,
                ..Limits::default()
            };
            tasks.spawn(server::serve(l, routes, limits, shutdown.clone()));
        }

        let addr = listener.local_addr().ok();
        tracing::info!(
            listen = ?addr,
            metrics_listen = ?metrics_addr,
            tls = config.server.tls_cert_file.is_some(),
            webhook_path = %config.server.webhook_path,
            database = %config.database.path.display(),
            tenants = ?config.tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            fetch_concurrency = config.fetch.concurrency,
            "skillsync serving"
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // Derived work proportional to the database runs only now, in batches.
        let rebuild = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(rebuild_reports(
            store.clone(),
            rebuild.clone(),
            shutdown.clone(),
        ));

        if let Some(tls) = &tls {
            tasks.spawn(tls.clone().watch(shutdown.clone()));
        }
        let limits = Limits {
            max_connections: config.server.max_connections,
            header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
            tls: tls.as_ref().map(|t| t.acceptor()),
            ..Limits::default()
        };
        let state = WebhookState::new(WebhookParts {
            config: config.clone(),
            store: store.clone(),
            wake: pipeline.wake.clone(),
            metrics: pipeline.metrics.clone(),
            health,
        });
        let running = Arc::new(tokio::sync::Mutex::new(Running {
            pipeline,
            generation,
            pg_sink,
        }));
        tasks.spawn(reload_on_hangup(Reloader {
            hangups,
            rebuild,
            config_path,
            tls,
            state: state.clone(),
            running: running.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        }));
        server::serve(listener, routes(state), limits, shutdown.clone()).await;

        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("stopping: draining fetches and reconciliation");
        let mut running = running.lock().await;
        let pg_sink = running.pg_sink.take();
        running.generation.retire().await;
        // Generations retired by reloads finish here too.
        tasks.close();
        tasks.wait().await;
        if let Some(sink) = pg_sink {
            run_blocking(move || sink.stop()).await;
        }
        if let Err(e) = store.checkpoint().await {
            tracing::warn!(error = %e, "WAL checkpoint at stop failed");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// What `serve` runs under the current config; a reload replaces it.
struct Running {
    pipeline: Pipeline,
    generation: Generation,
    pg_sink: Option<crate::pgmirror::sink::SinkHandle>,
}

/// One config's background work: fetch workers per tenant, schedules
/// (reconciliation and audits), retention. A reload starts the next generation before it retires this
/// one, so nothing queued waits; work is claimed through the database, so
/// the two never fetch one document at once.
struct Generation {
    fetcher: Arc<crate::fetcher::Fetcher>,
    reconciler: crate::reconcile::Reconciler,
    /// Stops this generation's fetch workers and retention (a child of the
    /// daemon's shutdown).
    stop: CancellationToken,
    /// Its fetch workers, retention, scheduled runs and audits.
    tasks: TaskTracker,
    /// The tenants' reconciliation and audit schedules, in one scheduler
    /// (reloaded with the rest on SIGHUP).
    scheduler: Option<tokio_cron_scheduler::JobScheduler>,
}

impl Generation {
    async fn start(p: &Pipeline, shutdown: &CancellationToken) -> anyhow::Result<Generation> {
        let stop = shutdown.child_token();
        let tasks = TaskTracker::new();
        // The schedules first: if they cannot start, nothing of this
        // generation runs. Scheduled runs stop only with the daemon: a
        // reload lets a run in progress finish under the config it started with.
        let mut jobs = p.reconciler.scheduled_jobs(shutdown, &tasks)?;
        jobs.extend(p.auditor.scheduled_jobs(shutdown, &tasks)?);
        let scheduler = crate::reconcile::start_scheduler(jobs).await?;
        p.spawn_fetchers(
            &tasks,
            p.config.tenants.iter().map(|t| &t.name),
            &stop,
            None,
        );
        tasks.spawn(crate::retention::run(
            p.store.clone(),
            p.config.clone(),
            stop.clone(),
        ));
        Ok(Generation {
            fetcher: p.fetcher.clone(),
            reconciler: p.reconciler.clone(),
            stop,
            tasks,
            scheduler,
        })
    }

    /// No new scheduled runs; fetch workers finish what is in flight (within
    /// their drain deadline); runs in progress finish; then this
    /// generation's leases and run locks are released.
    async fn retire(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            let _ = s.shutdown().await;
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.fetcher.release().await;
        self.reconciler.release_locks().await;
    }
}

/// What the SIGHUP task needs.
struct Reloader {
    hangups: Option<tokio::signal::unix::Signal>,
    /// Wakes [`rebuild_reports`] after a `[reporting]` change.
    rebuild: Arc<tokio::sync::Notify>,
    /// The file to re-read; `None` (tests, the demo): only the certificate.
    config_path: Option<PathBuf>,
    tls: Option<crate::tls::Tls>,
    state: WebhookState,
    running: Arc<tokio::sync::Mutex<Running>>,
    /// The daemon's tracker: retiring generations are waited for at stop.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// SIGHUP as a stream, registered at once so that from then on the signal's
/// default action (terminate) no longer applies.
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; reload with a restart instead");
            None
        }
    }
}

/// On each SIGHUP: tells systemd a reload began (`RELOADING=1` with
/// `MONOTONIC_USEC`, as `Type=notify-reload` expects), reloads, and says
/// `READY=1` with the outcome in `STATUS=` (and `ERRNO=` when the new config
/// was refused, which keeps the old one running).
async fn reload_on_hangup(mut r: Reloader) {
    let Some(mut hangups) = r.hangups.take() else {
        return;
    };
    loop {
        tokio::select! {
            _ = r.shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        let mut notify = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            notify.push(now);
        }
        let _ = sd_notify::notify(&notify);
        let cert = match &r.tls {
            Some(tls) if !tls.reload() => {
                tracing::error!(
                    "SIGHUP: the new TLS certificate was unusable; still serving the previous one"
                );
                false
            }
            _ => true,
        };
        let outcome = match &r.config_path {
            Some(path) => reload(&r, path).await,
            None => Ok("nothing to re-read (no config file)".to_string()),
        };
        let (status, errno) = match (&outcome, cert) {
            (Ok(what), true) => (format!("reloaded: {what}"), None),
            (Ok(what), false) => (
                format!("reloaded: {what}; the new TLS certificate was refused"),
                Some(EINVAL),
            ),
            (Err(e), _) => (
                format!("reload refused, still on the previous config: {e}"),
                Some(EINVAL),
            ),
        };
        let mut notify = vec![
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ];
        if let Some(errno) = errno {
            notify.push(sd_notify::NotifyState::Errno(errno));
        }
        let _ = sd_notify::notify(&notify);
    }
}

/// `EINVAL`: the value `ERRNO=` carries when the reloaded config is invalid.
const EINVAL: u32 = 22;

/// Re-reads and validates the whole file (every secret source with it)
/// before changing anything; then starts the next generation on it, points
/// the listener at its tenants and secrets, restarts the PostgreSQL sink if
/// `[postgres]` changed, and retires the previous generation in the
/// background. Settings that need a restart are named in the log and keep
/// their running values. The error names the key at fault, never a secret.
async fn reload(r: &Reloader, path: &std::path::Path) -> Result<String, String> {
    let path_owned = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path_owned))
        .await
        .map_err(|e| format!("the reload task failed: {e}"))?;
    let mut next = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                key = %e.key,
                error = %e,
                "SIGHUP: config refused; still serving with the previous config"
            );
            return Err(e.to_string());
        }
    };
    let mut running = r.running.lock().await;
    let current = running.pipeline.config.clone();
    let fixed = restart_only(&current, &next);
    if !fixed.is_empty() {
        tracing::warn!(
            keys = ?fixed,
            "SIGHUP: these settings change only with a restart; they keep their running values"
        );
        keep_restart_only(&current, &mut next);
    }
    let next = Arc::new(next);
    let pipeline = match running.pipeline.reloaded(next.clone()) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: cannot build the pipeline for the new config; still serving with the previous config");
            return Err(e.to_string());
        }
    };
    let generation = match Generation::start(&pipeline, &r.shutdown).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: cannot start the new config's schedules; still serving with the previous config");
            return Err(e.to_string());
        }
    };
    r.state.reload(next.clone(), pipeline.wake.clone());
    let mut previous = std::mem::replace(&mut running.generation, generation);
    running.pipeline = pipeline;
    r.tasks.spawn(async move { previous.retire().await });

    let mut changed = vec!["tenants and secrets"];
    if current.reporting != next.reporting {
        let spec = crate::reporting::ReportSpec::new(&next.reporting);
        match running.pipeline.store.set_report_spec(spec).await {
            Ok(()) => {
                changed.push("[reporting]");
                r.rebuild.notify_one();
            }
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: the report tables could not be reshaped for the new [reporting]; they keep the previous columns"
            ),
        }
    }
    if current.postgres != next.postgres || current.reporting != next.reporting {
        changed.push("the PostgreSQL sink");
        let store = running.pipeline.store.clone();
        if let Some(sink) = running.pg_sink.take() {
            run_blocking(move || sink.stop()).await;
        }
        match crate::pgmirror::sink::serve_start(&next, &store).await {
            Ok(sink) => running.pg_sink = sink,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the PostgreSQL sink did not start on the new config");
            }
        }
    }
    let tenants: Vec<&str> = next.tenants.iter().map(|t| t.name.as_str()).collect();
    let what = format!(
        "{} ({} tenants: {})",
        changed.join(", "),
        tenants.len(),
        tenants.join(", ")
    );
    tracing::info!(
        tenants = ?tenants,
        restart_needed = ?fixed,
        "SIGHUP: config reloaded: {what}"
    );
    Ok(what)
}

/// The settings a running `serve` cannot change: what is bound, opened or
/// built into the listener at start. Keys, for the log.
fn restart_only(current: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (&current.server, &next.server);
    let mut keys = Vec::new();
    for (key, differs) in [
        ("server.listen", a.listen != b.listen),
        (
            "server.metrics_listen",
            a.metrics_listen != b.metrics_listen,
        ),
        ("server.webhook_path", a.webhook_path != b.webhook_path),
        (
            "server.max_connections",
            a.max_connections != b.max_connections,
        ),
        (
            "server.header_read_timeout_secs",
            a.header_read_timeout_secs != b.header_read_timeout_secs,
        ),
        ("server.tls_cert_file", a.tls_cert_file != b.tls_cert_file),
        ("server.tls_key_file", a.tls_key_file != b.tls_key_file),
        ("database", current.database != next.database),
    ] {
        if differs {
            keys.push(key);
        }
    }
    keys
}

/// Puts the running values back into `next` for every setting of
/// [`restart_only`], so what runs and what the rest of the daemon reads agree.
fn keep_restart_only(current: &Config, next: &mut Config) {
    let s = &current.server;
    next.server.listen = s.listen;
    next.server.metrics_listen = s.metrics_listen;
    next.server.webhook_path = s.webhook_path.clone();
    next.server.max_connections = s.max_connections;
    next.server.header_read_timeout_secs = s.header_read_timeout_secs;
    next.server.tls_cert_file = s.tls_cert_file.clone();
    next.server.tls_key_file = s.tls_key_file.clone();
    next.database = current.database.clone();
}

/// Rows per batch of the background report rebuild: one write of a few
/// milliseconds, so webhooks committed beside it wait at most that long.
const REBUILD_BATCH: usize = 500;

/// Fills the report tables after a `[reporting]` change (at start-up or on
/// reload), one batch per write, until done; then waits for the next
/// change. Resumes where a killed daemon stopped (the position is committed
/// with each batch). Logs progress every 10 s.
async fn rebuild_reports(
    store: crate::store::Store,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut last_log = std::time::Instant::now();
    let mut total = None;
    loop {
        let batch_started = std::time::Instant::now();
        match store.rebuild_reports_step(REBUILD_BATCH, total).await {
            Ok(Some(st)) => {
                if st.total.is_none() {
                    // Counted once per rebuild, for the progress `status` shows.
                    total = store.report_rebuild_rows().await.ok();
                }
                if last_log.elapsed() >= Duration::from_secs(10) {
                    last_log = std::time::Instant::now();
                    tracing::info!(
                        phase = %st.phase,
                        done = st.done,
                        total = st.total.unwrap_or_default(),
                        "report rebuild in progress"
                    );
                }
                // At most half the writer's (and the disk's) time: pause as
                // long as the batch took. Webhooks commit in between, and the
                // checkpointer keeps up, so no fsync grows huge behind it.
                let pause = batch_started.elapsed().max(Duration::from_millis(1));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            Ok(None) => total = None,
            Err(e) => {
                tracing::warn!(error = %e, "report rebuild: a batch failed; retrying in 5 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
        }
    }
}

/// Half the systemd watchdog interval, when systemd asked for pings.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}
