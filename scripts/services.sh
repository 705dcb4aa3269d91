#!/usr/bin/env bash
# The system's own processes (gateway, orders, payments, workers, consumers, listener,
# dashboard) under supervisord, which restarts any that dies.
#
#   scripts/services.sh up                 start supervisord and every process (idempotent)
#   scripts/services.sh down               SIGTERM every process, wait, stop supervisord
#   scripts/services.sh status             supervisorctl status
#   scripts/services.sh ctl ARGS...        any supervisorctl command, e.g. `ctl restart listener`
#   scripts/services.sh wait               wait until the gateway and both services are ready
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
export STACK_DIR=${STACK_DIR:-$REPO/.stack}
# supervisord's socket, pid file and the processes' logs; tests point it elsewhere.
export SERVICES_DIR=${SERVICES_DIR:-$STACK_DIR/services}
export VENV=${VENV:-$REPO/.venv}
export BIND_HOST=${BIND_HOST:-127.0.0.1}
export GATEWAY_PORT=${GATEWAY_PORT:-8080}
export ORDERS_PORT=${ORDERS_PORT:-8081}
export PAYMENTS_PORT=${PAYMENTS_PORT:-8082}
export DASHBOARD_PORT=${DASHBOARD_PORT:-8090}
CONF=$REPO/stack/supervisord.conf
SUPERVISORCTL=("$VENV/bin/supervisorctl" -c "$CONF")

running() { [ -S "$SERVICES_DIR/run/supervisor.sock" ] && "${SUPERVISORCTL[@]}" pid >/dev/null 2>&1; }

wait_ready() {
  local deadline=$((SECONDS + ${1:-60})) url
  for url in "http://127.0.0.1:$ORDERS_PORT/ready" "http://127.0.0.1:$PAYMENTS_PORT/ready" \
             "http://127.0.0.1:$GATEWAY_PORT/ready"; do
    until curl -fsS -m 2 "$url" >/dev/null 2>&1; do
      if [ $SECONDS -ge $deadline ]; then
        echo "error: $url not ready; see $SERVICES_DIR/logs/" >&2
        "${SUPERVISORCTL[@]}" status >&2 || true
        return 1
      fi
      sleep 0.3
    done
  done
  echo "==> system ready: gateway http://127.0.0.1:$GATEWAY_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
}

case "${1:-}" in
  up)
    mkdir -p "$SERVICES_DIR/logs" "$SERVICES_DIR/run"
    if running; then
      "${SUPERVISORCTL[@]}" start all >/dev/null || true
    else
      echo "==> starting the system's processes (supervisord)"
      "$VENV/bin/supervisord" -c "$CONF"
    fi
    wait_ready 90
    ;;
  down)
    if running; then
      echo "==> stopping the system's processes"
      "${SUPERVISORCTL[@]}" stop all >/dev/null || true
      pid=$("${SUPERVISORCTL[@]}" pid)
      "${SUPERVISORCTL[@]}" shutdown >/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    ;;
  status)
    if running; then "${SUPERVISORCTL[@]}" status; else echo "system processes: down"; exit 3; fi
    ;;
  ctl)
    shift
    "${SUPERVISORCTL[@]}" "$@"
    ;;
  wait)
    wait_ready "${2:-60}"
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
