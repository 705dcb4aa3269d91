"""The Payments HTTP API: open accounts, top them up, read balances.

`uvicorn --factory services.payments.app:create_app` serves it; the gateway reuses `ENDPOINTS`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from starlette.applications import Starlette
from starlette.responses import Response

from services.common import problems
from services.common.api import (
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_SCHEMA,
    IDEMPOTENT_REPLAYED_HEADER,
    PROBLEM_SCHEMA,
    Call,
    Endpoint,
    Reply,
    respond,
)
from services.common.config import Config, load
from services.common.problems import FieldError, Problem
from services.common.service import create_service_app, pool_of
from services.common.validation import AMOUNT_SCHEMA, UUID_SCHEMA, Schema
from services.payments import queries
from services.payments.domain import new_account

TAG: Final = "accounts"
EXAMPLE_ACCOUNT_ID: Final = "0190f7a4-5b6c-7d8e-9f00-112233445566"
EXAMPLE_USER_ID: Final = "0190f7a4-5b6c-7d8e-9f00-aabbccddeeff"

# Request bodies. Unknown fields are refused, so a typo never passes silently.
CREATE_BODY: Final[Schema] = {
    "type": "object",
    "properties": {"user_id": UUID_SCHEMA},
    "additionalProperties": False,
}
CREATE_FOR_USER_BODY: Final[Schema] = {**CREATE_BODY, "required": ["user_id"]}
TOP_UP_BODY: Final[Schema] = {
    "type": "object",
    "required": ["account_id", "amount"],
    "properties": {"account_id": UUID_SCHEMA, "amount": AMOUNT_SCHEMA},
    "additionalProperties": False,
}
DEPOSIT_BODY: Final[Schema] = {
    "type": "object",
    "required": ["amount"],
    "properties": {
        "amount": AMOUNT_SCHEMA,
        "user_id": {**UUID_SCHEMA, "description": "Optional; must equal the user id in the path."},
    },
    "additionalProperties": False,
}

# A client's name for a top-up, so that sending it again credits once.
TOP_UP_KEY: Final[Schema] = {
    **IDEMPOTENCY_KEY_SCHEMA,
    "description": "Your name for this top-up (a UUID, say), 1-255 visible ASCII characters."
    " Send the request again with the same key after a timeout, a dropped connection or a 503:"
    " the account is credited once. Keys are per account, kept for good; the same key with"
    " another amount is refused (422).",
}
# A client's name for the opening of an account, so that sending it again opens one.
ACCOUNT_KEY: Final[Schema] = {
    **IDEMPOTENCY_KEY_SCHEMA,
    "description": "Your name for this request (a UUID, say), 1-255 visible ASCII characters."
    " Send the request again with the same key after a timeout, a dropped connection or a 503:"
    " you get the account it opened, not a second one. There is no account yet to scope the key"
    " to, so keys are shared by every client (use a UUID) and kept for good; the same key with"
    " another body is refused (422).",
}
OPENED: Final = (
    "The new account. Sent again with the same `Idempotency-Key`: the account that request"
    " opened, as it is now, and `Idempotent-Replayed: true`."
)
TOPPED_UP: Final = (
    "The new balance. Sent again with the same `Idempotency-Key`: nothing credited, the balance"
    " as it is now, and `Idempotent-Replayed: true`."
)
REPLAYED: Final = (
    IDEMPOTENT_REPLAYED_HEADER,
    "`true` when an earlier request with this key made the top-up.",
    False,
)
REPLAYED_OPENING: Final = (
    IDEMPOTENT_REPLAYED_HEADER,
    "`true` when an earlier request with this key opened the account.",
    False,
)

# Response bodies.
BALANCE_SCHEMA: Final[Schema] = {"type": "integer", "minimum": 0, "description": "Minor units."}
ACCOUNT: Final[Schema] = {
    "type": "object",
    "required": ["account_id", "user_id", "balance", "created_at"],
    "properties": {
        "account_id": UUID_SCHEMA,
        "user_id": UUID_SCHEMA,
        "balance": BALANCE_SCHEMA,
        "created_at": {"type": "string", "format": "date-time"},
    },
}
ACCOUNT_BALANCE: Final[Schema] = {
    "type": "object",
    "required": ["account_id", "balance"],
    "properties": {"account_id": UUID_SCHEMA, "balance": BALANCE_SCHEMA},
}
USER_BALANCE: Final[Schema] = {
    "type": "object",
    "required": ["account_id", "user_id", "balance"],
    "properties": {"account_id": UUID_SCHEMA, "user_id": UUID_SCHEMA, "balance": BALANCE_SCHEMA},
}
ACCOUNT_EXISTS: Final[Schema] = {
    **PROBLEM_SCHEMA,
    "required": [*PROBLEM_SCHEMA["required"], "account_id"],
    "properties": {**PROBLEM_SCHEMA["properties"], "account_id": UUID_SCHEMA},
}

# The error answers, documented on every endpoint that can give them.
MALFORMED: Final = Reply("Malformed JSON.")
NOT_FOUND: Final = Reply("No such account.")
TOO_LARGE: Final = Reply("Body over 64 KiB.")
MEDIA_TYPE: Final = Reply("Body is not application/json.")
INVALID: Final = Reply("Invalid input: `errors` lists each field and why.")
UNAVAILABLE: Final = Reply("The database is unreachable; retry after `Retry-After` seconds.")
CONFLICT: Final = Reply(
    "The user already has an account; `account_id` names it.",
    ACCOUNT_EXISTS,
    {
        "type": "/problems/account-exists",
        "title": "Account already exists",
        "status": 409,
        "detail": f"User {EXAMPLE_USER_ID} already has account {EXAMPLE_ACCOUNT_ID}.",
        "account_id": EXAMPLE_ACCOUNT_ID,
    },
)
BODY_ERRORS: Final = {400: MALFORMED, 413: TOO_LARGE, 415: MEDIA_TYPE, 422: INVALID}


def account_exists(user_id: uuid.UUID, account_id: uuid.UUID) -> Problem:
    return Problem(
        409,
        "Account already exists",
        f"User {user_id} already has account {account_id}.",
        "account-exists",
        extra={"account_id": str(account_id), "user_id": str(user_id)},
    )


def no_account_of_user(user_id: uuid.UUID) -> Problem:
    return Problem(404, "Account not found", f"User {user_id} has no account.", "not-found")


def balance_limit_exceeded() -> Problem:
    return Problem(
        422,
        "Balance limit exceeded",
        "The top-up would take the balance past the largest amount an account can hold.",
        "balance-limit",
        [FieldError("amount", "would overflow the balance")],
    )


# Tries of the insert-or-find of an account opening.
OPEN_ATTEMPTS: Final = 3


async def open_account(call: Call, user_id: uuid.UUID | None) -> Response:
    """Open the one account of `user_id` (a new user when None), or 409 naming the existing.
    With an `Idempotency-Key` that opened an account before: that account when the request is
    the same (no user again, or the same user), else 422."""
    ids = new_account(user_id)
    key = call.headers.get(IDEMPOTENCY_KEY_HEADER)
    params = {"account_id": ids.account_id, "user_id": ids.user_id, "idempotency_key": key}
    async with pool_of(call.request).connection() as conn:
        # Insert-or-find: accounts are never deleted, so when the insert yields nothing the
        # lookup finds the winner; trying again keeps that true even if it ever were not, and
        # a conflict the lookup cannot name (a unique index it does not know) is a bug: a 500.
        for _ in range(OPEN_ATTEMPTS):
            created = await (await conn.execute(queries.CREATE_ACCOUNT, params)).fetchone()
            if created is not None:
                return respond(_account(created), 201)
            found = await (await conn.execute(queries.OPENED, params)).fetchall()
            if key is not None and (keyed := next((r for r in found if r[4] == key), None)):
                # A bodiless request made its user, whose id is the account's; a request
                # naming a user did not.
                account_id, owner = keyed[:2]
                bodiless = owner == account_id
                if (bodiless and user_id is None) or (not bodiless and owner == user_id):
                    replayed = {IDEMPOTENT_REPLAYED_HEADER: "true"}
                    return respond(_account(keyed[:4]), 201, headers=replayed)
                raise problems.idempotency_key_reused("account", key)
            if existing := [r[0] for r in found if r[1] == ids.user_id]:
                raise account_exists(ids.user_id, existing[0])
    raise RuntimeError(f"opening an account conflicted {OPEN_ATTEMPTS} times with no account")


def _account(row: tuple[Any, ...]) -> dict[str, Any]:
    account_id, user_id, balance, created_at = row
    return {
        "account_id": account_id,
        "user_id": user_id,
        "balance": balance,
        "created_at": created_at,
    }


async def create_account(call: Call) -> Response:
    body = call.body or {}
    user_id = uuid.UUID(body["user_id"]) if "user_id" in body else None
    return await open_account(call, user_id)


async def create_account_for_user(call: Call) -> Response:
    return await open_account(call, uuid.UUID(call.body["user_id"]))


async def fetch_account(call: Call, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """Run one statement answering (account_id, user_id, balance); None when no account."""
    async with pool_of(call.request).connection() as conn:
        return await (await conn.execute(query, params)).fetchone()


@dataclass(frozen=True)
class Credited:
    """A top-up's answer: the account (account_id, user_id, balance), and whether an earlier
    request with the same Idempotency-Key made the top-up (nothing credited this time)."""

    account: tuple[Any, ...]
    replayed: bool = False

    def headers(self) -> dict[str, str]:
        return {IDEMPOTENT_REPLAYED_HEADER: "true"} if self.replayed else {}


async def credit(
    call: Call, query: str, account_id: uuid.UUID | None, user_id: uuid.UUID | None
) -> Credited | None:
    """Run a top-up statement for the account `account_id` or `user_id` names; None when there
    is no such account. A balance past BIGINT is the client's error, not ours."""
    amount: int = call.body["amount"]
    key = call.headers.get(IDEMPOTENCY_KEY_HEADER)
    params = {
        "account_id": account_id,
        "user_id": user_id,
        "amount": amount,
        "idempotency_key": key,
    }
    try:
        row = await fetch_account(call, query, params)
    except psycopg.errors.NumericValueOutOfRange as exc:
        raise balance_limit_exceeded() from exc
    if row is not None:
        return Credited(row)
    if key is None:
        return None
    found = await fetch_account(call, queries.KEYED_TOP_UP, params)
    if found is None or found[3] is None:  # no account (the top-up saw none, at least)
        return None
    if found[3] != amount:  # the key names another top-up of this account
        raise problems.idempotency_key_reused("top-up", key)
    return Credited(found[:3], replayed=True)


async def top_up(call: Call) -> Response:
    account_id = uuid.UUID(call.body["account_id"])
    credited = await credit(call, queries.TOP_UP_ACCOUNT, account_id, None)
    if credited is None:
        raise problems.not_found("Account", account_id)
    row = credited.account
    return respond({"account_id": row[0], "balance": row[2]}, headers=credited.headers())


async def deposit(call: Call) -> Response:
    user_id: uuid.UUID = call.path["user_id"]
    named = call.body.get("user_id")
    if named is not None and uuid.UUID(named) != user_id:
        raise problems.validation_failed(
            [FieldError("user_id", "must equal the user id in the path")]
        )
    credited = await credit(call, queries.TOP_UP_USER, None, user_id)
    if credited is None:
        raise no_account_of_user(user_id)
    row = credited.account
    return respond(
        {"account_id": row[0], "user_id": row[1], "balance": row[2]}, headers=credited.headers()
    )


async def balance_of_account(call: Call) -> Response:
    account_id: uuid.UUID = call.path["account_id"]
    row = await fetch_account(call, queries.BALANCE_OF_ACCOUNT, {"account_id": account_id})
    if row is None:
        raise problems.not_found("Account", account_id)
    return respond({"account_id": row[0], "balance": row[2]})


async def balance_of_user(call: Call) -> Response:
    user_id: uuid.UUID = call.query["user_id"]
    row = await fetch_account(call, queries.BALANCE_OF_USER, {"user_id": user_id})
    if row is None:
        raise no_account_of_user(user_id)
    return respond({"account_id": row[0], "user_id": row[1], "balance": row[2]})


ENDPOINTS: Final[list[Endpoint]] = [
    Endpoint(
        "POST",
        "/accounts/create",
        "createAccount",
        "Open an account",
        TAG,
        create_account,
        description="Without a body a new user is made and `user_id` equals `account_id`.",
        body=CREATE_BODY,
        body_required=False,
        headers={IDEMPOTENCY_KEY_HEADER: ACCOUNT_KEY},
        responses={
            201: Reply(OPENED, ACCOUNT, headers=(REPLAYED_OPENING,)),
            409: CONFLICT,
            503: UNAVAILABLE,
            **BODY_ERRORS,
        },
    ),
    Endpoint(
        "POST",
        "/accounts",
        "createAccountForUser",
        "Open the account of a user",
        TAG,
        create_account_for_user,
        body=CREATE_FOR_USER_BODY,
        headers={IDEMPOTENCY_KEY_HEADER: ACCOUNT_KEY},
        responses={
            201: Reply(OPENED, ACCOUNT, headers=(REPLAYED_OPENING,)),
            409: CONFLICT,
            503: UNAVAILABLE,
            **BODY_ERRORS,
        },
    ),
    Endpoint(
        "POST",
        "/accounts/top_up",
        "topUpAccount",
        "Top up an account",
        TAG,
        top_up,
        body=TOP_UP_BODY,
        headers={IDEMPOTENCY_KEY_HEADER: TOP_UP_KEY},
        responses={
            200: Reply(TOPPED_UP, ACCOUNT_BALANCE, headers=(REPLAYED,)),
            404: NOT_FOUND,
            503: UNAVAILABLE,
            **BODY_ERRORS,
        },
    ),
    Endpoint(
        "POST",
        "/accounts/{user_id}/deposit",
        "depositToUser",
        "Top up the account of a user",
        TAG,
        deposit,
        body=DEPOSIT_BODY,
        path_params={"user_id": UUID_SCHEMA},
        headers={IDEMPOTENCY_KEY_HEADER: TOP_UP_KEY},
        responses={
            200: Reply(TOPPED_UP, USER_BALANCE, headers=(REPLAYED,)),
            404: NOT_FOUND,
            503: UNAVAILABLE,
            **BODY_ERRORS,
        },
    ),
    Endpoint(
        "GET",
        "/accounts/{account_id}/balance",
        "getAccountBalance",
        "Balance of an account",
        TAG,
        balance_of_account,
        path_params={"account_id": UUID_SCHEMA},
        responses={
            200: Reply("The balance.", ACCOUNT_BALANCE),
            404: NOT_FOUND,
            422: INVALID,
            503: UNAVAILABLE,
        },
    ),
    Endpoint(
        "GET",
        "/accounts/balance",
        "getUserBalance",
        "Balance of a user's account",
        TAG,
        balance_of_user,
        query={"user_id": UUID_SCHEMA},
        required_query=frozenset({"user_id"}),
        responses={
            200: Reply("The balance.", USER_BALANCE),
            404: NOT_FOUND,
            422: INVALID,
            503: UNAVAILABLE,
        },
    ),
]


def create_app(config: Config | None = None) -> Starlette:
    """The Payments app; reads the environment when no `config` is given."""
    return create_service_app(
        service="payments",
        title="Payments",
        description="Accounts, top-ups and balances. Orders are charged from Kafka events.",
        endpoints=ENDPOINTS,
        config=config or load(),
    )
