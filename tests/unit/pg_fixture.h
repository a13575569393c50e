/*
 * pg_fixture: what the PostgreSQL-backed unit tests (test_pg, test_outbox,
 * test_inbox) share — the database they use (qm_unit on the machine's
 * PostgreSQL, created when missing) and a loud failure when it is not there.
 * Each test binary makes its own schema in it and drops it at the end.
 */
#ifndef QM_TEST_PG_FIXTURE_H
#define QM_TEST_PG_FIXTURE_H

#include <criterion/criterion.h>
#include <string.h>

#include "qm_common.h"
#include "qm_pg.h"

#define ADMIN_DSN "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
#define UNIT_DSN "host=127.0.0.1 port=5432 user=postgres dbname=qm_unit connect_timeout=5"

/* Creates the qm_unit database when it is missing; fails the test, never
 * skips it, when PostgreSQL does not answer. */
static inline void pg_fixture_ensure_database(char *errstr, size_t errstr_size) {
  qm_pg_t *c = qm_pg_connect(ADMIN_DSN, NULL, errstr, errstr_size);
  cr_assert_not_null(c, "PostgreSQL at 127.0.0.1:5432 is not reachable (%s): start it", errstr);
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(c, "SELECT 1 FROM pg_database WHERE datname = 'qm_unit'", NULL, 0, &res,
                      errstr, errstr_size);
  cr_assert_eq(rc, QM_OK, "%s", errstr);
  if (qm_pg_ntuples(res) == 0) {
    rc = qm_pg_exec_simple(c, "CREATE DATABASE qm_unit", errstr, errstr_size);
    /* Another test binary may have created it just now. */
    cr_assert(rc == QM_OK || strcmp(qm_pg_last_sqlstate(c), "42P04") == 0 || rc == QM_EDUP,
              "CREATE DATABASE qm_unit: %s", errstr);
  }
  qm_pg_result_destroy(res);
  qm_pg_destroy(c);
}

#endif
