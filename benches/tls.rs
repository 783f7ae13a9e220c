//! TLS intake benchmark (issue "HTTPS for the webhook"): accepted events/s
//! and p50/p99 acknowledgement latency of the real daemon over built-in TLS
//! beside the same daemon over plain HTTP, in the same round, with keep-alive
//! connections (one client shared by the senders, as the sender would keep
//! its connections open). Both are durable (group commit, `synchronous=FULL`)
//! with the fetch workers running against an in-process simulator. Rounds
//! alternate the two, so noise hits both alike; the ratio is taken per round.
//!
//! Reproduce: `cargo bench --bench tls`
//! (knobs: `TLS_EVENTS` events per trial, default 5000; `TLS_RUNS` rounds, default 5).

mod common;
use common::{SECRET, daemon_toml, env_usize, start_sim};
use std::time::Duration;

use serde_json::Value;
use skillsync::config::Config;
use skillsync::model::DocType;
use skillsync::simulator::{SendReport, WebhookBatch, send_webhooks_with};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

struct Trial {
    events_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn trial(tls: bool, senders: usize, events: usize, cert: &(String, String)) -> Trial {
    let dir = tempfile::tempdir().unwrap();
    let token = CancellationToken::new();
    let sim = start_sim(&token).await;
    let base = sim.base_url();
    std::fs::write(dir.path().join("cert.pem"), &cert.0).unwrap();
    std::fs::write(dir.path().join("key.pem"), &cert.1).unwrap();
    let tls_lines = if tls {
        format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        )
    } else {
        String::new()
    };
    let toml = daemon_toml(&dir.path().join("b.db"), &base, &tls_lines, "", "");
    let config = Config::from_toml(&toml, None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let daemon = tokio::spawn(skillsync::run(config, listener, token.clone()));
    let client = if tls {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(cert.0.as_bytes()).unwrap()])
            .pool_max_idle_per_host(senders)
            .build()
            .unwrap()
    } else {
        reqwest::Client::builder()
            .pool_max_idle_per_host(senders)
            .build()
            .unwrap()
    };
    let url = if tls {
        format!("https://localhost:{port}/skillsevent")
    } else {
        format!("http://127.0.0.1:{port}/skillsevent")
    };
    let payloads = |n: usize| -> Vec<Value> {
        sim.seed(DocType::Job, n)
            .iter()
            .map(|id| sim.webhook_payload(DocType::Job, id, "created"))
            .collect()
    };
    // Warm-up opens the keep-alive connections (and TLS sessions).
    let batch = |payloads: Vec<Value>| WebhookBatch {
        url: &url,
        secret: SECRET,
        payloads,
        concurrency: senders,
        rate: None,
    };
    let warm = send_webhooks_with(client.clone(), batch(payloads(senders * 4))).await;
    assert_eq!(
        warm.acked.len(),
        senders * 4,
        "warm-up: {:?}",
        warm.statuses
    );
    let r: SendReport = send_webhooks_with(client, batch(payloads(events))).await;
    assert_eq!(r.acked.len(), events, "answers: {:?}", r.statuses);
    token.cancel();
    daemon.await.unwrap().unwrap();
    Trial {
        events_per_sec: events as f64 / r.elapsed.as_secs_f64(),
        p50_ms: r.latency_quantile(0.5).as_secs_f64() * 1000.0,
        p99_ms: r.latency_quantile(0.99).as_secs_f64() * 1000.0,
    }
}

fn median(v: Vec<f64>) -> f64 {
    common::summary(&v).0
}

fn main() {
    skillsync::upstream::install_crypto();
    let events = env_usize("TLS_EVENTS", 5000);
    let runs = env_usize("TLS_RUNS", 5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = (c.cert.pem(), c.signing_key.serialize_pem());
    println!(
        "TLS vs plain HTTP intake: {events} events per trial, {runs} rounds, medians (min..max)"
    );
    println!(
        "{:>8} {:>7} {:>12} {:>9} {:>9} {:>12}",
        "senders", "proto", "events/s", "p50 ms", "p99 ms", "tls/plain"
    );
    for senders in [16usize, 64] {
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        let mut ratio = Vec::new();
        for round in 0..runs {
            // Alternate which goes first.
            let (a, b) = if round % 2 == 0 {
                let p = rt.block_on(trial(false, senders, events, &cert));
                let t = rt.block_on(trial(true, senders, events, &cert));
                (p, t)
            } else {
                let t = rt.block_on(trial(true, senders, events, &cert));
                let p = rt.block_on(trial(false, senders, events, &cert));
                (p, t)
            };
            ratio.push(b.events_per_sec / a.events_per_sec);
            plain.push(a);
            tls.push(b);
            std::thread::sleep(Duration::from_millis(200));
        }
        for (name, set) in [("plain", &plain), ("tls", &tls)] {
            let eps: Vec<f64> = set.iter().map(|t| t.events_per_sec).collect();
            let (lo, hi) = (
                eps.iter().cloned().fold(f64::INFINITY, f64::min),
                eps.iter().cloned().fold(0.0, f64::max),
            );
            println!(
                "{:>8} {:>7} {:>12} {:>9.2} {:>9.2} {:>12}",
                senders,
                name,
                format!("{:.0} ({:.0}..{:.0})", median(eps), lo, hi),
                median(set.iter().map(|t| t.p50_ms).collect()),
                median(set.iter().map(|t| t.p99_ms).collect()),
                if name == "tls" {
                    format!("{:.2}", median(ratio.clone()))
                } else {
                    String::new()
                }
            );
        }
    }
}
