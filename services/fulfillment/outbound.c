/*
 * outbound: calls to procurement (purchase orders) and the carrier
 * (shipments), from a table written in the same transaction as the step
 * that wants the call, drained by worker threads with libcurl.
 *
 * Neither lost nor doubled: the row commits with the backorder (or the
 * staging) or not at all; a worker claims it with a lease (FOR UPDATE SKIP
 * LOCKED), POSTs it with "Idempotency-Key: <kind>-<ref>" and records the
 * outcome under "WHERE state = 'pending'", so exactly one transaction applies
 * the answer. A crash between the peer's answer and our COMMIT repeats the
 * call after the lease with the same key, which the peer deduplicates.
 * Network failures, 408, 429 and 5xx are retried with doubling backoff;
 * other 4xx park the call as failed (a person must look: it is logged with
 * what to do, and a purchase order shows status 'failed').
 */
#include "fulfillment.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OUT_BATCH 16

int ff_outbound_add(qm_pg_t *tx, const char *kind, const char *ref, json_t *body, char *errstr,
                    size_t errstr_size) {
  char *text = json_dumps(body, JSON_COMPACT);
  json_decref(body);
  qm_pg_param_t p[] = {QM_PG_TEXT(kind), QM_PG_TEXT(ref), QM_PG_TEXT(text)};
  int rc = qm_pg_exec(tx,
                      "INSERT INTO outbound (kind, ref, body) VALUES ($1, $2, $3::jsonb)"
                      " ON CONFLICT (kind, ref) DO NOTHING",
                      p, 3, NULL, errstr, errstr_size);
  free(text);
  return rc;
}

typedef struct out_call {
  int64_t id;
  char kind[32];
  char ref[128];
  char *body;
  int attempts;
} out_call_t;

typedef struct buf {
  char *p;
  size_t n;
} buf_t;

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud) {
  buf_t *b = ud;
  size_t n = size * nmemb;
  if (b->n + n > 1024 * 1024) return 0; /* a peer's answer has no business being this big */
  b->p = qm_realloc(b->p, b->n + n + 1);
  memcpy(b->p + b->n, ptr, n);
  b->n += n;
  b->p[b->n] = 0;
  return n;
}

/* POSTs body to url with the idempotency key. Returns the HTTP status (0
 * when no answer: why says why); *resp receives the body (caller frees). */
static long post(const char *url, const char *token, const char *key, const char *body,
                 int64_t timeout_ms, char **resp, char *why, size_t why_size) {
  CURL *h = curl_easy_init();
  if (!h) {
    qm_err(why, why_size, QM_EIO, "curl_easy_init failed");
    return 0;
  }
  struct curl_slist *hdr = NULL;
  char line[512];
  hdr = curl_slist_append(hdr, "Content-Type: application/json");
  hdr = curl_slist_append(hdr, "Accept: application/json");
  snprintf(line, sizeof(line), "Idempotency-Key: %s", key);
  hdr = curl_slist_append(hdr, line);
  if (token && *token) {
    snprintf(line, sizeof(line), "Authorization: Bearer %s", token);
    hdr = curl_slist_append(hdr, line);
  }
  buf_t b = {0};
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(timeout_ms < 5000 ? timeout_ms : 5000));
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  CURLcode cc = curl_easy_perform(h);
  long status = 0;
  if (cc == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  else qm_err(why, why_size, QM_EIO, "%s: %s", url, curl_easy_strerror(cc));
  curl_slist_free_all(hdr);
  curl_easy_cleanup(h);
  *resp = b.p ? b.p : qm_strdup("");
  return status;
}

static int claim(ff_t *ff, qm_pg_t *pg, out_call_t *calls) {
  const qm_config_t *cfg = qm_service_config(ff->svc);
  bool po = *qm_config_str(cfg, "QM_PROCUREMENT_URL") != 0;
  bool ship = *qm_config_str(cfg, "QM_CARRIER_URL") != 0;
  if (!po && !ship) return 0;
  qm_pg_param_t p[] = {QM_PG_INT64(qm_config_ms(cfg, "QM_OUTBOUND_LEASE")),
                       QM_PG_INT64(OUT_BATCH), QM_PG_TEXT(po ? "t" : "f"),
                       QM_PG_TEXT(ship ? "t" : "f")};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "UPDATE outbound o SET lease_until = now() + make_interval(secs => $1::bigint / 1000.0),"
                      " attempts = o.attempts + 1 WHERE o.id IN (SELECT id FROM outbound"
                      "  WHERE state = 'pending' AND next_attempt_at <= now()"
                      "  AND (lease_until IS NULL OR lease_until < now())"
                      "  AND ((kind = 'purchase_order' AND $3::boolean)"
                      "   OR (kind = 'shipment' AND $4::boolean))"
                      "  ORDER BY next_attempt_at, id LIMIT $2::int FOR UPDATE SKIP LOCKED)"
                      " RETURNING o.id, o.kind, o.ref, o.body::text, o.attempts",
                      p, 4, &res, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log_warn("outbound: claiming calls failed: %s (retrying)", errstr);
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 2000);
    return -1;
  }
  int n = qm_pg_ntuples(res);
  for (int i = 0; i < n; i++) {
    qm_pg_get_int64(res, i, 0, &calls[i].id);
    qm_strlcpy(calls[i].kind, qm_pg_get(res, i, 1), sizeof(calls[i].kind));
    qm_strlcpy(calls[i].ref, qm_pg_get(res, i, 2), sizeof(calls[i].ref));
    calls[i].body = qm_strdup(qm_pg_get(res, i, 3));
    int64_t a = 0;
    qm_pg_get_int64(res, i, 4, &a);
    calls[i].attempts = (int)a;
  }
  qm_pg_result_destroy(res);
  return n;
}

/* The answer of a 2xx, applied once (guarded by state = 'pending'). */
static int record_done(ff_t *ff, qm_pg_t *pg, const out_call_t *c, const char *resp,
                       char *errstr, size_t errstr_size) {
  json_t *j = json_loads(resp, 0, NULL);
  if (!json_is_object(j)) {
    json_decref(j);
    j = json_object();
  }
  char *text = json_dumps(j, JSON_COMPACT);
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  qm_pg_param_t p[] = {QM_PG_INT64(c->id), QM_PG_TEXT(text)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(pg,
                  "UPDATE outbound SET state = 'done', finished_at = now(), lease_until = NULL,"
                  " response = $2::jsonb, last_error = NULL WHERE id = $1::bigint AND state = 'pending'",
                  p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  int64_t won = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (won == 0) {
    qm_pg_rollback(pg, NULL, 0);
    goto out;
  }
  if (!strcmp(c->kind, "purchase_order")) {
    const char *ext = json_string_value(json_object_get(j, "id"));
    qm_pg_param_t q[] = {QM_PG_TEXT(c->ref), QM_PG_TEXT(ext)};
    rc = qm_pg_exec(pg,
                    "UPDATE purchase_orders SET status = CASE WHEN status = 'new' THEN 'sent'"
                    " ELSE status END, external_ref = coalesce($2, external_ref), updated_at = now()"
                    " WHERE po_id = $1",
                    q, 2, NULL, errstr, errstr_size);
  } else {
    const char *tracking = json_string_value(json_object_get(j, "tracking_number"));
    const char *label = json_string_value(json_object_get(j, "label_url"));
    const char *carrier = json_string_value(json_object_get(j, "carrier"));
    if (!tracking || !*tracking) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL,
                  "the carrier accepted shipment %s without a tracking_number", c->ref);
      goto fail;
    }
    rc = ff_shipment_created(ff, pg, c->ref,
                             carrier ? carrier
                                     : qm_config_str(qm_service_config(ff->svc), "QM_CARRIER_NAME"),
                             tracking, label ? label : "", errstr, errstr_size);
  }
  if (rc != QM_OK) goto fail;
  rc = qm_pg_commit(pg, errstr, errstr_size);
  if (rc == QM_OK) {
    qm_metrics_inc(qm_metrics_child(ff->m_calls, (const char *const[]){c->kind, "done", NULL}));
    qm_log_info("%s %s sent (attempt %d)", c->kind, c->ref, c->attempts);
  }
  goto out;
fail:
  qm_pg_rollback(pg, NULL, 0);
out:
  free(text);
  json_decref(j);
  return rc;
}

static int record_failed(ff_t *ff, qm_pg_t *pg, const out_call_t *c, bool retryable,
                         const char *why, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(ff->svc);
  int max = (int)qm_config_int(cfg, "QM_OUTBOUND_MAX_ATTEMPTS");
  if (retryable && c->attempts < max) {
    int64_t backoff = qm_config_ms(cfg, "QM_OUTBOUND_BACKOFF");
    for (int i = 1; i < c->attempts && backoff < 3600000; i++) backoff *= 2;
    if (backoff > 3600000) backoff = 3600000;
    qm_pg_param_t p[] = {QM_PG_INT64(c->id), QM_PG_INT64(backoff), QM_PG_TEXT(why)};
    qm_log_warn("%s %s: attempt %d of %d failed (%s); retrying in %lld ms", c->kind, c->ref,
                c->attempts, max, why, (long long)backoff);
    qm_metrics_inc(qm_metrics_child(ff->m_calls, (const char *const[]){c->kind, "retried", NULL}));
    return qm_pg_exec(pg,
                      "UPDATE outbound SET lease_until = NULL, last_error = $3,"
                      " next_attempt_at = now() + make_interval(secs => $2::bigint / 1000.0)"
                      " WHERE id = $1::bigint AND state = 'pending'",
                      p, 3, NULL, errstr, errstr_size);
  }
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_INT64(c->id), QM_PG_TEXT(why), QM_PG_TEXT(c->ref)};
  rc = qm_pg_exec(pg,
                  "WITH o AS (UPDATE outbound SET state = 'failed', finished_at = now(),"
                  " lease_until = NULL, last_error = $2 WHERE id = $1::bigint AND state = 'pending'"
                  " RETURNING kind)"
                  " UPDATE purchase_orders SET status = 'failed', updated_at = now() FROM o"
                  " WHERE o.kind = 'purchase_order' AND po_id = $3",
                  p, 3, NULL, errstr, errstr_size);
  if (rc == QM_OK) rc = qm_pg_commit(pg, errstr, errstr_size);
  else qm_pg_rollback(pg, NULL, 0);
  if (rc == QM_OK) {
    qm_metrics_inc(qm_metrics_child(ff->m_calls, (const char *const[]){c->kind, "parked", NULL}));
    qm_log_error("%s %s parked after %d attempt(s): %s; fix the cause, then set the row of "
                 "table outbound back to state 'pending' to send it again",
                 c->kind, c->ref, c->attempts, why);
  }
  return rc;
}

static void send_call(ff_t *ff, qm_pg_t *pg, const out_call_t *c) {
  const qm_config_t *cfg = qm_service_config(ff->svc);
  bool po = !strcmp(c->kind, "purchase_order");
  char url[1024], key[192], why[1600] = "";
  snprintf(url, sizeof(url), "%s%s", qm_config_str(cfg, po ? "QM_PROCUREMENT_URL" : "QM_CARRIER_URL"),
           po ? "/purchase-orders" : "/shipments");
  snprintf(key, sizeof(key), "%s-%s", c->kind, c->ref);
  char *resp = NULL;
  long status = post(url, qm_config_str(cfg, po ? "QM_PROCUREMENT_TOKEN" : "QM_CARRIER_TOKEN"),
                     key, c->body, qm_config_ms(cfg, "QM_OUTBOUND_TIMEOUT"), &resp, why,
                     sizeof(why));
  char errstr[512] = "";
  int rc;
  if (status >= 200 && status < 300) {
    rc = record_done(ff, pg, c, resp, errstr, sizeof(errstr));
    if (rc == QM_EINVAL) { /* a 2xx we cannot use (no tracking number): a peer bug */
      snprintf(why, sizeof(why), "%s", errstr);
      rc = record_failed(ff, pg, c, true, why, errstr, sizeof(errstr));
    }
  } else {
    if (status) snprintf(why, sizeof(why), "%s answered %ld: %.300s", url, status, resp);
    bool retryable = status == 0 || status == 408 || status == 429 || status >= 500;
    rc = record_failed(ff, pg, c, retryable, why, errstr, sizeof(errstr));
  }
  free(resp);
  if (rc != QM_OK) {
    qm_log_warn("recording the outcome of %s %s failed (%s); it is retried after its lease",
                c->kind, c->ref, errstr);
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
  }
}

static void *worker_main(void *arg) {
  ff_t *ff = arg;
  int64_t poll = qm_config_ms(qm_service_config(ff->svc), "QM_FULFILLMENT_POLL");
  char errstr[512];
  qm_pg_t *pg = NULL;
  while (!pg && !atomic_load(&ff->stopping)) {
    pg = qm_pg_connect_app(qm_service_dsn(ff->svc), "fulfillment", "qm-fulfillment-outbound",
                           errstr, sizeof(errstr));
    if (!pg) {
      qm_log_warn("outbound worker: PostgreSQL: %s (retrying)", errstr);
      qm_sleep_ms(1000);
    }
  }
  out_call_t calls[OUT_BATCH];
  while (pg && !atomic_load(&ff->stopping) && !qm_shutdown_requested()) {
    int n = claim(ff, pg, calls);
    for (int i = 0; i < n; i++) {
      if (!atomic_load(&ff->stopping)) send_call(ff, pg, &calls[i]);
      else { /* hand it back at once */
        qm_pg_param_t p[] = {QM_PG_INT64(calls[i].id)};
        qm_pg_exec(pg,
                   "UPDATE outbound SET lease_until = NULL, attempts = attempts - 1"
                   " WHERE id = $1::bigint AND state = 'pending'",
                   p, 1, NULL, errstr, sizeof(errstr));
      }
      free(calls[i].body);
    }
    if (n <= 0) {
      int64_t until = qm_mono_ms() + poll;
      while (qm_mono_ms() < until && !atomic_load(&ff->stopping) && !qm_shutdown_requested())
        qm_sleep_ms(5);
    }
  }
  qm_pg_destroy(pg);
  return NULL;
}

/* The stock-level round: every QM_STOCK_LEVEL_INTERVAL, the noted changes
 * become StockLevel events (one per model and site, as it is then). */
static void *stock_main(void *arg) {
  ff_t *ff = arg;
  int64_t every = qm_config_ms(qm_service_config(ff->svc), "QM_STOCK_LEVEL_INTERVAL");
  char errstr[512];
  qm_pg_t *pg = NULL;
  while (!atomic_load(&ff->stopping) && !qm_shutdown_requested()) {
    if (!pg) {
      pg = qm_pg_connect_app(qm_service_dsn(ff->svc), "fulfillment", "qm-fulfillment-stock", errstr,
                             sizeof(errstr));
      if (!pg) {
        qm_log_warn("stock levels: PostgreSQL: %s (retrying)", errstr);
        qm_sleep_ms(1000);
        continue;
      }
    }
    int n = 0;
    int rc = qm_pg_begin(pg, errstr, sizeof(errstr));
    if (rc == QM_OK) rc = ff_stock_publish(ff, pg, &n, errstr, sizeof(errstr));
    if (rc == QM_OK) rc = qm_pg_commit(pg, errstr, sizeof(errstr));
    else qm_pg_rollback(pg, NULL, 0);
    if (rc != QM_OK) {
      qm_log_warn("stock levels: %s (next round)", errstr);
      if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
    }
    int64_t until = qm_mono_ms() + every;
    while (qm_mono_ms() < until && !atomic_load(&ff->stopping) && !qm_shutdown_requested())
      qm_sleep_ms(5);
  }
  qm_pg_destroy(pg);
  return NULL;
}

int ff_outbound_start(ff_t *ff, char *errstr, size_t errstr_size) {
  if (pthread_create(&ff->stock_thread, NULL, stock_main, ff) != 0)
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the stock-level thread");
  ff->stock_running = true;
  size_t n = (size_t)qm_config_int(qm_service_config(ff->svc), "QM_FULFILLMENT_WORKERS");
  for (size_t i = 0; i < n; i++) {
    if (pthread_create(&ff->workers[i], NULL, worker_main, ff) != 0) {
      ff_outbound_stop(ff);
      return qm_err(errstr, errstr_size, QM_EIO, "cannot start outbound worker %zu", i);
    }
    ff->n_workers++;
  }
  return QM_OK;
}

void ff_outbound_stop(ff_t *ff) {
  atomic_store(&ff->stopping, true);
  for (size_t i = 0; i < ff->n_workers; i++) pthread_join(ff->workers[i], NULL);
  ff->n_workers = 0;
  if (ff->stock_running) pthread_join(ff->stock_thread, NULL);
  ff->stock_running = false;
}
