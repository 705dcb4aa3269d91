-- Orders: one row per order. Its status moves only new -> paid | failed (a compare-and-set in
-- services/orders/handlers.py); a failed order always says why, a new or paid one never does.

CREATE TABLE orders (
    id           uuid        PRIMARY KEY,  -- uuid7, made by the service
    user_id      uuid        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount > 0 AND amount <= 1000000000000000),
    description  text        NOT NULL CHECK (char_length(description) <= 1000),
    status       text        NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'paid', 'failed')),
    reason       text        CHECK (reason IN ('insufficient_funds', 'account_not_found')),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT orders_reason_iff_failed CHECK ((reason IS NULL) = (status <> 'failed')),
    CONSTRAINT orders_updated_after_created CHECK (updated_at >= created_at)
);

-- Listings are newest first with keyset pagination on (created_at, id): one index per filter,
-- each ending in the sort key, so every page is an index range scan however deep it is.
CREATE INDEX orders_newest ON orders (created_at DESC, id DESC);
CREATE INDEX orders_by_user ON orders (user_id, created_at DESC, id DESC);
CREATE INDEX orders_by_status ON orders (status, created_at DESC, id DESC);
