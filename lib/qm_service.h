/*
 * qm_service: the runtime every Quartermaster service is built on. A service
 * describes itself in a qm_service_def_t (name, port, migrations, topics it
 * consumes, an event handler, HTTP routes, extra configuration) and calls
 * qm_service_main(); the runtime does the rest, the same way for all five:
 *
 *  - configuration: the common table (this file's qm_service_config_defs)
 *    plus the service's own; --help prints both, --config-doc prints the
 *    Markdown reference; a bad value exits 2 naming the variable;
 *  - PostgreSQL: a pool bound to the service's schema, migrations applied at
 *    start (the outbox/inbox migration first, then the service's own);
 *  - the outbox relay: one leader per schema publishes committed events in
 *    order through the idempotent producer;
 *  - the consumer loop: batches of events, one transaction per batch, a
 *    savepoint per event; each event's id is claimed in the inbox (duplicates
 *    dropped), the handler runs, events it emits go to the outbox in the same
 *    transaction, and offsets are stored only after COMMIT. An event whose
 *    CloudEvents headers are invalid, or that the handler calls poison, is
 *    written to "<topic>.dlq" (through the outbox, so a dead letter is never
 *    lost or doubled either) and the consumer moves on;
 *  - HTTP: the API routes, /livez, /readyz (PostgreSQL, Kafka and, where
 *    used, Redis), /metrics, bearer-JWT authentication;
 *  - graceful shutdown on SIGTERM within QM_SHUTDOWN_TIMEOUT: readiness
 *    fails at once, the batch in hand finishes and commits, HTTP requests in
 *    flight finish, the relay drains, the producer flushes, offsets commit.
 */
#ifndef QM_SERVICE_H
#define QM_SERVICE_H

#include "qm_config.h"
#include "qm_event.h"
#include "qm_pg.h"

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct qm_service qm_service_t;
typedef struct qm_http_server qm_http_server_t;
typedef struct qm_metrics qm_metrics_t;
typedef struct qm_redis qm_redis_t;

/* The outcome a handler reports for one event. */
/*  QM_OK         applied (or deliberately ignored): commit and move on;
 *  QM_EPOISON    this event can never be applied (undecodable, invalid):
 *                dead-letter it with errstr as the reason, move on;
 *  QM_ETRANSIENT a dependency failed: roll back the batch, retry it later;
 *  other codes   unexpected: the batch is retried a few times, then the
 *                event is dead-lettered. */
typedef int (*qm_service_handler_fn)(qm_service_t *svc, void *app, qm_pg_t *tx,
                                     const qm_event_in_t *ev, char *errstr, size_t errstr_size);

typedef struct qm_service_def {
  const char *name;  /* "intake": binary qm-intake, schema intake, source /qm/intake */
  int default_port;  /* QM_HTTP_PORT default */
  const qm_migration_t *migrations; /* the service's own, versions >= 2 */
  size_t n_migrations;
  const char *const *consumes; /* base topic names (qm_topics.h), may include ".dlq" ones */
  size_t n_consumes;
  qm_service_handler_fn handle; /* required when n_consumes > 0 */
  const qm_cfg_def_t *config;   /* the service's own variables (may be NULL) */
  size_t n_config;
  bool uses_redis;
  /* After configuration, database and migrations, before HTTP starts: build
   * the app state (*app), register routes with qm_service_http(). Non-zero
   * stops start-up with errstr: QM_EINVAL means the configuration (or what
   * it points at) is wrong, and the process exits 2 like any bad variable. */
  int (*init)(qm_service_t *svc, void **app, char *errstr, size_t errstr_size);
  /* After the consumer loop stopped and before HTTP stops: stop app threads. */
  void (*stop)(qm_service_t *svc, void *app);
  /* Last: free the app state. */
  void (*fini)(qm_service_t *svc, void *app);
  /* SIGHUP: reload what can be reloaded (keep the old on failure). */
  void (*reload)(qm_service_t *svc, void *app);
} qm_service_def_t;

/* The variables every service has (QM_PG_DSN, QM_KAFKA_BROKERS, QM_HTTP_PORT…). */
extern const qm_cfg_def_t qm_service_config_defs[];
extern const size_t qm_service_config_defs_count;

/* Runs the service until SIGTERM/SIGINT. Returns the process exit code:
 * 0 after a clean shutdown, 2 for bad configuration, 1 for a start-up
 * failure (each logged with what to do about it). */
int qm_service_main(int argc, char **argv, const qm_service_def_t *def);

/* Accessors, valid from init until fini. */
const char *qm_service_name(const qm_service_t *svc);
const qm_config_t *qm_service_config(const qm_service_t *svc);
qm_http_server_t *qm_service_http(qm_service_t *svc);
qm_metrics_t *qm_service_metrics(qm_service_t *svc);
qm_pg_pool_t *qm_service_pool(qm_service_t *svc);
const char *qm_service_dsn(const qm_service_t *svc);
/* The full topic name for a base name (QM_TOPIC_PREFIX applied). Valid until fini. */
const char *qm_service_topic(qm_service_t *svc, const char *base);
/* True when a consumed event's topic is this base topic. */
bool qm_service_topic_is(const qm_service_t *svc, const char *topic, const char *base);

/* Writes one event to the outbox inside tx (the caller's transaction), so it
 * is published if and only if tx commits. topic is a base name; key is the
 * subject person's id; type the CloudEvents type; subject the request id;
 * parent_traceparent the cause's trace context (NULL starts a new trace);
 * msg is packed with protobuf-c. Returns the qm_outbox_add() status. When
 * event_id_out is not NULL it receives the new event's ce_id. */
int qm_service_emit(qm_service_t *svc, qm_pg_t *tx, const char *topic, const char *key,
                    const char *type, const char *subject, const char *parent_traceparent,
                    const ProtobufCMessage *msg, char *event_id_out, char *errstr,
                    size_t errstr_size);

/* Runs fn(tx, ctx) in a transaction on a pooled connection, retrying the
 * whole transaction on QM_ETRANSIENT (lost connection, serialization failure)
 * with backoff up to timeout_ms. Returns fn's status (QM_OK committed). For
 * HTTP handlers that write state and emit events together. */
int qm_service_tx(qm_service_t *svc, int timeout_ms,
                  int (*fn)(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                            size_t errstr_size),
                  void *ctx, char *errstr, size_t errstr_size);

#endif /* QM_SERVICE_H */
