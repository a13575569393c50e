/*
 * qm-approval: decides who must say yes to each request line, asks them,
 * chases them, and never lets a request stall or a person approve their own
 * access.
 *
 * It consumes qm.requests.v1 (submitted, cancelled), qm.hr.lifecycle.v1 (its
 * own people directory: managers, departments, titles, leavers) and
 * qm.access.v1 (what each subject holds, for context and separation of
 * duties), and publishes qm.decisions.v1. Plans and decisions live in its
 * schema; step timers (reminder, escalation, auto-reject) in its timers table,
 * fired through qm_timer from Redis by whichever instance is free.
 */
#include "approval.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_outbox.h"
#include "qm_topics.h"

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
    {3, "plans, people, holdings, away periods, notifications",
     "ALTER TABLE approval_lines"
     " ADD COLUMN owner_id text NOT NULL DEFAULT '',"
     " ADD COLUMN subject_manager_id text NOT NULL DEFAULT '',"
     " ADD COLUMN cost_minor bigint NOT NULL DEFAULT 0,"
     " ADD COLUMN regulated boolean NOT NULL DEFAULT false,"
     " ADD COLUMN duration_days int NOT NULL DEFAULT 0,"
     " ADD COLUMN max_duration_days int NOT NULL DEFAULT 0,"
     " ADD COLUMN reason text NOT NULL DEFAULT '',"
     " ADD COLUMN flags text[] NOT NULL DEFAULT '{}',"
     " ADD COLUMN sod_warnings text[] NOT NULL DEFAULT '{}',"
     " ADD COLUMN reject_reason text,"
     " ADD COLUMN break_glass boolean NOT NULL DEFAULT false,"
     " ADD COLUMN break_glass_justification text,"
     " ADD COLUMN break_glass_by text;"
     "ALTER TABLE approval_steps DROP CONSTRAINT approval_steps_status_check;"
     "ALTER TABLE approval_steps ADD CONSTRAINT approval_steps_status_check"
     " CHECK (status IN ('waiting','pending','approved','rejected','cancelled'));"
     "ALTER TABLE approval_steps"
     " ADD COLUMN seq bigserial,"
     " ADD COLUMN all_required boolean NOT NULL DEFAULT false,"
     " ADD COLUMN approvals text[] NOT NULL DEFAULT '{}',"
     " ADD COLUMN delegated_from text[] NOT NULL DEFAULT '{}',"
     " ADD COLUMN deadline_ms bigint,"
     " ADD COLUMN opened_at_ms bigint,"
     " ADD COLUMN reminders int NOT NULL DEFAULT 0,"
     " ADD COLUMN escalated boolean NOT NULL DEFAULT false,"
     " ADD COLUMN decided_by text,"
     " ADD COLUMN comment text,"
     " ADD COLUMN break_glass boolean NOT NULL DEFAULT false;"
     "CREATE INDEX approval_steps_seq ON approval_steps (seq) WHERE status = 'pending';"
     "CREATE INDEX approval_steps_approvers ON approval_steps USING gin (approver_ids)"
     " WHERE status = 'pending';"
     "CREATE INDEX approval_lines_subject ON approval_lines (subject_person_id, item_id);"
     "CREATE TABLE people ("
     " id text PRIMARY KEY,"
     " name text NOT NULL DEFAULT '',"
     " email text NOT NULL DEFAULT '',"
     " manager_id text NOT NULL DEFAULT '',"
     " department text NOT NULL DEFAULT '',"
     " job_function text NOT NULL DEFAULT '',"
     " status text NOT NULL DEFAULT 'active',"
     " effective_date text NOT NULL DEFAULT '',"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "CREATE TABLE holdings ("
     " subject_person_id text NOT NULL,"
     " item_id text NOT NULL,"
     " role_id text NOT NULL DEFAULT '',"
     " source text NOT NULL,"
     " since timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (subject_person_id, item_id, role_id));"
     "CREATE TABLE away ("
     " person_id text PRIMARY KEY,"
     " delegate_id text,"
     " from_ms bigint NOT NULL,"
     " until_ms bigint,"
     " note text NOT NULL DEFAULT '',"
     " set_at timestamptz NOT NULL DEFAULT now());"
     "CREATE INDEX away_delegate ON away (delegate_id);"
     "CREATE TABLE notifications ("
     " id bigserial PRIMARY KEY,"
     " kind text NOT NULL,"
     " request_id text,"
     " recipients text[] NOT NULL,"
     " body text NOT NULL,"
     " status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','sent','failed')),"
     " attempts int NOT NULL DEFAULT 0,"
     " next_at_ms bigint NOT NULL,"
     " last_error text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " sent_at timestamptz);"
     "CREATE INDEX notifications_due ON notifications (next_at_ms) WHERE status = 'pending';"},
    {4, "step timers", QM_TIMER_MIGRATION_SQL("timers")},
    /* The notifier claims rows with a lease instead of holding them locked
     * in a transaction while it POSTs. */
    {5, "notification leases",
     "ALTER TABLE notifications ADD COLUMN lease_until timestamptz,"
     " ADD COLUMN lease_token text, ADD COLUMN lease_pid int,"
     " ADD COLUMN lease_backend_start timestamptz;"},
};

static const qm_cfg_def_t config_defs[] = {
    {"QM_APPROVAL_PEOPLE_FILE", QM_CFG_STR, "",
     "People directory seed (JSON {\"people\": [...]}, as intake's); HR events keep it current. "
     "Empty: HR events only.", 0, 0, 0},
    {"QM_APPROVAL_COST_THRESHOLD", QM_CFG_INT, "2500",
     "Lines costing more than this (in the catalog's currency units) need finance's approval.",
     0, 1000000000, 0},
    {"QM_APPROVAL_FINANCE_APPROVERS", QM_CFG_STR, "p-0003",
     "Comma-separated person ids of the finance approvers (any one decides).", 0, 0, 0},
    {"QM_APPROVAL_SECURITY_APPROVERS", QM_CFG_STR, "p-0005,p-0011",
     "Comma-separated person ids of the security approvers; they are also notified of "
     "break-glass.", 0, 0, 0},
    {"QM_APPROVAL_FALLBACK_APPROVERS", QM_CFG_STR, "p-0001",
     "Fallback chain (in order) when nobody of a step is available, and the last resort of "
     "escalations.", 0, 0, 0},
    {"QM_APPROVAL_SOD_PAIRS", QM_CFG_STR, "",
     "Separation-of-duties pairs: 'item:role|item:role' separated by commas ('*' any role). A "
     "subject holding or asking for one side may not get the other.", 0, 0, 0},
    {"QM_APPROVAL_SOD_MODE", QM_CFG_STR, "refuse",
     "What a separation-of-duties conflict does: 'refuse' (rejected at once) or 'security' (a "
     "security stage is added).", 0, 0, 0},
    {"QM_APPROVAL_REMIND_STANDARD", QM_CFG_MS, "24h", "Reminder after a standard step opened.",
     1, 31536000000LL, 0},
    {"QM_APPROVAL_ESCALATE_STANDARD", QM_CFG_MS, "48h",
     "Escalation to the fallback approver after a standard step opened.", 1, 31536000000LL, 0},
    {"QM_APPROVAL_REJECT_STANDARD", QM_CFG_MS, "120h",
     "Automatic rejection of a standard step nobody decided.", 1, 31536000000LL, 0},
    {"QM_APPROVAL_REMIND_SENSITIVE", QM_CFG_MS, "24h", "Reminder of a sensitive step.", 1, 31536000000LL, 0},
    {"QM_APPROVAL_ESCALATE_SENSITIVE", QM_CFG_MS, "48h", "Escalation of a sensitive step.", 1, 31536000000LL,
     0},
    {"QM_APPROVAL_REJECT_SENSITIVE", QM_CFG_MS, "120h", "Automatic rejection of a sensitive step.",
     1, 31536000000LL, 0},
    {"QM_APPROVAL_REMIND_ELEVATED", QM_CFG_MS, "8h", "Reminder of an elevated step.", 1, 31536000000LL, 0},
    {"QM_APPROVAL_ESCALATE_ELEVATED", QM_CFG_MS, "24h", "Escalation of an elevated step.", 1, 31536000000LL,
     0},
    {"QM_APPROVAL_REJECT_ELEVATED", QM_CFG_MS, "72h", "Automatic rejection of an elevated step.",
     1, 31536000000LL, 0},
    {"QM_APPROVAL_ELEVATED_DEFAULT_DAYS", QM_CFG_INT, "7",
     "Expiry given to elevated access requested open-ended (capped by the role's maximum).", 1,
     3650, 0},
    {"QM_APPROVAL_WEBHOOK_URL", QM_CFG_STR, "",
     "Slack-compatible incoming webhook for notifications (new steps, reminders, escalations, "
     "decisions, break-glass). Empty: none.", 0, 0, QM_CFG_SECRET},
    {"QM_APPROVAL_WEBHOOK_TIMEOUT", QM_CFG_MS, "5s", "Timeout of one webhook POST.", 100, 600000,
     0},
    {"QM_APPROVAL_WEBHOOK_BACKOFF", QM_CFG_MS, "1s",
     "First retry delay of a failed notification (doubles per attempt, at most 10 min).", 10,
     3600000, 0},
    {"QM_APPROVAL_WEBHOOK_MAX_ATTEMPTS", QM_CFG_INT, "8",
     "Attempts before a notification is given up (marked failed).", 1, 100, 0},
    {"QM_APPROVAL_TIMER_LEASE", QM_CFG_MS, "30s",
     "How long an instance holds a claimed timer; a crashed instance's timers fire elsewhere "
     "after it.", 100, 3600000, 0},
    {"QM_APPROVAL_TIMER_POLL", QM_CFG_MS, "100ms", "Idle poll of the timer set.", 5, 60000, 0},
    {"QM_APPROVAL_TIMER_RESYNC", QM_CFG_MS, "5m",
     "How often the Redis timer set is checked against PostgreSQL and reloaded when members are missing (a flush is repaired at once).",
     1000, 86400000, 0},
};

/* Parses "a,b,c" into l; QM_EINVAL naming the variable when too long. */
static int parse_ids(const char *s, id_list_t *l, const char *var, char *errstr,
                     size_t errstr_size) {
  memset(l, 0, sizeof(*l));
  const char *p = s;
  while (p && *p) {
    const char *e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    while (len && (*p == ' ')) p++, len--;
    while (len && p[len - 1] == ' ') len--;
    if (len) {
      if (l->n == APPROVAL_MAX_LIST || len >= APPROVAL_ID_MAX)
        return qm_err(errstr, errstr_size, QM_EINVAL, "%s: too many or too long ids", var);
      memcpy(l->ids[l->n], p, len);
      l->ids[l->n++][len] = '\0';
    }
    p = e ? e + 1 : NULL;
  }
  return QM_OK;
}

static int parse_side(const char *s, char *item, char *role) {
  const char *c = strchr(s, ':');
  if (!c || c == s || !c[1] || (size_t)(c - s) >= APPROVAL_ID_MAX ||
      strlen(c + 1) >= APPROVAL_ID_MAX)
    return QM_EINVAL;
  memcpy(item, s, (size_t)(c - s));
  item[c - s] = '\0';
  qm_strlcpy(role, c + 1, APPROVAL_ID_MAX);
  return QM_OK;
}

static int parse_sod(approval_t *ap, const char *s, char *errstr, size_t errstr_size) {
  id_list_t pairs;
  char tmp[APPROVAL_ID_MAX * 2 + 2];
  /* Reuse the id splitter for the comma level; each entry is "a|b". */
  int rc = parse_ids(s, &pairs, "QM_APPROVAL_SOD_PAIRS", errstr, errstr_size);
  if (rc) return rc;
  for (size_t i = 0; i < pairs.n; i++) {
    qm_strlcpy(tmp, pairs.ids[i], sizeof(tmp));
    char *bar = strchr(tmp, '|');
    sod_pair_t *sp = &ap->sod[ap->n_sod];
    if (!bar) goto bad;
    *bar = '\0';
    if (parse_side(tmp, sp->a_item, sp->a_role) || parse_side(bar + 1, sp->b_item, sp->b_role))
      goto bad;
    ap->n_sod++;
    continue;
  bad:
    return qm_err(errstr, errstr_size, QM_EINVAL,
                  "QM_APPROVAL_SOD_PAIRS: '%s' is not 'item:role|item:role'", pairs.ids[i]);
  }
  return QM_OK;
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  approval_t *ap = app;
  int rc = QM_OK;
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_HR)) {
    Qm__V1__HrEvent *he =
        qm__v1__hr_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
    if (!he)
      return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.HrEvent",
                    ev->meta.type);
    rc = people_apply_hr(tx, he, errstr, errstr_size);
    /* A leaver who was someone's approver: their steps move on. */
    if (rc == QM_OK && he->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER &&
        people_is_terminated(tx, he->person->id))
      rc = route_approver_left(ap, tx, he->person->id, ev->meta.traceparent, errstr, errstr_size);
    qm__v1__hr_event__free_unpacked(he, NULL);
    return rc;
  }
  if (qm_service_topic_is(svc, ev->topic, QM_TOPIC_ACCESS)) {
    Qm__V1__AccessEvent *ae =
        qm__v1__access_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
    if (!ae)
      return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.AccessEvent",
                    ev->meta.type);
    rc = holdings_apply_access(tx, ae, errstr, errstr_size);
    qm__v1__access_event__free_unpacked(ae, NULL);
    return rc;
  }
  Qm__V1__RequestEvent *re =
      qm__v1__request_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!re)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.RequestEvent",
                  ev->meta.type);
  switch (re->event_case) {
  case QM__V1__REQUEST_EVENT__EVENT_SUBMITTED:
    rc = route_submitted(ap, tx, ev->meta.traceparent, re->submitted, errstr, errstr_size);
    break;
  case QM__V1__REQUEST_EVENT__EVENT_CANCELLED:
    rc = route_cancelled(ap, tx, re->cancelled, errstr, errstr_size);
    break;
  default:
    break; /* revocations are provisioning's */
  }
  qm__v1__request_event__free_unpacked(re, NULL);
  return rc;
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  const qm_config_t *cfg = qm_service_config(svc);
  approval_t *ap = qm_calloc(1, sizeof(*ap));
  ap->svc = svc;
  atomic_init(&ap->stopping, false);
  int rc = QM_OK;
  ap->cost_threshold_minor = qm_config_int(cfg, "QM_APPROVAL_COST_THRESHOLD") * 100;
  if ((rc = parse_ids(qm_config_str(cfg, "QM_APPROVAL_FINANCE_APPROVERS"), &ap->finance,
                      "QM_APPROVAL_FINANCE_APPROVERS", errstr, errstr_size)) ||
      (rc = parse_ids(qm_config_str(cfg, "QM_APPROVAL_SECURITY_APPROVERS"), &ap->security,
                      "QM_APPROVAL_SECURITY_APPROVERS", errstr, errstr_size)) ||
      (rc = parse_ids(qm_config_str(cfg, "QM_APPROVAL_FALLBACK_APPROVERS"), &ap->fallback,
                      "QM_APPROVAL_FALLBACK_APPROVERS", errstr, errstr_size)) ||
      (rc = parse_sod(ap, qm_config_str(cfg, "QM_APPROVAL_SOD_PAIRS"), errstr, errstr_size)))
    goto fail;
  const char *mode = qm_config_str(cfg, "QM_APPROVAL_SOD_MODE");
  if (strcmp(mode, "refuse") && strcmp(mode, "security")) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "QM_APPROVAL_SOD_MODE: '%s' is neither 'refuse' nor 'security'", mode);
    goto fail;
  }
  ap->sod_to_security = !strcmp(mode, "security");
  static const char *const risks[] = {NULL, "STANDARD", "SENSITIVE", "ELEVATED"};
  for (int r = 1; r <= 3; r++) {
    char n1[64], n2[64], n3[64];
    snprintf(n1, sizeof(n1), "QM_APPROVAL_REMIND_%s", risks[r]);
    snprintf(n2, sizeof(n2), "QM_APPROVAL_ESCALATE_%s", risks[r]);
    snprintf(n3, sizeof(n3), "QM_APPROVAL_REJECT_%s", risks[r]);
    ap->clocks[r].remind_ms = qm_config_ms(cfg, n1);
    ap->clocks[r].escalate_ms = qm_config_ms(cfg, n2);
    ap->clocks[r].reject_ms = qm_config_ms(cfg, n3);
  }
  ap->clocks[0] = ap->clocks[1];
  ap->elevated_default_days = (int)qm_config_int(cfg, "QM_APPROVAL_ELEVATED_DEFAULT_DAYS");
  const char *url = qm_config_str(cfg, "QM_APPROVAL_WEBHOOK_URL");
  ap->webhook_url = url && *url ? qm_strdup(url) : NULL;
  ap->webhook_timeout_ms = qm_config_ms(cfg, "QM_APPROVAL_WEBHOOK_TIMEOUT");
  ap->webhook_backoff_ms = qm_config_ms(cfg, "QM_APPROVAL_WEBHOOK_BACKOFF");
  ap->webhook_max_attempts = (int)qm_config_int(cfg, "QM_APPROVAL_WEBHOOK_MAX_ATTEMPTS");

  qm_metrics_t *reg = qm_service_metrics(svc);
  static const char *const l_dec[] = {"outcome", "how", NULL};
  static const char *const l_kind[] = {"kind", NULL};
  static const char *const l_out[] = {"outcome", NULL};
  ap->m_decisions = qm_metrics_counter(reg, "qm_approval_decisions_total",
                                       "Request lines decided, by outcome and how.", l_dec);
  ap->m_steps = qm_metrics_counter(reg, "qm_approval_steps_opened_total",
                                   "Approval steps opened, by kind.", l_kind);
  ap->m_notifications = qm_metrics_counter(
      reg, "qm_approval_notifications_total",
      "Webhook notification attempts: sent, retry (failed, will retry), failed (given up).",
      l_out);

  const char *people = qm_config_str(cfg, "QM_APPROVAL_PEOPLE_FILE");
  if (people && *people && (rc = people_seed(ap, people, errstr, errstr_size)) != QM_OK) goto fail;

  qm_timers_conf_t tc = {.dsn = qm_service_dsn(svc),
                         .schema = qm_service_name(svc),
                         .table = "timers",
                         .redis_host = qm_config_str(cfg, "QM_REDIS_HOST"),
                         .redis_port = (int)qm_config_int(cfg, "QM_REDIS_PORT"),
                         .lease_ms = (int)qm_config_ms(cfg, "QM_APPROVAL_TIMER_LEASE"),
                         .poll_ms = (int)qm_config_ms(cfg, "QM_APPROVAL_TIMER_POLL"),
                         .resync_ms = qm_config_ms(cfg, "QM_APPROVAL_TIMER_RESYNC"),
                         .fire = route_fire,
                         .fire_ctx = ap,
                         .metrics = reg};
  ap->timers = qm_timers_new(&tc, errstr, errstr_size);
  if (!ap->timers) {
    rc = QM_EINVAL;
    goto fail;
  }
  if ((rc = api_register(ap, errstr, errstr_size)) != QM_OK) goto fail;
  if (qm_timers_start(ap->timers) != QM_OK) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start the timer thread");
    goto fail;
  }
  if (notify_start(ap) != QM_OK) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start the notification worker");
    goto fail;
  }
  *app = ap;
  return QM_OK;
fail:
  qm_timers_destroy(ap->timers);
  free(ap->webhook_url);
  free(ap);
  return rc;
}

static void stop(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  approval_t *ap = app;
  if (!ap) return;
  atomic_store(&ap->stopping, true);
  qm_timers_stop(ap->timers);
  notify_stop(ap);
}

static void fini(qm_service_t *svc, void *app) {
  QM_UNUSED(svc);
  approval_t *ap = app;
  if (!ap) return;
  qm_timers_destroy(ap->timers);
  free(ap->webhook_url);
  free(ap);
}

static const char *const consumes[] = {QM_TOPIC_REQUESTS, QM_TOPIC_HR, QM_TOPIC_ACCESS};

int main(int argc, char **argv) {
  static const qm_service_def_t def = {
      .name = "approval",
      .default_port = 8082,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .config = config_defs,
      .n_config = QM_ARRAY_LEN(config_defs),
      .uses_redis = true,
      .init = init,
      .stop = stop,
      .fini = fini,
  };
  return qm_service_main(argc, argv, &def);
}
