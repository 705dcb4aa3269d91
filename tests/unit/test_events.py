"""Envelopes: what goes out is what comes back, and poison is named for what it is."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from services.common import events
from services.common.events import Envelope, PoisonMessage


def test_an_encoded_envelope_decodes_to_the_same_event() -> None:
    sent = Envelope(events.TYPE_PAYMENT_REQUESTED, {"order_id": "x", "amount": 5})
    received = events.decode(events.encode(sent.to_json()), events.TYPE_PAYMENT_REQUESTED)
    assert received == sent


def test_envelope_json_carries_every_contract_field_with_rfc3339_utc_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = Envelope("t", {"a": 1}, occurred_at=moment).to_json()
    assert set(body) == {"event_id", "type", "occurred_at", "schema_version", "payload"}
    assert body["occurred_at"] == "2026-01-02T03:04:05Z"
    assert body["schema_version"] == events.SCHEMA_VERSION
    assert uuid.UUID(body["event_id"]).version == 7


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * 5000 + b"]" * 5000, "malformed JSON"),
        (b'{"schema_version": ' + b"1" * 5000 + b"}", "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema_version": 99, "type": "t", "payload": {}}', "schema_version"),
        (b'{"schema_version": true, "type": "t", "payload": {}}', "schema_version"),
        (b'{"schema_version": 1, "type": "other", "payload": {}}', "event type"),
        (b'{"schema_version": 1, "type": "t", "payload": 5}', "payload"),
        (
            b'{"schema_version": 1, "type": "t", "payload": {}, "event_id": "nope",'
            b' "occurred_at": "2026-01-01T00:00:00Z"}',
            "bad envelope",
        ),
    ],
)
def test_undecodable_messages_are_poison_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage, match=reason):
        events.decode(raw, "t")


def test_the_event_id_header_is_the_dedupe_key() -> None:
    event_id = uuid.uuid4()
    headers = [("type", b"x"), ("event_id", str(event_id).encode())]
    assert events.event_id_for(headers, "topic", 0, 1) == event_id


def test_a_message_without_a_valid_event_id_gets_a_stable_id_from_its_log_position() -> None:
    first = events.event_id_for([("event_id", b"garbage")], "topic", 3, 42)
    again = events.event_id_for(None, "topic", 3, 42)
    elsewhere = events.event_id_for(None, "topic", 3, 43)
    assert first == again
    assert first != elsewhere


@pytest.mark.parametrize("amount", [0, -5, 1.5, "10", True, None])
def test_payload_amounts_must_be_positive_integers(amount: object) -> None:
    with pytest.raises(PoisonMessage, match="amount"):
        events.require_amount({"amount": amount})


def test_payload_uuid_fields_are_checked() -> None:
    assert events.require_uuid({"id": str(uuid.UUID(int=5))}, "id") == uuid.UUID(int=5)
    with pytest.raises(PoisonMessage):
        events.require_uuid({"id": "x"}, "id")
    with pytest.raises(PoisonMessage):
        events.require_uuid({}, "id")


def test_encode_is_compact_utf8_json() -> None:
    raw = events.encode({"d": "Сахар"})
    assert json.loads(raw) == {"d": "Сахар"}
    assert b" " not in raw
