//! What operators do beside a running daemon, through the real binary: a
//! `reconcile` while a reporting reader holds a snapshot never stalls webhook
//! intake; SIGHUP reloads and never stops `serve`; config errors name a
//! secret key without quoting its value; logs carry no colour codes when
//! nobody is looking at a terminal.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skillsync::model::DocType;

use crate::helpers::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_skillsync"));
    c.env_remove("SKILLSYNC_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM");
    c
}

/// Sends `sig` (as `kill` spells it) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let ok = crate::helpers::kill([sig, &pid.to_string()]).is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// A generous bound: a webhook that waits on a checkpoint waits for the
/// whole `busy_timeout` (5 s here), one that does not takes milliseconds.
const ACK_BOUND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_beside_serve_and_a_reader_never_stalls_intake() {
    // The daemon's default busy_timeout, so a stall is unmistakable.
    let app = spawn_app_with(|c| c.database.busy_timeout_ms = 5000).await;
    app.sim.seed(DocType::Job, 40);
    app.sim.seed(DocType::Project, 20);
    let (_, s, _) = app.create_and_notify(DocType::Job).await;
    assert_eq!(s, 200);

    // A reporting reader holds one snapshot for the whole run.
    let reader = app.sql();
    reader.execute_batch("BEGIN").expect("begin read");
    let before = count(&reader, "SELECT count(*) FROM events");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .arg("reconcile")
        .arg("--config")
        .arg(&app.config_path)
        .env_remove("SKILLSYNC_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start skillsync reconcile");

    let mut slow = Vec::new();
    let mut sent = 0;
    let mut after_exit = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut exit = None;
    while after_exit < 20 {
        assert!(Instant::now() < deadline, "reconcile did not finish");
        let started = Instant::now();
        let (_, status, body) = app.create_and_notify(DocType::Job).await;
        let took = started.elapsed();
        sent += 1;
        if status != 200 || took >= ACK_BOUND {
            slow.push(format!("webhook {sent}: {status} after {took:?}: {body}"));
        }
        // A steady stream, not a flood: the point is latency, not load.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if exit.is_none() {
            exit = child.try_wait().expect("poll reconcile");
        } else {
            after_exit += 1;
        }
    }
    let out = child.wait_with_output().await.expect("reconcile output");
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "reconcile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The reader still sees its snapshot: nothing forced it out.
    assert_eq!(count(&reader, "SELECT count(*) FROM events"), before);
    reader.execute_batch("COMMIT").expect("end read");
    assert!(
        slow.is_empty(),
        "{} of {sent} webhooks were not acknowledged with 200 within {ACK_BOUND:?} while reconcile ran beside a reader:\n{}",
        slow.len(),
        slow.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_never_stops_serve_without_tls() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let db = dir.path().join("skillsync.db");
    let toml = TestConfig::new(&db, &sim.base_url()).on_port(port).toml();
    let config = dir.path().join("skillsync.toml");
    std::fs::write(&config, toml).expect("write config");
    let log = dir.path().join("serve.log");
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start serve");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let healthy = || {
        let c = client.clone();
        let u = format!("{url}/healthz");
        async move { c.get(u).send().await.is_ok_and(|r| r.status() == 200) }
    };
    wait_until(Duration::from_secs(20), "serve to answer /healthz", healthy).await;

    signal(child.id(), "-HUP");
    wait_until(Duration::from_secs(10), "the reload to be logged", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("SIGHUP") && l.contains("reload"))
        }
    })
    .await;
    assert!(
        child.try_wait().expect("poll serve").is_none(),
        "serve stopped on SIGHUP: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Still serving: a webhook is accepted after the reload.
    let id = sim.create(DocType::Job);
    let r = client
        .post(format!("{url}/skillsevent"))
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body(
            sim.webhook_payload(DocType::Job, &id, "created")
                .to_string(),
        )
        .send()
        .await
        .expect("webhook after SIGHUP");
    assert_eq!(r.status(), 200);

    signal(child.id(), "-TERM");
    let status = child.wait().expect("wait for serve");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "serve after SIGTERM: {log}");
    assert!(log.contains("stopped"), "no clean stop logged: {log}");
}

#[test]
fn config_type_errors_name_a_secret_key_without_its_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tenant = |secrets: &str, app_secret: &str| {
        format!(
            "[[tenant]]\nname = \"acme\"\n{secrets}\napi_base = \"https://api.example.com\"\nextraction_base = \"https://x.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\n{app_secret}\n"
        )
    };
    let cases = [
        (
            tenant(
                "webhook_secrets = \"hunter2-webhook-value\"",
                "app_secret = \"ok-app-secret\"",
            ),
            "hunter2-webhook-value",
            "webhook_secrets",
            "sequence",
        ),
        (
            tenant(
                "webhook_secrets = [\"ok-webhook-secret\"]",
                "app_secret = 1234567890987",
            ),
            "1234567890987",
            "app_secret",
            "string",
        ),
        (
            tenant(
                "webhook_secrets = [\n  \"ok-webhook-secret\",\n  31415926535\n]",
                "app_secret = \"ok-app-secret\"",
            ),
            "31415926535",
            "webhook_secrets",
            "string",
        ),
    ];
    for (i, (toml, value, key, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, toml).expect("write config");
        let out = bin()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run check-config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            !stderr.contains(value) && !String::from_utf8_lossy(&out.stdout).contains(value),
            "case {i}: the error quotes the secret: {stderr}"
        );
        assert!(stderr.contains(key), "case {i}: key not named: {stderr}");
        assert!(
            stderr.contains(expected),
            "case {i}: expected type not said: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_output_carries_no_colour_codes() {
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    sim.seed(DocType::Job, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("skillsync.toml");
    let toml = TestConfig::new(&dir.path().join("skillsync.db"), &sim.base_url()).toml();
    std::fs::write(&config, toml).expect("write config");

    // `serve` until it says it is serving, then SIGTERM; `JOURNAL_STREAM`
    // naming a stream that is not ours (or no journal at all) means plain
    // text on stderr.
    for journal in [None, Some("8:12345")] {
        let log = dir.path().join("serve.log");
        let mut cmd = bin();
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(stream) = journal {
            cmd.env("JOURNAL_STREAM", stream);
        }
        let mut child = cmd.spawn().expect("start serve");
        wait_until(
            Duration::from_secs(20),
            "serve to log that it serves",
            || {
                let log = log.clone();
                async move { std::fs::read_to_string(&log).is_ok_and(|l| l.contains("serving")) }
            },
        )
        .await;
        signal(child.id(), "-TERM");
        assert_eq!(child.wait().expect("wait serve").code(), Some(0));
        let text = std::fs::read_to_string(&log).expect("read log");
        assert!(
            !text.contains("\x1b["),
            "serve (JOURNAL_STREAM {journal:?}): colour codes in a log file:\n{text}"
        );
    }

    for (what, args) in [
        ("reconcile", vec!["reconcile"]),
        ("check-config", vec!["check-config"]),
        ("a usage error", vec!["reconcile", "--nope"]),
    ] {
        let out = bin()
            .args(&args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .output()
            .expect("run skillsync");
        let all = [out.stdout, out.stderr].concat();
        let text = String::from_utf8_lossy(&all);
        assert!(!text.is_empty(), "{what}: printed nothing");
        assert!(
            !text.contains("\x1b["),
            "{what}: colour codes in piped output:\n{text}"
        );
    }
}
