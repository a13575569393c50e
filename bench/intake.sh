#!/usr/bin/env bash
# Intake alone: how many POST /v1/requests a second intake answers, and how
# fast, without waiting for approvals or grants. Runs `qm-loadgen
# --submit-only` at rising fixed rates (about QM_INTAKE_SECONDS each) and
# then unlimited, then, as a second opinion from another client, wrk with
# bench/intake.lua; a table closes. See bench/README.md.
#
#   bash bench/intake.sh
#   QM_INTAKE_RATES="200 400" QM_INTAKE_SECONDS=5 bash bench/intake.sh
#
# Every request submitted is a real one: approval, provisioning (and its
# SCIM peer), fulfillment and audit work through all of them afterwards, on
# the same machine. So between levels the script waits until the suite is
# quiet again (no service's consumer counters or outbox moving for
# QM_INTAKE_QUIET seconds, at most QM_INTAKE_DRAIN_MAX), so that one level's
# backlog does not weigh on the next level's figures. QM_INTAKE_DRAIN=0 skips
# the wait.
#
# The local directory has 300 people, and intake refuses a role its subject
# already holds (unless the request extends the grant) or has on its way. So
# the loadgen levels run with --extend (QM_INTAKE_EXTEND=0 drops it), which
# also writes the grants it found for wrk's script; a level submits at most
# QM_INTAKE_MAX_N requests (default 1,800: one per person and role, so no
# request waits on an earlier one for the same pair); and wrk runs for as
# long as about QM_WRK_MAX_REQ requests (default 2,200, of 2,400 pairs) take
# at the rate the unlimited level reached, 3 to 15 s. The faster levels are
# therefore shorter than QM_INTAKE_SECONDS.
#
# Environment: QM_BUILD_DIR (build tree holding bench/qm-loadgen and
# tools/qm-admin; default ./build), QM_INTAKE_URL, QM_AUTH_HS256_SECRET
# (used by both), QM_INTAKE_RATES (default "100 200 400 800 0"; 0 =
# unlimited; set but empty: wrk alone), QM_INTAKE_SECONDS (default 10: -n is rate x seconds),
# QM_INTAKE_MAX_N (most requests in a level, and those of the unlimited
# level; default 1800), QM_INTAKE_CONCURRENCY (default 32), QM_WRK_ARGS
# (default "-t2 -c32 -d<see above>s --timeout 10s": with wrk's own 2 s the
# latency distribution is cut off and the slower answers count as timeouts),
# QM_BENCH_ROLES (item:role pairs for wrk; default: the auto-approved ones
# intake's catalog knows), QM_SUITE_METRICS (base URLs whose /metrics show
# the suite's progress; default intake and ports 8082-8085).
# Exit status: 0 when every level ran (non-2xx answers are in the table),
# 1 when a level could not run or the suite is not up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
INTAKE="${QM_INTAKE_URL:-http://127.0.0.1:8081}"
INTAKE="${INTAKE%/}"
LOADGEN="$BUILD/bench/qm-loadgen"
ADMIN="$BUILD/tools/qm-admin"
RATES="${QM_INTAKE_RATES-100 200 400 800 0}" # set but empty: wrk alone
SECS="${QM_INTAKE_SECONDS:-10}"
MAX_N="${QM_INTAKE_MAX_N:-1800}"
CONC="${QM_INTAKE_CONCURRENCY:-32}"
WRK_ARGS="${QM_WRK_ARGS:-}"
WRK_MAX_REQ="${QM_WRK_MAX_REQ:-2200}"
EXTEND="${QM_INTAKE_EXTEND:-1}"
DRAIN="${QM_INTAKE_DRAIN:-1}"
QUIET="${QM_INTAKE_QUIET:-5}"
DRAIN_MAX="${QM_INTAKE_DRAIN_MAX:-600}"
METRICS="${QM_SUITE_METRICS:-$INTAKE http://127.0.0.1:8082 http://127.0.0.1:8083 http://127.0.0.1:8084 http://127.0.0.1:8085}"
# The local catalog's auto-approved access roles; intake.lua gets those
# intake knows (the others would all be 4xx and measure nothing).
WANT_ROLES="figma:viewer github:read slack:user zoom:user jira:user confluence:user datadog:user 1password:user"

if ! curl -fsS -m 3 "$INTAKE/readyz" >/dev/null 2>&1; then
  cat >&2 <<TXT
bench: intake at $INTAKE does not answer /readyz, so the suite is not running.
Start it, then run this again:

  bash scripts/up.sh
  bash bench/intake.sh
TXT
  exit 1
fi

for target in qm-loadgen qm-admin; do
  bin="$LOADGEN"
  [[ $target == qm-admin ]] && bin="$ADMIN"
  if [[ ! -x "$bin" || ( $target == qm-loadgen &&
        -n "$(find "$ROOT/bench/loadgen" -newer "$bin" -print -quit)" ) ]]; then
    echo "bench: building $target in $BUILD"
    cmake -S "$ROOT" -B "$BUILD" >/dev/null
    cmake --build "$BUILD" --target "$target" >/dev/null
  fi
done

have_wrk=1
if ! command -v wrk >/dev/null 2>&1; then
  have_wrk=0
  cat >&2 <<TXT
bench: wrk is not installed, so the second opinion is skipped. Install it with
  sudo apt-get install -y wrk
TXT
fi

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
BENCH_TOKEN="$("$ADMIN" token --sub p-0001 --roles helpdesk --ttl 86400)"

# The suite's progress counters, one text: unchanged = nothing moving.
suite_state() {
  local base
  for base in $METRICS; do
    curl -fsS -m 2 "$base/metrics" 2>/dev/null |
      grep -E '^qm_(consumer_events_total|outbox_published_events|outbox_oldest_unpublished_seconds)' ||
      true
  done
}

# Benchmark requests (p-0001's, reason "benchmark") still on their way: in
# the newest page of each unfinished status. Counters alone can stand still
# for seconds while a long transaction holds a relay back.
pending() {
  local st n=0 body
  for st in submitted pending_approval in_progress; do
    body="$(curl -fsS -m 5 -H "Authorization: Bearer $BENCH_TOKEN" \
      "$INTAKE/v1/requests?mine&status=$st&limit=200" 2>/dev/null || true)"
    n=$((n + $(grep -o '"reason":"benchmark"' <<<"$body" | wc -l)))
  done
  echo "$n"
}

# Waits until no benchmark request is on its way and suite_state() has not
# changed for QUIET seconds in a row.
wait_quiet() {
  [[ "$DRAIN" == 0 ]] && return 0
  local prev cur same=0 waited=0
  prev="$(suite_state)"
  while (( same < QUIET )); do
    sleep 1
    waited=$((waited + 1))
    cur="$(suite_state)"
    if [[ "$cur" == "$prev" ]]; then same=$((same + 1)); else same=0; fi
    # every few seconds, and before giving the all-clear
    if (( same >= QUIET || waited % 5 == 0 )) && [[ "$(pending)" != 0 ]]; then same=0; fi
    prev="$cur"
    if (( waited % 15 == 0 )); then
      echo "  ... waiting for the suite to work through the backlog (${waited} s, load $(loadavg))"
    fi
    if (( waited >= DRAIN_MAX )); then
      echo "  ... still busy after ${DRAIN_MAX} s; going on anyway"
      return 0
    fi
  done
  (( waited > QUIET )) && echo "  suite quiet after ${waited} s"
  return 0
}

# key=value from a RESULT-style line.
field() { sed -n "s/.*[ ]$1=\([^ ]*\).*/\1/p" <<<"$2"; }

status=0
rows=()
out="$(mktemp)"
held="$(mktemp)"
trap 'rm -f "$out" "$held"' EXIT
extend=()
[[ "$EXTEND" != 0 ]] && extend=(--extend --held-file "$held")
last_rps=""

echo "bench: intake alone at $INTAKE; $(date -u +%Y-%m-%dT%H:%MZ), commit" \
     "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores," \
     "load $(loadavg)"
wait_quiet

for rate in $RATES; do
  if [[ "$rate" == 0 ]]; then n="$MAX_N"; offered="unlimited"; else n=$((rate * SECS)); offered="$rate"; fi
  (( n > MAX_N )) && n="$MAX_N"
  echo
  echo "=== qm-loadgen --submit-only ${extend[*]:0:1} -n $n --rate $rate --concurrency $CONC (load before: $(loadavg))"
  "$LOADGEN" --submit-only "${extend[@]}" --intake "$INTAKE" -n "$n" --rate "$rate" \
    --concurrency "$CONC" | tee "$out" || true
  r="$(sed -n 's/^RESULT //p' "$out")"
  load="$(loadavg | cut -d' ' -f1)"
  if [[ -z "$r" ]]; then
    status=1
    rows+=("$(printf '%-18s %s' "loadgen $offered" "(no result: see above)")")
  else
    r=" $r"
    last_rps="$(field answered_rps "$r")"
    rows+=("$(printf '%-18s %8s %8s %8s %8s %8s %8s %8s %7s %5s' "loadgen $offered" \
      "$(field start_rps "$r")" "$(field submit_rps "$r")" "$(field answered_rps "$r")" \
      "$(field post_p50_ms "$r")" "$(field post_p90_ms "$r")" "$(field post_p99_ms "$r")" \
      "$(field post_max_ms "$r")" "$(field errors "$r")" "$load")")
  fi
  wait_quiet
done

if [[ $have_wrk == 1 ]]; then
  token="$BENCH_TOKEN"
  roles="${QM_BENCH_ROLES:-}"
  if [[ -z "$roles" ]]; then
    for pair in $WANT_ROLES; do
      item="${pair%%:*}" role="${pair#*:}"
      body="$(curl -fsS -m 3 -H "Authorization: Bearer $token" "$INTAKE/v1/catalog/$item" 2>/dev/null || true)"
      if grep -Eq "\{\"id\":\"$role\"[^}]*\"auto_approve\":true" <<<"$body"; then
        roles="${roles:+$roles,}$pair"
      else
        echo "bench: intake's catalog has no auto-approved $pair; wrk leaves it out"
      fi
    done
  fi
  if [[ -z "$WRK_ARGS" ]]; then
    # As long as about WRK_MAX_REQ requests take at the unlimited level's rate.
    d="$(awk -v n="$WRK_MAX_REQ" -v r="${last_rps:-0}" \
      'BEGIN { d = r > 0 ? int(n / r) : 15; if (d < 3) d = 3; if (d > 15) d = 15; print d }')"
    WRK_ARGS="-t2 -c32 -d${d}s --timeout 10s"
  fi
  threads="$(sed -n 's/.*-t *\([0-9][0-9]*\).*/\1/p' <<<"$WRK_ARGS")"
  held_env=""
  if [[ "$EXTEND" != 0 && ! -s "$held" ]]; then
    # No loadgen level wrote the grants file: one request does the look-up.
    "$LOADGEN" --submit-only --extend --held-file "$held" --intake "$INTAKE" -n 1 >/dev/null || true
    wait_quiet
  fi
  [[ "$EXTEND" != 0 && -s "$held" ]] && held_env="$held"
  echo
  echo "=== wrk $WRK_ARGS --latency (roles $roles; load before: $(loadavg))"
  # shellcheck disable=SC2086 # WRK_ARGS is a list of options
  QM_BENCH_TOKEN="$token" QM_BENCH_ROLES="$roles" QM_BENCH_HELD="$held_env" \
    wrk $WRK_ARGS --latency -s "$ROOT/bench/intake.lua" "$INTAKE" -- "${threads:-1}" |
    tee "$out" || true
  r="$(sed -n 's/^WRKRESULT //p' "$out")"
  load="$(loadavg | cut -d' ' -f1)"
  if [[ -z "$r" ]]; then
    status=1
    rows+=("$(printf '%-18s %s' "wrk" "(no result: see above)")")
  else
    r=" $r"
    rows+=("$(printf '%-18s %8s %8s %8s %8s %8s %8s %8s %7s %5s' "wrk $(sed "s/ *--timeout [^ ]*//; s/ //g" <<<"$WRK_ARGS")" \
      "-" "-" "$(field rps "$r")" "$(field p50_ms "$r")" "$(field p90_ms "$r")" \
      "$(field p99_ms "$r")" "$(field max_ms "$r")" \
      "$(( $(field non2xx "$r") + $(field socket_errors "$r") ))" "$load")")
  fi
fi

echo
echo "=== summary: POST /v1/requests (rates per second; latencies ms, start to complete response)"
printf '%-18s %8s %8s %8s %8s %8s %8s %8s %7s %5s\n' offered started 201/s answered \
  p50 p90 p99 max non-2xx load
for row in "${rows[@]}"; do echo "$row"; done
exit "$status"
