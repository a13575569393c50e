# shellcheck shell=bash
# Shared helpers for deploy/local/*.sh. Source it; do not run it.
#   QM_ROOT       repository root (resolved from this file's location)
#   QM_RUN_DIR    logs, pid files, kafka data   (default <repo>/.run)
#   QM_CACHE_DIR  downloaded jars               (default ~/.cache/quartermaster)

QM_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QM_ROOT="$(cd "$QM_LOCAL_DIR/../.." && pwd)"
QM_RUN_DIR="${QM_RUN_DIR:-$QM_ROOT/.run}"
QM_CACHE_DIR="${QM_CACHE_DIR:-${HOME:-/root}/.cache/quartermaster}"
QM_LOG_DIR="$QM_RUN_DIR/logs"
QM_PID_DIR="$QM_RUN_DIR/pids"
export DEBIAN_FRONTEND=noninteractive

qm_log() { printf '[qm] %s\n' "$*"; }
qm_die() { printf '[qm] ERROR: %s\n' "$*" >&2; exit 1; }
qm_is_root() { [[ "$(id -u)" -eq 0 ]]; }

qm_dirs() { mkdir -p "$QM_LOG_DIR" "$QM_PID_DIR"; }

# qm_port_open HOST PORT: true when something accepts TCP connections there.
qm_port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# qm_pid_alive PIDFILE PATTERN: prints the pid when the pid file names a live
# process whose command line contains PATTERN (guards against recycled pids).
qm_pid_alive() {
    local pidfile="$1" pattern="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" || return 1
    printf '%s\n' "$pid"
}

# qm_stop_pid NAME PIDFILE PATTERN [GRACE_SECONDS]: SIGTERM, wait, then SIGKILL.
qm_stop_pid() {
    local name="$1" pidfile="$2" pattern="$3" grace="${4:-30}" pid i
    if ! pid="$(qm_pid_alive "$pidfile" "$pattern")"; then
        qm_log "$name: not running (no live pid in $pidfile)"
        rm -f "$pidfile"
        return 0
    fi
    qm_log "$name: stopping pid $pid (SIGTERM, up to ${grace}s)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        qm_log "$name: still alive after ${grace}s, SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
    qm_log "$name: stopped"
}

# qm_scim_npm: install the SCIM peer's npm packages when node_modules is missing
# or package.json / package-lock.json changed since the last install (stamp file).
qm_scim_npm() {
    local dir="$QM_LOCAL_DIR/scim" stamp want
    command -v npm >/dev/null || qm_die "npm not found: run deploy/local/install-deps.sh"
    stamp="$dir/node_modules/.qm-stamp"
    want="$(cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    if [[ -d "$dir/node_modules" && -f "$stamp" && "$(<"$stamp")" == "$want" ]]; then
        qm_log "scim peer: npm packages up to date"
        return 0
    fi
    if [[ -f "$dir/package-lock.json" ]]; then
        qm_log "scim peer: npm ci in deploy/local/scim"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error 2>&1) | sed '/^$/d; s/^/[qm]   npm: /'
    else
        qm_log "scim peer: npm install in deploy/local/scim (no lockfile)"
        (cd "$dir" && npm install --no-audit --no-fund --loglevel=error 2>&1) | sed '/^$/d; s/^/[qm]   npm: /'
        want="$(cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    fi
    printf '%s\n' "$want" >"$stamp"
}
