"""The frame of a database-backed service (Orders, Payments): its pool, lifespan and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from confluent_kafka.admin import AdminClient
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request

from services.common import db
from services.common.api import Endpoint, ReadinessCheck, build_app
from services.common.config import Config


def pool_of(request: Request) -> AsyncConnectionPool:
    """The database pool of the service answering `request`."""
    pool: AsyncConnectionPool = request.app.state.db
    return pool


def database_check(pool: AsyncConnectionPool, timeout: float) -> ReadinessCheck:
    async def check() -> None:
        async with pool.connection(timeout=timeout) as conn:
            await conn.execute("SELECT 1")

    return check


def redis_check(url: str, timeout: float) -> ReadinessCheck:
    async def check() -> None:
        client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            await client.ping()
        finally:
            await client.aclose()

    return check


def kafka_check(bootstrap_servers: str, timeout: float) -> ReadinessCheck:
    def metadata() -> None:
        admin = AdminClient({"bootstrap.servers": bootstrap_servers, "socket.timeout.ms": 2000})
        admin.list_topics(timeout=timeout)

    async def check() -> None:
        await asyncio.wait_for(asyncio.to_thread(metadata), timeout + 1)

    return check


def create_service_app(
    *,
    service: str,
    title: str,
    description: str,
    endpoints: Sequence[Endpoint],
    config: Config,
) -> Starlette:
    """The Starlette app of `service` ("orders" or "payments") with its own database pool in
    `app.state.db`, and `/ready` checking that database, Redis and Kafka."""
    pool = db.async_pool(config, service, f"{service}-api")
    timeout = min(2.0, config.db_connect_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.db = pool
        app.state.config = config
        # Do not block start-up on the database: requests answer 503 until it is reachable.
        await pool.open(wait=False)
        try:
            yield
        finally:
            await pool.close(timeout=5)

    return build_app(
        title=title,
        description=description,
        endpoints=endpoints,
        readiness={
            "database": database_check(pool, timeout),
            "redis": redis_check(config.redis_url, timeout),
            "kafka": kafka_check(config.kafka_bootstrap_servers, timeout),
        },
        lifespan=lifespan,
        unavailable=db.UNAVAILABLE,
    )
