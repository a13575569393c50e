/*
 * catalog_api: what a caller may ask for.
 *
 *   GET /v1/catalog?q=&kind=&limit=&after=   items the caller is eligible for
 *   GET /v1/catalog/{item}                   the item's form: which fields a
 *                                            request for it needs, and bounds
 *
 * Eligibility is judged on the caller's directory record (employment type,
 * department, job function, country); `for=<person>` lets a manager or
 * helpdesk see the catalog as one of the people they may request for.
 */
#include "intake.h"

#include "qm_api.h"
#include "qm_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static json_t *roles_json(const catalog_item_t *it) {
  json_t *roles = json_array();
  for (size_t r = 0; r < it->n_roles; r++) {
    const catalog_role_t *ro = &it->roles[r];
    json_array_append_new(
        roles, json_pack("{s:s, s:s, s:s, s:i, s:i, s:b, s:b}", "id", ro->id, "name", ro->name,
                         "risk", catalog_risk_name(ro->risk), "default_duration_days",
                         ro->default_duration_days, "max_duration_days", ro->max_duration_days,
                         "auto_approve", ro->auto_approve, "time_bound",
                         ro->max_duration_days > 0));
  }
  return roles;
}

static json_t *item_json(const catalog_item_t *it) {
  json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:f, s:b, s:b, s:o}", "id", it->id, "kind",
                        catalog_kind_name(it->kind), "name", it->name, "owner", it->owner, "cost",
                        (double)it->cost_minor / 100.0, "regulated", it->regulated,
                        "attestation_required", it->attestation != NULL, "roles", roles_json(it));
  if (it->description) json_object_set_new(o, "description", json_string(it->description));
  if (it->asset_model) json_object_set_new(o, "asset_model", json_string(it->asset_model));
  return o;
}

/* Adds what the database knows to an item: free seats of a licence, stock
 * and the estimated delivery of an asset (from fulfilment's StockLevel). */
static int enrich(qm_pg_t *pg, const catalog_item_t *it, json_t *o, char *errstr,
                  size_t errstr_size) {
  qm_pg_result_t *res = NULL;
  int rc = QM_OK;
  if (it->seats > 0) {
    qm_pg_param_t p[] = {QM_PG_TEXT(it->id)};
    rc = qm_pg_exec(pg,
                    "SELECT count(*) FROM request_lines WHERE item_id = $1"
                    " AND status IN ('submitted', 'pending_approval', 'approved', 'granted')",
                    p, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    int64_t used = 0;
    qm_pg_get_int64(res, 0, 0, &used);
    qm_pg_result_destroy(res);
    json_object_set_new(o, "seats", json_integer(it->seats));
    json_object_set_new(o, "seats_available", json_integer(used >= it->seats ? 0 : it->seats - used));
  }
  if (it->kind == CATALOG_KIND_ASSET && it->asset_model) {
    qm_pg_param_t p[] = {QM_PG_TEXT(it->asset_model)};
    rc = qm_pg_exec(pg,
                    "SELECT count(*), coalesce(sum(available), 0), coalesce(sum(on_order), 0),"
                    " coalesce(min(eta_ms) FILTER (WHERE eta_ms > 0), 0) FROM stock WHERE model_id = $1",
                    p, 1, &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    int64_t known = 0, avail = 0, on_order = 0, eta = 0;
    qm_pg_get_int64(res, 0, 0, &known);
    qm_pg_get_int64(res, 0, 1, &avail);
    qm_pg_get_int64(res, 0, 2, &on_order);
    qm_pg_get_int64(res, 0, 3, &eta);
    qm_pg_result_destroy(res);
    if (known > 0) {
      json_t *st = json_pack("{s:I, s:I}", "available", (json_int_t)avail, "on_order", (json_int_t)on_order);
      if (avail == 0 && eta > 0) {
        char ts[40];
        qm_time_format_rfc3339(eta, ts, sizeof(ts));
        json_object_set_new(st, "estimated_delivery", json_string(ts));
      }
      json_object_set_new(o, "stock", st);
    }
  }
  return QM_OK;
}

/* Resolves whose eligibility applies: the caller, or `for=` when allowed. */
static bool viewer(intake_t *in, qm_http_req_t *req, qm_http_resp_t *resp, person_t *p,
                   bool *known) {
  const qm_principal_t *who = qm_http_req_principal(req);
  const char *for_id = qm_http_req_query(req, "for");
  const char *id = for_id && *for_id ? for_id : who->sub;
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return false;
  char errstr[512];
  int rc = people_get(pg, id, p, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK && rc != QM_ENOTFOUND) {
    qm_api_db_error(req, resp, "reading the directory", errstr);
    return false;
  }
  *known = rc == QM_OK;
  if (for_id && *for_id && strcmp(for_id, who->sub) != 0) {
    bool allowed = qm_api_has_any_role(who, intake_staff_roles) ||
                   (*known && qm_principal_has_role(who, "manager") && !strcmp(p->manager_id, who->sub));
    if (!allowed) {
      qm_http_problem(resp, 403, "forbidden", "Not allowed",
                      "you may view the catalog for yourself, your direct reports (manager) or "
                      "anyone (helpdesk, it_admin)");
      return false;
    }
    if (!*known) {
      qm_problem_t *pb = NULL;
      qm_api_field_error(&pb, "for", "no such person in the directory");
      qm_http_resp_problem(resp, pb);
      return false;
    }
  }
  return true;
}

static void list_catalog(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  qm_problem_t *pb = NULL;
  qm_page_t page;
  qm_api_page(req, 50, 200, &page, &pb);
  const char *kind = qm_http_req_query(req, "kind");
  const char *q = qm_http_req_query(req, "q");
  if (kind && strcmp(kind, "access") && strcmp(kind, "asset") && strcmp(kind, "licence"))
    qm_api_field_error(&pb, "kind", "must be access, asset or licence");
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  person_t p;
  bool known = false;
  if (!viewer(in, req, resp, &p, &known)) return;
  catalog_person_t cp = {p.employment_type, p.department, p.job_function, p.country};
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  if (!pg) return;
  const catalog_t *cat = intake_catalog_acquire(in);
  json_t *items = json_array();
  char next[32] = "", errstr[512] = "";
  int rc = QM_OK;
  /* The cursor is the position in the catalog after which to continue. */
  for (size_t i = (size_t)page.after; i < cat->n_items; i++) {
    const catalog_item_t *it = &cat->items[i];
    if (kind && strcmp(kind, catalog_kind_name(it->kind))) continue;
    if (q && *q && !strcasestr(it->name, q) && !strcasestr(it->id, q) &&
        !(it->description && strcasestr(it->description, q)))
      continue;
    if (!known || !catalog_eligible(it, &cp, NULL, 0)) continue;
    if ((long)json_array_size(items) == page.limit) {
      snprintf(next, sizeof(next), "%zu", i);
      break;
    }
    json_t *o = item_json(it);
    if (rc == QM_OK) rc = enrich(pg, it, o, errstr, sizeof(errstr));
    json_array_append_new(items, o);
  }
  intake_catalog_release(in);
  qm_pg_pool_release(qm_service_pool(in->svc), pg);
  if (rc != QM_OK) {
    json_decref(items);
    qm_api_db_error(req, resp, "reading seats and stock", errstr);
    return;
  }
  qm_http_resp_json(resp, 200, qm_api_list(items, next));
}

static void get_item(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  intake_t *in = ctx;
  person_t p;
  bool known = false;
  if (!viewer(in, req, resp, &p, &known)) return;
  const catalog_t *cat = intake_catalog_acquire(in);
  const catalog_item_t *it = catalog_find(cat, qm_http_req_param(req, "item"));
  if (!it) {
    intake_catalog_release(in);
    qm_http_problem(resp, 404, "not-found", "No such catalog item", "check GET /v1/catalog");
    return;
  }
  catalog_person_t cp = {p.employment_type, p.department, p.job_function, p.country};
  char why[256] = "you are not in the directory";
  bool eligible = known && catalog_eligible(it, &cp, why, sizeof(why));
  json_t *o = item_json(it);
  json_object_set_new(o, "eligible", json_boolean(eligible));
  if (!eligible) json_object_set_new(o, "ineligible_reason", json_string(why));
  /* The form: only what approval and provisioning need. */
  json_t *fields = json_array();
  /* A reason is required where a role is sensitive or elevated (approvers
   * read it); roles_needing_reason says which. */
  json_t *needing = json_array();
  for (size_t r = 0; r < it->n_roles; r++)
    if (it->roles[r].risk != CATALOG_RISK_STANDARD) json_array_append_new(needing, json_string(it->roles[r].id));
  json_array_append_new(fields, json_pack("{s:s, s:s, s:b, s:i, s:i, s:s, s:o}", "name", "reason",
                                          "type", "string", "required",
                                          it->n_roles > 0 && json_array_size(needing) == it->n_roles,
                                          "min_length", 3, "max_length", 2000, "label",
                                          "Why do you need it? (approvers read this)",
                                          "required_for_roles", needing));
  if (it->n_roles > 0) {
    json_t *values = json_array();
    for (size_t r = 0; r < it->n_roles; r++) json_array_append_new(values, json_string(it->roles[r].id));
    json_array_append_new(fields, json_pack("{s:s, s:s, s:b, s:o}", "name", "role_id", "type",
                                            "enum", "required", 1, "values", values));
    json_t *durations = json_object();
    for (size_t r = 0; r < it->n_roles; r++) {
      const catalog_role_t *ro = &it->roles[r];
      json_object_set_new(durations, ro->id,
                          json_pack("{s:i, s:i, s:i, s:b}", "min", ro->max_duration_days ? 1 : 0,
                                    "max", ro->max_duration_days ? ro->max_duration_days : 3650,
                                    "default", ro->default_duration_days, "required",
                                    ro->max_duration_days > 0));
    }
    json_array_append_new(fields, json_pack("{s:s, s:s, s:b, s:s, s:o}", "name", "duration_days",
                                            "type", "integer", "required", 0, "unit", "days",
                                            "bounds_by_role", durations));
  }
  if (it->attestation)
    json_array_append_new(fields, json_pack("{s:s, s:s, s:b, s:s}", "name", "attestation_accepted",
                                            "type", "boolean", "required", 1, "text",
                                            it->attestation));
  for (size_t a = 0; a < it->n_attrs; a++) {
    const catalog_attr_t *at = &it->attrs[a];
    json_t *values = json_array();
    for (size_t v = 0; v < at->values.n; v++) json_array_append_new(values, json_string(at->values.v[v]));
    json_t *f = json_pack("{s:s, s:s, s:s, s:o, s:b}", "name", at->name, "label", at->label,
                          "type", "enum", "values", values, "required", at->required && !at->def);
    if (at->def) json_object_set_new(f, "default", json_string(at->def));
    json_array_append_new(fields, f);
  }
  json_object_set_new(o, "form", fields);
  if (known && catalog_encryption_required(it, p.country))
    json_object_set_new(o, "encryption_required", json_true());
  qm_pg_t *pg = qm_api_db(req, resp, qm_service_pool(in->svc));
  char errstr[512] = "";
  int rc = pg ? enrich(pg, it, o, errstr, sizeof(errstr)) : QM_ETRANSIENT;
  if (pg) qm_pg_pool_release(qm_service_pool(in->svc), pg);
  intake_catalog_release(in);
  if (!pg) {
    json_decref(o);
    return; /* 503 already set */
  }
  if (rc != QM_OK) {
    json_decref(o);
    qm_api_db_error(req, resp, "reading seats and stock", errstr);
    return;
  }
  qm_http_resp_json(resp, 200, o);
}

int catalog_api_register(intake_t *in, char *errstr, size_t errstr_size) {
  qm_http_server_t *http = qm_service_http(in->svc);
  if (qm_http_route(http, "GET", "/v1/catalog", list_catalog, in, 0, NULL) != QM_OK ||
      qm_http_route(http, "GET", "/v1/catalog/{item}", get_item, in, 0, NULL) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register catalog routes");
  return QM_OK;
}
