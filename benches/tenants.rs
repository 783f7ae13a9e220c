//! Many tenants in one daemon (issue 26): `TENANTS` (200) tenants, each
//! mirroring the same `TENANTS_DOCS` (5,000) jobs from the simulator (one
//! simulator, hosted in this process, serves them all: the daemon cannot
//! tell), so the database holds 1,000,000 mirrored jobs.
//!
//! Set-up: `skillsync reconcile --full --type job` for the first tenant at
//! 0 ms upstream latency (fetch concurrency 32) fills its mirror; the bench
//! then copies that tenant's rows (`jobs`, `document_history`, the report
//! tables and `sync_state`) to the other tenants in SQL, so every tenant's
//! mirror equals upstream and a full sweep lists, compares and writes
//! nothing but its run row. Upstream then answers each call after
//! `TENANTS_LATENCY_MS` (50) ms.
//!
//! Two runs of `skillsync serve` (the release binary, its own process) on
//! that database, every tenant with its own `full_sweep_schedule` (and
//! `reconcile_schedule = "off"`):
//!
//! - **herd**: every tenant's schedule is the same cron tick (as with the
//!   default schedules, which are one cron for every tenant);
//! - **spread**: tenant *i*'s sweep fires at second *i* × 60 ÷ `TENANTS`
//!   of the minute (each tenant its own second).
//!
//! Per run: the daemon's RSS after 5 s idle (`VmRSS`); intake under wrk
//! (`-t2 -c64`, `TENANTS_WRK_SECS` (10) s, the first tenant's webhooks for
//! 8 documents) while idle and again from the sweeps' first tick on; the
//! peak RSS (`VmHWM`) once every tenant's sweep of both types has finished;
//! from `sync_runs`: when the runs started (spread), how many ran at once
//! at most, and the whole sweep's wall time.
//!
//! Reproduce: `cargo bench --bench tenants` (knobs above; wrk is the Debian
//! package). Another change (issue 24: bounded listing memory and a cap on
//! concurrent listings) will move these figures.

mod common;
use common::{APP_SECRET, SECRET, Serve, free_port, rss_mb, runtime, start_sim, wrk_script};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use skillsync::model::{DocType, parse_upstream_ts};
use skillsync::simulator::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

/// The daemon binary: this build's, or `SKILLSYNC_BIN` (another build).
fn bin() -> String {
    std::env::var("SKILLSYNC_BIN").unwrap_or_else(|_| BIN.to_string())
}

fn env_usize(name: &str, default: usize) -> usize {
    common::env_usize(name, default)
}

/// The config: `tenants` tenants against `base`; tenant `i`'s full sweep
/// fires daily at `at(i)` (UTC), or never when `at` answers `None`.
fn config(
    db: &Path,
    base: &str,
    port: u16,
    tenants: usize,
    at: &dyn Fn(usize) -> Option<chrono::DateTime<Utc>>,
) -> String {
    let mut s = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"off\"\n[database]\npath = \"{}\"\n[fetch]\nconcurrency = 32\n",
        db.display()
    );
    for i in 0..tenants {
        let secret = if i == 0 {
            SECRET.to_string()
        } else {
            format!("{SECRET}-{i}")
        };
        s.push_str(&format!(
            "[[tenant]]\nname = \"t{i:03}\"\nwebhook_secrets = [\"{secret}\"]\napi_base = \"{base}\"\nextraction_base = \"{base}\"\n\
             app_tenant = \"bench-tenant\"\napp_id = \"bench-app\"\napp_secret = \"{APP_SECRET}\"\n\
             reconcile_schedule = \"off\"\nfull_sweep_schedule = \"{}\"\n",
            at(i).map_or("off".to_string(), |t| format!(
                "{} {} {} * * *",
                t.second(),
                t.minute(),
                t.hour()
            ))
        ));
    }
    s
}

fn spawn(dir: &Path, cfg_text: &str, args: &[&str], tag: &str) -> Child {
    let cfg = dir.join(format!("{tag}.toml"));
    std::fs::write(&cfg, cfg_text).expect("config");
    let log = std::fs::File::create(dir.join(format!("{tag}.log"))).expect("log");
    Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start skillsync")
}

/// Copies tenant t000's mirror to tenants t001.. in SQL.
fn clone_tenants(db: &Path, tenants: usize) {
    let c = rusqlite::Connection::open(db).expect("open");
    c.busy_timeout(Duration::from_secs(30)).expect("busy");
    c.execute_batch("PRAGMA synchronous = OFF; BEGIN; CREATE TEMP TABLE names (name TEXT);")
        .expect("begin");
    for i in 1..tenants {
        c.execute("INSERT INTO names VALUES (?1)", [format!("t{i:03}")])
            .expect("name");
    }
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('jobs', 'projects', 'document_history', 'job_report_values', 'project_report_values', 'document_stages', 'sync_state')")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("tables");
    for t in tables {
        let cols: Vec<String> = c
            .prepare(&format!("SELECT name FROM pragma_table_info('{t}')"))
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("columns");
        let select: Vec<String> = cols
            .iter()
            .map(|col| {
                if col == "tenant" {
                    "n.name".to_string()
                } else {
                    format!("s.{col}")
                }
            })
            .collect();
        c.execute_batch(&format!(
            "INSERT INTO {t} ({}) SELECT {} FROM {t} AS s, names AS n WHERE s.tenant = 't000'",
            cols.join(", "),
            select.join(", ")
        ))
        .expect("copy rows");
    }
    c.execute_batch("DELETE FROM pg_outbox; COMMIT; PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("commit");
}

fn wrk(url: &str, script: &Path, secs: usize) -> f64 {
    let out = Command::new("wrk")
        .args(["-t2", "-c64", "-d", &format!("{secs}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// (start, finish) in epoch seconds of the full runs started after `since`.
fn runs(db: &Path, since: &str) -> (usize, Vec<(f64, f64)>) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    let rows: Vec<(String, Option<String>)> = c
        .prepare("SELECT started_at, finished_at FROM sync_runs WHERE kind = 'full' AND started_at >= ?1")
        .and_then(|mut s| {
            s.query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .unwrap_or_default();
    let t = |s: &str| parse_upstream_ts(s).map_or(f64::NAN, |t| t.timestamp_millis() as f64 / 1e3);
    let done = rows
        .iter()
        .filter_map(|(a, b)| b.as_deref().map(|b| (t(a), t(b))))
        .collect();
    (rows.len(), done)
}

struct Outcome {
    idle_rss: f64,
    peak_rss: f64,
    idle_rate: f64,
    sweep_rate: f64,
    first_to_last_start: f64,
    wall: f64,
    most_at_once: usize,
    per_second_max: usize,
}

#[allow(clippy::too_many_arguments)]
fn run(
    dir: &Path,
    db: &Path,
    base: &str,
    tenants: usize,
    herd: bool,
    script: &Path,
    wrk_secs: usize,
) -> Outcome {
    let port = free_port();
    // The first tick 45 s away: start-up, 5 s idle and the idle wrk run fit
    // before it. Daily schedules, so each tenant sweeps exactly once here.
    let tick = Utc::now() + chrono::Duration::seconds(45);
    let tick = tick - chrono::Duration::nanoseconds(i64::from(tick.nanosecond()));
    let at = move |i: usize| -> Option<chrono::DateTime<Utc>> {
        Some(if herd {
            tick
        } else {
            tick + chrono::Duration::seconds((i * 60 / tenants) as i64)
        })
    };
    let text = config(db, base, port, tenants, &at);
    let since = skillsync::model::fmt_ts(Utc::now());
    let tag = if herd { "herd" } else { "spread" };
    let cfg = dir.join(format!("{tag}.toml"));
    std::fs::write(&cfg, &text).expect("config");
    let d = Serve::start(&bin(), &cfg, &dir.join(format!("{tag}.log")), port);
    std::thread::sleep(Duration::from_secs(5));
    let idle_rss = rss_mb(d.pid()).0;
    let url = d.url();
    let idle_rate = wrk(&url, script, wrk_secs);
    assert!(
        Utc::now() < tick,
        "start-up and the idle run took past the first tick"
    );
    while Utc::now() < tick {
        std::thread::sleep(Duration::from_millis(10));
    }
    let sweep_rate = wrk(&url, script, wrk_secs);
    let want = tenants * DocType::ALL.len();
    let deadline = Instant::now() + Duration::from_secs(900);
    let done = loop {
        let (_, done) = runs(db, &since);
        if done.len() >= want {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} sweeps finished in 900 s",
            done.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let peak_rss = rss_mb(d.pid()).1;
    d.stop();
    let first = done.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let last_start = done.iter().map(|r| r.0).fold(f64::NEG_INFINITY, f64::max);
    let end = done.iter().map(|r| r.1).fold(f64::NEG_INFINITY, f64::max);
    let most_at_once = done
        .iter()
        .map(|(s, _)| done.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0);
    let mut per_second = std::collections::HashMap::new();
    for (s, _) in &done {
        *per_second.entry(s.floor() as i64).or_insert(0usize) += 1;
    }
    Outcome {
        idle_rss,
        peak_rss,
        idle_rate,
        sweep_rate,
        first_to_last_start: last_start - first,
        wall: end - first,
        most_at_once,
        per_second_max: per_second.values().copied().max().unwrap_or(0),
    }
}

/// Fills tenant t000's mirror from the simulator (a full reconcile at 0 ms)
/// and copies it to the other tenants; returns the documents' ids.
fn seed(sim: &Simulator, dir: &Path, db: &Path, tenants: usize, docs: usize) -> Vec<String> {
    let ids = sim.seed(DocType::Job, docs);
    let t = Instant::now();
    let seed_cfg = config(db, &sim.base_url(), free_port(), 1, &|_| None);
    let status = spawn(
        dir,
        &seed_cfg,
        &["reconcile", "--full", "--type", "job"],
        "seed",
    )
    .wait()
    .expect("seed reconcile");
    assert!(status.success(), "seeding reconcile failed");
    clone_tenants(db, tenants);
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "{tenants} tenants × {docs} jobs mirrored in {:.0} s ({:.0} MB)",
        t.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );
    ids
}

/// A kept database: the simulator gets back the very documents it holds
/// (same ids and ModifiedOn), so a sweep finds nothing to change.
fn reuse(sim: &Simulator, db: &Path, docs: usize) -> Vec<String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open kept database");
    let rows: Vec<(String, String)> = c
        .prepare("SELECT id, document FROM jobs WHERE tenant = 't000' ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("kept jobs");
    assert_eq!(
        rows.len(),
        docs,
        "TENANTS_DB holds another number of documents"
    );
    for (id, doc) in &rows {
        let doc: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(doc).expect("stored document");
        sim.put_raw(DocType::Job, id, doc);
    }
    rows.into_iter().map(|r| r.0).collect()
}

fn main() {
    let tenants = env_usize("TENANTS", 200).max(1);
    let docs = env_usize("TENANTS_DOCS", 5000);
    let latency = env_usize("TENANTS_LATENCY_MS", 50) as u64;
    let wrk_secs = env_usize("TENANTS_WRK_SECS", 10);
    let rt = runtime();
    let _guard = rt.enter();
    let token = CancellationToken::new();
    let sim = rt.block_on(start_sim(&token));
    let dir = tempfile::tempdir().expect("tempdir");
    // TENANTS_DB: keep the seeded database there (and reuse it when it exists
    // with the same tenants and documents: seeding takes minutes).
    let kept = std::env::var_os("TENANTS_DB").map(std::path::PathBuf::from);
    let db = kept
        .clone()
        .unwrap_or_else(|| dir.path().join("tenants.db"));
    let ids = if kept.as_ref().is_some_and(|p| p.exists()) {
        reuse(&sim, &db, docs)
    } else {
        seed(&sim, dir.path(), &db, tenants, docs)
    };
    sim.set_faults(Faults {
        latency: Duration::from_millis(latency),
        ..Faults::default()
    });

    let payloads: Vec<serde_json::Value> = ids
        .iter()
        .take(8)
        .map(|id| sim.webhook_payload(DocType::Job, id, "updated"))
        .collect();
    let script = dir.path().join("post.lua");
    std::fs::write(&script, wrk_script(&payloads, None)).expect("script");

    let mut out = Vec::new();
    for herd in [true, false] {
        let o = run(
            dir.path(),
            &db,
            &sim.base_url(),
            tenants,
            herd,
            &script,
            wrk_secs,
        );
        eprintln!(
            "  {}: idle RSS {:.1} MB, peak {:.1} MB; intake idle {:.0}/s, from the first tick {:.0}/s ({:.2}); starts over {:.1} s, at most {} runs at once, {} starting in one second; all done in {:.1} s",
            if herd { "herd" } else { "spread" },
            o.idle_rss,
            o.peak_rss,
            o.idle_rate,
            o.sweep_rate,
            o.sweep_rate / o.idle_rate,
            o.first_to_last_start,
            o.most_at_once,
            o.per_second_max,
            o.wall
        );
        out.push((herd, o));
    }
    token.cancel();
    println!();
    println!(
        "many tenants: {tenants} tenants × {docs} jobs (2 types swept each), upstream {latency} ms per call, wrk -t2 -c64 -d{wrk_secs}s"
    );
    println!();
    println!(
        "| schedules | idle RSS MB | peak RSS MB | intake idle ev/s | intake from the tick ev/s | ratio | sweep starts spread over s | most runs at once | most starting in one second | all sweeps done in s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (herd, o) in &out {
        println!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.1} | {} | {} | {:.1} |",
            if *herd {
                "herd (one cron tick)"
            } else {
                "spread (one second each)"
            },
            o.idle_rss,
            o.peak_rss,
            o.idle_rate,
            o.sweep_rate,
            o.sweep_rate / o.idle_rate,
            o.first_to_last_start,
            o.most_at_once,
            o.per_second_max,
            o.wall
        );
    }
    let peak = out.iter().map(|(_, o)| o.peak_rss).fold(0.0, f64::max);
    let worst = out
        .iter()
        .map(|(_, o)| o.sweep_rate / o.idle_rate)
        .fold(f64::INFINITY, f64::min);
    println!();
    println!(
        "target: RSS < 128 MB: peak {peak:.1} MB → {}; intake ≥ 0.9 × idle while sweeps run: worst {worst:.2} → {}",
        if peak < 128.0 { "met" } else { "MISSED" },
        if worst >= 0.9 { "met" } else { "MISSED" }
    );
}
