"""The benchmark's lean HTTP/1.1 client (`bench.http1`) against a scripted local server: what it
sends, connection reuse and its bound, and how each failure is reported and recovered from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from bench import http1

Respond = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def answer(status: int, body: bytes = b'{"ok":true}', close: bool = False) -> bytes:
    reason = {201: "Created", 503: "Service Unavailable"}.get(status, "Other")
    headers = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
    if close:
        headers.append("connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


@dataclass
class Server:
    """Reads each request (headers and Content-Length body) and lets `respond` answer it."""

    respond: Respond
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.respond(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


def run_against(respond: Respond, scenario: Callable[[Server], Awaitable[None]]) -> Server:
    async def main() -> Server:
        server = Server(respond)
        listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        async with listening:
            await scenario(server)
        return server

    return http1.run_fast(main())


async def created(_: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(201))


def closing_after(raw: bytes) -> Respond:
    """A server that writes `raw` to every request, then closes the connection."""

    async def respond(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    return respond


# Keep-alive by its headers, closed all the same.
closes_after_answering = closing_after(answer(201))


def post_all(
    respond: Respond,
    bodies: list[bytes],
    *,
    connections: int = 1,
    timeout: float = 5,
    together: bool = False,
) -> tuple[list[http1.Answer], Server]:
    """POST each of `bodies` through one client, one after another or all at once; their
    answers in order, and the server that saw them."""
    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", connections, timeout=timeout)
        if together:
            answers.extend(await asyncio.gather(*(client.post("/", body) for body in bodies)))
        else:
            answers.extend([await client.post("/", body) for body in bodies])
        await client.close()

    return answers, run_against(respond, scenario)


def test_posts_the_body_and_reuses_one_connection() -> None:
    statuses: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}/api", 4, timeout=5)
        for n in range(3):
            statuses.append(await client.post("/orders/create", b'{"n":%d}' % n))
        await client.close()

    server = run_against(created, scenario)
    assert [(a.status, a.outcome) for a in statuses] == [(201, "201")] * 3
    assert server.connections == 1
    head, _, body = server.requests[2].partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /api/orders/create HTTP/1.1"
    assert b"Content-Type: application/json" in head
    assert b"Content-Length: 7" in head
    assert body == b'{"n":2}'


def test_never_opens_more_than_its_bound_and_everyone_gets_an_answer() -> None:
    async def slow(_: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(answer(201))

    answers, server = post_all(slow, [b"{}"] * 7, connections=2, timeout=10, together=True)
    assert [a.outcome for a in answers] == ["201"] * 7
    assert server.most_open == 2
    assert len(server.requests) == 7


def test_a_late_answer_is_a_timeout_and_its_connection_is_not_reused() -> None:
    async def first_hangs(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.endswith(b'"hang"'):
            await asyncio.sleep(1)
        if not writer.is_closing():
            writer.write(answer(201))

    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=0.4)
        hung = asyncio.ensure_future(client.post("/", b'"hang"'))
        await asyncio.sleep(0.05)
        queued = await client.post("/", b'"queued"', timeout=0.1)  # the only connection is taken
        answers.extend([await hung, queued, await client.post("/", b'"after"')])
        await client.close()

    server = run_against(first_hangs, scenario)
    assert [a.outcome for a in answers] == [
        "timeout",
        "timeout_waiting_for_a_connection",
        "201",
    ]
    assert server.connections == 2  # the timed-out connection was dropped, a new one opened


def test_a_connection_the_server_breaks_is_reported_and_replaced() -> None:
    async def breaks_once(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.endswith(b'"break"'):
            writer.transport.abort()
            return
        writer.write(answer(503))

    answers, server = post_all(breaks_once, [b'"break"', b'"next"'])
    assert [(a.status, a.outcome) for a in answers] == [(0, "connection"), (503, "503")]
    assert server.connections == 2


def test_connection_close_answers_are_not_reused() -> None:
    answers, server = post_all(closing_after(answer(201, close=True)), [b"{}", b"{}"])
    assert [a.outcome for a in answers] == ["201", "201"]
    assert server.connections == 2


def test_an_unreachable_server_is_a_connection_error() -> None:
    async def scenario(server: Server) -> None:
        unused = server.port  # listening, so take a port nobody listens on instead
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        assert dead != unused
        client = http1.Client(f"http://127.0.0.1:{dead}", 1, timeout=5)
        outcomes.append((await client.post("/", b"{}")).outcome)
        outcomes.append((await client.post("/", b"{}")).outcome)  # the slot was given back

    outcomes: list[str] = []
    run_against(created, scenario)
    assert outcomes == ["connection", "connection"]


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://"):
        http1.Client("https://example.com", 1, timeout=1)


def test_interim_answers_are_skipped_for_the_final_one() -> None:
    async def hints_first(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
        await asyncio.sleep(0.01)
        writer.write(answer(201 if request.endswith(b'"first"') else 503))

    answers, server = post_all(hints_first, [b'"first"', b'"second"'])
    assert [a.outcome for a in answers] == ["201", "503"]
    assert server.connections == 1


def test_a_body_that_ends_with_the_connection_counts_once_the_connection_ends() -> None:
    close_delimited = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\r\n{}"
    answers, server = post_all(closing_after(close_delimited), [b"{}", b"{}"])
    assert [a.outcome for a in answers] == ["201", "201"]
    assert server.connections == 2


def test_a_request_cancelled_by_its_caller_leaves_its_answer_behind() -> None:
    async def slow_then_fast(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.endswith(b'"slow"'):
            await asyncio.sleep(0.3)
            if not writer.is_closing():
                writer.write(answer(503))
        else:
            writer.write(answer(201))

    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.post("/", b'"slow"'), 0.05)
        answers.append(await client.post("/", b'"fast"'))
        await asyncio.sleep(0.4)  # the slow answer, had it stayed on a reused connection
        answers.append(await client.post("/", b'"fast"'))
        await client.close()

    server = run_against(slow_then_fast, scenario)
    assert [a.outcome for a in answers] == ["201", "201"]
    assert server.connections == 2


def test_an_idle_connection_the_server_closed_is_replaced_without_an_error() -> None:
    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        answers.append(await client.post("/", b"{}"))
        await asyncio.sleep(0.1)
        answers.append(await client.post("/", b"{}"))
        await client.close()

    server = run_against(closes_after_answering, scenario)
    assert [a.outcome for a in answers] == ["201", "201"]
    assert server.connections == 2


def test_an_unreadable_answer_is_a_connection_error_and_frees_the_slot() -> None:
    async def garbage_once(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n" if request.endswith(b'"bad"') else answer(201))

    answers, _ = post_all(garbage_once, [b'"bad"', b'"good"'])
    assert [a.outcome for a in answers] == ["connection", "201"]


def test_a_waiter_gets_a_fresh_connection_when_the_one_it_waited_for_broke() -> None:
    async def breaks_first(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.endswith(b'"break"'):
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return
        writer.write(answer(201))

    answers, server = post_all(breaks_first, [b'"break"', b'"waits"'], together=True)
    assert [a.outcome for a in answers] == ["connection", "201"]
    assert server.connections == 2


def test_close_shuts_connections_still_in_flight_once_their_answers_are_in() -> None:
    async def slow(_: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        writer.write(answer(201))

    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 2, timeout=5)
        in_flight = asyncio.ensure_future(client.post("/", b"{}"))
        await asyncio.sleep(0.02)
        await client.close()
        answers.append(await in_flight)
        for _ in range(50):
            if server.open_now == 0:
                break
            await asyncio.sleep(0.02)
        assert server.open_now == 0

    run_against(slow, scenario)
    assert [a.outcome for a in answers] == ["201"]


def test_waiters_never_get_a_connection_that_closed_after_it_was_handed_over() -> None:
    answers, server = post_all(closes_after_answering, [b"{}"] * 5, together=True)
    assert [a.outcome for a in answers] == ["201"] * 5
    assert server.connections == 5


def test_a_connection_idle_for_too_long_is_not_used_again() -> None:
    answers: list[http1.Answer] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5, idle_timeout=0.05)
        answers.append(await client.post("/", b"{}"))
        answers.append(await client.post("/", b"{}"))  # at once: the same connection
        await asyncio.sleep(0.1)
        answers.append(await client.post("/", b"{}"))  # past idle_timeout: a new one
        await client.close()

    server = run_against(created, scenario)
    assert [a.outcome for a in answers] == ["201"] * 3
    assert server.connections == 2
