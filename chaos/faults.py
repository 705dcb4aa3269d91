"""The faults themselves, one small function each, and `inject`, which runs one schedule step.

Every fault heals before its function returns (supervisord restarted the process, the server is
up again, the paused consumer runs again), so the schedule knows when the last one healed."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg
import redis
from confluent_kafka import OFFSET_END, KafkaError, Producer, TopicPartition

from chaos import topics
from chaos.schedule import FaultKind, Step
from chaos.target import NOW, Target, TargetError, query
from services.common import kafka
from services.common.events import (
    EVENT_ID_HEADER,
    SCHEMA_VERSION,
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    TOPICS,
    TYPE_PAYMENT_REQUESTED,
    TYPE_PAYMENT_RESULT,
)

RESTART_TIMEOUT: Final = 60.0

# The services' connections, by the application_name services/common/db.py gives them.
SERVICE_CONNECTIONS: Final = ["%-api", "%-worker", "%-consumer", "%-listener"]
TERMINATE_SERVICE_BACKENDS: Final = """
SELECT count(pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND application_name LIKE ANY(%(patterns)s)
"""

# Which service's database dead-letters what arrives on each topic.
CONSUMED_BY: Final = {TOPIC_PAYMENT_REQUESTED: "payments", TOPIC_PAYMENT_RESULT: "orders"}


# A consumed message as it is produced again: key, value, headers.
RawMessage = tuple[bytes | None, bytes, list[tuple[str, Any]]]


@dataclass(frozen=True)
class Poison:
    """One poison message produced: it must end up in `service`'s dead_letters, exactly once."""

    topic: str
    service: str
    kind: str
    event_id: str


@dataclass
class Context:
    """What the faults share with the rest of the run."""

    target: Target
    # Offsets where this run began: duplicates are taken from this run's events only.
    start_offsets: dict[str, dict[int, int]]
    poison: list[Poison] = field(default_factory=list)
    duplicated: int = 0


# --- Processes under supervisord ---------------------------------------------------------------


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_with_children(pid: int) -> None:
    """SIGKILL a process and everything it forked (supervisord gives each its own group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
        for child in children(pid):
            os.kill(child, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def kill_program(target: Target, program: str) -> str:
    """SIGKILL a supervised program; healed when supervisord runs it again under a new pid."""
    pid = await target.program_pid(program)
    if not pid:
        raise TargetError(f"{program} is not running")
    kill_with_children(pid)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:
        await asyncio.sleep(0.3)
        new = await target.program_pid(program)
        if new and new != pid:
            return f"pid {pid} -> {new}"
        if time.monotonic() > deadline:
            raise TargetError(f"supervisord did not restart {program} in {RESTART_TIMEOUT:.0f} s")


@asynccontextmanager
async def stopped(pid: int) -> AsyncIterator[None]:
    """The process `pid` stopped (SIGSTOP) inside, running again (SIGCONT) after, whatever
    happens inside."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def pause_program(target: Target, program: str, seconds: float) -> str:
    """SIGSTOP a program (a consumer: past its session timeout its partitions are taken away
    mid-batch), then SIGCONT."""
    pid = await target.program_pid(program)
    if not pid:
        raise TargetError(f"{program} is not running")
    async with stopped(pid):
        await asyncio.sleep(seconds)
    return f"pid {pid} stopped {seconds:.0f} s"


# --- Servers started by scripts/stack.sh --------------------------------------------------------


@asynccontextmanager
async def started_again(target: Target) -> AsyncIterator[None]:
    """Whatever happens inside, even an interrupted run, ends with `scripts/stack.sh up`: it
    starts what is down and nothing else."""
    try:
        yield
    finally:
        await target.stack_up()


async def kafka_outage(target: Target, seconds: float) -> str:
    """SIGTERM the broker, keep it down for `seconds` in all, then `scripts/stack.sh up`."""
    pid = target.server_pid("kafka")
    began = time.monotonic()
    async with started_again(target):
        os.kill(pid, signal.SIGTERM)
        if not await wait_gone(pid, 30):
            os.kill(pid, signal.SIGKILL)
            await wait_gone(pid, 10)
        stopped = time.monotonic() - began
        await asyncio.sleep(max(0.0, seconds - stopped))
        down = time.monotonic() - began
    back = time.monotonic() - began
    return f"stopped in {stopped:.1f} s, down {down:.1f} s, back after {back:.1f} s"


def pg_ctl_command(datadir: Path) -> list[str]:
    """`pg_ctl stop -m immediate` of the cluster's own major version, run as the cluster owner
    (postgres refuses root) the way scripts/stack.sh runs it."""
    version = (datadir / "PG_VERSION").read_text().strip()
    pg_ctl = Path(f"/usr/lib/postgresql/{version}/bin/pg_ctl")
    command = [str(pg_ctl) if pg_ctl.exists() else "pg_ctl", "-D", str(datadir)]
    command += ["-m", "immediate", "-w", "-t", "30", "stop"]
    owner = pwd.getpwuid(datadir.stat().st_uid).pw_name
    if os.geteuid() == 0 and owner != "root":
        command = ["runuser", "-u", owner, "--", *command]
    return command


async def restart_postgres(target: Target) -> str:
    """An immediate shutdown (a crash: no checkpoint, crash recovery at start), then start."""
    pid = target.server_pid("postgres")
    began = time.monotonic()
    async with started_again(target):
        process = await asyncio.create_subprocess_exec(
            *pg_ctl_command(target.postgres_datadir),
            cwd="/",  # postgres' tools call getcwd(): the repo may be unreadable to its user
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise TargetError(f"pg_ctl stop -m immediate failed: {out.decode(errors='replace')}")
        await wait_gone(pid, 10)
    return f"pid {pid} crashed, back after {time.monotonic() - began:.1f} s"


async def restart_redis(target: Target) -> str:
    """SHUTDOWN NOSAVE (every queued Dramatiq message is gone), then start it again."""
    pid = target.server_pid("redis")
    began = time.monotonic()
    host = urlsplit(target.config.redis_url).hostname or "127.0.0.1"

    def shutdown() -> None:
        client = redis.Redis(host=host, port=target.redis_port, socket_timeout=5)
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # the server closed the connection on its way down: what we asked for
        finally:
            client.close()

    async with started_again(target):
        await asyncio.to_thread(shutdown)
        if not await wait_gone(pid, 15):
            raise TargetError(f"redis (pid {pid}) did not shut down")
    return f"pid {pid} shut down, back after {time.monotonic() - began:.1f} s"


async def terminate_backends(target: Target, seconds: float, interval: float) -> str:
    """pg_terminate_backend of every service connection, every `interval` for `seconds`."""
    urls = list(target.database_urls.values())
    deadline = time.monotonic() + seconds
    terminated = rounds = refused = 0
    while True:
        rounds += 1
        for url in urls:
            try:
                async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, connect_timeout=3, application_name="chaos"
                ) as conn:
                    cursor = await conn.execute(
                        TERMINATE_SERVICE_BACKENDS, {"patterns": SERVICE_CONNECTIONS}
                    )
                    row = await cursor.fetchone()
                    terminated += int(row[0]) if row else 0
            except psycopg.OperationalError:
                refused += 1
        if time.monotonic() + interval > deadline:
            break
        await asyncio.sleep(interval)
    note = f", {refused} connection(s) refused" if refused else ""
    return f"{terminated} backends terminated in {rounds} rounds{note}"


# --- Kafka records lost ------------------------------------------------------------------------

# Orders placed before a moment and still new; orders asked for again since a moment.
NEW_BEFORE: Final = "SELECT count(*) FROM orders WHERE status = 'new' AND created_at < %s"
ASKED_AGAIN_SINCE: Final = "SELECT count(*) FROM payment_rerequests WHERE last_requested_at >= %s"


def delete_all_records(
    target: Target, topic: str, partitions: Iterable[int], timeout: float
) -> None:
    """Delete every record of `topic`'s `partitions` up to each one's end, as retention
    running out would."""
    admin = kafka.admin(target.config)  # held until the futures are done: they die with it
    futures = admin.delete_records(
        [TopicPartition(topic, p, OFFSET_END) for p in partitions], request_timeout=timeout
    )
    for future in futures.values():
        future.result(timeout=timeout)


def unread_records(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> int:
    """Records produced between two readings of a topic's watermarks."""
    return sum(after[p][1] - high for p, (_, high) in before.items())


async def lose_requests(ctx: Context, program: str, seconds: float) -> str:
    """Payment requests lost by Kafka before Payments read them: `program` (the payments
    consumer) is stopped for `seconds` while requests pile up, every record of the topic is
    deleted, and it goes on from the new start of each partition (`auto.offset.reset`). Their
    orders stay new until the Orders sweeper asks for them again (PAYMENT_REREQUEST_AFTER):
    healed once no order placed before the deletion is new."""
    target = ctx.target
    config = target.config
    orders_db = config.orders_database_url
    topic = config.topic(TOPIC_PAYMENT_REQUESTED)
    pid = await target.program_pid(program)
    if not pid:
        raise TargetError(f"{program} is not running")
    async with stopped(pid):
        before = await asyncio.to_thread(topics.watermarks, config, topic)
        await asyncio.sleep(seconds)
        after = await asyncio.to_thread(topics.watermarks, config, topic)
        group = next(g for g, t in topics.GROUPS.items() if t == TOPIC_PAYMENT_REQUESTED)
        behind = await asyncio.to_thread(kafka.consumer_lag, config, group, topic)
        # Kafka slow to answer may keep the consumer stopped past its session timeout: its
        # partitions then move (as in pause-consumer), and the records are lost all the same.
        await asyncio.to_thread(delete_all_records, target, topic, after, config.kafka_timeout)
    cut = (await asyncio.to_thread(query, orders_db, NOW))[0][0]  # after the deletion
    # At least the requests produced while it was stopped were unread; at most those it had not
    # committed (it commits at most every 0.5 s).
    lost = unread_records(before, after)
    began = time.monotonic()
    wait = (
        config.payment_rerequest_after
        + config.payment_rerequest_interval
        + config.db_statement_timeout
        + RESTART_TIMEOUT
    )
    while (await asyncio.to_thread(query, orders_db, NEW_BEFORE, (cut,)))[0][0]:
        if time.monotonic() - began > wait:
            raise TargetError(f"orders placed before the deletion still new after {wait:.0f} s")
        await asyncio.sleep(0.5)
    asked = (await asyncio.to_thread(query, orders_db, ASKED_AGAIN_SINCE, (cut,)))[0][0]
    if lost and not asked:
        raise TargetError(f"{lost} unread request(s) deleted, yet no order was asked for again")
    return (
        f"{lost} to {behind} unread request(s) deleted, {asked} order(s) asked for again, "
        f"none left new after {time.monotonic() - began:.1f} s"
    )


# --- Kafka messages -----------------------------------------------------------------------------


def poison_values(topic: str, event_id: str) -> dict[str, bytes]:
    """The three kinds of poison for `topic`, each carrying `event_id` in its envelope."""
    negative: dict[str, object]
    if topic == TOPIC_PAYMENT_REQUESTED:
        event_type = TYPE_PAYMENT_REQUESTED
        negative = {"order_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()), "amount": -5}
    else:
        # Orders reads no amount: this result is poison because its order does not exist.
        event_type = TYPE_PAYMENT_RESULT
        negative = {"order_id": str(uuid.uuid4()), "status": "paid", "reason": None, "amount": -5}

    def envelope(version: int, payload: dict[str, object]) -> bytes:
        return json.dumps(
            {
                "event_id": event_id,
                "type": event_type,
                "occurred_at": "2024-01-01T00:00:00Z",
                "schema_version": version,
                "payload": payload,
            }
        ).encode()

    return {
        "bad-json": b'{"event_id": "' + event_id.encode() + b'", "type": ',
        "unknown-schema-version": envelope(SCHEMA_VERSION + 98, negative),
        "negative-amount": envelope(SCHEMA_VERSION, negative),
    }


def produce_poison(ctx: Context, per_kind: int) -> list[Poison]:
    """Every poison kind, `per_kind` times, on both topics; each with its own event_id header."""
    config = ctx.target.config
    producer = Producer(kafka.producer_settings(config, "chaos-poison"))
    made: list[Poison] = []
    for name in TOPICS:
        for _ in range(per_kind):
            for kind in ("bad-json", "unknown-schema-version", "negative-amount"):
                event_id = str(uuid.uuid4())
                value = poison_values(name, event_id)[kind]
                producer.produce(
                    config.topic(name),
                    key=str(uuid.uuid4()).encode(),
                    value=value,
                    headers=[(EVENT_ID_HEADER, event_id.encode())],
                )
                made.append(Poison(name, CONSUMED_BY[name], kind, event_id))
    if producer.flush(30) != 0:
        raise TargetError("Kafka did not acknowledge the poison messages")
    ctx.poison += made
    return made


# How long poison may take to reach dead_letters: its attempts and their backoff, after a
# consumer killed just before rejoins its group (24 s seen).
DEAD_LETTER_TIMEOUT: Final = 120.0

# Which of these event ids a service has dead-lettered.
DEAD_LETTERED: Final = "SELECT event_id::text FROM dead_letters WHERE event_id = ANY(%s::uuid[])"


async def poison(ctx: Context, per_kind: int) -> str:
    """Poison produced on both topics, healed once every message of it is dead-lettered: a
    later fault that deletes records (lose-requests) must not take poison still unread."""
    made = await asyncio.to_thread(produce_poison, ctx, per_kind)
    urls = ctx.target.database_urls
    began = time.monotonic()
    missing = {service: expected_dead_letters(made, service) for service in urls}
    while any(missing.values()):
        if time.monotonic() - began > DEAD_LETTER_TIMEOUT:
            left = sum(map(len, missing.values()))
            raise TargetError(
                f"{left} poison message(s) not dead-lettered after {DEAD_LETTER_TIMEOUT:.0f} s"
            )
        await asyncio.sleep(0.5)
        for service, ids in missing.items():
            if ids:
                found = await asyncio.to_thread(query, urls[service], DEAD_LETTERED, (sorted(ids),))
                ids -= {event_id for (event_id,) in found}
    return f"{len(made)} poison messages, all dead-lettered after {time.monotonic() - began:.1f} s"


def read_back(ctx: Context, topic: str, count: int) -> list[RawMessage]:
    """Up to `count` messages this run put on `topic`, read with a fresh consumer group."""
    consumer = topics.client(ctx.target.config)
    try:
        start = ctx.start_offsets.get(topic, {})
        parts = topics.partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in parts])
        found: list[RawMessage] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + 15
        while len(found) < count and len(at_end) < len(parts) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=count - len(found), timeout=1):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(message.partition() or 0)
                    continue
                raw = message.headers() or []
                headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
                found.append((message.key(), message.value() or b"", headers))
        return found
    finally:
        consumer.close()


def duplicate_delivery(ctx: Context, count: int) -> str:
    """Re-produce events the services already consumed, same key, value and headers."""
    config = ctx.target.config
    producer = Producer(kafka.producer_settings(config, "chaos-duplicates"))
    sent: dict[str, int] = {}
    for name in TOPICS:
        topic = config.topic(name)
        again = read_back(ctx, topic, count)
        for key, value, headers in again:
            producer.produce(topic, key=key, value=value, headers=headers)
        sent[name] = len(again)
    if producer.flush(30) != 0:
        raise TargetError("Kafka did not acknowledge the duplicates")
    ctx.duplicated += sum(sent.values())
    return ", ".join(f"{n} on {name}" for name, n in sent.items())


# --- One step -----------------------------------------------------------------------------------


async def inject(step: Step, ctx: Context) -> str:
    """Inject one fault and wait for it to heal; a line saying what happened."""
    target = ctx.target
    match step.kind:
        case (
            FaultKind.KILL_WORKER
            | FaultKind.KILL_CONSUMER
            | FaultKind.KILL_LISTENER
            | FaultKind.KILL_SERVICE
        ):
            return await kill_program(target, step.target)
        case FaultKind.PAUSE_CONSUMER:
            return await pause_program(target, step.target, step.seconds)
        case FaultKind.KAFKA_OUTAGE:
            return await kafka_outage(target, step.seconds)
        case FaultKind.POSTGRES_RESTART:
            return await restart_postgres(target)
        case FaultKind.REDIS_RESTART:
            return await restart_redis(target)
        case FaultKind.TERMINATE_BACKENDS:
            return await terminate_backends(target, step.seconds, step.interval)
        case FaultKind.DUPLICATE_DELIVERY:
            return await asyncio.to_thread(duplicate_delivery, ctx, step.count)
        case FaultKind.POISON:
            return await poison(ctx, step.count)
        case FaultKind.LOSE_REQUESTS:
            return await lose_requests(ctx, step.target, step.seconds)
    raise AssertionError(step.kind)


def expected_dead_letters(poison: Iterable[Poison], service: str) -> set[str]:
    return {p.event_id for p in poison if p.service == service}
