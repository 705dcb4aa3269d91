#!/usr/bin/env bash
# The project's local stack: real PostgreSQL, Redis and Apache Kafka (KRaft) servers, started
# by the project itself, without Docker.
#
#   scripts/stack.sh up                 start what is not running (installs what is missing)
#   scripts/stack.sh down               stop exactly what `up` started
#   scripts/stack.sh status             one line per server; exits non-zero if any is down
#   scripts/stack.sh logs [postgres|redis|kafka]   tail the logs (LOGS_FOLLOW=0: print, no follow)
#
# Everything lives under $STACK_DIR (default <repo>/.stack, git-ignored):
#   postgres/  the cluster's data directory (or a symlink to it, see pg_datadir below)
#   redis/     redis' working directory (nothing is persisted: --save '' --appendonly no)
#   kafka/     libs/ (jars from Maven Central), data/, server.properties, log4j2.properties
#   logs/      postgres.log redis.log kafka.log mvn.log apt.log
#   run/       pid files (redis.pid, kafka.pid, postgres.pid) and the lock `up`/`down` take
#
# A port that already answers while no process of ours holds it is the user's own server: it
# is used as is (printed as "external"), nothing is started for it, and `down` never touches it.
#
# Each server runs in a session of its own (pg_ctl and redis daemonize, Kafka goes through
# setsid). Where the kernel groups processes by session for scheduling
# (kernel.sched_autogroup_enabled), each server then gets its own share of the CPUs under
# contention instead of competing thread by thread with the services: sharing per thread
# doubled the create -> terminal p50 at 500 orders/s (docs/performance.md, "How the kernel
# shares the two cores"). Keep it so.
#
# Environment (defaults): STACK_DIR, POSTGRES_PORT (5432), REDIS_PORT (6379), KAFKA_PORT (9092),
# KAFKA_CONTROLLER_PORT (9093), VENV_PYTHON (<repo>/.venv/bin/python), LOGS_FOLLOW (1).

# SC2016: the single-quoted `bash -c` scripts below expand their own positional parameters.
# shellcheck disable=SC2016
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=$(realpath -m "${STACK_DIR:-$REPO/.stack}")
HOST=127.0.0.1
POSTGRES_PORT=${POSTGRES_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
VENV_PYTHON=${VENV_PYTHON:-$REPO/.venv/bin/python}
LOGS_FOLLOW=${LOGS_FOLLOW:-1}

LOGS=$STACK_DIR/logs
RUN=$STACK_DIR/run
KAFKA_HOME=$STACK_DIR/kafka
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_PROPS=$KAFKA_HOME/server.properties
KAFKA_POM=$REPO/stack/kafka/pom.xml
PG_PASSWORD=postgres

# ---------------------------------------------------------------------------------------------
# Small helpers

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# fail_with_log LOGFILE MESSAGE: give up, showing the end of the log that tells why.
fail_with_log() {
  printf 'error: %s\n' "$2" >&2
  if [ -s "$1" ]; then
    printf -- '--- last 30 lines of %s ---\n' "$1" >&2
    tail -n 30 "$1" >&2
  fi
  exit 1
}

# Privileged commands (apt-get, files under /etc, runuser) need root: sudo when not root.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# port_open PORT: something accepts TCP connections on $HOST:PORT (bash's /dev/tcp, no nc).
port_open() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

# wait_until SECONDS COMMAND...: poll COMMAND once a second until it succeeds or time runs out.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 1
  done
}

# pid_alive PIDFILE PATTERN: print the pid in PIDFILE if that process is alive and its command
# line still contains PATTERN (a recycled pid of some other program does not count).
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(head -n 1 "$1" | tr -dc '0-9')
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

# stop_pid PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || return 0
  if ! wait_until "$2" bash -c '! kill -0 "$0" 2>/dev/null' "$1"; then
    warn "pid $1 still running after $2 s: sending SIGKILL"
    kill -KILL "$1" 2>/dev/null || true
    wait_until 10 bash -c '! kill -0 "$0" 2>/dev/null' "$1" || die "pid $1 survived SIGKILL"
  fi
}

# ---------------------------------------------------------------------------------------------
# Debian packages

APT_UPDATED=0
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_ADDED=0
cleanup() {
  if ((POLICY_ADDED)); then as_root rm -f "$POLICY_RC"; fi
}
trap cleanup EXIT

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* yourself"
  say "installing $* (Debian packages, log in $LOGS/apt.log)"
  # Debian's maintainer scripts start the services they install (a redis on 6379, a postgres
  # "main" cluster on 5432). policy-rc.d answering 101 ("action forbidden") stops that, for the
  # duration of the install only; an existing policy-rc.d of the machine is left as it is.
  if [ ! -e "$POLICY_RC" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 755 "$POLICY_RC"
    POLICY_ADDED=1
  fi
  if ((!APT_UPDATED)); then
    as_root apt-get -q -o DPkg::Lock::Timeout=300 update >>"$LOGS/apt.log" 2>&1 ||
      fail_with_log "$LOGS/apt.log" "apt-get update failed"
    APT_UPDATED=1
  fi
  # --force-confold: keep a conffile we wrote before the install (createcluster.conf).
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "$@" >>"$LOGS/apt.log" 2>&1 ||
    fail_with_log "$LOGS/apt.log" "apt-get install $* failed"
  if ((POLICY_ADDED)); then
    as_root rm -f "$POLICY_RC"
    POLICY_ADDED=0
  fi
}

# stop_debian_service NAME: stop what a package install may have started despite the above (a
# machine whose own policy-rc.d allows it). Only called right after we installed NAME, so
# nothing of the user's can be running under it: the ports were free before the install.
stop_debian_service() {
  if [ -x "/etc/init.d/$1" ]; then
    as_root "/etc/init.d/$1" stop >>"$LOGS/apt.log" 2>&1 || true
  fi
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

# The server binaries of the highest installed major version, or nothing. A client-only
# install has a bin/ too (psql), hence the check for postgres and initdb themselves.
pg_bin() {
  local dir
  for dir in $(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

# Postgres refuses to run as root: as root the cluster belongs to the `postgres` OS user; a
# non-root caller runs it as themselves (no sudo needed for that).
if [ "$(id -u)" -eq 0 ]; then PG_USER=postgres; else PG_USER=$(id -un); fi

# run_pg COMMAND...: run as the cluster's owner. `cd /` because postgres' tools call getcwd()
# and fail when started from a directory the postgres user cannot read (a repo under /root).
run_pg() {
  if [ "$(id -un)" = "$PG_USER" ]; then
    (cd / && "$@")
  else
    (cd / && runuser -u "$PG_USER" -- "$@")
  fi
}

# The data directory. Normally $STACK_DIR/postgres itself. But the postgres user must be able to
# traverse every parent directory, and a repo under /root (mode 700) or a private CI temp dir
# does not allow that. Then the data lives in /var/tmp/orders-payments-stack-<hash of
# $STACK_DIR>/postgres and $STACK_DIR/postgres is a symlink to it: the symlink is the record,
# so `down`/`status` find the same directory later. (We do not chmod the user's /root.)
pg_datadir() {
  local link=$STACK_DIR/postgres
  if [ -L "$link" ]; then readlink "$link"; else echo "$link"; fi
}

pg_prepare_datadir() {
  local link=$STACK_DIR/postgres alt
  if [ ! -e "$link" ] && [ ! -L "$link" ]; then
    if [ "$(id -un)" != "$PG_USER" ] && ! run_pg test -x "$STACK_DIR" 2>/dev/null; then
      alt=/var/tmp/orders-payments-stack-$(printf '%s' "$STACK_DIR" | sha1sum | cut -c1-12)
      # /var/tmp is world-writable: never adopt a directory someone else made there.
      if [ -e "$alt" ] && [ "$(stat -c %U "$alt")" != root ] && [ "$(stat -c %U "$alt")" != "$PG_USER" ]; then
        die "$alt exists and belongs to $(stat -c %U "$alt"): remove it or set STACK_DIR elsewhere"
      fi
      say "user $PG_USER cannot reach $STACK_DIR: postgres data goes to $alt/postgres (symlinked)"
      mkdir -p "$alt/postgres"
      chown "$PG_USER:" "$alt" "$alt/postgres"
      chmod 700 "$alt" "$alt/postgres"
      ln -s "$alt/postgres" "$link"
    else
      mkdir -p "$link"
    fi
  fi
  local data
  data=$(pg_datadir)
  mkdir -p "$data"
  if [ "$(id -un)" != "$PG_USER" ]; then chown "$PG_USER:" "$data"; fi
  chmod 700 "$data"
}

pg_pid() { pid_alive "$(pg_datadir)/postmaster.pid" "$(pg_datadir)"; }

pg_healthy() {
  local isready
  isready=$(pg_bin || true)/pg_isready
  [ -x "$isready" ] || isready=$(command -v pg_isready || true)
  if [ -n "$isready" ]; then
    "$isready" -q -h "$HOST" -p "$POSTGRES_PORT" -t 3
  else
    port_open "$POSTGRES_PORT"
  fi
}

# pg_sql SQL: run one statement in the `postgres` database over TCP, as the postgres role.
pg_sql() {
  PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 "$PSQL" -X -q -t -A -v ON_ERROR_STOP=1 \
    -h "$HOST" -p "$POSTGRES_PORT" -U postgres -d postgres -c "$1"
}

pg_start() {
  local bin data log=$LOGS/postgres.log
  if ! bin=$(pg_bin); then
    # Without this Debian's postgresql-common would create and start a "main" cluster on 5432.
    as_root mkdir -p /etc/postgresql-common
    if ! grep -qsE '^\s*create_main_cluster\s*=\s*false' /etc/postgresql-common/createcluster.conf; then
      printf 'create_main_cluster = false\n' | as_root tee -a /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    apt_install postgresql
    stop_debian_service postgresql
    bin=$(pg_bin) || die "postgresql installed but no server binaries under /usr/lib/postgresql/*/bin"
  fi
  if ! id -u "$PG_USER" >/dev/null 2>&1; then
    as_root useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
      --shell /bin/bash "$PG_USER"
  fi
  pg_prepare_datadir
  data=$(pg_datadir)

  if [ ! -s "$data/PG_VERSION" ]; then
    say "initialising a postgres cluster in $data"
    local pwfile locale=C
    if locale -a 2>/dev/null | grep -qiE '^C\.utf-?8$'; then locale=C.UTF-8; fi
    # initdb reads the superuser's password from a file the cluster owner can read.
    pwfile=$(mktemp /tmp/stack-pgpass.XXXXXX)
    printf '%s\n' "$PG_PASSWORD" >"$pwfile"
    if [ "$(id -un)" != "$PG_USER" ]; then chown "$PG_USER:" "$pwfile"; fi
    if ! run_pg "$bin/initdb" -D "$data" -U postgres --auth-host=scram-sha-256 \
      --auth-local=trust --pwfile="$pwfile" -E UTF8 --locale="$locale" >>"$log" 2>&1; then
      rm -f "$pwfile"
      fail_with_log "$log" "initdb failed"
    fi
    rm -f "$pwfile"
  fi

  # Our settings live in stack.conf, rewritten on every start (ports come from the environment),
  # included from postgresql.conf. The socket sits in the data directory unless that path is too
  # long for a unix socket (107 bytes); then the server is reachable over TCP only.
  local sockdir=$data
  if ((${#data} + 16 > 107)); then sockdir=''; fi
  cat >"$data/stack.conf" <<EOF
# Written by scripts/stack.sh on every start: change the script, not this file.
listen_addresses = '$HOST'
port = $POSTGRES_PORT
unix_socket_directories = '$sockdir'
max_connections = 300
shared_buffers = 256MB
fsync = on
# stderr goes to $log: stack.sh opens that file and the server inherits it, so the postgres
# user needs no write access to $LOGS.
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  if [ "$(id -un)" != "$PG_USER" ]; then chown "$PG_USER:" "$data/stack.conf"; fi
  if ! grep -q "^include_if_exists = 'stack.conf'" "$data/postgresql.conf"; then
    printf "\ninclude_if_exists = 'stack.conf'\n" >>"$data/postgresql.conf"
  fi

  say "starting postgres on $HOST:$POSTGRES_PORT"
  run_pg "$bin/pg_ctl" -D "$data" -w -t 60 start >>"$log" 2>&1 9>&- ||
    fail_with_log "$log" "postgres did not start"
}

pg_up() {
  local pid external=0
  PSQL=$(pg_bin || true)/psql
  if pid=$(pg_pid); then
    say "postgres already running (pid $pid)"
  elif port_open "$POSTGRES_PORT"; then
    say "using external postgres at $HOST:$POSTGRES_PORT"
    external=1
    rm -f "$RUN/postgres.pid"
    [ -x "$PSQL" ] || PSQL=$(command -v psql || true)
  else
    pg_start
    PSQL=$(pg_bin)/psql
    pid=$(pg_pid) || fail_with_log "$LOGS/postgres.log" "postgres started but its pid is gone"
  fi
  if [ -n "${pid:-}" ]; then echo "$pid" >"$RUN/postgres.pid"; fi
  wait_until 30 pg_healthy || fail_with_log "$LOGS/postgres.log" "postgres does not accept connections"

  if [ ! -x "${PSQL:-}" ]; then
    warn "no psql: not creating the orders and payments databases"
  else
    local db
    for db in orders payments; do
      if [ "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
        say "creating database $db"
        if ! pg_sql "CREATE DATABASE $db"; then
          # The user's own server may have other credentials; their URLs are their business.
          ((external)) || die "could not create database $db"
          warn "could not create database $db on the external postgres"
        fi
      fi
    done
  fi
  pg_migrate
}

pg_migrate() {
  if [ ! -f "$REPO/services/common/migrations.py" ] && [ ! -d "$REPO/services/common/migrations" ]; then
    warn "services.common.migrations does not exist yet: no migrations applied"
    return 0
  fi
  if [ ! -x "$VENV_PYTHON" ]; then
    warn "no $VENV_PYTHON (set VENV_PYTHON or run ./dev): no migrations applied"
    return 0
  fi
  say "applying migrations"
  (
    cd "$REPO"
    export ORDERS_DATABASE_URL=${ORDERS_DATABASE_URL:-postgresql://postgres:$PG_PASSWORD@$HOST:$POSTGRES_PORT/orders}
    export PAYMENTS_DATABASE_URL=${PAYMENTS_DATABASE_URL:-postgresql://postgres:$PG_PASSWORD@$HOST:$POSTGRES_PORT/payments}
    timeout 120 "$VENV_PYTHON" -m services.common.migrations
  ) || die "migrations failed"
}

pg_down() {
  local pid bin
  if pid=$(pg_pid); then
    say "stopping postgres (pid $pid)"
    bin=$(pg_bin) || die "postgres runs but its binaries are gone"
    if ! run_pg "$bin/pg_ctl" -D "$(pg_datadir)" -m fast -w -t 60 stop >>"$LOGS/postgres.log" 2>&1; then
      warn "fast shutdown failed: immediate shutdown"
      run_pg "$bin/pg_ctl" -D "$(pg_datadir)" -m immediate -w -t 30 stop >>"$LOGS/postgres.log" 2>&1 ||
        fail_with_log "$LOGS/postgres.log" "postgres would not stop"
    fi
  elif port_open "$POSTGRES_PORT"; then
    say "postgres at $HOST:$POSTGRES_PORT is not ours: left alone"
  fi
  rm -f "$RUN/postgres.pid"
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_pid() { pid_alive "$RUN/redis.pid" redis-server; }

redis_healthy() {
  if command -v redis-cli >/dev/null; then
    [ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else # RESP by hand
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "PING\r\n" >&3 && read -r l <&3 &&
      [ "${l:0:5}" = +PONG ]' "$HOST" "$REDIS_PORT" 2>/dev/null
  fi
}

redis_up() {
  local pid
  if pid=$(redis_pid); then
    say "redis already running (pid $pid)"
  elif port_open "$REDIS_PORT"; then
    say "using external redis at $HOST:$REDIS_PORT"
    rm -f "$RUN/redis.pid"
    return 0
  else
    if ! command -v redis-server >/dev/null; then
      apt_install redis-server
      stop_debian_service redis-server
    fi
    say "starting redis on $HOST:$REDIS_PORT"
    mkdir -p "$STACK_DIR/redis"
    rm -f "$RUN/redis.pid"
    # A broker for Dramatiq wake-up calls only (Postgres holds the truth): no persistence.
    # Errors before redis opens its --logfile (a bad option) land in the same log via stdout.
    # shellcheck disable=SC2094
    redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
      --pidfile "$RUN/redis.pid" --logfile "$LOGS/redis.log" --dir "$STACK_DIR/redis" \
      --save '' --appendonly no </dev/null >>"$LOGS/redis.log" 2>&1 9>&- ||
      fail_with_log "$LOGS/redis.log" "redis did not start"
  fi
  wait_until 30 redis_healthy || fail_with_log "$LOGS/redis.log" "redis does not answer PING"
  redis_pid >/dev/null || fail_with_log "$LOGS/redis.log" "redis answers but wrote no pid file"
}

redis_down() {
  local pid
  if pid=$(redis_pid); then
    say "stopping redis (pid $pid)"
    stop_pid "$pid" 15
  elif port_open "$REDIS_PORT"; then
    say "redis at $HOST:$REDIS_PORT is not ours: left alone"
  fi
  rm -f "$RUN/redis.pid"
}

# ---------------------------------------------------------------------------------------------
# Kafka

kafka_pid() { pid_alive "$RUN/kafka.pid" "$KAFKA_PROPS"; }

# Healthy = the broker answers a metadata request (a listening socket alone is not enough: the
# port opens before the broker has caught up with the controller's metadata).
kafka_healthy() {
  port_open "$KAFKA_PORT" || return 1
  if [ -x "$VENV_PYTHON" ] && "$VENV_PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    timeout 20 "$VENV_PYTHON" - "$HOST:$KAFKA_PORT" >/dev/null 2>&1 <<'EOF'
import sys
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0})
sys.exit(0 if admin.list_topics(timeout=5).brokers else 1)
EOF
  fi
}

# kafka_java CLASS ARGS...: a Kafka main class on our classpath and logging configuration.
kafka_java() {
  java -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

# The jars, fetched once; refetched only when stack/kafka/pom.xml changes (~/.m2 caches them).
kafka_fetch_libs() {
  local stamp
  stamp=.fetched-$(sha1sum "$KAFKA_POM" | cut -c1-12)
  [ -f "$KAFKA_LIBS/$stamp" ] && return 0
  say "fetching kafka jars from Maven Central (cached after the first run)"
  rm -rf "$KAFKA_LIBS.tmp"
  mvn -q -B -f "$KAFKA_POM" dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS.tmp" \
    >>"$LOGS/mvn.log" 2>&1 || fail_with_log "$LOGS/mvn.log" "could not fetch kafka's jars"
  rm -rf "$KAFKA_LIBS"
  mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
  touch "$KAFKA_LIBS/$stamp"
}

kafka_write_config() {
  cat >"$KAFKA_PROPS" <<EOF
# Written by scripts/stack.sh on every start: change the script, not this file.
# One node that is both broker and KRaft controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_HOME/data
num.partitions=6
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# The services create their topics (with their partition counts) at start-up.
auto.create.topics.enable=false
EOF
  # Kafka 4 logs through slf4j 1.7 -> log4j-slf4j-impl -> log4j2 (see stack/kafka/pom.xml).
  cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
# Written by scripts/stack.sh. Everything to stdout, which stack.sh appends to logs/kafka.log.
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

kafka_start() {
  local log=$LOGS/kafka.log pid uuid
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    apt_install openjdk-17-jre-headless maven
  fi
  mkdir -p "$KAFKA_HOME/data"
  kafka_fetch_libs
  kafka_write_config

  if [ ! -f "$KAFKA_HOME/data/meta.properties" ]; then
    say "formatting kafka storage (once)"
    # random-uuid prints the id on its last line (anything before it is logging).
    uuid=$(kafka_java -Xmx256m kafka.tools.StorageTool random-uuid 2>>"$log" | tail -n 1 || true)
    [[ $uuid =~ ^[A-Za-z0-9_-]{22}$ ]] || fail_with_log "$log" "no cluster id from StorageTool: '$uuid'"
    # No --standalone: the voter set is already fixed by controller.quorum.voters.
    kafka_java -Xmx256m kafka.tools.StorageTool format -t "$uuid" -c "$KAFKA_PROPS" >>"$log" 2>&1 ||
      fail_with_log "$log" "kafka storage format failed"
  fi

  say "starting kafka on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
  rm -f "$RUN/kafka.pid"
  # setsid: its own session, so it outlives this shell and a closed terminal. The inner bash
  # writes its own pid and then *becomes* java (exec), so the pid file names the JVM itself.
  # All of its output goes to the log: a caller reading our stdout (a pipe) must not wait on it.
  # The parallel collector rather than G1: on two cores G1's concurrent threads and barriers
  # competed with everything else (three alternated pairs at 500/s: create -> terminal p50
  # 72-94 ms with G1, 57-75 ms with this). Its young pauses (-Xlog:gc) took 12-27 ms, one
  # every 12-18 s at 200-500 orders/s.
  setsid bash -c 'echo $$ >"$0" && exec "$@"' "$RUN/kafka.pid" \
    java -Xms512m -Xmx512m -XX:+UseParallelGC -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" </dev/null >>"$log" 2>&1 9>&- &
  wait_until 10 test -s "$RUN/kafka.pid" || fail_with_log "$log" "kafka wrote no pid file"
  pid=$(head -n 1 "$RUN/kafka.pid")

  local deadline=$((SECONDS + 90))
  until kafka_healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$RUN/kafka.pid"
      fail_with_log "$log" "kafka exited during start-up"
    fi
    ((SECONDS < deadline)) ||
      fail_with_log "$log" "kafka did not answer within 90 s (it is still running: scripts/stack.sh down)"
    sleep 1
  done
}

kafka_up() {
  local pid
  if pid=$(kafka_pid); then
    say "kafka already running (pid $pid)"
    wait_until 60 kafka_healthy || fail_with_log "$LOGS/kafka.log" "kafka (pid $pid) does not answer"
  elif port_open "$KAFKA_PORT"; then
    say "using external kafka at $HOST:$KAFKA_PORT"
    rm -f "$RUN/kafka.pid"
  else
    kafka_start
  fi
}

kafka_down() {
  local pid
  if pid=$(kafka_pid); then
    say "stopping kafka (pid $pid)"
    stop_pid "$pid" 30
  elif port_open "$KAFKA_PORT"; then
    say "kafka at $HOST:$KAFKA_PORT is not ours: left alone"
  fi
  rm -f "$RUN/kafka.pid"
}

# ---------------------------------------------------------------------------------------------
# Subcommands

# One `up`/`down` at a time (two test sessions starting the stack at once, say). The servers
# are started with `9>&-`: a daemon inheriting fd 9 would hold the lock for ever.
take_lock() {
  mkdir -p "$LOGS" "$RUN" "$KAFKA_HOME"
  exec 9>"$RUN/stack.lock"
  flock -w 300 9 || die "another scripts/stack.sh up/down holds $RUN/stack.lock"
}

cmd_up() {
  take_lock
  pg_up
  redis_up
  kafka_up
  say "stack is up: postgres $HOST:$POSTGRES_PORT, redis $HOST:$REDIS_PORT, kafka $HOST:$KAFKA_PORT"
}

cmd_down() {
  take_lock
  kafka_down # first: it is the slowest to stop and nothing else depends on it
  redis_down
  pg_down
  say "stack is down"
}

# status_line NAME PORT PID HEALTHY(0|1)
status_line() {
  local state=down owner=''
  if (($4)); then state=healthy; elif [ -n "$3" ]; then state=starting; fi
  if [ -n "$3" ]; then owner="pid $3 (ours)"; elif (($4)); then owner='(external)'; fi
  printf '%-9s %-9s %-16s %s\n' "$1" "$state" "$HOST:$2" "$owner"
}

cmd_status() {
  local bad=0 name short port pid ok
  for name in postgres redis kafka; do
    case $name in
    postgres) short=pg port=$POSTGRES_PORT ;;
    redis) short=redis port=$REDIS_PORT ;;
    kafka) short=kafka port=$KAFKA_PORT ;;
    esac
    pid=$("${short}_pid" || true)
    if "${short}_healthy"; then ok=1; else ok=0 bad=1; fi
    status_line "$name" "$port" "$pid" "$ok"
  done
  return "$bad"
}

cmd_logs() {
  local files=() name
  case "${1:-all}" in
  postgres | redis | kafka) files=("$LOGS/$1.log") ;;
  all) for name in postgres redis kafka; do files+=("$LOGS/$name.log"); done ;;
  *) die "usage: $0 logs [postgres|redis|kafka]" ;;
  esac
  if [ "$LOGS_FOLLOW" = 0 ]; then
    local existing=()
    for name in "${files[@]}"; do [ -f "$name" ] && existing+=("$name"); done
    ((${#existing[@]})) || die "no logs yet in $LOGS"
    tail -n 100 "${existing[@]}"
  else
    exec tail -n 100 -F "${files[@]}"
  fi
}

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed -e '/^$/d' -e 's/^# \{0,1\}//'
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
logs) cmd_logs "${2:-all}" ;;
-h | --help | help) usage ;;
*)
  usage >&2
  exit 2
  ;;
esac
