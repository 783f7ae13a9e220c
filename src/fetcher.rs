//! Fetch workers: for each tenant, lease due documents from the queue (never
//! more than `fetch.concurrency` in flight, never one document twice), GET
//! them upstream, and settle the outcome in one write: store the document,
//! mark it gone, back off, or declare it dead.
//!
//! Webhook events and reconciliation share this path and the tenant's one
//! request budget ([`crate::budget`]): a webhook's fetch asks for its permit
//! in the foreground, a reconciliation's in the background. A 429 pauses
//! the whole tenant until its `Retry-After` and is recorded for `status`.
//! A worker claims no more documents than the budget can serve within the
//! lease, so a slow budget never lets a claimed lease run out.
//!
//! Fencing: every claim carries a token ([`Claim::lease`]). While a fetch
//! runs (waiting for a permit, for the tenant's control check, for
//! upstream) its lease is renewed every third of [`fetch_lease`]; a renewal
//! that finds the token gone stops the fetch, and a settlement whose token
//! the queue row no longer holds writes nothing. So one document is never
//! fetched by two claims at once with both results counting, and a late
//! 404 never marks deleted a document a newer fetch stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::Priority;
use crate::config::{Config, FetchConfig, TenantConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::model::{Claim, DocType, ErrorClass, get_ci, normalize_ts, parse_upstream_ts};
use crate::store::{FailureResult, FetchFailure, FetchedDoc, GoneOutcome, Store, StoreOutcome};
use crate::upstream::{Fetched, MAX_PERMIT_WAIT, Upstream};

/// How long fetches in flight may take to finish after a stop signal before
/// they are abandoned (their leases are released, so nothing is lost).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// The longest a `Retry-After` is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A 404/410 is trusted as a deletion when a GET of the same tenant and type
/// served a document this recently; otherwise a control GET decides.
const TRUST_WINDOW: Duration = Duration::from_secs(300);

/// How many live documents a control check GETs (any one served is enough).
const CONTROL_SAMPLE: usize = 3;

/// A control check that found the documents held live answering 404 too
/// stands this long for the tenant and type: the next 404s are not trusted
/// without another round of control GETs (a wrong path makes every fetch
/// a 404; one check answers for the storm).
const SUSPECT_WINDOW: Duration = Duration::from_secs(60);

/// At most one log line per tenant and type in this interval for 404s not
/// trusted as deletions, with how many there were.
pub const UNCONFIRMED_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long a claim's lease lasts without renewal: twice the request
/// timeout and 5 s. A fetch renews it every third of that while it runs,
/// so a long wait (a permit, the control check) never outlives it; a
/// process that dies leaves leases that expire this soon.
pub fn fetch_lease(f: &FetchConfig) -> Duration {
    Duration::from_secs(2 * f.timeout_secs + 5)
}

/// The 404s of one tenant and type not trusted as deletions since the
/// last log line about them.
#[derive(Default)]
struct Unconfirmed {
    /// When the last line was logged (`None`: never).
    logged_at: Option<Instant>,
    /// Since that line.
    count: u64,
    /// One of them, and the live document that answered 404 too.
    example: Option<(String, String)>,
}

/// Whether a 404/410 is evidence of a deletion.
enum GoneVerdict {
    /// Other documents are served: the document is gone.
    Trusted,
    /// Documents the mirror holds live answer 404 too (a wrong path, an
    /// `app_user` who cannot see them): not a deletion.
    Suspect { control: String },
    /// The control GET failed otherwise: decide on a later attempt.
    Undecided(crate::upstream::CallError),
}

/// Pulls the mirror's columns out of a fetched document.
pub fn extract(doc: &Map<String, Value>, u: &UpstreamConfig) -> FetchedDoc {
    let text = |fields: &[String]| {
        fields.iter().find_map(|f| match get_ci(doc, f) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    };
    let version = u.version_fields.iter().find_map(|f| match get_ci(doc, f) {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    });
    FetchedDoc {
        // serde_json's map is ordered by key, so equal content is equal text.
        document: Value::Object(doc.clone()).to_string(),
        number: text(&u.number_fields),
        name: text(&u.name_fields),
        modified_on: text(&u.modified_fields).map(|s| normalize_ts(&s)),
        version,
    }
}

/// The delay before attempt `attempts + 1`: exponential from
/// `retry_initial_secs`, capped at `retry_max_secs`, with "equal jitter"
/// (half fixed, half random) so a burst of failures does not retry in step.
pub fn backoff(f: &FetchConfig, attempts: u32) -> Duration {
    jittered_backoff(
        f.retry_initial_secs.max(1) as f64,
        f.retry_max_secs as f64,
        attempts,
    )
}

/// Exponential backoff with equal jitter: `initial_secs` doubled per
/// attempt after the first, capped at `max_secs`, then half fixed and half
/// random. Shared by fetch retries and listing-page retries.
pub fn jittered_backoff(initial_secs: f64, max_secs: f64, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let capped = (initial_secs * 2f64.powi(exp as i32)).min(max_secs);
    Duration::from_secs_f64(capped * (0.5 + 0.5 * fastrand::f64()))
}

/// Writes `tenant`'s latest throttling to the database for `status`, if
/// the budget has a note (at most one per 10 s per tenant).
pub async fn record_throttling(upstream: &Upstream, store: &Store, tenant: &str) {
    let Some(note) = upstream.budgets().take_note(tenant) else {
        return;
    };
    let ago = chrono::Duration::from_std(note.at.elapsed()).unwrap_or_default();
    let rate = note.allowed_rate.is_finite().then_some(note.allowed_rate);
    tracing::info!(
        tenant,
        refusals = note.refusals,
        allowed_rate = rate,
        "upstream throttling: the tenant's request rate was lowered"
    );
    if let Err(e) = store
        .record_throttling(tenant.to_string(), Utc::now() - ago, rate, note.refusals)
        .await
    {
        tracing::warn!(tenant, error = %e, "cannot record upstream throttling for status");
    }
}

/// Which of the tenant's waiting requests goes first: a webhook's fetch
/// before a reconciliation's.
fn priority(claim: &Claim) -> Priority {
    if claim.reason == "webhook" {
        Priority::Foreground
    } else {
        Priority::Background
    }
}

/// One tenant and type's control-check lock.
type ControlLock = Arc<tokio::sync::Mutex<()>>;

/// Runs fetches for every tenant of one process; shared by `serve`, `reconcile` and the demo.
pub struct Fetcher {
    store: Store,
    upstream: Upstream,
    config: Arc<Config>,
    metrics: Metrics,
    /// This process's lease owner name: leases it holds are released at stop.
    owner: String,
    /// Per tenant: no new fetch before this instant (set by a 429).
    paused_until: Mutex<HashMap<String, Instant>>,
    /// Per tenant and type: when a GET last served a document. A 404 soon
    /// after one is trusted without a control GET.
    last_served: Mutex<HashMap<(String, DocType), Instant>>,
    /// Per tenant and type, one control check at a time: the 404s of a
    /// sweep's candidates arrive `concurrency` at once, and one control GET
    /// answers for all of them. Per tenant, so one tenant's slow or failing
    /// upstream never makes another's fetches wait.
    control: Mutex<HashMap<(String, DocType), ControlLock>>,
    /// Per tenant and type: when a control check last found documents held
    /// live answering 404 too, and the one it named.
    suspect: Mutex<HashMap<(String, DocType), (Instant, String)>>,
    /// Per tenant and type: the 404s not trusted since the last log line.
    unconfirmed: Mutex<HashMap<(String, DocType), Unconfirmed>>,
}

impl Fetcher {
    pub fn new(
        store: Store,
        upstream: Upstream,
        config: Arc<Config>,
        metrics: Metrics,
    ) -> Arc<Fetcher> {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Arc::new(Fetcher {
            store,
            upstream,
            config,
            metrics,
            owner,
            paused_until: Mutex::new(HashMap::new()),
            last_served: Mutex::new(HashMap::new()),
            control: Mutex::new(HashMap::new()),
            suspect: Mutex::new(HashMap::new()),
            unconfirmed: Mutex::new(HashMap::new()),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn pause(&self, tenant: &str, until: Instant) {
        if let Ok(mut m) = self.paused_until.lock() {
            let e = m.entry(tenant.to_string()).or_insert(until);
            if *e < until {
                *e = until;
            }
        }
    }

    fn served(&self, tenant: &str, doc_type: DocType) {
        if let Ok(mut m) = self.last_served.lock() {
            m.insert((tenant.to_string(), doc_type), Instant::now());
        }
        if let Ok(mut m) = self.suspect.lock() {
            m.remove(&(tenant.to_string(), doc_type));
        }
    }

    /// The live document a recent control check saw answer 404, if one did
    /// within [`SUSPECT_WINDOW`].
    fn suspected(&self, tenant: &str, doc_type: DocType) -> Option<String> {
        let m = self.suspect.lock().ok()?;
        let (at, control) = m.get(&(tenant.to_string(), doc_type))?;
        (at.elapsed() < SUSPECT_WINDOW).then(|| control.clone())
    }

    /// The control-check lock of one tenant and type.
    fn control_lock(&self, tenant: &str, doc_type: DocType) -> ControlLock {
        match self.control.lock() {
            Ok(mut m) => m.entry((tenant.to_string(), doc_type)).or_default().clone(),
            // A poisoned map only loses the sharing: a lock of its own.
            Err(_) => Arc::default(),
        }
    }

    /// Counts one 404 not trusted as a deletion; logs one line per tenant
    /// and type per [`UNCONFIRMED_LOG_EVERY`] (the first at once), with the
    /// count since the last line, instead of a line per fetch.
    fn note_unconfirmed(&self, claim: &Claim, control: &str) {
        let key = (claim.tenant.clone(), claim.doc_type);
        let due = {
            let Ok(mut m) = self.unconfirmed.lock() else {
                return;
            };
            let u = m.entry(key).or_default();
            u.count += 1;
            u.example = Some((claim.doc_id.clone(), control.to_string()));
            u.logged_at
                .is_none_or(|t| t.elapsed() >= UNCONFIRMED_LOG_EVERY)
        };
        if due {
            self.log_unconfirmed(&claim.tenant, claim.doc_type);
        }
    }

    /// Logs the 404s of `tenant`'s `doc_type` not trusted since the last
    /// line, if any, and starts a new interval.
    fn log_unconfirmed(&self, tenant: &str, doc_type: DocType) {
        let (count, example, since) = {
            let Ok(mut m) = self.unconfirmed.lock() else {
                return;
            };
            let Some(u) = m.get_mut(&(tenant.to_string(), doc_type)) else {
                return;
            };
            if u.count == 0 {
                return;
            }
            let since = u.logged_at.map(|t| t.elapsed().as_secs());
            u.logged_at = Some(Instant::now());
            (std::mem::take(&mut u.count), u.example.take(), since)
        };
        let (id, control) = example.unwrap_or_default();
        tracing::error!(
            tenant,
            doc_type = doc_type.as_str(),
            count,
            since_last_line_secs = since,
            example_id = %id,
            control = %control,
            "404s not trusted as deletions: documents the mirror holds live answer 404 too (check job_path / project_path and app_user); they will be retried"
        );
    }

    /// Logs the counts of 404s not trusted whose interval has passed (the
    /// storm may have stopped: its last count still gets its line).
    fn flush_unconfirmed(&self, tenant: &str) {
        let due: Vec<DocType> = match self.unconfirmed.lock() {
            Ok(m) => m
                .iter()
                .filter(|((t, _), u)| {
                    t == tenant
                        && u.count > 0
                        && u.logged_at
                            .is_none_or(|at| at.elapsed() >= UNCONFIRMED_LOG_EVERY)
                })
                .map(|((_, ty), _)| *ty)
                .collect(),
            Err(_) => return,
        };
        for ty in due {
            self.log_unconfirmed(tenant, ty);
        }
    }

    fn served_recently(&self, tenant: &str, doc_type: DocType) -> bool {
        self.last_served.lock().is_ok_and(|m| {
            m.get(&(tenant.to_string(), doc_type))
                .is_some_and(|t| t.elapsed() < TRUST_WINDOW)
        })
    }

    /// Decides whether a 404/410 for `claim` is a deletion. A misconfigured
    /// path or a user who cannot see documents makes *every* GET answer 404,
    /// which would otherwise empty the mirror one fetch at a time: so unless
    /// a GET served a document of this tenant and type recently, a few
    /// documents the mirror holds live are fetched as a control, and the
    /// 404 stands only if one of them is served.
    async fn judge_gone(&self, tenant: &TenantConfig, claim: &Claim) -> GoneVerdict {
        if self.served_recently(&claim.tenant, claim.doc_type) {
            return GoneVerdict::Trusted;
        }
        if let Some(control) = self.suspected(&claim.tenant, claim.doc_type) {
            return GoneVerdict::Suspect { control };
        }
        let lock = self.control_lock(&claim.tenant, claim.doc_type);
        let _one_at_a_time = lock.lock().await;
        // Another fetch's control check may have just settled it.
        if self.served_recently(&claim.tenant, claim.doc_type) {
            return GoneVerdict::Trusted;
        }
        if let Some(control) = self.suspected(&claim.tenant, claim.doc_type) {
            return GoneVerdict::Suspect { control };
        }
        let sample = match self.store.control_sample(claim.key(), CONTROL_SAMPLE).await {
            Ok(s) => s,
            Err(e) => {
                return GoneVerdict::Undecided(crate::upstream::CallError {
                    class: ErrorClass::Server,
                    message: format!("cannot read the control sample: {e}"),
                    retry_after: None,
                });
            }
        };
        // Nothing else mirrored: nothing a wrong path could wrongly delete.
        let Some(first) = sample.first().cloned() else {
            return GoneVerdict::Trusted;
        };
        for id in sample {
            match self
                .upstream
                .get_document(&self.config, tenant, claim.doc_type, &id, priority(claim))
                .await
            {
                Fetched::Document(_) => {
                    self.served(&claim.tenant, claim.doc_type);
                    return GoneVerdict::Trusted;
                }
                Fetched::Gone(_) => continue,
                Fetched::Failed(e) => return GoneVerdict::Undecided(e),
            }
        }
        if let Ok(mut m) = self.suspect.lock() {
            m.insert(
                (claim.tenant.clone(), claim.doc_type),
                (Instant::now(), first.clone()),
            );
        }
        GoneVerdict::Suspect { control: first }
    }

    fn paused(&self, tenant: &str) -> Option<Duration> {
        let m = self.paused_until.lock().ok()?;
        let until = *m.get(tenant)?;
        until.checked_duration_since(Instant::now())
    }

    /// Works the tenant's queue until `shutdown`; with `until_idle`, returns
    /// as soon as nothing is in flight and nothing is due within `idle_horizon`.
    pub async fn run_tenant(
        self: Arc<Self>,
        tenant: String,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        until_idle: Option<Duration>,
    ) {
        let concurrency = self.config.fetch.concurrency;
        let lease = fetch_lease(&self.config.fetch);
        let mut inflight: JoinSet<()> = JoinSet::new();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.flush_unconfirmed(&tenant);
            // The slots in use now: fewer than `concurrency` while the
            // budget is slow (see `slots`).
            let slots = self.slots(&tenant, concurrency);
            let mut claimed_any = false;
            if self.paused(&tenant).is_none() && inflight.len() < slots {
                let want = slots - inflight.len();
                let now = Utc::now();
                let lease_until = now
                    + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(65));
                match self
                    .store
                    .claim(tenant.clone(), self.owner.clone(), want, now, lease_until)
                    .await
                {
                    Ok(claims) => {
                        claimed_any = !claims.is_empty();
                        for claim in claims {
                            let me = self.clone();
                            inflight.spawn(async move { me.fetch_one(claim).await });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %tenant, error = %e, "cannot claim queued documents")
                    }
                }
            }
            if claimed_any && inflight.len() < slots {
                continue; // more may be due right now
            }
            // Every slot busy: a finishing fetch wakes us, so skip asking the
            // database when the next document is due (that query scans the
            // tenant's whole queue; once per fetch it made big runs quadratic).
            let wait = if inflight.len() >= slots {
                Some(Duration::from_secs(1))
            } else {
                self.idle_wait(&tenant).await
            };
            if let Some(horizon) = until_idle {
                if inflight.is_empty()
                    && wait.is_none_or(|w| w > horizon)
                    && self.paused(&tenant).is_none()
                {
                    break;
                }
            }
            let wait = wait
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let wait = self
                .paused(&tenant)
                .map_or(wait, |p| p.min(Duration::from_secs(5)));
            // With every slot busy a webhook's wake-up changes nothing (a
            // finishing fetch wakes the loop): do not listen, so a burst of
            // events does not spin this loop once per event. The stored
            // permit wakes it at once when a slot is free again.
            let can_claim = inflight.len() < slots;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified(), if can_claim => {}
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Stop: let fetches in flight settle, within a deadline.
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            while inflight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(tenant = %tenant, left = inflight.len(), "fetches still in flight at the drain deadline; they will resume on next start");
            inflight.abort_all();
            while inflight.join_next().await.is_some() {}
        }
        // The last interval's count of untrusted 404s gets its line.
        for ty in DocType::ALL {
            self.log_unconfirmed(&tenant, ty);
        }
    }

    /// How many fetches may be in flight: `concurrency`, but no more than
    /// the budget gives permits for in half of [`MAX_PERMIT_WAIT`] (at least
    /// one), so a claimed document seldom waits long enough to be given back.
    fn slots(&self, tenant: &str, concurrency: usize) -> usize {
        match self.upstream.budgets().rate(tenant) {
            Some(r) => {
                let soon = (r * MAX_PERMIT_WAIT.as_secs_f64() / 2.0).floor() as usize;
                concurrency.min(soon.max(1))
            }
            None => concurrency,
        }
    }

    /// How long until the next queued document of the tenant is due
    /// (`None`: nothing queued).
    async fn idle_wait(&self, tenant: &str) -> Option<Duration> {
        match self.store.next_due(tenant.to_string()).await {
            Ok(Some(t)) => {
                let due = parse_upstream_ts(&t)?;
                Some((due - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            }
            Ok(None) => None,
            Err(_) => Some(Duration::from_secs(1)),
        }
    }

    /// Releases this process's leases (at stop) so another can take them at once.
    pub async fn release(&self) {
        match self.store.release_leases(self.owner.clone()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released leases of unfinished fetches"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release leases; they expire on their own")
            }
        }
    }

    /// Fetches and settles one claimed document, renewing its lease every
    /// third of [`fetch_lease`] until it is settled. A renewal that finds
    /// the lease taken by another claim stops the fetch: that claim owns the
    /// document now, and whatever this one would write is discarded.
    async fn fetch_one(&self, claim: Claim) {
        let lease = fetch_lease(&self.config.fetch);
        let every = lease / 3;
        let work = self.fetch_and_settle(&claim);
        tokio::pin!(work);
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut work => return,
                _ = renew.tick() => {
                    let until = Utc::now()
                        + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::minutes(1));
                    match self.store.renew_lease(claim.clone(), until).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let ty = claim.doc_type.as_str();
                            self.metrics.fenced(&claim.tenant, ty, "renewal");
                            tracing::warn!(tenant = %claim.tenant, doc_type = ty, id = %claim.doc_id, "lease lost during the fetch (another claim holds the document now): this fetch stops, its result is discarded");
                            return;
                        }
                        Err(e) => {
                            // The settlement is fenced anyway; try again at the next tick.
                            tracing::warn!(tenant = %claim.tenant, id = %claim.doc_id, error = %e, "cannot renew a fetch's lease");
                        }
                    }
                }
            }
        }
    }

    /// Discards a settlement whose claim lost its lease: counted and logged.
    fn fenced(&self, claim: &Claim, what: &str) {
        let ty = claim.doc_type.as_str();
        self.metrics.fenced(&claim.tenant, ty, "settle");
        tracing::warn!(tenant = %claim.tenant, doc_type = ty, id = %claim.doc_id, what, "fetch result discarded: its claim lost the lease to another claim");
    }

    async fn fetch_and_settle(&self, claim: &Claim) {
        let claim = claim.clone();
        let Some(tenant) = self.config.tenant(&claim.tenant) else {
            return;
        };
        let started = Instant::now();
        let result = self
            .upstream
            .get_document(
                &self.config,
                tenant,
                claim.doc_type,
                &claim.doc_id,
                priority(&claim),
            )
            .await;
        let elapsed = started.elapsed();
        let now = Utc::now();
        let t = claim.tenant.clone();
        let ty = claim.doc_type.as_str();
        match result {
            Fetched::Document(doc) => {
                self.metrics.fetch(&t, ty, "ok", elapsed);
                self.served(&t, claim.doc_type);
                let doc = extract(&doc, &self.config.upstream);
                match self.store.finish_stored(claim.clone(), doc, now).await {
                    Ok(StoreOutcome::Fenced) => self.fenced(&claim, "stored document"),
                    Ok(outcome) => {
                        let label = match outcome {
                            StoreOutcome::Inserted => "inserted",
                            StoreOutcome::Changed { .. } => "changed",
                            StoreOutcome::Unchanged => "unchanged",
                            StoreOutcome::Stale | StoreOutcome::Fenced => "stale",
                        };
                        self.metrics.stored(&t, ty, label);
                        tracing::debug!(tenant = %t, doc_type = ty, id = %claim.doc_id, outcome = label, "document stored");
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %t, doc_type = ty, id = %claim.doc_id, error = %e, "fetched document not stored; it will be fetched again")
                    }
                }
            }
            Fetched::Gone(code) => {
                self.metrics.fetch(&t, ty, "gone", elapsed);
                match self.judge_gone(tenant, &claim).await {
                    GoneVerdict::Trusted => {}
                    GoneVerdict::Suspect { control } => {
                        self.metrics.unconfirmed_gone(&t, ty);
                        self.note_unconfirmed(&claim, &control);
                        let err = crate::upstream::CallError {
                            class: ErrorClass::UnconfirmedGone,
                            message: format!(
                                "answered {code}, but so does {control}, which the mirror holds live: not recorded as a deletion (check job_path / project_path and app_user)"
                            ),
                            retry_after: None,
                        };
                        self.settle_failure(&claim, err, now).await;
                        return;
                    }
                    GoneVerdict::Undecided(err) => {
                        self.settle_failure(&claim, err, now).await;
                        return;
                    }
                }
                match self.store.finish_gone(claim.clone(), now).await {
                    Ok(GoneOutcome::Fenced) => self.fenced(&claim, "deletion"),
                    Ok(GoneOutcome::Superseded) => {
                        tracing::info!(tenant = %t, doc_type = ty, id = %claim.doc_id, status = code, "404 not recorded: a fetch after this one began stored the document")
                    }
                    Ok(outcome) => {
                        let marked = outcome == GoneOutcome::Marked;
                        tracing::info!(tenant = %t, doc_type = ty, id = %claim.doc_id, status = code, marked, "document gone upstream")
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %t, doc_type = ty, id = %claim.doc_id, error = %e, "deletion not recorded; it will be fetched again")
                    }
                }
            }
            Fetched::Failed(err) => {
                self.metrics.fetch(&t, ty, err.class.as_str(), elapsed);
                self.settle_failure(&claim, err, now).await;
            }
        }
    }

    /// Settles a failed fetch: back-off (a 429 pauses the whole tenant), or
    /// dead after `max_attempts`.
    async fn settle_failure(
        &self,
        claim: &Claim,
        err: crate::upstream::CallError,
        now: DateTime<Utc>,
    ) {
        let t = claim.tenant.clone();
        let ty = claim.doc_type.as_str();
        let rate_limited = err.class == ErrorClass::RateLimited;
        let delay = match err.retry_after {
            Some(d) => d.min(MAX_RETRY_AFTER),
            None => backoff(&self.config.fetch, claim.attempts + 1),
        };
        if rate_limited {
            self.pause(&t, Instant::now() + delay);
            record_throttling(&self.upstream, &self.store, &t).await;
        }
        let retry_at: DateTime<Utc> =
            now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
        let failure = FetchFailure {
            class: err.class,
            message: err.message.clone(),
            retry_at,
            counts: !rate_limited,
            max_attempts: self.config.fetch.max_attempts,
        };
        match self.store.finish_failed(claim.clone(), failure, now).await {
            Ok(FailureResult::Fenced) => self.fenced(claim, "failure"),
            Ok(FailureResult::Dead { attempts }) => {
                self.metrics.dead(&t, ty);
                tracing::error!(tenant = %t, doc_type = ty, id = %claim.doc_id, attempts, error = %err, "event dead: giving up on document (skillsync retry --dead puts it back)");
            }
            Ok(FailureResult::WillRetry { attempts }) => match err.class {
                ErrorClass::Auth => {
                    tracing::error!(tenant = %t, doc_type = ty, id = %claim.doc_id, attempts, error = %err, "upstream authentication failing: check app_tenant, app_id and app_secret")
                }
                // Logged once per interval with a count (`note_unconfirmed`).
                ErrorClass::UnconfirmedGone => {}
                _ => {
                    tracing::warn!(tenant = %t, doc_type = ty, id = %claim.doc_id, attempts, retry_in_secs = delay.as_secs(), error = %err, "fetch failed; will retry")
                }
            },
            Err(e) => {
                tracing::warn!(tenant = %t, error = %e, "failure not recorded; the lease will expire and the fetch repeat")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TestResult;

    #[test]
    fn extraction_is_case_insensitive_and_first_wins() -> TestResult {
        let cfg = Config::from_toml(&crate::config::EXAMPLE_CONFIG, None)?;
        let doc: Map<String, Value> = serde_json::from_str(
            r#"{"jobnumber": "J-1", "subject": "Brochure", "Job": "ignored", "MODIFIEDON": "2026-11-01T10:00:00", "Version": 7}"#,
        )?;
        let d = extract(&doc, &cfg.upstream);
        assert_eq!(d.number.as_deref(), Some("J-1"));
        assert_eq!(d.name.as_deref(), Some("Brochure"));
        assert_eq!(d.modified_on.as_deref(), Some("2026-11-01T10:00:00.000Z"));
        assert_eq!(d.version, Some(7));
        Ok(())
    }

    #[test]
    fn backoff_grows_and_caps() -> TestResult {
        let cfg = Config::from_toml(&crate::config::EXAMPLE_CONFIG, None)?;
        let f = &cfg.fetch;
        for _ in 0..50 {
            let d1 = backoff(f, 1).as_secs_f64();
            assert!((1.0..=2.0).contains(&d1), "{d1}");
            let d5 = backoff(f, 5).as_secs_f64();
            assert!((16.0..=32.0).contains(&d5), "{d5}");
            let d30 = backoff(f, 30).as_secs_f64();
            assert!((1800.0..=3600.0).contains(&d30), "{d30}");
        }
        Ok(())
    }
}
