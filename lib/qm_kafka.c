/*
 * qm_kafka: producer, consumer, dead letters and topic creation over
 * librdkafka 2.0.2. See qm_kafka.h for the contracts; this file keeps the
 * librdkafka details: configuration defaults that may not be overridden,
 * CloudEvents headers on the way out and their checks on the way in,
 * delivery-report bookkeeping for synchronous batches, and the rebalance
 * callback. librdkafka's own logs and errors are routed into qm_log.
 */
#include "qm_kafka.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_topics.h"

#include <librdkafka/rdkafka.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Defaults and bounds of the producer (see qm_producer_new()). */
#define QM_PRODUCER_LINGER_MS "2"
#define QM_PRODUCER_MSG_TIMEOUT_MS "30000"
#define QM_PRODUCER_MSG_TIMEOUT_MAX 300000L
/* How long qm_producer_destroy() serves the reports of purged messages. */
#define QM_PRODUCER_PURGE_WAIT_MS 2000
/* A delivery slot's status before its report arrived. */
#define QM_DR_PENDING 1

/* ------------------------------------------------------------ shared bits */

/* librdkafka logs through here (from its own threads) so that every line is
 * JSON like ours. syslog levels: 0-2 error; 3-4 warn (librdkafka reports a refused broker
 * connection at 3, which is transient); 5-6 info; 7 debug. */
static void qm_kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
  qm_log_level_t lvl = level <= 2 ? QM_LOG_ERROR
                       : level <= 4 ? QM_LOG_WARN
                       : level <= 6 ? QM_LOG_INFO
                                    : QM_LOG_DEBUG;
  qm_log(lvl, NULL, NULL, "librdkafka %s %s: %s", rk ? rd_kafka_name(rk) : "-", fac, buf);
}

/* Errors not tied to a message (brokers down, authentication, fatal). A
 * fatal error means the client is unusable: say so and what to do. */
static void qm_kafka_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque) {
  QM_UNUSED(opaque);
  if (err == RD_KAFKA_RESP_ERR__FATAL) {
    char fatal[512];
    rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
    qm_log_error("fatal Kafka error on %s: %s; the client must be recreated (the service "
                 "restarts it or exits)", rd_kafka_name(rk), fatal);
  } else if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
    qm_log_warn("Kafka client %s: all brokers are down (%s); check the broker list and "
                "that Kafka is running", rd_kafka_name(rk), reason);
  } else {
    qm_log_warn("Kafka client %s: %s (%s)", rd_kafka_name(rk), reason,
                rd_kafka_err2name((rd_kafka_resp_err_t)err));
  }
}

/* Maps a librdkafka error to our status codes. */
static int qm_kafka_status(rd_kafka_resp_err_t err) {
  switch (err) {
  case RD_KAFKA_RESP_ERR_NO_ERROR: return QM_OK;
  case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
  case RD_KAFKA_RESP_ERR__TIMED_OUT:
  case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT: return QM_ETIMEOUT;
  case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
  case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
  case RD_KAFKA_RESP_ERR_INVALID_MSG:
  case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
  case RD_KAFKA_RESP_ERR__INVALID_ARG:
  case RD_KAFKA_RESP_ERR_INVALID_PARTITIONS:
  case RD_KAFKA_RESP_ERR_INVALID_REPLICATION_FACTOR:
  case RD_KAFKA_RESP_ERR_INVALID_CONFIG: return QM_EINVAL;
  case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
  case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART: return QM_ENOTFOUND;
  case RD_KAFKA_RESP_ERR__QUEUE_FULL: return QM_ETRANSIENT;
  default: return QM_EIO;
  }
}

static bool qm_key_is(const char *key, const char *const *keys, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(key, keys[i]) == 0) return true;
  return false;
}

static int qm_kafka_conf_set(rd_kafka_conf_t *conf, const char *key, const char *value,
                             char *errstr, size_t errstr_size) {
  char rkerr[256];
  if (rd_kafka_conf_set(conf, key, value, rkerr, sizeof(rkerr)) != RD_KAFKA_CONF_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "Kafka property %s: %s", key, rkerr);
  return QM_OK;
}

/* Applies "key=value" properties, refusing the keys that the module fixes
 * (they carry its delivery guarantees). */
static int qm_kafka_conf_extra(rd_kafka_conf_t *conf, const char *const *props, size_t n_props,
                               const char *const *fixed, size_t n_fixed, char *errstr,
                               size_t errstr_size) {
  int rc = QM_OK;
  char key[256];
  if (n_props > 0 && !props)
    return qm_err(errstr, errstr_size, QM_EINVAL, "Kafka properties: NULL list");
  for (size_t i = 0; i < n_props; i++) {
    const char *eq = props[i] ? strchr(props[i], '=') : NULL;
    size_t klen = eq ? (size_t)(eq - props[i]) : 0;
    if (!eq || klen == 0 || klen >= sizeof(key)) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "Kafka property '%s' is not key=value",
                  props[i] ? props[i] : "(null)");
      goto out;
    }
    memcpy(key, props[i], klen);
    key[klen] = '\0';
    if (qm_key_is(key, fixed, n_fixed)) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL,
                  "Kafka property %s cannot be overridden: the delivery guarantees rely on it",
                  key);
      goto out;
    }
    rc = qm_kafka_conf_set(conf, key, eq + 1, errstr, errstr_size);
    if (rc) goto out;
  }
out:
  return rc;
}

/* A readiness probe: a metadata request answered by some broker. */
static int qm_kafka_ping(rd_kafka_t *rk, int timeout_ms) {
  const struct rd_kafka_metadata *md = NULL;
  rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, NULL, &md, timeout_ms < 0 ? 0 : timeout_ms);
  if (md) rd_kafka_metadata_destroy(md);
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return QM_OK;
  return err == RD_KAFKA_RESP_ERR__TIMED_OUT ? QM_ETIMEOUT : QM_EIO;
}

/* --------------------------------------------------------------- producer */

typedef struct qm_batch qm_batch_t;

/* Per-message delivery bookkeeping, passed as librdkafka's msg opaque. For
 * qm_producer_send() a slot is allocated per message and freed by its report;
 * for a batch the slots live in the batch. */
typedef struct qm_dr_slot {
  qm_batch_t *batch; /* NULL for qm_producer_send() */
  void *opaque;      /* the caller's msg_opaque (send only) */
  atomic_int status; /* QM_DR_PENDING until the report */
  atomic_int rkerr;  /* the librdkafka error of the report */
} qm_dr_slot_t;

/* A synchronous batch. Reference counted: the caller holds one reference and
 * every enqueued message one, so a report that arrives after the caller gave
 * up (timeout) still writes into live memory; the last one frees. */
struct qm_batch {
  atomic_size_t refs;
  atomic_size_t pending;
  size_t n;
  qm_dr_slot_t slots[];
};

struct qm_producer {
  rd_kafka_t *rk;
  qm_delivery_cb_t cb;
  void *cb_ctx;
};

static void qm_batch_unref(qm_batch_t *b) {
  if (atomic_fetch_sub(&b->refs, 1) == 1) free(b);
}

/* The reason text for a failed report; fatal errors carry their cause. */
static void qm_producer_reason(rd_kafka_t *rk, rd_kafka_resp_err_t err, char *out,
                               size_t out_size) {
  if (err == RD_KAFKA_RESP_ERR__FATAL) {
    char fatal[200];
    rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
    qm_err(out, out_size, QM_EIO, "fatal producer error: %s", fatal);
  } else {
    snprintf(out, out_size, "%s", rd_kafka_err2str(err));
  }
}

static int qm_producer_dr_status(rd_kafka_resp_err_t err) {
  if (err == RD_KAFKA_RESP_ERR__FATAL || err == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
      err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
    return QM_EIO;
  return qm_kafka_status(err);
}

static void qm_producer_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque) {
  qm_producer_t *p = opaque;
  qm_dr_slot_t *slot = rkm->_private;
  if (!slot) return;
  int status = qm_producer_dr_status(rkm->err);
  if (slot->batch) {
    qm_batch_t *b = slot->batch;
    atomic_store(&slot->rkerr, (int)rkm->err);
    atomic_store(&slot->status, status);
    atomic_fetch_sub(&b->pending, 1);
    qm_batch_unref(b);
    return;
  }
  if (p->cb) {
    char reason[300] = "";
    if (status != QM_OK) qm_producer_reason(rk, rkm->err, reason, sizeof(reason));
    p->cb(p->cb_ctx, slot->opaque, status, reason);
  }
  free(slot);
}

int qm_producer_new(const char *brokers, const char *client_id, const char *const *props,
                    size_t n_props, qm_delivery_cb_t cb, void *cb_ctx, qm_producer_t **out,
                    char *errstr, size_t errstr_size) {
  static const char *const fixed[] = {"enable.idempotence", "acks", "request.required.acks"};
  int rc = QM_OK;
  rd_kafka_conf_t *conf = NULL;
  qm_producer_t *p = NULL;
  char rkerr[512];

  if (!brokers || !*brokers || !out) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "producer: brokers are required");
    goto out;
  }
  conf = rd_kafka_conf_new();
  if ((rc = qm_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "client.id", client_id && *client_id ? client_id : "qm",
                              errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "enable.idempotence", "true", errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "acks", "all", errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "linger.ms", QM_PRODUCER_LINGER_MS, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "message.timeout.ms", QM_PRODUCER_MSG_TIMEOUT_MS, errstr,
                              errstr_size)))
    goto out;
  rc = qm_kafka_conf_extra(conf, props, n_props, fixed, QM_ARRAY_LEN(fixed), errstr,
                           errstr_size);
  if (rc) goto out;

  char val[32] = "";
  size_t val_size = sizeof(val);
  long timeout = 0;
  if (rd_kafka_conf_get(conf, "message.timeout.ms", val, &val_size) == RD_KAFKA_CONF_OK)
    timeout = strtol(val, NULL, 10);
  if (timeout < 1 || timeout > QM_PRODUCER_MSG_TIMEOUT_MAX) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "Kafka property message.timeout.ms must be between 1 and %ld (got %s): every "
                "message needs a delivery report in bounded time",
                QM_PRODUCER_MSG_TIMEOUT_MAX, val);
    goto out;
  }

  p = qm_calloc(1, sizeof(*p));
  p->cb = cb;
  p->cb_ctx = cb_ctx;
  rd_kafka_conf_set_opaque(conf, p);
  rd_kafka_conf_set_dr_msg_cb(conf, qm_producer_dr_cb);
  rd_kafka_conf_set_log_cb(conf, qm_kafka_log_cb);
  rd_kafka_conf_set_error_cb(conf, qm_kafka_error_cb);
  p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rkerr, sizeof(rkerr));
  if (!p->rk) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot create Kafka producer: %s", rkerr);
    goto out;
  }
  conf = NULL; /* owned by p->rk now */
  *out = p;
  p = NULL;
out:
  if (conf) rd_kafka_conf_destroy(conf);
  free(p);
  return rc;
}

static size_t qm_field_len(const char *s, size_t cap) { return strnlen(s, cap); }

/* Checks an event before anything is enqueued. */
static int qm_event_out_check(const qm_event_out_t *ev, char *errstr, size_t errstr_size) {
  if (!ev || !ev->topic || !*ev->topic)
    return qm_err(errstr, errstr_size, QM_EINVAL, "event has no topic");
  if ((!ev->payload && ev->payload_len) || (!ev->key && ev->key_len) ||
      (!ev->headers && ev->n_headers))
    return qm_err(errstr, errstr_size, QM_EINVAL, "event for %s: NULL data with a length",
                  ev->topic);
  for (size_t i = 0; i < ev->n_headers; i++)
    if (!ev->headers[i].name || !*ev->headers[i].name ||
        (!ev->headers[i].value && ev->headers[i].value_len))
      return qm_err(errstr, errstr_size, QM_EINVAL, "event for %s: header %zu is malformed",
                    ev->topic, i);
  const qm_event_meta_t *m = &ev->meta;
  if (m->id[0] && (!m->source[0] || !m->type[0]))
    return qm_err(errstr, errstr_size, QM_EINVAL, "event %.40s for %s has no %s", m->id,
                  ev->topic, m->source[0] ? "ce_type" : "ce_source");
  return QM_OK;
}

static void qm_header_add_str(rd_kafka_headers_t *hdrs, const char *name, const char *value,
                              size_t cap) {
  rd_kafka_header_add(hdrs, name, -1, value, (ssize_t)qm_field_len(value, cap));
}

/* CloudEvents binary mode: the attributes as ce_* headers (when the event has
 * an id), then the extra headers. Caller frees with rd_kafka_headers_destroy()
 * unless librdkafka took them. */
static rd_kafka_headers_t *qm_event_headers(const qm_event_out_t *ev) {
  const qm_event_meta_t *m = &ev->meta;
  rd_kafka_headers_t *hdrs = rd_kafka_headers_new(ev->n_headers + 8);
  if (m->id[0]) {
    char ts[40];
    qm_time_format_rfc3339(m->time_ms, ts, sizeof(ts));
    qm_header_add_str(hdrs, "ce_specversion", QM_CE_SPECVERSION, sizeof(QM_CE_SPECVERSION));
    qm_header_add_str(hdrs, "ce_id", m->id, sizeof(m->id));
    qm_header_add_str(hdrs, "ce_source", m->source, sizeof(m->source));
    qm_header_add_str(hdrs, "ce_type", m->type, sizeof(m->type));
    qm_header_add_str(hdrs, "ce_time", ts, sizeof(ts));
    if (m->subject[0]) qm_header_add_str(hdrs, "ce_subject", m->subject, sizeof(m->subject));
    if (m->content_type[0])
      qm_header_add_str(hdrs, "content-type", m->content_type, sizeof(m->content_type));
    if (m->traceparent[0])
      qm_header_add_str(hdrs, "traceparent", m->traceparent, sizeof(m->traceparent));
  }
  for (size_t i = 0; i < ev->n_headers; i++)
    rd_kafka_header_add(hdrs, ev->headers[i].name, -1, ev->headers[i].value,
                        (ssize_t)ev->headers[i].value_len);
  return hdrs;
}

/* Enqueues one checked event with opaque, serving delivery reports and
 * retrying while the local queue is full, until deadline (monotonic ms). */
static int qm_producer_enqueue(qm_producer_t *p, const qm_event_out_t *ev, void *opaque,
                               int64_t deadline, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  char fatal[256];
  rd_kafka_headers_t *hdrs = NULL;

  if (rd_kafka_fatal_error(p->rk, fatal, sizeof(fatal))) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "fatal producer error: %s", fatal);
    goto out;
  }
  hdrs = qm_event_headers(ev);
  for (;;) {
    rd_kafka_resp_err_t err = rd_kafka_producev(
        p->rk, RD_KAFKA_V_TOPIC(ev->topic), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_KEY((void *)ev->key, ev->key_len),
        RD_KAFKA_V_VALUE((void *)ev->payload, ev->payload_len), RD_KAFKA_V_HEADERS(hdrs),
        RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      hdrs = NULL; /* librdkafka owns them now */
      break;
    }
    if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
      int64_t left = deadline - qm_mono_ms();
      if (left <= 0) {
        rc = qm_err(errstr, errstr_size, QM_ETIMEOUT,
                    "producer queue full for %s: the broker is not keeping up or is down",
                    ev->topic);
        goto out;
      }
      rd_kafka_poll(p->rk, left < 100 ? (int)left : 100);
      continue;
    }
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
      rd_kafka_fatal_error(p->rk, fatal, sizeof(fatal));
      rc = qm_err(errstr, errstr_size, QM_EIO, "fatal producer error: %s", fatal);
    } else {
      rc = qm_err(errstr, errstr_size, qm_kafka_status(err), "cannot produce to %s: %s",
                  ev->topic, rd_kafka_err2str(err));
      if (rc == QM_ETRANSIENT || rc == QM_OK) rc = QM_EIO;
    }
    goto out;
  }
out:
  if (hdrs) rd_kafka_headers_destroy(hdrs);
  return rc;
}

int qm_producer_send(qm_producer_t *p, const qm_event_out_t *ev, void *msg_opaque,
                     int timeout_ms, char *errstr, size_t errstr_size) {
  int rc = qm_event_out_check(ev, errstr, errstr_size);
  if (rc) return rc;
  qm_dr_slot_t *slot = qm_calloc(1, sizeof(*slot));
  slot->opaque = msg_opaque;
  atomic_init(&slot->status, QM_DR_PENDING);
  atomic_init(&slot->rkerr, 0);
  rc = qm_producer_enqueue(p, ev, slot, qm_mono_ms() + (timeout_ms < 0 ? 0 : timeout_ms),
                           errstr, errstr_size);
  if (rc) free(slot); /* never enqueued: no report will come */
  return rc;
}

int qm_producer_poll(qm_producer_t *p, int timeout_ms) {
  return rd_kafka_poll(p->rk, timeout_ms < 0 ? 0 : timeout_ms);
}

int qm_producer_flush(qm_producer_t *p, int timeout_ms) {
  char fatal[256];
  rd_kafka_resp_err_t err = rd_kafka_flush(p->rk, timeout_ms < 0 ? 0 : timeout_ms);
  if (rd_kafka_fatal_error(p->rk, fatal, sizeof(fatal))) return QM_EIO;
  return err == RD_KAFKA_RESP_ERR_NO_ERROR ? QM_OK : QM_ETIMEOUT;
}

int qm_producer_send_batch(qm_producer_t *p, const qm_event_out_t *evs, size_t n,
                           int timeout_ms, int *results, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  qm_batch_t *b = NULL;
  char first_err[320] = "";
  size_t failed = 0, enqueued = 0;
  int64_t deadline = qm_mono_ms() + (timeout_ms < 0 ? 0 : timeout_ms);

  if (n == 0) goto out;
  if (!evs || !results) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "send_batch: NULL events or results");
    goto out;
  }
  b = qm_malloc(sizeof(*b) + n * sizeof(b->slots[0]));
  atomic_init(&b->refs, 1);
  atomic_init(&b->pending, 0);
  b->n = n;
  for (size_t i = 0; i < n; i++) {
    b->slots[i].batch = b;
    b->slots[i].opaque = NULL;
    atomic_init(&b->slots[i].status, QM_DR_PENDING);
    atomic_init(&b->slots[i].rkerr, 0);
  }

  /* Enqueue in order; stop at the first failure so that no later event of
   * the same key overtakes the one that failed. */
  for (; enqueued < n; enqueued++) {
    char why[256];
    int erc = qm_event_out_check(&evs[enqueued], why, sizeof(why));
    if (erc == QM_OK) {
      atomic_fetch_add(&b->refs, 1);
      atomic_fetch_add(&b->pending, 1);
      erc = qm_producer_enqueue(p, &evs[enqueued], &b->slots[enqueued], deadline, why,
                                sizeof(why));
      if (erc) {
        atomic_fetch_sub(&b->pending, 1);
        atomic_fetch_sub(&b->refs, 1); /* cannot reach 0: we hold one */
      }
    }
    if (erc) {
      atomic_store(&b->slots[enqueued].status, erc);
      snprintf(first_err, sizeof(first_err), "event %zu not enqueued: %s", enqueued, why);
      for (size_t j = enqueued + 1; j < n; j++)
        atomic_store(&b->slots[j].status, QM_ETRANSIENT);
      break;
    }
  }

  /* Wait for the reports of what was enqueued. */
  while (atomic_load(&b->pending) > 0) {
    int64_t left = deadline - qm_mono_ms();
    if (left <= 0) break;
    rd_kafka_poll(p->rk, left < 50 ? (int)left : 50);
  }

  for (size_t i = 0; i < n; i++) {
    int st = atomic_load(&b->slots[i].status);
    if (st == QM_DR_PENDING) st = QM_ETIMEOUT;
    results[i] = st;
    if (st == QM_OK) continue;
    if (failed++ == 0) {
      rc = st;
      if (!first_err[0]) {
        char reason[256];
        if (st == QM_ETIMEOUT && atomic_load(&b->slots[i].rkerr) == 0)
          snprintf(reason, sizeof(reason), "no delivery report within %d ms", timeout_ms);
        else
          qm_producer_reason(p->rk, (rd_kafka_resp_err_t)atomic_load(&b->slots[i].rkerr),
                             reason, sizeof(reason));
        snprintf(first_err, sizeof(first_err), "event %zu to %s: %s", i, evs[i].topic, reason);
      }
    }
  }
  if (failed)
    qm_err(errstr, errstr_size, rc, "%zu of %zu events not delivered; first: %s", failed, n,
           first_err);
out:
  if (b) qm_batch_unref(b);
  return rc;
}

bool qm_producer_fatal(qm_producer_t *p, char *errstr, size_t errstr_size) {
  char fatal[256];
  if (!rd_kafka_fatal_error(p->rk, fatal, sizeof(fatal))) return false;
  if (errstr) qm_strlcpy(errstr, fatal, errstr_size);
  return true;
}

int qm_producer_ping(qm_producer_t *p, int timeout_ms) { return qm_kafka_ping(p->rk, timeout_ms); }

void qm_producer_destroy(qm_producer_t *p) {
  if (!p) return;
  if (rd_kafka_flush(p->rk, QM_PRODUCER_DESTROY_FLUSH_MS) != RD_KAFKA_RESP_ERR_NO_ERROR) {
    qm_log_warn("Kafka producer %s: %d messages still undelivered after %d ms at shutdown; "
                "purging them (the outbox resends them on the next start)",
                rd_kafka_name(p->rk), rd_kafka_outq_len(p->rk), QM_PRODUCER_DESTROY_FLUSH_MS);
    rd_kafka_purge(p->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    int64_t until = qm_mono_ms() + QM_PRODUCER_PURGE_WAIT_MS;
    while (rd_kafka_outq_len(p->rk) > 0 && qm_mono_ms() < until) rd_kafka_poll(p->rk, 50);
  }
  rd_kafka_destroy(p->rk);
  free(p);
}

/* --------------------------------------------------------------- consumer */

struct qm_consumer {
  rd_kafka_t *rk;
  bool closed;
};

struct qm_kmsg {
  rd_kafka_message_t *rkm;
  qm_event_in_t ev;
  qm_header_t *headers;
};

/* "topic[0],topic[1]" for the rebalance log line, truncated with "...". */
static void qm_partitions_text(const rd_kafka_topic_partition_list_t *parts, char *out,
                               size_t out_size) {
  size_t used = 0;
  out[0] = '\0';
  for (int i = 0; parts && i < parts->cnt; i++) {
    int w = snprintf(out + used, out_size - used, "%s%s[%d]", i ? "," : "",
                     parts->elems[i].topic, (int)parts->elems[i].partition);
    if (w < 0 || (size_t)w >= out_size - used) {
      if (out_size > 4) memcpy(out + out_size - 4, "...", 4);
      return;
    }
    used += (size_t)w;
  }
}

/* Eager rebalancing (the default): take the whole new assignment, drop the
 * whole old one. Cooperative protocols (if set through properties) need the
 * incremental calls instead. */
static void qm_consumer_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                                     rd_kafka_topic_partition_list_t *parts, void *opaque) {
  QM_UNUSED(opaque);
  char text[1024];
  const char *proto = rd_kafka_rebalance_protocol(rk);
  bool cooperative = proto && strcmp(proto, "COOPERATIVE") == 0;
  rd_kafka_error_t *error = NULL;
  rd_kafka_resp_err_t aerr = RD_KAFKA_RESP_ERR_NO_ERROR;
  qm_partitions_text(parts, text, sizeof(text));

  if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
    qm_log_info("Kafka consumer %s: assigned %d partitions: %s", rd_kafka_name(rk),
                parts ? parts->cnt : 0, text);
    if (cooperative)
      error = rd_kafka_incremental_assign(rk, parts);
    else
      aerr = rd_kafka_assign(rk, parts);
  } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
    if (rd_kafka_assignment_lost(rk))
      qm_log_warn("Kafka consumer %s: lost %d partitions (%s): their unstored offsets will be "
                  "redelivered to another member", rd_kafka_name(rk), parts ? parts->cnt : 0,
                  text);
    else
      qm_log_info("Kafka consumer %s: revoked %d partitions: %s", rd_kafka_name(rk),
                  parts ? parts->cnt : 0, text);
    if (cooperative)
      error = rd_kafka_incremental_unassign(rk, parts);
    else
      aerr = rd_kafka_assign(rk, NULL);
  } else {
    qm_log_error("Kafka consumer %s: rebalance failed: %s; dropping the assignment",
                 rd_kafka_name(rk), rd_kafka_err2str(err));
    aerr = rd_kafka_assign(rk, NULL);
  }
  if (error) {
    qm_log_error("Kafka consumer %s: incremental assignment failed: %s", rd_kafka_name(rk),
                 rd_kafka_error_string(error));
    rd_kafka_error_destroy(error);
  }
  if (aerr)
    qm_log_error("Kafka consumer %s: assignment failed: %s", rd_kafka_name(rk),
                 rd_kafka_err2str(aerr));
}

int qm_consumer_new(const char *brokers, const char *group_id, const char *const *topics,
                    size_t n_topics, const char *const *props, size_t n_props,
                    qm_consumer_t **out, char *errstr, size_t errstr_size) {
  static const char *const fixed[] = {"enable.auto.offset.store", "enable.auto.commit",
                                      "group.id", "enable.partition.eof"};
  int rc = QM_OK;
  rd_kafka_conf_t *conf = NULL;
  rd_kafka_t *rk = NULL;
  rd_kafka_topic_partition_list_t *subs = NULL;
  char rkerr[512];

  if (!brokers || !*brokers || !group_id || !*group_id || !out || n_topics == 0 || !topics) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "consumer: brokers, group id and at least one topic are required");
    goto out;
  }
  conf = rd_kafka_conf_new();
  if ((rc = qm_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "group.id", group_id, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "client.id", group_id, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr,
                              errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "enable.auto.commit", "true", errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "enable.partition.eof", "false", errstr, errstr_size)))
    goto out;
  rc = qm_kafka_conf_extra(conf, props, n_props, fixed, QM_ARRAY_LEN(fixed), errstr,
                           errstr_size);
  if (rc) goto out;
  rd_kafka_conf_set_log_cb(conf, qm_kafka_log_cb);
  rd_kafka_conf_set_error_cb(conf, qm_kafka_error_cb);
  rd_kafka_conf_set_rebalance_cb(conf, qm_consumer_rebalance_cb);

  rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, rkerr, sizeof(rkerr));
  if (!rk) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot create Kafka consumer: %s", rkerr);
    goto out;
  }
  conf = NULL; /* owned by rk now */
  rd_kafka_poll_set_consumer(rk);

  subs = rd_kafka_topic_partition_list_new((int)n_topics);
  for (size_t i = 0; i < n_topics; i++) {
    if (!topics[i] || !*topics[i]) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "consumer: topic %zu is empty", i);
      goto out;
    }
    rd_kafka_topic_partition_list_add(subs, topics[i], RD_KAFKA_PARTITION_UA);
  }
  rd_kafka_resp_err_t err = rd_kafka_subscribe(rk, subs);
  if (err) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot subscribe: %s", rd_kafka_err2str(err));
    goto out;
  }
  qm_consumer_t *c = qm_calloc(1, sizeof(*c));
  c->rk = rk;
  rk = NULL;
  *out = c;
out:
  if (subs) rd_kafka_topic_partition_list_destroy(subs);
  if (rk) rd_kafka_destroy(rk);
  if (conf) rd_kafka_conf_destroy(conf);
  return rc;
}

/* The last header with this name (Kafka allows repeats; the last one wins). */
static const qm_header_t *qm_header_find(const qm_event_in_t *ev, const char *name) {
  for (size_t i = ev->n_headers; i-- > 0;)
    if (strcmp(ev->headers[i].name, name) == 0) return &ev->headers[i];
  return NULL;
}

/* Copies a text header into a fixed meta field. Returns false (with the
 * reason in why) when it is required and missing or empty, or when it is too
 * long or holds a NUL byte. */
static bool qm_meta_text(const qm_event_in_t *ev, const char *name, bool required, char *dst,
                         size_t dst_size, char *why, size_t why_size) {
  const qm_header_t *h = qm_header_find(ev, name);
  dst[0] = '\0';
  if (!h || !h->value || h->value_len == 0) {
    if (required) snprintf(why, why_size, "%s header %s", h ? "empty" : "missing", name);
    return !required;
  }
  if (memchr(h->value, '\0', h->value_len)) {
    snprintf(why, why_size, "bad header %s: contains a NUL byte", name);
    return false;
  }
  if (h->value_len >= dst_size) {
    snprintf(why, why_size, "bad header %s: %zu bytes, at most %zu allowed", name, h->value_len,
             dst_size - 1);
    return false;
  }
  memcpy(dst, h->value, h->value_len);
  dst[h->value_len] = '\0';
  return true;
}

/* Parses the CloudEvents attributes of ev's headers into ev->meta. Every
 * field that can be read is filled (for logs); the first problem found
 * becomes meta_error. */
static void qm_event_meta_parse(qm_event_in_t *ev) {
  qm_event_meta_t *m = &ev->meta;
  char why[160];
  char spec[16], ts[64];
  bool ok = true;
  memset(m, 0, sizeof(*m));
  ev->meta_error[0] = '\0';

#define QM_META_FAIL()                                                                     \
  do {                                                                                     \
    if (ok) qm_strlcpy(ev->meta_error, why, sizeof(ev->meta_error));                       \
    ok = false;                                                                            \
  } while (0)

  if (!qm_meta_text(ev, "ce_specversion", true, spec, sizeof(spec), why, sizeof(why))) {
    QM_META_FAIL();
  } else if (strcmp(spec, QM_CE_SPECVERSION) != 0) {
    snprintf(why, sizeof(why), "bad header ce_specversion: '%s', want " QM_CE_SPECVERSION, spec);
    QM_META_FAIL();
  }
  if (!qm_meta_text(ev, "ce_id", true, m->id, sizeof(m->id), why, sizeof(why))) QM_META_FAIL();
  if (!qm_meta_text(ev, "ce_source", true, m->source, sizeof(m->source), why, sizeof(why)))
    QM_META_FAIL();
  if (!qm_meta_text(ev, "ce_type", true, m->type, sizeof(m->type), why, sizeof(why)))
    QM_META_FAIL();
  if (!qm_meta_text(ev, "ce_time", false, ts, sizeof(ts), why, sizeof(why))) {
    QM_META_FAIL();
  } else if (!ts[0] && qm_header_find(ev, "ce_time")) {
    snprintf(why, sizeof(why), "bad header ce_time: empty");
    QM_META_FAIL();
  } else if (ts[0] && qm_time_parse_rfc3339(ts, &m->time_ms) != QM_OK) {
    snprintf(why, sizeof(why), "bad header ce_time: '%s' is not RFC 3339", ts);
    QM_META_FAIL();
  }
  if (!qm_meta_text(ev, "ce_subject", false, m->subject, sizeof(m->subject), why, sizeof(why)))
    QM_META_FAIL();
  if (!qm_meta_text(ev, "content-type", false, m->content_type, sizeof(m->content_type), why,
                    sizeof(why)))
    QM_META_FAIL();
  /* A bad traceparent does not make the event invalid: tracing starts anew. */
  if (!qm_meta_text(ev, "traceparent", false, m->traceparent, sizeof(m->traceparent), why,
                    sizeof(why)))
    m->traceparent[0] = '\0';
#undef QM_META_FAIL

  ev->meta_valid = ok;
}

/* Wraps a consumed message; takes ownership of rkm. */
static qm_kmsg_t *qm_kmsg_wrap(rd_kafka_message_t *rkm) {
  qm_kmsg_t *m = qm_calloc(1, sizeof(*m));
  qm_event_in_t *ev = &m->ev;
  rd_kafka_headers_t *hdrs = NULL;
  rd_kafka_timestamp_type_t tstype;

  m->rkm = rkm;
  ev->topic = rd_kafka_topic_name(rkm->rkt);
  ev->partition = rkm->partition;
  ev->offset = rkm->offset;
  ev->timestamp_ms = rd_kafka_message_timestamp(rkm, &tstype);
  if (ev->timestamp_ms < 0) ev->timestamp_ms = 0;
  ev->key = rkm->key;
  ev->key_len = rkm->key_len;
  ev->payload = rkm->payload;
  ev->payload_len = rkm->len;
  if (rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR && hdrs) {
    size_t cnt = rd_kafka_header_cnt(hdrs);
    m->headers = qm_calloc(cnt ? cnt : 1, sizeof(*m->headers));
    size_t k = 0;
    for (size_t i = 0; i < cnt; i++) {
      const char *name;
      const void *val;
      size_t size;
      if (rd_kafka_header_get_all(hdrs, i, &name, &val, &size) != RD_KAFKA_RESP_ERR_NO_ERROR)
        break;
      m->headers[k].name = name;
      m->headers[k].value = val;
      m->headers[k].value_len = val ? size : 0;
      k++;
    }
    ev->headers = m->headers;
    ev->n_headers = k;
  }
  qm_event_meta_parse(ev);
  return m;
}

const qm_event_in_t *qm_kmsg_event(const qm_kmsg_t *m) { return &m->ev; }

void qm_kmsg_destroy(qm_kmsg_t *m) {
  if (!m) return;
  rd_kafka_message_destroy(m->rkm);
  free(m->headers);
  free(m);
}

/* Fatal consumer errors (static membership fenced, ...): logged, QM_EIO. */
static int qm_consumer_check_fatal(qm_consumer_t *c) {
  char fatal[512];
  if (!rd_kafka_fatal_error(c->rk, fatal, sizeof(fatal))) return QM_OK;
  qm_log_error("Kafka consumer %s: fatal error: %s; the consumer must be recreated",
               rd_kafka_name(c->rk), fatal);
  return QM_EIO;
}

int qm_consumer_poll_batch(qm_consumer_t *c, qm_kmsg_t **msgs, size_t max, int max_wait_ms,
                           size_t *n) {
  int rc = QM_OK;
  size_t got = 0;
  int64_t deadline = qm_mono_ms() + (max_wait_ms < 0 ? 0 : max_wait_ms);

  if (!c || !msgs || !n || max == 0) return QM_EINVAL;
  if (c->closed) return QM_ESHUTDOWN;
  if ((rc = qm_consumer_check_fatal(c))) goto out;

  while (got < max) {
    int wait = 0;
    if (got == 0) {
      int64_t left = deadline - qm_mono_ms();
      wait = left > 0 ? (int)left : 0;
    }
    rd_kafka_message_t *rkm = rd_kafka_consumer_poll(c->rk, wait);
    if (!rkm) {
      if ((rc = qm_consumer_check_fatal(c))) goto out;
      if (got > 0 || qm_mono_ms() >= deadline) break;
      continue;
    }
    if (rkm->err) {
      rd_kafka_resp_err_t err = rkm->err;
      if (err == RD_KAFKA_RESP_ERR__FATAL) {
        rd_kafka_message_destroy(rkm);
        rc = qm_consumer_check_fatal(c);
        if (!rc) rc = QM_EIO;
        goto out;
      }
      if (err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
        qm_log_warn("Kafka consumer %s: %s (%s, topic %s); continuing", rd_kafka_name(c->rk),
                    rd_kafka_message_errstr(rkm), rd_kafka_err2name(err),
                    rkm->rkt ? rd_kafka_topic_name(rkm->rkt) : "-");
      rd_kafka_message_destroy(rkm);
      continue;
    }
    msgs[got++] = qm_kmsg_wrap(rkm);
  }
out:
  *n = got;
  return rc;
}

int qm_consumer_store(qm_consumer_t *c, const qm_kmsg_t *m) {
  int rc = QM_OK;
  rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_t *tp =
      rd_kafka_topic_partition_list_add(list, m->ev.topic, m->ev.partition);
  tp->offset = m->ev.offset + 1;
  rd_kafka_resp_err_t err = rd_kafka_offsets_store(c->rk, list);
  if (!err) err = tp->err;
  if (err == RD_KAFKA_RESP_ERR__STATE || err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION) {
    qm_log_info("Kafka consumer %s: cannot store offset %lld of %s[%d]: partition no longer "
                "assigned; its new owner will redeliver and drop it as a duplicate",
                rd_kafka_name(c->rk), (long long)m->ev.offset, m->ev.topic,
                (int)m->ev.partition);
    rc = QM_ECONFLICT;
  } else if (err) {
    qm_log_error("Kafka consumer %s: cannot store offset %lld of %s[%d]: %s",
                 rd_kafka_name(c->rk), (long long)m->ev.offset, m->ev.topic,
                 (int)m->ev.partition, rd_kafka_err2str(err));
    rc = QM_EIO;
  }
  rd_kafka_topic_partition_list_destroy(list);
  return rc;
}

int qm_consumer_close(qm_consumer_t *c) {
  if (c->closed) return QM_OK;
  c->closed = true;
  rd_kafka_resp_err_t err = rd_kafka_consumer_close(c->rk);
  if (err) {
    qm_log_error("Kafka consumer %s: close failed: %s; uncommitted offsets will be "
                 "redelivered", rd_kafka_name(c->rk), rd_kafka_err2str(err));
    return QM_EIO;
  }
  return QM_OK;
}

int qm_consumer_ping(qm_consumer_t *c, int timeout_ms) { return qm_kafka_ping(c->rk, timeout_ms); }

void qm_consumer_destroy(qm_consumer_t *c) {
  if (!c) return;
  qm_consumer_close(c);
  rd_kafka_destroy(c->rk);
  free(c);
}

/* ------------------------------------------------------------ dead letters */

static void qm_dlq_header(qm_header_t *h, const char *name, const char *value) {
  h->name = name;
  h->value = value;
  h->value_len = strlen(value);
}

int qm_dlq_build(const qm_event_in_t *in, const char *service, const char *error,
                 qm_event_out_t *out, qm_header_t *storage, size_t storage_cap,
                 qm_dlq_buf_t *buf, char *errstr, size_t errstr_size) {
  if (!in || !in->topic || !out || !storage || !buf)
    return qm_err(errstr, errstr_size, QM_EINVAL, "dlq: NULL argument");
  if (storage_cap < in->n_headers + QM_DLQ_N_HEADERS)
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "dlq: header storage holds %zu, %zu needed", storage_cap,
                  in->n_headers + QM_DLQ_N_HEADERS);
  if (strlen(in->topic) + strlen(QM_DLQ_SUFFIX) >= sizeof(buf->topic))
    return qm_err(errstr, errstr_size, QM_EINVAL, "dlq: topic name too long");

  snprintf(buf->topic, sizeof(buf->topic), "%s" QM_DLQ_SUFFIX, in->topic);
  qm_uuid_new(buf->id);
  qm_strlcpy(buf->error, error ? error : "", sizeof(buf->error));
  qm_strlcpy(buf->service, service ? service : "", sizeof(buf->service));
  snprintf(buf->partition, sizeof(buf->partition), "%d", (int)in->partition);
  snprintf(buf->offset, sizeof(buf->offset), "%lld", (long long)in->offset);
  qm_time_format_rfc3339(qm_now_ms(), buf->time, sizeof(buf->time));

  size_t k = 0;
  for (; k < in->n_headers; k++) storage[k] = in->headers[k];
  qm_dlq_header(&storage[k++], "qm_dlq_id", buf->id);
  qm_dlq_header(&storage[k++], "qm_dlq_error", buf->error);
  qm_dlq_header(&storage[k++], "qm_dlq_service", buf->service);
  qm_dlq_header(&storage[k++], "qm_dlq_topic", in->topic);
  qm_dlq_header(&storage[k++], "qm_dlq_partition", buf->partition);
  qm_dlq_header(&storage[k++], "qm_dlq_offset", buf->offset);
  qm_dlq_header(&storage[k++], "qm_dlq_time", buf->time);

  memset(out, 0, sizeof(*out));
  out->topic = buf->topic;
  out->key = in->key;
  out->key_len = in->key_len;
  out->payload = in->payload;
  out->payload_len = in->payload_len;
  out->headers = storage;
  out->n_headers = k;
  return QM_OK;
}

/* ------------------------------------------------------------------ admin */

int qm_kafka_create_topics(const char *brokers, const char *const *names, size_t n,
                           int partitions, int replication, int timeout_ms, char *errstr,
                           size_t errstr_size) {
  int rc = QM_OK;
  rd_kafka_conf_t *conf = NULL;
  rd_kafka_t *rk = NULL;
  rd_kafka_NewTopic_t **newt = NULL;
  rd_kafka_AdminOptions_t *opts = NULL;
  rd_kafka_queue_t *q = NULL;
  rd_kafka_event_t *ev = NULL;
  char rkerr[512];

  if (n == 0) goto out;
  if (!brokers || !*brokers || !names) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "create_topics: brokers and names required");
    goto out;
  }
  if ((partitions < 1 && partitions != -1) || (replication < 1 && replication != -1)) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "create_topics: %d partitions, replication %d: each must be >= 1 (or -1 "
                "for the broker's default)", partitions, replication);
    goto out;
  }
  if (timeout_ms < 1) timeout_ms = 1;
  conf = rd_kafka_conf_new();
  if ((rc = qm_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, errstr_size)) ||
      (rc = qm_kafka_conf_set(conf, "client.id", "qm-admin", errstr, errstr_size)))
    goto out;
  rd_kafka_conf_set_log_cb(conf, qm_kafka_log_cb);
  rd_kafka_conf_set_error_cb(conf, qm_kafka_error_cb);
  rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, rkerr, sizeof(rkerr));
  if (!rk) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot create Kafka admin client: %s", rkerr);
    goto out;
  }
  conf = NULL;

  newt = qm_calloc(n, sizeof(*newt));
  for (size_t i = 0; i < n; i++) {
    newt[i] = names[i] ? rd_kafka_NewTopic_new(names[i], partitions, replication, rkerr,
                                               sizeof(rkerr))
                       : NULL;
    if (!newt[i]) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "topic %s: %s",
                  names[i] ? names[i] : "(null)", names[i] ? rkerr : "no name");
      goto out;
    }
    /* The audit topic is evidence: the broker must not delete it after its
     * default seven days (audit's own retention, QM_AUDIT_RETENTION, prunes
     * the ledger; the topic is kept for ever unless an operator decides). */
    size_t len = strlen(names[i]), alen = strlen(QM_TOPIC_AUDIT);
    if (len >= alen && !strcmp(names[i] + len - alen, QM_TOPIC_AUDIT) &&
        rd_kafka_NewTopic_set_config(newt[i], "retention.ms", "-1") != RD_KAFKA_RESP_ERR_NO_ERROR) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "topic %s: cannot set retention.ms", names[i]);
      goto out;
    }
  }
  opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
  if (rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, rkerr, sizeof(rkerr)) ||
      rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, rkerr, sizeof(rkerr))) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "create_topics: %s", rkerr);
    goto out;
  }
  q = rd_kafka_queue_new(rk);
  rd_kafka_CreateTopics(rk, newt, n, opts, q);
  ev = rd_kafka_queue_poll(q, timeout_ms + 2000);
  if (!ev) {
    rc = qm_err(errstr, errstr_size, QM_ETIMEOUT, "create_topics: no answer within %d ms",
                timeout_ms);
    goto out;
  }
  if (rd_kafka_event_error(ev)) {
    rc = qm_kafka_status(rd_kafka_event_error(ev));
    if (rc == QM_OK || rc == QM_ENOTFOUND || rc == QM_ETRANSIENT) rc = QM_EIO;
    qm_err(errstr, errstr_size, rc, "create_topics: %s", rd_kafka_event_error_string(ev));
    goto out;
  }
  size_t cnt = 0;
  const rd_kafka_topic_result_t **res =
      rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &cnt);
  size_t used = 0;
  if (errstr && errstr_size) errstr[0] = '\0';
  for (size_t i = 0; i < cnt; i++) {
    rd_kafka_resp_err_t err = rd_kafka_topic_result_error(res[i]);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR || err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
      continue;
    if (rc == QM_OK) {
      rc = qm_kafka_status(err);
      if (rc == QM_OK || rc == QM_ENOTFOUND || rc == QM_ETRANSIENT) rc = QM_EIO;
    }
    if (errstr && used < errstr_size) {
      const char *msg = rd_kafka_topic_result_error_string(res[i]);
      int w = snprintf(errstr + used, errstr_size - used, "%stopic %s: %s", used ? "; " : "",
                       rd_kafka_topic_result_name(res[i]),
                       msg ? msg : rd_kafka_err2str(err));
      if (w > 0) used += (size_t)w;
    }
  }
out:
  if (ev) rd_kafka_event_destroy(ev);
  if (q) rd_kafka_queue_destroy(q);
  if (opts) rd_kafka_AdminOptions_destroy(opts);
  if (newt) {
    for (size_t i = 0; i < n; i++)
      if (newt[i]) rd_kafka_NewTopic_destroy(newt[i]);
    free(newt);
  }
  if (rk) rd_kafka_destroy(rk);
  if (conf) rd_kafka_conf_destroy(conf);
  return rc;
}
