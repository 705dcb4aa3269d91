"""How Orders applies an inbox event: a payment result settles its order, once."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from services.common import events
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_RESULT, TYPE_PAYMENT_RESULT, PoisonMessage
from services.common.inbox import ApplyHandler, Pending
from services.orders import queries
from services.orders.domain import (
    OrderStatus,
    PaymentResult,
    parse_payment_result,
    transition,
)

log = logging.getLogger(__name__)


class PaymentResultHandler:
    """The Orders inbox handler for `config`'s topic names: a payment result settles its order,
    once. `inbox` calls `apply_all` for a batch (one statement settles every order it can) and
    the handler itself for one event."""

    def __init__(self, config: Config) -> None:
        self.results_topic = config.topic(TOPIC_PAYMENT_RESULT)

    def result_of(self, pending: Pending) -> PaymentResult:
        if pending.topic != self.results_topic:
            raise PoisonMessage(f"Orders does not consume topic {pending.topic!r}")
        return parse_payment_result(events.decode(pending.payload, TYPE_PAYMENT_RESULT).payload)

    def __call__(self, conn: psycopg.Connection[Any], pending: Pending) -> None:
        settle(conn, pending, self.result_of(pending))

    def apply_all(self, conn: psycopg.Connection[Any], batch: Sequence[Pending]) -> None:
        # The first result for each order goes in one statement; whatever it did not move (a
        # later result for the same order, an order already settled, or unknown) takes the
        # one-event path, which ignores the first kind and the second and fails on the third.
        first: dict[uuid.UUID, tuple[Pending, PaymentResult, tuple[str, str | None]]] = {}
        rest: list[tuple[Pending, PaymentResult]] = []
        for pending in batch:
            result = self.result_of(pending)
            settled = transition(OrderStatus.NEW, result)
            if settled is None or result.order_id in first:
                rest.append((pending, result))
            else:
                first[result.order_id] = (pending, result, settled.columns)
        moved = {
            row[0]
            for row in conn.execute(
                queries.SETTLE_ORDERS,
                {
                    "ids": list(first),
                    "statuses": [status for _, _, (status, _) in first.values()],
                    "reasons": [reason for _, _, (_, reason) in first.values()],
                },
            ).fetchall()
        }
        unmoved = [(p, r) for order_id, (p, r, _) in first.items() if order_id not in moved]
        for pending, result in unmoved + rest:
            settle(conn, pending, result)


def settle(conn: psycopg.Connection[Any], pending: Pending, result: PaymentResult) -> None:
    """Apply one payment result: move a new order, ignore one already settled, fail on one we
    do not have."""
    # What the result makes of a new order; the compare-and-set moves only a new one, so the
    # common case is this one statement.
    settled = transition(OrderStatus.NEW, result)
    if settled is not None:
        status, reason = settled.columns
        changed = conn.execute(
            queries.SETTLE_ORDER, {"id": result.order_id, "status": status, "reason": reason}
        ).rowcount
        if changed:
            return
    row = conn.execute(queries.ORDER_STATUS, {"id": result.order_id}).fetchone()
    if row is None:
        # Orders publishes a payment request only after its order committed, so a result for an
        # order we do not have is never early: it is misrouted (another environment's topic) or
        # this database lost rows (restored from a backup). Dropping it would hide either;
        # failing it retries with backoff and then parks it in dead_letters with this reason
        # for an operator, while later events flow on.
        raise PoisonMessage(f"unknown order {result.order_id}")
    # Duplicate, late or contradicting: the order is already settled (settled orders never
    # change again). Returning normally lets the applier mark the event processed.
    log.info(
        "order %s is already %s; ignoring result for event %s (%s)",
        result.order_id,
        row[0],
        pending.event_id,
        result.status.value,
    )


def make_handler(config: Config) -> ApplyHandler:
    """The Orders inbox handler for `config`'s topic names."""
    return PaymentResultHandler(config)
