-- skillsync schema, version 4: the outbox that feeds the PostgreSQL mirror.
--
-- Every change of a mirrored document's revision or deleted_at appends one
-- row here, in the same transaction as the change: triggers, so no writer
-- (the fetcher, `reconcile` in another process, a future one) can forget.
-- Triggers fire only once a PostgreSQL sink has been switched on for this
-- database (a `pg_sink` row); before that, its first start copies the
-- tables whole (the backfill) and needs no outbox.
-- The sink reads the outbox in `seq` order, collapses repeated changes to
-- one document, and deletes rows only up to what PostgreSQL acknowledged.

CREATE TABLE pg_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
    doc_type   TEXT NOT NULL,                      -- 'job' or 'project'
    tenant     TEXT NOT NULL,
    id         TEXT NOT NULL,
    revision   INTEGER NOT NULL,                   -- the document's revision after the change
    changed_at TEXT NOT NULL                       -- when the change was written (lag is measured from it)
);

-- One row once a PostgreSQL sink has run against this database.
CREATE TABLE pg_sink (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    since_seq   INTEGER NOT NULL,  -- the outbox is complete from this seq on (the switch-on point)
    acked_seq   INTEGER NOT NULL,  -- PostgreSQL holds every change up to this seq
    acked_at    TEXT,
    target      TEXT               -- host, database and schema (never a password), for `status`
);

-- This database's identity: the PostgreSQL cursor names it, so a second
-- database (another instance, a copy) cannot write into the same schema.
INSERT OR IGNORE INTO daemon_state (key, value) VALUES ('database_id', lower(hex(randomblob(16))));

CREATE TRIGGER jobs_pg_outbox_insert AFTER INSERT ON jobs
WHEN EXISTS (SELECT 1 FROM pg_sink)
BEGIN
    INSERT INTO pg_outbox (doc_type, tenant, id, revision, changed_at)
    VALUES ('job', NEW.tenant, NEW.id, NEW.revision, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;

CREATE TRIGGER jobs_pg_outbox_update AFTER UPDATE OF revision, deleted_at ON jobs
WHEN (NEW.revision IS NOT OLD.revision OR NEW.deleted_at IS NOT OLD.deleted_at)
     AND EXISTS (SELECT 1 FROM pg_sink)
BEGIN
    INSERT INTO pg_outbox (doc_type, tenant, id, revision, changed_at)
    VALUES ('job', NEW.tenant, NEW.id, NEW.revision, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;

CREATE TRIGGER projects_pg_outbox_insert AFTER INSERT ON projects
WHEN EXISTS (SELECT 1 FROM pg_sink)
BEGIN
    INSERT INTO pg_outbox (doc_type, tenant, id, revision, changed_at)
    VALUES ('project', NEW.tenant, NEW.id, NEW.revision, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;

CREATE TRIGGER projects_pg_outbox_update AFTER UPDATE OF revision, deleted_at ON projects
WHEN (NEW.revision IS NOT OLD.revision OR NEW.deleted_at IS NOT OLD.deleted_at)
     AND EXISTS (SELECT 1 FROM pg_sink)
BEGIN
    INSERT INTO pg_outbox (doc_type, tenant, id, revision, changed_at)
    VALUES ('project', NEW.tenant, NEW.id, NEW.revision, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
END;
