//! The reporting layer of the database: the `job_report` / `project_report`
//! views with typed columns, the `job_stages` / `project_stages` stage
//! history views, the portable `sync_status` view, and the derived tables
//! behind them (`job_report_values`, `project_report_values`,
//! `document_stages`), created at start-up rather than by a numbered
//! migration because their shape follows the `[reporting]` config.
//!
//! The derived tables hold values taken from the documents in Rust
//! ([`crate::reporting`]); they are written with each stored revision and
//! rebuilt from `jobs`, `projects` and `document_history` (never changed
//! here) when the extraction rules change. Views are replaced whenever their
//! SQL differs from what this binary ships. Every view uses only SQL that
//! sqlite3, Datasette and DuckDB's sqlite extension all read alike: DuckDB
//! parses a SQLite view with its own parser, so no `FILTER (WHERE …)`, no
//! multi-argument `min`/`max`, no JSON or date functions, and no two
//! same-shaped aggregates over different tables under one UNION (DuckDB 1.5
//! merges them into one; see `kinds`/`mirror` in `sync_status`).

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};

use super::StoreError;
use crate::model::{DocKey, DocType};
use crate::reporting::{
    ReportSpec, SqlDialect, Typed, quote_ident, report_view_sql, stages_view_sql,
};

/// `daemon_state` key holding the hash of the extraction rules the derived tables were built with.
const HASH_KEY: &str = "reporting_values_hash";

/// `daemon_state` key holding the hash of the stage rule `document_stages`
/// was filled with: while it is unchanged a rebuild keeps those rows, which
/// outlive the `document_history` rows retention prunes.
const STAGE_HASH_KEY: &str = "reporting_stage_hash";

/// The hash value meaning "a process with another `[reporting]` config
/// stored documents without their report values: rebuild on the next start
/// of `serve`".
const STALE: &str = "stale";

/// Who may rebuild the derived tables when the `[reporting]` config differs
/// from the one they were built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportRole {
    /// `serve` (and tests, benchmarks): rebuilds at start-up, then records
    /// the values of every revision it stores.
    Owner,
    /// Operator commands beside a possibly running `serve` (`reconcile`,
    /// `retry`, the demo's own commands): never rebuild under it. With the
    /// same config they record values as usual; with another one they record
    /// none, mark the tables stale so the next `serve` start rebuilds them,
    /// and say so.
    Follower,
}

/// The views this module owns, dropped before the derived tables are rebuilt.
const VIEWS: [&str; 5] = [
    "sync_status",
    "job_report",
    "project_report",
    "job_stages",
    "project_stages",
];

/// Per tenant and type: what a report needs to say "complete as of T". Same
/// columns and results as schema version 1's view, in portable SQL.
const SYNC_STATUS: &str = include_str!("sync_status.sql");

fn values_table(ty: DocType) -> String {
    format!("{}_report_values", ty.as_str())
}

/// The derived tables' DDL.
fn table_sql(spec: &ReportSpec) -> Vec<String> {
    let mut out = Vec::new();
    for ty in DocType::ALL {
        let cols: String = spec
            .stored_columns(ty)
            .map(|(c, _)| format!(",\n    {} {}", quote_ident(&c.name), c.ty.sql_type()))
            .collect();
        out.push(format!(
            "CREATE TABLE {} (\n    tenant TEXT NOT NULL,\n    id TEXT NOT NULL{cols},\n    PRIMARY KEY (tenant, id)\n)",
            values_table(ty)
        ));
    }
    out.push(
        "CREATE TABLE document_stages (
    tenant     TEXT NOT NULL,
    doc_type   TEXT NOT NULL,
    id         TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    stage      TEXT,
    fetched_at TEXT NOT NULL,
    -- type first: the stage views read one type in (tenant, id, revision) order
    PRIMARY KEY (doc_type, tenant, id, revision)
)"
        .to_string(),
    );
    out
}

/// Every view, as `(name, CREATE VIEW …)`.
fn view_sql(spec: &ReportSpec) -> Vec<(String, String)> {
    let mut out = vec![("sync_status".to_string(), SYNC_STATUS.trim().to_string())];
    for ty in DocType::ALL {
        out.push((
            format!("{ty}_report"),
            report_view_sql(spec, SqlDialect::Sqlite, ty, ""),
        ));
        out.push((
            format!("{ty}_stages"),
            stages_view_sql(SqlDialect::Sqlite, ty, ""),
        ));
    }
    out
}

/// The hash of everything that decides the derived tables' content.
fn values_hash(spec: &ReportSpec) -> String {
    let mut text = format!("v1\n{spec:?}\n");
    for t in table_sql(spec) {
        text.push_str(&t);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn stored_hash(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM daemon_state WHERE key = ?1",
            [HASH_KEY],
            |r| r.get(0),
        )
        .optional()?)
}

/// Brings the reporting objects in line with `spec` (at start-up, on the
/// writer's connection, before it serves writes): rebuilds the derived tables
/// when the extraction rules changed, replaces any view whose SQL differs.
/// Idempotent and safe when two processes start at once. Returns whether
/// this process should record report values for the revisions it stores
/// (always for an owner; for a follower only when its config matches).
pub(super) fn ensure(
    conn: &Connection,
    spec: &ReportSpec,
    role: ReportRole,
) -> Result<bool, StoreError> {
    if role == ReportRole::Follower {
        let hash = values_hash(spec);
        match stored_hash(conn)? {
            // Never built (a new database): nothing can be running on it
            // with other tables, so build them as an owner would.
            None => {}
            Some(h) if h == hash => return Ok(true),
            Some(h) => {
                if h != STALE {
                    conn.execute(
                        "UPDATE daemon_state SET value = ?2 WHERE key = ?1",
                        params![HASH_KEY, STALE],
                    )?;
                }
                tracing::warn!(
                    "the [reporting] config differs from the one the report tables were built with; \
                     this command leaves them alone (a running serve keeps using them) and stores no report values; \
                     restart serve to rebuild them with the new config"
                );
                return Ok(false);
            }
        }
    }
    ensure_owner(conn, spec)?;
    Ok(true)
}

fn ensure_owner(conn: &Connection, spec: &ReportSpec) -> Result<(), StoreError> {
    if up_to_date(conn, spec)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match apply(conn, spec) {
        Ok(()) => {
            conn.execute_batch("COMMIT")?;
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(StoreError::Other(format!(
                "cannot set up the report views: {e}"
            )))
        }
    }
}

/// What [`ensure`] would do as the owner with `spec` (for `skillsync migrate
/// --dry-run`), read without changing anything. On a database whose
/// migrations have not run yet, a table they would add reads as absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportWork {
    /// Tables and views are those of `spec`: nothing to do.
    UpToDate,
    /// Only view definitions differ (a new binary's view SQL): recreated, no rows read.
    Views,
    /// The derived tables are rebuilt from the documents.
    Rebuild {
        /// Why: never built, the `[reporting]` rules changed, or marked stale
        /// by a command that ran with another config.
        why: RebuildReason,
        /// Whether the stage rule changed too (or the stage table is
        /// missing), so every history revision is read again.
        stages: bool,
        /// Whether the rows are filled after READY in batches (more than
        /// [`SYNC_REBUILD_ROWS`] rows), not at start-up.
        background: bool,
    },
    /// A background rebuild a previous `serve` began resumes after READY.
    Resume {
        /// Rows done and to do, as the rebuild recorded them (`total` is
        /// known once its first batch ran).
        done: u64,
        total: Option<u64>,
    },
}

/// Why the report tables are rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildReason {
    /// This database has never had them (new, or made before they existed).
    FirstBuild,
    /// The `[reporting]` config (or this binary's extraction) differs from the one they were built with.
    ConfigChanged,
    /// A command with another `[reporting]` config stored documents without their values.
    Stale,
}

pub(super) fn plan(conn: &Connection, spec: &ReportSpec) -> Result<ReportWork, StoreError> {
    let has_state = table_exists(conn, "daemon_state")?;
    let stored = if has_state { stored_hash(conn)? } else { None };
    let why = match stored.as_deref() {
        None => Some(RebuildReason::FirstBuild),
        Some(STALE) => Some(RebuildReason::Stale),
        Some(h) if h != values_hash(spec) => Some(RebuildReason::ConfigChanged),
        Some(_) => None,
    };
    if let Some(why) = why {
        let stage_hash: Option<String> = if has_state {
            conn.query_row(
                "SELECT value FROM daemon_state WHERE key = ?1",
                [STAGE_HASH_KEY],
                |r| r.get(0),
            )
            .optional()?
        } else {
            None
        };
        let stages = !(table_exists(conn, "document_stages")?
            && stage_hash.as_deref() == Some(&*stage_rule_hash(spec)));
        // What begin_rebuild counts once it has renamed the current tables aside.
        let mut rows = 0i64;
        let mut retired: Vec<String> = DocType::ALL.iter().map(|t| values_table(*t)).collect();
        if stages {
            retired.push("document_stages".into());
        }
        for t in retired {
            if table_exists(conn, &t)? {
                rows += conn.query_row(
                    &format!("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT ?1)"),
                    [SYNC_REBUILD_ROWS + 1],
                    |r| r.get::<_, i64>(0),
                )?;
            }
        }
        let background = rows > SYNC_REBUILD_ROWS || !rows_at_most(conn, SYNC_REBUILD_ROWS - rows)?;
        return Ok(ReportWork::Rebuild {
            why,
            stages,
            background,
        });
    }
    if has_state {
        if let Some(state) = rebuild_state(conn)? {
            return Ok(ReportWork::Resume {
                done: state.done,
                total: state.total,
            });
        }
    }
    for (name, sql) in view_sql(spec) {
        let have: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .optional()?;
        if have.as_deref() != Some(sql.as_str()) {
            return Ok(ReportWork::Views);
        }
    }
    Ok(ReportWork::UpToDate)
}

/// Whether the derived tables were built for `spec` and every view is the
/// SQL this binary ships.
fn up_to_date(c: &Connection, spec: &ReportSpec) -> Result<bool, StoreError> {
    if stored_hash(c)?.as_deref() != Some(values_hash(spec).as_str()) {
        return Ok(false);
    }
    for (name, sql) in &view_sql(spec) {
        let have: Option<String> = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if have.as_deref() != Some(sql.as_str()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Brings the views and the derived tables' shape in line with `spec`
/// inside the caller's transaction (at start-up, or a reload's write).
/// Bounded, whatever the size of the database: when the extraction rules
/// changed, the old tables are renamed aside (dropped later in batches) and
/// new empty ones created; [`rebuild_step`] fills them after the daemon
/// serves. Revisions stored meanwhile record their values at once.
pub(super) fn apply(conn: &Connection, spec: &ReportSpec) -> Result<(), StoreError> {
    if up_to_date(conn, spec)? {
        return Ok(());
    }
    let started = std::time::Instant::now();
    for v in VIEWS {
        conn.execute_batch(&format!("DROP VIEW IF EXISTS {v}"))?;
    }
    let hash = values_hash(spec);
    let rebuilding = stored_hash(conn)?.as_deref() != Some(hash.as_str());
    if rebuilding {
        begin_rebuild(conn, spec, &hash)?;
    }
    for (_, sql) in &view_sql(spec) {
        conn.execute_batch(sql)?;
    }
    if rebuilding {
        let background = rebuild_state(conn)?.is_some();
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            background,
            "{}",
            if background {
                "report tables recreated for the [reporting] config; their values are filled in the background \
                 (sync_status.report_rebuilding = 1 until done, progress in `skillsync status`)"
            } else {
                "report columns rebuilt for the [reporting] config; views recreated"
            }
        );
    } else {
        tracing::info!("report views recreated");
    }
    Ok(())
}

/// `daemon_state` key of a rebuild in progress: its [`RebuildState`] as JSON.
const REBUILD_KEY: &str = "report_rebuild";

/// Prefix of a derived table renamed aside by a rebuild, dropped in batches.
const RETIRED: &str = "retired_";

/// Where a background rebuild is: it fills the values of every job, then
/// every project (in key order after `after`), then the stages of every
/// history revision (in rowid order), then drops the retired tables.
/// Committed with each batch, so a killed daemon resumes where it was.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RebuildState {
    /// `job`, `project`, `stages`, `retired`.
    pub phase: String,
    /// The last (tenant, id) done in the current document phase.
    pub after: Option<(String, String)>,
    /// The last `document_history` rowid done in the stages phase.
    pub history_after: i64,
    /// Rows done so far (all phases).
    pub done: u64,
    /// Rows to do: documents plus history revisions, when counted (by the
    /// daemon on a reader connection, never inside the writer's batch: a
    /// count of millions of rows would hold every webhook's commit).
    pub total: Option<u64>,
    pub started_at: String,
}

fn begin_rebuild(conn: &Connection, spec: &ReportSpec, hash: &str) -> Result<(), StoreError> {
    let stage_hash = stage_rule_hash(spec);
    let stages_kept = conn
        .query_row(
            "SELECT value FROM daemon_state WHERE key = ?1",
            [STAGE_HASH_KEY],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .is_some_and(|h| h == stage_hash)
        && table_exists(conn, "document_stages")?;
    let stamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let retire = |table: &str| -> Result<(), StoreError> {
        if table_exists(conn, table)? {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} RENAME TO {RETIRED}{table}_{stamp}"
            ))?;
        }
        Ok(())
    };
    for ty in DocType::ALL {
        retire(&values_table(ty))?;
    }
    if !stages_kept {
        retire("document_stages")?;
    }
    for sql in table_sql(spec) {
        if stages_kept && sql.starts_with("CREATE TABLE document_stages") {
            continue;
        }
        conn.execute_batch(&sql)?;
    }
    let state = RebuildState {
        phase: "job".into(),
        started_at: crate::model::fmt_ts(chrono::Utc::now()),
        ..RebuildState::default()
    };
    let state = serde_json::to_string(&state).map_err(|e| StoreError::Other(e.to_string()))?;
    conn.execute(
        "INSERT INTO daemon_state (key, value) VALUES (?1, ?2), (?3, ?4), (?5, ?6)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![
            HASH_KEY,
            hash,
            STAGE_HASH_KEY,
            stage_hash,
            REBUILD_KEY,
            state
        ],
    )?;
    // A small database is filled at once, in this transaction: the views
    // are never seen half-built, for a cost well under the start-up bound.
    if rows_at_most(conn, SYNC_REBUILD_ROWS)? {
        while rebuild_step(conn, spec, SYNC_REBUILD_ROWS as usize, None)?.is_some() {}
    }
    Ok(())
}

/// Up to this many rows (documents, history revisions and retired report
/// rows together) a rebuild runs at once rather than in the background:
/// about 0.1 s of the writer's time.
const SYNC_REBUILD_ROWS: i64 = 5_000;

/// Whether the documents, their history and the retired report tables hold
/// at most `limit` rows together (reading at most `limit + 1` of each).
fn rows_at_most(conn: &Connection, limit: i64) -> Result<bool, StoreError> {
    let mut tables: Vec<String> = vec!["jobs".into(), "projects".into(), "document_history".into()];
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'retired\\_%' ESCAPE '\\'",
    )?;
    let retired = stmt.query_map([], |r| r.get::<_, String>(0))?;
    for t in retired {
        tables.push(t?);
    }
    let mut total = 0i64;
    for t in tables {
        total += conn.query_row(
            &format!("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT ?1)"),
            [limit + 1],
            |r| r.get::<_, i64>(0),
        )?;
        if total > limit {
            return Ok(false);
        }
    }
    Ok(true)
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Documents plus history revisions: what a rebuild reads (on a reader).
pub(super) fn rebuild_rows(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM projects)
              + (SELECT count(*) FROM document_history WHERE doc_type IN ('job', 'project'))",
        [],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

/// The rebuild in progress, if any (any connection, read-only too).
pub(super) fn rebuild_state(conn: &Connection) -> Result<Option<RebuildState>, StoreError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM daemon_state WHERE key = ?1",
            [REBUILD_KEY],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

/// One batch of the rebuild in progress, inside the caller's write: at most
/// `batch` rows. Returns the state after it, or `None` when no rebuild is
/// in progress (or it just finished).
pub(super) fn rebuild_step(
    conn: &Connection,
    spec: &ReportSpec,
    batch: usize,
    total: Option<u64>,
) -> Result<Option<RebuildState>, StoreError> {
    let Some(mut st) = rebuild_state(conn)? else {
        return Ok(None);
    };
    if st.total.is_none() {
        st.total = total;
    }
    let limit = batch.max(1) as i64;
    match st.phase.as_str() {
        "job" | "project" => {
            let ty = if st.phase == "job" {
                DocType::Job
            } else {
                DocType::Project
            };
            let (t0, i0) = st.after.clone().unwrap_or_default();
            let mut read = conn.prepare_cached(&format!(
                "SELECT tenant, id, document FROM {} WHERE (tenant, id) > (?1, ?2)
                 ORDER BY tenant, id LIMIT ?3",
                ty.table()
            ))?;
            let mut rows = read.query(params![t0, i0, limit])?;
            let mut n = 0;
            while let Some(r) = rows.next()? {
                let key = DocKey {
                    tenant: r.get(0)?,
                    doc_type: ty,
                    id: r.get(1)?,
                };
                let doc: String = r.get(2)?;
                write_values(conn, spec, &key, &parse(&doc))?;
                st.after = Some((key.tenant, key.id));
                n += 1;
            }
            st.done += n;
            if n < limit as u64 {
                st.phase = if ty == DocType::Job {
                    "project"
                } else {
                    "stages"
                }
                .into();
                st.after = None;
            }
        }
        "stages" => {
            let mut read = conn.prepare_cached(
                "SELECT rowid, tenant, doc_type, id, revision, document, fetched_at FROM document_history
                 WHERE rowid > ?1 AND doc_type IN ('job', 'project') ORDER BY rowid LIMIT ?2",
            )?;
            let mut rows = read.query(params![st.history_after, limit])?;
            let mut n = 0;
            while let Some(r) = rows.next()? {
                st.history_after = r.get(0)?;
                let doc: String = r.get(5)?;
                // OR IGNORE: a revision stored since the rebuild began has
                // its row already, written with the same rule.
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO document_stages (tenant, doc_type, id, revision, stage, fetched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    spec.stage(&parse(&doc)),
                    r.get::<_, String>(6)?
                ])?;
                n += 1;
            }
            st.done += n;
            if n < limit as u64 {
                st.phase = "retired".into();
            }
        }
        _ => {
            let retired: Option<String> = conn
                .query_row(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'retired\\_%' ESCAPE '\\'
                     ORDER BY name LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            match retired {
                Some(t) => {
                    let gone = conn.execute(
                        &format!("DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} LIMIT ?1)"),
                        [limit],
                    )?;
                    if gone == 0 {
                        conn.execute_batch(&format!("DROP TABLE {t}"))?;
                    }
                }
                None => {
                    conn.execute("DELETE FROM daemon_state WHERE key = ?1", [REBUILD_KEY])?;
                    let pruned: i64 = conn.query_row(
                        "SELECT (SELECT coalesce(sum(revision), 0) FROM jobs) + (SELECT coalesce(sum(revision), 0) FROM projects)
                              - (SELECT count(*) FROM document_stages)",
                        [],
                        |r| r.get(0),
                    )?;
                    if pruned > 0 {
                        tracing::warn!(
                            pruned_revisions = pruned,
                            "report rebuild: revisions that retention already pruned from document_history have no stage row in job_stages / project_stages"
                        );
                    }
                    tracing::info!(
                        rows = st.done,
                        started_at = %st.started_at,
                        "report rebuild finished: the report tables are complete"
                    );
                    return Ok(None);
                }
            }
        }
    }
    let text = serde_json::to_string(&st).map_err(|e| StoreError::Other(e.to_string()))?;
    conn.execute(
        "UPDATE daemon_state SET value = ?2 WHERE key = ?1",
        params![REBUILD_KEY, text],
    )?;
    Ok(Some(st))
}

/// The hash of what decides `document_stages`' content.
fn stage_rule_hash(spec: &ReportSpec) -> String {
    let text = format!("v1\n{:?}\n", spec.stage_field);
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn parse(doc: &str) -> Map<String, Value> {
    match serde_json::from_str(doc) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn write_values(
    conn: &Connection,
    spec: &ReportSpec,
    key: &DocKey,
    doc: &Map<String, Value>,
) -> Result<(), StoreError> {
    let ty = key.doc_type;
    let names: Vec<String> = spec
        .stored_columns(ty)
        .map(|(c, _)| quote_ident(&c.name))
        .collect();
    let marks: String = (0..names.len()).map(|i| format!(", ?{}", i + 3)).collect();
    let sql = format!(
        "INSERT OR REPLACE INTO {} (tenant, id{}) VALUES (?1, ?2{marks})",
        values_table(ty),
        names.iter().map(|n| format!(", {n}")).collect::<String>()
    );
    let values: Vec<rusqlite::types::Value> = spec
        .values(ty, doc)
        .into_iter()
        .map(|v| match v {
            Typed::Null => rusqlite::types::Value::Null,
            Typed::Text(s) => rusqlite::types::Value::Text(s),
            Typed::Integer(i) => rusqlite::types::Value::Integer(i),
            Typed::Real(f) => rusqlite::types::Value::Real(f),
        })
        .collect();
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut params: Vec<&dyn rusqlite::ToSql> = vec![&key.tenant, &key.id];
    params.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
    stmt.execute(params.as_slice())?;
    Ok(())
}

/// One stored revision of a document, as the report tables record it.
pub(crate) struct Revision<'a> {
    pub key: &'a DocKey,
    pub revision: i64,
    pub document: &'a str,
    pub fetched_at: &'a str,
}

/// Records a stored revision's report values and stage (inside the write
/// that stored it, so the views never lag the mirror).
pub(super) fn record(conn: &Connection, spec: &ReportSpec, r: &Revision) -> Result<(), StoreError> {
    let doc = parse(r.document);
    write_values(conn, spec, r.key, &doc)?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO document_stages (tenant, doc_type, id, revision, stage, fetched_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        r.key.tenant,
        r.key.doc_type.as_str(),
        r.key.id,
        r.revision,
        spec.stage(&doc),
        r.fetched_at
    ])?;
    Ok(())
}

/// Calls `f` with every live document of a type (for `skillsync columns`),
/// on a read-only connection.
pub(super) fn for_each_live_document(
    conn: &Connection,
    ty: DocType,
    mut f: impl FnMut(&Map<String, Value>),
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT document FROM {} WHERE deleted_at IS NULL",
        ty.table()
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let doc: String = r.get(0)?;
        f(&parse(&doc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_avoid_what_duckdb_cannot_read() {
        for (name, sql) in view_sql(&ReportSpec::default()) {
            let lower = sql.to_lowercase();
            for bad in ["filter (", "json_", "strftime", "julianday", "->>"] {
                assert!(!lower.contains(bad), "{name} uses {bad}");
            }
            assert!(sql.starts_with(&format!("CREATE VIEW {name} AS")));
        }
    }
}
