"""The pure parts of `just chaos`: the seeded fault schedule, the traffic plan, and the checks
that judge the facts read afterwards."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from chaos.faults import Poison, poison_values
from chaos.invariants import (
    Facts,
    LedgerRow,
    Order,
    check_backlogs,
    check_dead_letters,
    check_debits,
    check_money,
    check_terminal,
    check_underfunded,
    classify_orders,
    classify_top_ups,
)
from chaos.runner import is_quiet
from chaos.schedule import (
    CONSUMERS,
    SESSION_TIMEOUT_SECONDS,
    WORKERS,
    FaultKind,
    build,
)
from chaos.traffic import FUNDED_SHARE, OrderAttempt, Outcome, TopUpAttempt, build_plan, classify
from services.common.events import (
    TOPIC_PAYMENT_REQUESTED,
    TOPIC_PAYMENT_RESULT,
    PoisonMessage,
    decode,
)
from services.payments.domain import parse_payment_request


@pytest.mark.parametrize("short", [False, True])
def test_the_same_seed_gives_the_same_schedule(short: bool) -> None:
    assert build(42, short=short) == build(42, short=short)


def test_different_seeds_give_different_schedules() -> None:
    orders = {tuple(build(seed).kinds()) for seed in range(10)}
    assert len(orders) > 5


@pytest.mark.parametrize("seed", range(20))
def test_a_full_schedule_has_every_fault_the_issue_asks_for(seed: int) -> None:
    steps = build(seed).steps
    kinds = Counter(step.kind for step in steps)
    assert {s.target for s in steps if s.kind is FaultKind.KILL_WORKER} == set(WORKERS)
    assert {s.target for s in steps if s.kind is FaultKind.KILL_CONSUMER} == set(CONSUMERS)
    assert kinds[FaultKind.KILL_LISTENER] == 1
    assert "payments" in {s.target for s in steps if s.kind is FaultKind.KILL_SERVICE}
    outages = [s.seconds for s in steps if s.kind is FaultKind.KAFKA_OUTAGE]
    assert len(outages) == 2 and all(30 <= s <= 45 for s in outages)
    for kind in (
        FaultKind.POSTGRES_RESTART,
        FaultKind.REDIS_RESTART,
        FaultKind.PAUSE_CONSUMER,
        FaultKind.LOSE_REQUESTS,
    ):
        assert kinds[kind] == 1
    assert kinds[FaultKind.TERMINATE_BACKENDS] == 1
    assert kinds[FaultKind.DUPLICATE_DELIVERY] >= 1 and kinds[FaultKind.POISON] >= 1


@pytest.mark.parametrize("seed", range(20))
def test_a_short_schedule_has_each_fault_kind_exactly_once(seed: int) -> None:
    schedule = build(seed, short=True)
    assert sorted(schedule.kinds()) == sorted(FaultKind)
    outage = next(s for s in schedule.steps if s.kind is FaultKind.KAFKA_OUTAGE)
    assert outage.seconds == 8


@pytest.mark.parametrize("seed", range(30))
def test_duplicates_never_come_first_and_only_the_pause_outlasts_the_session_timeout(
    seed: int,
) -> None:
    for short in (False, True):
        steps = build(seed, short=short).steps
        assert steps[0].kind is not FaultKind.DUPLICATE_DELIVERY
        pause = next(s for s in steps if s.kind is FaultKind.PAUSE_CONSUMER)
        assert pause.seconds > SESSION_TIMEOUT_SECONDS and pause.target in CONSUMERS
        # Losing requests keeps the payments consumer's partitions where they are.
        lose = next(s for s in steps if s.kind is FaultKind.LOSE_REQUESTS)
        assert 0 < lose.seconds < SESSION_TIMEOUT_SECONDS
        assert lose.target == "payments-consumer"


@pytest.mark.parametrize("short", [False, True])
def test_the_traffic_lasts_through_the_wait_for_orders_asked_for_again(short: bool) -> None:
    # lose-requests heals only once the system asks again for the orders it lost; the
    # traffic is spread over the schedule's length, so it must count that wait.
    waiting = build(7, short=short, asked_again_after=302)
    assert waiting.nominal_seconds() == pytest.approx(build(7, short=short).nominal_seconds() + 302)
    assert waiting.kinds() == build(7, short=short).kinds()


def test_the_plan_places_every_order_and_top_up_and_underfunds_every_user() -> None:
    plan = build_plan(7, orders=1003, users=20, top_ups=62, duration=100)
    assert plan == build_plan(7, orders=1003, users=20, top_ups=62, duration=100)
    assert plan.orders() == 1003 and plan.top_ups() == 62
    assert [a.due for a in plan.actions] == sorted(a.due for a in plan.actions)
    assert all(0 <= a.due < 100 for a in plan.actions)
    for user in range(20):
        mine = [a for a in plan.actions if a.user == user]
        demand = sum(a.amount for a in mine if a.kind == "order")
        funding = plan.initial_top_ups[user] + sum(a.amount for a in mine if a.kind == "top_up")
        assert funding <= demand * FUNDED_SHARE + 1000  # amounts are rounded to 1000s
    assert all(a.amount % 1000 == 0 for a in plan.actions if a.kind == "top_up")


def test_only_a_request_that_never_reached_the_server_or_was_refused_is_certain() -> None:
    assert classify(201, None) is Outcome.ACCEPTED
    assert classify(422, None) is Outcome.REJECTED
    assert classify(503, None) is Outcome.UNKNOWN
    assert classify(None, httpx.ReadTimeout("slow")) is Outcome.UNKNOWN
    assert classify(None, httpx.RemoteProtocolError("dropped")) is Outcome.UNKNOWN
    assert classify(None, httpx.ConnectError("refused")) is Outcome.UNSENT


def test_every_poison_message_is_poison_to_the_consumer_of_its_topic() -> None:
    for topic, kind in (
        (TOPIC_PAYMENT_REQUESTED, "payment_requested"),
        (TOPIC_PAYMENT_RESULT, "payment_result"),
    ):
        values = poison_values(topic, "0190a000-0000-7000-8000-000000000001")
        assert set(values) == {"bad-json", "unknown-schema-version", "negative-amount"}
        for name in ("bad-json", "unknown-schema-version"):
            with pytest.raises(ValueError):
                decode(values[name], kind)
        assert decode(values["negative-amount"], kind).payload["amount"] == -5
    negative = poison_values(TOPIC_PAYMENT_REQUESTED, "0190a000-0000-7000-8000-000000000002")
    with pytest.raises(PoisonMessage):
        parse_payment_request(decode(negative["negative-amount"], "payment_requested").payload)


# --- The checks -----------------------------------------------------------------------------


def order(id: str, status: str = "paid", amount: int = 100, user: str = "u") -> Order:
    reason = "insufficient_funds" if status == "failed" else None
    return Order(id, user, amount, f"token {id}", status, reason)


def attempt(id: str | None, token: str, outcome: Outcome, amount: int = 100) -> OrderAttempt:
    return OrderAttempt("u", f"token {token}", amount, outcome, id, "x")


def test_a_timed_out_order_that_exists_is_accepted_and_one_that_does_not_is_not() -> None:
    rows = [order("a"), order("b")]
    attempts = [
        attempt("a", "a", Outcome.ACCEPTED),
        attempt(None, "b", Outcome.UNKNOWN),
        attempt(None, "c", Outcome.UNKNOWN),
    ]
    result = classify_orders(attempts, rows)
    assert set(result.accepted) == {"a", "b"}
    assert (result.created, result.unknown_found, result.unknown_absent) == (1, 1, 1)
    assert result.problems == []


def test_an_order_answered_201_but_missing_or_one_nobody_sent_is_a_problem() -> None:
    missing = classify_orders([attempt("a", "a", Outcome.ACCEPTED)], [])
    assert missing.problems
    stranger = classify_orders([], [order("z")])
    assert stranger.problems


def keyed(id: str | None, outcome: Outcome) -> OrderAttempt:
    return OrderAttempt("u", "token k", 100, outcome, id, "x", key="k")


def test_an_order_sent_again_with_its_key_is_one_order_however_many_tries() -> None:
    tries = [
        keyed(None, Outcome.UNKNOWN),
        keyed(None, Outcome.UNSENT),
        keyed("k", Outcome.ACCEPTED),
    ]
    result = classify_orders(tries, [order("k")])
    assert result.problems == []
    assert set(result.accepted) == {"k"}
    assert (result.created, result.unknown_found, result.unknown_absent) == (1, 0, 0)
    assert (result.keyed_retried, result.keyed_replayed) == (1, 1)
    # Never answered 201, yet made: found, once.
    in_doubt = classify_orders(tries[:2], [order("k")])
    assert (in_doubt.unknown_found, in_doubt.problems) == (1, [])


def test_two_orders_for_one_key_or_a_replay_naming_another_order_is_a_problem() -> None:
    tries = [keyed("k", Outcome.ACCEPTED), keyed("k", Outcome.ACCEPTED)]
    twice = [order("k"), Order("k2", "u", 100, "token k", "paid", None)]
    assert classify_orders(tries, twice).problems
    elsewhere = [keyed("k", Outcome.ACCEPTED), keyed("other", Outcome.ACCEPTED)]
    assert classify_orders(elsewhere, [order("k")]).problems
    # A try in doubt that made it, then its replay refused (a 4xx): the replay failed.
    refused = [keyed(None, Outcome.UNKNOWN), keyed(None, Outcome.REJECTED)]
    assert classify_orders(refused, [order("k")]).problems
    assert classify_orders(refused, []).problems == []  # refused, and nothing made
    never_sent = [keyed(None, Outcome.UNSENT)]
    assert classify_orders(never_sent, [order("k")]).problems


def test_a_top_up_applied_twice_or_confirmed_but_absent_is_a_problem() -> None:
    sent = [TopUpAttempt("acc", 1001, Outcome.ACCEPTED, "200")]
    twice = [LedgerRow("acc", "top_up", 1001, None)] * 2
    assert classify_top_ups(sent, twice).problems
    assert classify_top_ups(sent, []).problems
    fine = classify_top_ups(sent, twice[:1])
    assert fine.problems == [] and fine.confirmed == 1


def test_a_second_debit_for_one_order_fails_the_check() -> None:
    orders = {"a": order("a")}
    once = [LedgerRow("acc", "debit", 100, "a")]
    assert check_debits(orders, once).ok
    assert not check_debits(orders, once * 2).ok
    assert not check_debits(orders, []).ok  # paid without a debit
    assert not check_debits({"a": order("a", "failed")}, once).ok  # debit without a paid order


def test_money_that_appears_or_vanishes_fails_conservation() -> None:
    orders = {"a": order("a", amount=300)}
    ledger = [LedgerRow("acc", "top_up", 1000, None), LedgerRow("acc", "debit", 300, "a")]
    assert all(c.ok for c in check_money(orders, {"acc": 700}, ledger))
    conserved, matches, _ = check_money(orders, {"acc": 701}, ledger)
    assert not conserved.ok and not matches.ok


def test_dead_letters_must_be_exactly_the_poison() -> None:
    poison = [Poison(TOPIC_PAYMENT_REQUESTED, "payments", "bad-json", "p1")]
    facts = Facts(
        dead_letters_before={"orders": 5, "payments": 5},
        dead_letters_after={"orders": 5, "payments": 6},
        dead_letter_ids={"orders": set(), "payments": {"p1"}},
    )
    assert all(c.ok for c in check_dead_letters(facts, poison))
    facts.dead_letter_ids["orders"] = {"a real event"}
    facts.dead_letters_after["orders"] = 6
    assert not all(c.ok for c in check_dead_letters(facts, poison))


def test_backlogs_lag_and_slow_settling_fail_their_checks() -> None:
    facts = Facts(
        outbox_backlog={"orders": 0, "payments": 0},
        inbox_backlog={"orders": 0, "payments": 1},
        lag={"orders-service": 0, "payments-service": 3},
    )
    failed = {c.name for c in check_backlogs(facts) if not c.ok}
    assert failed == {"payments: inbox backlog 0", "consumer lag 0: payments-service"}
    assert check_terminal({"a": order("a")}, 12.0).ok
    assert not check_terminal({"a": order("a")}, 61.0).ok
    assert not check_terminal({"a": order("a", "new")}, None).ok
    assert not check_underfunded({"a": order("a")}).ok


def test_quiet_means_nothing_pending_and_every_poison_dead_lettered() -> None:
    seen = {"new": 0, "orders outbox": 0, "orders dead": 3, "payments dead": 3}
    assert is_quiet(seen, {"orders": 3, "payments": 3})
    assert not is_quiet(seen, {"orders": 4, "payments": 3})
    assert not is_quiet({**seen, "new": 1}, {"orders": 3, "payments": 3})
    assert not is_quiet({"error": 1}, {})
