//! What opening a database with this binary would change, read without
//! changing anything (`skillsync migrate --dry-run`): the schema migrations
//! the file has not had, what the report tables need (see [`report::plan`]),
//! and the row counts the run time of each grows with. It opens the file
//! read-only and never writes, so it is safe beside a running `serve` of any
//! version. Turning counts into seconds is the caller's (`crate::migrate`).

use std::path::Path;

use rusqlite::OptionalExtension;

use super::report::{self, ReportWork};
use super::{MIGRATIONS, Migration, StoreError};
use crate::reporting::ReportSpec;

/// What the next start of `serve` (or `skillsync migrate`) does to a database.
#[derive(Debug, Clone)]
pub struct UpgradePlan {
    /// The database's schema version now; 0 for a file that has no schema yet.
    pub version: i64,
    /// The migrations still to run, in order.
    pub migrations: Vec<PlannedMigration>,
    /// What the report tables and views need.
    pub report: ReportWork,
    /// The rows the work reads.
    pub rows: Rows,
    /// When a `serve` last wrote its health probe here (every 5 s while it runs).
    pub last_probe: Option<String>,
    /// Whether a PostgreSQL sink has ever run against this database (a
    /// `pg_sink` row): without one, switching `[postgres]` on starts with a
    /// backfill of every document.
    pub pg_sink: bool,
}

impl UpgradePlan {
    /// Whether opening the database changes nothing.
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty() && self.report == ReportWork::UpToDate
    }
}

/// One migration still to run.
#[derive(Debug, Clone)]
pub struct PlannedMigration {
    pub version: i64,
    /// Its file name without `.sql` (`schema`, `002_deferred_queue`, …).
    pub name: &'static str,
    /// The first sentence of its header comment.
    pub summary: String,
    /// Each table one of its statements reads whole (an index build, an
    /// `UPDATE`, an `INSERT … SELECT`), with that table's rows now; empty
    /// when its run time does not grow with the data.
    pub scans: Vec<(String, u64)>,
}

/// Row counts of the tables the upgrade work reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rows {
    pub events: u64,
    pub jobs: u64,
    pub projects: u64,
    /// `document_history` rows of jobs and projects.
    pub history: u64,
    /// `document_stages` rows (0 before the report tables exist).
    pub stages: u64,
}

/// Reads `path` read-only and says what opening it with this binary and the
/// `[reporting]` rules `spec` would run. Refuses, like `serve` would, a
/// schema newer than this binary's ([`StoreError::TooNew`]) and a file that
/// holds tables but no skillsync schema.
pub fn plan(path: &Path, spec: &ReportSpec) -> Result<UpgradePlan, StoreError> {
    let (conn, version) = super::open_read_only_versioned(path)?;
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    if version == 0 && tables > 0 {
        return Err(StoreError::Other(format!(
            "{} is not a skillsync database (tables but no schema version)",
            path.display()
        )));
    }
    let count = |table: &str, filter: &str| -> Result<u64, StoreError> {
        let exists = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            return Ok(0);
        }
        let n: i64 =
            conn.query_row(&format!("SELECT count(*) FROM {table} {filter}"), [], |r| {
                r.get(0)
            })?;
        Ok(n.max(0) as u64)
    };
    let rows = Rows {
        events: count("events", "")?,
        jobs: count("jobs", "")?,
        projects: count("projects", "")?,
        history: count("document_history", "WHERE doc_type IN ('job', 'project')")?,
        stages: count("document_stages", "")?,
    };
    let mut migrations = Vec::new();
    for m in MIGRATIONS.iter().skip(version.max(0) as usize) {
        let scans = scanned_tables(m.sql)
            .into_iter()
            .map(|t| {
                let n = count(&t, "")?;
                Ok((t, n))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        migrations.push(PlannedMigration {
            version: m.version,
            name: m.name,
            summary: summary(m),
            scans,
        });
    }
    let report = report::plan(&conn, spec)?;
    let last_probe = if tables > 0 {
        conn.query_row(
            "SELECT value FROM daemon_state WHERE key = 'healthz'",
            [],
            |r| r.get(0),
        )
        .optional()?
    } else {
        None
    };
    let pg_sink = count("pg_sink", "")? > 0;
    Ok(UpgradePlan {
        version,
        migrations,
        report,
        rows,
        last_probe,
        pg_sink,
    })
}

/// The first sentence of a migration's header comment, after its
/// "skillsync schema, version N…:" preamble.
fn summary(m: &Migration) -> String {
    if m.version == 1 {
        return "the initial schema (a new database)".into();
    }
    let header: Vec<&str> = m
        .sql
        .lines()
        .map_while(|l| l.strip_prefix("--"))
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let text = header.join(" ");
    let text = text.split_once("): ").or_else(|| text.split_once(": "));
    let text = text.map_or("", |(_, rest)| rest);
    let sentence = text.split_once(". ").map_or(text, |(s, _)| s);
    sentence.trim_end_matches('.').to_string()
}

/// The tables a migration's statements read whole, so its run time grows
/// with their rows: the table of each `CREATE [UNIQUE] INDEX … ON t`, of each
/// `UPDATE t` and each `INSERT … SELECT … FROM t`. `ALTER TABLE … ADD
/// COLUMN`, new tables, views and triggers cost the same on any database.
/// Statements inside a trigger's body run later, not now: skipped.
pub(super) fn scanned_tables(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out: Vec<String> = Vec::new();
    let mut in_trigger = false;
    for stmt in code.split(';') {
        let words: Vec<String> = stmt
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_uppercase)
            .collect();
        let Some(first) = words.first() else {
            continue;
        };
        if in_trigger {
            if first == "END" {
                in_trigger = false;
            }
            continue;
        }
        let after = |word: &str| -> Option<String> {
            let i = words.iter().position(|w| w == word)?;
            words.get(i + 1).map(|w| w.to_ascii_lowercase())
        };
        let table = match first.as_str() {
            "CREATE" if words.iter().any(|w| w == "TRIGGER") => {
                in_trigger = !words.iter().any(|w| w == "END");
                None
            }
            "CREATE" if words.iter().take(3).any(|w| w == "INDEX") => after("ON"),
            "UPDATE" => words.get(1).map(|w| w.to_ascii_lowercase()),
            "INSERT" if words.iter().any(|w| w == "SELECT") => after("FROM"),
            _ => None,
        };
        if let Some(t) = table {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_are_index_builds_updates_and_copies() {
        let sql = "-- a comment mentioning CREATE INDEX x ON nothing
ALTER TABLE events ADD COLUMN queued INTEGER NOT NULL DEFAULT 1;
DROP INDEX events_by_document;
CREATE INDEX events_by_document ON events (tenant, doc_type) WHERE queued = 1;
CREATE UNIQUE INDEX IF NOT EXISTS j ON jobs(tenant, id);
CREATE TABLE t (a INTEGER);
CREATE TRIGGER tr AFTER UPDATE ON projects BEGIN
    UPDATE sync_runs SET listed = 0;
    INSERT INTO t SELECT 1 FROM fetch_queue;
END;
UPDATE document_history SET revision = revision;
INSERT INTO t (a) SELECT id FROM sync_state;
INSERT INTO t (a) VALUES (1);";
        assert_eq!(
            scanned_tables(sql),
            ["events", "jobs", "document_history", "sync_state"]
        );
    }

    #[test]
    fn every_migration_has_a_summary() {
        for m in MIGRATIONS {
            let s = summary(m);
            assert!(s.len() > 10, "{}: {s:?}", m.name);
            assert!(!s.contains("version"), "{}: {s:?}", m.name);
        }
        assert_eq!(summary(&MIGRATIONS[1]), "the webhook inbox only appends");
    }

    #[test]
    fn the_shipped_migrations_scan_what_they_index() {
        // Version 1 builds its indexes on tables it has just created: empty.
        let scans: Vec<(i64, Vec<String>)> = MIGRATIONS
            .iter()
            .skip(1)
            .map(|m| (m.version, scanned_tables(m.sql)))
            .collect();
        assert_eq!(
            scans,
            [
                (2, vec!["events".to_string()]),
                (3, vec![]),
                (4, vec![]),
                (5, vec!["events".to_string()]),
                (6, vec![]),
                (7, vec!["fetch_queue".to_string()]),
                // The index of the table it creates: empty when it runs.
                (8, vec!["audits".to_string()]),
            ]
        );
    }
}
