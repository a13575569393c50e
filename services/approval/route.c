/*
 * route: approval plans, who may decide, decisions and the effects of step
 * timers. Everything here runs inside a transaction it is given (the
 * consumer's batch, an HTTP handler's qm_service_tx(), or the timer runtime's
 * firing transaction), and every event and notification it causes is written
 * in that same transaction.
 *
 * A plan is one ordered list of stages per request line (all inserted at
 * submit, the first 'pending', the rest 'waiting'):
 *   standard risk  → manager (or automatic where the catalog allows it);
 *   sensitive      → app owner;  elevated → app owner + mandatory expiry;
 *   cost above QM_APPROVAL_COST_THRESHOLD → + finance;
 *   regulated item → + security;
 *   separation-of-duties conflict → refused, or + security (configured).
 * When a stage opens its approvers are resolved: the requester and the
 * subject are never approvers (a manager who is the requester is replaced by
 * their own manager, an app owner asking for themselves likewise); someone
 * away is replaced by their delegate; someone terminated, or away without a
 * delegate, is skipped; an empty stage falls back to the first available of
 * [the intended approver's manager, QM_APPROVAL_FALLBACK_APPROVERS...]; with
 * nobody at all the line is rejected ("no-approver") rather than left to
 * stall. Each open step gets three timers: reminder, escalation (adds the
 * fallback approver) and auto-reject. An approver who leaves (HR leaver)
 * is taken off their pending steps; a step left with nobody goes along the
 * fallback chain.
 */
#include "approval.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_topics.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLIST_MAX 40

/* A list of approvers with, for each, whom they stand in for ("" if nobody). */
typedef struct plist {
  char ids[PLIST_MAX][APPROVAL_ID_MAX];
  char from[PLIST_MAX][APPROVAL_ID_MAX];
  size_t n;
} plist_t;

/* One request line as approval stored it. */
typedef struct line {
  char request_id[APPROVAL_ID_MAX];
  int line_no;
  char subject[APPROVAL_ID_MAX], requester[APPROVAL_ID_MAX];
  char item[APPROVAL_ID_MAX], role[APPROVAL_ID_MAX];
  char owner[APPROVAL_ID_MAX], manager[APPROVAL_ID_MAX];
  int risk; /* Qm__V1__Risk */
  char status[16];
} line_t;

static const char *risk_name(int r) {
  switch (r) {
  case QM__V1__RISK__RISK_STANDARD: return "standard";
  case QM__V1__RISK__RISK_SENSITIVE: return "sensitive";
  case QM__V1__RISK__RISK_ELEVATED: return "elevated";
  default: return "unspecified";
  }
}

static int risk_from(const char *s) {
  if (!strcmp(s, "sensitive")) return QM__V1__RISK__RISK_SENSITIVE;
  if (!strcmp(s, "elevated")) return QM__V1__RISK__RISK_ELEVATED;
  return QM__V1__RISK__RISK_STANDARD;
}

static const char *kind_name(Qm__V1__StepKind k) {
  switch (k) {
  case QM__V1__STEP_KIND__STEP_KIND_MANAGER: return "manager";
  case QM__V1__STEP_KIND__STEP_KIND_APP_OWNER: return "app_owner";
  case QM__V1__STEP_KIND__STEP_KIND_FINANCE: return "finance";
  case QM__V1__STEP_KIND__STEP_KIND_SECURITY: return "security";
  default: return "auto";
  }
}

static Qm__V1__StepKind kind_from(const char *s) {
  if (!strcmp(s, "manager")) return QM__V1__STEP_KIND__STEP_KIND_MANAGER;
  if (!strcmp(s, "app_owner")) return QM__V1__STEP_KIND__STEP_KIND_APP_OWNER;
  if (!strcmp(s, "finance")) return QM__V1__STEP_KIND__STEP_KIND_FINANCE;
  if (!strcmp(s, "security")) return QM__V1__STEP_KIND__STEP_KIND_SECURITY;
  return QM__V1__STEP_KIND__STEP_KIND_AUTO;
}

static void count_decision(approval_t *ap, const char *outcome, const char *how) {
  const char *lv[] = {outcome, how};
  qm_metrics_inc(qm_metrics_child(ap->m_decisions, lv));
}

/* ---- text arrays ------------------------------------------------------------ */

/* A PostgreSQL text[] literal of n strings ({"a","b"}). Caller frees. */
static char *pg_array(const char *const *v, size_t n) {
  size_t cap = 3;
  for (size_t i = 0; i < n; i++) cap += 2 * strlen(v[i]) + 3;
  char *out = qm_malloc(cap);
  size_t len = 0;
  out[len++] = '{';
  for (size_t i = 0; i < n; i++) {
    if (i) out[len++] = ',';
    out[len++] = '"';
    for (const char *p = v[i]; *p; p++) {
      if (*p == '"' || *p == '\\') out[len++] = '\\';
      out[len++] = *p;
    }
    out[len++] = '"';
  }
  out[len++] = '}';
  out[len] = '\0';
  return out;
}

/* Parses a text[] as PostgreSQL prints it (ids never need quoting here, but
 * quoted elements are handled) into l (from[] left empty). */
static void pg_array_parse(const char *s, plist_t *l) {
  memset(l, 0, sizeof(*l));
  if (!s || *s != '{') return;
  s++;
  while (*s && *s != '}' && l->n < PLIST_MAX) {
    char *dst = l->ids[l->n];
    size_t len = 0;
    if (*s == '"') {
      s++;
      while (*s && *s != '"') {
        if (*s == '\\' && s[1]) s++;
        if (len < APPROVAL_ID_MAX - 1) dst[len++] = *s;
        s++;
      }
      if (*s == '"') s++;
    } else {
      while (*s && *s != ',' && *s != '}') {
        if (len < APPROVAL_ID_MAX - 1) dst[len++] = *s;
        s++;
      }
    }
    dst[len] = '\0';
    l->n++;
    if (*s == ',') s++;
  }
}

static bool plist_has(const plist_t *l, const char *id) {
  for (size_t i = 0; i < l->n; i++)
    if (!strcmp(l->ids[i], id)) return true;
  return false;
}

static void plist_push(plist_t *l, const char *id, const char *from) {
  if (!id || !*id || plist_has(l, id) || l->n == PLIST_MAX) return;
  qm_strlcpy(l->ids[l->n], id, APPROVAL_ID_MAX);
  qm_strlcpy(l->from[l->n], from ? from : "", APPROVAL_ID_MAX);
  l->n++;
}

/* ids as a const char* vector (valid while l lives). */
static void plist_vec(const plist_t *l, const char **v) {
  for (size_t i = 0; i < l->n; i++) v[i] = l->ids[i];
}

/* ---- loading ------------------------------------------------------------------ */

static int line_load(qm_pg_t *tx, const char *request_id, int line_no, line_t *ln,
                     char *errstr, size_t errstr_size) {
  char no[16];
  snprintf(no, sizeof(no), "%d", line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(request_id), QM_PG_TEXT(no)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT subject_person_id, requester_id, item_id, role_id, owner_id,"
                      " subject_manager_id, risk, status FROM approval_lines"
                      " WHERE request_id = $1 AND line_no = $2::int FOR UPDATE",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "no line %d of request %s", line_no,
                  request_id);
  }
  memset(ln, 0, sizeof(*ln));
  qm_strlcpy(ln->request_id, request_id, sizeof(ln->request_id));
  ln->line_no = line_no;
  qm_strlcpy(ln->subject, qm_pg_get(res, 0, 0), sizeof(ln->subject));
  qm_strlcpy(ln->requester, qm_pg_get(res, 0, 1), sizeof(ln->requester));
  qm_strlcpy(ln->item, qm_pg_get(res, 0, 2), sizeof(ln->item));
  qm_strlcpy(ln->role, qm_pg_get(res, 0, 3), sizeof(ln->role));
  qm_strlcpy(ln->owner, qm_pg_get(res, 0, 4), sizeof(ln->owner));
  qm_strlcpy(ln->manager, qm_pg_get(res, 0, 5), sizeof(ln->manager));
  ln->risk = risk_from(qm_pg_get(res, 0, 6));
  qm_strlcpy(ln->status, qm_pg_get(res, 0, 7), sizeof(ln->status));
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* ---- who may decide ------------------------------------------------------------- */

static bool excluded(const line_t *ln, const char *id) {
  return !strcmp(id, ln->requester) || !strcmp(id, ln->subject);
}

/* Whether id can decide now: *ok false when terminated or away without a
 * usable delegate; *delegate receives the stand-in when away. */
static int availability(qm_pg_t *tx, const char *id, int64_t now, bool *terminated, bool *away,
                        char *delegate, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(id), QM_PG_INT64(now)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT (SELECT status FROM people WHERE id = $1),"
                      " (SELECT coalesce(delegate_id, '') FROM away WHERE person_id = $1"
                      "  AND from_ms <= $2 AND (until_ms IS NULL OR until_ms > $2))",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  *terminated = !strcmp(qm_pg_get(res, 0, 0), "terminated");
  *away = !qm_pg_is_null(res, 0, 1);
  qm_strlcpy(delegate, qm_pg_get(res, 0, 1), APPROVAL_ID_MAX);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Adds id (or their delegate) to l when they may decide. *added says so. */
static int add_candidate(qm_pg_t *tx, const line_t *ln, const char *id, plist_t *l, bool *added,
                         char *errstr, size_t errstr_size) {
  *added = false;
  if (!id || !*id || excluded(ln, id)) return QM_OK;
  bool term = false, away = false;
  char del[APPROVAL_ID_MAX];
  int rc = availability(tx, id, qm_now_ms(), &term, &away, del, errstr, errstr_size);
  if (rc != QM_OK || term) return rc;
  if (!away) {
    plist_push(l, id, "");
    *added = true;
    return QM_OK;
  }
  if (!del[0] || excluded(ln, del) || !strcmp(del, id)) return QM_OK;
  bool dterm = false, daway = false;
  char ddel[APPROVAL_ID_MAX];
  rc = availability(tx, del, qm_now_ms(), &dterm, &daway, ddel, errstr, errstr_size);
  if (rc != QM_OK || dterm || daway) return rc;
  plist_push(l, del, id);
  *added = true;
  return QM_OK;
}

/* Climbs from id past anyone excluded (the requester, the subject): the
 * manager who asked is replaced by their manager. out receives the person. */
static int climb(qm_pg_t *tx, const line_t *ln, const char *id, char *out, char *errstr,
                 size_t errstr_size) {
  qm_strlcpy(out, id ? id : "", APPROVAL_ID_MAX);
  for (int depth = 0; depth < 8 && out[0] && excluded(ln, out); depth++) {
    char up[APPROVAL_ID_MAX];
    int rc = people_manager_of(tx, out, up, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    qm_strlcpy(out, up, APPROVAL_ID_MAX);
  }
  if (out[0] && excluded(ln, out)) out[0] = '\0';
  return QM_OK;
}

/* The fallback chain after `intended`: their manager, then the configured
 * fallback approvers; the first available not already in l is added. */
static int add_fallback(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *intended,
                        plist_t *l, bool *added, char *errstr, size_t errstr_size) {
  *added = false;
  char chain[APPROVAL_MAX_LIST + 1][APPROVAL_ID_MAX];
  size_t n = 0;
  if (intended && *intended) {
    char up[APPROVAL_ID_MAX];
    int rc = people_manager_of(tx, intended, up, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    rc = climb(tx, ln, up, chain[n], errstr, errstr_size);
    if (rc != QM_OK) return rc;
    if (chain[n][0]) n++;
  }
  for (size_t i = 0; i < ap->fallback.n; i++) qm_strlcpy(chain[n++], ap->fallback.ids[i], APPROVAL_ID_MAX);
  for (size_t i = 0; i < n; i++) {
    if (plist_has(l, chain[i])) continue;
    int rc = add_candidate(tx, ln, chain[i], l, added, errstr, errstr_size);
    if (rc != QM_OK || *added) return rc;
  }
  return QM_OK;
}

/* The approvers of a stage of kind for line ln. *intended receives who the
 * policy named before any replacement (for the fallback chain). */
static int resolve(approval_t *ap, qm_pg_t *tx, const line_t *ln, Qm__V1__StepKind kind,
                   plist_t *l, char *intended, char *errstr, size_t errstr_size) {
  memset(l, 0, sizeof(*l));
  intended[0] = '\0';
  bool added = false;
  int rc = QM_OK;
  const id_list_t *group = NULL;
  switch (kind) {
  case QM__V1__STEP_KIND__STEP_KIND_MANAGER: {
    char m[APPROVAL_ID_MAX];
    qm_strlcpy(m, ln->manager, sizeof(m));
    if (!m[0] && (rc = people_manager_of(tx, ln->subject, m, errstr, errstr_size))) return rc;
    if ((rc = climb(tx, ln, m, intended, errstr, errstr_size))) return rc;
    rc = add_candidate(tx, ln, intended, l, &added, errstr, errstr_size);
    break;
  }
  case QM__V1__STEP_KIND__STEP_KIND_APP_OWNER:
    if ((rc = climb(tx, ln, ln->owner, intended, errstr, errstr_size))) return rc;
    rc = add_candidate(tx, ln, intended, l, &added, errstr, errstr_size);
    break;
  case QM__V1__STEP_KIND__STEP_KIND_FINANCE: group = &ap->finance; break;
  case QM__V1__STEP_KIND__STEP_KIND_SECURITY: group = &ap->security; break;
  default: break;
  }
  if (rc != QM_OK) return rc;
  if (group) {
    for (size_t i = 0; i < group->n; i++) {
      if ((rc = add_candidate(tx, ln, group->ids[i], l, &added, errstr, errstr_size))) return rc;
    }
  }
  if (l->n == 0) rc = add_fallback(ap, tx, ln, intended, l, &added, errstr, errstr_size);
  return rc;
}

/* ---- events and notifications ----------------------------------------------------- */

static int emit(approval_t *ap, qm_pg_t *tx, const char *key, const char *type,
                const char *request_id, const char *traceparent, Qm__V1__DecisionEvent *de,
                char *errstr, size_t errstr_size) {
  return qm_service_emit(ap->svc, tx, QM_TOPIC_DECISIONS, key, type, request_id, traceparent,
                         &de->base, NULL, errstr, errstr_size);
}

static int emit_step_pending(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *step_id,
                             int stage, Qm__V1__StepKind kind, const plist_t *l,
                             int64_t deadline, const char *traceparent, char *errstr,
                             size_t errstr_size) {
  const char *ids[PLIST_MAX];
  plist_vec(l, ids);
  const char *from = "";
  for (size_t i = 0; i < l->n; i++)
    if (l->from[i][0]) {
      from = l->from[i];
      break;
    }
  Qm__V1__ApprovalStepPending sp = QM__V1__APPROVAL_STEP_PENDING__INIT;
  sp.request_id = (char *)ln->request_id;
  sp.line_no = ln->line_no;
  sp.step_id = (char *)step_id;
  sp.stage = stage;
  sp.kind = kind;
  sp.n_approver_ids = l->n;
  sp.approver_ids = (char **)ids;
  sp.deadline_at_ms = deadline;
  sp.delegated_from = (char *)from;
  sp.subject_person_id = (char *)ln->subject;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_STEP_PENDING;
  de.step_pending = &sp;
  return emit(ap, tx, ln->subject, "qm.approval.step_pending.v1", ln->request_id, traceparent,
              &de, errstr, errstr_size);
}

static int emit_step_decided(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *step_id,
                             bool approved, const char *who, const char *const *roles,
                             size_t n_roles, const char *comment, bool break_glass,
                             const char *traceparent, char *errstr, size_t errstr_size) {
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  if (who) {
    actor.person_id = (char *)who;
    actor.n_roles = n_roles;
    actor.roles = (char **)roles;
  } else {
    actor.service = (char *)"approval";
  }
  Qm__V1__ApprovalStepDecided sd = QM__V1__APPROVAL_STEP_DECIDED__INIT;
  sd.request_id = (char *)ln->request_id;
  sd.line_no = ln->line_no;
  sd.step_id = (char *)step_id;
  sd.approved = approved;
  sd.decided_by = &actor;
  sd.comment = (char *)(comment ? comment : "");
  sd.break_glass = break_glass;
  sd.subject_person_id = (char *)ln->subject;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED;
  de.step_decided = &sd;
  return emit(ap, tx, ln->subject, "qm.approval.step_decided.v1", ln->request_id, traceparent,
              &de, errstr, errstr_size);
}

static int notify_line(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *kind,
                       const char *const *to, size_t n, const char *what, char *errstr,
                       size_t errstr_size) {
  if (!ap->webhook_url) return QM_OK;
  char *recips = NULL;
  {
    size_t cap = 1;
    for (size_t i = 0; i < n; i++) cap += strlen(to[i]) + 2;
    recips = qm_calloc(1, cap);
    for (size_t i = 0; i < n; i++) {
      if (i) strcat(recips, ", ");
      strcat(recips, to[i]);
    }
  }
  char *text = qm_asprintf("%s: %s/%s (%s risk) for %s, requested by %s — request %s line %d. "
                           "To: %s",
                           what, ln->item, ln->role, risk_name(ln->risk), ln->subject,
                           ln->requester[0] ? ln->requester : "(automation)", ln->request_id,
                           ln->line_no, recips);
  int rc = notify_add(ap, tx, kind, ln->request_id, to, n, text, errstr, errstr_size);
  free(text);
  free(recips);
  return rc;
}

/* Closes the timers of every step of the line. */
static int cancel_line_timers(qm_pg_t *tx, const char *request_id, int line_no, char *errstr,
                              size_t errstr_size) {
  char no[16];
  snprintf(no, sizeof(no), "%d", line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(request_id), QM_PG_TEXT(no)};
  return qm_pg_exec(tx,
                    "UPDATE timers SET status = 'cancelled', synced = false"
                    " WHERE status = 'pending' AND owner_key IN (SELECT step_id FROM"
                    " approval_steps WHERE request_id = $1 AND line_no = $2::int)",
                    p, 2, NULL, errstr, errstr_size);
}

/* ---- final decisions -------------------------------------------------------------- */

/* Rejects a pending line: open steps closed, timers cancelled, the event and
 * notifications written. by NULL means approval itself (a timeout, a rule). */
static int reject_line(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *reason,
                       const char *by, const char *const *roles, size_t n_roles,
                       const char *how, const char *traceparent, char *errstr,
                       size_t errstr_size) {
  char no[16];
  snprintf(no, sizeof(no), "%d", ln->line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(ln->request_id), QM_PG_TEXT(no), QM_PG_TEXT(reason)};
  int rc = qm_pg_exec(tx,
                      "UPDATE approval_lines SET status = 'rejected', reject_reason = $3,"
                      " decided_at = now() WHERE request_id = $1 AND line_no = $2::int",
                      p, 3, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx,
                    "UPDATE approval_steps SET status = 'cancelled', decided_at = now()"
                    " WHERE request_id = $1 AND line_no = $2::int"
                    " AND status IN ('waiting','pending')",
                    p, 2, NULL, errstr, errstr_size);
  if (rc == QM_OK) rc = cancel_line_timers(tx, ln->request_id, ln->line_no, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  if (by) {
    actor.person_id = (char *)by;
    actor.n_roles = n_roles;
    actor.roles = (char **)roles;
  } else {
    actor.service = (char *)"approval";
  }
  Qm__V1__RequestRejected rj = QM__V1__REQUEST_REJECTED__INIT;
  rj.request_id = (char *)ln->request_id;
  rj.line_no = ln->line_no;
  rj.subject_person_id = (char *)ln->subject;
  rj.rejected_by = &actor;
  rj.reason = (char *)reason;
  rj.rejected_at_ms = qm_now_ms();
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_REJECTED;
  de.rejected = &rj;
  rc = emit(ap, tx, ln->subject, "qm.request.rejected.v1", ln->request_id, traceparent, &de,
            errstr, errstr_size);
  if (rc != QM_OK) return rc;
  const char *to[] = {ln->requester, ln->subject};
  char what[256];
  snprintf(what, sizeof(what), "Rejected (%s)", reason);
  rc = notify_line(ap, tx, ln, "rejected", to, 2, what, errstr, errstr_size);
  count_decision(ap, "rejected", how);
  qm_log(QM_LOG_INFO, ln->request_id, NULL, "line %d rejected by %s: %s", ln->line_no,
         by ? by : "approval", reason);
  return rc;
}

/* Approves a line whose last stage was approved (or broken glass): publishes
 * RequestApproved with every approver in stage order and the expiry. */
static int approve_line(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *how,
                        const char *bg_by, const char *bg_justification, const char *traceparent,
                        char *errstr, size_t errstr_size) {
  char no[16];
  snprintf(no, sizeof(no), "%d", ln->line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(ln->request_id), QM_PG_TEXT(no)};
  qm_pg_result_t *res = NULL, *steps = NULL;
  Qm__V1__RequestSubmitted *rs = NULL;
  Qm__V1__Actor *actors = NULL, **aptrs = NULL;
  int rc = qm_pg_exec(tx,
                      "UPDATE approval_lines SET status = 'approved', decided_at = now()"
                      " WHERE request_id = $1 AND line_no = $2::int RETURNING submitted,"
                      " max_duration_days",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  unsigned char *buf = NULL;
  size_t len = 0;
  if (qm_pg_ntuples(res) != 1 || qm_pg_get_bytes(res, 0, 0, &buf, &len) != QM_OK) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "line %d of %s vanished", ln->line_no,
                ln->request_id);
    goto out;
  }
  rs = qm__v1__request_submitted__unpack(NULL, len, buf);
  free(buf);
  if (!rs) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "stored request %s does not decode", ln->request_id);
    goto out;
  }
  Qm__V1__RequestLine *line = NULL;
  for (size_t i = 0; i < rs->n_lines; i++)
    if (rs->lines[i]->line_no == ln->line_no) line = rs->lines[i];
  if (!line) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "stored request %s lacks line %d", ln->request_id,
                ln->line_no);
    goto out;
  }
  rc = qm_pg_exec(tx,
                  "SELECT unnest(CASE WHEN cardinality(approvals) > 0 THEN approvals"
                  " ELSE ARRAY[decided_by] END) FROM approval_steps WHERE request_id = $1"
                  " AND line_no = $2::int AND status = 'approved' AND decided_by IS NOT NULL"
                  " ORDER BY stage",
                  p, 2, &steps, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  int n = qm_pg_ntuples(steps);
  actors = qm_calloc((size_t)n + 1, sizeof(*actors));
  aptrs = qm_calloc((size_t)n + 1, sizeof(*aptrs));
  size_t na = 0;
  for (int i = 0; i < n; i++) {
    qm__v1__actor__init(&actors[na]);
    actors[na].person_id = (char *)qm_pg_get(steps, i, 0);
    aptrs[na] = &actors[na];
    na++;
  }
  int days = line->duration_days;
  if (ln->risk == QM__V1__RISK__RISK_ELEVATED && days <= 0) {
    /* Elevated access always ends: open-ended asks get the default, capped. */
    days = ap->elevated_default_days;
    if (line->max_duration_days > 0 && days > line->max_duration_days)
      days = line->max_duration_days;
  }
  Qm__V1__RequestApproved apv = QM__V1__REQUEST_APPROVED__INIT;
  apv.request_id = rs->request_id;
  apv.line = line;
  apv.subject_person_id = rs->subject_person_id;
  apv.subject_directory_username = rs->subject_directory_username;
  apv.n_approvers = na;
  apv.approvers = aptrs;
  apv.grant_duration_days = days;
  apv.approved_at_ms = qm_now_ms();
  apv.requester = rs->requester;
  apv.extends_request_id = rs->extends_request_id;
  apv.subject_country = rs->subject_country;
  apv.subject_location = rs->subject_location;
  apv.break_glass = bg_by != NULL;
  apv.break_glass_justification = (char *)(bg_justification ? bg_justification : "");
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &apv;
  rc = emit(ap, tx, ln->subject, "qm.request.approved.v1", ln->request_id, traceparent, &de,
            errstr, errstr_size);
  if (rc == QM_OK) rc = holdings_add(tx, ln->subject, ln->item, ln->role, "approved", errstr,
                                     errstr_size);
  if (rc != QM_OK) goto out;
  const char *to[] = {ln->requester, ln->subject};
  char what[128];
  if (days > 0)
    snprintf(what, sizeof(what), "Approved%s, expires %d days after it is granted",
             bg_by ? " by BREAK-GLASS" : "", days);
  else
    snprintf(what, sizeof(what), "Approved%s", bg_by ? " by BREAK-GLASS" : "");
  rc = notify_line(ap, tx, ln, "approved", to, 2, what, errstr, errstr_size);
  count_decision(ap, "approved", how);
  qm_log(QM_LOG_INFO, ln->request_id, NULL, "line %d approved (%s)%s", ln->line_no, how,
         bg_by ? " through break-glass" : "");
out:
  free(aptrs);
  free(actors);
  if (rs) qm__v1__request_submitted__free_unpacked(rs, NULL);
  qm_pg_result_destroy(steps);
  qm_pg_result_destroy(res);
  return rc;
}

/* ---- opening a stage ---------------------------------------------------------------- */

static int add_timer(qm_pg_t *tx, const char *kind, const char *step_id, int64_t due,
                     char *errstr, size_t errstr_size) {
  return qm_timer_add(tx, "timers", kind, step_id, NULL, 0, due, NULL, errstr, errstr_size);
}

/* Opens the waiting step step_id: resolves its approvers, sets its clocks,
 * announces it. With nobody to ask the line is rejected ("no-approver"). */
static int open_step(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *step_id,
                     int stage, Qm__V1__StepKind kind, const char *traceparent, char *errstr,
                     size_t errstr_size) {
  plist_t l;
  char intended[APPROVAL_ID_MAX];
  int rc = resolve(ap, tx, ln, kind, &l, intended, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (l.n == 0)
    return reject_line(ap, tx, ln, "no-approver", NULL, NULL, 0, "no_approver", traceparent,
                       errstr, errstr_size);
  const step_clocks_t *ck = &ap->clocks[ln->risk >= 1 && ln->risk <= 3 ? ln->risk : 1];
  int64_t now = qm_now_ms();
  int64_t deadline = now + ck->reject_ms;
  const char *ids[PLIST_MAX], *froms[PLIST_MAX];
  size_t nf = 0;
  plist_vec(&l, ids);
  for (size_t i = 0; i < l.n; i++)
    if (l.from[i][0]) froms[nf++] = l.from[i];
  char *arr = pg_array(ids, l.n);
  char *farr = pg_array(froms, nf);
  qm_pg_param_t p[] = {QM_PG_TEXT(step_id), QM_PG_TEXT(arr), QM_PG_TEXT(farr),
                       QM_PG_INT64(deadline), QM_PG_INT64(now)};
  rc = qm_pg_exec(tx,
                  "UPDATE approval_steps SET status = 'pending', approver_ids = $2::text[],"
                  " delegated_from = $3::text[], deadline_ms = $4, opened_at_ms = $5"
                  " WHERE step_id = $1",
                  p, 5, NULL, errstr, errstr_size);
  free(arr);
  free(farr);
  if (rc != QM_OK) return rc;
  if (ck->remind_ms < ck->reject_ms &&
      (rc = add_timer(tx, "reminder", step_id, now + ck->remind_ms, errstr, errstr_size)))
    return rc;
  if (ck->escalate_ms < ck->reject_ms &&
      (rc = add_timer(tx, "escalation", step_id, now + ck->escalate_ms, errstr, errstr_size)))
    return rc;
  if ((rc = add_timer(tx, "auto_reject", step_id, deadline, errstr, errstr_size))) return rc;
  rc = emit_step_pending(ap, tx, ln, step_id, stage, kind, &l, deadline, traceparent, errstr,
                         errstr_size);
  if (rc != QM_OK) return rc;
  const char *kl[] = {kind_name(kind)};
  qm_metrics_inc(qm_metrics_child(ap->m_steps, kl));
  char what[160];
  snprintf(what, sizeof(what), "Approval needed (%s, stage %d%s%s)", kind_name(kind), stage,
           nf ? ", as delegate of " : "", nf ? froms[0] : "");
  qm_log(QM_LOG_INFO, ln->request_id, NULL, "line %d stage %d (%s) waits for %s%s%s",
         ln->line_no, stage, kind_name(kind), ids[0], nf ? " standing in for " : "",
         nf ? froms[0] : "");
  return notify_line(ap, tx, ln, "step_pending", ids, l.n, what, errstr, errstr_size);
}

/* Opens the next waiting stage of the line, or approves it when none is left. */
static int advance(approval_t *ap, qm_pg_t *tx, const line_t *ln, const char *how,
                   const char *traceparent, char *errstr, size_t errstr_size) {
  char no[16];
  snprintf(no, sizeof(no), "%d", ln->line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(ln->request_id), QM_PG_TEXT(no)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT step_id, stage, kind FROM approval_steps WHERE request_id = $1"
                      " AND line_no = $2::int AND status = 'waiting' ORDER BY stage LIMIT 1",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return approve_line(ap, tx, ln, how, NULL, NULL, traceparent, errstr, errstr_size);
  }
  char step_id[APPROVAL_ID_MAX];
  qm_strlcpy(step_id, qm_pg_get(res, 0, 0), sizeof(step_id));
  int stage = atoi(qm_pg_get(res, 0, 1));
  Qm__V1__StepKind kind = kind_from(qm_pg_get(res, 0, 2));
  qm_pg_result_destroy(res);
  return open_step(ap, tx, ln, step_id, stage, kind, traceparent, errstr, errstr_size);
}

/* ---- separation of duties --------------------------------------------------------------- */

static bool side_matches(const char *item, const char *role, const char *s_item,
                         const char *s_role) {
  return !strcmp(item, s_item) && (!strcmp(s_role, "*") || !strcmp(role, s_role));
}

/* Warnings for the subject getting item/role while holding (or asking for)
 * the other side of a configured pair. Returns how many (texts in w). */
static int sod_check(approval_t *ap, qm_pg_t *tx, const char *subject, const char *request_id,
                     const char *item, const char *role, char w[][256], size_t wcap,
                     size_t *nw, char *errstr, size_t errstr_size) {
  *nw = 0;
  for (size_t i = 0; i < ap->n_sod && *nw < wcap; i++) {
    const sod_pair_t *sp = &ap->sod[i];
    const char *o_item = NULL, *o_role = NULL;
    if (side_matches(item, role, sp->a_item, sp->a_role)) {
      o_item = sp->b_item;
      o_role = sp->b_role;
    } else if (side_matches(item, role, sp->b_item, sp->b_role)) {
      o_item = sp->a_item;
      o_role = sp->a_role;
    } else {
      continue;
    }
    qm_pg_param_t p[] = {QM_PG_TEXT(subject), QM_PG_TEXT(o_item), QM_PG_TEXT(o_role),
                         QM_PG_TEXT(request_id)};
    qm_pg_result_t *res = NULL;
    int rc = qm_pg_exec(
        tx,
        "SELECT item_id || ':' || role_id, 'holds' FROM holdings WHERE subject_person_id = $1"
        " AND item_id = $2 AND ($3 = '*' OR role_id = $3)"
        " UNION ALL SELECT item_id || ':' || role_id, 'has asked for' FROM approval_lines"
        " WHERE subject_person_id = $1 AND item_id = $2 AND ($3 = '*' OR role_id = $3)"
        " AND status = 'pending' AND request_id <> $4 LIMIT 1",
        p, 4, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    if (qm_pg_ntuples(res) > 0) {
      snprintf(w[*nw], 256, "separation of duties: %s %s %s, which conflicts with %s:%s",
               subject, qm_pg_get(res, 0, 1), qm_pg_get(res, 0, 0), item, role);
      (*nw)++;
    }
    qm_pg_result_destroy(res);
  }
  return QM_OK;
}

/* ---- submitted ------------------------------------------------------------------------- */

/* Automatic approval of one line: the decision is the approval service's own. */
static int approve_automatically(approval_t *ap, qm_pg_t *tx, const char *traceparent,
                                 const Qm__V1__RequestSubmitted *rs, Qm__V1__RequestLine *line,
                                 char *errstr, size_t errstr_size) {
  Qm__V1__Actor auto_actor = QM__V1__ACTOR__INIT;
  auto_actor.service = (char *)"approval";
  Qm__V1__Actor *approvers[] = {&auto_actor};
  Qm__V1__RequestApproved apv = QM__V1__REQUEST_APPROVED__INIT;
  apv.request_id = rs->request_id;
  apv.line = line;
  apv.subject_person_id = rs->subject_person_id;
  apv.subject_directory_username = rs->subject_directory_username;
  apv.n_approvers = 1;
  apv.approvers = approvers;
  apv.grant_duration_days = line->duration_days;
  apv.approved_at_ms = qm_now_ms();
  apv.requester = rs->requester;
  apv.extends_request_id = rs->extends_request_id;
  apv.subject_country = rs->subject_country;
  apv.subject_location = rs->subject_location;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &apv;
  int rc = emit(ap, tx, rs->subject_person_id, "qm.request.approved.v1", rs->request_id,
                traceparent, &de, errstr, errstr_size);
  if (rc == QM_OK)
    rc = holdings_add(tx, rs->subject_person_id, line->item_id, line->role_id, "approved",
                      errstr, errstr_size);
  if (rc == QM_OK) count_decision(ap, "approved", "automatic");
  return rc;
}

static int route_line(approval_t *ap, qm_pg_t *tx, const char *traceparent,
                      const Qm__V1__RequestSubmitted *rs, Qm__V1__RequestLine *line,
                      char *errstr, size_t errstr_size) {
  const char *requester =
      rs->requester && rs->requester->person_id ? rs->requester->person_id : "";
  bool over_cost = line->cost_minor > ap->cost_threshold_minor;
  /* Automatic: a standard-risk line the catalog lets through (unless it
   * costs more than the threshold or is regulated), or a standard-risk
   * birthright line; a flagged request always goes to a person. */
  bool birthright = !strcmp(rs->origin, "birthright");
  bool automatic = line->risk == QM__V1__RISK__RISK_STANDARD && rs->n_flags == 0 &&
                   (birthright || (line->auto_approve_allowed && !over_cost && !line->regulated));
  char warn[APPROVAL_MAX_LIST][256];
  size_t nw = 0;
  int rc = QM_OK;
  if (!automatic || ap->n_sod > 0) {
    rc = sod_check(ap, tx, rs->subject_person_id, rs->request_id, line->item_id, line->role_id,
                   warn, APPROVAL_MAX_LIST, &nw, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    if (nw > 0) automatic = false;
  }
  size_t len = qm__v1__request_submitted__get_packed_size(rs);
  uint8_t *buf = qm_malloc(len);
  qm__v1__request_submitted__pack(rs, buf);
  char no[16], cost[24], dur[16], maxd[16];
  snprintf(no, sizeof(no), "%d", line->line_no);
  snprintf(cost, sizeof(cost), "%" PRId64, (int64_t)line->cost_minor);
  snprintf(dur, sizeof(dur), "%d", line->duration_days);
  snprintf(maxd, sizeof(maxd), "%d", line->max_duration_days);
  const char *wv[APPROVAL_MAX_LIST];
  for (size_t i = 0; i < nw; i++) wv[i] = warn[i];
  char *warr = pg_array(wv, nw);
  char *farr = pg_array((const char *const *)rs->flags, rs->n_flags);
  qm_pg_param_t p[] = {QM_PG_TEXT(rs->request_id),      QM_PG_TEXT(no),
                       QM_PG_TEXT(rs->subject_person_id), QM_PG_TEXT(requester),
                       QM_PG_TEXT(line->item_id),        QM_PG_TEXT(line->role_id),
                       QM_PG_TEXT(risk_name(line->risk)),
                       QM_PG_TEXT(automatic ? "approved" : "pending"),
                       QM_PG_BYTES(buf, len),            QM_PG_TEXT(line->owner_id),
                       QM_PG_TEXT(rs->subject_manager_id), QM_PG_TEXT(cost),
                       QM_PG_TEXT(line->regulated ? "true" : "false"),
                       QM_PG_TEXT(dur),                  QM_PG_TEXT(maxd),
                       QM_PG_TEXT(rs->reason),           QM_PG_TEXT(farr),
                       QM_PG_TEXT(warr)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "INSERT INTO approval_lines (request_id, line_no, subject_person_id,"
                  " requester_id, item_id, role_id, risk, status, submitted, decided_at,"
                  " owner_id, subject_manager_id, cost_minor, regulated, duration_days,"
                  " max_duration_days, reason, flags, sod_warnings)"
                  " VALUES ($1, $2::int, $3, $4, $5, $6, $7, $8, $9,"
                  " CASE WHEN $8 = 'approved' THEN now() END, $10, $11, $12::bigint,"
                  " $13::boolean, $14::int, $15::int, $16, $17::text[], $18::text[])"
                  " ON CONFLICT (request_id, line_no) DO NOTHING",
                  p, 18, &res, errstr, errstr_size);
  free(buf);
  free(warr);
  free(farr);
  if (rc != QM_OK) return rc;
  int64_t inserted = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (inserted == 0) return QM_OK; /* the same request seen before under another event id */
  if (automatic) {
    rc = approve_automatically(ap, tx, traceparent, rs, line, errstr, errstr_size);
    if (rc == QM_OK)
      qm_log(QM_LOG_INFO, rs->request_id, NULL, "line %d (%s/%s, %s risk): approved automatically",
             line->line_no, line->item_id, line->role_id, risk_name(line->risk));
    return rc;
  }
  line_t ln;
  if ((rc = line_load(tx, rs->request_id, line->line_no, &ln, errstr, errstr_size))) return rc;
  if (nw > 0 && !ap->sod_to_security)
    return reject_line(ap, tx, &ln, "sod-conflict", NULL, NULL, 0, "sod", traceparent, errstr,
                       errstr_size);
  /* The plan. */
  Qm__V1__StepKind stages[4];
  int ns = 0;
  stages[ns++] = line->risk == QM__V1__RISK__RISK_STANDARD ? QM__V1__STEP_KIND__STEP_KIND_MANAGER
                                                           : QM__V1__STEP_KIND__STEP_KIND_APP_OWNER;
  if (over_cost) stages[ns++] = QM__V1__STEP_KIND__STEP_KIND_FINANCE;
  if (line->regulated || nw > 0) stages[ns++] = QM__V1__STEP_KIND__STEP_KIND_SECURITY;
  char first[QM_UUID_STR_LEN] = "";
  for (int s = 0; s < ns; s++) {
    char step_id[QM_UUID_STR_LEN], stage[8];
    qm_uuid_new(step_id);
    if (s == 0) qm_strlcpy(first, step_id, sizeof(first));
    snprintf(stage, sizeof(stage), "%d", s + 1);
    qm_pg_param_t sp[] = {QM_PG_TEXT(step_id), QM_PG_TEXT(rs->request_id), QM_PG_TEXT(no),
                          QM_PG_TEXT(stage), QM_PG_TEXT(kind_name(stages[s]))};
    rc = qm_pg_exec(tx,
                    "INSERT INTO approval_steps (step_id, request_id, line_no, stage, kind,"
                    " approver_ids, status) VALUES ($1, $2, $3::int, $4::int, $5, '{}',"
                    " 'waiting')",
                    sp, 5, NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  qm_log(QM_LOG_INFO, rs->request_id, NULL, "line %d (%s/%s, %s risk): %d stage(s)%s",
         line->line_no, line->item_id, line->role_id, risk_name(line->risk), ns,
         nw ? ", with a separation-of-duties warning" : "");
  return open_step(ap, tx, &ln, first, 1, stages[0], traceparent, errstr, errstr_size);
}

int route_submitted(approval_t *ap, qm_pg_t *tx, const char *traceparent,
                    const Qm__V1__RequestSubmitted *rs, char *errstr, size_t errstr_size) {
  if (!rs->request_id[0] || !rs->subject_person_id[0] || rs->n_lines == 0)
    return qm_err(errstr, errstr_size, QM_EPOISON,
                  "RequestSubmitted without request_id, subject or lines");
  for (size_t i = 0; i < rs->n_lines; i++) {
    int rc = route_line(ap, tx, traceparent, rs, rs->lines[i], errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  return QM_OK;
}

int route_cancelled(approval_t *ap, qm_pg_t *tx, const Qm__V1__RequestCancelled *rc_ev,
                    char *errstr, size_t errstr_size) {
  QM_UNUSED(ap);
  qm_pg_param_t p[] = {QM_PG_TEXT(rc_ev->request_id)};
  int rc = qm_pg_exec(tx,
                      "UPDATE timers SET status = 'cancelled', synced = false"
                      " WHERE status = 'pending' AND owner_key IN (SELECT step_id FROM"
                      " approval_steps WHERE request_id = $1 AND status IN ('waiting','pending'))",
                      p, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  rc = qm_pg_exec(tx,
                  "UPDATE approval_steps SET status = 'cancelled', decided_at = now()"
                  " WHERE request_id = $1 AND status IN ('waiting','pending')",
                  p, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  rc = qm_pg_exec(tx,
                  "UPDATE approval_lines SET status = 'cancelled', decided_at = now()"
                  " WHERE request_id = $1 AND status = 'pending'",
                  p, 1, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log(QM_LOG_INFO, rc_ev->request_id, NULL, "cancelled: open steps and timers closed");
  return rc;
}

/* ---- decisions ---------------------------------------------------------------------------- */

typedef struct step_row {
  char request_id[APPROVAL_ID_MAX];
  int line_no, stage;
  char status[16], kind[16];
  plist_t approvers;
  plist_t approvals;
  bool all_required;
} step_row_t;

static int step_load(qm_pg_t *tx, const char *step_id, step_row_t *s, char *errstr,
                     size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(step_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT request_id, line_no, stage, status, kind, approver_ids, approvals,"
                      " all_required FROM approval_steps WHERE step_id = $1 FOR UPDATE",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "no step %s", step_id);
  }
  memset(s, 0, sizeof(*s));
  qm_strlcpy(s->request_id, qm_pg_get(res, 0, 0), sizeof(s->request_id));
  s->line_no = atoi(qm_pg_get(res, 0, 1));
  s->stage = atoi(qm_pg_get(res, 0, 2));
  qm_strlcpy(s->status, qm_pg_get(res, 0, 3), sizeof(s->status));
  qm_strlcpy(s->kind, qm_pg_get(res, 0, 4), sizeof(s->kind));
  pg_array_parse(qm_pg_get(res, 0, 5), &s->approvers);
  pg_array_parse(qm_pg_get(res, 0, 6), &s->approvals);
  s->all_required = !strcmp(qm_pg_get(res, 0, 7), "t");
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Whether who stands in right now for one of the approvers (away, named
 * them as delegate). */
static int is_delegate_now(qm_pg_t *tx, const char *who, const plist_t *approvers, bool *yes,
                           char *errstr, size_t errstr_size) {
  const char *ids[PLIST_MAX];
  plist_vec(approvers, ids);
  char *arr = pg_array(ids, approvers->n);
  qm_pg_param_t p[] = {QM_PG_TEXT(who), QM_PG_TEXT(arr), QM_PG_INT64(qm_now_ms())};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT 1 FROM away WHERE delegate_id = $1 AND person_id = ANY($2::text[])"
                      " AND from_ms <= $3 AND (until_ms IS NULL OR until_ms > $3) LIMIT 1",
                      p, 3, &res, errstr, errstr_size);
  free(arr);
  if (rc != QM_OK) return rc;
  *yes = qm_pg_ntuples(res) > 0;
  qm_pg_result_destroy(res);
  return QM_OK;
}

int route_decide(approval_t *ap, qm_pg_t *tx, const decide_in_t *in, char *errstr,
                 size_t errstr_size) {
  step_row_t s;
  line_t ln;
  int rc = step_load(tx, in->step_id, &s, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if ((rc = line_load(tx, s.request_id, s.line_no, &ln, errstr, errstr_size))) return rc;
  if (strcmp(s.status, "pending") != 0)
    return qm_err(errstr, errstr_size, QM_ECONFLICT, "step %s is %s, not pending", in->step_id,
                  s.status);
  if (excluded(&ln, in->who))
    return qm_err(errstr, errstr_size, QM_EFORBIDDEN,
                  "self-approval: %s %s this request; nobody decides their own request or "
                  "their own access",
                  in->who, !strcmp(in->who, ln.subject) ? "is the subject of" : "made");
  bool allowed = plist_has(&s.approvers, in->who);
  if (!allowed &&
      (rc = is_delegate_now(tx, in->who, &s.approvers, &allowed, errstr, errstr_size)))
    return rc;
  if (!allowed)
    return qm_err(errstr, errstr_size, QM_EFORBIDDEN,
                  "%s is not an approver of step %s (nor standing in for one)", in->who,
                  in->step_id);
  const char *comment = in->comment ? in->comment : "";
  if (in->approve && s.all_required) {
    plist_push(&s.approvals, in->who, "");
    bool all = true;
    for (size_t i = 0; i < s.approvers.n; i++)
      if (!plist_has(&s.approvals, s.approvers.ids[i])) all = false;
    if (!all) {
      const char *v[PLIST_MAX];
      plist_vec(&s.approvals, v);
      char *arr = pg_array(v, s.approvals.n);
      qm_pg_param_t p[] = {QM_PG_TEXT(in->step_id), QM_PG_TEXT(arr)};
      rc = qm_pg_exec(tx, "UPDATE approval_steps SET approvals = $2::text[] WHERE step_id = $1",
                      p, 2, NULL, errstr, errstr_size);
      free(arr);
      if (rc != QM_OK) return rc;
      return emit_step_decided(ap, tx, &ln, in->step_id, true, in->who, in->roles, in->n_roles,
                               comment, false, in->traceparent, errstr, errstr_size);
    }
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(in->step_id), QM_PG_TEXT(in->approve ? "approved" : "rejected"),
                       QM_PG_TEXT(in->who), QM_PG_TEXT(comment)};
  rc = qm_pg_exec(tx,
                  "UPDATE approval_steps SET status = $2, decided_by = $3, comment = $4,"
                  " decided_at = now() WHERE step_id = $1",
                  p, 4, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_timer_cancel_owner(tx, "timers", in->step_id, NULL, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = emit_step_decided(ap, tx, &ln, in->step_id, in->approve, in->who, in->roles,
                           in->n_roles, comment, false, in->traceparent, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_log(QM_LOG_INFO, ln.request_id, NULL, "line %d stage %d (%s) %s by %s", ln.line_no, s.stage,
         s.kind, in->approve ? "approved" : "denied", in->who);
  if (!in->approve)
    return reject_line(ap, tx, &ln, *comment ? comment : "denied", in->who, in->roles,
                       in->n_roles, "human", in->traceparent, errstr, errstr_size);
  return advance(ap, tx, &ln, "human", in->traceparent, errstr, errstr_size);
}

int route_break_glass(approval_t *ap, qm_pg_t *tx, const break_glass_in_t *in, char *errstr,
                      size_t errstr_size) {
  line_t ln;
  int rc = line_load(tx, in->request_id, in->line_no, &ln, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (strcmp(ln.status, "pending") != 0)
    return qm_err(errstr, errstr_size, QM_ECONFLICT, "line %d of %s is %s, not pending",
                  in->line_no, in->request_id, ln.status);
  if (excluded(&ln, in->who))
    return qm_err(errstr, errstr_size, QM_EFORBIDDEN,
                  "self-approval: break-glass on a request one made or for oneself is refused");
  char no[16];
  snprintf(no, sizeof(no), "%d", in->line_no);
  qm_pg_param_t p[] = {QM_PG_TEXT(in->request_id), QM_PG_TEXT(no), QM_PG_TEXT(in->who),
                       QM_PG_TEXT(in->justification)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "UPDATE approval_steps SET status = 'approved', decided_by = $3, comment = $4,"
                  " break_glass = true, decided_at = now() WHERE request_id = $1"
                  " AND line_no = $2::int AND status = 'pending' RETURNING step_id",
                  p, 4, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++)
    rc = emit_step_decided(ap, tx, &ln, qm_pg_get(res, i, 0), true, in->who, in->roles,
                           in->n_roles, in->justification, true, in->traceparent, errstr,
                           errstr_size);
  qm_pg_result_destroy(res);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx,
                    "UPDATE approval_steps SET status = 'cancelled', decided_at = now()"
                    " WHERE request_id = $1 AND line_no = $2::int AND status = 'waiting'",
                    p, 2, NULL, errstr, errstr_size);
  if (rc == QM_OK) rc = cancel_line_timers(tx, in->request_id, in->line_no, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx,
                    "UPDATE approval_lines SET break_glass = true, break_glass_by = $3,"
                    " break_glass_justification = $4 WHERE request_id = $1"
                    " AND line_no = $2::int",
                    p, 4, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = approve_line(ap, tx, &ln, "break_glass", in->who, in->justification, in->traceparent,
                      errstr, errstr_size);
  if (rc != QM_OK) return rc;
  /* Security reviews every break-glass. */
  const char *sec[APPROVAL_MAX_LIST];
  for (size_t i = 0; i < ap->security.n; i++) sec[i] = ap->security.ids[i];
  char what[600];
  snprintf(what, sizeof(what), "BREAK-GLASS by %s, for review. Justification: %.400s", in->who,
           in->justification);
  qm_log(QM_LOG_WARN, ln.request_id, NULL,
         "break-glass: line %d approved at once by %s; security notified", ln.line_no, in->who);
  return notify_line(ap, tx, &ln, "break_glass", sec, ap->security.n, what, errstr,
                     errstr_size);
}

/* ---- timers ------------------------------------------------------------------------------ */

int route_fire(void *ctx, qm_pg_t *tx, const qm_timer_t *tm, char *errstr, size_t errstr_size) {
  approval_t *ap = ctx;
  step_row_t s;
  line_t ln;
  int rc = step_load(tx, tm->owner_key, &s, errstr, errstr_size);
  if (rc == QM_ENOTFOUND) return QM_OK; /* nothing left to chase */
  if (rc != QM_OK) return rc;
  if (strcmp(s.status, "pending") != 0) return QM_OK;
  if ((rc = line_load(tx, s.request_id, s.line_no, &ln, errstr, errstr_size))) return rc;
  if (strcmp(ln.status, "pending") != 0) return QM_OK;
  const char *ids[PLIST_MAX];
  plist_vec(&s.approvers, ids);
  qm_pg_param_t p[] = {QM_PG_TEXT(tm->owner_key)};
  if (!strcmp(tm->kind, "reminder")) {
    rc = qm_pg_exec(tx, "UPDATE approval_steps SET reminders = reminders + 1 WHERE step_id = $1",
                    p, 1, NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    qm_log(QM_LOG_INFO, ln.request_id, NULL, "line %d stage %d: reminder sent to %s", ln.line_no,
           s.stage, ids[0]);
    return notify_line(ap, tx, &ln, "reminder", ids, s.approvers.n,
                       "Reminder: approval still needed", errstr, errstr_size);
  }
  if (!strcmp(tm->kind, "escalation")) {
    plist_t more = s.approvers;
    size_t before = more.n;
    bool added = false;
    for (size_t i = 0; i < before && !added; i++)
      if ((rc = add_fallback(ap, tx, &ln, s.approvers.ids[i], &more, &added, errstr,
                             errstr_size)))
        return rc;
    if (!added) {
      qm_log(QM_LOG_WARN, ln.request_id, NULL,
             "line %d stage %d: nobody to escalate to (check QM_APPROVAL_FALLBACK_APPROVERS)",
             ln.line_no, s.stage);
      return QM_OK;
    }
    const char *all[PLIST_MAX];
    plist_vec(&more, all);
    char *arr = pg_array(all, more.n);
    qm_pg_param_t pu[] = {QM_PG_TEXT(tm->owner_key), QM_PG_TEXT(arr)};
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(tx,
                    "UPDATE approval_steps SET approver_ids = $2::text[], escalated = true"
                    " WHERE step_id = $1 RETURNING deadline_ms",
                    pu, 2, &res, errstr, errstr_size);
    free(arr);
    if (rc != QM_OK) return rc;
    int64_t deadline = 0;
    (void)qm_pg_get_int64(res, 0, 0, &deadline);
    qm_pg_result_destroy(res);
    rc = emit_step_pending(ap, tx, &ln, tm->owner_key, s.stage, kind_from(s.kind), &more,
                           deadline, NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    qm_log(QM_LOG_INFO, ln.request_id, NULL, "line %d stage %d: escalated to %s", ln.line_no,
           s.stage, more.ids[before]);
    const char *to[] = {more.ids[before]};
    return notify_line(ap, tx, &ln, "escalation", to, 1, "Escalated to you: approval overdue",
                       errstr, errstr_size);
  }
  if (!strcmp(tm->kind, "auto_reject")) {
    rc = qm_pg_exec(tx,
                    "UPDATE approval_steps SET status = 'rejected', decided_by = NULL,"
                    " comment = 'timeout', decided_at = now() WHERE step_id = $1",
                    p, 1, NULL, errstr, errstr_size);
    if (rc == QM_OK)
      rc = emit_step_decided(ap, tx, &ln, tm->owner_key, false, NULL, NULL, 0, "timeout", false,
                             NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    return reject_line(ap, tx, &ln, "timeout", NULL, NULL, 0, "timeout", NULL, errstr,
                       errstr_size);
  }
  return qm_err(errstr, errstr_size, QM_EINVAL, "unknown timer kind '%s'", tm->kind);
}

/* ---- an approver leaves --------------------------------------------------------------- */

int route_approver_left(approval_t *ap, qm_pg_t *tx, const char *person_id, const char *traceparent,
                        char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(person_id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT step_id FROM approval_steps WHERE status = 'pending'"
                      " AND approver_ids @> ARRAY[$1::text] ORDER BY seq",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    const char *step_id = qm_pg_get(res, i, 0);
    step_row_t s;
    line_t ln;
    if ((rc = step_load(tx, step_id, &s, errstr, errstr_size))) break;
    if ((rc = line_load(tx, s.request_id, s.line_no, &ln, errstr, errstr_size))) break;
    plist_t rest;
    memset(&rest, 0, sizeof(rest));
    for (size_t k = 0; k < s.approvers.n; k++)
      if (strcmp(s.approvers.ids[k], person_id) != 0) plist_push(&rest, s.approvers.ids[k], "");
    bool added = false;
    if (rest.n == 0 &&
        (rc = add_fallback(ap, tx, &ln, person_id, &rest, &added, errstr, errstr_size)))
      break;
    if (rest.n == 0) {
      qm_log(QM_LOG_WARN, ln.request_id, NULL,
             "line %d stage %d: approver %s left and nobody can take over; the step's "
             "escalation and auto-reject timers still run (check QM_APPROVAL_FALLBACK_APPROVERS)",
             ln.line_no, s.stage, person_id);
      continue;
    }
    const char *ids[PLIST_MAX];
    plist_vec(&rest, ids);
    char *arr = pg_array(ids, rest.n);
    qm_pg_param_t pu[] = {QM_PG_TEXT(step_id), QM_PG_TEXT(arr)};
    qm_pg_result_t *dr = NULL;
    rc = qm_pg_exec(tx,
                    "UPDATE approval_steps SET approver_ids = $2::text[] WHERE step_id = $1"
                    " RETURNING deadline_ms",
                    pu, 2, &dr, errstr, errstr_size);
    free(arr);
    if (rc != QM_OK) break;
    int64_t deadline = 0;
    (void)qm_pg_get_int64(dr, 0, 0, &deadline);
    qm_pg_result_destroy(dr);
    rc = emit_step_pending(ap, tx, &ln, step_id, s.stage, kind_from(s.kind), &rest, deadline,
                           traceparent, errstr, errstr_size);
    if (rc != QM_OK) break;
    qm_log(QM_LOG_INFO, ln.request_id, NULL, "line %d stage %d: approver %s left; now %s",
           ln.line_no, s.stage, person_id, ids[0]);
    if (added) {
      char what[160];
      snprintf(what, sizeof(what), "Reassigned to you: approver %s left", person_id);
      const char *to[] = {ids[0]};
      rc = notify_line(ap, tx, &ln, "reassigned", to, 1, what, errstr, errstr_size);
    }
  }
  qm_pg_result_destroy(res);
  return rc;
}
