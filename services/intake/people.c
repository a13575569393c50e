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

#include "qm_api.h"
#include "qm_topics.h"

#include "qm/v1/requests.pb-c.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define PERSON_COLUMNS                                                                           \
  "id, name, email, manager_id, department, job_function, country, location, employment_type," \
  " status, directory_username, effective_date"

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
      {p2.status, sizeof(p2.status)}, {p2.directory_username, sizeof(p2.directory_username)},
      {p2.effective_date, sizeof(p2.effective_date)}};
  for (size_t i = 0; i < QM_ARRAY_LEN(cols); i++)
    qm_strlcpy(cols[i].dst, qm_pg_get(res, 0, (int)i), cols[i].n);
  qm_pg_result_destroy(res);
  *out = p2;
  return QM_OK;
}

/* Upserts one person unless the stored record reflects a later effective
 * date; *applied (may be NULL) says whether it was written (0: a later-dated
 * record stands, the change is late). */
static int people_upsert(qm_pg_t *tx, const char *const v[13], const char *effective_date,
                         int64_t *applied, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[14];
  for (int i = 0; i < 13; i++) p[i] = QM_PG_TEXT(v[i] ? v[i] : "");
  p[13] = QM_PG_TEXT(effective_date);
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
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
      p, 14, &res, errstr, errstr_size);
  if (rc == QM_OK && applied) *applied = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  return rc;
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
    int rc = people_upsert(tx, v, "0000-00-00", NULL, errstr, errstr_size);
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

/* Today's date (UTC) as YYYY-MM-DD; HR dates compare as text. */
static void today(char out[11]) {
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(out, 11, "%Y-%m-%d", &tm);
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

static const char *kind_name(Qm__V1__HrEventKind k) {
  switch (k) {
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER: return "joiner";
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER: return "mover";
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER: return "leaver";
  default: return "update";
  }
}

static const catalog_bundle_t *bundle_of(const catalog_t *cat, const char *department) {
  for (size_t i = 0; i < cat->n_bundles; i++)
    if (department && !strcasecmp(cat->bundles[i].department, department)) return &cat->bundles[i];
  return NULL;
}

static bool bundle_has(const catalog_bundle_t *b, const char *item, const char *role) {
  for (size_t i = 0; b && i < b->n_entries; i++)
    if (!strcmp(b->entries[i].item_id, item) &&
        !strcmp(b->entries[i].role_id ? b->entries[i].role_id : "", role ? role : ""))
      return true;
  return false;
}

/* Files the birthright requests for the entries of `want` that `except` lacks:
 * standard roles in one request approved as birthright, privileged ones (and
 * those needing an attestation) in another that goes through approval. Items
 * the person is not eligible for, or already holds or has pending, are
 * skipped. */
static int file_birthright(intake_t *in, qm_pg_t *tx, const catalog_t *cat, const person_t *p,
                           const catalog_bundle_t *want, const catalog_bundle_t *except,
                           const char *why, const char *event_id, const char *traceparent,
                           char *errstr, size_t errstr_size) {
  if (!want) return QM_OK;
  line_in_t *auto_lines = qm_calloc(want->n_entries, sizeof(line_in_t));
  line_in_t *review_lines = qm_calloc(want->n_entries, sizeof(line_in_t));
  size_t n_auto = 0, n_review = 0;
  int rc = QM_OK;
  catalog_person_t cp = {p->employment_type, p->department, p->job_function, p->country};
  /* Automation screens like a person would be: a watchlisted contractor gets
   * nothing automatically (refuse), or requests flagged for approval (flag). */
  const char *flags[1];
  size_t n_flags = 0;
  bool screened = !strcmp(p->employment_type, "contractor") || !strcmp(p->employment_type, "third_party");
  if (screened && in->watch && watchlist_match(in->watch, p->name, p->country)) {
    if (in->watch_refuse) {
      qm_log_warn("birthright for %s not filed: the person matches the screening watchlist", p->id);
      free(auto_lines);
      free(review_lines);
      return QM_OK;
    }
    flags[n_flags++] = "screening_match";
  }
  for (size_t i = 0; i < want->n_entries && rc == QM_OK; i++) {
    const catalog_bundle_entry_t *e = &want->entries[i];
    if (bundle_has(except, e->item_id, e->role_id)) continue;
    const catalog_item_t *it = catalog_find(cat, e->item_id);
    const catalog_role_t *ro = it && e->role_id ? catalog_find_role(it, e->role_id) : NULL;
    if (!it || (e->role_id && !ro)) continue;
    char whynot[256];
    if (!catalog_eligible(it, &cp, whynot, sizeof(whynot))) {
      qm_log_info("birthright for %s skips %s: %s", p->id, it->id, whynot);
      continue;
    }
    char holding[16];
    rc = requests_holding(tx, p->id, it->id, ro ? ro->id : "", holding, sizeof(holding), errstr,
                          errstr_size);
    if (rc != QM_OK || holding[0]) continue;
    if (it->seats > 0) {
      int64_t used = 0;
      rc = requests_seats_in_use(tx, it->id, &used, errstr, errstr_size);
      if (rc != QM_OK) break;
      if (used >= it->seats) {
        qm_log_warn("birthright for %s skips %s: all %d seats are taken", p->id, it->id, it->seats);
        continue;
      }
    }
    bool privileged = (ro && ro->risk != CATALOG_RISK_STANDARD) || it->attestation;
    line_in_t *l = privileged ? &review_lines[n_review++] : &auto_lines[n_auto++];
    l->item = it;
    l->role = ro;
    l->duration_days = ro ? ro->default_duration_days : 0;
    l->line_no = privileged ? (int)n_review : (int)n_auto;
  }
  for (int pass = 0; pass < 2 && rc == QM_OK; pass++) {
    size_t n = pass == 0 ? n_auto : n_review;
    if (n == 0) continue;
    char key[160], reason[300];
    snprintf(key, sizeof(key), "hr:%s:%s", event_id, pass == 0 ? "birthright" : "review");
    snprintf(reason, sizeof(reason), "%s%s", why,
             pass == 0 ? "" : " (privileged items of the bundle: approval needed)");
    request_new_t rq = {.subject = p, .requester_id = "intake", .who = NULL,
                        .origin = pass == 0 ? "birthright" : "birthright_review",
                        .reason = reason, .idem_key = key, .body_hash = key,
                        .traceparent = traceparent, .lines = pass == 0 ? auto_lines : review_lines,
                        .n_lines = n, .flags = flags, .n_flags = n_flags};
    rc = requests_create(in, tx, &rq, errstr, errstr_size);
    if (rc == QM_OK && !rq.replayed)
      qm_log(QM_LOG_INFO, rq.id, NULL, "%s request for %s: %zu line(s) (%s)", rq.origin, p->id, n, why);
  }
  free(auto_lines);
  free(review_lines);
  return rc;
}

/* Mover: access of the old bundle that the new one lacks is asked back. Only
 * what the person holds or has on the way is named. */
static int revoke_old_bundle(intake_t *in, qm_pg_t *tx, const person_t *p,
                             const catalog_bundle_t *old_b, const catalog_bundle_t *new_b,
                             const char *traceparent, char *errstr, size_t errstr_size) {
  if (!old_b) return QM_OK;
  int rc = QM_OK;
  for (size_t i = 0; i < old_b->n_entries && rc == QM_OK; i++) {
    const catalog_bundle_entry_t *e = &old_b->entries[i];
    if (bundle_has(new_b, e->item_id, e->role_id)) continue;
    const char *role = e->role_id ? e->role_id : "";
    qm_pg_param_t q[] = {QM_PG_TEXT(p->id), QM_PG_TEXT(e->item_id), QM_PG_TEXT(role)};
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(tx,
                    "SELECT r.id FROM request_lines l JOIN requests r ON r.id = l.request_id"
                    " WHERE l.subject_id = $1 AND l.item_id = $2 AND l.role_id = $3"
                    " AND l.status IN ('approved', 'fulfilling', 'granted', 'fulfilled')"
                    " ORDER BY r.seq DESC LIMIT 1",
                    q, 3, &res, errstr, errstr_size);
    if (rc != QM_OK) break;
    if (qm_pg_ntuples(res) == 0) {
      qm_pg_result_destroy(res);
      continue;
    }
    char rid[QM_UUID_STR_LEN];
    qm_strlcpy(rid, qm_pg_get(res, 0, 0), sizeof(rid));
    qm_pg_result_destroy(res);
    Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
    actor.service = (char *)"intake";
    Qm__V1__RevocationRequested rv = QM__V1__REVOCATION_REQUESTED__INIT;
    rv.request_id = rid;
    rv.subject_person_id = (char *)p->id;
    rv.item_id = e->item_id;
    rv.role_id = (char *)role;
    rv.reason = (char *)"mover";
    rv.actor = &actor;
    Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
    re.event_case = QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED;
    re.revocation_requested = &rv;
    char event_id[QM_UUID_STR_LEN];
    rc = qm_service_emit(in->svc, tx, QM_TOPIC_REQUESTS, p->id,
                         "qm.request.revocation_requested.v1", rid, traceparent, &re.base,
                         event_id, errstr, errstr_size);
    if (rc == QM_OK) {
      char summary[300];
      snprintf(summary, sizeof(summary), "revocation of %s/%s requested: %s moved to %s",
               e->item_id, role, p->id, p->department);
      rc = readmodel_timeline(tx, rid, 0, qm_now_ms(), "qm.request.revocation_requested.v1",
                              event_id, "intake", summary, errstr, errstr_size);
    }
  }
  return rc;
}

/* Leaver: every line not yet decided is cancelled, one RequestCancelled per
 * request. Revoking grants and recalling assets are provisioning's and
 * fulfilment's, on the same HR event (issues 5 and 7). */
static int cancel_pending(intake_t *in, qm_pg_t *tx, const person_t *p, const char *traceparent,
                          char *errstr, size_t errstr_size) {
  qm_pg_param_t q[] = {QM_PG_TEXT(p->id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "WITH c AS (UPDATE request_lines l SET status = 'cancelled', waiting_on = '{}',"
                      " updated_at = now() FROM requests r WHERE r.id = l.request_id"
                      " AND r.subject_id = $1 AND l.status IN ('submitted', 'pending_approval')"
                      " RETURNING l.request_id) SELECT DISTINCT request_id FROM c",
                      q, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  for (int i = 0; i < qm_pg_ntuples(res) && rc == QM_OK; i++) {
    const char *rid = qm_pg_get(res, i, 0);
    Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
    actor.service = (char *)"intake";
    Qm__V1__RequestCancelled rc_ev = QM__V1__REQUEST_CANCELLED__INIT;
    rc_ev.request_id = (char *)rid;
    rc_ev.actor = &actor;
    rc_ev.reason = (char *)"leaver";
    rc_ev.subject_person_id = (char *)p->id;
    Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
    re.event_case = QM__V1__REQUEST_EVENT__EVENT_CANCELLED;
    re.cancelled = &rc_ev;
    char event_id[QM_UUID_STR_LEN];
    rc = qm_service_emit(in->svc, tx, QM_TOPIC_REQUESTS, p->id, "qm.request.cancelled.v1", rid,
                         traceparent, &re.base, event_id, errstr, errstr_size);
    if (rc == QM_OK)
      rc = readmodel_timeline(tx, rid, 0, qm_now_ms(), "qm.request.cancelled.v1", event_id,
                              "intake", "cancelled: the person left the organisation", errstr,
                              errstr_size);
    if (rc == QM_OK) rc = readmodel_recompute(tx, rid, errstr, errstr_size);
  }
  if (rc == QM_OK && qm_pg_ntuples(res) > 0)
    qm_log_info("leaver %s: %d pending request(s) cancelled", p->id, qm_pg_ntuples(res));
  qm_pg_result_destroy(res);
  return rc;
}

/* Applies an HR change whose date has come: the person's record (unless a
 * later-dated change is already applied: a late event is ignored), then what
 * the change means for their access. Holds the catalog's read lock once for
 * all of it (never recursively: a queued reload would deadlock). */
static int apply_hr(intake_t *in, qm_pg_t *tx, const Qm__V1__HrEvent *he, const char *event_id,
                    const char *traceparent, char *errstr, size_t errstr_size) {
  const Qm__V1__Person *hp = he->person;
  person_t before;
  bool existed = people_get(tx, hp->id, &before, NULL, 0) == QM_OK;
  const char *v[13] = {hp->id,         hp->name,        hp->email,
                       hp->manager_id, hp->department,  hp->job_function,
                       hp->country,    hp->location,    employment_name(hp->employment_type),
                       status_name(hp->status, he->kind),
                       hp->directory_username[0] ? hp->directory_username : hp->id,
                       hp->start_date, hp->end_date};
  int64_t applied = 0;
  int rc = people_upsert(tx, v, he->effective_date, &applied, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (applied == 0) {
    qm_log_info("HR %s for %s effective %s is older than the record (effective %s): ignored",
                kind_name(he->kind), hp->id, he->effective_date, existed ? before.effective_date : "?");
    return QM_OK;
  }
  person_t now;
  if ((rc = people_get(tx, hp->id, &now, errstr, errstr_size)) != QM_OK) return rc;
  qm_log_info("HR %s applied for %s effective %s", kind_name(he->kind), hp->id, he->effective_date);
  const catalog_t *cat = intake_catalog_acquire(in);
  const catalog_bundle_t *new_b = bundle_of(cat, now.department);
  const char *old_dept = he->previous_department[0] ? he->previous_department
                         : existed                  ? before.department : "";
  const catalog_bundle_t *old_b = bundle_of(cat, old_dept);
  char why[300];
  switch (he->kind) {
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER:
    snprintf(why, sizeof(why), "birthright: joined %s on %s", now.department, he->effective_date);
    rc = file_birthright(in, tx, cat, &now, new_b, NULL, why, event_id, traceparent, errstr, errstr_size);
    break;
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER:
    if (strcasecmp(old_dept, now.department) != 0) {
      rc = revoke_old_bundle(in, tx, &now, old_b, new_b, traceparent, errstr, errstr_size);
      snprintf(why, sizeof(why), "birthright: moved from %s to %s on %s", old_dept, now.department,
               he->effective_date);
      if (rc == QM_OK)
        rc = file_birthright(in, tx, cat, &now, new_b, old_b, why, event_id, traceparent, errstr,
                             errstr_size);
    }
    break;
  case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER:
    rc = cancel_pending(in, tx, &now, traceparent, errstr, errstr_size);
    break;
  default:
    break;
  }
  intake_catalog_release(in);
  return rc;
}

int people_on_hr_event(intake_t *in, qm_pg_t *tx, const qm_event_in_t *ev, char *errstr,
                       size_t errstr_size) {
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
  char day[11];
  today(day);
  if (strcmp(he->effective_date, day) > 0) {
    /* Dated in the future: kept until its day comes (people_tick). */
    qm_pg_param_t sp[] = {QM_PG_TEXT(p->id), QM_PG_TEXT(kind_name(he->kind)),
                          QM_PG_TEXT(he->effective_date), QM_PG_BYTES(ev->payload, ev->payload_len),
                          QM_PG_TEXT(ev->meta.id), QM_PG_TEXT(ev->meta.traceparent)};
    rc = qm_pg_exec(tx,
                    "INSERT INTO hr_scheduled (person_id, kind, effective_date, event, event_id,"
                    " traceparent) VALUES ($1, $2, $3, $4, $5, $6)",
                    sp, 6, NULL, errstr, errstr_size);
    if (rc == QM_OK)
      qm_log_info("HR %s for %s scheduled for %s", kind_name(he->kind), p->id, he->effective_date);
    goto out;
  }
  rc = apply_hr(in, tx, he, ev->meta.id, ev->meta.traceparent, errstr, errstr_size);
out:
  qm__v1__hr_event__free_unpacked(he, NULL);
  return rc;
}

/* Applies one scheduled HR change whose day has come. A change that cannot be
 * decoded or applied (other than for a transient reason) is marked with its
 * error and skipped, so it never blocks the others. */
typedef struct tick_one {
  intake_t *in;
  int64_t id;
  bool done;
} tick_one_t;

static int tick_one_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  tick_one_t *t = ctx;
  qm_pg_param_t p[] = {QM_PG_INT64(t->id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT event, event_id, coalesce(traceparent, '') FROM hr_scheduled"
                      " WHERE id = $1::bigint AND applied_at IS NULL FOR UPDATE SKIP LOCKED",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return QM_OK; /* another instance has it */
  }
  unsigned char *bytes = NULL;
  size_t len = 0;
  qm_pg_get_bytes(res, 0, 0, &bytes, &len);
  Qm__V1__HrEvent *he = qm__v1__hr_event__unpack(NULL, len, bytes);
  char why[512] = "";
  if (!he) {
    qm_strlcpy(why, "stored event cannot be decoded", sizeof(why));
    rc = QM_EINVAL;
  } else {
    rc = apply_hr(t->in, tx, he, qm_pg_get(res, 0, 1), qm_pg_get(res, 0, 2), why, sizeof(why));
    qm__v1__hr_event__free_unpacked(he, NULL);
  }
  free(bytes);
  qm_pg_result_destroy(res);
  if (rc != QM_OK && rc != QM_EINVAL && rc != QM_EPOISON) {
    qm_strlcpy(errstr, why, errstr_size); /* the database: try again next tick */
    return rc;
  }
  if (rc != QM_OK) {
    /* Undo what apply_hr wrote, keep the verdict. */
    if ((rc = qm_pg_rollback(tx, errstr, errstr_size)) != QM_OK) return rc;
    if ((rc = qm_pg_begin(tx, errstr, errstr_size)) != QM_OK) return rc;
    qm_log_error("scheduled HR change %lld could not be applied: %s; marked failed (see hr_scheduled.error)",
                 (long long)t->id, why);
  }
  qm_pg_param_t up[] = {QM_PG_INT64(t->id), why[0] && rc == QM_OK ? QM_PG_TEXT(why) : QM_PG_NULL};
  rc = qm_pg_exec(tx, "UPDATE hr_scheduled SET applied_at = now(), error = $2 WHERE id = $1::bigint",
                  up, 2, NULL, errstr, errstr_size);
  t->done = rc == QM_OK;
  return rc;
}

/* Applies the scheduled HR changes whose day has come, oldest date first,
 * each in its own transaction. */
static void tick(intake_t *in) {
  char day[11], errstr[512] = "";
  today(day);
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(in->svc), 5000, &pg) != QM_OK) return;
  qm_pg_param_t p[] = {QM_PG_TEXT(day)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "SELECT id FROM hr_scheduled WHERE applied_at IS NULL AND effective_date <= $1"
                      " ORDER BY effective_date, id LIMIT 500",
                      p, 1, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) {
    qm_log_warn("reading scheduled HR changes failed: %s (retrying)", errstr);
    return;
  }
  for (int i = 0; i < qm_pg_ntuples(res) && !qm_shutdown_requested(); i++) {
    tick_one_t t = {.in = in};
    qm_pg_get_int64(res, i, 0, &t.id);
    if (qm_service_tx(in->svc, 10000, tick_one_tx, &t, errstr, sizeof(errstr)) != QM_OK)
      qm_log_warn("applying scheduled HR change %lld failed: %s (retrying)", (long long)t.id, errstr);
  }
  qm_pg_result_destroy(res);
}

static void *ticker_main(void *arg) {
  intake_t *in = arg;
  while (!qm_shutdown_requested()) {
    tick(in);
    qm_sleep_ms(in->hr_tick_ms);
  }
  return NULL;
}

int people_ticker_start(intake_t *in, char *errstr, size_t errstr_size) {
  if (pthread_create(&in->hr_ticker, NULL, ticker_main, in) != 0)
    return qm_err(errstr, errstr_size, QM_EIO, "cannot start the HR scheduler thread");
  in->hr_ticker_started = true;
  return QM_OK;
}

void people_ticker_stop(intake_t *in) {
  if (in->hr_ticker_started) pthread_join(in->hr_ticker, NULL);
  in->hr_ticker_started = false;
}

/* GET /v1/people/{id}: the directory record and the changes scheduled for it. */
static void get_person(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  static const char *const readers[] = {"helpdesk", "it_admin", "auditor", "security", NULL};
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *id = qm_http_req_param(req, "id");
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  char errstr[512];
  qm_pg_param_t p[] = {QM_PG_TEXT(id)};
  qm_pg_result_t *res = NULL, *sched = NULL;
  int rc = qm_pg_exec(pg,
                      "SELECT id, name, email, manager_id, department, job_function, country,"
                      " location, employment_type, status, directory_username, start_date,"
                      " end_date, effective_date FROM people WHERE id = $1",
                      p, 1, &res, errstr, sizeof(errstr));
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "SELECT kind, effective_date FROM hr_scheduled WHERE person_id = $1"
                    " AND applied_at IS NULL ORDER BY effective_date, id",
                    p, 1, &sched, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "reading the directory", errstr);
    goto out;
  }
  bool known = qm_pg_ntuples(res) == 1;
  bool allowed = qm_api_has_any_role(who, readers) || !strcmp(who->sub, id) ||
                 (known && !strcmp(qm_pg_get(res, 0, 3), who->sub));
  if (!allowed) {
    qm_http_problem(resp, 403, "forbidden", "Not allowed",
                    "you may see yourself, your direct reports, or anyone with the helpdesk, "
                    "it_admin, auditor or security role");
    goto out;
  }
  if (!known && qm_pg_ntuples(sched) == 0) {
    qm_http_problem(resp, 404, "not-found", "No such person", "no person with this id in the directory");
    goto out;
  }
  json_t *o = json_object();
  if (known) {
    static const char *const cols[] = {"id", "name", "email", "manager_id", "department",
                                       "job_function", "country", "location", "employment_type",
                                       "status", "directory_username", "start_date", "end_date",
                                       "effective_date"};
    for (size_t c = 0; c < QM_ARRAY_LEN(cols); c++)
      json_object_set_new(o, cols[c], json_string(qm_pg_get(res, 0, (int)c)));
  } else {
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "status", json_string("not_yet_effective"));
  }
  json_t *list = json_array();
  for (int i = 0; i < qm_pg_ntuples(sched); i++)
    json_array_append_new(list, json_pack("{s:s, s:s}", "kind", qm_pg_get(sched, i, 0),
                                          "effective_date", qm_pg_get(sched, i, 1)));
  json_object_set_new(o, "scheduled", list);
  qm_http_resp_json(resp, 200, o);
out:
  qm_pg_result_destroy(res);
  qm_pg_result_destroy(sched);
}

int people_register(intake_t *in, char *errstr, size_t errstr_size) {
  if (qm_http_route(qm_service_http(in->svc), "GET", "/v1/people/{id}", get_person, in, 0, NULL) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register people routes");
  return QM_OK;
}

/* ---- watchlist ---------------------------------------------------------- */

int watchlist_load(const char *path, watchlist_t **out, char *errstr, size_t errstr_size) {
  FILE *f = fopen(path, "r");
  if (!f)
    return qm_err(errstr, errstr_size, QM_EINVAL, "%s: cannot open the watchlist: %s", path,
                  strerror(errno));
  watchlist_t *wl = qm_calloc(1, sizeof(*wl));
  char line[1024];
  int lineno = 0, rc = QM_OK;
  while (fgets(line, sizeof(line), f)) {
    lineno++;
    line[strcspn(line, "\r\n")] = '\0';
    if (lineno == 1 || !line[0] || line[0] == '#') continue; /* header, blanks, comments */
    char *comma = strrchr(line, ',');
    if (!comma || comma == line) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "%s:%d: expected 'name,country'", path, lineno);
      break;
    }
    *comma = '\0';
    wl->v = qm_realloc(wl->v, (wl->n + 1) * sizeof(*wl->v));
    wl->v[wl->n].name = qm_strdup(line);
    wl->v[wl->n].country = qm_strdup(comma + 1);
    wl->n++;
  }
  fclose(f);
  if (rc != QM_OK) {
    watchlist_destroy(wl);
    return rc;
  }
  *out = wl;
  return QM_OK;
}

bool watchlist_match(const watchlist_t *wl, const char *name, const char *country) {
  for (size_t i = 0; wl && i < wl->n; i++)
    if (!strcasecmp(wl->v[i].name, name) &&
        (!wl->v[i].country[0] || !strcasecmp(wl->v[i].country, country)))
      return true;
  return false;
}

void watchlist_destroy(watchlist_t *wl) {
  if (!wl) return;
  for (size_t i = 0; i < wl->n; i++) {
    free(wl->v[i].name);
    free(wl->v[i].country);
  }
  free(wl->v);
  free(wl);
}
