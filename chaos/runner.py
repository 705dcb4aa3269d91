"""One chaos run: traffic and the seeded faults together, then quiescence, then the checks."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import httpx

from chaos import topics
from chaos.faults import Context, expected_dead_letters, inject
from chaos.invariants import (
    DEAD_LETTER_COUNT,
    DEAD_LETTERS_SINCE,
    INBOX_BACKLOG,
    NEW_ORDERS_OF_USERS,
    OUTBOX_BACKLOG,
    SERVICES,
    Check,
    Facts,
    check_backlogs,
    check_dead_letters,
    check_debits,
    check_money,
    check_terminal,
    check_underfunded,
    classify_orders,
    classify_top_ups,
    format_table,
    read_facts,
)
from chaos.schedule import Schedule, Step
from chaos.target import NOW, Target, TargetError, query
from chaos.traffic import Outcome, Traffic, build_plan
from services.common import kafka
from services.common.events import TOPICS

QUIET_TIMEOUT: Final = 240.0  # after the last heal: long past the 60 s the check allows
PROGRESS_EVERY: Final = 10.0


@dataclass(frozen=True)
class Options:
    seed: int
    orders: int
    users: int
    top_ups: int
    short: bool


@dataclass(frozen=True)
class FaultRecord:
    index: int
    step: Step
    started: float  # seconds into the run
    healed: float | None
    detail: str
    error: str | None


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.now():6.1f}s] {text}", flush=True)


async def run_faults(schedule: Schedule, ctx: Context, clock: Clock) -> list[FaultRecord]:
    records = []
    total = len(schedule.steps)
    for index, step in enumerate(schedule.steps, 1):
        await asyncio.sleep(step.gap_before)
        started = clock.now()
        clock.say(f"fault {index}/{total} {step.kind}: {step.describe()}")
        try:
            detail = await inject(step, ctx)
            took = clock.now() - started
            healed: float | None = started + took
            error = None
            clock.say(f"healed {index}/{total} {step.kind} after {took:.1f} s: {detail}")
        except Exception as exc:  # a fault that cannot heal is a finding, reported in the table
            healed, detail, error = None, "", f"{type(exc).__name__}: {exc}"
            clock.say(f"FAULT {index}/{total} {step.kind} did not heal: {error}")
            # Put back whatever is down (a server), so the rest of the run means something.
            try:
                await ctx.target.stack_up()
            except TargetError as again:
                clock.say(f"scripts/stack.sh up failed too: {again}")
        records.append(FaultRecord(index, step, started, healed, detail, error))
    return records


async def report_progress(traffic: Traffic, planned: int, clock: Clock) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        unknown = sum(1 for a in traffic.orders if a.outcome is Outcome.UNKNOWN)
        unsent = sum(1 for a in traffic.orders if a.outcome is Outcome.UNSENT)
        clock.say(
            f"traffic {traffic.done_actions}/{planned} actions, "
            f"order attempts {len(traffic.orders)} ({unknown} unknown, {unsent} unsent)"
        )


async def wait_ready(gateway: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=3, trust_env=False) as client:
        while True:
            try:
                if (await client.get(f"{gateway}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TargetError(f"{gateway}/ready did not answer 200 within {timeout:.0f} s")
            await asyncio.sleep(0.5)


def observe(target: Target, users: Sequence[str], since: dict[str, datetime]) -> dict[str, int]:
    """The figures quiescence waits on."""
    urls = target.database_urls
    seen = {"new": query(urls["orders"], NEW_ORDERS_OF_USERS, {"users": list(users)})[0][0]}
    for service in SERVICES:
        params = {"since": since[service]}
        seen[f"{service} outbox"] = query(urls[service], OUTBOX_BACKLOG, params)[0][0]
        seen[f"{service} inbox"] = query(urls[service], INBOX_BACKLOG, params)[0][0]
        seen[f"{service} dead"] = len(query(urls[service], DEAD_LETTERS_SINCE, params))
    for group, topic in topics.GROUPS.items():
        seen[f"lag {group}"] = kafka.consumer_lag(target.config, group, target.config.topic(topic))
    return seen


def is_quiet(seen: dict[str, int], expected_dead: dict[str, int]) -> bool:
    """No order new, no backlog, no lag, and every poison message dead-lettered."""
    if not seen or "error" in seen:
        return False
    for name, value in seen.items():
        if name.endswith(" dead"):
            if value < expected_dead[name.split()[0]]:
                return False
        elif value != 0:
            return False
    return True


async def healthy_afterwards(target: Target) -> Check:
    problems = []
    for script in ("stack.sh", "services.sh"):
        out = await target.script(script, "status", timeout=60, check=False)
        bad = [line for line in out.splitlines() if line.strip() and not _healthy_line(line)]
        problems += bad
    try:
        await wait_ready(target.gateway, 30)
    except TargetError as exc:
        problems.append(str(exc))
    return Check(
        "system healthy afterwards (servers, processes, /ready)",
        not problems,
        "all up" if not problems else "; ".join(p.strip() for p in problems)[:200],
    )


def _healthy_line(line: str) -> bool:
    return " healthy " in f" {line} " or " RUNNING " in f" {line} "


@dataclass
class Run:
    """One run's handles and what it learned on the way."""

    options: Options
    schedule: Schedule
    target: Target
    clock: Clock
    urls: dict[str, str]
    since: dict[str, datetime]  # each database's clock when the run began
    facts: Facts
    ctx: Context
    traffic: Traffic
    records: list[FaultRecord] = field(default_factory=list)
    settled_after: float | None = None  # seconds from the last heal to every order terminal


async def prepare(options: Options, schedule: Schedule) -> Run:
    """Check the system is ours and healthy; note where its counters and topics stand."""
    clock = Clock()
    target = Target.from_environment()
    config = target.config
    run_id = uuid.uuid4().hex[:8]
    print(f"chaos run {run_id}, seed {options.seed}{' (short)' if options.short else ''}")
    print(f"target: gateway {target.gateway}, stack {target.stack_dir}")
    print(f"        services {target.services_dir}")
    print(f"schedule ({len(schedule.steps)} faults, ~{schedule.nominal_seconds():.0f} s):")
    for index, step in enumerate(schedule.steps, 1):
        print(f"  {index:2}. +{step.gap_before:4.1f}s  {step.kind:<19} {step.describe()}")

    for server in ("postgres", "redis", "kafka"):
        target.server_pid(server)  # TargetError: not a server scripts/stack.sh runs for us
    await wait_ready(target.gateway, 60)
    urls = target.database_urls
    return Run(
        options=options,
        schedule=schedule,
        target=target,
        clock=clock,
        urls=urls,
        since={s: query(urls[s], NOW)[0][0] for s in SERVICES},
        facts=Facts(
            dead_letters_before={s: query(urls[s], DEAD_LETTER_COUNT)[0][0] for s in SERVICES}
        ),
        ctx=Context(
            target,
            start_offsets={
                config.topic(t): topics.high_watermarks(config, config.topic(t)) for t in TOPICS
            },
        ),
        traffic=Traffic(target.gateway, run_id, options.seed),
    )


async def drive(run: Run) -> float:
    """Users, their first top-ups, then traffic and faults together; the moment (monotonic)
    from which every order must settle: the last heal, or the last order if that was later."""
    options, traffic, clock = run.options, run.traffic, run.clock
    plan = build_plan(
        options.seed,
        orders=options.orders,
        users=options.users,
        top_ups=options.top_ups,
        duration=run.schedule.nominal_seconds(),
    )
    try:
        try:
            await traffic.create_users(options.users)
        except RuntimeError as exc:
            raise TargetError(str(exc)) from exc
        await traffic.fund(plan)
        clock.say(
            f"{options.users} users funded; traffic: {plan.orders()} orders, {plan.top_ups()} "
            f"top-ups over ~{run.schedule.nominal_seconds():.0f} s"
        )
        progress = asyncio.create_task(report_progress(traffic, len(plan.actions), clock))
        try:
            run.records, _ = await asyncio.gather(
                run_faults(run.schedule, run.ctx, clock), traffic.run(plan)
            )
        finally:
            progress.cancel()
    finally:
        await traffic.close()
    clock.say(
        f"traffic done ({len(traffic.orders)} order and {len(traffic.top_ups)} top-up attempts); "
        "waiting for quiescence"
    )
    healed = [r.healed for r in run.records if r.healed is not None]
    last_heal = clock.start + max(healed, default=clock.now())
    return max(last_heal, traffic.last_accepted_at)


async def wait_for_quiet(run: Run, reference: float) -> None:
    """Poll until no order is new, nothing is backlogged or lagging and every poison message
    is dead-lettered; note when the last order settled."""
    expected_dead = {s: len(expected_dead_letters(run.ctx.poison, s)) for s in SERVICES}
    seen: dict[str, int] = {}
    while time.monotonic() - reference < QUIET_TIMEOUT:
        try:
            seen = await asyncio.to_thread(observe, run.target, run.traffic.users, run.since)
        except Exception as exc:  # a server still coming back: look again
            seen = {"error": 1}
            run.clock.say(f"not quiet yet: {type(exc).__name__}: {exc}")
        if seen.get("new") == 0 and run.settled_after is None:
            run.settled_after = time.monotonic() - reference
        if is_quiet(seen, expected_dead):
            break
        await asyncio.sleep(1)
    run.clock.say(f"quiet: {seen}")
    await asyncio.sleep(2)  # a last applier batch in flight commits


async def judge(run: Run) -> list[Check]:
    """Read the facts once more and check every invariant."""
    config, traffic = run.target.config, run.traffic
    facts = await asyncio.to_thread(read_facts, run.urls, traffic.users, run.since, run.facts)
    for group, topic in topics.GROUPS.items():
        facts.lag[config.kafka_topic_prefix + group] = await asyncio.to_thread(
            kafka.consumer_lag, config, group, config.topic(topic)
        )
    orders = classify_orders(traffic.orders, facts.orders)
    top_ups = classify_top_ups(traffic.top_ups, facts.ledger)
    rejected = [a.answer for a in traffic.orders if a.outcome is Outcome.REJECTED]
    rejected += [a.answer for a in traffic.top_ups if a.outcome is Outcome.REJECTED]
    failed_faults = [r for r in run.records if r.error]
    return [
        Check(
            "every fault injected and healed",
            not failed_faults,
            f"{len(run.records) - len(failed_faults)}/{len(run.records)} healed",
        ),
        Check(
            "every request classified (201 or found/absent)",
            not orders.problems and not top_ups.problems,
            "; ".join([*orders.problems, *top_ups.problems])[:300]
            or f"orders: {orders.created} created, {orders.unknown_found} timed out but found, "
            f"{orders.unknown_absent} timed out and absent, {orders.keyed_retried} sent again"
            f" with their key ({orders.keyed_replayed} answered after a try in doubt); "
            f"top-ups: {top_ups.confirmed} confirmed, "
            f"{top_ups.unknown_applied} timed out but applied, {top_ups.unknown_absent} absent",
        ),
        Check(
            "no request given up or refused (4xx)",
            not traffic.abandoned and not rejected,
            f"{len(traffic.abandoned)} given up, {len(rejected)} 4xx",
        ),
        check_terminal(orders.accepted, run.settled_after),
        check_debits(orders.accepted, facts.ledger),
        *check_money(orders.accepted, facts.balances, facts.ledger),
        *check_dead_letters(facts, run.ctx.poison),
        *check_backlogs(facts),
        check_underfunded(orders.accepted),
        await healthy_afterwards(run.target),
    ]


def print_report(run: Run, checks: Sequence[Check]) -> int:
    """The faults, the traffic and the invariants; the exit code."""
    print()
    print("faults:")
    for r in run.records:
        took = f"{r.healed - r.started:5.1f}s" if r.healed is not None else "NOT HEALED"
        print(
            f"  {r.index:2}. at {r.started:6.1f}s {took}  {r.step.kind:<19} {r.error or r.detail}"
        )
    print(f"  duplicates re-produced: {run.ctx.duplicated}; poison produced: {len(run.ctx.poison)}")
    print()
    print("traffic:")
    for name, attempts in (("order", run.traffic.orders), ("top-up", run.traffic.top_ups)):
        answers = Counter(a.answer for a in attempts)
        listed = ", ".join(f"{answer} x{n}" for answer, n in answers.most_common())
        print(f"  {len(attempts)} {name} attempts: {listed}")
    print()
    print(format_table(checks))
    print()
    seed = run.options.seed
    failed = [c for c in checks if not c.ok]
    replay = f"just chaos --seed {seed}{' --short' if run.options.short else ''}"
    if failed:
        print(f"seed {seed}: {len(failed)} invariant(s) FAILED. Replay: {replay}")
        print(f"logs: {run.target.services_dir / 'logs'}, {run.target.stack_dir / 'logs'}")
        return 1
    print(f"seed {seed}: all {len(checks)} invariants hold ({replay})")
    return 0


async def run_all(options: Options, schedule: Schedule) -> int:
    run = await prepare(options, schedule)
    reference = await drive(run)
    await wait_for_quiet(run, reference)
    return print_report(run, await judge(run))


def main(options: Options, schedule: Schedule) -> int:
    try:
        return asyncio.run(run_all(options, schedule))
    except TargetError as exc:
        print(f"chaos: cannot run against this system: {exc}", file=sys.stderr)
        print(f"seed {options.seed}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The fault in progress has been undone (SIGCONT sent, `scripts/stack.sh up` run).
        print(f"chaos: interrupted (seed {options.seed})", file=sys.stderr)
        return 130
