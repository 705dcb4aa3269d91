"""Wake-ups on real Redis and Postgres: the listener reads every notification that arrived
together; an idle Dramatiq consumer waits on its queue's doorbell and an enqueue wakes it;
doorbells stay short; a wake-up that is already queued makes another one redundant."""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq import Message
from dramatiq.common import dq_name

from actors import broker as actors_broker
from actors.broker import Woken
from actors.doorbell import MAX_TOKENS, DoorbellRedisBroker, doorbell
from actors.listener import wake_relay
from actors.pipeline import CommitWatch, Pacer, notifications

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
        assert actors_broker.wake(actor) == "sent"
        assert actors_broker.wake(actor) == "queued"  # the first is still queued
        assert client.llen(f"dramatiq:{queue}") == 1
        client.delete(actors_broker.wake_flag(name))  # what the actor does when it starts
        assert actors_broker.wake(actor) == "sent"
        assert client.llen(f"dramatiq:{queue}") == 2
        assert 0 < client.pttl(actors_broker.wake_flag(name)) <= actors_broker.WAKE_FLAG_MS
        # A lingering relay run holds the flag as its own (the `hold` of `declare`).
        flag = actors_broker.LINGERING_FLAG
        client.set(actors_broker.wake_flag(name), flag, px=actors_broker.WAKE_FLAG_MS)
        assert actors_broker.wake(actor) == "lingering"
        assert client.llen(f"dramatiq:{queue}") == 2
        assert actors_broker.redis_too_old(client.info("server")) is None  # what runs here
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
        assert notifications(listening.pgconn, timeout=0.05) == {}
        for channel in ("outbox_pending", "outbox_pending", "elsewhere"):
            other.execute(f"NOTIFY {channel}")  # three transactions, three notifications
        # Each read returns every notification that has arrived by then: one read if the three
        # came together, at most three if they trickled in.
        seen: Counter[str] = Counter()
        for _ in range(3):
            seen += notifications(listening.pgconn, timeout=5)
            if seen.total() == 3:
                break
        assert seen == {"outbox_pending": 2, "elsewhere": 1}
        assert notifications(listening.pgconn, timeout=0.05) == {}  # all were read

        other.execute("SELECT pg_terminate_backend(%s)", [listening.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):  # the listener reconnects on this
            for _ in range(3):  # the first read may only find the server's goodbye message
                notifications(listening.pgconn, timeout=5)


def test_a_relays_commit_watch_sees_outbox_commits_and_survives_a_lost_connection(
    orders_url: str,
) -> None:
    opened: list[psycopg.Connection[Any]] = []

    def connect() -> psycopg.Connection[Any]:
        opened.append(psycopg.connect(orders_url, autocommit=True))
        return opened[-1]

    watch = CommitWatch(connect)
    with psycopg.connect(orders_url, autocommit=True) as other:
        try:
            # Before it listens it cannot tell what was committed: it says yes (relay).
            assert watch.notified(0) is True
            assert watch.notified(0.05) is False  # listening now, nothing committed
            other.execute(
                "INSERT INTO outbox (event_id, topic, key, payload) VALUES (%s, 't', 'k', '{}')",
                [uuid.uuid4()],
            )
            assert watch.notified(5) is True  # the outbox trigger's notification
            assert watch.notified(0.05) is False  # it was read once
            # The server drops the connection: the watch notices within a read or two (the
            # first may only find the server's goodbye), and says yes (relay) as it listens
            # again on a new one.
            other.execute("SELECT pg_terminate_backend(%s)", [opened[0].info.backend_pid])
            answers: list[bool] = []
            while len(opened) < 2 and len(answers) < 3:
                answers.append(watch.notified(0.2))
            assert len(opened) == 2 and answers[-1] is True
            assert watch.notified(0.05) is False
            other.execute(
                "INSERT INTO outbox (event_id, topic, key, payload) VALUES (%s, 't', 'k', '{}')",
                [uuid.uuid4()],
            )
            assert watch.notified(5) is True
            # Stopped, it does not listen: what is committed meanwhile is never reported (nor
            # kept anywhere), and it says yes (relay) when it listens again.
            watch.stop()
            listening = opened[-1].execute("SELECT count(*) FROM pg_listening_channels()")
            assert listening.fetchone() == (0,)
            other.execute(
                "INSERT INTO outbox (event_id, topic, key, payload) VALUES (%s, 't', 'k', '{}')",
                [uuid.uuid4()],
            )
            assert watch.notified(0) is True
            assert watch.notified(0.2) is False
        finally:
            watch.close()
            other.execute("DELETE FROM outbox WHERE topic = 't'")
    assert all(conn.closed for conn in opened)


class Listening:
    """`wake_relay` on its own LISTEN connection in a thread; `commit()` notifies from another
    connection, and each wake-up records how many commits had been notified by then."""

    def __init__(self, listening: psycopg.Connection[Any], other: psycopg.Connection[Any]) -> None:
        self.listening, self.other = listening, other
        self.sent = 0
        self.wakes: list[int] = []
        self.woken = threading.Event()
        self.flag: Woken = "sent"  # what `broker.wake` finds: no flag, or what holds it

    def wake(self) -> Woken:
        self.wakes.append(self.sent)
        self.woken.set()
        return self.flag

    def commit(self) -> None:
        self.sent += 1
        self.other.execute("NOTIFY outbox_pending")

    def wait_for_wake(self) -> bool:
        woken = self.woken.wait(10)
        self.woken.clear()
        return woken


@contextmanager
def listening(orders_url: str, pacer: Pacer) -> Iterator[Listening]:
    stopping = threading.Event()
    with (
        psycopg.connect(orders_url, autocommit=True) as conn,
        psycopg.connect(orders_url, autocommit=True) as other,
    ):
        conn.execute("LISTEN outbox_pending")
        state = Listening(conn, other)
        thread = threading.Thread(
            target=wake_relay, args=(conn.pgconn, state.wake, pacer, stopping)
        )
        thread.start()
        try:
            yield state
        finally:
            stopping.set()
            thread.join(10)


def test_under_load_the_listener_wakes_at_most_once_per_interval(orders_url: str) -> None:
    # Every batch counts as load here (min_batch=1); the interval is far longer than sending a
    # few notifications takes.
    with listening(orders_url, Pacer(1.0, min_batch=1)) as state:
        state.commit()
        assert state.wait_for_wake()  # the first after a quiet spell: at once
        for _ in range(4):  # within the interval: held back, then served together
            state.commit()
        assert state.wait_for_wake()
    assert state.wakes == [1, 5]  # two wake-ups for five commits; the second after the last


def test_at_light_load_every_commit_wakes_the_relay_at_once(orders_url: str) -> None:
    # Single commits are light load (min_batch=3): no pacing, so neither wake-up waits for the
    # hour-long interval.
    with listening(orders_url, Pacer(3600.0, min_batch=3)) as state:
        state.commit()
        assert state.wait_for_wake()
        state.commit()
        assert state.wait_for_wake()
    assert state.wakes == [1, 2]


def test_a_wake_up_that_finds_a_relay_lingering_holds_the_next_back_an_interval(
    orders_url: str,
) -> None:
    # As at light load above, but each try finds a lingering relay run holding the flag: that run
    # publishes what was notified, and the next try waits for the interval.
    with listening(orders_url, Pacer(3600.0, min_batch=3)) as state:
        state.flag = "lingering"
        state.commit()
        assert state.wait_for_wake()
        state.commit()
        assert not state.woken.wait(1.0)
    assert state.wakes == [1]


def test_a_wake_up_found_still_queued_holds_nothing_back(orders_url: str) -> None:
    # Its run may be about to start: the next commit's wake-up is tried at once.
    with listening(orders_url, Pacer(3600.0, min_batch=3)) as state:
        state.flag = "queued"
        state.commit()
        assert state.wait_for_wake()
        state.commit()
        assert state.wait_for_wake()
    assert state.wakes == [1, 2]
