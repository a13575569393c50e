/*
 * test_intake_checks: the policy checks intake makes when a request is
 * submitted (issue 3), against the real stack. For each rule one request is
 * accepted and one refused with the status, field and rule of the contract:
 *
 *   400 unknown_item, unknown_role, duration_required, duration_out_of_range,
 *       reason_required, attestation_required, invalid_attribute,
 *       attribute_required, unknown_person
 *   422 not_eligible, unavailable_in_country     (409 already_held,
 *       already_pending, no_seat)    403 screening, forbidden
 *
 * plus the order in which mixed refusals are answered, the watchlist in both
 * modes (refuse, flag), who may request for whom, idempotent retries, that a
 * refused request writes nothing (no row, no event) and that the refusal
 * metrics count up.
 *
 * One stack for the whole file (Criterion runs each Test in its own process,
 * so the cases run inside one Test; a failing case does not stop the others).
 * Intake runs on a temporary copy of the sample catalog with a few items of
 * this test's own (country and job-function eligibility), and a watchlist.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Items only this test uses, added to the copy of the sample catalog. */
static const char checks_catalog[] =
    "# Items of test_intake_checks: eligibility by country, job function and\n"
    "# employment type.\n"
    "items:\n"
    "  - id: it-nl-only\n"
    "    kind: access\n"
    "    name: IT check, Netherlands only\n"
    "    owner: p-0015\n"
    "    roles:\n"
    "      - id: user\n"
    "        group: app-it-nl-only\n"
    "        risk: standard\n"
    "        auto_approve: true\n"
    "    eligibility:\n"
    "      countries_allowed: [NL]\n"
    "  - id: it-not-de\n"
    "    kind: access\n"
    "    name: IT check, not in Germany\n"
    "    owner: p-0015\n"
    "    roles:\n"
    "      - id: user\n"
    "        group: app-it-not-de\n"
    "        risk: standard\n"
    "        auto_approve: true\n"
    "    eligibility:\n"
    "      countries_excluded: [DE]\n"
    "  - id: it-accountants\n"
    "    kind: access\n"
    "    name: IT check, accountants only\n"
    "    owner: p-0015\n"
    "    roles:\n"
    "      - id: user\n"
    "        group: app-it-accountants\n"
    "        risk: standard\n"
    "        auto_approve: true\n"
    "    eligibility:\n"
    "      job_functions: [Accountant]\n"
    "  - id: it-employees\n"
    "    kind: access\n"
    "    name: IT check, employees only\n"
    "    owner: p-0015\n"
    "    roles:\n"
    "      - id: user\n"
    "        group: app-it-employees\n"
    "        risk: standard\n"
    "        auto_approve: true\n"
    "    eligibility:\n"
    "      employment_types: [employee]\n";

/* Matched case-insensitively on name and country, for contractors and third
 * parties only: p-0010 and p-0030 (contractors, FR) match; p-0020 is a
 * contractor in FR listed with NL (no match); p-0011 is an employee;
 * "Vendor Tech" (NL) is a third party this test adds through HR. */
static const char checks_watchlist[] = "name,country\n"
                                       "person 0010,fr\n"
                                       "Person 0020,NL\n"
                                       "Person 0011,NL\n"
                                       "PERSON 0030,FR\n"
                                       "vendor tech,nl\n";

typedef struct checks_ctx {
  it_reader_t *requests; /* qm.requests.v1, read from the start */
} checks_ctx_t;

/* ------------------------------------------------------------ helpers */

/* What the seed says about a person this test relies on (setup: fatal). */
static void seed_is(const char *id, const char *dept, const char *country, const char *type,
                    const char *manager) {
  json_t *p = it_seed_person(id);
  cr_assert(p != NULL, "seed: no %s in people.json", id);
  const char *d = json_string_value(json_object_get(p, "department"));
  const char *c = json_string_value(json_object_get(p, "country"));
  const char *t = json_string_value(json_object_get(p, "employment_type"));
  const char *m = json_string_value(json_object_get(p, "manager_id"));
  cr_assert(d && c && t && m && !strcmp(d, dept) && !strcmp(c, country) && !strcmp(t, type) &&
                !strcmp(m, manager),
            "seed changed: %s is %s/%s/%s/manager %s, this test needs %s/%s/%s/manager %s", id,
            d, c, t, m, dept, country, type, manager);
  json_decref(p);
}

static long post(it_stack_t *st, const char *token, const char *body, const char *const *headers,
                 it_resp_t *r) {
  return it_http(st, "intake", "POST", "/v1/requests", token, body, headers, r);
}

/* The errors[] entry of a problem with this field (NULL when none). */
static json_t *problem_error(const json_t *pb, const char *field) {
  size_t i;
  json_t *e;
  json_array_foreach(json_object_get(pb, "errors"), i, e) {
    const char *f = json_string_value(json_object_get(e, "field"));
    if (f && !strcmp(f, field)) return e;
  }
  return NULL;
}

/* Asserts r is a problem+json with status, naming field with rule. */
static void expect_refusal(it_cases_t *cs, const it_resp_t *r, long status, const char *field,
                           const char *rule, const char *what) {
  IT_CHECK(cs, r->status == status, "%s: expected %ld, got %ld %s", what, status, r->status,
           r->body);
  IT_CHECK(cs, !strncmp(r->content_type, "application/problem+json", 24),
           "%s: Content-Type '%s' is not application/problem+json", what, r->content_type);
  IT_CHECK(cs, json_integer_value(json_object_get(r->json, "status")) == status,
           "%s: problem status is not %ld: %s", what, status, r->body);
  json_t *e = problem_error(r->json, field);
  IT_CHECK(cs, e != NULL, "%s: errors[] has no entry for field '%s': %s", what, field, r->body);
  const char *got = json_string_value(json_object_get(e, "rule"));
  IT_CHECK(cs, got && !strcmp(got, rule), "%s: errors['%s'].rule is '%s', expected '%s': %s",
           what, field, got ? got : "(none)", rule, r->body);
  const char *reason = json_string_value(json_object_get(e, "reason"));
  IT_CHECK(cs, reason && *reason, "%s: errors['%s'] has no reason: %s", what, field, r->body);
}

/* POSTs body and expects a refusal. */
static void refused(it_cases_t *cs, it_stack_t *st, const char *token, const char *body,
                    long status, const char *field, const char *rule) {
  it_resp_t r;
  post(st, token, body, NULL, &r);
  char what[160];
  snprintf(what, sizeof(what), "%s refusal (%s)", rule, field);
  expect_refusal(cs, &r, status, field, rule, what);
  it_resp_clear(&r);
}

/* POSTs body and expects 201; returns the request (caller frees with json_decref()). */
static json_t *accepted(it_cases_t *cs, it_stack_t *st, const char *token, const char *body) {
  it_resp_t r;
  post(st, token, body, NULL, &r);
  IT_CHECK(cs, r.status == 201 && json_is_string(json_object_get(r.json, "id")),
           "expected 201 with an id for %s, got %ld %s", body, r.status, r.body);
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

static char *accepted_id(it_cases_t *cs, it_stack_t *st, const char *token, const char *body) {
  json_t *j = accepted(cs, st, token, body);
  char *id = qm_strdup(json_string_value(json_object_get(j, "id")));
  json_decref(j);
  return id;
}

static bool has_flag(const json_t *req, const char *flag) {
  size_t i;
  json_t *f;
  json_array_foreach(json_object_get(req, "flags"), i, f) {
    if (json_is_string(f) && !strcmp(json_string_value(f), flag)) return true;
  }
  return false;
}

static char *metrics_text(it_cases_t *cs, it_stack_t *st) {
  it_resp_t r;
  it_http(st, "intake", "GET", "/metrics", NULL, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200, "GET /metrics on intake: %ld %s", r.status, r.body);
  char *text = qm_strdup(r.body);
  it_resp_clear(&r);
  return text;
}

/* ------------------------------------------------------------ 400 rules */

static void c_unknown_item(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0101", "employee");
  refused(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"no-such-item\","
                     "\"role_id\":\"user\"}]}", 400, "lines[0].item_id", "unknown_item");
  /* The index names the bad line, not the first one. */
  refused(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"zoom\",\"role_id\":"
                     "\"user\"},{\"item_id\":\"no-such-item\",\"role_id\":\"user\"}]}",
          400, "lines[1].item_id", "unknown_item");
  json_t *ok = accepted(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"figma\","
                                   "\"role_id\":\"viewer\"}]}");
  const char *origin = json_string_value(json_object_get(ok, "origin"));
  IT_CHECK(cs, origin && !strcmp(origin, "self_service"), "own request: origin '%s', expected "
           "self_service", origin ? origin : "(none)");
  json_decref(ok);
  free(t);
}

static void c_unknown_role(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0102", "employee");
  refused(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"figma\",\"role_id\":"
                     "\"admin\"}]}", 400, "lines[0].role_id", "unknown_role");
  json_decref(accepted(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"figma\","
                                  "\"role_id\":\"editor\"}]}"));
  free(t);
}

static void c_duration(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0103", "employee");
  /* aws/prod-admin is elevated, max 30 days. */
  refused(cs, st, t, "{\"reason\":\"incident response\",\"lines\":[{\"item_id\":\"aws\","
                     "\"role_id\":\"prod-admin\"}]}", 400, "lines[0].duration_days",
          "duration_required");
  refused(cs, st, t, "{\"reason\":\"incident response\",\"lines\":[{\"item_id\":\"aws\","
                     "\"role_id\":\"prod-admin\",\"duration_days\":31}]}", 400,
          "lines[0].duration_days", "duration_out_of_range");
  refused(cs, st, t, "{\"reason\":\"incident response\",\"lines\":[{\"item_id\":\"aws\","
                     "\"role_id\":\"prod-admin\",\"duration_days\":0}]}", 400,
          "lines[0].duration_days", "duration_out_of_range");
  json_t *ok = accepted(cs, st, t, "{\"reason\":\"incident response\",\"lines\":[{\"item_id\":"
                                   "\"aws\",\"role_id\":\"prod-admin\",\"duration_days\":30}]}");
  json_t *line = json_array_get(json_object_get(ok, "lines"), 0);
  IT_CHECK(cs, json_integer_value(json_object_get(line, "duration_days")) == 30,
           "accepted elevated line should keep duration_days 30: %s",
           json_dumps(ok, JSON_COMPACT));
  json_decref(ok);
  free(t);
}

static void c_reason(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0104", "employee");
  /* github/write is sensitive: a reason of at least 3 characters. */
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"github\",\"role_id\":\"write\"}]}", 400,
          "reason", "reason_required");
  refused(cs, st, t, "{\"reason\":\"ok\",\"lines\":[{\"item_id\":\"github\",\"role_id\":"
                     "\"write\"}]}", 400, "reason", "reason_required");
  /* One sensitive line among standard ones is enough to need it. */
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"},{\"item_id\":"
                     "\"github\",\"role_id\":\"write\"}]}", 400, "reason", "reason_required");
  /* Standard only: the reason may be omitted. */
  json_decref(accepted(cs, st, t, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}"));
  json_decref(accepted(cs, st, t, "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":"
                                  "\"github\",\"role_id\":\"write\"}]}"));
  free(t);
}

static void c_attestation(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0116", "employee");
  refused(cs, st, t, "{\"reason\":\"customer accounts\",\"lines\":[{\"item_id\":\"salesforce\","
                     "\"role_id\":\"user\"}]}", 400, "lines[0].attestation_accepted",
          "attestation_required");
  refused(cs, st, t, "{\"reason\":\"customer accounts\",\"lines\":[{\"item_id\":\"salesforce\","
                     "\"role_id\":\"user\",\"attestation_accepted\":false}]}", 400,
          "lines[0].attestation_accepted", "attestation_required");
  json_decref(accepted(cs, st, t, "{\"reason\":\"customer accounts\",\"lines\":[{\"item_id\":"
                                  "\"salesforce\",\"role_id\":\"user\",\"attestation_accepted\":"
                                  "true}]}"));
  free(t);
}

static void c_attributes(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0105", "employee");
  /* laptop-standard: keyboard (US, UK, DE, FR; required), ram (16GB, 32GB; default 16GB). */
  refused(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":"
                     "\"laptop-standard\"}]}", 400, "lines[0].attributes.keyboard",
          "attribute_required");
  refused(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":\"laptop-standard\","
                     "\"attributes\":{\"ram\":\"32GB\"}}]}", 400, "lines[0].attributes.keyboard",
          "attribute_required");
  refused(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":\"laptop-standard\","
                     "\"attributes\":{\"keyboard\":\"XX\"}}]}", 400,
          "lines[0].attributes.keyboard", "invalid_attribute");
  refused(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":\"laptop-standard\","
                     "\"attributes\":{\"keyboard\":\"US\",\"ram\":\"64GB\"}}]}", 400,
          "lines[0].attributes.ram", "invalid_attribute");
  refused(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":\"laptop-standard\","
                     "\"attributes\":{\"keyboard\":\"US\",\"colour\":\"red\"}}]}", 400,
          "lines[0].attributes.colour", "invalid_attribute");
  /* An item without attributes accepts none. */
  refused(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"figma\",\"role_id\":"
                     "\"viewer\",\"attributes\":{\"colour\":\"red\"}}]}", 400,
          "lines[0].attributes.colour", "invalid_attribute");
  json_decref(accepted(cs, st, t, "{\"reason\":\"new starter kit\",\"lines\":[{\"item_id\":"
                                  "\"laptop-standard\",\"attributes\":{\"keyboard\":\"DE\","
                                  "\"ram\":\"32GB\"}}]}"));
  free(t);
}

static void c_unknown_person(it_stack_t *st, it_cases_t *cs) {
  char *hd = it_token("p-0099", "employee,helpdesk");
  refused(cs, st, hd, "{\"subject_person_id\":\"p-9999\",\"lines\":[{\"item_id\":\"zoom\","
                      "\"role_id\":\"user\"}]}", 400, "subject_person_id", "unknown_person");
  free(hd);
}

/* ------------------------------------------------------------ 422 rules */

static void c_not_eligible(it_stack_t *st, it_cases_t *cs) {
  /* Department: aws is for Engineering and Security; p-0106 is in Support. */
  char *t = it_token("p-0106", "employee");
  refused(cs, st, t, "{\"reason\":\"look at logs\",\"lines\":[{\"item_id\":\"aws\",\"role_id\":"
                     "\"readonly\"}]}", 422, "lines[0].item_id", "not_eligible");
  /* Job function: it-accountants; p-0106 is a Support Specialist. */
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"it-accountants\",\"role_id\":\"user\"}]}", 422,
          "lines[0].item_id", "not_eligible");
  /* Employment type: it-employees; p-0110 is a contractor. */
  char *c = it_token("p-0110", "contractor");
  refused(cs, st, c, "{\"lines\":[{\"item_id\":\"it-employees\",\"role_id\":\"user\"}]}", 422,
          "lines[0].item_id", "not_eligible");
  /* And the eligible counterparts. */
  char *acc = it_token("p-0105", "employee");
  json_decref(accepted(cs, st, acc, "{\"lines\":[{\"item_id\":\"it-accountants\",\"role_id\":"
                                    "\"user\"}]}"));
  char *eng = it_token("p-0103", "employee");
  json_decref(accepted(cs, st, eng, "{\"reason\":\"look at logs\",\"lines\":[{\"item_id\":"
                                    "\"aws\",\"role_id\":\"readonly\"}]}"));
  json_decref(accepted(cs, st, t, "{\"lines\":[{\"item_id\":\"it-employees\",\"role_id\":"
                                  "\"user\"}]}"));
  free(eng);
  free(acc);
  free(c);
  free(t);
}

static void c_country(it_stack_t *st, it_cases_t *cs) {
  char *nl = it_token("p-0106", "employee"); /* NL */
  char *de = it_token("p-0112", "employee"); /* DE */
  refused(cs, st, de, "{\"lines\":[{\"item_id\":\"it-nl-only\",\"role_id\":\"user\"}]}", 422,
          "lines[0].item_id", "unavailable_in_country");
  refused(cs, st, de, "{\"lines\":[{\"item_id\":\"it-not-de\",\"role_id\":\"user\"}]}", 422,
          "lines[0].item_id", "unavailable_in_country");
  json_decref(accepted(cs, st, nl, "{\"lines\":[{\"item_id\":\"it-nl-only\",\"role_id\":"
                                   "\"user\"}]}"));
  json_decref(accepted(cs, st, nl, "{\"lines\":[{\"item_id\":\"it-not-de\",\"role_id\":"
                                   "\"user\"}]}"));
  free(de);
  free(nl);
}

/* ------------------------------------------------------------ 409 rules */

static void c_already_held(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0107", "employee");
  const char *viewer = "{\"lines\":[{\"item_id\":\"figma\",\"role_id\":\"viewer\"}]}";
  char *id = accepted_id(cs, st, t, viewer);
  json_decref(it_case_wait_status(cs, st, t, id, "granted", 30000));
  refused(cs, st, t, viewer, 409, "lines[0]", "already_held");
  /* Another role of the same item is not held. */
  json_decref(accepted(cs, st, t, "{\"reason\":\"design work\",\"lines\":[{\"item_id\":\"figma\","
                                  "\"role_id\":\"editor\"}]}"));
  free(id);
  free(t);
}

static void c_already_pending(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0108", "employee");
  const char *write = "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":\"github\","
                      "\"role_id\":\"write\"}]}";
  char *id = accepted_id(cs, st, t, write);
  json_decref(it_case_wait_status(cs, st, t, id, "pending_approval", 15000));
  refused(cs, st, t, write, 409, "lines[0]", "already_pending");
  refused(cs, st, t, "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":\"zoom\",\"role_id\":"
                     "\"user\"},{\"item_id\":\"github\",\"role_id\":\"write\"}]}", 409,
          "lines[1]", "already_pending");
  free(id);
  free(t);
}

static void c_no_seat(it_stack_t *st, it_cases_t *cs) {
  /* adobe-cc: a licence with 3 seats, standard, auto-approved. */
  const char *body = "{\"lines\":[{\"item_id\":\"adobe-cc\",\"role_id\":\"user\"}]}";
  static const char *const holders[] = {"p-0121", "p-0122", "p-0123"};
  char *ids[3] = {NULL, NULL, NULL};
  char *tokens[3];
  for (int i = 0; i < 3; i++) {
    tokens[i] = it_token(holders[i], "employee");
    ids[i] = accepted_id(cs, st, tokens[i], body);
  }
  for (int i = 0; i < 3; i++) json_decref(it_case_wait_status(cs, st, tokens[i], ids[i], "granted", 30000));
  char *fourth = it_token("p-0124", "employee");
  refused(cs, st, fourth, body, 409, "lines[0].item_id", "no_seat");
  for (int i = 0; i < 3; i++) {
    free(ids[i]);
    free(tokens[i]);
  }
  free(fourth);
}

/* ------------------------------------------------------------ screening, precedence */

static void c_screening_refuse(it_stack_t *st, it_cases_t *cs) {
  char *listed = it_token("p-0010", "contractor");
  refused(cs, st, listed, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}", 403,
          "subject_person_id", "screening");
  /* Helpdesk asking for the listed contractor is refused the same way. */
  char *hd = it_token("p-0099", "employee,helpdesk");
  refused(cs, st, hd, "{\"subject_person_id\":\"p-0010\",\"lines\":[{\"item_id\":\"slack\","
                      "\"role_id\":\"user\"}]}", 403, "subject_person_id", "screening");
  /* Same name, other country: no match. */
  char *other = it_token("p-0020", "contractor");
  json_t *ok = accepted(cs, st, other, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}");
  IT_CHECK(cs, !has_flag(ok, "screening_match"), "p-0020 (listed with another country) flagged: %s",
           json_dumps(ok, JSON_COMPACT));
  json_decref(ok);
  /* Employees are not screened. */
  char *emp = it_token("p-0011", "employee");
  json_decref(accepted(cs, st, emp, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}"));
  free(emp);
  free(other);
  free(hd);
  free(listed);
}

/* Third parties are screened too: one joins through HR first. */
static void c_screening_third_party(it_stack_t *st, it_cases_t *cs) {
  char today[16];
  it_date(0, today, sizeof(today));
  it_hr_event_t ev = {.kind = "joiner", .effective_date = today,
                      .person = {.id = "p-9101", .name = "Vendor Tech", .manager_id = "p-0005",
                                 .department = "Facilities", .job_function = "Auditor",
                                 .country = "NL", .location = "NL-HQ",
                                 .employment_type = "third_party", .status = "active"}};
  it_hr_publish(st, &ev);
  char *hd = it_token("p-0099", "employee,helpdesk");
  int64_t deadline = it_now_ms() + 30000;
  it_resp_t r;
  for (;;) {
    it_http(st, "intake", "GET", "/v1/people/p-9101", hd, NULL, NULL, &r);
    long status = r.status;
    it_resp_clear(&r);
    if (status == 200) break;
    IT_CHECK(cs, it_now_ms() < deadline, "third party p-9101 not in the directory 30 s after "
             "the joiner (last %ld)", status);
    it_sleep_ms(100);
  }
  refused(cs, st, hd, "{\"subject_person_id\":\"p-9101\",\"lines\":[{\"item_id\":\"zoom\","
                      "\"role_id\":\"user\"}]}", 403, "subject_person_id", "screening");
  free(hd);
}

static void c_precedence(it_stack_t *st, it_cases_t *cs) {
  /* 400 body errors first, even for a screened subject. */
  char *listed = it_token("p-0010", "contractor");
  refused(cs, st, listed, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"},{\"item_id\":"
                          "\"no-such-item\",\"role_id\":\"user\"}]}", 400, "lines[1].item_id",
          "unknown_item");
  /* 403 screening before 422: p-0030 (Data, contractor, listed) asks for aws. */
  char *p30 = it_token("p-0030", "contractor");
  refused(cs, st, p30, "{\"reason\":\"look at logs\",\"lines\":[{\"item_id\":\"aws\",\"role_id\":"
                       "\"readonly\"}]}", 403, "subject_person_id", "screening");
  /* 422 before 409: github/write pending and aws not eligible (Finance). */
  char *t = it_token("p-0117", "employee");
  char *id = accepted_id(cs, st, t, "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":"
                                    "\"github\",\"role_id\":\"write\"}]}");
  refused(cs, st, t, "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":\"github\",\"role_id\":"
                     "\"write\"},{\"item_id\":\"aws\",\"role_id\":\"readonly\"}]}", 422,
          "lines[1].item_id", "not_eligible");
  free(id);
  free(t);
  free(p30);
  free(listed);
}

/* Last: restarts intake with QM_INTAKE_WATCHLIST_ACTION=flag. */
static void c_screening_flag(it_stack_t *st, it_cases_t *cs) {
  it_service_setenv(st, "intake", "QM_INTAKE_WATCHLIST_ACTION=flag");
  it_service_restart(st, "intake");
  char *listed = it_token("p-0010", "contractor");
  json_t *ok = accepted(cs, st, listed, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}");
  char *text = it_json_text(ok);
  IT_CHECK(cs, has_flag(ok, "screening_match"), "flag mode: 201 body lacks flags "
           "[\"screening_match\"]: %s", text);
  const char *id = json_string_value(json_object_get(ok, "id"));
  json_t *again = it_case_wait_status(cs, st, listed, id, json_string_value(json_object_get(ok, "status")),
                              5000);
  char *again_text = it_json_text(again);
  IT_CHECK(cs, has_flag(again, "screening_match"), "flag mode: GET lacks the flag: %s", again_text);
  /* Not listed: no flag. */
  char *other = it_token("p-0020", "contractor");
  json_t *plain = accepted(cs, st, other, "{\"lines\":[{\"item_id\":\"slack\",\"role_id\":\"user\"}]}");
  IT_CHECK(cs, !has_flag(plain, "screening_match"), "flag mode: unlisted p-0020 flagged: %s",
           json_dumps(plain, JSON_COMPACT));
  json_decref(plain);
  free(other);
  free(again_text);
  json_decref(again);
  free(text);
  json_decref(ok);
  free(listed);
}

/* ------------------------------------------------------------ who may ask */

static bool list_has(const json_t *items, const char *id) {
  size_t i;
  json_t *r;
  json_array_foreach(items, i, r) {
    const char *rid = json_string_value(json_object_get(r, "id"));
    if (rid && !strcmp(rid, id)) return true;
  }
  return false;
}

static void c_who_may_request(it_stack_t *st, it_cases_t *cs) {
  char *mgr = it_token("p-0002", "employee,manager");
  json_t *ok = accepted(cs, st, mgr, "{\"subject_person_id\":\"p-0013\",\"lines\":[{\"item_id\":"
                                     "\"zoom\",\"role_id\":\"user\"}]}");
  const char *origin = json_string_value(json_object_get(ok, "origin"));
  IT_CHECK(cs, origin && !strcmp(origin, "manager"), "manager for a report: origin '%s'",
           origin ? origin : "(none)");
  char *mgr_req = qm_strdup(json_string_value(json_object_get(ok, "id")));
  json_decref(ok);

  /* Not their report (p-0014 is Sales, under p-0003): 403 forbidden, no field. */
  it_resp_t r;
  post(st, mgr, "{\"subject_person_id\":\"p-0014\",\"lines\":[{\"item_id\":\"zoom\",\"role_id\":"
                "\"user\"}]}", NULL, &r);
  const char *type = json_string_value(json_object_get(r.json, "type"));
  IT_CHECK(cs, r.status == 403 && type && strlen(type) >= 10 &&
               !strcmp(type + strlen(type) - 10, "/forbidden"),
           "manager for someone else's report: expected 403 …/forbidden, got %ld %s", r.status,
           r.body);
  IT_CHECK(cs, problem_error(r.json, "subject_person_id") == NULL,
           "forbidden should not name a field: %s", r.body);
  it_resp_clear(&r);
  /* The manager relation needs the manager role in the token. */
  char *mgr_no_role = it_token("p-0002", "employee");
  post(st, mgr_no_role, "{\"subject_person_id\":\"p-0019\",\"lines\":[{\"item_id\":\"zoom\","
                        "\"role_id\":\"user\"}]}", NULL, &r);
  IT_CHECK(cs, r.status == 403, "report's manager without the manager role: expected 403, got "
           "%ld %s", r.status, r.body);
  it_resp_clear(&r);
  /* A plain employee for a colleague. */
  char *emp = it_token("p-0101", "employee");
  post(st, emp, "{\"subject_person_id\":\"p-0102\",\"lines\":[{\"item_id\":\"zoom\",\"role_id\":"
                "\"user\"}]}", NULL, &r);
  IT_CHECK(cs, r.status == 403, "employee for a colleague: expected 403, got %ld %s", r.status,
           r.body);
  it_resp_clear(&r);

  /* Helpdesk and it_admin for anyone: origin helpdesk. */
  char *hd = it_token("p-0099", "employee,helpdesk");
  ok = accepted(cs, st, hd, "{\"subject_person_id\":\"p-0014\",\"lines\":[{\"item_id\":\"zoom\","
                            "\"role_id\":\"user\"}]}");
  origin = json_string_value(json_object_get(ok, "origin"));
  IT_CHECK(cs, origin && !strcmp(origin, "helpdesk"), "helpdesk: origin '%s'",
           origin ? origin : "(none)");
  char *hd_req = qm_strdup(json_string_value(json_object_get(ok, "id")));
  json_decref(ok);
  char *adm = it_token("p-0098", "employee,it_admin");
  ok = accepted(cs, st, adm, "{\"subject_person_id\":\"p-0019\",\"lines\":[{\"item_id\":"
                             "\"slack\",\"role_id\":\"user\"}]}");
  origin = json_string_value(json_object_get(ok, "origin"));
  IT_CHECK(cs, origin && !strcmp(origin, "helpdesk"), "it_admin: origin '%s'",
           origin ? origin : "(none)");
  json_decref(ok);

  /* ?subject= : the manager and an auditor see; an unrelated employee does not. */
  json_t *items = it_requests_of(st, mgr, "p-0013");
  IT_CHECK(cs, list_has(items, mgr_req), "manager's ?subject=p-0013 lacks %s", mgr_req);
  json_decref(items);
  char *aud = it_token("p-0097", "employee,auditor");
  items = it_requests_of(st, aud, "p-0014");
  IT_CHECK(cs, list_has(items, hd_req), "auditor's ?subject=p-0014 lacks %s", hd_req);
  json_decref(items);
  char *sec = it_token("p-0095", "employee,security");
  items = it_requests_of(st, sec, "p-0014");
  IT_CHECK(cs, list_has(items, hd_req), "security's ?subject=p-0014 lacks %s", hd_req);
  json_decref(items);
  free(sec);
  items = it_requests_of(st, adm, "p-0014");
  IT_CHECK(cs, list_has(items, hd_req), "it_admin's ?subject=p-0014 lacks %s", hd_req);
  json_decref(items);
  char *subj = it_token("p-0014", "employee");
  items = it_requests_of(st, subj, "p-0014");
  IT_CHECK(cs, list_has(items, hd_req), "p-0014's own ?subject= lacks %s", hd_req);
  json_decref(items);
  it_http(st, "intake", "GET", "/v1/requests?subject=p-0013", emp, NULL, NULL, &r);
  IT_CHECK(cs, r.status != 200 || !strstr(r.body, mgr_req),
           "an unrelated employee (p-0101) sees p-0013's requests: %ld %s", r.status, r.body);
  it_resp_clear(&r);

  free(subj);
  free(aud);
  free(adm);
  free(hd_req);
  free(hd);
  free(emp);
  free(mgr_no_role);
  free(mgr_req);
  free(mgr);
}

/* ------------------------------------------------------------ idempotency */

static void c_idempotency(it_stack_t *st, it_cases_t *cs) {
  char *t = it_token("p-0118", "employee");
  char key[80];
  char u[QM_UUID_STR_LEN];
  qm_uuid_new(u);
  snprintf(key, sizeof(key), "Idempotency-Key: it-%s", u);
  const char *headers[] = {key, NULL};
  const char *body = "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}";
  it_resp_t r1, r2, r3;
  post(st, t, body, headers, &r1);
  IT_CHECK(cs, r1.status == 201, "first POST with a key: %ld %s", r1.status, r1.body);
  post(st, t, body, headers, &r2);
  const char *id1 = json_string_value(json_object_get(r1.json, "id"));
  const char *id2 = json_string_value(json_object_get(r2.json, "id"));
  IT_CHECK(cs, r2.status == 200, "retry with the same key and body: expected 200, got %ld %s",
           r2.status, r2.body);
  IT_CHECK(cs, id1 && id2 && !strcmp(id1, id2), "retry answered another request: %s vs %s",
           id1 ? id1 : "(none)", id2 ? id2 : "(none)");
  char replayed[16];
  IT_CHECK(cs, it_resp_header(&r2, "Idempotent-Replayed", replayed, sizeof(replayed)) &&
                   !strcmp(replayed, "true"),
           "retry lacks 'Idempotent-Replayed: true' (got '%s'); headers:\n%s", replayed,
           r2.headers ? r2.headers : "");
  IT_CHECK(cs, !it_resp_header(&r1, "Idempotent-Replayed", replayed, sizeof(replayed)),
           "the first answer says Idempotent-Replayed");
  char *m = metrics_text(cs, st);
  bool found = false;
  double n_replayed = it_metric(m, "qm_intake_requests_total", "outcome=replayed", &found);
  IT_CHECK(cs, found && n_replayed >= 1, "qm_intake_requests_total{outcome=replayed} is %g after "
           "a replay", n_replayed);
  free(m);
  post(st, t, "{\"lines\":[{\"item_id\":\"slack\",\"role_id\":\"user\"}]}", headers, &r3);
  const char *type = json_string_value(json_object_get(r3.json, "type"));
  IT_CHECK(cs, r3.status == 422 && type && strlen(type) >= 23 &&
                   !strcmp(type + strlen(type) - 23, "/idempotency-key-reused"),
           "same key, other body: expected 422 …/idempotency-key-reused, got %ld %s", r3.status,
           r3.body);
  it_resp_t l;
  it_http(st, "intake", "GET", "/v1/requests?mine=true", t, NULL, NULL, &l);
  IT_CHECK(cs, l.status == 200 && json_array_size(json_object_get(l.json, "items")) == 1,
           "after a replay and a reused key the caller should have exactly one request: %ld %s",
           l.status, l.body);
  it_resp_clear(&l);
  it_resp_clear(&r3);
  it_resp_clear(&r2);
  it_resp_clear(&r1);
  free(t);
}

/* ------------------------------------------------------------ nothing written */

static void c_refused_writes_nothing(it_stack_t *st, it_cases_t *cs) {
  checks_ctx_t *cx = cs->ctx;
  char *t = it_token("p-0119", "employee");
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"no-such-item\",\"role_id\":\"user\"}]}", 400,
          "lines[0].item_id", "unknown_item");
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"github\",\"role_id\":\"write\"}]}", 400,
          "reason", "reason_required");
  refused(cs, st, t, "{\"reason\":\"finance work\",\"lines\":[{\"item_id\":\"netsuite\","
                     "\"role_id\":\"user\"}]}", 422, "lines[0].item_id", "not_eligible");
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"laptop-standard\"}]}", 400,
          "lines[0].attributes.keyboard", "attribute_required");
  it_resp_t r;
  it_http(st, "intake", "GET", "/v1/requests?mine=true", t, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200 && json_array_size(json_object_get(r.json, "items")) == 0,
           "refused requests are listed: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  long long rows = it_pg_int(st, "SELECT count(*) FROM intake.requests WHERE subject_id = 'p-0119'");
  IT_CHECK(cs, rows == 0, "intake.requests holds %lld rows for p-0119 after refusals only", rows);
  /* A sentinel on the same key (same partition, so after anything the
   * refusals would have published): exactly one event for p-0119. */
  char *id = accepted_id(cs, st, t, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}");
  json_t *sentinel = json_pack("{s:s, s:s}", "event", "submitted", "request_id", id);
  int seen = it_reader_wait(cx->requests, sentinel, 1, 30000);
  IT_CHECK(cs, seen == 1, "the sentinel's RequestSubmitted did not arrive (seen %d)", seen);
  json_t *by_key = json_pack("{s:s}", "key", "p-0119");
  int n = it_reader_count(cx->requests, by_key);
  IT_CHECK(cs, n == 1, "qm.requests.v1 holds %d events for p-0119; only the sentinel expected", n);
  json_decref(by_key);
  json_decref(sentinel);
  free(id);
  free(t);
}

/* ------------------------------------------------------------ metrics */

static void c_metrics(it_stack_t *st, it_cases_t *cs) {
  char *before = metrics_text(cs, st);
  char *t = it_token("p-0125", "employee");
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"no-such-item\",\"role_id\":\"user\"}]}", 400,
          "lines[0].item_id", "unknown_item");
  refused(cs, st, t, "{\"lines\":[{\"item_id\":\"no-such-item-2\",\"role_id\":\"user\"}]}", 400,
          "lines[0].item_id", "unknown_item");
  refused(cs, st, t, "{\"reason\":\"finance work\",\"lines\":[{\"item_id\":\"netsuite\","
                     "\"role_id\":\"user\"}]}", 422, "lines[0].item_id", "not_eligible");
  char *id = accepted_id(cs, st, t, "{\"lines\":[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}");
  json_decref(it_case_wait_status(cs, st, t, id, "granted", 30000));
  char *after = metrics_text(cs, st);
  static const struct {
    const char *name, *labels;
    double delta;
  } want[] = {
      {"qm_intake_refusals_total", "rule=unknown_item", 2},
      {"qm_intake_refusals_total", "rule=not_eligible", 1},
      {"qm_intake_requests_total", "outcome=refused", 3},
      {"qm_intake_requests_total", "origin=self_service,outcome=accepted", 1},
  };
  for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
    bool found = false;
    double b = it_metric(before, want[i].name, want[i].labels, NULL);
    double a = it_metric(after, want[i].name, want[i].labels, &found);
    IT_CHECK(cs, found, "/metrics has no %s{%s}", want[i].name, want[i].labels);
    IT_CHECK(cs, a - b == want[i].delta, "%s{%s} went from %g to %g, expected +%g", want[i].name,
             want[i].labels, b, a, want[i].delta);
  }
  bool found = false;
  static const char *const hist[] = {"qm_intake_decision_seconds_count",
                                     "qm_intake_completion_seconds_count",
                                     "qm_intake_decision_seconds_bucket",
                                     "qm_intake_completion_seconds_bucket"};
  for (size_t i = 0; i < sizeof(hist) / sizeof(hist[0]); i++) {
    double v = it_metric(after, hist[i], NULL, &found);
    IT_CHECK(cs, found, "/metrics has no %s", hist[i]);
    if (strstr(hist[i], "_count"))
      IT_CHECK(cs, v >= 1, "%s is %g after granted requests", hist[i], v);
  }
  free(after);
  free(id);
  free(t);
  free(before);
}

/* ------------------------------------------------------------ the test */

Test(intake_checks, submit_policy, .fini = it_fini, .timeout = 600) {
  static const struct {
    const char *id, *dept, *country, *type, *manager;
  } seed[] = {
      {"p-0010", "Support", "FR", "contractor", "p-0005"},
      {"p-0011", "Security", "NL", "employee", "p-0006"},
      {"p-0013", "Engineering", "US", "employee", "p-0002"},
      {"p-0014", "Sales", "GB", "employee", "p-0003"},
      {"p-0019", "Engineering", "GB", "employee", "p-0002"},
      {"p-0020", "Sales", "FR", "contractor", "p-0003"},
      {"p-0030", "Data", "FR", "contractor", "p-0007"},
      {"p-0103", "Engineering", "US", "employee", "p-0002"},
      {"p-0105", "Finance", "FR", "employee", "p-0004"},
      {"p-0106", "Support", "NL", "employee", "p-0005"},
      {"p-0110", "Sales", "FR", "contractor", "p-0003"},
      {"p-0112", "Support", "DE", "employee", "p-0005"},
      {"p-0116", "Sales", "NL", "employee", "p-0003"},
      {"p-0117", "Finance", "DE", "employee", "p-0004"},
  };
  for (size_t i = 0; i < sizeof(seed) / sizeof(seed[0]); i++)
    seed_is(seed[i].id, seed[i].dept, seed[i].country, seed[i].type, seed[i].manager);
  json_t *acc = it_seed_person("p-0105");
  cr_assert_str_eq(json_string_value(json_object_get(acc, "job_function")), "Accountant");
  json_decref(acc);

  char *cat_dir = it_dir_copy_yaml(QM_SOURCE_DIR "/deploy/local/catalog", "checks-catalog");
  it_file_write(cat_dir, "zz-it-checks.yaml", checks_catalog);
  it_file_write(cat_dir, "watchlist.csv", checks_watchlist);
  char *cat_env = qm_asprintf("QM_INTAKE_CATALOG_DIR=%s", cat_dir);
  char *watch_env = qm_asprintf("QM_INTAKE_WATCHLIST_FILE=%s/watchlist.csv", cat_dir);
  const it_svc_env_t env[] = {{"intake", cat_env},
                              {"intake", watch_env},
                              {"intake", "QM_INTAKE_WATCHLIST_ACTION=refuse"},
                              {NULL, NULL}};
  it_stack_t *st = it_stack_up_env("intake-checks", NULL, env);

  checks_ctx_t cx = {.requests = it_reader_open(st, QM_TOPIC_REQUESTS)};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "unknown_item", c_unknown_item);
  it_case_run(&cs, st, "unknown_role", c_unknown_role);
  it_case_run(&cs, st, "duration", c_duration);
  it_case_run(&cs, st, "reason", c_reason);
  it_case_run(&cs, st, "attestation", c_attestation);
  it_case_run(&cs, st, "attributes", c_attributes);
  it_case_run(&cs, st, "unknown_person", c_unknown_person);
  it_case_run(&cs, st, "not_eligible", c_not_eligible);
  it_case_run(&cs, st, "unavailable_in_country", c_country);
  it_case_run(&cs, st, "already_held", c_already_held);
  it_case_run(&cs, st, "already_pending", c_already_pending);
  it_case_run(&cs, st, "no_seat", c_no_seat);
  it_case_run(&cs, st, "screening_refuse", c_screening_refuse);
  it_case_run(&cs, st, "screening_third_party", c_screening_third_party);
  it_case_run(&cs, st, "precedence", c_precedence);
  it_case_run(&cs, st, "who_may_request", c_who_may_request);
  it_case_run(&cs, st, "idempotency", c_idempotency);
  it_case_run(&cs, st, "refused_writes_nothing", c_refused_writes_nothing);
  it_case_run(&cs, st, "metrics", c_metrics);
  it_case_run(&cs, st, "screening_flag", c_screening_flag);
  bool all = it_cases_report(&cs, "intake_checks");

  it_reader_close(cx.requests);
  free(watch_env);
  free(cat_env);
  if (all) {
    it_stack_down(st);
    it_dir_remove(cat_dir);
  }
  free(cat_dir);
}
