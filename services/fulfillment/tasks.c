/*
 * tasks: one task per approved asset line and every step it goes through —
 * reservation (or backorder and purchase order), the staging team's queue,
 * shipment or on-site appointment, hand-over, and the events that let the
 * request's timeline show each step.
 *
 * Reservation is atomic under any concurrency: an asset is taken with
 * "FOR UPDATE SKIP LOCKED" and moved out of 'in_stock' in the same
 * statement, so two transactions never get the same asset and no more
 * assets are reserved than are in stock; a transaction that finds nothing
 * free backorders its line instead of waiting.
 */
#include "fulfillment.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_timer.h"
#include "qm_topics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The CloudEvents type suffix of a step: FULFILLMENT_STEP_CHECKED_OUT -> checked_out. */
static void step_type(Qm__V1__FulfillmentStep step, char *out, size_t n) {
  const ProtobufCEnumValue *v =
      protobuf_c_enum_descriptor_get_value(&qm__v1__fulfillment_step__descriptor, (int)step);
  const char *name = v ? v->name : "FULFILLMENT_STEP_UNSPECIFIED";
  const char *p = strncmp(name, "FULFILLMENT_STEP_", 17) == 0 ? name + 17 : name;
  size_t i = 0;
  for (; p[i] && i + 1 < n; i++) out[i] = (char)(p[i] >= 'A' && p[i] <= 'Z' ? p[i] + 32 : p[i]);
  out[i] = 0;
}

int ff_emit_update(ff_t *ff, qm_pg_t *tx, Qm__V1__FulfillmentUpdate *u, const char *traceparent,
                   char *errstr, size_t errstr_size) {
  if (!u->at_ms) u->at_ms = qm_now_ms();
  char step[64], type[128];
  step_type(u->step, step, sizeof(step));
  snprintf(type, sizeof(type), "qm.fulfillment.%s.v1", step);
  Qm__V1__FulfillmentEvent fe = QM__V1__FULFILLMENT_EVENT__INIT;
  fe.event_case = QM__V1__FULFILLMENT_EVENT__EVENT_UPDATE;
  fe.update = u;
  int rc = qm_service_emit(ff->svc, tx, QM_TOPIC_FULFILLMENT, u->subject_person_id, type,
                           u->request_id, traceparent && *traceparent ? traceparent : NULL,
                           &fe.base, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_metrics_inc(qm_metrics_child(ff->m_steps, (const char *const[]){step, NULL}));
  return rc;
}

int ff_emit_stock(ff_t *ff, qm_pg_t *tx, const char *model_id, const char *site_id,
                  const char *traceparent, char *errstr, size_t errstr_size) {
  QM_UNUSED(ff);
  QM_UNUSED(traceparent);
  /* Only a note that the level changed: an append, so reservations racing
   * for one model never wait on each other here. ff_stock_publish() turns
   * the notes into StockLevel events, coalesced, off the hot path. */
  qm_pg_param_t p[] = {QM_PG_TEXT(model_id), QM_PG_TEXT(site_id)};
  return qm_pg_exec(tx, "INSERT INTO stock_changes (model_id, site_id) VALUES ($1, $2)", p, 2,
                    NULL, errstr, errstr_size);
}

int ff_stock_publish(ff_t *ff, qm_pg_t *tx, int *published, char *errstr, size_t errstr_size) {
  *published = 0;
  /* One publisher at a time (any instance): levels go out in a true order. */
  qm_pg_param_t k[] = {QM_PG_INT64(qm_pg_advisory_key("qm-fulfillment-stock-levels"))};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, "SELECT pg_try_advisory_xact_lock($1::bigint)", k, 1, &res, errstr,
                      errstr_size);
  if (rc != QM_OK) return rc;
  bool mine = !strcmp(qm_pg_get(res, 0, 0), "t");
  qm_pg_result_destroy(res);
  if (!mine) return QM_OK;
  /* The notes taken now are deleted in this transaction; notes committed
   * after this statement's snapshot stay for the next round. */
  rc = qm_pg_exec(tx,
                  "WITH gone AS (DELETE FROM stock_changes RETURNING model_id, site_id),"
                  " k AS (SELECT DISTINCT model_id, site_id FROM gone)"
                  " SELECT k.model_id, k.site_id,"
                  " (SELECT count(*) FROM assets a WHERE a.model_id = k.model_id"
                  "  AND a.site_id = k.site_id AND a.status = 'in_stock'),"
                  " (SELECT coalesce(sum(quantity), 0) FROM purchase_orders o WHERE o.model_id = k.model_id"
                  "  AND o.site_id = k.site_id AND o.status IN ('new', 'sent', 'confirmed', 'shipped')),"
                  " (SELECT coalesce(min(eta_ms) FILTER (WHERE eta_ms > 0), 0) FROM purchase_orders o"
                  "  WHERE o.model_id = k.model_id AND o.site_id = k.site_id"
                  "  AND o.status IN ('new', 'sent', 'confirmed', 'shipped'))"
                  " FROM k ORDER BY 1, 2",
                  NULL, 0, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t avail = 0, on_order = 0, eta = 0;
    qm_pg_get_int64(res, i, 2, &avail);
    qm_pg_get_int64(res, i, 3, &on_order);
    qm_pg_get_int64(res, i, 4, &eta);
    Qm__V1__StockLevel sl = QM__V1__STOCK_LEVEL__INIT;
    sl.model_id = (char *)qm_pg_get(res, i, 0);
    sl.site_id = (char *)qm_pg_get(res, i, 1);
    sl.available = (int32_t)avail;
    sl.on_order = (int32_t)on_order;
    sl.estimated_delivery_at_ms = avail > 0 ? 0 : eta;
    Qm__V1__FulfillmentEvent fe = QM__V1__FULFILLMENT_EVENT__INIT;
    fe.event_case = QM__V1__FULFILLMENT_EVENT__EVENT_STOCK_LEVEL;
    fe.stock_level = &sl;
    rc = qm_service_emit(ff->svc, tx, QM_TOPIC_FULFILLMENT, sl.model_id,
                         "qm.fulfillment.stock_level.v1", sl.model_id, NULL, &fe.base, NULL,
                         errstr, errstr_size);
    if (rc == QM_OK) (*published)++;
  }
  qm_pg_result_destroy(res);
  return rc;
}

int ff_asset_set(qm_pg_t *tx, int64_t asset_id, const char *status, const char *person_id,
                 const char *request_id, int line_no, const char *actor, const char *note,
                 char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(asset_id),  QM_PG_TEXT(status),  QM_PG_TEXT(person_id),
                       QM_PG_TEXT(request_id), QM_PG_INT64(line_no), QM_PG_TEXT(actor),
                       QM_PG_TEXT(note)};
  return qm_pg_exec(tx,
                    "WITH a AS (UPDATE assets SET status = $2,"
                    "  assigned_to = CASE WHEN $2 = 'assigned' THEN $3 ELSE NULL END,"
                    "  request_id = CASE WHEN $2 IN ('in_stock', 'retired') THEN NULL"
                    "   ELSE coalesce($4, request_id) END,"
                    "  line_no = CASE WHEN $2 IN ('in_stock', 'retired') THEN NULL"
                    "   ELSE coalesce(nullif($5::int, 0), line_no) END,"
                    "  updated_at = now() WHERE asset_id = $1::bigint RETURNING asset_id)"
                    " INSERT INTO asset_history (asset_id, status, person_id, request_id, actor, note)"
                    " SELECT asset_id, $2, $3, $4, $6, $7 FROM a",
                    p, QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
}

/* Emits a FulfillmentUpdate of task seq for step, filled from the task as it
 * is now in tx. */
static int emit_task(ff_t *ff, qm_pg_t *tx, int64_t seq, Qm__V1__FulfillmentStep step,
                     const char *note, const char *actor, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
      tx,
      "SELECT t.request_id, t.line_no, t.person_id, t.asset_model, coalesce(t.site_id, ''),"
      " coalesce(a.tag, ''), coalesce(a.serial, ''), coalesce(t.carrier, ''),"
      " coalesce(t.tracking_number, ''), coalesce(nullif(t.eta_ms, 0), po.eta_ms, 0),"
      " coalesce(t.team, ''), coalesce(t.route, ''), t.appointment_ms, coalesce(t.po_id, ''),"
      " coalesce(po.status, ''), coalesce(t.label_url, ''), coalesce(t.item_type, ''),"
      " t.sla_due_ms, coalesce(t.traceparent, '')"
      " FROM tasks t LEFT JOIN assets a ON a.asset_id = t.asset_id"
      " LEFT JOIN purchase_orders po ON po.po_id = t.po_id WHERE t.seq = $1::bigint",
      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) != 1) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "task %lld not found", (long long)seq);
  }
  Qm__V1__FulfillmentUpdate u = QM__V1__FULFILLMENT_UPDATE__INIT;
  int64_t v = 0;
  u.request_id = (char *)qm_pg_get(res, 0, 0);
  qm_pg_get_int64(res, 0, 1, &v);
  u.line_no = (int32_t)v;
  u.subject_person_id = (char *)qm_pg_get(res, 0, 2);
  u.step = step;
  u.model_id = (char *)qm_pg_get(res, 0, 3);
  u.site_id = (char *)qm_pg_get(res, 0, 4);
  u.asset_tag = (char *)qm_pg_get(res, 0, 5);
  u.serial = (char *)qm_pg_get(res, 0, 6);
  u.carrier = (char *)qm_pg_get(res, 0, 7);
  u.tracking_number = (char *)qm_pg_get(res, 0, 8);
  qm_pg_get_int64(res, 0, 9, &u.estimated_delivery_at_ms);
  u.team = (char *)qm_pg_get(res, 0, 10);
  u.route = (char *)qm_pg_get(res, 0, 11);
  qm_pg_get_int64(res, 0, 12, &u.appointment_at_ms);
  u.purchase_order_id = (char *)qm_pg_get(res, 0, 13);
  u.purchase_order_status = (char *)qm_pg_get(res, 0, 14);
  u.label_url = (char *)qm_pg_get(res, 0, 15);
  u.item_type = (char *)qm_pg_get(res, 0, 16);
  qm_pg_get_int64(res, 0, 17, &u.sla_due_at_ms);
  u.note = (char *)(note ? note : "");
  u.actor_person_id = (char *)(actor ? actor : "");
  rc = ff_emit_update(ff, tx, &u, qm_pg_get(res, 0, 18), errstr, errstr_size);
  qm_pg_result_destroy(res);
  return rc;
}

int64_t ff_sla_ms(const ff_t *ff, const char *item_type) {
  int64_t any = 0;
  for (size_t i = 0; i < ff->n_slas; i++) {
    if (!strcmp(ff->slas[i].item_type, item_type)) return ff->slas[i].ms;
    if (!strcmp(ff->slas[i].item_type, "*")) any = ff->slas[i].ms;
  }
  return any;
}

/* Raises a purchase order for a backordered task (one unit, at its site) and
 * queues it for procurement, unless the task waits on an open one already. */
static int backorder(ff_t *ff, qm_pg_t *tx, int64_t seq, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT t.request_id, t.line_no, t.asset_model, t.site_id,"
                      " (po.status IS NOT NULL AND po.status NOT IN ('delivered', 'cancelled')),"
                      " t.person_id, t.location, t.country"
                      " FROM tasks t LEFT JOIN purchase_orders po ON po.po_id = t.po_id"
                      " WHERE t.seq = $1::bigint",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool waiting = !strcmp(qm_pg_get(res, 0, 4), "t");
  char po_id[QM_UUID_STR_LEN];
  qm_uuid_new(po_id);
  int64_t line_no = 0;
  qm_pg_get_int64(res, 0, 1, &line_no);
  if (!waiting) {
    qm_pg_param_t q[] = {QM_PG_TEXT(po_id), QM_PG_TEXT(qm_pg_get(res, 0, 2)),
                         QM_PG_TEXT(qm_pg_get(res, 0, 3)), QM_PG_TEXT(qm_pg_get(res, 0, 0)),
                         QM_PG_INT64(line_no), QM_PG_INT64(seq)};
    rc = qm_pg_exec(tx,
                    "WITH po AS (INSERT INTO purchase_orders (po_id, model_id, site_id, quantity,"
                    " status, request_id, line_no) VALUES ($1, $2, $3, 1, 'new', $4, $5::int))"
                    " UPDATE tasks SET po_id = $1, step = 'backordered', updated_at = now()"
                    " WHERE seq = $6::bigint",
                    q, QM_ARRAY_LEN(q), NULL, errstr, errstr_size);
    if (rc == QM_OK) {
      json_t *body = json_pack("{s:s, s:s, s:s, s:i, s:s, s:I, s:s, s:s}", "purchase_order_id",
                               po_id, "model_id", qm_pg_get(res, 0, 2), "site_id",
                               qm_pg_get(res, 0, 3), "quantity", 1, "request_id",
                               qm_pg_get(res, 0, 0), "line_no", (json_int_t)line_no,
                               "deliver_to_site", qm_pg_get(res, 0, 3), "for_person",
                               qm_pg_get(res, 0, 5));
      rc = ff_outbound_add(tx, "purchase_order", po_id, body, errstr, errstr_size);
    }
  } else {
    rc = qm_pg_exec(tx,
                    "UPDATE tasks SET step = 'backordered', updated_at = now() WHERE seq = $1::bigint",
                    p, 1, NULL, errstr, errstr_size);
  }
  char model[130], site[130];
  qm_strlcpy(model, qm_pg_get(res, 0, 2), sizeof(model));
  qm_strlcpy(site, qm_pg_get(res, 0, 3), sizeof(site));
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = emit_task(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_BACKORDERED,
                   waiting ? "no stock; waiting on the open purchase order"
                           : "no stock; purchase order sent to procurement",
                   NULL, errstr, errstr_size);
  if (rc == QM_OK) rc = ff_emit_stock(ff, tx, model, site, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_metrics_inc(qm_metrics_child(ff->m_reservations, (const char *const[]){"backordered", NULL}));
  return rc;
}

/* One attempt at taking an asset for task seq: pick_sql is the condition and
 * order of candidates (over assets a and the task t); the first unlocked one
 * is locked, leaves 'in_stock' and goes to the task in one statement. Each
 * variant walks the partial index assets_free in order, so a reservation
 * costs a few index probes however large the stock. */
static int take_asset(qm_pg_t *tx, int64_t seq, int64_t prefer, const char *pick_sql,
                      qm_pg_result_t **res, char *errstr, size_t errstr_size) {
  char sql[2048];
  snprintf(sql, sizeof(sql),
           "WITH t AS (SELECT seq, request_id, line_no, asset_model, site_id, person_id FROM tasks"
           "  WHERE seq = $1::bigint AND state = 'open' AND asset_id IS NULL AND $2::bigint >= 0),"
           " pick AS (SELECT a.asset_id FROM assets a, t WHERE a.status = 'in_stock'"
           "  AND a.model_id = t.asset_model AND %s LIMIT 1 FOR UPDATE OF a SKIP LOCKED),"
           " res AS (UPDATE assets a SET status = 'reserved', request_id = t.request_id,"
           "  line_no = t.line_no, updated_at = now() FROM pick, t WHERE a.asset_id = pick.asset_id"
           "  RETURNING a.asset_id, a.site_id, t.request_id, t.person_id),"
           " h AS (INSERT INTO asset_history (asset_id, status, person_id, request_id, note)"
           "  SELECT asset_id, 'reserved', person_id, request_id, 'reserved for the request' FROM res)"
           " UPDATE tasks SET asset_id = res.asset_id, site_id = res.site_id, step = 'queued',"
           "  updated_at = now() FROM res WHERE tasks.seq = $1::bigint"
           " RETURNING res.site_id, tasks.asset_model",
           pick_sql);
  qm_pg_param_t p[] = {QM_PG_INT64(seq), QM_PG_INT64(prefer)};
  return qm_pg_exec(tx, sql, p, 2, res, errstr, errstr_size);
}

int ff_task_reserve(ff_t *ff, qm_pg_t *tx, int64_t seq, int64_t prefer_asset, bool do_backorder,
                    bool *reserved, char *errstr, size_t errstr_size) {
  *reserved = false;
  /* The preferred asset (a failed delivery coming back), then the serving
   * site's stock, then any central site's. */
  static const char *const picks[] = {
      "a.asset_id = $2::bigint",
      "a.site_id = t.site_id ORDER BY a.model_id, a.site_id, a.asset_id",
      "a.site_id IN (SELECT site_id FROM sites WHERE kind = 'central')"
      " ORDER BY a.model_id, a.site_id, a.asset_id",
  };
  qm_pg_result_t *res = NULL;
  int rc = QM_OK;
  for (size_t i = prefer_asset > 0 ? 0 : 1; i < QM_ARRAY_LEN(picks); i++) {
    rc = take_asset(tx, seq, prefer_asset, picks[i], &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    if (qm_pg_ntuples(res) == 1) break;
    qm_pg_result_destroy(res);
    res = NULL;
  }
  if (res) {
    char site[130], model[130];
    qm_strlcpy(site, qm_pg_get(res, 0, 0), sizeof(site));
    qm_strlcpy(model, qm_pg_get(res, 0, 1), sizeof(model));
    qm_pg_result_destroy(res);
    *reserved = true;
    rc = emit_task(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_RESERVED,
                   "asset reserved; queued for staging", NULL, errstr, errstr_size);
    if (rc == QM_OK) rc = ff_emit_stock(ff, tx, model, site, NULL, errstr, errstr_size);
    if (rc == QM_OK)
      qm_metrics_inc(qm_metrics_child(ff->m_reservations, (const char *const[]){"reserved", NULL}));
    return rc;
  }
  if (!do_backorder) return QM_OK;
  return backorder(ff, tx, seq, errstr, errstr_size);
}

int ff_person_left(qm_pg_t *tx, const char *person_id, char *date, size_t date_size, bool *left,
                   char *errstr, size_t errstr_size) {
  *left = false;
  if (date_size) date[0] = 0;
  char key[200];
  snprintf(key, sizeof(key), "qm-fulfillment-person:%s", person_id);
  qm_pg_param_t k[] = {QM_PG_INT64(qm_pg_advisory_key(key))};
  int rc = qm_pg_exec(tx, "SELECT pg_advisory_xact_lock($1::bigint)", k, 1, NULL, errstr,
                      errstr_size);
  if (rc != QM_OK) return rc;
  /* A statement of its own, after the lock: its snapshot sees a leaver
   * recorded by the transaction we may have waited on. */
  qm_pg_param_t p[] = {QM_PG_TEXT(person_id)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx, "SELECT coalesce(effective_date::text, '') FROM leavers WHERE person_id = $1",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 1) {
    *left = true;
    if (date_size) qm_strlcpy(date, qm_pg_get(res, 0, 0), date_size);
  }
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Inserts the task of line l (once): state open at step new, or cancelled
 * at step cancelled. *seq receives it, 0 when the line has a task already.
 * item_type NULL: the model's. */
static int insert_task(qm_pg_t *tx, const ff_line_t *l, const char *item_type, const char *site,
                       const char *team, const char *route, int64_t due, bool cancelled,
                       int64_t *seq, char *errstr, size_t errstr_size) {
  *seq = 0;
  qm_pg_param_t q[] = {QM_PG_TEXT(l->request_id),  QM_PG_INT64(l->line_no),
                       QM_PG_TEXT(l->person_id),   QM_PG_TEXT(l->item_id ? l->item_id : ""),
                       QM_PG_TEXT(l->model_id),    QM_PG_TEXT(l->country ? l->country : ""),
                       QM_PG_TEXT(l->location ? l->location : ""), QM_PG_TEXT(item_type),
                       QM_PG_TEXT(site),           QM_PG_TEXT(team),
                       QM_PG_TEXT(route),          QM_PG_INT64(due),
                       QM_PG_TEXT(l->traceparent), QM_PG_TEXT(cancelled ? "cancelled" : "open"),
                       QM_PG_TEXT(cancelled ? "cancelled" : "new")};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "INSERT INTO tasks (request_id, line_no, person_id, item_id, asset_model,"
                      " country, location, item_type, site_id, team, route, sla_due_ms,"
                      " traceparent, state, step)"
                      " VALUES ($1, $2::int, $3, $4, $5, $6, $7,"
                      " coalesce($8, (SELECT item_type FROM models WHERE model_id = $5)),"
                      " $9, $10, $11, $12::bigint, $13, $14, $15)"
                      " ON CONFLICT (request_id, line_no) DO NOTHING RETURNING seq",
                      q, QM_ARRAY_LEN(q), &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 1) qm_pg_get_int64(res, 0, 0, seq);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* The line of a person who has left: its task is recorded cancelled (so a
 * repeat of the line is "exists") and CANCELLED published; nothing is
 * reserved or ordered. */
static int open_cancelled(ff_t *ff, qm_pg_t *tx, const ff_line_t *l, const char *left_on,
                          int64_t *task_seq, const char **outcome, char *errstr,
                          size_t errstr_size) {
  int64_t seq = 0;
  int rc = insert_task(tx, l, NULL, NULL, NULL, NULL, 0, true, &seq, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (seq == 0) {
    if (outcome) *outcome = "exists";
    return QM_OK;
  }
  char note[120];
  snprintf(note, sizeof(note), "cancelled: the person left%s%s", left_on[0] ? " on " : "",
           left_on);
  rc = emit_task(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CANCELLED, note, NULL,
                 errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (task_seq) *task_seq = seq;
  if (outcome) *outcome = "cancelled";
  qm_log(QM_LOG_INFO, l->request_id, NULL, "line %d (%s for %s): cancelled, the person left",
         l->line_no, l->model_id, l->person_id);
  return QM_OK;
}

int ff_task_open(ff_t *ff, qm_pg_t *tx, const ff_line_t *l, int64_t *task_seq,
                 const char **outcome, char *errstr, size_t errstr_size) {
  /* A person who has left gets nothing (checked under the person's lock,
   * which ff_leaver takes too, so a line and a leaver racing are ordered). */
  char left_on[16];
  bool left = false;
  int rc = ff_person_left(tx, l->person_id, left_on, sizeof(left_on), &left, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (left) return open_cancelled(ff, tx, l, left_on, task_seq, outcome, errstr, errstr_size);
  /* Route by the model and the person's location: the site that serves the
   * location (a regional one that lists it, else a central one in the
   * country, else any central one); its kind names the staging team;
   * high-value or complex models get an on-site appointment. */
  qm_pg_param_t p[] = {QM_PG_TEXT(l->model_id), QM_PG_TEXT(l->location ? l->location : ""),
                       QM_PG_TEXT(l->country ? l->country : "")};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(
      tx,
      "SELECT m.item_type, m.cost::float8, m.complex, s.site_id,"
      " CASE WHEN s.kind = 'regional' AND $2 = ANY (s.locations) THEN 'regional' ELSE 'central' END,"
      " m.loaner FROM models m LEFT JOIN LATERAL (SELECT site_id, kind, locations FROM sites"
      "  ORDER BY ($2 = ANY (locations)) DESC, (kind = 'central' AND country = $3) DESC,"
      "  (kind = 'central') DESC, site_id LIMIT 1) s ON true WHERE m.model_id = $1",
      p, 3, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) != 1 || qm_pg_is_null(res, 0, 3)) {
    bool model = qm_pg_ntuples(res) == 1;
    qm_pg_result_destroy(res);
    return model ? qm_err(errstr, errstr_size, QM_EINVAL, "no site is configured")
                 : qm_err(errstr, errstr_size, QM_EINVAL, "unknown model '%s'", l->model_id);
  }
  if (!strcmp(qm_pg_get(res, 0, 5), "t")) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "'%s' is a loaner model: book it with POST /v1/loans", l->model_id);
  }
  char item_type[64], site[130], team[16];
  qm_strlcpy(item_type, qm_pg_get(res, 0, 0), sizeof(item_type));
  double cost = strtod(qm_pg_get(res, 0, 1), NULL);
  bool complex = !strcmp(qm_pg_get(res, 0, 2), "t");
  qm_strlcpy(site, qm_pg_get(res, 0, 3), sizeof(site));
  qm_strlcpy(team, qm_pg_get(res, 0, 4), sizeof(team));
  qm_pg_result_destroy(res);
  const char *route = (complex || (ff->onsite_value > 0 && cost >= ff->onsite_value)) ? "onsite"
                                                                                      : "ship";
  int64_t sla = ff_sla_ms(ff, item_type);
  int64_t due = sla > 0 ? qm_now_ms() + sla : 0;
  int64_t seq = 0;
  rc = insert_task(tx, l, item_type, site, team, route, due, false, &seq, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (seq == 0) {
    if (outcome) *outcome = "exists";
    return QM_OK;
  }
  if (due > 0) {
    char owner[40];
    snprintf(owner, sizeof(owner), "task:%lld", (long long)seq);
    rc = qm_timer_add(tx, "timers", "sla", owner, NULL, 0, due, NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  bool reserved = false;
  rc = ff_task_reserve(ff, tx, seq, 0, true, &reserved, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (task_seq) *task_seq = seq;
  if (outcome) *outcome = reserved ? "reserved" : "backordered";
  qm_log(QM_LOG_INFO, l->request_id, NULL, "line %d (%s for %s): %s, team %s, route %s",
         l->line_no, l->model_id, l->person_id, reserved ? "reserved" : "backordered", team, route);
  return QM_OK;
}

int ff_allocate_backorders(ff_t *ff, qm_pg_t *tx, const char *model_id, const char *po_id,
                           char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(model_id), QM_PG_TEXT(po_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT seq FROM tasks WHERE asset_model = $1 AND step = 'backordered'"
                      " AND state = 'open' ORDER BY (po_id IS NOT DISTINCT FROM $2) DESC, seq"
                      " LIMIT 200 FOR UPDATE SKIP LOCKED",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t seq = 0;
    bool got = false;
    qm_pg_get_int64(res, i, 0, &seq);
    rc = ff_task_reserve(ff, tx, seq, 0, false, &got, errstr, errstr_size);
    if (rc == QM_OK && !got) break;
  }
  qm_pg_result_destroy(res);
  return rc;
}

int ff_task_close(ff_t *ff, qm_pg_t *tx, int64_t seq, const char *state, char *errstr,
                  size_t errstr_size) {
  QM_UNUSED(ff);
  qm_pg_param_t p[] = {QM_PG_INT64(seq), QM_PG_TEXT(state)};
  int rc = qm_pg_exec(tx,
                      "UPDATE tasks SET state = $2, updated_at = now() WHERE seq = $1::bigint",
                      p, 2, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char owner[40];
  snprintf(owner, sizeof(owner), "task:%lld", (long long)seq);
  return qm_timer_cancel_owner(tx, "timers", owner, NULL, NULL, errstr, errstr_size);
}

int ff_task_ship(ff_t *ff, qm_pg_t *tx, int64_t seq, char *errstr, size_t errstr_size) {
  QM_UNUSED(ff);
  qm_pg_param_t p[] = {QM_PG_INT64(seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE tasks t SET step = 'shipping', shipments = shipments + 1,"
                      " tracking_number = NULL, label_url = NULL, updated_at = now()"
                      " FROM assets a WHERE t.seq = $1::bigint AND a.asset_id = t.asset_id"
                      " RETURNING t.request_id, t.line_no, t.person_id, t.country, t.location,"
                      " a.tag, a.serial, t.asset_model, t.site_id, t.shipments",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) != 1) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_ECONFLICT, "task %lld has no reserved asset to ship",
                  (long long)seq);
  }
  int64_t line_no = 0, n = 0;
  qm_pg_get_int64(res, 0, 1, &line_no);
  qm_pg_get_int64(res, 0, 9, &n);
  char ref[64];
  snprintf(ref, sizeof(ref), "task-%lld-%lld", (long long)seq, (long long)n);
  json_t *body = json_pack(
      "{s:s, s:s, s:I, s:{s:s, s:s, s:s}, s:{s:s}, s:{s:s, s:s, s:s}}", "reference", ref,
      "request_id", qm_pg_get(res, 0, 0), "line_no", (json_int_t)line_no, "recipient",
      "person_id", qm_pg_get(res, 0, 2), "country", qm_pg_get(res, 0, 3), "location",
      qm_pg_get(res, 0, 4), "origin", "site_id", qm_pg_get(res, 0, 8), "item", "asset_tag",
      qm_pg_get(res, 0, 5), "serial", qm_pg_get(res, 0, 6), "model_id", qm_pg_get(res, 0, 7));
  qm_pg_result_destroy(res);
  return ff_outbound_add(tx, "shipment", ref, body, errstr, errstr_size);
}

json_t *ff_task_json(qm_pg_t *pg, int64_t seq, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(seq)};
  qm_pg_result_t *res = NULL;
  if (qm_pg_exec(pg,
                 "SELECT json_build_object('id', t.seq, 'request_id', t.request_id, 'line_no',"
                 " t.line_no, 'person_id', t.person_id, 'item_id', t.item_id, 'model_id',"
                 " t.asset_model, 'item_type', t.item_type, 'country', t.country, 'location',"
                 " t.location, 'state', t.state, 'step', t.step, 'site_id', t.site_id, 'team',"
                 " t.team, 'route', t.route, 'asset_tag', a.tag, 'serial', a.serial,"
                 " 'purchase_order_id', t.po_id, 'purchase_order_status', po.status,"
                 " 'estimated_delivery_ms', coalesce(nullif(t.eta_ms, 0), po.eta_ms),"
                 " 'carrier', t.carrier, 'tracking_number', t.tracking_number, 'label_url',"
                 " t.label_url, 'appointment_ms', nullif(t.appointment_ms, 0), 'sla_due_ms',"
                 " nullif(t.sla_due_ms, 0), 'sla_breached', t.sla_breached, 'created_at',"
                 " t.created_at, 'updated_at', t.updated_at)::text"
                 " FROM tasks t LEFT JOIN assets a ON a.asset_id = t.asset_id"
                 " LEFT JOIN purchase_orders po ON po.po_id = t.po_id WHERE t.seq = $1::bigint",
                 p, 1, &res, errstr, errstr_size) != QM_OK)
    return NULL;
  json_t *j = NULL;
  if (qm_pg_ntuples(res) == 1) j = json_loads(qm_pg_get(res, 0, 0), 0, NULL);
  qm_pg_result_destroy(res);
  if (!j) qm_err(errstr, errstr_size, QM_ENOTFOUND, "no task %lld", (long long)seq);
  return j;
}

int ff_leaver(ff_t *ff, qm_pg_t *tx, const char *person_id, const char *effective_date,
              const char *traceparent, int *returns, char *errstr, size_t errstr_size) {
  *returns = 0;
  /* Recorded, under the person's lock: a line approved later is cancelled
   * when it arrives (ff_task_open), an asset in transit gets its return
   * task when it is delivered (the carrier webhook). The first effective
   * date recorded is kept. */
  char left_on[16];
  bool left = false;
  int rc = ff_person_left(tx, person_id, left_on, sizeof(left_on), &left, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t lv[] = {QM_PG_TEXT(person_id), QM_PG_TEXT(effective_date)};
  if (!left)
    rc = qm_pg_exec(tx,
                    "INSERT INTO leavers (person_id, effective_date) VALUES ($1,"
                    " CASE WHEN $2 ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$' THEN $2::date END)"
                    " ON CONFLICT (person_id) DO NOTHING",
                    lv, 2, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  /* Open tasks not yet on their way: cancelled, their assets back to stock.
   * Those shipping or shipped are left to arrive: the delivery opens their
   * return task at once. */
  qm_pg_param_t p[] = {QM_PG_TEXT(person_id)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                      "SELECT seq, coalesce(asset_id, 0), asset_model, coalesce(site_id, '')"
                      " FROM tasks WHERE person_id = $1 AND state = 'open'"
                      " AND step NOT IN ('shipping', 'shipped') ORDER BY seq FOR UPDATE",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    int64_t seq = 0, asset = 0;
    qm_pg_get_int64(res, i, 0, &seq);
    qm_pg_get_int64(res, i, 1, &asset);
    rc = emit_task(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CANCELLED,
                   "cancelled: the person left", NULL, errstr, errstr_size);
    if (rc == QM_OK && asset > 0)
      rc = ff_asset_set(tx, asset, "in_stock", NULL, NULL, 0, NULL, "released: the person left",
                        errstr, errstr_size);
    qm_pg_param_t q[] = {QM_PG_INT64(seq)};
    if (rc == QM_OK)
      rc = qm_pg_exec(tx,
                      "UPDATE tasks SET asset_id = NULL, step = 'cancelled' WHERE seq = $1::bigint",
                      q, 1, NULL, errstr, errstr_size);
    if (rc == QM_OK) rc = ff_task_close(ff, tx, seq, "cancelled", errstr, errstr_size);
    if (rc == QM_OK && asset > 0)
      rc = ff_emit_stock(ff, tx, qm_pg_get(res, i, 2), qm_pg_get(res, i, 3), traceparent, errstr,
                         errstr_size);
  }
  qm_pg_result_destroy(res);
  res = NULL;
  if (rc != QM_OK) return rc;
  /* Every asset they hold gets a return task (once). */
  qm_pg_param_t q[] = {QM_PG_TEXT(person_id), QM_PG_TEXT(effective_date)};
  rc = qm_pg_exec(tx,
                  /* Locked, so a return scan committing meanwhile is seen (the
                   * row re-checked) instead of opening a second return. */
                  "WITH held AS (SELECT asset_id, assigned_to, request_id, line_no FROM assets"
                  "  WHERE assigned_to = $1 AND status = 'assigned' FOR UPDATE)"
                  " INSERT INTO returns (asset_id, person_id, request_id, line_no, reason, due_date)"
                  " SELECT asset_id, assigned_to, request_id, line_no, 'leaver',"
                  "  coalesce(nullif($2, '')::date, current_date) FROM held"
                  " ON CONFLICT (asset_id) WHERE state = 'open' DO NOTHING"
                  " RETURNING return_id, asset_id, coalesce(request_id, ''), coalesce(line_no, 0)",
                  q, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    qm_pg_param_t a[] = {QM_PG_TEXT(qm_pg_get(res, i, 1))};
    qm_pg_result_t *ar = NULL;
    rc = qm_pg_exec(tx,
                    "SELECT a.tag, a.serial, a.model_id, a.site_id, m.item_type FROM assets a"
                    " JOIN models m USING (model_id) WHERE a.asset_id = $1::bigint",
                    a, 1, &ar, errstr, errstr_size);
    if (rc != QM_OK) break;
    char note[96];
    snprintf(note, sizeof(note), "return task %s opened: the holder leaves", qm_pg_get(res, i, 0));
    int64_t line_no = 0;
    qm_pg_get_int64(res, i, 3, &line_no);
    Qm__V1__FulfillmentUpdate u = QM__V1__FULFILLMENT_UPDATE__INIT;
    u.request_id = (char *)qm_pg_get(res, i, 2);
    u.line_no = (int32_t)line_no;
    u.subject_person_id = (char *)person_id;
    u.step = QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_RETURN_REQUESTED;
    u.asset_tag = (char *)qm_pg_get(ar, 0, 0);
    u.serial = (char *)qm_pg_get(ar, 0, 1);
    u.model_id = (char *)qm_pg_get(ar, 0, 2);
    u.site_id = (char *)qm_pg_get(ar, 0, 3);
    u.item_type = (char *)qm_pg_get(ar, 0, 4);
    u.note = note;
    rc = ff_emit_update(ff, tx, &u, traceparent, errstr, errstr_size);
    qm_pg_result_destroy(ar);
    (*returns)++;
  }
  qm_pg_result_destroy(res);
  return rc;
}

/* Exposed for api.c and outbound.c through these wrappers. */
int ff_task_emit(ff_t *ff, qm_pg_t *tx, int64_t seq, Qm__V1__FulfillmentStep step,
                 const char *note, const char *actor, char *errstr, size_t errstr_size) {
  return emit_task(ff, tx, seq, step, note, actor, errstr, errstr_size);
}
