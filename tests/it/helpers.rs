//! Shared test harness: a simulator as the upstream, a real SQLite file in a
//! temp dir, the real daemon ([`Application`]) on a loopback port, its config
//! as typed settings ([`TestConfig`]), and helpers to post webhooks and wait
//! for the mirror.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use skillsync::app::Application;
use skillsync::config::Config;
use skillsync::model::DocType;
use skillsync::simulator::{SimCredentials, Simulator};
use skillsync::store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET_ACME: &str = "acme-webhook-secret-1";
pub const SECRET_BETA: &str = "beta-webhook-secret-1";
pub const APP_SECRET: &str = "acme-app-secret-XYZ";

/// Credentials the test simulators accept.
pub fn creds() -> SimCredentials {
    SimCredentials {
        app_tenant: "acme-tenant".into(),
        app_id: "acme-app".into(),
        app_secret: APP_SECRET.into(),
    }
}

/// The tests' shared set-up, once per test process (every call after the
/// first does nothing): the TLS crypto provider every HTTPS client
/// (reqwest, PostgreSQL) uses. [`start_sim`] and so [`spawn_app_with`] call it.
pub fn setup() {
    skillsync::upstream::install_crypto();
}

/// Starts a simulator on a fresh loopback port; it stops with `token`.
pub async fn start_sim(token: &CancellationToken) -> Simulator {
    setup();
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    Simulator::start(l, creds(), token.clone()).expect("start simulator")
}

/// A test daemon's config as typed settings: tenant `acme` on the
/// simulator, no schedules, quick retries, every listener on port 0. A test
/// changes the fields it needs; [`TestConfig::toml`] renders the file the
/// daemon and the test's `skillsync` commands read, and
/// [`TestConfig::config`] parses it as `serve` would, so every value goes
/// through the product's own validation. A setting left `None` is not
/// written: it takes the product's default.
#[derive(Debug, Clone, Serialize)]
pub struct TestConfig {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub fetch: FetchSettings,
    pub upstream: UpstreamSettings,
    #[serde(rename = "tenant")]
    pub tenants: Vec<TenantSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSettings>,
    /// Whole sections appended as written: `[reporting]` column
    /// definitions, whose values are data, not settings (and, from the
    /// tests that pass one around as text, a rendered
    /// [`PostgresSettings::section`]).
    #[serde(skip)]
    pub sections: String,
}

/// `[postgres]`.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresSettings {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_alert_secs: Option<u64>,
}

impl PostgresSettings {
    /// The server at `url`, every other key at its default.
    pub fn new(url: &str) -> PostgresSettings {
        PostgresSettings {
            url: url.into(),
            password_env: None,
            schema: None,
            batch_size: None,
            lag_alert_secs: None,
        }
    }

    /// The `[postgres]` section's text.
    pub fn section(&self) -> String {
        #[derive(Serialize)]
        struct Section<'a> {
            postgres: &'a PostgresSettings,
        }
        toml::to_string(&Section { postgres: self }).expect("the section renders as TOML")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    /// `127.0.0.1:0`; [`TestConfig::on_port`] fixes it.
    pub listen: String,
    /// `127.0.0.1:0` (every daemon under test has its own), or `off`.
    pub metrics_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    pub busy_timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_commit: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FetchSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_initial_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_max_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_document_bytes: Option<u64>,
}

impl FetchSettings {
    /// Quick retries: 4 workers, 2 s timeout, 3 attempts, retried within a second.
    pub fn fast() -> FetchSettings {
        FetchSettings::quick(4, 3)
    }

    /// `concurrency` workers, `max_attempts` attempts, a 2 s timeout,
    /// retried within a second.
    pub fn quick(concurrency: u64, max_attempts: u64) -> FetchSettings {
        FetchSettings {
            concurrency: Some(concurrency),
            timeout_secs: Some(2),
            max_attempts: Some(max_attempts),
            retry_initial_secs: Some(0),
            retry_max_secs: Some(1),
            max_document_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listing_retry_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantSettings {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhook_secrets: Vec<String>,
    pub api_base: String,
    pub extraction_base: String,
    pub app_tenant: String,
    pub app_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_user: Option<String>,
    /// `None` with `app_secret_file` set: the secret is read from that file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_secret_file: Option<PathBuf>,
    /// `off` unless a test runs schedules.
    pub audit_schedule: String,
    pub reconcile_schedule: String,
    pub full_sweep_schedule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_sample: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delete_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_sec: Option<f64>,
}

impl TenantSettings {
    /// Tenant `name` with one webhook secret, on the upstream at `base`, with
    /// the test simulators' credentials and no schedules.
    pub fn new(name: &str, secret: &str, base: &str) -> TenantSettings {
        TenantSettings {
            name: name.into(),
            webhook_secrets: vec![secret.into()],
            api_base: base.into(),
            extraction_base: base.into(),
            app_tenant: "acme-tenant".into(),
            app_id: "acme-app".into(),
            app_user: None,
            app_secret: Some(APP_SECRET.into()),
            app_secret_file: None,
            audit_schedule: "off".into(),
            reconcile_schedule: "off".into(),
            full_sweep_schedule: "off".into(),
            audit_sample: None,
            max_delete_fraction: None,
            max_requests_per_sec: None,
        }
    }
}

impl TestConfig {
    /// Tenant `acme` on `sim_base`, the database at `db`, [`FetchSettings::fast`].
    pub fn new(db: &std::path::Path, sim_base: &str) -> TestConfig {
        TestConfig {
            server: ServerSettings {
                listen: "127.0.0.1:0".into(),
                metrics_listen: "127.0.0.1:0".into(),
                max_connections: None,
                header_read_timeout_secs: None,
                trusted_proxies: None,
                tls_cert_file: None,
                tls_key_file: None,
            },
            database: DatabaseSettings {
                path: db.to_path_buf(),
                busy_timeout_ms: 1000,
                group_commit: None,
            },
            fetch: FetchSettings::fast(),
            upstream: UpstreamSettings::default(),
            tenants: vec![TenantSettings::new("acme", SECRET_ACME, sim_base)],
            postgres: None,
            sections: String::new(),
        }
    }

    /// This config with the public listener on `port`.
    pub fn on_port(mut self, port: u16) -> TestConfig {
        self.server.listen = format!("127.0.0.1:{port}");
        self
    }

    /// Tenant `acme`'s settings.
    pub fn acme(&mut self) -> &mut TenantSettings {
        self.tenants
            .iter_mut()
            .find(|t| t.name == "acme")
            .expect("the test config has tenant acme")
    }

    /// The config file's text.
    pub fn toml(&self) -> String {
        let mut text = toml::to_string(self).expect("the test config renders as TOML");
        if !self.sections.is_empty() {
            text.push('\n');
            text.push_str(&self.sections);
            text.push('\n');
        }
        text
    }

    /// The config as `serve` would load it from [`TestConfig::toml`].
    pub fn config(&self) -> Config {
        Config::from_toml(&self.toml(), None).expect("valid test config")
    }

    /// Writes [`TestConfig::toml`] to `path`.
    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.toml()).expect("write the test config");
    }
}

/// A free loopback port (bound, read, released), for a daemon started as a
/// process with a fixed port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

/// A daemon under test with its simulator.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    /// The settings the daemon runs on, written at `config_path`.
    pub settings: TestConfig,
    pub config: Config,
    pub config_path: PathBuf,
    pub sim: Simulator,
    pub webhook_url: String,
    pub base_url: String,
    /// `http://{metrics listener}`, unless the config says `metrics_listen = "off"`.
    pub metrics_url: Option<String>,
    pub token: CancellationToken,
    pub sim_token: CancellationToken,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub store: Store,
    pub client: reqwest::Client,
}

/// Spawns the daemon on the default [`TestConfig`].
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns the daemon on the default [`TestConfig`] changed by `edit`.
pub async fn spawn_app_with(edit: impl FnOnce(&mut TestConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let sim_token = CancellationToken::new();
    let sim = start_sim(&sim_token).await;
    let mut settings = TestConfig::new(&db, &sim.base_url());
    edit(&mut settings);
    let config_path = dir.path().join("skillsync.toml");
    settings.write(&config_path);
    let config = settings.config();
    let app = Application::build(config.clone())
        .await
        .expect("build the daemon");
    let addr = app.address().expect("addr");
    let metrics_url = app.metrics_address().map(|a| format!("http://{a}"));
    let store = app.store().clone();
    let token = CancellationToken::new();
    let handle = tokio::spawn(app.run(token.clone()));
    TestApp {
        dir,
        db,
        settings,
        config,
        config_path,
        sim,
        webhook_url: format!("http://{addr}/skillsevent"),
        base_url: format!("http://{addr}"),
        metrics_url,
        token,
        sim_token,
        handle: Some(handle),
        store,
        client: reqwest::Client::new(),
    }
}

impl TestApp {
    /// Posts a JSON webhook with a secret; returns status and body.
    pub async fn post(
        &self,
        path_suffix: &str,
        secret: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}{}", self.webhook_url, path_suffix))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(s) = secret {
            req = req.header("x-webhook-secret", s);
        }
        let resp = req.send().await.expect("webhook answered");
        let status = resp.status().as_u16();
        let v = resp.json().await.unwrap_or(Value::Null);
        (status, v)
    }

    /// A `created` webhook for a new simulator document; returns its id and the answer.
    pub async fn create_and_notify(&self, ty: DocType) -> (String, u16, Value) {
        let id = self.sim.create(ty);
        let (s, v) = self
            .post(
                "",
                Some(SECRET_ACME),
                &self.sim.webhook_payload(ty, &id, "created"),
            )
            .await;
        (id, s, v)
    }

    /// Posts acme's webhook with `action` for each of `ids` in turn; returns
    /// the answers' statuses in order.
    pub async fn notify_all(&self, ty: DocType, ids: &[String], action: &str) -> Vec<u16> {
        let mut statuses = Vec::with_capacity(ids.len());
        for id in ids {
            let body = self.sim.webhook_payload(ty, id, action);
            statuses.push(self.post("", Some(SECRET_ACME), &body).await.0);
        }
        statuses
    }

    /// Stops the daemon and waits for it to return.
    pub async fn stop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("daemon task").expect("daemon returned ok");
        }
    }

    /// Event rows by status for tenant acme.
    pub async fn event_counts(&self) -> std::collections::HashMap<String, i64> {
        self.store
            .event_counts("acme".into())
            .await
            .expect("counts")
            .into_iter()
            .collect()
    }

    /// A read-only connection for assertions in SQL.
    pub fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
        self.sim_token.cancel();
    }
}

/// Starts `cmd` with stdout discarded and stderr read by a thread; joined
/// after the child exits, the thread returns everything it logged.
pub fn spawn_logging(
    cmd: &mut std::process::Command,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start skillsync");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    (child, log)
}

/// Polls `check` until it returns true or `timeout` passes; panics with `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts rows matching a SQL query returning one integer.
pub fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect("count query")
}

/// An `updated` webhook for job `id` of tenant acme, as the handler records it.
pub fn recorded_event(sim: &Simulator, id: &str) -> skillsync::store::NewEvent {
    skillsync::store::NewEvent {
        tenant: "acme".into(),
        received_at: chrono::Utc::now(),
        action: "updated".into(),
        doc_type: Some("job".into()),
        doc_id: Some(id.into()),
        ignored: false,
        payload: sim.webhook_payload(DocType::Job, id, "updated").to_string(),
    }
}

/// Job `id` as the simulator serves it now, as a fetch would store it.
pub fn fetched_job(app: &TestApp, id: &str) -> skillsync::store::FetchedDoc {
    let d = app
        .sim
        .documents(DocType::Job)
        .remove(id)
        .expect("the simulator has the job");
    skillsync::fetcher::extract(&d, &app.config.upstream)
}

/// Leases up to `limit` of acme's due documents to `test-owner`, as a fetch
/// worker with `limit` free slots would (moving recorded events first).
pub async fn claim_now(store: &Store, limit: usize) -> Vec<skillsync::model::Claim> {
    let now = chrono::Utc::now();
    store
        .claim(
            "acme".into(),
            "test-owner".into(),
            limit,
            now,
            now + chrono::Duration::seconds(60),
        )
        .await
        .expect("claim")
}

/// Ends a [`claim_now`] lease as a successful fetch of the job as the
/// simulator serves it now.
pub async fn store_fetched(app: &TestApp, claim: skillsync::model::Claim) {
    let doc = fetched_job(app, &claim.doc_id);
    app.store
        .finish_stored(claim, doc, chrono::Utc::now())
        .await
        .expect("store the fetch");
}

/// `kill SIG PID` (`["-TERM", pid]`) without procps' `kill` on the machine:
/// kill(2) directly, answered as the command's exit status would be (0 when
/// the signal was sent, 1 when not).
pub fn kill(args: [&str; 2]) -> std::io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let sig = match args[0] {
        "-TERM" => libc::SIGTERM,
        "-HUP" => libc::SIGHUP,
        "-INT" => libc::SIGINT,
        "-KILL" | "-9" => libc::SIGKILL,
        other => panic!("kill: a signal the tests do not use: {other}"),
    };
    let pid: libc::pid_t = args[1]
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid, sig) } == 0;
    Ok(std::process::ExitStatus::from_raw(if sent {
        0
    } else {
        1 << 8
    }))
}

/// Asserts that a command exited 0, showing its stderr when it did not.
#[track_caller]
pub fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
