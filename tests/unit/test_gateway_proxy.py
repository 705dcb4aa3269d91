"""The gateway's proxy without a network: what it forwards, what it passes back, when it retries.

The services are replaced by an `httpx.MockTransport` that records every request it is sent;
the integration tests run the same gateway against the real services."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from starlette.requests import Request
from starlette.testclient import TestClient

from services.common.api import Call
from services.common.config import Config
from services.gateway import proxy
from services.gateway.app import create_app

ORDERS = "http://orders.test"
PAYMENTS = "http://payments.test"
USER = "0190f7a4-5b6c-7d8e-9f00-112233445566"
ORDER = "0190f7a4-5b6c-7d8e-9f00-aabbccddeeff"
ORDER_BODY = {"user_id": USER, "amount": 500, "description": "Книга «Дюна»"}

Answer = Callable[[httpx.Request], httpx.Response]


class Services:
    """Stands in for the network: answers with `answers` in turn (the last one repeats) and
    records what it was sent."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request)


def status(code: int, body: object = None, **headers: str) -> Answer:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json=body if body is not None else {}, headers=headers)

    return answer


def fail(error: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return answer


@pytest.fixture
def gateway() -> Iterator[Callable[[Services], TestClient]]:
    clients: list[TestClient] = []

    def start(services: Services) -> TestClient:
        config = Config(orders_url=ORDERS, payments_url=PAYMENTS + "/", http_timeout=1)
        client = TestClient(create_app(config, transport=httpx.MockTransport(services)))
        clients.append(client.__enter__())
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_a_request_is_forwarded_with_its_method_path_query_body_and_request_id(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(201, {"id": ORDER}))
    client = gateway(services)

    answer = client.post(
        "/orders/create?ignored=1", json=ORDER_BODY, headers={"X-Request-ID": "req-42"}
    )

    assert answer.status_code == 201
    [sent] = services.sent
    assert sent.method == "POST"
    assert str(sent.url) == f"{ORDERS}/orders/create"
    assert sent.headers["x-request-id"] == "req-42"
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.content) == ORDER_BODY


def test_declared_query_parameters_are_forwarded_and_undeclared_ones_dropped(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(200, []))
    client = gateway(services)

    client.get("/orders", params={"user_id": USER, "limit": "5", "status": "new", "debug": "1"})

    [sent] = services.sent
    assert sent.url.path == "/orders"
    assert dict(sent.url.params) == {"user_id": USER, "limit": "5", "status": "new"}


def test_ids_in_the_path_are_forwarded_in_canonical_form(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(200, {"account_id": USER, "balance": 0}))
    client = gateway(services)

    client.get(f"/accounts/{USER.upper()}/balance")

    [sent] = services.sent
    assert str(sent.url) == f"{PAYMENTS}/accounts/{USER}/balance"


def test_a_bodyless_account_creation_is_forwarded_without_a_body(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(201, {}))
    client = gateway(services)

    client.post("/accounts/create")

    [sent] = services.sent
    assert sent.content == b""
    assert "content-type" not in sent.headers


def test_the_services_answer_is_passed_back_with_its_meaningful_headers(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(
        status(
            200,
            [{"id": ORDER}],
            Link='</orders?cursor=abc>; rel="next"',
            **{"X-Next-Cursor": "abc", "Set-Cookie": "a=b", "X-Internal": "secret"},
        )
    )
    client = gateway(services)

    answer = client.get("/orders", headers={"X-Request-ID": "req-7"})

    assert answer.status_code == 200
    assert answer.json() == [{"id": ORDER}]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-next-cursor"] == "abc"
    assert answer.headers["link"] == '</orders?cursor=abc>; rel="next"'
    assert answer.headers.get_list("x-request-id") == ["req-7"]
    assert "set-cookie" not in answer.headers
    assert "x-internal" not in answer.headers


def test_an_error_answer_is_passed_back_unchanged(
    gateway: Callable[[Services], TestClient],
) -> None:
    problem = {"type": "/problems/not-found", "title": "Order not found", "status": 404}
    services = Services(
        lambda _: httpx.Response(
            404, json=problem, headers={"Content-Type": "application/problem+json"}
        )
    )
    client = gateway(services)

    answer = client.get(f"/order/{ORDER}")

    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json() == problem


def test_an_invalid_request_is_answered_by_the_gateway_and_never_reaches_a_service(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(201, {}))
    client = gateway(services)

    answers = [
        client.post("/orders/create", json={**ORDER_BODY, "amount": 1.5}),
        client.post("/orders/create", content=b"{", headers={"Content-Type": "application/json"}),
        client.post("/accounts/top_up", content=b"amount=1"),
        client.get("/order/not-a-uuid"),
    ]

    assert [a.status_code for a in answers] == [422, 400, 415, 422]
    assert services.sent == []


def test_a_get_is_retried_when_the_service_answers_503(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(503), status(503), status(200, {"id": ORDER, "status": "new"}))
    client = gateway(services)

    answer = client.get(f"/orders/{ORDER}/status")

    assert answer.status_code == 200
    assert len(services.sent) == 3


def test_a_get_gives_up_after_three_attempts_and_passes_the_last_answer_back(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(503, {"title": "Service unavailable"}, **{"Retry-After": "3"}))
    client = gateway(services)

    answer = client.get(f"/orders/{ORDER}/status")

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "3"
    assert len(services.sent) == proxy.ATTEMPTS


def test_a_get_is_retried_after_a_timeout(gateway: Callable[[Services], TestClient]) -> None:
    services = Services(fail(httpx.ReadTimeout), status(200, []))
    client = gateway(services)

    assert client.get("/orders").status_code == 200
    assert len(services.sent) == 2


def test_a_post_is_not_retried_after_a_timeout_because_it_may_have_been_applied(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(fail(httpx.ReadTimeout), status(201, {}))
    client = gateway(services)

    answer = client.post("/orders/create", json=ORDER_BODY)

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert len(services.sent) == 1


def test_a_post_is_not_retried_when_the_service_answers_503(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(status(503), status(201, {}))
    client = gateway(services)

    answer = client.post("/accounts/create")

    assert answer.status_code == 503
    assert len(services.sent) == 1


def test_a_post_whose_connection_could_not_be_opened_is_tried_again(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(fail(httpx.ConnectError), status(201, {"id": ORDER}))
    client = gateway(services)

    answer = client.post("/orders/create", json=ORDER_BODY)

    assert answer.status_code == 201
    assert len(services.sent) == 2


def test_an_unreachable_service_answers_503_problem_with_retry_after(
    gateway: Callable[[Services], TestClient],
) -> None:
    services = Services(fail(httpx.ConnectError))
    client = gateway(services)

    answer = client.get("/accounts/balance", params={"user_id": USER})

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == "/problems/unavailable"
    assert "payments" in problem["detail"]
    assert len(services.sent) == proxy.ATTEMPTS


@pytest.mark.parametrize(
    ("method", "error", "retried"),
    [
        ("GET", httpx.ConnectError("refused"), True),
        ("GET", httpx.ReadTimeout("slow"), True),
        ("GET", httpx.RemoteProtocolError("dropped"), True),
        ("POST", httpx.ConnectError("refused"), True),
        ("POST", httpx.ConnectTimeout("slow to connect"), True),
        ("POST", httpx.ReadTimeout("slow"), False),
        ("POST", httpx.RemoteProtocolError("dropped"), False),
        ("POST", httpx.PoolTimeout("busy"), False),
        ("GET", ValueError("a bug"), False),
    ],
)
def test_only_requests_that_cannot_take_effect_twice_are_retried(
    method: str, error: BaseException, retried: bool
) -> None:
    assert proxy.may_retry(method, error) is retried


def test_a_retryable_answer_is_retried_only_for_idempotent_methods() -> None:
    unavailable = proxy.RetryableAnswer(httpx.Response(503))
    assert proxy.may_retry("GET", unavailable)
    assert not proxy.may_retry("POST", unavailable)


def test_bodies_are_encoded_as_ascii_json_so_any_string_survives() -> None:
    body = {"description": "é\ud800", "amount": 10**15}
    encoded = proxy.encode_body(body)
    assert encoded is not None
    assert encoded.isascii()
    assert json.loads(encoded) == body
    assert proxy.encode_body(None) is None


def test_a_request_id_with_latin_1_octets_is_forwarded_byte_for_byte() -> None:
    request = Request(
        {"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}},
    )
    request.state.request_id = "café"
    call = Call(request=request, body=None, path={}, query={})

    headers = httpx.Headers(proxy.downstream_headers(call))

    assert headers.raw == [(b"X-Request-ID", "café".encode("latin-1"))]
