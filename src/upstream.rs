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
//!
//! A listing page costs bounded memory: its body may hold at most
//! [`LISTING_ROW_BYTES`] per row asked for (a larger one is refused as
//! malformed), it is parsed straight into the two columns a row needs (every
//! other field is skipped, never built into a JSON tree), and at most
//! [`LISTINGS_AT_ONCE`] pages are downloaded and parsed at once per process,
//! whatever the number of tenants and types whose schedules fire together.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Client, StatusCode, Url};
use serde_json::{Map, Value, json};

use crate::budget::{Answer, Budgets, Priority};
use crate::config::{Config, TenantConfig};
use crate::model::{DocType, ErrorClass, normalize_ts};

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
/// fetch holds a lease on its document meanwhile (renewed while it waits,
/// see `fetcher::fetch_lease`): past this it gives the document back (as if
/// throttled) rather than hold it from a process with permits to spare.
pub const MAX_PERMIT_WAIT: Duration = Duration::from_secs(20);

/// The most a listing page's body may hold per row asked for (`take`), on
/// top of [`LISTING_BASE_BYTES`]. A row holds an id and a time (about 100
/// bytes); a server that ignores `fields` and sends every known column
/// stays well inside. At the default `page_size` (500) a page may be 1.1 MB;
/// at the largest (10,000), 20 MB.
pub const LISTING_ROW_BYTES: usize = 2048;

/// What a listing page's body may hold besides its rows.
pub const LISTING_BASE_BYTES: usize = 64 << 10;

/// How many listing pages one process downloads and parses at once, across
/// every tenant and type: runs that start together take turns page by page,
/// so their memory is bounded by this many pages, not by the tenant count.
pub const LISTINGS_AT_ONCE: usize = 4;

/// The client; cheap to clone (clones share the request budgets).
#[derive(Clone)]
pub struct Upstream {
    client: Client,
    max_document_bytes: usize,
    /// Every tenant's request budget in this process: every clone draws
    /// from the same ones, so the fetcher and the reconciler share them.
    budgets: Budgets,
    /// Listing pages in flight in this process ([`LISTINGS_AT_ONCE`]);
    /// shared by every clone, and kept across reloads like the budgets.
    listings: Arc<tokio::sync::Semaphore>,
}

/// Installs the ring crypto provider for rustls as the process default
/// (reqwest is built without a provider of its own to keep the build small;
/// the PostgreSQL client's TLS uses the default too). Called where a process
/// starts: [`crate::cli::main`], [`crate::app::Application`]'s build (so
/// [`crate::run`]), and the tests' shared set-up; and by the two builders of
/// an HTTPS client ([`Upstream::with_budgets`], the simulator's
/// `send_webhooks`), so a library caller that skipped those gets no panic
/// from rustls. A second call does nothing.
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
            listings: Arc::new(tokio::sync::Semaphore::new(LISTINGS_AT_ONCE)),
        })
    }

    /// This client drawing its listing turns from `other`'s: a reload's new
    /// client and the old one draining share one [`LISTINGS_AT_ONCE`].
    pub fn sharing_listings(mut self, other: &Upstream) -> Upstream {
        self.listings = other.listings.clone();
        self
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

    /// Reads a body up to `limit` bytes; more is a `Malformed` error
    /// naming `what` (a document, a listing page).
    async fn body(
        &self,
        mut resp: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, CallError> {
        let too_large = || CallError {
            class: ErrorClass::Malformed,
            message: format!("{what} larger than {limit} bytes"),
            retry_after: None,
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut buf = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if buf.len() + c.len() > limit {
                        return Err(too_large());
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
        let body = match self.body(resp, self.max_document_bytes, "document").await {
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
        // One of the process's listing turns, from before the request to the
        // end of the parse: the body and the parsed rows are what cost memory.
        let _turn = self.listings.acquire().await.map_err(|_| CallError {
            class: ErrorClass::Network,
            message: "the listing turns were closed".into(),
            retry_after: None,
        })?;
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
        let limit = LISTING_BASE_BYTES + take as usize * LISTING_ROW_BYTES;
        let bytes = self
            .body(resp, limit, &format!("listing page (take {take})"))
            .await?;
        let (raw, total_count) = parse_page(&bytes, id_field, &u.modified_field)?;
        drop(bytes);
        let rows = raw
            .into_iter()
            .map(|(raw_id, raw_modified_on)| {
                let id = uuid::Uuid::try_parse(&raw_id)
                    .map(|u| u.hyphenated().to_string())
                    .unwrap_or_else(|_| raw_id.clone());
                ListedDoc {
                    id,
                    modified_on: raw_modified_on.as_deref().map(normalize_ts),
                    raw_id,
                    raw_modified_on,
                }
            })
            .collect();
        Ok(ListPage { rows, total_count })
    }
}

/// A listing row as parsed: its id and ModifiedOn as listed.
type RawRow = (String, Option<String>);

/// Parses a listing page, `{"data": [{id_field: "…", modified_field: "…"}, …],
/// "totalCount": N}` (keys matched case-insensitively, an exact match
/// first), keeping only those two columns of each row: every other field,
/// however large, is skipped without being built.
fn parse_page(
    bytes: &[u8],
    id_field: &str,
    modified_field: &str,
) -> Result<(Vec<RawRow>, Option<u64>), CallError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let page = PageSeed {
        id_field,
        modified_field,
    }
    .deserialize(&mut de)
    .and_then(|p| de.end().map(|()| p))
    .map_err(|e| malformed(&format!("listing page: {e}")))?;
    let (data, total) = page;
    let data = data.ok_or_else(|| malformed("listing has no `data` array"))?;
    let rows = data
        .into_iter()
        .map(|(id, modified)| {
            id.map(|id| (id, modified))
                .ok_or_else(|| malformed(&format!("listing row has no `{id_field}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rows, total))
}

/// A field matched case-insensitively, the exact spelling winning over
/// other spellings (as [`crate::model::get_ci`] does).
struct Matched<T> {
    value: Option<T>,
    exact: bool,
}

impl<T> Matched<T> {
    fn new() -> Self {
        Matched {
            value: None,
            exact: false,
        }
    }

    /// Whether a value under `key` should replace the one held for `name`.
    fn wants(&self, key: &str, name: &str) -> bool {
        if key == name {
            !self.exact
        } else {
            self.value.is_none() && key.eq_ignore_ascii_case(name)
        }
    }

    fn set(&mut self, key: &str, name: &str, value: T) {
        self.exact = key == name;
        self.value = Some(value);
    }
}

/// The whole page: `data` (rows with the id missing kept as `None`, so the
/// error can name the field) and `totalCount`.
struct PageSeed<'a> {
    id_field: &'a str,
    modified_field: &'a str,
}

type ParsedPage = (Option<Vec<(Option<String>, Option<String>)>>, Option<u64>);

impl<'de> serde::de::DeserializeSeed<'de> for PageSeed<'_> {
    type Value = ParsedPage;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for PageSeed<'_> {
    type Value = ParsedPage;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object with a `data` array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ParsedPage, A::Error> {
        let mut data = Matched::new();
        let mut total = Matched::new();
        while let Some(key) = map.next_key::<String>()? {
            if data.wants(&key, "data") {
                let rows = map.next_value_seed(RowsSeed {
                    id_field: self.id_field,
                    modified_field: self.modified_field,
                })?;
                data.set(&key, "data", rows);
            } else if total.wants(&key, "totalCount") {
                let v: Value = map.next_value()?;
                total.set(&key, "totalCount", v.as_u64());
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok((data.value, total.value.flatten()))
    }
}

/// The `data` array.
struct RowsSeed<'a> {
    id_field: &'a str,
    modified_field: &'a str,
}

impl<'de> serde::de::DeserializeSeed<'de> for RowsSeed<'_> {
    type Value = Vec<(Option<String>, Option<String>)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RowsSeed<'_> {
    type Value = Vec<(Option<String>, Option<String>)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a `data` array of row objects")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rows = Vec::new();
        while let Some(row) = seq.next_element_seed(RowSeed {
            id_field: self.id_field,
            modified_field: self.modified_field,
        })? {
            rows.push(row);
        }
        Ok(rows)
    }
}

/// One row: its id (a string, else `None`) and ModifiedOn (a string, else `None`).
struct RowSeed<'a> {
    id_field: &'a str,
    modified_field: &'a str,
}

impl<'de> serde::de::DeserializeSeed<'de> for RowSeed<'_> {
    type Value = (Option<String>, Option<String>);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for RowSeed<'_> {
    type Value = (Option<String>, Option<String>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a listing row object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = Matched::new();
        let mut modified = Matched::new();
        while let Some(key) = map.next_key::<String>()? {
            if id.wants(&key, self.id_field) {
                let v: Value = map.next_value()?;
                id.set(&key, self.id_field, v.as_str().map(str::to_string));
            } else if modified.wants(&key, self.modified_field) {
                let v: Value = map.next_value()?;
                modified.set(&key, self.modified_field, v.as_str().map(str::to_string));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok((id.value.flatten(), modified.value.flatten()))
    }
}

fn malformed(msg: &str) -> CallError {
    CallError {
        class: ErrorClass::Malformed,
        message: msg.to_string(),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TestResult;

    #[test]
    fn a_page_keeps_two_columns_matched_case_insensitively_and_skips_the_rest() -> TestResult {
        let page = br#"{"TOTALCOUNT": 7, "extra": {"deep": [1, 2, {"x": "y"}]},
            "Data": [
                {"jobid": "A", "Padding": "xxxxxxxx", "modifiedon": "2026-11-01T00:00:00Z"},
                {"JobId": "B", "jobid": "ignored", "ModifiedOn": null, "Nested": {"a": [1]}},
                {"JobId": "C"}
            ]}"#;
        let (rows, total) = parse_page(page, "JobId", "ModifiedOn").map_err(|e| e.message)?;
        assert_eq!(total, Some(7));
        assert_eq!(
            rows,
            vec![
                ("A".to_string(), Some("2026-11-01T00:00:00Z".to_string())),
                ("B".to_string(), None),
                ("C".to_string(), None),
            ]
        );
        Ok(())
    }

    #[test]
    fn a_malformed_page_is_refused_with_what_is_wrong() {
        let err = |b: &[u8]| {
            parse_page(b, "JobId", "ModifiedOn")
                .err()
                .map(|e| (e.class, e.message))
        };
        let no_id = err(br#"{"data": [{"ModifiedOn": "t"}]}"#);
        assert_eq!(
            no_id.map(|(c, m)| (c, m.contains("no `JobId`"))),
            Some((ErrorClass::Malformed, true))
        );
        let numeric_id = err(br#"{"data": [{"JobId": 5}]}"#);
        assert!(numeric_id.is_some_and(|(_, m)| m.contains("no `JobId`")));
        let no_data = err(br#"{"totalCount": 1}"#);
        assert!(no_data.is_some_and(|(_, m)| m.contains("no `data` array")));
        for bad in [
            &br#"[1, 2]"#[..],
            br#"{"data": 5}"#,
            br#"{"data": [5]}"#,
            br#"{"data": []} trailing"#,
            b"not json",
        ] {
            let e = err(bad);
            assert!(
                e.as_ref().is_some_and(
                    |(c, m)| *c == ErrorClass::Malformed && m.starts_with("listing page")
                ),
                "{e:?} for {}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
