/* qm_api: shared HTTP handler helpers (see qm_api.h). */
#include "qm_api.h"

#include "qm_common.h"
#include "qm_log.h"

#include <stdio.h>
#include <stdlib.h>

void qm_api_field_error(qm_problem_t **pb, const char *field, const char *reason) {
  if (!*pb) *pb = qm_problem_new(400, "validation", "Invalid request");
  qm_problem_field(*pb, field, reason);
}

bool qm_api_page(qm_http_req_t *req, long default_limit, long max_limit, qm_page_t *page,
                 qm_problem_t **pb) {
  bool ok = true;
  page->limit = default_limit;
  page->after = 0;
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after_s = qm_http_req_query(req, "after");
  char *end = NULL;
  if (limit_s) {
    long v = strtol(limit_s, &end, 10);
    if (!*limit_s || *end || v < 1 || v > max_limit) {
      char why[64];
      snprintf(why, sizeof(why), "must be an integer from 1 to %ld", max_limit);
      qm_api_field_error(pb, "limit", why);
      ok = false;
    } else {
      page->limit = v;
    }
  }
  if (after_s) {
    long long v = strtoll(after_s, &end, 10);
    if (!*after_s || *end || v < 0) {
      qm_api_field_error(pb, "after", "must be the 'next' cursor of a previous page");
      ok = false;
    } else {
      page->after = v;
    }
  }
  return ok;
}

qm_pg_t *qm_api_db(qm_http_req_t *req, qm_http_resp_t *resp, qm_pg_pool_t *pool) {
  qm_pg_t *pg = NULL;
  int rc = qm_pg_pool_acquire(pool, 5000, &pg);
  if (rc != QM_OK) {
    qm_log(QM_LOG_WARN, qm_http_req_id(req), qm_http_req_trace_id(req),
           "no database connection for %s (%s)", qm_http_req_path(req), qm_strerror(rc));
    qm_http_resp_header(resp, "Retry-After", "1");
    qm_http_problem(resp, 503, "unavailable", "Service busy",
                    "no database connection was free; retry shortly");
    return NULL;
  }
  return pg;
}

void qm_api_db_error(qm_http_req_t *req, qm_http_resp_t *resp, const char *what,
                     const char *errstr) {
  qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "%s failed: %s", what,
         errstr);
  qm_http_resp_header(resp, "Retry-After", "1");
  qm_http_problem(resp, 503, "unavailable", "Database error",
                  "the database did not answer as expected; retry shortly");
}

bool qm_api_query(qm_http_req_t *req, qm_http_resp_t *resp, qm_pg_pool_t *pool, const char *what,
                  const char *sql, const qm_pg_param_t *params, int nparams,
                  qm_pg_result_t **res) {
  if (res) *res = NULL;
  qm_pg_t *pg = qm_api_db(req, resp, pool);
  if (!pg) return false;
  char errstr[512];
  int rc = qm_pg_exec(pg, sql, params, nparams, res, errstr, sizeof(errstr));
  qm_pg_pool_release(pool, pg);
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, what, errstr);
    return false;
  }
  return true;
}

json_t *qm_api_list(json_t *items, const char *next) {
  json_t *body = json_object();
  json_object_set_new(body, "items", items);
  if (next && *next) json_object_set_new(body, "next", json_string(next));
  return body;
}

bool qm_api_has_any_role(const qm_principal_t *who, const char *const *roles) {
  if (!who) return false;
  for (size_t i = 0; roles[i]; i++)
    if (qm_principal_has_role(who, roles[i])) return true;
  return false;
}
