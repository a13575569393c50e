#!/usr/bin/env bash
# Evidence, search and report latency on a large ledger (see
# bench/audit/README.md). Prints figures; not a test. Needs PostgreSQL and
# Kafka (deploy/local/stack.sh up), not the suite.
#
#  1. audit-genreq writes M records of whole request lifecycles (real
#     protobuf payloads, chained with the service's chain_hash(), report facts
#     from the service's audit_payload_facts()) as COPY text; they are loaded
#     into a fresh database (BYPASSING the service) and ANALYZEd.
#  2. `qm-audit verify --db` checks the generated chains (a cross-check that
#     the generator chained them like the service would).
#  3. qm-audit is started on that database; audit-genreq probe times
#     GET …/evidence for N sampled requests one after another over one
#     keep-alive connection, 20 searches by person, and each report 3 times.
#
#   bash bench/audit/evidence.sh                      # M=1000000, N=1000
#   QM_BENCH_LEDGER=200000 QM_BENCH_PROBES=500 bash bench/audit/evidence.sh
#
# Environment: QM_BUILD_DIR (default ./build), QM_BENCH_LEDGER (M),
# QM_BENCH_PROBES (N, at most 2000), QM_BENCH_CHAINS (default 3),
# QM_BENCH_PG (libpq conninfo without dbname), QM_KAFKA_BROKERS,
# QM_BENCH_KEEP=1 keeps the database (its name is printed) to study plans.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${QM_BUILD_DIR:-$ROOT/build}"
M="${QM_BENCH_LEDGER:-1000000}"
N="${QM_BENCH_PROBES:-1000}"
CHAINS="${QM_BENCH_CHAINS:-3}"
PG="${QM_BENCH_PG:-host=127.0.0.1 port=5432 user=postgres}"
export QM_KAFKA_BROKERS="${QM_KAFKA_BROKERS:-127.0.0.1:9092}"
export PGOPTIONS="-c client_min_messages=warning"
AUDIT="$BUILD/services/qm-audit"
GEN="$BUILD/bench/audit-genreq"
DB="qm_bench_evidence_$$"
WORK="$(mktemp -d /tmp/qm-bench-evidence-XXXXXX)"
PID=""
say() { printf '[bench evidence] %s\n' "$*" >&2; }
cleanup() {
  [[ -n "$PID" ]] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  if [[ "${QM_BENCH_KEEP:-0}" == 1 ]]; then say "kept database $DB"; else
    psql "$PG dbname=postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
q() { psql "$PG dbname=$DB" -Atqc "$1"; }
ms() { date +%s%3N; }

cmake -S "$ROOT" -B "$BUILD" >/dev/null
cmake --build "$BUILD" --target qm-audit qm-admin audit-genreq >/dev/null
psql "$PG dbname=postgres" -qc "CREATE DATABASE $DB" >/dev/null
QM_PG_DSN="$PG dbname=$DB" "$AUDIT" migrate >/dev/null 2>&1

say "generating and loading $M records"
t0=$(ms)
"$GEN" gen -n "$M" --chains "$CHAINS" --heads "$WORK/heads.copy" --facts "$WORK/facts.copy" \
  --ids "$WORK/ids.txt" > "$WORK/ledger.copy"
t1=$(ms)
q "COPY audit.ledger FROM '$WORK/ledger.copy'" 2>/dev/null ||
  psql "$PG dbname=$DB" -qc "\\copy audit.ledger FROM '$WORK/ledger.copy'"
psql "$PG dbname=$DB" -qc "\\copy audit.ledger_facts FROM '$WORK/facts.copy'"
q "DELETE FROM audit.chain_heads"
psql "$PG dbname=$DB" -qc "\\copy audit.chain_heads FROM '$WORK/heads.copy'"
q "ANALYZE audit.ledger; ANALYZE audit.ledger_facts" >/dev/null
t2=$(ms)
echo "RESULT generate $M records: $((t1 - t0)) ms; load + index + analyze: $((t2 - t1)) ms;" \
     "ledger $(q "SELECT pg_size_pretty(pg_total_relation_size('audit.ledger'))")," \
     "facts $(q "SELECT count(*) FROM audit.ledger_facts") rows, $(q "SELECT pg_size_pretty(pg_total_relation_size('audit.ledger_facts'))")"

t0=$(ms)
if QM_PG_DSN="$PG dbname=$DB" "$AUDIT" verify --db > "$WORK/verify.txt" 2>&1; then v=ok; else v=BROKEN; fi
echo "RESULT verify --db $M generated records: $v in $(( $(ms) - t0 )) ms"
[[ "$v" == ok ]] || { cat "$WORK/verify.txt" >&2; exit 1; }

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
QM_PG_DSN="$PG dbname=$DB" QM_TOPIC_PREFIX="bench-evidence-$$." QM_HTTP_PORT="$PORT" \
  QM_AUDIT_CHAINS="$CHAINS" QM_LOG_LEVEL=warn "$AUDIT" > "$WORK/audit.log" 2>&1 &
PID=$!
for _ in $(seq 1 200); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$WORK/audit.log" >&2; exit 1; }
TOKEN="$("$BUILD/tools/qm-admin" token --sub p-auditor --roles auditor)"
"$GEN" probe "http://127.0.0.1:$PORT" "$TOKEN" "$WORK/ids.txt" "$N"
