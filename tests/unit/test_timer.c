/*
 * Unit tests for qm_timer against the machine's real PostgreSQL (database
 * qm_unit, one fresh schema per test) and a private redis-server started on a
 * free port for each test (so FLUSHALL and restarts touch nobody else's data).
 * The fire callback records each firing in an effects table inside the
 * firing transaction, so "fired exactly once" is checked from what committed.
 */
#include "qm_common.h"
#include "qm_metrics.h"
#include "qm_pg.h"
#include "qm_redis.h"
#include "qm_timer.h"
#include "pg_fixture.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static char schema[64];
static char errstr[1024];
static qm_pg_t *admin;
static pid_t redis_pid;
static int redis_port;
static qm_redis_t *rcli;

/* ---- a private redis-server -------------------------------------------------- */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  socklen_t sl = sizeof(sa);
  getsockname(fd, (struct sockaddr *)&sa, &sl);
  close(fd);
  return ntohs(sa.sin_port);
}

static void redis_start(void) {
  char port[16];
  snprintf(port, sizeof(port), "%d", redis_port);
  redis_pid = fork();
  cr_assert_geq(redis_pid, 0);
  if (redis_pid == 0) {
    execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--loglevel", "warning", (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 200; i++) {
    qm_redis_t *r = qm_redis_connect("127.0.0.1", redis_port, 200, 1000, errstr, sizeof(errstr));
    if (r && qm_redis_ping(r, errstr, sizeof(errstr)) == QM_OK) {
      qm_redis_destroy(rcli);
      rcli = r;
      return;
    }
    qm_redis_destroy(r);
    usleep(25000);
  }
  cr_assert_fail("private redis-server on port %d did not start (is it installed?)", redis_port);
}

static void redis_kill(void) {
  if (redis_pid > 0) {
    kill(redis_pid, SIGKILL);
    waitpid(redis_pid, NULL, 0);
    redis_pid = 0;
  }
}

static long long redis_int(const char *const *argv, int argc) {
  qm_redis_reply_t *rep = NULL;
  int rc = qm_redis_command(rcli, QM_REDIS_IDEMPOTENT, argc, argv, NULL, &rep, errstr,
                            sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  long long v = qm_redis_reply_int(rep);
  qm_redis_reply_destroy(rep);
  return v;
}

/* ---- fixture ------------------------------------------------------------------ */

static void setup(void) {
  pg_fixture_ensure_database(errstr, sizeof(errstr));
  snprintf(schema, sizeof(schema), "qm_t_timer_%d_%lld", (int)getpid(),
           (long long)(qm_mono_us() % 1000000000));
  admin = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(admin, "PostgreSQL database qm_unit is not reachable: %s", errstr);
  static const qm_migration_t migs[] = {
      {1, "timers", QM_TIMER_MIGRATION_SQL("timers")},
      {2, "effects",
       "CREATE TABLE effects (timer_id bigint NOT NULL, kind text, owner_key text,"
       " payload bytea, at_ms bigint)"}};
  int rc = qm_pg_migrate(admin, schema, migs, 2, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "migration: %s", errstr);
  redis_port = free_port();
  redis_start();
}

static void teardown(void) {
  qm_redis_destroy(rcli);
  rcli = NULL;
  redis_kill();
  if (!admin) return;
  qm_pg_ensure(admin, qm_mono_ms() + 5000);
  char *sql = qm_asprintf("DROP SCHEMA IF EXISTS \"%s\" CASCADE", schema);
  qm_pg_exec_simple(admin, sql, errstr, sizeof(errstr));
  free(sql);
  qm_pg_destroy(admin);
  admin = NULL;
}

TestSuite(timer, .init = setup, .fini = teardown, .timeout = 120);

/* ---- the callback ------------------------------------------------------------- */

typedef struct fire_ctx {
  atomic_int calls;
  atomic_int transient_left; /* fail this many calls with QM_ETRANSIENT */
  const char *poison_kind;   /* fail this kind for good */
  int sleep_ms;              /* per call: a slow instance */
} fire_ctx_t;

static int on_fire(void *ctx, qm_pg_t *tx, const qm_timer_t *tm, char *err, size_t err_size) {
  fire_ctx_t *fc = ctx;
  atomic_fetch_add(&fc->calls, 1);
  if (fc->sleep_ms) usleep((useconds_t)fc->sleep_ms * 1000);
  if (atomic_load(&fc->transient_left) > 0) {
    atomic_fetch_sub(&fc->transient_left, 1);
    return qm_err(err, err_size, QM_ETRANSIENT, "downstream unavailable");
  }
  if (fc->poison_kind && !strcmp(tm->kind, fc->poison_kind))
    return qm_err(err, err_size, QM_EINVAL, "cannot handle %s", tm->kind);
  qm_pg_param_t p[] = {QM_PG_INT64(tm->id), QM_PG_TEXT(tm->kind), QM_PG_TEXT(tm->owner_key),
                       tm->payload ? QM_PG_BYTES(tm->payload, tm->payload_len) : QM_PG_NULL,
                       QM_PG_INT64(qm_now_ms())};
  return qm_pg_exec(tx, "INSERT INTO effects VALUES ($1, $2, $3, $4, $5)", p, 5, NULL, err,
                    err_size);
}

static qm_timers_t *new_timers(fire_ctx_t *fc, int lease_ms, qm_metrics_t *reg) {
  qm_timers_conf_t conf = {.dsn = UNIT_DSN,
                           .schema = schema,
                           .redis_port = redis_port,
                           .lease_ms = lease_ms,
                           .poll_ms = 20,
                           .retry_ms = 200,
                           .fire = on_fire,
                           .fire_ctx = fc,
                           .metrics = reg};
  qm_timers_t *t = qm_timers_new(&conf, errstr, sizeof(errstr));
  cr_assert_not_null(t, "%s", errstr);
  return t;
}

/* Adds n timers due at due_ms + i*step_ms in one transaction. */
static void add_timers(int n, int64_t due_ms, int step_ms, const char *kind) {
  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  for (int i = 0; i < n; i++) {
    char owner[32];
    snprintf(owner, sizeof(owner), "owner-%d", i);
    int rc = qm_timer_add(admin, NULL, kind, owner, "p\0q", 3, due_ms + (int64_t)i * step_ms,
                          NULL, errstr, sizeof(errstr));
    cr_assert_eq(rc, QM_OK, "%s", errstr);
  }
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
}

static long long pg_int(const char *sql) {
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(admin, sql, NULL, 0, &res, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s: %s", sql, errstr);
  int64_t v = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 0, &v), QM_OK, "%s gave no integer", sql);
  qm_pg_result_destroy(res);
  return v;
}

/* Runs rounds until want effects committed or the bound runs out. */
static void run_until_effects(qm_timers_t *t, long long want, int timeout_ms) {
  int64_t deadline = qm_mono_ms() + timeout_ms;
  while (pg_int("SELECT count(*) FROM effects") < want && qm_mono_ms() < deadline) {
    size_t fired = 0;
    qm_timers_run_once(t, &fired);
    if (fired == 0) usleep(10000);
  }
  cr_assert_eq(pg_int("SELECT count(*) FROM effects"), want, "effects after %d ms", timeout_ms);
}

static void assert_each_once(long long n) {
  cr_assert_eq(pg_int("SELECT count(DISTINCT timer_id) FROM effects"), n);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects"), n, "a timer fired twice");
  cr_assert_eq(pg_int("SELECT count(*) FROM timers WHERE status = 'fired'"), n);
}

/* ---- tests ------------------------------------------------------------------- */

Test(timer, fires_when_due_not_before_with_payload) {
  fire_ctx_t fc = {0};
  qm_metrics_t *reg = qm_metrics_new();
  qm_timers_t *t = new_timers(&fc, 5000, reg);
  int64_t now = qm_now_ms();
  add_timers(1, now - 10, 0, "past");
  add_timers(1, now + 2000, 0, "soon");
  add_timers(1, now + 3600 * 1000, 0, "later");
  run_until_effects(t, 1, 5000);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind = 'past'"
                      " AND owner_key = 'owner-0' AND payload = '\\x700071'::bytea"),
               1, "kind, owner and binary payload reach the callback");
  /* "soon" must not fire before its time. */
  cr_assert_lt(qm_now_ms(), now + 2000, "test too slow to check 'not before'");
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind = 'soon'"), 0);
  run_until_effects(t, 2, 8000);
  long long at = pg_int("SELECT at_ms FROM effects WHERE kind = 'soon'");
  cr_assert_geq(at, now + 2000, "fired %lld ms early", now + 2000 - at);
  cr_assert_eq(pg_int("SELECT count(*) FROM timers WHERE status = 'pending'"), 1);
  /* Metrics: lag histogram and pending gauge. */
  char *text = NULL;
  size_t len = 0;
  qm_metrics_render(reg, &text, &len);
  cr_assert(strstr(text, "qm_timer_firing_lag_seconds_count{kind=\"soon\",table=\"timers\"} 1") ||
                strstr(text, "qm_timer_firing_lag_seconds_count{table=\"timers\",kind=\"soon\"} 1"),
            "%s", text);
  cr_assert(strstr(text, "qm_timer_pending{table=\"timers\"}") != NULL, "%s", text);
  free(text);
  qm_timers_destroy(t);
  qm_metrics_destroy(reg);
}

Test(timer, cancel_and_reschedule) {
  fire_ctx_t fc = {0};
  qm_timers_t *t = new_timers(&fc, 5000, NULL);
  int64_t now = qm_now_ms();
  int64_t a = 0, b = 0, c = 0;
  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK);
  cr_assert_eq(qm_timer_add(admin, NULL, "a", "step-1", NULL, 0, now + 300, &a, errstr,
                            sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_timer_add(admin, NULL, "b", "step-1", NULL, 0, now + 300, &b, errstr,
                            sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_timer_add(admin, NULL, "c", "step-2", NULL, 0, now + 3600 * 1000, &c, errstr,
                            sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK);
  /* In Redis first, then cancelled and rescheduled: the feeder must follow. */
  qm_timers_run_once(t, NULL);
  const char *zc[] = {"ZCARD", qm_timers_redis_key(t)};
  cr_assert_eq(redis_int(zc, 2), 3);

  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK);
  bool cancelled = false;
  cr_assert_eq(qm_timer_cancel(admin, NULL, a, &cancelled, errstr, sizeof(errstr)), QM_OK);
  cr_assert(cancelled);
  cr_assert_eq(qm_timer_reschedule(admin, NULL, c, now + 400, errstr, sizeof(errstr)), QM_OK);
  cr_assert_eq(qm_timer_reschedule(admin, NULL, a, now + 400, errstr, sizeof(errstr)),
               QM_ENOTFOUND, "a cancelled timer cannot be rescheduled");
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK);
  run_until_effects(t, 2, 5000);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind IN ('b','c')"), 2);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind = 'a'"), 0);
  usleep(300000);
  qm_timers_run_once(t, NULL);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects"), 2);
  cr_assert_eq(redis_int(zc, 2), 0, "fired and cancelled members leave the set");

  /* cancel_owner: every pending timer of an owner, optionally by kind. */
  add_timers(3, now + 3600 * 1000, 0, "x");
  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK);
  int64_t n = 0;
  cr_assert_eq(qm_timer_cancel_owner(admin, NULL, "owner-1", "y", &n, errstr, sizeof(errstr)),
               QM_OK);
  cr_assert_eq(n, 0);
  cr_assert_eq(qm_timer_cancel_owner(admin, NULL, "owner-1", NULL, &n, errstr, sizeof(errstr)),
               QM_OK);
  cr_assert_eq(n, 1);
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK);
  cr_assert_eq(fc.calls, 2);
  qm_timers_destroy(t);
}

Test(timer, a_crashed_claim_fires_elsewhere_after_the_lease) {
  fire_ctx_t fc = {0};
  qm_timers_t *t = new_timers(&fc, 800, NULL);
  add_timers(5, qm_now_ms() - 100, 0, "k");
  run_until_effects(t, 5, 5000); /* loads the set, then fires all five */
  /* A claim by an instance that then died: the member's score is pushed to
   * the end of the lease and nothing commits. */
  add_timers(1, qm_now_ms() - 100, 0, "crashed");
  char idtxt[32];
  snprintf(idtxt, sizeof(idtxt), "%lld", pg_int("SELECT max(timer_id) FROM timers"));
  char lease[32];
  int64_t claimed_at = qm_now_ms();
  snprintf(lease, sizeof(lease), "%lld", (long long)(claimed_at + 800));
  /* The feeder puts the new row in first; then the "dead" claim moves it. */
  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK);
  cr_assert_eq(qm_pg_exec_simple(admin, "UPDATE timers SET synced = true", errstr,
                                 sizeof(errstr)), QM_OK);
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK);
  const char *za[] = {"ZADD", qm_timers_redis_key(t), lease, idtxt};
  redis_int(za, 4);
  qm_timers_run_once(t, NULL);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind = 'crashed'"), 0,
               "a leased timer must not fire during the lease");
  run_until_effects(t, 6, 5000);
  long long at = pg_int("SELECT at_ms FROM effects WHERE kind = 'crashed'");
  cr_assert_geq(at, claimed_at + 800, "fired %lld ms before the lease ended",
                claimed_at + 800 - at);
  assert_each_once(6);
  qm_timers_destroy(t);
}

typedef struct runner {
  qm_timers_t *t;
  int64_t deadline;
} runner_t;

Test(timer, two_instances_share_the_work_each_timer_fires_once) {
  fire_ctx_t fa = {.sleep_ms = 1}, fb = {.sleep_ms = 1};
  qm_timers_t *a = new_timers(&fa, 2000, NULL);
  qm_timers_t *b = new_timers(&fb, 2000, NULL);
  const int n = 600;
  add_timers(n, qm_now_ms() + 200, 2, "shared");
  cr_assert_eq(qm_timers_start(a), QM_OK);
  cr_assert_eq(qm_timers_start(b), QM_OK);
  int64_t deadline = qm_mono_ms() + 30000;
  while (pg_int("SELECT count(*) FROM timers WHERE status = 'pending'") > 0 &&
         qm_mono_ms() < deadline)
    usleep(50000);
  /* Redis handing a timer out again must not fire it again. */
  qm_timers_stop(a);
  qm_timers_stop(b);
  assert_each_once(n);
  qm_timers_stats_t sa, sb;
  qm_timers_stats(a, &sa);
  qm_timers_stats(b, &sb);
  cr_assert_eq(sa.fired + sb.fired, (uint64_t)n);
  cr_assert_gt(sa.fired, 0, "instance a fired nothing");
  cr_assert_gt(sb.fired, 0, "instance b fired nothing");
  char idtxt[32], score[32];
  snprintf(idtxt, sizeof(idtxt), "%lld", pg_int("SELECT min(timer_id) FROM timers"));
  snprintf(score, sizeof(score), "%lld", (long long)qm_now_ms() - 1000);
  const char *za[] = {"ZADD", qm_timers_redis_key(a), score, idtxt};
  redis_int(za, 4);
  size_t fired = 99;
  cr_assert_eq(qm_timers_run_once(a, &fired), QM_OK);
  cr_assert_eq(fired, 0);
  assert_each_once(n);
  qm_timers_destroy(a);
  qm_timers_destroy(b);
}

Test(timer, flushall_with_timers_pending_every_timer_fires_once) {
  fire_ctx_t fc = {0};
  qm_metrics_t *reg = qm_metrics_new();
  qm_timers_t *t = new_timers(&fc, 5000, reg);
  const int n = 300;
  int64_t now = qm_now_ms();
  add_timers(n / 2, now - 50, 0, "due");
  add_timers(n / 2, now + 800, 3, "later");
  /* Load the set and fire one batch, then lose all of Redis. */
  size_t fired = 0;
  for (int i = 0; i < 100 && fired == 0; i++) cr_assert_eq(qm_timers_run_once(t, &fired), QM_OK);
  cr_assert_gt(fired, 0);
  const char *fl[] = {"FLUSHALL"};
  qm_redis_reply_t *rep = NULL;
  cr_assert_eq(qm_redis_command(rcli, 0, 1, fl, NULL, &rep, errstr, sizeof(errstr)), QM_OK);
  qm_redis_reply_destroy(rep);
  run_until_effects(t, n, 15000);
  assert_each_once(n);
  qm_timers_stats_t st;
  qm_timers_stats(t, &st);
  cr_assert_geq(st.resyncs, 2, "a reload at start and one after the flush");
  char *text = NULL;
  size_t len = 0;
  qm_metrics_render(reg, &text, &len);
  cr_assert(strstr(text, "reason=\"flush\"") != NULL, "%s", text);
  free(text);
  qm_timers_destroy(t);
  qm_metrics_destroy(reg);
}

Test(timer, redis_restart_without_persistence_is_repaired) {
  fire_ctx_t fc = {0};
  qm_timers_t *t = new_timers(&fc, 5000, NULL);
  const int n = 100;
  add_timers(n, qm_now_ms() + 500, 5, "r");
  cr_assert_eq(qm_timers_run_once(t, NULL), QM_OK); /* marker missing: reload */
  cr_assert_eq(qm_timers_run_once(t, NULL), QM_OK);
  const char *zc[] = {"ZCARD", qm_timers_redis_key(t)};
  cr_assert_eq(redis_int(zc, 2), n);
  redis_kill();
  /* Down for a while: rounds fail transiently, nothing is lost. */
  for (int i = 0; i < 3; i++) cr_assert_neq(qm_timers_run_once(t, NULL), QM_OK);
  redis_start();
  run_until_effects(t, n, 20000);
  assert_each_once(n);
  qm_timers_destroy(t);
}

Test(timer, failures_transient_retried_permanent_marked_failed) {
  fire_ctx_t fc = {.poison_kind = "bad"};
  atomic_store(&fc.transient_left, 2);
  qm_timers_t *t = new_timers(&fc, 5000, NULL);
  add_timers(1, qm_now_ms() - 10, 0, "good");
  add_timers(1, qm_now_ms() - 10, 0, "bad");
  run_until_effects(t, 1, 8000);
  cr_assert_eq(pg_int("SELECT count(*) FROM effects WHERE kind = 'good'"), 1);
  cr_assert_eq(pg_int("SELECT count(*) FROM timers WHERE kind = 'bad' AND status = 'failed'"
                      " AND last_error LIKE '%cannot handle%'"),
               1);
  cr_assert_geq(pg_int("SELECT attempts FROM timers WHERE kind = 'good'"), 2,
                "the transient failures were counted");
  qm_timers_destroy(t);
}

Test(timer, periodic_check_restores_a_lost_member) {
  fire_ctx_t fc = {0};
  qm_timers_conf_t conf = {.dsn = UNIT_DSN,
                           .schema = schema,
                           .redis_port = redis_port,
                           .poll_ms = 20,
                           .resync_ms = 300,
                           .fire = on_fire,
                           .fire_ctx = &fc};
  qm_timers_t *t = qm_timers_new(&conf, errstr, sizeof(errstr));
  cr_assert_not_null(t, "%s", errstr);
  add_timers(5, qm_now_ms() + 3600 * 1000, 0, "far");
  cr_assert_eq(qm_timers_run_once(t, NULL), QM_OK); /* marker missing: reload */
  cr_assert_eq(qm_timers_run_once(t, NULL), QM_OK); /* feed */
  const char *zc[] = {"ZCARD", qm_timers_redis_key(t)};
  cr_assert_eq(redis_int(zc, 2), 5);
  /* A member lost while the marker stays (an eviction, a partial flush). */
  char idtxt[32];
  snprintf(idtxt, sizeof(idtxt), "%lld", pg_int("SELECT min(timer_id) FROM timers"));
  const char *zr[] = {"ZREM", qm_timers_redis_key(t), idtxt};
  cr_assert_eq(redis_int(zr, 3), 1);
  cr_assert_eq(redis_int(zc, 2), 4);
  usleep(400000);
  cr_assert_eq(qm_timers_run_once(t, NULL), QM_OK);
  cr_assert_eq(redis_int(zc, 2), 5, "the periodic check did not restore the lost member");
  qm_timers_stats_t st;
  qm_timers_stats(t, &st);
  cr_assert_geq(st.resyncs, 2);
  qm_timers_destroy(t);
}
