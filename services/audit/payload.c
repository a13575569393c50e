/*
 * payload: decoding recorded events, their JSON form, their actor and their
 * facts (see payload.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "payload.h"

#include "audit.h"

#include "qm_common.h"
#include "qm_log.h"
#include "qm_topics.h"

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

/* ---- decoding ------------------------------------------------------------- */

static const struct {
  const char *base;
  const ProtobufCMessageDescriptor *desc;
} audit_topics[] = {
    {QM_TOPIC_REQUESTS, &qm__v1__request_event__descriptor},
    {QM_TOPIC_DECISIONS, &qm__v1__decision_event__descriptor},
    {QM_TOPIC_ACCESS, &qm__v1__access_event__descriptor},
    {QM_TOPIC_FULFILLMENT, &qm__v1__fulfillment_event__descriptor},
    {QM_TOPIC_HR, &qm__v1__hr_event__descriptor},
};

static bool ends_with(const char *s, size_t n, const char *suffix) {
  size_t m = strlen(suffix);
  return n >= m && memcmp(s + n - m, suffix, m) == 0 && (n == m || s[n - m - 1] == '.');
}

void audit_payload_decode(const char *topic, const uint8_t *bytes, size_t len,
                          audit_payload_t *out) {
  memset(out, 0, sizeof(*out));
  out->topic = "";
  size_t n = strlen(topic);
  if (ends_with(topic, n, "dlq") && n > strlen(QM_DLQ_SUFFIX)) {
    out->dead_letter = true;
    n -= strlen(QM_DLQ_SUFFIX);
  }
  for (size_t i = 0; i < QM_ARRAY_LEN(audit_topics); i++) {
    if (!ends_with(topic, n, audit_topics[i].base)) continue;
    out->topic = audit_topics[i].base;
    out->msg = protobuf_c_message_unpack(audit_topics[i].desc, NULL, len, bytes);
    return;
  }
}

void audit_payload_clear(audit_payload_t *p) {
  if (p->msg) protobuf_c_message_free_unpacked(p->msg, NULL);
  memset(p, 0, sizeof(*p));
}

/* ---- JSON ----------------------------------------------------------------- */

/* One value of field f at p (a pointer to the value itself). */
static json_t *pb_value(const ProtobufCFieldDescriptor *f, const void *p) {
  switch (f->type) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
    return json_integer(*(const int32_t *)p);
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32:
    return json_integer(*(const uint32_t *)p);
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
    return json_integer(*(const int64_t *)p);
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return json_integer((json_int_t) * (const uint64_t *)p);
  case PROTOBUF_C_TYPE_FLOAT:
    return json_real(*(const float *)p);
  case PROTOBUF_C_TYPE_DOUBLE:
    return json_real(*(const double *)p);
  case PROTOBUF_C_TYPE_BOOL:
    return json_boolean(*(const protobuf_c_boolean *)p);
  case PROTOBUF_C_TYPE_ENUM: {
    int v = *(const int *)p;
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
    return ev ? json_string(ev->name) : json_integer(v);
  }
  case PROTOBUF_C_TYPE_STRING: {
    const char *s = *(char *const *)p;
    return json_string(s ? s : "");
  }
  case PROTOBUF_C_TYPE_BYTES: {
    const ProtobufCBinaryData *b = p;
    char *enc = audit_b64_encode(b->data, b->len);
    json_t *j = json_string(enc);
    free(enc);
    return j;
  }
  case PROTOBUF_C_TYPE_MESSAGE: {
    const ProtobufCMessage *m = *(ProtobufCMessage *const *)p;
    return m ? audit_pb_json(m) : json_null();
  }
  }
  return json_null();
}

static size_t pb_elem_size(ProtobufCType t) {
  switch (t) {
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64:
    return 8;
  case PROTOBUF_C_TYPE_DOUBLE:
    return sizeof(double);
  case PROTOBUF_C_TYPE_BOOL:
    return sizeof(protobuf_c_boolean);
  case PROTOBUF_C_TYPE_STRING:
  case PROTOBUF_C_TYPE_MESSAGE:
    return sizeof(void *);
  case PROTOBUF_C_TYPE_BYTES:
    return sizeof(ProtobufCBinaryData);
  default:
    return 4; /* int32 family, float, enum */
  }
}

/* Whether a proto3 (no presence) value is its default, which the JSON
 * mapping leaves out. */
static bool pb_is_default(const ProtobufCFieldDescriptor *f, const void *p) {
  switch (f->type) {
  case PROTOBUF_C_TYPE_STRING: {
    const char *s = *(char *const *)p;
    return !s || !*s;
  }
  case PROTOBUF_C_TYPE_BYTES:
    return ((const ProtobufCBinaryData *)p)->len == 0;
  case PROTOBUF_C_TYPE_MESSAGE:
    return *(ProtobufCMessage *const *)p == NULL;
  case PROTOBUF_C_TYPE_BOOL:
    return !*(const protobuf_c_boolean *)p;
  case PROTOBUF_C_TYPE_DOUBLE:
    return *(const double *)p == 0;
  case PROTOBUF_C_TYPE_FLOAT:
    return *(const float *)p == 0;
  default: {
    size_t sz = pb_elem_size(f->type);
    return sz == 8 ? *(const uint64_t *)p == 0 : *(const uint32_t *)p == 0;
  }
  }
}

json_t *audit_pb_json(const ProtobufCMessage *msg) {
  if (!msg) return NULL;
  const ProtobufCMessageDescriptor *d = msg->descriptor;
  const char *base = (const char *)msg;
  json_t *obj = json_object();
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    const void *p = base + f->offset;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n = *(const size_t *)(base + f->quantifier_offset);
      if (n == 0) continue;
      const char *arr = *(char *const *)p;
      json_t *a = json_array();
      for (size_t k = 0; k < n; k++) json_array_append_new(a, pb_value(f, arr + k * pb_elem_size(f->type)));
      json_object_set_new(obj, f->name, a);
      continue;
    }
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
      if (*(const uint32_t *)(base + f->quantifier_offset) != f->id) continue;
    } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
               f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING) {
      if (!*(const protobuf_c_boolean *)(base + f->quantifier_offset)) continue;
    } else if (pb_is_default(f, p)) {
      continue;
    }
    json_object_set_new(obj, f->name, pb_value(f, p));
  }
  return obj;
}

/* ---- actor and facts -------------------------------------------------------- */

static const char *actor_id(const Qm__V1__Actor *a) {
  return a && a->person_id ? a->person_id : "";
}

const char *audit_payload_actor(const audit_payload_t *p) {
  if (!p->msg) return "";
  const ProtobufCMessageDescriptor *d = p->msg->descriptor;
  if (d == &qm__v1__request_event__descriptor) {
    const Qm__V1__RequestEvent *e = (const Qm__V1__RequestEvent *)p->msg;
    switch (e->event_case) {
    case QM__V1__REQUEST_EVENT__EVENT_SUBMITTED: return actor_id(e->submitted->requester);
    case QM__V1__REQUEST_EVENT__EVENT_CANCELLED: return actor_id(e->cancelled->actor);
    case QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED:
      return actor_id(e->revocation_requested->actor);
    default: return "";
    }
  }
  if (d == &qm__v1__decision_event__descriptor) {
    const Qm__V1__DecisionEvent *e = (const Qm__V1__DecisionEvent *)p->msg;
    switch (e->event_case) {
    case QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED: return actor_id(e->step_decided->decided_by);
    case QM__V1__DECISION_EVENT__EVENT_REJECTED: return actor_id(e->rejected->rejected_by);
    case QM__V1__DECISION_EVENT__EVENT_APPROVED: {
      const Qm__V1__RequestApproved *a = e->approved;
      return a->n_approvers ? actor_id(a->approvers[a->n_approvers - 1]) : "";
    }
    default: return "";
    }
  }
  if (d == &qm__v1__access_event__descriptor) {
    const Qm__V1__AccessEvent *e = (const Qm__V1__AccessEvent *)p->msg;
    return e->event_case == QM__V1__ACCESS_EVENT__EVENT_REVOKED ? actor_id(e->revoked->actor) : "";
  }
  if (d == &qm__v1__fulfillment_event__descriptor) {
    const Qm__V1__FulfillmentEvent *e = (const Qm__V1__FulfillmentEvent *)p->msg;
    return e->event_case == QM__V1__FULFILLMENT_EVENT__EVENT_UPDATE && e->update->actor_person_id
               ? e->update->actor_person_id
               : "";
  }
  return "";
}

/* "YYYY-MM-DD" as ms since epoch at 00:00 UTC; 0 when it is not a date. */
static int64_t date_ms(const char *s) {
  struct tm tm = {0};
  if (!s || !*s) return 0;
  const char *end = strptime(s, "%Y-%m-%d", &tm);
  if (!end || *end) return 0;
  return (int64_t)timegm(&tm) * 1000;
}

static const char *str(const char *s) { return s ? s : ""; }

int audit_payload_facts(const audit_payload_t *p, const char *request_id, int64_t event_time_ms,
                        audit_fact_fn fn, void *ctx) {
  if (!p->msg || p->dead_letter) return 0; /* a dead letter was never applied */
  const ProtobufCMessageDescriptor *d = p->msg->descriptor;
  audit_fact_t f = {.kind = "", .at_ms = event_time_ms, .request_id = str(request_id),
                    .person_id = "", .actor_id = audit_payload_actor(p), .item_id = "",
                    .department = "", .reason = "", .object_id = ""};
  int rc = 0;
  if (d == &qm__v1__request_event__descriptor) {
    const Qm__V1__RequestEvent *e = (const Qm__V1__RequestEvent *)p->msg;
    if (e->event_case == QM__V1__REQUEST_EVENT__EVENT_SUBMITTED) {
      const Qm__V1__RequestSubmitted *s = e->submitted;
      f.kind = "submitted";
      f.at_ms = s->submitted_at_ms ? s->submitted_at_ms : event_time_ms;
      f.person_id = str(s->subject_person_id);
      f.department = str(s->subject_department);
      f.reason = str(s->origin);
      for (size_t i = 0; i < s->n_lines && rc == 0; i++) {
        f.line_no = s->lines[i]->line_no;
        f.item_id = str(s->lines[i]->item_id);
        rc = fn(ctx, &f);
      }
      return rc;
    }
    if (e->event_case == QM__V1__REQUEST_EVENT__EVENT_CANCELLED) {
      f.kind = "cancelled";
      f.person_id = str(e->cancelled->subject_person_id);
      f.reason = str(e->cancelled->reason);
      return fn(ctx, &f);
    }
    if (e->event_case == QM__V1__REQUEST_EVENT__EVENT_REVOCATION_REQUESTED) {
      f.kind = "revocation_requested";
      f.person_id = str(e->revocation_requested->subject_person_id);
      f.item_id = str(e->revocation_requested->item_id);
      f.reason = str(e->revocation_requested->reason);
      return fn(ctx, &f);
    }
    return 0;
  }
  if (d == &qm__v1__decision_event__descriptor) {
    const Qm__V1__DecisionEvent *e = (const Qm__V1__DecisionEvent *)p->msg;
    if (e->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED) {
      const Qm__V1__RequestApproved *a = e->approved;
      f.kind = "approved";
      f.at_ms = a->approved_at_ms ? a->approved_at_ms : event_time_ms;
      f.person_id = str(a->subject_person_id);
      f.line_no = a->line ? a->line->line_no : 0;
      f.item_id = a->line ? str(a->line->item_id) : "";
      f.flag = a->break_glass;
      f.reason = str(a->break_glass_justification);
      return fn(ctx, &f);
    }
    if (e->event_case == QM__V1__DECISION_EVENT__EVENT_REJECTED) {
      const Qm__V1__RequestRejected *r = e->rejected;
      f.kind = "rejected";
      f.at_ms = r->rejected_at_ms ? r->rejected_at_ms : event_time_ms;
      f.person_id = str(r->subject_person_id);
      f.line_no = r->line_no;
      f.reason = str(r->reason);
      return fn(ctx, &f);
    }
    if (e->event_case == QM__V1__DECISION_EVENT__EVENT_STEP_DECIDED) {
      const Qm__V1__ApprovalStepDecided *s = e->step_decided;
      f.kind = "step_decided";
      f.person_id = str(s->subject_person_id);
      f.line_no = s->line_no;
      f.flag = s->break_glass;
      f.reason = s->approved ? "approved" : "denied";
      f.object_id = str(s->step_id);
      return fn(ctx, &f);
    }
    return 0;
  }
  if (d == &qm__v1__access_event__descriptor) {
    const Qm__V1__AccessEvent *e = (const Qm__V1__AccessEvent *)p->msg;
    if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_GRANTED) {
      const Qm__V1__AccessGranted *g = e->granted;
      f.kind = "granted";
      f.at_ms = g->granted_at_ms ? g->granted_at_ms : event_time_ms;
      f.person_id = str(g->subject_person_id);
      f.line_no = g->line_no;
      f.item_id = str(g->item_id);
      f.object_id = str(g->grant_id);
      f.flag = g->extension;
      return fn(ctx, &f);
    }
    if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_REVOKED) {
      const Qm__V1__AccessRevoked *r = e->revoked;
      f.kind = "revoked";
      f.at_ms = r->revoked_at_ms ? r->revoked_at_ms : event_time_ms;
      f.person_id = str(r->subject_person_id);
      f.item_id = str(r->item_id);
      f.object_id = str(r->grant_id);
      f.reason = str(r->reason);
      /* Automatic: no person decided it (expiry, leaver, mover). */
      f.flag = !*f.actor_id;
      return fn(ctx, &f);
    }
    if (e->event_case == QM__V1__ACCESS_EVENT__EVENT_FAILED) {
      f.kind = "provisioning_failed";
      f.person_id = str(e->failed->subject_person_id);
      f.line_no = e->failed->line_no;
      f.reason = str(e->failed->operation);
      f.object_id = str(e->failed->operation_id);
      return fn(ctx, &f);
    }
    return 0;
  }
  if (d == &qm__v1__fulfillment_event__descriptor) {
    const Qm__V1__FulfillmentEvent *e = (const Qm__V1__FulfillmentEvent *)p->msg;
    if (e->event_case != QM__V1__FULFILLMENT_EVENT__EVENT_UPDATE) return 0;
    const Qm__V1__FulfillmentUpdate *u = e->update;
    const ProtobufCEnumValue *ev =
        protobuf_c_enum_descriptor_get_value(&qm__v1__fulfillment_step__descriptor, (int)u->step);
    char kind[64] = "asset_";
    const char *name = ev ? ev->name : "unspecified";
    if (!strncmp(name, "FULFILLMENT_STEP_", 17)) name += 17;
    size_t k = strlen(kind);
    for (; *name && k + 1 < sizeof(kind); name++) kind[k++] = (char)tolower((unsigned char)*name);
    kind[k] = '\0';
    f.kind = kind;
    f.at_ms = u->at_ms ? u->at_ms : event_time_ms;
    f.person_id = str(u->subject_person_id);
    f.line_no = u->line_no;
    f.item_id = str(u->model_id);
    f.object_id = str(u->asset_tag);
    f.reason = str(u->note);
    return fn(ctx, &f);
  }
  if (d == &qm__v1__hr_event__descriptor) {
    const Qm__V1__HrEvent *h = (const Qm__V1__HrEvent *)p->msg;
    switch (h->kind) {
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_JOINER: f.kind = "hr_joiner"; break;
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_MOVER: f.kind = "hr_mover"; break;
    case QM__V1__HR_EVENT_KIND__HR_EVENT_KIND_LEAVER: f.kind = "hr_leaver"; break;
    default: return 0;
    }
    /* The clock of joiner-to-access and leaver-to-revocation starts when
     * both the change is effective and we have heard of it. */
    int64_t eff = date_ms(h->effective_date);
    f.at_ms = eff > event_time_ms ? eff : event_time_ms;
    f.person_id = h->person ? str(h->person->id) : "";
    f.department = h->person ? str(h->person->department) : "";
    f.reason = str(h->source);
    return fn(ctx, &f);
  }
  return 0;
}

/* ---- writing facts ------------------------------------------------------------- */

typedef struct {
  qm_pg_t *tx;
  const char *chain_id;
  int64_t seq;
  char *errstr;
  size_t errstr_size;
} fact_insert_t;

static int fact_insert(void *ctx, const audit_fact_t *f) {
  fact_insert_t *fi = ctx;
  qm_pg_param_t p[] = {QM_PG_TEXT(fi->chain_id), QM_PG_INT64(fi->seq),     QM_PG_TEXT(f->kind),
                       QM_PG_INT64(f->line_no),  QM_PG_INT64(f->at_ms),    QM_PG_TEXT(f->request_id),
                       QM_PG_TEXT(f->person_id), QM_PG_TEXT(f->actor_id),  QM_PG_TEXT(f->item_id),
                       QM_PG_TEXT(f->department), QM_PG_TEXT(f->reason),   QM_PG_TEXT(f->object_id),
                       QM_PG_TEXT(f->flag ? "true" : "false")};
  return qm_pg_exec(fi->tx,
                    "INSERT INTO ledger_facts (chain_id, seq, kind, line_no, at_ms, request_id,"
                    " person_id, actor_id, item_id, department, reason, object_id, flag)"
                    " VALUES ($1, $2::bigint, $3, $4::int, $5::bigint, $6, $7, $8, $9, $10, $11,"
                    " $12, $13::boolean) ON CONFLICT DO NOTHING",
                    p, QM_ARRAY_LEN(p), NULL, fi->errstr, fi->errstr_size);
}

int audit_facts_insert(qm_pg_t *tx, const char *chain_id, int64_t seq, const audit_payload_t *p,
                       const char *request_id, int64_t event_time_ms, char *errstr,
                       size_t errstr_size) {
  fact_insert_t fi = {tx, chain_id, seq, errstr, errstr_size};
  return audit_payload_facts(p, request_id, event_time_ms, fact_insert, &fi);
}

/* ---- qm-audit reindex ------------------------------------------------------------ */

int audit_reindex_main(int argc, char **argv) {
  QM_UNUSED(argv);
  if (argc > 1) {
    fprintf(stderr, "usage: qm-audit reindex   (rebuilds ledger_facts from the ledger; reads "
                    "QM_PG_DSN)\n");
    return 2;
  }
  qm_log_init("audit", QM_LOG_WARN, NULL);
  char errstr[512];
  qm_pg_t *pg = audit_tool_connect("reindex");
  if (!pg) return 2;
  int64_t t0 = qm_now_ms(), records = 0, facts_before = 0, facts_after = 0;
  qm_pg_result_t *res = NULL;
  /* One transaction: readers see the old projection until the new one is
   * complete, and a failure leaves the old one in place. */
  int rc = qm_pg_exec(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ", NULL, 0, NULL, errstr,
                      sizeof(errstr));
  if (rc == QM_OK) rc = qm_pg_exec(pg, "SELECT count(*) FROM ledger_facts", NULL, 0, &res, errstr, sizeof(errstr));
  if (rc == QM_OK) qm_pg_get_int64(res, 0, 0, &facts_before);
  qm_pg_result_destroy(res);
  res = NULL;
  if (rc == QM_OK) rc = qm_pg_exec(pg, "DELETE FROM ledger_facts", NULL, 0, NULL, errstr, sizeof(errstr));
  if (rc == QM_OK)
    rc = qm_pg_exec(pg,
                    "DECLARE recs NO SCROLL CURSOR FOR SELECT chain_id, seq, topic, request_id,"
                    " event_time_ms, event_bytes FROM ledger ORDER BY chain_id, seq",
                    NULL, 0, NULL, errstr, sizeof(errstr));
  while (rc == QM_OK) {
    rc = qm_pg_exec(pg, "FETCH 2000 FROM recs", NULL, 0, &res, errstr, sizeof(errstr));
    if (rc != QM_OK) break;
    int n = qm_pg_ntuples(res);
    for (int i = 0; i < n && rc == QM_OK; i++) {
      int64_t seq = 0, at = 0;
      unsigned char *bytes = NULL;
      size_t len = 0;
      qm_pg_get_int64(res, i, 1, &seq);
      qm_pg_get_int64(res, i, 4, &at);
      qm_pg_get_bytes(res, i, 5, &bytes, &len);
      audit_payload_t p;
      audit_payload_decode(qm_pg_get(res, i, 2), bytes, len, &p);
      rc = audit_facts_insert(pg, qm_pg_get(res, i, 0), seq, &p, qm_pg_get(res, i, 3), at, errstr,
                              sizeof(errstr));
      audit_payload_clear(&p);
      free(bytes);
      records++;
    }
    qm_pg_result_destroy(res);
    res = NULL;
    if (n == 0) break;
  }
  if (rc == QM_OK) rc = qm_pg_exec(pg, "SELECT count(*) FROM ledger_facts", NULL, 0, &res, errstr, sizeof(errstr));
  if (rc == QM_OK) qm_pg_get_int64(res, 0, 0, &facts_after);
  qm_pg_result_destroy(res);
  if (rc == QM_OK) rc = qm_pg_exec(pg, "COMMIT", NULL, 0, NULL, errstr, sizeof(errstr));
  qm_pg_destroy(pg);
  if (rc != QM_OK) {
    fprintf(stderr, "qm-audit reindex: %s (nothing changed)\n", errstr);
    return 1;
  }
  printf("reindexed %lld records: %lld facts (were %lld) in %.1f s\n", (long long)records,
         (long long)facts_after, (long long)facts_before, (double)(qm_now_ms() - t0) / 1000.0);
  return 0;
}
