"""Wake-ups on real Redis and Postgres: the listener reads every notification that arrived
together; an idle Dramatiq consumer waits on its queue's doorbell and an enqueue wakes it;
doorbells stay short; a wake-up that is already queued makes another one redundant."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import dramatiq
import psycopg
import pytest
from dramatiq import Message
from dramatiq.common import dq_name

from actors import broker as actors_broker
from actors.doorbell import MAX_TOKENS, DoorbellRedisBroker, doorbell
from actors.listener import notified_channels, wake_relay
from actors.pipeline import Pacer

# A database of its own: the e2e system uses 9, a running `just up` uses 0.
REDIS_URL = f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/10"


@pytest.fixture
def broker() -> Iterator[DoorbellRedisBroker]:
    broker = DoorbellRedisBroker(url=REDIS_URL, socket_timeout=30)  # type: ignore[no-untyped-call]
    broker.client.flushdb()
    yield broker
    broker.client.flushdb()
    broker.close()


def new_queue(broker: DoorbellRedisBroker) -> str:
    queue = f"q{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    return queue


def message_for(queue: str) -> Message[None]:
    return Message(queue_name=queue, actor_name="noop", args=(), kwargs={}, options={})


def test_an_idle_consumer_waits_on_the_doorbell_until_an_enqueue_wakes_it(
    broker: DoorbellRedisBroker,
) -> None:
    queue = new_queue(broker)
    consumer = broker.consume(queue, prefetch=1, timeout=30_000)
    sent = message_for(queue)
    ring = threading.Timer(0.3, broker.enqueue, args=(sent,))
    ring.start()
    try:
        assert next(consumer) is None  # the queue was empty: it waited on the doorbell...
        # ...and the enqueue's token is what ended the wait (a polling consumer, or one whose
        # 30 s wait ran out, would have left it there).
        assert broker.client.llen(doorbell(queue)) == 0
        received = next(consumer)  # woken, it fetches what rang it
    finally:
        ring.cancel()
    assert received is not None and received.message_id == sent.message_id
    consumer.ack(received)
    consumer.close()


def test_a_token_rung_while_no_one_waited_costs_one_empty_fetch_and_is_used_up(
    broker: DoorbellRedisBroker,
) -> None:
    queue = new_queue(broker)
    broker.client.lpush(doorbell(queue), b"1")  # e.g. rung while the consumer was busy
    consumer = broker.consume(queue, prefetch=1, timeout=30_000)
    assert next(consumer) is None  # nothing to fetch; the stale token ends the wait at once
    assert broker.client.llen(doorbell(queue)) == 0
    consumer.close()


def test_a_doorbell_keeps_a_few_tokens_however_many_messages_are_queued(
    broker: DoorbellRedisBroker,
) -> None:
    queue = new_queue(broker)
    for _ in range(MAX_TOKENS * 3):
        broker.enqueue(message_for(queue))
    assert broker.client.llen(doorbell(queue)) == MAX_TOKENS
    consumer = broker.consume(queue, prefetch=100, timeout=1_000)
    fetched = [m for m in (next(consumer) for _ in range(MAX_TOKENS * 3)) if m is not None]
    assert len(fetched) == MAX_TOKENS * 3  # the messages themselves are all there
    consumer.close()


def test_a_delayed_message_rings_its_delay_queue(broker: DoorbellRedisBroker) -> None:
    queue = new_queue(broker)
    broker.enqueue(message_for(queue), delay=60_000)
    assert broker.client.llen(doorbell(dq_name(queue))) == 1
    assert broker.client.llen(doorbell(queue)) == 0


def test_a_wake_up_is_sent_only_when_none_is_queued() -> None:
    queue = f"q{uuid.uuid4().hex[:8]}"
    name = f"relay_{queue}"
    actor = dramatiq.actor(actor_name=name, queue_name=queue)(lambda: None)
    client = actors_broker.broker.client
    try:
        assert actors_broker.wake(actor) is True
        assert actors_broker.wake(actor) is False  # the first is still queued
        assert client.llen(f"dramatiq:{queue}") == 1
        client.delete(actors_broker.wake_flag(name))  # what the actor does when it starts
        assert actors_broker.wake(actor) is True
        assert client.llen(f"dramatiq:{queue}") == 2
        assert 0 < client.pttl(actors_broker.wake_flag(name)) <= actors_broker.WAKE_FLAG_MS
    finally:
        actors_broker.broker.flush(queue)
        client.delete(actors_broker.wake_flag(name), doorbell(queue))


def test_the_listener_reads_every_notification_that_arrived_together(orders_url: str) -> None:
    with (
        psycopg.connect(orders_url, autocommit=True) as listening,
        psycopg.connect(orders_url, autocommit=True) as other,
    ):
        listening.execute("LISTEN outbox_pending")
        listening.execute("LISTEN elsewhere")
        assert notified_channels(listening.pgconn, timeout=0.05) == set()
        for channel in ("outbox_pending", "outbox_pending", "elsewhere"):
            other.execute(f"NOTIFY {channel}")  # three transactions, three notifications
        # Each read returns every notification that has arrived by then: one read if the three
        # came together, at most three if they trickled in.
        seen: set[str] = set()
        for _ in range(3):
            seen |= notified_channels(listening.pgconn, timeout=5)
            if seen == {"outbox_pending", "elsewhere"}:
                break
        assert seen == {"outbox_pending", "elsewhere"}
        assert notified_channels(listening.pgconn, timeout=0.05) == set()  # all were read

        other.execute("SELECT pg_terminate_backend(%s)", [listening.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):  # the listener reconnects on this
            for _ in range(3):  # the first read may only find the server's goodbye message
                notified_channels(listening.pgconn, timeout=5)


def test_the_listener_wakes_at_once_then_at_most_once_per_interval_for_what_follows(
    orders_url: str,
) -> None:
    interval = 1.0  # far longer than sending a few notifications takes
    wakes: list[int] = []  # how many notifications had been sent at each wake-up
    sent = [0]
    stopping = threading.Event()
    with (
        psycopg.connect(orders_url, autocommit=True) as listening,
        psycopg.connect(orders_url, autocommit=True) as other,
    ):
        listening.execute("LISTEN outbox_pending")
        woken = threading.Event()

        def wake() -> None:
            wakes.append(sent[0])
            woken.set()

        thread = threading.Thread(
            target=wake_relay, args=(listening.pgconn, wake, Pacer(interval), stopping)
        )
        thread.start()
        try:
            sent[0] = 1
            other.execute("NOTIFY outbox_pending")
            assert woken.wait(10)  # the first notification after a quiet spell: woken at once
            woken.clear()
            for _ in range(4):  # within the interval: held back, then served together
                sent[0] += 1
                other.execute("NOTIFY outbox_pending")
            assert woken.wait(10)
        finally:
            stopping.set()
            thread.join(10)
    assert wakes == [1, 5]  # two wake-ups for five commits; the second after the last of them
