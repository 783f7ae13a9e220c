//! Fetch pipeline benchmark (issue "fetch pipeline").
//!
//! 1. **Throughput against the latency bound.** An in-process simulator
//!    answers every GET after 50 ms; the real daemon (`skillsync::run`) runs
//!    with `fetch.concurrency` 8 and then 32. The bench seeds
//!    `concurrency × 120` documents (about six seconds of work at the bound),
//!    sends one `created` webhook for each, and polls the `jobs` table (a
//!    read-only connection, every 5 ms) until every document is mirrored.
//!    It reports mirrored documents per second from the first webhook to the
//!    last row ("end to end", includes start-up of the queue) and between the
//!    10% and 90% marks ("steady"), against the bound `concurrency ÷ latency`
//!    (a fetch slot cannot turn over faster than one upstream round trip).
//!    Target: ≥ 90% of the bound.
//! 2. **Coalescing.** 1,000 documents, 10 webhooks each (10,000 events,
//!    shuffled, 64 senders as fast as answered), default concurrency 8;
//!    once no event is pending and the queue is empty, it counts the GETs the
//!    simulator answered. Run with 50 ms upstream latency (the realistic case)
//!    and with 0 ms (fetches finish while the burst is still arriving, the
//!    hardest case for coalescing). Target: ≤ 2,000 GETs.
//!
//! Every trial uses a fresh database in a temp dir and a fresh simulator and
//! daemon in this process; numbers are medians over rounds with [min–max].
//!
//! Reproduce: `cargo bench --bench pipeline` (knob: `PIPELINE_RUNS` rounds,
//! default 3).

mod common;
use common::{SECRET, cell, daemon_toml, env_usize, start_sim, summary};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use skillsync::config::Config;
use skillsync::model::DocType;
use skillsync::simulator::{Faults, Simulator, send_webhooks};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LATENCY: Duration = Duration::from_millis(50);
const CONCURRENCIES: [usize; 2] = [8, 32];
const DOCS_PER_SLOT: usize = 120;
const BURST_DOCS: usize = 1_000;
const BURST_EVENTS_PER_DOC: usize = 10;
const BURST_SENDERS: usize = 64;
const DEADLINE: Duration = Duration::from_secs(180);

fn config_toml(db: &Path, sim_base: &str, concurrency: usize) -> String {
    daemon_toml(
        db,
        sim_base,
        "",
        "",
        &format!("[fetch]\nconcurrency = {concurrency}\ntimeout_secs = 10"),
    )
}

/// A simulator and a daemon on a fresh database.
struct Rig {
    sim: Simulator,
    url: String,
    db: PathBuf,
    token: CancellationToken,
    sim_token: CancellationToken,
    handle: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(concurrency: usize) -> Rig {
        let sim_token = CancellationToken::new();
        let sim = start_sim(&sim_token).await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pipeline.db");
        let config =
            Config::from_toml(&config_toml(&db, &sim.base_url(), concurrency), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let t = token.clone();
        let handle =
            tokio::spawn(async move { skillsync::run(config, listener, t).await.unwrap() });
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "daemon not healthy within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Rig {
            sim,
            url: format!("{base}/skillsevent"),
            db,
            token,
            sim_token,
            handle,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("daemon stops within a minute")
            .expect("daemon task");
        self.sim_token.cancel();
    }
}

fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Polls on a plain thread (blocking SQLite stays off the async workers)
/// until `done` holds; returns the instants at which `sql` first reached
/// each of `marks`.
async fn watch(
    db: PathBuf,
    sql: &'static str,
    marks: Vec<i64>,
    done: &'static str,
) -> Vec<Option<Instant>> {
    tokio::task::spawn_blocking(move || {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut hit = vec![None; marks.len()];
        let deadline = Instant::now() + DEADLINE;
        loop {
            let n = count(&conn, sql);
            let now = Instant::now();
            for (h, m) in hit.iter_mut().zip(&marks) {
                if h.is_none() && n >= *m {
                    *h = Some(now);
                }
            }
            if hit.iter().all(Option::is_some) && count(&conn, done) == 1 {
                return hit;
            }
            if now > deadline {
                eprintln!("  gave up after {DEADLINE:?}: {n} (marks {marks:?})");
                return hit;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await
    .unwrap()
}

#[derive(Clone, Debug)]
struct PipeSample {
    end_to_end: f64,
    steady: f64,
    gets: u64,
}

async fn pipeline_trial(concurrency: usize) -> PipeSample {
    let rig = Rig::start(concurrency).await;
    let n = concurrency * DOCS_PER_SLOT;
    let payloads: Vec<Value> = rig
        .sim
        .seed(DocType::Job, n)
        .iter()
        .map(|id| rig.sim.webhook_payload(DocType::Job, id, "created"))
        .collect();
    rig.sim.set_faults(Faults {
        latency: LATENCY,
        ..Faults::default()
    });
    let marks = vec![(n / 10) as i64, (n * 9 / 10) as i64, n as i64];
    let t0 = Instant::now();
    let sender = tokio::spawn({
        let url = rig.url.clone();
        async move { send_webhooks(&url, SECRET, payloads, 32, None).await }
    });
    let hit = watch(
        rig.db.clone(),
        "SELECT count(*) FROM jobs",
        marks,
        "SELECT 1",
    )
    .await;
    let report = sender.await.unwrap();
    assert_eq!(report.acked.len(), n, "every webhook acknowledged");
    let gets = rig.sim.total_gets();
    rig.stop().await;
    let (t10, t90, t100) = (
        hit[0].expect("10% mirrored"),
        hit[1].expect("90% mirrored"),
        hit[2].expect("all mirrored"),
    );
    let s = PipeSample {
        end_to_end: n as f64 / (t100 - t0).as_secs_f64(),
        steady: (n * 8 / 10) as f64 / (t90 - t10).as_secs_f64(),
        gets,
    };
    let bound = concurrency as f64 / LATENCY.as_secs_f64();
    eprintln!(
        "  concurrency {concurrency:>2}: {n} docs, end to end {:.0} docs/s ({:.0}% of {bound:.0}), steady {:.0} docs/s ({:.0}%), {} GETs, intake took {:.2} s",
        s.end_to_end,
        100.0 * s.end_to_end / bound,
        s.steady,
        100.0 * s.steady / bound,
        s.gets,
        report.elapsed.as_secs_f64()
    );
    s
}

#[derive(Clone, Debug)]
struct BurstSample {
    gets: u64,
    drain_secs: f64,
    intake_secs: f64,
    done: i64,
}

async fn burst_trial(latency: Duration) -> BurstSample {
    let rig = Rig::start(8).await;
    let ids = rig.sim.seed(DocType::Job, BURST_DOCS);
    let mut payloads: Vec<Value> = ids
        .iter()
        .flat_map(|id| {
            (0..BURST_EVENTS_PER_DOC).map(|i| {
                let action = if i == 0 { "created" } else { "updated" };
                rig.sim.webhook_payload(DocType::Job, id, action)
            })
        })
        .collect();
    fastrand::shuffle(&mut payloads);
    let events = payloads.len();
    rig.sim.set_faults(Faults {
        latency,
        ..Faults::default()
    });
    let t0 = Instant::now();
    let report = send_webhooks(&rig.url, SECRET, payloads, BURST_SENDERS, None).await;
    assert_eq!(report.acked.len(), events, "every webhook acknowledged");
    watch(
        rig.db.clone(),
        "SELECT count(*) FROM events WHERE status = 'done'",
        vec![events as i64],
        "SELECT count(*) = 0 FROM fetch_queue",
    )
    .await;
    let drain_secs = t0.elapsed().as_secs_f64();
    let conn =
        rusqlite::Connection::open_with_flags(&rig.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let done = count(&conn, "SELECT count(*) FROM events WHERE status = 'done'");
    drop(conn);
    let gets = rig.sim.total_gets();
    rig.stop().await;
    let s = BurstSample {
        gets,
        drain_secs,
        intake_secs: report.elapsed.as_secs_f64(),
        done,
    };
    eprintln!(
        "  burst at {} ms: {events} events over {BURST_DOCS} docs: {} GETs, intake {:.2} s, all done after {:.2} s ({} done)",
        latency.as_millis(),
        s.gets,
        s.intake_secs,
        s.drain_secs,
        s.done
    );
    s
}

fn main() {
    let runs = env_usize("PIPELINE_RUNS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    skillsync::upstream::install_crypto();
    let latencies = [LATENCY, Duration::ZERO];
    let mut pipe: Vec<Vec<PipeSample>> = vec![Vec::new(); CONCURRENCIES.len()];
    let mut burst: Vec<Vec<BurstSample>> = vec![Vec::new(); latencies.len()];
    let started = Instant::now();
    rt.block_on(async {
        for round in 0..runs {
            eprintln!("round {}/{runs}", round + 1);
            for (i, &c) in CONCURRENCIES.iter().enumerate() {
                pipe[i].push(pipeline_trial(c).await);
            }
            for (i, &l) in latencies.iter().enumerate() {
                burst[i].push(burst_trial(l).await);
            }
        }
    });

    println!();
    println!(
        "pipeline: {runs} rounds, median [min–max]; upstream latency {} ms; total {:.0} s",
        LATENCY.as_millis(),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| fetch concurrency | documents | bound (conc. ÷ latency) | end to end docs/s | % of bound | steady 10–90% docs/s | % of bound | GETs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut verdicts = Vec::new();
    for (i, &c) in CONCURRENCIES.iter().enumerate() {
        let bound = c as f64 / LATENCY.as_secs_f64();
        let e2e: Vec<f64> = pipe[i].iter().map(|s| s.end_to_end).collect();
        let steady: Vec<f64> = pipe[i].iter().map(|s| s.steady).collect();
        let pct = |v: &[f64]| v.iter().map(|x| 100.0 * x / bound).collect::<Vec<_>>();
        let gets: Vec<f64> = pipe[i].iter().map(|s| s.gets as f64).collect();
        println!(
            "| {c} | {} | {bound:.0} | {} | {} | {} | {} | {} |",
            c * DOCS_PER_SLOT,
            cell(&e2e, 0),
            cell(&pct(&e2e), 1),
            cell(&steady, 0),
            cell(&pct(&steady), 1),
            cell(&gets, 0)
        );
        let m = summary(&pct(&e2e)).0;
        verdicts.push(format!(
            "target: concurrency {c} ≥ 90% of {bound:.0} docs/s: {m:.1}% end to end → {}",
            if m >= 90.0 { "met" } else { "MISSED" }
        ));
    }
    println!();
    println!(
        "| burst | upstream latency | GETs | intake s | all events done after s | events done |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, &l) in latencies.iter().enumerate() {
        let s = &burst[i];
        let col = |f: fn(&BurstSample) -> f64, p| cell(&s.iter().map(f).collect::<Vec<_>>(), p);
        println!(
            "| {} events over {BURST_DOCS} docs, {BURST_SENDERS} senders, concurrency 8 | {} ms | {} | {} | {} | {} |",
            BURST_DOCS * BURST_EVENTS_PER_DOC,
            l.as_millis(),
            col(|s| s.gets as f64, 0),
            col(|s| s.intake_secs, 2),
            col(|s| s.drain_secs, 2),
            col(|s| s.done as f64, 0)
        );
        let worst = s.iter().map(|s| s.gets).max().unwrap_or(0);
        verdicts.push(format!(
            "target: burst at {} ms ≤ 2000 GETs: median {:.0}, worst {worst} → {}",
            l.as_millis(),
            summary(&s.iter().map(|s| s.gets as f64).collect::<Vec<_>>()).0,
            if worst <= 2000 { "met" } else { "MISSED" }
        ));
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
}
