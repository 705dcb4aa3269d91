"""The Dramatiq broker on Redis, and the per-service actors that move the outbox and inbox.

A Dramatiq message is only a wake-up call: the rows in Postgres are the truth, so a lost
message delays work until the next sweep and never loses it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dramatiq
import redis
from confluent_kafka import KafkaError, KafkaException, Producer
from dramatiq.middleware import Middleware
from psycopg_pool import ConnectionPool

from actors import pipeline
from actors.doorbell import DoorbellRedisBroker
from services.common import db, kafka
from services.common.config import Config, load
from services.common.inbox import ApplyHandler

log = logging.getLogger(__name__)

config = load()
# The client is made here: given a URL, RedisBroker builds its own connection pool from it and
# drops the other settings, timeouts included, so a Redis gone silent blocked a call for good.
# A worker's idle wait (BLPOP on its doorbell) blocks for its worker timeout (1 s), well within.
broker = DoorbellRedisBroker(  # type: ignore[no-untyped-call]
    client=redis.Redis.from_url(
        config.redis_url,
        socket_timeout=max(config.kafka_timeout, 5),  # above the doorbell's 1 s BLPOP
        socket_connect_timeout=config.db_connect_timeout,
        health_check_interval=10,
    )
)
dramatiq.set_broker(broker)


class Resources:
    """One service's database pool, Kafka producer and commit watch in this worker process,
    made on first use and closed when the worker shuts down (flushing what the producer still
    holds)."""

    def __init__(self, service: str, make_handler: Callable[[Config], ApplyHandler]) -> None:
        self.service = service
        self._make_handler = make_handler
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._producer: Producer | None = None
        self._handler: ApplyHandler | None = None
        self.watch = pipeline.CommitWatch(
            lambda: db.connect(config, service, f"{service}-relay-watch")
        )
        self._topics_ready = False
        self._last_run: dict[str, float] = {}  # chore -> when this process last did it

    def pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                self._pool = db.sync_pool(config, self.service, f"{self.service}-worker", size=4)
            return self._pool

    def producer(self) -> Producer:
        with self._lock:
            if not self._topics_ready:
                kafka.ensure_topics(config)
                self._topics_ready = True
            if self._producer is None:
                self._producer = Producer(kafka.producer_settings(config, f"{self.service}-relay"))
            return self._producer

    def relay(self) -> int:
        """Publish what the outbox holds (`pipeline.relay_outbox`) with this process's producer.

        A fatal error (the idempotent producer's sequence broken, as after a broker lost
        acknowledged data; confluent-kafka raises it from `flush`, it never reaches an error
        callback) fails every later produce of that producer: it is dropped, and the next run
        gets a new one. What it held is re-sent from the outbox."""
        producer = self.producer()
        try:
            return pipeline.relay_outbox(self.pool(), producer, config)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            # Fatal once, from the poll or flush that met it; every produce after: _FATAL.
            if isinstance(error, KafkaError) and (
                error.fatal() or error.code() == KafkaError._FATAL
            ):
                log.error(
                    "%s relay: fatal Kafka producer error, a new producer: %s",
                    self.service,
                    error.str(),
                )
                with self._lock:
                    if self._producer is producer:  # not a new one made meanwhile
                        self._producer = None
            raise

    def handler(self) -> ApplyHandler:
        with self._lock:
            if self._handler is None:
                self._handler = self._make_handler(config)
            return self._handler

    def due(self, chore: str, interval: float) -> bool:
        """Whether this process last did `chore` `interval` seconds ago or more (or never); if
        so, it counts as done now. Purging old rows and asking again for unanswered orders
        scan tables, so a sweep does them far less often than it relays and applies."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_run.get(chore, -math.inf) < interval:
                return False
            self._last_run[chore] = now
            return True

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                left = self._producer.flush(config.kafka_timeout)
                if left:
                    log.warning("%s relay: %d message(s) unflushed at shutdown", self.service, left)
                self._producer = None
            if self._pool is not None:
                self._pool.close(timeout=5)
                self._pool = None
            self.watch.close()


class CloseResources(Middleware):
    """Serves the worker's Prometheus metrics once its process is up; flushes producers and
    closes pools when the worker stops (SIGTERM)."""

    def __init__(self) -> None:
        self.resources: list[Resources] = []

    def after_process_boot(self, broker: Any) -> None:
        services = {r.service for r in self.resources}
        port = config.worker_metrics_port(services.pop()) if len(services) == 1 else 0
        pipeline.serve_metrics(port, config.bind_host, "worker")

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        for resources in self.resources:
            resources.close()


closer = CloseResources()
broker.add_middleware(closer)

# Actor retries are the short-term safety net (a Kafka or database blip); the sweeper is the
# long-term one, so retries stay few and fast.
ACTOR_OPTIONS: dict[str, Any] = {
    "max_retries": 3,
    "min_backoff": 200,
    "max_backoff": 5_000,
    "time_limit": 120_000,
}


# A wake-up that is queued and not yet started makes another one redundant: the run it starts
# reads every row committed before it. So a wake-up is sent only when no flag is set, and the
# actor clears the flag when it starts. A relay run that lingers under load holds the flag
# while it is still going to read the outbox again (`pipeline.LingeringRelay`), set to a value
# of its own ("lingering": the listener then waits an interval before trying again). The flag
# expires on its own, so a lost message or a killed worker holds back wake-ups for at most
# WAKE_FLAG_MS (and the sweeper runs anyway).
WAKE_FLAG_MS = 1_000
Woken = Literal["sent", "queued", "lingering"]
# The flag's value: who holds it.
QUEUED_FLAG, LINGERING_FLAG = b"queued", b"lingering"


def wake_flag(actor_name: str) -> str:
    """The Redis key of `actor_name`'s flag, held by a queued wake-up or a lingering run."""
    return f"orders-payments:wake-flag:{actor_name}"


def redis_too_old(server_info: Mapping[str, Any]) -> str | None:
    """Why the Redis whose `INFO server` this is cannot serve `wake`, or None: SET with both NX
    and GET came in Redis 7.0, and an older server refuses it as a syntax error."""
    version = str(server_info.get("redis_version", ""))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) >= 7:
        return None  # 7 or newer, or it cannot tell: let it try
    return f"Redis {version} is too old: wake-ups need Redis 7.0 or newer (SET with NX and GET)"


def wake(actor: dramatiq.Actor[[], None]) -> Woken:
    """Send `actor` a wake-up unless its flag is set: "sent", or what holds the flag, a wake-up
    still "queued" or a "lingering" relay run."""
    held = broker.client.set(
        wake_flag(actor.actor_name), QUEUED_FLAG, nx=True, px=WAKE_FLAG_MS, get=True
    )
    if held is None:
        actor.send()
        return "sent"
    return "lingering" if held == LINGERING_FLAG else "queued"


@dataclass(frozen=True)
class ServiceActors:
    """The three actors of one service, on that service's queue."""

    relay_outbox: dramatiq.Actor[[], None]
    apply_inbox: dramatiq.Actor[[], None]
    sweep: dramatiq.Actor[[], None]


@dataclass(frozen=True)
class Chore:
    """Work a service's sweep also does, every `every` seconds: `run` it with the service's
    pool and the configuration."""

    name: str
    every: float
    run: Callable[[ConnectionPool, Config], object]


def declare(
    service: str, make_handler: Callable[[Config], ApplyHandler], chores: Sequence[Chore] = ()
) -> ServiceActors:
    """Declare `relay_<service>_outbox`, `apply_<service>_inbox` and `sweep_<service>`. A sweep
    also purges old rows every `PURGE_INTERVAL` seconds, and does each of `chores` when due."""
    resources = Resources(service, make_handler)
    closer.resources.append(resources)

    relay_name = f"relay_{service}_outbox"
    relay_flag = wake_flag(relay_name)

    # Actors return nothing: Dramatiq warns about every returned value without a result backend.
    relay = pipeline.LingeringRelay(
        resources.relay,
        hold=lambda: broker.client.set(relay_flag, LINGERING_FLAG, px=WAKE_FLAG_MS),
        release=lambda: broker.client.delete(relay_flag),
        interval=config.batch_interval,
        linger=config.relay_linger,
        # Before every pass, the hold was ~10% of a relay worker's CPU at 500 orders/s.
        hold_every=WAKE_FLAG_MS / 4 / 1000,
        watch=resources.watch,
    )

    def relay_outbox() -> None:
        relay.run()

    def apply_inbox() -> None:
        pipeline.apply_inbox(resources.pool(), resources.handler(), config)

    def sweep() -> None:
        relayed = resources.relay()
        applied = pipeline.apply_inbox(resources.pool(), resources.handler(), config)
        purged = pipeline.Purged(outbox=0, inbox=0)
        if resources.due("purge", config.purge_interval):
            purged = pipeline.purge(resources.pool(), config)
        for chore in chores:
            if resources.due(chore.name, chore.every):
                chore.run(resources.pool(), config)
        if relayed or applied or purged.outbox or purged.inbox:
            log.info(
                "%s sweep: relayed %d, applied %d, purged %d outbox / %d inbox rows",
                service,
                relayed,
                applied,
                purged.outbox,
                purged.inbox,
            )

    def actor(fn: Callable[[], Any], name: str) -> Any:
        return dramatiq.actor(actor_name=name, queue_name=service, **ACTOR_OPTIONS)(fn)

    return ServiceActors(
        relay_outbox=actor(relay_outbox, relay_name),
        apply_inbox=actor(apply_inbox, f"apply_{service}_inbox"),
        sweep=actor(sweep, f"sweep_{service}"),
    )
