-- skillsync schema, version 2: the webhook inbox only appends.
--
-- Recording an event used to write two b-trees keyed by document id (the
-- events_by_document index and fetch_queue), which land on random pages:
-- about two 4 KiB WAL frames per event, most of the writer's time. Now an
-- event is inserted with `queued = 0`, touching only pages ordered by id or
-- time, and the fetcher moves it into fetch_queue (setting `queued = 1`, which
-- also puts it in events_by_document) when it next claims work, off the
-- acknowledgement path. See src/store/queue.rs.

-- 0: the event's document is not in fetch_queue yet; 1: it is, or the event
-- needs no fetch. Rows from version 1 were queued when recorded.
ALTER TABLE events ADD COLUMN queued INTEGER NOT NULL DEFAULT 1;

DROP INDEX events_by_document;
CREATE INDEX events_by_document ON events (tenant, doc_type, doc_id, status) WHERE queued = 1;

-- The events still to be moved into fetch_queue, per tenant in arrival order.
CREATE INDEX events_to_queue ON events (tenant, id) WHERE queued = 0;
