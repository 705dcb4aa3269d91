"""Payments' rules without I/O: what a payment request says, and what a charge answers."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.common.events import FailureReason, PoisonMessage, require_amount, require_uuid
from services.common.ids import uuid7
from services.common.validation import MAX_AMOUNT


class PaymentStatus(StrEnum):
    PAID = "paid"
    FAILED = "failed"


@dataclass(frozen=True)
class PaymentRequest:
    """An order asking to be paid from its user's account."""

    order_id: uuid.UUID
    user_id: uuid.UUID
    amount: int


@dataclass(frozen=True)
class ChargeResult:
    """The answer to one payment request, as the `payment_result` event carries it."""

    status: PaymentStatus
    reason: FailureReason | None = None

    def payload(self, order_id: uuid.UUID) -> dict[str, Any]:
        """The `payments.payment-result` payload; `reason` is null when paid."""
        return {
            "order_id": str(order_id),
            "status": self.status.value,
            "reason": self.reason.value if self.reason else None,
        }


PAID = ChargeResult(PaymentStatus.PAID)


def in_rounds(requests: Sequence[PaymentRequest]) -> list[list[PaymentRequest]]:
    """Split a batch, in arrival order, into rounds that one set-based debit each can charge:
    no user and no order twice in a round (a statement updates a row once, and sees neither its
    own ledger rows nor its own earlier debits), and each user's requests in arrival order from
    one round to the next. Users are independent, so most batches are one round."""
    rounds: list[list[PaymentRequest]] = []
    next_of_user: dict[uuid.UUID, int] = {}
    next_of_order: dict[uuid.UUID, int] = {}
    for request in requests:
        i = max(next_of_user.get(request.user_id, 0), next_of_order.get(request.order_id, 0))
        if i == len(rounds):
            rounds.append([])
        rounds[i].append(request)
        next_of_user[request.user_id] = next_of_order[request.order_id] = i + 1
    return rounds


@dataclass(frozen=True)
class NewAccount:
    """The ids of an account about to be opened."""

    account_id: uuid.UUID
    user_id: uuid.UUID


def parse_payment_request(payload: Mapping[str, Any]) -> PaymentRequest:
    """The request in a `payment_requested` payload, or `PoisonMessage` saying what is wrong."""
    amount = require_amount(payload)
    # The HTTP API never accepts more; anything larger could only overflow the balance.
    if amount > MAX_AMOUNT:
        raise PoisonMessage(f"payload.amount must be at most {MAX_AMOUNT}, got {amount}")
    return PaymentRequest(
        order_id=require_uuid(payload, "order_id"),
        user_id=require_uuid(payload, "user_id"),
        amount=amount,
    )


def decide_charge(
    *,
    debited_now: bool,
    debited_before: bool,
    declined_before: FailureReason | None,
    account_exists: bool,
) -> ChargeResult:
    """The answer to a payment request, from what the database says about it.

    `debited_now`: this delivery's debit wrote the ledger row. `debited_before`: an earlier
    delivery of the same order did. `declined_before`: an earlier delivery was declined, and
    the order must stay declined. Otherwise nothing was debited because the account is missing
    or short of funds."""
    if debited_now or debited_before:
        return PAID
    if declined_before is not None:
        return ChargeResult(PaymentStatus.FAILED, declined_before)
    if not account_exists:
        return ChargeResult(PaymentStatus.FAILED, FailureReason.ACCOUNT_NOT_FOUND)
    return ChargeResult(PaymentStatus.FAILED, FailureReason.INSUFFICIENT_FUNDS)


def new_account(user_id: uuid.UUID | None) -> NewAccount:
    """Ids for a new account of `user_id`; without one a new user is made whose id is the
    account's, so a client that only knows account ids can use it as its user id."""
    account_id = uuid7()
    return NewAccount(account_id=account_id, user_id=user_id or account_id)
