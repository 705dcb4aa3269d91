"""Pure helpers of the shared plumbing: ids, validation, backoff, configuration, relay rows."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable

import pytest
from starlette.testclient import TestClient

from actors import consumer
from actors.broker import redis_too_old
from actors.pipeline import MAX_LINGER, LingeringRelay, Pacer, to_outgoing
from services.common import api, db, validation
from services.common.api import build_app
from services.common.config import Config
from services.common.events import PoisonMessage
from services.common.ids import uuid7
from services.common.inbox import backoff_seconds, describe_failure
from services.common.problems import FieldError

BODY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["amount", "user_id"],
    "properties": {"amount": validation.AMOUNT_SCHEMA, "user_id": validation.UUID_SCHEMA},
}


def test_uuid7_is_version_7_and_time_ordered() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert first < second


def test_a_valid_body_has_no_errors() -> None:
    assert validation.check(BODY, {"amount": 1, "user_id": str(uuid7())}) == []


@pytest.mark.parametrize("amount", [0, -1, 1.5, 1.0, "10", True, None, float("nan"), 10**15 + 1])
def test_amounts_that_are_not_positive_integers_up_to_1e15_are_rejected(amount: object) -> None:
    errors = validation.check(BODY, {"amount": amount, "user_id": str(uuid7())})
    assert [e.field for e in errors] == ["amount"]


def test_unknown_and_missing_fields_are_named() -> None:
    errors = validation.check(BODY, {"user_id": "nope", "extra": 1, "more": 2})
    assert errors == [
        FieldError("amount", "is required"),
        FieldError("extra", "unknown field"),
        FieldError("more", "unknown field"),
        FieldError("user_id", "must be a valid uuid"),
    ]


def test_path_uuids_must_be_canonical() -> None:
    good = uuid7()
    assert validation.parse_uuid("id", str(good)) == good
    for bad in ["", "nope", good.hex, "{" + str(good) + "}"[:35], str(good)[:-1] + "x"]:
        assert isinstance(validation.parse_uuid("id", bad), FieldError)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    delays = [backoff_seconds(n) for n in range(12)]
    assert delays[0] == pytest.approx(0.2)
    assert delays[1] == pytest.approx(0.4)
    assert delays == sorted(delays)
    assert max(delays) == 30.0


def test_failure_reasons_say_whether_the_message_is_poison() -> None:
    assert describe_failure(PoisonMessage("bad amount")) == "poison: bad amount"
    assert describe_failure(RuntimeError("x" * 2000)).startswith("RuntimeError: x")
    assert len(describe_failure(RuntimeError("x" * 2000))) == 1000


def test_config_reads_the_environment_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", "t1.")
    monkeypatch.setenv("RELAY_BATCH_SIZE", "7")
    monkeypatch.delenv("REDIS_URL", raising=False)
    config = Config()
    assert config.topic("orders.payment-requested") == "t1.orders.payment-requested"
    assert config.relay_batch_size == 7
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.database_url("payments").endswith("/payments")


def test_an_outbox_row_becomes_a_message_with_the_event_id_header() -> None:
    event_id = uuid7()
    envelope = {"event_id": str(event_id), "type": "payment_result", "payload": {}}
    message = to_outgoing((17, event_id, "topic", "user", envelope))
    assert message.ref == 17
    assert message.key == "user"
    assert ("event_id", str(event_id).encode()) in message.headers
    assert b'"type":"payment_result"' in message.value


def access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "access"]


def test_access_lines_are_written_for_failed_requests_and_on_demand_for_every_one(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(build_app(title="t", description="d", endpoints=[], readiness={}))
    caplog.set_level(logging.INFO, logger="access")

    assert client.get("/health").status_code == 200
    assert client.get("/nowhere").status_code == 404
    lines = access_lines(caplog)  # the 404 only: a routine success is not written
    assert len(lines) == 1
    assert lines[0][0] == logging.INFO and lines[0][1].startswith("GET /nowhere 404 ")

    caplog.clear()
    monkeypatch.setattr(api, "ROUTINE_ACCESS_LEVEL", logging.INFO)  # ACCESS_LOG=all
    assert client.get("/health").status_code == 200
    assert [line.startswith("GET /health 200 ") for _, line in access_lines(caplog)] == [True]


def test_a_process_does_each_chore_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actors import broker

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    resources = broker.Resources("orders", lambda config: lambda conn, pending: None)

    assert resources.due("purge", 60) is True  # the first sweep purges
    now[0] += 59
    assert resources.due("purge", 60) is False
    assert resources.due("recover", 30) is True  # each chore keeps its own time
    now[0] += 1
    assert resources.due("purge", 60) is True
    assert resources.due("purge", 60) is False
    assert resources.due("recover", 30) is False


def test_the_broker_s_redis_calls_are_bounded_by_the_configured_timeouts() -> None:
    # Given a URL, RedisBroker made its own pool and dropped these: a silent Redis hung a call.
    from actors import broker

    settings = broker.broker.client.connection_pool.connection_kwargs
    assert settings["socket_timeout"] == max(broker.config.kafka_timeout, 5)
    assert settings["socket_connect_timeout"] == broker.config.db_connect_timeout


def test_a_relay_gets_a_new_kafka_producer_after_a_fatal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from confluent_kafka import KafkaError, KafkaException

    from actors import broker, pipeline

    resources = broker.Resources("orders", lambda config: lambda conn, pending: None)
    failing = object()
    resources._producer = failing  # type: ignore[assignment]
    monkeypatch.setattr(resources, "_topics_ready", True)
    monkeypatch.setattr(resources, "pool", lambda: None)
    raised = [KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))]

    def relay_outbox(pool: object, producer: object, config: object) -> int:
        assert producer is failing
        raise raised[0]  # as the producer's flush raises it

    monkeypatch.setattr(pipeline, "relay_outbox", relay_outbox)
    with pytest.raises(KafkaException):
        resources.relay()
    assert resources._producer is failing  # a producer retries that itself
    # After a fatal error every produce of that producer fails: the relay failed at every run
    # until the worker was restarted by hand.
    raised[0] = KafkaException(KafkaError(KafkaError._FATAL, "out of sequence", fatal=True))
    with pytest.raises(KafkaException):
        resources.relay()
    assert resources._producer is None  # the next run makes a new one
    # The poll or flush that meets the fatal error says so once; each produce after it raises
    # _FATAL without the flag (a run that starts with a produce never sees the flag).
    resources._producer = failing
    raised[0] = KafkaException(KafkaError(KafkaError._FATAL, "fatal error earlier"))
    with pytest.raises(KafkaException):
        resources.relay()
    assert resources._producer is None


def test_a_pacer_spaces_batches_by_its_interval_only_once_they_come_full() -> None:
    now = [100.0]
    pacer = Pacer(0.02, min_batch=3, clock=lambda: now[0])
    assert pacer.remaining() == 0  # nothing ran yet: an idle system is served at once
    pacer.started(2)
    assert pacer.remaining() == 0  # light load (small batches): no waiting
    pacer.started(3)
    now[0] += 0.005
    assert pacer.remaining() == pytest.approx(0.015)  # under load: wait out the interval
    now[0] += 0.015
    assert pacer.remaining() == 0
    pacer.started(40)
    now[0] += 3
    assert pacer.remaining() == 0  # a quiet spell never builds up a debt
    pacer.started(1)
    assert pacer.remaining() == 0  # load fell: back to no waiting
    paced = Pacer(0, min_batch=3, clock=lambda: now[0])
    paced.started(100)
    assert paced.remaining() == 0  # interval 0: no pacing at all


def burst_delays(pacer: Pacer, interval: float, bursts: int = 1000) -> list[float]:
    """How long each burst of a paced relay waits at a consumer paced by `pacer` (simulated
    time): the relay starts a pass every `interval` (its sleep waking up to 0.5 ms late), its
    burst reaches the consumer 1-12 ms into the pass (claiming rows, and waiting for a CPU), and
    the consumer stores a burst in 3-10 ms."""
    now = [0.0]
    pacer.clock = lambda: now[0]
    rng = random.Random(7)
    relay_started = consumer_free = 0.0
    delays = []
    for _ in range(bursts):
        relay_started += interval + rng.uniform(0, 0.0005)
        arrived = relay_started + rng.uniform(0.001, 0.012)
        now[0] = max(arrived, consumer_free)
        now[0] += pacer.remaining()
        pacer.started(10)
        delays.append(now[0] - arrived)
        consumer_free = now[0] + rng.uniform(0.003, 0.010)
    return sorted(delays)


def test_a_consumer_takes_the_bursts_of_a_paced_relay_as_they_come() -> None:
    interval = 0.02
    config = Config(batch_interval=interval)
    # Paced at the relay's own interval, a burst that came early waits out the interval of the
    # batch before; that pushes the next batch late too, and the wait carries over.
    same_pace = burst_delays(Pacer(interval), interval)
    assert same_pace[len(same_pace) // 2] > 0.002
    # The consumer's own pace leaves every burst of a paced relay waiting only for the store
    # of the burst before.
    own_pace = burst_delays(consumer.pacer(config), interval)
    assert own_pace[len(own_pace) // 2] == 0
    assert own_pace[int(len(own_pace) * 0.99)] < 0.001
    # The rest of a burst that came in two parts is waited for, paced or not.
    light, loaded = consumer.pacer(config), consumer.pacer(config)
    loaded.clock = lambda: 50.0  # a batch of 10 starts now: under load
    loaded.started(10)
    assert consumer.batch_wait(light) == consumer.GATHER_SECONDS > 0
    assert consumer.batch_wait(loaded) == pytest.approx(interval / 2)


class RelayScript:
    """A relay's surroundings, scripted: what each relay pass publishes, how long it takes,
    and the order of everything the runs did (relay, hold, release, sleep)."""

    def __init__(
        self,
        batches: list[int],
        seconds_per_relay: float = 0.005,
        commits: list[float] | None = None,
    ) -> None:
        self.batches = batches
        self.seconds_per_relay = seconds_per_relay
        self.now = 100.0
        self.log: list[str] = []
        self.during_sleep: Callable[[], object] = lambda: None
        self.starts: list[float] = []  # when each pass began
        # When outbox commits are notified (seconds after the run starts), for a relay that
        # watches them; None: it does not.
        self.commits = None if commits is None else sorted(100.0 + t for t in commits)

    def notified(self, timeout: float) -> bool:
        """`CommitWatch.notified` on the scripted clock."""
        assert self.commits is not None and timeout >= 0
        seen = [t for t in self.commits if t <= self.now + timeout]
        if seen:
            self.now = max(self.now, seen[0])
            self.commits = [t for t in self.commits if t > self.now]
        else:
            self.now += timeout
        return bool(seen)

    def stop(self) -> None:
        """`CommitWatch.stop`."""
        self.log.append("stop watching")

    def relay(self) -> int:
        self.starts.append(round((self.now - 100.0) * 1000, 1))
        self.now += self.seconds_per_relay
        batch = self.batches.pop(0) if self.batches else 0
        self.log.append(f"relay {batch}")
        return batch

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.log.append(f"sleep {seconds * 1000:.0f}")
        self.during_sleep()

    def relayer(
        self, *, interval: float = 0.02, linger: float = 2.0, relay: Callable[[], int] | None = None
    ) -> LingeringRelay:
        return LingeringRelay(
            relay or self.relay,
            hold=lambda: self.log.append("hold"),
            release=lambda: self.log.append("release"),
            interval=interval,
            linger=linger,
            watch=None if self.commits is None else self,
            clock=lambda: self.now,
            sleep=self.sleep,
        )

    def run(self, *, interval: float = 0.02, linger: float = 2.0) -> int:
        return self.relayer(interval=interval, linger=linger).run()


def test_a_relay_woken_at_light_load_publishes_once_and_lets_the_next_commit_wake_it() -> None:
    script = RelayScript([2])
    assert script.run() == 2
    assert script.log == ["release", "relay 2"]  # no lingering, no flag held


def test_a_relay_woken_under_load_keeps_publishing_each_interval_holding_the_flag() -> None:
    script = RelayScript([10, 8, 5, 1, 2, 0])
    assert script.run() == 26
    # Each pass starts an interval after the one before (15 ms of sleep after a 5 ms pass);
    # once three batches in a row come short the flag goes, and one last pass reads what came
    # before that.
    assert script.log == [
        "release", "relay 10",
        "hold", "sleep 15", "relay 8",
        "hold", "sleep 15", "relay 5",
        "hold", "sleep 15", "relay 1",
        "hold", "sleep 15", "relay 2",
        "hold", "sleep 15", "relay 0",
        "release", "relay 0",
    ]  # fmt: skip


def test_a_relay_watching_commits_under_steady_load_passes_each_interval() -> None:
    # Orders committed one by one, every 2 ms: the same passes as without the watch.
    script = RelayScript([10, 10, 10, 1, 1, 1], commits=[i * 0.002 for i in range(60)])
    assert script.run() == 33
    assert script.starts == [0, 20, 40, 60, 80, 100, 105]


def test_a_relay_watching_commits_passes_as_soon_as_a_burst_lands() -> None:
    # A consumer commits its batch's answers together, once per batch: each pass starts as the
    # commit is notified, not on the relay's own clock (with it: 0, 20, 40, 60, 80).
    script = RelayScript([10, 10, 10, 10, 0], commits=[0.033, 0.049, 0.071])
    assert script.run() == 40
    assert script.starts[:4] == [0, 33, 49, 71]
    # With no commit notified, a pass comes two intervals after the one before, and three short
    # ones in a row end the run as without the watch.
    assert script.starts[4:] == [111, 151, 191, 196]
    # It stops watching once it stops lingering: nobody would read the notifications.
    assert script.log[-3:] == ["stop watching", "release", "relay 0"]
    assert script.log.count("stop watching") == 1


def test_a_lingering_relay_keeps_going_past_a_short_batch_or_two() -> None:
    # A pass that starts at once after a slow one, or falls between two bursts of payment
    # answers, finds little; the load is still there, so the run goes on without a wake-up.
    script = RelayScript([10, 0, 9, 1, 2, 12, 0, 0, 0, 7])
    assert script.run() == 41
    relays = [entry for entry in script.log if entry.startswith("relay")]
    assert relays == [f"relay {n}" for n in (10, 0, 9, 1, 2, 12, 0, 0, 0)] + ["relay 7"]
    assert script.log.count("release") == 2  # at the start and once the load was gone
    assert script.log[-2:] == ["release", "relay 7"]


def test_a_lingering_relay_stops_when_its_time_is_up_even_under_load() -> None:
    script = RelayScript([50] * 1000)
    script.run(interval=0.02, linger=0.1)
    passes = script.log.count("relay 50")
    assert 5 <= passes <= 7  # one every 20 ms for 100 ms, then the last one after release
    assert script.log[-2:] == ["release", "relay 50"]
    assert script.log.count("release") == 2
    long = RelayScript([50] * 10_000)
    long.run(interval=0.02, linger=3600)
    assert long.log.count("relay 50") <= MAX_LINGER / 0.02 + 2  # a worker must be able to stop


def test_a_lingering_relay_holds_the_flag_again_only_when_its_hold_grows_old() -> None:
    script = RelayScript([10] * 12)
    relayer = script.relayer()
    relayer.hold_every = 0.05
    assert relayer.run() == 120
    passes = 0
    held = []  # when each pass that the flag was held again before began (ms)
    for entry in script.log:
        if entry.startswith("relay"):
            passes += 1
        elif entry == "hold":
            held.append(script.starts[passes])
    # A pass every 20 ms, and a hold before the first one at least 50 ms after the last hold
    # (without `hold_every`, before every pass but the first and the last).
    assert held == [20, 80, 140, 200, 260]
    assert script.log[-2:] == ["release", "relay 0"]


def test_a_relay_without_pacing_or_linger_never_lingers() -> None:
    for interval, linger in ((0.0, 2.0), (0.02, 0.0)):
        script = RelayScript([10, 10])
        assert script.run(interval=interval, linger=linger) == 10
        assert script.log == ["release", "relay 10"]


def test_a_run_woken_while_another_holds_the_flag_leaves_the_work_to_it() -> None:
    script = RelayScript([10, 10, 10, 1])
    relayer = script.relayer()
    second_runs: list[int] = []

    def second_run() -> None:  # another worker thread, woken while the first one sleeps
        if not second_runs:
            script.log.append("second run")
            second_runs.append(relayer.run())

    script.during_sleep = second_run
    assert relayer.run() == 31
    assert second_runs == [0]  # it neither dropped the flag nor relayed
    assert script.log[:4] == ["release", "relay 10", "hold", "sleep 15"]
    assert script.log[4:6] == ["second run", "relay 10"]  # the holder relays after it
    # Once the holder is done, a run works as usual again.
    script.batches = [2]
    assert relayer.run() == 2


def test_a_run_woken_while_another_lingers_without_the_flag_relays_once() -> None:
    # Between the lingering run's first pass and its taking the flag, or during its last
    # pass, a second run relays once itself and never lingers.
    script = RelayScript([10, 10, 10, 1])
    second: list[str] = []

    def relay_and_wake_another() -> int:
        batch = script.relay()
        if not second:  # during the first pass
            second.append("started")
            script.log.append("second run")
            second.append(str(relayer.run()))
        return batch

    relayer = script.relayer(relay=relay_and_wake_another)
    relayer.run()
    assert second == ["started", "10"]
    assert script.log[:5] == ["release", "relay 10", "second run", "release", "relay 10"]
    # Only the first run held the flag: once before each of its passes but the last.
    later_passes = [entry for entry in script.log[5:] if entry.startswith("relay")]
    assert script.log.count("hold") == len(later_passes) - 1 >= 1


def test_a_lingering_relay_that_fails_drops_the_flag() -> None:
    script = RelayScript([10])
    kafka_down = False

    def failing_once_it_holds() -> int:
        nonlocal kafka_down
        kafka_down = kafka_down or "hold" in script.log
        if kafka_down:
            raise RuntimeError("kafka is down")
        return script.relay()

    relayer = script.relayer(relay=failing_once_it_holds)
    with pytest.raises(RuntimeError):
        relayer.run()
    # The flag is dropped: Dramatiq's retry of this run, and every wake-up, relays again.
    assert script.log[-1] == "release"
    kafka_down, script.log, script.batches = False, [], [1]
    assert relayer.run() == 1
    assert script.log[-2:] == ["release", "relay 1"]


@pytest.mark.parametrize(
    ("seconds", "idle", "interval", "total"),
    [(10, 4, 2, 10), (30, 12, 6, 30), (60, 24, 12, 60), (1, 1, 1, 4), (4.4, 1, 1, 4)],
)
def test_a_silent_peer_is_given_up_after_about_the_configured_time(
    seconds: float, idle: int, interval: int, total: int
) -> None:
    kwargs = db.dead_peer_kwargs(seconds)
    assert kwargs == {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": db.KEEPALIVE_PROBES,
        "tcp_user_timeout": total * 1000,
    }
    # The last probe goes out no later than the user timeout closes the connection.
    assert idle + interval * db.KEEPALIVE_PROBES <= total
    assert idle >= 1


@pytest.mark.parametrize(
    ("version", "too_old"),
    [("7.0.15", False), ("7.2.4", False), ("8.0.0", False), ("6.2.14", True), ("5.0.7", True)],
)
def test_the_listener_refuses_a_redis_too_old_for_its_wake_ups(version: str, too_old: bool) -> None:
    reason = redis_too_old({"redis_version": version})
    assert (reason is not None) == too_old
    if reason is not None:
        assert version in reason and "7.0 or newer" in reason
    assert redis_too_old({}) is None  # cannot tell: it tries
