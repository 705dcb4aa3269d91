"""The Orders domain, free of I/O: orders, the status machine, payment results and the event
that asks for a payment, and the opaque cursor of order listings."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from services.common.events import (
    TYPE_PAYMENT_REQUESTED,
    Envelope,
    FailureReason,
    PoisonMessage,
    require_uuid,
)


class OrderStatus(StrEnum):
    NEW = "new"
    PAID = "paid"
    FAILED = "failed"


@dataclass(frozen=True)
class Order:
    """One order as the API shows it."""

    id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    description: str
    status: OrderStatus
    reason: FailureReason | None
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "amount": self.amount,
            "description": self.description,
            "status": self.status.value,
            "reason": None if self.reason is None else self.reason.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def status_json(self) -> dict[str, Any]:
        """The short answer of `GET /orders/{id}/status`: the reason only when there is one."""
        body: dict[str, Any] = {"id": self.id, "status": self.status.value}
        if self.reason is not None:
            body["reason"] = self.reason.value
        return body


def is_storable_text(text: str) -> bool:
    """Whether Postgres can store `text`: JSON admits NUL and lone surrogates, a text column not."""
    return "\x00" not in text and not any("\ud800" <= ch <= "\udfff" for ch in text)


def payment_requested(order_id: uuid.UUID, user_id: uuid.UUID, amount: int) -> Envelope:
    """The event that asks Payments to charge a new order."""
    return Envelope(
        TYPE_PAYMENT_REQUESTED,
        {"order_id": str(order_id), "user_id": str(user_id), "amount": amount},
    )


# --- Payment results and the status machine -------------------------------------------------


@dataclass(frozen=True)
class PaymentResult:
    """What Payments decided about one order."""

    order_id: uuid.UUID
    status: OrderStatus  # PAID or FAILED, never NEW
    reason: FailureReason | None  # set exactly when FAILED


@dataclass(frozen=True)
class OrderState:
    """The part of an order a payment result changes."""

    status: OrderStatus
    reason: FailureReason | None = None

    @property
    def columns(self) -> tuple[str, str | None]:
        """The `status` and `reason` column values."""
        return self.status.value, None if self.reason is None else self.reason.value


def parse_payment_result(payload: Mapping[str, Any]) -> PaymentResult:
    """The payment result in an event's payload, or `PoisonMessage` saying what is wrong."""
    order_id = require_uuid(payload, "order_id")
    status = payload.get("status")
    reason = payload.get("reason")
    if status == OrderStatus.PAID.value:
        if reason is not None:
            raise PoisonMessage(f"a paid result carries a reason: {reason!r}")
        return PaymentResult(order_id, OrderStatus.PAID, None)
    if status == OrderStatus.FAILED.value:
        known = {r.value for r in FailureReason}
        if not isinstance(reason, str) or reason not in known:
            raise PoisonMessage(f"a failed result needs a known reason, got {reason!r}")
        return PaymentResult(order_id, OrderStatus.FAILED, FailureReason(reason))
    raise PoisonMessage(f"unknown payment status {status!r}")


def transition(current: OrderStatus, result: PaymentResult) -> OrderState | None:
    """The state `result` moves an order in `current` to, or `None` when it changes nothing.

    Only a new order moves, to paid or to failed with its reason. Paid and failed are
    terminal: a duplicate, late or contradicting result for them is ignored, so a result
    delivered twice or out of order can never flip a settled order."""
    if current is not OrderStatus.NEW or result.status is OrderStatus.NEW:
        return None
    return OrderState(result.status, result.reason)


# --- Listing cursors ---------------------------------------------------------------------------

_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


class InvalidCursor(ValueError):
    """A cursor this service did not issue."""


@dataclass(frozen=True)
class Cursor:
    """Where a page of a newest-first listing ended: the last order's sort key."""

    created_at: datetime
    id: uuid.UUID


def encode_cursor(cursor: Cursor) -> str:
    """The opaque text handed to clients: unpadded base64url of `created_at|id`."""
    raw = f"{cursor.created_at.isoformat()}|{cursor.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """The cursor `encode_cursor` made, or `InvalidCursor`. Only its exact output is accepted,
    so a cursor has one spelling and a tampered one is refused rather than reinterpreted."""
    if not _BASE64URL.fullmatch(text) or len(text) > 200:
        raise InvalidCursor("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        moment, _, ident = raw.partition("|")
        cursor = Cursor(datetime.fromisoformat(moment), uuid.UUID(ident))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidCursor(str(exc)) from exc
    if cursor.created_at.tzinfo is None or encode_cursor(cursor) != text:
        raise InvalidCursor("not a cursor of this service")
    return cursor
