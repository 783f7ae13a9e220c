//! The PostgreSQL mirror against a real server: the PG* variables name it
//! (`.ci/run` runs the suite under `pg_virtualenv`, which sets them). Each
//! test uses its own schema. Without a server these tests print a notice
//! and pass; `SKILLSYNC_REQUIRE_POSTGRES=1` (set by CI) makes that a failure.
//!
//! Equality is always judged by `pgmirror::check::compare`, the function
//! behind `skillsync postgres-check`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use skillsync::config::{Config, PostgresConfig};
use skillsync::model::DocType;
use skillsync::pgmirror::check::{Comparison, compare};
use skillsync::pgmirror::sink;
use skillsync::simulator::Simulator;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::{PostgresSettings, SECRET_ACME, TestConfig, count, start_sim, wait_until};
use crate::process::{Process, terminate};
use crate::proxy::Proxy;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");
const PATIENCE: Duration = Duration::from_secs(60);

/// Where the test server is, from the PG* variables.
pub(crate) struct Server {
    host: String,
    port: u16,
    user: String,
    database: String,
    has_password: bool,
}

/// The server, or `None` (with a notice) when there is none.
pub(crate) fn server(test: &str) -> Option<Server> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("PGHOST"), var("PGPORT"), var("PGUSER")) {
        (Some(host), Some(port), Some(user)) => Some(Server {
            host,
            port: port.parse().expect("PGPORT is a port"),
            user,
            database: var("PGDATABASE").unwrap_or_else(|| "postgres".into()),
            has_password: var("PGPASSWORD").is_some(),
        }),
        _ => {
            crate::tools::missing(
                test,
                "PostgreSQL",
                "SKILLSYNC_REQUIRE_POSTGRES",
                "set PGHOST, PGPORT, PGUSER[, PGPASSWORD], e.g. `pg_virtualenv cargo test --locked` \
                 (Debian's postgresql and postgresql-common)",
            );
            None
        }
    }
}

impl Server {
    /// The `[postgres]` settings for `schema`, reaching the server at `host_port`.
    pub(crate) fn postgres(&self, host_port: &str, schema: &str) -> PostgresSettings {
        PostgresSettings {
            password_env: self.has_password.then(|| "PGPASSWORD".into()),
            schema: Some(schema.into()),
            batch_size: Some(50),
            lag_alert_secs: Some(2),
            ..PostgresSettings::new(&format!(
                "postgres://{}@{host_port}/{}?sslmode=disable",
                self.user, self.database
            ))
        }
    }

    /// [`Server::postgres`] as the section's text.
    pub(crate) fn section(&self, host_port: &str, schema: &str) -> String {
        self.postgres(host_port, schema).section()
    }

    pub(crate) fn direct(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What most tests here start from: the server, a simulator (stopped by the
/// token) and a temp dir with the SQLite file's path; `None` (with a notice)
/// when there is no PostgreSQL.
async fn setup(
    test: &str,
) -> Option<(
    Server,
    CancellationToken,
    Simulator,
    tempfile::TempDir,
    PathBuf,
)> {
    let server = server(test)?;
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    Some((server, token, sim, dir, db))
}

pub(crate) fn fresh_schema() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Runs blocking PostgreSQL work on a plain thread (the sync client must
/// not run on a runtime thread).
async fn on_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.expect("thread finished")
}

/// `postgres-check`'s comparison, with the default `[reporting]`.
async fn check(db: &Path, pg: &PostgresConfig) -> Comparison {
    check_with(db, pg, &skillsync::reporting::ReportingConfig::default()).await
}

async fn check_with(
    db: &Path,
    pg: &PostgresConfig,
    reporting: &skillsync::reporting::ReportingConfig,
) -> Comparison {
    let (db, pg) = (db.to_path_buf(), pg.clone());
    let spec = skillsync::reporting::ReportSpec::new(reporting);
    on_thread(move || compare(&db, &pg, &spec).expect("postgres-check comparison ran")).await
}

/// Waits until PostgreSQL equals SQLite (by `postgres-check`'s comparison).
async fn wait_equal(db: &Path, pg: &PostgresConfig, timeout: Duration) -> Comparison {
    let start = Instant::now();
    loop {
        let r = check(db, pg).await;
        if r.equal() {
            return r;
        }
        assert!(
            start.elapsed() < timeout,
            "PostgreSQL still differs from SQLite after {timeout:?}: {:#?}",
            &r.differences[..r.differences.len().min(20)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One value from PostgreSQL.
async fn pg_i64(pg: &PostgresConfig, sql: String) -> i64 {
    let pg = pg.clone();
    on_thread(move || {
        let mut c = pg.connect().expect("connect");
        c.query_one(sql.as_str(), &[])
            .expect("query")
            .get::<_, i64>(0)
    })
    .await
}

/// The `[postgres]` config for `schema` reaching the server directly.
fn direct_config(server: &Server, db: &Path, sim: &Simulator, schema: &str) -> PostgresConfig {
    let mut settings = TestConfig::new(db, &sim.base_url());
    settings.postgres = Some(server.postgres(&server.direct(), schema));
    settings.config().postgres.expect("postgres")
}

/// A daemon run in-process on a database of the test's choosing.
struct Daemon {
    config: Config,
    webhook_url: String,
    metrics_url: String,
    token: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    async fn start(dir: &Path, db: &Path, sim: &Simulator, extra: &str) -> Daemon {
        let mut settings = TestConfig::new(db, &sim.base_url());
        settings.sections = extra.to_string();
        settings.write(&dir.join("skillsync.toml"));
        let config = settings.config();
        let app = skillsync::app::Application::build(config.clone())
            .await
            .expect("build the daemon");
        let addr = app.address().expect("addr");
        let metrics_url = format!(
            "http://{}/metrics",
            app.metrics_address().expect("metrics on")
        );
        let token = CancellationToken::new();
        let handle = tokio::spawn(app.run(token.clone()));
        let d = Daemon {
            config,
            webhook_url: format!("http://{addr}/skillsevent"),
            metrics_url,
            token,
            handle: Some(handle),
        };
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/healthz");
        wait_until(PATIENCE, "the daemon to serve", || {
            let r = client.get(&url).send();
            async move { r.await.map(|r| r.status() == 200).unwrap_or(false) }
        })
        .await;
        d
    }

    fn pg(&self) -> &PostgresConfig {
        self.config
            .postgres
            .as_ref()
            .expect("[postgres] configured")
    }

    async fn notify(&self, sim: &Simulator, ty: DocType, id: &str, action: &str) -> u16 {
        reqwest::Client::new()
            .post(&self.webhook_url)
            .header("content-type", "application/json")
            .header("x-webhook-secret", SECRET_ACME)
            .body(sim.webhook_payload(ty, id, action).to_string())
            .send()
            .await
            .expect("webhook answered")
            .status()
            .as_u16()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(&self.metrics_url)
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn stop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("daemon task").expect("daemon returned ok");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Waits until SQLite has no work left (every event served, nothing queued).
async fn drained(db: &Path) {
    let db = db.to_path_buf();
    wait_until(PATIENCE, "the fetch queue to drain", || {
        let db = db.clone();
        async move {
            let c = rusqlite::Connection::open(&db).expect("open");
            count(&c, "SELECT count(*) FROM fetch_queue") == 0
                && count(&c, "SELECT count(*) FROM events WHERE status = 'pending'") == 0
        }
    })
    .await;
}

fn sqlite_i64(db: &Path, sql: &str) -> i64 {
    count(&rusqlite::Connection::open(db).expect("open"), sql)
}

#[tokio::test]
async fn backfill_then_steady_state_match_sqlite() {
    let Some((server, token, sim, dir, db)) =
        setup("backfill_then_steady_state_match_sqlite").await
    else {
        return;
    };

    // A running installation without PostgreSQL: jobs, projects, edits, deletions.
    let mut plain = Daemon::start(dir.path(), &db, &sim, "").await;
    let mut jobs = Vec::new();
    for _ in 0..30 {
        let id = sim.create(DocType::Job);
        assert_eq!(plain.notify(&sim, DocType::Job, &id, "created").await, 200);
        jobs.push(id);
    }
    for _ in 0..5 {
        let id = sim.create(DocType::Project);
        assert_eq!(
            plain.notify(&sim, DocType::Project, &id, "created").await,
            200
        );
    }
    drained(&db).await;
    for id in &jobs[..5] {
        sim.update(DocType::Job, id);
        plain.notify(&sim, DocType::Job, id, "updated").await;
    }
    for id in &jobs[5..7] {
        sim.delete(DocType::Job, id);
        plain.notify(&sim, DocType::Job, id, "updated").await;
    }
    drained(&db).await;
    plain.stop().await;
    assert_eq!(
        sqlite_i64(
            &db,
            "SELECT count(*) FROM jobs WHERE deleted_at IS NOT NULL"
        ),
        2
    );

    // Switch PostgreSQL on: the first start backfills everything.
    let schema = fresh_schema();
    let mut d = Daemon::start(
        dir.path(),
        &db,
        &sim,
        &server.section(&server.direct(), &schema),
    )
    .await;
    let pg = d.pg().clone();
    let r = wait_equal(&db, &pg, PATIENCE).await;
    assert_eq!(r.postgres_documents, 35);
    let s = format!("\"{schema}\"");
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.document_history")).await,
        sqlite_i64(&db, "SELECT count(*) FROM document_history")
    );
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.job_report")).await,
        28
    );
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.job_report r JOIN {s}.jobs j USING (tenant, id) WHERE r.number IS NOT DISTINCT FROM j.number AND r.stage IS NOT DISTINCT FROM j.document->>'Stage'")).await,
        28,
        "report columns come from the documents"
    );
    assert_eq!(
        pg_i64(
            &pg,
            format!("SELECT sum(mirrored)::bigint FROM {s}.sync_status")
        )
        .await,
        sqlite_i64(&db, "SELECT sum(mirrored) FROM sync_status")
    );
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.job_stages")).await,
        sqlite_i64(&db, "SELECT count(*) FROM job_stages")
    );

    // Steady state: edits, new documents, an undeletion arrive within seconds.
    for id in &jobs[10..15] {
        sim.update(DocType::Job, id);
        assert_eq!(d.notify(&sim, DocType::Job, id, "updated").await, 200);
    }
    for _ in 0..5 {
        let id = sim.create(DocType::Job);
        d.notify(&sim, DocType::Job, &id, "created").await;
    }
    sim.undelete(DocType::Job, &jobs[5]);
    d.notify(&sim, DocType::Job, &jobs[5], "updated").await;
    drained(&db).await;
    let r = wait_equal(&db, &pg, Duration::from_secs(20)).await;
    assert_eq!(r.postgres_documents, 40);
    assert_eq!(
        pg_i64(
            &pg,
            format!("SELECT count(*) FROM {s}.jobs WHERE deleted_at IS NOT NULL")
        )
        .await,
        1
    );
    // Acknowledged changes leave the outbox.
    wait_until(Duration::from_secs(10), "the outbox to be pruned", || {
        let db = db.clone();
        async move { sqlite_i64(&db, "SELECT count(*) FROM pg_outbox") == 0 }
    })
    .await;
    assert_eq!(d.metric("skillsync_postgres_lag_rows").await, Some(0.0));
    d.stop().await;
    token.cancel();
}

#[tokio::test]
async fn postgres_cut_mid_stream_never_hurts_intake_and_the_backlog_drains() {
    let Some((server, token, sim, dir, db)) =
        setup("postgres_cut_mid_stream_never_hurts_intake_and_the_backlog_drains").await
    else {
        return;
    };
    let proxy = Proxy::start(server.direct()).await;
    let schema = fresh_schema();
    let mut d = Daemon::start(
        dir.path(),
        &db,
        &sim,
        &server.section(&proxy.addr.to_string(), &schema),
    )
    .await;
    // The test itself compares over a direct connection, not through the proxy.
    let pg = direct_config(&server, &db, &sim, &schema);
    for _ in 0..10 {
        let id = sim.create(DocType::Job);
        assert_eq!(d.notify(&sim, DocType::Job, &id, "created").await, 200);
    }
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;

    proxy.cut();
    let started = Instant::now();
    for _ in 0..40 {
        let id = sim.create(DocType::Job);
        assert_eq!(
            d.notify(&sim, DocType::Job, &id, "created").await,
            200,
            "a webhook was refused while PostgreSQL was unreachable"
        );
    }
    let intake = started.elapsed();
    drained(&db).await;
    assert_eq!(
        sqlite_i64(&db, "SELECT count(*) FROM jobs"),
        50,
        "fetches went on"
    );
    assert!(
        intake < Duration::from_secs(10),
        "intake slowed to {intake:?}"
    );
    assert!(d.metric("skillsync_postgres_lag_rows").await.unwrap_or(0.0) >= 40.0);
    // Not asserted here: skillsync_postgres_up is one gauge for the whole
    // process, and other tests' in-process sinks (crashed and restarted on
    // purpose) set it too; this database's truth is `status`, asserted below.
    assert!(!check(&db, &pg).await.equal());
    // Past postgres.lag_alert_secs (2 s), `status` says degraded and why.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(dir.path().join("skillsync.toml"))
        .output()
        .expect("run status");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert!(v["postgres"]["lag_rows"].as_i64().unwrap_or(0) >= 40, "{v}");
    assert!(
        v["postgres"]["problem"]
            .as_str()
            .unwrap_or("")
            .contains("lags"),
        "{v}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout)
            .contains(&std::env::var("PGPASSWORD").unwrap_or_else(|_| "\u{1}".into()))
    );

    proxy.restore();
    let back = Instant::now();
    wait_equal(&db, &pg, PATIENCE).await;
    eprintln!(
        "backlog of 40 drained {:?} after PostgreSQL came back",
        back.elapsed()
    );
    wait_until(Duration::from_secs(10), "lag to reach 0", || {
        let m = d.metric("skillsync_postgres_lag_rows");
        async move { m.await == Some(0.0) }
    })
    .await;
    // The gauge is process-wide: other tests' in-process sinks (crashed on
    // purpose) share it, so wait for every sink in this process to be up.
    wait_until(
        Duration::from_secs(30),
        "skillsync_postgres_up to be 1",
        || {
            let m = d.metric("skillsync_postgres_up");
            async move { m.await == Some(1.0) }
        },
    )
    .await;
    d.stop().await;
    token.cancel();
}

#[tokio::test]
async fn sink_killed_at_random_points_resumes_from_the_postgres_cursor() {
    let Some((server, token, sim, dir, db)) =
        setup("sink_killed_at_random_points_resumes_from_the_postgres_cursor").await
    else {
        return;
    };
    // Documents to backfill, stored by a daemon without PostgreSQL.
    let mut plain = Daemon::start(dir.path(), &db, &sim, "").await;
    let ids: Vec<String> = (0..1000).map(|_| sim.create(DocType::Job)).collect();
    for chunk in ids.chunks(50) {
        let sent = chunk
            .iter()
            .map(|id| plain.notify(&sim, DocType::Job, id, "created"));
        for status in futures_util::future::join_all(sent).await {
            assert_eq!(status, 200);
        }
    }
    drained(&db).await;
    plain.stop().await;

    let schema = fresh_schema();
    let extra = PostgresSettings {
        batch_size: Some(7),
        ..server.postgres(&server.direct(), &schema)
    }
    .section();
    let pg = direct_config(&server, &db, &sim, &schema);
    let client = reqwest::Client::new();
    // Kill -9 the daemon at random moments of the backfill and of the stream
    // of changes after it; each restart resumes from the cursor in PostgreSQL.
    for round in 0..6 {
        let mut p = Process::spawn(dir.path(), &db, &sim, &extra, round);
        let port_line = std::fs::read_to_string(dir.path().join(format!("serve-{round}.toml")))
            .expect("config");
        let listen = port_line
            .lines()
            .find(|l| l.starts_with("listen"))
            .and_then(|l| l.split('"').nth(1))
            .expect("listen")
            .to_string();
        if round == 0 {
            // The first kill lands inside the backfill.
            wait_until(PATIENCE, "the backfill to start", || {
                let log = p.log();
                async move { log.contains("backfill starting") }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
            let log = p.log();
            p.kill();
            assert!(
                !log.contains("backfill done"),
                "the kill came too late:\n{log}"
            );
            continue;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..900))).await;
        for id in ids.iter().skip(round * 20).take(20) {
            sim.update(DocType::Job, id);
            let _ = client
                .post(format!("http://{listen}/skillsevent"))
                .header("content-type", "application/json")
                .header("x-webhook-secret", SECRET_ACME)
                .body(sim.webhook_payload(DocType::Job, id, "updated").to_string())
                .send()
                .await;
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..600))).await;
        p.kill();
    }
    // A last, undisturbed run: everything arrives, nothing twice.
    let p = Process::spawn(dir.path(), &db, &sim, &extra, 99);
    drained(&db).await;
    let r = wait_equal(&db, &pg, PATIENCE).await;
    assert_eq!(r.postgres_documents, 1000);
    let s = format!("\"{schema}\"");
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.document_history")).await,
        sqlite_i64(&db, "SELECT count(*) FROM document_history"),
        "{}",
        p.log()
    );
    token.cancel();
}

#[tokio::test]
async fn a_second_sqlite_database_is_refused() {
    let Some(server) = server("a_second_sqlite_database_is_refused") else {
        return;
    };
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let db_a = dir_a.path().join("a.db");
    let schema = fresh_schema();
    let section = server.section(&server.direct(), &schema);
    let mut a = Daemon::start(dir_a.path(), &db_a, &sim, &section).await;
    let pg = a.pg().clone();
    for _ in 0..5 {
        let id = sim.create(DocType::Job);
        a.notify(&sim, DocType::Job, &id, "created").await;
    }
    drained(&db_a).await;
    wait_equal(&db_a, &pg, PATIENCE).await;
    a.stop().await;
    let mut a = Daemon::start(dir_a.path(), &db_a, &sim, &section).await;
    let id = sim.create(DocType::Job);
    a.notify(&sim, DocType::Job, &id, "created").await;
    drained(&db_a).await;
    wait_equal(&db_a, &pg, PATIENCE).await;
    a.stop().await;
    let cursor_before = pg_i64(&pg, format!("SELECT seq FROM \"{schema}\".sink_cursor")).await;

    // Another database pointed at the same schema.
    let dir_b = tempfile::tempdir().expect("tempdir");
    let db_b = dir_b.path().join("b.db");
    let b = Process::spawn(dir_b.path(), &db_b, &sim, &section, 0);
    wait_until(
        Duration::from_secs(30),
        "the second database to be refused",
        || {
            let log = b.log();
            async move { log.contains("fed by another SQLite database") }
        },
    )
    .await;
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        assert!(
            !b.log().contains(&pw),
            "the log shows the PostgreSQL password"
        );
    }
    drop(b);
    assert_eq!(
        pg_i64(&pg, format!("SELECT seq FROM \"{schema}\".sink_cursor")).await,
        cursor_before,
        "a refused sink wrote nothing"
    );
    assert!(check(&db_a, &pg).await.equal(), "PostgreSQL still equals A");
    token.cancel();
}

/// Puts a backup file in place of the database, as an operator restores one
/// (the daemon is stopped; its WAL and shared memory go with the old file).
fn restore_file(backup: &Path, db: &Path) {
    for ext in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    std::fs::copy(backup, db).expect("restore the backup");
}

/// `status --json`: exit code and the PostgreSQL problem it names.
fn pg_problem(p: &Process) -> (i32, Option<String>) {
    let (code, out) = p.command(&["status", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("status --json");
    (code, v["postgres"]["problem"].as_str().map(str::to_string))
}

/// `n` changes by webhook: updates of `ids` in turn, every other one a new job
/// (pushed onto `ids`).
async fn changes(p: &Process, sim: &Simulator, ids: &mut Vec<String>, n: usize) {
    for i in 0..n {
        if i % 2 == 0 {
            let id = sim.create(DocType::Job);
            assert_eq!(p.notify(sim, DocType::Job, &id, "created").await, 200);
            ids.push(id);
        } else {
            let id = ids[i % ids.len()].clone();
            sim.update(DocType::Job, &id);
            assert_eq!(p.notify(sim, DocType::Job, &id, "updated").await, 200);
        }
    }
}

/// A whole copy held at its first write, the way a busy PostgreSQL holds
/// it: a session of the test's own locks the schema's `jobs` table in SHARE
/// mode. Reads (the sink's schema and cursor checks, `postgres-check`) go
/// through; the copy's first statement, which marks every `jobs` row stale,
/// waits for the lock, after the sink has recorded for `status` that it is
/// copying. The schema must exist. Released by [`HeldCopy::release`] or on drop.
struct HeldCopy {
    /// The quoted `jobs` table of the schema.
    table: String,
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldCopy {
    async fn hold(pg: &PostgresConfig, schema: &str) -> HeldCopy {
        let table = format!("\"{schema}\".jobs");
        let pg = pg.clone();
        let locked_table = table.clone();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let mut c = pg.connect().expect("connect");
            let mut tx = c.transaction().expect("begin");
            tx.batch_execute(&format!("LOCK TABLE {locked_table} IN SHARE MODE"))
                .expect("lock");
            let _ = locked.send(());
            let _ = released.recv();
            let _ = tx.rollback();
        });
        is_locked.await.expect("the lock is taken");
        HeldCopy {
            table,
            release: Some(release),
            thread: Some(thread),
        }
    }

    /// Waits until a session waits for the lock: the copy has reached its
    /// first write and is held there.
    async fn reached(&self, pg: &PostgresConfig) {
        let sql = format!(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '{}'::regclass",
            self.table
        );
        wait_until(
            PATIENCE,
            "the whole copy to wait for the held table",
            || {
                let (pg, sql) = (pg.clone(), sql.clone());
                async move { pg_i64(&pg, sql).await > 0 }
            },
        )
        .await;
    }

    fn release(self) {}
}

impl Drop for HeldCopy {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the whole copy to be started and held ([`HeldCopy`]), checks
/// that `status` is degraded with `reason` and that the copy differs, then
/// releases it.
async fn held_copy_is_reported(
    p: &Process,
    db: &Path,
    pg: &PostgresConfig,
    hold: HeldCopy,
    reason: &str,
) {
    wait_until(PATIENCE, "the whole copy to start (held)", || {
        let log = p.log();
        async move { log.contains("copied whole again") }
    })
    .await;
    hold.reached(pg).await;
    let (code, problem) = pg_problem(p);
    assert_eq!(
        code, 1,
        "status is degraded while PostgreSQL is not following"
    );
    let problem = problem.expect("status names the PostgreSQL problem");
    assert!(problem.contains(reason), "{problem}");
    assert!(!check(db, pg).await.equal(), "the copy differs while held");
    hold.release();
}

#[tokio::test]
async fn a_restored_sqlite_backup_is_copied_again_and_status_says_why() {
    let Some((server, token, sim, dir, db)) =
        setup("a_restored_sqlite_backup_is_copied_again_and_status_says_why").await
    else {
        return;
    };
    let schema = fresh_schema();
    let section = server.section(&server.direct(), &schema);
    let pg = direct_config(&server, &db, &sim, &schema);
    let p = Process::spawn(dir.path(), &db, &sim, &section, 0);
    p.ready().await;
    let mut ids = Vec::new();
    changes(&p, &sim, &mut ids, 20).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    // The backup, taken beside the running daemon.
    let backup = dir.path().join("backup.db");
    let (code, out) = p.command(&["backup", backup.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "backup: {out}");
    // 50 changes after it, copied to PostgreSQL (the cursor moves past the backup's outbox).
    changes(&p, &sim, &mut ids, 50).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    terminate(p);

    // The disk fails; the backup comes back.
    restore_file(&backup, &db);
    let hold = HeldCopy::hold(&pg, &schema).await;
    let p = Process::spawn(dir.path(), &db, &sim, &section, 1);
    p.ready().await;
    // 50 new changes by webhook, some of them while the copy waits.
    let mut fresh: Vec<String> = ids[..20].to_vec();
    changes(&p, &sim, &mut fresh, 25).await;
    held_copy_is_reported(&p, &db, &pg, hold, "SQLite is behind PostgreSQL").await;
    changes(&p, &sim, &mut fresh, 25).await;
    drained(&db).await;
    let r = wait_equal(&db, &pg, PATIENCE).await;
    assert_eq!(r.postgres_documents, r.sqlite_documents);
    let s = format!("\"{schema}\"");
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.document_history")).await,
        sqlite_i64(&db, "SELECT count(*) FROM document_history"),
        "the abandoned history's revisions are gone from PostgreSQL"
    );
    let (code, out) = p.command(&["postgres-check"]);
    assert_eq!(code, 0, "postgres-check: {out}");
    wait_until(
        Duration::from_secs(20),
        "status to be healthy again",
        || {
            let healthy = pg_problem(&p) == (0, None);
            async move { healthy }
        },
    )
    .await;
    assert!(
        p.log().contains("SQLite is behind PostgreSQL"),
        "the reason is logged"
    );
    token.cancel();
}

#[tokio::test]
async fn a_restored_sqlite_that_wrote_past_the_cursor_while_postgres_was_away_is_copied_again() {
    let Some((server, token, sim, dir, db)) = setup(
        "a_restored_sqlite_that_wrote_past_the_cursor_while_postgres_was_away_is_copied_again",
    )
    .await
    else {
        return;
    };
    let proxy = Proxy::start(server.direct()).await;
    let schema = fresh_schema();
    let section = server.section(&proxy.addr.to_string(), &schema);
    let pg = direct_config(&server, &db, &sim, &schema);
    let p = Process::spawn(dir.path(), &db, &sim, &section, 0);
    p.ready().await;
    let mut ids = Vec::new();
    changes(&p, &sim, &mut ids, 20).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    let backup = dir.path().join("backup.db");
    let (code, out) = p.command(&["backup", backup.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "backup: {out}");
    changes(&p, &sim, &mut ids, 30).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    terminate(p);
    let cursor = pg_i64(&pg, format!("SELECT seq FROM \"{schema}\".sink_cursor")).await;

    // The backup comes back while PostgreSQL is out of reach, and the restored
    // database writes more changes than the backup was behind: its outbox
    // passes PostgreSQL's cursor with other changes under the same seqs.
    restore_file(&backup, &db);
    proxy.cut();
    let p = Process::spawn(dir.path(), &db, &sim, &section, 1);
    p.ready().await;
    let mut fresh: Vec<String> = ids[..20].to_vec();
    changes(&p, &sim, &mut fresh, 60).await;
    drained(&db).await;
    let max_seq = sqlite_i64(
        &db,
        "SELECT seq FROM sqlite_sequence WHERE name = 'pg_outbox'",
    );
    assert!(
        max_seq > cursor,
        "the outbox ({max_seq}) passed the cursor ({cursor})"
    );
    proxy.restore();
    wait_equal(&db, &pg, PATIENCE).await;
    assert!(
        p.log().contains("is not the one PostgreSQL copied"),
        "the fingerprint mismatch is the logged reason:\n{}",
        p.log()
    );
    // On a blocking thread: it reaches PostgreSQL through the proxy, which
    // runs on this test's runtime.
    let mut cmd = p.cmd(&["postgres-check"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("postgres-check"))
        .await
        .expect("thread");
    assert!(
        out.status.success(),
        "postgres-check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    token.cancel();
}

#[tokio::test]
async fn a_restored_postgres_dump_is_copied_again() {
    let Some((server, token, sim, dir, db)) =
        setup("a_restored_postgres_dump_is_copied_again").await
    else {
        return;
    };
    let schema = fresh_schema();
    let section = server.section(&server.direct(), &schema);
    let pg = direct_config(&server, &db, &sim, &schema);
    let p = Process::spawn(dir.path(), &db, &sim, &section, 0);
    p.ready().await;
    let mut ids = Vec::new();
    changes(&p, &sim, &mut ids, 20).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    let dump = dir.path().join("schema.dump");
    let st = Command::new("pg_dump")
        .args(["-Fc", "-n", &schema, "-d", &server.database, "-f"])
        .arg(&dump)
        .status()
        .expect("pg_dump");
    assert!(st.success());
    // 50 changes, copied and acknowledged: the outbox is pruned past them.
    changes(&p, &sim, &mut ids, 50).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    wait_until(PATIENCE, "the outbox to be pruned", || {
        let db = db.clone();
        async move {
            sqlite_i64(&db, "SELECT count(*) FROM pg_outbox") == 0
                && sqlite_i64(
                    &db,
                    "SELECT acked_seq = (SELECT seq FROM sqlite_sequence WHERE name = 'pg_outbox') FROM pg_sink",
                ) == 1
        }
    })
    .await;
    terminate(p);

    // PostgreSQL comes back from the dump (a restore, or a lagging replica promoted).
    let psql = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &server.database, "-c"])
        .arg(format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .status()
        .expect("psql");
    assert!(psql.success());
    let st = Command::new("pg_restore")
        .args(["-d", &server.database])
        .arg(&dump)
        .status()
        .expect("pg_restore");
    assert!(st.success());
    assert!(!check(&db, &pg).await.equal(), "the dump is behind SQLite");

    let hold = HeldCopy::hold(&pg, &schema).await;
    let p = Process::spawn(dir.path(), &db, &sim, &section, 1);
    p.ready().await;
    held_copy_is_reported(&p, &db, &pg, hold, "PostgreSQL is behind SQLite").await;
    changes(&p, &sim, &mut ids, 20).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    let (code, out) = p.command(&["postgres-check"]);
    assert_eq!(code, 0, "postgres-check: {out}");
    wait_until(
        Duration::from_secs(20),
        "status to be healthy again",
        || {
            let healthy = pg_problem(&p) == (0, None);
            async move { healthy }
        },
    )
    .await;
    token.cancel();
}

#[tokio::test]
async fn a_report_rebuild_killed_before_its_copy_is_filled_at_restart() {
    let Some((server, token, sim, dir, db)) =
        setup("a_report_rebuild_killed_before_its_copy_is_filled_at_restart").await
    else {
        return;
    };
    let schema = fresh_schema();
    let section = server.section(&server.direct(), &schema);
    let pg = direct_config(&server, &db, &sim, &schema);
    let p = Process::spawn(dir.path(), &db, &sim, &section, 0);
    p.ready().await;
    let mut ids = Vec::new();
    changes(&p, &sim, &mut ids, 30).await;
    drained(&db).await;
    wait_equal(&db, &pg, PATIENCE).await;
    terminate(p);

    // A new report column: the report tables are rebuilt, then the daemon is
    // killed (-9) before the copy that fills them.
    let reporting = "[reporting.job]\nclient_again = \"$.Client\"\n";
    let extra = format!("{section}{reporting}");
    let hold = HeldCopy::hold(&pg, &schema).await;
    let mut p = Process::spawn(dir.path(), &db, &sim, &extra, 1);
    wait_until(PATIENCE, "the rebuild's copy to start (held)", || {
        let log = p.log();
        async move { log.contains("new shape") }
    })
    .await;
    hold.reached(&pg).await;
    p.kill();
    let config = Config::from_toml(
        &std::fs::read_to_string(dir.path().join("serve-1.toml")).expect("config"),
        None,
    )
    .expect("config");
    let s = format!("\"{schema}\"");
    assert_eq!(
        pg_i64(&pg, format!("SELECT count(*) FROM {s}.job_report_values")).await,
        0,
        "the rebuilt report table is empty"
    );
    assert_eq!(
        pg_i64(
            &pg,
            format!("SELECT count(*) FROM {s}.meta WHERE key = 'report_hash'")
        )
        .await,
        0,
        "no report hash without the copy that fills the tables"
    );
    let half = check_with(&db, &pg, &config.reporting).await;
    assert!(
        half.differences
            .iter()
            .any(|d| d.contains("no job_report_values row")),
        "postgres-check shows the half-built report: {:?}",
        half.differences
    );
    hold.release();

    let p = Process::spawn(dir.path(), &db, &sim, &extra, 2);
    p.ready().await;
    wait_until(PATIENCE, "the report to be filled", || {
        let (db, pg, r) = (db.clone(), pg.clone(), config.reporting.clone());
        async move { check_with(&db, &pg, &r).await.equal() }
    })
    .await;
    assert_eq!(
        pg_i64(
            &pg,
            format!("SELECT count(*) FROM {s}.job_report WHERE client_again IS NOT NULL")
        )
        .await,
        sqlite_i64(
            &db,
            "SELECT count(*) FROM job_report WHERE client_again IS NOT NULL"
        ),
    );
    let (code, out) = p.command(&["postgres-check"]);
    assert_eq!(code, 0, "postgres-check: {out}");
    token.cancel();
}

/// One random step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Upsert(usize),
    Delete(usize),
    Undelete(usize),
    /// The sink dies after this many steps (mid-transaction, after a commit, after an ack).
    Crash(i64),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0usize..8).prop_map(Op::Upsert),
        2 => (0usize..8).prop_map(Op::Delete),
        2 => (0usize..8).prop_map(Op::Undelete),
        2 => (0i64..12).prop_map(Op::Crash),
    ]
}

async fn property_case(server: &Server, ops: Vec<Op>) {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("skillsync.db");
    let mut d = Daemon::start(dir.path(), &db, &sim, "").await;
    // The test owns the sink (to crash it at chosen steps); the daemon stores.
    let schema = fresh_schema();
    let mut settings = TestConfig::new(&db, &sim.base_url());
    settings.postgres = Some(server.postgres(&server.direct(), &schema));
    let config = settings.config();
    let pg = config.postgres.clone().expect("postgres");
    let store = skillsync::app::open_store(&config, skillsync::store::ReportRole::Owner)
        .await
        .expect("store");
    let spec = skillsync::reporting::ReportSpec::new(&config.reporting);
    // Started from a runtime thread: the sink's thread needs no runtime.
    let sink = sink::start(pg, store, spec).expect("sink");
    let pg = config.postgres.clone().expect("postgres");
    let ids: Vec<String> = (0..8).map(|_| sim.create(DocType::Job)).collect();
    let mut known = vec![false; ids.len()];
    for op in ops {
        match op {
            Op::Upsert(i) => {
                if known[i] {
                    sim.update(DocType::Job, &ids[i]);
                }
                known[i] = true;
                d.notify(&sim, DocType::Job, &ids[i], "updated").await;
            }
            Op::Delete(i) => {
                sim.delete(DocType::Job, &ids[i]);
                d.notify(&sim, DocType::Job, &ids[i], "updated").await;
            }
            Op::Undelete(i) => {
                sim.undelete(DocType::Job, &ids[i]);
                d.notify(&sim, DocType::Job, &ids[i], "updated").await;
            }
            Op::Crash(steps) => sink.crash_after(steps),
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
    }
    drained(&db).await;
    sink.crash_after(-1);
    wait_equal(&db, &pg, PATIENCE).await;
    on_thread(move || sink.stop()).await;
    d.stop().await;
    token.cancel();
}

#[test]
fn property_postgres_equals_sqlite_after_random_changes_and_sink_crashes() {
    use proptest::prelude::*;
    let Some(server) =
        server("property_postgres_equals_sqlite_after_random_changes_and_sink_crashes")
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 4,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 10..30), |ops| {
            rt.block_on(property_case(&server, ops));
            Ok(())
        })
        .expect("PostgreSQL equals SQLite for every case");
}
