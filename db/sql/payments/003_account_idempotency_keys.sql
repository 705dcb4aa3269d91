-- A client that sends `Idempotency-Key` when it opens an account can send the same request
-- again (after a timeout, a dropped connection, a 503) and get the account it opened, not a
-- second one (a bodiless create makes a new user each time). There is no account yet to
-- scope such a key to, so one key names at most one account of all, for good.
ALTER TABLE accounts
    ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255);
CREATE UNIQUE INDEX accounts_idempotency_key ON accounts (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
