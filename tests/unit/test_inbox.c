/*
 * Unit tests for qm_inbox against the machine's real PostgreSQL (127.0.0.1:5432,
 * user postgres, trust), in the database qm_unit (created when missing) and
 * one fresh schema per test (migrated with the outbox/inbox migration),
 * dropped at the end. A PostgreSQL that is not reachable fails loudly.
 */
#include "qm_common.h"
#include "qm_inbox.h"
#include "qm_outbox.h"
#include "qm_pg.h"
#include "pg_fixture.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>


static char schema[64];
static char errstr[1024];
static qm_pg_t *admin;

static void ensure_database(void) { pg_fixture_ensure_database(errstr, sizeof(errstr)); }

static void setup(void) {
  ensure_database();
  snprintf(schema, sizeof(schema), "qm_t_inbox_%d_%lld", (int)getpid(),
           (long long)(qm_mono_us() % 1000000000));
  admin = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(admin, "PostgreSQL database qm_unit is not reachable: %s", errstr);
  static const qm_migration_t migs[] = {QM_OUTBOX_MIGRATION};
  int rc = qm_pg_migrate(admin, schema, migs, QM_ARRAY_LEN(migs), errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "migration: %s", errstr);
}

static void teardown(void) {
  if (!admin) return;
  qm_pg_ensure(admin, qm_mono_ms() + 5000);
  char *sql = qm_asprintf("DROP SCHEMA IF EXISTS \"%s\" CASCADE", schema);
  qm_pg_exec_simple(admin, sql, errstr, sizeof(errstr));
  free(sql);
  qm_pg_destroy(admin);
  admin = NULL;
}

TestSuite(inbox, .init = setup, .fini = teardown, .timeout = 60);

static int64_t count_inbox(void) {
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(admin, "SELECT count(*) FROM inbox", NULL, 0, &res, errstr,
                          sizeof(errstr)),
               QM_OK, "%s", errstr);
  int64_t n = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 0, &n), QM_OK);
  qm_pg_result_destroy(res);
  return n;
}

static int claim_tx(qm_pg_t *c, const char *id, bool commit) {
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  int rc = qm_inbox_claim(c, id, "qm.requests.v1", errstr, sizeof(errstr));
  if (commit)
    cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  else
    cr_assert_eq(qm_pg_rollback(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  return rc;
}

Test(inbox, claim_then_duplicate) {
  cr_assert_eq(claim_tx(admin, "ev-1", true), QM_OK, "a new event id: %s", errstr);
  int rc = claim_tx(admin, "ev-1", true);
  cr_assert_eq(rc, QM_EDUP, "an applied event id: got %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "ev-1") != NULL, "%s", errstr);
  cr_assert_eq(claim_tx(admin, "ev-2", true), QM_OK);
  cr_assert_eq(count_inbox(), 2);
  cr_assert_eq(qm_inbox_claim(admin, "", NULL, errstr, sizeof(errstr)), QM_EINVAL);
}

Test(inbox, duplicate_within_one_transaction_keeps_it_usable) {
  cr_assert_eq(qm_pg_begin(admin, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_inbox_claim(admin, "ev-a", NULL, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_inbox_claim(admin, "ev-a", NULL, errstr, sizeof(errstr)), QM_EDUP);
  /* ON CONFLICT DO NOTHING is not an error: the transaction goes on. */
  cr_assert_eq(qm_inbox_claim(admin, "ev-b", NULL, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_commit(admin, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(count_inbox(), 2);
}

Test(inbox, rolled_back_claim_is_not_kept) {
  cr_assert_eq(claim_tx(admin, "ev-r", false), QM_OK);
  cr_assert_eq(count_inbox(), 0);
  cr_assert_eq(claim_tx(admin, "ev-r", true), QM_OK, "the claim was rolled back with its tx");
}

typedef struct {
  const char *schema;
  int rc;
  int64_t took_ms;
} claim_job_t;

static void *claim_thread(void *arg) {
  claim_job_t *job = arg;
  char e[512];
  qm_pg_t *c = qm_pg_connect(UNIT_DSN, job->schema, e, sizeof(e));
  if (!c) {
    job->rc = QM_EIO;
    return NULL;
  }
  int64_t t0 = qm_mono_ms();
  qm_pg_begin(c, e, sizeof(e));
  job->rc = qm_inbox_claim(c, "ev-race", NULL, e, sizeof(e));
  job->took_ms = qm_mono_ms() - t0;
  qm_pg_commit(c, e, sizeof(e));
  qm_pg_destroy(c);
  return NULL;
}

Test(inbox, concurrent_claim_waits_for_the_first) {
  qm_pg_t *a = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(a, "%s", errstr);
  for (int round = 0; round < 2; round++) {
    bool commit_first = round == 0;
    if (!commit_first) {
      cr_assert_eq(qm_pg_exec_simple(admin, "DELETE FROM inbox", errstr, sizeof(errstr)), QM_OK,
                   "%s", errstr);
    }
    cr_assert_eq(qm_pg_begin(a, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
    cr_assert_eq(qm_inbox_claim(a, "ev-race", NULL, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
    claim_job_t job = {schema, 99, 0};
    pthread_t th;
    pthread_create(&th, NULL, claim_thread, &job);
    usleep(200000);
    if (commit_first)
      cr_assert_eq(qm_pg_commit(a, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
    else
      cr_assert_eq(qm_pg_rollback(a, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
    pthread_join(th, NULL);
    cr_assert_geq(job.took_ms, 150, "the second claim must wait for the first transaction");
    if (commit_first)
      cr_assert_eq(job.rc, QM_EDUP, "the first committed: got %s", qm_strerror(job.rc));
    else
      cr_assert_eq(job.rc, QM_OK, "the first rolled back: got %s", qm_strerror(job.rc));
    cr_assert_eq(count_inbox(), 1);
  }
  qm_pg_destroy(a);
}

Test(inbox, purge_by_age_and_limit) {
  for (int i = 0; i < 5; i++) {
    char id[16];
    snprintf(id, sizeof(id), "old-%d", i);
    cr_assert_eq(claim_tx(admin, id, true), QM_OK);
  }
  cr_assert_eq(qm_pg_exec_simple(admin,
                                 "UPDATE inbox SET received_at = now() - interval '2 hours'",
                                 errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_eq(claim_tx(admin, "fresh", true), QM_OK);
  cr_assert_eq(qm_inbox_purge(admin, 3600 * 1000, 3), 3, "limit honoured");
  cr_assert_eq(qm_inbox_purge(admin, 3600 * 1000, 100), 2);
  cr_assert_eq(qm_inbox_purge(admin, 3600 * 1000, 100), 0);
  cr_assert_eq(count_inbox(), 1, "recent ids are kept");
  cr_assert_eq(claim_tx(admin, "fresh", true), QM_EDUP);
  cr_assert_eq(qm_inbox_purge(admin, 0, 0), QM_EINVAL);
}
