"""Smoke tests of the local stack: one real round trip per server, and `up` twice is harmless.

They assume the stack is up (the test command runs `scripts/stack.sh up` first). Addresses come
from the environment, defaulting to the stack's own ports:
STACK_POSTGRES_URL, STACK_REDIS_URL, STACK_KAFKA_BOOTSTRAP (or POSTGRES_PORT, REDIS_PORT,
KAFKA_PORT), STACK_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

REPO = Path(__file__).resolve().parents[2]
STACK_SH = REPO / "scripts" / "stack.sh"
STACK_DIR = Path(os.environ.get("STACK_DIR") or REPO / ".stack")

POSTGRES_URL = os.environ.get(
    "STACK_POSTGRES_URL",
    f"postgresql://postgres:postgres@127.0.0.1:{os.environ.get('POSTGRES_PORT', '5432')}/postgres",
)
REDIS_URL = os.environ.get(
    "STACK_REDIS_URL", f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0"
)
KAFKA_BOOTSTRAP = os.environ.get(
    "STACK_KAFKA_BOOTSTRAP", f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
)
KAFKA_TIMEOUT = 30.0  # seconds, for every Kafka call below


def test_postgres_sql_round_trip() -> None:
    value = uuid.uuid4().hex
    with psycopg.connect(POSTGRES_URL, connect_timeout=5, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("CREATE TEMP TABLE smoke (id int PRIMARY KEY, value text NOT NULL)")
        conn.execute("INSERT INTO smoke (id, value) VALUES (%s, %s)", (1, value))
        rows = conn.execute("SELECT id, value FROM smoke").fetchall()
        databases = {
            row[0]
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname IN ('orders', 'payments')"
            )
        }
    assert rows == [(1, value)]
    assert databases == {"orders", "payments"}, "the stack creates both services' databases"


def test_redis_ping_set_get() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        assert client.ping() is True
        key, value = f"stack-smoke:{uuid.uuid4()}", uuid.uuid4().hex
        assert client.set(key, value, ex=60)
        try:
            assert client.get(key) == value.encode()
        finally:
            client.delete(key)
        assert client.get(key) is None
    finally:
        client.close()


def test_kafka_produce_consume_on_a_fresh_topic() -> None:
    topic = f"stack-smoke-{uuid.uuid4().hex}"
    value = uuid.uuid4().hex.encode()
    admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
    created = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)],
        request_timeout=KAFKA_TIMEOUT,
        operation_timeout=KAFKA_TIMEOUT,
    )
    created[topic].result(timeout=KAFKA_TIMEOUT)
    try:
        delivered: list[KafkaError | None] = []
        producer = Producer(
            {
                "bootstrap.servers": KAFKA_BOOTSTRAP,
                "acks": "all",
                "message.timeout.ms": int(KAFKA_TIMEOUT * 1000),
            }
        )
        producer.produce(
            topic, key=b"smoke", value=value, on_delivery=lambda err, _msg: delivered.append(err)
        )
        assert producer.flush(KAFKA_TIMEOUT) == 0, "message not delivered in time"
        assert delivered == [None]

        consumer = Consumer(
            {
                "bootstrap.servers": KAFKA_BOOTSTRAP,
                "group.id": f"stack-smoke-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        received: bytes | None = None
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + KAFKA_TIMEOUT
            while received is None and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is None:
                    continue
                assert message.error() is None, message.error()
                received = message.value()
        finally:
            consumer.close()
        assert received == value
    finally:
        deleted = admin.delete_topics([topic], operation_timeout=KAFKA_TIMEOUT)
        deleted[topic].result(timeout=KAFKA_TIMEOUT)


def _pids() -> dict[str, int | None]:
    """The pid in each of the stack's pid files (None: no file, e.g. an external server)."""
    pids: dict[str, int | None] = {}
    for name in ("postgres", "redis", "kafka"):
        path = STACK_DIR / "run" / f"{name}.pid"
        pids[name] = int(path.read_text().split()[0]) if path.exists() else None
    return pids


def _stack(command: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The venv running these tests has what the script needs (confluent-kafka, the migrations).
    env.setdefault("VENV_PYTHON", sys.executable)
    return subprocess.run(
        [str(STACK_SH), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_stack_up_is_idempotent() -> None:
    status = _stack("status")
    assert status.returncode == 0, f"stack not healthy before the test:\n{status.stdout}"
    before = _pids()

    again = _stack("up")

    assert again.returncode == 0, again.stdout + again.stderr
    assert "starting" not in again.stdout, f"a second `up` started something:\n{again.stdout}"
    assert _pids() == before
    for name, pid in before.items():
        if pid is not None:
            assert Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) is gone"
    status = _stack("status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("healthy") == 3, status.stdout
