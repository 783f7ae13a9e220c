//! `skillsync verify` as a library call: one accuracy audit
//! ([`crate::audit`]) of each chosen tenant and type, then the refetches it
//! queued, worked here beside any running `serve` (claims go through the
//! database), so the mirror is repaired when the command ends. Returns a
//! [`VerifyReport`]; printing it is the caller's business (`cli`, `demo`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Pipeline;
use crate::audit::{AuditError, AuditReport};
use crate::config::Config;
use crate::model::DocType;
use crate::store::ReportRole;

/// How many wrong documents the report names per audit.
const NAMED: usize = 20;

/// Everything one `verify` did.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub audits: Vec<AuditReport>,
    /// Audits that could not run (unknown tenant, database failure).
    pub errors: Vec<String>,
    /// Per tenant with refetches: fetches still queued after working the queue.
    pub still_queued: Vec<(String, i64)>,
}

/// What `verify` exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every sampled document that could be read matched (0).
    AllMatched,
    /// Some document was stale, missing or wrongly deleted (1).
    Mismatches,
    /// An audit could not run, or some sampled document could not be read
    /// upstream, and nothing wrong was found among the rest (2).
    Unreadable,
}

impl VerifyReport {
    pub fn verdict(&self) -> Verdict {
        if self.audits.iter().any(|a| a.counts.wrong() > 0) {
            Verdict::Mismatches
        } else if !self.errors.is_empty()
            || self
                .audits
                .iter()
                .any(|a| a.counts.unreadable > 0 || a.interrupted)
        {
            Verdict::Unreadable
        } else {
            Verdict::AllMatched
        }
    }
}

/// One paragraph per audit, then what is left queued.
impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.audits {
            writeln!(
                f,
                "{} {}: {} (of {} live and {} deleted)",
                a.tenant,
                a.doc_type,
                a.summary(),
                a.live_total,
                a.deleted_total
            )?;
            let c = &a.counts;
            if c.wrong() > 0 {
                writeln!(
                    f,
                    "  wrong: {} stale (other content upstream), {} missing (gone upstream, live here), {} wrongly deleted (served upstream, deleted here)",
                    c.stale, c.missing, c.wrongly_deleted
                )?;
                for (id, kind) in a.found.iter().take(NAMED) {
                    writeln!(f, "    {id} {kind}")?;
                }
                if a.found.len() > NAMED {
                    writeln!(f, "    … and {} more", a.found.len() - NAMED)?;
                }
            }
            if let Some(why) = &a.first_unreadable {
                writeln!(f, "  not readable upstream, e.g. {why}")?;
            }
            if a.interrupted {
                writeln!(f, "  stopped before every sampled document was checked")?;
            }
        }
        for e in &self.errors {
            writeln!(f, "{e}")?;
        }
        for (tenant, n) in &self.still_queued {
            writeln!(
                f,
                "{tenant}: refetches worked; fetches still queued: {n} (a running serve finishes them)"
            )?;
        }
        Ok(())
    }
}

/// What one `verify` audits, and how fast.
#[derive(Debug, Clone, Default)]
pub struct VerifyWhat {
    /// One tenant, or (`None`) every configured one.
    pub tenant: Option<String>,
    pub types: Vec<DocType>,
    /// Documents per type (`audit_sample` when `None`).
    pub sample: Option<usize>,
    /// GETs per second per audit: `None` the default
    /// ([`crate::audit::DEFAULT_MAX_RATE`]), `Some(0.0)` unpaced.
    pub max_rate: Option<f64>,
}

impl VerifyWhat {
    /// Every tenant and type, the configured sample, the default pace.
    pub fn everything() -> VerifyWhat {
        VerifyWhat {
            types: DocType::ALL.to_vec(),
            ..VerifyWhat::default()
        }
    }
}

/// One audit of each of `what.types` for `what.tenant` (or every tenant);
/// then the refetches it queued, until nothing is due within a minute.
pub async fn verify_once(
    config: Arc<Config>,
    what: VerifyWhat,
    token: CancellationToken,
) -> VerifyReport {
    let VerifyWhat {
        tenant,
        types,
        sample,
        max_rate,
    } = what;
    let mut report = VerifyReport::default();
    let pipeline = match Pipeline::build(config, ReportRole::Follower).await {
        Ok(p) => p,
        Err(e) => {
            report.errors.push(format!("cannot open the mirror: {e:#}"));
            return report;
        }
    };
    let auditor = match max_rate {
        None => pipeline.auditor.clone(),
        Some(r) => pipeline.auditor.clone().with_max_rate(Some(r)),
    };
    let tenants: Vec<String> = match tenant {
        Some(t) => vec![t],
        None => pipeline
            .config
            .tenants
            .iter()
            .map(|t| t.name.clone())
            .collect(),
    };
    for t in &tenants {
        for ty in &types {
            match auditor.audit(t, *ty, sample, &token).await {
                Ok(a) => report.audits.push(a),
                Err(e @ (AuditError::UnknownTenant(_) | AuditError::Busy(..))) => {
                    report.errors.push(format!("{t} {ty}: {e}"))
                }
                Err(e) => report.errors.push(format!("{t} {ty}: audit failed: {e}")),
            }
        }
    }
    let refetching: Vec<String> = tenants
        .iter()
        .filter(|t| {
            report
                .audits
                .iter()
                .any(|a| &a.tenant == *t && a.counts.refetched > 0)
        })
        .cloned()
        .collect();
    if refetching.is_empty() || token.is_cancelled() {
        return report;
    }
    let workers = TaskTracker::new();
    pipeline.spawn_fetchers(&workers, &refetching, &token, Some(Duration::from_secs(60)));
    workers.close();
    workers.wait().await;
    pipeline.fetcher.release().await;
    if let Ok(rows) = pipeline.store.status().await {
        for t in &refetching {
            let n = rows
                .iter()
                .filter(|r| &r.tenant == t)
                .map(|r| r.queued_fetches)
                .sum();
            report.still_queued.push((t.clone(), n));
        }
    }
    report
}
