-- Exporter: exact lead counts by status, kept up to date as leads change, so that neither a
-- scrape nor the exporter's background refresh ever counts the (2,000,000+ row) leads table.
--
-- Statement-level triggers append one delta row per status touched by each statement
-- (an import batch of 100,000 rows adds at most 4 rows here). Appending instead of updating one
-- counter row per status means concurrent importers never wait on each other's counter locks.
-- The exporter sums the deltas (a few dozen rows) and, when they pile up, folds them into one row
-- per status (exporter.collectors.LeadCounts.compact). TRUNCATE leads empties the deltas.

CREATE TABLE exporter_lead_counts (
    status  text   NOT NULL,
    delta   bigint NOT NULL
);

CREATE FUNCTION exporter_lead_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO exporter_lead_counts (status, delta)
    SELECT status, count(*) FROM exporter_new_rows GROUP BY status;
    RETURN NULL;
END $$;

CREATE FUNCTION exporter_lead_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO exporter_lead_counts (status, delta)
    SELECT status, sum(d) FROM (
        SELECT status, -1 AS d FROM exporter_old_rows
        UNION ALL
        SELECT status, 1 AS d FROM exporter_new_rows
    ) changes
    GROUP BY status
    HAVING sum(d) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION exporter_lead_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO exporter_lead_counts (status, delta)
    SELECT status, -count(*) FROM exporter_old_rows GROUP BY status;
    RETURN NULL;
END $$;

CREATE FUNCTION exporter_lead_counts_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM exporter_lead_counts;
    RETURN NULL;
END $$;

CREATE TRIGGER exporter_lead_counts_insert AFTER INSERT ON leads
    REFERENCING NEW TABLE AS exporter_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION exporter_lead_counts_insert();
CREATE TRIGGER exporter_lead_counts_update AFTER UPDATE ON leads
    REFERENCING OLD TABLE AS exporter_old_rows NEW TABLE AS exporter_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION exporter_lead_counts_update();
CREATE TRIGGER exporter_lead_counts_delete AFTER DELETE ON leads
    REFERENCING OLD TABLE AS exporter_old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION exporter_lead_counts_delete();
CREATE TRIGGER exporter_lead_counts_truncate AFTER TRUNCATE ON leads
    FOR EACH STATEMENT EXECUTE FUNCTION exporter_lead_counts_truncate();

-- the rows already there when this migration runs (an empty table on a fresh install)
INSERT INTO exporter_lead_counts (status, delta)
SELECT status, count(*) FROM leads GROUP BY status;
