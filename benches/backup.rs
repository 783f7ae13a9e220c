//! Backup benchmark (issue 23): webhook latency while `skillsync backup`
//! copies a large database beside a running `serve`.
//!
//! A database of `BACKUP_BENCH_MB` (1024) MB is written straight into a
//! fresh file (the schema by the store, then `document_history` rows of
//! ~4 KB); `skillsync serve` (the release binary, a child process) runs on
//! it against the simulator. Webhooks (`created`, each fetched and stored)
//! go out at `BACKUP_BENCH_RATE` (50) per second, each on its own task so a
//! slow answer never delays the schedule; latency is request sent to 200
//! received. After `BACKUP_BENCH_LEAD_SECS` (10) s the copy starts (the
//! `skillsync backup` binary, a child process) and the webhooks go on until
//! `BACKUP_BENCH_TAIL_SECS` (5) s after it exits. Webhooks sent before the
//! copy started are "before", those sent while it ran are "during".
//! With `BACKUP_BENCH_VACUUM=1` the same round also runs the documented
//! predecessor, `sqlite3 DB "VACUUM INTO 'copy'"`, for comparison.
//! Rounds: `BACKUP_BENCH_RUNS` (2). The database is kept between rounds.
//!
//! Reproduce: `cargo bench --bench backup` (add `BACKUP_BENCH_VACUUM=1`
//! for the comparison). Needs ~3× BACKUP_BENCH_MB of free disk in the temp dir.

mod common;
use common::{
    cell, daemon_toml, env_usize, free_port, fsync_probe_ms, post_webhook, start_sim, summary,
};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skillsync::model::DocType;
use skillsync::simulator::Simulator;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

/// Writes `mb` megabytes of history rows into a fresh skillsync database.
fn prepare_db(path: &Path, mb: usize) {
    let store = skillsync::store::Store::open(path, Duration::from_secs(5)).unwrap();
    drop(store);
    let c = rusqlite::Connection::open(path).unwrap();
    let rows = mb * 256; // ~4 KB each
    let t = Instant::now();
    c.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         INSERT INTO document_history (tenant, doc_type, id, revision, document, fetched_at)
         SELECT 'acme', 'job', lower(hex(randomblob(16))), 1,
                json_object('Notes', hex(randomblob(1900))), '2026-11-20T10:00:00.000Z'
         FROM n;
         COMMIT;
         PRAGMA wal_checkpoint(TRUNCATE);"
    ))
    .unwrap();
    let size = std::fs::metadata(path).unwrap().len();
    eprintln!(
        "prepared {} MB ({rows} history rows) in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
}

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn start_serve(dir: &Path, db: &Path, sim: &Simulator) -> Serve {
    let port = free_port();
    let toml = daemon_toml(db, &sim.base_url(), "", "", "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    let config = dir.join("bench.toml");
    std::fs::write(&config, toml).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let s = Serve {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{}/healthz", s.url)).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}

/// (sent at, latency ms or None when not answered 200).
type Sample = (Instant, Option<f64>);

/// One round: webhooks at `rate`/s, the copy made by `copy` after `lead`.
async fn round(
    serve: &Serve,
    sim: &Simulator,
    rate: usize,
    lead: Duration,
    tail: Duration,
    mut copy: Command,
) -> (Vec<Sample>, Instant, Instant, bool) {
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = CancellationToken::new();
    let sender = {
        let (samples, stop, sim) = (samples.clone(), stop.clone(), sim.clone());
        let url = format!("{}/skillsevent", serve.url);
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::new();
            while !stop.is_cancelled() {
                tick.tick().await;
                let id = sim.create(DocType::Job);
                let body = sim
                    .webhook_payload(DocType::Job, &id, "created")
                    .to_string();
                let (client, url, samples) = (client.clone(), url.clone(), samples.clone());
                inflight.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let r = post_webhook(&client, &url, body).await;
                    let ok = matches!(&r, Ok(r) if r.status() == 200);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    samples.lock().unwrap().push((t, ok.then_some(ms)));
                }));
            }
            for h in inflight {
                let _ = h.await;
            }
        })
    };
    tokio::time::sleep(lead).await;
    let started = Instant::now();
    let ok = tokio::task::spawn_blocking(move || {
        let out = copy.output().unwrap();
        if !out.status.success() {
            eprintln!(
                "copy failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    })
    .await
    .unwrap();
    let ended = Instant::now();
    tokio::time::sleep(tail).await;
    stop.cancel();
    sender.await.unwrap();
    let s = samples.lock().unwrap().clone();
    (s, started, ended, ok)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[tokio::main]
async fn main() {
    let mb = env_usize("BACKUP_BENCH_MB", 1024);
    let rate = env_usize("BACKUP_BENCH_RATE", 50);
    let runs = env_usize("BACKUP_BENCH_RUNS", 2);
    let lead = Duration::from_secs(env_usize("BACKUP_BENCH_LEAD_SECS", 10) as u64);
    let tail = Duration::from_secs(env_usize("BACKUP_BENCH_TAIL_SECS", 5) as u64);
    let vacuum = std::env::var("BACKUP_BENCH_VACUUM").as_deref() == Ok("1");
    skillsync::upstream::install_crypto();
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("skillsync.db");
    prepare_db(&db, mb);
    eprintln!("fsync probe: {:.2} ms", fsync_probe_ms(dir.path()));
    let serve = start_serve(dir.path(), &db, &sim).await;

    let mut kinds = vec!["skillsync backup"];
    if vacuum {
        kinds.push("VACUUM INTO");
    }
    println!(
        "| copy | round | copy s | webhooks before / during | p50 before ms | p50 during ms | p99 during ms | max during ms | > 100 ms during | not 200 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for kind in &kinds {
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut maxes = Vec::new();
        for r in 0..runs {
            let target = dir.path().join(format!("copy-{r}.db"));
            let _ = std::fs::remove_file(&target);
            let cmd = if *kind == "VACUUM INTO" {
                let mut c = Command::new("sqlite3");
                c.arg(&db).arg(format!(
                    "PRAGMA busy_timeout = 5000; VACUUM INTO '{}'",
                    target.display()
                ));
                c
            } else {
                let mut c = Command::new(BIN);
                c.args(["backup", "--config"])
                    .arg(dir.path().join("bench.toml"))
                    .arg(&target)
                    .env("RUST_LOG", "warn");
                c
            };
            let (samples, started, ended, ok) = round(&serve, &sim, rate, lead, tail, cmd).await;
            assert!(ok, "{kind} failed");
            let mut before: Vec<f64> = samples
                .iter()
                .filter(|(t, _)| *t < started)
                .filter_map(|(_, l)| *l)
                .collect();
            let mut during: Vec<f64> = samples
                .iter()
                .filter(|(t, _)| *t >= started && *t < ended)
                .filter_map(|(_, l)| *l)
                .collect();
            let failed = samples.iter().filter(|(_, l)| l.is_none()).count();
            let n_during = samples
                .iter()
                .filter(|(t, _)| *t >= started && *t < ended)
                .count();
            let slow = during.iter().filter(|l| **l > 100.0).count();
            let (p50b, p50d, p99d, maxd) = (
                pct(&mut before, 0.5),
                pct(&mut during, 0.5),
                pct(&mut during, 0.99),
                pct(&mut during, 1.0),
            );
            p50s.push(p50d);
            p99s.push(p99d);
            maxes.push(maxd);
            println!(
                "| {kind} | {r} | {:.1} | {} / {n_during} | {p50b:.1} | {p50d:.1} | {p99d:.1} | {maxd:.1} | {slow} | {failed} |",
                (ended - started).as_secs_f64(),
                before.len(),
            );
            let _ = std::fs::remove_file(&target);
        }
        let (m, _, _) = summary(&maxes);
        println!(
            "| {kind} | median of {runs} | | | | {} | {} | {} (median {m:.1}) | | |",
            cell(&p50s, 1),
            cell(&p99s, 1),
            cell(&maxes, 1)
        );
    }
    drop(serve);
    token.cancel();
}
