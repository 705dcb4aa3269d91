"""The gateway's proxy against fake services: what it forwards, what it passes back, when it
retries.

Each service is replaced by a `FakeService`: a real HTTP/1.1 server on a free loopback port (in
a background thread) that records every request it receives, byte for byte, and answers as the
test scripts it; a service that cannot be reached is a port where nothing listens. The
integration tests run the same gateway against the real services."""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from services.common.api import Call
from services.common.config import Config
from services.common.http1 import ConnectFailed, ConnectionLost, RequestTimeout
from services.gateway import proxy
from services.gateway.app import create_app

USER = "0190f7a4-5b6c-7d8e-9f00-112233445566"
ORDER = "0190f7a4-5b6c-7d8e-9f00-aabbccddeeff"
ORDER_BODY = {"user_id": USER, "amount": 500, "description": "Книга «Дюна»"}
# The gateway's total timeout in these tests; a `slow` service answers long after it.
HTTP_TIMEOUT = 0.5
SLOW = 30.0


# --- Fake services -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One scripted answer of a fake service."""

    status: int = 200
    body: bytes = b"{}"
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),)
    # Seconds to wait before answering: past the gateway's timeout, a hung service.
    delay: float = 0.0
    # Close the connection, once the whole request is read, instead of answering.
    drop: bool = False
    # The answer's octets exactly (instead of status, headers and body), then the connection
    # is closed: a chunked body, or one that ends with the connection.
    raw: bytes = b""


def status(code: int, body: object = None, *headers: tuple[str, str], delay: float = 0.0) -> Reply:
    """A JSON answer (`{}` without a body) with these extra headers, repeats allowed."""
    encoded = json.dumps(body if body is not None else {}).encode()
    return Reply(code, encoded, (("Content-Type", "application/json"), *headers), delay)


def slow(then: Reply | None = None) -> Reply:
    """An answer that comes long after the gateway has given up."""
    return replace(then or status(200), delay=SLOW)


def dropped() -> Reply:
    """No answer: the connection is closed after the request was received."""
    return Reply(drop=True)


@dataclass(frozen=True)
class Received:
    """A request as it arrived at a fake service."""

    method: str
    target: str
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    # The gateway's end of the TCP connection: tells one pooled connection from another.
    peer: tuple[str, int]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))

    def header(self, name: str) -> list[bytes]:
        """Every value of header `name`, as the octets that arrived."""
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == wanted]


class FakeService:
    """A real HTTP/1.1 server on a free loopback port, in its own thread and event loop, while
    used as a context manager: answers with `replies` in turn (the last one repeats) and records
    every request it receives in `received`."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies) or [status(200)]
        self.received: list[Received] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def __enter__(self) -> FakeService:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connected, sock=sock), self._loop
        ).result(timeout=5)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._connections:
            task.cancel()  # a `slow` answer is still waiting
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def _next_reply(self) -> Reply:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway closed the connection (it gave up waiting, or shut down)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        while True:  # keep-alive: one request after another on this connection
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # closed between requests
            request_line, *lines = head[:-4].split(b"\r\n")
            method, target, _ = request_line.decode("latin-1").split(" ")
            headers = [(name, value.strip()) for name, value in (ln.split(b":", 1) for ln in lines)]
            assert not any(name.lower() == b"transfer-encoding" for name, _ in headers)
            length = next((int(v) for k, v in headers if k.lower() == b"content-length"), 0)
            body = await reader.readexactly(length)
            self.received.append(Received(method, target, headers, body, peer))
            reply = self._next_reply()
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.drop:
                return
            if reply.raw:
                writer.write(reply.raw)
                await writer.drain()
                return
            answer = _encode(reply)
            if method == "HEAD":  # the head alone, declaring the body a GET would get
                answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            writer.write(answer)
            await writer.drain()


def _encode(reply: Reply) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines.append(f"Content-Length: {len(reply.body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + reply.body


def closed_port() -> str:
    """A loopback URL where nothing listens: opening a connection is refused at once."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def upstream_attempts(client: TestClient, service: str, outcome: str) -> float:
    """The gateway's `gateway_upstream_attempts_total` for `service` and `outcome`."""
    prefix = f'gateway_upstream_attempts_total{{outcome="{outcome}",service="{service}"}} '
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix))


# --- The gateway in front of them --------------------------------------------------------------

Gateway = Callable[..., TestClient]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    """`gateway(orders=..., payments=...)`: a running gateway whose services are these fakes
    (started here; a fresh one answering 200 for a service not given) or URLs."""
    with ExitStack() as stack:

        def start(
            orders: FakeService | str | None = None,
            payments: FakeService | str | None = None,
            max_in_flight: int = 128,
        ) -> TestClient:
            urls = []
            for service in (orders, payments):
                if not isinstance(service, str):
                    service = stack.enter_context(service or FakeService()).url
                urls.append(service)
            config = Config(
                orders_url=urls[0],
                payments_url=urls[1] + "/",
                http_timeout=HTTP_TIMEOUT,
                gateway_max_in_flight=max_in_flight,
            )
            return stack.enter_context(TestClient(create_app(config)))

        yield start


# --- What is forwarded -------------------------------------------------------------------------


def test_a_request_is_forwarded_with_its_method_path_query_body_and_request_id(
    gateway: Gateway,
) -> None:
    orders = FakeService(status(201, {"id": ORDER}))
    payments = FakeService()
    client = gateway(orders, payments)

    answer = client.post(
        "/orders/create?ignored=1", json=ORDER_BODY, headers={"X-Request-ID": "req-42"}
    )

    assert answer.status_code == 201
    [sent] = orders.received
    assert sent.method == "POST"
    assert sent.target == "/orders/create"
    assert sent.header("x-request-id") == [b"req-42"]
    assert sent.header("content-type") == [b"application/json"]
    assert json.loads(sent.body) == ORDER_BODY
    assert payments.received == []
    # A write says how long the gateway still waits (the service gives up on it in time).
    [budget] = sent.header("x-request-budget-ms")
    assert 0 < int(budget) <= 5000


def test_a_read_carries_no_budget(gateway: Gateway) -> None:
    orders = FakeService(status(200, []))
    client = gateway(orders, FakeService())

    assert client.get("/orders").status_code == 200
    [sent] = orders.received
    assert sent.header("x-request-budget-ms") == []


def test_declared_query_parameters_are_forwarded_and_undeclared_ones_dropped(
    gateway: Gateway,
) -> None:
    orders = FakeService(status(200, []))
    client = gateway(orders)

    client.get("/orders", params={"user_id": USER, "limit": "5", "status": "new", "debug": "1"})

    [sent] = orders.received
    assert sent.path == "/orders"
    assert sent.query == {"user_id": USER, "limit": "5", "status": "new"}


def test_ids_in_the_path_are_forwarded_in_canonical_form(gateway: Gateway) -> None:
    orders = FakeService()
    payments = FakeService(status(200, {"account_id": USER, "balance": 0}))
    client = gateway(orders, payments)

    client.get(f"/accounts/{USER.upper()}/balance")

    [sent] = payments.received
    assert sent.target == f"/accounts/{USER}/balance"
    assert orders.received == []


def test_a_bodyless_account_creation_is_forwarded_without_a_body(gateway: Gateway) -> None:
    payments = FakeService(status(201, {}))
    client = gateway(payments=payments)

    client.post("/accounts/create")

    [sent] = payments.received
    assert sent.method == "POST"
    assert sent.body == b""
    assert sent.header("content-type") == []


def test_an_ascii_request_id_is_forwarded_byte_for_byte(gateway: Gateway) -> None:
    orders = FakeService(status(200, []))
    client = gateway(orders)

    answer = client.get("/orders", headers={"X-Request-ID": "Root=1-5f84c7a5;Parent=53995c3f"})

    [sent] = orders.received
    assert sent.header("x-request-id") == [b"Root=1-5f84c7a5;Parent=53995c3f"]
    assert answer.headers["x-request-id"] == "Root=1-5f84c7a5;Parent=53995c3f"


def test_a_request_id_beyond_ascii_reaches_the_service_octet_for_octet() -> None:
    # The id arrives as the Latin-1 text of the client's octets, and leaves as those octets.
    # Driven without the test client, which cannot send such a header; a call with no route
    # takes the request's own path.
    scope = {"type": "http", "method": "GET", "path": "/orders", "headers": [], "state": {}}
    request = Request({**scope, "query_string": b""})
    request.state.request_id = "café"
    call = Call(request=request, body=None, path={}, query={"limit": 5})
    gateway = proxy.Proxy(Config(http_timeout=HTTP_TIMEOUT), CollectorRegistry())

    async def forward(base: str) -> Response:
        async with gateway.running():
            return await gateway.forward("orders", base, call)

    with FakeService(status(200, [])) as orders:
        answer = asyncio.run(forward(orders.url))

    assert answer.status_code == 200
    [sent] = orders.received
    assert sent.target == "/orders?limit=5"
    assert sent.header("x-request-id") == ["café".encode("latin-1")]


def test_no_proxy_from_the_environment_stands_between_gateway_and_services(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = closed_port()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    orders = FakeService(status(200, []))
    client = gateway(orders)

    assert client.get("/orders").status_code == 200
    assert len(orders.received) == 1


def test_requests_reuse_a_pooled_connection(gateway: Gateway) -> None:
    orders = FakeService(status(200, []))
    client = gateway(orders)

    for _ in range(3):
        assert client.get("/orders").status_code == 200

    assert len(orders.received) == 3
    assert len({sent.peer for sent in orders.received}) == 1


def test_a_query_value_reaches_the_service_exactly(gateway: Gateway) -> None:
    orders = FakeService(status(200, []))
    client = gateway(orders)
    cursor = "a b+c/d&e=f?g#h%20é"

    client.get("/orders", params={"user_id": USER, "cursor": cursor})

    [sent] = orders.received
    assert sent.query == {"user_id": USER, "cursor": cursor}
    assert sent.target.isascii()


def test_a_head_request_gets_the_heads_answer_and_the_next_request_a_sound_connection(
    gateway: Gateway,
) -> None:
    orders = FakeService(status(200, [{"id": ORDER}], ("X-Next-Cursor", "abc")))
    client = gateway(orders)

    head = client.head("/orders")
    after = client.get("/orders")

    assert [sent.method for sent in orders.received] == ["HEAD", "GET"]
    assert head.status_code == 200
    assert head.headers["x-next-cursor"] == "abc"
    assert head.content == b""
    assert after.status_code == 200
    assert after.json() == [{"id": ORDER}]


# --- What is passed back -----------------------------------------------------------------------


def test_the_services_answer_is_passed_back_with_its_meaningful_headers(gateway: Gateway) -> None:
    orders = FakeService(
        status(
            200,
            [{"id": ORDER}],
            ("Link", '</orders?cursor=abc>; rel="next"'),
            ("X-Next-Cursor", "abc"),
            ("Set-Cookie", "a=b"),
            ("X-Internal", "secret"),
            ("X-Request-ID", "the-service-s-copy"),
        )
    )
    client = gateway(orders)

    answer = client.get("/orders", headers={"X-Request-ID": "req-7"})

    assert answer.status_code == 200
    assert answer.json() == [{"id": ORDER}]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-next-cursor"] == "abc"
    assert answer.headers["link"] == '</orders?cursor=abc>; rel="next"'
    assert answer.headers.get_list("x-request-id") == ["req-7"]
    assert "set-cookie" not in answer.headers
    assert "x-internal" not in answer.headers


def test_every_value_of_a_repeated_header_is_passed_back_in_order(gateway: Gateway) -> None:
    orders = FakeService(
        status(
            200, [], ("Link", '</orders?cursor=b>; rel="next"'), ("Link", "</orders>; rel=first")
        )
    )
    client = gateway(orders)

    answer = client.get("/orders")

    assert answer.headers.get_list("link") == [
        '</orders?cursor=b>; rel="next"',
        "</orders>; rel=first",
    ]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n[{"id\r\n8\r\n": "x"}]\r\n0\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        b'[{"id": "x"}]',
    ],
    ids=["chunked", "ended-by-close"],
)
def test_a_body_without_content_length_is_passed_back_whole(gateway: Gateway, raw: bytes) -> None:
    orders = FakeService(Reply(raw=raw), status(200, []))
    client = gateway(orders)

    answer = client.get("/orders")
    after = client.get("/orders")  # on a new connection: the first one was closed

    assert answer.status_code == 200
    assert answer.json() == [{"id": "x"}]
    assert after.json() == []
    assert len({sent.peer for sent in orders.received}) == 2


def test_an_error_answer_is_passed_back_unchanged(gateway: Gateway) -> None:
    problem = {"type": "/problems/not-found", "title": "Order not found", "status": 404}
    orders = FakeService(
        Reply(404, json.dumps(problem).encode(), (("Content-Type", "application/problem+json"),))
    )
    client = gateway(orders)

    answer = client.get(f"/order/{ORDER}")

    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json() == problem


def test_a_redirect_is_passed_back_not_followed(gateway: Gateway) -> None:
    orders = FakeService(status(302, {}, ("Location", "/orders?user_id=elsewhere")), status(200))
    client = gateway(orders)

    answer = client.get(f"/orders/{ORDER}/status", follow_redirects=False)

    assert answer.status_code == 302
    assert answer.headers["location"] == "/orders?user_id=elsewhere"
    assert len(orders.received) == 1


def test_a_cookie_one_answer_sets_is_never_sent_with_another_request(gateway: Gateway) -> None:
    # By name: a cookie jar would ignore cookies from an IP address.
    with FakeService(status(200, [], ("Set-Cookie", "session=alice; Path=/"))) as orders:
        client = gateway(orders.url.replace("127.0.0.1", "localhost"))

        client.get("/orders")
        client.get("/orders")

    assert len(orders.received) == 2
    assert [sent.header("cookie") for sent in orders.received] == [[], []]


def test_an_invalid_request_is_answered_by_the_gateway_and_never_reaches_a_service(
    gateway: Gateway,
) -> None:
    orders, payments = FakeService(status(201, {})), FakeService(status(201, {}))
    client = gateway(orders, payments)

    answers = [
        client.post("/orders/create", json={**ORDER_BODY, "amount": 1.5}),
        client.post("/orders/create", content=b"{", headers={"Content-Type": "application/json"}),
        client.post("/accounts/top_up", content=b"amount=1"),
        client.get("/order/not-a-uuid"),
    ]

    assert [a.status_code for a in answers] == [422, 400, 415, 422]
    assert orders.received == []
    assert payments.received == []


# --- Retries and failures ----------------------------------------------------------------------


def test_a_get_is_retried_when_the_service_answers_503(gateway: Gateway) -> None:
    orders = FakeService(status(503), status(503), status(200, {"id": ORDER, "status": "new"}))
    client = gateway(orders)

    answer = client.get(f"/orders/{ORDER}/status")

    assert answer.status_code == 200
    assert answer.json() == {"id": ORDER, "status": "new"}
    assert len(orders.received) == 3


def test_a_get_gives_up_after_three_attempts_and_passes_the_last_answer_back(
    gateway: Gateway,
) -> None:
    orders = FakeService(status(503, {"title": "Service unavailable"}, ("Retry-After", "3")))
    client = gateway(orders)

    answer = client.get(f"/orders/{ORDER}/status")

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "3"
    assert answer.json() == {"title": "Service unavailable"}
    assert len(orders.received) == proxy.ATTEMPTS


def test_a_get_is_retried_after_a_timeout(gateway: Gateway) -> None:
    orders = FakeService(slow(), status(200, []))
    client = gateway(orders)

    assert client.get("/orders").status_code == 200
    assert len(orders.received) == 2


def test_a_get_is_retried_when_the_connection_drops(gateway: Gateway) -> None:
    orders = FakeService(dropped(), status(200, []))
    client = gateway(orders)

    assert client.get("/orders").status_code == 200
    assert len(orders.received) == 2


def test_past_the_in_flight_limit_a_request_is_refused_at_once_and_never_forwarded(
    gateway: Gateway,
) -> None:
    orders = FakeService(status(201, {}, delay=0.3), status(201, {}))
    client = gateway(orders, max_in_flight=1)
    first: list[int] = []
    holder = threading.Thread(
        target=lambda: first.append(client.post("/orders/create", json=ORDER_BODY).status_code)
    )
    holder.start()
    deadline = time.monotonic() + 5
    while not orders.received and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first request is with the service

    refused = client.post("/orders/create", json=ORDER_BODY)
    holder.join(timeout=10)

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "capacity" in refused.json()["detail"]
    assert first == [201]
    assert len(orders.received) == 1  # the refused request never reached the service
    assert upstream_attempts(client, "orders", "shed") == 1
    # Once the first has answered, there is room again.
    assert client.post("/orders/create", json=ORDER_BODY).status_code == 201


def test_a_post_is_not_retried_after_a_timeout_because_it_may_have_been_applied(
    gateway: Gateway,
) -> None:
    orders = FakeService(slow(status(201, {})), status(201, {}))
    client = gateway(orders)

    answer = client.post("/orders/create", json=ORDER_BODY)

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert len(orders.received) == 1
    assert upstream_attempts(client, "orders", "RequestTimeout") == 1


def test_a_post_is_not_retried_when_the_connection_drops_after_it_was_sent(
    gateway: Gateway,
) -> None:
    orders = FakeService(dropped(), status(201, {}))
    client = gateway(orders)

    answer = client.post("/orders/create", json=ORDER_BODY)

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert len(orders.received) == 1


def test_a_post_is_not_retried_when_the_service_answers_503(gateway: Gateway) -> None:
    payments = FakeService(status(503), status(201, {}))
    client = gateway(payments=payments)

    answer = client.post("/accounts/create")

    assert answer.status_code == 503
    assert len(payments.received) == 1


def test_a_post_whose_connection_could_not_be_opened_is_tried_again(gateway: Gateway) -> None:
    client = gateway(orders=closed_port())

    answer = client.post("/orders/create", json=ORDER_BODY)

    assert answer.status_code == 503
    assert upstream_attempts(client, "orders", "ConnectFailed") == proxy.ATTEMPTS


def test_an_unreachable_service_answers_503_problem_with_retry_after(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    client = gateway(payments=closed_port())

    with caplog.at_level(logging.WARNING, logger=proxy.__name__):
        answer = client.get(
            "/accounts/balance", params={"user_id": USER}, headers={"X-Request-ID": "req-9"}
        )

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == "/problems/unavailable"
    assert "payments" in problem["detail"]
    assert upstream_attempts(client, "payments", "ConnectFailed") == proxy.ATTEMPTS
    [logged] = [r.getMessage() for r in caplog.records if r.name == proxy.__name__]
    assert "GET /accounts/balance -> payments failed: ConnectFailed" in logged
    assert "request_id=req-9" in logged


@pytest.mark.parametrize(
    ("method", "error", "retried"),
    [
        ("GET", ConnectFailed("refused"), True),
        ("GET", RequestTimeout(written=True), True),
        ("GET", RequestTimeout(written=False), True),
        ("GET", ConnectionLost("closed by the server"), True),
        ("POST", ConnectFailed("refused"), True),
        ("POST", RequestTimeout(written=True), False),
        # Unsent, but the whole deadline is spent: the client is told at once, and decides.
        ("POST", RequestTimeout(written=False), False),
        ("POST", ConnectionLost("closed by the server"), False),
        ("POST", ConnectionLost("unreadable answer"), False),
        ("POST", TimeoutError(), False),
        ("GET", ValueError("a bug"), False),
    ],
)
def test_only_requests_that_cannot_take_effect_twice_are_retried(
    method: str, error: BaseException, retried: bool
) -> None:
    assert proxy.may_retry(method, error) is retried


def test_a_retryable_answer_is_retried_only_for_idempotent_methods() -> None:
    unavailable = proxy.RetryableAnswer(proxy.Answer(503, b""))
    assert proxy.may_retry("GET", unavailable)
    assert not proxy.may_retry("POST", unavailable)


def test_bodies_are_encoded_as_utf8_json_and_any_string_survives() -> None:
    plain = {"description": "é 😀", "amount": 10**15}
    assert proxy.encode_body(plain) == '{"description":"é 😀","amount":1000000000000000}'.encode()
    # A lone surrogate has no UTF-8 form: that body goes in ASCII escapes.
    body = {"description": "é\ud800", "amount": 10**15}
    encoded = proxy.encode_body(body)
    assert encoded is not None
    assert encoded.isascii()
    assert json.loads(encoded) == body
    assert proxy.encode_body(None) is None
