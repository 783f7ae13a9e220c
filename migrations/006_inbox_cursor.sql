-- skillsync schema, version 6 (issue 14): the inbox is passed by a cursor,
-- and a fetch settles every waiting event of its document directly.
--
-- Version 2 recorded an event with `queued = 0` and the fetcher later moved
-- it (`queued = 1`), so each event's row and three index entries were
-- written twice before it was settled, and events a fetch covered before
-- they moved needed a table of their own (`fetch_covered`). Now the fetcher
-- reads the events after one cursor (`inbox_cursor.last_id`, the newest
-- event it has turned into fetch requests) and writes nothing per event to
-- pass them; a fetch settles every pending event of its document received
-- before it began, whether the cursor has reached it or not; and the
-- waiting events are indexed by document from the moment they are recorded
-- (the index holds only `pending`/`dead` events, as small as the backlog).
-- An accepted event is still a row of `events` with its status, as before.
--
-- `events.queued` is no longer read or written (new rows keep its default);
-- it stays so that upgrading does not rewrite the table.

CREATE TABLE inbox_cursor (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL  -- events up to this id have been turned into fetch requests
);

-- Recorded events that a finished fetch already covered settle now, as the
-- move would have settled them.
UPDATE events SET status = 'done', processed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), next_attempt_at = NULL
WHERE queued = 0 AND status = 'pending'
  AND id <= (SELECT f.max_event FROM fetch_covered f
             WHERE f.tenant = events.tenant AND f.doc_type = events.doc_type AND f.doc_id = events.doc_id);

-- The cursor starts before the oldest event not yet moved (or after the last
-- event). Events after it that had moved already are looked at again: at
-- most one more fetch of their documents.
INSERT INTO inbox_cursor (id, last_id)
VALUES (1, coalesce((SELECT min(id) - 1 FROM events WHERE queued = 0),
                    (SELECT max(id) FROM events), 0));

DROP TABLE fetch_covered;
DROP INDEX events_to_queue;
DROP INDEX events_recorded_by_document;
DROP INDEX events_by_document;
CREATE INDEX events_by_document ON events (tenant, doc_type, doc_id, status)
    WHERE status IN ('pending', 'dead');
