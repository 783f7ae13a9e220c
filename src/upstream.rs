//! The Skills Workflow API client: the `X-App*` headers, GET of one document
//! from the tenant's `api_base`, and the Data Extraction listing on its
//! `extraction_base`. Classifies every answer so the fetcher can decide
//! (store, gone, retry, wait). Knows nothing of the database.
//!
//! Every request first takes a permit from the tenant's request budget
//! ([`crate::budget`]) and reports its answer back (a 429 lowers the rate).
//!
//! Requests go only to the configured bases (never to a URL from a payload)
//! and redirects are not followed, so credentials cannot be led elsewhere.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Client, StatusCode, Url};
use serde_json::{Map, Value, json};

use crate::budget::{Answer, Budgets, Priority};
use crate::config::{Config, TenantConfig};
use crate::model::{DocType, ErrorClass, get_ci, normalize_ts};

/// A failed call, classified.
#[derive(Debug, Clone)]
pub struct CallError {
    pub class: ErrorClass,
    pub message: String,
    /// From a `Retry-After` header, when upstream sent one.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.message)
    }
}

/// The answer to a single-document GET.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// 2xx with a JSON object.
    Document(Map<String, Value>),
    /// 404 or 410: gone upstream.
    Gone(u16),
    Failed(CallError),
}

/// One row of a listing page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDoc {
    /// Lower-case hyphenated UUID when it parses, else as listed.
    pub id: String,
    /// Normalised to table format.
    pub modified_on: Option<String>,
    /// The id and ModifiedOn exactly as listed: a keyset cursor sends these
    /// back, so it compares the way the server does, whatever its format.
    pub raw_id: String,
    pub raw_modified_on: Option<String>,
}

/// The listing column a filter term is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListField {
    /// The configured `modified_field` (ModifiedOn).
    Modified,
    /// The type's id field (JobId, ProjectId).
    Id,
}

/// One term of a listing filter; all terms must hold. `value: None` is a
/// JSON null (`["ModifiedOn", "=", null]` is "has no ModifiedOn").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub field: ListField,
    pub op: &'static str,
    pub value: Option<String>,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub rows: Vec<ListedDoc>,
    pub total_count: Option<u64>,
}

/// The longest a request waits for a permit from the tenant's budget. A
/// fetch holds a lease on its document meanwhile (`timeout_secs + 30` s):
/// past this it gives the document back (as if throttled) rather than
/// outwait the lease, with 10 s to spare for settling the fetch.
pub const MAX_PERMIT_WAIT: Duration = Duration::from_secs(20);

/// The client; cheap to clone (clones share the request budgets).
#[derive(Clone)]
pub struct Upstream {
    client: Client,
    max_document_bytes: usize,
    /// Every tenant's request budget in this process: every clone draws
    /// from the same ones, so the fetcher and the reconciler share them.
    budgets: Budgets,
}

/// Installs the ring crypto provider for rustls once per process (reqwest is
/// built without a provider of its own to keep the build small).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn parse_retry_after(v: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let s = v?.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = DateTime::parse_from_rfc2822(s).ok()?.with_timezone(&Utc);
    let secs = (when - Utc::now()).num_seconds().max(0) as u64;
    Some(Duration::from_secs(secs))
}

fn classify_send_error(e: &reqwest::Error) -> CallError {
    let class = if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Network
    };
    CallError {
        class,
        message: e.to_string(),
        retry_after: None,
    }
}

fn status_error(status: StatusCode, retry_after: Option<Duration>) -> CallError {
    let class = match status.as_u16() {
        401 | 403 => ErrorClass::Auth,
        429 => ErrorClass::RateLimited,
        500..=599 => ErrorClass::Server,
        _ => ErrorClass::Client,
    };
    CallError {
        class,
        message: format!("upstream answered {status}"),
        retry_after,
    }
}

impl Upstream {
    pub fn new(config: &Config) -> anyhow::Result<Upstream> {
        Upstream::with_budgets(config, Budgets::new(crate::metrics::Metrics::install()))
    }

    /// [`Upstream::new`] drawing from `budgets`: a reload's new client keeps
    /// the request budgets (and what they learned from 429s) of the old one,
    /// and while the old one drains both draw from the same buckets.
    pub fn with_budgets(config: &Config, budgets: Budgets) -> anyhow::Result<Upstream> {
        install_crypto();
        let timeout = Duration::from_secs(config.fetch.timeout_secs);
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("skillsync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            client,
            max_document_bytes: config.fetch.max_document_bytes,
            budgets,
        })
    }

    /// The request budgets this client draws from.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Sends `req` once the tenant's budget allows, and tells the budget
    /// how it ended. Waiting longer than [`MAX_PERMIT_WAIT`] is answered as
    /// rate limited without sending, with the wait as its `Retry-After`.
    async fn send(
        &self,
        tenant: &TenantConfig,
        priority: Priority,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        let permit = self
            .budgets
            .acquire(
                &tenant.name,
                tenant.max_requests_per_sec,
                priority,
                MAX_PERMIT_WAIT,
            )
            .await
            .map_err(|held| CallError {
                class: ErrorClass::RateLimited,
                message: format!(
                    "not sent: the tenant's request budget has no permit for {:.1} s",
                    held.wait.as_secs_f64()
                ),
                retry_after: Some(held.wait),
            })?;
        match self.auth(req, tenant).send().await {
            Ok(resp) => {
                let answer = if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                    Answer::Throttled(parse_retry_after(resp.headers().get("retry-after")))
                } else {
                    Answer::Accepted
                };
                self.budgets.answer(permit, answer);
                Ok(resp)
            }
            Err(e) => {
                self.budgets.answer(permit, Answer::NoAnswer);
                Err(classify_send_error(&e))
            }
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder, tenant: &TenantConfig) -> reqwest::RequestBuilder {
        let req = req
            .header("X-AppTenant", &tenant.app_tenant)
            .header("X-AppId", &tenant.app_id)
            .header("X-AppSecret", tenant.app_secret.expose())
            .header("Accept", "application/json");
        match &tenant.app_user {
            Some(u) => req.header("X-AppUser", u),
            None => req,
        }
    }

    /// Reads a body up to `limit` bytes; more is a `Malformed` error.
    async fn body(&self, mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, CallError> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(CallError {
                class: ErrorClass::Malformed,
                message: format!("document larger than {limit} bytes"),
                retry_after: None,
            });
        }
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if buf.len() + c.len() > limit {
                        return Err(CallError {
                            class: ErrorClass::Malformed,
                            message: format!("document larger than {limit} bytes"),
                            retry_after: None,
                        });
                    }
                    buf.extend_from_slice(&c);
                }
                Ok(None) => return Ok(buf),
                Err(e) => return Err(classify_send_error(&e)),
            }
        }
    }

    /// The URL of one document: `api_base` joined with the configured path.
    pub fn document_url(
        config: &Config,
        tenant: &TenantConfig,
        doc_type: DocType,
        id: &str,
    ) -> Url {
        let mut url = tenant.api_base.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!(
            "{base}{}",
            config.upstream.document_path(doc_type, id)
        ));
        url
    }

    /// GETs one document, at `priority` in the tenant's budget.
    pub async fn get_document(
        &self,
        config: &Config,
        tenant: &TenantConfig,
        doc_type: DocType,
        id: &str,
        priority: Priority,
    ) -> Fetched {
        let url = Self::document_url(config, tenant, doc_type, id);
        let resp = match self.send(tenant, priority, self.client.get(url)).await {
            Ok(r) => r,
            Err(e) => return Fetched::Failed(e),
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Fetched::Gone(status.as_u16());
        }
        if !status.is_success() {
            return Fetched::Failed(status_error(
                status,
                parse_retry_after(resp.headers().get("retry-after")),
            ));
        }
        let body = match self.body(resp, self.max_document_bytes).await {
            Ok(b) => b,
            Err(e) => return Fetched::Failed(e),
        };
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => Fetched::Document(m),
            Ok(_) => Fetched::Failed(CallError {
                class: ErrorClass::Malformed,
                message: "2xx body is JSON but not an object".into(),
                retry_after: None,
            }),
            Err(e) => Fetched::Failed(CallError {
                class: ErrorClass::Malformed,
                message: format!("2xx body is not JSON: {e}"),
                retry_after: None,
            }),
        }
    }

    /// Lists the first `take` ids and modification times matching
    /// `filters`, ordered by ModifiedOn then id (the server may return fewer).
    /// Listing is background work in the tenant's budget.
    pub async fn list_page(
        &self,
        config: &Config,
        tenant: &TenantConfig,
        doc_type: DocType,
        take: u32,
        filters: &[ListFilter],
    ) -> Result<ListPage, CallError> {
        let u = &config.upstream;
        let (query, id_field) = match doc_type {
            DocType::Job => (&u.jobs_query, &u.job_id_field),
            DocType::Project => (&u.projects_query, &u.project_id_field),
        };
        let mut url = tenant.extraction_base.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!(
            "{base}{}",
            u.listing_path.replace("{query}", query)
        ));
        let filters: Vec<Value> = filters
            .iter()
            .map(|f| {
                let field = match f.field {
                    ListField::Modified => &u.modified_field,
                    ListField::Id => id_field,
                };
                json!([field, f.op, f.value])
            })
            .collect();
        let body = json!({"queryBuilder": {
            "skip": 0,
            "take": take,
            "orderBy": [{"field": u.modified_field, "direction": "asc"}, {"field": id_field, "direction": "asc"}],
            "fields": [id_field, u.modified_field],
            "filters": filters,
        }});
        let resp = self
            .send(
                tenant,
                Priority::Background,
                self.client.post(url).json(&body),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(
                status,
                parse_retry_after(resp.headers().get("retry-after")),
            ));
        }
        // A page is small (ids and times); allow generously more than a document.
        let bytes = self
            .body(resp, self.max_document_bytes.max(64 << 20))
            .await?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| CallError {
            class: ErrorClass::Malformed,
            message: format!("listing is not JSON: {e}"),
            retry_after: None,
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| malformed("listing is not a JSON object"))?;
        let data = get_ci(obj, "data")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("listing has no `data` array"))?;
        let total_count = get_ci(obj, "totalCount").and_then(Value::as_u64);
        let mut rows = Vec::with_capacity(data.len());
        for row in data {
            let row = row
                .as_object()
                .ok_or_else(|| malformed("listing row is not an object"))?;
            let raw_id = get_ci(row, id_field)
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(&format!("listing row has no `{id_field}`")))?;
            let id = uuid::Uuid::try_parse(raw_id)
                .map(|u| u.hyphenated().to_string())
                .unwrap_or_else(|_| raw_id.to_string());
            let raw_modified_on = get_ci(row, &u.modified_field)
                .and_then(Value::as_str)
                .map(str::to_string);
            rows.push(ListedDoc {
                id,
                modified_on: raw_modified_on.as_deref().map(normalize_ts),
                raw_id: raw_id.to_string(),
                raw_modified_on,
            });
        }
        Ok(ListPage { rows, total_count })
    }
}

fn malformed(msg: &str) -> CallError {
    CallError {
        class: ErrorClass::Malformed,
        message: msg.to_string(),
        retry_after: None,
    }
}
