//! The real binary: config errors that name their key, `print-config`,
//! `status` exit codes, SIGTERM under load, the demo, and secrets that never
//! reach the logs, `status` or the database file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use skillsync::model::DocType;
use skillsync::simulator::Faults;

use crate::helpers::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_skillsync"));
    c.env_remove("SKILLSYNC_CONFIG").env_remove("RUST_LOG");
    c
}

const TENANT: &str = r#"
[[tenant]]
name = "acme"
webhook_secrets = ["acme-webhook-secret-1"]
api_base = "https://integration-api-we.skillsworkflow.com"
extraction_base = "https://apiv2-acme.skillsworkflow.com"
app_tenant = "t"
app_id = "i"
app_secret = "app-secret-value-1"
"#;

#[test]
fn each_config_error_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("does-not-exist");
    let cases: Vec<(String, &str)> = vec![
        (
            format!("[server]\nlisen = \"127.0.0.1:1\"\n{TENANT}"),
            "lisen",
        ),
        (
            format!("[server]\nlisten = \"nowhere\"\n{TENANT}"),
            "server.listen",
        ),
        (
            format!("[server]\nwebhook_path = \"no-slash\"\n{TENANT}"),
            "server.webhook_path",
        ),
        (
            format!("[server]\nmax_body_bytes = 1\n{TENANT}"),
            "server.max_body_bytes",
        ),
        (
            format!("[fetch]\nconcurrency = 0\n{TENANT}"),
            "fetch.concurrency",
        ),
        (
            format!("[fetch]\nmax_attempts = -1\n{TENANT}"),
            "fetch.max_attempts",
        ),
        (
            format!("[database]\nbusy_timeout_ms = \"soon\"\n{TENANT}"),
            "busy_timeout_ms",
        ),
        (
            TENANT.replace("name = \"acme\"", "name = \"Acme Corp\""),
            "tenant[0].name",
        ),
        (
            TENANT.replace("https://integration-api-we.skillsworkflow.com", "ftp://x"),
            "tenant[0].api_base",
        ),
        (
            TENANT.replace("https://apiv2-acme.skillsworkflow.com", "not a url"),
            "tenant[0].extraction_base",
        ),
        (
            TENANT.replace("app_secret = \"app-secret-value-1\"", ""),
            "tenant[0].app_secret",
        ),
        (
            TENANT.replace(
                "app_secret = \"app-secret-value-1\"",
                &format!("app_secret_file = {:?}", secret_file.display().to_string()),
            ),
            "tenant[0].app_secret_file",
        ),
        (
            TENANT.replace(
                "webhook_secrets = [\"acme-webhook-secret-1\"]",
                "webhook_secret_env = \"SKILLSYNC_TEST_UNSET_VAR\"",
            ),
            "tenant[0].webhook_secret_env",
        ),
        (
            format!("{TENANT}reconcile_schedule = \"every 5 minutes\"\n"),
            "tenant[0].reconcile_schedule",
        ),
        (
            format!("{TENANT}full_sweep_schedule = \"0 30 2 * *\"\n"),
            "tenant[0].full_sweep_schedule",
        ),
        (
            format!("{TENANT}max_delete_fraction = 2.0\n"),
            "tenant[0].max_delete_fraction",
        ),
        (
            format!(
                "{TENANT}{}",
                TENANT.replace("name = \"acme\"", "name = \"beta\"")
            ),
            "tenant[1].webhook_secrets",
        ),
        (format!("{TENANT}{TENANT}"), "tenant[1].name"),
        ("[server]\n".to_string(), "tenant"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = bin()
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "case {i} ({key}) should fail: {stderr}"
        );
        assert!(
            stderr.contains(key),
            "case {i}: message should name `{key}`: {stderr}"
        );
        for secret in ["acme-webhook-secret-1", "app-secret-value-1"] {
            assert!(
                !stderr.contains(secret),
                "case {i}: error message leaks a secret: {stderr}"
            );
        }
    }
    let ok = dir.path().join("ok.toml");
    std::fs::write(&ok, TENANT).unwrap();
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(&ok)
        .output()
        .unwrap();
    assert_succeeded(&out);
}

#[test]
fn secrets_load_from_files_and_env_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hooks"),
        "# rotated weekly\n\n  first-secret-aaaa  \nsecond-secret-bbbb\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("app"), "  app-secret-from-file\n").unwrap();
    let toml = TENANT
        .replace(
            "webhook_secrets = [\"acme-webhook-secret-1\"]",
            "webhook_secret_file = \"hooks\"",
        )
        .replace(
            "app_secret = \"app-secret-value-1\"",
            "app_secret_file = \"app\"",
        );
    let config = skillsync::config::Config::from_toml(&toml, Some(dir.path())).unwrap();
    let t = &config.tenants[0];
    let hooks: Vec<&str> = t.webhook_secrets.iter().map(|s| s.expose()).collect();
    assert_eq!(hooks, ["first-secret-aaaa", "second-secret-bbbb"]);
    assert_eq!(t.app_secret.expose(), "app-secret-from-file");
}

#[test]
fn print_config_is_a_valid_commented_example_without_secrets() {
    let out = bin().arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
            > 20,
        "commented"
    );
    let c = skillsync::config::Config::from_toml(&text, None).expect("the example loads");
    assert_eq!(c.tenants[0].name, "acme");
    for key in [
        "listen",
        "webhook_path",
        "max_body_bytes",
        "concurrency",
        "max_attempts",
        "reconcile_schedule",
        "full_sweep_schedule",
        "max_delete_fraction",
        "app_secret_file",
    ] {
        assert!(text.contains(key), "example mentions {key}");
    }
}

/// `SKILLSYNC_CONFIG=` (set but empty, as a unit's `Environment=` line or a
/// shell can leave it) counts as unset: every command works as without it.
#[test]
fn an_empty_skillsync_config_counts_as_unset() {
    let out = bin()
        .env("SKILLSYNC_CONFIG", "")
        .env("SKILLSYNC_LOG_FORMAT", " ")
        .arg("print-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "print-config failed: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[tenant]]"));

    // Without --config the default path is used, and the error names it.
    let out = bin()
        .env("SKILLSYNC_CONFIG", "")
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("a value is required"), "{stderr}");
    assert!(stderr.contains("/etc/skillsync/skillsync.toml"), "{stderr}");

    // --config still wins, and a non-empty variable is still read.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\npath = \"{}/m.db\"\n{TENANT}",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = bin()
        .env("SKILLSYNC_CONFIG", "")
        .args(["--config", path.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_succeeded(&out);
    let out = bin()
        .env("SKILLSYNC_CONFIG", &path)
        .arg("check-config")
        .output()
        .unwrap();
    assert_succeeded(&out);
}

/// A secret the simulator reads from the environment never shows in
/// `--help` or in the man pages generated from the same definitions (clap
/// prints `[env: NAME=value]` unless told not to).
#[test]
fn secrets_from_the_environment_stay_out_of_help_and_man_pages() {
    let secret = "env-secret-9f3c";
    let with_secrets = |args: &[&str]| {
        bin()
            .env("SKILLSYNC_SIM_APP_SECRET", secret)
            .env("SKILLSYNC_SIM_WEBHOOK_SECRET", secret)
            .args(args)
            .output()
            .unwrap()
    };
    let out = with_secrets(&["simulate", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("SKILLSYNC_SIM_APP_SECRET"), "{help}");
    assert!(help.contains("SKILLSYNC_SIM_WEBHOOK_SECRET"), "{help}");
    assert!(!help.contains(secret), "{help}");

    let dir = tempfile::tempdir().unwrap();
    let out = with_secrets(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_succeeded(&out);
    let mut pages = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains(secret));
        pages += 1;
    }
    assert!(pages > 1, "{pages} pages");
}

fn write_config(dir: &Path, port: u16, sim_base: &str) -> std::path::PathBuf {
    let db = dir.join("skillsync.db");
    let path = dir.join("skillsync.toml");
    TestConfig::new(&db, sim_base).on_port(port).write(&path);
    path
}

async fn wait_healthy(port: u16) {
    let client = reqwest::Client::new();
    wait_until(
        Duration::from_secs(20),
        "the daemon to answer /healthz",
        || {
            let client = client.clone();
            async move {
                client
                    .get(format!("http://127.0.0.1:{port}/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_under_load_loses_nothing_and_exits_zero_and_secrets_stay_out_of_logs_and_db() {
    let dir = tempfile::tempdir().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let port = free_port();
    let config = write_config(dir.path(), port, &sim.base_url());
    let (mut child, log) = spawn_logging(
        bin()
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug"),
    );
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}/skillsevent");
    // Unauthenticated attempts, and an upstream that refuses our credentials for a while.
    let bad = skillsync::simulator::send_webhooks(
        &url,
        "attacker-guess-123",
        vec![serde_json::json!({"action": "test"})],
        1,
        None,
    )
    .await;
    assert_eq!(bad.statuses.get(&401), Some(&1));
    sim.set_faults(Faults {
        auth_broken: true,
        ..Faults::default()
    });
    let ids = sim.seed(DocType::Job, 400);
    let payloads: Vec<Value> = ids
        .iter()
        .map(|id| sim.webhook_payload(DocType::Job, id, "created"))
        .collect();
    let sender = tokio::spawn(async move {
        skillsync::simulator::send_webhooks(&url, SECRET_ACME, payloads, 16, None).await
    });
    let db = dir.path().join("skillsync.db");
    wait_until(Duration::from_secs(20), "events to arrive", || async {
        rusqlite::Connection::open(&db)
            .ok()
            .is_some_and(|c| count(&c, "SELECT count(*) FROM events") > 50)
    })
    .await;
    sim.set_faults(Faults::default());
    let pid = child.id().to_string();
    assert!(crate::helpers::kill(["-TERM", &pid]).unwrap().success());
    let report = sender.await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    let log = log.join().unwrap();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    for id in &report.acked {
        assert_eq!(
            count(
                &conn,
                &format!("SELECT count(*) FROM events WHERE id = {id}")
            ),
            1,
            "acknowledged event {id} lost"
        );
    }
    assert!(!report.acked.is_empty());
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM fetch_queue WHERE lease_owner IS NOT NULL"
        ),
        0,
        "leases released"
    );
    // The WAL was checkpointed at stop: the main file alone holds everything.
    let wal = std::fs::metadata(dir.path().join("skillsync.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(wal, 0, "WAL truncated at stop");

    // Secrets: never in the logs, the status output or the database file.
    let status_out = bin()
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let status_text = String::from_utf8_lossy(&status_out.stdout).to_string();
    let mut db_bytes = std::fs::read(dir.path().join("skillsync.db")).unwrap();
    db_bytes.extend(std::fs::read(dir.path().join("skillsync.db-wal")).unwrap_or_default());
    let db_text = String::from_utf8_lossy(&db_bytes);
    for secret in [SECRET_ACME, APP_SECRET] {
        assert!(!log.contains(secret), "log leaks {secret}");
        assert!(!status_text.contains(secret), "status leaks {secret}");
        assert!(!db_text.contains(secret), "database file holds {secret}");
    }
    assert!(
        log.contains("upstream authentication failing"),
        "auth failures are loud in the log"
    );
    token.cancel();
}

#[tokio::test]
async fn status_exit_codes_tell_a_monitor_the_truth() {
    let app = spawn_app().await;
    let run = |app: &TestApp| {
        bin()
            .args(["status", "--json", "--config"])
            .arg(&app.config_path)
            .output()
            .unwrap()
    };
    let id = app.sim.create(DocType::Job);
    let (s, _) = app
        .post(
            "",
            Some(SECRET_ACME),
            &app.sim.webhook_payload(DocType::Job, &id, "created"),
        )
        .await;
    assert_eq!(s, 200);
    wait_until(Duration::from_secs(10), "mirrored", || async {
        count(&app.sql(), "SELECT count(*) FROM jobs") == 1
    })
    .await;
    let out = run(&app);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    let job = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "job")
        .unwrap();
    assert_eq!(
        (
            job["tenant"].as_str(),
            job["mirrored"].as_i64(),
            job["dead"].as_i64()
        ),
        (Some("acme"), Some(1), Some(0))
    );

    app.sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let id = app.sim.create(DocType::Job);
    app.post(
        "",
        Some(SECRET_ACME),
        &app.sim.webhook_payload(DocType::Job, &id, "created"),
    )
    .await;
    wait_until(Duration::from_secs(20), "a dead event", || async {
        count(
            &app.sql(),
            "SELECT count(*) FROM events WHERE status = 'dead'",
        ) == 1
    })
    .await;
    let out = run(&app);
    assert_eq!(out.status.code(), Some(1), "dead events degrade");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    // Human output too.
    let out = bin()
        .args(["status", "--config"])
        .arg(&app.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DEGRADED") && text.contains("dead"), "{text}");

    // A monitor without access to the secrets: status reads none.
    let mut no_secrets = app.settings.clone();
    no_secrets.acme().app_secret = None;
    no_secrets.acme().app_secret_file = Some("/nonexistent/app-secret".into());
    let monitor_config = app.dir.path().join("monitor.toml");
    no_secrets.write(&monitor_config);
    let out = bin()
        .args(["status", "--json", "--config"])
        .arg(&monitor_config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "still degraded, read without secrets: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let garbage = app.dir.path().join("garbage.db");
    std::fs::write(&garbage, b"this is not a database at all, not even close........................................................").unwrap();
    let out = bin()
        .args(["status", "--db"])
        .arg(&garbage)
        .arg("--config")
        .arg(&app.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("skillsync.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let err = match skillsync::store::Store::open(&db, Duration::from_secs(1)) {
        Ok(_) => panic!("a newer schema must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("999") && err.contains("newer"), "{err}");
}

#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = bin().arg("demo").arg("--db").arg(&db).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Database:") && stdout.contains("sqlite3"),
        "{stdout}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM jobs WHERE deleted_at IS NULL"),
        42
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM jobs WHERE deleted_at IS NOT NULL"
        ),
        1
    );
    assert!(
        count(&conn, "SELECT sum(missed) FROM sync_runs") >= 8,
        "drift recorded"
    );
}

/// Starts the binary with JSON logs and `server.trusted_proxies`; returns (child, port, log reader).
fn serve_with_json_logs(
    dir: &Path,
    trusted_proxies: &[&str],
    sim_base: &str,
) -> (std::process::Child, u16, std::thread::JoinHandle<String>) {
    let port = free_port();
    let mut settings = TestConfig::new(&dir.join("skillsync.db"), sim_base).on_port(port);
    settings.server.trusted_proxies = Some(trusted_proxies.iter().map(|p| p.to_string()).collect());
    let path = dir.join("skillsync.toml");
    settings.write(&path);
    let (child, log) = spawn_logging(
        bin()
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&path),
    );
    (child, port, log)
}

#[tokio::test]
async fn json_logs_show_the_real_client_only_behind_a_trusted_proxy() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    for (trusted, expect_forwarded) in [(["127.0.0.1/32"], true), (["10.0.0.0/8"], false)] {
        let dir = tempfile::tempdir().unwrap();
        let (child, port, log) = serve_with_json_logs(dir.path(), &trusted, &sim.base_url());
        wait_healthy(port).await;
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/skillsevent"))
            .header("x-webhook-secret", "not-the-secret")
            .header("x-forwarded-for", "203.0.113.7")
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert!(
            crate::helpers::kill(["-TERM", &child.id().to_string()])
                .unwrap()
                .success()
        );
        let mut child = child;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let log = log.join().unwrap();
        let refused: Vec<Value> = log
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
            })
            .filter(|v| v["fields"]["message"] == "webhook refused")
            .collect();
        assert_eq!(refused.len(), 1, "{log}");
        let client = refused[0]["fields"]["client"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            client.contains("203.0.113.7"),
            expect_forwarded,
            "{trusted:?}: {client}"
        );
        assert_eq!(
            client.contains("127.0.0.1"),
            !expect_forwarded,
            "{trusted:?}: {client}"
        );
    }
    token.cancel();
}
