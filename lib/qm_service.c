/*
 * qm_service: start-up, the consumer loop, the outbox relay wiring, HTTP and
 * shutdown, shared by the five services. See qm_service.h for the contract.
 *
 * Threads: the main thread runs the consumer loop; the relay has its own
 * thread; HTTP handlers run on the HTTP server's pool; a service may start
 * its own threads in init() and must stop them in stop().
 */
#include "qm_service.h"

#include "qm_auth.h"
#include "qm_common.h"
#include "qm_http.h"
#include "qm_inbox.h"
#include "qm_kafka.h"
#include "qm_log.h"
#include "qm_metrics.h"
#include "qm_outbox.h"
#include "qm_redis.h"
#include "qm_topics.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QM_DEV_SECRET "quartermaster-local-development-secret-do-not-use-in-production"

const qm_cfg_def_t qm_service_config_defs[] = {
    {"QM_LOG_LEVEL", QM_CFG_STR, "info", "Log level: debug, info, warn or error.", 0, 0, 0},
    {"QM_PG_DSN", QM_CFG_STR, "host=127.0.0.1 port=5432 user=postgres dbname=quartermaster",
     "PostgreSQL connection string (libpq conninfo or URI). The service uses its own schema.", 0, 0,
     QM_CFG_SECRET},
    {"QM_PG_POOL_SIZE", QM_CFG_INT, "4",
     "PostgreSQL connections shared by the HTTP handlers (the consumer, relay, readiness probe "
     "and any workers have their own).", 1, 256, 0},
    {"QM_KAFKA_BROKERS", QM_CFG_STR, "127.0.0.1:9092", "Kafka bootstrap servers (host:port,...).", 0,
     0, 0},
    {"QM_KAFKA_SESSION_TIMEOUT", QM_CFG_MS, "10s",
     "How soon a crashed instance's partitions move to another (Kafka session timeout).", 6000,
     300000, 0},
    {"QM_INSTANCE_ID", QM_CFG_STR, "",
     "Stable instance name (e.g. a StatefulSet pod name): enables Kafka static membership, so a "
     "restarted instance gets its partitions back without a rebalance. Empty: dynamic.", 0, 0,
     0},
    {"QM_TOPIC_PREFIX", QM_CFG_STR, "",
     "Prefix for every topic name (isolates tenants or test runs); empty in production.", 0, 0, 0},
    {"QM_CONSUMER_GROUP", QM_CFG_STR, "",
     "Kafka consumer group; default qm-<service>. Instances of a service share it.", 0, 0, 0},
    {"QM_CONSUMER_BATCH", QM_CFG_INT, "500",
     "Most events handled in one database transaction.", 1, 10000, 0},
    {"QM_CONSUMER_WAIT", QM_CFG_MS, "100ms",
     "How long the consumer waits for the first event of a batch.", 1, 10000, 0},
    {"QM_INBOX_RETENTION", QM_CFG_MS, "14d",
     "How long applied event ids are remembered to drop duplicates; keep it above the "
     "topics' retention.", 3600000, 3650LL * 24 * 3600 * 1000, 0},
    {"QM_CONSUMER_MAX_ATTEMPTS", QM_CFG_INT, "5",
     "Attempts at an event that fails unexpectedly before it is dead-lettered.", 1, 1000, 0},
    {"QM_OUTBOX_POLL", QM_CFG_MS, "20ms",
     "Outbox relay poll interval when no notification arrives.", 1, 60000, 0},
    {"QM_OUTBOX_BATCH", QM_CFG_INT, "500", "Most outbox rows published per relay round.", 1,
     10000, 0},
    {"QM_HTTP_ADDR", QM_CFG_STR, "0.0.0.0", "Address the HTTP API listens on.", 0, 0, 0},
    {"QM_HTTP_THREADS", QM_CFG_INT, "4", "HTTP worker threads.", 1, 256, 0},
    {"QM_HTTP_MAX_BODY", QM_CFG_INT, "1048576", "Largest request body accepted, bytes.", 1024,
     67108864, 0},
    {"QM_AUTH_MODE", QM_CFG_STR, "hs256",
     "Bearer JWT verification: hs256 (shared secret, development) or rs256 (JWKS file).", 0, 0, 0},
    {"QM_AUTH_HS256_SECRET", QM_CFG_STR, QM_DEV_SECRET,
     "HS256 shared secret (at least 32 bytes). The default is for local development only.", 0, 0,
     QM_CFG_SECRET},
    {"QM_AUTH_JWKS_FILE", QM_CFG_STR, "", "RS256: path of the JWKS file with the issuer's keys.", 0,
     0, 0},
    {"QM_AUTH_ISSUER", QM_CFG_STR, "", "Expected token issuer (iss); empty: not checked.", 0, 0, 0},
    {"QM_AUTH_AUDIENCE", QM_CFG_STR, "", "Expected token audience (aud); empty: not checked.", 0, 0,
     0},
    {"QM_AUTH_LEEWAY_S", QM_CFG_INT, "30", "Clock skew allowed on token exp/nbf, seconds.", 0, 600,
     0},
    {"QM_REDIS_HOST", QM_CFG_STR, "127.0.0.1", "Redis host (services with timers).", 0, 0, 0},
    {"QM_REDIS_PORT", QM_CFG_INT, "6379", "Redis port.", 1, 65535, 0},
    {"QM_SHUTDOWN_TIMEOUT", QM_CFG_MS, "20s",
     "Bound on graceful shutdown after SIGTERM (keep below the pod's grace period).", 1000, 600000,
     0},
};
const size_t qm_service_config_defs_count = QM_ARRAY_LEN(qm_service_config_defs);

typedef struct qm_topic_name {
  char *base;
  char *full;
} qm_topic_name_t;

struct qm_service {
  const qm_service_def_t *def;
  qm_config_t *cfg;
  qm_cfg_def_t port_def[1];
  char port_default[16];
  char dsn_buf[1];
  void *app;

  qm_pg_pool_t *pool;
  qm_pg_t *ready_pg; /* readiness checks only, under ready_lock */
  qm_redis_t *ready_redis;
  pthread_mutex_t ready_lock;

  qm_producer_t *producer;
  qm_consumer_t *consumer;
  qm_relay_t *relay;
  qm_pg_t *consumer_pg;
  qm_auth_t *auth;
  qm_metrics_t *metrics;
  qm_http_server_t *http;

  qm_topic_name_t *topics;
  size_t n_topics;
  pthread_mutex_t topics_lock;

  qm_metric_family_t *m_events;     /* qm_consumer_events_total{topic,outcome} */
  qm_metric_family_t *m_batch_secs; /* qm_consumer_batch_duration_seconds */
  qm_metric_family_t *m_lag_secs;   /* qm_consumer_event_age_seconds */
  int exit_code;                    /* non-zero after a fatal runtime error */
};

/* ------------------------------------------------------------ accessors */

const char *qm_service_name(const qm_service_t *svc) { return svc->def->name; }
const qm_config_t *qm_service_config(const qm_service_t *svc) { return svc->cfg; }
qm_http_server_t *qm_service_http(qm_service_t *svc) { return svc->http; }
qm_metrics_t *qm_service_metrics(qm_service_t *svc) { return svc->metrics; }
qm_pg_pool_t *qm_service_pool(qm_service_t *svc) { return svc->pool; }
const char *qm_service_dsn(const qm_service_t *svc) { return qm_config_str(svc->cfg, "QM_PG_DSN"); }

const char *qm_service_topic(qm_service_t *svc, const char *base) {
  pthread_mutex_lock(&svc->topics_lock);
  const char *full = NULL;
  for (size_t i = 0; i < svc->n_topics && !full; i++)
    if (!strcmp(svc->topics[i].base, base)) full = svc->topics[i].full;
  if (!full) {
    svc->topics = qm_realloc(svc->topics, (svc->n_topics + 1) * sizeof(*svc->topics));
    qm_topic_name_t *t = &svc->topics[svc->n_topics++];
    t->base = qm_strdup(base);
    t->full = qm_asprintf("%s%s", qm_config_str(svc->cfg, "QM_TOPIC_PREFIX"), base);
    full = t->full;
  }
  pthread_mutex_unlock(&svc->topics_lock);
  return full;
}

bool qm_service_topic_is(const qm_service_t *svc, const char *topic, const char *base) {
  const char *prefix = qm_config_str(svc->cfg, "QM_TOPIC_PREFIX");
  size_t plen = strlen(prefix);
  return strncmp(topic, prefix, plen) == 0 && strcmp(topic + plen, base) == 0;
}

/* ------------------------------------------------------------ emitting */

int qm_service_emit(qm_service_t *svc, qm_pg_t *tx, const char *topic, const char *key,
                    const char *type, const char *subject, const char *parent_traceparent,
                    const ProtobufCMessage *msg, char *event_id_out, char *errstr,
                    size_t errstr_size) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  uint8_t stackbuf[4096];
  uint8_t *buf = len <= sizeof(stackbuf) ? stackbuf : qm_malloc(len);
  protobuf_c_message_pack(msg, buf);
  qm_event_out_t ev = {
      .topic = qm_service_topic(svc, topic),
      .key = key,
      .key_len = key ? strlen(key) : 0,
      .payload = buf,
      .payload_len = len,
  };
  qm_event_meta_init(&ev.meta, svc->def->name, type, subject, parent_traceparent);
  int rc = qm_outbox_add(tx, &ev, errstr, errstr_size);
  if (rc == QM_OK && event_id_out) qm_strlcpy(event_id_out, ev.meta.id, QM_UUID_STR_LEN);
  if (buf != stackbuf) free(buf);
  return rc;
}

int qm_service_tx(qm_service_t *svc, int timeout_ms,
                  int (*fn)(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                            size_t errstr_size),
                  void *ctx, char *errstr, size_t errstr_size) {
  int64_t deadline = qm_mono_ms() + timeout_ms;
  int64_t backoff = 20;
  for (;;) {
    qm_pg_t *tx = NULL;
    int rc = qm_pg_pool_acquire(svc->pool, (int)(deadline - qm_mono_ms()), &tx);
    if (rc != QM_OK)
      return qm_err(errstr, errstr_size, QM_ETRANSIENT, "no database connection available (%s)",
                    qm_strerror(rc));
    rc = qm_pg_begin(tx, errstr, errstr_size);
    if (rc == QM_OK) {
      rc = fn(svc, tx, ctx, errstr, errstr_size);
      if (rc == QM_OK)
        rc = qm_pg_commit(tx, errstr, errstr_size);
      else
        qm_pg_rollback(tx, NULL, 0);
    }
    if (rc == QM_ETRANSIENT) qm_pg_ensure(tx, qm_mono_ms() + 10);
    qm_pg_pool_release(svc->pool, tx);
    if (rc != QM_ETRANSIENT || qm_mono_ms() + backoff >= deadline || qm_shutdown_requested())
      return rc;
    qm_sleep_ms(backoff);
    backoff = backoff * 2 > 1000 ? 1000 : backoff * 2;
  }
}

/* ------------------------------------------------------------ consumer */

/* What became of one consumed event; counted only once its batch commits. */
typedef enum {
  QM_OUTCOME_APPLIED = 0,
  QM_OUTCOME_DUPLICATE,
  QM_OUTCOME_DEAD_LETTER,
  QM_OUTCOME_SKIPPED
} qm_outcome_t;

static const char *const qm_outcome_names[] = {"applied", "duplicate", "dead_letter", "skipped"};

/* How hard to try an event that failed before in this batch. */
typedef enum {
  QM_TRY_HANDLE = 0,   /* run the handler */
  QM_TRY_DEAD_LETTER,  /* it failed QM_CONSUMER_MAX_ATTEMPTS times: dead-letter it */
  QM_TRY_SKIP          /* even dead-lettering failed: log loudly and move on */
} qm_try_t;

/* Writes the dead letter of ev to the outbox inside the open transaction and
 * claims ev's id in the inbox, so a redelivered poison message is not
 * dead-lettered twice. */
static int qm_service_dead_letter(qm_service_t *svc, qm_pg_t *tx, const qm_event_in_t *ev,
                                  const char *why, qm_outcome_t *outcome, char *errstr,
                                  size_t errstr_size) {
  qm_header_t storage[64 + QM_DLQ_N_HEADERS];
  qm_dlq_buf_t buf;
  qm_event_out_t out;
  int rc = qm_dlq_build(ev, svc->def->name, why, &out, storage, QM_ARRAY_LEN(storage), &buf,
                        errstr, errstr_size);
  if (rc != QM_OK) return rc;
  /* Claim the event (by its position when it has no usable id), so a
   * redelivery after a crash is not dead-lettered twice. */
  char id[128];
  if (ev->meta_valid)
    qm_strlcpy(id, ev->meta.id, sizeof(id));
  else
    snprintf(id, sizeof(id), "%s/%d/%lld", ev->topic, ev->partition, (long long)ev->offset);
  rc = qm_inbox_claim(tx, id, ev->topic, errstr, errstr_size);
  if (rc == QM_EDUP) {
    *outcome = QM_OUTCOME_DUPLICATE; /* dead-lettered before */
    return QM_OK;
  }
  if (rc != QM_OK) return rc;
  rc = qm_outbox_add(tx, &out, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  *outcome = QM_OUTCOME_DEAD_LETTER;
  qm_log(QM_LOG_WARN, ev->meta_valid ? ev->meta.subject : NULL, NULL,
         "dead-lettered %s[%d]@%lld to %s: %s (inspect the .dlq topic; the consumer moved on)",
         ev->topic, ev->partition, (long long)ev->offset, out.topic, why);
  return QM_OK;
}

/* The inbox id of an event: its ce_id, or for a dead letter its qm_dlq_id
 * (or, lacking that, its position). */
static void qm_service_event_id(const qm_event_in_t *ev, char *id, size_t id_size) {
  if (!qm_event_topic_is_dlq(ev->topic)) {
    qm_strlcpy(id, ev->meta.id, id_size);
  } else if (!qm_event_header(ev, "qm_dlq_id", id, id_size)) {
    snprintf(id, id_size, "%s/%d/%lld", ev->topic, ev->partition, (long long)ev->offset);
  }
}

/* Applies one event inside the batch transaction, under its own savepoint.
 * Returns QM_OK when the event is settled (*outcome says how) and the batch
 * may go on, or the error that must abort the batch. */
static int qm_service_apply_one(qm_service_t *svc, qm_pg_t *tx, const qm_event_in_t *ev,
                                qm_try_t how, const char *prior_error, qm_outcome_t *outcome,
                                char *errstr, size_t errstr_size) {
  bool dlq = qm_event_topic_is_dlq(ev->topic);
  char id[128] = "";
  qm_service_event_id(ev, id, sizeof(id));
  int rc = qm_pg_savepoint(tx, "ev", errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (how == QM_TRY_SKIP) {
    /* Last resort, so one event can never stall the partition: it stays in
     * Kafka at this position for whoever investigates. */
    qm_log_error("giving up on %s[%d]@%lld (event %s): %s; it could not even be dead-lettered. "
                 "Skipped: the message remains in Kafka at that offset for replay by hand",
                 ev->topic, ev->partition, (long long)ev->offset, id[0] ? id : "?", prior_error);
    if (id[0] && (dlq || ev->meta_valid)) {
      rc = qm_inbox_claim(tx, id, ev->topic, errstr, errstr_size);
      if (rc != QM_OK && rc != QM_EDUP) {
        if (rc == QM_ETRANSIENT) return rc;
        qm_pg_rollback_to(tx, "ev", NULL, 0);
      }
    }
    *outcome = QM_OUTCOME_SKIPPED;
    return qm_pg_release(tx, "ev", errstr, errstr_size);
  }
  if (!dlq && (how == QM_TRY_DEAD_LETTER || !ev->meta_valid)) {
    rc = qm_service_dead_letter(svc, tx, ev, how == QM_TRY_DEAD_LETTER ? prior_error : ev->meta_error,
                                outcome, errstr, errstr_size);
    return rc == QM_OK ? qm_pg_release(tx, "ev", errstr, errstr_size) : rc;
  }
  if (dlq && how == QM_TRY_DEAD_LETTER) /* a dead letter is never dead-lettered again */
    return qm_service_apply_one(svc, tx, ev, QM_TRY_SKIP, prior_error, outcome, errstr,
                                errstr_size);
  rc = qm_inbox_claim(tx, id, ev->topic, errstr, errstr_size);
  if (rc == QM_EDUP) {
    *outcome = QM_OUTCOME_DUPLICATE;
    return qm_pg_release(tx, "ev", errstr, errstr_size);
  }
  if (rc != QM_OK) return rc;
  char why[512] = "";
  rc = svc->def->handle(svc, svc->app, tx, ev, why, sizeof(why));
  if (rc == QM_EPOISON || rc == QM_EINVAL) {
    int rb = qm_pg_rollback_to(tx, "ev", errstr, errstr_size);
    if (rb != QM_OK) return rb;
    if (dlq) {
      char reason[600];
      snprintf(reason, sizeof(reason), "dead letter not recordable: %s", why);
      return qm_service_apply_one(svc, tx, ev, QM_TRY_SKIP, reason, outcome, errstr, errstr_size);
    }
    rc = qm_service_dead_letter(svc, tx, ev, why[0] ? why : "rejected by handler", outcome,
                                errstr, errstr_size);
    return rc == QM_OK ? qm_pg_release(tx, "ev", errstr, errstr_size) : rc;
  }
  if (rc != QM_OK) {
    qm_strlcpy(errstr, why[0] ? why : qm_strerror(rc), errstr_size);
    return rc;
  }
  *outcome = QM_OUTCOME_APPLIED;
  return qm_pg_release(tx, "ev", errstr, errstr_size);
}

/* Handles a batch in one transaction, retrying on failure. Infrastructure
 * failures (QM_ETRANSIENT) are retried until they clear or shutdown; an
 * event that keeps failing otherwise is dead-lettered after
 * QM_CONSUMER_MAX_ATTEMPTS (and skipped, loudly, if even that fails).
 * Outcomes are counted only once the batch committed. Returns QM_OK when the
 * batch committed (its offsets may be stored) or QM_ESHUTDOWN when shutdown
 * interrupted it (its offsets must not be stored: the events come back after
 * restart). */
static int qm_service_handle_batch(qm_service_t *svc, qm_kmsg_t **msgs, size_t n) {
  int max_attempts = (int)qm_config_int(svc->cfg, "QM_CONSUMER_MAX_ATTEMPTS");
  qm_outcome_t *outcomes = qm_calloc(n, sizeof(*outcomes));
  size_t poison_idx = (size_t)-1;
  int poison_attempts = 0;
  char poison_error[600] = "";
  int64_t backoff = 50;
  int result;
  for (;;) {
    char errstr[512] = "";
    size_t failed_at = (size_t)-1;
    int rc = qm_pg_begin(svc->consumer_pg, errstr, sizeof(errstr));
    for (size_t i = 0; rc == QM_OK && i < n; i++) {
      const qm_event_in_t *ev = qm_kmsg_event(msgs[i]);
      qm_try_t how = QM_TRY_HANDLE;
      if (i == poison_idx && poison_attempts > max_attempts) how = QM_TRY_SKIP;
      else if (i == poison_idx && poison_attempts >= max_attempts) how = QM_TRY_DEAD_LETTER;
      rc = qm_service_apply_one(svc, svc->consumer_pg, ev, how, poison_error, &outcomes[i],
                                errstr, sizeof(errstr));
      if (rc != QM_OK) failed_at = i;
    }
    if (rc == QM_OK) rc = qm_pg_commit(svc->consumer_pg, errstr, sizeof(errstr));
    if (rc == QM_OK) {
      for (size_t i = 0; i < n; i++) {
        const char *labels[] = {qm_kmsg_event(msgs[i])->topic, qm_outcome_names[outcomes[i]]};
        qm_metrics_inc(qm_metrics_child(svc->m_events, labels));
      }
      result = QM_OK;
      break;
    }
    qm_pg_rollback(svc->consumer_pg, NULL, 0);
    if (rc != QM_ETRANSIENT && failed_at != (size_t)-1) {
      if (failed_at != poison_idx) {
        poison_idx = failed_at;
        poison_attempts = 0;
      }
      poison_attempts++;
      snprintf(poison_error, sizeof(poison_error), "failed %d times: %s", poison_attempts,
               errstr);
    }
    const qm_event_in_t *fev = failed_at != (size_t)-1 ? qm_kmsg_event(msgs[failed_at]) : NULL;
    qm_log(QM_LOG_WARN, fev && fev->meta_valid ? fev->meta.subject : NULL, NULL,
           "batch of %zu events rolled back (%s: %s); retrying in %lld ms", n, qm_strerror(rc),
           errstr, (long long)backoff);
    if (rc == QM_ETRANSIENT) qm_pg_ensure(svc->consumer_pg, qm_mono_ms() + backoff);
    if (qm_shutdown_requested()) { result = QM_ESHUTDOWN; break; }
    qm_sleep_ms(backoff);
    if (qm_shutdown_requested()) { result = QM_ESHUTDOWN; break; }
    backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
  }
  free(outcomes);
  return result;
}

/* SIGHUP: the JWKS file (key rotation) and whatever the service reloads. */
static void qm_service_reload(qm_service_t *svc) {
  if (!strcmp(qm_config_str(svc->cfg, "QM_AUTH_MODE"), "rs256")) {
    char errstr[512];
    if (qm_auth_reload(svc->auth, errstr, sizeof(errstr)) == QM_OK)
      qm_log_info("JWKS reloaded from %s", qm_config_str(svc->cfg, "QM_AUTH_JWKS_FILE"));
    else
      qm_log_error("JWKS reload refused, keeping the current keys: %s", errstr);
  }
  if (svc->def->reload) svc->def->reload(svc, svc->app);
}

/* Deletes inbox rows older than QM_INBOX_RETENTION, a bounded number per call
 * so the consumer is never held up long; called between batches. */
static void qm_service_purge_inbox(qm_service_t *svc) {
  int64_t keep = qm_config_ms(svc->cfg, "QM_INBOX_RETENTION");
  int n;
  int64_t total = 0, t0 = qm_mono_ms();
  do {
    n = qm_inbox_purge(svc->consumer_pg, keep, 5000);
    if (n > 0) total += n;
  } while (n == 5000 && qm_mono_ms() - t0 < 1000 && !qm_shutdown_requested());
  if (n < 0) qm_log_warn("inbox purge failed (%s); retrying later", qm_strerror(n));
  else if (total > 0) qm_log_info("inbox purge: %lld rows older than %lld ms deleted", (long long)total, (long long)keep);
}

static void qm_service_consume(qm_service_t *svc) {
  size_t max = (size_t)qm_config_int(svc->cfg, "QM_CONSUMER_BATCH");
  int wait = (int)qm_config_ms(svc->cfg, "QM_CONSUMER_WAIT");
  qm_kmsg_t **msgs = qm_calloc(max, sizeof(*msgs));
  int64_t next_purge = qm_mono_ms() + 60000;
  while (!qm_shutdown_requested()) {
    if (qm_reload_take()) qm_service_reload(svc);
    if (qm_mono_ms() >= next_purge) {
      qm_service_purge_inbox(svc);
      next_purge = qm_mono_ms() + 60000;
    }
    size_t n = 0;
    int rc = qm_consumer_poll_batch(svc->consumer, msgs, max, wait, &n);
    if (n > 0) {
      int64_t t0 = qm_mono_us();
      int hrc = qm_service_handle_batch(svc, msgs, n);
      if (hrc == QM_OK) {
        for (size_t i = 0; i < n; i++) qm_consumer_store(svc->consumer, msgs[i]);
        qm_metrics_observe(qm_metrics_child(svc->m_batch_secs, NULL),
                           (double)(qm_mono_us() - t0) / 1e6);
        int64_t now = qm_now_ms();
        for (size_t i = 0; i < n; i++) {
          const qm_event_in_t *ev = qm_kmsg_event(msgs[i]);
          if (ev->timestamp_ms > 0)
            qm_metrics_observe(qm_metrics_child(svc->m_lag_secs, NULL),
                               (double)(now - ev->timestamp_ms) / 1000.0);
        }
      }
      for (size_t i = 0; i < n; i++) qm_kmsg_destroy(msgs[i]);
    }
    if (rc == QM_EIO) {
      qm_log_error("fatal Kafka consumer error; exiting with status 1 so the orchestrator "
                   "restarts the service");
      svc->exit_code = 1;
      qm_shutdown_request();
    }
  }
  free(msgs);
}

/* ------------------------------------------------------------ relay */

static int qm_service_publish(void *ctx, const qm_event_out_t *evs, size_t n, int *results) {
  qm_service_t *svc = ctx;
  char errstr[256] = "";
  /* Bounded well below QM_SHUTDOWN_TIMEOUT: undelivered rows stay in the outbox. */
  int rc = qm_producer_send_batch(svc->producer, evs, n, 10000, results, errstr, sizeof(errstr));
  if (rc != QM_OK) qm_log_warn("outbox publish: %s", errstr);
  return rc;
}

static double qm_service_outbox_lag(void *ctx) {
  qm_service_t *svc = ctx;
  qm_relay_stats_t st;
  qm_relay_stats(svc->relay, &st);
  return (double)st.oldest_unpublished_age_ms / 1000.0;
}

static double qm_service_outbox_published(void *ctx) {
  qm_service_t *svc = ctx;
  qm_relay_stats_t st;
  qm_relay_stats(svc->relay, &st);
  return (double)st.published_total;
}

/* ------------------------------------------------------------ readiness */

static int qm_service_ready_pg(void *ctx, char *why, size_t why_size) {
  qm_service_t *svc = ctx;
  pthread_mutex_lock(&svc->ready_lock);
  int rc = qm_pg_ping(svc->ready_pg);
  pthread_mutex_unlock(&svc->ready_lock);
  if (rc != QM_OK) qm_err(why, why_size, rc, "PostgreSQL did not answer (%s)", qm_strerror(rc));
  return rc;
}

/* Fails from the moment SIGTERM arrives, before the batch in hand finishes,
 * so the orchestrator stops sending traffic at once. */
static int qm_service_ready_running(void *ctx, char *why, size_t why_size) {
  QM_UNUSED(ctx);
  if (qm_shutdown_requested())
    return qm_err(why, why_size, QM_ESHUTDOWN, "shutting down");
  return QM_OK;
}

static int qm_service_ready_kafka(void *ctx, char *why, size_t why_size) {
  qm_service_t *svc = ctx;
  int rc = qm_producer_ping(svc->producer, 1000);
  if (rc != QM_OK) qm_err(why, why_size, rc, "no Kafka broker answered (%s)", qm_strerror(rc));
  return rc;
}

static int qm_service_ready_redis(void *ctx, char *why, size_t why_size) {
  qm_service_t *svc = ctx;
  pthread_mutex_lock(&svc->ready_lock);
  int rc = QM_OK;
  if (!svc->ready_redis) /* not reachable at start: try again now */
    svc->ready_redis = qm_redis_connect(qm_config_str(svc->cfg, "QM_REDIS_HOST"),
                                        (int)qm_config_int(svc->cfg, "QM_REDIS_PORT"), 1000, 1000,
                                        why, why_size);
  if (!svc->ready_redis)
    rc = QM_ETRANSIENT;
  else
    rc = qm_redis_ping(svc->ready_redis, why, why_size);
  pthread_mutex_unlock(&svc->ready_lock);
  return rc;
}

/* ------------------------------------------------------------ start-up */

static qm_migration_t *qm_service_migrations(const qm_service_def_t *def, size_t *n) {
  *n = def->n_migrations + 1;
  qm_migration_t *m = qm_calloc(*n, sizeof(*m));
  m[0] = qm_outbox_migration;
  for (size_t i = 0; i < def->n_migrations; i++) m[i + 1] = def->migrations[i];
  return m;
}

static int qm_service_load_config(qm_service_t *svc, int argc, char **argv) {
  const qm_service_def_t *def = svc->def;
  char prog[64];
  snprintf(prog, sizeof(prog), "qm-%s", def->name);
  svc->cfg = qm_config_new(prog);
  snprintf(svc->port_default, sizeof(svc->port_default), "%d", def->default_port);
  svc->port_def[0] = (qm_cfg_def_t){"QM_HTTP_PORT", QM_CFG_INT, svc->port_default,
                                    "Port of the HTTP API, health probes and metrics.", 1, 65535, 0};
  qm_config_add(svc->cfg, svc->port_def, 1);
  if (def->config) qm_config_add(svc->cfg, def->config, def->n_config);
  qm_config_add(svc->cfg, qm_service_config_defs, qm_service_config_defs_count);
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      qm_config_help(svc->cfg, stdout);
      return 0;
    }
    if (!strcmp(argv[i], "--config-doc")) {
      qm_config_markdown(svc->cfg, stdout);
      return 0;
    }
    fprintf(stderr, "%s: unknown argument '%s' (configuration is by environment; see --help)\n",
            prog, argv[i]);
    return 2;
  }
  char errstr[4096];
  if (qm_config_load(svc->cfg, NULL, NULL, errstr, sizeof(errstr)) != QM_OK) {
    qm_log_init(def->name, QM_LOG_INFO, NULL);
    qm_log(QM_LOG_FATAL, NULL, NULL, "%s; fix the environment and start again (see --help)",
           errstr);
    return 2;
  }
  qm_log_level_t level;
  if (qm_log_level_parse(qm_config_str(svc->cfg, "QM_LOG_LEVEL"), &level) != QM_OK) {
    qm_log_init(def->name, QM_LOG_INFO, NULL);
    qm_log(QM_LOG_FATAL, NULL, NULL,
           "invalid configuration: QM_LOG_LEVEL: '%s' is not one of debug, info, warn, error",
           qm_config_str(svc->cfg, "QM_LOG_LEVEL"));
    return 2;
  }
  const char *mode = qm_config_str(svc->cfg, "QM_AUTH_MODE");
  if (strcmp(mode, "hs256") && strcmp(mode, "rs256")) {
    qm_log_init(def->name, QM_LOG_INFO, NULL);
    qm_log(QM_LOG_FATAL, NULL, NULL,
           "invalid configuration: QM_AUTH_MODE: '%s' is not hs256 or rs256", mode);
    return 2;
  }
  if (!strcmp(mode, "rs256") && !*qm_config_str(svc->cfg, "QM_AUTH_JWKS_FILE")) {
    qm_log_init(def->name, QM_LOG_INFO, NULL);
    qm_log(QM_LOG_FATAL, NULL, NULL,
           "invalid configuration: QM_AUTH_JWKS_FILE: required when QM_AUTH_MODE=rs256");
    return 2;
  }
  qm_log_init(def->name, level, NULL);
  return -1; /* go on */
}

static int qm_service_start(qm_service_t *svc) {
  const qm_service_def_t *def = svc->def;
  const qm_config_t *cfg = svc->cfg;
  char errstr[1024] = "";
  char app_name[80];
  snprintf(app_name, sizeof(app_name), "qm-%s", def->name);
  const char *dsn = qm_config_str(cfg, "QM_PG_DSN");

  /* PostgreSQL first: wait for it (a pod may start before the database). */
  qm_pg_t *mig = NULL;
  for (int64_t backoff = 200; !mig && !qm_shutdown_requested();) {
    mig = qm_pg_connect_app(dsn, def->name, app_name, errstr, sizeof(errstr));
    if (!mig) {
      qm_log_warn("PostgreSQL not reachable (%s); retrying in %lld ms", errstr,
                  (long long)backoff);
      qm_sleep_ms(backoff);
      backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
    }
  }
  if (!mig) return 1;
  size_t n_migs;
  qm_migration_t *migs = qm_service_migrations(def, &n_migs);
  int rc = qm_pg_migrate(mig, def->name, migs, n_migs, errstr, sizeof(errstr));
  free(migs);
  qm_pg_destroy(mig);
  if (rc != QM_OK) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "schema migration failed: %s", errstr);
    return 1;
  }
  svc->pool = qm_pg_pool_new(dsn, def->name, app_name, (size_t)qm_config_int(cfg, "QM_PG_POOL_SIZE"),
                             errstr, sizeof(errstr));
  svc->ready_pg = qm_pg_connect_app(dsn, def->name, app_name, errstr, sizeof(errstr));
  svc->consumer_pg = qm_pg_connect_app(dsn, def->name, app_name, errstr, sizeof(errstr));
  if (!svc->pool || !svc->ready_pg || !svc->consumer_pg) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "PostgreSQL connections failed: %s", errstr);
    return 1;
  }

  if (def->uses_redis) {
    svc->ready_redis = qm_redis_connect(qm_config_str(cfg, "QM_REDIS_HOST"),
                                        (int)qm_config_int(cfg, "QM_REDIS_PORT"), 1000, 1000,
                                        errstr, sizeof(errstr));
    if (!svc->ready_redis) qm_log_warn("Redis not reachable yet (%s); readiness will report it", errstr);
  }

  const char *brokers = qm_config_str(cfg, "QM_KAFKA_BROKERS");
  rc = qm_producer_new(brokers, app_name, NULL, 0, NULL, NULL, &svc->producer, errstr,
                       sizeof(errstr));
  if (rc != QM_OK) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "Kafka producer: %s", errstr);
    return 1;
  }

  svc->metrics = qm_metrics_new();
  static const char *const ev_labels[] = {"topic", "outcome", NULL};
  svc->m_events = qm_metrics_counter(svc->metrics, "qm_consumer_events_total",
                                     "Consumed events by outcome (applied, duplicate, dead_letter, skipped).",
                                     ev_labels);
  svc->m_batch_secs = qm_metrics_histogram(svc->metrics, "qm_consumer_batch_duration_seconds",
                                           "Time to apply and commit one consumed batch.", NULL,
                                           NULL, 0);
  static const double age_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
  svc->m_lag_secs = qm_metrics_histogram(svc->metrics, "qm_consumer_event_age_seconds",
                                         "Age of an event (since it was produced) when applied.",
                                         NULL, age_bounds, QM_ARRAY_LEN(age_bounds));

  char relay_app[96];
  snprintf(relay_app, sizeof(relay_app), "qm-%s-relay", def->name);
  qm_relay_conf_t rconf = {
      .poll_ms = (int)qm_config_ms(cfg, "QM_OUTBOX_POLL"),
      .batch = (int)qm_config_int(cfg, "QM_OUTBOX_BATCH"),
      .app_name = relay_app,
  };
  svc->relay = qm_relay_new(dsn, def->name, qm_service_publish, svc, &rconf);
  qm_metrics_gauge_fn(svc->metrics, "qm_outbox_oldest_unpublished_seconds",
                      "Age of the oldest committed event not yet published (relay lag).",
                      qm_service_outbox_lag, svc);
  qm_metrics_gauge_fn(svc->metrics, "qm_outbox_published_events",
                      "Events this instance's relay has published since start.",
                      qm_service_outbox_published, svc);

  qm_auth_conf_t aconf = {
      .mode = !strcmp(qm_config_str(cfg, "QM_AUTH_MODE"), "rs256") ? QM_AUTH_RS256 : QM_AUTH_HS256,
      .hs256_secret = qm_config_str(cfg, "QM_AUTH_HS256_SECRET"),
      .jwks_path = qm_config_str(cfg, "QM_AUTH_JWKS_FILE"),
      .issuer = qm_config_str(cfg, "QM_AUTH_ISSUER"),
      .audience = qm_config_str(cfg, "QM_AUTH_AUDIENCE"),
      .leeway_s = (int)qm_config_int(cfg, "QM_AUTH_LEEWAY_S"),
  };
  rc = qm_auth_new(&aconf, &svc->auth, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "authentication: %s", errstr);
    return 2;
  }
  if (aconf.mode == QM_AUTH_HS256 && !strcmp(aconf.hs256_secret, QM_DEV_SECRET))
    qm_log_warn("QM_AUTH_HS256_SECRET is the development default: anyone can mint tokens; "
                "set a secret or use QM_AUTH_MODE=rs256 outside a laptop");

  qm_http_conf_t hconf = {
      .bind_addr = qm_config_str(cfg, "QM_HTTP_ADDR"),
      .port = (uint16_t)qm_config_int(cfg, "QM_HTTP_PORT"),
      .threads = (unsigned)qm_config_int(cfg, "QM_HTTP_THREADS"),
      .max_body_bytes = (size_t)qm_config_int(cfg, "QM_HTTP_MAX_BODY"),
      .auth = svc->auth,
      .metrics = svc->metrics,
  };
  rc = qm_http_new(&hconf, &svc->http, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "HTTP server: %s", errstr);
    return 1;
  }
  qm_http_ready_check(svc->http, "running", qm_service_ready_running, svc);
  qm_http_ready_check(svc->http, "postgres", qm_service_ready_pg, svc);
  qm_http_ready_check(svc->http, "kafka", qm_service_ready_kafka, svc);
  if (def->uses_redis) qm_http_ready_check(svc->http, "redis", qm_service_ready_redis, svc);

  if (def->init) {
    int irc = def->init(svc, &svc->app, errstr, sizeof(errstr));
    if (irc != QM_OK) {
      qm_log(QM_LOG_FATAL, NULL, NULL, "start-up failed: %s", errstr);
      return irc == QM_EINVAL ? 2 : 1; /* QM_EINVAL from init: configuration */
    }
  }

  if (def->n_consumes > 0) {
    const char **topics = qm_calloc(def->n_consumes, sizeof(char *));
    for (size_t i = 0; i < def->n_consumes; i++) topics[i] = qm_service_topic(svc, def->consumes[i]);
    const char *group = qm_config_str(cfg, "QM_CONSUMER_GROUP");
    char group_buf[128];
    if (!*group) {
      snprintf(group_buf, sizeof(group_buf), "%sqm-%s", qm_config_str(cfg, "QM_TOPIC_PREFIX"),
               def->name);
      group = group_buf;
    }
    int64_t session = qm_config_ms(cfg, "QM_KAFKA_SESSION_TIMEOUT");
    char p_session[64], p_heartbeat[64], p_instance[192];
    snprintf(p_session, sizeof(p_session), "session.timeout.ms=%lld", (long long)session);
    snprintf(p_heartbeat, sizeof(p_heartbeat), "heartbeat.interval.ms=%lld", (long long)(session / 3));
    const char *props[3] = {p_session, p_heartbeat, NULL};
    size_t n_props = 2;
    if (*qm_config_str(cfg, "QM_INSTANCE_ID")) {
      snprintf(p_instance, sizeof(p_instance), "group.instance.id=%s-%s", def->name,
               qm_config_str(cfg, "QM_INSTANCE_ID"));
      props[n_props++] = p_instance;
    }
    rc = qm_consumer_new(brokers, group, topics, def->n_consumes, props, n_props, &svc->consumer,
                         errstr, sizeof(errstr));
    free(topics);
    if (rc != QM_OK) {
      qm_log(QM_LOG_FATAL, NULL, NULL, "Kafka consumer: %s", errstr);
      return 1;
    }
  }

  if (qm_relay_start(svc->relay) != QM_OK ||
      qm_http_start(svc->http, errstr, sizeof(errstr)) != QM_OK) {
    qm_log(QM_LOG_FATAL, NULL, NULL, "start-up failed: %s", errstr);
    return 1;
  }
  qm_log_info("qm-%s ready: HTTP on %s:%d, %zu topic(s) consumed, schema %s", def->name,
              hconf.bind_addr, qm_http_port(svc->http), def->n_consumes, def->name);
  return 0;
}

/* Stops everything in the order that loses nothing, within the bound. */
static void qm_service_shutdown(qm_service_t *svc) {
  int64_t bound = svc->cfg ? qm_config_ms(svc->cfg, "QM_SHUTDOWN_TIMEOUT") : 5000;
  int64_t deadline = qm_mono_ms() + bound;
#define QM_LEFT() ((int)(deadline - qm_mono_ms() > 0 ? deadline - qm_mono_ms() : 0))
  qm_log_info("shutting down (bound %lld ms)", (long long)bound);
  if (svc->http) qm_http_begin_shutdown(svc->http);
  if (svc->def->stop && svc->app) svc->def->stop(svc, svc->app);
  if (svc->http) qm_http_stop(svc->http, QM_LEFT() / 2);
  if (svc->relay) qm_relay_stop(svc->relay, QM_LEFT() / 2);
  if (svc->producer) {
    int frc = qm_producer_flush(svc->producer, QM_LEFT());
    if (frc != QM_OK)
      qm_log_warn("producer flush incomplete (%s): the outbox still holds those events and "
                  "the next start publishes them", qm_strerror(frc));
  }
  if (svc->consumer) qm_consumer_close(svc->consumer);
#undef QM_LEFT
}

static void qm_service_free(qm_service_t *svc) {
  if (svc->def->fini && svc->app) svc->def->fini(svc, svc->app);
  qm_consumer_destroy(svc->consumer);
  qm_http_destroy(svc->http);
  qm_relay_destroy(svc->relay);
  qm_producer_destroy(svc->producer);
  qm_auth_destroy(svc->auth);
  qm_metrics_destroy(svc->metrics);
  qm_redis_destroy(svc->ready_redis);
  qm_pg_destroy(svc->consumer_pg);
  qm_pg_destroy(svc->ready_pg);
  qm_pg_pool_destroy(svc->pool);
  for (size_t i = 0; i < svc->n_topics; i++) {
    free(svc->topics[i].base);
    free(svc->topics[i].full);
  }
  free(svc->topics);
  qm_config_destroy(svc->cfg);
  pthread_mutex_destroy(&svc->ready_lock);
  pthread_mutex_destroy(&svc->topics_lock);
  free(svc);
}

int qm_service_main(int argc, char **argv, const qm_service_def_t *def) {
  qm_service_t *svc = qm_calloc(1, sizeof(*svc));
  svc->def = def;
  pthread_mutex_init(&svc->ready_lock, NULL);
  pthread_mutex_init(&svc->topics_lock, NULL);
  int rc = qm_service_load_config(svc, argc, argv);
  if (rc >= 0) {
    qm_service_free(svc);
    return rc;
  }
  qm_signals_install();
  qm_log_info("qm-%s starting", def->name);
  rc = qm_service_start(svc);
  if (rc == 0) {
    if (svc->consumer)
      qm_service_consume(svc);
    else
      while (!qm_shutdown_requested()) {
        if (qm_reload_take()) qm_service_reload(svc);
        qm_sleep_ms(200);
      }
  }
  qm_service_shutdown(svc);
  if (rc == 0) rc = svc->exit_code;
  qm_service_free(svc);
  qm_log_info("qm-%s stopped", def->name);
  return rc;
}
