/*
 * approval: the state shared by qm-approval's modules —
 *   main.c    configuration, migrations, the consumer handler, start and stop;
 *   people.c  its own people directory (seed file + qm.hr.lifecycle.v1) and
 *             what each subject holds (qm.access.v1 and its own approvals);
 *   route.c   plans, who may decide (exclusions, delegation, fallback chain),
 *             separation of duties, decisions, break-glass, timers' effects;
 *   api.c     the HTTP API (inbox, decide, away/delegate, break-glass);
 *   notify.c  webhook notifications: an outbox table drained by a worker.
 */
#ifndef QM_APPROVAL_H
#define QM_APPROVAL_H

#include "qm_metrics.h"
#include "qm_service.h"
#include "qm_timer.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define APPROVAL_MAX_LIST 32 /* approvers in a configured list, SoD pairs */
#define APPROVAL_ID_MAX 96

/* A comma-separated list of person ids from the configuration. */
typedef struct id_list {
  char ids[APPROVAL_MAX_LIST][APPROVAL_ID_MAX];
  size_t n;
} id_list_t;

/* One separation-of-duties pair: item:role on each side ("*" any role). */
typedef struct sod_pair {
  char a_item[APPROVAL_ID_MAX], a_role[APPROVAL_ID_MAX];
  char b_item[APPROVAL_ID_MAX], b_role[APPROVAL_ID_MAX];
} sod_pair_t;

/* Clocks of a pending step, per risk (index: Qm__V1__Risk value 1..3). */
typedef struct step_clocks {
  int64_t remind_ms, escalate_ms, reject_ms;
} step_clocks_t;

typedef struct approval {
  qm_service_t *svc;
  qm_timers_t *timers;
  int64_t cost_threshold_minor; /* QM_APPROVAL_COST_THRESHOLD × 100 */
  id_list_t finance, security, fallback;
  sod_pair_t sod[APPROVAL_MAX_LIST];
  size_t n_sod;
  bool sod_to_security; /* QM_APPROVAL_SOD_MODE=security; else refused */
  step_clocks_t clocks[4];
  int elevated_default_days;
  /* notifications */
  char *webhook_url; /* NULL: notifications are not recorded */
  int64_t webhook_timeout_ms, webhook_backoff_ms;
  int webhook_max_attempts;
  pthread_t notifier;
  bool notifier_running;
  atomic_bool stopping;
  /* metrics */
  qm_metric_family_t *m_decisions;     /* qm_approval_decisions_total{outcome,how} */
  qm_metric_family_t *m_steps;         /* qm_approval_steps_opened_total{kind} */
  qm_metric_family_t *m_notifications; /* qm_approval_notifications_total{outcome} */
} approval_t;

/* ---- people.c ---- */
int people_seed(approval_t *ap, const char *path, char *errstr, size_t errstr_size);
int people_apply_hr(qm_pg_t *tx, const Qm__V1__HrEvent *he, char *errstr, size_t errstr_size);
int holdings_apply_access(qm_pg_t *tx, const Qm__V1__AccessEvent *ae, char *errstr,
                          size_t errstr_size);
int holdings_add(qm_pg_t *tx, const char *subject, const char *item, const char *role,
                 const char *source, char *errstr, size_t errstr_size);
/* True when approval's directory has person id as terminated. */
bool people_is_terminated(qm_pg_t *tx, const char *id);
/* The manager of person id, or "" (out, APPROVAL_ID_MAX bytes). */
int people_manager_of(qm_pg_t *tx, const char *id, char *out, char *errstr, size_t errstr_size);

/* ---- route.c ---- */
int route_submitted(approval_t *ap, qm_pg_t *tx, const char *traceparent,
                    const Qm__V1__RequestSubmitted *rs, char *errstr, size_t errstr_size);
int route_cancelled(approval_t *ap, qm_pg_t *tx, const Qm__V1__RequestCancelled *rc_ev,
                    char *errstr, size_t errstr_size);
/* A person left (HR leaver): their pending steps go to the remaining
 * approvers, or along the fallback chain when they were the only one. */
int route_approver_left(approval_t *ap, qm_pg_t *tx, const char *person_id,
                        const char *traceparent, char *errstr, size_t errstr_size);
/* The timer callback (qm_timer_fire_fn): reminder, escalation, auto_reject. */
int route_fire(void *ctx, qm_pg_t *tx, const qm_timer_t *tm, char *errstr, size_t errstr_size);

/* A person's decision on a step. Returns QM_OK, QM_ENOTFOUND (no such
 * step), QM_ECONFLICT (not pending any more), QM_EFORBIDDEN (not an
 * approver of it, or their own request: errstr says which). */
typedef struct decide_in {
  const char *step_id;
  const char *who;
  const char *const *roles;
  size_t n_roles;
  bool approve;
  const char *comment;
  const char *traceparent;
} decide_in_t;
int route_decide(approval_t *ap, qm_pg_t *tx, const decide_in_t *in, char *errstr,
                 size_t errstr_size);

/* Break-glass: an it_admin approves a pending line at once. Same codes. */
typedef struct break_glass_in {
  const char *request_id;
  int line_no;
  const char *who;
  const char *const *roles;
  size_t n_roles;
  const char *justification;
  const char *traceparent;
} break_glass_in_t;
int route_break_glass(approval_t *ap, qm_pg_t *tx, const break_glass_in_t *in, char *errstr,
                      size_t errstr_size);

/* ---- notify.c ---- */
/* Records a notification for the worker in tx (nothing when no webhook is
 * configured). recipients: n person ids (duplicates and "" skipped). */
int notify_add(approval_t *ap, qm_pg_t *tx, const char *kind, const char *request_id,
               const char *const *recipients, size_t n, const char *text, char *errstr,
               size_t errstr_size);
int notify_start(approval_t *ap);
void notify_stop(approval_t *ap);

/* ---- api.c ---- */
int api_register(approval_t *ap, char *errstr, size_t errstr_size);

#endif /* QM_APPROVAL_H */
