"""End to end under faults: killed relays and workers lose nothing and charge nothing twice;
poison is dead-lettered while the partition keeps flowing."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

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


def send_raw(
    system: System, topic: str, key: str | bytes, value: bytes, partition: int = -1
) -> str:
    """Produce one message as any producer could (partition -1: the key's); its event_id."""
    config = Config(kafka_topic_prefix=system.env["KAFKA_TOPIC_PREFIX"])
    producer = Producer(kafka.producer_settings(config, "e2e-poison"))
    event_id = str(uuid.uuid4())
    producer.produce(
        config.topic(topic),
        key=key,
        value=value,
        partition=partition,
        headers=[("event_id", event_id.encode())],
    )
    assert producer.flush(10) == 0
    return event_id


def dead_letter_reason(sql: Callable[..., list[tuple[Any, ...]]], event_id: str) -> str:
    """The reason `event_id` was dead-lettered for, once it is (`sql`: a service's database)."""

    def dead_lettered() -> str:
        rows = sql("SELECT reason FROM dead_letters WHERE event_id = %s", event_id)
        assert rows, "not dead-lettered yet"
        return str(rows[0][0])

    return eventually(dead_lettered, timeout=30)


@pytest.mark.parametrize(
    "poison",
    [b"{not json", b'{"schema_version": 99, "type": "payment_requested", "payload": {}}'],
)
def test_poison_is_dead_lettered_and_later_messages_on_its_partition_still_flow(
    system: System, poison: bytes
) -> None:
    user = system.funded_user(1_000)
    # Same key as the user's orders, so the same partition as the order placed after it.
    event_id = send_raw(system, TOPIC_PAYMENT_REQUESTED, user, poison)
    order = system.place_order(user, 300)
    assert system.wait_terminal([order])[order] == ("paid", None)

    assert "poison" in dead_letter_reason(system.payments_sql, event_id)


def test_a_key_postgres_cannot_store_does_not_stop_its_partition(system: System) -> None:
    # A key with a NUL byte (a producer keying by raw UUID bytes writes one now and then) failed
    # the inbox insert of its whole batch: the consumer died on it, restarted, died again.
    user = system.funded_user(1_000)
    first = system.place_order(user, 100)
    assert system.wait_terminal([first])[first] == ("paid", None)
    [(request_id,)] = system.orders_sql(
        "SELECT event_id::text FROM outbox WHERE payload->'payload'->>'order_id' = %s", first
    )
    [(partition,)] = system.payments_sql(
        "SELECT kafka_partition FROM inbox WHERE event_id = %s", request_id
    )
    # On the user's partition, so that the next order queues behind it.
    event_id = send_raw(
        system, TOPIC_PAYMENT_REQUESTED, b"a\x00b", b"{not json", partition=partition
    )
    second = system.place_order(user, 200)
    assert system.wait_terminal([second])[second] == ("paid", None)

    assert dead_letter_reason(system.payments_sql, event_id)


def test_garbage_on_the_results_topic_is_dead_lettered_by_orders(system: System) -> None:
    event_id = send_raw(system, TOPIC_PAYMENT_RESULT, "someone", b"\x00\x01 garbage")

    assert dead_letter_reason(system.orders_sql, event_id)


def test_orders_whose_request_or_answer_was_lost_are_asked_for_again_and_charged_once(
    system: System,
) -> None:
    # The e2e system's Orders sweeper looks for orders left new every second; both orders here
    # were created, and their requests published, an hour ago (PAYMENT_REREQUEST_AFTER is 5
    # minutes).
    user = system.funded_user(1_000)
    answered = system.place_order(user, 200)
    assert system.wait_terminal([answered])[answered] == ("paid", None)
    # Its answer is lost: the order is back to new, as if the result had never arrived.
    system.orders_sql(
        "UPDATE orders SET status = 'new', created_at = now() - interval '1 hour',"
        " updated_at = now() - interval '1 hour' WHERE id = %s RETURNING id",
        answered,
    )
    system.orders_sql(
        "UPDATE outbox SET created_at = now() - interval '1 hour',"
        " published_at = now() - interval '1 hour'"
        " WHERE payload->'payload'->>'order_id' = %s RETURNING id",
        answered,
    )
    # This one's request is lost: the order committed, its event went out and never reached
    # Payments (Kafka lost it).
    [(unrequested,)] = system.orders_sql(
        "WITH lost AS ("
        "  INSERT INTO orders (id, user_id, amount, description, created_at, updated_at)"
        "  VALUES (gen_random_uuid(), %s, 300, 'lost', now() - interval '1 hour',"
        "          now() - interval '1 hour') RETURNING id, user_id"
        "), request AS ("
        "  INSERT INTO outbox (event_id, topic, key, payload, created_at, published_at)"
        "  SELECT gen_random_uuid(), 'lost', user_id::text, jsonb_build_object('payload',"
        "         jsonb_build_object('order_id', id)), now() - interval '1 hour',"
        "         now() - interval '1 hour' FROM lost"
        ") SELECT id::text FROM lost",
        user,
    )

    states = system.wait_terminal([answered, unrequested], timeout=60)
    assert states == {answered: ("paid", None), unrequested: ("paid", None)}
    debits = system.payments_sql(
        "SELECT order_id::text, amount FROM ledger WHERE kind = 'debit'"
        " AND order_id = ANY(%s::uuid[]) ORDER BY amount",
        [answered, unrequested],
    )
    assert debits == [(answered, 200), (unrequested, 300)]  # the answered order: once
    assert system.balance(user) == 500
    asked = system.orders_sql(
        "SELECT order_id::text, attempts FROM payment_rerequests WHERE order_id = ANY(%s::uuid[])",
        [answered, unrequested],
    )
    assert sorted(asked) == sorted([(answered, 1), (unrequested, 1)])
