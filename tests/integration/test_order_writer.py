"""Group commit of new orders on a real Postgres: orders created at once share transactions,
each still gets its own row and outbox row, and one bad order fails alone."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from services.common import outbox
from services.common.ids import uuid7
from services.orders import queries
from services.orders.domain import payment_requested
from services.orders.writer import OrderWriter, Waiting
from tests.e2e.conftest import eventually


def order_params(
    order_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    order_id, user_id = order_id or uuid7(), user_id or uuid.uuid4()
    envelope = payment_requested(order_id, user_id, 100)
    row = outbox.row("orders.payment-requested", str(user_id), envelope)
    order = {"id": order_id, "user_id": user_id, "amount": 100, "description": "d"}
    return order | row | {"idempotency_key": idempotency_key}


async def create_all(url: str, batch: list[dict[str, Any]]) -> list[Any]:
    async with AsyncConnectionPool(url, kwargs={"autocommit": True}, open=False) as pool:
        writer = OrderWriter(pool, timeout=30, deadline=30)
        try:
            return await asyncio.gather(
                *(writer.create(params) for params in batch), return_exceptions=True
            )
        finally:
            await writer.close()


def test_orders_created_at_once_share_transactions_and_each_gets_its_outbox_row(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    batch = [order_params() for _ in range(30)]

    rows = asyncio.run(create_all(orders_url, batch))

    assert [row[0] for row in rows] == [params["id"] for params in batch]  # each its own row
    ids = [params["id"] for params in batch]
    transactions = orders_db.execute(
        "SELECT count(DISTINCT xmin::text) FROM orders WHERE id = ANY(%s)", [ids]
    ).fetchone()
    assert transactions is not None and transactions[0] < len(batch)  # grouped
    events = orders_db.execute(
        "SELECT payload->'payload'->>'order_id' FROM outbox"
        " WHERE payload->'payload'->>'order_id' = ANY(%s) ORDER BY id",
        [[str(i) for i in ids]],
    ).fetchall()
    # One event each, in the callers' order: the relay publishes by outbox id, so each user's
    # payment requests reach the topic in the order the user made them.
    assert [row[0] for row in events] == [str(i) for i in ids]


def test_an_order_that_fails_in_a_batch_fails_alone(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    taken = uuid7()
    asyncio.run(create_all(orders_url, [order_params(taken)]))
    batch = [order_params() for _ in range(5)] + [order_params(taken)] + [order_params()]

    results = asyncio.run(create_all(orders_url, batch))

    assert isinstance(results[5], psycopg.errors.UniqueViolation)
    others = [r for i, r in enumerate(results) if i != 5]
    assert [row[0] for row in others] == [p["id"] for i, p in enumerate(batch) if i != 5]
    assert orders_db.execute(
        "SELECT count(*) FROM orders WHERE id = ANY(%s)", [[p["id"] for p in batch]]
    ).fetchone() == (len(batch),)  # the six new ones, and the one that was there before


def test_an_order_on_an_idle_writer_is_written_at_once_alone(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    params = order_params()
    (row,) = asyncio.run(create_all(orders_url, [params]))
    assert row[0] == params["id"]
    with pytest.raises(psycopg.errors.UniqueViolation):  # and it did commit
        orders_db.execute(
            "INSERT INTO orders (id, user_id, amount, description) VALUES (%s, %s, 1, '')",
            [params["id"], params["user_id"]],
        )


def test_a_batch_past_its_time_is_answered_as_unavailable(orders_url: str) -> None:
    async def run() -> BaseException | None:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=0, deadline=30)  # every batch runs out of time
            try:
                await writer.create(order_params())
            except psycopg.OperationalError as exc:  # what the service answers 503 for
                return exc
            finally:
                await writer.close()
        return None

    assert "took over 0.0 s" in str(asyncio.run(run()))


def test_orders_not_written_by_their_deadline_never_are_and_the_writer_goes_on(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    # The gateway answers 503 ("retry") once its timeout runs out. An order written after that
    # (it waited behind a stalled insert, or its insert outlived it) would be paid twice by a
    # client that does retry. A lock on the orders table stalls every insert for 2.5 s here;
    # each order may take 1 s.
    async def run() -> tuple[list[Any], Any]:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=1.0)
            locked = asyncio.Event()

            async def stall(seconds: float) -> None:
                async with await psycopg.AsyncConnection.connect(orders_url) as locker:
                    await locker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
                    locked.set()
                    await asyncio.sleep(seconds)

            try:
                stalling = asyncio.create_task(stall(2.5))
                await locked.wait()
                first = asyncio.create_task(writer.create(stalled[0]))
                await asyncio.sleep(0.2)  # in flight, behind the lock
                queued = [asyncio.create_task(writer.create(p)) for p in stalled[1:]]
                results = await asyncio.gather(first, *queued, return_exceptions=True)
                await stalling
                await asyncio.sleep(0.5)  # what was cancelled must not commit after all
                return results, await writer.create(after)
            finally:
                await writer.close()

    stalled = [order_params() for _ in range(4)]
    after = order_params()

    results, row = asyncio.run(run())

    assert all(isinstance(r, psycopg.OperationalError) for r in results), results  # 503s
    ids = [p["id"] for p in stalled]
    written = orders_db.execute("SELECT count(*) FROM orders WHERE id = ANY(%s)", [ids])
    assert written.fetchone() == (0,)
    assert row[0] == after["id"]


def test_an_order_whose_caller_has_too_little_time_left_is_refused_unwritten(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    # The gateway says how long it still waits (its time left after waiting for a connection):
    # 0.2 s leaves 0.16 to write in, under MIN_TIME_LEFT.
    async def run() -> tuple[BaseException | None, Any]:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=30)
            try:
                try:
                    await writer.create(hurried, budget=0.2)
                    refused: BaseException | None = None
                except psycopg.OperationalError as exc:
                    refused = exc
                return refused, await writer.create(unhurried, budget=5.0)
            finally:
                await writer.close()

    hurried, unhurried = order_params(), order_params()

    refused, row = asyncio.run(run())

    assert isinstance(refused, psycopg.OperationalError)
    assert row[0] == unhurried["id"]
    written = orders_db.execute(
        "SELECT id FROM orders WHERE id = ANY(%s)", [[hurried["id"], unhurried["id"]]]
    )
    assert written.fetchall() == [(unhurried["id"],)]


def test_orders_an_insert_wrote_as_its_time_ran_out_are_answered_as_written(
    orders_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An insert cancelled while it was committing goes through: its callers get their rows,
    # not a 503 that would make them order again.
    async def run() -> list[Any]:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=2.0)
            insert = writer._insert

            async def committed_then_slow(batch: list[dict[str, Any]]) -> list[Any]:
                rows = await insert(batch)
                await asyncio.sleep(5)  # past the deadline: cancelled here, after the commit
                return rows

            monkeypatch.setattr(writer, "_insert", committed_then_slow)
            try:
                return await asyncio.gather(*(writer.create(p) for p in batch))
            finally:
                await writer.close()

    batch = [order_params() for _ in range(3)]

    rows = asyncio.run(run())

    assert [row[0] for row in rows] == [p["id"] for p in batch]


def test_closing_the_writer_answers_the_orders_being_written(orders_url: str) -> None:
    # Stopping mid-insert (the server's graceful shutdown ran out) left the batch in flight
    # without an answer: it had already left the queue.
    async def run() -> BaseException | None:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=30)
            async with await psycopg.AsyncConnection.connect(orders_url) as locker:
                await locker.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
                stalled = asyncio.create_task(writer.create(order_params()))
                await asyncio.sleep(0.3)  # in flight, behind the lock
                await writer.close()
                try:
                    await asyncio.wait_for(stalled, timeout=5)
                except psycopg.OperationalError as exc:
                    return exc
        return None

    assert "stopping" in str(asyncio.run(run()))


def test_a_failure_outside_the_insert_fails_its_callers_and_the_writer_goes_on(
    orders_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> tuple[BaseException | None, Any]:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=30)
            write = writer._write
            calls = [0]

            async def broken_once(batch: Any) -> None:
                calls[0] += 1
                if calls[0] == 1:
                    raise RuntimeError("a bug")
                await write(batch)

            monkeypatch.setattr(writer, "_write", broken_once)
            try:
                try:
                    await writer.create(order_params())
                    first: BaseException | None = None
                except RuntimeError as exc:
                    first = exc
                return first, await writer.create(order_params())
            finally:
                await writer.close()

    first, row = asyncio.run(run())
    assert isinstance(first, RuntimeError)  # answered (500), not left waiting
    assert row is not None  # the next order is written as usual


def keyed(user_id: uuid.UUID, key: str | None) -> dict[str, Any]:
    return order_params(user_id=user_id, idempotency_key=key)


def test_one_statement_writes_one_order_per_user_and_idempotency_key(
    orders_db: psycopg.Connection[Any],
) -> None:
    me, them = uuid.uuid4(), uuid.uuid4()
    group = [keyed(me, "k"), keyed(me, "k"), keyed(them, "k"), keyed(me, None), keyed(me, None)]

    rows = orders_db.execute(queries.CREATE_ORDERS, queries.create_orders_params(group)).fetchall()

    written = [group[i]["id"] for i in (0, 2, 3, 4)]  # the first with the key, and no other
    assert sorted(row[0] for row in rows) == sorted(written)
    events = orders_db.execute(
        "SELECT (payload->'payload'->>'order_id')::uuid FROM outbox ORDER BY id"
    ).fetchall()
    assert [row[0] for row in events] == written  # their requests only, in the group's order


def test_the_writer_answers_a_repeated_idempotency_key_with_the_order_that_has_it(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    me = uuid.uuid4()
    (first,) = asyncio.run(create_all(orders_url, [keyed(me, "k")]))
    # Later, and several at once (one batch): each the first one's row.
    batch = [keyed(me, "k"), keyed(me, "other"), keyed(me, "k"), keyed(me, "other")]

    rows = asyncio.run(create_all(orders_url, batch))

    assert [row[0] for row in rows] == [first[0], batch[1]["id"], first[0], batch[1]["id"]]
    assert orders_db.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    assert orders_db.execute("SELECT count(*) FROM outbox").fetchone() == (2,)


@pytest.mark.parametrize(
    ("lookup", "cause"),
    [("SELECT 1 / 0", psycopg.errors.DivisionByZero), ("SELECT pg_sleep(5)", TimeoutError)],
    ids=["fails", "too-slow"],
)
def test_orders_written_are_answered_when_the_order_holding_a_repeated_key_cannot_be_read(
    orders_url: str,
    orders_db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    lookup: str,
    cause: type[BaseException],
) -> None:
    # The insert commits, then reading the holder of a repeated key fails or takes too long:
    # the orders written must still be answered as written (a 503 would have their clients
    # send them again, and pay twice); the repeat alone gets a 503, and its key makes sending
    # it again safe.
    me = uuid.uuid4()
    (first,) = asyncio.run(create_all(orders_url, [keyed(me, "k")]))
    monkeypatch.setattr(queries, "KEYED_ORDERS", lookup)
    plain, repeat = keyed(me, None), keyed(me, "k")

    async def write() -> list[Any]:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            loop = asyncio.get_running_loop()
            batch = [Waiting(p, loop.create_future(), loop.time() + 30) for p in (plain, repeat)]
            await OrderWriter(pool, timeout=30, deadline=30)._write(batch)
            return [one.future.exception() or one.future.result() for one in batch]

    written, failed = asyncio.run(write())

    assert written[0] == plain["id"]
    assert isinstance(failed, psycopg.OperationalError)  # a 503
    assert isinstance(failed.__cause__, cause)
    ids = orders_db.execute("SELECT id FROM orders ORDER BY created_at").fetchall()
    assert ids == [(first[0],), (plain["id"],)]


def test_a_key_being_written_by_another_transaction_gives_that_transaction_s_order(
    orders_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    # Two Orders processes, one key: the second insert waits for the first transaction, and
    # once it commits, answers with its order.
    me = uuid.uuid4()
    theirs, mine = keyed(me, "k"), keyed(me, "k")
    answers: list[Any] = []

    async def insert() -> None:
        async with AsyncConnectionPool(orders_url, kwargs={"autocommit": True}) as pool:
            writer = OrderWriter(pool, timeout=30, deadline=30)
            answers.extend(await writer._with_holders([mine], await writer._insert([mine])))

    with psycopg.connect(orders_url) as other:
        other.execute(queries.CREATE_ORDERS, queries.create_orders_params([theirs]))
        waiting = threading.Thread(target=asyncio.run, args=(insert(),))
        waiting.start()

        def blocked() -> None:
            rows = orders_db.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO orders%%'"
            ).fetchall()
            assert rows

        eventually(blocked)
        other.commit()
        waiting.join(timeout=30)

    assert [row[0] for row in answers] == [theirs["id"]]
    assert orders_db.execute("SELECT count(*) FROM orders").fetchone() == (1,)
    assert orders_db.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
