-- ANALYZE of the outbox and inbox: under load autovacuum analyzes them at each of its rounds
-- (once a minute per database; each order adds and changes rows), and the default sample
-- (30,000 rows, statistics on every column, jsonb payloads compared to build them) cost
-- 0.45 s of CPU per outbox ANALYZE at 85,000 rows (0.5 s at 200,000), in one burst. No query
-- filters or sorts on a payload, and the few plans these tables need (partial indexes,
-- `IS NULL`, a time range) do with a 3,000-row sample.
-- A column added to either table later needs its target here too: one left at the default
-- brings the 30,000-row sample back (tests/integration/test_pipeline.py checks for that).
ALTER TABLE outbox
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN headers SET STATISTICS 0,
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN event_id SET STATISTICS 10,
    ALTER COLUMN topic SET STATISTICS 10,
    ALTER COLUMN key SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10,
    ALTER COLUMN published_at SET STATISTICS 10;

ALTER TABLE inbox
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN last_error SET STATISTICS 0,
    ALTER COLUMN event_id SET STATISTICS 10,
    ALTER COLUMN seq SET STATISTICS 10,
    ALTER COLUMN topic SET STATISTICS 10,
    ALTER COLUMN key SET STATISTICS 10,
    ALTER COLUMN kafka_partition SET STATISTICS 10,
    ALTER COLUMN kafka_offset SET STATISTICS 10,
    ALTER COLUMN received_at SET STATISTICS 10,
    ALTER COLUMN processed_at SET STATISTICS 10,
    ALTER COLUMN attempts SET STATISTICS 10,
    ALTER COLUMN next_attempt_at SET STATISTICS 10;
