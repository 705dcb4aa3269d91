"""The whole system, for end-to-end tests: every process of `just up`, isolated from a live one.

The session gets its own databases, Kafka topic prefix and consumer groups, Redis database,
ports and supervisord, on the stack's real servers, and tears all of it down afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import redis

from services.common import kafka
from services.common.config import Config
from services.common.events import TOPICS
from services.common.migrations import migrate
from tests.conftest import conninfo

REPO = Path(__file__).resolve().parents[2]
E2E_REDIS_DB = 9  # the live system uses 0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class System:
    """A running system and handles on its parts."""

    gateway: str
    orders_url: str
    payments_url: str
    env: dict[str, str]
    http: httpx.Client

    def ctl(self, *args: str) -> str:
        """A supervisorctl command (`restart listener`, `pid payments-worker`, ...)."""
        done = subprocess.run(
            [str(REPO / "scripts/services.sh"), "ctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout.strip()

    def kill(self, program: str) -> None:
        """SIGKILL a process (and its children): supervisord restarts it."""
        pid = self.ctl("pid", program)
        assert pid.isdigit() and pid != "0", f"{program} is not running: {pid!r}"
        subprocess.run(["pkill", "-KILL", "-P", pid], check=False)
        os.kill(int(pid), 9)

    def orders_sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.orders_url) as conn:
            return conn.execute(query, params or None).fetchall()

    def payments_sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.payments_url) as conn:
            return conn.execute(query, params or None).fetchall()

    def funded_user(self, amount: int) -> str:
        """A new account topped up with `amount`; its user id."""
        account = self.http.post(f"{self.gateway}/accounts/create").json()
        if amount:
            answer = self.http.post(
                f"{self.gateway}/accounts/top_up",
                json={"account_id": account["account_id"], "amount": amount},
            )
            assert answer.status_code == 200, answer.text
        return str(account["user_id"])

    def place_order(self, user_id: str, amount: int, description: str = "e2e") -> str:
        answer = self.http.post(
            f"{self.gateway}/orders/create",
            json={"user_id": user_id, "amount": amount, "description": description},
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def balance(self, user_id: str) -> int:
        answer = self.http.get(f"{self.gateway}/accounts/balance", params={"user_id": user_id})
        assert answer.status_code == 200, answer.text
        return int(answer.json()["balance"])

    def wait_terminal(
        self, order_ids: list[str], timeout: float = 60
    ) -> dict[str, tuple[str, Any]]:
        """Poll the orders database until every order is paid or failed; their (status, reason)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.orders_sql(
                "SELECT id::text, status, reason FROM orders WHERE id = ANY(%s::uuid[])", order_ids
            )
            states = {r[0]: (r[1], r[2]) for r in rows}
            if len(states) == len(order_ids) and all(s != "new" for s, _ in states.values()):
                return states
            if time.monotonic() > deadline:
                pending = [o for o in order_ids if states.get(o, ("new",))[0] == "new"]
                raise AssertionError(f"{len(pending)} order(s) still new after {timeout}s")
            time.sleep(0.1)


def eventually(check: Callable[[], T], timeout: float = 30, interval: float = 0.2) -> T:
    """Call `check` until it stops raising AssertionError; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def _create_database(name: str, service: str) -> str:
    with psycopg.connect(conninfo("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = conninfo(name)
    migrate(url, service)
    return url


def _drop_database(name: str) -> None:
    with psycopg.connect(conninfo("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def show_logs(services_dir: str, lines: int = 40) -> None:
    """The end of every process's log, past pytest's capture: a failure on CI can be read."""
    out = sys.__stderr__
    if out is None:
        return
    out.write(f"\n==> e2e: a test failed; the system's logs are kept in {services_dir}\n")
    for log in sorted(Path(services_dir, "logs").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.write(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail) + "\n")


@pytest.fixture(scope="session")
def system(request: pytest.FixtureRequest) -> Iterator[System]:
    run_id = uuid.uuid4().hex[:8]
    orders_db, payments_db = f"e2e_orders_{run_id}", f"e2e_payments_{run_id}"
    orders_url = _create_database(orders_db, "orders")
    payments_url = _create_database(payments_db, "payments")
    redis_url = f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/{E2E_REDIS_DB}"
    redis.Redis.from_url(redis_url, socket_timeout=5).flushdb()
    ports = {
        name: str(free_port())
        for name in (
            "GATEWAY",
            "ORDERS",
            "PAYMENTS",
            "DASHBOARD",
            "ORDERS_WORKER_METRICS",
            "PAYMENTS_WORKER_METRICS",
            "ORDERS_CONSUMER_METRICS",
            "PAYMENTS_CONSUMER_METRICS",
        )
    }
    services_dir = tempfile.mkdtemp(prefix="e2e-services-")
    env = {
        **os.environ,
        "ORDERS_DATABASE_URL": orders_url,
        "PAYMENTS_DATABASE_URL": payments_url,
        "REDIS_URL": redis_url,
        "KAFKA_TOPIC_PREFIX": f"e2e-{run_id}.",
        "SERVICES_DIR": services_dir,
        "VENV": sys.prefix,
        "SWEEP_INTERVAL": "1",
        "PAYMENT_REREQUEST_INTERVAL": "1",
        "INBOX_MAX_ATTEMPTS": "3",
        **{f"{name}_PORT": port for name, port in ports.items()},
    }
    env.pop("ORDERS_URL", None)
    env.pop("PAYMENTS_URL", None)
    script = str(REPO / "scripts/services.sh")
    started = subprocess.run([script, "up"], env=env, timeout=180, check=False)
    client = httpx.Client(timeout=30)
    try:
        assert started.returncode == 0, f"the system did not start; logs in {services_dir}"
        yield System(
            gateway=f"http://127.0.0.1:{ports['GATEWAY']}",
            orders_url=orders_url,
            payments_url=payments_url,
            env=env,
            http=client,
        )
    finally:
        client.close()
        subprocess.run([script, "down"], env=env, timeout=120, check=False)
        config = Config(kafka_topic_prefix=env["KAFKA_TOPIC_PREFIX"])
        admin = kafka.admin(config)
        for future in admin.delete_topics([config.topic(t) for t in TOPICS]).values():
            try:
                future.result(timeout=15)
            except Exception as exc:  # a topic never created is fine
                print(f"topic cleanup: {exc}")
        _drop_database(orders_db)
        _drop_database(payments_db)
        if request.session.testsfailed:
            show_logs(services_dir)
        else:
            shutil.rmtree(services_dir, ignore_errors=True)
