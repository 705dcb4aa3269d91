"""A lean HTTP/1.1 client: keep-alive connections to one server, one request at a time each,
answers parsed by httptools (llhttp, the C parser uvicorn uses).

The gateway forwards every request through it, and the benchmark's load generator sends
every order with it. aiohttp's client, which the gateway used before, was a third of the
gateway's CPU at 500 orders/s (py-spy); on `just bench-floor` a proxy on this client spends
0.24-0.34 ms of CPU per request against aiohttp's 0.37-0.52 ms. It is not a general client:
plain `http://` only, no redirects, no proxies, no cookies, no compression, no request body
streaming. What it does do: a bounded pool, a deadline per request (the wait for a
connection included), a separate bound on opening a connection, and errors that say whether
the request can have reached the server (`ConnectFailed`: never written)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

# uvicorn closes a connection idle for 5 s; one idle for 4 s is not used again, so a request
# never races the server's close on it (that request would be lost as a connection error).
IDLE_TIMEOUT: Final = 4.0
# Methods whose requests carry a Content-Length even when empty (RFC 9110, 8.6).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_FORBIDDEN_IN_HEADERS: Final = frozenset("\r\n\0")


class UpstreamError(Exception):
    """An exchange with the server failed."""


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, unresolvable, not within the connect timeout):
    not a byte of the request was written, so the server cannot have acted on it."""


class ConnectionLost(UpstreamError):
    """The connection closed or broke before the whole answer arrived, or the answer was not
    HTTP/1.1 the parser could read. The server may have acted on the request."""


class RequestTimeout(TimeoutError):
    """The request's deadline passed; `written` says whether the request had been sent (if
    not, it was still waiting for a connection or for one to open)."""

    def __init__(self, written: bool) -> None:
        super().__init__("sent, no answer in time" if written else "no connection in time")
        self.written = written


@dataclass(frozen=True, slots=True)
class Response:
    """A whole answer: status, headers in their order (names and values as received), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """`Name: value` lines for a request, each value's octets as given (Latin-1, as the
    server side decodes them). A line break or NUL in a name or value is refused: it would
    end the header or the request early."""
    lines = []
    for name, value in headers:
        if _FORBIDDEN_IN_HEADERS.intersection(name) or _FORBIDDEN_IN_HEADERS.intersection(value):
            raise ValueError(f"header {name!r} holds a line break or NUL")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and waits for its whole answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._head_only = False  # the answer to a HEAD: it has no body, whatever it declares
        self._status = 0  # of the answer being read, once its head is in
        self._delimited = False  # its body has a Content-Length or is chunked
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
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
        if self._waiter is None:  # nothing was asked: the connection is out of step
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # 101 Switching Protocols: nothing we asked for
            self._fail(ConnectionLost("the server switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(ConnectionLost(f"unreadable answer: {error}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer right behind the one just taken, in the same read: the
            # connection is out of step; it must never carry another request.
            self.close()
        self._status, self._delimited = 0, False
        self._headers, self._body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        if self._head_only and not 100 <= self._status < 200:
            # The parser would wait for the body the headers declare: this connection cannot
            # carry another request, and the answer is complete.
            self.close()
            self._resolve()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows. (A 101
            # ends the parse with HttpParserUpgrade instead, which fails the request.)
            return
        if not self._parser.should_keep_alive():
            self.close()
        self._resolve()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if exc is None and self._status >= 200 and not self._delimited and not self._head_only:
            self._resolve()  # a body that ends with the connection has ended
        else:
            self._fail(ConnectionLost(str(exc) if exc else "closed by the server"))

    def _resolve(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._headers, b"".join(self._body)))

    def _fail(self, error: Exception) -> None:
        self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def exchange(self, request: bytes, head_only: bool) -> asyncio.Future[Response]:
        """Write `request`; the future gets the answer once all of it is in."""
        if not self.usable:
            raise ConnectionLost("connection closed")
        assert self._transport is not None
        self._status, self._delimited, self._head_only = 0, False, head_only
        self._waiter = self._loop.create_future()
        self._transport.write(request)
        return self._waiter


class Client:
    """Requests to one server over at most `max_connections` keep-alive connections.
    `timeout` bounds each request from its call, the wait for a free connection included;
    `connect_timeout` (when given) bounds opening a connection.

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
        connect_timeout: float | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL is needed, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = f"{self._host}:{self._port}".encode()
        self._prefix = parts.path.rstrip("/").encode()
        self._max = max_connections
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()
        self._taken = 0  # slots that hold a connection or are being connected
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    def request_bytes(self, method: str, target: str, headers: bytes, body: bytes | None) -> bytes:
        """The whole request as it goes on the wire. `target`: the path (below the base URL's)
        and query, already percent-encoded; `headers`: a `header_block`."""
        if body is None and method in _BODY_METHODS:
            body = b""
        length = b"" if body is None else b"Content-Length: %d\r\n" % len(body)
        return b"".join(
            (
                method.encode("ascii"),
                b" ",
                self._prefix,
                target.encode("ascii"),
                b" HTTP/1.1\r\nHost: ",
                self._authority,
                b"\r\n",
                headers,
                length,
                b"\r\n",
                body or b"",
            )
        )

    async def request(
        self,
        method: str,
        target: str,
        headers: bytes = b"",
        body: bytes | None = None,
        timeout: float | None = None,
        budget_header: bytes | None = None,
    ) -> Response:
        """Send one request and read its whole answer within `timeout` (the client's by
        default). Raises `ConnectFailed`, `ConnectionLost` or `RequestTimeout`.

        With `budget_header`, the request carries that header with the milliseconds left of
        `timeout` as it is sent (after any wait for a connection): the server can give up on
        it in time rather than finish work its client no longer waits for."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + (self._timeout if timeout is None else timeout)
        deadline = asyncio.timeout_at(ends)
        connection: _Connection | None = None
        written = answered = False
        try:
            async with deadline:
                connection = await self._acquire(loop)
                if budget_header:
                    headers += b"%s: %d\r\n" % (budget_header, max(0, (ends - loop.time()) * 1000))
                request = self.request_bytes(method, target, headers, body)
                waiter = connection.exchange(request, head_only=method == "HEAD")
                written = True
                response = await waiter
                answered = True
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(written) from None
            raise
        finally:
            if connection is not None:
                if not answered:
                    connection.close()  # its answer may still come: it cannot carry another
                self._give_back(connection)
        return response

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """A usable connection, in a slot now the caller's."""
        if self._closed:
            raise self._closed_error()
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
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port
                )
        except OSError as error:  # refused, unresolvable, timed out (TimeoutError is one)
            self._give_back(None)
            reason = str(error) or "timed out"
            raise ConnectFailed(f"{self._host}:{self._port}: {reason}") from error
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
        """Close every idle connection; those in flight close as their requests end. Requests
        still waiting for a connection, and any made later, fail at once with `ConnectFailed`
        (none of them was written)."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._taken -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._closed_error())

    def _closed_error(self) -> ConnectFailed:
        """What a request gets once the client is closed: it was never written."""
        return ConnectFailed(f"{self._host}:{self._port}: the client is closed")
