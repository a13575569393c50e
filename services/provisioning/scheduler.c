/*
 * scheduler: what happens to grants by the clock.
 *
 *  - Expiry and expiry notices are qm_timer timers (PostgreSQL truth, Redis
 *    firing, leased claims): when a time-bound grant is applied, timers
 *    "expire" (at expires_at) and "notice" (QM_EXPIRY_NOTICE_BEFORE ahead)
 *    are added in the same transaction; an extension cancels and re-adds
 *    them. "expire" queues the revoke operation (reason "expired"); "notice"
 *    calls the webhook and publishes ExpiryNotice. A leaver dated in the
 *    future waits as a timer "leaver" for its effective date.
 *  - Drift reconciliation runs every QM_DRIFT_INTERVAL on one instance at a
 *    time (a session advisory lock): each managed group's members are read
 *    from its directory and compared with the grants; findings are recorded,
 *    published as DriftDetected, and repaired where configured. A finding to
 *    repair is committed before the directory is touched (repaired false,
 *    repair_started_at set), then marked with the repair's outcome and
 *    published: a crash mid-repair never leaves an unrecorded change.
 */
#include "provisioning.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_timer.h"
#include "qm_topics.h"

#include "qm/v1/access.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- timers ---------------------------------------------------------------- */

int prov_timers_arm(prov_t *prov, qm_pg_t *tx, const char *grant_id, int64_t expires_ms,
                    char *errstr, size_t errstr_size) {
  int rc = qm_timer_cancel_owner(tx, "timers", grant_id, NULL, NULL, errstr, errstr_size);
  if (rc != QM_OK || expires_ms <= 0) return rc;
  rc = qm_timer_add(tx, "timers", "expire", grant_id, NULL, 0, expires_ms, NULL, errstr,
                    errstr_size);
  if (rc == QM_OK && prov->notice_before_ms > 0)
    rc = qm_timer_add(tx, "timers", "notice", grant_id, NULL, 0,
                      expires_ms - prov->notice_before_ms, NULL, errstr, errstr_size);
  return rc;
}

static int fire_expire(prov_t *prov, qm_pg_t *tx, const qm_timer_t *t, char *errstr,
                       size_t errstr_size) {
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  actor.service = (char *)"provisioning";
  /* Only an active grant whose expiry has come: an extension re-arms the
   * timers, so a stale one finds a later expires_at and does nothing. */
  qm_pg_param_t p[] = {QM_PG_TEXT(t->owner_key)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT 1 FROM grants WHERE grant_id = $1 AND state = 'active'"
                      " AND expires_at <= now() + interval '1 second'",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool due = qm_pg_ntuples(res) == 1;
  qm_pg_result_destroy(res);
  if (!due) return QM_OK;
  int queued = 0;
  rc = prov_revoke_queue(prov, tx, NULL, t->owner_key, NULL, NULL, "expired", NULL, &actor, &queued,
                         errstr, errstr_size);
  if (rc == QM_OK && queued)
    qm_log(QM_LOG_INFO, NULL, NULL, "grant %s expired; revocation queued", t->owner_key);
  return rc;
}

/* Records the notice: the grant marked noticed (a short row lock, gone when
 * the timer's transaction commits), a row of expiry_notices for the sender
 * (notices.c) when a webhook is configured, and ExpiryNotice via the outbox.
 * Nothing here waits on the receiver. */
static int fire_notice(prov_t *prov, qm_pg_t *tx, const qm_timer_t *t, char *errstr,
                       size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(t->owner_key)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE grants SET notice_sent_at = now()"
                      " WHERE grant_id = $1 AND state = 'active' AND revoke_reason IS NULL"
                      " AND expires_at IS NOT NULL AND notice_sent_at IS NULL"
                      " RETURNING request_id, person_id, item_id, role_id, grp,"
                      " (extract(epoch FROM expires_at) * 1000)::bigint",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) != 1) { /* revoked, extended (re-armed) or noticed already */
    qm_pg_result_destroy(res);
    return QM_OK;
  }
  Qm__V1__ExpiryNotice en = QM__V1__EXPIRY_NOTICE__INIT;
  en.request_id = (char *)qm_pg_get(res, 0, 0);
  en.grant_id = (char *)t->owner_key;
  en.subject_person_id = (char *)qm_pg_get(res, 0, 1);
  en.item_id = (char *)qm_pg_get(res, 0, 2);
  en.role_id = (char *)qm_pg_get(res, 0, 3);
  qm_pg_get_int64(res, 0, 5, &en.expires_at_ms);
  const char *url = qm_config_str(qm_service_config(prov->svc), "QM_EXPIRY_WEBHOOK_URL");
  bool hook = url && *url;
  if (hook) {
    char when[40];
    qm_time_format_rfc3339(en.expires_at_ms, when, sizeof(when));
    json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "type",
                          "qm.access.expiry_notice.v1", "grant_id", en.grant_id, "request_id",
                          en.request_id, "person_id", en.subject_person_id, "item_id",
                          en.item_id, "role_id", en.role_id, "group", qm_pg_get(res, 0, 4),
                          "expires_at", when);
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    rc = prov_notice_add(tx, en.grant_id, en.expires_at_ms, body, errstr, errstr_size);
    free(body);
  }
  if (rc == QM_OK) {
    Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
    ae.event_case = QM__V1__ACCESS_EVENT__EVENT_EXPIRY_NOTICE;
    ae.expiry_notice = &en;
    rc = qm_service_emit(prov->svc, tx, QM_TOPIC_ACCESS, en.subject_person_id,
                         "qm.access.expiry_notice.v1", en.request_id, NULL, &ae.base, NULL,
                         errstr, errstr_size);
  }
  if (rc == QM_OK) {
    if (!hook) qm_metrics_inc(qm_metrics_child(prov->m_notices, (const char *const[]){"none"}));
    qm_log(QM_LOG_INFO, en.request_id, NULL, "expiry notice for grant %s of %s (webhook: %s)",
           en.grant_id, en.subject_person_id, hook ? "queued" : "none");
  }
  qm_pg_result_destroy(res);
  return rc;
}

static int fire_leaver(prov_t *prov, qm_pg_t *tx, const qm_timer_t *t, char *errstr,
                       size_t errstr_size) {
  return prov_leaver_start(prov, tx, t->owner_key, errstr, errstr_size);
}

static int fire(void *ctx, qm_pg_t *tx, const qm_timer_t *t, char *errstr, size_t errstr_size) {
  prov_t *prov = ctx;
  if (!strcmp(t->kind, "expire")) return fire_expire(prov, tx, t, errstr, errstr_size);
  if (!strcmp(t->kind, "notice")) return fire_notice(prov, tx, t, errstr, errstr_size);
  if (!strcmp(t->kind, "leaver")) return fire_leaver(prov, tx, t, errstr, errstr_size);
  return qm_err(errstr, errstr_size, QM_EINVAL, "unknown timer kind '%s'", t->kind);
}

/* ---- drift ------------------------------------------------------------------ */

/* A finding about to be repaired is recorded first, committed on its own
 * (repaired false, repair_started_at set): the directory is changed only
 * once the finding is on record, so a crash mid-repair leaves a row saying
 * a repair was started, never an unrecorded change. *id receives its id. */
static int open_finding(qm_pg_t *pg, prov_conn_t *c, const char *grp, const char *finding,
                        const char *dir_user_id, const char *person_id, const char *grant_id,
                        int64_t *id, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(c->name),
                       QM_PG_TEXT(grp),
                       QM_PG_TEXT(finding),
                       QM_PG_TEXT(dir_user_id),
                       person_id && *person_id ? QM_PG_TEXT(person_id) : QM_PG_NULL,
                       grant_id && *grant_id ? QM_PG_TEXT(grant_id) : QM_PG_NULL};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "INSERT INTO drift_findings (connector, grp, finding, directory_user_id,"
                      " person_id, grant_id, repaired, repair_started_at)"
                      " VALUES ($1, $2, $3, $4, $5, $6, false, now()) RETURNING id",
                      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  if (rc == QM_OK) qm_pg_get_int64(res, 0, 0, id);
  qm_pg_result_destroy(res);
  return rc;
}

/* Records a finding and publishes DriftDetected in one transaction: a new
 * row when id is 0, else the outcome of the repair of open_finding()'s row. */
static int record_finding(prov_t *prov, qm_pg_t *pg, prov_conn_t *c, const char *grp,
                          const char *finding, const char *dir_user_id, const char *person_id,
                          const char *grant_id, int64_t id, bool repaired, char *errstr,
                          size_t errstr_size) {
  int rc = qm_pg_begin(pg, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_TEXT(c->name),
                       QM_PG_TEXT(grp),
                       QM_PG_TEXT(finding),
                       QM_PG_TEXT(dir_user_id),
                       person_id && *person_id ? QM_PG_TEXT(person_id) : QM_PG_NULL,
                       grant_id && *grant_id ? QM_PG_TEXT(grant_id) : QM_PG_NULL,
                       QM_PG_TEXT(repaired ? "true" : "false")};
  qm_pg_param_t u[] = {QM_PG_INT64(id), QM_PG_TEXT(repaired ? "true" : "false")};
  if (id > 0)
    rc = qm_pg_exec(pg,
                    "UPDATE drift_findings SET repaired = $2::boolean,"
                    " repair_finished_at = now() WHERE id = $1::bigint",
                    u, 2, NULL, errstr, errstr_size);
  else
    rc = qm_pg_exec(pg,
                    "INSERT INTO drift_findings (connector, grp, finding, directory_user_id,"
                    " person_id, grant_id, repaired) VALUES ($1, $2, $3, $4, $5, $6, $7::boolean)",
                    p, QM_ARRAY_LEN(p), NULL, errstr, errstr_size);
  if (rc == QM_OK) {
    Qm__V1__DriftDetected dd = QM__V1__DRIFT_DETECTED__INIT;
    dd.group = (char *)grp;
    dd.connector = c->name;
    dd.finding = (char *)finding;
    dd.directory_user_id = (char *)dir_user_id;
    dd.subject_person_id = (char *)(person_id ? person_id : "");
    dd.grant_id = (char *)(grant_id ? grant_id : "");
    dd.repaired = repaired;
    Qm__V1__AccessEvent ae = QM__V1__ACCESS_EVENT__INIT;
    ae.event_case = QM__V1__ACCESS_EVENT__EVENT_DRIFT;
    ae.drift = &dd;
    /* Key: the person when known, else the group (a stranger in a group). */
    rc = qm_service_emit(prov->svc, pg, QM_TOPIC_ACCESS, person_id && *person_id ? person_id : grp,
                         "qm.access.drift_detected.v1", grant_id && *grant_id ? grant_id : grp,
                         NULL, &ae.base, NULL, errstr, errstr_size);
  }
  if (rc == QM_OK) rc = qm_pg_commit(pg, errstr, errstr_size);
  else qm_pg_rollback(pg, NULL, 0);
  if (rc == QM_OK) {
    qm_metrics_inc(qm_metrics_child(
        prov->m_drift, (const char *const[]){finding, repaired ? "true" : "false"}));
    qm_log(QM_LOG_WARN, NULL, NULL, "drift in %s/%s: %s %s%s%s%s", c->name, grp, finding,
           dir_user_id, person_id && *person_id ? " (person " : "",
           person_id && *person_id ? person_id : "", person_id && *person_id ? ")" : "");
  }
  return rc;
}

/* Reconciles one group. Returns findings published, or < 0. */
static int drift_group(prov_t *prov, qm_pg_t *pg, prov_conn_t *c, const char *grp, bool repair,
                       char *errstr, size_t errstr_size) {
  char why[512], group_id[1024];
  int found = 0;
  int rc = prov_conn_find_group(c, grp, group_id, sizeof(group_id), why, sizeof(why));
  if (rc != QM_OK) {
    qm_log_warn("drift: group %s on %s: %s (skipped this round)", grp, c->name, why);
    return 0;
  }
  /* The time the listing starts: grants settled before it must show as
   * members; grants applied or revoked after it may or may not. */
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(pg, "SELECT clock_timestamp()::text", NULL, 0, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char t0[64];
  qm_strlcpy(t0, qm_pg_get(res, 0, 0), sizeof(t0));
  qm_pg_result_destroy(res);
  json_t *members = json_object();
  rc = prov_conn_list(c, group_id, members, why, sizeof(why));
  if (rc != QM_OK) {
    json_decref(members);
    qm_log_warn("drift: listing %s on %s: %s (skipped this round)", grp, c->name, why);
    return 0;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(c->name), QM_PG_TEXT(grp), QM_PG_TEXT(t0)};
  rc = qm_pg_exec(pg,
                  "SELECT grant_id, person_id, directory_username, coalesce(directory_user_id, ''),"
                  " state, (state = 'active' AND revoke_reason IS NULL"
                  "  AND granted_at < $3::timestamptz) AS settled"
                  " FROM grants WHERE connector = $1 AND grp = $2"
                  " AND (state IN ('pending', 'active', 'failed')"
                  "  OR (state = 'revoked' AND revoked_at >= $3::timestamptz))",
                  p, 3, &res, errstr, errstr_size);
  if (rc != QM_OK) {
    json_decref(members);
    return rc;
  }
  json_t *held = json_object(); /* normalised directory user id -> true */
  int n = qm_pg_ntuples(res);
  char norm[1024], uid[1024];
  for (int i = 0; i < n; i++) {
    const char *dir_id = qm_pg_get(res, i, 3);
    if (*dir_id) {
      prov_conn_norm_id(c, dir_id, norm, sizeof(norm));
    } else { /* not applied yet: its user may be joining the group right now */
      if (prov_conn_find_user(c, qm_pg_get(res, i, 2), uid, sizeof(uid), why, sizeof(why)) != QM_OK)
        continue;
      prov_conn_norm_id(c, uid, norm, sizeof(norm));
    }
    json_object_set_new(held, norm, json_true());
  }
  for (int i = 0; i < n && rc == QM_OK; i++) {
    if (strcmp(qm_pg_get(res, i, 5), "t") != 0) continue;
    const char *dir_id = qm_pg_get(res, i, 3);
    prov_conn_norm_id(c, dir_id, norm, sizeof(norm));
    if (json_object_get(members, norm)) continue;
    bool repaired = false;
    int64_t fid = 0;
    if (repair) {
      rc = open_finding(pg, c, grp, "grant_without_member", dir_id, qm_pg_get(res, i, 1),
                        qm_pg_get(res, i, 0), &fid, errstr, errstr_size);
      if (rc != QM_OK) break;
      const char *ids[] = {dir_id};
      repaired = prov_conn_add(c, group_id, ids, 1, why, sizeof(why)) == QM_OK;
      if (!repaired) qm_log_warn("drift repair (re-add %s to %s) failed: %s", dir_id, grp, why);
    }
    rc = record_finding(prov, pg, c, grp, "grant_without_member", dir_id, qm_pg_get(res, i, 1),
                        qm_pg_get(res, i, 0), fid, repaired, errstr, errstr_size);
    if (rc == QM_OK) found++;
  }
  qm_pg_result_destroy(res);
  const char *m;
  json_t *unused;
  json_object_foreach(members, m, unused) {
    if (rc != QM_OK) break;
    if (json_object_get(held, m)) continue;
    /* Whose id is it? The newest grant that knew it says. */
    qm_pg_param_t q[] = {QM_PG_TEXT(c->name), QM_PG_TEXT(m)};
    char person[256] = "";
    rc = qm_pg_exec(pg,
                    "SELECT person_id FROM grants WHERE connector = $1"
                    " AND lower(directory_user_id) = lower($2) ORDER BY seq DESC LIMIT 1",
                    q, 2, &res, errstr, errstr_size);
    if (rc != QM_OK) break;
    if (qm_pg_ntuples(res) == 1) qm_strlcpy(person, qm_pg_get(res, 0, 0), sizeof(person));
    qm_pg_result_destroy(res);
    bool repaired = false;
    int64_t fid = 0;
    if (repair) {
      rc = open_finding(pg, c, grp, "member_without_grant", m, person, NULL, &fid, errstr,
                        errstr_size);
      if (rc != QM_OK) break;
      repaired = prov_conn_remove(c, group_id, m, why, sizeof(why)) == QM_OK;
      if (!repaired) qm_log_warn("drift repair (remove %s from %s) failed: %s", m, grp, why);
    }
    rc = record_finding(prov, pg, c, grp, "member_without_grant", m, person, NULL, fid, repaired,
                        errstr, errstr_size);
    if (rc == QM_OK) found++;
  }
  json_decref(members);
  json_decref(held);
  return rc == QM_OK ? found : rc;
}

int prov_drift_run(prov_t *prov, qm_pg_t *pg, char *errstr, size_t errstr_size) {
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg, "SELECT DISTINCT connector, grp FROM grants ORDER BY 1, 2", NULL, 0,
                      &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  bool repair_default = qm_config_bool(qm_service_config(prov->svc), "QM_DRIFT_REPAIR");
  int total = 0;
  for (int i = 0; i < qm_pg_ntuples(res) && !atomic_load(&prov->stopping); i++) {
    prov_conn_t *c = prov_conn_find(prov, qm_pg_get(res, i, 0));
    if (!c) continue;
    bool repair = c->drift_repair >= 0 ? c->drift_repair == 1 : repair_default;
    int n = drift_group(prov, pg, c, qm_pg_get(res, i, 1), repair, errstr, errstr_size);
    if (n < 0) {
      rc = n;
      break;
    }
    total += n;
  }
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    qm_log_info("drift reconciliation: %d finding(s)", total);
  return rc == QM_OK ? total : rc;
}

static void *drift_main(void *arg) {
  prov_t *prov = arg;
  int64_t interval = qm_config_ms(qm_service_config(prov->svc), "QM_DRIFT_INTERVAL");
  qm_pg_t *pg = NULL;
  int64_t next = qm_mono_ms() + interval;
  char errstr[512];
  while (!atomic_load(&prov->stopping) && !qm_shutdown_requested()) {
    qm_sleep_ms(50);
    if (interval <= 0 || qm_mono_ms() < next) continue;
    next = qm_mono_ms() + interval;
    if (!pg) pg = qm_pg_connect_app(qm_service_dsn(prov->svc), "provisioning",
                                    "qm-provisioning-drift", errstr, sizeof(errstr));
    if (!pg) {
      qm_log_warn("drift: PostgreSQL: %s (next round)", errstr);
      continue;
    }
    /* One instance at a time: a session lock, gone with a crashed session. */
    qm_pg_param_t p[] = {QM_PG_INT64(qm_pg_advisory_key("qm-provisioning-drift"))};
    qm_pg_result_t *res = NULL;
    if (qm_pg_exec(pg, "SELECT pg_try_advisory_lock($1::bigint)", p, 1, &res, errstr,
                   sizeof(errstr)) != QM_OK) {
      qm_pg_destroy(pg);
      pg = NULL;
      continue;
    }
    bool mine = !strcmp(qm_pg_get(res, 0, 0), "t");
    qm_pg_result_destroy(res);
    if (!mine) continue;
    if (prov_drift_run(prov, pg, errstr, sizeof(errstr)) < 0)
      qm_log_warn("drift reconciliation failed: %s (next round)", errstr);
    qm_pg_exec(pg, "SELECT pg_advisory_unlock($1::bigint)", p, 1, NULL, errstr, sizeof(errstr));
  }
  qm_pg_destroy(pg);
  return NULL;
}

int prov_scheduler_start(prov_t *prov, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(prov->svc);
  qm_timers_conf_t tc = {
      .dsn = qm_service_dsn(prov->svc),
      .schema = "provisioning",
      .table = "timers",
      .redis_host = qm_config_str(cfg, "QM_REDIS_HOST"),
      .redis_port = (int)qm_config_int(cfg, "QM_REDIS_PORT"),
      .poll_ms = (int)qm_config_ms(cfg, "QM_PROVISIONING_TICK"),
      .retry_ms = (int)qm_config_ms(cfg, "QM_PROVISIONING_TICK") * 5,
      .fire = fire,
      .fire_ctx = prov,
      .metrics = qm_service_metrics(prov->svc),
  };
  prov->timers = qm_timers_new(&tc, errstr, errstr_size);
  if (!prov->timers) return QM_EINVAL;
  if (qm_timers_start(prov->timers) != QM_OK) {
    qm_timers_destroy(prov->timers);
    prov->timers = NULL;
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the timer thread");
  }
  if (pthread_create(&prov->scheduler, NULL, drift_main, prov) != 0) {
    qm_timers_destroy(prov->timers);
    prov->timers = NULL;
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the drift thread");
  }
  prov->scheduler_running = true;
  int rc = prov_notices_start(prov, errstr, errstr_size);
  if (rc != QM_OK) prov_scheduler_stop(prov);
  return rc;
}

void prov_scheduler_stop(prov_t *prov) {
  atomic_store(&prov->stopping, true);
  if (prov->scheduler_running) pthread_join(prov->scheduler, NULL);
  prov->scheduler_running = false;
  prov_notices_stop(prov);
  qm_timers_destroy(prov->timers);
  prov->timers = NULL;
}
