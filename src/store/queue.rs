//! Events and the fetch queue: recording a delivery, enqueueing documents,
//! leasing them to fetchers, and settling events once a fetch ends.
//!
//! The rule that makes coalescing correct: a fetch settles exactly the
//! events whose id is at most `claimed_max_event` (received before the fetch
//! began); a request that arrives during the fetch bumps `generation`, so the
//! queue row stays and the document is fetched once more.
//!
//! Queries that find a document's events spell out the partial index's
//! condition, `queued = 1 AND status IN ('pending', 'dead')`, even beside a
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
pub struct FetchFailure {
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
    WillRetry {
        attempts: u32,
    },
    Dead {
        attempts: u32,
    },
    /// The claim had lost its lease: nothing was written.
    Fenced,
}

/// Queues a document. `requested_at` is when the change we wait for happened
/// (a webhook's arrival, or the ModifiedOn a listing showed), so
/// `sync_status.complete_as_of` stays before every change not yet mirrored.
/// Why a document is queued: the fields of a request beyond its key.
pub(super) struct Ask<'a> {
    pub(super) reason: &'a str,
    pub(super) requested_at: &'a str,
    /// The full sweep whose deletion candidate this is.
    pub(super) sweep_run: Option<i64>,
}

pub(super) fn enqueue(
    c: &Connection,
    tenant: &str,
    doc_type: &str,
    doc_id: &str,
    ask: Ask<'_>,
    now: &str,
) -> rusqlite::Result<()> {
    // A new request revives a dead document; one in back-off keeps its
    // schedule (the upstream failure it waits out is likely the same). A
    // webhook's request makes the document a webhook's (it is claimed, and
    // its GET is sent, before background work). A
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
             sweep_run = coalesce(excluded.sweep_run, sweep_run),
             reason = CASE WHEN excluded.reason = 'webhook' THEN 'webhook' ELSE reason END",
    )?
    .execute(params![tenant, doc_type, doc_id, ask.reason, ask.requested_at, now, ask.sweep_run])?;
    Ok(())
}

/// How many recorded events a claim moves into `fetch_queue` when the
/// tenant has nothing else due: enough that the events of a burst for one
/// document mostly move together, few enough that the claim's transaction
/// (and the webhook commits queued behind it) stays within milliseconds.
const QUEUE_BATCH: i64 = 256;

/// Moves up to `limit` of `tenant`'s recorded events, oldest first, out of
/// the inbox (`queued = 1`). An event that arrived before a fetch of its
/// document began takes that fetch's outcome: `done` at once if the fetch
/// succeeded (`fetch_covered`), `dead` if it ended the document dead, and
/// nothing new if it is still running (it settles the event). Any other
/// event puts its document in `fetch_queue`. Returns how many moved.
///
/// The inbox insert leaves this to the fetcher so that acknowledging an event
/// writes only pages ordered by id or time; the writes keyed by document id
/// happen here, at the pace documents are fetched, into b-trees as small as
/// the backlog. Correctness does not depend on when it runs: settling only
/// touches `queued = 1` events, and an event queued after its document's
/// fetch began bumps the document's generation, so it is fetched again.
fn queue_recorded_events(
    c: &Connection,
    tenant: &str,
    limit: i64,
    now: &str,
) -> rusqlite::Result<usize> {
    if limit <= 0 {
        return Ok(0);
    }
    // Read first; write per event only where a fetch already decided the
    // event (it leaves the inbox settled, in one write), then take the rest
    // out of the inbox with one range UPDATE. Per document, its coverage and
    // queue row are read once: nothing below changes them before the
    // requests are made at the end.
    let rows: Vec<(i64, String, String, String)> = c
        .prepare_cached(
            "SELECT id, doc_type, doc_id, received_at FROM events
             WHERE tenant = ?1 AND queued = 0 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![tenant, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let Some(last_id) = rows.last().map(|r| r.0) else {
        return Ok(0);
    };
    let mut covered = c.prepare_cached(
        "SELECT max_event FROM fetch_covered WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3",
    )?;
    let mut queue_row = c.prepare_cached(
        "SELECT status, claimed_max_event, lease_owner IS NOT NULL AND lease_until > ?4, attempts, last_error
         FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3",
    )?;
    /// A document's queue row: status, claimed_max_event, leased, attempts, last_error.
    type Row = (String, Option<i64>, bool, i64, Option<String>);
    /// What the batch needs to know of a document: its coverage and queue row.
    type Known = (Option<i64>, Option<Row>);
    let mut documents: std::collections::HashMap<(&str, &str), Known> = Default::default();
    // One request per document for the whole batch, asked for the earliest
    // of its events (a request per event only bumped the same row again).
    // Deferring it past the loop changes no decision: rows are in id order,
    // so every event at or below a document's `claimed_max_event` (the only
    // ones whose branch reads the row's status) comes before any event that
    // asks for a fetch.
    let mut asks: std::collections::HashMap<(&str, &str), &str> = Default::default();
    for (id, doc_type, doc_id, received_at) in &rows {
        let key = (doc_type.as_str(), doc_id.as_str());
        let (last, row) = &*match documents.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let last: Option<i64> = covered
                    .query_row(params![tenant, doc_type, doc_id], |r| r.get(0))
                    .optional()?;
                let row: Option<Row> = queue_row
                    .query_row(params![tenant, doc_type, doc_id, now], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?;
                e.insert((last, row))
            }
        };
        if last.is_some_and(|m| *id <= m) {
            // A fetch that began after this event arrived has stored the document.
            c.prepare_cached(
                "UPDATE events SET queued = 1, status = 'done', processed_at = ?1, next_attempt_at = NULL
                 WHERE id = ?2 AND status = 'pending'",
            )?
            .execute(params![now, id])?;
            continue;
        }
        match row {
            // A fetch running now began after this event arrived: its outcome
            // settles the event (it is `queued = 1` below), so no new request.
            Some((status, Some(m), true, _, _)) if status == "queued" && *id <= *m => {}
            // The document went dead in a fetch that began after this event
            // arrived: the event shares that fate (`retry --dead` revives both)
            // instead of reviving the document for another round of failures.
            Some((status, Some(m), _, attempts, last_error)) if status == "dead" && *id <= *m => {
                c.prepare_cached(
                    "UPDATE events SET queued = 1, status = 'dead', attempts = ?1, last_error = ?2, next_attempt_at = NULL, processed_at = ?3
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
    // Every recorded event up to the batch's last id is one of `rows` (ids
    // only grow, and this transaction is the only writer).
    c.prepare_cached("UPDATE events SET queued = 1 WHERE tenant = ?1 AND queued = 0 AND id <= ?2")?
        .execute(params![tenant, last_id])?;
    for ((doc_type, doc_id), requested_at) in asks {
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

/// What a claim leases with: whose queue, to whom, until when.
struct Lease<'a> {
    tenant: &'a str,
    /// The claim's fencing token (see [`Claim::lease`]).
    owner: &'a str,
    now: &'a str,
    until: &'a str,
    /// Events up to this id were received before the fetch began.
    max_event: i64,
}

/// The lease statement, with `$only` added to the due rows' condition.
/// `reason = 'webhook'` is spelled out (not bound) so SQLite can use the
/// partial index that has the same condition.
macro_rules! lease_sql {
    ($only:literal) => {
        concat!(
            "UPDATE fetch_queue SET lease_owner = ?1, lease_until = ?2, claimed_generation = generation, claimed_max_event = ?3
             WHERE rowid IN (
                 SELECT rowid FROM fetch_queue
                 WHERE tenant = ?4 AND status = 'queued'",
            $only,
            " AND next_attempt_at <= ?5
                   AND (lease_until IS NULL OR lease_until < ?5)
                 ORDER BY next_attempt_at LIMIT ?6)
             RETURNING doc_type, doc_id, generation, attempts, reason"
        )
    };
}

/// Leases up to `limit` due documents; see [`Store::claim`]. A webhook
/// asked for goes first (by the partial index of schema 7: only webhook
/// rows, so finding them costs no scan of a sweep's backlog), then the rest
/// by due time: a sweep that queued thousands of documents does not make a
/// webhook's document wait behind them.
fn lease_due(c: &Connection, lease: &Lease, limit: usize) -> rusqlite::Result<Vec<Leased>> {
    let mut rows = lease_due_where(c, lease_sql!(" AND reason = 'webhook'"), lease, limit)?;
    let rest = limit - rows.len();
    rows.extend(lease_due_where(c, lease_sql!(""), lease, rest)?);
    Ok(rows)
}

/// Runs one of [`lease_due`]'s statements for up to `limit` rows.
fn lease_due_where(
    c: &Connection,
    sql: &str,
    l: &Lease,
    limit: usize,
) -> rusqlite::Result<Vec<Leased>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    c.prepare_cached(sql)?
        .query_map(
            params![l.owner, l.until, l.max_event, l.tenant, l.now, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?
        .collect()
}

impl Store {
    /// Records a delivery; resolves once it is committed durably. Returns the
    /// event id. One INSERT that touches only pages ordered by id or time
    /// (the inbox's whole cost on the acknowledgement path); the fetcher
    /// moves the event's document into `fetch_queue` when it next claims
    /// work ([`queue_recorded_events`]).
    pub async fn insert_event(&self, ev: NewEvent) -> Result<i64, StoreError> {
        // Formatted here, on the caller's thread: the writer thread is the
        // one every acknowledgement waits for. `OR FAIL`: SQLite checks a
        // row's constraints before writing any of it, so a one-row insert
        // that fails has written nothing, and without `ABORT`'s statement
        // rollback SQLite skips the statement journal — a 4 KiB copy of
        // every page the insert touches (the table, three indexes and
        // sqlite_sequence), a measured 3% of the writer's time.
        let now = fmt_ts(ev.received_at);
        self.write_one(move |c| {
            let status = if ev.ignored { "ignored" } else { "pending" };
            // Only an event with a document to fetch waits to be queued.
            let to_queue = !ev.ignored && ev.doc_type.is_some() && ev.doc_id.is_some();
            // `insert` answers the new rowid (the id): no `RETURNING`, which
            // makes SQLite open, fill and free a temporary b-tree per row.
            let id: i64 = c
                .prepare_cached(
                    "INSERT OR FAIL INTO events (tenant, received_at, action, doc_type, doc_id, status, attempts, next_attempt_at, processed_at, payload, queued)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?8, ?9, ?10)",
                )?
                .insert(
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
                        i64::from(!to_queue),
                    ],
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
        // A token no claim had before: the owner (whose leases a stop
        // releases) and a random part, so a claim that lost its lease can
        // never pass for the one that took it over, even in this process.
        let token = format!("{owner}/{}", uuid::Uuid::new_v4().simple());
        self.write(move |c| {
            let now = fmt_ts(now);
            let lease_until = fmt_ts(lease_until);
            // The oldest recorded webhooks join the queue at least as fast as
            // documents are claimed, so a long reconciliation cannot starve
            // them (they sort first: their due time is their arrival).
            let moved = queue_recorded_events(c, &tenant, limit as i64, &now)?;
            let max_event: i64 = c
                .prepare_cached("SELECT coalesce(max(id), 0) FROM events")?
                .query_row([], |r| r.get(0))?;
            let lease = Lease {
                tenant: &tenant,
                owner: &token,
                now: &now,
                until: &lease_until,
                max_event,
            };
            let mut rows = lease_due(c, &lease, limit)?;
            if rows.len() < limit && moved == limit {
                // Nothing else due: move a larger share of the backlog.
                queue_recorded_events(c, &tenant, QUEUE_BATCH, &now)?;
                rows.extend(lease_due(c, &lease, limit - rows.len())?);
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
                        lease: token.clone(),
                        claimed_at: now.clone(),
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
                     SELECT * FROM (SELECT received_at FROM events WHERE tenant = ?1 AND queued = 0 ORDER BY id LIMIT 1))",
                [tenant],
                |r| r.get::<_, Option<String>>(0),
            )?)
        })
        .await
    }

    /// Ends `owner`'s leases without a result (shutdown): the documents are
    /// due again at once. A lease's token starts with its owner and `/`.
    pub async fn release_leases(&self, owner: String) -> Result<usize, StoreError> {
        self.write(move |c| {
            Ok(c.execute(
                "UPDATE fetch_queue SET lease_owner = NULL, lease_until = NULL
                 WHERE lease_owner >= ?1 || '/' AND lease_owner < ?1 || '0'",
                [owner],
            )?)
        })
        .await
    }

    /// Extends `claim`'s lease to `until` while its fetch is still running.
    /// False when the row no longer holds the claim's token (the lease ran
    /// out and another claim took the document, or it was released): the
    /// fetch must stop, whatever it would settle is discarded.
    pub async fn renew_lease(
        &self,
        claim: Claim,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            Ok(c.prepare_cached(
                "UPDATE fetch_queue SET lease_until = ?5
                 WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND lease_owner = ?4",
            )?
            .execute(params![
                claim.tenant,
                claim.doc_type.as_str(),
                claim.doc_id,
                claim.lease,
                fmt_ts(until)
            ])? == 1)
        })
        .await
    }

    /// Settles a failed fetch: back-off, or dead after `max_attempts`.
    pub async fn finish_failed(
        &self,
        claim: Claim,
        f: FetchFailure,
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
                    claim.lease
                ],
            )?;
            if updated == 0 {
                // The lease ran out and another claim took the document over
                // (or a stop released it): that claim settles the events.
                return Ok(FailureResult::Fenced);
            }
            if dead {
                // Every pending event of the document waits on this fetch.
                c.execute(
                    "UPDATE events SET status = 'dead', attempts = ?1, last_error = ?2, next_attempt_at = NULL, processed_at = ?3
                     WHERE tenant = ?4 AND doc_type = ?5 AND doc_id = ?6 AND queued = 1 AND status IN ('pending', 'dead') AND status = 'pending'",
                    params![attempts, message, now, claim.tenant, claim.doc_type.as_str(), claim.doc_id],
                )?;
                Ok(FailureResult::Dead { attempts })
            } else {
                c.execute(
                    "UPDATE events SET attempts = ?1, last_error = ?2, next_attempt_at = ?3
                     WHERE tenant = ?4 AND doc_type = ?5 AND doc_id = ?6 AND queued = 1 AND status IN ('pending', 'dead') AND status = 'pending' AND id <= ?7",
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
                         WHERE tenant = ?2 AND doc_type = ?3 AND doc_id = ?4 AND queued = 1 AND status IN ('pending', 'dead') AND status = 'dead'",
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

/// Whether the queue row still holds `claim`'s token: a settlement is
/// written only then (fencing). Runs inside the caller's write.
pub(super) fn holds_lease(c: &Connection, claim: &Claim) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT 1 FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND lease_owner = ?4",
    )?
    .exists(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.lease])
}

/// Settles the events and the queue row after a fetch that stored the
/// document or found it gone, once [`holds_lease`] said the claim still
/// holds the row. Runs inside the caller's write.
pub(super) fn settle_success(c: &Connection, claim: &Claim, now: &str) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE events SET status = 'done', processed_at = ?1, next_attempt_at = NULL
         WHERE tenant = ?2 AND doc_type = ?3 AND doc_id = ?4 AND queued = 1 AND status IN ('pending', 'dead') AND id <= ?5",
    )?
    .execute(params![now, claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.max_event])?;
    // Events still in the inbox that this fetch covered settle when they
    // move. Only written while such events exist (none can appear later: new
    // events get larger ids), so a fetch with an empty inbox writes nothing
    // here and the table stays as small as the backlog.
    c.prepare_cached(
        "INSERT INTO fetch_covered (tenant, doc_type, doc_id, max_event)
         SELECT ?1, ?2, ?3, ?4
         WHERE EXISTS (SELECT 1 FROM events INDEXED BY events_to_queue WHERE tenant = ?1 AND queued = 0 AND id <= ?4)
         ON CONFLICT (tenant, doc_type, doc_id) DO UPDATE SET max_event = max(max_event, excluded.max_event)",
    )?
    .execute(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.max_event])?;
    let generation: Option<i64> = c
        .prepare_cached(
            "SELECT generation FROM fetch_queue WHERE tenant = ?1 AND doc_type = ?2 AND doc_id = ?3 AND lease_owner = ?4",
        )?
        .query_row(params![claim.tenant, claim.doc_type.as_str(), claim.doc_id, claim.lease], |r| r.get(0))
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
        None => {} // checked by the caller: not reached
    }
    Ok(())
}
