/*
 * workers: the threads that apply grant operations to the directory. Each
 * worker owns one database connection; the directory client is shared.
 *
 * An operation is claimed with a lease held by the worker's database session
 * (so a crashed worker's operation is taken over as soon as its session is
 * gone, or when the lease runs out if the process hangs), only when no older pending operation
 * exists for the same person and group (so a grant and a later revoke apply
 * in order), and finished under "WHERE state = 'pending'" so that, whatever
 * crashes or races happen, exactly one transaction records its outcome and
 * publishes its event.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_timer.h"
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLAIM_BATCH 64

typedef struct grant_op {
  int64_t id;
  char op[16];
  int attempts;
  char grant_id[40], request_id[PROV_REQUEST_ID_MAX], person_id[PROV_NAME_MAX],
      username[PROV_LONG_NAME_MAX], item_id[PROV_NAME_MAX], role_id[PROV_NAME_MAX],
      grp[PROV_LONG_NAME_MAX], connector[PROV_NAME_MAX], traceparent[64];
  char reason[64], dir_user_id[1024], dir_group_id[1024];
  int line_no;
  int duration_days;
  unsigned char *approved; /* packed RequestApproved */
  size_t approved_len;
  unsigned char *actor; /* packed Actor of a revoke, or NULL */
  size_t actor_len;
  char *comment; /* a revoke's free text (owned), "" for none */
} grant_op_t;

typedef struct worker_ctx {
  prov_t *prov;
  int index;
} worker_ctx_t;

static void copy_field(const qm_pg_result_t *res, int row, const char *name, char *out, size_t n) {
  qm_strlcpy(out, qm_pg_get(res, row, qm_pg_fnumber(res, name)), n);
}

/* Claims up to CLAIM_BATCH due operations; returns how many (or < 0). */
static int claim(prov_t *prov, qm_pg_t *pg, grant_op_t *ops) {
  const qm_config_t *cfg = qm_service_config(prov->svc);
  /* A fair share of what is due (at most CLAIM_BATCH), so that a burst of
   * operations that cannot share a directory request — a leaver's revokes,
   * one per group — spreads over the workers instead of queueing behind one. */
  qm_pg_param_t p[] = {QM_PG_INT64(qm_config_ms(cfg, "QM_PROVISIONING_LEASE")),
                       QM_PG_INT64(CLAIM_BATCH),
                       QM_PG_INT64(qm_config_int(cfg, "QM_PROVISIONING_WORKERS"))};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(
      pg,
      "UPDATE grant_ops o SET lease_until = now() + make_interval(secs => $1::bigint / 1000.0),"
      " attempts = o.attempts + 1, lease_pid = pg_backend_pid(),"
      " lease_backend_start = (SELECT backend_start FROM pg_stat_activity"
      "  WHERE pid = pg_backend_pid())"
      " FROM grants g"
      " WHERE g.grant_id = o.grant_id AND o.id IN ("
      "  SELECT o1.id FROM grant_ops o1"
      "  WHERE o1.state = 'pending' AND o1.next_attempt_at <= now()"
      "   AND (o1.lease_until IS NULL OR o1.lease_until < now()"
      "    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = o1.lease_pid"
      "     AND a.backend_start = o1.lease_backend_start))"
      "   AND NOT EXISTS (SELECT 1 FROM grant_ops o2 WHERE o2.person_id = o1.person_id"
      "    AND o2.grp = o1.grp AND o2.state = 'pending' AND o2.id < o1.id)"
      "  ORDER BY o1.next_attempt_at, o1.id LIMIT least($2::int, 1 + (SELECT count(*)"
      "   FROM grant_ops o3 WHERE o3.state = 'pending' AND o3.next_attempt_at <= now()) / $3::int)"
      "  FOR UPDATE SKIP LOCKED)"
      " RETURNING o.id, o.op, o.attempts, g.grant_id, g.request_id, g.line_no, g.person_id,"
      " g.directory_username, g.item_id, g.role_id, g.grp, g.connector, g.duration_days,"
      " g.approved, coalesce(g.traceparent, '') AS traceparent, coalesce(o.reason, '') AS reason,"
      " o.actor, coalesce(o.comment, '') AS comment,"
      " coalesce(g.directory_user_id, '') AS dir_user_id,"
      " coalesce(g.directory_group_id, '') AS dir_group_id",
      p, 3, &res, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
    qm_log_warn("claiming grant operations failed: %s (retrying)", errstr);
    return -1;
  }
  int n = qm_pg_ntuples(res);
  for (int i = 0; i < n; i++) {
    grant_op_t *o = &ops[i];
    memset(o, 0, sizeof(*o));
    int64_t v = 0;
    qm_pg_get_int64(res, i, qm_pg_fnumber(res, "id"), &o->id);
    qm_pg_get_int64(res, i, qm_pg_fnumber(res, "attempts"), &v);
    o->attempts = (int)v;
    qm_pg_get_int64(res, i, qm_pg_fnumber(res, "line_no"), &v);
    o->line_no = (int)v;
    qm_pg_get_int64(res, i, qm_pg_fnumber(res, "duration_days"), &v);
    o->duration_days = (int)v;
    copy_field(res, i, "op", o->op, sizeof(o->op));
    copy_field(res, i, "grant_id", o->grant_id, sizeof(o->grant_id));
    copy_field(res, i, "request_id", o->request_id, sizeof(o->request_id));
    copy_field(res, i, "person_id", o->person_id, sizeof(o->person_id));
    copy_field(res, i, "directory_username", o->username, sizeof(o->username));
    copy_field(res, i, "item_id", o->item_id, sizeof(o->item_id));
    copy_field(res, i, "role_id", o->role_id, sizeof(o->role_id));
    copy_field(res, i, "grp", o->grp, sizeof(o->grp));
    copy_field(res, i, "connector", o->connector, sizeof(o->connector));
    copy_field(res, i, "traceparent", o->traceparent, sizeof(o->traceparent));
    copy_field(res, i, "reason", o->reason, sizeof(o->reason));
    copy_field(res, i, "dir_user_id", o->dir_user_id, sizeof(o->dir_user_id));
    copy_field(res, i, "dir_group_id", o->dir_group_id, sizeof(o->dir_group_id));
    qm_pg_get_bytes(res, i, qm_pg_fnumber(res, "approved"), &o->approved, &o->approved_len);
    o->comment = qm_strdup(qm_pg_get(res, i, qm_pg_fnumber(res, "comment")));
    if (!qm_pg_is_null(res, i, qm_pg_fnumber(res, "actor")))
      qm_pg_get_bytes(res, i, qm_pg_fnumber(res, "actor"), &o->actor, &o->actor_len);
  }
  qm_pg_result_destroy(res);
  return n;
}

/* Closes a pending operation inside the caller's transaction: state 'done'
 * or 'failed' (why: last_error, NULL for none). *won is false when it was
 * not pending any more — another worker finished it after our lease ran
 * out — and nothing was changed. */
static int close_op(qm_pg_t *pg, int64_t id, const char *state, const char *why, bool *won,
                    char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_INT64(id), QM_PG_TEXT(state), why ? QM_PG_TEXT(why) : QM_PG_NULL};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "UPDATE grant_ops SET state = $2, finished_at = now(), lease_until = NULL,"
                      " last_error = $3 WHERE id = $1::bigint AND state = 'pending'",
                      p, 3, &res, errstr, errstr_size);
  *won = rc == QM_OK && qm_pg_affected(res) > 0;
  qm_pg_result_destroy(res);
  return rc;
}

/* Success, inside the caller's transaction: op done (once), grant active with
 * its clock starting now, AccessGranted. *won is false when another worker
 * finished the operation first (then nothing was changed). On an error the
 * caller rolls back. */
static int granted_in_tx(prov_t *prov, qm_pg_t *pg, const grant_op_t *o, const char *user_id,
                         const char *group_id, bool *won, char *errstr, size_t errstr_size) {
  qm_pg_result_t *res = NULL;
  int rc = close_op(pg, o->id, "done", NULL, won, errstr, errstr_size);
  if (rc != QM_OK || !*won) return rc;
  /* The clock of a time-bound grant starts now, when access is applied. */
  qm_pg_param_t p2[] = {QM_PG_TEXT(o->grant_id), QM_PG_TEXT(user_id), QM_PG_TEXT(group_id),
                        QM_PG_INT64(prov->day_ms)};
  rc = qm_pg_exec(pg,
                  "UPDATE grants SET state = 'active', directory_user_id = $2,"
                  " directory_group_id = $3, granted_at = now(),"
                  " expires_at = CASE WHEN duration_days > 0 THEN now()"
                  "  + make_interval(secs => duration_days * ($4::bigint / 1000.0)) END,"
                  " updated_at = now()"
                  " WHERE grant_id = $1 RETURNING"
                  " (extract(epoch FROM granted_at) * 1000)::bigint AS granted_ms,"
                  " coalesce((extract(epoch FROM expires_at) * 1000)::bigint, 0) AS expires_ms",
                  p2, 4, &res, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  Qm__V1__AccessGranted ag = QM__V1__ACCESS_GRANTED__INIT;
  qm_pg_get_int64(res, 0, 0, &ag.granted_at_ms);
  qm_pg_get_int64(res, 0, 1, &ag.expires_at_ms);
  qm_pg_result_destroy(res);
  res = NULL;
  if (ag.expires_at_ms > 0) {
    rc = prov_timers_arm(prov, pg, o->grant_id, ag.expires_at_ms, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
  }
  Qm__V1__RequestApproved *ap =
      qm__v1__request_approved__unpack(NULL, o->approved_len, o->approved);
  ag.request_id = (char *)o->request_id;
  ag.line_no = o->line_no;
  ag.grant_id = (char *)o->grant_id;
  ag.subject_person_id = (char *)o->person_id;
  ag.item_id = (char *)o->item_id;
  ag.role_id = (char *)o->role_id;
  ag.group = (char *)o->grp;
  ag.connector = (char *)o->connector;
  ag.directory_user_id = (char *)user_id;
  ag.directory_group_id = (char *)group_id;
  if (ap) {
    ag.n_approvers = ap->n_approvers;
    ag.approvers = ap->approvers;
  }
  Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
  ae.event_case = QM__V1__ACCESS_EVENT__EVENT_GRANTED;
  ae.granted = &ag;
  rc = qm_service_emit(prov->svc, pg, QM_TOPIC_ACCESS, o->person_id, "qm.access.granted.v1",
                       o->request_id, o->traceparent, &ae.base, NULL, errstr, errstr_size);
  if (ap) qm__v1__request_approved__free_unpacked(ap, NULL);
  return rc;
fail:
  qm_pg_result_destroy(res);
  return rc;
}

static void log_granted(prov_t *prov, const grant_op_t *o) {
  qm_log(QM_LOG_INFO, o->request_id, NULL, "granted %s to %s (grant %s)", o->grp, o->person_id,
         o->grant_id);
  qm_metrics_inc(qm_metrics_child(prov->m_ops, (const char *const[]){"grant", "done"}));
}

/* One operation granted, in a transaction of its own. */
static int finish_granted(prov_t *prov, qm_pg_t *pg, const grant_op_t *o, const char *user_id,
                          const char *group_id, char *errstr, size_t errstr_size) {
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool won = false;
  rc = granted_in_tx(prov, pg, o, user_id, group_id, &won, errstr, errstr_size);
  if (rc == QM_OK && won) rc = qm_pg_commit(pg, errstr, errstr_size);
  else qm_pg_rollback(pg, NULL, 0);
  if (rc == QM_OK && won) log_granted(prov, o);
  return rc;
}

/* Several operations granted by one directory request, in one transaction
 * (a commit per batch instead of per grant). On an error nothing of it
 * commits and the caller finishes them one by one. */
static int finish_granted_batch(prov_t *prov, qm_pg_t *pg, const grant_op_t *ops, const int *idx,
                                char (*uids)[1024], const char *group_id, int k, char *errstr,
                                size_t errstr_size) {
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool won[CLAIM_BATCH];
  for (int x = 0; x < k && rc == QM_OK; x++)
    rc = granted_in_tx(prov, pg, &ops[idx[x]], uids[x], group_id, &won[x], errstr, errstr_size);
  if (rc == QM_OK) rc = qm_pg_commit(pg, errstr, errstr_size);
  else qm_pg_rollback(pg, NULL, 0);
  if (rc == QM_OK)
    for (int x = 0; x < k; x++)
      if (won[x]) log_granted(prov, &ops[idx[x]]);
  return rc;
}

/* Failure: retry later, or park the operation and publish ProvisioningFailed. */
static int finish_failed(prov_t *prov, qm_pg_t *pg, const grant_op_t *o, int cause,
                         const char *why, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(prov->svc);
  bool retryable = cause != QM_EINVAL;
  int max = (int)qm_config_int(cfg, "QM_PROVISIONING_MAX_ATTEMPTS");
  if (cause == QM_ESHUTDOWN) {
    qm_pg_param_t p[] = {QM_PG_INT64(o->id)};
    return qm_pg_exec(pg,
                      "UPDATE grant_ops SET lease_until = NULL, attempts = attempts - 1"
                      " WHERE id = $1::bigint AND state = 'pending'",
                      p, 1, NULL, errstr, errstr_size);
  }
  if (!strcmp(o->op, "grant")) {
    /* Revoked while this grant was failing: nothing to apply any more; the
     * revoke queued behind it can go ahead. */
    qm_pg_param_t p[] = {QM_PG_INT64(o->id), QM_PG_TEXT(o->grant_id), QM_PG_TEXT(why)};
    qm_pg_result_t *res = NULL;
    int rc = qm_pg_exec(pg,
                        "UPDATE grant_ops SET state = 'done', finished_at = now(),"
                        " lease_until = NULL, last_error = 'cancelled: revoked before it was"
                        " applied (last error: ' || $3 || ')'"
                        " WHERE id = $1::bigint AND state = 'pending' AND EXISTS (SELECT 1"
                        "  FROM grants WHERE grant_id = $2 AND revoke_reason IS NOT NULL)",
                        p, 3, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    bool cancelled = qm_pg_affected(res) > 0;
    qm_pg_result_destroy(res);
    if (cancelled) {
      qm_log(QM_LOG_INFO, o->request_id, NULL,
             "grant %s: revoked before it could be applied (%s); not retried", o->grant_id, why);
      return QM_OK;
    }
  }
  if (retryable && o->attempts < max) {
    int64_t backoff = qm_config_ms(cfg, "QM_PROVISIONING_BACKOFF");
    for (int i = 1; i < o->attempts && backoff < 3600000; i++) backoff *= 2;
    if (backoff > 3600000) backoff = 3600000;
    backoff = backoff / 2 + (int64_t)((uint64_t)random() % (uint64_t)(backoff / 2 + 1)); /* jitter */
    qm_pg_param_t p[] = {QM_PG_INT64(o->id), QM_PG_INT64(backoff), QM_PG_TEXT(why)};
    qm_log(QM_LOG_WARN, o->request_id, NULL,
           "%s %s: attempt %d of %d failed (%s); retrying in %lld ms", o->op, o->grant_id,
           o->attempts, max, why, (long long)backoff);
    qm_metrics_inc(qm_metrics_child(prov->m_ops, (const char *const[]){o->op, "retried"}));
    return qm_pg_exec(pg,
                      "UPDATE grant_ops SET lease_until = NULL, last_error = $3,"
                      " next_attempt_at = now() + make_interval(secs => $2::bigint / 1000.0)"
                      " WHERE id = $1::bigint AND state = 'pending'",
                      p, 3, NULL, errstr, errstr_size);
  }
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool won = false;
  rc = close_op(pg, o->id, "failed", why, &won, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  if (!won) {
    qm_pg_rollback(pg, NULL, 0);
    return QM_OK;
  }
  if (!strcmp(o->op, "grant")) { /* a failed revoke leaves the grant held */
    qm_pg_param_t p2[] = {QM_PG_TEXT(o->grant_id)};
    rc = qm_pg_exec(pg,
                    "UPDATE grants SET state = 'failed', updated_at = now() WHERE grant_id = $1",
                    p2, 1, NULL, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
  }
  char op_id[32];
  snprintf(op_id, sizeof(op_id), "%lld", (long long)o->id);
  Qm__V1__ProvisioningFailed pf = QM__V1__PROVISIONING_FAILED__INIT;
  pf.request_id = (char *)o->request_id;
  pf.line_no = o->line_no;
  pf.subject_person_id = (char *)o->person_id;
  pf.operation = (char *)o->op;
  pf.group = (char *)o->grp;
  pf.connector = (char *)o->connector;
  pf.error = (char *)why;
  pf.attempts = o->attempts;
  pf.operation_id = op_id;
  pf.retryable = retryable;
  Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
  ae.event_case = QM__V1__ACCESS_EVENT__EVENT_FAILED;
  ae.failed = &pf;
  rc = qm_service_emit(prov->svc, pg, QM_TOPIC_ACCESS, o->person_id,
                       "qm.access.provisioning_failed.v1", o->request_id, o->traceparent, &ae.base,
                       NULL, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  rc = qm_pg_commit(pg, errstr, errstr_size);
  if (rc == QM_OK)
    qm_metrics_inc(qm_metrics_child(prov->m_ops, (const char *const[]){o->op, "parked"}));
  if (rc == QM_OK)
    qm_log(QM_LOG_ERROR, o->request_id, NULL,
           "%s %s of %s to %s parked after %d attempt(s): %s; fix the cause and retry it with "
           "POST /v1/operations/%s/retry",
           o->op, o->grant_id, o->grp, o->person_id, o->attempts, why, op_id);
  return rc;
fail:
  qm_pg_rollback(pg, NULL, 0);
  return rc;
}

/* Revoked: op done (once), grant revoked with its reason, AccessRevoked;
 * and when it was a leaver's last, the leaver is complete and timed. */
static int finish_revoked(prov_t *prov, qm_pg_t *pg, const grant_op_t *o, char *errstr,
                          size_t errstr_size) {
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_result_t *res = NULL;
  bool won = false;
  rc = close_op(pg, o->id, "done", NULL, &won, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  if (!won) {
    qm_pg_rollback(pg, NULL, 0);
    return QM_OK;
  }
  qm_pg_param_t p2[] = {QM_PG_TEXT(o->grant_id), QM_PG_TEXT(o->reason)};
  rc = qm_pg_exec(pg,
                  "WITH old AS (SELECT state FROM grants WHERE grant_id = $1 FOR UPDATE)"
                  " UPDATE grants g SET state = 'revoked', revoked_at = now(),"
                  " revoke_reason = $2, updated_at = now() FROM old WHERE g.grant_id = $1"
                  " RETURNING old.state, (extract(epoch FROM g.revoked_at) * 1000)::bigint",
                  p2, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  bool was_active = qm_pg_ntuples(res) == 1 && !strcmp(qm_pg_get(res, 0, 0), "active");
  int64_t revoked_ms = 0;
  if (qm_pg_ntuples(res) == 1) qm_pg_get_int64(res, 0, 1, &revoked_ms);
  qm_pg_result_destroy(res);
  res = NULL;
  /* Its expiry and notice timers have nothing left to do. */
  rc = qm_timer_cancel_owner(pg, "timers", o->grant_id, NULL, NULL, errstr, errstr_size);
  if (rc != QM_OK) goto fail;
  if (was_active) { /* a grant never applied was never announced: nothing to take back */
    Qm__V1__AccessRevoked ar = QM__V1__ACCESS_REVOKED__INIT;
    ar.request_id = (char *)o->request_id;
    ar.grant_id = (char *)o->grant_id;
    ar.subject_person_id = (char *)o->person_id;
    ar.item_id = (char *)o->item_id;
    ar.role_id = (char *)o->role_id;
    ar.group = (char *)o->grp;
    ar.connector = (char *)o->connector;
    ar.reason = (char *)o->reason;
    ar.revoked_at_ms = revoked_ms;
    ar.comment = o->comment ? o->comment : (char *)"";
    Qm__V1__Actor *actor = o->actor ? qm__v1__actor__unpack(NULL, o->actor_len, o->actor) : NULL;
    Qm__V1__Actor svc_actor = QM__V1__ACTOR__INIT;
    svc_actor.service = (char *)"provisioning";
    ar.actor = actor ? actor : &svc_actor;
    Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
    ae.event_case = QM__V1__ACCESS_EVENT__EVENT_REVOKED;
    ae.revoked = &ar;
    rc = qm_service_emit(prov->svc, pg, QM_TOPIC_ACCESS, o->person_id, "qm.access.revoked.v1",
                         o->request_id, o->traceparent, &ae.base, NULL, errstr, errstr_size);
    if (actor) qm__v1__actor__free_unpacked(actor, NULL);
    if (rc != QM_OK) goto fail;
  }
  double leaver_s = -1;
  if (!strcmp(o->reason, "leaver")) {
    qm_pg_param_t p3[] = {QM_PG_TEXT(o->person_id)};
    /* Workers finishing a leaver's last revokes at the same moment would each
     * see the other's still pending: lock the leaver first, so the second
     * one's check (a new snapshot, READ COMMITTED) sees the first's commit. */
    rc = qm_pg_exec(pg,
                    "SELECT 1 FROM leavers WHERE person_id = $1 AND started_at IS NOT NULL"
                    " AND completed_at IS NULL FOR UPDATE",
                    p3, 1, NULL, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
    rc = qm_pg_exec(pg,
                    "UPDATE leavers SET completed_at = clock_timestamp()"
                    " WHERE person_id = $1 AND started_at IS NOT NULL AND completed_at IS NULL"
                    " AND NOT EXISTS (SELECT 1 FROM grant_ops WHERE person_id = $1"
                    "  AND op = 'revoke' AND reason = 'leaver' AND state = 'pending')"
                    " RETURNING extract(epoch FROM completed_at - received_at)::float8, grants",
                    p3, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) goto fail;
    if (qm_pg_ntuples(res) > 0) leaver_s = strtod(qm_pg_get(res, 0, 0), NULL);
    qm_pg_result_destroy(res);
    res = NULL;
  }
  rc = qm_pg_commit(pg, errstr, errstr_size);
  if (rc == QM_OK) {
    qm_log(QM_LOG_INFO, o->request_id, NULL, "revoked %s from %s (grant %s, %s)", o->grp,
           o->person_id, o->grant_id, o->reason);
    qm_metrics_inc(qm_metrics_child(prov->m_ops, (const char *const[]){"revoke", "done"}));
    if (leaver_s >= 0) {
      qm_log(QM_LOG_INFO, NULL, NULL,
             "leaver %s deprovisioned: every grant revoked %.3f s after the HR event arrived",
             o->person_id, leaver_s);
      qm_metrics_observe(qm_metrics_child(prov->m_leaver, NULL), leaver_s);
    }
  }
  return rc;
fail:
  qm_pg_result_destroy(res);
  qm_pg_rollback(pg, NULL, 0);
  return rc;
}

/* True when another grant of the same person keeps the same group of the
 * same connector (held, or on its way): a revoke then takes this grant away
 * without removing the membership the other one still needs. */
static int held_elsewhere(qm_pg_t *pg, const grant_op_t *o) {
  qm_pg_param_t p[] = {QM_PG_TEXT(o->person_id), QM_PG_TEXT(o->connector), QM_PG_TEXT(o->grp),
                       QM_PG_TEXT(o->grant_id)};
  qm_pg_result_t *res = NULL;
  char errstr[256];
  if (qm_pg_exec(pg,
                 "SELECT 1 FROM grants WHERE person_id = $1 AND connector = $2 AND grp = $3"
                 " AND grant_id <> $4 AND state IN ('pending', 'active') AND revoke_reason IS NULL"
                 " LIMIT 1",
                 p, 4, &res, errstr, sizeof(errstr)) != QM_OK)
    return -1;
  int held = qm_pg_ntuples(res) > 0;
  qm_pg_result_destroy(res);
  return held;
}

/* Applies one claimed operation to the directory and records the outcome. */
static void apply_op(prov_t *prov, qm_pg_t *pg, const grant_op_t *o) {
  char why[512] = "";
  char user_id[1024] = "", group_id[1024] = "";
  int rc;
  prov_conn_t *c = prov_conn_find(prov, o->connector);
  bool revoke = !strcmp(o->op, "revoke");
  int held = 0;
  if (!c) {
    rc = qm_err(why, sizeof(why), QM_EINVAL,
                "unknown connector '%s' (configure it in QM_CONNECTORS_FILE)", o->connector);
  } else if (revoke && (held = held_elsewhere(pg, o)) != 0) {
    if (held > 0)
      qm_log(QM_LOG_INFO, o->request_id, NULL,
             "revoke %s: %s keeps %s through another grant; membership left in place",
             o->grant_id, o->person_id, o->grp);
    rc = held > 0 ? QM_OK
                  : qm_err(why, sizeof(why), QM_ETRANSIENT, "cannot check the person's other grants");
  } else {
    /* Ids are cached; a directory that re-keyed a user or group (deleted and
     * re-created it) refuses the stale id, so a refusal gets one more try
     * with fresh lookups before it counts. */
    for (int round = 0; round < 2; round++) {
      rc = prov_conn_find_user(c, o->username, user_id, sizeof(user_id), why, sizeof(why));
      if (rc == QM_OK)
        rc = prov_conn_find_group(c, o->grp, group_id, sizeof(group_id), why, sizeof(why));
      if (revoke && rc == QM_ENOTFOUND) { /* no such user or group: not a member */
        rc = QM_OK;
        break;
      }
      if (rc == QM_OK) {
        const char *ids[] = {user_id};
        rc = revoke ? prov_conn_remove(c, group_id, user_id, why, sizeof(why))
                    : prov_conn_add(c, group_id, ids, 1, why, sizeof(why));
      }
      if (rc != QM_EINVAL && rc != QM_ENOTFOUND) break;
      if (round == 0) {
        qm_log(QM_LOG_WARN, o->request_id, NULL,
               "%s %s: directory refused (%s); looking the ids up again", o->op, o->grant_id, why);
        prov_conn_cache_clear(c);
      }
    }
  }
  char errstr[512] = "";
  int frc;
  if (rc != QM_OK) frc = finish_failed(prov, pg, o, rc, why, errstr, sizeof(errstr));
  else if (revoke) frc = finish_revoked(prov, pg, o, errstr, sizeof(errstr));
  else frc = finish_granted(prov, pg, o, user_id, group_id, errstr, sizeof(errstr));
  if (frc != QM_OK) {
    /* The lease runs out and another attempt repeats the idempotent call. */
    qm_log(QM_LOG_WARN, o->request_id, NULL,
           "recording the outcome of %s %s failed (%s); it will be retried after its lease",
           o->op, o->grant_id, errstr);
    if (frc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
  }
}

/* Applies a claimed batch. Grants bound for the same group of the same
 * connector go to the directory in one request (directories cost per request
 * far more than per member); whatever that cannot settle — a lookup or the
 * request failing — takes the one-by-one path of apply_op(), which owns
 * retries and parking. */
static void apply_claimed(prov_t *prov, qm_pg_t *pg, const grant_op_t *ops, int n) {
  bool done[CLAIM_BATCH] = {false};
  static __thread char uids[CLAIM_BATCH][1024];
  for (int i = 0; i < n; i++) {
    if (done[i] || strcmp(ops[i].op, "grant")) continue;
    prov_conn_t *c = prov_conn_find(prov, ops[i].connector);
    if (!c) continue;
    char group_id[1024], why[512];
    int idx[CLAIM_BATCH], m = 0;
    const char *ids[CLAIM_BATCH];
    for (int j = i; j < n; j++) {
      if (done[j] || strcmp(ops[j].op, "grant") || strcmp(ops[j].connector, ops[i].connector) ||
          strcmp(ops[j].grp, ops[i].grp))
        continue;
      idx[m++] = j;
    }
    if (m < 2) continue;
    if (prov_conn_find_group(c, ops[i].grp, group_id, sizeof(group_id), why, sizeof(why)) != QM_OK)
      continue;
    int k = 0;
    for (int x = 0; x < m; x++) {
      if (prov_conn_find_user(c, ops[idx[x]].username, uids[k], sizeof(uids[k]), why,
                              sizeof(why)) != QM_OK)
        continue;
      idx[k] = idx[x];
      ids[k] = uids[k];
      k++;
    }
    if (k < 2) continue;
    if (prov_conn_add(c, group_id, ids, (size_t)k, why, sizeof(why)) != QM_OK) {
      qm_log_warn("adding %d members to %s in one request failed (%s); trying them one by one", k,
                  ops[i].grp, why);
      continue;
    }
    char berr[512] = "";
    if (finish_granted_batch(prov, pg, ops, idx, uids, group_id, k, berr, sizeof(berr)) == QM_OK) {
      for (int x = 0; x < k; x++) done[idx[x]] = true;
      continue;
    }
    qm_log_warn("recording %d grants of %s in one transaction failed (%s); one by one", k,
                ops[i].grp, berr);
    for (int x = 0; x < k; x++) {
      char errstr[512] = "";
      const grant_op_t *o = &ops[idx[x]];
      int rc = finish_granted(prov, pg, o, uids[x], group_id, errstr, sizeof(errstr));
      if (rc != QM_OK) {
        qm_log(QM_LOG_WARN, o->request_id, NULL,
               "recording the outcome of grant %s failed (%s); it will be retried after its lease",
               o->grant_id, errstr);
        if (rc == QM_ETRANSIENT) qm_pg_ensure(pg, qm_mono_ms() + 1000);
      }
      done[idx[x]] = true;
    }
  }
  for (int i = 0; i < n; i++) {
    if (done[i]) continue;
    if (!atomic_load(&prov->stopping)) {
      apply_op(prov, pg, &ops[i]);
    } else { /* hand the rest back at once instead of waiting out the lease */
      char e[256];
      finish_failed(prov, pg, &ops[i], QM_ESHUTDOWN, "shutdown", e, sizeof(e));
    }
  }
}

static void *worker_main(void *arg) {
  worker_ctx_t *wc = arg;
  prov_t *prov = wc->prov;
  const qm_config_t *cfg = qm_service_config(prov->svc);
  int64_t poll = qm_config_ms(cfg, "QM_PROVISIONING_POLL");
  char errstr[512];
  char app[64];
  snprintf(app, sizeof(app), "qm-provisioning-worker-%d", wc->index);
  qm_pg_t *pg = NULL;
  while (!pg && !atomic_load(&prov->stopping)) {
    pg = qm_pg_connect_app(qm_service_dsn(prov->svc), "provisioning", app, errstr, sizeof(errstr));
    if (!pg) {
      qm_log_warn("worker %d: PostgreSQL: %s (retrying)", wc->index, errstr);
      qm_sleep_ms(1000);
    }
  }
  static __thread grant_op_t ops[CLAIM_BATCH];
  /* Stop claiming at the first sign of shutdown; what is in hand finishes. */
  while (pg && !atomic_load(&prov->stopping) && !qm_shutdown_requested()) {
    int n = claim(prov, pg, ops);
    if (n > 0) apply_claimed(prov, pg, ops, n);
    for (int i = 0; i < n; i++) {
      free(ops[i].approved);
      free(ops[i].actor);
      free(ops[i].comment);
    }
    if (n <= 0) {
      int64_t until = qm_mono_ms() + poll;
      while (qm_mono_ms() < until && !atomic_load(&prov->stopping) && !qm_shutdown_requested())
        qm_sleep_ms(5);
    }
  }
  qm_pg_destroy(pg);
  free(wc);
  return NULL;
}

int prov_workers_start(prov_t *prov, char *errstr, size_t errstr_size) {
  size_t n = (size_t)qm_config_int(qm_service_config(prov->svc), "QM_PROVISIONING_WORKERS");
  for (size_t i = 0; i < n; i++) {
    worker_ctx_t *wc = qm_calloc(1, sizeof(*wc));
    wc->prov = prov;
    wc->index = (int)i;
    if (pthread_create(&prov->workers[i], NULL, worker_main, wc) != 0) {
      free(wc);
      prov_workers_stop(prov);
      return qm_err(errstr, errstr_size, QM_EIO, "cannot start worker thread %zu", i);
    }
    prov->n_workers++;
  }
  return QM_OK;
}

void prov_workers_stop(prov_t *prov) {
  atomic_store(&prov->stopping, true);
  for (size_t i = 0; i < prov->n_workers; i++) pthread_join(prov->workers[i], NULL);
  prov->n_workers = 0;
}
