"""Steady order traffic through the gateway that survives the faults, and a record of every
request it sent, so each one can be classified afterwards.

Every attempt is identifiable on its own: an order attempt carries a unique token in its
`description`, a top-up attempt a unique amount for its account. A request that timed out or
got a 5xx may or may not have taken effect; after quiescence the orders table and the ledger
say which, instead of a guess."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

import httpx

GIVE_UP_SECONDS: Final = 240.0  # per action: longer than any fault of the schedule
MAX_ATTEMPTS_PER_ACCOUNT: Final = 999  # top-up amounts are multiples of 1000 plus the attempt
FUNDED_SHARE: Final = 0.6  # top-ups cover this much of what a user orders: the rest fails


# --- The plan (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    user: int  # index of the user
    kind: Literal["order", "top_up"]
    amount: int  # a top-up's is a multiple of 1000: the attempt number is added when sent
    due: float  # seconds after the traffic starts


@dataclass(frozen=True)
class Plan:
    initial_top_ups: tuple[int, ...]  # per user, before the faults begin
    actions: tuple[Action, ...]  # by due time

    def orders(self) -> int:
        return sum(1 for a in self.actions if a.kind == "order")

    def top_ups(self) -> int:
        return sum(1 for a in self.actions if a.kind == "top_up")


def split_funding(total: int, parts: int) -> list[int]:
    """`total` in `parts` multiples of 1000, none below 1000."""
    each = max(1000, (total // max(parts, 1)) // 1000 * 1000)
    return [each] * parts


def build_plan(seed: int, *, orders: int, users: int, top_ups: int, duration: float) -> Plan:
    """Who orders what and when, and who tops up how much when. Every user's top-ups (an initial
    one plus some interleaved) cover only FUNDED_SHARE of their orders, so that well over 20% of
    the orders are underfunded whatever the timing."""
    rng = random.Random(f"chaos-traffic-{seed}")
    initial: list[int] = []
    actions: list[Action] = []
    for user in range(users):
        amounts = [
            rng.randint(100, 2_000) for _ in range(orders // users + (user < orders % users))
        ]
        k = top_ups // users + (user < top_ups % users)
        funding = int(sum(amounts) * FUNDED_SHARE)
        initial.append(max(1000, funding // 5 // 1000 * 1000))
        later = split_funding(funding - initial[-1], k) if k else []
        # Top-up j goes after order (j+1)·n/(k+1): spread evenly through the user's orders.
        sequence: list[tuple[Literal["order", "top_up"], int]] = []
        after = {(j + 1) * len(amounts) // (k + 1): j for j in range(k)}
        for index, amount in enumerate(amounts):
            sequence.append(("order", amount))
            if index + 1 in after:
                sequence.append(("top_up", later[after[index + 1]]))
        phase = user / users
        for index, (kind, amount) in enumerate(sequence):
            due = duration * (index + phase) / max(len(sequence), 1)
            actions.append(Action(user, kind, amount, round(due, 3)))
    actions.sort(key=lambda a: (a.due, a.user))
    return Plan(tuple(initial), tuple(actions))


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds before retry `attempt + 1`: exponential, capped at 2 s, jittered."""
    return float(min(2.0, 0.1 * 2**attempt) * (0.5 + rng.random()))


# --- What happened to each request ---------------------------------------------------------------


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # 201 / 200: it took effect
    REJECTED = "rejected"  # 4xx: it did not, and retrying would not help
    UNSENT = "unsent"  # no connection could be opened: it cannot have taken effect
    UNKNOWN = "unknown"  # timed out, dropped, 5xx: classified later from the databases


def classify(status: int | None, error: Exception | None) -> Outcome:
    if error is not None:
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            return Outcome.UNSENT
        return Outcome.UNKNOWN
    assert status is not None
    if status in (200, 201):
        return Outcome.ACCEPTED
    if 400 <= status < 500:
        return Outcome.REJECTED
    return Outcome.UNKNOWN


@dataclass(frozen=True)
class OrderAttempt:
    user_id: str
    description: str  # unique per order meant: finds the order in the database
    amount: int
    outcome: Outcome
    order_id: str | None  # when accepted
    answer: str  # status code or error, for the report
    key: str | None = None  # the Idempotency-Key, the same on every try of one order


@dataclass(frozen=True)
class TopUpAttempt:
    account_id: str
    amount: int  # unique per account: finds the ledger row
    outcome: Outcome
    answer: str


@dataclass
class Traffic:
    """The generator and everything it sent."""

    gateway: str
    run_id: str
    seed: int
    users: list[str] = field(default_factory=list)
    orders: list[OrderAttempt] = field(default_factory=list)
    top_ups: list[TopUpAttempt] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    done_actions: int = 0
    last_accepted_at: float = 0.0  # time.monotonic()
    _attempts: dict[str, int] = field(default_factory=dict)
    _sequence: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(f"chaos-backoff-{self.seed}")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(15.0, connect=2.0),
            limits=httpx.Limits(max_connections=100),
            trust_env=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def create_users(self, count: int) -> None:
        """`count` new accounts (user id == account id); the system must be healthy now."""
        for _ in range(count):
            for attempt in range(1, 21):
                # A failed attempt may have made an account nobody uses: harmless, not ours.
                outcome, answer, body = await self._post("/accounts/create", None)
                if outcome is Outcome.ACCEPTED:
                    self.users.append(str(body["account_id"]))
                    break
                if outcome is Outcome.REJECTED or attempt == 20:
                    raise RuntimeError(f"POST /accounts/create: {answer}")
                await asyncio.sleep(backoff(attempt, self._rng))

    async def _post(
        self, path: str, body: dict[str, object] | None, key: str | None = None
    ) -> tuple[Outcome, str, dict[str, Any]]:
        headers = {"Idempotency-Key": key} if key else None
        try:
            answer = await self._client.post(f"{self.gateway}{path}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            return classify(None, exc), type(exc).__name__, {}
        outcome = classify(answer.status_code, None)
        payload = answer.json() if outcome is Outcome.ACCEPTED else {}
        return outcome, str(answer.status_code), payload

    async def _retrying(self, attempt_once: Callable[[], Awaitable[Outcome]], label: str) -> None:
        """Run `attempt_once()` until it is accepted or rejected, backing off in between."""
        deadline = time.monotonic() + GIVE_UP_SECONDS
        attempt = 0
        while True:
            outcome = await attempt_once()
            if outcome is Outcome.ACCEPTED:
                self.last_accepted_at = time.monotonic()
                return
            if outcome is Outcome.REJECTED:
                return
            attempt += 1
            if time.monotonic() > deadline:
                self.abandoned.append(label)
                return
            await asyncio.sleep(backoff(attempt, self._rng))

    async def place_order(self, user: int, amount: int) -> None:
        """One order, sent until it is accepted or rejected. Every other order carries an
        Idempotency-Key and is sent again as it was (one order, however many tries); the
        others are sent again as new orders, each try with a description of its own, so that
        the invariants can tell which tries made an order."""
        user_id = self.users[user]
        self._sequence += 1
        number = self._sequence
        key = f"chaos-{self.run_id}-{number}" if number % 2 == 0 else None

        async def once() -> Outcome:
            tries = self._attempts.get(f"order-{number}", 0) + 1
            self._attempts[f"order-{number}"] = tries
            description = f"chaos {self.run_id} order {number}" + (
                " (keyed)" if key else f" try {tries}"
            )
            outcome, answer, body = await self._post(
                "/orders/create",
                {"user_id": user_id, "amount": amount, "description": description},
                key,
            )
            order_id = str(body["id"]) if outcome is Outcome.ACCEPTED else None
            self.orders.append(
                OrderAttempt(user_id, description, amount, outcome, order_id, answer, key)
            )
            return outcome

        await self._retrying(once, f"order {number} of {user_id}")

    async def top_up(self, user: int, amount: int) -> None:
        account_id = self.users[user]

        async def once() -> Outcome:
            tries = self._attempts.get(account_id, 0) + 1
            if tries > MAX_ATTEMPTS_PER_ACCOUNT:  # no unique amount left for this account
                self.abandoned.append(f"top-up of {account_id}: out of unique amounts")
                return Outcome.REJECTED
            self._attempts[account_id] = tries
            unique = amount + tries
            outcome, answer, _ = await self._post(
                "/accounts/top_up", {"account_id": account_id, "amount": unique}
            )
            self.top_ups.append(TopUpAttempt(account_id, unique, outcome, answer))
            return outcome

        await self._retrying(once, f"top-up of {account_id}")

    async def run(self, plan: Plan) -> None:
        """Every user's actions in order, each at its due time (or as soon as the user's
        previous action is done, when faults made it late)."""
        started = time.monotonic()

        async def user_loop(user: int) -> None:
            for action in (a for a in plan.actions if a.user == user):
                delay = started + action.due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if action.kind == "order":
                    await self.place_order(user, action.amount)
                else:
                    await self.top_up(user, action.amount)
                self.done_actions += 1

        await asyncio.gather(*(user_loop(u) for u in range(len(self.users))))

    async def fund(self, plan: Plan) -> None:
        """The initial top-ups, before any fault."""
        await asyncio.gather(*(self.top_up(u, a) for u, a in enumerate(plan.initial_top_ups)))
