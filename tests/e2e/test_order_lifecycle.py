"""End to end, through the gateway, on the real stack: an order is paid or failed for the
right reason, exactly once, and money adds up."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import System

pytestmark = pytest.mark.e2e


def test_an_order_for_a_funded_account_is_paid_and_debits_exactly_its_amount(
    system: System,
) -> None:
    user = system.funded_user(10_000)
    order = system.place_order(user, 2_500)
    assert system.wait_terminal([order])[order] == ("paid", None)
    assert system.balance(user) == 7_500
    status = system.http.get(f"{system.gateway}/orders/{order}/status").json()
    assert status == {"id": order, "status": "paid"}


def test_an_underfunded_order_fails_with_insufficient_funds_and_leaves_the_balance(
    system: System,
) -> None:
    user = system.funded_user(100)
    order = system.place_order(user, 101)
    assert system.wait_terminal([order])[order] == ("failed", "insufficient_funds")
    assert system.balance(user) == 100
    status = system.http.get(f"{system.gateway}/orders/{order}/status").json()
    assert status == {"id": order, "status": "failed", "reason": "insufficient_funds"}


def test_an_order_of_a_user_without_an_account_fails_with_account_not_found(
    system: System,
) -> None:
    order = system.place_order(str(uuid.uuid4()), 100)
    assert system.wait_terminal([order])[order] == ("failed", "account_not_found")


def test_one_users_orders_are_charged_in_the_order_they_were_created(system: System) -> None:
    user = system.funded_user(300)
    # 100, 250, 200: in creation order the first is paid and the second fails; charging out
    # of order could pay the 250 or the 200 instead.
    orders = [system.place_order(user, amount) for amount in (100, 250, 200)]
    states = system.wait_terminal(orders)
    assert [states[o][0] for o in orders] == ["paid", "failed", "paid"]
    assert system.balance(user) == 0


def test_a_burst_of_1000_orders_over_20_users_all_end_terminal_and_money_is_conserved(
    system: System,
) -> None:
    rng = random.Random(20)
    users = [system.funded_user(rng.randrange(0, 40_000)) for _ in range(20)]
    plan = [(rng.choice(users), rng.randrange(1, 1_500)) for _ in range(1000)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        orders = list(pool.map(lambda p: system.place_order(*p), plan))
    states = system.wait_terminal(orders, timeout=120)

    paid = [o for o in orders if states[o][0] == "paid"]
    amounts = dict(zip(orders, (a for _, a in plan), strict=True))
    assert all(states[o][0] in ("paid", "failed") for o in orders)
    # Every paid order has exactly one debit of its amount; no failed order has one.
    debits = dict(
        system.payments_sql(
            "SELECT order_id::text, amount FROM ledger"
            " WHERE kind = 'debit' AND order_id = ANY(%s::uuid[])",
            orders,
        )
    )
    assert debits == {o: amounts[o] for o in paid}
    # Per account, balance = top-ups - debits; globally balances + paid = top-ups.
    rows = system.payments_sql(
        """
        SELECT a.user_id::text, a.balance,
               coalesce(sum(l.amount) FILTER (WHERE l.kind = 'top_up'), 0),
               coalesce(sum(l.amount) FILTER (WHERE l.kind = 'debit'), 0)
        FROM accounts a LEFT JOIN ledger l ON l.account_id = a.id
        WHERE a.user_id = ANY(%s::uuid[]) GROUP BY a.user_id, a.balance
        """,
        users,
    )
    assert len(rows) == 20
    for _, balance, top_ups, debited in rows:
        assert balance == top_ups - debited >= 0
    total_top_ups = sum(r[2] for r in rows)
    assert sum(r[1] for r in rows) + sum(amounts[o] for o in paid) == total_top_ups


def test_an_order_and_a_top_up_retried_with_their_idempotency_keys_are_made_and_charged_once(
    system: System,
) -> None:
    # A client that lost the answers (a timeout, a dropped connection) sends the same requests
    # again, some of them while the first is still in flight.
    account = system.http.post(f"{system.gateway}/accounts/create").json()["account_id"]
    credit, order = {"Idempotency-Key": str(uuid.uuid4())}, {"Idempotency-Key": str(uuid.uuid4())}

    def top_up(_: int) -> int:
        answer = system.http.post(
            f"{system.gateway}/accounts/top_up",
            json={"account_id": account, "amount": 1_000},
            headers=credit,
        )
        assert answer.status_code == 200, answer.text
        return int(answer.json()["balance"])

    def place(_: int) -> str:
        answer = system.http.post(
            f"{system.gateway}/orders/create",
            json={"user_id": account, "amount": 300, "description": "retried"},
            headers=order,
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    with ThreadPoolExecutor(max_workers=5) as pool:
        assert set(pool.map(top_up, range(5))) == {1_000}
        ids = set(pool.map(place, range(5)))
    assert len(ids) == 1
    (order_id,) = ids
    assert system.wait_terminal([order_id])[order_id] == ("paid", None)
    assert place(0) == order_id  # once paid, too

    assert system.balance(account) == 700
    ledger = system.payments_sql(
        "SELECT kind, amount FROM ledger WHERE account_id = %s ORDER BY id", account
    )
    assert ledger == [("top_up", 1_000), ("debit", 300)]
    assert system.orders_sql("SELECT count(*) FROM orders WHERE user_id = %s", account) == [(1,)]
