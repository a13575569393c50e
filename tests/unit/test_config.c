/* Unit tests for qm_config: parsing, validation messages, help and docs. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "qm_common.h"
#include "qm_config.h"

static const qm_cfg_def_t defs[] = {
    {"T_PORT", QM_CFG_INT, "8081", "HTTP port.", 1, 65535, 0},
    {"T_NAME", QM_CFG_STR, "intake", "Service name.", 0, 0, 0},
    {"T_DEBUG", QM_CFG_BOOL, "false", "Debug mode.", 0, 0, 0},
    {"T_TIMEOUT", QM_CFG_MS, "5s", "Shutdown bound.", 100, 60000, 0},
    {"T_DSN", QM_CFG_STR, NULL, "Database.", 0, 0, QM_CFG_REQUIRED},
    {"T_SECRET", QM_CFG_STR, "hunter2", "A secret.", 0, 0, QM_CFG_SECRET},
};

/* A lookup over a NULL-terminated list of "NAME=value" strings. */
static const char *lookup(void *ctx, const char *name) {
  const char *const *env = ctx;
  size_t n = strlen(name);
  for (; *env; env++)
    if (strncmp(*env, name, n) == 0 && (*env)[n] == '=') return *env + n + 1;
  return NULL;
}

static qm_config_t *load(const char *const *env, int *rc, char *err, size_t errsz) {
  qm_config_t *cfg = qm_config_new("qm-test");
  qm_config_add(cfg, defs, QM_ARRAY_LEN(defs));
  *rc = qm_config_load(cfg, lookup, (void *)env, err, errsz);
  return cfg;
}

Test(config, defaults_apply_and_types_parse) {
  const char *env[] = {"T_DSN=host=x", NULL};
  char err[512] = "";
  int rc;
  qm_config_t *cfg = load(env, &rc, err, sizeof(err));
  cr_assert_eq(rc, QM_OK, "%s", err);
  cr_assert_eq(qm_config_int(cfg, "T_PORT"), 8081);
  cr_assert_str_eq(qm_config_str(cfg, "T_NAME"), "intake");
  cr_assert_eq(qm_config_bool(cfg, "T_DEBUG"), false);
  cr_assert_eq(qm_config_ms(cfg, "T_TIMEOUT"), 5000);
  cr_assert_str_eq(qm_config_str(cfg, "T_DSN"), "host=x");
  qm_config_destroy(cfg);
}

Test(config, environment_overrides_defaults) {
  const char *env[] = {"T_DSN=d", "T_PORT=9000", "T_DEBUG=yes", "T_TIMEOUT=250ms", NULL};
  char err[512] = "";
  int rc;
  qm_config_t *cfg = load(env, &rc, err, sizeof(err));
  cr_assert_eq(rc, QM_OK, "%s", err);
  cr_assert_eq(qm_config_int(cfg, "T_PORT"), 9000);
  cr_assert(qm_config_bool(cfg, "T_DEBUG"));
  cr_assert_eq(qm_config_ms(cfg, "T_TIMEOUT"), 250);
  qm_config_destroy(cfg);
}

Test(config, every_bad_variable_is_named) {
  const char *env[] = {"T_PORT=abc", "T_DEBUG=maybe", "T_TIMEOUT=2h", NULL};
  char err[1024] = "";
  int rc;
  qm_config_t *cfg = load(env, &rc, err, sizeof(err));
  cr_assert_eq(rc, QM_EINVAL);
  cr_assert(strstr(err, "T_PORT: 'abc' is not an integer"), "%s", err);
  cr_assert(strstr(err, "T_DEBUG: 'maybe' is not a boolean"), "%s", err);
  cr_assert(strstr(err, "T_TIMEOUT: '2h' is out of range"), "%s", err);
  cr_assert(strstr(err, "T_DSN: required but not set"), "%s", err);
  qm_config_destroy(cfg);
}

Test(config, out_of_range_integer_is_refused) {
  const char *env[] = {"T_DSN=d", "T_PORT=70000", NULL};
  char err[512] = "";
  int rc;
  qm_config_t *cfg = load(env, &rc, err, sizeof(err));
  cr_assert_eq(rc, QM_EINVAL);
  cr_assert(strstr(err, "T_PORT: '70000' is out of range [1, 65535]"), "%s", err);
  qm_config_destroy(cfg);
}

Test(config, durations_parse) {
  int64_t ms;
  cr_assert_eq(qm_config_parse_ms("15", &ms), QM_OK);
  cr_assert_eq(ms, 15);
  cr_assert_eq(qm_config_parse_ms("3s", &ms), QM_OK);
  cr_assert_eq(ms, 3000);
  cr_assert_eq(qm_config_parse_ms("2m", &ms), QM_OK);
  cr_assert_eq(ms, 120000);
  cr_assert_eq(qm_config_parse_ms("7d", &ms), QM_OK);
  cr_assert_eq(ms, 7LL * 24 * 3600 * 1000);
  cr_assert_eq(qm_config_parse_ms("5 s", &ms), QM_EINVAL);
  cr_assert_eq(qm_config_parse_ms("-1s", &ms), QM_EINVAL);
  cr_assert_eq(qm_config_parse_ms("", &ms), QM_EINVAL);
}

Test(config, help_lists_every_variable_and_hides_secrets) {
  qm_config_t *cfg = qm_config_new("qm-test");
  qm_config_add(cfg, defs, QM_ARRAY_LEN(defs));
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  qm_config_help(cfg, f);
  fclose(f);
  for (size_t i = 0; i < QM_ARRAY_LEN(defs); i++) cr_assert(strstr(buf, defs[i].name), "%s", buf);
  cr_assert(strstr(buf, "(required)"));
  cr_assert_null(strstr(buf, "hunter2"), "secret default printed");
  free(buf);
  f = open_memstream(&buf, &len);
  qm_config_markdown(cfg, f);
  fclose(f);
  cr_assert(strstr(buf, "| `T_PORT` | integer | `8081` | HTTP port. |"), "%s", buf);
  free(buf);
  qm_config_destroy(cfg);
}

Test(config, first_definition_of_a_name_wins) {
  static const qm_cfg_def_t override[] = {{"T_PORT", QM_CFG_INT, "8083", "Port.", 1, 65535, 0}};
  qm_config_t *cfg = qm_config_new("qm-test");
  qm_config_add(cfg, override, 1);
  qm_config_add(cfg, defs, QM_ARRAY_LEN(defs));
  const char *env[] = {"T_DSN=d", NULL};
  cr_assert_eq(qm_config_load(cfg, lookup, (void *)env, NULL, 0), QM_OK);
  cr_assert_eq(qm_config_int(cfg, "T_PORT"), 8083);
  qm_config_destroy(cfg);
}
