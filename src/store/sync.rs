//! Reconciliation state: run locks (one run per tenant and type, across
//! processes), `sync_runs` rows (their `kind` and `status` read back as
//! [`RunKind`] and [`RunStatus`], a `doc_type` column as [`DocType`]), the incremental watermark, the mirror
//! state a listing page is compared with, and deletion marks.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::model::{DocType, IdSet, RunKind, RunStatus, fmt_ts};

/// Reads a text column that holds one of an enum's values.
fn from_text<T>(v: ValueRef<'_>, parse: fn(&str) -> Option<T>) -> FromSqlResult<T> {
    let s = v.as_str()?;
    parse(s).ok_or_else(|| FromSqlError::Other(format!("unknown value `{s}`").into()))
}

impl FromSql for RunKind {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        from_text(v, RunKind::parse)
    }
}

impl FromSql for DocType {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        from_text(v, DocType::parse)
    }
}

impl FromSql for RunStatus {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        from_text(v, RunStatus::parse)
    }
}

/// How one reconciliation run ended, as written to `sync_runs`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunCounts {
    /// Distinct ids the listing showed.
    pub listed: u64,
    /// Fetches queued (committed) for changed or missing documents.
    pub enqueued: u64,
    /// Live documents a full sweep did not list: queued for a confirming GET.
    pub candidates: u64,
    /// Candidates a GET has confirmed gone (404/410) so far; the fetches
    /// add to the run's row as they confirm, after the listing ended.
    pub marked_deleted: u64,
    pub missed: u64,
}

/// A run and the lock it must hold for its writes to count.
#[derive(Debug, Clone)]
pub struct RunRef {
    pub tenant: String,
    pub doc_type: DocType,
    pub owner: String,
}

/// Whether `run.owner` still holds the run lock of its tenant and type
/// (an expired lock nobody has taken over is still held).
pub(super) fn holds_lock(c: &rusqlite::Connection, run: &RunRef) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT 1 FROM sync_state WHERE tenant = ?1 AND doc_type = ?2 AND lock_owner = ?3",
    )?
    .exists(params![run.tenant, run.doc_type.as_str(), run.owner])
}

/// How a run ended, as its process saw it.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub status: RunStatus,
    pub counts: RunCounts,
    pub error: Option<String>,
    /// For a successful incremental run: the watermark it may advance to.
    pub watermark: Option<String>,
}

/// How `finish_run` recorded a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub status: RunStatus,
    pub error: Option<String>,
}

/// A mirrored document as a listing compares with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorState {
    pub modified_on: Option<String>,
    pub deleted: bool,
}

/// The mirror's view of one listing page.
#[derive(Debug, Clone, Default)]
pub struct PageState {
    pub mirror: HashMap<String, MirrorState>,
    /// Ids with a fetch already queued (announced by a webhook or an earlier run).
    pub queued: HashSet<String>,
}

impl Store {
    /// Takes the run lock of a tenant and type until `until`, unless anyone
    /// (this process included: its schedules share one owner) holds an
    /// unexpired one. Marks runs left `running` by a process
    /// that died as `interrupted`.
    pub async fn acquire_sync_lock(
        &self,
        tenant: String,
        doc_type: DocType,
        owner: String,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            let now = fmt_ts(now);
            c.execute(
                "INSERT OR IGNORE INTO sync_state (tenant, doc_type) VALUES (?1, ?2)",
                params![tenant, doc_type.as_str()],
            )?;
            let got = c.execute(
                "UPDATE sync_state SET lock_owner = ?3, lock_until = ?4
                 WHERE tenant = ?1 AND doc_type = ?2 AND (lock_owner IS NULL OR lock_until < ?5)",
                params![tenant, doc_type.as_str(), owner, fmt_ts(until), now],
            )?;
            if got == 1 {
                c.execute(
                    "UPDATE sync_runs SET status = ?4, finished_at = ?3, error = 'the process running it stopped'
                     WHERE tenant = ?1 AND doc_type = ?2 AND status = ?5",
                    params![
                        tenant,
                        doc_type.as_str(),
                        now,
                        RunStatus::Interrupted.as_str(),
                        RunStatus::Running.as_str()
                    ],
                )?;
            }
            Ok(got == 1)
        })
        .await
    }

    /// Extends a held run lock.
    pub async fn renew_sync_lock(
        &self,
        run: RunRef,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            Ok(c.execute(
                "UPDATE sync_state SET lock_until = ?4 WHERE tenant = ?1 AND doc_type = ?2 AND lock_owner = ?3",
                params![run.tenant, run.doc_type.as_str(), run.owner, fmt_ts(until)],
            )? == 1)
        })
        .await
    }

    /// Releases every run lock `owner` holds.
    pub async fn release_sync_locks(&self, owner: String) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "UPDATE sync_state SET lock_owner = NULL, lock_until = NULL WHERE lock_owner = ?1",
                [owner],
            )?;
            Ok(())
        })
        .await
    }

    /// The incremental watermark of a tenant and type.
    pub async fn watermark(
        &self,
        tenant: String,
        doc_type: DocType,
    ) -> Result<Option<String>, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT watermark FROM sync_state WHERE tenant = ?1 AND doc_type = ?2",
                params![tenant, doc_type.as_str()],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
        })
        .await
    }

    /// Records the start of a run; returns its id.
    pub async fn start_run(
        &self,
        run: RunRef,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        self.write(move |c| {
            Ok(c.query_row(
                "INSERT INTO sync_runs (tenant, doc_type, kind, started_at, status, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                params![run.tenant, run.doc_type.as_str(), kind.as_str(), fmt_ts(now), RunStatus::Running.as_str(), run.owner],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Records the end of a run, releases its lock and, for a successful
    /// incremental run, advances the watermark (never backwards). A run that
    /// no longer holds its lock (another process took it over) advances
    /// nothing and is recorded `failed`; the returned status says which.
    pub async fn finish_run(
        &self,
        run_id: i64,
        run: RunRef,
        end: RunEnd,
        now: DateTime<Utc>,
    ) -> Result<Finished, StoreError> {
        self.write(move |c| {
            let RunEnd {
                status,
                counts,
                error,
                watermark,
            } = end;
            let held = holds_lock(c, &run)?;
            let (status, error, watermark) = if held {
                (status, error, watermark)
            } else {
                (
                    if status == RunStatus::Interrupted {
                        status
                    } else {
                        RunStatus::Failed
                    },
                    Some(error.unwrap_or_else(|| {
                        "lost the run lock to another process; nothing after that was recorded".into()
                    })),
                    None,
                )
            };
            // `marked_deleted` is added to by the confirming fetches, which
            // may already have begun: never overwrite it.
            c.execute(
                "UPDATE sync_runs SET finished_at = ?2, status = ?3, listed = ?4, enqueued = ?5, candidates = ?6, missed = ?7, error = ?8
                 WHERE id = ?1",
                params![
                    run_id,
                    fmt_ts(now),
                    status.as_str(),
                    counts.listed as i64,
                    counts.enqueued as i64,
                    counts.candidates as i64,
                    counts.missed as i64,
                    error
                ],
            )?;
            if let Some(w) = watermark {
                c.execute(
                    "UPDATE sync_state SET watermark = ?3 WHERE tenant = ?1 AND doc_type = ?2 AND (watermark IS NULL OR watermark < ?3)",
                    params![run.tenant, run.doc_type.as_str(), w],
                )?;
            }
            c.execute(
                "UPDATE sync_state SET lock_owner = NULL, lock_until = NULL WHERE tenant = ?1 AND doc_type = ?2 AND lock_owner = ?3",
                params![run.tenant, run.doc_type.as_str(), run.owner],
            )?;
            Ok(Finished { status, error })
        })
        .await
    }

    /// The deletions GETs have confirmed for a run so far.
    pub async fn run_marked_deleted(&self, run_id: i64) -> Result<u64, StoreError> {
        self.read(move |c| {
            let n: i64 = c.query_row(
                "SELECT marked_deleted FROM sync_runs WHERE id = ?1",
                [run_id],
                |r| r.get(0),
            )?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    /// The mirror state and queued fetches for the ids of one listing page.
    pub async fn page_state(
        &self,
        tenant: String,
        doc_type: DocType,
        ids: Vec<String>,
    ) -> Result<PageState, StoreError> {
        self.read(move |c| {
            // One read transaction for the page: SQLite takes its locks once,
            // not once per id (half the listing's CPU before).
            let _snapshot = c.unchecked_transaction()?;
            let mut state = PageState::default();
            let mut m = c.prepare_cached(&format!(
                "SELECT modified_on, deleted_at IS NOT NULL FROM {} WHERE tenant = ?1 AND id = ?2",
                doc_type.table()
            ))?;
            let mut q = c.prepare_cached(
                "SELECT 1 FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND status = 'queued'",
            )?;
            // Documents whose webhook is recorded but not yet moved into the
            // queue are just as announced (normally none: the fetcher moves
            // them within a second). Looked up per id in the partial index
            // of recorded events, so a page costs the same whatever the
            // inbox backlog.
            let mut recorded = c.prepare_cached(
                "SELECT 1 FROM events WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND queued = 0",
            )?;
            for id in ids {
                if let Some(s) = m
                    .query_row(params![tenant, id], |r| {
                        Ok(MirrorState {
                            modified_on: r.get(0)?,
                            deleted: r.get(1)?,
                        })
                    })
                    .optional()?
                {
                    state.mirror.insert(id.clone(), s);
                }
                if q.exists(params![tenant, doc_type.as_str(), id])?
                    || recorded.exists(params![tenant, doc_type.as_str(), id])?
                {
                    state.queued.insert(id);
                }
            }
            Ok(state)
        })
        .await
    }

    /// A full sweep's deletion candidates: live (not deleted) documents
    /// first seen before `before` whose id is not in `listed`, read as a
    /// stream (no list of every live id is built). Returns them with the
    /// number of live documents of the type, which the valve measures against.
    pub async fn unlisted_live_ids(
        &self,
        tenant: String,
        doc_type: DocType,
        before: DateTime<Utc>,
        listed: IdSet,
    ) -> Result<(Vec<String>, u64), StoreError> {
        self.read(move |c| {
            let _snapshot = c.unchecked_transaction()?;
            let mut s = c.prepare(&format!(
                "SELECT id FROM {} WHERE tenant = ?1 AND deleted_at IS NULL AND first_seen_at < ?2",
                doc_type.table()
            ))?;
            let mut rows = s.query(params![tenant, fmt_ts(before)])?;
            let mut candidates = Vec::new();
            while let Some(r) = rows.next()? {
                let id = r.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
                if !listed.contains(id) {
                    candidates.push(id.to_string());
                }
            }
            let live: i64 = c.query_row(
                &format!(
                    "SELECT count(*) FROM {} WHERE tenant = ?1 AND deleted_at IS NULL",
                    doc_type.table()
                ),
                [&tenant],
                |r| r.get(0),
            )?;
            Ok((candidates, live.max(0) as u64))
        })
        .await
    }
}
