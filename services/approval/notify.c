/*
 * notify: webhook notifications that never block a decision.
 *
 * A decision, a new step, a reminder or an escalation writes a row to the
 * notifications table in its own transaction (so a notification exists if
 * and only if what it announces committed). A worker thread per instance
 * drains the table: it locks a few due rows (FOR UPDATE SKIP LOCKED, so
 * instances share the work), POSTs each as Slack incoming-webhook JSON
 * ({"text": ..., "blocks": [...]}) with libcurl, and marks it sent, or
 * schedules a retry with exponential backoff, or gives up after
 * QM_APPROVAL_WEBHOOK_MAX_ATTEMPTS (marked failed, logged). A receiver that
 * is down or slow delays only its notifications, never a decision.
 */
#include "approval.h"

#include "qm_common.h"
#include "qm_log.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOTIFY_BATCH 10
#define NOTIFY_IDLE_MS 200
#define NOTIFY_BACKOFF_MAX_MS (10 * 60 * 1000)

int notify_add(approval_t *ap, qm_pg_t *tx, const char *kind, const char *request_id,
               const char *const *recipients, size_t n, const char *text, char *errstr,
               size_t errstr_size) {
  if (!ap->webhook_url) return QM_OK;
  json_t *to = json_array();
  for (size_t i = 0; i < n; i++) {
    if (!recipients[i] || !recipients[i][0]) continue;
    bool dup = false;
    for (size_t j = 0; j < json_array_size(to); j++)
      if (!strcmp(json_string_value(json_array_get(to, j)), recipients[i])) dup = true;
    if (!dup) json_array_append_new(to, json_string(recipients[i]));
  }
  if (json_array_size(to) == 0) {
    json_decref(to);
    return QM_OK;
  }
  /* Slack incoming-webhook JSON: text for notifications and fallbacks, one
   * mrkdwn section block for the message itself. */
  json_t *body = json_pack("{s:s, s:[{s:s, s:{s:s, s:s}}]}", "text", text, "blocks", "type",
                           "section", "text", "type", "mrkdwn", "text", text);
  char *body_s = json_dumps(body, JSON_COMPACT);
  char *to_s = NULL;
  {
    /* text[] literal of the recipients (plain ids, quoted). */
    size_t cap = 3;
    for (size_t i = 0; i < json_array_size(to); i++)
      cap += strlen(json_string_value(json_array_get(to, i))) * 2 + 3;
    to_s = qm_calloc(1, cap);
    size_t len = 0;
    to_s[len++] = '{';
    for (size_t i = 0; i < json_array_size(to); i++) {
      if (i) to_s[len++] = ',';
      to_s[len++] = '"';
      for (const char *p = json_string_value(json_array_get(to, i)); *p; p++) {
        if (*p == '"' || *p == '\\') to_s[len++] = '\\';
        to_s[len++] = *p;
      }
      to_s[len++] = '"';
    }
    to_s[len++] = '}';
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(kind), request_id ? QM_PG_TEXT(request_id) : QM_PG_NULL,
                       QM_PG_TEXT(to_s), QM_PG_TEXT(body_s), QM_PG_INT64(qm_now_ms())};
  int rc = qm_pg_exec(tx,
                      "INSERT INTO notifications (kind, request_id, recipients, body, next_at_ms)"
                      " VALUES ($1, $2, $3::text[], $4, $5)",
                      p, 5, NULL, errstr, errstr_size);
  free(to_s);
  free(body_s);
  json_decref(body);
  json_decref(to);
  return rc;
}

static size_t discard(char *ptr, size_t size, size_t nmemb, void *ud) {
  QM_UNUSED(ptr);
  QM_UNUSED(ud);
  return size * nmemb;
}

/* POSTs body; QM_OK on a 2xx answer, else QM_EIO with the reason. */
static int post(approval_t *ap, CURL *curl, const char *body, char *errstr, size_t errstr_size) {
  struct curl_slist *hdrs = curl_slist_append(NULL, "Content-Type: application/json");
  char cerr[CURL_ERROR_SIZE] = "";
  curl_easy_reset(curl);
  curl_easy_setopt(curl, CURLOPT_URL, ap->webhook_url);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)ap->webhook_timeout_ms);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, (long)ap->webhook_timeout_ms);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, cerr);
  CURLcode cc = curl_easy_perform(curl);
  long status = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(hdrs);
  if (cc != CURLE_OK)
    return qm_err(errstr, errstr_size, QM_EIO, "webhook: %s",
                  cerr[0] ? cerr : curl_easy_strerror(cc));
  if (status < 200 || status > 299)
    return qm_err(errstr, errstr_size, QM_EIO, "webhook answered HTTP %ld", status);
  return QM_OK;
}

static void count(approval_t *ap, const char *outcome) {
  const char *lv[] = {outcome};
  qm_metrics_inc(qm_metrics_child(ap->m_notifications, lv));
}

/* One round: up to NOTIFY_BATCH due rows. Returns how many were tried. */
static int notify_round(approval_t *ap, CURL *curl) {
  qm_pg_t *pg = NULL;
  char errstr[512];
  if (qm_pg_pool_acquire(qm_service_pool(ap->svc), 2000, &pg) != QM_OK) return 0;
  int tried = 0;
  qm_pg_result_t *res = NULL;
  if (qm_pg_begin(pg, errstr, sizeof(errstr)) != QM_OK) goto out;
  char lim[8];
  snprintf(lim, sizeof(lim), "%d", NOTIFY_BATCH);
  qm_pg_param_t p[] = {QM_PG_INT64(qm_now_ms()), QM_PG_TEXT(lim)};
  if (qm_pg_exec(pg,
                 "SELECT id, body, attempts, kind FROM notifications WHERE status = 'pending'"
                 " AND next_at_ms <= $1 ORDER BY next_at_ms, id LIMIT $2::int"
                 " FOR UPDATE SKIP LOCKED",
                 p, 2, &res, errstr, sizeof(errstr)) != QM_OK)
    goto rollback;
  for (int i = 0; i < qm_pg_ntuples(res); i++) {
    const char *id = qm_pg_get(res, i, 0);
    int attempts = atoi(qm_pg_get(res, i, 2)) + 1;
    char why[400] = "";
    int rc = post(ap, curl, qm_pg_get(res, i, 1), why, sizeof(why));
    tried++;
    int prc;
    if (rc == QM_OK) {
      qm_pg_param_t pu[] = {QM_PG_TEXT(id), QM_PG_INT64(attempts)};
      prc = qm_pg_exec(pg,
                       "UPDATE notifications SET status = 'sent', attempts = $2::int,"
                       " sent_at = now(), last_error = NULL WHERE id = $1::bigint",
                       pu, 2, NULL, errstr, sizeof(errstr));
      count(ap, "sent");
    } else {
      bool give_up = attempts >= ap->webhook_max_attempts;
      int64_t delay = ap->webhook_backoff_ms;
      for (int k = 1; k < attempts && delay < NOTIFY_BACKOFF_MAX_MS; k++) delay *= 2;
      if (delay > NOTIFY_BACKOFF_MAX_MS) delay = NOTIFY_BACKOFF_MAX_MS;
      qm_pg_param_t pu[] = {QM_PG_TEXT(id), QM_PG_INT64(attempts),
                            QM_PG_TEXT(give_up ? "failed" : "pending"),
                            QM_PG_INT64(qm_now_ms() + delay), QM_PG_TEXT(why)};
      prc = qm_pg_exec(pg,
                       "UPDATE notifications SET status = $3, attempts = $2::int,"
                       " next_at_ms = $4, last_error = $5 WHERE id = $1::bigint",
                       pu, 5, NULL, errstr, sizeof(errstr));
      count(ap, give_up ? "failed" : "retry");
      if (give_up)
        qm_log_error("notification %s (%s) given up after %d attempts: %s — check "
                     "QM_APPROVAL_WEBHOOK_URL and the receiver",
                     id, qm_pg_get(res, i, 3), attempts, why);
      else
        qm_log_warn("notification %s (%s) failed (attempt %d): %s; retrying in %lld ms", id,
                    qm_pg_get(res, i, 3), attempts, why, (long long)delay);
    }
    if (prc != QM_OK) goto rollback;
  }
  if (qm_pg_commit(pg, errstr, sizeof(errstr)) == QM_OK) goto out;
rollback:
  qm_log_warn("notifications: %s; will retry", errstr);
  qm_pg_rollback(pg, NULL, 0);
out:
  qm_pg_result_destroy(res);
  qm_pg_pool_release(qm_service_pool(ap->svc), pg);
  return tried;
}

static void *notify_main(void *arg) {
  approval_t *ap = arg;
  CURL *curl = curl_easy_init();
  while (!atomic_load(&ap->stopping) && !qm_shutdown_requested()) {
    if (notify_round(ap, curl) == 0) qm_sleep_ms(NOTIFY_IDLE_MS);
  }
  curl_easy_cleanup(curl);
  return NULL;
}

int notify_start(approval_t *ap) {
  if (!ap->webhook_url) return QM_OK;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (pthread_create(&ap->notifier, NULL, notify_main, ap) != 0) return QM_EIO;
  ap->notifier_running = true;
  return QM_OK;
}

void notify_stop(approval_t *ap) {
  if (!ap->notifier_running) return;
  atomic_store(&ap->stopping, true);
  pthread_join(ap->notifier, NULL);
  ap->notifier_running = false;
}
