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
use crate::reporting::{ReportSpec, Typed, quote_ident};

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
        let cols = spec.view_select_list(ty);
        let name = format!("{ty}_report");
        out.push((
            name.clone(),
            format!(
                "CREATE VIEW {name} AS\nSELECT d.tenant AS tenant, d.id AS id,\n       {}\nFROM {} AS d\nLEFT JOIN {} AS v ON v.tenant = d.tenant AND v.id = d.id\nWHERE d.deleted_at IS NULL",
                cols.join(",\n       "),
                ty.table(),
                values_table(ty)
            ),
        ));
        let name = format!("{ty}_stages");
        out.push((
            name.clone(),
            format!(
                "CREATE VIEW {name} AS
WITH revisions AS (
    SELECT s.tenant, s.id, s.revision, s.stage, s.fetched_at,
           lag(s.stage) OVER (PARTITION BY s.tenant, s.id ORDER BY s.revision) AS previous_stage,
           row_number() OVER (PARTITION BY s.tenant, s.id ORDER BY s.revision) AS n
    FROM document_stages AS s
    WHERE s.doc_type = '{ty}'
),
entered AS (
    -- a revision starts a stay when its stage differs from the one before (NULLs equal)
    SELECT tenant, id, revision, stage, fetched_at AS entered_at
    FROM revisions
    WHERE n = 1
       OR (CASE WHEN stage IS NULL AND previous_stage IS NULL THEN 0
                WHEN stage IS NULL OR previous_stage IS NULL THEN 1
                WHEN stage <> previous_stage THEN 1
                ELSE 0 END) = 1
),
stays AS (
    SELECT tenant, id, stage, entered_at,
           lead(entered_at) OVER (PARTITION BY tenant, id ORDER BY revision) AS next_entered_at
    FROM entered
)
SELECT t.tenant AS tenant, t.id AS id, d.number AS number, t.stage AS stage,
       t.entered_at AS entered_at,
       -- the next stay's start; for the current stay, when the document was deleted upstream (else NULL)
       CASE WHEN t.next_entered_at IS NULL THEN d.deleted_at ELSE t.next_entered_at END AS left_at
FROM stays AS t
JOIN {} AS d ON d.tenant = t.tenant AND d.id = t.id",
                ty.table()
            ),
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
pub(crate) fn ensure(
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
    let hash = values_hash(spec);
    let views = view_sql(spec);
    let up_to_date = |c: &Connection| -> Result<bool, StoreError> {
        if stored_hash(c)?.as_deref() != Some(hash.as_str()) {
            return Ok(false);
        }
        for (name, sql) in &views {
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
    };
    if up_to_date(conn)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = up_to_date(conn).and_then(|fresh| {
        if fresh {
            return Ok(());
        }
        let started = std::time::Instant::now();
        for v in VIEWS {
            conn.execute_batch(&format!("DROP VIEW IF EXISTS {v}"))?;
        }
        let rebuilt = if stored_hash(conn)?.as_deref() != Some(hash.as_str()) {
            Some(rebuild(conn, spec, &hash)?)
        } else {
            None
        };
        for (_, sql) in &views {
            conn.execute_batch(sql)?;
        }
        match rebuilt {
            Some(n) => tracing::info!(
                documents = n,
                ms = started.elapsed().as_millis() as u64,
                "report columns rebuilt for the [reporting] config; views recreated"
            ),
            None => tracing::info!("report views recreated"),
        }
        Ok(())
    });
    match result {
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
    let has_state: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'daemon_state'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
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
        let stages_table = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'document_stages'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let stages = !(stages_table && stage_hash.as_deref() == Some(&*stage_rule_hash(spec)));
        return Ok(ReportWork::Rebuild { why, stages });
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

/// Recreates the derived tables and fills them from the stored documents;
/// returns how many documents and revisions it read.
fn rebuild(conn: &Connection, spec: &ReportSpec, hash: &str) -> Result<u64, StoreError> {
    for ty in DocType::ALL {
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", values_table(ty)))?;
    }
    let stage_hash = stage_rule_hash(spec);
    let stages_kept = conn
        .query_row(
            "SELECT value FROM daemon_state WHERE key = ?1",
            [STAGE_HASH_KEY],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .is_some_and(|h| h == stage_hash)
        && conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'document_stages'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
    if !stages_kept {
        conn.execute_batch("DROP TABLE IF EXISTS document_stages")?;
    }
    for sql in table_sql(spec) {
        if stages_kept && sql.starts_with("CREATE TABLE document_stages") {
            continue;
        }
        conn.execute_batch(&sql)?;
    }
    let mut n = 0u64;
    for ty in DocType::ALL {
        let mut read = conn.prepare(&format!("SELECT tenant, id, document FROM {}", ty.table()))?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let key = DocKey {
                tenant: r.get(0)?,
                doc_type: ty,
                id: r.get(1)?,
            };
            let doc: String = r.get(2)?;
            write_values(conn, spec, &key, &parse(&doc))?;
            n += 1;
        }
    }
    if stages_kept {
        // Same stage rule: the rows stay, including those of revisions
        // whose history retention has pruned; the new revisions of any
        // document that reached the mirror without them are added.
        conn.execute(
            "INSERT INTO daemon_state (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![HASH_KEY, hash],
        )?;
        return fill_missing_stages(conn, spec).map(|m| n + m);
    }
    let pruned: i64 = conn.query_row(
        "SELECT (SELECT coalesce(sum(revision), 0) FROM jobs) + (SELECT coalesce(sum(revision), 0) FROM projects)
              - (SELECT count(*) FROM document_history WHERE doc_type IN ('job', 'project'))",
        [],
        |r| r.get(0),
    )?;
    if pruned > 0 {
        tracing::warn!(
            pruned_revisions = pruned,
            "the stage rule changed: stage history is recomputed from document_history; revisions that retention already pruned cannot be recomputed and drop out of job_stages / project_stages"
        );
    }
    // The table is empty now: every history revision is missing from it.
    n += fill_missing_stages(conn, spec)?;
    conn.execute(
        "INSERT INTO daemon_state (key, value) VALUES (?1, ?2), (?3, ?4)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![HASH_KEY, hash, STAGE_HASH_KEY, stage_hash],
    )?;
    Ok(n)
}

/// The hash of what decides `document_stages`' content.
fn stage_rule_hash(spec: &ReportSpec) -> String {
    let text = format!("v1\n{:?}\n", spec.stage_field);
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the stage of every history revision `document_stages` lacks (those
/// a follower stored without report values); returns how many.
fn fill_missing_stages(conn: &Connection, spec: &ReportSpec) -> Result<u64, StoreError> {
    let mut read = conn.prepare(
        "SELECT h.tenant, h.doc_type, h.id, h.revision, h.document, h.fetched_at FROM document_history h
         WHERE h.doc_type IN ('job', 'project') AND NOT EXISTS (
             SELECT 1 FROM document_stages s
             WHERE s.doc_type = h.doc_type AND s.tenant = h.tenant AND s.id = h.id AND s.revision = h.revision)",
    )?;
    let mut rows = read.query([])?;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        let doc: String = r.get(4)?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO document_stages (tenant, doc_type, id, revision, stage, fetched_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            spec.stage(&parse(&doc)),
            r.get::<_, String>(5)?
        ])?;
        n += 1;
    }
    Ok(n)
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
pub(crate) fn record(conn: &Connection, spec: &ReportSpec, r: &Revision) -> Result<(), StoreError> {
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
pub fn for_each_live_document(
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
