-- Importer: column mappings.
-- columns: the explicit mapping sent with the upload ({"<header>": "<field>"}), NULL when the
--          columns were detected; mapping: the mapping the worker applied, one
--          {"column", "field"} object per header column in order (shown by the monitoring page).
ALTER TABLE imports ADD COLUMN columns jsonb;
ALTER TABLE imports ADD COLUMN mapping jsonb;
