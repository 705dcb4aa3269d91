"""End to end under faults: killed relays and workers lose nothing and charge nothing twice;
poison is dead-lettered while the partition keeps flowing."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer

from services.common import kafka
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED, TOPIC_PAYMENT_RESULT
from tests.e2e.conftest import System, eventually

pytestmark = pytest.mark.e2e


def test_killing_workers_and_the_listener_mid_stream_loses_nothing_and_charges_once(
    system: System,
) -> None:
    users = [system.funded_user(1_000_000) for _ in range(5)]
    orders: list[str] = []

    def place(count: int) -> None:
        for index in range(count):
            orders.append(system.place_order(users[index % 5], 100 + index))

    producer = threading.Thread(target=place, args=(300,))
    producer.start()
    for program in ("orders-worker", "payments-worker", "listener", "payments-consumer"):
        time.sleep(0.4)
        system.kill(program)  # SIGKILL; supervisord starts it again
    producer.join()

    states = system.wait_terminal(orders, timeout=120)
    assert {s for s, _ in states.values()} == {"paid"}
    debits = system.payments_sql(
        "SELECT order_id::text, count(*) FROM ledger WHERE kind = 'debit'"
        " AND order_id = ANY(%s::uuid[]) GROUP BY order_id",
        orders,
    )
    assert len(debits) == len(orders)
    assert all(count == 1 for _, count in debits)


@pytest.mark.parametrize(
    "poison",
    [b"{not json", b'{"schema_version": 99, "type": "payment_requested", "payload": {}}'],
)
def test_poison_is_dead_lettered_and_later_messages_on_its_partition_still_flow(
    system: System, poison: bytes
) -> None:
    config = Config(kafka_topic_prefix=system.env["KAFKA_TOPIC_PREFIX"])
    user = system.funded_user(1_000)
    producer = Producer(kafka.producer_settings(config, "e2e-poison"))
    event_id = str(uuid.uuid4())
    # Same key as the user's orders, so the same partition as the order placed after it.
    producer.produce(
        config.topic(TOPIC_PAYMENT_REQUESTED),
        key=user,
        value=poison,
        headers=[("event_id", event_id.encode())],
    )
    assert producer.flush(10) == 0
    order = system.place_order(user, 300)
    assert system.wait_terminal([order])[order] == ("paid", None)

    def dead_lettered() -> str:
        rows = system.payments_sql("SELECT reason FROM dead_letters WHERE event_id = %s", event_id)
        assert rows, "not dead-lettered yet"
        return str(rows[0][0])

    assert "poison" in eventually(dead_lettered, timeout=30)


def test_a_key_postgres_cannot_store_does_not_stop_its_partition(system: System) -> None:
    # A key with a NUL byte (a producer keying by raw UUID bytes writes one now and then) failed
    # the inbox insert of its whole batch: the consumer died on it, restarted, died again.
    config = Config(kafka_topic_prefix=system.env["KAFKA_TOPIC_PREFIX"])
    user = system.funded_user(1_000)
    first = system.place_order(user, 100)
    assert system.wait_terminal([first])[first] == ("paid", None)
    [(request_id,)] = system.orders_sql(
        "SELECT event_id::text FROM outbox WHERE payload->'payload'->>'order_id' = %s", first
    )
    [(partition,)] = system.payments_sql(
        "SELECT kafka_partition FROM inbox WHERE event_id = %s", request_id
    )
    producer = Producer(kafka.producer_settings(config, "e2e-poison"))
    event_id = str(uuid.uuid4())
    producer.produce(
        config.topic(TOPIC_PAYMENT_REQUESTED),
        key=b"a\x00b",
        value=b"{not json",
        partition=partition,  # the user's, so that the next order queues behind it
        headers=[("event_id", event_id.encode())],
    )
    assert producer.flush(10) == 0
    second = system.place_order(user, 200)
    assert system.wait_terminal([second])[second] == ("paid", None)

    def dead_lettered() -> None:
        rows = system.payments_sql("SELECT reason FROM dead_letters WHERE event_id = %s", event_id)
        assert rows, "not dead-lettered yet"

    eventually(dead_lettered, timeout=30)


def test_garbage_on_the_results_topic_is_dead_lettered_by_orders(system: System) -> None:
    config = Config(kafka_topic_prefix=system.env["KAFKA_TOPIC_PREFIX"])
    producer = Producer(kafka.producer_settings(config, "e2e-poison"))
    event_id = str(uuid.uuid4())
    producer.produce(
        config.topic(TOPIC_PAYMENT_RESULT),
        key="someone",
        value=b"\x00\x01 garbage",
        headers=[("event_id", event_id.encode())],
    )
    assert producer.flush(10) == 0

    def dead_lettered() -> None:
        rows = system.orders_sql("SELECT reason FROM dead_letters WHERE event_id = %s", event_id)
        assert rows, "not dead-lettered yet"

    eventually(dead_lettered, timeout=30)
