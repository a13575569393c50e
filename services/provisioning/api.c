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

/* Reads the paging parameters `limit` (1–500, default 50) and `after` (the
 * `next` cursor of a previous page, default 0 = from the newest), adding a
 * field to *pb (created on the first bad one) for each that is invalid. */
static void page_params(qm_http_req_t *req, long *limit, int64_t *after_id, qm_problem_t **pb) {
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after = qm_http_req_query(req, "after");
  *limit = 50;
  *after_id = 0;
  if (limit_s) {
    char *end = NULL;
    *limit = strtol(limit_s, &end, 10);
    if (!*limit_s || *end || *limit < 1 || *limit > 500) {
      if (!*pb) *pb = qm_problem_new(400, "validation", "Invalid query");
      qm_problem_field(*pb, "limit", "must be an integer from 1 to 500");
    }
  }
  if (after) {
    char *end = NULL;
    *after_id = strtoll(after, &end, 10);
    if (!*after || *end || *after_id < 0) {
      if (!*pb) *pb = qm_problem_new(400, "validation", "Invalid query");
      qm_problem_field(*pb, "after", "must be the 'next' cursor of a previous page");
    }
  }
}

/* GET /v1/grants?person_id=&item_id=&state=&limit=&after= — newest first;
 * `after` is the `next` cursor of the previous page. */
static void list_grants(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *person = qm_http_req_query(req, "person_id");
  const char *item = qm_http_req_query(req, "item_id");
  const char *state = qm_http_req_query(req, "state");
  qm_problem_t *pb = NULL;
  long limit;
  int64_t after_id;
  page_params(req, &limit, &after_id, &pb);
  if (state && strcmp(state, "pending") && strcmp(state, "active") && strcmp(state, "failed") &&
      strcmp(state, "revoked")) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "state", "must be pending, active, failed or revoked");
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
      " g.seq,"
      " coalesce(to_char(g.revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), '') AS revoked_at,"
      " coalesce(g.revoke_reason, '') AS revoke_reason,"
      " coalesce(g.revoke_comment, '') AS revoke_comment FROM grants g"
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
    if (*qm_pg_get(res, i, 15)) json_object_set_new(g, "revoked_at", json_string(qm_pg_get(res, i, 15)));
    if (*qm_pg_get(res, i, 16))
      json_object_set_new(g, "revoke_reason", json_string(qm_pg_get(res, i, 16)));
    if (*qm_pg_get(res, i, 17))
      json_object_set_new(g, "revoke_comment", json_string(qm_pg_get(res, i, 17)));
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
                      " WHERE id = $1::bigint AND state = 'failed' AND (op = 'revoke' OR"
                      "  (SELECT revoke_reason IS NULL FROM grants g WHERE g.grant_id = grant_ops.grant_id))"
                      " RETURNING grant_id, op)"
                      " , g AS (UPDATE grants SET state = 'pending', updated_at = now()"
                      " WHERE grant_id IN (SELECT grant_id FROM o WHERE op = 'grant'))"
                      " SELECT grant_id FROM o",
                      p, 1, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(prov->svc), pg);
  if (rc != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(resp, 409, "conflict", "Not a failed operation",
                    "only an operation parked as failed can be retried (and a grant only while "
                    "it is not being revoked)");
    return;
  }
  json_t *body = json_pack("{s:I, s:s, s:s}", "operation_id", (json_int_t)op_id, "grant_id",
                           qm_pg_get(res, 0, 0), "state", "pending");
  qm_pg_result_destroy(res);
  qm_log(QM_LOG_INFO, qm_http_req_id(req), qm_http_req_trace_id(req),
         "operation %lld re-queued by %s", op_id, qm_http_req_principal(req)->sub);
  qm_http_resp_json(resp, 202, body);
}

typedef struct revoke_ctx {
  prov_t *prov;
  const char *grant_id;
  const char *reason;
  const char *comment;
  Qm__V1__Actor *actor;
  int queued;
  char state[16];
} revoke_ctx_t;

static int revoke_tx(qm_service_t *svc, qm_pg_t *tx, void *arg, char *errstr,
                     size_t errstr_size) {
  QM_UNUSED(svc);
  revoke_ctx_t *rc_ = arg;
  int rc = prov_revoke_queue(rc_->prov, tx, NULL, rc_->grant_id, NULL, NULL, rc_->reason,
                             rc_->comment, rc_->actor, &rc_->queued, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_TEXT(rc_->grant_id)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx, "SELECT state FROM grants WHERE grant_id = $1", p, 1, &res, errstr,
                  errstr_size);
  if (rc != QM_OK) return rc;
  rc_->state[0] = '\0';
  if (qm_pg_ntuples(res) == 1) qm_strlcpy(rc_->state, qm_pg_get(res, 0, 0), sizeof(rc_->state));
  qm_pg_result_destroy(res);
  return QM_OK;
}

#define REVOKE_REASON_MAX 500

/* Characters (code points) of a UTF-8 string: jansson has checked it. */
static size_t utf8_chars(const char *s) {
  size_t n = 0;
  for (; *s; s++)
    if (((unsigned char)*s & 0xC0) != 0x80) n++;
  return n;
}

/* POST /v1/grants/{id}/revoke {"reason": "..."} — an administrator takes a
 * grant away. The revocation is queued like any other (AccessRevoked with
 * reason "admin", the administrator as actor and the body's reason as its
 * comment once the directory agrees; the grant keeps it as revoke_comment);
 * 202 with the grant id, 404 for an unknown grant, 409 when it is revoked
 * or being revoked already. it_admin only. */
static void revoke_grant(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *id = qm_http_req_param(req, "id");
  if (!qm_uuid_valid(id)) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid grant id");
    qm_problem_field(pb, "id", "must be a grant id (UUID)");
    qm_http_resp_problem(resp, pb);
    return;
  }
  size_t blen = 0;
  qm_http_req_body(req, &blen);
  json_t *body = blen ? qm_http_req_json(req) : NULL;
  if (blen && !body) return; /* the 400 naming the syntax error is set */
  if (blen && !json_is_object(body)) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid body");
    qm_problem_field(pb, "body", "must be a JSON object (or empty)");
    qm_http_resp_problem(resp, pb);
    return;
  }
  /* "reason" (documented); "comment" is its older alias. */
  json_t *reason = body ? json_object_get(body, "reason") : NULL;
  json_t *alias = body ? json_object_get(body, "comment") : NULL;
  const char *field = reason ? "reason" : "comment";
  json_t *why = reason ? reason : alias;
  const char *bad = NULL;
  if (reason && alias) bad = "give either reason or comment (its alias), not both";
  else if (why && !json_is_string(why)) bad = "must be a string";
  else if (why && utf8_chars(json_string_value(why)) > REVOKE_REASON_MAX)
    bad = "must be at most 500 characters";
  if (bad) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid body");
    qm_problem_field(pb, reason && alias ? "comment" : field, bad);
    qm_http_resp_problem(resp, pb);
    return;
  }
  const char *comment = why ? json_string_value(why) : NULL;
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  actor.person_id = (char *)who->sub;
  char *roles[] = {(char *)"it_admin"};
  actor.n_roles = 1;
  actor.roles = roles;
  revoke_ctx_t rc_ = {prov, id, "admin", comment, &actor, 0, ""};
  char errstr[512];
  int rc = qm_service_tx(prov->svc, 5000, revoke_tx, &rc_, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "revoke %s: %s", id,
           errstr);
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  if (!rc_.state[0]) {
    qm_http_problem(resp, 404, "not-found", "No such grant", "no grant has this id");
    return;
  }
  if (rc_.queued == 0) {
    qm_http_problem(resp, 409, "conflict", "Not revocable",
                    "the grant is revoked already or its revocation is on its way");
    return;
  }
  qm_log(QM_LOG_INFO, qm_http_req_id(req), qm_http_req_trace_id(req),
         "grant %s: revocation requested by %s%s%s", id, who->sub, comment ? ": " : "",
         comment ? comment : "");
  qm_http_resp_json(resp, 202, json_pack("{s:s, s:s, s:s}", "grant_id", id, "state", rc_.state,
                                         "revocation", "queued"));
}

/* GET /v1/operations?state=failed&limit=&after= — directory operations,
 * newest first (default: the failed ones, parked for an operator). Staff. */
static void list_operations(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  const char *state = qm_http_req_query(req, "state");
  if (!state) state = "failed";
  qm_problem_t *pb = NULL;
  if (strcmp(state, "failed") && strcmp(state, "pending") && strcmp(state, "done")) {
    pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "state", "must be failed, pending or done");
  }
  long limit;
  int64_t after_id;
  page_params(req, &limit, &after_id, &pb);
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  if (!is_staff(qm_http_req_principal(req))) {
    qm_http_problem(resp, 403, "forbidden", "Forbidden", "staff roles only");
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(prov->svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(state), QM_PG_INT64(after_id), QM_PG_INT64(limit + 1)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(
      pg,
      "SELECT o.id, o.op, o.grant_id, o.person_id, o.grp, g.connector, o.attempts,"
      " coalesce(o.last_error, ''), coalesce(o.reason, ''), g.request_id, g.item_id, g.role_id,"
      " to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
      " FROM grant_ops o JOIN grants g USING (grant_id)"
      " WHERE o.state = $1 AND ($2::bigint = 0 OR o.id < $2) ORDER BY o.id DESC LIMIT $3::int",
      p, 3, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(prov->svc), pg);
  if (rc != QM_OK) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "list operations: %s",
           errstr);
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  json_t *items = json_array();
  int n = qm_pg_ntuples(res);
  int shown = n > limit ? (int)limit : n;
  for (int i = 0; i < shown; i++) {
    int64_t id = 0, attempts = 0;
    qm_pg_get_int64(res, i, 0, &id);
    qm_pg_get_int64(res, i, 6, &attempts);
    json_t *o = json_pack("{s:I, s:s, s:s, s:s, s:s, s:s, s:I, s:s, s:s, s:s, s:s, s:s}",
                          "operation_id", (json_int_t)id, "op", qm_pg_get(res, i, 1), "grant_id",
                          qm_pg_get(res, i, 2), "person_id", qm_pg_get(res, i, 3), "group",
                          qm_pg_get(res, i, 4), "connector", qm_pg_get(res, i, 5), "attempts",
                          (json_int_t)attempts, "request_id", qm_pg_get(res, i, 9), "item_id",
                          qm_pg_get(res, i, 10), "role_id", qm_pg_get(res, i, 11), "state", state,
                          "created_at", qm_pg_get(res, i, 12));
    if (*qm_pg_get(res, i, 7)) json_object_set_new(o, "last_error", json_string(qm_pg_get(res, i, 7)));
    if (*qm_pg_get(res, i, 8)) json_object_set_new(o, "reason", json_string(qm_pg_get(res, i, 8)));
    json_array_append_new(items, o);
  }
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > limit) json_object_set_new(body, "next", json_string(qm_pg_get(res, shown - 1, 0)));
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

/* POST /v1/drift/run — reconcile every managed group now instead of at the
 * next QM_DRIFT_INTERVAL. Answers the number of findings. it_admin only.
 * A reconciliation reads whole groups from the directories and can take a
 * while: it runs on a connection of its own (as the periodic run does), not
 * one of the pool the API and the consumer share. */
static void run_drift(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  char errstr[512];
  qm_pg_t *pg = qm_pg_connect_app(qm_service_dsn(prov->svc), "provisioning",
                                  "qm-provisioning-drift-api", errstr, sizeof(errstr));
  if (!pg) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "drift run: %s", errstr);
    qm_http_problem(resp, 503, "unavailable", "Database unavailable", "try again shortly");
    return;
  }
  /* The same session lock as the periodic run: one reconciliation at a time. */
  qm_pg_param_t p[] = {QM_PG_INT64(qm_pg_advisory_key("qm-provisioning-drift"))};
  qm_pg_result_t *res = NULL;
  int n = qm_pg_exec(pg, "SELECT pg_try_advisory_lock($1::bigint)", p, 1, &res, errstr,
                     sizeof(errstr));
  bool mine = n == QM_OK && !strcmp(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  if (n == QM_OK && !mine) {
    qm_pg_destroy(pg);
    qm_http_problem(resp, 409, "conflict", "Drift run in progress",
                    "another reconciliation is running; try again when it has finished");
    return;
  }
  if (mine) n = prov_drift_run(prov, pg, errstr, sizeof(errstr));
  qm_pg_destroy(pg); /* ends the session, and with it the advisory lock */
  if (n < 0) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "drift run: %s", errstr);
    qm_http_problem(resp, 503, "unavailable", "Drift run failed", "try again shortly");
    return;
  }
  qm_http_resp_json(resp, 200, json_pack("{s:i}", "findings", n));
}

/* GET /v1/leavers/{person_id} — each leaver event of the person: when it
 * arrived, when revocation started, how many grants, when the last one was
 * revoked and how long that took. Staff. */
static void get_leaver(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  prov_t *prov = ctx;
  if (!is_staff(qm_http_req_principal(req))) {
    qm_http_problem(resp, 403, "forbidden", "Forbidden", "staff roles only");
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(prov->svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_param(req, "person_id"))};
  qm_pg_result_t *res = NULL;
  char errstr[512];
#define TS(c) "coalesce(to_char(" c " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), '')"
  int rc = qm_pg_exec(pg,
                      "SELECT source, source_event_id, effective_date::text, " TS("received_at")
                      ", " TS("started_at") ", coalesce(grants, -1), " TS("completed_at")
                      ", coalesce(extract(epoch FROM completed_at - received_at)::text, '')"
                      " FROM leavers WHERE person_id = $1 ORDER BY received_at DESC LIMIT 50",
                      p, 1, &res, errstr, sizeof(errstr));
#undef TS
  qm_pg_pool_release(qm_service_pool(prov->svc), pg);
  if (rc != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  json_t *items = json_array();
  for (int i = 0; i < qm_pg_ntuples(res); i++) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "source", qm_pg_get(res, i, 0),
                          "source_event_id", qm_pg_get(res, i, 1), "effective_date",
                          qm_pg_get(res, i, 2), "received_at", qm_pg_get(res, i, 3));
    if (*qm_pg_get(res, i, 4)) json_object_set_new(o, "started_at", json_string(qm_pg_get(res, i, 4)));
    int64_t g = -1;
    qm_pg_get_int64(res, i, 5, &g);
    if (g >= 0) json_object_set_new(o, "grants", json_integer(g));
    if (*qm_pg_get(res, i, 6)) json_object_set_new(o, "completed_at", json_string(qm_pg_get(res, i, 6)));
    if (*qm_pg_get(res, i, 7))
      json_object_set_new(o, "seconds", json_real(strtod(qm_pg_get(res, i, 7), NULL)));
    json_array_append_new(items, o);
  }
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, json_pack("{s:o}", "items", items));
}

int prov_api_register(prov_t *prov, char *errstr, size_t errstr_size) {
  static const char *const admin[] = {"it_admin", NULL};
  qm_http_server_t *http = qm_service_http(prov->svc);
  if (qm_http_route(http, "GET", "/v1/grants", list_grants, prov, 0, NULL) != QM_OK ||
      qm_http_route(http, "POST", "/v1/grants/{id}/revoke", revoke_grant, prov,
                    QM_HTTP_ANY_BODY, admin) != QM_OK ||
      qm_http_route(http, "GET", "/v1/operations", list_operations, prov, 0, NULL) != QM_OK ||
      qm_http_route(http, "POST", "/v1/operations/{id}/retry", retry_operation, prov,
                    QM_HTTP_ANY_BODY, admin) != QM_OK ||
      qm_http_route(http, "POST", "/v1/drift/run", run_drift, prov, QM_HTTP_ANY_BODY, admin) !=
          QM_OK ||
      qm_http_route(http, "GET", "/v1/leavers/{person_id}", get_leaver, prov, 0, NULL) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register provisioning routes");
  return QM_OK;
}
