"""Connection pools with timeouts on every connect and statement, for services and actors."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from services.common.config import Config

# What a request handler may meet when its database is out of reach: answered with 503.
UNAVAILABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)


def connection_kwargs(config: Config, application_name: str) -> dict[str, Any]:
    """Per-connection settings: bounded connect and statement time, a name in pg_stat_activity."""
    return {
        "connect_timeout": max(1, round(config.db_connect_timeout)),
        "application_name": application_name,
        "options": f"-c statement_timeout={int(config.db_statement_timeout * 1000)}",
    }


def async_pool(config: Config, service: str, application_name: str) -> AsyncConnectionPool:
    """A closed async pool for an HTTP service; open it in the app's lifespan."""
    return AsyncConnectionPool(
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
        # After a database restart the pool still holds dead connections; checking each one
        # on checkout (one empty round trip) spares the next requests a 503.
        check=AsyncConnectionPool.check_connection,
    )


def sync_pool(config: Config, service: str, application_name: str, size: int) -> ConnectionPool:
    """An open sync pool for actors and consumers; waits for at most `db_connect_timeout`."""
    return ConnectionPool(
        config.database_url(service),
        min_size=1,
        max_size=size,
        timeout=config.db_connect_timeout,
        kwargs=connection_kwargs(config, application_name),
        open=True,
        name=application_name,
        reconnect_timeout=30,
        check=ConnectionPool.check_connection,
    )
