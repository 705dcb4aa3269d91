"""The frame of a database-backed service (Orders, Payments): its pool, lifespan and readiness."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import redis.asyncio as aioredis
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Gauge
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request

from services.common import db, inbox, kafka, outbox
from services.common.api import Endpoint, ReadinessCheck, build_app, configure_logging
from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED, TOPIC_PAYMENT_RESULT

log = logging.getLogger(__name__)


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


# What each service consumes, for the consumer-lag gauge.
CONSUMES = {"orders": TOPIC_PAYMENT_RESULT, "payments": TOPIC_PAYMENT_REQUESTED}


def pipeline_metrics(
    service: str, pool: AsyncConnectionPool, config: Config, registry: CollectorRegistry
) -> Callable[[CollectorRegistry], Awaitable[None]]:
    """Gauges of the service's outbox, inbox, dead letters and consumer lag, read at scrape."""
    gauges = {
        name: Gauge(name, help_text, registry=registry)
        for name, help_text in (
            ("outbox_pending", "Outbox rows not yet published to Kafka"),
            ("outbox_oldest_pending_seconds", "Age of the oldest unpublished outbox row"),
            ("inbox_pending", "Inbox rows not yet applied"),
            ("inbox_oldest_pending_seconds", "Age of the oldest unapplied inbox row"),
            ("dead_letters", "Messages moved to the dead-letter table"),
            ("kafka_consumer_lag", "Messages on the consumed topic not yet committed"),
        )
    }
    topic = config.topic(CONSUMES[service])

    async def refresh(_: CollectorRegistry) -> None:
        async with pool.connection() as conn:
            outbox_row = await (await conn.execute(outbox.BACKLOG)).fetchone()
            inbox_row = await (await conn.execute(inbox.BACKLOG)).fetchone()
            dead_row = await (await conn.execute(inbox.DEAD_LETTER_COUNT)).fetchone()
        gauges["outbox_pending"].set(outbox_row[0] if outbox_row else 0)
        gauges["outbox_oldest_pending_seconds"].set(float(outbox_row[1]) if outbox_row else 0)
        gauges["inbox_pending"].set(inbox_row[0] if inbox_row else 0)
        gauges["inbox_oldest_pending_seconds"].set(float(inbox_row[1]) if inbox_row else 0)
        gauges["dead_letters"].set(dead_row[0] if dead_row else 0)
        try:
            lag = await asyncio.wait_for(
                asyncio.to_thread(kafka.consumer_lag, config, f"{service}-service", topic),
                config.kafka_timeout + 1,
            )
            gauges["kafka_consumer_lag"].set(lag)
        except Exception as exc:  # Kafka down: keep serving the database figures
            log.warning("consumer lag unavailable: %s", exc)
            gauges["kafka_consumer_lag"].set(float("nan"))

    return refresh


def create_service_app(
    *,
    service: str,
    title: str,
    description: str,
    endpoints: Sequence[Endpoint],
    config: Config,
    running: Callable[[Starlette, AsyncConnectionPool], AbstractAsyncContextManager[None]]
    | None = None,
) -> Starlette:
    """The Starlette app of `service` ("orders" or "payments") with its own database pool in
    `app.state.db`, and `/ready` checking that database, Redis and Kafka. `running(app, pool)`,
    if given, is entered once the pool is open and left before it closes."""
    pool = db.async_pool(config, service, f"{service}-api")
    registry = CollectorRegistry()
    timeout = min(2.0, config.db_connect_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging()
        app.state.db = pool
        app.state.config = config
        # Do not block start-up on the database: requests answer 503 until it is reachable.
        await pool.open(wait=False)
        try:
            if running is None:
                yield
            else:
                async with running(app, pool):
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
        registry=registry,
        refresh_metrics=pipeline_metrics(service, pool, config, registry),
    )
