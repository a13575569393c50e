/*
 * qm-audit: every event of every topic, appended once to a hash-chained,
 * append-only ledger, and republished sealed on qm.audit.v1 so an auditor
 * can verify the chain from the topic alone.
 *
 * This version keeps one chain ("chain-0"); appends lock the chain head row,
 * so instances sharing the work stay gapless. The ledger refuses UPDATE,
 * DELETE and TRUNCATE by trigger. `qm-audit verify` recomputes the chain from
 * the database and names the first sequence where it breaks.
 */
#include "chain.h"

#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_pg.h"
#include "qm_service.h"
#include "qm_topics.h"

#include "qm/v1/audit.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAIN_ID "chain-0"

static const qm_migration_t migrations[] = {
    {2, "ledger",
     "CREATE TABLE ledger ("
     " chain_id text NOT NULL,"
     " seq bigint NOT NULL,"
     " recorded_at_ms bigint NOT NULL,"
     " topic text NOT NULL,"
     " event_id text NOT NULL UNIQUE,"
     " event_type text NOT NULL,"
     " event_source text NOT NULL,"
     " subject text NOT NULL,"
     " person_id text NOT NULL,"
     " actor_id text NOT NULL,"
     " request_id text NOT NULL,"
     " event_time_ms bigint NOT NULL,"
     " dead_letter boolean NOT NULL,"
     " event_bytes bytea NOT NULL,"
     " prev_hash bytea NOT NULL,"
     " hash bytea NOT NULL,"
     " PRIMARY KEY (chain_id, seq));"
     "CREATE INDEX ledger_request ON ledger (request_id) WHERE request_id <> '';"
     "CREATE INDEX ledger_type ON ledger (event_type, recorded_at_ms);"
     "CREATE TABLE chain_heads (chain_id text PRIMARY KEY, seq bigint NOT NULL, hash bytea NOT NULL);"
     "CREATE FUNCTION ledger_refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
     " BEGIN RAISE EXCEPTION 'the audit ledger is append-only: % refused', TG_OP"
     " USING ERRCODE = 'insufficient_privilege'; END $$;"
     "CREATE TRIGGER ledger_no_change BEFORE UPDATE OR DELETE ON ledger"
     " FOR EACH ROW EXECUTE FUNCTION ledger_refuse();"
     "CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger"
     " FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();"},
};

static bool topic_names_request(const qm_service_t *svc, const char *topic) {
  return qm_service_topic_is(svc, topic, QM_TOPIC_REQUESTS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_DECISIONS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_ACCESS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_FULFILLMENT);
}

static int handle(qm_service_t *svc, void *app, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  QM_UNUSED(app);
  bool dlq = qm_event_topic_is_dlq(ev->topic);
  char event_id[96] = "";
  if (dlq) {
    if (!qm_event_header(ev, "qm_dlq_id", event_id, sizeof(event_id)))
      snprintf(event_id, sizeof(event_id), "%s/%d/%lld", ev->topic, ev->partition,
               (long long)ev->offset);
  } else {
    qm_strlcpy(event_id, ev->meta.id, sizeof(event_id));
  }
  char person[160] = "";
  size_t klen = ev->key_len < sizeof(person) - 1 ? ev->key_len : sizeof(person) - 1;
  if (klen) memcpy(person, ev->key, klen);
  char base_topic[256];
  qm_strlcpy(base_topic, ev->topic, sizeof(base_topic));
  const char *type = ev->meta_valid ? ev->meta.type : "";
  char dlq_type[96] = "";
  if (dlq && !type[0] && qm_event_header(ev, "ce_type", dlq_type, sizeof(dlq_type))) type = dlq_type;
  const char *request_id = ev->meta_valid && topic_names_request(svc, ev->topic) ? ev->meta.subject : "";

  qm_pg_param_t hp[] = {QM_PG_TEXT(CHAIN_ID)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(tx,
                      "INSERT INTO chain_heads (chain_id, seq, hash)"
                      " VALUES ($1, 0, decode(repeat('00', 32), 'hex')) ON CONFLICT DO NOTHING",
                      hp, 1, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_pg_exec(tx, "SELECT seq, hash FROM chain_heads WHERE chain_id = $1 FOR UPDATE", hp, 1,
                    &res, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  int64_t prev_seq = 0;
  unsigned char *prev = NULL;
  size_t prev_len = 0;
  qm_pg_get_int64(res, 0, 0, &prev_seq);
  qm_pg_get_bytes(res, 0, 1, &prev, &prev_len);
  qm_pg_result_destroy(res);
  if (prev_len != CHAIN_HASH_LEN) {
    free(prev);
    return qm_err(errstr, errstr_size, QM_EIO, "chain head of %s is corrupt", CHAIN_ID);
  }
  chain_record_t r = {
      .chain_id = CHAIN_ID,
      .seq = prev_seq + 1,
      .recorded_at_ms = qm_now_ms(),
      .topic = base_topic,
      .event_id = event_id,
      .event_type = type,
      .event_source = ev->meta_valid ? ev->meta.source : "",
      .subject = ev->meta_valid ? ev->meta.subject : "",
      .person_id = person,
      .actor_id = "",
      .request_id = request_id,
      .event_time_ms = ev->meta_valid ? ev->meta.time_ms : ev->timestamp_ms,
      .dead_letter = dlq,
      .event_bytes = ev->payload,
      .event_len = ev->payload_len,
  };
  uint8_t hash[CHAIN_HASH_LEN];
  chain_hash(prev, &r, hash);
  qm_pg_param_t ip[] = {
      QM_PG_TEXT(r.chain_id),      QM_PG_INT64(r.seq),          QM_PG_INT64(r.recorded_at_ms),
      QM_PG_TEXT(r.topic),         QM_PG_TEXT(r.event_id),      QM_PG_TEXT(r.event_type),
      QM_PG_TEXT(r.event_source),  QM_PG_TEXT(r.subject),       QM_PG_TEXT(r.person_id),
      QM_PG_TEXT(r.actor_id),      QM_PG_TEXT(r.request_id),    QM_PG_INT64(r.event_time_ms),
      QM_PG_TEXT(dlq ? "true" : "false"), QM_PG_BYTES(r.event_bytes ? (const void *)r.event_bytes : "", r.event_len),
      QM_PG_BYTES(prev, CHAIN_HASH_LEN), QM_PG_BYTES(hash, CHAIN_HASH_LEN)};
  rc = qm_pg_exec(tx,
                  "INSERT INTO ledger (chain_id, seq, recorded_at_ms, topic, event_id, event_type,"
                  " event_source, subject, person_id, actor_id, request_id, event_time_ms,"
                  " dead_letter, event_bytes, prev_hash, hash) VALUES ($1, $2::bigint,"
                  " $3::bigint, $4, $5, $6, $7, $8, $9, $10, $11, $12::bigint, $13::boolean,"
                  " $14, $15, $16)",
                  ip, QM_ARRAY_LEN(ip), NULL, errstr, errstr_size);
  if (rc == QM_OK) {
    qm_pg_param_t up[] = {QM_PG_TEXT(CHAIN_ID), QM_PG_INT64(r.seq), QM_PG_BYTES(hash, CHAIN_HASH_LEN)};
    rc = qm_pg_exec(tx, "UPDATE chain_heads SET seq = $2::bigint, hash = $3 WHERE chain_id = $1",
                    up, 3, NULL, errstr, errstr_size);
  }
  if (rc == QM_OK) {
    Qm__V1__AuditRecord ar = QM__V1__AUDIT_RECORD__INIT;
    ar.chain_id = (char *)r.chain_id;
    ar.sequence = r.seq;
    ar.recorded_at_ms = r.recorded_at_ms;
    ar.topic = (char *)r.topic;
    ar.event_id = (char *)r.event_id;
    ar.event_type = (char *)r.event_type;
    ar.event_source = (char *)r.event_source;
    ar.subject = (char *)r.subject;
    ar.person_id = (char *)r.person_id;
    ar.actor_id = (char *)r.actor_id;
    ar.request_id = (char *)r.request_id;
    ar.event_bytes.data = (uint8_t *)r.event_bytes;
    ar.event_bytes.len = r.event_len;
    ar.prev_hash.data = prev;
    ar.prev_hash.len = CHAIN_HASH_LEN;
    ar.hash.data = hash;
    ar.hash.len = CHAIN_HASH_LEN;
    ar.event_time_ms = r.event_time_ms;
    ar.dead_letter = r.dead_letter;
    Qm__V1__AuditEvent ae = QM__V1__AUDIT_EVENT__INIT;
    ae.event_case = QM__V1__AUDIT_EVENT__EVENT_RECORD;
    ae.record = &ar;
    rc = qm_service_emit(svc, tx, QM_TOPIC_AUDIT, CHAIN_ID, "qm.audit.record_sealed.v1",
                         r.request_id[0] ? r.request_id : r.subject,
                         ev->meta_valid ? ev->meta.traceparent : NULL, &ae.base, NULL, errstr,
                         errstr_size);
  }
  free(prev);
  return rc;
}

/* GET /v1/ledger?request_id=&type=&limit=&after= — records in chain order. */
static void list_ledger(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  qm_service_t *svc = ctx;
  const char *request_id = qm_http_req_query(req, "request_id");
  const char *type = qm_http_req_query(req, "type");
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after_s = qm_http_req_query(req, "after");
  long limit = 100;
  long long after = 0;
  qm_problem_t *pb = NULL;
  char *end = NULL;
  if (limit_s && ((limit = strtol(limit_s, &end, 10)) < 1 || limit > 1000 || *end || !*limit_s)) {
    pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "limit", "must be an integer from 1 to 1000");
  }
  if (after_s && ((after = strtoll(after_s, &end, 10)) < 0 || *end || !*after_s)) {
    if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "after", "must be a sequence number (the 'next' of a previous page)");
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(svc), 5000, &pg) != QM_OK) {
    qm_http_problem(resp, 503, "unavailable", "Database busy", "try again shortly");
    return;
  }
  qm_pg_param_t p[] = {QM_PG_TEXT(CHAIN_ID), request_id ? QM_PG_TEXT(request_id) : QM_PG_NULL,
                       type ? QM_PG_TEXT(type) : QM_PG_NULL, QM_PG_INT64(after),
                       QM_PG_INT64(limit + 1)};
  qm_pg_result_t *res = NULL;
  char errstr[512];
  int rc = qm_pg_exec(pg,
                      "SELECT seq, recorded_at_ms, topic, event_id, event_type, event_source,"
                      " subject, person_id, request_id, event_time_ms, dead_letter,"
                      " encode(hash, 'hex'), encode(prev_hash, 'hex') FROM ledger"
                      " WHERE chain_id = $1 AND ($2::text IS NULL OR request_id = $2)"
                      " AND ($3::text IS NULL OR event_type = $3) AND seq > $4::bigint"
                      " ORDER BY seq LIMIT $5::int",
                      p, 5, &res, errstr, sizeof(errstr));
  qm_pg_pool_release(qm_service_pool(svc), pg);
  if (rc != QM_OK) {
    qm_log(QM_LOG_ERROR, qm_http_req_id(req), qm_http_req_trace_id(req), "ledger query: %s", errstr);
    qm_http_problem(resp, 503, "unavailable", "Database error", "try again shortly");
    return;
  }
  json_t *items = json_array();
  int n = qm_pg_ntuples(res);
  int shown = n > limit ? (int)limit : n;
  for (int i = 0; i < shown; i++) {
    int64_t seq = 0, rec = 0, evt = 0;
    qm_pg_get_int64(res, i, 0, &seq);
    qm_pg_get_int64(res, i, 1, &rec);
    qm_pg_get_int64(res, i, 9, &evt);
    json_array_append_new(
        items, json_pack("{s:s, s:I, s:I, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:b, s:s, s:s}",
                         "chain_id", CHAIN_ID, "sequence", (json_int_t)seq, "recorded_at_ms",
                         (json_int_t)rec, "topic", qm_pg_get(res, i, 2), "event_id",
                         qm_pg_get(res, i, 3), "event_type", qm_pg_get(res, i, 4), "event_source",
                         qm_pg_get(res, i, 5), "subject", qm_pg_get(res, i, 6), "person_id",
                         qm_pg_get(res, i, 7), "request_id", qm_pg_get(res, i, 8), "event_time_ms",
                         (json_int_t)evt, "dead_letter", strcmp(qm_pg_get(res, i, 10), "t") == 0,
                         "hash", qm_pg_get(res, i, 11), "prev_hash", qm_pg_get(res, i, 12)));
  }
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > limit) json_object_set_new(body, "next", json_string(qm_pg_get(res, shown - 1, 0)));
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

static int init(qm_service_t *svc, void **app, char *errstr, size_t errstr_size) {
  static const char *const auditors[] = {"auditor", "security", "it_admin", NULL};
  *app = svc;
  if (qm_http_route(qm_service_http(svc), "GET", "/v1/ledger", list_ledger, svc, 0, auditors) != QM_OK)
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot register audit routes");
  return QM_OK;
}

int audit_verify_main(int argc, char **argv);

static const char *const consumes[] = {
    QM_TOPIC_HR,         QM_TOPIC_REQUESTS,         QM_TOPIC_DECISIONS,         QM_TOPIC_ACCESS,
    QM_TOPIC_FULFILLMENT, QM_TOPIC_HR ".dlq",       QM_TOPIC_REQUESTS ".dlq",   QM_TOPIC_DECISIONS ".dlq",
    QM_TOPIC_ACCESS ".dlq", QM_TOPIC_FULFILLMENT ".dlq"};

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "verify")) return audit_verify_main(argc - 1, argv + 1);
  static const qm_service_def_t def = {
      .name = "audit",
      .default_port = 8085,
      .migrations = migrations,
      .n_migrations = QM_ARRAY_LEN(migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .init = init,
  };
  return qm_service_main(argc, argv, &def);
}
