#!/usr/bin/env bash
# PostgreSQL and Redis from Debian, on this machine's standard ports.
#   pg-redis.sh start    start whichever does not answer; create the database
#   pg-redis.sh status   up/down (exit 0 when both up, 3 otherwise)
# They are the machine's services: nothing here stops them.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

PG_HOST=127.0.0.1
PG_PORT="${QM_PG_PORT:-5432}"
PG_DB="${QM_PG_DB:-quartermaster}"
PG_CLUSTER="${QM_PG_CLUSTER:-main}"
PG_VERSION_WANTED=15
REDIS_HOST=127.0.0.1
REDIS_PORT="${QM_REDIS_PORT:-6379}"
WAIT="${QM_START_TIMEOUT:-30}"

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2 2>/dev/null; }
redis_up() { [[ "$(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]; }

need_root() {
    qm_is_root && return 0
    qm_log "not root: run as root:  $*"
    exit 1
}

wait_for() {
    local what="$1" check="$2" i
    for ((i = 0; i < WAIT * 5; i++)); do
        if "$check"; then return 0; fi
        sleep 0.2
    done
    qm_die "$what did not answer within ${WAIT}s"
}

# ------------------------------------------------------------------ PostgreSQL
pg_newest_cluster_version() {
    local v
    # shellcheck disable=SC2012  # version directories: plain names
    for v in $(ls /etc/postgresql 2>/dev/null | sort -rV); do
        [[ -f "/etc/postgresql/$v/$PG_CLUSTER/postgresql.conf" ]] && { echo "$v"; return 0; }
    done
    return 1
}

pg_start() {
    local ver hba
    if pg_up; then
        qm_log "postgres: up on $PG_HOST:$PG_PORT"
    else
        if ! command -v pg_ctlcluster >/dev/null || ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
            need_root "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-$PG_VERSION_WANTED"
            qm_log "postgres: not installed; apt-get install postgresql-$PG_VERSION_WANTED"
            apt-get update -q >/dev/null
            apt-get install -y -q --no-install-recommends "postgresql-$PG_VERSION_WANTED" postgresql-client >/dev/null
        fi
        need_root "pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) $PG_CLUSTER start"
        if ver="$(pg_newest_cluster_version)"; then
            qm_log "postgres: starting cluster $ver/$PG_CLUSTER"
            pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" start ||
                pg_ctlcluster "$ver" "$PG_CLUSTER" start
        else
            # shellcheck disable=SC2012
            ver="$(ls /usr/lib/postgresql | sort -rV | head -n1)"
            qm_log "postgres: no cluster; creating $ver/$PG_CLUSTER on port $PG_PORT (trust for 127.0.0.1)"
            pg_createcluster "$ver" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
            hba="/etc/postgresql/$ver/$PG_CLUSTER/pg_hba.conf"
            sed -i '1i # Added by quartermaster deploy/local/pg-redis.sh: local development only\nhost    all    all    127.0.0.1/32    trust' "$hba"
            pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" start
        fi
        wait_for "postgres on $PG_HOST:$PG_PORT" pg_up
        qm_log "postgres: up on $PG_HOST:$PG_PORT"
    fi
    pg_create_db
}

# psql as the postgres user: over TCP (trust), or via the socket as the OS user postgres.
pg_psql() {
    if psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -c 'select 1' >/dev/null 2>&1; then
        psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -v ON_ERROR_STOP=1 "$@"
    elif qm_is_root && id postgres >/dev/null 2>&1; then
        (cd / && runuser -u postgres -- psql -X -q -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 "$@")
    else
        qm_die "postgres: cannot connect as user postgres (no trust auth for 127.0.0.1 and not root)"
    fi
}

pg_create_db() {
    if [[ "$(pg_psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" == "1" ]]; then
        qm_log "postgres: database $PG_DB exists"
    else
        pg_psql -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
        qm_log "postgres: created database $PG_DB"
    fi
}

# ------------------------------------------------------------------ Redis
redis_start() {
    local dir=/var/lib/redis logfile=/var/log/redis/ci.log
    if redis_up; then
        qm_log "redis: up on $REDIS_HOST:$REDIS_PORT"
        return 0
    fi
    if ! command -v redis-server >/dev/null; then
        need_root "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server"
        qm_log "redis: not installed; apt-get install redis-server"
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends redis-server redis-tools >/dev/null
        redis_up && { qm_log "redis: up on $REDIS_HOST:$REDIS_PORT (started by the package)"; return 0; }
    fi
    if ! qm_is_root; then
        # Not root: no /var/lib/redis; keep its files in the run dir instead.
        dir="$QM_RUN_DIR/redis"
        logfile="$QM_LOG_DIR/redis.log"
        qm_dirs
    fi
    mkdir -p "$dir" "$(dirname "$logfile")"
    qm_log "redis: starting on $REDIS_HOST:$REDIS_PORT (no persistence)"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
        --appendonly no --dir "$dir" --logfile "$logfile"
    wait_for "redis on $REDIS_HOST:$REDIS_PORT" redis_up
    qm_log "redis: up on $REDIS_HOST:$REDIS_PORT"
}

status() {
    local rc=0
    if pg_up; then qm_log "postgres  up    $PG_HOST:$PG_PORT (database $PG_DB)"
    else qm_log "postgres  down  $PG_HOST:$PG_PORT"; rc=3; fi
    if redis_up; then qm_log "redis     up    $REDIS_HOST:$REDIS_PORT"
    else qm_log "redis     down  $REDIS_HOST:$REDIS_PORT"; rc=3; fi
    return "$rc"
}

case "${1:-}" in
    start) pg_start; redis_start ;;
    status) status ;;
    *) echo "usage: $0 {start|status}" >&2; exit 2 ;;
esac
