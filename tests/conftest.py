"""Fixtures shared by every test layer: throwaway databases on the stack's real Postgres.

pytest-postgresql's no-process fixture talks to the server `just up` started (or the one the
`STACK_POSTGRES_*` variables name); each database's template gets the real migrations from
`db/sql/`, and every test gets a fresh copy of that template.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
from pytest_postgresql import factories

from services.common.migrations import migrate

PG_HOST = os.environ.get("STACK_POSTGRES_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("POSTGRES_PORT", "5432"))
PG_USER = os.environ.get("STACK_POSTGRES_USER", "postgres")
PG_PASSWORD = os.environ.get("STACK_POSTGRES_PASSWORD", "postgres")
# Test databases carry the run's pid, so two runs on one server never meet.
RUN = os.getpid()


def conninfo(dbname: str) -> str:
    """A URL for one database on the test server."""
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{PG_HOST}:{PG_PORT}/{dbname}"


def plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every node of a JSON query plan (`EXPLAIN (FORMAT JSON)`), depth first."""
    if isinstance(node, dict):
        if "Node Type" in node:
            yield node
        for value in node.values():
            yield from plan_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from plan_nodes(value)


def _load_schema(service: str, **kwargs: Any) -> None:
    migrate(conninfo(kwargs["dbname"]), service)


orders_template = factories.postgresql_noproc(
    host=PG_HOST,
    port=PG_PORT,
    user=PG_USER,
    password=PG_PASSWORD,
    dbname=f"test_orders_{RUN}",
    load=[partial(_load_schema, "orders")],
)
payments_template = factories.postgresql_noproc(
    host=PG_HOST,
    port=PG_PORT,
    user=PG_USER,
    password=PG_PASSWORD,
    dbname=f"test_payments_{RUN}",
    load=[partial(_load_schema, "payments")],
)
orders_connection = factories.postgresql("orders_template")
payments_connection = factories.postgresql("payments_template")


@pytest.fixture
def orders_url(orders_connection: psycopg.Connection[Any]) -> str:
    """A fresh `orders` database with the schema applied, for one test."""
    return conninfo(orders_connection.info.dbname)


@pytest.fixture
def payments_url(payments_connection: psycopg.Connection[Any]) -> str:
    """A fresh `payments` database with the schema applied, for one test."""
    return conninfo(payments_connection.info.dbname)


@pytest.fixture
def orders_db(orders_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's `orders` database, for arranging and asserting."""
    with psycopg.connect(orders_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def payments_db(payments_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's `payments` database."""
    with psycopg.connect(payments_url, autocommit=True) as conn:
        yield conn
