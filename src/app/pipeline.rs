//! The pipeline wired in one place: store, metrics, upstream client,
//! fetcher, wake-ups, reconciler and auditor, built the same way for `serve`
//! (inside [`crate::app::Application`]), `reconcile` ([`crate::app::oneshot`])
//! and `verify` ([`crate::app::verify`]). What runs on top (listeners,
//! schedules, the PostgreSQL sink) is the application's.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Auditor;
use crate::budget::Budgets;
use crate::config::Config;
use crate::fetcher::Fetcher;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::store::ReportRole;
use crate::store::{Store, run_blocking};
use crate::upstream::Upstream;
use crate::wake::{self, Wake};

/// Opens the database on a blocking thread. `serve` opens it as the
/// [`ReportRole::Owner`] of the report tables; operator commands beside it
/// as a follower, so they never rebuild those tables under a running daemon.
pub async fn open_store(config: &Config, role: ReportRole) -> anyhow::Result<Store> {
    let path = config.database.path.clone();
    let busy = Duration::from_millis(config.database.busy_timeout_ms);
    let shown = path.display().to_string();
    let group = config.database.group_commit;
    let report = crate::reporting::ReportSpec::new(&config.reporting);
    run_blocking(move || Store::open_with_report(&path, busy, group, report, role))
        .await
        .with_context(|| format!("cannot use database {shown}"))
}

/// The parts of one process's pipeline; cheap handles, clone what you need.
pub struct Pipeline {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Metrics,
    /// Claims queued documents, GETs them upstream, stores them.
    pub fetcher: Arc<Fetcher>,
    /// Shares the fetcher's lock owner name, so one process is one owner.
    pub reconciler: Reconciler,
    /// The accuracy audit (`verify`, `audit_schedule`), on the same budgets.
    pub auditor: Auditor,
    /// Wakes a tenant's fetch workers when the webhook or a run queues work.
    pub wake: Wake,
    /// The per-tenant request budgets every upstream call draws from; kept
    /// across reloads (a configured rate change applies to them).
    budgets: Budgets,
    /// The upstream client; a reload's new one shares its listing turns.
    upstream: Upstream,
}

impl Pipeline {
    /// Opens the store in `role` and wires the rest to it.
    pub async fn build(config: Arc<Config>, role: ReportRole) -> anyhow::Result<Pipeline> {
        let store = open_store(&config, role).await?;
        let metrics = Metrics::install();
        let wake = wake::for_tenants(&config);
        let budgets = Budgets::new(metrics.clone());
        Pipeline::wire(config, store, metrics, wake, budgets, None)
    }

    /// A pipeline for a reloaded `config` on the same store, metrics and
    /// request budgets: a new upstream client (new credentials), fetcher (a new lease owner, so
    /// this pipeline's leases and the new one's are released apart) and
    /// reconciler. A tenant kept across the reload keeps its wake-up, so a
    /// run of the old pipeline still finishing wakes the new fetch workers.
    pub fn reloaded(&self, config: Arc<Config>) -> anyhow::Result<Pipeline> {
        let wake: Wake = Arc::new(
            config
                .tenants
                .iter()
                .map(|t| {
                    let n = self.wake.get(&t.name).cloned().unwrap_or_default();
                    (t.name.clone(), n)
                })
                .collect(),
        );
        Pipeline::wire(
            config,
            self.store.clone(),
            self.metrics.clone(),
            wake,
            self.budgets.clone(),
            Some(&self.upstream),
        )
    }

    fn wire(
        config: Arc<Config>,
        store: Store,
        metrics: Metrics,
        wake: Wake,
        budgets: Budgets,
        previous: Option<&Upstream>,
    ) -> anyhow::Result<Pipeline> {
        let upstream = Upstream::with_budgets(&config, budgets.clone())?;
        let upstream = match previous {
            Some(p) => upstream.sharing_listings(p),
            None => upstream,
        };
        let fetcher = Fetcher::new(
            store.clone(),
            upstream.clone(),
            config.clone(),
            metrics.clone(),
        );
        let auditor = Auditor::new(
            store.clone(),
            upstream.clone(),
            config.clone(),
            wake.clone(),
        );
        let reconciler = Reconciler::new(
            store.clone(),
            upstream.clone(),
            config.clone(),
            wake.clone(),
            fetcher.owner().to_string(),
        );
        Ok(Pipeline {
            config,
            store,
            metrics,
            fetcher,
            reconciler,
            auditor,
            wake,
            budgets,
            upstream,
        })
    }

    /// Spawns a fetch worker loop on `tasks` for each of `tenants`; with
    /// `until_idle`, each returns once nothing is due within that horizon.
    pub fn spawn_fetchers<'a>(
        &self,
        tasks: &TaskTracker,
        tenants: impl IntoIterator<Item = &'a String>,
        shutdown: &CancellationToken,
        until_idle: Option<Duration>,
    ) {
        for tenant in tenants {
            let notify = self.wake.get(tenant).cloned().unwrap_or_default();
            tasks.spawn(self.fetcher.clone().run_tenant(
                tenant.clone(),
                notify,
                shutdown.clone(),
                until_idle,
            ));
        }
    }
}
