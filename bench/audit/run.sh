#!/usr/bin/env bash
# Audit ledger benchmarks (see bench/audit/README.md): they print figures,
# they are not tests. Needs PostgreSQL and Kafka (deploy/local/stack.sh up),
# not the suite: every run uses its own databases and topic prefix and
# removes them at the end.
#
#  1. appends  — N RequestSubmitted events (real payloads, so audit decodes them
#     and writes their report facts) are produced straight to a fresh
#     <prefix>qm.requests.v1 (appendgen), then qm-audit is started on a fresh
#     database and drains them: ledger rows per second from the first record
#     to the last (recorded_at_ms), with one instance and with two sharing the
#     work; each run's ledger is then checked gapless and complete.
#  2. verify   — `qm-audit verify` on that ledger from the database and from
#     the topic, and on a large ledger (M records) generated straight into a
#     scratch database with COPY by gen_ledger.py (BYPASSING the service),
#     from the database and from an export file.
#
#   bash bench/audit/run.sh
#   QM_BENCH_EVENTS=100000 QM_BENCH_LEDGER=1000000 bash bench/audit/run.sh
#
# Environment: QM_BUILD_DIR (build tree with services/qm-audit and
# lib/libqm.a; default ./build), QM_BENCH_EVENTS (default 50000),
# QM_BENCH_LEDGER (default 1000000; 0 skips step 2's large ledger),
# QM_BENCH_CHAINS (QM_AUDIT_CHAINS for the runs, default 3),
# QM_BENCH_PG (libpq conninfo without dbname; default the local stack's),
# QM_KAFKA_BROKERS (default 127.0.0.1:9092).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
N="${QM_BENCH_EVENTS:-50000}"
M="${QM_BENCH_LEDGER:-1000000}"
CHAINS="${QM_BENCH_CHAINS:-3}"
PG="${QM_BENCH_PG:-host=127.0.0.1 port=5432 user=postgres}"
export QM_KAFKA_BROKERS="${QM_KAFKA_BROKERS:-127.0.0.1:9092}"
export PGOPTIONS="-c client_min_messages=warning"
AUDIT="$BUILD/services/qm-audit"
GEN="$BUILD/bench/audit-appendgen"
RUN_ID="$$-$(date +%s)"
PREFIX1="bench-audit-$RUN_ID-a."  # run 1a's topics
PREFIX2="bench-audit-$RUN_ID-b."  # run 1b's: each run publishes its own qm.audit.v1
WORK="$(mktemp -d /tmp/qm-bench-audit-XXXXXX)"
DBS=()
PIDS=()
say() { printf '[bench audit] %s\n' "$*" >&2; }

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for d in "${DBS[@]}"; do psql "$PG dbname=postgres" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true; done
  if [[ -x "$GEN" ]]; then
    "$GEN" topics delete --prefix "$PREFIX1" >/dev/null 2>&1 || true
    "$GEN" topics delete --prefix "$PREFIX2" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- build -------------------------------------------------------------------
if [[ ! -x "$AUDIT" || ! -f "$BUILD/lib/libqm.a" ]]; then
  say "building qm-audit in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" >/dev/null
  cmake --build "$BUILD" --target qm-audit >/dev/null
fi
cmake --build "$BUILD" --target audit-appendgen >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Creates a fresh database qm_bench_audit_<tag>_<pid> and sets DB to its name
# (not echoed: a $(...) subshell would lose the DBS entry cleanup needs).
new_db() {
  DB="qm_bench_audit_$1_$$"
  psql "$PG dbname=postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
  DBS+=("$DB")
}
q() { psql "$PG dbname=$1" -Atqc "$2"; }

# Starts an audit instance on database $1 and topic prefix $2; logs to $WORK.
start_audit() {
  local db="$1" prefix="$2" tag="$3"
  QM_PG_DSN="$PG dbname=$db" QM_TOPIC_PREFIX="$prefix" \
    QM_HTTP_PORT="$(free_port)" QM_AUDIT_CHAINS="$CHAINS" QM_PG_POOL_SIZE=1 \
    QM_LOG_LEVEL=warn "$AUDIT" >"$WORK/audit-$tag.log" 2>&1 &
  PIDS+=("$!")
}

# Waits until database $1 holds N ledger rows (bound 600 s); prints the figures.
drain_report() {
  local db="$1" label="$2" t0="$3"
  local n=0 deadline=$((SECONDS + 600))
  while (( SECONDS < deadline )); do
    n="$(q "$db" "SELECT count(*) FROM audit.ledger" 2>/dev/null || echo 0)"
    [[ "$n" -ge "$N" ]] && break
    sleep 0.5
  done
  local wall_ms=$(( $(date +%s%3N) - t0 ))
  if [[ "$n" -lt "$N" ]]; then say "$label: only $n of $N rows after 600 s"; return 1; fi
  local span
  span="$(q "$db" "SELECT max(recorded_at_ms) - min(recorded_at_ms) FROM audit.ledger")"
  # Complete and unique by event id; gapless and intact per `verify`.
  local check
  check="$(q "$db" "SELECT count(DISTINCT event_id) = $N FROM audit.ledger")"
  if QM_PG_DSN="$PG dbname=$db" "$AUDIT" verify >/dev/null 2>&1; then check="$check+verified"; else check="$check+BROKEN"; fi
  local per_chain
  per_chain="$(q "$db" "SELECT string_agg(chain_id || '=' || seq, ' ' ORDER BY chain_id) FROM audit.chain_heads")"
  printf 'RESULT appends %-22s rows=%d span_ms=%d rows_per_s=%.0f wall_ms=%d (incl. start-up) gapless_unique=%s chains: %s\n' \
    "$label" "$n" "$span" "$(python3 -c "print($n * 1000 / max($span, 1))")" "$wall_ms" "$check" "$per_chain"
}

# Times a verify command: wall time, and the CPU time of qm-audit itself
# (the rest is PostgreSQL's or Kafka's, and the machine's other load).
verify_report() {
  local label="$1"; shift
  local t0 t1 out status=0
  t0=$(date +%s%3N)
  out="$(/usr/bin/time -f 'CPU %U %S' "$@" 2>&1)" || status=$?
  t1=$(date +%s%3N)
  local recs cpu
  recs="$(printf '%s\n' "$out" | sed -n 's/.*intact, \([0-9]*\) records.*/\1/p' | paste -sd+ | bc)"
  cpu="$(printf '%s\n' "$out" | sed -n 's/^CPU \([0-9.]*\) \([0-9.]*\)$/\1 + \2/p' | bc)"
  printf 'RESULT verify  %-22s exit=%d records=%s ms=%d records_per_s=%.0f qm_audit_cpu_s=%s\n' \
    "$label" "$status" "${recs:-0}" "$((t1 - t0))" \
    "$(python3 -c "print(${recs:-0} * 1000 / max($((t1 - t0)), 1))")" "${cpu:-?}"
  [[ "$status" -eq 0 ]] || printf '%s\n' "$out" >&2
}

say "topics under $PREFIX1 and $PREFIX2; $N events each; QM_AUDIT_CHAINS=$CHAINS; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for p in "$PREFIX1" "$PREFIX2"; do
  "$GEN" topics create --prefix "$p" --partitions 3
  "$GEN" produce --prefix "$p" -n "$N" --size 200 --people 300 >&2
done

# ---- 1a. one instance -----------------------------------------------------------
new_db one; DB1="$DB"
QM_PG_DSN="$PG dbname=$DB1" "$AUDIT" migrate >/dev/null 2>&1
t0=$(date +%s%3N)
start_audit "$DB1" "$PREFIX1" one
drain_report "$DB1" "1 instance" "$t0"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" || true

# ---- 1b. two instances sharing the partitions -------------------------------------
new_db two; DB2="$DB"
QM_PG_DSN="$PG dbname=$DB2" "$AUDIT" migrate >/dev/null 2>&1
t0=$(date +%s%3N)
start_audit "$DB2" "$PREFIX2" two-a
start_audit "$DB2" "$PREFIX2" two-b
drain_report "$DB2" "2 instances" "$t0"
echo "RESULT appends 2 instances: batches rolled back: $(cat "$WORK"/audit-two-*.log | grep -c 'rolled back' || true)"
kill "${PIDS[-1]}" "${PIDS[-2]}"; wait "${PIDS[-1]}" "${PIDS[-2]}" || true

# ---- 2. verification ----------------------------------------------------------------
verify_report "db ($N, run 1a)" env QM_PG_DSN="$PG dbname=$DB1" "$AUDIT" verify --db
# The relay publishes the sealed records; by now they are all on the topic.
verify_report "topic ($N, run 1a)" env QM_TOPIC_PREFIX="$PREFIX1" "$AUDIT" verify --topic
if [[ "$M" -gt 0 ]]; then
  new_db big; DB3="$DB"
  QM_PG_DSN="$PG dbname=$DB3" "$AUDIT" migrate >/dev/null 2>&1
  t0=$(date +%s%3N)
  python3 "$ROOT/bench/audit/gen_ledger.py" -n "$M" --chains "$CHAINS" --heads "$WORK/heads.copy" |
    psql "$PG dbname=$DB3" -qc "COPY audit.ledger FROM STDIN"
  psql "$PG dbname=$DB3" -qc "COPY audit.chain_heads FROM STDIN" <"$WORK/heads.copy"
  echo "RESULT generate $M records with COPY (bypassing the service): $(( $(date +%s%3N) - t0 )) ms, $(q "$DB3" "SELECT pg_size_pretty(pg_total_relation_size('audit.ledger'))")"
  verify_report "db ($M, no stats)" env QM_PG_DSN="$PG dbname=$DB3" "$AUDIT" verify --db
  q "$DB3" "ANALYZE audit.ledger" >/dev/null
  verify_report "db ($M)" env QM_PG_DSN="$PG dbname=$DB3" "$AUDIT" verify --db
  t0=$(date +%s%3N)
  QM_PG_DSN="$PG dbname=$DB3" "$AUDIT" export >"$WORK/big.jsonl" 2>/dev/null
  echo "RESULT export $M records: $(( $(date +%s%3N) - t0 )) ms, $(du -h "$WORK/big.jsonl" | cut -f1)"
  verify_report "export ($M)" "$AUDIT" verify --export "$WORK/big.jsonl"
fi
say "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
