"""The listener process through Redis outages, on real Postgres and a Redis server of the
test's own: it waits for Redis at start, and a Redis that goes away while it runs is waited out
too; once Redis is back, commits wake the relays again. Before, either outage made it exit, and
under supervisord a few seconds of it stopped the wake-ups for good."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import redis

from actors.listener import STEADY_SECONDS
from services.common.ids import uuid7
from tests.e2e.conftest import eventually

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(port: int) -> Iterator[redis.Redis]:
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=5)

    def answers() -> None:
        try:
            client.ping()
        except redis.ConnectionError as exc:
            raise AssertionError("redis-server did not start") from exc

    try:
        eventually(answers)
        yield client
    finally:
        process.kill()
        process.wait(timeout=10)
        client.close()


def enqueued(client: redis.Redis, actor: str) -> None:
    """Once a message for `actor` waits on the orders queue."""

    def waits() -> None:
        messages = client.hvals("dramatiq:orders.msgs")
        assert any(f'"actor_name":"{actor}"'.encode() in m for m in messages), f"no {actor}"

    eventually(waits)


def commit_outbox_row(db: psycopg.Connection[Any]) -> None:
    """An outbox insert: its trigger notifies the listener."""
    db.execute(
        "INSERT INTO outbox (event_id, topic, key, payload) VALUES (%s, 't', 'k', '{}')",
        (uuid7(),),
    )


def still_running(process: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


@contextmanager
def listener_running(
    orders_url: str, payments_url: str, redis_port: int, stderr: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m actors.listener` on these databases and the Redis at `redis_port` (sweeps
    only when it (re)connects), killed at the end if it is still running."""
    env = {
        **os.environ,
        "ORDERS_DATABASE_URL": orders_url,
        "PAYMENTS_DATABASE_URL": payments_url,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SWEEP_INTERVAL": "3600",
    }
    listener = subprocess.Popen(
        [sys.executable, "-m", "actors.listener"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        yield listener
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=10)


def stops_cleanly(listener: subprocess.Popen[bytes]) -> None:
    listener.send_signal(signal.SIGTERM)
    assert listener.wait(timeout=15) == 0


def listener_backend(db: psycopg.Connection[Any]) -> int:
    """The pid of the Orders listener's Postgres backend, once there is one."""

    def connected() -> int:
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'orders-listener'"
            " AND datname = current_database()"
        ).fetchall()
        assert len(rows) == 1, rows
        return int(rows[0][0])

    return eventually(connected)


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="no redis-server")
def test_a_listener_connection_lost_after_a_steady_while_is_opened_again_without_backoff(
    orders_url: str, payments_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    port = free_port()
    with (
        redis_server(port),
        listener_running(orders_url, payments_url, port, stderr=subprocess.PIPE) as listener,
    ):
        backend = listener_backend(orders_db)
        # Three connections lost, each after a steady while: each is opened again at once.
        # (Before, every loss was one more attempt of one backoff, whose waits grew.)
        for _ in range(3):
            time.sleep(STEADY_SECONDS + 1.5)  # held that long (from after its LISTEN and sweep)
            orders_db.execute("SELECT pg_terminate_backend(%s)", (backend,))
            backend = eventually(functools.partial(new_backend, orders_db, backend))
        stops_cleanly(listener)
        assert listener.stderr is not None
        log = listener.stderr.read().decode()
    assert log.count("orders: lost the LISTEN connection") == 3, log
    assert "Retrying" not in log, log


def new_backend(db: psycopg.Connection[Any], old: int) -> int:
    pid = listener_backend(db)
    assert pid != old
    return pid


@pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason="no redis-server")
def test_the_listener_waits_out_redis_outages_and_wakes_relays_when_it_is_back(
    orders_url: str, payments_url: str, orders_db: psycopg.Connection[Any]
) -> None:
    port = free_port()
    with listener_running(orders_url, payments_url, port) as listener:
        # No Redis yet: it waits (it exited within half a second before).
        assert still_running(listener, 3)
        with redis_server(port) as client:
            # Connected: each service's listening thread sends a sweep.
            enqueued(client, "sweep_orders")
        backend = listener_backend(orders_db)
        # Redis gone while it runs: the wake-up for this commit fails, and it waits again, on
        # the LISTEN connection it has.
        commit_outbox_row(orders_db)
        assert still_running(listener, 3)
        with redis_server(port) as client:
            enqueued(client, "relay_orders_outbox")  # the commit's wake-up goes through
            enqueued(client, "sweep_orders")  # and a sweep for what Redis may have lost
            assert listener_backend(orders_db) == backend  # Postgres was never let go
        stops_cleanly(listener)
