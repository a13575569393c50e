/*
 * qm_outbox: appending events to the outbox table inside the caller's
 * transaction, and the relay that publishes committed rows exactly in the
 * order of their ids, one leader per schema. See qm_outbox.h for contracts.
 *
 * The relay is a loop of steps (relay_step()); the thread only adds waiting
 * (NOTIFY, poll interval, lock retry, error backoff) and the stop/drain logic
 * around it, and tests drive the very same step through qm_relay_run_once().
 */
#include "qm_outbox.h"

#include "qm_common.h"
#include "qm_log.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RELAY_DEF_BATCH 100
#define RELAY_DEF_POLL_MS 20
#define RELAY_DEF_RETENTION_MS (3600 * 1000)
#define RELAY_DEF_PURGE_INTERVAL_MS (60 * 1000)
#define RELAY_DEF_PURGE_BATCH 1000
#define RELAY_DEF_LOCK_RETRY_MS 1000
#define RELAY_BACKOFF_MIN_MS 100
#define RELAY_BACKOFF_MAX_MS 5000
#define RELAY_PURGE_MAX_ROUNDS 10 /* DELETE batches per purge run, so publishing never starves */
#define RELAY_STOP_CHECK_MS 50
#define PG_MAX_IDENT 63           /* NAMEDATALEN - 1: longer channel names are refused */

const qm_migration_t qm_outbox_migration = QM_OUTBOX_MIGRATION;

/* "qm_outbox_<schema>", cut to the longest channel name PostgreSQL takes. */
static void outbox_channel(const char *schema, char *out, size_t out_size) {
  char buf[128];
  snprintf(buf, sizeof(buf), "qm_outbox_%s", schema);
  if (strlen(buf) > PG_MAX_IDENT) buf[PG_MAX_IDENT] = '\0';
  qm_strlcpy(out, buf, out_size);
}

/* ---- headers as JSON ------------------------------------------------------ */

/* [{"name":..,"value_b64":..}] for the extra headers; NULL when there are
 * none. QM_EINVAL when a name is not valid UTF-8. Caller frees *out. */
static int outbox_headers_json(const qm_event_out_t *ev, char **out, char *errstr,
                               size_t errstr_size) {
  int rc = QM_OK;
  json_t *arr = NULL;
  *out = NULL;
  if (ev->n_headers == 0) return QM_OK;
  arr = json_array();
  for (size_t i = 0; i < ev->n_headers; i++) {
    const qm_header_t *h = &ev->headers[i];
    json_t *name = h->name ? json_string(h->name) : NULL;
    if (!name) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "header %zu: name missing or not UTF-8", i);
      goto out;
    }
    size_t cap = 4 * ((h->value_len + 2) / 3) + 1;
    char *b64 = qm_malloc(cap);
    int n = EVP_EncodeBlock((unsigned char *)b64, h->value ? h->value : (const void *)"",
                            (int)h->value_len);
    b64[n > 0 ? n : 0] = '\0';
    json_t *o = json_object();
    json_object_set_new(o, "name", name);
    json_object_set_new(o, "value_b64", json_string(b64));
    json_array_append_new(arr, o);
    free(b64);
  }
  *out = json_dumps(arr, JSON_COMPACT);
  if (!*out) rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot encode headers");
out:
  json_decref(arr);
  return rc;
}

/* Decodes standard base64 into a new buffer; caller frees *out. */
static int outbox_b64_decode(const char *s, unsigned char **out, size_t *len) {
  size_t n = strlen(s);
  if (n % 4 != 0) return QM_EINVAL;
  unsigned char *buf = qm_malloc(n / 4 * 3 + 1);
  int got = n ? EVP_DecodeBlock(buf, (const unsigned char *)s, (int)n) : 0;
  if (got < 0) {
    free(buf);
    return QM_EINVAL;
  }
  size_t pad = 0; /* EVP_DecodeBlock counts padding as zero bytes */
  if (n >= 1 && s[n - 1] == '=') pad++;
  if (n >= 2 && s[n - 2] == '=') pad++;
  *out = buf;
  *len = (size_t)got - pad;
  return QM_OK;
}

/* ---- add and purge ---------------------------------------------------------- */

int qm_outbox_add(qm_pg_t *c, const qm_event_out_t *ev, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  char *headers = NULL;
  /* An event either has its own CloudEvents attributes, or — a dead letter
   * from qm_dlq_build() — none, and carries the original headers verbatim. */
  bool own_meta = ev && ev->meta.id[0];
  if (!ev || !ev->topic || !*ev->topic ||
      (own_meta && (!ev->meta.source[0] || !ev->meta.type[0])) ||
      (!own_meta && (ev->meta.source[0] || ev->meta.type[0] || ev->n_headers == 0)))
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "outbox event needs a topic and either ce_id, ce_source and ce_type, or "
                  "none of them and its own headers (a dead letter)");
  if ((rc = outbox_headers_json(ev, &headers, errstr, errstr_size)) != QM_OK) goto out;
  char channel[PG_MAX_IDENT + 1];
  outbox_channel(qm_pg_schema(c), channel, sizeof(channel));
  qm_pg_param_t p[] = {
      QM_PG_TEXT(ev->topic),
      ev->key ? QM_PG_BYTES(ev->key, ev->key_len) : QM_PG_NULL,
      QM_PG_TEXT(ev->meta.id),
      QM_PG_TEXT(ev->meta.source),
      QM_PG_TEXT(ev->meta.type),
      QM_PG_TEXT(ev->meta.subject[0] ? ev->meta.subject : NULL),
      QM_PG_INT64(ev->meta.time_ms),
      QM_PG_TEXT(ev->meta.content_type[0] ? ev->meta.content_type : NULL),
      QM_PG_TEXT(ev->meta.traceparent[0] ? ev->meta.traceparent : NULL),
      QM_PG_TEXT(headers),
      ev->payload ? QM_PG_BYTES(ev->payload, ev->payload_len) : QM_PG_NULL,
      QM_PG_TEXT(channel),
  };
  /* One round trip: the NOTIFY rides along in a CTE. PostgreSQL delivers it
   * at commit only, and folds repeats within one transaction into one. */
  rc = qm_pg_exec(c,
                  "WITH wake AS (SELECT pg_notify($12::text, '')) "
                  "INSERT INTO outbox (topic, key, ce_id, ce_source, ce_type, ce_subject,"
                  " ce_time_ms, content_type, traceparent, headers, payload) "
                  "SELECT $1::text, $2::bytea, $3::text, $4::text, $5::text, $6::text,"
                  " $7::bigint, $8::text, $9::text, $10::jsonb, $11::bytea FROM wake",
                  p, (int)QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
out:
  free(headers);
  return rc;
}

int qm_outbox_purge(qm_pg_t *c, int64_t older_than_ms, int limit) {
  qm_pg_result_t *res = NULL;
  char err[512];
  if (limit <= 0 || older_than_ms < 0) return QM_EINVAL;
  qm_pg_param_t p[] = {QM_PG_INT64(older_than_ms), QM_PG_INT64(limit)};
  int rc = qm_pg_exec(c,
                      "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
                      " WHERE published_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
                      p, 2, &res, err, sizeof(err));
  if (rc != QM_OK) {
    qm_log_warn("outbox purge failed (will retry at the next purge): %s", err);
    return rc;
  }
  int64_t n = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  return (int)n;
}

/* ---- relay ------------------------------------------------------------------- */

struct qm_relay {
  char *dsn;
  char *schema;
  char *app_name;
  char channel[PG_MAX_IDENT + 1];
  int64_t lock_key;
  qm_relay_publish_fn publish;
  void *publish_ctx;
  qm_relay_conf_t conf; /* with defaults filled in; conf.app_name unused */

  /* Owned by whoever runs steps (the thread, or a test via run_once). */
  qm_pg_t *pg;
  bool leader;
  int64_t next_connect_ms; /* first connection: backoff when it fails */
  int64_t connect_backoff_ms;
  int64_t next_purge_ms;

  pthread_t thread;
  bool started;

  pthread_mutex_t mu; /* guards what follows */
  pthread_cond_t cv;  /* wakes the thread's waits when stopping */
  bool stopping;      /* drain, then exit */
  int64_t drain_deadline_ms;
  qm_relay_stats_t stats;
};

/* One row read from the outbox, decoded into what the publisher needs. */
typedef struct relay_row {
  int64_t id;
  unsigned char *key, *payload;
  size_t key_len, payload_len;
  qm_header_t *headers;
  size_t n_headers;
} relay_row_t;

static void relay_set_leader(qm_relay_t *r, bool leader) {
  if (r->leader != leader)
    qm_log_info(leader ? "outbox relay for schema %s is now the leader"
                       : "outbox relay for schema %s is no longer the leader (standing by)",
                r->schema);
  r->leader = leader;
  pthread_mutex_lock(&r->mu);
  r->stats.leader = leader;
  if (!leader) r->stats.oldest_unpublished_age_ms = 0;
  pthread_mutex_unlock(&r->mu);
}

qm_relay_t *qm_relay_new(const char *dsn, const char *schema, qm_relay_publish_fn publish,
                         void *publish_ctx, const qm_relay_conf_t *conf) {
  if (!dsn || !schema || !*schema || !publish) return NULL;
  qm_relay_t *r = qm_calloc(1, sizeof(*r));
  r->dsn = qm_strdup(dsn);
  r->schema = qm_strdup(schema);
  if (conf) r->conf = *conf;
  r->conf.app_name = NULL;
  r->app_name = conf && conf->app_name ? qm_strdup(conf->app_name)
                                       : qm_asprintf("qm-relay-%s", schema);
  if (r->conf.batch <= 0) r->conf.batch = RELAY_DEF_BATCH;
  if (r->conf.poll_ms <= 0) r->conf.poll_ms = RELAY_DEF_POLL_MS;
  if (r->conf.retention_ms <= 0) r->conf.retention_ms = RELAY_DEF_RETENTION_MS;
  if (r->conf.purge_interval_ms <= 0) r->conf.purge_interval_ms = RELAY_DEF_PURGE_INTERVAL_MS;
  if (r->conf.purge_batch <= 0) r->conf.purge_batch = RELAY_DEF_PURGE_BATCH;
  if (r->conf.lock_retry_ms <= 0) r->conf.lock_retry_ms = RELAY_DEF_LOCK_RETRY_MS;
  r->publish = publish;
  r->publish_ctx = publish_ctx;
  outbox_channel(schema, r->channel, sizeof(r->channel));
  char *lockname = qm_asprintf("qm.outbox.%s", schema);
  r->lock_key = qm_pg_advisory_key(lockname);
  free(lockname);
  r->connect_backoff_ms = RELAY_BACKOFF_MIN_MS;
  pthread_mutex_init(&r->mu, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&r->cv, &attr);
  pthread_condattr_destroy(&attr);
  return r;
}

/* Connected, listening, and knowing whether we lead. A session that was
 * lost took its advisory lock with it, so any reconnect means "not leader". */
static int relay_connect(qm_relay_t *r) {
  char err[512];
  if (!r->pg) {
    if (qm_mono_ms() < r->next_connect_ms) return QM_ETRANSIENT;
    r->pg = qm_pg_connect_app(r->dsn, r->schema, r->app_name, err, sizeof(err));
    if (!r->pg) {
      r->next_connect_ms = qm_mono_ms() + r->connect_backoff_ms;
      r->connect_backoff_ms *= 2;
      if (r->connect_backoff_ms > RELAY_BACKOFF_MAX_MS) r->connect_backoff_ms = RELAY_BACKOFF_MAX_MS;
      qm_log_warn("outbox relay for schema %s cannot connect (retrying): %s", r->schema, err);
      return QM_ETRANSIENT;
    }
    if (qm_pg_listen(r->pg, r->channel, err, sizeof(err)) != QM_OK)
      qm_log_warn("outbox relay: LISTEN failed, relying on polling: %s", err);
  }
  if (!qm_pg_connected(r->pg)) {
    relay_set_leader(r, false);
    int rc = qm_pg_ensure(r->pg, qm_mono_ms());
    if (rc != QM_OK) return rc == QM_ESHUTDOWN ? rc : QM_ETRANSIENT;
  }
  return QM_OK;
}

/* Standby: try to become the one relay of this schema. */
static int relay_try_lead(qm_relay_t *r) {
  qm_pg_result_t *res = NULL;
  char err[512];
  qm_pg_param_t p[] = {QM_PG_INT64(r->lock_key)};
  int rc = qm_pg_exec(r->pg, "SELECT pg_try_advisory_lock($1)", p, 1, &res, err, sizeof(err));
  if (rc != QM_OK) {
    qm_log_warn("outbox relay for schema %s: leader lock query failed: %s", r->schema, err);
    return rc;
  }
  bool got = strcmp(qm_pg_get(res, 0, 0), "t") == 0;
  qm_pg_result_destroy(res);
  relay_set_leader(r, got);
  return got ? QM_OK : QM_ECONFLICT;
}

static void relay_row_clear(relay_row_t *row) {
  free(row->key);
  free(row->payload);
  for (size_t i = 0; i < row->n_headers; i++) {
    free((void *)row->headers[i].name);
    free((void *)row->headers[i].value);
  }
  free(row->headers);
  memset(row, 0, sizeof(*row));
}

/* Decodes the jsonb headers column; a malformed entry is logged and dropped
 * (we wrote it ourselves, so this means tampering, not a reason to stall). */
static void relay_decode_headers(qm_relay_t *r, relay_row_t *row, const char *text) {
  json_error_t jerr;
  json_t *arr = json_loads(text, 0, &jerr);
  if (!json_is_array(arr)) {
    qm_log_error("outbox row %" PRId64 " of schema %s: headers are not a JSON array; "
                 "publishing without them",
                 row->id, r->schema);
    json_decref(arr);
    return;
  }
  row->headers = qm_calloc(json_array_size(arr), sizeof(*row->headers));
  size_t i;
  json_t *o;
  json_array_foreach(arr, i, o) {
    const char *name = json_string_value(json_object_get(o, "name"));
    const char *b64 = json_string_value(json_object_get(o, "value_b64"));
    unsigned char *val = NULL;
    size_t len = 0;
    if (!name || !b64 || outbox_b64_decode(b64, &val, &len) != QM_OK) {
      qm_log_error("outbox row %" PRId64 " of schema %s: header %zu is malformed; dropped",
                   row->id, r->schema, i);
      continue;
    }
    row->headers[row->n_headers].name = qm_strdup(name);
    row->headers[row->n_headers].value = val;
    row->headers[row->n_headers].value_len = len;
    row->n_headers++;
  }
  json_decref(arr);
}

/* Marks rows[0..n) published. */
static int relay_mark(qm_relay_t *r, const relay_row_t *rows, size_t n) {
  char err[512];
  size_t cap = n * 21 + 3, used = 0;
  char *ids = qm_malloc(cap);
  ids[used++] = '{';
  for (size_t i = 0; i < n; i++)
    used += (size_t)snprintf(ids + used, cap - used, "%s%" PRId64, i ? "," : "", rows[i].id);
  snprintf(ids + used, cap - used, "}");
  qm_pg_param_t p[] = {QM_PG_TEXT(ids)};
  int rc = qm_pg_exec(r->pg, "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                      p, 1, NULL, err, sizeof(err));
  if (rc != QM_OK)
    qm_log_warn("outbox relay for schema %s: %zu events were published but could not be "
                "marked; they will be published again (consumers drop repeats): %s",
                r->schema, n, err);
  free(ids);
  return rc;
}

/* Publishes one batch. *published: rows marked published; *full: the batch
 * was full (more may be waiting). */
static int relay_publish_batch(qm_relay_t *r, size_t *published, bool *full) {
  int rc = QM_OK;
  char err[512];
  qm_pg_result_t *res = NULL;
  relay_row_t *rows = NULL;
  qm_event_out_t *evs = NULL;
  int *results = NULL;
  size_t n = 0, delivered = 0;

  /* No high-water mark, hence no gap: ids come from a sequence at insert but
   * transactions commit in any order, so a row with a lower id (transaction
   * A, still running) can become visible after a higher one (B, committed).
   * A relay that remembered "done up to B's id" would skip A's row forever;
   * this one marks each row published on its own (published_at) and reads
   * every unpublished committed row each round, so A's row is simply read in
   * a later round. Order follows commit order: rows that are visible together
   * go out in id order, and a row never goes out before one committed before
   * it (its transaction could not have seen the earlier one otherwise), so
   * causally ordered events keep their order. Reading only rows older than
   * the snapshot's xmin (the textbook fix for high-water-mark relays) is not
   * needed, and would let any long-running writing transaction anywhere on
   * the server hold back every service's events. */
  qm_pg_param_t p[] = {QM_PG_INT64(r->conf.batch)};
  rc = qm_pg_exec(r->pg,
                  "SELECT id, topic, key, ce_id, ce_source, ce_type, ce_subject, ce_time_ms,"
                  " content_type, traceparent, headers::text, payload,"
                  " (extract(epoch FROM clock_timestamp() - created_at) * 1000)::bigint"
                  " FROM outbox"
                  " WHERE published_at IS NULL"
                  " ORDER BY id LIMIT $1",
                  p, 1, &res, err, sizeof(err));
  if (rc != QM_OK) {
    qm_log_warn("outbox relay for schema %s: reading the outbox failed: %s", r->schema, err);
    goto out;
  }
  n = (size_t)qm_pg_ntuples(res);
  *full = n == (size_t)r->conf.batch;
  /* Lag: the age of the oldest unpublished row (by id: the oldest insert). */
  int64_t age = 0;
  qm_pg_result_t *ares = NULL;
  if (qm_pg_exec(r->pg,
                 "SELECT (extract(epoch FROM clock_timestamp() - created_at) * 1000)::bigint"
                 " FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1",
                 NULL, 0, &ares, err, sizeof(err)) == QM_OK &&
      qm_pg_ntuples(ares) == 1)
    qm_pg_get_int64(ares, 0, 0, &age);
  qm_pg_result_destroy(ares);
  pthread_mutex_lock(&r->mu);
  r->stats.last_batch_size = n;
  r->stats.oldest_unpublished_age_ms = age;
  pthread_mutex_unlock(&r->mu);
  if (n == 0) goto out;

  rows = qm_calloc(n, sizeof(*rows));
  evs = qm_calloc(n, sizeof(*evs));
  results = qm_calloc(n, sizeof(*results));
  for (size_t i = 0; i < n; i++) {
    int row = (int)i;
    relay_row_t *rw = &rows[i];
    qm_event_out_t *ev = &evs[i];
    qm_pg_get_int64(res, row, 0, &rw->id);
    qm_pg_get_bytes(res, row, 2, &rw->key, &rw->key_len);
    qm_pg_get_bytes(res, row, 11, &rw->payload, &rw->payload_len);
    if (!qm_pg_is_null(res, row, 10)) relay_decode_headers(r, rw, qm_pg_get(res, row, 10));
    ev->topic = qm_pg_get(res, row, 1);
    ev->key = rw->key;
    ev->key_len = rw->key_len;
    qm_strlcpy(ev->meta.id, qm_pg_get(res, row, 3), sizeof(ev->meta.id));
    qm_strlcpy(ev->meta.source, qm_pg_get(res, row, 4), sizeof(ev->meta.source));
    qm_strlcpy(ev->meta.type, qm_pg_get(res, row, 5), sizeof(ev->meta.type));
    qm_strlcpy(ev->meta.subject, qm_pg_get(res, row, 6), sizeof(ev->meta.subject));
    qm_pg_get_int64(res, row, 7, &ev->meta.time_ms);
    qm_strlcpy(ev->meta.content_type, qm_pg_get(res, row, 8), sizeof(ev->meta.content_type));
    qm_strlcpy(ev->meta.traceparent, qm_pg_get(res, row, 9), sizeof(ev->meta.traceparent));
    ev->payload = rw->payload;
    ev->payload_len = rw->payload_len;
    ev->headers = rw->headers;
    ev->n_headers = rw->n_headers;
    results[i] = QM_ETRANSIENT; /* a publisher that reports nothing delivered nothing */
  }

  int prc = r->publish(r->publish_ctx, evs, n, results);
  if (prc == QM_OK) {
    delivered = n;
  } else {
    /* Stop at the first failure: a later row may have the same key, and
     * publishing it before the failed one would break that key's order. */
    while (delivered < n && results[delivered] == QM_OK) delivered++;
    rc = prc < 0 ? prc : QM_EIO;
    qm_log_warn("outbox relay for schema %s: event %s (outbox id %" PRId64 ") failed to "
                "publish (%s); it and the %zu after it will be retried",
                r->schema, evs[delivered < n ? delivered : n - 1].meta.id,
                rows[delivered < n ? delivered : n - 1].id, qm_strerror(rc),
                n - delivered - (delivered < n ? 1 : 0));
    pthread_mutex_lock(&r->mu);
    r->stats.publish_failures++;
    pthread_mutex_unlock(&r->mu);
  }
  if (delivered > 0) {
    int mrc = relay_mark(r, rows, delivered);
    if (mrc != QM_OK) {
      if (rc == QM_OK) rc = mrc;
      delivered = 0;
    }
  }
  pthread_mutex_lock(&r->mu);
  r->stats.published_total += delivered;
  pthread_mutex_unlock(&r->mu);
  *published = delivered;
out:
  if (rows)
    for (size_t i = 0; i < n; i++) relay_row_clear(&rows[i]);
  free(rows);
  free(evs);
  free(results);
  qm_pg_result_destroy(res);
  return rc;
}

/* Deletes published rows past retention, a few batches at a time. Returns
 * true when rows past retention remain (the rounds ran out), so the caller
 * comes back soon instead of after a whole interval: a busy service writes
 * more than one interval's worth of rounds. */
static bool relay_purge(qm_relay_t *r) {
  int64_t total = 0;
  bool more = false;
  for (int round = 0; round < RELAY_PURGE_MAX_ROUNDS; round++) {
    int n = qm_outbox_purge(r->pg, r->conf.retention_ms, r->conf.purge_batch);
    if (n < 0) break;
    total += n;
    if (n < r->conf.purge_batch) break;
    more = round == RELAY_PURGE_MAX_ROUNDS - 1;
  }
  if (total > 0) qm_log_debug("outbox relay for schema %s purged %" PRId64 " rows", r->schema, total);
  return more;
}

/* One step: connect, lead, publish a batch, purge when due. */
static int relay_step(qm_relay_t *r, size_t *published, bool *full) {
  int rc;
  *published = 0;
  *full = false;
  if ((rc = relay_connect(r)) != QM_OK) return rc;
  if (!r->leader && (rc = relay_try_lead(r)) != QM_OK) goto out;
  rc = relay_publish_batch(r, published, full);
  if (rc == QM_OK && qm_mono_ms() >= r->next_purge_ms) {
    bool more = relay_purge(r);
    r->next_purge_ms = qm_mono_ms() + (more ? 1000 : r->conf.purge_interval_ms);
  }
out:
  if (r->pg && !qm_pg_connected(r->pg)) relay_set_leader(r, false);
  return rc;
}

int qm_relay_run_once(qm_relay_t *r, size_t *published) {
  size_t n = 0;
  bool full = false;
  int rc = relay_step(r, &n, &full);
  if (published) *published = n;
  return rc;
}

/* Waits up to ms unless a stop is requested. Returns true when stopping. */
static bool relay_wait(qm_relay_t *r, int64_t ms) {
  struct timespec abs;
  clock_gettime(CLOCK_MONOTONIC, &abs);
  int64_t ns = abs.tv_nsec + ms % 1000 * 1000000;
  abs.tv_sec += ms / 1000 + ns / 1000000000;
  abs.tv_nsec = (long)(ns % 1000000000);
  pthread_mutex_lock(&r->mu);
  while (!r->stopping) {
    if (pthread_cond_timedwait(&r->cv, &r->mu, &abs) == ETIMEDOUT) break;
  }
  bool stopping = r->stopping;
  pthread_mutex_unlock(&r->mu);
  return stopping;
}

/* Sleeps until a NOTIFY, the poll interval or a stop request (checked every
 * RELAY_STOP_CHECK_MS, so a long poll_ms does not delay a stop), then
 * swallows the other queued notifications: one batch serves them all. */
static void relay_wait_notify(qm_relay_t *r) {
  int64_t deadline = qm_mono_ms() + r->conf.poll_ms;
  for (;;) {
    int64_t left = deadline - qm_mono_ms();
    if (left <= 0) return;
    int rc = qm_pg_wait_notify(r->pg, left < RELAY_STOP_CHECK_MS ? (int)left : RELAY_STOP_CHECK_MS,
                               NULL, 0);
    if (rc == QM_OK) {
      while (qm_pg_wait_notify(r->pg, 0, NULL, 0) == QM_OK) {
      }
      return;
    }
    if (rc != QM_ETIMEOUT) return;
    pthread_mutex_lock(&r->mu);
    bool stopping = r->stopping;
    pthread_mutex_unlock(&r->mu);
    if (stopping) return;
  }
}

static void *relay_main(void *arg) {
  qm_relay_t *r = arg;
  int64_t backoff = RELAY_BACKOFF_MIN_MS;
  qm_log_info("outbox relay for schema %s started", r->schema);
  for (;;) {
    pthread_mutex_lock(&r->mu);
    bool stopping = r->stopping;
    int64_t deadline = r->drain_deadline_ms;
    pthread_mutex_unlock(&r->mu);
    if (stopping && qm_mono_ms() >= deadline) break;

    size_t n = 0;
    bool full = false;
    int rc = relay_step(r, &n, &full);
    if (stopping) {
      /* Drain: keep going while batches deliver something. */
      if (rc != QM_OK || n == 0) break;
      continue;
    }
    if (rc == QM_OK) {
      backoff = RELAY_BACKOFF_MIN_MS;
      if (full) continue;
      relay_wait_notify(r);
      continue;
    }
    if (rc == QM_ECONFLICT) {
      relay_wait(r, r->conf.lock_retry_ms);
      continue;
    }
    relay_wait(r, backoff);
    backoff *= 2;
    if (backoff > RELAY_BACKOFF_MAX_MS) backoff = RELAY_BACKOFF_MAX_MS;
  }
  qm_log_info("outbox relay for schema %s stopped", r->schema);
  return NULL;
}

int qm_relay_start(qm_relay_t *r) {
  if (r->started) return QM_ECONFLICT;
  pthread_mutex_lock(&r->mu);
  r->stopping = false;
  pthread_mutex_unlock(&r->mu);
  if (pthread_create(&r->thread, NULL, relay_main, r) != 0) {
    qm_log_error("cannot start the outbox relay thread for schema %s", r->schema);
    return QM_EIO;
  }
  r->started = true;
  return QM_OK;
}

int qm_relay_stop(qm_relay_t *r, int timeout_ms) {
  if (!r->started) return QM_OK;
  pthread_mutex_lock(&r->mu);
  r->stopping = true;
  r->drain_deadline_ms = qm_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  pthread_cond_broadcast(&r->cv);
  pthread_mutex_unlock(&r->mu);
  pthread_join(r->thread, NULL);
  r->started = false;
  return QM_OK;
}

void qm_relay_destroy(qm_relay_t *r) {
  if (!r) return;
  qm_relay_stop(r, 0);
  qm_pg_destroy(r->pg);
  pthread_cond_destroy(&r->cv);
  pthread_mutex_destroy(&r->mu);
  free(r->app_name);
  free(r->schema);
  free(r->dsn);
  free(r);
}

void qm_relay_stats(qm_relay_t *r, qm_relay_stats_t *out) {
  pthread_mutex_lock(&r->mu);
  *out = r->stats;
  pthread_mutex_unlock(&r->mu);
}
