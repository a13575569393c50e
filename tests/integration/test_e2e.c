/*
 * test_e2e: one access request end to end through all five services —
 * submitted on intake, auto-approved by approval, provisioned into the
 * private SCIM peer by provisioning, recorded once per event in audit's
 * hash-chained ledger, and visible as "granted" with its timeline on intake.
 */
#include "harness.h"

#include "qm_common.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How many entries of the timeline have this type. */
static int timeline_count(const json_t *timeline, const char *type) {
  int n = 0;
  size_t i;
  json_t *e;
  json_array_foreach(timeline, i, e) {
    const char *t = json_string_value(json_object_get(e, "type"));
    if (t && !strcmp(t, type)) n++;
  }
  return n;
}

/* How many ledger items have this event_type. */
static int ledger_count(const json_t *items, const char *type) {
  int n = 0;
  size_t i;
  json_t *e;
  json_array_foreach(items, i, e) {
    const char *t = json_string_value(json_object_get(e, "event_type"));
    if (t && !strcmp(t, type)) n++;
  }
  return n;
}

static const char *const e2e_types[] = {"qm.request.submitted.v1", "qm.request.approved.v1",
                                        "qm.access.granted.v1"};

Test(e2e, one_request_granted_everywhere, .fini = it_fini) {
  it_stack_t *st = it_stack_up("e2e");
  char *token = it_token("p-0100", "employee");

  /* Submit. */
  const char *body = "{\"reason\":\"design reviews\",\"lines\":[{\"item_id\":\"figma\","
                     "\"role_id\":\"viewer\"}]}";
  int64_t t_submit = it_now_ms();
  it_resp_t r;
  it_http(st, "intake", "POST", "/v1/requests", token, body, NULL, &r);
  cr_assert_eq(r.status, 201, "POST /v1/requests: expected 201, got %ld %s", r.status, r.body);
  const char *id_j = json_string_value(json_object_get(r.json, "id"));
  cr_assert(id_j && *id_j, "201 body has no id: %s", r.body);
  cr_assert(json_is_string(json_object_get(r.json, "status")), "201 body has no status: %s", r.body);
  cr_assert(r.location[0] != '\0', "201 without a Location header");
  cr_assert(strstr(r.location, id_j) != NULL, "Location %s does not name the request %s",
            r.location, id_j);
  char *id = qm_strdup(id_j);
  it_resp_clear(&r);

  /* Poll until granted (bound 30 s). */
  json_t *req = it_request_wait(st, id, token, "granted", 30000);
  int64_t latency_ms = it_now_ms() - t_submit;
  fprintf(stderr, "[it e2e] submit -> granted latency: %lld ms (polled every 25 ms)\n",
          (long long)latency_ms);
  char *req_text = it_json_text(req);
  fprintf(stderr, "[it e2e] request %s: %s\n", id, req_text);

  json_t *lines = json_object_get(req, "lines");
  cr_assert_eq(json_array_size(lines), 1, "expected one line: %s", req_text);
  cr_assert_str_eq(json_string_value(json_object_get(json_array_get(lines, 0), "status")),
                   "granted", "lines[0].status is not granted: %s", req_text);
  json_t *timeline = json_object_get(req, "timeline");
  cr_assert(json_is_array(timeline), "no timeline array: %s", req_text);
  for (size_t k = 0; k < sizeof(e2e_types) / sizeof(e2e_types[0]); k++)
    cr_assert_geq(timeline_count(timeline, e2e_types[k]), 1, "timeline lacks %s: %s",
                  e2e_types[k], req_text);
  size_t i;
  json_t *e;
  json_array_foreach(timeline, i, e) {
    cr_assert(json_is_string(json_object_get(e, "type")), "timeline[%zu] has no type: %s", i,
              req_text);
    cr_assert(json_object_get(e, "at") != NULL, "timeline[%zu] has no at: %s", i, req_text);
    cr_assert(json_is_string(json_object_get(e, "summary")), "timeline[%zu] has no summary: %s",
              i, req_text);
  }

  /* The identity provider holds the membership. */
  json_t *members = it_scim_members(st, "app-figma-viewer");
  char *members_text = it_json_text(members);
  cr_assert(json_object_get(members, "p-0100") != NULL,
            "app-figma-viewer on the SCIM peer lacks p-0100: %s", members_text);
  cr_assert_eq(json_object_size(members), 1, "app-figma-viewer should hold only p-0100: %s",
               members_text);

  /* Audit: exactly one record of each type for this request (audit may lag
   * the read model a little: wait until all three are there). */
  char *auditor = it_token("p-0200", "auditor");
  char path[256];
  snprintf(path, sizeof(path), "/v1/ledger?request_id=%s", id);
  int64_t deadline = it_now_ms() + 30000;
  json_t *items = NULL;
  for (;;) {
    it_http(st, "audit", "GET", path, auditor, NULL, NULL, &r);
    cr_assert_eq(r.status, 200, "GET %s: %ld %s", path, r.status, r.body);
    items = json_incref(json_object_get(r.json, "items"));
    cr_assert(json_is_array(items), "ledger answer has no items: %s", r.body);
    bool all = true;
    for (size_t k = 0; k < 3; k++) all = all && ledger_count(items, e2e_types[k]) >= 1;
    if (all || it_now_ms() > deadline) {
      char *items_text = it_json_text(items);
      for (size_t k = 0; k < 3; k++)
        cr_assert_eq(ledger_count(items, e2e_types[k]), 1,
                     "ledger for %s should hold exactly one %s: %s", id, e2e_types[k], items_text);
      free(items_text);
      it_resp_clear(&r);
      break;
    }
    it_resp_clear(&r);
    json_decref(items);
    it_sleep_ms(50);
  }
  json_decref(items);

  /* A request without a token is refused on the ledger too. */
  it_http(st, "audit", "GET", path, NULL, NULL, NULL, &r);
  cr_assert_eq(r.status, 401, "GET %s without a token: %ld %s", path, r.status, r.body);
  it_resp_clear(&r);

  /* A second request on the now warm pipeline: report its latency. */
  char *token2 = it_token("p-0101", "employee");
  int64_t t2 = it_now_ms();
  char *id2 = it_request_submit(st, token2, "{\"reason\":\"chat\",\"lines\":[{\"item_id\":"
                                            "\"slack\",\"role_id\":\"user\"}]}");
  json_t *req2 = it_request_wait(st, id2, token2, "granted", 30000);
  fprintf(stderr, "[it e2e] warm submit -> granted latency: %lld ms\n",
          (long long)(it_now_ms() - t2));
  json_decref(req2);
  free(id2);
  free(token2);

  /* The chain verifies. */
  char *dsn_env = qm_asprintf("QM_PG_DSN=%s", it_stack_dsn(st));
  const char *argv[] = {QM_BINARY_DIR "/services/qm-audit", "verify", NULL};
  const char *env[] = {dsn_env, NULL};
  char *out = NULL, *err = NULL;
  int rc = it_run(argv, env, 30000, &out, &err);
  cr_assert_eq(rc, 0, "qm-audit verify exited %d\nstdout: %s\nstderr: %s", rc, out, err);
  cr_assert(strstr(out, "OK") != NULL, "qm-audit verify did not print OK: %s", out);
  fprintf(stderr, "[it e2e] qm-audit verify: %s", out);

  /* Graceful shutdown: each service exits 0 on SIGTERM, well within its
   * QM_SHUTDOWN_TIMEOUT (10 s) plus a margin. */
  static const char *const services[] = {"intake", "approval", "provisioning", "fulfillment",
                                         "audit"};
  for (size_t k = 0; k < sizeof(services) / sizeof(services[0]); k++) {
    int64_t t_term = it_now_ms();
    int status = it_service_term(st, services[k], 15000);
    cr_assert_eq(status, 0, "qm-%s after SIGTERM: exit status %d (-1: still running after 15 s)\n%s",
                 services[k], status, it_service_log_tail(st, services[k], 30));
    fprintf(stderr, "[it e2e] qm-%s stopped cleanly in %lld ms\n", services[k],
            (long long)(it_now_ms() - t_term));
  }

  free(out);
  free(err);
  free(dsn_env);
  free(auditor);
  free(members_text);
  json_decref(members);
  free(req_text);
  json_decref(req);
  free(id);
  free(token);
  it_stack_down(st);
}
