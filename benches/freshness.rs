//! Freshness benchmark (issue 26): how long from a webhook's arrival until
//! its document's new revision is a row in `job_report` (and, under
//! `pg_virtualenv`, in the PostgreSQL copy).
//!
//! `skillsync serve` (the release binary, its own process) mirrors
//! `FRESH_DOCS` (1,000) jobs from the simulator (hosted in this process),
//! which answers every GET after `FRESH_LATENCY_MS` (50) ms. A sender in
//! this process paces `updated` webhooks at a fixed rate, round robin over
//! the documents; just before each webhook it changes that document in the
//! simulator (new stage, ModifiedOn and Version), as Skills Workflow does.
//! Two rates: 50/s for `FRESH_SLOW_SECS` (20) s (each document changes once:
//! no coalescing) and 2,000/s for `FRESH_FAST_SECS` (10) s (each document
//! changes twice a second: a fetch covers every event received before it
//! began). Fetch concurrency is the default (8) unless `FRESH_CONCURRENCY`
//! says otherwise.
//!
//! Measured per event, from the daemon's own rows once every event is
//! settled: `events.processed_at − events.received_at`. `received_at` is
//! taken when the handler starts on the request; `processed_at` is written
//! in the same transaction as the fetched revision's `jobs` row and its
//! report values (`job_report` is a view over them), just before that
//! transaction commits, so the figure leaves out the last commit (one fsync,
//! ≈ 0.2–1 ms here) and the webhook's time on the wire (loopback). Both are
//! millisecond timestamps.
//!
//! PostgreSQL (only when `PGHOST` is set, e.g. under `pg_virtualenv -t -o
//! fsync=off`): the sink copies to a fresh schema; per document, the copy's
//! `synced_at` (`clock_timestamp()` in the sink's transaction) minus the
//! `received_at` of the document's last event — the last webhook's
//! freshness in PostgreSQL.
//!
//! Reproduce: `cargo bench --bench freshness` (knobs above, and
//! `FRESH_RUNS` rounds, default 3), or with PostgreSQL:
//! `pg_virtualenv -t -o fsync=off cargo bench --bench freshness`.

mod common;
use common::{Serve, cell, daemon_toml, env_usize, free_port, post_webhook, runtime, start_sim};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skillsync::model::{DocType, parse_upstream_ts};
use skillsync::simulator::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

/// The daemon binary: this build's, or `SKILLSYNC_BIN` (another build).
fn bin() -> String {
    std::env::var("SKILLSYNC_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// Sends `n` webhooks at `rate` per second, round robin over `ids`, each
/// after changing its document upstream; returns how many were answered 200.
async fn send_paced(sim: &Simulator, url: &str, ids: &[String], n: usize, rate: f64) -> usize {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let id = &ids[i % ids.len()];
        sim.update(DocType::Job, id);
        let body = sim.webhook_payload(DocType::Job, id, "updated").to_string();
        let (client, url, ok) = (client.clone(), url.to_string(), ok.clone());
        tasks.spawn(async move {
            let r = post_webhook(&client, &url, body).await;
            match r {
                Ok(r) if r.status().is_success() => {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(r) => eprintln!("    webhook answered {}", r.status()),
                Err(e) => eprintln!("    webhook failed: {e}"),
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    ok.load(std::sync::atomic::Ordering::Relaxed)
}

/// Seconds since the epoch of a stored timestamp.
fn epoch(s: &str) -> f64 {
    parse_upstream_ts(s).map_or(f64::NAN, |t| t.timestamp_micros() as f64 / 1e6)
}

/// Waits until every event is settled; then (event freshness in ms, per
/// document the last event's received_at).
fn settled(db: &Path, n: usize) -> (Vec<f64>, std::collections::HashMap<String, f64>) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open db");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 = c
            .query_row(
                "SELECT count(*) FROM events WHERE status = 'done'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        if done as usize >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {n} events settled after 600 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut st = c
        .prepare("SELECT doc_id, received_at, processed_at FROM events WHERE status = 'done' ORDER BY id")
        .expect("prepare");
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut last = std::collections::HashMap::new();
    let fresh = rows
        .iter()
        .map(|(doc, rx, done)| {
            last.insert(doc.clone(), epoch(rx));
            (epoch(done) - epoch(rx)) * 1e3
        })
        .collect();
    (fresh, last)
}

fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// The PostgreSQL section for a fresh schema, when PGHOST is set.
fn pg_section(schema: &str) -> Option<String> {
    let v = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    let host = v("PGHOST")?;
    Some(format!(
        "[postgres]\nurl = \"postgres://{}@{}:{}/{}?sslmode=disable\"\npassword_env = \"PGPASSWORD\"\nschema = \"{schema}\"\n",
        v("PGUSER").unwrap_or_else(|| "postgres".into()),
        host,
        v("PGPORT").unwrap_or_else(|| "5432".into()),
        v("PGDATABASE").unwrap_or_else(|| "postgres".into()),
    ))
}

/// Per document, the copy's synced_at (epoch seconds), once every document
/// of `last` has been copied with a revision at least as new as its last event.
fn pg_synced(
    schema: &str,
    last: &std::collections::HashMap<String, f64>,
) -> std::collections::HashMap<String, f64> {
    let v = |k: &str| std::env::var(k).unwrap_or_default();
    let conn = format!(
        "host={} port={} user={} password={} dbname={}",
        v("PGHOST"),
        std::env::var("PGPORT").unwrap_or_else(|_| "5432".into()),
        v("PGUSER"),
        v("PGPASSWORD"),
        std::env::var("PGDATABASE").unwrap_or_else(|_| "postgres".into())
    );
    let mut client = postgres::Client::connect(&conn, postgres::NoTls).expect("connect PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = client
            .query(
                &format!(
                    "SELECT id::text, extract(epoch FROM synced_at)::float8 FROM {schema}.jobs"
                ),
                &[],
            )
            .unwrap_or_default();
        let synced: std::collections::HashMap<String, f64> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let behind = last
            .iter()
            .filter(|(id, rx)| synced.get(*id).is_none_or(|s| s < *rx))
            .count();
        if behind == 0 || Instant::now() > deadline {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            return synced;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Round {
    /// Webhooks sent but not answered 200.
    refused: usize,
    p50: f64,
    p99: f64,
    max: f64,
    events: usize,
    pg: Option<(f64, f64, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn round(
    rt: &tokio::runtime::Runtime,
    sim: &Simulator,
    dir: &Path,
    ids: &[String],
    rate: f64,
    secs: usize,
    concurrency: usize,
    tag: &str,
) -> Round {
    let db = dir.join(format!("{tag}.db"));
    let schema = format!(
        "bench_fresh_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let pg = pg_section(&schema);
    let port = free_port();
    let toml = daemon_toml(
        &db,
        &sim.base_url(),
        "",
        "",
        &format!(
            "[fetch]\nconcurrency = {concurrency}\n{}",
            pg.clone().unwrap_or_default()
        ),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let cfg = dir.join(format!("daemon-{port}.toml"));
    std::fs::write(&cfg, toml).expect("write config");
    let d = Serve::start(&bin(), &cfg, &dir.join(format!("daemon-{port}.log")), port);
    std::thread::sleep(Duration::from_secs(1));
    let n = (rate * secs as f64) as usize;
    let acked = rt.block_on(send_paced(sim, &d.url(), ids, n, rate));
    if acked < n {
        eprintln!(
            "    {} of {n} webhooks not answered 200 (see above)",
            n - acked
        );
    }
    let (fresh, last) = settled(&db, acked);
    let pg_fresh = pg.as_ref().map(|_| {
        let synced = pg_synced(&schema, &last);
        let d: Vec<f64> = last
            .iter()
            .filter_map(|(id, rx)| synced.get(id).map(|s| (s - rx) * 1e3))
            .collect();
        (pct(&d, 0.5), pct(&d, 0.99), pct(&d, 1.0))
    });
    d.stop();
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
    }
    let r = Round {
        refused: n - acked,
        p50: pct(&fresh, 0.5),
        p99: pct(&fresh, 0.99),
        max: pct(&fresh, 1.0),
        events: fresh.len(),
        pg: pg_fresh,
    };
    eprintln!(
        "  {rate:.0}/s, {secs} s, concurrency {concurrency}: {} events, webhook → job_report p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms{}",
        r.events,
        r.p50,
        r.p99,
        r.max,
        r.pg.map(|(a, b, c)| format!(
            "; → PostgreSQL (last event per document) p50 {a:.0} ms, p99 {b:.0} ms, max {c:.0} ms"
        ))
        .unwrap_or_default()
    );
    r
}

fn main() {
    let runs = env_usize("FRESH_RUNS", 3).max(1);
    let docs = env_usize("FRESH_DOCS", 1000);
    let latency = env_usize("FRESH_LATENCY_MS", 50) as u64;
    let concurrency = env_usize("FRESH_CONCURRENCY", 8);
    let slow_secs = env_usize("FRESH_SLOW_SECS", 20);
    let fast_secs = env_usize("FRESH_FAST_SECS", 10);
    let rt = runtime();
    let _guard = rt.enter();
    skillsync::upstream::install_crypto();
    let token = CancellationToken::new();
    let sim = rt.block_on(start_sim(&token));
    sim.set_faults(Faults {
        latency: Duration::from_millis(latency),
        ..Faults::default()
    });
    let ids = sim.seed(DocType::Job, docs);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows: Vec<(f64, usize, Vec<Round>)> = Vec::new();
    for (rate, secs) in [(50.0, slow_secs), (2000.0, fast_secs)] {
        let mut rounds = Vec::new();
        for r in 0..runs {
            rounds.push(round(
                &rt,
                &sim,
                dir.path(),
                &ids,
                rate,
                secs,
                concurrency,
                &format!("r{rate}-{r}"),
            ));
        }
        rows.push((rate, secs, rounds));
    }
    token.cancel();
    println!();
    println!(
        "freshness ({docs} documents round robin, upstream {latency} ms per GET, fetch concurrency {concurrency}), {runs} rounds, median [min–max]"
    );
    println!();
    println!(
        "| webhooks/s | events | not 200 | → job_report p50 ms | p99 ms | max ms | → PostgreSQL p50 ms | p99 ms | max ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (rate, _secs, rounds) in &rows {
        let col = |f: &dyn Fn(&Round) -> f64| cell(&rounds.iter().map(f).collect::<Vec<_>>(), 0);
        let pg = |f: &dyn Fn(&(f64, f64, f64)) -> f64| {
            let v: Vec<f64> = rounds.iter().filter_map(|r| r.pg.as_ref().map(f)).collect();
            if v.is_empty() {
                "–".to_string()
            } else {
                cell(&v, 0)
            }
        };
        println!(
            "| {rate:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            col(&|r| r.events as f64),
            rounds.iter().map(|r| r.refused).sum::<usize>(),
            col(&|r| r.p50),
            col(&|r| r.p99),
            col(&|r| r.max),
            pg(&|p| p.0),
            pg(&|p| p.1),
            pg(&|p| p.2),
        );
    }
    let slow: Vec<f64> = rows[0].2.iter().map(|r| r.p99).collect();
    println!();
    println!(
        "target: webhook → job_report p99 < 250 ms at 50/s with {latency} ms upstream: {} ms → {}",
        cell(&slow, 0),
        if common::summary(&slow).0 < 250.0 {
            "met"
        } else {
            "MISSED"
        }
    );
}
