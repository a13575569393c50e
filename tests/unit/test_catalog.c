/* Unit tests for intake's catalog loader: the sample catalog loads, and every
 * kind of mistake is refused with file, line and reason. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog.h"
#include "qm_common.h"

static char dir[64];

static void setup_dir(void) {
  snprintf(dir, sizeof(dir), "/tmp/qm-cat-%d", (int)getpid());
  mkdir(dir, 0700);
}

static void write_file(const char *name, const char *text) {
  char path[128];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  cr_assert_not_null(f);
  fputs(text, f);
  fclose(f);
}

static void teardown_dir(void) {
  char cmd[128];
  snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
  cr_assert_eq(system(cmd), 0);
}

TestSuite(catalog, .init = setup_dir, .fini = teardown_dir);

static const char *good_item = "id: figma\nkind: access\nname: Figma\nowner: p-0010\n"
                               "roles:\n  - id: viewer\n    group: app-figma-viewer\n"
                               "    risk: standard\n    auto_approve: true\n";

Test(catalog, sample_catalog_loads) {
  catalog_t *cat = NULL;
  char err[512] = "";
  cr_assert_eq(catalog_load_dir(QM_SOURCE_DIR "/deploy/local/catalog", &cat, err, sizeof(err)),
               QM_OK, "%s", err);
  cr_assert_geq(cat->n_items, 10);
  cr_assert_eq(cat->n_bundles, 3);
  const catalog_item_t *aws = catalog_find(cat, "aws");
  cr_assert_not_null(aws);
  const catalog_role_t *admin = catalog_find_role(aws, "prod-admin");
  cr_assert_not_null(admin);
  cr_assert_eq(admin->risk, CATALOG_RISK_ELEVATED);
  cr_assert_eq(admin->max_duration_days, 30);
  cr_assert_str_eq(admin->connector, "scim-main");
  catalog_destroy(cat);
}

Test(catalog, one_item_per_file_with_defaults) {
  write_file("figma.yaml", good_item);
  catalog_t *cat = NULL;
  char err[512] = "";
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_OK, "%s", err);
  cr_assert_eq(cat->n_items, 1);
  cr_assert(cat->items[0].roles[0].auto_approve);
  catalog_destroy(cat);
}

static void expect_refused(const char *text, const char *needle) {
  write_file("bad.yaml", text);
  catalog_t *cat = (catalog_t *)0x1;
  char err[512] = "";
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_EINVAL, "accepted: %s", text);
  cr_assert_eq(cat, (catalog_t *)0x1, "output touched on failure");
  cr_assert(strstr(err, needle), "error '%s' lacks '%s'", err, needle);
}

Test(catalog, errors_name_file_line_and_reason) {
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n  - id: r\n    group: g\n"
                 "    risk: extreme\n",
                 "bad.yaml:8: 'risk' must be standard, sensitive or elevated");
  expect_refused("id: x\nkind: gadget\n", "bad.yaml:2: 'kind' must be access, asset or licence");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\ncolour: red\n",
                 "bad.yaml:5: unknown item key 'colour'");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles: [\n", "YAML syntax error");
}

Test(catalog, policy_rules_are_enforced) {
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n"
                 "  - {id: a, group: g}\n  - {id: b, group: g}\n  - {id: c, group: g}\n"
                 "  - {id: d, group: g}\n  - {id: e, group: g}\n  - {id: f, group: g}\n",
                 "has 6 roles; at most 5");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n"
                 "  - {id: a, group: g, risk: elevated}\n",
                 "elevated: it needs max_duration_days");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n"
                 "  - {id: a, group: g, risk: sensitive, auto_approve: true}\n",
                 "auto_approve is allowed only at standard risk");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n  - {id: a}\n",
                 "needs a 'group'");
  expect_refused("id: x\nkind: access\nname: X\nowner: p\nroles:\n"
                 "  - {id: a, group: g}\n  - {id: a, group: h}\n",
                 "two roles with id 'a'");
}

Test(catalog, cross_file_checks) {
  write_file("a.yaml", good_item);
  write_file("b.yaml", good_item);
  catalog_t *cat = NULL;
  char err[512] = "";
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_EINVAL);
  cr_assert(strstr(err, "item id 'figma' is also defined in"), "%s", err);
  char path[128];
  snprintf(path, sizeof(path), "%s/b.yaml", dir);
  unlink(path);
  write_file("bundles.yaml", "bundles:\n  - department: Eng\n    items:\n"
                             "      - {item: figma, role: admin}\n");
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_EINVAL);
  cr_assert(strstr(err, "unknown item/role 'figma/admin'"), "%s", err);
}

Test(catalog, eligibility) {
  write_file("x.yaml", "id: netsuite\nkind: access\nname: NetSuite\nowner: p\n"
                       "roles: [{id: user, group: g}]\n"
                       "eligibility:\n  departments: [Finance]\n  employment_types: [employee]\n"
                       "  countries_excluded: [RU]\n");
  catalog_t *cat = NULL;
  char err[512] = "", why[256] = "";
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_OK, "%s", err);
  const catalog_item_t *it = &cat->items[0];
  catalog_person_t fin = {"employee", "Finance", "Accountant", "NL"};
  catalog_person_t eng = {"employee", "Engineering", "Engineer", "NL"};
  catalog_person_t con = {"contractor", "Finance", "Accountant", "NL"};
  catalog_person_t ru = {"employee", "finance", "Accountant", "RU"};
  cr_assert(catalog_eligible(it, &fin, why, sizeof(why)), "%s", why);
  cr_assert_not(catalog_eligible(it, &eng, why, sizeof(why)));
  cr_assert(strstr(why, "department 'Engineering'"), "%s", why);
  cr_assert_not(catalog_eligible(it, &con, NULL, 0));
  cr_assert_not(catalog_eligible(it, &ru, why, sizeof(why)));
  cr_assert(strstr(why, "country 'RU'"), "%s", why);
  catalog_destroy(cat);
}

Test(catalog, empty_directory_is_refused) {
  catalog_t *cat = NULL;
  char err[512] = "";
  cr_assert_eq(catalog_load_dir(dir, &cat, err, sizeof(err)), QM_EINVAL);
  cr_assert(strstr(err, "no catalog items"), "%s", err);
  cr_assert_eq(catalog_load_dir("/nonexistent-qm", &cat, err, sizeof(err)), QM_EINVAL);
}
