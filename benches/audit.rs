//! Audit under load (issue 24): webhook latency while an accuracy audit
//! runs, against a baseline without one measured in the same run.
//!
//! A mirror of `AUDIT_BENCH_JOBS` (20,000) jobs is filled from the
//! simulator by one in-process reconciliation. Then `skillsync serve` (the
//! release binary, a child process) runs on it with an `audit_schedule` of
//! every minute at second 0 and `audit_sample = AUDIT_BENCH_SAMPLE` (800),
//! so each minute it audits jobs (800 GETs at the default pace of 50 a
//! second: 16 s) and projects (none here). `created` webhooks go
//! out at `AUDIT_BENCH_RATE` (50) per second the whole time, each on its own
//! task (a slow answer never delays the schedule), each fetched and stored
//! by serve; latency is request sent to 200 received.
//!
//! Each round (`AUDIT_BENCH_ROUNDS`, 3) waits for the next scheduled audit
//! and takes three windows of webhooks:
//! - `scheduled audit`: sent between the audit row's `started_at` and
//!   `finished_at` (the audit inside serve, on serve's runtime and writer);
//! - `baseline`: sent in a window as long, ending 2 s before that audit
//!   started (nothing else running);
//! - `verify beside serve`: sent while `skillsync verify --type job
//!   --sample AUDIT_BENCH_SAMPLE` (a second process) runs, right after.
//!
//! Reproduce: `cargo bench --bench audit`.

mod common;
use common::{cell, daemon_toml, env_usize, free_port, fsync_probe_ms, post_webhook, start_sim};

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use skillsync::app::oneshot::{OneShot, reconcile_once};
use skillsync::config::Config;
use skillsync::model::{DocType, RunKind};
use skillsync::simulator::Simulator;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_skillsync");

struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

async fn start_serve(config: &Path, dir: &Path, port: u16) -> Serve {
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
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
type Sample = (DateTime<Utc>, Option<f64>);

/// Sends `created` webhooks at `rate`/s until `stop`.
fn send_forever(
    url: String,
    sim: Simulator,
    rate: usize,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
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
                let at = Utc::now();
                let t = Instant::now();
                let r = post_webhook(&client, &url, body).await;
                let ok = matches!(&r, Ok(r) if r.status() == 200);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                samples.lock().unwrap().push((at, ok.then_some(ms)));
            }));
        }
        for h in inflight {
            let _ = h.await;
        }
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// The latest finished audit of acme's jobs after `after_id`: (id, started, finished, sampled).
fn finished_audit(db: &Path, after_id: i64) -> Option<(i64, DateTime<Utc>, DateTime<Utc>, i64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()?;
    c.query_row(
        "SELECT id, started_at, finished_at, sampled FROM audits
         WHERE tenant = 'acme' AND doc_type = 'job' AND id > ?1 AND finished_at IS NOT NULL
         ORDER BY id LIMIT 1",
        [after_id],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        },
    )
    .ok()
    .and_then(|(id, s, f, n)| {
        Some((
            id,
            DateTime::parse_from_rfc3339(&s).ok()?.with_timezone(&Utc),
            DateTime::parse_from_rfc3339(&f).ok()?.with_timezone(&Utc),
            n,
        ))
    })
}

/// Latency figures of the webhooks sent in `[from, to)`.
struct Window {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    over_10ms: usize,
    failed: usize,
}

fn window(samples: &[Sample], from: DateTime<Utc>, to: DateTime<Utc>) -> Window {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .collect();
    let mut ok: Vec<f64> = inside.iter().filter_map(|(_, l)| *l).collect();
    Window {
        n: inside.len(),
        over_10ms: ok.iter().filter(|l| **l > 10.0).count(),
        failed: inside.iter().filter(|(_, l)| l.is_none()).count(),
        p50: pct(&mut ok, 0.5),
        p99: pct(&mut ok, 0.99),
        max: pct(&mut ok, 1.0),
    }
}

#[tokio::main]
async fn main() {
    let jobs = env_usize("AUDIT_BENCH_JOBS", 20_000);
    let sample = env_usize("AUDIT_BENCH_SAMPLE", 800);
    let rate = env_usize("AUDIT_BENCH_RATE", 50);
    let rounds = env_usize("AUDIT_BENCH_ROUNDS", 3);
    skillsync::upstream::install_crypto();
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    sim.seed(DocType::Job, jobs);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("skillsync.db");
    let port = free_port();
    let toml = daemon_toml(&db, &sim.base_url(), "", "", "").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    ) + &format!("audit_schedule = \"0 * * * * *\"\naudit_sample = {sample}\n");
    let config_path = dir.path().join("bench.toml");
    std::fs::write(&config_path, &toml).unwrap();

    let t = Instant::now();
    let mut fill = Config::from_toml(&toml, None).unwrap();
    fill.tenants[0].audit_schedule = None;
    let what = OneShot {
        types: vec![DocType::Job],
        ..OneShot::everything(RunKind::Incremental)
    };
    let report = reconcile_once(Arc::new(fill), what, CancellationToken::new()).await;
    assert!(report.all_ok(), "{report}");
    eprintln!(
        "mirror of {jobs} jobs filled in {:.1} s; fsync probe {:.2} ms",
        t.elapsed().as_secs_f64(),
        fsync_probe_ms(dir.path())
    );

    let serve = start_serve(&config_path, dir.path(), port).await;
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = CancellationToken::new();
    let sender = send_forever(
        format!("{}/skillsevent", serve.url),
        sim.clone(),
        rate,
        samples.clone(),
        stop.clone(),
    );

    let sending_since = Utc::now();
    let mut last_id = 0;
    // (window name, round, figures, seconds)
    let mut rows: Vec<(&str, usize, Window, f64)> = Vec::new();
    let mut r = 0;
    while r < rounds {
        // The next scheduled audit (serve audits every minute at second 0).
        let (id, started, finished, sampled) = loop {
            if let Some(a) = finished_audit(&db, last_id) {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        last_id = id;
        assert_eq!(sampled as usize, sample, "the scheduled audit sampled");
        let len = finished - started;
        let pad = chrono::Duration::seconds(2);
        if started - pad - len < sending_since {
            eprintln!("an audit began before its baseline window could fill: not a round");
            continue;
        }
        let gets_before = sim.total_gets();
        let cli_started = Utc::now();
        let mut verify = Command::new(BIN);
        verify
            .args([
                "verify",
                "--type",
                "job",
                "--sample",
                &sample.to_string(),
                "--config",
            ])
            .arg(&config_path)
            .env("RUST_LOG", "warn");
        let out = tokio::task::spawn_blocking(move || verify.output().unwrap())
            .await
            .unwrap();
        let cli_finished = Utc::now();
        let gets = sim.total_gets() - gets_before;
        // 0, or 2 if an upstream answer was lost under the load: never a mismatch.
        assert!(
            matches!(out.status.code(), Some(0 | 2)),
            "verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        if let Some(a) = finished_audit(&db, last_id) {
            last_id = a.0;
        }
        let s = samples.lock().unwrap().clone();
        rows.push((
            "baseline (no audit)",
            r,
            window(&s, started - pad - len, started - pad),
            len.num_milliseconds() as f64 / 1e3,
        ));
        rows.push((
            "scheduled audit in serve",
            r,
            window(&s, started, finished),
            len.num_milliseconds() as f64 / 1e3,
        ));
        rows.push((
            "verify beside serve",
            r,
            window(&s, cli_started, cli_finished),
            (cli_finished - cli_started).num_milliseconds() as f64 / 1e3,
        ));
        eprintln!(
            "round {r}: scheduled audit {:.1} s, verify {:.1} s ({gets} GETs incl. the webhooks' fetches)",
            len.num_milliseconds() as f64 / 1e3,
            (cli_finished - cli_started).num_milliseconds() as f64 / 1e3
        );
        r += 1;
    }
    stop.cancel();
    sender.await.unwrap();
    drop(serve);

    println!("| window | round | s | webhooks | p50 ms | p99 ms | max ms | > 10 ms | not 200 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, r, w, secs) in &rows {
        println!(
            "| {name} | {r} | {secs:.1} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
            w.n, w.p50, w.p99, w.max, w.over_10ms, w.failed
        );
    }
    for name in [
        "baseline (no audit)",
        "scheduled audit in serve",
        "verify beside serve",
    ] {
        let of = |f: fn(&Window) -> f64| -> Vec<f64> {
            rows.iter()
                .filter(|x| x.0 == name)
                .map(|x| f(&x.2))
                .collect()
        };
        println!(
            "| **{name}** | median of {rounds} | | | {} | **{}** | {} | | |",
            cell(&of(|w| w.p50), 1),
            cell(&of(|w| w.p99), 1),
            cell(&of(|w| w.max), 1)
        );
    }
    // p99 ratio to the same round's baseline.
    for name in ["scheduled audit in serve", "verify beside serve"] {
        let ratios: Vec<f64> = (0..rounds)
            .filter_map(|r| {
                let base = rows
                    .iter()
                    .find(|x| x.0 == "baseline (no audit)" && x.1 == r)?;
                let it = rows.iter().find(|x| x.0 == name && x.1 == r)?;
                Some(it.2.p99 / base.2.p99)
            })
            .collect();
        println!("p99 {name} / baseline, per round: {}", cell(&ratios, 2));
    }
    token.cancel();
}
