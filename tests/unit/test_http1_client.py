"""`services.common.http1`, the lean client under the gateway and the load generator: the
request it writes, the errors it raises, and answers it must not mistake for another's.
(Pooling, its bound and recovery are tested through the generator's client, in
test_bench_http1; forwarding through the gateway, in test_gateway_proxy.)"""

from __future__ import annotations

import asyncio
import socket
from contextlib import closing
from typing import Any

import pytest

from bench.http1 import run_fast
from services.common import http1
from tests.unit.test_bench_http1 import Server, answer, run_against


def test_a_request_is_written_with_host_headers_and_length_only_where_it_belongs() -> None:
    client = http1.Client("http://svc:8081/api/", 1, timeout=1)
    headers = http1.header_block([("X-Request-ID", "r-1")])

    get = client.request_bytes("GET", "/orders?limit=5", headers, None)
    post = client.request_bytes("POST", "/accounts/create", headers, None)
    with_body = client.request_bytes("POST", "/orders", b"", b'{"a":1}')

    assert get == b"GET /api/orders?limit=5 HTTP/1.1\r\nHost: svc:8081\r\nX-Request-ID: r-1\r\n\r\n"
    assert post.endswith(b"X-Request-ID: r-1\r\nContent-Length: 0\r\n\r\n")
    assert with_body.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')


def test_header_values_go_out_as_their_latin_1_octets() -> None:
    assert http1.header_block([("X-Request-ID", "café")]) == b"X-Request-ID: caf\xe9\r\n"


@pytest.mark.parametrize("value", ["a\r\nX-Admin: 1", "a\nb", "a\0b"])
def test_a_header_that_would_end_the_line_early_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="line break or NUL"):
        http1.header_block([("X-Request-ID", value)])


def test_a_port_where_nothing_listens_is_connect_failed() -> None:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        client = http1.Client(f"http://127.0.0.1:{port}", 1, timeout=5)
        with pytest.raises(http1.ConnectFailed):
            await client.request("GET", "/")

    run_fast(main())


def test_a_connection_not_open_within_the_connect_timeout_is_connect_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def never(*_: Any, **__: Any) -> Any:
        await asyncio.sleep(30)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "create_connection", never)
        client = http1.Client("http://127.0.0.1:9", 1, timeout=5, connect_timeout=0.05)
        with pytest.raises(http1.ConnectFailed, match="timed out"):
            await client.request("POST", "/orders", body=b"{}")

    asyncio.run(main())


def test_a_deadline_passed_says_whether_the_request_was_written() -> None:
    caught: list[http1.RequestTimeout] = []

    async def silent(_: bytes, __: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1)

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=0.1)
        first = asyncio.ensure_future(client.request("POST", "/", body=b"{}"))
        await asyncio.sleep(0.02)
        # The only connection is taken: this one times out before a byte of it is written.
        for call in (client.request("POST", "/", body=b"{}", timeout=0.05), first):
            with pytest.raises(http1.RequestTimeout) as timeout:
                await call
            caught.append(timeout.value)
        await client.close()

    server = run_against(silent, scenario)
    assert [t.written for t in caught] == [False, True]
    assert len(server.requests) == 1


def test_closing_the_client_fails_waiting_and_later_requests_at_once_unsent() -> None:
    failed: list[http1.UpstreamError] = []

    async def slow(_: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(answer(201))

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        first = asyncio.ensure_future(client.request("POST", "/", body=b"{}"))
        await asyncio.sleep(0.05)
        # The only connection is taken: this one waits for it.
        waiting = asyncio.ensure_future(client.request("POST", "/", body=b"{}"))
        await asyncio.sleep(0.05)
        await client.close()
        await asyncio.sleep(0)
        assert waiting.done() and not first.done()  # failed at once, not at its deadline
        for call in (waiting, client.request("GET", "/")):
            with pytest.raises(http1.ConnectFailed, match="closed") as error:
                await call
            failed.append(error.value)
        assert (await first).status == 201  # the request in flight still gets its answer

    server = run_against(slow, scenario)
    assert len(failed) == 2
    assert len(server.requests) == 1


def test_an_answer_nobody_asked_for_is_never_taken_for_the_next_ones() -> None:
    async def answers_twice(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(201, b'{"n":1}'))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(201, b'{"n":"stray"}'))  # arrives while the connection is idle

    bodies: list[bytes] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        for _ in range(2):
            bodies.append((await client.request("POST", "/", body=b"{}")).body)
            await asyncio.sleep(0.1)
        await client.close()

    server = run_against(answers_twice, scenario)
    assert bodies == [b'{"n":1}', b'{"n":1}']
    assert server.connections == 2  # the connection that spoke out of turn was dropped


def test_a_second_answer_in_the_same_read_is_never_taken_for_the_next_request() -> None:
    async def answers_twice_at_once(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(201, b'{"n":1}') + answer(201, b'{"n":"stray"}'))

    bodies: list[bytes] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        for _ in range(2):
            bodies.append((await client.request("POST", "/", body=b"{}")).body)
        await client.close()

    server = run_against(answers_twice_at_once, scenario)
    assert bodies == [b'{"n":1}', b'{"n":1}']
    assert server.connections == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",  # and then the server closes the connection
    ],
    ids=["switching-protocols", "interim-then-closed"],
)
def test_no_final_answer_is_a_lost_connection_not_an_answer(raw: bytes) -> None:
    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        with pytest.raises(http1.ConnectionLost):
            await client.request("POST", "/", body=b"{}")
        await client.close()

    async def respond(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    run_against(respond, scenario)


def test_an_answers_headers_come_back_in_order_with_every_repeat() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nLink: <a>\r\nContent-Type: application/json\r\nLink: <b>\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )

    async def respond(_: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    got: list[http1.Response] = []

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        got.append(await client.request("POST", "/", body=b"{}"))
        await client.close()

    run_against(respond, scenario)
    [response] = got
    assert response.status == 200
    assert response.body == b"{}"
    assert [(n, v) for n, v in response.headers if n == b"Link"] == [
        (b"Link", b"<a>"),
        (b"Link", b"<b>"),
    ]


def test_a_budget_header_says_the_time_left_when_the_request_goes_out() -> None:
    # One connection, held 0.5 s by the first request: the second waits for it, and its budget
    # (what is left of its 5 s when it is sent) says so; a request without it carries none.
    received: list[bytes] = []

    async def respond(request: bytes, writer: asyncio.StreamWriter) -> None:
        received.append(request)
        await asyncio.sleep(0.5 if len(received) == 1 else 0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async def scenario(server: Server) -> None:
        client = http1.Client(f"http://127.0.0.1:{server.port}", 1, timeout=5)
        first = asyncio.create_task(client.request("POST", "/first", body=b"{}"))
        await asyncio.sleep(0.05)
        await client.request("POST", "/second", body=b"{}", budget_header=b"X-Budget-Ms")
        await first
        await client.close()

    run_against(respond, scenario)
    first, second = received
    assert b"X-Budget-Ms" not in first
    [line] = [h for h in second.split(b"\r\n") if h.startswith(b"X-Budget-Ms: ")]
    left = int(line.split(b": ")[1])
    assert 0 <= left <= 4600  # 5 s less the wait for the connection (0.45 s at least)
