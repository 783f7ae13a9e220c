-- skillsync schema, version 3: deletion needs evidence.
--
-- A full sweep no longer sets `deleted_at` on what its listing did not show:
-- those documents are candidates, queued for a GET like any other fetch,
-- and only a 404/410 answer marks one deleted. The queue row remembers the
-- sweep that asked, so the confirmation is counted in that run's
-- `marked_deleted` in the same transaction that sets `deleted_at`.

-- Documents the sweep did not list and queued for a confirming GET.
ALTER TABLE sync_runs ADD COLUMN candidates INTEGER NOT NULL DEFAULT 0;

-- The full sweep (sync_runs.id) that queued this document as a deletion
-- candidate; NULL for every other request.
ALTER TABLE fetch_queue ADD COLUMN sweep_run INTEGER;
