//! The sink: one thread that keeps PostgreSQL in step with SQLite.
//!
//! A session connects, creates or upgrades the schema and checks the cursor
//! row (`sink_cursor`) against this database's outbox ([`resume`], the
//! lineage check): the cursor must name this SQLite database (else the sink
//! refuses and says why), and its seq and the fingerprint of the change at
//! that seq must continue this database's history. When they do not (a
//! restored SQLite backup, a restored PostgreSQL dump, a failover to a
//! lagging replica, a report rebuild, or simply a first start) it copies the
//! tables whole, logging the reason and recording it for `status` until the
//! copy is done: switches the outbox on, notes the outbox seq S0, marks every
//! PostgreSQL row stale, copies every mirrored row and history row in batches
//! (rows stamped `source_seq = S0`), then in one transaction removes what is
//! still stale (rows SQLite does not hold, history of revisions it never
//! wrote), sets the cursor to S0 with its fingerprint and records the report
//! hash. From then on it reads the outbox after the cursor (at most every
//! 100 ms while changes trickle in, at once while a backlog fills batches),
//! collapses repeated changes to one document into one row, and in one
//! PostgreSQL transaction per batch locks the cursor row, upserts current
//! rows guarded by `source_seq` (a row never goes back), inserts history
//! idempotently, writes the report values and stages, and advances the
//! cursor and its fingerprint. Only after that commit does SQLite learn the
//! acknowledged seq (at most once a second while busy, and when idle) and
//! prune its outbox up to there.
//!
//! Any failure ends the session; the thread backs off (0.5 s doubling to
//! 10 s) and starts a new one that resumes from the cursor. PostgreSQL being
//! down never touches intake: the outbox simply grows in SQLite.
//! It wakes on each mirror commit ([`OutboxSignal`]) and polls every second
//! for changes made by other processes. It reads SQLite through a
//! [`ReadOnlyStore`] of its own and writes its bookkeeping (switch-on,
//! acknowledgements, the problem `status` shows) through the store's writer
//! in blocking form: the thread is a plain thread, never a runtime's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use postgres::Transaction;
use postgres::types::ToSql;
use serde_json::{Map, Value};

use super::schema::{self, Ensured};
use super::{PgError, PostgresConfig};
use crate::metrics::Metrics;
use crate::model::{DocType, RunStatus};
use crate::reporting::{ColumnType, ReportSpec, Typed};
use crate::store::{
    DocRow, HistoryRow, OutboxBatch, OutboxSignal, ReadOnlyStore, RunRow, SinkState, StatusRow,
    Store,
};

/// How often the sink looks at the outbox when nothing woke it (changes by
/// `reconcile` in another process) and refreshes the queue figures.
const POLL: Duration = Duration::from_secs(1);
/// How often the `source_queue` and `sync_runs` copies are refreshed at most.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// The least time between two batches while changes trickle in.
const LINGER: Duration = Duration::from_millis(100);
/// How often SQLite learns what PostgreSQL holds (and prunes) while busy.
const ACK_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// PostgreSQL or SQLite failed: retry after a backoff.
    #[error("{0}")]
    Retry(String),
    /// The cursor belongs to another database or is ahead of ours: retrying
    /// will not help until an operator acts.
    #[error("{0}")]
    Refused(String),
    /// The failpoint fired (tests).
    #[error("injected crash")]
    Crash,
}

impl From<PgError> for SessionError {
    fn from(e: PgError) -> Self {
        SessionError::Retry(e.to_string())
    }
}

impl From<crate::store::StoreError> for SessionError {
    fn from(e: crate::store::StoreError) -> Self {
        SessionError::Retry(e.to_string())
    }
}

/// PostgreSQL's cursor row: which SQLite database feeds the schema, up to
/// which outbox seq, and the fingerprint of the change at that seq.
#[derive(Debug, Clone)]
pub struct PgCursor {
    pub source_db: String,
    /// `None` while a whole copy runs.
    pub seq: Option<i64>,
    /// [`ReadOnlyStore::tip`] of SQLite's change at `seq` when it was copied.
    pub tip: Option<String>,
}

/// What a starting session does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// PostgreSQL holds exactly this database's changes up to this seq.
    Follow(i64),
    /// Copy the tables whole (the first start's backfill), for this reason.
    Copy(String),
    /// Touch nothing: the schema belongs to another database.
    Refuse(String),
}

/// The lineage check: whether PostgreSQL's cursor continues this
/// database's history. PostgreSQL holds changes 1..P of some history;
/// SQLite has written changes 1..M (`max_seq`) and pruned its outbox up to
/// A (`acked_seq`). Following from P is right only when the change at P is
/// the same one on both sides (P ≤ A: SQLite itself recorded that
/// PostgreSQL holds it; A < P ≤ M: the fingerprints match). Otherwise:
/// P > M, SQLite is behind (a restored backup or copy); P < A, PostgreSQL is
/// behind and the changes in between are gone from the outbox (a restored
/// dump, a failover to a lagging replica); a fingerprint that differs, SQLite
/// was restored and has since written other changes under the same seqs.
/// Each is a whole copy from SQLite, the source of truth. Pure, so every case
/// is unit-tested.
pub fn resume(
    cursor: Option<&PgCursor>,
    state: &SinkState,
    tip_here: Option<&str>,
    rebuilt: bool,
    schema: &str,
) -> Resume {
    let Some(c) = cursor else {
        return Resume::Copy(format!(
            "first start: PostgreSQL schema {schema} holds no copy yet"
        ));
    };
    if c.source_db != state.database_id {
        return Resume::Refuse(format!(
            "PostgreSQL schema {schema} is fed by another SQLite database ({}; this one is {}): a second instance must use its own schema (postgres.schema); to make this database the source, drop that schema (DROP SCHEMA {schema} CASCADE) and the next start copies it whole. Not done automatically, because it would overwrite the other database's copy",
            c.source_db, state.database_id
        ));
    }
    let Some(p) = c.seq else {
        return Resume::Copy("the previous whole copy did not finish".into());
    };
    if rebuilt {
        return Resume::Copy(
            "the report tables were built for a new shape ([reporting] or a new skillsync)".into(),
        );
    }
    if p > state.max_seq {
        return Resume::Copy(format!(
            "SQLite is behind PostgreSQL: PostgreSQL holds outbox changes up to seq {p}, this database's outbox only reaches {} (a restored backup or an older copy of the database); PostgreSQL is copied again from SQLite, and reconciliation brings back from upstream what the restore rolled back",
            state.max_seq
        ));
    }
    let floor = state
        .acked_seq
        .unwrap_or(0)
        .max(state.since_seq.map(|s| s - 1).unwrap_or(0));
    if p < floor {
        return Resume::Copy(format!(
            "PostgreSQL is behind SQLite: its cursor is at outbox seq {p}, but SQLite had already pruned its outbox up to {floor} after PostgreSQL acknowledged it (PostgreSQL restored from a dump, or failed over to a lagging replica); the changes in between are only in the tables, so they are copied whole"
        ));
    }
    if p > floor {
        match (&c.tip, tip_here) {
            (Some(there), Some(here)) if there == here => {}
            (None, _) => {
                return Resume::Copy(format!(
                    "PostgreSQL's cursor (seq {p}) has no fingerprint to check it against this database's outbox (a copy cut short, or a schema written by an older skillsync)"
                ));
            }
            _ => {
                return Resume::Copy(format!(
                    "the outbox change at seq {p} is not the one PostgreSQL copied: this database was restored from a backup and has written other changes under the same seqs since"
                ));
            }
        }
    }
    Resume::Follow(p)
}

/// A running sink; stop it with [`SinkHandle::stop`].
pub struct SinkHandle {
    stop: Arc<AtomicBool>,
    signal: Arc<OutboxSignal>,
    crash_in: Arc<AtomicI64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkHandle {
    /// Stops the sink (finishing the batch in flight) and waits for its thread.
    /// Blocking: call it from a blocking context.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.signal.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Test failpoint: the session dies abruptly after `steps` more steps
    /// (a step: a statement in a PostgreSQL transaction, a commit, an
    /// acknowledgement in SQLite), as if the process were killed there;
    /// the sink then starts over from the cursor like a restarted daemon.
    pub fn crash_after(&self, steps: i64) {
        self.crash_in.store(steps, Ordering::SeqCst);
    }
}

/// For `serve`: starts the sink when `[postgres]` is configured, else
/// switches the outbox off (nobody would read it) and says so if it was on.
pub async fn serve_start(
    config: &crate::config::Config,
    store: &Store,
) -> anyhow::Result<Option<SinkHandle>> {
    match &config.postgres {
        Some(pg) => {
            let spec = ReportSpec::new(&config.reporting);
            let handle = start(pg.clone(), store.clone(), spec)
                .map_err(|e| anyhow::anyhow!("cannot start the PostgreSQL sink thread: {e}"))?;
            Ok(Some(handle))
        }
        None => {
            if store.pg_switch_off().await? {
                tracing::info!(
                    "no [postgres] section: the PostgreSQL outbox is switched off and emptied; a later switch-on copies everything again"
                );
            }
            Ok(None)
        }
    }
}

/// Starts the sink thread (callable from anywhere: the thread needs no
/// runtime, and PostgreSQL calls never run inside one).
pub fn start(cfg: PostgresConfig, store: Store, spec: ReportSpec) -> std::io::Result<SinkHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let signal = store.outbox_signal();
    let crash_in = Arc::new(AtomicI64::new(-1));
    let sink = Sink {
        cfg,
        store,
        spec,
        metrics: Metrics::install(),
        stop: stop.clone(),
        signal: signal.clone(),
        crash_in: crash_in.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("skillsync-postgres".into())
        .spawn(move || sink.run())?;
    Ok(SinkHandle {
        stop,
        signal,
        crash_in,
        thread: Some(thread),
    })
}

struct Sink {
    cfg: PostgresConfig,
    /// The writer, for the sink's bookkeeping (blocking calls).
    store: Store,
    spec: ReportSpec,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    /// Rung by the writer after each mirror commit.
    signal: Arc<OutboxSignal>,
    crash_in: Arc<AtomicI64>,
}

/// One session's memory of what it last copied of the small tables.
struct StatusCopy {
    /// `sync_runs` rows from this id on may still change (running) or are new.
    runs_floor: i64,
    last: Option<Instant>,
}

impl Sink {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Counts a step toward the failpoint.
    fn step(&self) -> Result<(), SessionError> {
        let left = self.crash_in.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            self.crash_in.store(-1, Ordering::SeqCst);
            return Err(SessionError::Crash);
        }
        self.crash_in.store(left - 1, Ordering::SeqCst);
        Ok(())
    }

    /// Tells `status` why the copy is not following (`None`: it follows).
    fn set_problem(&self, problem: Option<String>) -> Result<(), SessionError> {
        self.store.pg_set_problem(problem)?;
        Ok(())
    }

    /// Sleeps `d`, or less when stopped (commits wake the wait; it resumes).
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() {
            let now = Instant::now();
            if now >= until {
                return;
            }
            self.signal.wait(self.signal.seen(), until - now);
        }
    }

    fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut failing_since: Option<Instant> = None;
        tracing::info!(target_db = %self.cfg.target, "PostgreSQL sink starting");
        while !self.stopped() {
            let started = Instant::now();
            match self.session() {
                Ok(()) => break,
                Err(SessionError::Refused(why)) => {
                    self.metrics.postgres_up(false);
                    if let Err(e) =
                        self.set_problem(Some(format!("the PostgreSQL copy is stopped: {why}")))
                    {
                        tracing::warn!(error = %e, "cannot record the sink's state for `status`");
                    }
                    tracing::error!(target_db = %self.cfg.target, error = %why, "PostgreSQL sink refuses to run; retrying in 60 s");
                    self.sleep(Duration::from_secs(60));
                }
                Err(e) => {
                    self.metrics.postgres_up(false);
                    self.metrics.postgres_batch("failed");
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = BACKOFF_MIN;
                    }
                    // Warn on the first failure and then about once a minute.
                    let first = failing_since.is_none();
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if first || backoff == BACKOFF_MAX {
                        tracing::warn!(
                            target_db = %self.cfg.target,
                            error = %e,
                            failing_secs = since.elapsed().as_secs(),
                            retry_in_ms = backoff.as_millis() as u64,
                            "PostgreSQL sink failed; changes wait in the SQLite outbox"
                        );
                    }
                    let jitter =
                        Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
                    self.sleep(backoff + jitter);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
            failing_since = None;
        }
        tracing::info!("PostgreSQL sink stopped");
    }

    fn session(&self) -> Result<(), SessionError> {
        let mut client = self.cfg.connect()?;
        let pg = |e: postgres::Error| SessionError::Retry(self.cfg.error(&e).to_string());
        let s = schema::quoted(&self.cfg.schema);
        let ensured = {
            let mut tx = client.transaction().map_err(pg)?;
            let r = schema::ensure(&mut tx, &self.cfg.schema, &self.spec)
                .map_err(SessionError::Retry)?;
            tx.commit().map_err(pg)?;
            r
        };
        let sqlite = ReadOnlyStore::of(&self.store)?;
        // Nothing an operator has not done by hand: refused (status says
        // why, retried slowly), not retried as if the database were busy.
        if let Some(why) = sqlite.outbox_unfed()? {
            return Err(SessionError::Refused(why));
        }
        let state = self.store.pg_switch_on(self.cfg.target.clone())?;
        let cursor: Option<PgCursor> = client
            .query_opt(
                &format!("SELECT source_db, seq, tip FROM {s}.sink_cursor WHERE id = 1"),
                &[],
            )
            .map_err(pg)?
            .map(|r| PgCursor {
                source_db: r.get(0),
                seq: r.get(1),
                tip: r.get(2),
            });
        let tip_here = match cursor.as_ref().and_then(|c| c.seq) {
            Some(p) => Some(sqlite.tip(p)?),
            None => None,
        };
        let plan = resume(
            cursor.as_ref(),
            &state,
            tip_here.as_deref(),
            ensured == Ensured::Rebuilt,
            &self.cfg.schema,
        );
        let (mut at, copied) = match plan {
            Resume::Follow(seq) => {
                self.set_problem(None)?;
                (seq, false)
            }
            Resume::Refuse(why) => return Err(SessionError::Refused(why)),
            Resume::Copy(why) => {
                if cursor.is_some() {
                    tracing::warn!(target_db = %self.cfg.target, reason = %why, "PostgreSQL is copied whole again from SQLite");
                } else {
                    tracing::info!(target_db = %self.cfg.target, reason = %why, "PostgreSQL is copied whole from SQLite");
                }
                self.set_problem(Some(format!(
                    "PostgreSQL is being copied whole from SQLite (started {}): {why}",
                    crate::model::fmt_ts(chrono::Utc::now())
                )))?;
                let seq = self.backfill(&mut client, &sqlite, &state.database_id)?;
                self.set_problem(None)?;
                (seq, true)
            }
        };
        self.metrics.postgres_up(true);
        // After a whole copy every SQLite run is copied again (a restored
        // database may reuse ids PostgreSQL holds from the abandoned history).
        let runs_floor: i64 = if copied {
            0
        } else {
            client
            .query_one(
                &format!(
                    "SELECT coalesce(min(id) FILTER (WHERE status = 'running'), max(id) + 1, 0) FROM {s}.sync_runs"
                ),
                &[],
            )
            .map_err(pg)?
            .get(0)
        };
        let mut status = StatusCopy {
            runs_floor,
            last: None,
        };
        // Batches of a busy stream come at most every LINGER (unless full), so
        // a burst becomes a few large transactions rather than one per commit;
        // SQLite hears the acknowledgement at most every ACK_EVERY (or when idle).
        let mut last_batch: Option<(Instant, bool)> = None;
        let mut acked = (at, Instant::now());
        while !self.stopped() {
            if let Some((t, false)) = last_batch {
                if let Some(rest) = LINGER.checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            let seen = self.signal.seen();
            let batch = sqlite.outbox_batch(at, self.cfg.batch_size)?;
            let due = status.last.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
            if batch.changes == 0 && !due {
                last_batch = None;
                if acked.0 < at {
                    self.ack(at)?;
                    acked = (at, Instant::now());
                }
                self.signal.wait(seen, POLL);
                continue;
            }
            let refresh = if due {
                Some(self.read_status(&sqlite, &status)?)
            } else {
                None
            };
            let mut tx = client.transaction().map_err(pg)?;
            self.lock_cursor(&mut tx, &state.database_id, Some(at))?;
            if batch.changes > 0 {
                self.write_docs(&mut tx, &batch.docs, batch.last_seq)?;
                self.write_history(&mut tx, &batch.history, false)?;
            }
            if let Some((runs, queue)) = &refresh {
                self.write_status(&mut tx, runs, queue, &sqlite, batch.last_seq.max(at))?;
            }
            let next = batch.last_seq.max(at);
            if batch.changes > 0 {
                tx.execute(
                    &format!(
                        "UPDATE {s}.sink_cursor SET seq = $1, tip = $2, updated_at = now() WHERE id = 1"
                    ),
                    &[&next, &batch.last_tip],
                )
                .map_err(pg)?;
            } else {
                tx.execute(
                    &format!("UPDATE {s}.sink_cursor SET updated_at = now() WHERE id = 1"),
                    &[],
                )
                .map_err(pg)?;
            }
            self.step()?;
            tx.commit().map_err(pg)?;
            self.step()?;
            if let Some((runs, _)) = refresh {
                status.runs_floor = runs
                    .iter()
                    .filter(|r| r.status == RunStatus::Running)
                    .map(|r| r.id)
                    .min()
                    .or_else(|| runs.iter().map(|r| r.id + 1).max())
                    .unwrap_or(status.runs_floor);
                status.last = Some(Instant::now());
            }
            if batch.changes > 0 {
                last_batch = Some((Instant::now(), batch.changes >= self.cfg.batch_size));
                if acked.1.elapsed() >= ACK_EVERY {
                    self.ack(next)?;
                    acked = (next, Instant::now());
                }
                self.record_delay(&batch);
                self.metrics.postgres_batch("ok");
                self.metrics
                    .postgres_documents_written(batch.docs.len() as u64);
            }
            at = next;
        }
        Ok(())
    }

    fn record_delay(&self, batch: &OutboxBatch) {
        if let Some(t) = batch
            .oldest_changed_at
            .as_deref()
            .and_then(crate::model::parse_upstream_ts)
        {
            let secs = (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.postgres_sink_delay(secs);
        }
    }

    fn ack(&self, seq: i64) -> Result<(), SessionError> {
        self.store
            .pg_ack(seq, crate::model::fmt_ts(chrono::Utc::now()))?;
        self.step()
    }

    /// Locks the cursor row for this transaction and checks it is still ours
    /// (and, when `expect` is given, where we left it: another sink moving it
    /// means two daemons feed one schema, so start over from the cursor).
    fn lock_cursor(
        &self,
        tx: &mut Transaction<'_>,
        database_id: &str,
        expect: Option<i64>,
    ) -> Result<(), SessionError> {
        let s = schema::quoted(&self.cfg.schema);
        let row = tx
            .query_opt(
                &format!("SELECT source_db, seq FROM {s}.sink_cursor WHERE id = 1 FOR UPDATE"),
                &[],
            )
            .map_err(|e| SessionError::Retry(self.cfg.error(&e).to_string()))?;
        match row {
            Some(r) => {
                let db: String = r.get(0);
                let seq: Option<i64> = r.get(1);
                if db != database_id {
                    return Err(SessionError::Refused(format!(
                        "PostgreSQL schema {} was taken over by another SQLite database ({db})",
                        self.cfg.schema
                    )));
                }
                if expect.is_some() && seq != expect {
                    return Err(SessionError::Retry(format!(
                        "the cursor moved under us ({seq:?}, expected {expect:?}): is another skillsync feeding schema {}?",
                        self.cfg.schema
                    )));
                }
                Ok(())
            }
            None if expect.is_none() => Ok(()),
            None => Err(SessionError::Retry("the cursor row disappeared".into())),
        }
    }

    /// Copies every mirrored row and history row; returns the cursor (S0).
    fn backfill(
        &self,
        client: &mut postgres::Client,
        sqlite: &ReadOnlyStore,
        database_id: &str,
    ) -> Result<i64, SessionError> {
        let pg = |e: postgres::Error| SessionError::Retry(self.cfg.error(&e).to_string());
        let s = schema::quoted(&self.cfg.schema);
        // The outbox is on (switched on before this): every change after s0 is in it.
        let s0 = sqlite.sink_state()?.max_seq;
        let tip0 = sqlite.tip(s0)?;
        let started = Instant::now();
        {
            let mut tx = client.transaction().map_err(pg)?;
            self.lock_cursor(&mut tx, database_id, None)?;
            tx.execute(
                &format!(
                    "INSERT INTO {s}.sink_cursor (id, source_db, seq, tip, updated_at) VALUES (1, $1, NULL, NULL, now())
                     ON CONFLICT (id) DO UPDATE SET seq = NULL, tip = NULL, updated_at = now()"
                ),
                &[&database_id],
            )
            .map_err(pg)?;
            // Every row PostgreSQL holds is stale until this copy rewrites it
            // (source_seq -1 is below any seq, so the copy's upserts win even
            // over rows of an abandoned history with higher seqs); what is
            // still -1 at the end is not in SQLite and goes.
            for ty in DocType::ALL {
                tx.execute(
                    &format!(
                        "UPDATE {s}.{} SET source_seq = -1 WHERE source_seq <> -1",
                        ty.table()
                    ),
                    &[],
                )
                .map_err(pg)?;
            }
            tx.commit().map_err(pg)?;
        }
        tracing::info!(target_db = %self.cfg.target, "PostgreSQL backfill starting: copying every mirrored document");
        let mut total = 0u64;
        let mut last_log = Instant::now();
        for ty in DocType::ALL {
            let mut after: Option<(String, String)> = None;
            loop {
                if self.stopped() {
                    return Err(SessionError::Retry("stopping during the backfill".into()));
                }
                let page = sqlite.mirror_page(ty, after.as_ref(), self.cfg.batch_size)?;
                let Some(last) = page.last() else { break };
                after = Some((last.tenant.clone(), last.id.clone()));
                let mut tx = client.transaction().map_err(pg)?;
                self.lock_cursor(&mut tx, database_id, None)?;
                self.write_docs(&mut tx, &page, s0)?;
                self.step()?;
                tx.commit().map_err(pg)?;
                self.step()?;
                total += page.len() as u64;
                if last_log.elapsed() >= Duration::from_secs(5) {
                    tracing::info!(
                        documents = total,
                        secs = started.elapsed().as_secs(),
                        "PostgreSQL backfill in progress"
                    );
                    last_log = Instant::now();
                }
            }
        }
        let mut after = 0i64;
        let mut history = 0u64;
        loop {
            if self.stopped() {
                return Err(SessionError::Retry("stopping during the backfill".into()));
            }
            let page = sqlite.history_page(after, self.cfg.batch_size)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            let rows: Vec<HistoryRow> = page.into_iter().map(|(_, h)| h).collect();
            let mut tx = client.transaction().map_err(pg)?;
            self.lock_cursor(&mut tx, database_id, None)?;
            self.write_history(&mut tx, &rows, true)?;
            self.step()?;
            tx.commit().map_err(pg)?;
            self.step()?;
            history += rows.len() as u64;
            if last_log.elapsed() >= Duration::from_secs(5) {
                tracing::info!(
                    documents = total,
                    history_rows = history,
                    secs = started.elapsed().as_secs(),
                    "PostgreSQL backfill in progress"
                );
                last_log = Instant::now();
            }
        }
        {
            let max_run = sqlite.max_run_id()?;
            let mut tx = client.transaction().map_err(pg)?;
            self.lock_cursor(&mut tx, database_id, None)?;
            let mut stale = 0u64;
            for ty in DocType::ALL {
                let t = ty.table();
                let k = ty.as_str();
                stale += tx
                    .execute(&format!("DELETE FROM {s}.{t} WHERE source_seq = -1"), &[])
                    .map_err(pg)?;
                tx.batch_execute(&format!(
                    "DELETE FROM {s}.{k}_report_values v
                     WHERE NOT EXISTS (SELECT 1 FROM {s}.{t} d WHERE d.tenant = v.tenant AND d.id = v.id);
                     DELETE FROM {s}.document_history h
                     WHERE h.doc_type = '{k}' AND NOT EXISTS (
                         SELECT 1 FROM {s}.{t} d WHERE d.tenant = h.tenant AND d.id = h.id AND d.revision >= h.revision);
                     DELETE FROM {s}.document_stages h
                     WHERE h.doc_type = '{k}' AND NOT EXISTS (
                         SELECT 1 FROM {s}.{t} d WHERE d.tenant = h.tenant AND d.id = h.id AND d.revision >= h.revision);"
                ))
                .map_err(pg)?;
            }
            tx.execute(
                &format!("DELETE FROM {s}.sync_runs WHERE id > $1"),
                &[&max_run],
            )
            .map_err(pg)?;
            tx.execute(
                &format!(
                    "UPDATE {s}.sink_cursor SET seq = $1, tip = $2, updated_at = now() WHERE id = 1"
                ),
                &[&s0, &tip0],
            )
            .map_err(pg)?;
            schema::record_report_hash(&mut tx, &self.cfg.schema, &self.spec).map_err(pg)?;
            self.step()?;
            tx.commit().map_err(pg)?;
            if stale > 0 {
                tracing::info!(
                    documents = stale,
                    "PostgreSQL rows that SQLite does not hold were removed (and their history and report rows)"
                );
            }
        }
        self.ack(s0)?;
        tracing::info!(
            documents = total,
            history_rows = history,
            ms = started.elapsed().as_millis() as u64,
            "PostgreSQL backfill done; following the outbox from here"
        );
        Ok(s0)
    }

    fn write_docs(
        &self,
        tx: &mut Transaction<'_>,
        docs: &[DocRow],
        seq: i64,
    ) -> Result<(), SessionError> {
        let s = schema::quoted(&self.cfg.schema);
        for ty in DocType::ALL {
            let rows: Vec<&DocRow> = docs.iter().filter(|d| d.doc_type == ty).collect();
            if rows.is_empty() {
                continue;
            }
            let col = |f: &dyn Fn(&DocRow) -> Option<String>| -> Vec<Option<String>> {
                rows.iter().map(|d| f(d)).collect()
            };
            let tenant = col(&|d| Some(d.tenant.clone()));
            let id = col(&|d| Some(d.id.clone()));
            let document = col(&|d| Some(jsonb_safe(&d.document)));
            let number = col(&|d| d.number.as_deref().map(text_safe));
            let name = col(&|d| d.name.as_deref().map(text_safe));
            let modified = col(&|d| d.modified_on.as_deref().and_then(timestamp));
            let first_seen = col(&|d| Some(d.first_seen_at.clone()));
            let fetched = col(&|d| Some(d.fetched_at.clone()));
            let deleted = col(&|d| d.deleted_at.clone());
            let version: Vec<Option<i64>> = rows.iter().map(|d| d.version).collect();
            let revision: Vec<i64> = rows.iter().map(|d| d.revision).collect();
            let params: [&(dyn ToSql + Sync); 12] = [
                &tenant,
                &id,
                &document,
                &number,
                &name,
                &modified,
                &version,
                &revision,
                &first_seen,
                &fetched,
                &deleted,
                &seq,
            ];
            tx.execute(
                &format!(
                    "INSERT INTO {s}.{t} AS t (tenant, id, document, number, name, modified_on, version, revision,
                                           first_seen_at, fetched_at, deleted_at, source_seq, synced_at)
                     SELECT u.tenant, u.id::uuid, u.document::jsonb, u.number, u.name, u.modified_on::timestamptz,
                            u.version, u.revision, u.first_seen_at::timestamptz, u.fetched_at::timestamptz,
                            u.deleted_at::timestamptz, $12, clock_timestamp()
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                 $7::int8[], $8::int8[], $9::text[], $10::text[], $11::text[])
                          AS u(tenant, id, document, number, name, modified_on, version, revision,
                               first_seen_at, fetched_at, deleted_at)
                     ON CONFLICT (tenant, id) DO UPDATE SET
                         document = excluded.document, number = excluded.number, name = excluded.name,
                         modified_on = excluded.modified_on, version = excluded.version,
                         revision = excluded.revision, first_seen_at = excluded.first_seen_at,
                         fetched_at = excluded.fetched_at, deleted_at = excluded.deleted_at,
                         source_seq = excluded.source_seq, synced_at = excluded.synced_at
                     WHERE t.source_seq <= excluded.source_seq",
                    t = ty.table()
                ),
                &params,
            )
            .map_err(|e| SessionError::Retry(self.cfg.error(&e).to_string()))?;
            self.step()?;
            self.write_values(tx, ty, &rows)?;
        }
        Ok(())
    }

    /// The report values of the rows (computed like SQLite's, in Rust).
    fn write_values(
        &self,
        tx: &mut Transaction<'_>,
        ty: DocType,
        rows: &[&DocRow],
    ) -> Result<(), SessionError> {
        let s = schema::quoted(&self.cfg.schema);
        let cols: Vec<(String, ColumnType)> = self
            .spec
            .stored_columns(ty)
            .map(|(c, _)| (c.name.clone(), c.ty))
            .collect();
        let values: Vec<Vec<Typed>> = rows
            .iter()
            .map(|d| self.spec.values(ty, &parse(&d.document)))
            .collect();
        let tenant: Vec<String> = rows.iter().map(|d| d.tenant.clone()).collect();
        let id: Vec<String> = rows.iter().map(|d| d.id.clone()).collect();
        let mut owned: Vec<Box<dyn ToSql + Sync>> = vec![Box::new(tenant), Box::new(id)];
        let mut select = vec!["u.c0".to_string(), "u.c1::uuid".to_string()];
        let mut arrays = vec!["$1::text[]".to_string(), "$2::text[]".to_string()];
        let mut names = vec!["tenant".to_string(), "id".to_string()];
        for (i, (name, cty)) in cols.iter().enumerate() {
            let n = i + 3;
            let at = |v: &Vec<Typed>| v.get(i).cloned().unwrap_or(Typed::Null);
            match cty {
                ColumnType::Integer => {
                    let col: Vec<Option<i64>> = values
                        .iter()
                        .map(|v| match at(v) {
                            Typed::Integer(x) => Some(x),
                            _ => None,
                        })
                        .collect();
                    owned.push(Box::new(col));
                    arrays.push(format!("${n}::int8[]"));
                    select.push(format!("u.c{}", n - 1));
                }
                ColumnType::Real => {
                    let col: Vec<Option<f64>> = values
                        .iter()
                        .map(|v| match at(v) {
                            Typed::Real(x) => Some(x),
                            Typed::Integer(x) => Some(x as f64),
                            _ => None,
                        })
                        .collect();
                    owned.push(Box::new(col));
                    arrays.push(format!("${n}::float8[]"));
                    select.push(format!("u.c{}", n - 1));
                }
                ColumnType::Text | ColumnType::Timestamp => {
                    let col: Vec<Option<String>> = values
                        .iter()
                        .map(|v| match at(v) {
                            Typed::Text(x) if *cty == ColumnType::Timestamp => timestamp(&x),
                            Typed::Text(x) => Some(text_safe(&x)),
                            Typed::Integer(x) if *cty == ColumnType::Text => Some(x.to_string()),
                            Typed::Real(x) if *cty == ColumnType::Text => Some(x.to_string()),
                            _ => None,
                        })
                        .collect();
                    owned.push(Box::new(col));
                    arrays.push(format!("${n}::text[]"));
                    select.push(if *cty == ColumnType::Timestamp {
                        format!("u.c{}::timestamptz", n - 1)
                    } else {
                        format!("u.c{}", n - 1)
                    });
                }
            }
            names.push(schema::quoted(name));
        }
        let aliases: Vec<String> = (0..names.len()).map(|i| format!("c{i}")).collect();
        let updates: Vec<String> = names
            .iter()
            .skip(2)
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        let conflict = if updates.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        let sql = format!(
            "INSERT INTO {s}.{ty}_report_values ({}) SELECT {} FROM unnest({}) AS u({}) ON CONFLICT (tenant, id) {conflict}",
            names.join(", "),
            select.join(", "),
            arrays.join(", "),
            aliases.join(", "),
        );
        let params: Vec<&(dyn ToSql + Sync)> = owned.iter().map(|b| b.as_ref()).collect();
        tx.execute(&sql, &params)
            .map_err(|e| SessionError::Retry(self.cfg.error(&e).to_string()))?;
        self.step()
    }

    /// Inserts history rows and their stages; `overwrite` (a whole copy)
    /// replaces rows PostgreSQL holds under the same revision, which only
    /// differ when they came from an abandoned history (a restored SQLite).
    fn write_history(
        &self,
        tx: &mut Transaction<'_>,
        rows: &[HistoryRow],
        overwrite: bool,
    ) -> Result<(), SessionError> {
        if rows.is_empty() {
            return Ok(());
        }
        let s = schema::quoted(&self.cfg.schema);
        let pg = |e: postgres::Error| SessionError::Retry(self.cfg.error(&e).to_string());
        let tenant: Vec<&str> = rows.iter().map(|h| h.tenant.as_str()).collect();
        let ty: Vec<&str> = rows.iter().map(|h| h.doc_type.as_str()).collect();
        let id: Vec<&str> = rows.iter().map(|h| h.id.as_str()).collect();
        let revision: Vec<i64> = rows.iter().map(|h| h.revision).collect();
        let document: Vec<String> = rows.iter().map(|h| jsonb_safe(&h.document)).collect();
        let fetched: Vec<&str> = rows.iter().map(|h| h.fetched_at.as_str()).collect();
        let stage: Vec<Option<String>> = rows
            .iter()
            .map(|h| self.spec.stage(&parse(&h.document)).map(|s| text_safe(&s)))
            .collect();
        tx.execute(
            &format!(
                "INSERT INTO {s}.document_history (tenant, doc_type, id, revision, document, fetched_at)
                 SELECT u.tenant, u.doc_type, u.id::uuid, u.revision, u.document::jsonb, u.fetched_at::timestamptz
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[])
                      AS u(tenant, doc_type, id, revision, document, fetched_at)
                 ON CONFLICT (tenant, doc_type, id, revision) {}",
                if overwrite {
                    "DO UPDATE SET document = excluded.document, fetched_at = excluded.fetched_at"
                } else {
                    "DO NOTHING"
                }
            ),
            &[&tenant, &ty, &id, &revision, &document, &fetched],
        )
        .map_err(pg)?;
        self.step()?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.document_stages (tenant, doc_type, id, revision, stage, fetched_at)
                 SELECT u.tenant, u.doc_type, u.id::uuid, u.revision, u.stage, u.fetched_at::timestamptz
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[])
                      AS u(tenant, doc_type, id, revision, stage, fetched_at)
                 ON CONFLICT (doc_type, tenant, id, revision) {}",
                if overwrite {
                    "DO UPDATE SET stage = excluded.stage, fetched_at = excluded.fetched_at"
                } else {
                    "DO NOTHING"
                }
            ),
            &[&tenant, &ty, &id, &revision, &stage, &fetched],
        )
        .map_err(pg)?;
        self.step()
    }

    /// The runs and queue figures, when they differ from the last copy.
    fn read_status(
        &self,
        sqlite: &ReadOnlyStore,
        last: &StatusCopy,
    ) -> Result<(Vec<RunRow>, Vec<StatusRow>), SessionError> {
        let runs = sqlite.runs_since(last.runs_floor)?;
        // The queue side of `sync_status` (what only SQLite knows).
        let queue = sqlite.queue_rows()?;
        Ok((runs, queue))
    }

    fn write_status(
        &self,
        tx: &mut Transaction<'_>,
        runs: &[RunRow],
        queue: &[StatusRow],
        sqlite: &ReadOnlyStore,
        copied_to: i64,
    ) -> Result<(), SessionError> {
        let s = schema::quoted(&self.cfg.schema);
        let pg = |e: postgres::Error| SessionError::Retry(self.cfg.error(&e).to_string());
        for r in runs {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.sync_runs (id, tenant, doc_type, kind, started_at, finished_at, status, listed,
                                                enqueued, marked_deleted, missed, candidates, error)
                     VALUES ($1, $2, $3, $4, $5::text::timestamptz, $6::text::timestamptz, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, doc_type = excluded.doc_type,
                         kind = excluded.kind, started_at = excluded.started_at,
                         finished_at = excluded.finished_at, status = excluded.status,
                         listed = excluded.listed, enqueued = excluded.enqueued, marked_deleted = excluded.marked_deleted,
                         missed = excluded.missed, candidates = excluded.candidates, error = excluded.error"
                ),
                &[
                    &r.id, &r.tenant, &r.doc_type.as_str(), &r.kind.as_str(), &r.started_at, &r.finished_at, &r.status.as_str(),
                    &r.listed, &r.enqueued, &r.marked_deleted, &r.missed, &r.candidates,
                    &r.error.as_deref().map(text_safe),
                ],
            )
            .map_err(pg)?;
        }
        // Changes not yet copied hold this copy's "complete as of" back.
        let waiting: Option<String> = sqlite.oldest_change_after(copied_to)?;
        tx.execute(&format!("DELETE FROM {s}.source_queue"), &[])
            .map_err(pg)?;
        for q in queue {
            let complete = match (&q.complete_as_of, &waiting) {
                (Some(c), Some(w)) if w < c => Some(w.clone()),
                (c, _) => c.clone(),
            };
            tx.execute(
                &format!(
                    "INSERT INTO {s}.source_queue (tenant, doc_type, pending_events, queued_fetches, retrying_fetches,
                                                   dead_events, dead_documents, oldest_pending_at, complete_as_of)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::timestamptz, $9::text::timestamptz)"
                ),
                &[
                    &q.tenant, &q.doc_type.as_str(), &q.pending_events, &q.queued_fetches, &q.retrying_fetches,
                    &q.dead_events, &q.dead_documents, &q.oldest_pending_at, &complete,
                ],
            )
            .map_err(pg)?;
        }
        self.step()
    }
}

pub(crate) fn parse(doc: &str) -> Map<String, Value> {
    match serde_json::from_str(doc) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// PostgreSQL text cannot hold NUL.
pub(crate) fn text_safe(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s.to_string()
    }
}

/// jsonb refuses the escape `\u0000`; such a document is stored with U+FFFD
/// instead (and `postgres-check` reports it as different).
fn jsonb_safe(doc: &str) -> String {
    if doc.contains("\\u0000") {
        doc.replace("\\u0000", "\\ufffd")
    } else {
        doc.to_string()
    }
}

/// Table-format times only (anything else would fail the whole batch's cast).
fn timestamp(s: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(acked: i64, max: i64) -> SinkState {
        SinkState {
            database_id: "db1".into(),
            since_seq: Some(1),
            acked_seq: Some(acked),
            max_seq: max,
        }
    }

    fn cursor(seq: Option<i64>, tip: Option<&str>) -> PgCursor {
        PgCursor {
            source_db: "db1".into(),
            seq,
            tip: tip.map(str::to_string),
        }
    }

    fn copies(r: Resume, why: &str) {
        match r {
            Resume::Copy(reason) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected a copy ({why}), got {other:?}"),
        }
    }

    #[test]
    fn follows_only_a_cursor_that_continues_this_history() {
        let st = state(100, 150);
        // Acknowledged by SQLite itself.
        assert_eq!(
            resume(Some(&cursor(Some(100), None)), &st, None, false, "s"),
            Resume::Follow(100)
        );
        // Ahead of the acknowledgement (a crash before the ack), same change.
        assert_eq!(
            resume(
                Some(&cursor(Some(120), Some("t"))),
                &st,
                Some("t"),
                false,
                "s"
            ),
            Resume::Follow(120)
        );
        // Up to the last change written.
        assert_eq!(
            resume(
                Some(&cursor(Some(150), Some("t"))),
                &st,
                Some("t"),
                false,
                "s"
            ),
            Resume::Follow(150)
        );
    }

    #[test]
    fn every_mismatch_is_a_whole_copy_with_its_reason() {
        let st = state(100, 150);
        copies(resume(None, &st, None, false, "s"), "first start");
        copies(
            resume(Some(&cursor(None, None)), &st, None, false, "s"),
            "did not finish",
        );
        copies(
            resume(Some(&cursor(Some(100), None)), &st, None, true, "s"),
            "new shape",
        );
        // A restored SQLite backup: PostgreSQL is ahead of the outbox.
        copies(
            resume(Some(&cursor(Some(151), Some("t"))), &st, None, false, "s"),
            "SQLite is behind PostgreSQL",
        );
        // ... and later, once new changes reuse the seqs.
        copies(
            resume(
                Some(&cursor(Some(120), Some("t"))),
                &st,
                Some("u"),
                false,
                "s",
            ),
            "not the one PostgreSQL copied",
        );
        copies(
            resume(Some(&cursor(Some(120), None)), &st, Some("u"), false, "s"),
            "no fingerprint",
        );
        // A restored PostgreSQL or a lagging replica: changes pruned in between.
        copies(
            resume(Some(&cursor(Some(99), Some("t"))), &st, None, false, "s"),
            "PostgreSQL is behind SQLite",
        );
    }

    #[test]
    fn another_database_is_refused_not_overwritten() {
        let st = state(100, 150);
        let mut c = cursor(Some(100), None);
        c.source_db = "other".into();
        match resume(Some(&c), &st, None, false, "s") {
            Resume::Refuse(why) => assert!(why.contains("another SQLite database"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
