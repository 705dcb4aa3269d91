"""The open-loop load generator: orders are sent on a fixed schedule whether or not earlier ones
were answered, and each latency is measured from the request's *scheduled* time, so a stalled
system shows up as latency instead of silently slowing the generator (no coordinated omission).

The generator's own lag (actual send time - scheduled time) is recorded too, so a reader can
tell whether the generator kept up. Orders go out through `bench.http1`, a lean keep-alive
client (a fifth of aiohttp's CPU per request, which is CPU the system under test gets back);
accounts are opened with aiohttp, which reads their JSON answers."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench import http1

CREATED = 201


@dataclass(frozen=True)
class Attempt:
    """One request: when it was due, when it went out, when it ended and how (`201`, `503`,
    `timeout`, `connection`); times are the event loop's monotonic clock, in seconds."""

    scheduled: float
    sent: float
    done: float
    outcome: str

    @property
    def created(self) -> bool:
        return self.outcome == str(CREATED)


@dataclass
class Recorder:
    """The attempts of one phase, and the requests still in flight."""

    attempts: list[Attempt] = field(default_factory=list)
    scheduled: int = 0
    _in_flight: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, request: Coroutine[Any, Any, None]) -> None:
        self.scheduled += 1
        task = asyncio.get_running_loop().create_task(request)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def settle(self) -> None:
        """Wait for every request in flight (each is bounded by the client timeout)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight))


async def on_schedule(
    rate: float,
    seconds: float,
    start: float,
    send: Callable[[float], None],
    clock: Callable[[], float] | None = None,
) -> None:
    """Call `send(due)` for `rate` requests per second over `seconds` from `start`, each at its
    due time whatever the earlier ones are doing (`clock`: the event loop's by default)."""
    now = clock or asyncio.get_running_loop().time
    for i in range(round(rate * seconds)):
        due = start + i / rate
        if (delay := due - now()) > 0:
            await asyncio.sleep(delay)
        send(due)


@dataclass(frozen=True)
class Accounts:
    """The users orders are placed for; the underfunded ones run dry after a few orders."""

    users: tuple[str, ...]
    underfunded: tuple[str, ...]


class OpenLoop:
    """Places orders through the gateway at given rates. Consecutive `run` calls continue one
    schedule (a ramp's steps follow each other exactly); `restart` starts a new one."""

    def __init__(
        self,
        client: http1.Client,
        users: Sequence[str],
        amounts: tuple[int, int],
        seed: int = 1,
    ) -> None:
        self._client = client
        self._users = list(users)
        self._amounts = amounts
        self._random = random.Random(seed)
        self._sequence = 0
        self._next_at: float | None = None

    def restart(self) -> None:
        """The next `run` starts its schedule now."""
        self._next_at = None

    @property
    def next_at(self) -> float | None:
        """When the next run's first request is due (None: as soon as it starts)."""
        return self._next_at

    async def run(self, rate: float, seconds: float, recorder: Recorder, description: str) -> None:
        """Schedule `rate` orders per second for `seconds`; returns once the last one is sent
        (answers still in flight are the recorder's)."""
        loop = asyncio.get_running_loop()
        start = self._next_at if self._next_at is not None else loop.time()
        await on_schedule(
            rate,
            seconds,
            start,
            lambda due: recorder.spawn(self._place(due, recorder, self._body(description))),
        )
        self._next_at = start + seconds

    def _body(self, description: str) -> bytes:
        user = self._users[self._sequence % len(self._users)]
        self._sequence += 1
        amount = self._random.randint(*self._amounts)
        return json.dumps({"user_id": user, "amount": amount, "description": description}).encode()

    async def _place(self, due: float, recorder: Recorder, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        # `timeout_waiting_for_a_connection`: never written, every one of the client's
        # connections was held by a request the system had not answered yet.
        answer = await self._client.post("/orders/create", body)
        recorder.attempts.append(Attempt(due, sent, loop.time(), answer.outcome))


def client_session(timeout: float, max_connections: int) -> aiohttp.ClientSession:
    """The pooled client that opens the accounts; `timeout` bounds each request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
        timeout=aiohttp.ClientTimeout(total=timeout),
        trust_env=False,
    )


async def open_accounts(
    session: aiohttp.ClientSession,
    gateway: str,
    count: int,
    underfunded_share: float,
    balances: tuple[int, int],
    concurrency: int = 16,
) -> Accounts:
    """Create `count` accounts and top them up: `balances[0]` for most, `balances[1]` for the
    underfunded share (whose later orders fail with insufficient_funds)."""
    underfunded_count = round(count * underfunded_share)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> str:
        async with gate:
            async with session.post(f"{gateway}/accounts/create") as answer:
                account = await answer.json()
                if answer.status != CREATED:
                    raise RuntimeError(f"POST /accounts/create answered {answer.status}: {account}")
            amount = balances[1] if index < underfunded_count else balances[0]
            async with session.post(
                f"{gateway}/accounts/top_up",
                json={"account_id": account["account_id"], "amount": amount},
            ) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"top_up answered {answer.status}: {await answer.text()}")
            return str(account["user_id"])

    users = await asyncio.gather(*(one(i) for i in range(count)))
    return Accounts(tuple(users), tuple(users[:underfunded_count]))
