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
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"

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
    {"QM_PROVISIONING_WORKERS", QM_CFG_INT, "4", "Threads applying grant operations.", 1, 64, 0},
    {"QM_PROVISIONING_MAX_ATTEMPTS", QM_CFG_INT, "6",
     "Attempts at a grant operation before it is parked as failed.", 1, 100, 0},
    {"QM_PROVISIONING_BACKOFF", QM_CFG_MS, "2s",
     "First wait before re-attempting a failed operation (doubles each time).", 10, 3600000, 0},
    {"QM_PROVISIONING_LEASE", QM_CFG_MS, "60s",
     "How long a worker holds a claimed operation before another may take it.", 1000, 3600000, 0},
    {"QM_PROVISIONING_POLL", QM_CFG_MS, "20ms", "Worker poll interval when idle.", 1, 60000, 0},
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
  size_t len = qm__v1__request_approved__get_packed_size(ap);
  uint8_t *buf = qm_malloc(len);
  qm__v1__request_approved__pack(ap, buf);
  char grant_id[QM_UUID_STR_LEN];
  qm_uuid_new(grant_id);
  const char *username = ap->subject_directory_username[0] ? ap->subject_directory_username
                                                           : ap->subject_person_id;
  const char *connector = line->connector[0] ? line->connector : "scim-main";
  qm_pg_param_t p[] = {QM_PG_TEXT(grant_id),        QM_PG_TEXT(ap->request_id),
                       QM_PG_INT64(line->line_no),  QM_PG_TEXT(ap->subject_person_id),
                       QM_PG_TEXT(username),        QM_PG_TEXT(line->item_id),
                       QM_PG_TEXT(line->role_id),   QM_PG_TEXT(line->group),
                       QM_PG_TEXT(connector),       QM_PG_INT64(ap->grant_duration_days),
                       QM_PG_BYTES(buf, len),       QM_PG_TEXT(ev->meta.traceparent)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "WITH g AS (INSERT INTO grants (grant_id, request_id, line_no, person_id,"
                      " directory_username, item_id, role_id, grp, connector, duration_days, state,"
                      " approved, traceparent) VALUES ($1, $2, $3::int, $4, $5, $6, $7, $8, $9,"
                      " $10::int, 'pending', $11, $12)"
                      " ON CONFLICT (request_id, line_no) DO NOTHING RETURNING grant_id, person_id, grp)"
                      " INSERT INTO grant_ops (grant_id, op, person_id, grp, state)"
                      " SELECT grant_id, 'grant', person_id, grp, 'pending' FROM g",
                      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  free(buf);
  if (rc != QM_OK) return rc;
  if (qm_pg_affected(res) == 0)
    qm_log(QM_LOG_INFO, ap->request_id, NULL, "line %d already has a grant; nothing to do",
           line->line_no);
  else
    qm_log(QM_LOG_INFO, ap->request_id, NULL, "grant %s queued: %s to %s via %s", grant_id,
           ap->subject_person_id, line->group, connector);
  qm_pg_result_destroy(res);
  return QM_OK;
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  prov_t *prov = app;
  if (!qm_service_topic_is(svc, ev->topic, QM_TOPIC_DECISIONS)) return QM_OK;
  Qm__V1__DecisionEvent *de =
      qm__v1__decision_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!de)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.DecisionEvent",
                  ev->meta.type);
  int rc = QM_OK;
  if (de->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED)
    rc = on_approved(svc, prov, tx, ev, de->approved, errstr, errstr_size);
  qm__v1__decision_event__free_unpacked(de, NULL);
  return rc;
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(svc);
  prov_t *prov = qm_calloc(1, sizeof(*prov));
  prov->svc = svc;
  qm_scim_config_t sc = {
      .base_url = qm_config_str(cfg, "QM_SCIM_URL"),
      .bearer_token = qm_config_str(cfg, "QM_SCIM_TOKEN"),
      .ca_file = *qm_config_str(cfg, "QM_SCIM_CA_FILE") ? qm_config_str(cfg, "QM_SCIM_CA_FILE") : NULL,
      .total_timeout_ms = (int)qm_config_ms(cfg, "QM_SCIM_TIMEOUT"),
      .max_attempts = 3,
  };
  if (qm_scim_dialect_parse(qm_config_str(cfg, "QM_SCIM_DIALECT"), &sc.dialect) != QM_OK) {
    free(prov);
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "invalid configuration: QM_SCIM_DIALECT: '%s' is not generic, okta or entra",
                  qm_config_str(cfg, "QM_SCIM_DIALECT"));
  }
  prov->scim = qm_scim_new(&sc, errstr, errstr_size);
  if (!prov->scim) {
    free(prov);
    return QM_EINVAL;
  }
  int rc = prov_api_register(prov, errstr, errstr_size);
  if (rc == QM_OK) rc = prov_workers_start(prov, errstr, errstr_size);
  if (rc != QM_OK) {
    qm_scim_destroy(prov->scim);
    free(prov);
    return rc;
  }
  *app = prov;
  return QM_OK;
}

static void stop(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  prov_workers_stop(app);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  prov_t *prov = app;
  qm_scim_destroy(prov->scim);
  free(prov);
}

static const char *const consumes[] = {QM_TOPIC_DECISIONS};

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
  };
  return qm_service_main(argc, argv, &def);
}
