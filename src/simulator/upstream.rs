//! The simulator as the Skills Workflow API: the documents it holds (with
//! the listing's (ModifiedOn, id) index), the faults to inject, the counters
//! tests read, the credentials check, 429 bursts and the per-tenant rate
//! limit every request goes through (with a log of when requests came), and
//! the single-document GET. The listing is in `listing`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value, json};
use warp::http::StatusCode;
use warp::reply::Response;

use super::{Simulator, reply};
use crate::model::{DocType, fmt_ts, normalize_ts};

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
    /// Per `X-AppTenant`: a request that finds this many already accepted
    /// in the trailing second gets 429 with `Retry-After: retry_after_secs`
    /// (refused requests do not count against the limit).
    pub rate_limit_per_sec: Option<f64>,
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
    /// Every listing row carries an extra `Padding` field of this many
    /// bytes, whatever `fields` asked for: an oversized or hostile page.
    pub listing_row_padding: usize,
    /// Every document GET answers 404, whether the document exists or not
    /// (what a wrong `job_path` looks like from the daemon).
    pub all_gone: bool,
}

/// One scripted answer to a document's next GET ([`Simulator::script_gets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scripted {
    /// How long the answer takes (after the usual latency).
    pub delay: Duration,
    /// 200 serves the document as it is then; any other status is sent
    /// with an error body (404: gone, whether it exists or not).
    pub status: u16,
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

/// One request the simulator received with valid credentials, for tests
/// and benchmarks that measure what an upstream sees.
#[derive(Debug, Clone)]
pub struct SimRequest {
    /// When it arrived.
    pub at: Instant,
    /// Its `X-AppTenant`.
    pub tenant: String,
    /// Whether it was answered 429.
    pub throttled: bool,
}

#[derive(Default)]
pub(super) struct State {
    /// Every authenticated request, in arrival order.
    requests: Vec<SimRequest>,
    /// Per `X-AppTenant`, when requests were accepted in the trailing second.
    accepted: HashMap<String, VecDeque<Instant>>,
    pub(super) docs: HashMap<(DocType, String), SimDoc>,
    /// Live documents ordered as the listing orders them.
    /// Per type, sorted by (ModifiedOn, id): a position is a binary search,
    /// so `totalCount` and a page cost O(log n + page), not O(n).
    pub(super) index: HashMap<DocType, Vec<(String, String)>>,
    pub(super) faults: Faults,
    gets: HashMap<(DocType, String), u64>,
    total_gets: u64,
    pub(super) listing_calls: u64,
    /// Listing pages answered since the faults were last set.
    pub(super) listing_pages_since_faults: u64,
    auth_failures: u64,
    seen_users: Vec<String>,
    last_modified: Option<chrono::DateTime<Utc>>,
    counter: u64,
    /// While set, the listing answers from this copy of `index` (a read
    /// replica lagging the single-document GETs).
    pub(super) listing_snapshot: Option<HashMap<DocType, Vec<(String, String)>>>,
    pub(super) listing_hook: Option<ListingHook>,
    /// Listing pages answered with 200, for the hook.
    pub(super) listing_pages: u64,
    /// Per document: how its next GETs answer, in order, before it is
    /// served normally again.
    scripts: HashMap<(DocType, String), VecDeque<Scripted>>,
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

const STAGES: [&str; 5] = ["Briefing", "In Progress", "Review", "Approved", "Closed"];
const CLIENTS: [&str; 4] = ["Northwind", "Contoso", "Fabrikam", "Tailspin"];

impl Simulator {
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

    /// The next GETs of one document answer as `answers` say, in order
    /// (then normally again): a slow 404 and then a 200, say, for a
    /// document that a fetch sees gone and the next one sees back.
    pub fn script_gets(&self, ty: DocType, id: &str, answers: &[Scripted]) {
        self.lock().scripts.insert(
            (ty, id.to_ascii_lowercase()),
            answers.iter().copied().collect(),
        );
    }

    /// Sets a live document's `ModifiedOn` (and its listing position) to
    /// `modified_on` without other changes: equal timestamps, clocks that
    /// run behind or ahead. Returns false if there is no such live document.
    pub fn set_modified_on(&self, ty: DocType, id: &str, modified_on: &str) -> bool {
        self.change(ty, id, |_, d| {
            if d.deleted {
                return false;
            }
            d.doc.insert("ModifiedOn".into(), json!(modified_on));
            d.modified_on = normalize_ts(modified_on);
            true
        })
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
        self.change(ty, id, |s, d| {
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
            true
        })
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
        self.change(ty, id, |_, d| {
            d.deleted = true;
            true
        })
    }

    /// Brings a deleted document back.
    pub fn undelete(&self, ty: DocType, id: &str) -> bool {
        self.change(ty, id, |_, d| {
            d.deleted = false;
            true
        })
    }

    /// Changes a copy of a stored document with `f` and puts it back (so the
    /// listing index follows), unless `f` returns false. Returns false if
    /// there is no such document or `f` declined.
    fn change(
        &self,
        ty: DocType,
        id: &str,
        f: impl FnOnce(&mut State, &mut SimDoc) -> bool,
    ) -> bool {
        let mut s = self.lock();
        let Some(mut d) = s.docs.get(&(ty, id.to_string())).cloned() else {
            return false;
        };
        if !f(&mut s, &mut d) {
            return false;
        }
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

    /// The `created` webhook bodies for `jobs`, then `projects` (what `demo`
    /// and `simulate` send for the documents they seeded).
    pub fn created_payloads(&self, jobs: &[String], projects: &[String]) -> Vec<Value> {
        let jobs = jobs.iter().map(|id| (DocType::Job, id));
        let projects = projects.iter().map(|id| (DocType::Project, id));
        jobs.chain(projects)
            .map(|(ty, id)| self.webhook_payload(ty, id, "created"))
            .collect()
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

    /// Takes one 429 from the burst, if any is left, or from the tenant's
    /// per-second limit; logs the request either way.
    fn take_rate_limit(&self, tenant: &str, arrived: Instant) -> Option<u64> {
        let mut s = self.lock();
        let refuse = if s.faults.rate_limit_next > 0 {
            s.faults.rate_limit_next -= 1;
            true
        } else if let Some(limit) = s.faults.rate_limit_per_sec {
            let window = s.accepted.entry(tenant.to_string()).or_default();
            while window
                .front()
                .is_some_and(|t| arrived.saturating_duration_since(*t) >= Duration::from_secs(1))
            {
                window.pop_front();
            }
            let full = window.len() as f64 >= limit;
            if !full {
                window.push_back(arrived);
            }
            full
        } else {
            false
        };
        s.requests.push(SimRequest {
            at: arrived,
            tenant: tenant.to_string(),
            throttled: refuse,
        });
        refuse.then_some(s.faults.retry_after_secs)
    }

    /// Every request with valid credentials so far, in arrival order.
    pub fn requests(&self) -> Vec<SimRequest> {
        self.lock().requests.clone()
    }

    /// What every request goes through first: `count` records it in the
    /// counters, then the latency, the credentials check, and a 429 from the
    /// current burst. `Ok` holds the faults as they were when the request
    /// came; `Err` is the refusal to send.
    pub(super) async fn gate(
        &self,
        headers: &warp::http::HeaderMap,
        count: impl FnOnce(&mut State),
    ) -> Result<Faults, Response> {
        let arrived = Instant::now();
        let faults = {
            let mut s = self.lock();
            count(&mut s);
            s.faults.clone()
        };
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        if !self.check_auth(headers) {
            return Err(reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid credentials"}),
            ));
        }
        let tenant = headers
            .get("x-apptenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some(after) = self.take_rate_limit(tenant, arrived) else {
            return Ok(faults);
        };
        let mut r = reply(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "rate limited"}),
        );
        if let Ok(v) = after.to_string().parse() {
            r.headers_mut().insert("retry-after", v);
        }
        Err(r)
    }

    pub(super) async fn get_document(
        self,
        ty: DocType,
        id: String,
        headers: warp::http::HeaderMap,
    ) -> Response {
        let counted = |s: &mut State| {
            s.total_gets += 1;
            *s.gets.entry((ty, id.to_ascii_lowercase())).or_default() += 1;
        };
        let faults = match self.gate(&headers, counted).await {
            Ok(faults) => faults,
            Err(refused) => return refused,
        };
        let scripted = self
            .lock()
            .scripts
            .get_mut(&(ty, id.to_ascii_lowercase()))
            .and_then(VecDeque::pop_front);
        if let Some(answer) = scripted {
            tokio::time::sleep(answer.delay).await;
            if answer.status != 200 {
                let code = StatusCode::from_u16(answer.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return reply(code, json!({"error": "scripted answer"}));
            }
        }
        if faults.all_gone {
            return reply(StatusCode::NOT_FOUND, json!({"error": "not found"}));
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
            return warp::Reply::into_response(warp::reply::with_status(
                "<html>upstream proxy error</html>",
                StatusCode::OK,
            ));
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
}
