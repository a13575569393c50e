/*
 * api: qm-approval's HTTP API (docs/api/approval.yaml).
 *
 *   GET    /v1/approvals/inbox                 the caller's pending steps, with
 *                                              those they stand in for, and context
 *   POST   /v1/approvals/steps/{id}/approve    {"comment"}        (optional)
 *   POST   /v1/approvals/steps/{id}/deny       {"comment"}        (required)
 *   GET    /v1/approvals/away                  the caller's away period
 *   PUT    /v1/approvals/away                  {"delegate_id", "from"?, "until"?, "note"?}
 *   DELETE /v1/approvals/away
 *   POST   /v1/approvals/requests/{id}/lines/{line_no}/break-glass
 *                                              {"justification"}  (it_admin)
 *   GET    /v1/approvals/requests/{id}         plan and steps of a request
 */
#include "approval.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JUSTIFICATION_MIN 10

static const char *const staff_roles[] = {"it_admin", "security", "auditor", "helpdesk", NULL};

/* The item JSON of a step, built by PostgreSQL. $1 = caller, $2 = now. */
#define STEP_JSON                                                                              \
  "json_build_object('step_id', s.step_id, 'request_id', s.request_id, 'line_no', s.line_no,"  \
  " 'stage', s.stage, 'kind', s.kind, 'status', s.status, 'approver_ids', s.approver_ids,"     \
  " 'delegated', NOT ($1 = ANY(s.approver_ids)) OR cardinality(s.delegated_from) > 0,"         \
  " 'delegated_from', s.delegated_from,"                                                       \
  " 'standing_in_for', (SELECT coalesce(json_agg(a.person_id), '[]') FROM away a"              \
  "  WHERE a.delegate_id = $1 AND a.person_id = ANY(s.approver_ids) AND a.from_ms <= $2"       \
  "  AND (a.until_ms IS NULL OR a.until_ms > $2)),"                                            \
  " 'deadline_ms', s.deadline_ms, 'opened_at_ms', s.opened_at_ms, 'reminders', s.reminders,"   \
  " 'escalated', s.escalated,"                                                                 \
  " 'requester', json_build_object('id', l.requester_id, 'name', rq.name),"                    \
  " 'subject', json_build_object('id', l.subject_person_id, 'name', sb.name,"                  \
  "  'department', sb.department, 'title', sb.job_function),"                                  \
  " 'item_id', l.item_id, 'role_id', l.role_id, 'risk', l.risk,"                               \
  " 'cost', l.cost_minor / 100.0, 'regulated', l.regulated, 'reason', l.reason,"               \
  " 'duration_days', l.duration_days, 'max_duration_days', l.max_duration_days,"               \
  " 'flags', l.flags, 'sod_warnings', l.sod_warnings,"                                         \
  " 'holds', (SELECT coalesce(json_agg(json_build_object('item_id', h.item_id,"                \
  "  'role_id', h.role_id) ORDER BY h.item_id, h.role_id), '[]') FROM holdings h"              \
  "  WHERE h.subject_person_id = l.subject_person_id))::text"
#define STEP_FROM                                                                              \
  " FROM approval_steps s JOIN approval_lines l USING (request_id, line_no)"                   \
  " LEFT JOIN people sb ON sb.id = l.subject_person_id"                                        \
  " LEFT JOIN people rq ON rq.id = l.requester_id"

/* GET /v1/approvals/inbox?limit=&after= */
static void get_inbox(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  qm_page_t page;
  qm_problem_t *pb = NULL;
  if (!qm_api_page(req, 50, 200, &page, &pb)) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(ap->svc));
  if (!pg) return;
  qm_pg_param_t p[] = {QM_PG_TEXT(who->sub), QM_PG_INT64(qm_now_ms()), QM_PG_INT64(page.after),
                       QM_PG_INT64(page.limit + 1)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "SELECT " STEP_JSON ", s.seq" STEP_FROM
                      " WHERE s.status = 'pending' AND s.seq > $3 AND (s.approver_ids @> ARRAY[$1::text]"
                      " OR EXISTS (SELECT 1 FROM away a WHERE a.delegate_id = $1"
                      " AND a.person_id = ANY(s.approver_ids) AND a.from_ms <= $2"
                      " AND (a.until_ms IS NULL OR a.until_ms > $2)))"
                      " ORDER BY s.seq LIMIT $4",
                      p, 4, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(ap->svc), pg);
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "inbox", errstr);
    return;
  }
  json_t *items = json_array();
  int n = qm_pg_ntuples(res);
  char next[32] = "";
  for (int i = 0; i < n && i < page.limit; i++) {
    json_t *it = json_loads(qm_pg_get(res, i, 0), 0, NULL);
    if (it) json_array_append_new(items, it);
    if (i == page.limit - 1 && n > page.limit) snprintf(next, sizeof(next), "%s", qm_pg_get(res, i, 1));
  }
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, qm_api_list(items, next));
}

/* The answer for a route_* failure. */
static void decision_error(qm_http_req_t *req, qm_http_resp_t *resp, int rc, const char *errstr) {
  switch (rc) {
  case QM_ENOTFOUND: qm_http_problem(resp, 404, "not-found", "Not found", errstr); break;
  case QM_ECONFLICT: qm_http_problem(resp, 409, "conflict", "Already decided", errstr); break;
  case QM_EFORBIDDEN:
    if (!strncmp(errstr, "self-approval", 13))
      qm_http_problem(resp, 403, "self-approval", "Self-approval refused", errstr);
    else
      qm_http_problem(resp, 403, "forbidden", "Not an approver", errstr);
    break;
  default: qm_api_db_error(req, resp, "decision", errstr); break;
  }
}

static int decide_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                     size_t errstr_size) {
  QM_UNUSED(svc);
  void **v = ctx;
  return route_decide(v[0], tx, v[1], errstr, errstr_size);
}

/* POST /v1/approvals/steps/{step_id}/approve | /deny */
static void post_decide(qm_http_req_t *req, qm_http_resp_t *resp, approval_t *ap, bool approve) {
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *step_id = qm_http_req_param(req, "step_id");
  size_t blen = 0;
  const char *comment = "";
  json_t *body = NULL;
  qm_http_req_body(req, &blen);
  if (blen > 0) {
    body = qm_http_req_json(req);
    if (!body) return;
  }
  qm_problem_t *pb = NULL;
  if (body) {
    json_t *c = json_object_get(body, "comment");
    if (c && !json_is_string(c)) qm_api_field_error(&pb, "comment", "must be a string");
    else if (c) comment = json_string_value(c);
  }
  if (!approve && !*comment)
    qm_api_field_error(&pb, "comment", "a denial needs a comment the requester can act on");
  if (strlen(comment) > 2000) qm_api_field_error(&pb, "comment", "at most 2000 characters");
  if (!qm_uuid_valid(step_id)) qm_api_field_error(&pb, "step_id", "must be a UUID");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  const char *roles[QM_AUTH_MAX_ROLES];
  for (size_t i = 0; i < who->nroles && i < QM_AUTH_MAX_ROLES; i++) roles[i] = who->roles[i];
  decide_in_t in = {.step_id = step_id,
                    .who = who->sub,
                    .roles = roles,
                    .n_roles = who->nroles,
                    .approve = approve,
                    .comment = comment,
                    .traceparent = qm_http_req_traceparent(req)};
  void *v[] = {ap, &in};
  char errstr[512] = "";
  int rc = qm_service_tx(ap->svc, 10000, decide_tx, v, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    decision_error(req, resp, rc, errstr);
    return;
  }
  qm_http_resp_json(resp, 200,
                    json_pack("{s:s, s:s, s:s}", "step_id", step_id, "decision",
                              approve ? "approved" : "denied", "decided_by", who->sub));
}

static void post_approve(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  post_decide(req, resp, ctx, true);
}
static void post_deny(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  post_decide(req, resp, ctx, false);
}

static json_t *away_json(qm_pg_result_t *res) {
  char from[40], until[40];
  int64_t f = 0, u = 0;
  (void)qm_pg_get_int64(res, 0, 2, &f);
  qm_time_format_rfc3339(f, from, sizeof(from));
  json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "person_id", qm_pg_get(res, 0, 0),
                        "delegate_id", qm_pg_get(res, 0, 1), "from", from, "note",
                        qm_pg_get(res, 0, 4));
  if (!qm_pg_is_null(res, 0, 3) && qm_pg_get_int64(res, 0, 3, &u) == QM_OK) {
    qm_time_format_rfc3339(u, until, sizeof(until));
    json_object_set_new(o, "until", json_string(until));
  } else {
    json_object_set_new(o, "until", json_null());
  }
  return o;
}

/* GET /v1/approvals/away */
static void get_away(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  qm_pg_param_t p[] = {QM_PG_TEXT(who->sub)};
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(req, resp, qm_service_pool(ap->svc), "away",
                    "SELECT person_id, coalesce(delegate_id, ''), from_ms, until_ms, note"
                    " FROM away WHERE person_id = $1",
                    p, 1, &res))
    return;
  if (qm_pg_ntuples(res) == 0)
    qm_http_problem(resp, 404, "not-found", "Not away", "no away period is set");
  else
    qm_http_resp_json(resp, 200, away_json(res));
  qm_pg_result_destroy(res);
}

/* PUT /v1/approvals/away {"delegate_id", "from"?, "until"?, "note"?} */
static void put_away(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  json_t *body = qm_http_req_json(req);
  if (!body) return;
  qm_problem_t *pb = NULL;
  const char *delegate = json_string_value(json_object_get(body, "delegate_id"));
  const char *from_s = json_string_value(json_object_get(body, "from"));
  const char *until_s = json_string_value(json_object_get(body, "until"));
  const char *note = json_string_value(json_object_get(body, "note"));
  int64_t from = qm_now_ms(), until = 0;
  if (json_object_get(body, "delegate_id") && !json_is_string(json_object_get(body, "delegate_id")))
    qm_api_field_error(&pb, "delegate_id", "must be a person id");
  else if (delegate && (!*delegate || strlen(delegate) >= APPROVAL_ID_MAX))
    qm_api_field_error(&pb, "delegate_id", "must be a person id");
  else if (delegate && !strcmp(delegate, who->sub))
    qm_api_field_error(&pb, "delegate_id", "must be someone else than you");
  if (from_s && qm_time_parse_rfc3339(from_s, &from) != QM_OK)
    qm_api_field_error(&pb, "from", "must be an RFC 3339 time");
  if (until_s && qm_time_parse_rfc3339(until_s, &until) != QM_OK)
    qm_api_field_error(&pb, "until", "must be an RFC 3339 time");
  else if (until_s && until <= from)
    qm_api_field_error(&pb, "until", "must be after from");
  if (note && strlen(note) > 500) qm_api_field_error(&pb, "note", "at most 500 characters");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(ap->svc));
  if (!pg) return;
  qm_pg_param_t p[] = {QM_PG_TEXT(who->sub), delegate ? QM_PG_TEXT(delegate) : QM_PG_NULL,
                       QM_PG_INT64(from), until_s ? QM_PG_INT64(until) : QM_PG_NULL,
                       QM_PG_TEXT(note ? note : "")};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "INSERT INTO away (person_id, delegate_id, from_ms, until_ms, note)"
                      " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (person_id) DO UPDATE SET"
                      " delegate_id = EXCLUDED.delegate_id, from_ms = EXCLUDED.from_ms,"
                      " until_ms = EXCLUDED.until_ms, note = EXCLUDED.note, set_at = now()"
                      " RETURNING person_id, coalesce(delegate_id, ''), from_ms, until_ms, note",
                      p, 5, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(ap->svc), pg);
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "away", errstr);
    return;
  }
  qm_log(QM_LOG_INFO, qm_http_req_id(req), qm_http_req_trace_id(req),
         "%s is away; delegate %s", who->sub, delegate ? delegate : "(none)");
  qm_http_resp_json(resp, 200, away_json(res));
  qm_pg_result_destroy(res);
}

/* DELETE /v1/approvals/away */
static void delete_away(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  qm_pg_param_t p[] = {QM_PG_TEXT(who->sub)};
  if (!qm_api_query(req, resp, qm_service_pool(ap->svc), "away",
                    "DELETE FROM away WHERE person_id = $1", p, 1, NULL))
    return;
  qm_http_resp_empty(resp, 204);
}

static int break_glass_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                          size_t errstr_size) {
  QM_UNUSED(svc);
  void **v = ctx;
  return route_break_glass(v[0], tx, v[1], errstr, errstr_size);
}

/* POST /v1/approvals/requests/{request_id}/lines/{line_no}/break-glass */
static void post_break_glass(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  json_t *body = qm_http_req_json(req);
  if (!body) return;
  qm_problem_t *pb = NULL;
  const char *rid = qm_http_req_param(req, "request_id");
  const char *ls = qm_http_req_param(req, "line_no");
  char *end = NULL;
  long line_no = strtol(ls, &end, 10);
  if (!qm_uuid_valid(rid)) qm_api_field_error(&pb, "request_id", "must be a UUID");
  if (!*ls || *end || line_no < 1 || line_no > 1000)
    qm_api_field_error(&pb, "line_no", "must be a line number");
  json_t *j = json_object_get(body, "justification");
  const char *just = json_string_value(j);
  if (!just || strlen(just) < JUSTIFICATION_MIN)
    qm_api_field_error(&pb, "justification",
                       "a written justification (at least 10 characters) is required");
  else if (strlen(just) > 2000)
    qm_api_field_error(&pb, "justification", "at most 2000 characters");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  const char *roles[QM_AUTH_MAX_ROLES];
  for (size_t i = 0; i < who->nroles && i < QM_AUTH_MAX_ROLES; i++) roles[i] = who->roles[i];
  break_glass_in_t in = {.request_id = rid,
                         .line_no = (int)line_no,
                         .who = who->sub,
                         .roles = roles,
                         .n_roles = who->nroles,
                         .justification = just,
                         .traceparent = qm_http_req_traceparent(req)};
  void *v[] = {ap, &in};
  char errstr[512] = "";
  int rc = qm_service_tx(ap->svc, 10000, break_glass_tx, v, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    decision_error(req, resp, rc, errstr);
    return;
  }
  qm_http_resp_json(resp, 200,
                    json_pack("{s:s, s:i, s:s, s:b, s:s}", "request_id", rid, "line_no",
                              (int)line_no, "decision", "approved", "break_glass", 1,
                              "decided_by", who->sub));
}

/* GET /v1/approvals/requests/{request_id}: every step of the request, for the
 * people involved and staff. */
static void get_request(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  approval_t *ap = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *rid = qm_http_req_param(req, "request_id");
  if (!qm_uuid_valid(rid)) {
    qm_problem_t *pb = NULL;
    qm_api_field_error(&pb, "request_id", "must be a UUID");
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(ap->svc));
  if (!pg) return;
  qm_pg_param_t p[] = {QM_PG_TEXT(who->sub), QM_PG_INT64(qm_now_ms()), QM_PG_TEXT(rid)};
  qm_pg_result_t *res = NULL, *lines = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "SELECT " STEP_JSON ", l.requester_id = $1 OR l.subject_person_id = $1"
                      " OR $1 = ANY(s.approver_ids)" STEP_FROM " WHERE s.request_id = $3"
                      " ORDER BY s.line_no, s.stage",
                      p, 3, &res, errstr, sizeof(errstr));
  if (rc == QM_OK) {
    qm_pg_param_t pl[] = {QM_PG_TEXT(rid)};
    rc = qm_pg_exec(pg,
                    "SELECT json_build_object('line_no', line_no, 'item_id', item_id, 'role_id',"
                    " role_id, 'risk', risk, 'status', status, 'reject_reason', reject_reason,"
                    " 'break_glass', break_glass, 'break_glass_by', break_glass_by,"
                    " 'break_glass_justification', break_glass_justification,"
                    " 'sod_warnings', sod_warnings, 'requester_id', requester_id,"
                    " 'subject_person_id', subject_person_id)::text, requester_id,"
                    " subject_person_id FROM approval_lines WHERE request_id = $1"
                    " ORDER BY line_no",
                    pl, 1, &lines, errstr, sizeof(errstr));
  }
  qm_pg_pool_release(qm_service_pool(ap->svc), pg);
  if (rc != QM_OK) {
    qm_pg_result_destroy(res);
    qm_api_db_error(req, resp, "request", errstr);
    return;
  }
  bool involved = qm_api_has_any_role(who, staff_roles);
  for (int i = 0; i < qm_pg_ntuples(res); i++)
    if (!strcmp(qm_pg_get(res, i, 1), "t")) involved = true;
  for (int i = 0; i < qm_pg_ntuples(lines); i++)
    if (!strcmp(qm_pg_get(lines, i, 1), who->sub) || !strcmp(qm_pg_get(lines, i, 2), who->sub))
      involved = true;
  if (qm_pg_ntuples(lines) == 0) {
    qm_http_problem(resp, 404, "not-found", "Not found", "approval has no such request");
  } else if (!involved) {
    qm_http_problem(resp, 403, "forbidden", "Forbidden",
                    "only the people involved and staff may see a request's approvals");
  } else {
    json_t *lv = json_array(), *sv = json_array();
    for (int i = 0; i < qm_pg_ntuples(lines); i++) {
      json_t *o = json_loads(qm_pg_get(lines, i, 0), 0, NULL);
      if (o) json_array_append_new(lv, o);
    }
    for (int i = 0; i < qm_pg_ntuples(res); i++) {
      json_t *o = json_loads(qm_pg_get(res, i, 0), 0, NULL);
      if (o) json_array_append_new(sv, o);
    }
    qm_http_resp_json(resp, 200,
                      json_pack("{s:s, s:o, s:o}", "request_id", rid, "lines", lv, "steps", sv));
  }
  qm_pg_result_destroy(lines);
  qm_pg_result_destroy(res);
}

int api_register(approval_t *ap, char *errstr, size_t errstr_size) {
  qm_http_server_t *srv = qm_service_http(ap->svc);
  static const char *const admins[] = {"it_admin", NULL};
  int rc = 0;
  rc |= qm_http_route(srv, "GET", "/v1/approvals/inbox", get_inbox, ap, 0, NULL);
  rc |= qm_http_route(srv, "POST", "/v1/approvals/steps/{step_id}/approve", post_approve, ap, 0,
                      NULL);
  rc |= qm_http_route(srv, "POST", "/v1/approvals/steps/{step_id}/deny", post_deny, ap, 0, NULL);
  rc |= qm_http_route(srv, "GET", "/v1/approvals/away", get_away, ap, 0, NULL);
  rc |= qm_http_route(srv, "PUT", "/v1/approvals/away", put_away, ap, 0, NULL);
  rc |= qm_http_route(srv, "DELETE", "/v1/approvals/away", delete_away, ap, 0, NULL);
  rc |= qm_http_route(srv, "POST", "/v1/approvals/requests/{request_id}/lines/{line_no}/break-glass",
                      post_break_glass, ap, 0, admins);
  rc |= qm_http_route(srv, "GET", "/v1/approvals/requests/{request_id}", get_request, ap, 0, NULL);
  if (rc != 0) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register the HTTP routes");
  return QM_OK;
}
