/*
 * bench-approval-timers: one million pending timers through qm_timer, the
 * module approval's reminders, escalations and auto-rejects run on.
 *
 * What it does (PostgreSQL on the machine, a private redis-server it starts
 * on a free port so the shared Redis is never touched):
 *   1. creates schema bench_timers_<pid> in database qm_bench (created when
 *      missing) with the timer table of QM_TIMER_MIGRATION_SQL and an effects
 *      table;
 *   2. loads --timers rows (default 1,000,000) in one INSERT … SELECT, all due
 *      far in the future, then starts --instances runtimes (threads, each with
 *      its own PostgreSQL and Redis connections, as separate processes would
 *      have) and times how long their feeders take to copy every row into the
 *      Redis sorted set; reports Redis used_memory before and after;
 *   3. adds --due timers (default 100,000) due evenly over --window seconds
 *      (default 20) from 10 s ahead, and lets the instances fire them:
 *      each firing writes one effects row in the firing transaction (what an
 *      approval decision does: a row and an outbox event);
 *   4. reports firing lag p50/p90/p99/max (effect time − due time), the fire
 *      rate, how the instances shared the work, and checks that every due
 *      timer fired exactly once.
 * It prints figures; it is not a test. The schema is dropped at the end
 * (--keep keeps it).
 */
#include "qm_common.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_redis.h"
#include "qm_timer.h"

#include <arpa/inet.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define ADMIN_DSN "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
#define BENCH_DSN "host=127.0.0.1 port=5432 user=postgres dbname=qm_bench"
#define MAX_INSTANCES 8

static char errstr[1024];

static void die(const char *what) {
  fprintf(stderr, "bench-approval-timers: %s: %s\n", what, errstr);
  exit(1);
}

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof(sa);
  if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
      getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(sa.sin_port);
}

static pid_t redis_start(int port, qm_redis_t **cli) {
  char p[16];
  snprintf(p, sizeof(p), "%d", port);
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) {
      dup2(devnull, 1);
      dup2(devnull, 2);
    }
    execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--loglevel", "warning", (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 200; i++) {
    *cli = qm_redis_connect("127.0.0.1", port, 200, 30000, errstr, sizeof(errstr));
    if (*cli && qm_redis_ping(*cli, errstr, sizeof(errstr)) == QM_OK) return pid;
    qm_redis_destroy(*cli);
    *cli = NULL;
    usleep(25000);
  }
  die("redis-server did not start");
  return -1;
}

/* INFO memory's used_memory in bytes. */
static long long redis_used_memory(qm_redis_t *cli) {
  const char *argv[] = {"INFO", "memory"};
  qm_redis_reply_t *rep = NULL;
  if (qm_redis_command(cli, QM_REDIS_IDEMPOTENT, 2, argv, NULL, &rep, errstr, sizeof(errstr)))
    die("INFO memory");
  const char *s = qm_redis_reply_str(rep, NULL);
  const char *m = s ? strstr(s, "used_memory:") : NULL;
  long long v = m ? strtoll(m + strlen("used_memory:"), NULL, 10) : -1;
  qm_redis_reply_destroy(rep);
  return v;
}

static long long zcard(qm_redis_t *cli, const char *key) {
  const char *argv[] = {"ZCARD", key};
  qm_redis_reply_t *rep = NULL;
  if (qm_redis_command(cli, QM_REDIS_IDEMPOTENT, 2, argv, NULL, &rep, errstr, sizeof(errstr)))
    die("ZCARD");
  long long v = qm_redis_reply_int(rep);
  qm_redis_reply_destroy(rep);
  return v;
}

static long long pg_int(qm_pg_t *c, const char *sql) {
  qm_pg_result_t *res = NULL;
  if (qm_pg_exec(c, sql, NULL, 0, &res, errstr, sizeof(errstr)) != QM_OK) die(sql);
  int64_t v = 0;
  qm_pg_get_int64(res, 0, 0, &v);
  qm_pg_result_destroy(res);
  return v;
}

static void pg_do(qm_pg_t *c, const char *sql) {
  if (qm_pg_exec_simple(c, sql, errstr, sizeof(errstr)) != QM_OK) die(sql);
}

/* The effect of a firing: one row, as an approval decision writes one. */
static int on_fire(void *ctx, qm_pg_t *tx, const qm_timer_t *tm, char *err, size_t err_size) {
  const char *instance = ctx;
  qm_pg_param_t p[] = {QM_PG_INT64(tm->id), QM_PG_INT64(tm->due_ms), QM_PG_INT64(qm_now_ms()),
                       QM_PG_TEXT(instance)};
  return qm_pg_exec(tx, "INSERT INTO effects VALUES ($1, $2, $3, $4)", p, 4, NULL, err, err_size);
}

int main(int argc, char **argv) {
  long n_timers = 1000000, n_due = 100000;
  int window_s = 20, instances = 2, batch = 200;
  bool keep = false;
  static const struct option opts[] = {{"timers", required_argument, 0, 't'},
                                       {"due", required_argument, 0, 'd'},
                                       {"window", required_argument, 0, 'w'},
                                       {"instances", required_argument, 0, 'i'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"keep", no_argument, 0, 'k'},
                                       {0, 0, 0, 0}};
  int o;
  while ((o = getopt_long(argc, argv, "t:d:w:i:b:k", opts, NULL)) != -1) {
    switch (o) {
    case 't': n_timers = strtol(optarg, NULL, 10); break;
    case 'd': n_due = strtol(optarg, NULL, 10); break;
    case 'w': window_s = (int)strtol(optarg, NULL, 10); break;
    case 'i': instances = (int)strtol(optarg, NULL, 10); break;
    case 'b': batch = (int)strtol(optarg, NULL, 10); break;
    case 'k': keep = true; break;
    default:
      fprintf(stderr, "usage: %s [--timers N] [--due N] [--window S] [--instances N] "
                      "[--batch N] [--keep]\n", argv[0]);
      return 2;
    }
  }
  if (instances < 1 || instances > MAX_INSTANCES || n_timers < 1 || n_due < 1 || window_s < 1) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  qm_log_init("bench", QM_LOG_WARN, stderr);
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);

  /* Database and schema. */
  qm_pg_t *admin = qm_pg_connect(ADMIN_DSN, NULL, errstr, sizeof(errstr));
  if (!admin) die("PostgreSQL");
  if (pg_int(admin, "SELECT count(*) FROM pg_database WHERE datname = 'qm_bench'") == 0)
    qm_pg_exec_simple(admin, "CREATE DATABASE qm_bench", errstr, sizeof(errstr));
  qm_pg_destroy(admin);
  char schema[64];
  snprintf(schema, sizeof(schema), "bench_timers_%d", (int)getpid());
  qm_pg_t *c = qm_pg_connect(BENCH_DSN, schema, errstr, sizeof(errstr));
  if (!c) die("database qm_bench");
  static const qm_migration_t migs[] = {
      {1, "timers", QM_TIMER_MIGRATION_SQL("timers")},
      {2, "effects",
       "CREATE TABLE effects (timer_id bigint, due_ms bigint, at_ms bigint, instance text)"}};
  if (qm_pg_migrate(c, schema, migs, 2, errstr, sizeof(errstr)) != QM_OK) die("migrate");

  qm_redis_t *cli = NULL;
  int port = free_port();
  pid_t rpid = redis_start(port, &cli);
  long long mem0 = redis_used_memory(cli);
  printf("machine: %ld cores online; PostgreSQL 127.0.0.1:5432 db qm_bench schema %s; "
         "private redis-server :%d\n",
         sysconf(_SC_NPROCESSORS_ONLN), schema, port);

  /* 1. Load the pending timers, all due far ahead. */
  int64_t far = qm_now_ms() + 30LL * 24 * 3600 * 1000;
  char *sql = qm_asprintf("INSERT INTO timers (kind, owner_key, due_ms) SELECT 'reminder',"
                          " 'step-' || g, %lld + g FROM generate_series(1, %ld) g",
                          (long long)far, n_timers);
  int64_t t0 = qm_mono_ms();
  pg_do(c, sql);
  free(sql);
  int64_t t_load = qm_mono_ms() - t0;
  printf("load:   %ld pending timers inserted in %.1f s (%.0f rows/s, one INSERT ... SELECT)\n",
         n_timers, t_load / 1000.0, n_timers / (t_load / 1000.0));
  pg_do(c, "ANALYZE timers");

  /* 2. Start the instances; their feeders copy every row to Redis. */
  qm_timers_t *ts[MAX_INSTANCES];
  char names[MAX_INSTANCES][16];
  for (int i = 0; i < instances; i++) {
    snprintf(names[i], sizeof(names[i]), "i%d", i);
    qm_timers_conf_t conf = {.dsn = BENCH_DSN,
                             .schema = schema,
                             .redis_port = port,
                             .lease_ms = 30000,
                             .poll_ms = 20,
                             .batch = batch,
                             .fire = on_fire,
                             .fire_ctx = names[i],
                             .instance = names[i]};
    ts[i] = qm_timers_new(&conf, errstr, sizeof(errstr));
    if (!ts[i]) die("qm_timers_new");
  }
  t0 = qm_mono_ms();
  for (int i = 0; i < instances; i++) qm_timers_start(ts[i]);
  while (pg_int(c, "SELECT count(*) FROM timers WHERE NOT synced") > 0) qm_sleep_ms(200);
  int64_t t_feed = qm_mono_ms() - t0;
  long long mem1 = redis_used_memory(cli);
  const char *key = qm_timers_redis_key(ts[0]);
  long long card = zcard(cli, key);
  printf("feed:   %lld members in the Redis set after %.1f s (%.0f rows/s over %d instances)\n",
         card, t_feed / 1000.0, card / (t_feed / 1000.0), instances);
  printf("memory: Redis used_memory %.1f MiB -> %.1f MiB: %.0f bytes per pending timer\n",
         mem0 / 1048576.0, mem1 / 1048576.0, (double)(mem1 - mem0) / (double)card);

  /* 3. Timers coming due: n_due over window_s seconds, from 10 s ahead (time
   * for the feeders to put them in the set, as they would have long before
   * in real life, where timers are set hours or days ahead). */
  int64_t start = qm_now_ms() + 10000;
  sql = qm_asprintf("INSERT INTO timers (kind, owner_key, due_ms) SELECT 'auto_reject',"
                    " 'due-' || g, %lld + (g - 1)::bigint * %lld / %ld FROM generate_series(1, %ld) g",
                    (long long)start, (long long)window_s * 1000, n_due, n_due);
  pg_do(c, sql);
  free(sql);
  int64_t end_due = start + (int64_t)window_s * 1000;
  int64_t deadline = end_due + 120000;
  long long fired = 0;
  while (qm_now_ms() < deadline) {
    fired = pg_int(c, "SELECT count(*) FROM effects");
    if (fired >= n_due) break;
    qm_sleep_ms(250);
  }
  int64_t t_last = pg_int(c, "SELECT coalesce(max(at_ms), 0) FROM effects");
  for (int i = 0; i < instances; i++) qm_timers_stop(ts[i]);

  /* 4. Figures. */
  qm_pg_result_t *res = NULL;
  if (qm_pg_exec(c,
                 "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY at_ms - due_ms),"
                 " percentile_cont(0.9) WITHIN GROUP (ORDER BY at_ms - due_ms),"
                 " percentile_cont(0.99) WITHIN GROUP (ORDER BY at_ms - due_ms),"
                 " max(at_ms - due_ms), count(*), count(DISTINCT timer_id) FROM effects",
                 NULL, 0, &res, errstr, sizeof(errstr)) != QM_OK)
    die("percentiles");
  printf("fire:   %lld of %ld due timers fired (%s distinct: %s) while %ld more stayed pending\n",
         fired, n_due, qm_pg_get(res, 0, 5),
         !strcmp(qm_pg_get(res, 0, 4), qm_pg_get(res, 0, 5)) ? "none twice" : "DUPLICATES",
         n_timers);
  printf("rate:   %.0f timers/s asked (%ld over %d s), %.0f fired/s achieved (first due to last "
         "effect)\n",
         (double)n_due / window_s, n_due, window_s,
         fired / ((t_last - start) / 1000.0));
  printf("lag:    p50 %.0f ms, p90 %.0f ms, p99 %.0f ms, max %s ms (effect time - due time)\n",
         atof(qm_pg_get(res, 0, 0)), atof(qm_pg_get(res, 0, 1)), atof(qm_pg_get(res, 0, 2)),
         qm_pg_get(res, 0, 3));
  qm_pg_result_destroy(res);
  if (qm_pg_exec(c, "SELECT instance, count(*) FROM effects GROUP BY 1 ORDER BY 1", NULL, 0, &res,
                 errstr, sizeof(errstr)) == QM_OK) {
    printf("share: ");
    for (int i = 0; i < qm_pg_ntuples(res); i++)
      printf(" %s %s", qm_pg_get(res, i, 0), qm_pg_get(res, i, 1));
    printf("\n");
    qm_pg_result_destroy(res);
  }
  for (int i = 0; i < instances; i++) qm_timers_destroy(ts[i]);
  qm_redis_destroy(cli);
  kill(rpid, SIGKILL);
  waitpid(rpid, NULL, 0);
  if (!keep) {
    char *drop = qm_asprintf("DROP SCHEMA \"%s\" CASCADE", schema);
    pg_do(c, drop);
    free(drop);
  }
  qm_pg_destroy(c);
  return fired == n_due ? 0 : 1;
}
