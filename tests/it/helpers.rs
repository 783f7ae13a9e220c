//! Shared test harness: a simulator as the upstream, a real SQLite file in a
//! temp dir, the real daemon (`skillsync::run`) on a loopback port, and
//! helpers to post webhooks and wait for the mirror.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
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

/// Starts a simulator on a fresh loopback port; it stops with `token`.
pub async fn start_sim(token: &CancellationToken) -> Simulator {
    skillsync::upstream::install_crypto();
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    Simulator::start(l, creds(), token.clone()).expect("start simulator")
}

/// The TOML of a test config: tenant `acme` on `sim_base`; `extra_tenant`
/// text is appended (e.g. a second `[[tenant]]`), `fetch` replaces the fetch section.
pub fn config_toml(db: &std::path::Path, sim_base: &str, fetch: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{metrics_listen}
[database]
path = "{db}"
busy_timeout_ms = 1000
[fetch]
{fetch}
[[tenant]]
name = "acme"
webhook_secrets = ["{SECRET_ACME}"]
api_base = "{sim_base}"
extraction_base = "{sim_base}"
app_tenant = "acme-tenant"
app_id = "acme-app"
app_secret = "{APP_SECRET}"
audit_schedule = "off"
reconcile_schedule = "off"
full_sweep_schedule = "off"
{extra}
"#,
        db = db.display(),
        // Port 0: every daemon under test gets its own metrics port. Written
        // as a literal string so tests that swap `listen = "127.0.0.1:0"`
        // for a fixed port leave this line alone.
        metrics_listen = "metrics_listen = '127.0.0.1:0'",
    )
}

/// A free loopback port (bound, read, released), for a daemon started as a
/// process with a fixed port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

/// [`config_toml`] with the public listener on `port`.
pub fn config_toml_on_port(
    db: &std::path::Path,
    sim_base: &str,
    fetch: &str,
    extra: &str,
    port: u16,
) -> String {
    config_toml(db, sim_base, fetch, extra).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

/// Fetch settings that make retries quick in tests.
pub const FAST_FETCH: &str = "concurrency = 4\ntimeout_secs = 2\nmax_attempts = 3\nretry_initial_secs = 0\nretry_max_secs = 1";

/// A daemon under test with its simulator.
pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
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

/// Spawns the daemon with the default fast-fetch config.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(FAST_FETCH, "").await
}

/// Spawns the daemon with a custom `[fetch]` body and extra config text.
pub async fn spawn_app_with(fetch: &str, extra: &str) -> TestApp {
    spawn_app_edited(fetch, extra, |toml| toml).await
}

/// [`spawn_app_with`], with the config text passed through `edit` first
/// (for keys inside the sections the helper writes).
pub async fn spawn_app_edited(
    fetch: &str,
    extra: &str,
    edit: impl FnOnce(String) -> String,
) -> TestApp {
    skillsync::upstream::install_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let sim_token = CancellationToken::new();
    let sim = start_sim(&sim_token).await;
    let toml = edit(config_toml(&db, &sim.base_url(), fetch, extra));
    let config_path = dir.path().join("skillsync.toml");
    std::fs::write(&config_path, &toml).expect("write config");
    let config = Config::from_toml(&toml, None).expect("valid test config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind daemon");
    let addr = listener.local_addr().expect("addr");
    let metrics_listener = skillsync::app::bind_metrics(&config)
        .await
        .expect("bind metrics listener");
    let metrics_url = metrics_listener
        .as_ref()
        .map(|l| format!("http://{}", l.local_addr().expect("metrics addr")));
    let token = CancellationToken::new();
    let handle = tokio::spawn(skillsync::app::run_with(
        config.clone(),
        listener,
        metrics_listener,
        token.clone(),
    ));
    let store = skillsync::app::open_store(&config, skillsync::store::ReportRole::Owner)
        .await
        .expect("open store");
    TestApp {
        dir,
        db,
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
