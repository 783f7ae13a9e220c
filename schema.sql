-- skillsync schema, version 1 (PRAGMA user_version = 1).
-- Applied by the daemon at start-up inside one transaction. Later versions are
-- migrations/NNN_*.sql, run in order after this file (version 2
-- adds `events.queued` and re-keys the events indexes: read it with this
-- one); a database whose user_version is newer than the binary knows is
-- refused.
-- Times are RFC 3339 UTC text with milliseconds and Z, so text order is time order.

-- One row per accepted webhook delivery.
CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
    tenant          TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    action          TEXT NOT NULL,
    doc_type        TEXT,            -- 'job', 'project', or the sender's own string for unknown types
    doc_id          TEXT,            -- lower-case hyphenated UUID
    status          TEXT NOT NULL CHECK (status IN ('pending', 'done', 'ignored', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    last_error      TEXT,
    processed_at    TEXT,
    payload         TEXT NOT NULL    -- the body as received
);
CREATE INDEX events_by_document ON events (tenant, doc_type, doc_id, status);
CREATE INDEX events_by_status ON events (status, received_at);

-- The work queue: one row per document that needs fetching, whether a webhook
-- or a reconciliation asked. Coalesces many events for one document, carries
-- the retry state, and leases the document to one fetcher at a time (across
-- processes: `serve` and `reconcile` share it).
CREATE TABLE fetch_queue (
    tenant            TEXT NOT NULL,
    doc_type          TEXT NOT NULL,
    doc_id            TEXT NOT NULL,
    reason            TEXT NOT NULL,             -- 'webhook' or 'reconcile'
    generation        INTEGER NOT NULL DEFAULT 1, -- bumped by every new request
    requested_at      TEXT NOT NULL,             -- first request not yet served
    status            TEXT NOT NULL CHECK (status IN ('queued', 'dead')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TEXT NOT NULL,
    last_error        TEXT,
    last_error_class  TEXT,                      -- 'auth', 'server', 'timeout', 'network', 'rate_limited', 'malformed', 'client'
    lease_owner       TEXT,
    lease_until       TEXT,
    claimed_generation INTEGER,
    claimed_max_event INTEGER,                   -- events up to this id were received before the fetch began
    PRIMARY KEY (tenant, doc_type, doc_id)
);
CREATE INDEX fetch_queue_due ON fetch_queue (tenant, status, next_attempt_at);

-- The mirror. Rows are never hard-deleted: deleted_at is set when the
-- document is gone upstream and cleared if it comes back.
CREATE TABLE jobs (
    tenant        TEXT NOT NULL,
    id            TEXT NOT NULL,
    document      TEXT NOT NULL,   -- JSON as fetched
    number        TEXT,
    name          TEXT,
    modified_on   TEXT,
    version       INTEGER,         -- upstream Version, when the document has one
    revision      INTEGER NOT NULL,
    first_seen_at TEXT NOT NULL,
    fetched_at    TEXT NOT NULL,
    deleted_at    TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX jobs_by_modified ON jobs (tenant, modified_on);

CREATE TABLE projects (
    tenant        TEXT NOT NULL,
    id            TEXT NOT NULL,
    document      TEXT NOT NULL,
    number        TEXT,
    name          TEXT,
    modified_on   TEXT,
    version       INTEGER,
    revision      INTEGER NOT NULL,
    first_seen_at TEXT NOT NULL,
    fetched_at    TEXT NOT NULL,
    deleted_at    TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX projects_by_modified ON projects (tenant, modified_on);

-- One row per stored change of a document.
CREATE TABLE document_history (
    tenant     TEXT NOT NULL,
    doc_type   TEXT NOT NULL,
    id         TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    document   TEXT NOT NULL,
    fetched_at TEXT NOT NULL,
    PRIMARY KEY (tenant, doc_type, id, revision)
);
CREATE INDEX document_history_by_time ON document_history (fetched_at);

-- One row per reconciliation run.
CREATE TABLE sync_runs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant         TEXT NOT NULL,
    doc_type       TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('incremental', 'full')),
    started_at     TEXT NOT NULL,
    finished_at    TEXT,
    status         TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'interrupted')),
    listed         INTEGER NOT NULL DEFAULT 0,
    enqueued       INTEGER NOT NULL DEFAULT 0,
    marked_deleted INTEGER NOT NULL DEFAULT 0,
    missed         INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    owner          TEXT             -- the process that ran it
);
CREATE INDEX sync_runs_by_type ON sync_runs (tenant, doc_type, started_at);

-- Per tenant and type: the incremental watermark and the run lock that keeps
-- two runs of one tenant and type from overlapping (schedule or CLI).
CREATE TABLE sync_state (
    tenant       TEXT NOT NULL,
    doc_type     TEXT NOT NULL,
    watermark    TEXT,             -- highest ModifiedOn of the last fully successful incremental run
    lock_owner   TEXT,
    lock_until   TEXT,
    PRIMARY KEY (tenant, doc_type)
);

-- Small key/value facts the daemon keeps (health probe writes, upstream auth state).
CREATE TABLE daemon_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Per tenant and type: what a report needs to say "complete as of T".
CREATE VIEW sync_status AS
WITH kinds AS (
    SELECT tenant, 'job' AS doc_type FROM jobs
    UNION SELECT tenant, 'project' FROM projects
    UNION SELECT tenant, doc_type FROM sync_runs
    UNION SELECT tenant, doc_type FROM fetch_queue
),
mirror AS (
    SELECT tenant, 'job' AS doc_type,
           count(*) FILTER (WHERE deleted_at IS NULL) AS mirrored,
           count(*) FILTER (WHERE deleted_at IS NOT NULL) AS deleted
    FROM jobs GROUP BY tenant
    UNION ALL
    SELECT tenant, 'project',
           count(*) FILTER (WHERE deleted_at IS NULL),
           count(*) FILTER (WHERE deleted_at IS NOT NULL)
    FROM projects GROUP BY tenant
),
queue AS (
    SELECT tenant, doc_type,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'queued' AND attempts > 0) AS retrying,
           count(*) FILTER (WHERE status = 'dead') AS dead_documents,
           min(requested_at) FILTER (WHERE status = 'queued') AS oldest_queued_at,
           -- dead documents are not mirrored either: they hold complete_as_of back too
           min(requested_at) AS oldest_unmirrored_at
    FROM fetch_queue GROUP BY tenant, doc_type
),
ev AS (
    SELECT tenant, doc_type,
           count(*) FILTER (WHERE status = 'pending') AS pending_events,
           count(*) FILTER (WHERE status = 'dead') AS dead_events,
           min(received_at) FILTER (WHERE status = 'pending') AS oldest_pending_at
    FROM events WHERE status IN ('pending', 'dead') GROUP BY tenant, doc_type
),
last_ok AS (
    SELECT tenant, doc_type, max(started_at) AS last_ok_started_at, max(finished_at) AS last_ok_finished_at
    FROM sync_runs WHERE status = 'ok' GROUP BY tenant, doc_type
),
last_run AS (
    SELECT r.tenant, r.doc_type, r.kind, r.status, r.finished_at, r.missed, r.error
    FROM sync_runs r
    WHERE r.id = (SELECT max(id) FROM sync_runs r2 WHERE r2.tenant = r.tenant AND r2.doc_type = r.doc_type)
)
SELECT k.tenant, k.doc_type,
       coalesce(m.mirrored, 0) AS mirrored,
       coalesce(m.deleted, 0) AS deleted,
       coalesce(e.pending_events, 0) AS pending_events,
       coalesce(q.queued, 0) AS queued_fetches,
       coalesce(q.retrying, 0) AS retrying_fetches,
       coalesce(e.dead_events, 0) AS dead_events,
       coalesce(q.dead_documents, 0) AS dead_documents,
       min(coalesce(e.oldest_pending_at, q.oldest_queued_at), coalesce(q.oldest_queued_at, e.oldest_pending_at)) AS oldest_pending_at,
       lo.last_ok_started_at,
       lo.last_ok_finished_at,
       lr.kind AS last_run_kind,
       lr.status AS last_run_status,
       lr.finished_at AS last_run_finished_at,
       lr.missed AS last_run_missed,
       lr.error AS last_run_error,
       -- Every change made upstream before this time is in the mirror: the
       -- start of the last successful reconciliation, or earlier while
       -- fetches are still waiting.
       CASE
           WHEN lo.last_ok_started_at IS NULL THEN NULL
           ELSE min(lo.last_ok_started_at,
                    coalesce(q.oldest_unmirrored_at, lo.last_ok_started_at),
                    coalesce(e.oldest_pending_at, lo.last_ok_started_at))
       END AS complete_as_of
FROM kinds k
LEFT JOIN mirror m ON m.tenant = k.tenant AND m.doc_type = k.doc_type
LEFT JOIN queue q ON q.tenant = k.tenant AND q.doc_type = k.doc_type
LEFT JOIN ev e ON e.tenant = k.tenant AND e.doc_type = k.doc_type
LEFT JOIN last_ok lo ON lo.tenant = k.tenant AND lo.doc_type = k.doc_type
LEFT JOIN last_run lr ON lr.tenant = k.tenant AND lr.doc_type = k.doc_type;
