"""The services' connection pool on a real database: statements autocommit, a connection
that died while idle (a database restart) is replaced before a request gets it, and every
connection gives up on a peer gone silent."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import psycopg
import pytest

from services.common import db
from services.common.config import Config

NAME = "test-db-pool"


def kill_pool_connections(admin: psycopg.Connection[Any]) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        [NAME],
    ).fetchall()
    return len(rows)


async def one_statement(pool: Any) -> Any:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT 1")).fetchone()


def test_a_connection_killed_while_idle_is_replaced_before_a_request_uses_it(
    orders_url: str, orders_db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> tuple[int, Any]:
        async with db.async_pool(Config(orders_database_url=orders_url), "orders", NAME) as pool:
            await pool.wait()
            assert await one_statement(pool) == (1,)
            killed = kill_pool_connections(orders_db)
            # Every connection now counts as idle long enough to be checked on checkout.
            monkeypatch.setattr(db, "CHECK_AFTER_IDLE_SECONDS", 0.0)
            return killed, await one_statement(pool)

    killed, answer = asyncio.run(scenario())
    assert killed >= 1
    assert answer == (1,)


def test_a_connection_used_a_moment_ago_is_not_checked_again(
    orders_url: str, orders_db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other side of the trade-off: no round trip for a connection just returned, so one
    # killed in between fails its request (the client sees 503) and the pool replaces it.
    monkeypatch.setattr(db, "CHECK_AFTER_IDLE_SECONDS", 3600.0)

    async def scenario() -> None:
        async with db.async_pool(Config(orders_database_url=orders_url), "orders", NAME) as pool:
            await pool.wait()
            assert await one_statement(pool) == (1,)
            kill_pool_connections(orders_db)
            await one_statement(pool)

    with pytest.raises(psycopg.OperationalError):
        asyncio.run(scenario())


def test_the_workers_pool_checks_only_connections_idle_for_a_while(
    orders_url: str, orders_db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The actors' and consumers' (sync) pool makes the same trade-off as the services' pool.
    config = Config(orders_database_url=orders_url)
    with db.sync_pool(config, "orders", NAME, size=1) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        monkeypatch.setattr(db, "CHECK_AFTER_IDLE_SECONDS", 3600.0)
        kill_pool_connections(orders_db)
        with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
            conn.execute("SELECT 1")  # returned a moment ago: not checked, so it fails
        monkeypatch.setattr(db, "CHECK_AFTER_IDLE_SECONDS", 0.0)
        kill_pool_connections(orders_db)
        with pool.connection() as conn:  # checked on checkout, and replaced
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_service_statements_autocommit(orders_url: str) -> None:
    async def scenario() -> Any:
        pool = db.async_pool(Config(orders_database_url=orders_url), "orders", NAME)
        async with pool, pool.connection() as conn:
            await conn.execute("CREATE TABLE pool_probe (n int)")
            await conn.execute("INSERT INTO pool_probe VALUES (1)")
            # Still inside the checkout, another session already sees the row.
            with psycopg.connect(orders_url) as other:
                return other.execute("SELECT count(*) FROM pool_probe").fetchone()

    assert asyncio.run(scenario()) == (1,)


def tcp_settings(fd: int) -> dict[str, int]:
    """The kernel's keepalive and user-timeout settings of a connection's socket."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }


def test_every_connection_gives_up_on_a_silent_peer_after_the_configured_time(
    orders_url: str,
) -> None:
    # A server gone without closing the connection never answers: only the kernel can tell,
    # and only if the socket asks it to. 30 s: probes from 12 s idle, one every 6 s, and
    # unacknowledged data or probes close the connection after 30 s.
    config = Config(orders_database_url=orders_url, db_dead_peer_timeout=30)
    expected = {"keepalive": 1, "idle": 12, "interval": 6, "probes": 3, "user_timeout_ms": 30_000}
    default = tcp_settings_of_a_plain_connection(orders_url)
    assert default != expected  # the kernel's defaults differ: the settings below are ours

    with db.connect(config, "orders", NAME) as listening:  # listener, relay commit watch
        assert tcp_settings(listening.pgconn.socket) == expected
    with db.sync_pool(config, "orders", NAME, size=1) as pool, pool.connection() as conn:
        assert tcp_settings(conn.pgconn.socket) == expected  # actors and consumers

    async def service_pool() -> dict[str, int]:
        async with (
            db.async_pool(config, "orders", NAME) as apool,
            apool.connection() as aconn,
        ):
            return tcp_settings(aconn.pgconn.socket)

    assert asyncio.run(service_pool()) == expected  # the HTTP services


def tcp_settings_of_a_plain_connection(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return tcp_settings(conn.pgconn.socket)


def test_migrations_connect_with_the_timeouts_but_no_statement_bound() -> None:
    kwargs = db.connection_kwargs(Config(), "orders-migrations", statement_timeout=False)
    assert "options" not in kwargs  # a migration may take its time
    assert kwargs["connect_timeout"] == 5
    assert kwargs["tcp_user_timeout"] == 10_000


def test_the_server_ends_a_session_left_idle_in_a_transaction_and_frees_its_lock(
    orders_url: str,
) -> None:
    # A relay or consumer that froze inside its transaction (or whose host vanished) held the
    # advisory lock every other relay or applier of the database waits for, for hours.
    config = Config(orders_database_url=orders_url, kafka_timeout=0.5, db_statement_timeout=1.0)
    with db.connect(config, "orders", NAME) as frozen, psycopg.connect(orders_url) as other:
        settings = dict(
            frozen.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [list(db.server_session_settings(config))],
            ).fetchall()
        )
        assert {k: int(v) for k, v in settings.items()} == db.server_session_settings(config)
        frozen.execute("BEGIN")
        frozen.execute("SELECT pg_advisory_xact_lock(hashtext('outbox_relay'))")
        assert other.execute(
            "SELECT pg_try_advisory_lock(hashtext('outbox_relay'))"
        ).fetchone() == (False,)
        time.sleep(3.5)  # over three times the longest wait (3 s): the server ends it
        assert other.execute(
            "SELECT pg_try_advisory_lock(hashtext('outbox_relay'))"
        ).fetchone() == (True,)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            frozen.execute("SELECT 1")  # what its client meets when it wakes up
