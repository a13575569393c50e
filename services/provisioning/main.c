/*
 * qm-provisioning: turns approved access into real group membership.
 *
 * Exactly once through any crash, in two steps:
 *  1. the consumer, in the same transaction as the inbox claim, records the
 *     grant (state 'pending', unique per request line) and a grant operation;
 *  2. worker threads claim due operations with a lease (FOR UPDATE SKIP
 *     LOCKED), call the directory (idempotent: already a member is success),
 *     then in one transaction move the operation to 'done' — guarded by
 *     "WHERE state = 'pending'", so only one worker can ever finish it — set
 *     the grant active with its clock starting now, and write AccessGranted
 *     to the outbox. A crash anywhere repeats at most the idempotent
 *     directory call; the state change and the event happen once.
 * Transient directory failures are retried with backoff; after the last
 * attempt, or at once for a permanent refusal, the operation is parked as
 * failed and ProvisioningFailed is published.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_scim.h"
#include "qm_service.h"
#include "qm_timer.h"
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const qm_migration_t migrations[] = {
    {2, "grants and grant operations",
     "CREATE TABLE grants ("
     " grant_id text PRIMARY KEY,"
     " seq bigserial UNIQUE,"
     " request_id text NOT NULL,"
     " line_no int NOT NULL,"
     " person_id text NOT NULL,"
     " directory_username text NOT NULL,"
     " item_id text NOT NULL,"
     " role_id text NOT NULL,"
     " grp text NOT NULL,"
     " connector text NOT NULL,"
     " duration_days int NOT NULL DEFAULT 0,"
     " state text NOT NULL CHECK (state IN ('pending','active','failed','revoked')),"
     " directory_user_id text,"
     " directory_group_id text,"
     " granted_at timestamptz,"
     " expires_at timestamptz,"
     " revoked_at timestamptz,"
     " revoke_reason text,"
     " approved bytea NOT NULL,"
     " traceparent text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " updated_at timestamptz NOT NULL DEFAULT now(),"
     " UNIQUE (request_id, line_no));"
     "CREATE INDEX grants_person ON grants (person_id);"
     "CREATE INDEX grants_item ON grants (item_id, role_id);"
     "CREATE INDEX grants_expiry ON grants (expires_at) WHERE state = 'active';"
     "CREATE TABLE grant_ops ("
     " id bigserial PRIMARY KEY,"
     " grant_id text NOT NULL REFERENCES grants,"
     " op text NOT NULL CHECK (op IN ('grant','revoke')),"
     " person_id text NOT NULL,"
     " grp text NOT NULL,"
     " state text NOT NULL CHECK (state IN ('pending','done','failed')),"
     " attempts int NOT NULL DEFAULT 0,"
     " next_attempt_at timestamptz NOT NULL DEFAULT now(),"
     " lease_until timestamptz,"
     " last_error text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " finished_at timestamptz);"
     "CREATE INDEX grant_ops_due ON grant_ops (next_attempt_at, id) WHERE state = 'pending';"
     "CREATE INDEX grant_ops_key ON grant_ops (person_id, grp, id) WHERE state = 'pending';"},
    /* Who holds a lease: the worker's database session. A process killed
     * mid-operation loses its sessions at once, so its leases can be taken
     * over without waiting for them to run out. */
    {3, "lease holder session",
     "ALTER TABLE grant_ops ADD COLUMN lease_pid int,"
     " ADD COLUMN lease_backend_start timestamptz;"},
    /* Revocation (why, by whom), expiry notices, leavers and drift findings. */
    {4, "revocation, expiry notices, leavers, drift",
     "ALTER TABLE grant_ops ADD COLUMN reason text, ADD COLUMN actor bytea;"
     "ALTER TABLE grants ADD COLUMN notice_sent_at timestamptz,"
     " ADD COLUMN extended_by text;"
     "CREATE INDEX grants_directory ON grants (connector, grp, state);"
     "CREATE INDEX grant_ops_person ON grant_ops (person_id, op) WHERE state = 'pending';"
     "CREATE TABLE leavers ("
     " source text NOT NULL,"
     " source_event_id text NOT NULL,"
     " effective_date date NOT NULL,"
     " person_id text NOT NULL,"
     " received_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
     " started_at timestamptz,"
     " grants int,"
     " completed_at timestamptz,"
     " PRIMARY KEY (source, source_event_id, effective_date));"
     "CREATE INDEX leavers_due ON leavers (effective_date) WHERE started_at IS NULL;"
     "CREATE INDEX leavers_person ON leavers (person_id);"
     "CREATE TABLE drift_findings ("
     " id bigserial PRIMARY KEY,"
     " connector text NOT NULL,"
     " grp text NOT NULL,"
     " finding text NOT NULL,"
     " directory_user_id text NOT NULL,"
     " person_id text,"
     " grant_id text,"
     " repaired boolean NOT NULL,"
     " found_at timestamptz NOT NULL DEFAULT now());"},
    {5, "timers: expiry, expiry notices, future-dated leavers", QM_TIMER_MIGRATION_SQL("timers")},
    /* A joiner (a rehire) lifts an earlier leaver: approvals apply again. */
    {6, "leavers superseded by a later joiner",
     "ALTER TABLE leavers ADD COLUMN superseded_at timestamptz;"
     "CREATE INDEX leavers_active ON leavers (person_id) WHERE superseded_at IS NULL;"},
    /* Expiry notices waiting for the webhook, sent outside any transaction
     * (notices.c) so that a down receiver never holds a grant row locked. */
    {7, "expiry notices for the webhook sender",
     "CREATE TABLE expiry_notices ("
     " id bigserial PRIMARY KEY,"
     " grant_id text NOT NULL,"
     " expires_at_ms bigint NOT NULL,"
     " idempotency_key text NOT NULL UNIQUE,"
     " body text NOT NULL,"
     " state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending','sent','failed')),"
     " attempts int NOT NULL DEFAULT 0,"
     " next_attempt_at timestamptz NOT NULL DEFAULT now(),"
     " lease_until timestamptz,"
     " last_error text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " sent_at timestamptz);"
     "CREATE INDEX expiry_notices_due ON expiry_notices (next_attempt_at, id)"
     " WHERE state = 'pending';"},
    /* A drift repair is recorded before the directory is changed: a row with
     * repair_started_at and no repair_finished_at was cut short by a crash. */
    {8, "drift repairs recorded before they are made",
     "ALTER TABLE drift_findings ADD COLUMN repair_started_at timestamptz,"
     " ADD COLUMN repair_finished_at timestamptz;"},
    /* An administrator's reason for a revocation, kept and announced. */
    {9, "revocation comment",
     "ALTER TABLE grant_ops ADD COLUMN comment text;"
     "ALTER TABLE grants ADD COLUMN revoke_comment text;"},
};

static const qm_cfg_def_t config[] = {
    {"QM_SCIM_URL", QM_CFG_STR, "http://127.0.0.1:8090/scim/v2",
     "Base URL of the SCIM 2.0 directory of connector scim-main.", 0, 0, 0},
    {"QM_SCIM_TOKEN", QM_CFG_STR, "dev-scim-token", "Bearer token for the SCIM directory.", 0, 0,
     QM_CFG_SECRET},
    {"QM_SCIM_DIALECT", QM_CFG_STR, "generic", "SCIM dialect: generic, okta or entra.", 0, 0, 0},
    {"QM_SCIM_CA_FILE", QM_CFG_STR, "", "PEM CA bundle for the directory's TLS certificate.", 0,
     0, 0},
    {"QM_SCIM_TIMEOUT", QM_CFG_MS, "10s", "Bound on one SCIM HTTP attempt.", 100, 300000, 0},
    {"QM_SCIM_RETRY_AFTER_MAX", QM_CFG_MS, "60s",
     "Longest Retry-After (429/503) a SCIM call waits out before its next try.", 100, 600000, 0},
    {"QM_PROVISIONING_WORKERS", QM_CFG_INT, "4", "Threads applying grant operations.", 1, 64, 0},
    {"QM_PROVISIONING_MAX_ATTEMPTS", QM_CFG_INT, "6",
     "Attempts at a grant operation before it is parked as failed.", 1, 100, 0},
    {"QM_PROVISIONING_BACKOFF", QM_CFG_MS, "2s",
     "First wait before re-attempting a failed operation (doubles each time).", 10, 3600000, 0},
    {"QM_PROVISIONING_LEASE", QM_CFG_MS, "60s",
     "How long a worker holds a claimed operation before another may take it.", 1000, 3600000, 0},
    {"QM_PROVISIONING_POLL", QM_CFG_MS, "20ms", "Worker poll interval when idle.", 1, 60000, 0},
    {"QM_CONNECTORS_FILE", QM_CFG_STR, "",
     "JSON file of further connector instances (SCIM or LDAP) by name; see docs/operations.md.",
     0, 0, 0},
    {"QM_PROVISIONING_DAY", QM_CFG_MS, "1d",
     "Length of one day of a grant's duration (shorten it only for tests and demos).", 100,
     864000000, 0},
    {"QM_PROVISIONING_TICK", QM_CFG_MS, "1s",
     "Idle poll of the timer worker (expiries, expiry notices, future-dated leavers) and of the expiry notice sender.", 10, 3600000, 0},
    {"QM_EXPIRY_NOTICE_BEFORE", QM_CFG_MS, "3d",
     "How long before expiry the holder is notified (ExpiryNotice and the webhook).", 0,
     8640000000, 0},
    {"QM_EXPIRY_WEBHOOK_URL", QM_CFG_STR, "",
     "URL that receives a JSON POST per expiry notice (empty: event only).", 0, 0, 0},
    {"QM_EXPIRY_WEBHOOK_TIMEOUT", QM_CFG_MS, "5s", "Bound on one expiry webhook call.", 100,
     60000, 0},
    {"QM_EXPIRY_WEBHOOK_BACKOFF", QM_CFG_MS, "5s",
     "First wait before re-sending a failed expiry notice (doubles each time, at most 10 min).",
     10, 3600000, 0},
    {"QM_EXPIRY_WEBHOOK_ATTEMPTS", QM_CFG_INT, "30",
     "Attempts at an expiry notice before it is parked as failed.", 1, 1000, 0},
    {"QM_DRIFT_INTERVAL", QM_CFG_MS, "15m",
     "How often every managed group is reconciled with the grants (0: never).", 0, 86400000, 0},
    {"QM_DRIFT_REPAIR", QM_CFG_BOOL, "false",
     "Repair drift: remove members without a grant, re-add grants without membership "
     "(a connector's drift_repair overrides it).", 0, 0, 0},
};

static int on_approved(qm_service_t *svc, prov_t *prov, qm_pg_t *tx, const qm_event_in_t *ev,
                       const Qm__V1__RequestApproved *ap, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  QM_UNUSED(prov);
  const Qm__V1__RequestLine *line = ap->line;
  if (!line || !ap->request_id[0] || !ap->subject_person_id[0])
    return qm_err(errstr, errstr_size, QM_EPOISON, "RequestApproved without request, subject or line");
  if (line->kind != QM__V1__ITEM_KIND__ITEM_KIND_ACCESS &&
      !(line->kind == QM__V1__ITEM_KIND__ITEM_KIND_LICENCE && line->group[0]))
    return QM_OK; /* equipment is fulfilment's */
  if (!line->group[0])
    return qm_err(errstr, errstr_size, QM_EPOISON, "approved access line %d has no group",
                  line->line_no);
  const char *username = ap->subject_directory_username[0] ? ap->subject_directory_username
                                                           : ap->subject_person_id;
  const char *connector = line->connector[0] ? line->connector : "scim-main";
  const struct {
    const char *name, *value;
    size_t max;
  } limits[] = {{"request_id", ap->request_id, PROV_REQUEST_ID_MAX},
                {"subject_person_id", ap->subject_person_id, PROV_NAME_MAX},
                {"subject_directory_username", username, PROV_LONG_NAME_MAX},
                {"line.item_id", line->item_id, PROV_NAME_MAX},
                {"line.role_id", line->role_id, PROV_NAME_MAX},
                {"line.group", line->group, PROV_LONG_NAME_MAX},
                {"line.connector", connector, PROV_NAME_MAX}};
  for (size_t i = 0; i < QM_ARRAY_LEN(limits); i++)
    if (strlen(limits[i].value) >= limits[i].max)
      return qm_err(errstr, errstr_size, QM_EPOISON,
                    "RequestApproved %s is %zu bytes; provisioning takes at most %zu",
                    limits[i].name, strlen(limits[i].value), limits[i].max - 1);
  size_t len = qm__v1__request_approved__get_packed_size(ap);
  uint8_t *buf = qm_malloc(len);
  qm__v1__request_approved__pack(ap, buf);
  char grant_id[QM_UUID_STR_LEN];
  qm_uuid_new(grant_id);
  qm_pg_param_t p[] = {QM_PG_TEXT(grant_id),        QM_PG_TEXT(ap->request_id),
                       QM_PG_INT64(line->line_no),  QM_PG_TEXT(ap->subject_person_id),
                       QM_PG_TEXT(username),        QM_PG_TEXT(line->item_id),
                       QM_PG_TEXT(line->role_id),   QM_PG_TEXT(line->group),
                       QM_PG_TEXT(connector),       QM_PG_INT64(ap->grant_duration_days),
                       QM_PG_BYTES(buf, len),       QM_PG_TEXT(ev->meta.traceparent)};
  qm_pg_result_t *res = NULL;
  /* An approval that reaches us after its subject left (it was in flight
   * when the leaver came) is recorded but never applied: state revoked,
   * reason leaver, no operation. A joiner event for the person lifts this. */
  int rc = qm_pg_exec(tx,
                      "WITH gone AS (SELECT EXISTS (SELECT 1 FROM leavers WHERE person_id = $4"
                      "  AND started_at IS NOT NULL AND superseded_at IS NULL) AS left),"
                      " g AS (INSERT INTO grants (grant_id, request_id, line_no, person_id,"
                      " directory_username, item_id, role_id, grp, connector, duration_days, state,"
                      " revoke_reason, revoked_at, approved, traceparent)"
                      " SELECT $1, $2, $3::int, $4, $5, $6, $7, $8, $9, $10::int,"
                      " CASE WHEN gone.left THEN 'revoked' ELSE 'pending' END,"
                      " CASE WHEN gone.left THEN 'leaver' END, CASE WHEN gone.left THEN now() END,"
                      " $11, $12 FROM gone"
                      " ON CONFLICT (request_id, line_no) DO NOTHING"
                      " RETURNING grant_id, person_id, grp, state),"
                      " op AS (INSERT INTO grant_ops (grant_id, op, person_id, grp, state)"
                      " SELECT grant_id, 'grant', person_id, grp, 'pending' FROM g"
                      " WHERE state = 'pending' RETURNING id)"
                      " SELECT coalesce((SELECT state FROM g), '')",
                      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  free(buf);
  if (rc != QM_OK) return rc;
  const char *state = qm_pg_get(res, 0, 0);
  if (!*state)
    qm_log(QM_LOG_INFO, ap->request_id, NULL, "line %d already has a grant; nothing to do",
           line->line_no);
  else if (!strcmp(state, "revoked"))
    qm_log(QM_LOG_WARN, ap->request_id, NULL,
           "line %d approved for %s, who has left: not granted (grant %s recorded as revoked)",
           line->line_no, ap->subject_person_id, grant_id);
  else
    qm_log(QM_LOG_INFO, ap->request_id, NULL, "grant %s queued: %s to %s via %s", grant_id,
           ap->subject_person_id, line->group, connector);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* An approved extension moves the expiry of the grant it extends (from its
 * current expiry, or from now when that has passed) and announces it as an
 * AccessGranted with extension set. *handled says whether a grant was found;
 * when none is (revoked meanwhile), the extension is granted as new access. */
static int on_extension(prov_t *prov, qm_pg_t *tx, const qm_event_in_t *ev,
                        const Qm__V1__RequestApproved *ap, bool *handled, char *errstr,
                        size_t errstr_size) {
  *handled = false;
  const Qm__V1__RequestLine *line = ap->line;
  int days = ap->grant_duration_days > 0 ? ap->grant_duration_days : line->duration_days;
  qm_pg_param_t p[] = {QM_PG_TEXT(ap->extends_request_id), QM_PG_TEXT(ap->subject_person_id),
                       QM_PG_TEXT(line->item_id),         QM_PG_TEXT(line->role_id),
                       QM_PG_INT64(days),                 QM_PG_INT64(prov->day_ms),
                       QM_PG_TEXT(ap->request_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
      tx,
      "UPDATE grants SET duration_days = CASE WHEN state = 'pending' AND duration_days > 0"
      "  THEN duration_days + $5::int ELSE duration_days END,"
      " expires_at = CASE WHEN expires_at IS NOT NULL THEN greatest(expires_at, now())"
      "  + make_interval(secs => $5::int * ($6::bigint / 1000.0)) END,"
      " notice_sent_at = NULL, extended_by = $7, updated_at = now()"
      " WHERE request_id = $1 AND person_id = $2 AND item_id = $3 AND ($4 = '' OR role_id = $4)"
      " AND state IN ('pending', 'active') AND revoke_reason IS NULL"
      " RETURNING grant_id, state, request_id, line_no, role_id, grp, connector,"
      " coalesce(directory_user_id, ''), coalesce(directory_group_id, ''),"
      " coalesce((extract(epoch FROM granted_at) * 1000)::bigint, 0),"
      " coalesce((extract(epoch FROM expires_at) * 1000)::bigint, 0)",
      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  int n = qm_pg_ntuples(res);
  for (int i = 0; i < n && rc == QM_OK; i++) {
    *handled = true;
    qm_log(QM_LOG_INFO, ap->request_id, NULL, "grant %s extended by %d day(s) by request %s",
           qm_pg_get(res, i, 0), days, ap->request_id);
    if (strcmp(qm_pg_get(res, i, 1), "active") != 0) continue; /* announced when applied */
    int64_t expires_ms = 0;
    qm_pg_get_int64(res, i, 10, &expires_ms);
    if (expires_ms > 0) {
      rc = prov_timers_arm(prov, tx, qm_pg_get(res, i, 0), expires_ms, errstr, errstr_size);
      if (rc != QM_OK) break;
    }
    Qm__V1__AccessGranted ag = QM__V1__ACCESS_GRANTED__INIT;
    /* The extension request is what was granted now (its requester sees it
     * granted); grant_id names the grant whose expiry moved. */
    ag.request_id = ap->request_id;
    ag.line_no = line->line_no;
    ag.grant_id = (char *)qm_pg_get(res, i, 0);
    ag.subject_person_id = ap->subject_person_id;
    ag.item_id = line->item_id;
    ag.role_id = (char *)qm_pg_get(res, i, 4);
    ag.group = (char *)qm_pg_get(res, i, 5);
    ag.connector = (char *)qm_pg_get(res, i, 6);
    ag.directory_user_id = (char *)qm_pg_get(res, i, 7);
    ag.directory_group_id = (char *)qm_pg_get(res, i, 8);
    qm_pg_get_int64(res, i, 9, &ag.granted_at_ms);
    qm_pg_get_int64(res, i, 10, &ag.expires_at_ms);
    ag.n_approvers = ap->n_approvers;
    ag.approvers = ap->approvers;
    ag.extension = true;
    Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
    ae.event_case = QM__V1__ACCESS_EVENT__EVENT_GRANTED;
    ae.granted = &ag;
    /* Subject: the extension request, so its requester sees it granted. */
    rc = qm_service_emit(prov->svc, tx, QM_TOPIC_ACCESS, ap->subject_person_id,
                         "qm.access.granted.v1", ap->request_id, ev->meta.traceparent, &ae.base,
                         NULL, errstr, errstr_size);
  }
  qm_pg_result_destroy(res);
  return rc;
}

static int on_decision(qm_service_t *svc, prov_t *prov, qm_pg_t *tx, const qm_event_in_t *ev,
                       char *errstr, size_t errstr_size) {
  Qm__V1__DecisionEvent *de =
      qm__v1__decision_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!de)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.DecisionEvent",
                  ev->meta.type);
  int rc = QM_OK;
  if (de->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED) {
    bool handled = false;
    const Qm__V1__RequestApproved *ap = de->approved;
    if (ap->extends_request_id[0] && ap->line && ap->subject_person_id[0])
      rc = on_extension(prov, tx, ev, ap, &handled, errstr, errstr_size);
    if (rc == QM_OK && !handled) rc = on_approved(svc, prov, tx, ev, ap, errstr, errstr_size);
  }
  qm__v1__decision_event__free_unpacked(de, NULL);
  return rc;
}

/* The reasons AccessRevoked may carry, from a RevocationRequested's. */
static const char *revoke_reason(const char *asked) {
  static const char *const known[] = {"mover", "leaver", "review", "admin", "expired", NULL};
  for (size_t i = 0; known[i]; i++)
    if (!strcmp(asked, known[i])) return known[i];
  return "revocation_requested";
}

static int on_request_event(prov_t *prov, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                            size_t errstr_size) {
  Qm__V1__RequestEvent *re =
      qm__v1__request_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!re)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.RequestEvent",
                  ev->meta.type);
  int rc = QM_OK;
  if (re->event_case == QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED) {
    const Qm__V1__RevocationRequested *rr = re->revocation_requested;
    if (!rr->subject_person_id[0] || !rr->item_id[0]) {
      rc = qm_err(errstr, errstr_size, QM_EPOISON,
                  "RevocationRequested without subject_person_id or item_id");
    } else {
      int queued = 0;
      rc = prov_revoke_queue(prov, tx, rr->subject_person_id, NULL, rr->item_id, rr->role_id,
                             revoke_reason(rr->reason), NULL, rr->actor, &queued, errstr,
                             errstr_size);
      if (rc == QM_OK)
        qm_log(QM_LOG_INFO, rr->request_id, NULL,
               "revocation of %s/%s for %s (%s): %d grant(s) queued", rr->item_id,
               rr->role_id[0] ? rr->role_id : "*", rr->subject_person_id, rr->reason, queued);
    }
  }
  qm__v1__request_event__free_unpacked(re, NULL);
  return rc;
}

/* True for "YYYY-MM-DD" with a plausible month and day (PostgreSQL still
 * refuses 2026-02-31; such an event ends in the dead-letter topic). */
static bool valid_date(const char *s) {
  int y = 0, mo = 0, d = 0;
  char tail = 0;
  return sscanf(s, "%4d-%2d-%2d%c", &y, &mo, &d, &tail) == 3 && mo >= 1 && mo <= 12 && d >= 1 &&
         d <= 31;
}

/* A leaver revokes every grant of the person from the effective date on; a
 * leaver dated in the future waits in the leavers table for the scheduler.
 * Duplicates (same source, id and effective date) are dropped. */
static int on_hr_event(prov_t *prov, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size) {
  Qm__V1__HrEvent *he =
      qm__v1__hr_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!he)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.HrEvent",
                  ev->meta.type);
  int rc = QM_OK;
  if (he->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER && he->person &&
      he->person->id[0] && valid_date(he->effective_date)) {
    /* A rehire: earlier leavers no longer hold back new approvals. */
    qm_pg_param_t p[] = {QM_PG_TEXT(he->person->id), QM_PG_TEXT(he->effective_date)};
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(tx,
                    "UPDATE leavers SET superseded_at = now() WHERE person_id = $1"
                    " AND superseded_at IS NULL AND effective_date <= $2::date",
                    p, 2, &res, errstr, errstr_size);
    if (rc != QM_OK) goto out;
    if (qm_pg_affected(res) > 0)
      qm_log(QM_LOG_INFO, NULL, NULL, "joiner %s (effective %s): earlier leaver lifted",
             he->person->id, he->effective_date);
    qm_pg_result_destroy(res);
    goto out;
  }
  bool leaver = he->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER ||
                (he->person && he->person->status == QM__V1__PERSON_STATUS__PERSON_STATUS_TERMINATED);
  if (leaver) {
    if (!he->person || !he->person->id[0] || !he->effective_date[0]) {
      rc = qm_err(errstr, errstr_size, QM_EPOISON, "leaver without person id or effective date");
      goto out;
    }
    qm_pg_param_t p[] = {QM_PG_TEXT(he->source), QM_PG_TEXT(he->source_event_id),
                         QM_PG_TEXT(he->effective_date), QM_PG_TEXT(he->person->id)};
    if (!valid_date(he->effective_date)) {
      rc = qm_err(errstr, errstr_size, QM_EPOISON, "leaver with a bad effective date '%s'",
                  he->effective_date);
      goto out;
    }
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(tx,
                    "INSERT INTO leavers (source, source_event_id, effective_date, person_id)"
                    " VALUES ($1, $2, $3::date, $4) ON CONFLICT DO NOTHING"
                    " RETURNING effective_date <= current_date,"
                    " (extract(epoch FROM effective_date::timestamptz) * 1000)::bigint",
                    p, 4, &res, errstr, errstr_size);
    if (rc != QM_OK) goto out;
    bool fresh = qm_pg_ntuples(res) == 1, due = fresh && !strcmp(qm_pg_get(res, 0, 0), "t");
    qm_pg_result_destroy(res);
    if (!fresh)
      qm_log(QM_LOG_INFO, NULL, NULL, "leaver %s (%s/%s %s) seen before; dropped", he->person->id,
             he->source, he->source_event_id, he->effective_date);
    else if (due)
      rc = prov_leaver_start(prov, tx, he->person->id, errstr, errstr_size);
    else {
      qm_pg_param_t q[] = {QM_PG_TEXT(he->person->id)};
      qm_pg_result_t *r2 = NULL;
      rc = qm_pg_exec(tx, "SELECT (extract(epoch FROM min(effective_date)::timestamptz) * 1000)::bigint"
                      " FROM leavers WHERE person_id = $1 AND started_at IS NULL", q, 1, &r2,
                      errstr, errstr_size);
      int64_t due_ms = 0;
      if (rc == QM_OK) qm_pg_get_int64(r2, 0, 0, &due_ms);
      qm_pg_result_destroy(r2);
      if (rc == QM_OK)
        rc = qm_timer_add(tx, "timers", "leaver", he->person->id, NULL, 0, due_ms, NULL, errstr,
                          errstr_size);
      qm_log(QM_LOG_INFO, NULL, NULL, "leaver %s effective %s: revocation waits for that date",
             he->person->id, he->effective_date);
    }
  }
out:
  qm__v1__hr_event__free_unpacked(he, NULL);
  return rc;
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  prov_t *prov = app;
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_DECISIONS))
    return on_decision(svc, prov, tx, ev, errstr, errstr_size);
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_REQUESTS))
    return on_request_event(prov, tx, ev, errstr, errstr_size);
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_HR))
    return on_hr_event(prov, tx, ev, errstr, errstr_size);
  return QM_OK;
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(svc);
  prov_t *prov = qm_calloc(1, sizeof(*prov));
  prov->svc = svc;
  prov->day_ms = qm_config_ms(cfg, "QM_PROVISIONING_DAY");
  prov->notice_before_ms = qm_config_ms(cfg, "QM_EXPIRY_NOTICE_BEFORE");
  prov->webhook_timeout_ms = qm_config_ms(cfg, "QM_EXPIRY_WEBHOOK_TIMEOUT");
  int rc = prov_connectors_load(prov, errstr, errstr_size);
  if (rc != QM_OK) {
    free(prov);
    return rc;
  }
  qm_metrics_t *reg = qm_service_metrics(svc);
  prov->m_ops = qm_metrics_counter(reg, "qm_provisioning_operations_total",
                                   "Directory operations by op (grant, revoke) and outcome "
                                   "(done, retried, parked).",
                                   (const char *const[]){"op", "outcome", NULL});
  static const double leaver_bounds[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
  prov->m_leaver = qm_metrics_histogram(reg, "qm_provisioning_leaver_seconds",
                                        "From a due leaver's HR event to its last grant revoked.",
                                        NULL, leaver_bounds, QM_ARRAY_LEN(leaver_bounds));
  prov->m_drift = qm_metrics_counter(reg, "qm_provisioning_drift_findings_total",
                                     "Drift findings by kind and whether they were repaired.",
                                     (const char *const[]){"finding", "repaired", NULL});
  prov->m_notices = qm_metrics_counter(reg, "qm_provisioning_expiry_notices_total",
                                       "Expiry notices by webhook outcome (sent; failed: an attempt, retried; parked; none: no webhook).",
                                       (const char *const[]){"outcome", NULL});
  rc = prov_api_register(prov, errstr, errstr_size);
  if (rc == QM_OK) rc = prov_workers_start(prov, errstr, errstr_size);
  if (rc == QM_OK) rc = prov_scheduler_start(prov, errstr, errstr_size);
  if (rc != QM_OK) {
    prov_workers_stop(prov);
    prov_connectors_free(prov);
    free(prov);
    return rc;
  }
  *app = prov;
  return QM_OK;
}

static void stop(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  prov_scheduler_stop(app);
  prov_workers_stop(app);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  prov_t *prov = app;
  prov_connectors_free(prov);
  free(prov);
}

static const char *const consumes[] = {QM_TOPIC_DECISIONS, QM_TOPIC_REQUESTS, QM_TOPIC_HR};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "provisioning",
      .default_port = 8083,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .config = config,
      .n_config = QM_ARRAY_LEN(config),
      .init = init,
      .stop = stop,
      .fini = fini,
      .uses_redis = true,
  };
  return qm_service_main(argc, argv, &def);
}
