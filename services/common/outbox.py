"""The transactional outbox: SQL to write an event with the change that caused it, to claim
pending rows for the relay, to mark them published, and to purge old ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from psycopg.types.json import Jsonb

from services.common.events import EVENT_ID_HEADER, Envelope

INSERT: Final = """
INSERT INTO outbox (event_id, topic, key, payload, headers)
VALUES (%(event_id)s, %(topic)s, %(key)s, %(payload)s, %(headers)s)
"""

# Oldest first, and rows another relay holds are skipped rather than waited for.
CLAIM: Final = """
SELECT id, event_id, topic, key, payload
FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""

MARK_PUBLISHED: Final = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(%(ids)b)"

# At most `limit` rows, oldest first: a backlog is purged batch by batch, each committed, where
# one statement for all of it could outlast the statement timeout every time and never finish.
PURGE: Final = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at < now() - make_interval(secs => %(retention_seconds)s)
    ORDER BY published_at LIMIT %(limit)s
)
"""

BACKLOG: Final = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)
FROM outbox WHERE published_at IS NULL
"""


# Each outbox column, its type, and the parameter that carries it as an array when a
# statement writes many rows through `unnest` (`arrays`, `unnest_with`, `insert_from`).
ARRAY_PARAMS: Final = (
    ("event_id", "uuid", "event_ids"),
    ("topic", "text", "topics"),
    ("key", "text", "keys"),
    ("payload", "jsonb", "payloads"),
    ("headers", "jsonb", "headers"),
)
COLUMNS: Final = ", ".join(column for column, _, _ in ARRAY_PARAMS)


def unnest_with(alias: str, own: Sequence[tuple[str, str, str]]) -> str:
    """A FROM item: the statement's `own` arrays ((column, type, parameter) each) and then the
    outbox rows' (`arrays`), unnested side by side into relation `alias`, each row numbered `n`
    in order (for `insert_from`)."""
    columns = [*own, *ARRAY_PARAMS]
    args = ", ".join(f"%({param})b::{kind}[]" for _, kind, param in columns)
    names = ", ".join(column for column, _, _ in columns)
    return f"unnest({args}) WITH ORDINALITY AS {alias} ({names}, n)"


def arrays(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows as `row` gives them, as one array per column, named as in `ARRAY_PARAMS`."""
    return {param: [r[column] for r in rows] for column, _, param in ARRAY_PARAMS}


def insert_from(source: str) -> str:
    """A data-modifying WITH clause's body: insert the outbox rows `source` holds (a relation
    with the outbox columns and an ordinal `n`), in that order, so each key's events keep it."""
    return f"INSERT INTO outbox ({COLUMNS}) SELECT {COLUMNS} FROM {source} ORDER BY n"


def row(topic: str, key: str, envelope: Envelope) -> dict[str, Any]:
    """The parameters of `INSERT` for one event."""
    return {
        "event_id": envelope.event_id,
        "topic": topic,
        "key": key,
        "payload": Jsonb(envelope.to_json()),
        "headers": Jsonb({EVENT_ID_HEADER: str(envelope.event_id), "type": envelope.type}),
    }
