"""The gateway app in front of fake services: its routes, documentation, readiness and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from starlette.testclient import TestClient

from services.common.config import Config
from services.gateway import proxy
from services.gateway.app import TITLE, create_app
from services.orders import app as orders
from services.payments import app as payments
from tests.unit.test_gateway_proxy import FakeService, Reply, closed_port, status

HEALTHY = status(200, {"status": "ok"})


@contextmanager
def client_for(
    orders_service: FakeService | str | None = None,
    payments_service: FakeService | str | None = None,
) -> Iterator[TestClient]:
    """The running gateway in front of these fake services (healthy ones when not given) or
    URLs."""
    with ExitStack() as stack:
        urls = []
        for service in (orders_service, payments_service):
            if not isinstance(service, str):
                service = stack.enter_context(service or FakeService(HEALTHY)).url
            urls.append(service)
        config = Config(orders_url=urls[0], payments_url=urls[1])
        yield stack.enter_context(TestClient(create_app(config)))


def test_the_spec_documents_exactly_the_services_operations_with_their_schemas() -> None:
    with client_for() as client:
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
    # Nothing listens where the services should be: the documentation needs none of them.
    with client_for(closed_port(), closed_port()) as client:
        index = client.get("/swagger/index.html")
        bundle = client.get("/swagger/swagger-ui-bundle.js")

    assert index.status_code == 200
    assert TITLE in index.text
    assert bundle.status_code == 200


def test_ready_when_both_services_answer_their_health_check() -> None:
    orders_service, payments_service = FakeService(HEALTHY), FakeService(HEALTHY)

    with client_for(orders_service, payments_service) as client:
        ready = client.get("/ready")

    assert ready.status_code == 200
    assert ready.json()["checks"] == {"orders": "ok", "payments": "ok"}
    for service in (orders_service, payments_service):
        assert [(sent.method, sent.target) for sent in service.received] == [("GET", "/health")]


def test_not_ready_while_a_service_is_unreachable() -> None:
    with client_for(payments_service=closed_port()) as client:
        ready = client.get("/ready")
        health = client.get("/health")

    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"
    assert ready.headers["content-type"] == "application/problem+json"  # like every error
    assert ready.json()["detail"] == "Unavailable: payments."
    checks = ready.json()["checks"]
    assert checks["orders"] == "ok"
    assert checks["payments"].startswith("unavailable: ConnectFailed")
    assert health.status_code == 200


def test_not_ready_while_a_service_answers_its_health_check_with_an_error() -> None:
    with client_for(payments_service=FakeService(status(503, {"status": "starting"}))) as client:
        ready = client.get("/ready")
    with client_for(payments_service=FakeService(status(307, {}, ("Location", "/")))) as client:
        redirected = client.get("/ready")

    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["orders"] == "ok"
    assert checks["payments"] == "unavailable: Unhealthy: /health answered 503"
    assert redirected.status_code == 503
    assert redirected.json()["checks"]["payments"] == "unavailable: Unhealthy: /health answered 307"


def test_not_ready_while_a_service_does_not_answer_its_health_check_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy, "HEALTH_TIMEOUT", 0.2)
    hung = FakeService(Reply(delay=30.0))

    with client_for(orders_service=hung) as client:
        ready = client.get("/ready")

    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["orders"].startswith("unavailable: RequestTimeout")
    assert checks["payments"] == "ok"
    assert len(hung.received) == 1


def test_metrics_count_requests_and_upstream_attempts() -> None:
    with client_for(FakeService(status(200, []))) as client:
        client.get("/orders")
        metrics = client.get("/metrics")

    assert metrics.status_code == 200
    assert 'http_requests_total{method="GET",route="/orders",status="200"} 1.0' in metrics.text
    assert 'gateway_upstream_attempts_total{outcome="200",service="orders"} 1.0' in metrics.text


def test_an_unknown_route_is_a_404_problem_and_a_wrong_method_a_405() -> None:
    orders_service = FakeService(HEALTHY)

    with client_for(orders_service) as client:
        missing = client.get("/nowhere")
        wrong = client.delete("/orders")

    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert wrong.status_code == 405
    # /orders is served by two routes (list, create): both methods are allowed.
    assert wrong.headers["allow"] == "GET, HEAD, POST"
    assert wrong.headers["content-type"] == "application/problem+json"
    assert orders_service.received == []
