//! Reconciliation: what makes the mirror complete when webhooks are lost.
//!
//! An incremental run lists documents modified since the watermark (minus an
//! overlap); a full sweep lists every id, and also marks documents gone
//! upstream as deleted (behind the `max_delete_fraction` valve). Both only
//! enqueue fetches — the fetch workers do the rest under the tenant's one
//! rate budget. [`plan`] decides, for one page, what to enqueue and what
//! counts as missed; it is pure and unit-tested alone.
//!
//! Paging is by keyset on (ModifiedOn, id): each page asks for
//! `ModifiedOn >= last seen` and skips the rows already seen at that exact
//! time, so equal timestamps across a page boundary are never skipped and a
//! document modified during the run moves to the end instead of shifting an
//! unseen one into an already-read offset. Only one page is held at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::model::{DocType, fmt_ts, parse_upstream_ts};
use crate::store::Store;
use crate::store::sync::{PageState, RunCounts};
use crate::upstream::{ListedDoc, Upstream};

/// How long a run lock lasts without renewal.
const LOCK_LEASE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Incremental,
    Full,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Incremental => "incremental",
            Kind::Full => "full",
        }
    }
}

/// What one page asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Documents to fetch, with the ModifiedOn the listing showed.
    pub enqueue: Vec<ListedDoc>,
    /// Documents found changed (or missing) that no queued fetch announced.
    pub missed: u64,
}

/// Decides one page: enqueue documents missing from the mirror, deleted
/// there, or newer upstream; count as missed the ones that needed a fetch no
/// webhook (or earlier run) had asked for.
///
/// Announced documents are enqueued too: a fetch already running may have
/// begun before the change the listing shows, and a recorded webhook may be
/// one a finished fetch already covered, so neither guarantees a fetch after
/// this change. Enqueueing a queued, unleased document only bumps its
/// generation (no extra fetch); a leased one is fetched once more.
pub fn plan(rows: &[ListedDoc], state: &PageState) -> Plan {
    let mut p = Plan::default();
    for row in rows {
        let needs = match state.mirror.get(&row.id) {
            None => true,
            Some(m) if m.deleted => true,
            Some(m) => match (&row.modified_on, &m.modified_on) {
                (Some(listed), Some(mirrored)) => listed > mirrored,
                (Some(_), None) => true,
                (None, _) => false,
            },
        };
        if !needs {
            continue;
        }
        if !state.queued.contains(&row.id) {
            p.missed += 1;
        }
        p.enqueue.push(row.clone());
    }
    p
}

/// The outcome of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub tenant: String,
    pub doc_type: String,
    pub kind: &'static str,
    pub status: &'static str,
    #[serde(flatten)]
    pub counts: RunCounts,
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("a reconciliation of {0} {1}s is already running")]
    Busy(String, DocType),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
}

/// Runs reconciliations; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    store: Store,
    upstream: Upstream,
    config: Arc<Config>,
    wake: Arc<HashMap<String, Arc<Notify>>>,
    owner: String,
}

impl Reconciler {
    pub fn new(
        store: Store,
        upstream: Upstream,
        config: Arc<Config>,
        wake: Arc<HashMap<String, Arc<Notify>>>,
        owner: String,
    ) -> Reconciler {
        Reconciler {
            store,
            upstream,
            config,
            wake,
            owner,
        }
    }

    /// Releases run locks this process holds (at stop).
    pub async fn release_locks(&self) {
        if let Err(e) = self.store.release_sync_locks(self.owner.clone()).await {
            tracing::warn!(error = %e, "could not release reconciliation locks; they expire on their own");
        }
    }

    /// One run for a tenant and type. Returns its summary (also written to
    /// `sync_runs`), or `Busy` when another run of the same tenant and type holds the lock.
    pub async fn run(
        &self,
        tenant: &str,
        doc_type: DocType,
        kind: Kind,
        force: bool,
        shutdown: &CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let tcfg = self
            .config
            .tenant(tenant)
            .ok_or_else(|| RunError::UnknownTenant(tenant.to_string()))?
            .clone();
        let started = Instant::now();
        let start_time = Utc::now();
        let lease = chrono::Duration::from_std(LOCK_LEASE).unwrap_or(chrono::Duration::minutes(5));
        if !self
            .store
            .acquire_sync_lock(
                tenant.to_string(),
                doc_type,
                self.owner.clone(),
                start_time,
                start_time + lease,
            )
            .await?
        {
            return Err(RunError::Busy(tenant.to_string(), doc_type));
        }
        let run_id = self
            .store
            .start_run(
                tenant.to_string(),
                doc_type,
                kind.as_str(),
                self.owner.clone(),
                start_time,
            )
            .await?;
        let mut counts = RunCounts::default();
        let result = self
            .list_and_enqueue(
                &tcfg,
                doc_type,
                kind,
                force,
                start_time,
                shutdown,
                &mut counts,
            )
            .await;
        let (status, error, watermark) = match result {
            Ok(w) => ("ok", None, if kind == Kind::Incremental { w } else { None }),
            Err(Failure::Interrupted) => (
                "interrupted",
                Some("stopped before the listing finished".to_string()),
                None,
            ),
            Err(Failure::Failed(e)) => ("failed", Some(e), None),
        };
        self.store
            .finish_run(
                run_id,
                tenant.to_string(),
                doc_type,
                self.owner.clone(),
                status,
                counts.clone(),
                error.clone(),
                watermark,
                Utc::now(),
            )
            .await?;
        let summary = RunSummary {
            tenant: tenant.to_string(),
            doc_type: doc_type.as_str().to_string(),
            kind: kind.as_str(),
            status,
            counts,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        let c = &summary.counts;
        if status == "ok" {
            tracing::info!(
                tenant,
                doc_type = doc_type.as_str(),
                kind = kind.as_str(),
                listed = c.listed,
                enqueued = c.enqueued,
                missed = c.missed,
                marked_deleted = c.marked_deleted,
                duration_ms = summary.duration_ms,
                "reconciliation finished"
            );
        } else {
            tracing::error!(
                tenant,
                doc_type = doc_type.as_str(),
                kind = kind.as_str(),
                status,
                listed = c.listed,
                enqueued = c.enqueued,
                error = summary.error.as_deref().unwrap_or(""),
                duration_ms = summary.duration_ms,
                "reconciliation did not finish"
            );
        }
        Ok(summary)
    }

    /// Starts fetching one listing page in its own task, so the next page is
    /// on its way while the current one is compared with the mirror.
    fn request_page(
        &self,
        tcfg: &crate::config::TenantConfig,
        doc_type: DocType,
        since: Option<String>,
        skip: u64,
    ) -> tokio::task::JoinHandle<Result<crate::upstream::ListPage, crate::upstream::CallError>>
    {
        let upstream = self.upstream.clone();
        let config = self.config.clone();
        let tcfg = tcfg.clone();
        let take = config.upstream.page_size;
        tokio::spawn(async move {
            upstream
                .list_page(&config, &tcfg, doc_type, skip, take, since.as_deref())
                .await
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn list_and_enqueue(
        &self,
        tcfg: &crate::config::TenantConfig,
        doc_type: DocType,
        kind: Kind,
        force: bool,
        start_time: chrono::DateTime<Utc>,
        shutdown: &CancellationToken,
        counts: &mut RunCounts,
    ) -> Result<Option<String>, Failure> {
        let tenant = tcfg.name.clone();
        let take = self.config.upstream.page_size;
        let since = match kind {
            Kind::Full => None,
            Kind::Incremental => self
                .store
                .watermark(tenant.clone(), doc_type)
                .await
                .map_err(|e| Failure::Failed(e.to_string()))?
                .and_then(|w| parse_upstream_ts(&w))
                .map(|w| {
                    fmt_ts(w - chrono::Duration::seconds(self.config.upstream.overlap_secs as i64))
                }),
        };
        let mut skip: u64 = 0;
        let mut max_seen: Option<String> = None;
        let mut seen: HashSet<String> = HashSet::new();
        let mut last_renew = Instant::now();
        let mut request = Some(self.request_page(tcfg, doc_type, since.clone(), 0));
        let mut cursor: Option<String> = since;
        while let Some(pending) = request.take() {
            if shutdown.is_cancelled() {
                pending.abort();
                return Err(Failure::Interrupted);
            }
            let page = match pending.await {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    return Err(Failure::Failed(format!(
                        "listing failed after {} documents: {e}",
                        counts.listed
                    )));
                }
                Err(e) => return Err(Failure::Failed(format!("listing task failed: {e}"))),
            };
            let n = page.rows.len();
            if n >= take as usize {
                // Ask for the next page now, while this one is compared with
                // the mirror: keyset on the last time seen, skipping the rows
                // at that time already read.
                match page.rows.last().and_then(|r| r.modified_on.clone()) {
                    Some(last) if cursor.as_deref() == Some(last.as_str()) => skip += n as u64,
                    Some(last) => {
                        skip = page
                            .rows
                            .iter()
                            .filter(|r| r.modified_on.as_deref() == Some(last.as_str()))
                            .count() as u64;
                        cursor = Some(last);
                    }
                    None => skip += n as u64, // no times: plain offsets
                }
                request = Some(self.request_page(tcfg, doc_type, cursor.clone(), skip));
            }
            let abort_next = |request: &Option<tokio::task::JoinHandle<_>>| {
                if let Some(r) = request {
                    r.abort();
                }
            };
            counts.listed += n as u64;
            let ids: Vec<String> = page.rows.iter().map(|r| r.id.clone()).collect();
            let state = match self.store.page_state(tenant.clone(), doc_type, ids).await {
                Ok(s) => s,
                Err(e) => {
                    abort_next(&request);
                    return Err(Failure::Failed(e.to_string()));
                }
            };
            let p = plan(&page.rows, &state);
            counts.missed += p.missed;
            if !p.enqueue.is_empty() {
                counts.enqueued += p.enqueue.len() as u64;
                let queued = self
                    .store
                    .enqueue_fetches(
                        tenant.clone(),
                        doc_type,
                        p.enqueue
                            .into_iter()
                            .map(|d| (d.id, d.modified_on))
                            .collect(),
                        Utc::now(),
                    )
                    .await;
                if let Err(e) = queued {
                    abort_next(&request);
                    return Err(Failure::Failed(e.to_string()));
                }
                if let Some(w) = self.wake.get(&tenant) {
                    w.notify_one();
                }
            }
            if kind == Kind::Full {
                seen.extend(page.rows.iter().map(|r| r.id.clone()));
            }
            for r in &page.rows {
                if let Some(m) = &r.modified_on {
                    if max_seen.as_ref().is_none_or(|x| m > x) {
                        max_seen = Some(m.clone());
                    }
                }
            }
            if last_renew.elapsed() > LOCK_LEASE / 4 {
                let until = Utc::now()
                    + chrono::Duration::from_std(LOCK_LEASE)
                        .unwrap_or(chrono::Duration::minutes(5));
                let _ = self
                    .store
                    .renew_sync_lock(tenant.clone(), doc_type, self.owner.clone(), until)
                    .await;
                last_renew = Instant::now();
            }
        }
        if kind == Kind::Full {
            let (candidates, live) = self
                .store
                .live_ids(tenant.clone(), doc_type, start_time)
                .await
                .map_err(|e| Failure::Failed(e.to_string()))?;
            let gone: Vec<String> = candidates
                .into_iter()
                .filter(|id| !seen.contains(id))
                .collect();
            let limit = (tcfg.max_delete_fraction * live as f64).floor() as u64;
            if !gone.is_empty() && gone.len() as u64 > limit && !force {
                return Err(Failure::Failed(format!(
                    "the sweep would mark {} of {} live {}s deleted, more than max_delete_fraction {} allows; nothing was marked (if this is right: skillsync reconcile --tenant {} --type {} --full --force)",
                    gone.len(),
                    live,
                    doc_type,
                    tcfg.max_delete_fraction,
                    tenant,
                    doc_type
                )));
            }
            if !gone.is_empty() {
                counts.marked_deleted = self
                    .store
                    .mark_deleted(tenant.clone(), doc_type, gone, Utc::now())
                    .await
                    .map_err(|e| Failure::Failed(e.to_string()))?;
            }
        }
        Ok(max_seen)
    }

    /// Registers the cron jobs of every tenant and type; runs are tracked by
    /// `tasks` so a stop waits for them (and marks them interrupted).
    pub async fn start_schedules(
        self,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<Option<tokio_cron_scheduler::JobScheduler>> {
        use tokio_cron_scheduler::{Job, JobScheduler};
        let mut jobs = Vec::new();
        for t in &self.config.tenants {
            for (schedule, kind) in [
                (&t.reconcile_schedule, Kind::Incremental),
                (&t.full_sweep_schedule, Kind::Full),
            ] {
                let Some(schedule) = schedule else { continue };
                for doc_type in DocType::ALL {
                    let me = self.clone();
                    let tenant = t.name.clone();
                    let token = shutdown.clone();
                    let tracker = tasks.clone();
                    let job = Job::new_async(schedule.as_str(), move |_id, _sched| {
                        let me = me.clone();
                        let tenant = tenant.clone();
                        let token = token.clone();
                        let tracker = tracker.clone();
                        Box::pin(async move {
                            if token.is_cancelled() {
                                return;
                            }
                            tracker.spawn(async move {
                                match me.run(&tenant, doc_type, kind, false, &token).await {
                                    Ok(_) => {}
                                    Err(RunError::Busy(..)) => tracing::info!(tenant = %tenant, doc_type = doc_type.as_str(), kind = kind.as_str(), "scheduled reconciliation skipped: another run is in progress"),
                                    Err(e) => tracing::error!(tenant = %tenant, doc_type = doc_type.as_str(), error = %e, "scheduled reconciliation failed"),
                                }
                            });
                        })
                    })?;
                    jobs.push(job);
                }
            }
        }
        if jobs.is_empty() {
            return Ok(None);
        }
        let sched = JobScheduler::new().await?;
        for job in jobs {
            sched.add(job).await?;
        }
        sched.start().await?;
        Ok(Some(sched))
    }
}

enum Failure {
    Interrupted,
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sync::MirrorState;

    fn row(id: &str, m: Option<&str>) -> ListedDoc {
        ListedDoc {
            id: id.into(),
            modified_on: m.map(str::to_string),
        }
    }

    #[test]
    fn plan_enqueues_missing_newer_and_deleted_only() {
        let t1 = "2026-11-01T00:00:00.000Z";
        let t2 = "2026-11-02T00:00:00.000Z";
        let mut state = PageState::default();
        state.mirror.insert(
            "same".into(),
            MirrorState {
                modified_on: Some(t2.into()),
                deleted: false,
            },
        );
        state.mirror.insert(
            "older".into(),
            MirrorState {
                modified_on: Some(t1.into()),
                deleted: false,
            },
        );
        state.mirror.insert(
            "gone".into(),
            MirrorState {
                modified_on: Some(t2.into()),
                deleted: true,
            },
        );
        state.mirror.insert(
            "queued".into(),
            MirrorState {
                modified_on: Some(t1.into()),
                deleted: false,
            },
        );
        state.queued.insert("queued".into());
        state.queued.insert("new-queued".into());
        let rows = vec![
            row("same", Some(t2)),
            row("older", Some(t2)),
            row("gone", Some(t2)),
            row("new", Some(t2)),
            row("queued", Some(t2)),
            row("new-queued", Some(t1)),
            row("no-time", None),
        ];
        let p = plan(&rows, &state);
        let ids: Vec<&str> = p.enqueue.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["older", "gone", "new", "queued", "new-queued", "no-time"]
        );
        assert_eq!(p.missed, 4, "announced documents are not missed");
    }

    #[test]
    fn plan_of_an_unchanged_page_is_empty() {
        let t = "2026-11-01T00:00:00.000Z";
        let mut state = PageState::default();
        state.mirror.insert(
            "a".into(),
            MirrorState {
                modified_on: Some(t.into()),
                deleted: false,
            },
        );
        assert_eq!(plan(&[row("a", Some(t))], &state), Plan::default());
    }
}
