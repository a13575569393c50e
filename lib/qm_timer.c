/*
 * qm_timer: durable timers in PostgreSQL, fired from a Redis sorted set with
 * leased claims. See qm_timer.h for the model and the contracts.
 *
 * The worker is a loop of rounds (timers_round()); the thread only adds
 * waiting (until the next due time, a NOTIFY, or the poll interval) and
 * backoff after failures. Tests and benchmarks drive the same round through
 * qm_timers_run_once().
 */
#include "qm_timer.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_metrics.h"
#include "qm_redis.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TIMER_DEF_TABLE "timers"
#define TIMER_DEF_LEASE_MS 30000
#define TIMER_DEF_POLL_MS 100
#define TIMER_DEF_BATCH 100
#define TIMER_DEF_RETRY_MS 5000
#define TIMER_DEF_RESYNC_MS (300 * 1000)
#define TIMER_DEF_PENDING_MS 5000
#define TIMER_FEED_BATCH 1000
#define TIMER_RESYNC_CHUNK 5000
#define TIMER_ZADD_CHUNK 1000
#define TIMER_BACKOFF_MAX_MS 5000
#define PG_MAX_IDENT 63

/* Claims due members. KEYS: the set, the marker. ARGV: now, limit, lease
 * end. Returns {marker present 1/0, next due score after the claim or "",
 * id...}. With the marker missing it claims nothing: the set must be
 * reloaded first (it may be empty only because Redis was flushed). */
static const char CLAIM_LUA[] =
    "if redis.call('EXISTS', KEYS[2]) == 0 then return {0, ''} end\n"
    "local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0,"
    " tonumber(ARGV[2]))\n"
    "for i = 1, #ids do redis.call('ZADD', KEYS[1], ARGV[3], ids[i]) end\n"
    "local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')\n"
    "local out = {1, nxt[2] or ''}\n"
    "for i = 1, #ids do out[#out + 1] = ids[i] end\n"
    "return out\n";

struct qm_timers {
  /* configuration (owned copies) */
  char *dsn, *schema, *table, *redis_host, *redis_prefix_conf, *instance;
  int redis_port, lease_ms, poll_ms, batch, retry_ms, pending_refresh_ms;
  int64_t resync_ms;
  qm_timer_fire_fn fire;
  void *fire_ctx;
  /* connections, used by the worker only */
  qm_pg_t *pg;
  qm_redis_t *redis;
  char channel[PG_MAX_IDENT + 1];
  char key[256];    /* the sorted set */
  char marker[256]; /* "loaded" marker */
  char claim_sha[QM_REDIS_SHA_LEN];
  /* SQL with the table name in it */
  char *sql_feed_select, *sql_feed_mark, *sql_lock, *sql_exists, *sql_fired, *sql_failed,
      *sql_retry, *sql_resync, *sql_pending;
  int64_t next_resync_ms, next_pending_ms, next_due_ms;
  int backoff_ms;
  /* thread */
  pthread_t thread;
  bool running;
  atomic_bool stop;
  pthread_mutex_t lock; /* guards stats */
  qm_timers_stats_t stats;
  /* metrics */
  qm_metric_family_t *f_fired, *f_lag, *f_errors;
  qm_metric_t *m_pending, *m_resync_flush, *m_resync_periodic;
};

/* ---- helpers ---------------------------------------------------------------- */

/* Table names go into SQL text: only [a-z0-9_], starting with a letter. */
static bool table_name_ok(const char *t) {
  if (!t || !*t || strlen(t) > 48 || !(t[0] >= 'a' && t[0] <= 'z')) return false;
  for (const char *p = t; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return false;
  return true;
}

static const char *table_or_default(const char *table) {
  return table && *table ? table : TIMER_DEF_TABLE;
}

static void stats_add(qm_timers_t *t, uint64_t *field, uint64_t n) {
  pthread_mutex_lock(&t->lock);
  *field += n;
  pthread_mutex_unlock(&t->lock);
}

/* ---- in the caller's transaction --------------------------------------------- */

int qm_timer_add(qm_pg_t *tx, const char *table, const char *kind, const char *owner_key,
                 const void *payload, size_t payload_len, int64_t due_ms, int64_t *id_out,
                 char *errstr, size_t errstr_size) {
  table = table_or_default(table);
  if (!tx || !table_name_ok(table) || !kind || !*kind || !owner_key)
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_timer_add: bad table, kind or owner");
  char *sql = qm_asprintf("WITH ins AS (INSERT INTO %s (kind, owner_key, payload, due_ms)"
                          " VALUES ($1, $2, $3, $4) RETURNING timer_id)"
                          " SELECT timer_id, pg_notify('qm_timer_' || current_schema() || '_%s',"
                          " '') FROM ins",
                          table, table);
  qm_pg_param_t p[] = {QM_PG_TEXT(kind), QM_PG_TEXT(owner_key),
                       payload ? QM_PG_BYTES(payload, payload_len) : QM_PG_NULL,
                       QM_PG_INT64(due_ms)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, sql, p, 4, &res, errstr, errstr_size);
  free(sql);
  if (rc != QM_OK) return rc;
  int64_t id = 0;
  rc = qm_pg_get_int64(res, 0, 0, &id);
  qm_pg_result_destroy(res);
  if (rc != QM_OK) return qm_err(errstr, errstr_size, QM_EIO, "qm_timer_add: no id returned");
  if (id_out) *id_out = id;
  return QM_OK;
}

/* Runs an UPDATE that marks rows for the feeder, returning the row count. */
static int timer_update(qm_pg_t *tx, const char *sql, const qm_pg_param_t *p, int np,
                        int64_t *n_out, char *errstr, size_t errstr_size) {
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, sql, p, np, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (n_out) *n_out = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  return QM_OK;
}

int qm_timer_cancel(qm_pg_t *tx, const char *table, int64_t id, bool *cancelled, char *errstr,
                    size_t errstr_size) {
  table = table_or_default(table);
  if (!tx || !table_name_ok(table))
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_timer_cancel: bad table");
  char *sql = qm_asprintf("UPDATE %s SET status = 'cancelled', synced = false"
                          " WHERE timer_id = $1 AND status = 'pending'",
                          table);
  qm_pg_param_t p[] = {QM_PG_INT64(id)};
  int64_t n = 0;
  int rc = timer_update(tx, sql, p, 1, &n, errstr, errstr_size);
  free(sql);
  if (rc == QM_OK && cancelled) *cancelled = n > 0;
  return rc;
}

int qm_timer_cancel_owner(qm_pg_t *tx, const char *table, const char *owner_key,
                          const char *kind, int64_t *n_out, char *errstr, size_t errstr_size) {
  table = table_or_default(table);
  if (!tx || !table_name_ok(table) || !owner_key)
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_timer_cancel_owner: bad table or owner");
  char *sql = qm_asprintf("UPDATE %s SET status = 'cancelled', synced = false"
                          " WHERE owner_key = $1 AND status = 'pending'"
                          " AND ($2::text IS NULL OR kind = $2)",
                          table);
  qm_pg_param_t p[] = {QM_PG_TEXT(owner_key), kind ? QM_PG_TEXT(kind) : QM_PG_NULL};
  int rc = timer_update(tx, sql, p, 2, n_out, errstr, errstr_size);
  free(sql);
  return rc;
}

int qm_timer_reschedule(qm_pg_t *tx, const char *table, int64_t id, int64_t due_ms,
                        char *errstr, size_t errstr_size) {
  table = table_or_default(table);
  if (!tx || !table_name_ok(table))
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_timer_reschedule: bad table");
  char *sql = qm_asprintf("WITH u AS (UPDATE %s SET due_ms = $2, synced = false"
                          " WHERE timer_id = $1 AND status = 'pending' RETURNING 1)"
                          " SELECT count(*), pg_notify('qm_timer_' || current_schema() || '_%s',"
                          " '') FROM u",
                          table, table);
  qm_pg_param_t p[] = {QM_PG_INT64(id), QM_PG_INT64(due_ms)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, sql, p, 2, &res, errstr, errstr_size);
  free(sql);
  if (rc != QM_OK) return rc;
  int64_t n = 0;
  (void)qm_pg_get_int64(res, 0, 0, &n);
  qm_pg_result_destroy(res);
  if (n == 0)
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "timer %" PRId64 " is not pending", id);
  return QM_OK;
}

/* ---- the runtime -------------------------------------------------------------- */

qm_timers_t *qm_timers_new(const qm_timers_conf_t *conf, char *errstr, size_t errstr_size) {
  if (!conf || !conf->dsn || !conf->schema || !*conf->schema || !conf->fire) {
    qm_err(errstr, errstr_size, QM_EINVAL, "qm_timers_new: dsn, schema and fire are required");
    return NULL;
  }
  const char *table = table_or_default(conf->table);
  if (!table_name_ok(table)) {
    qm_err(errstr, errstr_size, QM_EINVAL, "qm_timers_new: bad table name '%s'", table);
    return NULL;
  }
  qm_timers_t *t = qm_calloc(1, sizeof(*t));
  t->dsn = qm_strdup(conf->dsn);
  t->schema = qm_strdup(conf->schema);
  t->table = qm_strdup(table);
  t->redis_host = qm_strdup(conf->redis_host && *conf->redis_host ? conf->redis_host
                                                                  : "127.0.0.1");
  t->redis_port = conf->redis_port > 0 ? conf->redis_port : 6379;
  t->redis_prefix_conf = conf->redis_prefix ? qm_strdup(conf->redis_prefix) : NULL;
  if (conf->instance) {
    t->instance = qm_strdup(conf->instance);
  } else {
    char host[64] = "";
    gethostname(host, sizeof(host) - 1);
    t->instance = qm_asprintf("%s-%d", host, (int)getpid());
  }
  t->lease_ms = conf->lease_ms > 0 ? conf->lease_ms : TIMER_DEF_LEASE_MS;
  t->poll_ms = conf->poll_ms > 0 ? conf->poll_ms : TIMER_DEF_POLL_MS;
  t->batch = conf->batch > 0 ? conf->batch : TIMER_DEF_BATCH;
  t->retry_ms = conf->retry_ms > 0 ? conf->retry_ms : TIMER_DEF_RETRY_MS;
  t->resync_ms = conf->resync_ms > 0 ? conf->resync_ms : TIMER_DEF_RESYNC_MS;
  t->pending_refresh_ms =
      conf->pending_refresh_ms > 0 ? conf->pending_refresh_ms : TIMER_DEF_PENDING_MS;
  t->fire = conf->fire;
  t->fire_ctx = conf->fire_ctx;
  pthread_mutex_init(&t->lock, NULL);
  atomic_init(&t->stop, false);

  char chan[128];
  snprintf(chan, sizeof(chan), "qm_timer_%s_%s", t->schema, t->table);
  chan[PG_MAX_IDENT] = '\0';
  qm_strlcpy(t->channel, chan, sizeof(t->channel));

  const char *tb = t->table;
  t->sql_feed_select = qm_asprintf("SELECT timer_id, due_ms, status FROM %s WHERE NOT synced"
                                   " ORDER BY timer_id LIMIT %d FOR UPDATE SKIP LOCKED",
                                   tb, TIMER_FEED_BATCH);
  t->sql_feed_mark =
      qm_asprintf("UPDATE %s SET synced = true WHERE timer_id = ANY($1::bigint[])", tb);
  t->sql_lock = qm_asprintf("SELECT timer_id, kind, owner_key, payload, due_ms, status, attempts"
                            " FROM %s WHERE timer_id = ANY($1::bigint[]) ORDER BY timer_id"
                            " FOR UPDATE SKIP LOCKED",
                            tb);
  t->sql_exists = qm_asprintf("SELECT timer_id FROM %s WHERE timer_id = ANY($1::bigint[])", tb);
  t->sql_fired = qm_asprintf("UPDATE %s SET status = 'fired', fired_at = now(),"
                             " attempts = attempts + 1 WHERE timer_id = ANY($1::bigint[])",
                             tb);
  t->sql_failed = qm_asprintf("UPDATE %s SET status = 'failed', fired_at = now(),"
                              " attempts = attempts + 1, last_error = $2 WHERE timer_id = $1",
                              tb);
  t->sql_retry = qm_asprintf(
      "UPDATE %s SET attempts = attempts + 1, last_error = $2 WHERE timer_id = $1", tb);
  t->sql_resync = qm_asprintf("SELECT timer_id, due_ms FROM %s WHERE status = 'pending'"
                              " AND timer_id > $1 ORDER BY timer_id LIMIT %d",
                              tb, TIMER_RESYNC_CHUNK);
  t->sql_pending = qm_asprintf("SELECT count(*) FROM %s WHERE status = 'pending'", tb);

  if (conf->metrics) {
    static const double lag_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                        2.5,   5,    10,    30,   60,  300};
    static const char *const tk[] = {"table", "kind", NULL};
    static const char *const tbl[] = {"table", NULL};
    static const char *const tr[] = {"table", "reason", NULL};
    qm_metrics_t *reg = conf->metrics;
    t->f_fired = qm_metrics_counter(reg, "qm_timer_fired_total",
                                    "Timers fired (effect committed) by this instance.", tk);
    t->f_lag = qm_metrics_histogram(reg, "qm_timer_firing_lag_seconds",
                                    "Time from a timer's due time to the commit of its effect.",
                                    tk, lag_bounds, QM_ARRAY_LEN(lag_bounds));
    t->f_errors = qm_metrics_counter(reg, "qm_timer_fire_errors_total",
                                     "Timer callbacks that failed (transient ones are retried).",
                                     tk);
    qm_metric_family_t *fp = qm_metrics_gauge(
        reg, "qm_timer_pending", "Pending timers in PostgreSQL (refreshed every few seconds).",
        tbl);
    const char *tv[] = {t->table};
    t->m_pending = qm_metrics_child(fp, tv);
    qm_metric_family_t *fr = qm_metrics_counter(
        reg, "qm_timer_resyncs_total",
        "Reloads of the Redis timer set from PostgreSQL (reason: flush or periodic).", tr);
    const char *rf[] = {t->table, "flush"};
    const char *rp[] = {t->table, "periodic"};
    t->m_resync_flush = qm_metrics_child(fr, rf);
    t->m_resync_periodic = qm_metrics_child(fr, rp);
  }
  t->next_resync_ms = qm_mono_ms() + t->resync_ms;
  return t;
}

/* Opens PostgreSQL and Redis when they are not open. PostgreSQL first: the
 * Redis keys carry the database name. QM_OK or QM_ETRANSIENT. */
static int timers_connect(qm_timers_t *t, char *errstr, size_t errstr_size) {
  int rc;
  if (!t->pg) {
    char app[64];
    snprintf(app, sizeof(app), "qm-timer-%s", t->schema);
    t->pg = qm_pg_connect_app(t->dsn, t->schema, app, errstr, errstr_size);
    if (!t->pg) return QM_ETRANSIENT;
    if (!t->key[0]) {
      qm_pg_result_t *res = NULL;
      rc = qm_pg_exec(t->pg, "SELECT current_database()", NULL, 0, &res, errstr, errstr_size);
      if (rc != QM_OK) {
        qm_pg_destroy(t->pg);
        t->pg = NULL;
        return QM_ETRANSIENT;
      }
      char prefix[200];
      if (t->redis_prefix_conf)
        qm_strlcpy(prefix, t->redis_prefix_conf, sizeof(prefix));
      else
        snprintf(prefix, sizeof(prefix), "qm:timer:{%s:%s:%s}", qm_pg_get(res, 0, 0), t->schema,
                 t->table);
      qm_pg_result_destroy(res);
      snprintf(t->key, sizeof(t->key), "%s:due", prefix);
      snprintf(t->marker, sizeof(t->marker), "%s:loaded", prefix);
    }
    rc = qm_pg_listen(t->pg, t->channel, errstr, errstr_size);
    if (rc != QM_OK) {
      qm_pg_destroy(t->pg);
      t->pg = NULL;
      return QM_ETRANSIENT;
    }
  } else if (!qm_pg_connected(t->pg)) {
    rc = qm_pg_ensure(t->pg, qm_mono_ms());
    if (rc != QM_OK)
      return qm_err(errstr, errstr_size, QM_ETRANSIENT, "timers: PostgreSQL unreachable");
  }
  if (!t->redis) {
    t->redis = qm_redis_connect(t->redis_host, t->redis_port, 1000, 10000, errstr, errstr_size);
    if (!t->redis) return QM_ETRANSIENT;
    t->claim_sha[0] = '\0';
  }
  if (!t->claim_sha[0]) {
    rc = qm_redis_script_load(t->redis, CLAIM_LUA, t->claim_sha, errstr, errstr_size);
    if (rc != QM_OK) {
      t->claim_sha[0] = '\0';
      return rc == QM_EINVAL ? QM_EINVAL : QM_ETRANSIENT;
    }
  }
  return QM_OK;
}

/* Sends one command built from n string arguments; QM_OK when Redis
 * answered with anything but an error. */
static int redis_simple(qm_timers_t *t, unsigned flags, int argc, const char *const *argv,
                        char *errstr, size_t errstr_size) {
  qm_redis_reply_t *rep = NULL;
  int rc = qm_redis_command(t->redis, flags, argc, argv, NULL, &rep, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_redis_reply_type(rep) == QM_REDIS_REPLY_ERROR) {
    size_t len = 0;
    const char *s = qm_redis_reply_str(rep, &len);
    rc = qm_err(errstr, errstr_size, QM_EIO, "redis %s: %.*s", argv[0], (int)(len > 200 ? 200 : len),
                s);
  }
  qm_redis_reply_destroy(rep);
  return rc;
}

/* A growing argv of owned strings for ZADD/ZREM with many members. */
typedef struct argv_buf {
  char **v;
  size_t n, cap;
} argv_buf_t;

static void argv_push(argv_buf_t *a, char *s /* takes ownership */) {
  if (a->n == a->cap) {
    a->cap = a->cap ? a->cap * 2 : 16;
    a->v = qm_realloc(a->v, a->cap * sizeof(*a->v));
  }
  a->v[a->n++] = s;
}

static void argv_free(argv_buf_t *a) {
  for (size_t i = 0; i < a->n; i++) free(a->v[i]);
  free(a->v);
  a->v = NULL;
  a->n = a->cap = 0;
}

/* ZADD [flag] key score id ... / ZREM key id ... for a member list, in
 * chunks. pairs holds score,id pairs for ZADD, ids for ZREM. */
static int redis_members(qm_timers_t *t, const char *cmd, const char *flag, argv_buf_t *items,
                         size_t per_member, char *errstr, size_t errstr_size) {
  size_t per_chunk = TIMER_ZADD_CHUNK * per_member;
  for (size_t off = 0; off < items->n; off += per_chunk) {
    size_t m = items->n - off < per_chunk ? items->n - off : per_chunk;
    const char **argv = qm_calloc(m + 3, sizeof(*argv));
    int argc = 0;
    argv[argc++] = cmd;
    argv[argc++] = t->key;
    if (flag) argv[argc++] = flag;
    for (size_t i = 0; i < m; i++) argv[argc++] = items->v[off + i];
    int rc = redis_simple(t, QM_REDIS_IDEMPOTENT, argc, argv, errstr, errstr_size);
    free(argv);
    if (rc != QM_OK) return rc;
  }
  return QM_OK;
}

/* Copies rows the set may not reflect yet (new, rescheduled, cancelled) to
 * Redis, then marks them synced, in one transaction per chunk: a crash
 * between the two repeats idempotent ZADD/ZREMs. *did receives the rows. */
static int timers_feed(qm_timers_t *t, size_t *did, char *errstr, size_t errstr_size) {
  *did = 0;
  for (int round = 0; round < 10; round++) {
    argv_buf_t add = {0}, rem = {0};
    qm_pg_result_t *res = NULL;
    char *ids = NULL;
    int rc = qm_pg_begin(t->pg, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    rc = qm_pg_exec(t->pg, t->sql_feed_select, NULL, 0, &res, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
    int n = qm_pg_ntuples(res);
    if (n == 0) {
      qm_pg_result_destroy(res);
      return qm_pg_commit(t->pg, errstr, errstr_size);
    }
    size_t ids_cap = (size_t)n * 21 + 3, ids_len = 0;
    ids = qm_malloc(ids_cap);
    ids[ids_len++] = '{';
    for (int i = 0; i < n; i++) {
      const char *id = qm_pg_get(res, i, 0);
      if (!strcmp(qm_pg_get(res, i, 2), "pending")) {
        argv_push(&add, qm_strdup(qm_pg_get(res, i, 1)));
        argv_push(&add, qm_strdup(id));
      } else {
        argv_push(&rem, qm_strdup(id));
      }
      ids_len += (size_t)snprintf(ids + ids_len, ids_cap - ids_len, "%s%s", i ? "," : "", id);
    }
    ids[ids_len++] = '}';
    ids[ids_len] = '\0';
    qm_pg_result_destroy(res);
    res = NULL;
    rc = redis_members(t, "ZADD", NULL, &add, 2, errstr, errstr_size);
    if (rc == QM_OK) rc = redis_members(t, "ZREM", NULL, &rem, 1, errstr, errstr_size);
    if (rc != QM_OK) {
      rc = QM_ETRANSIENT;
      goto fail;
    }
    qm_pg_param_t p[] = {QM_PG_TEXT(ids)};
    rc = qm_pg_exec(t->pg, t->sql_feed_mark, p, 1, NULL, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
    rc = qm_pg_commit(t->pg, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
    *did += (size_t)n;
    stats_add(t, &t->stats.fed, (uint64_t)n);
    argv_free(&add);
    argv_free(&rem);
    free(ids);
    if (n < TIMER_FEED_BATCH) return QM_OK;
    continue;
  fail:
    qm_pg_rollback(t->pg, NULL, 0);
    qm_pg_result_destroy(res);
    argv_free(&add);
    argv_free(&rem);
    free(ids);
    return rc;
  }
  return QM_OK;
}

/* Reloads every pending row into the set. The marker is set first with a
 * fresh token; if it is gone or replaced by the time the load ends, a flush
 * may have eaten part of the load, so it is done again (a replaced token
 * means another instance reloaded after that flush, which also covers it). */
static int timers_reload(qm_timers_t *t, size_t *loaded, char *errstr, size_t errstr_size) {
  for (int attempt = 0; attempt < 3; attempt++) {
    char token[QM_UUID_STR_LEN];
    qm_uuid_new(token);
    const char *set[] = {"SET", t->marker, token};
    int rc = redis_simple(t, QM_REDIS_IDEMPOTENT, 3, set, errstr, errstr_size);
    if (rc != QM_OK) return QM_ETRANSIENT;
    size_t total = 0;
    int64_t last = 0;
    for (;;) {
      qm_pg_param_t p[] = {QM_PG_INT64(last)};
      qm_pg_result_t *res = NULL;
      rc = qm_pg_exec(t->pg, t->sql_resync, p, 1, &res, errstr, errstr_size);
      if (rc != QM_OK) return rc;
      int n = qm_pg_ntuples(res);
      argv_buf_t add = {0};
      for (int i = 0; i < n; i++) {
        argv_push(&add, qm_strdup(qm_pg_get(res, i, 1)));
        argv_push(&add, qm_strdup(qm_pg_get(res, i, 0)));
      }
      if (n > 0) (void)qm_pg_get_int64(res, n - 1, 0, &last);
      qm_pg_result_destroy(res);
      /* GT: a member claimed right now keeps its lease score. */
      rc = redis_members(t, "ZADD", "GT", &add, 2, errstr, errstr_size);
      argv_free(&add);
      if (rc != QM_OK) return QM_ETRANSIENT;
      total += (size_t)n;
      if (n < TIMER_RESYNC_CHUNK) break;
    }
    const char *get[] = {"GET", t->marker};
    qm_redis_reply_t *rep = NULL;
    rc = qm_redis_command(t->redis, QM_REDIS_IDEMPOTENT, 2, get, NULL, &rep, errstr,
                          errstr_size);
    if (rc != QM_OK) return QM_ETRANSIENT;
    bool present = qm_redis_reply_type(rep) == QM_REDIS_REPLY_STRING;
    qm_redis_reply_destroy(rep);
    if (present) {
      if (loaded) *loaded = total;
      stats_add(t, &t->stats.resyncs, 1);
      return QM_OK;
    }
    qm_log_warn("timers %s.%s: Redis lost its marker during a reload; reloading again",
                t->schema, t->table);
  }
  return qm_err(errstr, errstr_size, QM_ETRANSIENT,
                "timers: Redis keeps losing data during reloads");
}

int qm_timers_resync(qm_timers_t *t, size_t *loaded) {
  char errstr[256];
  int rc = timers_connect(t, errstr, sizeof(errstr));
  if (rc == QM_OK) rc = timers_reload(t, loaded, errstr, sizeof(errstr));
  if (rc != QM_OK) qm_log_warn("timers %s.%s: resync failed: %s", t->schema, t->table, errstr);
  return rc;
}

/* One claimed id's fate after the transaction. */
typedef enum { FATE_NONE = 0, FATE_REMOVE, FATE_REQUEUE } fate_t;

/* What firing a batch found and did, per claimed id. */
typedef struct fire_batch {
  size_t n;
  char **ids;          /* claimed members (borrowed) */
  int64_t *id;         /* parsed ids, 0 when not a timer id */
  fate_t *fate;
  int64_t *requeue_at;
  int64_t *due;
  char **kinds;        /* owned */
  bool *fired;
} fire_batch_t;

/* A bigint[] literal of the ids selected by want (NULL: every parsed id). */
static char *ids_array(const fire_batch_t *b, const bool *want) {
  size_t cap = b->n * 21 + 3, len = 0;
  char *out = qm_malloc(cap);
  out[len++] = '{';
  bool first = true;
  for (size_t i = 0; i < b->n; i++) {
    if (!b->id[i] || (want && !want[i])) continue;
    len += (size_t)snprintf(out + len, cap - len, "%s%" PRId64, first ? "" : ",", b->id[i]);
    first = false;
  }
  out[len++] = '}';
  out[len] = '\0';
  return out;
}

/* One attempt at firing the batch in one transaction. Fast mode runs the
 * callbacks without savepoints (the rows are locked with one statement and
 * marked fired with another, so a timer costs only its callback's
 * statements); when a callback fails in fast mode the
 * whole attempt is rolled back and *redo is set, and the caller repeats it
 * in safe mode, a savepoint per timer, so one bad timer never holds back the
 * others. */
static int fire_attempt(qm_timers_t *t, fire_batch_t *b, bool safe, bool *redo, char *errstr,
                        size_t errstr_size) {
  *redo = false;
  for (size_t i = 0; i < b->n; i++) {
    b->fate[i] = b->id[i] ? FATE_NONE : FATE_REMOVE; /* not ours: drop */
    b->fired[i] = false;
    free(b->kinds[i]);
    b->kinds[i] = NULL;
  }
  qm_pg_result_t *res = NULL;
  bool *locked = qm_calloc(b->n, sizeof(*locked));
  char *arr = ids_array(b, NULL);
  int rc = qm_pg_begin(t->pg, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  qm_pg_param_t pa[] = {QM_PG_TEXT(arr)};
  rc = qm_pg_exec(t->pg, t->sql_lock, pa, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) goto rollback;
  int64_t now = qm_now_ms();
  for (int r = 0; r < qm_pg_ntuples(res); r++) {
    int64_t id = 0, due_ms = 0, attempts = 0;
    (void)qm_pg_get_int64(res, r, 0, &id);
    size_t i = 0;
    while (i < b->n && b->id[i] != id) i++;
    if (i == b->n) continue;
    locked[i] = true;
    const char *status = qm_pg_get(res, r, 5);
    (void)qm_pg_get_int64(res, r, 4, &due_ms);
    (void)qm_pg_get_int64(res, r, 6, &attempts);
    if (strcmp(status, "pending") != 0) { /* fired or cancelled: a stale member */
      b->fate[i] = FATE_REMOVE;
      continue;
    }
    if (due_ms > now) { /* rescheduled later since it was put in the set */
      b->fate[i] = FATE_REQUEUE;
      b->requeue_at[i] = due_ms;
      continue;
    }
    unsigned char *payload = NULL;
    size_t plen = 0;
    if (!qm_pg_is_null(res, r, 3)) (void)qm_pg_get_bytes(res, r, 3, &payload, &plen);
    b->kinds[i] = qm_strdup(qm_pg_get(res, r, 1));
    b->due[i] = due_ms;
    qm_timer_t tm = {.id = id,
                     .kind = b->kinds[i],
                     .owner_key = qm_pg_get(res, r, 2),
                     .payload = payload,
                     .payload_len = plen,
                     .due_ms = due_ms,
                     .attempts = (int)attempts};
    if (safe && (rc = qm_pg_savepoint(t->pg, "qm_timer", errstr, errstr_size)) != QM_OK) {
      free(payload);
      goto rollback;
    }
    char ferr[512] = "";
    int frc = t->fire(t->fire_ctx, t->pg, &tm, ferr, sizeof(ferr));
    free(payload);
    if (frc == QM_OK) {
      if (safe && (rc = qm_pg_release(t->pg, "qm_timer", errstr, errstr_size)) != QM_OK)
        goto rollback;
      b->fate[i] = FATE_REMOVE;
      b->fired[i] = true;
      continue;
    }
    if (!safe) { /* start again with a savepoint per timer */
      *redo = true;
      rc = QM_ETRANSIENT;
      goto rollback;
    }
    if (t->f_errors) {
      const char *lv[] = {t->table, b->kinds[i]};
      qm_metrics_inc(qm_metrics_child(t->f_errors, lv));
    }
    pthread_mutex_lock(&t->lock);
    t->stats.fire_errors++;
    pthread_mutex_unlock(&t->lock);
    rc = qm_pg_rollback_to(t->pg, "qm_timer", errstr, errstr_size);
    if (rc != QM_OK) goto rollback;
    qm_pg_param_t pe[] = {QM_PG_INT64(id), QM_PG_TEXT(ferr)};
    if (frc == QM_ETRANSIENT) {
      qm_log_warn("timer %" PRId64 " (%s, %s) failed, retrying in %d ms: %s", id, b->kinds[i],
                  tm.owner_key, t->retry_ms, ferr);
      rc = qm_pg_exec(t->pg, t->sql_retry, pe, 2, NULL, errstr, errstr_size);
      b->fate[i] = FATE_REQUEUE;
      b->requeue_at[i] = now + t->retry_ms;
    } else {
      qm_log_error("timer %" PRId64 " (%s, %s) cannot fire (%s): %s; marked failed — fix the "
                   "cause and add the timer again",
                   id, b->kinds[i], tm.owner_key, qm_strerror(frc), ferr);
      rc = qm_pg_exec(t->pg, t->sql_failed, pe, 2, NULL, errstr, errstr_size);
      b->fate[i] = FATE_REMOVE;
    }
    if (rc != QM_OK) goto rollback;
  }
  qm_pg_result_destroy(res);
  res = NULL;
  /* Ids not locked: another instance is firing them right now (leave them,
   * the lease brings them back), or they are gone (drop them). */
  bool *unlocked = qm_calloc(b->n, sizeof(*unlocked));
  bool any = false;
  for (size_t i = 0; i < b->n; i++) any |= unlocked[i] = b->id[i] && !locked[i];
  if (any) {
    char *ua = ids_array(b, unlocked);
    qm_pg_param_t pu[] = {QM_PG_TEXT(ua)};
    rc = qm_pg_exec(t->pg, t->sql_exists, pu, 1, &res, errstr, errstr_size);
    free(ua);
    if (rc == QM_OK) {
      for (size_t i = 0; i < b->n; i++) {
        if (!unlocked[i]) continue;
        bool exists = false;
        for (int r = 0; r < qm_pg_ntuples(res); r++) {
          int64_t id = 0;
          (void)qm_pg_get_int64(res, r, 0, &id);
          exists |= id == b->id[i];
        }
        if (!exists) b->fate[i] = FATE_REMOVE;
      }
    }
  }
  free(unlocked);
  if (rc != QM_OK) goto rollback;
  char *fa = ids_array(b, b->fired);
  qm_pg_param_t pf[] = {QM_PG_TEXT(fa)};
  rc = qm_pg_exec(t->pg, t->sql_fired, pf, 1, NULL, errstr, errstr_size);
  free(fa);
  if (rc != QM_OK) goto rollback;
  rc = qm_pg_commit(t->pg, errstr, errstr_size);
  goto out;
rollback:
  qm_pg_rollback(t->pg, NULL, 0);
out:
  qm_pg_result_destroy(res);
  free(locked);
  free(arr);
  return rc;
}

/* Fires the claimed ids in one transaction; then removes the done ones from
 * the set and puts retried or rescheduled ones back at their time. On a
 * failure nothing of the batch committed and the claims' leases bring the
 * members back. */
static int timers_fire(qm_timers_t *t, char **ids, size_t n, size_t *fired_out, char *errstr,
                       size_t errstr_size) {
  fire_batch_t b = {.n = n, .ids = ids};
  b.id = qm_calloc(n, sizeof(*b.id));
  b.fate = qm_calloc(n, sizeof(*b.fate));
  b.requeue_at = qm_calloc(n, sizeof(*b.requeue_at));
  b.due = qm_calloc(n, sizeof(*b.due));
  b.kinds = qm_calloc(n, sizeof(*b.kinds));
  b.fired = qm_calloc(n, sizeof(*b.fired));
  for (size_t i = 0; i < n; i++)
    if (sscanf(ids[i], "%" SCNd64, &b.id[i]) != 1 || b.id[i] <= 0) b.id[i] = 0;
  bool redo = false;
  int rc = fire_attempt(t, &b, false, &redo, errstr, errstr_size);
  if (redo) rc = fire_attempt(t, &b, true, &redo, errstr, errstr_size);
  if (rc != QM_OK) {
    if (rc != QM_ETRANSIENT && rc != QM_EIO) rc = QM_ETRANSIENT;
    goto out;
  }
  size_t nfired = 0, nstale = 0;
  int64_t now = qm_now_ms();
  argv_buf_t rem = {0}, add = {0};
  for (size_t i = 0; i < n; i++) {
    if (b.fired[i]) {
      nfired++;
      if (t->f_fired) {
        const char *lv[] = {t->table, b.kinds[i]};
        qm_metrics_inc(qm_metrics_child(t->f_fired, lv));
        qm_metrics_observe(qm_metrics_child(t->f_lag, lv), (double)(now - b.due[i]) / 1000.0);
      }
    } else if (b.fate[i] == FATE_REMOVE) {
      nstale++;
    }
    if (b.fate[i] == FATE_REMOVE) argv_push(&rem, qm_strdup(ids[i]));
    if (b.fate[i] == FATE_REQUEUE) {
      argv_push(&add, qm_asprintf("%" PRId64, b.requeue_at[i]));
      argv_push(&add, qm_strdup(ids[i]));
    }
  }
  /* Best effort: a member left behind is claimed again later and dropped
   * then, since its row is no longer pending. */
  char rerr[256];
  if (redis_members(t, "ZREM", NULL, &rem, 1, rerr, sizeof(rerr)) != QM_OK ||
      redis_members(t, "ZADD", NULL, &add, 2, rerr, sizeof(rerr)) != QM_OK)
    qm_log_warn("timers %s.%s: could not update Redis after firing (%s); the lease will "
                "bring the members back and they are dropped then",
                t->schema, t->table, rerr);
  argv_free(&rem);
  argv_free(&add);
  pthread_mutex_lock(&t->lock);
  t->stats.fired += nfired;
  t->stats.stale += nstale;
  pthread_mutex_unlock(&t->lock);
  if (fired_out) *fired_out = nfired;
out:
  for (size_t i = 0; i < n; i++) free(b.kinds[i]);
  free(b.kinds);
  free(b.fired);
  free(b.due);
  free(b.requeue_at);
  free(b.fate);
  free(b.id);
  return rc;
}

/* Claims due members; reloads first when the marker is gone. */
static int timers_claim_fire(qm_timers_t *t, size_t *fired, char *errstr, size_t errstr_size) {
  *fired = 0;
  int64_t now = qm_now_ms();
  char now_s[24], lim_s[16], lease_s[24];
  snprintf(now_s, sizeof(now_s), "%" PRId64, now);
  snprintf(lim_s, sizeof(lim_s), "%d", t->batch);
  snprintf(lease_s, sizeof(lease_s), "%" PRId64, now + t->lease_ms);
  const char *keys[] = {t->key, t->marker};
  const char *args[] = {now_s, lim_s, lease_s};
  qm_redis_reply_t *rep = NULL;
  int rc = qm_redis_evalsha(t->redis, 0, t->claim_sha, CLAIM_LUA, keys, NULL, 2, args, NULL, 3,
                            &rep, errstr, errstr_size);
  if (rc != QM_OK) return QM_ETRANSIENT;
  if (qm_redis_reply_type(rep) != QM_REDIS_REPLY_ARRAY || qm_redis_reply_len(rep) < 2) {
    size_t len = 0;
    const char *s = qm_redis_reply_str(rep, &len);
    rc = qm_err(errstr, errstr_size, QM_EIO, "timers: claim script answered %.*s",
                (int)(len > 200 ? 200 : len), s ? s : "?");
    qm_redis_reply_destroy(rep);
    return rc;
  }
  if (qm_redis_reply_int(qm_redis_reply_element(rep, 0)) == 0) {
    qm_redis_reply_destroy(rep);
    size_t loaded = 0;
    qm_log_warn("timers %s.%s: the Redis set's marker is missing (Redis flushed, restarted or "
                "new); reloading it from PostgreSQL",
                t->schema, t->table);
    rc = timers_reload(t, &loaded, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    qm_metrics_inc(t->m_resync_flush);
    qm_log_info("timers %s.%s: reloaded %zu pending timers into Redis", t->schema, t->table,
                loaded);
    t->next_resync_ms = qm_mono_ms() + t->resync_ms;
    return QM_OK;
  }
  size_t nlen = 0;
  const char *nxt = qm_redis_reply_str(qm_redis_reply_element(rep, 1), &nlen);
  t->next_due_ms = nlen ? (int64_t)strtod(nxt, NULL) : 0;
  size_t n = qm_redis_reply_len(rep) - 2;
  if (n == 0) {
    qm_redis_reply_destroy(rep);
    return QM_OK;
  }
  char **ids = qm_calloc(n, sizeof(*ids));
  for (size_t i = 0; i < n; i++) {
    size_t len = 0;
    const char *s = qm_redis_reply_str(qm_redis_reply_element(rep, i + 2), &len);
    ids[i] = qm_strndup(s ? s : "", len);
  }
  qm_redis_reply_destroy(rep);
  stats_add(t, &t->stats.claimed, n);
  rc = timers_fire(t, ids, n, fired, errstr, errstr_size);
  for (size_t i = 0; i < n; i++) free(ids[i]);
  free(ids);
  return rc;
}

/* Refreshes the pending gauge when due. */
static void timers_refresh_pending(qm_timers_t *t) {
  int64_t now = qm_mono_ms();
  if (now < t->next_pending_ms) return;
  t->next_pending_ms = now + t->pending_refresh_ms;
  qm_pg_result_t *res = NULL;
  char errstr[256];
  if (qm_pg_exec(t->pg, t->sql_pending, NULL, 0, &res, errstr, sizeof(errstr)) != QM_OK) return;
  int64_t n = 0;
  (void)qm_pg_get_int64(res, 0, 0, &n);
  qm_pg_result_destroy(res);
  qm_metrics_set(t->m_pending, (double)n);
  pthread_mutex_lock(&t->lock);
  t->stats.pending = n;
  pthread_mutex_unlock(&t->lock);
}

/* One round: connect, periodic resync, feed, claim and fire one batch.
 * *did: rows fed plus timers fired (0 means idle). */
static int timers_round(qm_timers_t *t, size_t *did, size_t *fired_out) {
  char errstr[512] = "";
  size_t fed = 0, fired = 0;
  *did = 0;
  int rc = timers_connect(t, errstr, sizeof(errstr));
  if (rc != QM_OK) goto out;
  if (qm_mono_ms() >= t->next_resync_ms) {
    /* A full reload costs seconds per million timers: do it only when the
     * set holds fewer members than there are pending rows (a member lost
     * without the marker going: a partial flush, an eviction). Stale extra
     * members can hide a loss from this count; a flush cannot. */
    int64_t pending = 0;
    long long card = -1;
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(t->pg, t->sql_pending, NULL, 0, &res, errstr, sizeof(errstr));
    if (rc != QM_OK) goto out;
    (void)qm_pg_get_int64(res, 0, 0, &pending);
    qm_pg_result_destroy(res);
    const char *zc[] = {"ZCARD", t->key};
    qm_redis_reply_t *rep = NULL;
    if (qm_redis_command(t->redis, QM_REDIS_IDEMPOTENT, 2, zc, NULL, &rep, errstr,
                         sizeof(errstr)) != QM_OK) {
      rc = QM_ETRANSIENT;
      goto out;
    }
    if (qm_redis_reply_type(rep) == QM_REDIS_REPLY_INT) card = qm_redis_reply_int(rep);
    qm_redis_reply_destroy(rep);
    if (card < pending) {
      size_t loaded = 0;
      qm_log_warn("timers %s.%s: Redis holds %lld members for %lld pending timers; reloading",
                  t->schema, t->table, card, (long long)pending);
      rc = timers_reload(t, &loaded, errstr, sizeof(errstr));
      if (rc != QM_OK) goto out;
      qm_metrics_inc(t->m_resync_periodic);
    }
    t->next_resync_ms = qm_mono_ms() + t->resync_ms;
  }
  rc = timers_feed(t, &fed, errstr, sizeof(errstr));
  if (rc != QM_OK) goto out;
  rc = timers_claim_fire(t, &fired, errstr, sizeof(errstr));
  if (rc != QM_OK) goto out;
  timers_refresh_pending(t);
  *did = fed + fired;
  if (fired_out) *fired_out = fired;
out:
  if (rc != QM_OK) {
    if (t->pg && rc == QM_ETRANSIENT && qm_pg_connected(t->pg)) (void)qm_pg_ping(t->pg);
    qm_log_warn("timers %s.%s (%s): %s (%s); retrying — check PostgreSQL and Redis", t->schema,
                t->table, t->instance, errstr[0] ? errstr : "round failed", qm_strerror(rc));
  }
  return rc;
}

int qm_timers_run_once(qm_timers_t *t, size_t *fired) {
  size_t did = 0, f = 0;
  int rc = timers_round(t, &did, &f);
  if (rc == QM_OK && fired) *fired = f;
  return rc;
}

static bool timers_stopping(qm_timers_t *t) {
  return atomic_load(&t->stop) || qm_shutdown_requested();
}

static void *timers_thread(void *arg) {
  qm_timers_t *t = arg;
  while (!timers_stopping(t)) {
    size_t did = 0;
    int rc = timers_round(t, &did, NULL);
    if (rc != QM_OK) {
      t->backoff_ms = t->backoff_ms ? t->backoff_ms * 2 : 100;
      if (t->backoff_ms > TIMER_BACKOFF_MAX_MS) t->backoff_ms = TIMER_BACKOFF_MAX_MS;
      for (int waited = 0; waited < t->backoff_ms && !timers_stopping(t); waited += 50)
        qm_sleep_ms(50);
      continue;
    }
    t->backoff_ms = 0;
    if (did > 0) continue;
    /* Idle: wait for a NOTIFY (new timers), the next due time, or the poll. */
    int64_t wait = t->poll_ms;
    if (t->next_due_ms > 0) {
      int64_t until = t->next_due_ms - qm_now_ms();
      if (until < wait) wait = until < 1 ? 1 : until;
    }
    if (t->pg && qm_pg_connected(t->pg))
      (void)qm_pg_wait_notify(t->pg, (int)wait, NULL, 0);
    else
      qm_sleep_ms(wait);
  }
  return NULL;
}

int qm_timers_start(qm_timers_t *t) {
  if (t->running) return QM_ECONFLICT;
  atomic_store(&t->stop, false);
  if (pthread_create(&t->thread, NULL, timers_thread, t) != 0) return QM_EIO;
  t->running = true;
  return QM_OK;
}

int qm_timers_stop(qm_timers_t *t) {
  if (!t || !t->running) return QM_OK;
  atomic_store(&t->stop, true);
  pthread_join(t->thread, NULL);
  t->running = false;
  return QM_OK;
}

const char *qm_timers_redis_key(qm_timers_t *t) { return t->key; }

void qm_timers_stats(qm_timers_t *t, qm_timers_stats_t *out) {
  pthread_mutex_lock(&t->lock);
  *out = t->stats;
  pthread_mutex_unlock(&t->lock);
}

void qm_timers_destroy(qm_timers_t *t) {
  if (!t) return;
  qm_timers_stop(t);
  qm_pg_destroy(t->pg);
  qm_redis_destroy(t->redis);
  free(t->sql_feed_select);
  free(t->sql_feed_mark);
  free(t->sql_lock);
  free(t->sql_exists);
  free(t->sql_fired);
  free(t->sql_failed);
  free(t->sql_retry);
  free(t->sql_resync);
  free(t->sql_pending);
  free(t->dsn);
  free(t->schema);
  free(t->table);
  free(t->redis_host);
  free(t->redis_prefix_conf);
  free(t->instance);
  pthread_mutex_destroy(&t->lock);
  free(t);
}
