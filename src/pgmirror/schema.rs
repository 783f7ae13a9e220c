//! The PostgreSQL side's tables and views, created and versioned by
//! skillsync in one schema (`postgres.schema`, default `skillsync`).
//!
//! Fixed tables (version [`SCHEMA_VERSION`], in `meta`; version 2 added
//! `sink_cursor.tip`): `jobs`, `projects`
//! (`document jsonb`, `id uuid`, times `timestamptz`, numbers `bigint`,
//! plus `source_seq`, the outbox seq a row was copied at, and `synced_at`),
//! `document_history`, `sync_runs`, `source_queue` (what only SQLite knows:
//! events and fetches waiting) and `sink_cursor` (which SQLite database
//! feeds this schema and how far). The report objects follow `[reporting]`
//! like SQLite's: `job_report_values`, `project_report_values`,
//! `document_stages` (values computed in Rust by [`crate::reporting`], so
//! both databases agree), and the views `job_report`, `project_report`,
//! `job_stages`, `project_stages`, `sync_status` with SQLite's columns.
//! When their shape changes they are rebuilt and the sink copies everything
//! again; the hash of their shape (`meta.report_hash`) is recorded only in
//! the transaction that ends that copy ([`record_report_hash`]), so a copy
//! cut short leaves no hash and the next start rebuilds and copies again
//! instead of following the outbox over half-filled report tables.
//! All DDL runs under an advisory lock, so two processes do not race.

use postgres::Transaction;

use crate::model::DocType;
use crate::reporting::{
    ColumnType, ReportSpec, SqlDialect, quote_ident, report_view_sql, stages_view_sql,
};

/// The version of the fixed tables this binary writes.
pub const SCHEMA_VERSION: i64 = 2;

/// The fixed tables (version 2; every statement may run again).
fn fixed_sql(s: &str) -> String {
    let mut out = format!(
        "CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.sink_cursor (
    id          int PRIMARY KEY CHECK (id = 1),
    source_db   text NOT NULL,   -- the SQLite database (daemon_state.database_id) that feeds this schema
    seq         bigint,          -- its outbox is copied up to here; NULL while a backfill runs
    updated_at  timestamptz NOT NULL
);
-- version 2: the fingerprint of SQLite's outbox change at `seq` (its lineage check)
ALTER TABLE {s}.sink_cursor ADD COLUMN IF NOT EXISTS tip text;
CREATE TABLE IF NOT EXISTS {s}.document_history (
    tenant     text NOT NULL,
    doc_type   text NOT NULL,
    id         uuid NOT NULL,
    revision   bigint NOT NULL,
    document   jsonb NOT NULL,
    fetched_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, doc_type, id, revision)
);
CREATE INDEX IF NOT EXISTS document_history_by_time ON {s}.document_history (fetched_at);
CREATE TABLE IF NOT EXISTS {s}.sync_runs (
    id             bigint PRIMARY KEY,
    tenant         text NOT NULL,
    doc_type       text NOT NULL,
    kind           text NOT NULL,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz,
    status         text NOT NULL,
    listed         bigint NOT NULL,
    enqueued       bigint NOT NULL,
    marked_deleted bigint NOT NULL,
    missed         bigint NOT NULL,
    candidates     bigint NOT NULL,
    error          text
);
CREATE TABLE IF NOT EXISTS {s}.source_queue (
    tenant            text NOT NULL,
    doc_type          text NOT NULL,
    pending_events    bigint NOT NULL,
    queued_fetches    bigint NOT NULL,
    retrying_fetches  bigint NOT NULL,
    dead_events       bigint NOT NULL,
    dead_documents    bigint NOT NULL,
    oldest_pending_at timestamptz,
    -- SQLite's complete_as_of, or earlier while changes wait for this copy
    complete_as_of    timestamptz,
    PRIMARY KEY (tenant, doc_type)
);
"
    );
    for ty in DocType::ALL {
        let t = ty.table();
        out.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {s}.{t} (
    tenant        text NOT NULL,
    id            uuid NOT NULL,
    document      jsonb NOT NULL,
    number        text,
    name          text,
    modified_on   timestamptz,
    version       bigint,
    revision      bigint NOT NULL,
    first_seen_at timestamptz NOT NULL,
    fetched_at    timestamptz NOT NULL,
    deleted_at    timestamptz,
    source_seq    bigint NOT NULL,      -- the SQLite outbox seq this row was copied at (never goes back)
    synced_at     timestamptz NOT NULL, -- when this copy was written
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS {t}_by_modified ON {s}.{t} (tenant, modified_on);
"
        ));
    }
    out
}

/// The PostgreSQL type of a report column.
pub fn pg_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "text",
        ColumnType::Integer => "bigint",
        ColumnType::Real => "double precision",
        ColumnType::Timestamp => "timestamptz",
    }
}

/// The report objects' DDL (tables first, then views), for `spec`.
fn report_sql(s: &str, spec: &ReportSpec) -> String {
    let mut out = String::new();
    for ty in DocType::ALL {
        let cols: String = spec
            .stored_columns(ty)
            .map(|(c, _)| format!(",\n    {} {}", quote_ident(&c.name), pg_type(c.ty)))
            .collect();
        out.push_str(&format!(
            "CREATE TABLE {s}.{ty}_report_values (\n    tenant text NOT NULL,\n    id uuid NOT NULL{cols},\n    PRIMARY KEY (tenant, id)\n);\n"
        ));
    }
    out.push_str(&format!(
        "CREATE TABLE {s}.document_stages (
    tenant     text NOT NULL,
    doc_type   text NOT NULL,
    id         uuid NOT NULL,
    revision   bigint NOT NULL,
    stage      text,
    fetched_at timestamptz NOT NULL,
    PRIMARY KEY (doc_type, tenant, id, revision)
);
"
    ));
    for ty in DocType::ALL {
        let prefix = format!("{s}.");
        out.push_str(&report_view_sql(spec, SqlDialect::Postgres, ty, &prefix));
        out.push_str(&stages_view_sql(SqlDialect::Postgres, ty, &prefix));
    }
    out.push_str(&format!(
        "CREATE VIEW {s}.sync_status AS
WITH kinds AS (
    SELECT DISTINCT tenant, doc_type FROM (
        SELECT tenant, 'job' AS doc_type FROM {s}.jobs
        UNION ALL SELECT tenant, 'project' FROM {s}.projects
        UNION ALL SELECT tenant, doc_type FROM {s}.sync_runs
        UNION ALL SELECT tenant, doc_type FROM {s}.source_queue
    ) AS k
),
mirror AS (
    SELECT tenant, doc_type,
           count(*) FILTER (WHERE deleted_at IS NULL) AS mirrored,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM (
        SELECT tenant, 'job' AS doc_type, deleted_at FROM {s}.jobs
        UNION ALL SELECT tenant, 'project', deleted_at FROM {s}.projects
    ) AS m
    GROUP BY tenant, doc_type
),
last_ok AS (
    SELECT tenant, doc_type, max(started_at) AS last_ok_started_at, max(finished_at) AS last_ok_finished_at
    FROM {s}.sync_runs WHERE status = 'ok' GROUP BY tenant, doc_type
),
last_run AS (
    SELECT DISTINCT ON (tenant, doc_type) tenant, doc_type, kind, status, finished_at, missed, error
    FROM {s}.sync_runs ORDER BY tenant, doc_type, id DESC
)
SELECT k.tenant, k.doc_type,
       coalesce(m.mirrored, 0) AS mirrored,
       coalesce(m.deleted, 0) AS deleted,
       coalesce(q.pending_events, 0) AS pending_events,
       coalesce(q.queued_fetches, 0) AS queued_fetches,
       coalesce(q.retrying_fetches, 0) AS retrying_fetches,
       coalesce(q.dead_events, 0) AS dead_events,
       coalesce(q.dead_documents, 0) AS dead_documents,
       q.oldest_pending_at,
       lo.last_ok_started_at,
       lo.last_ok_finished_at,
       lr.kind AS last_run_kind,
       lr.status AS last_run_status,
       lr.finished_at AS last_run_finished_at,
       lr.missed AS last_run_missed,
       lr.error AS last_run_error,
       -- every change made upstream before this time is in this copy
       q.complete_as_of,
       (SELECT updated_at FROM {s}.sink_cursor WHERE id = 1) AS copied_at
FROM kinds k
LEFT JOIN mirror m ON m.tenant = k.tenant AND m.doc_type = k.doc_type
LEFT JOIN {s}.source_queue q ON q.tenant = k.tenant AND q.doc_type = k.doc_type
LEFT JOIN last_ok lo ON lo.tenant = k.tenant AND lo.doc_type = k.doc_type
LEFT JOIN last_run lr ON lr.tenant = k.tenant AND lr.doc_type = k.doc_type;
"
    ));
    out
}

/// The objects [`report_sql`] creates, dropped before a rebuild.
fn drop_report_sql(s: &str) -> String {
    format!(
        "DROP VIEW IF EXISTS {s}.sync_status, {s}.job_report, {s}.project_report, {s}.job_stages, {s}.project_stages;
DROP TABLE IF EXISTS {s}.job_report_values, {s}.project_report_values, {s}.document_stages;
"
    )
}

/// A hash of everything that decides the report objects.
fn report_hash(s: &str, spec: &ReportSpec) -> String {
    let text = format!("v1\n{spec:?}\n{}", report_sql(s, spec));
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`ensure`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    /// Everything was in place.
    UpToDate,
    /// Report objects were (re)created: every document must be copied again.
    Rebuilt,
}

/// Creates or upgrades the schema in one transaction; refuses a schema
/// written by a newer skillsync.
pub fn ensure(
    tx: &mut Transaction<'_>,
    schema: &str,
    spec: &ReportSpec,
) -> Result<Ensured, String> {
    let s = quote_ident(schema);
    let e = |e: postgres::Error| super::describe(&e);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("skillsync:{schema}")],
    )
    .map_err(e)?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
        .map_err(e)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)"
    ))
    .map_err(e)?;
    let version: Option<String> = tx
        .query_opt(
            &format!("SELECT value FROM {s}.meta WHERE key = 'schema_version'"),
            &[],
        )
        .map_err(e)?
        .map(|r| r.get(0));
    let version: i64 = version.and_then(|v| v.parse().ok()).unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(format!(
            "PostgreSQL schema {schema} has version {version}, newer than this skillsync understands ({SCHEMA_VERSION}); upgrade skillsync"
        ));
    }
    if version < SCHEMA_VERSION {
        tx.batch_execute(&fixed_sql(&s)).map_err(e)?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            &[&SCHEMA_VERSION.to_string()],
        )
        .map_err(e)?;
    }
    let hash = report_hash(&s, spec);
    let have: Option<String> = tx
        .query_opt(
            &format!("SELECT value FROM {s}.meta WHERE key = 'report_hash'"),
            &[],
        )
        .map_err(e)?
        .map(|r| r.get(0));
    if have.as_deref() == Some(hash.as_str()) {
        return Ok(Ensured::UpToDate);
    }
    // The hash is not recorded here but by the copy that fills these tables
    // (record_report_hash): until then every start rebuilds and copies again.
    tx.batch_execute(&drop_report_sql(&s)).map_err(e)?;
    tx.batch_execute(&report_sql(&s, spec)).map_err(e)?;
    tx.execute(
        &format!("DELETE FROM {s}.meta WHERE key = 'report_hash'"),
        &[],
    )
    .map_err(e)?;
    Ok(Ensured::Rebuilt)
}

/// Records that the report objects for `spec` are built and filled: called
/// in the transaction that ends a whole copy.
pub fn record_report_hash(
    tx: &mut Transaction<'_>,
    schema: &str,
    spec: &ReportSpec,
) -> Result<(), postgres::Error> {
    let s = quote_ident(schema);
    tx.execute(
        &format!(
            "INSERT INTO {s}.meta (key, value) VALUES ('report_hash', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ),
        &[&report_hash(&s, spec)],
    )?;
    Ok(())
}

/// The quoted schema name for SQL text.
pub fn quoted(schema: &str) -> String {
    quote_ident(schema)
}
