//! The accuracy audit (`skillsync verify`, and each tenant's
//! `audit_schedule`): GETs a sample of the mirror's documents upstream,
//! compares each with the mirror by content, records an `audits` row, and
//! queues a refetch for every document it found wrong.
//!
//! **The sample** (per tenant and type, `audit_sample` documents, see
//! [`plan_sample`]): live documents picked uniformly at random; beyond
//! them a few of the most recently changed and of the longest unchanged
//! (where a lost webhook or a missed update would show first); and a few
//! documents marked deleted. When the sample is as large as the population,
//! every document is checked (a census).
//!
//! **What counts as what** (one GET per sampled document; the mirror's row
//! is read after the GET answered, so a fetch that lands meanwhile is seen):
//! - `matched`: live in the mirror and upstream serves the same content
//!   (compared as JSON values: key order, whitespace and number spelling do
//!   not matter, see [`same_content`]); or deleted in the mirror and upstream
//!   answers 404/410.
//! - `stale`: live in the mirror, upstream serves other content.
//! - `missing`: live in the mirror, upstream answers 404/410 (a deletion the
//!   mirror missed). Only when some live document of this audit was served:
//!   if every one answered 404 the path or `app_user` is likely wrong, and
//!   the 404s count as unreadable (the fetcher's control rule).
//! - `wrongly_deleted`: marked deleted in the mirror, upstream serves it.
//! - `in_flight`: different, but not a lie of the mirror: a fetch of it was
//!   queued (or a webhook recorded) when compared, the mirror's row changed
//!   during its GET, or upstream changed it less than [`RECENT_GRACE`] ago
//!   (its webhook may still be on the way; such a document is refetched
//!   anyway). Neither right nor wrong.
//! - `unreadable`: upstream did not answer usably (5xx, 429, timeout,
//!   reset, 401/403, a body that is not a JSON object, or no permit from
//!   the request budget in time). Neither right nor wrong; never a mismatch.
//!
//! Every `stale`, `missing` and `wrongly_deleted` document is queued for a
//! refetch through the ordinary fetch queue (`refetched`), which repairs it
//! (a `missing` one is marked deleted by the fetcher's own 404 rule).
//!
//! **The bound**: from the live documents picked at random (all live ones
//! in a census), the one-sided 95% Clopper–Pearson lower bound on the share
//! of live documents that are right ([`lower_bound`]). The targeted picks
//! and deleted ones are checked and repaired but are not a random sample,
//! so they are left out of it.
//!
//! **Cost**: at most one upstream GET per sampled document, each a
//! [`Priority::Background`] permit from the tenant's request budget (a
//! webhook's fetch goes first), [`CONCURRENCY`] at a time and at most
//! [`DEFAULT_MAX_RATE`] a second. Reads go through
//! the read pool; the writer sees one insert at the start, one write per
//! [`REFETCH_BATCH`] refetches, one update at the end.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Priority;
use crate::config::{Config, TenantConfig};
use crate::model::{DocType, fmt_ts};
use crate::store::{AuditCounts, MirrorView, SamplePlan};
use crate::store::{Store, StoreError};
use crate::upstream::{Fetched, Upstream};
use crate::wake::Wake;

/// The confidence of the bound.
pub const CONFIDENCE: f64 = 0.95;

/// Audit GETs in flight at once, per audit.
pub const CONCURRENCY: usize = 4;

/// The most GETs per second one audit sends by default (`verify
/// --max-rate` changes it for one run): an audit is background work, and
/// unpaced (thousands of GETs a second against a fast upstream) it doubled
/// the webhooks' p99 on a busy 2-core machine (BENCHMARKS.md §12). At this
/// pace the default sample of 500 takes 10 s per type.
pub const DEFAULT_MAX_RATE: f64 = 50.0;

/// A difference in a document upstream changed less than this long ago is
/// `in_flight`: its webhook may not have arrived yet.
pub const RECENT_GRACE: Duration = Duration::from_secs(120);

/// Refetches queued per write.
const REFETCH_BATCH: usize = 100;

/// What one audit of one tenant and type found.
#[derive(Debug, Clone)]
pub struct AuditReport {
    pub tenant: String,
    pub doc_type: DocType,
    pub audit_id: i64,
    pub counts: AuditCounts,
    /// Live and deleted documents when the sample was taken.
    pub live_total: u64,
    pub deleted_total: u64,
    /// The documents found wrong, with what was wrong (`stale`, `missing`,
    /// `wrongly_deleted`), in the order they were checked.
    pub found: Vec<(String, &'static str)>,
    /// The first upstream failure, for the operator.
    pub first_unreadable: Option<String>,
    /// Stopped before every sampled document was checked.
    pub interrupted: bool,
}

impl AuditReport {
    /// The audit's result in plain words: see [`summary`].
    pub fn summary(&self) -> String {
        summary(&self.counts)
    }
}

/// Why an audit did not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no tenant named `{0}` in the config")]
    UnknownTenant(String),
    #[error("an audit of {0} {1} is already running in this process")]
    Busy(String, DocType),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many of each kind an audit of `n` documents picks, given `live` and
/// `deleted` documents: everything when `n` covers them all; else about 5%
/// deleted ones (at least one when there are any), and of the live ones
/// 5% most recently changed, 5% longest unchanged and the rest (90%) at random.
pub fn plan_sample(n: usize, live: u64, deleted: u64) -> SamplePlan {
    let n = n as u64;
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    if n >= live + deleted {
        return SamplePlan {
            random: to_usize(live),
            deleted: to_usize(deleted),
            ..SamplePlan::default()
        };
    }
    let deleted_n = if deleted == 0 || n < 2 {
        0
    } else {
        deleted.min((n / 20).max(1))
    };
    let live_n = (n - deleted_n).min(live);
    if live_n == live {
        // Every live document fits: the rest of the sample goes to deleted ones.
        return SamplePlan {
            random: to_usize(live),
            deleted: to_usize(deleted.min(n - live)),
            ..SamplePlan::default()
        };
    }
    let k = live_n / 20;
    SamplePlan {
        random: to_usize(live_n - 2 * k),
        recent: to_usize(k),
        oldest: to_usize(k),
        deleted: to_usize(deleted_n),
    }
}

/// The one-sided lower confidence bound (Clopper–Pearson, exact binomial)
/// on a proportion, from `right` successes in `n` trials: the `p` at which
/// `right` or more successes have probability `1 - confidence`. `None` for
/// `n = 0`. With `right = n` it is `(1 - confidence)^(1/n)`: 500 of 500
/// right gives 0.99403.
pub fn lower_bound(right: u64, n: u64, confidence: f64) -> Option<f64> {
    if n == 0 || right > n {
        return None;
    }
    let alpha = 1.0 - confidence;
    if right == 0 {
        return Some(0.0);
    }
    if right == n {
        return Some(alpha.powf(1.0 / n as f64));
    }
    // P(X >= right) grows with p: bisect for the p where it equals alpha.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if upper_tail(right, n, mid) < alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// P(X >= k) for X ~ Binomial(n, p), summed in log space from k = n down
/// (the terms a high accuracy makes large), so it neither under- nor overflows.
fn upper_tail(k: u64, n: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return if k == 0 { 1.0 } else { 0.0 };
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // log pmf(n) = n ln p; pmf(j - 1) = pmf(j) * j / (n - j + 1) * q / p.
    let mut term = n as f64 * lp;
    let mut terms = Vec::with_capacity((n - k + 1) as usize);
    terms.push(term);
    let mut j = n;
    while j > k {
        term += (j as f64).ln() - ((n - j + 1) as f64).ln() + lq - lp;
        terms.push(term);
        j -= 1;
    }
    let max = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()).exp().min(1.0)
}

/// Whether two JSON values hold the same content: objects by their keys and
/// values (order never matters), arrays element by element, numbers by
/// value (`10`, `10.0` and `1e1` are equal), the rest exactly.
pub fn same_content(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_content(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_content(v, w))
        }
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
                return i == j;
            }
            if let (Some(i), Some(j)) = (x.as_u64(), y.as_u64()) {
                return i == j;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(i), Some(j)) => i == j,
                _ => false,
            }
        }
        _ => a == b,
    }
}

/// A percentage rounded down to one decimal, so it never claims more.
fn percent_floor(share: f64) -> String {
    format!("{:.1}", (share * 1000.0).floor() / 10.0)
}

/// An audit's result in plain words, e.g. "500 sampled, 0 wrong: at least
/// 99.4% right (95% confidence)". Says when the bound comes from the random
/// part of the sample only, and what was left uncounted.
pub fn summary(c: &AuditCounts) -> String {
    let mut s = format!("{} sampled, {} wrong", c.sampled, c.wrong());
    let checked = c.sampled - c.unreadable.min(c.sampled) - c.in_flight.min(c.sampled);
    match c.accuracy_lower_bound {
        Some(b) if c.bound_sample == checked => s.push_str(&format!(
            ": at least {}% right ({:.0}% confidence)",
            percent_floor(b),
            CONFIDENCE * 100.0
        )),
        Some(b) => s.push_str(&format!(
            ": at least {}% of live documents right ({:.0}% confidence, from the {} picked at random)",
            percent_floor(b),
            CONFIDENCE * 100.0,
            c.bound_sample
        )),
        None => s.push_str(" (no document picked at random could be checked: no bound)"),
    }
    if c.unreadable > 0 {
        s.push_str(&format!(
            "; {} not readable upstream (not counted)",
            c.unreadable
        ));
    }
    if c.in_flight > 0 {
        s.push_str(&format!(
            "; {} being updated when checked (not counted)",
            c.in_flight
        ));
    }
    if c.refetched > 0 {
        s.push_str(&format!("; {} queued for a refetch", c.refetched));
    }
    s
}

/// Why a document was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// At random among live documents: counts towards the bound.
    Random,
    /// Most recently changed or longest unchanged.
    Targeted,
    /// Marked deleted.
    Deleted,
}

/// What checking one document found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    Matched,
    Stale,
    Missing,
    WronglyDeleted,
    /// Different while the mirror was catching up; `refetch` when nothing
    /// queued will fetch it already.
    InFlight {
        refetch: bool,
    },
    Unreadable(String),
}

impl Finding {
    fn wrong_kind(&self) -> Option<&'static str> {
        match self {
            Finding::Stale => Some("stale"),
            Finding::Missing => Some("missing"),
            Finding::WronglyDeleted => Some("wrongly_deleted"),
            _ => None,
        }
    }
}

/// One checked document.
struct Checked {
    id: String,
    pick: Pick,
    finding: Finding,
    /// Live in the mirror and served upstream (evidence the path is right).
    served_live: bool,
}

/// Runs audits; cheap to clone. Shares the pipeline's store, upstream
/// client (and so the request budgets) and wake-ups.
#[derive(Clone)]
pub struct Auditor {
    store: Store,
    upstream: Upstream,
    config: Arc<Config>,
    wake: Wake,
    /// Audits running in this process, so a schedule never overlaps itself.
    running: Arc<Mutex<HashSet<(String, DocType)>>>,
    /// The most GETs per second one audit sends; `None`: unpaced.
    max_rate: Option<f64>,
}

/// Takes a tenant and type out of [`Auditor::running`] when the audit ends.
struct AuditSlot {
    set: Arc<Mutex<HashSet<(String, DocType)>>>,
    key: (String, DocType),
}

impl Drop for AuditSlot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

impl Auditor {
    pub fn new(store: Store, upstream: Upstream, config: Arc<Config>, wake: Wake) -> Auditor {
        Auditor {
            store,
            upstream,
            config,
            wake,
            running: Arc::default(),
            max_rate: Some(DEFAULT_MAX_RATE),
        }
    }

    /// This auditor with another pace: at most `max_rate` GETs per second
    /// per audit (`None`, or not a positive number: unpaced).
    pub fn with_max_rate(mut self, max_rate: Option<f64>) -> Auditor {
        self.max_rate = max_rate.filter(|r| r.is_finite() && *r > 0.0);
        self
    }

    /// One audit of `tenant`'s `doc_type`, sampling `sample` documents (the
    /// tenant's `audit_sample` when `None`). Stops early (recording what it
    /// checked) when `shutdown` is cancelled.
    pub async fn audit(
        &self,
        tenant: &str,
        doc_type: DocType,
        sample: Option<usize>,
        shutdown: &CancellationToken,
    ) -> Result<AuditReport, AuditError> {
        let key = (tenant.to_string(), doc_type);
        let _running = {
            let mut set = self
                .running
                .lock()
                .map_err(|_| AuditError::Busy(tenant.to_string(), doc_type))?;
            if !set.insert(key.clone()) {
                return Err(AuditError::Busy(tenant.to_string(), doc_type));
            }
            AuditSlot {
                set: self.running.clone(),
                key,
            }
        };
        let Some(tcfg) = self.config.tenant(tenant).cloned() else {
            return Err(AuditError::UnknownTenant(tenant.to_string()));
        };
        let n = sample.unwrap_or(tcfg.audit_sample as usize);
        let started = Utc::now();
        let audit_id = self
            .store
            .start_audit(tenant.to_string(), doc_type, started)
            .await?;
        let mut report = AuditReport {
            tenant: tenant.to_string(),
            doc_type,
            audit_id,
            counts: AuditCounts::default(),
            live_total: 0,
            deleted_total: 0,
            found: Vec::new(),
            first_unreadable: None,
            interrupted: false,
        };
        let result = self.sample_and_check(&tcfg, n, &mut report, shutdown).await;
        let error = match &result {
            Err(e) => Some(format!("audit failed: {e}")),
            Ok(()) if report.interrupted => {
                Some("stopped before every sampled document was checked".to_string())
            }
            Ok(()) => None,
        };
        self.store
            .finish_audit(audit_id, report.counts.clone(), error, Utc::now())
            .await?;
        result?;
        let c = &report.counts;
        if c.wrong() > 0 {
            let ids: Vec<String> = report
                .found
                .iter()
                .take(5)
                .map(|(id, kind)| format!("{id} ({kind})"))
                .collect();
            tracing::warn!(
                tenant,
                doc_type = doc_type.as_str(),
                stale = c.stale,
                missing = c.missing,
                wrongly_deleted = c.wrongly_deleted,
                refetched = c.refetched,
                first = %ids.join(", "),
                "accuracy audit found documents the mirror had wrong; refetches queued: {}",
                report.summary()
            );
        } else {
            tracing::info!(
                tenant,
                doc_type = doc_type.as_str(),
                sampled = c.sampled,
                unreadable = c.unreadable,
                in_flight = c.in_flight,
                "accuracy audit: {}",
                report.summary()
            );
        }
        Ok(report)
    }

    async fn sample_and_check(
        &self,
        tcfg: &TenantConfig,
        n: usize,
        report: &mut AuditReport,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let (tenant, doc_type) = (report.tenant.clone(), report.doc_type);
        let (live, deleted) = self
            .store
            .audit_population(tenant.clone(), doc_type)
            .await?;
        let plan = plan_sample(n, live, deleted);
        let sample = self
            .store
            .audit_sample(tenant.clone(), doc_type, plan)
            .await?;
        report.live_total = sample.live_total;
        report.deleted_total = sample.deleted_total;
        let picks: Vec<(String, Pick)> = sample
            .random
            .into_iter()
            .map(|id| (id, Pick::Random))
            .chain(
                sample
                    .recent
                    .into_iter()
                    .chain(sample.oldest)
                    .map(|id| (id, Pick::Targeted)),
            )
            .chain(sample.deleted.into_iter().map(|id| (id, Pick::Deleted)))
            .collect();
        let tcfg = Arc::new(tcfg.clone());
        let mut checked = Vec::with_capacity(picks.len());
        let mut inflight: JoinSet<Checked> = JoinSet::new();
        let mut picks = picks.into_iter();
        let mut pace = self.max_rate.map(|r| {
            let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            while inflight.len() < CONCURRENCY && !shutdown.is_cancelled() {
                let Some((id, pick)) = picks.next() else {
                    break;
                };
                if let Some(p) = pace.as_mut() {
                    p.tick().await;
                }
                let me = self.clone();
                let tcfg = tcfg.clone();
                inflight.spawn(async move { me.check(&tcfg, doc_type, id, pick).await });
            }
            match inflight.join_next().await {
                Some(Ok(c)) => checked.push(c),
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) => {}
                None => break,
            }
        }
        report.interrupted = picks.next().is_some();
        // Every live document answered 404: a wrong path or app_user, not
        // deletions (the fetcher's control rule); nothing is marked.
        if !checked.iter().any(|c| c.served_live) {
            for c in checked.iter_mut() {
                if c.finding == Finding::Missing {
                    c.finding = Finding::Unreadable(
                        "answered 404 like every live document sampled: not counted as missing (check job_path / project_path and app_user)".into(),
                    );
                }
            }
        }
        let counts = &mut report.counts;
        let mut refetch = Vec::new();
        for c in &checked {
            counts.sampled += 1;
            match &c.finding {
                Finding::Matched => counts.matched += 1,
                Finding::Stale => counts.stale += 1,
                Finding::Missing => counts.missing += 1,
                Finding::WronglyDeleted => counts.wrongly_deleted += 1,
                Finding::InFlight { refetch: again } => {
                    counts.in_flight += 1;
                    if *again {
                        refetch.push(c.id.clone());
                    }
                }
                Finding::Unreadable(why) => {
                    counts.unreadable += 1;
                    if report.first_unreadable.is_none() {
                        report.first_unreadable = Some(format!("{}: {why}", c.id));
                    }
                }
            }
            let counted = matches!(
                c.finding,
                Finding::Matched | Finding::Stale | Finding::Missing | Finding::WronglyDeleted
            );
            if c.pick == Pick::Random && counted {
                counts.bound_sample += 1;
                if c.finding != Finding::Matched {
                    counts.bound_wrong += 1;
                }
            }
            if let Some(kind) = c.finding.wrong_kind() {
                report.found.push((c.id.clone(), kind));
                refetch.push(c.id.clone());
            }
        }
        counts.accuracy_lower_bound = lower_bound(
            counts.bound_sample - counts.bound_wrong,
            counts.bound_sample,
            CONFIDENCE,
        );
        for batch in refetch.chunks(REFETCH_BATCH) {
            report.counts.refetched += self
                .store
                .queue_audit_refetches(tenant.clone(), doc_type, batch.to_vec(), Utc::now())
                .await?;
        }
        if report.counts.refetched > 0 {
            if let Some(w) = self.wake.get(&tenant) {
                w.notify_one();
            }
        }
        Ok(())
    }

    /// GETs one document, then reads the mirror's row and compares.
    async fn check(
        &self,
        tcfg: &TenantConfig,
        doc_type: DocType,
        id: String,
        pick: Pick,
    ) -> Checked {
        let started = Utc::now();
        let got = self
            .upstream
            .get_document(&self.config, tcfg, doc_type, &id, Priority::Background)
            .await;
        let view = self
            .store
            .audit_view(tcfg.name.clone(), doc_type, id.clone())
            .await;
        let (finding, served_live) = match view {
            Ok(Some(view)) => self.judge(&got, &view, &fmt_ts(started)),
            Ok(None) => (Finding::Unreadable("no longer in the mirror".into()), false),
            Err(e) => (
                Finding::Unreadable(format!("cannot read the mirror: {e}")),
                false,
            ),
        };
        Checked {
            id,
            pick,
            finding,
            served_live,
        }
    }

    /// The finding on one document from its GET and the mirror's row read
    /// after it (`started`: when the GET began, table format).
    fn judge(&self, got: &Fetched, view: &MirrorView, started: &str) -> (Finding, bool) {
        let live = view.deleted_at.is_none();
        let (wrong, served_live) = match (got, live) {
            (Fetched::Failed(e), _) => return (Finding::Unreadable(e.to_string()), false),
            (Fetched::Gone(_), false) => return (Finding::Matched, false),
            (Fetched::Document(_), false) => (Finding::WronglyDeleted, false),
            (Fetched::Gone(_), true) => (Finding::Missing, false),
            (Fetched::Document(doc), true) => {
                let upstream = Value::Object(doc.clone());
                let same = serde_json::from_str::<Value>(&view.document)
                    .is_ok_and(|mirror| same_content(&upstream, &mirror));
                if same {
                    return (Finding::Matched, true);
                }
                (Finding::Stale, true)
            }
        };
        let changed_during = view.fetched_at.as_str() >= started
            || view.deleted_at.as_deref().is_some_and(|d| d >= started);
        if view.pending || changed_during {
            return (Finding::InFlight { refetch: false }, served_live);
        }
        if let Fetched::Document(doc) = got {
            let upstream_modified = crate::fetcher::extract(doc, &self.config.upstream).modified_on;
            let recent = upstream_modified
                .as_deref()
                .and_then(crate::model::parse_upstream_ts)
                .is_some_and(|t| {
                    (Utc::now() - t).to_std().unwrap_or(Duration::ZERO) < RECENT_GRACE
                });
            let newer = match (&upstream_modified, &view.modified_on) {
                (Some(u), Some(m)) => u > m,
                (Some(_), None) => true,
                _ => false,
            };
            if recent && newer {
                return (Finding::InFlight { refetch: true }, served_live);
            }
        }
        (wrong, served_live)
    }

    /// The cron jobs of every tenant's `audit_schedule`, for
    /// [`crate::reconcile::start_scheduler`]: each firing audits both types
    /// in turn, at the tenant's offset after the tick (spread like
    /// reconciliation: every tenant's default is one tick). Runs are tracked
    /// by `tasks` so a stop waits for them (an audit stops early on
    /// `shutdown` and records what it checked).
    pub fn scheduled_jobs(
        &self,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Vec<tokio_cron_scheduler::Job>, tokio_cron_scheduler::JobSchedulerError> {
        let audited = self
            .config
            .tenants
            .iter()
            .filter_map(|t| Some((t.name.clone(), t.audit_schedule.as_deref()?)));
        audited
            .map(|(tenant, schedule)| {
                let (me, token) = (self.clone(), shutdown.clone());
                let offset =
                    crate::reconcile::schedule_offset(schedule, &tenant, DocType::Job, Utc::now());
                crate::reconcile::offset_job(schedule, offset, shutdown, tasks, move || {
                    let (me, tenant, token) = (me.clone(), tenant.clone(), token.clone());
                    async move { me.audit_both(&tenant, &token).await }
                })
            })
            .collect()
    }

    /// A scheduled firing: both types in turn, each outcome logged.
    async fn audit_both(&self, tenant: &str, token: &CancellationToken) {
        for doc_type in DocType::ALL {
            if token.is_cancelled() {
                return;
            }
            match self.audit(tenant, doc_type, None, token).await {
                Ok(_) => {}
                Err(AuditError::Busy(..)) => {
                    tracing::info!(tenant = %tenant, doc_type = doc_type.as_str(), "scheduled audit skipped: the previous one is still running")
                }
                Err(e) => {
                    tracing::error!(tenant = %tenant, doc_type = doc_type.as_str(), error = %e, "scheduled audit failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_bound_of_500_right_of_500_is_99_4_percent() {
        let b = lower_bound(500, 500, 0.95).unwrap_or_default();
        assert!((b - 0.99403).abs() < 1e-5, "{b}");
        assert_eq!(percent_floor(b), "99.4");
        assert_eq!(lower_bound(0, 0, 0.95), None);
        assert_eq!(lower_bound(0, 10, 0.95), Some(0.0));
    }

    /// Checked against the exact binomial: at the bound, P(X >= right) is 5%,
    /// and the bound lies below the observed share.
    #[test]
    fn the_bound_solves_the_binomial_tail_and_stays_below_the_share() {
        for (right, n) in [
            (9u64, 10u64),
            (190, 200),
            (180, 200),
            (1, 3),
            (999, 1000),
            (49_000, 50_000),
        ] {
            let b = lower_bound(right, n, 0.95).unwrap_or_default();
            assert!(b < right as f64 / n as f64, "{right}/{n}: {b}");
            let tail = upper_tail(right, n, b);
            assert!(
                (tail - 0.05).abs() < 1e-6,
                "{right}/{n}: tail {tail} at {b}"
            );
        }
        // Known values (the exact binomial tail, summed in Python's integers):
        // 180 of 200 gives 0.85801; 9 of 10 gives 0.60584.
        let b = lower_bound(180, 200, 0.95).unwrap_or_default();
        assert!((b - 0.85801).abs() < 1e-5, "{b}");
        let b = lower_bound(9, 10, 0.95).unwrap_or_default();
        assert!((b - 0.60584).abs() < 1e-5, "{b}");
    }

    #[test]
    fn content_compares_by_value_not_text() {
        let a: Value = serde_json::from_str(r#"{"b": [1, 2.5, {"x": null}], "a": "s", "n": 10}"#)
            .unwrap_or_default();
        let b: Value = serde_json::from_str(
            "{\n  \"a\": \"s\",\n  \"n\": 10.0,\n  \"b\": [1.0, 25e-1, {\"x\": null}]\n}",
        )
        .unwrap_or_default();
        assert!(same_content(&a, &b));
        for other in [
            json!({"b": [1, 2.5, {"x": null}], "a": "s", "n": 11}),
            json!({"b": [2.5, 1, {"x": null}], "a": "s", "n": 10}),
            json!({"b": [1, 2.5, {"x": null}], "a": "S", "n": 10}),
            json!({"b": [1, 2.5, {"x": null}], "a": "s", "n": 10, "extra": 1}),
            json!({"b": [1, 2.5, {}], "a": "s", "n": 10}),
            json!({"b": [1, 2.5, {"x": null}], "a": "s", "n": "10"}),
        ] {
            assert!(!same_content(&a, &other), "{other}");
        }
    }

    #[test]
    fn the_plan_takes_everything_when_it_fits_else_mostly_random() {
        assert_eq!(
            plan_sample(2000, 1998, 2),
            SamplePlan {
                random: 1998,
                deleted: 2,
                ..SamplePlan::default()
            }
        );
        assert_eq!(
            plan_sample(500, 100_000, 3_000),
            SamplePlan {
                random: 429,
                recent: 23,
                oldest: 23,
                deleted: 25
            }
        );
        assert_eq!(
            plan_sample(200, 2000, 0),
            SamplePlan {
                random: 180,
                recent: 10,
                oldest: 10,
                deleted: 0
            }
        );
        // Every live one fits, the deleted ones do not all.
        assert_eq!(
            plan_sample(100, 90, 50),
            SamplePlan {
                random: 90,
                deleted: 10,
                ..SamplePlan::default()
            }
        );
        assert_eq!(
            plan_sample(1, 10, 10),
            SamplePlan {
                random: 1,
                ..SamplePlan::default()
            }
        );
        for (n, live, deleted) in [(500, 100_000, 3_000), (37, 1000, 1), (2, 5, 5)] {
            let p = plan_sample(n, live, deleted);
            assert_eq!(
                p.random + p.recent + p.oldest + p.deleted,
                n,
                "{n} {live} {deleted}"
            );
        }
    }

    #[test]
    fn the_summary_says_it_in_plain_words() {
        let c = AuditCounts {
            sampled: 500,
            matched: 500,
            bound_sample: 500,
            accuracy_lower_bound: lower_bound(500, 500, 0.95),
            ..AuditCounts::default()
        };
        assert_eq!(
            summary(&c),
            "500 sampled, 0 wrong: at least 99.4% right (95% confidence)"
        );
        let c = AuditCounts {
            sampled: 200,
            matched: 185,
            stale: 2,
            unreadable: 13,
            refetched: 2,
            bound_sample: 170,
            bound_wrong: 1,
            accuracy_lower_bound: lower_bound(169, 170, 0.95),
            ..AuditCounts::default()
        };
        let s = summary(&c);
        assert!(s.starts_with("200 sampled, 2 wrong: at least 97."), "{s}");
        assert!(s.contains("from the 170 picked at random"), "{s}");
        assert!(s.contains("13 not readable upstream (not counted)"), "{s}");
        assert!(s.contains("2 queued for a refetch"), "{s}");
    }
}
