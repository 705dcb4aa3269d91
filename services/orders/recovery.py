"""Orders left new, asked for again: the Orders sweeper's way to finish an order whose payment
request, or its answer, was lost on the way (Kafka data lost, a message dead-lettered and its
cause since mended). Payments answers a repeated order as it answered it first (paid, or
declined for the same reason) and never debits it twice, so asking again is always safe.

Orders cannot tell a lost request from a late answer: while Payments is down or more than
`PAYMENT_REREQUEST_AFTER` behind, the orders whose requests went out longest ago are asked for
again too, a batch per round at most, and answered once Payments reaches the repeats."""

from __future__ import annotations

import logging
from typing import Final

from prometheus_client import Counter
from psycopg_pool import ConnectionPool

from services.common import outbox
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED
from services.common.inbox import backoff_seconds
from services.orders import queries
from services.orders.domain import payment_requested

log = logging.getLogger(__name__)

# Served by the Orders worker (actors/broker.py): above zero, a request or an answer was lost,
# or came later than PAYMENT_REREQUEST_AFTER.
REREQUESTED = Counter("payment_rerequests", "Payment requests sent again for orders left new")

# Orders asked for again per round; the longest wait between two requests of one order (unless
# PAYMENT_REREQUEST_AFTER is longer); how many times one order is asked for again at most
# (with the default PAYMENT_REREQUEST_AFTER, over about 7 hours).
REREQUEST_BATCH: Final = 500
MAX_REREQUEST_WAIT: Final = 3600.0
MAX_REREQUESTS: Final = 10


def rerequest_unanswered(pool: ConnectionPool, config: Config, limit: int = REREQUEST_BATCH) -> int:
    """Request again the payment of orders left new (`queries.UNANSWERED`), at most `limit`,
    each with a new event; return how many. Nothing when `PAYMENT_REREQUEST_AFTER` is 0 or
    another sweeper is at it."""
    after = config.payment_rerequest_after
    if after <= 0:
        return 0
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    with pool.connection() as conn, conn.transaction():
        locked = conn.execute(queries.REREQUEST_LOCK).fetchone()
        if not (locked and locked[0]):
            return 0
        due = conn.execute(
            queries.UNANSWERED,
            {
                "after": after,
                "margin": config.db_statement_timeout,
                "max_requests": MAX_REREQUESTS,
                "limit": limit,
            },
        ).fetchall()
        if not due:
            return 0
        cap = max(MAX_REREQUEST_WAIT, after)
        attempts = [asked + 1 for _, _, _, asked in due]
        conn.execute(
            queries.REREQUEST,
            {
                "order_ids": [order_id for order_id, _, _, _ in due],
                "attempts": attempts,
                "waits": [backoff_seconds(n, base=after, cap=cap) for n in attempts],
                **outbox.arrays(
                    [
                        outbox.row(topic, str(user), payment_requested(order_id, user, amount))
                        for order_id, user, amount, _ in due
                    ]
                ),
            },
        )
    REREQUESTED.inc(len(due))
    log.warning("orders: payment requested again for %d order(s) left new", len(due))
    given_up = [str(row[0]) for row, n in zip(due, attempts, strict=True) if n >= MAX_REREQUESTS]
    if given_up:
        log.error(
            "orders: %d order(s) still new, asked for again for the last time (%d times); if"
            " still new later, they are an operator's (see Payments' dead_letters): %s",
            len(given_up),
            MAX_REREQUESTS,
            ", ".join(given_up),
        )
    return len(due)


def forget_settled(pool: ConnectionPool, config: Config) -> int:
    """Delete the requests again of orders settled since, once `RETENTION_HOURS` old (with the
    purge of old outbox and inbox rows); return how many."""
    params = {"retention_seconds": config.retention_hours * 3600}
    with pool.connection() as conn, conn.transaction():
        return conn.execute(queries.FORGET_REREQUESTS, params).rowcount
