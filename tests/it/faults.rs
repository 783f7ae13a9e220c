//! Upstream faults in a mix — 30% 5xx, 429 bursts with `Retry-After`, hangs
//! longer than the client timeout, connection resets, malformed and oversized
//! 2xx bodies — while documents are created, changed and deleted: once the
//! faults stop and the queue drains, the mirror equals the simulator's state
//! exactly, field by field, and no event was lost or left pending.

use std::time::Duration;

use serde_json::Value;
use skillsync::model::DocType;
use skillsync::simulator::Faults;

use crate::helpers::*;

#[tokio::test]
async fn the_mirror_converges_to_upstream_exactly_under_a_fault_mix() {
    let app = spawn_app_with(|c| {
        c.fetch = FetchSettings {
            timeout_secs: Some(1),
            max_document_bytes: Some(2048),
            ..FetchSettings::quick(8, 1000)
        }
    })
    .await;
    let mixed = Faults {
        error_rate: 0.3,
        rate_limit_next: 5,
        retry_after_secs: 1,
        hang_rate: 0.05,
        hang_for: Duration::from_secs(2),
        reset_rate: 0.05,
        malformed_rate: 0.05,
        oversize_rate: 0.05,
        oversize_bytes: 4096,
        ..Faults::default()
    };
    app.sim.set_faults(mixed.clone());
    let jobs = app.sim.seed(DocType::Job, 60);
    let projects = app.sim.seed(DocType::Project, 15);
    let payloads = app.sim.created_payloads(&jobs, &projects);
    let mut acked =
        skillsync::simulator::send_webhooks(&app.webhook_url, SECRET_ACME, payloads, 8, None)
            .await
            .acked
            .len();
    // Changes and deletions while the faults go on, each announced.
    let mut payloads = Vec::new();
    for id in jobs.iter().take(20) {
        app.sim.update(DocType::Job, id);
        payloads.push(app.sim.webhook_payload(DocType::Job, id, "updated"));
    }
    for id in jobs.iter().skip(50) {
        app.sim.delete(DocType::Job, id);
        payloads.push(app.sim.webhook_payload(DocType::Job, id, "updated"));
    }
    app.sim.set_faults(Faults {
        rate_limit_next: 3,
        retry_after_secs: 1,
        ..mixed
    });
    acked += skillsync::simulator::send_webhooks(&app.webhook_url, SECRET_ACME, payloads, 8, None)
        .await
        .acked
        .len();
    assert_eq!(acked, 75 + 30, "every webhook acknowledged");
    // Let the faults bite for a while, then heal upstream.
    wait_until(
        Duration::from_secs(30),
        "some progress under faults",
        || async {
            count(
                &app.sql(),
                "SELECT count(*) FROM events WHERE status = 'done'",
            ) >= 20
        },
    )
    .await;
    let failures = count(
        &app.sql(),
        "SELECT count(*) FROM events WHERE last_error IS NOT NULL",
    );
    app.sim.set_faults(Faults::default());
    wait_until(Duration::from_secs(60), "every event done", || async {
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'done'",
        ) == 105
    })
    .await;
    let conn = app.sql();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE status <> 'done'"),
        0
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM fetch_queue"), 0);
    for ty in DocType::ALL {
        let upstream = app.sim.documents(ty);
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, document FROM {} WHERE deleted_at IS NULL",
                ty.table()
            ))
            .unwrap();
        let mirrored: std::collections::HashMap<String, Value> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .map(|r| {
                let (id, doc) = r.unwrap();
                (id, serde_json::from_str(&doc).unwrap())
            })
            .collect();
        assert_eq!(mirrored.len(), upstream.len(), "{ty}: live rows");
        for (id, doc) in &upstream {
            assert_eq!(
                mirrored.get(id),
                Some(&Value::Object(doc.clone())),
                "{ty} {id} differs from upstream"
            );
        }
    }
    for id in jobs.iter().skip(50) {
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND deleted_at IS NULL")
            ),
            0,
            "a document deleted upstream is not live in the mirror"
        );
    }
    println!(
        "fault mix: 105 events acknowledged, {failures} saw at least one failed fetch, {} upstream GETs, 0 lost",
        app.sim.total_gets()
    );
    assert!(failures > 0, "the faults were exercised");
}
