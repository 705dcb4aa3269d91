"""Payments' inbox handler: a `payment_requested` event becomes a debit (or a refusal) and the
`payment_result` event that answers it, both inside the applier's transaction."""

from __future__ import annotations

from typing import Any

import psycopg

from services.common import events, outbox
from services.common.config import Config
from services.common.events import (
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    TYPE_PAYMENT_REQUESTED,
    TYPE_PAYMENT_RESULT,
    Envelope,
    FailureReason,
    PoisonMessage,
)
from services.common.inbox import ApplyHandler, Pending
from services.payments import queries
from services.payments.domain import (
    PAID,
    ChargeResult,
    PaymentRequest,
    PaymentStatus,
    decide_charge,
    parse_payment_request,
)


def charge_order(conn: psycopg.Connection[Any], request: PaymentRequest, result_topic: str) -> None:
    """Debit the user's account for the order at most once, and write the answer to the outbox.

    Redeliveries of one order, under any event_id, get the answer of the first delivery."""
    params = {"order_id": request.order_id, "user_id": request.user_id, "amount": request.amount}
    paid = answer(result_topic, request, PAID)
    if conn.execute(queries.DEBIT, params | paid).fetchone() is not None:
        return  # debited now, and the paid answer written by the same statement
    facts = conn.execute(queries.CHARGE_FACTS, params).fetchone()
    assert facts is not None  # a SELECT without FROM always returns its one row
    account_exists, debited_before, declined_reason = facts
    result = decide_charge(
        debited_now=False,
        debited_before=debited_before,
        declined_before=FailureReason(declined_reason) if declined_reason else None,
        account_exists=account_exists,
    )
    if result.status is PaymentStatus.FAILED and result.reason is not None:
        conn.execute(queries.RECORD_DECLINE, {**params, "reason": result.reason.value})
    conn.execute(outbox.INSERT, answer(result_topic, request, result))


def answer(result_topic: str, request: PaymentRequest, result: ChargeResult) -> dict[str, Any]:
    """The outbox row of the `payment_result` event that answers `request` with `result`."""
    envelope = Envelope(TYPE_PAYMENT_RESULT, result.payload(request.order_id))
    return outbox.row(result_topic, str(request.user_id), envelope)


def make_handler(config: Config) -> ApplyHandler:
    """The handler `inbox.apply_pending` calls for each event Payments received."""
    requested_topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    result_topic = config.topic(TOPIC_PAYMENT_RESULT)

    def apply_payment_request(conn: psycopg.Connection[Any], pending: Pending) -> None:
        if pending.topic != requested_topic:
            raise PoisonMessage(f"payments does not consume topic {pending.topic!r}")
        envelope = events.decode(pending.payload, TYPE_PAYMENT_REQUESTED)
        charge_order(conn, parse_payment_request(envelope.payload), result_topic)

    return apply_payment_request
