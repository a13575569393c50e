/*
 * qm_http: the services' HTTP server on libmicrohttpd 0.9.75 (MHD).
 *
 * How a request flows. MHD runs a pool of threads, each with its own epoll
 * loop, and calls qm_http_access() several times per request:
 *  1. once the headers are in: we allocate the request, pick the route, check
 *     the token and roles, the Content-Type and a declared Content-Length, and
 *     when any of that fails answer at once (MHD then discards the body and
 *     closes the connection, so an unauthenticated caller cannot make us
 *     buffer a megabyte);
 *  2. once per chunk of body: we append it, up to max_body_bytes; beyond
 *     that (only possible with chunked uploads) we drop the data and remember;
 *  3. once the body is complete: 413 if it was too large, else the handler
 *     runs and its response is queued.
 * MHD's completion callback then records the metrics, writes the access log
 * line and frees the request; the in-flight counter goes up in step 1 and
 * down there, which is what qm_http_stop() waits on.
 *
 * Routes are an array scanned linearly (services have a few dozen), fixed
 * once the server starts, so lookups need no lock. Shutdown state is atomic.
 */
#include "qm_http.h"

#include "qm_common.h"
#include "qm_event.h"
#include "qm_log.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define QM_HTTP_MAX_SEGMENTS 16
#define QM_HTTP_MAX_PARAMS 8
#define QM_HTTP_MAX_ROLES 16
#define QM_HTTP_READY_CACHE_MS 1000
#define QM_HTTP_DISCARD_FACTOR 4 /* chunked bodies: close after 4x the limit */
#define QM_HTTP_UNMATCHED "unmatched"

typedef struct {
  char *method;
  char *pattern;
  size_t nsegs;
  char *segs[QM_HTTP_MAX_SEGMENTS]; /* literal text, or the parameter name */
  bool is_param[QM_HTTP_MAX_SEGMENTS];
  unsigned score; /* one bit per literal segment, leftmost highest */
  qm_http_handler_fn handler;
  void *ctx;
  int flags;
  char *roles[QM_HTTP_MAX_ROLES];
  size_t nroles;
} qm_http_route_t;

typedef struct {
  char *name;
  qm_http_ready_fn fn;
  void *ctx;
  pthread_mutex_t lock; /* serialises runs; guards the cached result */
  bool has_result;
  int64_t checked_ms;
  int rc;
  char reason[256];
} qm_http_check_t;

struct qm_http_server {
  char *bind_addr;
  uint16_t conf_port;
  unsigned threads;
  size_t max_body;
  unsigned conn_timeout_s;
  qm_auth_t *auth;
  qm_metrics_t *metrics;
  qm_metrics_t *own_metrics;
  qm_metric_family_t *m_requests;
  qm_metric_family_t *m_duration;

  qm_http_route_t *routes;
  size_t nroutes;
  qm_http_check_t **checks;
  size_t nchecks;

  pthread_mutex_t lock; /* start / begin_shutdown / stop */
  struct MHD_Daemon *mhd;
  MHD_socket quiesced_fd;
  uint16_t port;
  atomic_bool started;
  atomic_bool shutting_down;
  atomic_int inflight;
};

typedef struct {
  char *name;
  char *value;
} qm_http_header_t;

struct qm_http_resp {
  qm_http_req_t *req;
  int status;
  char *content_type;
  char *body; /* malloc'd; handed to MHD */
  size_t len;
  qm_http_header_t *headers;
  size_t nheaders;
  /* A streamed body (qm_http_resp_stream()) instead of body/len. */
  qm_http_stream_fn stream_fn;
  void *stream_ctx;
  void (*stream_free)(void *ctx);
};

struct qm_http_req {
  qm_http_server_t *srv;
  struct MHD_Connection *conn;
  const qm_http_route_t *route;
  const char *route_label; /* pattern, or QM_HTTP_UNMATCHED */
  char method[16];
  char *path;
  size_t nparams;
  const char *param_names[QM_HTTP_MAX_PARAMS];
  char *param_values[QM_HTTP_MAX_PARAMS];
  char *body;
  size_t body_len;
  size_t body_cap;
  size_t discarded;
  bool too_large;
  json_t *json;
  bool has_principal;
  qm_principal_t principal;
  char request_id[65];
  char traceparent[64];
  char trace_id[33];
  int64_t start_us;
  int status_sent; /* 0 until a response is queued */
  qm_http_resp_t resp;
};

struct qm_problem {
  json_t *doc;    /* type, title, status, detail, extensions */
  json_t *errors; /* [{field, reason}] */
};

/* ======================================================================
 * Problems (RFC 9457)
 * ====================================================================== */

qm_problem_t *qm_problem_new(int status, const char *type_suffix, const char *title) {
  qm_problem_t *pb = qm_calloc(1, sizeof(*pb));
  char *type = qm_asprintf("%s%s", QM_HTTP_PROBLEM_BASE, type_suffix ? type_suffix : "error");
  pb->doc = json_object();
  json_object_set_new(pb->doc, "type", json_string(type));
  json_object_set_new(pb->doc, "title", json_string(title ? title : "Error"));
  json_object_set_new(pb->doc, "status", json_integer(status));
  pb->errors = json_array();
  free(type);
  return pb;
}

void qm_problem_detail(qm_problem_t *pb, const char *detail) {
  if (!pb || !detail) return;
  json_t *s = json_string(detail);
  if (!s) s = json_string("(detail is not valid UTF-8)");
  json_object_set_new(pb->doc, "detail", s);
}

void qm_problem_field(qm_problem_t *pb, const char *field, const char *reason) {
  qm_problem_field_rule(pb, field, NULL, reason);
}

void qm_problem_field_rule(qm_problem_t *pb, const char *field, const char *rule,
                           const char *reason) {
  if (!pb || !field || !reason) return;
  json_t *e = json_object();
  json_object_set_new(e, "field", json_string(field));
  if (rule && *rule) json_object_set_new(e, "rule", json_string(rule));
  json_object_set_new(e, "reason", json_string(reason));
  json_array_append_new(pb->errors, e);
}

int qm_problem_status(const qm_problem_t *pb) {
  return pb ? (int)json_integer_value(json_object_get(pb->doc, "status")) : 0;
}

void qm_problem_extension(qm_problem_t *pb, const char *name, json_t *value) {
  if (!pb || !name) {
    json_decref(value);
    return;
  }
  json_object_set_new(pb->doc, name, value);
}

void qm_problem_destroy(qm_problem_t *pb) {
  if (!pb) return;
  json_decref(pb->doc);
  json_decref(pb->errors);
  free(pb);
}

/* ======================================================================
 * Responses
 * ====================================================================== */

static void qm_http_resp_set(qm_http_resp_t *resp, int status, const char *content_type,
                             char *body, size_t len) {
  free(resp->content_type);
  free(resp->body);
  if (resp->stream_free) resp->stream_free(resp->stream_ctx); /* a stream set earlier is dropped */
  resp->stream_fn = NULL;
  resp->stream_free = NULL;
  resp->stream_ctx = NULL;
  resp->status = status;
  resp->content_type = content_type ? qm_strdup(content_type) : NULL;
  resp->body = body;
  resp->len = body ? len : 0;
}

void qm_http_resp_json(qm_http_resp_t *resp, int status, json_t *body) {
  if (!resp) {
    json_decref(body);
    return;
  }
  char *text = NULL;
  if (body) text = json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
  json_decref(body);
  qm_http_resp_set(resp, status, text ? "application/json" : NULL, text,
                   text ? strlen(text) : 0);
}

void qm_http_resp_body(qm_http_resp_t *resp, int status, const char *content_type,
                       const char *body, size_t len) {
  if (!resp) return;
  char *copy = NULL;
  if (body) {
    copy = qm_malloc(len + 1);
    memcpy(copy, body, len);
    copy[len] = '\0';
  }
  qm_http_resp_set(resp, status, content_type, copy, len);
}

void qm_http_resp_empty(qm_http_resp_t *resp, int status) {
  if (resp) qm_http_resp_set(resp, status, NULL, NULL, 0);
}

void qm_http_resp_header(qm_http_resp_t *resp, const char *name, const char *value) {
  if (!resp || !name || !value) return;
  resp->headers = qm_realloc(resp->headers, (resp->nheaders + 1) * sizeof(*resp->headers));
  resp->headers[resp->nheaders].name = qm_strdup(name);
  resp->headers[resp->nheaders].value = qm_strdup(value);
  resp->nheaders++;
}

int qm_http_resp_status(const qm_http_resp_t *resp) { return resp ? resp->status : 0; }

void qm_http_resp_problem(qm_http_resp_t *resp, qm_problem_t *pb) {
  if (!resp || !pb) {
    qm_problem_destroy(pb);
    return;
  }
  if (resp->req && resp->req->path) {
    json_t *inst = json_string(resp->req->path);
    if (inst) json_object_set_new(pb->doc, "instance", inst);
  }
  if (json_array_size(pb->errors) > 0) json_object_set(pb->doc, "errors", pb->errors);
  int status = (int)json_integer_value(json_object_get(pb->doc, "status"));
  char *text = json_dumps(pb->doc, JSON_COMPACT);
  qm_http_resp_set(resp, status, "application/problem+json", text, text ? strlen(text) : 0);
  qm_problem_destroy(pb);
}

void qm_http_problem(qm_http_resp_t *resp, int status, const char *type_suffix,
                     const char *title, const char *detail) {
  qm_problem_t *pb = qm_problem_new(status, type_suffix, title);
  qm_problem_detail(pb, detail);
  qm_http_resp_problem(resp, pb);
}

static void qm_http_resp_clear(qm_http_resp_t *resp) {
  free(resp->content_type);
  free(resp->body);
  if (resp->stream_free) resp->stream_free(resp->stream_ctx); /* never sent */
  for (size_t i = 0; i < resp->nheaders; i++) {
    free(resp->headers[i].name);
    free(resp->headers[i].value);
  }
  free(resp->headers);
  memset(resp, 0, sizeof(*resp));
}

/* ======================================================================
 * Requests: accessors
 * ====================================================================== */

const char *qm_http_req_method(const qm_http_req_t *req) { return req->method; }
const char *qm_http_req_path(const qm_http_req_t *req) { return req->path; }
const char *qm_http_req_route(const qm_http_req_t *req) { return req->route_label; }
const char *qm_http_req_id(const qm_http_req_t *req) { return req->request_id; }
const char *qm_http_req_traceparent(const qm_http_req_t *req) { return req->traceparent; }
const char *qm_http_req_trace_id(const qm_http_req_t *req) { return req->trace_id; }

const char *qm_http_req_param(const qm_http_req_t *req, const char *name) {
  if (!req || !name) return NULL;
  for (size_t i = 0; i < req->nparams; i++)
    if (strcmp(req->param_names[i], name) == 0) return req->param_values[i];
  return NULL;
}

const char *qm_http_req_query(const qm_http_req_t *req, const char *name) {
  if (!req || !name) return NULL;
  const char *value = NULL;
  if (MHD_lookup_connection_value_n(req->conn, MHD_GET_ARGUMENT_KIND, name, strlen(name),
                                    &value, NULL) != MHD_YES)
    return NULL;
  return value ? value : "";
}

const char *qm_http_req_header(const qm_http_req_t *req, const char *name) {
  if (!req || !name) return NULL;
  return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

const char *qm_http_req_body(const qm_http_req_t *req, size_t *len) {
  if (len) *len = req->body_len;
  return req->body_len ? req->body : NULL;
}

const qm_principal_t *qm_http_req_principal(const qm_http_req_t *req) {
  return req->has_principal ? &req->principal : NULL;
}

json_t *qm_http_req_json(qm_http_req_t *req) {
  if (!req) return NULL;
  if (req->json) return req->json;
  if (req->body_len == 0) {
    qm_http_problem(&req->resp, 400, "malformed-json", "Malformed JSON",
                    "the request body is empty; a JSON document is required");
    return NULL;
  }
  json_error_t jerr;
  req->json = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
  if (!req->json) {
    char detail[320];
    snprintf(detail, sizeof(detail), "invalid JSON at line %d, column %d: %s", jerr.line,
             jerr.column, jerr.text);
    qm_problem_t *pb = qm_problem_new(400, "malformed-json", "Malformed JSON");
    qm_problem_detail(pb, detail);
    qm_problem_extension(pb, "line", json_integer(jerr.line));
    qm_problem_extension(pb, "column", json_integer(jerr.column));
    qm_http_resp_problem(&req->resp, pb);
  }
  return req->json;
}

/* ======================================================================
 * Routes
 * ====================================================================== */

static bool qm_http_method_ok(const char *m) {
  if (!m || !*m || strlen(m) >= sizeof(((qm_http_req_t *)0)->method)) return false;
  for (const char *c = m; *c; c++)
    if (*c < 'A' || *c > 'Z') return false;
  return true;
}

static void qm_http_route_free(qm_http_route_t *rt) {
  free(rt->method);
  free(rt->pattern);
  for (size_t i = 0; i < rt->nsegs; i++) free(rt->segs[i]);
  for (size_t i = 0; i < rt->nroles; i++) free(rt->roles[i]);
}

/* Splits a pattern into segments. "/" has none. 0 or QM_EINVAL. */
static int qm_http_route_parse(qm_http_route_t *rt, const char *pattern) {
  if (!pattern || pattern[0] != '/') return QM_EINVAL;
  if (strcmp(pattern, "/") == 0) return QM_OK;
  const char *p = pattern + 1;
  size_t nparams = 0;
  for (;;) {
    const char *end = strchr(p, '/');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n == 0 || rt->nsegs == QM_HTTP_MAX_SEGMENTS) return QM_EINVAL;
    size_t i = rt->nsegs;
    if (p[0] == '{') {
      if (n < 3 || p[n - 1] != '}' || nparams == QM_HTTP_MAX_PARAMS) return QM_EINVAL;
      for (size_t k = 1; k < n - 1; k++) {
        char c = p[k];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_'))
          return QM_EINVAL;
      }
      rt->segs[i] = qm_strndup(p + 1, n - 2);
      rt->is_param[i] = true;
      nparams++;
    } else {
      if (memchr(p, '{', n) || memchr(p, '}', n)) return QM_EINVAL;
      rt->segs[i] = qm_strndup(p, n);
      if (i < 31) rt->score |= 1u << (31 - i);
    }
    rt->nsegs++;
    if (!end) break;
    p = end + 1;
  }
  return QM_OK;
}

/* True when path fits the route's segments. When req is given, fills its
 * path parameters. */
static bool qm_http_route_match(const qm_http_route_t *rt, const char *path, qm_http_req_t *req) {
  if (path[0] != '/') return false;
  if (rt->nsegs == 0) return path[1] == '\0';
  const char *p = path + 1;
  for (size_t i = 0; i < rt->nsegs; i++) {
    const char *end = strchr(p, '/');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n == 0) return false;
    if ((i + 1 < rt->nsegs) != (end != NULL)) return false; /* too few or too many segments */
    if (rt->is_param[i]) {
      if (req) {
        req->param_names[req->nparams] = rt->segs[i];
        req->param_values[req->nparams] = qm_strndup(p, n);
        req->nparams++;
      }
    } else if (strlen(rt->segs[i]) != n || memcmp(rt->segs[i], p, n) != 0) {
      return false;
    }
    if (end) p = end + 1;
  }
  return true;
}

int qm_http_route(qm_http_server_t *srv, const char *method, const char *pattern,
                  qm_http_handler_fn handler, void *ctx, int flags,
                  const char *const *roles_any) {
  int rc = QM_EINVAL;
  qm_http_route_t rt;
  memset(&rt, 0, sizeof(rt));
  if (!srv || !handler || !qm_http_method_ok(method)) goto out;
  if (atomic_load(&srv->started)) {
    rc = QM_ECONFLICT;
    goto out;
  }
  if (qm_http_route_parse(&rt, pattern) != QM_OK) goto out;
  for (size_t i = 0; i < srv->nroutes; i++)
    if (strcmp(srv->routes[i].method, method) == 0 &&
        strcmp(srv->routes[i].pattern, pattern) == 0) {
      rc = QM_EDUP;
      goto out;
    }
  if (roles_any && !(flags & QM_HTTP_PUBLIC)) {
    for (; roles_any[rt.nroles]; rt.nroles++) {
      if (rt.nroles == QM_HTTP_MAX_ROLES) goto out;
      rt.roles[rt.nroles] = qm_strdup(roles_any[rt.nroles]);
    }
  }
  rt.method = qm_strdup(method);
  rt.pattern = qm_strdup(pattern);
  rt.handler = handler;
  rt.ctx = ctx;
  rt.flags = flags;
  srv->routes = qm_realloc(srv->routes, (srv->nroutes + 1) * sizeof(*srv->routes));
  srv->routes[srv->nroutes++] = rt;
  memset(&rt, 0, sizeof(rt));
  rc = QM_OK;

out:
  qm_http_route_free(&rt);
  return rc;
}

int qm_http_ready_check(qm_http_server_t *srv, const char *name, qm_http_ready_fn fn,
                        void *ctx) {
  if (!srv || !name || !*name || !fn) return QM_EINVAL;
  if (atomic_load(&srv->started)) return QM_ECONFLICT;
  qm_http_check_t *ck = qm_calloc(1, sizeof(*ck));
  ck->name = qm_strdup(name);
  ck->fn = fn;
  ck->ctx = ctx;
  pthread_mutex_init(&ck->lock, NULL);
  srv->checks = qm_realloc(srv->checks, (srv->nchecks + 1) * sizeof(*srv->checks));
  srv->checks[srv->nchecks++] = ck;
  return QM_OK;
}

/* ======================================================================
 * Built-in routes
 * ====================================================================== */

static void qm_http_livez(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_resp_json(resp, 200, json_pack("{s:s}", "status", "alive"));
}

/* Runs a check, or returns its result from the last second. Concurrent
 * probes wait for one run instead of all hitting the dependency. */
static int qm_http_check_run(qm_http_check_t *ck, char *reason, size_t reason_size) {
  pthread_mutex_lock(&ck->lock);
  int64_t now = qm_mono_ms();
  if (!ck->has_result || now - ck->checked_ms >= QM_HTTP_READY_CACHE_MS) {
    ck->reason[0] = '\0';
    ck->rc = ck->fn(ck->ctx, ck->reason, sizeof(ck->reason));
    if (ck->rc != QM_OK && ck->reason[0] == '\0')
      qm_strlcpy(ck->reason, qm_strerror(ck->rc), sizeof(ck->reason));
    ck->checked_ms = qm_mono_ms();
    ck->has_result = true;
  }
  int rc = ck->rc;
  qm_strlcpy(reason, ck->reason, reason_size);
  pthread_mutex_unlock(&ck->lock);
  return rc;
}

static void qm_http_readyz(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_server_t *srv = ctx;
  if (atomic_load(&srv->shutting_down)) {
    qm_problem_t *pb = qm_problem_new(503, "not-ready", "Not ready");
    qm_problem_detail(pb, "the server is shutting down");
    qm_problem_extension(pb, "checks", json_object());
    qm_http_resp_problem(resp, pb);
    return;
  }
  json_t *checks = json_object();
  char failing[512] = "";
  for (size_t i = 0; i < srv->nchecks; i++) {
    qm_http_check_t *ck = srv->checks[i];
    char reason[256];
    int rc = qm_http_check_run(ck, reason, sizeof(reason));
    json_t *one = json_pack("{s:s}", "status", rc == QM_OK ? "ok" : "fail");
    if (rc != QM_OK) {
      json_t *why = json_string(reason);
      json_object_set_new(one, "reason", why ? why : json_string("(not UTF-8)"));
      size_t used = strlen(failing);
      snprintf(failing + used, sizeof(failing) - used, "%s%s", used ? ", " : "", ck->name);
    }
    json_object_set_new(checks, ck->name, one);
  }
  if (failing[0] == '\0') {
    qm_http_resp_json(resp, 200, json_pack("{s:s,s:o}", "status", "ready", "checks", checks));
    return;
  }
  char detail[600];
  snprintf(detail, sizeof(detail), "failing checks: %s", failing);
  qm_problem_t *pb = qm_problem_new(503, "not-ready", "Not ready");
  qm_problem_detail(pb, detail);
  qm_problem_extension(pb, "checks", checks);
  qm_http_resp_problem(resp, pb);
}

static void qm_http_metrics_route(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_http_server_t *srv = ctx;
  char *text = NULL;
  size_t len = 0;
  if (qm_metrics_render(srv->metrics, &text, &len) != QM_OK) {
    qm_http_problem(resp, 500, "internal", "Internal error", "cannot render metrics");
    return;
  }
  qm_http_resp_set(resp, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
}

/* ======================================================================
 * Server life cycle
 * ====================================================================== */

int qm_http_new(const qm_http_conf_t *conf, qm_http_server_t **out, char *errstr,
                size_t errstr_size) {
  if (!conf || !out) return qm_err(errstr, errstr_size, QM_EINVAL, "no configuration");
  const char *addr = conf->bind_addr && *conf->bind_addr ? conf->bind_addr : "0.0.0.0";
  struct in6_addr probe;
  if (inet_pton(AF_INET, addr, &probe) != 1 && inet_pton(AF_INET6, addr, &probe) != 1)
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "bind address %s is not an IPv4 or IPv6 literal", addr);

  qm_http_server_t *srv = qm_calloc(1, sizeof(*srv));
  srv->bind_addr = qm_strdup(addr);
  srv->conf_port = conf->port;
  srv->threads = conf->threads ? conf->threads : 2;
  srv->max_body = conf->max_body_bytes ? conf->max_body_bytes : QM_HTTP_DEFAULT_MAX_BODY;
  srv->conn_timeout_s = conf->conn_timeout_s ? conf->conn_timeout_s : 30;
  srv->auth = conf->auth;
  srv->metrics = conf->metrics;
  if (!srv->metrics) srv->metrics = srv->own_metrics = qm_metrics_new();
  srv->quiesced_fd = MHD_INVALID_SOCKET;
  pthread_mutex_init(&srv->lock, NULL);
  atomic_init(&srv->started, false);
  atomic_init(&srv->shutting_down, false);
  atomic_init(&srv->inflight, 0);

  static const char *const req_labels[] = {"method", "route", "code", NULL};
  static const char *const dur_labels[] = {"method", "route", NULL};
  srv->m_requests = qm_metrics_counter(srv->metrics, "qm_http_requests_total",
                                       "HTTP requests answered, by method, route pattern and "
                                       "status code.",
                                       req_labels);
  srv->m_duration = qm_metrics_histogram(srv->metrics, "qm_http_request_duration_seconds",
                                         "Time from request headers to response completion.",
                                         dur_labels, NULL, 0);

  qm_http_route(srv, "GET", "/livez", qm_http_livez, srv, QM_HTTP_PUBLIC | QM_HTTP_QUIET, NULL);
  qm_http_route(srv, "GET", "/readyz", qm_http_readyz, srv, QM_HTTP_PUBLIC | QM_HTTP_QUIET,
                NULL);
  qm_http_route(srv, "GET", "/metrics", qm_http_metrics_route, srv,
                QM_HTTP_PUBLIC | QM_HTTP_QUIET, NULL);
  *out = srv;
  return QM_OK;
}

/* MHD's own diagnostics (bind failures, protocol errors) into our log. */
__attribute__((format(printf, 2, 0))) static void qm_http_mhd_log(void *cls, const char *fmt,
                                                                   va_list ap) {
  char msg[512];
  vsnprintf(msg, sizeof(msg), fmt, ap);
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
  qm_log_warn("http server: %s", msg);
}

static enum MHD_Result qm_http_access(void *cls, struct MHD_Connection *conn, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_data_size,
                                      void **con_cls);
static void qm_http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe);

int qm_http_start(qm_http_server_t *srv, char *errstr, size_t errstr_size) {
  int rc = QM_EIO;
  if (!srv) return QM_EINVAL;
  pthread_mutex_lock(&srv->lock);
  if (srv->mhd || atomic_load(&srv->started)) {
    rc = qm_err(errstr, errstr_size, QM_ECONFLICT, "server already started");
    goto out;
  }
  if (atomic_load(&srv->shutting_down)) {
    rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "server is shutting down");
    goto out;
  }
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ITC |
                   MHD_USE_ERROR_LOG;
  struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, srv->bind_addr, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons(srv->conf_port);
  } else {
    memset(&ss, 0, sizeof(ss));
    inet_pton(AF_INET6, srv->bind_addr, &sin6->sin6_addr);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(srv->conf_port);
    flags |= MHD_USE_IPv6;
  }
  atomic_store(&srv->started, true); /* routes are frozen from here on */
  /* The logger option must come first, or MHD logs option errors to stderr. */
  srv->mhd = MHD_start_daemon(
      flags, srv->conf_port, NULL, NULL, qm_http_access, srv, MHD_OPTION_EXTERNAL_LOGGER,
      qm_http_mhd_log, srv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
      MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)srv->threads, MHD_OPTION_CONNECTION_TIMEOUT,
      (unsigned int)srv->conn_timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
      MHD_OPTION_NOTIFY_COMPLETED, qm_http_completed, srv, MHD_OPTION_END);
  if (!srv->mhd) {
    atomic_store(&srv->started, false);
    qm_err(errstr, errstr_size, rc,
           "cannot listen on %s port %u (address in use or not available?)", srv->bind_addr,
           (unsigned)srv->conf_port);
    goto out;
  }
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->mhd, MHD_DAEMON_INFO_BIND_PORT);
  srv->port = info ? info->port : srv->conf_port;
  qm_log_info("http server listening on %s port %u with %u threads", srv->bind_addr,
              (unsigned)srv->port, srv->threads);
  rc = QM_OK;

out:
  pthread_mutex_unlock(&srv->lock);
  return rc;
}

uint16_t qm_http_port(const qm_http_server_t *srv) { return srv ? srv->port : 0; }

void qm_http_begin_shutdown(qm_http_server_t *srv) {
  if (!srv) return;
  pthread_mutex_lock(&srv->lock);
  if (!atomic_exchange(&srv->shutting_down, true) && srv->mhd) {
    srv->quiesced_fd = MHD_quiesce_daemon(srv->mhd);
    /* MHD no longer accepts on the socket but it stays open (it may not be
     * closed before MHD_stop_daemon); shutting it down makes the kernel
     * refuse new connections instead of queueing them unanswered. */
    if (srv->quiesced_fd != MHD_INVALID_SOCKET) shutdown(srv->quiesced_fd, SHUT_RDWR);
    qm_log_info("http server shutting down: readiness fails, new connections refused, "
                "%d requests in flight",
                atomic_load(&srv->inflight));
  }
  pthread_mutex_unlock(&srv->lock);
}

int qm_http_stop(qm_http_server_t *srv, int64_t timeout_ms) {
  if (!srv) return QM_EINVAL;
  qm_http_begin_shutdown(srv);
  int rc = QM_OK;
  pthread_mutex_lock(&srv->lock);
  if (srv->mhd) {
    int64_t deadline = qm_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    while (atomic_load(&srv->inflight) > 0 && qm_mono_ms() < deadline) {
      struct timespec ts = {.tv_sec = 0, .tv_nsec = 5 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    int left = atomic_load(&srv->inflight);
    if (left > 0) {
      rc = QM_ETIMEOUT;
      qm_log_warn("http server stopping with %d requests still in flight after %lld ms; "
                  "raise the shutdown timeout if this repeats",
                  left, (long long)timeout_ms);
    }
    MHD_stop_daemon(srv->mhd);
    srv->mhd = NULL;
    if (srv->quiesced_fd != MHD_INVALID_SOCKET) close(srv->quiesced_fd);
    srv->quiesced_fd = MHD_INVALID_SOCKET;
    qm_log_info("http server stopped");
  }
  pthread_mutex_unlock(&srv->lock);
  return rc;
}

void qm_http_destroy(qm_http_server_t *srv) {
  if (!srv) return;
  qm_http_stop(srv, 0);
  for (size_t i = 0; i < srv->nroutes; i++) qm_http_route_free(&srv->routes[i]);
  free(srv->routes);
  for (size_t i = 0; i < srv->nchecks; i++) {
    pthread_mutex_destroy(&srv->checks[i]->lock);
    free(srv->checks[i]->name);
    free(srv->checks[i]);
  }
  free(srv->checks);
  qm_metrics_destroy(srv->own_metrics);
  pthread_mutex_destroy(&srv->lock);
  free(srv->bind_addr);
  free(srv);
}

/* ======================================================================
 * Request processing
 * ====================================================================== */

static bool qm_http_request_id_ok(const char *s) {
  if (!s) return false;
  size_t n = 0;
  for (; s[n]; n++) {
    char c = s[n];
    if (n == 64 || !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                     (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return false;
  }
  return n > 0;
}

static qm_http_req_t *qm_http_req_new(qm_http_server_t *srv, struct MHD_Connection *conn,
                                      const char *url, const char *method) {
  qm_http_req_t *req = qm_calloc(1, sizeof(*req));
  req->srv = srv;
  req->conn = conn;
  req->start_us = qm_mono_us();
  req->resp.req = req;
  req->route_label = QM_HTTP_UNMATCHED;
  qm_strlcpy(req->method, method ? method : "", sizeof(req->method));
  req->path = qm_strdup(url ? url : "/");
  const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
  if (qm_http_request_id_ok(rid)) {
    qm_strlcpy(req->request_id, rid, sizeof(req->request_id));
  } else {
    char uuid[QM_UUID_STR_LEN];
    qm_uuid_new(uuid);
    qm_strlcpy(req->request_id, uuid, sizeof(req->request_id));
  }
  const char *tp = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "traceparent");
  if (tp && qm_traceparent_valid(tp))
    qm_strlcpy(req->traceparent, tp, sizeof(req->traceparent));
  else
    qm_traceparent_child(NULL, req->traceparent, sizeof(req->traceparent));
  qm_traceparent_trace_id(req->traceparent, req->trace_id, sizeof(req->trace_id));
  return req;
}

static void qm_http_req_free(qm_http_req_t *req) {
  for (size_t i = 0; i < req->nparams; i++) free(req->param_values[i]);
  free(req->path);
  free(req->body);
  json_decref(req->json);
  qm_http_resp_clear(&req->resp);
  free(req);
}

/* Picks the route for the request. Returns 0 with req->route set, or sets a
 * 404/405 problem on the response and returns QM_ENOTFOUND. */
static int qm_http_find_route(qm_http_req_t *req) {
  qm_http_server_t *srv = req->srv;
  const char *method = strcmp(req->method, "HEAD") == 0 ? "GET" : req->method;
  const qm_http_route_t *best = NULL;
  const qm_http_route_t *other = NULL;
  char allow[128] = "";
  for (size_t i = 0; i < srv->nroutes; i++) {
    const qm_http_route_t *rt = &srv->routes[i];
    if (!qm_http_route_match(rt, req->path, NULL)) continue;
    if (strcmp(rt->method, method) == 0) {
      if (!best || rt->score > best->score) best = rt;
    } else {
      if (!other) other = rt;
      size_t mlen = strlen(rt->method);
      const char *dup = strstr(allow, rt->method);
      if (dup && (dup == allow || dup[-1] == ' ') && (dup[mlen] == '\0' || dup[mlen] == ','))
        continue;
      size_t used = strlen(allow);
      snprintf(allow + used, sizeof(allow) - used, "%s%s", used ? ", " : "", rt->method);
    }
  }
  if (best) {
    req->route = best;
    req->route_label = best->pattern;
    qm_http_route_match(best, req->path, req);
    return QM_OK;
  }
  char detail[256];
  if (other) {
    req->route_label = other->pattern;
    snprintf(detail, sizeof(detail), "%s is not allowed here; allowed: %s", req->method, allow);
    qm_http_problem(&req->resp, 405, "method-not-allowed", "Method not allowed", detail);
    qm_http_resp_header(&req->resp, "Allow", allow);
  } else {
    snprintf(detail, sizeof(detail), "no resource at this path");
    qm_http_problem(&req->resp, 404, "not-found", "Not found", detail);
  }
  return QM_ENOTFOUND;
}

/* An error_description for WWW-Authenticate: no quotes or backslashes, no
 * control characters (RFC 6750 §3 limits it to printable ASCII). */
static void qm_http_auth_challenge(qm_http_resp_t *resp, const char *reason) {
  char clean[200];
  size_t n = 0;
  for (const char *c = reason; *c && n + 1 < sizeof(clean); c++)
    clean[n++] = (*c == '"' || *c == '\\' || *c < 0x20 || *c > 0x7e) ? '\'' : *c;
  clean[n] = '\0';
  char *value = qm_asprintf("Bearer error=\"invalid_token\", error_description=\"%s\"", clean);
  qm_http_resp_header(resp, "WWW-Authenticate", value);
  free(value);
}

/* Token and roles. 0, or a 401/403 problem on the response and QM_EAUTH /
 * QM_EFORBIDDEN. */
static int qm_http_authorize(qm_http_req_t *req) {
  const qm_http_route_t *rt = req->route;
  if (rt->flags & QM_HTTP_PUBLIC) return QM_OK;
  char reason[256] = "";
  int rc = QM_EAUTH;
  const char *h = MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, "Authorization");
  if (!h) {
    qm_strlcpy(reason, "missing bearer token", sizeof(reason));
  } else if (strncasecmp(h, "Bearer ", 7) != 0) {
    qm_strlcpy(reason, "Authorization is not a Bearer token", sizeof(reason));
  } else if (!req->srv->auth) {
    qm_strlcpy(reason, "this server has no token verifier configured", sizeof(reason));
    qm_log(QM_LOG_ERROR, req->request_id, req->trace_id,
           "request refused: no token verifier configured; set the service's JWT settings");
  } else {
    const char *tok = h + 7;
    while (*tok == ' ') tok++;
    rc = qm_auth_verify(req->srv->auth, tok, &req->principal, reason, sizeof(reason));
    if (rc != QM_OK) rc = QM_EAUTH;
  }
  if (rc != QM_OK) {
    qm_http_problem(&req->resp, 401, "unauthorized", "Authentication required", reason);
    qm_http_auth_challenge(&req->resp, reason);
    return QM_EAUTH;
  }
  req->has_principal = true;
  if (rt->nroles == 0) return QM_OK;
  for (size_t i = 0; i < rt->nroles; i++)
    if (qm_principal_has_role(&req->principal, rt->roles[i])) return QM_OK;

  char detail[600] = "this operation requires one of the roles: ";
  json_t *needed = json_array();
  for (size_t i = 0; i < rt->nroles; i++) {
    size_t used = strlen(detail);
    snprintf(detail + used, sizeof(detail) - used, "%s%s", i ? ", " : "", rt->roles[i]);
    json_array_append_new(needed, json_string(rt->roles[i]));
  }
  qm_problem_t *pb = qm_problem_new(403, "forbidden", "Permission denied");
  qm_problem_detail(pb, detail);
  qm_problem_extension(pb, "required_roles", needed);
  qm_http_resp_problem(&req->resp, pb);
  return QM_EFORBIDDEN;
}

/* application/json or application/<something>+json, parameters allowed. */
static bool qm_http_is_json_type(const char *ct) {
  if (!ct) return false;
  while (*ct == ' ') ct++;
  size_t n = strcspn(ct, "; \t");
  if (n == 16 && strncasecmp(ct, "application/json", 16) == 0) return true;
  return n > 17 && strncasecmp(ct, "application/", 12) == 0 &&
         strncasecmp(ct + n - 5, "+json", 5) == 0;
}

/* Everything decidable from the headers. 0 to go on reading the body, or a
 * problem set on the response to send now. */
static int qm_http_precheck(qm_http_req_t *req) {
  int rc = qm_http_find_route(req);
  if (rc != QM_OK) return rc;
  rc = qm_http_authorize(req);
  if (rc != QM_OK) return rc;

  const char *cl = MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, "Content-Length");
  const char *te = MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, "Transfer-Encoding");
  unsigned long long declared = 0;
  if (cl) {
    char *end = NULL;
    declared = strtoull(cl, &end, 10);
    if (end == cl) declared = 0;
  }
  bool has_body = declared > 0 || te != NULL;
  if (has_body && !(req->route->flags & QM_HTTP_ANY_BODY) &&
      !qm_http_is_json_type(
          MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, "Content-Type"))) {
    qm_http_problem(&req->resp, 415, "unsupported-media-type", "Unsupported media type",
                    "request bodies must be application/json");
    return QM_EINVAL;
  }
  if (declared > req->srv->max_body) {
    char detail[128];
    snprintf(detail, sizeof(detail), "the request body exceeds the limit of %zu bytes",
             req->srv->max_body);
    qm_http_problem(&req->resp, 413, "payload-too-large", "Request body too large", detail);
    return QM_EINVAL;
  }
  if (declared > 0) {
    req->body_cap = (size_t)declared + 1;
    req->body = qm_malloc(req->body_cap);
  }
  return QM_OK;
}

/* Appends a chunk of body, or drops it once over the limit. false when the
 * client keeps sending far beyond the limit: then the connection is closed. */
static bool qm_http_take_body(qm_http_req_t *req, const char *data, size_t n) {
  size_t max = req->srv->max_body;
  if (req->too_large || req->body_len + n > max) {
    req->too_large = true;
    req->discarded += n;
    return req->discarded <= max * QM_HTTP_DISCARD_FACTOR;
  }
  if (req->body_len + n + 1 > req->body_cap) {
    size_t cap = req->body_cap ? req->body_cap : 4096;
    while (cap < req->body_len + n + 1) cap *= 2;
    req->body = qm_realloc(req->body, cap);
    req->body_cap = cap;
  }
  memcpy(req->body + req->body_len, data, n);
  req->body_len += n;
  req->body[req->body_len] = '\0';
  return true;
}

/* A streamed body in flight: what qm_http_resp_stream() was given. */
typedef struct qm_http_stream {
  qm_http_stream_fn fn;
  void *ctx;
  void (*free_fn)(void *ctx);
} qm_http_stream_t;

static ssize_t qm_http_stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
  QM_UNUSED(pos);
  qm_http_stream_t *st = cls;
  long n = st->fn(st->ctx, buf, max);
  if (n < 0) return MHD_CONTENT_READER_END_WITH_ERROR;
  if (n == 0) return MHD_CONTENT_READER_END_OF_STREAM;
  return (ssize_t)n;
}

static void qm_http_stream_done(void *cls) {
  qm_http_stream_t *st = cls;
  if (st->free_fn) st->free_fn(st->ctx);
  free(st);
}

void qm_http_resp_stream(qm_http_resp_t *resp, int status, const char *content_type,
                         qm_http_stream_fn fn, void *ctx, void (*free_fn)(void *ctx)) {
  qm_http_resp_empty(resp, status);
  free(resp->content_type);
  resp->content_type = qm_strdup(content_type);
  if (resp->stream_free) resp->stream_free(resp->stream_ctx);
  resp->stream_fn = fn;
  resp->stream_ctx = ctx;
  resp->stream_free = free_fn;
}

static enum MHD_Result qm_http_send(qm_http_req_t *req) {
  qm_http_resp_t *resp = &req->resp;
  if (resp->status < 100 || resp->status > 599) {
    qm_log(QM_LOG_ERROR, req->request_id, req->trace_id,
           "handler for %s %s set no valid response (status %d); answering 500: fix the "
           "handler",
           req->method, req->route_label, resp->status);
    qm_http_problem(resp, 500, "internal", "Internal error",
                    "the server could not produce a response");
  }
  struct MHD_Response *r;
  if (resp->stream_fn) {
    qm_http_stream_t *st = qm_calloc(1, sizeof(*st));
    st->fn = resp->stream_fn;
    st->ctx = resp->stream_ctx;
    st->free_fn = resp->stream_free;
    resp->stream_fn = NULL; /* the MHD response owns the stream now */
    resp->stream_free = NULL;
    r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 64 * 1024, qm_http_stream_read, st,
                                          qm_http_stream_done);
    if (!r) {
      qm_http_stream_done(st);
      return MHD_NO;
    }
  } else if (resp->body) {
    r = MHD_create_response_from_buffer(resp->len, resp->body, MHD_RESPMEM_MUST_FREE);
    if (r) resp->body = NULL; /* MHD frees it */
  } else {
    r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
  }
  if (!r) return MHD_NO;
  if (resp->content_type) MHD_add_response_header(r, "Content-Type", resp->content_type);
  MHD_add_response_header(r, "X-Request-Id", req->request_id);
  for (size_t i = 0; i < resp->nheaders; i++)
    MHD_add_response_header(r, resp->headers[i].name, resp->headers[i].value);
  if (atomic_load(&req->srv->shutting_down)) MHD_add_response_header(r, "Connection", "close");
  enum MHD_Result ret = MHD_queue_response(req->conn, (unsigned int)resp->status, r);
  MHD_destroy_response(r);
  if (ret == MHD_YES) req->status_sent = resp->status;
  return ret;
}

static enum MHD_Result qm_http_access(void *cls, struct MHD_Connection *conn, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
  qm_http_server_t *srv = cls;
  qm_http_req_t *req = *con_cls;
  if (!req) {
    req = qm_http_req_new(srv, conn, url, method);
    *con_cls = req;
    atomic_fetch_add(&srv->inflight, 1);
    if (qm_http_precheck(req) != QM_OK) return qm_http_send(req);
    return MHD_YES;
  }
  if (*upload_data_size > 0) {
    bool keep = qm_http_take_body(req, upload_data, *upload_data_size);
    *upload_data_size = 0;
    return keep ? MHD_YES : MHD_NO;
  }
  if (req->too_large) {
    char detail[128];
    snprintf(detail, sizeof(detail), "the request body exceeds the limit of %zu bytes",
             srv->max_body);
    qm_http_problem(&req->resp, 413, "payload-too-large", "Request body too large", detail);
    return qm_http_send(req);
  }
  req->route->handler(req, &req->resp, req->route->ctx);
  return qm_http_send(req);
}

static const char *qm_http_method_label(const char *m) {
  static const char *const known[] = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                      "OPTIONS"};
  for (size_t i = 0; i < QM_ARRAY_LEN(known); i++)
    if (strcmp(m, known[i]) == 0) return known[i];
  return "OTHER";
}

static void qm_http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                              enum MHD_RequestTerminationCode toe) {
  qm_http_server_t *srv = cls;
  qm_http_req_t *req = *con_cls;
  if (!req) return;
  *con_cls = NULL;
  double secs = (double)(qm_mono_us() - req->start_us) / 1e6;
  const char *mlabel = qm_http_method_label(req->method);
  bool quiet = req->route && (req->route->flags & QM_HTTP_QUIET);
  if (req->status_sent) {
    char code[8];
    snprintf(code, sizeof(code), "%d", req->status_sent);
    const char *rv[] = {mlabel, req->route_label, code};
    qm_metrics_inc(qm_metrics_child(srv->m_requests, rv));
    const char *dv[] = {mlabel, req->route_label};
    qm_metrics_observe(qm_metrics_child(srv->m_duration, dv), secs);
    qm_log(quiet ? QM_LOG_DEBUG : QM_LOG_INFO, req->request_id, req->trace_id,
           "http %s %s route=%s status=%d duration_ms=%.3f%s", req->method, req->path,
           req->route_label, req->status_sent, secs * 1000.0,
           toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (connection ended early)");
  } else {
    qm_log(QM_LOG_DEBUG, req->request_id, req->trace_id,
           "http %s %s route=%s: connection closed before a response (code %d)", req->method,
           req->path, req->route_label, (int)toe);
  }
  qm_http_req_free(req);
  atomic_fetch_sub(&srv->inflight, 1);
}
