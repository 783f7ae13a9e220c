//! `run()`: the daemon wired together, the same for `skillsync serve`, the
//! demo and the tests. Takes the bound listener and the shutdown token from
//! the caller (tests bind port 0 and cancel when they like).
//!
//! Stop order: the HTTP server stops accepting and finishes in-flight
//! requests (their events are committed or refused), fetchers finish what is
//! in flight within a deadline and release the rest, scheduled runs are
//! marked interrupted, then the WAL is checkpointed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::fetcher::Fetcher;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::server::{self, Limits};
use crate::store::{Store, run_blocking};
use crate::upstream::Upstream;
use crate::webhook::{WebhookState, routes};

/// Opens the database on a blocking thread.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let path = config.database.path.clone();
    let busy = Duration::from_millis(config.database.busy_timeout_ms);
    let shown = path.display().to_string();
    let group = config.database.group_commit;
    let report = crate::reporting::ReportSpec::new(&config.reporting);
    run_blocking(move || Store::open_with_report(&path, busy, group, report))
        .await
        .with_context(|| format!("cannot use database {shown}"))
}

/// Runs the daemon until `shutdown` is cancelled, then stops cleanly.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store = open_store(&config).await?;
    let metrics = Metrics::install();
    let upstream = Upstream::new(&config)?;
    let fetcher = Fetcher::new(
        store.clone(),
        upstream.clone(),
        config.clone(),
        metrics.clone(),
    );
    let wake: Arc<HashMap<String, Arc<Notify>>> = Arc::new(
        config
            .tenants
            .iter()
            .map(|t| (t.name.clone(), Arc::new(Notify::new())))
            .collect(),
    );

    let tasks = TaskTracker::new();
    for (tenant, notify) in wake.iter() {
        tasks.spawn(fetcher.clone().run_tenant(
            tenant.clone(),
            notify.clone(),
            shutdown.clone(),
            None,
        ));
    }
    let reconciler = Reconciler::new(
        store.clone(),
        upstream,
        config.clone(),
        wake.clone(),
        fetcher.owner().to_string(),
    );
    let scheduler = reconciler
        .clone()
        .start_schedules(shutdown.clone(), &tasks)
        .await?;
    tasks.spawn(crate::retention::run(
        store.clone(),
        config.clone(),
        shutdown.clone(),
    ));

    let addr = listener.local_addr().ok();
    tracing::info!(
        listen = ?addr,
        tls = config.server.tls_cert_file.is_some(),
        webhook_path = %config.server.webhook_path,
        database = %config.database.path.display(),
        tenants = ?config.tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        fetch_concurrency = config.fetch.concurrency,
        "skillsync serving"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = watchdog_interval() {
        let token = shutdown.clone();
        let probe = store.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {
                        // Ping only while the writer answers: a wedged writer gets us restarted.
                        if probe.probe_write(crate::model::now_ts()).await.is_ok() {
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                        }
                    }
                }
            }
        });
    }

    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::Tls::new(cert, key)
                .context("config error at `server.tls_cert_file`")?;
            tasks.spawn(tls.clone().watch(shutdown.clone()));
            Some(tls.acceptor())
        }
        _ => None,
    };
    let limits = Limits {
        max_connections: config.server.max_connections,
        header_read_timeout: Duration::from_secs(config.server.header_read_timeout_secs),
        tls,
        ..Limits::default()
    };
    let state = WebhookState::new(config.clone(), store.clone(), wake, metrics);
    server::serve(listener, routes(state), limits, shutdown.clone()).await;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping: draining fetches and reconciliation");
    if let Some(mut s) = scheduler {
        let _ = s.shutdown().await;
    }
    tasks.close();
    tasks.wait().await;
    fetcher.release().await;
    reconciler.release_locks().await;
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "WAL checkpoint at stop failed");
    }
    tracing::info!("stopped");
    Ok(())
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
