-- skillsync schema, version 2: the webhook inbox only appends.
--
-- Recording an event used to write two b-trees keyed by document id (the
-- events_by_document index and fetch_queue), which land on random pages:
-- about two 4 KiB WAL frames per event, most of the writer's time. Now an
-- event is inserted with `queued = 0`, touching only pages ordered by id or
-- time, and the fetcher moves recorded events into fetch_queue as it needs
-- work (src/store/queue.rs, `queue_recorded_events`), off the
-- acknowledgement path and at the pace documents are fetched.

-- 0: recorded, its document not yet in fetch_queue; 1: queued (or needs no
-- fetch). Rows from version 1 were queued when recorded.
ALTER TABLE events ADD COLUMN queued INTEGER NOT NULL DEFAULT 1;

-- Only events still waiting on a fetch (or dead) are indexed by document:
-- the index stays as small as the backlog, so its random writes are cheap.
DROP INDEX events_by_document;
CREATE INDEX events_by_document ON events (tenant, doc_type, doc_id, status)
    WHERE queued = 1 AND status IN ('pending', 'dead');

-- The events still to be moved into fetch_queue, per tenant in arrival order.
CREATE INDEX events_to_queue ON events (tenant, id) WHERE queued = 0;

-- Per document, the newest event id the last successful fetch covered (its
-- claim's `claimed_max_event`): a recorded event at or below it arrived
-- before that fetch began, so it is settled without another fetch. Pruned
-- once no recorded event could need it.
CREATE TABLE fetch_covered (
    tenant    TEXT NOT NULL,
    doc_type  TEXT NOT NULL,
    doc_id    TEXT NOT NULL,
    max_event INTEGER NOT NULL,
    PRIMARY KEY (tenant, doc_type, doc_id)
);
