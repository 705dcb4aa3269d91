-- A client that sends `Idempotency-Key` with a top-up can send the same request again (after a
-- timeout, a dropped connection, a 503) and have the account credited once. Keys belong to an
-- account: one key names at most one top-up of each account, for good (the ledger is
-- append-only). Rows without a key (every debit) are not in the index.
ALTER TABLE ledger
    ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ADD CONSTRAINT ledger_keys_are_top_ups CHECK (idempotency_key IS NULL OR kind = 'top_up');
CREATE UNIQUE INDEX ledger_idempotency_key ON ledger (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
