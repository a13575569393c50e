/*
 * qm_http: the HTTP server every service embeds (libmicrohttpd underneath,
 * never visible here). It gives a service:
 *  - routes with path parameters ("/v1/requests/{id}/cancel"), each public or
 *    requiring a bearer JWT (verified with qm_auth) and optionally one of a
 *    set of roles;
 *  - uniform errors as RFC 9457 application/problem+json: 404 unknown path,
 *    405 wrong method (with Allow), 401 missing or bad token (with
 *    WWW-Authenticate), 403 missing role, 413 body too large, 415 body not
 *    JSON, 400 malformed JSON (naming line and column), and handler-made
 *    problems with an `errors` list naming each bad field;
 *  - built-in public routes GET /livez, GET /readyz (registered readiness
 *    checks, cached ~1 s each, 503 as soon as shutdown begins) and GET /metrics
 *    (Prometheus text);
 *  - per request: a request id (X-Request-Id when valid, else a new UUID,
 *    echoed in the response), a W3C traceparent, the metrics
 *    qm_http_requests_total{method,route,code} and
 *    qm_http_request_duration_seconds{method,route} (route is the pattern,
 *    never the concrete path), and one access log line;
 *  - graceful shutdown: qm_http_begin_shutdown(), then qm_http_stop().
 *
 * Life cycle: qm_http_new() → qm_http_route() / qm_http_ready_check() →
 * qm_http_start() → … → qm_http_begin_shutdown() → qm_http_stop() →
 * qm_http_destroy(). Routes and checks are registered before start only.
 *
 * Threads: handlers and readiness checks run on the server's pool threads,
 * several at once. Everything a handler's ctx points to must be thread-safe
 * (or guarded by the handler); the qm_http_req_t / qm_http_resp_t handed to a
 * handler belong to that one call and must not be kept after it returns.
 */
#ifndef QM_HTTP_H
#define QM_HTTP_H

#include "qm_auth.h"
#include "qm_metrics.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct qm_http_server qm_http_server_t;
typedef struct qm_http_req qm_http_req_t;
typedef struct qm_http_resp qm_http_resp_t;
typedef struct qm_problem qm_problem_t;

#define QM_HTTP_DEFAULT_MAX_BODY (1024 * 1024)
#define QM_HTTP_PROBLEM_BASE "https://quartermaster.dev/problems/"

typedef struct {
  const char *bind_addr;     /* IPv4 or IPv6 literal; NULL = "0.0.0.0" */
  uint16_t port;             /* 0 = an ephemeral port (see qm_http_port()) */
  unsigned threads;          /* pool threads; 0 = 2 */
  size_t max_body_bytes;     /* 0 = QM_HTTP_DEFAULT_MAX_BODY; larger bodies get 413 */
  unsigned conn_timeout_s;   /* idle connection timeout; 0 = 30 */
  qm_auth_t *auth;           /* borrowed, must outlive the server; NULL = every
                                non-public route answers 401 (fail closed) */
  qm_metrics_t *metrics;     /* borrowed, must outlive the server; NULL = the
                                server keeps a registry of its own */
} qm_http_conf_t;

/* Route flags. */
enum {
  QM_HTTP_PUBLIC = 1 << 0,   /* no token needed (qm_http_req_principal() is NULL) */
  QM_HTTP_ANY_BODY = 1 << 1, /* accept any request Content-Type (default: JSON only) */
  QM_HTTP_QUIET = 1 << 2     /* access log at debug, not info (probes, scrapes) */
};

typedef void (*qm_http_handler_fn)(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx);

/* A readiness check: QM_OK when the dependency is usable, else a negative
 * QM_E* code with the reason in errstr. Runs on a pool thread; its result is
 * cached for about a second, so it runs at most about once a second. */
typedef int (*qm_http_ready_fn)(void *ctx, char *errstr, size_t errstr_size);

/* ---- server ---- */

/* Creates a server (not yet listening) with the built-in routes /livez,
 * /readyz and /metrics. conf's strings are copied; auth and metrics are
 * borrowed. Caller frees with qm_http_destroy(). Returns 0 and sets *out, or
 * QM_EINVAL with the reason. */
int qm_http_new(const qm_http_conf_t *conf, qm_http_server_t **out, char *errstr,
                size_t errstr_size);

/* Adds a route: method ("GET", "POST", …) and a pattern of literal segments
 * and {name} parameters (each matches one non-empty path segment; a literal
 * segment wins over a parameter at the same place). roles_any is a
 * NULL-terminated list of which the caller needs at least one; NULL means any
 * authenticated caller (ignored with QM_HTTP_PUBLIC). Strings are copied; ctx
 * is borrowed and must be thread-safe (see above). Returns 0, QM_EINVAL (bad
 * method/pattern, more than 16 roles), QM_EDUP (same method and pattern twice)
 * or QM_ECONFLICT (the server has started). */
int qm_http_route(qm_http_server_t *srv, const char *method, const char *pattern,
                  qm_http_handler_fn handler, void *ctx, int flags,
                  const char *const *roles_any);

/* Adds a readiness check named name (copied; shown in /readyz). ctx is
 * borrowed. Returns 0, QM_EINVAL, or QM_ECONFLICT once started. */
int qm_http_ready_check(qm_http_server_t *srv, const char *name, qm_http_ready_fn fn, void *ctx);

/* Binds and starts serving. Returns 0, or QM_EIO when the address cannot be
 * bound (reason in errstr), QM_ECONFLICT when already started, QM_ESHUTDOWN
 * after qm_http_begin_shutdown() or qm_http_stop(). */
int qm_http_start(qm_http_server_t *srv, char *errstr, size_t errstr_size);

/* The port the server listens on (the real one when conf.port was 0), 0
 * before start. */
uint16_t qm_http_port(const qm_http_server_t *srv);

/* Begins a graceful shutdown: /readyz answers 503 from now on, the listening
 * socket stops accepting (new connections are refused), and responses on
 * kept-alive connections carry "Connection: close". Requests already
 * received complete normally. Pair it with a preStop delay in Kubernetes so
 * endpoints are updated before this runs. Idempotent. */
void qm_http_begin_shutdown(qm_http_server_t *srv);

/* Waits up to timeout_ms for in-flight requests to finish, then stops the
 * server (closing remaining connections; a handler still running is waited
 * for by the pool threads' join). Calls qm_http_begin_shutdown() first if that
 * was not done. Returns 0, or QM_ETIMEOUT when requests were still in flight
 * at the bound. Idempotent. */
int qm_http_stop(qm_http_server_t *srv, int64_t timeout_ms);

/* Stops the server if running (without waiting) and frees it. NULL is a no-op. */
void qm_http_destroy(qm_http_server_t *srv);

/* ---- request (valid until the handler returns) ---- */

const char *qm_http_req_method(const qm_http_req_t *req);
/* The request path without the query string, percent-decoded by the server. */
const char *qm_http_req_path(const qm_http_req_t *req);
/* The matched route pattern ("/v1/requests/{id}"), as used in metric labels. */
const char *qm_http_req_route(const qm_http_req_t *req);
/* A path parameter by name; NULL when the pattern has none of that name. */
const char *qm_http_req_param(const qm_http_req_t *req, const char *name);
/* A query parameter (decoded); NULL when absent, "" when given without value. */
const char *qm_http_req_query(const qm_http_req_t *req, const char *name);
/* A request header by name, case-insensitive; NULL when absent. */
const char *qm_http_req_header(const qm_http_req_t *req, const char *name);
/* The raw body (not NUL-terminated; NULL and 0 when there is none). */
const char *qm_http_req_body(const qm_http_req_t *req, size_t *len);
/* The body parsed as JSON (duplicate keys rejected), parsed once and cached;
 * owned by the request (json_incref() to keep it). On an empty or malformed
 * body returns NULL and sets a 400 problem on the response naming the line
 * and column: the handler should simply return. */
json_t *qm_http_req_json(qm_http_req_t *req);
/* The verified caller, NULL on public routes. */
const qm_principal_t *qm_http_req_principal(const qm_http_req_t *req);
/* The request id (X-Request-Id when it was 1–64 of [A-Za-z0-9._-], else a
 * new UUID). Echoed in the response's X-Request-Id. */
const char *qm_http_req_id(const qm_http_req_t *req);
/* The caller's traceparent when valid, else a new one: pass it as the parent
 * of the events this request causes. */
const char *qm_http_req_traceparent(const qm_http_req_t *req);
/* The 32-hex trace id of qm_http_req_traceparent(), for log lines. */
const char *qm_http_req_trace_id(const qm_http_req_t *req);

/* ---- response (a later call replaces an earlier one) ---- */

/* A JSON response. Takes ownership of body (NULL: no body). */
void qm_http_resp_json(qm_http_resp_t *resp, int status, json_t *body);
/* A response with any content type; body (len bytes) is copied. */
void qm_http_resp_body(qm_http_resp_t *resp, int status, const char *content_type,
                       const char *body, size_t len);
/* A response without body (202, 204, …). */
void qm_http_resp_empty(qm_http_resp_t *resp, int status);
/* Adds a response header (copied; Location, ETag, Retry-After, …). */
void qm_http_resp_header(qm_http_resp_t *resp, const char *name, const char *value);
/* A streamed response of unknown length (chunked transfer encoding), for
 * exports too large to hold in memory. After the handler returns, the server
 * calls fn(ctx, buf, cap) from its own thread until it returns 0 (end); fn
 * fills buf with up to cap bytes and returns how many, or -1 to abort the
 * transfer (the client sees a truncated chunked body, never a "complete"
 * one). free_fn(ctx) runs once when the response is done or abandoned (client
 * gone, shutdown), whatever happened; it may be NULL. The status and headers
 * go out before the first byte, so fn cannot change them: check everything
 * that can fail before choosing to stream. */
typedef long (*qm_http_stream_fn)(void *ctx, char *buf, size_t cap);
void qm_http_resp_stream(qm_http_resp_t *resp, int status, const char *content_type,
                         qm_http_stream_fn fn, void *ctx, void (*free_fn)(void *ctx));
/* The status set so far, 0 when none (e.g. to see if qm_http_req_json() failed). */
int qm_http_resp_status(const qm_http_resp_t *resp);

/* ---- problems (RFC 9457) ---- */

/* A new problem: type QM_HTTP_PROBLEM_BASE + type_suffix ("validation"),
 * title, status; detail may be NULL. Strings are copied. Caller frees with
 * qm_problem_destroy() unless handed to qm_http_resp_problem(). */
qm_problem_t *qm_problem_new(int status, const char *type_suffix, const char *title);
/* Sets the detail (a sentence for a person; copied). */
void qm_problem_detail(qm_problem_t *pb, const char *detail);
/* Adds {"field": field, "reason": reason} to the `errors` extension member. */
void qm_problem_field(qm_problem_t *pb, const char *field, const char *reason);
/* As qm_problem_field(), with the name of the rule that was broken (a stable,
 * machine-readable token such as "already_held"; NULL or "" omits it). */
void qm_problem_field_rule(qm_problem_t *pb, const char *field, const char *rule,
                           const char *reason);
/* The problem's HTTP status. */
int qm_problem_status(const qm_problem_t *pb);
/* Adds another extension member. Takes ownership of value. */
void qm_problem_extension(qm_problem_t *pb, const char *name, json_t *value);
void qm_problem_destroy(qm_problem_t *pb);

/* Answers with the problem (instance = the request path). Takes ownership of pb. */
void qm_http_resp_problem(qm_http_resp_t *resp, qm_problem_t *pb);
/* Shorthand for a problem without field errors; detail may be NULL. */
void qm_http_problem(qm_http_resp_t *resp, int status, const char *type_suffix,
                     const char *title, const char *detail);

#endif /* QM_HTTP_H */
