//! A Skills Workflow simulator on loopback, used by `demo`, `simulate`, the
//! tests and the benchmarks. It serves single documents
//! (`GET {job_path}`/`{project_path}`) and the Data Extraction listing
//! (`POST {listing_path}` with skip/take/fields/filters, ordered by
//! ModifiedOn then id), checks the `X-App*` headers, can create, change and
//! delete documents without telling anyone, can send webhooks at a given
//! concurrency and rate, and injects faults: latency, a 5xx fraction, 429
//! bursts with `Retry-After`, a per-tenant requests-per-second limit, hangs, malformed or oversized bodies,
//! connections cut mid-body, every GET answering 404, padded (huge) listing
//! pages, and scripted answers to one document's next GETs (a slow 404,
//! then a 200). It counts the GETs per document.
//!
//! This file owns the [`Simulator`] handle, its HTTP routing and
//! `skillsync simulate`. The parts:
//! - `upstream`: the API stand-in's state: documents, faults, counters, the
//!   credentials gate and single-document GETs.
//! - `listing`: the Data Extraction listing: filters, key ranges, pages.
//! - `control`: the `/_sim/…` HTTP knobs (create, update, delete, faults, stats).
//! - `sender`: sending webhooks at a given concurrency and rate.

mod control;
mod listing;
mod sender;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::model::DocType;
use crate::server::{self, Limits};

pub use sender::{SendReport, WebhookBatch, send_webhooks, send_webhooks_with};
use upstream::State;
pub use upstream::{Faults, ListingHook, Scripted, SimCredentials, SimDoc, SimPaths, SimRequest};

/// A running simulator; cheap to clone. Stops when its token is cancelled.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    creds: Arc<SimCredentials>,
}

impl Simulator {
    /// Starts serving on `listener` until `shutdown`.
    pub fn start(
        listener: TcpListener,
        creds: SimCredentials,
        shutdown: CancellationToken,
    ) -> std::io::Result<Simulator> {
        let addr = listener.local_addr()?;
        let sim = Simulator {
            state: Arc::new(Mutex::new(State::default())),
            addr,
            creds: Arc::new(creds),
        };
        let routes = sim.routes(SimPaths::default());
        let limits = Limits {
            max_connections: 4096,
            drain_deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        tokio::spawn(server::serve(listener, routes, limits, shutdown));
        Ok(sim)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `http://127.0.0.1:PORT` — the api_base and extraction_base to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Simulator {
    fn routes(
        &self,
        paths: SimPaths,
    ) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + use<> {
        let me = self.clone();
        let p = Arc::new(paths);
        warp::path::full()
            .and(warp::method())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |path: warp::path::FullPath,
                      method: warp::http::Method,
                      headers,
                      body: bytes::Bytes| {
                    let me = me.clone();
                    let p = p.clone();
                    async move {
                        let path = path.as_str();
                        if let Some(cmd) = path.strip_prefix("/_sim/") {
                            return me.control(cmd, &body);
                        }
                        if method == warp::http::Method::GET {
                            if let Some(id) = path.strip_prefix(&p.job_prefix) {
                                return me
                                    .get_document(DocType::Job, id.to_string(), headers)
                                    .await;
                            }
                            if let Some(id) = path.strip_prefix(&p.project_prefix) {
                                return me
                                    .get_document(DocType::Project, id.to_string(), headers)
                                    .await;
                            }
                        }
                        if method == warp::http::Method::POST {
                            if let Some(q) = path
                                .strip_prefix(&p.listing_prefix)
                                .and_then(|r| r.strip_suffix(&p.listing_suffix))
                            {
                                let ty = if q == p.jobs_query {
                                    DocType::Job
                                } else if q == p.projects_query {
                                    DocType::Project
                                } else {
                                    return reply(
                                        StatusCode::NOT_FOUND,
                                        json!({"error": "unknown query"}),
                                    );
                                };
                                let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                                    return reply(
                                        StatusCode::BAD_REQUEST,
                                        json!({"error": "body is not JSON"}),
                                    );
                                };
                                return me.listing(ty, headers, body).await;
                            }
                        }
                        reply(StatusCode::NOT_FOUND, json!({"error": "not found"}))
                    }
                },
            )
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    warp::Reply::into_response(warp::reply::with_status(warp::reply::json(&body), status))
}

/// `skillsync simulate` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// X-AppTenant the simulator accepts.
    #[arg(long, default_value = "demo-tenant")]
    pub app_tenant: String,
    /// X-AppId the simulator accepts.
    #[arg(long, default_value = "demo-app")]
    pub app_id: String,
    /// X-AppSecret the simulator accepts.
    #[arg(
        long,
        env = "SKILLSYNC_SIM_APP_SECRET",
        hide_env_values = true,
        default_value = "demo-app-secret"
    )]
    pub app_secret: String,
    /// Jobs to generate at start.
    #[arg(long, default_value_t = 50)]
    pub jobs: usize,
    /// Projects to generate at start.
    #[arg(long, default_value_t = 10)]
    pub projects: usize,
    /// Latency added to every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Fraction of document GETs answered 5xx (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of GETs that hang for --hang-secs first.
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    #[arg(long, default_value_t = 60)]
    pub hang_secs: u64,
    /// Answer the first N requests 429 with Retry-After: --retry-after-secs.
    #[arg(long, default_value_t = 0)]
    pub rate_limit_next: u32,
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Answer 429 (Retry-After: --retry-after-secs) to a request that finds
    /// this many already accepted for its X-AppTenant in the last second.
    #[arg(long)]
    pub rate_limit_per_sec: Option<f64>,
    /// The X-Webhook-Secret to send.
    #[arg(
        long,
        env = "SKILLSYNC_SIM_WEBHOOK_SECRET",
        hide_env_values = true,
        default_value = "demo-webhook-secret"
    )]
    pub webhook_secret: String,
    /// Send a webhook for every generated document to this URL (e.g. http://127.0.0.1:8080/skillsevent).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Concurrent webhook senders.
    #[arg(long, default_value_t = 4)]
    pub webhook_concurrency: usize,
    /// Webhooks per second (default: as fast as answered).
    #[arg(long)]
    pub webhook_rate: Option<f64>,
}

/// Runs `skillsync simulate` until SIGINT/SIGTERM.
pub async fn run_cli(a: SimulateArgs) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    crate::shutdown::cancel_on_signals(token.clone());
    let listener = TcpListener::bind(a.listen).await?;
    let sim = Simulator::start(
        listener,
        SimCredentials {
            app_tenant: a.app_tenant.clone(),
            app_id: a.app_id.clone(),
            app_secret: a.app_secret.clone(),
        },
        token.clone(),
    )?;
    let jobs = sim.seed(DocType::Job, a.jobs);
    let projects = sim.seed(DocType::Project, a.projects);
    sim.set_faults(Faults {
        latency: Duration::from_millis(a.latency_ms),
        error_rate: a.error_rate,
        hang_rate: a.hang_rate,
        hang_for: Duration::from_secs(a.hang_secs),
        rate_limit_next: a.rate_limit_next,
        retry_after_secs: a.retry_after_secs,
        rate_limit_per_sec: a.rate_limit_per_sec,
        ..Faults::default()
    });
    println!(
        "simulator serving on {} with {} jobs and {} projects; api_base = extraction_base = \"{}\", app_tenant = \"{}\", app_id = \"{}\"",
        sim.addr(),
        jobs.len(),
        projects.len(),
        sim.base_url(),
        a.app_tenant,
        a.app_id
    );
    if let Some(url) = &a.webhook_url {
        let payloads = sim.created_payloads(&jobs, &projects);
        let n = payloads.len();
        let r = send_webhooks(
            url,
            &a.webhook_secret,
            payloads,
            a.webhook_concurrency,
            a.webhook_rate,
        )
        .await;
        println!(
            "sent {n} webhooks in {:.2}s: answers {:?}, p50 {:?}, p99 {:?}",
            r.elapsed.as_secs_f64(),
            r.statuses,
            r.latency_quantile(0.5),
            r.latency_quantile(0.99)
        );
    }
    println!("press Ctrl-C to stop");
    token.cancelled().await;
    Ok(())
}
