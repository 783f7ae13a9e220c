//! PostgreSQL mirror benchmark (issue "PostgreSQL mirror"). Needs a server:
//! run it under `pg_virtualenv` (Debian `postgresql-common`), which starts a
//! throwaway cluster and exports PGHOST, PGPORT, PGUSER and PGPASSWORD.
//!
//! 1. **Backfill**: a SQLite mirror of `PG_BENCH_DOCS` (100,000) jobs of
//!    ~2 KB, each with one history row, written straight into a fresh file;
//!    then `skillsync serve` (the release binary, a child process) starts with
//!    `[postgres]` pointing at an empty schema. Time: the sink's own
//!    "backfill done … ms=" log figure (first PostgreSQL write to cursor set);
//!    wall: process start to that line. RSS growth: the child's `VmHWM`
//!    after the backfill minus the `VmHWM` of the same `serve` on the same
//!    file without `[postgres]` (started, healthy, 3 s idle).
//!    Targets: ≤ 30 s, ≤ 64 MB.
//! 2. **Commit to visibility at 50 webhooks/s**: the daemon in-process with
//!    the sink, the simulator serving ~2 KB jobs; `PG_BENCH_LATENCY_SECS` (60)
//!    seconds of `created` webhooks at 50/s. Per document: PostgreSQL's
//!    `synced_at` (`clock_timestamp()` in the sink's transaction, i.e. just
//!    before its commit) minus SQLite's `fetched_at` (set in the writer's
//!    transaction, just before its commit). Target: p99 ≤ 1 s.
//! 3. **Intake with the sink on vs off**: `PG_BENCH_INTAKE_EVENTS` (5,000)
//!    webhooks as fast as 16 senders get answers, each creating a document
//!    that is fetched and stored meanwhile; sink on and off interleaved in
//!    each round, ratio taken per round. Target: ≥ 0.9.
//! 4. **PostgreSQL down**: the sink reaches PostgreSQL through a TCP proxy
//!    in this process; webhooks at 50/s throughout; the proxy cuts every
//!    connection and refuses new ones for `PG_BENCH_DOWN_SECS` (600), then
//!    lets them through again. Counted: webhooks not answered 200 (target 0);
//!    drain time from the restore until the PostgreSQL cursor passes the
//!    last outbox seq that existed at the restore (target ≤ 60 s).
//!
//! Rounds: `PG_BENCH_RUNS` (3) for 1–3, `PG_BENCH_DOWN_RUNS` (3) for 4;
//! `PG_BENCH_PARTS` (e.g. `123` or `4`) chooses parts.
//! Reproduce: `pg_virtualenv -t -o fsync=off cargo bench --bench postgres`.
//! (fsync=off makes PostgreSQL's commits cheap; SQLite keeps
//! `synchronous=FULL` on the real disk.)

mod common;
#[path = "../tests/it/proxy.rs"]
mod proxy;
use common::{SECRET, cell, daemon_toml, env_usize, start_sim};
use proxy::Proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use skillsync::config::Config;
use skillsync::config::PostgresConfig;
use skillsync::model::DocType;
use skillsync::simulator::{Simulator, send_webhooks};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

struct Server {
    host: String,
    port: String,
    user: String,
    database: String,
}

fn server() -> Server {
    let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    Server {
        host: v("PGHOST").expect("PGHOST unset: run under pg_virtualenv"),
        port: v("PGPORT").unwrap_or_else(|| "5432".into()),
        user: v("PGUSER").expect("PGUSER unset"),
        database: v("PGDATABASE").unwrap_or_else(|| "postgres".into()),
    }
}

impl Server {
    fn section(&self, host_port: Option<&str>, schema: &str) -> String {
        let direct = format!("{}:{}", self.host, self.port);
        format!(
            "[postgres]\nurl = \"postgres://{}@{}/{}?sslmode=disable\"\npassword_env = \"PGPASSWORD\"\nschema = \"{schema}\"\n",
            self.user,
            host_port.unwrap_or(&direct),
            self.database
        )
    }

    fn config(&self, schema: &str) -> PostgresConfig {
        let toml = daemon_toml(
            Path::new("/tmp/x.db"),
            "http://127.0.0.1:9",
            "",
            "",
            &self.section(None, schema),
        );
        Config::from_toml(&toml, None).unwrap().postgres.unwrap()
    }
}

fn schema(tag: &str) -> String {
    format!(
        "bench_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Some 1.6 KB of text, so a job document is about 2 KB.
fn notes(n: usize) -> String {
    let words = [
        "brief", "review", "client", "deliver", "asset", "approval", "budget", "layout",
    ];
    let mut s = String::with_capacity(1700);
    let mut i = n;
    while s.len() < 1600 {
        s.push_str(words[i % words.len()]);
        s.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    s
}

fn job_doc(id: &str, n: usize) -> Map<String, Value> {
    match json!({
        "Id": id, "JobId": id, "JobNumber": format!("J{n:06}"), "Subject": format!("Job {n}"),
        "ProjectId": null, "Client": format!("Client {}", n % 37), "Stage": "Briefing", "StageType": "Open",
        "StartDate": "2026-11-01T00:00:00Z", "EndDate": "2026-12-31T00:00:00Z",
        "ModifiedOn": "2026-11-20T10:00:00.000Z", "Version": 1, "Notes": notes(n)
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A mirror of `n` jobs (one history row each), written straight into SQLite.
fn prepare_db(path: &Path, n: usize) {
    let store = skillsync::store::Store::open(path, Duration::from_secs(5)).unwrap();
    drop(store);
    let mut c = rusqlite::Connection::open(path).unwrap();
    let tx = c.transaction().unwrap();
    {
        let mut job = tx
            .prepare("INSERT INTO jobs (tenant, id, document, number, name, modified_on, version, revision, first_seen_at, fetched_at) VALUES ('acme', ?1, ?2, ?3, ?4, '2026-11-20T10:00:00.000Z', 1, 1, ?5, ?5)")
            .unwrap();
        let mut hist = tx
            .prepare("INSERT INTO document_history (tenant, doc_type, id, revision, document, fetched_at) VALUES ('acme', 'job', ?1, 1, ?2, ?3)")
            .unwrap();
        let now = skillsync::model::fmt_ts(chrono::Utc::now());
        for i in 0..n {
            let id = uuid::Uuid::new_v4().hyphenated().to_string();
            let doc = Value::Object(job_doc(&id, i)).to_string();
            job.execute(rusqlite::params![
                id,
                doc,
                format!("J{i:06}"),
                format!("Job {i}"),
                now
            ])
            .unwrap();
            hist.execute(rusqlite::params![id, doc, now]).unwrap();
        }
    }
    tx.commit().unwrap();
}

fn vm(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `serve` on `db`; returns the child and its log path.
fn serve(dir: &Path, db: &Path, extra: &str, tag: &str) -> (Kill, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = daemon_toml(db, "http://127.0.0.1:9", "", "", extra).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    let cfg = dir.join(format!("{tag}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    let log = dir.join(format!("{tag}.log"));
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info,tokio_cron_scheduler=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Kill(child), log)
}

fn wait_log(log: &Path, needle: &str, limit: Duration) -> String {
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = s.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            t.elapsed() < limit,
            "no `{needle}` in {} within {limit:?}:\n{s}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Part 1: (backfill seconds, wall seconds, RSS growth MB).
fn backfill_round(pg: &Server, dir: &Path, db: &Path, round: usize) -> (f64, f64, f64) {
    let (plain, log) = serve(dir, db, "", &format!("plain-{round}"));
    wait_log(&log, "skillsync serving", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    let base_kb = vm(plain.0.id(), "VmHWM:");
    drop(plain);
    let s = schema("backfill");
    let t0 = Instant::now();
    let (with_pg, log) = serve(dir, db, &pg.section(None, &s), &format!("pg-{round}"));
    let line = wait_log(&log, "backfill done", Duration::from_secs(600));
    let wall = t0.elapsed().as_secs_f64();
    let peak_kb = vm(with_pg.0.id(), "VmHWM:");
    drop(with_pg);
    let ms: f64 = line
        .split("ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    drop_schema(pg, &s);
    let growth = (peak_kb as f64 - base_kb as f64) / 1024.0;
    eprintln!(
        "  backfill round {round}: {:.1} s (wall {wall:.1} s), VmHWM {} MB vs {} MB without the sink: +{growth:.1} MB",
        ms / 1000.0,
        peak_kb / 1024,
        base_kb / 1024
    );
    (ms / 1000.0, wall, growth)
}

fn drop_schema(pg: &Server, s: &str) {
    let cfg = pg.config(s);
    let mut c = cfg.connect().unwrap();
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
        .unwrap();
}

/// [`drop_schema`] on a plain thread, from async code.
async fn drop_schema_on_thread(s: String) {
    let pg = server();
    let _ = on_thread(move || drop_schema(&pg, &s)).await;
}

async fn on_thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.unwrap()
}

/// An in-process daemon (optionally with the sink) and its simulator.
struct Rig {
    url: String,
    sim: Simulator,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(pg_section: Option<String>) -> Rig {
        let token = CancellationToken::new();
        let sim = start_sim(&token).await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pg.db");
        let toml = daemon_toml(
            &db,
            &sim.base_url(),
            "",
            "",
            &format!(
                "[fetch]\nconcurrency = 8\ntimeout_secs = 5\n{}",
                pg_section.unwrap_or_default()
            ),
        );
        let config = Config::from_toml(&toml, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            skillsync::run(config, listener, t).await.unwrap();
        });
        let client = reqwest::Client::new();
        while !client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Rig {
            url: format!("http://{addr}/skillsevent"),
            sim,
            token,
            handle,
            db,
            _dir: dir,
        }
    }

    /// `n` new ~2 KB jobs in the simulator and their `created` webhooks.
    fn payloads(&self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let id = self.sim.create(DocType::Job);
                self.sim.put_raw(DocType::Job, &id, job_doc(&id, i));
                self.sim.webhook_payload(DocType::Job, &id, "created")
            })
            .collect()
    }

    fn sqlite(&self, sql: &str) -> i64 {
        rusqlite::Connection::open(&self.db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    async fn drained(&self) {
        while self.sqlite("SELECT count(*) FROM fetch_queue") > 0
            || self.sqlite("SELECT count(*) FROM events WHERE status = 'pending'") > 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.token.cancel();
        let _ = self.handle.await;
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// PostgreSQL's cursor (outbox seq), or -1.
fn cursor(cfg: &PostgresConfig) -> i64 {
    let Ok(mut c) = cfg.connect() else { return -1 };
    c.query_opt(&format!("SELECT seq FROM {}.sink_cursor", cfg.schema), &[])
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(-1)
}

/// Part 2: (p50 ms, p99 ms, max ms, documents) from SQLite commit to PostgreSQL.
async fn latency_round(pg: &Server, secs: usize) -> (f64, f64, f64, usize) {
    let s = schema("latency");
    let rig = Rig::start(Some(pg.section(None, &s))).await;
    let payloads = rig.payloads(secs * 50);
    let report = send_webhooks(&rig.url, SECRET, payloads, 4, Some(50.0)).await;
    assert_eq!(report.acked.len(), secs * 50);
    rig.drained().await;
    let cfg = pg.config(&s);
    let want =
        rig.sqlite("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'pg_outbox'");
    loop {
        let c = cfg.clone();
        if on_thread(move || cursor(&c)).await >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = cfg.clone();
    let pg_rows: Vec<(String, f64)> = on_thread(move || {
        let mut client = c.connect().unwrap();
        client
            .query(
                &format!(
                    "SELECT id::text, extract(epoch FROM synced_at)::float8 FROM {}.jobs",
                    c.schema
                ),
                &[],
            )
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
    .await;
    let conn = rusqlite::Connection::open(&rig.db).unwrap();
    let mut st = conn.prepare("SELECT id, fetched_at FROM jobs").unwrap();
    let sqlite: std::collections::HashMap<String, f64> = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|(id, t)| {
            skillsync::model::parse_upstream_ts(&t).map(|t| (id, t.timestamp_micros() as f64 / 1e6))
        })
        .collect();
    let mut d: Vec<f64> = pg_rows
        .iter()
        .filter_map(|(id, synced)| sqlite.get(id).map(|f| (synced - f) * 1000.0))
        .collect();
    let n = d.len();
    let (p50, p99, max) = (pct(&mut d, 0.5), pct(&mut d, 0.99), pct(&mut d, 1.0));
    eprintln!(
        "  latency: {n} documents at 50/s: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms"
    );
    rig.stop().await;
    drop_schema_on_thread(s).await;
    (p50, p99, max, n)
}

/// Part 3: events per second accepted, with or without the sink.
async fn intake_round(pg: &Server, events: usize, sink: bool) -> f64 {
    let s = schema("intake");
    let rig = Rig::start(sink.then(|| pg.section(None, &s))).await;
    let warm = rig.payloads(200);
    send_webhooks(&rig.url, SECRET, warm, 16, None).await;
    let load = rig.payloads(events);
    let r = send_webhooks(&rig.url, SECRET, load, 16, None).await;
    let rate = r.acked.len() as f64 / r.elapsed.as_secs_f64();
    eprintln!(
        "  intake, sink {}: {rate:.0} events/s ({} of {events} acked)",
        if sink { "on " } else { "off" },
        r.acked.len()
    );
    rig.stop().await;
    if sink {
        drop_schema_on_thread(s).await;
    }
    rate
}

/// Part 4: (refused webhooks, backlog rows at the restore, drain seconds).
async fn outage_round(pg: &Server, down_secs: usize) -> (u64, i64, f64) {
    let s = schema("outage");
    let proxy = Proxy::start(format!("{}:{}", pg.host, pg.port)).await;
    let rig = Rig::start(Some(pg.section(Some(&proxy.addr.to_string()), &s))).await;
    let send = |n: usize| {
        let p = rig.payloads(n);
        let url = rig.url.clone();
        async move { send_webhooks(&url, SECRET, p, 4, Some(50.0)).await }
    };
    let warm = send(250).await;
    let mut refused = warm
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum::<u64>();
    proxy.cut();
    let down = send(down_secs * 50).await;
    refused += down
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum::<u64>();
    rig.drained().await;
    let backlog = rig.sqlite("SELECT count(*) FROM pg_outbox");
    let want =
        rig.sqlite("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'pg_outbox'");
    proxy.restore();
    let restored = Instant::now();
    // Intake goes on at 50/s while the backlog drains.
    let more = tokio::spawn(send(60 * 50));
    let cfg = pg.config(&s);
    loop {
        let c = cfg.clone();
        if on_thread(move || cursor(&c)).await >= want {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(600),
            "backlog not drained in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = restored.elapsed().as_secs_f64();
    more.abort();
    eprintln!(
        "  outage {down_secs} s: {refused} webhooks not answered 200, backlog {backlog} changes drained in {drain:.1} s"
    );
    rig.stop().await;
    drop_schema_on_thread(s).await;
    (refused, backlog, drain)
}

fn main() {
    skillsync::upstream::install_crypto();
    let pg = server();
    let runs = env_usize("PG_BENCH_RUNS", 3);
    let parts = std::env::var("PG_BENCH_PARTS").unwrap_or_else(|_| "1234".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "## PostgreSQL mirror ({} UTC)\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M")
    );
    if parts.contains('1') {
        let docs = env_usize("PG_BENCH_DOCS", 100_000);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("backfill.db");
        let t = Instant::now();
        prepare_db(&db, docs);
        let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "prepared {docs} jobs ({} MB SQLite) in {:.1} s",
            size / 1_000_000,
            t.elapsed().as_secs_f64()
        );
        let (mut secs, mut walls, mut growth) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            let (s, w, g) = backfill_round(&pg, dir.path(), &db, round);
            secs.push(s);
            walls.push(w);
            growth.push(g);
        }
        println!(
            "| backfill of {docs} jobs (~2 KB, + {docs} history rows) | result | target |\n|---|---|---|"
        );
        println!("| sink's backfill time, s | {} | ≤ 30 |", cell(&secs, 1));
        println!("| serve start → backfill done, s | {} | |", cell(&walls, 1));
        println!(
            "| RSS growth (VmHWM with sink − without), MB | {} | ≤ 64 |\n",
            cell(&growth, 1)
        );
    }
    if parts.contains('2') {
        let secs = env_usize("PG_BENCH_LATENCY_SECS", 60);
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut max = Vec::new();
        for _ in 0..runs {
            let (a, b, c, _) = rt.block_on(latency_round(&pg, secs));
            p50.push(a);
            p99.push(b);
            max.push(c);
        }
        println!(
            "| {secs} s of webhooks at 50/s: SQLite commit → PostgreSQL | result | target |\n|---|---|---|"
        );
        println!("| p50, ms | {} | |", cell(&p50, 0));
        println!("| p99, ms | {} | ≤ 1000 |", cell(&p99, 0));
        println!("| max, ms | {} | |\n", cell(&max, 0));
    }
    if parts.contains('3') {
        let events = env_usize("PG_BENCH_INTAKE_EVENTS", 5000);
        let (mut on, mut off, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            // Alternate which goes first.
            let (a, b) = if round % 2 == 0 {
                let a = rt.block_on(intake_round(&pg, events, false));
                (a, rt.block_on(intake_round(&pg, events, true)))
            } else {
                let b = rt.block_on(intake_round(&pg, events, true));
                (rt.block_on(intake_round(&pg, events, false)), b)
            };
            off.push(a);
            on.push(b);
            ratio.push(b / a);
        }
        println!("| intake, {events} webhooks, 16 senders | result | target |\n|---|---|---|");
        println!("| sink off, events/s | {} | |", cell(&off, 0));
        println!("| sink on, events/s | {} | |", cell(&on, 0));
        println!("| on ÷ off (per round) | {} | ≥ 0.9 |\n", cell(&ratio, 2));
    }
    if parts.contains('4') {
        let down = env_usize("PG_BENCH_DOWN_SECS", 600);
        let down_runs = env_usize("PG_BENCH_DOWN_RUNS", 3);
        let (mut refused, mut backlog, mut drain) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..down_runs {
            let (r, b, d) = rt.block_on(outage_round(&pg, down));
            refused.push(r as f64);
            backlog.push(b as f64);
            drain.push(d);
        }
        println!(
            "| PostgreSQL unreachable for {down} s, webhooks at 50/s | result | target |\n|---|---|---|"
        );
        println!("| webhooks not answered 200 | {} | 0 |", cell(&refused, 0));
        println!(
            "| backlog at the restore, outbox rows | {} | |",
            cell(&backlog, 0)
        );
        println!(
            "| restore → backlog drained, s | {} | ≤ 60 |\n",
            cell(&drain, 1)
        );
    }
}
