"""Event envelopes: building, encoding and decoding, with no I/O.

Every Kafka message is `{"event_id", "type", "occurred_at", "schema_version", "payload"}`;
the same `event_id` travels in the `event_id` header. `event_id` is the consumers' dedupe key.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from services.common import fastjson
from services.common.ids import uuid7

SCHEMA_VERSION: Final = 1

TOPIC_PAYMENT_REQUESTED: Final = "orders.payment-requested"
TOPIC_PAYMENT_RESULT: Final = "payments.payment-result"
TOPICS: Final = (TOPIC_PAYMENT_REQUESTED, TOPIC_PAYMENT_RESULT)

TYPE_PAYMENT_REQUESTED: Final = "payment_requested"
TYPE_PAYMENT_RESULT: Final = "payment_result"

EVENT_ID_HEADER: Final = "event_id"


class FailureReason(StrEnum):
    """Why a payment failed: part of the `payment_result` event, shared by both services."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    ACCOUNT_NOT_FOUND = "account_not_found"


class PoisonMessage(ValueError):
    """A message that can never be applied, however often it is retried."""


@dataclass(frozen=True)
class Envelope:
    """One event, as it travels through the outbox, Kafka and the inbox."""

    type: str
    payload: Mapping[str, Any]
    event_id: uuid.UUID = field(default_factory=uuid7)
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The envelope as the JSON object stored in the outbox and sent to Kafka."""
        return {
            "event_id": str(self.event_id),
            "type": self.type,
            "occurred_at": rfc3339(self.occurred_at),
            "schema_version": self.schema_version,
            "payload": dict(self.payload),
        }


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with a `Z`, as every timestamp in the API and the events."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode(envelope_json: Mapping[str, Any]) -> bytes:
    """The bytes of a Kafka message value."""
    return fastjson.dumps(envelope_json)


def decode(raw: bytes, expected_type: str) -> Envelope:
    """Parse a message value; raise `PoisonMessage` with the reason if it is not a valid event."""
    try:
        data = fastjson.loads(raw)
    except ValueError as exc:  # bad syntax or UTF-8, too deep, an integer too long for Python
        raise PoisonMessage(f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PoisonMessage("envelope is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise PoisonMessage(f"unsupported schema_version {version!r}")
    if data.get("type") != expected_type:
        raise PoisonMessage(f"unexpected event type {data.get('type')!r}")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise PoisonMessage("payload is not a JSON object")
    try:
        event_id = uuid.UUID(str(data.get("event_id")))
        occurred_at = datetime.fromisoformat(str(data.get("occurred_at")))
    except ValueError as exc:
        raise PoisonMessage(f"bad envelope field: {exc}") from exc
    return Envelope(
        type=expected_type,
        payload=payload,
        event_id=event_id,
        occurred_at=occurred_at,
        schema_version=SCHEMA_VERSION,
    )


Headers = Mapping[str, bytes | str | None] | Sequence[tuple[str, bytes | str | None]] | None


def event_id_for(headers: Headers, topic: str, partition: int, offset: int) -> uuid.UUID:
    """The dedupe key of a received message: its `event_id` header, or, when that is missing or
    malformed (poison), a stable id derived from where the message sits in the log."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, value in pairs:
        if name == EVENT_ID_HEADER and value is not None:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            try:
                return uuid.UUID(text)
            except ValueError:
                break
    return uuid.uuid5(uuid.NAMESPACE_URL, f"kafka:{topic}:{partition}:{offset}")


def require_uuid(payload: Mapping[str, Any], name: str) -> uuid.UUID:
    """A UUID field of a payload, or `PoisonMessage`."""
    try:
        return uuid.UUID(str(payload[name]))
    except (KeyError, ValueError) as exc:
        raise PoisonMessage(f"payload.{name} is missing or not a UUID") from exc


def require_amount(payload: Mapping[str, Any], name: str = "amount") -> int:
    """A positive integer amount of a payload, or `PoisonMessage`."""
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PoisonMessage(f"payload.{name} must be a positive integer, got {value!r}")
    return value
