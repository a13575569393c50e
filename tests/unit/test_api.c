/* Unit tests for qm_api: paging parameters and list bodies, through a real
 * qm_http server on an ephemeral port. */
#include <criterion/criterion.h>
#include <curl/curl.h>
#include <jansson.h>
#include <string.h>

#include "qm_api.h"
#include "qm_auth.h"
#include "qm_common.h"
#include "qm_http.h"

#define SECRET "unit-test-secret-unit-test-secret-0123456789"

static void paged(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  QM_UNUSED(ctx);
  qm_problem_t *pb = NULL;
  qm_page_t page;
  if (!qm_api_page(req, 10, 100, &page, &pb)) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  json_t *items = json_array();
  json_array_append_new(items, json_integer(page.limit));
  json_array_append_new(items, json_integer(page.after));
  qm_http_resp_json(resp, 200, qm_api_list(items, page.after ? "" : "7"));
}

static size_t sink(char *p, size_t s, size_t n, void *ud) {
  strncat((char *)ud, p, s * n < 4000 - strlen((char *)ud) ? s * n : 0);
  return s * n;
}

static long get(uint16_t port, const char *path, const char *token, char *body) {
  CURL *c = curl_easy_init();
  char url[256], auth[1024];
  snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", port, path);
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
  struct curl_slist *h = curl_slist_append(NULL, auth);
  body[0] = '\0';
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, body);
  cr_assert_eq(curl_easy_perform(c), CURLE_OK);
  long code = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
  curl_slist_free_all(h);
  curl_easy_cleanup(c);
  return code;
}

Test(api, paging_defaults_bounds_and_list_shape) {
  qm_auth_conf_t ac = {.mode = QM_AUTH_HS256, .hs256_secret = SECRET};
  qm_auth_t *auth = NULL;
  char err[256];
  cr_assert_eq(qm_auth_new(&ac, &auth, err, sizeof(err)), QM_OK, "%s", err);
  qm_http_conf_t hc = {.bind_addr = "127.0.0.1", .port = 0, .auth = auth};
  qm_http_server_t *srv = NULL;
  cr_assert_eq(qm_http_new(&hc, &srv, err, sizeof(err)), QM_OK, "%s", err);
  cr_assert_eq(qm_http_route(srv, "GET", "/things", paged, NULL, 0, NULL), QM_OK);
  cr_assert_eq(qm_http_start(srv, err, sizeof(err)), QM_OK, "%s", err);
  const char *roles[] = {"employee"};
  char *token = NULL;
  cr_assert_eq(qm_auth_mint_hs256(SECRET, "p-1", roles, 1, 60, &token), QM_OK);
  char body[4096];
  uint16_t port = qm_http_port(srv);

  cr_assert_eq(get(port, "/things", token, body), 200, "%s", body);
  json_t *j = json_loads(body, 0, NULL);
  cr_assert_eq(json_integer_value(json_array_get(json_object_get(j, "items"), 0)), 10);
  cr_assert_str_eq(json_string_value(json_object_get(j, "next")), "7");
  json_decref(j);

  cr_assert_eq(get(port, "/things?limit=100&after=42", token, body), 200, "%s", body);
  j = json_loads(body, 0, NULL);
  cr_assert_eq(json_integer_value(json_array_get(json_object_get(j, "items"), 1)), 42);
  cr_assert_null(json_object_get(j, "next"), "empty next must be omitted");
  json_decref(j);

  cr_assert_eq(get(port, "/things?limit=0&after=x", token, body), 400, "%s", body);
  cr_assert(strstr(body, "\"limit\"") && strstr(body, "\"after\""), "both fields named: %s", body);
  cr_assert_eq(get(port, "/things?limit=101", token, body), 400);
  cr_assert(strstr(body, "from 1 to 100"), "%s", body);

  free(token);
  qm_http_begin_shutdown(srv);
  qm_http_stop(srv, 2000);
  qm_http_destroy(srv);
  qm_auth_destroy(auth);
}

Test(api, roles) {
  qm_principal_t p = {.nroles = 2};
  strcpy(p.sub, "p-1");
  strcpy(p.roles[0], "employee");
  strcpy(p.roles[1], "auditor");
  const char *const want[] = {"it_admin", "auditor", NULL};
  const char *const none[] = {"it_admin", NULL};
  cr_assert(qm_api_has_any_role(&p, want));
  cr_assert_not(qm_api_has_any_role(&p, none));
  cr_assert_not(qm_api_has_any_role(NULL, want));
}
