"""A service's Kafka consumer: records incoming events in its inbox and applies them in the same
transaction, then commits offsets. Under load it takes a batch at most once per half
`BATCH_INTERVAL` (`pacer`), so one transaction serves many events.

Offsets are committed only after the database transaction that recorded the batch has
committed, so a crash in between redelivers the batch and the inbox primary key drops the
duplicates. An event that fails is rolled back alone and retried with backoff by the sweeper
(`apply_<service>_inbox`), then dead-lettered; the partition keeps flowing.
Run it with `python -m actors.consumer orders|payments`."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from psycopg_pool import ConnectionPool, PoolTimeout
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from actors import pipeline
from services.common import db, kafka
from services.common.config import Config, load
from services.common.events import TOPIC_PAYMENT_REQUESTED, TOPIC_PAYMENT_RESULT, event_id_for
from services.common.inbox import ApplyHandler, ApplyReport, Received
from services.orders.handlers import make_handler as orders_handler
from services.payments.handlers import make_handler as payments_handler

log = logging.getLogger("actors.consumer")

# Which topic each service consumes, and how it applies what it receives.
SUBSCRIPTIONS = {"orders": TOPIC_PAYMENT_RESULT, "payments": TOPIC_PAYMENT_REQUESTED}
HANDLERS: dict[str, Callable[[Config], ApplyHandler]] = {
    "orders": orders_handler,
    "payments": payments_handler,
}
BATCH = 500
OFFSET_COMMIT_SECONDS = 0.5
# A consumer's input comes in bursts, one per pass of a relay that is itself paced at
# BATCH_INTERVAL. Paced at that same interval, the consumer was a queue served exactly as fast
# as the bursts came: a burst that came a little early waited out the interval of the batch
# before, and that wait pushed the next batch late too, so the wait carried over from burst to
# burst (5-7 ms per consumer at the median at 500 orders/s, 11-12 ms at p90). At half the
# interval a burst waits only when it comes less than that after the batch before (a relay
# pass that reached the consumer in two parts).
PACE_SHARE = 0.5
# The first `consume` can return part of a relay's burst, the rest following within a fraction
# of a millisecond (librdkafka hands a fetched batch over partition by partition); that rest
# then waited for the store of the first part and went in a transaction of its own (at 500
# orders/s, 1.6 consumer batches per relay pass). Waiting this long for it takes it along.
GATHER_SECONDS = 0.001


def key_text(key: bytes | str | None) -> str | None:
    """A message key as inbox text, kept for the record only. Postgres text holds no NUL: a key
    with one failed every insert of its batch, and the partition stopped behind it."""
    if isinstance(key, bytes):
        key = key.decode(errors="replace")
    return key.replace("\x00", "\ufffd") if key is not None else None


def to_received(message: Message) -> Received:
    """A Kafka message as an inbox row; poison is kept as it came, to be dead-lettered later."""
    topic, partition, offset = message.topic() or "", message.partition(), message.offset()
    key = message.key()
    return Received(
        event_id=event_id_for(message.headers(), topic, partition or 0, offset or 0),
        topic=topic,
        key=key_text(key),
        partition=partition,
        offset=offset,
        payload=message.value() or b"",
    )


def store(
    pool: ConnectionPool, messages: Sequence[Received], handler: ApplyHandler, config: Config
) -> ApplyReport:
    """Record a batch in the inbox and apply it in one transaction, retrying a database outage
    for a bounded time."""
    for attempt in Retrying(
        retry=retry_if_exception_type((psycopg.OperationalError, PoolTimeout)),
        wait=wait_exponential_jitter(multiplier=0.2, max=5),
        stop=stop_after_delay(config.db_statement_timeout * 12),
        reraise=True,
    ):
        with attempt, pool.connection() as conn:
            report = pipeline.record_and_apply(conn, messages, handler, config)
    pipeline.observe(pool.name, report)
    return report


def pacer(config: Config) -> pipeline.Pacer:
    """How often the consumer takes a batch under load: at `PACE_SHARE` of the relays' interval."""
    return pipeline.Pacer(config.batch_interval * PACE_SHARE)


def batch_wait(paced: pipeline.Pacer) -> float:
    """How long to wait for more once a batch's first message is in: under load, until the
    pacer's interval is over; always long enough for the rest of a relay's burst."""
    return max(paced.remaining(), GATHER_SECONDS)


def run(service: str, config: Config, stopping: threading.Event) -> None:
    """Consume until `stopping` is set; commit each batch's offsets after its inbox commit."""
    kafka.ensure_topics(config)
    handler = HANDLERS[service](config)
    pipeline.serve_metrics(config.consumer_metrics_port(service), config.bind_host, "consumer")
    pool = db.sync_pool(config, service, f"{service}-consumer", size=2)
    consumer = Consumer(
        kafka.consumer_settings(config, f"{service}-service", f"{service}-consumer")
    )
    consumer.subscribe([config.topic(SUBSCRIPTIONS[service])])
    log.info("%s consumer: subscribed to %s", service, config.topic(SUBSCRIPTIONS[service]))
    paced = pacer(config)
    uncommitted = False
    last_commit = time.monotonic()
    try:
        while not stopping.is_set():
            # Block for the first message only, then take whatever else is already here:
            # consume(n, timeout) alone would wait for n messages or the whole timeout.
            messages = consumer.consume(num_messages=1, timeout=0.5)
            if messages:
                # What arrives meanwhile joins (see batch_wait).
                messages += consumer.consume(num_messages=BATCH - 1, timeout=batch_wait(paced))
                paced.started(len(messages))
            batch = []
            for message in messages:
                error = message.error()
                if error is None:
                    batch.append(to_received(message))
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s consumer: %s", service, error)
            if batch:
                store(pool, batch, handler, config)
                uncommitted = True
            # Offsets go to Kafka only after the inbox commit of what they cover, at most every
            # OFFSET_COMMIT_SECONDS (and whenever the topic goes quiet), without waiting for
            # the answer. Committing less often only means more redelivery after a crash or a
            # rebalance, which the inbox drops; committing every batch cost Kafka more CPU than
            # the messages themselves.
            now = time.monotonic()
            if uncommitted and (not batch or now - last_commit >= OFFSET_COMMIT_SECONDS):
                consumer.commit(asynchronous=True)
                uncommitted, last_commit = False, now
        # Stopping normally: everything consumed is stored (after a failure, it may not be,
        # so nothing is committed then).
        if uncommitted:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                log.warning("%s consumer: offset commit failed: %s", service, exc)
    finally:
        consumer.close()  # leaves the group at once, so partitions move without waiting
        pool.close(timeout=5)
        log.info("%s consumer: stopped", service)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if len(argv) != 1 or argv[0] not in SUBSCRIPTIONS:
        print("usage: python -m actors.consumer orders|payments", file=sys.stderr)
        return 2
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    run(argv[0], load(), stopping)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
