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
        """`timeout`: seconds one batch may take (getting a connection included); past it its
        callers are answered 503, whether or not the transaction went through (psycopg cancels
        the statement, so it went through only if it was committing right then).

        `deadline`: seconds from a caller's arrival by which its order is written or refused,
        shorter than the gateway's own timeout. An order still queued then (behind a stalled
        insert) is answered 503 and never written, and a batch may take only what is left of
        its oldest caller's time: a client the gateway answered 503, "retry", must not find
        that order written too and pay for it twice when it does."""
        self._pool = pool
        self._timeout = timeout
        self._deadline = deadline
        self._waiting: list[Waiting] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def create(self, params: dict[str, Any]) -> Row:
        """Insert one order (and its outbox row); return the order's row once it committed."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="order-writer")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Row] = loop.create_future()
        self._waiting.append(Waiting(params, future, loop.time() + self._deadline))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Stop writing; callers still waiting (the server's graceful shutdown ran out) get a
        503 rather than no answer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting, self._waiting = self._waiting, []
        _fail_all(waiting, psycopg.OperationalError("the Orders service is stopping"))

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            if not self._waiting:
                self._arrived.clear()
            now = asyncio.get_running_loop().time()
            late = [one for one in batch if one.due <= now]
            if late:
                log.warning(
                    "%d orders waited %s s for the database: not written", len(late), self._deadline
                )
                _fail_all(
                    late,
                    psycopg.OperationalError(
                        "the order waited too long for the database and was not written"
                    ),
                )
                batch = [one for one in batch if one.due > now]
                if not batch:
                    continue
            try:
                await self._write(batch)
            except Exception as exc:  # a bug here must not leave callers waiting, or stop us
                log.exception("writing %d orders failed", len(batch))
                _fail_all(batch, exc)

    async def _write(self, batch: list[Waiting]) -> None:
        left = min(one.due for one in batch) - asyncio.get_running_loop().time()
        timeout = max(0.0, min(self._timeout, left))
        try:
            async with asyncio.timeout(timeout):
                rows = await self._insert([one.params for one in batch])
        except TimeoutError:
            late = psycopg.OperationalError(f"writing orders took over {timeout:.1f} s")
            _fail_all(batch, late)
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
        for one, row in zip(batch, rows, strict=True):
            if not one.future.done():  # the caller may have gone (request cancelled)
                one.future.set_result(row)

    async def _insert(self, batch: list[dict[str, Any]]) -> list[Row]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(queries.CREATE_ORDERS, queries.create_orders_params(batch))
            rows = {row[0]: row for row in await cursor.fetchall()}
        return [rows[params["id"]] for params in batch]


def _fail(future: asyncio.Future[Row], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _fail_all(batch: list[Waiting], exc: BaseException) -> None:
    for one in batch:
        _fail(one.future, exc)
