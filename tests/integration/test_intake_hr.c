/*
 * test_intake_hr: intake's HR lifecycle handling (issue 3) against the real
 * stack. HR events are published on qm.hr.lifecycle.v1 as an HR system would
 * (qm.v1.HrEvent, key = person id, CloudEvents qm.hr.<kind>.v1), and what
 * intake makes of them is read back from its API and from qm.requests.v1:
 *
 *   joiner today     the person is in the directory; the department's bundle
 *                    is requested (origin birthright) and granted; the
 *                    privileged bundle item (aws/readonly) is a separate
 *                    request (origin birthright_review) waiting for approval
 *   joiner tomorrow  scheduled, no request yet
 *   mover            RevocationRequested (reason mover) for each old-bundle
 *                    item the new bundle lacks; a birthright request for
 *                    what the new bundle adds
 *   leaver           pending requests cancelled (RequestCancelled, reason
 *                    leaver); status terminated; new requests refused
 *                    (subject_left)
 *   duplicate        the same (source, id, effective date) twice files one
 *                    birthright request
 *   late             an older-dated change after a newer one is ignored
 *
 * Ordering barriers use the Kafka key: every event about one person is on
 * one partition, so when a later event about them is visible, the earlier
 * one was handled.
 *
 * One stack for the whole file (Criterion runs each Test in its own process,
 * so the cases run inside one Test; a failing case does not stop the others).
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct hr_ctx {
  it_reader_t *requests; /* qm.requests.v1 from the start */
  char *helpdesk;        /* token: p-0099 helpdesk */
  char today[16], tomorrow[16];
  char joiner_request[64]; /* p-9001's birthright request, for joiner_granted */
} hr_ctx_t;

/* ------------------------------------------------------------ helpers */

/* A new Engineering employee in NL reporting to p-0002. */
static it_hr_person_t new_engineer(const char *id, const char *name) {
  it_hr_person_t p = {.id = id, .name = name, .manager_id = "p-0002", .department = "Engineering",
                      .job_function = "Software Engineer", .country = "NL", .location = "NL-HQ",
                      .employment_type = "employee", .status = "active",
                      .start_date = "2026-01-01"};
  return p;
}

/* GET /v1/people/{id} as the token's holder. Caller clears r. */
static long get_person(it_stack_t *st, const char *token, const char *id, it_resp_t *r) {
  char path[160];
  snprintf(path, sizeof(path), "/v1/people/%s", id);
  return it_http(st, "intake", "GET", path, token, NULL, NULL, r);
}

/* Waits until GET /v1/people/{id} answers 200 with field == want. Returns
 * the record (caller frees with json_decref()); ends the case otherwise. */
static json_t *wait_person(it_cases_t *cs, it_stack_t *st, const char *token, const char *id,
                           const char *field, const char *want, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  it_resp_t r = {0};
  for (;;) {
    it_resp_clear(&r);
    get_person(st, token, id, &r);
    const char *v = json_string_value(json_object_get(r.json, field));
    if (r.status == 200 && v && !strcmp(v, want)) break;
    IT_CHECK(cs, it_now_ms() < deadline,
             "GET /v1/people/%s: %s did not become '%s' within %d ms; last %ld %s", id, field,
             want, timeout_ms, r.status, r.body);
    it_sleep_ms(50);
  }
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

/* The subject's requests with this origin (a new array; caller frees). */
static json_t *requests_with_origin(it_stack_t *st, const char *token, const char *subject,
                                    const char *origin) {
  json_t *all = it_requests_of(st, token, subject);
  json_t *out = json_array();
  size_t i;
  json_t *r;
  json_array_foreach(all, i, r) {
    const char *o = json_string_value(json_object_get(r, "origin"));
    if (o && !strcmp(o, origin)) json_array_append(out, r);
  }
  json_decref(all);
  return out;
}

/* Waits until the subject has at least one request of this origin; returns
 * the newest (caller frees with json_decref()). */
static json_t *wait_request_with_origin(it_cases_t *cs, it_stack_t *st, const char *token,
                                        const char *subject, const char *origin,
                                        int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    json_t *list = requests_with_origin(st, token, subject, origin);
    if (json_array_size(list) > 0) {
      json_t *r = json_incref(json_array_get(list, 0));
      json_decref(list);
      return r;
    }
    json_decref(list);
    if (it_now_ms() >= deadline) {
      json_t *all = it_requests_of(st, token, subject);
      char *text = it_json_text(all);
      IT_CHECK(cs, false, "no request with origin %s for %s within %d ms; their requests: %s",
               origin, subject, timeout_ms, text);
    }
    it_sleep_ms(100);
  }
}

/* "item/role" of each line, sorted and comma-joined, e.g. "github/read,slack/user". */
static char *line_set(const json_t *req) {
  char *v[32];
  size_t n = 0;
  size_t i;
  json_t *l;
  json_array_foreach(json_object_get(req, "lines"), i, l) {
    if (n == 32) break;
    v[n++] = qm_asprintf("%s/%s", json_string_value(json_object_get(l, "item_id")),
                         json_string_value(json_object_get(l, "role_id")));
  }
  for (size_t a = 0; a < n; a++)
    for (size_t b = a + 1; b < n; b++)
      if (strcmp(v[a], v[b]) > 0) {
        char *t = v[a];
        v[a] = v[b];
        v[b] = t;
      }
  char buf[1024] = "";
  size_t len = 0;
  for (size_t a = 0; a < n; a++) {
    int w = snprintf(buf + len, sizeof(buf) - len, "%s%s", a ? "," : "", v[a]);
    if (w > 0 && (size_t)w < sizeof(buf) - len) len += (size_t)w;
    free(v[a]);
  }
  return qm_strdup(buf);
}

static bool all_lines(const json_t *req, const char *status) {
  size_t i;
  json_t *l;
  if (json_array_size(json_object_get(req, "lines")) == 0) return false;
  json_array_foreach(json_object_get(req, "lines"), i, l) {
    const char *s = json_string_value(json_object_get(l, "status"));
    if (!s || strcmp(s, status)) return false;
  }
  return true;
}

/* The bundle request of a joiner is there with exactly want_lines. Returns
 * its id (caller frees). */
static char *expect_birthright(it_cases_t *cs, it_stack_t *st, const char *token,
                               const char *subject, const char *want_lines) {
  json_t *br = wait_request_with_origin(cs, st, token, subject, "birthright", 30000);
  char *set = line_set(br);
  char *text = it_json_text(br);
  IT_CHECK(cs, !strcmp(set, want_lines), "birthright request for %s has lines %s, expected %s: %s",
           subject, set, want_lines, text);
  char *id = qm_strdup(json_string_value(json_object_get(br, "id")));
  free(text);
  free(set);
  json_decref(br);
  return id;
}

/* The request gets granted, every line of it. */
static void expect_granted(it_cases_t *cs, it_stack_t *st, const char *token, const char *id) {
  json_t *done = it_case_wait_status(cs, st, token, id, "granted", 30000);
  char *done_text = it_json_text(done);
  IT_CHECK(cs, all_lines(done, "granted"), "request %s granted but not every line: %s", id,
           done_text);
  free(done_text);
  json_decref(done);
}

/* A seed person as an HR record (pointers into seed: valid while it lives). */
static it_hr_person_t seed_hr_person(const json_t *seed) {
#define SEED_FIELD(f) json_string_value(json_object_get(seed, f))
  it_hr_person_t p = {.id = SEED_FIELD("id"), .name = SEED_FIELD("name"),
                      .email = SEED_FIELD("email"), .manager_id = SEED_FIELD("manager_id"),
                      .department = SEED_FIELD("department"),
                      .job_function = SEED_FIELD("job_function"), .country = SEED_FIELD("country"),
                      .location = SEED_FIELD("location"),
                      .employment_type = SEED_FIELD("employment_type"),
                      .status = SEED_FIELD("status"), .start_date = SEED_FIELD("start_date"),
                      .directory_username = SEED_FIELD("directory_username")};
#undef SEED_FIELD
  return p;
}

/* The directory learns of a joiner from HR on its own (Workday → Okta,
 * HiBob → Entra): Quartermaster adds memberships, it does not create
 * accounts. This plays that sync on the private SCIM peer. */
static size_t discard(char *p, size_t sz, size_t n, void *ud) {
  (void)p;
  (void)ud;
  return sz * n;
}

static long scim_create_user(it_stack_t *st, const char *user_name) {
  char url[128], body[256];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/scim/v2/Users", it_stack_scim_port(st));
  snprintf(body, sizeof(body),
           "{\"schemas\":[\"urn:ietf:params:scim:schemas:core:2.0:User\"],"
           "\"userName\":\"%s\",\"displayName\":\"%s\"}", user_name, user_name);
  CURL *c = curl_easy_init();
  struct curl_slist *h = curl_slist_append(NULL, "Authorization: Bearer dev-scim-token");
  h = curl_slist_append(h, "Content-Type: application/scim+json");
  curl_easy_setopt(c, CURLOPT_URL, url);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
  curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
  long code = 0;
  if (curl_easy_perform(c) == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
  curl_slist_free_all(h);
  curl_easy_cleanup(c);
  return code;
}

/* ------------------------------------------------------------ cases */

static void c_joiner_today(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  long created = scim_create_user(st, "p-9001");
  IT_CHECK(cs, created == 201, "creating p-9001 on the SCIM peer (the HR-to-IdP sync): HTTP %ld",
           created);
  it_hr_event_t ev = {.kind = "joiner", .effective_date = cx->today,
                      .person = new_engineer("p-9001", "Person 9001")};
  it_hr_publish(st, &ev);
  json_t *p = wait_person(cs, st, cx->helpdesk, "p-9001", "status", "active", 30000);
  char *ptext = it_json_text(p);
  static const char *const want[][2] = {{"id", "p-9001"},          {"department", "Engineering"},
                                        {"manager_id", "p-0002"},   {"country", "NL"},
                                        {"employment_type", "employee"}, {"name", "Person 9001"}};
  for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
    const char *v = json_string_value(json_object_get(p, want[i][0]));
    IT_CHECK(cs, v && !strcmp(v, want[i][1]), "p-9001.%s is '%s', expected '%s': %s", want[i][0],
             v ? v : "(none)", want[i][1], ptext);
  }
  const char *eff = json_string_value(json_object_get(p, "effective_date"));
  IT_CHECK(cs, eff && !strcmp(eff, cx->today), "p-9001.effective_date '%s', expected %s: %s",
           eff ? eff : "(none)", cx->today, ptext);
  IT_CHECK(cs, json_is_array(json_object_get(p, "scheduled")) &&
                   json_array_size(json_object_get(p, "scheduled")) == 0,
           "p-9001 has scheduled changes after a joiner effective today: %s", ptext);

  /* Who may read the record: the person and their manager; not a colleague. */
  char *self = it_token("p-9001", "employee");
  char *mgr = it_token("p-0002", "employee,manager");
  char *other = it_token("p-0101", "employee");
  it_resp_t r;
  get_person(st, self, "p-9001", &r);
  IT_CHECK(cs, r.status == 200, "p-9001 reading themselves: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  get_person(st, mgr, "p-9001", &r);
  IT_CHECK(cs, r.status == 200, "manager p-0002 reading p-9001: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  get_person(st, other, "p-9001", &r);
  IT_CHECK(cs, r.status == 403 || r.status == 404,
           "unrelated p-0101 reading p-9001: expected 403/404, got %ld %s", r.status, r.body);
  it_resp_clear(&r);
  get_person(st, cx->helpdesk, "p-9999", &r);
  IT_CHECK(cs, r.status == 404 && !strncmp(r.content_type, "application/problem+json", 24),
           "unknown person: expected a 404 problem, got %ld %s", r.status, r.body);
  it_resp_clear(&r);

  /* The bundle: standard items as one birthright request. */
  char *id = expect_birthright(cs, st, cx->helpdesk, "p-9001",
                               "confluence/user,github/read,jira/user,slack/user");
  /* The privileged item: its own request, waiting for approval. */
  json_t *rv = wait_request_with_origin(cs, st, cx->helpdesk, "p-9001", "birthright_review", 30000);
  char *rv_set = line_set(rv);
  char *rv_text = it_json_text(rv);
  IT_CHECK(cs, !strcmp(rv_set, "aws/readonly"), "birthright_review request has lines %s: %s",
           rv_set, rv_text);
  json_t *rv_now = it_case_wait_status(cs, st, cx->helpdesk, json_string_value(json_object_get(rv, "id")),
                               "pending_approval", 15000);
  json_decref(rv_now);
  /* Exactly those two requests. */
  json_t *all = it_requests_of(st, cx->helpdesk, "p-9001");
  char *all_text = it_json_text(all);
  IT_CHECK(cs, json_array_size(all) == 2, "p-9001 should have 2 requests, has %zu: %s",
           json_array_size(all), all_text);
  /* Approved automatically as birthright: one approval per line. */
  qm_strlcpy(cx->joiner_request, id, sizeof(cx->joiner_request));
  char path[128];
  snprintf(path, sizeof(path), "/v1/requests/%s", id);
  int64_t deadline = it_now_ms() + 30000;
  for (;;) {
    it_http(st, "intake", "GET", path, cx->helpdesk, NULL, NULL, &r);
    int approved = 0;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(r.json, "timeline"), i, e) {
      const char *type = json_string_value(json_object_get(e, "type"));
      if (type && !strcmp(type, "qm.request.approved.v1")) approved++;
    }
    if (approved >= 4) {
      it_resp_clear(&r);
      break;
    }
    IT_CHECK(cs, it_now_ms() < deadline, "birthright request %s: %d of 4 lines approved after "
             "30 s: %s", id, approved, r.body);
    it_resp_clear(&r);
    it_sleep_ms(100);
  }
  free(all_text);
  json_decref(all);
  free(rv_text);
  free(rv_set);
  json_decref(rv);
  free(id);
  free(other);
  free(mgr);
  free(self);
  free(ptext);
  json_decref(p);
}

/* The rest of "joiner today": the birthright request ends granted, and the
 * identity provider holds the memberships. */
static void c_joiner_granted(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  IT_CHECK(cs, cx->joiner_request[0], "joiner_today did not get as far as the birthright request");
  expect_granted(cs, st, cx->helpdesk, cx->joiner_request);
  static const char *const groups[] = {"app-slack-user", "app-github-read", "app-jira-user",
                                       "app-confluence-user"};
  for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) {
    json_t *m = it_scim_members(st, groups[i]);
    char *mt = it_json_text(m);
    IT_CHECK(cs, json_object_get(m, "p-9001") != NULL, "%s on the SCIM peer lacks p-9001: %s",
             groups[i], mt);
    free(mt);
    json_decref(m);
  }
}

static void c_joiner_tomorrow(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  char eid[64];
  char u[QM_UUID_STR_LEN];
  qm_uuid_new(u);
  snprintf(eid, sizeof(eid), "future-%s", u);
  it_hr_event_t ev = {.kind = "joiner", .source_event_id = eid, .effective_date = cx->tomorrow,
                      .person = new_engineer("p-9002", "Person 9002")};
  it_hr_publish(st, &ev);
  /* Handled once intake's dedupe table has the event (a 404 alone cannot
   * tell "handled" from "not yet"). */
  char sql[256];
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM intake.hr_events_seen WHERE source_event_id = '%s'", eid);
  int64_t deadline = it_now_ms() + 30000;
  while (it_pg_int(st, sql) == 0) {
    IT_CHECK(cs, it_now_ms() < deadline, "the joiner dated %s was not handled in 30 s",
             cx->tomorrow);
    it_sleep_ms(100);
  }
  it_resp_t r;
  get_person(st, cx->helpdesk, "p-9002", &r);
  fprintf(stderr, "[it intake_hr] joiner tomorrow: GET /v1/people/p-9002 -> %ld %s\n", r.status,
          r.body);
  IT_CHECK(cs, r.status == 200 || r.status == 404,
           "GET /v1/people/p-9002 (joiner tomorrow): expected 200 with scheduled or 404, got "
           "%ld %s", r.status, r.body);
  if (r.status == 200) {
    bool scheduled = false;
    size_t i;
    json_t *s;
    json_array_foreach(json_object_get(r.json, "scheduled"), i, s) {
      const char *k = json_string_value(json_object_get(s, "kind"));
      const char *d = json_string_value(json_object_get(s, "effective_date"));
      scheduled = scheduled || (k && d && !strcmp(k, "joiner") && !strcmp(d, cx->tomorrow));
    }
    IT_CHECK(cs, scheduled, "p-9002 lacks scheduled [{joiner, %s}]: %s", cx->tomorrow, r.body);
    const char *status = json_string_value(json_object_get(r.json, "status"));
    IT_CHECK(cs, !status || strcmp(status, "active"),
             "a joiner dated tomorrow is already active: %s", r.body);
  }
  it_resp_clear(&r);
  it_sleep_ms(1000);
  it_http(st, "intake", "GET", "/v1/requests?subject=p-9002&limit=200", cx->helpdesk, NULL, NULL,
          &r);
  IT_CHECK(cs, (r.status == 200 && json_array_size(json_object_get(r.json, "items")) == 0) ||
                   r.status == 404,
           "a joiner dated tomorrow has requests already: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  json_t *pat = json_pack("{s:s}", "key", "p-9002");
  it_reader_poll(cx->requests, 200);
  int n = it_reader_count(cx->requests, pat);
  IT_CHECK(cs, n == 0, "qm.requests.v1 has %d event(s) for p-9002 (joins tomorrow)", n);
  json_decref(pat);
}

static void c_mover(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  /* p-0031 (seed: Engineering, NL, under p-0002, on the SCIM peer) holds
   * the Engineering bundle, asked for themselves, before the move. */
  json_t *seed = it_seed_person("p-0031");
  IT_CHECK(cs, seed && !strcmp(json_string_value(json_object_get(seed, "department")),
                               "Engineering"), "seed changed: p-0031 is not in Engineering");
  char *self = it_token("p-0031", "employee");
  it_resp_t sub;
  it_http(st, "intake", "POST", "/v1/requests", self,
          "{\"reason\":\"my team's tools\",\"lines\":[{\"item_id\":\"slack\",\"role_id\":"
          "\"user\"},{\"item_id\":\"github\",\"role_id\":\"read\"},{\"item_id\":\"jira\","
          "\"role_id\":\"user\"},{\"item_id\":\"confluence\",\"role_id\":\"user\"}]}",
          NULL, &sub);
  const char *sub_id = json_string_value(json_object_get(sub.json, "id"));
  IT_CHECK(cs, sub.status == 201 && sub_id, "p-0031 asking for the Engineering bundle: %ld %s",
           sub.status, sub.body);
  char *first = qm_strdup(sub_id);
  it_resp_clear(&sub);
  expect_granted(cs, st, self, first);
  it_hr_event_t move = {.kind = "mover", .effective_date = cx->today,
                        .previous_department = "Engineering",
                        .previous_job_function = "Software Engineer",
                        .person = seed_hr_person(seed)};
  move.person.department = "Sales";
  move.person.job_function = "Account Executive";
  move.person.manager_id = "p-0003";
  it_hr_publish(st, &move);
  json_t *p = wait_person(cs, st, cx->helpdesk, "p-0031", "department", "Sales", 30000);
  json_decref(p);

  /* Revocations for what the old bundle had and the new one lacks. */
  static const char *const gone[][2] = {{"github", "read"}, {"jira", "user"},
                                        {"confluence", "user"}};
  for (size_t i = 0; i < 3; i++) {
    json_t *pat = json_pack("{s:s, s:s, s:s, s:s, s:s}", "event", "revocation_requested",
                            "subject_person_id", "p-0031", "item_id", gone[i][0], "role_id",
                            gone[i][1], "reason", "mover");
    int n = it_reader_wait(cx->requests, pat, 1, 30000);
    char *all = it_json_text(it_reader_events(cx->requests));
    IT_CHECK(cs, n == 1, "RevocationRequested(mover) for p-0031 %s/%s seen %d times; events: %.3000s",
             gone[i][0], gone[i][1], n, all);
    free(all);
    json_decref(pat);
  }
  /* A new birthright request for what the new bundle adds. */
  int64_t deadline = it_now_ms() + 30000;
  json_t *fresh = NULL;
  for (;;) {
    json_t *list = requests_with_origin(st, cx->helpdesk, "p-0031", "birthright");
    size_t i;
    json_t *r;
    json_array_foreach(list, i, r) {
      const char *rid = json_string_value(json_object_get(r, "id"));
      if (rid && strcmp(rid, first)) fresh = json_incref(r);
    }
    json_decref(list);
    if (fresh) break;
    IT_CHECK(cs, it_now_ms() < deadline, "no second birthright request for p-0031 after the move");
    it_sleep_ms(100);
  }
  char *set = line_set(fresh);
  char *text = it_json_text(fresh);
  IT_CHECK(cs, !strcmp(set, "zoom/user"), "mover's birthright request has lines %s, expected "
           "zoom/user: %s", set, text);
  json_decref(it_case_wait_status(cs, st, cx->helpdesk, json_string_value(json_object_get(fresh, "id")),
                          "granted", 30000));
  /* slack/user is in both bundles: neither revoked nor requested again. */
  it_reader_poll(cx->requests, 500);
  json_t *slack = json_pack("{s:s, s:s, s:s}", "event", "revocation_requested",
                            "subject_person_id", "p-0031", "item_id", "slack");
  IT_CHECK(cs, it_reader_count(cx->requests, slack) == 0,
           "slack (in both bundles) was asked back from p-0031");
  json_decref(slack);
  free(text);
  free(set);
  json_decref(fresh);
  free(first);
  free(self);
  json_decref(seed);
}

/* That provisioning carries a mover's revocations out in the identity
 * provider is provisioning's part (issue 5), tested there; intake's part, the
 * RevocationRequested events, is checked in c_mover. */

static void c_leaver(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  /* p-0019: Engineering, GB, reports to p-0002 (seed). */
  char *self = it_token("p-0019", "employee");
  it_resp_t sub;
  it_http(st, "intake", "POST", "/v1/requests", self,
          "{\"reason\":\"code reviews\",\"lines\":[{\"item_id\":\"github\",\"role_id\":"
          "\"write\"}]}", NULL, &sub);
  const char *sub_id = json_string_value(json_object_get(sub.json, "id"));
  IT_CHECK(cs, sub.status == 201 && sub_id, "p-0019 asking for github/write: %ld %s", sub.status,
           sub.body);
  char *id = qm_strdup(sub_id);
  it_resp_clear(&sub);
  json_decref(it_case_wait_status(cs, st, self, id, "pending_approval", 15000));
  it_hr_person_t p = {.id = "p-0019", .name = "Person 0019", .email = "p-0019@example.com",
                      .manager_id = "p-0002", .department = "Engineering",
                      .job_function = "Software Engineer", .country = "GB", .location = "GB-HQ",
                      .employment_type = "employee", .status = "terminated",
                      .start_date = "2024-01-20", .end_date = cx->today,
                      .directory_username = "p-0019"};
  it_hr_event_t ev = {.kind = "leaver", .effective_date = cx->today, .person = p};
  it_hr_publish(st, &ev);
  json_t *rec = wait_person(cs, st, cx->helpdesk, "p-0019", "status", "terminated", 30000);
  json_decref(rec);
  json_t *req = it_case_wait_status(cs, st, cx->helpdesk, id, "cancelled", 30000);
  char *text = it_json_text(req);
  IT_CHECK(cs, all_lines(req, "cancelled"), "leaver's pending request: not every line cancelled: %s",
           text);
  json_t *pat = json_pack("{s:s, s:s, s:s}", "event", "cancelled", "request_id", id, "reason",
                          "leaver");
  int n = it_reader_wait(cx->requests, pat, 1, 30000);
  IT_CHECK(cs, n == 1, "RequestCancelled(leaver) for %s seen %d times", id, n);
  json_decref(pat);
  /* Nothing new for someone who has left. */
  it_resp_t r;
  it_http(st, "intake", "POST", "/v1/requests", cx->helpdesk,
          "{\"subject_person_id\":\"p-0019\",\"lines\":[{\"item_id\":\"zoom\",\"role_id\":"
          "\"user\"}]}", NULL, &r);
  const json_t *e = NULL;
  size_t i;
  json_t *x;
  json_array_foreach(json_object_get(r.json, "errors"), i, x) {
    const char *f = json_string_value(json_object_get(x, "field"));
    if (f && !strcmp(f, "subject_person_id")) e = x;
  }
  const char *rule = json_string_value(json_object_get(e, "rule"));
  IT_CHECK(cs, r.status == 422 && rule && !strcmp(rule, "subject_left"),
           "request for a leaver: expected 422 subject_person_id/subject_left, got %ld %s",
           r.status, r.body);
  it_resp_clear(&r);
  free(text);
  json_decref(req);
  free(id);
  free(self);
}

static void c_duplicate(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  char eid[64];
  char u[QM_UUID_STR_LEN];
  qm_uuid_new(u);
  snprintf(eid, sizeof(eid), "dup-%s", u);
  it_hr_event_t ev = {.kind = "joiner", .source = "workday", .source_event_id = eid,
                      .effective_date = cx->today,
                      .person = new_engineer("p-9004", "Person 9004")};
  it_hr_publish(st, &ev);
  it_hr_publish(st, &ev);
  /* Barrier: a later change about the same person (same partition). */
  it_hr_event_t upd = ev;
  upd.kind = "updated";
  upd.source_event_id = NULL;
  upd.person.name = "Person 9004 Renamed";
  it_hr_publish(st, &upd);
  json_decref(wait_person(cs, st, cx->helpdesk, "p-9004", "name", "Person 9004 Renamed", 30000));
  json_t *br = requests_with_origin(st, cx->helpdesk, "p-9004", "birthright");
  json_t *rv = requests_with_origin(st, cx->helpdesk, "p-9004", "birthright_review");
  char *brt = it_json_text(br), *rvt = it_json_text(rv);
  IT_CHECK(cs, json_array_size(br) == 1, "duplicate joiner: %zu birthright requests: %s",
           json_array_size(br), brt);
  IT_CHECK(cs, json_array_size(rv) == 1, "duplicate joiner: %zu birthright_review requests: %s",
           json_array_size(rv), rvt);
  json_t *pat = json_pack("{s:s, s:s, s:s}", "event", "submitted", "subject_person_id", "p-9004",
                          "origin", "birthright");
  it_reader_poll(cx->requests, 500);
  int n = it_reader_wait(cx->requests, pat, 2, 2000);
  IT_CHECK(cs, n == 1, "duplicate joiner: %d RequestSubmitted(birthright) for p-9004", n);
  json_decref(pat);
  free(rvt);
  free(brt);
  json_decref(rv);
  json_decref(br);
}

static void c_late(it_stack_t *st, it_cases_t *cs) {
  hr_ctx_t *cx = cs->ctx;
  char d10[16], d5[16], d3[16];
  it_date(-10, d10, sizeof(d10));
  it_date(-5, d5, sizeof(d5));
  it_date(-3, d3, sizeof(d3));
  it_hr_event_t join = {.kind = "joiner", .effective_date = d10,
                        .person = new_engineer("p-9005", "Person 9005")};
  it_hr_publish(st, &join);
  it_hr_event_t move = join;
  move.kind = "mover";
  move.effective_date = d3;
  move.previous_department = "Engineering";
  move.person.department = "Sales";
  move.person.manager_id = "p-0003";
  it_hr_publish(st, &move);
  json_decref(wait_person(cs, st, cx->helpdesk, "p-9005", "department", "Sales", 30000));
  /* Late: dated before the move, arrives after it. */
  it_hr_event_t late = join;
  late.kind = "updated";
  late.effective_date = d5;
  late.person.department = "Finance";
  late.person.manager_id = "p-0004";
  late.person.name = "Person 9005 Late";
  it_hr_publish(st, &late);
  /* Barrier: a change dated like the move (applies), same partition. */
  it_hr_event_t mark = move;
  mark.kind = "updated";
  mark.previous_department = NULL;
  mark.person.name = "Person 9005 Marked";
  it_hr_publish(st, &mark);
  json_t *p = wait_person(cs, st, cx->helpdesk, "p-9005", "name", "Person 9005 Marked", 30000);
  char *text = it_json_text(p);
  const char *dept = json_string_value(json_object_get(p, "department"));
  IT_CHECK(cs, dept && !strcmp(dept, "Sales"), "late update applied: p-9005 is in '%s': %s",
           dept ? dept : "(none)", text);
  const char *eff = json_string_value(json_object_get(p, "effective_date"));
  IT_CHECK(cs, eff && !strcmp(eff, d3), "p-9005 effective_date '%s', expected %s", eff ? eff : "",
           d3);
  /* The late Finance record filed nothing (no Finance bundle request). */
  json_t *all = it_requests_of(st, cx->helpdesk, "p-9005");
  size_t i;
  json_t *r;
  json_array_foreach(all, i, r) {
    const char *reason = json_string_value(json_object_get(r, "reason"));
    IT_CHECK(cs, !reason || !strstr(reason, "Finance"),
             "a request was filed for the ignored Finance change: %s", json_dumps(r, JSON_COMPACT));
  }
  json_decref(all);
  free(text);
  json_decref(p);
}

/* ------------------------------------------------------------ the test */

Test(intake_hr, lifecycle, .fini = it_fini, .timeout = 600) {
  json_t *p19 = it_seed_person("p-0019");
  cr_assert(p19 && !strcmp(json_string_value(json_object_get(p19, "department")), "Engineering") &&
                !strcmp(json_string_value(json_object_get(p19, "manager_id")), "p-0002"),
            "seed changed: p-0019 should be in Engineering under p-0002");
  json_decref(p19);
  it_stack_t *st = it_stack_up("intake-hr");
  hr_ctx_t cx = {.requests = it_reader_open(st, QM_TOPIC_REQUESTS),
                 .helpdesk = it_token("p-0099", "employee,helpdesk")};
  it_date(0, cx.today, sizeof(cx.today));
  it_date(1, cx.tomorrow, sizeof(cx.tomorrow));
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "joiner_today", c_joiner_today);
  it_case_run(&cs, st, "joiner_tomorrow", c_joiner_tomorrow);
  it_case_run(&cs, st, "mover", c_mover);
  it_case_run(&cs, st, "leaver", c_leaver);
  it_case_run(&cs, st, "duplicate", c_duplicate);
  it_case_run(&cs, st, "late", c_late);
  /* Last, as it waits on provisioning (the identity provider). */
  it_case_run(&cs, st, "joiner_granted", c_joiner_granted);
  bool all = it_cases_report(&cs, "intake_hr");
  it_reader_close(cx.requests);
  free(cx.helpdesk);
  if (all) it_stack_down(st);
}
