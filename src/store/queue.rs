//! Events and the fetch queue: recording a delivery, enqueueing documents,
//! leasing them to fetchers, and settling events once a fetch ends.
//!
//! The rule that makes coalescing correct: a fetch settles exactly the
//! events whose id is at most `claimed_max_event` (received before the fetch
//! began); a request that arrives during the fetch bumps `generation`, so the
//! queue row stays and the document is fetched once more.
//!
//! Queries that find a document's events spell out the partial index's
//! condition, `status IN ('pending', 'dead')`, even beside a
//! narrower `status = …`: SQLite uses a partial index only when the query
//! repeats its terms.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::sync::RunRef;
use super::{Store, StoreError};
use crate::model::{Claim, DocType, ErrorClass, fmt_ts};

/// A delivery to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub tenant: String,
    pub received_at: DateTime<Utc>,
    pub action: String,
    /// `job`/`project`, or the sender's own string for an unknown type.
    pub doc_type: Option<String>,
    pub doc_id: Option<String>,
    /// `test` actions and unknown types are recorded but not fetched.
    pub ignored: bool,
    pub payload: String,
}

/// How a failed fetch is to be settled.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
    /// When to try again if the document is not dead.
    pub retry_at: DateTime<Utc>,
    /// Whether this failure counts towards `max_attempts` (429 does not).
    pub counts: bool,
    pub max_attempts: u32,
}

/// What a failed fetch led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureResult {
    WillRetry { attempts: u32 },
    Dead { attempts: u32 },
}

/// Queues a document. `requested_at` is when the change we wait for happened
/// (a webhook's arrival, or the ModifiedOn a listing showed), so
/// `sync_status.complete_as_of` stays before every change not yet mirrored.
/// Why a document is queued: the fields of a request beyond its key.
struct Ask<'a> {
    reason: &'a str,
    requested_at: &'a str,
    /// The full sweep whose deletion candidate this is.
    sweep_run: Option<i64>,
}

fn enqueue(
    c: &Connection,
    tenant: &str,
    doc_type: &str,
    doc_id: &str,
    ask: Ask<'_>,
    now: &str,
) -> rusqlite::Result<()> {
    // A new request revives a dead document; one in back-off keeps its
    // schedule (the upstream failure it waits out is likely the same). A
    // sweep's candidate mark survives later requests until a fetch settles it.
    c.prepare_cached(
        "INSERT INTO fetch_queue (tenant, doc_type, doc_id, reason, generation, requested_at, status, attempts, next_attempt_at, sweep_run)
         VALUES (?1, ?2, ?3, ?4, 1, ?5, 'queued', 0, ?6, ?7)
         ON CONFLICT (tenant, doc_type, doc_id) DO UPDATE SET
             generation = generation + 1,
             requested_at = min(requested_at, excluded.requested_at),
             attempts = CASE WHEN status = 'dead' THEN 0 ELSE attempts END,
             next_attempt_at = CASE WHEN status = 'dead' THEN excluded.next_attempt_at ELSE next_attempt_at END,
             status = 'queued',
             sweep_run = coalesce(excluded.sweep_run, sweep_run)",
    )?
    .execute(params![tenant, doc_type, doc_id, ask.reason, ask.requested_at, now, ask.sweep_run])?;
    Ok(())
}

/// How many recorded events a claim moves into `fetch_queue` when the
/// tenant has nothing else due: enough that the events of a burst for one
/// document mostly move together, few enough that the claim's transaction
/// (and the webhook commits queued behind it) stays within milliseconds.
const QUEUE_BATCH: i64 = 256;

/// Turns up to `limit` recorded events (of every tenant), oldest first, into
/// fetch requests: the events after the inbox cursor (`inbox_cursor`), which
/// then moves past them. An event still `pending` puts its document in
/// `fetch_queue`, unless a fetch running now began after it arrived (that
/// fetch settles it) or the document went dead in such a fetch (the event
/// shares that fate). An event that is no longer `pending` was settled by a
/// fetch that began after it arrived, before it was reached here. Returns
/// how many events the cursor passed.
///
/// Recording an event writes nothing keyed by its document beyond the small
/// index of waiting events, and moving it writes nothing per event: the
/// cursor is one row. A fetch settles every waiting event of its document
/// received before it began, moved or not, so correctness does not depend on
/// when this runs: an event moved after its document's fetch began bumps the
/// document's generation, so it is fetched again.
fn queue_recorded_events(c: &Connection, limit: i64, now: &str) -> rusqlite::Result<usize> {
    if limit <= 0 {
        return Ok(0);
    }
    let cursor: i64 = c
        .prepare_cached("SELECT last_id FROM inbox_cursor WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    /// An event after the cursor: id, tenant, doc_type, doc_id, received_at, status.
    type Recorded = (i64, String, Option<String>, Option<String>, String, String);
    let rows: Vec<Recorded> = c
        .prepare_cached(
            "SELECT id, tenant, doc_type, doc_id, received_at, status FROM events
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![cursor, limit], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let Some(mut last_id) = rows.last().map(|r| r.0) else {
        return Ok(0);
    };
    if rows.len() as i64 == limit && rows.iter().all(|r| r.5 != "pending") {
        // A long run of events settled before the cursor reached them (by
        // fetches that covered them, or written by another tool): jump to
        // just before the next waiting one, found in the small index of
        // waiting events, instead of passing `limit` settled rows per claim.
        let next: Option<i64> = c
            .prepare_cached(
                "SELECT min(id) FROM events INDEXED BY events_by_document
                 WHERE status IN ('pending', 'dead') AND status = 'pending' AND id > ?1",
            )?
            .query_row([last_id], |r| r.get(0))?;
        let newest: i64 = c
            .prepare_cached("SELECT coalesce(max(id), 0) FROM events")?
            .query_row([], |r| r.get(0))?;
        last_id = next.map_or(newest, |n| n - 1).max(last_id);
    }
    let mut queue_row = c.prepare_cached(
        "SELECT status, claimed_max_event, lease_owner IS NOT NULL AND lease_until > ?4, attempts, last_error
         FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3",
    )?;
    /// A document's queue row: status, claimed_max_event, leased, attempts, last_error.
    type Row = (String, Option<i64>, bool, i64, Option<String>);
    type Key<'r> = (&'r str, &'r str, &'r str);
    // Per document, its queue row is read once: nothing below changes it
    // before the requests are made at the end.
    let mut documents: std::collections::HashMap<Key<'_>, Option<Row>> = Default::default();
    // One request per document for the whole batch, asked for the earliest
    // of its events (a request per event only bumped the same row again).
    // Deferring it past the loop changes no decision: rows are in id order,
    // so every event at or below a document's `claimed_max_event` (the only
    // ones whose branch reads the row's status) comes before any event that
    // asks for a fetch.
    let mut asks: std::collections::HashMap<Key<'_>, &str> = Default::default();
    for (id, tenant, doc_type, doc_id, received_at, status) in &rows {
        // Settled already (or ignored, or nothing to fetch): only passed.
        let (Some(doc_type), Some(doc_id)) = (doc_type, doc_id) else {
            continue;
        };
        if status != "pending" {
            continue;
        }
        let key = (tenant.as_str(), doc_type.as_str(), doc_id.as_str());
        let row = &*match documents.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let row: Option<Row> = queue_row
                    .query_row(params![tenant, doc_type, doc_id, now], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?;
                e.insert(row)
            }
        };
        match row {
            // A fetch running now began after this event arrived: its outcome
            // settles the event, so no new request.
            Some((status, Some(m), true, _, _)) if status == "queued" && *id <= *m => {}
            // The document went dead in a fetch that began after this event
            // arrived: the event shares that fate (`retry --dead` revives both)
            // instead of reviving the document for another round of failures.
            Some((status, Some(m), _, attempts, last_error)) if status == "dead" && *id <= *m => {
                c.prepare_cached(
                    "UPDATE events SET status = 'dead', attempts = ?1, last_error = ?2, next_attempt_at = NULL, processed_at = ?3
                     WHERE id = ?4 AND status = 'pending'",
                )?
                .execute(params![attempts, last_error, now, id])?;
            }
            _ => {
                asks.entry(key)
                    .and_modify(|at| *at = (*at).min(received_at.as_str()))
                    .or_insert(received_at.as_str());
            }
        }
    }
    c.prepare_cached(
        "INSERT INTO inbox_cursor (id, last_id) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET last_id = max(last_id, excluded.last_id)",
    )?
    .execute([last_id])?;
    for ((tenant, doc_type, doc_id), requested_at) in asks {
        enqueue(
            c,
            tenant,
            doc_type,
            doc_id,
            Ask {
                reason: "webhook",
                requested_at,
                sweep_run: None,
            },
            requested_at,
        )?;
    }
    Ok(rows.len())
}

/// A leased row: doc_type, doc_id, generation, attempts, reason.
type Leased = (String, String, i64, u32, String);

/// Leases up to `limit` due documents of `tenant`; see [`Store::claim`].
fn lease_due(
    c: &Connection,
    tenant: &str,
    owner: &str,
    limit: usize,
    now: &str,
    lease_until: &str,
    max_event: i64,
) -> rusqlite::Result<Vec<Leased>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    c.prepare_cached(
        "UPDATE fetch_queue SET lease_owner = ?1, lease_until = ?2, claimed_generation = generation, claimed_max_event = ?3
         WHERE rowid IN (
             SELECT rowid FROM fetch_queue
             WHERE tenant = ?4 AND status = 'queued' AND next_attempt_at <= ?5
               AND (lease_until IS NULL OR lease_until < ?5)
             ORDER BY next_attempt_at LIMIT ?6)
         RETURNING doc_type, doc_id, generation, attempts, reason",
    )?
    .query_map(
        params![owner, lease_until, max_event, tenant, now, limit as i64],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?
    .collect()
}

impl Store {
    /// Records a delivery; resolves once it is committed durably. Returns the
    /// event id. One INSERT: the row, its place in `events_by_status` and,
    /// while it waits for a fetch, in the small index of waiting events by
    /// document; the fetcher turns it into a fetch request when it next
    /// claims work ([`queue_recorded_events`]).
    pub async fn insert_event(&self, ev: NewEvent) -> Result<i64, StoreError> {
        // Formatted here, on the caller's thread: the writer thread is the
        // one every acknowledgement waits for. `OR FAIL`: SQLite checks a
        // row's constraints before writing any of it, so a one-row insert
        // that fails has written nothing, and without `ABORT`'s statement
        // rollback SQLite skips the statement journal — a 4 KiB copy of
        // every page the insert touches, a measured 3% of the writer's time.
        let now = fmt_ts(ev.received_at);
        self.write_one(move |c| {
            let status = if ev.ignored { "ignored" } else { "pending" };
            let id: i64 = c
                .prepare_cached(
                    "INSERT OR FAIL INTO events (tenant, received_at, action, doc_type, doc_id, status, attempts, next_attempt_at, processed_at, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9) RETURNING id",
                )?
                .query_row(
                    params![
                        ev.tenant,
                        now,
                        ev.action,
                        ev.doc_type,
                        ev.doc_id,
                        status,
                        if ev.ignored { None } else { Some(&now) },
                        if ev.ignored { Some(&now) } else { None },
                        ev.payload,
                    ],
                    |r| r.get(0),
                )?;
            Ok(id)
        })
        .await
    }

    /// Queues fetches for documents a reconciliation found missing or newer
    /// (`(id, ModifiedOn as listed)`), or, with `sweep_run`, the deletion
    /// candidates of that full sweep. Only while `run` still holds its lock:
    /// `None` when another process has taken it (nothing is queued). Returns
    /// how many were queued, counted in the transaction that queued them.
    pub async fn enqueue_fetches(
        &self,
        run: RunRef,
        docs: Vec<(String, Option<String>)>,
        sweep_run: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<Option<u64>, StoreError> {
        self.write(move |c| {
            if !super::sync::holds_lock(c, &run)? {
                return Ok(None);
            }
            let now = fmt_ts(now);
            for (id, modified) in &docs {
                let changed = modified
                    .as_deref()
                    .filter(|m| *m < now.as_str())
                    .unwrap_or(&now);
                enqueue(
                    c,
                    &run.tenant,
                    run.doc_type.as_str(),
                    id,
                    Ask {
                        reason: "reconcile",
                        requested_at: changed,
                        sweep_run,
                    },
                    &now,
                )?;
            }
            Ok(Some(docs.len() as u64))
        })
        .await
    }

    /// Leases up to `limit` due documents of `tenant` to `owner` until
    /// `lease_until`. A document leased by anyone else is never returned.
    pub async fn claim(
        &self,
        tenant: String,
        owner: String,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Claim>, StoreError> {
        self.write(move |c| {
            let now = fmt_ts(now);
            let lease_until = fmt_ts(lease_until);
            // The oldest recorded webhooks join the queue at least as fast as
            // documents are claimed, so a long reconciliation cannot starve
            // them (they sort first: their due time is their arrival).
            let moved = queue_recorded_events(c, limit as i64, &now)?;
            let max_event: i64 =
                c.query_row("SELECT coalesce(max(id), 0) FROM events", [], |r| r.get(0))?;
            let mut rows = lease_due(c, &tenant, &owner, limit, &now, &lease_until, max_event)?;
            if rows.len() < limit && moved == limit {
                // Nothing else due: move a larger share of the backlog.
                queue_recorded_events(c, QUEUE_BATCH, &now)?;
                rows.extend(lease_due(
                    c,
                    &tenant,
                    &owner,
                    limit - rows.len(),
                    &now,
                    &lease_until,
                    max_event,
                )?);
            }
            let mut claims = Vec::new();
            for (t, id, generation, attempts, reason) in rows {
                // Only `job`/`project` rows are ever queued.
                if let Some(doc_type) = DocType::parse(&t) {
                    claims.push(Claim {
                        tenant: tenant.clone(),
                        doc_type,
                        doc_id: id,
                        generation,
                        max_event,
                        attempts,
                        reason,
                    });
                }
            }
            Ok(claims)
        })
        .await
    }

    /// The earliest time a queued document of `tenant` becomes due, if any
    /// (a recorded event not yet in the queue is due since its arrival).
    pub async fn next_due(&self, tenant: String) -> Result<Option<String>, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT min(due) FROM (
                     SELECT min(max(next_attempt_at, coalesce(lease_until, ''))) AS due FROM fetch_queue
                     WHERE tenant = ?1 AND status = 'queued'
                     UNION ALL
                     SELECT * FROM (SELECT received_at FROM events INDEXED BY events_by_document
                                   WHERE tenant = ?1 AND status IN ('pending', 'dead') AND status = 'pending'
                                     AND id > coalesce((SELECT last_id FROM inbox_cursor WHERE id = 1), 0)
                                   ORDER BY id LIMIT 1))",
                [tenant],
                |r| r.get::<_, Option<String>>(0),
            )?)
        })
        .await
    }

    /// Ends a lease without a result (shutdown): the document is due again at once.
    pub async fn release_leases(&self, owner: String) -> Result<usize, StoreError> {
        self.write(move |c| {
            Ok(c.execute(
                "UPDATE fetch_queue SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?1",
                [owner],
            )?)
        })
        .await
    }

    /// Settles a failed fetch: back-off, or dead after `max_attempts`.
    pub async fn finish_failed(
        &self,
        claim: Claim,
        owner: String,
        f: Failure,
        now: DateTime<Utc>,
    ) -> Result<FailureResult, StoreError> {
        self.write(move |c| {
            let now = fmt_ts(now);
            let attempts = claim.attempts + u32::from(f.counts);
            let dead = f.counts && attempts >= f.max_attempts;
            let message = format!("{}: {}", f.class.as_str(), f.message);
            let retry_at = fmt_ts(f.retry_at);
            let updated = c.execute(
                "UPDATE fetch_queue SET attempts = ?1, status = ?2, next_attempt_at = ?3, last_error = ?4,
                        last_error_class = ?5, lease_owner = NULL, lease_until = NULL
                 WHERE tenant = ?6 AND doc_type = ?7 AND doc_id = ?8 AND lease_owner = ?9",
                params![
                    attempts,
                    if dead { "dead" } else { "queued" },
                    retry_at,
                    message,
                    f.class.as_str(),
                    claim.tenant,
                    claim.doc_type.as_str(),
                    claim.doc_id,
                    owner
                ],
            )?;
            if updated == 0 {
                // The lease ran out and someone else took the document over.
                return Ok(FailureResult::WillRetry { attempts });
            }
            if dead {
                // Every pending event of the document that waits on this
                // fetch: received before it began, or already turned into a
                // request. One recorded later and not yet reached by the
                // inbox cursor revives the document when it is.
                c.execute(
                    "UPDATE events SET status = 'dead', attempts = ?1, last_error = ?2, next_attempt_at = NULL, processed_at = ?3
                     WHERE tenant = ?4 AND doc_type = ?5 AND doc_id = ?6 AND status IN ('pending', 'dead') AND status = 'pending'
                       AND id <= max(?7, coalesce((SELECT last_id FROM inbox_cursor WHERE id = 1), 0))",
                    params![attempts, message, now, claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.max_event],
                )?;
                Ok(FailureResult::Dead { attempts })
            } else {
                c.execute(
                    "UPDATE events SET attempts = ?1, last_error = ?2, next_attempt_at = ?3
                     WHERE tenant = ?4 AND doc_type = ?5 AND doc_id = ?6 AND status IN ('pending', 'dead') AND status = 'pending' AND id <= ?7",
                    params![attempts, message, retry_at, claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.max_event],
                )?;
                Ok(FailureResult::WillRetry { attempts })
            }
        })
        .await
    }

    /// Puts dead work back in the queue: one event (and its document), or all
    /// dead events. Returns how many events were revived.
    pub async fn retry_dead(
        &self,
        event: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        self.write(move |c| {
            let now = fmt_ts(now);
            let docs: Vec<(String, String, String)> = match event {
                Some(id) => c
                    .query_row(
                        "SELECT tenant, doc_type, doc_id FROM events WHERE id = ?1 AND doc_id IS NOT NULL AND status = 'dead'",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?
                    .into_iter()
                    .collect(),
                None => {
                    let mut s = c.prepare(
                        "SELECT DISTINCT tenant, doc_type, doc_id FROM events WHERE status = 'dead' AND doc_id IS NOT NULL
                         UNION SELECT tenant, doc_type, doc_id FROM fetch_queue WHERE status = 'dead'",
                    )?;
                    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect::<Result<_, _>>()?
                }
            };
            let mut revived = 0;
            for (tenant, doc_type, doc_id) in docs {
                revived += match event {
                    Some(id) => c.execute(
                        "UPDATE events SET status = 'pending', attempts = 0, next_attempt_at = ?1, last_error = NULL, processed_at = NULL
                         WHERE id = ?2 AND status = 'dead'",
                        params![now, id],
                    )?,
                    None => c.execute(
                        "UPDATE events SET status = 'pending', attempts = 0, next_attempt_at = ?1, last_error = NULL, processed_at = NULL
                         WHERE tenant = ?2 AND doc_type = ?3 AND doc_id = ?4 AND status IN ('pending', 'dead') AND status = 'dead'",
                        params![now, tenant, doc_type, doc_id],
                    )?,
                };
                c.execute(
                    "INSERT INTO fetch_queue (tenant, doc_type, doc_id, reason, generation, requested_at, status, attempts, next_attempt_at)
                     VALUES (?1, ?2, ?3, 'retry', 1, ?4, 'queued', 0, ?4)
                     ON CONFLICT (tenant, doc_type, doc_id) DO UPDATE SET
                         generation = generation + 1, status = 'queued', attempts = 0, next_attempt_at = excluded.next_attempt_at,
                         last_error = NULL, last_error_class = NULL",
                    params![tenant, doc_type, doc_id, now],
                )?;
            }
            Ok(revived)
        })
        .await
    }
}

/// Settles the events and the queue row after a fetch that stored the
/// document or found it gone. Runs inside the caller's write.
pub(crate) fn settle_success(
    c: &Connection,
    claim: &Claim,
    owner: &str,
    now: &str,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE events SET status = 'done', processed_at = ?1, next_attempt_at = NULL
         WHERE tenant = ?2 AND doc_type = ?3 AND doc_id = ?4 AND status IN ('pending', 'dead') AND id <= ?5",
    )?
    .execute(params![now, claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.max_event])?;
    let generation: Option<i64> = c
        .prepare_cached(
            "SELECT generation FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND lease_owner = ?4",
        )?
        .query_row(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id, owner], |r| r.get(0))
        .optional()?;
    match generation {
        Some(g) if g == claim.generation => {
            c.prepare_cached(
                "DELETE FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3",
            )?
            .execute(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id])?;
        }
        Some(_) => {
            // Requested again while we fetched: due again now, fresh attempts.
            c.prepare_cached(
                "UPDATE fetch_queue SET lease_owner = NULL, lease_until = NULL, attempts = 0, next_attempt_at = ?1,
                        requested_at = ?1, last_error = NULL, last_error_class = NULL
                 WHERE tenant = ?2 AND doc_type = ?3 AND doc_id = ?4",
            )?
            .execute(params![now, claim.tenant, claim.doc_type.as_str(), claim.doc_id])?;
        }
        None => {} // lease lost to another fetcher; it will settle the row
    }
    Ok(())
}
