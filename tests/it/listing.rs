//! Reconciliation against an imperfect upstream: edits between listing
//! pages inside a tie group, a server-side page cap, a listing that lags the
//! single-document GETs, 429 and 503 on listing pages, a document dated in
//! the future, a run that loses its lock, and every GET answering 404 (a
//! wrong path). Plus a randomised check: edits, creations and deletions at
//! random pages, random page sizes and tie groups, and afterwards the
//! mirror equals upstream with no live document ever marked deleted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use skillsync::model::DocType;
use skillsync::reconcile::{Kind, Reconciler};
use skillsync::simulator::{Faults, Simulator};

use crate::helpers::*;
use crate::reconcile::{
    WAIT, all_jobs_mirrored, last_job_run, mirror_jobs, reconcile_jobs_now, reconciler, run_jobs,
    sim_jobs, wait_all_jobs_mirrored, watermark,
};

/// Waits until acme has no queued fetch and no pending event.
async fn wait_queue_drained(app: &TestApp) {
    wait_until(WAIT, "every queued fetch of acme settled", || async {
        let c = app.sql();
        count(
            &c,
            "SELECT count(*) FROM fetch_queue WHERE tenant = 'acme' AND status = 'queued'",
        ) == 0
            && count(
                &c,
                "SELECT count(*) FROM events WHERE tenant = 'acme' AND status = 'pending'",
            ) == 0
    })
    .await;
}

/// A daemon and a reconciler for it, with `n` jobs upstream already listed
/// and mirrored; returns their ids too.
async fn app_with_mirrored_jobs(n: usize) -> (TestApp, Reconciler, Vec<String>) {
    let app = spawn_app().await;
    let rec = reconciler(&app);
    let ids = app.sim.seed(DocType::Job, n);
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    (app, rec, ids)
}

/// Jobs the mirror holds deleted although upstream still serves them.
fn live_jobs_marked_deleted(app: &TestApp) -> Vec<String> {
    let live = app.sim.ids(DocType::Job);
    mirror_jobs(&app.sql())
        .into_iter()
        .filter(|(id, r)| r.deleted_at.is_some() && live.contains(id))
        .map(|(id, _)| id)
        .collect()
}

/// `n` new jobs, sorted the way the listing orders ids at one time.
fn sorted_jobs(sim: &Simulator, n: usize) -> Vec<String> {
    let mut ids = sim.seed(DocType::Job, n);
    ids.sort();
    ids
}

#[tokio::test]
async fn jobs_edited_right_after_their_page_do_not_make_a_sweep_skip_their_tie_group() {
    let app = spawn_app_with(|c| c.upstream.page_size = Some(3)).await;
    let rec = reconciler(&app);
    // x at T0, then a tie group of six at T (a b | c d e f), then y.
    let ids = sorted_jobs(&app.sim, 8);
    let t = "2026-11-10T09:00:00.000Z";
    let (x, tie, y) = (&ids[0], &ids[1..7], &ids[7]);
    assert!(
        app.sim
            .set_modified_on(DocType::Job, x, "2026-11-10T08:00:00.000Z")
    );
    for id in tie {
        assert!(app.sim.set_modified_on(DocType::Job, id, t));
    }
    assert!(
        app.sim
            .set_modified_on(DocType::Job, y, "2026-11-10T10:00:00.000Z")
    );
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;

    // Page 1 is [x a b]; right after it is served, a and b are edited and
    // leave the tie group. Paging by "skip the two already read at T" then
    // jumped over c and d.
    let (a, b) = (tie[0].clone(), tie[1].clone());
    app.sim.on_listing_page(Some(Arc::new(move |sim, page| {
        if page == 1 {
            sim.update(DocType::Job, &a);
            sim.update(DocType::Job, &b);
        }
    })));
    let s = run_jobs(&rec, Kind::Full, true).await;
    app.sim.on_listing_page(None);
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(s.counts.candidates, 0, "the listing skipped jobs: {s:?}");
    wait_queue_drained(&app).await;
    assert_eq!(live_jobs_marked_deleted(&app), Vec::<String>::new());

    // The edited ones are caught by the next incremental run.
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    assert_eq!(live_jobs_marked_deleted(&app), Vec::<String>::new());
}

#[tokio::test]
async fn a_tie_group_larger_than_a_page_is_listed_whole_while_it_shrinks() {
    let app = spawn_app_with(|c| c.upstream.page_size = Some(2)).await;
    let rec = reconciler(&app);
    let ids = sorted_jobs(&app.sim, 9);
    for id in &ids {
        assert!(
            app.sim
                .set_modified_on(DocType::Job, id, "2026-11-10T09:00:00.000Z")
        );
    }
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    // Each page edits the first job of the tie it read: the group shrinks
    // from its front while the sweep pages through it.
    let order = ids.clone();
    app.sim.on_listing_page(Some(Arc::new(move |sim, page| {
        if let Some(id) = order.get(2 * (page as usize - 1)) {
            sim.update(DocType::Job, id);
        }
    })));
    let s = run_jobs(&rec, Kind::Full, true).await;
    app.sim.on_listing_page(None);
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(s.counts.candidates, 0, "{s:?}");
    wait_queue_drained(&app).await;
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    assert_eq!(live_jobs_marked_deleted(&app), Vec::<String>::new());
}

#[tokio::test]
async fn a_server_page_cap_does_not_end_the_listing() {
    let app = spawn_app_with(|c| c.acme().max_delete_fraction = Some(1.0)).await;
    let rec = reconciler(&app);
    app.sim.seed(DocType::Job, 10);
    // Asked for 500 a page, the server answers 3 (totalCount says 10).
    app.sim.set_faults(Faults {
        page_cap: Some(3),
        ..Faults::default()
    });
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!((s.status, s.counts.listed), ("ok", 10), "{s:?}");
    wait_all_jobs_mirrored(&app).await;

    let new = app.sim.create(DocType::Job);
    let s = run_jobs(&rec, Kind::Full, false).await;
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!((s.counts.listed, s.counts.candidates), (11, 0), "{s:?}");
    wait_all_jobs_mirrored(&app).await;
    assert!(mirror_jobs(&app.sql()).contains_key(&new));
    assert_eq!(live_jobs_marked_deleted(&app), Vec::<String>::new());
}

#[tokio::test]
async fn a_listing_that_lags_gets_cannot_delete_a_job_it_does_not_show_yet() {
    let (app, rec, seeded) = app_with_mirrored_jobs(5).await;

    // The listing's read path lags: a job created and announced now is
    // served by GET but missing from the listing.
    app.sim.freeze_listing();
    let (fresh, status, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(status, 200);
    wait_all_jobs_mirrored(&app).await;
    let gone = seeded[0].clone();
    assert!(app.sim.delete(DocType::Job, &gone));
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let s = run_jobs(&rec, Kind::Full, true).await;
    assert_eq!(s.status, "ok", "{s:?}");
    // The frozen listing still shows `gone` and lacks `fresh`.
    assert_eq!(s.counts.candidates, 1, "{s:?}");
    wait_queue_drained(&app).await;
    let mirror = mirror_jobs(&app.sql());
    assert!(
        mirror[&fresh].deleted_at.is_none(),
        "a GET that serves the job keeps it live: {:?}",
        mirror[&fresh]
    );
    assert_eq!(last_job_run(&app.sql()).marked_deleted, 0);

    // Once the listing catches up the sweep finds the real deletion.
    app.sim.thaw_listing();
    let s = run_jobs(&rec, Kind::Full, true).await;
    assert_eq!(s.counts.candidates, 1, "{s:?}");
    wait_until(WAIT, "the real deletion confirmed", || async {
        last_job_run(&app.sql()).marked_deleted == 1
    })
    .await;
    assert!(mirror_jobs(&app.sql())[&gone].deleted_at.is_some());
    assert_eq!(live_jobs_marked_deleted(&app), Vec::<String>::new());
}

#[tokio::test]
async fn a_429_and_a_short_outage_are_retried_at_the_failed_page() {
    let app = spawn_app_with(|c| c.upstream.page_size = Some(3)).await;
    let rec = reconciler(&app);
    app.sim.seed(DocType::Job, 10);
    let before = app.sim.listing_calls();
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!(s.status, "ok", "{s:?}");
    let clean_calls = app.sim.listing_calls() - before;
    wait_all_jobs_mirrored(&app).await;

    // The first listing call gets 429 (Retry-After: 1); after page 2 the
    // listing answers 503 three times.
    app.sim.set_faults(Faults {
        rate_limit_next: 1,
        retry_after_secs: 1,
        ..Faults::default()
    });
    app.sim.on_listing_page(Some(Arc::new(|sim, page| {
        if page == 2 {
            let mut f = sim.faults();
            f.listing_error_next = 3;
            sim.set_faults(f);
        }
    })));
    app.sim.update(DocType::Job, &app.sim.ids(DocType::Job)[4]);
    let before = app.sim.listing_calls();
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    app.sim.on_listing_page(None);
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(
        app.sim.listing_calls() - before,
        clean_calls + 4,
        "each failed page was asked again, nothing else"
    );
    assert_eq!((s.counts.listed, s.counts.missed), (10, 1), "{s:?}");
    wait_all_jobs_mirrored(&app).await;
}

#[tokio::test]
async fn a_listing_failing_past_its_retry_budget_fails_with_the_page_reached() {
    let app = spawn_app_with(|c| {
        c.upstream.page_size = Some(3);
        c.upstream.listing_retry_secs = Some(2);
    })
    .await;
    let rec = reconciler(&app);
    app.sim.seed(DocType::Job, 7);
    app.sim.set_faults(Faults {
        listing_error_rate: 1.0,
        ..Faults::default()
    });
    let before = app.sim.listing_calls();
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!(s.status, "failed", "{s:?}");
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains("listing failed at page 1"), "{error}");
    assert!(
        app.sim.listing_calls() - before >= 2,
        "the page was retried before the run failed"
    );
    assert_eq!(watermark(&app.sql()), None);
}

#[tokio::test]
async fn a_job_dated_in_the_future_does_not_blind_later_runs() {
    let (app, rec, ids) = app_with_mirrored_jobs(5).await;

    assert!(
        app.sim
            .set_modified_on(DocType::Job, &ids[0], "2096-01-01T00:00:00.000Z")
    );
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!((s.status, s.counts.missed), ("ok", 1), "{s:?}");
    wait_all_jobs_mirrored(&app).await;
    let now = skillsync::model::now_ts();
    let w = watermark(&app.sql()).expect("a watermark");
    assert!(w <= now, "watermark {w} is after now {now}");

    // A real change later, with no webhook: the next run finds it.
    assert!(app.sim.update(DocType::Job, &ids[3]));
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!((s.status, s.counts.missed), ("ok", 1), "{s:?}");
    wait_all_jobs_mirrored(&app).await;
    let complete: Option<String> = app
        .sql()
        .query_row(
            "SELECT complete_as_of FROM sync_status WHERE tenant = 'acme' AND doc_type = 'job'",
            [],
            |r| r.get(0),
        )
        .expect("sync_status row");
    let now = skillsync::model::now_ts();
    assert!(
        complete.as_deref().is_some_and(|c| c <= now.as_str()),
        "{complete:?} vs {now}"
    );
}

#[tokio::test]
async fn a_run_that_loses_its_lock_stops_and_advances_nothing() {
    let app = spawn_app_with(|c| c.upstream.page_size = Some(3)).await;
    let rec = reconciler(&app);
    app.sim.seed(DocType::Job, 9);
    let db = app.db.clone();
    // When page 2 is served, another process takes the lock over (as after
    // an expiry).
    app.sim.on_listing_page(Some(Arc::new(move |_, page| {
        if page == 2 {
            let c = rusqlite::Connection::open(&db).expect("open db");
            c.busy_timeout(std::time::Duration::from_secs(5))
                .expect("busy timeout");
            c.execute(
                "UPDATE sync_state SET lock_owner = 'another-process' WHERE tenant = 'acme' AND doc_type = 'job'",
                [],
            )
            .expect("take the lock");
        }
    })));
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    app.sim.on_listing_page(None);
    assert_eq!(s.status, "failed", "{s:?}");
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("lost the run lock")),
        "{s:?}"
    );
    assert_eq!(
        watermark(&app.sql()),
        None,
        "a run without its lock advanced the watermark"
    );
    let row = last_job_run(&app.sql());
    assert_eq!(row.status, "failed", "{row:?}");
    assert!(
        row.enqueued < 9,
        "pages after the loss were queued: {row:?}"
    );
    // What it counted is what it queued: the daemon fetches exactly those.
    wait_queue_drained(&app).await;
    assert_eq!(
        mirror_jobs(&app.sql()).len() as i64,
        row.enqueued,
        "{row:?}"
    );
    let owner: String = app
        .sql()
        .query_row(
            "SELECT lock_owner FROM sync_state WHERE tenant = 'acme' AND doc_type = 'job'",
            [],
            |r| r.get(0),
        )
        .expect("lock row");
    assert_eq!(
        owner, "another-process",
        "the loser released a lock it did not hold"
    );
}

#[tokio::test]
async fn every_get_answering_404_does_not_empty_the_mirror() {
    let mut app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 10);
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    app.stop().await;

    // A wrong job_path: every GET answers 404. Three changes, one real deletion.
    for id in &ids[..3] {
        assert!(app.sim.update(DocType::Job, id));
    }
    assert!(app.sim.delete(DocType::Job, &ids[9]));
    let mut wrong = app.settings.clone();
    wrong.upstream.job_path = Some("/api/wrong/{id}".into());
    let wrong = wrong.config();
    for kind in [Kind::Incremental, Kind::Full] {
        skillsync::cli::reconcile_now(
            Arc::new(wrong.clone()),
            Some("acme".into()),
            vec![DocType::Job],
            kind,
            false,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("reconcile_now");
    }
    let mirror = mirror_jobs(&app.sql());
    let deleted: Vec<&String> = mirror
        .iter()
        .filter(|(_, r)| r.deleted_at.is_some())
        .map(|(id, _)| id)
        .collect();
    assert!(
        deleted.is_empty(),
        "404s from a wrong path deleted {deleted:?}"
    );
    let suspect = count(
        &app.sql(),
        "SELECT count(*) FROM fetch_queue WHERE tenant = 'acme' AND last_error_class = 'unconfirmed_gone'",
    );
    assert_eq!(suspect, 4, "three changes and the candidate held");

    // status says so, with a non-zero exit.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["status", "--config"])
        .arg(&app.config_path)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("answered 404"), "{stdout}");
}

/// One randomised case: documents with few distinct times (tie groups), a
/// random page size, and an edit, creation or deletion after random pages
/// of a full sweep. Returns a description for failures.
async fn random_case(seed: u64) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let page_size = rng.usize(1..=5);
    let app = spawn_app_with(|c| {
        c.upstream.page_size = Some(page_size as u64);
        c.acme().max_delete_fraction = Some(1.0);
    })
    .await;
    let rec = reconciler(&app);
    let n = rng.usize(4..=24);
    let times: Vec<String> = (0..rng.usize(1..=4))
        .map(|i| format!("2026-11-10T09:00:0{i}.000Z"))
        .collect();
    let ids = app.sim.seed(DocType::Job, n);
    for id in &ids {
        app.sim
            .set_modified_on(DocType::Job, id, &times[rng.usize(..times.len())]);
    }
    // Mirrored by the daemon's own fetcher, so it knows GETs are being
    // served and trusts the sweep's 404s without control GETs.
    assert_eq!(run_jobs(&rec, Kind::Incremental, false).await.status, "ok");
    wait_all_jobs_mirrored(&app).await;
    // Some deletions before the sweep: real candidates.
    for id in &ids {
        if rng.f64() < 0.1 {
            app.sim.delete(DocType::Job, id);
        }
    }
    let gets_before: HashMap<String, u64> = ids
        .iter()
        .map(|id| (id.clone(), app.sim.gets(DocType::Job, id)))
        .collect();
    let touched: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut plan: Vec<(u64, u8)> = Vec::new();
    for p in 1..=20 {
        if rng.f64() < 0.5 {
            plan.push((p, rng.u8(0..4)));
        }
    }
    let hook_touched = touched.clone();
    let hook_times = times.clone();
    let pick = Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed));
    app.sim.on_listing_page(Some(Arc::new(move |sim, page| {
        let Ok(mut r) = pick.lock() else { return };
        for (_, action) in plan.iter().filter(|(p, _)| *p == page) {
            let live = sim.ids(DocType::Job);
            if live.is_empty() {
                continue;
            }
            let id = live[r.usize(..live.len())].clone();
            match action {
                0 => {
                    sim.update(DocType::Job, &id);
                }
                1 => {
                    let new = sim.create(DocType::Job);
                    if let Ok(mut t) = hook_touched.lock() {
                        t.insert(new);
                    }
                    continue;
                }
                2 => {
                    sim.delete(DocType::Job, &id);
                }
                _ => {
                    // An edit that lands in the latest tie group (a
                    // ModifiedOn never moves backwards upstream).
                    let last = hook_times.last().cloned().unwrap_or_default();
                    let earlier = sim
                        .documents(DocType::Job)
                        .into_iter()
                        .filter(|(_, d)| {
                            d.get("ModifiedOn").and_then(|v| v.as_str()) < Some(last.as_str())
                        })
                        .map(|(id, _)| id)
                        .next();
                    let Some(id) = earlier else { continue };
                    sim.set_modified_on(DocType::Job, &id, &last);
                    if let Ok(mut t) = hook_touched.lock() {
                        t.insert(id);
                    }
                    continue;
                }
            }
            if let Ok(mut t) = hook_touched.lock() {
                t.insert(id);
            }
        }
    })));
    let s = run_jobs(&rec, Kind::Full, false).await;
    app.sim.on_listing_page(None);
    let why = format!("seed {seed}, page size {page_size}, {n} jobs, times {times:?}: {s:?}");
    if s.status != "ok" {
        return Err(format!("sweep not ok: {why}"));
    }
    wait_queue_drained(&app).await;
    // A stable job (never touched, never deleted) is neither a candidate nor refetched.
    let touched = touched.lock().map(|t| t.clone()).unwrap_or_default();
    let live = app.sim.ids(DocType::Job);
    for id in &ids {
        if !touched.contains(id)
            && live.contains(id)
            && app.sim.gets(DocType::Job, id) != gets_before[id]
        {
            return Err(format!("stable job {id} was fetched by the sweep: {why}"));
        }
    }
    let wrong = live_jobs_marked_deleted(&app);
    if !wrong.is_empty() {
        return Err(format!("live jobs marked deleted {wrong:?}: {why}"));
    }
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    // Jobs deleted during the sweep are found by the next one.
    let s2 = run_jobs(&rec, Kind::Full, false).await;
    if s2.status != "ok" {
        return Err(format!("second sweep not ok {s2:?}: {why}"));
    }
    wait_queue_drained(&app).await;
    let mirror = mirror_jobs(&app.sql());
    let upstream = sim_jobs(&app.sim);
    if !all_jobs_mirrored(&app.sim, &app.sql()) {
        return Err(format!("mirror differs from upstream: {why}"));
    }
    for (id, row) in &mirror {
        if !upstream.contains_key(id) && row.deleted_at.is_none() {
            return Err(format!(
                "job {id} deleted upstream is live in the mirror: {why}"
            ));
        }
    }
    let wrong = live_jobs_marked_deleted(&app);
    if !wrong.is_empty() {
        return Err(format!("live jobs marked deleted {wrong:?}: {why}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edits_during_paged_sweeps_leave_mirror_equal_to_upstream() {
    let cases: u64 = std::env::var("LISTING_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let base = fastrand::u64(..);
    for i in 0..cases {
        if let Err(e) = random_case(base.wrapping_add(i)).await {
            panic!("{e}");
        }
    }
}

/// The fields of the JSON log lines about untrusted 404s in `log`.
fn unconfirmed_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not trusted"))
        })
        .collect()
}

/// A tenant whose every GET answers 404 (a wrong path as upstream sees it)
/// while the mirror holds live documents: each fetch's 404 is held back,
/// but the log gets one line per tenant and type per interval with a count
/// (here the first, and the rest when the process stops), not one per
/// fetch; and one control check answers for the storm, not three GETs per
/// fetch. Before, every fetch logged an ERROR line and made its own
/// control GETs.
#[tokio::test]
async fn a_storm_of_untrusted_404s_logs_one_line_per_interval_with_a_count() {
    let mut app = spawn_app().await;
    let ids = app.sim.seed(DocType::Job, 10);
    assert!(reconcile_jobs_now(&app, Kind::Incremental, false).await);
    wait_all_jobs_mirrored(&app).await;
    app.stop().await;
    // Six change; four stay unchanged for the control checks.
    for id in &ids[..6] {
        assert!(app.sim.update(DocType::Job, id));
    }
    app.sim.set_faults(Faults {
        all_gone: true,
        ..Faults::default()
    });
    let gets_before = app.sim.total_gets();
    // `reconcile` lists the six changes and fetches each until it is dead
    // (FetchSettings::fast: 3 attempts), then exits.
    let (child, log) = spawn_logging(
        std::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
            .args(["--log-format", "json", "--config"])
            .arg(&app.config_path)
            .args(["reconcile", "--tenant", "acme", "--type", "job"])
            .env("RUST_LOG", "info"),
    );
    // Waited for off the runtime: the simulator answers on it.
    let (out, log) = tokio::task::spawn_blocking(move || {
        (
            child.wait_with_output().expect("reconcile ran"),
            log.join().expect("log"),
        )
    })
    .await
    .expect("reconcile waited for");
    assert!(out.status.code().is_some(), "{log}");
    let untrusted = count(
        &app.sql(),
        "SELECT count(*) FROM fetch_queue WHERE tenant = 'acme' AND last_error_class = 'unconfirmed_gone'",
    );
    assert_eq!(untrusted, 6, "every change held back: {log}");
    let lines = unconfirmed_lines(&log);
    assert!(
        (1..=2).contains(&lines.len()),
        "{} lines about untrusted 404s for 18 fetches:\n{log}",
        lines.len()
    );
    let counted: u64 = lines
        .iter()
        .map(|l| l["fields"]["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        counted, 18,
        "the lines count every untrusted 404: {lines:?}"
    );
    assert!(lines.iter().all(|l| l["fields"]["tenant"] == "acme"
        && l["fields"]["doc_type"] == "job"
        && l["level"] == "ERROR"));
    // 18 fetches, and one control check of three GETs (far from 3 per fetch).
    let gets = app.sim.total_gets() - gets_before;
    assert!(
        (18..=21).contains(&gets),
        "{gets} GETs for 18 fetches of documents that all answer 404"
    );
}

/// A listing page larger than its `take` can explain (rows padded with
/// 1 MiB each: a hostile or broken server) is refused before it is parsed;
/// the run fails saying why. A padded page within the bound is parsed, its
/// padding skipped.
#[tokio::test]
async fn a_listing_page_too_large_for_its_take_is_refused() {
    let app = spawn_app_with(|c| c.upstream.listing_retry_secs = Some(1)).await;
    let rec = reconciler(&app);
    app.sim.seed(DocType::Job, 3);
    app.sim.set_faults(Faults {
        listing_row_padding: 1 << 20,
        ..Faults::default()
    });
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!(s.status, "failed", "{s:?}");
    let error = s.error.unwrap_or_default();
    assert!(
        error.contains("listing page (take 500) larger than"),
        "{error}"
    );
    assert_eq!(count(&app.sql(), "SELECT count(*) FROM fetch_queue"), 0);

    app.sim.set_faults(Faults {
        listing_row_padding: 1024,
        ..Faults::default()
    });
    let s = run_jobs(&rec, Kind::Incremental, false).await;
    assert_eq!(s.status, "ok", "{s:?}");
    assert_eq!(s.counts.listed, 3);
    wait_all_jobs_mirrored(&app).await;
}
