CREATE VIEW sync_status AS
WITH kinds AS (
    -- One scan of each table under a single DISTINCT: DuckDB (1.5) wrongly
    -- merges same-shaped aggregates over two SQLite tables in a UNION.
    SELECT DISTINCT tenant, doc_type FROM (
        SELECT tenant, 'job' AS doc_type FROM jobs
        UNION ALL SELECT tenant, 'project' AS doc_type FROM projects
        UNION ALL SELECT tenant, doc_type FROM sync_runs
        UNION ALL SELECT tenant, doc_type FROM fetch_queue
    ) AS k
),
-- Counts are count(CASE …), not sum(CASE … 1 ELSE 0): the same numbers, but
-- DuckDB types a sum of integers as HUGEINT, which many clients cannot take.
mirror AS (
    SELECT tenant, doc_type,
           count(CASE WHEN deleted_at IS NULL THEN 1 END) AS mirrored,
           count(CASE WHEN deleted_at IS NOT NULL THEN 1 END) AS deleted
    FROM (
        SELECT tenant, 'job' AS doc_type, deleted_at FROM jobs
        UNION ALL SELECT tenant, 'project' AS doc_type, deleted_at FROM projects
    ) AS m
    GROUP BY tenant, doc_type
),
queue AS (
    SELECT tenant, doc_type,
           count(CASE WHEN status = 'queued' THEN 1 END) AS queued,
           count(CASE WHEN status = 'queued' AND attempts > 0 THEN 1 END) AS retrying,
           count(CASE WHEN status = 'dead' THEN 1 END) AS dead_documents,
           min(CASE WHEN status = 'queued' THEN requested_at END) AS oldest_queued_at,
           min(requested_at) AS oldest_unmirrored_at
    FROM fetch_queue GROUP BY tenant, doc_type
),
ev AS (
    SELECT tenant, doc_type,
           count(CASE WHEN status = 'pending' THEN 1 END) AS pending_events,
           count(CASE WHEN status = 'dead' THEN 1 END) AS dead_events,
           min(CASE WHEN status = 'pending' THEN received_at END) AS oldest_pending_at
    FROM events WHERE status IN ('pending', 'dead') GROUP BY tenant, doc_type
),
last_ok AS (
    SELECT tenant, doc_type, max(started_at) AS last_ok_started_at, max(finished_at) AS last_ok_finished_at
    FROM sync_runs WHERE status = 'ok' GROUP BY tenant, doc_type
),
last_run AS (
    SELECT r.tenant, r.doc_type, r.kind, r.status, r.finished_at, r.missed, r.error
    FROM sync_runs r
    WHERE r.id = (SELECT max(r2.id) FROM sync_runs r2 WHERE r2.tenant = r.tenant AND r2.doc_type = r.doc_type)
),
-- The last finished accuracy audit (`skillsync verify` or audit_schedule).
last_audit AS (
    SELECT a.tenant, a.doc_type, a.finished_at, a.accuracy_lower_bound
    FROM audits a
    JOIN (SELECT tenant, doc_type, max(id) AS id FROM audits
          WHERE finished_at IS NOT NULL GROUP BY tenant, doc_type) AS l ON l.id = a.id
),
joined AS (
    SELECT k.tenant, k.doc_type, m.mirrored, m.deleted, e.pending_events, e.dead_events,
           e.oldest_pending_at AS ev_oldest, q.queued, q.retrying, q.dead_documents,
           q.oldest_queued_at AS q_oldest, q.oldest_unmirrored_at,
           lo.last_ok_started_at, lo.last_ok_finished_at,
           lr.kind AS last_run_kind, lr.status AS last_run_status, lr.finished_at AS last_run_finished_at,
           lr.missed AS last_run_missed, lr.error AS last_run_error,
           la.finished_at AS audited_at, la.accuracy_lower_bound
    FROM kinds k
    LEFT JOIN mirror m ON m.tenant = k.tenant AND m.doc_type = k.doc_type
    LEFT JOIN queue q ON q.tenant = k.tenant AND q.doc_type = k.doc_type
    LEFT JOIN ev e ON e.tenant = k.tenant AND e.doc_type = k.doc_type
    LEFT JOIN last_ok lo ON lo.tenant = k.tenant AND lo.doc_type = k.doc_type
    LEFT JOIN last_run lr ON lr.tenant = k.tenant AND lr.doc_type = k.doc_type
    LEFT JOIN last_audit la ON la.tenant = k.tenant AND la.doc_type = k.doc_type
)
SELECT tenant, doc_type,
       coalesce(mirrored, 0) AS mirrored,
       coalesce(deleted, 0) AS deleted,
       coalesce(pending_events, 0) AS pending_events,
       coalesce(queued, 0) AS queued_fetches,
       coalesce(retrying, 0) AS retrying_fetches,
       coalesce(dead_events, 0) AS dead_events,
       coalesce(dead_documents, 0) AS dead_documents,
       -- the earlier of two times, either of which may be NULL
       CASE WHEN q_oldest IS NULL OR ev_oldest <= q_oldest THEN ev_oldest ELSE q_oldest END AS oldest_pending_at,
       last_ok_started_at,
       last_ok_finished_at,
       last_run_kind,
       last_run_status,
       last_run_finished_at,
       last_run_missed,
       last_run_error,
       -- Every change made upstream before this time is in the mirror: the
       -- start of the last successful reconciliation, or earlier while
       -- fetches are still waiting (dead documents are not mirrored either).
       CASE
           WHEN last_ok_started_at IS NULL THEN NULL
           WHEN oldest_unmirrored_at < last_ok_started_at
                AND (ev_oldest IS NULL OR oldest_unmirrored_at <= ev_oldest) THEN oldest_unmirrored_at
           WHEN ev_oldest < last_ok_started_at THEN ev_oldest
           ELSE last_ok_started_at
       END AS complete_as_of,
       -- 1 while the report tables are being refilled after a [reporting]
       -- change: job_report / project_report / *_stages rows may still lack
       -- their values (`skillsync status` shows the progress).
       (SELECT count(*) FROM daemon_state WHERE key = 'report_rebuild') AS report_rebuilding,
       -- When the last accuracy audit finished, and the one-sided 95% lower
       -- bound it gave on the share of live documents that are right (0-1).
       audited_at,
       accuracy_lower_bound
FROM joined
