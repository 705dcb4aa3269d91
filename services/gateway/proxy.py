"""The gateway's proxy: forwards an already validated request to the service that owns it over a
pool of keep-alive connections, with bounded time, and retries only where repeating cannot do
harm.

The client is the services' lean HTTP/1.1 client (`services.common.http1`). With httpx the
gateway spent ~70% of its CPU in httpx/httpcore (py-spy), 2.5-3.3 ms of CPU per proxied GET;
with aiohttp 1.1-1.3 ms, and aiohttp was still a third of the gateway at 500 orders/s."""

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
from urllib.parse import quote, urlencode

from prometheus_client import CollectorRegistry, Counter
from starlette.responses import Response
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from services.common import fastjson, http1, problems
from services.common.api import BUDGET_HEADER, REQUEST_ID_HEADER, Call, Handler, ReadinessCheck
from services.common.config import Config

log = logging.getLogger(__name__)

ATTEMPTS = 3
# Seconds, at most, before the first retry (jittered; later ones back off exponentially).
FIRST_RETRY_WAIT = 0.05
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BUDGET_HEADER: Final = BUDGET_HEADER.encode("ascii")
# A proxy or a restarting service in between may answer these; another try may well succeed.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# What a client of the gateway needs from the service's answer besides status and body.
PASSED_BACK_HEADERS = (
    "content-type",
    "location",
    "link",
    "x-next-cursor",
    "retry-after",
    "idempotent-replayed",
)
_PASSED_BACK_RAW = frozenset(name.encode("latin-1") for name in PASSED_BACK_HEADERS)
# The answer to a HEAD has no body; its Content-Length is the one a GET's body would have.
_PASSED_BACK_FOR_HEAD = _PASSED_BACK_RAW | {b"content-length"}
CONNECT_TIMEOUT = 1.0
HEALTH_TIMEOUT = 1.0
# Per service. Past it (GATEWAY_MAX_IN_FLIGHT is higher) a request waits for a free connection,
# within its deadline.
MAX_CONNECTIONS = 200
# Idle connections are dropped before the services' own keep-alive timeout (uvicorn's 5 s), so
# the gateway never sends a request on a connection the service is closing at that moment.
KEEPALIVE_TIMEOUT = 4.0

# What a failed exchange with a service raises: the connection could not be opened, broke, or
# carried an unreadable answer (`http1.UpstreamError`), or the deadline passed (`TimeoutError`).
TRANSPORT_ERRORS: Final[tuple[type[BaseException], ...]] = (http1.UpstreamError, TimeoutError)
# Raised only while opening a connection, before a byte of the request is written: refused,
# unresolvable host, or no connection within the connect timeout.
UNSENT_ERRORS: Final[tuple[type[BaseException], ...]] = (http1.ConnectFailed,)


@dataclass(frozen=True, slots=True)
class Answer:
    """A service's answer, read in full: status, body, and the headers passed back (raw)."""

    status: int
    body: bytes
    headers: Sequence[tuple[bytes, bytes]] = ()
    head: bool = False  # the answer to a HEAD: its headers hold the service's Content-Length


@dataclass(frozen=True, slots=True)
class Upstream:
    """One request to a service, as every attempt sends it."""

    service: str
    method: str
    target: str  # path and query, percent-encoded
    body: bytes | None
    headers: bytes  # an `http1.header_block`

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
    A POST only when no connection could be opened (`UNSENT_ERRORS`): not a byte of the
    request was written, so the service cannot have applied it. After a timeout or a dropped
    connection the service may have committed the POST, so it is never repeated: the client
    gets 503 and decides."""
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


def downstream_query(call: Call) -> str:
    """The declared, validated query parameters as a query string (`?...`, or empty when there
    are none); undeclared ones stop at the gateway."""
    if not call.query:
        return ""
    query = {name: str(value) for name, value in call.query.items()}
    return "?" + urlencode(query, quote_via=quote)


def encode_body(body: Any) -> bytes | None:
    """The validated JSON body, encoded again (the framework consumed the request stream)."""
    if body is None:
        return None
    # NaN never passes validation. A lone surrogate cannot be written as UTF-8: ASCII escapes
    # keep it (as they would any string).
    try:
        return fastjson.dumps(body)
    except UnicodeEncodeError:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


_JSON_BODY: Final = ("Content-Type", "application/json")


def downstream_headers(call: Call) -> bytes:
    """Headers the service needs: the request id (its logs and answers carry it, octet for
    octet as the client sent it), with a body its media type, and the request headers the
    endpoint declares (already validated here)."""
    headers = [(REQUEST_ID_HEADER, call.request_id), *call.headers.items()]
    if call.body is not None:
        headers.append(_JSON_BODY)
    return http1.header_block(headers)


def passed_back(answer: Answer) -> Response:
    """The service's answer as the gateway's: same status, body and meaningful headers."""
    response = Response(answer.body, status_code=answer.status)
    if answer.head:  # not the length of the empty body it came with
        response.raw_headers = [h for h in response.raw_headers if h[0] != b"content-length"]
    response.raw_headers.extend(answer.headers)
    return response


def _passed_back_headers(
    raw: Sequence[tuple[bytes, bytes]], names: frozenset[bytes] = _PASSED_BACK_RAW
) -> list[tuple[bytes, bytes]]:
    """The headers in `PASSED_BACK_HEADERS`, every value of a repeated one, octets unchanged."""
    return [(name.lower(), value) for name, value in raw if name.lower() in names]


class Proxy:
    """Forwards requests to the services, over a pool of connections per service that the
    app's lifespan closes (`running`); `to(service, url)` makes the handler of that service's
    endpoints."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        # A request's deadline covers the wait for a free connection in the pool too;
        # CONNECT_TIMEOUT bounds opening one.
        self._timeout = config.http_timeout
        self._clients: dict[str, http1.Client] = {}
        self._running = False
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
        """Forward for the app's lifetime; its end closes every pooled connection. (No proxy
        from the environment stands between gateway and services, and no cookie one answer
        sets is ever sent with another request: the client knows neither.)"""
        self._running = True
        try:
            yield
        finally:
            self._running = False
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                await client.close()

    def client(self, base_url: str) -> http1.Client:
        """The pool of connections to the service at `base_url`, opened on first use."""
        if not self._running:
            raise RuntimeError("the proxy's client is open only while the app is running")
        client = self._clients.get(base_url)
        if client is None:
            client = self._clients[base_url] = http1.Client(
                base_url,
                MAX_CONNECTIONS,
                timeout=self._timeout,
                idle_timeout=KEEPALIVE_TIMEOUT,
                connect_timeout=CONNECT_TIMEOUT,
            )
        return client

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
            path + downstream_query(call),
            encode_body(call.body),
            downstream_headers(call),
        )
        started = time.perf_counter()
        try:
            answer = await self._send(base, upstream)
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

    async def _send(self, base: str, upstream: Upstream) -> Answer:
        # Almost every request needs one attempt: it goes out directly, and tenacity's retry
        # machinery (built per request, a tenth of the gateway's CPU) comes in only after a
        # failure that may be retried, for the remaining attempts.
        try:
            answer = await self._attempt(base, upstream)
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
                    answer = await self._attempt(base, upstream)
                    if upstream.retry_answer(answer):
                        raise RetryableAnswer(answer)
        except RetryableAnswer as last:
            return last.answer
        return answer

    async def _attempt(self, base: str, upstream: Upstream) -> Answer:
        service = upstream.service
        try:
            response = await self.client(base).request(
                upstream.method,
                upstream.target,
                upstream.headers,
                upstream.body,
                # A write is given up on by the service once our time for it runs out.
                budget_header=None if upstream.method in IDEMPOTENT_METHODS else _BUDGET_HEADER,
            )
        except TRANSPORT_ERRORS as exc:
            self._attempts.labels(service, type(exc).__name__).inc()
            raise
        self._attempts.labels(service, str(response.status)).inc()
        if upstream.method == "HEAD":
            headers = _passed_back_headers(response.headers, _PASSED_BACK_FOR_HEAD)
            return Answer(response.status, response.body, headers, head=True)
        return Answer(response.status, response.body, _passed_back_headers(response.headers))

    def health_check(self, base_url: str) -> ReadinessCheck:
        """Readiness of a service: its `/health` answers 200 within `HEALTH_TIMEOUT`."""
        base = base_url.rstrip("/")

        async def check() -> None:
            answer = await self.client(base).request("GET", "/health", timeout=HEALTH_TIMEOUT)
            if answer.status != 200:
                raise Unhealthy(f"/health answered {answer.status}")

        return check
