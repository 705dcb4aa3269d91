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
    ruff check services actors tests
    ruff format --check services actors tests
    mypy

# The whole suite: lint, start the servers if needed, unit + integration + end-to-end tests
# with line coverage of the project's code (fails below 85%).
test *args: lint
    scripts/stack.sh up
    rm -f .coverage .coverage.*
    pytest --cov --cov-report=term "$@"
