/* Unit tests for qm_service's start-up contract: --help prints the whole
 * configuration table, and a bad environment variable stops the service
 * with exit status 2 before it touches any dependency. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "qm_common.h"
#include "qm_service.h"

static const qm_cfg_def_t own[] = {
    {"QM_TEST_ONLY", QM_CFG_INT, "5", "A service's own variable.", 1, 10, 0}};

static const qm_service_def_t def = {
    .name = "unittest", .default_port = 8099, .config = own, .n_config = 1};

Test(service, config_doc_lists_common_and_own_variables) {
  char *buf = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&buf, &len);
  FILE *saved = stdout;
  stdout = mem;
  char *argv[] = {"qm-unittest", "--config-doc", NULL};
  int rc = qm_service_main(2, argv, &def);
  fflush(mem);
  stdout = saved;
  fclose(mem);
  cr_assert_eq(rc, 0);
  cr_assert(strstr(buf, "`QM_PG_DSN`"), "%s", buf);
  cr_assert(strstr(buf, "`QM_KAFKA_BROKERS`"));
  cr_assert(strstr(buf, "| `QM_HTTP_PORT` | integer | `8099` |"), "%s", buf);
  cr_assert(strstr(buf, "`QM_TEST_ONLY`"));
  free(buf);
}

Test(service, bad_variable_exits_2) {
  setenv("QM_TEST_ONLY", "11", 1);
  char *argv[] = {"qm-unittest", NULL};
  cr_assert_eq(qm_service_main(1, argv, &def), 2);
  unsetenv("QM_TEST_ONLY");
  setenv("QM_AUTH_MODE", "basic", 1);
  cr_assert_eq(qm_service_main(1, argv, &def), 2);
  setenv("QM_AUTH_MODE", "rs256", 1); /* without a JWKS file */
  cr_assert_eq(qm_service_main(1, argv, &def), 2);
  unsetenv("QM_AUTH_MODE");
}

Test(service, unknown_argument_exits_2) {
  char *argv[] = {"qm-unittest", "--frobnicate", NULL};
  cr_assert_eq(qm_service_main(2, argv, &def), 2);
}
