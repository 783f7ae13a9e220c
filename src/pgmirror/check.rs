//! `skillsync postgres-check`: compares the PostgreSQL copy with SQLite row
//! by row — revision, `deleted_at` and a hash of the document (parsed and
//! re-serialised with sorted keys on both sides, because `jsonb` does not
//! keep the text as written) — and that every SQLite history row is in
//! PostgreSQL. The tests use the same [`compare`], so what they prove is
//! what the operator's command proves.
//!
//! Blocking: run it on a thread of its own (the CLI has no runtime here).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::Value;

use super::{PgError, PostgresConfig, schema};
use crate::model::DocType;
use crate::store::Store;
use crate::store::outbox;

/// What one side holds for one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub revision: i64,
    pub deleted_at: Option<String>,
    /// SHA-256 of the canonical JSON, hex.
    pub hash: String,
}

/// The key of a document: type, tenant, id.
pub type Key = (DocType, String, String);

/// The comparison's result.
#[derive(Debug, Default)]
pub struct Report {
    /// Documents in SQLite.
    pub sqlite_documents: usize,
    /// Documents in PostgreSQL.
    pub postgres_documents: usize,
    /// One line per difference.
    pub differences: Vec<String>,
    /// Outbox changes not yet acknowledged (differences may be in flight).
    pub in_flight: i64,
    /// The PostgreSQL cursor (outbox seq), if any.
    pub cursor: Option<i64>,
}

impl Report {
    pub fn equal(&self) -> bool {
        self.differences.is_empty()
    }
}

/// SHA-256 of a document parsed and written back with sorted keys.
pub fn canonical_hash(doc: &str) -> String {
    let text = match serde_json::from_str::<Value>(doc) {
        Ok(v) => v.to_string(),
        Err(_) => doc.to_string(),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads both sides and lists every difference.
pub fn compare(db: &Path, cfg: &PostgresConfig) -> Result<Report, PgError> {
    let sqlite = Store::open_read_only(db)?;
    let mut left: BTreeMap<Key, Fingerprint> = BTreeMap::new();
    for ty in DocType::ALL {
        let mut after: Option<(String, String)> = None;
        loop {
            let page = outbox::mirror_page(&sqlite, ty, after.as_ref(), 2000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.tenant.clone(), last.id.clone()));
            for d in page {
                left.insert(
                    (ty, d.tenant, d.id),
                    Fingerprint {
                        revision: d.revision,
                        deleted_at: d.deleted_at,
                        hash: canonical_hash(&d.document),
                    },
                );
            }
        }
    }
    let mut history: HashSet<(DocType, String, String, i64)> = HashSet::new();
    let mut after = 0;
    loop {
        let page = outbox::history_page(&sqlite, after, 5000)?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        history.extend(
            page.into_iter()
                .map(|(_, h)| (h.doc_type, h.tenant, h.id, h.revision)),
        );
    }
    let lag = outbox::lag(&sqlite)?;

    let mut client = cfg.connect()?;
    let s = schema::quoted(&cfg.schema);
    let pg = |e: postgres::Error| cfg.error(&e);
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{s}.sink_cursor")],
        )
        .map_err(pg)?
        .get(0);
    let mut report = Report {
        sqlite_documents: left.len(),
        in_flight: lag.map(|l| l.rows).unwrap_or(0),
        ..Report::default()
    };
    if !exists {
        report.differences.push(format!(
            "PostgreSQL has no skillsync schema `{}` yet (has `serve` run with [postgres]?)",
            cfg.schema
        ));
        return Ok(report);
    }
    report.cursor = client
        .query_opt(
            &format!("SELECT seq FROM {s}.sink_cursor WHERE id = 1"),
            &[],
        )
        .map_err(pg)?
        .and_then(|r| r.get(0));
    let mut right: BTreeMap<Key, Fingerprint> = BTreeMap::new();
    for ty in DocType::ALL {
        let rows = client
            .query(
                &format!(
                    "SELECT tenant, id::text, revision,
                            to_char(deleted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                            document::text
                     FROM {s}.{}",
                    ty.table()
                ),
                &[],
            )
            .map_err(pg)?;
        for r in rows {
            let doc: String = r.get(4);
            right.insert(
                (ty, r.get(0), r.get(1)),
                Fingerprint {
                    revision: r.get(2),
                    deleted_at: r.get(3),
                    hash: canonical_hash(&doc),
                },
            );
        }
    }
    report.postgres_documents = right.len();
    let pg_history: HashSet<(String, String, String, i64)> = client
        .query(
            &format!("SELECT doc_type, tenant, id::text, revision FROM {s}.document_history"),
            &[],
        )
        .map_err(pg)?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();

    for (key, l) in &left {
        let (ty, tenant, id) = key;
        match right.get(key) {
            None => report
                .differences
                .push(format!("{ty} {tenant} {id}: missing in PostgreSQL")),
            Some(r) if r != l => {
                let mut what = Vec::new();
                if r.revision != l.revision {
                    what.push(format!(
                        "revision sqlite={} postgres={}",
                        l.revision, r.revision
                    ));
                }
                if r.deleted_at != l.deleted_at {
                    what.push(format!(
                        "deleted_at sqlite={} postgres={}",
                        l.deleted_at.as_deref().unwrap_or("NULL"),
                        r.deleted_at.as_deref().unwrap_or("NULL")
                    ));
                }
                if r.hash != l.hash {
                    what.push("document differs".into());
                }
                report
                    .differences
                    .push(format!("{ty} {tenant} {id}: {}", what.join(", ")));
            }
            Some(_) => {}
        }
    }
    for (ty, tenant, id) in right.keys() {
        if !left.contains_key(&(*ty, tenant.clone(), id.clone())) {
            report.differences.push(format!(
                "{ty} {tenant} {id}: in PostgreSQL but not in SQLite"
            ));
        }
    }
    let mut missing_history = 0usize;
    for (ty, tenant, id, rev) in &history {
        if !pg_history.contains(&(ty.as_str().to_string(), tenant.clone(), id.clone(), *rev)) {
            missing_history += 1;
            if missing_history <= 20 {
                report.differences.push(format!(
                    "{ty} {tenant} {id}: history revision {rev} missing in PostgreSQL"
                ));
            }
        }
    }
    if missing_history > 20 {
        report.differences.push(format!(
            "... {} more history rows missing in PostgreSQL",
            missing_history - 20
        ));
    }
    Ok(report)
}

/// Prints the report the way `postgres-check` shows it; returns whether equal.
pub fn print(report: &Report, target: &str) -> bool {
    println!(
        "SQLite: {} documents; PostgreSQL ({target}): {} documents; cursor at outbox seq {}; {} change(s) not yet acknowledged",
        report.sqlite_documents,
        report.postgres_documents,
        report
            .cursor
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into()),
        report.in_flight
    );
    const SHOWN: usize = 50;
    for d in report.differences.iter().take(SHOWN) {
        println!("  {d}");
    }
    if report.differences.len() > SHOWN {
        println!("  ... and {} more", report.differences.len() - SHOWN);
    }
    if report.equal() {
        println!(
            "equal: every document (revision, deleted_at, content) and every history row is in PostgreSQL"
        );
        true
    } else {
        println!(
            "{} difference(s){}",
            report.differences.len(),
            if report.in_flight > 0 {
                " (changes are still in flight: run it again, or use --wait)"
            } else {
                ""
            }
        );
        false
    }
}

/// `skillsync postgres-check [--wait SECS]`: exit 0 equal, 1 different, 2 unreadable or not configured.
pub fn run_cli(config: &crate::config::Config, wait_secs: u64) -> std::process::ExitCode {
    use std::process::ExitCode;
    let Some(pg) = &config.postgres else {
        eprintln!("skillsync postgres-check: the config has no [postgres] section");
        return ExitCode::from(2);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    loop {
        match compare(&config.database.path, pg) {
            Ok(r) if r.equal() || std::time::Instant::now() >= deadline => {
                return if print(&r, &pg.target) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
            Err(e) => {
                eprintln!("skillsync postgres-check: {e}");
                return ExitCode::from(2);
            }
        }
    }
}
