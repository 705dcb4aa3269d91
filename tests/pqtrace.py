"""What a connection sent to Postgres, read from libpq's protocol trace: the tests that count
round trips use it."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from psycopg import pq


@contextlib.contextmanager
def sent_messages(pgconn: pq.abc.PGconn) -> Iterator[list[tuple[str, str]]]:
    """Within the block, trace `pgconn`; after it, the list holds each message it sent to the
    server as (type, content), e.g. ("Sync", ""), ("Query", '"BEGIN"')."""
    sent: list[tuple[str, str]] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            pgconn.untrace()  # flushes libpq's buffered trace
            trace.seek(0)
            for line in trace:
                fields = line.rstrip("\n").split("\t")
                if fields[0] == "F" and len(fields) > 2:
                    sent.append((fields[2], "\t".join(fields[3:]).strip()))
