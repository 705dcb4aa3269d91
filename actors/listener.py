"""The listener: turns Postgres NOTIFY into Dramatiq wake-ups, and schedules the sweeper.

One thread per database holds a dedicated autocommit connection with `LISTEN outbox_pending`
(the inbox needs no wake-up: consumers apply what they record). Notifications that arrive
together, or while a wake-up is still queued, are coalesced into one message, and under load
a relay is woken at most once per `BATCH_INTERVAL` (`pipeline.Pacer`). After every
(re)connect it sends one sweep, because notifications raised while it was away are gone, and
after every Redis outage, because the messages queued in Redis may be gone with it. A Redis
outage is waited out on the connection it has (notifications wait in it); a connection lost
after `STEADY_SECONDS` of listening is opened again at once, the backoff starting over.
The main thread sends a sweep per service every `SWEEP_INTERVAL` seconds.
Run it with `python -m actors.listener`."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable

import psycopg
import redis
from psycopg import pq
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from actors import broker, orders, payments, pipeline
from actors.broker import ServiceActors, config
from services.common import db

log = logging.getLogger("actors.listener")

SERVICES: dict[str, ServiceActors] = {"orders": orders.actors, "payments": payments.actors}
# Seconds a listener thread waits for a notification before it checks whether to stop.
IDLE_WAIT = 0.5
# What the listener waits out, reconnecting with backoff for as long as it lasts: Postgres or
# Redis down or restarting. Exiting instead made a Redis outage of a few seconds fatal under
# supervisord (each restart failed within its `startsecs`), and nothing woke a relay again.
OUTAGES = (psycopg.OperationalError, OSError, redis.ConnectionError, redis.TimeoutError)
# What a LISTEN connection that is lost raises (`pipeline.notifications`).
CONNECTION_LOST = (psycopg.OperationalError, OSError)
# A connection lost after it was held this long is opened again at once, the backoff starting
# over; one lost sooner is retried on the same backoff (a server that drops every connection
# right after it opens is not hammered). Longer than the longest wait of the backoff.
STEADY_SECONDS = 5.0


def through_outages(stopping: threading.Event) -> Retrying:
    """Attempts that retry `OUTAGES` with backoff until `stopping` (then the error is raised)."""

    def pause(seconds: float) -> None:
        stopping.wait(seconds)

    return Retrying(
        retry=retry_if_exception_type(OUTAGES),
        wait=wait_exponential_jitter(multiplier=0.2, max=STEADY_SECONDS),
        stop=lambda _state: stopping.is_set(),
        sleep=pause,
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


def listen(service: str, actors: ServiceActors, stopping: threading.Event) -> None:
    """Hold one LISTEN connection to `service`'s database until `stopping`, reconnecting.
    Anything else going wrong stops the whole listener, so its supervisor restarts it."""
    try:
        _listen(service, actors, stopping)
    except Exception:
        log.exception("%s: listener thread failed", service)
        stopping.set()
        raise


def _listen(service: str, actors: ServiceActors, stopping: threading.Event) -> None:
    with contextlib.suppress(*OUTAGES):  # raised only once stopping
        while not stopping.is_set():
            # Backoff per outage: the waits of one do not lengthen the first of the next.
            through_outages(stopping)(_listen_once, service, actors, stopping)


def _listen_once(service: str, actors: ServiceActors, stopping: threading.Event) -> None:
    """One LISTEN connection, held until `stopping` or until it is lost; raises when it cannot
    be opened (or on an outage once `stopping`)."""
    if stopping.is_set():
        return

    def sweep() -> None:
        through_outages(stopping)(actors.sweep.send)

    with db.connect(config, service, f"{service}-listener") as conn:
        conn.execute(f"LISTEN {pipeline.OUTBOX_CHANNEL}")
        log.info("%s: listening on %s", service, pipeline.OUTBOX_CHANNEL)
        sweep()  # whatever was notified while we were away
        opened = time.monotonic()
        try:
            wake_relay(
                conn.pgconn,
                waiting_out_redis(lambda: broker.wake(actors.relay_outbox), stopping, sweep),
                pipeline.Pacer(config.batch_interval),
                stopping,
            )
        except CONNECTION_LOST as exc:
            if stopping.is_set() or time.monotonic() - opened < STEADY_SECONDS:
                raise
            log.warning("%s: lost the LISTEN connection (%s); opening another", service, exc)


def waiting_out_redis(
    call: Callable[[], broker.Woken], stopping: threading.Event, then: Callable[[], None]
) -> Callable[[], broker.Woken]:
    """`call`, retried with backoff through a Redis outage (until `stopping`), and `then`
    called once the outage is over."""

    def patiently() -> broker.Woken:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, OSError):  # Redis only, here
            woken = through_outages(stopping)(call)
            then()
            return woken

    return patiently


def wake_relay(
    pgconn: pq.abc.PGconn,
    wake: Callable[[], broker.Woken],
    pacer: pipeline.Pacer,
    stopping: threading.Event,
) -> None:
    """Call `wake` for the commits notified on `pgconn` until `stopping`: one wake-up serves
    every commit notified before it (and `broker.wake` sends none while one is still queued).
    Under load the pacer allows one per interval, and the commits notified within it are served
    together at its end.

    A `wake` that finds a lingering relay run holding the flag counts as load too: that run
    passes again within an interval and reads every commit notified so far, and until then
    the next try would find it again. Under load a relay lingers while orders commit one by
    one, and a read of one or two notifications is no load to the pacer: every commit cost a
    refused Redis round trip, about 0.7 per order at 500 orders/s. A wake-up found still
    queued is no such sign: its run may be about to start, and the next commit then needs a
    wake-up of its own at once."""
    pending = 0  # notifications read and not yet served by a wake-up
    while not stopping.is_set():
        if not pending:
            pending = pipeline.notifications(pgconn, timeout=IDLE_WAIT).total()
        elif pacer.remaining():
            # Sleep until the wake-up is due rather than read every notification as it comes
            # (one per order under load), then read them all.
            stopping.wait(pacer.remaining())
            pending += pipeline.notifications(pgconn, timeout=0).total()
        if pending and not pacer.remaining():
            pacer.started(pending, loaded=wake() == "lingering")
            pending = 0


def schedule_sweeps(stopping: threading.Event, send: Callable[[], None]) -> None:
    while not stopping.wait(config.sweep_interval):
        try:
            send()
        except Exception:
            log.exception("could not send sweep messages")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping, signalled = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        signalled.set()
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:  # Redis may come up after us
        server = through_outages(stopping)(broker.broker.client.info, "server")
    except OUTAGES:
        return 0 if signalled.is_set() else 1
    too_old = broker.redis_too_old(server)
    if too_old is not None:
        log.error("%s", too_old)
        return 2
    threads = [
        threading.Thread(target=listen, args=(name, actors, stopping), name=name, daemon=True)
        for name, actors in SERVICES.items()
    ]
    for thread in threads:
        thread.start()

    def sweep_all() -> None:
        for actors in SERVICES.values():
            actors.sweep.send()

    schedule_sweeps(stopping, sweep_all)
    for thread in threads:
        thread.join(timeout=5)
    log.info("listener stopped")
    # A thread that died is a failure: exit non-zero so the process manager restarts us.
    return 0 if signalled.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main())
