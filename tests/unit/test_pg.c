/*
 * Unit tests for qm_pg against the machine's real PostgreSQL (127.0.0.1:5432,
 * user postgres, trust). They use the database qm_unit (created when missing)
 * and one fresh schema per test, dropped at the end; only backends this test
 * opened are ever terminated. A PostgreSQL that is not reachable fails the
 * tests loudly: nothing is skipped.
 */
#include "qm_common.h"
#include "qm_pg.h"
#include "pg_fixture.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>


static char schema[64];
static char extra_schema[80]; /* for migrations into a schema that does not exist yet */
static char errstr[1024];
static qm_pg_t *admin; /* on qm_unit, search path = schema */
/* must_connect()'s connections, closed by teardown() (not by the tests), so
 * a failed test never leaves a transaction open that blocks the DROP. */
static qm_pg_t *opened[8];
static size_t n_opened;

static void ensure_database(void) { pg_fixture_ensure_database(errstr, sizeof(errstr)); }

static void setup(void) {
  ensure_database();
  snprintf(schema, sizeof(schema), "qm_t_pg_%d_%lld", (int)getpid(),
           (long long)(qm_mono_us() % 1000000000));
  snprintf(extra_schema, sizeof(extra_schema), "%s_new", schema);
  admin = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(admin, "PostgreSQL database qm_unit is not reachable: %s", errstr);
  char *sql = qm_asprintf("CREATE SCHEMA \"%s\"", schema);
  cr_assert_eq(qm_pg_exec_simple(admin, sql, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  free(sql);
}

static void teardown(void) {
  for (size_t i = 0; i < n_opened; i++) qm_pg_destroy(opened[i]);
  n_opened = 0;
  if (!admin) return;
  qm_pg_ensure(admin, qm_mono_ms() + 5000);
  qm_pg_exec_simple(admin, "SET lock_timeout = '10s'", errstr, sizeof(errstr));
  char *sql = qm_asprintf(
      "DROP SCHEMA IF EXISTS \"%s\" CASCADE; DROP SCHEMA IF EXISTS \"%s\" CASCADE;"
      "DROP SCHEMA IF EXISTS \"%s_c0\" CASCADE; DROP SCHEMA IF EXISTS \"%s_c1\" CASCADE;"
      "DROP SCHEMA IF EXISTS \"%s_c2\" CASCADE;"
      "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'qm_t_role_%d') THEN"
      " EXECUTE 'DROP OWNED BY qm_t_role_%d'; EXECUTE 'DROP ROLE qm_t_role_%d'; END IF; END $$",
      schema, extra_schema, schema, schema, schema, (int)getpid(), (int)getpid(), (int)getpid());
  qm_pg_exec_simple(admin, sql, errstr, sizeof(errstr));
  free(sql);
  qm_pg_destroy(admin);
  admin = NULL;
}

TestSuite(pg, .init = setup, .fini = teardown, .timeout = 60);

static qm_pg_t *must_connect(void) {
  qm_pg_t *c = qm_pg_connect_app(UNIT_DSN, schema, "qm-unit-pg", errstr, sizeof(errstr));
  cr_assert_not_null(c, "%s", errstr);
  cr_assert_lt(n_opened, QM_ARRAY_LEN(opened));
  opened[n_opened++] = c;
  return c;
}

static void must_exec(qm_pg_t *c, const char *sql) {
  cr_assert_eq(qm_pg_exec_simple(c, sql, errstr, sizeof(errstr)), QM_OK, "%s: %s", sql, errstr);
}

static int64_t query_int(qm_pg_t *c, const char *sql) {
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(c, sql, NULL, 0, &res, errstr, sizeof(errstr)), QM_OK, "%s: %s", sql,
               errstr);
  cr_assert_eq(qm_pg_ntuples(res), 1, "%s: expected one row", sql);
  int64_t v = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 0, &v), QM_OK, "%s: not an integer", sql);
  qm_pg_result_destroy(res);
  return v;
}

static char *query_text(qm_pg_t *c, const char *sql) {
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(c, sql, NULL, 0, &res, errstr, sizeof(errstr)), QM_OK, "%s: %s", sql,
               errstr);
  char *s = qm_strdup(qm_pg_get(res, 0, 0));
  qm_pg_result_destroy(res);
  return s;
}

/* Terminates a backend of ours and waits until it is gone. */
static void kill_backend(int pid) {
  cr_assert_gt(pid, 0);
  qm_pg_param_t p[] = {QM_PG_INT64(pid)};
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(admin, "SELECT pg_terminate_backend($1::int)", p, 1, &res, errstr,
                          sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_str_eq(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  for (int i = 0; i < 500; i++) {
    cr_assert_eq(qm_pg_exec(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", p,
                            1, &res, errstr, sizeof(errstr)),
                 QM_OK, "%s", errstr);
    bool gone = strcmp(qm_pg_get(res, 0, 0), "0") == 0;
    qm_pg_result_destroy(res);
    if (gone) return;
    usleep(10000);
  }
  cr_assert_fail("backend %d did not exit", pid);
}

Test(pg, search_path_is_the_schema) {
  char *cur = query_text(admin, "SELECT current_schema()");
  cr_assert_str_eq(cur, schema);
  free(cur);
  must_exec(admin, "CREATE TABLE plain (x int)");
  char *sql = qm_asprintf("SELECT count(*) FROM pg_tables WHERE schemaname = '%s' AND "
                          "tablename = 'plain'",
                          schema);
  cr_assert_eq(query_int(admin, sql), 1, "an unqualified CREATE TABLE must land in the schema");
  free(sql);
}

Test(pg, params_round_trip) {
  must_exec(admin, "CREATE TABLE rt (id int, t text, b bytea, n bigint, z text, e bytea)");
  static const unsigned char bytes[] = {'a', 0, 'b', 0xff, 0, 0x80, '\\', 'x'};
  qm_pg_param_t p[] = {QM_PG_INT64(1),
                       QM_PG_TEXT("h\xc3\xa9llo 'quoted' \\ back"),
                       QM_PG_BYTES(bytes, sizeof(bytes)),
                       QM_PG_INT64(-9007199254740993LL),
                       QM_PG_NULL,
                       QM_PG_BYTES(NULL, 0)};
  int rc = qm_pg_exec(admin, "INSERT INTO rt VALUES ($1, $2, $3, $4, $5, $6)", p, 6, NULL, errstr,
                      sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  qm_pg_param_t q[] = {QM_PG_INT64(1)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(admin, "SELECT t, b, n, z, e, t IS NULL FROM rt WHERE id = $1", q, 1, &res,
                  errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_ntuples(res), 1);
  cr_assert_eq(qm_pg_nfields(res), 6);
  cr_assert_str_eq(qm_pg_get(res, 0, 0), "h\xc3\xa9llo 'quoted' \\ back");
  cr_assert_eq(qm_pg_len(res, 0, 0), strlen("h\xc3\xa9llo 'quoted' \\ back"));
  unsigned char *out = NULL;
  size_t len = 0;
  cr_assert_eq(qm_pg_get_bytes(res, 0, 1, &out, &len), QM_OK);
  cr_assert_eq(len, sizeof(bytes));
  cr_assert_eq(memcmp(out, bytes, len), 0, "bytea with NUL bytes must round-trip exactly");
  free(out);
  int64_t n = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 2, &n), QM_OK);
  cr_assert_eq(n, -9007199254740993LL);
  cr_assert(qm_pg_is_null(res, 0, 3), "QM_PG_NULL must store SQL NULL");
  cr_assert(!qm_pg_is_null(res, 0, 4), "empty bytes are not NULL");
  cr_assert_eq(qm_pg_get_bytes(res, 0, 4, &out, &len), QM_OK);
  cr_assert_eq(len, 0);
  free(out);
  cr_assert_eq(qm_pg_get_int64(res, 0, 3, &n), QM_EINVAL, "NULL is not an integer");
  cr_assert_str_eq(qm_pg_get(res, 0, 5), "f");
  cr_assert_eq(qm_pg_fnumber(res, "n"), 2);
  qm_pg_result_destroy(res);

  /* QM_PG_TEXT(NULL) is NULL too; affected-rows count. */
  qm_pg_param_t p2[] = {QM_PG_INT64(2), QM_PG_TEXT(NULL)};
  rc = qm_pg_exec(admin, "INSERT INTO rt (id, t) VALUES ($1, $2), ($1 + 1, $2)", p2, 2, &res,
                  errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_affected(res), 2);
  qm_pg_result_destroy(res);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM rt WHERE t IS NULL"), 2);
}

Test(pg, error_classes) {
  must_exec(admin, "CREATE TABLE u (id int PRIMARY KEY, v text NOT NULL CHECK (v <> 'bad'))");
  qm_pg_param_t p[] = {QM_PG_INT64(1), QM_PG_TEXT("x")};
  cr_assert_eq(qm_pg_exec(admin, "INSERT INTO u VALUES ($1, $2)", p, 2, NULL, errstr,
                          sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "");

  int rc = qm_pg_exec(admin, "INSERT INTO u VALUES ($1, $2)", p, 2, NULL, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EDUP, "unique violation: got %s (%s)", qm_strerror(rc), errstr);
  cr_assert(strstr(errstr, "23505") != NULL, "errstr must carry the SQLSTATE: %s", errstr);
  cr_assert(strstr(errstr, "duplicate key") != NULL, "errstr must carry the message: %s", errstr);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "23505");

  rc = qm_pg_exec_simple(admin, "SELEC 1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EIO, "syntax error: got %s (%s)", qm_strerror(rc), errstr);
  cr_assert(strstr(errstr, "42601") != NULL, "%s", errstr);

  qm_pg_param_t nn[] = {QM_PG_INT64(2), QM_PG_NULL};
  rc = qm_pg_exec(admin, "INSERT INTO u VALUES ($1, $2)", nn, 2, NULL, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL, "not-null violation: got %s (%s)", qm_strerror(rc), errstr);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "23502");

  qm_pg_param_t ck[] = {QM_PG_INT64(3), QM_PG_TEXT("bad")};
  rc = qm_pg_exec(admin, "INSERT INTO u VALUES ($1, $2)", ck, 2, NULL, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL, "check violation: got %s (%s)", qm_strerror(rc), errstr);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "23514");

  qm_pg_param_t txt[] = {QM_PG_TEXT("abc")};
  rc = qm_pg_exec(admin, "SELECT $1::int", txt, 1, NULL, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL, "invalid text: got %s (%s)", qm_strerror(rc), errstr);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "22P02");

  rc = qm_pg_exec_simple(admin, "SELECT * FROM no_such_table", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EIO);
  cr_assert_str_eq(qm_pg_last_sqlstate(admin), "42P01");
}

Test(pg, terminated_backend_is_transient_then_reconnects) {
  qm_pg_t *c = must_connect();
  int pid = qm_pg_backend_pid(c);
  kill_backend(pid);
  int rc = qm_pg_exec_simple(c, "SELECT 1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_ETRANSIENT, "a terminated backend must be transient: got %s (%s)",
               qm_strerror(rc), errstr);
  cr_assert(!qm_pg_connected(c));
  /* Known broken: statements refuse without reconnecting by themselves. */
  cr_assert_eq(qm_pg_exec_simple(c, "SELECT 1", errstr, sizeof(errstr)), QM_ETRANSIENT);
  rc = qm_pg_ensure(c, qm_mono_ms() + 10000);
  cr_assert_eq(rc, QM_OK, "reconnect: %s", qm_strerror(rc));
  cr_assert(qm_pg_connected(c));
  cr_assert_neq(qm_pg_backend_pid(c), pid);
  char *cur = query_text(c, "SELECT current_schema()");
  cr_assert_str_eq(cur, schema, "search_path must be restored after a reconnect");
  free(cur);
  char *app = query_text(c, "SELECT current_setting('application_name')");
  cr_assert_str_eq(app, "qm-unit-pg");
  free(app);
}

Test(pg, ensure_gives_up_at_deadline_and_on_shutdown) {
  qm_pg_t *bad = qm_pg_connect("host=127.0.0.1 port=1 user=postgres connect_timeout=1", "x",
                               errstr, sizeof(errstr));
  cr_assert_null(bad, "connecting to a closed port must fail");
  cr_assert(strstr(errstr, "cannot connect") != NULL, "%s", errstr);

  /* A role of our own that we can forbid to log in: reconnects then fail. */
  char role[64];
  snprintf(role, sizeof(role), "qm_t_role_%d", (int)getpid());
  char *sql = qm_asprintf("DROP ROLE IF EXISTS %s; CREATE ROLE %s LOGIN;"
                          "GRANT USAGE ON SCHEMA \"%s\" TO %s",
                          role, role, schema, role);
  must_exec(admin, sql);
  free(sql);
  char *dsn = qm_asprintf("host=127.0.0.1 port=5432 dbname=qm_unit user=%s", role);
  qm_pg_t *c = qm_pg_connect(dsn, schema, errstr, sizeof(errstr));
  cr_assert_not_null(c, "%s", errstr);
  cr_assert_eq(qm_pg_ensure(c, 0), QM_OK, "an open connection is simply OK");
  sql = qm_asprintf("ALTER ROLE %s NOLOGIN", role);
  must_exec(admin, sql);
  free(sql);
  kill_backend(qm_pg_backend_pid(c));
  cr_assert_eq(qm_pg_exec_simple(c, "SELECT 1", errstr, sizeof(errstr)), QM_ETRANSIENT);
  int64_t t0 = qm_mono_ms();
  int rc = qm_pg_ensure(c, qm_mono_ms() + 700);
  int64_t took = qm_mono_ms() - t0;
  cr_assert_eq(rc, QM_ETIMEOUT, "got %s", qm_strerror(rc));
  cr_assert(took >= 650 && took < 3000, "ensure must wait until its deadline: %lld ms",
            (long long)took);
  /* Past deadline: at most one attempt, and not before the backoff allows. */
  t0 = qm_mono_ms();
  cr_assert_eq(qm_pg_ensure(c, 0), QM_ETIMEOUT);
  cr_assert_lt(qm_mono_ms() - t0, 500);

  sql = qm_asprintf("ALTER ROLE %s LOGIN", role);
  must_exec(admin, sql);
  free(sql);
  cr_assert_eq(qm_pg_ensure(c, qm_mono_ms() + 10000), QM_OK, "reconnects once allowed again");
  char *cur = query_text(c, "SELECT current_schema()");
  cr_assert_str_eq(cur, schema);
  free(cur);

  /* Shutdown ends the wait at once. */
  kill_backend(qm_pg_backend_pid(c));
  cr_assert_eq(qm_pg_exec_simple(c, "SELECT 1", errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_shutdown_request();
  cr_assert_eq(qm_pg_ensure(c, qm_mono_ms() + 10000), QM_ESHUTDOWN);
  qm_pg_destroy(c);
  sql = qm_asprintf("DROP OWNED BY %s; DROP ROLE %s", role, role);
  must_exec(admin, sql);
  free(sql);
  free(dsn);
}

Test(pg, transactions_and_savepoints) {
  must_exec(admin, "CREATE TABLE tx (id int PRIMARY KEY)");
  qm_pg_t *c = must_connect();
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO tx VALUES (1)");
  cr_assert_eq(qm_pg_rollback(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM tx"), 0, "rolled back rows must be gone");
  cr_assert_eq(qm_pg_rollback(c, errstr, sizeof(errstr)), QM_OK, "rollback when idle is OK");

  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO tx VALUES (1)");
  cr_assert_eq(qm_pg_savepoint(c, "ev 1", errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_exec_simple(c, "INSERT INTO tx VALUES (1)", errstr, sizeof(errstr)), QM_EDUP);
  cr_assert_eq(qm_pg_rollback_to(c, "ev 1", errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO tx VALUES (2)");
  cr_assert_eq(qm_pg_release(c, "ev 1", errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM tx"), 0, "not visible before commit");
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM tx"), 2);

  /* COMMIT of a transaction that failed is a rollback: not OK. */
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO tx VALUES (3)");
  cr_assert_eq(qm_pg_exec_simple(c, "INSERT INTO tx VALUES (1)", errstr, sizeof(errstr)), QM_EDUP);
  int rc = qm_pg_commit(c, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EIO, "commit of a failed transaction: got %s", qm_strerror(rc));
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM tx"), 2);
}

Test(pg, commit_on_lost_connection_is_transient) {
  must_exec(admin, "CREATE TABLE lost (id int)");
  qm_pg_t *c = must_connect();
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO lost VALUES (1)");
  kill_backend(qm_pg_backend_pid(c));
  int rc = qm_pg_commit(c, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_ETRANSIENT, "got %s (%s)", qm_strerror(rc), errstr);
  cr_assert_eq(qm_pg_rollback(c, errstr, sizeof(errstr)), QM_OK, "rollback after loss is OK");
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM lost"), 0);
  /* BEGIN reconnects by itself: nothing can be lost before a transaction. */
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(c, "INSERT INTO lost VALUES (2)");
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM lost"), 1);
}

Test(pg, ping_listen_notify) {
  qm_pg_t *c = must_connect();
  cr_assert_eq(qm_pg_ping(c), QM_OK);
  char chan[64];
  snprintf(chan, sizeof(chan), "Qm_Chan_%d", (int)getpid());
  cr_assert_eq(qm_pg_listen(c, chan, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  char got[64] = "";
  cr_assert_eq(qm_pg_wait_notify(c, 50, got, sizeof(got)), QM_ETIMEOUT);
  qm_pg_param_t p[] = {QM_PG_TEXT(chan)};
  cr_assert_eq(qm_pg_exec(admin, "SELECT pg_notify($1, 'x')", p, 1, NULL, errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_pg_wait_notify(c, 5000, got, sizeof(got)), QM_OK);
  cr_assert_lt(qm_mono_ms() - t0, 2000, "the notification must wake the waiter at once");
  cr_assert_str_eq(got, chan, "the channel name keeps its case");
  cr_assert_eq(qm_pg_wait_notify(c, 0, got, sizeof(got)), QM_ETIMEOUT);

  /* After a reconnect the LISTEN is re-issued. */
  kill_backend(qm_pg_backend_pid(c));
  cr_assert_eq(qm_pg_wait_notify(c, 1000, got, sizeof(got)), QM_ETRANSIENT);
  cr_assert_eq(qm_pg_ensure(c, qm_mono_ms() + 10000), QM_OK);
  cr_assert_eq(qm_pg_exec(admin, "SELECT pg_notify($1, 'y')", p, 1, NULL, errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_wait_notify(c, 5000, got, sizeof(got)), QM_OK);
  cr_assert_str_eq(got, chan);
  cr_assert_eq(qm_pg_ping(c), QM_OK);
}

Test(pg, advisory_key_is_stable) {
  /* SHA-256("qm.outbox.x") starts 0x... — compare with PostgreSQL's own
   * sha256() so every instance derives the same key. */
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(admin,
                          "SELECT ('x' || encode(substring(sha256('qm.outbox.x'::bytea) "
                          "FROM 1 FOR 8), 'hex'))::bit(64)::bigint",
                          NULL, 0, &res, errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  int64_t want = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 0, &want), QM_OK);
  qm_pg_result_destroy(res);
  cr_assert_eq(qm_pg_advisory_key("qm.outbox.x"), want);
  cr_assert_neq(qm_pg_advisory_key("qm.outbox.x"), qm_pg_advisory_key("qm.outbox.y"));
}

/* ---- migrations ----------------------------------------------------------- */

static const qm_migration_t migs_v3[] = {
    {1, "table", "CREATE TABLE m (x int); CREATE TABLE applied (v int)"},
    {2, "row", "INSERT INTO m VALUES (1); INSERT INTO applied VALUES (2)"},
    {3, "slow", "SELECT pg_sleep(0.2); INSERT INTO applied VALUES (3)"},
};

static int64_t count_in(const char *sch, const char *table) {
  char *sql = qm_asprintf("SELECT count(*) FROM \"%s\".%s", sch, table);
  int64_t n = query_int(admin, sql);
  free(sql);
  return n;
}

Test(pg, migrations_apply_once) {
  int rc = qm_pg_migrate(admin, extra_schema, migs_v3, 2, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  cr_assert_eq(count_in(extra_schema, "schema_migrations"), 2);
  cr_assert_eq(count_in(extra_schema, "m"), 1);
  /* Unqualified names landed in the migrated schema, not the connection's. */
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM pg_tables WHERE tablename = 'm' AND "
                                "schemaname = current_schema()"),
               0);
  /* Second run: a no-op. Third: only version 3 is new. */
  rc = qm_pg_migrate(admin, extra_schema, migs_v3, 2, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  cr_assert_eq(count_in(extra_schema, "m"), 1, "a second run must not re-apply");
  rc = qm_pg_migrate(admin, extra_schema, migs_v3, 3, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  cr_assert_eq(count_in(extra_schema, "schema_migrations"), 3);
  cr_assert_eq(count_in(extra_schema, "applied"), 2);
  /* The checksum is recorded as SHA-256 hex. */
  char *sql = qm_asprintf("SELECT checksum = encode(sha256(convert_to($1, 'UTF8')), 'hex')::text"
                          " FROM \"%s\".schema_migrations WHERE version = 2",
                          extra_schema);
  qm_pg_param_t p[] = {QM_PG_TEXT(migs_v3[1].sql)};
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(admin, sql, p, 1, &res, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_str_eq(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  free(sql);
}

Test(pg, migrations_refuse_changed_or_unordered) {
  cr_assert_eq(qm_pg_migrate(admin, extra_schema, migs_v3, 2, errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  qm_migration_t changed[] = {migs_v3[0], migs_v3[1]};
  changed[1].sql = "INSERT INTO m VALUES (2); INSERT INTO applied VALUES (2)";
  int rc = qm_pg_migrate(admin, extra_schema, changed, 2, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL, "a changed migration must be refused: %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "migration 2") != NULL, "errstr must name the version: %s", errstr);
  cr_assert_eq(count_in(extra_schema, "m"), 1);

  qm_migration_t unordered[] = {migs_v3[1], migs_v3[0]};
  rc = qm_pg_migrate(admin, extra_schema, unordered, 2, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL);
  cr_assert(strstr(errstr, "increasing") != NULL, "%s", errstr);
  qm_migration_t dup[] = {migs_v3[0], migs_v3[0]};
  cr_assert_eq(qm_pg_migrate(admin, extra_schema, dup, 2, errstr, sizeof(errstr)), QM_EINVAL);

  /* A failing migration is rolled back whole and reported with its version. */
  qm_migration_t failing[] = {migs_v3[0], migs_v3[1],
                              {4, "broken", "INSERT INTO m VALUES (4); SELEC oops"}};
  rc = qm_pg_migrate(admin, extra_schema, failing, 3, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EIO, "%s", errstr);
  cr_assert(strstr(errstr, "migration 4") != NULL, "%s", errstr);
  cr_assert_eq(count_in(extra_schema, "m"), 1, "the failed migration's insert must be undone");
  cr_assert_eq(count_in(extra_schema, "schema_migrations"), 2);
}

typedef struct {
  const char *schema;
  int rc;
  char err[512];
} mig_job_t;

static void *mig_thread(void *arg) {
  mig_job_t *job = arg;
  char e[512];
  qm_pg_t *c = qm_pg_connect(UNIT_DSN, job->schema, e, sizeof(e));
  if (!c) {
    job->rc = QM_EIO;
    qm_strlcpy(job->err, e, sizeof(job->err));
    return NULL;
  }
  job->rc = qm_pg_migrate(c, job->schema, migs_v3, 3, job->err, sizeof(job->err));
  qm_pg_destroy(c);
  return NULL;
}

Test(pg, concurrent_migrations_apply_each_version_once) {
  for (int round = 0; round < 3; round++) {
    char sch[96];
    snprintf(sch, sizeof(sch), "%s_c%d", schema, round);
    mig_job_t jobs[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
      memset(&jobs[i], 0, sizeof(jobs[i]));
      jobs[i].schema = sch;
      pthread_create(&th[i], NULL, mig_thread, &jobs[i]);
    }
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 3; i++) cr_assert_eq(jobs[i].rc, QM_OK, "thread %d: %s", i, jobs[i].err);
    cr_assert_eq(count_in(sch, "schema_migrations"), 3);
    cr_assert_eq(count_in(sch, "m"), 1, "version 2 must run exactly once");
    cr_assert_eq(count_in(sch, "applied"), 2, "each of versions 2 and 3 exactly once");
    char *sql = qm_asprintf("DROP SCHEMA \"%s\" CASCADE", sch);
    must_exec(admin, sql);
    free(sql);
  }
}

/* ---- pool ------------------------------------------------------------------ */

typedef struct {
  qm_pg_pool_t *pool;
  qm_pg_t *c;
  int delay_ms;
} release_job_t;

static void *release_later(void *arg) {
  release_job_t *job = arg;
  usleep((useconds_t)job->delay_ms * 1000);
  qm_pg_pool_release(job->pool, job->c);
  return NULL;
}

Test(pg, pool_acquire_timeout_release) {
  qm_pg_pool_t *pool = qm_pg_pool_new(UNIT_DSN, schema, "qm-unit-pool", 2, errstr, sizeof(errstr));
  cr_assert_not_null(pool, "%s", errstr);
  qm_pg_t *a = NULL, *b = NULL, *x = NULL;
  cr_assert_eq(qm_pg_pool_acquire(pool, 100, &a), QM_OK);
  cr_assert_eq(qm_pg_pool_acquire(pool, 100, &b), QM_OK);
  cr_assert_neq(a, b);
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_pg_pool_acquire(pool, 200, &x), QM_ETIMEOUT);
  int64_t waited = qm_mono_ms() - t0;
  cr_assert(waited >= 190 && waited < 2000, "waited %lld ms", (long long)waited);
  cr_assert_null(x, "a failed acquire leaves its output untouched");

  release_job_t job = {pool, a, 100};
  pthread_t th;
  pthread_create(&th, NULL, release_later, &job);
  t0 = qm_mono_ms();
  cr_assert_eq(qm_pg_pool_acquire(pool, 5000, &x), QM_OK);
  cr_assert(qm_mono_ms() - t0 < 3000, "a release must wake the waiter");
  cr_assert_eq(x, a);
  pthread_join(th, NULL);

  /* A connection released inside a transaction comes back rolled back. */
  must_exec(admin, "CREATE TABLE pooled (id int)");
  cr_assert_eq(qm_pg_begin(x, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  must_exec(x, "INSERT INTO pooled VALUES (1)");
  qm_pg_pool_release(pool, x);
  qm_pg_pool_release(pool, b);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM pooled"), 0);
  qm_pg_t *y = NULL, *z = NULL;
  cr_assert_eq(qm_pg_pool_acquire(pool, 100, &y), QM_OK);
  cr_assert_eq(qm_pg_pool_acquire(pool, 100, &z), QM_OK);
  cr_assert_eq(qm_pg_begin(y, errstr, sizeof(errstr)), QM_OK, "not left in a transaction: %s",
               errstr);
  cr_assert_eq(qm_pg_rollback(y, errstr, sizeof(errstr)), QM_OK);

  /* A broken connection is reconnected lazily by the next acquire. */
  kill_backend(qm_pg_backend_pid(y));
  cr_assert_eq(qm_pg_exec_simple(y, "SELECT 1", errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_pg_pool_release(pool, y);
  qm_pg_t *w = NULL;
  cr_assert_eq(qm_pg_pool_acquire(pool, 5000, &w), QM_OK);
  cr_assert_eq(w, y);
  cr_assert(qm_pg_connected(w));
  char *cur = query_text(w, "SELECT current_schema()");
  cr_assert_str_eq(cur, schema);
  free(cur);
  qm_pg_pool_release(pool, w);
  qm_pg_pool_release(pool, z);
  qm_pg_pool_destroy(pool);
}

typedef struct {
  qm_pg_pool_t *pool;
  int ok;
} hammer_job_t;

static void *hammer(void *arg) {
  hammer_job_t *job = arg;
  for (int i = 0; i < 50; i++) {
    qm_pg_t *c = NULL;
    if (qm_pg_pool_acquire(job->pool, 5000, &c) != QM_OK) continue;
    char e[256];
    if (qm_pg_exec_simple(c, "INSERT INTO hammered VALUES (1)", e, sizeof(e)) == QM_OK) job->ok++;
    qm_pg_pool_release(job->pool, c);
  }
  return NULL;
}

Test(pg, pool_is_thread_safe) {
  must_exec(admin, "CREATE TABLE hammered (x int)");
  qm_pg_pool_t *pool = qm_pg_pool_new(UNIT_DSN, schema, NULL, 2, errstr, sizeof(errstr));
  cr_assert_not_null(pool, "%s", errstr);
  hammer_job_t jobs[4];
  pthread_t th[4];
  for (int i = 0; i < 4; i++) {
    jobs[i] = (hammer_job_t){pool, 0};
    pthread_create(&th[i], NULL, hammer, &jobs[i]);
  }
  int ok = 0;
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    ok += jobs[i].ok;
  }
  cr_assert_eq(ok, 200);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM hammered"), 200);
  qm_pg_pool_destroy(pool);
}
