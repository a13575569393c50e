/*
 * qm-approval: decides who must say yes to each request line.
 *
 * This first version implements the automatic path end to end — a standard-
 * risk line whose catalog role allows it is approved at once — and, for every
 * other line, records a pending step for the approver the policy names
 * (manager for standard, app owner for sensitive and elevated) and publishes
 * ApprovalStepPending. Deciding those steps (inbox, delegation, timers,
 * break-glass) is the approval issue's work. Cancelled requests close their
 * open steps.
 */
#include "qm_common.h"
#include "qm_log.h"
#include "qm_service.h"
#include "qm_topics.h"

#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const qm_migration_t migrations[] = {
    {2, "approval lines and steps",
     "CREATE TABLE approval_lines ("
     " request_id text NOT NULL,"
     " line_no int NOT NULL,"
     " subject_person_id text NOT NULL,"
     " requester_id text NOT NULL,"
     " item_id text NOT NULL,"
     " role_id text NOT NULL DEFAULT '',"
     " risk text NOT NULL,"
     " status text NOT NULL CHECK (status IN ('pending','approved','rejected','cancelled')),"
     " submitted bytea NOT NULL,"
     " decided_at timestamptz,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (request_id, line_no));"
     "CREATE TABLE approval_steps ("
     " step_id text PRIMARY KEY,"
     " request_id text NOT NULL,"
     " line_no int NOT NULL,"
     " stage int NOT NULL,"
     " kind text NOT NULL,"
     " approver_ids text[] NOT NULL,"
     " status text NOT NULL CHECK (status IN ('pending','approved','rejected','cancelled')),"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " decided_at timestamptz,"
     " FOREIGN KEY (request_id, line_no) REFERENCES approval_lines);"
     "CREATE INDEX approval_steps_open ON approval_steps (request_id) WHERE status = 'pending';"},
};

static const char *risk_name(Qm__V1__Risk r) {
  switch (r) {
  case QM__V1__RISK__RISK_STANDARD: return "standard";
  case QM__V1__RISK__RISK_SENSITIVE: return "sensitive";
  case QM__V1__RISK__RISK_ELEVATED: return "elevated";
  default: return "unspecified";
  }
}

/* Automatic approval of one line: the decision is the approval service's own. */
static int approve_automatically(qm_service_t *svc, qm_pg_t *tx, const qm_event_in_t *ev,
                                 const Qm__V1__RequestSubmitted *rs, Qm__V1__RequestLine *line,
                                 char *errstr, size_t errstr_size) {
  Qm__V1__Actor auto_actor = QM__V1__ACTOR__INIT;
  auto_actor.service = (char *)"approval";
  Qm__V1__Actor *approvers[] = {&auto_actor};
  Qm__V1__RequestApproved ap = QM__V1__REQUEST_APPROVED__INIT;
  ap.request_id = rs->request_id;
  ap.line = line;
  ap.subject_person_id = rs->subject_person_id;
  ap.subject_directory_username = rs->subject_directory_username;
  ap.n_approvers = 1;
  ap.approvers = approvers;
  ap.grant_duration_days = line->duration_days;
  ap.approved_at_ms = qm_now_ms();
  ap.requester = rs->requester;
  ap.extends_request_id = rs->extends_request_id;
  ap.subject_country = rs->subject_country;
  ap.subject_location = rs->subject_location;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &ap;
  return qm_service_emit(svc, tx, QM_TOPIC_DECISIONS, rs->subject_person_id,
                         "qm.request.approved.v1", rs->request_id, ev->meta.traceparent,
                         &de.base, NULL, errstr, errstr_size);
}

/* A human step: recorded, and announced so the approver's inbox shows it. */
static int open_step(qm_service_t *svc, qm_pg_t *tx, const qm_event_in_t *ev,
                     const Qm__V1__RequestSubmitted *rs, const Qm__V1__RequestLine *line,
                     char *errstr, size_t errstr_size) {
  Qm__V1__StepKind kind;
  const char *approver;
  const char *kind_name;
  if (line->risk == QM__V1__RISK__RISK_STANDARD) {
    kind = QM__V1__STEP_KIND__STEP_KIND_MANAGER;
    kind_name = "manager";
    approver = rs->subject_manager_id;
  } else {
    kind = QM__V1__STEP_KIND__STEP_KIND_APP_OWNER;
    kind_name = "app_owner";
    approver = line->owner_id;
  }
  char step_id[QM_UUID_STR_LEN];
  qm_uuid_new(step_id);
  char line_no[16];
  snprintf(line_no, sizeof(line_no), "%d", line->line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(step_id), QM_PG_TEXT(rs->request_id), QM_PG_TEXT(line_no),
                       QM_PG_TEXT(kind_name), QM_PG_TEXT(approver)};
  int rc = qm_pg_exec(tx,
                      "INSERT INTO approval_steps (step_id, request_id, line_no, stage, kind,"
                      " approver_ids, status) VALUES ($1, $2, $3::int, 1, $4, ARRAY[$5::text], 'pending')",
                      p, 5, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char *ids[] = {(char *)approver};
  Qm__V1__ApprovalStepPending sp = QM__V1__APPROVAL_STEP_PENDING__INIT;
  sp.request_id = rs->request_id;
  sp.line_no = line->line_no;
  sp.step_id = step_id;
  sp.stage = 1;
  sp.kind = kind;
  sp.n_approver_ids = 1;
  sp.approver_ids = ids;
  sp.subject_person_id = rs->subject_person_id;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_STEP_PENDING;
  de.step_pending = &sp;
  return qm_service_emit(svc, tx, QM_TOPIC_DECISIONS, rs->subject_person_id,
                         "qm.approval.step_pending.v1", rs->request_id, ev->meta.traceparent,
                         &de.base, NULL, errstr, errstr_size);
}

static int on_submitted(qm_service_t *svc, qm_pg_t *tx, const qm_event_in_t *ev,
                        const Qm__V1__RequestSubmitted *rs, char *errstr, size_t errstr_size) {
  if (!rs->request_id[0] || !rs->subject_person_id[0] || rs->n_lines == 0)
    return qm_err(errstr, errstr_size, QM_EPOISON,
                  "RequestSubmitted without request_id, subject or lines");
  for (size_t i = 0; i < rs->n_lines; i++) {
    Qm__V1__RequestLine *line = rs->lines[i];
    /* The line as submitted is kept: a later decision re-publishes it. */
    size_t len = qm__v1__request_submitted__get_packed_size(rs);
    uint8_t *buf = qm_malloc(len);
    qm__v1__request_submitted__pack(rs, buf);
    /* Automatic: a standard-risk line the catalog lets through, or a
     * standard-risk birthright line (a joiner's or mover's department bundle). */
    /* A flagged request (e.g. a screening match) always goes to a person. */
    bool automatic = line->risk == QM__V1__RISK__RISK_STANDARD && rs->n_flags == 0 &&
                     (line->auto_approve_allowed || !strcmp(rs->origin, "birthright"));
    char line_no[16];
    snprintf(line_no, sizeof(line_no), "%d", line->line_no);
    const char *requester = rs->requester && rs->requester->person_id ? rs->requester->person_id : "";
    qm_pg_param_t p[] = {QM_PG_TEXT(rs->request_id), QM_PG_TEXT(line_no),
                         QM_PG_TEXT(rs->subject_person_id), QM_PG_TEXT(requester),
                         QM_PG_TEXT(line->item_id), QM_PG_TEXT(line->role_id),
                         QM_PG_TEXT(risk_name(line->risk)),
                         QM_PG_TEXT(automatic ? "approved" : "pending"), QM_PG_BYTES(buf, len)};
    qm_pg_result_t *res = NULL;
    int rc = qm_pg_exec(tx,
                        "INSERT INTO approval_lines (request_id, line_no, subject_person_id,"
                        " requester_id, item_id, role_id, risk, status, submitted, decided_at)"
                        " VALUES ($1, $2::int, $3, $4, $5, $6, $7, $8, $9,"
                        " CASE WHEN $8 = 'approved' THEN now() END)"
                        " ON CONFLICT (request_id, line_no) DO NOTHING",
                        p, 9, &res, errstr, errstr_size);
    free(buf);
    if (rc != QM_OK) return rc;
    int64_t inserted = qm_pg_affected(res);
    qm_pg_result_destroy(res);
    if (inserted == 0) continue; /* the same request seen before under another event id */
    rc = automatic ? approve_automatically(svc, tx, ev, rs, line, errstr, errstr_size)
                   : open_step(svc, tx, ev, rs, line, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    qm_log(QM_LOG_INFO, rs->request_id, NULL, "line %d (%s/%s, %s risk): %s", line->line_no,
           line->item_id, line->role_id, risk_name(line->risk),
           automatic ? "approved automatically" : "waiting for approval");
  }
  return QM_OK;
}

static int on_cancelled(qm_pg_t *tx, const Qm__V1__RequestCancelled *rc_ev, char *errstr,
                        size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(rc_ev->request_id)};
  int rc = qm_pg_exec(tx,
                      "UPDATE approval_steps SET status = 'cancelled', decided_at = now()"
                      " WHERE request_id = $1 AND status = 'pending'",
                      p, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  return qm_pg_exec(tx,
                    "UPDATE approval_lines SET status = 'cancelled', decided_at = now()"
                    " WHERE request_id = $1 AND status = 'pending'",
                    p, 1, NULL, errstr, errstr_size);
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  QM_UNUSED(app);
  Qm__V1__RequestEvent *re =
      qm__v1__request_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!re)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.RequestEvent",
                  ev->meta.type);
  int rc = QM_OK;
  switch (re->event_case) {
  case QM__V1__REQUEST_EVENT__EVENT_SUBMITTED:
    rc = on_submitted(svc, tx, ev, re->submitted, errstr, errstr_size);
    break;
  case QM__V1__REQUEST_EVENT__EVENT_CANCELLED:
    rc = on_cancelled(tx, re->cancelled, errstr, errstr_size);
    break;
  default:
    break; /* revocations are provisioning's */
  }
  qm__v1__request_event__free_unpacked(re, NULL);
  return rc;
}

static const char *const consumes[] = {QM_TOPIC_REQUESTS};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "approval",
      .default_port = 8082,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .uses_redis = true,
  };
  return qm_service_main(argc, argv, &def);
}
