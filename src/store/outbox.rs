//! The SQLite side of the PostgreSQL mirror: the outbox (`pg_outbox`), the
//! sink's bookkeeping row (`pg_sink`), the database's identity, and the
//! reads the sink and `postgres-check` make.
//!
//! **The outbox is written by triggers, not by this code.** Migration 004
//! created the four triggers named in [`OUTBOX_TRIGGERS`]: while `pg_sink`
//! has its row (the sink was switched on), every insert into `jobs` /
//! `projects`, and every update that changes a row's `revision` or
//! `deleted_at`, appends `(doc_type, tenant, id, revision, changed_at)` to
//! `pg_outbox` in the same transaction as the change. So no Rust code
//! appends to the outbox: the mirror's writes (`store::mirror`, the
//! reconciliation's deletions in `store::sync`) cannot forget to, and a
//! change and its outbox row commit or roll back together. What the Rust
//! code relies on: (1) a change is in the outbox once its commit returns
//! (the writer then calls [`OutboxSignal::notify`]); (2) nothing is
//! appended while the sink is off ([`Store::pg_switch_off`] deletes the
//! `pg_sink` row); (3) `seq` (AUTOINCREMENT) is never given out twice, which
//! the lineage check's fingerprints ([`ReadOnlyStore::tip`]) depend on. A
//! test checks the triggers exist under these names on a new database.
//!
//! The reads are [`ReadOnlyStore`] methods because their callers are
//! blocking threads with their own read-only connection (the sink's thread,
//! `postgres-check`); writes go through the store's writer, the sink's in
//! blocking form (its thread is not a runtime thread). Nothing here knows
//! about PostgreSQL.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{ReadOnlyStore, Store, StoreError};
use crate::model::{DocType, RunKind, RunStatus};

/// The triggers (migration 004) that append to `pg_outbox`: see the module doc.
pub(crate) const OUTBOX_TRIGGERS: [&str; 4] = [
    "jobs_pg_outbox_insert",
    "jobs_pg_outbox_update",
    "projects_pg_outbox_insert",
    "projects_pg_outbox_update",
];

/// Wakes the sink after a commit that may have appended to the outbox.
/// A counter under a mutex, so a wake-up between two waits is never lost.
#[derive(Default)]
pub struct OutboxSignal {
    changes: Mutex<u64>,
    signal: Condvar,
}

impl OutboxSignal {
    /// Says something was committed.
    pub fn notify(&self) {
        if let Ok(mut n) = self.changes.lock() {
            *n = n.wrapping_add(1);
            self.signal.notify_all();
        }
    }

    /// The current change count (pass it to [`OutboxSignal::wait`]).
    pub fn seen(&self) -> u64 {
        self.changes.lock().map(|n| *n).unwrap_or(0)
    }

    /// Blocks until the count differs from `seen` or `timeout` passes.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        if let Ok(guard) = self.changes.lock() {
            let _ = self
                .signal
                .wait_timeout_while(guard, timeout, |n| *n == seen);
        }
    }
}

/// One mirrored row as the sink sends it and `postgres-check` compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct DocRow {
    pub doc_type: DocType,
    pub tenant: String,
    pub id: String,
    pub document: String,
    pub number: Option<String>,
    pub name: Option<String>,
    pub modified_on: Option<String>,
    pub version: Option<i64>,
    pub revision: i64,
    pub first_seen_at: String,
    pub fetched_at: String,
    pub deleted_at: Option<String>,
}

/// One `document_history` row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub tenant: String,
    pub doc_type: DocType,
    pub id: String,
    pub revision: i64,
    pub document: String,
    pub fetched_at: String,
}

/// One `sync_runs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub tenant: String,
    pub doc_type: DocType,
    pub kind: RunKind,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub status: RunStatus,
    pub listed: i64,
    pub enqueued: i64,
    pub marked_deleted: i64,
    pub missed: i64,
    pub candidates: i64,
    pub error: Option<String>,
}

/// Changes to send: the outbox rows after a cursor, collapsed to one current
/// row per document, with the history rows they name.
#[derive(Debug, Default)]
pub struct OutboxBatch {
    /// The highest seq read (the cursor after this batch); 0 when empty.
    pub last_seq: i64,
    /// The fingerprint of the outbox row at `last_seq` (see [`ReadOnlyStore::tip`]).
    pub last_tip: Option<String>,
    /// Outbox rows read (before collapsing).
    pub changes: usize,
    /// When the oldest change in the batch was written.
    pub oldest_changed_at: Option<String>,
    pub docs: Vec<DocRow>,
    pub history: Vec<HistoryRow>,
}

/// The sink's bookkeeping as SQLite has it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkState {
    /// This database's identity (`daemon_state.database_id`).
    pub database_id: String,
    /// The outbox is complete from this seq on; `None` before the sink was switched on.
    pub since_seq: Option<i64>,
    pub acked_seq: Option<i64>,
    /// The highest seq ever given out (0 when none).
    pub max_seq: i64,
}

/// How far PostgreSQL is behind, from the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Outbox rows not yet acknowledged by PostgreSQL.
    pub rows: i64,
    /// When the oldest of them was written (`None` when there are none).
    pub oldest_changed_at: Option<String>,
    /// What the sink writes to (host, database, schema).
    pub target: Option<String>,
}

impl Lag {
    /// Seconds since the oldest change PostgreSQL has not acknowledged
    /// (0 when none).
    pub fn seconds(&self, now: chrono::DateTime<chrono::Utc>) -> f64 {
        self.oldest_changed_at
            .as_deref()
            .and_then(crate::model::parse_upstream_ts)
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0)
    }
}

const DOC_COLUMNS: &str = "tenant, id, document, number, name, modified_on, version, revision, first_seen_at, fetched_at, deleted_at";

fn doc_row(ty: DocType, r: &rusqlite::Row) -> rusqlite::Result<DocRow> {
    Ok(DocRow {
        doc_type: ty,
        tenant: r.get(0)?,
        id: r.get(1)?,
        document: r.get(2)?,
        number: r.get(3)?,
        name: r.get(4)?,
        modified_on: r.get(5)?,
        version: r.get(6)?,
        revision: r.get(7)?,
        first_seen_at: r.get(8)?,
        fetched_at: r.get(9)?,
        deleted_at: r.get(10)?,
    })
}

/// Runs a (cached) query and reads every row it returns with `read`: the
/// one way the reads below turn rows into values (`|r| r.try_into()` reads
/// a row into a tuple of its columns).
fn read_rows<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut s = c.prepare_cached(sql)?;
    let rows = s.query_map(params, read)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The sink's state: identity, switch-on point, acknowledged seq.
fn sink_state(c: &Connection) -> Result<SinkState, StoreError> {
    let database_id: Option<String> = c
        .query_row(
            "SELECT value FROM daemon_state WHERE key = 'database_id'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let database_id = database_id
        .ok_or_else(|| StoreError::Other("the database has no database_id (schema 4)".into()))?;
    let row: Option<(i64, i64)> = c
        .query_row(
            "SELECT since_seq, acked_seq FROM pg_sink WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(SinkState {
        database_id,
        since_seq: row.map(|r| r.0),
        acked_seq: row.map(|r| r.1),
        max_seq: max_seq(c)?,
    })
}

/// The fingerprint of one outbox change: what it changed and when, with its
/// seq. PostgreSQL's cursor keeps the fingerprint of the last change it holds,
/// so a sink resuming at seq P can tell whether this database's change P is
/// the one PostgreSQL copied, or another one written after a restore that
/// happened to get the same seq.
fn fingerprint(seq: i64, ty: &str, tenant: &str, id: &str, revision: i64, at: &str) -> String {
    format!("{seq}:{ty}:{tenant}:{id}:{revision}:{at}")
}

/// The fingerprint of the outbox row at `seq`; `{seq}:-` when it is not in
/// the outbox (pruned after PostgreSQL acknowledged it, or never written: a
/// seq is never given out twice, so its absence is as stable as a row).
fn tip(c: &Connection, seq: i64) -> Result<String, StoreError> {
    Ok(c.query_row(
        "SELECT doc_type, tenant, id, revision, changed_at FROM pg_outbox WHERE seq = ?1",
        [seq],
        |r| {
            Ok(fingerprint(
                seq,
                &r.get::<_, String>(0)?,
                &r.get::<_, String>(1)?,
                &r.get::<_, String>(2)?,
                r.get(3)?,
                &r.get::<_, String>(4)?,
            ))
        },
    )
    .optional()?
    .unwrap_or_else(|| format!("{seq}:-")))
}

/// `daemon_state` key: why the PostgreSQL copy is not following the outbox
/// right now (re-copying, refused), set by the sink and read by `status`;
/// absent while it follows.
const PROBLEM_KEY: &str = "pg_sink_problem";

/// Why the PostgreSQL copy is not following, if the sink said so.
fn sink_problem(c: &Connection) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT value FROM daemon_state WHERE key = ?1",
        [PROBLEM_KEY],
        |r| r.get(0),
    )
    .optional()?)
}

/// Refuses to switch the outbox on when its triggers are gone (a database
/// edited by hand): the sink would follow an outbox that never fills.
/// Why the outbox would never fill (its triggers are gone: a database
/// edited by hand), or `None` when every trigger of [`OUTBOX_TRIGGERS`] is there.
fn outbox_unfed(c: &Connection) -> Result<Option<String>, StoreError> {
    let found: i64 = c.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN (?1, ?2, ?3, ?4)",
        OUTBOX_TRIGGERS,
        |r| r.get(0),
    )?;
    Ok((found != OUTBOX_TRIGGERS.len() as i64).then(|| {
        format!(
            "the database lacks the triggers that fill the PostgreSQL outbox ({}; migration 004): no change would reach PostgreSQL",
            OUTBOX_TRIGGERS.join(", ")
        )
    }))
}

fn check_triggers(c: &Connection) -> Result<(), StoreError> {
    match outbox_unfed(c)? {
        Some(why) => Err(StoreError::Other(why)),
        None => Ok(()),
    }
}

fn max_seq(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'pg_outbox'",
        [],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

/// Reads the outbox after `after` (up to `limit` rows) and the current rows
/// and history they name, in one read transaction.
fn outbox_batch(c: &Connection, after: i64, limit: usize) -> Result<OutboxBatch, StoreError> {
    c.execute_batch("BEGIN")?;
    let r = outbox_batch_in(c, after, limit);
    let _ = c.execute_batch("COMMIT");
    r
}

fn outbox_batch_in(c: &Connection, after: i64, limit: usize) -> Result<OutboxBatch, StoreError> {
    let rows: Vec<(i64, String, String, String, i64, String)> = read_rows(
        c,
        "SELECT seq, doc_type, tenant, id, revision, changed_at FROM pg_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        params![after, limit as i64],
        |r| r.try_into(),
    )?;
    let mut batch = OutboxBatch {
        changes: rows.len(),
        oldest_changed_at: rows.first().map(|r| r.5.clone()),
        ..OutboxBatch::default()
    };
    let mut seen_doc = std::collections::HashSet::new();
    let mut seen_rev = std::collections::HashSet::new();
    for (seq, ty, tenant, id, revision, changed_at) in rows {
        batch.last_seq = seq;
        batch.last_tip = Some(fingerprint(seq, &ty, &tenant, &id, revision, &changed_at));
        let Some(ty) = DocType::parse(&ty) else {
            continue;
        };
        if seen_doc.insert((ty, tenant.clone(), id.clone())) {
            let row = c
                .prepare_cached(&format!(
                    "SELECT {DOC_COLUMNS} FROM {} WHERE tenant = ?1 AND id = ?2",
                    ty.table()
                ))?
                .query_row(params![tenant, id], |r| doc_row(ty, r))
                .optional()?;
            batch.docs.extend(row);
        }
        if seen_rev.insert((ty, tenant.clone(), id.clone(), revision)) {
            let h = c
                .prepare_cached(
                    "SELECT document, fetched_at FROM document_history
                     WHERE tenant = ?1 AND doc_type = ?2 AND id = ?3 AND revision = ?4",
                )?
                .query_row(params![tenant, ty.as_str(), id, revision], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .optional()?;
            // Retention may have pruned it: then there is nothing to copy.
            if let Some((document, fetched_at)) = h {
                batch.history.push(HistoryRow {
                    tenant,
                    doc_type: ty,
                    id,
                    revision,
                    document,
                    fetched_at,
                });
            }
        }
    }
    Ok(batch)
}

/// Up to `limit` rows of a mirror table after `after` in (tenant, id) order
/// (the backfill and `postgres-check` page through the tables with it).
fn mirror_page(
    c: &Connection,
    ty: DocType,
    after: Option<&(String, String)>,
    limit: usize,
) -> Result<Vec<DocRow>, StoreError> {
    let (t, i) = after
        .map(|(t, i)| (t.as_str(), i.as_str()))
        .unwrap_or(("", ""));
    read_rows(
        c,
        &format!(
            "SELECT {DOC_COLUMNS} FROM {} WHERE (tenant, id) > (?1, ?2) ORDER BY tenant, id LIMIT ?3",
            ty.table()
        ),
        params![t, i, limit as i64],
        |r| doc_row(ty, r),
    )
}

/// Up to `limit` `document_history` rows after `after_rowid`, with their rowids.
fn history_page(
    c: &Connection,
    after_rowid: i64,
    limit: usize,
) -> Result<Vec<(i64, HistoryRow)>, StoreError> {
    let rows: Vec<(i64, String, String, String, i64, String, String)> = read_rows(
        c,
        "SELECT rowid, tenant, doc_type, id, revision, document, fetched_at FROM document_history
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        params![after_rowid, limit as i64],
        |r| r.try_into(),
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|(rowid, tenant, ty, id, revision, document, fetched_at)| {
            Some((
                rowid,
                HistoryRow {
                    tenant,
                    doc_type: DocType::parse(&ty)?,
                    id,
                    revision,
                    document,
                    fetched_at,
                },
            ))
        })
        .collect())
}

/// `sync_runs` rows with `id >= floor`.
fn runs_since(c: &Connection, floor: i64) -> Result<Vec<RunRow>, StoreError> {
    read_rows(
        c,
        "SELECT id, tenant, doc_type, kind, started_at, finished_at, status, listed, enqueued,
                marked_deleted, missed, candidates, error
         FROM sync_runs WHERE id >= ?1 ORDER BY id",
        [floor],
        |r| {
            Ok(RunRow {
                id: r.get(0)?,
                tenant: r.get(1)?,
                doc_type: r.get(2)?,
                kind: r.get(3)?,
                started_at: r.get(4)?,
                finished_at: r.get(5)?,
                status: r.get(6)?,
                listed: r.get(7)?,
                enqueued: r.get(8)?,
                marked_deleted: r.get(9)?,
                missed: r.get(10)?,
                candidates: r.get(11)?,
                error: r.get(12)?,
            })
        },
    )
}

/// The highest `sync_runs` id (0 when none).
fn max_run_id(c: &Connection) -> Result<i64, StoreError> {
    Ok(
        c.query_row("SELECT coalesce(max(id), 0) FROM sync_runs", [], |r| {
            r.get(0)
        })?,
    )
}

/// When the oldest change after `seq` was written (`None` when none waits).
fn oldest_change_after(c: &Connection, seq: i64) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT changed_at FROM pg_outbox WHERE seq > ?1 ORDER BY seq LIMIT 1",
        [seq],
        |r| r.get(0),
    )
    .optional()?)
}

/// The sink's lag, or `None` when no sink was ever switched on for this database.
fn lag(c: &Connection) -> Result<Option<Lag>, StoreError> {
    let sink: Option<(i64, Option<String>)> = c
        .query_row(
            "SELECT acked_seq, target FROM pg_sink WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((acked, target)) = sink else {
        return Ok(None);
    };
    let (rows, oldest): (i64, Option<String>) = c.query_row(
        "SELECT count(*), min(changed_at) FROM pg_outbox WHERE seq > ?1",
        [acked],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Some(Lag {
        rows,
        oldest_changed_at: oldest,
        target,
    }))
}

impl ReadOnlyStore {
    /// The sink's state: identity, switch-on point, acknowledged seq.
    pub fn sink_state(&self) -> Result<SinkState, StoreError> {
        sink_state(&self.conn)
    }

    /// The fingerprint of the outbox change at `seq` (the lineage check's):
    /// `{seq}:-` when it is not in the outbox (pruned after PostgreSQL
    /// acknowledged it, or never written).
    pub fn tip(&self, seq: i64) -> Result<String, StoreError> {
        tip(&self.conn, seq)
    }

    /// Why the PostgreSQL copy is not following, if the sink said so.
    pub fn sink_problem(&self) -> Result<Option<String>, StoreError> {
        sink_problem(&self.conn)
    }

    /// Why the outbox would never fill (its triggers were dropped by hand),
    /// or `None`: the sink refuses to switch on over such a database.
    pub fn outbox_unfed(&self) -> Result<Option<String>, StoreError> {
        outbox_unfed(&self.conn)
    }

    /// The outbox after `after` (up to `limit` rows), collapsed to one
    /// current row per document, with the history rows it names; read in
    /// one read transaction.
    pub fn outbox_batch(&self, after: i64, limit: usize) -> Result<OutboxBatch, StoreError> {
        outbox_batch(&self.conn, after, limit)
    }

    /// Up to `limit` rows of a mirror table after `after` in (tenant, id)
    /// order (the backfill and `postgres-check` page through the tables).
    pub fn mirror_page(
        &self,
        ty: DocType,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> Result<Vec<DocRow>, StoreError> {
        mirror_page(&self.conn, ty, after, limit)
    }

    /// Up to `limit` `document_history` rows after `after_rowid`, with their rowids.
    pub fn history_page(
        &self,
        after_rowid: i64,
        limit: usize,
    ) -> Result<Vec<(i64, HistoryRow)>, StoreError> {
        history_page(&self.conn, after_rowid, limit)
    }

    /// `sync_runs` rows with `id >= floor`.
    pub fn runs_since(&self, floor: i64) -> Result<Vec<RunRow>, StoreError> {
        runs_since(&self.conn, floor)
    }

    /// The highest `sync_runs` id (0 when none).
    pub fn max_run_id(&self) -> Result<i64, StoreError> {
        max_run_id(&self.conn)
    }

    /// When the oldest change after `seq` was written (`None` when none waits).
    pub fn oldest_change_after(&self, seq: i64) -> Result<Option<String>, StoreError> {
        oldest_change_after(&self.conn, seq)
    }

    /// The sink's lag, or `None` when no sink was ever switched on here.
    pub fn lag(&self) -> Result<Option<Lag>, StoreError> {
        lag(&self.conn)
    }
}

impl Store {
    /// The commit signal the PostgreSQL sink waits on.
    pub fn outbox_signal(&self) -> Arc<OutboxSignal> {
        self.inner.outbox_signal.clone()
    }

    /// Switches the outbox on (idempotent): from the next change on, every
    /// revision or `deleted_at` change appends a row (the triggers `OUTBOX_TRIGGERS` names).
    /// Records the target (never a password) for `status`. Blocking, for
    /// the sink's thread (never a runtime thread).
    pub fn pg_switch_on(&self, target: String) -> Result<SinkState, StoreError> {
        self.write_blocking(move |c| {
            check_triggers(c)?;
            let next = max_seq(c)? + 1;
            c.execute(
                "INSERT INTO pg_sink (id, since_seq, acked_seq, target) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET target = excluded.target",
                params![next, next - 1, target],
            )?;
            sink_state(c)
        })
    }

    /// Switches the outbox off and empties it (`serve` without `[postgres]`),
    /// so it does not grow with nobody to read it. A later switch-on copies
    /// the tables whole again. Returns whether it was on.
    pub async fn pg_switch_off(&self) -> Result<bool, StoreError> {
        self.write(|c| {
            let was_on = c.execute("DELETE FROM pg_sink", [])? > 0;
            c.execute("DELETE FROM pg_outbox", [])?;
            c.execute("DELETE FROM daemon_state WHERE key = ?1", [PROBLEM_KEY])?;
            Ok(was_on)
        })
        .await
    }

    /// Records that PostgreSQL holds every change up to `seq` and prunes
    /// the outbox up to there (never further). Blocking, for the sink's thread.
    pub fn pg_ack(&self, seq: i64, now: String) -> Result<(), StoreError> {
        self.write_blocking(move |c| {
            c.prepare_cached(
                "UPDATE pg_sink SET acked_seq = max(acked_seq, ?1), acked_at = ?2 WHERE id = 1",
            )?
            .execute(params![seq, now])?;
            c.prepare_cached(
                "DELETE FROM pg_outbox WHERE seq <= ?1 AND seq <= (SELECT acked_seq FROM pg_sink WHERE id = 1)",
            )?
            .execute([seq])?;
            Ok(())
        })
    }

    /// Records why the PostgreSQL copy is not following (`None`: it follows
    /// again), for `status`. Blocking, for the sink's thread.
    pub fn pg_set_problem(&self, problem: Option<String>) -> Result<(), StoreError> {
        self.write_blocking(move |c| {
            match problem {
                Some(p) => c.execute(
                    "INSERT INTO daemon_state (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![PROBLEM_KEY, p],
                )?,
                None => c.execute("DELETE FROM daemon_state WHERE key = ?1", [PROBLEM_KEY])?,
            };
            Ok(())
        })
    }

    /// The sink's lag (for `/metrics`).
    pub async fn pg_lag(&self) -> Result<Option<Lag>, StoreError> {
        self.read(lag).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The triggers that fill the outbox on a new database are exactly the
    /// ones [`OUTBOX_TRIGGERS`] names (the Rust code relies on them).
    #[test]
    fn the_outbox_is_filled_by_the_named_triggers() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.db");
        drop(Store::open(&path, Duration::from_secs(5))?);
        let c = Connection::open(&path)?;
        let mut names: Vec<String> = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND sql LIKE '%INSERT INTO pg_outbox%' ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut want: Vec<String> = OUTBOX_TRIGGERS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want);
        Ok(())
    }

    /// The sink's whole round (switch on, read a batch, acknowledge) works
    /// from a plain thread with no tokio runtime anywhere: the reads through
    /// a [`ReadOnlyStore`], the writes blocking on the writer.
    #[test]
    fn the_sink_round_needs_no_runtime() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.db");
        let store = Store::open(&path, Duration::from_secs(5))?;
        let state = store.pg_switch_on("pg.example/reports/skillsync".into())?;
        assert_eq!(state.max_seq, 0);
        // Three jobs written by another connection: the triggers fill the outbox.
        super::super::fill_synthetic_jobs(&path, "acme", 3, 1)?;
        let reader = ReadOnlyStore::of(&store)?;
        let batch = reader.outbox_batch(0, 100)?;
        assert_eq!((batch.changes, batch.docs.len()), (3, 3));
        assert_eq!(batch.history.len(), 3);
        assert_eq!(reader.lag()?.map(|l| l.rows), Some(3));
        assert_eq!(
            reader.tip(batch.last_seq)?,
            batch.last_tip.clone().unwrap_or_default()
        );
        store.pg_ack(batch.last_seq, crate::model::now_ts())?;
        assert_eq!(reader.lag()?.map(|l| l.rows), Some(0));
        assert_eq!(reader.outbox_batch(batch.last_seq, 100)?.changes, 0);
        // The change at the acknowledged seq is pruned: its fingerprint says so.
        assert_eq!(reader.tip(batch.last_seq)?, format!("{}:-", batch.last_seq));
        store.pg_set_problem(Some("copying".into()))?;
        assert_eq!(reader.sink_problem()?.as_deref(), Some("copying"));
        store.pg_set_problem(None)?;
        assert_eq!(reader.sink_problem()?, None);
        Ok(())
    }

    /// A database whose outbox triggers were dropped (edited by hand) is
    /// refused at switch-on, naming the triggers, instead of feeding a sink
    /// that would never see a change.
    #[test]
    fn switching_on_without_the_triggers_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.db");
        let store = Store::open(&path, Duration::from_secs(5))?;
        assert_eq!(ReadOnlyStore::of(&store)?.outbox_unfed()?, None);
        Connection::open(&path)?.execute_batch("DROP TRIGGER jobs_pg_outbox_update")?;
        // What the sink reads first, to refuse (and say why in `status`).
        let why = ReadOnlyStore::of(&store)?
            .outbox_unfed()?
            .ok_or("the dropped trigger went unnoticed")?;
        assert!(why.contains("jobs_pg_outbox_update"), "{why}");
        let e = store
            .pg_switch_on("t".into())
            .err()
            .ok_or("switched on without its triggers")?;
        assert!(e.to_string().contains("jobs_pg_outbox_update"), "{e}");
        let reader = ReadOnlyStore::of(&store)?;
        assert_eq!(reader.lag()?, None, "the outbox was not switched on");
        Ok(())
    }
}
