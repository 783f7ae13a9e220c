-- skillsync schema, version 8 (issue 24): the accuracy audit.
--
-- One row per audit of one tenant and type (`skillsync verify`, or the
-- tenant's `audit_schedule`): a sample of the mirror's documents was fetched
-- upstream and compared with the mirror by content. `finished_at` is NULL
-- while the audit runs (or if its process died: such rows never count as
-- "the last audit"). What each count means is in README.md ("Accuracy audit"):
--   sampled          documents picked (live and deleted)
--   matched          upstream agreed with the mirror
--   stale            live in the mirror, upstream serves other content
--   missing          live in the mirror, upstream answers 404/410
--   wrongly_deleted  marked deleted in the mirror, upstream serves it
--   refetched        mismatches (of the three kinds above) queued for a refetch
--   unreadable       upstream did not answer usably (5xx, 429, timeout, no
--                    permit from the request budget, 401/403, bad body):
--                    neither right nor wrong, left out of the bound
--   in_flight        differed, but a fetch of it was already queued, or it
--                    changed upstream moments ago or in the mirror during the
--                    audit: the mirror was catching up, not wrong
--   bound_sample     how many checked live documents the bound is computed
--                    from (the uniformly random ones), bound_wrong how many
--                    of them were wrong
--   accuracy_lower_bound  one-sided 95% lower bound (Clopper-Pearson) on the
--                    share of live documents that are right; NULL when
--                    nothing random could be checked
-- IF NOT EXISTS: self-contained, like 007.
CREATE TABLE IF NOT EXISTS audits (
    id                    INTEGER PRIMARY KEY,
    tenant                TEXT NOT NULL,
    doc_type              TEXT NOT NULL,
    started_at            TEXT NOT NULL,
    finished_at           TEXT,
    sampled               INTEGER NOT NULL DEFAULT 0,
    matched               INTEGER NOT NULL DEFAULT 0,
    stale                 INTEGER NOT NULL DEFAULT 0,
    missing               INTEGER NOT NULL DEFAULT 0,
    wrongly_deleted       INTEGER NOT NULL DEFAULT 0,
    refetched             INTEGER NOT NULL DEFAULT 0,
    unreadable            INTEGER NOT NULL DEFAULT 0,
    in_flight             INTEGER NOT NULL DEFAULT 0,
    bound_sample          INTEGER NOT NULL DEFAULT 0,
    bound_wrong           INTEGER NOT NULL DEFAULT 0,
    accuracy_lower_bound  REAL,
    error                 TEXT
);
CREATE INDEX IF NOT EXISTS audits_by_type ON audits (tenant, doc_type, id);
