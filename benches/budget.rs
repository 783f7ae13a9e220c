//! The per-tenant request budget at full size (issue 28's figures): a
//! first reconcile of 600 jobs (listing, then every GET) through
//! `skillsync::cli::reconcile_now` against simulators on loopback, which log
//! when each request arrived and whether they answered 429.
//!
//! Scenarios, each `BUDGET_ROUNDS` times (default 3), medians reported:
//! - `budget20`: `max_requests_per_sec = 20`, a fast simulator: the most
//!   requests in a 1 s window (fixed windows from the first request, after
//!   the first; and any sliding window), and the run's duration (~30 s).
//! - `throttled15`: no budget, a simulator answering 429 (Retry-After 1)
//!   above 15 requests/s: the share of 429s and the duration (the limit's
//!   own pace is 600 / 15 = 40 s).
//! - `two-alone` / `two-together`: 300 jobs on each of two tenants, each
//!   with its own upstream throttling at 15/s: each tenant's fetch phase
//!   (first to last request after its listing), alone and together.
//!
//! Reproduce: `cargo bench --bench budget` (BUDGET_JOBS, BUDGET_ROUNDS and
//! BUDGET_ONLY=budget20|throttled15|two to change the size, the rounds, or
//! run one scenario). Durations are wall time on a shared machine; the
//! window counts and 429 shares are what the simulator saw.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use skillsync::config::Config;
use skillsync::model::{DocType, RunKind};
use skillsync::simulator::{Faults, SimCredentials, SimRequest, Simulator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use common::{cell, env_usize};

const APP_SECRET: &str = "bench-app-secret-0123456789";

async fn sim_for(name: &str, token: &CancellationToken) -> Simulator {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        l,
        SimCredentials {
            app_tenant: format!("{name}-tenant"),
            app_id: "bench-app".into(),
            app_secret: APP_SECRET.into(),
        },
        token.clone(),
    )
    .unwrap()
}

fn tenant_toml(name: &str, sim: &Simulator, extra: &str) -> String {
    let base = sim.base_url();
    format!(
        "[[tenant]]\nname = \"{name}\"\nwebhook_secrets = [\"{name}-webhook-secret\"]\napi_base = \"{base}\"\nextraction_base = \"{base}\"\napp_tenant = \"{name}-tenant\"\napp_id = \"bench-app\"\napp_secret = \"{APP_SECRET}\"\nreconcile_schedule = \"off\"\nfull_sweep_schedule = \"off\"\n{extra}\n"
    )
}

/// The default `[fetch]` (concurrency 8): what a deployment runs.
fn config(dir: &std::path::Path, tenants: &[String]) -> Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\n[database]\npath = \"{}\"\n{}",
        dir.join("skillsync.db").display(),
        tenants.concat()
    );
    Config::from_toml(&toml, None).unwrap()
}

/// Listing and fetches of every configured tenant's jobs; its wall time.
async fn reconcile(config: &Config) -> Duration {
    let t = Instant::now();
    let ok = skillsync::cli::reconcile_now(
        Arc::new(config.clone()),
        None,
        vec![DocType::Job],
        RunKind::Incremental,
        false,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(ok, "reconciliation failed");
    t.elapsed()
}

/// The most requests in a fixed 1 s window after the first (windows from
/// the first request), and in any sliding 1 s window.
fn windows(reqs: &[SimRequest]) -> (usize, usize) {
    let Some(first) = reqs.first().map(|r| r.at) else {
        return (0, 0);
    };
    let mut bins: Vec<usize> = Vec::new();
    for r in reqs {
        let i = r.at.saturating_duration_since(first).as_secs() as usize;
        if bins.len() <= i {
            bins.resize(i + 1, 0);
        }
        bins[i] += 1;
    }
    let fixed = bins.iter().skip(1).copied().max().unwrap_or(0);
    let mut sliding = 0;
    let mut lo = 0;
    for hi in 0..reqs.len() {
        while reqs[hi].at.saturating_duration_since(reqs[lo].at) >= Duration::from_secs(1) {
            lo += 1;
        }
        sliding = sliding.max(hi - lo + 1);
    }
    (fixed, sliding)
}

fn throttled(reqs: &[SimRequest]) -> usize {
    reqs.iter().filter(|r| r.throttled).count()
}

/// From the first request after the listing (its second) to the last.
fn fetch_phase(reqs: &[SimRequest]) -> f64 {
    match (reqs.get(1), reqs.last()) {
        (Some(a), Some(b)) => b.at.saturating_duration_since(a.at).as_secs_f64(),
        _ => 0.0,
    }
}

fn limited() -> Faults {
    Faults {
        rate_limit_per_sec: Some(15.0),
        retry_after_secs: 1,
        ..Faults::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    skillsync::upstream::install_crypto();
    let jobs = env_usize("BUDGET_JOBS", 600);
    let rounds = env_usize("BUDGET_ROUNDS", 3);
    let only = std::env::var("BUDGET_ONLY").unwrap_or_default();
    let run = |s: &str| only.is_empty() || only == s;
    println!("budget bench: {jobs} jobs, {rounds} rounds");

    if run("budget20") {
        let (mut secs, mut fixed, mut sliding, mut total) = (vec![], vec![], vec![], vec![]);
        for round in 1..=rounds {
            let token = CancellationToken::new();
            let sim = sim_for("b20", &token).await;
            sim.seed(DocType::Job, jobs);
            let dir = tempfile::tempdir().unwrap();
            let c = config(
                dir.path(),
                &[tenant_toml("b20", &sim, "max_requests_per_sec = 20")],
            );
            let d = reconcile(&c).await;
            let reqs = sim.requests();
            let (f, s) = windows(&reqs);
            println!(
                "budget20 round {round}: {:.1} s, {} requests, max {f} per fixed 1 s window after the first, {s} per sliding window, {} 429s",
                d.as_secs_f64(),
                reqs.len(),
                throttled(&reqs)
            );
            secs.push(d.as_secs_f64());
            fixed.push(f as f64);
            sliding.push(s as f64);
            total.push(reqs.len() as f64);
            token.cancel();
        }
        println!(
            "| budget 20/s, fast simulator | {} s | {} | {} | {} |",
            cell(&secs, 1),
            cell(&fixed, 0),
            cell(&sliding, 0),
            cell(&total, 0)
        );
    }

    if run("throttled15") {
        let (mut secs, mut share, mut refused, mut total) = (vec![], vec![], vec![], vec![]);
        for round in 1..=rounds {
            let token = CancellationToken::new();
            let sim = sim_for("t15", &token).await;
            sim.seed(DocType::Job, jobs);
            sim.set_faults(limited());
            let dir = tempfile::tempdir().unwrap();
            let c = config(dir.path(), &[tenant_toml("t15", &sim, "")]);
            let d = reconcile(&c).await;
            let reqs = sim.requests();
            let n = throttled(&reqs);
            println!(
                "throttled15 round {round}: {:.1} s, {} requests, {n} answered 429 ({:.1}%)",
                d.as_secs_f64(),
                reqs.len(),
                100.0 * n as f64 / reqs.len() as f64
            );
            secs.push(d.as_secs_f64());
            share.push(100.0 * n as f64 / reqs.len() as f64);
            refused.push(n as f64);
            total.push(reqs.len() as f64);
            token.cancel();
        }
        println!(
            "| no budget, simulator 429 above 15/s | {} s | {} % | {} | {} |",
            cell(&secs, 1),
            cell(&share, 1),
            cell(&refused, 0),
            cell(&total, 0)
        );
    }

    if run("two") {
        let half = jobs / 2;
        let (mut alone, mut together, mut share) = (vec![], vec![], vec![]);
        for round in 1..=rounds {
            // Alone: one tenant, its own throttling upstream.
            let token = CancellationToken::new();
            let sim = sim_for("two-a", &token).await;
            sim.seed(DocType::Job, half);
            sim.set_faults(limited());
            let dir = tempfile::tempdir().unwrap();
            reconcile(&config(dir.path(), &[tenant_toml("two-a", &sim, "")])).await;
            let a = fetch_phase(&sim.requests());
            alone.push(a);
            token.cancel();
            // Together: two tenants, each with its own throttling upstream.
            let token = CancellationToken::new();
            let (one, two) = (
                sim_for("two-b", &token).await,
                sim_for("two-c", &token).await,
            );
            for s in [&one, &two] {
                s.seed(DocType::Job, half);
                s.set_faults(limited());
            }
            let dir = tempfile::tempdir().unwrap();
            let c = config(
                dir.path(),
                &[
                    tenant_toml("two-b", &one, ""),
                    tenant_toml("two-c", &two, ""),
                ],
            );
            reconcile(&c).await;
            let mut line = format!("two round {round}: alone {a:.1} s; together");
            for s in [&one, &two] {
                let reqs = s.requests();
                let t = fetch_phase(&reqs);
                together.push(t);
                share.push(100.0 * throttled(&reqs) as f64 / reqs.len() as f64);
                line.push_str(&format!(
                    " {t:.1} s ({} of {} 429)",
                    throttled(&reqs),
                    reqs.len()
                ));
            }
            println!("{line}");
            token.cancel();
        }
        println!(
            "| two tenants, {half} jobs each, each upstream 429 above 15/s | alone {} s | together {} s (both tenants) | 429s {} % |",
            cell(&alone, 1),
            cell(&together, 1),
            cell(&share, 1)
        );
    }
}
