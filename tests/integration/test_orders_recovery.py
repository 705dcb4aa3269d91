"""Orders left new are asked for again, on a real Postgres: only orders whose request was
published and went unanswered, oldest first, each with a new event, backing off per order."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from services.common import db, outbox
from services.common.config import Config
from services.common.events import EVENT_ID_HEADER, TOPIC_PAYMENT_REQUESTED, TYPE_PAYMENT_REQUESTED
from services.common.ids import uuid7
from services.orders import queries
from services.orders.domain import payment_requested
from services.orders.recovery import (
    MAX_REREQUEST_WAIT,
    MAX_REREQUESTS,
    forget_settled,
    rerequest_unanswered,
)
from tests.conftest import plan_nodes

AFTER = 300.0  # PAYMENT_REREQUEST_AFTER's default
CONFIG_TOPIC = Config(kafka_topic_prefix="test-recovery.").topic(TOPIC_PAYMENT_REQUESTED)


@pytest.fixture
def config(orders_url: str) -> Config:
    return Config(
        orders_database_url=orders_url,
        kafka_topic_prefix="test-recovery.",
        payment_rerequest_after=AFTER,
    )


@pytest.fixture
def pool(config: Config) -> Iterator[ConnectionPool]:
    pool = db.sync_pool(config, "orders", "test-recovery", size=1)
    try:
        yield pool
    finally:
        pool.close()


def order(
    db_: psycopg.Connection[Any],
    age_s: float,
    *,
    user: uuid.UUID | None = None,
    status: str = "new",
    amount: int = 700,
    published_s_ago: float | None = None,
) -> uuid.UUID:
    """An order created `age_s` seconds ago, and its payment request, published at once or
    `published_s_ago` seconds ago (None: at once)."""
    order_id, user = uuid7(), user or uuid.uuid4()
    params = {
        "id": order_id,
        "user": user,
        "amount": amount,
        "status": status,
        "reason": "insufficient_funds" if status == "failed" else None,
        "age": age_s,
        "published": age_s - 0.01 if published_s_ago is None else published_s_ago,
    }
    db_.execute(
        "INSERT INTO orders (id, user_id, amount, description, status, reason, created_at,"
        " updated_at) VALUES (%(id)s, %(user)s, %(amount)s, 'lost', %(status)s, %(reason)s,"
        " now() - make_interval(secs => %(age)s), now() - make_interval(secs => %(age)s))",
        params,
    )
    topic = CONFIG_TOPIC
    row = outbox.row(topic, str(user), payment_requested(order_id, user, amount))
    db_.execute(
        "INSERT INTO outbox (event_id, topic, key, payload, headers, created_at, published_at)"
        " VALUES (%(event_id)s, %(topic)s, %(key)s, %(payload)s, %(headers)s,"
        " now() - make_interval(secs => %(age)s), now() - make_interval(secs => %(published)s))",
        {**row, **params},
    )
    return order_id


def requested(db_: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """The payment requests waiting in the outbox (no relay runs here: those asked for
    again, and any a test left pending), oldest first: (order_id, event_id, key, topic,
    envelope, headers)."""
    return db_.execute(
        "SELECT (payload->'payload'->>'order_id')::uuid, event_id, key, topic, payload, headers"
        " FROM outbox WHERE published_at IS NULL ORDER BY id"
    ).fetchall()


def attempts(db_: psycopg.Connection[Any], order_id: uuid.UUID) -> int | None:
    row = db_.execute(
        "SELECT attempts FROM payment_rerequests WHERE order_id = %s", (order_id,)
    ).fetchone()
    return None if row is None else int(row[0])


def test_an_order_left_new_is_requested_again_with_an_event_of_its_own(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    user = uuid.uuid4()
    lost = order(orders_db, AFTER + 60, user=user, amount=1234)
    counted = REGISTRY.get_sample_value("payment_rerequests_total") or 0.0

    assert rerequest_unanswered(pool, config) == 1
    assert REGISTRY.get_sample_value("payment_rerequests_total") == counted + 1

    [(order_id, event_id, key, topic, envelope, headers)] = requested(orders_db)
    assert order_id == lost
    assert topic == config.topic(TOPIC_PAYMENT_REQUESTED) and key == str(user)
    assert envelope["type"] == TYPE_PAYMENT_REQUESTED
    assert envelope["payload"] == {"order_id": str(lost), "user_id": str(user), "amount": 1234}
    assert envelope["event_id"] == str(event_id) == headers[EVENT_ID_HEADER]
    assert attempts(orders_db, lost) == 1
    # Still new and unchanged: asking again is not an answer.
    assert orders_db.execute("SELECT status FROM orders WHERE id = %s", (lost,)).fetchone() == (
        "new",
    )


def test_young_answered_and_unpublished_orders_are_not_asked_for_again(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    order(orders_db, AFTER - 30)  # young: its answer may be on the way
    order(orders_db, AFTER + 60, status="paid")
    order(orders_db, AFTER + 60, status="failed")
    assert rerequest_unanswered(pool, config) == 0

    # The relay is behind: the outbox's oldest pending row is 20 minutes old. An order younger
    # than it may still be waiting in the outbox; an older one went out and was lost.
    orders_db.execute(
        "INSERT INTO outbox (event_id, topic, key, payload, created_at) VALUES"
        " (%s, 't', 'k', '{}', clock_timestamp() - interval '20 minutes')",
        (uuid.uuid4(),),
    )
    order(orders_db, 10 * 60)
    older = order(orders_db, 30 * 60)
    assert rerequest_unanswered(pool, config) == 1
    assert [r[0] for r in requested(orders_db)] == [None, older]  # the pending row, then ours


def waits(db_: psycopg.Connection[Any], order_id: uuid.UUID) -> tuple[int, float]:
    """How many times `order_id` was asked for again, and the seconds until the next time
    from the last."""
    row = db_.execute(
        "SELECT attempts, extract(epoch FROM next_request_at - last_requested_at)"
        " FROM payment_rerequests WHERE order_id = %s",
        (order_id,),
    ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def published(db_: psycopg.Connection[Any], seconds_ago: float = 0.0) -> None:
    """The relay publishes every pending row (no relay runs here), `seconds_ago` seconds ago."""
    db_.execute(
        "UPDATE outbox SET published_at = now() - make_interval(secs => %s)"
        " WHERE published_at IS NULL",
        (seconds_ago,),
    )


def time_passes(db_: psycopg.Connection[Any], seconds: float) -> None:
    """Every time the tables hold moves `seconds` into the past."""
    shift = {"s": seconds}
    for table, columns in (
        ("orders", ("created_at", "updated_at")),
        ("outbox", ("created_at", "published_at")),
        ("payment_rerequests", ("last_requested_at", "next_request_at")),
    ):
        moved = ", ".join(f"{c} = {c} - make_interval(secs => %(s)s)" for c in columns)
        db_.execute(f"UPDATE {table} SET {moved}", shift)


def make_due(db_: psycopg.Connection[Any]) -> None:
    """The requests asked again went out, and their waits passed unanswered."""
    published(db_)
    [(wait,)] = db_.execute(
        "SELECT max(extract(epoch FROM next_request_at - now())) FROM payment_rerequests"
    ).fetchall()
    time_passes(db_, float(wait) + 1)


def every_request(db_: psycopg.Connection[Any], order_id: uuid.UUID) -> list[uuid.UUID]:
    """The event ids of every payment request of `order_id` in the outbox, published or not."""
    rows = db_.execute(
        "SELECT event_id FROM outbox WHERE payload->'payload'->>'order_id' = %s ORDER BY id",
        (str(order_id),),
    ).fetchall()
    return [row[0] for row in rows]


def test_an_order_is_asked_for_again_after_twice_the_wait_each_time_then_left(
    config: Config,
    pool: ConnectionPool,
    orders_db: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost = order(orders_db, AFTER + 1)
    assert rerequest_unanswered(pool, config) == 1
    assert rerequest_unanswered(pool, config) == 0  # just asked
    assert waits(orders_db, lost) == (1, 2 * AFTER)

    expected = [(2, 4 * AFTER), (3, 8 * AFTER), (4, MAX_REREQUEST_WAIT)]  # then an hour
    for attempts, wait in expected:
        make_due(orders_db)
        assert rerequest_unanswered(pool, config) == 1
        assert waits(orders_db, lost) == (attempts, wait)
    assert len(set(every_request(orders_db, lost))) == 5  # the first, and a new one each time

    orders_db.execute("UPDATE payment_rerequests SET attempts = %s", (MAX_REREQUESTS - 1,))
    make_due(orders_db)
    assert rerequest_unanswered(pool, config) == 1  # the last time
    assert f"for the last time ({MAX_REREQUESTS} times)" in caplog.text
    assert str(lost) in caplog.text
    make_due(orders_db)
    assert rerequest_unanswered(pool, config) == 0
    assert len(every_request(orders_db, lost)) == 6


def test_an_order_whose_first_request_is_still_in_the_outbox_is_not_asked_for_again(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    # Written as the service writes orders: the order's time is read when the statement
    # starts, its outbox row's a little later. With the relay an hour behind, the order's own
    # request is the oldest pending row, its time a hair before that row's.
    user = uuid.uuid4()
    event = payment_requested(uuid7(), user, 100)
    group = [
        {
            "id": uuid.UUID(event.payload["order_id"]),
            "user_id": user,
            "amount": 100,
            "description": "waiting",
            **outbox.row(config.topic(TOPIC_PAYMENT_REQUESTED), str(user), event),
        }
    ]
    orders_db.execute(queries.CREATE_ORDERS, queries.create_orders_params(group))
    waiting = group[0]["id"]
    orders_db.execute(
        "UPDATE orders SET created_at = created_at - interval '1 hour',"
        " updated_at = updated_at - interval '1 hour';"
        "UPDATE outbox SET created_at = created_at - interval '1 hour'"
    )
    # Another order went out 6 minutes ago (a row Kafka acknowledged behind one it did not):
    # both wait for the relay to publish the older one.
    lost = order(orders_db, AFTER + 60)
    assert rerequest_unanswered(pool, config) == 0

    # It went out not quite `after` ago: the order's answer has had less than that, and the
    # other order still waits behind it.
    published(orders_db, AFTER - 1)
    assert rerequest_unanswered(pool, config) == 0

    # It went out an hour ago: both were lost.
    # (each at its own time: two rows published at the same instant would leave which one is
    # the newest to the plan)
    orders_db.execute("UPDATE outbox SET published_at = created_at")
    assert rerequest_unanswered(pool, config) == 2
    assert [r[0] for r in requested(orders_db)] == [waiting, lost]


def test_an_order_is_due_after_the_wait_from_when_its_request_was_published(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    # Kafka was down for an hour: the order's request waited in the outbox, and went out a
    # minute ago. Its answer has had a minute, not an hour.
    order(orders_db, 2 * 3600)  # long published and lost: due
    late = order(orders_db, 3600, published_s_ago=60)
    assert rerequest_unanswered(pool, config) == 1
    assert late not in [r[0] for r in requested(orders_db)]

    orders_db.execute(
        "UPDATE outbox SET published_at = now() - make_interval(secs => %s)"
        " WHERE payload->'payload'->>'order_id' = %s AND published_at IS NOT NULL",
        (AFTER + 1, str(late)),
    )
    assert rerequest_unanswered(pool, config) == 1
    assert late in [r[0] for r in requested(orders_db)]


def test_orders_from_a_row_kafka_refused_while_it_took_newer_ones_on_wait_from_its_publication(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    # A partition without a leader: Kafka refused one order's request while it took newer ones,
    # and the relay published it a minute ago, behind them. Its answer has had a minute. The
    # outbox cannot tell whose row that was, so the orders made after it wait as long; the
    # older one is due.
    older = order(orders_db, AFTER + 300)
    late = order(orders_db, AFTER + 200, published_s_ago=60)
    newer = order(orders_db, AFTER + 100)
    assert rerequest_unanswered(pool, config) == 1
    assert [r[0] for r in requested(orders_db)] == [older]

    published(orders_db)
    time_passes(orders_db, AFTER - 60 + 1)  # the late row went out `after` ago
    assert rerequest_unanswered(pool, config) == 2
    assert [r[0] for r in requested(orders_db)] == [late, newer]


def test_an_order_asked_for_again_waits_for_that_request_to_go_out(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    lost = order(orders_db, AFTER + 60)
    assert rerequest_unanswered(pool, config) == 1
    # Kafka went down: the request again waits in the outbox for hours, and the order is not
    # asked for once more meanwhile, though its next time came long ago.
    time_passes(orders_db, 3 * MAX_REREQUEST_WAIT)
    assert rerequest_unanswered(pool, config) == 0

    published(orders_db, AFTER - 1)  # it went out, not quite `after` ago
    assert rerequest_unanswered(pool, config) == 0
    time_passes(orders_db, 2)
    assert rerequest_unanswered(pool, config) == 1
    assert attempts(orders_db, lost) == 2


def test_an_order_whose_request_was_purged_from_the_outbox_long_ago_is_due(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    # Published more than RETENTION_HOURS ago, then purged: nothing in the outbox is left to
    # say it went out, and nothing says it did not.
    lost = order(orders_db, (config.retention_hours + 1) * 3600)
    orders_db.execute("DELETE FROM outbox")
    assert rerequest_unanswered(pool, config) == 1
    assert [r[0] for r in requested(orders_db)] == [lost]


def test_with_a_wait_longer_than_an_hour_the_waits_between_requests_are_that_long(
    orders_db: psycopg.Connection[Any], pool: ConnectionPool, orders_url: str
) -> None:
    slow = Config(orders_database_url=orders_url, payment_rerequest_after=2 * MAX_REREQUEST_WAIT)
    lost = order(orders_db, slow.payment_rerequest_after + 60)
    assert rerequest_unanswered(pool, slow) == 1
    assert waits(orders_db, lost) == (1, slow.payment_rerequest_after)  # not 2x: capped


def test_requests_again_of_orders_settled_since_are_forgotten_after_the_retention_window(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    settled, recent, still_new = (order(orders_db, AFTER + 60) for _ in range(3))
    assert rerequest_unanswered(pool, config) == 3
    orders_db.execute("UPDATE orders SET status = 'paid' WHERE id = ANY(%s)", ([settled, recent],))
    orders_db.execute(
        "UPDATE payment_rerequests SET last_requested_at = now() - make_interval(secs => %s)"
        " WHERE order_id <> %s",
        ((config.retention_hours + 1) * 3600, recent),
    )
    assert forget_settled(pool, config) == 1
    kept = orders_db.execute("SELECT order_id FROM payment_rerequests").fetchall()
    assert sorted(kept) == sorted([(recent,), (still_new,)])


def test_the_oldest_are_asked_for_first_a_batch_at_a_time_in_their_order(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any]
) -> None:
    user = uuid.uuid4()
    # Made youngest first, so that their ids (UUIDv7) go the other way from their age.
    by_age = [order(orders_db, AFTER + age, user=user) for age in (100, 200, 300, 400, 500)]
    by_age.reverse()

    assert rerequest_unanswered(pool, config, limit=3) == 3
    assert [r[0] for r in requested(orders_db)] == by_age[:3]  # one user's: in created order
    assert rerequest_unanswered(pool, config, limit=3) == 2
    assert [r[0] for r in requested(orders_db)] == by_age


def test_nothing_is_asked_for_again_while_another_sweeper_is_at_it_or_when_turned_off(
    config: Config, pool: ConnectionPool, orders_db: psycopg.Connection[Any], orders_url: str
) -> None:
    order(orders_db, AFTER + 60)
    with psycopg.connect(orders_url) as other, other.transaction():
        other.execute(queries.REREQUEST_LOCK)
        assert rerequest_unanswered(pool, config) == 0
    off = Config(orders_database_url=config.orders_database_url, payment_rerequest_after=0)
    assert rerequest_unanswered(pool, off) == 0
    assert requested(orders_db) == []
    assert rerequest_unanswered(pool, config) == 1
    # The lock went with the transaction: the next sweeper, on another session, takes it.
    with psycopg.connect(orders_url) as other, other.transaction():
        assert other.execute(queries.REREQUEST_LOCK).fetchone() == (True,)


def settled_history(db_: psycopg.Connection[Any], orders: int = 5000) -> None:
    """`orders` settled orders, one a second until now, their requests published, and the
    planner's statistics of them."""
    db_.execute(
        "INSERT INTO orders (id, user_id, amount, description, status, created_at, updated_at)"
        " SELECT gen_random_uuid(), gen_random_uuid(), 100, 'settled', 'paid',"
        " now() - make_interval(secs => n), now() FROM generate_series(1, %s) n",
        (orders,),
    )
    db_.execute(
        "INSERT INTO outbox (event_id, topic, key, payload, created_at, published_at)"
        " SELECT gen_random_uuid(), 't', 'k', '{}', now() - make_interval(secs => n),"
        " now() - make_interval(secs => n - 0.01) FROM generate_series(1, %s) n",
        (orders,),
    )
    db_.execute("ANALYZE orders")
    db_.execute("ANALYZE outbox")


def test_looking_for_orders_left_new_reads_only_new_orders_through_an_index(
    orders_db: psycopg.Connection[Any],
) -> None:
    # It runs every PAYMENT_REREQUEST_INTERVAL against a table of every order ever made.
    settled_history(orders_db)
    [(plan,)] = orders_db.execute(
        "EXPLAIN (FORMAT JSON) " + queries.UNANSWERED,
        {"after": AFTER, "margin": 10, "max_requests": MAX_REREQUESTS, "limit": 500},
    ).fetchall()
    scans = [
        (node["Node Type"], node.get("Relation Name"), node.get("Index Cond", ""))
        for node in plan_nodes(plan)
    ]
    assert not any(kind == "Seq Scan" for kind, _, _ in scans), scans
    on_orders = [cond for kind, relation, cond in scans if relation == "orders"]
    assert on_orders and all("status = 'new'" in cond for cond in on_orders), scans
    # Bounded by the time: `after` ago, and the oldest pending row, found through its index;
    # the rows published since `after` ago are an index range too.
    assert all("created_at < (now()" in cond for cond in on_orders), scans
    assert all("created_at < (COALESCE(" in cond for cond in on_orders), scans
    on_outbox = [cond for kind, relation, cond in scans if relation == "outbox"]
    assert any("published_at >= (now()" in cond for cond in on_outbox), scans


def test_the_rows_published_lately_are_read_only_once_an_order_may_be_due(
    orders_db: psycopg.Connection[Any],
) -> None:
    # In normal operation no order is new `after` after its creation: the round reads no more
    # than the orders index and the outbox's oldest pending row.
    settled_history(orders_db)
    order(orders_db, AFTER - 30)
    [(plan,)] = orders_db.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + queries.UNANSWERED,
        {"after": AFTER, "margin": 10, "max_requests": MAX_REREQUESTS, "limit": 500},
    ).fetchall()
    published_scans = [
        node
        for node in plan_nodes(plan)
        if node.get("Relation Name") == "outbox" and "published_at >=" in node.get("Index Cond", "")
    ]
    assert published_scans and all(node["Actual Loops"] == 0 for node in published_scans), plan
