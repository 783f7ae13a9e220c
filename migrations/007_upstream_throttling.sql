-- skillsync schema, version 7 (issue 28): the request budget.
--
-- When each tenant's upstream last refused a request with 429, for
-- `skillsync status` ("throttled in the last hour"). `status` is another
-- process than the daemon that saw the 429, so the daemon (and `reconcile`)
-- write it here, at most once per 10 s per tenant. One small row per tenant.
-- IF NOT EXISTS here and below: self-contained. (Written as version 6, then
-- renumbered: version 6 is reserved, see 006_reserved.sql.)
CREATE TABLE IF NOT EXISTS upstream_throttling (
    tenant          TEXT PRIMARY KEY,
    throttled_at    TEXT NOT NULL,     -- the latest 429 recorded (RFC 3339 UTC)
    allowed_rate    REAL,              -- requests/s the budget allowed after it; NULL: no limit
    refusals_total  INTEGER NOT NULL   -- 429s recorded for the tenant, ever
);

-- A webhook's document is claimed before a reconciliation's (the request
-- budget makes claims slow enough for the order to matter): the claim looks
-- for due webhook rows first, in this index of webhook rows only, so it
-- never scans past a sweep's backlog to find them.
CREATE INDEX IF NOT EXISTS fetch_queue_due_webhooks ON fetch_queue (tenant, status, next_attempt_at)
    WHERE reason = 'webhook';
