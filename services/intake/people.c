/*
 * people: intake's directory of people, built from qm.hr.lifecycle.v1.
 *
 * HR changes are effective-dated and arrive late, twice or out of order: a
 * change is dropped when (source, source_event_id, effective_date) was seen
 * before, and applied only when its effective date is not older than the
 * one the person's record already reflects. The seed file loads with the
 * earliest possible effective date, so any HR event wins over it.
 */
#include "intake.h"

#include "qm_common.h"
#include "qm_log.h"

#include "qm/v1/hr.pb-c.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define PERSON_COLUMNS                                                                           \
  "id, name, email, manager_id, department, job_function, country, location, employment_type," \
  " status, directory_username"

int people_get(qm_pg_t *pg, const char *id, person_t *out, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg, "SELECT " PERSON_COLUMNS " FROM people WHERE id = $1", p, 1, &res,
                      errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "no person '%s' in the directory", id);
  }
  person_t p2;
  memset(&p2, 0, sizeof(p2));
  struct { char *dst; size_t n; } cols[] = {
      {p2.id, sizeof(p2.id)}, {p2.name, sizeof(p2.name)}, {p2.email, sizeof(p2.email)},
      {p2.manager_id, sizeof(p2.manager_id)}, {p2.department, sizeof(p2.department)},
      {p2.job_function, sizeof(p2.job_function)}, {p2.country, sizeof(p2.country)},
      {p2.location, sizeof(p2.location)}, {p2.employment_type, sizeof(p2.employment_type)},
      {p2.status, sizeof(p2.status)}, {p2.directory_username, sizeof(p2.directory_username)}};
  for (size_t i = 0; i < QM_ARRAY_LEN(cols); i++)
    qm_strlcpy(cols[i].dst, qm_pg_get(res, 0, (int)i), cols[i].n);
  qm_pg_result_destroy(res);
  *out = p2;
  return QM_OK;
}

/* Upserts one person unless the stored record reflects a later effective date. */
static int people_upsert(qm_pg_t *tx, const char *const v[13], const char *effective_date,
                         char *errstr, size_t errstr_size) {
  qm_pg_param_t p[14];
  for (int i = 0; i < 13; i++) p[i] = QM_PG_TEXT(v[i] ? v[i] : "");
  p[13] = QM_PG_TEXT(effective_date);
  return qm_pg_exec(
      tx,
      "INSERT INTO people (id, name, email, manager_id, department, job_function, country,"
      " location, employment_type, status, directory_username, start_date, end_date,"
      " effective_date) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
      " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email,"
      " manager_id = EXCLUDED.manager_id, department = EXCLUDED.department,"
      " job_function = EXCLUDED.job_function, country = EXCLUDED.country,"
      " location = EXCLUDED.location, employment_type = EXCLUDED.employment_type,"
      " status = EXCLUDED.status, directory_username = EXCLUDED.directory_username,"
      " start_date = EXCLUDED.start_date, end_date = EXCLUDED.end_date,"
      " effective_date = EXCLUDED.effective_date, updated_at = now()"
      " WHERE people.effective_date <= EXCLUDED.effective_date",
      p, 14, NULL, errstr, errstr_size);
}

typedef struct seed_ctx {
  json_t *people;
} seed_ctx_t;

static int seed_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  seed_ctx_t *sc = ctx;
  size_t i;
  json_t *pj;
  json_array_foreach(sc->people, i, pj) {
    const char *id = json_string_value(json_object_get(pj, "id"));
    if (!id || !*id) return qm_err(errstr, errstr_size, QM_EINVAL, "people[%zu]: missing 'id'", i);
    static const char *const keys[13] = {"id", "name", "email", "manager_id", "department",
                                         "job_function", "country", "location", "employment_type",
                                         "status", "directory_username", "start_date", "end_date"};
    const char *v[13];
    for (int k = 0; k < 13; k++) v[k] = json_string_value(json_object_get(pj, keys[k]));
    if (!v[8]) v[8] = "employee";
    if (!v[9]) v[9] = "active";
    if (!v[10]) v[10] = id;
    int rc = people_upsert(tx, v, "0000-00-00", errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  return QM_OK;
}

int people_seed(intake_t *in, const char *path, char *errstr, size_t errstr_size) {
  json_error_t jerr;
  json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
  if (!root)
    return qm_err(errstr, errstr_size, QM_EINVAL, "%s:%d:%d: %s (QM_INTAKE_PEOPLE_FILE)", path,
                  jerr.line, jerr.column, jerr.text);
  seed_ctx_t sc = {.people = json_object_get(root, "people")};
  int rc;
  if (!json_is_array(sc.people)) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s: expected {\"people\": [...]}", path);
  } else {
    rc = qm_service_tx(in->svc, 30000, seed_tx, &sc, errstr, errstr_size);
    if (rc == QM_OK)
      qm_log_info("people directory seeded from %s: %zu people", path, json_array_size(sc.people));
  }
  json_decref(root);
  return rc;
}

static bool valid_date(const char *s) {
  int y, m, d;
  char tail;
  return s && strlen(s) == 10 && sscanf(s, "%4d-%2d-%2d%c", &y, &m, &d, &tail) == 3 && m >= 1 &&
         m <= 12 && d >= 1 && d <= 31;
}

static const char *employment_name(Qm__V1__EmploymentType t) {
  switch (t) {
  case QM__V1__EMPLOYMENT_TYPE__EMPLOYMENT_TYPE_CONTRACTOR: return "contractor";
  case QM__V1__EMPLOYMENT_TYPE__EMPLOYMENT_TYPE_THIRD_PARTY: return "third_party";
  default: return "employee";
  }
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

int people_on_hr_event(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size) {
  QM_UNUSED(in);
  Qm__V1__HrEvent *he = qm__v1__hr_event__unpack(NULL, ev->payload_len, ev->payload);
  if (!he)
    return qm_err(errstr, errstr_size, QM_EPOISON, "payload of %s is not a qm.v1.HrEvent",
                  ev->meta.type);
  int rc = QM_OK;
  const Qm__V1__Person *p = he->person;
  if (!p || !p->id[0] || !he->source[0] || !he->source_event_id[0] ||
      !valid_date(he->effective_date)) {
    rc = qm_err(errstr, errstr_size, QM_EPOISON,
                "HrEvent needs person.id, source, source_event_id and effective_date YYYY-MM-DD");
    goto out;
  }
  qm_pg_param_t dp[] = {QM_PG_TEXT(he->source), QM_PG_TEXT(he->source_event_id),
                        QM_PG_TEXT(he->effective_date)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "INSERT INTO hr_events_seen (source, source_event_id, effective_date)"
                  " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                  dp, 3, &res, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  int64_t fresh = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (fresh == 0) {
    qm_log_info("HR event %s/%s (%s) seen before; dropped", he->source, he->source_event_id,
                he->effective_date);
    goto out;
  }
  const char *v[13] = {p->id,         p->name,        p->email,
                       p->manager_id, p->department,  p->job_function,
                       p->country,    p->location,    employment_name(p->employment_type),
                       status_name(p->status, he->kind),
                       p->directory_username[0] ? p->directory_username : p->id,
                       p->start_date, p->end_date};
  rc = people_upsert(tx, v, he->effective_date, errstr, errstr_size);
  if (rc == QM_OK)
    qm_log_info("HR %s applied for %s effective %s", ev->meta.type, p->id, he->effective_date);
out:
  qm__v1__hr_event__free_unpacked(he, NULL);
  return rc;
}
