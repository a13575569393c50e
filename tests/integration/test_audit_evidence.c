/*
 * test_audit_evidence: what an auditor asks of the ledger, on the whole
 * suite — evidence per request (the four answers, the timeline once per
 * event, the signed checkpoint that covers it), search by person, item, type
 * and time with paging, streamed exports in CSV, JSON Lines and OCSF, the
 * reports, and that `qm-audit reindex` rebuilds them from the ledger alone.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "harness.h"

#include "qm_common.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  char *auditor;
  char granted_id[64];   /* p-0100's figma viewer: granted */
  char cancelled_id[64]; /* p-0101's github write: needs the app owner, then cancelled */
  char leaver_id[64];    /* p-0120's figma viewer, then p-0120 leaves */
  int64_t t0_ms;         /* wall clock before the first request */
} ev_ctx_t;

static int64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* GET path as the auditor; fails the case unless the status is want. The
 * caller clears r. */
static void aget(it_stack_t *st, it_cases_t *cs, const char *path, long want, it_resp_t *r) {
  ev_ctx_t *cx = cs->ctx;
  it_http(st, "audit", "GET", path, cx->auditor, NULL, NULL, r);
  IT_CHECK(cs, r->status == want, "GET %s: expected %ld, got %ld %s", path, want, r->status,
           r->body);
}

static int count_type(const json_t *records, const char *type) {
  int n = 0;
  size_t i;
  json_t *e;
  json_array_foreach(records, i, e) {
    if (!strcmp(json_string_value(json_object_get(e, "event_type")), type)) n++;
  }
  return n;
}

/* Polls the evidence of id until its timeline holds every type in want and
 * check(evidence) holds; returns it (caller frees). */
static json_t *wait_evidence(it_stack_t *st, it_cases_t *cs, const char *id,
                             const char *const *want, bool (*check)(const json_t *)) {
  ev_ctx_t *cx = cs->ctx;
  char path[256];
  snprintf(path, sizeof(path), "/v1/audit/requests/%s/evidence", id);
  int64_t deadline = it_now_ms() + 45000;
  for (;;) {
    it_resp_t r;
    it_http(st, "audit", "GET", path, cx->auditor, NULL, NULL, &r);
    if (r.status == 200) {
      json_t *tl = json_object_get(r.json, "timeline");
      bool all = true;
      for (size_t k = 0; want[k]; k++) all = all && count_type(tl, want[k]) >= 1;
      if (all && (!check || check(r.json))) {
        json_t *e = json_incref(r.json);
        it_resp_clear(&r);
        return e;
      }
    }
    if (it_now_ms() > deadline) {
      char msg[512];
      snprintf(msg, sizeof(msg), "%.400s", r.body);
      it_resp_clear(&r);
      IT_CHECK(cs, false, "evidence of %s never complete: last answer %s", id, msg);
    }
    it_resp_clear(&r);
    it_sleep_ms(200);
  }
}

static bool has_checkpoint(const json_t *e) {
  size_t i;
  json_t *c;
  json_t *chains = json_object_get(e, "integrity");
  if (json_array_size(chains) == 0) return false;
  json_array_foreach(chains, i, c) {
    if (!json_is_object(json_object_get(c, "checkpoint"))) return false;
  }
  return true;
}

static void c_evidence_granted(it_stack_t *st, it_cases_t *cs) {
  ev_ctx_t *cx = cs->ctx;
  char *token = it_token("p-0100", "employee");
  char *id = it_request_submit(st, token, "{\"reason\":\"design reviews\",\"lines\":[{\"item_id\":"
                                          "\"figma\",\"role_id\":\"viewer\"}]}");
  snprintf(cx->granted_id, sizeof(cx->granted_id), "%s", id);
  json_decref(it_case_wait_status(cs, st, token, id, "granted", 45000));
  static const char *const want[] = {"qm.request.submitted.v1", "qm.request.approved.v1",
                                     "qm.access.granted.v1", NULL};
  json_t *e = wait_evidence(st, cs, id, want, has_checkpoint);
  char *text = it_json_text(e);
  fprintf(stderr, "[it audit-evidence] evidence of %s: %s\n", id, text);
  json_t *ans = json_object_get(e, "answers");
  /* Who asked. */
  json_t *asked = json_object_get(ans, "who_asked");
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(json_object_get(asked, "requester"), "person_id")), "p-0100"),
           "who_asked.requester is not p-0100: %s", text);
  IT_CHECK(cs, json_is_false(json_object_get(asked, "on_behalf")), "p-0100 asked for themselves: %s", text);
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(asked, "subject_department")), "Support"),
           "who_asked.subject_department: %s", text);
  json_t *line0 = json_array_get(json_object_get(asked, "lines"), 0);
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(line0, "item_id")), "figma"), "lines[0]: %s", text);
  /* Who approved: automatically (standard risk, the catalog allows it). */
  json_t *dec = json_array_get(json_object_get(json_object_get(ans, "who_approved"), "decisions"), 0);
  IT_CHECK(cs, dec && !strcmp(json_string_value(json_object_get(dec, "outcome")), "approved"),
           "who_approved.decisions[0] is not an approval: %s", text);
  IT_CHECK(cs, json_is_true(json_object_get(dec, "automatic")), "approval should be automatic: %s", text);
  /* What changed: the membership. */
  json_t *changes = json_object_get(ans, "what_changed");
  json_t *g = json_array_get(changes, 0);
  IT_CHECK(cs, g && !strcmp(json_string_value(json_object_get(g, "change")), "granted") &&
                   !strcmp(json_string_value(json_object_get(g, "group")), "app-figma-viewer"),
           "what_changed[0] is not the app-figma-viewer membership: %s", text);
  /* When it ended: not yet. */
  json_t *ended = json_object_get(ans, "when_it_ended");
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(ended, "state")), "active") &&
                   json_integer_value(json_object_get(ended, "grants_active")) == 1,
           "when_it_ended: %s", text);
  /* The timeline: each event once, in order, with its chain position. */
  json_t *tl = json_object_get(e, "timeline");
  for (size_t k = 0; want[k]; k++)
    IT_CHECK(cs, count_type(tl, want[k]) == 1, "timeline holds %s %d times: %s", want[k],
             count_type(tl, want[k]), text);
  size_t i;
  json_t *rec;
  int64_t prev_t = 0;
  json_array_foreach(tl, i, rec) {
    int64_t t = json_integer_value(json_object_get(rec, "event_time_ms"));
    IT_CHECK(cs, t >= prev_t, "timeline out of order at %zu: %s", i, text);
    prev_t = t;
    IT_CHECK(cs, strlen(json_string_value(json_object_get(rec, "hash"))) == 64, "record without hash: %s", text);
    IT_CHECK(cs, json_is_object(json_object_get(rec, "event")), "record %zu not decoded: %s", i, text);
  }
  json_t *sub = json_array_get(tl, 0);
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(sub, "actor_id")), "p-0100"),
           "the submission's actor_id is not the requester: %s", text);
  /* Integrity: a signed checkpoint covers the records. */
  json_t *chain = json_array_get(json_object_get(e, "integrity"), 0);
  IT_CHECK(cs, json_integer_value(json_object_get(json_object_get(chain, "checkpoint"), "sequence")) >=
                   json_integer_value(json_object_get(chain, "last_sequence")),
           "checkpoint does not cover the request's records: %s", text);
  free(text);
  json_decref(e);
  /* Not an auditor: refused. Unknown request: 404. */
  it_resp_t r;
  char path[256];
  snprintf(path, sizeof(path), "/v1/audit/requests/%s/evidence", id);
  it_http(st, "audit", "GET", path, token, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 403, "an employee reading evidence: %ld", r.status);
  it_resp_clear(&r);
  aget(st, cs, "/v1/audit/requests/no-such-request/evidence", 404, &r);
  it_resp_clear(&r);
  free(id);
  free(token);
}

static bool is_cancelled(const json_t *e) {
  const char *s = json_string_value(
      json_object_get(json_object_get(json_object_get(e, "answers"), "when_it_ended"), "state"));
  return s && !strcmp(s, "cancelled");
}

static void c_evidence_cancelled(it_stack_t *st, it_cases_t *cs) {
  ev_ctx_t *cx = cs->ctx;
  char *token = it_token("p-0101", "employee");
  char *id = it_request_submit(st, token, "{\"reason\":\"fix a bug in the portal\",\"lines\":[{\"item_id\":"
                                          "\"github\",\"role_id\":\"write\"}]}");
  snprintf(cx->cancelled_id, sizeof(cx->cancelled_id), "%s", id);
  static const char *const pending[] = {"qm.request.submitted.v1", "qm.approval.step_pending.v1", NULL};
  json_decref(wait_evidence(st, cs, id, pending, NULL));
  char path[256];
  snprintf(path, sizeof(path), "/v1/requests/%s/cancel", id);
  it_resp_t r;
  it_http(st, "intake", "POST", path, token, "{\"reason\":\"not needed after all\"}", NULL, &r);
  IT_CHECK(cs, r.status == 200 || r.status == 202, "cancel: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  static const char *const want[] = {"qm.request.cancelled.v1", NULL};
  json_t *e = wait_evidence(st, cs, id, want, is_cancelled);
  char *text = it_json_text(e);
  json_t *ans = json_object_get(e, "answers");
  json_t *steps = json_object_get(json_object_get(ans, "who_approved"), "steps");
  json_t *s0 = json_array_get(steps, 0);
  IT_CHECK(cs, s0 && json_array_size(json_object_get(s0, "approver_ids")) >= 1,
           "the app owner's step is not in the evidence: %s", text);
  json_t *ended = json_object_get(ans, "when_it_ended");
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(json_object_get(ended, "by"), "person_id")), "p-0101"),
           "cancelled by p-0101 not recorded: %s", text);
  IT_CHECK(cs, json_array_size(json_object_get(ans, "what_changed")) == 0,
           "a cancelled request changed something: %s", text);
  free(text);
  json_decref(e);
  free(id);
  free(token);
}

/* All items of a search, following `next` with pages of `limit`. */
static json_t *search_all(it_stack_t *st, it_cases_t *cs, const char *query, int limit, int *pages) {
  json_t *all = json_array();
  char after[256] = "";
  *pages = 0;
  for (;;) {
    char path[1024];
    snprintf(path, sizeof(path), "/v1/audit/search?%s&limit=%d%s%s", query, limit,
             after[0] ? "&after=" : "", after);
    it_resp_t r;
    aget(st, cs, path, 200, &r);
    json_array_extend(all, json_object_get(r.json, "items"));
    (*pages)++;
    const char *next = json_string_value(json_object_get(r.json, "next"));
    IT_CHECK(cs, *pages < 1000, "search never ends");
    if (!next) {
      it_resp_clear(&r);
      break;
    }
    snprintf(after, sizeof(after), "%s", next);
    it_resp_clear(&r);
  }
  return all;
}

static void c_search(it_stack_t *st, it_cases_t *cs) {
  ev_ctx_t *cx = cs->ctx;
  int pages = 0;
  char q[256];
  /* By person: every record of p-0100's request, whole and paged alike. */
  json_t *whole = search_all(st, cs, "person=p-0100", 1000, &pages);
  json_t *paged = search_all(st, cs, "person=p-0100", 2, &pages);
  char *wt = it_json_text(whole);
  IT_CHECK(cs, json_array_size(whole) >= 3, "person=p-0100 found %zu records: %s", json_array_size(whole), wt);
  IT_CHECK(cs, json_equal(whole, paged), "paging by 2 (%d pages) differs from one page", pages);
  IT_CHECK(cs, pages >= 2, "expected several pages, got %d", pages);
  size_t i;
  json_t *rec;
  json_array_foreach(whole, i, rec) {
    IT_CHECK(cs, !strcmp(json_string_value(json_object_get(rec, "person_id")), "p-0100") ||
                     !strcmp(json_string_value(json_object_get(rec, "actor_id")), "p-0100"),
             "record %zu is not about p-0100: %s", i, wt);
  }
  free(wt);
  json_decref(paged);
  /* By item and type. */
  json_t *items = search_all(st, cs, "item=github&type=qm.request.submitted.v1", 100, &pages);
  IT_CHECK(cs, json_array_size(items) >= 1, "no github submission found");
  json_array_foreach(items, i, rec) {
    IT_CHECK(cs, !strcmp(json_string_value(json_object_get(rec, "event_type")), "qm.request.submitted.v1"),
             "type filter let through %s", json_string_value(json_object_get(rec, "event_type")));
  }
  json_decref(items);
  /* By time: nothing before the first request; everything of p-0100 after it. */
  snprintf(q, sizeof(q), "person=p-0100&to=%lld", (long long)(cx->t0_ms - 600000));
  json_t *before = search_all(st, cs, q, 100, &pages);
  IT_CHECK(cs, json_array_size(before) == 0, "records of p-0100 before the test began: %zu", json_array_size(before));
  json_decref(before);
  snprintf(q, sizeof(q), "person=p-0100&from=%lld", (long long)(cx->t0_ms - 60000));
  json_t *after = search_all(st, cs, q, 100, &pages);
  IT_CHECK(cs, json_array_size(after) == json_array_size(whole), "from= lost records: %zu of %zu",
           json_array_size(after), json_array_size(whole));
  json_decref(after);
  json_decref(whole);
  /* Bad input names each bad field. */
  it_resp_t r;
  aget(st, cs, "/v1/audit/search?from=yesterday&limit=0&after=zz", 400, &r);
  for (const char *const *f = (const char *const[]){"from", "limit", "after", NULL}; *f; f++)
    IT_CHECK(cs, strstr(r.body, *f) != NULL, "400 does not name %s: %s", *f, r.body);
  IT_CHECK(cs, strstr(r.content_type, "application/problem+json") != NULL, "not problem+json: %s", r.content_type);
  it_resp_clear(&r);
}

static int count_lines(const char *s) {
  int n = 0;
  for (; *s; s++) n += *s == '\n';
  return n;
}

static void c_exports(it_stack_t *st, it_cases_t *cs) {
  ev_ctx_t *cx = cs->ctx;
  int pages = 0;
  char q[256], path[512];
  snprintf(q, sizeof(q), "request_id=%s", cx->granted_id);
  json_t *recs = search_all(st, cs, q, 1000, &pages);
  size_t n = json_array_size(recs);
  IT_CHECK(cs, n >= 3, "request %s has %zu records", cx->granted_id, n);
  it_resp_t r;
  /* CSV: a header and one row per record. */
  snprintf(path, sizeof(path), "/v1/audit/export?format=csv&%s", q);
  aget(st, cs, path, 200, &r);
  IT_CHECK(cs, strncmp(r.content_type, "text/csv", 8) == 0, "csv content type %s", r.content_type);
  IT_CHECK(cs, strncmp(r.body, "chain_id,sequence,", 18) == 0, "csv header: %.200s", r.body);
  IT_CHECK(cs, count_lines(r.body) == (int)n + 1, "csv has %d lines for %zu records: %s",
           count_lines(r.body), n, r.body);
  const char *h0 = json_string_value(json_object_get(json_array_get(recs, 0), "hash"));
  IT_CHECK(cs, strstr(r.body, h0) != NULL, "csv lacks the first record's hash");
  it_resp_clear(&r);
  /* JSON Lines: one decodable record per line, the same as search. */
  snprintf(path, sizeof(path), "/v1/audit/export?format=jsonl&%s", q);
  aget(st, cs, path, 200, &r);
  IT_CHECK(cs, count_lines(r.body) == (int)n, "jsonl has %d lines for %zu records", count_lines(r.body), n);
  char *save = NULL;
  size_t k = 0;
  for (char *line = strtok_r(r.body, "\n", &save); line; line = strtok_r(NULL, "\n", &save), k++) {
    json_t *j = json_loads(line, 0, NULL);
    IT_CHECK(cs, j != NULL, "jsonl line %zu is not JSON: %s", k, line);
    IT_CHECK(cs, !strcmp(json_string_value(json_object_get(j, "hash")),
                         json_string_value(json_object_get(json_array_get(recs, k), "hash"))),
             "jsonl line %zu differs from search", k);
    IT_CHECK(cs, json_is_string(json_object_get(j, "event_bytes")), "jsonl line %zu lacks event_bytes", k);
    json_decref(j);
  }
  it_resp_clear(&r);
  /* OCSF: the membership as Group Management / Add User. */
  snprintf(path, sizeof(path), "/v1/audit/export?format=ocsf&%s", q);
  aget(st, cs, path, 200, &r);
  json_t *o = json_loads(r.body, JSON_DISABLE_EOF_CHECK, NULL);
  char *ot = it_json_text(o);
  IT_CHECK(cs, o && count_lines(r.body) == 1, "ocsf: expected one event (the grant): %s", r.body);
  IT_CHECK(cs, json_integer_value(json_object_get(o, "class_uid")) == 3006 &&
                   json_integer_value(json_object_get(o, "activity_id")) == 3 &&
                   json_integer_value(json_object_get(o, "type_uid")) == 300603,
           "ocsf class/activity: %s", ot);
  IT_CHECK(cs, !strcmp(json_string_value(json_object_get(json_object_get(o, "group"), "name")), "app-figma-viewer") &&
                   !strcmp(json_string_value(json_object_get(json_object_get(o, "user"), "uid")), "p-0100"),
           "ocsf group/user: %s", ot);
  free(ot);
  json_decref(o);
  it_resp_clear(&r);
  aget(st, cs, "/v1/audit/export?format=xml", 400, &r);
  IT_CHECK(cs, strstr(r.body, "format") != NULL, "400 does not name format: %s", r.body);
  it_resp_clear(&r);
  json_decref(recs);
}

static void c_leaver(it_stack_t *st, it_cases_t *cs) {
  ev_ctx_t *cx = cs->ctx;
  char *token = it_token("p-0120", "employee");
  char *id = it_request_submit(st, token, "{\"reason\":\"design reviews\",\"lines\":[{\"item_id\":"
                                          "\"figma\",\"role_id\":\"viewer\"}]}");
  snprintf(cx->leaver_id, sizeof(cx->leaver_id), "%s", id);
  json_decref(it_case_wait_status(cs, st, token, id, "granted", 45000));
  it_hr_leaver_today(st, "p-0120");
  /* The leaver, and provisioning's revocation of their grant, reach the
   * ledger (the reports below must not race the revocation). */
  static const char *const wanted[] = {"type=qm.hr.leaver.v1", "type=qm.access.revoked.v1"};
  for (size_t k = 0; k < 2; k++) {
    char q[96];
    snprintf(q, sizeof(q), "person=p-0120&%s", wanted[k]);
    int64_t deadline = it_now_ms() + 30000;
    int pages;
    for (;;) {
      json_t *l = search_all(st, cs, q, 100, &pages);
      size_t n = json_array_size(l);
      json_decref(l);
      if (n == 1) break;
      IT_CHECK(cs, it_now_ms() < deadline, "%s never reached the ledger once (%zu)", q, n);
      it_sleep_ms(200);
    }
  }
  free(id);
  free(token);
}

/* The report's data, fetched as the auditor. Caller frees. */
static json_t *report(it_stack_t *st, it_cases_t *cs, const char *name) {
  char path[256];
  snprintf(path, sizeof(path), "/v1/audit/reports/%s", name);
  it_resp_t r;
  aget(st, cs, path, 200, &r);
  json_t *d = json_incref(json_object_get(r.json, "data"));
  it_resp_clear(&r);
  return d;
}

static json_t *find_by(const json_t *arr, const char *key, const char *value) {
  size_t i;
  json_t *e;
  json_array_foreach(arr, i, e) {
    const char *v = json_string_value(json_object_get(e, key));
    if (v && !strcmp(v, value)) return e;
  }
  return NULL;
}

static void c_reports(it_stack_t *st, it_cases_t *cs) {
  it_resp_t r;
  aget(st, cs, "/v1/audit/reports", 200, &r);
  IT_CHECK(cs, json_array_size(json_object_get(r.json, "items")) == 8, "expected 8 reports: %s", r.body);
  it_resp_clear(&r);
  aget(st, cs, "/v1/audit/reports/nonsense", 404, &r);
  it_resp_clear(&r);
  aget(st, cs, "/v1/audit/reports/top-items?from=tomorrow", 400, &r);
  it_resp_clear(&r);

  json_t *ct = report(st, cs, "approval-cycle-time");
  char *t = it_json_text(ct);
  json_t *support = find_by(ct, "department", "Support");
  IT_CHECK(cs, support && json_integer_value(json_object_get(support, "requests")) >= 1 &&
                   json_integer_value(json_object_get(support, "automatic")) >= 1 &&
                   json_is_integer(json_object_get(support, "p50_ms")) &&
                   json_integer_value(json_object_get(support, "p90_ms")) >=
                       json_integer_value(json_object_get(support, "p50_ms")),
           "approval-cycle-time lacks Support (p-0100's automatic approval): %s", t);
  free(t);
  json_t *top = report(st, cs, "top-items");
  t = it_json_text(top);
  json_t *figma = find_by(top, "item_id", "figma");
  IT_CHECK(cs, figma && json_integer_value(json_object_get(figma, "requests")) >= 2 &&
                   json_integer_value(json_object_get(figma, "rank")) == 1,
           "top-items: figma (asked twice) is not first: %s", t);
  free(t);
  /* The leaver: their grant was revoked as a leaver's, so it is no longer
   * outstanding. */
  json_t *out = report(st, cs, "leavers-outstanding");
  json_t *ltr = report(st, cs, "leaver-to-revocation");
  t = it_json_text(out);
  char *t2 = it_json_text(ltr);
  IT_CHECK(cs, json_integer_value(json_object_get(ltr, "leavers")) == 1, "leaver-to-revocation: %s", t2);
  json_t *person = find_by(json_object_get(ltr, "people"), "person_id", "p-0120");
  json_t *o = find_by(out, "person_id", "p-0120");
  bool revoked = person && json_integer_value(json_object_get(person, "revocations")) >= 1;
  bool outstanding = o && json_array_size(json_object_get(o, "grants")) == 1;
  IT_CHECK(cs, revoked && !outstanding,
           "p-0120's grant: revoked %d, outstanding %d: outstanding %s, revocations %s", revoked,
           outstanding, t, t2);
  free(t);
  free(t2);
  json_t *bg = report(st, cs, "break-glass");
  IT_CHECK(cs, json_is_array(bg), "break-glass is not a list");
  json_t *jta = report(st, cs, "joiner-to-access");
  IT_CHECK(cs, json_integer_value(json_object_get(jta, "joiners")) == 0, "no joiner in this run");

  /* Every report is rebuilt from the ledger alone: `qm-audit reindex`. */
  char dsn[512];
  snprintf(dsn, sizeof(dsn), "QM_PG_DSN=%s", it_stack_dsn(st));
  const char *env[] = {dsn, NULL};
  const char *argv[] = {QM_BINARY_DIR "/services/qm-audit", "reindex", NULL};
  char *outp = NULL, *errp = NULL;
  int rc = it_run(argv, env, 60000, &outp, &errp);
  IT_CHECK(cs, rc == 0, "qm-audit reindex exited %d: %s %s", rc, outp, errp);
  IT_CHECK(cs, strstr(outp, "reindexed") != NULL, "reindex said: %s", outp);
  free(outp);
  free(errp);
  json_t *ct2 = report(st, cs, "approval-cycle-time");
  json_t *top2 = report(st, cs, "top-items");
  json_t *out2 = report(st, cs, "leavers-outstanding");
  IT_CHECK(cs, json_equal(ct, ct2) && json_equal(top, top2) && json_equal(out, out2),
           "reports differ after the facts were rebuilt from the ledger");
  json_decref(ct);
  json_decref(ct2);
  json_decref(top);
  json_decref(top2);
  json_decref(out);
  json_decref(out2);
  json_decref(ltr);
  json_decref(bg);
  json_decref(jta);
}

Test(audit_evidence, evidence_search_exports_reports, .fini = it_fini, .timeout = 600) {
  static const it_svc_env_t env[] = {{"audit", "QM_AUDIT_CHECKPOINT_INTERVAL=300ms"}, {NULL, NULL}};
  it_stack_t *st = it_stack_up_env("audit-evidence", NULL, env);
  ev_ctx_t cx = {.auditor = it_token("p-0200", "auditor"), .t0_ms = wall_ms()};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "evidence of a granted request", c_evidence_granted);
  it_case_run(&cs, st, "evidence of a cancelled request", c_evidence_cancelled);
  it_case_run(&cs, st, "search by person, item, type and time, paged", c_search);
  it_case_run(&cs, st, "exports: csv, jsonl, ocsf", c_exports);
  it_case_run(&cs, st, "a leaver", c_leaver);
  it_case_run(&cs, st, "reports, and rebuilt from the ledger", c_reports);
  bool all = it_cases_report(&cs, "audit_evidence");
  free(cx.auditor);
  if (all) it_stack_down(st);
  cr_assert(all, "some cases failed (see above)");
}
