//! `skillsync status`: reads the database read-only and tells a person or a
//! monitor the truth. Health rules (exit 1 when any holds): dead events,
//! upstream auth failing, 404s not trusted as deletions (the control
//! documents answered 404 too), the last reconciliation failed, the last
//! successful one is older than two schedule periods, or the last accuracy
//! audit found documents the mirror had wrong (until an audit finds none).
//! Exit 2 when the database cannot be read.
//!
//! Shows each tenant and type's last accuracy audit in plain words ("500
//! sampled, 0 wrong: at least 99.4% right (95% confidence)").
//!
//! Also says which tenants' upstreams refused requests with 429 in the last
//! hour (from the daemon's record): worth knowing, not unhealthy, since the
//! budget slows down and nothing is lost.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::{Config, cron_parser};
use crate::model::{RunStatus, parse_upstream_ts};
use crate::store::{AuditRow, ReadOnlyStore, StatusRow, Throttling};

/// How far back a 429 counts as "throttled recently".
const THROTTLED_WITHIN: chrono::Duration = chrono::Duration::hours(1);

/// `tenant`'s throttling, if its latest 429 is within the last hour.
fn recent_throttling<'a>(
    all: &'a [Throttling],
    tenant: &str,
    now: DateTime<Utc>,
) -> Option<&'a Throttling> {
    all.iter().find(|t| {
        t.tenant == tenant
            && parse_upstream_ts(&t.throttled_at).is_some_and(|at| now - at <= THROTTLED_WITHIN)
    })
}

/// Two periods of a cron schedule, measured at `now` (the gap between the
/// next two occurrences, doubled).
fn two_periods(schedule: &str, now: DateTime<Utc>) -> Option<chrono::Duration> {
    let cron = cron_parser().parse(schedule).ok()?;
    let a = cron.find_next_occurrence(&now, false).ok()?;
    let b = cron.find_next_occurrence(&a, false).ok()?;
    Some((b - a) * 2)
}

/// Why a row is unhealthy, if it is; `audit` is the row's last finished audit.
pub fn problems(
    row: &StatusRow,
    audit: Option<&AuditRow>,
    config: Option<&Config>,
    now: DateTime<Utc>,
) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(a) = audit.filter(|a| a.counts.wrong() > 0) {
        p.push(format!(
            "the last accuracy audit (finished {}) found {} document(s) the mirror had wrong ({} stale, {} missing upstream, {} wrongly deleted); refetches were queued; stays degraded until an audit finds none (skillsync verify)",
            a.finished_at,
            a.counts.wrong(),
            a.counts.stale,
            a.counts.missing,
            a.counts.wrongly_deleted
        ));
    }
    if row.dead_events > 0 || row.dead_documents > 0 {
        p.push(format!(
            "{} dead event(s) for {} document(s) (see: skillsync retry --dead)",
            row.dead_events, row.dead_documents
        ));
    }
    if row.auth_failing > 0 {
        p.push("upstream authentication failing (check app_tenant, app_id, app_secret)".into());
    }
    if row.unconfirmed_gone > 0 {
        p.push(format!(
            "{} document(s) answered 404 while documents the mirror holds live answer 404 too: no deletion recorded (check job_path / project_path and app_user)",
            row.unconfirmed_gone
        ));
    }
    if row.last_run_status == Some(RunStatus::Failed) {
        p.push(format!(
            "last reconciliation failed: {}",
            row.last_run_error.as_deref().unwrap_or("unknown error")
        ));
    }
    if let Some(tenant) = config.and_then(|c| c.tenant(&row.tenant)) {
        if let Some(schedule) = &tenant.reconcile_schedule {
            if let Some(limit) = two_periods(schedule, now) {
                let last = row
                    .last_ok_finished_at
                    .as_deref()
                    .and_then(parse_upstream_ts);
                match last {
                    Some(t) if now - t > limit => p.push(format!(
                        "last successful reconciliation was at {}, more than two schedule periods ago",
                        row.last_ok_finished_at.as_deref().unwrap_or("")
                    )),
                    _ => {}
                }
            }
        }
    }
    p
}

/// What `status` found; the CLI turns it into the exit code (0 healthy,
/// 1 degraded, 2 unreadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    Healthy,
    Degraded,
    /// The database could not be read.
    Unreadable,
}

/// Prints the status and says what it found.
pub fn print_status(path: &Path, config: Option<&Config>, as_json: bool) -> StatusOutcome {
    let read = ReadOnlyStore::open(path).and_then(|db| {
        let rebuild = db.report_rebuild()?;
        // A database from before schema 7 has no throttling table: nothing
        // recorded, not unreadable.
        let throttling = db.throttling().unwrap_or_default();
        // Before schema 8 there is no audits table: no audit yet.
        let audits = db.last_audits()?;
        Ok((db.status_rows()?, rebuild, throttling, audits))
    });
    let (rows, rebuild, throttling, audits) = match read {
        Ok(r) => r,
        Err(e) => {
            if as_json {
                println!(
                    "{}",
                    json!({"healthy": false, "error": e.to_string(), "tenants": []})
                );
            } else {
                eprintln!("skillsync status: cannot read {}: {e}", path.display());
            }
            return StatusOutcome::Unreadable;
        }
    };
    let now = Utc::now();
    let postgres = crate::pgmirror::status_of(path, config, now);
    let mut healthy = postgres.as_ref().is_none_or(|p| p.problem.is_none());
    let mut out = Vec::new();
    let audit_of = |r: &StatusRow| {
        audits
            .iter()
            .find(|a| a.tenant == r.tenant && a.doc_type == r.doc_type)
    };
    for r in &rows {
        let audit = audit_of(r);
        let problems = problems(r, audit, config, now);
        healthy &= problems.is_empty();
        let oldest = r
            .oldest_pending_at
            .as_deref()
            .and_then(parse_upstream_ts)
            .map(|t| (now - t).num_seconds().max(0));
        out.push(json!({
            "tenant": r.tenant,
            "type": r.doc_type,
            "mirrored": r.mirrored,
            "deleted": r.deleted,
            "pending": r.pending_events,
            "queued_fetches": r.queued_fetches,
            "retrying": r.retrying_fetches,
            "dead": r.dead_events,
            "oldest_pending_secs": oldest,
            "last_reconcile": r.last_run_status.as_ref().map(|s| json!({
                "kind": r.last_run_kind,
                "status": s,
                "finished_at": r.last_run_finished_at,
                "error": r.last_run_error,
            })),
            "last_success_at": r.last_ok_finished_at,
            "complete_as_of": r.complete_as_of,
            "drift": json!({"last_run_missed": r.last_run_missed, "missed_total": r.missed_total}),
            "upstream_auth_failing": r.auth_failing > 0,
            "unconfirmed_gone": r.unconfirmed_gone,
            "throttled_last_hour": recent_throttling(&throttling, &r.tenant, now).map(|t| json!({
                "throttled_at": t.throttled_at,
                "allowed_rate": t.allowed_rate,
                "refusals_total": t.refusals_total,
            })),
            "audit": audit.map(|a| json!({
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "sampled": a.counts.sampled,
                "matched": a.counts.matched,
                "stale": a.counts.stale,
                "missing": a.counts.missing,
                "wrongly_deleted": a.counts.wrongly_deleted,
                "refetched": a.counts.refetched,
                "unreadable": a.counts.unreadable,
                "in_flight": a.counts.in_flight,
                "bound_sample": a.counts.bound_sample,
                "accuracy_lower_bound": a.counts.accuracy_lower_bound,
                "error": a.error,
                "summary": crate::audit::summary(&a.counts),
            })),
            "problems": problems,
        }));
    }
    // Not a fault (the daemon is doing what a [reporting] change asks), but
    // reports read half-filled columns until it ends: say so, with progress.
    let rebuild_json = rebuild.as_ref().map(|st| {
        json!({
            "phase": st.phase,
            "done": st.done,
            "total": st.total,
            "started_at": st.started_at,
        })
    });
    if as_json {
        println!(
            "{}",
            json!({"healthy": healthy, "database": path.display().to_string(), "tenants": out, "postgres": postgres.as_ref().map(|p| p.json()), "report_rebuild": rebuild_json})
        );
    } else {
        println!("database: {}", path.display());
        println!(
            "{:<16} {:<8} {:>9} {:>8} {:>8} {:>9} {:>6} {:>12}  last reconciliation",
            "tenant", "type", "mirrored", "deleted", "pending", "retrying", "dead", "drift(total)"
        );
        for (r, o) in rows.iter().zip(&out) {
            let last = match (&r.last_run_kind, &r.last_run_status) {
                (Some(k), Some(s)) => format!(
                    "{k} {s} at {}",
                    r.last_run_finished_at.as_deref().unwrap_or("-")
                ),
                _ => "never".to_string(),
            };
            println!(
                "{:<16} {:<8} {:>9} {:>8} {:>8} {:>9} {:>6} {:>12}  {}",
                r.tenant,
                r.doc_type.as_str(),
                r.mirrored,
                r.deleted,
                r.pending_events,
                r.retrying_fetches,
                r.dead_events,
                r.missed_total,
                last
            );
            match audit_of(r) {
                Some(a) => println!(
                    "  accuracy audit at {}: {}{}",
                    a.finished_at,
                    crate::audit::summary(&a.counts),
                    a.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
                None if r.mirrored + r.deleted > 0 => {
                    println!("  accuracy audit: none yet (skillsync verify)")
                }
                None => {}
            }
            if let Some(ps) = o["problems"].as_array() {
                for p in ps {
                    println!("  ! {}", p.as_str().unwrap_or_default());
                }
            }
        }
        if rows.is_empty() {
            println!("(nothing mirrored yet)");
        }
        for t in &throttling {
            if recent_throttling(&throttling, &t.tenant, now).is_some() {
                let rate = t
                    .allowed_rate
                    .map_or("no limit".to_string(), |r| format!("{r:.1} requests/s"));
                println!(
                    "{}: throttled by upstream (429) in the last hour, latest at {}; allowed rate after it: {rate}",
                    t.tenant, t.throttled_at
                );
            }
        }
        if let Some(p) = &postgres {
            println!("{}", p.line());
        }
        if let Some(st) = &rebuild {
            println!(
                "report tables: rebuilding since {} for the [reporting] config ({} of {} rows, now: {}); job_report / project_report / *_stages may lack values until done",
                st.started_at,
                st.done,
                st.total.map_or("?".to_string(), |t| t.to_string()),
                st.phase
            );
        }
        println!("{}", if healthy { "healthy" } else { "DEGRADED" });
    }
    if healthy {
        StatusOutcome::Healthy
    } else {
        StatusOutcome::Degraded
    }
}
