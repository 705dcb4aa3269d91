-- The transactional outbox and inbox, the same in every service's database.
-- Postgres rows are the truth; NOTIFY is only a wake-up call for the listener.

CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid        NOT NULL UNIQUE,
    topic         text        NOT NULL,
    key           text        NOT NULL,
    payload       jsonb       NOT NULL,   -- the whole envelope, as sent
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE inbox (
    event_id         uuid        PRIMARY KEY,  -- the dedupe key: a second delivery is a no-op
    seq              bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,  -- arrival order
    topic            text        NOT NULL,
    key              text,
    kafka_partition  int,
    kafka_offset     bigint,
    payload          bytea       NOT NULL,     -- raw message value: poison is kept as it came
    received_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    processed_at     timestamptz,
    attempts         int         NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_error       text
);
CREATE INDEX inbox_pending ON inbox (seq) WHERE processed_at IS NULL;
CREATE INDEX inbox_processed ON inbox (processed_at) WHERE processed_at IS NOT NULL;

CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid        NOT NULL UNIQUE,
    topic       text        NOT NULL,
    key         text,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    attempts    int         NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One NOTIFY per transaction: the trigger is per statement and Postgres folds identical
-- notifications raised within one transaction into one.
CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_pending', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();

CREATE FUNCTION notify_inbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('inbox_pending', '');
    RETURN NULL;
END $$;
CREATE TRIGGER inbox_notify AFTER INSERT ON inbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_inbox();
