#!/usr/bin/env bash
# The whole local stack. Dependencies are assumed installed (deploy/local/install-deps.sh).
#   stack.sh up       PostgreSQL + Redis (start if needed), Kafka (fetch + start), SCIM peer
#   stack.sh down     stop Kafka and the SCIM peer (PostgreSQL and Redis are the machine's: left running)
#   stack.sh status   one line per component (exit 0 when all are up, 3 otherwise)
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
D="$QM_LOCAL_DIR"

case "${1:-}" in
    up)
        qm_log "stack up (run dir $QM_RUN_DIR)"
        "$D/pg-redis.sh" start
        "$D/kafka.sh" fetch
        "$D/kafka.sh" start
        "$D/scim.sh" start
        "$D/stack.sh" status
        ;;
    down)
        "$D/scim.sh" stop
        "$D/kafka.sh" stop
        qm_log "stack down (postgres and redis left running)"
        ;;
    status)
        rc=0
        "$D/pg-redis.sh" status || rc=3
        "$D/kafka.sh" status || rc=3
        "$D/scim.sh" status || rc=3
        exit "$rc"
        ;;
    *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
