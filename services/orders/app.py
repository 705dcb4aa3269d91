"""The Orders HTTP API: create orders (with their payment request, atomically), list them and
read their status. `uvicorn --factory services.orders.app:create_app` serves it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlencode
from uuid import UUID

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.responses import Response

from services.common import outbox, problems
from services.common.api import (
    BUDGET_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_SCHEMA,
    IDEMPOTENT_REPLAYED_HEADER,
    Call,
    Endpoint,
    Handler,
    Reply,
    respond,
)
from services.common.config import Config, load
from services.common.events import TOPIC_PAYMENT_REQUESTED, FailureReason
from services.common.ids import uuid7
from services.common.problems import FieldError
from services.common.service import create_service_app, pool_of
from services.common.validation import AMOUNT_SCHEMA, MAX_DESCRIPTION, UUID_SCHEMA, Schema
from services.orders import queries
from services.orders.domain import (
    Cursor,
    InvalidCursor,
    Order,
    OrderStatus,
    decode_cursor,
    encode_cursor,
    is_storable_text,
    payment_requested,
)
from services.orders.writer import SHARE_OF_BUDGET, OrderWriter

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 500
TAG: Final = "orders"

# --- Schemas: validated on the way in and published in /openapi.json ---------------------------

_EXAMPLE_ORDER: Final = {
    "id": "0190f7a4-5b6c-7d8e-9f00-112233445566",
    "user_id": "0190f7a4-0000-7d8e-9f00-aabbccddeeff",
    "amount": 10000,
    "description": "iPhone 17",
    "status": "new",
    "reason": None,
    "created_at": "2025-06-17T20:55:35.806222Z",
    "updated_at": "2025-06-17T20:55:35.806222Z",
}

CREATE_ORDER_BODY: Final[Schema] = {
    "type": "object",
    "required": ["user_id", "amount", "description"],
    "additionalProperties": False,
    "properties": {
        "user_id": UUID_SCHEMA,
        "amount": AMOUNT_SCHEMA,
        "description": {
            "type": "string",
            "maxLength": MAX_DESCRIPTION,
            "description": "Free text, possibly empty; no NUL or unpaired surrogate characters.",
            "examples": ["iPhone 17"],
        },
    },
    "examples": [
        {"user_id": _EXAMPLE_ORDER["user_id"], "amount": 10000, "description": "iPhone 17"}
    ],
}

STATUS_SCHEMA: Final[Schema] = {"type": "string", "enum": [s.value for s in OrderStatus]}
REASON_SCHEMA: Final[Schema] = {
    "type": ["string", "null"],
    "enum": [*(r.value for r in FailureReason), None],
    "description": "Why payment failed; null unless status is failed.",
}

ORDER_SCHEMA: Final[Schema] = {
    "type": "object",
    "required": list(_EXAMPLE_ORDER),
    "properties": {
        "id": UUID_SCHEMA,
        "user_id": UUID_SCHEMA,
        "amount": AMOUNT_SCHEMA,
        "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
        "status": STATUS_SCHEMA,
        "reason": REASON_SCHEMA,
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}

ORDER_STATUS_SCHEMA: Final[Schema] = {
    "type": "object",
    "required": ["id", "status"],
    "properties": {
        "id": UUID_SCHEMA,
        "status": STATUS_SCHEMA,
        "reason": {
            "type": "string",
            "enum": [r.value for r in FailureReason],
            "description": "Present only when status is failed.",
        },
    },
}

LIST_QUERY: Final[dict[str, Schema]] = {
    "user_id": {**UUID_SCHEMA, "description": "Only this user's orders."},
    "status": {**STATUS_SCHEMA, "description": "Only orders in this status."},
    "limit": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE_SIZE,
        "default": DEFAULT_PAGE_SIZE,
        "description": "Page size.",
    },
    "cursor": {
        "type": "string",
        "minLength": 1,
        "maxLength": 200,
        "description": "The X-Next-Cursor of the previous page (opaque).",
    },
}

ORDER_ID: Final[dict[str, Schema]] = {"order_id": UUID_SCHEMA}

# --- Handlers ----------------------------------------------------------------------------------


def _order(row: tuple[Any, ...]) -> Order:
    order_id, user_id, amount, description, status, reason, created_at, updated_at = row
    return Order(
        id=order_id,
        user_id=user_id,
        amount=amount,
        description=description,
        status=OrderStatus(status),
        reason=None if reason is None else FailureReason(reason),
        created_at=created_at,
        updated_at=updated_at,
    )


async def create_order(call: Call) -> Response:
    """Store a new order and its payment request in one statement: both or neither."""
    description: str = call.body["description"]
    if not is_storable_text(description):
        raise problems.validation_failed(
            [FieldError("description", "must not contain NUL or unpaired surrogate characters")]
        )
    config: Config = call.request.app.state.config
    order_id = uuid7()
    user_id = UUID(call.body["user_id"])
    amount: int = call.body["amount"]
    event_row = outbox.row(
        config.topic(TOPIC_PAYMENT_REQUESTED),
        key=str(user_id),  # one user's requests share a partition, so they are charged in order
        envelope=payment_requested(order_id, user_id, amount),
    )
    key = call.headers.get(IDEMPOTENCY_KEY_HEADER)
    params = {
        "id": order_id,
        "user_id": user_id,
        "amount": amount,
        "description": description,
        "idempotency_key": key,
    }
    writer: OrderWriter = call.request.app.state.order_writer
    order = _order(await writer.create(params | event_row, _time_left(call)))
    headers = {"Location": f"/order/{order.id}"}
    if order.id != order_id:  # the user's order with this key, made by an earlier request
        if key is None or (order.amount, order.description) != (amount, description):
            raise problems.idempotency_key_reused("order", key or "")
        headers[IDEMPOTENT_REPLAYED_HEADER] = "true"
    return respond(order.to_json(), 201, headers=headers)


def _time_left(call: Call) -> float | None:
    """Seconds the gateway still waits for this answer (`BUDGET_HEADER`, in milliseconds when
    it sent the request), less what this request took here so far; None if not said."""
    budget = call.request.headers.get(BUDGET_HEADER, "")
    if not (budget.isascii() and budget.isdigit() and len(budget) <= 9):
        return None
    arrived: float = call.request.state.arrived
    return int(budget) / 1000 - (time.perf_counter() - arrived)


def _next_page_link(call: Call, cursor: str) -> str:
    """The `Link` to the next page: this request's filters and size, with the new cursor."""
    params = {name: str(value) for name, value in call.query.items() if name != "cursor"}
    params["cursor"] = cursor
    return f'<{call.request.url.path}?{urlencode(params)}>; rel="next"'


async def list_orders(call: Call) -> Response:
    """One page of orders, newest first; headers point to the next page when there may be one."""
    limit: int = call.query.get("limit", DEFAULT_PAGE_SIZE)
    params: dict[str, Any] = {"limit": limit + 1}  # one extra row says whether a next page exists
    if "user_id" in call.query:
        params["user_id"] = call.query["user_id"]
    if "status" in call.query:
        params["status"] = call.query["status"]
    if "cursor" in call.query:
        try:
            after = decode_cursor(call.query["cursor"])
        except InvalidCursor:
            raise problems.validation_failed(
                [FieldError("cursor", "is not a cursor this service issued")]
            ) from None
        params["after_created_at"] = after.created_at
        params["after_id"] = after.id
    query = queries.list_orders(
        by_user="user_id" in params,
        by_status="status" in params,
        after_cursor="cursor" in call.query,
    )
    async with pool_of(call.request).connection() as conn:
        rows = await (await conn.execute(query, params)).fetchall()
    orders = [_order(row) for row in rows[:limit]]
    headers: dict[str, str] = {}
    if len(rows) > limit:
        last = orders[-1]
        cursor = encode_cursor(Cursor(last.created_at, last.id))
        headers = {"X-Next-Cursor": cursor, "Link": _next_page_link(call, cursor)}
    return respond([order.to_json() for order in orders], headers=headers)


async def _find_order(call: Call) -> Order:
    order_id: UUID = call.path["order_id"]
    async with pool_of(call.request).connection() as conn:
        row = await (await conn.execute(queries.GET_ORDER, {"id": order_id})).fetchone()
    if row is None:
        raise problems.not_found("Order", order_id)
    return _order(row)


async def get_order(call: Call) -> Response:
    """The whole order."""
    return respond((await _find_order(call)).to_json())


async def get_order_status(call: Call) -> Response:
    """The order's status, and why when it failed."""
    return respond((await _find_order(call)).status_json())


# --- Declarations ------------------------------------------------------------------------------

_CREATED: Final = Reply(
    "The order, status new; `Location` names it. Its payment is requested asynchronously."
    " Sent again with the same `Idempotency-Key`: the order the first request made, as it is"
    " now, and `Idempotent-Replayed: true`.",
    ORDER_SCHEMA,
    _EXAMPLE_ORDER,
    headers=(
        ("Location", "The order's URL: `/order/{id}`.", True),
        (
            IDEMPOTENT_REPLAYED_HEADER,
            "`true` when the order was made by an earlier request.",
            False,
        ),
    ),
)
_ORDER_KEY: Final[Schema] = {
    **IDEMPOTENCY_KEY_SCHEMA,
    "description": "Your name for this order (a UUID, say), 1-255 visible ASCII characters. Send"
    " the request again with the same key after a timeout, a dropped connection or a 503: you"
    " get the order the first request made, never a second one. Keys are per user, kept for"
    " good; the same key with another amount or description is refused (422).",
}
_MALFORMED: Final = Reply("The body is not valid JSON.")
_TOO_LARGE: Final = Reply("The body is over 64 KiB.")
_MEDIA_TYPE: Final = Reply("The body is not application/json.")
_INVALID: Final = Reply("Invalid input; `errors` names each field.")
_NOT_FOUND: Final = Reply("No order has this id.")
_UNAVAILABLE: Final = Reply("The database is unreachable; retry after `Retry-After` seconds.")


def _create_endpoint(path: str, operation_id: str, summary: str) -> Endpoint:
    return Endpoint(
        method="POST",
        path=path,
        operation_id=operation_id,
        summary=summary,
        tag=TAG,
        handler=create_order,
        body=CREATE_ORDER_BODY,
        headers={IDEMPOTENCY_KEY_HEADER: _ORDER_KEY},
        responses={
            201: _CREATED,
            400: _MALFORMED,
            413: _TOO_LARGE,
            415: _MEDIA_TYPE,
            422: _INVALID,
            503: _UNAVAILABLE,
        },
        description="Accounts are not checked here: Payments fails the order if there is none.",
    )


def _read_endpoint(
    path: str, operation_id: str, summary: str, handler: Handler, reply: Reply
) -> Endpoint:
    return Endpoint(
        method="GET",
        path=path,
        operation_id=operation_id,
        summary=summary,
        tag=TAG,
        handler=handler,
        path_params=ORDER_ID,
        responses={200: reply, 404: _NOT_FOUND, 422: _INVALID, 503: _UNAVAILABLE},
    )


ENDPOINTS: Final[list[Endpoint]] = [
    _create_endpoint("/orders/create", "createOrder", "Create an order"),
    _create_endpoint("/orders", "createOrderAlias", "Create an order (alias of /orders/create)"),
    Endpoint(
        method="GET",
        path="/orders",
        operation_id="listOrders",
        summary="List orders, newest first",
        tag=TAG,
        handler=list_orders,
        query=LIST_QUERY,
        responses={
            200: Reply(
                "A page of orders. When a further page may exist, `X-Next-Cursor` holds its "
                'cursor and `Link` its URL (rel="next").',
                {"type": "array", "items": ORDER_SCHEMA},
                [_EXAMPLE_ORDER],
                headers=(
                    ("X-Next-Cursor", "The next page's `cursor`, when one may exist.", False),
                    ("Link", 'The next page\'s URL, rel="next", when one may exist.', False),
                ),
            ),
            422: _INVALID,
            503: _UNAVAILABLE,
        },
    ),
    _read_endpoint(
        "/orders/{order_id}/status",
        "getOrderStatus",
        "An order's status",
        get_order_status,
        Reply(
            "The status, with `reason` when failed.",
            ORDER_STATUS_SCHEMA,
            {"id": _EXAMPLE_ORDER["id"], "status": "failed", "reason": "insufficient_funds"},
        ),
    ),
    _read_endpoint(
        "/order/{order_id}",
        "getOrder",
        "An order",
        get_order,
        Reply("The order.", ORDER_SCHEMA, _EXAMPLE_ORDER),
    ),
]


@asynccontextmanager
async def order_writer(app: Starlette, pool: AsyncConnectionPool) -> AsyncIterator[None]:
    """New orders are written through one `OrderWriter` (group commit) per process."""
    config: Config = app.state.config
    timeout = config.db_connect_timeout + config.db_statement_timeout
    # Without the gateway's word on its time left: the gateway's HTTP_TIMEOUT.
    deadline = config.http_timeout * SHARE_OF_BUDGET
    writer = app.state.order_writer = OrderWriter(pool, timeout, deadline)
    try:
        yield
    finally:
        await writer.close()


def create_app(config: Config | None = None) -> Starlette:
    """The Orders service app; the environment configures it unless `config` is given."""
    return create_service_app(
        service="orders",
        title="Orders service",
        description="Orders of the online store; each is paid asynchronously by Payments.",
        endpoints=ENDPOINTS,
        config=config or load(),
        running=order_writer,
    )
