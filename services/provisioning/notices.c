/*
 * notices: delivery of expiry notices to QM_EXPIRY_WEBHOOK_URL.
 *
 * The "notice" timer only records a notice (scheduler.c): a row of
 * expiry_notices plus ExpiryNotice through the outbox, in the timer's short
 * transaction. Nothing waits on the receiver there, so a slow or down
 * receiver never holds a grant row locked (a leaver's revocations and the
 * HR consumer go on) and a timer lease never runs out mid-POST.
 *
 * A sender thread with a connection of its own delivers the rows, outside
 * any transaction:
 *  1. claim: one committed UPDATE ... FOR UPDATE SKIP LOCKED sets a lease
 *     (the webhook timeout plus a margin) and counts the attempt, so another
 *     instance takes a row over only when the lease has run out;
 *  2. POST with "Idempotency-Key: <grant_id>:<expires_at_ms>" — the same on
 *     every attempt, so a receiver deduplicates the repeat after a crash
 *     between its answer and our record;
 *  3. record the outcome in a statement of its own, guarded by
 *     "state = 'pending' AND attempts = <ours>" (a sender whose lease ran out
 *     and was taken over records nothing). A failure is retried after
 *     QM_EXPIRY_WEBHOOK_BACKOFF, doubling up to 10 minutes; after
 *     QM_EXPIRY_WEBHOOK_ATTEMPTS it is parked as 'failed' and logged.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOTICE_BATCH 16
#define NOTICE_BACKOFF_MAX_MS 600000

int prov_notice_add(qm_pg_t *tx, const char *grant_id, int64_t expires_ms, const char *body,
                    char *errstr, size_t errstr_size) {
  char idem[128];
  snprintf(idem, sizeof(idem), "%s:%lld", grant_id, (long long)expires_ms);
  qm_pg_param_t p[] = {QM_PG_TEXT(grant_id), QM_PG_INT64(expires_ms), QM_PG_TEXT(idem),
                       QM_PG_TEXT(body)};
  return qm_pg_exec(tx,
                    "INSERT INTO expiry_notices (grant_id, expires_at_ms, idempotency_key, body)"
                    " VALUES ($1, $2::bigint, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING",
                    p, 4, NULL, errstr, errstr_size);
}

static size_t discard(char *p, size_t s, size_t n, void *u) {
  QM_UNUSED(p);
  QM_UNUSED(u);
  return s * n;
}

/* POSTs one notice. QM_OK on 2xx, QM_ETRANSIENT otherwise (errstr says why). */
static int webhook_post(prov_t *prov, const char *url, const char *body, const char *idem,
                        char *errstr, size_t errstr_size) {
  CURL *curl = curl_easy_init();
  if (!curl) return qm_err(errstr, errstr_size, QM_ETRANSIENT, "curl_easy_init failed");
  struct curl_slist *h = NULL;
  h = curl_slist_append(h, "Content-Type: application/json");
  char idh[256];
  snprintf(idh, sizeof(idh), "Idempotency-Key: %s", idem);
  h = curl_slist_append(h, idh);
  curl_easy_setopt(curl, CURLOPT_URL, url);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)prov->webhook_timeout_ms);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
  CURLcode cc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(h);
  curl_easy_cleanup(curl);
  if (cc != CURLE_OK)
    return qm_err(errstr, errstr_size, QM_ETRANSIENT, "expiry webhook %s: %s", url,
                  curl_easy_strerror(cc));
  if (status < 200 || status > 299)
    return qm_err(errstr, errstr_size, QM_ETRANSIENT, "expiry webhook %s answered %ld", url,
                  status);
  return QM_OK;
}

typedef struct notice {
  int64_t id;
  int attempts;
  char grant_id[40];
  char idem[128];
  char *body;
} notice_t;

/* Claims up to NOTICE_BATCH due notices in one committed statement. Returns
 * how many, or -1. */
static int claim(prov_t *prov, qm_pg_t *pg, notice_t *out) {
  qm_pg_param_t p[] = {QM_PG_INT64(prov->webhook_timeout_ms + 30000), QM_PG_INT64(NOTICE_BATCH)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(
      pg,
      "UPDATE expiry_notices n SET lease_until = now() + make_interval(secs => $1::bigint / 1000.0),"
      " attempts = n.attempts + 1 WHERE n.id IN (SELECT id FROM expiry_notices"
      "  WHERE state = 'pending' AND next_attempt_at <= now()"
      "  AND (lease_until IS NULL OR lease_until < now())"
      "  ORDER BY next_attempt_at, id LIMIT $2::int FOR UPDATE SKIP LOCKED)"
      " RETURNING n.id, n.attempts, n.grant_id, n.idempotency_key, n.body",
      p, 2, &res, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log_warn("expiry notices: claiming failed: %s (retrying)", errstr);
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 2000);
    return -1;
  }
  int n = qm_pg_ntuples(res);
  for (int i = 0; i < n; i++) {
    int64_t a = 0;
    qm_pg_get_int64(res, i, 0, &out[i].id);
    qm_pg_get_int64(res, i, 1, &a);
    out[i].attempts = (int)a;
    qm_strlcpy(out[i].grant_id, qm_pg_get(res, i, 2), sizeof(out[i].grant_id));
    qm_strlcpy(out[i].idem, qm_pg_get(res, i, 3), sizeof(out[i].idem));
    out[i].body = qm_strdup(qm_pg_get(res, i, 4));
  }
  qm_pg_result_destroy(res);
  return n;
}

/* Records one attempt's outcome (why NULL: delivered). A statement of its
 * own, guarded by the attempt we claimed. */
static void record(prov_t *prov, qm_pg_t *pg, const notice_t *n, const char *why) {
  const qm_config_t *cfg = qm_service_config(prov->svc);
  int64_t max_attempts = qm_config_int(cfg, "QM_EXPIRY_WEBHOOK_ATTEMPTS");
  bool park = why && n->attempts >= max_attempts;
  int64_t backoff = qm_config_ms(cfg, "QM_EXPIRY_WEBHOOK_BACKOFF");
  for (int i = 1; i < n->attempts && backoff < NOTICE_BACKOFF_MAX_MS; i++) backoff *= 2;
  if (backoff > NOTICE_BACKOFF_MAX_MS) backoff = NOTICE_BACKOFF_MAX_MS;
  const char *state = !why ? "sent" : park ? "failed" : "pending";
  qm_pg_param_t p[] = {QM_PG_INT64(n->id), QM_PG_INT64(n->attempts), QM_PG_TEXT(state),
                       why ? QM_PG_TEXT(why) : QM_PG_NULL, QM_PG_INT64(backoff)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "UPDATE expiry_notices SET state = $3, last_error = $4, lease_until = NULL,"
                      " sent_at = CASE WHEN $3 = 'sent' THEN now() END,"
                      " next_attempt_at = now() + make_interval(secs => $5::bigint / 1000.0)"
                      " WHERE id = $1::bigint AND state = 'pending' AND attempts = $2::int",
                      p, 5, &res, errstr, sizeof(errstr));
  bool won = rc == QM_OK && qm_pg_affected(res) > 0;
  qm_pg_result_destroy(res);
  if (rc != QM_OK) {
    /* The lease runs out and the notice is sent again, with the same key. */
    qm_log_warn("expiry notice of grant %s: recording the outcome failed: %s (resent after its "
                "lease)", n->grant_id, errstr);
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 2000);
    return;
  }
  if (!won) return; /* taken over after our lease ran out: the other sender records it */
  const char *outcome = !why ? "sent" : park ? "parked" : "failed";
  qm_metrics_inc(qm_metrics_child(prov->m_notices, (const char *const[]){outcome}));
  if (!why)
    qm_log_info("expiry notice of grant %s delivered (attempt %d)", n->grant_id, n->attempts);
  else if (park)
    qm_log(QM_LOG_ERROR, NULL, NULL,
           "expiry notice of grant %s parked after %d attempt(s): %s; fix the receiver, then "
           "UPDATE provisioning.expiry_notices SET state = 'pending', attempts = 0,"
           " next_attempt_at = now() WHERE id = %lld",
           n->grant_id, n->attempts, why, (long long)n->id);
  else
    qm_log_warn("expiry notice of grant %s: %s; attempt %d, retried in %lld ms (check the "
                "receiver)", n->grant_id, why, n->attempts, (long long)backoff);
}

static void *sender_main(void *arg) {
  prov_t *prov = arg;
  const qm_config_t *cfg = qm_service_config(prov->svc);
  const char *url = qm_config_str(cfg, "QM_EXPIRY_WEBHOOK_URL");
  int64_t poll = qm_config_ms(cfg, "QM_PROVISIONING_TICK");
  char errstr[512];
  qm_pg_t *pg = NULL;
  static __thread notice_t batch[NOTICE_BATCH];
  while (!atomic_load(&prov->stopping) && !qm_shutdown_requested()) {
    if (!pg) {
      pg = qm_pg_connect_app(qm_service_dsn(prov->svc), "provisioning",
                             "qm-provisioning-notices", errstr, sizeof(errstr));
      if (!pg) {
        qm_log_warn("expiry notices: PostgreSQL: %s (retrying)", errstr);
        qm_sleep_ms(1000);
        continue;
      }
    }
    int n = claim(prov, pg, batch);
    for (int i = 0; i < n; i++) {
      char why[512] = "";
      int rc = webhook_post(prov, url, batch[i].body, batch[i].idem, why, sizeof(why));
      record(prov, pg, &batch[i], rc == QM_OK ? NULL : why);
      free(batch[i].body);
      batch[i].body = NULL;
    }
    if (n < NOTICE_BATCH) {
      int64_t until = qm_mono_ms() + poll;
      while (qm_mono_ms() < until && !atomic_load(&prov->stopping) && !qm_shutdown_requested())
        qm_sleep_ms(10);
    }
  }
  qm_pg_destroy(pg);
  return NULL;
}

int prov_notices_start(prov_t *prov, char *errstr, size_t errstr_size) {
  const char *url = qm_config_str(qm_service_config(prov->svc), "QM_EXPIRY_WEBHOOK_URL");
  if (!url || !*url) return QM_OK; /* notices are events only */
  if (pthread_create(&prov->notifier, NULL, sender_main, prov) != 0)
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the expiry notice sender");
  prov->notifier_running = true;
  return QM_OK;
}

void prov_notices_stop(prov_t *prov) {
  atomic_store(&prov->stopping, true);
  if (prov->notifier_running) pthread_join(prov->notifier, NULL);
  prov->notifier_running = false;
}
