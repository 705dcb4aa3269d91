"""Payment results applied to orders through the real inbox on a real Postgres: each order
settles once, duplicates and late or contradicting results change nothing, poison is parked."""

from __future__ import annotations

import itertools
import logging
import uuid
from datetime import datetime
from typing import Any

import psycopg
import pytest

from actors import pipeline
from services.common import inbox
from services.common.config import Config
from services.common.events import (
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    TYPE_PAYMENT_REQUESTED,
    TYPE_PAYMENT_RESULT,
    Envelope,
    encode,
)
from services.common.ids import uuid7
from services.common.inbox import ApplyReport, Received
from services.orders import queries
from services.orders.handlers import make_handler
from tests.conftest import plan_nodes

CONFIG = Config(kafka_topic_prefix="test-orders-results.")
RESULTS_TOPIC = CONFIG.topic(TOPIC_PAYMENT_RESULT)
USER = uuid.UUID("0190f7a4-0000-7d8e-9f00-aabbccddeeff")
_offsets = itertools.count()


def new_order(db: psycopg.Connection[Any], order_id: uuid.UUID | None = None) -> uuid.UUID:
    order_id = order_id or uuid7()
    db.execute(
        "INSERT INTO orders (id, user_id, amount, description) VALUES (%s, %s, 500, 'test')",
        (order_id, USER),
    )
    return order_id


def result(
    order_id: uuid.UUID,
    status: str,
    reason: str | None = None,
    *,
    event_id: uuid.UUID | None = None,
) -> Received:
    """A payment-result message as the consumer would record it."""
    envelope = Envelope(
        TYPE_PAYMENT_RESULT,
        {"order_id": str(order_id), "status": status, "reason": reason},
        event_id=event_id or uuid7(),
    )
    return message(encode(envelope.to_json()), event_id=envelope.event_id)


def message(payload: bytes, *, event_id: uuid.UUID | None = None, topic: str = "") -> Received:
    return Received(
        event_id=event_id or uuid7(),
        topic=topic or RESULTS_TOPIC,
        key=str(USER),
        partition=0,
        offset=next(_offsets),
        payload=payload,
    )


def deliver(db: psycopg.Connection[Any], *messages: Received, max_attempts: int = 5) -> ApplyReport:
    """Record the messages in the inbox, then run the applier once over what is pending."""
    inbox.record(db, messages)
    return inbox.apply_pending(db, make_handler(CONFIG), limit=100, max_attempts=max_attempts)


def state(db: psycopg.Connection[Any], order_id: uuid.UUID) -> tuple[str, str | None, datetime]:
    row = db.execute(
        "SELECT status, reason, updated_at FROM orders WHERE id = %s", (order_id,)
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def unprocessed(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM inbox WHERE processed_at IS NULL").fetchone()
    assert row is not None
    return int(row[0])


def dead_letters(db: psycopg.Connection[Any]) -> list[tuple[uuid.UUID, str]]:
    return [(r[0], r[1]) for r in db.execute("SELECT event_id, reason FROM dead_letters")]


# --- A result settles a new order ----------------------------------------------------------------


def test_a_paid_result_marks_a_new_order_paid(orders_db: psycopg.Connection[Any]) -> None:
    order_id = new_order(orders_db)
    _, _, created_updated_at = state(orders_db, order_id)

    report = deliver(orders_db, result(order_id, "paid"))

    assert report == ApplyReport(applied=1)
    status, reason, updated_at = state(orders_db, order_id)
    assert (status, reason) == ("paid", None)
    assert updated_at > created_updated_at
    assert unprocessed(orders_db) == 0


@pytest.mark.parametrize("path", ["one by one", "batch"])
def test_a_result_settles_an_order_created_by_a_clock_now_set_back(
    orders_db: psycopg.Connection[Any], path: str
) -> None:
    # The clock stepped back after the order was written: `updated_at >= created_at` (a CHECK)
    # failed, and the result was retried, then dead-lettered, the order left new and paid for.
    order_id = new_order(orders_db)
    orders_db.execute(
        "UPDATE orders SET created_at = created_at + interval '1 hour',"
        " updated_at = updated_at + interval '1 hour' WHERE id = %s",
        (order_id,),
    )
    # Read itself: the two column defaults of an insert can differ by a microsecond.
    [(created_at,)] = orders_db.execute(
        "SELECT created_at FROM orders WHERE id = %s", (order_id,)
    ).fetchall()

    if path == "batch":
        report = pipeline.record_and_apply(
            orders_db, [result(order_id, "paid")], make_handler(CONFIG), CONFIG
        )
    else:
        report = deliver(orders_db, result(order_id, "paid"))

    assert report == ApplyReport(applied=1)
    assert state(orders_db, order_id) == ("paid", None, created_at)
    assert dead_letters(orders_db) == []


@pytest.mark.parametrize("reason", ["insufficient_funds", "account_not_found"])
def test_a_failed_result_marks_a_new_order_failed_with_its_reason(
    orders_db: psycopg.Connection[Any], reason: str
) -> None:
    order_id = new_order(orders_db)

    assert deliver(orders_db, result(order_id, "failed", reason)) == ApplyReport(applied=1)

    assert state(orders_db, order_id)[:2] == ("failed", reason)


def test_results_settle_only_their_own_order(orders_db: psycopg.Connection[Any]) -> None:
    paid, failed, untouched = new_order(orders_db), new_order(orders_db), new_order(orders_db)

    deliver(orders_db, result(paid, "paid"), result(failed, "failed", "insufficient_funds"))

    assert state(orders_db, paid)[:2] == ("paid", None)
    assert state(orders_db, failed)[:2] == ("failed", "insufficient_funds")
    assert state(orders_db, untouched)[:2] == ("new", None)


# --- Duplicates, late and contradicting results change nothing -----------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("paid", None), ("paid", None)),
        (("paid", None), ("failed", "insufficient_funds")),
        (("paid", None), ("failed", "account_not_found")),
        (("failed", "insufficient_funds"), ("paid", None)),
        (("failed", "insufficient_funds"), ("failed", "account_not_found")),
        (("failed", "account_not_found"), ("failed", "account_not_found")),
    ],
    ids=lambda r: "-".join(filter(None, r)),
)
def test_a_settled_order_keeps_its_first_result(
    orders_db: psycopg.Connection[Any],
    first: tuple[str, str | None],
    second: tuple[str, str | None],
) -> None:
    order_id = new_order(orders_db)
    deliver(orders_db, result(order_id, *first))
    settled = state(orders_db, order_id)

    report = deliver(orders_db, result(order_id, *second))

    # The late result is a no-op, yet processed: never retried, never dead-lettered.
    assert report == ApplyReport(applied=1)
    assert state(orders_db, order_id) == settled  # updated_at included
    assert settled[:2] == first
    assert unprocessed(orders_db) == 0
    assert dead_letters(orders_db) == []


def test_contradicting_results_in_one_batch_settle_by_arrival_order(
    orders_db: psycopg.Connection[Any],
) -> None:
    paid_first, failed_first = new_order(orders_db), new_order(orders_db)

    report = deliver(
        orders_db,
        result(paid_first, "paid"),
        result(failed_first, "failed", "account_not_found"),
        result(paid_first, "failed", "insufficient_funds"),
        result(failed_first, "paid"),
    )

    assert report == ApplyReport(applied=4)
    assert state(orders_db, paid_first)[:2] == ("paid", None)
    assert state(orders_db, failed_first)[:2] == ("failed", "account_not_found")


def test_the_same_event_delivered_twice_is_recorded_and_applied_once(
    orders_db: psycopg.Connection[Any],
) -> None:
    order_id = new_order(orders_db)
    event_id = uuid7()
    twice = result(order_id, "failed", "insufficient_funds", event_id=event_id)

    first = deliver(orders_db, twice, twice)  # a redelivery within one batch
    settled = state(orders_db, order_id)
    again = deliver(orders_db, twice)  # and one after the event was applied

    assert first == ApplyReport(applied=1)
    assert again == ApplyReport()  # nothing new was even claimed
    assert state(orders_db, order_id) == settled
    assert settled[:2] == ("failed", "insufficient_funds")
    rows = orders_db.execute("SELECT event_id, attempts FROM inbox").fetchall()
    assert rows == [(event_id, 1)]


def test_the_status_update_is_a_compare_and_set(orders_db: psycopg.Connection[Any]) -> None:
    # Whatever a caller believes, the UPDATE itself refuses to move a settled order.
    order_id = new_order(orders_db)
    deliver(orders_db, result(order_id, "paid"))

    cursor = orders_db.execute(
        queries.SETTLE_ORDER,
        {"id": order_id, "status": "failed", "reason": "insufficient_funds"},
    )

    assert cursor.rowcount == 0
    assert state(orders_db, order_id)[:2] == ("paid", None)


def test_settling_finds_the_order_by_primary_key_even_when_few_orders_are_new(
    orders_db: psycopg.Connection[Any],
) -> None:
    # The shape of a busy system: almost every order already settled, a few new ones. The
    # status index then looks cheapest for `status = 'new'`, but its 'new' section is mostly
    # dead entries under load; the settle must go by primary key.
    orders_db.execute(
        "INSERT INTO orders (id, user_id, amount, description, status, created_at, updated_at)"
        " SELECT gen_random_uuid(), gen_random_uuid(), 1, 'x', 'paid', now(), now()"
        " FROM generate_series(1, 5000)"
    )
    order_id = new_order(orders_db)
    orders_db.execute("ANALYZE orders")
    params = {"id": order_id, "status": "paid", "reason": None}

    plan = orders_db.execute("EXPLAIN (FORMAT JSON) " + queries.SETTLE_ORDER, params).fetchone()

    assert plan is not None
    scans = [node["Index Name"] for node in plan_nodes(plan[0]) if "Index Name" in node]
    assert scans == ["orders_pkey"]


# --- What cannot be applied is retried, then parked, and does not block others -------------------


def test_a_result_for_an_unknown_order_is_retried_then_dead_lettered(
    orders_db: psycopg.Connection[Any],
) -> None:
    stray = result(uuid7(), "paid")

    first = deliver(orders_db, stray, max_attempts=2)

    assert first == ApplyReport(retried=1)
    row = orders_db.execute("SELECT attempts, last_error, processed_at FROM inbox").fetchone()
    assert row is not None
    assert row[0] == 1
    assert "unknown order" in row[1]
    assert row[2] is None

    orders_db.execute("UPDATE inbox SET next_attempt_at = clock_timestamp()")  # skip the backoff
    second = inbox.apply_pending(orders_db, make_handler(CONFIG), limit=100, max_attempts=2)

    assert second == ApplyReport(dead=1)
    [(event_id, reason)] = dead_letters(orders_db)
    assert event_id == stray.event_id
    assert "unknown order" in reason
    assert unprocessed(orders_db) == 0


POISONED_ORDER = uuid.UUID("0190f7a4-5b6c-7d8e-9f00-112233445566")
_ORDER = str(POISONED_ORDER)


def _envelope(payload: dict[str, Any], kind: str = TYPE_PAYMENT_RESULT) -> bytes:
    return encode(Envelope(kind, payload).to_json())


POISON: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{nope", RESULTS_TOPIC),
    ("wrong event type", _envelope({"order_id": _ORDER}, TYPE_PAYMENT_REQUESTED), RESULTS_TOPIC),
    ("unknown status", _envelope({"order_id": _ORDER, "status": "success"}), RESULTS_TOPIC),
    (
        "paid with a reason",
        _envelope({"order_id": _ORDER, "status": "paid", "reason": "insufficient_funds"}),
        RESULTS_TOPIC,
    ),
    (
        "failed without a reason",
        _envelope({"order_id": _ORDER, "status": "failed", "reason": None}),
        RESULTS_TOPIC,
    ),
    (
        "failed with an unknown reason",
        _envelope({"order_id": _ORDER, "status": "failed", "reason": "fraud"}),
        RESULTS_TOPIC,
    ),
    ("bad order id", _envelope({"order_id": "42", "status": "paid"}), RESULTS_TOPIC),
    (
        "another topic",
        _envelope({"order_id": _ORDER, "status": "paid"}),
        CONFIG.topic(TOPIC_PAYMENT_REQUESTED),
    ),
    (
        "the unprefixed topic",
        _envelope({"order_id": _ORDER, "status": "paid"}),
        TOPIC_PAYMENT_RESULT,
    ),
]


@pytest.mark.parametrize(("case", "payload", "topic"), POISON, ids=[c[0] for c in POISON])
def test_poison_is_dead_lettered_and_the_next_result_still_applies(
    orders_db: psycopg.Connection[Any], case: str, payload: bytes, topic: str
) -> None:
    order_id = new_order(orders_db, POISONED_ORDER)
    poison = message(payload, topic=topic)

    report = deliver(orders_db, poison, result(order_id, "paid"), max_attempts=1)

    assert report == ApplyReport(applied=1, dead=1)
    [(event_id, reason)] = dead_letters(orders_db)
    assert event_id == poison.event_id
    assert reason.startswith("poison: ")
    assert state(orders_db, order_id)[:2] == ("paid", None)


# --- The table itself backs the status machine -----------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("failed", None),
        ("paid", "insufficient_funds"),
        ("new", "account_not_found"),
        ("failed", "fraud"),
        ("success", None),
    ],
)
def test_the_orders_table_refuses_inconsistent_states(
    orders_db: psycopg.Connection[Any], status: str, reason: str | None
) -> None:
    order_id = new_order(orders_db)

    with pytest.raises(psycopg.errors.CheckViolation):
        orders_db.execute(
            "UPDATE orders SET status = %s, reason = %s WHERE id = %s", (status, reason, order_id)
        )


@pytest.mark.parametrize(
    ("amount", "description"),
    [(0, "x"), (-1, "x"), (10**15 + 1, "x"), (1, "x" * 1001)],
)
def test_the_orders_table_refuses_bad_amounts_and_descriptions(
    orders_db: psycopg.Connection[Any], amount: int, description: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        orders_db.execute(
            "INSERT INTO orders (id, user_id, amount, description) VALUES (%s, %s, %s, %s)",
            (uuid7(), USER, amount, description),
        )


def test_the_consumer_path_settles_a_batch_at_once_and_leaves_an_unknown_order_pending(
    orders_db: psycopg.Connection[Any],
) -> None:
    # The consumer records a batch already marked processed and applies it whole (one
    # statement for the orders it can settle); an unknown order fails the batch, which is then
    # un-marked and applied event by event.
    first, second, unknown = new_order(orders_db), new_order(orders_db), uuid7()
    batch = [
        result(first, "paid"),
        result(unknown, "paid"),
        result(first, "failed", "insufficient_funds"),  # later result for the same order
        result(second, "failed", "account_not_found"),
    ]

    report = pipeline.record_and_apply(orders_db, batch, make_handler(CONFIG), CONFIG)

    assert report == ApplyReport(applied=3, retried=1)
    assert state(orders_db, first)[:2] == ("paid", None)  # the first result won
    assert state(orders_db, second)[:2] == ("failed", "account_not_found")
    pending = orders_db.execute(
        "SELECT event_id, attempts, last_error FROM inbox WHERE processed_at IS NULL"
    ).fetchall()
    assert [(row[0], row[1]) for row in pending] == [(batch[1].event_id, 1)]
    assert pending[0][2] == f"poison: unknown order {unknown}"

    # Without the unknown order the batch goes through whole, first result still winning.
    third = new_order(orders_db)
    again = [result(third, "failed", "insufficient_funds"), result(third, "paid")]
    assert pipeline.record_and_apply(orders_db, again, make_handler(CONFIG), CONFIG) == (
        ApplyReport(applied=2)
    )
    assert state(orders_db, third)[:2] == ("failed", "insufficient_funds")


class BrokenBatchPath:
    """The orders handler with a batch path that always fails (a bug it must not hide)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, conn: psycopg.Connection[Any], pending: Any) -> None:
        self.inner(conn, pending)

    def apply_all(self, conn: psycopg.Connection[Any], rows: Any) -> None:
        raise RuntimeError("a fault in apply_all")


def test_a_batch_path_that_fails_while_every_event_applies_alone_is_a_warning(
    orders_db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    order = new_order(orders_db)
    with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
        report = pipeline.record_and_apply(
            orders_db, [result(order, "paid")], BrokenBatchPath(make_handler(CONFIG)), CONFIG
        )
    assert report == ApplyReport(applied=1)
    assert state(orders_db, order)[0] == "paid"
    [warning] = [r.getMessage() for r in caplog.records if r.name == "services.common.inbox"]
    assert "the batch path is at fault" in warning
    assert "a fault in apply_all" in warning


def test_a_batch_failed_by_one_bad_event_warns_about_that_event_only(
    orders_db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    batch = [result(new_order(orders_db), "paid"), result(uuid7(), "paid")]
    with caplog.at_level(logging.WARNING, logger="services.common.inbox"):
        report = pipeline.record_and_apply(orders_db, batch, make_handler(CONFIG), CONFIG)
    assert report == ApplyReport(applied=1, retried=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "services.common.inbox"]
    assert len(messages) == 1
    assert "unknown order" in messages[0]
