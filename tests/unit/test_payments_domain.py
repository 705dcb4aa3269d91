"""Payments' pure rules: the charge decision table, payment-request parsing, new account ids."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.common.events import FailureReason, PoisonMessage
from services.common.validation import MAX_AMOUNT
from services.payments.domain import (
    ChargeResult,
    PaymentRequest,
    PaymentStatus,
    decide_charge,
    in_rounds,
    new_account,
    parse_payment_request,
)

ORDER_ID = uuid.UUID("0190f7a4-5b6c-7d8e-9f00-000000000001")
USER_ID = uuid.UUID("0190f7a4-5b6c-7d8e-9f00-000000000002")

PAID = ChargeResult(PaymentStatus.PAID, None)
SHORT = ChargeResult(PaymentStatus.FAILED, FailureReason.INSUFFICIENT_FUNDS)
NO_ACCOUNT = ChargeResult(PaymentStatus.FAILED, FailureReason.ACCOUNT_NOT_FOUND)
INSUFFICIENT = FailureReason.INSUFFICIENT_FUNDS
MISSING = FailureReason.ACCOUNT_NOT_FOUND


@pytest.mark.parametrize(
    ("debited_now", "debited_before", "declined_before", "account_exists", "expected"),
    [
        # This delivery debited the account.
        (True, False, None, True, PAID),
        # An earlier delivery of the same order (another event_id) debited it: paid again.
        (False, True, None, True, PAID),
        # An earlier delivery was declined: the same answer, even if the funds are there now.
        (False, False, INSUFFICIENT, True, SHORT),
        (False, False, MISSING, True, NO_ACCOUNT),
        (False, False, MISSING, False, NO_ACCOUNT),
        # First delivery, nothing debited: the account is missing or short of funds.
        (False, False, None, False, NO_ACCOUNT),
        (False, False, None, True, SHORT),
    ],
)
def test_decide_charge_maps_the_database_facts_to_the_answer(
    debited_now: bool,
    debited_before: bool,
    declined_before: FailureReason | None,
    account_exists: bool,
    expected: ChargeResult,
) -> None:
    result = decide_charge(
        debited_now=debited_now,
        debited_before=debited_before,
        declined_before=declined_before,
        account_exists=account_exists,
    )
    assert result == expected


def test_a_paid_result_carries_a_null_reason() -> None:
    assert PAID.payload(ORDER_ID) == {"order_id": str(ORDER_ID), "status": "paid", "reason": None}


def test_a_failed_result_carries_its_reason() -> None:
    assert SHORT.payload(ORDER_ID) == {
        "order_id": str(ORDER_ID),
        "status": "failed",
        "reason": "insufficient_funds",
    }
    assert NO_ACCOUNT.payload(ORDER_ID)["reason"] == "account_not_found"


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"order_id": str(ORDER_ID), "user_id": str(USER_ID), "amount": 500}
    payload.update(changes)
    return payload


def test_a_valid_payment_request_is_parsed() -> None:
    assert parse_payment_request(good_payload()) == PaymentRequest(ORDER_ID, USER_ID, 500)


def test_the_largest_amount_the_api_accepts_is_a_valid_request() -> None:
    assert parse_payment_request(good_payload(amount=MAX_AMOUNT)).amount == MAX_AMOUNT


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"amount": -5}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": 1.5}, "amount"),
        ({"amount": "10"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": None}, "amount"),
        ({"amount": MAX_AMOUNT + 1}, "amount"),
        ({"order_id": "not-a-uuid"}, "order_id"),
        ({"order_id": None}, "order_id"),
        ({"user_id": "12345"}, "user_id"),
    ],
)
def test_a_payment_request_with_a_bad_field_is_poison(
    changes: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(PoisonMessage, match=complaint):
        parse_payment_request(good_payload(**changes))


@pytest.mark.parametrize("missing", ["order_id", "user_id", "amount"])
def test_a_payment_request_missing_a_field_is_poison(missing: str) -> None:
    payload = good_payload()
    del payload[missing]
    with pytest.raises(PoisonMessage, match=missing):
        parse_payment_request(payload)


def test_an_account_opened_without_a_user_makes_a_user_with_the_account_id() -> None:
    ids = new_account(None)
    assert ids.user_id == ids.account_id
    assert ids.account_id.version == 7


def test_an_account_opened_for_a_user_gets_its_own_id() -> None:
    ids = new_account(USER_ID)
    assert ids.user_id == USER_ID
    assert ids.account_id != USER_ID
    assert ids.account_id != new_account(USER_ID).account_id


def test_a_batch_is_split_into_rounds_with_each_user_and_order_once_in_arrival_order() -> None:
    a, b, c = (uuid.UUID(int=n) for n in (1, 2, 3))
    order = [uuid.UUID(int=100 + n) for n in range(7)]
    batch = [
        PaymentRequest(order[0], a, 1),
        PaymentRequest(order[1], b, 1),
        PaymentRequest(order[2], a, 2),
        PaymentRequest(order[3], c, 1),
        PaymentRequest(order[0], a, 1),  # the first order again, under another event
        PaymentRequest(order[4], b, 2),
        PaymentRequest(order[5], c, 2),
    ]
    rounds = in_rounds(batch)
    assert [[(r.order_id, r.user_id) for r in round_] for round_ in rounds] == [
        [(order[0], a), (order[1], b), (order[3], c)],
        [(order[2], a), (order[4], b), (order[5], c)],
        [(order[0], a)],
    ]
    # An order is placed after its user's earlier requests even when it is new.
    assert in_rounds([batch[0], batch[0], batch[2]]) == [[batch[0]], [batch[0]], [batch[2]]]
    assert in_rounds([]) == []
    # A malformed redelivery naming another user still never meets its order in one round.
    again_for_b = PaymentRequest(order[0], b, 1)
    assert in_rounds([batch[0], again_for_b]) == [[batch[0]], [again_for_b]]


def test_requests_of_different_users_share_one_round() -> None:
    batch = [PaymentRequest(uuid.UUID(int=n), uuid.UUID(int=1000 + n), 5) for n in range(50)]
    assert in_rounds(batch) == [batch]
