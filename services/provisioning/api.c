/*
 * api: qm-provisioning's HTTP API — who holds what (grants by person or by
 * item, paged) and the operator's retry of a parked operation.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const staff_roles[] = {"it_admin", "helpdesk", "auditor", "security", NULL};

static bool is_staff(const qm_principal_t *who) {
  for (size_t i = 0; staff_roles[i]; i++)
    if (qm_principal_has_role(who, staff_roles[i])) return true;
  return false;
}

/* GET /v1/grants?person_id=&item_id=&state=&limit=&after= — newest first;
 * `after` is the `next` cursor of the previous page. */
static void list_grants(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *person = qm_http_req_query(req, "person_id");
  const char *item = qm_http_req_query(req, "item_id");
  const char *state = qm_http_req_query(req, "state");
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after = qm_http_req_query(req, "after");
  qm_problem_t *pb = NULL;
  long limit = 50;
  if (limit_s) {
    char *end = NULL;
    limit = strtol(limit_s, &end, 10);
    if (!*limit_s || *end || limit < 1 || limit > 500) {
      pb = qm_problem_new(400, "validation", "Invalid query");
      qm_problem_field(pb, "limit", "must be an integer from 1 to 500");
    }
  }
  if (state && strcmp(state, "pending") && strcmp(state, "active") && strcmp(state, "failed") &&
      strcmp(state, "revoked")) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "state", "must be pending, active, failed or revoked");
  }
  int64_t after_id = 0;
  if (after) {
    char *end = NULL;
    after_id = strtoll(after, &end, 10);
    if (!*after || *end || after_id < 0) {
      if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
      qm_problem_field(pb, "after", "must be the 'next' cursor of a previous page");
    }
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  if (!is_staff(who) && (!person || strcmp(person, who->sub))) {
    qm_http_problem(resp, 403, "forbidden", "Forbidden",
                    "you may list only your own grants (person_id=<you>); staff roles see all");
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(prov->svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  qm_pg_param_t p[] = {person ? QM_PG_TEXT(person) : QM_PG_NULL,
                       item ? QM_PG_TEXT(item) : QM_PG_NULL, state ? QM_PG_TEXT(state) : QM_PG_NULL,
                       QM_PG_INT64(after_id), QM_PG_INT64(limit + 1)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(
      pg,
      "SELECT g.grant_id, g.request_id, g.line_no, g.person_id, g.item_id, g.role_id, g.grp,"
      " g.connector, g.state, g.duration_days,"
      " coalesce(to_char(g.granted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), '') AS granted_at,"
      " coalesce(to_char(g.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), '') AS expires_at,"
      " (SELECT o.id FROM grant_ops o WHERE o.grant_id = g.grant_id ORDER BY o.id DESC LIMIT 1) AS op_id,"
      " (SELECT o.last_error FROM grant_ops o WHERE o.grant_id = g.grant_id ORDER BY o.id DESC LIMIT 1) AS last_error,"
      " g.seq FROM grants g"
      " WHERE ($1::text IS NULL OR g.person_id = $1) AND ($2::text IS NULL OR g.item_id = $2)"
      " AND ($3::text IS NULL OR g.state = $3) AND ($4::bigint = 0 OR g.seq < $4)"
      " ORDER BY g.seq DESC LIMIT $5::int",
      p, 5, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(prov->svc), pg);
  if (rc != QM_OK) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "list grants: %s", errstr);
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  json_t *items = json_array();
  int n = qm_pg_ntuples(res);
  int shown = n > limit ? (int)limit : n;
  for (int i = 0; i < shown; i++) {
    int64_t line_no = 0, dur = 0;
    qm_pg_get_int64(res, i, 2, &line_no);
    qm_pg_get_int64(res, i, 9, &dur);
    json_t *g = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s, s:s, s:s, s:s, s:I}", "grant_id",
                          qm_pg_get(res, i, 0), "request_id", qm_pg_get(res, i, 1), "line_no",
                          (json_int_t)line_no, "person_id", qm_pg_get(res, i, 3), "item_id",
                          qm_pg_get(res, i, 4), "role_id", qm_pg_get(res, i, 5), "group",
                          qm_pg_get(res, i, 6), "connector", qm_pg_get(res, i, 7), "state",
                          qm_pg_get(res, i, 8), "duration_days", (json_int_t)dur);
    if (*qm_pg_get(res, i, 10)) json_object_set_new(g, "granted_at", json_string(qm_pg_get(res, i, 10)));
    if (*qm_pg_get(res, i, 11)) json_object_set_new(g, "expires_at", json_string(qm_pg_get(res, i, 11)));
    if (!qm_pg_is_null(res, i, 13)) {
      json_object_set_new(g, "operation_id", json_string(qm_pg_get(res, i, 12)));
      json_object_set_new(g, "last_error", json_string(qm_pg_get(res, i, 13)));
    }
    json_array_append_new(items, g);
  }
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > limit) json_object_set_new(body, "next", json_string(qm_pg_get(res, shown - 1, 14)));
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

/* POST /v1/operations/{id}/retry — puts a parked (failed) operation back in
 * the queue with fresh attempts. it_admin only. */
static void retry_operation(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  const char *id = qm_http_req_param(req, "id");
  char *end = NULL;
  long long op_id = strtoll(id, &end, 10);
  if (!*id || *end || op_id <= 0) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid operation id");
    qm_problem_field(pb, "id", "must be a positive integer (operation_id of ProvisioningFailed)");
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(prov->svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  char errstr[512];
  qm_pg_param_t p[] = {QM_PG_INT64(op_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "WITH o AS (UPDATE grant_ops SET state = 'pending', attempts = 0,"
                      " next_attempt_at = now(), lease_until = NULL, finished_at = NULL"
                      " WHERE id = $1::bigint AND state = 'failed' RETURNING grant_id)"
                      " UPDATE grants SET state = 'pending', updated_at = now()"
                      " WHERE grant_id IN (SELECT grant_id FROM o) RETURNING grant_id",
                      p, 1, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(prov->svc), pg);
  if (rc != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(resp, 409, "conflict", "Not a failed operation",
                    "only an operation parked as failed can be retried");
    return;
  }
  json_t *body = json_pack("{s:I, s:s, s:s}", "operation_id", (json_int_t)op_id, "grant_id",
                           qm_pg_get(res, 0, 0), "state", "pending");
  qm_pg_result_destroy(res);
  qm_log(QM_LOG_INFO, qm_http_req_id(req), qm_http_req_trace_id(req),
         "operation %lld re-queued by %s", op_id, qm_http_req_principal(req)->sub);
  qm_http_resp_json(resp, 202, body);
}

int prov_api_register(prov_t *prov, char *errstr, size_t errstr_size) {
  static const char *const admin[] = {"it_admin", NULL};
  qm_http_server_t *http = qm_service_http(prov->svc);
  if (qm_http_route(http, "GET", "/v1/grants", list_grants, prov, 0, NULL) != QM_OK ||
      qm_http_route(http, "POST", "/v1/operations/{id}/retry", retry_operation, prov,
                    QM_HTTP_ANY_BODY, admin) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register provisioning routes");
  return QM_OK;
}
