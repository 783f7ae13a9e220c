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
use crate::model::DocType;
use crate::reporting::{ReportSpec, Source, Typed};

/// `daemon_state` key holding the hash of the extraction rules the derived tables were built with.
const HASH_KEY: &str = "reporting_values_hash";

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

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The derived tables' DDL.
fn table_sql(spec: &ReportSpec) -> Vec<String> {
    let mut out = Vec::new();
    for ty in DocType::ALL {
        let cols: String = spec
            .stored_columns(ty)
            .map(|(c, _)| format!(",\n    {} {}", quote(&c.name), c.ty.sql_type()))
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
        let cols: Vec<String> = spec
            .columns(ty)
            .iter()
            .map(|c| match &c.source {
                Source::Table(col) => format!("d.{col} AS {}", quote(&c.name)),
                Source::Fields(_) => format!("v.{} AS {}", quote(&c.name), quote(&c.name)),
            })
            .collect();
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
/// Idempotent and safe when two processes start at once.
pub(crate) fn ensure(conn: &Connection, spec: &ReportSpec) -> Result<(), StoreError> {
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

/// Recreates the derived tables and fills them from the stored documents;
/// returns how many documents and revisions it read.
fn rebuild(conn: &Connection, spec: &ReportSpec, hash: &str) -> Result<u64, StoreError> {
    for ty in DocType::ALL {
        conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", values_table(ty)))?;
    }
    conn.execute_batch("DROP TABLE IF EXISTS document_stages")?;
    for sql in table_sql(spec) {
        conn.execute_batch(&sql)?;
    }
    let mut n = 0u64;
    for ty in DocType::ALL {
        let mut read = conn.prepare(&format!("SELECT tenant, id, document FROM {}", ty.table()))?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let (tenant, id, doc): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            write_values(conn, spec, ty, &tenant, &id, &parse(&doc))?;
            n += 1;
        }
    }
    let mut read = conn.prepare(
        "SELECT tenant, doc_type, id, revision, document, fetched_at FROM document_history",
    )?;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let doc_type: String = r.get(1)?;
        if DocType::parse(&doc_type).is_none() {
            continue;
        }
        let doc: String = r.get(4)?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO document_stages (tenant, doc_type, id, revision, stage, fetched_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            r.get::<_, String>(0)?,
            doc_type,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            spec.stage(&parse(&doc)),
            r.get::<_, String>(5)?
        ])?;
        n += 1;
    }
    conn.execute(
        "INSERT INTO daemon_state (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![HASH_KEY, hash],
    )?;
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
    ty: DocType,
    tenant: &str,
    id: &str,
    doc: &Map<String, Value>,
) -> Result<(), StoreError> {
    let names: Vec<String> = spec
        .stored_columns(ty)
        .map(|(c, _)| quote(&c.name))
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
    let mut params: Vec<&dyn rusqlite::ToSql> = vec![&tenant, &id];
    params.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
    stmt.execute(params.as_slice())?;
    Ok(())
}

/// One stored revision of a document, as the report tables record it.
pub(crate) struct Revision<'a> {
    pub tenant: &'a str,
    pub doc_type: DocType,
    pub id: &'a str,
    pub revision: i64,
    pub document: &'a str,
    pub fetched_at: &'a str,
}

/// Records a stored revision's report values and stage (inside the write
/// that stored it, so the views never lag the mirror).
pub(crate) fn record(conn: &Connection, spec: &ReportSpec, r: &Revision) -> Result<(), StoreError> {
    let doc = parse(r.document);
    write_values(conn, spec, r.doc_type, r.tenant, r.id, &doc)?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO document_stages (tenant, doc_type, id, revision, stage, fetched_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        r.tenant,
        r.doc_type.as_str(),
        r.id,
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
