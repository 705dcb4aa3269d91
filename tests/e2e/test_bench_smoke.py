"""`just bench` runs against a whole (isolated) system and writes a well-formed report: a few
seconds of low load and a tiny ramp. Speed is never asserted, only the report's shape."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import REPO, System

pytestmark = pytest.mark.e2e

SUMMARY_KEYS = {"count", "p50", "p95", "p99", "max", "mean"}


@pytest.fixture(scope="module")
def bench_run(system: System, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    results = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--gateway",
            system.gateway,
            "--orders-database-url",
            system.orders_url,
            "--users",
            "10",
            "--rates",
            "20",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--ramp-start",
            "20",
            "--ramp-step",
            "10",
            "--ramp-step-seconds",
            "2",
            "--ramp-max",
            "30",
            "--window",
            "2",
            "--drain-timeout",
            "60",
            "--idle-seconds",
            "1",
            "--results-dir",
            str(results),
        ],
        cwd=REPO,
        env=system.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return results, done.stdout


@pytest.fixture(scope="module")
def report(bench_run: tuple[Path, str]) -> dict[str, Any]:
    results, _ = bench_run
    loaded: dict[str, Any] = json.loads((results / "latest.json").read_text())
    return loaded


def assert_summary(summary: dict[str, Any], count: int) -> None:
    assert set(summary) == SUMMARY_KEYS
    assert summary["count"] == count
    if count:
        values = [summary[k] for k in ("p50", "p95", "p99", "max")]
        assert all(isinstance(v, float) and v >= 0 for v in values), summary
        assert values == sorted(values), summary
    else:
        assert summary["p50"] is None


def test_the_run_writes_a_timestamped_json_and_chart_and_the_latest_copies(
    bench_run: tuple[Path, str], report: dict[str, Any]
) -> None:
    results, _ = bench_run
    stamped = sorted(results.glob("bench-*.json"))
    assert len(stamped) == 1
    assert json.loads(stamped[0].read_text()) == report
    for png in (stamped[0].with_suffix(".png"), results / "latest.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_names_the_machine_the_command_the_commit_and_every_target(
    bench_run: tuple[Path, str], report: dict[str, Any]
) -> None:
    _, stdout = bench_run
    assert f"cores {report['machine']['cpus']}" in stdout
    # The interpreter every process of the run used (the suite's own, from .venv), read from
    # each of our processes.
    interpreter = os.path.realpath(sys.executable)
    assert report["machine"]["python_executable"] == interpreter
    services = report["machine"]["service_executables"]
    assert {"gateway", "orders", "payments", "listener"} <= set(services)
    assert set(services.values()) == {interpreter}
    assert (
        f"python {platform.python_version()} ({interpreter}): the generator's and every service's"
        in stdout
    )
    assert "command: python -m bench --gateway" in stdout
    assert report["git"]["commit"] in stdout
    assert stdout.count("orders/s end-to-end") == 1
    assert "zero errors" in stdout
    assert "(steal, /proc/stat)" in stdout
    assert isinstance(report["machine"]["cpus"], int)


def test_every_phase_counts_its_requests_and_orders_consistently(report: dict[str, Any]) -> None:
    assert [p["name"] for p in report["phases"]] == ["warmup", "fixed@20", "ramp"]
    for phase in report["phases"]:
        requests, orders = phase["requests"], phase["orders"]
        assert requests["scheduled"] == requests["answered_201"] + requests["errors"]
        assert requests["errors"] == sum(requests["error_kinds"].values())
        assert orders["created"] >= requests["answered_201"]
        assert requests["orders_created_without_201"] == (
            orders["created"] - requests["answered_201"]
        )
        assert orders["created"] == orders["paid"] + orders["failed"] + orders["still_new"]
        assert sum(orders["reasons"].values()) == orders["failed"]
        assert_summary(phase["http_latency_ms"], requests["answered_201"])
        assert_summary(phase["generator_lag_ms"], requests["scheduled"])
        assert_summary(phase["e2e_latency_ms"], orders["paid"] + orders["failed"])
        start, send_end, drained = phase["span_s"]
        assert 0 <= start < send_end <= drained
    fixed = report["phases"][1]
    assert fixed["offered_rate"] == 20
    assert fixed["requests"]["scheduled"] == 60  # 20/s for 3 s, whatever the answers


def test_the_ramp_reports_its_steps_and_a_sustained_rate(report: dict[str, Any]) -> None:
    ramp, phase = report["ramp"], report["phases"][-1]
    assert ramp["offered_rates"] == [step["offered_rate"] for step in phase["steps"]]
    assert ramp["offered_rates"][0] == 20
    assert phase["requests"]["scheduled"] == sum(r * 2 for r in ramp["offered_rates"])
    assert ramp["window_s"] == 2
    assert ramp["stop_reason"]
    if ramp["max_sustained_rate"] is not None:
        assert ramp["max_sustained_rate"] >= 0


def test_cpu_is_measured_for_our_processes_the_servers_and_the_generator(
    report: dict[str, Any],
) -> None:
    cpu = report["phases"][1]["cpu"]
    expected = {"gateway", "orders", "payments", "orders-worker", "payments-worker", "postgres"}
    assert expected <= set(cpu["processes"])
    assert "bench (generator)" in cpu["processes"]
    for entry in [*cpu["processes"].values(), cpu["machine"], cpu["other"]]:
        assert isinstance(entry["cpu_s"], float | int)
        assert entry["util_send_pct"] is not None
    assert cpu["machine"]["cpu_s"] > 0
    assert report["idle_util_pct"]["gateway"] >= 0
    assert cpu["processes"]["gateway"]["waited_for_cpu_send_pct"] >= 0
    if Path("/proc/pressure/io").exists():  # a kernel with pressure stall information
        io = cpu["io_pressure_send_pct"]
        assert 0 <= io["full"] <= io["some"] <= 101  # % of a wall time read a moment apart
    assert 0 <= cpu["steal_send_pct"] <= 100 * (os.cpu_count() or 1) + 1


def test_the_timeline_covers_every_request_and_terminal_order(report: dict[str, Any]) -> None:
    timeline = report["timeline"]
    lengths = {len(series) for series in timeline.values()}
    assert len(lengths) == 1
    phases = report["phases"]
    assert sum(timeline["scheduled"]) == sum(p["requests"]["scheduled"] for p in phases)
    assert sum(timeline["sent"]) == sum(p["requests"]["scheduled"] for p in phases)
    assert sum(timeline["answered_201"]) == sum(p["requests"]["answered_201"] for p in phases)
    terminal = sum(p["orders"]["paid"] + p["orders"]["failed"] for p in phases)
    assert sum(timeline["terminal"]) == terminal
