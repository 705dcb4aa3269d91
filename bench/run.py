"""One benchmark run: accounts, a warm-up, fixed-rate phases, an optional profiled phase and a
ramp, each followed by reading the orders' own timestamps from the orders database.

End-to-end latency and throughput come from `orders.created_at` / `orders.updated_at` (set by
the database's clock), never from polling the API. Each phase's orders carry a description
unique to the run and phase, which is how they are found again."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httptools
import psycopg

from bench import cpu, http1, load, profile, report

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP: Final = "%Y-%m-%dT%H:%M:%SZ"
# A phase is over when its orders are all terminal and no new one appeared for this long.
QUIET_S: Final = 3.0

# Every query is bounded to the run's time range (index orders_newest) and its phase's tag.
DB_CLOCK: Final = "SELECT extract(epoch FROM clock_timestamp())::float8"
PROGRESS: Final = """
SELECT count(*) FILTER (WHERE status = 'new'), count(*) FROM orders
WHERE created_at >= to_timestamp(%(since)s) AND description = %(tag)s
"""
TERMINAL_BETWEEN: Final = """
SELECT count(*) FROM orders
WHERE created_at >= to_timestamp(%(since)s) AND description = %(tag)s AND status <> 'new'
  AND updated_at >= to_timestamp(%(start)s) AND updated_at < to_timestamp(%(end)s)
"""
PHASE_ORDERS: Final = """
SELECT status, reason, extract(epoch FROM updated_at - created_at)::float8,
       extract(epoch FROM updated_at)::float8
FROM orders WHERE created_at >= to_timestamp(%(since)s) AND description = %(tag)s
"""


@dataclass(frozen=True)
class Settings:
    """What `python -m bench` was asked to do (see `bench/__main__.py` for each option)."""

    gateway: str
    orders_database_url: str
    payments_database_url: str
    server_ports: dict[str, int]
    users: int = 200
    underfunded: float = 0.1
    rates: tuple[float, ...] = (200.0, 500.0)
    duration: float = 30.0
    warmup: float = 20.0
    warmup_rate: float = 200.0
    ramp_start: float = 100.0
    ramp_step: float = 50.0
    ramp_step_seconds: float = 10.0
    ramp_max: float = 3000.0
    ramp_patience: int = 2
    ramp_min_gain: float = 0.03
    window: int = 20
    drain_timeout: float = 60.0
    drain_max: float = 600.0
    idle_seconds: float = 5.0
    timeout: float = 10.0
    max_connections: int = 1000
    profile_seconds: float = 0.0
    profile_rate: float = 500.0
    profile_programs: tuple[str, ...] = ()
    results_dir: Path = REPO / ".results"
    services_script: Path = REPO / "scripts" / "services.sh"
    command: str = "python -m bench"


@dataclass
class Clock:
    """Maps the event loop's clock and the database's clock onto seconds since the run began."""

    origin: float  # loop time at the start
    origin_wall: float  # time.time() at the start
    db_offset: float  # database epoch - our epoch

    def run_s(self, loop_time: float) -> float:
        return loop_time - self.origin

    def db_epoch(self, loop_time: float) -> float:
        return self.origin_wall + (loop_time - self.origin) + self.db_offset

    def run_s_of_db(self, db_epoch: float) -> float:
        return db_epoch - self.db_offset - self.origin_wall


class Run:
    """The state shared by the phases of one run."""

    def __init__(
        self,
        settings: Settings,
        db: psycopg.AsyncConnection[Any],
        generator: load.OpenLoop,
        clock: Clock,
        groups: list[cpu.Group],
    ) -> None:
        self.settings = settings
        self.db = db
        self.generator = generator
        self.clock = clock
        self.groups = groups
        self.run_id = uuid.uuid4().hex[:8]
        self.timeline_terminal: list[float] = []  # run seconds of every terminal order
        self.attempts: list[load.Attempt] = []

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sample(self) -> cpu.Sample:
        return await asyncio.to_thread(cpu.take_sample, self.groups)

    def tag(self, phase: str) -> str:
        return f"bench {self.run_id} {phase}"

    async def fixed(self, name: str, kind: str, rate: float, seconds: float) -> dict[str, Any]:
        """`rate` orders/s for `seconds`, then wait until they are all paid or failed."""
        tag, recorder = self.tag(name), load.Recorder()
        self.generator.restart()
        start = self.now()
        since = self.clock.db_epoch(start) - 2
        before = await self.sample()
        profiled: dict[str, Any] = {}
        if kind == "profile":
            sending = self.generator.run(rate, seconds, recorder, tag)
            _, profiled = await asyncio.gather(sending, self.profile(seconds))
        else:
            await self.generator.run(rate, seconds, recorder, tag)
        await recorder.settle()
        send_end = await self.sample()
        phase = await self.finish_phase(
            name, kind, tag, since, recorder, before, send_end, (start, start + seconds)
        )
        phase.update(offered_rate=rate, offered_label=f"{rate:.0f}/s", duration_s=seconds)
        if profiled:
            phase["profiles"] = profiled
        return phase

    async def ramp(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Raise the offered rate step by step until the terminal rate stops rising (or errors
        or the backlog explode); the phase and the ramp's verdict."""
        s = self.settings
        tag, recorder = self.tag("ramp"), load.Recorder()
        self.generator.restart()
        start = self.now()
        since = self.clock.db_epoch(start) - 2
        before = await self.sample()
        rate, best, flat, erring = s.ramp_start, 0.0, 0, 0
        steps: list[dict[str, Any]] = []
        stop_reason = ""
        while not stop_reason:
            step_start = self.generator.next_at or self.now()
            step_cpu = await self.sample()
            first_attempt = len(recorder.attempts)
            await self.generator.run(rate, s.ramp_step_seconds, recorder, tag)
            step_end = step_start + s.ramp_step_seconds
            terminal = await self.count_terminal(tag, since, step_start, step_end)
            new, _ = await self.progress(tag, since)
            done = recorder.attempts[first_attempt:]
            errors = sum(1 for a in done if not a.created)
            step_rate = terminal / s.ramp_step_seconds
            end_cpu = await self.sample()
            steps.append(
                {
                    "offered_rate": rate,
                    "start_s": round(self.clock.run_s(step_start), 3),
                    "terminal_rate": round(step_rate, 1),
                    "errors_so_far": errors,
                    "backlog_new_orders": new,
                    "http_in_flight": recorder.in_flight,
                    "util_pct": {
                        g: round(
                            100
                            * (end_cpu.groups[g] - step_cpu.groups[g])
                            / max(end_cpu.at - step_cpu.at, 1e-9),
                            1,
                        )
                        for g in end_cpu.groups
                        if g in step_cpu.groups
                    },
                }
            )
            print(
                f"  ramp step {rate:.0f}/s offered: {step_rate:.0f}/s reached paid/failed, "
                f"backlog {new}, errors {errors}",
                flush=True,
            )
            if report.rising(best, step_rate, s.ramp_min_gain):
                best, flat = step_rate, 0
            else:
                flat += 1
            # One step's refusals can be a passing burst (a commit the disk stalled): errors
            # stop the ramp only in `ramp_patience` steps in a row.
            erring = erring + 1 if done and errors > 0.05 * len(done) else 0
            if erring >= max(1, s.ramp_patience):
                stop_reason = (
                    f"errors exploded at {rate:.0f}/s ({errors} of {len(done)}, "
                    f"{erring} steps in a row over 5%)"
                )
            elif new > rate * 10:
                stop_reason = f"backlog exploded at {rate:.0f}/s ({new} orders still new)"
            elif flat >= s.ramp_patience:
                stop_reason = (
                    f"terminal rate stopped rising ({s.ramp_patience} steps without a "
                    f"{s.ramp_min_gain:.0%} gain; best step {best:.0f}/s)"
                )
            elif rate + s.ramp_step > s.ramp_max:
                stop_reason = f"reached --ramp-max {s.ramp_max:.0f}/s"
            else:
                rate += s.ramp_step
        send_end_time = self.generator.next_at or self.now()
        await recorder.settle()
        send_end = await self.sample()
        phase = await self.finish_phase(
            "ramp", "ramp", tag, since, recorder, before, send_end, (start, send_end_time)
        )
        phase.update(
            offered_rate=None,
            offered_label=f"{s.ramp_start:.0f}-{rate:.0f}",
            duration_s=round(send_end_time - start, 3),
            steps=steps,
        )
        verdict = self.sustained(phase, stop_reason, [st["offered_rate"] for st in steps])
        return phase, verdict

    def sustained(
        self, phase: dict[str, Any], stop_reason: str, offered: list[float]
    ) -> dict[str, Any]:
        """The best `window`-second average of orders reaching paid/failed during the ramp."""
        window = self.settings.window
        start, send_end, drained = phase["span_s"]
        times = phase.pop("_terminal_run_s")
        during = report.best_window(report.per_second(times, start, send_end), window)
        overall = report.best_window(report.per_second(times, start, drained + 1), window)
        return {
            "window_s": window,
            "max_sustained_rate": None if during is None else round(during[0], 1),
            "window_start_s": None if during is None else round(start + during[1], 3),
            "max_rate_including_drain": None if overall is None else round(overall[0], 1),
            "offered_rates": offered,
            "stop_reason": stop_reason,
        }

    async def finish_phase(
        self,
        name: str,
        kind: str,
        tag: str,
        since: float,
        recorder: load.Recorder,
        before: cpu.Sample,
        send_end: cpu.Sample,
        sending: tuple[float, float],
    ) -> dict[str, Any]:
        """Wait for the phase's orders to be terminal, then read them and the CPU they cost."""
        created = sum(1 for a in recorder.attempts if a.created)
        drain_started = self.now()
        drained = await self.wait_terminal(tag, since, created)
        drained_at = self.now()
        after = await self.sample()
        rows = await (await self.db.execute(PHASE_ORDERS, {"since": since, "tag": tag})).fetchall()
        self.attempts += recorder.attempts
        terminal = [r for r in rows if r[0] != "new"]
        terminal_run_s = [self.clock.run_s_of_db(r[3]) for r in terminal]
        self.timeline_terminal += terminal_run_s
        start, end = sending
        reasons: dict[str, int] = {}
        for r in terminal:
            if r[1]:
                reasons[r[1]] = reasons.get(r[1], 0) + 1
        outcomes: dict[str, int] = {}
        for a in recorder.attempts:
            if not a.created:
                outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
        span = [self.clock.run_s(start), self.clock.run_s(end), self.clock.run_s(drained_at)]
        print(f"  {name}: {created} created, drained in {drained_at - drain_started:.1f} s")
        return {
            "name": name,
            "kind": kind,
            "tag": tag,
            "span_s": [round(x, 3) for x in span],
            "requests": {
                "scheduled": recorder.scheduled,
                "answered_201": created,
                "errors": recorder.scheduled - created,
                "error_kinds": outcomes,
                # the server went on and created these after the client had given up
                "orders_created_without_201": max(len(rows) - created, 0),
            },
            "http_latency_ms": report.latency_summary(
                a.done - a.scheduled for a in recorder.attempts if a.created
            ),
            "http_service_time_ms": report.latency_summary(
                a.done - a.sent for a in recorder.attempts if a.created
            ),
            "generator_lag_ms": report.latency_summary(
                a.sent - a.scheduled for a in recorder.attempts
            ),
            "orders": {
                "created": len(rows),
                "paid": sum(1 for r in terminal if r[0] == "paid"),
                "failed": sum(1 for r in terminal if r[0] == "failed"),
                "still_new": len(rows) - len(terminal),
                "reasons": reasons,
            },
            "e2e_latency_ms": report.latency_summary(r[2] for r in terminal),
            "terminal_rate_during_send": round(
                report.rate_between(terminal_run_s, span[0], span[1]), 1
            ),
            "drained": drained,
            "drain_s": round(drained_at - drain_started, 3),
            "cpu": cpu.usage(before, send_end, after, self.groups, len(rows)),
            "_terminal_run_s": terminal_run_s,
        }

    async def progress(self, tag: str, since: float) -> tuple[int, int]:
        """(orders still new, orders) of a phase."""
        cursor = await self.db.execute(PROGRESS, {"since": since, "tag": tag})
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def count_terminal(self, tag: str, since: float, start: float, end: float) -> int:
        """A phase's orders that reached paid/failed between two loop times."""
        params = {
            "since": since,
            "tag": tag,
            "start": self.clock.db_epoch(start),
            "end": self.clock.db_epoch(end),
        }
        row = await (await self.db.execute(TERMINAL_BETWEEN, params)).fetchone()
        assert row is not None
        return int(row[0])

    async def wait_terminal(self, tag: str, since: float, created: int) -> bool:
        """Poll until every order of the phase is paid or failed and no more appear for
        `QUIET_S` (requests the client gave up on may still be creating orders); False once
        nothing has moved for `drain_timeout` seconds (a stuck pipeline, not a slow one) or
        after `drain_max` seconds in all."""
        last, last_move, last_print = (-1, -1), self.now(), self.now()
        give_up = self.now() + self.settings.drain_max
        while True:
            new, total = await self.progress(tag, since)
            now = self.now()
            if (new, total) != last:
                last, last_move = (new, total), now
            elif new == 0 and total >= created and now - last_move >= QUIET_S:
                return True
            elif now - last_move > self.settings.drain_timeout or now > give_up:
                return False
            if now - last_print >= 5:
                print(f"  draining: {total} order(s), {new} still new", flush=True)
                last_print = now
            await asyncio.sleep(0.2)

    async def profile(self, seconds: float) -> dict[str, Any]:
        """py-spy on our busiest processes from a few seconds into the phase to its end."""
        executable = profile.py_spy()
        if executable is None:
            return {"skipped": "py-spy not found (pip install py-spy)"}
        warm = min(3.0, seconds / 4)
        await asyncio.sleep(warm)
        directory = self.settings.results_dir / f"profile-{self.run_id}"
        directory.mkdir(parents=True, exist_ok=True)
        wanted = self.settings.profile_programs
        targets = [
            g
            for g in self.groups
            if g.kind == "ours" and (g.name in wanted if wanted else g.name != "dashboard")
        ]
        databases = {
            _database_name(self.settings.orders_database_url): "orders",
            _database_name(self.settings.payments_database_url): "payments",
        }
        sessions, *results = await asyncio.gather(
            profile.sample_sessions(self.settings.orders_database_url, seconds - warm - 1),
            *(
                profile.record(g.name, g.root, seconds - warm - 1, directory, executable)
                for g in targets
            ),
        )
        profiled: dict[str, Any] = dict(zip([g.name for g in targets], results, strict=True))
        profiled["postgres sessions"] = profile.summarize_sessions(sessions, databases)
        return profiled


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def idle_usage(groups: list[cpu.Group], seconds: float) -> dict[str, float]:
    """% of one core each process uses before any load: the system's cost of doing nothing."""
    if seconds <= 0:
        return {}
    before = await asyncio.to_thread(cpu.take_sample, groups)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(cpu.take_sample, groups)
    wall = after.at - before.at
    used = {
        name: round(100 * (after.groups[name] - before.groups[name]) / wall, 1)
        for name in after.groups
        if name in before.groups
    }
    used["machine (all)"] = round(100 * (after.machine_busy - before.machine_busy) / wall, 1)
    return used


async def db_offset(db: psycopg.AsyncConnection[Any]) -> float:
    """The database clock minus ours, in seconds (half a round trip of uncertainty)."""
    before = time.time()
    row = await (await db.execute(DB_CLOCK)).fetchone()
    after = time.time()
    assert row is not None
    return float(row[0]) - (before + after) / 2


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "-s"))}


def timeline(
    attempts: Sequence[load.Attempt], terminal_run_s: Sequence[float], clock: Clock, end: float
) -> dict[str, list[int]]:
    """Per-second counts over the whole run: scheduled (the offered load), sent, 201 answers,
    errors, orders reaching paid/failed."""
    return {
        "scheduled": report.per_second((clock.run_s(a.scheduled) for a in attempts), 0, end),
        "sent": report.per_second((clock.run_s(a.sent) for a in attempts), 0, end),
        "answered_201": report.per_second(
            (clock.run_s(a.done) for a in attempts if a.created), 0, end
        ),
        "errors": report.per_second(
            (clock.run_s(a.done) for a in attempts if not a.created), 0, end
        ),
        "terminal": report.per_second(terminal_run_s, 0, end),
    }


async def benchmark(settings: Settings) -> dict[str, Any]:
    """Run every phase against the running system; the results as a JSON-ready dict."""
    s = settings
    started_at = datetime.now(UTC)
    load_avg_before = [round(x, 2) for x in os.getloadavg()]
    groups = await asyncio.to_thread(cpu.discover, s.services_script, os.environ, s.server_ports)
    print(f"measuring CPU of: {', '.join(f'{g.name}={g.root}' for g in groups)}", flush=True)
    idle = await idle_usage(groups, s.idle_seconds)
    async with (
        await psycopg.AsyncConnection.connect(s.orders_database_url, autocommit=True) as db,
        load.client_session(s.timeout, s.max_connections) as session,
    ):
        loop = asyncio.get_running_loop()
        clock = Clock(loop.time(), time.time(), await db_offset(db))
        accounts = await load.open_accounts(
            session, s.gateway, s.users, s.underfunded, (10**12, 20_000)
        )
        print(f"{len(accounts.users)} accounts ready", flush=True)
        client = http1.Client(s.gateway, s.max_connections, s.timeout)
        generator = load.OpenLoop(client, accounts.users, (100, 5_000))
        run = Run(s, db, generator, clock, groups)
        phases: list[dict[str, Any]] = []
        if s.warmup > 0:
            phases.append(await run.fixed("warmup", "warmup", s.warmup_rate, s.warmup))
        for rate in s.rates:
            print(f"phase fixed@{rate:.0f}: {rate:.0f} orders/s for {s.duration:.0f} s", flush=True)
            phases.append(await run.fixed(f"fixed@{rate:.0f}", "fixed", rate, s.duration))
        if s.profile_seconds > 0:
            print(f"phase profile@{s.profile_rate:.0f} with py-spy", flush=True)
            phases.append(
                await run.fixed(
                    f"profile@{s.profile_rate:.0f}", "profile", s.profile_rate, s.profile_seconds
                )
            )
        ramp: dict[str, Any] | None = None
        if s.ramp_start > 0:
            print(
                f"phase ramp: from {s.ramp_start:.0f}/s, +{s.ramp_step:.0f}/s every "
                f"{s.ramp_step_seconds:.0f} s",
                flush=True,
            )
            ramp_phase, ramp = await run.ramp()
            phases.append(ramp_phase)
        for phase in phases:
            phase.pop("_terminal_run_s", None)
        end = clock.run_s(loop.time())
        await client.close()
    settings_dict = asdict(s)
    settings_dict.update(results_dir=str(s.results_dir), services_script=str(s.services_script))
    return {
        "schema": 1,
        "started_at": started_at.strftime(TIMESTAMP),
        "finished_at": datetime.now(UTC).strftime(TIMESTAMP),
        "command": s.command,
        "git": git_state(),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": load_avg_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "python_executable": os.path.realpath(sys.executable),  # the generator's
            "service_executables": cpu.executables(groups),
            "platform": platform.platform(),
        },
        "generator": {
            "client": f"bench.http1 (httptools {httptools.__version__})",
            "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        },
        "settings": settings_dict,
        "accounts": {"users": len(accounts.users), "underfunded": len(accounts.underfunded)},
        "run_id": run.run_id,
        "idle_util_pct": idle,
        "phases": phases,
        "ramp": ramp,
        "timeline": timeline(run.attempts, run.timeline_terminal, clock, end),
        "processes": [asdict(g) for g in groups],
    }
