"""The Orders HTTP API on a real Postgres: each route with good and bad input, the order and its
outbox row committing together or not at all, and listings paged while orders keep arriving."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from starlette.testclient import TestClient

from services.common.config import Config
from services.common.events import TOPIC_PAYMENT_REQUESTED, TYPE_PAYMENT_REQUESTED
from services.common.ids import uuid7
from services.orders.app import create_app
from tests.concurrently import at_once

USER = uuid.UUID("0190f7a4-0000-7d8e-9f00-aabbccddeeff")
ORDER_FIELDS = {
    "id",
    "user_id",
    "amount",
    "description",
    "status",
    "reason",
    "created_at",
    "updated_at",
}


@pytest.fixture
def config(orders_url: str) -> Config:
    # A topic prefix, so the test can tell `config.topic(...)` was used and not the bare name.
    return Config(orders_database_url=orders_url, kafka_topic_prefix="test-orders-api.")


@pytest.fixture
def client(config: Config) -> Iterator[TestClient]:
    with TestClient(create_app(config)) as test_client:
        yield test_client


def order_body(**changes: Any) -> dict[str, Any]:
    return {"user_id": str(USER), "amount": 10_000, "description": "iPhone 17"} | changes


def create(client: TestClient, **changes: Any) -> dict[str, Any]:
    response = client.post("/orders/create", json=order_body(**changes))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def row_counts(db: psycopg.Connection[Any]) -> tuple[int, int]:
    """(orders, outbox rows) in the test database."""
    row = db.execute("SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox)")
    counts = row.fetchone()
    assert counts is not None
    return counts[0], counts[1]


def assert_problem(response: Any, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= set(problem)
    if field is not None:
        assert field in {error["field"] for error in problem["errors"]}, problem


# --- Creating orders ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/orders/create", "/orders"])
def test_creating_an_order_answers_201_with_the_new_order_and_its_location(
    client: TestClient, path: str
) -> None:
    response = client.post(path, json=order_body(amount=250, description="Сахар"))

    assert response.status_code == 201, response.text
    order = response.json()
    assert set(order) == ORDER_FIELDS
    assert order["user_id"] == str(USER)
    assert order["amount"] == 250
    assert order["description"] == "Сахар"
    assert order["status"] == "new"
    assert order["reason"] is None
    assert uuid.UUID(order["id"]).version == 7
    assert order["created_at"].endswith("Z")
    assert order["created_at"] == order["updated_at"]
    assert response.headers["location"] == f"/order/{order['id']}"
    assert client.get(response.headers["location"]).json() == order


def test_a_created_order_has_exactly_one_outbox_row_asking_for_its_payment(
    client: TestClient, config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    order = create(client, amount=777)

    rows = orders_db.execute(
        "SELECT event_id, topic, key, payload, headers, published_at FROM outbox"
    ).fetchall()
    assert len(rows) == 1
    event_id, topic, key, envelope, headers, published_at = rows[0]
    assert (
        topic
        == config.topic(TOPIC_PAYMENT_REQUESTED)
        == "test-orders-api." + TOPIC_PAYMENT_REQUESTED
    )
    assert key == order["user_id"]
    assert published_at is None
    assert set(envelope) == {"event_id", "type", "occurred_at", "schema_version", "payload"}
    assert envelope["event_id"] == str(event_id) == headers["event_id"]
    assert envelope["type"] == TYPE_PAYMENT_REQUESTED
    assert envelope["schema_version"] == 1
    assert datetime.fromisoformat(envelope["occurred_at"]).tzinfo is not None
    assert envelope["payload"] == {"order_id": order["id"], "user_id": str(USER), "amount": 777}


def test_every_order_gets_its_own_event(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    orders = [create(client, amount=n) for n in (1, 2, 3)]

    payloads = [r[0] for r in orders_db.execute("SELECT payload FROM outbox ORDER BY id")]
    assert [p["payload"]["order_id"] for p in payloads] == [o["id"] for o in orders]
    assert len({p["event_id"] for p in payloads}) == 3


@pytest.mark.parametrize(
    "description",
    ["", "x" * 1000, "я" * 1000, "😀" * 1000],
    ids=["empty", "1000 ascii", "1000 cyrillic", "1000 emoji"],
)
def test_a_description_may_be_empty_or_up_to_1000_characters(
    client: TestClient, description: str
) -> None:
    assert create(client, description=description)["description"] == description


@pytest.mark.parametrize("amount", [1, 10**15])
def test_the_amount_bounds_are_accepted(client: TestClient, amount: int) -> None:
    assert create(client, amount=amount)["amount"] == amount


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("amount zero", order_body(amount=0), "amount"),
    ("amount negative", order_body(amount=-5), "amount"),
    ("amount fractional", order_body(amount=1.5), "amount"),
    ("amount float literal", order_body(amount=1000.0), "amount"),
    ("amount string", order_body(amount="10"), "amount"),
    ("amount boolean", order_body(amount=True), "amount"),
    ("amount null", order_body(amount=None), "amount"),
    ("amount above 10^15", order_body(amount=10**15 + 1), "amount"),
    ("amount missing", {"user_id": str(USER), "description": "x"}, "amount"),
    ("user_id missing", {"amount": 1, "description": "x"}, "user_id"),
    ("description missing", {"user_id": str(USER), "amount": 1}, "description"),
    ("description too long", order_body(description="x" * 1001), "description"),
    ("description not a string", order_body(description=42), "description"),
    ("description null", order_body(description=None), "description"),
    ("description with NUL", order_body(description="a\x00b"), "description"),
    ("unknown field", order_body(status="paid"), "status"),
    ("malformed user_id", order_body(user_id="not-a-uuid"), "user_id"),
    ("user_id not a string", order_body(user_id=123), "user_id"),
    ("body is an array", [order_body()], "body"),
    ("body is a string", "order", "body"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_invalid_input_is_422_and_writes_nothing(
    client: TestClient, orders_db: psycopg.Connection[Any], case: str, body: Any, field: str
) -> None:
    response = client.post("/orders/create", json=body)

    assert_problem(response, 422, field)
    assert row_counts(orders_db) == (0, 0)


def _raw(text: str) -> bytes:
    return text.encode()


RAW_BODY = '{"user_id": "%s", "amount": %s, "description": "x"}'
BAD_REQUESTS: list[tuple[str, bytes, str | None, int]] = [
    ("NaN literal", _raw(RAW_BODY % (USER, "NaN")), "application/json", 422),
    ("Infinity literal", _raw(RAW_BODY % (USER, "Infinity")), "application/json", 422),
    ("exponent literal", _raw(RAW_BODY % (USER, "1e3")), "application/json", 422),
    ("5000-digit amount", _raw(RAW_BODY % (USER, "9" * 5000)), "application/json", 422),
    ("nested 3000 deep", b"[" * 3000 + b"]" * 3000, "application/json", 400),
    (
        "nested 3000 deep in a field",
        _raw(RAW_BODY % (USER, 1)).replace(b"}", b', "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
        "application/json",
        400,
    ),
    ("user_id with a trailing hyphen", _raw(RAW_BODY % (f"{USER}-", 1)), "application/json", 422),
    ("user_id as a URN", _raw(RAW_BODY % (f"urn:uuid:{USER}", 1)), "application/json", 422),
    ("null body", b"null", "application/json", 422),
    ("lone surrogate", _raw(RAW_BODY.replace('"x"', '"\\ud800"') % (USER, 1)), None, 422),
    ("malformed JSON", b'{"user_id": ', "application/json", 400),
    ("not UTF-8", b'{"description": "\xff"}', "application/json", 400),
    ("trailing garbage", _raw(RAW_BODY % (USER, 1) + "}"), "application/json", 400),
    ("empty body", b"", "application/json", 422),
    ("text/plain", _raw(RAW_BODY % (USER, 1)), "text/plain", 415),
    ("form encoded", b"user_id=x&amount=1", "application/x-www-form-urlencoded", 415),
    ("no content type", _raw(RAW_BODY % (USER, 1)), "", 415),
    ("over 64 KiB", _raw(RAW_BODY.replace('"x"', '"' + "x" * 70_000 + '"') % (USER, 1)), None, 413),
]


@pytest.mark.parametrize(
    ("case", "content", "content_type", "status"),
    BAD_REQUESTS,
    ids=[c[0] for c in BAD_REQUESTS],
)
def test_unreadable_requests_are_refused_and_write_nothing(
    client: TestClient,
    orders_db: psycopg.Connection[Any],
    case: str,
    content: bytes,
    content_type: str | None,
    status: int,
) -> None:
    headers = {"content-type": "application/json" if content_type is None else content_type}
    if content_type == "":
        headers = {}

    response = client.post("/orders", content=content, headers=headers)

    assert_problem(response, status)
    assert row_counts(orders_db) == (0, 0)


# --- Idempotency keys ---------------------------------------------------------------------------


def create_keyed(client: TestClient, key: str, **changes: Any) -> Any:
    return client.post(
        "/orders/create", json=order_body(**changes), headers={"Idempotency-Key": key}
    )


@pytest.mark.parametrize("path", ["/orders/create", "/orders"])
def test_an_order_sent_again_with_its_idempotency_key_is_the_first_one_and_not_written_again(
    client: TestClient, orders_db: psycopg.Connection[Any], path: str
) -> None:
    key = str(uuid.uuid4())
    first = client.post(path, json=order_body(amount=321), headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    orders_db.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (first.json()["id"],))

    again = client.post(path, json=order_body(amount=321), headers={"Idempotency-Key": key})

    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == first.json() | {"status": "paid"}  # as it is now
    assert row_counts(orders_db) == (1, 1)  # one order, one payment request


def test_an_idempotency_key_belongs_to_its_user_and_orders_without_one_are_all_written(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    mine = create_keyed(client, "k").json()
    theirs = create_keyed(client, "k", user_id=str(uuid.uuid4())).json()
    plain = [create(client), create(client)]

    assert len({mine["id"], theirs["id"], *(order["id"] for order in plain)}) == 4
    assert row_counts(orders_db) == (4, 4)


@pytest.mark.parametrize(
    "changes", [{"amount": 322}, {"description": "another"}], ids=["amount", "description"]
)
def test_an_idempotency_key_sent_with_another_order_is_422_and_writes_nothing(
    client: TestClient, orders_db: psycopg.Connection[Any], changes: dict[str, Any]
) -> None:
    first = create_keyed(client, "k", amount=321, description="first").json()

    response = create_keyed(client, "k", **({"amount": 321, "description": "first"} | changes))

    assert_problem(response, 422, "Idempotency-Key")
    assert response.json()["type"] == "/problems/idempotency-key-reused"
    assert row_counts(orders_db) == (1, 1)
    assert client.get(f"/order/{first['id']}").json() == first


@pytest.mark.parametrize(
    "key",
    ["", " ", "with space", "x" * 256, "ключ", "tab\there"],
    ids=["empty", "blank", "space", "256 chars", "not ascii", "tab"],
)
def test_a_malformed_idempotency_key_is_422_and_writes_nothing(
    client: TestClient, orders_db: psycopg.Connection[Any], key: str
) -> None:
    response = client.post(
        "/orders/create",
        content=json.dumps(order_body()).encode(),
        headers=[(b"content-type", b"application/json"), (b"idempotency-key", key.encode())],
    )

    assert_problem(response, 422, "Idempotency-Key")
    assert row_counts(orders_db) == (0, 0)


def test_the_longest_idempotency_key_is_taken(client: TestClient) -> None:
    key = "~" * 255
    assert create_keyed(client, key).json()["id"] == create_keyed(client, key).json()["id"]


def test_concurrent_requests_with_one_idempotency_key_make_one_order(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    answers = at_once(12, lambda: create_keyed(client, "at-once", amount=5))

    assert [a.status_code for a in answers] == [201] * 12
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 11
    assert row_counts(orders_db) == (1, 1)


@pytest.mark.parametrize(
    ("budget", "status", "written"),
    [
        ("0", 503, 0),  # the gateway has no time left: refused unwritten
        ("5000", 201, 1),
        ("9" * 400, 201, 1),  # absurd: not taken (it was a 500, float overflow)
        ("1.5", 201, 1),  # not a count of milliseconds: not taken
    ],
)
def test_a_create_takes_the_gateway_s_time_left_into_account(
    client: TestClient, orders_db: psycopg.Connection[Any], budget: str, status: int, written: int
) -> None:
    response = client.post(
        "/orders/create", json=order_body(), headers={"X-Request-Budget-Ms": budget}
    )

    assert response.status_code == status, response.text
    assert row_counts(orders_db) == (written, written)


# --- The order and its outbox row commit together ---------------------------------------------


def test_when_the_outbox_insert_fails_the_order_is_rolled_back_too(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    # The order is written, and the outbox INSERT beside it fails.
    orders_db.execute(
        """
        CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'outbox refused by the test'; END $$;
        CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox
            FOR EACH ROW EXECUTE FUNCTION refuse_outbox();
        """
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        response = client.post("/orders/create", json=order_body())

        assert_problem(response, 500)
        assert "outbox refused" not in response.text  # no internals leak
        assert row_counts(orders_db) == (0, 0)

        orders_db.execute("DROP TRIGGER refuse_outbox ON outbox")
        assert client.post("/orders/create", json=order_body()).status_code == 201
        assert row_counts(orders_db) == (1, 1)


def test_when_the_order_insert_fails_no_outbox_row_is_written(
    config: Config, orders_db: psycopg.Connection[Any]
) -> None:
    # A constraint the API does not know about: the order INSERT itself fails, and the outbox
    # INSERT written beside it must not survive it.
    orders_db.execute("ALTER TABLE orders ADD CONSTRAINT test_no_13 CHECK (amount <> 13)")
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        assert_problem(client.post("/orders/create", json=order_body(amount=13)), 500)
        assert row_counts(orders_db) == (0, 0)

        # The pooled connection is clean again: the next order commits with its event.
        assert client.post("/orders/create", json=order_body(amount=14)).status_code == 201
        assert row_counts(orders_db) == (1, 1)


# --- Reading one order -------------------------------------------------------------------------


def test_an_order_is_read_whole_and_by_status(client: TestClient) -> None:
    order = create(client)

    assert client.get(f"/order/{order['id']}").json() == order
    status = client.get(f"/orders/{order['id']}/status")
    assert status.status_code == 200
    assert status.json() == {"id": order["id"], "status": "new"}


def test_a_failed_order_reports_its_reason(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    order = create(client)
    orders_db.execute(
        "UPDATE orders SET status = 'failed', reason = 'account_not_found' WHERE id = %s",
        (order["id"],),
    )

    assert client.get(f"/orders/{order['id']}/status").json() == {
        "id": order["id"],
        "status": "failed",
        "reason": "account_not_found",
    }
    whole = client.get(f"/order/{order['id']}").json()
    assert (whole["status"], whole["reason"]) == ("failed", "account_not_found")


@pytest.mark.parametrize("template", ["/order/{}", "/orders/{}/status"])
def test_an_unknown_order_is_404(client: TestClient, template: str) -> None:
    create(client)
    assert_problem(client.get(template.format(uuid7())), 404)


@pytest.mark.parametrize("template", ["/order/{}", "/orders/{}/status"])
@pytest.mark.parametrize("bad_id", ["42", "not-a-uuid", "0190f7a4-5b6c-7d8e-9f00-11223344556g"])
def test_a_malformed_order_id_is_422(client: TestClient, template: str, bad_id: str) -> None:
    assert_problem(client.get(template.format(bad_id)), 422, "order_id")


# --- Listing -----------------------------------------------------------------------------------


def test_the_list_is_newest_first_and_empty_when_there_are_no_orders(
    client: TestClient,
) -> None:
    empty = client.get("/orders")
    assert empty.status_code == 200
    assert empty.json() == []
    assert "x-next-cursor" not in empty.headers

    ids = [create(client, amount=n)["id"] for n in range(1, 6)]
    listed = client.get("/orders")
    assert [o["id"] for o in listed.json()] == ids[::-1]
    assert all(set(o) == ORDER_FIELDS for o in listed.json())
    assert "x-next-cursor" not in listed.headers
    assert "link" not in listed.headers


def test_filters_by_user_and_by_status(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    other = uuid7()
    mine = [create(client)["id"] for _ in range(3)]
    theirs = [create(client, user_id=str(other))["id"] for _ in range(2)]
    orders_db.execute(
        "UPDATE orders SET status = 'paid' WHERE id = ANY(%s)",
        ([uuid.UUID(mine[0]), uuid.UUID(theirs[1])],),
    )

    def listed(**query: str) -> list[str]:
        response = client.get("/orders", params=query)
        assert response.status_code == 200, response.text
        return [o["id"] for o in response.json()]

    assert listed(user_id=str(USER)) == mine[::-1]
    assert listed(user_id=str(other)) == theirs[::-1]
    assert listed(user_id=str(uuid7())) == []
    assert listed(status="paid") == [theirs[1], mine[0]]
    assert listed(status="new") == [theirs[0], mine[2], mine[1]]
    assert listed(status="failed") == []
    assert listed(user_id=str(USER), status="paid") == [mine[0]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "501"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "1_0"}, "limit"),  # int() reads these four as numbers
        ({"limit": "+5"}, "limit"),
        ({"limit": " 1"}, "limit"),
        ({"limit": "\u0661"}, "limit"),  # ARABIC-INDIC DIGIT ONE
        ({"limit": "9" * 5000}, "limit"),
        ({"status": "success"}, "status"),
        ({"status": "NEW"}, "status"),
        ({"user_id": "nope"}, "user_id"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": "MjAyNQ"}, "cursor"),  # base64url, but of "2025"
        ({"cursor": "x" * 201}, "cursor"),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, query: dict[str, str], field: str) -> None:
    assert_problem(client.get("/orders", params=query), 422, field)


def test_limit_500_is_the_largest_page(client: TestClient) -> None:
    assert client.get("/orders", params={"limit": "500"}).status_code == 200


def _page(client: TestClient, url: str, **params: str) -> tuple[list[dict[str, Any]], str | None]:
    response = client.get(url, params=params)
    assert response.status_code == 200, response.text
    return response.json(), response.headers.get("x-next-cursor")


def test_pages_follow_each_other_by_cursor_and_link_and_end_without_one(
    client: TestClient,
) -> None:
    ids = [create(client, amount=n)["id"] for n in range(1, 15)][::-1]  # 14 = two pages of 7

    first = client.get("/orders", params={"limit": "7", "user_id": str(USER)})
    assert [o["id"] for o in first.json()] == ids[:7]
    cursor = first.headers["x-next-cursor"]
    link = first.headers["link"]
    assert link.endswith('>; rel="next"')
    link_url = link[1 : link.index(">")]
    assert urlsplit(link_url).path == "/orders"
    assert parse_qs(urlsplit(link_url).query) == {
        "limit": ["7"],
        "user_id": [str(USER)],
        "cursor": [cursor],
    }

    second = client.get(link_url)
    assert [o["id"] for o in second.json()] == ids[7:]
    # Exactly 14 orders: the second page is the last, and says so.
    assert "x-next-cursor" not in second.headers
    assert "link" not in second.headers
    assert _page(client, "/orders", limit="7", cursor=cursor)[0] == second.json()


def test_a_cursor_keeps_its_filters_when_given_again(
    client: TestClient, orders_db: psycopg.Connection[Any]
) -> None:
    ids = [create(client)["id"] for _ in range(6)][::-1]
    paid = ids[::2]
    orders_db.execute(
        "UPDATE orders SET status = 'paid' WHERE id = ANY(%s)", ([uuid.UUID(i) for i in paid],)
    )

    seen: list[str] = []
    page, cursor = _page(client, "/orders", status="paid", limit="1")
    seen += [o["id"] for o in page]
    for _ in range(len(ids)):  # bounded: a cursor that does not advance fails, not hangs
        if cursor is None:
            break
        page, cursor = _page(client, "/orders", status="paid", limit="1", cursor=cursor)
        seen += [o["id"] for o in page]
    assert seen == paid
    assert cursor is None


def test_paging_sees_every_existing_order_once_while_new_orders_arrive(
    config: Config, client: TestClient
) -> None:
    existing = {create(client, amount=n)["id"] for n in range(1, 51)}
    inserted_meanwhile: list[str] = []
    stop = threading.Event()
    failures: list[str] = []

    def keep_ordering() -> None:
        # A second instance of the service, as another replica would be, sharing the database.
        with TestClient(create_app(config)) as writer:
            while not stop.is_set():
                response = writer.post("/orders", json=order_body(description="meanwhile"))
                if response.status_code != 201:
                    failures.append(response.text)
                    return
                inserted_meanwhile.append(response.json()["id"])

    writer_thread = threading.Thread(target=keep_ordering)
    writer_thread.start()
    seen: list[dict[str, Any]] = []
    try:
        cursor: str | None = None
        pages = 0
        while pages < 20:  # 50 orders in pages of 7 need 8; a cursor that stalls must not hang
            # Let the writer land at least one more order between every two pages.
            before = len(inserted_meanwhile)
            deadline = time.monotonic() + 10
            while len(inserted_meanwhile) == before and not failures:
                assert time.monotonic() < deadline, "the writer stalled"
                time.sleep(0.005)
            params = {"limit": "7"} | ({"cursor": cursor} if cursor else {})
            page, cursor = _page(client, "/orders", **params)
            seen += page
            pages += 1
            if cursor is None:
                break
    finally:
        stop.set()
        writer_thread.join(timeout=30)

    assert not failures
    assert cursor is None, "paging never reached the last page"
    seen_ids = [o["id"] for o in seen]
    assert len(seen_ids) == len(set(seen_ids)), "an order appeared on two pages"
    assert existing <= set(seen_ids), "an existing order was skipped"
    assert set(seen_ids) <= existing | set(inserted_meanwhile)
    assert pages >= 8  # 50 existing orders in pages of 7
    assert len(inserted_meanwhile) >= pages
    keys = [(datetime.fromisoformat(o["created_at"]), uuid.UUID(o["id"])) for o in seen]
    assert keys == sorted(keys, reverse=True), "pages are not newest first"


# --- Documentation -----------------------------------------------------------------------------


def test_the_openapi_document_describes_every_route_and_its_answers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]

    assert set(paths["/orders/create"]["post"]["responses"]) == {
        "201",
        "400",
        "413",
        "415",
        "422",
        "503",
    }
    assert set(paths["/orders"]) == {"get", "post"}
    assert {p["name"] for p in paths["/orders"]["get"]["parameters"]} == {
        "user_id",
        "status",
        "limit",
        "cursor",
    }
    assert "404" in paths["/orders/{order_id}/status"]["get"]["responses"]
    assert "404" in paths["/order/{order_id}"]["get"]["responses"]
    body = paths["/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False
    assert json.dumps(spec)  # serialisable as served
