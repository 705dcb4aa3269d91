"""Kafka plumbing shared by relays and consumers: client settings, topics, batched produce."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from services.common.config import Config
from services.common.events import TOPICS

log = logging.getLogger(__name__)


# librdkafka writes its own log lines to stderr; route them through Python logging instead.
KAFKA_LOG = logging.getLogger("kafka")


def producer_settings(config: Config, client_id: str) -> dict[str, Any]:
    """An idempotent producer: acks from all replicas, ordered, no duplicates from retries."""
    return {
        "bootstrap.servers": config.kafka_bootstrap_servers,
        "logger": KAFKA_LOG,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "message.timeout.ms": int(config.kafka_timeout * 3000),
        "socket.timeout.ms": int(config.kafka_timeout * 1000),
        "queue.buffering.max.messages": 200_000,
    }


def consumer_settings(config: Config, group: str, client_id: str) -> dict[str, Any]:
    """A consumer that never commits on its own: offsets are committed after the inbox commit."""
    return {
        "bootstrap.servers": config.kafka_bootstrap_servers,
        "logger": KAFKA_LOG,
        "group.id": f"{config.kafka_topic_prefix}{group}",
        "client.id": client_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 2_000,
        "max.poll.interval.ms": 120_000,
        "socket.timeout.ms": int(config.kafka_timeout * 1000),
        # How long the broker may hold a fetch when there is nothing new: it answers as soon as
        # a message arrives, so this costs no latency, and idle consumers cost the broker little
        # (at 100 ms, the two consumers' idle fetches were 3% of a core of Kafka's CPU).
        "fetch.wait.max.ms": 500,
        "on_commit": log_failed_commit,
    }


def log_failed_commit(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    """The answer to an asynchronous offset commit: a failure only means redelivery."""
    if error is not None:
        log.warning("offset commit failed (the messages will be delivered again): %s", error)


def admin(config: Config) -> AdminClient:
    settings: dict[str, Any] = {
        "bootstrap.servers": config.kafka_bootstrap_servers,
        "logger": KAFKA_LOG,
        "socket.timeout.ms": int(config.kafka_timeout * 1000),
    }
    return AdminClient(settings)


def ensure_topics(config: Config) -> None:
    """Create the contract's topics (with the configured prefix) if they are missing."""
    client = admin(config)
    wanted = [config.topic(name) for name in TOPICS]
    existing = set(client.list_topics(timeout=config.kafka_timeout).topics)
    missing = [
        NewTopic(name, num_partitions=config.kafka_partitions, replication_factor=1)
        for name in wanted
        if name not in existing
    ]
    if not missing:
        return
    for name, future in client.create_topics(missing, request_timeout=config.kafka_timeout).items():
        try:
            future.result(timeout=config.kafka_timeout)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


@dataclass(frozen=True)
class Outgoing:
    """One message to produce; `ref` identifies it in the delivery report (an outbox row id)."""

    ref: int
    topic: str
    key: str
    value: bytes
    headers: Sequence[tuple[str, bytes]]


def produce_batch(producer: Producer, messages: Sequence[Outgoing], timeout: float) -> list[int]:
    """Produce every message, flush once, and return the refs Kafka acknowledged.

    Messages still queued when `timeout` runs out are purged from the local queue, so a
    later attempt re-sends them in order instead of racing ahead of them."""
    delivered: list[int] = []

    def report(ref: int) -> Any:
        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                delivered.append(ref)
            else:
                log.warning("delivery of outbox row %s failed: %s", ref, error)

        return on_delivery

    for message in messages:
        while True:
            try:
                producer.produce(
                    message.topic,
                    key=message.key.encode(),
                    value=message.value,
                    headers=list(message.headers),
                    on_delivery=report(message.ref),
                )
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: let deliveries drain, then go on
    remaining = producer.flush(timeout)
    if remaining:
        log.warning("%d message(s) not acknowledged within %.1fs; purging", remaining, timeout)
        producer.purge(in_queue=True, in_flight=False)
        producer.flush(0)
    return delivered


def consumer_lag(config: Config, group: str, topic: str) -> int:
    """Messages on `topic` that `group` has not committed yet and Kafka still keeps, summed
    over partitions (records deleted by retention cannot be behind)."""
    probe = Consumer(
        {
            "bootstrap.servers": config.kafka_bootstrap_servers,
            "group.id": f"{config.kafka_topic_prefix}{group}",
            "logger": KAFKA_LOG,
            "enable.auto.commit": False,
            "socket.timeout.ms": int(config.kafka_timeout * 1000),
        }
    )
    try:
        metadata = probe.list_topics(topic, timeout=config.kafka_timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return 0
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        committed = probe.committed(partitions, timeout=config.kafka_timeout)
        lag = 0
        for position in committed:
            low, high = probe.get_watermark_offsets(position, timeout=config.kafka_timeout)
            start = max(low, position.offset) if position.offset >= 0 else low
            lag += max(0, high - start)
        return lag
    finally:
        probe.close()
