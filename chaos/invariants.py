"""What must hold once the faults have healed and the system is quiet: the SQL that gathers the
facts (scoped to this run's users, or to what happened since it began), and the checks, which
are pure functions of those facts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from chaos.faults import Poison, expected_dead_letters
from chaos.target import query
from chaos.traffic import OrderAttempt, Outcome, TopUpAttempt

ORDERS_OF_USERS: Final = """
SELECT id::text, user_id::text, amount, description, status, reason
FROM orders WHERE user_id = ANY(%(users)s::uuid[])
"""
NEW_ORDERS_OF_USERS: Final = """
SELECT count(*) FROM orders WHERE user_id = ANY(%(users)s::uuid[]) AND status = 'new'
"""
ACCOUNTS: Final = "SELECT id::text, balance FROM accounts WHERE id = ANY(%(accounts)s::uuid[])"
LEDGER: Final = """
SELECT account_id::text, kind, amount, order_id::text
FROM ledger WHERE account_id = ANY(%(accounts)s::uuid[])
"""
# Rows this run made (or that arrived while it ran) and that are not done yet.
OUTBOX_BACKLOG: Final = """
SELECT count(*) FROM outbox WHERE published_at IS NULL AND created_at >= %(since)s
"""
INBOX_BACKLOG: Final = """
SELECT count(*) FROM inbox WHERE processed_at IS NULL AND received_at >= %(since)s
"""
DEAD_LETTERS_SINCE: Final = "SELECT event_id::text FROM dead_letters WHERE created_at >= %(since)s"
DEAD_LETTER_COUNT: Final = "SELECT count(*) FROM dead_letters"

SERVICES: Final = ("orders", "payments")
MIN_UNDERFUNDED_SHARE: Final = 0.20
TERMINAL_WITHIN_SECONDS: Final = 60.0


@dataclass(frozen=True)
class Order:
    id: str
    user_id: str
    amount: int
    description: str
    status: str
    reason: str | None


@dataclass(frozen=True)
class LedgerRow:
    account_id: str
    kind: str
    amount: int
    order_id: str | None


@dataclass
class Facts:
    """Everything the checks look at, read after quiescence."""

    orders: list[Order] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    ledger: list[LedgerRow] = field(default_factory=list)
    outbox_backlog: dict[str, int] = field(default_factory=dict)
    inbox_backlog: dict[str, int] = field(default_factory=dict)
    dead_letters_before: dict[str, int] = field(default_factory=dict)
    dead_letters_after: dict[str, int] = field(default_factory=dict)
    dead_letter_ids: dict[str, set[str]] = field(default_factory=dict)  # since the run began
    lag: dict[str, int] = field(default_factory=dict)  # consumer group -> messages behind


def read_facts(
    urls: dict[str, str], users: Sequence[str], since: dict[str, datetime], facts: Facts
) -> Facts:
    """Fill `facts` from both databases (lag and the "before" counts are filled by the caller)."""
    scope = {"users": list(users), "accounts": list(users)}  # user id == account id here
    facts.orders = [Order(*row) for row in query(urls["orders"], ORDERS_OF_USERS, scope)]
    facts.balances = {row[0]: row[1] for row in query(urls["payments"], ACCOUNTS, scope)}
    facts.ledger = [LedgerRow(*row) for row in query(urls["payments"], LEDGER, scope)]
    for service in SERVICES:
        params = {"since": since[service]}
        facts.outbox_backlog[service] = query(urls[service], OUTBOX_BACKLOG, params)[0][0]
        facts.inbox_backlog[service] = query(urls[service], INBOX_BACKLOG, params)[0][0]
        facts.dead_letters_after[service] = query(urls[service], DEAD_LETTER_COUNT)[0][0]
        facts.dead_letter_ids[service] = {
            row[0] for row in query(urls[service], DEAD_LETTERS_SINCE, params)
        }
    return facts


# --- The checks (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    figure: str


@dataclass(frozen=True)
class OrderClassification:
    """Which orders this run's requests made, from the orders table. One order meant is one
    description: a try of its own without an Idempotency-Key, every try of it with one."""

    accepted: dict[str, Order]  # order id -> order: 201s and timed-out-but-found
    created: int  # answered 201
    unknown_found: int  # timed out / 5xx, but the order exists
    unknown_absent: int  # timed out / 5xx, and no such order: never created
    problems: list[str]
    keyed_retried: int = 0  # orders with a key sent more than once
    keyed_replayed: int = 0  # of those, answered 201 after a try that may have made it


def classify_orders(attempts: Iterable[OrderAttempt], rows: Iterable[Order]) -> OrderClassification:
    by_description: dict[str, list[Order]] = {}
    for order in rows:
        by_description.setdefault(order.description, []).append(order)
    tries: dict[str, list[OrderAttempt]] = {}
    for attempt in attempts:
        tries.setdefault(attempt.description, []).append(attempt)
    accepted: dict[str, Order] = {}
    created = unknown_found = unknown_absent = keyed_retried = keyed_replayed = 0
    problems: list[str] = []
    for description, sent in tries.items():
        found = by_description.get(description, [])
        if len(found) > 1:
            problems.append(f"{description!r} made {len(found)} orders: {[r.id for r in found]}")
            continue
        row = found[0] if found else None
        answered = [a for a in sent if a.outcome is Outcome.ACCEPTED]
        refused = [a for a in sent if a.outcome is Outcome.REJECTED]
        if row is not None and refused:  # a replay of what made it must not be refused
            problems.append(f"{description!r} answered {refused[-1].answer} yet exists")
            continue
        if len(sent) > 1:
            keyed_retried += 1
            before = sent[: sent.index(answered[0])] if answered else []
            keyed_replayed += any(a.outcome is Outcome.UNKNOWN for a in before)
        if answered:
            created += 1
            if row is None or any(a.order_id != row.id for a in answered):
                problems.append(f"{description!r} answered 201 but is not in the table as such")
                continue
        elif any(a.outcome is Outcome.UNKNOWN for a in sent):
            if row is None:
                unknown_absent += 1
                continue
            unknown_found += 1
        elif row is not None:  # never sent, yet made
            problems.append(f"{description!r} answered {sent[-1].answer} yet exists")
            continue
        else:  # refused or never sent, and absent
            continue
        first = sent[0]
        if row.amount != first.amount or row.user_id != first.user_id:
            problems.append(f"order {row.id} differs from what was sent")
        accepted[row.id] = row
    strangers = [
        row.id
        for description, found in by_description.items()
        if description not in tries
        for row in found
    ]
    if strangers:
        problems.append(
            f"{len(strangers)} order(s) of this run's users nobody sent: {strangers[:3]}"
        )
    return OrderClassification(
        accepted, created, unknown_found, unknown_absent, problems, keyed_retried, keyed_replayed
    )


@dataclass(frozen=True)
class TopUpClassification:
    applied: int  # ledger top-up rows of this run's accounts
    confirmed: int  # answered 200
    unknown_applied: int  # timed out / 5xx, found in the ledger
    unknown_absent: int
    problems: list[str]


def classify_top_ups(
    attempts: Iterable[TopUpAttempt], ledger: Iterable[LedgerRow]
) -> TopUpClassification:
    rows = Counter((r.account_id, r.amount) for r in ledger if r.kind == "top_up")
    sent = {(a.account_id, a.amount): a for a in attempts}
    confirmed = unknown_applied = unknown_absent = 0
    problems: list[str] = []
    for key, attempt in sent.items():
        found = rows.get(key, 0)
        if found > 1:
            problems.append(f"top-up {key} applied {found} times")
        if attempt.outcome is Outcome.ACCEPTED:
            confirmed += 1
            if found == 0:
                problems.append(f"top-up {key} answered 200 but is not in the ledger")
        elif attempt.outcome is Outcome.UNKNOWN:
            if found:
                unknown_applied += 1
            else:
                unknown_absent += 1
        elif found:
            problems.append(f"top-up {key} answered {attempt.answer} yet is in the ledger")
    strangers = [key for key in rows if key not in sent]
    if strangers:
        problems.append(f"{len(strangers)} ledger top-up(s) nobody sent: {strangers[:3]}")
    return TopUpClassification(
        sum(rows.values()), confirmed, unknown_applied, unknown_absent, problems
    )


def check_debits(orders: dict[str, Order], ledger: Iterable[LedgerRow]) -> Check:
    """No order charged twice; every paid order exactly one debit of its amount; every debit
    a paid order."""
    debits = [r for r in ledger if r.kind == "debit"]
    per_order = Counter(r.order_id for r in debits)
    twice = [o for o, n in per_order.items() if n > 1]
    paid = {o.id: o for o in orders.values() if o.status == "paid"}
    unpaid_debits = [r.order_id for r in debits if r.order_id not in paid]
    undebited = [o for o in paid if per_order.get(o, 0) != 1]
    wrong_amount = [
        r.order_id for r in debits if r.order_id in paid and paid[r.order_id].amount != r.amount
    ]
    ok = not (twice or unpaid_debits or undebited or wrong_amount)
    figure = (
        f"{len(debits)} debits, {len(paid)} paid orders; charged twice {len(twice)}, "
        f"paid without one debit {len(undebited)}, debit without paid order {len(unpaid_debits)}, "
        f"wrong amount {len(wrong_amount)}"
    )
    return Check("no order charged twice; paid <=> exactly one debit", ok, figure)


def check_money(
    orders: dict[str, Order], balances: dict[str, int], ledger: Sequence[LedgerRow]
) -> list[Check]:
    top_ups = sum(r.amount for r in ledger if r.kind == "top_up")
    paid = sum(o.amount for o in orders.values() if o.status == "paid")
    held = sum(balances.values())
    conserved = Check(
        "money conserved: sum(balances) + sum(paid) = sum(top-ups)",
        held + paid == top_ups,
        f"{held} + {paid} = {held + paid} vs {top_ups}",
    )
    by_account: Counter[str] = Counter()
    for row in ledger:
        by_account[row.account_id] += row.amount if row.kind == "top_up" else -row.amount
    off = [a for a, balance in balances.items() if balance != by_account.get(a, 0)]
    matches = Check(
        "every balance = its ledger sum",
        not off,
        f"{len(balances) - len(off)}/{len(balances)} accounts match",
    )
    negative = [a for a, balance in balances.items() if balance < 0]
    return [
        conserved,
        matches,
        Check("no balance negative", not negative, f"{len(negative)} negative"),
    ]


def check_dead_letters(facts: Facts, poison: Sequence[Poison]) -> list[Check]:
    """Dead letters since the run began are exactly the poison it produced, per database."""
    checks = []
    for service in SERVICES:
        expected = expected_dead_letters(poison, service)
        got = facts.dead_letter_ids.get(service, set())
        delta = facts.dead_letters_after.get(service, 0) - facts.dead_letters_before.get(service, 0)
        ok = got == expected and delta == len(expected)
        figure = f"+{delta} dead letters for {len(expected)} poison"
        if got - expected:
            figure += f"; {len(got - expected)} not poison"
        if expected - got:
            figure += f"; {len(expected - got)} poison missing"
        checks.append(Check(f"{service}: dead letters == poison injected", ok, figure))
    return checks


def check_backlogs(facts: Facts) -> list[Check]:
    checks = []
    for service in SERVICES:
        outbox = facts.outbox_backlog.get(service, -1)
        inbox = facts.inbox_backlog.get(service, -1)
        checks.append(Check(f"{service}: outbox backlog 0", outbox == 0, f"{outbox} unpublished"))
        checks.append(Check(f"{service}: inbox backlog 0", inbox == 0, f"{inbox} unapplied"))
    for group, lag in sorted(facts.lag.items()):
        checks.append(Check(f"consumer lag 0: {group}", lag == 0, f"{lag} messages behind"))
    return checks


def check_terminal(orders: dict[str, Order], settled_after: float | None) -> Check:
    """Every accepted order paid or failed, within 60 s of the last fault healing."""
    pending = sum(1 for o in orders.values() if o.status == "new")
    within = settled_after is not None and settled_after <= TERMINAL_WITHIN_SECONDS
    when = "never" if settled_after is None else f"{settled_after:.1f} s"
    return Check(
        f"every accepted order terminal within {TERMINAL_WITHIN_SECONDS:.0f} s of the last heal",
        pending == 0 and within,
        f"{len(orders)} orders, {pending} still new; all terminal after {when}",
    )


def check_underfunded(orders: dict[str, Order]) -> Check:
    failed = sum(1 for o in orders.values() if o.reason == "insufficient_funds")
    share = failed / len(orders) if orders else 0.0
    return Check(
        f"(traffic) >= {MIN_UNDERFUNDED_SHARE:.0%} of orders underfunded",
        share >= MIN_UNDERFUNDED_SHARE,
        f"{failed} failed insufficient_funds ({share:.1%})",
    )


def format_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'invariant':<{width}}  result  figure", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.figure}" for c in checks]
    return "\n".join(lines)
