//! `skillsync migrate`: what this binary will do to a database before the
//! operator switches to it (`--dry-run`: read-only, safe beside a running
//! `serve` of any version), or doing it now while the service is stopped.
//!
//! The plan (migrations, report-table rebuild, row counts) comes from
//! [`crate::store::upgrade_plan`]; this module turns the row counts into a rough
//! time and prints it. The estimate is rows × a per-row cost measured on a
//! small VM (see the constants): an order of magnitude, which is what
//! deciding between "just restart" and "plan a window" needs.
//!
//! Exit codes: 0 nothing to do (or, without `--dry-run`, done); 1 work is
//! pending (`--dry-run` only); 2 this binary cannot use the database (newer
//! schema, unreadable, not a skillsync database) or the config cannot be
//! loaded, or (without `--dry-run`) a `serve` seems to be running on it.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::config::Config;
use crate::reporting::ReportSpec;
use crate::store::StoreError;
use crate::store::{RebuildReason, ReportWork};
use crate::store::{UpgradePlan, upgrade_plan as plan};

/// Seconds per row of a table a migration reads whole (an index build over
/// `events`). Measured: migration 5's partial index over 1,000,000 events
/// (~200-byte payloads) built in 0.8 s by a debug build on the project's
/// 2-core VM under load; a release build is no slower.
const SCAN_SECS_PER_ROW: f64 = 0.7e-6;

/// Seconds per document the report rebuild reads (parse the JSON, write its
/// values row), release build. Issue 22 measured 1.8 s for 100,000 jobs and
/// 300,000 history rows; a debug build here spent 1.5 times as long per
/// document as per revision (5.6 s for the 100,000 documents alone, 11.0 s
/// more for the 300,000 revisions), which splits the 1.8 s into 6 µs per
/// document and 4 µs per revision.
const REBUILD_SECS_PER_DOCUMENT: f64 = 6e-6;

/// Seconds per history revision the rebuild reads when the stage rule
/// changed (parse the JSON, write its `document_stages` row); see
/// [`REBUILD_SECS_PER_DOCUMENT`].
const REBUILD_SECS_PER_REVISION: f64 = 4e-6;

/// Seconds per row the PostgreSQL backfill copies (documents and history
/// rows alike): 100,000 documents of ~2 KB in 8.0 s on loopback
/// (BENCHMARKS.md, the postgres bench).
const BACKFILL_SECS_PER_ROW: f64 = 80e-6;

/// Rows per write of a rebuild that `migrate` runs to the end itself.
const REBUILD_BATCH: usize = 5_000;

/// A `serve` writes its health probe every 5 s: one written this recently
/// means a daemon may be running on the database.
const PROBE_FRESH: chrono::Duration = chrono::Duration::seconds(30);

/// The work of one step and its estimated time.
struct Step {
    what: String,
    secs: f64,
    /// Runs after serve is ready, without delaying webhooks.
    background: bool,
}

fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_secs(s: f64) -> String {
    if s < 0.1 {
        "under 0.1 s".into()
    } else if s < 60.0 {
        format!("about {s:.1} s")
    } else {
        format!("about {:.0} min", s / 60.0)
    }
}

/// The steps of a plan with their estimates, in the order they run;
/// `postgres`: the config has a `[postgres]` section.
fn steps(plan: &UpgradePlan, postgres: bool) -> Vec<Step> {
    let mut out = Vec::new();
    for m in &plan.migrations {
        let rows: u64 = m.scans.iter().map(|(_, n)| n).sum();
        let reads = if m.scans.is_empty() {
            "no table read whole".to_string()
        } else {
            m.scans
                .iter()
                .map(|(t, n)| format!("reads {t} ({} rows)", fmt_count(*n)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(Step {
            what: format!("migration {} {}: {}; {reads}", m.version, m.name, m.summary),
            secs: rows as f64 * SCAN_SECS_PER_ROW,
            background: false,
        });
    }
    let docs = plan.rows.jobs + plan.rows.projects;
    match &plan.report.clone() {
        ReportWork::UpToDate => {}
        ReportWork::Views => out.push(Step {
            what: "report views recreated (their SQL changed; no rows read)".into(),
            secs: 0.0,
            background: false,
        }),
        ReportWork::Resume { done, total } => out.push(Step {
            what: format!(
                "report tables: the rebuild a previous serve began resumes ({} of {} rows done)",
                fmt_count(*done),
                total.map_or_else(|| "an uncounted number of".to_string(), fmt_count)
            ),
            secs: total.map_or(0.0, |t| {
                t.saturating_sub(*done) as f64 * REBUILD_SECS_PER_REVISION
            }),
            background: true,
        }),
        ReportWork::Rebuild {
            why,
            stages,
            background,
        } => {
            let why = match why {
                RebuildReason::FirstBuild => "first build",
                RebuildReason::ConfigChanged => {
                    "the [reporting] config or this version's extraction differs from the one they were built with"
                }
                RebuildReason::Stale => {
                    "a command with another [reporting] config marked them stale"
                }
            };
            // Same stage rule: only the revisions missing from document_stages are read.
            let revisions = if *stages {
                plan.rows.history
            } else {
                plan.rows.history.saturating_sub(plan.rows.stages)
            };
            out.push(Step {
                what: format!(
                    "report tables rebuilt ({why}): reads {} documents and {} history revisions{}",
                    fmt_count(docs),
                    fmt_count(revisions),
                    if *stages {
                        " (stage history recomputed)"
                    } else {
                        " (stage history kept)"
                    }
                ),
                secs: docs as f64 * REBUILD_SECS_PER_DOCUMENT
                    + revisions as f64 * REBUILD_SECS_PER_REVISION,
                background: *background,
            });
        }
    }
    if postgres && !plan.pg_sink {
        out.push(Step {
            what: format!(
                "PostgreSQL backfill ([postgres] is set and no sink has run on this database): copies {} documents and {} history revisions",
                fmt_count(docs),
                fmt_count(plan.rows.history)
            ),
            secs: (docs + plan.rows.history) as f64 * BACKFILL_SECS_PER_ROW,
            background: true,
        });
    }
    out
}

/// The plan as text for a person.
fn render(path: &Path, plan: &UpgradePlan, postgres: bool, config_note: Option<&str>) -> String {
    use std::fmt::Write;
    let known = crate::store::SCHEMA_VERSION;
    let mut s = String::new();
    let version = if plan.version == 0 {
        "no schema yet (a new database)".to_string()
    } else {
        format!("schema version {}", plan.version)
    };
    let _ = writeln!(
        s,
        "database {}: {version}; this skillsync ({}) writes schema version {known}",
        path.display(),
        env!("CARGO_PKG_VERSION")
    );
    let r = &plan.rows;
    let _ = writeln!(
        s,
        "rows: {} events, {} jobs, {} projects, {} history revisions",
        fmt_count(r.events),
        fmt_count(r.jobs),
        fmt_count(r.projects),
        fmt_count(r.history)
    );
    if let Some(note) = config_note {
        let _ = writeln!(s, "note: {note}");
    }
    let steps = steps(plan, postgres);
    if steps.is_empty() {
        let _ = writeln!(s, "nothing to do: serve starts on it without upgrade work");
        return s;
    }
    let _ = writeln!(s, "the next start of serve (or `skillsync migrate`) runs:");
    for step in &steps {
        let when = if step.background {
            ", in the background once serve is ready: webhooks are not delayed"
        } else {
            ""
        };
        let _ = writeln!(s, "  - {} [{}{when}]", step.what, fmt_secs(step.secs));
    }
    let (background, first): (Vec<&Step>, Vec<&Step>) = steps.iter().partition(|x| x.background);
    let total: f64 = first.iter().map(|x| x.secs).sum();
    let _ = writeln!(
        s,
        "estimated total: {} at start-up{} (rows × per-row costs measured on a 2-core VM; expect up to 3× either way with the disk and CPU)",
        fmt_secs(total),
        if background.is_empty() {
            String::new()
        } else {
            format!(
                ", then {} in the background",
                fmt_secs(background.iter().map(|x| x.secs).sum())
            )
        }
    );
    s
}

fn render_json(path: &Path, plan: &UpgradePlan, postgres: bool) -> serde_json::Value {
    let steps = steps(plan, postgres);
    let report = match &plan.report {
        ReportWork::UpToDate => json!({"work": "none"}),
        ReportWork::Views => json!({"work": "views"}),
        ReportWork::Resume { done, total } => {
            json!({"work": "resume", "done": done, "total": total})
        }
        ReportWork::Rebuild {
            why,
            stages,
            background,
        } => json!({
            "work": "rebuild",
            "background": background,
            "reason": match why {
                RebuildReason::FirstBuild => "first_build",
                RebuildReason::ConfigChanged => "config_changed",
                RebuildReason::Stale => "stale",
            },
            "stages_recomputed": stages,
        }),
    };
    json!({
        "database": path.display().to_string(),
        "schema_version": plan.version,
        "target_version": crate::store::SCHEMA_VERSION,
        "rows": {
            "events": plan.rows.events,
            "jobs": plan.rows.jobs,
            "projects": plan.rows.projects,
            "history": plan.rows.history,
        },
        "migrations": plan.migrations.iter().map(|m| json!({
            "version": m.version,
            "name": m.name,
            "summary": m.summary,
            "scans": m.scans.iter().map(|(t, n)| json!({"table": t, "rows": n})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "report": report,
        "estimated_secs": round(steps.iter().filter(|x| !x.background).map(|x| x.secs).sum()),
        "estimated_background_secs": round(steps.iter().filter(|x| x.background).map(|x| x.secs).sum()),
        "pending": !plan.is_empty(),
    })
}

fn round(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// How `migrate` ended; the CLI maps it to the exit code (0, 1, 2, 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// Nothing to do (dry run), or the work is done.
    UpToDate,
    /// Dry run: work is pending (or the database does not exist yet).
    Pending,
    /// This binary cannot go on with the database (too new, reverted,
    /// unreadable), or a `serve` seems to be running on it.
    Refused,
    /// The migration or the rebuild failed.
    Failed,
}

/// Why this binary cannot go on with the database: the message, refused.
fn refuse(e: &StoreError) -> MigrateOutcome {
    match e {
        StoreError::TooNew { .. } | StoreError::Reverted => {
            eprintln!("skillsync: {e}; serve of this version would refuse to start on it");
        }
        _ => eprintln!("skillsync: {e}"),
    }
    MigrateOutcome::Refused
}

/// `skillsync migrate --dry-run`: prints the plan for `path` with the
/// `[reporting]` rules of `config` (the default rules when it is `None`,
/// said in the output). Exit 0 nothing to do, 1 work pending, 2 cannot.
pub fn print_dry_run(path: &Path, config: Option<&Config>, json: bool) -> MigrateOutcome {
    if !path.exists() {
        if json {
            println!(
                "{}",
                json!({"database": path.display().to_string(), "schema_version": 0,
                       "target_version": crate::store::SCHEMA_VERSION, "pending": true, "new": true})
            );
        } else {
            println!(
                "database {}: does not exist; serve creates it at schema version {}",
                path.display(),
                crate::store::SCHEMA_VERSION
            );
        }
        return MigrateOutcome::Pending;
    }
    let spec = config.map_or_else(ReportSpec::default, |c| ReportSpec::new(&c.reporting));
    let postgres = config.is_some_and(|c| c.postgres.is_some());
    let plan = match plan(path, &spec) {
        Ok(p) => p,
        Err(e) => return refuse(&e),
    };
    if json {
        println!("{}", render_json(path, &plan, postgres));
    } else {
        let note = config.is_none().then_some(
            "config not loaded: the report tables are compared with the default [reporting]",
        );
        print!("{}", render(path, &plan, postgres, note));
    }
    if plan.is_empty() {
        MigrateOutcome::UpToDate
    } else {
        MigrateOutcome::Pending
    }
}

/// `skillsync migrate`: runs the plan now, as the next `serve` start would,
/// and says how long it took. Refuses (exit 2) while a `serve` seems to run
/// on the database, unless `force`: the migrations would change the schema
/// under an older binary, and a rebuild would replace the tables it writes.
pub async fn apply(config: &Config, force: bool) -> MigrateOutcome {
    let path = config.database.path.clone();
    let spec = ReportSpec::new(&config.reporting);
    let postgres = config.postgres.is_some();
    if path.exists() {
        let planned = {
            let (path, spec) = (path.clone(), spec.clone());
            crate::store::run_blocking(move || plan(&path, &spec)).await
        };
        let planned = match planned {
            Ok(p) => p,
            Err(e) => return refuse(&e),
        };
        print!("{}", render(&path, &planned, postgres, None));
        if planned.is_empty() {
            return MigrateOutcome::UpToDate;
        }
        if let Some(at) = planned.last_probe.as_deref() {
            let fresh = crate::model::parse_upstream_ts(at)
                .is_some_and(|t| chrono::Utc::now() - t < PROBE_FRESH);
            if fresh && !force {
                eprintln!(
                    "skillsync: a serve wrote its health probe to this database at {at}: it seems to be running; \
                     stop it first (systemctl stop skillsync.service skillsync.socket), or pass --force if it is not running"
                );
                return MigrateOutcome::Refused;
            }
        }
    }
    let started = Instant::now();
    match crate::app::open_store(config, crate::store::ReportRole::Owner).await {
        Ok(store) => {
            // A rebuild serve would run after READY runs here to the end:
            // the service is stopped, nothing waits.
            loop {
                match store.rebuild_reports_step(REBUILD_BATCH, None).await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("skillsync: report rebuild: {e}");
                        return MigrateOutcome::Failed;
                    }
                }
            }
            drop(store);
            println!(
                "done in {:.1} s: schema version {}, report tables up to date",
                started.elapsed().as_secs_f64(),
                crate::store::SCHEMA_VERSION
            );
            MigrateOutcome::UpToDate
        }
        Err(e) => {
            eprintln!("skillsync: {e:#}");
            let too_new = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<StoreError>(),
                    Some(StoreError::TooNew { .. } | StoreError::Reverted)
                )
            });
            if too_new {
                MigrateOutcome::Refused
            } else {
                MigrateOutcome::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PlannedMigration, Rows};

    fn sample(report: ReportWork) -> UpgradePlan {
        UpgradePlan {
            version: 4,
            migrations: vec![PlannedMigration {
                version: 5,
                name: "005_recorded_by_document",
                summary: "a listing page finds its recorded-but-unqueued webhooks by document id"
                    .into(),
                scans: vec![("events".into(), 2_000_000)],
            }],
            report,
            rows: Rows {
                events: 2_000_000,
                jobs: 900_000,
                projects: 100_000,
                history: 3_000_000,
                stages: 3_000_000,
            },
            last_probe: None,
            pg_sink: false,
        }
    }

    #[test]
    fn the_estimate_is_rows_times_the_measured_costs() {
        let plan = sample(ReportWork::Rebuild {
            why: RebuildReason::ConfigChanged,
            stages: true,
            background: true,
        });
        let s = steps(&plan, false);
        assert_eq!(s.len(), 2);
        assert!((s[0].secs - 2_000_000.0 * SCAN_SECS_PER_ROW).abs() < 1e-9);
        let rebuild =
            1_000_000.0 * REBUILD_SECS_PER_DOCUMENT + 3_000_000.0 * REBUILD_SECS_PER_REVISION;
        assert!((s[1].secs - rebuild).abs() < 1e-9);
        let text = render(Path::new("/x.db"), &plan, false, None);
        assert!(
            text.contains("migration 5 005_recorded_by_document"),
            "{text}"
        );
        assert!(text.contains("reads events (2,000,000 rows)"), "{text}");
        assert!(
            text.contains("3,000,000 history revisions (stage history recomputed)"),
            "{text}"
        );
        // Same stage rule: the stage rows are kept, no revision read again.
        let kept = sample(ReportWork::Rebuild {
            why: RebuildReason::ConfigChanged,
            stages: false,
            background: true,
        });
        assert!(
            render(Path::new("/x.db"), &kept, false, None)
                .contains("and 0 history revisions (stage history kept)")
        );
    }

    /// With `[postgres]` on a database no sink ran on, the backfill is
    /// announced as background work, outside the start-up total.
    #[test]
    fn a_first_postgres_backfill_is_background_work() {
        let plan = sample(ReportWork::UpToDate);
        let s = steps(&plan, true);
        assert_eq!(s.len(), 2);
        assert!(s[1].background);
        assert!((s[1].secs - 4_000_000.0 * BACKFILL_SECS_PER_ROW).abs() < 1e-9);
        let text = render(Path::new("/x.db"), &plan, true, None);
        assert!(
            text.contains(
                "estimated total: about 1.4 s at start-up, then about 5 min in the background"
            ),
            "{text}"
        );
        let synced = UpgradePlan {
            pg_sink: true,
            ..plan
        };
        assert_eq!(steps(&synced, true).len(), 1);
    }

    #[test]
    fn counts_and_times_read_well() {
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_count(1_000), "1,000");
        assert_eq!(fmt_count(3_000_000), "3,000,000");
        assert_eq!(fmt_secs(0.01), "under 0.1 s");
        assert_eq!(fmt_secs(4.5), "about 4.5 s");
        assert_eq!(fmt_secs(600.0), "about 10 min");
    }
}
