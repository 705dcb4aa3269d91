"""`services.common.http`: a response's head and body leave in one write, and the transport
still behaves as a transport (close writes what is held, abort drops it, flow control holds).
The last tests serve a real Starlette app with uvicorn on the protocol and read it raw."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.http import MAX_HELD_BYTES, CoalescingHttpToolsProtocol, CoalescingTransport
from tests.serving import serving


@dataclass
class Recorded:
    """A stand-in transport that records what reaches it."""

    writes: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    closing: bool = False
    buffered: int = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def write_eof(self) -> None:
        self.events.append("write_eof")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def run(steps: Any) -> Any:
    """Run the coroutine function `steps(transport, recorded)` on a fresh event loop."""

    async def main() -> Any:
        recorded = Recorded()
        transport = CoalescingTransport(recorded, asyncio.get_running_loop())  # type: ignore[arg-type]
        return await steps(transport, recorded)

    return asyncio.run(main())


async def next_step() -> None:
    """Let the event loop finish the current step and run what it scheduled."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_writes_of_one_step_reach_the_socket_as_one_write_after_the_step() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"ok")
        assert recorded.writes == []  # held until the step ends
        await next_step()
        assert recorded.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

    run(steps)


def test_writes_of_different_steps_are_written_separately_and_in_order() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"first")
        await next_step()
        transport.writelines([b"sec", b"ond"])
        transport.write(b"")  # nothing to write schedules nothing
        await next_step()
        assert recorded.writes == [b"first", b"second"]

    run(steps)


@pytest.mark.parametrize("ending", ["close", "write_eof"])
def test_ending_the_stream_writes_what_is_held_first(ending: str) -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"last answer")
        getattr(transport, ending)()
        assert recorded.events == ["write", ending]
        assert recorded.writes == [b"last answer"]
        await next_step()
        assert recorded.writes == [b"last answer"]  # the scheduled flush has nothing left

    run(steps)


def test_abort_drops_what_is_held() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"never sent")
        transport.abort()
        await next_step()
        assert recorded.events == ["abort"]

    run(steps)


def test_nothing_is_written_to_a_transport_that_is_closing() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"too late")
        recorded.closing = True  # the peer went away within the step
        await next_step()
        assert recorded.writes == []
        assert transport.get_write_buffer_size() == 0

    run(steps)


def test_a_large_write_goes_out_at_once_so_flow_control_still_applies() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        transport.write(b"head")
        assert transport.get_write_buffer_size() == 4
        recorded.buffered = 10
        assert transport.get_write_buffer_size() == 14  # the socket's own buffer counts too
        transport.write(b"x" * MAX_HELD_BYTES)
        assert recorded.writes == [b"head" + b"x" * MAX_HELD_BYTES]
        assert transport.get_write_buffer_size() == 10
        await next_step()
        assert len(recorded.writes) == 1

    run(steps)


def test_everything_else_is_the_wrapped_transports() -> None:
    async def steps(transport: CoalescingTransport, recorded: Recorded) -> None:
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)
        assert not transport.is_closing()
        recorded.closing = True
        assert transport.is_closing()

    run(steps)


# --- uvicorn serving on the protocol -------------------------------------------------------


async def small(_: Request) -> Response:
    return JSONResponse({"ok": True}, status_code=201, headers={"location": "/orders/1"})


async def streamed(_: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * MAX_HELD_BYTES

    return StreamingResponse(chunks(), media_type="application/octet-stream")


APP = Starlette(routes=[Route("/small", small, methods=["GET", "POST"]), Route("/big", streamed)])


class WriteCounter:
    """A transport that records each write reaching the socket (uvloop's cannot be patched)."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def counting(base: type[HttpToolsProtocol], writes: list[bytes]) -> type[HttpToolsProtocol]:
    """`base` with every write it makes to the socket recorded in `writes`."""

    class Counting(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(WriteCounter(transport, writes))

    return Counting


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def read_until(conn: socket.socket, end: bytes) -> bytes:
    received = b""
    while not received.endswith(end):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {received[-200:]!r}"
        received += chunk
    return received


SMALL_BODY = b'{"ok":true}'


@pytest.mark.parametrize("coalescing", [True, False], ids=["coalescing", "uvicorn-own"])
def test_each_answer_leaves_in_one_write_on_a_kept_alive_connection(coalescing: bool) -> None:
    writes: list[bytes] = []
    base = CoalescingHttpToolsProtocol if coalescing else HttpToolsProtocol
    with (
        serving(APP, counting(base, writes)) as url,
        socket.create_connection(address(url), timeout=5) as conn,
    ):
        answers = []
        for request in (
            b"GET /small HTTP/1.1\r\nhost: t\r\n\r\n",
            b"POST /small HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n",
        ):
            conn.sendall(request)
            answers.append(read_until(conn, SMALL_BODY))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
        assert b"location: /orders/1\r\n" in answer
        assert answer.endswith(b"\r\n\r\n" + SMALL_BODY)
    if coalescing:
        assert writes == answers
    else:  # the control: uvicorn's own protocol writes head and body apart
        assert len(writes) == 4
        assert b"".join(writes) == b"".join(answers)


def test_a_streamed_answer_larger_than_what_is_held_arrives_whole() -> None:
    writes: list[bytes] = []
    with (
        serving(APP, counting(CoalescingHttpToolsProtocol, writes)) as url,
        socket.create_connection(address(url), timeout=5) as conn,
    ):
        conn.sendall(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        answer = read_until(conn, b"\r\n0\r\n\r\n")
    head, _, chunked = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    body, rest = b"", chunked
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    assert body == b"y" * (3 * MAX_HELD_BYTES)
    assert len(writes) >= 3  # each chunk past the limit went out on its own


@pytest.mark.parametrize("coalescing", [True, False], ids=["coalescing", "uvicorn-own"])
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    coalescing: bool,
) -> None:
    # The end of the client's stream closes the transport (uvicorn does not keep half-open
    # connections): the answer held at that moment must be written before it closes.
    base = CoalescingHttpToolsProtocol if coalescing else HttpToolsProtocol
    answers = []
    with serving(APP, base) as url:
        for _ in range(20):
            with socket.create_connection(address(url), timeout=5) as conn:
                conn.sendall(b"GET /small HTTP/1.1\r\nhost: t\r\n\r\n")
                conn.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                answers.append(received)
    assert all(a.startswith(b"HTTP/1.1 201 Created\r\n") for a in answers), answers[:3]
    assert all(a.endswith(b"\r\n\r\n" + SMALL_BODY) for a in answers)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /small HTTP/1.1\r\nhost: t\r\nbad header\r\n\r\n",
        b"POST /small HTTP/1.1\r\nhost: t\r\ncontent-length: x\r\n\r\n",
    ],
    ids=["request-line", "header", "content-length"],
)
def test_a_request_that_is_not_http_gets_problem_json_and_the_connection_closes(
    request_bytes: bytes,
) -> None:
    # uvicorn answers these itself, before the app sees a request: a plain-text 400 of its own.
    with (
        serving(APP) as url,
        socket.create_connection(address(url), timeout=5) as conn,
    ):
        conn.sendall(request_bytes)
        received = b""
        while chunk := conn.recv(65536):  # until the server closes
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body) == {
        "type": "/problems/malformed-request",
        "title": "Malformed HTTP request",
        "status": 400,
        "detail": "The request could not be read as HTTP/1.1.",
    }
