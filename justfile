# Orders & Payments: every way to run, watch and test the system. `just --list` shows them.
# On a fresh machine call these through ./dev (it prepares .venv, where `just` lives).

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments
set dotenv-load

export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Show the recipes.
default:
    @just --list

# Start Postgres, Redis and Kafka, then every process of the system (idempotent).
up:
    scripts/stack.sh up
    scripts/services.sh up

# Stop the system's processes (SIGTERM: flush, commit, close), then the servers.
down:
    scripts/services.sh down
    scripts/stack.sh down

# Health of the servers and of every process.
status:
    scripts/stack.sh status
    scripts/services.sh status

# Tail logs: `just logs` (all processes), `just logs kafka`, `just logs payments-worker`.
logs name="":
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{name}}" in
      postgres|redis|kafka) exec scripts/stack.sh logs "{{name}}" ;;
      "") exec tail -n 50 -F .stack/services/logs/*.log ;;
      *) exec tail -n 100 -F ".stack/services/logs/{{name}}.log" ;;
    esac

# Restart (or stop/start/status) one process: `just ctl restart listener`.
ctl *args:
    scripts/services.sh ctl "$@"

# Apply pending schema migrations to both databases.
migrate:
    python -m services.common.migrations

# Where the Dramatiq dashboard is (it runs as part of `just up`).
dashboard:
    @echo "Dramatiq dashboard: http://127.0.0.1:${DASHBOARD_PORT:-8090}/"

# Lint and type-check.
lint:
    ruff check services actors tests scripts bench chaos
    ruff format --check services actors tests scripts bench chaos
    mypy
    mypy --strict scripts/demo.py

# The whole suite: lint, servers up, unit + integration + e2e tests, coverage >= 85%.
test *args: lint
    #!/usr/bin/env bash
    set -euo pipefail
    # Servers this run has to start are stopped after it; KEEP_STACK=1 keeps them for the next.
    servers=$(scripts/stack.sh status 2>/dev/null || true)
    if grep -qv '^[a-z]* *down ' <<<"$servers"; then started=0; else started=1; fi
    scripts/stack.sh up
    rm -f .coverage .coverage.*
    rc=0
    pytest --cov --cov-report=term "$@" || rc=$?
    if ((started)) && [ -z "${KEEP_STACK:-}" ]; then
      echo "==> stopping the servers this run started (KEEP_STACK=1 keeps them)"
      scripts/stack.sh down
    fi
    exit "$rc"

# --- Demo scenarios ---
# Each prints its HTTP calls and answers as a story, against GATEWAY_URL (default
# http://127.0.0.1:${GATEWAY_PORT:-8080}), and exits non-zero saying why if an expectation fails.

# The tour: account, top-ups, an order paid live, one sent twice with its Idempotency-Key, both failure reasons, a 422, balance arithmetic.
demo:
    @python scripts/demo.py tour

# 20 concurrent orders against money for 5: exactly 5 paid, 15 insufficient_funds, balance 0.
demo-double-spend:
    @python scripts/demo.py double-spend

# SIGKILL workers mid-burst: every order ends, none charged twice (--orders/--users/--page-size N).
demo-crash *args:
    @python scripts/demo.py crash "$@"

# Both seed documents' curl examples, run with real curl against the gateway.
demo-seed-curl:
    @scripts/demo-seed-curl.sh

# --- Benchmark ---

# Against the running system (`just up` first); options pass through, `just bench --help` lists
# them: `just bench --rates 200,500 --duration 30 --profile 20`. Writes .results/latest.{json,png}.
# Open-loop benchmark: latency percentiles, max sustained rate, CPU per order of every process.
bench *args:
    @BENCH_COMMAND="just bench $*" python -m bench "$@"

# The least the HTTP part of an order costs here: a trivial app behind a trivial aiohttp proxy,
# open-loop, CPU ms per request of client, proxy and upstream (`--rates 300,1000 --seconds 8`).
bench-floor *args:
    @python -m bench.floor "$@"

# --- Chaos ---

# Against the running system (`just up` first): order traffic through the gateway while a seeded
# schedule kills processes, stops Kafka, crashes Postgres, empties Redis, pauses a consumer and
# injects duplicates and poison; then checks orders, money, dead letters, backlogs and lag.
# Fault injection, invariants checked after: `just chaos [--seed N] [--orders N] [--short]`.
chaos *args:
    @python -m chaos "$@"
