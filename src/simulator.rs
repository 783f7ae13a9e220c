//! A Skills Workflow simulator on loopback, used by `demo`, `simulate`, the
//! tests and the benchmarks. It serves single documents
//! (`GET {job_path}`/`{project_path}`) and the Data Extraction listing
//! (`POST {listing_path}` with skip/take/fields/filters, ordered by
//! ModifiedOn then id), checks the `X-App*` headers, can create, change and
//! delete documents without telling anyone, can send webhooks at a given
//! concurrency and rate, and injects faults: latency, a 5xx fraction, 429
//! bursts with `Retry-After`, hangs, malformed or oversized bodies, and
//! connections cut mid-body. It counts the GETs per document.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::model::{DocType, fmt_ts, normalize_ts};
use crate::server::{self, Limits};

/// Faults to inject; all off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added to every answer.
    pub latency: Duration,
    /// Fraction of document GETs answered 500/503.
    pub error_rate: f64,
    /// The next N requests (GET or listing) get 429 with this Retry-After.
    pub rate_limit_next: u32,
    pub retry_after_secs: u64,
    /// Fraction of GETs that hang for `hang_for` before answering.
    pub hang_rate: f64,
    pub hang_for: Duration,
    /// Fraction of GETs answered 200 with a body that is not JSON.
    pub malformed_rate: f64,
    /// Fraction of GETs answered 200 with a body of `oversize_bytes`.
    pub oversize_rate: f64,
    pub oversize_bytes: usize,
    /// Fraction of GETs whose connection is cut mid-body.
    pub reset_rate: f64,
    /// After this many listing pages answered (counted from `set_faults`),
    /// every listing request gets 500: "fails on page N+1".
    pub listing_fail_after: Option<u64>,
    /// Answer every request 401 (credentials revoked).
    pub auth_broken: bool,
    /// The next N listing requests answer 503 (a short outage).
    pub listing_error_next: u32,
    /// Fraction of listing requests answered 500/503.
    pub listing_error_rate: f64,
    /// The server caps every listing page at this many rows, whatever
    /// `take` asked for (`totalCount` still counts every match).
    pub page_cap: Option<u64>,
}

/// Called after each listing page is answered, with the page's number (from
/// 1): tests change documents between pages with it.
pub type ListingHook = Arc<dyn Fn(&Simulator, u64) + Send + Sync>;

/// One simulated document.
#[derive(Debug, Clone)]
pub struct SimDoc {
    pub doc: Map<String, Value>,
    pub modified_on: String,
    pub deleted: bool,
}

#[derive(Default)]
struct State {
    docs: HashMap<(DocType, String), SimDoc>,
    /// Live documents ordered as the listing orders them.
    /// Per type, sorted by (ModifiedOn, id): a position is a binary search,
    /// so `totalCount` and a page cost O(log n + page), not O(n).
    index: HashMap<DocType, Vec<(String, String)>>,
    faults: Faults,
    gets: HashMap<(DocType, String), u64>,
    total_gets: u64,
    listing_calls: u64,
    /// Listing pages answered since the faults were last set.
    listing_pages_since_faults: u64,
    auth_failures: u64,
    seen_users: Vec<String>,
    last_modified: Option<chrono::DateTime<Utc>>,
    counter: u64,
    /// While set, the listing answers from this copy of `index` (a read
    /// replica lagging the single-document GETs).
    listing_snapshot: Option<HashMap<DocType, Vec<(String, String)>>>,
    listing_hook: Option<ListingHook>,
    /// Listing pages answered with 200, for the hook.
    listing_pages: u64,
}

impl State {
    fn next_modified(&mut self) -> String {
        // Strictly increasing at the millisecond precision the text keeps, so
        // every change is visible to a watermark.
        let now = Utc::now();
        let now = now
            - chrono::Duration::nanoseconds(i64::from(now.timestamp_subsec_nanos() % 1_000_000));
        let t = match self.last_modified {
            Some(last) if now <= last => last + chrono::Duration::milliseconds(1),
            _ => now,
        };
        self.last_modified = Some(t);
        fmt_ts(t)
    }

    fn put(&mut self, ty: DocType, id: String, doc: SimDoc) {
        let index = self.index.entry(ty).or_default();
        if let Some(old) = self.docs.get(&(ty, id.clone())) {
            let key = (old.modified_on.clone(), id.clone());
            if let Ok(i) = index.binary_search(&key) {
                index.remove(i);
            }
        }
        if !doc.deleted {
            let key = (doc.modified_on.clone(), id.clone());
            if let Err(i) = index.binary_search(&key) {
                index.insert(i, key);
            }
        }
        self.docs.insert((ty, id), doc);
    }
}

/// The credentials the simulator accepts.
#[derive(Debug, Clone)]
pub struct SimCredentials {
    pub app_tenant: String,
    pub app_id: String,
    pub app_secret: String,
}

/// Paths the simulator serves (the same defaults as the config).
#[derive(Debug, Clone)]
pub struct SimPaths {
    pub job_prefix: String,
    pub project_prefix: String,
    pub listing_prefix: String,
    pub listing_suffix: String,
    pub jobs_query: String,
    pub projects_query: String,
}

impl Default for SimPaths {
    fn default() -> Self {
        use crate::config::defaults;
        let before = |template: &str, placeholder: &str| {
            template
                .split(placeholder)
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let after = |template: &str, placeholder: &str| {
            template
                .split(placeholder)
                .nth(1)
                .unwrap_or_default()
                .to_string()
        };
        SimPaths {
            job_prefix: before(defaults::JOB_PATH, "{id}"),
            project_prefix: before(defaults::PROJECT_PATH, "{id}"),
            listing_prefix: before(defaults::LISTING_PATH, "{query}"),
            listing_suffix: after(defaults::LISTING_PATH, "{query}"),
            jobs_query: defaults::JOBS_QUERY.into(),
            projects_query: defaults::PROJECTS_QUERY.into(),
        }
    }
}

/// A running simulator; cheap to clone. Stops when its token is cancelled.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    creds: Arc<SimCredentials>,
}

const STAGES: [&str; 5] = ["Briefing", "In Progress", "Review", "Approved", "Closed"];
const CLIENTS: [&str; 4] = ["Northwind", "Contoso", "Fabrikam", "Tailspin"];

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

    pub fn set_faults(&self, f: Faults) {
        let mut s = self.lock();
        s.faults = f;
        s.listing_pages_since_faults = 0;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// From now on the listing answers from the documents as they are now,
    /// while GETs keep serving every later change: a listing read path that
    /// lags the single-document one. [`Simulator::thaw_listing`] ends it.
    pub fn freeze_listing(&self) {
        let mut s = self.lock();
        s.listing_snapshot = Some(s.index.clone());
    }

    /// The listing catches up with the documents again.
    pub fn thaw_listing(&self) {
        self.lock().listing_snapshot = None;
    }

    /// Runs `hook` after every listing page answered (`None` removes it).
    /// Pages are numbered from 1 from this call on.
    pub fn on_listing_page(&self, hook: Option<ListingHook>) {
        let mut s = self.lock();
        s.listing_hook = hook;
        s.listing_pages = 0;
    }

    /// Sets a live document's `ModifiedOn` (and its listing position) to
    /// `modified_on` without other changes: equal timestamps, clocks that
    /// run behind or ahead. Returns false if there is no such live document.
    pub fn set_modified_on(&self, ty: DocType, id: &str, modified_on: &str) -> bool {
        let mut s = self.lock();
        let Some(mut d) = s.docs.get(&(ty, id.to_string())).cloned() else {
            return false;
        };
        if d.deleted {
            return false;
        }
        d.doc.insert("ModifiedOn".into(), json!(modified_on));
        d.modified_on = normalize_ts(modified_on);
        s.put(ty, id.to_string(), d);
        true
    }

    /// Creates a document with realistic fields; returns its id.
    pub fn create(&self, ty: DocType) -> String {
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let mut s = self.lock();
        s.counter += 1;
        let n = s.counter;
        let modified = s.next_modified();
        let client = CLIENTS[(n as usize) % CLIENTS.len()];
        let doc = match ty {
            DocType::Job => json!({
                "Id": id, "JobId": id, "JobNumber": format!("J{n:06}"), "Subject": format!("Job {n} for {client}"),
                "ProjectId": null, "Client": client, "Stage": STAGES[0], "StageType": "Open",
                "StartDate": "2026-11-01T00:00:00Z", "EndDate": "2026-12-31T00:00:00Z",
                "ModifiedOn": modified, "Version": 1
            }),
            DocType::Project => json!({
                "Id": id, "ProjectId": id, "ProjectNumber": format!("P{n:05}"), "Name": format!("Project {n} for {client}"),
                "Client": client, "Stage": STAGES[0], "StartDate": "2026-11-01T00:00:00Z", "EndDate": "2027-03-31T00:00:00Z",
                "ModifiedOn": modified
            }),
        };
        let doc = match doc {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        s.put(
            ty,
            id.clone(),
            SimDoc {
                doc,
                modified_on: modified,
                deleted: false,
            },
        );
        id
    }

    /// Creates `n` documents of a type; returns their ids.
    pub fn seed(&self, ty: DocType, n: usize) -> Vec<String> {
        (0..n).map(|_| self.create(ty)).collect()
    }

    /// Moves a document to its next stage (new ModifiedOn, Version + 1).
    /// Returns false if there is no such live document.
    pub fn update(&self, ty: DocType, id: &str) -> bool {
        let mut s = self.lock();
        let Some(mut d) = s.docs.get(&(ty, id.to_string())).cloned() else {
            return false;
        };
        if d.deleted {
            return false;
        }
        let modified = s.next_modified();
        let stage = d
            .doc
            .get("Stage")
            .and_then(Value::as_str)
            .unwrap_or(STAGES[0]);
        let next = STAGES
            .iter()
            .position(|x| *x == stage)
            .map_or(0, |i| (i + 1) % STAGES.len());
        d.doc.insert("Stage".into(), json!(STAGES[next]));
        d.doc.insert("ModifiedOn".into(), json!(modified));
        if let Some(v) = d.doc.get("Version").and_then(Value::as_i64) {
            d.doc.insert("Version".into(), json!(v + 1));
        }
        d.modified_on = modified;
        s.put(ty, id.to_string(), d);
        true
    }

    /// Replaces a document's fields as given (tests craft odd cases with it);
    /// `ModifiedOn` in `doc` sets the listing time.
    pub fn put_raw(&self, ty: DocType, id: &str, doc: Map<String, Value>) {
        let modified = doc
            .get("ModifiedOn")
            .and_then(Value::as_str)
            .map(normalize_ts)
            .unwrap_or_else(|| fmt_ts(Utc::now()));
        self.lock().put(
            ty,
            id.to_string(),
            SimDoc {
                doc,
                modified_on: modified,
                deleted: false,
            },
        );
    }

    /// Deletes a document upstream (GET answers 404; the listing omits it).
    pub fn delete(&self, ty: DocType, id: &str) -> bool {
        let mut s = self.lock();
        let Some(mut d) = s.docs.get(&(ty, id.to_string())).cloned() else {
            return false;
        };
        d.deleted = true;
        s.put(ty, id.to_string(), d);
        true
    }

    /// Brings a deleted document back.
    pub fn undelete(&self, ty: DocType, id: &str) -> bool {
        let mut s = self.lock();
        let Some(mut d) = s.docs.get(&(ty, id.to_string())).cloned() else {
            return false;
        };
        d.deleted = false;
        s.put(ty, id.to_string(), d);
        true
    }

    /// Live documents of a type, by id (for comparing with the mirror).
    pub fn documents(&self, ty: DocType) -> HashMap<String, Map<String, Value>> {
        self.lock()
            .docs
            .iter()
            .filter(|((t, _), d)| *t == ty && !d.deleted)
            .map(|((_, id), d)| (id.clone(), d.doc.clone()))
            .collect()
    }

    /// Ids of live documents of a type.
    pub fn ids(&self, ty: DocType) -> Vec<String> {
        let mut v: Vec<String> = self.documents(ty).into_keys().collect();
        v.sort();
        v
    }

    /// GETs answered for one document (any status).
    pub fn gets(&self, ty: DocType, id: &str) -> u64 {
        self.lock()
            .gets
            .get(&(ty, id.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn total_gets(&self) -> u64 {
        self.lock().total_gets
    }

    pub fn listing_calls(&self) -> u64 {
        self.lock().listing_calls
    }

    pub fn auth_failures(&self) -> u64 {
        self.lock().auth_failures
    }

    /// `X-AppUser` values seen, in order.
    pub fn seen_users(&self) -> Vec<String> {
        self.lock().seen_users.clone()
    }

    /// The webhook body Skills Workflow would send for this document.
    pub fn webhook_payload(&self, ty: DocType, id: &str, action: &str) -> Value {
        let (t, path) = match ty {
            DocType::Job => ("SkillsWorkflow.Job", "jobs"),
            DocType::Project => ("SkillsWorkflow.Project", "projects"),
        };
        json!({"action": action, "document": {"type": t, "id": id, "url": format!("{}/api/{path}/{id}", self.base_url())}})
    }

    fn check_auth(&self, headers: &warp::http::HeaderMap) -> bool {
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let ok = h("x-apptenant") == self.creds.app_tenant
            && h("x-appid") == self.creds.app_id
            && h("x-appsecret") == self.creds.app_secret;
        let mut s = self.lock();
        if let Some(u) = headers.get("x-appuser").and_then(|v| v.to_str().ok()) {
            s.seen_users.push(u.to_string());
        }
        if !ok || s.faults.auth_broken {
            s.auth_failures += 1;
            return false;
        }
        true
    }

    /// Takes one 429 from the burst, if any is left.
    fn take_rate_limit(&self) -> Option<u64> {
        let mut s = self.lock();
        if s.faults.rate_limit_next > 0 {
            s.faults.rate_limit_next -= 1;
            return Some(s.faults.retry_after_secs);
        }
        None
    }

    /// What every request goes through first: the latency, the credentials
    /// check, and a 429 from the current burst. `Some` is the refusal to send.
    async fn gate(&self, faults: &Faults, headers: &warp::http::HeaderMap) -> Option<Response> {
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        if !self.check_auth(headers) {
            return Some(reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid credentials"}),
            ));
        }
        let after = self.take_rate_limit()?;
        let mut r = reply(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "rate limited"}),
        );
        if let Ok(v) = after.to_string().parse() {
            r.headers_mut().insert("retry-after", v);
        }
        Some(r)
    }

    async fn get_document(
        self,
        ty: DocType,
        id: String,
        headers: warp::http::HeaderMap,
    ) -> Response {
        let faults = {
            let mut s = self.lock();
            s.total_gets += 1;
            *s.gets.entry((ty, id.to_ascii_lowercase())).or_default() += 1;
            s.faults.clone()
        };
        if let Some(refused) = self.gate(&faults, &headers).await {
            return refused;
        }
        if faults.hang_rate > 0.0 && fastrand::f64() < faults.hang_rate {
            tokio::time::sleep(faults.hang_for).await;
        }
        if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
            let code = if fastrand::bool() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return reply(code, json!({"error": "simulated failure"}));
        }
        if faults.malformed_rate > 0.0 && fastrand::f64() < faults.malformed_rate {
            return warp::reply::with_status("<html>upstream proxy error</html>", StatusCode::OK)
                .into_response_fix();
        }
        if faults.oversize_rate > 0.0 && fastrand::f64() < faults.oversize_rate {
            let big = json!({"Id": id, "Blob": "x".repeat(faults.oversize_bytes)});
            return reply(StatusCode::OK, big);
        }
        if faults.reset_rate > 0.0 && fastrand::f64() < faults.reset_rate {
            // Abort the connection task: the client sees the connection drop
            // with no answer, as on a reset. `resume_unwind` skips the panic
            // hook, so nothing is printed; no lock is held here.
            std::panic::resume_unwind(Box::new("simulated connection reset"));
        }
        let doc = self
            .lock()
            .docs
            .get(&(ty, id.to_ascii_lowercase()))
            .cloned();
        match doc {
            Some(d) if !d.deleted => reply(StatusCode::OK, Value::Object(d.doc)),
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        }
    }

    async fn listing(self, ty: DocType, headers: warp::http::HeaderMap, body: Value) -> Response {
        let faults = {
            let mut s = self.lock();
            s.listing_calls += 1;
            s.faults.clone()
        };
        if let Some(refused) = self.gate(&faults, &headers).await {
            return refused;
        }
        let q = &body["queryBuilder"];
        let skip = q["skip"].as_u64().unwrap_or(0);
        let take = q["take"].as_u64().unwrap_or(500).min(10_000);
        if let Some(fail) = faults.listing_fail_after {
            if self.lock().listing_pages_since_faults >= fail {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "simulated listing failure"}),
                );
            }
        }
        let outage = {
            let mut s = self.lock();
            if s.faults.listing_error_next > 0 {
                s.faults.listing_error_next -= 1;
                true
            } else {
                false
            }
        };
        if outage
            || (faults.listing_error_rate > 0.0 && fastrand::f64() < faults.listing_error_rate)
        {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "simulated listing outage"}),
            );
            if let Ok(v) = "1".parse() {
                r.headers_mut().insert("retry-after", v);
            }
            return r;
        }
        let fields: Vec<String> = q["fields"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let id_field = match ty {
            DocType::Job => "JobId",
            DocType::Project => "ProjectId",
        };
        // Known columns only, as the real named queries have.
        for f in &fields {
            let known: &[&str] = match ty {
                DocType::Job => &[
                    "JobId",
                    "JobNumber",
                    "Job",
                    "ProjectId",
                    "Client",
                    "Stage",
                    "StageType",
                    "StartDate",
                    "EndDate",
                    "ModifiedOn",
                    "Version",
                ],
                DocType::Project => &[
                    "ProjectId",
                    "ProjectNumber",
                    "Project",
                    "Client",
                    "Stage",
                    "StartDate",
                    "EndDate",
                    "ModifiedOn",
                ],
            };
            if !known.iter().any(|k| k.eq_ignore_ascii_case(f)) {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown field {f}")}),
                );
            }
        }
        let filters = match parse_filters(&q["filters"], id_field) {
            Ok(f) => f,
            Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e })),
        };
        let mut s = self.lock();
        s.listing_pages += 1;
        s.listing_pages_since_faults += 1;
        let page_no = s.listing_pages;
        let hook = s.listing_hook.clone();
        let take = faults.page_cap.map_or(take, |cap| take.min(cap));
        let empty = Vec::new();
        let index = match &s.listing_snapshot {
            Some(snap) => snap.get(&ty).unwrap_or(&empty),
            None => s.index.get(&ty).unwrap_or(&empty),
        };
        // The index is in (ModifiedOn, id) order, so the terms the daemon
        // sends (bounds on ModifiedOn, and `id >` inside one ModifiedOn) are
        // a range found by binary search: a page and its totalCount cost
        // O(log n + page), not a scan of the rest of the index.
        let (lo, hi) = key_range(index, &filters);
        let range = &index[lo..hi];
        let with_equal = filters
            .iter()
            .any(|f| f.on_modified && f.op == "=" && f.value.is_some());
        let exact = filters.iter().all(|f| f.is_range_term(with_equal));
        let (total, matching): (usize, Vec<&(String, String)>) = if exact {
            let page = range.iter().skip(skip as usize).take(take as usize);
            (range.len(), page.collect())
        } else {
            let all: Vec<&(String, String)> = range
                .iter()
                .filter(|(m, id)| filters.iter().all(|f| f.matches(m, id)))
                .collect();
            let page = all.iter().copied().skip(skip as usize).take(take as usize);
            (all.len(), page.collect())
        };
        let data: Vec<Value> = matching
            .into_iter()
            .filter_map(|(m, id)| s.docs.get(&(ty, id.clone())).map(|d| (m, d)))
            .map(|(m, d)| {
                let mut row = Map::new();
                for f in &fields {
                    let v = if f.eq_ignore_ascii_case(id_field) {
                        d.doc.get(id_field).or_else(|| d.doc.get("Id")).cloned()
                    } else if f.eq_ignore_ascii_case("ModifiedOn") {
                        // As the listing's read path knows it (it may lag).
                        Some(json!(m))
                    } else if f.eq_ignore_ascii_case("Job") {
                        d.doc.get("Subject").cloned()
                    } else if f.eq_ignore_ascii_case("Project") {
                        d.doc.get("Name").cloned()
                    } else {
                        d.doc.get(f.as_str()).cloned()
                    };
                    row.insert(f.clone(), v.unwrap_or(Value::Null));
                }
                Value::Object(row)
            })
            .collect();
        drop(s);
        if let Some(hook) = hook {
            hook(&self, page_no);
        }
        reply(StatusCode::OK, json!({"data": data, "totalCount": total}))
    }

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

impl Simulator {
    /// The control API used by `skillsync simulate` users and benchmarks
    /// (loopback test tool: no authentication). Body: JSON.
    /// - `create|update|delete` `{"type": "job"|"project", "count": N}`
    /// - `faults` `{"latency_ms", "error_rate", "rate_limit_next", "retry_after_secs",
    ///   "hang_rate", "hang_secs", "malformed_rate", "reset_rate", "listing_fail_after", "auth_broken",
    ///   "listing_error_next", "listing_error_rate", "page_cap"}`
    /// - `stats` → `{"total_gets", "listing_calls", "auth_failures", "jobs", "projects"}`
    fn control(&self, cmd: &str, body: &[u8]) -> Response {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let ty = match v["type"].as_str() {
            Some("project") => DocType::Project,
            _ => DocType::Job,
        };
        let count = v["count"].as_u64().unwrap_or(1) as usize;
        match cmd {
            "create" => {
                let ids = self.seed(ty, count);
                reply(StatusCode::OK, json!({"created": ids.len()}))
            }
            "update" | "delete" => {
                let mut ids = self.ids(ty);
                fastrand::shuffle(&mut ids);
                let mut n = 0;
                for id in ids.iter().take(count) {
                    let ok = if cmd == "update" {
                        self.update(ty, id)
                    } else {
                        self.delete(ty, id)
                    };
                    n += usize::from(ok);
                }
                reply(StatusCode::OK, json!({ cmd: n }))
            }
            "faults" => {
                let f = Faults {
                    latency: Duration::from_millis(v["latency_ms"].as_u64().unwrap_or(0)),
                    error_rate: v["error_rate"].as_f64().unwrap_or(0.0),
                    rate_limit_next: v["rate_limit_next"].as_u64().unwrap_or(0) as u32,
                    retry_after_secs: v["retry_after_secs"].as_u64().unwrap_or(1),
                    hang_rate: v["hang_rate"].as_f64().unwrap_or(0.0),
                    hang_for: Duration::from_secs(v["hang_secs"].as_u64().unwrap_or(60)),
                    malformed_rate: v["malformed_rate"].as_f64().unwrap_or(0.0),
                    oversize_rate: v["oversize_rate"].as_f64().unwrap_or(0.0),
                    oversize_bytes: v["oversize_bytes"].as_u64().unwrap_or(8 << 20) as usize,
                    reset_rate: v["reset_rate"].as_f64().unwrap_or(0.0),
                    listing_fail_after: v["listing_fail_after"].as_u64(),
                    auth_broken: v["auth_broken"].as_bool().unwrap_or(false),
                    listing_error_next: v["listing_error_next"].as_u64().unwrap_or(0) as u32,
                    listing_error_rate: v["listing_error_rate"].as_f64().unwrap_or(0.0),
                    page_cap: v["page_cap"].as_u64(),
                };
                self.set_faults(f);
                reply(StatusCode::OK, json!({"faults": "set"}))
            }
            "stats" => {
                let (jobs, projects) = (
                    self.ids(DocType::Job).len(),
                    self.ids(DocType::Project).len(),
                );
                reply(
                    StatusCode::OK,
                    json!({"total_gets": self.total_gets(), "listing_calls": self.listing_calls(),
                           "auth_failures": self.auth_failures(), "jobs": jobs, "projects": projects}),
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown control command"}),
            ),
        }
    }
}

/// One term of a listing's `filters` (all terms must hold, as in the Data
/// Extraction API's DevExtreme-style filter arrays; `"and"` between terms is
/// accepted and implied).
struct ListFilter {
    on_modified: bool,
    op: String,
    /// Normalised time for ModifiedOn, lower-case for ids; `None` is null.
    value: Option<String>,
}

impl ListFilter {
    fn matches(&self, modified: &str, id: &str) -> bool {
        let field = if self.on_modified { modified } else { id };
        let Some(v) = self.value.as_deref() else {
            // Every simulated row has both fields: `= null` never holds.
            return self.op == "<>";
        };
        match self.op.as_str() {
            ">=" => field >= v,
            ">" => field > v,
            "=" => field == v,
            "<=" => field <= v,
            "<" => field < v,
            _ => field != v,
        }
    }
}

impl ListFilter {
    /// Whether [`key_range`] applies this term exactly (no scan needed);
    /// `with_equal`: the filters also hold a `ModifiedOn =` term.
    fn is_range_term(&self, with_equal: bool) -> bool {
        match (self.on_modified, self.op.as_str(), self.value.is_some()) {
            (true, ">=" | ">" | "=" | "<=" | "<", true) => true,
            (true, "<>", false) => true, // every simulated row has a time
            (false, ">", true) => with_equal,
            _ => false,
        }
    }
}

/// The slice of the (ModifiedOn, id)-ordered index that the range terms
/// allow: bounds on ModifiedOn, and `id >` within a `ModifiedOn =` term.
fn key_range(index: &[(String, String)], filters: &[ListFilter]) -> (usize, usize) {
    let (mut lo, mut hi) = (0, index.len());
    let equal = filters
        .iter()
        .find(|f| f.on_modified && f.op == "=")
        .and_then(|f| f.value.clone());
    for f in filters {
        let Some(v) = f.value.as_deref() else {
            continue;
        };
        match (f.on_modified, f.op.as_str()) {
            (true, ">=") | (true, "=") => {
                lo = lo.max(index.partition_point(|(m, _)| m.as_str() < v))
            }
            (true, ">") => lo = lo.max(index.partition_point(|(m, _)| m.as_str() <= v)),
            _ => {}
        }
        match (f.on_modified, f.op.as_str()) {
            (true, "<=") | (true, "=") => {
                hi = hi.min(index.partition_point(|(m, _)| m.as_str() <= v))
            }
            (true, "<") => hi = hi.min(index.partition_point(|(m, _)| m.as_str() < v)),
            _ => {}
        }
        if let (false, ">", Some(t)) = (f.on_modified, f.op.as_str(), equal.as_deref()) {
            lo = lo.max(index.partition_point(|(m, id)| (m.as_str(), id.as_str()) <= (t, v)));
        }
    }
    (lo, hi.max(lo))
}

fn parse_filters(v: &Value, id_field: &str) -> Result<Vec<ListFilter>, String> {
    let mut out = Vec::new();
    let Some(terms) = v.as_array() else {
        return Ok(out);
    };
    for t in terms {
        if t.as_str().is_some_and(|s| s.eq_ignore_ascii_case("and")) {
            continue;
        }
        let Some([field, op, value]) = t.as_array().map(Vec::as_slice) else {
            return Err(format!("unsupported filter term {t}"));
        };
        let field = field.as_str().unwrap_or_default();
        let on_modified = field.eq_ignore_ascii_case("ModifiedOn");
        if !on_modified && !field.eq_ignore_ascii_case(id_field) {
            return Err(format!("cannot filter on {field}"));
        }
        let op = op.as_str().unwrap_or_default().to_string();
        if !matches!(op.as_str(), ">=" | ">" | "=" | "<=" | "<" | "<>") {
            return Err(format!("unsupported operator {op}"));
        }
        let value = match value {
            Value::Null => None,
            Value::String(s) if on_modified => Some(normalize_ts(s)),
            Value::String(s) => Some(s.to_ascii_lowercase()),
            other => return Err(format!("unsupported filter value {other}")),
        };
        out.push(ListFilter {
            on_modified,
            op,
            value,
        });
    }
    Ok(out)
}

trait IntoResponseFix {
    fn into_response_fix(self) -> Response;
}
impl<T: warp::Reply> IntoResponseFix for T {
    fn into_response_fix(self) -> Response {
        warp::Reply::into_response(self)
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    warp::reply::with_status(warp::reply::json(&body), status).into_response_fix()
}

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
    send_webhooks_with(client, url, secret, payloads, concurrency, rate).await
}

/// [`send_webhooks`] with a client of the caller's (e.g. one that trusts a
/// test certificate for HTTPS).
pub async fn send_webhooks_with(
    client: reqwest::Client,
    url: &str,
    secret: &str,
    payloads: Vec<Value>,
    concurrency: usize,
    rate: Option<f64>,
) -> SendReport {
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
    /// Send a webhook for every generated document to this URL (e.g. http://127.0.0.1:8080/skillsevent).
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// The X-Webhook-Secret to send.
    #[arg(
        long,
        env = "SKILLSYNC_SIM_WEBHOOK_SECRET",
        default_value = "demo-webhook-secret"
    )]
    pub webhook_secret: String,
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
        let payloads: Vec<Value> = jobs
            .iter()
            .map(|id| sim.webhook_payload(DocType::Job, id, "created"))
            .chain(
                projects
                    .iter()
                    .map(|id| sim.webhook_payload(DocType::Project, id, "created")),
            )
            .collect();
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
