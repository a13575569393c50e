#!/usr/bin/env bash
# Starts, stops and shows the five Quartermaster services on the local stack,
# each with its log under $QM_RUN_DIR/logs/<service>.log.
#   services.sh start [name...]   start (all by default), wait until /readyz answers 200
#   services.sh stop [name...]    SIGTERM (graceful), SIGKILL after QM_SHUTDOWN_TIMEOUT + 5 s
#   services.sh restart [name...]
#   services.sh status            one line per service: port, pid, readiness
# Binaries come from ${QM_BUILD_DIR:-<repo>/build}/services. Configuration:
# deploy/local/local.env (sourced; any variable already in the environment wins).
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QM_BUILD_DIR="${QM_BUILD_DIR:-$QM_ROOT/build}"
ALL=(intake approval provisioning fulfillment audit)
declare -A PORT=([intake]=8081 [approval]=8082 [provisioning]=8083 [fulfillment]=8084 [audit]=8085)

load_env() {
    local line name
    while IFS= read -r line; do
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        name="${line%%=*}"
        [[ -n "${!name+x}" ]] && continue          # the caller's environment wins
        export "${name}=$(eval "printf '%s' \"${line#*=}\"")"
    done <"$QM_LOCAL_DIR/local.env"
}

port_of() {
    local var="QM_${1^^}_PORT"
    printf '%s' "${!var:-${PORT[$1]}}"
}

ready() { curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$(port_of "$1")/readyz"; }

start_one() {
    local svc="$1" bin="$QM_BUILD_DIR/services/qm-$1" pidfile="$QM_PID_DIR/$1.pid" pid i
    [[ -x "$bin" ]] || qm_die "$svc: $bin not built (run scripts/up.sh or cmake --build build)"
    if pid="$(qm_pid_alive "$pidfile" "qm-$svc")"; then
        qm_log "$svc: already running (pid $pid, port $(port_of "$svc"))"
        return 0
    fi
    qm_log "$svc: starting on port $(port_of "$svc") (log $QM_LOG_DIR/$svc.log)"
    QM_HTTP_PORT="$(port_of "$svc")" setsid "$bin" >>"$QM_LOG_DIR/$svc.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for ((i = 0; i < 300; i++)); do
        if ready "$svc"; then qm_log "$svc: ready"; return 0; fi
        if ! kill -0 "$(<"$pidfile")" 2>/dev/null; then
            tail -n 20 "$QM_LOG_DIR/$svc.log" >&2
            qm_die "$svc: exited during start-up (log above: $QM_LOG_DIR/$svc.log)"
        fi
        sleep 0.1
    done
    tail -n 20 "$QM_LOG_DIR/$svc.log" >&2
    qm_die "$svc: not ready after 30 s (log above)"
}

# Seconds in QM_SHUTDOWN_TIMEOUT ("20s", "2m", "1500ms" or bare ms), rounded up.
shutdown_seconds() {
    local v="${QM_SHUTDOWN_TIMEOUT:-20s}"
    case "$v" in
    *ms) echo $(( (${v%ms} + 999) / 1000 )) ;;
    *s) echo "${v%s}" ;;
    *m) echo $(( ${v%m} * 60 )) ;;
    *h) echo $(( ${v%h} * 3600 )) ;;
    *d) echo $(( ${v%d} * 86400 )) ;;
    *) echo $(( (v + 999) / 1000 )) ;;
    esac
}

stop_one() {
    # The service bounds its own shutdown; SIGKILL only if it overruns by 5 s.
    qm_stop_pid "$1" "$QM_PID_DIR/$1.pid" "qm-$1" $(( $(shutdown_seconds) + 5 ))
}

status() {
    local svc pid state
    for svc in "${ALL[@]}"; do
        if pid="$(qm_pid_alive "$QM_PID_DIR/$svc.pid" "qm-$svc")"; then
            if ready "$svc"; then state="ready"; else state="running, NOT ready (see /readyz)"; fi
            printf '[qm] %-13s %-6s pid %-7s http://127.0.0.1:%s  %s\n' "$svc" up "$pid" "$(port_of "$svc")" "$state"
        else
            printf '[qm] %-13s %-6s log %s\n' "$svc" down "$QM_LOG_DIR/$svc.log"
        fi
    done
}

main() {
    local cmd="${1:-status}"
    shift || true
    local names=("$@")
    [[ ${#names[@]} -gt 0 ]] || names=("${ALL[@]}")
    for n in "${names[@]}"; do [[ -n "${PORT[$n]+x}" ]] || qm_die "unknown service '$n' (one of: ${ALL[*]})"; done
    qm_dirs
    load_env
    case "$cmd" in
    start) for n in "${names[@]}"; do start_one "$n"; done ;;
    stop) for n in "${names[@]}"; do stop_one "$n"; done ;;
    restart) for n in "${names[@]}"; do stop_one "$n"; start_one "$n"; done ;;
    status) status ;;
    *) qm_die "usage: services.sh start|stop|restart|status [service...]" ;;
    esac
}
main "$@"
