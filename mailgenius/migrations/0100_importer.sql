-- Importer: bookkeeping the loader needs beyond 0001's imports / import_errors tables.

-- Leads that already existed when a skip-mode import met them (left untouched, counted in
-- imports.duplicates). Remembering their keys lets a later batch of the same import tell
-- "second occurrence in this file" (an error row, reason duplicate) from "existing lead".
-- Rows are deleted when the import finishes.
CREATE TABLE import_skipped (
    import_id   bigint NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    email_key   text NOT NULL,           -- lower(email)
    PRIMARY KEY (import_id, email_key)
);

-- existing leads left unchanged by a skip-mode import (a subset of imports.duplicates)
ALTER TABLE imports ADD COLUMN skipped_existing bigint NOT NULL DEFAULT 0;
-- how many times a worker (re)started this import: > 1 means it resumed after a crash
ALTER TABLE imports ADD COLUMN attempts integer NOT NULL DEFAULT 0;
