"""Charging orders from the inbox on a real database: exactly-once debits, no overdraft under
concurrency, no lost update, atomic rollback, and poison isolated in dead_letters.

Events go in through `inbox.record` and are applied by `inbox.apply_pending` with the service's
handler, as the consumer and the apply actor do. After every test each account's balance must
equal what its ledger adds up to."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import psycopg
import pytest

from services.common import events, inbox
from services.common.config import Config
from services.common.events import (
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    TYPE_PAYMENT_REQUESTED,
    TYPE_PAYMENT_RESULT,
    Envelope,
)
from services.common.ids import uuid7
from services.common.inbox import ApplyHandler, ApplyReport, Pending, Received
from services.payments import queries
from services.payments.domain import new_account
from services.payments.handlers import PaymentRequestHandler, make_handler

MAX_ATTEMPTS = 3
PAID = {"status": "paid", "reason": None}
SHORT = {"status": "failed", "reason": "insufficient_funds"}
NO_ACCOUNT = {"status": "failed", "reason": "account_not_found"}


@pytest.fixture(autouse=True)
def every_balance_matches_its_ledger(payments_db: psycopg.Connection[Any]) -> Iterator[None]:
    yield
    assert payments_db.execute(queries.LEDGER_MISMATCHES).fetchall() == []


@pytest.fixture
def config(payments_url: str) -> Config:
    return Config(payments_database_url=payments_url)


@pytest.fixture
def handler(config: Config) -> ApplyHandler:
    return make_handler(config)


# --- Arranging and observing ---------------------------------------------------------------------


def open_account(conn: psycopg.Connection[Any], balance: int = 0) -> uuid.UUID:
    """A new user's account topped up to `balance`, through the service's own statements."""
    ids = new_account(None)
    conn.execute(
        queries.CREATE_ACCOUNT,
        {"account_id": ids.account_id, "user_id": ids.user_id, "idempotency_key": None},
    )
    if balance:
        conn.execute(
            queries.TOP_UP_USER,
            {"user_id": ids.user_id, "amount": balance, "idempotency_key": None},
        )
    return ids.user_id


def receive(
    conn: psycopg.Connection[Any],
    config: Config,
    raw: bytes,
    *,
    event_id: uuid.UUID | None = None,
    topic: str | None = None,
) -> uuid.UUID:
    """Record one message as the consumer would; returns its event_id."""
    event_id = event_id or uuid7()
    topic = topic or config.topic(TOPIC_PAYMENT_REQUESTED)
    inbox.record(conn, [Received(event_id, topic, None, 0, None, raw)])
    return event_id


def payment_requested(
    order_id: uuid.UUID, user_id: uuid.UUID, amount: Any, **envelope: Any
) -> Envelope:
    payload = {"order_id": str(order_id), "user_id": str(user_id), "amount": amount}
    return Envelope(TYPE_PAYMENT_REQUESTED, payload, **envelope)


def request_payment(
    conn: psycopg.Connection[Any],
    config: Config,
    user_id: uuid.UUID,
    amount: int,
    *,
    order_id: uuid.UUID | None = None,
    event_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Record a `payment_requested` event for an order; returns the order id."""
    order_id = order_id or uuid7()
    envelope = payment_requested(order_id, user_id, amount, event_id=event_id or uuid7())
    receive(conn, config, events.encode(envelope.to_json()), event_id=envelope.event_id)
    return order_id


def apply(conn: psycopg.Connection[Any], handler: ApplyHandler) -> ApplyReport:
    return inbox.apply_pending(conn, handler, limit=500, max_attempts=MAX_ATTEMPTS)


def results(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The payloads of every payment result in the outbox, oldest first."""
    rows = conn.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
    return [row[0]["payload"] for row in rows]


def results_of(conn: psycopg.Connection[Any], order_id: uuid.UUID) -> list[dict[str, Any]]:
    """The (status, reason) answers given for one order."""
    return [
        {"status": r["status"], "reason": r["reason"]}
        for r in results(conn)
        if r["order_id"] == str(order_id)
    ]


def balance_of(conn: psycopg.Connection[Any], user_id: uuid.UUID) -> int:
    row = conn.execute(queries.BALANCE_OF_USER, {"user_id": user_id}).fetchone()
    assert row is not None
    balance: int = row[2]
    return balance


def debits_of(conn: psycopg.Connection[Any], order_id: uuid.UUID) -> list[int]:
    rows = conn.execute(
        "SELECT amount FROM ledger WHERE kind = 'debit' AND order_id = %s", (order_id,)
    ).fetchall()
    return [row[0] for row in rows]


def count(conn: psycopg.Connection[Any], table: str) -> int:
    """Rows in `table` (a fixed name, optionally with a WHERE clause, never input)."""
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    number: int = row[0]
    return number


# --- One order -----------------------------------------------------------------------------------


def test_an_order_within_the_balance_is_debited_and_answered_paid(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = request_payment(payments_db, config, user_id, 60)

    report = apply(payments_db, handler)

    assert report == ApplyReport(applied=1)
    assert balance_of(payments_db, user_id) == 40
    assert debits_of(payments_db, order_id) == [60]
    assert results(payments_db) == [{"order_id": str(order_id), **PAID}]


def test_a_batch_that_applies_cleanly_marks_every_event_processed_once(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    orders = [request_payment(payments_db, config, user_id, amount) for amount in (10, 20, 30)]

    assert apply(payments_db, handler) == ApplyReport(applied=3)

    assert [results_of(payments_db, order)[0]["status"] for order in orders] == ["paid"] * 3
    marks = payments_db.execute(
        "SELECT attempts, processed_at IS NOT NULL, last_error FROM inbox"
    ).fetchall()
    assert marks == [(1, True, None)] * 3
    assert balance_of(payments_db, user_id) == 40
    assert apply(payments_db, handler) == ApplyReport()


def test_a_batch_of_many_users_is_charged_as_each_order_alone_would_be(
    payments_db: psycopg.Connection[Any], config: Config
) -> None:
    # One batch: users interleaved, one short of money, one without an account, one order
    # delivered twice. The handler's batch path (a statement per round of users) must give the
    # answers and balances that charging the orders one by one in arrival order gives, by
    # itself: the applier would hide a failing batch path by redoing the batch event by event.
    rich, poor = open_account(payments_db, balance=100), open_account(payments_db, balance=50)
    batch: list[Pending] = []

    def pending(user_id: uuid.UUID, amount: int, order_id: uuid.UUID | None = None) -> uuid.UUID:
        order_id = order_id or uuid7()
        envelope = payment_requested(order_id, user_id, amount)
        raw = events.encode(envelope.to_json())
        batch.append(
            Pending(envelope.event_id, config.topic(TOPIC_PAYMENT_REQUESTED), None, raw, 0)
        )
        return order_id

    first, poor_paid, second = pending(rich, 60), pending(poor, 40), pending(rich, 30)
    poor_short, missing = pending(poor, 20), pending(uuid7(), 10)
    pending(rich, 60, order_id=first)
    third_short, last = pending(rich, 20), pending(rich, 10)

    with payments_db.transaction():
        PaymentRequestHandler(config).apply_all(payments_db, batch)

    assert results_of(payments_db, first) == [PAID, PAID]
    assert debits_of(payments_db, first) == [60]
    assert results_of(payments_db, second) == [PAID]
    assert results_of(payments_db, third_short) == [SHORT]
    assert results_of(payments_db, last) == [PAID]
    assert results_of(payments_db, poor_paid) == [PAID]
    assert results_of(payments_db, poor_short) == [SHORT]
    assert results_of(payments_db, missing) == [NO_ACCOUNT]
    assert balance_of(payments_db, rich) == 0
    assert balance_of(payments_db, poor) == 10
    # Each user's answers are in the outbox in the order the user's orders arrived.
    answered = [r["order_id"] for r in results(payments_db)]
    rich_orders = [str(o) for o in (first, second, first, third_short, last)]
    assert [o for o in answered if o in rich_orders] == rich_orders
    assert answered.index(str(poor_paid)) < answered.index(str(poor_short))


def test_the_result_event_goes_to_the_result_topic_keyed_by_user(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=10)
    order_id = request_payment(payments_db, config, user_id, 10)

    apply(payments_db, handler)

    rows = payments_db.execute("SELECT event_id, topic, key, payload, headers FROM outbox")
    [(event_id, topic, key, payload, headers)] = rows.fetchall()
    assert topic == config.topic(TOPIC_PAYMENT_RESULT)
    assert key == str(user_id)
    assert headers["event_id"] == str(event_id)
    envelope = events.decode(events.encode(payload), TYPE_PAYMENT_RESULT)
    assert envelope.event_id == event_id
    assert envelope.payload == {"order_id": str(order_id), **PAID}


def test_an_order_above_the_balance_fails_with_insufficient_funds_and_debits_nothing(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = request_payment(payments_db, config, user_id, 101)

    apply(payments_db, handler)

    assert balance_of(payments_db, user_id) == 100
    assert debits_of(payments_db, order_id) == []
    assert results_of(payments_db, order_id) == [SHORT]


def test_an_order_of_exactly_the_balance_is_paid_and_leaves_zero(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = request_payment(payments_db, config, user_id, 100)

    apply(payments_db, handler)

    assert balance_of(payments_db, user_id) == 0
    assert results_of(payments_db, order_id) == [PAID]


def test_an_order_of_a_user_without_an_account_fails_with_account_not_found(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    order_id = request_payment(payments_db, config, uuid7(), 10)

    apply(payments_db, handler)

    assert results_of(payments_db, order_id) == [NO_ACCOUNT]
    assert count(payments_db, "ledger") == 0


def test_one_users_orders_are_charged_in_the_order_they_arrived(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    first = request_payment(payments_db, config, user_id, 80)
    second = request_payment(payments_db, config, user_id, 30)
    third = request_payment(payments_db, config, user_id, 20)

    apply(payments_db, handler)

    assert [r["order_id"] for r in results(payments_db)] == [str(first), str(second), str(third)]
    assert results_of(payments_db, first) == [PAID]
    assert results_of(payments_db, second) == [SHORT]
    assert results_of(payments_db, third) == [PAID]
    assert balance_of(payments_db, user_id) == 0


# --- Exactly once --------------------------------------------------------------------------------


def test_second_delivery_of_an_event_in_one_batch_does_not_debit_twice(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    event_id = uuid7()
    order_id = request_payment(payments_db, config, user_id, 30, event_id=event_id)
    request_payment(payments_db, config, user_id, 30, order_id=order_id, event_id=event_id)

    report = apply(payments_db, handler)

    assert report == ApplyReport(applied=1)
    assert count(payments_db, "inbox") == 1
    assert debits_of(payments_db, order_id) == [30]
    assert balance_of(payments_db, user_id) == 70
    assert results_of(payments_db, order_id) == [PAID]


def test_second_delivery_of_an_event_after_it_was_applied_does_not_debit_twice(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    event_id = uuid7()
    order_id = request_payment(payments_db, config, user_id, 30, event_id=event_id)
    apply(payments_db, handler)

    request_payment(payments_db, config, user_id, 30, order_id=order_id, event_id=event_id)
    report = apply(payments_db, handler)

    assert report == ApplyReport()
    assert debits_of(payments_db, order_id) == [30]
    assert balance_of(payments_db, user_id) == 70
    assert results_of(payments_db, order_id) == [PAID]


@pytest.mark.parametrize("separate_batches", [False, True])
def test_the_same_order_under_a_new_event_id_is_paid_again_but_debited_once(
    payments_db: psycopg.Connection[Any],
    config: Config,
    handler: ApplyHandler,
    separate_batches: bool,
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = request_payment(payments_db, config, user_id, 30)
    if separate_batches:
        apply(payments_db, handler)

    request_payment(payments_db, config, user_id, 30, order_id=order_id)
    apply(payments_db, handler)

    assert count(payments_db, "inbox WHERE processed_at IS NOT NULL") == 2
    assert debits_of(payments_db, order_id) == [30]
    assert balance_of(payments_db, user_id) == 70
    assert results_of(payments_db, order_id) == [PAID, PAID]


def test_a_declined_order_stays_declined_when_redelivered_after_a_top_up(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    # Orders keeps a failed order failed: debiting it later would take money for nothing.
    user_id = open_account(payments_db, balance=10)
    order_id = request_payment(payments_db, config, user_id, 50)
    apply(payments_db, handler)
    payments_db.execute(
        queries.TOP_UP_USER, {"user_id": user_id, "amount": 100, "idempotency_key": None}
    )

    request_payment(payments_db, config, user_id, 50, order_id=order_id)
    apply(payments_db, handler)

    assert debits_of(payments_db, order_id) == []
    assert balance_of(payments_db, user_id) == 110
    assert results_of(payments_db, order_id) == [SHORT, SHORT]


def test_an_order_declined_for_a_missing_account_stays_declined_once_it_exists(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    ids = new_account(None)
    order_id = request_payment(payments_db, config, ids.user_id, 5)
    apply(payments_db, handler)
    payments_db.execute(
        queries.CREATE_ACCOUNT,
        {"account_id": ids.account_id, "user_id": ids.user_id, "idempotency_key": None},
    )
    payments_db.execute(
        queries.TOP_UP_USER, {"user_id": ids.user_id, "amount": 100, "idempotency_key": None}
    )

    request_payment(payments_db, config, ids.user_id, 5, order_id=order_id)
    apply(payments_db, handler)

    assert balance_of(payments_db, ids.user_id) == 100
    assert results_of(payments_db, order_id) == [NO_ACCOUNT, NO_ACCOUNT]


# --- Concurrency ---------------------------------------------------------------------------------


def test_fifty_concurrent_charges_against_a_balance_for_ten_pay_exactly_ten(
    payments_url: str, payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=10 * 70)
    start = Barrier(50)

    def charge_one_order(_: int) -> uuid.UUID:
        with psycopg.connect(payments_url, autocommit=True) as conn:
            start.wait(timeout=60)
            order_id = request_payment(conn, config, user_id, 70)
            apply(conn, handler)
            return order_id

    with ThreadPoolExecutor(max_workers=50) as pool:
        order_ids = list(pool.map(charge_one_order, range(50)))

    answers = [results_of(payments_db, order_id) for order_id in order_ids]
    assert all(len(answer) == 1 for answer in answers)
    assert sum(answer == [PAID] for answer in answers) == 10
    assert sum(answer == [SHORT] for answer in answers) == 40
    assert balance_of(payments_db, user_id) == 0
    assert count(payments_db, "ledger WHERE kind = 'debit'") == 10
    assert count(payments_db, "inbox WHERE processed_at IS NULL") == 0


def test_concurrent_top_ups_and_charges_lose_no_update(
    payments_url: str, payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=250)
    top_ups = [(1 + i % 7) * 10 for i in range(40)]
    charges = 30
    start = Barrier(len(top_ups) + charges)

    def top_up(amount: int) -> None:
        with psycopg.connect(payments_url, autocommit=True) as conn:
            start.wait(timeout=60)
            conn.execute(
                queries.TOP_UP_USER, {"user_id": user_id, "amount": amount, "idempotency_key": None}
            )

    def charge(_: int) -> None:
        with psycopg.connect(payments_url, autocommit=True) as conn:
            start.wait(timeout=60)
            request_payment(conn, config, user_id, 25)
            apply(conn, handler)

    with ThreadPoolExecutor(max_workers=len(top_ups) + charges) as pool:
        work = [pool.submit(top_up, a) for a in top_ups]
        work += [pool.submit(charge, i) for i in range(charges)]
        for done in work:
            done.result()

    answers = results(payments_db)
    paid = sum(answer["status"] == "paid" for answer in answers)
    assert len(answers) == charges
    assert paid >= 250 // 25  # the opening balance alone pays for ten
    assert all(
        answer["reason"] == "insufficient_funds"
        for answer in answers
        if answer["status"] == "failed"
    )
    assert balance_of(payments_db, user_id) == 250 + sum(top_ups) - 25 * paid
    ledger = dict(payments_db.execute("SELECT kind, sum(amount) FROM ledger GROUP BY kind"))
    assert ledger == {"top_up": 250 + sum(top_ups), "debit": 25 * paid}


# --- Atomicity -----------------------------------------------------------------------------------


def test_a_handler_failing_after_the_outbox_insert_leaves_no_trace_and_is_retried(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = request_payment(payments_db, config, user_id, 40)

    outbox_rows_before_crash: list[int] = []

    def crash_after_effects(conn: psycopg.Connection[Any], pending: Pending) -> None:
        handler(conn, pending)
        outbox_rows_before_crash.append(count(conn, "outbox"))
        raise RuntimeError("crash after the outbox insert")

    report = apply(payments_db, crash_after_effects)

    assert report == ApplyReport(retried=1)
    # The effects were written, then rolled back: once in the whole-batch pass, once more when
    # the batch was redone event by event.
    assert outbox_rows_before_crash == [1, 1]
    assert count(payments_db, "outbox") == 0
    assert debits_of(payments_db, order_id) == []
    assert balance_of(payments_db, user_id) == 100
    attempts = payments_db.execute("SELECT attempts, processed_at, last_error FROM inbox")
    assert attempts.fetchone() == (1, None, "RuntimeError: crash after the outbox insert")

    time.sleep(inbox.backoff_seconds(0) + 0.1)
    assert apply(payments_db, handler) == ApplyReport(applied=1)
    assert results_of(payments_db, order_id) == [PAID]
    assert debits_of(payments_db, order_id) == [40]


def test_a_connection_lost_mid_batch_commits_nothing(
    payments_url: str, payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    first = request_payment(payments_db, config, user_id, 10)
    request_payment(payments_db, config, user_id, 20)
    seen: list[object] = []

    def die_on_second_event(conn: psycopg.Connection[Any], pending: Pending) -> None:
        handler(conn, pending)
        seen.append(pending.event_id)
        if len(seen) == 2:
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with (
        psycopg.connect(payments_url, autocommit=True) as doomed,
        pytest.raises(psycopg.OperationalError),
    ):
        apply(doomed, die_on_second_event)

    assert len(seen) == 2
    assert count(payments_db, "outbox") == 0
    assert count(payments_db, "ledger WHERE kind = 'debit'") == 0
    assert count(payments_db, "inbox WHERE processed_at IS NULL AND attempts = 0") == 2
    assert apply(payments_db, handler) == ApplyReport(applied=2)
    assert results_of(payments_db, first) == [PAID]
    assert balance_of(payments_db, user_id) == 70


# --- Poison --------------------------------------------------------------------------------------


def test_poison_goes_to_dead_letters_after_max_attempts_and_does_not_block_later_events(
    payments_db: psycopg.Connection[Any], config: Config, handler: ApplyHandler
) -> None:
    user_id = open_account(payments_db, balance=100)
    order_id = uuid7()
    poison = {
        "malformed JSON": b'{"event_id": ',
        "negative amount": events.encode(payment_requested(order_id, user_id, -5).to_json()),
        "unknown schema_version": events.encode(
            payment_requested(order_id, user_id, 5, schema_version=99).to_json()
        ),
        "wrong event type": events.encode(
            Envelope(TYPE_PAYMENT_RESULT, {"order_id": str(order_id)}).to_json()
        ),
        "bad order_id": events.encode(payment_requested(order_id, user_id, 5).to_json()).replace(
            str(order_id).encode(), b"not-a-uuid"
        ),
    }
    poison_ids = {name: receive(payments_db, config, raw) for name, raw in poison.items()}
    foreign = receive(payments_db, config, b"{}", topic=config.topic(TOPIC_PAYMENT_RESULT))
    good_order = request_payment(payments_db, config, user_id, 30)

    first = apply(payments_db, handler)

    assert first == ApplyReport(applied=1, retried=len(poison) + 1)
    assert results_of(payments_db, good_order) == [PAID]

    deadline = time.monotonic() + 20
    while count(payments_db, "dead_letters") < len(poison) + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        apply(payments_db, handler)

    dead = dict(payments_db.execute("SELECT event_id, reason FROM dead_letters").fetchall())
    assert set(dead) == {*poison_ids.values(), foreign}
    assert all(reason.startswith("poison: ") for reason in dead.values())
    assert "schema_version" in dead[poison_ids["unknown schema_version"]]
    assert "amount" in dead[poison_ids["negative amount"]]
    attempts = payments_db.execute("SELECT DISTINCT attempts FROM dead_letters").fetchall()
    assert attempts == [(MAX_ATTEMPTS,)]
    assert count(payments_db, "inbox WHERE processed_at IS NULL") == 0
    assert len(results(payments_db)) == 1
    assert balance_of(payments_db, user_id) == 70

    later = request_payment(payments_db, config, user_id, 70)
    assert apply(payments_db, handler) == ApplyReport(applied=1)
    assert results_of(payments_db, later) == [PAID]


# --- What the schema itself refuses --------------------------------------------------------------


def test_the_ledger_is_append_only(payments_db: psycopg.Connection[Any]) -> None:
    open_account(payments_db, balance=10)

    with pytest.raises(psycopg.errors.RestrictViolation):
        payments_db.execute("UPDATE ledger SET amount = 1")
    with pytest.raises(psycopg.errors.RestrictViolation):
        payments_db.execute("DELETE FROM ledger")
    with pytest.raises(psycopg.errors.RestrictViolation):
        payments_db.execute("TRUNCATE ledger")
    assert count(payments_db, "ledger") == 1


def test_the_schema_refuses_an_overdraft_a_second_debit_and_a_debit_without_order(
    payments_db: psycopg.Connection[Any],
) -> None:
    user_id = open_account(payments_db, balance=10)
    [(account_id,)] = payments_db.execute(
        "SELECT id FROM accounts WHERE user_id = %s", (user_id,)
    ).fetchall()
    order_id = uuid7()
    debit = "INSERT INTO ledger (account_id, kind, amount, order_id) VALUES (%s, 'debit', 1, %s)"

    with pytest.raises(psycopg.errors.CheckViolation):
        payments_db.execute("UPDATE accounts SET balance = balance - 11")
    with pytest.raises(psycopg.errors.CheckViolation):
        payments_db.execute(debit, (account_id, None))
    with payments_db.transaction(force_rollback=True):
        payments_db.execute(debit, (account_id, order_id))
        with pytest.raises(psycopg.errors.UniqueViolation), payments_db.transaction():
            payments_db.execute(debit, (account_id, order_id))
    assert balance_of(payments_db, user_id) == 10
