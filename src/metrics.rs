//! Prometheus metrics: the recorder (installed once per process), the
//! counters and histograms the other modules bump through [`Metrics`], and
//! the gauges read from the database when `/metrics` is scraped (queue depth,
//! last reconciliation, drift, the last accuracy audit, database size), so they are true across
//! processes (`serve` and `reconcile` share the database, not memory).
//!
//! Every metric is described (HELP text, unit in the name) in [`describe`],
//! so the scrape passes `promtool check metrics`. The metrics listener's
//! routes (`/metrics`, a detailed `/healthz`) are with the other HTTP routes.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::Store;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// A handle to the process's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    handle: Option<PrometheusHandle>,
}

impl Metrics {
    /// Installs the recorder on first use (later calls share it).
    pub fn install() -> Metrics {
        let handle = HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        });
        Metrics {
            handle: handle.clone(),
        }
    }

    /// One webhook request and how it ended (accepted, ignored, unauthorized, …).
    pub fn webhook(&self, tenant: &str, outcome: &'static str) {
        counter!("skillsync_webhook_requests_total", "tenant" => tenant.to_string(), "outcome" => outcome).increment(1);
    }

    /// One upstream fetch: its outcome class and how long it took.
    pub fn fetch(
        &self,
        tenant: &str,
        doc_type: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        counter!("skillsync_fetches_total", "tenant" => tenant.to_string(), "type" => doc_type, "outcome" => outcome)
            .increment(1);
        histogram!("skillsync_fetch_duration_seconds", "tenant" => tenant.to_string(), "type" => doc_type)
            .record(elapsed.as_secs_f64());
    }

    /// One document stored, by what it did to the mirror.
    pub fn stored(&self, tenant: &str, doc_type: &'static str, outcome: &'static str) {
        counter!("skillsync_documents_stored_total", "tenant" => tenant.to_string(), "type" => doc_type, "outcome" => outcome)
            .increment(1);
    }

    /// One event that went dead.
    pub fn dead(&self, tenant: &str, doc_type: &'static str) {
        counter!("skillsync_dead_documents_total", "tenant" => tenant.to_string(), "type" => doc_type).increment(1);
    }

    /// One fetch's result discarded because its claim had lost its lease
    /// (`stage`: `renewal` when a renewal found the lease taken and the fetch
    /// stopped, `settle` when the settlement found it).
    pub fn fenced(&self, tenant: &str, doc_type: &'static str, stage: &'static str) {
        counter!("skillsync_fetch_fenced_total", "tenant" => tenant.to_string(), "type" => doc_type, "stage" => stage)
            .increment(1);
    }

    /// One 404/410 not recorded as a deletion because documents the mirror
    /// holds live answered 404 too.
    pub fn unconfirmed_gone(&self, tenant: &str, doc_type: &'static str) {
        counter!("skillsync_unconfirmed_gone_total", "tenant" => tenant.to_string(), "type" => doc_type)
            .increment(1);
    }

    /// One upstream request sent (a permit taken from the tenant's budget).
    pub fn upstream_request(&self, tenant: &str, priority: &'static str) {
        counter!("skillsync_upstream_requests_total", "tenant" => tenant.to_string(), "priority" => priority).increment(1);
    }

    /// One upstream answer 429 (Too Many Requests).
    pub fn upstream_throttled(&self, tenant: &str) {
        counter!("skillsync_upstream_throttled_total", "tenant" => tenant.to_string()).increment(1);
    }

    /// The 429 counter of a tenant at 0, before any 429.
    pub fn upstream_throttled_register(&self, tenant: &str) {
        counter!("skillsync_upstream_throttled_total", "tenant" => tenant.to_string()).increment(0);
    }

    /// The request rate the tenant's budget allows now (`+Inf`: no limit).
    pub fn upstream_allowed_rate(&self, tenant: &str, per_sec: f64) {
        gauge!("skillsync_upstream_allowed_requests_per_second", "tenant" => tenant.to_string())
            .set(per_sec);
    }

    /// Whether the PostgreSQL sink's session is up (connected, following).
    pub fn postgres_up(&self, up: bool) {
        gauge!("skillsync_postgres_up").set(if up { 1.0 } else { 0.0 });
    }

    /// One PostgreSQL sink batch and how it ended (`ok`, `failed`).
    pub fn postgres_batch(&self, outcome: &'static str) {
        counter!("skillsync_postgres_batches_total", "outcome" => outcome).increment(1);
    }

    /// Documents one sink batch wrote to PostgreSQL.
    pub fn postgres_documents_written(&self, n: u64) {
        counter!("skillsync_postgres_documents_written_total").increment(n);
    }

    /// How long the oldest change of a batch waited before PostgreSQL held it.
    pub fn postgres_sink_delay(&self, secs: f64) {
        histogram!("skillsync_postgres_sink_delay_seconds").record(secs);
    }

    /// Prometheus text, with the database-derived gauges refreshed first.
    pub async fn render(&self, store: &Store) -> String {
        match store.metrics_snapshot().await {
            Ok(snap) => {
                for r in snap.rows {
                    let l = |extra: &'static str, v: &str| {
                        [
                            ("tenant", r.tenant.clone()),
                            ("type", r.doc_type.as_str().to_owned()),
                            (extra, v.to_string()),
                        ]
                    };
                    gauge!("skillsync_queue_depth", &l("status", "pending_events"))
                        .set(r.pending_events as f64);
                    gauge!("skillsync_queue_depth", &l("status", "queued_fetches"))
                        .set(r.queued_fetches as f64);
                    gauge!("skillsync_queue_depth", &l("status", "retrying_fetches"))
                        .set(r.retrying_fetches as f64);
                    gauge!("skillsync_queue_depth", &l("status", "dead_events"))
                        .set(r.dead_events as f64);
                    let base = [
                        ("tenant", r.tenant.clone()),
                        ("type", r.doc_type.as_str().to_owned()),
                    ];
                    gauge!("skillsync_mirrored_documents", &base).set(r.mirrored as f64);
                    gauge!("skillsync_deleted_documents", &base).set(r.deleted as f64);
                    gauge!("skillsync_upstream_auth_failing_documents", &base)
                        .set(r.auth_failing as f64);
                    gauge!("skillsync_unconfirmed_gone_documents", &base)
                        .set(r.unconfirmed_gone as f64);
                    gauge!("skillsync_reconcile_missed_documents", &base)
                        .set(r.missed_total as f64);
                    if let Some(m) = r.last_run_missed {
                        gauge!("skillsync_reconcile_last_run_missed", &base).set(m as f64);
                    }
                    if let Some(t) = r
                        .last_ok_finished_at
                        .as_deref()
                        .and_then(crate::model::parse_upstream_ts)
                    {
                        gauge!("skillsync_reconcile_last_success_timestamp_seconds", &base)
                            .set(t.timestamp_millis() as f64 / 1000.0);
                    }
                    if let Some(t) = r
                        .oldest_pending_at
                        .as_deref()
                        .and_then(crate::model::parse_upstream_ts)
                    {
                        let age =
                            (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
                        gauge!("skillsync_oldest_pending_age_seconds", &base).set(age);
                    } else {
                        gauge!("skillsync_oldest_pending_age_seconds", &base).set(0.0);
                    }
                }
                for a in &snap.audits {
                    let base = [
                        ("tenant", a.tenant.clone()),
                        ("type", a.doc_type.as_str().to_owned()),
                    ];
                    let c = &a.counts;
                    gauge!("skillsync_audit_mismatches", &base).set(c.wrong() as f64);
                    gauge!("skillsync_audit_sampled_documents", &base).set(c.sampled as f64);
                    gauge!("skillsync_audit_unreadable_documents", &base).set(c.unreadable as f64);
                    if let Some(b) = c.accuracy_lower_bound {
                        gauge!("skillsync_audit_accuracy_lower_bound_ratio", &base).set(b);
                    }
                    if let Some(t) = crate::model::parse_upstream_ts(&a.finished_at) {
                        gauge!("skillsync_audit_last_finished_timestamp_seconds", &base)
                            .set(t.timestamp_millis() as f64 / 1000.0);
                    }
                }
                if let Ok(Some(lag)) = store.pg_lag().await {
                    let secs = lag.seconds(chrono::Utc::now());
                    gauge!("skillsync_postgres_lag_rows").set(lag.rows as f64);
                    gauge!("skillsync_postgres_lag_seconds").set(secs);
                }
                gauge!("skillsync_database_size_bytes").set(snap.db_bytes as f64);
                gauge!("skillsync_database_up").set(1.0);
                gauge!("skillsync_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: database not readable");
                gauge!("skillsync_database_up").set(0.0);
                gauge!("skillsync_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            }
        }
        self.handle.as_ref().map(|h| h.render()).unwrap_or_default()
    }
}

/// HELP text and unit of every metric this crate exports. Names carry their
/// unit (`_seconds`, `_bytes`) and only counters end in `_total`.
fn describe() {
    describe_counter!(
        "skillsync_webhook_requests_total",
        Unit::Count,
        "Webhook requests by tenant and outcome (accepted, ignored, unauthorized, bad_request, unavailable, ...)."
    );
    describe_counter!(
        "skillsync_fetches_total",
        Unit::Count,
        "Upstream document fetches by tenant, type and outcome (ok, gone, or the error class: auth, rate_limited, server, timeout, network, malformed, client)."
    );
    describe_histogram!(
        "skillsync_fetch_duration_seconds",
        Unit::Seconds,
        "Time one upstream document fetch took, in seconds."
    );
    describe_counter!(
        "skillsync_documents_stored_total",
        Unit::Count,
        "Fetched documents by what they did to the mirror (inserted, changed, unchanged, stale)."
    );
    describe_counter!(
        "skillsync_dead_documents_total",
        Unit::Count,
        "Documents whose events went dead after fetch.max_attempts failures."
    );
    describe_counter!(
        "skillsync_fetch_fenced_total",
        Unit::Count,
        "Fetch results discarded because the claim had lost its lease to another claim."
    );
    describe_counter!(
        "skillsync_unconfirmed_gone_total",
        Unit::Count,
        "404/410 answers not recorded as deletions because documents held live answered 404 too."
    );
    describe_counter!(
        "skillsync_upstream_requests_total",
        Unit::Count,
        "Upstream requests sent (document GETs, listing pages, control GETs), by tenant and priority (foreground: a webhook's fetch; background: reconciliation)."
    );
    describe_counter!(
        "skillsync_upstream_throttled_total",
        Unit::Count,
        "Upstream answers 429 (Too Many Requests), by tenant; each lowers that tenant's allowed rate and pauses it for the Retry-After."
    );
    describe_gauge!(
        "skillsync_upstream_allowed_requests_per_second",
        Unit::Count,
        "The request rate a tenant's budget allows now: max_requests_per_sec, or lower after a 429; +Inf when neither limits it."
    );
    describe_gauge!(
        "skillsync_queue_depth",
        Unit::Count,
        "Work waiting, by tenant, type and status (pending_events, queued_fetches, retrying_fetches, dead_events)."
    );
    describe_gauge!(
        "skillsync_mirrored_documents",
        Unit::Count,
        "Live (not deleted) documents in the mirror."
    );
    describe_gauge!(
        "skillsync_deleted_documents",
        Unit::Count,
        "Documents marked deleted upstream (kept, with deleted_at set)."
    );
    describe_gauge!(
        "skillsync_upstream_auth_failing_documents",
        Unit::Count,
        "Documents whose latest fetch failed with 401/403 (credentials need fixing)."
    );
    describe_gauge!(
        "skillsync_unconfirmed_gone_documents",
        Unit::Count,
        "Documents whose 404/410 was not recorded as a deletion because documents the mirror holds live answered 404 too (check job_path / project_path and app_user)."
    );
    describe_gauge!(
        "skillsync_reconcile_missed_documents",
        Unit::Count,
        "Changed documents no webhook had announced, summed over the recorded reconciliation runs (drift)."
    );
    describe_gauge!(
        "skillsync_reconcile_last_run_missed",
        Unit::Count,
        "Changed documents no webhook had announced, found by the latest reconciliation run (drift per run)."
    );
    describe_gauge!(
        "skillsync_reconcile_last_success_timestamp_seconds",
        Unit::Seconds,
        "When the last successful reconciliation finished, in Unix seconds."
    );
    describe_gauge!(
        "skillsync_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending event, in seconds (0 when none)."
    );
    describe_gauge!(
        "skillsync_audit_mismatches",
        Unit::Count,
        "Documents the last accuracy audit found wrong (stale, missing upstream, or wrongly deleted), by tenant and type; each was queued for a refetch."
    );
    describe_gauge!(
        "skillsync_audit_sampled_documents",
        Unit::Count,
        "Documents the last accuracy audit sampled, by tenant and type."
    );
    describe_gauge!(
        "skillsync_audit_unreadable_documents",
        Unit::Count,
        "Sampled documents the last accuracy audit could not read upstream (5xx, 429, timeout): counted neither right nor wrong."
    );
    describe_gauge!(
        "skillsync_audit_accuracy_lower_bound_ratio",
        Unit::Count,
        "One-sided 95% lower bound (0-1) on the share of live documents that are right, from the last accuracy audit's random sample."
    );
    describe_gauge!(
        "skillsync_audit_last_finished_timestamp_seconds",
        Unit::Seconds,
        "When the last accuracy audit of the tenant and type finished, in Unix seconds."
    );
    describe_gauge!(
        "skillsync_database_size_bytes",
        Unit::Bytes,
        "Size of the SQLite database file and its WAL, in bytes."
    );
    describe_gauge!(
        "skillsync_database_up",
        Unit::Count,
        "1 when the database could be read for this scrape, else 0."
    );
    describe_gauge!(
        "skillsync_postgres_lag_rows",
        Unit::Count,
        "Mirror changes in the SQLite outbox not yet acknowledged by PostgreSQL (only with [postgres])."
    );
    describe_gauge!(
        "skillsync_postgres_lag_seconds",
        Unit::Seconds,
        "Age of the oldest mirror change not yet in PostgreSQL, in seconds (0 when none; only with [postgres])."
    );
    describe_gauge!(
        "skillsync_postgres_up",
        Unit::Count,
        "1 while the PostgreSQL sink is connected and copying, 0 while it backs off or refuses."
    );
    describe_counter!(
        "skillsync_postgres_batches_total",
        Unit::Count,
        "PostgreSQL sink transactions by outcome (ok, failed)."
    );
    describe_counter!(
        "skillsync_postgres_documents_written_total",
        Unit::Count,
        "Document rows the PostgreSQL sink wrote after collapsing repeated changes."
    );
    describe_histogram!(
        "skillsync_postgres_sink_delay_seconds",
        Unit::Seconds,
        "Per sink batch: seconds from the oldest change's SQLite commit to its PostgreSQL commit."
    );
    describe_gauge!(
        "skillsync_build_info",
        Unit::Count,
        "Always 1; the version label says which skillsync is running."
    );
}
