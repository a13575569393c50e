/*
 * provisioning: the state shared by qm-provisioning's consumer handler
 * (main.c), its connectors (connectors.c), its grant-operation workers
 * (workers.c), revocation (revoke.c), its scheduler of expiry, notices,
 * leavers and drift (scheduler.c) and its HTTP API (api.c).
 */
#ifndef QM_PROVISIONING_H
#define QM_PROVISIONING_H

/* Longest ids provisioning carries through an operation (the buffers of
 * grant_op_t, workers.c): an approval with a longer one is refused as
 * poison (dead-lettered, with the reason) rather than cut short. */
#define PROV_REQUEST_ID_MAX 40
#define PROV_NAME_MAX 130      /* person, item, role, connector */
#define PROV_LONG_NAME_MAX 260 /* directory username, group */

#include "qm_ldap.h"
#include "qm_metrics.h"
#include "qm_scim.h"
#include "qm_service.h"

#include "qm/v1/common.pb-c.h"

#include <jansson.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#define PROV_MAX_WORKERS 64
#define PROV_MAX_CONNECTORS 32

typedef enum { PROV_CONN_SCIM, PROV_CONN_LDAP } prov_conn_kind_t;

/* One configured directory (connector instance). Thread-safe. */
typedef struct prov_conn {
  char *name;             /* "scim-main", "ldap-corp" */
  prov_conn_kind_t kind;
  qm_scim_t *scim;        /* kind SCIM */
  qm_ldap_t *ldap;        /* kind LDAP */
  int drift_repair;       /* -1: QM_DRIFT_REPAIR decides; 0 or 1: this connector's choice */
} prov_conn_t;

typedef struct prov {
  qm_service_t *svc;
  prov_conn_t conns[PROV_MAX_CONNECTORS];
  size_t n_conns;
  int64_t day_ms; /* length of a "day" of grant durations (shortened in tests) */
  pthread_t workers[PROV_MAX_WORKERS];
  size_t n_workers;
  int64_t notice_before_ms;  /* QM_EXPIRY_NOTICE_BEFORE */
  int64_t webhook_timeout_ms; /* QM_EXPIRY_WEBHOOK_TIMEOUT */
  struct qm_timers *timers;   /* expiry, notices, future leavers */
  pthread_t scheduler;
  bool scheduler_running;
  pthread_t notifier;         /* expiry notice sender (notices.c) */
  bool notifier_running;
  atomic_bool stopping;
  qm_metric_family_t *m_ops;      /* qm_provisioning_operations_total{op,outcome} */
  qm_metric_family_t *m_leaver;   /* qm_provisioning_leaver_seconds */
  qm_metric_family_t *m_drift;    /* qm_provisioning_drift_findings_total{finding,repaired} */
  qm_metric_family_t *m_notices;  /* qm_provisioning_expiry_notices_total{outcome} */
} prov_t;

/* connectors.c */
int prov_connectors_load(prov_t *prov, char *errstr, size_t errstr_size);
void prov_connectors_free(prov_t *prov);
prov_conn_t *prov_conn_find(prov_t *prov, const char *name);
/* The directory's id for a user (SCIM id, LDAP DN) / group. QM_E* as qm_scim/qm_ldap. */
int prov_conn_find_user(prov_conn_t *c, const char *username, char *id, size_t id_size, char *why,
                        size_t why_size);
int prov_conn_find_group(prov_conn_t *c, const char *name, char *id, size_t id_size, char *why,
                         size_t why_size);
int prov_conn_add(prov_conn_t *c, const char *group_id, const char *const *user_ids, size_t n,
                  char *why, size_t why_size);
int prov_conn_remove(prov_conn_t *c, const char *group_id, const char *user_id, char *why,
                     size_t why_size);
/* Fills members (a JSON object used as a set) with the group's member ids,
 * normalised by prov_conn_norm_id(). */
int prov_conn_list(prov_conn_t *c, const char *group_id, json_t *members, char *why,
                   size_t why_size);
/* The form of an id members are compared in (LDAP DNs compare case-insensitively). */
void prov_conn_norm_id(const prov_conn_t *c, const char *id, char *out, size_t out_size);
void prov_conn_cache_clear(prov_conn_t *c);

/* workers.c */
int prov_workers_start(prov_t *prov, char *errstr, size_t errstr_size);
void prov_workers_stop(prov_t *prov);

/* revoke.c: queue revoke operations for every matching grant that is held
 * or on its way (pending, active, failed) and not already being revoked.
 * NULL filters match anything; at least one of person_id and grant_id must
 * be given. actor is packed into the operation for AccessRevoked; comment
 * (NULL or "" for none) is stored with the grant and the operation and
 * carried by AccessRevoked. Runs in the caller's transaction. *queued (may
 * be NULL) receives how many. */
int prov_revoke_queue(prov_t *prov, qm_pg_t *tx, const char *person_id, const char *grant_id,
                      const char *item_id, const char *role_id, const char *reason,
                      const char *comment, const Qm__V1__Actor *actor, int *queued, char *errstr,
                      size_t errstr_size);

/* Starts deprovisioning a leaver whose leavers row is due: every grant
 * queued for revocation with reason "leaver", the row marked started (and
 * completed at once when there was nothing to revoke). In tx. */
int prov_leaver_start(prov_t *prov, qm_pg_t *tx, const char *person_id, char *errstr,
                      size_t errstr_size);

/* scheduler.c: expiry, expiry notices, due leavers, drift. */
int prov_scheduler_start(prov_t *prov, char *errstr, size_t errstr_size);
void prov_scheduler_stop(prov_t *prov);
/* (Re)arms a grant's timers in tx: cancels its pending ones, then adds
 * "expire" at expires_ms and "notice" ahead of it (none when expires_ms is 0). */
int prov_timers_arm(prov_t *prov, qm_pg_t *tx, const char *grant_id, int64_t expires_ms,
                    char *errstr, size_t errstr_size);
/* One drift reconciliation pass over every managed group now (also run
 * periodically). Returns how many findings were published, or < 0. */
int prov_drift_run(prov_t *prov, qm_pg_t *pg, char *errstr, size_t errstr_size);

/* notices.c: expiry notices to QM_EXPIRY_WEBHOOK_URL. prov_notice_add()
 * records one in tx (a repeat of the same grant and expiry is ignored); the
 * sender thread (started when a URL is configured) delivers it outside any
 * transaction, with a lease, retries and the same Idempotency-Key. */
int prov_notice_add(qm_pg_t *tx, const char *grant_id, int64_t expires_ms, const char *body,
                    char *errstr, size_t errstr_size);
int prov_notices_start(prov_t *prov, char *errstr, size_t errstr_size);
void prov_notices_stop(prov_t *prov);

/* api.c */
int prov_api_register(prov_t *prov, char *errstr, size_t errstr_size);

#endif
