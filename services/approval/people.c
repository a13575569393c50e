/*
 * people: approval's own view of the organisation and of what people hold.
 *
 * Routing needs a manager's manager, approvers need the subject's department
 * and title, and separation of duties needs what the subject holds. Services
 * never read each other's tables, so approval keeps:
 *  - people: seeded from the same file as intake (QM_APPROVAL_PEOPLE_FILE,
 *    inserted only where absent) and kept current from qm.hr.lifecycle.v1,
 *    applied by effective date (an older change never overwrites a newer);
 *  - holdings: what each subject holds, from qm.access.v1 (granted adds,
 *    revoked removes) and from its own approvals (so a conflict is seen before
 *    provisioning has applied the first grant).
 */
#include "approval.h"

#include "qm_common.h"
#include "qm_log.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

/* Inserts or updates one person; an update applies only when its effective
 * date is not older than the one on record. */
static int people_upsert(qm_pg_t *tx, const char *const v[7], const char *effective,
                         bool insert_only, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(v[0]), QM_PG_TEXT(v[1]), QM_PG_TEXT(v[2]), QM_PG_TEXT(v[3]),
                       QM_PG_TEXT(v[4]), QM_PG_TEXT(v[5]), QM_PG_TEXT(v[6]),
                       QM_PG_TEXT(effective)};
  const char *sql =
      insert_only
          ? "INSERT INTO people (id, name, email, manager_id, department, job_function, status,"
            " effective_date) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (id) DO NOTHING"
          : "INSERT INTO people (id, name, email, manager_id, department, job_function, status,"
            " effective_date) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (id) DO UPDATE SET"
            " name = EXCLUDED.name, email = EXCLUDED.email, manager_id = EXCLUDED.manager_id,"
            " department = EXCLUDED.department, job_function = EXCLUDED.job_function,"
            " status = EXCLUDED.status, effective_date = EXCLUDED.effective_date,"
            " updated_at = now() WHERE people.effective_date <= EXCLUDED.effective_date";
  return qm_pg_exec(tx, sql, p, 8, NULL, errstr, errstr_size);
}

typedef struct seed_ctx {
  json_t *people;
} seed_ctx_t;

static const char *jstr(json_t *o, const char *k) {
  const char *s = json_string_value(json_object_get(o, k));
  return s ? s : "";
}

static int seed_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  seed_ctx_t *sc = ctx;
  size_t i;
  json_t *p;
  json_array_foreach(sc->people, i, p) {
    const char *v[7] = {jstr(p, "id"),         jstr(p, "name"),         jstr(p, "email"),
                        jstr(p, "manager_id"), jstr(p, "department"),   jstr(p, "job_function"),
                        *jstr(p, "status") ? jstr(p, "status") : "active"};
    if (!*v[0]) continue;
    int rc = people_upsert(tx, v, "", true, errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  return QM_OK;
}

int people_seed(approval_t *ap, const char *path, char *errstr, size_t errstr_size) {
  json_error_t jerr;
  json_t *root = json_load_file(path, 0, &jerr);
  if (!root)
    return qm_err(errstr, errstr_size, QM_EINVAL, "%s:%d:%d: %s (QM_APPROVAL_PEOPLE_FILE)", path,
                  jerr.line, jerr.column, jerr.text);
  seed_ctx_t sc = {.people = json_object_get(root, "people")};
  int rc = QM_OK;
  if (!json_is_array(sc.people))
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s: no \"people\" array (QM_APPROVAL_PEOPLE_FILE)",
                path);
  else
    rc = qm_service_tx(ap->svc, 30000, seed_tx, &sc, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log_info("people directory seeded from %s: %zu people", path, json_array_size(sc.people));
  json_decref(root);
  return rc;
}

static const char *status_name(Qm__V1__PersonStatus s, Qm__V1__HrEventKind kind) {
  if (kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER) return "terminated";
  switch (s) {
  case QM__V1__PERSON_STATUS__PERSON_STATUS_PRE_HIRE: return "pre_hire";
  case QM__V1__PERSON_STATUS__PERSON_STATUS_ON_LEAVE: return "on_leave";
  case QM__V1__PERSON_STATUS__PERSON_STATUS_TERMINATED: return "terminated";
  default: return "active";
  }
}

int people_apply_hr(qm_pg_t *tx, const Qm__V1__HrEvent *he, char *errstr, size_t errstr_size) {
  const Qm__V1__Person *p = he->person;
  if (!p || !p->id || !p->id[0])
    return qm_err(errstr, errstr_size, QM_EPOISON, "HrEvent without a person id");
  const char *v[7] = {p->id,         p->name,       p->email,
                      p->manager_id, p->department, p->job_function,
                      status_name(p->status, he->kind)};
  return people_upsert(tx, v, he->effective_date ? he->effective_date : "", false, errstr,
                       errstr_size);
}

int holdings_add(qm_pg_t *tx, const char *subject, const char *item, const char *role,
                 const char *source, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(subject), QM_PG_TEXT(item), QM_PG_TEXT(role ? role : ""),
                       QM_PG_TEXT(source)};
  return qm_pg_exec(tx,
                    "INSERT INTO holdings (subject_person_id, item_id, role_id, source)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    p, 4, NULL, errstr, errstr_size);
}

int holdings_apply_access(qm_pg_t *tx, const Qm__V1__AccessEvent *ae, char *errstr,
                          size_t errstr_size) {
  if (ae->event_case == QM__V1__ACCESS_EVENT__EVENT_GRANTED) {
    const Qm__V1__AccessGranted *g = ae->granted;
    if (!g->subject_person_id[0] || !g->item_id[0]) return QM_OK;
    return holdings_add(tx, g->subject_person_id, g->item_id, g->role_id, "granted", errstr,
                        errstr_size);
  }
  if (ae->event_case == QM__V1__ACCESS_EVENT__EVENT_REVOKED) {
    const Qm__V1__AccessRevoked *r = ae->revoked;
    qm_pg_param_t p[] = {QM_PG_TEXT(r->subject_person_id), QM_PG_TEXT(r->item_id),
                         QM_PG_TEXT(r->role_id)};
    return qm_pg_exec(tx,
                      "DELETE FROM holdings WHERE subject_person_id = $1 AND item_id = $2"
                      " AND role_id = $3",
                      p, 3, NULL, errstr, errstr_size);
  }
  return QM_OK;
}

int people_manager_of(qm_pg_t *tx, const char *id, char *out, char *errstr,
                      size_t errstr_size) {
  out[0] = '\0';
  if (!id || !*id) return QM_OK;
  qm_pg_param_t p[] = {QM_PG_TEXT(id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx, "SELECT manager_id FROM people WHERE id = $1", p, 1, &res, errstr,
                      errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) > 0) qm_strlcpy(out, qm_pg_get(res, 0, 0), APPROVAL_ID_MAX);
  qm_pg_result_destroy(res);
  return QM_OK;
}

bool people_is_terminated(qm_pg_t *tx, const char *id) {
  qm_pg_param_t p[] = {QM_PG_TEXT(id)};
  qm_pg_result_t *res = NULL;
  char errstr[256];
  if (qm_pg_exec(tx, "SELECT 1 FROM people WHERE id = $1 AND status = 'terminated'", p, 1, &res,
                 errstr, sizeof(errstr)) != QM_OK)
    return false;
  bool yes = qm_pg_ntuples(res) > 0;
  qm_pg_result_destroy(res);
  return yes;
}
