"""What a benchmark run measured, made readable: percentiles, per-second rates, sliding windows,
the targets met or not, and the JSON file, PNG chart and text table under `.results/`.

The arithmetic at the top is pure (tests/unit/test_bench_report.py); the writers at the bottom
take the plain dict that `bench.run` builds."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCENTILES = (50, 95, 99)

# What the issue asks of the system; reported against, never asserted.
TARGET_SUSTAINED_RATE = 1000.0
TARGET_RATE_FOR_LATENCY = 500.0
TARGET_E2E_P50_MS = 30.0
TARGET_E2E_P99_MS = 150.0


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank `p`th percentile of sorted values: always an observed value, so
    p50 <= p95 <= p99 <= max holds for any data."""
    if not ordered:
        raise ValueError("no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def latency_summary(seconds: Iterable[float]) -> dict[str, float | int | None]:
    """Count, p50/p95/p99, max and mean in milliseconds (None for each when there is no value)."""
    values = sorted(seconds)
    summary: dict[str, float | int | None] = {"count": len(values)}
    for p in PERCENTILES:
        summary[f"p{p}"] = _ms(percentile(values, p)) if values else None
    summary["max"] = _ms(values[-1]) if values else None
    summary["mean"] = _ms(math.fsum(values) / len(values)) if values else None
    return summary


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def per_second(times: Iterable[float], start: float, end: float) -> list[int]:
    """How many of `times` fall in each whole second [start + i, start + i + 1) of [start, end);
    times outside are ignored."""
    counts = [0] * max(0, math.ceil(end - start))
    for t in times:
        i = math.floor(t - start)
        if 0 <= i < len(counts):
            counts[i] += 1
    return counts


def rate_between(times: Iterable[float], start: float, end: float) -> float:
    """Events per second in [start, end)."""
    if end <= start:
        raise ValueError("empty interval")
    return sum(1 for t in times if start <= t < end) / (end - start)


def best_window(counts: Sequence[int], window: int) -> tuple[float, int] | None:
    """The highest mean of `window` consecutive per-second counts, and the index where that
    window starts (the earliest on a tie); None when the series is shorter than the window."""
    if window <= 0:
        raise ValueError("the window must be at least one second")
    if len(counts) < window:
        return None
    total = sum(counts[:window])
    best, best_start = total, 0
    for end in range(window, len(counts)):
        total += counts[end] - counts[end - window]
        if total > best:
            best, best_start = total, end - window + 1
    return best / window, best_start


def rising(previous_best: float, current: float, min_gain: float) -> bool:
    """Whether a ramp step's rate beats the best so far by more than `min_gain` (a fraction):
    the ramp goes on while the terminal rate keeps rising."""
    return current > previous_best * (1 + min_gain)


@dataclass(frozen=True)
class Target:
    """One goal of the issue, what was measured and whether it was met (None: not measured)."""

    goal: str
    measured: str
    met: bool | None


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """The issue's targets against a run's results."""
    targets: list[Target] = []
    sustained = (results.get("ramp") or {}).get("max_sustained_rate")
    targets.append(
        Target(
            f"sustained >= {TARGET_SUSTAINED_RATE:.0f} orders/s end-to-end",
            "not measured (no ramp)" if sustained is None else f"{sustained:.0f} orders/s",
            None if sustained is None else sustained >= TARGET_SUSTAINED_RATE,
        )
    )
    at_rate = [
        p
        for p in results["phases"]
        if p["kind"] == "fixed" and p["offered_rate"] == TARGET_RATE_FOR_LATENCY
    ]
    for label, key, limit in (
        ("p50", "p50", TARGET_E2E_P50_MS),
        ("p99", "p99", TARGET_E2E_P99_MS),
    ):
        value = at_rate[0]["e2e_latency_ms"][key] if at_rate else None
        targets.append(
            Target(
                f"create -> terminal {label} <= {limit:.0f} ms at "
                f"{TARGET_RATE_FOR_LATENCY:.0f}/s offered",
                "not measured" if value is None else f"{value:.1f} ms",
                None if value is None else value <= limit,
            )
        )
    measured = [p for p in results["phases"] if p["kind"] != "warmup"]
    errors = sum(p["requests"]["errors"] for p in measured)
    stuck = sum(p["orders"]["still_new"] for p in measured)
    # Where they were: the ramp runs past capacity on purpose, until refusals stop it.
    in_fixed = sum(p["requests"]["errors"] for p in measured if p["kind"] == "fixed")
    where = f" ({in_fixed} in the fixed-rate phases)" if errors else ""
    targets.append(
        Target(
            "zero errors (non-201, timeouts, orders never terminal)",
            f"{errors} request error(s){where}, {stuck} order(s) not terminal",
            errors == 0 and stuck == 0,
        )
    )
    return targets


# --- Writers ---------------------------------------------------------------------------------


def write_results(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write `bench-<stamp>.json` and `.png` plus `latest.json` / `latest.png`; the two paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    json_path = directory / f"bench-{stamp}.json"
    png_path = directory / f"bench-{stamp}.png"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_chart(results, png_path)
    shutil.copyfile(json_path, directory / "latest.json")
    shutil.copyfile(png_path, directory / "latest.png")
    return json_path, png_path


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Latency percentiles per phase (HTTP create; create -> terminal) and rates over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in results["phases"] if p["kind"] != "warmup"]
    figure, (http_axis, e2e_axis, time_axis) = plt.subplots(3, 1, figsize=(11, 12))
    for axis, key, title in (
        (http_axis, "http_latency_ms", "HTTP POST /orders/create (from scheduled send)"),
        (e2e_axis, "e2e_latency_ms", "create -> paid/failed (orders.created_at -> updated_at)"),
    ):
        _latency_bars(axis, phases, key, title)
    timeline = results["timeline"]
    seconds = list(range(len(timeline["sent"])))
    for series, label in (
        ("scheduled", "offered (scheduled)"),
        ("sent", "sent"),
        ("answered_201", "201 answers"),
        ("terminal", "reached paid/failed"),
        ("errors", "errors"),
    ):
        time_axis.plot(seconds, timeline[series], label=label, linewidth=1)
    for phase in phases:
        start, end = phase["span_s"][0], phase["span_s"][1]
        time_axis.axvspan(start, end, alpha=0.08, color="grey")
        time_axis.text(start, 0, phase["name"], fontsize=7, rotation=90, va="bottom")
    time_axis.set_title("orders per second over the run")
    time_axis.set_xlabel("seconds since the run started")
    time_axis.set_ylabel("orders/s")
    time_axis.legend(loc="upper left", fontsize=8)
    figure.suptitle(
        f"bench {results['started_at']}  commit {results['git']['commit'][:10]}"
        f"  {results['machine']['cpus']} cores",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _latency_bars(axis: Any, phases: list[dict[str, Any]], key: str, title: str) -> None:
    names = [p["name"] for p in phases]
    stats = ("p50", "p95", "p99", "max")
    width = 0.8 / len(stats)
    for i, stat in enumerate(stats):
        values = [p[key][stat] or 0.0 for p in phases]
        positions = [x + (i - 1.5) * width for x in range(len(phases))]
        axis.bar(positions, values, width, label=stat)
    axis.set_xticks(range(len(phases)), names, fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("ms (log)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)


def _interpreters(machine: dict[str, Any]) -> str:
    """Which interpreter the generator ran on, and whether our processes ran on the same one."""
    own = machine.get("python_executable", "?")
    line = f"python {machine.get('python', '?')} ({own})"
    services: dict[str, str] = machine.get("service_executables") or {}
    if not services:
        return f"{line}: the generator's (the services' not read)"
    on: dict[str, list[str]] = {}
    for name, executable in sorted(services.items()):
        on.setdefault(executable, []).append(name)
    if set(on) == {own}:
        return f"{line}: the generator's and every service's"
    return f"{line}: the generator's; " + "; ".join(
        f"{', '.join(names)} on {executable}" for executable, names in on.items()
    )


def format_table(results: dict[str, Any]) -> str:
    """The text summary printed at the end of a run."""
    git, machine = results["git"], results["machine"]
    lines = [
        f"bench {results['started_at']}  commit {git['commit']}{' (dirty)' if git['dirty'] else ''}"
        f"  cores {machine['cpus']}  load avg before {machine['load_avg_before']}",
        _interpreters(machine),
        f"command: {results['command']}",
        f"generator: {results['generator']['client']}, {results['generator']['loop']} loop, "
        f"{results['settings']['users']} users ({results['accounts']['underfunded']} underfunded)",
        "",
        _row(PHASE_COLUMNS, [c[0] for c in PHASE_COLUMNS]),
    ]
    for p in results["phases"]:
        orders, requests = p["orders"], p["requests"]
        cells = [
            p["name"],
            p["offered_label"],
            requests["scheduled"],
            requests["answered_201"],
            requests["errors"],
            _quad(p["http_latency_ms"]),
            _quad(p["e2e_latency_ms"]),
            f"{p['terminal_rate_during_send']:.0f}",
            _num(p["generator_lag_ms"]["p99"], 0),
            orders["created"],
            orders["paid"],
            orders["failed"],
            orders["still_new"],
        ]
        lines.append(_row(PHASE_COLUMNS, cells))
    lines += [
        "  offered: orders/s scheduled; err: non-201 answers and timeouts; HTTP: from the",
        "  scheduled send to the answer; e2e: orders.created_at -> updated_at; term/s: orders",
        "  reaching paid/failed per second while sending; lag: the generator's send delay;",
        "  created: orders in the database (with those whose request timed out); new: not",
        "  paid/failed when the phase ended.",
    ]
    ramp = results.get("ramp")
    if ramp:
        lines += ["", _ramp_line(ramp)]
    lines += ["", "CPU ms per order (utilisation % of one core while sending):"]
    lines += _cpu_lines(results["phases"])
    idle = results.get("idle_util_pct") or {}
    if idle:
        busy = ", ".join(f"{name} {pct:.0f}%" for name, pct in idle.items() if pct >= 1)
        lines.append(f"  idle before the run (% of one core): {busy or 'nothing above 1%'}")
    for p in results["phases"]:
        if "profiles" in p:
            lines += ["", *_profile_lines(p["name"], p["profiles"])]
    lines += ["", "targets (reported, not asserted):"]
    for target in evaluate_targets(results):
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[target.met]
        lines.append(f"  [{verdict:^7}] {target.goal}: {target.measured}")
    return "\n".join(lines)


PHASE_COLUMNS = (
    ("phase", 12),
    ("offered", 9),
    ("sent", 7),
    ("201", 7),
    ("err", 7),
    ("HTTP p50/p95/p99/max ms", 27),
    ("e2e p50/p95/p99/max ms", 27),
    ("term/s", 7),
    ("lag p99", 8),
    ("created", 8),
    ("paid", 7),
    ("failed", 7),
    ("new", 6),
)


def _row(columns: Sequence[tuple[str, int]], cells: Sequence[object]) -> str:
    """The first cell left-aligned, the others right-aligned, at least one space apart."""
    first, *rest = cells
    return f"{first!s:<{columns[0][1]}}" + "".join(
        f" {cell!s:>{width - 1}}" for cell, (_, width) in zip(rest, columns[1:], strict=True)
    )


def _profile_lines(phase: str, profiles: dict[str, Any], top: int = 5) -> list[str]:
    """The functions holding the GIL most in each process, and what database sessions did."""
    lines = [f"where the time goes in {phase} (py-spy --gil: share of samples, self time):"]
    sessions = profiles.get("postgres sessions", [])
    for name, summary in profiles.items():
        if name == "postgres sessions" or not isinstance(summary, dict):
            continue
        if "error" in summary or "skipped" in summary:
            lines.append(f"  {name}: {summary.get('error') or summary.get('skipped')}")
            continue
        packages = ", ".join(f"{e['package']} {e['pct']:.0f}%" for e in summary["packages"][:6])
        lines.append(f"  {name} (GIL held {summary['gil_held_share']:.0%} of the time): {packages}")
        lines += [f"    {e['pct']:5.1f}%  {e['function']}" for e in summary["self"][:top]]
    if sessions:
        lines.append("  postgres sessions (average sessions in that state):")
        lines += [
            f"    {s['avg_sessions']:5.2f}  {s['database']:<8} {s['wait']:<24} {s['query']}"
            for s in sessions[:10]
        ]
    return lines


def _ramp_line(ramp: dict[str, Any]) -> str:
    rate = ramp["max_sustained_rate"]
    during = "n/a" if rate is None else f"{rate:.0f} orders/s"
    drain = ramp["max_rate_including_drain"]
    return (
        f"ramp: max sustained end-to-end {during} over {ramp['window_s']} s while offered load ran "
        f"({'n/a' if drain is None else f'{drain:.0f}'}/s counting the drain); "
        f"steps {ramp['offered_rates'][0]:.0f}..{ramp['offered_rates'][-1]:.0f}/s; "
        f"stopped: {ramp['stop_reason']}"
    )


def _cpu_lines(phases: list[dict[str, Any]]) -> list[str]:
    measured = [p for p in phases if p["kind"] != "warmup"]
    if not measured:
        return []
    names: list[str] = []
    for p in measured:
        names += [n for n in p["cpu"]["processes"] if n not in names]
    header = f"  {'process':<22}" + "".join(f"{p['name']:>18}" for p in measured)
    lines = [header]
    for name in [*names, "system (not bench)", "machine (all)", "other (not ours)"]:
        cells = []
        for p in measured:
            cpu = p["cpu"]
            entry = {
                "system (not bench)": cpu["system"],
                "machine (all)": cpu["machine"],
                "other (not ours)": cpu["other"],
            }.get(name, cpu["processes"].get(name))
            if entry is None:
                cells.append(f"{'-':>18}")
                continue
            mark = "*" if entry.get("restarted") else ""
            per_order = _num(entry["ms_per_order"]) + mark
            cells.append(f"{per_order:>10} ({_num(entry['util_send_pct'], 0)}%)".rjust(18))
        lines.append(f"  {name:<22}" + "".join(cells))
    for p in measured:
        starved = [
            f"{name} {entry['waited_for_cpu_send_pct']:.0f}%"
            for name, entry in p["cpu"]["processes"].items()
            if entry.get("waited_for_cpu_send_pct", 0) >= 5
        ]
        lines.append(
            f"  {p['name']}: runnable but waiting for a CPU (% of the time, all threads): "
            + (", ".join(starved) or "none above 5%")
        )
        io = p["cpu"].get("io_pressure_send_pct")
        if io is not None:
            lines.append(
                f"  {p['name']}: waiting on the disk (% of the time, /proc/pressure/io): "
                f"some task {io['some']:.0f}%, every busy task {io['full']:.0f}%"
            )
        steal = p["cpu"].get("steal_send_pct")
        if steal is not None:
            lines.append(
                f"  {p['name']}: CPU the hypervisor gave to other machines while this one had "
                f"work (steal, /proc/stat): {steal:.1f}% of one core"
            )
    roles: list[str] = []
    for p in measured:
        roles += [r for r in p["cpu"]["postgres_by_role"] if r not in roles]
    for role in sorted(roles):
        role_costs = [
            p["cpu"]["postgres_by_role"].get(role, {}).get("ms_per_order") for p in measured
        ]
        lines.append(
            f"  {'  postgres ' + role:<22}" + "".join(f"{_num(v):>10}{'':8}" for v in role_costs)
        )
    lines.append("  (* the process restarted during the phase: its number is incomplete)")
    return lines


def _quad(summary: dict[str, Any]) -> str:
    """p50/p95/p99/max, with one decimal below 100 ms."""
    stats = [summary[k] for k in ("p50", "p95", "p99", "max")]
    return "/".join(_num(v, 0 if (v or 0) >= 100 else 1) for v in stats)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
