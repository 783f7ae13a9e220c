//! The webhook inbox over real HTTP: every row of SPEC's answers table, tenant
//! routing by secret and by path, intake beside a long read transaction, and
//! the durable-before-200 rule checked against the database file.

use std::time::Duration;

use serde_json::{Value, json};
use skillsync::model::DocType;

use crate::helpers::*;

fn job_payload(app: &TestApp, id: &str) -> Value {
    app.sim.webhook_payload(DocType::Job, id, "created")
}

fn event_rows(app: &TestApp) -> i64 {
    count(&app.sql(), "SELECT count(*) FROM events")
}

#[tokio::test]
async fn valid_event_is_committed_before_200() {
    let app = spawn_app().await;
    let id = app.sim.create(DocType::Job);
    let (status, body) = app
        .post("", Some(SECRET_ACME), &job_payload(&app, &id))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "accepted");
    let event_id = body["event_id"].as_i64().expect("event_id");
    // The row is there the moment the answer is: read it from another connection.
    let (tenant, doc_type, doc_id, action): (String, String, String, String) = app
        .sql()
        .query_row(
            "SELECT tenant, doc_type, doc_id, action FROM events WHERE id = ?1",
            [event_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("event row exists when 200 is received");
    assert_eq!(
        (tenant.as_str(), doc_type.as_str(), action.as_str()),
        ("acme", "job", "created")
    );
    assert_eq!(doc_id, id);
}

/// `group_commit = false` (one transaction and one `synchronous=FULL` commit
/// per write, the benchmark's baseline) takes the other path through the
/// store: concurrent events are all committed before their 200 and mirrored.
#[tokio::test]
async fn one_commit_per_event_mode_commits_every_event_before_200() {
    let app = spawn_app_with(|c| c.database.group_commit = Some(false)).await;
    assert!(!app.config.database.group_commit);
    let ids = app.sim.seed(DocType::Job, 40);
    let payloads: Vec<Value> = ids
        .iter()
        .map(|id| app.sim.webhook_payload(DocType::Job, id, "created"))
        .collect();
    let r =
        skillsync::simulator::send_webhooks(&app.webhook_url, SECRET_ACME, payloads, 8, None).await;
    assert_eq!(r.acked.len(), 40, "{:?}", r.statuses);
    let conn = app.sql();
    for id in &r.acked {
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM events WHERE id = {id}")
            ),
            1,
            "acknowledged event {id} is in the database"
        );
    }
    wait_until(
        std::time::Duration::from_secs(30),
        "all 40 documents mirrored",
        || async { count(&app.sql(), "SELECT count(*) FROM jobs") == 40 },
    )
    .await;
}

#[tokio::test]
async fn test_action_and_unknown_type_are_ignored_but_recorded() {
    let app = spawn_app().await;
    let (s, b) = app
        .post(
            "",
            Some(SECRET_ACME),
            &json!({"action": "test", "document": null}),
        )
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ignored")));
    let unknown = json!({"action": "created", "document": {"type": "SkillsWorkflow.Invoice", "id": "32a8c937-2c65-463d-a292-e4c4e13ed263", "url": "https://elsewhere.example/x"}});
    let (s, b) = app.post("", Some(SECRET_ACME), &unknown).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ignored")));
    let conn = app.sql();
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM events WHERE status = 'ignored'"
        ),
        2
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM events WHERE doc_type = 'SkillsWorkflow.Invoice'"
        ),
        1,
        "an unknown type keeps the sender's string"
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM fetch_queue"),
        0,
        "ignored events are never fetched"
    );
}

#[tokio::test]
async fn unknown_action_on_known_type_is_pending_and_refreshes() {
    let app = spawn_app().await;
    let id = app.sim.create(DocType::Project);
    let (s, b) = app
        .post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Project, &id, "archived"),
        )
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("accepted")));
    wait_until(
        Duration::from_secs(10),
        "the project to be mirrored",
        || async { count(&app.sql(), "SELECT count(*) FROM projects") == 1 },
    )
    .await;
}

#[tokio::test]
async fn wrong_missing_secret_and_unknown_tenant_path_get_401_and_write_nothing() {
    let app = spawn_app().await;
    let id = app.sim.create(DocType::Job);
    let p = job_payload(&app, &id);
    for (suffix, secret) in [
        ("", None),
        ("", Some("wrong-secret-value")),
        ("/acme", Some("nope")),
        ("/nobody", Some(SECRET_ACME)),
    ] {
        let (s, b) = app.post(suffix, secret, &p).await;
        assert_eq!(s, 401, "{suffix} {secret:?}");
        assert_eq!(
            b,
            json!({"error": "unauthorized"}),
            "the body reveals nothing about tenants"
        );
    }
    assert_eq!(event_rows(&app), 0);
}

#[tokio::test]
async fn bad_payloads_get_400_naming_the_field_and_write_nothing() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().to_string();
    let base = app.sim.base_url();
    let url = format!("{base}/api/jobs/{id}");
    let cases: Vec<(Value, &str)> = vec![
        (json!([1, 2]), "body"),
        (
            json!({"document": {"type": "SkillsWorkflow.Job", "id": id, "url": url}}),
            "action",
        ),
        (
            json!({"action": 5, "document": {"type": "SkillsWorkflow.Job", "id": id, "url": url}}),
            "action",
        ),
        (json!({"action": "created"}), "document"),
        (json!({"action": "created", "document": "x"}), "document"),
        (
            json!({"action": "created", "document": {"id": id, "url": url}}),
            "document.type",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "url": url}}),
            "document.id",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": "not-a-uuid", "url": url}}),
            "document.id",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id}}),
            "document.url",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": 7}}),
            "document.url",
        ),
        // SSRF guard: another host, another scheme, another type, another id.
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": format!("http://169.254.169.254/api/jobs/{id}")}}),
            "document.url",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": url.replace("http://", "https://")}}),
            "document.url",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": format!("{base}/api/projects/{id}")}}),
            "document.url",
        ),
        (
            json!({"action": "created", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": format!("{base}/api/jobs/{}", uuid::Uuid::new_v4())}}),
            "document.url",
        ),
    ];
    for (body, field) in cases {
        let (s, b) = app.post("", Some(SECRET_ACME), &body).await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(b["field"], field, "{body} -> {b}");
        assert!(b["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Not JSON at all.
    let resp = app
        .client
        .post(&app.webhook_url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["field"], "body");
    assert_eq!(event_rows(&app), 0);
}

#[tokio::test]
async fn oversized_body_gets_413_and_wrong_content_type_415() {
    let app = spawn_app().await;
    let id = app.sim.create(DocType::Job);
    let mut p = job_payload(&app, &id);
    p["padding"] = json!("x".repeat(70_000));
    let (s, _) = app.post("", Some(SECRET_ACME), &p).await;
    assert_eq!(s, 413);
    // Chunked (no Content-Length) is limited while reading too.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = app.base_url.trim_start_matches("http://").to_string();
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /skillsevent HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-webhook-secret: {SECRET_ACME}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("2000\r\n{}\r\n", " ".repeat(0x2000));
        for _ in 0..20 {
            if sock.write_all(chunk.as_bytes()).await.is_err() {
                break; // the server stopped reading: refused
            }
        }
        let _ = sock.write_all(b"0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "chunked oversize answered: {answer}"
        );
    }
    let resp = app
        .client
        .post(&app.webhook_url)
        .header("content-type", "text/plain")
        .header("x-webhook-secret", SECRET_ACME)
        .body(job_payload(&app, &id).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let resp = app
        .client
        .post(&app.webhook_url)
        .header("x-webhook-secret", SECRET_ACME)
        .body(job_payload(&app, &id).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415, "no content type at all");
    assert_eq!(event_rows(&app), 0);
}

/// A second tenant, `beta`, with two webhook secrets (the second after a
/// rotation) and an upstream nobody answers on.
fn with_beta(c: &mut TestConfig) {
    let mut beta = TenantSettings::new("beta", SECRET_BETA, "http://127.0.0.1:9");
    beta.webhook_secrets
        .push("beta-webhook-secret-rotated".into());
    beta.app_tenant = "beta-tenant".into();
    beta.app_id = "beta-app".into();
    beta.app_secret = Some("beta-app-secret".into());
    c.tenants.push(beta);
}

#[tokio::test]
async fn two_tenants_on_one_path_are_routed_by_secret() {
    let app = spawn_app_with(with_beta).await;
    let id = uuid::Uuid::new_v4().to_string();
    let beta_payload = json!({"action": "updated", "document": {"type": "SkillsWorkflow.Job", "id": id, "url": format!("http://127.0.0.1:9/api/jobs/{id}")}});
    for secret in [SECRET_BETA, "beta-webhook-secret-rotated"] {
        let (s, b) = app.post("", Some(secret), &beta_payload).await;
        assert_eq!(s, 200, "{b}");
    }
    // beta's document URL is not on acme's api_base: acme's secret cannot post it.
    let (s, b) = app.post("", Some(SECRET_ACME), &beta_payload).await;
    assert_eq!((s, b["field"].as_str()), (400, Some("document.url")));
    let acme_id = app.sim.create(DocType::Job);
    let (s, _) = app
        .post("", Some(SECRET_ACME), &job_payload(&app, &acme_id))
        .await;
    assert_eq!(s, 200);
    let conn = app.sql();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE tenant = 'beta'"),
        2
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE tenant = 'acme'"),
        1
    );
}

#[tokio::test]
async fn tenant_path_refuses_another_tenants_secret() {
    let app = spawn_app_with(with_beta).await;
    let id = app.sim.create(DocType::Job);
    let p = job_payload(&app, &id);
    let (s, _) = app.post("/beta", Some(SECRET_ACME), &p).await;
    assert_eq!(s, 401);
    let (s, b) = app.post("/acme", Some(SECRET_ACME), &p).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(count(&app.sql(), "SELECT count(*) FROM events"), 1);
}

#[tokio::test]
async fn a_long_read_transaction_does_not_stop_intake() {
    let app = spawn_app().await;
    // A reporting tool holding a read transaction open (WAL: readers never block the writer).
    let reader = app.sql();
    reader.execute_batch("BEGIN").unwrap();
    let before: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    let payloads: Vec<Value> = (0..50)
        .map(|_| {
            let id = app.sim.create(DocType::Job);
            job_payload(&app, &id)
        })
        .collect();
    let report =
        skillsync::simulator::send_webhooks(&app.webhook_url, SECRET_ACME, payloads, 8, None).await;
    assert_eq!(report.acked.len(), 50, "{:?}", report.statuses);
    // The reader still sees its snapshot...
    let during: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(before, during);
    reader.execute_batch("COMMIT").unwrap();
    // ...and the new rows once it ends.
    assert_eq!(count(&reader, "SELECT count(*) FROM events"), 50);
}

#[tokio::test]
async fn healthz_and_metrics_answer() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = app.post("", Some("bad-secret-xx"), &json!({})).await;
    let id = app.sim.create(DocType::Job);
    let _ = app
        .post("", Some(SECRET_ACME), &job_payload(&app, &id))
        .await;
    wait_until(
        Duration::from_secs(10),
        "the job to be mirrored",
        || async { count(&app.sql(), "SELECT count(*) FROM jobs") == 1 },
    )
    .await;
    let metrics_url = app.metrics_url.clone().expect("a metrics listener");
    let text = app
        .client
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "skillsync_webhook_requests_total",
        "outcome=\"unauthorized\"",
        "outcome=\"accepted\"",
        "skillsync_fetch_duration_seconds",
        "skillsync_queue_depth",
        "skillsync_database_size_bytes",
        "skillsync_mirrored_documents",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    let r = app
        .client
        .get(format!("{}/nowhere", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn stop_answers_in_flight_requests_and_returns() {
    let mut app = spawn_app().await;
    let payloads: Vec<Value> = (0..200)
        .map(|_| {
            let id = app.sim.create(DocType::Job);
            job_payload(&app, &id)
        })
        .collect();
    let url = app.webhook_url.clone();
    let sender = tokio::spawn(async move {
        skillsync::simulator::send_webhooks(&url, SECRET_ACME, payloads, 16, None).await
    });
    wait_until(Duration::from_secs(10), "some events to arrive", || async {
        count(&app.sql(), "SELECT count(*) FROM events") > 20
    })
    .await;
    app.stop().await;
    let report = sender.await.unwrap();
    // Whatever was acknowledged is in the database; nothing was half-answered.
    let conn = app.sql();
    for id in &report.acked {
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM events WHERE id = {id}")
            ),
            1
        );
    }
    assert!(!report.acked.is_empty());
}
