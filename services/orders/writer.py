"""Group commit for new orders: the orders that arrive while one insert is in flight are
written together by the next one.

Under load this turns many one-order transactions into a few multi-order ones, each a single
statement (`queries.CREATE_ORDERS`, one round trip in autocommit): one WAL flush and one NOTIFY
for the whole batch (Postgres holds a lock shared by all its databases from a notifying commit
through its WAL flush, so those commits queue up one by one). An order that arrives while
nothing is in flight is written at once, alone, by the same statement. Every order is answered
only after its transaction committed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from services.common import db
from services.orders import queries

log = logging.getLogger(__name__)

# Orders per transaction, at most.
MAX_BATCH: Final = 100
# An order is written within this share of the time its caller waits for the answer (what the
# gateway says it has left, else HTTP_TIMEOUT); the rest is for the answer's way back, and for
# finding out whether an insert that ran out of time committed after all.
SHARE_OF_BUDGET: Final = 0.8
# An order with less time left than this when its batch starts is refused unwritten: too little
# for an insert under load, and it would cut short the time of every order of its batch.
MIN_TIME_LEFT: Final = 0.25
# Seconds to find out whether an insert that ran out of time committed after all (the writer
# waits meanwhile).
LOOKUP_TIMEOUT: Final = 0.5
_LOOKUP_FAILURES: Final[tuple[type[BaseException], ...]] = (TimeoutError, *db.UNAVAILABLE)

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Waiting:
    """A caller's order parameters, the future its row (or its error) is delivered to, and the
    loop time by which the order must be written or refused."""

    params: dict[str, Any]
    future: asyncio.Future[Row]
    due: float


class OrderWriter:
    """Writes each caller's order with `queries.CREATE_ORDERS`, batching concurrent callers."""

    def __init__(self, pool: AsyncConnectionPool, timeout: float, deadline: float) -> None:
        """`timeout`: seconds one batch may take at most (getting a connection included).

        `deadline`: seconds from a caller's arrival by which its order is written or refused
        when the caller did not say how long it waits (`create`'s `budget`). A client the
        gateway answered 503, "retry", must not find that order written too and pay for it
        twice when it does: an order with less than `MIN_TIME_LEFT` of its time left when its
        batch starts (it waited behind a stalled insert) is answered 503 and never written, and
        a batch may take only what is left of its oldest order's time. psycopg cancels an
        insert that runs out of it; one that was committing at that instant went through, and
        its orders are looked up and answered 201 after all. Left: a database that stalls past
        psycopg's own wait for the cancel (5 s) may still commit an insert answered 503."""
        self._pool = pool
        self._timeout = timeout
        self._deadline = deadline
        self._waiting: list[Waiting] = []
        self._writing: list[Waiting] = []  # the batch being written
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def create(self, params: dict[str, Any], budget: float | None = None) -> Row:
        """Insert one order (and its outbox row); return the order's row once it committed.
        `budget`: seconds the caller still waits for the answer, if it said."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="order-writer")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Row] = loop.create_future()
        allowed = (
            self._deadline if budget is None else min(self._deadline, budget * SHARE_OF_BUDGET)
        )
        self._waiting.append(Waiting(params, future, loop.time() + allowed))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Stop writing; callers still waiting (the server's graceful shutdown ran out) get a
        503 rather than no answer."""
        writing = self._writing  # the batch in flight, if any: cancelled with the task
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting, self._waiting = writing + self._waiting, []
        _fail_all(waiting, psycopg.OperationalError("the Orders service is stopping"))

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            if not self._waiting:
                self._arrived.clear()
            self._writing = batch
            try:
                await self._write(batch)
            except Exception as exc:  # a bug here must not leave callers waiting, or stop us
                log.exception("writing %d orders failed", len(batch))
                _fail_all(batch, exc)
            finally:
                self._writing = []

    async def _write(self, batch: list[Waiting]) -> None:
        now = asyncio.get_running_loop().time()
        late = [one for one in batch if one.due - now < MIN_TIME_LEFT]
        if late:
            log.warning("%d orders not written: their time ran out while they waited", len(late))
            _fail_all(
                late, psycopg.OperationalError("the order's time ran out before it was written")
            )
            batch = [one for one in batch if one.due - now >= MIN_TIME_LEFT]
            if not batch:
                return
        timeout = min(self._timeout, min(one.due for one in batch) - now)
        try:
            async with asyncio.timeout(timeout):
                rows = await self._insert([one.params for one in batch])
        except TimeoutError:
            await self._answer_after_all(batch, f"writing orders took over {timeout:.1f} s")
            return
        except db.UNAVAILABLE as exc:  # the database is out of reach: every caller gets a 503
            _fail_all(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0].future, exc)
                return
            # One bad order must not fail the others: write each alone.
            log.warning(
                "a batch of %d orders failed (%s); writing them one by one", len(batch), exc
            )
            for one in batch:
                await self._write([one])
            return
        # Committed: what follows is outside the batch's time, so that it cannot take the
        # answers of the orders written with it.
        answers = await self._with_holders([one.params for one in batch], rows)
        for one, answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                _fail(one.future, answer)
            elif not one.future.done():  # the caller may have gone (request cancelled)
                one.future.set_result(answer)

    async def _answer_after_all(self, batch: list[Waiting], why: str) -> None:
        """After an insert ran out of time: 201 for the orders it wrote all the same (it was
        committing when it was cancelled), 503 for the others or when that cannot be told."""
        found: dict[Any, Row] = {}
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT), self._pool.connection() as conn:
                ids = [one.params["id"] for one in batch]
                cursor = await conn.execute(queries.GET_ORDERS, {"ids": ids})
                found = {row[0]: row for row in await cursor.fetchall()}
        except _LOOKUP_FAILURES as exc:
            log.warning("could not tell whether %d late orders were written: %s", len(batch), exc)
        for one in batch:
            row = found.get(one.params["id"])
            if row is None:
                _fail(one.future, psycopg.OperationalError(why))
            elif not one.future.done():
                one.future.set_result(row)

    async def _insert(self, batch: list[dict[str, Any]]) -> list[Row | None]:
        """Write the batch; each order's row, or None for an order whose idempotency key its
        user already gave an order (earlier, or earlier in this batch): not written."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(queries.CREATE_ORDERS, queries.create_orders_params(batch))
            rows = {row[0]: row for row in await cursor.fetchall()}
        return [rows.get(params["id"]) for params in batch]

    async def _with_holders(
        self, batch: list[dict[str, Any]], rows: list[Row | None]
    ) -> list[Row | BaseException]:
        """`rows` (as `_insert` gives them, for `batch`) with, in place of each None, the row
        of the order holding that (user, idempotency key), read by a statement of its own
        within `LOOKUP_TIMEOUT`. When it cannot be read, that order alone fails, with a 503:
        the orders written are committed, and their answers must not depend on it (a 503
        would have their clients send them again); the repeat has its key, so sending it
        again is safe."""
        keyed = [
            (params["user_id"], params["idempotency_key"])
            for params, row in zip(batch, rows, strict=True)
            if row is None
        ]
        holders: dict[tuple[Any, str], Row] = {}
        failure: BaseException | None = None
        if keyed:
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT), self._pool.connection() as conn:
                    cursor = await conn.execute(
                        queries.KEYED_ORDERS,
                        {"user_ids": [u for u, _ in keyed], "keys": [k for _, k in keyed]},
                    )
                    holders = {(row[1], row[-1]): row[:-1] for row in await cursor.fetchall()}
            except (TimeoutError, psycopg.Error) as exc:
                log.warning("could not read the orders holding %d keys: %s", len(keyed), exc)
                failure = exc
        answers: list[Row | BaseException] = []
        for params, row in zip(batch, rows, strict=True):
            found = row or holders.get((params["user_id"], params["idempotency_key"]))
            if found is None:
                unread = psycopg.OperationalError("the order with this idempotency key is unread")
                unread.__cause__ = failure
                answers.append(unread)
            else:
                answers.append(found)
        return answers


def _fail(future: asyncio.Future[Row], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _fail_all(batch: list[Waiting], exc: BaseException) -> None:
    for one in batch:
        _fail(one.future, exc)
