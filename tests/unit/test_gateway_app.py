"""The gateway app without a network: its routes, documentation, readiness and metrics."""

from __future__ import annotations

import httpx
from starlette.testclient import TestClient

from services.common.config import Config
from services.gateway.app import TITLE, create_app
from services.orders import app as orders
from services.payments import app as payments

ORDERS = "http://orders.test"
PAYMENTS = "http://payments.test"


def client_for(handler: httpx.MockTransport) -> TestClient:
    return TestClient(
        create_app(Config(orders_url=ORDERS, payments_url=PAYMENTS), transport=handler)
    )


def healthy(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"status": "ok"})


def test_the_spec_documents_exactly_the_services_operations_with_their_schemas() -> None:
    with client_for(httpx.MockTransport(healthy)) as client:
        spec = client.get("/openapi.json").json()

    assert spec["info"]["title"] == TITLE
    declared = {
        (ep.method.lower(), ep.path, ep.operation_id)
        for ep in [*orders.ENDPOINTS, *payments.ENDPOINTS]
    }
    published = {
        (method, path, operation["operationId"])
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }
    assert published == declared
    top_up = spec["paths"]["/accounts/top_up"]["post"]
    assert top_up["requestBody"]["content"]["application/json"]["schema"] == payments.TOP_UP_BODY


def test_swagger_ui_is_served_offline() -> None:
    with client_for(httpx.MockTransport(healthy)) as client:
        index = client.get("/swagger/index.html")
        bundle = client.get("/swagger/swagger-ui-bundle.js")

    assert index.status_code == 200
    assert TITLE in index.text
    assert bundle.status_code == 200


def test_ready_when_both_services_answer_their_health_check() -> None:
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return healthy(request)

    with client_for(httpx.MockTransport(answer)) as client:
        ready = client.get("/ready")

    assert ready.status_code == 200
    assert sorted(asked) == [f"{ORDERS}/health", f"{PAYMENTS}/health"]


def test_not_ready_while_a_service_is_unreachable() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "payments.test":
            raise httpx.ConnectError("refused", request=request)
        return healthy(request)

    with client_for(httpx.MockTransport(answer)) as client:
        ready = client.get("/ready")
        health = client.get("/health")

    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"
    checks = ready.json()["checks"]
    assert checks["orders"] == "ok"
    assert checks["payments"].startswith("unavailable: ConnectError")
    assert health.status_code == 200


def test_metrics_count_requests_and_upstream_attempts() -> None:
    with client_for(httpx.MockTransport(lambda _: httpx.Response(200, json=[]))) as client:
        client.get("/orders")
        metrics = client.get("/metrics")

    assert metrics.status_code == 200
    assert 'http_requests_total{method="GET",route="/orders",status="200"} 1.0' in metrics.text
    assert 'gateway_upstream_attempts_total{outcome="200",service="orders"} 1.0' in metrics.text


def test_an_unknown_route_is_a_404_problem_and_a_wrong_method_a_405() -> None:
    with client_for(httpx.MockTransport(healthy)) as client:
        missing = client.get("/nowhere")
        wrong = client.delete("/orders")

    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert wrong.status_code == 405
