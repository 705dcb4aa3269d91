"""The benchmark's arithmetic: percentiles, per-second rates, sliding windows, targets, and the
parsing of /proc and py-spy output. No servers."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import pytest

from bench import cpu, profile, report


def test_percentile_is_nearest_rank_an_observed_value() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert report.percentile(values, 50) == 50
    assert report.percentile(values, 95) == 95
    assert report.percentile(values, 99) == 99
    assert report.percentile(values, 100) == 100
    assert report.percentile([7.0], 50) == 7.0
    assert report.percentile([1.0, 2.0], 50) == 1.0
    assert report.percentile([1.0, 2.0], 51) == 2.0


@pytest.mark.parametrize("p", [0, -1, 100.5])
def test_percentile_outside_zero_to_hundred_is_refused(p: float) -> None:
    with pytest.raises(ValueError):
        report.percentile([1.0], p)


def test_percentile_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_latency_summary_is_in_milliseconds_and_ordered() -> None:
    seconds = [0.010, 0.002, 0.500, 0.020, 0.001] * 20
    summary = report.latency_summary(seconds)
    assert summary["count"] == 100
    assert summary["p50"] == 10.0
    assert summary["max"] == 500.0
    assert summary["mean"] == pytest.approx(106.6)
    ordered = [summary[k] for k in ("p50", "p95", "p99", "max")]
    assert ordered == sorted(ordered)  # type: ignore[type-var]


def test_latency_summary_of_nothing_has_a_zero_count_and_no_percentiles() -> None:
    assert report.latency_summary([]) == {
        "count": 0,
        "p50": None,
        "p95": None,
        "p99": None,
        "max": None,
        "mean": None,
    }


def test_per_second_counts_each_whole_second_and_ignores_times_outside() -> None:
    times = [10.0, 10.5, 10.999, 11.0, 12.7, 9.99, 13.0, 14.2]
    assert report.per_second(times, 10.0, 13.0) == [3, 1, 1]
    # a partial last second still gets its bucket
    assert report.per_second(times, 10.0, 12.5) == [3, 1, 1]
    assert report.per_second(times, 10.0, 10.0) == []


def test_rate_between_is_events_per_second_in_a_half_open_interval() -> None:
    times = [0.0, 0.5, 1.0, 1.5, 2.0]
    assert report.rate_between(times, 0.0, 2.0) == 2.0
    assert report.rate_between(times, 0.5, 1.0) == 2.0
    with pytest.raises(ValueError):
        report.rate_between(times, 1.0, 1.0)


def test_best_window_finds_the_highest_mean_and_where_it_starts() -> None:
    counts = [1, 5, 5, 1, 9, 9, 0, 0]
    assert report.best_window(counts, 1) == (9.0, 4)
    assert report.best_window(counts, 2) == (9.0, 4)
    assert report.best_window(counts, 3) == (19 / 3, 3)
    assert report.best_window(counts, 8) == (30 / 8, 0)
    assert report.best_window(counts, 9) is None


def test_best_window_prefers_the_earliest_on_a_tie() -> None:
    assert report.best_window([4, 4, 4, 4], 2) == (4.0, 0)


def test_best_window_of_zero_seconds_is_refused() -> None:
    with pytest.raises(ValueError):
        report.best_window([1, 2], 0)


def test_a_ramp_keeps_rising_only_past_the_minimum_gain() -> None:
    assert report.rising(0.0, 1.0, 0.03)
    assert report.rising(100.0, 104.0, 0.03)
    assert not report.rising(100.0, 103.0, 0.03)
    assert not report.rising(100.0, 90.0, 0.03)


def _results(
    sustained: float | None,
    e2e_at_500: dict[str, float | None] | None,
    errors: int = 0,
    still_new: int = 0,
) -> dict[str, Any]:
    phases: list[dict[str, Any]] = [
        {
            "kind": "warmup",
            "offered_rate": 50.0,
            "requests": {"errors": 99},
            "orders": {"still_new": 99},
        }
    ]
    if e2e_at_500 is not None:
        phases.append(
            {
                "kind": "fixed",
                "offered_rate": 500.0,
                "e2e_latency_ms": e2e_at_500,
                "requests": {"errors": errors},
                "orders": {"still_new": still_new},
            }
        )
    return {
        "phases": phases,
        "ramp": None if sustained is None else {"max_sustained_rate": sustained},
    }


def test_targets_are_met_by_a_fast_clean_run() -> None:
    targets = report.evaluate_targets(_results(1200.0, {"p50": 12.0, "p99": 150.0}))
    assert [t.met for t in targets] == [True, True, True, True]


def test_targets_report_what_is_missed() -> None:
    targets = report.evaluate_targets(_results(999.0, {"p50": 31.0, "p99": 90.0}, errors=1))
    assert [t.met for t in targets] == [False, False, True, False]
    assert "999 orders/s" in targets[0].measured
    assert "1 request error(s) (1 in the fixed-rate phases)" in targets[3].measured


def test_errors_are_told_apart_by_where_they_happened_and_all_of_them_count() -> None:
    results = _results(900.0, {"p50": 1.0, "p99": 1.0})
    results["phases"].append(
        {"kind": "ramp", "requests": {"errors": 40}, "orders": {"still_new": 0}}
    )
    [*_, zero_errors] = report.evaluate_targets(results)
    assert zero_errors.met is False
    assert zero_errors.measured.startswith("40 request error(s) (0 in the fixed-rate phases)")


def test_orders_never_terminal_count_as_errors_but_the_warmup_does_not() -> None:
    targets = report.evaluate_targets(_results(1200.0, {"p50": 1.0, "p99": 1.0}, still_new=3))
    assert targets[3].met is False
    assert "3 order(s) not terminal" in targets[3].measured


def test_targets_not_measured_are_neither_met_nor_missed() -> None:
    targets = report.evaluate_targets(_results(None, None))
    assert [t.met for t in targets] == [None, None, None, True]


def test_proc_stat_with_spaces_and_parentheses_in_the_name_is_parsed() -> None:
    fields = ["S", "42"] + ["0"] * 9 + ["100", "20", "7", "3"] + ["0"] * 30
    stat = cpu.parse_stat(f"1234 (my (odd) name) {' '.join(fields)}")
    assert stat == cpu.ProcStat(pid=1234, ppid=42, own_ticks=120, reaped_children_ticks=10)


def test_descendants_follow_parent_links_down_the_tree_only() -> None:
    def stat(pid: int, ppid: int) -> cpu.ProcStat:
        return cpu.ProcStat(pid, ppid, 0, 0)

    table = {p.pid: p for p in [stat(1, 0), stat(10, 1), stat(11, 10), stat(12, 11), stat(20, 1)]}
    assert cpu.descendants(10, table) == {10, 11, 12}
    assert cpu.descendants(12, table) == {12}
    assert cpu.descendants(99, table) == set()


@pytest.mark.parametrize(
    ("title", "role"),
    [
        ("postgres: postgres orders 127.0.0.1(46246) idle", "db:orders"),
        ("postgres: app payments [local] UPDATE", "db:payments"),
        ("postgres: checkpointer ", "background"),
        ("postgres: autovacuum launcher ", "background"),
        ("/usr/lib/postgresql/15/bin/postgres -D /data", "background"),
    ],
)
def test_postgres_processes_are_told_apart_by_their_title(title: str, role: str) -> None:
    assert cpu.postgres_role(title) == role


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("postgresql://u:p@127.0.0.1:5433/orders", 5433),
        ("redis://127.0.0.1:6380/0", 6380),
        ("127.0.0.1:9093,127.0.0.1:9094", 9093),
        ("postgresql://u:p@db/orders", 5432),
    ],
)
def test_server_ports_come_from_their_urls(url: str, port: int) -> None:
    assert cpu.port_of(url, 5432) == port


def _sample(at: float, groups: dict[str, float], machine: float) -> cpu.Sample:
    return cpu.Sample(at, groups, dict.fromkeys(groups, True), {}, machine)


def test_cpu_usage_is_per_order_and_per_core_while_sending() -> None:
    groups = [cpu.Group("gateway", 1, "ours"), cpu.Group("postgres", 2, "server")]
    before = _sample(0.0, {"gateway": 10.0, "postgres": 5.0}, 100.0)
    send_end = _sample(10.0, {"gateway": 15.0, "postgres": 7.0}, 112.0)
    after = _sample(12.0, {"gateway": 15.5, "postgres": 8.0}, 114.0)
    used = cpu.usage(before, send_end, after, groups, orders=1000)
    assert used["processes"]["gateway"] == {
        "cpu_s": 5.5,
        "ms_per_order": 5.5,
        "util_send_pct": 50.0,
        "restarted": False,
    }
    assert used["processes"]["postgres"]["ms_per_order"] == 3.0
    assert used["system"]["cpu_s"] == 8.5
    assert used["machine"]["cpu_s"] == 14.0
    assert used["other"]["cpu_s"] == pytest.approx(14.0 - 5.5 - 3.0)
    assert used["other"]["util_send_pct"] == pytest.approx(100 * (12 - 5 - 2) / 10)


def test_io_pressure_totals_are_read_in_seconds() -> None:
    text = (
        "some avg10=2.61 avg60=20.72 avg300=22.08 total=2609520405\n"
        "full avg10=2.14 avg60=14.43 avg300=15.64 total=1932454325\n"
    )
    assert cpu.parse_pressure(text) == (2609.520405, 1932.454325)


def test_io_pressure_is_the_share_of_the_sending_time_stalled_on_the_disk() -> None:
    groups = [cpu.Group("postgres", 2, "server")]
    before = cpu.Sample(0.0, {"postgres": 1.0}, {"postgres": True}, {}, 0.0, {}, (100.0, 50.0))
    send_end = cpu.Sample(10.0, {"postgres": 2.0}, {"postgres": True}, {}, 1.0, {}, (103.0, 51.5))
    after = cpu.Sample(12.0, {"postgres": 2.0}, {"postgres": True}, {}, 1.0, {}, (109.0, 59.0))
    used = cpu.usage(before, send_end, after, groups, orders=10)
    assert used["io_pressure_send_pct"] == {"some": 30.0, "full": 15.0}
    # A kernel without pressure stall information: nothing to report, nothing made up.
    assert (
        cpu.usage(
            _sample(0.0, {}, 0.0), _sample(10.0, {}, 1.0), _sample(12.0, {}, 1.0), [], orders=10
        )["io_pressure_send_pct"]
        is None
    )


def test_the_machine_line_of_proc_stat_gives_busy_and_stolen_seconds() -> None:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    line = "cpu  1000 20 300 9000 500 7 50 40 100 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n"
    busy, steal = cpu.parse_machine(line)
    ticks = cpu.CLOCK_TICKS
    assert busy == pytest.approx((1000 + 20 + 300 + 7 + 50) / ticks)  # guest is inside user
    assert steal == pytest.approx(40 / ticks)
    # A kernel too old to count steal: none is made up.
    assert cpu.parse_machine("cpu  1000 20 300 9000 500 7 50\n")[1] == 0.0


def test_steal_is_the_share_of_one_core_taken_while_sending() -> None:
    groups = [cpu.Group("postgres", 2, "server")]
    before = cpu.Sample(0.0, {"postgres": 1.0}, {"postgres": True}, machine_steal=10.0)
    send_end = cpu.Sample(10.0, {"postgres": 2.0}, {"postgres": True}, machine_steal=10.5)
    after = cpu.Sample(12.0, {"postgres": 2.0}, {"postgres": True}, machine_steal=13.0)
    assert cpu.usage(before, send_end, after, groups, orders=10)["steal_send_pct"] == 5.0


def test_a_process_that_restarted_is_flagged() -> None:
    groups = [cpu.Group("listener", 1, "ours")]
    before = _sample(0.0, {"listener": 10.0}, 0.0)
    after = cpu.Sample(5.0, {"listener": 0.5}, {"listener": False}, {}, 0.0)
    used = cpu.usage(before, after, after, groups, orders=0)
    assert used["processes"]["listener"]["restarted"] is True
    assert used["processes"]["listener"]["ms_per_order"] is None


def test_collapsed_stacks_give_self_and_inclusive_shares() -> None:
    lines = [
        'process 7:"dramatiq";main (app.py:1);handle (app.py:9);execute (psycopg/cursor.py:40) 6',
        "main (app.py:1);handle (app.py:10);dumps (json/__init__.py:231) 3",
        "main (app.py:1) 1",
        "garbage line",
    ]
    summary = profile.summarize_collapsed(lines)
    assert summary["samples"] == 10
    assert summary["self"][0] == {"function": "execute (psycopg/cursor.py)", "pct": 60.0}
    inclusive = {e["function"]: e["pct"] for e in summary["inclusive"]}
    assert inclusive["main (app.py)"] == 100.0
    assert inclusive["handle (app.py)"] == 90.0  # two lines of one function count together
    assert not any(e["function"].startswith("process ") for e in summary["inclusive"])
    assert math.isclose(sum(e["pct"] for e in summary["self"]), 100.0)
    assert summary["packages"] == [
        {"package": "psycopg", "pct": 60.0},
        {"package": "json", "pct": 30.0},
        {"package": "app", "pct": 10.0},
    ]


@pytest.mark.parametrize(
    ("key", "package"),
    [
        ("send (anyio/_backends/_asyncio.py)", "anyio"),
        ("_get_module_lock (<frozen importlib._bootstrap>)", "importlib"),
        ("main (app.py)", "app"),
        ("no file here", "no file here"),
    ],
)
def test_frames_are_grouped_by_top_level_package(key: str, package: str) -> None:
    assert profile.package_of(key) == package


def test_database_sessions_are_averaged_per_database_wait_and_query() -> None:
    samples = [
        [
            ("orders", "active", "Lock:object", "COMMIT"),
            ("orders", "idle in transaction", "Client:ClientRead", "BEGIN"),
            ("e2e_x", "active", "Lock:object", "COMMIT"),
        ],
        [("orders", "active", "Lock:object", "COMMIT")],
        [],
        [("pay", "active", "on CPU", "UPDATE accounts")],
    ]
    summary = profile.summarize_sessions(samples, {"orders": "orders", "pay": "payments"})
    assert summary[0] == {
        "database": "orders",
        "wait": "Lock:object",
        "query": "COMMIT",
        "avg_sessions": 0.5,
    }
    rest = {(s["database"], s["wait"]): s["avg_sessions"] for s in summary[1:]}
    assert rest == {
        ("orders", "idle in transaction (waiting for the app)"): 0.25,
        ("other", "Lock:object"): 0.25,
        ("payments", "on CPU"): 0.25,
    }


def test_the_interpreters_line_says_when_every_service_ran_on_the_generators() -> None:
    machine = {
        "python": "3.11.2",
        "python_executable": "/usr/bin/python3.11",
        "service_executables": {"gateway": "/usr/bin/python3.11", "orders": "/usr/bin/python3.11"},
    }
    assert report._interpreters(machine) == (
        "python 3.11.2 (/usr/bin/python3.11): the generator's and every service's"
    )


def test_the_interpreters_line_names_the_services_on_another_interpreter() -> None:
    machine = {
        "python": "3.11.2",
        "python_executable": "/usr/bin/python3.11",
        "service_executables": {
            "orders": "/opt/pyenv/bin/python3.11",
            "gateway": "/opt/pyenv/bin/python3.11",
            "listener": "/usr/bin/python3.11",
        },
    }
    assert report._interpreters(machine) == (
        "python 3.11.2 (/usr/bin/python3.11): the generator's; "
        "gateway, orders on /opt/pyenv/bin/python3.11; listener on /usr/bin/python3.11"
    )
    # A report from before the services' interpreters were read still prints.
    del machine["service_executables"]
    assert report._interpreters(machine).endswith(": the generator's (the services' not read)")


def test_executables_are_read_for_our_processes_only_and_gone_ones_are_skipped() -> None:
    groups = [
        cpu.Group("orders", os.getpid(), "ours"),
        cpu.Group("gone", 2**22 + 7, "ours"),  # above pid_max's default: no such process
        cpu.Group("postgres", os.getpid(), "server"),
    ]
    assert cpu.executables(groups) == {"orders": os.path.realpath(sys.executable)}
