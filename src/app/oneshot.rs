//! `skillsync reconcile` as a library call: one reconciliation of the chosen
//! tenants and types, then the fetches it queued, worked here beside any
//! running `serve` (claims go through the database). Returns a
//! [`ReconcileReport`]; printing it is the caller's business (`cli`, `demo`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Pipeline;
use crate::config::Config;
use crate::model::{DocType, RunKind, RunStatus};
use crate::reconcile::{RunError, RunSummary};
use crate::store::ReportRole;

/// How one tenant and type's run went.
#[derive(Debug)]
pub enum RunOutcome {
    /// The run happened (its status may still be `failed`).
    Ran(RunSummary),
    /// Another process holds the run lock; nothing was done.
    Skipped {
        tenant: String,
        doc_type: DocType,
        reason: String,
    },
}

/// A full sweep's candidates that the confirming GETs found gone.
#[derive(Debug)]
pub struct ConfirmedDeletions {
    pub tenant: String,
    pub doc_type: DocType,
    pub kind: RunKind,
    pub marked: u64,
    pub candidates: u64,
}

/// What is left for a tenant once the fetches are worked.
#[derive(Debug)]
pub struct TenantBacklog {
    pub tenant: String,
    pub queued_fetches: i64,
    pub dead_documents: i64,
    /// Events by status.
    pub events: Vec<(String, i64)>,
}

/// Everything a one-shot reconciliation did, in the order it did it. A
/// failure part-way keeps what was done before it, in `error`.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub runs: Vec<RunOutcome>,
    pub deletions: Vec<ConfirmedDeletions>,
    pub backlog: Vec<TenantBacklog>,
    pub error: Option<anyhow::Error>,
}

impl ReconcileReport {
    /// Whether every run happened and ended `ok`.
    pub fn all_ok(&self) -> bool {
        self.runs
            .iter()
            .all(|r| matches!(r, RunOutcome::Ran(s) if s.status == RunStatus::Ok.as_str()))
    }

    /// `Err` when the reconciliation stopped on an error, else [`Self::all_ok`].
    pub fn outcome(self) -> anyhow::Result<bool> {
        let ok = self.all_ok();
        match self.error {
            Some(e) => Err(e),
            None => Ok(ok),
        }
    }
}

/// One line per run, per confirmed deletion and per tenant's backlog.
impl fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.runs {
            match r {
                RunOutcome::Ran(s) => writeln!(
                    f,
                    "{} {} {}: {} (listed {}, enqueued {}, missed {}, deletion candidates {}){}",
                    s.tenant,
                    s.doc_type,
                    s.kind,
                    s.status,
                    s.counts.listed,
                    s.counts.enqueued,
                    s.counts.missed,
                    s.counts.candidates,
                    s.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )?,
                RunOutcome::Skipped {
                    tenant,
                    doc_type,
                    reason,
                } => writeln!(f, "{tenant} {doc_type}: skipped: {reason}")?,
            }
        }
        for d in &self.deletions {
            writeln!(
                f,
                "{} {} {}: {} of {} deletion candidates confirmed gone and marked deleted",
                d.tenant, d.doc_type, d.kind, d.marked, d.candidates
            )?;
        }
        for b in &self.backlog {
            let events = if b.events.is_empty() {
                "none".to_string()
            } else {
                b.events
                    .iter()
                    .map(|(status, n)| format!("{n} {status}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "{}: fetches still queued {}, dead documents {}; events: {events}",
                b.tenant, b.queued_fetches, b.dead_documents
            )?;
        }
        Ok(())
    }
}

/// What a one-shot reconciliation covers, and how.
#[derive(Debug, Clone)]
pub struct OneShot {
    /// One tenant, or (`None`) every configured one.
    pub tenant: Option<String>,
    pub types: Vec<DocType>,
    pub kind: RunKind,
    /// With a full sweep: mark deletions even beyond `max_delete_fraction`.
    pub force: bool,
}

impl OneShot {
    /// Every tenant and type, without `force`.
    pub fn everything(kind: RunKind) -> OneShot {
        OneShot {
            tenant: None,
            types: DocType::ALL.to_vec(),
            kind,
            force: false,
        }
    }
}

/// One reconciliation of what `what` names, then the fetches it queued
/// until nothing is due within a minute, then the deletions those fetches
/// confirmed.
pub async fn reconcile_once(
    config: Arc<Config>,
    what: OneShot,
    token: CancellationToken,
) -> ReconcileReport {
    let mut report = ReconcileReport::default();
    if let Err(e) = reconcile_into(&mut report, config, what, token).await {
        report.error = Some(e);
    }
    report
}

async fn reconcile_into(
    report: &mut ReconcileReport,
    config: Arc<Config>,
    what: OneShot,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let pipeline = Pipeline::build(config, ReportRole::Follower).await?;
    let (config, store) = (&pipeline.config, &pipeline.store);
    let tenants: Vec<String> = match what.tenant {
        Some(t) => vec![t],
        None => config.tenants.iter().map(|t| t.name.clone()).collect(),
    };
    for t in &tenants {
        for ty in &what.types {
            match pipeline
                .reconciler
                .run(t, *ty, what.kind, what.force, &token)
                .await
            {
                Ok(s) => report.runs.push(RunOutcome::Ran(s)),
                Err(e @ RunError::Busy(..)) => report.runs.push(RunOutcome::Skipped {
                    tenant: t.clone(),
                    doc_type: *ty,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Work the queue of these tenants until nothing is due within a minute.
    let workers = TaskTracker::new();
    pipeline.spawn_fetchers(&workers, &tenants, &token, Some(Duration::from_secs(60)));
    workers.close();
    workers.wait().await;
    pipeline.fetcher.release().await;
    // Deletions are confirmed by the GETs just made (404/410).
    let sweeps: Vec<(i64, ConfirmedDeletions)> = report
        .runs
        .iter()
        .filter_map(|r| match r {
            RunOutcome::Ran(s) if s.counts.candidates > 0 => Some((
                s.run_id,
                ConfirmedDeletions {
                    tenant: s.tenant.clone(),
                    doc_type: s.doc_type,
                    kind: s.kind,
                    marked: 0,
                    candidates: s.counts.candidates,
                },
            )),
            _ => None,
        })
        .collect();
    for (run_id, mut d) in sweeps {
        d.marked = store.run_marked_deleted(run_id).await?;
        report.deletions.push(d);
    }
    for t in &tenants {
        let events = store.event_counts(t.clone()).await?;
        let status = store.status().await?;
        let mine = || status.iter().filter(|r| &r.tenant == t);
        report.backlog.push(TenantBacklog {
            tenant: t.clone(),
            queued_fetches: mine().map(|r| r.queued_fetches).sum(),
            dead_documents: mine().map(|r| r.dead_documents).sum(),
            events,
        });
    }
    // No checkpoint here: `serve` may be running, and a checkpoint that
    // waits for readers holds its writers (webhook intake) meanwhile.
    // SQLite's automatic checkpoints are passive; `serve` truncates the WAL
    // at its own stop.
    Ok(())
}
