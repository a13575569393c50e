/*
 * notify: webhook notifications that never block a decision.
 *
 * A decision, a new step, a reminder or an escalation writes a row to the
 * notifications table in its own transaction (so a notification exists if
 * and only if what it announces committed). A worker thread per instance
 * drains the table on a database connection of its own (never one of the
 * HTTP handlers' pool): it claims a few due rows in one committed statement,
 * each with a lease (held by its session and a token; instances share the
 * work, and a crashed notifier's rows are taken over once its session is
 * gone or the lease ran out), then, with no transaction open, POSTs each as
 * Slack incoming-webhook JSON ({"text": ..., "blocks": [...]}) with libcurl
 * and records the outcome in its own statement guarded by status = 'pending'
 * and the lease token: sent, or a retry with exponential backoff, or given
 * up after QM_APPROVAL_WEBHOOK_MAX_ATTEMPTS (marked failed, logged). A
 * receiver that is down or slow delays only its notifications, never a
 * decision nor an API call; a notification that was POSTed and recorded is
 * never posted again.
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
#define NOTIFY_LEASE_MARGIN_MS 10000

/* text with Slack's control characters escaped (&amp; &lt; &gt;, per
 * api.slack.com/reference/surfaces/formatting#escaping), so what people
 * wrote (a denial's comment, a break-glass justification) is shown as
 * written and never read as a mention (<!channel>) or a link. The texts
 * built here carry no markup of their own. Caller frees. */
static char *slack_escape(const char *text) {
  size_t cap = 1;
  for (const char *p = text; *p; p++) cap += *p == '&' ? 5 : (*p == '<' || *p == '>') ? 4 : 1;
  char *out = qm_calloc(1, cap), *o = out;
  for (const char *p = text; *p; p++) {
    const char *e = *p == '&' ? "&amp;" : *p == '<' ? "&lt;" : *p == '>' ? "&gt;" : NULL;
    if (e) {
      memcpy(o, e, strlen(e));
      o += strlen(e);
    } else {
      *o++ = *p;
    }
  }
  return out;
}

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
  char *esc = slack_escape(text);
  json_t *body = json_pack("{s:s, s:[{s:s, s:{s:s, s:s}}]}", "text", esc, "blocks", "type",
                           "section", "text", "type", "mrkdwn", "text", esc);
  free(esc);
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

/* How long a notifier holds the rows it claimed: long enough to POST the
 * whole batch, each within QM_APPROVAL_WEBHOOK_TIMEOUT, and record it. */
static int64_t lease_ms(const approval_t *ap) {
  return NOTIFY_BATCH * ap->webhook_timeout_ms + NOTIFY_LEASE_MARGIN_MS;
}

/* Claims up to NOTIFY_BATCH due rows in one committed statement: each gets
 * a lease (until now + lease_ms(), held by this session and by tok) and one
 * more attempt. A row is due when pending, its time has come and nobody holds
 * it: no lease, a lease run out, or one whose session is gone (a notifier
 * that crashed). *res: id, body, attempts, kind. Returns QM_OK or the error
 * of qm_pg_exec() (logged). */
static int claim(approval_t *ap, qm_pg_t *pg, const char *tok, qm_pg_result_t **res) {
  char errstr[512];
  qm_pg_param_t p[] = {QM_PG_INT64(qm_now_ms()), QM_PG_INT64(NOTIFY_BATCH),
                       QM_PG_INT64(lease_ms(ap)), QM_PG_TEXT(tok)};
  int rc = qm_pg_exec(
      pg,
      "WITH c AS (UPDATE notifications SET attempts = attempts + 1, lease_token = $4,"
      " lease_until = now() + make_interval(secs => $3::bigint / 1000.0),"
      " lease_pid = pg_backend_pid(), lease_backend_start = (SELECT backend_start"
      "  FROM pg_stat_activity WHERE pid = pg_backend_pid())"
      " WHERE id IN (SELECT n.id FROM notifications n WHERE n.status = 'pending'"
      "  AND n.next_at_ms <= $1 AND (n.lease_until IS NULL OR n.lease_until < now()"
      "   OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = n.lease_pid"
      "    AND a.backend_start = n.lease_backend_start))"
      "  ORDER BY n.next_at_ms, n.id LIMIT $2::int FOR UPDATE SKIP LOCKED)"
      " RETURNING id, body, attempts, kind)"
      " SELECT id, body, attempts, kind FROM c ORDER BY id",
      p, 4, res, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
    qm_log_warn("notifications: claiming failed: %s (retrying)", errstr);
  }
  return rc;
}

/* Runs one statement that records what became of a claimed row (its own
 * short transaction, no HTTP call inside), retrying over a reconnect until
 * the lease would run out. *won: false when the row was no longer ours. */
static int record(approval_t *ap, qm_pg_t *pg, const char *sql, const qm_pg_param_t *p, int np,
                  bool *won, char *errstr, size_t errstr_size) {
  int64_t deadline = qm_mono_ms() + lease_ms(ap);
  for (;;) {
    qm_pg_result_t *res = NULL;
    int rc = qm_pg_exec(pg, sql, p, np, &res, errstr, errstr_size);
    *won = rc == QM_OK && qm_pg_affected(res) > 0;
    qm_pg_result_destroy(res);
    if (rc != QM_ETRANSIENT || qm_mono_ms() >= deadline) return rc;
    if (qm_pg_ensure(pg, deadline) != QM_OK) return rc;
  }
}

/* POSTs one claimed row and records the outcome, guarded by
 * status = 'pending' and our lease token. */
static void deliver(approval_t *ap, qm_pg_t *pg, CURL *curl, const char *tok,
                    const qm_pg_result_t *res, int i) {
  const char *id = qm_pg_get(res, i, 0), *kind = qm_pg_get(res, i, 3);
  int attempts = atoi(qm_pg_get(res, i, 2));
  char why[400] = "", errstr[512] = "";
  bool won = false;
  int prc;
  if (post(ap, curl, qm_pg_get(res, i, 1), why, sizeof(why)) == QM_OK) {
    qm_pg_param_t pu[] = {QM_PG_TEXT(id), QM_PG_TEXT(tok)};
    prc = record(ap, pg,
                 "UPDATE notifications SET status = 'sent', sent_at = now(), last_error = NULL,"
                 " lease_until = NULL, lease_token = NULL"
                 " WHERE id = $1::bigint AND status = 'pending' AND lease_token = $2",
                 pu, 2, &won, errstr, sizeof(errstr));
    count(ap, "sent");
  } else {
    bool give_up = attempts >= ap->webhook_max_attempts;
    int64_t delay = ap->webhook_backoff_ms;
    for (int k = 1; k < attempts && delay < NOTIFY_BACKOFF_MAX_MS; k++) delay *= 2;
    if (delay > NOTIFY_BACKOFF_MAX_MS) delay = NOTIFY_BACKOFF_MAX_MS;
    qm_pg_param_t pu[] = {QM_PG_TEXT(id), QM_PG_TEXT(tok), QM_PG_TEXT(give_up ? "failed" : "pending"),
                          QM_PG_INT64(qm_now_ms() + delay), QM_PG_TEXT(why)};
    prc = record(ap, pg,
                 "UPDATE notifications SET status = $3, next_at_ms = $4, last_error = $5,"
                 " lease_until = NULL, lease_token = NULL"
                 " WHERE id = $1::bigint AND status = 'pending' AND lease_token = $2",
                 pu, 5, &won, errstr, sizeof(errstr));
    count(ap, give_up ? "failed" : "retry");
    if (give_up)
      qm_log_error("notification %s (%s) given up after %d attempts: %s — check "
                   "QM_APPROVAL_WEBHOOK_URL and the receiver",
                   id, kind, attempts, why);
    else
      qm_log_warn("notification %s (%s) failed (attempt %d): %s; retrying in %lld ms", id, kind,
                  attempts, why, (long long)delay);
  }
  if (prc != QM_OK)
    qm_log_warn("notification %s (%s): recording the outcome failed (%s); it is tried again "
                "after its lease",
                id, kind, errstr);
  else if (!won)
    qm_log_warn("notification %s (%s): its lease had run out and another notifier took it", id,
                kind);
}

/* One round: claims up to NOTIFY_BATCH due rows, then POSTs and records
 * them one by one with no transaction open. Returns how many were claimed. */
static int notify_round(approval_t *ap, qm_pg_t *pg, CURL *curl) {
  char tok[QM_UUID_STR_LEN];
  qm_uuid_new(tok);
  qm_pg_result_t *res = NULL;
  if (claim(ap, pg, tok, &res) != QM_OK) return 0;
  int n = qm_pg_ntuples(res), i = 0;
  for (; i < n && !atomic_load(&ap->stopping) && !qm_shutdown_requested(); i++)
    deliver(ap, pg, curl, tok, res, i);
  qm_pg_result_destroy(res);
  if (i < n) {
    /* Shutdown: what was claimed but not posted goes back at once, its
     * attempt not counted, instead of waiting out the lease. */
    char errstr[256];
    qm_pg_param_t p[] = {QM_PG_TEXT(tok)};
    qm_pg_exec(pg,
               "UPDATE notifications SET lease_until = NULL, lease_token = NULL,"
               " attempts = attempts - 1 WHERE lease_token = $1 AND status = 'pending'",
               p, 1, NULL, errstr, sizeof(errstr));
  }
  return n;
}

/* The notifier has a connection of its own: a slow receiver never holds
 * one of the HTTP handlers' pooled connections. */
static void *notify_main(void *arg) {
  approval_t *ap = arg;
  CURL *curl = curl_easy_init();
  char errstr[512];
  qm_pg_t *pg = NULL;
  while (!pg && !atomic_load(&ap->stopping) && !qm_shutdown_requested()) {
    pg = qm_pg_connect_app(qm_service_dsn(ap->svc), qm_service_name(ap->svc),
                           "qm-approval-notifier", errstr, sizeof(errstr));
    if (!pg) {
      qm_log_warn("notifier: PostgreSQL: %s (retrying)", errstr);
      qm_sleep_ms(1000);
    }
  }
  while (pg && !atomic_load(&ap->stopping) && !qm_shutdown_requested()) {
    if (notify_round(ap, pg, curl) == 0) qm_sleep_ms(NOTIFY_IDLE_MS);
  }
  qm_pg_destroy(pg);
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
