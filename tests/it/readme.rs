//! The README's example queries run in the `sqlite3` CLI, read-only, while
//! the daemon is writing: they must parse, run and return rows.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use skillsync::model::DocType;

use crate::helpers::*;

/// Runs SQL through the sqlite3 CLI on stdin (an argument starting with `--` would be taken for an option).
fn sqlite3(db: &std::path::Path, sql: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("sqlite3")
        .arg("-readonly")
        .arg(db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn readme_sql_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[tokio::test]
async fn readme_queries_run_in_sqlite3_while_serve_writes() {
    if crate::tools::sqlite3("readme::readme_queries_run_in_sqlite3_while_serve_writes").is_none() {
        return;
    }
    let app = spawn_app().await;
    let jobs = app.sim.seed(DocType::Job, 12);
    let projects = app.sim.seed(DocType::Project, 3);
    let payloads = app.sim.created_payloads(&jobs, &projects);
    let r =
        skillsync::simulator::send_webhooks(&app.webhook_url, SECRET_ACME, payloads, 4, None).await;
    assert_eq!(r.acked.len(), 15);
    wait_until(Duration::from_secs(20), "the first documents", || async {
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'done'",
        ) == 15
    })
    .await;
    // Job J000011 moves through two stages; one project disappears upstream.
    let j11 = &jobs[10];
    for _ in 0..2 {
        app.sim.update(DocType::Job, j11);
        app.post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Job, j11, "updated"),
        )
        .await;
        wait_until(Duration::from_secs(20), "the update", || async {
            count(
                &app.sql(),
                "SELECT count(*) FROM events WHERE status = 'pending'",
            ) == 0
        })
        .await;
    }
    app.sim.delete(DocType::Project, &projects[0]);
    app.post(
        "",
        Some(SECRET_ACME),
        &app.sim
            .webhook_payload(DocType::Project, &projects[0], "updated"),
    )
    .await;
    let cfg = std::sync::Arc::new(app.config.clone());
    skillsync::cli::reconcile_now(
        cfg,
        None,
        DocType::ALL.to_vec(),
        skillsync::reconcile::Kind::Incremental,
        false,
        Default::default(),
    )
    .await
    .unwrap();
    // And an accuracy audit, for the query on `audits`.
    let audit = skillsync::app::verify::verify_once(
        std::sync::Arc::new(app.config.clone()),
        skillsync::app::verify::VerifyWhat::everything(),
        Default::default(),
    )
    .await;
    assert_eq!(audit.audits.len(), 2, "{audit}");

    // Keep the daemon writing while the queries run.
    let more: Vec<Value> = app
        .sim
        .seed(DocType::Job, 300)
        .iter()
        .map(|id| app.sim.webhook_payload(DocType::Job, id, "created"))
        .collect();
    let url = app.webhook_url.clone();
    let writer = tokio::spawn(async move {
        skillsync::simulator::send_webhooks(&url, SECRET_ACME, more, 4, Some(500.0)).await
    });

    let blocks = readme_sql_blocks();
    assert!(
        blocks.len() >= 5,
        "the README shows at least five example queries"
    );
    for sql in &blocks {
        let out = tokio::task::spawn_blocking({
            let db = app.db.clone();
            let sql = sql.clone();
            move || sqlite3(&db, &sql)
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.trim().is_empty(), "no rows from:\n{sql}");
    }
    let history = blocks
        .iter()
        .find(|b| b.contains("stage history"))
        .expect("history query");
    let out = sqlite3(&app.db, history);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "three revisions of J000011"
    );
    let report = writer.await.unwrap();
    assert_eq!(
        report.acked.len(),
        300,
        "intake went on while reports read: {:?}",
        report.statuses
    );
}
