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
from typing import Any, TypeVar, cast
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
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionFailed(f"unreadable answer: {error}"))

    def on_message_complete(self) -> None:  # httptools callback
        if not self._parser.should_keep_alive():
            self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(ConnectionFailed(str(exc) if exc else "closed by the server"))

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
        if not self.reusable or self._transport is None or self._transport.is_closing():
            raise ConnectionFailed("connection closed")
        self._waiter = self._loop.create_future()
        self._transport.write(request)
        return self._waiter


class Client:
    """POSTs to one server over at most `max_connections` keep-alive connections. `timeout`
    bounds each request from its call, the wait for a free connection included."""

    def __init__(self, base_url: str, max_connections: int, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL is needed, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = f"{self._host}:{self._port}".encode()
        self._prefix = parts.path.rstrip("/")
        self._max = max_connections
        self._timeout = timeout
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()

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
        connection: _Connection | None = None
        written = False
        try:
            async with asyncio.timeout_at(loop.time() + (timeout or self._timeout)):
                connection = await self._acquire(loop)
                answer = connection.exchange(request)
                written = True
                status = await answer
        except TimeoutError:
            if connection is not None:
                connection.close()  # its answer may still come: it cannot carry another request
            return Answer(0, "timeout" if written else "timeout_waiting_for_a_connection")
        except (ConnectionFailed, OSError):
            if connection is not None:
                connection.close()
            return Answer(0, "connection")
        finally:
            if connection is not None:
                self._release(connection)
        return Answer(status, str(status))

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable:
                return connection
            self._open -= 1
        if self._open < self._max:
            self._open += 1
            try:
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port
                )
            except BaseException:
                self._open -= 1
                self._wake_one(None)
                raise
            return protocol
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            handed_over = await waiter
        except asyncio.CancelledError:
            # Timed out: a connection handed over in the meantime goes to the next in line.
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    self._release(handed)
                else:
                    self._wake_one(None)
            raise
        # None: a slot freed up (a connection closed); open a new one in it.
        return handed_over if handed_over is not None else await self._acquire(loop)

    def _release(self, connection: _Connection) -> None:
        if connection.reusable:
            if not self._wake_one(connection):
                self._idle.append(connection)
        else:
            self._open -= 1
            self._wake_one(None)

    def _wake_one(self, connection: _Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    async def close(self) -> None:
        """Close every idle connection (in-flight ones close as their requests end)."""
        while self._idle:
            self._idle.pop().close()
        self._open = 0
