//! Intake benchmark, in-process diagnostics (issue "durable webhook inbox").
//!
//! The headline intake figures come from `benches/intake.rs` (an external
//! load generator, wrk); this in-process version is kept as a diagnostic:
//! its own client shares the process and the cores with the server, which
//! limits the ceiling it can measure.
//!
//! Measures how many webhook events per second the real daemon
//! (`skillsync::run`, fetch workers included) acknowledges, and the p50/p99
//! time to the acknowledgement, at 16 and 64 concurrent senders, side by side
//! with two baselines started the same way in the same round:
//!
//! - **ceiling**: the same accept loop (`skillsync::server::serve`) serving a
//!   warp filter that reads the body and answers 200 JSON without touching a
//!   database;
//! - **one commit per event**: the daemon with `[database] group_commit =
//!   false`, so every write commits (and fsyncs) alone.
//!
//! The durable configuration is the default: group commit, WAL,
//! `synchronous=FULL`; a 200 means the event is on disk. Every payload
//! names a distinct document that exists in an in-process simulator, which
//! is also the daemon's `api_base`, so the fetch workers mirror each
//! document while the intake runs (one GET and one upsert per event). The
//! simulator answers a GET in 50 ms, like a real API (the pipeline
//! benchmark's figure). Each trial gets a fresh database in a temp dir
//! (`/tmp`, the same disk as the project), a fresh daemon and simulator, and
//! a short warm-up; rounds interleave the servers so that noise from other
//! processes hits all of them alike, and ratios are taken within a round.
//!
//! Two diagnostic rows bracket the fetch workers' share of the two cores:
//! **durable, 0 ms upstream** (the simulator answers at once, so mirroring
//! runs flat out in the same process: the simulator's own serving cost,
//! which a real upstream bears on its side, lands on our cores) and
//! **durable, fetches stalled** (the upstream answers nothing for two
//! minutes, so the fetch workers sit on their first eight leases and the
//! inbox runs alone).
//!
//! A second table offers a fixed 2,000 events/s (64 senders pacing
//! themselves) and reports the acknowledgement latency quantiles for the
//! durable daemon and for the ceiling (the load generator's own floor).
//! Each round starts with a 50 × (append 4 KiB + `fdatasync`) probe of the
//! temp dir's disk, printed as context: on a shared VM it moves by 10×.
//!
//! Reproduce: `cargo bench --bench intake_inprocess`
//! (knobs: `INTAKE_EVENTS` events per trial, default 10000; `INTAKE_RUNS`
//! rounds, default 5; `INTAKE_RATE_EVENTS` events in the fixed-rate trial,
//! default 10000).

mod common;
use common::{SECRET, cell, creds, daemon_toml, env_usize, fsync_probe_ms, summary};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skillsync::config::Config;
use skillsync::model::DocType;
use skillsync::server::{Limits, serve};
use skillsync::simulator::{Faults, SendReport, Simulator, send_webhooks};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warp::Filter;

const WARMUP_EVENTS: usize = 500;
const FIXED_RATE: f64 = 2000.0;
const FIXED_RATE_SENDERS: usize = 64;
const SENDERS: [usize; 2] = [16, 64];

/// The upstream's answer time in the durable and one-commit trials: the
/// pipeline benchmark's figure, a typical SaaS API round trip.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Ceiling,
    /// The daemon as deployed: group commit, fetch workers mirroring every
    /// event from an upstream that answers in `UPSTREAM_LATENCY`.
    Durable,
    OneCommit,
    /// Diagnostic: durable, with an upstream that answers at once, so the
    /// fetch workers (and the in-process simulator serving them) mirror as
    /// fast as the two cores allow, competing with intake.
    DurableInstantUpstream,
    /// Diagnostic: durable, but every upstream GET stalls, so the fetch
    /// workers sit on their first leases and the inbox runs alone.
    DurableFetchStalled,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Ceiling => "ceiling (200, no database)",
            Server::Durable => "durable (group commit)",
            Server::OneCommit => "one commit per event",
            Server::DurableInstantUpstream => "durable, 0 ms upstream (diagnostic)",
            Server::DurableFetchStalled => "durable, fetches stalled (diagnostic)",
        }
    }

    /// How long the simulator takes to answer a GET in this trial.
    fn upstream_latency(self) -> Duration {
        match self {
            Server::Ceiling | Server::DurableInstantUpstream => Duration::ZERO,
            Server::Durable | Server::OneCommit => UPSTREAM_LATENCY,
            // Longer than the whole trial; fetches time out after 5 s and back off.
            Server::DurableFetchStalled => Duration::from_secs(120),
        }
    }
}

/// One trial's outcome.
#[derive(Clone, Debug)]
struct Sample {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    acked: usize,
    sent: usize,
    other: String,
}

impl Sample {
    fn from_report(r: &SendReport, sent: usize) -> Sample {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut statuses: Vec<_> = r.statuses.iter().filter(|(k, _)| **k != 200).collect();
        statuses.sort();
        Sample {
            rate: r.acked.len() as f64 / r.elapsed.as_secs_f64(),
            p50_ms: ms(r.latency_quantile(0.5)),
            p99_ms: ms(r.latency_quantile(0.99)),
            p999_ms: ms(r.latency_quantile(0.999)),
            max_ms: ms(r.latency_quantile(1.0)),
            acked: r.acked.len(),
            sent,
            other: if statuses.is_empty() {
                String::new()
            } else {
                format!("{statuses:?}")
            },
        }
    }
}

fn config_toml(db: &Path, sim_base: &str, group_commit: bool) -> String {
    daemon_toml(
        db,
        sim_base,
        "",
        &format!("group_commit = {group_commit}"),
        "[fetch]\nconcurrency = 8\ntimeout_secs = 5",
    )
}

/// A server under test and everything that must live as long as it does.
struct Running {
    url: String,
    token: CancellationToken,
    sim_token: CancellationToken,
    handle: JoinHandle<()>,
    sim: Simulator,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("server stops within a minute")
            .expect("server task");
        self.sim_token.cancel();
    }
}

async fn start(server: Server) -> Running {
    let sim_token = CancellationToken::new();
    let sim = Simulator::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        creds(),
        sim_token.clone(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let (handle, dir) = match server {
        Server::Ceiling => {
            let next = Arc::new(AtomicI64::new(0));
            let filter = warp::any()
                .and(warp::body::bytes())
                .map(move |_b: bytes::Bytes| {
                    let id = next.fetch_add(1, Ordering::Relaxed) + 1;
                    warp::reply::json(&json!({"status": "accepted", "event_id": id}))
                });
            let t = token.clone();
            let h =
                tokio::spawn(async move { serve(listener, filter, Limits::default(), t).await });
            (h, None)
        }
        Server::Durable
        | Server::DurableInstantUpstream
        | Server::DurableFetchStalled
        | Server::OneCommit => {
            let dir = tempfile::tempdir().unwrap();
            let toml = config_toml(
                &dir.path().join("intake.db"),
                &sim.base_url(),
                server != Server::OneCommit,
            );
            let config = Config::from_toml(&toml, None).unwrap();
            let t = token.clone();
            let h = tokio::spawn(async move {
                skillsync::run(config, listener, t).await.unwrap();
            });
            (h, Some(dir))
        }
    };
    let base = format!("http://{addr}");
    if server != Server::Ceiling {
        wait_healthy(&base).await;
    }
    if !server.upstream_latency().is_zero() {
        sim.set_faults(Faults {
            latency: server.upstream_latency(),
            ..Faults::default()
        });
    }
    Running {
        url: format!("{base}/skillsevent"),
        token,
        sim_token,
        handle,
        sim,
        _dir: dir,
    }
}

async fn wait_healthy(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "daemon not healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payloads(sim: &Simulator, n: usize) -> Vec<Value> {
    sim.seed(DocType::Job, n)
        .iter()
        .map(|id| sim.webhook_payload(DocType::Job, id, "created"))
        .collect()
}

/// One trial: fresh server, warm-up, then `events` events from `senders`
/// senders, as fast as answered or at `rate` per second.
async fn trial(server: Server, events: usize, senders: usize, rate: Option<f64>) -> Sample {
    let run = start(server).await;
    let warm = payloads(&run.sim, WARMUP_EVENTS);
    send_webhooks(&run.url, SECRET, warm, senders, None).await;
    let load = payloads(&run.sim, events);
    let report = send_webhooks(&run.url, SECRET, load, senders, rate).await;
    run.stop().await;
    let s = Sample::from_report(&report, events);
    eprintln!(
        "  {:<27} senders {:>2} {:>9}: {:>8.0} ev/s  p50 {:>7.2} ms  p99 {:>7.2} ms  acked {}/{} {}",
        server.label(),
        senders,
        rate.map_or("max rate".to_string(), |r| format!("{r:.0}/s")),
        s.rate,
        s.p50_ms,
        s.p99_ms,
        s.acked,
        s.sent,
        s.other
    );
    s
}

fn main() {
    let events = env_usize("INTAKE_EVENTS", 10_000);
    let runs = env_usize("INTAKE_RUNS", 5).max(1);
    let rate_events = env_usize("INTAKE_RATE_EVENTS", 10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    skillsync::upstream::install_crypto();
    let servers = [
        Server::Ceiling,
        Server::Durable,
        Server::OneCommit,
        Server::DurableInstantUpstream,
        Server::DurableFetchStalled,
    ];
    let index = |s: Server| servers.iter().position(|x| *x == s).unwrap();
    // results[senders index][server index] = samples over rounds
    let mut results: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); servers.len()]; SENDERS.len()];
    let fixed_servers = [Server::Ceiling, Server::Durable];
    let mut fixed: Vec<Vec<Sample>> = vec![Vec::new(); fixed_servers.len()];
    let mut fsync_ms = Vec::new();
    let probe_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    rt.block_on(async {
        for round in 0..runs {
            let probe = fsync_probe_ms(probe_dir.path());
            fsync_ms.push(probe);
            eprintln!(
                "round {}/{runs} (4 KiB append + fdatasync: median {probe:.2} ms)",
                round + 1
            );
            for (si, &senders) in SENDERS.iter().enumerate() {
                for (vi, &server) in servers.iter().enumerate() {
                    let s = trial(server, events, senders, None).await;
                    results[si][vi].push(s);
                }
            }
            for (vi, &server) in fixed_servers.iter().enumerate() {
                let s = trial(server, rate_events, FIXED_RATE_SENDERS, Some(FIXED_RATE)).await;
                fixed[vi].push(s);
            }
        }
    });

    // Per round: a ÷ b of the accepted rates, for one sender count.
    let ratios = |si: usize, a: Server, b: Server| -> Vec<f64> {
        results[si][index(a)]
            .iter()
            .zip(&results[si][index(b)])
            .map(|(x, y)| x.rate / y.rate)
            .collect()
    };
    println!();
    println!(
        "intake: {events} events per trial (one per distinct document, fetch workers running, upstream {} ms unless noted), \
         {runs} rounds, median [min–max] over rounds; disk fsync probe {} ms; total {:.0} s",
        UPSTREAM_LATENCY.as_millis(),
        cell(&fsync_ms, 2),
        started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| senders | server | accepted events/s | p50 ack ms | p99 ack ms | ÷ ceiling (same round) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for (si, &senders) in SENDERS.iter().enumerate() {
        for (vi, &server) in servers.iter().enumerate() {
            let samples = &results[si][vi];
            let col =
                |f: fn(&Sample) -> f64, p| cell(&samples.iter().map(f).collect::<Vec<_>>(), p);
            let vs_ceiling = if server == Server::Ceiling {
                "1".to_string()
            } else {
                cell(&ratios(si, server, Server::Ceiling), 2)
            };
            println!(
                "| {senders} | {} | {} | {} | {} | {vs_ceiling} |",
                server.label(),
                col(|s| s.rate, 0),
                col(|s| s.p50_ms, 2),
                col(|s| s.p99_ms, 2),
            );
        }
    }
    println!();
    println!(
        "| fixed offered rate | server | achieved events/s | p50 ack ms | p99 ack ms | p99.9 ack ms | max ack ms |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (vi, &server) in fixed_servers.iter().enumerate() {
        let s = &fixed[vi];
        let col = |f: fn(&Sample) -> f64, p| cell(&s.iter().map(f).collect::<Vec<_>>(), p);
        println!(
            "| {FIXED_RATE:.0}/s × {rate_events} events, {FIXED_RATE_SENDERS} senders | {} | {} | {} | {} | {} | {} |",
            server.label(),
            col(|s| s.rate, 0),
            col(|s| s.p50_ms, 2),
            col(|s| s.p99_ms, 2),
            col(|s| s.p999_ms, 2),
            col(|s| s.max_ms, 2)
        );
    }
    println!();
    for (si, &senders) in SENDERS.iter().enumerate() {
        let c = summary(&ratios(si, Server::Durable, Server::Ceiling)).0;
        let o = ratios(si, Server::Durable, Server::OneCommit);
        let stalled = summary(&ratios(si, Server::DurableFetchStalled, Server::Ceiling)).0;
        let instant = summary(&ratios(si, Server::DurableInstantUpstream, Server::Ceiling)).0;
        println!(
            "target @{senders} senders: durable ≥ 50% of ceiling: {:.0}% → {} (diagnostics: 0 ms upstream {:.0}%, inbox alone {:.0}%); \
             durable ≥ 10× one-commit-per-event: {} → {}",
            c * 100.0,
            if c >= 0.5 { "met" } else { "MISSED" },
            instant * 100.0,
            stalled * 100.0,
            cell(&o, 1),
            if summary(&o).0 >= 10.0 {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    let durable_fixed = fixed_servers
        .iter()
        .position(|s| *s == Server::Durable)
        .unwrap();
    let p99: Vec<f64> = fixed[durable_fixed].iter().map(|s| s.p99_ms).collect();
    println!(
        "target: p99 ≤ 10 ms at {FIXED_RATE:.0} events/s: {} ms → {}",
        cell(&p99, 2),
        if summary(&p99).0 <= 10.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    let failed: usize = results
        .iter()
        .flatten()
        .flatten()
        .chain(fixed.iter().flatten())
        .map(|s| s.sent - s.acked)
        .sum();
    if failed > 0 {
        println!(
            "warning: {failed} events were not acknowledged with 200 (see the per-trial lines above)"
        );
    }
}
