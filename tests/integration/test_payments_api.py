"""The Payments HTTP API on a real database: each route with good and bad input.

Every bad request must answer problem+json with the contract's status and change nothing; after
every test each account's balance must equal what its ledger adds up to."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from services.common.config import Config
from services.payments import queries
from services.payments.app import create_app
from tests.concurrently import at_once

PROBLEM_JSON = "application/problem+json"
MISSING_ID = "0190f7a4-5b6c-7d8e-9f00-0000000000ff"
BIGINT_MAX = 2**63 - 1

# Amounts the contract refuses with 422, as raw JSON literals (NaN is what Python's parser
# accepts but JSON does not).
BAD_AMOUNTS = [
    "0",
    "-1",
    "1.5",
    "1e3",
    '"10"',
    "true",
    "null",
    "NaN",
    "Infinity",
    "1000000000000001",
]


@pytest.fixture(autouse=True)
def every_balance_matches_its_ledger(payments_db: psycopg.Connection[Any]) -> Iterator[None]:
    yield
    assert payments_db.execute(queries.LEDGER_MISMATCHES).fetchall() == []


@pytest.fixture
def client(payments_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Config(payments_database_url=payments_url))) as test_client:
        yield test_client


def open_account(client: TestClient, user_id: str | None = None) -> dict[str, Any]:
    response = client.post("/accounts/create", json={"user_id": user_id} if user_id else None)
    assert response.status_code == 201, response.text
    account: dict[str, Any] = response.json()
    return account


def top_up(client: TestClient, account_id: str, amount: int) -> int:
    response = client.post("/accounts/top_up", json={"account_id": account_id, "amount": amount})
    assert response.status_code == 200, response.text
    balance: int = response.json()["balance"]
    return balance


def snapshot(db: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every account and ledger row: a bad request must leave this exactly as it was."""
    accounts = db.execute("SELECT id, user_id, balance, updated_at FROM accounts ORDER BY id")
    ledger = db.execute("SELECT id, account_id, kind, amount FROM ledger ORDER BY id")
    return accounts.fetchall(), ledger.fetchall()


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()
    return problem


# --- POST /accounts/create -----------------------------------------------------------------------


def test_creating_an_account_without_a_body_makes_a_new_user_with_the_account_id(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    response = client.post("/accounts/create")

    assert response.status_code == 201
    account = response.json()
    assert account.keys() == {"account_id", "user_id", "balance", "created_at"}
    assert account["user_id"] == account["account_id"]
    assert uuid.UUID(account["account_id"]).version == 7
    assert account["balance"] == 0
    assert account["created_at"].endswith("Z")
    datetime.fromisoformat(account["created_at"])
    row = payments_db.execute(
        "SELECT user_id, balance FROM accounts WHERE id = %s", (account["account_id"],)
    ).fetchone()
    assert row == (uuid.UUID(account["user_id"]), 0)


def test_creating_an_account_with_an_empty_object_also_makes_a_new_user(client: TestClient) -> None:
    response = client.post("/accounts/create", json={})

    assert response.status_code == 201
    assert response.json()["user_id"] == response.json()["account_id"]


def test_creating_an_account_for_a_user_keeps_the_user_id(client: TestClient) -> None:
    user_id = str(uuid.uuid4())

    account = open_account(client, user_id)

    assert account["user_id"] == user_id
    assert account["account_id"] != user_id
    assert account["balance"] == 0


@pytest.mark.parametrize("path", ["/accounts/create", "/accounts"])
def test_a_second_account_for_the_same_user_is_409_naming_the_existing_one(
    client: TestClient, payments_db: psycopg.Connection[Any], path: str
) -> None:
    user_id = str(uuid.uuid4())
    first = open_account(client, user_id)
    before = snapshot(payments_db)

    response = client.post(path, json={"user_id": user_id})

    problem = assert_problem(response, 409)
    assert problem["account_id"] == first["account_id"]
    assert first["account_id"] in problem["detail"]
    assert snapshot(payments_db) == before


def test_a_user_made_by_a_bodiless_create_cannot_get_a_second_account(client: TestClient) -> None:
    first = open_account(client)

    response = client.post("/accounts", json={"user_id": first["user_id"]})

    assert assert_problem(response, 409)["account_id"] == first["account_id"]


def test_concurrent_creates_for_one_user_open_exactly_one_account(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user_id = str(uuid.uuid4())
    answers = at_once(10, lambda: client.post("/accounts", json={"user_id": user_id}))

    created = [a for a in answers if a.status_code == 201]
    conflicts = [a for a in answers if a.status_code == 409]
    assert len(created) == 1
    assert len(conflicts) == 9
    winner = created[0].json()["account_id"]
    assert {c.json()["account_id"] for c in conflicts} == {winner}
    count = payments_db.execute("SELECT count(*) FROM accounts WHERE user_id = %s", (user_id,))
    assert count.fetchone() == (1,)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ('{"user_id": "not-a-uuid"}', "application/json", 422),
        ('{"user_id": 42}', "application/json", 422),
        ('{"user_id": null}', "application/json", 422),
        ('{"owner": "0190f7a4-5b6c-7d8e-9f00-0000000000ff"}', "application/json", 422),
        ('{"user_id": ', "application/json", 400),
        ("user_id=x", "application/x-www-form-urlencoded", 415),
        ("[]", "application/json", 422),
    ],
)
def test_creating_an_account_with_a_bad_body_is_refused_and_creates_nothing(
    client: TestClient,
    payments_db: psycopg.Connection[Any],
    body: str,
    content_type: str,
    status: int,
) -> None:
    response = client.post("/accounts/create", content=body, headers={"content-type": content_type})

    assert_problem(response, status)
    assert snapshot(payments_db) == ([], [])


def test_an_unknown_field_is_named_in_the_errors(client: TestClient) -> None:
    response = client.post("/accounts", json={"user_id": str(uuid.uuid4()), "currency": "RUB"})

    problem = assert_problem(response, 422)
    assert {"field": "currency", "message": "unknown field"} in problem["errors"]


@pytest.mark.parametrize("body", [None, {}])
def test_creating_an_account_for_a_user_requires_the_user_id(
    client: TestClient, payments_db: psycopg.Connection[Any], body: dict[str, Any] | None
) -> None:
    response = client.post("/accounts", json=body)

    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"] in ("user_id", "body")
    assert snapshot(payments_db) == ([], [])


def test_a_body_over_64_kib_is_413(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    body = '{"user_id": "' + "x" * (64 * 1024) + '"}'

    response = client.post("/accounts", content=body, headers={"content-type": "application/json"})

    assert_problem(response, 413)
    assert snapshot(payments_db) == ([], [])


# --- POST /accounts/top_up -----------------------------------------------------------------------


def test_a_top_up_answers_the_new_balance_and_writes_a_ledger_row(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account_id = open_account(client)["account_id"]

    first = client.post("/accounts/top_up", json={"account_id": account_id, "amount": 700})
    second = client.post("/accounts/top_up", json={"account_id": account_id, "amount": 300})

    assert first.status_code == 200
    assert first.json() == {"account_id": account_id, "balance": 700}
    assert second.json() == {"account_id": account_id, "balance": 1000}
    ledger = payments_db.execute(
        "SELECT kind, amount, order_id FROM ledger WHERE account_id = %s ORDER BY id", (account_id,)
    ).fetchall()
    assert ledger == [("top_up", 700, None), ("top_up", 300, None)]


def test_the_largest_amount_is_accepted(client: TestClient) -> None:
    account_id = open_account(client)["account_id"]

    assert top_up(client, account_id, 10**15) == 10**15


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
def test_a_top_up_with_a_bad_amount_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any], amount: str
) -> None:
    account_id = open_account(client)["account_id"]
    top_up(client, account_id, 50)
    before = snapshot(payments_db)

    response = client.post(
        "/accounts/top_up",
        content=f'{{"account_id": "{account_id}", "amount": {amount}}}',
        headers={"content-type": "application/json"},
    )

    problem = assert_problem(response, 422)
    assert [e["field"] for e in problem["errors"]] == ["amount"]
    assert snapshot(payments_db) == before


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ('{"account_id": "ACCOUNT", "amount": ', "application/json", 400),
        ("{'account_id': 'ACCOUNT'}", "application/json", 400),
        ('{"account_id": "ACCOUNT", "amount": 10}', "text/plain", 415),
        ('{"account_id": "ACCOUNT", "amount": 10, "note": "x"}', "application/json", 422),
        ('{"account_id": "not-a-uuid", "amount": 10}', "application/json", 422),
        ('{"account_id": "ACCOUNT-", "amount": 10}', "application/json", 422),
        ('{"account_id": "{ACCOUNT}", "amount": 10}', "application/json", 422),
        ('{"account_id": "ACCOUNT", "amount": 1%s}' % ("0" * 5000), "application/json", 422),
        (
            '{"account_id": "ACCOUNT", "amount": %s}' % ("[" * 3000 + "]" * 3000),
            "application/json",
            400,
        ),
        ('{"account_id": "ACCOUNT"}', "application/json", 422),
        ('{"amount": 10}', "application/json", 422),
        ("", "application/json", 422),
    ],
)
def test_a_bad_top_up_request_is_refused_and_changes_nothing(
    client: TestClient,
    payments_db: psycopg.Connection[Any],
    body: str,
    content_type: str,
    status: int,
) -> None:
    account_id = open_account(client)["account_id"]
    top_up(client, account_id, 50)
    before = snapshot(payments_db)

    response = client.post(
        "/accounts/top_up",
        content=body.replace("ACCOUNT", account_id),
        headers={"content-type": content_type},
    )

    assert_problem(response, status)
    assert snapshot(payments_db) == before


def test_a_top_up_over_64_kib_is_413_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account_id = open_account(client)["account_id"]
    before = snapshot(payments_db)
    body = f'{{"account_id": "{account_id}", "amount": 10, "pad": "{"x" * 70_000}"}}'

    response = client.post(
        "/accounts/top_up", content=body, headers={"content-type": "application/json"}
    )

    assert_problem(response, 413)
    assert snapshot(payments_db) == before


def test_a_top_up_of_an_unknown_account_is_404_and_writes_no_ledger_row(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    open_account(client)
    before = snapshot(payments_db)

    response = client.post("/accounts/top_up", json={"account_id": MISSING_ID, "amount": 10})

    assert MISSING_ID in assert_problem(response, 404)["detail"]
    assert snapshot(payments_db) == before


def test_a_top_up_that_would_overflow_the_balance_is_422_not_500(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account_id = open_account(client)["account_id"]
    # Through the service's own statement, so the ledger stays in step with the balance.
    payments_db.execute(
        queries.TOP_UP_ACCOUNT,
        {"account_id": account_id, "amount": BIGINT_MAX - 10, "idempotency_key": None},
    )
    before = snapshot(payments_db)

    response = client.post("/accounts/top_up", json={"account_id": account_id, "amount": 11})

    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"] == "amount"
    assert snapshot(payments_db) == before
    assert top_up(client, account_id, 10) == BIGINT_MAX


# --- POST /accounts/{user_id}/deposit ------------------------------------------------------------


def test_a_deposit_tops_up_the_account_of_the_user_in_the_path(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user_id = str(uuid.uuid4())
    account_id = open_account(client, user_id)["account_id"]

    response = client.post(f"/accounts/{user_id}/deposit", json={"amount": 250})

    assert response.status_code == 200
    assert response.json() == {"account_id": account_id, "user_id": user_id, "balance": 250}
    ledger = payments_db.execute("SELECT account_id, kind, amount FROM ledger").fetchall()
    assert ledger == [(uuid.UUID(account_id), "top_up", 250)]


def test_a_deposit_may_repeat_the_user_id_of_the_path(client: TestClient) -> None:
    user_id = str(uuid.uuid4())
    open_account(client, user_id)

    response = client.post(f"/accounts/{user_id}/deposit", json={"user_id": user_id, "amount": 5})

    assert response.status_code == 200
    assert response.json()["balance"] == 5


def test_a_deposit_naming_another_user_in_the_body_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    open_account(client, user_id)
    open_account(client, other)
    before = snapshot(payments_db)

    response = client.post(f"/accounts/{user_id}/deposit", json={"user_id": other, "amount": 5})

    problem = assert_problem(response, 422)
    assert [e["field"] for e in problem["errors"]] == ["user_id"]
    assert snapshot(payments_db) == before


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
def test_a_deposit_with_a_bad_amount_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any], amount: str
) -> None:
    user_id = open_account(client)["user_id"]
    before = snapshot(payments_db)

    response = client.post(
        f"/accounts/{user_id}/deposit",
        content=f'{{"amount": {amount}}}',
        headers={"content-type": "application/json"},
    )

    assert_problem(response, 422)
    assert snapshot(payments_db) == before


def test_a_deposit_for_a_user_without_an_account_is_404(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    response = client.post(f"/accounts/{MISSING_ID}/deposit", json={"amount": 5})

    assert_problem(response, 404)
    assert snapshot(payments_db) == ([], [])


def test_a_deposit_to_a_malformed_user_id_is_422(client: TestClient) -> None:
    response = client.post("/accounts/not-a-uuid/deposit", json={"amount": 5})

    problem = assert_problem(response, 422)
    assert [e["field"] for e in problem["errors"]] == ["user_id"]


def test_a_deposit_with_an_unknown_field_or_wrong_media_type_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user_id = open_account(client)["user_id"]
    before = snapshot(payments_db)

    unknown = client.post(f"/accounts/{user_id}/deposit", json={"amount": 5, "bonus": 1})
    text = client.post(
        f"/accounts/{user_id}/deposit",
        content='{"amount": 5}',
        headers={"content-type": "text/plain"},
    )
    broken = client.post(
        f"/accounts/{user_id}/deposit",
        content='{"amount": 5',
        headers={"content-type": "application/json"},
    )

    assert_problem(unknown, 422)
    assert_problem(text, 415)
    assert_problem(broken, 400)
    assert snapshot(payments_db) == before


# --- GET /accounts/{account_id}/balance and GET /accounts/balance?user_id= -----------------------


def test_the_balance_of_an_account_is_read_by_account_id(client: TestClient) -> None:
    account_id = open_account(client)["account_id"]
    top_up(client, account_id, 1234)

    response = client.get(f"/accounts/{account_id}/balance")

    assert response.status_code == 200
    assert response.json() == {"account_id": account_id, "balance": 1234}


def test_the_balance_of_a_user_is_read_by_user_id(client: TestClient) -> None:
    user_id = str(uuid.uuid4())
    account_id = open_account(client, user_id)["account_id"]
    top_up(client, account_id, 99)

    response = client.get("/accounts/balance", params={"user_id": user_id})

    assert response.status_code == 200
    assert response.json() == {"account_id": account_id, "user_id": user_id, "balance": 99}


def test_the_balance_of_an_unknown_account_or_user_is_404(client: TestClient) -> None:
    open_account(client)

    assert_problem(client.get(f"/accounts/{MISSING_ID}/balance"), 404)
    assert_problem(client.get("/accounts/balance", params={"user_id": MISSING_ID}), 404)


def test_a_malformed_id_in_a_balance_lookup_is_422(client: TestClient) -> None:
    by_account = assert_problem(client.get("/accounts/12345/balance"), 422)
    by_user = assert_problem(client.get("/accounts/balance", params={"user_id": "12345"}), 422)
    missing = assert_problem(client.get("/accounts/balance"), 422)

    assert by_account["errors"] == [{"field": "account_id", "message": "must be a valid uuid"}]
    assert by_user["errors"] == [{"field": "user_id", "message": "must be a valid uuid"}]
    assert missing["errors"] == [{"field": "user_id", "message": "is required"}]


# --- Documentation and failure of the database ---------------------------------------------------


def test_the_openapi_document_describes_every_route_and_its_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    paths = spec["paths"]
    assert set(paths) >= {
        "/accounts/create",
        "/accounts",
        "/accounts/top_up",
        "/accounts/{user_id}/deposit",
        "/accounts/{account_id}/balance",
        "/accounts/balance",
    }
    assert set(paths["/accounts/create"]["post"]["responses"]) == {
        "201",
        "400",
        "409",
        "413",
        "415",
        "422",
        "503",
    }
    assert set(paths["/accounts/top_up"]["post"]["responses"]) == {
        "200",
        "400",
        "404",
        "413",
        "415",
        "422",
        "503",
    }
    assert set(paths["/accounts/balance"]["get"]["responses"]) == {"200", "404", "422", "503"}
    assert not paths["/accounts/create"]["post"]["requestBody"]["required"]
    assert client.get("/swagger/index.html").status_code == 200


def test_an_unreachable_database_is_503_with_retry_after() -> None:
    config = Config(
        payments_database_url="postgresql://postgres:postgres@127.0.0.1:1/payments",
        db_connect_timeout=1,
    )
    with TestClient(create_app(config)) as client:
        response = client.post("/accounts/create")

    assert_problem(response, 503)
    assert response.headers["retry-after"]


def test_an_optional_body_sent_as_json_null_is_422_and_opens_no_account(
    payments_url: str, payments_db: psycopg.Connection[Any]
) -> None:
    with TestClient(create_app(Config(payments_database_url=payments_url))) as client:
        answer = client.post(
            "/accounts/create", content=b"null", headers={"content-type": "application/json"}
        )
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert payments_db.execute("SELECT count(*) FROM accounts").fetchone() == (0,)


# --- Idempotency keys ----------------------------------------------------------------------------


def keyed_top_up(client: TestClient, account_id: str, amount: int, key: str) -> Any:
    return client.post(
        "/accounts/top_up",
        json={"account_id": account_id, "amount": amount},
        headers={"Idempotency-Key": key},
    )


def ledger_rows(db: psycopg.Connection[Any], account_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT kind, amount, idempotency_key FROM ledger WHERE account_id = %s ORDER BY id",
        (account_id,),
    ).fetchall()


def test_a_top_up_sent_again_with_its_idempotency_key_credits_once(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account = open_account(client)["account_id"]
    first = keyed_top_up(client, account, 500, "t-1")
    assert first.status_code == 200, first.text
    assert first.json() == {"account_id": account, "balance": 500}
    assert "idempotent-replayed" not in first.headers
    top_up(client, account, 7)  # without a key: always credited

    again = keyed_top_up(client, account, 500, "t-1")
    by_user = client.post(
        f"/accounts/{account}/deposit", json={"amount": 500}, headers={"Idempotency-Key": "t-1"}
    )

    assert again.status_code == by_user.status_code == 200
    assert again.headers["idempotent-replayed"] == by_user.headers["idempotent-replayed"] == "true"
    assert again.json() == {"account_id": account, "balance": 507}  # as it is now
    assert by_user.json() == {"account_id": account, "user_id": account, "balance": 507}
    assert ledger_rows(payments_db, account) == [("top_up", 500, "t-1"), ("top_up", 7, None)]


def test_an_idempotency_key_belongs_to_its_account(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    mine, theirs = (open_account(client)["account_id"] for _ in range(2))
    assert keyed_top_up(client, mine, 100, "k").json()["balance"] == 100
    assert keyed_top_up(client, theirs, 100, "k").json()["balance"] == 100
    assert ledger_rows(payments_db, theirs) == [("top_up", 100, "k")]


def test_an_idempotency_key_sent_with_another_amount_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account = open_account(client)["account_id"]
    keyed_top_up(client, account, 100, "k")
    before = snapshot(payments_db)

    for response in (
        keyed_top_up(client, account, 101, "k"),
        client.post(
            f"/accounts/{account}/deposit", json={"amount": 99}, headers={"Idempotency-Key": "k"}
        ),
    ):
        problem = assert_problem(response, 422)
        assert problem["type"] == "/problems/idempotency-key-reused"
        assert problem["errors"] == [
            {"field": "Idempotency-Key", "message": "names another top-up"}
        ]
    assert snapshot(payments_db) == before


@pytest.mark.parametrize(
    "key", ["", "a b", "x" * 256, "ключ"], ids=["empty", "space", "256", "utf8"]
)
def test_a_malformed_idempotency_key_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any], key: str
) -> None:
    account = open_account(client)["account_id"]
    before = snapshot(payments_db)

    response = client.post(
        "/accounts/top_up",
        content=json.dumps({"account_id": account, "amount": 5}).encode(),
        headers=[(b"content-type", b"application/json"), (b"idempotency-key", key.encode())],
    )

    problem = assert_problem(response, 422)
    assert [error["field"] for error in problem["errors"]] == ["Idempotency-Key"]
    assert snapshot(payments_db) == before


def test_a_keyed_top_up_of_an_unknown_account_is_404(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    assert_problem(keyed_top_up(client, str(uuid.uuid4()), 5, "k"), 404)
    assert snapshot(payments_db) == ([], [])


def test_concurrent_top_ups_with_one_idempotency_key_credit_once(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    account = open_account(client)["account_id"]
    answers = at_once(10, lambda: keyed_top_up(client, account, 250, "at-once"))

    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["balance"] for a in answers} == {250}
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 9
    assert ledger_rows(payments_db, account) == [("top_up", 250, "at-once")]


def keyed_opening(client: TestClient, key: str, user_id: str | None = None, path: str = "") -> Any:
    """Open an account with `key`: bodiless unless `user_id`, through `/accounts/create` or
    (`path="/accounts"`, which needs a user) the second seed's endpoint."""
    body = {"user_id": user_id} if user_id else None
    return client.post(path or "/accounts/create", json=body, headers={"Idempotency-Key": key})


def test_an_account_opened_again_with_its_idempotency_key_is_opened_once(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    first = keyed_opening(client, "open-1")
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    account = first.json()
    top_up(client, account["account_id"], 30)

    again = keyed_opening(client, "open-1")

    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == account | {"balance": 30}  # as it is now
    assert payments_db.execute("SELECT count(*) FROM accounts").fetchone() == (1,)
    other = keyed_opening(client, "open-2")  # another key: another user, another account
    assert other.status_code == 201 and "idempotent-replayed" not in other.headers
    assert other.json()["account_id"] != account["account_id"]


def test_a_users_account_opened_again_with_its_idempotency_key_is_replayed_not_409(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user = str(uuid.uuid4())
    first = keyed_opening(client, "mine", user, path="/accounts")
    assert first.status_code == 201, first.text

    answers = [
        keyed_opening(client, "mine", user),
        keyed_opening(client, "mine", user, path="/accounts"),
    ]

    assert [a.status_code for a in answers] == [201, 201]
    assert [a.json() for a in answers] == [first.json()] * 2
    assert [a.headers["idempotent-replayed"] for a in answers] == ["true", "true"]
    # Another key, or none, for a user who has an account: 409, as without keys.
    unkeyed = client.post("/accounts/create", json={"user_id": user})
    for response in (keyed_opening(client, "other", user), unkeyed):
        assert assert_problem(response, 409)["account_id"] == first.json()["account_id"]
    assert payments_db.execute("SELECT count(*) FROM accounts").fetchone() == (1,)


def test_an_idempotency_key_sent_to_open_another_account_is_422_and_changes_nothing(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    user, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    first = keyed_opening(client, "bodiless")
    assert first.status_code == 201
    opened_bodiless = first.json()
    assert keyed_opening(client, "for-user", user).status_code == 201
    before = snapshot(payments_db)

    for response in (
        keyed_opening(client, "bodiless", stranger),  # it opened a new user's account
        keyed_opening(client, "for-user"),  # it opened `user`'s, not a new user's
        keyed_opening(client, "for-user", stranger, path="/accounts"),
        keyed_opening(client, "bodiless", user),  # `user` has an account: the key still counts
        # The user it made, named: not the same request either.
        keyed_opening(client, "bodiless", opened_bodiless["user_id"], path="/accounts"),
    ):
        problem = assert_problem(response, 422)
        assert problem["type"] == "/problems/idempotency-key-reused"
        assert problem["errors"] == [
            {"field": "Idempotency-Key", "message": "names another account"}
        ]
    assert snapshot(payments_db) == before


def test_concurrent_openings_with_one_idempotency_key_open_one_account(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    answers = at_once(10, lambda: keyed_opening(client, "at-once"))

    assert [a.status_code for a in answers] == [201] * 10
    assert len({a.json()["account_id"] for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 9
    assert payments_db.execute("SELECT count(*) FROM accounts").fetchone() == (1,)


def test_a_malformed_idempotency_key_opens_no_account(
    client: TestClient, payments_db: psycopg.Connection[Any]
) -> None:
    problem = assert_problem(keyed_opening(client, "a b"), 422)
    assert [error["field"] for error in problem["errors"]] == ["Idempotency-Key"]
    assert snapshot(payments_db) == ([], [])
