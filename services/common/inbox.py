"""The transactional inbox: SQL to record received messages (a duplicate `event_id` is a
no-op), to claim pending ones in arrival order, to record success, failure and dead letters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from services.common.db import GENERIC_PLANS
from services.common.events import PoisonMessage

log = logging.getLogger(__name__)

INSERT: Final = """
INSERT INTO inbox (event_id, topic, key, kafka_partition, kafka_offset, payload)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (event_id) DO NOTHING
"""

# The consumer's way in: it applies what it records in the same transaction, so rows go in
# already marked processed (a row lock and an UPDATE per event less). A duplicate `event_id`
# is skipped and not returned; `seq` gives back the arrival order.
INSERT_PROCESSED: Final = """
INSERT INTO inbox (event_id, topic, key, kafka_partition, kafka_offset, payload, processed_at,
                   attempts)
SELECT event_id, topic, key, kafka_partition, kafka_offset, payload, clock_timestamp(), 1
FROM unnest(%(event_ids)b::uuid[], %(topics)b::text[], %(keys)b::text[], %(partitions)b::int[],
            %(offsets)b::bigint[], %(payloads)b::bytea[])
     WITH ORDINALITY AS m (event_id, topic, key, kafka_partition, kafka_offset, payload, n)
ORDER BY n
ON CONFLICT (event_id) DO NOTHING
RETURNING seq, event_id, topic, key, payload
"""

# Some event of a batch recorded as processed failed: the batch is pending again, to be applied
# event by event.
UNMARK_ALL: Final = """
UPDATE inbox SET processed_at = NULL, attempts = 0 WHERE event_id = ANY(%(event_ids)b::uuid[])
"""

# Arrival order keeps one user's events in the order Kafka delivered them.
CLAIM: Final = """
SELECT event_id, topic, key, payload, attempts
FROM inbox
WHERE processed_at IS NULL AND next_attempt_at <= clock_timestamp()
ORDER BY seq
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

MARK_PROCESSED: Final = """
UPDATE inbox SET processed_at = clock_timestamp(), attempts = attempts + 1
WHERE event_id = %(event_id)s
"""

MARK_ALL_PROCESSED: Final = """
UPDATE inbox SET processed_at = clock_timestamp(), attempts = attempts + 1
WHERE event_id = ANY(%(event_ids)b::uuid[])
"""

RECORD_FAILURE: Final = """
UPDATE inbox
SET attempts = attempts + 1,
    last_error = %(error)s,
    next_attempt_at = clock_timestamp() + make_interval(secs => %(backoff_seconds)s)
WHERE event_id = %(event_id)s
"""

DEAD_LETTER: Final = """
WITH moved AS (
    UPDATE inbox
    SET processed_at = clock_timestamp(), attempts = attempts + 1, last_error = %(reason)s
    WHERE event_id = %(event_id)s
    RETURNING event_id, topic, key, payload, attempts
)
INSERT INTO dead_letters (event_id, topic, key, payload, reason, attempts)
SELECT event_id, topic, key, payload, %(reason)s, attempts FROM moved
ON CONFLICT (event_id) DO NOTHING
"""

# As outbox.PURGE: at most `limit` rows, oldest first.
PURGE: Final = """
DELETE FROM inbox WHERE event_id IN (
    SELECT event_id FROM inbox
    WHERE processed_at < now() - make_interval(secs => %(retention_seconds)s)
    ORDER BY processed_at LIMIT %(limit)s
)
"""

BACKLOG: Final = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(received_at)), 0)
FROM inbox WHERE processed_at IS NULL
"""

DEAD_LETTER_COUNT: Final = "SELECT count(*) FROM dead_letters"


def backoff_seconds(attempts: int, base: float = 0.2, cap: float = 30.0) -> float:
    """Exponential backoff before retry number `attempts + 1` of a failed message."""
    return float(min(cap, base * (2 ** max(0, attempts))))


# One applier at a time per database: events are applied in arrival order, so one user's
# orders are charged in the order they were created. Batches keep that cheap.
# With generic plans for the batch statements that follow (`db.GENERIC_PLANS`).
APPLY_LOCK: Final = f"{GENERIC_PLANS}; SELECT pg_advisory_xact_lock(hashtext('inbox_apply'))"


@dataclass(frozen=True)
class Received:
    """One message as the consumer took it off Kafka."""

    event_id: object
    topic: str
    key: str | None
    partition: int | None
    offset: int | None
    payload: bytes


@dataclass(frozen=True)
class Pending:
    """One claimed inbox row, handed to a service's handler."""

    event_id: object
    topic: str
    key: str | None
    payload: bytes
    attempts: int


# A service's effect for one event: runs inside the applier's transaction (a savepoint), so
# the effect, its outgoing outbox rows and the inbox mark commit together or not at all.
# Raise PoisonMessage for what can never succeed; any other exception is retried. A handler
# may also have an `apply_all(conn, batch)` method with the same effect for a whole batch, in
# order (fewer statements); if it raises, the batch is applied event by event.
ApplyHandler = Callable[[psycopg.Connection[Any], Pending], None]


def record(conn: psycopg.Connection[Any], messages: Iterable[Received]) -> None:
    """Insert received messages; an `event_id` already there is silently skipped."""
    with conn.cursor() as cur:
        cur.executemany(
            INSERT,
            [(m.event_id, m.topic, m.key, m.partition, m.offset, m.payload) for m in messages],
        )


def record_processed(conn: psycopg.Connection[Any], messages: Sequence[Received]) -> list[Pending]:
    """Insert received messages already marked processed, for the caller to apply in the same
    transaction (`apply_whole`); return the new ones in arrival order (duplicates of an
    `event_id` already there are skipped)."""
    rows = conn.execute(
        INSERT_PROCESSED,
        {
            "event_ids": [m.event_id for m in messages],
            "topics": [m.topic for m in messages],
            "keys": [m.key for m in messages],
            "partitions": [m.partition for m in messages],
            "offsets": [m.offset for m in messages],
            "payloads": [m.payload for m in messages],
        },
    ).fetchall()
    return [
        Pending(event_id, topic, key, bytes(payload), attempts=0)
        for _seq, event_id, topic, key, payload in sorted(rows, key=lambda row: row[0])
    ]


def describe_failure(exc: Exception) -> str:
    """The reason stored with a failed attempt (and with its dead letter)."""
    prefix = "poison" if isinstance(exc, PoisonMessage) else type(exc).__name__
    return f"{prefix}: {exc}"[:1000]


@dataclass(frozen=True)
class ApplyReport:
    applied: int = 0
    retried: int = 0
    dead: int = 0

    @property
    def claimed(self) -> int:
        return self.applied + self.retried + self.dead


def apply_pending(
    conn: psycopg.Connection[Any],
    handler: ApplyHandler,
    *,
    limit: int,
    max_attempts: int,
) -> ApplyReport:
    """Apply one batch of pending inbox rows in a transaction of its own (`apply_batch`)."""
    with conn.transaction():
        return apply_batch(conn, handler, limit=limit, max_attempts=max_attempts)


def apply_batch(
    conn: psycopg.Connection[Any],
    handler: ApplyHandler,
    *,
    limit: int,
    max_attempts: int,
) -> ApplyReport:
    """Apply one batch of pending inbox rows inside the caller's transaction (the consumer's,
    which has just recorded them) and return what happened.

    The batch is first applied whole, under one savepoint, and marked processed with one
    statement: the common case costs no per-event bookkeeping. If any event fails, that
    savepoint is rolled back and the batch is applied again one savepoint per event: a failing
    one is rolled back alone, its attempt counted with backoff, or after `max_attempts` moved
    to `dead_letters`; the rest commit."""
    conn.execute(APPLY_LOCK)
    rows = [
        Pending(event_id, topic, key, bytes(payload), attempts)
        for event_id, topic, key, payload, attempts in conn.execute(
            CLAIM, {"limit": limit}
        ).fetchall()
    ]
    return _apply_rows(conn, handler, rows, max_attempts)


def apply_whole(
    conn: psycopg.Connection[Any], handler: ApplyHandler, rows: Sequence[Pending]
) -> None:
    """Apply every row inside the caller's transaction; the first failing event raises."""
    if not rows:  # a batch of duplicates only: no statement at all
        return
    apply_all = getattr(handler, "apply_all", None)
    if apply_all is not None:  # a handler that can apply a whole batch at once
        apply_all(conn, rows)
    else:
        for pending in rows:
            handler(conn, pending)


def apply_recorded_one_by_one(
    conn: psycopg.Connection[Any],
    handler: ApplyHandler,
    rows: Sequence[Pending],
    *,
    max_attempts: int,
    failure: str,
) -> ApplyReport:
    """Apply rows `record_processed` has just inserted event by event, inside the caller's
    transaction (which holds `APPLY_LOCK`): the way back for a batch that failed whole
    (`failure` says why) in a transaction the caller rolled back and recorded again."""
    conn.execute(UNMARK_ALL, {"event_ids": [p.event_id for p in rows]})
    return _apply_one_by_one(conn, handler, rows, max_attempts, failure)


def _apply_rows(
    conn: psycopg.Connection[Any],
    handler: ApplyHandler,
    rows: Sequence[Pending],
    max_attempts: int,
) -> ApplyReport:
    if not rows:
        return ApplyReport()
    event_ids = [p.event_id for p in rows]

    def whole() -> None:
        apply_whole(conn, handler, rows)
        conn.execute(MARK_ALL_PROCESSED, {"event_ids": event_ids})

    failure = failure_of_whole(conn, whole, len(rows))
    if failure is None:
        return ApplyReport(applied=len(rows))
    return _apply_one_by_one(conn, handler, rows, max_attempts, failure)


def failure_of_whole(
    conn: psycopg.Connection[Any], body: Callable[[], object], size: int
) -> str | None:
    """Run `body` (a batch of `size` events applied whole) in a transaction, or a savepoint
    inside the caller's: None if it went through, else why it was rolled back (for the event by
    event way back). A lost connection is raised: nothing can be recorded on it."""
    try:
        with conn.transaction():
            body()
        return None
    except psycopg.OperationalError:
        raise
    except Exception as exc:  # some event failed
        failure = describe_failure(exc)
        log.debug("batch of %d rolled back whole (%s)", size, failure)
        return failure


def _apply_one_by_one(
    conn: psycopg.Connection[Any],
    handler: ApplyHandler,
    rows: Sequence[Pending],
    max_attempts: int,
    failure: str,
) -> ApplyReport:
    """A batch that failed whole (`failure` says why), applied again one savepoint per event."""
    applied = retried = dead = 0
    for pending in rows:
        event_id = pending.event_id
        try:
            with conn.transaction():
                handler(conn, pending)
                conn.execute(MARK_PROCESSED, {"event_id": event_id})
            applied += 1
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            error = describe_failure(exc)
            log.warning("inbox event %s failed: %s", event_id, error)
            if pending.attempts + 1 >= max_attempts:
                conn.execute(DEAD_LETTER, {"event_id": event_id, "reason": error})
                dead += 1
            else:
                conn.execute(
                    RECORD_FAILURE,
                    {
                        "event_id": event_id,
                        "error": error,
                        "backoff_seconds": backoff_seconds(pending.attempts),
                    },
                )
                retried += 1
    if applied == len(rows):
        # No event is at fault, so the batch path is: correct, but every batch now costs a
        # transaction per event. (A failing event logs its own warning instead.)
        log.warning(
            "batch of %d failed whole but every event applied alone; the batch path is at "
            "fault: %s",
            len(rows),
            failure,
        )
    return ApplyReport(applied, retried, dead)
