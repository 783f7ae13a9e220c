//! `Application::build` and `run`: what the build binds and reports before
//! anything runs, the config errors it names, and the typed test settings
//! ([`TestConfig`]) reaching the config the daemon runs on.

use std::time::Duration;

use skillsync::app::Application;
use skillsync::model::DocType;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// A built application has bound both listeners (their addresses known
/// before it runs) and serves on exactly those once run; with
/// `metrics_listen = "off"` it has none.
#[tokio::test]
async fn build_binds_the_listeners_and_run_serves_on_them() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = TestConfig::new(&dir.path().join("a.db"), &sim.base_url());
    let app = Application::build(settings.config()).await.expect("build");
    let addr = app.address().expect("address");
    let metrics = app.metrics_address().expect("a metrics listener");
    assert_ne!(addr.port(), 0, "the public listener is bound");
    assert_ne!(metrics.port(), 0, "the metrics listener is bound");
    assert_ne!(addr, metrics);
    // The build opened the store: its handle reads the migrated schema.
    assert!(
        app.store()
            .event_counts("acme".into())
            .await
            .expect("counts")
            .is_empty()
    );
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(app.run(stop.clone()));
    let client = reqwest::Client::new();
    for url in [
        format!("http://{addr}/healthz"),
        format!("http://{metrics}/metrics"),
    ] {
        wait_until(Duration::from_secs(20), &url, || {
            let r = client.get(&url).send();
            async move { r.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }
    stop.cancel();
    daemon.await.expect("daemon task").expect("clean stop");

    let mut off = settings.clone();
    off.server.metrics_listen = "off".into();
    let app = Application::build(off.config()).await.expect("build");
    assert_eq!(app.metrics_address(), None);
    token.cancel();
}

/// A public port already taken: the build fails naming `server.listen`,
/// and the metrics port is not the one at fault.
#[tokio::test]
async fn a_taken_listen_port_fails_the_build_naming_the_key() {
    setup();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = TestConfig::new(&dir.path().join("a.db"), "http://127.0.0.1:9").on_port(port);
    let e = match Application::build(settings.config()).await {
        Ok(_) => panic!("built on a port another socket holds"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("config error at `server.listen`"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

/// A certificate that was valid when the config was checked and is not
/// when the daemon is built (replaced in between): the build fails naming
/// `server.tls_cert_file`, before anything runs: a reconciliation scheduled
/// every second never lists upstream, no fetch is made.
#[tokio::test]
async fn an_unusable_tls_certificate_fails_the_build_before_anything_runs() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    std::fs::write(&cert, c.cert.pem()).expect("cert");
    std::fs::write(&key, c.signing_key.serialize_pem()).expect("key");
    let mut settings = TestConfig::new(&dir.path().join("a.db"), &sim.base_url());
    settings.server.tls_cert_file = Some(cert.clone());
    settings.server.tls_key_file = Some(key);
    settings.acme().reconcile_schedule = "* * * * * *".into();
    sim.seed(DocType::Job, 3);
    let config = settings.config();
    std::fs::write(&cert, "not a certificate any more").expect("cert");
    let e = match Application::build(config).await {
        Ok(_) => panic!("built with an unusable certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("config error at `server.tls_cert_file`"), "{e}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sim.listing_calls(),
        0,
        "a schedule ran after a failed build"
    );
    assert_eq!(sim.total_gets(), 0, "a fetch ran after a failed build");
    token.cancel();
}

/// Every typed setting the tests change lands in the config the daemon
/// runs on (a misspelt field would be refused by the config's unknown-key
/// check only when set: this sets them all).
#[test]
fn every_test_setting_reaches_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = TestConfig::new(&dir.path().join("s.db"), "http://127.0.0.1:9").on_port(4242);
    c.server.metrics_listen = "off".into();
    c.server.max_connections = Some(7);
    c.server.header_read_timeout_secs = Some(3);
    c.server.trusted_proxies = Some(vec!["10.0.0.0/8".into()]);
    c.database.busy_timeout_ms = 4321;
    c.database.group_commit = Some(false);
    c.fetch = FetchSettings {
        max_document_bytes: Some(4096),
        ..FetchSettings::quick(5, 9)
    };
    c.upstream = UpstreamSettings {
        job_path: Some("/api/elsewhere/{id}".into()),
        page_size: Some(11),
        listing_retry_secs: Some(6),
        overlap_secs: Some(0),
    };
    let acme = c.acme();
    acme.app_user = Some("reporter@acme.example".into());
    acme.audit_schedule = "0 0 5 * * *".into();
    acme.reconcile_schedule = "0 */5 * * * *".into();
    acme.full_sweep_schedule = "0 0 3 * * *".into();
    acme.audit_sample = Some(12);
    acme.max_delete_fraction = Some(0.5);
    acme.max_requests_per_sec = Some(2.5);
    acme.webhook_secrets.push("second-secret".into());
    c.tenants.push(TenantSettings::new(
        "beta",
        SECRET_BETA,
        "http://127.0.0.1:9",
    ));
    c.postgres = Some(PostgresSettings {
        schema: Some("reports_t".into()),
        batch_size: Some(7),
        lag_alert_secs: Some(9),
        ..PostgresSettings::new("postgres://sk@127.0.0.1:1/r?sslmode=disable")
    });
    c.sections = "[reporting.job]\nowner = \"$.Owner.Name\"".into();
    let config = c.config();

    assert_eq!(config.server.listen.port(), 4242);
    assert_eq!(config.server.metrics_listen, None);
    assert_eq!(config.server.max_connections, 7);
    assert_eq!(config.server.header_read_timeout_secs, 3);
    assert_eq!(config.server.trusted_proxies.len(), 1);
    assert_eq!(config.database.busy_timeout_ms, 4321);
    assert!(!config.database.group_commit);
    let f = &config.fetch;
    assert_eq!(
        (
            f.concurrency,
            f.timeout_secs,
            f.max_attempts,
            f.retry_initial_secs,
            f.retry_max_secs,
            f.max_document_bytes
        ),
        (5, 2, 9, 0, 1, 4096)
    );
    let u = &config.upstream;
    assert_eq!(u.job_path, "/api/elsewhere/{id}");
    assert_eq!(
        (u.page_size, u.listing_retry_secs, u.overlap_secs),
        (11, 6, 0)
    );
    let names: Vec<&str> = config.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["acme", "beta"]);
    let t = &config.tenants[0];
    assert_eq!(t.app_user.as_deref(), Some("reporter@acme.example"));
    assert_eq!(t.audit_schedule.as_deref(), Some("0 0 5 * * *"));
    assert_eq!(t.reconcile_schedule.as_deref(), Some("0 */5 * * * *"));
    assert_eq!(t.full_sweep_schedule.as_deref(), Some("0 0 3 * * *"));
    assert_eq!(t.audit_sample, 12);
    assert_eq!(t.max_delete_fraction, 0.5);
    assert_eq!(t.max_requests_per_sec, Some(2.5));
    assert_eq!(t.webhook_secrets.len(), 2);
    assert_eq!(t.app_secret.expose(), APP_SECRET);
    // "off" is written, and read as no schedule.
    assert_eq!(config.tenants[1].reconcile_schedule, None);
    assert_eq!(config.tenants[1].audit_schedule, None);
    assert_eq!(
        config.reporting.job.len(),
        1,
        "the extra sections are written"
    );
    let pg = config.postgres.expect("[postgres] written");
    assert_eq!(
        (pg.schema.as_str(), pg.batch_size, pg.lag_alert_secs),
        ("reports_t", 7, 9)
    );
    assert!(pg.target.contains("127.0.0.1:1"), "{}", pg.target);
}
