"""The SQL of the Payments service, one named statement per operation.

Every balance change is a single atomic statement that also writes its ledger row: no
read-then-write, so concurrent top-ups and debits can never lose an update."""

from __future__ import annotations

from typing import Final

from services.common import outbox

# Nothing when the user already has an account, or an account was opened with this
# `idempotency_key` (None without one): the caller then looks it up (`OPENED`). A concurrent
# insert for the same user or key makes this wait for it and return nothing, so there is no race.
CREATE_ACCOUNT: Final = """
INSERT INTO accounts (id, user_id, idempotency_key)
VALUES (%(account_id)s, %(user_id)s, %(idempotency_key)s)
ON CONFLICT DO NOTHING
RETURNING id, user_id, balance, created_at
"""

# The accounts that stopped CREATE_ACCOUNT: the user's, and the one opened with the key.
OPENED: Final = """
SELECT id, user_id, balance, created_at, idempotency_key FROM accounts
WHERE user_id = %(user_id)s OR idempotency_key = %(idempotency_key)s
"""


def _top_up(account: str) -> str:
    """Credit `amount` to the account `account` names and write its ledger row, with the
    client's `idempotency_key` (None without one), in one statement; answers (account_id,
    user_id, balance). Nothing when there is no such account, or when the account already has
    a top-up with this key (a concurrent one included: the insert waits for it): the caller
    then looks up which (`KEYED_TOP_UP`, a statement of its own, which sees what that one
    committed). The ledger row goes first so that a repeated key credits nothing."""
    return f"""
WITH entry AS (
    INSERT INTO ledger (account_id, kind, amount, idempotency_key)
    SELECT id, 'top_up', %(amount)s, %(idempotency_key)s FROM accounts WHERE {account}
    ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING account_id
)
UPDATE accounts
SET balance = balance + %(amount)s, updated_at = now()
WHERE id = (SELECT account_id FROM entry)
RETURNING id, user_id, balance
"""


TOP_UP_ACCOUNT: Final = _top_up("id = %(account_id)s")
TOP_UP_USER: Final = _top_up("user_id = %(user_id)s")

# The account (as `TOP_UP_*` answer it) and the amount of its top-up with `idempotency_key`
# (None when it has none), for the account `id` or `user_id` names (the other one None).
KEYED_TOP_UP: Final = """
SELECT a.id, a.user_id, a.balance, l.amount
FROM accounts a
LEFT JOIN ledger l ON l.account_id = a.id AND l.idempotency_key = %(idempotency_key)s
WHERE a.id = %(account_id)s OR a.user_id = %(user_id)s
"""

BALANCE_OF_ACCOUNT: Final = "SELECT id, user_id, balance FROM accounts WHERE id = %(account_id)s"

BALANCE_OF_USER: Final = "SELECT id, user_id, balance FROM accounts WHERE user_id = %(user_id)s"

# The whole charge of a round of requests (`domain.in_rounds`: no user and no order twice) in
# one statement: the row lock taken by UPDATE serialises debits of one account, `balance >=
# amount` is re-checked on the locked row, and the NOT EXISTS guards skip an order already
# debited or declined. The unique index on ledger(order_id) backs the guard should two debits
# of one order ever race. The `paid` answer of each request (`outbox.row(...)`, as `outbox.arrays`
# gives them) is written by the same statement when, and only when, it debited that request: the
# common case of a charge is one round trip. Returns the orders it debited; the others take
# the one-request path (CHARGE_FACTS) to learn why.
_REQUEST_ARRAYS: Final = (
    ("order_id", "uuid", "order_ids"),
    ("user_id", "uuid", "user_ids"),
    ("amount", "bigint", "amounts"),
)
DEBIT: Final = f"""
WITH request AS (
    SELECT * FROM {outbox.unnest_with("r", _REQUEST_ARRAYS)}
), debit AS (
    UPDATE accounts
    SET balance = balance - request.amount, updated_at = now()
    FROM request
    WHERE accounts.user_id = request.user_id
      AND accounts.balance >= request.amount
      AND NOT EXISTS (
          SELECT 1 FROM ledger WHERE ledger.order_id = request.order_id AND kind = 'debit')
      AND NOT EXISTS (
          SELECT 1 FROM declined_orders WHERE declined_orders.order_id = request.order_id)
    RETURNING accounts.id AS account_id, request.*
), entry AS (
    INSERT INTO ledger (account_id, kind, amount, order_id)
    SELECT account_id, 'debit', amount, order_id FROM debit ORDER BY n
), paid AS (
    {outbox.insert_from("debit")}
)
SELECT order_id FROM debit
"""

# Why DEBIT changed nothing: (account exists, order debited before, reason declined before).
CHARGE_FACTS: Final = """
SELECT
    EXISTS (SELECT 1 FROM accounts WHERE user_id = %(user_id)s),
    EXISTS (SELECT 1 FROM ledger WHERE order_id = %(order_id)s AND kind = 'debit'),
    (SELECT reason FROM declined_orders WHERE order_id = %(order_id)s)
"""

RECORD_DECLINE: Final = """
INSERT INTO declined_orders (order_id, user_id, amount, reason)
VALUES (%(order_id)s, %(user_id)s, %(amount)s, %(reason)s)
ON CONFLICT (order_id) DO NOTHING
"""

# Reconciliation: accounts whose balance differs from what their ledger adds up to.
# An empty answer is guarantee 4 (money is conserved) holding.
LEDGER_MISMATCHES: Final = """
SELECT a.id, a.balance, coalesce(sum(l.amount) FILTER (WHERE l.kind = 'top_up'), 0)
                      - coalesce(sum(l.amount) FILTER (WHERE l.kind = 'debit'), 0)
FROM accounts a
LEFT JOIN ledger l ON l.account_id = a.id
GROUP BY a.id, a.balance
HAVING a.balance <> coalesce(sum(l.amount) FILTER (WHERE l.kind = 'top_up'), 0)
                  - coalesce(sum(l.amount) FILTER (WHERE l.kind = 'debit'), 0)
"""
