"""A Dramatiq Redis broker whose workers wait for messages instead of polling for them.

Dramatiq's Redis consumer fetches, and on an empty queue sleeps up to the worker timeout
before fetching again. A short timeout (a quick wake-up per hop) made every idle worker poll
Redis about a hundred times a second (a tenth of a core each, plus Redis); a long one adds up
to that long to every hop. Here every enqueue also pushes a token onto the queue's *doorbell*,
a Redis list, and a consumer that found its queue empty blocks on that list (`BLPOP`) for at
most the worker timeout: it wakes within a round trip of a new message and costs nothing while
idle. The queue itself is untouched, so the doorbell is only a hint: a lost or stale token
means at worst one wait of the worker timeout, or one empty fetch."""

from __future__ import annotations

import time
from typing import Any

import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed

# Tokens kept per doorbell: enough to wake every consumer thread of a queue, few enough that
# tokens rung while consumers were busy cost only a few empty fetches later.
MAX_TOKENS = 8
# When the consumer holds as many messages as it may prefetch, it is not idle: it waits this
# long for its worker threads (whose acks it handles between calls) instead of the doorbell.
BUSY_WAIT_SECONDS = 0.002


def doorbell(queue_name: str) -> str:
    """The Redis list that is rung when `queue_name` (or its delay queue) gets a message."""
    return f"orders-payments:doorbell:{queue_name}"


class DoorbellConsumer(_RedisConsumer):
    def __init__(self, broker: DoorbellRedisBroker, queue_name: str, prefetch: int, timeout: int):
        # A timeout of 0 makes the parent return at once on an empty fetch; we wait instead.
        super().__init__(broker, queue_name, prefetch, 0)  # type: ignore[no-untyped-call]
        self.bell = doorbell(queue_name)
        self.idle_seconds = max(timeout, 1) / 1000

    def __next__(self) -> Any:
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            return message
        if self.outstanding_message_count >= self.prefetch:
            time.sleep(BUSY_WAIT_SECONDS)
            return None
        try:
            self.broker.client.blpop([self.bell], timeout=self.idle_seconds)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # a Redis gone silent too
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        return None


class DoorbellRedisBroker(RedisBroker):
    """`RedisBroker` that rings a queue's doorbell on every enqueue (one extra round trip)."""

    @property
    def consumer_class(self) -> type[DoorbellConsumer]:
        return DoorbellConsumer

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        message = super().enqueue(message, delay=delay)
        bell = doorbell(message.queue_name)  # the delay queue's own, for a delayed message
        with self.client.pipeline(transaction=False) as ring:
            ring.lpush(bell, b"1")
            ring.ltrim(bell, 0, MAX_TOKENS - 1)
            ring.execute()
        return message
