"""`just chaos --short` on a whole system of its own: every fault kind once (Kafka down 8 s,
Postgres crashed, Redis emptied, processes killed, a consumer paused past its session timeout,
duplicates and poison, unread payment requests deleted from Kafka), and afterwards every
invariant holds.

Chaos restarts the servers, so this test never touches the stack other tests share: it starts
its own Postgres, Redis and Kafka (scripts/stack.sh with another STACK_DIR and ports) and its
own supervisord, and tears both down. Set CHAOS_SEED to replay a seed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.schedule import FaultKind
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# Variables that would point the isolated system at the shared one.
SHARED = (
    "ORDERS_DATABASE_URL",
    "PAYMENTS_DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPIC_PREFIX",
    "ORDERS_URL",
    "PAYMENTS_URL",
)


def script(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts" / args[0]), *args[1:]],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def isolated_system() -> Iterator[dict[str, str]]:
    """A stack and supervisord of its own on free ports; the environment that reaches them."""
    base = Path(tempfile.mkdtemp(prefix="chaos-e2e-"))
    base.chmod(0o755)  # the postgres OS user keeps its data directory inside
    env = {name: value for name, value in os.environ.items() if name not in SHARED}
    env |= {
        "STACK_DIR": str(base / "stack"),
        "SERVICES_DIR": str(base / "services"),
        "VENV": sys.prefix,
        "VENV_PYTHON": sys.executable,
        # lose-requests waits for the Orders sweeper to ask for the lost orders again.
        "PAYMENT_REREQUEST_AFTER": "5",
        "PAYMENT_REREQUEST_INTERVAL": "1",
        **{
            f"{name}_PORT": str(free_port())
            for name in (
                "POSTGRES",
                "REDIS",
                "KAFKA",
                "KAFKA_CONTROLLER",
                "GATEWAY",
                "ORDERS",
                "PAYMENTS",
                "DASHBOARD",
            )
        },
    }
    try:
        stack = script(env, "stack.sh", "up", timeout=300)
        assert stack.returncode == 0, stack.stdout + stack.stderr
        services = script(env, "services.sh", "up", timeout=180)
        assert services.returncode == 0, services.stdout + services.stderr
        yield env
    finally:
        script(env, "services.sh", "down", timeout=120)
        script(env, "stack.sh", "down", timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_a_short_chaos_run_keeps_every_invariant(isolated_system: dict[str, str]) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1, 10**6))
    done = subprocess.run(
        [sys.executable, "-m", "chaos", "--short", "--seed", str(seed)],
        env=isolated_system,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, f"seed {seed} (replay with CHAOS_SEED={seed}):\n{output[-8000:]}"
    for kind in FaultKind:
        assert f"{kind} after" in output, f"seed {seed}: {kind} was not injected and healed"
    assert f"seed {seed}: all " in output and "invariants hold" in output
