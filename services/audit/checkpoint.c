/*
 * checkpoint: the service's checkpoint signer. Every
 * QM_AUDIT_CHECKPOINT_INTERVAL, and once more at shutdown, it signs each
 * chain whose head moved since the last checkpoint by this key (Ed25519 over
 * the bytes chain.h defines), stores the checkpoint in the append-only
 * `checkpoints` table and publishes it as an AuditCheckpoint on qm.audit.v1
 * with the chain id as key — in one transaction, through the outbox, so a
 * checkpoint is stored if and only if it is published.
 *
 * The signer runs on a thread of its own with its own PostgreSQL connection;
 * it reads committed heads without locking them, so appends never wait for
 * it. Instances serialize their rounds on an advisory lock, so a head is
 * signed once per key however many instances run.
 */
#include "audit.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_topics.h"

#include <errno.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct audit_ckpt {
  qm_service_t *svc;
  const chain_key_t *key;
  int64_t interval_ms;
  qm_pg_t *pg; /* the thread's own; NULL until connected */
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stop;
  /* retention (prune.c), set once before rounds matter */
  _Atomic int64_t retention_ms, prune_interval_ms, prune_batch;
  int64_t last_prune_ms; /* monotonic; the thread's own */
};

/* Signs, stores and emits one chain's head inside the open transaction. */
static int sign_one(qm_service_t *svc, qm_pg_t *pg, const chain_key_t *key, const char *chain_id,
                    int64_t seq, const uint8_t head[CHAIN_HASH_LEN], char *errstr,
                    size_t errstr_size) {
  chain_checkpoint_t cp = {.chain_id = chain_id, .seq = seq, .signed_at_ms = qm_now_ms()};
  memcpy(cp.head_hash, head, CHAIN_HASH_LEN);
  int rc = chain_checkpoint_sign(key, &cp, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  uint8_t pub[CHAIN_KEY_RAW_LEN];
  chain_key_public_raw(key, pub);
  qm_pg_param_t p[] = {QM_PG_TEXT(chain_id),
                       QM_PG_INT64(seq),
                       QM_PG_BYTES(head, CHAIN_HASH_LEN),
                       QM_PG_INT64(cp.signed_at_ms),
                       QM_PG_TEXT(CHAIN_SIG_ALGORITHM),
                       QM_PG_TEXT(cp.key_id),
                       QM_PG_BYTES(pub, CHAIN_KEY_RAW_LEN),
                       QM_PG_BYTES(cp.signature, CHAIN_SIG_LEN)};
  rc = qm_pg_exec(pg,
                  "INSERT INTO checkpoints (chain_id, seq, head_hash, signed_at_ms, algorithm,"
                  " key_id, public_key, signature) VALUES ($1, $2::bigint, $3, $4::bigint, $5,"
                  " $6, $7, $8)",
                  p, QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  Qm__V1__AuditCheckpoint ac = QM__V1__AUDIT_CHECKPOINT__INIT;
  ac.chain_id = (char *)chain_id;
  ac.sequence = seq;
  ac.head_hash.data = (uint8_t *)head;
  ac.head_hash.len = CHAIN_HASH_LEN;
  ac.signed_at_ms = cp.signed_at_ms;
  ac.algorithm = (char *)CHAIN_SIG_ALGORITHM;
  ac.key_id = cp.key_id;
  ac.signature.data = cp.signature;
  ac.signature.len = CHAIN_SIG_LEN;
  Qm__V1__AuditEvent ae = QM__V1__AUDIT_EVENT__INIT;
  ae.event_case = QM__V1__AUDIT_EVENT__EVENT_CHECKPOINT;
  ae.checkpoint = &ac;
  return qm_service_emit(svc, pg, QM_TOPIC_AUDIT, chain_id, AUDIT_TYPE_CHECKPOINT, chain_id, NULL,
                         &ae.base, NULL, errstr, errstr_size);
}

int audit_ckpt_round(qm_service_t *svc, qm_pg_t *pg, const chain_key_t *key, int *n_signed,
                     char *errstr, size_t errstr_size) {
  char key_id[CHAIN_KEY_ID_LEN];
  chain_key_id(key, key_id);
  qm_pg_result_t *res = NULL;
  int n = 0;
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t lp[] = {QM_PG_INT64(qm_pg_advisory_key("qm.audit.checkpoint"))};
  rc = qm_pg_exec(pg, "SELECT pg_advisory_xact_lock($1::bigint)", lp, 1, NULL, errstr,
                  errstr_size);
  if (rc != QM_OK) goto out;
  qm_pg_param_t hp[] = {QM_PG_TEXT(key_id)};
  rc = qm_pg_exec(pg,
                  "SELECT h.chain_id, h.seq, h.hash FROM chain_heads h WHERE h.seq >"
                  " COALESCE((SELECT max(c.seq) FROM checkpoints c WHERE c.chain_id = h.chain_id"
                  " AND c.key_id = $1), 0) ORDER BY h.chain_id",
                  hp, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t seq = 0;
    unsigned char *head = NULL;
    size_t head_len = 0;
    qm_pg_get_int64(res, i, 1, &seq);
    qm_pg_get_bytes(res, i, 2, &head, &head_len);
    if (head_len != CHAIN_HASH_LEN)
      rc = qm_err(errstr, errstr_size, QM_EIO, "chain head of %s is corrupt (%zu bytes)",
                  qm_pg_get(res, i, 0), head_len);
    else
      rc = sign_one(svc, pg, key, qm_pg_get(res, i, 0), seq, head, errstr, errstr_size);
    free(head);
    if (rc == QM_OK) n++;
  }
  if (rc == QM_OK) rc = qm_pg_commit(pg, errstr, errstr_size);
out:
  if (rc != QM_OK) qm_pg_rollback(pg, NULL, 0);
  qm_pg_result_destroy(res);
  if (rc == QM_OK && n_signed) *n_signed = n;
  return rc;
}

/* One round on the thread's connection, connecting first when needed. */
static int ckpt_step(audit_ckpt_t *c, int *n_signed, char *errstr, size_t errstr_size) {
  if (!c->pg) {
    c->pg = qm_pg_connect_app(qm_service_dsn(c->svc), "audit", "qm-audit-checkpoint", errstr,
                              errstr_size);
    if (!c->pg) return QM_ETRANSIENT;
  } else if (!qm_pg_connected(c->pg)) {
    qm_pg_ensure(c->pg, qm_mono_ms());
  }
  return audit_ckpt_round(c->svc, c->pg, c->key, n_signed, errstr, errstr_size);
}

static void *ckpt_thread(void *arg) {
  audit_ckpt_t *c = arg;
  char key_id[CHAIN_KEY_ID_LEN];
  chain_key_id(c->key, key_id);
  for (;;) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += c->interval_ms / 1000;
    until.tv_nsec += (c->interval_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->lock);
    while (!c->stop && pthread_cond_timedwait(&c->cond, &c->lock, &until) != ETIMEDOUT) {
    }
    bool stop = c->stop;
    pthread_mutex_unlock(&c->lock);
    if (stop) break;
    char errstr[512] = "";
    int n = 0;
    int rc = ckpt_step(c, &n, errstr, sizeof(errstr));
    if (rc != QM_OK)
      qm_log_warn("checkpoint round failed (%s: %s); the next round in %lld ms signs what this "
                  "one missed", qm_strerror(rc), errstr, (long long)c->interval_ms);
    else if (n > 0)
      qm_log_debug("checkpoint: %d chain head(s) signed with key %s", n, key_id);
    int64_t retention = atomic_load(&c->retention_ms);
    if (rc == QM_OK && retention > 0 &&
        (c->last_prune_ms == 0 || qm_mono_ms() - c->last_prune_ms >= atomic_load(&c->prune_interval_ms))) {
      c->last_prune_ms = qm_mono_ms();
      int64_t pruned = 0;
      rc = audit_prune_round(c->pg, key_id, qm_now_ms() - retention, atomic_load(&c->prune_batch),
                             &pruned, errstr, sizeof(errstr));
      if (rc != QM_OK)
        qm_log_warn("retention round failed (%s: %s); retried at the next round", qm_strerror(rc),
                    errstr);
      else if (pruned > 0)
        qm_log_info("retention: %lld records older than %lld ms removed", (long long)pruned,
                    (long long)retention);
    }
  }
  /* The last round, so the final heads of this run are signed. The
   * connection cannot be re-established once shutdown began (qm_pg_ensure
   * refuses), so a few quick attempts are all there is. */
  int rc = QM_EIO;
  char errstr[512] = "";
  int n = 0;
  for (int attempt = 0; attempt < 3 && rc != QM_OK; attempt++) {
    if (attempt) qm_sleep_ms(200);
    rc = ckpt_step(c, &n, errstr, sizeof(errstr));
  }
  if (rc == QM_OK)
    qm_log_info("checkpoint at shutdown: %d chain head(s) signed with key %s", n, key_id);
  else
    qm_log_error("checkpoint at shutdown failed (%s: %s): the heads appended since the last "
                 "round are signed at the next start", qm_strerror(rc), errstr);
  return NULL;
}

int audit_ckpt_start(qm_service_t *svc, const chain_key_t *key, int64_t interval_ms,
                     audit_ckpt_t **out, char *errstr, size_t errstr_size) {
  audit_ckpt_t *c = qm_calloc(1, sizeof(*c));
  c->svc = svc;
  c->key = key;
  c->interval_ms = interval_ms > 0 ? interval_ms : 60000;
  pthread_mutex_init(&c->lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&c->cond, &ca);
  pthread_condattr_destroy(&ca);
  if (pthread_create(&c->thread, NULL, ckpt_thread, c) != 0) {
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
    free(c);
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the checkpoint thread");
  }
  *out = c;
  return QM_OK;
}

void audit_ckpt_set_retention(audit_ckpt_t *c, int64_t retention_ms, int64_t prune_interval_ms,
                              int64_t batch) {
  atomic_store(&c->prune_interval_ms, prune_interval_ms);
  atomic_store(&c->prune_batch, batch);
  atomic_store(&c->retention_ms, retention_ms);
}

void audit_ckpt_stop(audit_ckpt_t *c) {
  if (!c) return;
  pthread_mutex_lock(&c->lock);
  c->stop = true;
  pthread_cond_signal(&c->cond);
  pthread_mutex_unlock(&c->lock);
  pthread_join(c->thread, NULL);
  qm_pg_destroy(c->pg);
  pthread_cond_destroy(&c->cond);
  pthread_mutex_destroy(&c->lock);
  free(c);
}
