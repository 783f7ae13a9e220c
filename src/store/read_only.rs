//! [`ReadOnlyStore`]: an existing database opened read-only, for the
//! processes and threads that only read it — the `status`, `columns` and
//! `postgres-check` commands, and the PostgreSQL sink's thread, which reads
//! the outbox here and writes its bookkeeping through [`Store`]'s writer.
//!
//! Its methods are typed reads; the SQLite connection never leaves the
//! store. Every method blocks: call them from a thread of their own (a CLI
//! command, the sink's thread), never on an async worker thread. The outbox
//! reads are in [`super::outbox`], beside the rest of the outbox's SQL.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde_json::{Map, Value};

use super::audit::{AuditRow, last_audits};
use super::report::RebuildState;
use super::status::{StatusRow, Throttling, queue_rows, status_rows, throttling_rows};
use super::{Store, StoreError, open_read_only_versioned};
use crate::model::DocType;

/// A read-only handle on an existing skillsync database. Not `Sync`: one
/// thread reads through it at a time.
pub struct ReadOnlyStore {
    /// Opened read-only, never creating the file or running migrations.
    pub(super) conn: Connection,
    path: PathBuf,
}

impl ReadOnlyStore {
    /// Opens an existing database for reading only: never creates the file
    /// or runs migrations, refuses a too-new schema, and refuses a file
    /// with no schema at all (not a skillsync database).
    pub fn open(path: &Path) -> Result<ReadOnlyStore, StoreError> {
        let (conn, version) = open_read_only_versioned(path)?;
        if version == 0 {
            return Err(StoreError::Other(format!(
                "{} is not a skillsync database (no schema)",
                path.display()
            )));
        }
        Ok(ReadOnlyStore {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// A read-only handle on `store`'s file (the sink's thread has one).
    pub fn of(store: &Store) -> Result<ReadOnlyStore, StoreError> {
        ReadOnlyStore::open(store.path())
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Per tenant and type, what `status` reports (the `sync_status` view).
    pub fn status_rows(&self) -> Result<Vec<StatusRow>, StoreError> {
        status_rows(&self.conn)
    }

    /// The queue side of the status rows only (tenant, type, the pending,
    /// queued, retrying and dead counts, `oldest_pending_at`,
    /// `complete_as_of`); the rest at their defaults. What the PostgreSQL
    /// sink copies every few seconds.
    pub fn queue_rows(&self) -> Result<Vec<StatusRow>, StoreError> {
        queue_rows(&self.conn)
    }

    /// Every tenant's latest recorded upstream throttling (429). A database
    /// from before schema 7 has no such table: an error the caller may treat
    /// as "nothing recorded".
    pub fn throttling(&self) -> Result<Vec<Throttling>, StoreError> {
        throttling_rows(&self.conn)
    }

    /// The latest finished accuracy audit of every tenant and type (none
    /// before schema 8).
    pub fn last_audits(&self) -> Result<Vec<AuditRow>, StoreError> {
        last_audits(&self.conn)
    }

    /// The report rebuild in progress, if any.
    pub fn report_rebuild(&self) -> Result<Option<RebuildState>, StoreError> {
        super::report::rebuild_state(&self.conn)
    }

    /// Calls `f` with every live document of a type, parsed (the field
    /// survey of `skillsync columns`).
    pub fn survey(
        &self,
        ty: DocType,
        f: impl FnMut(&Map<String, Value>),
    ) -> Result<(), StoreError> {
        super::report::for_each_live_document(&self.conn, ty, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_an_error_and_is_not_created() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("missing.db");
        let e = ReadOnlyStore::open(&path)
            .err()
            .ok_or("opened a missing file")?;
        assert!(e.to_string().contains("missing.db"), "{e}");
        assert!(!path.exists(), "a read-only open created the file");
        Ok(())
    }

    #[test]
    fn a_file_without_a_schema_is_not_a_skillsync_database()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("other.db");
        Connection::open(&path)?.execute_batch("CREATE TABLE t (x)")?;
        let e = ReadOnlyStore::open(&path)
            .err()
            .ok_or("opened a foreign file")?;
        assert!(e.to_string().contains("not a skillsync database"), "{e}");
        Ok(())
    }

    /// The sink's narrow read gives the same queue figures as `status`.
    #[test]
    fn queue_rows_are_the_queue_side_of_the_status_rows() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("q.db");
        let store = Store::open(&path, std::time::Duration::from_secs(5))?;
        super::super::fill_synthetic_jobs(&path, "acme", 3, 1)?;
        Connection::open(&path)?.execute_batch(
            "INSERT INTO events (tenant, received_at, action, doc_type, doc_id, status, payload, queued)
             VALUES ('acme', '2026-01-01T00:00:00.000Z', 'updated', 'job', 'a', 'pending', '{}', 1);",
        )?;
        let db = ReadOnlyStore::of(&store)?;
        let (full, queue) = (db.status_rows()?, db.queue_rows()?);
        assert!(!full.is_empty());
        assert!(full.iter().any(|r| r.pending_events == 1), "{full:?}");
        let side = |r: &StatusRow| {
            (
                r.tenant.clone(),
                r.doc_type,
                [
                    r.pending_events,
                    r.queued_fetches,
                    r.retrying_fetches,
                    r.dead_events,
                    r.dead_documents,
                ],
                r.oldest_pending_at.clone(),
                r.complete_as_of.clone(),
            )
        };
        assert_eq!(
            full.iter().map(side).collect::<Vec<_>>(),
            queue.iter().map(side).collect::<Vec<_>>()
        );
        Ok(())
    }

    #[test]
    fn a_new_database_reads_empty() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("new.db");
        let store = Store::open(&path, std::time::Duration::from_secs(5))?;
        let db = ReadOnlyStore::of(&store)?;
        assert_eq!(db.path(), path.as_path());
        assert!(db.status_rows()?.is_empty());
        assert!(db.last_audits()?.is_empty());
        assert!(db.report_rebuild()?.is_none());
        let mut seen = 0;
        db.survey(DocType::Job, |_| seen += 1)?;
        assert_eq!(seen, 0);
        Ok(())
    }
}
