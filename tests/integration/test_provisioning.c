/*
 * test_provisioning: qm-provisioning alone against the private SCIM peer and
 * a private slapd, fed approved lines, revocation requests and HR leavers the
 * way approval, intake and HR publish them. One stack, one case per behaviour
 * of issue 5: grant (SCIM and LDAP, batched), idempotent re-grant, revoke by
 * an administrator and by a mover's request (LDAP's last-member rule), expiry
 * on a short clock with its notice webhook, extension, leaver, drift found
 * and repaired.
 *
 * The clock: QM_PROVISIONING_DAY=2s, so a grant of 2 days lasts 4 s from the
 * moment it is applied; notices go QM_EXPIRY_NOTICE_BEFORE=2s ahead.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ctx {
  it_reader_t *access;
  it_recorder_t *hook;
  it_slapd_t *slapd;
  char *admin;
} ctx_t;

#define T_EVENT 30000

static void new_id(char *out) { qm_uuid_new(out); }

/* Waits for n access events matching the JSON pattern; ends the case otherwise. */
static void want_events(it_cases_t *cs, ctx_t *c, const char *pattern, int n) {
  json_t *pat = json_loads(pattern, 0, NULL);
  IT_CHECK(cs, pat != NULL, "bad pattern %s", pattern);
  int got = it_reader_wait(c->access, pat, n, T_EVENT);
  json_decref(pat);
  IT_CHECK(cs, got >= n, "expected %d event(s) %s on qm.access.v1, got %d", n, pattern, got);
}

/* Publishes the approval and waits for its AccessGranted. */
static void approve_and_wait(it_stack_t *st, it_cases_t *cs, const it_approved_t *a) {
  it_publish_approved(st, a);
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\"}", a->request_id);
  want_events(cs, cs->ctx, pat, 1);
}

static int count_events(ctx_t *c, const char *pattern) {
  it_reader_poll(c->access, 200);
  json_t *pat = json_loads(pattern, 0, NULL);
  int n = it_reader_count(c->access, pat);
  json_decref(pat);
  return n;
}

/* True when o[key] is the string want. */
static bool str_is(const json_t *o, const char *key, const char *want) {
  const char *v = json_string_value(json_object_get(o, key));
  return v && !strcmp(v, want);
}

static bool has_member(json_t *set, const char *who) { return json_object_get(set, who) != NULL; }

static char *grant_of(it_stack_t *st, const char *request_id) {
  char *q = qm_asprintf("SELECT grant_id FROM provisioning.grants WHERE request_id = '%s'",
                        request_id);
  char *id = it_pg_scalar(st, q);
  free(q);
  return id;
}

static char *grant_state(it_stack_t *st, const char *request_id) {
  char *q = qm_asprintf("SELECT state FROM provisioning.grants WHERE request_id = '%s'",
                        request_id);
  char *v = it_pg_scalar(st, q);
  free(q);
  return v ? v : qm_strdup("(none)");
}

/* ---- cases ---------------------------------------------------------------- */

static void c_bad_connectors_file(it_stack_t *st, it_cases_t *cs) {
  /* A connectors file that cannot be used stops start-up with exit 2 (bad
   * configuration) and names the connector and what is wrong. */
  char *dir = it_dir_copy_yaml(QM_SOURCE_DIR "/deploy/local/seed", "prov-bad");
  it_file_write(dir, "bad.json",
                "{\"connectors\": {\"ldap-x\": {\"type\": \"ldap\", \"url\": \"http://nope\","
                " \"user_base\": \"ou=p\", \"group_base\": \"ou=g\"}}}");
  it_file_write(dir, "broken.json", "{\"connectors\": ");
  static const char *const files[] = {"bad.json", "broken.json"};
  static const char *const says[] = {"ldap-x", "QM_CONNECTORS_FILE"};
  for (int i = 0; i < 2; i++) {
    char *dsn = qm_asprintf("QM_PG_DSN=%s", it_stack_dsn(st));
    char *cf = qm_asprintf("QM_CONNECTORS_FILE=%s/%s", dir, files[i]);
    char *port = qm_asprintf("QM_HTTP_PORT=%d", it_service_port(st, "provisioning"));
    char *prefix = qm_asprintf("QM_TOPIC_PREFIX=%s", it_stack_prefix(st));
    const char *argv[] = {QM_BINARY_DIR "/services/qm-provisioning", NULL};
    const char *env[] = {dsn, cf, port, prefix, NULL};
    char *out = NULL, *err = NULL;
    int rc = it_run(argv, env, 30000, &out, &err);
    char *all = qm_asprintf("%s%s", out ? out : "", err ? err : "");
    free(out);
    free(err);
    free(dsn);
    free(cf);
    free(port);
    free(prefix);
    bool named = strstr(all, says[i]) != NULL;
    char tail[600];
    qm_strlcpy(tail, all, sizeof(tail));
    free(all);
    IT_CHECK(cs, rc == 2 && named, "%s: exit %d (want 2), output naming '%s': %s", files[i], rc,
             says[i], tail);
  }
  it_dir_remove(dir);
  free(dir);
}

static void c_scim_grant_and_regrant(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char rid[QM_UUID_STR_LEN];
  new_id(rid);
  it_approved_t a = {.request_id = rid, .person_id = "p-0201", .item_id = "figma",
                     .role_id = "viewer", .group = "app-figma-viewer"};
  it_publish_approved(st, &a);
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\"}", rid);
  want_events(cs, c, pat, 1);
  json_t *m = it_scim_members(st, "app-figma-viewer");
  IT_CHECK(cs, has_member(m, "p-0201"), "p-0201 not in app-figma-viewer after AccessGranted");
  json_decref(m);
  /* The same approval delivered again (a new event id: an upstream retry). */
  it_publish_approved(st, &a);
  it_sleep_ms(1500);
  IT_CHECK(cs, count_events(c, pat) == 1, "the re-delivered approval was granted again (%d events)",
           count_events(c, pat));
  char *q = qm_asprintf("SELECT count(*) FROM provisioning.grants WHERE request_id = '%s'", rid);
  IT_CHECK(cs, it_pg_int(st, q) == 1, "more than one grant row for one approved line");
  free(q);
  q = qm_asprintf("SELECT count(*) FROM provisioning.grant_ops o JOIN provisioning.grants g"
                  " USING (grant_id) WHERE g.request_id = '%s'", rid);
  IT_CHECK(cs, it_pg_int(st, q) == 1, "more than one grant operation for one approved line");
  free(q);
}

static void c_ldap_grant_batch(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char rids[8][QM_UUID_STR_LEN];
  for (int i = 0; i < 8; i++) {
    new_id(rids[i]);
    char person[16];
    snprintf(person, sizeof(person), "p-%04d", 203 + i);
    it_approved_t a = {.request_id = rids[i], .person_id = person, .item_id = "ops-tools",
                       .role_id = "user", .group = "ldap-ops", .connector = "ldap-corp"};
    it_publish_approved(st, &a);
  }
  for (int i = 0; i < 8; i++) {
    char pat[512];
    snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\",\"connector\":\"ldap-corp\"}",
             rids[i]);
    want_events(cs, c, pat, 1);
  }
  json_t *m = it_slapd_members(c->slapd, "ldap-ops");
  char *txt = it_json_text(m);
  for (int i = 0; i < 8; i++) {
    char person[16];
    snprintf(person, sizeof(person), "p-%04d", 203 + i);
    IT_CHECK(cs, has_member(m, person), "%s not in LDAP group ldap-ops: %s", person, txt);
  }
  IT_CHECK(cs, !has_member(m, IT_LDAP_PLACEHOLDER),
           "the placeholder stayed in ldap-ops after real members were added: %s", txt);
  IT_CHECK(cs, json_object_size(m) == 8, "ldap-ops should hold exactly the 8 grantees: %s", txt);
  free(txt);
  json_decref(m);
}

static void c_admin_revoke(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char r1[QM_UUID_STR_LEN], r2[QM_UUID_STR_LEN];
  new_id(r1);
  new_id(r2);
  it_approved_t a1 = {.request_id = r1, .person_id = "p-0212", .item_id = "slack",
                      .role_id = "user", .group = "app-slack-user"};
  it_approved_t a2 = {.request_id = r2, .person_id = "p-0213", .item_id = "slack",
                      .role_id = "user", .group = "app-slack-user"};
  approve_and_wait(st, cs, &a1);
  approve_and_wait(st, cs, &a2);
  char pat[512];
  char *gid = grant_of(st, r1);
  IT_CHECK(cs, gid != NULL, "no grant row for %s", r1);
  char path[128];
  snprintf(path, sizeof(path), "/v1/grants/%s/revoke", gid);
  /* Not an administrator: refused. */
  char *emp = it_token("p-0212", "employee");
  it_resp_t r;
  it_http(st, "provisioning", "POST", path, emp, "{}", NULL, &r);
  IT_CHECK(cs, r.status == 403, "an employee revoked a grant: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  free(emp);
  it_http(st, "provisioning", "POST", path, c->admin, "{\"comment\":\"left the project\"}", NULL,
          &r);
  IT_CHECK(cs, r.status == 202, "admin revoke: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  snprintf(pat, sizeof(pat),
           "{\"event\":\"revoked\",\"grant_id\":\"%s\",\"reason\":\"admin\",\"actor_person_id\":\"p-0001\","
           "\"comment\":\"left the project\"}",
           gid);
  want_events(cs, c, pat, 1);
  json_t *m = it_scim_members(st, "app-slack-user");
  IT_CHECK(cs, !has_member(m, "p-0212"), "p-0212 still in app-slack-user after revocation");
  IT_CHECK(cs, has_member(m, "p-0213"), "revoking p-0212 took p-0213 out of the group too");
  json_decref(m);
  /* Again: it is revoked already. */
  it_http(st, "provisioning", "POST", path, c->admin, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 409, "second revoke: expected 409, got %ld %s", r.status, r.body);
  it_resp_clear(&r);
  it_http(st, "provisioning", "POST", "/v1/grants/7d0f3f5e-0000-4000-8000-000000000000/revoke",
          c->admin, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 404, "unknown grant: expected 404, got %ld %s", r.status, r.body);
  it_resp_clear(&r);
  /* The grants API by person and by item. */
  char *pq = it_token("p-0212", "employee");
  it_http(st, "provisioning", "GET", "/v1/grants?person_id=p-0212", pq, NULL, NULL, &r);
  json_t *g0 = json_array_get(json_object_get(r.json, "items"), 0);
  IT_CHECK(cs, r.status == 200 && json_array_size(json_object_get(r.json, "items")) == 1 &&
                   str_is(g0, "state", "revoked") && str_is(g0, "revoke_reason", "admin") &&
                   json_is_string(json_object_get(g0, "revoked_at")),
           "GET /v1/grants?person_id=p-0212: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  it_http(st, "provisioning", "GET", "/v1/grants?person_id=p-0213", pq, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 403, "a person read another's grants: %ld", r.status);
  it_resp_clear(&r);
  free(pq);
  it_http(st, "provisioning", "GET", "/v1/grants?item_id=slack&state=active", c->admin, NULL,
          NULL, &r);
  IT_CHECK(cs, r.status == 200 && json_array_size(json_object_get(r.json, "items")) == 1,
           "GET /v1/grants?item_id=slack&state=active: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  free(gid);
  /* "reason" (the documented name): validated, stored, announced. */
  gid = grant_of(st, r2);
  IT_CHECK(cs, gid != NULL, "no grant row for %s", r2);
  snprintf(path, sizeof(path), "/v1/grants/%s/revoke", gid);
  char *long_reason = qm_malloc(520);
  memset(long_reason, 'x', 501);
  long_reason[501] = '\0';
  char *too_long = qm_asprintf("{\"reason\":\"%s\"}", long_reason);
  free(long_reason);
  const char *bad[] = {"{\"reason\":42}", too_long, "{\"reason\":\"a\",\"comment\":\"b\"}",
                       "{\"comment\":[]}"};
  const char *names[] = {"\"reason\"", "\"reason\"", "\"comment\"", "\"comment\""};
  for (size_t i = 0; i < 4; i++) {
    it_http(st, "provisioning", "POST", path, c->admin, bad[i], NULL, &r);
    bool named = r.status == 400 && r.body && strstr(r.body, names[i]);
    char shown[300];
    qm_strlcpy(shown, r.body ? r.body : "", sizeof(shown));
    it_resp_clear(&r);
    IT_CHECK(cs, named, "revoke body #%zu: expected a 400 naming %s, got %s", i, names[i], shown);
  }
  free(too_long);
  it_http(st, "provisioning", "POST", path, c->admin, "{\"reason\":\"contract ended \u2013 ticket 42\"}",
          NULL, &r);
  IT_CHECK(cs, r.status == 202, "admin revoke with a reason: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  snprintf(pat, sizeof(pat),
           "{\"event\":\"revoked\",\"grant_id\":\"%s\",\"reason\":\"admin\","
           "\"comment\":\"contract ended \u2013 ticket 42\"}", gid);
  want_events(cs, c, pat, 1);
  it_http(st, "provisioning", "GET", "/v1/grants?person_id=p-0213", c->admin, NULL, NULL, &r);
  g0 = json_array_get(json_object_get(r.json, "items"), 0);
  bool kept = r.status == 200 && str_is(g0, "revoke_comment", "contract ended \u2013 ticket 42");
  it_resp_clear(&r);
  IT_CHECK(cs, kept, "the grant does not keep the administrator's reason as revoke_comment");
  free(gid);
}

static void c_mover_revoke_ldap_last_member(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char rid[QM_UUID_STR_LEN];
  new_id(rid);
  it_approved_t a = {.request_id = rid, .person_id = "p-0202", .item_id = "eng-wiki",
                     .role_id = "editor", .group = "ldap-eng", .connector = "ldap-corp"};
  it_publish_approved(st, &a);
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\"}", rid);
  want_events(cs, c, pat, 1);
  json_t *m = it_slapd_members(c->slapd, "ldap-eng");
  IT_CHECK(cs, has_member(m, "p-0202") && json_object_size(m) == 1,
           "ldap-eng should hold only p-0202 now");
  json_decref(m);
  char mover[QM_UUID_STR_LEN];
  new_id(mover);
  it_publish_revocation(st, mover, "p-0202", "eng-wiki", "editor", "mover");
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\",\"reason\":\"mover\"}",
           rid);
  want_events(cs, c, pat, 1);
  m = it_slapd_members(c->slapd, "ldap-eng");
  char *txt = it_json_text(m);
  IT_CHECK(cs, !has_member(m, "p-0202"), "p-0202 still in ldap-eng: %s", txt);
  IT_CHECK(cs, has_member(m, IT_LDAP_PLACEHOLDER),
           "the emptied groupOfNames should keep the placeholder: %s", txt);
  free(txt);
  json_decref(m);
}

static void c_two_grants_one_membership(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* The same group through two requests (e.g. birthright and a manual one):
   * revoking one must not take away what the other still grants. */
  char r1[QM_UUID_STR_LEN], r2[QM_UUID_STR_LEN];
  new_id(r1);
  new_id(r2);
  it_approved_t a1 = {.request_id = r1, .person_id = "p-0230", .item_id = "confluence",
                      .role_id = "user", .group = "app-confluence-user"};
  it_approved_t a2 = {.request_id = r2, .person_id = "p-0230", .item_id = "confluence-space",
                      .role_id = "user", .group = "app-confluence-user"};
  approve_and_wait(st, cs, &a1);
  approve_and_wait(st, cs, &a2);
  char pat[512];
  it_publish_revocation(st, r1, "p-0230", "confluence", "user", "review");
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\",\"reason\":\"review\"}", r1);
  want_events(cs, c, pat, 1);
  json_t *m = it_scim_members(st, "app-confluence-user");
  IT_CHECK(cs, has_member(m, "p-0230"),
           "revoking one of two grants of the same group removed the membership");
  json_decref(m);
  char *s2 = grant_state(st, r2);
  IT_CHECK(cs, !strcmp(s2, "active"), "the other grant is %s", s2);
  free(s2);
  it_publish_revocation(st, r2, "p-0230", "confluence-space", "user", "review");
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\"}", r2);
  want_events(cs, c, pat, 1);
  m = it_scim_members(st, "app-confluence-user");
  IT_CHECK(cs, !has_member(m, "p-0230"), "the last grant revoked, but the membership stayed");
  json_decref(m);
}

static void c_expiry_notice_extension(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char ra[QM_UUID_STR_LEN], rb[QM_UUID_STR_LEN], rx[QM_UUID_STR_LEN];
  new_id(ra);
  new_id(rb);
  new_id(rx);
  it_recorder_clear(c->hook);
  int64_t t0 = it_now_ms();
  it_approved_t a = {.request_id = ra, .person_id = "p-0214", .item_id = "aws",
                     .role_id = "prod-admin", .group = "app-aws-prod-admin", .duration_days = 2};
  it_approved_t b = {.request_id = rb, .person_id = "p-0215", .item_id = "aws",
                     .role_id = "prod-admin", .group = "app-aws-prod-admin", .duration_days = 2};
  it_publish_approved(st, &a);
  it_publish_approved(st, &b);
  char pat[512];
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\"}", rb);
  want_events(cs, c, pat, 1);
  /* The clock started when access was applied: exactly 2 days of 2 s each. */
  char *q = qm_asprintf("SELECT extract(epoch FROM expires_at - granted_at)::text"
                        " FROM provisioning.grants WHERE request_id = '%s'", rb);
  char *span = it_pg_scalar(st, q);
  free(q);
  IT_CHECK(cs, span && strtod(span, NULL) == 4.0, "expires_at - granted_at = %s s, expected 4",
           span ? span : "(null)");
  free(span);
  /* Extend B by 3 days (6 s) at once: its expiry moves from t+4 s to t+10 s. */
  it_approved_t x = {.request_id = rx, .person_id = "p-0215", .item_id = "aws",
                     .role_id = "prod-admin", .group = "app-aws-prod-admin", .duration_days = 3,
                     .extends_request_id = rb};
  it_publish_approved(st, &x);
  snprintf(pat, sizeof(pat), "{\"event\":\"granted\",\"request_id\":\"%s\",\"extension\":true}", rx);
  want_events(cs, c, pat, 1);
  /* A: notice ahead, then revoked at expiry, with reason "expired". */
  snprintf(pat, sizeof(pat), "{\"event\":\"expiry_notice\",\"request_id\":\"%s\"}", ra);
  want_events(cs, c, pat, 1);
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\",\"reason\":\"expired\"}", ra);
  want_events(cs, c, pat, 1);
  int64_t a_gone = it_now_ms() - t0;
  IT_CHECK(cs, a_gone >= 4000, "A was revoked %lld ms after approval, before its 4 s ran out",
           (long long)a_gone);
  IT_CHECK(cs, it_recorder_wait(c->hook, NULL, 1, 5000), "no expiry notice reached the webhook");
  char *body = it_recorder_body(c->hook, NULL, 0);
  char *ga = grant_of(st, ra);
  IT_CHECK(cs, body && ga && strstr(body, ga) && strstr(body, "p-0214"),
           "the webhook's notice does not name A's grant and holder: %s", body ? body : "");
  free(body);
  free(ga);
  json_t *m = it_scim_members(st, "app-aws-prod-admin");
  IT_CHECK(cs, !has_member(m, "p-0214"), "A's holder is still a member after expiry");
  IT_CHECK(cs, has_member(m, "p-0215"), "B was taken away although it was extended");
  json_decref(m);
  char *sb = grant_state(st, rb);
  IT_CHECK(cs, !strcmp(sb, "active"), "B is %s at A's expiry; the extension should hold it", sb);
  free(sb);
  /* B: revoked at its new expiry, about 10 s after it was applied. */
  snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\",\"reason\":\"expired\"}", rb);
  want_events(cs, c, pat, 1);
  IT_CHECK(cs, it_now_ms() - t0 >= 10000, "B was revoked before its extended expiry");
  /* Exactly one notice per expiry (B's re-armed after the extension). */
  IT_CHECK(cs, count_events(c, "{\"event\":\"expiry_notice\",\"subject_person_id\":\"p-0214\"}") == 1,
           "A got more than one expiry notice");
}

/* The expiry notice's receiver down (503 after holding each request 4 s):
 * the notice is recorded and its event published at once, the POST happens
 * outside any transaction, so the grant row is never locked meanwhile and a
 * leaver's revocation goes through while the receiver is still down; when
 * the receiver is back the notice arrives, always with the same
 * Idempotency-Key. */
static void c_notice_receiver_down(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  char rn[QM_UUID_STR_LEN], rk[QM_UUID_STR_LEN], pat[512];
  new_id(rn);
  new_id(rk);
  it_recorder_clear(c->hook);
  it_recorder_set_status(c->hook, 503);
  it_recorder_set_delay_ms(c->hook, 4000);
  /* N lasts 5 days of 2 s (notice 8 s after it is applied); K never expires. */
  it_approved_t n = {.request_id = rn, .person_id = "p-0250", .item_id = "figma",
                     .role_id = "editor", .group = "app-figma-editor", .duration_days = 5};
  it_approved_t k = {.request_id = rk, .person_id = "p-0250", .item_id = "jira",
                     .role_id = "user", .group = "app-jira-user"};
  approve_and_wait(st, cs, &n);
  approve_and_wait(st, cs, &k);
  char *gid = grant_of(st, rn);
  IT_CHECK(cs, gid != NULL, "no grant for request %s", rn);
  snprintf(pat, sizeof(pat), "{\"event\":\"expiry_notice\",\"request_id\":\"%s\"}", rn);
  want_events(cs, c, pat, 1);
  IT_CHECK(cs, it_recorder_wait(c->hook, NULL, 1, 30000), "no notice attempt reached the receiver");
  /* The receiver is holding the attempt now: the grant row must be free. */
  char *probe = qm_asprintf("SELECT ((SELECT grant_id FROM provisioning.grants WHERE grant_id = '%s'"
                            " FOR UPDATE SKIP LOCKED) IS NOT NULL)::text", gid);
  int locked = 0;
  for (int i = 0; i < 10; i++) {
    char *v = it_pg_scalar(st, probe);
    if (!v || strcmp(v, "true") != 0) locked++;
    free(v);
    it_sleep_ms(150);
  }
  free(probe);
  IT_CHECK(cs, locked == 0, "the grant row was locked in %d of 10 probes while the receiver held "
           "the notice", locked);
  /* A leaver now: both grants revoked while the receiver is still down. */
  char today[16], hr_id[QM_UUID_STR_LEN];
  it_date(0, today, sizeof(today));
  new_id(hr_id);
  it_hr_event_t ev = {.kind = "leaver", .effective_date = today, .source_event_id = hr_id,
                      .person = {.id = "p-0250", .status = "terminated"}};
  int64_t t_leaver = it_now_ms();
  it_hr_publish(st, &ev);
  want_events(cs, c, "{\"event\":\"revoked\",\"subject_person_id\":\"p-0250\",\"reason\":\"leaver\"}", 2);
  int64_t took = it_now_ms() - t_leaver;
  fprintf(stderr, "[it provisioning] leaver revoked in %lld ms with the notice receiver down\n",
          (long long)took);
  char *q = qm_asprintf("SELECT state || '/' || (attempts > 0)::text FROM provisioning.expiry_notices"
                        " WHERE grant_id = '%s'", gid);
  char *ns = it_pg_scalar(st, q);
  IT_CHECK(cs, ns && !strcmp(ns, "pending/true"),
           "while the receiver is down the notice should be pending after an attempt, it is %s",
           ns ? ns : "(none)");
  free(ns);
  IT_CHECK(cs, took < 15000, "the leaver's revocations took %lld ms with the receiver down",
           (long long)took);
  /* The receiver is back: the notice is delivered, once recorded as sent. */
  it_recorder_set_delay_ms(c->hook, 0);
  it_recorder_set_status(c->hook, 200);
  int64_t until = it_now_ms() + 60000;
  while (it_now_ms() < until) {
    ns = it_pg_scalar(st, q);
    bool sent = ns && !strncmp(ns, "sent", 4);
    free(ns);
    if (sent) break;
    it_sleep_ms(200);
  }
  free(q);
  q = qm_asprintf("SELECT state FROM provisioning.expiry_notices WHERE grant_id = '%s'", gid);
  ns = it_pg_scalar(st, q);
  free(q);
  IT_CHECK(cs, ns && !strcmp(ns, "sent"), "the notice is %s 60 s after the receiver came back",
           ns ? ns : "(none)");
  free(ns);
  json_t *reqs = it_recorder_requests(c->hook, NULL);
  size_t nreq = json_array_size(reqs), same = 0;
  const char *key0 = NULL;
  for (size_t i = 0; i < nreq; i++) {
    json_t *r = json_array_get(reqs, i);
    const char *key = json_string_value(json_object_get(json_object_get(r, "headers"), "idempotency-key"));
    const char *body = json_string_value(json_object_get(r, "body"));
    if (!body || !strstr(body, gid)) continue;
    if (!key0) key0 = key;
    if (key && key0 && !strcmp(key, key0) && !strncmp(key, gid, strlen(gid))) same++;
  }
  bool all_same = same >= 2 && same == nreq;
  json_decref(reqs);
  IT_CHECK(cs, all_same, "expected every attempt (at least the failed one and the delivered one)"
           " to carry the grant's Idempotency-Key: %zu of %zu did", same, nreq);
  IT_CHECK(cs, count_events(c, pat) == 1, "the notice was published more than once");
  free(gid);
}

static void c_leaver(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  static const struct {
    const char *item, *group, *connector;
  } g[] = {{"figma", "app-figma-editor", "scim-main"}, {"jira", "app-jira-user", "scim-main"},
           {"zoom", "app-zoom-user", "scim-main"},     {"eng-wiki", "ldap-eng", "ldap-corp"},
           {"ops-tools", "ldap-ops", "ldap-corp"}};
  char rids[5][QM_UUID_STR_LEN];
  for (int i = 0; i < 5; i++) {
    new_id(rids[i]);
    it_approved_t a = {.request_id = rids[i], .person_id = "p-0220", .item_id = g[i].item,
                       .role_id = "user", .group = g[i].group, .connector = g[i].connector};
    it_publish_approved(st, &a);
  }
  /* A colleague in the same group must keep access. */
  char rk[QM_UUID_STR_LEN];
  new_id(rk);
  it_approved_t k = {.request_id = rk, .person_id = "p-0221", .item_id = "jira", .role_id = "user",
                     .group = "app-jira-user"};
  it_publish_approved(st, &k);
  want_events(cs, c, "{\"event\":\"granted\",\"subject_person_id\":\"p-0220\"}", 5);
  want_events(cs, c, "{\"event\":\"granted\",\"subject_person_id\":\"p-0221\"}", 1);
  /* A sixth grant that cannot be applied yet (the directory does not know
   * the login; retried with backoff): the leaver must cancel it, never apply it. */
  char rg[QM_UUID_STR_LEN];
  new_id(rg);
  it_approved_t ghost = {.request_id = rg, .person_id = "p-0220", .username = "ghost-0220",
                         .item_id = "ops-tools", .role_id = "admin", .group = "ldap-ops",
                         .connector = "ldap-corp"};
  it_publish_approved(st, &ghost);
  char *q = qm_asprintf("SELECT count(*) FROM provisioning.grant_ops o JOIN provisioning.grants g"
                        " USING (grant_id) WHERE g.request_id = '%s' AND o.attempts > 0", rg);
  int64_t tried_by = it_now_ms() + 10000;
  while (it_pg_int(st, q) == 0 && it_now_ms() < tried_by) it_sleep_ms(50);
  IT_CHECK(cs, it_pg_int(st, q) == 1, "the ghost grant was never attempted");
  free(q);
  char today[16];
  it_date(0, today, sizeof(today));
  char hr_id[QM_UUID_STR_LEN];
  new_id(hr_id);
  it_hr_event_t ev = {.kind = "leaver", .effective_date = today, .source_event_id = hr_id,
                      .person = {.id = "p-0220", .status = "terminated"}};
  it_hr_publish(st, &ev);
  want_events(cs, c, "{\"event\":\"revoked\",\"subject_person_id\":\"p-0220\",\"reason\":\"leaver\"}", 5);
  /* Each grant its own event, none twice. */
  for (int i = 0; i < 5; i++) {
    char pat[512];
    snprintf(pat, sizeof(pat), "{\"event\":\"revoked\",\"request_id\":\"%s\"}", rids[i]);
    IT_CHECK(cs, count_events(c, pat) == 1, "grant of %s: %d AccessRevoked", g[i].group,
             count_events(c, pat));
  }
  json_t *m = it_scim_members(st, "app-jira-user");
  IT_CHECK(cs, !has_member(m, "p-0220") && has_member(m, "p-0221"),
           "app-jira-user after the leaver: the leaver must be gone and the colleague stay");
  json_decref(m);
  m = it_slapd_members(c->slapd, "ldap-ops");
  IT_CHECK(cs, !has_member(m, "p-0220"), "leaver still in LDAP group ldap-ops");
  IT_CHECK(cs, json_object_size(m) >= 8, "the leaver took other members of ldap-ops with them");
  json_decref(m);
  /* The time it took is recorded. */
  it_resp_t r;
  int64_t deadline = it_now_ms() + 20000;
  const json_t *item = NULL;
  for (;;) {
    it_http(st, "provisioning", "GET", "/v1/leavers/p-0220", c->admin, NULL, NULL, &r);
    item = json_array_get(json_object_get(r.json, "items"), 0);
    if (json_object_get(item, "seconds") || it_now_ms() > deadline) break;
    it_resp_clear(&r);
    it_sleep_ms(200);
  }
  IT_CHECK(cs, r.status == 200 && json_integer_value(json_object_get(item, "grants")) == 6 &&
                   json_is_real(json_object_get(item, "seconds")),
           "GET /v1/leavers/p-0220: %ld %s", r.status, r.body);
  fprintf(stderr, "[it provisioning] leaver with 5 grants deprovisioned in %.3f s\n",
          json_real_value(json_object_get(item, "seconds")));
  it_resp_clear(&r);
  /* A leaver dated tomorrow waits: nothing revoked now, a timer for the date. */
  char rt[QM_UUID_STR_LEN];
  new_id(rt);
  it_approved_t t = {.request_id = rt, .person_id = "p-0222", .item_id = "zoom", .role_id = "user",
                     .group = "app-zoom-user"};
  it_publish_approved(st, &t);
  want_events(cs, c, "{\"event\":\"granted\",\"subject_person_id\":\"p-0222\"}", 1);
  char tomorrow[16];
  it_date(1, tomorrow, sizeof(tomorrow));
  it_hr_event_t later = {.kind = "leaver", .effective_date = tomorrow,
                         .person = {.id = "p-0222", .status = "terminated"}};
  it_hr_publish(st, &later);
  int64_t until = it_now_ms() + 10000;
  long long waiting = 0;
  while (it_now_ms() < until &&
         (waiting = it_pg_int(st, "SELECT count(*) FROM provisioning.timers WHERE kind = 'leaver'"
                                  " AND owner_key = 'p-0222' AND status = 'pending'")) == 0)
    it_sleep_ms(100);
  IT_CHECK(cs, waiting == 1, "no pending leaver timer for a leaver dated %s", tomorrow);
  IT_CHECK(cs, count_events(c, "{\"event\":\"revoked\",\"subject_person_id\":\"p-0222\"}") == 0,
           "a leaver dated tomorrow was revoked today");
  /* The ghost grant: revoked without ever being applied or announced. */
  char *gs = grant_state(st, rg);
  IT_CHECK(cs, !strcmp(gs, "revoked"), "the unapplied grant is %s, not revoked", gs);
  free(gs);
  char gp[512];
  snprintf(gp, sizeof(gp), "{\"request_id\":\"%s\"}", rg);
  IT_CHECK(cs, count_events(c, gp) == 0,
           "the unapplied grant of a leaver was announced (granted, revoked or failed)");
  /* An approval that was in flight when the person left: never applied. */
  char rl[QM_UUID_STR_LEN];
  new_id(rl);
  it_approved_t late = {.request_id = rl, .person_id = "p-0220", .item_id = "slack",
                        .role_id = "user", .group = "app-slack-user"};
  it_publish_approved(st, &late);
  char *lq = qm_asprintf("SELECT coalesce(state || '/' || revoke_reason, state)"
                         " FROM provisioning.grants WHERE request_id = '%s'", rl);
  char *ls = NULL;
  int64_t lb = it_now_ms() + T_EVENT;
  while (!(ls = it_pg_scalar(st, lq)) && it_now_ms() < lb) it_sleep_ms(100);
  IT_CHECK(cs, ls && !strcmp(ls, "revoked/leaver"), "a leaver's late approval became %s",
           ls ? ls : "(nothing)");
  free(ls);
  free(lq);
  m = it_scim_members(st, "app-slack-user");
  IT_CHECK(cs, !has_member(m, "p-0220"), "a leaver was added to app-slack-user");
  json_decref(m);
  /* Rehired: approvals apply again. */
  it_hr_event_t back = {.kind = "joiner", .effective_date = today,
                        .person = {.id = "p-0220", .status = "active"}};
  it_hr_publish(st, &back);
  char rr[QM_UUID_STR_LEN];
  new_id(rr);
  it_approved_t again = {.request_id = rr, .person_id = "p-0220", .item_id = "slack",
                         .role_id = "user", .group = "app-slack-user"};
  approve_and_wait(st, cs, &again);
  m = it_scim_members(st, "app-slack-user");
  IT_CHECK(cs, has_member(m, "p-0220"), "the rehired person's new grant was not applied");
  json_decref(m);
  /* The same HR event again: dropped. */
  it_hr_publish(st, &ev);
  it_sleep_ms(1500);
  IT_CHECK(cs, count_events(c, "{\"event\":\"revoked\",\"subject_person_id\":\"p-0220\"}") == 5,
           "a repeated leaver event revoked again");
}

static void c_drift(it_stack_t *st, it_cases_t *cs) {
  ctx_t *c = cs->ctx;
  /* LDAP (repair on for ldap-corp): a stranger added, a grantee removed. */
  it_slapd_modify(c->slapd, "ldap-ops", "add", "p-0240");
  it_slapd_modify(c->slapd, "ldap-ops", "delete", "p-0204");
  /* SCIM (repair off): a stranger in a managed group. */
  it_scim_member_set(st, "app-figma-viewer", "p-0241", true);
  int before = count_events(c, "{\"event\":\"drift\"}");
  it_resp_t r;
  it_http(st, "provisioning", "POST", "/v1/drift/run", c->admin, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200, "POST /v1/drift/run: %ld %s", r.status, r.body);
  long long findings = json_integer_value(json_object_get(r.json, "findings"));
  it_resp_clear(&r);
  IT_CHECK(cs, findings == 3, "expected exactly 3 drift findings, got %lld", findings);
  want_events(cs, c,
              "{\"event\":\"drift\",\"connector\":\"ldap-corp\",\"group\":\"ldap-ops\","
              "\"finding\":\"member_without_grant\",\"repaired\":true}", 1);
  want_events(cs, c,
              "{\"event\":\"drift\",\"connector\":\"ldap-corp\",\"group\":\"ldap-ops\","
              "\"finding\":\"grant_without_member\",\"subject_person_id\":\"p-0204\","
              "\"repaired\":true}", 1);
  want_events(cs, c,
              "{\"event\":\"drift\",\"connector\":\"scim-main\",\"group\":\"app-figma-viewer\","
              "\"finding\":\"member_without_grant\",\"repaired\":false}", 1);
  IT_CHECK(cs, count_events(c, "{\"event\":\"drift\"}") - before == 3, "more drift events than findings");
  json_t *m = it_slapd_members(c->slapd, "ldap-ops");
  IT_CHECK(cs, !has_member(m, "p-0240"), "the LDAP stranger was not removed by the repair");
  IT_CHECK(cs, has_member(m, "p-0204"), "the missing LDAP grantee was not re-added");
  json_decref(m);
  m = it_scim_members(st, "app-figma-viewer");
  IT_CHECK(cs, has_member(m, "p-0241"), "SCIM drift was repaired although repair is off there");
  json_decref(m);
  /* Each repair was on record before the directory was changed, then marked
   * with its outcome; an unrepaired finding never started one. */
  long long repairs = it_pg_int(st, "SELECT count(*) FROM provisioning.drift_findings"
                                    " WHERE repaired AND repair_started_at IS NOT NULL"
                                    " AND repair_finished_at >= repair_started_at");
  long long stray = it_pg_int(st, "SELECT count(*) FROM provisioning.drift_findings"
                                  " WHERE (repaired AND repair_started_at IS NULL)"
                                  " OR (NOT repaired AND repair_started_at IS NOT NULL)");
  IT_CHECK(cs, repairs == 2 && stray == 0,
           "drift_findings: %lld repair(s) recorded before and after (want 2), %lld inconsistent",
           repairs, stray);
  /* Repaired: a second run finds only what was left unrepaired. */
  it_http(st, "provisioning", "POST", "/v1/drift/run", c->admin, NULL, NULL, &r);
  findings = json_integer_value(json_object_get(r.json, "findings"));
  it_resp_clear(&r);
  IT_CHECK(cs, findings == 1, "second drift run: expected 1 finding (SCIM unrepaired), got %lld",
           findings);
  /* What happened shows in the metrics. */
  it_http(st, "provisioning", "GET", "/metrics", NULL, NULL, NULL, &r);
  bool found = false;
  double revokes = it_metric(r.body, "qm_provisioning_operations_total", "op=revoke,outcome=done",
                             &found);
  double drift = it_metric(r.body, "qm_provisioning_drift_findings_total",
                           "finding=member_without_grant,repaired=true", NULL);
  double leaver = it_metric(r.body, "qm_provisioning_leaver_seconds_count", NULL, NULL);
  double notices = it_metric(r.body, "qm_provisioning_expiry_notices_total", "outcome=sent", NULL);
  it_resp_clear(&r);
  IT_CHECK(cs, found && revokes >= 10 && drift == 1 && leaver >= 1 && notices >= 2,
           "metrics: revokes %.0f, drift repaired %.0f, leavers %.0f, notices sent %.0f", revokes,
           drift, leaver, notices);
}

/* An approval whose ids do not fit provisioning's operations is refused as
 * poison (dead-lettered with the reason), never cut short and applied. */
static void c_long_ids_dead_lettered(it_stack_t *st, it_cases_t *cs) {
  it_reader_t *dlq = it_reader_open(st, QM_TOPIC_DECISIONS ".dlq");
  char grp[300];
  memset(grp, 'g', sizeof(grp) - 1);
  grp[sizeof(grp) - 1] = '\0';
  it_approved_t a = {.request_id = "it-long-group-1", .person_id = "p-0100", .item_id = "figma",
                     .role_id = "viewer", .group = grp};
  it_publish_approved(st, &a);
  json_t *pat = json_pack("{s:s}", "ce_subject", "it-long-group-1");
  int n = it_reader_wait(dlq, pat, 1, 30000);
  json_decref(pat);
  it_reader_close(dlq);
  IT_CHECK(cs, n == 1, "an approval with a 299-byte group was not dead-lettered");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM provisioning.grants"
                             " WHERE request_id = 'it-long-group-1'") == 0,
           "a grant was recorded for an approval with a 299-byte group");
}

Test(provisioning, grants_revocation_expiry_leaver_drift, .fini = it_fini, .timeout = 600) {
  static const char *const groups[] = {"ldap-eng", "ldap-ops", NULL};
  it_slapd_t *slapd = it_slapd_start(groups, 300);
  it_recorder_t *hook = it_recorder_start();
  char *conn = it_slapd_connector_json(slapd);
  /* drift_repair on for LDAP only; QM_DRIFT_REPAIR stays off for SCIM. */
  char *file_text = qm_asprintf("{\"connectors\": {\"ldap-corp\": %.*s, \"drift_repair\": true}}}",
                                (int)strlen(conn) - 1, conn);
  free(conn);
  char *dir = it_dir_copy_yaml(QM_SOURCE_DIR "/deploy/local/seed", "prov");
  it_file_write(dir, "connectors.json", file_text);
  free(file_text);
  char *cf = qm_asprintf("QM_CONNECTORS_FILE=%s/connectors.json", dir);
  char *wh = qm_asprintf("QM_EXPIRY_WEBHOOK_URL=%s/hooks/expiry", it_recorder_url(hook));
  const it_svc_env_t env[] = {
      {"provisioning", cf},
      {"provisioning", wh},
      {"provisioning", "QM_PROVISIONING_DAY=2s"},
      {"provisioning", "QM_EXPIRY_NOTICE_BEFORE=2s"},
      {"provisioning", "QM_PROVISIONING_TICK=100ms"},
      {"provisioning", "QM_DRIFT_INTERVAL=0"},
      {"provisioning", "QM_PROVISIONING_BACKOFF=200ms"},
      {"provisioning", "QM_EXPIRY_WEBHOOK_BACKOFF=200ms"},
      {NULL, NULL},
  };
  static const char *const only[] = {"provisioning", NULL};
  it_stack_t *st = it_stack_up_env("prov", only, env);
  ctx_t c = {.access = it_reader_open(st, QM_TOPIC_ACCESS), .hook = hook, .slapd = slapd,
             .admin = it_token("p-0001", "it_admin")};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &c;
  it_case_run(&cs, st, "a bad connectors file stops start-up (exit 2)", c_bad_connectors_file);
  it_case_run(&cs, st, "SCIM grant, and a re-delivered approval granted once", c_scim_grant_and_regrant);
  it_case_run(&cs, st, "LDAP grants batched into one group", c_ldap_grant_batch);
  it_case_run(&cs, st, "admin revoke (SCIM), grants by person and by item", c_admin_revoke);
  it_case_run(&cs, st, "mover revocation (LDAP, last member of a groupOfNames)",
              c_mover_revoke_ldap_last_member);
  it_case_run(&cs, st, "two grants of one group: membership kept until the last is revoked",
              c_two_grants_one_membership);
  it_case_run(&cs, st, "expiry on a short clock, notice webhook, extension", c_expiry_notice_extension);
  it_case_run(&cs, st, "leaver: every grant revoked, each with its event, timed", c_leaver);
  it_case_run(&cs, st, "drift found (SCIM, LDAP) and repaired (LDAP)", c_drift);
  it_case_run(&cs, st, "expiry notice receiver down: leaver not held up, notice delivered later",
              c_notice_receiver_down);
  it_case_run(&cs, st, "over-long ids dead-lettered, not cut short", c_long_ids_dead_lettered);
  bool ok = it_cases_report(&cs, "provisioning");
  it_reader_close(c.access);
  free(c.admin);
  cr_assert(ok, "some provisioning cases failed (see above)");
  it_stack_down(st);
  it_recorder_stop(hook);
  it_slapd_stop(slapd);
  it_dir_remove(dir);
  free(dir);
  free(cf);
  free(wh);
}
