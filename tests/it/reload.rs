//! `systemctl reload` (SIGHUP) through the real binary, under a webhook
//! stream: a webhook secret rotated (old and new both accepted while both
//! are listed, the old one refused once removed), a tenant added (its
//! webhooks and its schedule work from the reload on), a broken file kept
//! out (the old config keeps serving, the log names the key, never a
//! secret). Every webhook of the stream is answered 200 and recorded.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skillsync::model::DocType;
use skillsync::simulator::Simulator;

use crate::helpers::*;

const NEW_SECRET: &str = "acme-webhook-secret-2-rotated";

/// The beta tenant on the same simulator, reconciling every 2 seconds.
fn beta(sim_base: &str) -> TenantSettings {
    TenantSettings {
        reconcile_schedule: "*/2 * * * * *".into(),
        ..TenantSettings::new("beta", SECRET_BETA, sim_base)
    }
}

struct Daemon {
    child: Child,
    log: std::path::PathBuf,
    config: std::path::PathBuf,
    url: String,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `toml`, sends SIGHUP, and waits for the daemon to log the
    /// outcome (`reloaded` or `refused`): the `n`th such line.
    async fn reload(&self, toml: &str, n: usize) {
        std::fs::write(&self.config, toml).expect("write config");
        let ok =
            crate::helpers::kill(["-HUP", &self.child.id().to_string()]).is_ok_and(|s| s.success());
        assert!(ok, "kill -HUP");
        let log = self.log.clone();
        wait_until(
            Duration::from_secs(20),
            "the reload's outcome in the log",
            || {
                let log = log.clone();
                async move {
                    let l = std::fs::read_to_string(&log).unwrap_or_default();
                    l.matches("SIGHUP: config reloaded").count()
                        + l.matches("SIGHUP: config refused").count()
                        >= n
                }
            },
        )
        .await;
    }
}

/// `serve` (the binary) on a free port with a database and config in `dir`,
/// once it answers `/healthz`; with its settings and the database path.
async fn start_daemon(
    sim: &Simulator,
    dir: &std::path::Path,
) -> (Daemon, TestConfig, std::path::PathBuf) {
    let port = free_port();
    let db = dir.join("skillsync.db");
    let base = TestConfig::new(&db, &sim.base_url()).on_port(port);
    let config = dir.join("skillsync.toml");
    base.write(&config);
    let log = dir.join("serve.log");
    let d = Daemon {
        child: serve(&config, &log),
        log,
        config,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let url = d.url.clone();
    wait_until(Duration::from_secs(20), "serve to answer /healthz", || {
        let (c, u) = (client.clone(), format!("{url}/healthz"));
        async move { c.get(u).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    (d, base, db)
}

async fn post(client: &reqwest::Client, url: &str, secret: &str, body: String) -> (u16, i64) {
    let r = client
        .post(format!("{url}/skillsevent"))
        .header("content-type", "application/json")
        .header("x-webhook-secret", secret)
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await
        .expect("webhook answered");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (status, v["event_id"].as_i64().unwrap_or(-1))
}

/// What the stream saw: (secret used, status, event id) per webhook.
type Seen = Arc<Mutex<Vec<(String, u16, i64)>>>;

/// Posts a webhook every 20 ms with whatever secret `secret` holds (a
/// secret every config in force at that moment lists), until `stop`.
fn stream(
    sim: Simulator,
    url: String,
    secret: Arc<Mutex<String>>,
    seen: Seen,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !stop.is_cancelled() {
            let id = sim.create(DocType::Job);
            let body = sim
                .webhook_payload(DocType::Job, &id, "created")
                .to_string();
            let s = secret.lock().expect("secret").clone();
            let (status, event) = post(&client, &url, &s, body).await;
            seen.lock().expect("seen").push((s, status, event));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_secrets_adds_a_tenant_and_keeps_the_old_config_on_a_broken_file() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, base, db) = start_daemon(&sim, dir.path()).await;
    let client = reqwest::Client::new();
    let payload = |sim: &Simulator| {
        let id = sim.create(DocType::Job);
        sim.webhook_payload(DocType::Job, &id, "created")
            .to_string()
    };
    assert_eq!(
        post(&client, &d.url, NEW_SECRET, payload(&sim)).await.0,
        401
    );

    let secret = Arc::new(Mutex::new(SECRET_ACME.to_string()));
    let seen: Seen = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let streaming = stream(
        sim.clone(),
        d.url.clone(),
        secret.clone(),
        seen.clone(),
        stop.clone(),
    );

    // 1. Both secrets listed: both accepted from the reload on.
    let mut both = base.clone();
    both.acme().webhook_secrets.push(NEW_SECRET.into());
    d.reload(&both.toml(), 1).await;
    assert_eq!(
        post(&client, &d.url, NEW_SECRET, payload(&sim)).await.0,
        200
    );
    assert_eq!(
        post(&client, &d.url, SECRET_ACME, payload(&sim)).await.0,
        200
    );
    *secret.lock().expect("secret") = NEW_SECRET.to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2. The old secret removed and a tenant added.
    let mut rotated = base.clone();
    rotated.acme().webhook_secrets = vec![NEW_SECRET.into()];
    rotated.tenants.push(beta(&sim.base_url()));
    let rotated = rotated.toml();
    d.reload(&rotated, 2).await;
    assert_eq!(
        post(&client, &d.url, SECRET_ACME, payload(&sim)).await.0,
        401
    );
    assert_eq!(
        post(&client, &d.url, NEW_SECRET, payload(&sim)).await.0,
        200
    );
    let beta_id = sim.create(DocType::Job);
    let beta_body = sim
        .webhook_payload(DocType::Job, &beta_id, "created")
        .to_string();
    let (status, beta_event) = post(&client, &d.url, SECRET_BETA, beta_body).await;
    assert_eq!(status, 200, "the added tenant's webhook");

    // 3. A broken file: refused, the previous config keeps serving. (Text,
    // not settings: no typed value can be of the wrong type.)
    let broken = rotated.replacen("concurrency = 4", "concurrency = \"many\"", 1);
    assert_ne!(broken, rotated, "the test's config edit applies");
    d.reload(&broken, 3).await;
    assert_eq!(
        post(&client, &d.url, NEW_SECRET, payload(&sim)).await.0,
        200
    );
    assert_eq!(
        post(&client, &d.url, SECRET_BETA, payload(&sim)).await.0,
        200
    );
    assert_eq!(
        post(&client, &d.url, SECRET_ACME, payload(&sim)).await.0,
        401
    );
    // However slowly a loaded machine answers, the stream has run a while.
    wait_until(Duration::from_secs(60), "20 webhooks of the stream", || {
        let n = seen.lock().expect("seen").len();
        async move { n >= 20 }
    })
    .await;
    stop.cancel();
    streaming.await.expect("stream task");

    let conn = rusqlite::Connection::open(&db).expect("open db");
    // The added tenant's webhook was fetched, and its schedule ran.
    wait_until(Duration::from_secs(30), "beta's event done", || {
        let n = count(
            &conn,
            &format!("SELECT count(*) FROM events WHERE id = {beta_event} AND tenant = 'beta' AND status = 'done'"),
        );
        async move { n == 1 }
    })
    .await;
    wait_until(Duration::from_secs(30), "a scheduled run of beta", || {
        let n = count(
            &conn,
            "SELECT count(*) FROM sync_runs WHERE tenant = 'beta' AND status = 'ok'",
        );
        async move { n >= 1 }
    })
    .await;

    let ok = crate::helpers::kill(["-TERM", &d.child.id().to_string()]).is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM");
    let mut child = d.child;
    let status = child.wait().expect("wait for serve");
    let log = std::fs::read_to_string(&d.log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "serve after SIGTERM: {log}");

    // Every webhook of the stream: 200, and in the database.
    let seen = seen.lock().expect("seen").clone();
    assert!(seen.len() >= 20, "the stream ran: {} webhooks", seen.len());
    let refused: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(refused.is_empty(), "refused during reloads: {refused:?}");
    let conn = rusqlite::Connection::open(&db).expect("open db");
    for (_, _, id) in &seen {
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM events WHERE id = {id}")
            ),
            1,
            "acknowledged event {id} is missing"
        );
    }
    // The broken file: refused with the key named; no secret in the log.
    assert!(
        log.contains("SIGHUP: config refused") && log.contains("fetch.concurrency"),
        "{log}"
    );
    for s in [SECRET_ACME, NEW_SECRET, SECRET_BETA, APP_SECRET] {
        assert!(!log.contains(s), "a secret in the log");
    }
    assert_eq!(log.matches("SIGHUP: config reloaded").count(), 2, "{log}");
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_settings_that_need_a_restart_and_applies_the_rest_reporting_too() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, base, db) = start_daemon(&sim, dir.path()).await;
    let client = reqwest::Client::new();
    // Another listen port (needs a restart) and a new secret (does not).
    let other_port = free_port();
    let mut next = base.clone().on_port(other_port);
    next.acme().webhook_secrets = vec![NEW_SECRET.into()];
    next.sections = REPORTING_CHANGE.into();
    let next = next.toml();
    let c = rusqlite::Connection::open(&db).expect("open");
    assert!(c.prepare("SELECT budget FROM job_report").is_err());
    d.reload(&next, 1).await;
    // [reporting] applied by the reload: the new column is there.
    assert_eq!(count(&c, "SELECT count(budget) FROM job_report"), 0);
    let id = sim.create(DocType::Job);
    let body = sim
        .webhook_payload(DocType::Job, &id, "created")
        .to_string();
    assert_eq!(post(&client, &d.url, NEW_SECRET, body).await.0, 200);
    let l = d.log();
    assert!(
        l.contains("change only with a restart") && l.contains("server.listen"),
        "{l}"
    );
    assert!(
        l.contains("[reporting]") && !l.contains("\"reporting\""),
        "{l}"
    );
    let mut child = d.child;
    let _ = crate::helpers::kill(["-TERM", &child.id().to_string()]);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    token.cancel();
}

/// A `[reporting]` change that reshapes both the values and the stage rows.
const REPORTING_CHANGE: &str = "[reporting]\nstage_field = \"Client\"\n[reporting.job]\nbudget = { path = \"$.Budget\", type = \"real\" }\n";

fn serve(config: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("SKILLSYNC_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file"),
        )
        .spawn()
        .expect("start serve")
}

fn rebuild_state(db: &std::path::Path) -> Option<skillsync::store::RebuildState> {
    let c = skillsync::store::ReadOnlyStore::open(db).expect("open read-only");
    c.report_rebuild().expect("rebuild state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_report_rebuild_runs_after_ready_and_resumes_after_kill_9() {
    const JOBS: u64 = 40_000;
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    skillsync::store::fill_synthetic_jobs(&db, "acme", JOBS, 2).expect("fill");
    let port = free_port();
    let mut settings = TestConfig::new(&db, &sim.base_url()).on_port(port);
    settings.sections = REPORTING_CHANGE.into();
    let config = dir.path().join("skillsync.toml");
    settings.write(&config);
    let log = dir.path().join("serve.log");
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let started = std::time::Instant::now();
    let mut child = serve(&config, &log);
    // The first webhook is answered while the rebuild has only begun.
    let mut first = None;
    while first.is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "no answer");
        let id = sim.create(DocType::Job);
        let body = sim
            .webhook_payload(DocType::Job, &id, "created")
            .to_string();
        let r = client
            .post(format!("{url}/skillsevent"))
            .header("content-type", "application/json")
            .header("x-webhook-secret", SECRET_ACME)
            .body(body)
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            first = Some(started.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let at_first = rebuild_state(&db);
    eprintln!(
        "first webhook answered {:?} after exec; rebuild then: {at_first:?}",
        first.unwrap_or_default()
    );
    assert!(
        at_first.is_some(),
        "the rebuild of {JOBS} jobs was finished before the first webhook: it ran before serving"
    );
    // While it runs, the views and `status` say so.
    let c = rusqlite::Connection::open(&db).expect("open");
    assert_eq!(
        count(&c, "SELECT max(report_rebuilding) FROM sync_status"),
        1
    );
    let status = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["status", "--json", "--db"])
        .arg(&db)
        .env_remove("SKILLSYNC_CONFIG")
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert!(
        v["report_rebuild"]["total"].is_u64() || v["report_rebuild"]["phase"].is_string(),
        "{v}"
    );

    // kill -9 in the middle, once a batch has been committed.
    wait_until(Duration::from_secs(60), "a committed rebuild batch", || {
        let done = rebuild_state(&db).map_or(0, |s| s.done);
        async move { done > 0 }
    })
    .await;
    child.kill().expect("kill -9");
    let _ = child.wait();
    let killed_at = rebuild_state(&db).expect("killed in the middle of the rebuild");
    eprintln!("killed at {killed_at:?}");

    let mut child = serve(&config, &log);
    wait_until(Duration::from_secs(300), "the rebuild to finish", || {
        let left = rebuild_state(&db);
        async move { left.is_none() }
    })
    .await;
    let c = rusqlite::Connection::open(&db).expect("open");
    let jobs = count(&c, "SELECT count(*) FROM jobs");
    assert!(jobs >= JOBS as i64);
    assert_eq!(count(&c, "SELECT count(*) FROM job_report_values"), jobs);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM job_report WHERE budget IS NOT NULL"
        ),
        JOBS as i64,
        "every synthetic job has its new column"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM document_stages"),
        count(
            &c,
            "SELECT count(*) FROM document_history WHERE doc_type IN ('job', 'project')"
        )
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM job_stages WHERE stage IN ('Brief', 'Estimate', 'Production', 'Review', 'Done')"
        ),
        0,
        "the stage rows follow the new stage field"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'retired%'"
        ),
        0,
        "the old tables are dropped"
    );
    assert_eq!(
        count(&c, "SELECT max(report_rebuilding) FROM sync_status"),
        0
    );
    let _ = crate::helpers::kill(["-TERM", &child.id().to_string()]);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(l.contains("report rebuild finished"), "{l}");
    assert_eq!(
        l.matches("skillsync serving").count(),
        2,
        "one start, one restart, no loop"
    );
    token.cancel();
}

/// `audit_schedule` is reloaded with the other schedules: off at start (no
/// audit), on after a SIGHUP (audits every second, sampling `audit_sample`),
/// off again after the next (no more audits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_starts_and_stops_the_audit_schedule() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, base, db) = start_daemon(&sim, dir.path()).await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let id = sim.create(DocType::Job);
        let body = sim
            .webhook_payload(DocType::Job, &id, "created")
            .to_string();
        assert_eq!(post(&client, &d.url, SECRET_ACME, body).await.0, 200);
    }
    let c = rusqlite::Connection::open(&db).expect("open");
    wait_until(Duration::from_secs(20), "the jobs mirrored", || async {
        count(&c, "SELECT count(*) FROM jobs") == 5
    })
    .await;
    let audits = |c: &rusqlite::Connection| {
        count(
            c,
            "SELECT count(*) FROM audits WHERE finished_at IS NOT NULL",
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(audits(&c), 0, "audit_schedule = \"off\": no audit");

    let mut every_second = base.clone();
    every_second.acme().audit_schedule = "*/1 * * * * *".into();
    every_second.acme().audit_sample = Some(3);
    d.reload(&every_second.toml(), 1).await;
    wait_until(Duration::from_secs(20), "scheduled audits", || async {
        count(
            &c,
            "SELECT count(*) FROM audits WHERE doc_type = 'job' AND finished_at IS NOT NULL AND sampled = 3 AND matched = 3",
        ) >= 2
    })
    .await;

    d.reload(&base.toml(), 2).await;
    // An audit that had started finishes; then none starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = audits(&c);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        audits(&c),
        after,
        "audit_schedule back to \"off\": {}",
        d.log()
    );
    let mut child = d.child;
    let _ = crate::helpers::kill(["-TERM", &child.id().to_string()]);
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    token.cancel();
}
