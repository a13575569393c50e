/*
 * test_approval: qm-approval (issue 4) against the real stack — requests are
 * submitted on intake, approval's plans, steps and decisions are read back
 * from its API (GET /v1/approvals/requests/{id}), its tables and
 * qm.decisions.v1, and its webhook notifications from an HTTP recorder.
 *
 * routing (one stack, long clocks):
 *   standard → manager; automatic where the catalog allows; sensitive → app
 *   owner; elevated + regulated → app owner, then security, with an expiry;
 *   cost above the threshold → + finance; self-approval refused; the manager
 *   who asks → the manager's manager; away → delegate (new steps and steps
 *   already waiting); away without delegate → fallback chain; separation of
 *   duties refused; break-glass; cancellation and a leaver close steps and
 *   timers; a failing webhook never blocks a decision and is retried; an
 *   approver who leaves hands their steps on.
 *
 * timers (one stack, second-long clocks, a private Redis, two approval
 * instances): separation of duties routed to security; reminder →
 * escalation → auto-reject; an instance killed with timers in flight; a
 * FLUSHALL with timers pending — in both, every timer fires exactly once.
 *
 * webhook_hangs (one stack, one pooled connection, 2 s webhook timeout): the
 * receiver hangs, the API keeps answering promptly and every notification
 * is delivered once after it recovers; an instance killed while it posts
 * has its notification taken over at once by the restarted instance;
 * comments reach Slack escaped.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ap_ctx {
  it_recorder_t *hooks;
  it_reader_t *decisions;
  it_redis_t *redis;
  char *staff; /* token: p-0099 auditor (reads every request's approvals) */
} ap_ctx_t;

/* ------------------------------------------------------------ helpers */

/* Submits item/role for subject as requester (roles csv). Returns the id. */
static char *submit(it_stack_t *st, const char *requester, const char *roles, const char *subject,
                    const char *item, const char *role) {
  char *tok = it_token(requester, roles);
  char *body = qm_asprintf("{\"subject_person_id\":\"%s\",\"reason\":\"test_approval\","
                           "\"lines\":[{\"item_id\":\"%s\",\"role_id\":\"%s\"%s}]}",
                           subject, item, role,
                           !strcmp(role, "prod-admin") ? ",\"duration_days\":7" : "");
  char *id = it_request_submit(st, tok, body);
  free(body);
  free(tok);
  return id;
}

/* GET /v1/approvals/requests/{id} as staff; NULL unless 200. */
static json_t *approvals_of(it_stack_t *st, ap_ctx_t *cx, const char *id) {
  char path[200];
  snprintf(path, sizeof(path), "/v1/approvals/requests/%s", id);
  it_resp_t r;
  it_http(st, "approval", "GET", path, cx->staff, NULL, NULL, &r);
  json_t *j = r.status == 200 ? json_incref(r.json) : NULL;
  it_resp_clear(&r);
  return j;
}

static const char *jget(const json_t *o, const char *k) {
  const char *s = json_string_value(json_object_get(o, k));
  return s ? s : "";
}

/* Waits until the request's step of this stage is `status`; returns it
 * (caller json_decref()s) or ends the case. */
static json_t *wait_step(it_cases_t *cs, it_stack_t *st, const char *id, int stage,
                         const char *status, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  char *last = NULL;
  for (;;) {
    json_t *a = approvals_of(st, cs->ctx, id);
    json_t *steps = json_object_get(a, "steps");
    size_t i;
    json_t *s;
    json_array_foreach(steps, i, s) {
      if (json_integer_value(json_object_get(s, "stage")) == stage &&
          !strcmp(jget(s, "status"), status)) {
        json_incref(s);
        json_decref(a);
        free(last);
        return s;
      }
    }
    free(last);
    last = a ? it_json_text(a) : qm_strdup("(no answer)");
    json_decref(a);
    if (it_now_ms() >= deadline) {
      char msg[2048];
      snprintf(msg, sizeof(msg), "%s", last);
      free(last);
      it_case_fail(cs, __FILE__, __LINE__, "request %s: no stage %d step '%s' within %d ms: %s",
                   id, stage, status, timeout_ms, msg);
    }
    it_sleep_ms(50);
  }
}

/* Waits until line 1 of the request is `status` in approval; returns the line. */
static json_t *wait_line(it_cases_t *cs, it_stack_t *st, const char *id, const char *status,
                         int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    json_t *a = approvals_of(st, cs->ctx, id);
    json_t *l = json_array_get(json_object_get(a, "lines"), 0);
    if (l && !strcmp(jget(l, "status"), status)) {
      json_incref(l);
      json_decref(a);
      return l;
    }
    if (it_now_ms() >= deadline) {
      char *t = a ? it_json_text(a) : qm_strdup("(no answer)");
      char msg[2048];
      snprintf(msg, sizeof(msg), "%s", t);
      free(t);
      json_decref(a);
      it_case_fail(cs, __FILE__, __LINE__, "request %s: line not '%s' within %d ms: %s", id,
                   status, timeout_ms, msg);
    }
    json_decref(a);
    it_sleep_ms(50);
  }
}

/* The i-th approver id of a step. */
static const char *approver(const json_t *step, size_t i) {
  const char *s = json_string_value(json_array_get(json_object_get(step, "approver_ids"), i));
  return s ? s : "";
}

/* POST approve/deny as who; returns the HTTP status (body in *out when not NULL). */
static long decide(it_stack_t *st, const char *who, const char *step_id, bool approve,
                   const char *comment, it_resp_t *out) {
  char *tok = it_token(who, "employee,manager,approver");
  char path[200];
  snprintf(path, sizeof(path), "/v1/approvals/steps/%s/%s", step_id, approve ? "approve" : "deny");
  char *body = comment ? qm_asprintf("{\"comment\":\"%s\"}", comment) : NULL;
  it_resp_t r;
  long s = it_http(st, "approval", "POST", path, tok, body, NULL, &r);
  if (out) *out = r;
  else it_resp_clear(&r);
  free(body);
  free(tok);
  return s;
}

/* Decides and checks 200. */
static void approve_ok(it_cases_t *cs, it_stack_t *st, const char *who, const json_t *step) {
  it_resp_t r;
  long s = decide(st, who, jget(step, "step_id"), true, "ok", &r);
  IT_CHECK(cs, s == 200, "%s approving %s: %ld %s", who, jget(step, "step_id"), s, r.body);
  it_resp_clear(&r);
}

/* Waits until a webhook body contains every needle (NULL-terminated). */
static bool hook_wait(it_recorder_t *rec, const char *const *needles, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  for (;;) {
    json_t *all = it_recorder_requests(rec, "/hooks");
    size_t i;
    json_t *q;
    bool found = false;
    json_array_foreach(all, i, q) {
      const char *b = jget(q, "body");
      bool every = true;
      for (size_t k = 0; needles[k]; k++) every = every && strstr(b, needles[k]) != NULL;
      if (every) found = true;
    }
    json_decref(all);
    if (found) return true;
    if (it_now_ms() >= deadline) return false;
    it_sleep_ms(50);
  }
}

/* How many events of ce_type about request id (ce_subject) were read. */
static int count_events(it_reader_t *rd, const char *type, const char *id, int min, int wait_ms) {
  json_t *pat = json_pack("{s:s, s:s}", "ce_type", type, "ce_subject", id);
  int n = it_reader_wait(rd, pat, min, wait_ms);
  json_decref(pat);
  return n;
}

/* The last decoded event of ce_type about request id (waits up to wait_ms for
 * one); NULL when none. Caller json_decref()s. */
static json_t *event_of(it_reader_t *rd, const char *type, const char *id, int wait_ms) {
  if (count_events(rd, type, id, 1, wait_ms) < 1) return NULL;
  json_t *found = NULL;
  size_t i;
  json_t *e;
  json_array_foreach(it_reader_events(rd), i, e) {
    if (!strcmp(jget(e, "ce_type"), type) && !strcmp(jget(e, "ce_subject"), id)) found = e;
  }
  return json_incref(found);
}

static long long pg_count(it_stack_t *st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static long long pg_count(it_stack_t *st, const char *fmt, ...) {
  char sql[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(sql, sizeof(sql), fmt, ap);
  va_end(ap);
  return it_pg_int(st, sql);
}

/* How many timers of the request's steps are in status. */
static long long step_timers(it_stack_t *st, const char *id, const char *status) {
  return pg_count(st, "SELECT count(*) FROM approval.timers t JOIN approval.approval_steps s"
                      " ON s.step_id = t.owner_key WHERE s.request_id = '%s' AND t.status = '%s'",
                  id, status);
}

/* ------------------------------------------------------------ routing cases */

static void c_standard_manager(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0013", "employee", "p-0013", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(jget(s, "kind"), "manager") && !strcmp(approver(s, 0), "p-0002"),
           "standard risk goes to the manager p-0002: %s", it_json_text(s));
  /* The manager's inbox: the step with the context to decide. */
  char *tok = it_token("p-0002", "employee,manager");
  it_resp_t r;
  it_http(st, "approval", "GET", "/v1/approvals/inbox", tok, NULL, NULL, &r);
  json_t *item = NULL;
  size_t i;
  json_t *it;
  json_array_foreach(json_object_get(r.json, "items"), i, it) {
    if (!strcmp(jget(it, "request_id"), id)) item = it;
  }
  IT_CHECK(cs, r.status == 200 && item, "inbox of p-0002 lacks %s: %s", id, r.body);
  json_t *subj = json_object_get(item, "subject");
  IT_CHECK(cs, !strcmp(jget(subj, "department"), "Engineering") &&
                   !strcmp(jget(subj, "title"), "Software Engineer") &&
                   !strcmp(jget(item, "risk"), "standard") && !strcmp(jget(item, "item_id"), "figma") &&
                   !strcmp(jget(item, "reason"), "test_approval") &&
                   !strcmp(jget(json_object_get(item, "requester"), "id"), "p-0013") &&
                   json_is_array(json_object_get(item, "holds")) &&
                   json_is_array(json_object_get(item, "sod_warnings")) &&
                   json_object_get(item, "cost") != NULL,
           "inbox context incomplete: %s", it_json_text(item));
  it_resp_clear(&r);
  free(tok);
  const char *n1[] = {"Approval needed", id, "p-0002", NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, n1, 15000), "no 'Approval needed' webhook to p-0002");
  approve_ok(cs, st, "p-0002", s);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  IT_CHECK(cs, count_events(cx->decisions, "qm.request.approved.v1", id, 1, 20000) == 1,
           "one RequestApproved for %s", id);
  IT_CHECK(cs, count_events(cx->decisions, "qm.approval.step_decided.v1", id, 1, 5000) == 1,
           "one StepDecided");
  const char *n2[] = {"Approved", id, "p-0013", NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, n2, 15000), "no 'Approved' webhook to the requester");
  json_decref(s);
  free(id);
}

static void c_automatic(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0013", "employee", "p-0013", "figma", "viewer");
  json_decref(wait_line(cs, st, id, "approved", 20000));
  json_t *a = approvals_of(st, cx, id);
  IT_CHECK(cs, json_array_size(json_object_get(a, "steps")) == 0,
           "an automatic approval has no steps: %s", it_json_text(a));
  json_decref(a);
  free(id);
}

static void c_sensitive_app_owner_denied(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0019", "employee", "p-0019", "github", "write");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(jget(s, "kind"), "app_owner") && !strcmp(approver(s, 0), "p-0011"),
           "sensitive goes to the app owner p-0011: %s", it_json_text(s));
  it_resp_t r;
  long code = decide(st, "p-0011", jget(s, "step_id"), false, NULL, &r);
  IT_CHECK(cs, code == 400 && strstr(r.body, "comment"), "a denial without comment: %ld %s", code,
           r.body);
  it_resp_clear(&r);
  code = decide(st, "p-0012", jget(s, "step_id"), true, "not mine", &r);
  IT_CHECK(cs, code == 403, "someone who is not an approver: %ld %s", code, r.body);
  it_resp_clear(&r);
  code = decide(st, "p-0011", jget(s, "step_id"), false, "use read instead", &r);
  IT_CHECK(cs, code == 200, "deny: %ld %s", code, r.body);
  it_resp_clear(&r);
  json_t *l = wait_line(cs, st, id, "rejected", 20000);
  IT_CHECK(cs, !strcmp(jget(l, "reject_reason"), "use read instead"), "reason: %s",
           it_json_text(l));
  IT_CHECK(cs, count_events(cx->decisions, "qm.request.rejected.v1", id, 1, 20000) == 1,
           "one RequestRejected");
  json_t *ev = event_of(cx->decisions, "qm.request.rejected.v1", id, 1000);
  IT_CHECK(cs, ev && !strcmp(jget(ev, "reason"), "use read instead") &&
                   !strcmp(json_string_value(json_array_get(json_object_get(ev, "rejected_by"), 0)),
                           "p-0011"),
           "RequestRejected with the reason and who: %s", ev ? it_json_text(ev) : "(none)");
  json_decref(ev);
  code = decide(st, "p-0011", jget(s, "step_id"), true, "changed my mind", &r);
  IT_CHECK(cs, code == 409, "deciding a decided step: %ld %s", code, r.body);
  it_resp_clear(&r);
  json_decref(l);
  json_decref(s);
  free(id);
}

static void c_elevated_security_expiry(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0025", "employee", "p-0025", "aws", "prod-admin");
  json_t *s1 = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(jget(s1, "kind"), "app_owner") && !strcmp(approver(s1, 0), "p-0012"),
           "elevated goes to the app owner p-0012 first: %s", it_json_text(s1));
  approve_ok(cs, st, "p-0012", s1);
  json_t *s2 = wait_step(cs, st, id, 2, "pending", 20000);
  IT_CHECK(cs, !strcmp(jget(s2, "kind"), "security") && !strcmp(approver(s2, 0), "p-0005"),
           "a regulated item adds security: %s", it_json_text(s2));
  approve_ok(cs, st, "p-0011", s2);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  json_t *ev = event_of(cx->decisions, "qm.request.approved.v1", id, 20000);
  json_t *want = json_pack("[s, s]", "p-0012", "p-0011");
  IT_CHECK(cs, ev && json_equal(json_object_get(ev, "approvers"), want) &&
                   json_integer_value(json_object_get(ev, "grant_duration_days")) == 7 &&
                   json_is_false(json_object_get(ev, "break_glass")),
           "RequestApproved with both approvers in stage order and the expiry: %s",
           ev ? it_json_text(ev) : "(none)");
  json_decref(want);
  json_decref(ev);
  const char *n[] = {"Approved", "expires 7 days", id, NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, n, 15000), "elevated approval without its 7-day expiry");
  json_decref(s1);
  json_decref(s2);
  free(id);
}

static void c_cost_finance(it_stack_t *st, it_cases_t *cs) {
  char *id = submit(st, "p-0015", "employee", "p-0015", "netsuite", "user");
  static const char *const kinds[] = {"app_owner", "finance", "security"};
  static const char *const who[] = {"p-0014", "p-0003", "p-0005"};
  for (int stage = 1; stage <= 3; stage++) {
    json_t *s = wait_step(cs, st, id, stage, "pending", 20000);
    IT_CHECK(cs, !strcmp(jget(s, "kind"), kinds[stage - 1]) &&
                     !strcmp(approver(s, 0), who[stage - 1]),
             "stage %d should be %s (%s): %s", stage, kinds[stage - 1], who[stage - 1],
             it_json_text(s));
    approve_ok(cs, st, who[stage - 1], s);
    json_decref(s);
  }
  json_decref(wait_line(cs, st, id, "approved", 20000));
  free(id);
}

static void c_self_approval(it_stack_t *st, it_cases_t *cs) {
  /* The app owner asks for their own app: their manager decides. */
  char *id = submit(st, "p-0011", "employee", "p-0011", "github", "write");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0006") && json_array_size(json_object_get(s, "approver_ids")) == 1,
           "the owner's own request goes to their manager p-0006: %s", it_json_text(s));
  it_resp_t r;
  long code = decide(st, "p-0011", jget(s, "step_id"), true, "me", &r);
  IT_CHECK(cs, code == 403 && strstr(r.body, "self-approval"), "self-approval: %ld %s", code,
           r.body);
  it_resp_clear(&r);
  json_t *l = wait_line(cs, st, id, "pending", 1000);
  json_decref(l);
  json_decref(s);
  free(id);
}

static void c_manager_is_requester(it_stack_t *st, it_cases_t *cs) {
  char *id = submit(st, "p-0002", "employee,manager", "p-0031", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0001"),
           "the manager asked: the manager's manager p-0001 decides: %s", it_json_text(s));
  it_resp_t r;
  long code = decide(st, "p-0002", jget(s, "step_id"), true, "mine", &r);
  IT_CHECK(cs, code == 403 && strstr(r.body, "self-approval"), "requester approving: %ld %s",
           code, r.body);
  it_resp_clear(&r);
  approve_ok(cs, st, "p-0001", s);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  json_decref(s);
  free(id);
}

static void c_delegation(it_stack_t *st, it_cases_t *cs) {
  /* A step already waiting for p-0004 before they leave. */
  char *before = submit(st, "p-0027", "employee", "p-0027", "figma", "editor");
  json_t *sb = wait_step(cs, st, before, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(sb, 0), "p-0004"), "p-0027's manager p-0004: %s",
           it_json_text(sb));
  char *tok4 = it_token("p-0004", "employee,manager");
  it_resp_t r;
  long code = it_http(st, "approval", "PUT", "/v1/approvals/away", tok4,
                      "{\"delegate_id\":\"p-0004\"}", NULL, &r);
  IT_CHECK(cs, code == 400, "delegating to oneself: %ld %s", code, r.body);
  it_resp_clear(&r);
  code = it_http(st, "approval", "PUT", "/v1/approvals/away", tok4,
                 "{\"delegate_id\":\"p-0003\",\"note\":\"holiday\"}", NULL, &r);
  IT_CHECK(cs, code == 200 && !strcmp(jget(r.json, "delegate_id"), "p-0003"), "away: %ld %s",
           code, r.body);
  it_resp_clear(&r);
  /* A new step routes to the delegate. */
  char *id = submit(st, "p-0021", "employee", "p-0021", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0003") &&
                   !strcmp(json_string_value(json_array_get(json_object_get(s, "delegated_from"), 0)),
                           "p-0004"),
           "p-0004 away: their delegate p-0003 decides: %s", it_json_text(s));
  /* The delegate's inbox: both, marked delegated. */
  char *tok3 = it_token("p-0003", "employee,manager");
  it_http(st, "approval", "GET", "/v1/approvals/inbox", tok3, NULL, NULL, &r);
  int seen = 0;
  size_t i;
  json_t *it;
  json_array_foreach(json_object_get(r.json, "items"), i, it) {
    if ((!strcmp(jget(it, "request_id"), id) || !strcmp(jget(it, "request_id"), before)) &&
        json_is_true(json_object_get(it, "delegated")))
      seen++;
  }
  IT_CHECK(cs, seen == 2, "the delegate's inbox should hold both delegated items: %s", r.body);
  it_resp_clear(&r);
  approve_ok(cs, st, "p-0003", s);
  approve_ok(cs, st, "p-0003", sb);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  json_decref(wait_line(cs, st, before, "approved", 20000));
  code = it_http(st, "approval", "DELETE", "/v1/approvals/away", tok4, NULL, NULL, &r);
  IT_CHECK(cs, code == 204, "clearing away: %ld %s", code, r.body);
  it_resp_clear(&r);
  code = it_http(st, "approval", "GET", "/v1/approvals/away", tok4, NULL, NULL, &r);
  IT_CHECK(cs, code == 404, "away cleared: %ld %s", code, r.body);
  it_resp_clear(&r);
  free(tok3);
  free(tok4);
  json_decref(s);
  json_decref(sb);
  free(id);
  free(before);
}

static void c_fallback_chain(it_stack_t *st, it_cases_t *cs) {
  char *tok6 = it_token("p-0006", "employee,manager");
  it_resp_t r;
  long code = it_http(st, "approval", "PUT", "/v1/approvals/away", tok6, "{\"note\":\"offline\"}",
                      NULL, &r);
  IT_CHECK(cs, code == 200, "away without delegate: %ld %s", code, r.body);
  it_resp_clear(&r);
  char *id = submit(st, "p-0017", "employee", "p-0017", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0001"),
           "p-0006 away without delegate: the fallback p-0006's manager p-0001: %s",
           it_json_text(s));
  it_http(st, "approval", "DELETE", "/v1/approvals/away", tok6, NULL, NULL, &r);
  it_resp_clear(&r);
  free(tok6);
  json_decref(s);
  free(id);
}

static void c_sod_refused(it_stack_t *st, it_cases_t *cs) {
  char *first = submit(st, "p-0037", "employee", "p-0037", "github", "write");
  json_t *s = wait_step(cs, st, first, 1, "pending", 20000);
  approve_ok(cs, st, "p-0011", s);
  json_decref(wait_line(cs, st, first, "approved", 20000));
  char *id = submit(st, "p-0037", "employee", "p-0037", "aws", "prod-admin");
  json_t *l = wait_line(cs, st, id, "rejected", 20000);
  IT_CHECK(cs, !strcmp(jget(l, "reject_reason"), "sod-conflict") &&
                   json_array_size(json_object_get(l, "sod_warnings")) == 1,
           "holding github:write, aws:prod-admin is refused: %s", it_json_text(l));
  json_decref(l);
  json_decref(s);
  free(id);
  free(first);
}

static void c_break_glass(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0043", "employee", "p-0043", "github", "write");
  json_decref(wait_step(cs, st, id, 1, "pending", 20000));
  char path[200];
  snprintf(path, sizeof(path), "/v1/approvals/requests/%s/lines/1/break-glass", id);
  char *emp = it_token("p-0049", "employee");
  char *adm = it_token("p-0049", "employee,it_admin");
  it_resp_t r;
  long code = it_http(st, "approval", "POST", path, emp,
                      "{\"justification\":\"production is down, need write now\"}", NULL, &r);
  IT_CHECK(cs, code == 403, "break-glass without it_admin: %ld %s", code, r.body);
  it_resp_clear(&r);
  code = it_http(st, "approval", "POST", path, adm, "{\"justification\":\"now\"}", NULL, &r);
  IT_CHECK(cs, code == 400 && strstr(r.body, "justification"), "no real justification: %ld %s",
           code, r.body);
  it_resp_clear(&r);
  code = it_http(st, "approval", "POST", path, adm,
                 "{\"justification\":\"incident INC-42: production is down, need write now\"}",
                 NULL, &r);
  IT_CHECK(cs, code == 200, "break-glass: %ld %s", code, r.body);
  it_resp_clear(&r);
  json_t *l = wait_line(cs, st, id, "approved", 20000);
  IT_CHECK(cs, json_is_true(json_object_get(l, "break_glass")) &&
                   !strcmp(jget(l, "break_glass_by"), "p-0049") &&
                   strstr(jget(l, "break_glass_justification"), "INC-42"),
           "flagged record: %s", it_json_text(l));
  IT_CHECK(cs, count_events(cx->decisions, "qm.request.approved.v1", id, 1, 20000) == 1,
           "one RequestApproved");
  json_t *ev = event_of(cx->decisions, "qm.request.approved.v1", id, 1000);
  IT_CHECK(cs, ev && json_is_true(json_object_get(ev, "break_glass")) &&
                   strstr(jget(ev, "break_glass_justification"), "INC-42") &&
                   !strcmp(json_string_value(json_array_get(json_object_get(ev, "approvers"), 0)),
                           "p-0049"),
           "RequestApproved flagged break-glass: %s", ev ? it_json_text(ev) : "(none)");
  json_decref(ev);
  json_t *sd = event_of(cx->decisions, "qm.approval.step_decided.v1", id, 5000);
  IT_CHECK(cs, sd && json_is_true(json_object_get(sd, "break_glass")),
           "StepDecided flagged break-glass: %s", sd ? it_json_text(sd) : "(none)");
  json_decref(sd);
  const char *n[] = {"BREAK-GLASS", "p-0005", "INC-42", id, NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, n, 15000), "security not notified of the break-glass");
  IT_CHECK(cs, step_timers(st, id, "pending") == 0,
           "break-glass leaves timers pending");
  json_decref(l);
  free(emp);
  free(adm);
  free(id);
}

static void c_cancellation(it_stack_t *st, it_cases_t *cs) {
  char *id = submit(st, "p-0049", "employee", "p-0049", "figma", "editor");
  json_decref(wait_step(cs, st, id, 1, "pending", 20000));
  IT_CHECK(cs, step_timers(st, id, "pending") == 3,
           "a pending step has reminder, escalation and auto-reject timers");
  char *tok = it_token("p-0049", "employee");
  char path[200];
  snprintf(path, sizeof(path), "/v1/requests/%s/cancel", id);
  it_resp_t r;
  long code = it_http(st, "intake", "POST", path, tok, "{\"reason\":\"no longer needed\"}", NULL,
                      &r);
  IT_CHECK(cs, code == 200 || code == 202, "cancel on intake: %ld %s", code, r.body);
  it_resp_clear(&r);
  json_decref(wait_step(cs, st, id, 1, "cancelled", 20000));
  IT_CHECK(cs, step_timers(st, id, "cancelled") == 3,
           "cancellation closes the step's timers");
  free(tok);
  free(id);
}

static void c_leaver(it_stack_t *st, it_cases_t *cs) {
  char *id = submit(st, "p-0061", "employee", "p-0061", "figma", "editor");
  json_decref(wait_step(cs, st, id, 1, "pending", 20000));
  it_hr_leaver_today(st, "p-0061");
  /* Intake cancels the leaver's pending requests; approval closes the step. */
  json_decref(wait_step(cs, st, id, 1, "cancelled", 30000));
  IT_CHECK(cs, step_timers(st, id, "pending") == 0,
           "a leaver's step keeps timers");
  IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.people WHERE id = '%s'"
                            " AND status = 'terminated'", "p-0061") == 1,
           "approval's directory did not record the leaver");
  free(id);
}

static void c_webhook_down(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  it_recorder_set_status(cx->hooks, 503);
  size_t before = it_recorder_count(cx->hooks, "/hooks");
  char *id = submit(st, "p-0055", "employee", "p-0055", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  approve_ok(cs, st, approver(s, 0), s);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  IT_CHECK(cs, it_recorder_wait(cx->hooks, "/hooks", before + 2, 15000),
           "notifications were not attempted");
  int64_t deadline = it_now_ms() + 15000;
  while (pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                      " AND attempts >= 2 AND status = 'pending'", id) == 0 &&
         it_now_ms() < deadline)
    it_sleep_ms(100);
  IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                            " AND attempts >= 2 AND status = 'pending'", id) > 0,
           "a failed notification is retried");
  it_recorder_set_status(cx->hooks, 200);
  const char *n[] = {"Approved", id, NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, n, 20000), "the retried notification never arrived");
  json_decref(s);
  free(id);
}

static void c_approver_leaves(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0282", "employee", "p-0282", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0007"), "manager p-0007: %s", it_json_text(s));
  it_hr_leaver_today(st, "p-0007");
  IT_CHECK(cs, count_events(cx->decisions, "qm.approval.step_pending.v1", id, 2, 30000) == 2,
           "the step is announced again when its approver leaves");
  json_t *s2 = wait_step(cs, st, id, 1, "pending", 1000);
  IT_CHECK(cs, json_array_size(json_object_get(s2, "approver_ids")) == 1 &&
                   !strcmp(approver(s2, 0), "p-0001"),
           "p-0007 left: their manager p-0001 takes over: %s", it_json_text(s2));
  approve_ok(cs, st, "p-0001", s2);
  json_decref(wait_line(cs, st, id, "approved", 20000));
  json_decref(s2);
  json_decref(s);
  free(id);
}

/* ------------------------------------------------------------ timer cases */

static void c_sod_to_security(it_stack_t *st, it_cases_t *cs) {
  char *first = submit(st, "p-0013", "employee", "p-0013", "github", "write");
  json_t *s = wait_step(cs, st, first, 1, "pending", 20000);
  approve_ok(cs, st, "p-0011", s);
  json_decref(wait_line(cs, st, first, "approved", 20000));
  char *id = submit(st, "p-0013", "employee", "p-0013", "figma", "editor");
  json_t *s1 = wait_step(cs, st, id, 1, "pending", 20000);
  json_t *a = approvals_of(st, cs->ctx, id);
  json_t *steps = json_object_get(a, "steps");
  IT_CHECK(cs, json_array_size(steps) == 2 &&
                   !strcmp(jget(json_array_get(steps, 1), "kind"), "security") &&
                   json_array_size(json_object_get(s1, "sod_warnings")) == 1,
           "a conflict routed to security adds a security stage and a warning: %s",
           it_json_text(a));
  json_decref(a);
  json_decref(s1);
  json_decref(s);
  free(id);
  free(first);
}

static void c_remind_escalate_reject(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *id = submit(st, "p-0019", "employee", "p-0019", "figma", "editor");
  json_t *s = wait_step(cs, st, id, 1, "pending", 20000);
  IT_CHECK(cs, !strcmp(approver(s, 0), "p-0002"), "manager p-0002: %s", it_json_text(s));
  const char *rem[] = {"Reminder", id, "p-0002", NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, rem, 20000), "no reminder");
  const char *esc[] = {"Escalated", id, "p-0001", NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, esc, 20000), "no escalation to p-0001");
  json_t *s2 = wait_step(cs, st, id, 1, "pending", 1000);
  IT_CHECK(cs, json_array_size(json_object_get(s2, "approver_ids")) == 2 &&
                   !strcmp(approver(s2, 1), "p-0001") &&
                   json_is_true(json_object_get(s2, "escalated")),
           "escalation adds p-0001: %s", it_json_text(s2));
  json_t *l = wait_line(cs, st, id, "rejected", 30000);
  IT_CHECK(cs, !strcmp(jget(l, "reject_reason"), "timeout"), "auto-reject: %s", it_json_text(l));
  IT_CHECK(cs, count_events(cx->decisions, "qm.request.rejected.v1", id, 1, 20000) == 1,
           "one RequestRejected");
  IT_CHECK(cs, count_events(cx->decisions, "qm.approval.step_pending.v1", id, 2, 5000) == 2,
           "two StepPending (opened, escalated)");
  json_t *ev = event_of(cx->decisions, "qm.request.rejected.v1", id, 1000);
  IT_CHECK(cs, ev && !strcmp(jget(ev, "reason"), "timeout") &&
                   !strcmp(json_string_value(json_array_get(json_object_get(ev, "rejected_by"), 0)),
                           "approval"),
           "auto-reject by approval itself: %s", ev ? it_json_text(ev) : "(none)");
  json_decref(ev);
  json_t *escv = event_of(cx->decisions, "qm.approval.step_pending.v1", id, 1000);
  IT_CHECK(cs, escv && json_array_size(json_object_get(escv, "approver_ids")) == 2 &&
                   json_integer_value(json_object_get(escv, "deadline_at_ms")) > 0,
           "the escalation's StepPending names both: %s", escv ? it_json_text(escv) : "(none)");
  json_decref(escv);
  IT_CHECK(cs, step_timers(st, id, "fired") == 3,
           "reminder, escalation and auto-reject each fired");
  json_decref(l);
  json_decref(s2);
  json_decref(s);
  free(id);
}

#define BATCH_MAX 16

/* Submits n requests of figma editor for people first.. (self service) and
 * waits until each has a pending step. ids receive the request ids. */
static void submit_batch(it_cases_t *cs, it_stack_t *st, int first, int n, char **ids) {
  for (int i = 0; i < n; i++) {
    char who[16];
    snprintf(who, sizeof(who), "p-%04d", first + i);
    ids[i] = submit(st, who, "employee", who, "figma", "editor");
  }
  for (int i = 0; i < n; i++) json_decref(wait_step(cs, st, ids[i], 1, "pending", 30000));
}

/* Every request of the batch ends rejected by timeout exactly once, and
 * every one of its timers fired exactly once. */
static void check_batch_once(it_cases_t *cs, it_stack_t *st, char **ids, int n) {
  ap_ctx_t *cx = cs->ctx;
  /* From the database: the API of the instance that was killed is gone. */
  int64_t deadline = it_now_ms() + 60000;
  for (int i = 0; i < n; i++) {
    while (pg_count(st, "SELECT count(*) FROM approval.approval_lines WHERE request_id = '%s'"
                        " AND status = 'rejected'", ids[i]) == 0 && it_now_ms() < deadline)
      it_sleep_ms(100);
    IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.approval_lines WHERE request_id = '%s'"
                              " AND status = 'rejected' AND reject_reason = 'timeout'", ids[i]) == 1,
             "%s: not rejected by timeout within 60 s", ids[i]);
  }
  for (int i = 0; i < n; i++) {
    IT_CHECK(cs, count_events(cx->decisions, "qm.request.rejected.v1", ids[i], 1, 20000) == 1,
             "%s: exactly one RequestRejected", ids[i]);
    IT_CHECK(cs, step_timers(st, ids[i], "fired") == 3,
             "%s: three timers fired", ids[i]);
    IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                              " AND kind = 'reminder'", ids[i]) == 1,
             "%s: exactly one reminder", ids[i]);
    IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                              " AND kind = 'escalation'", ids[i]) == 1,
             "%s: exactly one escalation", ids[i]);
    IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.approval_steps WHERE request_id = '%s'"
                              " AND reminders = 1", ids[i]) == 1,
             "%s: the step was reminded once", ids[i]);
  }
}

static void c_two_instances_one_killed(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char port[48];
  snprintf(port, sizeof(port), "QM_REDIS_PORT=%d", it_redis_port(cx->redis));
  const char *extra[] = {port, NULL};
  it_instance_t *b = it_instance_start(st, "approval", "b", extra);
  char *ids[BATCH_MAX] = {0};
  int n = 12;
  submit_batch(cs, st, 200, n, ids);
  /* Kill the first instance while reminders fire (about 2 s in). */
  it_sleep_ms(2200);
  it_service_kill9(st, "approval");
  check_batch_once(cs, st, ids, n);
  IT_CHECK(cs, it_instance_running(b), "instance b died");
  it_service_start(st, "approval");
  it_instance_stop(b);
  for (int i = 0; i < n; i++) free(ids[i]);
}

static void c_flushall(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  char *ids[BATCH_MAX] = {0};
  int n = 10;
  submit_batch(cs, st, 220, n, ids);
  char *key = it_pg_scalar(st, "SELECT 'qm:timer:{' || current_database() || ':approval:timers}:due'");
  const char *zc[] = {"ZCARD", key};
  char *card = it_redis_cmd(cx->redis, zc, 2);
  IT_CHECK(cs, atoi(card) >= n, "timers in Redis before the flush: %s", card);
  free(card);
  size_t mark = it_service_log_size(st, "approval");
  const char *fl[] = {"FLUSHALL"};
  free(it_redis_cmd(cx->redis, fl, 1));
  char *log = it_service_log_wait(st, "approval", mark, "marker is missing", 15000);
  IT_CHECK(cs, log != NULL, "approval did not notice the flush");
  free(log);
  check_batch_once(cs, st, ids, n);
  free(key);
  for (int i = 0; i < n; i++) free(ids[i]);
}

/* ------------------------------------------------------------ a hanging receiver */

/* How many recorded webhook requests carried exactly body and were answered
 * at once with 2xx (delivered, not left hanging). */
static int delivered(const json_t *reqs, const char *body) {
  int n = 0;
  size_t i;
  json_t *q;
  json_array_foreach(reqs, i, q) {
    json_int_t status = json_integer_value(json_object_get(q, "status"));
    if (!strcmp(jget(q, "body"), body) && status >= 200 && status < 300 &&
        json_integer_value(json_object_get(q, "delay_ms")) == 0)
      n++;
  }
  return n;
}

/* Approval runs with one pooled connection and a 2 s webhook timeout; the
 * receiver hangs. The API keeps answering promptly (the notifier holds no
 * pooled connection and no transaction while it POSTs); once the receiver
 * recovers, every notification is delivered exactly once. */
static void c_webhook_hangs(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  it_recorder_set_delay_ms(cx->hooks, 60000);
  const char *who[] = {"p-0019", "p-0025", "p-0031"};
  char *ids[3];
  json_t *steps[3];
  for (int i = 0; i < 3; i++) ids[i] = submit(st, who[i], "employee", who[i], "figma", "editor");
  for (int i = 0; i < 3; i++) steps[i] = wait_step(cs, st, ids[i], 1, "pending", 20000);
  IT_CHECK(cs, it_recorder_wait(cx->hooks, "/hooks", 1, 20000), "the notifier never POSTed");
  /* Three webhook timeouts and more of API calls, each timed. */
  int64_t worst = 0, until = it_now_ms() + 8000;
  int calls = 0;
  while (it_now_ms() < until) {
    for (int i = 0; i < 3; i++) {
      int64_t t0 = it_now_ms();
      json_t *a = approvals_of(st, cx, ids[i]);
      int64_t dt = it_now_ms() - t0;
      IT_CHECK(cs, a != NULL, "GET approvals of %s failed while the receiver hangs", ids[i]);
      json_decref(a);
      if (dt > worst) worst = dt;
      calls++;
    }
    it_sleep_ms(100);
  }
  IT_CHECK(cs, worst < 2000, "an API call took %lld ms (of %d) while the receiver hangs",
           (long long)worst, calls);
  int64_t t0 = it_now_ms();
  it_resp_t r;
  long code = decide(st, approver(steps[0], 0), jget(steps[0], "step_id"), false,
                     "<!channel> not for this team & see <https://evil.example|the policy>", &r);
  IT_CHECK(cs, code == 200 && it_now_ms() - t0 < 2000, "deny while the receiver hangs: %ld in "
           "%lld ms %s", code, (long long)(it_now_ms() - t0), r.body);
  it_resp_clear(&r);
  t0 = it_now_ms();
  code = decide(st, approver(steps[1], 0), jget(steps[1], "step_id"), true, "ok", &r);
  IT_CHECK(cs, code == 200 && it_now_ms() - t0 < 2000, "approve while the receiver hangs: %ld "
           "in %lld ms %s", code, (long long)(it_now_ms() - t0), r.body);
  it_resp_clear(&r);
  json_decref(wait_line(cs, st, ids[0], "rejected", 20000));
  json_decref(wait_line(cs, st, ids[1], "approved", 20000));
  IT_CHECK(cs, pg_count(st, "SELECT count(*) FROM approval.notifications WHERE status = 'sent'"
                            " AND request_id IN ('%s','%s','%s')", ids[0], ids[1], ids[2]) == 0,
           "a notification counted as sent while the receiver hangs");

  it_recorder_set_delay_ms(cx->hooks, 0);
  char where[400];
  snprintf(where, sizeof(where), "request_id IN ('%s','%s','%s')", ids[0], ids[1], ids[2]);
  int64_t deadline = it_now_ms() + 60000;
  long long left;
  while ((left = pg_count(st, "SELECT count(*) FROM approval.notifications WHERE %s"
                              " AND status <> 'sent'", where)) > 0 && it_now_ms() < deadline)
    it_sleep_ms(200);
  IT_CHECK(cs, left == 0, "%lld notifications not sent 60 s after the receiver recovered", left);
  /* Let a duplicate, if any were on its way, arrive. */
  it_sleep_ms(2000);
  char sql[600];
  snprintf(sql, sizeof(sql),
           "SELECT body, kind, attempts FROM approval.notifications WHERE %s ORDER BY id", where);
  json_t *rows = it_pg_rows(st, sql);
  json_t *reqs = it_recorder_requests(cx->hooks, "/hooks");
  size_t i;
  json_t *row;
  int retried = 0;
  IT_CHECK(cs, json_array_size(rows) >= 5, "3 new steps, a rejection and an approval: %zu rows",
           json_array_size(rows));
  json_array_foreach(rows, i, row) {
    const char *body = json_string_value(json_array_get(row, 0));
    int n = delivered(reqs, body);
    IT_CHECK(cs, n == 1, "notification %s delivered %d times: %s",
             json_string_value(json_array_get(row, 1)), n, body);
    if (atoi(json_string_value(json_array_get(row, 2))) > 1) retried++;
  }
  IT_CHECK(cs, retried > 0, "no notification was tried while the receiver hung");
  /* The denial's comment reaches Slack escaped: no mention, no link. */
  const char *esc[] = {"Rejected (&lt;!channel&gt; not for this team &amp; see "
                       "&lt;https://evil.example|the policy&gt;)", ids[0], NULL};
  IT_CHECK(cs, hook_wait(cx->hooks, esc, 1000), "the denial's comment was not escaped for Slack");
  const char *raw[] = {"<!channel>", NULL};
  IT_CHECK(cs, !hook_wait(cx->hooks, raw, 0), "a webhook body carries <!channel> unescaped");
  json_decref(rows);
  json_decref(reqs);
  for (int k = 0; k < 3; k++) {
    json_decref(steps[k]);
    free(ids[k]);
  }
}

/* An instance killed while it posts (the receiver hangs): its claimed
 * notification is taken over by the restarted instance as soon as the dead
 * session is gone, well before the lease (10 × 2 s + 10 s) runs out, and is
 * delivered once when the receiver recovers. */
static void c_notifier_killed(it_stack_t *st, it_cases_t *cs) {
  ap_ctx_t *cx = cs->ctx;
  it_recorder_set_delay_ms(cx->hooks, 60000);
  char *id = submit(st, "p-0037", "employee", "p-0037", "figma", "editor");
  json_decref(wait_step(cs, st, id, 1, "pending", 20000));
  char sql[600];
  snprintf(sql, sizeof(sql),
           "SELECT lease_pid, (extract(epoch FROM lease_until) * 1000)::bigint, body"
           " FROM approval.notifications WHERE request_id = '%s' AND kind = 'step_pending'"
           " AND lease_until IS NOT NULL",
           id);
  json_t *rows = NULL;
  int64_t deadline = it_now_ms() + 20000;
  while (json_array_size(rows = it_pg_rows(st, sql)) == 0 && it_now_ms() < deadline) {
    json_decref(rows);
    it_sleep_ms(50);
  }
  IT_CHECK(cs, json_array_size(rows) == 1, "the notification was never claimed");
  json_t *row = json_array_get(rows, 0);
  char *pid = qm_strdup(json_string_value(json_array_get(row, 0)));
  long long lease_end = atoll(json_string_value(json_array_get(row, 1)));
  char *body = qm_strdup(json_string_value(json_array_get(row, 2)));
  json_decref(rows);
  it_service_kill9(st, "approval");
  it_service_start(st, "approval");
  long long taken = 0;
  while (it_now_ms() < lease_end &&
         (taken = pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                               " AND kind = 'step_pending' AND lease_pid IS DISTINCT FROM %s"
                               " AND lease_until IS NOT NULL", id, pid)) == 0)
    it_sleep_ms(50);
  IT_CHECK(cs, taken == 1, "the dead instance's notification was not taken over before its "
           "lease ran out");
  it_recorder_set_delay_ms(cx->hooks, 0);
  deadline = it_now_ms() + 60000;
  while (pg_count(st, "SELECT count(*) FROM approval.notifications WHERE request_id = '%s'"
                      " AND status <> 'sent'", id) > 0 && it_now_ms() < deadline)
    it_sleep_ms(200);
  it_sleep_ms(2000); /* a duplicate, if any were on its way */
  json_t *reqs = it_recorder_requests(cx->hooks, "/hooks");
  IT_CHECK(cs, delivered(reqs, body) == 1, "the taken-over notification was delivered %d times",
           delivered(reqs, body));
  json_decref(reqs);
  free(body);
  free(pid);
  free(id);
}

/* ------------------------------------------------------------ the tests */

Test(approval, routing, .fini = it_fini, .timeout = 900) {
  it_recorder_t *hooks = it_recorder_start();
  char *url = qm_asprintf("QM_APPROVAL_WEBHOOK_URL=%s/hooks/slack", it_recorder_url(hooks));
  const it_svc_env_t env[] = {
      {"approval", url},
      {"approval", "QM_APPROVAL_PEOPLE_FILE=" QM_SOURCE_DIR "/deploy/local/seed/people.json"},
      {"approval", "QM_APPROVAL_SOD_PAIRS=github:write|aws:prod-admin"},
      {"approval", "QM_APPROVAL_SOD_MODE=refuse"},
      {"approval", "QM_APPROVAL_WEBHOOK_BACKOFF=200ms"},
      {NULL, NULL}};
  static const char *const services[] = {"intake", "approval", NULL};
  it_stack_t *st = it_stack_up_env("approval-routing", services, env);
  ap_ctx_t cx = {.hooks = hooks,
                 .decisions = it_reader_open(st, QM_TOPIC_DECISIONS),
                 .staff = it_token("p-0099", "employee,auditor")};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "standard_to_manager", c_standard_manager);
  it_case_run(&cs, st, "automatic", c_automatic);
  it_case_run(&cs, st, "sensitive_to_app_owner_denied", c_sensitive_app_owner_denied);
  it_case_run(&cs, st, "elevated_security_expiry", c_elevated_security_expiry);
  it_case_run(&cs, st, "cost_adds_finance", c_cost_finance);
  it_case_run(&cs, st, "self_approval_refused", c_self_approval);
  it_case_run(&cs, st, "manager_is_requester", c_manager_is_requester);
  it_case_run(&cs, st, "delegation", c_delegation);
  it_case_run(&cs, st, "fallback_chain", c_fallback_chain);
  it_case_run(&cs, st, "sod_refused", c_sod_refused);
  it_case_run(&cs, st, "break_glass", c_break_glass);
  it_case_run(&cs, st, "cancellation", c_cancellation);
  it_case_run(&cs, st, "leaver_closes_steps", c_leaver);
  it_case_run(&cs, st, "webhook_down_never_blocks", c_webhook_down);
  /* Last: a head of department leaves. */
  it_case_run(&cs, st, "approver_leaves", c_approver_leaves);
  bool all = it_cases_report(&cs, "approval routing");
  it_reader_close(cx.decisions);
  free(cx.staff);
  free(url);
  if (all) it_stack_down(st);
  it_recorder_stop(hooks);
  cr_assert(all, "some cases failed (see above)");
}

Test(approval, timers, .fini = it_fini, .timeout = 900) {
  it_recorder_t *hooks = it_recorder_start();
  it_redis_t *redis = it_redis_start();
  char *url = qm_asprintf("QM_APPROVAL_WEBHOOK_URL=%s/hooks/slack", it_recorder_url(hooks));
  char *port = qm_asprintf("QM_REDIS_PORT=%d", it_redis_port(redis));
  const it_svc_env_t env[] = {
      {"approval", url},
      {"approval", port},
      {"approval", "QM_APPROVAL_PEOPLE_FILE=" QM_SOURCE_DIR "/deploy/local/seed/people.json"},
      {"approval", "QM_APPROVAL_SOD_PAIRS=github:write|figma:editor"},
      {"approval", "QM_APPROVAL_SOD_MODE=security"},
      {"approval", "QM_APPROVAL_REMIND_STANDARD=3s"},
      {"approval", "QM_APPROVAL_ESCALATE_STANDARD=6s"},
      {"approval", "QM_APPROVAL_REJECT_STANDARD=9s"},
      {"approval", "QM_APPROVAL_TIMER_LEASE=2s"},
      {"approval", "QM_APPROVAL_TIMER_POLL=50ms"},
      {"approval", "QM_APPROVAL_WEBHOOK_BACKOFF=200ms"},
      {NULL, NULL}};
  static const char *const services[] = {"intake", "approval", NULL};
  it_stack_t *st = it_stack_up_env("approval-timers", services, env);
  ap_ctx_t cx = {.hooks = hooks,
                 .redis = redis,
                 .decisions = it_reader_open(st, QM_TOPIC_DECISIONS),
                 .staff = it_token("p-0099", "employee,auditor")};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "sod_routed_to_security", c_sod_to_security);
  it_case_run(&cs, st, "reminder_escalation_auto_reject", c_remind_escalate_reject);
  it_case_run(&cs, st, "two_instances_one_killed", c_two_instances_one_killed);
  it_case_run(&cs, st, "flushall_with_timers_pending", c_flushall);
  bool all = it_cases_report(&cs, "approval timers");
  it_reader_close(cx.decisions);
  free(cx.staff);
  free(url);
  free(port);
  if (all) it_stack_down(st);
  it_redis_stop(redis);
  it_recorder_stop(hooks);
  cr_assert(all, "some cases failed (see above)");
}

Test(approval, webhook_hangs, .fini = it_fini, .timeout = 600) {
  it_recorder_t *hooks = it_recorder_start();
  char *url = qm_asprintf("QM_APPROVAL_WEBHOOK_URL=%s/hooks/slack", it_recorder_url(hooks));
  const it_svc_env_t env[] = {
      {"approval", url},
      {"approval", "QM_APPROVAL_PEOPLE_FILE=" QM_SOURCE_DIR "/deploy/local/seed/people.json"},
      {"approval", "QM_PG_POOL_SIZE=1"},
      {"approval", "QM_APPROVAL_WEBHOOK_TIMEOUT=2s"},
      {"approval", "QM_APPROVAL_WEBHOOK_BACKOFF=200ms"},
      {NULL, NULL}};
  static const char *const services[] = {"intake", "approval", NULL};
  it_stack_t *st = it_stack_up_env("approval-hang", services, env);
  ap_ctx_t cx = {.hooks = hooks, .staff = it_token("p-0099", "employee,auditor")};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "webhook_hangs_api_answers", c_webhook_hangs);
  it_case_run(&cs, st, "notifier_killed_taken_over", c_notifier_killed);
  bool all = it_cases_report(&cs, "approval webhook hangs");
  free(cx.staff);
  free(url);
  if (all) it_stack_down(st);
  it_recorder_stop(hooks);
  cr_assert(all, "some cases failed (see above)");
}
