"""The SQL of the Orders service, parameterised; values never enter the text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from services.common import outbox

ORDER_COLUMNS: Final = "id, user_id, amount, description, status, reason, created_at, updated_at"

# The orders' own arrays beside their outbox rows' (`create_orders_params`).
_ORDER_ARRAYS: Final = (
    ("id", "uuid", "ids"),
    ("user_id", "uuid", "user_ids"),
    ("amount", "bigint", "amounts"),
    ("description", "text", "descriptions"),
    ("idempotency_key", "text", "idempotency_keys"),
)

# A group of orders and the events asking for their payment, written by one statement: they
# commit together or not at all, in one round trip, whatever the group's size (the service's
# pool is in autocommit). Parameters: one array per column (`create_orders_params`). The outbox
# rows are inserted in the group's order, so each user's requests keep their order on the
# topic. One clock reading for every timestamp: two column defaults could differ. An order
# whose user already has an order with its idempotency key (or an order before it in the
# group) is not written, nor is its payment request: it is not returned (`KEYED_ORDERS` finds
# the order that has the key).
CREATE_ORDERS: Final = f"""
WITH batch AS (
    SELECT * FROM {outbox.unnest_with("b", _ORDER_ARRAYS)}
), moment AS (
    SELECT clock_timestamp() AS t
), created AS (
    INSERT INTO orders (id, user_id, amount, description, idempotency_key, created_at,
                        updated_at)
    SELECT id, user_id, amount, description, idempotency_key, moment.t, moment.t
    FROM batch, moment
    ORDER BY n
    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {ORDER_COLUMNS}
), payment_requested AS (
    {outbox.insert_from("(SELECT * FROM batch WHERE id IN (SELECT id FROM created)) AS b")}
)
SELECT {ORDER_COLUMNS} FROM created
"""

# The orders that hold these users' idempotency keys (`user_ids` and `keys`, pairwise), with
# each key.
KEYED_ORDERS: Final = f"""
SELECT {ORDER_COLUMNS}, idempotency_key FROM orders
WHERE (user_id, idempotency_key) IN (
    SELECT * FROM unnest(%(user_ids)s::uuid[], %(keys)s::text[]))
"""


def create_orders_params(group: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """`CREATE_ORDERS`'s parameters for `group`: each order's `id`, `user_id`, `amount`,
    `description` and `idempotency_key` (None without one), with its payment request's
    `outbox.row(...)`."""
    return {
        "ids": [order["id"] for order in group],
        "user_ids": [order["user_id"] for order in group],
        "amounts": [order["amount"] for order in group],
        "descriptions": [order["description"] for order in group],
        "idempotency_keys": [order.get("idempotency_key") for order in group],
        **outbox.arrays(group),
    }


# Orders left new (their payment request or its answer lost on the way), oldest first, with
# how many times each was asked for again: its last request (the first, at its creation, or
# the last asked again) published `after` seconds ago or earlier, and not asked again
# `max_requests` times yet or sooner than its `next_request_at`. An order's row cannot be
# told apart in the outbox, so the outbox answers for it by time: a request is waiting (or
# went out less than `after` ago) while the outbox holds a row as old as it, give or take
# `margin` (an order's time is read when its statement starts, its row's when the row is
# inserted), that is pending or was published less than `after` ago. So one whose request
# waited in the outbox (Kafka was down) gets `after` from its publication, not from its
# creation, and so does one whose row Kafka refused while it took newer ones (a partition
# without a leader), published late behind them; a request purged after RETENTION_HOURS went
# out long ago. Orders younger than `after` (their request cannot have gone out before) and
# than the oldest pending row bound the scan of `orders_by_status`; the rows published within
# `after` are read (an `outbox_published` index range, its entries: about 45 ms for 150,000)
# only once an order is a candidate, which in normal operation none is. (`now()`: the clock of
# a volatile function cannot bound an index scan.)
UNANSWERED: Final = """
SELECT o.id, o.user_id, o.amount, coalesce(r.attempts, 0)
FROM orders o
LEFT JOIN payment_rerequests r ON r.order_id = o.id
WHERE o.status = 'new'
  AND o.created_at < now() - make_interval(secs => %(after)s)
  AND o.created_at < coalesce(
      (SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1),
      'infinity') - make_interval(secs => %(margin)s)
  AND coalesce(r.last_requested_at, o.created_at) < least(
      (SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1),
      (SELECT min(created_at) FROM outbox
       WHERE published_at >= now() - make_interval(secs => %(after)s)),
      'infinity') - make_interval(secs => %(margin)s)
  AND (r.order_id IS NULL
       OR (r.attempts < %(max_requests)s AND r.next_request_at <= now()))
ORDER BY o.created_at, o.id
LIMIT %(limit)s
"""

_REREQUEST_ARRAYS: Final = (
    ("order_id", "uuid", "order_ids"),
    ("attempts", "int", "attempts"),
    ("wait", "float8", "waits"),
)

# One sweeper asks again at a time; another one finding it busy skips its turn.
REREQUEST_LOCK: Final = "SELECT pg_try_advisory_xact_lock(hashtext('payment_rerequest'))"

# The payment requests of `order_ids` again (`outbox.arrays` of their rows, in the same order,
# so each user's requests keep the order of their orders), each order's count of requests
# again (`attempts`) and the seconds until the next one is due (`waits`).
# `last_requested_at` is read in this statement, as its rows' `created_at` are (UNANSWERED's
# `margin`): `now()`, the transaction's start, came before the round's other statements.
REREQUEST: Final = f"""
WITH request AS (
    SELECT * FROM {outbox.unnest_with("r", _REREQUEST_ARRAYS)}
), moment AS (
    SELECT clock_timestamp() AS t
), counted AS (
    INSERT INTO payment_rerequests (order_id, attempts, last_requested_at, next_request_at)
    SELECT order_id, attempts, moment.t, moment.t + make_interval(secs => wait)
    FROM request, moment
    ON CONFLICT (order_id) DO UPDATE
    SET attempts = excluded.attempts,
        last_requested_at = excluded.last_requested_at,
        next_request_at = excluded.next_request_at
)
{outbox.insert_from("request")}
"""

# The requests again of orders settled since, once `retention_seconds` old.
FORGET_REREQUESTS: Final = """
DELETE FROM payment_rerequests r
USING orders o
WHERE o.id = r.order_id
  AND o.status <> 'new'
  AND r.last_requested_at < now() - make_interval(secs => %(retention_seconds)s)
"""

GET_ORDER: Final = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = %(id)s"
GET_ORDERS: Final = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ANY(%(ids)s)"

# Each filter is a fixed fragment; `list_orders` picks the ones a request uses, so every
# combination stays a plain indexed query instead of one `(%s IS NULL OR …)` catch-all.
_BY_USER: Final = "user_id = %(user_id)s"
_BY_STATUS: Final = "status = %(status)s"
# Keyset pagination: strictly after the previous page's last row, so rows inserted meanwhile
# (always newer) cannot shift a page and no row is seen twice.
_AFTER_CURSOR: Final = "(created_at, id) < (%(after_created_at)s, %(after_id)s)"


def list_orders(*, by_user: bool, by_status: bool, after_cursor: bool) -> str:
    """A newest-first page of orders, filtered as asked; params `limit` and the filters'."""
    conditions = [
        fragment
        for wanted, fragment in (
            (by_user, _BY_USER),
            (by_status, _BY_STATUS),
            (after_cursor, _AFTER_CURSOR),
        )
        if wanted
    ]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return (
        f"SELECT {ORDER_COLUMNS} FROM orders {where} "
        "ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
    )


ORDER_STATUS: Final = "SELECT status FROM orders WHERE id = %(id)s"

# Compare-and-set: only a new order moves, whatever the caller believed its status to be.
# `updated_at` never goes below `created_at` (a CHECK): after the clock stepped back, a result
# failing that check would have been retried and dead-lettered, the order left new and paid for.
# `(status = 'new') IS TRUE` rather than `status = 'new'`: with the latter the planner found the
# row through orders_by_status, whose 'new' section is mostly dead entries under load (orders
# stay new for milliseconds), and took 2-3 ms per update instead of 0.1 ms by primary key.
SETTLE_ORDER: Final = """
UPDATE orders SET status = %(status)s, reason = %(reason)s,
    updated_at = greatest(clock_timestamp(), created_at)
WHERE id = %(id)s AND (status = 'new') IS TRUE
"""

# SETTLE_ORDER for a batch of results, one per order: the ids of the orders it moved.
SETTLE_ORDERS: Final = """
UPDATE orders
SET status = result.status, reason = result.reason,
    updated_at = greatest(clock_timestamp(), orders.created_at)
FROM unnest(%(ids)b::uuid[], %(statuses)b::text[], %(reasons)b::text[])
     AS result (id, status, reason)
WHERE orders.id = result.id AND (orders.status = 'new') IS TRUE
RETURNING orders.id
"""
