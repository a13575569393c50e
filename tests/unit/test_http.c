/*
 * Unit tests for qm_http: a real server on an ephemeral port, called with
 * libcurl. Routing and path parameters, the problem responses (404, 405, 413,
 * 415, 400 malformed JSON, field errors), bearer authentication and roles
 * (401, 403, 200), the built-in /livez, /readyz and /metrics, request ids,
 * and graceful shutdown.
 */
#include "qm_auth.h"
#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_metrics.h"

#include <criterion/criterion.h>
#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define SECRET "0123456789abcdef0123456789abcdef-http-test"
#define MAX_BODY 4096

/* ---- fixture ---- */

typedef struct {
  atomic_int calls;
  atomic_int fail;
} check_ctx_t;

static qm_auth_t *auth;
static qm_metrics_t *metrics;
static qm_http_server_t *srv;
static check_ctx_t pg_check;
static char base[64];

static int check_postgres(void *ctx, char *errstr, size_t errstr_size) {
  check_ctx_t *c = ctx;
  atomic_fetch_add(&c->calls, 1);
  if (atomic_load(&c->fail)) return qm_err(errstr, errstr_size, QM_EIO, "connection refused");
  return QM_OK;
}

static void h_get_request(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  const qm_principal_t *p = qm_http_req_principal(req);
  const char *view = qm_http_req_query(req, "view");
  qm_http_resp_json(resp, 200,
                    json_pack("{s:s,s:s,s:s?,s:s,s:s,s:s,s:s?}", "id",
                              qm_http_req_param(req, "id"), "sub", p ? p->sub : "(none)",
                              "view", view, "rid", qm_http_req_id(req), "tp",
                              qm_http_req_traceparent(req), "route", qm_http_req_route(req),
                              "hdr", qm_http_req_header(req, "x-custom-header")));
}

static void h_mine(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_resp_json(resp, 200, json_pack("{s:b}", "mine", 1));
}

static void h_create(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  json_t *body = qm_http_req_json(req);
  if (!body) return; /* the 400 problem is set */
  json_t *d = json_object_get(body, "duration_days");
  json_t *item = json_object_get(body, "item");
  bool bad_d = !json_is_integer(d) || json_integer_value(d) < 1 || json_integer_value(d) > 90;
  bool bad_item = !json_is_string(item);
  if (bad_d || bad_item) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid request");
    qm_problem_detail(pb, "some fields are invalid");
    if (bad_d) qm_problem_field(pb, "duration_days", "must be between 1 and 90");
    if (bad_item) qm_problem_field(pb, "item", "is required");
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_http_resp_header(resp, "Location", "/v1/requests/r-1");
  qm_http_resp_json(resp, 201, json_pack("{s:O}", "echo", body));
}

static void h_cancel(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_resp_empty(resp, 202);
}

static void h_public(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_resp_json(resp, 200,
                    json_pack("{s:b}", "anonymous", qm_http_req_principal(req) == NULL));
}

static void h_nothing(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {}

static void h_slow(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  usleep(400 * 1000);
  qm_http_resp_json(resp, 200, json_pack("{s:b}", "slow", 1));
}

static void h_upload(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  size_t len = 0;
  qm_http_req_body(req, &len);
  qm_http_resp_json(resp, 200, json_pack("{s:I}", "len", (json_int_t)len));
}

/* A streamed body of ?lines=N lines "line <i>\n", aborted after ?fail_at=K
 * lines when given; `stream_freed` counts the free callbacks. */
typedef struct {
  int next, lines, fail_at;
} stream_state_t;
static atomic_int stream_freed;

static long stream_fill(void *ctx, char *buf, size_t cap) {
  stream_state_t *s = ctx;
  if (s->fail_at >= 0 && s->next >= s->fail_at) return -1;
  if (s->next >= s->lines) return 0;
  int n = snprintf(buf, cap, "line %d\n", s->next);
  if (n < 0 || (size_t)n >= cap) return -1;
  s->next++;
  return n;
}

static void stream_free(void *ctx) {
  free(ctx);
  atomic_fetch_add(&stream_freed, 1);
}

static void h_stream(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  stream_state_t *s = calloc(1, sizeof(*s));
  const char *lines = qm_http_req_query(req, "lines");
  const char *fail = qm_http_req_query(req, "fail_at");
  s->lines = lines ? atoi(lines) : 0;
  s->fail_at = fail ? atoi(fail) : -1;
  qm_http_resp_stream(resp, 200, "text/plain", stream_fill, s, stream_free);
  if (qm_http_req_query(req, "replace")) /* a later response drops the stream */
    qm_http_resp_json(resp, 409, json_pack("{s:b}", "replaced", 1));
}

static void start_server(void) {
  qm_log_init("test", QM_LOG_FATAL, NULL);
  curl_global_init(CURL_GLOBAL_DEFAULT);
  char err[256] = "";
  qm_auth_conf_t ac = {.mode = QM_AUTH_HS256, .hs256_secret = SECRET};
  cr_assert_eq(qm_auth_new(&ac, &auth, err, sizeof(err)), QM_OK, "%s", err);
  metrics = qm_metrics_new();
  qm_http_conf_t conf = {.bind_addr = "127.0.0.1", .port = 0, .threads = 2,
                         .max_body_bytes = MAX_BODY, .auth = auth, .metrics = metrics};
  cr_assert_eq(qm_http_new(&conf, &srv, err, sizeof(err)), QM_OK, "%s", err);
  static const char *const creators[] = {"employee", "manager", NULL};
  static const char *const admins[] = {"it_admin", NULL};
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/requests/{id}", h_get_request, NULL, 0, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/requests/mine", h_mine, NULL, 0, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "POST", "/v1/requests", h_create, NULL, 0, creators), 0);
  cr_assert_eq(
      qm_http_route(srv, "POST", "/v1/requests/{id}/cancel", h_cancel, NULL, 0, admins), 0);
  cr_assert_eq(qm_http_route(srv, "GET", "/public/ping", h_public, NULL, QM_HTTP_PUBLIC, NULL),
               0);
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/nothing", h_nothing, NULL, 0, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/slow", h_slow, NULL, QM_HTTP_PUBLIC, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/stream", h_stream, NULL, QM_HTTP_PUBLIC, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "PUT", "/v1/upload", h_upload, NULL,
                             QM_HTTP_PUBLIC | QM_HTTP_ANY_BODY, NULL),
               0);
  /* Registration errors. */
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/mine", h_mine, NULL, 0, NULL), 0);
  cr_assert_eq(qm_http_route(srv, "GET", "/v1/mine", h_mine, NULL, 0, NULL), QM_EDUP);
  cr_assert_eq(qm_http_route(srv, "GET", "no-slash", h_mine, NULL, 0, NULL), QM_EINVAL);
  cr_assert_eq(qm_http_route(srv, "GET", "/a//b", h_mine, NULL, 0, NULL), QM_EINVAL);
  cr_assert_eq(qm_http_route(srv, "GET", "/a/{b-c}", h_mine, NULL, 0, NULL), QM_EINVAL);
  cr_assert_eq(qm_http_route(srv, "get", "/a", h_mine, NULL, 0, NULL), QM_EINVAL);
  atomic_store(&pg_check.calls, 0);
  atomic_store(&pg_check.fail, 0);
  cr_assert_eq(qm_http_ready_check(srv, "postgres", check_postgres, &pg_check), 0);
  cr_assert_eq(qm_http_port(srv), 0);
  cr_assert_eq(qm_http_start(srv, err, sizeof(err)), QM_OK, "%s", err);
  cr_assert_neq(qm_http_port(srv), 0);
  snprintf(base, sizeof(base), "http://127.0.0.1:%u", (unsigned)qm_http_port(srv));
  cr_assert_eq(qm_http_route(srv, "GET", "/late", h_mine, NULL, 0, NULL), QM_ECONFLICT);
}

static void stop_server(void) {
  qm_http_destroy(srv);
  srv = NULL;
  qm_metrics_destroy(metrics);
  qm_auth_destroy(auth);
  curl_global_cleanup();
}

/* ---- client ---- */

typedef struct {
  long status;
  CURLcode curl_rc;
  char *body;
  size_t len;
  char *headers;
  size_t hlen;
  json_t *json;
} http_resp_t;

typedef struct {
  char *p;
  size_t len;
} sink_t;

static size_t sink_write(char *data, size_t size, size_t n, void *userp) {
  sink_t *s = userp;
  size_t add = size * n;
  s->p = qm_realloc(s->p, s->len + add + 1);
  memcpy(s->p + s->len, data, add);
  s->len += add;
  s->p[s->len] = '\0';
  return add;
}

typedef struct {
  size_t left;
} source_t;

static size_t source_read(char *buf, size_t size, size_t n, void *userp) {
  source_t *s = userp;
  size_t k = size * n < s->left ? size * n : s->left;
  memset(buf, 'x', k);
  s->left -= k;
  return k;
}

/* One request. handle may be NULL (a fresh connection) or reused. token
 * NULL = no Authorization. extra: NULL-terminated header lines. */
static void call(CURL *handle, const char *method, const char *path, const char *token,
                 const char *const *extra, const char *body, const char *content_type,
                 http_resp_t *r) {
  memset(r, 0, sizeof(*r));
  CURL *c = handle ? handle : curl_easy_init();
  curl_easy_reset(c);
  char url[512];
  snprintf(url, sizeof(url), "%s%s", base, path);
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
  sink_t bsink = {0}, hsink = {0};
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink_write);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &bsink);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, sink_write);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &hsink);
  struct curl_slist *hl = NULL;
  char line[4096];
  if (token) {
    snprintf(line, sizeof(line), "Authorization: Bearer %s", token);
    hl = curl_slist_append(hl, line);
  }
  if (content_type) {
    snprintf(line, sizeof(line), "Content-Type: %s", content_type);
    hl = curl_slist_append(hl, line);
  }
  hl = curl_slist_append(hl, "Expect:");
  for (size_t i = 0; extra && extra[i]; i++) hl = curl_slist_append(hl, extra[i]);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
  if (body) {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
  }
  r->curl_rc = curl_easy_perform(c);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
  curl_slist_free_all(hl);
  if (!handle) curl_easy_cleanup(c);
  r->body = bsink.p;
  r->len = bsink.len;
  r->headers = hsink.p;
  r->hlen = hsink.len;
  if (r->body) r->json = json_loadb(r->body, r->len, 0, NULL);
}

static void resp_free(http_resp_t *r) {
  free(r->body);
  free(r->headers);
  json_decref(r->json);
}

/* The value of a response header (case-insensitive name), copied into out. */
static bool header(const http_resp_t *r, const char *name, char *out, size_t out_size) {
  if (!r->headers) return false;
  size_t n = strlen(name);
  for (const char *p = r->headers; *p;) {
    const char *eol = strstr(p, "\r\n");
    size_t ll = eol ? (size_t)(eol - p) : strlen(p);
    if (ll > n && strncasecmp(p, name, n) == 0 && p[n] == ':') {
      const char *v = p + n + 1;
      while (*v == ' ') v++;
      size_t vl = ll - (size_t)(v - p);
      if (vl >= out_size) vl = out_size - 1;
      memcpy(out, v, vl);
      out[vl] = '\0';
      return true;
    }
    if (!eol) break;
    p = eol + 2;
  }
  return false;
}

static char *token(const char *sub, const char *const *roles, size_t n) {
  char *t = NULL;
  cr_assert_eq(qm_auth_mint_hs256(SECRET, sub, roles, n, 600, &t), QM_OK);
  return t;
}

static const char *jstr(const http_resp_t *r, const char *key) {
  return json_string_value(json_object_get(r->json, key));
}

/* Checks the RFC 9457 shape of a problem response. */
static void assert_problem(const http_resp_t *r, long status, const char *type_suffix,
                           const char *instance) {
  cr_assert_eq(r->status, status, "status %ld, body %s", r->status, r->body);
  char ct[128];
  cr_assert(header(r, "Content-Type", ct, sizeof(ct)));
  cr_assert_str_eq(ct, "application/problem+json");
  cr_assert_not_null(r->json, "body is not JSON: %s", r->body);
  char type[160];
  snprintf(type, sizeof(type), "https://quartermaster.dev/problems/%s", type_suffix);
  cr_assert_str_eq(jstr(r, "type"), type);
  cr_assert_not_null(jstr(r, "title"));
  cr_assert_eq(json_integer_value(json_object_get(r->json, "status")), status);
  cr_assert_str_eq(jstr(r, "instance"), instance);
}

TestSuite(http, .init = start_server, .fini = stop_server, .timeout = 30);

/* ---- routing ---- */

Test(http, routing_path_params_query_headers_and_request_ids) {
  const char *roles[] = {"employee"};
  char *tok = token("person-7", roles, 1);
  const char *extra[] = {"X-Request-Id: client-req.42",
                         "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                         "X-Custom-Header: hello", NULL};
  http_resp_t r;
  call(NULL, "GET", "/v1/requests/abc-123?view=full", tok, extra, NULL, NULL, &r);
  cr_assert_eq(r.status, 200, "%s", r.body);
  cr_assert_str_eq(jstr(&r, "id"), "abc-123");
  cr_assert_str_eq(jstr(&r, "sub"), "person-7");
  cr_assert_str_eq(jstr(&r, "view"), "full");
  cr_assert_str_eq(jstr(&r, "route"), "/v1/requests/{id}");
  cr_assert_str_eq(jstr(&r, "hdr"), "hello", "header lookup is case-insensitive");
  cr_assert_str_eq(jstr(&r, "rid"), "client-req.42");
  cr_assert_str_eq(jstr(&r, "tp"), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
  char rid[80];
  cr_assert(header(&r, "X-Request-Id", rid, sizeof(rid)));
  cr_assert_str_eq(rid, "client-req.42");
  char ct[80];
  cr_assert(header(&r, "Content-Type", ct, sizeof(ct)));
  cr_assert_str_eq(ct, "application/json");
  resp_free(&r);

  /* A literal segment wins over a parameter. */
  call(NULL, "GET", "/v1/requests/mine", tok, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200);
  cr_assert(json_is_true(json_object_get(r.json, "mine")), "%s", r.body);
  resp_free(&r);

  /* An invalid request id is replaced by a UUID; a bad traceparent by a new one. */
  const char *bad[] = {"X-Request-Id: has spaces and {braces}", "traceparent: nope", NULL};
  call(NULL, "GET", "/v1/requests/x", tok, bad, NULL, NULL, &r);
  cr_assert(qm_uuid_valid(jstr(&r, "rid")), "%s", jstr(&r, "rid"));
  cr_assert(header(&r, "X-Request-Id", rid, sizeof(rid)));
  cr_assert_str_eq(rid, jstr(&r, "rid"));
  cr_assert_eq(strlen(jstr(&r, "tp")), 55);
  cr_assert_str_neq(jstr(&r, "tp"), "nope");
  cr_assert(json_is_null(json_object_get(r.json, "view")), "absent query parameter is NULL");
  resp_free(&r);
  free(tok);
}

Test(http, unknown_path_is_404_problem) {
  http_resp_t r;
  call(NULL, "GET", "/nope", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 404, "not-found", "/nope");
  resp_free(&r);
  call(NULL, "GET", "/v1/requests/abc/", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 404, "not-found", "/v1/requests/abc/");
  resp_free(&r);
  call(NULL, "GET", "/v1/requests/abc/cancel/more", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 404);
  resp_free(&r);
}

Test(http, wrong_method_is_405_with_allow) {
  http_resp_t r;
  call(NULL, "DELETE", "/v1/requests/abc", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 405, "method-not-allowed", "/v1/requests/abc");
  char allow[64];
  cr_assert(header(&r, "Allow", allow, sizeof(allow)));
  cr_assert_str_eq(allow, "GET");
  resp_free(&r);
  call(NULL, "GET", "/v1/requests", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 405, "method-not-allowed", "/v1/requests");
  cr_assert(header(&r, "Allow", allow, sizeof(allow)));
  cr_assert_str_eq(allow, "POST");
  resp_free(&r);
}

/* ---- bodies ---- */

Test(http, body_over_limit_is_413) {
  const char *roles[] = {"employee"};
  char *tok = token("p", roles, 1);
  char *big = qm_malloc(MAX_BODY + 100);
  memset(big, ' ', MAX_BODY + 99);
  big[0] = '{';
  big[MAX_BODY + 97] = '}';
  big[MAX_BODY + 99] = '\0';
  http_resp_t r;
  call(NULL, "POST", "/v1/requests", tok, NULL, big, "application/json", &r);
  assert_problem(&r, 413, "payload-too-large", "/v1/requests");
  cr_assert_not_null(strstr(jstr(&r, "detail"), "4096"), "%s", jstr(&r, "detail"));
  resp_free(&r);

  /* Chunked (no Content-Length): read, dropped past the limit, then 413. */
  CURL *c = curl_easy_init();
  char url[256];
  snprintf(url, sizeof(url), "%s/v1/upload", base);
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
  source_t src = {MAX_BODY * 2};
  curl_easy_setopt(c, CURLOPT_READFUNCTION, source_read);
  curl_easy_setopt(c, CURLOPT_READDATA, &src);
  struct curl_slist *hl = curl_slist_append(NULL, "Transfer-Encoding: chunked");
  hl = curl_slist_append(hl, "Expect:");
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
  sink_t sink = {0};
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink_write);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
  cr_assert_eq(curl_easy_perform(c), CURLE_OK);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  cr_assert_eq(status, 413, "%s", sink.p);
  free(sink.p);
  /* Within the limit the same route takes it. */
  src.left = MAX_BODY - 10;
  sink.p = NULL;
  sink.len = 0;
  cr_assert_eq(curl_easy_perform(c), CURLE_OK);
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  cr_assert_eq(status, 200, "%s", sink.p);
  cr_assert_not_null(strstr(sink.p, "\"len\":4086"), "%s", sink.p);
  free(sink.p);
  curl_slist_free_all(hl);
  curl_easy_cleanup(c);
  free(big);
  free(tok);
}

Test(http, malformed_json_is_400_naming_line_and_column) {
  const char *roles[] = {"employee"};
  char *tok = token("p", roles, 1);
  http_resp_t r;
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"item\": \"laptop\",\n  \"duration_days\": }",
       "application/json", &r);
  assert_problem(&r, 400, "malformed-json", "/v1/requests");
  cr_assert_eq(json_integer_value(json_object_get(r.json, "line")), 2, "%s", r.body);
  cr_assert_gt(json_integer_value(json_object_get(r.json, "column")), 0);
  cr_assert_not_null(strstr(jstr(&r, "detail"), "line 2, column"), "%s", jstr(&r, "detail"));
  resp_free(&r);

  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"a\":1,\"a\":2}", "application/json", &r);
  assert_problem(&r, 400, "malformed-json", "/v1/requests");
  cr_assert_not_null(strstr(jstr(&r, "detail"), "duplicate"), "%s", jstr(&r, "detail"));
  resp_free(&r);

  call(NULL, "POST", "/v1/requests", tok, NULL, NULL, NULL, &r);
  assert_problem(&r, 400, "malformed-json", "/v1/requests");
  cr_assert_not_null(strstr(jstr(&r, "detail"), "empty"), "%s", jstr(&r, "detail"));
  resp_free(&r);
  free(tok);
}

Test(http, handler_field_errors_are_problem_json_with_errors_array) {
  const char *roles[] = {"employee"};
  char *tok = token("p", roles, 1);
  http_resp_t r;
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"duration_days\": 500}", "application/json",
       &r);
  assert_problem(&r, 400, "validation", "/v1/requests");
  cr_assert_str_eq(jstr(&r, "title"), "Invalid request");
  cr_assert_str_eq(jstr(&r, "detail"), "some fields are invalid");
  json_t *errors = json_object_get(r.json, "errors");
  cr_assert(json_is_array(errors), "%s", r.body);
  cr_assert_eq(json_array_size(errors), 2);
  json_t *e0 = json_array_get(errors, 0);
  cr_assert_str_eq(json_string_value(json_object_get(e0, "field")), "duration_days");
  cr_assert_str_eq(json_string_value(json_object_get(e0, "reason")), "must be between 1 and 90");
  json_t *e1 = json_array_get(errors, 1);
  cr_assert_str_eq(json_string_value(json_object_get(e1, "field")), "item");
  resp_free(&r);
  free(tok);
}

Test(http, non_json_body_is_415) {
  const char *roles[] = {"employee"};
  char *tok = token("p", roles, 1);
  http_resp_t r;
  call(NULL, "POST", "/v1/requests", tok, NULL, "item=laptop", "application/x-www-form-urlencoded",
       &r);
  assert_problem(&r, 415, "unsupported-media-type", "/v1/requests");
  resp_free(&r);
  /* application/json with parameters and +json types are fine. */
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"item\":\"x\",\"duration_days\":3}",
       "application/json; charset=utf-8", &r);
  cr_assert_eq(r.status, 201, "%s", r.body);
  resp_free(&r);
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"item\":\"x\",\"duration_days\":3}",
       "application/merge-patch+json", &r);
  cr_assert_eq(r.status, 201, "%s", r.body);
  resp_free(&r);
  free(tok);
}

/* ---- authentication and roles ---- */

Test(http, missing_or_bad_token_is_401_with_challenge) {
  http_resp_t r;
  call(NULL, "GET", "/v1/requests/abc", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 401, "unauthorized", "/v1/requests/abc");
  char www[256];
  cr_assert(header(&r, "WWW-Authenticate", www, sizeof(www)));
  cr_assert_str_eq(www, "Bearer error=\"invalid_token\", error_description=\"missing bearer token\"");
  resp_free(&r);

  call(NULL, "GET", "/v1/requests/abc", "not.a.token", NULL, NULL, NULL, &r);
  assert_problem(&r, 401, "unauthorized", "/v1/requests/abc");
  cr_assert(header(&r, "WWW-Authenticate", www, sizeof(www)));
  cr_assert_not_null(strstr(www, "Bearer error=\"invalid_token\", error_description=\""), "%s",
                     www);
  cr_assert_not_null(strstr(jstr(&r, "detail"), "header"), "%s", jstr(&r, "detail"));
  resp_free(&r);

  /* A token signed with another secret. */
  char *other = NULL;
  cr_assert_eq(qm_auth_mint_hs256("some-other-secret-0123456789abcdef", "p", NULL, 0, 60, &other),
               QM_OK);
  call(NULL, "GET", "/v1/requests/abc", other, NULL, NULL, NULL, &r);
  assert_problem(&r, 401, "unauthorized", "/v1/requests/abc");
  cr_assert_not_null(strstr(jstr(&r, "detail"), "signature"), "%s", jstr(&r, "detail"));
  resp_free(&r);
  free(other);

  /* Authentication comes before reading a body: no 413/415 for strangers. */
  call(NULL, "POST", "/v1/requests", NULL, NULL, "x", "text/plain", &r);
  cr_assert_eq(r.status, 401);
  resp_free(&r);
}

Test(http, missing_role_is_403_naming_roles_and_role_gives_access) {
  const char *roles[] = {"contractor"};
  char *tok = token("p-9", roles, 1);
  http_resp_t r;
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"item\":\"x\",\"duration_days\":3}",
       "application/json", &r);
  assert_problem(&r, 403, "forbidden", "/v1/requests");
  cr_assert_not_null(strstr(jstr(&r, "detail"), "employee, manager"), "%s", jstr(&r, "detail"));
  json_t *needed = json_object_get(r.json, "required_roles");
  cr_assert_eq(json_array_size(needed), 2);
  cr_assert_str_eq(json_string_value(json_array_get(needed, 0)), "employee");
  resp_free(&r);

  call(NULL, "POST", "/v1/requests/r-1/cancel", tok, NULL, NULL, NULL, &r);
  assert_problem(&r, 403, "forbidden", "/v1/requests/r-1/cancel");
  resp_free(&r);
  free(tok);

  const char *mgr[] = {"manager"};
  tok = token("p-10", mgr, 1);
  call(NULL, "POST", "/v1/requests", tok, NULL, "{\"item\":\"x\",\"duration_days\":3}",
       "application/json", &r);
  cr_assert_eq(r.status, 201, "%s", r.body);
  char loc[64];
  cr_assert(header(&r, "Location", loc, sizeof(loc)));
  cr_assert_str_eq(loc, "/v1/requests/r-1");
  cr_assert_eq(json_integer_value(json_object_get(json_object_get(r.json, "echo"),
                                                  "duration_days")),
               3);
  resp_free(&r);
  free(tok);

  const char *admin[] = {"employee", "it_admin"};
  tok = token("p-11", admin, 2);
  call(NULL, "POST", "/v1/requests/r-1/cancel", tok, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 202, "%s", r.body);
  cr_assert_eq(r.len, 0);
  resp_free(&r);
  free(tok);
}

Test(http, public_route_needs_no_token_and_silent_handler_is_500) {
  http_resp_t r;
  call(NULL, "GET", "/public/ping", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200);
  cr_assert(json_is_true(json_object_get(r.json, "anonymous")));
  resp_free(&r);
  char *tok = token("p", NULL, 0);
  call(NULL, "GET", "/v1/nothing", tok, NULL, NULL, NULL, &r);
  assert_problem(&r, 500, "internal", "/v1/nothing");
  resp_free(&r);
  free(tok);
}

Test(http, streamed_response_is_chunked_complete_and_freed_once) {
  atomic_store(&stream_freed, 0);
  http_resp_t r;
  call(NULL, "GET", "/v1/stream?lines=20000", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.curl_rc, CURLE_OK);
  cr_assert_eq(r.status, 200);
  cr_assert(strstr(r.headers, "Transfer-Encoding: chunked") != NULL, "%s", r.headers);
  cr_assert(strstr(r.headers, "Content-Type: text/plain") != NULL, "%s", r.headers);
  int n = 0;
  for (size_t i = 0; i < r.len; i++) n += r.body[i] == '\n';
  cr_assert_eq(n, 20000);
  cr_assert(r.len > 20 && memcmp(r.body + r.len - 11, "line 19999\n", 11) == 0);
  resp_free(&r);
  /* An aborted stream: the client must not see a complete body. */
  call(NULL, "GET", "/v1/stream?lines=100&fail_at=10", NULL, NULL, NULL, NULL, &r);
  cr_assert_neq(r.curl_rc, CURLE_OK, "an aborted stream must end the transfer with an error");
  resp_free(&r);
  /* A stream replaced by a later response is freed, not sent. */
  call(NULL, "GET", "/v1/stream?lines=3&replace=1", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 409);
  resp_free(&r);
  for (int i = 0; i < 100 && atomic_load(&stream_freed) < 3; i++) usleep(10000);
  cr_assert_eq(atomic_load(&stream_freed), 3);
}

/* ---- probes and metrics ---- */

Test(http, livez_and_readyz_follow_checks_and_shutdown) {
  http_resp_t r;
  call(NULL, "GET", "/livez", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200);
  cr_assert_str_eq(jstr(&r, "status"), "alive");
  resp_free(&r);

  CURL *keep = curl_easy_init();
  call(keep, "GET", "/readyz", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200, "%s", r.body);
  cr_assert_str_eq(jstr(&r, "status"), "ready");
  json_t *pg = json_object_get(json_object_get(r.json, "checks"), "postgres");
  cr_assert_str_eq(json_string_value(json_object_get(pg, "status")), "ok");
  resp_free(&r);
  /* Cached: a second probe right away does not run the check again. */
  call(keep, "GET", "/readyz", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200);
  cr_assert_eq(atomic_load(&pg_check.calls), 1);
  resp_free(&r);

  atomic_store(&pg_check.fail, 1);
  usleep(1100 * 1000);
  call(keep, "GET", "/readyz", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 503, "not-ready", "/readyz");
  cr_assert_str_eq(jstr(&r, "detail"), "failing checks: postgres");
  pg = json_object_get(json_object_get(r.json, "checks"), "postgres");
  cr_assert_str_eq(json_string_value(json_object_get(pg, "status")), "fail");
  cr_assert_str_eq(json_string_value(json_object_get(pg, "reason")), "connection refused");
  resp_free(&r);

  atomic_store(&pg_check.fail, 0);
  usleep(1100 * 1000);
  call(keep, "GET", "/readyz", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200, "%s", r.body);
  resp_free(&r);

  qm_http_begin_shutdown(srv);
  /* The kept-alive connection still gets answers: readiness fails now. */
  call(keep, "GET", "/readyz", NULL, NULL, NULL, NULL, &r);
  assert_problem(&r, 503, "not-ready", "/readyz");
  char conn[32];
  cr_assert(header(&r, "Connection", conn, sizeof(conn)));
  cr_assert_str_eq(conn, "close");
  resp_free(&r);
  curl_easy_cleanup(keep);
  /* New connections are refused. */
  call(NULL, "GET", "/livez", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.curl_rc, CURLE_COULDNT_CONNECT, "curl: %s", curl_easy_strerror(r.curl_rc));
  resp_free(&r);
  cr_assert_eq(qm_http_stop(srv, 1000), QM_OK);
}

Test(http, metrics_count_requests_by_route_pattern) {
  const char *roles[] = {"employee"};
  char *tok = token("p", roles, 1);
  http_resp_t r;
  call(NULL, "GET", "/v1/requests/id-one", tok, NULL, NULL, NULL, &r);
  resp_free(&r);
  call(NULL, "GET", "/v1/requests/id-two", tok, NULL, NULL, NULL, &r);
  resp_free(&r);
  call(NULL, "GET", "/v1/requests/id-three", NULL, NULL, NULL, NULL, &r);
  resp_free(&r);
  call(NULL, "GET", "/does/not/exist", NULL, NULL, NULL, NULL, &r);
  resp_free(&r);
  /* The access log and metrics are written after the response is sent. */
  usleep(100 * 1000);
  call(NULL, "GET", "/metrics", NULL, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 200);
  char ct[80];
  cr_assert(header(&r, "Content-Type", ct, sizeof(ct)));
  cr_assert_eq(strncmp(ct, "text/plain; version=0.0.4", 25), 0, "%s", ct);
  cr_assert_not_null(
      strstr(r.body, "# TYPE qm_http_requests_total counter\n"), "%s", r.body);
  cr_assert_not_null(
      strstr(r.body,
             "qm_http_requests_total{method=\"GET\",route=\"/v1/requests/{id}\",code=\"200\"} 2\n"),
      "%s", r.body);
  cr_assert_not_null(
      strstr(r.body,
             "qm_http_requests_total{method=\"GET\",route=\"/v1/requests/{id}\",code=\"401\"} 1\n"),
      "%s", r.body);
  cr_assert_not_null(
      strstr(r.body, "qm_http_requests_total{method=\"GET\",route=\"unmatched\",code=\"404\"} 1\n"),
      "%s", r.body);
  cr_assert_not_null(strstr(r.body, "qm_http_request_duration_seconds_count{method=\"GET\","
                                    "route=\"/v1/requests/{id}\"} 3\n"),
                     "%s", r.body);
  cr_assert_null(strstr(r.body, "id-one"), "no concrete ids in labels");
  cr_assert_null(strstr(r.body, "/does/not/exist"), "no concrete paths in labels");
  resp_free(&r);
  free(tok);
}

/* ---- graceful stop ---- */

typedef struct {
  http_resp_t r;
} bg_t;

static void *bg_call(void *arg) {
  bg_t *bg = arg;
  call(NULL, "GET", "/v1/slow", NULL, NULL, NULL, NULL, &bg->r);
  return NULL;
}

Test(http, stop_waits_for_in_flight_requests) {
  bg_t bg;
  pthread_t th;
  pthread_create(&th, NULL, bg_call, &bg);
  usleep(150 * 1000); /* the handler is sleeping now */
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_http_stop(srv, 3000), QM_OK);
  int64_t waited = qm_mono_ms() - t0;
  pthread_join(th, NULL);
  cr_assert_eq(bg.r.status, 200, "in-flight request completed (curl %d)", bg.r.curl_rc);
  cr_assert(json_is_true(json_object_get(bg.r.json, "slow")));
  cr_assert_geq(waited, 100);
  resp_free(&bg.r);
  /* Stopped: nothing answers, and stop again is harmless. */
  http_resp_t r;
  call(NULL, "GET", "/livez", NULL, NULL, NULL, NULL, &r);
  cr_assert_neq(r.curl_rc, CURLE_OK);
  resp_free(&r);
  cr_assert_eq(qm_http_stop(srv, 10), QM_OK);
}

Test(http, stop_times_out_when_a_handler_overruns) {
  bg_t bg;
  pthread_t th;
  pthread_create(&th, NULL, bg_call, &bg);
  usleep(100 * 1000);
  cr_assert_eq(qm_http_stop(srv, 50), QM_ETIMEOUT);
  pthread_join(th, NULL);
  resp_free(&bg.r);
}

/* ---- defaults and bind errors (no fixture) ---- */

static void no_fixture(void) {
  qm_log_init("test", QM_LOG_FATAL, NULL);
  curl_global_init(CURL_GLOBAL_DEFAULT);
}

TestSuite(http_conf, .init = no_fixture, .timeout = 30);

Test(http_conf, default_body_limit_is_one_mib_and_port_in_use_fails) {
  qm_http_server_t *s = NULL;
  char err[256] = "";
  qm_http_conf_t conf = {.bind_addr = "127.0.0.1"};
  cr_assert_eq(qm_http_new(&conf, &s, err, sizeof(err)), QM_OK, "%s", err);
  cr_assert_eq(qm_http_route(s, "PUT", "/up", h_upload, NULL, QM_HTTP_PUBLIC, NULL), QM_OK);
  cr_assert_eq(qm_http_start(s, err, sizeof(err)), QM_OK, "%s", err);
  srv = s;
  snprintf(base, sizeof(base), "http://127.0.0.1:%u", (unsigned)qm_http_port(s));

  size_t n = QM_HTTP_DEFAULT_MAX_BODY;
  cr_assert_eq(n, 1024 * 1024);
  char *body = qm_malloc(n + 2);
  memset(body, ' ', n + 1);
  body[0] = '[';
  body[n - 1] = ']';
  body[n] = '\0';
  http_resp_t r;
  call(NULL, "PUT", "/up", NULL, NULL, body, "application/json", &r);
  cr_assert_eq(r.status, 200, "exactly 1 MiB is accepted: %s", r.body);
  resp_free(&r);
  body[n] = ' ';
  body[n + 1] = '\0';
  call(NULL, "PUT", "/up", NULL, NULL, body, "application/json", &r);
  cr_assert_eq(r.status, 413, "%s", r.body);
  resp_free(&r);
  free(body);

  /* A second server on the same port cannot bind. */
  qm_http_server_t *s2 = NULL;
  qm_http_conf_t conf2 = {.bind_addr = "127.0.0.1", .port = qm_http_port(s)};
  cr_assert_eq(qm_http_new(&conf2, &s2, err, sizeof(err)), QM_OK);
  cr_assert_eq(qm_http_start(s2, err, sizeof(err)), QM_EIO);
  cr_assert_not_null(strstr(err, "cannot listen"), "%s", err);
  qm_http_destroy(s2);

  qm_http_conf_t bad = {.bind_addr = "localhost"};
  cr_assert_eq(qm_http_new(&bad, &s2, err, sizeof(err)), QM_EINVAL);
  qm_http_destroy(s);
  srv = NULL;
  curl_global_cleanup();
}
