"""Payments' inbox handler: a `payment_requested` event becomes a debit (or a refusal) and the
`payment_result` event that answers it, both inside the applier's transaction."""

from __future__ import annotations

from collections.abc import Sequence
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
    in_rounds,
    parse_payment_request,
)


def charge_order(conn: psycopg.Connection[Any], request: PaymentRequest, result_topic: str) -> None:
    """Debit the user's account for the order at most once, and write the answer to the outbox.

    Redeliveries of one order, under any event_id, get the answer of the first delivery."""
    charge_round(conn, [request], result_topic)


def charge_round(
    conn: psycopg.Connection[Any], requests: Sequence[PaymentRequest], result_topic: str
) -> None:
    """`charge_order` for a round of requests (`in_rounds`: no user or order twice): one
    statement debits, and answers paid, every one the balance covers; each of the others is
    answered paid if an earlier delivery of its order was, else declined."""
    paid = [answer(result_topic, request, PAID) for request in requests]
    debited = {
        row[0]
        for row in conn.execute(
            queries.DEBIT,
            {
                "order_ids": [r.order_id for r in requests],
                "user_ids": [r.user_id for r in requests],
                "amounts": [r.amount for r in requests],
                **outbox.arrays(paid),
            },
        ).fetchall()
    }
    for request in requests:
        if request.order_id not in debited:
            answer_undebited(conn, request, result_topic)


def answer_undebited(
    conn: psycopg.Connection[Any], request: PaymentRequest, result_topic: str
) -> None:
    """Answer a request the debit statement did not debit: paid if an earlier delivery of the
    order was, else declined (once, with the reason it was or is declined for)."""
    params = {"order_id": request.order_id, "user_id": request.user_id, "amount": request.amount}
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


class PaymentRequestHandler:
    """The Payments inbox handler for `config`'s topic names: a payment request is charged
    once. `inbox` calls `apply_all` for a batch (a statement per round of `in_rounds`, most
    often one) and the handler itself for one event."""

    def __init__(self, config: Config) -> None:
        self.requested_topic = config.topic(TOPIC_PAYMENT_REQUESTED)
        self.result_topic = config.topic(TOPIC_PAYMENT_RESULT)

    def request_of(self, pending: Pending) -> PaymentRequest:
        if pending.topic != self.requested_topic:
            raise PoisonMessage(f"payments does not consume topic {pending.topic!r}")
        envelope = events.decode(pending.payload, TYPE_PAYMENT_REQUESTED)
        return parse_payment_request(envelope.payload)

    def __call__(self, conn: psycopg.Connection[Any], pending: Pending) -> None:
        charge_order(conn, self.request_of(pending), self.result_topic)

    def apply_all(self, conn: psycopg.Connection[Any], batch: Sequence[Pending]) -> None:
        for requests in in_rounds([self.request_of(pending) for pending in batch]):
            charge_round(conn, requests, self.result_topic)


def make_handler(config: Config) -> ApplyHandler:
    """The handler `inbox.apply_pending` calls for each event Payments received."""
    return PaymentRequestHandler(config)
