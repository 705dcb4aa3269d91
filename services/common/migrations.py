"""Schema migrations: plain `.sql` files under `db/sql/`, applied in order and recorded.

Each database gets `db/sql/common/*.sql` (outbox, inbox, dead letters) and then its own
`db/sql/<service>/*.sql`. A file already recorded in `schema_migrations` is skipped, so
re-running is harmless. `python -m services.common.migrations [orders|payments]` applies them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

from services.common import db
from services.common.config import load

SQL_ROOT = Path(__file__).resolve().parents[2] / "db" / "sql"
SERVICES = ("orders", "payments")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
# Two processes migrating at once (two services starting) must not both apply a file.
LOCK = "SELECT pg_advisory_xact_lock(hashtext('schema_migrations'))"
APPLIED = "SELECT name FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (name) VALUES (%s)"


def migration_files(service: str) -> list[Path]:
    """The files for one service's database, in the order they must be applied."""
    common = sorted((SQL_ROOT / "common").glob("*.sql"))
    own = sorted((SQL_ROOT / service).glob("*.sql"))
    return common + own


def migrate(conninfo: str, service: str, **connect_kwargs: Any) -> list[str]:
    """Apply every pending migration in one transaction; return the names applied.
    `connect_kwargs` go to `psycopg.connect` (`db.connection_kwargs`: the timeouts)."""
    applied_now: list[str] = []
    with psycopg.connect(conninfo, autocommit=False, **connect_kwargs) as conn:
        conn.execute(CREATE_LEDGER)
        conn.execute(LOCK)
        done = {row[0] for row in conn.execute(APPLIED)}
        for path in migration_files(service):
            name = f"{path.parent.name}/{path.name}"
            if name in done:
                continue
            conn.execute(path.read_text())
            conn.execute(RECORD, (name,))
            applied_now.append(name)
    return applied_now


def main(argv: list[str]) -> int:
    config = load()
    for service in argv or SERVICES:
        names = migrate(
            config.database_url(service),
            service,
            **db.connection_kwargs(config, f"{service}-migrations", statement_timeout=False),
        )
        print(f"{service}: applied {len(names)} migration(s) {' '.join(names)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
