//! Operations: retention prunes old `done`/`ignored` events and old history
//! in small batches (never pending work, never a document's latest revision),
//! while intake goes on; a database of an older schema version is upgraded
//! at start-up without losing its pending work.

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

/// A database written by schema version 1 (where recording an event also
/// queued its document) is upgraded at start-up: its rows count as queued,
/// and its pending work still finishes.
#[tokio::test]
async fn a_version_1_database_is_upgraded_and_its_pending_work_finishes() {
    skillsync::upstream::install_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let sim_token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&sim_token).await;
    let id = sim.create(DocType::Job);
    {
        let c = rusqlite::Connection::open(&db).expect("create v1 database");
        c.execute_batch(include_str!("../../schema.sql"))
            .expect("schema v1");
        c.pragma_update(None, "user_version", 1).expect("version 1");
        let payload = sim
            .webhook_payload(DocType::Job, &id, "created")
            .to_string();
        c.execute(
            "INSERT INTO events (tenant, received_at, action, doc_type, doc_id, status, next_attempt_at, payload)
             VALUES ('acme', '2026-01-01T00:00:00.000Z', 'created', 'job', ?1, 'pending', '2026-01-01T00:00:00.000Z', ?2)",
            rusqlite::params![id, payload],
        )
        .expect("pending v1 event");
        c.execute(
            "INSERT INTO fetch_queue (tenant, doc_type, doc_id, reason, requested_at, status, next_attempt_at)
             VALUES ('acme', 'job', ?1, 'webhook', '2026-01-01T00:00:00.000Z', 'queued', '2026-01-01T00:00:00.000Z')",
            [&id],
        )
        .expect("its v1 queue row");
    }

    // The upgrade alone (no fetcher yet): version-1 rows count as queued,
    // so none of them goes back through the inbox.
    {
        let store =
            skillsync::store::Store::open(&db, Duration::from_secs(5)).expect("open and migrate");
        drop(store);
        let c = rusqlite::Connection::open(&db).expect("open");
        let version: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, skillsync::store::SCHEMA_VERSION);
        assert_eq!(count(&c, "SELECT count(*) FROM events WHERE queued = 0"), 0);
        assert_eq!(count(&c, "SELECT count(*) FROM events WHERE queued = 1"), 1);
        assert_eq!(count(&c, "SELECT count(*) FROM fetch_covered"), 0);
        let index: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'events_by_document'",
                [],
                |r| r.get(0),
            )
            .expect("the index");
        assert!(index.contains("WHERE queued = 1"), "{index}");
    }

    let toml = config_toml(&db, &sim.base_url(), FAST_FETCH, "");
    let config = skillsync::config::Config::from_toml(&toml, None).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let token = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(skillsync::run(config, listener, token.clone()));
    let sql = || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db")
    };
    wait_until(
        Duration::from_secs(30),
        "the v1 event to be settled",
        || async { count(&sql(), "SELECT count(*) FROM events WHERE status = 'done'") == 1 },
    )
    .await;
    token.cancel();
    handle.await.expect("daemon task").expect("daemon ok");
    sim_token.cancel();

    let conn = sql();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, skillsync::store::SCHEMA_VERSION);
    assert_eq!(version, 6);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('events_recorded_by_document', 'upstream_throttling', 'fetch_queue_due_webhooks')"
        ),
        3,
        "the upgrade ran every migration up to the last one"
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE queued = 1"),
        1
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM fetch_queue"), 0);
    assert_eq!(
        count(
            &conn,
            &format!("SELECT count(*) FROM jobs WHERE tenant = 'acme' AND id = '{id}'")
        ),
        1
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
