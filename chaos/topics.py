"""Reading Kafka's bookkeeping for chaos: high watermarks, committed offsets, consumer lag."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED, TOPIC_PAYMENT_RESULT

# Which consumer group (without the prefix) reads which topic: actors/consumer.py.
GROUPS: Mapping[str, str] = {
    "orders-service": TOPIC_PAYMENT_RESULT,
    "payments-service": TOPIC_PAYMENT_REQUESTED,
}
TIMEOUT = 10.0


def client(config: Config, group: str | None = None) -> Consumer:
    """A consumer that never joins a group nor commits: for reading offsets and messages."""
    settings: dict[str, Any] = {
        "bootstrap.servers": config.kafka_bootstrap_servers,
        "group.id": group or f"chaos-reader-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "socket.timeout.ms": int(TIMEOUT * 1000),
        "log_level": 3,
    }
    return Consumer(settings)


def partitions(consumer: Consumer, topic: str) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=TIMEOUT).topics[topic]
    if metadata.error is not None:
        raise RuntimeError(f"topic {topic}: {metadata.error}")
    return sorted(metadata.partitions)


def watermarks(config: Config, topic: str) -> dict[int, tuple[int, int]]:
    """The first offset still kept and the next offset of every partition of `topic`."""
    consumer = client(config)
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
            for p in partitions(consumer, topic)
        }
    finally:
        consumer.close()


def high_watermarks(config: Config, topic: str) -> dict[int, int]:
    """The next offset of every partition of `topic`."""
    return {p: high for p, (_, high) in watermarks(config, topic).items()}
