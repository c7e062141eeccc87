#!/usr/bin/env bash
# Makes sure the shared Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) the tests
# use are up: starts them when installed but stopped. Missing ones fail under CI=true
# (a green CI must have exercised the real stores); elsewhere their tests skip.
set -u

REDIS_PORT=6379
PG_PORT=5432
missing=()

wait_for() {  # wait_for <seconds> <command...>
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS >= deadline )) && return 1
    sleep 0.5
  done
}

redis_up() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping | grep -q PONG; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

if ! redis_up 2>/dev/null; then
  if command -v redis-server >/dev/null; then
    echo "ensure_backends: starting Redis on 127.0.0.1:$REDIS_PORT"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for 15 redis_up || missing+=("Redis (started but not answering)")
  else
    missing+=("Redis (redis-server is not installed)")
  fi
fi

if ! pg_up 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "ensure_backends: starting PostgreSQL on 127.0.0.1:$PG_PORT"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    wait_for 30 pg_up || missing+=("PostgreSQL (started but not answering)")
  else
    missing+=("PostgreSQL (no cluster is installed)")
  fi
fi

if (( ${#missing[@]} )); then
  for what in "${missing[@]}"; do echo "ensure_backends: missing: $what" >&2; done
  if [[ "${CI:-}" == "true" || "${CI:-}" == "1" ]]; then
    echo "ensure_backends: CI needs the real Redis and PostgreSQL; failing" >&2
    exit 1
  fi
  echo "ensure_backends: their tests will be skipped (they fail under CI=true)" >&2
fi
exit 0
