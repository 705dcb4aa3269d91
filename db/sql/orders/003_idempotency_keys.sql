-- A client that sends `Idempotency-Key` with an order can send the same request again (after a
-- timeout, a dropped connection, a 503) and get the order its first request made, never a
-- second one. Keys belong to a user: one key names at most one order of each user, for good
-- (the order is never deleted, so neither is its key). Orders without a key are not in the
-- index.
ALTER TABLE orders
    ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255);
CREATE UNIQUE INDEX orders_idempotency_key ON orders (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
