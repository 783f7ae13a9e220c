//! What `skillsync status`, `/metrics` and the demo read: one row per tenant
//! and type from the `sync_status` view (the same numbers a report sees),
//! plus upstream-auth failures and the drift totals; and each tenant's
//! latest upstream throttling (429), which the daemon records.

use rusqlite::Connection;

use super::{Store, StoreError};
use crate::model::{DocType, RunKind, RunStatus};

/// Per tenant and type, as `status` and `/metrics` report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusRow {
    pub tenant: String,
    pub doc_type: DocType,
    pub mirrored: i64,
    pub deleted: i64,
    pub pending_events: i64,
    pub queued_fetches: i64,
    pub retrying_fetches: i64,
    pub dead_events: i64,
    pub dead_documents: i64,
    pub oldest_pending_at: Option<String>,
    pub last_ok_started_at: Option<String>,
    pub last_ok_finished_at: Option<String>,
    pub last_run_kind: Option<RunKind>,
    pub last_run_status: Option<RunStatus>,
    pub last_run_finished_at: Option<String>,
    pub last_run_missed: Option<i64>,
    pub last_run_error: Option<String>,
    pub complete_as_of: Option<String>,
    /// Documents whose last fetch failed with 401/403.
    pub auth_failing: i64,
    /// `missed` summed over every run: changes no webhook announced.
    pub missed_total: i64,
    /// Documents whose 404/410 was not trusted: documents the mirror holds
    /// live answered 404 too (a wrong path or `app_user`), so no deletion
    /// was recorded.
    pub unconfirmed_gone: i64,
}

/// A tenant's latest upstream throttling, as the daemon recorded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Throttling {
    pub tenant: String,
    /// When the latest recorded 429 came (RFC 3339 UTC).
    pub throttled_at: String,
    /// Requests/s allowed after it; `None`: no limit.
    pub allowed_rate: Option<f64>,
    pub refusals_total: i64,
}

/// Every tenant's latest throttling, on any connection.
pub(super) fn throttling_rows(c: &Connection) -> Result<Vec<Throttling>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT tenant, throttled_at, allowed_rate, refusals_total FROM upstream_throttling ORDER BY tenant",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Throttling {
            tenant: r.get(0)?,
            throttled_at: r.get(1)?,
            allowed_rate: r.get(2)?,
            refusals_total: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Everything `/metrics` derives from the database.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub rows: Vec<StatusRow>,
    /// The last finished accuracy audit of each tenant and type.
    pub audits: Vec<super::audit::AuditRow>,
    pub db_bytes: u64,
}

/// Reads the status rows on any connection (the pool, or a read-only one).
pub(super) fn status_rows(c: &Connection) -> Result<Vec<StatusRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT s.tenant, s.doc_type, s.mirrored, s.deleted, s.pending_events, s.queued_fetches, s.retrying_fetches,
                s.dead_events, s.dead_documents, s.oldest_pending_at, s.last_ok_started_at, s.last_ok_finished_at,
                s.last_run_kind, s.last_run_status, s.last_run_finished_at, s.last_run_missed, s.last_run_error,
                s.complete_as_of,
                (SELECT count(*) FROM fetch_queue q WHERE q.tenant = s.tenant AND q.doc_type = s.doc_type AND q.last_error_class = 'auth'),
                (SELECT coalesce(sum(missed), 0) FROM sync_runs r WHERE r.tenant = s.tenant AND r.doc_type = s.doc_type),
                (SELECT count(*) FROM fetch_queue q WHERE q.tenant = s.tenant AND q.doc_type = s.doc_type AND q.last_error_class = 'unconfirmed_gone')
         FROM sync_status s ORDER BY s.tenant, s.doc_type",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(StatusRow {
            tenant: r.get(0)?,
            doc_type: r.get(1)?,
            mirrored: r.get(2)?,
            deleted: r.get(3)?,
            pending_events: r.get(4)?,
            queued_fetches: r.get(5)?,
            retrying_fetches: r.get(6)?,
            dead_events: r.get(7)?,
            dead_documents: r.get(8)?,
            oldest_pending_at: r.get(9)?,
            last_ok_started_at: r.get(10)?,
            last_ok_finished_at: r.get(11)?,
            last_run_kind: r.get(12)?,
            last_run_status: r.get(13)?,
            last_run_finished_at: r.get(14)?,
            last_run_missed: r.get(15)?,
            last_run_error: r.get(16)?,
            complete_as_of: r.get(17)?,
            auth_failing: r.get(18)?,
            missed_total: r.get(19)?,
            unconfirmed_gone: r.get(20)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The queue side of the status rows only (what the PostgreSQL copy's
/// `source_queue` needs, every few seconds while it copies): the other
/// fields are left zero or `None`, and none of `status`'s extra counts
/// (over `fetch_queue` and every `sync_runs` row) is computed.
pub(super) fn queue_rows(c: &Connection) -> Result<Vec<StatusRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT tenant, doc_type, pending_events, queued_fetches, retrying_fetches, dead_events,
                dead_documents, oldest_pending_at, complete_as_of
         FROM sync_status ORDER BY tenant, doc_type",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(StatusRow {
            tenant: r.get(0)?,
            doc_type: r.get(1)?,
            pending_events: r.get(2)?,
            queued_fetches: r.get(3)?,
            retrying_fetches: r.get(4)?,
            dead_events: r.get(5)?,
            dead_documents: r.get(6)?,
            oldest_pending_at: r.get(7)?,
            complete_as_of: r.get(8)?,
            mirrored: 0,
            deleted: 0,
            last_ok_started_at: None,
            last_ok_finished_at: None,
            last_run_kind: None,
            last_run_status: None,
            last_run_finished_at: None,
            last_run_missed: None,
            last_run_error: None,
            auth_failing: 0,
            missed_total: 0,
            unconfirmed_gone: 0,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Store {
    /// The status rows through the pool.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        self.read(status_rows).await
    }

    /// Records that `tenant`'s upstream answered `refusals` more 429s, the
    /// latest at `at`, leaving `allowed_rate` requests/s (`None`: no limit).
    pub async fn record_throttling(
        &self,
        tenant: String,
        at: chrono::DateTime<chrono::Utc>,
        allowed_rate: Option<f64>,
        refusals: u64,
    ) -> Result<(), StoreError> {
        let at = crate::model::fmt_ts(at);
        self.write_one(move |c| {
            c.prepare_cached(
                "INSERT INTO upstream_throttling (tenant, throttled_at, allowed_rate, refusals_total)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant) DO UPDATE SET
                     throttled_at = max(throttled_at, excluded.throttled_at),
                     allowed_rate = excluded.allowed_rate,
                     refusals_total = refusals_total + excluded.refusals_total",
            )?
            .execute(rusqlite::params![tenant, at, allowed_rate, refusals as i64])?;
            Ok(())
        })
        .await
    }

    /// Every tenant's latest recorded throttling (tests, the demo).
    pub async fn throttling(&self) -> Result<Vec<Throttling>, StoreError> {
        self.read(throttling_rows).await
    }

    /// What `/metrics` needs from the database.
    pub async fn metrics_snapshot(&self) -> Result<MetricsSnapshot, StoreError> {
        let wal = {
            let mut p = self.path().as_os_str().to_owned();
            p.push("-wal");
            std::path::PathBuf::from(p)
        };
        self.read(move |c| {
            let rows = status_rows(c)?;
            let audits = super::audit::last_audits(c)?;
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            Ok(MetricsSnapshot {
                rows,
                audits,
                db_bytes: (pages.max(0) as u64) * (size.max(0) as u64) + wal_bytes,
            })
        })
        .await
    }

    /// Counts of events by status for one tenant (tests and the demo).
    pub async fn event_counts(&self, tenant: String) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(move |c| {
            let mut s = c.prepare("SELECT status, count(*) FROM events WHERE tenant = ?1 GROUP BY status ORDER BY status")?;
            let rows = s.query_map([tenant], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
