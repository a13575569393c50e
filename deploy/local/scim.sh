#!/usr/bin/env bash
# The in-memory SCIM 2.0 peer (deploy/local/scim/server.js), seeded at start.
#   scim.sh start    start in the background, wait until /healthz answers
#   scim.sh stop     SIGTERM, wait, then SIGKILL (all SCIM data is lost: it lives in memory)
#   scim.sh status   up/down (exit 0 when up, 3 when down)
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

SCIM_HOST=127.0.0.1
SCIM_PORT="${QM_SCIM_PORT:-8090}"
SCIM_SEED="${QM_SCIM_SEED:-$QM_LOCAL_DIR/seed/scim-seed.json}"
START_TIMEOUT="${QM_SCIM_START_TIMEOUT:-20}"
SCIM_DIR="$QM_LOCAL_DIR/scim"
PIDFILE="$QM_PID_DIR/scim.pid"
LOG="$QM_LOG_DIR/scim.log"
PATTERN="$SCIM_DIR/server.js"

healthy() { curl -fsS --max-time 2 -o /dev/null "http://$SCIM_HOST:$SCIM_PORT/healthz" 2>/dev/null; }

cmd_start() {
    local pid i
    qm_dirs
    if pid="$(qm_pid_alive "$PIDFILE" "$PATTERN")" && healthy; then
        qm_log "scim: already running on http://$SCIM_HOST:$SCIM_PORT/scim/v2 (pid $pid)"
        return 0
    fi
    if [[ -z "${pid:-}" ]] && qm_port_open "$SCIM_HOST" "$SCIM_PORT"; then
        if healthy; then
            qm_log "scim: a server not started by this script already answers on $SCIM_HOST:$SCIM_PORT; leaving it alone"
            return 0
        fi
        qm_die "scim: port $SCIM_PORT is taken by something else"
    fi
    if [[ -z "${pid:-}" ]]; then
        command -v node >/dev/null || qm_die "node not found: run deploy/local/install-deps.sh"
        [[ -f "$SCIM_SEED" ]] || qm_die "scim: seed file $SCIM_SEED not found"
        qm_scim_npm
        qm_log "scim: starting on http://$SCIM_HOST:$SCIM_PORT/scim/v2, seed $SCIM_SEED, log $LOG"
        (cd "$SCIM_DIR" && QM_SCIM_HOST="$SCIM_HOST" QM_SCIM_PORT="$SCIM_PORT" QM_SCIM_SEED="$SCIM_SEED" \
            exec setsid nohup node "$SCIM_DIR/server.js" >>"$LOG" 2>&1 </dev/null) &
        pid=$!
        printf '%s\n' "$pid" >"$PIDFILE"
    fi
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            qm_log "scim: process $pid exited during start-up; last log lines:"
            tail -n 20 "$LOG" | sed 's/^/[qm]   /' >&2
            rm -f "$PIDFILE"
            exit 1
        fi
        if healthy; then
            qm_log "scim: ready (pid $pid; token \$QM_SCIM_TOKEN, default dev-scim-token)"
            return 0
        fi
        sleep 0.1
    done
    qm_log "scim: no answer on /healthz after ${START_TIMEOUT}s; last log lines:"
    tail -n 20 "$LOG" | sed 's/^/[qm]   /' >&2
    exit 1
}

cmd_stop() {
    qm_dirs
    qm_stop_pid scim "$PIDFILE" "$PATTERN" 10
}

cmd_status() {
    local pid
    if healthy; then
        if pid="$(qm_pid_alive "$PIDFILE" "$PATTERN")"; then
            qm_log "scim      up    $SCIM_HOST:$SCIM_PORT/scim/v2 (pid $pid)"
        else
            qm_log "scim      up    $SCIM_HOST:$SCIM_PORT/scim/v2 (not started by this script)"
        fi
        return 0
    fi
    qm_log "scim      down  $SCIM_HOST:$SCIM_PORT/scim/v2"
    return 3
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
