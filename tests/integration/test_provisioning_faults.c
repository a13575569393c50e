/*
 * test_provisioning_faults: qm-provisioning against a SCIM peer that fails
 * the ways real directories do — 500s, 429 with Retry-After, a request that
 * hangs past the client's timeout, the server going down and coming back,
 * a failure long enough that the operation is parked and an operator
 * retries it through the API, and the process killed with -9 mid-way. Grants and revocations are sent throughout;
 * at the end every approved grant must have been applied exactly once (one
 * AccessGranted each, a member of its group), every revoked one removed
 * (one AccessRevoked each), and nobody else touched.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GRANTS 64

typedef struct sent {
  char request_id[QM_UUID_STR_LEN];
  char person[16];
  const char *group;
  bool revoked;
} sent_t;

typedef struct ctx {
  it_reader_t *access;
  char *admin;
  sent_t sent[MAX_GRANTS];
  int n_sent;
  int next_person;
} ctx_t;

#define T_EVENT 60000

static sent_t *grant(it_stack_t *st, ctx_t *c, const char *group) {
  sent_t *s = &c->sent[c->n_sent++];
  qm_uuid_new(s->request_id);
  snprintf(s->person, sizeof(s->person), "p-%04d", 100 + c->next_person++);
  s->group = group;
  it_approved_t a = {.request_id = s->request_id, .person_id = s->person, .item_id = group,
                     .role_id = "user", .group = group};
  it_publish_approved(st, &a);
  return s;
}

static int count(ctx_t *c, const char *event, const char *request_id) {
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"%s\",\"request_id\":\"%s\"}", event, request_id);
  json_t *p = json_loads(pat, 0, NULL);
  int n = it_reader_count(c->access, p);
  json_decref(p);
  return n;
}

static bool wait_event(ctx_t *c, const char *event, const char *request_id, int timeout_ms) {
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"%s\",\"request_id\":\"%s\"}", event, request_id);
  json_t *p = json_loads(pat, 0, NULL);
  int n = it_reader_wait(c->access, p, 1, timeout_ms);
  json_decref(p);
  return n >= 1;
}

static long long injected(it_stack_t *st) {
  json_t *f = it_scim_fault(st, NULL);
  long long n = json_integer_value(json_object_get(f, "injected"));
  json_decref(f);
  return n;
}

static void c_500(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  json_decref(it_scim_fault(st, "{\"mode\":\"status\",\"status\":500,\"count\":8,\"methods\":[\"PATCH\"]}"));
  sent_t *s[5];
  for (int i = 0; i < 5; i++) s[i] = grant(st, c, "app-jira-user");
  for (int i = 0; i < 5; i++)
    IT_CHECK(cs, wait_event(c, "granted", s[i]->request_id, T_EVENT), "%s not granted after 500s",
             s[i]->person);
  IT_CHECK(cs, injected(st) == 8, "the peer should have answered 500 eight times (got %lld)",
           injected(st));
  json_decref(it_scim_fault(st, "{\"mode\":\"none\"}"));
}

static void c_429(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  json_decref(it_scim_fault(
      st, "{\"mode\":\"status\",\"status\":429,\"retry_after\":2,\"count\":2,\"methods\":[\"PATCH\"]}"));
  int64_t t0 = it_now_ms();
  sent_t *s = grant(st, c, "app-zoom-user");
  IT_CHECK(cs, wait_event(c, "granted", s->request_id, T_EVENT), "not granted after 429s");
  int64_t took = it_now_ms() - t0;
  IT_CHECK(cs, injected(st) == 2, "the peer should have answered 429 twice");
  /* Two answers of Retry-After: 2 were honoured: at least 4 s in all. */
  IT_CHECK(cs, took >= 3900, "granted %lld ms after approval: Retry-After was not honoured",
           (long long)took);
  fprintf(stderr, "[it faults] two 429 (Retry-After: 2) -> granted after %lld ms\n", (long long)took);
  json_decref(it_scim_fault(st, "{\"mode\":\"none\"}"));
}

static void c_hang(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* QM_SCIM_TIMEOUT is 1 s; the peer holds two PATCHes for 3 s, then drops them. */
  json_decref(it_scim_fault(st, "{\"mode\":\"hang\",\"delay_ms\":3000,\"count\":2,\"methods\":[\"PATCH\"]}"));
  int64_t t0 = it_now_ms();
  sent_t *s = grant(st, c, "app-datadog-user");
  IT_CHECK(cs, wait_event(c, "granted", s->request_id, T_EVENT), "not granted after hangs");
  int64_t took = it_now_ms() - t0;
  IT_CHECK(cs, injected(st) == 2, "the peer should have held two requests");
  IT_CHECK(cs, took >= 1900, "granted after %lld ms: the hung attempts were not waited out",
           (long long)took);
  json_decref(it_scim_fault(st, "{\"mode\":\"none\"}"));
}

static void c_down_and_back(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* Two of the earlier grants are revoked while the directory is down. */
  json_decref(it_scim_fault(st, "{\"mode\":\"down\",\"down_ms\":4000}"));
  it_sleep_ms(300);
  sent_t *s[6];
  for (int i = 0; i < 6; i++) s[i] = grant(st, c, i % 2 ? "app-hubspot-user" : "app-jira-user");
  sent_t *r1 = &c->sent[0], *r2 = &c->sent[1];
  it_publish_revocation(st, r1->request_id, r1->person, r1->group, "user", "mover");
  it_publish_revocation(st, r2->request_id, r2->person, r2->group, "user", "review");
  r1->revoked = r2->revoked = true;
  for (int i = 0; i < 6; i++)
    IT_CHECK(cs, wait_event(c, "granted", s[i]->request_id, T_EVENT),
             "%s not granted after the directory came back", s[i]->person);
  IT_CHECK(cs, wait_event(c, "revoked", r1->request_id, T_EVENT), "mover revocation not applied");
  IT_CHECK(cs, wait_event(c, "revoked", r2->request_id, T_EVENT), "review revocation not applied");
}

static void c_parked_and_retried(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  json_decref(it_scim_fault(st, "{\"mode\":\"status\",\"status\":503,\"count\":-1,\"methods\":[\"PATCH\"]}"));
  sent_t *s = grant(st, c, "app-confluence-user");
  IT_CHECK(cs, wait_event(c, "failed", s->request_id, T_EVENT),
           "no ProvisioningFailed after every attempt failed");
  it_resp_t r;
  it_http(st, "provisioning", "GET", "/v1/operations?state=failed", c->admin, NULL, NULL, &r);
  json_t *items = json_object_get(r.json, "items");
  json_t *op = NULL;
  size_t i;
  json_t *it;
  json_array_foreach(items, i, it) {
    if (!strcmp(json_string_value(json_object_get(it, "request_id")), s->request_id)) op = it;
  }
  IT_CHECK(cs, r.status == 200 && op, "the parked operation is not listed: %ld %s", r.status, r.body);
  char path[128];
  snprintf(path, sizeof(path), "/v1/operations/%lld/retry",
           json_integer_value(json_object_get(op, "operation_id")));
  it_resp_clear(&r);
  IT_CHECK(cs, count(c, "granted", s->request_id) == 0, "granted although parked");
  json_decref(it_scim_fault(st, "{\"mode\":\"none\"}"));
  it_http(st, "provisioning", "POST", path, c->admin, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 202, "operator retry: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  IT_CHECK(cs, wait_event(c, "granted", s->request_id, T_EVENT), "not granted after the retry");
  it_http(st, "provisioning", "POST", path, c->admin, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 409, "retrying a done operation: expected 409, got %ld", r.status);
  it_resp_clear(&r);
}

static void c_kill9(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* Grants and revocations in flight when the process dies without warning:
   * the directory holds every PATCH, so operations are claimed (leased by
   * live sessions) and their directory calls under way at the kill. */
  json_decref(it_scim_fault(st, "{\"mode\":\"hang\",\"delay_ms\":5000,\"count\":-1,\"methods\":[\"PATCH\"]}"));
  sent_t *s[16];
  for (int i = 0; i < 16; i++) s[i] = grant(st, c, i % 2 ? "app-zoom-user" : "app-datadog-user");
  int64_t until = it_now_ms() + 15000;
  while (injected(st) == 0 && it_now_ms() < until) it_sleep_ms(50);
  IT_CHECK(cs, injected(st) > 0, "no PATCH reached the directory before the kill");
  it_service_kill9(st, "provisioning");
  json_decref(it_scim_fault(st, "{\"mode\":\"none\"}"));
  for (int i = 0; i < 4; i++) {
    it_publish_revocation(st, s[i]->request_id, s[i]->person, s[i]->group, "user", "review");
    s[i]->revoked = true;
  }
  it_service_start(st, "provisioning");
  for (int i = 4; i < 16; i++)
    IT_CHECK(cs, wait_event(c, "granted", s[i]->request_id, T_EVENT),
             "%s not granted after kill -9 and restart", s[i]->person);
  /* The revoked four: applied then revoked, or (not yet in a worker's hands
   * when the revocation came) cancelled — either way revoked in the end. */
  for (int i = 0; i < 4; i++) {
    char *q = qm_asprintf("SELECT state FROM provisioning.grants WHERE request_id = '%s'",
                          s[i]->request_id);
    char *state = NULL;
    int64_t bound = it_now_ms() + T_EVENT;
    for (;;) {
      free(state);
      state = it_pg_scalar(st, q);
      if ((state && !strcmp(state, "revoked")) || it_now_ms() > bound) break;
      it_sleep_ms(100);
    }
    free(q);
    bool ok = state && !strcmp(state, "revoked");
    IT_CHECK(cs, ok, "%s: grant %s after kill -9 and restart, not revoked", s[i]->person,
             state ? state : "(none)");
    free(state);
  }
}

/* The invariant over everything sent: applied exactly once, revoked only
 * where asked, and the directory's groups hold exactly the grantees. */
static void c_exactly_once(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  it_sleep_ms(2000); /* let any stray duplicate arrive */
  it_reader_poll(c->access, 500);
  for (int i = 0; i < c->n_sent; i++) {
    sent_t *s = &c->sent[i];
    int g = count(c, "granted", s->request_id), r = count(c, "revoked", s->request_id);
    if (!s->revoked) {
      IT_CHECK(cs, g == 1 && r == 0, "%s: %d AccessGranted, %d AccessRevoked (want 1, 0)",
               s->person, g, r);
    } else { /* granted and revoked once each, or cancelled before it was applied */
      IT_CHECK(cs, (g == 1 && r == 1) || (g == 0 && r == 0),
               "%s (revoked): %d AccessGranted, %d AccessRevoked", s->person, g, r);
    }
  }
  static const char *const groups[] = {"app-jira-user", "app-zoom-user", "app-datadog-user",
                                       "app-hubspot-user", "app-confluence-user", NULL};
  for (int g = 0; groups[g]; g++) {
    json_t *m = it_scim_members(st, groups[g]);
    size_t want = 0;
    for (int i = 0; i < c->n_sent; i++) {
      sent_t *s = &c->sent[i];
      if (strcmp(s->group, groups[g])) continue;
      bool in = json_object_get(m, s->person) != NULL;
      IT_CHECK(cs, in == !s->revoked, "%s in %s: %d, expected %d", s->person, groups[g], in,
               !s->revoked);
      if (!s->revoked) want++;
    }
    IT_CHECK(cs, json_object_size(m) == want, "%s holds %zu members, expected %zu", groups[g],
             json_object_size(m), want);
    json_decref(m);
  }
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM provisioning.grant_ops WHERE state <> 'done'") == 0,
           "operations left undone");
}

static void c_periodic_drift(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* Reconciliation on its own clock: restart with a 1 s interval and repair
   * on, put a stranger into a managed group, and watch it found and removed. */
  it_service_setenv(st, "provisioning", "QM_DRIFT_INTERVAL=1s");
  it_service_setenv(st, "provisioning", "QM_DRIFT_REPAIR=true");
  it_service_restart(st, "provisioning");
  it_scim_member_set(st, "app-jira-user", "p-0299", true);
  json_t *p = json_loads("{\"event\":\"drift\",\"group\":\"app-jira-user\","
                         "\"finding\":\"member_without_grant\",\"repaired\":true}", 0, NULL);
  int n = it_reader_wait(c->access, p, 1, 30000);
  json_decref(p);
  IT_CHECK(cs, n == 1, "the periodic reconciliation did not report the stranger (%d findings)", n);
  json_t *m = it_scim_members(st, "app-jira-user");
  IT_CHECK(cs, !json_object_get(m, "p-0299"), "the stranger is still in app-jira-user");
  json_decref(m);
  /* Nothing else was out of line: the grantees are all still there. */
  it_sleep_ms(2500);
  json_t *any = json_loads("{\"event\":\"drift\"}", 0, NULL);
  it_reader_poll(c->access, 200);
  IT_CHECK(cs, it_reader_count(c->access, any) == 1, "drift reported more than the stranger");
  json_decref(any);
}

Test(provisioning_faults, scim_faults_exactly_once, .fini = it_fini, .timeout = 600) {
  const it_svc_env_t env[] = {
      {"provisioning", "QM_SCIM_TIMEOUT=1s"},
      /* Retries 0.3, 0.6, 1.2, 2.4, 4.8 s apart (with jitter): enough to outlast
       * the 4 s outage; the parking case fails for longer than all of them. */
      {"provisioning", "QM_PROVISIONING_BACKOFF=300ms"},
      {"provisioning", "QM_PROVISIONING_MAX_ATTEMPTS=6"},
      {"provisioning", "QM_DRIFT_INTERVAL=0"},
      {NULL, NULL},
  };
  static const char *const only[] = {"provisioning", NULL};
  it_stack_t *st = it_stack_up_env("provfault", only, env);
  ctx_t *c = qm_calloc(1, sizeof(*c));
  c->access = it_reader_open(st, QM_TOPIC_ACCESS);
  c->admin = it_token("p-0001", "it_admin");
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = c;
  it_case_run(&cs, st, "500s, then the directory recovers", c_500);
  it_case_run(&cs, st, "429 with Retry-After honoured", c_429);
  it_case_run(&cs, st, "requests hanging past the timeout", c_hang);
  it_case_run(&cs, st, "directory down and back, grants and revocations queued meanwhile",
              c_down_and_back);
  it_case_run(&cs, st, "failing until parked, ProvisioningFailed, operator retry", c_parked_and_retried);
  it_case_run(&cs, st, "kill -9 with grants and revocations in flight", c_kill9);
  it_case_run(&cs, st, "every grant applied exactly once, nothing revoked that should not be",
              c_exactly_once);
  it_case_run(&cs, st, "periodic drift reconciliation with repair", c_periodic_drift);
  bool ok = it_cases_report(&cs, "provisioning faults");
  it_reader_close(c->access);
  free(c->admin);
  free(c);
  cr_assert(ok, "some fault cases failed (see above)");
  it_stack_down(st);
}
