//! The store: the only place with SQL. Owns the SQLite file, its pragmas, the
//! schema and its migrations, the pool of read connections and the single
//! writer thread.
//!
//! Every write goes through one writer thread that groups whatever writes
//! arrived while the previous commit ran into one transaction (each write in
//! its own savepoint, or a single statement, so one failing write does not
//! undo the others), then commits once with `synchronous=FULL`. A caller's
//! future resolves only after that commit: when the webhook answers 200, the
//! event is on disk. `group_commit = false` commits every write alone (the
//! benchmark's baseline). Reads use the r2d2 pool on blocking threads, so no
//! SQLite call runs on an async worker thread.
//!
//! Submodules hold the statements by concern: `queue` (events and the fetch
//! queue), `mirror` (documents and history), `sync` (reconciliation runs and
//! locks), `status` (what `status`, `/metrics` and health read), `report`
//! (the report and stage views and the derived tables behind them),
//! `outbox` (what feeds the PostgreSQL mirror), `retention` (pruning),
//! `upgrade` (what opening a database would migrate or rebuild, read-only),
//! `backup` (the online copy behind `skillsync backup`), `audit` (the
//! accuracy audit's sample, refetches and `audits` rows), `read_only`
//! ([`ReadOnlyStore`], an existing database opened read-only for the
//! read-only commands and the PostgreSQL sink's thread).
//!
//! The submodules are private and no `rusqlite` type leaves this module:
//! callers get [`Store`] (its async methods, and the few blocking ones the
//! sink's thread calls), [`ReadOnlyStore`] and the row and outcome types
//! re-exported below. `Store::read` and `Store::write` take closures
//! over a connection, so they stay private to the store.

mod audit;
mod backup;
mod mirror;
mod outbox;
mod queue;
mod read_only;
mod report;
mod retention;
mod status;
mod sync;
mod upgrade;

pub use audit::{AuditCounts, AuditRow, MirrorView, Sample, SamplePlan};
pub use backup::{
    Done as BackupDone, Progress as BackupProgress, backup, reporter as backup_reporter,
};
pub use mirror::{FetchedDoc, GoneOutcome, SampleRow, StoreOutcome, fill_synthetic_jobs};
pub use outbox::{DocRow, HistoryRow, Lag, OutboxBatch, OutboxSignal, RunRow, SinkState};
pub use queue::{FailureResult, FetchFailure, NewEvent};
pub use read_only::ReadOnlyStore;
pub use report::{RebuildReason, RebuildState, ReportRole, ReportWork};
pub use retention::Aged;
pub use status::{MetricsSnapshot, StatusRow, Throttling};
pub use sync::{Finished, MirrorState, PageState, RunCounts, RunEnd, RunRef};
pub use upgrade::{PlannedMigration, Rows, UpgradePlan, plan as upgrade_plan};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

/// One schema version: the file at the repository root that brings a
/// database to it (its name, as `skillsync migrate --dry-run` shows it) and
/// that file's SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The schema version the database has once this ran.
    pub version: i64,
    /// The file name without `.sql`: `schema` for version 1, then `NNN_what`.
    pub name: &'static str,
    /// The statements, run in one transaction.
    pub sql: &'static str,
}

/// A [`Migration`] from `migrations/NNN_name.sql`, named after its file.
macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../migrations/", $name, ".sql")),
        }
    };
}

/// Schema versions in order: entry `i` brings the database to version `i + 1`.
/// `schema.sql` and the numbered migrations beside it at the repository root.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "schema",
        sql: include_str!("../../schema.sql"),
    },
    migration!(2, "002_deferred_queue"),
    migration!(3, "003_deletion_evidence"),
    migration!(4, "004_postgres_outbox"),
    migration!(5, "005_recorded_by_document"),
    migration!(6, "006_reserved"),
    migration!(7, "007_upstream_throttling"),
    migration!(8, "008_audits"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How many writes one commit may carry. Bounded so one batch cannot hold the
/// write lock for long while readers and other processes wait.
const MAX_BATCH: usize = 1024;

/// Writes waiting for the writer beyond this are refused at once (503), so a
/// stalled disk turns into back-pressure instead of unbounded memory.
const WRITE_QUEUE: usize = 16_384;

/// How often the checkpointer thread copies committed WAL frames into the
/// database file. Checkpointing inside a commit (SQLite's default, every
/// 1,000 pages) put a burst of page writes and two extra fsyncs on the
/// writer thread, in front of every webhook waiting for that commit.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The writer still checkpoints by itself past this many WAL pages (40 MB):
/// a backstop should the checkpointer fall behind or stop.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// A store failure, classified for the one place that maps it to HTTP.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot take the write now (locked past `busy_timeout`,
    /// disk full, read-only, I/O error, writer overloaded): try again later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database file carries a schema newer than this binary.
    #[error(
        "database schema version {found} is newer than this skillsync understands (version {known}); upgrade skillsync or use the matching database"
    )]
    TooNew { found: i64, known: i64 },
    /// The file carries the reverted schema 6 (see `migrations/006_reserved.sql`).
    #[error(
        "database schema version 6 is newer than this skillsync understands: a development build wrote it with a schema that was reverted (its inbox_cursor table); use that build, or a copy of the database from before it"
    )]
    Reverted,
    /// Anything else (a bug or a corrupt file).
    #[error("database error: {0}")]
    Other(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(
                C::DatabaseBusy
                | C::DatabaseLocked
                | C::DiskFull
                | C::ReadOnly
                | C::SystemIoFailure
                | C::CannotOpen
                | C::OutOfMemory
                | C::FileLockingProtocolFailed,
            ) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Other(e.to_string()),
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(e: r2d2::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// What the writer runs: the write itself, returning what to do once the
/// batch's commit succeeded or failed.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Given the connection, or why the batch's transaction could not begin.
type WriteJob = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Completion + Send>;

enum WriterMsg {
    Write(WriteJob),
    /// Checkpoint and truncate the WAL (at shutdown), outside any transaction.
    Checkpoint(oneshot::Sender<Result<(), StoreError>>),
}

struct Inner {
    pool: r2d2::Pool<SqliteConnectionManager>,
    writer: mpsc::Sender<WriterMsg>,
    path: PathBuf,
    /// The report columns and stage field every stored revision is recorded
    /// with: the ones the tables were built for at open, replaced by
    /// [`Store::set_report_spec`] inside the write that reshapes the tables
    /// (the writer reads it when a write runs, never when it is queued).
    /// `None`: this process stores no report values (an operator command
    /// whose `[reporting]` differs from the tables'; see [`report::ReportRole`]).
    report: ReportSlot,
    /// Wakes the PostgreSQL sink after a mirror change commits (see [`outbox`]).
    outbox_signal: Arc<outbox::OutboxSignal>,
    /// Dropped with the store, which stops the checkpointer thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

/// The report spec in force, shared with the writer's jobs.
type ReportSlot = Arc<std::sync::RwLock<Option<Arc<crate::reporting::ReportSpec>>>>;

/// The spec in `slot` now (a poisoned lock still holds a whole value).
fn current_report(slot: &ReportSlot) -> Option<Arc<crate::reporting::ReportSpec>> {
    match slot.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn set_report(slot: &ReportSlot, spec: Option<Arc<crate::reporting::ReportSpec>>) {
    match slot.write() {
        Ok(mut g) => *g = spec,
        Err(p) => *p.into_inner() = spec,
    }
}

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Plans that do not depend on bound values. Without it SQLite 3.53 plans a
/// statement for the value bound to a `LIMIT ?` (and for partial indexes and
/// STAT4 ranges), and so re-prepares it at every execution that binds that
/// parameter: the claim's two `LIMIT ?` statements were parsed and planned
/// again on every claim, 6% of the writer thread's time under load. Every
/// statement here names its partial index's terms as literals, so no plan
/// needs a bound value.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

fn apply_pragmas(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    stable_plans(conn)?;
    // WAL lets reporting tools read while we write; FULL makes a commit
    // durable across power loss, not only across a process crash.
    // Switching a new file to WAL answers SQLITE_BUSY at once, without the
    // busy handler, while another connection switches it too (`serve` and
    // `reconcile` starting on a fresh database): retry within busy_timeout.
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r?,
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies the schema
    /// and starts the writer thread. The directory must exist and be writable.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Store, StoreError> {
        Store::open_with(path, busy_timeout, true)
    }

    /// [`Store::open`], choosing whether concurrent writes share a commit.
    /// `group_commit = false` commits every write alone: only for measuring
    /// what grouping buys (`[database] group_commit` in the config).
    pub fn open_with(
        path: &Path,
        busy_timeout: Duration,
        group_commit: bool,
    ) -> Result<Store, StoreError> {
        Store::open_with_report(
            path,
            busy_timeout,
            group_commit,
            crate::reporting::ReportSpec::default(),
            report::ReportRole::Owner,
        )
    }

    /// [`Store::open_with`], with the report views built for `report` (the
    /// `[reporting]` config): see the store's `report` module.
    pub fn open_with_report(
        path: &Path,
        busy_timeout: Duration,
        group_commit: bool,
        report: crate::reporting::ReportSpec,
        role: report::ReportRole,
    ) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(StoreError::Unavailable(format!(
                    "database directory {} does not exist (create it, or set database.path)",
                    dir.display()
                )));
            }
        }
        let writer_conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot open database {}: {e}", path.display()))
        })?;
        // A schema newer than this binary's is refused before anything is
        // set on the file (not even WAL mode): the binary that wrote it may
        // still need it exactly as it is.
        writer_conn.busy_timeout(busy_timeout)?;
        let found: i64 = writer_conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        check_version(&writer_conn, found)?;
        apply_pragmas(&writer_conn, busy_timeout).map_err(|e| {
            StoreError::Unavailable(format!("cannot set up database {}: {e}", path.display()))
        })?;
        // SQLite quietly opens read-only when it cannot write (say, a crashed
        // database's -shm in a read-only directory): refuse to start instead
        // of answering 503 forever.
        if writer_conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            return Err(StoreError::Unavailable(format!(
                "cannot open database {} for writing (read-only file or directory)",
                path.display()
            )));
        }
        // Room for every statement the writer runs (the default of 16 would evict).
        writer_conn.set_prepared_statement_cache_capacity(64);
        writer_conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
        // Savepoint journals in memory: each write runs in a savepoint, and a
        // claim's savepoint journal (a copy of every page it touches) spilled
        // past 64 KiB into a temp file, with a write syscall per page (5% of
        // the writer's time under load). Bounded by what one write touches.
        writer_conn.pragma_update(None, "temp_store", "MEMORY")?;
        migrate(&writer_conn)?;
        let record_values = report::ensure(&writer_conn, &report, role)?;

        let manager = SqliteConnectionManager::file(path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(move |c| {
                c.busy_timeout(busy_timeout)?;
                stable_plans(c)?;
                c.pragma_update(None, "foreign_keys", "ON")
            });
        let pool = r2d2::Pool::builder()
            .max_size(8)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(30))
            .build(manager)?;

        let checkpointer = start_checkpointer(path, busy_timeout)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("skillsync-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, if group_commit { MAX_BATCH } else { 1 }))
            .map_err(|e| StoreError::Other(format!("cannot start writer thread: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                pool,
                writer: tx,
                path: path.to_path_buf(),
                report: Arc::new(std::sync::RwLock::new(
                    record_values.then(|| Arc::new(report)),
                )),
                outbox_signal: Arc::default(),
                _checkpointer: checkpointer,
            }),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer inside the current batch's transaction (in a
    /// savepoint of its own) and resolves once the batch is committed.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    /// [`Store::write`] for a write that is exactly one SQL statement: SQLite
    /// undoes a failed statement by itself, so it needs no savepoint (two
    /// statements of the writer's time per write, a third of an inbox insert).
    async fn write_one<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    /// [`Store::write`] for a plain thread outside the runtime (the
    /// PostgreSQL sink's): it blocks that thread until the batch is
    /// committed. Never call it on a runtime thread (tokio panics there).
    fn write_blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.enqueue(f, true)?
            .blocking_recv()
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?
    }

    async fn submit<R, F>(&self, f: F, savepoint: bool) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.enqueue(f, savepoint)?
            .await
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?
    }

    /// Hands `f` to the writer (refused at once when its queue is full);
    /// the receiver yields `f`'s result once its batch committed.
    fn enqueue<R, F>(
        &self,
        f: F,
        savepoint: bool,
    ) -> Result<oneshot::Receiver<Result<R, StoreError>>, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let job: WriteJob = Box::new(move |conn: Result<&Connection, StoreError>| {
            let result = conn.and_then(|conn| {
                if savepoint {
                    in_savepoint(conn, f)
                } else {
                    f(conn)
                }
            });
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = tx.send(committed.and(result));
            }) as Completion
        });
        self.inner
            .writer
            .try_send(WriterMsg::Write(job))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    StoreError::Unavailable("write queue is full".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Unavailable("database writer has stopped".into())
                }
            })?;
        Ok(rx)
    }

    /// Runs `f` with a pooled connection on a blocking thread.
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let pool = self.inner.pool.clone();
        run_blocking(move || {
            let conn = pool.get()?;
            f(&conn)
        })
        .await
    }

    /// Checkpoints the WAL into the main file and truncates it (at `serve`'s
    /// own stop), so a copied database file is complete on its own. It waits
    /// for readers and holds writers meanwhile: never call it where `serve`
    /// may be running (`reconcile`, `retry`, the demo's steps).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(WriterMsg::Checkpoint(tx))
            .await
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?
    }

    /// Reshapes the report tables and views for `spec` (a reload's new
    /// `[reporting]`), in one bounded write; from that write on every stored
    /// revision records its values with `spec`, and [`Store::rebuild_reports_step`]
    /// fills the rest. Only for the owner of the report tables (`serve`).
    pub async fn set_report_spec(
        &self,
        spec: crate::reporting::ReportSpec,
    ) -> Result<(), StoreError> {
        let slot = self.inner.report.clone();
        let spec = Arc::new(spec);
        let previous = current_report(&slot);
        let (tx, rx) = oneshot::channel::<Result<(), StoreError>>();
        let job: WriteJob = Box::new(move |conn: Result<&Connection, StoreError>| {
            let result = conn.and_then(|c| {
                in_savepoint(c, |c| report::apply(c, &spec))?;
                // Later writes of this batch already record with the new
                // spec: the tables have its shape from here on.
                set_report(&slot, Some(spec));
                Ok(())
            });
            let applied = result.is_ok();
            Box::new(move |committed: Result<(), StoreError>| {
                if applied && committed.is_err() {
                    // The batch rolled back, the tables with it.
                    set_report(&slot, previous);
                }
                let _ = tx.send(committed.and(result));
            }) as Completion
        });
        self.inner
            .writer
            .send(WriterMsg::Write(job))
            .await
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("database writer has stopped".into()))?
    }

    /// How many rows a report rebuild reads (documents and history), counted
    /// on a reader: never inside the writer's batch, where a count of
    /// millions of rows would hold every webhook's commit.
    pub async fn report_rebuild_rows(&self) -> Result<u64, StoreError> {
        self.read(report::rebuild_rows).await
    }

    /// One batch (at most `batch` rows) of the report rebuild in progress,
    /// as one write; `None` when there is none (or it just finished).
    /// `total` (from [`Store::report_rebuild_rows`]) is kept with the state
    /// when it has none yet.
    pub async fn rebuild_reports_step(
        &self,
        batch: usize,
        total: Option<u64>,
    ) -> Result<Option<report::RebuildState>, StoreError> {
        let slot = self.inner.report.clone();
        self.write(move |c| match current_report(&slot) {
            Some(spec) => report::rebuild_step(c, &spec, batch, total),
            None => Ok(None),
        })
        .await
    }

    /// Proves the database takes a durable write now (for `/healthz`).
    pub async fn probe_write(&self, now: String) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO daemon_state(key, value) VALUES ('healthz', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [now],
            )?;
            Ok(())
        })
        .await
    }
}

/// Starts the thread that checkpoints the WAL (PASSIVE: it never waits for
/// the writer or readers, and the writer never waits for it) every
/// [`CHECKPOINT_EVERY`], on a connection of its own, until the returned
/// sender is dropped. Durability does not depend on it: every commit has
/// already fsynced its WAL frames.
fn start_checkpointer(
    path: &Path,
    busy_timeout: Duration,
) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // Same durability as the writer's: the checkpoint fsyncs the database
    // file before the WAL may be reused.
    conn.pragma_update(None, "synchronous", "FULL")?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("skillsync-ckpt".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %e, "background WAL checkpoint failed; retrying later");
                }
            }
        })
        .map_err(|e| StoreError::Other(format!("cannot start checkpoint thread: {e}")))?;
    Ok(tx)
}

/// How long the checkpoint at stop waits for readers before it settles for
/// a PASSIVE one.
const FINAL_CHECKPOINT_WAIT: Duration = Duration::from_millis(250);

/// The checkpoint at stop: TRUNCATE, so a stopped daemon leaves an empty
/// WAL, but waiting at most [`FINAL_CHECKPOINT_WAIT`] for readers. A reader
/// that keeps a read transaction open (Litestream holds one all the time, a
/// long report query) would otherwise hold the stop for the whole
/// busy_timeout; then it checkpoints what it can (PASSIVE), says so, and
/// leaves the rest of the WAL to the next start (nothing is lost: every
/// commit is already durable in the WAL).
fn final_checkpoint(conn: &Connection) -> Result<(), StoreError> {
    let busy_ms: i64 = conn.pragma_query_value(None, "busy_timeout", |r| r.get(0))?;
    conn.busy_timeout(FINAL_CHECKPOINT_WAIT)?;
    let counts = |r: &rusqlite::Row<'_>| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    };
    let truncate = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], counts);
    let r = match truncate {
        Ok((0, _, _)) => Ok(()),
        Ok(_) | Err(_) => {
            let why = match &truncate {
                Err(e) => e.to_string(),
                Ok(_) => "a reader holds the WAL".to_string(),
            };
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], counts) {
                Ok((_, log, done)) => {
                    tracing::info!(
                        reason = %why,
                        wal_frames = log,
                        checkpointed = done,
                        waited_ms = FINAL_CHECKPOINT_WAIT.as_millis() as u64,
                        "the WAL could not be truncated at stop (a reader such as Litestream holds it): checkpointed what it could (PASSIVE); the rest waits for the next start"
                    );
                    Ok(())
                }
                Err(e) => Err(StoreError::from(e)),
            }
        }
    };
    conn.busy_timeout(Duration::from_millis(busy_ms.max(0) as u64))?;
    r
}

/// Runs blocking work on tokio's blocking pool, re-raising a panic in the
/// caller instead of turning it into an error nobody reads.
pub async fn run_blocking<R, F>(f: F) -> R
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task cancelled: {e}"),
    }
}

fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    // Cached statements: these run twice per write, and re-parsing them was
    // a measurable share of the writer thread's time.
    let run = |sql: &str| -> Result<(), StoreError> {
        conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    };
    run("SAVEPOINT w")?;
    match f(conn) {
        Ok(r) => {
            run("RELEASE w")?;
            Ok(r)
        }
        Err(e) => {
            run("ROLLBACK TO w")?;
            run("RELEASE w")?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<WriterMsg>, max_batch: usize) {
    let checkpoint = |reply: oneshot::Sender<Result<(), StoreError>>| {
        let _ = reply.send(final_checkpoint(&conn));
    };
    while let Some(msg) = rx.blocking_recv() {
        let first = match msg {
            WriterMsg::Checkpoint(reply) => {
                checkpoint(reply);
                continue;
            }
            WriterMsg::Write(job) => job,
        };
        // The batch is whatever arrived while the previous commit (and its
        // fsync) ran, up to `max_batch`.
        let mut batch = Batch::begin(&conn, max_batch);
        batch.run(first);
        let mut pending_checkpoint = None;
        while !batch.full() {
            match rx.try_recv() {
                Ok(WriterMsg::Write(job)) => batch.run(job),
                Ok(WriterMsg::Checkpoint(reply)) => {
                    pending_checkpoint = Some(reply);
                    break;
                }
                Err(_) => break,
            }
        }
        let (completions, committed) = batch.commit();
        for c in completions {
            c(committed.clone());
        }
        if let Some(reply) = pending_checkpoint {
            checkpoint(reply);
        }
    }
}

/// One transaction of the writer: the writes it ran and what to tell their
/// callers once its fate is known.
struct Batch<'c> {
    conn: &'c Connection,
    /// Why the transaction could not begin, or was rolled back under us.
    failed: Option<StoreError>,
    completions: Vec<Completion>,
    max: usize,
}

impl<'c> Batch<'c> {
    fn begin(conn: &'c Connection, max: usize) -> Batch<'c> {
        let failed = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))
            .err()
            .map(StoreError::from);
        Batch {
            conn,
            failed,
            completions: Vec::with_capacity(max),
            max,
        }
    }

    fn full(&self) -> bool {
        self.completions.len() >= self.max
    }

    /// Some failures (disk full, I/O error) make SQLite roll back the whole
    /// transaction: later writes must not run in autocommit mode, and none of
    /// the batch may be reported as committed.
    fn note_rollback(&mut self) {
        if self.failed.is_none() && self.conn.is_autocommit() {
            self.failed = Some(StoreError::Unavailable(
                "the batch's transaction was rolled back".into(),
            ));
        }
    }

    fn run(&mut self, job: WriteJob) {
        self.note_rollback();
        let completion = match &self.failed {
            // The job does not run: its caller learns why the write did not happen.
            Some(e) => job(Err(e.clone())),
            None => job(Ok(self.conn)),
        };
        self.completions.push(completion);
    }

    /// Commits; returns the callers to tell and whether the commit succeeded.
    fn commit(mut self) -> (Vec<Completion>, Result<(), StoreError>) {
        self.note_rollback();
        let committed = match self.failed.take() {
            Some(e) => Err(e),
            None => self
                .conn
                .prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]))
                .map(|_| ())
                .map_err(StoreError::from),
        };
        if committed.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        (std::mem::take(&mut self.completions), committed)
    }
}

/// Opens `path` read-only and reads its schema version, refusing one this
/// binary cannot use ([`check_version`]); version 0 (a new or foreign file)
/// is the caller's to judge.
fn open_read_only_versioned(path: &Path) -> Result<(Connection, i64), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| {
        StoreError::Unavailable(format!("cannot open database {}: {e}", path.display()))
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    check_version(&conn, version)?;
    Ok((conn, version))
}

/// Refuses a schema this binary cannot use: newer than [`SCHEMA_VERSION`],
/// or the reverted version 6 (an `inbox_cursor` table at user_version 6).
fn check_version(conn: &Connection, found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == 6 {
        let reverted: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'inbox_cursor'",
            [],
            |r| r.get(0),
        )?;
        if reverted {
            return Err(StoreError::Reverted);
        }
    }
    Ok(())
}

/// Applies the migrations this database has not had yet, in order. Each
/// runs in a write transaction that re-reads the version first, so two
/// processes starting at once do not both apply it.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let read_version = |c: &Connection| -> Result<i64, StoreError> {
        Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
    };
    let version = read_version(conn)?;
    check_version(conn, version)?;
    for m in MIGRATIONS.iter().skip(version.max(0) as usize) {
        let target = m.version;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = read_version(conn).and_then(|v| {
            if v >= target {
                return Ok(());
            }
            conn.execute_batch(m.sql)?;
            conn.pragma_update(None, "user_version", target)?;
            Ok(())
        });
        match applied {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(StoreError::Other(format!(
                    "migration to schema version {target} failed: {e}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::{StatementStatus, params};

    use super::*;

    use crate::TestResult;

    /// Entry `i` brings the database to version `i + 1`, and each numbered
    /// file starts with that number.
    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
            if m.version > 1 {
                assert!(
                    m.name.starts_with(&format!("{:03}_", m.version)),
                    "{} is not numbered {}",
                    m.name,
                    m.version
                );
            }
        }
    }

    /// A statement with `LIMIT ?` (the claim's) is planned once, not again at
    /// every execution: without [`stable_plans`] SQLite re-prepares it each
    /// time the limit is bound.
    #[test]
    fn bound_limits_do_not_re_prepare() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("plans.db");
        drop(Store::open(&path, Duration::from_secs(1))?);
        let conn = Connection::open(&path)?;
        stable_plans(&conn)?;
        let mut stmt = conn.prepare(
            "SELECT id FROM events WHERE tenant = ?1 AND queued = 0 ORDER BY id LIMIT ?2",
        )?;
        for limit in [1_i64, 256, 8] {
            let ids = stmt
                .query_map(params!["acme", limit], |r| r.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            assert!(ids.is_empty());
        }
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0);
        Ok(())
    }
}
