-- Payments: one account per user, the append-only ledger behind every balance change, and the
-- orders this service declined (so a redelivered order always gets the same answer).

CREATE TABLE accounts (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL UNIQUE,
    -- The last line of defence against an overdraft: debits are already guarded in SQL.
    balance     bigint      NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every balance change is one row here, in the same statement as the change:
-- for every account, balance = sum of top-ups - sum of debits.
CREATE TABLE ledger (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  uuid        NOT NULL REFERENCES accounts (id),
    kind        text        NOT NULL CHECK (kind IN ('top_up', 'debit')),
    amount      bigint      NOT NULL CHECK (amount > 0),
    order_id    uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- A debit always pays for an order; a top-up never does.
    CONSTRAINT ledger_debit_has_order CHECK ((kind = 'debit') = (order_id IS NOT NULL))
);
-- An order is debited at most once, whatever the event redeliveries: the exactly-once backstop.
CREATE UNIQUE INDEX ledger_one_debit_per_order ON ledger (order_id) WHERE kind = 'debit';
CREATE INDEX ledger_account ON ledger (account_id);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

-- Orders answered `failed`. Orders keeps a failed order failed forever, so a redelivery of the
-- same order (even under a new event_id, after a top-up) must be declined again, never debited.
CREATE TABLE declined_orders (
    order_id    uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    reason      text        NOT NULL CHECK (reason IN ('insufficient_funds', 'account_not_found')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
