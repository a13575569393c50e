#!/usr/bin/env bash
# The end-to-end benchmark at a few load levels, against the suite running
# locally on its default ports (started by scripts/up.sh). Each level is one
# qm-loadgen run (see bench/README.md); a table of the RESULT lines closes.
#
#   bash bench/run.sh                         # the default levels below
#   bash bench/run.sh "-n 1000 --rate 200"    # your own levels, one per argument
#
# The local directory has 300 people and intake refuses a role its subject
# already holds or has on its way, so every level runs with --extend (a
# request for a held role extends its grant; QM_BENCH_EXTEND=0 drops it) and
# submits at most 1,800 requests, one per person and role.
#
# Environment: QM_BUILD_DIR (build tree holding bench/qm-loadgen; default
# ./build), QM_INTAKE_URL, QM_KAFKA_BROKERS, QM_TOPIC_PREFIX,
# QM_AUTH_HS256_SECRET (passed on to qm-loadgen), QM_BENCH_PAUSE (seconds
# between levels so the services' other consumers catch up; default 5),
# QM_BENCH_EXTEND (default 1).
# Exit status: 0 when every level granted every request, 1 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
INTAKE="${QM_INTAKE_URL:-http://127.0.0.1:8081}"
PAUSE="${QM_BENCH_PAUSE:-5}"
EXTEND="${QM_BENCH_EXTEND:-1}"
LOADGEN="$BUILD/bench/qm-loadgen"

if ! curl -fsS -m 3 "${INTAKE%/}/readyz" >/dev/null 2>&1; then
  cat >&2 <<TXT
bench: intake at $INTAKE does not answer /readyz, so the suite is not running.
Start it (builds, starts PostgreSQL, Redis, Kafka, the SCIM peer and the five
services on their default ports), then run this again:

  bash scripts/up.sh
  bash bench/run.sh
TXT
  exit 1
fi

if [[ ! -x "$LOADGEN" || -n "$(find "$ROOT/bench/loadgen" -newer "$LOADGEN" -print -quit)" ]]; then
  echo "bench: building qm-loadgen in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" >/dev/null
  cmake --build "$BUILD" --target qm-loadgen >/dev/null
fi

if [[ $# -gt 0 ]]; then
  LEVELS=("$@")
else
  LEVELS=(
    # light load: latency should be tens of milliseconds
    "-n 300 --rate 50"
    # sustained moderate load; the longer timeout lets a suite that falls
    # behind finish, so the report shows its latency rather than "missing"
    "-n 1800 --rate 500 --timeout 300"
    # as fast as 32 requests in flight allow: the throughput
    "-n 1800 --rate 0 --timeout 300"
  )
fi
extend=""
[[ "$EXTEND" != 0 ]] && extend="--extend"

status=0
results=()
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
for i in "${!LEVELS[@]}"; do
  level="${LEVELS[$i]}"
  if [[ $i -gt 0 && "$PAUSE" != 0 ]]; then sleep "$PAUSE"; fi
  echo
  echo "=== qm-loadgen $level"
  # shellcheck disable=SC2086 # a level is a list of options
  "$LOADGEN" --intake "$INTAKE" $extend $level | tee "$report" || status=1
  result="$(sed -n 's/^RESULT //p' "$report")"
  results+=("$(printf '%-34s %s' "$level" "${result:-(no result: see above)}")")
done

echo
echo "=== summary (p*_ms: submit -> AccessGranted received; ap*_ms: submit -> RequestApproved"
echo "    received; nearest-rank percentiles)"
for r in "${results[@]}"; do echo "$r"; done
exit "$status"
