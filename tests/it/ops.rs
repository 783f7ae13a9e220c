//! Operations: retention prunes old `done`/`ignored` events and old history
//! in small batches (never pending work, never a document's latest revision),
//! while intake goes on. Upgrades from older schema versions, with databases
//! their binaries wrote, are in `upgrade`.

use std::time::Duration;

use skillsync::model::DocType;

use crate::helpers::*;

#[tokio::test]
async fn retention_prunes_old_rows_only() {
    let app = spawn_app().await;
    let id = app.sim.create(DocType::Job);
    for _ in 0..3 {
        app.sim.update(DocType::Job, &id);
        app.post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Job, &id, "updated"),
        )
        .await;
        wait_until(Duration::from_secs(10), "settled", || async {
            count(
                &app.sql(),
                "SELECT count(*) FROM events WHERE status = 'pending'",
            ) == 0
        })
        .await;
    }
    let revisions = count(&app.sql(), "SELECT count(*) FROM document_history");
    assert!(revisions >= 2, "several revisions: {revisions}");
    // Age everything by a year, then add old rows of every status.
    {
        let w = rusqlite::Connection::open(&app.db).unwrap();
        w.busy_timeout(Duration::from_secs(5)).unwrap();
        w.execute_batch(
            "UPDATE events SET received_at = '2025-01-01T00:00:00.000Z';
             UPDATE document_history SET fetched_at = '2025-01-01T00:00:00.000Z';
             INSERT INTO events (tenant, received_at, action, status, payload) SELECT 'acme', '2025-01-01T00:00:00.000Z', 'test', 'ignored', '{}' FROM events LIMIT 1;
             INSERT INTO events (tenant, received_at, action, doc_type, doc_id, status, payload) VALUES ('acme', '2025-01-01T00:00:00.000Z', 'created', 'job', 'x', 'dead', '{}');",
        )
        .unwrap();
    }
    let done_before = count(
        &app.sql(),
        "SELECT count(*) FROM events WHERE status IN ('done', 'ignored')",
    );
    assert!(done_before >= 4);
    // A fresh event stays.
    let fresh = app.sim.create(DocType::Job);
    app.post(
        "",
        Some(SECRET_ACME),
        &app.sim.webhook_payload(DocType::Job, &fresh, "created"),
    )
    .await;
    let mut config = app.config.clone();
    config.retention.history_days = 30;
    let (events, history) =
        skillsync::retention::prune_once(&app.store, &config, &Default::default()).await;
    assert_eq!(events as i64, done_before);
    assert_eq!(history as i64, revisions - 1, "all but the latest revision");
    let conn = app.sql();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE status = 'dead'"),
        1,
        "dead events are kept for the operator"
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM events WHERE received_at > '2026-01-01'"
        ),
        1,
        "recent events kept"
    );
    assert_eq!(
        count(
            &conn,
            &format!(
                "SELECT count(*) FROM document_history WHERE id = '{id}' AND revision = (SELECT revision FROM jobs WHERE id = '{id}')"
            )
        ),
        1,
        "the latest revision is never pruned"
    );
}

/// `fetch_covered` rows are kept while a recorded event they cover still
/// waits in the inbox, and pruned once none can need them.
#[tokio::test]
async fn fetch_covered_rows_are_pruned_only_once_no_recorded_event_needs_them() {
    let mut app = spawn_app().await;
    app.stop().await; // no fetcher: the test moves events itself
    let id = app.sim.create(DocType::Job);
    let store = app.store.clone();
    store
        .insert_event(recorded_event(&app.sim, &id))
        .await
        .expect("first event");
    let second = store
        .insert_event(recorded_event(&app.sim, &id))
        .await
        .expect("second event");
    // One slot: the first event moves, the fetch covers both.
    let c = claim_now(&store, 1).await;
    assert_eq!((c.len(), c[0].max_event), (1, second));
    store_fetched(&app, c[0].clone()).await;
    let covered = || count(&app.sql(), "SELECT count(*) FROM fetch_covered");
    assert_eq!(covered(), 1);
    assert_eq!(
        store.prune_fetch_covered(500).await.expect("prune"),
        0,
        "the second event still waits and is covered by the row"
    );
    assert_eq!(covered(), 1);
    // The second event leaves the inbox, settled by the covering fetch.
    assert!(
        claim_now(&store, 1).await.is_empty(),
        "no new fetch for a covered event"
    );
    assert_eq!(
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'done'"
        ),
        2
    );
    assert_eq!(store.prune_fetch_covered(500).await.expect("prune"), 1);
    assert_eq!(covered(), 0);
}
