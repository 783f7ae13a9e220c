-- skillsync schema, version 5 (issue 14; 004 is issue 16's): a listing page
-- finds its recorded-but-unqueued webhooks by document id.
--
-- Reconciliation treats a document whose webhook is recorded but not yet
-- moved into fetch_queue as announced (`page_state`). It used to load every
-- such doc id of the tenant once per listing page: O(inbox backlog) per page.
-- This partial index holds only the recorded events (`queued = 0`), so it is
-- as small as that backlog and a page looks up just its own ids.
-- IF NOT EXISTS: harmless if a pre-merge build (where this file was the
-- fourth migration) already created it.
CREATE INDEX IF NOT EXISTS events_recorded_by_document ON events (tenant, doc_type, doc_id)
    WHERE queued = 0;
