//! Built-in HTTPS and socket activation, with certificates made in the test
//! (rcgen): a real TLS client posting an event, plain HTTP refused cleanly,
//! rotation on SIGHUP without dropping a connection in flight, a bad new
//! certificate keeping the old one, a malformed certificate as a config
//! error, and the socket handed over the way systemd does.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use skillsync::model::DocType;
use skillsync::simulator::Simulator;

use crate::helpers::*;

/// A self-signed certificate for localhost: (cert PEM, key PEM).
fn make_cert() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

fn https_client(cert_pem: &str) -> reqwest::Client {
    setup();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn write_tls_config(
    dir: &Path,
    port: u16,
    sim_base: &str,
    cert: &str,
    key: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let mut settings = TestConfig::new(&dir.join("skillsync.db"), sim_base).on_port(port);
    settings.server.tls_cert_file = Some(dir.join("cert.pem"));
    settings.server.tls_key_file = Some(dir.join("key.pem"));
    let path = dir.join("skillsync.toml");
    settings.write(&path);
    path
}

async fn post_event(
    client: &reqwest::Client,
    url: &str,
    sim: &skillsync::simulator::Simulator,
) -> reqwest::Result<u16> {
    let id = sim.create(DocType::Job);
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body(
            sim.webhook_payload(DocType::Job, &id, "created")
                .to_string(),
        )
        .send()
        .await?;
    Ok(r.status().as_u16())
}

#[tokio::test]
async fn https_event_is_accepted_and_plain_http_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let (cert, key) = make_cert();
    let path = write_tls_config(dir.path(), 0, &sim.base_url(), &cert, &key);
    let config = skillsync::config::Config::load(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = tokio::spawn(skillsync::run(config, listener, token.clone()));
    let client = https_client(&cert);
    let url = format!("https://localhost:{port}/skillsevent");
    assert_eq!(post_event(&client, &url, &sim).await.unwrap(), 200);
    // Plain HTTP to the TLS port: no HTTP answer, and the server goes on.
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/skillsevent"))
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body("{}")
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status().as_u16() == 400),
        "plain HTTP must not be served as an event"
    );
    assert_eq!(post_event(&client, &url, &sim).await.unwrap(), 200);
    let conn = rusqlite::Connection::open(dir.path().join("skillsync.db")).unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM events"), 2);
    token.cancel();
    handle.await.unwrap().unwrap();
}

/// Sends `sig` (as `kill` spells it) to process `pid`.
fn signal(pid: &str, sig: &str) {
    assert!(
        crate::helpers::kill([sig, pid]).unwrap().success(),
        "kill {sig} {pid}"
    );
}

/// Waits until a new connection trusting only `cert` gets an event accepted.
async fn until_served_with(url: &str, sim: &Simulator, cert: &str, what: &str) {
    wait_until(Duration::from_secs(10), what, || async {
        post_event(&https_client(cert), url, sim)
            .await
            .is_ok_and(|s| s == 200)
    })
    .await;
}

#[tokio::test]
async fn certificate_rotates_on_sighup_without_dropping_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let (cert1, key1) = make_cert();
    let port = free_port();
    let path = write_tls_config(dir.path(), port, &sim.base_url(), &cert1, &key1);
    let (mut child, log) = spawn_logging(
        Command::new(env!("CARGO_BIN_EXE_skillsync"))
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG"),
    );
    let url = format!("https://localhost:{port}/skillsevent");
    let old_client = https_client(&cert1); // keeps its connection alive between requests
    wait_until(Duration::from_secs(20), "the TLS listener", || {
        let c = old_client.clone();
        let url = url.clone();
        let sim = sim.clone();
        async move { post_event(&c, &url, &sim).await.is_ok_and(|s| s == 200) }
    })
    .await;
    let pid = child.id().to_string();
    // A bad new certificate: logged, the old one keeps serving.
    std::fs::write(
        dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    signal(&pid, "-HUP");
    until_served_with(
        &url,
        &sim,
        &cert1,
        "a second TLS connection with the old certificate",
    )
    .await;
    // A good new certificate.
    let (cert2, key2) = make_cert();
    std::fs::write(dir.path().join("cert.pem"), &cert2).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key2).unwrap();
    signal(&pid, "-HUP");
    until_served_with(
        &url,
        &sim,
        &cert2,
        "new connections to get the new certificate",
    )
    .await;
    // The connection opened under the old certificate is still served.
    assert_eq!(post_event(&old_client, &url, &sim).await.unwrap(), 200);
    signal(&pid, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let log = log.join().unwrap();
    assert!(
        log.contains("still serving the previous one"),
        "a bad certificate is loud: {log}"
    );
    assert!(log.contains("TLS certificate reloaded"), "{log}");
    token.cancel();
}

#[test]
fn a_malformed_certificate_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert();
    let path = write_tls_config(dir.path(), 8443, "http://127.0.0.1:9", "garbage", &key);
    let out = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server.tls_cert_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, other_key) = make_cert();
    let path = write_tls_config(dir.path(), 8443, "http://127.0.0.1:9", &cert, &other_key);
    let out = Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.tls_key_file") && stderr.contains("does not match"),
        "{stderr}"
    );
}

#[tokio::test]
async fn socket_activation_uses_the_passed_socket() {
    let Some(activate) =
        crate::tools::socket_activate("tls::socket_activation_uses_the_passed_socket")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = start_sim(&token).await;
    let port = free_port();
    // server.listen names a port nobody will use: the passed socket must win.
    let unused = free_port();
    let db = dir.path().join("skillsync.db");
    let toml = TestConfig::new(&db, &sim.base_url()).on_port(unused).toml();
    let path = dir.path().join("skillsync.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = Command::new(activate)
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            env!("CARGO_BIN_EXE_skillsync"),
            "serve",
            "--config",
        ])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/skillsevent");
    // systemd-socket-activate binds now and starts the service on the first connection.
    wait_until(
        Duration::from_secs(20),
        "an event through the passed socket",
        || {
            let c = client.clone();
            let url = url.clone();
            let sim = sim.clone();
            async move { post_event(&c, &url, &sim).await.is_ok_and(|s| s == 200) }
        },
    )
    .await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "server.listen was not bound"
    );
    let _ = crate::helpers::kill(["-TERM", &child.id().to_string()]);
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    token.cancel();
}
