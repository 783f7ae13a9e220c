//! The reporting layer: typed report views over the simulator's documents,
//! configured columns, stage history, the `columns` command, a config change
//! rebuilding the views without touching the mirror, and DuckDB and
//! Datasette reading every table and view while `serve` writes.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use skillsync::model::DocType;

use crate::helpers::*;

const REPORTING: &str = r#"
[reporting.job]
budget = { path = "$.budget", type = "real" }
owner = "$.Owner.Name"
hours = { path = "$.Hours", type = "integer" }
"#;

/// A `[reporting]` section adding one column, `budget`.
const BUDGET_COLUMN: &str = "[reporting.job]\nbudget = { path = \"$.Budget\", type = \"real\" }\n";

/// Stores `n` jobs through webhooks and waits until they are mirrored.
async fn mirror_jobs(app: &TestApp, ids: &[String]) {
    for s in app.notify_all(DocType::Job, ids, "updated").await {
        assert_eq!(s, 200);
    }
    wait_until(Duration::from_secs(20), "the jobs mirrored", || async {
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'pending'",
        ) == 0
    })
    .await;
}

fn rows(conn: &rusqlite::Connection, sql: &str) -> Vec<Vec<String>> {
    let mut s = conn.prepare(sql).expect(sql);
    let n = s.column_count();
    s.query_map([], |r| {
        (0..n)
            .map(|i| {
                r.get::<_, rusqlite::types::Value>(i).map(|v| match v {
                    rusqlite::types::Value::Null => "NULL".to_string(),
                    rusqlite::types::Value::Integer(i) => format!("int:{i}"),
                    rusqlite::types::Value::Real(f) => format!("real:{f}"),
                    rusqlite::types::Value::Text(t) => t,
                    rusqlite::types::Value::Blob(_) => "blob".into(),
                })
            })
            .collect()
    })
    .expect(sql)
    .collect::<Result<_, _>>()
    .expect(sql)
}

#[tokio::test]
async fn report_views_type_the_simulators_documents_and_configured_columns() {
    let app = spawn_app_with(|c| c.sections = REPORTING.into()).await;
    let ids = app.sim.seed(DocType::Job, 4);
    let projects = app.sim.seed(DocType::Project, 2);
    // One job with the configured fields, spelled in other cases, and odd dates.
    let mut odd = app
        .sim
        .documents(DocType::Job)
        .remove(&ids[0])
        .expect("job");
    odd.insert("Budget".into(), json!("1250.5"));
    odd.insert("owner".into(), json!({"name": "Ana"}));
    odd.insert("Hours".into(), json!(12));
    odd.remove("Client");
    odd.insert("CLIENT".into(), json!("Globex"));
    odd.insert("StartDate".into(), json!("2026-11-02T09:00:00+01:00"));
    odd.insert("EndDate".into(), json!("2026-12-24"));
    odd.insert("CreatedOn".into(), json!("2026-10-01T08:00:00"));
    app.sim.put_raw(DocType::Job, &ids[0], odd);
    mirror_jobs(&app, &ids).await;
    app.notify_all(DocType::Project, &projects, "created").await;
    // One job deleted upstream: gone from the report view.
    app.sim.delete(DocType::Job, &ids[3]);
    mirror_jobs(&app, &ids[3..]).await;
    wait_until(Duration::from_secs(20), "the projects", || async {
        count(&app.sql(), "SELECT count(*) FROM project_report") == 2
    })
    .await;

    let c = app.sql();
    let r = rows(
        &c,
        &format!(
            "SELECT client, stage, budget, owner, hours, start_date, end_date, created_on, version, typeof(version)
             FROM job_report WHERE id = '{}'",
            ids[0]
        ),
    );
    assert_eq!(
        r,
        vec![vec![
            "Globex",
            "Briefing",
            "real:1250.5",
            "Ana",
            "int:12",
            "2026-11-02T08:00:00.000Z",
            "2026-12-24T00:00:00.000Z",
            "2026-10-01T08:00:00.000Z",
            "int:1",
            "integer"
        ]]
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM job_report"),
        3,
        "live jobs only"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM job_report WHERE budget IS NULL AND owner IS NULL"
        ),
        2,
        "absent fields are NULL"
    );
    let cols = rows(&c, "SELECT name, type FROM pragma_table_info('job_report')");
    let names: Vec<&str> = cols.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "tenant",
            "id",
            "number",
            "name",
            "client",
            "stage",
            "project_id",
            "created_on",
            "modified_on",
            "start_date",
            "end_date",
            "version",
            "budget",
            "hours",
            "owner"
        ]
    );
    let types: Vec<&str> = cols.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        &types[12..],
        ["REAL", "INTEGER", "TEXT"],
        "declared types reach readers (extra columns in name order)"
    );
    let p = rows(
        &c,
        "SELECT number IS NOT NULL, client IS NOT NULL, stage, start_date FROM project_report LIMIT 1",
    );
    assert_eq!(p[0][1..], ["int:1", "Briefing", "2026-11-01T00:00:00.000Z"]);
    let p_cols = rows(&c, "SELECT name FROM pragma_table_info('project_report')");
    assert!(!p_cols.iter().any(|r| r[0] == "project_id"));
}

#[tokio::test]
async fn stage_history_merges_equal_stages_and_ends_at_the_next_stage() {
    let app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 2);
    mirror_jobs(&app, &ids).await;
    let job = &ids[0];
    // Briefing → In Progress → (same stage, other change) → Review
    app.sim.update(DocType::Job, job);
    mirror_jobs(&app, std::slice::from_ref(job)).await;
    let mut same = app.sim.documents(DocType::Job).remove(job).expect("job");
    same.insert("Subject".into(), json!("renamed"));
    same.insert("ModifiedOn".into(), json!(skillsync::model::now_ts()));
    app.sim.put_raw(DocType::Job, job, same);
    mirror_jobs(&app, std::slice::from_ref(job)).await;
    app.sim.update(DocType::Job, job);
    mirror_jobs(&app, std::slice::from_ref(job)).await;

    let c = app.sql();
    assert_eq!(
        count(
            &c,
            &format!("SELECT max(revision) FROM jobs WHERE id = '{job}'")
        ),
        4
    );
    let stays = rows(
        &c,
        &format!(
            "SELECT s.stage, s.entered_at = (SELECT fetched_at FROM document_history h WHERE h.id = s.id AND h.revision = 1),
                    s.left_at IS NULL, s.number
             FROM job_stages s WHERE s.id = '{job}' ORDER BY s.entered_at"
        ),
    );
    let stages: Vec<&str> = stays.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(stages, ["Briefing", "In Progress", "Review"], "{stays:?}");
    assert_eq!(stays[0][1], "int:1", "the first stay starts at revision 1");
    assert_eq!(
        stays.iter().map(|r| r[2].as_str()).collect::<Vec<_>>(),
        ["int:0", "int:0", "int:1"],
        "only the current stage has no left_at"
    );
    // Each stay ends where the next begins.
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT count(*) FROM job_stages a JOIN job_stages b ON b.id = a.id AND b.entered_at = a.left_at WHERE a.id = '{job}'"
            )
        ),
        2
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM job_stages WHERE id = '{}'", ids[1])
        ),
        1
    );
}

#[tokio::test]
async fn a_reporting_config_change_rebuilds_views_and_leaves_the_mirror_alone() {
    let mut app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 5);
    let mut d = app
        .sim
        .documents(DocType::Job)
        .remove(&ids[0])
        .expect("job");
    d.insert("Budget".into(), json!(99.5));
    app.sim.put_raw(DocType::Job, &ids[0], d);
    mirror_jobs(&app, &ids).await;
    app.stop().await;
    let mirror = |db: &std::path::Path| {
        let c = rusqlite::Connection::open(db).expect("open");
        rows(
            &c,
            "SELECT tenant, id, document, revision, fetched_at FROM jobs ORDER BY id",
        )
    };
    let before = mirror(&app.db);
    let open = |extra: &str| {
        let mut settings = app.settings.clone();
        settings.sections = extra.into();
        let config = settings.config();
        skillsync::store::Store::open_with_report(
            &app.db,
            Duration::from_secs(5),
            true,
            skillsync::reporting::ReportSpec::new(&config.reporting),
            skillsync::store::ReportRole::Owner,
        )
        .expect("open")
    };
    // A marker row in the derived table survives a start with the same config
    // (nothing rebuilt) and is gone after a change (rebuilt from documents).
    {
        let c = rusqlite::Connection::open(&app.db).expect("open");
        c.execute(
            "INSERT INTO job_report_values (tenant, id) VALUES ('marker', 'x')",
            [],
        )
        .expect("marker");
    }
    drop(open(""));
    let c = app.sql();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM job_report_values WHERE tenant = 'marker'"
        ),
        1
    );
    drop(open(BUDGET_COLUMN));
    let c = app.sql();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM job_report_values WHERE tenant = 'marker'"
        ),
        0
    );
    assert_eq!(
        rows(&c, "SELECT budget FROM job_report WHERE budget IS NOT NULL"),
        vec![vec!["real:99.5".to_string()]],
        "existing documents got the new column"
    );
    assert_eq!(mirror(&app.db), before, "jobs rows untouched");
    // And back: the column is gone again.
    drop(open(""));
    let c = app.sql();
    assert!(c.prepare("SELECT budget FROM job_report").is_err());
    assert_eq!(count(&c, "SELECT count(*) FROM job_report"), 5);
}

#[tokio::test]
async fn an_operator_command_with_another_reporting_config_never_rebuilds_under_serve() {
    // serve runs with an extra `budget` column.
    let app = spawn_app_with(|c| c.sections = BUDGET_COLUMN.into()).await;
    let ids = app.sim.seed(DocType::Job, 3);
    mirror_jobs(&app, &ids).await;
    // `skillsync reconcile` with the default [reporting] (no budget) beside it.
    let plain = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        plain.path(),
        TestConfig::new(&app.db, &app.sim.base_url()).toml(),
    )
    .expect("write config");
    app.sim.update(DocType::Job, &ids[0]);
    // Async: the simulator and serve run on this test's runtime.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["reconcile", "--type", "job", "--config"])
        .arg(plain.path())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("reconcile");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("restart serve"), "{stderr}");
    let c = app.sql();
    assert!(
        c.prepare("SELECT budget FROM job_report_values").is_ok(),
        "the command rebuilt serve's report tables"
    );
    // serve still stores documents into its tables.
    let (fresh, status, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(status, 200);
    wait_until(
        Duration::from_secs(20),
        "the new job in job_report",
        || async {
            count(
                &app.sql(),
                &format!("SELECT count(*) FROM job_report WHERE id = '{fresh}'"),
            ) == 1
        },
    )
    .await;
    assert_eq!(
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'pending'"
        ),
        0
    );
}

#[tokio::test]
async fn stage_history_outlives_pruned_history_through_a_column_change() {
    let mut app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 1);
    let job = &ids[0];
    mirror_jobs(&app, &ids).await;
    for _ in 0..2 {
        app.sim.update(DocType::Job, job);
        mirror_jobs(&app, std::slice::from_ref(job)).await;
    }
    app.stop().await;
    let stays = |db: &std::path::Path| {
        let c = rusqlite::Connection::open(db).expect("open");
        rows(
            &c,
            &format!(
                "SELECT stage, entered_at FROM job_stages WHERE id = '{job}' ORDER BY entered_at"
            ),
        )
    };
    let before = stays(&app.db);
    assert_eq!(before.len(), 3, "{before:?}");
    // Retention prunes all but the latest revision's history.
    {
        let c = rusqlite::Connection::open(&app.db).expect("open");
        c.execute(
            &format!("DELETE FROM document_history WHERE id = '{job}' AND revision < 3"),
            [],
        )
        .expect("prune");
    }
    // A [reporting] column change rebuilds the value tables at the next start.
    let mut settings = app.settings.clone();
    settings.sections = BUDGET_COLUMN.into();
    let config = settings.config();
    drop(
        skillsync::app::open_store(&config, skillsync::store::ReportRole::Owner)
            .await
            .expect("open"),
    );
    assert!(app.sql().prepare("SELECT budget FROM job_report").is_ok());
    assert_eq!(stays(&app.db), before, "stage history lost in the rebuild");
}

#[tokio::test]
async fn columns_command_lists_fields_and_its_lines_make_working_columns() {
    let mut app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 4);
    let mut d = app
        .sim
        .documents(DocType::Job)
        .remove(&ids[0])
        .expect("job");
    d.insert("Budget".into(), json!(10.25));
    d.insert("Owner".into(), json!({"Email": "ana@example.com"}));
    app.sim.put_raw(DocType::Job, &ids[0], d);
    mirror_jobs(&app, &ids).await;
    app.stop().await;

    let out = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["columns", "--type", "job", "--db"])
        .arg(&app.db)
        .env_remove("SKILLSYNC_CONFIG")
        .output()
        .expect("run columns");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("job: 4 live documents"), "{text}");
    let line = |field: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{field} ")))
            .unwrap_or_else(|| panic!("no line for {field} in\n{text}"))
            .to_string()
    };
    assert!(line("Budget").contains("number 1") && line("Budget").contains("25.0%"));
    assert!(line("Client").contains("100.0%") && line("Client").ends_with("client"));
    assert!(line("ProjectId").contains("null") && line("ProjectId").contains("0.0%"));
    assert!(
        line("Owner.Email").contains("+ owner_email (text)"),
        "{text}"
    );
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "[reporting.job]")
        .collect();
    assert!(
        lines.contains(&"budget = { path = \"$.Budget\", type = \"real\" }"),
        "{text}"
    );
    assert!(lines.contains(&"stage_type = \"$.StageType\""), "{text}");

    // Pasted into the config as printed, they validate and become columns.
    let mut pasted = app.settings.clone();
    pasted.sections = lines.join("\n");
    pasted.write(&app.config_path);
    let check = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["check-config", "--config"])
        .arg(&app.config_path)
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let config = pasted.config();
    drop(
        skillsync::app::open_store(&config, skillsync::store::ReportRole::Owner)
            .await
            .expect("open"),
    );
    assert_eq!(
        rows(
            &app.sql(),
            "SELECT budget, owner_email, stage_type FROM job_report WHERE budget IS NOT NULL"
        ),
        vec![vec!["real:10.25", "ana@example.com", "Open"]]
    );
}

fn check_readers(python: &std::path::Path, db: &std::path::Path, queries: &[&str]) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(root.join("scripts/check_readers.py"))
        .arg(db)
        .arg(root.join("metadata.yaml"))
        .args(queries)
        .output()
        .expect("run check_readers.py");
    assert!(
        out.status.success(),
        "check_readers.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from check_readers.py")
}

fn assert_all_read(v: &Value) {
    let objects = v["objects"].as_array().expect("objects");
    for name in [
        "job_report",
        "project_report",
        "job_stages",
        "project_stages",
        "sync_status",
        "jobs",
        "events",
    ] {
        assert!(objects.iter().any(|o| o == name), "{name} missing");
    }
    for o in objects {
        let name = o.as_str().unwrap_or_default();
        let d = &v["duckdb"]["objects"][name];
        assert!(d["rows"].is_u64(), "DuckDB cannot read {name}: {d}");
        // A sum of integers is HUGEINT in DuckDB, which many clients
        // (pandas, BI drivers) cannot take: counts must stay BIGINT.
        for (column, ty) in d["types"].as_object().expect("DuckDB column types") {
            assert_ne!(ty, "HUGEINT", "DuckDB types {name}.{column} as HUGEINT");
        }
        let s = &v["datasette"]["objects"][name];
        assert_eq!(s["status"], 200, "Datasette cannot read {name}: {s}");
    }
    for view in ["job_report", "project_report"] {
        assert_eq!(
            v["datasette"]["objects"][view]["facets"],
            json!(["client", "stage"]),
            "facets on {view}"
        );
    }
    for (q, r) in v["datasette"]["queries"]
        .as_object()
        .expect("canned queries")
    {
        assert_eq!(r["status"], 200, "canned query {q}: {r}");
    }
}

#[tokio::test]
async fn duckdb_and_datasette_read_every_table_and_view_while_serve_writes() {
    let Some(python) = crate::tools::readers_python(
        "reporting::duckdb_and_datasette_read_every_table_and_view_while_serve_writes",
    ) else {
        return;
    };
    let app = spawn_app().await;
    let jobs = app.sim.seed(DocType::Job, 30);
    let projects = app.sim.seed(DocType::Project, 4);
    mirror_jobs(&app, &jobs).await;
    for id in &jobs[..10] {
        app.sim.update(DocType::Job, id);
    }
    mirror_jobs(&app, &jobs[..10]).await;
    app.notify_all(DocType::Project, &projects, "created").await;
    app.sim.delete(DocType::Job, &jobs[29]);
    skillsync::cli::reconcile_now(
        std::sync::Arc::new(app.config.clone()),
        None,
        DocType::ALL.to_vec(),
        skillsync::reconcile::Kind::Full,
        false,
        Default::default(),
    )
    .await
    .expect("reconcile");
    // Datasette names a database after its file: the metadata is for skillsync.db.
    assert_eq!(
        app.db.file_name().and_then(|n| n.to_str()),
        Some("skillsync.db")
    );

    let more: Vec<Value> = app
        .sim
        .seed(DocType::Job, 400)
        .iter()
        .map(|id| app.sim.webhook_payload(DocType::Job, id, "created"))
        .collect();
    let url = app.webhook_url.clone();
    let writer = tokio::spawn(async move {
        skillsync::simulator::send_webhooks(&url, SECRET_ACME, more, 4, Some(200.0)).await
    });
    let (py, db) = (python.clone(), app.db.clone());
    let during = tokio::task::spawn_blocking(move || check_readers(&py, &db, &[]))
        .await
        .expect("readers");
    assert_all_read(&during);
    let report = writer.await.expect("writer");
    assert_eq!(
        report.acked.len(),
        400,
        "intake went on: {:?}",
        report.statuses
    );

    // Quiet now: DuckDB's answers equal SQLite's, row for row.
    wait_until(Duration::from_secs(30), "the burst mirrored", || async {
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'pending'",
        ) == 0
    })
    .await;
    let queries = [
        "SELECT stage, client, count(*) FROM s.job_report GROUP BY stage, client ORDER BY stage, client",
        "SELECT stage, count(*), count(left_at) FROM s.job_stages GROUP BY stage ORDER BY stage",
        "SELECT tenant, doc_type, mirrored, deleted, pending_events, queued_fetches, dead_events, complete_as_of FROM s.sync_status ORDER BY doc_type",
    ];
    let after = check_readers(&python, &app.db, &queries);
    assert_all_read(&after);
    let c = app.sql();
    for (i, q) in queries.iter().enumerate() {
        let sqlite: Vec<Vec<Value>> = rows(&c, &q.replace(" s.", " "))
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| match v.strip_prefix("int:") {
                        Some(n) => json!(n.parse::<i64>().unwrap_or(-1)),
                        None if v == "NULL" => Value::Null,
                        None => json!(v),
                    })
                    .collect()
            })
            .collect();
        let duck = &after["duckdb"]["queries"][i];
        assert_eq!(duck["rows"], json!(sqlite), "{q}: DuckDB {duck}");
        assert!(!sqlite.is_empty(), "{q}");
    }
}
