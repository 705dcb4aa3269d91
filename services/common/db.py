"""Connection pools with timeouts on every connect and statement, for services and actors."""

from __future__ import annotations

import time
import weakref
from typing import Any, Final

import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from services.common import fastjson
from services.common.config import Config

# json and jsonb values (the outbox's payloads and headers, written by Orders and the payments
# consumer, read by the relays) go through `fastjson`, for every connection of the process.
set_json_dumps(fastjson.dumps)
set_json_loads(fastjson.loads)

# What a request handler may meet when its database is out of reach: answered with 503.
UNAVAILABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)

# The relay's and the consumers' statements take their rows as arrays (`= ANY(%(ids)b)`,
# `unnest(…)`). Once psycopg has prepared one, Postgres' plan cache weighs its generic plan,
# costed for arrays of 10 elements, against custom plans costed for the batch at hand, mostly
# smaller, so it judged the generic plan dearer and planned every execution again: at 500
# orders/s, 0.35 ms of planning per payments charge, 0.15 per batch of settled orders, 0.09
# per relay mark (pg_stat_statements' wall clock), about 2% of the machine's CPU in all.
# Their generic plans are the same index scans. Set at the start of those transactions (`SET
# LOCAL`: it ends with them), in the same round trip as their advisory lock; other statements
# keep the default.
GENERIC_PLANS: Final = "SET LOCAL plan_cache_mode = force_generic_plan"


def connection_kwargs(
    config: Config, application_name: str, *, statement_timeout: bool = True
) -> dict[str, Any]:
    """Per-connection settings: bounded connect and statement time, a peer gone silent given up
    (`dead_peer_kwargs`), a name in pg_stat_activity. Migrations go without the statement
    bound: a migration may take its time."""
    kwargs: dict[str, Any] = {
        "connect_timeout": max(1, round(config.db_connect_timeout)),
        "application_name": application_name,
        **dead_peer_kwargs(config.db_dead_peer_timeout),
    }
    if statement_timeout:
        kwargs["options"] = " ".join(
            f"-c {name}={value}" for name, value in server_session_settings(config).items()
        )
    return kwargs


def server_session_settings(config: Config) -> dict[str, int]:
    """The server's side of a session's bounds: its statements', and how long the server keeps
    a session whose client stopped. A relay or consumer transaction holds an advisory lock that
    every other relay or applier of its database waits for; a client that froze holding it, or
    whose host vanished, kept it for hours (Postgres' default keepalive starts after two idle
    hours, and an idle transaction is never ended). So the server ends a transaction left idle
    for three times the longest wait inside one (the relay waits up to KAFKA_TIMEOUT for
    Kafka's acknowledgement with its transaction open), and probes a silent client as the
    client probes the server (`dead_peer_kwargs`)."""
    peer = dead_peer_kwargs(config.db_dead_peer_timeout)
    longest_wait = max(config.kafka_timeout, config.db_statement_timeout)
    return {
        "statement_timeout": int(config.db_statement_timeout * 1000),
        "idle_in_transaction_session_timeout": int(longest_wait * 3 * 1000),
        "tcp_keepalives_idle": peer["keepalives_idle"],
        "tcp_keepalives_interval": peer["keepalives_interval"],
        "tcp_keepalives_count": peer["keepalives_count"],
        "tcp_user_timeout": peer["tcp_user_timeout"],
    }


# Keepalive probes a silent peer gets before the connection is given up.
KEEPALIVE_PROBES = 3


def dead_peer_kwargs(seconds: float) -> dict[str, int]:
    """libpq's TCP settings that give up on a peer gone silent after about `seconds`.

    A server that vanished without closing the connection never answers, and the kernel keeps
    a quiet socket (a listener waiting for notifications, a client waiting for a result) open
    for hours, and retransmits unacknowledged writes for about fifteen minutes. Keepalive
    probes start after `seconds` minus the probes' time, one per interval; TCP_USER_TIMEOUT
    closes the connection once sent data or probes go unacknowledged for `seconds`. The
    waiting call then fails, and its caller reconnects or retries as for any lost connection."""
    total = max(KEEPALIVE_PROBES + 1, round(seconds))
    interval = max(1, total // (KEEPALIVE_PROBES + 2))
    return {
        "keepalives": 1,
        "keepalives_idle": total - interval * KEEPALIVE_PROBES,
        "keepalives_interval": interval,
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": total * 1000,
    }


def connect(config: Config, service: str, application_name: str) -> psycopg.Connection[Any]:
    """One autocommit connection of its own to `service`'s database (a `LISTEN`er's), with the
    pools' bounds."""
    return psycopg.connect(
        config.database_url(service),
        autocommit=True,
        **connection_kwargs(config, application_name),
    )


def async_pool(config: Config, service: str, application_name: str) -> AsyncConnectionPool:
    """A closed async pool for an HTTP service; open it in the app's lifespan."""
    return StampingAsyncPool(
        config.database_url(service),
        min_size=2,
        max_size=config.db_pool_size,
        timeout=config.db_connect_timeout,
        # Every request handler runs single statements (an order and its outbox row are one
        # INSERT … WITH): autocommit makes each one round trip instead of BEGIN, it, COMMIT.
        kwargs=connection_kwargs(config, application_name) | {"autocommit": True},
        open=False,
        name=application_name,
        reconnect_timeout=30,
        check=check_if_idle,
    )


# After a database restart a pool still holds dead connections; checking one on checkout (an
# empty round trip) spares the next request a 503. Under load that check was a tenth of the
# Orders service's CPU, so only a connection that sat idle for a while is checked: one used a
# moment ago is alive, or its failure is part of an outage its caller retries (actors,
# consumers) or answers 503 (services) anyway.
CHECK_AFTER_IDLE_SECONDS = 1.0
_returned_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _idle_long(conn: Any) -> bool:
    return time.monotonic() - _returned_at.get(conn, 0.0) >= CHECK_AFTER_IDLE_SECONDS


async def check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    if _idle_long(conn):
        await AsyncConnectionPool.check_connection(conn)


def check_if_idle_sync(conn: psycopg.Connection[Any]) -> None:
    if _idle_long(conn):
        ConnectionPool.check_connection(conn)


# The pools stamp a connection's return time as they take it back. (A `reset` callback could
# do it, but then the pool hands every returned connection to its worker thread or task: under
# load, those hand-offs were ~7% of a relay worker's CPU.)
class StampingPool(ConnectionPool):
    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        _returned_at[conn] = time.monotonic()
        super().putconn(conn)


class StampingAsyncPool(AsyncConnectionPool):
    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        _returned_at[conn] = time.monotonic()
        await super().putconn(conn)


def sync_pool(config: Config, service: str, application_name: str, size: int) -> ConnectionPool:
    """An open sync pool for actors and consumers; waits for at most `db_connect_timeout`."""
    return StampingPool(
        config.database_url(service),
        min_size=1,
        max_size=size,
        timeout=config.db_connect_timeout,
        kwargs=connection_kwargs(config, application_name),
        open=True,
        name=application_name,
        reconnect_timeout=30,
        check=check_if_idle_sync,
    )
