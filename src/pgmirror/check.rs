//! `skillsync postgres-check`: compares the PostgreSQL copy with SQLite row
//! by row — revision, `deleted_at` and a hash of the document (parsed and
//! re-serialised with sorted keys on both sides, because `jsonb` does not
//! keep the text as written) — that every SQLite history row is in
//! PostgreSQL, and the report tables: every document's row in
//! `job_report_values` / `project_report_values` (each column computed from
//! SQLite's document by the same [`ReportSpec`] the sink uses) and every
//! history row's stage in `document_stages`, so a report left half-built
//! shows. The tests use the same [`compare`], so what they prove is what
//! the operator's command proves.
//!
//! Blocking: run it on a thread of its own (the CLI has no runtime here).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::Value;

use super::{PgError, PostgresConfig, schema};
use crate::model::DocType;
use crate::reporting::{ColumnType, ReportSpec, Typed};
use crate::store::ReadOnlyStore;

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
pub struct Comparison {
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

impl Comparison {
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

/// One report cell as text both sides agree on: what the sink writes for a
/// typed value, read back the way [`report_select`] reads PostgreSQL's.
fn expected_cell(ty: ColumnType, v: &Typed) -> Option<String> {
    match (ty, v) {
        (ColumnType::Integer, Typed::Integer(x)) => Some(x.to_string()),
        (ColumnType::Real, Typed::Real(x)) => Some(x.to_string()),
        (ColumnType::Real, Typed::Integer(x)) => Some((*x as f64).to_string()),
        (ColumnType::Text, Typed::Text(x)) => Some(super::sink::text_safe(x)),
        (ColumnType::Text, Typed::Integer(x)) => Some(x.to_string()),
        (ColumnType::Text, Typed::Real(x)) => Some(x.to_string()),
        (ColumnType::Timestamp, Typed::Text(x)) => {
            chrono::DateTime::parse_from_rfc3339(x).ok().map(|t| {
                t.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                    .to_string()
            })
        }
        _ => None,
    }
}

/// The select list reading one report column of PostgreSQL as [`expected_cell`] text
/// (reals are read as numbers and formatted in Rust).
fn report_select(name: &str, ty: ColumnType) -> String {
    let c = crate::reporting::quote_ident(name);
    match ty {
        ColumnType::Integer | ColumnType::Text => format!("{c}::text"),
        ColumnType::Real => format!("{c}::float8"),
        ColumnType::Timestamp => {
            format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
    }
}

/// Adds a difference, or counts it once `shown` of its kind were listed.
fn note(report: &mut Comparison, hidden: &mut usize, shown: &mut usize, line: String) {
    if *shown < 20 {
        *shown += 1;
        report.differences.push(line);
    } else {
        *hidden += 1;
    }
}

/// Reads both sides and lists every difference; `spec` is the
/// `[reporting]` the report tables must follow.
pub fn compare(db: &Path, cfg: &PostgresConfig, spec: &ReportSpec) -> Result<Comparison, PgError> {
    let sqlite = ReadOnlyStore::open(db)?;
    let mut left: BTreeMap<Key, Fingerprint> = BTreeMap::new();
    let mut values: BTreeMap<Key, Vec<Option<String>>> = BTreeMap::new();
    let mut stages: BTreeMap<(DocType, String, String, i64), Option<String>> = BTreeMap::new();
    for ty in DocType::ALL {
        let mut after: Option<(String, String)> = None;
        loop {
            let page = sqlite.mirror_page(ty, after.as_ref(), 2000)?;
            let Some(last) = page.last() else { break };
            after = Some((last.tenant.clone(), last.id.clone()));
            let types: Vec<ColumnType> = spec.stored_columns(ty).map(|(c, _)| c.ty).collect();
            for d in page {
                let v = spec.values(ty, &super::sink::parse(&d.document));
                values.insert(
                    (ty, d.tenant.clone(), d.id.clone()),
                    types
                        .iter()
                        .zip(&v)
                        .map(|(t, v)| expected_cell(*t, v))
                        .collect(),
                );
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
        let page = sqlite.history_page(after, 5000)?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (_, h) in page {
            let stage = spec
                .stage(&super::sink::parse(&h.document))
                .map(|s| super::sink::text_safe(&s));
            stages.insert(
                (h.doc_type, h.tenant.clone(), h.id.clone(), h.revision),
                stage,
            );
            history.insert((h.doc_type, h.tenant, h.id, h.revision));
        }
    }
    let lag = sqlite.lag()?;

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
    let mut report = Comparison {
        sqlite_documents: left.len(),
        in_flight: lag.map(|l| l.rows).unwrap_or(0),
        ..Comparison::default()
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
    compare_reports(&mut client, cfg, spec, &values, &stages, &mut report)?;
    Ok(report)
}

/// The report tables: values per document, stages per history row.
fn compare_reports(
    client: &mut postgres::Client,
    cfg: &PostgresConfig,
    spec: &ReportSpec,
    values: &BTreeMap<Key, Vec<Option<String>>>,
    stages: &BTreeMap<(DocType, String, String, i64), Option<String>>,
    report: &mut Comparison,
) -> Result<(), PgError> {
    let s = schema::quoted(&cfg.schema);
    let pg = |e: postgres::Error| cfg.error(&e);
    let (mut shown, mut hidden) = (0usize, 0usize);
    for ty in DocType::ALL {
        let cols: Vec<(String, ColumnType)> = spec
            .stored_columns(ty)
            .map(|(c, _)| (c.name.clone(), c.ty))
            .collect();
        let mut select = vec!["tenant".to_string(), "id::text".to_string()];
        select.extend(cols.iter().map(|(n, t)| report_select(n, *t)));
        let rows = match client.query(
            &format!("SELECT {} FROM {s}.{ty}_report_values", select.join(", ")),
            &[],
        ) {
            Ok(rows) => rows,
            Err(e) => {
                report.differences.push(format!(
                    "{ty}_report_values cannot be read with the configured [reporting] columns: {}",
                    super::describe(&e)
                ));
                continue;
            }
        };
        let mut right: BTreeMap<Key, Vec<Option<String>>> = BTreeMap::new();
        for r in rows {
            let cells = cols
                .iter()
                .enumerate()
                .map(|(i, (_, t))| match t {
                    ColumnType::Real => r.get::<_, Option<f64>>(i + 2).map(|x| x.to_string()),
                    _ => r.get::<_, Option<String>>(i + 2),
                })
                .collect();
            right.insert((ty, r.get(0), r.get(1)), cells);
        }
        for (key, want) in values.iter().filter(|(k, _)| k.0 == ty) {
            let (_, tenant, id) = key;
            match right.get(key) {
                None => note(
                    report,
                    &mut hidden,
                    &mut shown,
                    format!("{ty} {tenant} {id}: no {ty}_report_values row in PostgreSQL"),
                ),
                Some(have) if have != want => {
                    let what: Vec<String> = cols
                        .iter()
                        .zip(want.iter().zip(have))
                        .filter(|(_, (w, h))| w != h)
                        .map(|((n, _), (w, h))| {
                            format!(
                                "{n} sqlite={} postgres={}",
                                w.as_deref().unwrap_or("NULL"),
                                h.as_deref().unwrap_or("NULL")
                            )
                        })
                        .collect();
                    note(
                        report,
                        &mut hidden,
                        &mut shown,
                        format!("{ty} {tenant} {id}: report value {}", what.join(", ")),
                    );
                }
                Some(_) => {}
            }
        }
        for (t, tenant, id) in right.keys() {
            if !values.contains_key(&(*t, tenant.clone(), id.clone())) {
                note(
                    report,
                    &mut hidden,
                    &mut shown,
                    format!(
                        "{ty} {tenant} {id}: {ty}_report_values row for a document SQLite does not hold"
                    ),
                );
            }
        }
    }
    let pg_stages: BTreeMap<(String, String, String, i64), Option<String>> = client
        .query(
            &format!("SELECT doc_type, tenant, id::text, revision, stage FROM {s}.document_stages"),
            &[],
        )
        .map_err(pg)?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3)), r.get(4)))
        .collect();
    for ((ty, tenant, id, rev), want) in stages {
        match pg_stages.get(&(ty.as_str().to_string(), tenant.clone(), id.clone(), *rev)) {
            None => note(
                report,
                &mut hidden,
                &mut shown,
                format!("{ty} {tenant} {id}: document_stages revision {rev} missing in PostgreSQL"),
            ),
            Some(have) if have != want => note(
                report,
                &mut hidden,
                &mut shown,
                format!(
                    "{ty} {tenant} {id}: document_stages revision {rev} stage sqlite={} postgres={}",
                    want.as_deref().unwrap_or("NULL"),
                    have.as_deref().unwrap_or("NULL")
                ),
            ),
            Some(_) => {}
        }
    }
    if hidden > 0 {
        report
            .differences
            .push(format!("... {hidden} more report table differences"));
    }
    Ok(())
}

/// Prints the report the way `postgres-check` shows it; returns whether equal.
pub fn print(report: &Comparison, target: &str) -> bool {
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
            "equal: every document (revision, deleted_at, content), every history row and the report tables (values, stages) are in PostgreSQL"
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

/// What `postgres-check` found; the CLI turns it into the exit code
/// (0 equal, 1 different, 2 unreadable or not configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Equal,
    Different,
    /// Not configured, or a side could not be read (the reason is printed).
    Failed,
}

/// `skillsync postgres-check [--wait SECS]`: compares, printing the result.
pub fn run_cli(config: &crate::config::Config, wait_secs: u64) -> CheckOutcome {
    let Some(pg) = &config.postgres else {
        eprintln!("skillsync postgres-check: the config has no [postgres] section");
        return CheckOutcome::Failed;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    loop {
        let spec = ReportSpec::new(&config.reporting);
        match compare(&config.database.path, pg, &spec) {
            Ok(r) if r.equal() || std::time::Instant::now() >= deadline => {
                return if print(&r, &pg.target) {
                    CheckOutcome::Equal
                } else {
                    CheckOutcome::Different
                };
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
            Err(e) => {
                eprintln!("skillsync postgres-check: {e}");
                return CheckOutcome::Failed;
            }
        }
    }
}
