"""Demo scenarios for a person watching a terminal: every HTTP call, its answer, and a line or two
of narration. Public API only, so they work against any deployment of the gateway.

    python scripts/demo.py tour          the whole tour                     `just demo`
    python scripts/demo.py double-spend  20 concurrent orders, money for 5  `just demo-double-spend`
    python scripts/demo.py crash         SIGKILL workers mid-burst          `just demo-crash`

The gateway is GATEWAY_URL (default http://127.0.0.1:${GATEWAY_PORT:-8080}). A scenario whose
expectation fails exits 1 saying why; an unreachable gateway exits 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

SERVICES_SH: Final = Path(__file__).resolve().parent / "services.sh"
TERMINAL: Final = frozenset({"paid", "failed"})
WATCH_INTERVAL: Final = 0.02  # seconds between status polls while watching one order
PAGE_SIZE: Final = 500  # the API's largest page, for quiet polling
ORDER_FIELDS: Final = ("id", "amount", "status")  # what the tour shows of an order
Order = dict[str, Any]

# --- Output ------------------------------------------------------------------------------------

_COLOUR: Final = sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _paint(text: str, sgr: str) -> str:
    return f"\033[{sgr}m{text}\033[0m" if _COLOUR else text


def step(title: str) -> None:
    """A new chapter of the story."""
    print(f"\n{_paint('== ' + title, '1')}", flush=True)


def say(text: str) -> None:
    """A line of narration."""
    print(f"   {text}", flush=True)


class ScenarioFailed(Exception):
    """An expectation of the scenario did not hold; the message says which and what was seen."""


def expect(holds: bool, claim: str, seen: str = "") -> None:
    """Tick `claim` off, or stop the scenario: it did not hold (`seen` is what happened)."""
    if not holds:
        raise ScenarioFailed(f"{claim}: not so{f' ({seen})' if seen else ''}")
    print(f"   {_paint('✓', '32')} {claim}", flush=True)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:16] + "…"


def _summary(answer: httpx.Response, fields: tuple[str, ...] | None) -> str:
    """The interesting part of an answer: a success's chosen fields (all of a problem's), a
    list's length and next-page cursor."""
    content_type = answer.headers.get("content-type", "").split(";")[0]
    if not content_type.endswith("json"):
        return f"{content_type or 'no content type'}, {len(answer.content)} bytes"
    try:
        data = answer.json()
    except ValueError:
        return f"{content_type}, not JSON: {answer.text[:100]!r}"
    prefix = "" if content_type == "application/json" else f"[{content_type}] "
    if isinstance(data, list):
        cursor = answer.headers.get("x-next-cursor")
        return f"{prefix}{len(data)} orders" + (
            f", next page cursor {_short(cursor)}" if cursor else ""
        )
    if not answer.is_success:
        fields = None  # a problem is shown whole
    shown = {k: v for k, v in data.items() if fields is None or k in fields}
    return prefix + "  ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
        for k, v in shown.items()
    )


# --- The API, narrated -------------------------------------------------------------------------


@dataclass
class Api:
    """The gateway; `call` prints the request and the interesting part of the answer."""

    client: httpx.Client

    @staticmethod
    def target(path: str, params: Mapping[str, Any] | None = None) -> str:
        if not params:
            return path
        # As a person would read it: long values (cursors) shortened, nothing percent-encoded.
        return f"{path}?{'&'.join(f'{k}={_short(v)}' for k, v in params.items())}"

    def show_request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        shown = "".join(f"  {name}: {value}" for name, value in (headers or {}).items())
        shown += "" if body is None else "  " + json.dumps(body, ensure_ascii=False)
        print(f"   → {method} {self.target(path, params)}{shown}", flush=True)

    def show_answer(self, answer: httpx.Response, fields: tuple[str, ...] | None = None) -> None:
        status = f"{answer.status_code} {answer.reason_phrase}"
        replayed = answer.headers.get("idempotent-replayed")
        shown = f"  Idempotent-Replayed: {replayed}" if replayed else ""
        print(f"   ← {_paint(status, '36')}{shown}  {_summary(answer, fields)}", flush=True)

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        fields: tuple[str, ...] | None = None,
        status: int | None = None,
        quiet: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP call; when `status` is given, any other status stops the scenario."""
        if not quiet:
            self.show_request(method, path, body, params, headers)
        answer = self.client.request(
            method,
            path,
            json=body,
            params=dict(params) if params else None,
            headers=dict(headers) if headers else None,
        )
        if not quiet:
            self.show_answer(answer, fields)
        if status is not None and answer.status_code != status:
            raise ScenarioFailed(
                f"{method} {self.target(path, params)} answered {answer.status_code}, "
                f"expected {status}: {answer.text[:300]}"
            )
        return answer

    # The calls the scenarios make.

    def create_account(self) -> str:
        answer = self.call("POST", "/accounts/create", status=201)
        return str(answer.json()["account_id"])

    def top_up(self, account_id: str, amount: int) -> int:
        body = {"account_id": account_id, "amount": amount}
        answer = self.call("POST", "/accounts/top_up", body=body, status=200)
        return int(answer.json()["balance"])

    def balance(self, account_id: str, quiet: bool = False) -> int:
        answer = self.call("GET", f"/accounts/{account_id}/balance", status=200, quiet=quiet)
        return int(answer.json()["balance"])

    def place_order(self, user_id: str, amount: int, description: str) -> str:
        body = {"user_id": user_id, "amount": amount, "description": description}
        answer = self.call(
            "POST",
            "/orders/create",
            body=body,
            fields=ORDER_FIELDS,
            status=201,
        )
        return str(answer.json()["id"])

    def status(self, order_id: str) -> dict[str, Any]:
        """The order's status, quietly (callers poll it)."""
        answer = self.call("GET", f"/orders/{order_id}/status", status=200, quiet=True)
        state: dict[str, Any] = answer.json()
        return state

    def orders_of(self, user_id: str, limit: int = PAGE_SIZE, quiet: bool = True) -> list[Order]:
        """Every order of a user, newest first, following the pages' `X-Next-Cursor`."""
        orders: list[Order] = []
        params: dict[str, Any] = {"user_id": user_id, "limit": limit}
        while True:
            answer = self.call("GET", "/orders", params=params, status=200, quiet=quiet)
            orders.extend(answer.json())
            cursor = answer.headers.get("x-next-cursor")
            if not cursor:
                return orders
            params["cursor"] = cursor


def _label(state: Mapping[str, Any]) -> str:
    reason = state.get("reason")
    return f"{state['status']} ({reason})" if reason else str(state["status"])


def watch(api: Api, order_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll an order's status every 20 ms, printing each change with the ms since its 201."""
    say(f"watching GET /orders/{order_id}/status every {WATCH_INTERVAL * 1000:.0f} ms:")
    start, last, polls = time.perf_counter(), "new", 0
    say(f"   {0:>6.0f} ms  new   (the 201)")
    while True:
        state = api.status(order_id)
        polls += 1
        elapsed = time.perf_counter() - start
        if _label(state) != last:
            last = _label(state)
            say(f"   {elapsed * 1000:>6.0f} ms  {last}   (poll #{polls})")
        if state["status"] in TERMINAL:
            return state
        if elapsed > timeout:
            raise ScenarioFailed(f"order {order_id} still {last} after {timeout:.0f} s")
        time.sleep(WATCH_INTERVAL)


def settle(api: Api, order_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll an order's status quietly until it is terminal; print the final answer."""
    path = f"/orders/{order_id}/status"
    api.show_request("GET", path)
    start = time.perf_counter()
    while True:
        answer = api.call("GET", path, status=200, quiet=True)
        state: dict[str, Any] = answer.json()
        if state["status"] in TERMINAL:
            api.show_answer(answer)
            say(f"  (polled until terminal: {(time.perf_counter() - start) * 1000:.0f} ms)")
            return state
        if time.perf_counter() - start > timeout:
            raise ScenarioFailed(f"order {order_id} still {state['status']} after {timeout:.0f} s")
        time.sleep(WATCH_INTERVAL)


def wait_all_terminal(
    api: Api, placed: Mapping[str, set[str]], timeout: float
) -> dict[str, list[Order]]:
    """Poll each user's orders through the listing until every placed order is paid or failed;
    print progress about once a second. The users' orders as last listed."""
    total = sum(len(ids) for ids in placed.values())
    say(
        f"polling GET /orders?user_id=…&limit={PAGE_SIZE} for {len(placed)} user(s) until all"
        f" {total} orders are terminal"
    )
    start = last_print = time.perf_counter()
    while True:
        listed = {user: api.orders_of(user) for user in placed}
        tally = Counter(
            o["status"]
            for orders in listed.values()
            for o in orders
            if o["id"] in placed[o["user_id"]]
        )
        missing = total - sum(tally.values())
        elapsed = time.perf_counter() - start
        done = missing == 0 and tally["new"] == 0
        if done or time.perf_counter() - last_print >= 1:
            last_print = time.perf_counter()
            say(
                f"  +{elapsed:5.1f} s  paid {tally['paid']:>4}  failed {tally['failed']:>4}"
                f"  new {tally['new']:>4}" + (f"  not listed {missing}" if missing else "")
            )
        if done:
            return listed
        if elapsed > timeout:
            raise ScenarioFailed(
                f"after {timeout:.0f} s, {tally['new']} order(s) still new, {missing} not listed"
            )
        time.sleep(0.25)


def paid_sum(orders: list[Order]) -> int:
    return sum(int(o["amount"]) for o in orders if o["status"] == "paid")


def print_orders(orders: list[Order]) -> None:
    say(f"  {'id':<36}  {'amount':>7}  {'status':<6}  {'reason':<18}  description")
    for o in orders:
        say(
            f"  {o['id']:<36}  {o['amount']:>7}  {o['status']:<6}  {o['reason'] or '':<18}"
            f"  {o['description']}"
        )


# --- just demo ---------------------------------------------------------------------------------


def tour(api: Api) -> None:
    """Account, top-ups, orders paid live, one sent again with its Idempotency-Key, both failure
    reasons, a 422, the listing and a final balance that adds up."""
    gateway = str(api.client.base_url).rstrip("/")
    say("money is in minor units (kopecks)")

    step("1. A new customer: create an account (no body: the account id is the user id)")
    user = api.create_account()

    step("2. Top it up twice")
    top_ups = [10_000, 5_000]
    balance = 0
    for amount in top_ups:
        balance = api.top_up(user, amount)
    expect(balance == sum(top_ups), f"balance after the top-ups is {sum(top_ups)}", str(balance))

    step("3. Read the balance back")
    api.balance(user)

    step("4. Place an order and watch it get paid, live")
    say("the 201 comes back at once with status new; payment happens asynchronously:")
    say("Orders → outbox → Kafka → Payments debits → outbox → Kafka → Orders marks it")
    coffee = api.place_order(user, 2_990, "Coffee beans, 1 kg")
    state = watch(api, coffee)
    expect(state["status"] == "paid", "the order went new → paid", _label(state))

    step("5. Two more orders")
    more = [api.place_order(user, 4_500, "Teapot"), api.place_order(user, 1_200, "Mug")]
    for order in more:
        state = settle(api, order)
        expect(state["status"] == "paid", "paid", _label(state))

    step("6. No answer? Send it again with the same Idempotency-Key: one order, charged once")
    say("a client that lost the answer (a timeout, a dropped connection) cannot know whether")
    say("the order was made; sent with a key of its own, the request can simply be sent again")
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"user_id": user, "amount": 800, "description": "Paper filters"}
    first, again = (
        api.call("POST", "/orders/create", body=body, headers=key, fields=ORDER_FIELDS, status=201)
        for _ in range(2)
    )
    filters = str(first.json()["id"])
    expect(
        again.json()["id"] == filters and again.headers.get("idempotent-replayed") == "true",
        "the same order both times (Idempotent-Replayed: true)",
    )
    state = settle(api, filters)
    expect(state["status"] == "paid", "paid", _label(state))

    step("7. An order the balance cannot cover fails with insufficient_funds")
    say(f"balance now {api.balance(user, quiet=True)}; ordering for 50000")
    underfunded = api.place_order(user, 50_000, "Espresso machine")
    state = settle(api, underfunded)
    expect(
        state == {"id": underfunded, "status": "failed", "reason": "insufficient_funds"},
        "failed, reason insufficient_funds",
        _label(state),
    )

    step("8. An order for a user who has no account fails with account_not_found")
    stranger = str(uuid.uuid4())
    say(f"user {stranger} never opened an account; Orders accepts, Payments refuses")
    orphan = api.place_order(stranger, 100, "Gift card")
    state = settle(api, orphan)
    expect(
        state["reason"] == "account_not_found", "failed, reason account_not_found", _label(state)
    )

    step("9. A bad request: amount 1.5 is not a whole number of kopecks")
    answer = api.call(
        "POST",
        "/orders/create",
        body={"user_id": user, "amount": 1.5, "description": "Half a coffee"},
        status=422,
    )
    expect(
        answer.headers.get("content-type", "").startswith("application/problem+json"),
        "422 as application/problem+json (RFC 9457), naming the field",
    )

    step("10. The customer's orders, newest first")
    orders = api.orders_of(user, limit=100, quiet=False)
    print_orders(orders)
    expect(
        {o["id"] for o in orders} == {coffee, *more, filters, underfunded} and len(orders) == 5,
        "exactly the 5 orders placed (the request sent again and the 422 created none)",
        f"{len(orders)} listed",
    )

    step("11. The final balance adds up")
    final = api.balance(user)
    paid = [int(o["amount"]) for o in reversed(orders) if o["status"] == "paid"]
    say(
        f"top-ups {' + '.join(map(str, top_ups))} − paid {' + '.join(map(str, paid))}"
        f" = {sum(top_ups) - sum(paid)}; the balance says {final}"
    )
    expect(final == sum(top_ups) - sum(paid), "top-ups − paid = balance")

    step("12. Look around")
    api.call("GET", "/swagger/index.html", status=200)
    say(f"Swagger UI: {gateway}/swagger/index.html  (the OpenAPI spec: {gateway}/openapi.json)")
    dashboard = f"http://127.0.0.1:{os.environ.get('DASHBOARD_PORT', '8090')}"
    try:
        code = str(httpx.get(dashboard, timeout=2).status_code)
    except httpx.HTTPError:
        code = "not reachable from here"
    say(f"Dramatiq dashboard (queues, retries, dead letters): {dashboard}/  [{code}]")


# --- just demo-double-spend --------------------------------------------------------------------


def double_spend(api: Api) -> None:
    """20 orders at once against a balance for exactly 5: 5 paid, 15 insufficient_funds, 0 left."""
    count, covered, price = 20, 5, 1_000

    step(f"1. An account with money for exactly {covered} orders of {price}")
    user = api.create_account()
    api.top_up(user, covered * price)

    step(f"2. {count} orders at the same moment")
    say(f"{count} threads wait at a barrier, then each sends:")
    api.show_request(
        "POST", "/orders/create", {"user_id": user, "amount": price, "description": "flash sale #n"}
    )
    barrier = threading.Barrier(count)
    answers: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        barrier.wait()
        sent = time.perf_counter()
        body = {"user_id": user, "amount": price, "description": f"flash sale #{n}"}
        try:
            answer = api.call("POST", "/orders/create", body=body, quiet=True)
            code = answer.status_code
            order_id = str(answer.json()["id"]) if code == 201 else answer.text[:200]
        except httpx.HTTPError as exc:  # counted as status 0, reported by the check below
            code, order_id = 0, repr(exc)
        with lock:
            answers.append((code, order_id, sent))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(1, count + 1)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = (time.perf_counter() - started) * 1000
    spread = (max(a[2] for a in answers) - min(a[2] for a in answers)) * 1000
    codes = Counter(a[0] for a in answers)
    say(
        f"← {', '.join(f'{n} × {code}' for code, n in sorted(codes.items()))}; all sent within"
        f" {spread:.0f} ms of each other, all answered within {took:.0f} ms"
    )
    refused = [a[1] for a in answers if a[0] != 201]
    expect(codes == {201: count}, f"all {count} accepted (201, status new)", str(refused[:1]))

    step("3. Wait until every order is paid or failed")
    wait_all_terminal(api, {user: {a[1] for a in answers}}, timeout=60)

    step("4. The tally")
    listed = api.orders_of(user, limit=100, quiet=False)
    tally = Counter(_label(o) for o in listed)
    for label, n in sorted(tally.items()):
        say(f"  {n:>3} × {label}")
    final = api.balance(user)
    say(
        f"balance: {covered * price} − {tally['paid']} × {price} = "
        f"{covered * price - tally['paid'] * price}; the account says {final}"
    )
    expect(tally["paid"] == covered, f"exactly {covered} paid", f"{tally['paid']} paid")
    expect(
        tally["failed (insufficient_funds)"] == count - covered,
        f"{count - covered} failed with insufficient_funds",
        str(dict(tally)),
    )
    expect(final == 0, "balance 0: no overdraft, no lost update", f"balance {final}")
    say("why: each debit is one UPDATE … SET balance = balance − amount WHERE balance >= amount")


# --- just demo-crash ---------------------------------------------------------------------------


@dataclass
class Supervisor:
    """The local system's supervisord, through `scripts/services.sh ctl`."""

    env: dict[str, str]

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(SERVICES_SH), "ctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout.strip()

    def pid(self, program: str) -> int:
        out = self.ctl("pid", program)
        return int(out) if out.isdigit() else 0

    def kill(self, program: str) -> int:
        """SIGKILL a program and its children (a Dramatiq worker forks its workers); its pid."""
        pid = self.pid(program)
        if not pid:
            raise ScenarioFailed(f"{program} is not running: {self.ctl('status', program)}")
        found = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        )
        children = [int(p) for p in found.stdout.split()]
        for victim in [*children, pid]:
            with contextlib.suppress(ProcessLookupError):  # it died on its own already
                os.kill(victim, signal.SIGKILL)
        family = f" and its children {', '.join(map(str, children))}" if children else ""
        say(_paint(f"kill -9 {pid} ({program}){family}", "31"))
        return pid

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 60) -> str:
        """Wait until supervisord has it RUNNING again under a new pid; its status line."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.ctl("status", program)
            if "RUNNING" in line and f"pid {old_pid}," not in line:
                return line
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"{program} not restarted after {timeout:.0f} s: {line}")
            time.sleep(0.2)


@dataclass
class Burst:
    """Orders placed in the background: one thread per user, so each user's orders are created
    one after another (the order in which they must be charged)."""

    api: Api
    users: list[str]
    total: int
    placed: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index, user in enumerate(self.users):
            share = range(index, self.total, len(self.users))
            self.placed[user] = []
            thread = threading.Thread(target=self._place, args=(user, share), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _place(self, user: str, share: range) -> None:
        for n in share:
            body = {"user_id": user, "amount": 100 + n % 50, "description": f"burst #{n}"}
            order_id, problem = "", ""
            try:
                answer = self.api.call("POST", "/orders/create", body=body, quiet=True)
                if answer.status_code == 201:
                    order_id = str(answer.json()["id"])
                else:
                    problem = f"{answer.status_code} {answer.text[:200]}"
            except httpx.HTTPError as exc:
                problem = repr(exc)
            with self._lock:
                if order_id:
                    self.placed[user].append(order_id)
                else:
                    self.errors.append(problem)

    def count(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self.placed.values()) + len(self.errors)

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()


VICTIMS: Final = ("orders-worker", "payments-worker", "listener", "payments-consumer")


def crash(api: Api, orders: int, users: int, page_size: int, timeout: float) -> None:
    """A burst of orders while the relays, appliers, listener and a consumer are SIGKILLed: every
    order ends paid, and the money says nothing was charged twice."""
    supervisor = Supervisor(_services_env())
    say(
        f"supervisord through {SERVICES_SH.name} ctl"
        f" (SERVICES_DIR={supervisor.env.get('SERVICES_DIR', '.stack/services')})"
    )
    if not supervisor.ctl("pid").isdigit():
        raise ScenarioFailed(
            "supervisord is not reachable through scripts/services.sh ctl; demo-crash needs the"
            f" local system (`just up`), or SERVICES_DIR/VENV pointing at it: {supervisor.ctl()}"
        )
    funding = 1_000_000

    step(f"1. {users} customers with {funding} each (plenty: every order should be paid)")
    accounts = []
    for _ in range(users):
        account = api.create_account()
        api.top_up(account, funding)
        accounts.append(account)

    step("2. The processes about to die")
    for program in VICTIMS:
        say(supervisor.ctl("status", program))

    step(f"3. A burst of {orders} orders in the background, and SIGKILLs in the middle of it")
    say(f"{users} threads, one per customer, each placing its share one after another; e.g.")
    api.show_request(
        "POST", "/orders/create", {"user_id": accounts[0], "amount": 100, "description": "burst #0"}
    )
    burst = Burst(api, accounts, orders)
    burst.start()
    killed: dict[str, int] = {}
    for index, program in enumerate(VICTIMS):
        mark = orders * (index + 1) // (len(VICTIMS) + 1)
        while burst.count() < mark and burst.running():
            time.sleep(0.01)
        say(f"{burst.count():>4}/{orders} orders placed:")
        killed[program] = supervisor.kill(program)
    burst.join()
    say(f"{burst.count():>4}/{orders} orders placed; the burst is over")
    expect(
        not burst.errors,
        f"all {orders} orders accepted (201)",
        f"{len(burst.errors)} refused, e.g. {burst.errors[:1]}",
    )

    step("4. Every order reaches a terminal state, while supervisord restarts the dead")
    say("work whose wake-up (NOTIFY, Dramatiq message) died with a process waits for the")
    say("sweeper's next round (SWEEP_INTERVAL): delayed, never lost — Postgres rows are the truth")
    placed = {user: set(ids) for user, ids in burst.placed.items()}
    listed = wait_all_terminal(api, placed, timeout)

    step("5. Each killed process is running again, under a new pid")
    for program, old in killed.items():
        say(supervisor.wait_restarted(program, old) + f"   (was pid {old})")

    step(f"6. Each customer's orders through the API, page by page (limit={page_size})")
    for user in accounts:
        paged = api.orders_of(user, limit=page_size, quiet=False)
        ids = [o["id"] for o in paged]
        expect(
            len(ids) == len(set(ids)) and set(ids) == placed[user],
            f"{len(ids)} orders, each listed once, exactly those placed for this customer",
            f"{len(ids) - len(set(ids))} listed twice, {len(placed[user] - set(ids))} missing,"
            f" {len(set(ids) - placed[user])} unexpected",
        )
        listed[user] = paged
    statuses = Counter(_label(o) for user_orders in listed.values() for o in user_orders)
    expect(statuses == {"paid": orders}, f"all {orders} paid", str(dict(statuses)))

    step("7. Nothing charged twice: top-up − Σ paid orders = balance, for every customer")
    check_money(api, accounts, funding, listed)
    say("2 s later (a late duplicate debit would show now):")
    time.sleep(2)
    check_money(api, accounts, funding, listed)


def check_money(
    api: Api, accounts: list[str], funding: int, listed: dict[str, list[Order]]
) -> None:
    """Each customer's top-up − Σ paid = balance, printed as arithmetic; the totals must agree."""
    total_paid = total_balance = 0
    for user in accounts:
        paid, balance = paid_sum(listed[user]), api.balance(user, quiet=True)
        say(
            f"  {user}: {funding} − {paid} = {funding - paid}; balance {balance}"
            f" {'✓' if funding - paid == balance else '✗'}"
        )
        total_paid += paid
        total_balance += balance
    top_ups = funding * len(accounts)
    expect(
        top_ups - total_balance == total_paid,
        f"Σ paid {total_paid} == Σ top-ups {top_ups} − Σ balances {total_balance}",
        f"the customers lost {top_ups - total_balance - total_paid} more than they paid for",
    )


def _services_env() -> dict[str, str]:
    """The environment for scripts/services.sh: ours, with VENV defaulting to this Python's
    venv (the script's own default, .venv, may not be the one in use)."""
    env = dict(os.environ)
    if "VENV" not in env and (Path(sys.prefix) / "bin" / "supervisorctl").exists():
        env["VENV"] = sys.prefix
    return env


# --- Entry point -------------------------------------------------------------------------------


def gateway_url() -> str:
    return os.environ.get("GATEWAY_URL") or (
        f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}"
    )


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `just demo | head` ends quietly
    parser = argparse.ArgumentParser(
        description="Demo scenarios against the gateway (GATEWAY_URL)."
    )
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    scenarios.add_parser("tour", help="the whole tour")
    scenarios.add_parser("double-spend", help="20 concurrent orders, money for 5")
    crash_args = scenarios.add_parser("crash", help="SIGKILL workers mid-burst")
    crash_args.add_argument("--orders", type=int, default=300, help="orders in the burst")
    crash_args.add_argument("--users", type=int, default=5, help="customers sharing the burst")
    crash_args.add_argument("--page-size", type=int, default=50, help="listing page size")
    crash_args.add_argument("--timeout", type=float, default=180, help="seconds to settle")
    args = parser.parse_args(argv)

    gateway = gateway_url()
    run: Callable[[Api], None] = {
        "tour": tour,
        "double-spend": double_spend,
        "crash": lambda api: crash(api, args.orders, args.users, args.page_size, args.timeout),
    }[args.scenario]
    print(f"   {args.scenario} against the gateway at {gateway}", flush=True)
    with httpx.Client(base_url=gateway, timeout=httpx.Timeout(10.0)) as client:
        try:
            run(Api(client))
        except ScenarioFailed as failure:
            print(f"\n{_paint('✗ FAILED', '1;31')}: {failure}", flush=True)
            return 1
        except httpx.HTTPError as exc:
            print(
                f"\n{_paint('✗ FAILED', '1;31')}: cannot talk to the gateway at {gateway}:"
                f" {exc!r}. Is the system up (`just up`)?",
                flush=True,
            )
            return 2
    print(f"\n{_paint('✓ ' + args.scenario + ': every expectation held', '1;32')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
