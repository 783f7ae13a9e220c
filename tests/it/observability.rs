//! What monitoring sees: `/metrics` only on the metrics listener (never on
//! the public one), a `/healthz` answered from the daemon's own probe (no
//! write per request), a scrape that passes `promtool check metrics`, and a
//! Grafana dashboard (docs/) that uses only metrics the daemon exports.

use std::collections::BTreeSet;
use std::time::Duration;

use skillsync::model::DocType;

use crate::helpers::*;

/// The shipped dashboard.
const DASHBOARD: &str = include_str!("../../docs/grafana-dashboard.json");

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.expect("GET answered");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// A daemon that has done a bit of everything: accepted and refused
/// webhooks, fetched, and been reconciled (by the real `reconcile` binary);
/// returns its scrape.
async fn busy_scrape(app: &TestApp) -> String {
    let _ = app
        .post("", Some("wrong-secret-xx"), &serde_json::json!({}))
        .await;
    let (_, s, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(s, 200);
    // Fetched by the daemon itself (so its fetch histogram has a sample)
    // before `reconcile` could claim it.
    wait_until(
        Duration::from_secs(10),
        "the job to be mirrored",
        || async { count(&app.sql(), "SELECT count(*) FROM jobs") == 1 },
    )
    .await;
    app.sim.seed(DocType::Job, 3);
    app.sim.seed(DocType::Project, 2);
    let out = run_binary(app, "reconcile").await;
    assert!(
        out.status.success(),
        "reconcile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And audited (the real `verify`), so the audit gauges are in the scrape.
    let out = run_binary(app, "verify").await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let url = app.metrics_url.clone().expect("a metrics listener");
    let (status, text) = get(&app.client, &format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    text
}

/// Runs `skillsync COMMAND --config` on the app's config.
async fn run_binary(app: &TestApp, command: &str) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .arg(command)
        .arg("--config")
        .arg(&app.config_path)
        .env_remove("SKILLSYNC_CONFIG")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run skillsync {command}: {e}"))
}

/// Metric family names in a scrape (from its `# TYPE` lines).
fn families(scrape: &str) -> BTreeSet<(String, String)> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn metrics_only_on_the_metrics_listener_and_healthz_on_both() {
    let app = spawn_app().await;
    let (_, s, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(s, 200);
    let (status, body) = get(&app.client, &format!("{}/metrics", app.base_url)).await;
    assert_eq!(status, 404, "/metrics on the public listener: {body}");
    assert!(!body.contains("acme"), "{body}");
    let (status, _) = get(&app.client, &format!("{}/healthz", app.base_url)).await;
    assert_eq!(status, 200);

    let murl = app.metrics_url.clone().expect("a metrics listener");
    assert_ne!(murl, app.base_url);
    let (status, text) = get(&app.client, &format!("{murl}/metrics")).await;
    assert_eq!(status, 200);
    let build = format!(
        "skillsync_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "no `{build}` in:\n{text}");
    assert!(text.contains("skillsync_webhook_requests_total{"), "{text}");
    let (status, health) = get(&app.client, &format!("{murl}/healthz")).await;
    assert_eq!(status, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("JSON health");
    assert_eq!(health["healthy"], true, "{health}");
    // The metrics listener serves nothing else: no webhook there.
    let (status, _) = get(&app.client, &format!("{murl}/skillsevent")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn healthz_answers_from_the_probe_without_writing() {
    let app = spawn_app().await;
    let healthz = format!("{}/healthz", app.base_url);
    wait_until(Duration::from_secs(10), "/healthz 200", || async {
        get(&app.client, &healthz).await.0 == 200
    })
    .await;
    // Another connection holds the write lock: a request that wrote would
    // wait out busy_timeout_ms (1 s here) and answer 503.
    let locker = rusqlite::Connection::open(&app.db).expect("open db");
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(get(&app.client, &healthz).await.0);
    }
    locker.execute_batch("ROLLBACK").expect("release the lock");
    assert!(
        answers.iter().all(|s| *s == 200),
        "/healthz while another connection holds the write lock (a request must not write): {answers:?}"
    );
}

#[tokio::test]
async fn metrics_listen_off_serves_no_metrics() {
    let mut app = spawn_app_edited(FAST_FETCH, "", |t| {
        t.replace("metrics_listen = '127.0.0.1:0'", "metrics_listen = \"off\"")
    })
    .await;
    assert_eq!(app.config.server.metrics_listen, None);
    assert!(app.metrics_url.is_none());
    let (_, s, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(s, 200);
    let (status, _) = get(&app.client, &format!("{}/healthz", app.base_url)).await;
    assert_eq!(status, 200);
    let (status, _) = get(&app.client, &format!("{}/metrics", app.base_url)).await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_is_lint_clean_for_promtool() {
    let app = spawn_app().await;
    let scrape = busy_scrape(&app).await;

    // What promtool checks, checked here too (so the test means something
    // on a machine without promtool).
    let fams = families(&scrape);
    assert!(!fams.is_empty(), "no metric families:\n{scrape}");
    for (name, kind) in &fams {
        assert!(
            scrape.contains(&format!("# HELP {name} ")),
            "{name} has no HELP text"
        );
        assert_eq!(
            name.ends_with("_total"),
            kind == "counter",
            "{name} is a {kind}: only counters end in _total"
        );
    }
    assert!(
        fams.contains(&("skillsync_build_info".into(), "gauge".into())),
        "{fams:?}"
    );
    for name in [
        "skillsync_audit_mismatches",
        "skillsync_audit_sampled_documents",
        "skillsync_audit_unreadable_documents",
        "skillsync_audit_accuracy_lower_bound_ratio",
        "skillsync_audit_last_finished_timestamp_seconds",
    ] {
        assert!(
            fams.contains(&(name.into(), "gauge".into())),
            "{name}: {fams:?}"
        );
    }
    // The last audit per tenant and type: the 4 jobs, none wrong.
    assert!(
        scrape.contains("skillsync_audit_mismatches{tenant=\"acme\",type=\"job\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("skillsync_audit_sampled_documents{tenant=\"acme\",type=\"job\"} 4"),
        "{scrape}"
    );

    let file = app.dir.path().join("scrape.prom");
    std::fs::write(&file, &scrape).expect("write scrape");
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open scrape"))
        .output();
    match promtool {
        Ok(out) => assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}{}\nscrape:\n{scrape}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => crate::tools::missing(
            "observability::the_scrape_is_lint_clean_for_promtool",
            "promtool",
            "SKILLSYNC_REQUIRE_PROMTOOL",
            &format!(
                "cannot run it ({e}); apt-get install prometheus (.ci/run installs it); \
                 the lint above still ran"
            ),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("docs/grafana-dashboard.json is JSON");
    assert!(dashboard["title"].is_string(), "a dashboard has a title");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for p in panels {
        assert!(p["title"].is_string(), "panel without a title: {p}");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push(e.to_string());
            }
        }
    }
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("skillsync_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    // What the issue asks the dashboard to show.
    for needed in [
        "skillsync_webhook_requests_total",
        "skillsync_queue_depth",
        "skillsync_oldest_pending_age_seconds",
        "skillsync_fetch_duration_seconds_bucket",
        "skillsync_fetches_total",
        "skillsync_reconcile_last_run_missed",
        "skillsync_reconcile_last_success_timestamp_seconds",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }

    let app = spawn_app().await;
    let scrape = busy_scrape(&app).await;
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics the daemon does not export: {unknown:?}\nexported: {exported:?}"
    );
}
