//! The HTTP edge: warp routes for the two listeners, and nothing the rest of
//! the crate depends on. HTTP types stop here; the store sees a
//! [`NewEvent`](crate::store::NewEvent), the payload checks are pure
//! ([`crate::payload`]).
//!
//! - The public listener ([`routes`]): `POST {webhook_path}[/{tenant}]` and
//!   `GET /healthz` (the verdict only, answered from [`Health`], no write
//!   per request). Nothing else: `/metrics` names tenants.
//! - The metrics listener ([`metrics_routes`], `server.metrics_listen`):
//!   `/metrics` and a detailed `/healthz`.
//!
//! Submodules: [`auth`] (tenant by secret digest, client address),
//! `webhook` (the handler), [`error`] (every refusal → status and body).

pub mod auth;
pub mod error;
mod webhook;

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

use serde_json::json;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use self::auth::{TenantAuth, client_ip};
use self::error::WebhookError;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::server::ClientAddr;
use crate::store::Store;
use crate::wake::Wake;

/// What a reload replaces: the config, the tenants it authenticates and the
/// wake-ups of their fetch workers. A request takes one snapshot when it
/// starts and finishes under it, whatever a reload does meanwhile.
struct Live {
    config: Arc<Config>,
    /// Tenants in config order; matched by secret digest in constant time.
    tenants: Vec<TenantAuth>,
    /// Wakes a tenant's fetch workers when an event is queued.
    wake: Wake,
}

/// Everything the public listener's handlers share.
#[derive(Clone)]
pub struct WebhookState {
    store: Store,
    /// The current [`Live`]; swapped whole by [`WebhookState::reload`].
    live: Arc<RwLock<Arc<Live>>>,
    metrics: Metrics,
    /// Answers `/healthz`; every commit or refused commit of an event is evidence for it.
    health: Health,
}

/// What the public listener's handlers are built from, by name.
pub struct WebhookParts {
    /// The config requests start under (replaced by [`WebhookState::reload`]).
    pub config: Arc<Config>,
    pub store: Store,
    /// Wakes a tenant's fetch workers when an event is queued.
    pub wake: Wake,
    pub metrics: Metrics,
    /// Answers `/healthz`; fed by every commit or refused commit of an event.
    pub health: Health,
}

impl WebhookState {
    pub fn new(parts: WebhookParts) -> Self {
        let WebhookParts {
            config,
            store,
            wake,
            metrics,
            health,
        } = parts;
        WebhookState {
            store,
            live: Arc::new(RwLock::new(Arc::new(Live::new(config, wake)))),
            metrics,
            health,
        }
    }

    /// From the next request on, tenants, secrets and the other request-time
    /// settings come from `config`; requests already running keep theirs.
    /// (`server.webhook_path` and the listeners are fixed at start.)
    pub fn reload(&self, config: Arc<Config>, wake: Wake) {
        let next = Arc::new(Live::new(config, wake));
        match self.live.write() {
            Ok(mut g) => *g = next,
            // A writer never panics while holding it; recover the value anyway.
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// The snapshot a request works with.
    fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Live {
    fn new(config: Arc<Config>, wake: Wake) -> Live {
        Live {
            tenants: TenantAuth::all(&config),
            config,
            wake,
        }
    }
}

/// All routes of the public listener: the webhook and `/healthz`. Any
/// other path answers 404 (`/metrics` included), another method on
/// `/healthz` 405.
pub fn routes(
    state: WebhookState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_state = {
        let s = state.clone();
        warp::any().map(move || s.clone())
    };
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_state.clone())
        .map(|s: WebhookState| {
            // Only the verdict here: the detail (and its error text) is on
            // the metrics listener.
            let (status, body) = if s.health.report().healthy {
                (StatusCode::OK, json!({"status": "ok"}))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "unavailable", "error": "database not writable"}),
                )
            };
            warp::reply::with_status(warp::reply::json(&body), status).into_response()
        });
    let base = state.live().config.server.webhook_path.clone();
    let webhook_path = warp::path::full().and_then(move |path: warp::path::FullPath| {
        let tenant = webhook::tenant_in_path(&base, path.as_str()).map(|t| t.map(str::to_owned));
        async move { tenant.ok_or_else(warp::reject::not_found) }
    });
    let webhook = webhook_path
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::ext::optional::<ClientAddr>())
        .and(with_state)
        .then(
            |path_tenant: Option<String>,
             method: Method,
             headers: HeaderMap,
             body,
             peer: Option<ClientAddr>,
             s: WebhookState| async move {
                // One snapshot for the whole request: a reload meanwhile does
                // not change the tenant, secret or limits it is judged by.
                let live = s.live();
                let ip = client_ip(&live.config, peer, &headers);
                let body = Box::pin(body);
                match webhook::handle_webhook(&s, &live, method, path_tenant, &headers, body)
                    .await
                {
                    Ok((tenant, id, ignored)) => {
                        s.health.ok();
                        let status = if ignored { "ignored" } else { "accepted" };
                        s.metrics.webhook(&tenant, status);
                        tracing::debug!(tenant = %tenant, event_id = id, status, client = ?ip, "event recorded");
                        // Formatted directly (the same bytes serde_json wrote
                        // from a map): no map or value tree per request.
                        warp::reply::with_header(
                            format!(r#"{{"event_id":{id},"status":"{status}"}}"#),
                            "content-type",
                            "application/json",
                        )
                        .into_response()
                    }
                    Err((tenant, e)) => {
                        webhook::log_refusal(&s, tenant.as_deref(), &e, ip);
                        e.into_response()
                    }
                }
            },
        );
    healthz
        .or(webhook)
        .unify()
        .recover(move |rej: warp::Rejection| {
            let e = error::rejection(&rej);
            webhook::log_refusal(&state, None, &e, None);
            async move { Ok::<_, Infallible>(e.into_response()) }
        })
        .unify()
}

/// The routes of the metrics listener (`server.metrics_listen`): `/metrics`
/// (each scrape reads the database for the gauges) and `/healthz` with the
/// detail the public one leaves out. Anything else answers 404.
pub fn metrics_routes(
    store: Store,
    metrics: Metrics,
    health: Health,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let scrape = warp::path!("metrics").and(warp::get()).then(move || {
        let store = store.clone();
        let metrics = metrics.clone();
        async move {
            let text = metrics.render(&store).await;
            warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
                .into_response()
        }
    });
    let healthz = warp::path!("healthz").and(warp::get()).map(move || {
        let r = health.report();
        let status = if r.healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        warp::reply::with_status(warp::reply::json(&r), status).into_response()
    });
    scrape
        .or(healthz)
        .unify()
        .recover(|_rej: warp::Rejection| async move {
            Ok::<_, Infallible>(WebhookError::NotFound.into_response())
        })
        .unify()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::TestResult;

    #[tokio::test]
    async fn routes_answer_wrong_paths_and_methods_precisely() -> TestResult {
        let dir = tempfile::tempdir()?;
        let config = Arc::new(Config::from_toml(
            "[[tenant]]\nname = \"acme\"\nwebhook_secrets = [\"secret-acme\"]\napi_base = \"https://api.example.com\"\nextraction_base = \"https://x.example.com\"\napp_tenant = \"t\"\napp_id = \"i\"\napp_secret = \"s\"\n",
            None,
        )?);
        let store = Store::open(&dir.path().join("r.db"), Duration::from_secs(1))?;
        let health = Health::new(Duration::from_secs(5), Duration::from_secs(1));
        let wake = crate::wake::for_tenants(&config);
        let filter = routes(WebhookState::new(WebhookParts {
            config,
            store,
            wake,
            metrics: Metrics::install(),
            health,
        }));
        for (method, path, status, error) in [
            ("GET", "/elsewhere", 404, "not found"),
            ("GET", "/metrics", 404, "not found"),
            ("POST", "/skillseventx", 404, "not found"),
            ("POST", "/skillsevent/a/b", 404, "not found"),
            ("POST", "/healthz", 405, "method not allowed"),
            (
                "GET",
                "/skillsevent",
                405,
                "method not allowed: POST the event",
            ),
            ("POST", "/skillsevent/acme", 401, "unauthorized"),
        ] {
            let r = warp::test::request()
                .method(method)
                .path(path)
                .reply(&filter)
                .await;
            let body: serde_json::Value = serde_json::from_slice(r.body())?;
            assert_eq!(
                (r.status().as_u16(), body["error"].as_str()),
                (status, Some(error)),
                "{method} {path}"
            );
        }
        Ok(())
    }
}
