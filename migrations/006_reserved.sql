-- skillsync schema, version 6: reserved, changes nothing.
--
-- A version 6 (the "inbox cursor": an `inbox_cursor` table) was on the main
-- line for about an hour on 2026-12-02 and then reverted. A database its
-- binary wrote says user_version 6 and is refused (the store checks for
-- `inbox_cursor` before anything touches the file; see
-- tests/fixtures/schema-6-reverted.db). This step only moves a version-5
-- database past that number, so the two can never be confused.
SELECT 1;
