"""`just chaos [--seed N] [--orders 5000] [--users 20] [--top-ups N] [--short]`."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence

from chaos import runner
from chaos.schedule import build
from services.common.config import load


def parse(argv: Sequence[str]) -> runner.Options:
    parser = argparse.ArgumentParser(
        prog="just chaos",
        description="Steady order traffic through the gateway while a seeded schedule of faults "
        "hits the running system (`just up`); then checks orders, money, dead letters, "
        "backlogs and consumer lag. Exits 1 if an invariant fails, 2 if it cannot run.",
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument("--orders", type=int, default=None, help="orders (5000; --short: 300)")
    parser.add_argument("--users", type=int, default=None, help="users (20; --short: 10)")
    parser.add_argument("--top-ups", type=int, default=None, help="top-ups (orders / 16)")
    parser.add_argument("--short", action="store_true", help="each fault once, an 8 s Kafka outage")
    args = parser.parse_args(argv)
    orders = args.orders if args.orders is not None else (300 if args.short else 5000)
    users = args.users if args.users is not None else (10 if args.short else 20)
    if orders < users or users < 1:
        parser.error("need at least one user and at least one order per user")
    return runner.Options(
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6),
        orders=orders,
        users=users,
        top_ups=args.top_ups if args.top_ups is not None else max(users, orders // 16),
        short=args.short,
    )


def main(argv: Sequence[str]) -> int:
    options = parse(argv)
    config = load()
    asked_again_after = config.payment_rerequest_after + config.payment_rerequest_interval
    return runner.main(
        options, build(options.seed, short=options.short, asked_again_after=asked_again_after)
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
