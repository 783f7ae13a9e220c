//! Crash and troubled-disk tests through the real `skillsync serve` binary.
//!
//! - SIGKILL while many senders post: no acknowledged event may be missing
//!   after a restart, and the file must pass `PRAGMA integrity_check`.
//! - Repeated SIGKILLs at random points under load, then a final run: nothing
//!   acknowledged is lost and every event ends `done` (the fetchers pick up
//!   the work, including leases a killed process left behind).
//! - A troubled disk: the database locked by another process past
//!   `busy_timeout_ms`, a full filesystem (a small tmpfs), and a database
//!   directory that is missing or read-only at start-up.
//!
//! The full-disk and read-only tests mount a tmpfs or a read-only bind
//! mount, which needs root (CAP_SYS_ADMIN); root ignores permission bits, so
//! `chmod 0555` alone cannot make a directory read-only for it. Where neither
//! works these tests fail saying so; `SKILLSYNC_TEST_NO_MOUNT=1` skips just
//! those steps on such machines. `SKILLSYNC_CRASH_SEED=N` repeats a random
//! kill schedule.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use skillsync::model::DocType;
use skillsync::simulator::{Simulator, send_webhooks};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

/// Fetch settings for the crash tests. A killed process's leases last
/// `2 × timeout_secs + 5` s (`fetcher::fetch_lease`), so a small timeout keeps the
/// final drain short; many attempts keep a slow, shared machine's timeouts
/// from turning into dead events.
fn crash_fetch() -> FetchSettings {
    FetchSettings::quick(8, 50)
}

/// How long a daemon may take to come up, or work to drain, before a test
/// gives up (a bound on polling, not a performance claim).
const PATIENCE: Duration = Duration::from_secs(100);

/// Names config and log files uniquely across the tests of this binary.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// What a daemon run needs besides its port.
struct Setup {
    /// Where configs and logs go (never on a test's small filesystem).
    dir: PathBuf,
    db: PathBuf,
    /// The config, but for the port each start picks.
    settings: TestConfig,
}

impl Setup {
    /// Configs and logs in `dir`, the database `skillsync.db` in `db_dir`.
    fn new(dir: &Path, db_dir: &Path, sim: &Simulator, fetch: FetchSettings, busy: u64) -> Setup {
        let db = db_dir.join("skillsync.db");
        let mut settings = TestConfig::new(&db, &sim.base_url());
        settings.fetch = fetch;
        settings.database.busy_timeout_ms = busy;
        Setup {
            dir: dir.to_path_buf(),
            db,
            settings,
        }
    }

    /// The config with the public listener on `port`.
    fn toml(&self, port: u16) -> String {
        self.settings.clone().on_port(port).toml()
    }
}

/// `dir/data`, created: a database directory a test can make read-only.
fn data_dir(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir(&data).expect("mkdir data");
    data
}

/// A `skillsync serve` process; SIGKILLed on drop.
struct Daemon {
    child: Child,
    base: String,
    config: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the binary without waiting for it.
    fn spawn(s: &Setup) -> Daemon {
        let port = free_port();
        let n = RUNS.fetch_add(1, Ordering::SeqCst);
        let config = s.dir.join(format!("skillsync-{n}.toml"));
        std::fs::write(&config, s.toml(port)).expect("write config");
        let log = s.dir.join(format!("daemon-{n}.log"));
        let stderr = File::create(&log).expect("create log file");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,tokio_cron_scheduler=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start skillsync serve");
        Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            config,
            log,
        }
    }

    /// Starts the binary and waits until `/healthz` answers 200.
    async fn start(s: &Setup) -> Daemon {
        let mut d = Daemon::spawn(s);
        let client = client();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = d.child.try_wait().expect("try_wait") {
                panic!(
                    "skillsync serve exited during start-up ({st}):\n{}",
                    d.log_tail()
                );
            }
            if d.healthz(&client).await == Some(200) {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "skillsync serve not healthy within {PATIENCE:?}:\n{}",
                d.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the process exits (`Ok`) or answers `/healthz` at all,
    /// i.e. it started serving (`Err` with that status).
    async fn exit_or_serving(&mut self) -> Result<ExitStatus, u16> {
        let client = client();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Ok(st);
            }
            if let Some(status) = self.healthz(&client).await {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "skillsync serve neither exited nor served within {PATIENCE:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn healthz(&self, client: &reqwest::Client) -> Option<u16> {
        let r = client.get(format!("{}/healthz", self.base)).send().await;
        r.ok().map(|r| r.status().as_u16())
    }

    fn webhook_url(&self) -> String {
        format!("{}/skillsevent", self.base)
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL skillsync");
        self.child.wait().expect("reap skillsync");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    setup();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A webhook answer with what the tests look at.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl Answer {
    fn event_id(&self) -> i64 {
        self.body["event_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("200 answer without an event_id: {self:?}"))
    }

    /// Asserts a usable `Retry-After` (whole seconds, at least 1).
    fn assert_retry_after(&self) {
        let secs = self
            .retry_after
            .as_deref()
            .and_then(|v| v.trim().parse::<u64>().ok());
        assert!(
            secs.is_some_and(|s| s >= 1),
            "503 without a Retry-After of whole seconds: {self:?}"
        );
    }
}

async fn post_event(client: &reqwest::Client, url: &str, payload: &Value) -> Answer {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET_ACME)
        .body(payload.to_string())
        .send()
        .await
        .expect("webhook answered");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        body,
    }
}

/// A read-only connection to the daemon's database file.
fn ro(db: &Path) -> Connection {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", db.display()));
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

fn events(db: &Path) -> i64 {
    count(&ro(db), "SELECT count(*) FROM events")
}

/// Every row of `PRAGMA integrity_check`, joined ("ok" when intact).
fn integrity(db: &Path) -> String {
    let c = ro(db);
    let mut st = c.prepare("PRAGMA integrity_check").expect("prepare");
    let rows: Vec<String> = st
        .query_map([], |r| r.get(0))
        .expect("integrity_check")
        .collect::<Result<_, _>>()
        .expect("integrity rows");
    rows.join("; ")
}

/// The doc id of event `id`, if that row exists.
fn event_doc(db: &Path, id: i64) -> Option<String> {
    ro(db)
        .query_row("SELECT doc_id FROM events WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .ok()
}

fn events_for_doc(db: &Path, doc_id: &str) -> i64 {
    ro(db)
        .query_row(
            "SELECT count(*) FROM events WHERE doc_id = ?1",
            [doc_id],
            |r| r.get(0),
        )
        .expect("count events for doc")
}

/// Acknowledged ids with no row in `events`.
fn lost(db: &Path, acked: &[i64]) -> Vec<i64> {
    let c = ro(db);
    let mut st = c.prepare("SELECT id FROM events").expect("prepare");
    let present: HashSet<i64> = st
        .query_map([], |r| r.get(0))
        .expect("event ids")
        .collect::<Result<_, _>>()
        .expect("event id rows");
    acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect()
}

/// Ids acknowledged more than once (a reused id means an earlier ack was lost).
fn duplicates(acked: &[i64]) -> Vec<i64> {
    let mut seen = HashSet::new();
    acked
        .iter()
        .copied()
        .filter(|id| !seen.insert(*id))
        .collect()
}

/// Waits until `events` holds at least `n` rows.
async fn wait_for_events(db: &Path, n: i64) {
    let db = db.to_path_buf();
    wait_until(PATIENCE, &format!("{n} rows in events"), || {
        let db = db.clone();
        async move { events(&db) >= n }
    })
    .await;
}

/// Waits until no event is left undone; on time-out, says what is stuck.
async fn wait_all_done(db: &Path, d: &mut Daemon) {
    let start = Instant::now();
    loop {
        let open = count(
            &ro(db),
            "SELECT count(*) FROM events WHERE status <> 'done'",
        );
        if open == 0 {
            return;
        }
        if let Some(st) = d.child.try_wait().expect("try_wait") {
            panic!(
                "skillsync serve exited ({st}) with {open} events not done:\n{}",
                d.log_tail()
            );
        }
        if start.elapsed() > PATIENCE {
            let c = ro(db);
            let mut st = c
                .prepare("SELECT status, count(*) FROM events GROUP BY status")
                .expect("prepare");
            let by_status: Vec<(String, i64)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("by status")
                .collect::<Result<_, _>>()
                .expect("rows");
            let mut st = c
                .prepare(
                    "SELECT status, count(*), count(lease_owner), max(attempts), group_concat(DISTINCT last_error_class)
                     FROM fetch_queue GROUP BY status",
                )
                .expect("prepare");
            let queue: Vec<String> = st
                .query_map([], |r| {
                    Ok(format!(
                        "{}: {} rows, {} leased, max attempts {}, errors {:?}",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?
                    ))
                })
                .expect("queue")
                .collect::<Result<_, _>>()
                .expect("rows");
            panic!(
                "events not all done after {PATIENCE:?}: events {by_status:?}; fetch_queue {queue:?}\n{}",
                d.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A random generator, its seed printed (and taken from
/// `SKILLSYNC_CRASH_SEED` when set) so a failing schedule can be repeated.
fn seeded_rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("SKILLSYNC_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("{test}: seed {seed} (SKILLSYNC_CRASH_SEED={seed} repeats it)");
    fastrand::Rng::with_seed(seed)
}

/// `n` valid webhooks for random existing documents.
fn payloads(
    sim: &Simulator,
    docs: &[(DocType, String)],
    n: usize,
    rng: &mut fastrand::Rng,
) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let (ty, id) = &docs[rng.usize(..docs.len())];
            let action = if rng.bool() { "updated" } else { "created" };
            sim.webhook_payload(*ty, id, action)
        })
        .collect()
}

fn seed_docs(sim: &Simulator, jobs: usize, projects: usize) -> Vec<(DocType, String)> {
    let mut docs: Vec<_> = sim
        .seed(DocType::Job, jobs)
        .into_iter()
        .map(|id| (DocType::Job, id))
        .collect();
    docs.extend(
        sim.seed(DocType::Project, projects)
            .into_iter()
            .map(|id| (DocType::Project, id)),
    );
    docs
}

/// Sends in the background, so the test can kill the daemon meanwhile.
fn send_in_background(
    url: String,
    payloads: Vec<Value>,
) -> tokio::task::JoinHandle<skillsync::simulator::SendReport> {
    tokio::spawn(async move { send_webhooks(&url, SECRET_ACME, payloads, 32, None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_senders_post_loses_no_acknowledged_event() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let docs = seed_docs(&sim, 100, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(dir.path(), dir.path(), &sim, crash_fetch(), 5000);
    let mut rng = seeded_rng("kill_9");

    let mut daemon = Daemon::start(&setup).await;
    let sender = send_in_background(daemon.webhook_url(), payloads(&sim, &docs, 3000, &mut rng));
    let kill_at = rng.i64(100..=800);
    wait_for_events(&setup.db, kill_at).await;
    daemon.kill9();
    let report = sender.await.expect("senders");

    let unanswered = report.statuses.get(&0).copied().unwrap_or(0);
    assert!(
        unanswered > 0,
        "the kill must land while senders post, but all 3000 were answered: {:?}",
        report.statuses
    );
    assert!(
        !report.acked.is_empty(),
        "no event acknowledged before the kill: {:?}",
        report.statuses
    );
    assert!(
        report.statuses.keys().all(|s| *s == 200 || *s == 0),
        "answers other than 200 (or none, after the kill): {:?}",
        report.statuses
    );

    // Restart on the same file: SQLite recovers the WAL, the daemon serves again.
    let daemon = Daemon::start(&setup).await;
    let missing = lost(&setup.db, &report.acked);
    let dups = duplicates(&report.acked);
    let recorded = events(&setup.db);
    println!(
        "kill -9: {} acknowledged, {unanswered} unanswered at the kill, {recorded} recorded, lost {}",
        report.acked.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged events missing after kill -9 and restart: {missing:?}"
    );
    assert!(dups.is_empty(), "event ids acknowledged twice: {dups:?}");
    assert_eq!(integrity(&setup.db), "ok", "integrity_check after kill -9");

    let c = client();
    let id = sim.create(DocType::Job);
    let a = post_event(
        &c,
        &daemon.webhook_url(),
        &sim.webhook_payload(DocType::Job, &id, "created"),
    )
    .await;
    assert_eq!(a.status, 200, "restarted daemon refused an event: {a:?}");
    assert_eq!(event_doc(&setup.db, a.event_id()), Some(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_kill_9_under_load_loses_nothing_and_finishes_all_work() {
    const KILLS: usize = 5;
    const PER_ROUND: usize = 800;
    const FINAL: usize = 300;

    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let docs = seed_docs(&sim, 120, 40);
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(dir.path(), dir.path(), &sim, crash_fetch(), 5000);
    let mut rng = seeded_rng("crash_suite");

    let mut acked: Vec<i64> = Vec::new();
    let mut statuses: HashMap<u16, u64> = HashMap::new();
    let mut kills = 0;
    let mut db_exists = false;
    for round in 1..=KILLS {
        let mut daemon = Daemon::start(&setup).await;
        let before = if db_exists { events(&setup.db) } else { 0 };
        db_exists = true;
        let sender = send_in_background(
            daemon.webhook_url(),
            payloads(&sim, &docs, PER_ROUND, &mut rng),
        );
        // Anywhere from the first event to three quarters of the round.
        let kill_at = before + rng.i64(1..=(PER_ROUND as i64 * 3 / 4));
        wait_for_events(&setup.db, kill_at).await;
        daemon.kill9();
        kills += 1;
        let report = sender.await.expect("senders");
        println!(
            "round {round}: killed at >= {kill_at} events; {} acknowledged, answers {:?}",
            report.acked.len(),
            report.statuses
        );
        acked.extend(&report.acked);
        for (k, v) in report.statuses {
            *statuses.entry(k).or_default() += v;
        }
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 0),
        "answers other than 200 (or none, after a kill): {statuses:?}"
    );

    // The last run: more load, no kill, then the queue drains.
    let mut daemon = Daemon::start(&setup).await;
    let report = send_webhooks(
        &daemon.webhook_url(),
        SECRET_ACME,
        payloads(&sim, &docs, FINAL, &mut rng),
        32,
        None,
    )
    .await;
    assert_eq!(
        report.acked.len(),
        FINAL,
        "final run refused events: {:?}",
        report.statuses
    );
    acked.extend(&report.acked);
    wait_all_done(&setup.db, &mut daemon).await;

    let missing = lost(&setup.db, &acked);
    let dups = duplicates(&acked);
    let recorded = events(&setup.db);
    println!(
        "crash suite: {} events acknowledged, {kills} kills, {} lost; {recorded} recorded \
         ({} committed but never answered), all done",
        acked.len(),
        missing.len(),
        recorded - acked.len() as i64
    );
    assert!(
        missing.is_empty(),
        "acknowledged events lost across {kills} kills: {missing:?}"
    );
    assert!(dups.is_empty(), "event ids acknowledged twice: {dups:?}");
    assert_eq!(
        integrity(&setup.db),
        "ok",
        "integrity_check after {kills} kills"
    );
    let unmirrored = count(
        &ro(&setup.db),
        "SELECT count(*) FROM (SELECT DISTINCT doc_type, doc_id FROM events) e
         WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE e.doc_type = 'job' AND j.id = e.doc_id AND j.deleted_at IS NULL)
           AND NOT EXISTS (SELECT 1 FROM projects p WHERE e.doc_type = 'project' AND p.id = e.doc_id AND p.deleted_at IS NULL)",
    );
    assert_eq!(
        unmirrored, 0,
        "documents with done events but no mirror row"
    );

    let out = Command::new(BIN)
        .arg("status")
        .arg("--config")
        .arg(&daemon.config)
        .arg("--json")
        .output()
        .expect("run skillsync status");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "status after the crash suite is not healthy: {status}"
    );
    let pending: i64 = status["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| t["pending"].as_i64().unwrap_or(-1))
        .sum();
    assert_eq!(pending, 0, "status still reports pending events: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_locked_past_busy_timeout_answers_503_and_records_nothing() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(dir.path(), dir.path(), &sim, FetchSettings::fast(), 200);
    let daemon = Daemon::start(&setup).await;
    let c = client();

    // Another process (this test) holds the write lock.
    let locker = Connection::open(&setup.db).expect("open db read-write");
    locker
        .busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    let refused = sim.create(DocType::Job);
    let a = post_event(
        &c,
        &daemon.webhook_url(),
        &sim.webhook_payload(DocType::Job, &refused, "created"),
    )
    .await;
    assert_eq!(a.status, 503, "webhook while the database is locked: {a:?}");
    a.assert_retry_after();
    assert_eq!(
        daemon.healthz(&c).await,
        Some(503),
        "/healthz while the database is locked"
    );
    locker.execute_batch("ROLLBACK").expect("release the lock");
    drop(locker);

    let accepted = sim.create(DocType::Job);
    let b = post_event(
        &c,
        &daemon.webhook_url(),
        &sim.webhook_payload(DocType::Job, &accepted, "created"),
    )
    .await;
    assert_eq!(b.status, 200, "webhook after the lock was released: {b:?}");
    assert_eq!(event_doc(&setup.db, b.event_id()), Some(accepted));
    // Writes are committed in order, so a late insert of the refused event
    // would be visible by now.
    assert_eq!(
        events_for_doc(&setup.db, &refused),
        0,
        "the event answered 503 was recorded anyway"
    );
}

/// A mount made for one test, undone on drop (lazily, so a daemon still
/// holding files there cannot keep it busy).
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let opt = format!("size={size}");
        run_cmd(
            "mount",
            &[
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                opt.as_ref(),
                "tmpfs".as_ref(),
                path.as_os_str(),
            ],
        )?;
        Ok(Mount {
            path: path.to_path_buf(),
        })
    }

    fn read_only_bind(path: &Path) -> Result<Mount, String> {
        run_cmd(
            "mount",
            &["--bind".as_ref(), path.as_os_str(), path.as_os_str()],
        )?;
        let m = Mount {
            path: path.to_path_buf(),
        };
        run_cmd(
            "mount",
            &["-o".as_ref(), "remount,bind,ro".as_ref(), path.as_os_str()],
        )?;
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn run_cmd(cmd: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A mount this machine will not make: fail, unless told to skip.
fn cannot_mount(why: &str) {
    if std::env::var_os("SKILLSYNC_TEST_NO_MOUNT").is_some() {
        println!("SKIPPED (SKILLSYNC_TEST_NO_MOUNT set): {why}");
        return;
    }
    panic!(
        "this test needs a mount (run as root with CAP_SYS_ADMIN), or set SKILLSYNC_TEST_NO_MOUNT=1 to skip it: {why}"
    );
}

/// A directory no write can reach: a read-only bind mount, or, for a user
/// that permission bits stop (not root), mode 0555. Undone on drop.
enum ReadOnlyDir {
    Mounted(#[allow(dead_code)] Mount),
    Chmod(PathBuf),
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        if let ReadOnlyDir::Chmod(p) = self {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
        }
    }
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(".write-probe");
    let ok = File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn make_read_only(dir: &Path) -> Result<ReadOnlyDir, String> {
    let ro = match Mount::read_only_bind(dir) {
        Ok(m) => ReadOnlyDir::Mounted(m),
        Err(mount_err) => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
                .map_err(|e| format!("{mount_err}; chmod: {e}"))?;
            let ro = ReadOnlyDir::Chmod(dir.to_path_buf());
            if writable(dir) {
                return Err(format!(
                    "{mount_err}; and mode 0555 does not stop this user (root ignores permission bits)"
                ));
            }
            ro
        }
    };
    assert!(!writable(dir), "{} is still writable", dir.display());
    Ok(ro)
}

/// Fills the filesystem holding `path` with a file until it is full.
fn fill(path: &Path) -> u64 {
    let mut f = File::create(path).expect("create filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    // Bounded: far more iterations than a small test filesystem can take.
    for _ in 0..1_000_000 {
        match f.write(&chunk) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return written, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    panic!("{} never filled up", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_keeps_the_file_intact_and_recovers() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    let _mount = match Mount::tmpfs(&small, "8m") {
        Ok(m) => m,
        Err(e) => return cannot_mount(&e),
    };
    let setup = Setup::new(dir.path(), &small, &sim, FetchSettings::fast(), 1000);
    let daemon = Daemon::start(&setup).await;
    let c = client();
    let url = daemon.webhook_url();

    let mut accepted: Vec<(i64, String)> = Vec::new();
    for _ in 0..5 {
        let id = sim.create(DocType::Job);
        let a = post_event(&c, &url, &sim.webhook_payload(DocType::Job, &id, "created")).await;
        assert_eq!(a.status, 200, "webhook before the disk filled: {a:?}");
        accepted.push((a.event_id(), id));
    }

    let filler = small.join("filler");
    let filled = fill(&filler);
    let mut refused: Vec<String> = Vec::new();
    let mut accepted_while_full = 0;
    for _ in 0..500 {
        let id = sim.create(DocType::Job);
        let a = post_event(&c, &url, &sim.webhook_payload(DocType::Job, &id, "created")).await;
        match a.status {
            200 => {
                accepted_while_full += 1;
                accepted.push((a.event_id(), id));
            }
            503 => {
                a.assert_retry_after();
                refused.push(id);
                if refused.len() >= 3 {
                    break;
                }
            }
            _ => panic!("webhook on a full disk: {a:?}\n{}", daemon.log_tail()),
        }
    }
    println!(
        "full disk: filler {filled} bytes; {accepted_while_full} accepted into space already held, {} refused",
        refused.len()
    );
    assert!(
        !refused.is_empty(),
        "the disk is full, yet 500 webhooks all got 200\n{}",
        daemon.log_tail()
    );
    for (event_id, doc) in &accepted {
        assert_eq!(
            event_doc(&setup.db, *event_id).as_ref(),
            Some(doc),
            "event {event_id} was answered 200 but has no row"
        );
    }
    assert_eq!(integrity(&setup.db), "ok", "integrity_check on a full disk");

    std::fs::remove_file(&filler).expect("remove filler");
    wait_until(PATIENCE, "/healthz 200 once space returns", || {
        let (d, c) = (&daemon, &c);
        async move { d.healthz(c).await == Some(200) }
    })
    .await;
    let id = sim.create(DocType::Job);
    let a = post_event(&c, &url, &sim.webhook_payload(DocType::Job, &id, "created")).await;
    assert_eq!(a.status, 200, "webhook after space returned: {a:?}");
    assert_eq!(event_doc(&setup.db, a.event_id()), Some(id));
    for doc in &refused {
        assert_eq!(
            events_for_doc(&setup.db, doc),
            0,
            "an event answered 503 on the full disk was recorded anyway"
        );
    }
    assert_eq!(integrity(&setup.db), "ok", "integrity_check after recovery");
}

/// Asserts the daemon refuses to start: non-zero exit, `path` in its message.
async fn assert_refuses_to_start(setup: &Setup, path: &Path) {
    let mut d = Daemon::spawn(setup);
    match d.exit_or_serving().await {
        Ok(st) => {
            let log = d.log_text();
            assert!(
                !st.success(),
                "skillsync serve exited 0 on a bad database directory:\n{log}"
            );
            assert!(
                log.contains(&path.display().to_string()),
                "start-up error does not name {}:\n{log}",
                path.display()
            );
        }
        Err(health) => panic!(
            "skillsync serve started serving (/healthz {health}) instead of exiting at start-up \
             with database {}:\n{}",
            setup.db.display(),
            d.log_tail()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_database_directory_stops_start_up_naming_it() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-dir");
    let setup = Setup::new(dir.path(), &missing, &sim, FetchSettings::fast(), 1000);
    assert_refuses_to_start(&setup, &missing).await;
    assert!(!missing.exists(), "start-up created {}", missing.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_empty_database_directory_stops_start_up_naming_it() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir(dir.path());
    let setup = Setup::new(dir.path(), &data, &sim, FetchSettings::fast(), 1000);
    let _ro = match make_read_only(&data) {
        Ok(r) => r,
        Err(e) => return cannot_mount(&e),
    };
    assert_refuses_to_start(&setup, &setup.db).await;
}

/// The database a crashed daemon left (with its `-wal` and `-shm`), on a
/// directory that has since become read-only: starting must fail as loudly
/// as on an empty read-only directory, not serve 503s forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_directory_with_a_crashed_database_stops_start_up_naming_it() {
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_dir(dir.path());
    let setup = Setup::new(dir.path(), &data, &sim, FetchSettings::fast(), 1000);
    {
        let mut d = Daemon::start(&setup).await;
        let id = sim.create(DocType::Job);
        let a = post_event(
            &client(),
            &d.webhook_url(),
            &sim.webhook_payload(DocType::Job, &id, "created"),
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        d.kill9();
    }
    let wal = data.join("skillsync.db-wal");
    assert!(wal.exists(), "the killed daemon left no {}", wal.display());
    let _ro = match make_read_only(&data) {
        Ok(r) => r,
        Err(e) => return cannot_mount(&e),
    };
    assert_refuses_to_start(&setup, &setup.db).await;
}
