//! Intake benchmark with an external load generator (issue 14).
//!
//! The load comes from `wrk` (Debian package `wrk`, installed with apt-get
//! if missing and we are root), a separate process: 2 threads, 64
//! connections, a Lua script posting webhooks for 8 documents with the
//! tenant's secret header. In each round, against the same script:
//!
//! - **ceiling**: this process serving, with the daemon's accept loop
//!   (`skillsync::server::serve`), a warp filter that checks the secret
//!   header and parses the body as JSON, then answers 200 — no database;
//! - **floor**: the durable floor, also in this process: the ceiling's
//!   server, secret check and JSON parse, then the body handed to one
//!   appender thread that appends whatever is queued to a flat file and
//!   `fdatasync`s it once before those requests answer 200 — the least any
//!   "durable before 200" design pays on this disk and CPU (issue 26);
//! - **durable**: `skillsync serve` (the release binary, its own process)
//!   on an empty database: group commit, WAL, `synchronous=FULL`, fetch
//!   workers mirroring the 8 documents from the simulator (hosted in this
//!   process, answering a GET in 50 ms like a real API) and settling the
//!   events while the load runs;
//! - **durable, 5M events**: the same on a database that already holds
//!   5,000,000 old `done` events and 100,000 mirrored jobs (built by this
//!   bench with recursive-CTE inserts, once per invocation, reused by the
//!   rounds);
//! - **one commit per event**: `[database] group_commit = false`.
//!
//! Each durable trial reports the events still waiting (status `pending`)
//! when the load stops and how long they take to settle, so "steady state"
//! is checked, not assumed. Memory: the daemon's RSS after 2 s idle, and its
//! peak RSS (`VmHWM`) after the 64-connection run, from `/proc`.
//!
//! The p99 at 2,000 events/s: wrk has no fixed-rate mode (wrk2 is not in
//! Debian), so the script's `delay()` paces each of the 64 connections to one
//! request per 32 ms; latency is measured per request from its send, like a
//! closed-loop client with think time (no coordinated-omission correction;
//! the achieved rate is printed beside it).
//!
//! Reproduce: `cargo bench --bench intake` (knobs: `INTAKE_RUNS` rounds,
//! default 3; `INTAKE_SECS` seconds per trial, default 10;
//! `INTAKE_OLD_EVENTS`, default 5000000; `INTAKE_OLD_DOCS`, default 100000;
//! `INTAKE_BIN`, another daemon binary to measure instead of this build's;
//! `INTAKE_QUICK`, only the ceiling, floor and durable trials, each
//! round's ratios and their medians (durable ÷ floor among them), for A/B
//! rounds; `INTAKE_PERF`, a directory for `perf record` profiles;
//! `INTAKE_DIR`, where the databases and the floor's file are written —
//! a tmpfs there takes the disk out of both, a diagnostic of CPU cost;
//! `INTAKE_STORM`, only the 404-storm comparison below).
//!
//! `INTAKE_STORM=1` (issue 24): per round, alternating, the durable trial
//! on a database holding 100 live jobs besides the 8 (healthy: upstream
//! serves the 8), and the same with upstream answering every GET 404 (a
//! wrong `job_path`: every fetch's 404 is untrusted, since the 100 answer
//! 404 too). Reports events/s, p99 and the storm ÷ healthy ratio of each
//! round, and the daemon's log lines in the storm.
//! The in-process variant (`--bench intake_inprocess`) is a diagnostic.

mod common;
use common::{
    SECRET, Serve, cell, creds, daemon_toml, env_usize, free_port, fsync_probe_ms, rss_mb, summary,
    wrk_script,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skillsync::model::DocType;
use skillsync::server::{Limits, serve};
use skillsync::simulator::{Faults, Simulator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");
const THREADS: usize = 2;
const CONNECTIONS: usize = 64;
const DOCUMENTS: usize = 8;
const FIXED_RATE: f64 = 2000.0;
const UPSTREAM_LATENCY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trial {
    Ceiling,
    Floor,
    Durable,
    DurableOld,
    OneCommit,
}

impl Trial {
    fn label(self) -> &'static str {
        match self {
            Trial::Ceiling => "ceiling (secret + JSON parse, no database)",
            Trial::Floor => "durable floor (ceiling + fdatasync'd group append)",
            Trial::Durable => "durable, empty database",
            Trial::DurableOld => "durable, 5M old events + 100k documents",
            Trial::OneCommit => "one commit per event",
        }
    }
}

/// What wrk reported, plus what we saw of the daemon.
#[derive(Clone, Debug, Default)]
struct Sample {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    errors: u64,
    /// Events still `pending` when the load stopped, and the seconds they
    /// took to settle.
    backlog: Option<(i64, f64)>,
    idle_rss_mb: Option<f64>,
    peak_rss_mb: Option<f64>,
    /// Requests wrk completed.
    requests: u64,
    /// CPU time of the server process per answered request, µs, and of the
    /// daemon's writer thread alone (from /proc, 10 ms ticks).
    cpu_us: Option<f64>,
    writer_cpu_us: Option<f64>,
}

fn ensure_wrk() {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return;
    }
    eprintln!("wrk not found: installing the Debian package (apt-get install -y wrk)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "wrk"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "could not install wrk; install it (apt-get install wrk) and run again"
    );
}

/// Runs wrk for `secs` against `url`; parses rate, latency and failures.
fn run_wrk(url: &str, script: &Path, secs: u64) -> Sample {
    let out = Command::new("wrk")
        .args([
            "-t",
            &THREADS.to_string(),
            "-c",
            &CONNECTIONS.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {text}");
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
    };
    let ms = |s: String| -> f64 {
        let s = s.trim();
        let (num, mult) = if let Some(v) = s.strip_suffix("us") {
            (v, 1e-3)
        } else if let Some(v) = s.strip_suffix("ms") {
            (v, 1.0)
        } else if let Some(v) = s.strip_suffix('s') {
            (v, 1e3)
        } else {
            (s, 1.0)
        };
        num.parse::<f64>().unwrap_or(f64::NAN) * mult
    };
    let errors = field("Socket errors:")
        .map(|l| {
            l.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Sample {
        rate: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").map(ms).unwrap_or(f64::NAN),
        p99_ms: field("99%").map(ms).unwrap_or(f64::NAN),
        non_2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        errors,
        requests: text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..Sample::default()
    }
}

/// CPU seconds (user + system) of a process, or of one of its threads.
fn cpu_secs(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the `(comm)`: state is 3rd overall, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The stat file of `pid`'s thread named `name`.
fn thread_stat(pid: u32, name: &str) -> Option<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    dir.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| e.path().join("stat").display().to_string())
    })
}

/// `skillsync serve` (this build, or `INTAKE_BIN`: another build of the
/// daemon, to compare two versions against the same load generator) on an
/// empty database at `db`, fetching from `sim_base`.
fn start_daemon(dir: &Path, db: &Path, sim_base: &str, group_commit: bool) -> Serve {
    let port = free_port();
    let toml = daemon_toml(
        db,
        sim_base,
        "",
        &format!("group_commit = {group_commit}"),
        "[fetch]\nconcurrency = 8\ntimeout_secs = 5",
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let cfg = dir.join(format!("daemon-{port}.toml"));
    std::fs::write(&cfg, toml).expect("write config");
    let bin = std::env::var("INTAKE_BIN").unwrap_or_else(|_| BIN.to_string());
    Serve::start(&bin, &cfg, &dir.join(format!("daemon-{port}.log")), port)
}

fn pending_events(db: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open db");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    c.query_row(
        "SELECT count(*) FROM events WHERE status = 'pending'",
        [],
        |r| r.get(0),
    )
    .expect("count pending")
}

/// Waits until no event is pending; returns (pending at first look, seconds).
fn settle(db: &Path) -> (i64, f64) {
    let start = Instant::now();
    let first = pending_events(db);
    let mut n = first;
    while n > 0 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
        n = pending_events(db);
    }
    assert_eq!(n, 0, "events still pending 120 s after the load stopped");
    (first, start.elapsed().as_secs_f64())
}

/// Builds the "old" database: the schema (by opening it with skillsync's
/// store), then `events` done rows and `jobs` rows by recursive CTEs.
fn build_old_db(path: &Path, events: usize, docs: usize) -> Duration {
    let t = Instant::now();
    drop(skillsync::store::Store::open(path, Duration::from_secs(5)).expect("create schema"));
    // The writer thread closes its connection once the store is dropped.
    std::thread::sleep(Duration::from_millis(300));
    let c = rusqlite::Connection::open(path).expect("open");
    c.busy_timeout(Duration::from_secs(30)).expect("busy");
    c.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF;")
        .expect("pragmas");
    let uuid = "lower(printf('%08x-%04x-4%03x-8%03x-%012x', x, x % 65536, x % 4096, x % 4096, x))";
    c.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {docs})
         INSERT INTO jobs (tenant, id, document, number, name, modified_on, version, revision, first_seen_at, fetched_at)
         SELECT 'acme', {uuid},
                json_object('Id', {uuid}, 'Number', 'J-' || x, 'Name', 'Job ' || x, 'ModifiedOn', '2025-06-01T00:00:00.000Z',
                            'Description', hex(zeroblob(120))),
                'J-' || x, 'Job ' || x, '2025-06-01T00:00:00.000Z', 1, 1, '2025-06-01T00:00:00.000Z', '2025-06-01T00:00:00.000Z'
         FROM n;
         COMMIT;"
    ))
    .expect("insert jobs");
    let chunk = 1_000_000usize;
    let mut done = 0;
    while done < events {
        let n = chunk.min(events - done);
        let doc =
            "lower(printf('%08x-%04x-4%03x-8%03x-%012x', d, d % 65536, d % 4096, d % 4096, d))";
        c.execute_batch(&format!(
            "BEGIN;
             WITH RECURSIVE n(x) AS (SELECT {start} UNION ALL SELECT x + 1 FROM n WHERE x < {end}),
                  e(x, d, ts) AS (SELECT x, x % {docs} + 1, strftime('%Y-%m-%dT%H:%M:%fZ', '2025-01-01', '+' || (x / 20) || ' seconds') FROM n)
             INSERT INTO events (tenant, received_at, action, doc_type, doc_id, status, attempts, next_attempt_at, processed_at, payload, queued)
             SELECT 'acme', ts, 'updated', 'job', {doc}, 'done', 1, ts, ts,
                    '{{\"action\":\"updated\",\"document\":{{\"type\":\"SkillsWorkflow.Job\",\"id\":\"' || {doc} ||
                    '\",\"url\":\"https://api.example.com/api/jobs/' || {doc} || '\"}}}}',
                    1
             FROM e;
             COMMIT;",
            start = done + 1,
            end = done + n,
        ))
        .expect("insert events");
        done += n;
    }
    c.execute_batch("PRAGMA journal_mode = WAL;").expect("wal");
    t.elapsed()
}

/// Median time of `Store::page_state` for a 500-id listing page, with no
/// recorded-but-unqueued webhook and with `backlog` of them (for other
/// documents): reconciliation's per-page cost must not grow with the inbox.
/// Also returns what loading the recorded ids (the old per-page step) takes.
fn page_cost(dir: &Path, rt: &tokio::runtime::Runtime, backlog: usize) -> (f64, f64) {
    let path = dir.join(format!("page-{backlog}.db"));
    let store = skillsync::store::Store::open(&path, Duration::from_secs(5)).expect("open");
    if backlog > 0 {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.busy_timeout(Duration::from_secs(30)).expect("busy");
        c.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {backlog})
             INSERT INTO events (tenant, received_at, action, doc_type, doc_id, status, attempts, next_attempt_at, payload, queued)
             SELECT 'acme', '2026-01-01T00:00:00.000Z', 'updated', 'job',
                    lower(printf('%08x-0000-4000-8000-%012x', x, x)), 'pending', 0, '2026-01-01T00:00:00.000Z', '{{}}', 0
             FROM n;
             COMMIT;"
        ))
        .expect("insert recorded events");
        // Reads then come from the database file, as they would long after
        // the backlog formed, not through a fresh 100,000-row WAL.
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let ids: Vec<String> = (0..500)
        .map(|i| format!("ffffffff-0000-4000-8000-{i:012x}"))
        .collect();
    let mut v = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        rt.block_on(store.page_state("acme".into(), DocType::Job, ids.clone()))
            .expect("page_state");
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let page = summary(&v).0;
    // What each page did before issue 14: load every recorded doc id of the
    // tenant and type (the rest of the page's work is unchanged).
    let c = rusqlite::Connection::open(&path).expect("open");
    let mut old = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let n = c
            .prepare("SELECT doc_id FROM events WHERE tenant = 'acme' AND queued = 0 AND doc_type = 'job'")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("old query");
        std::hint::black_box(n.len());
        old.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (page, summary(&old).0)
}

/// Ceiling server in this process: the daemon's accept loop, secret check
/// and JSON parse, answer 200; no database.
async fn start_ceiling(token: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let next = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let filter = warp::post()
        .and(warp::header::optional::<String>("x-webhook-secret"))
        .and(warp::body::bytes())
        .map(move |secret: Option<String>, body: bytes::Bytes| {
            let authorized = secret.as_deref() == Some(SECRET);
            let parsed = serde_json::from_slice::<Value>(&body).is_ok();
            if !authorized || !parsed {
                return warp::reply::with_status(
                    warp::reply::json(&json!({"error": "refused"})),
                    warp::http::StatusCode::BAD_REQUEST,
                );
            }
            let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            warp::reply::with_status(
                warp::reply::json(&json!({"status": "accepted", "event_id": id})),
                warp::http::StatusCode::OK,
            )
        });
    tokio::spawn(async move { serve(listener, filter, Limits::default(), token).await });
    format!("http://{addr}/skillsevent")
}

/// The durable floor in this process: the ceiling's server, secret check
/// and JSON parse, then the body handed to one appender thread (a tokio
/// channel and a oneshot back, the daemon's own hand-off) that appends
/// everything queued meanwhile to a flat file, `fdatasync`s it once, and
/// only then lets those requests answer 200. The least any "durable before
/// 200" design pays on this disk and CPU: no database, no index, no fetch.
async fn start_floor(token: CancellationToken, dir: &Path) -> String {
    use std::io::Write;
    type Append = (bytes::Bytes, tokio::sync::oneshot::Sender<i64>);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let path = dir.join(format!("floor-{}.log", addr.port()));
    let mut file = std::fs::File::create(&path).expect("floor log");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Append>(16_384);
    std::thread::Builder::new()
        .name("floor-append".into())
        .spawn(move || {
            let mut next = 0i64;
            let mut buf = Vec::with_capacity(1 << 20);
            let mut waiting = Vec::with_capacity(1024);
            while let Some(first) = rx.blocking_recv() {
                waiting.push(first);
                while waiting.len() < 1024 {
                    match rx.try_recv() {
                        Ok(a) => waiting.push(a),
                        Err(_) => break,
                    }
                }
                buf.clear();
                for (body, _) in &waiting {
                    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    buf.extend_from_slice(body);
                }
                file.write_all(&buf).expect("floor append");
                file.sync_data().expect("floor fdatasync");
                for (_, done) in waiting.drain(..) {
                    next += 1;
                    let _ = done.send(next);
                }
            }
            let _ = std::fs::remove_file(&path);
        })
        .expect("floor thread");
    let filter = warp::post()
        .and(warp::header::optional::<String>("x-webhook-secret"))
        .and(warp::body::bytes())
        .then(move |secret: Option<String>, body: bytes::Bytes| {
            let tx = tx.clone();
            async move {
                let authorized = secret.as_deref() == Some(SECRET);
                let parsed = serde_json::from_slice::<Value>(&body).is_ok();
                if !authorized || !parsed {
                    return warp::reply::with_status(
                        warp::reply::json(&json!({"error": "refused"})),
                        warp::http::StatusCode::BAD_REQUEST,
                    );
                }
                let (done, appended) = tokio::sync::oneshot::channel();
                let id = match tx.send((body, done)).await {
                    Ok(()) => appended.await.ok(),
                    Err(_) => None,
                };
                match id {
                    Some(id) => warp::reply::with_status(
                        warp::reply::json(&json!({"status": "accepted", "event_id": id})),
                        warp::http::StatusCode::OK,
                    ),
                    None => warp::reply::with_status(
                        warp::reply::json(&json!({"error": "unavailable"})),
                        warp::http::StatusCode::SERVICE_UNAVAILABLE,
                    ),
                }
            }
        });
    tokio::spawn(async move { serve(listener, filter, Limits::default(), token).await });
    format!("http://{addr}/skillsevent")
}

fn main() {
    ensure_wrk();
    let runs = env_usize("INTAKE_RUNS", 3).max(1);
    let secs = env_usize("INTAKE_SECS", 10) as u64;
    // INTAKE_QUICK=1: ceiling, floor and durable only, and their ratios
    // (for A/B rounds): no 5M-event database, page costs or paced run.
    let quick = std::env::var_os("INTAKE_QUICK").is_some();
    let old_events = if quick {
        0
    } else {
        env_usize("INTAKE_OLD_EVENTS", 5_000_000)
    };
    let old_docs = env_usize("INTAKE_OLD_DOCS", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    skillsync::upstream::install_crypto();
    let started = Instant::now();

    let sim_token = CancellationToken::new();
    let sim = Simulator::start(
        rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind"),
        creds(),
        sim_token.clone(),
    )
    .expect("simulator");
    sim.set_faults(Faults {
        latency: UPSTREAM_LATENCY,
        ..Faults::default()
    });
    let ids = sim.seed(DocType::Job, DOCUMENTS);
    let payloads: Vec<Value> = ids
        .iter()
        .map(|id| sim.webhook_payload(DocType::Job, id, "updated"))
        .collect();
    // INTAKE_DIR: where the databases and the floor's file go (default: the
    // system temp dir, on the real disk here). A tmpfs (/dev/shm) takes the
    // disk out and leaves the CPU cost of each design: a diagnostic only.
    let dir = match std::env::var_os("INTAKE_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let script = dir.path().join("post.lua");
    std::fs::write(&script, wrk_script(&payloads, None)).expect("script");
    if std::env::var_os("INTAKE_STORM").is_some() {
        storm(&sim, dir.path(), &script, runs, secs);
        sim_token.cancel();
        return;
    }
    let paced = dir.path().join("paced.lua");
    let delay_ms = (CONNECTIONS as f64 / FIXED_RATE * 1e3).round() as u64;
    std::fs::write(&paced, wrk_script(&payloads, Some(delay_ms))).expect("script");

    // INTAKE_OLD_EVENTS=0: no 5M-event trial (e.g. with INTAKE_BIN set to a
    // build older than this database's schema).
    let skip_old = old_events == 0;
    let old_db: PathBuf = dir.path().join("old.db");
    if !skip_old {
        let build = build_old_db(&old_db, old_events, old_docs);
        let size = std::fs::metadata(&old_db).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "built {old_events} old events + {old_docs} jobs in {:.1} s ({:.0} MB)",
            build.as_secs_f64(),
            size as f64 / 1e6
        );
    }

    let ((page_empty, _), (page_backlog, old_load)) = if quick {
        ((f64::NAN, f64::NAN), (f64::NAN, f64::NAN))
    } else {
        (
            page_cost(dir.path(), &rt, 0),
            page_cost(dir.path(), &rt, 100_000),
        )
    };
    if !quick {
        eprintln!(
            "page_state, 500 ids: {page_empty:.2} ms with no recorded events, {page_backlog:.2} ms with 100,000 \
         (the old per-page load of every recorded id alone: {old_load:.2} ms)"
        );
    }

    let trials = [
        Trial::Ceiling,
        Trial::Floor,
        Trial::Durable,
        Trial::DurableOld,
        Trial::OneCommit,
    ];
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); trials.len()];
    let mut fixed: Vec<Sample> = Vec::new();
    let mut fsync: Vec<f64> = Vec::new();
    for round in 0..runs {
        let probe = fsync_probe_ms(dir.path());
        fsync.push(probe);
        eprintln!(
            "round {}/{runs} (4 KiB append + fdatasync: {probe:.2} ms)",
            round + 1
        );
        for (ti, &trial) in trials.iter().enumerate() {
            if (trial == Trial::DurableOld && skip_old) || (quick && trial == Trial::OneCommit) {
                continue;
            }
            let s = match trial {
                Trial::Ceiling | Trial::Floor => {
                    let token = CancellationToken::new();
                    let url = if trial == Trial::Ceiling {
                        rt.block_on(start_ceiling(token.clone()))
                    } else {
                        rt.block_on(start_floor(token.clone(), dir.path()))
                    };
                    // The simulator shares this process but is idle here.
                    let before = cpu_secs("/proc/self/stat");
                    let mut s = run_wrk(&url, &script, secs);
                    let used = cpu_secs("/proc/self/stat") - before;
                    s.cpu_us = Some(used * 1e6 / s.requests.max(1) as f64);
                    token.cancel();
                    s
                }
                Trial::Durable | Trial::DurableOld | Trial::OneCommit => {
                    let db = if trial == Trial::DurableOld {
                        old_db.clone()
                    } else {
                        dir.path().join(format!("t{round}-{ti}.db"))
                    };
                    let d =
                        start_daemon(dir.path(), &db, &sim.base_url(), trial != Trial::OneCommit);
                    std::thread::sleep(Duration::from_secs(2));
                    let idle = rss_mb(d.pid()).0;
                    // INTAKE_PERF=DIR: a perf profile of the daemon during
                    // the load, to DIR/<trial>-<round>.data. Frame-pointer
                    // stacks (`-g`): for whole stacks, measure a daemon built
                    // with them (BENCHMARKS.md §1 says how). DWARF unwinding
                    // cost the daemon two thirds of its throughput.
                    let perf = std::env::var("INTAKE_PERF").ok().map(|out| {
                        Command::new("perf")
                            .args([
                                "record",
                                "-F",
                                "999",
                                "-g",
                                "-p",
                                &d.pid().to_string(),
                                "-o",
                            ])
                            .arg(Path::new(&out).join(format!("{trial:?}-{round}.data")))
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("perf record")
                    });
                    let proc_stat = format!("/proc/{}/stat", d.pid());
                    let writer_stat = thread_stat(d.pid(), "skillsync-write");
                    let before = cpu_secs(&proc_stat);
                    let writer_before = writer_stat.as_deref().map(cpu_secs);
                    let mut s = run_wrk(&d.url(), &script, secs);
                    let n = s.requests.max(1) as f64;
                    s.cpu_us = Some((cpu_secs(&proc_stat) - before) * 1e6 / n);
                    s.writer_cpu_us = writer_stat
                        .as_deref()
                        .zip(writer_before)
                        .map(|(p, b)| (cpu_secs(p) - b) * 1e6 / n);
                    if let Some(mut p) = perf {
                        let _ = Command::new("kill")
                            .args(["-INT", &p.id().to_string()])
                            .status();
                        let _ = p.wait();
                    }
                    s.peak_rss_mb = Some(rss_mb(d.pid()).1);
                    s.idle_rss_mb = Some(idle);
                    s.backlog = Some(settle(&db));
                    d.stop();
                    if trial != Trial::DurableOld {
                        let _ = std::fs::remove_file(&db);
                        let _ = std::fs::remove_file(db.with_extension("db-wal"));
                        let _ = std::fs::remove_file(db.with_extension("db-shm"));
                    }
                    s
                }
            };
            eprintln!(
                "  {:<44} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  non-2xx {} errors {}  backlog {:?}  rss idle/peak {:?}/{:?} MB  cpu/req {:?} µs (writer {:?})",
                trial.label(),
                s.rate,
                s.p50_ms,
                s.p99_ms,
                s.non_2xx,
                s.errors,
                s.backlog,
                s.idle_rss_mb,
                s.peak_rss_mb,
                s.cpu_us.map(|v| v.round()),
                s.writer_cpu_us.map(|v| v.round())
            );
            results[ti].push(s);
        }
        let rate = |t: Trial| {
            trials
                .iter()
                .position(|x| *x == t)
                .and_then(|i| results[i].get(round))
                .map_or(f64::NAN, |s| s.rate)
        };
        eprintln!(
            "  round {}: durable ÷ floor {:.2}, durable ÷ ceiling {:.2}, floor ÷ ceiling {:.2}",
            round + 1,
            rate(Trial::Durable) / rate(Trial::Floor),
            rate(Trial::Durable) / rate(Trial::Ceiling),
            rate(Trial::Floor) / rate(Trial::Ceiling),
        );
        if quick {
            continue;
        }
        let db = dir.path().join(format!("fixed{round}.db"));
        let d = start_daemon(dir.path(), &db, &sim.base_url(), true);
        std::thread::sleep(Duration::from_secs(1));
        let s = run_wrk(&d.url(), &paced, secs);
        d.stop();
        eprintln!(
            "  paced {FIXED_RATE:.0}/s: {:.0} req/s  p50 {:.2} ms  p99 {:.2} ms  non-2xx {}",
            s.rate, s.p50_ms, s.p99_ms, s.non_2xx
        );
        fixed.push(s);
    }
    sim_token.cancel();
    let index = |t: Trial| trials.iter().position(|x| *x == t).expect("trial");
    let ratio = |a: Trial, b: Trial| -> Vec<f64> {
        results[index(a)]
            .iter()
            .zip(&results[index(b)])
            .map(|(x, y)| x.rate / y.rate)
            .collect()
    };
    let to_floor = ratio(Trial::Durable, Trial::Floor);
    let floor_verdict = format!(
        "target: durable ≥ 0.75 × the durable floor (same round) at {CONNECTIONS} connections: {} → {}",
        cell(&to_floor, 2),
        if summary(&to_floor).0 >= 0.75 {
            "met"
        } else {
            "MISSED"
        }
    );
    if quick {
        // INTAKE_QUICK: the per-trial lines above and the ratios.
        println!(
            "bare {} req/s, floor {} req/s, skillsync {} ev/s ({runs} rounds, median [min–max]); floor ÷ bare {}, skillsync ÷ bare {}",
            cell(
                &results[index(Trial::Ceiling)]
                    .iter()
                    .map(|s| s.rate)
                    .collect::<Vec<_>>(),
                0
            ),
            cell(
                &results[index(Trial::Floor)]
                    .iter()
                    .map(|s| s.rate)
                    .collect::<Vec<_>>(),
                0
            ),
            cell(
                &results[index(Trial::Durable)]
                    .iter()
                    .map(|s| s.rate)
                    .collect::<Vec<_>>(),
                0
            ),
            cell(&ratio(Trial::Floor, Trial::Ceiling), 2),
            cell(&ratio(Trial::Durable, Trial::Ceiling), 2),
        );
        println!("{floor_verdict}");
        return;
    }
    println!();
    println!(
        "intake (external load: wrk -t{THREADS} -c{CONNECTIONS} -d{secs}s, {DOCUMENTS} documents, upstream {} ms), \
         {runs} rounds, median [min–max]; total {:.0} s; 4 KiB append + fdatasync {} ms",
        UPSTREAM_LATENCY.as_millis(),
        started.elapsed().as_secs_f64(),
        cell(&fsync, 2)
    );
    println!();
    println!(
        "| server | events/s | p50 ms | p99 ms | ÷ ceiling (same round) | ÷ floor (same round) | pending at stop → settled in s | idle RSS MB | peak RSS MB | server CPU µs/event (writer thread) | non-200 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (ti, &trial) in trials.iter().enumerate() {
        let s = &results[ti];
        if s.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&Sample) -> f64, p| cell(&s.iter().map(f).collect::<Vec<_>>(), p);
        let vs = if trial == Trial::Ceiling {
            "1".to_string()
        } else {
            cell(&ratio(trial, Trial::Ceiling), 2)
        };
        let vs_floor = match trial {
            Trial::Ceiling => "–".to_string(),
            Trial::Floor => "1".to_string(),
            _ => cell(&ratio(trial, Trial::Floor), 2),
        };
        let opt = |f: &dyn Fn(&Sample) -> Option<f64>, p| -> String {
            let v: Vec<f64> = s.iter().filter_map(f).collect();
            if v.is_empty() {
                "–".into()
            } else {
                cell(&v, p)
            }
        };
        println!(
            "| {} | {} | {} | {} | {vs} | {vs_floor} | {} → {} | {} | {} | {} ({}) | {} |",
            trial.label(),
            col(&|s| s.rate, 0),
            col(&|s| s.p50_ms, 2),
            col(&|s| s.p99_ms, 2),
            opt(&|s| s.backlog.map(|b| b.0 as f64), 0),
            opt(&|s| s.backlog.map(|b| b.1), 1),
            opt(&|s| s.idle_rss_mb, 1),
            opt(&|s| s.peak_rss_mb, 1),
            opt(&|s| s.cpu_us, 0),
            opt(&|s| s.writer_cpu_us, 0),
            s.iter().map(|s| s.non_2xx + s.errors).sum::<u64>(),
        );
    }
    println!();
    let durable = summary(&ratio(Trial::Durable, Trial::Ceiling)).0;
    let scale: Vec<f64> = results[index(Trial::DurableOld)]
        .iter()
        .zip(&results[index(Trial::Durable)])
        .map(|(o, e)| o.rate / e.rate)
        .collect();
    let scale_med = if scale.is_empty() {
        f64::NAN
    } else {
        summary(&scale).0
    };
    let p99: Vec<f64> = fixed.iter().map(|s| s.p99_ms).collect();
    let fixed_rate: Vec<f64> = fixed.iter().map(|s| s.rate).collect();
    let idle: Vec<f64> = results[index(Trial::Durable)]
        .iter()
        .filter_map(|s| s.idle_rss_mb)
        .collect();
    let peak: Vec<f64> = [Trial::Durable, Trial::DurableOld]
        .iter()
        .flat_map(|t| results[index(*t)].iter().filter_map(|s| s.peak_rss_mb))
        .collect();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target: durable ≥ 0.5 × ceiling at {CONNECTIONS} connections: {:.2} → {}",
        durable,
        verdict(durable >= 0.5)
    );
    println!("{floor_verdict}");
    println!(
        "target: 5M-event database ≥ 0.8 × empty (same round): {} → {}",
        if scale.is_empty() {
            "not measured".to_string()
        } else {
            cell(&scale, 2)
        },
        verdict(scale_med >= 0.8)
    );
    println!(
        "target: p99 ≤ 10 ms at {FIXED_RATE:.0} events/s (paced wrk, achieved {} req/s): {} ms → {}",
        cell(&fixed_rate, 0),
        cell(&p99, 2),
        verdict(summary(&p99).0 <= 10.0)
    );
    println!(
        "target: idle RSS ≤ 20 MB: {} MB → {}; peak RSS ≤ 64 MB during the {CONNECTIONS}-connection runs: max {:.1} MB → {}",
        cell(&idle, 1),
        verdict(summary(&idle).0 <= 20.0),
        summary(&peak).2,
        verdict(summary(&peak).2 <= 64.0)
    );
    println!(
        "target: a reconciliation page costs the same with 100,000 recorded-but-unqueued events: \
         {page_backlog:.2} ms vs {page_empty:.2} ms with none (500-id page, median of 21; before this change each page \
         also loaded every recorded id: {old_load:.2} ms more) → {}",
        verdict(page_backlog <= page_empty * 1.5 + 0.5)
    );
    let failed: u64 = results
        .iter()
        .flatten()
        .chain(&fixed)
        .map(|s| s.non_2xx + s.errors)
        .sum::<u64>()
        - results[index(Trial::Ceiling)]
            .iter()
            .chain(&results[index(Trial::Floor)])
            .map(|s| s.non_2xx + s.errors)
            .sum::<u64>();
    if failed > 0 {
        println!("warning: {failed} daemon requests were not answered 200 (see the lines above)");
    }
}

/// `INTAKE_STORM`: intake with every GET answering 404 (untrusted 404s)
/// against the healthy path, alternating, on the same load.
fn storm(sim: &Simulator, dir: &Path, script: &Path, runs: usize, secs: u64) {
    let healthy = Faults {
        latency: UPSTREAM_LATENCY,
        ..Faults::default()
    };
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p99s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let mut lines = Vec::new();
    for round in 0..runs {
        for (i, gone) in [false, true].into_iter().enumerate() {
            let db = dir.join(format!("storm{round}-{i}.db"));
            skillsync::store::fill_synthetic_jobs(&db, "acme", 100, 1).expect("100 live jobs");
            sim.set_faults(Faults {
                all_gone: gone,
                ..healthy.clone()
            });
            let d = start_daemon(dir, &db, &sim.base_url(), true);
            std::thread::sleep(Duration::from_secs(2));
            let s = run_wrk(&d.url(), script, secs);
            let log = d.log().to_path_buf();
            d.stop();
            sim.set_faults(healthy.clone());
            let logged = std::fs::read_to_string(&log)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            eprintln!(
                "round {}/{runs} {}: {:.0} req/s  p50 {:.2} ms  p99 {:.2} ms  non-2xx {}  log lines {logged}",
                round + 1,
                if gone {
                    "every GET 404"
                } else {
                    "healthy      "
                },
                s.rate,
                s.p50_ms,
                s.p99_ms,
                s.non_2xx
            );
            rates[i].push(s.rate);
            p99s[i].push(s.p99_ms);
            if gone {
                lines.push(logged as f64);
            }
        }
        ratios.push(rates[1][round] / rates[0][round]);
    }
    println!();
    println!(
        "intake with every GET answering 404 (100 live jobs held, {DOCUMENTS} documents posted) against the healthy path, \
         wrk -t{THREADS} -c{CONNECTIONS} -d{secs}s, {runs} rounds alternating, median [min–max]"
    );
    println!();
    println!("| path | events/s | p99 ms | daemon log lines |");
    println!("|---|---:|---:|---:|");
    println!(
        "| healthy | {} | {} | – |",
        cell(&rates[0], 0),
        cell(&p99s[0], 2)
    );
    println!(
        "| every GET 404 | {} | {} | {} |",
        cell(&rates[1], 0),
        cell(&p99s[1], 2),
        cell(&lines, 0)
    );
    println!();
    println!(
        "storm ÷ healthy (same round): {} (target ≥ 0.8)",
        cell(&ratios, 2)
    );
}
