/*
 * prune: retention. The ledger is kept for QM_AUDIT_RETENTION (seven years by
 * default; 0 keeps it for ever). Older records are removed from the start of
 * each chain only up to a checkpoint signed before the retention cut-off,
 * and the cut is recorded as an anchor (chain, sequence, hash, the
 * checkpoint that vouches for it) in the append-only `ledger_anchors` table,
 * so `qm-audit verify` walks the rest of the chain from the anchor and
 * checks that a signed checkpoint vouches for it: a prune is tamper-evident
 * like everything else, and anything removed without an anchor is reported
 * as removed.
 *
 * The ledger's trigger lets a DELETE through only inside a transaction that
 * set `qm.audit.prune` (SET LOCAL), which only this code does; a database
 * owner could do the same, which is why the anchor must match a signed
 * checkpoint. Each round removes about QM_AUDIT_PRUNE_BATCH records per
 * chain (more only when no checkpoint falls within the batch), in one transaction per chain, so a first prune of years of records
 * proceeds in bounded steps; instances take turns on an advisory lock.
 */
#include "audit.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Advisory lock key of prune rounds ("qmaudprn"). */
#define AUDIT_PRUNE_LOCK 0x716d617564707276LL

/* Prunes one chain inside an open transaction; *n receives the records
 * removed. */
static int prune_chain(qm_pg_t *pg, const char *chain_id, const char *key_id, int64_t cutoff_ms,
                       int64_t max_records, int64_t *n, char *errstr, size_t errstr_size) {
  qm_pg_param_t cp[] = {QM_PG_TEXT(chain_id), QM_PG_TEXT(key_id), QM_PG_INT64(cutoff_ms),
                        QM_PG_INT64(max_records)};
  qm_pg_result_t *res = NULL;
  *n = 0;
  /* A checkpoint of this key signed before the cut-off, past the current
   * anchor: the newest at most max_records beyond it, or, when there is none
   * that close, the nearest beyond (so a round always makes progress). */
  int rc = qm_pg_exec(pg,
                      "WITH a AS (SELECT coalesce(max(seq), 0) AS s FROM ledger_anchors"
                      " WHERE chain_id = $1)"
                      " SELECT c.id, c.seq, c.head_hash, a.s FROM checkpoints c, a"
                      " WHERE c.chain_id = $1 AND c.key_id = $2 AND c.signed_at_ms < $3::bigint"
                      " AND c.seq > a.s ORDER BY (c.seq <= a.s + $4::bigint) DESC,"
                      " CASE WHEN c.seq <= a.s + $4::bigint THEN -c.seq ELSE c.seq END LIMIT 1",
                      cp, QM_ARRAY_LEN(cp), &res, errstr, errstr_size);
  if (rc != QM_OK || qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return rc;
  }
  int64_t cp_id = 0, seq = 0, from = 0;
  unsigned char *head = NULL;
  size_t head_len = 0;
  qm_pg_get_int64(res, 0, 0, &cp_id);
  qm_pg_get_int64(res, 0, 1, &seq);
  qm_pg_get_bytes(res, 0, 2, &head, &head_len);
  qm_pg_get_int64(res, 0, 3, &from);
  qm_pg_result_destroy(res);
  res = NULL;
  qm_pg_param_t dp[] = {QM_PG_TEXT(chain_id), QM_PG_INT64(from), QM_PG_INT64(seq)};
  rc = qm_pg_exec(pg, "SET LOCAL qm.audit.prune = 'on'", NULL, 0, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "DELETE FROM ledger WHERE chain_id = $1 AND seq > $2::bigint AND seq <= $3::bigint",
                    dp, QM_ARRAY_LEN(dp), &res, errstr, errstr_size);
  if (rc == QM_OK) *n = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = qm_pg_exec(pg, "DELETE FROM ledger_facts WHERE chain_id = $1 AND seq <= $3::bigint", dp,
                    QM_ARRAY_LEN(dp), NULL, errstr, errstr_size);
  qm_pg_param_t ap[] = {QM_PG_TEXT(chain_id), QM_PG_INT64(seq), QM_PG_BYTES(head, head_len),
                        QM_PG_INT64(cp_id), QM_PG_INT64(qm_now_ms()), QM_PG_INT64(*n)};
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "INSERT INTO ledger_anchors (chain_id, seq, hash, checkpoint_id, pruned_at_ms,"
                    " records) VALUES ($1, $2::bigint, $3, $4::bigint, $5::bigint, $6::bigint)",
                    ap, QM_ARRAY_LEN(ap), NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log_info("retention: chain %s pruned up to sequence %lld (%lld records, anchored to "
                "checkpoint %lld)", chain_id, (long long)seq, (long long)*n, (long long)cp_id);
  free(head);
  return rc;
}

int audit_prune_round(qm_pg_t *pg, const char *key_id, int64_t cutoff_ms, int64_t max_records,
                      int64_t *pruned, char *errstr, size_t errstr_size) {
  *pruned = 0;
  qm_pg_result_t *chains = NULL;
  int rc = qm_pg_exec(pg, "SELECT chain_id FROM chain_heads ORDER BY chain_id", NULL, 0, &chains,
                      errstr, errstr_size);
  for (int i = 0; rc == QM_OK && i < qm_pg_ntuples(chains); i++) {
    rc = qm_pg_exec(pg, "BEGIN", NULL, 0, NULL, errstr, errstr_size);
    if (rc != QM_OK) break;
    qm_pg_param_t lp[] = {QM_PG_INT64(AUDIT_PRUNE_LOCK)};
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(pg, "SELECT pg_try_advisory_xact_lock($1::bigint)", lp, 1, &res, errstr,
                    errstr_size);
    bool mine = rc == QM_OK && !strcmp(qm_pg_get(res, 0, 0), "t");
    qm_pg_result_destroy(res);
    int64_t n = 0;
    if (rc == QM_OK && mine)
      rc = prune_chain(pg, qm_pg_get(chains, i, 0), key_id, cutoff_ms, max_records, &n, errstr,
                       errstr_size);
    if (rc == QM_OK) rc = qm_pg_exec(pg, "COMMIT", NULL, 0, NULL, errstr, errstr_size);
    if (rc != QM_OK) {
      qm_pg_exec(pg, "ROLLBACK", NULL, 0, NULL, NULL, 0);
      break;
    }
    *pruned += n;
    if (!mine) break; /* another instance is pruning: its turn */
  }
  qm_pg_result_destroy(chains);
  return rc;
}

/* `qm-audit prune --older-than DURATION [--batch N]`: one retention pass by
 * hand (a CronJob, or a test), with the key of QM_AUDIT_SIGNING_KEY_FILE:
 * repeats rounds until nothing more can be pruned. */
int audit_prune_main(int argc, char **argv) {
  const char *older = NULL, *before = NULL;
  int64_t batch = 100000;
  bool bad = false;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--older-than") && i + 1 < argc) older = argv[++i];
    else if (!strcmp(argv[i], "--before") && i + 1 < argc) before = argv[++i];
    else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atoll(argv[++i]);
    else bad = true;
  }
  int64_t age = 0, cutoff = 0;
  char *end = NULL;
  if (older && before) bad = true;
  else if (older && qm_config_parse_ms(older, &age) == QM_OK && age >= 0) cutoff = qm_now_ms() - age;
  else if (before && (cutoff = strtoll(before, &end, 10)) > 0 && !*end) (void)0;
  else bad = true;
  if (bad || batch < 1) {
    fprintf(stderr, "usage: qm-audit prune (--older-than DURATION | --before MS_SINCE_EPOCH) "
                    "[--batch N]   (e.g. --older-than 2557d; reads QM_PG_DSN and "
                    "QM_AUDIT_SIGNING_KEY_FILE)\n");
    return 2;
  }
  qm_log_init("audit", QM_LOG_WARN, NULL);
  char errstr[512];
  const char *key_path = getenv("QM_AUDIT_SIGNING_KEY_FILE");
  chain_key_t *key = NULL;
  if (!key_path || !*key_path || chain_key_load_pem(key_path, &key, errstr, sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "qm-audit prune: needs the signing key's file in QM_AUDIT_SIGNING_KEY_FILE (%s): "
                    "only checkpoints of that key anchor a prune\n",
            key_path && *key_path ? errstr : "unset");
    return 2;
  }
  char key_id[CHAIN_KEY_ID_LEN];
  chain_key_id(key, key_id);
  chain_key_destroy(key);
  qm_pg_t *pg = audit_tool_connect("prune");
  if (!pg) return 2;
  int64_t total = 0, n = 0;
  int rc;
  do {
    rc = audit_prune_round(pg, key_id, cutoff, batch, &n, errstr, sizeof(errstr));
    total += n;
  } while (rc == QM_OK && n > 0);
  qm_pg_destroy(pg);
  if (rc != QM_OK) {
    fprintf(stderr, "qm-audit prune: %s (%lld records pruned before)\n", errstr, (long long)total);
    return 1;
  }
  printf("pruned %lld records recorded before %lld ms (up to checkpoints of key %s)\n",
         (long long)total, (long long)cutoff, key_id);
  return 0;
}
