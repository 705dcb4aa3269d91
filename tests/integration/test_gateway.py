"""The gateway in front of the REAL Orders and Payments services: each served by uvicorn on a free
port, each on its own fresh database. Every route and alias, every row of the contract's error
table, request ids end to end, and what a client sees while a service is down or silent."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.config import Config
from services.gateway.app import TITLE, create_app
from services.orders import app as orders_app
from services.payments import app as payments_app
from tests.serving import serving

PROBLEM_JSON = "application/problem+json"
MISSING_ID = "0190f7a4-5b6c-7d8e-9f00-0000000000ff"
CANONICAL_PATHS = {
    "/accounts/create",
    "/accounts/top_up",
    "/accounts/{account_id}/balance",
    "/orders/create",
    "/orders",
    "/orders/{order_id}/status",
}
ALIAS_PATHS = {"/accounts", "/accounts/{user_id}/deposit", "/accounts/balance", "/order/{order_id}"}


# --- Real servers ------------------------------------------------------------------------------


@dataclass
class Recorder:
    """A real service app, observed: notes the X-Request-ID of every request it receives."""

    app: ASGIApp
    request_ids: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.request_ids.append(dict(scope["headers"]).get(b"x-request-id", b"").decode())
        await self.app(scope, receive, send)


@contextmanager
def closed_port() -> Iterator[str]:
    """A loopback URL where nothing listens: connecting is refused at once."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextmanager
def silent_port() -> Iterator[str]:
    """A loopback URL that accepts connections and never answers: a hung service."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # the kernel completes handshakes; nobody ever reads
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass(frozen=True)
class Services:
    orders_url: str
    payments_url: str
    orders: Recorder
    payments: Recorder


@pytest.fixture
def services(orders_url: str, payments_url: str) -> Iterator[Services]:
    """Orders and Payments, real, each on its fresh test database."""
    config = Config(
        orders_database_url=orders_url,
        payments_database_url=payments_url,
        kafka_topic_prefix="test-gateway.",
    )
    orders = Recorder(orders_app.create_app(config))
    payments = Recorder(payments_app.create_app(config))
    with serving(orders) as orders_base, serving(payments) as payments_base:
        yield Services(orders_base, payments_base, orders, payments)


@pytest.fixture
def gateway(services: Services) -> Iterator[TestClient]:
    config = Config(orders_url=services.orders_url, payments_url=services.payments_url)
    with TestClient(create_app(config)) as client:
        yield client


# --- Helpers -----------------------------------------------------------------------------------


def open_account(gateway: TestClient, user_id: str | None = None) -> dict[str, Any]:
    response = gateway.post("/accounts/create", json={"user_id": user_id} if user_id else None)
    assert response.status_code == 201, response.text
    account: dict[str, Any] = response.json()
    return account


def create_order(gateway: TestClient, user_id: str, amount: int = 100) -> dict[str, Any]:
    body = {"user_id": user_id, "amount": amount, "description": f"order of {amount}"}
    response = gateway.post("/orders/create", json=body)
    assert response.status_code == 201, response.text
    order: dict[str, Any] = response.json()
    return order


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()
    return problem


@dataclass(frozen=True)
class State:
    orders: list[tuple[Any, ...]]
    orders_outbox: tuple[Any, ...] | None
    accounts: list[tuple[Any, ...]]
    ledger: tuple[Any, ...] | None


def state(orders_db: psycopg.Connection[Any], payments_db: psycopg.Connection[Any]) -> State:
    """Everything a request could change in either database."""
    return State(
        orders=orders_db.execute("SELECT id, status FROM orders ORDER BY id").fetchall(),
        orders_outbox=orders_db.execute("SELECT count(*), max(id) FROM outbox").fetchone(),
        accounts=payments_db.execute(
            "SELECT id, user_id, balance, updated_at FROM accounts ORDER BY id"
        ).fetchall(),
        ledger=payments_db.execute("SELECT count(*), max(id) FROM ledger").fetchone(),
    )


# --- Canonical routes and aliases --------------------------------------------------------------


def test_an_account_created_without_a_body_uses_its_id_as_the_user_id(
    gateway: TestClient,
) -> None:
    response = gateway.post("/accounts/create")

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    account = response.json()
    assert account.keys() == {"account_id", "user_id", "balance", "created_at"}
    assert account["user_id"] == account["account_id"]
    assert account["balance"] == 0


@pytest.mark.parametrize("path", ["/accounts/create", "/accounts"])
def test_an_account_is_created_for_a_named_user_on_both_routes(
    gateway: TestClient, path: str
) -> None:
    user_id = str(uuid.uuid4())

    response = gateway.post(path, json={"user_id": user_id})

    assert response.status_code == 201, response.text
    assert response.json()["user_id"] == user_id
    assert response.json()["account_id"] != user_id


def test_top_up_and_deposit_credit_the_account_and_both_balance_routes_show_it(
    gateway: TestClient,
) -> None:
    user_id = str(uuid.uuid4())
    account_id = open_account(gateway, user_id)["account_id"]

    topped = gateway.post("/accounts/top_up", json={"account_id": account_id, "amount": 700})
    deposited = gateway.post(f"/accounts/{user_id}/deposit", json={"amount": 300})
    named = gateway.post(f"/accounts/{user_id}/deposit", json={"amount": 5, "user_id": user_id})
    by_account = gateway.get(f"/accounts/{account_id}/balance")
    by_user = gateway.get("/accounts/balance", params={"user_id": user_id})

    assert topped.status_code == 200
    assert topped.json() == {"account_id": account_id, "balance": 700}
    assert deposited.status_code == 200
    assert deposited.json() == {"account_id": account_id, "user_id": user_id, "balance": 1000}
    assert named.json()["balance"] == 1005
    assert by_account.json() == {"account_id": account_id, "balance": 1005}
    assert by_user.json() == {"account_id": account_id, "user_id": user_id, "balance": 1005}


def test_a_deposit_naming_another_user_than_the_path_is_422(gateway: TestClient) -> None:
    user_id = open_account(gateway)["user_id"]

    response = gateway.post(
        f"/accounts/{user_id}/deposit", json={"amount": 5, "user_id": str(uuid.uuid4())}
    )

    assert_problem(response, 422)
    assert gateway.get("/accounts/balance", params={"user_id": user_id}).json()["balance"] == 0


@pytest.mark.parametrize("path", ["/orders/create", "/orders"])
def test_an_order_is_created_on_both_routes_and_read_back_through_its_location(
    gateway: TestClient, path: str
) -> None:
    user_id = str(uuid.uuid4())
    body = {"user_id": user_id, "amount": 2500, "description": "Книга «Дюна»"}

    created = gateway.post(path, json=body)

    assert created.status_code == 201, created.text
    order = created.json()
    assert order.keys() == {
        "id",
        "user_id",
        "amount",
        "description",
        "status",
        "reason",
        "created_at",
        "updated_at",
    }
    assert {k: order[k] for k in body} == body
    assert order["status"] == "new"
    assert created.headers["location"] == f"/order/{order['id']}"
    fetched = gateway.get(created.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == order
    status = gateway.get(f"/orders/{order['id']}/status")
    assert status.status_code == 200
    assert status.json() == {"id": order["id"], "status": "new"}


def test_orders_are_listed_newest_first_filtered_and_paged_by_cursor(gateway: TestClient) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alices = [create_order(gateway, alice, amount) for amount in range(1, 6)]
    create_order(gateway, bob)

    everyone = gateway.get("/orders")
    first = gateway.get("/orders", params={"user_id": alice, "status": "new", "limit": 2})

    assert everyone.status_code == 200
    assert len(everyone.json()) == 6
    assert first.status_code == 200
    assert [o["id"] for o in first.json()] == [o["id"] for o in reversed(alices)][:2]
    assert first.headers["x-next-cursor"]
    assert 'rel="next"' in first.headers["link"]
    # Follow the cursor header, then the Link URL, through the gateway until the last page.
    pages = [first.json()]
    second = gateway.get(
        "/orders",
        params={
            "user_id": alice,
            "status": "new",
            "limit": 2,
            "cursor": first.headers["x-next-cursor"],
        },
    )
    pages.append(second.json())
    link = second.headers["link"].split(";")[0].strip("<>")
    last = gateway.get(link)
    pages.append(last.json())
    assert "x-next-cursor" not in last.headers
    assert [o["id"] for page in pages for o in page] == [o["id"] for o in reversed(alices)]
    assert gateway.get("/orders", params={"status": "paid"}).json() == []


# --- The contract's error table ----------------------------------------------------------------

USER = "0190f7a4-0000-7d8e-9f00-aabbccddeeff"
BAD_AMOUNTS = ["0", "-1", "1.5", '"10"', "true", "null", "NaN", "1000000000000001"]


def raw(path: str, body: str, content_type: str = "application/json") -> tuple[str, str, str]:
    return path, body, content_type


BAD_REQUESTS: dict[str, tuple[int, tuple[str, str, str]]] = {
    "malformed JSON (top_up)": (400, raw("/accounts/top_up", '{"account_id": ')),
    "malformed JSON (order)": (400, raw("/orders/create", "{not json}")),
    # Whitespace is not an absent body: as JSON it is malformed (found by schemathesis).
    "whitespace as JSON (optional body)": (400, raw("/accounts/create", " ")),
    "whitespace as JSON (required body)": (400, raw("/orders/create", " \n")),
    "wrong content type": (
        415,
        raw("/orders/create", "user_id=1&amount=1", "application/x-www-form-urlencoded"),
    ),
    "body over 64 KiB": (
        413,
        raw(
            "/orders/create",
            json.dumps({"user_id": USER, "amount": 1, "description": "x" * (65 * 1024)}),
        ),
    ),
    "unknown field": (
        422,
        raw(
            "/orders/create", json.dumps({"user_id": USER, "amount": 1, "description": "", "x": 1})
        ),
    ),
    "description over 1000 characters": (
        422,
        raw(
            "/orders/create", json.dumps({"user_id": USER, "amount": 1, "description": "x" * 1001})
        ),
    ),
    "malformed uuid in the body": (
        422,
        raw("/orders/create", json.dumps({"user_id": "nope", "amount": 1, "description": ""})),
    ),
    "malformed uuid in an account body": (422, raw("/accounts", '{"user_id": "12345"}')),
    **{
        f"order amount {amount}": (
            422,
            raw(
                "/orders/create", f'{{"user_id": "{USER}", "amount": {amount}, "description": ""}}'
            ),
        )
        for amount in BAD_AMOUNTS
    },
    **{
        f"top-up amount {amount}": (
            422,
            raw("/accounts/top_up", f'{{"account_id": "{USER}", "amount": {amount}}}'),
        )
        for amount in BAD_AMOUNTS
    },
    "deposit amount 1.5": (422, raw(f"/accounts/{USER}/deposit", '{"amount": 1.5}')),
    "top-up of an unknown account": (
        404,
        raw("/accounts/top_up", json.dumps({"account_id": MISSING_ID, "amount": 1})),
    ),
    "deposit to an unknown user": (404, raw(f"/accounts/{MISSING_ID}/deposit", '{"amount": 1}')),
}


def test_every_bad_request_through_the_gateway_gets_its_problem_and_changes_nothing(
    gateway: TestClient,
    orders_db: psycopg.Connection[Any],
    payments_db: psycopg.Connection[Any],
    subtests: pytest.Subtests,
) -> None:
    account = open_account(gateway, USER)
    gateway.post("/accounts/top_up", json={"account_id": account["account_id"], "amount": 50})
    create_order(gateway, USER)

    for case, (status, (path, body, content_type)) in BAD_REQUESTS.items():
        with subtests.test(case):
            before = state(orders_db, payments_db)

            response = gateway.post(
                path, content=body.encode(), headers={"Content-Type": content_type}
            )

            problem = assert_problem(response, status)
            if status == 422:
                assert problem["errors"], problem
                assert all({"field", "message"} <= e.keys() for e in problem["errors"])
            assert state(orders_db, payments_db) == before


def test_a_malformed_uuid_in_a_path_is_422(gateway: TestClient, subtests: pytest.Subtests) -> None:
    for method, path in [
        ("GET", "/order/nope"),
        ("GET", "/orders/12345/status"),
        ("GET", "/accounts/not-a-uuid/balance"),
        ("GET", f"/accounts/{USER[:-1]}x/balance"),
        ("POST", "/accounts/nope/deposit"),
    ]:
        with subtests.test(f"{method} {path}"):
            response = gateway.request(
                method, path, json={"amount": 1} if method == "POST" else None
            )

            problem = assert_problem(response, 422)
            assert problem["errors"][0]["field"] in {"order_id", "account_id", "user_id"}


def test_an_unknown_order_or_account_is_404(gateway: TestClient, subtests: pytest.Subtests) -> None:
    for path in [
        f"/order/{MISSING_ID}",
        f"/orders/{MISSING_ID}/status",
        f"/accounts/{MISSING_ID}/balance",
        f"/accounts/balance?user_id={MISSING_ID}",
    ]:
        with subtests.test(path):
            assert_problem(gateway.get(path), 404)


def test_a_missing_or_malformed_query_parameter_is_422(gateway: TestClient) -> None:
    assert_problem(gateway.get("/accounts/balance"), 422)
    assert_problem(gateway.get("/accounts/balance", params={"user_id": "x"}), 422)
    assert_problem(gateway.get("/orders", params={"limit": "501"}), 422)
    assert_problem(gateway.get("/orders", params={"status": "lost"}), 422)
    assert_problem(gateway.get("/orders", params={"cursor": "not-a-cursor"}), 422)


@pytest.mark.parametrize("path", ["/accounts/create", "/accounts"])
def test_a_second_account_for_a_user_is_409_naming_the_existing_account(
    gateway: TestClient,
    orders_db: psycopg.Connection[Any],
    payments_db: psycopg.Connection[Any],
    path: str,
) -> None:
    user_id = str(uuid.uuid4())
    first = open_account(gateway, user_id)
    before = state(orders_db, payments_db)

    problem = assert_problem(gateway.post(path, json={"user_id": user_id}), 409)

    assert problem["account_id"] == first["account_id"]
    assert state(orders_db, payments_db) == before


# --- Request ids -------------------------------------------------------------------------------


def test_a_request_id_is_generated_when_absent_and_reaches_the_service(
    gateway: TestClient, services: Services
) -> None:
    response = gateway.post("/accounts/create")

    request_id = response.headers["x-request-id"]
    assert request_id
    assert response.headers.get_list("x-request-id") == [request_id]
    assert services.payments.request_ids[-1] == request_id


def test_a_given_request_id_is_echoed_and_forwarded(
    gateway: TestClient, services: Services
) -> None:
    ok = gateway.get("/orders", headers={"X-Request-ID": "trace-ok-1"})
    failed = gateway.get(f"/order/{MISSING_ID}", headers={"X-Request-ID": "trace-404-2"})

    assert ok.headers.get_list("x-request-id") == ["trace-ok-1"]
    assert failed.status_code == 404
    assert failed.headers.get_list("x-request-id") == ["trace-404-2"]
    assert services.orders.request_ids[-2:] == ["trace-ok-1", "trace-404-2"]


def test_a_request_the_gateway_rejects_still_carries_its_id_and_never_reaches_a_service(
    gateway: TestClient, services: Services
) -> None:
    seen = len(services.orders.request_ids)

    response = gateway.post("/orders/create", json={}, headers={"X-Request-ID": "trace-bad"})

    assert_problem(response, 422)
    assert response.headers["x-request-id"] == "trace-bad"
    assert len(services.orders.request_ids) == seen


# --- Idempotency keys --------------------------------------------------------------------------


def test_an_account_an_order_and_a_top_up_sent_again_with_keys_are_made_once_via_the_gateway(
    gateway: TestClient, orders_db: psycopg.Connection[Any], payments_db: psycopg.Connection[Any]
) -> None:
    opening = {"Idempotency-Key": str(uuid.uuid4())}
    opened = [gateway.post("/accounts/create", headers=opening) for _ in range(3)]
    assert [r.status_code for r in opened] == [201] * 3
    assert [r.headers.get("idempotent-replayed") for r in opened] == [None, "true", "true"]
    assert payments_db.execute("SELECT count(*) FROM accounts").fetchone() == (1,)
    user = opened[0].json()["user_id"]
    order = {"user_id": user, "amount": 40, "description": "once"}
    credit = {"account_id": user, "amount": 90}
    key = {"Idempotency-Key": str(uuid.uuid4())}

    orders = [gateway.post("/orders/create", json=order, headers=key) for _ in range(3)]
    credits = [gateway.post("/accounts/top_up", json=credit, headers=key) for _ in range(3)]

    assert [r.status_code for r in orders] == [201] * 3
    assert len({r.json()["id"] for r in orders}) == 1
    assert [r.headers.get("idempotent-replayed") for r in orders] == [None, "true", "true"]
    assert [r.json()["balance"] for r in credits] == [90] * 3
    assert [r.headers.get("idempotent-replayed") for r in credits] == [None, "true", "true"]
    assert orders_db.execute("SELECT count(*) FROM orders").fetchone() == (1,)
    assert payments_db.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
    reused = gateway.post("/orders/create", json=order | {"amount": 41}, headers=key)
    assert assert_problem(reused, 422)["type"] == "/problems/idempotency-key-reused"


def test_a_malformed_idempotency_key_is_refused_by_the_gateway(
    gateway: TestClient, services: Services
) -> None:
    seen = len(services.orders.request_ids)
    user = str(uuid.uuid4())
    body = {"user_id": user, "amount": 40, "description": "x"}

    response = gateway.post("/orders/create", json=body, headers={"Idempotency-Key": "a b"})

    problem = assert_problem(response, 422)
    assert [error["field"] for error in problem["errors"]] == ["Idempotency-Key"]
    assert len(services.orders.request_ids) == seen


# --- Services down or silent -------------------------------------------------------------------


def test_an_unreachable_service_answers_503_with_retry_after() -> None:
    with (
        closed_port() as nowhere,
        TestClient(create_app(Config(orders_url=nowhere, payments_url=nowhere))) as gateway,
    ):
        reads = [gateway.get("/orders"), gateway.get(f"/accounts/{MISSING_ID}/balance")]
        writes = [
            gateway.post("/orders/create", json={"user_id": USER, "amount": 1, "description": ""}),
            gateway.post("/accounts/create"),
        ]
        invalid = gateway.post("/accounts/top_up", json={"amount": 0})
        ready = gateway.get("/ready")
        health = gateway.get("/health")

    for response in reads + writes:
        problem = assert_problem(response, 503)
        assert response.headers["retry-after"] == "1"
        assert "unreachable" in problem["detail"]
    assert_problem(invalid, 422)  # validation needs no service
    assert ready.status_code == 503
    assert set(ready.json()["checks"]) == {"orders", "payments"}
    assert health.status_code == 200


def test_a_service_that_never_answers_gives_503_not_a_hang(services: Services) -> None:
    with (
        silent_port() as hung,
        TestClient(
            create_app(
                Config(orders_url=hung, payments_url=services.payments_url, http_timeout=0.3)
            )
        ) as gateway,
    ):
        read = gateway.get("/orders")
        write = gateway.post(
            "/orders/create", json={"user_id": USER, "amount": 1, "description": ""}
        )
        other_service = gateway.post("/accounts/create")
        ready = gateway.get("/ready")

    for response in (read, write):
        assert_problem(response, 503)
        assert response.headers["retry-after"] == "1"
    assert other_service.status_code == 201
    assert ready.status_code == 503
    assert ready.json()["checks"]["payments"] == "ok"


def test_ready_when_both_services_are_up(gateway: TestClient) -> None:
    ready = gateway.get("/ready")

    assert ready.status_code == 200
    assert ready.json()["checks"] == {"orders": "ok", "payments": "ok"}


# --- Documentation and metrics -----------------------------------------------------------------


def test_the_spec_and_swagger_ui_document_every_canonical_route_and_alias(
    gateway: TestClient,
) -> None:
    spec = gateway.get("/openapi.json")
    swagger = gateway.get("/swagger/index.html")

    assert spec.status_code == 200
    assert spec.json()["info"]["title"] == TITLE
    assert spec.json()["openapi"].startswith("3.1")
    assert spec.json()["paths"].keys() >= CANONICAL_PATHS | ALIAS_PATHS
    # The headers clients rely on are declared, not only described.
    paths = spec.json()["paths"]
    assert "Location" in paths["/orders/create"]["post"]["responses"]["201"]["headers"]
    assert paths["/orders"]["get"]["responses"]["200"]["headers"].keys() == {
        "X-Next-Cursor",
        "Link",
    }
    unavailable = [
        answers["503"]
        for operations in paths.values()
        for operation in operations.values()
        if "503" in (answers := operation["responses"])
    ]
    assert unavailable and all("Retry-After" in a["headers"] for a in unavailable)
    assert swagger.status_code == 200
    assert "swagger-ui" in swagger.text


@pytest.mark.parametrize("path", ["/swagger", "/swagger/"])
def test_swagger_ui_without_index_html_leads_to_the_page_whose_assets_load(
    gateway: TestClient, path: str
) -> None:
    # Served at /swagger itself, the page's relative assets resolved to /swagger-ui.css: 404.
    page = gateway.get(path)
    assert page.url.path == "/swagger/index.html" and page.status_code == 200
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        assert asset in page.text
        assert gateway.get(str(page.url.join(asset))).status_code == 200


def test_head_through_the_gateway_gives_the_length_a_get_would(gateway: TestClient) -> None:
    user = open_account(gateway)["user_id"]
    order = create_order(gateway, user)
    for path in (f"/order/{order['id']}", f"/orders/{order['id']}/status"):
        got = gateway.get(path)
        head = gateway.head(path)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == got.headers["content-type"]


def test_metrics_count_proxied_requests(gateway: TestClient) -> None:
    gateway.get("/orders")

    metrics = gateway.get("/metrics")

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'http_requests_total{method="GET",route="/orders",status="200"}' in metrics.text
    assert 'gateway_upstream_attempts_total{outcome="200",service="orders"}' in metrics.text
