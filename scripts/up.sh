#!/usr/bin/env bash
# One command from a fresh machine to a running suite: installs what the
# project needs (Debian packages, Kafka jars, npm peers), builds, starts
# PostgreSQL, Redis, Kafka and the SCIM peer where they are not running,
# creates the topics, starts the five services and prints where they listen
# and a request to try. Idempotent: run it again any time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
say() { printf '[qm] %s\n' "$*"; }

bash "$ROOT/deploy/local/install-deps.sh"
say "building into $BUILD"
mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD/configure.log" 2>&1 ||
    { tail -n 30 "$BUILD/configure.log"; say "cmake configure failed (log above)"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" --target qm-intake qm-approval qm-provisioning \
    qm-fulfillment qm-audit qm-admin qm-loadgen >"$BUILD/build.log" 2>&1 ||
    { grep -E 'error|Error' "$BUILD/build.log" | head -n 30; say "build failed (full log: $BUILD/build.log)"; exit 1; }
bash "$ROOT/deploy/local/stack.sh" up
"$BUILD/tools/qm-admin" create-topics --brokers "127.0.0.1:${QM_KAFKA_PORT:-9092}"
QM_BUILD_DIR="$BUILD" bash "$ROOT/deploy/local/services.sh" start
bash "$ROOT/deploy/local/stack.sh" status
QM_BUILD_DIR="$BUILD" bash "$ROOT/deploy/local/services.sh" status

TOKEN="$("$BUILD/tools/qm-admin" token --sub p-0100 --roles employee)"
cat <<TXT

[qm] Quartermaster is running. APIs: intake :8081, approval :8082, provisioning :8083,
[qm] fulfillment :8084, audit :8085 (each also serves /livez, /readyz, /metrics).
[qm] Logs: $ROOT/.run/logs/   Stop: bash deploy/local/services.sh stop && bash deploy/local/stack.sh down

Try a request (a token for person p-0100; mint others with: $BUILD/tools/qm-admin token --sub p-0042 --roles employee,manager):

  TOKEN=$TOKEN
  curl -s -X POST http://127.0.0.1:8081/v1/requests -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' \\
       -d '{"reason":"design reviews","lines":[{"item_id":"figma","role_id":"viewer"}]}'
  curl -s http://127.0.0.1:8081/v1/requests/<id from above> -H "Authorization: Bearer \$TOKEN"

TXT
