//! Leases that hold while work waits (issue 24): a fetch's claim carries a
//! fencing token, so a claim that lost its lease settles nothing and a late
//! 404 never marks deleted a document a newer fetch stored; one tenant's
//! slow control checks never hold up another's fetches; a listing that
//! waits out a `Retry-After` longer than the run lock's lease keeps the lock.

use std::time::Duration;

use chrono::Utc;
use skillsync::model::DocType;
use skillsync::reconcile::{Kind, RunError};
use skillsync::simulator::{Faults, Scripted};
use skillsync::store::{FailureResult, FetchFailure, GoneOutcome};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use crate::reconcile::{WAIT, mirror_jobs, reconcile_jobs_now, reconciler, run_jobs};

/// A writable connection to the test's database (beside the daemon's).
fn writable(app: &TestApp) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(&app.db).expect("open the database");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

/// A claim whose lease ran out and was taken over writes nothing: not its
/// 404 (the document stays live), not its failure, not a renewal. And a
/// 404 never marks deleted a document stored after its claim was made.
#[tokio::test]
async fn a_claim_that_lost_its_lease_settles_nothing() {
    let mut app = spawn_app().await;
    app.stop().await;
    let store = app.store.clone();
    let d = app.sim.create(DocType::Job);
    store
        .insert_event(recorded_event(&app.sim, &d))
        .await
        .expect("record");
    // The first claim's lease has already run out when it is made.
    let now = Utc::now();
    let first = store
        .claim("acme".into(), "test-owner".into(), 1, now, now)
        .await
        .expect("claim")
        .pop()
        .expect("d is due");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = claim_now(&store, 1).await.pop().expect("d, lease expired");
    assert_eq!(second.doc_id, d);
    assert_ne!(first.lease, second.lease, "every claim has its own token");
    // A request while the second fetch runs keeps the queue row after it.
    store
        .insert_event(recorded_event(&app.sim, &d))
        .await
        .expect("record");
    claim_now(&store, 1).await;
    assert!(
        !store
            .renew_lease(first.clone(), Utc::now() + chrono::Duration::seconds(60))
            .await
            .expect("renew"),
        "the first claim renewed a lease the second holds"
    );
    store_fetched(&app, second.clone()).await;
    let gone = store
        .finish_gone(first.clone(), Utc::now())
        .await
        .expect("finish_gone");
    assert_eq!(gone, GoneOutcome::Fenced);
    let failed = store
        .finish_failed(
            first.clone(),
            FetchFailure {
                class: skillsync::model::ErrorClass::Server,
                message: "late".into(),
                retry_at: Utc::now() + chrono::Duration::hours(1),
                counts: true,
                max_attempts: 1,
            },
            Utc::now(),
        )
        .await
        .expect("finish_failed");
    assert_eq!(failed, FailureResult::Fenced);
    let conn = app.sql();
    let job = mirror_jobs(&conn).remove(&d).expect("d mirrored");
    assert_eq!(job.deleted_at, None, "a fenced 404 marked d deleted");
    assert_eq!(
        count(
            &conn,
            &format!(
                "SELECT count(*) FROM fetch_queue WHERE doc_id = '{d}' AND status = 'queued' AND last_error IS NULL AND attempts = 0"
            )
        ),
        1,
        "the fenced failure changed the queue row (or the second request was lost)"
    );
    assert_eq!(
        count(&conn, "SELECT count(*) FROM events WHERE status = 'dead'"),
        0
    );

    // A document stored after a claim was made (by any path) outlives that
    // claim's 404.
    let third = claim_now(&store, 1).await.pop().expect("d requested again");
    writable(&app)
        .execute(
            "UPDATE jobs SET fetched_at = '2999-01-01T00:00:00.000Z' WHERE id = ?1",
            [&d],
        )
        .expect("a newer store");
    let gone = store
        .finish_gone(third, Utc::now())
        .await
        .expect("finish_gone");
    assert_eq!(gone, GoneOutcome::Superseded);
    assert_eq!(mirror_jobs(&conn)[&d].deleted_at, None);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM fetch_queue"),
        0,
        "a superseded 404 still settles its claim"
    );
}

/// The reproduction. Tenant beta's every GET answers 404 slowly
/// (a wrong path, an upstream at 0.9 s a request), so its fetches keep
/// control-checking. Job D of tenant acme answers its first GET with a
/// slow 404; D is recreated upstream meanwhile (a webhook), and its next
/// GET answers 200. D must end live, stored once more, however long the
/// first fetch's 404 takes to be judged. Before fencing, D's first fetch
/// waited behind beta's checks on one global lock past its lease; a second
/// claim stored D, and the first fetch's late verdict then marked it
/// deleted.
#[tokio::test]
async fn a_slow_404_then_a_200_never_ends_marked_deleted() {
    let beta_token = CancellationToken::new();
    let beta_sim = start_sim(&beta_token).await;
    beta_sim.set_faults(Faults {
        latency: Duration::from_millis(900),
        ..Faults::default()
    });
    let base = beta_sim.base_url();
    let app = spawn_app_with(|c| {
        c.fetch = FetchSettings::quick(16, 1000);
        c.tenants
            .push(TenantSettings::new("beta", SECRET_BETA, &base));
    })
    .await;
    // acme: D and three others, mirrored by another process (this daemon has
    // served nothing, so D's 404 needs a control check).
    let ids = app.sim.seed(DocType::Job, 4);
    let d = ids[0].clone();
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    // beta: 16 documents to fetch and 3 held live for its control checks,
    // none of which its upstream serves.
    let conn = writable(&app);
    let beta_ids: Vec<String> = (0..19).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for id in &beta_ids {
        conn.execute(
            "INSERT INTO jobs (tenant, id, document, revision, first_seen_at, fetched_at)
             VALUES ('beta', ?1, '{}', 1, '2026-11-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z')",
            [id],
        )
        .expect("a beta job");
    }
    for id in &beta_ids[..16] {
        let (s, _) = app
            .post(
                "",
                Some(SECRET_BETA),
                &beta_sim.webhook_payload(DocType::Job, id, "updated"),
            )
            .await;
        assert_eq!(s, 200);
    }
    // D's first GET: a 404 after 1.5 s. Later GETs serve it.
    app.sim.script_gets(
        DocType::Job,
        &d,
        &[Scripted {
            delay: Duration::from_millis(1500),
            status: 404,
        }],
    );
    let gets_before = app.sim.gets(DocType::Job, &d);
    let (s, _) = app
        .post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Job, &d, "updated"),
        )
        .await;
    assert_eq!(s, 200);
    wait_until(WAIT, "D's first GET sent", || async {
        app.sim.gets(DocType::Job, &d) > gets_before
    })
    .await;
    // Recreated upstream while that GET is answered slowly.
    assert!(app.sim.update(DocType::Job, &d));
    let (s, _) = app
        .post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Job, &d, "created"),
        )
        .await;
    assert_eq!(s, 200);
    let live_and_current = || {
        let job = mirror_jobs(&app.sql()).remove(&d);
        let upstream = app.sim.documents(DocType::Job).remove(&d);
        let stage =
            upstream.and_then(|u| u.get("Stage").and_then(|s| s.as_str().map(String::from)));
        job.is_some_and(|j| j.deleted_at.is_none() && j.stage == stage)
    };
    wait_until(
        Duration::from_secs(90),
        "D stored live at its recreated version, its events settled",
        || async {
            live_and_current()
                && count(
                    &app.sql(),
                    &format!(
                        "SELECT count(*) FROM events WHERE doc_id = '{d}' AND status = 'pending'"
                    ),
                ) == 0
                && count(
                    &app.sql(),
                    &format!("SELECT count(*) FROM fetch_queue WHERE doc_id = '{d}'"),
                ) == 0
        },
    )
    .await;
    // The first fetch's verdict may still be on its way: D stays live.
    // (Before fencing it landed about 10 s after D was stored.)
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < until {
        assert!(
            live_and_current(),
            "D, served upstream, was marked deleted by a late 404: {:?}",
            mirror_jobs(&app.sql()).remove(&d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        app.sim.gets(DocType::Job, &d) - gets_before >= 2,
        "D was fetched again after its 404"
    );
    beta_token.cancel();
}

/// A listing page answered 429 with a `Retry-After` longer than the run
/// lock's lease: the run keeps its lock while it waits (a second run is
/// refused as busy) and then finishes. Before, the lock was renewed only
/// when a page answered, so the second run took it and the first failed
/// with "lost the run lock".
#[tokio::test]
async fn a_listing_waiting_out_a_long_retry_after_keeps_its_run_lock() {
    let app = spawn_app().await;
    app.sim.seed(DocType::Job, 3);
    let first = reconciler(&app).with_lock_lease(Duration::from_secs(2));
    app.sim.set_faults(Faults {
        rate_limit_next: 1,
        retry_after_secs: 6,
        ..Faults::default()
    });
    let run = tokio::spawn(async move { run_jobs(&first, Kind::Incremental, false).await });
    wait_until(WAIT, "the first page answered 429", || async {
        app.sim.listing_calls() >= 1
    })
    .await;
    // Past the 2 s lease, well inside the 6 s wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.sim.listing_calls(), 1, "the page was retried early");
    let second = reconciler(&app)
        .run(
            "acme",
            DocType::Job,
            Kind::Incremental,
            false,
            &CancellationToken::new(),
        )
        .await;
    assert!(
        matches!(second, Err(RunError::Busy(..))),
        "a second run got the lock while the first waited out Retry-After: {:?}",
        second.map(|s| (s.status, s.error))
    );
    let s = run.await.expect("first run");
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(s.counts.listed, 3);
}
