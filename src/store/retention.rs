//! Retention's statements: deleting old `done`/`ignored` events, old
//! `document_history` revisions and `fetch_covered` rows no recorded event
//! needs, each call one bounded batch in its own short write. The schedule
//! and the batching loop are in `crate::retention`; this file owns only SQL.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{Store, StoreError};
use crate::model::fmt_ts;

/// What an age-bound pruning pass deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aged {
    /// `done`/`ignored` events received before the bound.
    Events,
    /// `document_history` rows fetched before the bound, never a
    /// document's latest revision.
    History,
}

impl Aged {
    /// The name logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Aged::Events => "events",
            Aged::History => "history",
        }
    }

    /// The statement: `?1` is the time bound, `?2` the batch size.
    fn sql(self) -> &'static str {
        match self {
            Aged::Events => {
                "DELETE FROM events WHERE id IN (
                     SELECT id FROM events WHERE status IN ('done', 'ignored') AND received_at < ?1 ORDER BY id LIMIT ?2)"
            }
            Aged::History => {
                "DELETE FROM document_history WHERE rowid IN (
                     SELECT h.rowid FROM document_history h
                     WHERE h.fetched_at < ?1
                       AND h.revision < (SELECT max(revision) FROM document_history x
                                         WHERE x.tenant = h.tenant AND x.doc_type = h.doc_type AND x.id = h.id)
                     LIMIT ?2)"
            }
        }
    }
}

impl Store {
    /// Deletes up to `batch` rows of `what` older than `before`, as its own
    /// write. Returns how many were deleted.
    pub async fn prune_aged(
        &self,
        what: Aged,
        before: DateTime<Utc>,
        batch: usize,
    ) -> Result<usize, StoreError> {
        let sql = what.sql();
        self.write(move |c| Ok(c.execute(sql, params![fmt_ts(before), batch as i64])?))
            .await
    }

    /// Deletes up to `batch` `fetch_covered` rows that no recorded event can
    /// need any more (every event still in the inbox is newer than what the
    /// row covers). Returns how many were deleted.
    pub async fn prune_fetch_covered(&self, batch: usize) -> Result<usize, StoreError> {
        self.write(move |c| {
            Ok(c.execute(
                "DELETE FROM fetch_covered WHERE rowid IN (
                     SELECT rowid FROM fetch_covered
                     WHERE max_event < coalesce((SELECT min(id) FROM events INDEXED BY events_to_queue WHERE queued = 0), max_event + 1)
                     LIMIT ?1)",
                [batch as i64],
            )?)
        })
        .await
    }
}
