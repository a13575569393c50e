/*
 * verify: `qm-audit verify` recomputes the ledger's hash chain from the
 * database and names the first sequence where it breaks — a changed record
 * (its hash no longer matches), a removed or reordered record (a gap in the
 * sequence, or a prev_hash that is not the previous record's hash) or a
 * record inserted by bypassing the trigger. Exit 0 when intact, 1 when
 * broken, 2 on a usage or connection error.
 */
#include "chain.h"

#include "qm_common.h"
#include "qm_pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int audit_verify_main(int argc, char **argv);

int audit_verify_main(int argc, char **argv) {
  const char *dsn = getenv("QM_PG_DSN");
  if (!dsn || !*dsn) dsn = "host=127.0.0.1 port=5432 user=postgres dbname=quartermaster";
  const char *chain = argc > 1 ? argv[1] : "chain-0";
  char errstr[512];
  qm_pg_t *pg = qm_pg_connect_app(dsn, "audit", "qm-audit-verify", errstr, sizeof(errstr));
  if (!pg) {
    fprintf(stderr, "qm-audit verify: cannot connect (%s); set QM_PG_DSN\n", errstr);
    return 2;
  }
  /* One snapshot for the records and the head, so appends while we read
   * cannot make a healthy chain look broken. */
  if (qm_pg_exec_simple(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", errstr,
                        sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "qm-audit verify: cannot open a snapshot: %s\n", errstr);
    qm_pg_destroy(pg);
    return 2;
  }
  uint8_t prev[CHAIN_HASH_LEN] = {0};
  int64_t expect = 1, checked = 0, last_seq = 0;
  int status = 0;
  int64_t t0 = qm_mono_ms();
  for (;;) {
    qm_pg_param_t p[] = {QM_PG_TEXT(chain), QM_PG_INT64(last_seq)};
    qm_pg_result_t *res = NULL;
    int rc = qm_pg_exec(pg,
                        "SELECT seq, recorded_at_ms, topic, event_id, event_type, event_source,"
                        " subject, person_id, actor_id, request_id, event_time_ms, dead_letter,"
                        " event_bytes, prev_hash, hash FROM ledger WHERE chain_id = $1"
                        " AND seq > $2::bigint ORDER BY seq LIMIT 5000",
                        p, 2, &res, errstr, sizeof(errstr));
    if (rc != QM_OK) {
      fprintf(stderr, "qm-audit verify: query failed: %s\n", errstr);
      qm_pg_destroy(pg);
      return 2;
    }
    int n = qm_pg_ntuples(res);
    for (int i = 0; i < n && status == 0; i++) {
      chain_record_t r = {.chain_id = chain};
      qm_pg_get_int64(res, i, 0, &r.seq);
      qm_pg_get_int64(res, i, 1, &r.recorded_at_ms);
      r.topic = qm_pg_get(res, i, 2);
      r.event_id = qm_pg_get(res, i, 3);
      r.event_type = qm_pg_get(res, i, 4);
      r.event_source = qm_pg_get(res, i, 5);
      r.subject = qm_pg_get(res, i, 6);
      r.person_id = qm_pg_get(res, i, 7);
      r.actor_id = qm_pg_get(res, i, 8);
      r.request_id = qm_pg_get(res, i, 9);
      qm_pg_get_int64(res, i, 10, &r.event_time_ms);
      r.dead_letter = !strcmp(qm_pg_get(res, i, 11), "t");
      unsigned char *bytes = NULL, *rprev = NULL, *rhash = NULL;
      size_t blen = 0, plen = 0, hlen = 0;
      qm_pg_get_bytes(res, i, 12, &bytes, &blen);
      qm_pg_get_bytes(res, i, 13, &rprev, &plen);
      qm_pg_get_bytes(res, i, 14, &rhash, &hlen);
      r.event_bytes = bytes;
      r.event_len = blen;
      uint8_t h[CHAIN_HASH_LEN];
      chain_hash(prev, &r, h);
      if (r.seq != expect) {
        printf("BROKEN at sequence %lld: expected sequence %lld (a record was removed or reordered)\n",
               (long long)r.seq, (long long)expect);
        status = 1;
      } else if (plen != CHAIN_HASH_LEN || memcmp(rprev, prev, CHAIN_HASH_LEN) != 0) {
        printf("BROKEN at sequence %lld: prev_hash is not the previous record's hash (a record "
               "before it was changed, removed or inserted)\n", (long long)r.seq);
        status = 1;
      } else if (hlen != CHAIN_HASH_LEN || memcmp(rhash, h, CHAIN_HASH_LEN) != 0) {
        printf("BROKEN at sequence %lld: the record's contents do not match its hash (the record "
               "was changed)\n", (long long)r.seq);
        status = 1;
      }
      memcpy(prev, h, CHAIN_HASH_LEN);
      free(bytes);
      free(rprev);
      free(rhash);
      last_seq = r.seq;
      expect = r.seq + 1;
      if (status == 0) checked++;
    }
    qm_pg_result_destroy(res);
    if (n == 0 || status != 0) break;
  }
  /* The head row is what appends update; it must match the last record.
   * (A database administrator can rewrite it too: signed checkpoints kept
   * elsewhere are the stronger check, see docs/audit.md.) */
  if (status == 0) {
    qm_pg_param_t hp[] = {QM_PG_TEXT(chain)};
    qm_pg_result_t *res = NULL;
    if (qm_pg_exec(pg, "SELECT seq, hash FROM chain_heads WHERE chain_id = $1", hp, 1, &res,
                   errstr, sizeof(errstr)) != QM_OK) {
      fprintf(stderr, "qm-audit verify: query failed: %s\n", errstr);
      qm_pg_destroy(pg);
      return 2;
    }
    if (qm_pg_ntuples(res) == 0 && checked == 0) {
      printf("EMPTY: chain %s has no records and no head (nothing to verify)\n", chain);
      qm_pg_result_destroy(res);
      qm_pg_destroy(pg);
      return 0;
    }
    int64_t head_seq = 0;
    unsigned char *head = NULL;
    size_t head_len = 0;
    if (qm_pg_ntuples(res) == 1) {
      qm_pg_get_int64(res, 0, 0, &head_seq);
      qm_pg_get_bytes(res, 0, 1, &head, &head_len);
    }
    if (qm_pg_ntuples(res) == 0 || head_seq != last_seq) {
      printf("BROKEN at sequence %lld: the chain head says %lld records but the ledger ends at "
             "%lld (records were removed from the end, or appended around the head)\n",
             (long long)(last_seq + 1), (long long)head_seq, (long long)last_seq);
      status = 1;
    } else if (head_len != CHAIN_HASH_LEN || memcmp(head, prev, CHAIN_HASH_LEN) != 0) {
      printf("BROKEN at sequence %lld: the chain head's hash differs from the recomputed one\n",
             (long long)last_seq);
      status = 1;
    }
    free(head);
    qm_pg_result_destroy(res);
  }
  int64_t ms = qm_mono_ms() - t0;
  if (status == 0) {
    char hex[65];
    chain_hex(prev, hex);
    printf("OK: chain %s intact, %lld records verified in %lld ms, head hash %s\n", chain,
           (long long)checked, (long long)ms, hex);
  }
  qm_pg_destroy(pg);
  return status;
}
