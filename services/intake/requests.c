/*
 * requests: intake's request API.
 *
 *   POST /v1/requests              submit (self, manager for a report, helpdesk for anyone)
 *   GET  /v1/requests/{id}         status, lines and the whole timeline
 *   GET  /v1/requests?mine|team    the caller's requests, or their team's (paged)
 *   POST /v1/requests/{id}/cancel  withdraw what is not yet decided
 *
 * A submitted request is checked in two passes: the body against the catalog
 * (every bad field named in one problem), then, inside the transaction, the
 * subject against the directory (exists, active, eligible) and the caller's
 * right to ask for them. The request, its lines, its first timeline entry and
 * RequestSubmitted are written in one transaction. An Idempotency-Key makes a
 * retried POST return the first answer instead of a second request.
 */
#include "intake.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_log.h"
#include "qm_topics.h"

#include "qm/v1/requests.pb-c.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REASON 2000
#define MAX_ATTRS 16

/* Refusals are collected with the rule each breaks, then answered as one
 * problem whose status follows the most serious kind (see refusal_problem). */
#define MAX_REFUSALS 64

typedef struct refusal {
  char field[96];
  const char *rule;
  char reason[320];
  int status; /* 400, 403, 409 or 422 */
} refusal_t;

typedef struct refusals {
  refusal_t v[MAX_REFUSALS];
  size_t n;
} refusals_t;

static void refuse(refusals_t *r, int status, const char *field, const char *rule,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void refuse(refusals_t *r, int status, const char *field, const char *rule,
                   const char *fmt, ...) {
  if (r->n == MAX_REFUSALS) return;
  refusal_t *x = &r->v[r->n++];
  qm_strlcpy(x->field, field, sizeof(x->field));
  x->rule = rule;
  x->status = status;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(x->reason, sizeof(x->reason), fmt, ap);
  va_end(ap);
}

/* One problem for all refusals: 400 when the body itself is wrong, else 403
 * for screening, else 422 for policy, else 409 for conflicts with what the
 * subject already holds or asked for. Counts each refusal by rule. */
static qm_problem_t *refusal_problem(intake_t *in, const refusals_t *r) {
  static const int order[] = {400, 403, 422, 409};
  int status = 400;
  for (size_t o = 0; o < QM_ARRAY_LEN(order); o++) {
    bool any = false;
    for (size_t i = 0; i < r->n && !any; i++) any = r->v[i].status == order[o];
    if (any) {
      status = order[o];
      break;
    }
  }
  const char *type = status == 403 ? "screening" : status == 409 ? "conflict"
                     : status == 422 ? "policy" : "validation";
  const char *title = status == 403 ? "Refused by screening"
                      : status == 409 ? "Conflicts with existing access or requests"
                      : status == 422 ? "Not allowed by policy" : "Invalid request";
  qm_problem_t *pb = qm_problem_new(status, type, title);
  for (size_t i = 0; i < r->n; i++) {
    if (r->v[i].status == status)
      qm_problem_field_rule(pb, r->v[i].field, r->v[i].rule, r->v[i].reason);
    const char *labels[] = {r->v[i].rule};
    qm_metrics_inc(qm_metrics_child(in->m_refusals, labels));
  }
  return pb;
}

typedef struct submit {
  intake_t *in;
  qm_http_req_t *req;
  const qm_principal_t *who;
  const char *subject_id;
  const char *reason;
  const char *extends;
  const char *idem_key;
  char body_hash[65];
  line_in_t *lines;
  size_t n_lines;
  refusals_t refusals;
  /* outcome */
  qm_problem_t *problem; /* set when the transaction refuses the request */
  char request_id[QM_UUID_STR_LEN];
  bool replayed;
  char origin[24];
} submit_t;

static bool has_role(const qm_principal_t *who, const char *role) {
  return qm_principal_has_role(who, role);
}

static void sha256_hex(const void *data, size_t len, char out[65]) {
  unsigned char md[32];
  unsigned int n = 0;
  EVP_Digest(data, len, md, &n, EVP_sha256(), NULL);
  for (unsigned i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static Qm__V1__Risk risk_proto(catalog_risk_t r) {
  return r == CATALOG_RISK_ELEVATED    ? QM__V1__RISK__RISK_ELEVATED
         : r == CATALOG_RISK_SENSITIVE ? QM__V1__RISK__RISK_SENSITIVE
                                       : QM__V1__RISK__RISK_STANDARD;
}

static Qm__V1__ItemKind kind_proto(catalog_kind_t k) {
  return k == CATALOG_KIND_ASSET     ? QM__V1__ITEM_KIND__ITEM_KIND_ASSET
         : k == CATALOG_KIND_LICENCE ? QM__V1__ITEM_KIND__ITEM_KIND_LICENCE
                                     : QM__V1__ITEM_KIND__ITEM_KIND_ACCESS;
}

static bool line_needs_reason(const line_in_t *l) {
  return l->role && l->role->risk != CATALOG_RISK_STANDARD;
}

/* Checks a line's attributes against the item's: unknown names and values
 * not on the list are refused, required ones must be there (or defaulted). */
static void validate_attributes(refusals_t *r, size_t i, line_in_t *l, json_t *attrs) {
  char f[160];
  const char *key;
  json_t *val;
  if (attrs && (!json_is_object(attrs) || json_object_size(attrs) > MAX_ATTRS)) {
    snprintf(f, sizeof(f), "lines[%zu].attributes", i);
    refuse(r, 400, f, "invalid_attribute", "must be an object of at most 16 string values");
    return;
  }
  json_object_foreach(attrs, key, val) {
    snprintf(f, sizeof(f), "lines[%zu].attributes.%.64s", i, key);
    const catalog_attr_t *a = catalog_find_attr(l->item, key);
    if (!a) {
      refuse(r, 400, f, "invalid_attribute", "%s has no attribute '%.64s'", l->item->id, key);
    } else if (!json_is_string(val) || !catalog_attr_allows(a, json_string_value(val))) {
      char list[256] = "";
      for (size_t v = 0; v < a->values.n; v++)
        snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s", v ? ", " : "",
                 a->values.v[v]);
      refuse(r, 400, f, "invalid_attribute", "must be one of: %s", list);
    }
  }
  for (size_t k = 0; k < l->item->n_attrs; k++) {
    const catalog_attr_t *a = &l->item->attrs[k];
    if (a->required && !a->def && !json_object_get(attrs, a->name)) {
      snprintf(f, sizeof(f), "lines[%zu].attributes.%s", i, a->name);
      refuse(r, 400, f, "attribute_required", "required: %s", a->label);
    }
  }
  l->attributes = attrs;
}

/* First pass: the body against the catalog. Adds every refusal to r. */
static void validate_body(submit_t *s, const catalog_t *cat, json_t *body) {
  static const char *const known[] = {"subject_person_id", "reason", "lines", "item_id",
                                      "role_id", "duration_days", "attributes",
                                      "attestation_accepted", "extends_request_id", NULL};
  refusals_t *r = &s->refusals;
  const char *key;
  json_t *val;
  if (!json_is_object(body)) {
    refuse(r, 400, "", "invalid", "the body must be a JSON object");
    return;
  }
  json_object_foreach(body, key, val) {
    bool ok = false;
    for (size_t i = 0; known[i] && !ok; i++) ok = !strcmp(key, known[i]);
    if (!ok) refuse(r, 400, key, "unknown_field", "unknown field");
  }
  json_t *subj = json_object_get(body, "subject_person_id");
  if (subj && (!json_is_string(subj) || !*json_string_value(subj) ||
               json_string_length(subj) > 128))
    refuse(r, 400, "subject_person_id", "invalid", "must be a person id (1 to 128 characters)");
  s->subject_id = subj && json_is_string(subj) ? json_string_value(subj) : s->who->sub;
  json_t *reason = json_object_get(body, "reason");
  if (reason && (!json_is_string(reason) || json_string_length(reason) > MAX_REASON))
    refuse(r, 400, "reason", "invalid", "must be text of at most 2000 characters");
  else if (reason)
    s->reason = json_string_value(reason);
  json_t *ext = json_object_get(body, "extends_request_id");
  if (ext && (!json_is_string(ext) || !qm_uuid_valid(json_string_value(ext))))
    refuse(r, 400, "extends_request_id", "invalid", "must be the id (UUID) of an earlier request");
  else if (ext)
    s->extends = json_string_value(ext);

  /* Either "lines": [...] or a single line given at the top level. */
  json_t *lines = json_object_get(body, "lines");
  json_t *single = NULL;
  if (!lines) {
    if (!json_object_get(body, "item_id")) {
      refuse(r, 400, "lines", "invalid", "required: at least one line ({\"item_id\": …, \"role_id\": …})");
      return;
    }
    single = json_pack("[{s:O*, s:O*, s:O*, s:O*, s:O*}]", "item_id", json_object_get(body, "item_id"),
                       "role_id", json_object_get(body, "role_id"), "duration_days",
                       json_object_get(body, "duration_days"), "attributes",
                       json_object_get(body, "attributes"), "attestation_accepted",
                       json_object_get(body, "attestation_accepted"));
    lines = single;
  } else if (json_object_get(body, "item_id") || json_object_get(body, "role_id")) {
    refuse(r, 400, "item_id", "invalid", "give either 'lines' or a single item at the top level, not both");
  }
  if (!json_is_array(lines) || json_array_size(lines) == 0 ||
      json_array_size(lines) > (size_t)s->in->max_lines) {
    refuse(r, 400, "lines", "invalid", "must be a list of 1 to %d lines", s->in->max_lines);
    json_decref(single);
    return;
  }
  s->n_lines = json_array_size(lines);
  s->lines = qm_calloc(s->n_lines, sizeof(line_in_t));
  bool reason_needed = false;
  size_t i;
  json_t *lj;
  json_array_foreach(lines, i, lj) {
    line_in_t *l = &s->lines[i];
    l->line_no = (int)i + 1;
    char f[96];
    if (!json_is_object(lj)) {
      snprintf(f, sizeof(f), "lines[%zu]", i);
      refuse(r, 400, f, "invalid", "must be an object with item_id and role_id");
      continue;
    }
    json_object_foreach(lj, key, val) {
      if (strcmp(key, "item_id") && strcmp(key, "role_id") && strcmp(key, "duration_days") &&
          strcmp(key, "attributes") && strcmp(key, "attestation_accepted")) {
        snprintf(f, sizeof(f), "lines[%zu].%.32s", i, key);
        refuse(r, 400, f, "unknown_field", "unknown field");
      }
    }
    const char *item_id = json_string_value(json_object_get(lj, "item_id"));
    snprintf(f, sizeof(f), "lines[%zu].item_id", i);
    if (!item_id || !(l->item = catalog_find(cat, item_id))) {
      refuse(r, 400, f, "unknown_item", item_id ? "no such catalog item" : "required: a catalog item id");
      continue;
    }
    json_t *role = json_object_get(lj, "role_id");
    snprintf(f, sizeof(f), "lines[%zu].role_id", i);
    if (l->item->n_roles > 0) {
      if (!json_is_string(role) || !(l->role = catalog_find_role(l->item, json_string_value(role)))) {
        char roles[256] = "";
        for (size_t k = 0; k < l->item->n_roles; k++)
          snprintf(roles + strlen(roles), sizeof(roles) - strlen(roles), "%s%s", k ? ", " : "",
                   l->item->roles[k].id);
        refuse(r, 400, f, "unknown_role", "%s has the roles: %s", l->item->id, roles);
        continue;
      }
    } else if (role && !json_is_null(role)) {
      refuse(r, 400, f, "unknown_role", "this item has no roles");
    }
    for (size_t j = 0; j < i; j++)
      if (s->lines[j].item == l->item && s->lines[j].role == l->role) {
        snprintf(f, sizeof(f), "lines[%zu]", i);
        refuse(r, 400, f, "invalid", "the same item and role appear twice in this request");
      }
    json_t *dur = json_object_get(lj, "duration_days");
    int max = l->role ? l->role->max_duration_days : 0;
    l->duration_days = l->role ? l->role->default_duration_days : 0;
    snprintf(f, sizeof(f), "lines[%zu].duration_days", i);
    if (!dur && l->role && l->role->risk == CATALOG_RISK_ELEVATED) {
      refuse(r, 400, f, "duration_required",
             "required: elevated access is time-bound (1 to %d days)", max);
    } else if (dur) {
      json_int_t d = json_is_integer(dur) ? json_integer_value(dur) : -1;
      if (d < 0 || d > 3650 || (max > 0 && (d < 1 || d > max))) {
        if (max > 0) refuse(r, 400, f, "duration_out_of_range", "must be a whole number of days from 1 to %d", max);
        else refuse(r, 400, f, "duration_out_of_range", "must be a whole number of days (0 = open-ended) up to 3650");
      } else {
        l->duration_days = (int)d;
      }
    }
    if (l->item->attestation) {
      snprintf(f, sizeof(f), "lines[%zu].attestation_accepted", i);
      if (!json_is_true(json_object_get(lj, "attestation_accepted")))
        refuse(r, 400, f, "attestation_required", "must be true: %.200s", l->item->attestation);
      else
        l->attested = true;
    }
    validate_attributes(r, i, l, json_object_get(lj, "attributes"));
    if (line_needs_reason(l)) reason_needed = true;
  }
  if (reason_needed && (!s->reason || strlen(s->reason) < 3))
    refuse(r, 400, "reason", "reason_required",
           "required for sensitive and elevated access: why it is needed (3 to 2000 characters)");
  json_decref(single);
}

/* How the caller relates to the subject: self, their manager, or staff. */
static const char *origin_of(const qm_principal_t *who, const person_t *subject) {
  if (!strcmp(who->sub, subject->id)) return "self_service";
  if (has_role(who, "manager") && !strcmp(subject->manager_id, who->sub)) return "manager";
  if (qm_api_has_any_role(who, intake_staff_roles)) return "helpdesk";
  return NULL;
}

/* Inserts the request row; on an idempotency key seen before, tells whether
 * it was the same body (replay) or another (clash). */
static int insert_request(request_new_t *rq, qm_pg_t *tx, char *errstr, size_t errstr_size) {
  qm_uuid_new(rq->id);
  json_t *flags = json_array();
  for (size_t i = 0; i < rq->n_flags; i++) json_array_append_new(flags, json_string(rq->flags[i]));
  char *flags_json = json_dumps(flags, JSON_COMPACT);
  json_decref(flags);
  qm_pg_param_t p[] = {QM_PG_TEXT(rq->id), QM_PG_TEXT(rq->requester_id),
                       QM_PG_TEXT(rq->subject->id), QM_PG_TEXT(rq->reason ? rq->reason : ""),
                       QM_PG_TEXT(rq->origin), rq->extends ? QM_PG_TEXT(rq->extends) : QM_PG_NULL,
                       QM_PG_TEXT(rq->idem_key), QM_PG_TEXT(rq->body_hash),
                       rq->traceparent ? QM_PG_TEXT(rq->traceparent) : QM_PG_NULL,
                       QM_PG_TEXT(flags_json)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "INSERT INTO requests (id, requester_id, subject_id, reason, origin, status,"
                      " extends_request_id, idempotency_key, body_hash, traceparent, flags)"
                      " VALUES ($1, $2, $3, $4, $5, 'submitted', $6, $7, $8, $9,"
                      " ARRAY(SELECT json_array_elements_text($10::json)))"
                      " ON CONFLICT (requester_id, idempotency_key) DO NOTHING",
                      p, QM_ARRAY_LEN(p), &res, errstr, errstr_size);
  free(flags_json);
  if (rc != QM_OK) return rc;
  int64_t n = qm_pg_affected(res);
  qm_pg_result_destroy(res);
  if (n == 1) return QM_OK;
  qm_pg_param_t q[] = {QM_PG_TEXT(rq->requester_id), QM_PG_TEXT(rq->idem_key)};
  rc = qm_pg_exec(tx,
                  "SELECT id, body_hash FROM requests WHERE requester_id = $1 AND idempotency_key = $2",
                  q, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 1 && !strcmp(qm_pg_get(res, 0, 1), rq->body_hash)) {
    qm_strlcpy(rq->id, qm_pg_get(res, 0, 0), sizeof(rq->id));
    rq->replayed = true;
  } else {
    rq->key_clash = true;
  }
  qm_pg_result_destroy(res);
  return QM_OK;
}

int requests_create(intake_t *in, qm_pg_t *tx, request_new_t *rq, char *errstr,
                    size_t errstr_size) {
  int rc = insert_request(rq, tx, errstr, errstr_size);
  if (rc != QM_OK || rq->replayed || rq->key_clash) return rc;
  const person_t *subject = rq->subject;
  size_t n = rq->n_lines;
  Qm__V1__RequestLine *plines = qm_calloc(n, sizeof(*plines));
  Qm__V1__RequestLine **pptrs = qm_calloc(n, sizeof(*pptrs));
  /* room for the item's attributes plus "encryption" */
  Qm__V1__Attribute *attrs = qm_calloc(n * (MAX_ATTRS + CATALOG_MAX_ATTRS + 1), sizeof(*attrs));
  Qm__V1__Attribute **aptrs = qm_calloc(n * (MAX_ATTRS + CATALOG_MAX_ATTRS + 1), sizeof(*aptrs));
  size_t per = MAX_ATTRS + CATALOG_MAX_ATTRS + 1;
  for (size_t i = 0; i < n && rc == QM_OK; i++) {
    const line_in_t *l = &rq->lines[i];
    Qm__V1__RequestLine *pl = &plines[i];
    qm__v1__request_line__init(pl);
    pl->line_no = l->line_no;
    pl->item_id = l->item->id;
    pl->kind = kind_proto(l->item->kind);
    pl->role_id = l->role ? l->role->id : (char *)"";
    pl->group = l->role && l->role->group ? l->role->group : (char *)"";
    pl->connector = l->role && l->role->connector ? l->role->connector : (char *)"";
    pl->risk = l->role ? risk_proto(l->role->risk) : QM__V1__RISK__RISK_STANDARD;
    pl->cost_minor = l->item->cost_minor;
    pl->duration_days = l->duration_days;
    pl->auto_approve_allowed = l->role && l->role->auto_approve;
    pl->owner_id = l->item->owner;
    pl->regulated = l->item->regulated;
    pl->attestation_accepted = l->attested ? l->item->attestation : (char *)"";
    pl->asset_model = l->item->asset_model ? l->item->asset_model : (char *)"";
    pl->max_duration_days = l->role ? l->role->max_duration_days : 0;
    pl->attributes = &aptrs[i * per];
    /* chosen values, then defaults for the rest, then encryption where the law wants it */
    const char *k;
    json_t *v;
    json_object_foreach(l->attributes, k, v) {
      Qm__V1__Attribute *a = &attrs[i * per + pl->n_attributes];
      qm__v1__attribute__init(a);
      a->name = (char *)k;
      a->value = (char *)json_string_value(v);
      pl->attributes[pl->n_attributes++] = a;
    }
    for (size_t d = 0; d < l->item->n_attrs; d++) {
      const catalog_attr_t *ca = &l->item->attrs[d];
      if (!ca->def || json_object_get(l->attributes, ca->name)) continue;
      Qm__V1__Attribute *a = &attrs[i * per + pl->n_attributes];
      qm__v1__attribute__init(a);
      a->name = ca->name;
      a->value = ca->def;
      pl->attributes[pl->n_attributes++] = a;
    }
    if (catalog_encryption_required(l->item, subject->country)) {
      Qm__V1__Attribute *a = &attrs[i * per + pl->n_attributes];
      qm__v1__attribute__init(a);
      a->name = (char *)"encryption";
      a->value = (char *)"required";
      pl->attributes[pl->n_attributes++] = a;
    }
    pptrs[i] = pl;
    qm_pg_param_t lp[] = {QM_PG_TEXT(rq->id), QM_PG_INT64(l->line_no),
                          QM_PG_TEXT(l->item->id), QM_PG_TEXT(pl->role_id),
                          QM_PG_TEXT(catalog_kind_name(l->item->kind)),
                          QM_PG_TEXT(l->role ? catalog_risk_name(l->role->risk) : ""),
                          QM_PG_TEXT(pl->group), QM_PG_INT64(l->duration_days),
                          QM_PG_TEXT(subject->id)};
    rc = qm_pg_exec(tx,
                    "INSERT INTO request_lines (request_id, line_no, item_id, role_id, kind, risk,"
                    " grp, duration_days, status, subject_id) VALUES ($1, $2::int, $3, $4, $5, $6,"
                    " $7, $8::int, 'submitted', $9)",
                    lp, QM_ARRAY_LEN(lp), NULL, errstr, errstr_size);
  }
  char event_id[QM_UUID_STR_LEN] = "";
  if (rc == QM_OK) {
    Qm__V1__Actor requester = QM__V1__ACTOR__INIT;
    char *roles[QM_AUTH_MAX_ROLES];
    if (rq->who) {
      requester.person_id = (char *)rq->who->sub;
      for (size_t i = 0; i < rq->who->nroles; i++) roles[i] = (char *)rq->who->roles[i];
      requester.roles = roles;
      requester.n_roles = rq->who->nroles;
    } else {
      requester.service = (char *)"intake";
    }
    Qm__V1__RequestSubmitted rs = QM__V1__REQUEST_SUBMITTED__INIT;
    rs.request_id = rq->id;
    rs.requester = &requester;
    rs.subject_person_id = (char *)subject->id;
    rs.subject_manager_id = (char *)subject->manager_id;
    rs.subject_department = (char *)subject->department;
    rs.subject_job_function = (char *)subject->job_function;
    rs.subject_country = (char *)subject->country;
    rs.subject_employment_type = (char *)subject->employment_type;
    rs.subject_location = (char *)subject->location;
    rs.subject_directory_username =
        (char *)(subject->directory_username[0] ? subject->directory_username : subject->id);
    rs.reason = (char *)(rq->reason ? rq->reason : "");
    rs.n_lines = n;
    rs.lines = pptrs;
    rs.submitted_at_ms = qm_now_ms();
    rs.extends_request_id = (char *)(rq->extends ? rq->extends : "");
    rs.origin = (char *)rq->origin;
    rs.n_flags = rq->n_flags;
    rs.flags = (char **)rq->flags;
    Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
    re.event_case = QM__V1__REQUEST_EVENT__EVENT_SUBMITTED;
    re.submitted = &rs;
    rc = qm_service_emit(in->svc, tx, QM_TOPIC_REQUESTS, subject->id, "qm.request.submitted.v1",
                         rq->id, rq->traceparent, &re.base, event_id, errstr, errstr_size);
    if (rc == QM_OK) {
      char summary[512];
      snprintf(summary, sizeof(summary), "submitted by %s for %s (%s): %zu line(s)%s",
               rq->requester_id, subject->id, rq->origin, n,
               rq->n_flags ? " — flagged for review" : "");
      rc = readmodel_timeline(tx, rq->id, 0, rs.submitted_at_ms, "qm.request.submitted.v1",
                              event_id, rq->requester_id, summary, errstr, errstr_size);
    }
  }
  free(aptrs);
  free(attrs);
  free(pptrs);
  free(plines);
  return rc;
}

int requests_holding(qm_pg_t *tx, const char *subject, const char *item, const char *role,
                     char *out, size_t out_size, char *errstr, size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(subject), QM_PG_TEXT(item), QM_PG_TEXT(role)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT CASE WHEN l.status IN ('granted', 'fulfilled') THEN 'held'"
                      " ELSE 'pending' END FROM request_lines l"
                      " WHERE l.subject_id = $1 AND l.item_id = $2 AND l.role_id = $3"
                      " AND l.status IN ('submitted', 'pending_approval', 'approved', 'fulfilling',"
                      " 'granted', 'fulfilled')"
                      " ORDER BY line_rank(l.status) DESC LIMIT 1",
                      p, 3, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_strlcpy(out, qm_pg_ntuples(res) ? qm_pg_get(res, 0, 0) : "", out_size);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Seats in use for a licence: held or on the way. Serialised per item by an
 * advisory lock so two requests cannot both take the last seat. */
int requests_seats_in_use(qm_pg_t *tx, const char *item, int64_t *used, char *errstr,
                        size_t errstr_size) {
  char lock[160];
  snprintf(lock, sizeof(lock), "qm.intake.seats.%s", item);
  qm_pg_param_t lp[] = {QM_PG_INT64(qm_pg_advisory_key(lock))};
  int rc = qm_pg_exec(tx, "SELECT pg_advisory_xact_lock($1::bigint)", lp, 1, NULL, errstr,
                      errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_TEXT(item)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "SELECT count(*) FROM request_lines WHERE item_id = $1"
                  " AND status IN ('submitted', 'pending_approval', 'approved', 'granted')",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_get_int64(res, 0, 0, used);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Second pass, inside the transaction: the subject against the directory and
 * what they hold, then the request itself. A refusal rolls everything back. */
static int submit_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  QM_UNUSED(svc);
  submit_t *s = ctx;
  refusals_t *r = &s->refusals;
  r->n = 0;
  /* A retry (same key) is answered before any check: what was true when the
   * request was filed — and is no longer, because it was filed — must not
   * turn the retry into a refusal. */
  qm_pg_param_t kp[] = {QM_PG_TEXT(s->who->sub), QM_PG_TEXT(s->idem_key)};
  qm_pg_result_t *kres = NULL;
  int rc = qm_pg_exec(tx,
                      "SELECT id, body_hash, origin FROM requests"
                      " WHERE requester_id = $1 AND idempotency_key = $2",
                      kp, 2, &kres, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(kres) == 1) {
    bool same = !strcmp(qm_pg_get(kres, 0, 1), s->body_hash);
    if (same) {
      qm_strlcpy(s->request_id, qm_pg_get(kres, 0, 0), sizeof(s->request_id));
      qm_strlcpy(s->origin, qm_pg_get(kres, 0, 2), sizeof(s->origin));
      s->replayed = true;
    }
    qm_pg_result_destroy(kres);
    if (same) return QM_OK;
    s->problem = qm_problem_new(422, "idempotency-key-reused", "Idempotency-Key already used");
    qm_problem_detail(s->problem, "this Idempotency-Key was used for a different request body; "
                                  "use a new key for a new request");
    return QM_EINVAL;
  }
  qm_pg_result_destroy(kres);
  /* Who may ask for whom is settled before the directory is consulted, so
   * the answers do not tell a stranger which person ids exist. */
  if (strcmp(s->subject_id, s->who->sub) && !qm_principal_has_role(s->who, "manager") &&
      !qm_api_has_any_role(s->who, intake_staff_roles)) {
    s->problem = qm_problem_new(403, "forbidden", "Not allowed to request for this person");
    qm_problem_detail(s->problem, "you may request for yourself, as manager for your direct "
                                  "reports, or for anyone with the helpdesk or it_admin role");
    return QM_EINVAL;
  }
  person_t subject;
  rc = people_get(tx, s->subject_id, &subject, errstr, errstr_size);
  if (rc == QM_ENOTFOUND) {
    refuse(r, 400, "subject_person_id", "unknown_person", "no such person in the directory");
    return QM_EINVAL;
  }
  if (rc != QM_OK) return rc;
  const char *origin = origin_of(s->who, &subject);
  if (!origin) {
    s->problem = qm_problem_new(403, "forbidden", "Not allowed to request for this person");
    qm_problem_detail(s->problem, "you may request for yourself, as manager for your direct "
                                  "reports, or for anyone with the helpdesk or it_admin role");
    return QM_EINVAL;
  }
  qm_strlcpy(s->origin, origin, sizeof(s->origin));
  if (!strcmp(subject.status, "terminated")) {
    refuse(r, 422, "subject_person_id", "subject_left", "this person has left the organisation");
    return QM_EINVAL;
  }
  catalog_person_t cp = {subject.employment_type, subject.department, subject.job_function,
                         subject.country};
  for (size_t i = 0; i < s->n_lines; i++) {
    const line_in_t *l = &s->lines[i];
    char why[256], f[64];
    snprintf(f, sizeof(f), "lines[%zu].item_id", i);
    catalog_verdict_t v = catalog_check(l->item, &cp, why, sizeof(why));
    if (v == CATALOG_NOT_ELIGIBLE) refuse(r, 422, f, "not_eligible", "%s", why);
    else if (v == CATALOG_UNAVAILABLE_IN_COUNTRY) refuse(r, 422, f, "unavailable_in_country", "%s", why);
    if (l->item->kind == CATALOG_KIND_ASSET) continue;
    char holding[16];
    rc = requests_holding(tx, subject.id, l->item->id, l->role ? l->role->id : "", holding,
                          sizeof(holding), errstr, errstr_size);
    if (rc != QM_OK) return rc;
    snprintf(f, sizeof(f), "lines[%zu]", i);
    if (!strcmp(holding, "held") && !s->extends)
      refuse(r, 409, f, "already_held",
             "%s already holds %s/%s (to keep it longer, request an extension with "
             "extends_request_id)", subject.id, l->item->id, l->role ? l->role->id : "");
    else if (!strcmp(holding, "pending"))
      refuse(r, 409, f, "already_pending", "a request for %s/%s is already on its way for %s",
             l->item->id, l->role ? l->role->id : "", subject.id);
    if (l->item->seats > 0) {
      int64_t used = 0;
      rc = requests_seats_in_use(tx, l->item->id, &used, errstr, errstr_size);
      if (rc != QM_OK) return rc;
      for (size_t j = 0; j < i; j++) used += s->lines[j].item == l->item; /* this request's own */
      if (used >= l->item->seats) {
        snprintf(f, sizeof(f), "lines[%zu].item_id", i);
        refuse(r, 409, f, "no_seat", "all %d seats of %s are taken", l->item->seats, l->item->id);
      }
    }
  }
  const char *flags[1];
  size_t n_flags = 0;
  bool screened = !strcmp(subject.employment_type, "contractor") ||
                  !strcmp(subject.employment_type, "third_party");
  if (screened && s->in->watch && watchlist_match(s->in->watch, subject.name, subject.country)) {
    if (s->in->watch_refuse)
      refuse(r, 403, "subject_person_id", "screening",
             "this person matches the screening watchlist; contact security");
    else
      flags[n_flags++] = "screening_match";
  }
  if (r->n) return QM_EINVAL;
  if (s->extends) {
    qm_pg_param_t ep[] = {QM_PG_TEXT(s->extends), QM_PG_TEXT(subject.id)};
    qm_pg_result_t *res = NULL;
    rc = qm_pg_exec(tx, "SELECT 1 FROM requests WHERE id = $1 AND subject_id = $2", ep, 2, &res,
                    errstr, errstr_size);
    if (rc != QM_OK) return rc;
    int found = qm_pg_ntuples(res);
    qm_pg_result_destroy(res);
    if (!found) {
      refuse(r, 400, "extends_request_id", "invalid", "no earlier request for this person with that id");
      return QM_EINVAL;
    }
  }
  request_new_t rq = {
      .subject = &subject, .requester_id = s->who->sub, .who = s->who, .origin = s->origin,
      .reason = s->reason, .extends = s->extends, .idem_key = s->idem_key,
      .body_hash = s->body_hash, .traceparent = qm_http_req_traceparent(s->req),
      .lines = s->lines, .n_lines = s->n_lines, .flags = flags, .n_flags = n_flags};
  rc = requests_create(s->in, tx, &rq, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_strlcpy(s->request_id, rq.id, sizeof(s->request_id));
  s->replayed = rq.replayed;
  if (rq.key_clash) {
    s->problem = qm_problem_new(422, "idempotency-key-reused", "Idempotency-Key already used");
    qm_problem_detail(s->problem, "this Idempotency-Key was used for a different request body; "
                                  "use a new key for a new request");
    return QM_EINVAL;
  }
  return QM_OK;
}

/* Renders a request with its lines and (optionally) its timeline. */
static int request_json(qm_pg_t *pg, const char *id, bool timeline, json_t **out, char *errstr,
                        size_t errstr_size) {
  qm_pg_param_t p[] = {QM_PG_TEXT(id)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "SELECT id, requester_id, subject_id, reason, origin, status,"
                      " coalesce(extends_request_id, ''), array_to_json(flags)::text AS flags,"
                      " to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
                      " to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
                      " FROM requests WHERE id = $1",
                      p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return QM_ENOTFOUND;
  }
  json_t *r = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s}", "id", qm_pg_get(res, 0, 0),
                        "requester_id", qm_pg_get(res, 0, 1), "subject_person_id",
                        qm_pg_get(res, 0, 2), "reason", qm_pg_get(res, 0, 3), "origin",
                        qm_pg_get(res, 0, 4), "status", qm_pg_get(res, 0, 5), "created_at",
                        qm_pg_get(res, 0, 8), "updated_at", qm_pg_get(res, 0, 9));
  if (*qm_pg_get(res, 0, 6)) json_object_set_new(r, "extends_request_id", json_string(qm_pg_get(res, 0, 6)));
  json_t *flags = json_loads(qm_pg_get(res, 0, 7), 0, NULL);
  if (json_array_size(flags) > 0) json_object_set_new(r, "flags", flags);
  else json_decref(flags);
  qm_pg_result_destroy(res);
  rc = qm_pg_exec(pg,
                  "SELECT line_no, item_id, role_id, kind, risk, grp, duration_days, status,"
                  " array_to_json(waiting_on)::text, expires_at_ms FROM request_lines"
                  " WHERE request_id = $1 ORDER BY line_no",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) {
    json_decref(r);
    return rc;
  }
  json_t *lines = json_array();
  for (int i = 0; i < qm_pg_ntuples(res); i++) {
    int64_t line_no = 0, dur = 0, exp = 0;
    qm_pg_get_int64(res, i, 0, &line_no);
    qm_pg_get_int64(res, i, 6, &dur);
    qm_pg_get_int64(res, i, 9, &exp);
    json_t *l = json_pack("{s:I, s:s, s:s, s:s, s:s, s:s, s:I, s:s}", "line_no", (json_int_t)line_no,
                          "item_id", qm_pg_get(res, i, 1), "role_id", qm_pg_get(res, i, 2), "kind",
                          qm_pg_get(res, i, 3), "risk", qm_pg_get(res, i, 4), "group",
                          qm_pg_get(res, i, 5), "duration_days", (json_int_t)dur, "status",
                          qm_pg_get(res, i, 7));
    json_t *waiting = json_loads(qm_pg_get(res, i, 8), 0, NULL);
    if (json_array_size(waiting) > 0) json_object_set_new(l, "waiting_on", waiting);
    else json_decref(waiting);
    if (exp > 0) {
      char ts[40];
      qm_time_format_rfc3339(exp, ts, sizeof(ts));
      json_object_set_new(l, "expires_at", json_string(ts));
    }
    json_array_append_new(lines, l);
  }
  qm_pg_result_destroy(res);
  json_object_set_new(r, "lines", lines);
  if (timeline) {
    rc = qm_pg_exec(pg,
                    "SELECT at_ms, type, line_no, actor, summary, event_id FROM timeline"
                    " WHERE request_id = $1 ORDER BY at_ms, id",
                    p, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) {
      json_decref(r);
      return rc;
    }
    json_t *tl = json_array();
    for (int i = 0; i < qm_pg_ntuples(res); i++) {
      int64_t at = 0, line_no = 0;
      qm_pg_get_int64(res, i, 0, &at);
      qm_pg_get_int64(res, i, 2, &line_no);
      char ts[40];
      qm_time_format_rfc3339(at, ts, sizeof(ts));
      json_t *e = json_pack("{s:s, s:s, s:s, s:s}", "at", ts, "type", qm_pg_get(res, i, 1),
                            "summary", qm_pg_get(res, i, 4), "event_id", qm_pg_get(res, i, 5));
      if (line_no > 0) json_object_set_new(e, "line_no", json_integer(line_no));
      if (*qm_pg_get(res, i, 3)) json_object_set_new(e, "actor", json_string(qm_pg_get(res, i, 3)));
      json_array_append_new(tl, e);
    }
    qm_pg_result_destroy(res);
    json_object_set_new(r, "timeline", tl);
  }
  *out = r;
  return QM_OK;
}

/* Counts a request by origin and outcome, and its lines by item kind. */
static void count_request(intake_t *in, const submit_t *s, const char *origin,
                          const char *outcome) {
  const char *labels[] = {origin, outcome};
  qm_metrics_inc(qm_metrics_child(in->m_requests, labels));
  for (size_t i = 0; i < s->n_lines; i++) {
    const char *kind = s->lines[i].item ? catalog_kind_name(s->lines[i].item->kind) : "unknown";
    const char *ll[] = {kind, outcome};
    qm_metrics_inc(qm_metrics_child(in->m_lines, ll));
  }
}

static void post_request(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  json_t *body = qm_http_req_json(req);
  if (!body) return; /* 400 already set */
  submit_t s = {.in = in, .req = req, .who = qm_http_req_principal(req)};
  const char *key = qm_http_req_header(req, "Idempotency-Key");
  if (key && (!*key || strlen(key) > 200))
    refuse(&s.refusals, 400, "Idempotency-Key", "invalid", "must be 1 to 200 characters");
  /* Without a key of the caller's, a key of our own for this call: if COMMIT's
   * outcome is unknown (connection lost) and the transaction is retried, the
   * retry finds the first attempt's request instead of creating a second. */
  char own_key[64];
  if (!key) {
    char u[QM_UUID_STR_LEN];
    qm_uuid_new(u);
    snprintf(own_key, sizeof(own_key), "qm-internal:%s", u);
  }
  s.idem_key = key ? key : own_key;
  size_t blen = 0;
  const char *raw = qm_http_req_body(req, &blen);
  sha256_hex(raw ? raw : "", blen, s.body_hash);
  const catalog_t *cat = intake_catalog_acquire(in);
  validate_body(&s, cat, body);
  if (s.refusals.n) {
    count_request(in, &s, "unknown", "refused");
    intake_catalog_release(in);
    free(s.lines);
    qm_http_resp_problem(resp, refusal_problem(in, &s.refusals));
    return;
  }
  char errstr[512] = "";
  int rc = qm_service_tx(in->svc, 10000, submit_tx, &s, errstr, sizeof(errstr));
  bool refused = s.problem || (rc == QM_EINVAL && s.refusals.n);
  if (refused) count_request(in, &s, s.origin[0] ? s.origin : "unknown", "refused");
  else if (rc == QM_OK) count_request(in, &s, s.origin, s.replayed && key ? "replayed" : "accepted");
  intake_catalog_release(in);
  free(s.lines);
  if (refused) {
    qm_http_resp_problem(resp, s.problem ? s.problem : refusal_problem(in, &s.refusals));
    return;
  }
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "submitting a request", errstr);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  json_t *out = NULL;
  rc = request_json(pg, s.request_id, false, &out, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "reading the new request", errstr);
    return;
  }
  char loc[96];
  snprintf(loc, sizeof(loc), "/v1/requests/%s", s.request_id);
  qm_http_resp_header(resp, "Location", loc);
  if (s.replayed && key) qm_http_resp_header(resp, "Idempotent-Replayed", "true");
  qm_log(QM_LOG_INFO, s.request_id, qm_http_req_trace_id(req), "request %s by %s for %s%s",
         s.replayed ? "replayed" : "submitted", s.who->sub, s.subject_id, s.replayed ? " (same Idempotency-Key)" : "");
  qm_http_resp_json(resp, s.replayed && key ? 200 : 201, out);
}

/* May the caller see this request (act == false) or act on it (act == true)?
 * Requester, subject and the subject's manager may do both; helpdesk and
 * it_admin too; auditors and security may only see. */
static int may_see(qm_pg_t *pg, const qm_principal_t *who, const char *id, bool act,
                   bool *allowed, char *errstr, size_t errstr_size) {
  static const char *const readers[] = {"helpdesk", "it_admin", "auditor", "security", NULL};
  qm_pg_param_t p[] = {QM_PG_TEXT(id), QM_PG_TEXT(who->sub)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "SELECT r.requester_id = $2 OR r.subject_id = $2"
                      " OR EXISTS (SELECT 1 FROM people p WHERE p.id = r.subject_id AND p.manager_id = $2)"
                      " FROM requests r WHERE r.id = $1",
                      p, 2, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  if (qm_pg_ntuples(res) == 0) {
    qm_pg_result_destroy(res);
    return QM_ENOTFOUND;
  }
  *allowed = !strcmp(qm_pg_get(res, 0, 0), "t") ||
             qm_api_has_any_role(who, act ? intake_staff_roles : readers);
  qm_pg_result_destroy(res);
  return QM_OK;
}

static void get_request(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  const char *id = qm_http_req_param(req, "id");
  if (!qm_uuid_valid(id)) {
    qm_problem_t *pb = NULL;
    qm_api_field_error(&pb, "id", "must be a request id (UUID)");
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  char errstr[512];
  bool allowed = false;
  json_t *out = NULL;
  int rc = may_see(pg, qm_http_req_principal(req), id, false, &allowed, errstr, sizeof(errstr));
  if (rc == QM_OK && allowed) rc = request_json(pg, id, true, &out, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc == QM_ENOTFOUND || (rc == QM_OK && !allowed))
    qm_http_problem(resp, 404, "not-found", "No such request",
                    "no request with this id that you may see");
  else if (rc != QM_OK)
    qm_api_db_error(req, resp, "reading a request", errstr);
  else
    qm_http_resp_json(resp, 200, out);
}

static void list_requests(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  const qm_principal_t *who = qm_http_req_principal(req);
  qm_problem_t *pb = NULL;
  qm_page_t page;
  qm_api_page(req, 50, 200, &page, &pb);
  bool team = qm_http_req_query(req, "team") != NULL;
  bool mine = qm_http_req_query(req, "mine") != NULL;
  const char *subject = qm_http_req_query(req, "subject");
  if ((team + mine + (subject != NULL)) > 1)
    qm_api_field_error(&pb, "team", "ask for one of mine, team or subject=<person>");
  if (subject && !*subject) qm_api_field_error(&pb, "subject", "must be a person id");
  const char *status = qm_http_req_query(req, "status");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  char errstr[512];
  int rc = QM_OK;
  if (subject && strcmp(subject, who->sub)) {
    /* Someone else's requests: their manager, staff and auditors only. */
    static const char *const readers[] = {"helpdesk", "it_admin", "auditor", "security", NULL};
    person_t p;
    rc = people_get(pg, subject, &p, errstr, sizeof(errstr));
    bool allowed = qm_api_has_any_role(who, readers) ||
                   (rc == QM_OK && qm_principal_has_role(who, "manager") &&
                    !strcmp(p.manager_id, who->sub));
    if (!allowed) {
      qm_pg_pool_release(qm_service_pool(in->svc), pg);
      qm_http_problem(resp, 403, "forbidden", "Not allowed",
                      "you may list the requests of yourself, your direct reports, or anyone "
                      "with the helpdesk, it_admin, auditor or security role");
      return;
    }
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(subject ? subject : who->sub),
                       QM_PG_INT64(subject ? 2 : team ? 1 : 0),
                       status ? QM_PG_TEXT(status) : QM_PG_NULL, QM_PG_INT64(page.after),
                       QM_PG_INT64(page.limit + 1)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(pg,
                      "SELECT r.id, r.seq FROM requests r WHERE"
                      " CASE WHEN $2::int = 1 THEN r.subject_id IN (SELECT id FROM people WHERE manager_id = $1)"
                      " WHEN $2::int = 2 THEN r.subject_id = $1"
                      " ELSE (r.requester_id = $1 OR r.subject_id = $1) END"
                      " AND ($3::text IS NULL OR r.status = $3)"
                      " AND ($4::bigint = 0 OR r.seq < $4::bigint)"
                      " ORDER BY r.seq DESC LIMIT $5::int",
                      p, 5, &res, errstr, sizeof(errstr));
  json_t *items = json_array();
  char next[32] = "";
  if (rc == QM_OK) {
    int n = qm_pg_ntuples(res);
    int shown = n > page.limit ? (int)page.limit : n;
    for (int i = 0; i < shown && rc == QM_OK; i++) {
      json_t *r = NULL;
      rc = request_json(pg, qm_pg_get(res, i, 0), false, &r, errstr, sizeof(errstr));
      if (rc == QM_OK) json_array_append_new(items, r);
    }
    if (n > page.limit) qm_strlcpy(next, qm_pg_get(res, shown - 1, 1), sizeof(next));
    qm_pg_result_destroy(res);
  }
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) {
    json_decref(items);
    qm_api_db_error(req, resp, "listing requests", errstr);
    return;
  }
  qm_http_resp_json(resp, 200, qm_api_list(items, next));
}

typedef struct cancel {
  const char *id;
  const char *reason;
  const qm_principal_t *who;
  qm_http_req_t *req;
  int cancelled;
  bool allowed, found;
} cancel_t;

static int cancel_tx(qm_service_t *svc, qm_pg_t *tx, void *ctx, char *errstr, size_t errstr_size) {
  cancel_t *c = ctx;
  bool sees = false;
  int rc = may_see(tx, c->who, c->id, false, &sees, errstr, errstr_size);
  if (rc == QM_ENOTFOUND || (rc == QM_OK && !sees)) return QM_OK;
  if (rc != QM_OK) return rc;
  c->found = true;
  rc = may_see(tx, c->who, c->id, true, &c->allowed, errstr, errstr_size);
  if (rc != QM_OK || !c->allowed) return rc;
  qm_pg_param_t p[] = {QM_PG_TEXT(c->id)};
  qm_pg_result_t *res = NULL;
  rc = qm_pg_exec(tx,
                  "UPDATE request_lines SET status = 'cancelled', waiting_on = '{}', updated_at = now()"
                  " WHERE request_id = $1 AND status IN ('submitted', 'pending_approval')"
                  " RETURNING (SELECT subject_id FROM requests WHERE id = $1)",
                  p, 1, &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  c->cancelled = qm_pg_ntuples(res);
  char subject[130] = "";
  if (c->cancelled > 0) qm_strlcpy(subject, qm_pg_get(res, 0, 0), sizeof(subject));
  qm_pg_result_destroy(res);
  if (c->cancelled == 0) return QM_OK;
  Qm__V1__Actor actor = QM__V1__ACTOR__INIT;
  actor.person_id = (char *)c->who->sub;
  Qm__V1__RequestCancelled rc_ev = QM__V1__REQUEST_CANCELLED__INIT;
  rc_ev.request_id = (char *)c->id;
  rc_ev.actor = &actor;
  rc_ev.reason = (char *)c->reason;
  rc_ev.subject_person_id = subject;
  Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
  re.event_case = QM__V1__REQUEST_EVENT__EVENT_CANCELLED;
  re.cancelled = &rc_ev;
  char event_id[QM_UUID_STR_LEN];
  rc = qm_service_emit(svc, tx, QM_TOPIC_REQUESTS, subject, "qm.request.cancelled.v1", c->id,
                       qm_http_req_traceparent(c->req), &re.base, event_id, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  char summary[400];
  snprintf(summary, sizeof(summary), "cancelled by %s: %s (%d line(s) not yet decided)",
           c->who->sub, c->reason, c->cancelled);
  rc = readmodel_timeline(tx, c->id, 0, qm_now_ms(), "qm.request.cancelled.v1", event_id,
                          c->who->sub, summary, errstr, errstr_size);
  return rc == QM_OK ? readmodel_recompute(tx, c->id, errstr, errstr_size) : rc;
}

static void cancel_request(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  const char *id = qm_http_req_param(req, "id");
  qm_problem_t *pb = NULL;
  if (!qm_uuid_valid(id)) qm_api_field_error(&pb, "id", "must be a request id (UUID)");
  const char *reason = "no longer needed";
  size_t blen = 0;
  qm_http_req_body(req, &blen);
  if (blen > 0) {
    json_t *body = qm_http_req_json(req);
    if (!body) {
      qm_problem_destroy(pb);
      return;
    }
    json_t *r = json_object_get(body, "reason");
    if (r && (!json_is_string(r) || json_string_length(r) > MAX_REASON))
      qm_api_field_error(&pb, "reason", "must be text up to 2000 characters");
    else if (r && json_string_length(r) > 0)
      reason = json_string_value(r);
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  cancel_t c = {.id = id, .reason = reason, .who = qm_http_req_principal(req), .req = req};
  char errstr[512] = "";
  int rc = qm_service_tx(in->svc, 10000, cancel_tx, &c, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_api_db_error(req, resp, "cancelling a request", errstr);
    return;
  }
  if (!c.found) {
    qm_http_problem(resp, 404, "not-found", "No such request", "no request with this id that you may see");
    return;
  }
  if (!c.allowed) {
    qm_http_problem(resp, 403, "forbidden", "Not allowed to cancel",
                    "the requester, the subject, the subject's manager, helpdesk or it_admin may "
                    "cancel a request; auditors and security may only read it");
    return;
  }
  if (c.cancelled == 0) {
    qm_http_problem(resp, 409, "conflict", "Nothing to cancel",
                    "every line of this request is already decided; ask for a revocation instead");
    return;
  }
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  json_t *out = NULL;
  rc = request_json(pg, id, true, &out, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) qm_api_db_error(req, resp, "reading a request", errstr);
  else qm_http_resp_json(resp, 200, out);
}

int requests_register(intake_t *in, char *errstr, size_t errstr_size) {
  qm_http_server_t *http = qm_service_http(in->svc);
  if (qm_http_route(http, "POST", "/v1/requests", post_request, in, 0, NULL) != QM_OK ||
      qm_http_route(http, "GET", "/v1/requests", list_requests, in, 0, NULL) != QM_OK ||
      qm_http_route(http, "GET", "/v1/requests/{id}", get_request, in, 0, NULL) != QM_OK ||
      qm_http_route(http, "POST", "/v1/requests/{id}/cancel", cancel_request, in, 0, NULL) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register request routes");
  return QM_OK;
}
