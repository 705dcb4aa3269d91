"""The load generator's HTTP client: keep-alive HTTP/1.1 connections, one request at a time
each, answers parsed by httptools (the C parser uvicorn uses, llhttp).

Why not aiohttp, the gateway's client: the generator shares the machine's two cores with the
system it measures, and every millisecond it spends is taken from the system. aiohttp's client
costs 0.3-0.6 ms of CPU per request here (`just bench-floor`); this one, which only writes one
prepared request and counts the answer's status, a fifth of that. It is not a general client:
no redirects, no proxies, no TLS, no cookies, the answer's body is read and dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import httptools

T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop when it is installed (uvicorn[standard] brings it): less generator
    overhead than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# uvicorn closes a connection idle for 5 s; one idle for 4 s is not used again, so a request
# never races the server's close on it (that request would be lost as a connection error).
IDLE_TIMEOUT: Final = 4.0


class ConnectionFailed(Exception):
    """The connection could not be opened, broke before the answer, or the answer was not
    HTTP/1.1 the parser could read."""


@dataclass(frozen=True)
class Answer:
    """How one request ended. `status` is the HTTP status, or 0 when there was none; `outcome`
    is the status as text, `timeout`, `timeout_waiting_for_a_connection` or `connection`."""

    status: int
    outcome: str


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and waits for its answer's end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0  # of the answer being read, once its head is in
        self._delimited = False  # its body has a Content-Length or is chunked
        self.reusable = True
        self.idle_since = 0.0

    @property
    def usable(self) -> bool:
        """Open, idle between answers, and not closed by either side."""
        return (
            self.reusable
            and self._waiter is None
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionFailed(f"unreadable answer: {error}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._status, self._delimited = 0, False

    def on_header(self, name: bytes, _: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200 and self._status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the final one follows
        if not self._parser.should_keep_alive():
            self.close()
        self._resolve(self._status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if exc is None and self._status and not self._delimited:
            self._resolve(self._status)  # a body that ends with the connection has ended
        else:
            self._fail(ConnectionFailed(str(exc) if exc else "closed by the server"))

    def _resolve(self, status: int) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def _fail(self, error: Exception) -> None:
        self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def exchange(self, request: bytes) -> asyncio.Future[int]:
        """Write `request`; the future gets the answer's status once the whole answer is in."""
        if not self.usable:
            raise ConnectionFailed("connection closed")
        assert self._transport is not None
        self._status, self._delimited = 0, False
        self._waiter = self._loop.create_future()
        self._transport.write(request)
        return self._waiter


class Client:
    """POSTs to one server over at most `max_connections` keep-alive connections. `timeout`
    bounds each request from its call, the wait for a free connection included.

    Each of the `max_connections` slots is either free, or holds a connection that is idle or
    carries one request. A slot is handed from a finished request straight to the longest
    waiting one: as its connection when that can carry another request, else empty, to open
    a new connection in."""

    def __init__(
        self,
        base_url: str,
        max_connections: int,
        timeout: float,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL is needed, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = f"{self._host}:{self._port}".encode()
        self._prefix = parts.path.rstrip("/")
        self._max = max_connections
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._idle: deque[_Connection] = deque()
        self._taken = 0  # slots that hold a connection or are being connected
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    def request_bytes(self, path: str, body: bytes) -> bytes:
        """The whole request as it goes on the wire."""
        return b"".join(
            (
                b"POST ",
                (self._prefix + path).encode(),
                b" HTTP/1.1\r\nHost: ",
                self._authority,
                b"\r\nContent-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )

    async def post(self, path: str, body: bytes, timeout: float | None = None) -> Answer:
        """POST `body` (JSON) to `path` within `timeout` (the client's by default); never
        raises for what the network or server did."""
        loop = asyncio.get_running_loop()
        request = self.request_bytes(path, body)
        deadline = asyncio.timeout_at(loop.time() + (self._timeout if timeout is None else timeout))
        connection: _Connection | None = None
        written = answered = False
        try:
            async with deadline:
                connection = await self._acquire(loop)
                answer = connection.exchange(request)
                written = True
                status = await answer
                answered = True
        except TimeoutError:
            if not deadline.expired():
                return Answer(0, "connection")  # the system's own: a connect timed out
            return Answer(0, "timeout" if written else "timeout_waiting_for_a_connection")
        except (ConnectionFailed, OSError):
            return Answer(0, "connection")
        finally:
            if connection is not None:
                if not answered:
                    connection.close()  # its answer may still come: it cannot carry another
                self._give_back(connection)
        return Answer(status, str(status))

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A usable connection, in a slot now the caller's."""
        if self._idle:
            connection = self._idle.pop()
            if connection.usable and loop.time() - connection.idle_since < self._idle_timeout:
                return connection
            connection.close()
            return await self._connect(loop)  # closed, or soon by the server: a new one
        if self._taken < self._max:
            self._taken += 1
            return await self._connect(loop)
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed over meanwhile: to the next in line
            raise
        if handed is not None and handed.usable:
            return handed
        return await self._connect(loop)  # an empty slot, or one whose connection just closed

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """Open a connection in a slot the caller holds; if that fails, the slot is freed."""
        try:
            _, protocol = await loop.create_connection(
                lambda: _Connection(loop), self._host, self._port
            )
        except BaseException:
            self._give_back(None)
            raise
        return protocol

    def _give_back(self, connection: _Connection | None) -> None:
        """Free a slot: with its connection when that can carry another request."""
        if connection is not None and (self._closed or not connection.usable):
            connection.close()
            connection = None
        if not self._closed:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(connection)
                    return
        if connection is None:
            self._taken -= 1
        else:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)

    async def close(self) -> None:
        """Close every idle connection; those in flight close as their requests end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._taken -= 1
