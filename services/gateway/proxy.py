"""The gateway's proxy: forwards an already validated request to the service that owns it over one
pooled HTTP client, with bounded time, and retries only where repeating cannot do harm."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from services.common import problems
from services.common.api import REQUEST_ID_HEADER, Call, Handler, ReadinessCheck
from services.common.config import Config

log = logging.getLogger(__name__)

ATTEMPTS = 3
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A proxy or a restarting service in between may answer these; another try may well succeed.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# What a client of the gateway needs from the service's answer besides status and body.
PASSED_BACK_HEADERS = ("content-type", "location", "link", "x-next-cursor", "retry-after")
CONNECT_TIMEOUT = 1.0
HEALTH_TIMEOUT = 1.0
LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=100)


class RetryableAnswer(Exception):
    """A 502/503/504 answer to an idempotent request: worth another try."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"answered {response.status_code}")
        self.response = response


def may_retry(method: str, error: BaseException) -> bool:
    """Whether a failed attempt at `method` can be repeated without risking a second effect.

    An idempotent request (GET) may be repeated after any transport failure or a 502/503/504.
    A POST only when no connection could be opened (`ConnectError`, `ConnectTimeout`): httpx
    raises those before a byte of the request is written, so the service cannot have applied
    it. After a read timeout or a dropped connection the service may have committed the POST,
    so it is never repeated: the client gets 503 and decides."""
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    if method.upper() not in IDEMPOTENT_METHODS:
        return False
    return isinstance(error, httpx.TransportError | RetryableAnswer)


def downstream_path(call: Call) -> str:
    """The request's path with its validated ids in canonical form: the service is asked exactly
    what the gateway checked."""
    template = getattr(call.request.scope.get("route"), "path", None)
    if not isinstance(template, str):
        return call.request.url.path
    return template.format_map({name: str(value) for name, value in call.path.items()})


def downstream_query(call: Call) -> dict[str, str]:
    """The declared, validated query parameters; undeclared ones stop at the gateway."""
    return {name: str(value) for name, value in call.query.items()}


def encode_body(body: Any) -> bytes | None:
    """The validated JSON body, encoded again (the framework consumed the request stream)."""
    if body is None:
        return None
    # ASCII escapes keep any string (even a lone surrogate) encodable; NaN never passes validation.
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def downstream_headers(call: Call) -> dict[bytes, bytes]:
    """Headers the service needs: the request id (its logs and answers carry it), the media type."""
    # As bytes: the id arrived as Latin-1 octets, which httpx would refuse to encode as ASCII.
    headers = {REQUEST_ID_HEADER.encode(): call.request_id.encode("latin-1")}
    if call.body is not None:
        headers[b"Content-Type"] = b"application/json"
    return headers


def passed_back(answer: httpx.Response) -> Response:
    """The service's answer as the gateway's: same status, body and meaningful headers."""
    response = Response(answer.content, status_code=answer.status_code)
    for name in PASSED_BACK_HEADERS:
        for value in answer.headers.get_list(name):
            response.raw_headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return response


class Proxy:
    """Forwards requests to the services over one pooled client that the app's lifespan opens
    (`running`) and closes; `to(service, url)` makes the handler of that service's endpoints."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = httpx.Timeout(config.http_timeout, connect=CONNECT_TIMEOUT)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._attempts = Counter(
            "gateway_upstream_attempts_total",
            "Requests the gateway sent to the services, by outcome (status or error)",
            ["service", "outcome"],
            registry=registry,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the pooled client for the app's lifetime."""
        # trust_env=False: a proxy set in the environment must not sit between gateway and services.
        async with httpx.AsyncClient(
            timeout=self._timeout,
            limits=LIMITS,
            transport=self._transport,
            trust_env=False,
            follow_redirects=False,
        ) as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the proxy's client is open only while the app is running")
        return self._client

    def to(self, service: str, base_url: str) -> Handler:
        """The handler forwarding a validated request to `service` at `base_url`."""
        base = base_url.rstrip("/")

        async def forward(call: Call) -> Response:
            return await self.forward(service, base, call)

        return forward

    async def forward(self, service: str, base: str, call: Call) -> Response:
        method = call.request.method
        request = self.client.build_request(
            method,
            base + downstream_path(call),
            params=downstream_query(call),
            content=encode_body(call.body),
            headers=downstream_headers(call),
        )
        started = time.perf_counter()
        try:
            answer = await self._send(service, method, request)
        except httpx.TransportError as exc:
            log.warning(
                "%s %s -> %s failed: %s: %s (request_id=%s)",
                method,
                request.url.path,
                service,
                type(exc).__name__,
                exc,
                call.request_id,
            )
            raise problems.service_unavailable(
                f"The {service} service is unreachable or did not answer in time; retry shortly."
            ) from exc
        log.debug(  # the access line (services.common.api) already logs each request at INFO
            "%s %s -> %s %d in %.1f ms (request_id=%s)",
            method,
            request.url.path,
            service,
            answer.status_code,
            (time.perf_counter() - started) * 1000,
            call.request_id,
        )
        return passed_back(answer)

    async def _send(self, service: str, method: str, request: httpx.Request) -> httpx.Response:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(lambda error: may_retry(method, error)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    answer = await self._attempt(service, request)
                    if method in IDEMPOTENT_METHODS and answer.status_code in RETRYABLE_STATUSES:
                        raise RetryableAnswer(answer)
        except RetryableAnswer as last:
            return last.response
        return answer

    async def _attempt(self, service: str, request: httpx.Request) -> httpx.Response:
        try:
            answer = await self.client.send(request)
        except httpx.TransportError as exc:
            self._attempts.labels(service, type(exc).__name__).inc()
            raise
        self._attempts.labels(service, str(answer.status_code)).inc()
        return answer

    def health_check(self, base_url: str) -> ReadinessCheck:
        """Readiness of a service: its `/health` answers 200 within `HEALTH_TIMEOUT`."""
        url = base_url.rstrip("/") + "/health"

        async def check() -> None:
            answer = await self.client.get(url, timeout=HEALTH_TIMEOUT)
            answer.raise_for_status()

        return check
