"""`python -m bench` (`just bench`): benchmark the running system, write `.results/`, print a table.

Examples: `just bench`, `just bench --rates 200,500 --duration 30`, `just bench --profile 20`,
`just bench --rates 20 --duration 3 --ramp-start 0` (no ramp)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bench import cpu, http1, report
from bench.run import REPO, Settings, benchmark
from services.common.config import load as load_config


def parse_rates(text: str) -> tuple[float, ...]:
    """`200,500` -> (200.0, 500.0); every rate must be positive; `""`: no fixed phase."""
    rates = tuple(float(part) for part in text.split(",") if part.strip())
    if rates and min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma separated")
    return rates


def parser() -> argparse.ArgumentParser:
    config = load_config()
    p = argparse.ArgumentParser(
        prog="just bench",
        description="Open-loop benchmark of the running system (`just up` first).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gateway", default=f"http://127.0.0.1:{config.gateway_port}")
    p.add_argument("--orders-database-url", default=config.orders_database_url)
    p.add_argument(
        "--payments-database-url",
        default=config.payments_database_url,
        help="only to name its sessions in --profile",
    )
    p.add_argument("--users", type=int, default=200, help="accounts created for the run")
    p.add_argument("--underfunded", type=float, default=0.1, help="share of users nearly broke")
    p.add_argument("--rates", type=parse_rates, default=(200.0, 500.0), help="fixed phases, /s")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per fixed phase")
    # Right after `./dev up` Kafka's JIT is still compiling and Postgres has no statistics for
    # its new tables: a warm-up under real load lets the measured phases see the steady state.
    p.add_argument("--warmup", type=float, default=20.0, help="seconds at --warmup-rate first")
    p.add_argument("--warmup-rate", type=float, default=200.0)
    p.add_argument("--ramp-start", type=float, default=100.0, help="first ramp rate; 0: no ramp")
    p.add_argument("--ramp-step", type=float, default=50.0)
    p.add_argument("--ramp-step-seconds", type=float, default=10.0)
    p.add_argument("--ramp-max", type=float, default=3000.0)
    p.add_argument(
        "--ramp-patience",
        type=int,
        default=2,
        help="flat steps, or steps over 5%% errors, in a row before stopping",
    )
    p.add_argument("--window", type=int, default=20, help="seconds a sustained rate must last")
    p.add_argument(
        "--drain-timeout", type=float, default=60.0, help="give up after this long without progress"
    )
    p.add_argument("--drain-max", type=float, default=600.0, help="give up after this long")
    p.add_argument(
        "--idle-seconds", type=float, default=5.0, help="measure idle CPU this long first"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="per HTTP request, seconds")
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument(
        "--profile", type=float, default=0.0, help="seconds of an extra py-spy phase; 0: none"
    )
    p.add_argument("--profile-rate", type=float, default=500.0)
    p.add_argument(
        "--profile-programs", default="", help="comma separated; default: all but dashboard"
    )
    p.add_argument("--results-dir", type=Path, default=REPO / ".results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = load_config()
    settings = Settings(
        gateway=args.gateway.rstrip("/"),
        orders_database_url=args.orders_database_url,
        payments_database_url=args.payments_database_url,
        server_ports={
            "postgres": cpu.port_of(args.orders_database_url, 5432),
            "redis": cpu.port_of(config.redis_url, 6379),
            "kafka": cpu.port_of(config.kafka_bootstrap_servers, 9092),
        },
        users=args.users,
        underfunded=args.underfunded,
        rates=args.rates,
        duration=args.duration,
        warmup=args.warmup,
        warmup_rate=args.warmup_rate,
        ramp_start=args.ramp_start,
        ramp_step=args.ramp_step,
        ramp_step_seconds=args.ramp_step_seconds,
        ramp_max=args.ramp_max,
        ramp_patience=args.ramp_patience,
        window=args.window,
        drain_timeout=args.drain_timeout,
        drain_max=args.drain_max,
        idle_seconds=args.idle_seconds,
        timeout=args.timeout,
        max_connections=args.max_connections,
        profile_seconds=args.profile,
        profile_rate=args.profile_rate,
        profile_programs=tuple(p for p in args.profile_programs.split(",") if p),
        results_dir=args.results_dir,
        command=os.environ.get("BENCH_COMMAND", "").strip()
        or shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
    )
    results = http1.run_fast(benchmark(settings))
    json_path, png_path = report.write_results(results, settings.results_dir)
    print()
    print(report.format_table(results))
    print(f"\nresults: {json_path}\nchart:   {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
