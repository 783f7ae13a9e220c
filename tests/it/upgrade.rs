//! Upgrades from every earlier schema version: databases written by the
//! binaries of older commits (`tests/fixtures/`, see its README) are opened
//! by the binary under test. For each: `migrate --dry-run` names exactly the
//! migrations still to run and changes nothing; `serve` upgrades the file,
//! keeps every document, revision, event and reconciliation run as it was,
//! and finishes the work that was pending (with the simulator as upstream);
//! `status` then reads it (exit 0 or 1, never 2) and `migrate --dry-run`
//! finds nothing left to do. The file of the reverted schema 6 is refused
//! cleanly (exit 2) and left untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;
use skillsync::model::DocType;
use skillsync::store::{MIGRATIONS, SCHEMA_VERSION};

use crate::helpers::*;

/// Retries enough that the fixtures' failed attempts never make an event dead.
/// The settings of an upgraded daemon: tenant `demo` (the fixtures' tenant)
/// on `sim_base`, listening on `port`.
fn settings(db: &Path, sim_base: &str, port: u16) -> TestConfig {
    let mut c = TestConfig::new(db, sim_base).on_port(port);
    c.fetch = FetchSettings::quick(4, 10);
    c.acme().name = "demo".into();
    c
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn skillsync(args: &[&str], db: &Path, config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(args)
        .arg("--db")
        .arg(db)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run skillsync")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Rows as text, keyed by their identity: what "kept as it was" compares.
fn rows(conn: &rusqlite::Connection, sql: &str) -> BTreeMap<String, String> {
    let mut stmt = conn.prepare(sql).expect("prepare");
    let n = stmt.column_count();
    let mut out = BTreeMap::new();
    let mut q = stmt.query([]).expect("query");
    while let Some(r) = q.next().expect("row") {
        let cols: Vec<String> = (0..n)
            .map(|i| match r.get_ref(i).expect("column") {
                rusqlite::types::ValueRef::Null => "NULL".to_string(),
                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                rusqlite::types::ValueRef::Real(v) => v.to_string(),
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    String::from_utf8_lossy(t).into_owned()
                }
            })
            .collect();
        out.insert(cols[0].clone(), cols[1..].join("|"));
    }
    out
}

/// What an upgrade must keep: every document, revision, event and run.
struct Kept {
    docs: BTreeMap<String, String>,
    history: BTreeMap<String, String>,
    events: BTreeMap<String, String>,
    runs: BTreeMap<String, String>,
    /// (type, id) of each document a pending event waits for.
    pending: Vec<(String, String)>,
}

fn read_kept(db: &Path) -> Kept {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open");
    let docs = |t: &str| {
        format!(
            "SELECT '{t}/' || tenant || '/' || id, document, revision, modified_on, first_seen_at, fetched_at, deleted_at FROM {t}"
        )
    };
    let mut all = rows(&conn, &docs("jobs"));
    all.extend(rows(&conn, &docs("projects")));
    let mut pending = Vec::new();
    let mut q = conn
        .prepare(
            "SELECT DISTINCT doc_type, doc_id FROM events WHERE status = 'pending' ORDER BY 1, 2",
        )
        .expect("prepare");
    for r in q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("pending")
    {
        pending.push(r.expect("row"));
    }
    Kept {
        docs: all,
        history: rows(
            &conn,
            "SELECT tenant || '/' || doc_type || '/' || id || '/' || revision, document, fetched_at FROM document_history",
        ),
        events: rows(
            &conn,
            "SELECT id, tenant, received_at, action, doc_type, doc_id, payload FROM events",
        ),
        runs: rows(
            &conn,
            "SELECT id, tenant, doc_type, kind, started_at, finished_at, status, listed, enqueued, marked_deleted FROM sync_runs",
        ),
        pending,
    }
}

/// Opens the fixture of `version` with this binary and checks everything
/// the module doc promises.
async fn upgrade_from(version: i64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    std::fs::copy(fixture(&format!("schema-{version}.db")), &db).expect("copy fixture");
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let config = dir.path().join("skillsync.toml");
    let port = free_port();
    settings(&db, &sim.base_url(), port).write(&config);
    let before = read_kept(&db);
    assert_eq!(before.pending.len(), 3, "the fixture's pending documents");
    let version_in = |db: &Path| -> i64 {
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open")
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version")
    };
    assert_eq!(version_in(&db), version);

    // 1. The dry run names exactly the migrations still to run, and writes nothing.
    let bytes = std::fs::read(&db).expect("read");
    let dry = skillsync(&["migrate", "--dry-run"], &db, &config);
    let out = String::from_utf8_lossy(&dry.stdout).to_string();
    assert_eq!(
        dry.status.code(),
        Some(
            if version < SCHEMA_VERSION
                || out.contains("report tables rebuilt")
                || out.contains("views recreated")
            {
                1
            } else {
                0
            }
        ),
        "{}",
        text(&dry)
    );
    for m in MIGRATIONS {
        let named = out.contains(&format!("migration {} {}:", m.version, m.name));
        assert_eq!(named, m.version > version, "{}: {}", m.name, text(&dry));
    }
    assert!(
        out.contains(&format!("schema version {version};")),
        "{}",
        text(&dry)
    );
    assert_eq!(
        std::fs::read(&db).expect("read"),
        bytes,
        "the dry run wrote"
    );
    assert!(!dir.path().join("skillsync.db-wal").exists());

    // 2. serve upgrades it and finishes the pending work: the upstream now
    // serves the documents the fixture's events wait for.
    for (ty, id) in &before.pending {
        let (ty, doc) = match ty.as_str() {
            "job" => (
                DocType::Job,
                json!({"Id": id, "JobId": id, "JobNumber": "J-UPGRADE", "Subject": "from the fixture",
                       "Stage": "Doing", "ModifiedOn": "2026-12-01T00:00:00Z", "Version": 1}),
            ),
            _ => (
                DocType::Project,
                json!({"Id": id, "ProjectId": id, "ProjectNumber": "P-UPGRADE", "Name": "from the fixture",
                       "Stage": "Doing", "ModifiedOn": "2026-12-01T00:00:00Z"}),
            ),
        };
        let serde_json::Value::Object(doc) = doc else {
            unreachable!("a JSON object literal");
        };
        sim.put_raw(ty, id, doc);
    }
    let (mut child, log) = spawn_logging(
        Command::new(env!("CARGO_BIN_EXE_skillsync"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("LISTEN_FDS")
            .env_remove("RUST_LOG"),
    );
    let sql = || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db")
    };
    let settled = wait_until_or_false(Duration::from_secs(60), || {
        version_in(&db) == SCHEMA_VERSION
            && count(
                &sql(),
                "SELECT count(*) FROM events WHERE status = 'pending'",
            ) == 0
    })
    .await;
    let _ = crate::helpers::kill(["-TERM", &child.id().to_string()]);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    let log = log.join().unwrap_or_default();
    assert!(
        settled,
        "schema-{version}.db: not upgraded with its pending work done within 60 s\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    token.cancel();
    // What the dry run said about the report tables is what serve did.
    let rebuilt = log.contains("report columns rebuilt");
    let views = log.contains("report views recreated");
    if out.contains("report tables rebuilt") {
        assert!(rebuilt, "the dry run announced a rebuild:\n{out}\n{log}");
    } else if out.contains("report views recreated") {
        assert!(
            views && !rebuilt,
            "the dry run announced views only:\n{out}\n{log}"
        );
    } else {
        assert!(
            !views && !rebuilt,
            "the dry run announced no report work:\n{out}\n{log}"
        );
    }

    // 3. Everything kept, and the pending work done.
    let conn = sql();
    let after = read_kept(&db);
    assert_eq!(version_in(&db), SCHEMA_VERSION);
    for (key, row) in &before.docs {
        assert_eq!(after.docs.get(key), Some(row), "document {key} changed");
    }
    for (key, row) in &before.history {
        assert_eq!(after.history.get(key), Some(row), "revision {key} changed");
    }
    assert_eq!(after.events, before.events, "events kept, none added");
    assert_eq!(after.runs, before.runs, "reconciliation runs kept");
    assert!(after.pending.is_empty());
    for (ty, id) in &before.pending {
        let table = if ty == "job" { "jobs" } else { "projects" };
        assert_eq!(
            count(
                &conn,
                &format!(
                    "SELECT count(*) FROM {table} WHERE tenant = 'demo' AND id = '{id}' AND deleted_at IS NULL"
                )
            ),
            1,
            "the pending {ty} {id} was fetched"
        );
    }
    assert_eq!(after.docs.len(), before.docs.len() + 3);
    assert_eq!(after.history.len(), before.history.len() + 3);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE status = 'done'"),
        before.events.len() as i64 - 2,
        "every event done but the two ignored ones"
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM fetch_queue"), 0);
    // The latest schema's objects, and the report views over the old rows.
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('events_recorded_by_document', 'pg_outbox', 'events_to_queue')"
        ),
        3
    );
    let index: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'events_by_document'",
            [],
            |r| r.get(0),
        )
        .expect("the index");
    assert!(index.contains("WHERE queued = 1"), "{index}");
    assert_eq!(
        count(&conn, "SELECT count(*) FROM job_report"),
        count(&conn, "SELECT count(*) FROM jobs WHERE deleted_at IS NULL")
    );
    assert!(count(&conn, "SELECT count(*) FROM job_stages") >= 14);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sync_status WHERE tenant = 'demo'"
        ),
        2
    );
    drop(conn);

    // 4. status reads it; nothing is left to migrate.
    let status = skillsync(&["status"], &db, &config);
    assert!(
        matches!(status.status.code(), Some(0 | 1)),
        "status on the upgraded schema-{version}.db: {}",
        text(&status)
    );
    let again = skillsync(&["migrate", "--dry-run"], &db, &config);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
}

/// [`wait_until`] that answers instead of panicking, so the caller can stop
/// the daemon and show its log first.
async fn wait_until_or_false(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn from_schema_1() {
    upgrade_from(1).await;
}

#[tokio::test]
async fn from_schema_2() {
    upgrade_from(2).await;
}

#[tokio::test]
async fn from_schema_3() {
    upgrade_from(3).await;
}

#[tokio::test]
async fn from_schema_4() {
    upgrade_from(4).await;
}

#[tokio::test]
async fn from_schema_5() {
    upgrade_from(5).await;
}

/// Schema 6 (the inbox cursor) was on the main line for an hour and then
/// reverted: a file its binary wrote is newer than this binary knows. It is
/// refused with exit 2 (which the unit does not restart) by the dry run and
/// by serve, and left as it was.
#[test]
fn the_reverted_schema_6_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    std::fs::copy(fixture("schema-6-reverted.db"), &db).expect("copy fixture");
    let bytes = std::fs::read(&db).expect("read");
    let config = dir.path().join("skillsync.toml");
    let mut acme = settings(&db, "http://127.0.0.1:9", free_port());
    acme.tenants[0].name = "acme".into();
    acme.write(&config);
    let dry = skillsync(&["migrate", "--dry-run"], &db, &config);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stderr).contains("schema version 6 is newer"),
        "{}",
        text(&dry)
    );
    let serve = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("LISTEN_FDS")
        .output()
        .expect("run serve");
    assert_eq!(serve.status.code(), Some(2), "{}", text(&serve));
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("newer than this skillsync understands"),
        "{}",
        text(&serve)
    );
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 6);
    drop(conn);
    assert_eq!(
        std::fs::read(&db).expect("read"),
        bytes,
        "the refused file changed"
    );
    assert!(!dir.path().join("skillsync.db-wal").exists());
}

/// `skillsync migrate` without `--dry-run` runs the upgrade now and leaves
/// nothing for serve; it refuses while a serve's health probe is fresh,
/// unless `--force`.
#[test]
fn migrate_runs_the_upgrade_and_refuses_beside_a_running_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    std::fs::copy(fixture("schema-2.db"), &db).expect("copy fixture");
    let config = dir.path().join("skillsync.toml");
    settings(&db, "http://127.0.0.1:9", free_port()).write(&config);
    let migrate = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_skillsync"))
            .arg("migrate")
            .args(extra)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .expect("run migrate")
    };
    // A serve wrote its probe a moment ago.
    let fresh_probe = || {
        let c = rusqlite::Connection::open(&db).expect("open");
        c.execute(
            "UPDATE daemon_state SET value = ?1 WHERE key = 'healthz'",
            [skillsync::model::now_ts()],
        )
        .expect("probe");
    };
    fresh_probe();
    let refused = migrate(&[]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("seems to be running"),
        "{}",
        text(&refused)
    );
    let version = || -> i64 {
        rusqlite::Connection::open(&db)
            .expect("open")
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version")
    };
    assert_eq!(version(), 2, "nothing ran");
    let forced = migrate(&["--force"]);
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced));
    let out = String::from_utf8_lossy(&forced.stdout);
    assert!(out.contains("migration 3 003_deletion_evidence"), "{out}");
    assert!(out.contains("done in"), "{out}");
    assert_eq!(version(), SCHEMA_VERSION);
    let again = skillsync(&["migrate", "--dry-run"], &db, &config);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    // Nothing to do: exit 0 even with a fresh probe.
    fresh_probe();
    assert_eq!(migrate(&[]).status.code(), Some(0));
}
