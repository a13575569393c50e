/*
 * qm_outbox: the transactional outbox. A service writes its state change and
 * the events it causes in one PostgreSQL transaction (qm_outbox_add() inside
 * the caller's BEGIN/COMMIT); a relay (qm_relay_t) publishes committed rows
 * in id order and marks exactly the delivered ones published. Together with
 * the idempotent producer and the consumers' inbox (qm_inbox.h) this gives
 * "nothing lost, nothing done twice".
 *
 * One relay per schema publishes at a time across all instances: it holds a
 * session advisory lock derived from "qm.outbox.<schema>"; the others stand by
 * and take over within about a second when the holder's session dies.
 *
 * Tables (migration version 1, shared with qm_inbox; every service lists
 * QM_OUTBOX_MIGRATION first in its migration array):
 *   outbox(id, txid, topic, key, ce_id, ce_source, ce_type, ce_subject,
 *          ce_time_ms, content_type, traceparent, headers, payload,
 *          created_at, published_at)
 *   inbox(event_id, topic, received_at)
 * headers is jsonb: [{"name": "...", "value_b64": "..."}] (binary-safe).
 */
#ifndef QM_OUTBOX_H
#define QM_OUTBOX_H

#include "qm_event.h"
#include "qm_pg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The SQL of migration 1 (unqualified names: runs with the search path set
 * to the service's schema). Never edit it once released: add migrations. */
#define QM_OUTBOX_MIGRATION_SQL                                                              \
  "CREATE TABLE outbox ("                                                                    \
  " id bigserial PRIMARY KEY,"                                                               \
  " txid xid8 NOT NULL DEFAULT pg_current_xact_id(),"                                        \
  " topic text NOT NULL,"                                                                    \
  " key bytea,"                                                                              \
  " ce_id text NOT NULL,"                                                                    \
  " ce_source text NOT NULL,"                                                                \
  " ce_type text NOT NULL,"                                                                  \
  " ce_subject text,"                                                                        \
  " ce_time_ms bigint NOT NULL,"                                                             \
  " content_type text,"                                                                      \
  " traceparent text,"                                                                       \
  " headers jsonb,"                                                                          \
  " payload bytea,"                                                                          \
  " created_at timestamptz NOT NULL DEFAULT now(),"                                          \
  " published_at timestamptz);"                                                              \
  "CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;"           \
  "CREATE INDEX outbox_published_at_idx ON outbox (published_at)"                            \
  " WHERE published_at IS NOT NULL;"                                                         \
  "CREATE TABLE inbox ("                                                                     \
  " event_id text PRIMARY KEY,"                                                              \
  " topic text,"                                                                             \
  " received_at timestamptz NOT NULL DEFAULT now());"                                        \
  "CREATE INDEX inbox_received_at_idx ON inbox (received_at);"

/* Initializer for static migration arrays:
 *   static const qm_migration_t migs[] = {QM_OUTBOX_MIGRATION, {2, "...", "..."}}; */
#define QM_OUTBOX_MIGRATION {1, "outbox and inbox", QM_OUTBOX_MIGRATION_SQL}

/* The same migration as an object. */
extern const qm_migration_t qm_outbox_migration;

/* Appends ev to the outbox inside the caller's open transaction on c, and
 * sends a NOTIFY on "qm_outbox_<schema>" (delivered only if the transaction
 * commits) so the relay wakes at once. Binary-safe for key, payload and
 * header values. ev is borrowed for the call. Requires a topic and either
 * meta.id, meta.source and meta.type, or — a dead letter built by
 * qm_dlq_build(), whose original headers travel verbatim — an empty meta and
 * at least one header (QM_EINVAL otherwise); the relay then writes no ce_*
 * headers of its own. Other errors are those of qm_pg_exec(). An empty
 * subject or traceparent is stored as NULL. */
int qm_outbox_add(qm_pg_t *c, const qm_event_out_t *ev, char *errstr, size_t errstr_size);

/* Deletes up to limit published rows older than older_than_ms (by
 * published_at). Returns the number deleted (>= 0) or a negative QM_E* code.
 * The relay calls this itself; exposed for tools and tests. */
int qm_outbox_purge(qm_pg_t *c, int64_t older_than_ms, int limit);

/* ---- relay ---------------------------------------------------------------- */

/* Publishes n events in order. Sets results[i] to QM_OK for each event
 * delivered (acknowledged by the broker) and to a negative code for the
 * others; returns QM_OK only when all n were delivered. The relay marks as
 * published only the events before the first failure: later ones are
 * published again on the next attempt even if they went through (consumers
 * drop repeats by event id), which keeps every key's order. Events and all
 * they point to are valid only during the call. */
typedef int (*qm_relay_publish_fn)(void *ctx, const qm_event_out_t *evs, size_t n,
                                   int *results);

/* Relay settings; zero fields take the default. */
typedef struct qm_relay_conf {
  int batch;                 /* rows per batch, default 100 */
  int poll_ms;               /* poll interval when no NOTIFY arrives, default 20 */
  int64_t retention_ms;      /* keep published rows this long, default 1 h */
  int64_t purge_interval_ms; /* how often to purge, default 60 s */
  int purge_batch;           /* rows per purge DELETE, default 1000 */
  int lock_retry_ms;         /* standby: retry the leader lock this often, default 1 s */
  const char *app_name;      /* PostgreSQL application_name (copied), default "qm-relay-<schema>" */
} qm_relay_conf_t;

typedef struct qm_relay_stats {
  uint64_t published_total;          /* events marked published by this instance */
  uint64_t publish_failures;         /* batches in which an event failed to publish */
  uint64_t last_batch_size;          /* rows read by the latest step */
  int64_t oldest_unpublished_age_ms; /* age of the oldest unpublished row at the latest step,
                                      * 0 if none */
  bool leader;                       /* this instance holds the schema's relay lock */
} qm_relay_stats_t;

typedef struct qm_relay qm_relay_t;

/* A relay for schema's outbox. dsn and schema are copied; conf may be NULL
 * (defaults); publish(publish_ctx, ...) is called from the relay's thread (or
 * from qm_relay_run_once()'s caller). Connects lazily, so PostgreSQL being
 * down now is not an error. NULL when dsn, schema or publish is missing.
 * Caller frees with qm_relay_destroy(). */
qm_relay_t *qm_relay_new(const char *dsn, const char *schema, qm_relay_publish_fn publish,
                         void *publish_ctx, const qm_relay_conf_t *conf);

/* Starts the relay thread: it (re)connects, competes for the leader lock,
 * publishes batches (at once while they are full, on NOTIFY, otherwise
 * every poll_ms), backs off after failures and purges old published rows.
 * QM_OK, QM_ECONFLICT if already started, QM_EIO if no thread could start. */
int qm_relay_start(qm_relay_t *r);

/* Asks the thread to stop: it finishes the current batch, keeps publishing
 * what is committed until nothing is left or timeout_ms has passed, then
 * exits; this joins it. QM_OK (also when not started). */
int qm_relay_stop(qm_relay_t *r, int timeout_ms);

/* Stops the thread (no drain) if running, closes the connection (releasing
 * the leader lock) and frees r. NULL is a no-op. */
void qm_relay_destroy(qm_relay_t *r);

/* One relay step, for tests and tools; never while the thread runs.
 * Connects if needed, takes the leader lock if free, publishes one batch,
 * purges when due. *published (may be NULL) receives the number of rows
 * marked published. Returns QM_OK (including "nothing to do"), QM_ECONFLICT
 * when another instance leads, QM_ETRANSIENT on a connection problem, or the
 * publish function's error when an event failed (rows before it are marked
 * published, it and the rest stay for the next step). */
int qm_relay_run_once(qm_relay_t *r, size_t *published);

/* A consistent copy of the counters. Thread-safe. */
void qm_relay_stats(qm_relay_t *r, qm_relay_stats_t *out);

#endif /* QM_OUTBOX_H */
