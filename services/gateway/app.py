"""The API gateway's HTTP app: every Orders and Payments endpoint, validated here against the
services' own declarations and proxied to the service that owns it.

`uvicorn --factory services.gateway.app:create_app` serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from services.common.api import Endpoint, build_app, configure_logging
from services.common.config import Config, load
from services.gateway.proxy import Proxy
from services.orders import app as orders
from services.payments import app as payments

TITLE: Final = "Orders & Payments API gateway"
DESCRIPTION: Final = (
    "The public API of the online store. Each request is validated against the owning service's "
    "schemas, then proxied to Orders or Payments; an unreachable service answers 503 with "
    "`Retry-After`."
)


def endpoints(proxy: Proxy, config: Config) -> list[Endpoint]:
    """The services' endpoints, as declared by them, each served by the proxy to its owner."""
    to_orders = proxy.to("orders", config.orders_url)
    to_payments = proxy.to("payments", config.payments_url)
    return [ep.with_handler(to_orders) for ep in orders.ENDPOINTS] + [
        ep.with_handler(to_payments) for ep in payments.ENDPOINTS
    ]


def create_app(config: Config | None = None) -> Starlette:
    """The gateway app; reads the environment when no `config` is given (unit tests point its
    service URLs at fake services on local ports)."""
    config = config or load()
    registry = CollectorRegistry()
    proxy = Proxy(config, registry)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # uvicorn configures only its own loggers; without this the proxy's lines go nowhere.
        configure_logging()
        async with proxy.running():
            yield

    return build_app(
        title=TITLE,
        description=DESCRIPTION,
        endpoints=endpoints(proxy, config),
        readiness={
            "orders": proxy.health_check(config.orders_url),
            "payments": proxy.health_check(config.payments_url),
        },
        lifespan=lifespan,
        registry=registry,
    )
