//! Sending webhooks as Skills Workflow would: many payloads to one URL with
//! a given number of concurrent senders and an optional overall rate,
//! counting answers and timing each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What sending a batch of webhooks produced.
#[derive(Debug, Clone, Default)]
pub struct SendReport {
    /// Event ids from 200 answers.
    pub acked: Vec<i64>,
    /// Answers by status (0: no answer).
    pub statuses: HashMap<u16, u64>,
    /// Time to each answer.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl SendReport {
    /// The q-quantile of latencies (q in 0..=1).
    pub fn latency_quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i.min(v.len() - 1)]
    }
}

/// Sends `payloads` as webhooks to `url` with `concurrency` senders, at most
/// `rate` per second overall when given. Each sender keeps one connection alive.
pub async fn send_webhooks(
    url: &str,
    secret: &str,
    payloads: Vec<Value>,
    concurrency: usize,
    rate: Option<f64>,
) -> SendReport {
    crate::upstream::install_crypto();
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(_) => return SendReport::default(),
    };
    let batch = WebhookBatch {
        url,
        secret,
        payloads,
        concurrency,
        rate,
    };
    send_webhooks_with(client, batch).await
}

/// What [`send_webhooks_with`] sends: `payloads` to `url` with `secret`,
/// from `concurrency` senders, at most `rate` per second overall when given.
#[derive(Debug, Clone)]
pub struct WebhookBatch<'a> {
    pub url: &'a str,
    pub secret: &'a str,
    pub payloads: Vec<Value>,
    pub concurrency: usize,
    pub rate: Option<f64>,
}

/// [`send_webhooks`] with a client of the caller's (e.g. one that trusts a
/// test certificate for HTTPS).
pub async fn send_webhooks_with(client: reqwest::Client, batch: WebhookBatch<'_>) -> SendReport {
    let WebhookBatch {
        url,
        secret,
        payloads,
        concurrency,
        rate,
    } = batch;
    let bodies: Vec<bytes::Bytes> = payloads
        .iter()
        .map(|p| bytes::Bytes::from(p.to_string()))
        .collect();
    let queue = Arc::new(Mutex::new(
        bodies
            .into_iter()
            .enumerate()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>(),
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let queue = queue.clone();
        let url = url.to_string();
        let secret = secret.to_string();
        tasks.push(tokio::spawn(async move {
            let mut report = SendReport::default();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((i, body)) = next else { break };
                if let Some(r) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / r);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t = Instant::now();
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-webhook-secret", &secret)
                    .body(body)
                    .send()
                    .await;
                match resp {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        report.latencies.push(t.elapsed());
                        *report.statuses.entry(status).or_default() += 1;
                        if status == 200 {
                            if let Some(id) = v["event_id"].as_i64() {
                                report.acked.push(id);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "webhook not answered");
                        *report.statuses.entry(0).or_default() += 1;
                    }
                }
            }
            report
        }));
    }
    let mut total = SendReport::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.acked.extend(r.acked);
            total.latencies.extend(r.latencies);
            for (k, v) in r.statuses {
                *total.statuses.entry(k).or_default() += v;
            }
        }
    }
    total.elapsed = start.elapsed();
    total
}
