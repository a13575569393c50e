/*
 * readmodel: each request's status and timeline, built from every service's
 * events. Events of different topics may arrive in any order (a grant can be
 * read before the approval that caused it), so a line's status only ever
 * moves forward (line_rank() in the schema), and the timeline is ordered by
 * the events' own times.
 */
#include "intake.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_metrics.h"
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/fulfillment.pb-c.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int readmodel_timeline(qm_pg_t *tx, const char *request_id, int line_no, int64_t at_ms,
                       const char *type, const char *event_id, const char *actor,
                       const char *summary, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(request_id), QM_PG_INT64(line_no), QM_PG_INT64(at_ms),
                       QM_PG_TEXT(type),       QM_PG_TEXT(event_id), QM_PG_TEXT(actor ? actor : ""),
                       QM_PG_TEXT(summary)};
  return qm_pg_exec(tx,
                    "INSERT INTO timeline (request_id, line_no, at_ms, type, event_id, actor, summary)"
                    " SELECT $1, $2::int, $3::bigint, $4, $5, $6, $7"
                    " WHERE EXISTS (SELECT 1 FROM requests WHERE id = $1)",
                    p, QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
}

int readmodel_recompute(qm_pg_t *tx, const char *request_id, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(request_id)};
  return qm_pg_exec(
      tx,
      "UPDATE requests r SET status = s.status, updated_at = now() FROM ("
      " SELECT CASE"
      "  WHEN bool_and(status = 'cancelled') THEN 'cancelled'"
      "  WHEN bool_or(status IN ('submitted', 'pending_approval')) THEN 'pending_approval'"
      "  WHEN bool_or(status IN ('approved', 'fulfilling')) THEN 'in_progress'"
      "  WHEN bool_and(status = 'granted') THEN 'granted'"
      "  WHEN bool_and(status IN ('granted', 'fulfilled', 'cancelled')) THEN 'completed'"
      "  WHEN bool_and(status = 'rejected') THEN 'rejected'"
      "  WHEN bool_or(status = 'failed') THEN 'failed'"
      "  WHEN bool_and(status IN ('revoked', 'expired')) THEN 'ended'"
      "  ELSE 'partially_completed' END AS status"
      " FROM request_lines WHERE request_id = $1) s"
      " WHERE r.id = $1 AND s.status IS NOT NULL AND r.status IS DISTINCT FROM s.status",
      p, 1, NULL, errstr, errstr_size);
}

/* Moves a line forward to status (never back), with who it waits on (a JSON
 * array of person ids; NULL for nobody). */
static int set_line(intake_t *in, qm_pg_t *tx, const char *request_id, int line_no,
                    const char *status, const char *waiting_on_json, int64_t expires_at_ms,
                    char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(request_id), QM_PG_INT64(line_no), QM_PG_TEXT(status),
                       QM_PG_TEXT(waiting_on_json ? waiting_on_json : "[]"),
                       QM_PG_INT64(expires_at_ms)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                    "UPDATE request_lines SET status = $3,"
                    " waiting_on = ARRAY(SELECT json_array_elements_text($4::json)),"
                    " expires_at_ms = CASE WHEN $5::bigint > 0 THEN $5::bigint ELSE expires_at_ms END,"
                    " updated_at = now()"
                    " WHERE request_id = $1 AND line_no = $2::int AND line_rank(status) < line_rank($3)"
                    " RETURNING extract(epoch FROM clock_timestamp() -"
                    "  (SELECT created_at FROM requests WHERE id = $1))::float8",
                    p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  /* Time from submit to decision and to completion (counted when the line
   * first reaches the state; a batch rolled back and retried may count twice). */
  if (qm_pg_ntuples(res) == 1) {
    double secs = strtod(qm_pg_get(res, 0, 0), NULL);
    if (!strcmp(status, "approved") || !strcmp(status, "rejected"))
      qm_metrics_observe(qm_metrics_child(in->m_decision, NULL), secs);
    else if (!strcmp(status, "granted") || !strcmp(status, "fulfilled"))
      qm_metrics_observe(qm_metrics_child(in->m_completion, NULL), secs);
  }
  qm_pg_result_destroy(res);
  return QM_OK;
}

static const char *actor_name(const Qm__V1__Actor *a) {
  if (!a) return "";
  if (a->person_id && a->person_id[0]) return a->person_id;
  return a->service && a->service[0] ? a->service : "";
}

/* The common end of every handler: the event's timeline entry, then the
 * request's status from its lines. */
static int record(qm_pg_t *tx, const qm_event_in_t *ev, const char *rid, int line_no,
                  const char *actor, const char *summary, char *errstr, size_t errstr_size) {
  int rc = readmodel_timeline(tx, rid, line_no, ev->meta.time_ms, ev->meta.type, ev->meta.id,
                              actor, summary, errstr, errstr_size);
  return rc == QM_OK ? readmodel_recompute(tx, rid, errstr, errstr_size) : rc;
}

static int on_decision(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr, size_t errstr_size) {
  Qm__V1__DecisionEvent *de = qm__v1__decision_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!de)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.DecisionEvent",
                  ev->meta.type);
  int rc = QM_OK;
  char summary[600] = "";
  const char *rid = NULL, *actor = "";
  int line_no = 0;
  switch (de->event_case) {
  case QM__V1__DECISION_EVENT__EVENT_STEP_PENDING: {
    Qm__V1__ApprovalStepPending *sp = de->step_pending;
    rid = sp->request_id;
    line_no = sp->line_no;
    json_t *ids = json_array();
    for (size_t i = 0; i < sp->n_approver_ids; i++)
      json_array_append_new(ids, json_string(sp->approver_ids[i]));
    char *waiting = json_dumps(ids, JSON_COMPACT);
    json_decref(ids);
    snprintf(summary, sizeof(summary), "line %d waiting for approval by %s", line_no,
             sp->n_approver_ids ? sp->approver_ids[0] : "(nobody)");
    rc = set_line(in, tx, rid, line_no, "pending_approval", waiting, 0, errstr, errstr_size);
    free(waiting);
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED: {
    Qm__V1__ApprovalStepDecided *sd = de->step_decided;
    rid = sd->request_id;
    line_no = sd->line_no;
    actor = actor_name(sd->decided_by);
    snprintf(summary, sizeof(summary), "line %d %s by %s%s%s%s", line_no,
             sd->approved ? "approved" : "denied", actor, sd->break_glass ? " (break-glass)" : "",
             sd->comment[0] ? ": " : "", sd->comment);
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_APPROVED: {
    Qm__V1__RequestApproved *ap = de->approved;
    rid = ap->request_id;
    line_no = ap->line ? ap->line->line_no : 0;
    bool automatic = ap->n_approvers == 1 && !ap->approvers[0]->person_id[0];
    actor = ap->n_approvers ? actor_name(ap->approvers[ap->n_approvers - 1]) : "";
    snprintf(summary, sizeof(summary), "line %d approved %s%s", line_no,
             automatic ? "automatically (standard risk)" : "by ", automatic ? "" : actor);
    rc = set_line(in, tx, rid, line_no, "approved", NULL, 0, errstr, errstr_size);
    break;
  }
  case QM__V1__DECISION_EVENT__EVENT_REJECTED: {
    Qm__V1__RequestRejected *rj = de->rejected;
    rid = rj->request_id;
    line_no = rj->line_no;
    actor = actor_name(rj->rejected_by);
    snprintf(summary, sizeof(summary), "line %d rejected by %s: %s", line_no, actor, rj->reason);
    rc = set_line(in, tx, rid, line_no, "rejected", NULL, 0, errstr, errstr_size);
    break;
  }
  default:
    break;
  }
  if (rc == QM_OK && rid && rid[0])
    rc = record(tx, ev, rid, line_no, actor, summary, errstr, errstr_size);
  qm__v1__decision_event__free_unpacked(de, NULL);
  return rc;
}

static int on_access(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr, size_t errstr_size) {
  Qm__V1__AccessEvent *ae = qm__v1__access_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!ae)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.AccessEvent",
                  ev->meta.type);
  int rc = QM_OK;
  char summary[600] = "";
  const char *rid = NULL, *actor = "";
  int line_no = 0;
  switch (ae->event_case) {
  case QM__V1__ACCESS_EVENT__EVENT_GRANTED: {
    Qm__V1__AccessGranted *g = ae->granted;
    rid = g->request_id;
    line_no = g->line_no;
    char exp[40] = "no expiry";
    if (g->expires_at_ms > 0) qm_time_format_rfc3339(g->expires_at_ms, exp, sizeof(exp));
    snprintf(summary, sizeof(summary), "line %d granted: %s added to %s via %s (expires: %s)",
             line_no, g->subject_person_id, g->group, g->connector, exp);
    rc = set_line(in, tx, rid, line_no, "granted", NULL, g->expires_at_ms, errstr, errstr_size);
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_FAILED: {
    Qm__V1__ProvisioningFailed *f = ae->failed;
    rid = f->request_id;
    line_no = f->line_no;
    snprintf(summary, sizeof(summary), "line %d provisioning failed after %d attempt(s): %s",
             line_no, f->attempts, f->error);
    rc = set_line(in, tx, rid, line_no, "failed", NULL, 0, errstr, errstr_size);
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_REVOKED: {
    Qm__V1__AccessRevoked *r = ae->revoked;
    rid = r->request_id;
    actor = actor_name(r->actor);
    snprintf(summary, sizeof(summary), "access to %s revoked (%s)", r->group, r->reason);
    qm_pg_param_t p[] = {QM_PG_TEXT(rid), QM_PG_TEXT(r->item_id), QM_PG_TEXT(r->role_id),
                         QM_PG_TEXT(!strcmp(r->reason, "expired") ? "expired" : "revoked")};
    rc = qm_pg_exec(tx,
                    "UPDATE request_lines SET status = $4, updated_at = now() WHERE request_id = $1"
                    " AND item_id = $2 AND role_id = $3 AND line_rank(status) < line_rank($4)",
                    p, 4, NULL, errstr, errstr_size);
    break;
  }
  case QM__V1__ACCESS_EVENT__EVENT_EXPIRY_NOTICE: {
    Qm__V1__ExpiryNotice *n = ae->expiry_notice;
    rid = n->request_id;
    char exp[40];
    qm_time_format_rfc3339(n->expires_at_ms, exp, sizeof(exp));
    snprintf(summary, sizeof(summary), "access to %s/%s expires at %s", n->item_id, n->role_id, exp);
    break;
  }
  default:
    break;
  }
  if (rc == QM_OK && rid && rid[0])
    rc = record(tx, ev, rid, line_no, actor, summary, errstr, errstr_size);
  qm__v1__access_event__free_unpacked(ae, NULL);
  return rc;
}

static int on_fulfillment(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr, size_t errstr_size) {
  Qm__V1__FulfillmentEvent *fe = qm__v1__fulfillment_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!fe)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.FulfillmentEvent",
                  ev->meta.type);
  int rc = QM_OK;
  if (fe->event_case == QM__V1__FULFILLMENT_EVENT__EVENT_STOCK_LEVEL) {
    /* The latest stock per model and site, for the catalog's availability. */
    Qm__V1__StockLevel *sl = fe->stock_level;
    qm_pg_param_t p[] = {QM_PG_TEXT(sl->model_id), QM_PG_TEXT(sl->site_id),
                         QM_PG_INT64(sl->available), QM_PG_INT64(sl->on_order),
                         QM_PG_INT64(sl->estimated_delivery_at_ms)};
    rc = qm_pg_exec(tx,
                    "INSERT INTO stock (model_id, site_id, available, on_order, eta_ms)"
                    " VALUES ($1, $2, $3::int, $4::int, $5::bigint) ON CONFLICT (model_id, site_id)"
                    " DO UPDATE SET available = EXCLUDED.available, on_order = EXCLUDED.on_order,"
                    " eta_ms = EXCLUDED.eta_ms, updated_at = now()",
                    p, 5, NULL, errstr, errstr_size);
  }
  if (fe->event_case == QM__V1__FULFILLMENT_EVENT__EVENT_UPDATE && fe->update->request_id[0]) {
    Qm__V1__FulfillmentUpdate *u = fe->update;
    const ProtobufCEnumValue *step = protobuf_c_enum_descriptor_get_value(&qm__v1__fulfillment_step__descriptor, (int)u->step);
    char summary[600];
    snprintf(summary, sizeof(summary), "line %d: %s%s%s%s%s", u->line_no,
             step ? step->name : "step", u->asset_tag[0] ? " asset " : "", u->asset_tag,
             u->note[0] ? " — " : "", u->note);
    const char *status = u->step == QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CHECKED_OUT ? "fulfilled"
                         : u->step == QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CANCELLED ? "cancelled"
                                                                                           : "fulfilling";
    rc = set_line(in, tx, u->request_id, u->line_no, status, NULL, 0, errstr, errstr_size);
    if (rc == QM_OK)
      rc = record(tx, ev, u->request_id, u->line_no, u->actor_person_id, summary, errstr,
                  errstr_size);
  }
  qm__v1__fulfillment_event__free_unpacked(fe, NULL);
  return rc;
}

int readmodel_on_event(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size) {
  if (qm_service_topic_is(in->svc, ev->topic, QM_TOPIC_DECISIONS))
    return on_decision(in, tx, ev, errstr, errstr_size);
  if (qm_service_topic_is(in->svc, ev->topic, QM_TOPIC_ACCESS))
    return on_access(in, tx, ev, errstr, errstr_size);
  if (qm_service_topic_is(in->svc, ev->topic, QM_TOPIC_FULFILLMENT))
    return on_fulfillment(in, tx, ev, errstr, errstr_size);
  return QM_OK;
}
