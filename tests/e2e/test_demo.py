"""The demo scenarios (`just demo`, `demo-double-spend`, `demo-crash`, `demo-seed-curl`) run
against an isolated copy of the whole system, and tell the story they promise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, System, free_port

pytestmark = pytest.mark.e2e

DEMO = str(REPO / "scripts/demo.py")


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    done = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def demo(system: System, *args: str) -> str:
    """Run a scenario against `system`; its output, once it has passed."""
    code, output = run([sys.executable, DEMO, *args], {**system.env, "GATEWAY_URL": system.gateway})
    assert code == 0, output
    assert "every expectation held" in output, output
    return output


def test_the_tour_shows_an_order_paid_live_both_failures_a_422_and_a_balance_that_adds_up(
    system: System,
) -> None:
    output = demo(system, "tour")
    assert "→ POST /accounts/create\n" in output
    assert "new   (the 201)" in output and "ms  paid   (poll #" in output
    assert "status=failed  reason=insufficient_funds" in output
    assert "status=failed  reason=account_not_found" in output
    assert "← 422 Unprocessable Entity  [application/problem+json]" in output
    assert (
        "top-ups 10000 + 5000 − paid 2990 + 4500 + 1200 + 800 = 5510; the balance says 5510"
        in output
    )
    assert "← 201 Created  Idempotent-Replayed: true" in output
    assert f"{system.gateway}/swagger/index.html" in output


def test_the_double_spend_demo_pays_exactly_five_of_twenty_concurrent_orders(
    system: System,
) -> None:
    output = demo(system, "double-spend")
    assert "    5 × paid" in output
    assert "   15 × failed (insufficient_funds)" in output
    assert "balance: 5000 − 5 × 1000 = 0; the account says 0" in output


def test_the_crash_demo_kills_workers_mid_burst_and_every_order_is_paid_once(
    system: System,
) -> None:
    output = demo(system, "crash", "--orders", "60", "--users", "2", "--page-size", "20")
    for program in ("orders-worker", "payments-worker", "listener", "payments-consumer"):
        assert f"({program})" in output  # the kill line
        assert output.count(program) >= 3  # before, killed, restarted
    assert "next page cursor" in output  # 30 orders per customer, pages of 20
    assert "✓ all 60 paid" in output
    assert "✓ Σ paid" in output


def test_the_seed_curl_examples_all_answer_as_the_seeds_expect(system: System) -> None:
    code, output = run(
        [str(REPO / "scripts/demo-seed-curl.sh")], {**system.env, "GATEWAY_URL": system.gateway}
    )
    assert code == 0, output
    assert f'$ curl -X POST "{system.gateway}/accounts/create"' in output
    assert f"$ curl -X GET {system.gateway}/order/" in output
    assert output.count("  ← HTTP ") == 12
    assert "✓ all 12 seed examples answered as expected" in output


def test_a_demo_that_cannot_reach_the_gateway_exits_non_zero_saying_why() -> None:
    gateway = f"http://127.0.0.1:{free_port()}"
    code, output = run([sys.executable, DEMO, "tour"], {"GATEWAY_URL": gateway}, timeout=60)
    assert code == 2
    assert f"cannot talk to the gateway at {gateway}" in output
