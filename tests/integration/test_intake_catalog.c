/*
 * test_intake_catalog: intake's catalog API and catalog-as-code reload
 * (issue 3) against the real stack:
 *
 *   listing      GET /v1/catalog shows only what the caller may request
 *                (department, employment type), `kind=` filters
 *   for=         managers see it as a direct report would, helpdesk as
 *                anyone would; others are refused
 *   seats        licences show seats and seats_available, which drops when
 *                a seat is granted
 *   form         GET /v1/catalog/{item} lists an item's attributes as
 *                {"name", "type": "enum", "values", "required", "default"}
 *   reload       intake runs on a temporary copy of the sample catalog; a
 *                broken file and SIGHUP keep the old catalog serving (the
 *                log names the file and line); a fixed file and SIGHUP
 *                serve the new item
 *
 * One stack for the whole file (Criterion runs each Test in its own process,
 * so the cases run inside one Test; a failing case does not stop the others).
 */
#include "harness.h"

#include "qm_common.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cat_ctx {
  const char *dir; /* intake's QM_INTAKE_CATALOG_DIR (a temporary copy) */
} cat_ctx_t;

/* Broken on purpose: "name" is indented less than its siblings (line 5). */
static const char broken_yaml[] = "# broken on purpose by test_intake_catalog\n"
                                  "items:\n"
                                  "  - id: it-reload-item\n"
                                  "    kind: access\n"
                                  "   name: Bad indentation\n";
#define BROKEN_FILE "zz-reload.yaml"
#define BROKEN_LINE "5"

static const char fixed_yaml[] = "# added by test_intake_catalog's reload case\n"
                                 "items:\n"
                                 "  - id: it-reload-item\n"
                                 "    kind: access\n"
                                 "    name: Reloaded item\n"
                                 "    owner: p-0015\n"
                                 "    roles:\n"
                                 "      - id: user\n"
                                 "        group: app-it-reload\n"
                                 "        risk: standard\n"
                                 "        auto_approve: true\n";

/* ------------------------------------------------------------ helpers */

/* GET /v1/catalog (every page) as the token's holder with extra query
 * (e.g. "for=p-0013&", "kind=licence&"; "" for none). Returns the items as
 * an object id -> item; ends the case unless every page answers 200. */
static json_t *catalog_items(it_cases_t *cs, it_stack_t *st, const char *token,
                             const char *query) {
  json_t *out = json_object();
  char after[64] = "";
  for (int page = 0; page < 20; page++) {
    char path[256];
    snprintf(path, sizeof(path), "/v1/catalog?%slimit=200%s%s", query, after[0] ? "&after=" : "",
             after);
    it_resp_t r;
    it_http(st, "intake", "GET", path, token, NULL, NULL, &r);
    json_t *items = json_object_get(r.json, "items");
    IT_CHECK(cs, r.status == 200 && json_is_array(items), "GET %s: %ld %s", path, r.status,
             r.body);
    size_t i;
    json_t *it;
    json_array_foreach(items, i, it) {
      const char *id = json_string_value(json_object_get(it, "id"));
      IT_CHECK(cs, id && json_is_string(json_object_get(it, "kind")) &&
                       json_is_string(json_object_get(it, "name")),
               "catalog item without id, kind or name in %s", r.body);
      json_object_set(out, id, it);
    }
    const char *next = json_string_value(json_object_get(r.json, "next"));
    bool more = next && *next;
    if (more) qm_strlcpy(after, next, sizeof(after));
    it_resp_clear(&r);
    if (!more) return out;
  }
  IT_CHECK(cs, false, "GET /v1/catalog kept paging after 20 pages");
  return out;
}

/* Every id of want is listed, none of unwanted. */
static void expect_listing(it_cases_t *cs, const json_t *items, const char *who,
                           const char *const *want, const char *const *unwanted) {
  char *ids = NULL;
  {
    size_t len = 0, cap = 1024;
    ids = qm_malloc(cap);
    ids[0] = '\0';
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)items, k, v) {
      size_t kl = strlen(k);
      if (len + kl + 2 >= cap) {
        cap = (len + kl + 2) * 2;
        ids = qm_realloc(ids, cap);
      }
      len += (size_t)snprintf(ids + len, cap - len, "%s%s", len ? " " : "", k);
    }
  }
  for (size_t i = 0; want && want[i]; i++)
    IT_CHECK(cs, json_object_get(items, want[i]) != NULL, "%s: %s is not listed; listed: %s", who,
             want[i], ids);
  for (size_t i = 0; unwanted && unwanted[i]; i++)
    IT_CHECK(cs, json_object_get(items, unwanted[i]) == NULL,
             "%s: %s is listed but they may not request it; listed: %s", who, unwanted[i], ids);
  free(ids);
}

/* The form entry named name of an item answer (NULL when none). */
static json_t *form_field(const json_t *item, const char *name) {
  size_t i;
  json_t *f;
  json_array_foreach(json_object_get(item, "form"), i, f) {
    const char *n = json_string_value(json_object_get(f, "name"));
    if (n && !strcmp(n, name)) return f;
  }
  return NULL;
}

/* The JSON array holds exactly these strings, in this order. */
static bool strings_are(const json_t *arr, const char *const *want) {
  size_t n = 0;
  while (want[n]) n++;
  if (!json_is_array(arr) || json_array_size(arr) != n) return false;
  for (size_t i = 0; i < n; i++) {
    const char *v = json_string_value(json_array_get(arr, i));
    if (!v || strcmp(v, want[i])) return false;
  }
  return true;
}

/* ------------------------------------------------------------ cases */

static void c_listing(it_stack_t *st, it_cases_t *cs) {
  /* p-0013: Engineering, US, employee. */
  char *eng = it_token("p-0013", "employee");
  json_t *items = catalog_items(cs, st, eng, "");
  static const char *const eng_yes[] = {"datadog", "1password", "aws", "github", "laptop-pro",
                                        "laptop-standard", "adobe-cc", "jetbrains", "figma", NULL};
  static const char *const eng_no[] = {"salesforce", "netsuite", "hubspot", NULL};
  expect_listing(cs, items, "p-0013 (Engineering)", eng_yes, eng_no);
  json_decref(items);
  /* p-0014: Sales, GB, employee. */
  char *sales = it_token("p-0014", "employee");
  items = catalog_items(cs, st, sales, "");
  static const char *const sales_yes[] = {"salesforce", "hubspot", "adobe-cc", "1password",
                                          "slack", "laptop-standard", NULL};
  static const char *const sales_no[] = {"aws", "laptop-pro", "jetbrains", "datadog", "netsuite",
                                         NULL};
  expect_listing(cs, items, "p-0014 (Sales)", sales_yes, sales_no);
  json_decref(items);
  /* p-0010: Support, contractor: github yes (employees and contractors). */
  char *con = it_token("p-0010", "contractor");
  items = catalog_items(cs, st, con, "");
  static const char *const con_yes[] = {"github", "datadog", "hubspot", NULL};
  static const char *const con_no[] = {"aws", "netsuite", NULL};
  expect_listing(cs, items, "p-0010 (Support contractor)", con_yes, con_no);
  json_decref(items);
  /* kind= filters. */
  items = catalog_items(cs, st, eng, "kind=licence&");
  static const char *const lic_yes[] = {"adobe-cc", "jetbrains", NULL};
  static const char *const lic_no[] = {"github", "laptop-standard", NULL};
  expect_listing(cs, items, "p-0013 kind=licence", lic_yes, lic_no);
  const char *k;
  json_t *v;
  json_object_foreach(items, k, v) {
    const char *kind = json_string_value(json_object_get(v, "kind"));
    IT_CHECK(cs, kind && !strcmp(kind, "licence"), "kind=licence lists %s of kind %s", k,
             kind ? kind : "(none)");
  }
  json_decref(items);
  free(con);
  free(sales);
  free(eng);
}

static void c_for_person(it_stack_t *st, it_cases_t *cs) {
  char *mgr = it_token("p-0002", "employee,manager");
  json_t *items = catalog_items(cs, st, mgr, "for=p-0013&");
  static const char *const rep_yes[] = {"aws", "datadog", "laptop-pro", NULL};
  static const char *const rep_no[] = {"salesforce", NULL};
  expect_listing(cs, items, "p-0002 for p-0013", rep_yes, rep_no);
  json_decref(items);
  it_resp_t r;
  it_http(st, "intake", "GET", "/v1/catalog?for=p-0014", mgr, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 403, "manager p-0002 for p-0014 (not a report): expected 403, got %ld %s",
           r.status, r.body);
  it_resp_clear(&r);
  char *hd = it_token("p-0099", "employee,helpdesk");
  items = catalog_items(cs, st, hd, "for=p-0014&");
  static const char *const hd_yes[] = {"salesforce", "hubspot", NULL};
  static const char *const hd_no[] = {"aws", "laptop-pro", NULL};
  expect_listing(cs, items, "helpdesk for p-0014", hd_yes, hd_no);
  json_decref(items);
  char *emp = it_token("p-0101", "employee");
  it_http(st, "intake", "GET", "/v1/catalog?for=p-0102", emp, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 403, "employee p-0101 for p-0102: expected 403, got %ld %s", r.status,
           r.body);
  it_resp_clear(&r);
  free(emp);
  free(hd);
  free(mgr);
}

static void c_seats(it_stack_t *st, it_cases_t *cs) {
  char *eng = it_token("p-0013", "employee");
  json_t *items = catalog_items(cs, st, eng, "kind=licence&");
  json_t *adobe = json_object_get(items, "adobe-cc");
  json_t *jb = json_object_get(items, "jetbrains");
  char *text = it_json_text(items);
  IT_CHECK(cs, adobe && json_integer_value(json_object_get(adobe, "seats")) == 3 &&
                   json_is_integer(json_object_get(adobe, "seats_available")) &&
                   json_integer_value(json_object_get(adobe, "seats_available")) == 3,
           "adobe-cc should show seats 3, seats_available 3 on a fresh stack: %s", text);
  IT_CHECK(cs, jb && json_integer_value(json_object_get(jb, "seats")) == 50 &&
                   json_integer_value(json_object_get(jb, "seats_available")) == 50,
           "jetbrains should show seats 50, seats_available 50: %s", text);
  free(text);
  json_decref(items);
  /* One seat granted: one fewer available, for everyone. */
  it_resp_t r;
  it_http(st, "intake", "POST", "/v1/requests", eng,
          "{\"lines\":[{\"item_id\":\"adobe-cc\",\"role_id\":\"user\"}]}", NULL, &r);
  const char *id = json_string_value(json_object_get(r.json, "id"));
  IT_CHECK(cs, r.status == 201 && id, "p-0013 asking for adobe-cc: %ld %s", r.status, r.body);
  char *rid = qm_strdup(id);
  it_resp_clear(&r);
  json_decref(it_case_wait_status(cs, st, eng, rid, "granted", 30000));
  char *sales = it_token("p-0014", "employee");
  items = catalog_items(cs, st, sales, "kind=licence&");
  adobe = json_object_get(items, "adobe-cc");
  text = it_json_text(adobe);
  IT_CHECK(cs, adobe && json_integer_value(json_object_get(adobe, "seats")) == 3 &&
                   json_integer_value(json_object_get(adobe, "seats_available")) == 2,
           "after one grant adobe-cc should show seats 3, seats_available 2: %s", text);
  free(text);
  json_decref(items);
  free(sales);
  free(rid);
  free(eng);
}

static void c_form(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0013", "employee");
  it_resp_t r;
  it_http(st, "intake", "GET", "/v1/catalog/laptop-standard", t, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200, "GET /v1/catalog/laptop-standard: %ld %s", r.status, r.body);
  IT_CHECK(cs, json_is_array(json_object_get(r.json, "form")), "no form array: %s", r.body);
  json_t *kb = form_field(r.json, "keyboard");
  json_t *ram = form_field(r.json, "ram");
  IT_CHECK(cs, kb && ram, "form lacks keyboard or ram: %s", r.body);
  static const char *const kb_values[] = {"US", "UK", "DE", "FR", NULL};
  static const char *const ram_values[] = {"16GB", "32GB", NULL};
  const char *kb_type = json_string_value(json_object_get(kb, "type"));
  IT_CHECK(cs, kb_type && !strcmp(kb_type, "enum"), "keyboard type is not enum: %s", r.body);
  IT_CHECK(cs, strings_are(json_object_get(kb, "values"), kb_values),
           "keyboard values are not [US, UK, DE, FR]: %s", r.body);
  IT_CHECK(cs, json_is_true(json_object_get(kb, "required")), "keyboard is not required: %s",
           r.body);
  const char *kb_def = json_string_value(json_object_get(kb, "default"));
  IT_CHECK(cs, kb_def == NULL, "keyboard has a default '%s' it should not have", kb_def);
  const char *ram_type = json_string_value(json_object_get(ram, "type"));
  IT_CHECK(cs, ram_type && !strcmp(ram_type, "enum"), "ram type is not enum: %s", r.body);
  IT_CHECK(cs, strings_are(json_object_get(ram, "values"), ram_values),
           "ram values are not [16GB, 32GB]: %s", r.body);
  const char *ram_def = json_string_value(json_object_get(ram, "default"));
  IT_CHECK(cs, ram_def && !strcmp(ram_def, "16GB"), "ram default is not 16GB: %s", r.body);
  IT_CHECK(cs, json_is_boolean(json_object_get(ram, "required")) &&
                   !json_is_true(json_object_get(ram, "required")),
           "ram (with a default) should say required: false: %s", r.body);
  it_resp_clear(&r);
  /* An item without attributes has no attribute fields. */
  it_http(st, "intake", "GET", "/v1/catalog/figma", t, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200 && json_is_array(json_object_get(r.json, "form")),
           "GET /v1/catalog/figma: %ld %s", r.status, r.body);
  IT_CHECK(cs, !form_field(r.json, "keyboard") && !form_field(r.json, "ram"),
           "figma's form has attribute fields: %s", r.body);
  it_resp_clear(&r);
  it_http(st, "intake", "GET", "/v1/catalog/no-such-item", t, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 404 && !strncmp(r.content_type, "application/problem+json", 24),
           "unknown item: expected a 404 problem, got %ld %s", r.status, r.body);
  it_resp_clear(&r);
  free(t);
}

static void c_reload(it_stack_t *st, it_cases_t *cs) {
  cat_ctx_t *cx = cs->ctx;
  char *t = it_token("p-0013", "employee");
  it_resp_t r;
  /* A broken file: refused whole, the old catalog keeps serving. */
  size_t mark = it_service_log_size(st, "intake");
  it_file_write(cx->dir, BROKEN_FILE, broken_yaml);
  it_service_signal(st, "intake", SIGHUP);
  char *log = it_service_log_wait(st, "intake", mark, "catalog reload refused", 15000);
  char *tail = it_service_log_tail(st, "intake", 20);
  IT_CHECK(cs, log != NULL, "no 'catalog reload refused' in intake's log 15 s after SIGHUP:\n%s",
           tail);
  IT_CHECK(cs, strstr(log, BROKEN_FILE ":" BROKEN_LINE) != NULL,
           "the refusal does not name " BROKEN_FILE ":" BROKEN_LINE ":\n%s", log);
  IT_CHECK(cs, it_service_running(st, "intake"), "intake died on a broken catalog:\n%s", tail);
  it_http(st, "intake", "GET", "/v1/catalog/datadog", t, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200, "after a refused reload datadog is gone: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  json_t *items = catalog_items(cs, st, t, "");
  static const char *const yes[] = {"datadog", "github", NULL};
  static const char *const no[] = {"it-reload-item", NULL};
  expect_listing(cs, items, "after a refused reload", yes, no);
  json_decref(items);
  free(tail);
  free(log);

  /* Fixed: the new item is served. */
  mark = it_service_log_size(st, "intake");
  it_file_write(cx->dir, BROKEN_FILE, fixed_yaml);
  it_service_signal(st, "intake", SIGHUP);
  int64_t deadline = it_now_ms() + 15000;
  for (;;) {
    it_http(st, "intake", "GET", "/v1/catalog/it-reload-item", t, NULL, NULL, &r);
    long status = r.status;
    it_resp_clear(&r);
    if (status == 200) break;
    char *since = it_service_log_since(st, "intake", mark);
    IT_CHECK(cs, it_now_ms() < deadline, "it-reload-item not served 15 s after the fix and "
             "SIGHUP (last %ld); intake logged since:\n%s", status, since);
    free(since);
    it_sleep_ms(100);
  }
  items = catalog_items(cs, st, t, "");
  static const char *const yes2[] = {"it-reload-item", "datadog", "github", NULL};
  expect_listing(cs, items, "after the fixed reload", yes2, NULL);
  json_decref(items);
  /* And requests are checked against it. */
  it_http(st, "intake", "POST", "/v1/requests", t,
          "{\"lines\":[{\"item_id\":\"it-reload-item\",\"role_id\":\"user\"}]}", NULL, &r);
  IT_CHECK(cs, r.status == 201, "requesting the reloaded item: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  free(t);
}

/* ------------------------------------------------------------ the test */

Test(intake_catalog, catalog_api_and_reload, .fini = it_fini, .timeout = 600) {
  char *dir = it_dir_copy_yaml(QM_SOURCE_DIR "/deploy/local/catalog", "catalog");
  char *env_dir = qm_asprintf("QM_INTAKE_CATALOG_DIR=%s", dir);
  const it_svc_env_t env[] = {{"intake", env_dir}, {NULL, NULL}};
  it_stack_t *st = it_stack_up_env("intake-catalog", NULL, env);
  cat_ctx_t cx = {.dir = dir};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "listing", c_listing);
  it_case_run(&cs, st, "for_person", c_for_person);
  it_case_run(&cs, st, "seats", c_seats);
  it_case_run(&cs, st, "form", c_form);
  it_case_run(&cs, st, "reload", c_reload);
  bool all = it_cases_report(&cs, "intake_catalog");
  free(env_dir);
  if (all) {
    it_stack_down(st);
    it_dir_remove(dir);
  }
  free(dir);
  cr_assert(all, "intake_catalog: some cases failed (see the case report above)");
}
