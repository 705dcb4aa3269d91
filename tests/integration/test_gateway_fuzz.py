"""Property-based fuzzing of the gateway against its OWN published OpenAPI spec, with the real
Orders and Payments services behind it: whatever Schemathesis generates, valid or not, the
gateway never answers 5xx, rejects every invalid request with a 4xx, and never answers a status,
media type or body its spec does not document.

Hypothesis drives each operation's strategy directly (one subtest per operation, all sharing one
set of servers): Schemathesis' loader for fixture-made schemas (`schemathesis.pytest.
from_fixture`, 4.32) reads `request.node._nodeid`, which pytest 9 no longer has."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.config import Config
from services.gateway.app import create_app
from tests.integration.test_gateway import Services

# The real services, on fresh databases: the same fixture as the gateway's integration tests.
from tests.integration.test_gateway import services as services
from tests.serving import serving

# FUZZ_EXAMPLES=500 for a deeper hunt; the default keeps the run well under a minute.
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def gateway_schema(services: Services) -> Iterator[schemathesis.BaseSchema]:
    """The spec the running gateway serves, loaded from it and bound to it."""
    config = Config(orders_url=services.orders_url, payments_url=services.payments_url)
    with serving(create_app(config)) as gateway_url:
        yield schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")


def test_the_gateway_answers_only_what_its_spec_documents(
    gateway_schema: schemathesis.BaseSchema, subtests: pytest.Subtests
) -> None:
    operations = [result.ok() for result in gateway_schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == 11

    for operation in operations:
        with subtests.test(operation.label):
            # Valid and invalid requests alike: invalid ones must get a documented 4xx.
            cases = st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE),
                operation.as_strategy(GenerationMode.NEGATIVE),
            )

            @given(case=cases)
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            )
            def answers_as_documented(case: schemathesis.Case[Any]) -> None:
                case.call_and_validate(checks=CHECKS)

            answers_as_documented()
