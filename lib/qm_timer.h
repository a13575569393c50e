/*
 * qm_timer: durable timers for the services (approval reminders, escalations
 * and auto-rejects; provisioning grant expiry; fulfillment SLAs and loaner
 * overdue notices), fired on time by whichever instance of the service is
 * free, exactly once.
 *
 * Where a timer lives:
 *  - PostgreSQL is the source of truth. Each timer is a row of a table in the
 *    calling service's own schema (layout below; the service lists
 *    QM_TIMER_MIGRATION_SQL(...) in its own migration array). The row is
 *    written by qm_timer_add() in the caller's transaction, together with the
 *    state change that wants the timer, so the two commit or vanish together.
 *  - A Redis sorted set (member: the timer id, score: when it is due in unix
 *    ms) shared by every instance of the service is the firing schedule. A
 *    feeder in each instance copies new, rescheduled and cancelled rows from
 *    PostgreSQL to the set (woken by NOTIFY, polling as well).
 *
 * How a timer fires:
 *  1. an instance claims up to `batch` due members with one Lua script: each
 *     claimed member's score is moved to now + lease, so no other instance
 *     sees it during the lease, and a crashed instance's claims simply come
 *     due again when the lease runs out and fire elsewhere;
 *  2. in one PostgreSQL transaction (a savepoint per timer) it locks each
 *     timer's row (FOR UPDATE SKIP LOCKED), checks it is still pending and
 *     due, calls the service's fire callback with that transaction — the
 *     callback makes the timer's effect (a reminder, a rejection, events to
 *     the outbox) — and marks the row fired in the same transaction;
 *  3. after COMMIT it removes the members from the set.
 * A timer whose row is fired or cancelled already is just removed from the
 * set, so even when Redis hands a timer out twice (lease expired while the
 * first instance was slow, or a resync re-added it) its effect happens once.
 *
 * Repair: a marker key says the set was loaded from PostgreSQL. When it is
 * missing (FLUSHALL, a Redis restart without persistence, a new Redis) the
 * first instance to notice reloads every pending timer (ZADD GT, so claims in
 * flight keep their lease). Every resync_ms each instance also compares the
 * set's size with the pending rows and reloads when members are missing. A
 * reload racing a flush is detected by a token in the marker and redone.
 *
 * Clocks: due times are unix milliseconds from the instances' wall clocks
 * (keep them NTP-synchronised); lag is measured as fire time - due time.
 *
 * Metrics (registered on the registry given in the configuration):
 *   qm_timer_pending{table}                 pending rows (refreshed every few s)
 *   qm_timer_fired_total{table,kind}        timers fired (effect committed)
 *   qm_timer_firing_lag_seconds{table,kind} histogram: commit time - due time
 *   qm_timer_resyncs_total{table,reason}    reloads of Redis (flush, periodic)
 *   qm_timer_fire_errors_total{table,kind}  callbacks that failed (retried)
 *
 * Threads: a qm_timers_t runs one worker thread (qm_timers_start()); the
 * fire callback runs on it. qm_timer_add()/cancel()/reschedule() take only
 * the caller's transaction and may be called from any thread.
 */
#ifndef QM_TIMER_H
#define QM_TIMER_H

#include "qm_pg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct qm_timers qm_timers_t;
typedef struct qm_metrics qm_metrics_t;

/* The table layout, for the service's own migration list. tbl is a string
 * literal naming the table (unqualified: migrations run in the service's
 * schema), e.g.
 *   {5, "timers", QM_TIMER_MIGRATION_SQL("timers")}
 * Columns:
 *   timer_id   bigserial  the Redis member
 *   kind       text       what the service does when it fires ("reminder")
 *   owner_key  text       what it is about (a step id, a grant id): the
 *                         handle for qm_timer_cancel_owner()
 *   payload    bytea      anything else the callback needs (may be NULL)
 *   due_ms     bigint     when it is due, unix ms
 *   status     text       pending | fired | cancelled | failed
 *   synced     boolean    false while the Redis set may not reflect the row
 *                         (new, rescheduled, cancelled): the feeder's queue
 *   attempts   int        fire callbacks tried (failures retried)
 *   last_error text       the last callback failure
 *   created_at, fired_at  timestamptz
 * Never edit the text once a service has shipped it: add migrations. */
#define QM_TIMER_MIGRATION_SQL(tbl)                                                          \
  "CREATE TABLE " tbl " ("                                                                   \
  " timer_id bigserial PRIMARY KEY,"                                                         \
  " kind text NOT NULL,"                                                                     \
  " owner_key text NOT NULL,"                                                                \
  " payload bytea,"                                                                          \
  " due_ms bigint NOT NULL,"                                                                 \
  " status text NOT NULL DEFAULT 'pending'"                                                  \
  "  CHECK (status IN ('pending','fired','cancelled','failed')),"                            \
  " synced boolean NOT NULL DEFAULT false,"                                                  \
  " attempts int NOT NULL DEFAULT 0,"                                                        \
  " last_error text,"                                                                        \
  " created_at timestamptz NOT NULL DEFAULT now(),"                                          \
  " fired_at timestamptz);"                                                                  \
  "CREATE INDEX " tbl "_pending_idx ON " tbl " (timer_id) WHERE status = 'pending';"         \
  "CREATE INDEX " tbl "_unsynced_idx ON " tbl " (timer_id) WHERE NOT synced;"                \
  "CREATE INDEX " tbl "_owner_idx ON " tbl " (owner_key) WHERE status = 'pending';"

/* One timer as the fire callback sees it. Valid during the callback only. */
typedef struct qm_timer {
  int64_t id;
  const char *kind;
  const char *owner_key;
  const unsigned char *payload; /* NULL when none */
  size_t payload_len;
  int64_t due_ms;
  int attempts; /* earlier failed attempts */
} qm_timer_t;

/* Makes the timer's effect inside tx (the transaction that will mark it
 * fired). Return:
 *   QM_OK          done: the timer is marked fired and commits with tx;
 *   QM_ETRANSIENT  a dependency failed: nothing of this timer commits, it
 *                  fires again after retry_ms;
 *   other codes    it can never fire: marked failed (with errstr), logged.
 * The callback must leave tx usable (the runtime wraps each call in a
 * savepoint and rolls back to it on failure). */
typedef int (*qm_timer_fire_fn)(void *ctx, qm_pg_t *tx, const qm_timer_t *timer,
                                char *errstr, size_t errstr_size);

/* Settings; zero fields take the default. */
typedef struct qm_timers_conf {
  const char *dsn;         /* required: the service's database */
  const char *schema;      /* required: the service's schema */
  const char *table;       /* the timer table, default "timers" */
  const char *redis_host;  /* default 127.0.0.1 */
  int redis_port;          /* default 6379 */
  /* Redis key prefix; default "qm:timer:<database>:<schema>:<table>", so
   * several databases (test runs) share a Redis without seeing each other. */
  const char *redis_prefix;
  int lease_ms;            /* claim lease, default 30000 */
  int poll_ms;             /* idle poll of Redis and PostgreSQL, default 100 */
  int batch;               /* timers claimed per round, default 100 */
  int retry_ms;            /* after a transient failure, default 5000 */
  int64_t resync_ms;       /* periodic check (and reload when members are missing),
                            * default 300000 (5 min) */
  int pending_refresh_ms;  /* pending gauge refresh, default 5000 */
  qm_timer_fire_fn fire;   /* required */
  void *fire_ctx;          /* borrowed, passed to fire */
  qm_metrics_t *metrics;   /* may be NULL (no metrics) */
  const char *instance;    /* name in logs, default "<hostname>-<pid>" */
} qm_timers_conf_t;

/* Statistics, for tests and benchmarks. */
typedef struct qm_timers_stats {
  uint64_t fired;        /* timers this instance fired (committed) */
  uint64_t stale;        /* claims dropped: fired/cancelled elsewhere already */
  uint64_t fire_errors;  /* callback failures */
  uint64_t fed;          /* rows copied to Redis by the feeder */
  uint64_t resyncs;      /* full reloads done by this instance */
  uint64_t claimed;      /* members claimed from Redis */
  int64_t pending;       /* pending rows at the last refresh */
} qm_timers_stats_t;

/* ---- in the caller's transaction ---------------------------------------- */

/* Adds a pending timer inside the caller's open transaction tx (table NULL:
 * "timers"), due at due_ms (unix ms; in the past fires at once). kind and
 * owner_key are required; payload may be NULL. A NOTIFY wakes the feeders
 * when tx commits. *id_out (may be NULL) receives the timer id. Errors are
 * those of qm_pg_exec(); QM_EINVAL for missing arguments. */
int qm_timer_add(qm_pg_t *tx, const char *table, const char *kind, const char *owner_key,
                 const void *payload, size_t payload_len, int64_t due_ms, int64_t *id_out,
                 char *errstr, size_t errstr_size);

/* Cancels timer id if still pending. *cancelled (may be NULL) says whether
 * it was. Errors as qm_timer_add(). */
int qm_timer_cancel(qm_pg_t *tx, const char *table, int64_t id, bool *cancelled,
                    char *errstr, size_t errstr_size);

/* Cancels every pending timer of owner_key (of this kind only when kind is
 * not NULL). *n_out (may be NULL) receives how many. */
int qm_timer_cancel_owner(qm_pg_t *tx, const char *table, const char *owner_key,
                          const char *kind, int64_t *n_out, char *errstr, size_t errstr_size);

/* Moves a pending timer to due_ms. QM_ENOTFOUND when it is not pending. */
int qm_timer_reschedule(qm_pg_t *tx, const char *table, int64_t id, int64_t due_ms,
                        char *errstr, size_t errstr_size);

/* ---- the worker ----------------------------------------------------------- */

/* A timer runtime for one table. Copies conf's strings. Connects lazily:
 * PostgreSQL or Redis being down now is not an error. NULL with errstr when
 * a required setting is missing. Caller frees with qm_timers_destroy(). */
qm_timers_t *qm_timers_new(const qm_timers_conf_t *conf, char *errstr, size_t errstr_size);

/* Starts the worker thread: feed, repair, claim and fire, until stopped.
 * QM_OK, QM_ECONFLICT when running, QM_EIO when no thread could start. */
int qm_timers_start(qm_timers_t *t);

/* Stops the worker after its current round and joins it. QM_OK. */
int qm_timers_stop(qm_timers_t *t);

/* One round without the thread (tests, tools, benchmarks; never while the
 * thread runs): check the marker and reload when it is missing, feed, claim
 * and fire one batch. *fired (may be NULL) receives the number fired.
 * QM_OK or a QM_E* code (QM_ETRANSIENT: PostgreSQL or Redis unreachable). */
int qm_timers_run_once(qm_timers_t *t, size_t *fired);

/* Reloads the Redis set from every pending row now (also what the worker
 * does when the marker is missing). *loaded (may be NULL): rows loaded. */
int qm_timers_resync(qm_timers_t *t, size_t *loaded);

/* The Redis key of the sorted set (for tools and tests). Valid until
 * destroy; empty until the first successful connection to PostgreSQL. */
const char *qm_timers_redis_key(qm_timers_t *t);

/* A consistent copy of the counters. Thread-safe. */
void qm_timers_stats(qm_timers_t *t, qm_timers_stats_t *out);

/* Stops the thread if running and frees t. NULL is a no-op. */
void qm_timers_destroy(qm_timers_t *t);

#endif /* QM_TIMER_H */
