//! Start-up on a large database (issue 22): how long after exec the first
//! webhook is answered when the `[reporting]` config changed and the report
//! tables must be refilled (1,000,000 jobs with 3 revisions each by
//! default: 3,000,000 history rows), against a start with nothing to
//! rebuild on the same database; webhook latency at 50/s while the rebuild
//! runs in the background; how long the rebuild takes; and a `kill -9` in
//! the middle of a rebuild, then a restart that finishes it.
//!
//! The release binary (`CARGO_BIN_EXE_skillsync`) runs `serve` as a
//! process; the database is filled once by
//! `skillsync::store::fill_synthetic_jobs`, and each round changes
//! `[reporting]` (a column renamed) so that each start rebuilds.
//!
//! Knobs: `STARTUP_DOCS` (1000000), `STARTUP_REVISIONS` (3), `STARTUP_RUNS` (3).
//! Reproduce: `cargo bench --bench startup` (≈ 10 min at the defaults,
//! 2–3 GB of disk in the temp dir).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{SECRET, cell, daemon_toml, env_usize, free_port, start_sim};
use skillsync::model::DocType;
use skillsync::simulator::Simulator;
use tokio_util::sync::CancellationToken;

fn serve(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_skillsync"))
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("SKILLSYNC_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        )
        .spawn()
        .expect("start serve")
}

fn rebuilding(db: &Path) -> Option<skillsync::store::RebuildState> {
    let c = skillsync::store::ReadOnlyStore::open(db).ok()?;
    c.report_rebuild().ok()?
}

/// One webhook; its latency when answered 200.
async fn webhook(client: &reqwest::Client, url: &str, sim: &Simulator) -> Option<Duration> {
    let id = sim.create(DocType::Job);
    let body = sim
        .webhook_payload(DocType::Job, &id, "created")
        .to_string();
    let t = Instant::now();
    let r = client
        .post(format!("{url}/skillsevent"))
        .header("content-type", "application/json")
        .header("x-webhook-secret", SECRET)
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await
        .ok()?;
    (r.status() == 200).then(|| t.elapsed())
}

/// Time from `since` to the first webhook answered 200.
async fn first_answer(client: &reqwest::Client, url: &str, sim: &Simulator, since: Instant) -> f64 {
    loop {
        if webhook(client, url, sim).await.is_some() {
            return since.elapsed().as_secs_f64();
        }
        assert!(since.elapsed() < Duration::from_secs(600), "never answered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn config(db: &Path, sim: &Simulator, port: u16, column: &str) -> String {
    daemon_toml(
        db,
        &sim.base_url(),
        "",
        "",
        &format!(
            "[reporting]\nstage_field = \"Stage\"\n[reporting.job]\n{column} = {{ path = \"$.Budget\", type = \"real\" }}\n"
        ),
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    skillsync::upstream::install_crypto();
    let docs = env_usize("STARTUP_DOCS", 1_000_000) as u64;
    let revisions = env_usize("STARTUP_REVISIONS", 3) as u32;
    let runs = env_usize("STARTUP_RUNS", 3);
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("tempdir");
    let db = dir.path().join("startup.db");
    let t = Instant::now();
    skillsync::store::fill_synthetic_jobs(&db, "acme", docs, revisions).expect("fill");
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!(
        "filled {docs} jobs × {revisions} revisions in {:.1} s ({:.0} MB)",
        t.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );
    let client = reqwest::Client::new();
    let log = dir.path().join("serve.log");
    let cfg = dir.path().join("skillsync.toml");
    let (mut plain, mut changed, mut total, mut p99, mut max) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..runs {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        // A [reporting] change: this round's column name.
        std::fs::write(&cfg, config(&db, &sim, port, &format!("budget_{round}"))).expect("cfg");
        let start = Instant::now();
        let child = serve(&cfg, &log);
        changed.push(first_answer(&client, &url, &sim, start).await);
        // 50 webhooks/s until the rebuild is done.
        let mut lat = Vec::new();
        while rebuilding(&db).is_some() {
            let tick = Instant::now();
            if let Some(l) = webhook(&client, &url, &sim).await {
                lat.push(l.as_secs_f64() * 1e3);
            } else {
                lat.push(f64::INFINITY);
            }
            tokio::time::sleep(Duration::from_millis(20).saturating_sub(tick.elapsed())).await;
        }
        total.push(start.elapsed().as_secs_f64());
        lat.sort_by(f64::total_cmp);
        let n = lat.len().max(1);
        p99.push(lat.get((n * 99 / 100).min(n - 1)).copied().unwrap_or(0.0));
        max.push(lat.last().copied().unwrap_or(0.0));
        stop(child);
        // The same config again: nothing to rebuild (the baseline).
        let start = Instant::now();
        let child = serve(&cfg, &log);
        plain.push(first_answer(&client, &url, &sim, start).await);
        stop(child);
        println!(
            "round {round}: first 200 after {:.3} s with a rebuild, {:.3} s without; rebuild done after {:.1} s; webhooks during it p99 {:.1} ms, max {:.1} ms ({} sent)",
            changed[round],
            plain[round],
            total[round],
            p99[round],
            max[round],
            lat.len()
        );
    }
    // kill -9 in the middle of a rebuild, then a restart finishes it.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    std::fs::write(&cfg, config(&db, &sim, port, "budget_killed")).expect("cfg");
    let start = Instant::now();
    let mut child = serve(&cfg, &log);
    first_answer(&client, &url, &sim, start).await;
    let half = docs / 2;
    while rebuilding(&db).is_some_and(|s| s.done < half) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = rebuilding(&db);
    let _ = child.kill();
    let _ = child.wait();
    let start = Instant::now();
    let child = serve(&cfg, &log);
    let again = first_answer(&client, &url, &sim, start).await;
    while rebuilding(&db).is_some() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finish = start.elapsed().as_secs_f64();
    stop(child);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "kill -9 at {:?} rows done; after the restart the first 200 came after {again:.3} s and the rebuild finished after {finish:.1} s",
        at.map(|s| s.done)
    );
    println!();
    println!(
        "| {docs} jobs, {} history rows | first 200 after exec (s) | rebuild done after (s) | webhook p99 during (ms) | max (ms) |",
        docs * revisions as u64
    );
    println!("|---|---|---|---|---|");
    println!(
        "| `[reporting]` changed | {} | {} | {} | {} |",
        cell(&changed, 3),
        cell(&total, 1),
        cell(&p99, 1),
        cell(&max, 1)
    );
    println!("| nothing to rebuild | {} | — | — | — |", cell(&plain, 3));
    println!(
        "serves logged: {}; rebuilds finished: {}",
        log_text.matches("skillsync serving").count(),
        log_text.matches("report rebuild finished").count()
    );
    token.cancel();
}
