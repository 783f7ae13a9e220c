//! The mirror tables (`jobs`, `projects`) and `document_history`: storing a
//! fetched document with its revision, the stale-write guard, and marking
//! documents deleted or back upstream.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::queue::{holds_lease, settle_success};
use super::{Store, StoreError};
use crate::model::{Claim, DocKey, DocType, fmt_ts};

/// A document as fetched, with the columns extracted from it.
#[derive(Debug, Clone)]
pub struct FetchedDoc {
    /// The JSON text to store (canonical: keys sorted, so equal content is equal text).
    pub document: String,
    pub number: Option<String>,
    pub name: Option<String>,
    /// Normalised to table format when it parses.
    pub modified_on: Option<String>,
    pub version: Option<i64>,
}

/// What storing a fetched document did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// First time seen: revision 1.
    Inserted,
    /// Content changed: a new revision and a history row.
    Changed { revision: i64 },
    /// Same content as stored: revision and history untouched.
    Unchanged,
    /// Older than the stored version (ModifiedOn/Version): not written.
    Stale,
    /// The claim had lost its lease (another claim took the document): not
    /// written; the claim holding it now settles the document.
    Fenced,
}

/// What recording a 404/410 did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneOutcome {
    /// A live row got its `deleted_at`.
    Marked,
    /// No live row to mark: deleted already, or never mirrored.
    NothingLive,
    /// A fetch that began after this claim was made stored the document:
    /// that newer answer stands, the row stays live.
    Superseded,
    /// The claim had lost its lease: nothing was written.
    Fenced,
}

/// True when `new` is older than `old` by ModifiedOn, then by Version.
fn is_stale(new: &FetchedDoc, old_modified: Option<&str>, old_version: Option<i64>) -> bool {
    match (new.modified_on.as_deref(), old_modified) {
        (Some(n), Some(o)) if n < o => return true,
        (Some(n), Some(o)) if n > o => return false,
        _ => {}
    }
    matches!((new.version, old_version), (Some(n), Some(o)) if n < o)
}

/// Upserts one document; the heart of the mirror. Runs inside a write.
pub(super) fn upsert_document(
    c: &Connection,
    key: &DocKey,
    doc: &FetchedDoc,
    now: &str,
    report: Option<&crate::reporting::ReportSpec>,
) -> Result<StoreOutcome, StoreError> {
    let (tenant, doc_type, id) = (key.tenant.as_str(), key.doc_type, key.id.as_str());
    let table = doc_type.table();
    let existing: Option<(Option<String>, Option<i64>, String, i64)> = c
        .prepare_cached(&format!(
            "SELECT modified_on, version, document, revision FROM {table} WHERE tenant = ?1 AND id = ?2"
        ))?
        .query_row(params![tenant, id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let revision = match existing {
        None => {
            c.prepare_cached(&format!(
                "INSERT INTO {table} (tenant, id, document, number, name, modified_on, version, revision, first_seen_at, fetched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8)"
            ))?
            .execute(params![tenant, id, doc.document, doc.number, doc.name, doc.modified_on, doc.version, now])?;
            1
        }
        Some((old_modified, old_version, old_doc, old_revision)) => {
            if is_stale(doc, old_modified.as_deref(), old_version) {
                // The document exists upstream, so it is not deleted.
                c.prepare_cached(&format!(
                    "UPDATE {table} SET deleted_at = NULL WHERE tenant = ?1 AND id = ?2 AND deleted_at IS NOT NULL"
                ))?
                .execute(params![tenant, id])?;
                return Ok(StoreOutcome::Stale);
            }
            if old_doc == doc.document {
                c.prepare_cached(&format!(
                    "UPDATE {table} SET fetched_at = ?3, deleted_at = NULL WHERE tenant = ?1 AND id = ?2"
                ))?
                .execute(params![tenant, id, now])?;
                return Ok(StoreOutcome::Unchanged);
            }
            let revision = old_revision + 1;
            c.prepare_cached(&format!(
                "UPDATE {table} SET document = ?3, number = ?4, name = ?5, modified_on = ?6, version = ?7,
                        revision = ?8, fetched_at = ?9, deleted_at = NULL
                 WHERE tenant = ?1 AND id = ?2"
            ))?
            .execute(params![tenant, id, doc.document, doc.number, doc.name, doc.modified_on, doc.version, revision, now])?;
            revision
        }
    };
    c.prepare_cached(
        "INSERT INTO document_history (tenant, doc_type, id, revision, document, fetched_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![tenant, doc_type.as_str(), id, revision, doc.document, now])?;
    let stored = super::report::Revision {
        key,
        revision,
        document: &doc.document,
        fetched_at: now,
    };
    if let Some(spec) = report {
        super::report::record(c, spec, &stored)?;
    }
    Ok(if revision == 1 {
        StoreOutcome::Inserted
    } else {
        StoreOutcome::Changed { revision }
    })
}

impl Store {
    /// Stores a fetched document and settles the claim's events and queue row
    /// in the same transaction.
    pub async fn finish_stored(
        &self,
        claim: Claim,
        doc: FetchedDoc,
        now: DateTime<Utc>,
    ) -> Result<StoreOutcome, StoreError> {
        let report = self.inner.report.clone();
        let key = claim.key();
        let outcome = self
            .write(move |c| {
                if !holds_lease(c, &claim)? {
                    return Ok(StoreOutcome::Fenced);
                }
                let now = fmt_ts(now);
                // The spec in force when the write runs, which matches the tables' shape.
                let spec = super::current_report(&report);
                let outcome = upsert_document(c, &key, &doc, &now, spec.as_deref())?;
                settle_success(c, &claim, &now)?;
                Ok(outcome)
            })
            .await;
        // Any outbox row (a trigger: a new revision, or an undeletion even
        // when unchanged or stale) committed with the change: wake the PostgreSQL sink.
        if outcome.is_ok() {
            self.inner.outbox_signal.notify();
        }
        outcome
    }

    /// Records that upstream answered 404/410: sets `deleted_at` (row kept)
    /// and settles the claim. Only while the claim holds its lease, and
    /// never over a document stored after the claim was made (that answer
    /// is newer than this 404).
    pub async fn finish_gone(
        &self,
        claim: Claim,
        now: DateTime<Utc>,
    ) -> Result<GoneOutcome, StoreError> {
        let outcome = self.write(move |c| {
            if !holds_lease(c, &claim)? {
                return Ok(GoneOutcome::Fenced);
            }
            let now = fmt_ts(now);
            let table = claim.doc_type.table();
            let newer: bool = c
                .prepare_cached(&format!(
                    "SELECT 1 FROM {table} WHERE tenant = ?1 AND id = ?2 AND deleted_at IS NULL AND fetched_at > ?3"
                ))?
                .exists(params![claim.tenant, claim.doc_id, claim.claimed_at])?;
            if newer {
                settle_success(c, &claim, &now)?;
                return Ok(GoneOutcome::Superseded);
            }
            let marked = c
                .prepare_cached(&format!(
                    "UPDATE {table} SET deleted_at = ?3 WHERE tenant = ?1 AND id = ?2 AND deleted_at IS NULL"
                ))?
                .execute(params![claim.tenant, claim.doc_id, now])?;
            if marked > 0 {
                // A full sweep's candidate: its run counts the confirmation.
                c.prepare_cached(
                    "UPDATE sync_runs SET marked_deleted = marked_deleted + 1
                     WHERE id = (SELECT sweep_run FROM fetch_queue
                                 WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND lease_owner = ?4)",
                )?
                .execute(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.lease])?;
            }
            settle_success(c, &claim, &now)?;
            Ok(if marked > 0 {
                GoneOutcome::Marked
            } else {
                GoneOutcome::NothingLive
            })
        })
        .await;
        if matches!(outcome, Ok(GoneOutcome::Marked)) {
            self.inner.outbox_signal.notify();
        }
        outcome
    }

    /// Up to `n` live documents of `except`'s tenant and type other than it
    /// and not waiting for a fetch themselves (a sweep's other candidates
    /// may be gone too), newest first: the control sample that tells a real deletion from a
    /// misconfigured path when a GET answers 404.
    pub async fn control_sample(
        &self,
        except: DocKey,
        n: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(move |c| {
            let mut s = c.prepare_cached(&format!(
                "SELECT id FROM {} m WHERE tenant = ?1 AND deleted_at IS NULL AND id <> ?2
                   AND NOT EXISTS (SELECT 1 FROM fetch_queue q WHERE q.tenant = ?1 AND q.doc_type = ?4 AND q.doc_id = m.id)
                 ORDER BY rowid DESC LIMIT ?3",
                except.doc_type.table()
            ))?;
            let ids = s
                .query_map(
                    params![except.tenant, except.id, n as i64, except.doc_type.as_str()],
                    |r| r.get(0),
                )?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(ids)
        })
        .await
    }
}

/// A few rows of a mirror table for display (the demo).
#[derive(Debug, Clone)]
pub struct SampleRow {
    pub id: String,
    pub number: Option<String>,
    pub name: Option<String>,
    pub stage: Option<String>,
    pub revision: i64,
    pub deleted_at: Option<String>,
}

impl Store {
    /// Up to `limit` rows of a tenant and type, most recently changed first.
    pub async fn sample(
        &self,
        tenant: String,
        doc_type: DocType,
        limit: usize,
    ) -> Result<Vec<SampleRow>, StoreError> {
        self.read(move |c| {
            let mut s = c.prepare(&format!(
                "SELECT id, number, name, json_extract(document, '$.Stage'), revision, deleted_at FROM {}
                 WHERE tenant = ?1 ORDER BY deleted_at IS NULL, revision DESC, modified_on DESC LIMIT ?2",
                doc_type.table()
            ))?;
            let rows = s.query_map(params![tenant, limit as i64], |r| {
                Ok(SampleRow {
                    id: r.get(0)?,
                    number: r.get(1)?,
                    name: r.get(2)?,
                    stage: r.get(3)?,
                    revision: r.get(4)?,
                    deleted_at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

/// Fills the database at `path` (created and migrated by [`Store::open`]
/// first) with `jobs` synthetic jobs of tenant `tenant`, each at revision
/// `revisions` with that many history rows, in one transaction, without an
/// upstream: for start-up benchmarks and tests on a database of a size no
/// simulator run would reach quickly. The report tables are left as they are.
pub fn fill_synthetic_jobs(
    path: &std::path::Path,
    tenant: &str,
    jobs: u64,
    revisions: u32,
) -> Result<(), StoreError> {
    drop(Store::open(path, std::time::Duration::from_secs(5))?);
    let mut c = Connection::open(path)?;
    c.pragma_update(None, "synchronous", "OFF")?;
    let tx = c.transaction()?;
    {
        let mut job = tx.prepare(
            "INSERT INTO jobs (tenant, id, document, number, name, modified_on, revision, first_seen_at, fetched_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?6)",
        )?;
        let mut history = tx.prepare(
            "INSERT INTO document_history (tenant, doc_type, id, revision, document, fetched_at)
             VALUES (?1, 'job', ?2, ?3, ?4, ?5)",
        )?;
        let stages = ["Brief", "Estimate", "Production", "Review", "Done"];
        for i in 0..jobs {
            let id = format!("{:08x}-0000-4000-8000-{:012x}", i >> 16, i);
            let number = format!("J{i:07}");
            let at = |r: u32| format!("2026-11-{:02}T{:02}:00:00.000Z", 1 + (r % 28), i % 24);
            let document = |r: u32| {
                serde_json::json!({
                    "Id": id, "Number": number, "Name": format!("Job {i}"),
                    "Client": format!("Client {}", i % 97),
                    "Stage": stages[(r as usize) % stages.len()],
                    "Budget": (i % 1000) as f64 * 10.5, "ModifiedOn": at(r),
                })
                .to_string()
            };
            for r in 1..=revisions {
                history.execute(params![tenant, id, r, document(r), at(r)])?;
            }
            job.execute(params![
                tenant,
                id,
                document(revisions),
                number,
                format!("Job {i}"),
                at(revisions),
                revisions
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(m: Option<&str>, v: Option<i64>) -> FetchedDoc {
        FetchedDoc {
            document: "{}".into(),
            number: None,
            name: None,
            modified_on: m.map(str::to_string),
            version: v,
        }
    }

    #[test]
    fn staleness_by_modified_then_version() {
        let t1 = "2026-11-01T00:00:00.000Z";
        let t2 = "2026-11-02T00:00:00.000Z";
        assert!(is_stale(&doc(Some(t1), None), Some(t2), None));
        assert!(!is_stale(&doc(Some(t2), None), Some(t1), None));
        assert!(is_stale(&doc(Some(t1), Some(3)), Some(t1), Some(4)));
        assert!(!is_stale(&doc(Some(t1), Some(4)), Some(t1), Some(4)));
        assert!(!is_stale(&doc(None, None), Some(t1), Some(4)));
        assert!(!is_stale(&doc(Some(t2), Some(1)), Some(t1), Some(9)));
    }
}
