/*
 * api: what IT staff, procurement and the carrier call — tasks and the
 * staging teams' queues, staff reservations, staging, the check-out scan,
 * purchase-order status updates, signed tracking webhooks and return scans.
 *
 * Each write runs in one transaction with the events it causes
 * (qm_service_tx); bad input answers problem+json and changes nothing.
 */
#include "fulfillment.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_pg.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct call {
  ff_t *ff;
  qm_http_req_t *req;
  qm_http_resp_t *resp;
  json_t *body;
  int64_t seq; /* the task or return in the path */
  const char *actor;
} call_t;

const char *ff_json_str(json_t *body, const char *name, bool required, qm_problem_t **pb) {
  json_t *v = json_object_get(body, name);
  if (json_is_string(v) && (!required || *json_string_value(v))) return json_string_value(v);
  if (v || required)
    qm_api_field_error(pb, name, required ? "is required (a non-empty string)" : "must be a string");
  return NULL;
}

typedef struct tx_call {
  ff_tx_fn fn;
  void *ctx;
} tx_call_t;

static int tx_trampoline(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                         size_t errstr_size) {
  tx_call_t *tc = ctx;
  return tc->fn(svc, tx, tc->ctx, errstr, errstr_size);
}

bool ff_api_tx(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, ff_tx_fn fn, void *ctx) {
  char errstr[512] = "";
  tx_call_t tc = {fn, ctx};
  int rc = qm_service_tx(ff->svc, 10000, tx_trampoline, &tc, errstr, sizeof(errstr));
  if (rc == QM_OK) return true;
  if ((rc == QM_EINVAL || rc == QM_ENOTFOUND || rc == QM_ECONFLICT || rc == QM_EDUP) &&
      qm_http_resp_status(resp) >= 400)
    return false;
  if (rc == QM_EDUP) {
    qm_http_problem(resp, 409, "conflict", "Already exists", errstr);
    return false;
  }
  qm_api_db_error(req, resp, "fulfilment", errstr);
  return false;
}

void ff_api_list(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, long default_limit,
                 long max_limit, const char *sql, const qm_pg_param_t *extra, int n_extra) {
  qm_page_t page;
  qm_problem_t *pb = NULL;
  if (!qm_api_page(req, default_limit, max_limit, &page, &pb)) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_param_t p[16] = {QM_PG_INT64(page.after), QM_PG_INT64(page.limit + 1)};
  for (int i = 0; i < n_extra && i < 14; i++) p[2 + i] = extra[i];
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(req, resp, qm_service_pool(ff->svc), "listing", sql, p,
                    2 + (n_extra < 14 ? n_extra : 14), &res))
    return;
  json_t *items = json_array();
  int n = qm_pg_ntuples(res), shown = n > page.limit ? (int)page.limit : n;
  for (int i = 0; i < shown; i++)
    json_array_append_new(items, json_loads(qm_pg_get(res, i, 1), 0, NULL));
  json_t *body = qm_api_list(items, n > page.limit ? qm_pg_get(res, shown - 1, 0) : NULL);
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

static bool path_seq(qm_http_req_t *req, qm_http_resp_t *resp, const char *name, int64_t *out) {
  const char *s = qm_http_req_param(req, name);
  char *end = NULL;
  long long v = s ? strtoll(s, &end, 10) : 0;
  if (!s || !*s || *end || v <= 0) {
    qm_http_problem(resp, 404, "not-found", "Not found", "no such id");
    return false;
  }
  *out = v;
  return true;
}

/* Answers with the task as it is after tx (inside tx). */
static int answer_task(call_t *c, qm_pg_t *tx, int status, char *errstr, size_t errstr_size) {
  json_t *t = ff_task_json(tx, c->seq, errstr, errstr_size);
  if (!t) return QM_EIO;
  qm_http_resp_json(c->resp, status, t);
  return QM_OK;
}

/* ---- tasks and queues ------------------------------------------------------- */

#define TASK_LIST_SQL                                                                        \
  "SELECT t.seq, json_build_object('id', t.seq, 'request_id', t.request_id, 'line_no',"      \
  " t.line_no, 'person_id', t.person_id, 'item_id', t.item_id, 'asset_model', t.asset_model," \
  " 'model_id', t.asset_model, 'item_type', t.item_type, 'country', t.country, 'location',"   \
  " t.location, 'state', t.state, 'step', t.step, 'site_id', t.site_id, 'team', t.team,"      \
  " 'route', t.route, 'asset_tag', a.tag, 'purchase_order_id', t.po_id, 'tracking_number',"   \
  " t.tracking_number, 'appointment_ms', nullif(t.appointment_ms, 0), 'sla_due_ms',"          \
  " nullif(t.sla_due_ms, 0), 'sla_breached', t.sla_breached)::text"                           \
  " FROM tasks t LEFT JOIN assets a ON a.asset_id = t.asset_id"

static void answer_tasks(ff_t *ff, qm_http_req_t *req, qm_http_resp_t *resp, const char *team) {
  const char *state = qm_http_req_query(req, "state");
  if (state && strcmp(state, "open") && strcmp(state, "done") && strcmp(state, "cancelled")) {
    qm_problem_t *pb = NULL;
    qm_api_field_error(&pb, "state", "must be open, done or cancelled");
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(state ? state : "open"), QM_PG_TEXT(qm_http_req_query(req, "step")),
                       QM_PG_TEXT(team), QM_PG_TEXT(qm_http_req_query(req, "site_id")),
                       QM_PG_TEXT(team ? "t" : "f")};
  ff_api_list(ff, req, resp, 50, 500,
              TASK_LIST_SQL " WHERE t.state = $3 AND t.seq > $1::bigint"
              " AND ($4::text IS NULL OR t.step = $4) AND ($5::text IS NULL OR t.team = $5)"
              " AND ($6::text IS NULL OR t.site_id = $6)"
              " AND (NOT $7::boolean OR t.step IN ('queued', 'staging'))"
              " ORDER BY t.seq LIMIT $2::int",
              p, QM_ARRAY_LEN(p));
}

/* GET /v1/tasks?state=&step=&site_id= */
static void list_tasks(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  answer_tasks(ctx, req, resp, NULL);
}

/* GET /v1/queues/{team} — the staging team's open work (queued or staging). */
static void team_queue(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  const char *team = qm_http_req_param(req, "team");
  if (strcmp(team, "central") && strcmp(team, "regional")) {
    qm_http_problem(resp, 404, "not-found", "No such team", "teams are central and regional");
    return;
  }
  answer_tasks(ctx, req, resp, team);
}

static void get_task(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  int64_t seq;
  if (!path_seq(req, resp, "id", &seq)) return;
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(ff->svc));
  if (!pg) return;
  char errstr[512] = "";
  json_t *t = ff_task_json(pg, seq, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(ff->svc), pg);
  if (t) qm_http_resp_json(resp, 200, t);
  else if (strstr(errstr, "no task")) qm_http_problem(resp, 404, "not-found", "No such task", NULL);
  else qm_api_db_error(req, resp, "reading a task", errstr);
}

/* ---- staff reservation ------------------------------------------------------ */

static int do_reserve(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                      size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  ff_line_t l = {.request_id = json_string_value(json_object_get(c->body, "request_id")),
                 .line_no = (int)json_integer_value(json_object_get(c->body, "line_no")),
                 .person_id = json_string_value(json_object_get(c->body, "person_id")),
                 .item_id = json_string_value(json_object_get(c->body, "item_id")),
                 .model_id = json_string_value(json_object_get(c->body, "model_id")),
                 .country = json_string_value(json_object_get(c->body, "country")),
                 .location = json_string_value(json_object_get(c->body, "location")),
                 .traceparent = qm_http_req_traceparent(c->req)};
  const char *outcome = NULL;
  int rc = ff_task_open(c->ff, tx, &l, &c->seq, &outcome, errstr, errstr_size);
  if (rc == QM_EINVAL) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Cannot reserve");
    qm_problem_field(pb, "model_id", errstr);
    qm_http_resp_problem(c->resp, pb);
    return rc;
  }
  if (rc != QM_OK) return rc;
  if (!strcmp(outcome, "exists")) {
    qm_http_problem(c->resp, 409, "conflict", "Line already has a task",
                    "this request line was reserved or backordered already");
    return QM_ECONFLICT;
  }
  json_t *t = ff_task_json(tx, c->seq, errstr, errstr_size);
  if (!t) return QM_EIO;
  json_object_set_new(t, "outcome", json_string(outcome));
  qm_http_resp_json(c->resp, 201, t);
  return QM_OK;
}

/* POST /v1/reservations {request_id, line_no, person_id, model_id, location,
 * country, item_id}: what an approved asset line does, for lines that reach
 * IT staff another way (replacements, phone orders). */
static void post_reservation(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  ff_json_str(b, "request_id", true, &pb);
  ff_json_str(b, "person_id", true, &pb);
  ff_json_str(b, "model_id", true, &pb);
  ff_json_str(b, "location", false, &pb);
  ff_json_str(b, "country", false, &pb);
  ff_json_str(b, "item_id", false, &pb);
  json_t *ln = json_object_get(b, "line_no");
  if (!json_is_integer(ln) || json_integer_value(ln) < 1 || json_integer_value(ln) > 1000)
    qm_api_field_error(&pb, "line_no", "must be an integer from 1 to 1000");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  call_t c = {.ff = ctx, .req = req, .resp = resp, .body = b};
  ff_api_tx(ctx, req, resp, do_reserve, &c);
}

/* ---- staging ------------------------------------------------------------------- */

/* Locks the task; answers 404 / 409 unless it is open and in one of steps
 * (NULL-terminated). */
static int lock_task(call_t *c, qm_pg_t *tx, const char *const *steps, char *step_out,
                     size_t step_size, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(c->seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, "SELECT state, step FROM tasks WHERE seq = $1::bigint FOR UPDATE", p, 1,
                      &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 404, "not-found", "No such task", NULL);
    return QM_ENOTFOUND;
  }
  bool ok = false;
  if (!strcmp(qm_pg_get(res, 0, 0), "open"))
    for (size_t i = 0; steps[i]; i++)
      if (!strcmp(qm_pg_get(res, 0, 1), steps[i])) ok = true;
  if (step_out) qm_strlcpy(step_out, qm_pg_get(res, 0, 1), step_size);
  if (!ok) {
    char detail[200];
    snprintf(detail, sizeof(detail), "the task is %s at step '%s'", qm_pg_get(res, 0, 0),
             qm_pg_get(res, 0, 1));
    qm_http_problem(c->resp, 409, "wrong-state", "Not possible at this step", detail);
  }
  qm_pg_result_destroy(res);
  return ok ? QM_OK : QM_ECONFLICT;
}

static int do_staging_start(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                            size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  static const char *const steps[] = {"queued", NULL};
  int rc = lock_task(c, tx, steps, NULL, 0, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_INT64(c->seq)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "UPDATE tasks SET step = 'staging', updated_at = now() WHERE seq = $1::bigint"
                  " RETURNING asset_id, request_id, person_id",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  int64_t asset = 0;
  qm_pg_get_int64(res, 0, 0, &asset);
  rc = ff_asset_set(tx, asset, "staging", qm_pg_get(res, 0, 2), qm_pg_get(res, 0, 1), 0, c->actor,
                    "staging and imaging started", errstr, errstr_size);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = ff_task_emit(c->ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_STAGING_STARTED,
                      "staging and imaging started", c->actor, errstr, errstr_size);
  if (rc == QM_OK) rc = answer_task(c, tx, 200, errstr, errstr_size);
  return rc;
}

static int do_staging_done(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                           size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  static const char *const steps[] = {"queued", "staging", NULL};
  int rc = lock_task(c, tx, steps, NULL, 0, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  int64_t appt = qm_now_ms() + c->ff->onsite_lead_ms;
  const char *at = json_string_value(json_object_get(c->body, "appointment_at"));
  if (at && qm_time_parse_rfc3339(at, &appt) != QM_OK) {
    qm_problem_t *pb = qm_problem_new(400, "validation", "Invalid appointment");
    qm_problem_field(pb, "appointment_at", "must be an RFC 3339 time");
    qm_http_resp_problem(c->resp, pb);
    return QM_EINVAL;
  }
  qm_pg_param_t p[] = {QM_PG_INT64(c->seq), QM_PG_INT64(appt)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "UPDATE tasks SET step = CASE WHEN route = 'onsite' THEN 'appointment' ELSE step END,"
                  " appointment_ms = CASE WHEN route = 'onsite' THEN $2::bigint ELSE 0 END,"
                  " updated_at = now() WHERE seq = $1::bigint RETURNING route, team",
                  p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool onsite = !strcmp(qm_pg_get(res, 0, 0), "onsite");
  char note[160];
  snprintf(note, sizeof(note), "staged and imaged by the %s team", qm_pg_get(res, 0, 1));
  qm_pg_result_destroy(res);
  rc = ff_task_emit(c->ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_STAGING_DONE,
                    note, c->actor, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (onsite) {
    char ts[40], n2[120];
    qm_time_format_rfc3339(appt, ts, sizeof(ts));
    snprintf(n2, sizeof(n2), "on-site setup appointment at %s", ts);
    rc = ff_task_emit(c->ff, tx, c->seq,
                      QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_APPOINTMENT_SCHEDULED, n2,
                      c->actor, errstr, errstr_size);
  } else {
    rc = ff_task_ship(c->ff, tx, c->seq, errstr, errstr_size);
  }
  if (rc == QM_OK) rc = answer_task(c, tx, 200, errstr, errstr_size);
  return rc;
}

static void task_action(qm_http_req_t *req, qm_http_resp_t *resp, ff_t *ff, ff_tx_fn fn,
                        bool needs_body) {
  call_t c = {.ff = ff, .req = req, .resp = resp, .actor = qm_http_req_principal(req)->sub};
  if (!path_seq(req, resp, "id", &c.seq)) return;
  size_t len = 0;
  qm_http_req_body(req, &len);
  if (needs_body || len > 0) {
    c.body = qm_http_req_json(req);
    if (!c.body) return;
  }
  ff_api_tx(ff, req, resp, fn, &c);
}

static void staging_start(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  task_action(req, resp, ctx, do_staging_start, false);
}
static void staging_done(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  task_action(req, resp, ctx, do_staging_done, false);
}

/* ---- check-out scan ------------------------------------------------------------ */

static void mismatch(qm_http_resp_t *resp, const char *title, const char *scanned,
                     const char *expected, const char *what) {
  qm_problem_t *pb = qm_problem_new(409, "asset-mismatch", title);
  char detail[400];
  snprintf(detail, sizeof(detail),
           "scanned '%.100s' but %s is asset '%.100s'; hand over that asset, or have IT "
           "re-reserve the request",
           scanned, what, expected);
  qm_problem_detail(pb, detail);
  qm_problem_field_rule(pb, "tag", "asset_mismatch", detail);
  qm_problem_extension(pb, "scanned_tag", json_string(scanned));
  qm_problem_extension(pb, "expected_tag", json_string(expected));
  qm_http_resp_problem(resp, pb);
}

static int do_checkout(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                       size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  static const char *const steps[] = {"queued", "staging", "appointment", NULL};
  int rc = lock_task(c, tx, steps, NULL, 0, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  const char *tag = json_string_value(json_object_get(c->body, "tag"));
  qm_pg_param_t p[] = {QM_PG_INT64(c->seq)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "SELECT a.tag, a.asset_id, t.person_id, t.request_id, t.line_no FROM tasks t"
                  " JOIN assets a ON a.asset_id = t.asset_id WHERE t.seq = $1::bigint",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 409, "wrong-state", "No asset reserved", NULL);
    return QM_ECONFLICT;
  }
  if (strcmp(tag, qm_pg_get(res, 0, 0)) != 0) {
    char what[200];
    snprintf(what, sizeof(what), "the asset reserved for request %s line %s",
             qm_pg_get(res, 0, 3), qm_pg_get(res, 0, 4));
    qm_log(QM_LOG_WARN, qm_pg_get(res, 0, 3), qm_http_req_trace_id(c->req),
           "check-out scan refused: scanned %s, reserved %s (by %s)", tag, qm_pg_get(res, 0, 0),
           c->actor);
    mismatch(c->resp, "Scanned asset does not match the reservation", tag, qm_pg_get(res, 0, 0),
             what);
    qm_pg_result_destroy(res);
    return QM_ECONFLICT;
  }
  int64_t asset = 0;
  qm_pg_get_int64(res, 0, 1, &asset);
  rc = ff_asset_set(tx, asset, "assigned", qm_pg_get(res, 0, 2), qm_pg_get(res, 0, 3), 0, c->actor,
                    "checked out: scan matched the reservation", errstr, errstr_size);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx, "UPDATE tasks SET step = 'checked_out', updated_at = now() WHERE seq = $1::bigint",
                    p, 1, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = ff_task_emit(c->ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CHECKED_OUT,
                      "handed over: scan matched the reserved asset", c->actor, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_task_close(c->ff, tx, c->seq, "done", errstr, errstr_size);
  if (rc == QM_OK) rc = answer_task(c, tx, 200, errstr, errstr_size);
  return rc;
}

static void checkout(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  ff_json_str(b, "tag", true, &pb);
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  task_action(req, resp, ctx, do_checkout, true);
}

/* POST /v1/tasks/{id}/reserve — after a failed delivery (reassign policy) or
 * to retry a backorder: reserve again, backorder when nothing is free. */
static int do_rereserve(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                        size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  static const char *const steps[] = {"delivery_failed", "backordered", NULL};
  int rc = lock_task(c, tx, steps, NULL, 0, errstr, errstr_size);
  bool got = false;
  if (rc == QM_OK) rc = ff_task_reserve(c->ff, tx, c->seq, 0, true, &got, errstr, errstr_size);
  if (rc == QM_OK) rc = answer_task(c, tx, 200, errstr, errstr_size);
  return rc;
}

static void rereserve(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  task_action(req, resp, ctx, do_rereserve, false);
}

/* ---- shipments and the carrier's webhook ------------------------------------------ */

int ff_shipment_created(ff_t *ff, qm_pg_t *tx, const char *ref, const char *carrier,
                        const char *tracking, const char *label_url, char *errstr,
                        size_t errstr_size) {
  long long seq = 0, n = 0;
  if (sscanf(ref, "task-%lld-%lld", &seq, &n) != 2)
    return qm_err(errstr, errstr_size, QM_EINVAL, "bad shipment reference %s", ref);
  qm_pg_param_t p[] = {QM_PG_INT64(seq), QM_PG_INT64(n), QM_PG_TEXT(carrier),
                       QM_PG_TEXT(tracking), QM_PG_TEXT(label_url)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE tasks SET step = 'shipped', carrier = $3, tracking_number = $4,"
                      " label_url = $5, updated_at = now() WHERE seq = $1::bigint"
                      " AND step = 'shipping' AND shipments = $2::int AND state = 'open'"
                      " RETURNING asset_id, person_id, request_id",
                      p, 5, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_log_warn("shipment %s created at the carrier (tracking %s) but its task moved on; "
                "cancel it with the carrier",
                ref, tracking);
    return QM_OK;
  }
  int64_t asset = 0;
  qm_pg_get_int64(res, 0, 0, &asset);
  char note[200];
  snprintf(note, sizeof(note), "shipped with %s, tracking %s", carrier, tracking);
  rc = ff_asset_set(tx, asset, "shipped", qm_pg_get(res, 0, 1), qm_pg_get(res, 0, 2), 0, NULL,
                    note, errstr, errstr_size);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = ff_task_emit(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_SHIPPED, note, NULL,
                      errstr, errstr_size);
  return rc;
}

/* True when sig ("sha256=<64 hex>") is HMAC-SHA256(secret, ts "." body). */
static bool signature_ok(const char *secret, const char *ts, const char *body, size_t len,
                         const char *sig) {
  if (!sig || strncmp(sig, "sha256=", 7) != 0 || strlen(sig + 7) != 64) return false;
  unsigned char want[EVP_MAX_MD_SIZE], got[32];
  unsigned int wlen = 0;
  size_t tlen = strlen(ts);
  unsigned char *msg = qm_malloc(tlen + 1 + len + 1);
  memcpy(msg, ts, tlen);
  msg[tlen] = '.';
  if (len) memcpy(msg + tlen + 1, body, len);
  bool ok = HMAC(EVP_sha256(), secret, (int)strlen(secret), msg, tlen + 1 + len, want, &wlen) &&
            wlen == 32;
  free(msg);
  if (!ok) return false;
  for (int i = 0; i < 32; i++) {
    unsigned int v = 0;
    if (sscanf(sig + 7 + 2 * i, "%2x", &v) != 1) return false;
    got[i] = (unsigned char)v;
  }
  return CRYPTO_memcmp(want, got, 32) == 0;
}

static int do_tracking(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                       size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  ff_t *ff = c->ff;
  const char *tracking = json_string_value(json_object_get(c->body, "tracking_number"));
  const char *status = json_string_value(json_object_get(c->body, "status"));
  const char *reason = json_string_value(json_object_get(c->body, "reason"));
  qm_pg_param_t p[] = {QM_PG_TEXT(tracking)};
  qm_pg_result_t *res = NULL;
  /* The recipient first (their lock before the task's, the order ff_leaver
   * takes them in): has the person left meanwhile? */
  int rc = qm_pg_exec(tx, "SELECT person_id FROM tasks WHERE tracking_number = $1", p, 1, &res,
                      errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char left_on[16] = "";
  bool left = false;
  if (qm_pg_ntuples(res) == 1)
    rc = ff_person_left(tx, qm_pg_get(res, 0, 0), left_on, sizeof(left_on), &left, errstr,
                        errstr_size);
  qm_pg_result_destroy(res);
  res = NULL;
  if (rc != QM_OK) return rc;
  rc = qm_pg_exec(tx,
                  "SELECT t.seq, t.step, t.state, coalesce(t.asset_id, 0), t.person_id,"
                  " t.request_id, t.asset_model, coalesce(t.site_id, '') FROM tasks t"
                  " WHERE t.tracking_number = $1 FOR UPDATE",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 404, "not-found", "Unknown tracking number", NULL);
    return QM_ENOTFOUND;
  }
  int64_t asset = 0;
  qm_pg_get_int64(res, 0, 0, &c->seq);
  qm_pg_get_int64(res, 0, 3, &asset);
  bool shipped = !strcmp(qm_pg_get(res, 0, 1), "shipped") && !strcmp(qm_pg_get(res, 0, 2), "open");
  char person[130], request[64], model[130], site[130];
  qm_strlcpy(person, qm_pg_get(res, 0, 4), sizeof(person));
  qm_strlcpy(request, qm_pg_get(res, 0, 5), sizeof(request));
  qm_strlcpy(model, qm_pg_get(res, 0, 6), sizeof(model));
  qm_strlcpy(site, qm_pg_get(res, 0, 7), sizeof(site));
  qm_pg_result_destroy(res);
  if (!shipped || (strcmp(status, "delivered") && strcmp(status, "failed"))) {
    /* In transit, or a repeat of an update already applied: acknowledged. */
    qm_http_resp_json(c->resp, 200, json_pack("{s:s, s:b}", "status", status, "applied", 0));
    return QM_OK;
  }
  qm_pg_param_t q[] = {QM_PG_INT64(c->seq)};
  if (!strcmp(status, "delivered")) {
    rc = ff_asset_set(tx, asset, "assigned", person, request, 0, "carrier",
                      "delivered to the recipient", errstr, errstr_size);
    if (rc == QM_OK)
      rc = qm_pg_exec(tx, "UPDATE tasks SET step = 'delivered', updated_at = now() WHERE seq = $1::bigint",
                      q, 1, NULL, errstr, errstr_size);
    if (rc == QM_OK)
      rc = ff_task_emit(ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_DELIVERED,
                        "delivered", NULL, errstr, errstr_size);
    if (rc == QM_OK)
      rc = ff_task_emit(ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CHECKED_OUT,
                        "assigned to the recipient on delivery", NULL, errstr, errstr_size);
    if (rc == QM_OK) rc = ff_task_close(ff, tx, c->seq, "done", errstr, errstr_size);
    if (rc == QM_OK && left) {
      /* Delivered to someone who has left: recalled at once. */
      int n = 0;
      rc = ff_leaver(ff, tx, person, left_on, qm_http_req_traceparent(c->req), &n, errstr,
                     errstr_size);
      if (rc == QM_OK)
        qm_log(QM_LOG_INFO, request, NULL, "delivered to leaver %s: %d return task(s) opened",
               person, n);
    }
  } else {
    char note[300];
    snprintf(note, sizeof(note), "delivery failed (%s); asset back to stock, %s",
             reason && *reason ? reason : "no reason given",
             ff->reship ? "shipping again" : "asset reassigned, line waits for IT staff");
    rc = ff_task_emit(ff, tx, c->seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_DELIVERY_FAILED,
                      note, NULL, errstr, errstr_size);
    if (rc == QM_OK)
      rc = ff_asset_set(tx, asset, "in_stock", NULL, NULL, 0, "carrier", note, errstr, errstr_size);
    if (rc == QM_OK)
      rc = qm_pg_exec(tx,
                      "UPDATE tasks SET step = 'delivery_failed', asset_id = NULL,"
                      " tracking_number = NULL, updated_at = now() WHERE seq = $1::bigint",
                      q, 1, NULL, errstr, errstr_size);
    if (rc == QM_OK) rc = ff_emit_stock(ff, tx, model, site, NULL, errstr, errstr_size);
    if (rc == QM_OK && left) {
      /* Never shipped again to someone who has left: the line is cancelled
       * (ff_leaver) and the asset goes to whoever waits for the model. */
      int n = 0;
      rc = ff_leaver(ff, tx, person, left_on, qm_http_req_traceparent(c->req), &n, errstr,
                     errstr_size);
      if (rc == QM_OK) rc = ff_allocate_backorders(ff, tx, model, NULL, errstr, errstr_size);
    } else if (rc == QM_OK && ff->reship) {
      bool got = false;
      rc = ff_task_reserve(ff, tx, c->seq, asset, true, &got, errstr, errstr_size);
      if (rc == QM_OK && got) rc = ff_task_ship(ff, tx, c->seq, errstr, errstr_size);
    } else if (rc == QM_OK) {
      rc = ff_allocate_backorders(ff, tx, model, NULL, errstr, errstr_size);
    }
  }
  if (rc == QM_OK)
    qm_http_resp_json(c->resp, 200, json_pack("{s:s, s:b}", "status", status, "applied", 1));
  return rc;
}

/* POST /v1/webhooks/carrier — public, authenticated by its HMAC signature. */
static void carrier_webhook(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  ff_t *ff = ctx;
  const qm_config_t *cfg = qm_service_config(ff->svc);
  size_t len = 0;
  const char *raw = qm_http_req_body(req, &len);
  const char *ts = qm_http_req_header(req, "X-QM-Timestamp");
  const char *sig = qm_http_req_header(req, "X-QM-Signature");
  char *end = NULL;
  errno = 0;
  long long t = ts ? strtoll(ts, &end, 10) : 0;
  /* Bounded before it is scaled: t * 1000 must not overflow (unix seconds
   * beyond year 9999 or before 1970 are refused as stale anyway). */
  bool in_range = ts && *ts && !*end && errno == 0 && t >= 0 && t <= 253402300799LL;
  long long skew = in_range ? t * 1000 - qm_now_ms() : 0;
  int64_t tolerance = qm_config_ms(cfg, "QM_CARRIER_WEBHOOK_TOLERANCE");
  if (!in_range || skew > tolerance || -skew > tolerance ||
      !signature_ok(ff->webhook_secret, ts, raw ? raw : "", len, sig)) {
    qm_log(QM_LOG_WARN, qm_http_req_id(req), qm_http_req_trace_id(req),
           "carrier webhook refused: missing, stale or bad signature (check "
           "QM_CARRIER_WEBHOOK_SECRET matches the carrier's)");
    qm_http_problem(resp, 401, "bad-signature", "Webhook signature not valid",
                    "send X-QM-Timestamp (unix seconds, within the tolerance) and X-QM-Signature: "
                    "sha256=<hex HMAC-SHA256 of '<timestamp>.<body>'>");
    return;
  }
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  ff_json_str(b, "tracking_number", true, &pb);
  const char *status = ff_json_str(b, "status", true, &pb);
  ff_json_str(b, "reason", false, &pb);
  if (status && strcmp(status, "in_transit") && strcmp(status, "out_for_delivery") &&
      strcmp(status, "delivered") && strcmp(status, "failed"))
    qm_api_field_error(&pb, "status", "must be in_transit, out_for_delivery, delivered or failed");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  call_t c = {.ff = ff, .req = req, .resp = resp, .body = b};
  ff_api_tx(ff, req, resp, do_tracking, &c);
}

/* ---- purchase orders ---------------------------------------------------------- */

static int do_po_status(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                        size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  ff_t *ff = c->ff;
  const char *po_id = qm_http_req_param(c->req, "id");
  const char *status = json_string_value(json_object_get(c->body, "status"));
  const char *eta_s = json_string_value(json_object_get(c->body, "estimated_delivery"));
  int64_t eta = 0;
  if (eta_s) qm_time_parse_rfc3339(eta_s, &eta);
  qm_pg_param_t p[] = {QM_PG_TEXT(po_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT status, model_id, site_id, quantity FROM purchase_orders"
                      " WHERE po_id = $1 FOR UPDATE",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 404, "not-found", "No such purchase order", NULL);
    return QM_ENOTFOUND;
  }
  char old[32], model[130], site[130];
  int64_t qty = 0;
  qm_strlcpy(old, qm_pg_get(res, 0, 0), sizeof(old));
  qm_strlcpy(model, qm_pg_get(res, 0, 1), sizeof(model));
  qm_strlcpy(site, qm_pg_get(res, 0, 2), sizeof(site));
  qm_pg_get_int64(res, 0, 3, &qty);
  qm_pg_result_destroy(res);
  res = NULL;
  if (!strcmp(old, "delivered") || !strcmp(old, "cancelled")) {
    if (!strcmp(old, status)) { /* a repeat: nothing more to do */
      qm_http_resp_json(c->resp, 200, json_pack("{s:s, s:s}", "purchase_order_id", po_id, "status", old));
      return QM_OK;
    }
    qm_http_problem(c->resp, 409, "wrong-state", "Purchase order is closed", old);
    return QM_ECONFLICT;
  }
  json_t *assets = json_object_get(c->body, "assets");
  if (!strcmp(status, "delivered")) {
    qm_problem_t *pb = NULL;
    if (!json_is_array(assets) || json_array_size(assets) == 0 ||
        (int64_t)json_array_size(assets) > qty)
      qm_api_field_error(&pb, "assets", "a delivery lists the received assets: 1 to quantity of {tag, serial}");
    size_t i;
    json_t *a;
    json_array_foreach(assets, i, a) {
      const char *why;
      char f[48];
      snprintf(f, sizeof(f), "assets[%zu].tag", i);
      if ((why = ff_asset_check_tag(ff, json_string_value(json_object_get(a, "tag")))))
        qm_api_field_error(&pb, f, why);
      snprintf(f, sizeof(f), "assets[%zu].serial", i);
      if ((why = ff_asset_check_serial(ff, json_string_value(json_object_get(a, "serial")))))
        qm_api_field_error(&pb, f, why);
    }
    if (pb) {
      qm_http_resp_problem(c->resp, pb);
      return QM_EINVAL;
    }
    char *rows = json_dumps(assets, JSON_COMPACT);
    qm_pg_param_t q[] = {QM_PG_TEXT(rows), QM_PG_TEXT(model), QM_PG_TEXT(site), QM_PG_TEXT(po_id)};
    rc = qm_pg_exec(tx,
                      "WITH ins AS (INSERT INTO assets (tag, serial, model_id, site_id, status)"
                      "  SELECT tag, serial, $2, $3, 'in_stock' FROM json_to_recordset($1::json)"
                      "  AS r(tag text, serial text) RETURNING asset_id)"
                      " INSERT INTO asset_history (asset_id, status, note)"
                      " SELECT asset_id, 'in_stock', 'received on purchase order ' || $4 FROM ins",
                      q, 4, NULL, errstr, errstr_size);
    free(rows);
    if (rc == QM_EDUP) {
      qm_problem_t *pb2 = qm_problem_new(409, "conflict", "Asset already in the inventory");
      qm_problem_field(pb2, "assets", "a tag or serial of this delivery is already known");
      qm_http_resp_problem(c->resp, pb2);
      return QM_EDUP;
    }
    if (rc != QM_OK) return rc;
  }
  /* Only a delivery adds assets (above): any other status receives none,
   * whatever "assets" the body carries. */
  int64_t received = !strcmp(status, "delivered") ? (int64_t)json_array_size(assets) : 0;
  qm_pg_param_t u[] = {QM_PG_TEXT(po_id), QM_PG_TEXT(status), QM_PG_INT64(eta),
                       QM_PG_INT64(received)};
  rc = qm_pg_exec(tx,
                  "WITH po AS (UPDATE purchase_orders SET status = $2,"
                  "  eta_ms = CASE WHEN $3::bigint > 0 THEN $3::bigint ELSE eta_ms END,"
                  "  received = received + $4::int, updated_at = now() WHERE po_id = $1)"
                  " UPDATE tasks SET eta_ms = CASE WHEN $3::bigint > 0 THEN $3::bigint ELSE eta_ms END,"
                  " updated_at = now() WHERE po_id = $1 AND state = 'open' RETURNING seq",
                  u, 4, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char note[200];
  if (eta > 0) {
    char ts[40];
    qm_time_format_rfc3339(eta, ts, sizeof(ts));
    snprintf(note, sizeof(note), "purchase order %s, estimated delivery %s", status, ts);
  } else {
    snprintf(note, sizeof(note), "purchase order %s", status);
  }
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t seq = 0;
    qm_pg_get_int64(res, i, 0, &seq);
    rc = ff_task_emit(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_PURCHASE_ORDER_UPDATED,
                      note, c->actor, errstr, errstr_size);
  }
  qm_pg_result_destroy(res);
  if (rc == QM_OK && !strcmp(status, "delivered"))
    rc = ff_allocate_backorders(ff, tx, model, po_id, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_emit_stock(ff, tx, model, site, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_http_resp_json(c->resp, 200, json_pack("{s:s, s:s, s:I}", "purchase_order_id", po_id,
                                              "status", status, "estimated_delivery_ms",
                                              (json_int_t)eta));
  return rc;
}

/* POST /v1/purchase-orders/{id}/status {status, estimated_delivery, assets} */
static void po_status(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  const char *status = ff_json_str(b, "status", true, &pb);
  const char *eta = ff_json_str(b, "estimated_delivery", false, &pb);
  int64_t ms;
  if (status && strcmp(status, "confirmed") && strcmp(status, "shipped") &&
      strcmp(status, "delivered") && strcmp(status, "cancelled"))
    qm_api_field_error(&pb, "status", "must be confirmed, shipped, delivered or cancelled");
  if (eta && qm_time_parse_rfc3339(eta, &ms) != QM_OK)
    qm_api_field_error(&pb, "estimated_delivery", "must be an RFC 3339 time");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  call_t c = {.ff = ctx, .req = req, .resp = resp, .body = b,
              .actor = qm_http_req_principal(req)->sub};
  ff_api_tx(ctx, req, resp, do_po_status, &c);
}

static void list_pos(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_pg_param_t p[] = {QM_PG_TEXT(qm_http_req_query(req, "status"))};
  ff_api_list(ctx, req, resp, 50, 500,
              "SELECT po.seq, json_build_object('purchase_order_id', po.po_id, 'model_id',"
              " po.model_id, 'site_id', po.site_id, 'quantity', po.quantity, 'status',"
              " po.status, 'estimated_delivery_ms', nullif(po.eta_ms, 0), 'external_ref',"
              " po.external_ref, 'request_id', po.request_id, 'line_no', po.line_no,"
              " 'received', po.received, 'send_attempts', o.attempts, 'last_error',"
              " o.last_error)::text FROM purchase_orders po LEFT JOIN outbound o"
              " ON o.kind = 'purchase_order' AND o.ref = po.po_id"
              " WHERE po.seq > $1::bigint AND ($3::text IS NULL OR po.status = $3)"
              " ORDER BY po.seq LIMIT $2::int",
              p, 1);
}

/* ---- returns ---------------------------------------------------------------------- */

static void list_returns(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  const char *state = qm_http_req_query(req, "state");
  qm_pg_param_t p[] = {QM_PG_TEXT(state ? state : "open"),
                       QM_PG_TEXT(qm_http_req_query(req, "person_id"))};
  ff_api_list(ctx, req, resp, 50, 500,
              "SELECT r.return_id, json_build_object('id', r.return_id, 'asset_tag', a.tag,"
              " 'serial', a.serial, 'model_id', a.model_id, 'site_id', a.site_id,"
              " 'person_id', r.person_id, 'request_id', r.request_id, 'reason', r.reason,"
              " 'state', r.state, 'outcome', r.outcome, 'due_date', r.due_date)::text"
              " FROM returns r JOIN assets a USING (asset_id)"
              " WHERE r.return_id > $1::bigint AND r.state = $3"
              " AND ($4::text IS NULL OR r.person_id = $4) ORDER BY r.return_id LIMIT $2::int",
              p, 2);
}

static int do_return_scan(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr,
                          size_t errstr_size) {
  QM_UNUSED(svc);
  call_t *c = ctx;
  const char *tag = json_string_value(json_object_get(c->body, "tag"));
  const char *outcome = json_string_value(json_object_get(c->body, "outcome"));
  qm_pg_param_t p[] = {QM_PG_INT64(c->seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT r.state, a.tag, a.asset_id, r.person_id, coalesce(r.request_id, ''),"
                      " coalesce(r.line_no, 0), a.serial, a.model_id, a.site_id"
                      " FROM returns r JOIN assets a USING (asset_id)"
                      " WHERE r.return_id = $1::bigint FOR UPDATE OF r, a",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 404, "not-found", "No such return", NULL);
    return QM_ENOTFOUND;
  }
  if (strcmp(qm_pg_get(res, 0, 0), "open")) {
    qm_pg_result_destroy(res);
    qm_http_problem(c->resp, 409, "wrong-state", "Return already done", NULL);
    return QM_ECONFLICT;
  }
  if (strcmp(tag, qm_pg_get(res, 0, 1))) {
    mismatch(c->resp, "Scanned asset is not the one being returned", tag, qm_pg_get(res, 0, 1),
             "this return task");
    qm_pg_result_destroy(res);
    return QM_ECONFLICT;
  }
  int64_t asset = 0, line_no = 0;
  qm_pg_get_int64(res, 0, 2, &asset);
  qm_pg_get_int64(res, 0, 5, &line_no);
  bool retire = !strcmp(outcome, "retire");
  char note[120];
  snprintf(note, sizeof(note), "returned by %s; %s", qm_pg_get(res, 0, 3),
           retire ? "retired" : "back in stock");
  /* Its history shows it came back, then where it went. */
  rc = ff_asset_set(tx, asset, "returned", qm_pg_get(res, 0, 3), NULL, 0, c->actor,
                    "return scanned", errstr, errstr_size);
  if (rc == QM_OK)
    rc = ff_asset_set(tx, asset, retire ? "retired" : "in_stock", qm_pg_get(res, 0, 3), NULL, 0,
                      c->actor, note, errstr, errstr_size);
  qm_pg_param_t q[] = {QM_PG_INT64(c->seq), QM_PG_TEXT(retire ? "retire" : "stock"),
                       QM_PG_TEXT(c->actor)};
  if (rc == QM_OK)
    rc = qm_pg_exec(tx,
                    "UPDATE returns SET state = 'done', outcome = $2, actor = $3, done_at = now()"
                    " WHERE return_id = $1::bigint",
                    q, 3, NULL, errstr, errstr_size);
  if (rc == QM_OK) {
    Qm__V1__FulfillmentUpdate u = QM__V1__FULFILLMENT_UPDATE__INIT;
    u.request_id = (char *)qm_pg_get(res, 0, 4);
    u.line_no = (int32_t)line_no;
    u.subject_person_id = (char *)qm_pg_get(res, 0, 3);
    u.step = QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_RETURNED;
    u.asset_tag = (char *)qm_pg_get(res, 0, 1);
    u.serial = (char *)qm_pg_get(res, 0, 6);
    u.model_id = (char *)qm_pg_get(res, 0, 7);
    u.site_id = (char *)qm_pg_get(res, 0, 8);
    u.note = note;
    u.actor_person_id = (char *)c->actor;
    rc = ff_emit_update(c->ff, tx, &u, qm_http_req_traceparent(c->req), errstr, errstr_size);
  }
  char model[130], site[130];
  qm_strlcpy(model, qm_pg_get(res, 0, 7), sizeof(model));
  qm_strlcpy(site, qm_pg_get(res, 0, 8), sizeof(site));
  qm_pg_result_destroy(res);
  if (rc == QM_OK) rc = ff_emit_stock(c->ff, tx, model, site, NULL, errstr, errstr_size);
  if (rc == QM_OK && !retire)
    rc = ff_allocate_backorders(c->ff, tx, model, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_http_resp_json(c->resp, 200, json_pack("{s:I, s:s, s:s}", "id", (json_int_t)c->seq,
                                              "state", "done", "outcome",
                                              retire ? "retire" : "stock"));
  return rc;
}

/* POST /v1/returns/{id}/scan {tag, outcome: stock|retire} */
static void return_scan(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  json_t *b = qm_http_req_json(req);
  if (!b) return;
  qm_problem_t *pb = NULL;
  ff_json_str(b, "tag", true, &pb);
  const char *outcome = ff_json_str(b, "outcome", true, &pb);
  if (outcome && strcmp(outcome, "stock") && strcmp(outcome, "retire"))
    qm_api_field_error(&pb, "outcome", "must be stock or retire");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  call_t c = {.ff = ctx, .req = req, .resp = resp, .body = b,
              .actor = qm_http_req_principal(req)->sub};
  if (!path_seq(req, resp, "id", &c.seq)) return;
  ff_api_tx(ctx, req, resp, do_return_scan, &c);
}

int ff_api_register(ff_t *ff, char *errstr, size_t errstr_size) {
  static const char *const admin[] = {"it_admin", NULL};
  static const char *const procurement[] = {"it_admin", "finance", "procurement", NULL};
  qm_http_server_t *h = qm_service_http(ff->svc);
  int rc = QM_OK;
  if (!rc) rc = qm_http_route(h, "GET", "/v1/tasks", list_tasks, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/tasks/{id}", get_task, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/queues/{team}", team_queue, ff, 0, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "POST", "/v1/reservations", post_reservation, ff, 0, admin);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/tasks/{id}/staging/start", staging_start, ff,
                       QM_HTTP_ANY_BODY, ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/tasks/{id}/staging/done", staging_done, ff,
                       QM_HTTP_ANY_BODY, ff_staff_roles);
  if (!rc) rc = qm_http_route(h, "POST", "/v1/tasks/{id}/checkout", checkout, ff, 0, ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/tasks/{id}/reserve", rereserve, ff, QM_HTTP_ANY_BODY,
                       ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/purchase-orders/{id}/status", po_status, ff, 0, procurement);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/purchase-orders", list_pos, ff, 0, procurement);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/webhooks/carrier", carrier_webhook, ff, QM_HTTP_PUBLIC, NULL);
  if (!rc) rc = qm_http_route(h, "GET", "/v1/returns", list_returns, ff, 0, ff_staff_roles);
  if (!rc)
    rc = qm_http_route(h, "POST", "/v1/returns/{id}/scan", return_scan, ff, 0, ff_staff_roles);
  if (rc) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register fulfilment routes");
  return QM_OK;
}
