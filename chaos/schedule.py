"""The seeded fault schedule: which faults, on what, for how long and in which order. Pure: the
same seed always gives the same schedule, so a failed run can be replayed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class FaultKind(StrEnum):
    KILL_WORKER = "kill-worker"  # SIGKILL a Dramatiq worker (relay + applier) and its children
    KILL_CONSUMER = "kill-consumer"  # SIGKILL a Kafka consumer process
    KILL_LISTENER = "kill-listener"  # SIGKILL the NOTIFY listener / sweep scheduler
    KILL_SERVICE = "kill-service"  # SIGKILL an HTTP process (gateway, orders or payments API)
    KAFKA_OUTAGE = "kafka-outage"  # SIGTERM the broker, keep it down, start it again
    POSTGRES_RESTART = "postgres-restart"  # pg_ctl stop -m immediate (a crash), then start
    TERMINATE_BACKENDS = "terminate-backends"  # pg_terminate_backend of the services, repeatedly
    REDIS_RESTART = "redis-restart"  # SHUTDOWN NOSAVE: every queued Dramatiq message is lost
    PAUSE_CONSUMER = "pause-consumer"  # SIGSTOP past the session timeout, then SIGCONT
    DUPLICATE_DELIVERY = "duplicate-delivery"  # re-produce already consumed events, same headers
    POISON = "poison"  # bad JSON, unknown schema_version, negative amount, on both topics
    # Payment requests deleted from Kafka before Payments read them (as when retention runs
    # out): their orders wait for the Orders sweeper to ask again (PAYMENT_REREQUEST_AFTER)
    LOSE_REQUESTS = "lose-requests"


WORKERS: Final = ("orders-worker", "payments-worker")
CONSUMERS: Final = ("orders-consumer", "payments-consumer")
PAYMENTS_CONSUMER: Final = "payments-consumer"
LISTENER: Final = "listener"
HTTP_PROCESSES: Final = ("gateway", "orders", "payments")

# The consumers' Kafka session timeout (services/common/kafka.py); a pause must outlast it.
SESSION_TIMEOUT_SECONDS: Final = 10.0


@dataclass(frozen=True)
class Step:
    """One fault. `seconds` is how long it lasts (outage, pause, termination window), `interval`
    how often a repeated fault strikes, `count` how many messages it produces; `gap_before` is
    the quiet time after the previous fault healed."""

    kind: FaultKind
    target: str = ""
    seconds: float = 0.0
    interval: float = 0.0
    count: int = 0
    gap_before: float = 0.0
    heal: float = 0.0  # how long it is expected to take to heal, when the system decides

    def describe(self) -> str:
        """One line for the run's log and the fault table."""
        match self.kind:
            case FaultKind.KAFKA_OUTAGE:
                return f"kafka down {self.seconds:.0f} s"
            case FaultKind.TERMINATE_BACKENDS:
                return f"terminate backends every {self.interval:.1f} s for {self.seconds:.0f} s"
            case FaultKind.PAUSE_CONSUMER:
                return f"SIGSTOP {self.target} {self.seconds:.0f} s"
            case FaultKind.DUPLICATE_DELIVERY:
                return f"re-produce up to {self.count} consumed events per topic"
            case FaultKind.POISON:
                return f"{self.count} of each poison kind per topic"
            case FaultKind.POSTGRES_RESTART:
                return "postgres stop -m immediate, start"
            case FaultKind.REDIS_RESTART:
                return "redis shutdown nosave, start"
            case FaultKind.LOSE_REQUESTS:
                return f"delete {self.seconds:.0f} s of unread payment requests from Kafka"
            case _:
                return f"SIGKILL {self.target}"

    def nominal_seconds(self) -> float:
        """A guess at how long the fault takes to inject and heal, to pace the traffic."""
        restart_cost = {
            # A stopped broker takes 20-45 s to start and catch up on a busy 2-core machine.
            FaultKind.KAFKA_OUTAGE: 30.0,
            FaultKind.POSTGRES_RESTART: 6.0,
            FaultKind.REDIS_RESTART: 8.0,
            FaultKind.DUPLICATE_DELIVERY: 4.0,
            FaultKind.POISON: 1.0,
            FaultKind.LOSE_REQUESTS: 5.0,
        }.get(self.kind, 2.0)
        return self.gap_before + self.seconds + restart_cost + self.heal


@dataclass(frozen=True)
class Schedule:
    seed: int
    short: bool
    steps: tuple[Step, ...]

    def nominal_seconds(self) -> float:
        """About how long the whole schedule runs."""
        return sum(step.nominal_seconds() for step in self.steps)

    def kinds(self) -> list[FaultKind]:
        return [step.kind for step in self.steps]


def build(seed: int, *, short: bool = False, asked_again_after: float = 0.0) -> Schedule:
    """The schedule for `seed`. Full: every kind, the Kafka outage twice (30-45 s each), both
    workers and both consumers killed, two HTTP processes killed, duplicates and poison twice.
    Short: every kind exactly once, with an 8 s Kafka outage. `asked_again_after`: how long the
    system waits before it asks again for an order left new (lose-requests heals then)."""
    rng = random.Random(f"chaos-schedule-{seed}")
    pause = SESSION_TIMEOUT_SECONDS + (2.0 if short else 5.0)
    steps: list[Step] = []
    if short:
        steps += [
            Step(FaultKind.KILL_WORKER, rng.choice(WORKERS)),
            Step(FaultKind.KILL_CONSUMER, rng.choice(CONSUMERS)),
            Step(FaultKind.KILL_LISTENER, LISTENER),
            Step(FaultKind.KILL_SERVICE, rng.choice(HTTP_PROCESSES)),
            Step(FaultKind.KAFKA_OUTAGE, seconds=8.0),
            Step(FaultKind.TERMINATE_BACKENDS, seconds=6.0, interval=2.0),
            Step(FaultKind.DUPLICATE_DELIVERY, count=20),
            Step(FaultKind.POISON, count=1),
        ]
    else:
        steps += [Step(FaultKind.KILL_WORKER, worker) for worker in WORKERS]
        steps += [Step(FaultKind.KILL_CONSUMER, consumer) for consumer in CONSUMERS]
        steps += [
            Step(FaultKind.KILL_LISTENER, LISTENER),
            Step(FaultKind.KILL_SERVICE, "payments"),
            Step(FaultKind.KILL_SERVICE, rng.choice(("gateway", "orders"))),
            Step(FaultKind.KAFKA_OUTAGE, seconds=round(rng.uniform(30, 45), 1)),
            Step(FaultKind.KAFKA_OUTAGE, seconds=round(rng.uniform(30, 45), 1)),
            Step(FaultKind.TERMINATE_BACKENDS, seconds=20.0, interval=round(rng.uniform(2, 4), 1)),
            Step(FaultKind.DUPLICATE_DELIVERY, count=50),
            Step(FaultKind.DUPLICATE_DELIVERY, count=50),
            Step(FaultKind.POISON, count=1),
            Step(FaultKind.POISON, count=1),
        ]
    steps += [
        Step(FaultKind.POSTGRES_RESTART),
        Step(FaultKind.REDIS_RESTART),
        Step(FaultKind.PAUSE_CONSUMER, rng.choice(CONSUMERS), seconds=pause),
        # Shorter than the session timeout: the consumer keeps its partitions, and finds the
        # offsets it was at gone.
        Step(FaultKind.LOSE_REQUESTS, PAYMENTS_CONSUMER, seconds=3.0, heal=asked_again_after),
    ]
    rng.shuffle(steps)
    # Duplicates need events already consumed: never the first fault.
    if steps[0].kind is FaultKind.DUPLICATE_DELIVERY:
        later = next(i for i, s in enumerate(steps) if s.kind is not FaultKind.DUPLICATE_DELIVERY)
        steps[0], steps[later] = steps[later], steps[0]
    low, high = (0.5, 1.5) if short else (3.0, 8.0)
    warm_up = 2.0 if short else 5.0
    timed = [
        Step(
            step.kind,
            step.target,
            step.seconds,
            step.interval,
            step.count,
            gap_before=warm_up if index == 0 else round(rng.uniform(low, high), 1),
            heal=step.heal,
        )
        for index, step in enumerate(steps)
    ]
    return Schedule(seed=seed, short=short, steps=tuple(timed))
