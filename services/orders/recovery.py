"""Orders left new, asked for again: the Orders sweeper's way to finish an order whose payment
request, or its answer, was lost on the way (Kafka data lost, a message dead-lettered and its
cause since mended). Payments answers a repeated order as it answered it first (paid, or
declined for the same reason) and never debits it twice, so asking again is always safe."""

from __future__ import annotations

import logging
from typing import Final

from prometheus_client import Counter
from psycopg_pool import ConnectionPool

from services.common import outbox
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED
from services.orders import queries
from services.orders.domain import payment_requested

log = logging.getLogger(__name__)

# Served by the Orders worker (actors/broker.py): above zero, something was lost on the way.
REREQUESTED = Counter("payment_rerequests", "Orders left new whose payment was requested again")

# Orders asked for again per sweep, and the longest wait between two requests of one order.
REREQUEST_BATCH: Final = 500
MAX_REREQUEST_WAIT: Final = 3600.0


def rerequest_unanswered(pool: ConnectionPool, config: Config, limit: int = REREQUEST_BATCH) -> int:
    """Request again the payment of orders left new (`queries.UNANSWERED`), at most `limit`,
    each with a new event; return how many. Nothing when `PAYMENT_REREQUEST_AFTER` is 0 or
    another sweeper is at it."""
    if config.payment_rerequest_after <= 0:
        return 0
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    with pool.connection() as conn, conn.transaction():
        locked = conn.execute(queries.REREQUEST_LOCK).fetchone()
        if not (locked and locked[0]):
            return 0
        due = conn.execute(
            queries.UNANSWERED,
            {
                "after": config.payment_rerequest_after,
                "max_wait": max(MAX_REREQUEST_WAIT, config.payment_rerequest_after),
                "limit": limit,
            },
        ).fetchall()
        if not due:
            return 0
        rows = [
            outbox.row(topic, str(user_id), payment_requested(order_id, user_id, amount))
            for order_id, user_id, amount in due
        ]
        conn.execute(
            queries.REREQUEST,
            {"order_ids": [order_id for order_id, _, _ in due], **outbox.arrays(rows)},
        )
    REREQUESTED.inc(len(due))
    log.warning("orders: payment requested again for %d order(s) left new", len(due))
    return len(due)
