/*
 * timers: fulfilment SLAs and loaner overdue reminders on qm_timer
 * (PostgreSQL truth, Redis firing with leases, so each fires once across
 * instances and survives a Redis flush).
 *
 *  - "sla" (owner "task:<seq>"), added when a task opens, due at its item
 *    type's SLA; cancelled when the task closes. Firing on a task still open
 *    marks it breached, publishes SLA_BREACHED and counts
 *    qm_fulfillment_sla_breaches_total{item_type}.
 *  - "leaver" (owner the person id, payload the effective date): a leaver
 *    dated in the future is recalled on that day.
 *  - "loan_overdue" (owner "loan:<id>"), due at the booking's end; firing on
 *    a loan not yet returned publishes LOAN_OVERDUE (the reminder).
 */
#include "fulfillment.h"

#include "qm_common.h"
#include "qm_config.h"
#include "qm_log.h"
#include "qm_timer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fire_sla(ff_t *ff, qm_pg_t *tx, const qm_timer_t *t, char *errstr,
                    size_t errstr_size) {
  int64_t seq = strtoll(t->owner_key + 5, NULL, 10);
  qm_pg_param_t p[] = {QM_PG_INT64(seq)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE tasks SET sla_breached = true, updated_at = now()"
                      " WHERE seq = $1::bigint AND state = 'open' AND NOT sla_breached"
                      " RETURNING coalesce(item_type, ''), request_id",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 1) {
    char item_type[64], note[160];
    qm_strlcpy(item_type, qm_pg_get(res, 0, 0), sizeof(item_type));
    snprintf(note, sizeof(note), "SLA for %s breached: not fulfilled in time",
             item_type[0] ? item_type : "this item");
    qm_log(QM_LOG_WARN, qm_pg_get(res, 0, 1), NULL,
           "%s; look at the task in the staging queue (GET /v1/tasks/%lld)", note, (long long)seq);
    rc = ff_task_emit(ff, tx, seq, QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_SLA_BREACHED, note,
                      NULL, errstr, errstr_size);
    if (rc == QM_OK)
      qm_metrics_inc(qm_metrics_child(ff->m_sla, (const char *const[]){item_type, NULL}));
  }
  qm_pg_result_destroy(res);
  return rc;
}

static int fire(void *ctx, qm_pg_t *tx, const qm_timer_t *t, char *errstr, size_t errstr_size) {
  ff_t *ff = ctx;
  if (!strcmp(t->kind, "sla") && !strncmp(t->owner_key, "task:", 5))
    return fire_sla(ff, tx, t, errstr, errstr_size);
  if (!strcmp(t->kind, "leaver")) { /* a leaver dated in the future: the day has come */
    char date[16] = "";
    if (t->payload && t->payload_len < sizeof(date)) memcpy(date, t->payload, t->payload_len);
    int n = 0;
    int rc = ff_leaver(ff, tx, t->owner_key, date, NULL, &n, errstr, errstr_size);
    if (rc == QM_OK) qm_log_info("leaver %s (effective %s): %d return task(s) opened", t->owner_key, date, n);
    return rc;
  }
  if (!strcmp(t->kind, "loan_overdue") && !strncmp(t->owner_key, "loan:", 5))
    return ff_loan_overdue(ff, tx, t->owner_key + 5, errstr, errstr_size);
  return qm_err(errstr, errstr_size, QM_EINVAL, "unknown timer kind %s", t->kind);
}

int ff_timers_start(ff_t *ff, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(ff->svc);
  int64_t tick = qm_config_ms(cfg, "QM_FULFILLMENT_TICK");
  qm_timers_conf_t tc = {
      .dsn = qm_service_dsn(ff->svc),
      .schema = "fulfillment",
      .table = "timers",
      .redis_host = qm_config_str(cfg, "QM_REDIS_HOST"),
      .redis_port = (int)qm_config_int(cfg, "QM_REDIS_PORT"),
      .poll_ms = (int)tick,
      .retry_ms = (int)(tick * 5),
      .fire = fire,
      .fire_ctx = ff,
      .metrics = qm_service_metrics(ff->svc),
  };
  ff->timers = qm_timers_new(&tc, errstr, errstr_size);
  if (!ff->timers) return QM_EINVAL;
  if (qm_timers_start(ff->timers) != QM_OK) {
    qm_timers_destroy(ff->timers);
    ff->timers = NULL;
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the timer thread");
  }
  return QM_OK;
}

void ff_timers_stop(ff_t *ff) {
  qm_timers_destroy(ff->timers);
  ff->timers = NULL;
}
