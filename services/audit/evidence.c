/*
 * evidence: evidence per request, search, streamed exports and reports over
 * the ledger (see evidence.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "evidence.h"

#include "audit.h"
#include "payload.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_pg.h"

#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"
#include "qm/v1/fulfillment.pb-c.h"
#include "qm/v1/hr.pb-c.h"
#include "qm/v1/requests.pb-c.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The columns of a record, in the order record_json() reads them. */
#define RECORD_COLS                                                                           \
  "l.chain_id, l.seq, l.recorded_at_ms, l.event_time_ms, l.topic, l.event_id, l.event_type,"  \
  " l.event_source, l.subject, l.person_id, l.actor_id, l.request_id, l.dead_letter,"         \
  " encode(l.hash, 'hex'), encode(l.prev_hash, 'hex'), l.event_bytes"

/* The filter of search and export; parameters $1..$6 (see filter_params()). */
#define FILTER_SQL                                                                            \
  " WHERE ($1::bigint IS NULL OR l.event_time_ms >= $1::bigint)"                              \
  " AND ($2::bigint IS NULL OR l.event_time_ms < $2::bigint)"                                 \
  " AND ($3::text IS NULL OR l.event_type = $3)"                                              \
  " AND ($4::text IS NULL OR l.person_id = $4 OR l.actor_id = $4)"                            \
  " AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM ledger_facts f WHERE f.chain_id ="         \
  " l.chain_id AND f.seq = l.seq AND f.item_id = $5))"                                        \
  " AND ($6::text IS NULL OR l.request_id = $6)"

#define EVIDENCE_MAX_RECORDS 10000

/* ---- query parameters ------------------------------------------------------ */

typedef struct filter {
  bool has_from, has_to;
  int64_t from_ms, to_ms;
  const char *type, *person, *item, *request_id;
  /* the page cursor "<event_time_ms>:<chain_id>:<sequence>" */
  bool has_after;
  int64_t after_ms, after_seq;
  char after_chain[64];
  long limit;
} filter_t;

/* A time as ms since epoch, RFC 3339 UTC ("2026-11-24T10:00:00Z") or a
 * date ("2026-11-24", midnight UTC). */
static bool parse_time(const char *s, int64_t *out) {
  if (!*s) return false;
  char *end = NULL;
  if (isdigit((unsigned char)s[0]) && strlen(s) != 10) {
    long long v = strtoll(s, &end, 10);
    if (!*end && v >= 0) {
      *out = v;
      return true;
    }
  }
  struct tm tm = {0};
  const char *e = strptime(s, "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (!e || *e) {
    memset(&tm, 0, sizeof(tm));
    e = strptime(s, "%Y-%m-%d", &tm);
    if (!e || *e) return false;
  }
  *out = (int64_t)timegm(&tm) * 1000;
  return true;
}

static bool parse_cursor(const char *s, filter_t *f) {
  char *end = NULL;
  long long t = strtoll(s, &end, 10);
  if (end == s || *end != ':' || t < 0) return false;
  const char *chain = end + 1;
  const char *colon = strrchr(chain, ':');
  if (!colon || colon == chain || (size_t)(colon - chain) >= sizeof(f->after_chain)) return false;
  long long seq = strtoll(colon + 1, &end, 10);
  if (!colon[1] || *end || seq < 0) return false;
  memcpy(f->after_chain, chain, (size_t)(colon - chain));
  f->after_chain[colon - chain] = '\0';
  f->after_ms = t;
  f->after_seq = seq;
  f->has_after = true;
  return true;
}

static const char *nonempty(qm_http_req_t *req, const char *name) {
  const char *v = qm_http_req_query(req, name);
  return v && *v ? v : NULL;
}

/* Reads from, to, type, person, item, request_id and (when paged) limit and
 * after. NULL when all are valid, else a problem naming each bad one. */
static qm_problem_t *parse_filter(qm_http_req_t *req, filter_t *f, bool paged) {
  memset(f, 0, sizeof(*f));
  qm_problem_t *pb = NULL;
#define BAD(field, why)                                                                        \
  do {                                                                                         \
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");                          \
    qm_problem_field(pb, field, why);                                                          \
  } while (0)
  const char *from = qm_http_req_query(req, "from"), *to = qm_http_req_query(req, "to");
  if (from && !(f->has_from = parse_time(from, &f->from_ms)))
    BAD("from", "must be ms since epoch, an RFC 3339 UTC time (2026-11-24T10:00:00Z) or a date");
  if (to && !(f->has_to = parse_time(to, &f->to_ms)))
    BAD("to", "must be ms since epoch, an RFC 3339 UTC time (2026-11-24T10:00:00Z) or a date");
  if (f->has_from && f->has_to && f->to_ms <= f->from_ms) BAD("to", "must be after from");
  f->type = nonempty(req, "type");
  f->person = nonempty(req, "person");
  f->item = nonempty(req, "item");
  f->request_id = nonempty(req, "request_id");
  f->limit = 100;
  if (paged) {
    const char *limit = qm_http_req_query(req, "limit");
    char *end = NULL;
    if (limit && ((f->limit = strtol(limit, &end, 10)) < 1 || f->limit > 1000 || *end || !*limit))
      BAD("limit", "must be an integer from 1 to 1000");
    const char *after = qm_http_req_query(req, "after");
    if (after && !parse_cursor(after, f))
      BAD("after", "must be the 'next' of a previous page");
  }
#undef BAD
  return pb;
}

/* Parameters $1..$6 of FILTER_SQL from f into p. */
static void filter_params(const filter_t *f, qm_pg_param_t p[6]) {
  p[0] = f->has_from ? QM_PG_INT64(f->from_ms) : QM_PG_NULL;
  p[1] = f->has_to ? QM_PG_INT64(f->to_ms) : QM_PG_NULL;
  p[2] = f->type ? QM_PG_TEXT(f->type) : QM_PG_NULL;
  p[3] = f->person ? QM_PG_TEXT(f->person) : QM_PG_NULL;
  p[4] = f->item ? QM_PG_TEXT(f->item) : QM_PG_NULL;
  p[5] = f->request_id ? QM_PG_TEXT(f->request_id) : QM_PG_NULL;
}

/* ---- records as JSON ---------------------------------------------------------- */

/* Record i of res as JSON, its payload decoded into "event". With payload
 * not NULL the decoded payload is also handed to the caller (who clears it
 * with audit_payload_clear()), so it is decoded once. */
static json_t *record_json(const qm_pg_result_t *res, int i, bool with_bytes,
                           audit_payload_t *payload) {
  int64_t seq = 0, rec = 0, evt = 0;
  qm_pg_get_int64(res, i, 1, &seq);
  qm_pg_get_int64(res, i, 2, &rec);
  qm_pg_get_int64(res, i, 3, &evt);
  unsigned char *bytes = NULL;
  size_t len = 0;
  qm_pg_get_bytes(res, i, 15, &bytes, &len);
  audit_payload_t p;
  audit_payload_decode(qm_pg_get(res, i, 4), bytes, len, &p);
  json_t *j = json_pack(
      "{s:s, s:I, s:I, s:I, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:b, s:s, s:s}", "chain_id",
      qm_pg_get(res, i, 0), "sequence", (json_int_t)seq, "recorded_at_ms", (json_int_t)rec,
      "event_time_ms", (json_int_t)evt, "topic", qm_pg_get(res, i, 4), "event_id",
      qm_pg_get(res, i, 5), "event_type", qm_pg_get(res, i, 6), "event_source",
      qm_pg_get(res, i, 7), "subject", qm_pg_get(res, i, 8), "person_id", qm_pg_get(res, i, 9),
      "actor_id", qm_pg_get(res, i, 10), "request_id", qm_pg_get(res, i, 11), "dead_letter",
      strcmp(qm_pg_get(res, i, 12), "t") == 0, "hash", qm_pg_get(res, i, 13), "prev_hash",
      qm_pg_get(res, i, 14));
  json_t *event = audit_pb_json(p.msg);
  json_object_set_new(j, "event", event ? event : json_null());
  if (with_bytes) {
    char *b64 = audit_b64_encode(bytes, len);
    json_object_set_new(j, "event_bytes", json_string(b64));
    free(b64);
  }
  if (payload) *payload = p;
  else audit_payload_clear(&p);
  free(bytes);
  return j;
}

/* ---- GET /v1/audit/search ------------------------------------------------------- */

static void search(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  audit_api_t *api = ctx;
  filter_t f;
  qm_problem_t *pb = parse_filter(req, &f, true);
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_param_t p[10];
  filter_params(&f, p);
  p[6] = QM_PG_INT64(f.has_after ? f.after_ms : -1);
  p[7] = QM_PG_TEXT(f.after_chain);
  p[8] = QM_PG_INT64(f.after_seq);
  p[9] = QM_PG_INT64(f.limit + 1);
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(req, resp, qm_service_pool(api->svc), "audit search",
                    "SELECT " RECORD_COLS " FROM ledger l" FILTER_SQL
                    " AND (l.event_time_ms, l.chain_id, l.seq) > ($7::bigint, $8::text, $9::bigint)"
                    " ORDER BY l.event_time_ms, l.chain_id, l.seq LIMIT $10::int",
                    p, QM_ARRAY_LEN(p), &res))
    return;
  int n = qm_pg_ntuples(res);
  int shown = n > f.limit ? (int)f.limit : n;
  json_t *items = json_array();
  for (int i = 0; i < shown; i++) json_array_append_new(items, record_json(res, i, false, NULL));
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > f.limit) {
    char *next = qm_asprintf("%s:%s:%s", qm_pg_get(res, shown - 1, 3), qm_pg_get(res, shown - 1, 0),
                             qm_pg_get(res, shown - 1, 1));
    json_object_set_new(body, "next", json_string(next));
    free(next);
  }
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

/* ---- GET /v1/audit/requests/{id}/evidence ----------------------------------------- */

static const char *actor_json_id(const Qm__V1__Actor *a) {
  return a && a->person_id ? a->person_id : "";
}

static json_t *actor_json(const Qm__V1__Actor *a) {
  if (!a) return json_null();
  return audit_pb_json(&a->base);
}

/* What the evidence is assembled into while the timeline is read. */
typedef struct evidence {
  json_t *asked;     /* the submission, or null */
  json_t *decisions; /* per line: {line_no, outcome, …} */
  json_t *steps;     /* steps opened and decided */
  json_t *changes;   /* identity-provider and fulfilment changes */
  json_t *grants;    /* grant id → {"state", "expires_at_ms", "ended_at_ms", "reason"} */
  json_t *cancelled; /* the cancellation, or null */
  json_t *assets;    /* asset tag → "out" | "returned" */
} evidence_t;

static void evidence_add(evidence_t *e, const audit_payload_t *p, int64_t event_time_ms,
                         const char *event_id) {
  if (!p->msg || p->dead_letter) return;
  const ProtobufCMessageDescriptor *d = p->msg->descriptor;
  if (d == &qm__v1__request_event__descriptor) {
    const Qm__V1__RequestEvent *ev = (const Qm__V1__RequestEvent *)p->msg;
    if (ev->event_case == QM__V1__REQUEST_EVENT__EVENT_SUBMITTED && json_is_null(e->asked)) {
      const Qm__V1__RequestSubmitted *s = ev->submitted;
      json_decref(e->asked);
      e->asked = audit_pb_json(&s->base);
      json_object_set_new(e->asked, "on_behalf",
                          json_boolean(s->requester && s->requester->person_id &&
                                       strcmp(s->requester->person_id, s->subject_person_id)));
      json_object_set_new(e->asked, "event_id", json_string(event_id));
    } else if (ev->event_case == QM__V1__REQUEST_EVENT__EVENT_CANCELLED) {
      json_decref(e->cancelled);
      e->cancelled = json_pack("{s:o, s:s, s:I}", "by", actor_json(ev->cancelled->actor),
                               "reason", ev->cancelled->reason ? ev->cancelled->reason : "",
                               "at_ms", (json_int_t)event_time_ms);
    }
    return;
  }
  if (d == &qm__v1__decision_event__descriptor) {
    const Qm__V1__DecisionEvent *ev = (const Qm__V1__DecisionEvent *)p->msg;
    switch (ev->event_case) {
    case QM__V1__DECISION_EVENT__EVENT_STEP_PENDING: {
      json_t *s = audit_pb_json(&ev->step_pending->base);
      json_object_set_new(s, "opened_at_ms", json_integer(event_time_ms));
      json_object_set_new(s, "state", json_string("pending"));
      json_array_append_new(e->steps, s);
      break;
    }
    case QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED: {
      json_t *s = audit_pb_json(&ev->step_decided->base);
      json_object_set_new(s, "decided_at_ms", json_integer(event_time_ms));
      json_object_set_new(s, "state", json_string(ev->step_decided->approved ? "approved" : "denied"));
      json_array_append_new(e->steps, s);
      break;
    }
    case QM__V1__DECISION_EVENT__EVENT_APPROVED: {
      const Qm__V1__RequestApproved *a = ev->approved;
      json_t *approvers = json_array();
      for (size_t i = 0; i < a->n_approvers; i++)
        json_array_append_new(approvers, actor_json(a->approvers[i]));
      json_t *x = json_pack("{s:i, s:s, s:o, s:I, s:b, s:i, s:b}", "line_no",
                            a->line ? a->line->line_no : 0, "outcome", "approved", "approvers",
                            approvers, "at_ms", (json_int_t)a->approved_at_ms, "break_glass",
                            a->break_glass, "grant_duration_days", a->grant_duration_days,
                            "automatic", a->n_approvers == 0 ||
                                (a->n_approvers == 1 && !*actor_json_id(a->approvers[0])));
      if (a->line && a->line->item_id) json_object_set_new(x, "item_id", json_string(a->line->item_id));
      if (a->break_glass)
        json_object_set_new(x, "break_glass_justification",
                            json_string(a->break_glass_justification ? a->break_glass_justification : ""));
      json_array_append_new(e->decisions, x);
      break;
    }
    case QM__V1__DECISION_EVENT__EVENT_REJECTED: {
      const Qm__V1__RequestRejected *r = ev->rejected;
      json_array_append_new(e->decisions,
                            json_pack("{s:i, s:s, s:o, s:s, s:I}", "line_no", r->line_no, "outcome",
                                      "rejected", "rejected_by", actor_json(r->rejected_by), "reason",
                                      r->reason ? r->reason : "", "at_ms",
                                      (json_int_t)r->rejected_at_ms));
      break;
    }
    default:
      break;
    }
    return;
  }
  if (d == &qm__v1__access_event__descriptor) {
    const Qm__V1__AccessEvent *ev = (const Qm__V1__AccessEvent *)p->msg;
    json_t *c = NULL;
    switch (ev->event_case) {
    case QM__V1__ACCESS_EVENT__EVENT_GRANTED: {
      const Qm__V1__AccessGranted *g = ev->granted;
      c = audit_pb_json(&g->base);
      json_object_set_new(c, "change", json_string(g->extension ? "extended" : "granted"));
      json_t *st = json_object_get(e->grants, g->grant_id);
      if (!st) {
        st = json_object();
        json_object_set_new(e->grants, g->grant_id, st);
      }
      if (!g->extension) json_object_set_new(st, "state", json_string("active"));
      json_object_set_new(st, "expires_at_ms", json_integer(g->expires_at_ms));
      break;
    }
    case QM__V1__ACCESS_EVENT__EVENT_REVOKED: {
      const Qm__V1__AccessRevoked *r = ev->revoked;
      c = audit_pb_json(&r->base);
      json_object_set_new(c, "change", json_string("revoked"));
      json_t *st = json_object_get(e->grants, r->grant_id);
      if (!st) {
        st = json_object();
        json_object_set_new(e->grants, r->grant_id, st);
      }
      json_object_set_new(st, "state", json_string("revoked"));
      json_object_set_new(st, "ended_at_ms", json_integer(r->revoked_at_ms ? r->revoked_at_ms : event_time_ms));
      json_object_set_new(st, "reason", json_string(r->reason ? r->reason : ""));
      break;
    }
    case QM__V1__ACCESS_EVENT__EVENT_FAILED:
      c = audit_pb_json(&ev->failed->base);
      json_object_set_new(c, "change", json_string("provisioning_failed"));
      break;
    case QM__V1__ACCESS_EVENT__EVENT_EXPIRY_NOTICE:
      c = audit_pb_json(&ev->expiry_notice->base);
      json_object_set_new(c, "change", json_string("expiry_notice"));
      break;
    default:
      break;
    }
    if (c) {
      json_object_set_new(c, "at_ms", json_integer(event_time_ms));
      json_array_append_new(e->changes, c);
    }
    return;
  }
  if (d == &qm__v1__fulfillment_event__descriptor) {
    const Qm__V1__FulfillmentEvent *ev = (const Qm__V1__FulfillmentEvent *)p->msg;
    if (ev->event_case != QM__V1__FULFILLMENT_EVENT__EVENT_UPDATE) return;
    const Qm__V1__FulfillmentUpdate *u = ev->update;
    json_t *c = audit_pb_json(&u->base);
    json_object_set_new(c, "change", json_string("fulfillment"));
    json_object_set_new(c, "at_ms", json_integer(u->at_ms ? u->at_ms : event_time_ms));
    json_array_append_new(e->changes, c);
    if (u->asset_tag && *u->asset_tag) {
      if (u->step == QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_CHECKED_OUT)
        json_object_set_new(e->assets, u->asset_tag, json_string("assigned"));
      else if (u->step == QM__V1__FULFILLMENT_STEP__FULFILLMENT_STEP_RETURNED)
        json_object_set_new(e->assets, u->asset_tag, json_string("returned"));
    }
  }
}

/* The fourth answer: whether and when what was asked for ended. */
static json_t *evidence_ended(const evidence_t *e) {
  if (!json_is_null(e->cancelled)) {
    json_t *x = json_deep_copy(e->cancelled);
    json_object_set_new(x, "state", json_string("cancelled"));
    return x;
  }
  size_t active = 0, ended = 0;
  int64_t last_end = 0, next_expiry = 0;
  json_t *reasons = json_array();
  const char *gid;
  json_t *st;
  json_object_foreach(e->grants, gid, st) {
    const char *state = json_string_value(json_object_get(st, "state"));
    if (state && !strcmp(state, "revoked")) {
      ended++;
      int64_t at = json_integer_value(json_object_get(st, "ended_at_ms"));
      if (at > last_end) last_end = at;
      json_array_append_new(reasons, json_pack("{s:s, s:O, s:I}", "grant_id", gid, "reason",
                                               json_object_get(st, "reason"), "at_ms", (json_int_t)at));
    } else if (state) {
      active++;
      int64_t exp = json_integer_value(json_object_get(st, "expires_at_ms"));
      if (exp && (!next_expiry || exp < next_expiry)) next_expiry = exp;
    }
  }
  size_t assets_out = 0, assets_back = 0;
  json_t *v;
  json_object_foreach(e->assets, gid, v) {
    if (!strcmp(json_string_value(v), "assigned")) assets_out++;
    else assets_back++;
  }
  size_t approved = 0, rejected = 0;
  size_t i;
  json_array_foreach(e->decisions, i, v) {
    if (!strcmp(json_string_value(json_object_get(v, "outcome")), "approved")) approved++;
    else rejected++;
  }
  const char *state;
  if (active || assets_out) state = "active";
  else if (ended || assets_back) state = "ended";
  else if (rejected && !approved) state = "rejected";
  else if (approved) state = "approved_not_applied";
  else state = "pending";
  json_t *x = json_pack("{s:s, s:i, s:i, s:i, s:i, s:o}", "state", state, "grants_active",
                        (int)active, "grants_ended", (int)ended, "assets_assigned", (int)assets_out,
                        "assets_returned", (int)assets_back, "revocations", reasons);
  if (!strcmp(state, "ended")) json_object_set_new(x, "at_ms", json_integer(last_end));
  if (!strcmp(state, "active"))
    json_object_set_new(x, "expires_at_ms", next_expiry ? json_integer(next_expiry) : json_null());
  if (!strcmp(state, "rejected")) {
    json_t *last = json_array_get(e->decisions, json_array_size(e->decisions) - 1);
    json_object_set(x, "at_ms", json_object_get(last, "at_ms"));
  }
  return x;
}

static void evidence(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  audit_api_t *api = ctx;
  const char *id = qm_http_req_param(req, "id");
  qm_pg_t *pg = NULL;
  if (!(pg = qm_api_db(req, resp, qm_service_pool(api->svc)))) return;
  qm_pg_param_t p[] = {QM_PG_TEXT(id), QM_PG_INT64(EVIDENCE_MAX_RECORDS + 1)};
  qm_pg_result_t *res = NULL, *cps = NULL;
  char errstr[512];
  /* One snapshot for the records and the checkpoints that cover them. */
  int rc = qm_pg_exec(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", NULL, 0, NULL, errstr,
                      sizeof(errstr));
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "SELECT " RECORD_COLS " FROM ledger l WHERE l.request_id = $1"
                    " ORDER BY l.event_time_ms, l.chain_id, l.seq LIMIT $2::int",
                    p, QM_ARRAY_LEN(p), &res, errstr, sizeof(errstr));
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "SELECT r.chain_id, r.first_seq, r.last_seq, c.seq, encode(c.head_hash, 'hex'),"
                    " c.signed_at_ms, c.algorithm, c.key_id,"
                    " translate(encode(c.signature, 'base64'), E'\\n', '')"
                    " FROM (SELECT chain_id, min(seq) first_seq, max(seq) last_seq FROM ledger"
                    " WHERE request_id = $1 GROUP BY chain_id) r"
                    " LEFT JOIN LATERAL (SELECT * FROM checkpoints c WHERE c.chain_id = r.chain_id"
                    " AND c.seq >= r.last_seq ORDER BY c.seq LIMIT 1) c ON true ORDER BY r.chain_id",
                    p, 1, &cps, errstr, sizeof(errstr));
  qm_pg_exec(pg, "COMMIT", NULL, 0, NULL, NULL, 0);
  qm_pg_pool_release(qm_service_pool(api->svc), pg);
  if (rc != QM_OK) {
    qm_pg_result_destroy(res);
    qm_api_db_error(req, resp, "evidence", errstr);
    return;
  }
  int n = qm_pg_ntuples(res);
  if (n == 0) {
    qm_pg_result_destroy(res);
    qm_pg_result_destroy(cps);
    qm_http_problem(resp, 404, "not-found", "No such request in the ledger",
                    "the ledger holds no record of this request id");
    return;
  }
  evidence_t e = {json_null(), json_array(), json_array(), json_array(), json_object(), json_null(),
                  json_object()};
  json_t *timeline = json_array();
  int shown = n > EVIDENCE_MAX_RECORDS ? EVIDENCE_MAX_RECORDS : n;
  for (int i = 0; i < shown; i++) {
    audit_payload_t pl;
    json_t *rec = record_json(res, i, false, &pl);
    evidence_add(&e, &pl, json_integer_value(json_object_get(rec, "event_time_ms")),
                 qm_pg_get(res, i, 5));
    audit_payload_clear(&pl);
    json_array_append_new(timeline, rec);
  }
  json_t *chains = json_array();
  for (int i = 0; i < qm_pg_ntuples(cps); i++) {
    int64_t first = 0, last = 0;
    qm_pg_get_int64(cps, i, 1, &first);
    qm_pg_get_int64(cps, i, 2, &last);
    json_t *c = json_pack("{s:s, s:I, s:I}", "chain_id", qm_pg_get(cps, i, 0), "first_sequence",
                          (json_int_t)first, "last_sequence", (json_int_t)last);
    if (!qm_pg_is_null(cps, i, 3)) {
      int64_t seq = 0, at = 0;
      qm_pg_get_int64(cps, i, 3, &seq);
      qm_pg_get_int64(cps, i, 5, &at);
      json_object_set_new(
          c, "checkpoint",
          json_pack("{s:I, s:s, s:I, s:s, s:s, s:s}", "sequence", (json_int_t)seq, "head_hash",
                    qm_pg_get(cps, i, 4), "signed_at_ms", (json_int_t)at, "algorithm",
                    qm_pg_get(cps, i, 6), "key_id", qm_pg_get(cps, i, 7), "signature",
                    qm_pg_get(cps, i, 8)));
    } else {
      json_object_set_new(c, "checkpoint", json_null()); /* not signed yet */
    }
    char *cmd = qm_asprintf("qm-audit verify --chain %s --db --pubkey KEY.pem", qm_pg_get(cps, i, 0));
    json_object_set_new(c, "verify_with", json_string(cmd));
    free(cmd);
    json_array_append_new(chains, c);
  }
  qm_pg_result_destroy(res);
  qm_pg_result_destroy(cps);
  json_t *body = json_pack(
      "{s:s, s:{s:o, s:o, s:o, s:o}, s:o, s:i, s:b, s:o}", "request_id", id, "answers",
      "who_asked", e.asked, "who_approved", json_pack("{s:o, s:o}", "decisions", e.decisions, "steps", e.steps),
      "what_changed", e.changes, "when_it_ended", evidence_ended(&e), "timeline", timeline,
      "records", shown, "truncated", n > EVIDENCE_MAX_RECORDS, "integrity", chains);
  json_decref(e.grants);
  json_decref(e.cancelled);
  json_decref(e.assets);
  qm_http_resp_json(resp, 200, body);
}

/* ---- exports ----------------------------------------------------------------------- */

typedef enum { EXPORT_CSV, EXPORT_JSONL, EXPORT_OCSF } export_format_t;

typedef struct export_stream {
  audit_api_t *api;
  qm_pg_t *pg;
  export_format_t format;
  char *buf;
  size_t len, off, cap;
  bool done, failed;
  int64_t rows;
} export_stream_t;

static void out_append(export_stream_t *x, const char *s, size_t n) {
  if (x->len + n + 1 > x->cap) {
    size_t cap = x->cap ? x->cap : 65536;
    while (cap < x->len + n + 1) cap *= 2;
    x->buf = qm_realloc(x->buf, cap);
    x->cap = cap;
  }
  memcpy(x->buf + x->len, s, n);
  x->len += n;
  x->buf[x->len] = '\0';
}

/* One CSV field (RFC 4180): quoted when it holds a comma, quote or line
 * break; a leading = + - @ gets a ' so a spreadsheet never runs it as a
 * formula (OWASP CSV injection). */
static void csv_field(export_stream_t *x, const char *s, bool last) {
  bool quote = strpbrk(s, ",\"\r\n") != NULL;
  bool guard = s[0] == '=' || s[0] == '+' || s[0] == '-' || s[0] == '@';
  if (quote) out_append(x, "\"", 1);
  if (guard) out_append(x, "'", 1);
  for (const char *c = s; *c; c++) {
    if (*c == '"') out_append(x, "\"", 1);
    out_append(x, c, 1);
  }
  if (quote) out_append(x, "\"", 1);
  out_append(x, last ? "\r\n" : ",", last ? 2 : 1);
}

static const char *const csv_columns[] = {
    "chain_id", "sequence", "recorded_at_ms", "event_time_ms", "topic", "event_id", "event_type",
    "event_source", "subject", "person_id", "actor_id", "request_id", "dead_letter", "hash",
    "prev_hash"};

static void json_line(export_stream_t *x, json_t *j) {
  char *s = json_dumps(j, JSON_COMPACT);
  if (s) {
    out_append(x, s, strlen(s));
    out_append(x, "\n", 1);
    free(s);
  }
}

static json_t *ocsf_base(int class_uid, const char *class_name, int activity_id,
                         const char *activity_name, int64_t time_ms, const char *event_id,
                         const char *request_id, const char *feature) {
  return json_pack("{s:i, s:s, s:i, s:s, s:i, s:s, s:I, s:I, s:i, s:s, s:i, s:{s:s, s:{s:s, s:s, s:{s:s}}, s:s, s:s}}",
                   "class_uid", class_uid, "class_name", class_name, "category_uid", 3,
                   "category_name", "Identity & Access Management", "activity_id", activity_id,
                   "activity_name", activity_name, "type_uid",
                   (json_int_t)class_uid * 100 + activity_id, "time", (json_int_t)time_ms,
                   "severity_id", 1, "severity", "Informational", "status_id", 1, "metadata",
                   "version", "1.1.0", "product", "name", "Quartermaster", "vendor_name",
                   "Quartermaster", "feature", "name", feature, "uid", event_id,
                   "correlation_uid", request_id);
}

/* The OCSF form of one record, or NULL when it is neither an account nor a
 * group change. */
static json_t *ocsf_event(const qm_pg_result_t *res, int i, const audit_payload_t *p) {
  if (!p->msg || p->dead_letter) return NULL;
  int64_t seq = 0, t = 0;
  qm_pg_get_int64(res, i, 1, &seq);
  qm_pg_get_int64(res, i, 3, &t);
  const char *event_id = qm_pg_get(res, i, 5), *request_id = qm_pg_get(res, i, 11);
  json_t *o = NULL;
  if (p->msg->descriptor == &qm__v1__access_event__descriptor) {
    const Qm__V1__AccessEvent *e = (const Qm__V1__AccessEvent *)p->msg;
    const char *group = NULL, *group_uid = "", *user = "", *user_name = "", *connector = "";
    const char *actor = "provisioning";
    if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_GRANTED && !e->granted->extension) {
      const Qm__V1__AccessGranted *g = e->granted;
      o = ocsf_base(3006, "Group Management", 3, "Add User", g->granted_at_ms ? g->granted_at_ms : t,
                    event_id, request_id, "provisioning");
      group = g->group, group_uid = g->directory_group_id, user = g->subject_person_id;
      user_name = g->directory_user_id, connector = g->connector;
      if (g->n_approvers && g->approvers[g->n_approvers - 1]->person_id &&
          *g->approvers[g->n_approvers - 1]->person_id)
        actor = g->approvers[g->n_approvers - 1]->person_id;
      json_object_set_new(o, "unmapped", json_pack("{s:s, s:s, s:s, s:I}", "grant_id", g->grant_id,
                                                   "item_id", g->item_id, "role_id", g->role_id,
                                                   "expires_at_ms", (json_int_t)g->expires_at_ms));
    } else if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_REVOKED) {
      const Qm__V1__AccessRevoked *r = e->revoked;
      o = ocsf_base(3006, "Group Management", 4, "Remove User", r->revoked_at_ms ? r->revoked_at_ms : t,
                    event_id, request_id, "provisioning");
      group = r->group, user = r->subject_person_id, connector = r->connector;
      if (r->actor && r->actor->person_id && *r->actor->person_id) actor = r->actor->person_id;
      json_object_set_new(o, "unmapped", json_pack("{s:s, s:s, s:s, s:s}", "grant_id", r->grant_id,
                                                   "item_id", r->item_id, "role_id", r->role_id,
                                                   "reason", r->reason));
    } else if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_FAILED) {
      const Qm__V1__ProvisioningFailed *f = e->failed;
      bool grant = f->operation && !strcmp(f->operation, "grant");
      o = ocsf_base(3006, "Group Management", grant ? 3 : 4, grant ? "Add User" : "Remove User", t,
                    event_id, request_id, "provisioning");
      json_object_set_new(o, "status_id", json_integer(2));
      json_object_set_new(o, "status", json_string("Failure"));
      json_object_set_new(o, "status_detail", json_string(f->error ? f->error : ""));
      group = f->group, user = f->subject_person_id, connector = f->connector;
      json_object_set_new(o, "unmapped", json_pack("{s:s, s:i}", "operation_id", f->operation_id,
                                                   "attempts", f->attempts));
    }
    if (!o) return NULL;
    json_object_set_new(o, "group", json_pack("{s:s, s:s}", "name", group ? group : "", "uid", group_uid ? group_uid : ""));
    json_object_set_new(o, "user", json_pack("{s:s, s:s}", "uid", user ? user : "", "name", user_name ? user_name : ""));
    json_object_set_new(o, "actor", json_pack("{s:{s:s}}", "user", "uid", actor));
    json_object_set_new(json_object_get(o, "unmapped"), "connector", json_string(connector ? connector : ""));
  } else if (p->msg->descriptor == &qm__v1__hr_event__descriptor) {
    const Qm__V1__HrEvent *h = (const Qm__V1__HrEvent *)p->msg;
    int act;
    const char *name;
    switch (h->kind) {
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER: act = 1, name = "Create"; break;
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER: act = 5, name = "Disable"; break;
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER: act = 99, name = "Other"; break;
    default: return NULL;
    }
    o = ocsf_base(3001, "Account Change", act, name, t, event_id, request_id, "hr");
    const Qm__V1__Person *pp = h->person;
    json_object_set_new(o, "user", json_pack("{s:s, s:s, s:s}", "uid", pp && pp->id ? pp->id : "",
                                             "name", pp && pp->directory_username ? pp->directory_username : "",
                                             "email_addr", pp && pp->email ? pp->email : ""));
    json_object_set_new(o, "actor", json_pack("{s:{s:s}}", "user", "uid", h->source ? h->source : "hr"));
    json_object_set_new(o, "unmapped", json_pack("{s:s, s:s}", "hr_kind",
                                                 h->kind == QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER ? "mover" : name,
                                                 "effective_date", h->effective_date ? h->effective_date : ""));
  }
  if (o) {
    json_t *u = json_object_get(o, "unmapped");
    json_object_set_new(u, "chain_id", json_string(qm_pg_get(res, i, 0)));
    json_object_set_new(u, "sequence", json_integer(seq));
    json_object_set_new(u, "hash", json_string(qm_pg_get(res, i, 13)));
  }
  return o;
}

static int export_fetch(export_stream_t *x) {
  char errstr[512];
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(x->pg, "FETCH 500 FROM export_cur", NULL, 0, &res, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_log_warn("audit export aborted after %lld rows: %s", (long long)x->rows, errstr);
    return rc;
  }
  int n = qm_pg_ntuples(res);
  for (int i = 0; i < n; i++) {
    x->rows++;
    if (x->format == EXPORT_CSV) {
      for (size_t c = 0; c < QM_ARRAY_LEN(csv_columns); c++) {
        const char *v = qm_pg_get(res, i, (int)c);
        if (c == 12) v = strcmp(v, "t") == 0 ? "true" : "false";
        csv_field(x, v, c + 1 == QM_ARRAY_LEN(csv_columns));
      }
    } else if (x->format == EXPORT_JSONL) {
      json_t *j = record_json(res, i, true, NULL);
      json_line(x, j);
      json_decref(j);
    } else {
      unsigned char *bytes = NULL;
      size_t len = 0;
      qm_pg_get_bytes(res, i, 15, &bytes, &len);
      audit_payload_t p;
      audit_payload_decode(qm_pg_get(res, i, 4), bytes, len, &p);
      json_t *o = ocsf_event(res, i, &p);
      if (o) json_line(x, o);
      json_decref(o);
      audit_payload_clear(&p);
      free(bytes);
    }
  }
  qm_pg_result_destroy(res);
  if (n == 0) {
    x->done = true;
    rc = qm_pg_exec(x->pg, "COMMIT", NULL, 0, NULL, errstr, sizeof(errstr));
  }
  return rc;
}

static long export_fill(void *ctx, char *buf, size_t cap) {
  export_stream_t *x = ctx;
  while (x->off == x->len) {
    if (x->done) return 0;
    x->len = x->off = 0;
    if (export_fetch(x) != QM_OK) {
      x->failed = true;
      return -1;
    }
  }
  size_t n = x->len - x->off;
  if (n > cap) n = cap;
  memcpy(buf, x->buf + x->off, n);
  x->off += n;
  return (long)n;
}

static void export_free(void *ctx) {
  export_stream_t *x = ctx;
  if (!x->done && !x->failed)
    qm_log_info("audit export ended by the client after %lld rows", (long long)x->rows);
  qm_pg_destroy(x->pg); /* closing the connection ends its transaction and cursor */
  atomic_fetch_sub(&x->api->exports_active, 1);
  free(x->buf);
  free(x);
}

static void export_route(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  audit_api_t *api = ctx;
  filter_t f;
  qm_problem_t *pb = parse_filter(req, &f, false);
  const char *fmt = qm_http_req_query(req, "format");
  export_format_t format = EXPORT_JSONL;
  if (!fmt || !strcmp(fmt, "jsonl")) format = EXPORT_JSONL;
  else if (!strcmp(fmt, "csv")) format = EXPORT_CSV;
  else if (!strcmp(fmt, "ocsf")) format = EXPORT_OCSF;
  else {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "format", "must be csv, jsonl or ocsf");
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  if (atomic_fetch_add(&api->exports_active, 1) >= api->max_exports) {
    atomic_fetch_sub(&api->exports_active, 1);
    qm_http_resp_header(resp, "Retry-After", "30");
    qm_http_problem(resp, 429, "too-many-exports", "Too many exports running",
                    "QM_AUDIT_MAX_EXPORTS exports are streaming already; try again shortly");
    return;
  }
  char errstr[512];
  /* A connection of its own: the export holds it for as long as it
   * streams, which may be far longer than the pool should lend one. */
  qm_pg_t *pg = qm_pg_connect_app(qm_config_str(qm_service_config(api->svc), "QM_PG_DSN"), "audit",
                                  "qm-audit-export", errstr, sizeof(errstr));
  int rc = pg ? QM_OK : QM_ETRANSIENT;
  if (rc == QM_OK)
    rc = qm_pg_exec(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", NULL, 0, NULL, errstr,
                    sizeof(errstr));
  qm_pg_param_t p[7];
  filter_params(&f, p);
  p[6] = QM_PG_TEXT(format == EXPORT_OCSF ? "true" : "false");
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "DECLARE export_cur NO SCROLL CURSOR FOR SELECT " RECORD_COLS
                    " FROM ledger l" FILTER_SQL
                    " AND ($7::boolean IS NOT TRUE OR l.topic LIKE '%qm.access.v1'"
                    " OR l.topic LIKE '%qm.hr.lifecycle.v1')"
                    " ORDER BY l.event_time_ms, l.chain_id, l.seq",
                    p, QM_ARRAY_LEN(p), NULL, errstr, sizeof(errstr));
  if (rc != QM_OK) {
    qm_pg_destroy(pg);
    atomic_fetch_sub(&api->exports_active, 1);
    qm_api_db_error(req, resp, "audit export", errstr);
    return;
  }
  export_stream_t *x = qm_calloc(1, sizeof(*x));
  x->api = api;
  x->pg = pg;
  x->format = format;
  if (format == EXPORT_CSV)
    for (size_t c = 0; c < QM_ARRAY_LEN(csv_columns); c++)
      csv_field(x, csv_columns[c], c + 1 == QM_ARRAY_LEN(csv_columns));
  const char *ctype = format == EXPORT_CSV ? "text/csv; charset=utf-8" : "application/x-ndjson";
  char disp[96];
  snprintf(disp, sizeof(disp), "attachment; filename=\"audit-export.%s\"",
           format == EXPORT_CSV ? "csv" : format == EXPORT_OCSF ? "ocsf.jsonl" : "jsonl");
  qm_http_resp_header(resp, "Content-Disposition", disp);
  qm_http_resp_stream(resp, 200, ctype, export_fill, x, export_free);
}

/* ---- reports ---------------------------------------------------------------------- */

/* Each report is one query over ledger_facts that returns one JSON value;
 * $1 and $2 are the time range [from, to) in ms, $3 a row limit. */
typedef struct report {
  const char *name;
  const char *title;
  const char *sql;
} report_t;

static const report_t reports[] = {
    {"approval-cycle-time", "Approval cycle time by department (submitted to final decision)",
     "WITH s AS (SELECT request_id, min(at_ms) AS at, max(department) AS department"
     " FROM ledger_facts WHERE kind = 'submitted' AND at_ms >= $1 AND at_ms < $2 GROUP BY request_id),"
     " d AS (SELECT request_id, max(at_ms) AS at, bool_and(kind = 'approved' AND actor_id = '') AS automatic"
     " FROM ledger_facts WHERE kind IN ('approved', 'rejected') AND request_id IN (SELECT request_id FROM s)"
     " GROUP BY request_id)"
     " SELECT coalesce(json_agg(t ORDER BY t.department), '[]') FROM (SELECT s.department,"
     " count(*) AS requests, count(*) FILTER (WHERE d.automatic) AS automatic,"
     " round(percentile_cont(0.5) WITHIN GROUP (ORDER BY d.at - s.at))::bigint AS p50_ms,"
     " round(percentile_cont(0.9) WITHIN GROUP (ORDER BY d.at - s.at))::bigint AS p90_ms,"
     " round(percentile_cont(0.5) WITHIN GROUP (ORDER BY d.at - s.at) FILTER (WHERE NOT d.automatic))::bigint AS human_p50_ms,"
     " round(percentile_cont(0.9) WITHIN GROUP (ORDER BY d.at - s.at) FILTER (WHERE NOT d.automatic))::bigint AS human_p90_ms"
     " FROM s JOIN d USING (request_id) GROUP BY s.department LIMIT $3) t"},
    {"top-items", "Most requested items per month",
     "SELECT coalesce(json_agg(t ORDER BY t.month, t.rank, t.item_id), '[]') FROM ("
     " SELECT month, item_id, requests, rank FROM (SELECT month, item_id, count(*) AS requests,"
     " rank() OVER (PARTITION BY month ORDER BY count(*) DESC) AS rank FROM (SELECT"
     " to_char(to_timestamp(at_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM') AS month, item_id"
     " FROM ledger_facts WHERE kind = 'submitted' AND at_ms >= $1 AND at_ms < $2) x"
     " GROUP BY month, item_id) y WHERE rank <= $3) t"},
    {"automatic-revocations", "Revocations no person decided (expiry, leaver, mover), by month and reason",
     "SELECT coalesce(json_agg(t ORDER BY t.month, t.reason), '[]') FROM (SELECT"
     " to_char(to_timestamp(at_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM') AS month, reason,"
     " count(*) AS revocations FROM ledger_facts WHERE kind = 'revoked' AND flag"
     " AND at_ms >= $1 AND at_ms < $2 GROUP BY 1, 2 LIMIT $3) t"},
    {"break-glass", "Break-glass approvals",
     "SELECT coalesce(json_agg(t ORDER BY t.at_ms), '[]') FROM (SELECT request_id, line_no,"
     " person_id AS subject_person_id, item_id, actor_id AS approved_by, reason AS justification, at_ms"
     " FROM ledger_facts WHERE kind = 'approved' AND flag AND at_ms >= $1 AND at_ms < $2"
     " ORDER BY at_ms LIMIT $3) t"},
    {"timeout-rejections", "Requests rejected because nobody decided in time",
     "SELECT coalesce(json_agg(t ORDER BY t.at_ms), '[]') FROM (SELECT request_id, line_no,"
     " person_id AS subject_person_id, at_ms FROM ledger_facts WHERE kind = 'rejected'"
     " AND reason = 'timeout' AND at_ms >= $1 AND at_ms < $2 ORDER BY at_ms LIMIT $3) t"},
    {"joiner-to-access", "Joiner to first access (from the later of start date and HR event)",
     "WITH j AS (SELECT person_id, min(at_ms) AS at FROM ledger_facts WHERE kind = 'hr_joiner'"
     " AND at_ms >= $1 AND at_ms < $2 GROUP BY person_id),"
     " g AS (SELECT j.person_id, j.at, (SELECT min(f.at_ms) FROM ledger_facts f WHERE"
     " f.person_id = j.person_id AND f.kind = 'granted' AND f.at_ms >= j.at - 60000) AS first_grant FROM j)"
     " SELECT json_build_object('joiners', count(*), 'with_access', count(first_grant),"
     " 'p50_ms', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY first_grant - at))::bigint,"
     " 'p90_ms', round(percentile_cont(0.9) WITHIN GROUP (ORDER BY first_grant - at))::bigint,"
     " 'people', coalesce((SELECT json_agg(json_build_object('person_id', person_id, 'joined_at_ms', at,"
     " 'first_access_at_ms', first_grant, 'ms', first_grant - at) ORDER BY at) FROM (SELECT * FROM g"
     " ORDER BY at LIMIT $3) gl), '[]')) FROM g"},
    {"leaver-to-revocation", "Leaver to last access revoked",
     "WITH l AS (SELECT person_id, max(at_ms) AS at FROM ledger_facts WHERE kind = 'hr_leaver'"
     " AND at_ms >= $1 AND at_ms < $2 GROUP BY person_id),"
     " r AS (SELECT l.person_id, l.at, (SELECT max(f.at_ms) FROM ledger_facts f WHERE"
     " f.person_id = l.person_id AND f.kind = 'revoked' AND f.reason = 'leaver'"
     " AND f.at_ms >= l.at - 60000) AS last_revocation, (SELECT count(*) FROM ledger_facts f WHERE"
     " f.person_id = l.person_id AND f.kind = 'revoked' AND f.reason = 'leaver'"
     " AND f.at_ms >= l.at - 60000) AS revocations FROM l)"
     " SELECT json_build_object('leavers', count(*), 'with_revocations', count(last_revocation),"
     " 'p50_ms', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY last_revocation - at))::bigint,"
     " 'p90_ms', round(percentile_cont(0.9) WITHIN GROUP (ORDER BY last_revocation - at))::bigint,"
     " 'people', coalesce((SELECT json_agg(json_build_object('person_id', person_id, 'left_at_ms', at,"
     " 'last_revocation_at_ms', last_revocation, 'revocations', revocations, 'ms', last_revocation - at)"
     " ORDER BY at) FROM (SELECT * FROM r ORDER BY at LIMIT $3) rl), '[]')) FROM r"},
    /* Per leaver through the (person_id, kind) and (object_id, kind)
     * indexes (the latter is partial: `object_id <> ''` lets the planner use
     * it), so the plan does not hang on a guess of how many grants are still
     * open (that made a nested loop of it: 55 s on a million records). */
    {"leavers-outstanding", "Leavers who still hold access or equipment",
     "WITH l AS (SELECT person_id, max(at_ms) AS at FROM ledger_facts WHERE kind = 'hr_leaver'"
     " AND at_ms >= $1 AND at_ms < $2 GROUP BY person_id)"
     " SELECT coalesce(json_agg(t ORDER BY t.left_at_ms), '[]') FROM (SELECT l.person_id,"
     " l.at AS left_at_ms, g.grants, a.assets FROM l"
     " CROSS JOIN LATERAL (SELECT coalesce(json_agg(json_build_object('grant_id', f.object_id,"
     " 'item_id', f.item_id) ORDER BY f.at_ms), '[]') AS grants, count(*) AS n"
     " FROM ledger_facts f WHERE f.person_id = l.person_id AND f.kind = 'granted' AND NOT f.flag"
     " AND NOT EXISTS (SELECT 1 FROM ledger_facts r WHERE r.object_id = f.object_id"
     " AND r.object_id <> '' AND r.kind = 'revoked')) g"
     " CROSS JOIN LATERAL (SELECT coalesce(json_agg(f.object_id ORDER BY f.at_ms), '[]') AS assets,"
     " count(*) AS n FROM ledger_facts f WHERE f.person_id = l.person_id"
     " AND f.kind = 'asset_checked_out' AND NOT EXISTS (SELECT 1 FROM ledger_facts r"
     " WHERE r.object_id = f.object_id AND r.object_id <> '' AND r.kind = 'asset_returned'"
     " AND r.at_ms >= f.at_ms)) a"
     " WHERE g.n > 0 OR a.n > 0 ORDER BY l.at LIMIT $3) t"},
};

static void report_list(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  QM_UNUSED(req);
  QM_UNUSED(ctx);
  json_t *items = json_array();
  for (size_t i = 0; i < QM_ARRAY_LEN(reports); i++)
    json_array_append_new(items, json_pack("{s:s, s:s, s:s}", "name", reports[i].name, "title",
                                           reports[i].title, "href", "/v1/audit/reports/"));
  size_t i;
  json_t *it;
  json_array_foreach(items, i, it) {
    char *href = qm_asprintf("/v1/audit/reports/%s", reports[i].name);
    json_object_set_new(it, "href", json_string(href));
    free(href);
  }
  qm_http_resp_json(resp, 200, json_pack("{s:o}", "items", items));
}

static void report_route(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  audit_api_t *api = ctx;
  const char *name = qm_http_req_param(req, "name");
  const report_t *r = NULL;
  for (size_t i = 0; i < QM_ARRAY_LEN(reports); i++)
    if (!strcmp(reports[i].name, name)) r = &reports[i];
  if (!r) {
    qm_http_problem(resp, 404, "not-found", "No such report",
                    "GET /v1/audit/reports lists the reports");
    return;
  }
  filter_t f;
  qm_problem_t *pb = parse_filter(req, &f, false);
  const char *limit_s = qm_http_req_query(req, "limit");
  long limit = 1000;
  char *end = NULL;
  if (limit_s && ((limit = strtol(limit_s, &end, 10)) < 1 || limit > 100000 || *end || !*limit_s)) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "limit", "must be an integer from 1 to 100000");
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  int64_t from = f.has_from ? f.from_ms : 0, to = f.has_to ? f.to_ms : INT64_MAX;
  qm_pg_param_t p[] = {QM_PG_INT64(from), QM_PG_INT64(to), QM_PG_INT64(limit)};
  qm_pg_result_t *res = NULL;
  int64_t t0 = qm_now_ms();
  if (!qm_api_query(req, resp, qm_service_pool(api->svc), "audit report", r->sql, p,
                    QM_ARRAY_LEN(p), &res))
    return;
  json_error_t jerr;
  json_t *data = json_loads(qm_pg_get(res, 0, 0), JSON_DECODE_ANY, &jerr);
  qm_pg_result_destroy(res);
  if (!data) {
    qm_http_problem(resp, 500, "internal", "Report failed", jerr.text);
    return;
  }
  json_t *body = json_pack("{s:s, s:s, s:I, s:o, s:I, s:o}", "report", r->name, "title", r->title,
                           "from_ms", (json_int_t)from, "to_ms",
                           to == INT64_MAX ? json_null() : json_integer(to), "computed_in_ms",
                           (json_int_t)(qm_now_ms() - t0), "data", data);
  qm_http_resp_json(resp, 200, body);
}

int audit_api_register(qm_service_t *svc, audit_api_t *api, const char *const *roles,
                       char *errstr, size_t errstr_size) {
  api->svc = svc;
  qm_http_server_t *srv = qm_service_http(svc);
  if (qm_http_route(srv, "GET", "/v1/audit/search", search, api, 0, roles) != QM_OK ||
      qm_http_route(srv, "GET", "/v1/audit/requests/{id}/evidence", evidence, api, 0, roles) != QM_OK ||
      qm_http_route(srv, "GET", "/v1/audit/export", export_route, api, 0, roles) != QM_OK ||
      qm_http_route(srv, "GET", "/v1/audit/reports", report_list, api, 0, roles) != QM_OK ||
      qm_http_route(srv, "GET", "/v1/audit/reports/{name}", report_route, api, 0, roles) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register the auditor's routes");
  return QM_OK;
}
