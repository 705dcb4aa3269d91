"""The work the actors do, free of Dramatiq: relay the outbox to Kafka, apply the inbox,
sweep what a lost wake-up left behind, and purge old rows.

Every function takes its pool and clients as arguments, so tests call them directly."""

from __future__ import annotations

import contextlib
import logging
import math
import select
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psycopg
from confluent_kafka import Producer
from prometheus_client import Counter, Histogram, start_http_server
from psycopg import Connection, pq
from psycopg_pool import ConnectionPool

from services.common import inbox, outbox
from services.common.config import Config
from services.common.db import GENERIC_PLANS
from services.common.events import EVENT_ID_HEADER, encode
from services.common.inbox import ApplyHandler
from services.common.kafka import Outgoing, produce_batch

log = logging.getLogger(__name__)

# Served by each worker process (see actors/broker.py); `pool` is "<service>-worker".
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
RELAY_BATCH = Histogram(
    "relay_batch_size", "Outbox rows per relay batch", ["pool"], buckets=BATCH_BUCKETS
)
APPLY_BATCH = Histogram(
    "apply_batch_size", "Inbox rows per apply batch", ["pool"], buckets=BATCH_BUCKETS
)
RELAYED = Counter("relayed_events", "Outbox rows published to Kafka", ["pool"])
APPLIED = Counter("applied_events", "Inbox rows applied", ["pool"])
RETRIED = Counter("retried_events", "Inbox rows that failed and will be retried", ["pool"])
DEAD = Counter("dead_lettered_events", "Inbox rows moved to dead_letters", ["pool"])

# One relay at a time per database keeps every key's events in outbox order on the topic.
# Marking rows published is bookkeeping that is safe to redo (a mark lost in a crash re-sends
# rows the consumers drop as duplicates), so its commit does not wait for the WAL flush. The
# mark goes with a generic plan (`db.GENERIC_PLANS`).
RELAY_LOCK: Final = (
    f"SET LOCAL synchronous_commit = off; {GENERIC_PLANS}; "
    "SELECT pg_advisory_xact_lock(hashtext('outbox_relay'))"
)


def serve_metrics(port: int, host: str, process: str) -> None:
    """Serve this process's metrics on `port` (0: not at all); a busy port must not stop the
    work itself."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("%s metrics not served on port %d: %s", process, port, exc)


class Pacer:
    """Batches under load, no delay at light load. A batch of at least `min_batch` events means
    they are coming fast: the next batch starts only `interval` after it, and everything that
    arrives meanwhile goes together, so a relay run or an inbox transaction serves many events
    for a fraction of the Redis, Postgres and Kafka round trips per event. A smaller batch
    means light load: the next one starts at once."""

    def __init__(
        self, interval: float, min_batch: int = 3, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.min_batch = min_batch
        self.clock = clock
        self.last = -math.inf
        self.loaded = False  # the last batch said load: the next one waits for the interval

    def remaining(self) -> float:
        """Seconds until the next batch may start (0: now)."""
        if not self.loaded:
            return 0.0
        return max(0.0, self.last + self.interval - self.clock())

    def started(self, size: int, *, loaded: bool = False) -> None:
        """A batch of `size` events starts now; `loaded`: the caller knows of load however
        small the batch (the listener, finding a relay run lingering)."""
        self.last = self.clock()
        self.loaded = loaded or size >= self.min_batch


class RelayIncomplete(RuntimeError):
    """Kafka did not acknowledge every message of a batch; the rest is retried later."""


def to_outgoing(row: tuple[Any, ...]) -> Outgoing:
    """An outbox row as the Kafka message that carries it."""
    row_id, event_id, topic, key, payload = row
    envelope_type = payload.get("type", "") if isinstance(payload, dict) else ""
    return Outgoing(
        ref=row_id,
        topic=topic,
        key=key,
        value=encode(payload),
        headers=((EVENT_ID_HEADER, str(event_id).encode()), ("type", str(envelope_type).encode())),
    )


def relay_outbox(pool: ConnectionPool, producer: Producer, config: Config) -> int:
    """Publish pending outbox rows, batch by batch, until none is left; return how many.

    Rows are marked published only after Kafka acknowledged them: a relay killed in between
    re-sends them later, and consumers drop the duplicates by `event_id`."""
    published = 0
    while True:
        with pool.connection() as conn, conn.transaction():
            conn.execute(RELAY_LOCK)
            rows = conn.execute(outbox.CLAIM, {"limit": config.relay_batch_size}).fetchall()
            if not rows:
                return published
            delivered = produce_batch(
                producer, [to_outgoing(r) for r in rows], config.kafka_timeout
            )
            if delivered:
                conn.execute(outbox.MARK_PUBLISHED, {"ids": delivered})
        published += len(delivered)
        RELAY_BATCH.labels(pool.name).observe(len(rows))
        RELAYED.labels(pool.name).inc(len(delivered))
        if len(delivered) < len(rows):
            raise RelayIncomplete(f"{len(rows) - len(delivered)} of {len(rows)} not acknowledged")
        if len(rows) < config.relay_batch_size:
            return published


# The channel every outbox insert notifies (once per transaction; db/sql/common).
OUTBOX_CHANNEL: Final = "outbox_pending"


def notifications(pgconn: pq.abc.PGconn, timeout: float) -> Tally[str]:
    """How many notifications arrived on `pgconn` per channel, waiting at most `timeout` for
    the first: all that arrived together are served by one wake-up.

    libpq's own calls (select on the socket, PQconsumeInput, PQnotifies) rather than psycopg's
    `Connection.notifies()`, whose generator machinery was most of the listener's CPU (py-spy).
    A connection the server closed raises OperationalError (from `consume_input`, or reading
    its socket) at the latest on the read after the server's goodbye; the caller reconnects."""
    ready, _, _ = select.select([pgconn.socket], [], [], timeout)
    received: Tally[str] = Tally()
    if not ready:
        return received
    pgconn.consume_input()
    while (note := pgconn.notifies()) is not None:
        received[note.relname.decode()] += 1
    return received


class Watch(Protocol):
    """What a lingering relay needs of a `CommitWatch`."""

    def notified(self, timeout: float) -> bool: ...

    def stop(self) -> None: ...


class CommitWatch:
    """Outbox commits notified on a service's database, seen by a lingering relay on a `LISTEN`
    connection of its own (`connect` opens it), so that it can pass right after a burst of
    commits instead of on its own clock. It listens only from the first `notified` until
    `stop`: a connection listening with nobody reading would fill its socket, and Postgres
    keeps every notification until each listener has taken it."""

    def __init__(
        self, connect: Callable[[], Connection[Any]], sleep: Callable[[float], object] = time.sleep
    ) -> None:
        self._connect = connect
        self._sleep = sleep
        self._conn: Connection[Any] | None = None
        self._listening = False

    def notified(self, timeout: float) -> bool:
        """Whether an outbox commit was notified since the last call, waiting at most `timeout`
        for one. When it cannot tell (it was not listening yet, or the connection broke) it
        waits out `timeout` and says yes: the caller then relays, which is always safe."""
        try:
            if not self._listening:
                if self._conn is None:
                    self._conn = self._connect()
                self._command(b"LISTEN " + OUTBOX_CHANNEL.encode())
                self._listening = True
                self._sleep(timeout)
                return True  # commits made before LISTEN took hold were not notified
            assert self._conn is not None
            return bool(notifications(self._conn.pgconn, timeout))
        except (psycopg.Error, OSError) as exc:
            log.warning("relay: commit notifications unavailable (%s); relaying on the clock", exc)
            self.close()
            self._sleep(timeout)
            return True

    def stop(self) -> None:
        """Stop listening until the next `notified`, dropping what was notified meanwhile."""
        if not self._listening:
            return
        self._listening = False
        try:
            self._command(b"UNLISTEN *")
        except (psycopg.Error, OSError):
            self.close()

    def _command(self, sql: bytes) -> None:
        """Run `sql` with libpq's own call, so that the notifications it reads wait in libpq's
        queue (which `notifications` drains) rather than in psycopg's backlog."""
        assert self._conn is not None
        pgconn = self._conn.pgconn
        result = pgconn.exec_(sql)
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise psycopg.OperationalError(pgconn.get_error_message())
        while pgconn.notifies() is not None:
            pass

    def close(self) -> None:
        self._listening = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error, OSError):
                conn.close()


# A relay run lingers this long at most, whatever RELAY_LINGER says: a worker's shutdown waits
# for its running actors for 15 s (supervisord's and compose's --worker-shutdown-timeout).
MAX_LINGER: Final = 10.0
# A lingering relay stops after this many short batches in a row (see `LingeringRelay`). With
# one, at 500 orders/s most runs stopped after one or two passes, many on an empty one, and each
# stop cost a wake-up: ~20 a second through Redis instead of about one per `RELAY_LINGER`.
SHORT_PASSES: Final = 3


class LingeringRelay:
    """A service's relay runs in one worker process (`run` is the actor's body; `relay`
    publishes what is pending and returns how many rows).

    At light load a run relays once and is done, like a plain wake-up. Under load (a batch of
    `min_batch` rows or more) it keeps going for up to `linger` seconds: it relays every
    `interval`, gathering what was committed meanwhile, and holds the wake-up flag (`hold`)
    so that the listener sends no wake-up the run would serve anyway; each of those costs
    Redis round trips, a listener pass and a hand-off between Dramatiq's threads. Once
    `short_passes` batches in a row come short, or the time is up, it drops the flag
    (`release`) and relays once more: what was committed before that is published by this run,
    what is committed after it gets a wake-up of its own. One short batch is no sign that the
    load has gone: a pass that starts at once because the one before took a whole interval
    finds little, and so does one that falls between two bursts of payment answers (each
    consumer transaction commits its batch's answers together). With `interval` 0 (no pacing)
    it never lingers. Each hold is a round trip to Redis, so a run holds again only once
    `hold_every` seconds have passed since its last hold (the flag's expiry must be well
    beyond that), not before every pass.

    With a `watch` (`CommitWatch`) a lingering run also watches commits. Commits
    notified during a pass or the first half of the interval after it mean steady load (orders
    arriving one by one): the next pass starts at the interval's end, as without it. Otherwise
    the next pass starts as soon as a commit is notified (or two intervals after the last one
    began, if none is): commits that come in bursts (a consumer commits its batch's answers
    together, once per batch) are relayed as each lands rather than up to an interval later.

    One run lingers at a time. A run woken while another holds the flag (the flag expired, or
    the listener woke it just before the other took the flag) has nothing to do: the holder
    relays again after it, at the latest in its last pass. A run that fails lingering drops
    the flag, and Dramatiq's retry of it (a fraction of a second later) publishes what was
    committed while it held it, as for any failed run."""

    def __init__(
        self,
        relay: Callable[[], int],
        hold: Callable[[], object],
        release: Callable[[], object],
        *,
        interval: float,
        linger: float,
        min_batch: int = 3,
        short_passes: int = SHORT_PASSES,
        hold_every: float = 0.0,
        watch: Watch | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._relay, self._hold, self._release = relay, hold, release
        self._watch = watch
        self.interval, self.linger, self.min_batch = interval, min(linger, MAX_LINGER), min_batch
        self.short_passes, self.hold_every = short_passes, hold_every
        self._clock, self._sleep = clock, sleep
        self._state = threading.Lock()
        self._lingering = False  # a run of this process may linger (at most one)
        self._holding = False  # ... and holds the flag: it will relay again

    def run(self) -> int:
        """One woken run; return how many rows it published."""
        with self._state:
            if self._holding:
                return 0
            may_linger, self._lingering = not self._lingering, True
        try:
            return self._run(self.linger if may_linger else 0.0)
        finally:
            if may_linger:
                with self._state:
                    self._lingering = self._holding = False

    def _run(self, linger: float) -> int:
        self._release()  # from here on a commit needs a wake-up: this run may read past it
        started = self._clock()
        published = self._relay()
        if published < self.min_batch or self.interval <= 0 or linger <= 0:
            return published
        deadline = started + linger
        short = 0  # batches in a row that came short
        held = -math.inf  # when this run last held the flag
        try:
            while True:
                with self._state:
                    self._holding = True
                now = self._clock()
                if now - held >= self.hold_every:
                    self._hold()  # commits from here on are this run's to publish
                    held = now
                self._wait(started)
                started = self._clock()
                if self._watch is not None:
                    self._watch.notified(0)  # what was notified so far, this pass publishes
                batch = self._relay()
                published += batch
                short = short + 1 if batch < self.min_batch else 0
                if short >= self.short_passes or self._clock() >= deadline:
                    break
        finally:
            with self._state:
                self._holding = False
            if self._watch is not None:
                self._watch.stop()
            self._release()
        return published + self._relay()

    def _wait(self, started: float) -> None:
        """Until the next pass of a lingering run is due (the last one began at `started`)."""
        due = started + self.interval
        if self._watch is None:
            self._sleep(max(0.0, due - self._clock()))
            return
        self._sleep(max(0.0, started + self.interval / 2 - self._clock()))
        if self._watch.notified(0):  # commits kept coming: steady load
            self._sleep(max(0.0, due - self._clock()))
        else:  # a burst is relayed as soon as its commit is notified
            self._watch.notified(max(0.0, started + 2 * self.interval - self._clock()))


def observe(pool_name: str, report: inbox.ApplyReport) -> None:
    """Count one apply batch in the process's metrics."""
    if report.claimed:
        APPLY_BATCH.labels(pool_name).observe(report.claimed)
        APPLIED.labels(pool_name).inc(report.applied)
        RETRIED.labels(pool_name).inc(report.retried)
        DEAD.labels(pool_name).inc(report.dead)


def apply_inbox(pool: ConnectionPool, handler: ApplyHandler, config: Config) -> int:
    """Apply pending inbox rows, batch by batch, until a batch comes back short: the sweeper's
    way to retry failed events and to finish what a consumer left."""
    applied = 0
    while True:
        with pool.connection() as conn:
            report = inbox.apply_pending(
                conn, handler, limit=config.apply_batch_size, max_attempts=config.max_attempts
            )
        applied += report.applied
        observe(pool.name, report)
        if report.claimed < config.apply_batch_size:
            return applied


def record_and_apply(
    conn: Connection[Any],
    messages: Sequence[inbox.Received],
    handler: ApplyHandler,
    config: Config,
) -> inbox.ApplyReport:
    """The consumer's path: record a batch in the inbox and apply it in the same transaction,
    so an event's inbox row, its effect and its outgoing outbox row commit together; a failing
    event is rolled back alone and left for the sweeper to retry with backoff.

    The batch is applied whole first, with no savepoint (two round trips fewer between the
    effects and their commit, in every consumer transaction). If an event fails, the whole
    transaction is rolled back, and the batch is recorded again and applied event by event,
    one savepoint each."""
    recorded: list[inbox.Pending] = []

    def whole() -> None:
        conn.execute(inbox.APPLY_LOCK)
        recorded[:] = inbox.record_processed(conn, messages)
        inbox.apply_whole(conn, handler, recorded)

    # A lost connection is raised: the consumer retries on a new one.
    failure = inbox.failure_of_whole(conn, whole, len(messages))
    if failure is None:
        return inbox.ApplyReport(applied=len(recorded))
    with conn.transaction():
        conn.execute(inbox.APPLY_LOCK)
        rows = inbox.record_processed(conn, messages)
        return inbox.apply_recorded_one_by_one(
            conn, handler, rows, max_attempts=config.max_attempts, failure=failure
        )


@dataclass(frozen=True)
class Purged:
    outbox: int
    inbox: int


# Rows deleted per purge statement, and seconds one purge may go on (a sweep also relays and
# applies; what is left waits for the next purge).
PURGE_BATCH: Final = 10_000
PURGE_SECONDS: Final = 30.0


def purge(
    pool: ConnectionPool,
    config: Config,
    batch: int = PURGE_BATCH,
    clock: Callable[[], float] = time.monotonic,
) -> Purged:
    """Delete published outbox rows and processed inbox rows older than the retention window,
    `batch` rows per transaction, for at most `PURGE_SECONDS`, half of it per table (so that a
    backlog in one cannot starve the other)."""
    params = {"retention_seconds": config.retention_hours * 3600, "limit": batch}
    purged = {outbox.PURGE: 0, inbox.PURGE: 0}
    for statement in purged:
        deadline = clock() + PURGE_SECONDS / len(purged)
        while clock() < deadline:
            with pool.connection() as conn, conn.transaction():
                deleted = conn.execute(statement, params).rowcount
            purged[statement] += deleted
            if deleted < batch:
                break
    return Purged(outbox=purged[outbox.PURGE], inbox=purged[inbox.PURGE])
