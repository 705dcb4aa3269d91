"""How Orders applies an inbox event: a payment result settles its order, once."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from services.common import events
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_RESULT, TYPE_PAYMENT_RESULT, PoisonMessage
from services.common.inbox import ApplyHandler, Pending
from services.orders import queries
from services.orders.domain import OrderStatus, parse_payment_result, transition

log = logging.getLogger(__name__)


def make_handler(config: Config) -> ApplyHandler:
    """The Orders inbox handler for `config`'s topic names."""
    results_topic = config.topic(TOPIC_PAYMENT_RESULT)

    def apply_payment_result(conn: psycopg.Connection[Any], pending: Pending) -> None:
        if pending.topic != results_topic:
            raise PoisonMessage(f"Orders does not consume topic {pending.topic!r}")
        envelope = events.decode(pending.payload, TYPE_PAYMENT_RESULT)
        result = parse_payment_result(envelope.payload)
        # What the result makes of a new order; the compare-and-set moves only a new one, so
        # the common case is this one statement.
        settled = transition(OrderStatus.NEW, result)
        if settled is not None:
            changed = conn.execute(
                queries.SETTLE_ORDER,
                {
                    "id": result.order_id,
                    "status": settled.status.value,
                    "reason": None if settled.reason is None else settled.reason.value,
                },
            ).rowcount
            if changed:
                return
        row = conn.execute(queries.ORDER_STATUS, {"id": result.order_id}).fetchone()
        if row is None:
            # Orders publishes a payment request only after its order committed, so a result
            # for an order we do not have is never early: it is misrouted (another
            # environment's topic) or this database lost rows (restored from a backup).
            # Dropping it would hide either; failing it retries with backoff and then parks it
            # in dead_letters with this reason for an operator, while later events flow on.
            raise PoisonMessage(f"unknown order {result.order_id}")
        # Duplicate, late or contradicting: the order is already settled (settled orders never
        # change again). Returning normally lets the applier mark the event processed.
        log.info(
            "order %s is already %s; ignoring result %s (%s)",
            result.order_id,
            row[0],
            envelope.event_id,
            result.status.value,
        )

    return apply_payment_result
