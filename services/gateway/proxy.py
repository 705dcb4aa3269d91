"""The gateway's proxy: forwards an already validated request to the service that owns it over one
pooled HTTP client, with bounded time, and retries only where repeating cannot do harm.

The client is aiohttp's: with httpx the gateway spent ~70% of its CPU in httpx/httpcore (py-spy),
2.5-3.3 ms of CPU per proxied GET at 100-200 requests/s; with aiohttp, 1.1-1.3 ms."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from services.common import problems
from services.common.api import REQUEST_ID_HEADER, Call, Handler, ReadinessCheck
from services.common.config import Config

log = logging.getLogger(__name__)

ATTEMPTS = 3
# Seconds, at most, before the first retry (jittered; later ones back off exponentially).
FIRST_RETRY_WAIT = 0.05
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A proxy or a restarting service in between may answer these; another try may well succeed.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# What a client of the gateway needs from the service's answer besides status and body.
PASSED_BACK_HEADERS = ("content-type", "location", "link", "x-next-cursor", "retry-after")
_PASSED_BACK_RAW = frozenset(name.encode("latin-1") for name in PASSED_BACK_HEADERS)
CONNECT_TIMEOUT = 1.0
HEALTH_TIMEOUT = 1.0
MAX_CONNECTIONS = 200
# Idle connections are dropped before the services' own keep-alive timeout (uvicorn's 5 s), so
# the gateway never sends a request on a connection the service is closing at that moment.
KEEPALIVE_TIMEOUT = 4.0
# Headers aiohttp would add that the services do not use. Content-Type is set only with a body
# (aiohttp would otherwise label an empty POST application/octet-stream); without
# Accept-Encoding the services never spend CPU compressing what the gateway would inflate.
SKIPPED_AUTO_HEADERS = ("User-Agent", "Content-Type", "Accept-Encoding")

# What a failed exchange with a service raises: aiohttp's own errors (connection, protocol,
# truncated body, socket timeouts) and the total timeout (a bare `TimeoutError`).
TRANSPORT_ERRORS: Final[tuple[type[BaseException], ...]] = (aiohttp.ClientError, TimeoutError)
# Raised by aiohttp only while opening a connection, before a byte of the request is written:
# refused, unresolvable host, TLS handshake (`ClientConnectorError` and its subclasses), or no
# connection within the connect timeout (`ConnectionTimeoutError`). Not their siblings: a
# `ServerDisconnectedError`, `ClientOSError` or `SocketTimeoutError` can come after sending.
UNSENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)


@dataclass(frozen=True, slots=True)
class Answer:
    """A service's answer, read in full: status, body, and the headers passed back (raw)."""

    status: int
    body: bytes
    headers: Sequence[tuple[bytes, bytes]] = ()


@dataclass(frozen=True, slots=True)
class Upstream:
    """One request to a service, as every attempt sends it."""

    service: str
    method: str
    url: str
    query: dict[str, str] | None
    body: bytes | None
    headers: dict[str, str]

    def retry_answer(self, answer: Answer) -> bool:
        """Whether `answer` is worth another try: a 502/503/504 to an idempotent request."""
        return self.method in IDEMPOTENT_METHODS and answer.status in RETRYABLE_STATUSES


class Unhealthy(Exception):
    """A service's health check answered, but not 200."""


async def before_retry(state: RetryCallState) -> None:
    """The wait before the first retry, which tenacity would take after its own first try."""
    if state.attempt_number == 1:
        await asyncio.sleep(random.uniform(0, FIRST_RETRY_WAIT))


class RetryableAnswer(Exception):
    """A 502/503/504 answer to an idempotent request: worth another try."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"answered {answer.status}")
        self.answer = answer


def may_retry(method: str, error: BaseException) -> bool:
    """Whether a failed attempt at `method` can be repeated without risking a second effect.

    An idempotent request (GET) may be repeated after any transport failure or a 502/503/504.
    A POST only when no connection could be opened (`UNSENT_ERRORS`): aiohttp raises those
    before a byte of the request is written, so the service cannot have applied it. After a
    read timeout or a dropped connection the service may have committed the POST, so it is
    never repeated: the client gets 503 and decides. (aiohttp itself sends a GET once more
    when a kept-alive connection turns out to be closed, as RFC 9112 allows; never a POST.)"""
    if isinstance(error, UNSENT_ERRORS):
        return True
    if method.upper() not in IDEMPOTENT_METHODS:
        return False
    return isinstance(error, (*TRANSPORT_ERRORS, RetryableAnswer))


def downstream_path(call: Call) -> str:
    """The request's path with its validated ids in canonical form: the service is asked exactly
    what the gateway checked (percent-encoded: an id cannot add a path segment or a query)."""
    template = getattr(call.request.scope.get("route"), "path", None)
    if not isinstance(template, str):
        return quote(call.request.url.path, safe="/")
    return template.format_map({name: quote(str(v), safe="") for name, v in call.path.items()})


def downstream_query(call: Call) -> dict[str, str]:
    """The declared, validated query parameters; undeclared ones stop at the gateway."""
    return {name: str(value) for name, value in call.query.items()}


def encode_body(body: Any) -> bytes | None:
    """The validated JSON body, encoded again (the framework consumed the request stream)."""
    if body is None:
        return None
    # ASCII escapes keep any string (even a lone surrogate) encodable; NaN never passes validation.
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


def downstream_headers(call: Call) -> dict[str, str]:
    """Headers the service needs: the request id (its logs and answers carry it), the media type.

    An ASCII id (any real one: a UUID, a trace id) arrives byte for byte. aiohttp writes header
    values as UTF-8, so an id with Latin-1 octets beyond ASCII reaches the service UTF-8
    encoded; the gateway's own answer still carries the id exactly as the client sent it."""
    headers = {REQUEST_ID_HEADER: call.request_id}
    if call.body is not None:
        headers["Content-Type"] = "application/json"
    return headers


def passed_back(answer: Answer) -> Response:
    """The service's answer as the gateway's: same status, body and meaningful headers."""
    response = Response(answer.body, status_code=answer.status)
    response.raw_headers.extend(answer.headers)
    return response


def _passed_back_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers in `PASSED_BACK_HEADERS`, every value of a repeated one, octets unchanged."""
    return [(name.lower(), value) for name, value in raw if name.lower() in _PASSED_BACK_RAW]


class Proxy:
    """Forwards requests to the services over one pooled client session that the app's lifespan
    opens (`running`) and closes; `to(service, url)` makes the handler of that service's
    endpoints."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        # Built once: every request shares them. `sock_connect` bounds opening a connection;
        # waiting for a free one in the pool is bounded by the total, as with the old client.
        self._timeout = aiohttp.ClientTimeout(
            total=config.http_timeout, sock_connect=CONNECT_TIMEOUT
        )
        self._health_timeout = aiohttp.ClientTimeout(
            total=HEALTH_TIMEOUT, sock_connect=min(CONNECT_TIMEOUT, HEALTH_TIMEOUT)
        )
        self._session: aiohttp.ClientSession | None = None
        self._max_in_flight = config.gateway_max_in_flight
        self._in_flight = 0
        self._attempts = Counter(
            "gateway_upstream_attempts_total",
            "Requests the gateway sent to the services, by outcome (status or error)",
            ["service", "outcome"],
            registry=registry,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the pooled client session for the app's lifetime (inside the running loop)."""
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, limit_per_host=0, keepalive_timeout=KEEPALIVE_TIMEOUT
        )
        # trust_env=False: a proxy set in the environment must not sit between gateway and
        # services. DummyCookieJar: a cookie one client's answer sets is never sent for another.
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=SKIPPED_AUTO_HEADERS,
            raise_for_status=False,
        ) as session:
            self._session = session
            try:
                yield
            finally:
                self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the proxy's client is open only while the app is running")
        return self._session

    def to(self, service: str, base_url: str) -> Handler:
        """The handler forwarding a validated request to `service` at `base_url`."""
        base = base_url.rstrip("/")

        async def forward(call: Call) -> Response:
            return await self.forward(service, base, call)

        return forward

    async def forward(self, service: str, base: str, call: Call) -> Response:
        # Admission control: past this many requests in flight the services are saturated and
        # one more would only wait (and make every other wait longer) until it timed out. It
        # is refused at once instead, so overload costs clients a quick retry, not 5 seconds.
        if self._in_flight >= self._max_in_flight:
            self._attempts.labels(service, "shed").inc()
            raise problems.service_unavailable(
                "The system is at capacity and did not take this request; retry shortly."
            )
        self._in_flight += 1
        try:
            return await self._forward(service, base, call)
        finally:
            self._in_flight -= 1

    async def _forward(self, service: str, base: str, call: Call) -> Response:
        method = call.request.method
        path = downstream_path(call)
        upstream = Upstream(
            service,
            method,
            base + path,  # yarl caches the parse; a prebuilt URL(encoded=True) was no faster
            downstream_query(call) or None,
            encode_body(call.body),
            downstream_headers(call),
        )
        started = time.perf_counter()
        try:
            answer = await self._send(upstream)
        except TRANSPORT_ERRORS as exc:
            log.warning(
                "%s %s -> %s failed: %s: %s (request_id=%s)",
                method,
                path,
                service,
                type(exc).__name__,
                exc,
                call.request_id,
            )
            raise problems.service_unavailable(
                f"The {service} service is unreachable or did not answer in time; retry shortly."
            ) from exc
        if log.isEnabledFor(logging.DEBUG):  # the access line (services.common.api) logs at INFO
            log.debug(
                "%s %s -> %s %d in %.1f ms (request_id=%s)",
                method,
                path,
                service,
                answer.status,
                (time.perf_counter() - started) * 1000,
                call.request_id,
            )
        return passed_back(answer)

    async def _send(self, upstream: Upstream) -> Answer:
        # Almost every request needs one attempt: it goes out directly, and tenacity's retry
        # machinery (built per request, a tenth of the gateway's CPU) comes in only after a
        # failure that may be retried, for the remaining attempts.
        try:
            answer = await self._attempt(upstream)
        except Exception as error:
            if not may_retry(upstream.method, error):
                raise
        else:
            if not upstream.retry_answer(answer):
                return answer
        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS - 1),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(lambda error: may_retry(upstream.method, error)),
            before=before_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    answer = await self._attempt(upstream)
                    if upstream.retry_answer(answer):
                        raise RetryableAnswer(answer)
        except RetryableAnswer as last:
            return last.answer
        return answer

    async def _attempt(self, upstream: Upstream) -> Answer:
        service = upstream.service
        try:
            async with self.session.request(
                upstream.method,
                upstream.url,
                params=upstream.query,
                data=upstream.body,
                headers=upstream.headers,
                allow_redirects=False,
            ) as response:
                # Read in full inside the block: the connection goes back to the pool at once.
                content = await response.read()
                answer = Answer(
                    response.status, content, _passed_back_headers(response.raw_headers)
                )
        except TRANSPORT_ERRORS as exc:
            self._attempts.labels(service, type(exc).__name__).inc()
            raise
        self._attempts.labels(service, str(answer.status)).inc()
        return answer

    def health_check(self, base_url: str) -> ReadinessCheck:
        """Readiness of a service: its `/health` answers 200 within `HEALTH_TIMEOUT`."""
        url = base_url.rstrip("/") + "/health"

        async def check() -> None:
            async with self.session.get(
                url, timeout=self._health_timeout, allow_redirects=False
            ) as answer:
                await answer.read()
                if answer.status != 200:
                    raise Unhealthy(f"/health answered {answer.status}")

        return check
