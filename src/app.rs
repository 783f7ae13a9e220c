//! `run()`: the daemon wired together, the same for `skillsync serve`, the
//! demo and the tests. Takes the bound listener and the shutdown token from
//! the caller (tests bind port 0 and cancel when they like); [`run_with`]
//! takes the metrics listener too.
//!
//! Two listeners: the public one (webhook path and `/healthz` only) and,
//! unless `server.metrics_listen = "off"`, the metrics one (`/metrics`,
//! detailed `/healthz`). SIGHUP reloads what can change without a restart
//! (the TLS certificate) and never stops the daemon.
//!
//! Stop order: the HTTP server stops accepting and finishes in-flight
//! requests (their events are committed or refused), fetchers finish what is
//! in flight within a deadline and release the rest, scheduled runs are
//! marked interrupted, then the WAL is checkpointed.

pub mod oneshot;
mod pipeline;

pub use pipeline::{Pipeline, open_store};

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::health::{Health, PROBE_INTERVAL};
use crate::http::{WebhookState, metrics_routes, routes};
use crate::server::{self, Limits};
use crate::store::report::ReportRole;
use crate::store::run_blocking;

/// Binds `server.metrics_listen` (`None` when it is "off"); the error names the key.
pub async fn bind_metrics(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    match config.server.metrics_listen {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr).await.map(Some).with_context(|| {
            format!("config error at `server.metrics_listen`: cannot listen on {addr}")
        }),
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops cleanly; binds
/// the metrics listener itself from the config.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics_listener = bind_metrics(&config).await?;
    run_with(config, listener, metrics_listener, shutdown).await
}

/// [`run`] with the metrics listener bound by the caller (tests bind port 0
/// and read its address); `None` serves no metrics.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything can take a while: from here on SIGHUP never stops us.
    let hangups = hangup_signals();
    let pipeline = Pipeline::build(Arc::new(config), ReportRole::Owner).await?;
    let tasks = TaskTracker::new();
    let tenants = pipeline.config.tenants.iter().map(|t| &t.name);
    pipeline.spawn_fetchers(&tasks, tenants, &shutdown, None);
    let (config, store) = (pipeline.config.clone(), pipeline.store.clone());
    let scheduler = pipeline
        .reconciler
        .clone()
        .start_schedules(shutdown.clone(), &tasks)
        .await?;
    tasks.spawn(crate::retention::run(
        store.clone(),
        config.clone(),
        shutdown.clone(),
    ));

    let pg_sink = crate::pgmirror::sink::serve_start(&config, &store).await?;

    let watchdog = watchdog_interval();
    let probe_every = watchdog.map_or(PROBE_INTERVAL, |w| w.min(PROBE_INTERVAL));
    let health = Health::new(
        probe_every,
        Duration::from_millis(config.database.busy_timeout_ms),
    );
    // One probe before serving, so `/healthz` is right from the first request.
    health.probe(&store).await;
    tasks.spawn(health.clone().run(
        store.clone(),
        probe_every,
        watchdog.is_some(),
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

    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::Tls::new(cert, key)
                .context("config error at `server.tls_cert_file`")?;
            tasks.spawn(tls.clone().watch(shutdown.clone()));
            Some(tls)
        }
        _ => None,
    };
    tasks.spawn(reload_on_hangup(hangups, tls.clone(), shutdown.clone()));
    let tls = tls.map(|t| t.acceptor());
    let limits = Limits {
        max_connections: config.server.max_connections,
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
        tls,
        ..Limits::default()
    };
    let state = WebhookState::new(
        config.clone(),
        store.clone(),
        pipeline.wake.clone(),
        pipeline.metrics.clone(),
        health,
    );
    server::serve(listener, routes(state), limits, shutdown.clone()).await;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping: draining fetches and reconciliation");
    if let Some(mut s) = scheduler {
        let _ = s.shutdown().await;
    }
    tasks.close();
    tasks.wait().await;
    pipeline.fetcher.release().await;
    pipeline.reconciler.release_locks().await;
    if let Some(sink) = pg_sink {
        run_blocking(move || sink.stop()).await;
    }
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "WAL checkpoint at stop failed");
    }
    tracing::info!("stopped");
    Ok(())
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

/// On each SIGHUP, reloads what can change without a restart and says what
/// it reloaded. Everything else in the config needs a restart.
async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    tls: Option<crate::tls::Tls>,
    shutdown: CancellationToken,
) {
    let Some(mut hangups) = hangups else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        match &tls {
            Some(tls) => {
                let ok = tls.reload();
                tracing::info!(
                    reloaded = if ok { "tls_certificate" } else { "nothing" },
                    "SIGHUP: reload done{}; other config changes need a restart",
                    if ok {
                        " (TLS certificate)"
                    } else {
                        " (the new TLS certificate was unusable; still serving the previous one)"
                    }
                );
            }
            None => tracing::info!(
                reloaded = "nothing",
                "SIGHUP: reload done; nothing to reload without TLS (other config changes need a restart)"
            ),
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
