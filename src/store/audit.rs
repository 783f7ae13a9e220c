//! The accuracy audit's statements: picking the sample (on a reader), the
//! mirror's view of one document at the moment it is compared (on a
//! reader), queueing refetches for what the audit found wrong (small writes
//! through the writer), and the `audits` table (one row per audit; what
//! `status`, `sync_status` and `/metrics` read back).
//!
//! Nothing here decides what is right or wrong: that is [`crate::audit`].

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::queue::{Ask, enqueue};
use super::{Store, StoreError};
use crate::model::{DocType, fmt_ts};

/// How many documents an audit picks, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SamplePlan {
    /// Live documents picked uniformly at random.
    pub random: usize,
    /// Live documents with the newest `modified_on`, beyond the random ones.
    pub recent: usize,
    /// Live documents with the oldest `modified_on`, beyond the random ones.
    pub oldest: usize,
    /// Documents marked deleted, picked at random.
    pub deleted: usize,
}

/// The documents an audit picked.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Live documents of the tenant and type when the sample was taken.
    pub live_total: u64,
    /// Documents marked deleted then.
    pub deleted_total: u64,
    /// Whether `random` holds every live document (a census).
    pub census: bool,
    pub random: Vec<String>,
    pub recent: Vec<String>,
    pub oldest: Vec<String>,
    pub deleted: Vec<String>,
}

/// The mirror's row of one document as the audit compares it.
#[derive(Debug, Clone)]
pub struct MirrorView {
    pub document: String,
    pub modified_on: Option<String>,
    pub fetched_at: String,
    pub deleted_at: Option<String>,
    /// A fetch of it is queued (not dead), or a webhook for it is recorded
    /// and not yet queued: the mirror is already catching up on it.
    pub pending: bool,
}

/// An audit's counts, as the `audits` row holds them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AuditCounts {
    pub sampled: u64,
    pub matched: u64,
    pub stale: u64,
    pub missing: u64,
    pub wrongly_deleted: u64,
    pub refetched: u64,
    pub unreadable: u64,
    pub in_flight: u64,
    /// Checked live documents the bound is computed from (the random ones).
    pub bound_sample: u64,
    /// How many of those were wrong.
    pub bound_wrong: u64,
    /// The one-sided 95% lower bound on the share of live documents that are right.
    pub accuracy_lower_bound: Option<f64>,
}

impl AuditCounts {
    /// Documents the audit found wrong: stale, missing or wrongly deleted.
    pub fn wrong(&self) -> u64 {
        self.stale + self.missing + self.wrongly_deleted
    }
}

/// The last finished audit of a tenant and type.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRow {
    pub tenant: String,
    pub doc_type: DocType,
    pub started_at: String,
    pub finished_at: String,
    #[serde(flatten)]
    pub counts: AuditCounts,
    /// Why the audit ended early (stopped, or the database failed), if it did.
    pub error: Option<String>,
}

/// The latest finished audit of every tenant and type, on any connection. A
/// database from before schema 8 has no `audits` table: no audits.
pub(super) fn last_audits(c: &Connection) -> Result<Vec<AuditRow>, StoreError> {
    let exists: bool = c.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'audits'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut s = c.prepare(
        "SELECT a.tenant, a.doc_type, a.started_at, a.finished_at, a.sampled, a.matched, a.stale, a.missing,
                a.wrongly_deleted, a.refetched, a.unreadable, a.in_flight, a.bound_sample, a.bound_wrong,
                a.accuracy_lower_bound, a.error
         FROM audits a
         JOIN (SELECT tenant, doc_type, max(id) AS id FROM audits
               WHERE finished_at IS NOT NULL GROUP BY tenant, doc_type) AS l ON l.id = a.id
         ORDER BY a.tenant, a.doc_type",
    )?;
    let rows = s.query_map([], |r| {
        let n = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
        Ok(AuditRow {
            tenant: r.get(0)?,
            doc_type: r.get(1)?,
            started_at: r.get(2)?,
            finished_at: r.get(3)?,
            counts: AuditCounts {
                sampled: n(4)?,
                matched: n(5)?,
                stale: n(6)?,
                missing: n(7)?,
                wrongly_deleted: n(8)?,
                refetched: n(9)?,
                unreadable: n(10)?,
                in_flight: n(11)?,
                bound_sample: n(12)?,
                bound_wrong: n(13)?,
                accuracy_lower_bound: r.get(14)?,
            },
            error: r.get(15)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Ids of a live or deleted selection, as the statement orders them.
fn ids(c: &Connection, sql: &str, tenant: &str, limit: usize) -> Result<Vec<String>, StoreError> {
    let mut s = c.prepare(sql)?;
    let rows = s.query_map(params![tenant, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Picks the sample in one read transaction, so the counts and the ids agree.
fn pick(c: &Connection, tenant: &str, ty: DocType, plan: SamplePlan) -> Result<Sample, StoreError> {
    let table = ty.table();
    c.execute_batch("BEGIN")?;
    let picked = (|| {
        let (live_total, deleted_total): (i64, i64) = c.query_row(
            &format!(
                "SELECT count(CASE WHEN deleted_at IS NULL THEN 1 END), count(deleted_at) FROM {table} WHERE tenant = ?1"
            ),
            [tenant],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let live_total = live_total.max(0) as u64;
        // `ORDER BY random()` reads every live row of the tenant once, on
        // this reader: a uniform sample without replacement.
        let random = ids(
            c,
            &format!(
                "SELECT id FROM {table} WHERE tenant = ?1 AND deleted_at IS NULL ORDER BY random() LIMIT ?2"
            ),
            tenant,
            plan.random,
        )?;
        let census = random.len() as u64 >= live_total;
        let chosen: std::collections::HashSet<&str> = random.iter().map(String::as_str).collect();
        let beyond = |order: &str, n: usize| -> Result<Vec<String>, StoreError> {
            if n == 0 || census {
                return Ok(Vec::new());
            }
            let all = ids(
                c,
                &format!(
                    "SELECT id FROM {table} WHERE tenant = ?1 AND deleted_at IS NULL
                     ORDER BY coalesce(modified_on, fetched_at) {order}, id LIMIT ?2"
                ),
                tenant,
                n + chosen.len(),
            )?;
            Ok(all
                .into_iter()
                .filter(|id| !chosen.contains(id.as_str()))
                .take(n)
                .collect())
        };
        let recent = beyond("DESC", plan.recent)?;
        let mut oldest = beyond("ASC", plan.oldest)?;
        oldest.retain(|id| !recent.contains(id));
        let deleted = ids(
            c,
            &format!(
                "SELECT id FROM {table} WHERE tenant = ?1 AND deleted_at IS NOT NULL ORDER BY random() LIMIT ?2"
            ),
            tenant,
            plan.deleted,
        )?;
        Ok(Sample {
            live_total,
            deleted_total: deleted_total.max(0) as u64,
            census,
            random,
            recent,
            oldest,
            deleted,
        })
    })();
    let _ = c.execute_batch("COMMIT");
    picked
}

impl Store {
    /// How many live and deleted documents `tenant` has of `doc_type`.
    pub async fn audit_population(
        &self,
        tenant: String,
        doc_type: DocType,
    ) -> Result<(u64, u64), StoreError> {
        self.read(move |c| {
            let (live, deleted): (i64, i64) = c.query_row(
                &format!(
                    "SELECT count(CASE WHEN deleted_at IS NULL THEN 1 END), count(deleted_at) FROM {} WHERE tenant = ?1",
                    doc_type.table()
                ),
                [tenant],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok((live.max(0) as u64, deleted.max(0) as u64))
        })
        .await
    }

    /// Picks an audit's documents as `plan` says (on a reader).
    pub async fn audit_sample(
        &self,
        tenant: String,
        doc_type: DocType,
        plan: SamplePlan,
    ) -> Result<Sample, StoreError> {
        self.read(move |c| pick(c, &tenant, doc_type, plan)).await
    }

    /// The mirror's row of one document, read when the audit compares it
    /// (after its GET answered); `None` if there is no row.
    pub async fn audit_view(
        &self,
        tenant: String,
        doc_type: DocType,
        id: String,
    ) -> Result<Option<MirrorView>, StoreError> {
        self.read(move |c| {
            // The terms of the partial indexes are spelled out: the queue
            // row by its key, the recorded event by `queued = 0`.
            Ok(c.prepare_cached(&format!(
                "SELECT m.document, m.modified_on, m.fetched_at, m.deleted_at,
                        EXISTS (SELECT 1 FROM fetch_queue q WHERE q.tenant = ?1 AND q.doc_type = ?3 AND q.doc_id = ?2 AND q.status = 'queued')
                        OR EXISTS (SELECT 1 FROM events e WHERE e.tenant = ?1 AND e.doc_type = ?3 AND e.doc_id = ?2 AND e.queued = 0)
                 FROM {} m WHERE m.tenant = ?1 AND m.id = ?2",
                doc_type.table()
            ))?
            .query_row(params![tenant, id, doc_type.as_str()], |r| {
                Ok(MirrorView {
                    document: r.get(0)?,
                    modified_on: r.get(1)?,
                    fetched_at: r.get(2)?,
                    deleted_at: r.get(3)?,
                    pending: r.get(4)?,
                })
            })
            .optional()?)
        })
        .await
    }

    /// Records that an audit began; returns its id.
    pub async fn start_audit(
        &self,
        tenant: String,
        doc_type: DocType,
        started_at: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let at = fmt_ts(started_at);
        self.write_one(move |c| {
            c.execute(
                "INSERT INTO audits (tenant, doc_type, started_at) VALUES (?1, ?2, ?3)",
                params![tenant, doc_type.as_str(), at],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// Queues a fetch of each of `ids` (reason `audit`, background work)
    /// in one write: a document already queued keeps its place and is
    /// fetched once more; a dead one is revived. Returns how many were queued.
    pub async fn queue_audit_refetches(
        &self,
        tenant: String,
        doc_type: DocType,
        ids: Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.write(move |c| {
            let now = fmt_ts(now);
            for id in &ids {
                enqueue(
                    c,
                    &tenant,
                    doc_type.as_str(),
                    id,
                    Ask {
                        reason: "audit",
                        requested_at: &now,
                        sweep_run: None,
                    },
                    &now,
                )?;
            }
            Ok(ids.len() as u64)
        })
        .await
    }

    /// Records an audit's end with its counts (and, if it ended early, why).
    pub async fn finish_audit(
        &self,
        id: i64,
        counts: AuditCounts,
        error: Option<String>,
        finished_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let at = fmt_ts(finished_at);
        self.write_one(move |c| {
            let n = |v: u64| v.min(i64::MAX as u64) as i64;
            c.execute(
                "UPDATE audits SET finished_at = ?2, sampled = ?3, matched = ?4, stale = ?5, missing = ?6,
                        wrongly_deleted = ?7, refetched = ?8, unreadable = ?9, in_flight = ?10,
                        bound_sample = ?11, bound_wrong = ?12, accuracy_lower_bound = ?13, error = ?14
                 WHERE id = ?1",
                params![
                    id,
                    at,
                    n(counts.sampled),
                    n(counts.matched),
                    n(counts.stale),
                    n(counts.missing),
                    n(counts.wrongly_deleted),
                    n(counts.refetched),
                    n(counts.unreadable),
                    n(counts.in_flight),
                    n(counts.bound_sample),
                    n(counts.bound_wrong),
                    counts.accuracy_lower_bound,
                    error
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// The latest finished audit of every tenant and type.
    pub async fn last_audits(&self) -> Result<Vec<AuditRow>, StoreError> {
        self.read(last_audits).await
    }
}
