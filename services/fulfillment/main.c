/*
 * qm-fulfillment: gets approved equipment into the right hands.
 *
 * This first version records every approved asset line as an open
 * fulfilment task (once per request line, whatever the redeliveries) and
 * shows IT staff their queue. Inventory, reservation, staging, shipping,
 * check-out and returns — and the events they publish — are the fulfilment
 * issue's work; until then this service publishes nothing it cannot stand
 * behind.
 */
#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_service.h"
#include "qm_topics.h"

#include "qm/v1/decisions.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const qm_migration_t migrations[] = {
    {2, "fulfilment tasks",
     "CREATE TABLE tasks ("
     " seq bigserial PRIMARY KEY,"
     " request_id text NOT NULL,"
     " line_no int NOT NULL,"
     " person_id text NOT NULL,"
     " item_id text NOT NULL,"
     " asset_model text NOT NULL,"
     " country text NOT NULL,"
     " location text NOT NULL,"
     " state text NOT NULL DEFAULT 'open' CHECK (state IN ('open','done','cancelled')),"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " UNIQUE (request_id, line_no));"},
};

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  QM_UNUSED(app);
  if (!qm_service_topic_is(svc, ev->topic, QM_TOPIC_DECISIONS)) return QM_OK;
  Qm__V1__DecisionEvent *de =
      qm__v1__decision_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!de)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.DecisionEvent",
                  ev->meta.type);
  int rc = QM_OK;
  const Qm__V1__RequestApproved *ap =
      de->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED ? de->approved : NULL;
  if (ap && ap->line && ap->line->kind == QM__V1__ITEM_KIND__ITEM_KIND_ASSET) {
    qm_pg_param_t p[] = {QM_PG_TEXT(ap->request_id),      QM_PG_INT64(ap->line->line_no),
                         QM_PG_TEXT(ap->subject_person_id), QM_PG_TEXT(ap->line->item_id),
                         QM_PG_TEXT(ap->line->asset_model), QM_PG_TEXT(ap->subject_country),
                         QM_PG_TEXT(ap->subject_location)};
    rc = qm_pg_exec(tx,
                    "INSERT INTO tasks (request_id, line_no, person_id, item_id, asset_model,"
                    " country, location) VALUES ($1, $2::int, $3, $4, $5, $6, $7)"
                    " ON CONFLICT (request_id, line_no) DO NOTHING",
                    p, QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
    if (rc == QM_OK)
      qm_log(QM_LOG_INFO, ap->request_id, NULL, "fulfilment task opened: %s for %s",
             ap->line->item_id, ap->subject_person_id);
  }
  qm__v1__decision_event__free_unpacked(de, NULL);
  return rc;
}

/* GET /v1/tasks?state=open&limit=&after= — the fulfilment work queue, oldest first. */
static void list_tasks(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_service_t *svc = ctx;
  const char *state = qm_http_req_query(req, "state");
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after_s = qm_http_req_query(req, "after");
  long limit = 50;
  long long after = 0;
  char *end = NULL;
  qm_problem_t *pb = NULL;
  if (!state) state = "open";
  if (strcmp(state, "open") && strcmp(state, "done") && strcmp(state, "cancelled")) {
    pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "state", "must be open, done or cancelled");
  }
  if (limit_s && ((limit = strtol(limit_s, &end, 10)) < 1 || limit > 500 || *end || !*limit_s)) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "limit", "must be an integer from 1 to 500");
  }
  if (after_s && ((after = strtoll(after_s, &end, 10)) < 0 || *end || !*after_s)) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "after", "must be the 'next' cursor of a previous page");
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(state), QM_PG_INT64(after), QM_PG_INT64(limit + 1)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "SELECT seq, request_id, line_no, person_id, item_id, asset_model, country,"
                      " location, state FROM tasks WHERE state = $1 AND seq > $2::bigint"
                      " ORDER BY seq LIMIT $3::int",
                      p, 3, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(svc), pg);
  if (rc != QM_OK) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "tasks: %s", errstr);
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  json_t *items = json_array();
  int n = qm_pg_ntuples(res);
  int shown = n > limit ? (int)limit : n;
  for (int i = 0; i < shown; i++) {
    int64_t line_no = 0;
    qm_pg_get_int64(res, i, 2, &line_no);
    json_array_append_new(items, json_pack("{s:s, s:I, s:s, s:s, s:s, s:s, s:s, s:s}", "request_id",
                                           qm_pg_get(res, i, 1), "line_no", (json_int_t)line_no,
                                           "person_id", qm_pg_get(res, i, 3), "item_id",
                                           qm_pg_get(res, i, 4), "asset_model", qm_pg_get(res, i, 5),
                                           "country", qm_pg_get(res, i, 6), "location",
                                           qm_pg_get(res, i, 7), "state", qm_pg_get(res, i, 8)));
  }
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > limit) json_object_set_new(body, "next", json_string(qm_pg_get(res, shown - 1, 0)));
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  static const char *const staff[] = {"it_admin", "helpdesk", NULL};
  *app = svc;
  if (qm_http_route(qm_service_http(svc), "GET", "/v1/tasks", list_tasks, svc, 0, staff) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register fulfilment routes");
  return QM_OK;
}

static const char *const consumes[] = {QM_TOPIC_DECISIONS, QM_TOPIC_HR};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "fulfillment",
      .default_port = 8084,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .init = init,
  };
  return qm_service_main(argc, argv, &def);
}
