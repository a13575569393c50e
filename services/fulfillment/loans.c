/*
 * loans: the loaner pool (projectors, test phones, spare laptops: assets of
 * models marked loaner). A booking is future-dated [start, end); it is
 * refused when longer than QM_LOAN_MAX_PERIOD, and placed on a loaner of the
 * model with no overlapping booking. The candidates are locked (FOR UPDATE)
 * and then, in a second statement (a fresh snapshot), checked for overlaps;
 * the exclusion constraint loans_no_overlap (migration 6, btree_gist) makes
 * an overlap impossible whatever the code does.
 * A "loan_overdue" timer at the end sends the reminder when it is not back.
 */
#include "fulfillment.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_log.h"
#include "qm_timer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct loan_call {
  ff_t *ff;
  qm_http_req_t *req;
  qm_http_resp_t *resp;
  json_t *body;
  const char *person, *actor, *model, *tag, *loan_id;
  int64_t start, end;
} loan_call_t;

static int emit_loan(ff_t *ff, qm_pg_t *tx, const char *loan_id, Qm__V1__FulfillmentStep step,
                     const char *note, const char *actor, const char *traceparent, char *errstr,
                     size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(loan_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT l.person_id, a.tag, a.serial, a.model_id, a.site_id, m.item_type"
                      " FROM loans l JOIN assets a USING (asset_id) JOIN models m USING (model_id)"
                      " WHERE l.loan_id = $1",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  Qm__V1__FulfillmentUpdate u = QM__V1__FULFILLMENT_UPDATE__INIT;
  u.request_id = (char *)loan_id;
  u.subject_person_id = (char *)qm_pg_get(res, 0, 0);
  u.step = step;
  u.asset_tag = (char *)qm_pg_get(res, 0, 1);
  u.serial = (char *)qm_pg_get(res, 0, 2);
  u.model_id = (char *)qm_pg_get(res, 0, 3);
  u.site_id = (char *)qm_pg_get(res, 0, 4);
  u.item_type = (char *)qm_pg_get(res, 0, 5);
  u.note = (char *)note;
  u.actor_person_id = (char *)(actor ? actor : "");
  rc = ff_emit_update(ff, tx, &u, traceparent, errstr, errstr_size);
  qm_pg_result_destroy(res);
  return rc;
}

static json_t *loan_json(qm_pg_t *tx, const char *loan_id) {
  qm_pg_param_t p[] = {QM_PG_TEXT(loan_id)};
  qm_pg_result_t *res = NULL;
  char errstr[256];
  json_t *j = NULL;
  if (qm_pg_exec(tx,
                 "SELECT json_build_object('id', l.loan_id, 'asset_tag', a.tag, 'model_id',"
                 " a.model_id, 'person_id', l.person_id, 'starts_ms', l.starts_ms, 'ends_ms',"
                 " l.ends_ms, 'state', l.state, 'reminded', l.reminded_at IS NOT NULL)::text"
                 " FROM loans l JOIN assets a USING (asset_id) WHERE l.loan_id = $1",
                 p, 1, &res, errstr, sizeof(errstr)) == QM_OK &&
      qm_pg_ntuples(res) == 1)
    j = json_loads(qm_pg_get(res, 0, 0), 0, NULL);
  qm_pg_result_destroy(res);
  return j;
}

/* Inserts the booking of asset (text id) in a savepoint; *taken says the
 * exclusion constraint loans_no_overlap refused it (another booking of that
 * asset overlapping the period committed first), the savepoint then undone. */
static int insert_loan(qm_pg_t *tx, const loan_call_t *c, const char *loan_id, const char *asset,
                       bool *taken, char *errstr, size_t errstr_size) {
  *taken = false;
  int rc = qm_pg_savepoint(tx, "ff_book", errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t q[] = {QM_PG_TEXT(loan_id), QM_PG_TEXT(asset), QM_PG_TEXT(c->person),
                       QM_PG_INT64(c->start), QM_PG_INT64(c->end), QM_PG_TEXT(c->actor)};
  rc = qm_pg_exec(tx,
                  "INSERT INTO loans (loan_id, asset_id, person_id, starts_ms, ends_ms, booked_by)"
                  " VALUES ($1, $2::bigint, $3, $4::bigint, $5::bigint, $6)",
                  q, 6, NULL, errstr, errstr_size);
  if (rc != QM_OK && !strcmp(qm_pg_last_sqlstate(tx), "23P01")) { /* exclusion_violation */
    *taken = true;
    return qm_pg_rollback_to(tx, "ff_book", errstr, errstr_size);
  }
  if (rc != QM_OK) return rc;
  return qm_pg_release(tx, "ff_book", errstr, errstr_size);
}

static int do_book(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  loan_call_t *c = ctx;
  /* First lock every loaner of the model (or the one asked for); then, in a
   * second statement, look for overlapping bookings. At READ COMMITTED each
   * statement takes a new snapshot, so a booking committed by the
   * transaction we waited on for the lock is seen here (checked in the
   * locking statement itself, it would not be). The exclusion constraint
   * loans_no_overlap backs this up: an insert it refuses moves on to the
   * next free candidate. */
  qm_pg_param_t p[] = {QM_PG_TEXT(c->model), QM_PG_TEXT(c->tag), QM_PG_INT64(c->start),
                       QM_PG_INT64(c->end)};
  static const char candidates[] =
      " FROM assets a JOIN models m USING (model_id) WHERE m.loaner AND a.status <> 'retired'"
      " AND ($1::text IS NULL OR a.model_id = $1) AND ($2::text IS NULL OR a.tag = $2)"
      " AND $3::bigint IS NOT NULL AND $4::bigint IS NOT NULL";
  qm_pg_result_t *res = NULL;
  char sql[1400];
  snprintf(sql, sizeof(sql), "SELECT a.asset_id%s ORDER BY a.asset_id FOR UPDATE OF a", candidates);
  int rc = qm_pg_exec(tx, sql, p, 4, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  snprintf(sql, sizeof(sql),
           "SELECT a.asset_id, a.tag, (SELECT json_agg(json_build_object('id', l.loan_id,"
           "  'starts_ms', l.starts_ms, 'ends_ms', l.ends_ms) ORDER BY l.starts_ms) FROM loans l"
           "  WHERE l.asset_id = a.asset_id AND l.state IN ('booked', 'out')"
           "  AND l.starts_ms < $4::bigint AND l.ends_ms > $3::bigint)::text%s ORDER BY a.asset_id",
           candidates);
  rc = qm_pg_exec(tx, sql, p, 4, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  int n = qm_pg_ntuples(res), booked_row = -1;
  if (n == 0) {
    qm_pg_result_destroy(res);
    qm_problem_t *pb = qm_problem_new(404, "not-found", "No such loaner");
    qm_problem_field(pb, c->tag ? "tag" : "model_id", "no loaner asset of this model or tag");
    qm_http_resp_problem(c->resp, pb);
    return QM_ENOTFOUND;
  }
  char loan_id[QM_UUID_STR_LEN], owner[64];
  qm_uuid_new(loan_id);
  for (int i = 0; i < n && booked_row < 0 && rc == QM_OK; i++) {
    if (!qm_pg_is_null(res, i, 2)) continue;
    bool taken = false;
    rc = insert_loan(tx, c, loan_id, qm_pg_get(res, i, 0), &taken, errstr, errstr_size);
    if (rc == QM_OK && !taken) booked_row = i;
  }
  if (rc != QM_OK) {
    qm_pg_result_destroy(res);
    return rc;
  }
  if (booked_row < 0) {
    qm_problem_t *pb = qm_problem_new(409, "booking-conflict", "Every matching loaner is booked then");
    qm_problem_field_rule(pb, "starts_at", "overlap",
                          "overlaps existing bookings; pick another period or model");
    for (int i = 0; i < n; i++) /* the first candidate's bookings then, when it has any */
      if (!qm_pg_is_null(res, i, 2)) {
        qm_problem_extension(pb, "conflicts", json_loads(qm_pg_get(res, i, 2), 0, NULL));
        break;
      }
    qm_http_resp_problem(c->resp, pb);
    qm_pg_result_destroy(res);
    return QM_ECONFLICT;
  }
  qm_pg_result_destroy(res);
  snprintf(owner, sizeof(owner), "loan:%s", loan_id);
  rc = qm_timer_add(tx, "timers", "loan_overdue", owner, NULL, 0, c->end, NULL, errstr,
                    errstr_size);
  char note[120], ts[40], te[40];
  qm_time_format_rfc3339(c->start, ts, sizeof(ts));
  qm_time_format_rfc3339(c->end, te, sizeof(te));
  snprintf(note, sizeof(note), "loaner booked from %s to %s", ts, te);
  if (rc == QM_OK)
    rc = emit_loan(c->ff, tx, loan_id, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_LOAN_BOOKED, note,
                   c->actor, qm_http_req_traceparent(c->req), errstr, errstr_size);
  if (rc == QM_OK) qm_http_resp_json(c->resp, 201, loan_json(tx, loan_id));
  return rc;
}

/* POST /v1/loans {model_id | tag, person_id, starts_at, ends_at} */
static void book(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  const qm_principal_t *who = qm_http_req_principal(req);
  qm_problem_t *pb = NULL;
  loan_call_t c = {.ff = ff, .req = req, .resp = resp, .body = b, .actor = who->sub};
  c.model = ff_json_str(b, "model_id", false, &pb);
  c.tag = ff_json_str(b, "tag", false, &pb);
  c.person = ff_json_str(b, "person_id", false, &pb);
  const char *s = ff_json_str(b, "starts_at", true, &pb), *e = ff_json_str(b, "ends_at", true, &pb);
  if (!c.model && !c.tag) qm_api_field_error(&pb, "model_id", "give model_id or tag");
  if (s && qm_time_parse_rfc3339(s, &c.start) != QM_OK)
    qm_api_field_error(&pb, "starts_at", "must be an RFC 3339 time");
  if (e && qm_time_parse_rfc3339(e, &c.end) != QM_OK)
    qm_api_field_error(&pb, "ends_at", "must be an RFC 3339 time");
  if (s && e && c.end <= c.start) qm_api_field_error(&pb, "ends_at", "must be after starts_at");
  if (s && c.start < qm_now_ms() - 300000)
    qm_api_field_error(&pb, "starts_at", "must not be in the past");
  if (s && e && c.end - c.start > ff->loan_max_ms) {
    char why[120];
    snprintf(why, sizeof(why), "a loan lasts at most %lld hours (QM_LOAN_MAX_PERIOD)",
             (long long)(ff->loan_max_ms / 3600000));
    qm_problem_field_rule(pb ? pb : (pb = qm_problem_new(400, "validation", "Invalid booking")),
                          "ends_at", "max_loan_period", why);
  }
  static const char *const staff[] = {"it_admin", "helpdesk", NULL};
  if (!c.person) c.person = who->sub;
  if (strcmp(c.person, who->sub) && !qm_api_has_any_role(who, staff)) {
    if (pb) qm_problem_destroy(pb);
    qm_http_problem(resp, 403, "forbidden", "Only IT staff book for someone else", NULL);
    return;
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  ff_api_tx(ff, req, resp, do_book, &c);
}

static int do_loan_move(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                        size_t errstr_size) {
  QM_UNUSED(svc);
  loan_call_t *c = ctx;
  bool out = !strcmp(c->model, "checkout"); /* model carries the action here */
  qm_pg_param_t p[] = {QM_PG_TEXT(c->loan_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT l.state, a.tag, a.asset_id, l.person_id FROM loans l"
                      " JOIN assets a USING (asset_id) WHERE l.loan_id = $1 FOR UPDATE OF l, a",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 404, "not-found", "No such loan", NULL);
    return QM_ENOTFOUND;
  }
  if (strcmp(qm_pg_get(res, 0, 0), out ? "booked" : "out")) {
    qm_http_problem(c->resp, 409, "wrong-state", "Not possible now", qm_pg_get(res, 0, 0));
    qm_pg_result_destroy(res);
    return QM_ECONFLICT;
  }
  if (strcmp(c->tag, qm_pg_get(res, 0, 1))) {
    qm_problem_t *pb = qm_problem_new(409, "asset-mismatch", "Scanned asset is not the booked loaner");
    qm_problem_field_rule(pb, "tag", "asset_mismatch", "the booking is for another asset");
    qm_problem_extension(pb, "expected_tag", json_string(qm_pg_get(res, 0, 1)));
    qm_http_resp_problem(c->resp, pb);
    qm_pg_result_destroy(res);
    return QM_ECONFLICT;
  }
  int64_t asset = 0;
  qm_pg_get_int64(res, 0, 2, &asset);
  rc = ff_asset_set(tx, asset, out ? "assigned" : "in_stock", qm_pg_get(res, 0, 3), NULL, 0,
                    c->actor, out ? "loaner handed out" : "loaner returned", errstr, errstr_size);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx,
                    out ? "UPDATE loans SET state = 'out', checked_out_at = now() WHERE loan_id = $1"
                        : "UPDATE loans SET state = 'returned', returned_at = now() WHERE loan_id = $1",
                    p, 1, NULL, errstr, errstr_size);
  if (rc == QM_OK && !out) {
    char owner[64];
    snprintf(owner, sizeof(owner), "loan:%s", c->loan_id);
    rc = qm_timer_cancel_owner(tx, "timers", owner, NULL, NULL, errstr, errstr_size);
  }
  if (rc == QM_OK)
    rc = emit_loan(c->ff, tx, c->loan_id,
                   out ? QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_LOAN_CHECKED_OUT
                       : QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_LOAN_RETURNED,
                   out ? "loaner handed out" : "loaner returned", c->actor,
                   qm_http_req_traceparent(c->req), errstr, errstr_size);
  if (rc == QM_OK) qm_http_resp_json(c->resp, 200, loan_json(tx, c->loan_id));
  return rc;
}

static void loan_move(qm_http_req_t *req, qm_http_resp_t *resp, ff_t *ff, const char *action) {
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  loan_call_t c = {.ff = ff, .req = req, .resp = resp, .body = b, .model = action,
                   .actor = qm_http_req_principal(req)->sub, .loan_id = qm_http_req_param(req, "id")};
  c.tag = ff_json_str(b, "tag", true, &pb);
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  ff_api_tx(ff, req, resp, do_loan_move, &c);
}

static void loan_checkout(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  loan_move(req, resp, ctx, "checkout");
}
static void loan_return(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  loan_move(req, resp, ctx, "return");
}

/* GET /v1/loans?state=&person_id= */
static void list_loans(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_query(req, "state")),
                       QM_PG_TEXT(qm_http_req_query(req, "person_id"))};
  ff_api_list(ctx, req, resp, 50, 500,
              "SELECT l.seq, json_build_object('id', l.loan_id, 'asset_tag', a.tag,"
              " 'model_id', a.model_id, 'person_id', l.person_id, 'starts_ms', l.starts_ms,"
              " 'ends_ms', l.ends_ms, 'state', l.state, 'reminded', l.reminded_at IS NOT NULL)::text"
              " FROM loans l JOIN assets a USING (asset_id) WHERE l.seq > $1::bigint"
              " AND ($3::text IS NULL OR l.state = $3) AND ($4::text IS NULL OR l.person_id = $4)"
              " ORDER BY l.seq LIMIT $2::int",
              p, 2);
}

int ff_loan_overdue(ff_t *ff, qm_pg_t *tx, const char *loan_id, char *errstr,
                    size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(loan_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE loans SET reminded_at = now() WHERE loan_id = $1"
                      " AND state IN ('booked', 'out') RETURNING state",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool due = qm_pg_ntuples(res) == 1;
  qm_pg_result_destroy(res);
  if (!due) return QM_OK;
  rc = emit_loan(ff, tx, loan_id, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_LOAN_OVERDUE,
                 "loaner overdue: please return it", NULL, NULL, errstr, errstr_size);
  if (rc == QM_OK) {
    qm_metrics_inc(qm_metrics_child(ff->m_loans, NULL));
    qm_log_info("loan %s overdue: reminder published", loan_id);
  }
  return rc;
}

int ff_loans_register(ff_t *ff, char *errstr, size_t errstr_size) {
  qm_http_server_t *h = qm_service_http(ff->svc);
  int rc = QM_OK;
  if (!rc) rc = qm_http_route(h, "POST", "/v1/loans", book, ff, 0, NULL);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/loans", list_loans, ff, 0, ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/loans/{id}/checkout", loan_checkout, ff, 0, ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/loans/{id}/return", loan_return, ff, 0, ff_staff_roles);
  if (rc) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register loan routes");
  return QM_OK;
}
