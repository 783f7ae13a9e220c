//! The per-tenant request budget, measured where it matters: at the
//! upstream. The simulator logs when each request arrived (and whether it
//! answered 429); the assertions are on those counts per 1 s window and on
//! the share of 429s, never on how long a run took (durations are in
//! BENCHMARKS.md, from `benches/budget.rs`, with 600 jobs; these runs are
//! scaled down to keep the suite quick, with the same rate bounds).
//!
//! Covers: a configured budget holding every second to rate + burst; a
//! throttling upstream with no budget seeing few 429s, which `status` and
//! `/metrics` then report; two tenants throttled by their own upstreams
//! keeping their own pace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use skillsync::config::Config;
use skillsync::model::{DocType, RunKind};
use skillsync::simulator::{Faults, SimCredentials, SimRequest, Simulator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Fetch settings of the budget tests: the default concurrency, quick retries.
fn budget_fetch() -> FetchSettings {
    FetchSettings {
        concurrency: Some(8),
        timeout_secs: Some(5),
        max_attempts: Some(5),
        retry_initial_secs: Some(1),
        retry_max_secs: Some(2),
        max_document_bytes: None,
    }
}

/// A simulator for tenant `name`'s own account.
async fn sim_for(name: &str, token: &CancellationToken) -> Simulator {
    setup();
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    Simulator::start(
        l,
        SimCredentials {
            app_tenant: format!("{name}-tenant"),
            app_id: "acme-app".into(),
            app_secret: APP_SECRET.into(),
        },
        token.clone(),
    )
    .expect("start simulator")
}

/// Tenant `name` on `sim`, with its own account's credentials.
fn tenant(name: &str, sim: &Simulator) -> TenantSettings {
    let mut t = TenantSettings::new(name, &format!("{name}-webhook-secret"), &sim.base_url());
    t.app_tenant = format!("{name}-tenant");
    t
}

/// A config for `tenants` on a database in `dir`, no metrics listener.
/// Tenant names are unique per test: the metrics recorder is per process.
fn config(dir: &tempfile::TempDir, tenants: Vec<TenantSettings>) -> (Config, std::path::PathBuf) {
    let mut c = TestConfig::new(&dir.path().join("skillsync.db"), "http://127.0.0.1:9");
    c.server.metrics_listen = "off".into();
    c.fetch = budget_fetch();
    c.tenants = tenants;
    let path = dir.path().join("skillsync.toml");
    c.write(&path);
    (c.config(), path)
}

/// Requests per 1 s window from the first request on (the last window may
/// be partial).
fn per_second(reqs: &[SimRequest]) -> Vec<usize> {
    let Some(first) = reqs.first().map(|r| r.at) else {
        return Vec::new();
    };
    let mut bins = Vec::new();
    for r in reqs {
        let i = r.at.saturating_duration_since(first).as_secs() as usize;
        if bins.len() <= i {
            bins.resize(i + 1, 0);
        }
        bins[i] += 1;
    }
    bins
}

fn throttled_share(reqs: &[SimRequest]) -> f64 {
    reqs.iter().filter(|r| r.throttled).count() as f64 / reqs.len().max(1) as f64
}

/// One `skillsync reconcile` of jobs (in process): listing, then the fetches.
async fn reconcile_jobs(config: &Config) {
    let ok = skillsync::cli::reconcile_now(
        Arc::new(config.clone()),
        None,
        vec![DocType::Job],
        RunKind::Incremental,
        false,
        CancellationToken::new(),
    )
    .await
    .expect("reconcile");
    assert!(ok, "the reconciliation did not end ok");
}

async fn mirrored_jobs(config: &Config, tenant: &str) -> i64 {
    let store = skillsync::app::open_store(config, skillsync::store::ReportRole::Follower)
        .await
        .expect("open store");
    let rows = store.status().await.expect("status");
    rows.iter()
        .filter(|r| r.tenant == tenant && r.doc_type == DocType::Job)
        .map(|r| r.mirrored)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_budget_holds_every_second_to_rate_plus_burst() {
    const JOBS: usize = 120;
    let token = CancellationToken::new();
    let sim = sim_for("rl-a", &token).await;
    sim.seed(DocType::Job, JOBS);
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = config(
        &dir,
        vec![TenantSettings {
            max_requests_per_sec: Some(20.0),
            ..tenant("rl-a", &sim)
        }],
    );
    reconcile_jobs(&config).await;
    assert_eq!(mirrored_jobs(&config, "rl-a").await, JOBS as i64);

    let reqs = sim.requests();
    let bins = per_second(&reqs);
    assert!(
        reqs.len() > JOBS,
        "every job GET and the listing: {}",
        reqs.len()
    );
    assert_eq!(
        throttled_share(&reqs),
        0.0,
        "the simulator has no limit here"
    );
    // Every window after the first holds at most rate + burst (20 + 1),
    // plus one for a request sent at a window's end that arrived in the next.
    for (i, n) in bins.iter().enumerate().skip(1) {
        assert!(*n <= 22, "window {i} had {n} requests: {bins:?}");
    }
    // The budget is binding: the run cannot fit in fewer windows.
    assert!(
        bins.len() >= reqs.len() / 22,
        "{} requests in {} windows: {bins:?}",
        reqs.len(),
        bins.len()
    );
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_upstream_without_a_budget_sees_few_429s_and_status_says_so() {
    const JOBS: usize = 150;
    let token = CancellationToken::new();
    let sim = sim_for("rl-b", &token).await;
    sim.seed(DocType::Job, JOBS);
    sim.set_faults(Faults {
        rate_limit_per_sec: Some(15.0),
        retry_after_secs: 1,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, config_path) = config(&dir, vec![tenant("rl-b", &sim)]);
    reconcile_jobs(&config).await;
    assert_eq!(mirrored_jobs(&config, "rl-b").await, JOBS as i64);

    let reqs = sim.requests();
    let refused = reqs.iter().filter(|r| r.throttled).count();
    assert!(refused >= 1, "a slow start at 100/s meets a 15/s limit");
    assert!(
        throttled_share(&reqs) <= 0.05,
        "{refused} of {} requests answered 429; per second: {:?}",
        reqs.len(),
        per_second(&reqs)
    );

    // `status` (another process) says the tenant was throttled.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["status", "--json", "--config"])
        .arg(&config_path)
        .env_remove("SKILLSYNC_CONFIG")
        .output()
        .expect("run skillsync status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let row = status["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|r| r["tenant"] == "rl-b"))
        .cloned()
        .unwrap_or_default();
    assert!(
        row["throttled_last_hour"]["throttled_at"].is_string(),
        "{status}"
    );
    assert!(
        row["throttled_last_hour"]["refusals_total"].as_i64() >= Some(1),
        "{status}"
    );
    assert_eq!(
        status["healthy"], true,
        "throttling is not a problem: {status}"
    );
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["status", "--config"])
        .arg(&config_path)
        .env_remove("SKILLSYNC_CONFIG")
        .output()
        .expect("run skillsync status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("rl-b: throttled by upstream (429) in the last hour"),
        "{text}"
    );

    // /metrics of this process: requests made, 429s, the allowed rate.
    let store = skillsync::app::open_store(&config, skillsync::store::ReportRole::Follower)
        .await
        .expect("open store");
    let scrape = skillsync::metrics::Metrics::install().render(&store).await;
    let value = |prefix: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        value("skillsync_upstream_throttled_total{tenant=\"rl-b\"}") as usize,
        refused,
        "{scrape}"
    );
    assert_eq!(
        value("skillsync_upstream_requests_total{tenant=\"rl-b\"") as usize,
        reqs.len(),
        "{scrape}"
    );
    let rate = value("skillsync_upstream_allowed_requests_per_second{tenant=\"rl-b\"}");
    assert!(
        rate > 0.0 && rate < 20.0,
        "lowered below the limit's neighbourhood: {rate}"
    );
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_throttled_by_their_own_upstreams_keep_their_own_pace() {
    const JOBS: usize = 90;
    let token = CancellationToken::new();
    let (one, two) = (
        sim_for("rl-c1", &token).await,
        sim_for("rl-c2", &token).await,
    );
    for sim in [&one, &two] {
        sim.seed(DocType::Job, JOBS);
        sim.set_faults(Faults {
            rate_limit_per_sec: Some(15.0),
            retry_after_secs: 1,
            ..Faults::default()
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = config(&dir, vec![tenant("rl-c1", &one), tenant("rl-c2", &two)]);
    reconcile_jobs(&config).await;
    for (name, sim) in [("rl-c1", &one), ("rl-c2", &two)] {
        assert_eq!(mirrored_jobs(&config, name).await, JOBS as i64, "{name}");
        let reqs = sim.requests();
        assert!(
            throttled_share(&reqs) <= 0.05,
            "{name}: {} of {} answered 429",
            reqs.iter().filter(|r| r.throttled).count(),
            reqs.len()
        );
    }
    // The fetches of both ran at once (the listings ran one after the other,
    // before them), and each kept near its own limit while the other was
    // throttled: the accepted requests of each full window in which both
    // were fetching, at the median, at least two thirds of 15.
    let accepted_at = |sim: &Simulator| -> Vec<Instant> {
        sim.requests()
            .iter()
            .filter(|r| !r.throttled)
            .map(|r| r.at)
            .collect()
    };
    let (a, b) = (accepted_at(&one), accepted_at(&two));
    let (Some(a_last), Some(b_last)) = (a.last(), b.last()) else {
        panic!("no requests")
    };
    // Both tenants' fetches start after the second listing.
    let start = a[1].max(b[1]);
    let end = *a_last.min(b_last);
    assert!(end > start + Duration::from_secs(2), "the two ran at once");
    for (name, times) in [("rl-c1", &a), ("rl-c2", &b)] {
        let mut bins = vec![0usize; (end - start).as_secs() as usize];
        for t in times.iter().filter(|t| **t >= start && **t < end) {
            let i = (*t - start).as_secs() as usize;
            if i < bins.len() {
                bins[i] += 1;
            }
        }
        let mut sorted = bins.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!(median >= 10, "{name}: accepted per second {bins:?}");
    }
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_fetched_before_a_reconciliations_backlog() {
    const BACKLOG: i64 = 40;
    // 5 requests/s: the backlog takes 8 s; one fetch at a time.
    let app = spawn_app_with(|c| {
        c.fetch = FetchSettings {
            timeout_secs: Some(5),
            ..FetchSettings::quick(1, 3)
        };
        c.acme().max_requests_per_sec = Some(5.0);
    })
    .await;
    app.sim.seed(DocType::Job, BACKLOG as usize);
    let rec = crate::reconcile::reconciler(&app);
    let run = crate::reconcile::run_jobs(&rec, RunKind::Incremental, false).await;
    assert_eq!(run.counts.enqueued, BACKLOG as u64, "{run:?}");
    let (id, status, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(status, 200);
    wait_until(
        Duration::from_secs(60),
        "the webhook's job to be mirrored",
        || async {
            count(
                &app.sql(),
                &format!("SELECT count(*) FROM jobs WHERE id = '{id}'"),
            ) == 1
        },
    )
    .await;
    let mirrored = count(&app.sql(), "SELECT count(*) FROM jobs") - 1;
    assert!(
        mirrored <= BACKLOG * 3 / 4,
        "the webhook's job waited behind {mirrored} of the {BACKLOG} queued by the reconciliation"
    );
}
