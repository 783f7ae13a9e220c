//! Reconciliation: what makes the mirror complete when webhooks are lost.
//!
//! An incremental run lists documents modified since the watermark (minus an
//! overlap); a full sweep lists every id and finds deletion candidates. Both
//! only enqueue fetches — the fetch workers do the rest under the tenant's
//! one rate budget. [`plan`] decides, for one page, what to enqueue and what
//! counts as missed; it is pure and unit-tested alone.
//!
//! # Paging that cannot skip
//!
//! Offsets are never used: every request asks for the first `take` rows, in
//! (ModifiedOn, id) order, of a key range given by filters ([`Cursor`]):
//! `Start` (everything, or `ModifiedOn >= since`), `AtOrAfter(t)`
//! (`ModifiedOn >= t`), `Tie(t, i)` (`ModifiedOn = t AND id > i`) and
//! `After(t)` (`ModifiedOn > t`). Times and ids go back exactly as the server
//! listed them, so the server compares them with its own ordering.
//!
//! The argument. Call a document *stable* if it existed, unchanged, for the
//! whole run: its key k = (ModifiedOn, id) is fixed. Each cursor has a
//! frontier: `AtOrAfter(t)` covers keys from (t, -inf) on, `Tie(t, i)` the
//! keys after (t, i) with time t (then `After(t)`), `After(t)` the keys
//! after (t, +inf).
//! Invariant: every stable document whose key lies below the current
//! cursor's range has been read. It holds at `Start`. A server answers a
//! *prefix* of its range in key order (a page cap only shortens the prefix;
//! a lagging read replica answers from an older snapshot, which still holds
//! every stable document at its one key). So after a page whose last row is
//! (tl, il), every stable key in the range up to (tl, il) was in the page.
//! The next cursor is `AtOrAfter(tl)` — keys below (tl, -inf) were all in
//! the page or below the old range — or, when the whole page is one time
//! and `>= tl` would answer it again, `Tie(tl, il)`, whose range starts just
//! after the last key read. An empty tie range moves to `After(t)`. Edits,
//! creations and deletions during the run change other documents' keys, but
//! never a stable key or the range filters, so they cannot push a stable
//! document out of a range before it is read (an offset could: that was the
//! old bug). Progress: `AtOrAfter` is chosen only when the page spans two
//! times, so the frontier time grows; in a tie the id grows. A cursor that
//! would repeat itself (a server ignoring the id filter) fails the run
//! rather than loop.
//!
//! The end is an empty page, or a page holding all the `totalCount` rows
//! its request matched; a page shorter than `take` is not the end. Rows
//! read again at a boundary time are dropped by id ([`SeenIds`]), so `listed`
//! counts distinct ids and nothing is planned twice.
//!
//! Documents that change during the run are caught by their webhook, or by
//! the next incremental run: the watermark is the newest ModifiedOn listed
//! that is not after the run's start, so a document dated in the future
//! (skewed clock, typo) is mirrored, warned about, and never moves it.
//!
//! # Deletion needs evidence
//!
//! A live document a full sweep did not list is only a candidate: the valve
//! (`max_delete_fraction`) applies to the candidates before any GET, then
//! each is queued for a GET through the normal fetch path, and only a
//! 404/410 sets `deleted_at` (the fetcher also checks that documents the
//! mirror holds live are still served, so a wrong path cannot delete).
//!
//! # Failures
//!
//! A listing page that fails with 429 (honouring `Retry-After`, capped),
//! 5xx, a timeout, a reset or a malformed body is retried with backoff and
//! jitter at the same cursor; after `upstream.listing_retry_secs` of
//! failures the run fails with the page it reached. The run lock is
//! renewed every quarter of its lease between pages and while the run
//! waits (for a page, a `Retry-After`, a backoff), so no wait lets another
//! run take it. A run that loses its
//! lock (renewal fails or another process holds it) stops, queues nothing
//! more and advances nothing; counts are added after their writes commit.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TenantConfig};
use crate::model::{DocType, ErrorClass, IdSet, RunKind, RunStatus, fmt_ts, parse_upstream_ts};
use crate::store::Store;
use crate::store::{PageState, RunCounts, RunEnd, RunRef};
use crate::upstream::{CallError, ListField, ListFilter, ListPage, ListedDoc, Upstream};
use crate::wake::Wake;

/// How long a run lock lasts without renewal (see [`Reconciler::with_lock_lease`]).
/// A run renews it every quarter of this, between pages and while it waits
/// (for a page, a `Retry-After`, a backoff).
pub const LOCK_LEASE: Duration = Duration::from_secs(300);

/// [`RunKind`] under the name callers of the reconciler import it by.
pub use crate::model::RunKind as Kind;

/// What one page asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Documents to fetch, with the ModifiedOn the listing showed.
    pub enqueue: Vec<ListedDoc>,
    /// Documents found changed (or missing) that no queued fetch announced.
    pub missed: u64,
}

/// Decides one page: enqueue documents missing from the mirror, deleted
/// there, or newer upstream; count as missed the ones that needed a fetch no
/// webhook (or earlier run) had asked for.
///
/// Announced documents are enqueued too: a fetch already running may have
/// begun before the change the listing shows, and a recorded webhook may be
/// one a finished fetch already covered, so neither guarantees a fetch after
/// this change. Enqueueing a queued, unleased document only bumps its
/// generation (no extra fetch); a leased one is fetched once more.
pub fn plan(rows: &[ListedDoc], state: &PageState) -> Plan {
    let mut p = Plan::default();
    for row in rows {
        let needs = match state.mirror.get(&row.id) {
            None => true,
            Some(m) if m.deleted => true,
            Some(m) => match (&row.modified_on, &m.modified_on) {
                (Some(listed), Some(mirrored)) => listed > mirrored,
                (Some(_), None) => true,
                (None, _) => false,
            },
        };
        if !needs {
            continue;
        }
        if !state.queued.contains(&row.id) {
            p.missed += 1;
        }
        p.enqueue.push(row.clone());
    }
    p
}

/// Where the next listing request starts. Every request asks for the first
/// rows (no offset) of a key range in (ModifiedOn, id) order; see the module
/// doc for why this cannot skip a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// The first page: everything, or what was modified at or after the
    /// incremental start.
    Start(Option<String>),
    /// Modified at or after this time (the rows read at it are read again
    /// and dropped as duplicates).
    AtOrAfter(String),
    /// Modified exactly at this time (`None`: no time) with an id after
    /// this one: a tie group, paged by id.
    Tie(Option<String>, String),
    /// Modified after this time (`None`: has any time): past a tie group.
    After(Option<String>),
}

impl Cursor {
    /// The filter terms of the request for this cursor (times and ids as
    /// the server listed them, so it compares them its own way).
    pub fn filters(&self) -> Vec<ListFilter> {
        let modified = |op, value: Option<String>| ListFilter {
            field: ListField::Modified,
            op,
            value,
        };
        match self {
            Cursor::Start(None) => Vec::new(),
            Cursor::Start(Some(t)) | Cursor::AtOrAfter(t) => vec![modified(">=", Some(t.clone()))],
            Cursor::Tie(t, id) => vec![
                modified("=", t.clone()),
                ListFilter {
                    field: ListField::Id,
                    op: ">",
                    value: Some(id.clone()),
                },
            ],
            Cursor::After(Some(t)) => vec![modified(">", Some(t.clone()))],
            Cursor::After(None) => vec![modified("<>", None)],
        }
    }

    /// The cursor after `page` answered this one, or `None` when the
    /// listing is complete: an empty page, or one holding all `totalCount`
    /// rows its request matched. A short page is not the end (servers cap
    /// `take`).
    pub fn next(&self, page: &ListPage) -> Option<Cursor> {
        let (Some(first), Some(last)) = (page.rows.first(), page.rows.last()) else {
            // An empty tie group ends the tie, not the listing.
            return match self {
                Cursor::Tie(t, _) => Some(Cursor::After(t.clone())),
                _ => None,
            };
        };
        let complete = page
            .total_count
            .is_some_and(|total| page.rows.len() as u64 >= total);
        if let Cursor::Tie(t, _) = self {
            return Some(if complete {
                Cursor::After(t.clone())
            } else {
                Cursor::Tie(t.clone(), last.raw_id.clone())
            });
        }
        if complete {
            return None;
        }
        if first.modified_on == last.modified_on {
            // The whole page is one time: `>=` that time would answer the
            // same rows again, so page through the tie by id.
            Some(Cursor::Tie(
                last.raw_modified_on.clone(),
                last.raw_id.clone(),
            ))
        } else {
            match &last.raw_modified_on {
                Some(t) => Some(Cursor::AtOrAfter(t.clone())),
                // Rows without a time sorted last: page them by id.
                None => Some(Cursor::Tie(None, last.raw_id.clone())),
            }
        }
    }
}

/// Which listed rows a run has already seen. A full sweep keeps every id
/// (it needs them to find deletion candidates); an incremental run keeps
/// only the ids at the latest time, which is all a `>=` request re-reads.
struct SeenIds {
    all: Option<IdSet>,
    boundary_time: Option<String>,
    boundary: HashSet<String>,
}

impl SeenIds {
    fn new(kind: RunKind) -> SeenIds {
        SeenIds {
            all: (kind == RunKind::Full).then(IdSet::default),
            boundary_time: None,
            boundary: HashSet::new(),
        }
    }

    /// True the first time a row is seen (at this time, for an incremental run).
    fn first_time(&mut self, row: &ListedDoc) -> bool {
        if let Some(all) = &mut self.all {
            return all.insert(&row.id);
        }
        if row.modified_on != self.boundary_time {
            self.boundary_time = row.modified_on.clone();
            self.boundary.clear();
        }
        self.boundary.insert(row.id.clone())
    }
}

/// The watermark an incremental run is building: the newest ModifiedOn it
/// listed that is not after the run's start. Rows dated after the run began
/// do not move it: a clock running ahead (or a typo in 2096) would otherwise
/// hide every later change.
struct Watermark {
    /// The run's start, in table format.
    start: String,
    /// Rows dated after this are reported as dated in the future.
    future: String,
    newest: Option<String>,
}

impl Watermark {
    fn new(start_time: DateTime<Utc>) -> Watermark {
        Watermark {
            start: fmt_ts(start_time),
            future: fmt_ts(
                start_time + chrono::Duration::from_std(FUTURE_SLACK).unwrap_or_default(),
            ),
            newest: None,
        }
    }

    /// Takes a listed ModifiedOn into account.
    fn observe(&mut self, modified_on: &str) {
        if modified_on <= self.start.as_str()
            && self.newest.as_deref().is_none_or(|x| modified_on > x)
        {
            self.newest = Some(modified_on.to_string());
        }
    }

    /// Whether a ModifiedOn is dated in the future (beyond the clock slack).
    fn is_future(&self, modified_on: &str) -> bool {
        modified_on > self.future.as_str()
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// The `sync_runs` row.
    pub run_id: i64,
    pub tenant: String,
    pub doc_type: DocType,
    pub kind: RunKind,
    /// As `sync_runs.status` holds it ([`RunStatus::as_str`]).
    pub status: &'static str,
    #[serde(flatten)]
    pub counts: RunCounts,
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("a reconciliation of {0} {1}s is already running")]
    Busy(String, DocType),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
}

/// The longest a listing's `Retry-After` is honoured.
const MAX_LISTING_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The longest pause between retries of a failing listing page.
const MAX_LISTING_BACKOFF: Duration = Duration::from_secs(30);

/// How far ahead of the run's start a ModifiedOn may be before it is
/// reported as dated in the future (clocks differ a little).
const FUTURE_SLACK: Duration = Duration::from_secs(60);

/// How often a long listing logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Runs reconciliations; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    store: Store,
    upstream: Upstream,
    config: Arc<Config>,
    wake: Wake,
    owner: String,
    /// How long the run lock lasts without renewal: [`LOCK_LEASE`].
    lock_lease: Duration,
}

/// A run in progress: what every page step needs.
struct Run<'a> {
    tcfg: &'a TenantConfig,
    doc_type: DocType,
    kind: RunKind,
    force: bool,
    run_id: i64,
    lock: RunRef,
    start_time: DateTime<Utc>,
    shutdown: &'a CancellationToken,
}

impl Reconciler {
    pub fn new(
        store: Store,
        upstream: Upstream,
        config: Arc<Config>,
        wake: Wake,
        owner: String,
    ) -> Reconciler {
        Reconciler {
            store,
            upstream,
            config,
            wake,
            owner,
            lock_lease: LOCK_LEASE,
        }
    }

    /// This reconciler with run locks that last `lease` without renewal
    /// instead of [`LOCK_LEASE`] (renewed every quarter of it): a shorter
    /// lease hands a dead process's lock over sooner, at the cost of more
    /// renewals.
    pub fn with_lock_lease(mut self, lease: Duration) -> Reconciler {
        self.lock_lease = lease;
        self
    }

    fn lock_lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.lock_lease).unwrap_or(chrono::Duration::minutes(5))
    }

    /// Releases run locks this process holds (at stop).
    pub async fn release_locks(&self) {
        if let Err(e) = self.store.release_sync_locks(self.owner.clone()).await {
            tracing::warn!(error = %e, "could not release reconciliation locks; they expire on their own");
        }
    }

    /// One run for a tenant and type. Returns its summary (also written to
    /// `sync_runs`), or `Busy` when another run of the same tenant and type holds the lock.
    pub async fn run(
        &self,
        tenant: &str,
        doc_type: DocType,
        kind: RunKind,
        force: bool,
        shutdown: &CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let tcfg = self
            .config
            .tenant(tenant)
            .ok_or_else(|| RunError::UnknownTenant(tenant.to_string()))?
            .clone();
        let started = Instant::now();
        let start_time = Utc::now();
        let lease = self.lock_lease();
        if !self
            .store
            .acquire_sync_lock(
                tenant.to_string(),
                doc_type,
                self.owner.clone(),
                start_time,
                start_time + lease,
            )
            .await?
        {
            return Err(RunError::Busy(tenant.to_string(), doc_type));
        }
        let lock = RunRef {
            tenant: tenant.to_string(),
            doc_type,
            owner: self.owner.clone(),
        };
        let run_id = self.store.start_run(lock.clone(), kind, start_time).await?;
        let run = Run {
            tcfg: &tcfg,
            doc_type,
            kind,
            force,
            run_id,
            lock: lock.clone(),
            start_time,
            shutdown,
        };
        let mut counts = RunCounts::default();
        let result = self.list_and_enqueue(&run, &mut counts).await;
        let (status, error, watermark) = match result {
            Ok(w) => (
                RunStatus::Ok,
                None,
                if kind == RunKind::Incremental {
                    w
                } else {
                    None
                },
            ),
            Err(Failure::Interrupted) => (
                RunStatus::Interrupted,
                Some("stopped before the listing finished".to_string()),
                None,
            ),
            Err(Failure::LostLock) => (
                RunStatus::Failed,
                Some(
                    "lost the run lock to another process; nothing after that was recorded"
                        .to_string(),
                ),
                None,
            ),
            Err(Failure::Failed(e)) => (RunStatus::Failed, Some(e), None),
        };
        let finished = self
            .store
            .finish_run(
                run_id,
                lock,
                RunEnd {
                    status,
                    counts: counts.clone(),
                    error,
                    watermark,
                },
                Utc::now(),
            )
            .await?;
        counts.marked_deleted = self.store.run_marked_deleted(run_id).await?;
        let summary = RunSummary {
            run_id,
            tenant: tenant.to_string(),
            doc_type,
            kind,
            status: finished.status.as_str(),
            counts,
            error: finished.error,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        let c = &summary.counts;
        if finished.status == RunStatus::Ok {
            tracing::info!(
                tenant,
                doc_type = doc_type.as_str(),
                kind = kind.as_str(),
                listed = c.listed,
                enqueued = c.enqueued,
                missed = c.missed,
                candidates = c.candidates,
                duration_ms = summary.duration_ms,
                "reconciliation finished"
            );
        } else {
            tracing::error!(
                tenant,
                doc_type = doc_type.as_str(),
                kind = kind.as_str(),
                status = summary.status,
                listed = c.listed,
                enqueued = c.enqueued,
                error = summary.error.as_deref().unwrap_or(""),
                duration_ms = summary.duration_ms,
                "reconciliation did not finish"
            );
        }
        Ok(summary)
    }

    /// Starts one listing request in its own task, so the next page is on
    /// its way while the current one is compared with the mirror.
    fn request_page(
        &self,
        tcfg: &TenantConfig,
        doc_type: DocType,
        cursor: &Cursor,
    ) -> tokio::task::JoinHandle<Result<ListPage, CallError>> {
        let upstream = self.upstream.clone();
        let config = self.config.clone();
        let tcfg = tcfg.clone();
        let take = config.upstream.page_size;
        let filters = cursor.filters();
        tokio::spawn(async move {
            upstream
                .list_page(&config, &tcfg, doc_type, take, &filters)
                .await
        })
    }

    /// Extends the run lock; a lock another process now holds (or that
    /// cannot be renewed) ends the run before it writes anything more.
    async fn renew(&self, run: &Run<'_>) -> Result<(), Failure> {
        let until = Utc::now() + self.lock_lease();
        match self.store.renew_sync_lock(run.lock.clone(), until).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Failure::LostLock),
            Err(e) => {
                tracing::warn!(tenant = %run.lock.tenant, doc_type = run.doc_type.as_str(), error = %e, "cannot renew the run lock; stopping the run");
                Err(Failure::LostLock)
            }
        }
    }

    /// Awaits `fut` while keeping the run lock: renewed every quarter of
    /// the lease, so a long wait (a slow page, a `Retry-After`, a backoff)
    /// never lets it expire. Stops at shutdown or when the lock is lost.
    /// `last_renew` is when the lock was last renewed, and is kept current.
    async fn keeping_lock<T>(
        &self,
        run: &Run<'_>,
        last_renew: &mut Instant,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::pin!(fut);
        let every = self.lock_lease / 4;
        loop {
            let next = tokio::time::Instant::from_std(*last_renew + every);
            tokio::select! {
                _ = run.shutdown.cancelled() => return Err(Failure::Interrupted),
                v = &mut fut => return Ok(v),
                _ = tokio::time::sleep_until(next) => {
                    self.renew(run).await?;
                    *last_renew = Instant::now();
                }
            }
        }
    }

    /// Lists every page and queues what the mirror lacks; a full sweep then
    /// queues its deletion candidates for a confirming GET. Returns the
    /// watermark an incremental run may advance to.
    async fn list_and_enqueue(
        &self,
        run: &Run<'_>,
        counts: &mut RunCounts,
    ) -> Result<Option<String>, Failure> {
        let tenant = run.tcfg.name.clone();
        let doc_type = run.doc_type;
        let since = match run.kind {
            RunKind::Full => None,
            RunKind::Incremental => self
                .store
                .watermark(tenant.clone(), doc_type)
                .await
                .map_err(|e| Failure::Failed(e.to_string()))?
                .and_then(|w| parse_upstream_ts(&w))
                .map(|w| {
                    fmt_ts(w - chrono::Duration::seconds(self.config.upstream.overlap_secs as i64))
                }),
        };
        let retry_budget = Duration::from_secs(self.config.upstream.listing_retry_secs);
        let mut watermark = Watermark::new(run.start_time);
        let mut seen = SeenIds::new(run.kind);
        let mut last_renew = Instant::now();
        let mut last_progress = Instant::now();
        let mut pages: u64 = 0;
        let mut failing_since: Option<Instant> = None;
        let mut attempt: u32 = 0;
        let mut cursor = Cursor::Start(since);
        let mut request = self.request_page(run.tcfg, doc_type, &cursor);
        loop {
            let answer = match self.keeping_lock(run, &mut last_renew, &mut request).await {
                Ok(a) => a,
                Err(f) => {
                    request.abort();
                    return Err(f);
                }
            };
            if last_renew.elapsed() > self.lock_lease / 4 {
                self.renew(run).await?;
                last_renew = Instant::now();
            }
            let page = match answer {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    let retryable = matches!(
                        e.class,
                        ErrorClass::RateLimited
                            | ErrorClass::Server
                            | ErrorClass::Timeout
                            | ErrorClass::Network
                            | ErrorClass::Malformed
                    );
                    let failing = *failing_since.get_or_insert_with(Instant::now);
                    let left = retry_budget.saturating_sub(failing.elapsed());
                    if !retryable || left.is_zero() {
                        return Err(Failure::Failed(format!(
                            "listing failed at page {} (after {} documents){}: {e}",
                            pages + 1,
                            counts.listed,
                            if retryable {
                                format!(
                                    ", still failing after {} s of retries",
                                    failing.elapsed().as_secs()
                                )
                            } else {
                                String::new()
                            }
                        )));
                    }
                    attempt += 1;
                    if e.class == ErrorClass::RateLimited {
                        crate::fetcher::record_throttling(&self.upstream, &self.store, &tenant)
                            .await;
                    }
                    let delay = match e.retry_after {
                        Some(d) => d.min(MAX_LISTING_RETRY_AFTER),
                        None => crate::fetcher::jittered_backoff(
                            1.0,
                            MAX_LISTING_BACKOFF.as_secs_f64(),
                            attempt,
                        ),
                    }
                    .min(left);
                    tracing::warn!(
                        tenant = %tenant,
                        doc_type = doc_type.as_str(),
                        page = pages + 1,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %e,
                        "listing page failed; retrying that page"
                    );
                    self.keeping_lock(run, &mut last_renew, tokio::time::sleep(delay))
                        .await?;
                    request = self.request_page(run.tcfg, doc_type, &cursor);
                    continue;
                }
                Err(e) => return Err(Failure::Failed(format!("listing task failed: {e}"))),
            };
            failing_since = None;
            attempt = 0;
            pages += 1;
            let next = cursor.next(&page);
            if next.as_ref() == Some(&cursor) {
                return Err(Failure::Failed(format!(
                    "the listing made no progress at page {pages} ({cursor:?}): does the server accept filters on the id field?"
                )));
            }
            // Ask for the next page now, while this one is compared with the mirror.
            let following = next
                .as_ref()
                .map(|c| self.request_page(run.tcfg, doc_type, c));
            let processed = self
                .process_page(run, page, &mut seen, counts, &mut watermark)
                .await;
            if let Err(e) = processed {
                if let Some(f) = following {
                    f.abort();
                }
                return Err(e);
            }
            if last_progress.elapsed() > PROGRESS_EVERY {
                tracing::info!(tenant = %tenant, doc_type = doc_type.as_str(), kind = run.kind.as_str(), pages, listed = counts.listed, enqueued = counts.enqueued, "listing in progress");
                last_progress = Instant::now();
            }
            match (next, following) {
                (Some(c), Some(f)) => {
                    cursor = c;
                    request = f;
                }
                _ => break,
            }
        }
        if run.kind == RunKind::Full {
            self.queue_candidates(run, seen.all.unwrap_or_default(), counts)
                .await?;
        }
        Ok(watermark.newest)
    }

    /// Compares one page with the mirror and queues what it lacks.
    async fn process_page(
        &self,
        run: &Run<'_>,
        page: ListPage,
        seen: &mut SeenIds,
        counts: &mut RunCounts,
        watermark: &mut Watermark,
    ) -> Result<(), Failure> {
        let tenant = &run.lock.tenant;
        let rows: Vec<ListedDoc> = page
            .rows
            .into_iter()
            .filter(|r| seen.first_time(r))
            .collect();
        counts.listed += rows.len() as u64;
        for m in rows.iter().filter_map(|r| r.modified_on.as_deref()) {
            watermark.observe(m);
        }
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let state = self
            .store
            .page_state(tenant.clone(), run.doc_type, ids)
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?;
        let p = plan(&rows, &state);
        if p.enqueue.is_empty() {
            return Ok(());
        }
        for d in &p.enqueue {
            if let Some(m) = d.modified_on.as_deref().filter(|m| watermark.is_future(m)) {
                tracing::warn!(tenant = %tenant, doc_type = run.doc_type.as_str(), id = %d.id, modified_on = m, "document dated in the future: mirrored, but it does not move the watermark");
            }
        }
        let queued = self
            .store
            .enqueue_fetches(
                run.lock.clone(),
                p.enqueue
                    .into_iter()
                    .map(|d| (d.id, d.modified_on))
                    .collect(),
                None,
                Utc::now(),
            )
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?
            .ok_or(Failure::LostLock)?;
        counts.enqueued += queued;
        counts.missed += p.missed;
        if let Some(w) = self.wake.get(tenant) {
            w.notify_one();
        }
        Ok(())
    }

    /// A full sweep's end: live documents the listing did not show are
    /// deletion candidates. The valve applies to them before any GET; then
    /// each is queued for a GET, and only a 404/410 marks it deleted
    /// (counted in this run's `marked_deleted` by the fetch that confirms).
    async fn queue_candidates(
        &self,
        run: &Run<'_>,
        seen: IdSet,
        counts: &mut RunCounts,
    ) -> Result<(), Failure> {
        let tenant = run.lock.tenant.clone();
        let doc_type = run.doc_type;
        let (candidates, live) = self
            .store
            .unlisted_live_ids(tenant.clone(), doc_type, run.start_time, seen)
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?;
        let limit = (run.tcfg.max_delete_fraction * live as f64).floor() as u64;
        if candidates.len() as u64 > limit && !run.force {
            return Err(Failure::Failed(format!(
                "the sweep found {} of {} live {}s missing from the listing, more than max_delete_fraction {} allows; none was checked or marked (if this is right: skillsync reconcile --tenant {} --type {} --full --force)",
                candidates.len(),
                live,
                doc_type,
                run.tcfg.max_delete_fraction,
                tenant,
                doc_type
            )));
        }
        if candidates.is_empty() {
            return Ok(());
        }
        tracing::info!(tenant = %tenant, doc_type = doc_type.as_str(), candidates = candidates.len(), "documents missing from the full listing: queued for a GET that confirms or refutes each deletion");
        counts.candidates = self
            .store
            .enqueue_fetches(
                run.lock.clone(),
                candidates.into_iter().map(|id| (id, None)).collect(),
                Some(run.run_id),
                Utc::now(),
            )
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?
            .ok_or(Failure::LostLock)?;
        if let Some(w) = self.wake.get(&tenant) {
            w.notify_one();
        }
        Ok(())
    }

    /// The cron jobs of every tenant's reconciliation schedules, each type at
    /// its own offset ([`schedule_offset`]), for [`start_scheduler`]. Runs
    /// are tracked by `tasks` so a stop waits for them (and marks them
    /// interrupted).
    pub fn scheduled_jobs(
        &self,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Vec<tokio_cron_scheduler::Job>, tokio_cron_scheduler::JobSchedulerError> {
        let mut jobs = Vec::new();
        for t in &self.config.tenants {
            for (schedule, kind) in [
                (&t.reconcile_schedule, RunKind::Incremental),
                (&t.full_sweep_schedule, RunKind::Full),
            ] {
                let Some(schedule) = schedule else { continue };
                for doc_type in DocType::ALL {
                    let me = self.clone();
                    let tenant = t.name.clone();
                    let token = shutdown.clone();
                    let offset = schedule_offset(schedule, &t.name, doc_type, Utc::now());
                    jobs.push(offset_job(schedule, offset, shutdown, tasks, move || {
                        let (me, tenant, token) = (me.clone(), tenant.clone(), token.clone());
                        async move {
                            match me.run(&tenant, doc_type, kind, false, &token).await {
                                Ok(_) => {}
                                Err(RunError::Busy(..)) => tracing::info!(tenant = %tenant, doc_type = doc_type.as_str(), kind = kind.as_str(), "scheduled reconciliation skipped: another run is in progress"),
                                Err(e) => tracing::error!(tenant = %tenant, doc_type = doc_type.as_str(), error = %e, "scheduled reconciliation failed"),
                            }
                        }
                    })?);
                }
            }
        }
        Ok(jobs)
    }
}

/// One cron job of a schedule: on each tick of `schedule`, a task on
/// `tasks` waits `offset` ([`schedule_offset`]) and runs `work`, unless
/// `shutdown` comes first. Reconciliation and audit schedules both use it.
pub fn offset_job<F, Fut>(
    schedule: &str,
    offset: Duration,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
    work: F,
) -> Result<tokio_cron_scheduler::Job, tokio_cron_scheduler::JobSchedulerError>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let token = shutdown.clone();
    let tracker = tasks.clone();
    let work = Arc::new(work);
    tokio_cron_scheduler::Job::new_async(schedule, move |_id, _sched| {
        let (token, tracker, work) = (token.clone(), tracker.clone(), work.clone());
        Box::pin(async move {
            if token.is_cancelled() {
                return;
            }
            tracker.spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(offset) => work().await,
                }
            });
        })
    })
}

/// Starts one scheduler holding `jobs` (a config generation's
/// reconciliation and audit schedules); none when there are none.
pub async fn start_scheduler(
    jobs: Vec<tokio_cron_scheduler::Job>,
) -> anyhow::Result<Option<tokio_cron_scheduler::JobScheduler>> {
    if jobs.is_empty() {
        return Ok(None);
    }
    let sched = tokio_cron_scheduler::JobScheduler::new().await?;
    for job in jobs {
        sched.add(job).await?;
    }
    sched.start().await?;
    Ok(Some(sched))
}

/// The most a scheduled run starts after its cron tick ([`schedule_offset`]).
pub const MAX_SCHEDULE_OFFSET: Duration = Duration::from_secs(300);

/// How long after each tick of `schedule` the scheduled run of `tenant`'s
/// `doc_type` starts: fixed per tenant and type (an FNV-1a hash of both
/// names), below a quarter of the schedule's shortest gap between ticks and
/// below [`MAX_SCHEDULE_OFFSET`]. Every tenant on the default schedules
/// shares one cron tick; without the offset 200 tenants listed upstream at
/// the same second (BENCHMARKS.md §11c: 400 runs at once, peak RSS 187 MB,
/// intake at 2% of idle). Deterministic, so each tenant's runs stay evenly
/// spaced and a restart does not move them.
pub fn schedule_offset(
    schedule: &str,
    tenant: &str,
    doc_type: DocType,
    now: DateTime<Utc>,
) -> Duration {
    let Ok(cron) = crate::config::cron_parser().parse(schedule) else {
        return Duration::ZERO;
    };
    // The shortest gap between the next nine ticks (from a tick, not from
    // `now`, so the offset does not depend on when the daemon started).
    let Ok(mut at) = cron.find_next_occurrence(&now, false) else {
        return Duration::ZERO;
    };
    let mut gap: Option<Duration> = None;
    for _ in 0..8 {
        let Ok(next) = cron.find_next_occurrence(&at, false) else {
            break;
        };
        if let Ok(d) = (next - at).to_std() {
            gap = Some(gap.map_or(d, |g| g.min(d)));
        }
        at = next;
    }
    let gap = gap.unwrap_or(Duration::ZERO);
    let window = (gap / 4).min(MAX_SCHEDULE_OFFSET).as_millis() as u64;
    if window == 0 {
        return Duration::ZERO;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(doc_type.as_str().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Duration::from_millis(h % window)
}

enum Failure {
    Interrupted,
    /// Another process holds the run lock now.
    LostLock,
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MirrorState;

    /// 200 tenants on the default schedules start their runs spread over the
    /// window, each at the same offset every time; a schedule that ticks
    /// every second waits less than a quarter of a second.
    #[test]
    fn scheduled_runs_of_many_tenants_spread_out_deterministically() {
        let now = Utc::now();
        for (schedule, window) in [
            ("0 */15 * * * *", Duration::from_secs(225)),
            ("0 30 2 * * *", MAX_SCHEDULE_OFFSET),
            ("* * * * * *", Duration::from_millis(250)),
        ] {
            let mut per_second = std::collections::HashMap::<u64, usize>::new();
            for i in 0..200 {
                let tenant = format!("tenant-{i}");
                let o = schedule_offset(schedule, &tenant, DocType::Job, now);
                assert!(o < window, "{schedule}: {tenant} waits {o:?}");
                assert_eq!(
                    o,
                    schedule_offset(
                        schedule,
                        &tenant,
                        DocType::Job,
                        now + chrono::Duration::hours(5)
                    ),
                    "{schedule}: {tenant}'s offset moved"
                );
                *per_second.entry(o.as_secs()).or_default() += 1;
            }
            if window >= Duration::from_secs(60) {
                let most = per_second.values().max().copied().unwrap_or(0);
                assert!(most <= 6, "{schedule}: {most} tenants start in one second");
            }
        }
        assert_ne!(
            schedule_offset("0 */15 * * * *", "acme", DocType::Job, now),
            schedule_offset("0 */15 * * * *", "acme", DocType::Project, now),
            "the two types of one tenant start together"
        );
        assert_eq!(
            schedule_offset("not a cron", "acme", DocType::Job, now),
            Duration::ZERO
        );
    }

    fn row(id: &str, m: Option<&str>) -> ListedDoc {
        ListedDoc {
            id: id.into(),
            modified_on: m.map(str::to_string),
            raw_id: id.into(),
            raw_modified_on: m.map(str::to_string),
        }
    }

    #[test]
    fn plan_enqueues_missing_newer_and_deleted_only() {
        let t1 = "2026-11-01T00:00:00.000Z";
        let t2 = "2026-11-02T00:00:00.000Z";
        let mut state = PageState::default();
        state.mirror.insert(
            "same".into(),
            MirrorState {
                modified_on: Some(t2.into()),
                deleted: false,
            },
        );
        state.mirror.insert(
            "older".into(),
            MirrorState {
                modified_on: Some(t1.into()),
                deleted: false,
            },
        );
        state.mirror.insert(
            "gone".into(),
            MirrorState {
                modified_on: Some(t2.into()),
                deleted: true,
            },
        );
        state.mirror.insert(
            "queued".into(),
            MirrorState {
                modified_on: Some(t1.into()),
                deleted: false,
            },
        );
        state.queued.insert("queued".into());
        state.queued.insert("new-queued".into());
        let rows = vec![
            row("same", Some(t2)),
            row("older", Some(t2)),
            row("gone", Some(t2)),
            row("new", Some(t2)),
            row("queued", Some(t2)),
            row("new-queued", Some(t1)),
            row("no-time", None),
        ];
        let p = plan(&rows, &state);
        let ids: Vec<&str> = p.enqueue.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["older", "gone", "new", "queued", "new-queued", "no-time"]
        );
        assert_eq!(p.missed, 4, "announced documents are not missed");
    }

    #[test]
    fn plan_of_an_unchanged_page_is_empty() {
        let t = "2026-11-01T00:00:00.000Z";
        let mut state = PageState::default();
        state.mirror.insert(
            "a".into(),
            MirrorState {
                modified_on: Some(t.into()),
                deleted: false,
            },
        );
        assert_eq!(plan(&[row("a", Some(t))], &state), Plan::default());
    }

    fn page(rows: &[(&str, &str)], total: Option<u64>) -> ListPage {
        ListPage {
            rows: rows.iter().map(|(id, m)| row(id, Some(m))).collect(),
            total_count: total,
        }
    }

    #[test]
    fn a_page_spanning_times_continues_at_its_last_time() {
        let c = Cursor::Start(None);
        let p = page(&[("a", "t1"), ("b", "t2"), ("c", "t2")], Some(10));
        assert_eq!(c.next(&p), Some(Cursor::AtOrAfter("t2".into())));
    }

    #[test]
    fn a_page_of_one_time_pages_the_tie_by_id_then_moves_past_it() {
        let c = Cursor::AtOrAfter("t2".into());
        let p = page(&[("b", "t2"), ("c", "t2")], Some(10));
        let tie = c.next(&p);
        assert_eq!(tie, Some(Cursor::Tie(Some("t2".into()), "c".into())));
        let tie = tie.unwrap_or(c);
        assert_eq!(
            tie.filters().iter().map(|f| f.op).collect::<Vec<_>>(),
            vec!["=", ">"]
        );
        let p = page(&[("d", "t2")], Some(5));
        assert_eq!(
            tie.next(&p),
            Some(Cursor::Tie(Some("t2".into()), "d".into()))
        );
        // An empty tie page ends the tie, not the listing.
        assert_eq!(
            tie.next(&page(&[], Some(0))),
            Some(Cursor::After(Some("t2".into())))
        );
        // A tie page holding every match also ends the tie.
        assert_eq!(
            tie.next(&page(&[("d", "t2")], Some(1))),
            Some(Cursor::After(Some("t2".into())))
        );
    }

    #[test]
    fn a_short_page_is_not_the_end_but_an_empty_or_complete_one_is() {
        let c = Cursor::AtOrAfter("t1".into());
        // A server cap: 2 rows where 500 were asked, 9 match.
        let p = page(&[("a", "t1"), ("b", "t2")], Some(9));
        assert_eq!(c.next(&p), Some(Cursor::AtOrAfter("t2".into())));
        // No totalCount: only an empty page ends it.
        let p = page(&[("a", "t1"), ("b", "t2")], None);
        assert!(c.next(&p).is_some());
        assert_eq!(c.next(&page(&[], None)), None);
        assert_eq!(c.next(&page(&[("a", "t1"), ("b", "t2")], Some(2))), None);
    }

    #[test]
    fn the_watermark_is_the_newest_time_not_after_the_start() {
        let start = parse_upstream_ts("2026-11-02T00:00:00Z").unwrap_or_default();
        let mut w = Watermark::new(start);
        w.observe("2026-11-01T00:00:00.000Z");
        w.observe("2026-11-02T00:00:00.000Z");
        w.observe("2026-10-01T00:00:00.000Z");
        w.observe("2026-11-02T00:00:30.000Z");
        assert_eq!(w.newest.as_deref(), Some("2026-11-02T00:00:00.000Z"));
        assert!(!w.is_future("2026-11-02T00:00:30.000Z"), "within the slack");
        assert!(w.is_future("2096-11-02T00:00:00.000Z"));
    }

    #[test]
    fn an_incremental_run_drops_only_rows_read_again_at_the_boundary() {
        let mut seen = SeenIds::new(RunKind::Incremental);
        assert!(seen.first_time(&row("a", Some("t1"))));
        assert!(seen.first_time(&row("b", Some("t2"))));
        assert!(!seen.first_time(&row("b", Some("t2"))));
        // Edited during the run: a new time, read again.
        assert!(seen.first_time(&row("a", Some("t3"))));
        let mut full = SeenIds::new(RunKind::Full);
        assert!(full.first_time(&row("a", Some("t1"))));
        assert!(!full.first_time(&row("a", Some("t3"))));
    }
}
