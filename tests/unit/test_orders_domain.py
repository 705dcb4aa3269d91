"""The Orders domain without servers: the status machine, payment results, events, cursors."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from services.common.events import TYPE_PAYMENT_REQUESTED, FailureReason, PoisonMessage
from services.common.ids import uuid7
from services.orders.domain import (
    Cursor,
    InvalidCursor,
    Order,
    OrderState,
    OrderStatus,
    PaymentResult,
    decode_cursor,
    encode_cursor,
    is_storable_text,
    parse_payment_result,
    payment_requested,
    transition,
)

ORDER_ID = uuid.UUID("0190f7a4-5b6c-7d8e-9f00-112233445566")
PAID = PaymentResult(ORDER_ID, OrderStatus.PAID, None)
NO_FUNDS = PaymentResult(ORDER_ID, OrderStatus.FAILED, FailureReason.INSUFFICIENT_FUNDS)
NO_ACCOUNT = PaymentResult(ORDER_ID, OrderStatus.FAILED, FailureReason.ACCOUNT_NOT_FOUND)


# --- The status machine: the whole table -------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "result", "expected"),
    [
        (OrderStatus.NEW, PAID, OrderState(OrderStatus.PAID)),
        (
            OrderStatus.NEW,
            NO_FUNDS,
            OrderState(OrderStatus.FAILED, FailureReason.INSUFFICIENT_FUNDS),
        ),
        (
            OrderStatus.NEW,
            NO_ACCOUNT,
            OrderState(OrderStatus.FAILED, FailureReason.ACCOUNT_NOT_FOUND),
        ),
        (OrderStatus.PAID, PAID, None),
        (OrderStatus.PAID, NO_FUNDS, None),
        (OrderStatus.PAID, NO_ACCOUNT, None),
        (OrderStatus.FAILED, PAID, None),
        (OrderStatus.FAILED, NO_FUNDS, None),
        (OrderStatus.FAILED, NO_ACCOUNT, None),
    ],
    ids=[
        "new-paid",
        "new-insufficient_funds",
        "new-account_not_found",
        "paid-paid",
        "paid-insufficient_funds",
        "paid-account_not_found",
        "failed-paid",
        "failed-insufficient_funds",
        "failed-account_not_found",
    ],
)
def test_only_a_new_order_moves_and_only_to_the_result(
    current: OrderStatus, result: PaymentResult, expected: OrderState | None
) -> None:
    assert transition(current, result) == expected


def test_a_paid_state_carries_no_reason() -> None:
    settled = transition(OrderStatus.NEW, PAID)
    assert settled is not None
    assert settled.reason is None


# --- Parsing payment results -------------------------------------------------------------------


def test_a_paid_result_parses_with_a_null_or_absent_reason() -> None:
    for payload in (
        {"order_id": str(ORDER_ID), "status": "paid", "reason": None},
        {"order_id": str(ORDER_ID), "status": "paid"},
    ):
        assert parse_payment_result(payload) == PAID


@pytest.mark.parametrize("reason", list(FailureReason))
def test_a_failed_result_parses_with_its_reason(reason: FailureReason) -> None:
    payload = {"order_id": str(ORDER_ID), "status": "failed", "reason": reason.value}
    assert parse_payment_result(payload) == PaymentResult(ORDER_ID, OrderStatus.FAILED, reason)


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        ({"order_id": str(ORDER_ID), "status": "new", "reason": None}, "unknown payment status"),
        ({"order_id": str(ORDER_ID), "status": "success"}, "unknown payment status"),
        ({"order_id": str(ORDER_ID), "status": None}, "unknown payment status"),
        ({"order_id": str(ORDER_ID)}, "unknown payment status"),
        ({"order_id": str(ORDER_ID), "status": "failed"}, "known reason"),
        ({"order_id": str(ORDER_ID), "status": "failed", "reason": None}, "known reason"),
        ({"order_id": str(ORDER_ID), "status": "failed", "reason": "fraud"}, "known reason"),
        ({"order_id": str(ORDER_ID), "status": "failed", "reason": 1}, "known reason"),
        (
            {"order_id": str(ORDER_ID), "status": "paid", "reason": "insufficient_funds"},
            "carries a reason",
        ),
        ({"order_id": "not-a-uuid", "status": "paid"}, "order_id"),
        ({"order_id": 42, "status": "paid"}, "order_id"),
        ({"status": "paid"}, "order_id"),
    ],
)
def test_a_malformed_result_is_poison(payload: dict[str, Any], complaint: str) -> None:
    with pytest.raises(PoisonMessage, match=complaint):
        parse_payment_result(payload)


# --- The payment request and the order JSON ---------------------------------------------------


def test_the_payment_request_carries_order_user_and_amount() -> None:
    user_id = uuid7()
    envelope = payment_requested(ORDER_ID, user_id, 12_345)
    assert envelope.type == TYPE_PAYMENT_REQUESTED
    assert envelope.to_json()["payload"] == {
        "order_id": str(ORDER_ID),
        "user_id": str(user_id),
        "amount": 12_345,
    }
    assert payment_requested(ORDER_ID, user_id, 1).event_id != envelope.event_id


def _order(status: OrderStatus, reason: FailureReason | None) -> Order:
    moment = datetime(2025, 6, 17, 20, 55, 35, 806222, tzinfo=UTC)
    return Order(ORDER_ID, uuid7(), 100, "sugar", status, reason, moment, moment)


def test_the_status_answer_names_a_reason_only_when_failed() -> None:
    assert _order(OrderStatus.NEW, None).status_json() == {"id": ORDER_ID, "status": "new"}
    assert "reason" not in _order(OrderStatus.PAID, None).status_json()
    failed = _order(OrderStatus.FAILED, FailureReason.ACCOUNT_NOT_FOUND).status_json()
    assert failed == {"id": ORDER_ID, "status": "failed", "reason": "account_not_found"}


def test_the_order_json_has_every_contract_field_with_plain_values() -> None:
    body = _order(OrderStatus.FAILED, FailureReason.INSUFFICIENT_FUNDS).to_json()
    assert set(body) == {
        "id",
        "user_id",
        "amount",
        "description",
        "status",
        "reason",
        "created_at",
        "updated_at",
    }
    assert type(body["status"]) is str
    assert type(body["reason"]) is str
    assert _order(OrderStatus.NEW, None).to_json()["reason"] is None


@pytest.mark.parametrize(
    ("text", "storable"),
    [("", True), ("Покупка iPhone 17 😀", True), ("a\x00b", False), ("a\ud800b", False)],
)
def test_text_postgres_cannot_store_is_recognised(text: str, storable: bool) -> None:
    assert is_storable_text(text) is storable


# --- Cursors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2025, 6, 17, 20, 55, 35, 806222, tzinfo=UTC),
        datetime(2025, 6, 17, 20, 55, 35, tzinfo=UTC),  # no microseconds
        datetime(2025, 6, 17, 23, 55, 35, 1, tzinfo=timezone(timedelta(hours=3))),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_a_cursor_round_trips_exactly(moment: datetime) -> None:
    cursor = Cursor(moment, uuid7())
    text = encode_cursor(cursor)
    decoded = decode_cursor(text)
    assert decoded == cursor
    assert decoded.created_at.utcoffset() == moment.utcoffset()


def test_a_cursor_is_url_safe_text() -> None:
    text = encode_cursor(Cursor(datetime.now(UTC), uuid7()))
    assert text.isascii()
    assert not set(text) & set("+/=|:")


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!!",
        "abc def",
        "a",  # not a whole base64 quantum
        _b64("2025-06-17T20:55:35+00:00"),  # no id
        _b64(f"2025-06-17T20:55:35+00:00|{ORDER_ID}|extra"),
        _b64(f"yesterday|{ORDER_ID}"),
        _b64("2025-06-17T20:55:35+00:00|not-a-uuid"),
        _b64(f"2025-06-17T20:55:35|{ORDER_ID}"),  # naive timestamp
        _b64(f"2025-06-17 20:55:35+00:00|{ORDER_ID}"),  # another spelling of a real cursor
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode().rstrip("="),  # not UTF-8
        encode_cursor(Cursor(datetime.now(UTC), ORDER_ID)) + "==",  # padded
        encode_cursor(Cursor(datetime.now(UTC), ORDER_ID)) + "\n",
        "A" * 400,
    ],
)
def test_a_malformed_cursor_is_refused(text: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(text)
