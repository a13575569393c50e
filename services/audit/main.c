/*
 * qm-audit: every event of every topic, appended once to a hash-chained,
 * append-only ledger, and republished sealed on qm.audit.v1 so an auditor
 * can verify the chains from the topic alone.
 *
 * The ledger holds QM_AUDIT_CHAINS chains ("chain-0".."chain-<N-1>"); an
 * event goes to chain CRC-32(its Kafka key, the person id) mod N (chain.h),
 * so one person's events stay in one chain and in order, and its record is
 * published with the chain id as key, so a chain lives in one partition of
 * qm.audit.v1. Appends stay gapless however many instances share the work:
 * the chain's head row is locked before the record is written. When this
 * instance made the chain's previous append, one statement does it all — an
 * UPDATE of the head conditional on the head still being the one it left
 * (which takes the row lock, waiting for any other holder, and re-checks)
 * with the INSERT of the record in the same CTE. Otherwise, or when the
 * head moved, SELECT … FOR UPDATE locks and reads the head and one CTE
 * inserts the record and advances the head. Then the sealed record goes to
 * the outbox. So two or three statements per event, of which at most two
 * for the chain. The ledger and the checkpoints refuse
 * UPDATE, DELETE and TRUNCATE by trigger. A signer thread (checkpoint.c)
 * signs moved heads with Ed25519 every QM_AUDIT_CHECKPOINT_INTERVAL and at
 * shutdown.
 *
 * The same binary carries the auditor's tools: `qm-audit verify`, `export`,
 * `keygen`, `pubkey` and `migrate` (see usage()).
 */
#include "audit.h"
#include "chain.h"
#include "evidence.h"
#include "payload.h"

#include "qm_api.h"
#include "qm_common.h"
#include "qm_http.h"
#include "qm_log.h"
#include "qm_outbox.h"
#include "qm_pg.h"
#include "qm_service.h"
#include "qm_topics.h"

#include "qm/v1/audit.pb-c.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const qm_migration_t audit_migrations[] = {
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
    {3, "chains per partition and signed checkpoints",
     "CREATE TABLE checkpoints ("
     " id bigserial PRIMARY KEY,"
     " chain_id text NOT NULL,"
     " seq bigint NOT NULL,"
     " head_hash bytea NOT NULL,"
     " signed_at_ms bigint NOT NULL,"
     " algorithm text NOT NULL,"
     " key_id text NOT NULL,"
     " public_key bytea NOT NULL,"
     " signature bytea NOT NULL);"
     "CREATE INDEX checkpoints_chain_key ON checkpoints (chain_id, key_id, seq);"
     "CREATE TRIGGER checkpoints_no_change BEFORE UPDATE OR DELETE ON checkpoints"
     " FOR EACH ROW EXECUTE FUNCTION ledger_refuse();"
     "CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints"
     " FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();"},
    {4, "facts for reports, indexes for search",
     /* A projection of the ledger (payload.h): rebuildable with `qm-audit
      * reindex`, so it is not append-only. */
     "CREATE TABLE ledger_facts ("
     " chain_id text NOT NULL,"
     " seq bigint NOT NULL,"
     " kind text NOT NULL,"
     " line_no int NOT NULL,"
     " at_ms bigint NOT NULL,"
     " request_id text NOT NULL,"
     " person_id text NOT NULL,"
     " actor_id text NOT NULL,"
     " item_id text NOT NULL,"
     " department text NOT NULL,"
     " reason text NOT NULL,"
     " object_id text NOT NULL,"
     " flag boolean NOT NULL,"
     " PRIMARY KEY (chain_id, seq, kind, line_no));"
     "CREATE INDEX ledger_facts_kind_at ON ledger_facts (kind, at_ms);"
     "CREATE INDEX ledger_facts_request ON ledger_facts (request_id) WHERE request_id <> '';"
     "CREATE INDEX ledger_facts_person ON ledger_facts (person_id, kind);"
     "CREATE INDEX ledger_facts_item ON ledger_facts (item_id) WHERE item_id <> '';"
     "CREATE INDEX ledger_facts_object ON ledger_facts (object_id, kind) WHERE object_id <> '';"
     "CREATE INDEX ledger_time ON ledger (event_time_ms);"
     "CREATE INDEX ledger_person ON ledger (person_id, event_time_ms);"
     "CREATE INDEX ledger_actor ON ledger (actor_id, event_time_ms) WHERE actor_id <> '';"},
    {5, "retention: anchors of pruned chains; flagged facts",
     /* prune.c: the start of a pruned chain, vouched for by a checkpoint. */
     "CREATE TABLE ledger_anchors ("
     " id bigserial PRIMARY KEY,"
     " chain_id text NOT NULL,"
     " seq bigint NOT NULL,"
     " hash bytea NOT NULL,"
     " checkpoint_id bigint NOT NULL,"
     " pruned_at_ms bigint NOT NULL,"
     " records bigint NOT NULL);"
     "CREATE INDEX ledger_anchors_chain ON ledger_anchors (chain_id, seq);"
     /* break-glass and automatic revocations: a few flagged facts among many */
     "CREATE INDEX ledger_facts_flagged ON ledger_facts (kind, at_ms) WHERE flag;"
     "CREATE TRIGGER ledger_anchors_no_change BEFORE UPDATE OR DELETE ON ledger_anchors"
     " FOR EACH ROW EXECUTE FUNCTION ledger_refuse();"
     "CREATE TRIGGER ledger_anchors_no_truncate BEFORE TRUNCATE ON ledger_anchors"
     " FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse();"
     /* The one way past the ledger's trigger: a DELETE of ledger rows in a
      * transaction that set qm.audit.prune (only prune.c does). */
     "CREATE OR REPLACE FUNCTION ledger_refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
     " BEGIN"
     " IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'ledger'"
     " AND current_setting('qm.audit.prune', true) = 'on' THEN RETURN OLD; END IF;"
     " RAISE EXCEPTION 'the audit ledger is append-only: % refused', TG_OP"
     " USING ERRCODE = 'insufficient_privilege'; END $$;"},
};
const size_t audit_n_migrations = QM_ARRAY_LEN(audit_migrations);

static const qm_cfg_def_t audit_config[] = {
    {"QM_AUDIT_CHAINS", QM_CFG_INT, "3",
     "Hash chains in the ledger; an event goes to chain CRC-32(person id) mod N. Set it to the "
     "source topics' partition count, the same on every instance.", 1, 1024, 0},
    {"QM_AUDIT_CHECKPOINT_INTERVAL", QM_CFG_MS, "60s",
     "How often every chain whose head moved is signed (and once more at shutdown).", 100,
     86400000, 0},
    {"QM_AUDIT_RETENTION", QM_CFG_MS, "2557d",
     "How long ledger records are kept (default seven years; 0 keeps them for ever). Older "
     "records are pruned from the start of each chain up to a signed checkpoint, leaving an "
     "anchor that `qm-audit verify` checks.", 0, 36500LL * 86400000, 0},
    {"QM_AUDIT_PRUNE_INTERVAL", QM_CFG_MS, "1h", "How often retention runs (after a checkpoint round).",
     1000, 7LL * 86400000, 0},
    {"QM_AUDIT_PRUNE_BATCH", QM_CFG_INT, "100000",
     "At most this many records are pruned per chain and round (one transaction each).", 1,
     10000000, 0},
    {"QM_AUDIT_MAX_EXPORTS", QM_CFG_INT, "4",
     "Exports (GET /v1/audit/export) that may stream at once, each on a database connection of "
     "its own; more are answered 429 with Retry-After.", 1, 64, 0},
    {"QM_AUDIT_SIGNING_KEY_FILE", QM_CFG_STR, "",
     "PEM Ed25519 private key that signs checkpoints (make one with `qm-audit keygen`). Empty: "
     "a new key at every start, so checkpoints prove nothing across restarts.", 0, 0, 0},
};

/* The service's state, built by init() and shared by the handler, the HTTP
 * routes and the signer: read-only after init() except `heads`, which only
 * the consumer thread touches. */
typedef struct audit_app {
  qm_service_t *svc;
  int n_chains;
  chain_key_t *key;
  bool ephemeral;
  char key_id[CHAIN_KEY_ID_LEN];
  char *pub_pem;
  char *pub_b64;
  audit_ckpt_t *ckpt;
  audit_api_t api; /* evidence, search, exports, reports (evidence.c) */
  /* The head each chain had after this instance's last append, so the next
   * append can claim it in one statement (see append()). */
  struct audit_head_cache {
    bool known;
    int64_t seq;
    uint8_t hash[CHAIN_HASH_LEN];
  } *heads;
} audit_app_t;

static bool topic_names_request(const qm_service_t *svc, const char *topic) {
  return qm_service_topic_is(svc, topic, QM_TOPIC_REQUESTS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_DECISIONS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_ACCESS) ||
         qm_service_topic_is(svc, topic, QM_TOPIC_FULFILLMENT);
}

/* Locks the head row of chain_id and reads it; creates the row first when a
 * chain has none yet (chains are created at start, so this is rare). */
static int lock_head(qm_pg_t *tx, const char *chain_id, int64_t *seq, unsigned char **hash,
                     size_t *hash_len, char *errstr, size_t errstr_size) {
  qm_pg_param_t hp[] = {QM_PG_TEXT(chain_id)};
  qm_pg_result_t *res = NULL;
  int rc = QM_OK;
  for (int attempt = 0; attempt < 2; attempt++) {
    rc = qm_pg_exec(tx, "SELECT seq, hash FROM chain_heads WHERE chain_id = $1 FOR UPDATE", hp, 1,
                    &res, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    if (qm_pg_ntuples(res) == 1) break;
    qm_pg_result_destroy(res);
    res = NULL;
    rc = qm_pg_exec(tx,
                    "INSERT INTO chain_heads (chain_id, seq, hash)"
                    " VALUES ($1, 0, decode(repeat('00', 32), 'hex')) ON CONFLICT DO NOTHING",
                    hp, 1, NULL, errstr, errstr_size);
    if (rc != QM_OK) return rc;
  }
  if (!res) return qm_err(errstr, errstr_size, QM_EIO, "chain head of %s cannot be created", chain_id);
  qm_pg_get_int64(res, 0, 0, seq);
  qm_pg_get_bytes(res, 0, 1, hash, hash_len);
  qm_pg_result_destroy(res);
  return QM_OK;
}

/* Inserts record r (with its prev_hash and hash) and advances the head to
 * it, in one statement. With only_if_head, the head is advanced only if it
 * still is (r->seq - 1, prev) — an UPDATE that takes the head row's lock,
 * waiting for another instance's transaction if one holds it, and then
 * re-checks the condition — and the record is inserted only if it was:
 * *appended says whether it happened. Without, the caller holds the lock
 * already (lock_head()) and the head must advance. */
static int append(qm_pg_t *tx, const chain_record_t *r, const uint8_t prev[CHAIN_HASH_LEN],
                  const uint8_t hash[CHAIN_HASH_LEN], bool only_if_head, bool *appended,
                  char *errstr, size_t errstr_size) {
  qm_pg_param_t ip[] = {
      QM_PG_TEXT(r->chain_id),      QM_PG_INT64(r->seq),          QM_PG_INT64(r->recorded_at_ms),
      QM_PG_TEXT(r->topic),         QM_PG_TEXT(r->event_id),      QM_PG_TEXT(r->event_type),
      QM_PG_TEXT(r->event_source),  QM_PG_TEXT(r->subject),       QM_PG_TEXT(r->person_id),
      QM_PG_TEXT(r->actor_id),      QM_PG_TEXT(r->request_id),    QM_PG_INT64(r->event_time_ms),
      QM_PG_TEXT(r->dead_letter ? "true" : "false"),
      QM_PG_BYTES(r->event_bytes ? (const void *)r->event_bytes : "", r->event_len),
      QM_PG_BYTES(prev, CHAIN_HASH_LEN), QM_PG_BYTES(hash, CHAIN_HASH_LEN)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(
      tx,
      only_if_head
          ? "WITH head AS (UPDATE chain_heads SET seq = $2::bigint, hash = $16"
            " WHERE chain_id = $1 AND seq = $2::bigint - 1 AND hash = $15 RETURNING chain_id)"
            " INSERT INTO ledger (chain_id, seq, recorded_at_ms, topic, event_id, event_type,"
            " event_source, subject, person_id, actor_id, request_id, event_time_ms, dead_letter,"
            " event_bytes, prev_hash, hash) SELECT $1, $2::bigint, $3::bigint, $4, $5, $6, $7,"
            " $8, $9, $10, $11, $12::bigint, $13::boolean, $14, $15, $16 FROM head"
          : "WITH rec AS (INSERT INTO ledger (chain_id, seq, recorded_at_ms, topic, event_id,"
            " event_type, event_source, subject, person_id, actor_id, request_id,"
            " event_time_ms, dead_letter, event_bytes, prev_hash, hash) VALUES ($1,"
            " $2::bigint, $3::bigint, $4, $5, $6, $7, $8, $9, $10, $11, $12::bigint,"
            " $13::boolean, $14, $15, $16) RETURNING chain_id, seq, hash)"
            " UPDATE chain_heads h SET seq = rec.seq, hash = rec.hash FROM rec"
            " WHERE h.chain_id = rec.chain_id",
      ip, QM_ARRAY_LEN(ip), &res, errstr, errstr_size);
  if (rc == QM_OK) *appended = qm_pg_affected(res) == 1;
  qm_pg_result_destroy(res);
  return rc;
}

static int handle(qm_service_t *svc, void *app_, qm_pg_t *tx, const qm_event_in_t *ev,
                  char *errstr, size_t errstr_size) {
  audit_app_t *app = app_;
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
  int chain_index = chain_pick(ev->key, ev->key_len, app->n_chains);
  char chain_id[CHAIN_ID_MAX];
  chain_name(chain_index, chain_id);

  /* The payload, decoded once: the actor it names goes into the record
   * (and so under the hash), its facts into the report projection. */
  audit_payload_t payload;
  audit_payload_decode(ev->topic, ev->payload, ev->payload_len, &payload);
  chain_record_t r = {
      .chain_id = chain_id,
      .recorded_at_ms = qm_now_ms(),
      .topic = base_topic,
      .event_id = event_id,
      .event_type = type,
      .event_source = ev->meta_valid ? ev->meta.source : "",
      .subject = ev->meta_valid ? ev->meta.subject : "",
      .person_id = person,
      .actor_id = audit_payload_actor(&payload),
      .request_id = request_id,
      .event_time_ms = ev->meta_valid ? ev->meta.time_ms : ev->timestamp_ms,
      .dead_letter = dlq,
      .event_bytes = ev->payload,
      .event_len = ev->payload_len,
  };
  struct audit_head_cache *cache = &app->heads[chain_index];
  uint8_t prev[CHAIN_HASH_LEN], hash[CHAIN_HASH_LEN];
  bool appended = false;
  int rc = QM_OK;
  if (cache->known) {
    r.seq = cache->seq + 1;
    memcpy(prev, cache->hash, CHAIN_HASH_LEN);
    chain_hash(prev, &r, hash);
    rc = append(tx, &r, prev, hash, true, &appended, errstr, errstr_size);
  }
  if (rc == QM_OK && !appended) {
    /* Not known, or another instance moved the head: lock it and read it. */
    int64_t prev_seq = 0;
    unsigned char *head = NULL;
    size_t head_len = 0;
    rc = lock_head(tx, chain_id, &prev_seq, &head, &head_len, errstr, errstr_size);
    if (rc == QM_OK && head_len != CHAIN_HASH_LEN)
      rc = qm_err(errstr, errstr_size, QM_EIO, "chain head of %s is corrupt", chain_id);
    if (rc == QM_OK) {
      r.seq = prev_seq + 1;
      memcpy(prev, head, CHAIN_HASH_LEN);
      chain_hash(prev, &r, hash);
      rc = append(tx, &r, prev, hash, false, &appended, errstr, errstr_size);
      if (rc == QM_OK && !appended)
        rc = qm_err(errstr, errstr_size, QM_EIO, "chain head of %s did not advance", chain_id);
    }
    free(head);
  }
  if (rc == QM_OK)
    rc = audit_facts_insert(tx, r.chain_id, r.seq, &payload, r.request_id, r.event_time_ms, errstr,
                            errstr_size);
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
    rc = qm_service_emit(svc, tx, QM_TOPIC_AUDIT, chain_id, AUDIT_TYPE_RECORD,
                         r.request_id[0] ? r.request_id : r.subject,
                         ev->meta_valid ? ev->meta.traceparent : NULL, &ae.base, NULL, errstr,
                         errstr_size);
  }
  audit_payload_clear(&payload);
  /* Remember the new head only once the whole append worked; a batch that
   * rolls back later leaves a stale entry, which the next append's check
   * of the head finds out. */
  cache->known = rc == QM_OK;
  if (rc == QM_OK) {
    cache->seq = r.seq;
    memcpy(cache->hash, hash, CHAIN_HASH_LEN);
  }
  return rc;
}

/* Splits a page cursor "<chain_id>:<sequence>" (the `next` of a previous
 * page). False when it is not one. */
static bool parse_cursor(const char *s, char *chain, size_t chain_size, long long *seq) {
  const char *colon = strrchr(s, ':');
  if (!colon || colon == s || (size_t)(colon - s) >= chain_size || !colon[1]) return false;
  char *end = NULL;
  long long v = strtoll(colon + 1, &end, 10);
  if (*end || v < 0) return false;
  memcpy(chain, s, (size_t)(colon - s));
  chain[colon - s] = '\0';
  *seq = v;
  return true;
}

/* GET /v1/ledger?chain_id=&request_id=&type=&limit=&after= — records in
 * (chain, sequence) order; `next` is a "<chain_id>:<sequence>" cursor (a bare
 * sequence is accepted with chain_id). */
static void list_ledger(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  audit_app_t *app = ctx;
  const char *chain_id = qm_http_req_query(req, "chain_id");
  const char *request_id = qm_http_req_query(req, "request_id");
  const char *type = qm_http_req_query(req, "type");
  const char *limit_s = qm_http_req_query(req, "limit");
  const char *after_s = qm_http_req_query(req, "after");
  long limit = 100;
  long long after = 0;
  char after_chain[CHAIN_ID_MAX * 2] = "";
  qm_problem_t *pb = NULL;
  char *end = NULL;
  if (limit_s && ((limit = strtol(limit_s, &end, 10)) < 1 || limit > 1000 || *end || !*limit_s)) {
    pb = qm_problem_new(400, "validation", "Invalid query");
    qm_problem_field(pb, "limit", "must be an integer from 1 to 1000");
  }
  if (after_s && !parse_cursor(after_s, after_chain, sizeof(after_chain), &after)) {
    bool bare = *after_s && (after = strtoll(after_s, &end, 10)) >= 0 && !*end;
    if (bare && chain_id) {
      qm_strlcpy(after_chain, chain_id, sizeof(after_chain));
    } else {
      if (!pb) pb = qm_problem_new(400, "validation", "Invalid query");
      qm_problem_field(pb, "after",
                       "must be the 'next' of a previous page (<chain_id>:<sequence>), or a "
                       "sequence together with chain_id");
    }
  }
  if (pb) {
    qm_http_resp_problem(resp, pb);
    return;
  }
  qm_pg_param_t p[] = {chain_id ? QM_PG_TEXT(chain_id) : QM_PG_NULL,
                       request_id ? QM_PG_TEXT(request_id) : QM_PG_NULL,
                       type ? QM_PG_TEXT(type) : QM_PG_NULL, QM_PG_TEXT(after_chain),
                       QM_PG_INT64(after), QM_PG_INT64(limit + 1)};
  qm_pg_result_t *res = NULL;
  if (!qm_api_query(req, resp, qm_service_pool(app->svc), "ledger query",
                    "SELECT seq, recorded_at_ms, topic, event_id, event_type, event_source,"
                    " subject, person_id, request_id, event_time_ms, dead_letter,"
                    " encode(hash, 'hex'), encode(prev_hash, 'hex'), chain_id FROM ledger"
                    " WHERE ($1::text IS NULL OR chain_id = $1)"
                    " AND ($2::text IS NULL OR request_id = $2)"
                    " AND ($3::text IS NULL OR event_type = $3)"
                    " AND (chain_id, seq) > ($4::text, $5::bigint)"
                    " ORDER BY chain_id, seq LIMIT $6::int",
                    p, QM_ARRAY_LEN(p), &res))
    return;
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
                         "chain_id", qm_pg_get(res, i, 13), "sequence", (json_int_t)seq,
                         "recorded_at_ms", (json_int_t)rec, "topic", qm_pg_get(res, i, 2),
                         "event_id", qm_pg_get(res, i, 3), "event_type", qm_pg_get(res, i, 4),
                         "event_source", qm_pg_get(res, i, 5), "subject", qm_pg_get(res, i, 6),
                         "person_id", qm_pg_get(res, i, 7), "request_id", qm_pg_get(res, i, 8),
                         "event_time_ms", (json_int_t)evt, "dead_letter",
                         strcmp(qm_pg_get(res, i, 10), "t") == 0, "hash", qm_pg_get(res, i, 11),
                         "prev_hash", qm_pg_get(res, i, 12)));
  }
  json_t *body = json_pack("{s:o}", "items", items);
  if (n > limit) {
    char *next = qm_asprintf("%s:%s", qm_pg_get(res, shown - 1, 13), qm_pg_get(res, shown - 1, 0));
    json_object_set_new(body, "next", json_string(next));
    free(next);
  }
  qm_pg_result_destroy(res);
  qm_http_resp_json(resp, 200, body);
}

/* GET /v1/audit/key — the public key that signs checkpoints. */
static void get_key(qm_http_req_t *req, qm_http_resp_t *resp, void *ctx) {
  QM_UNUSED(req);
  audit_app_t *app = ctx;
  qm_http_resp_json(resp, 200,
                    json_pack("{s:s, s:s, s:s, s:s, s:b}", "algorithm", CHAIN_SIG_ALGORITHM,
                              "key_id", app->key_id, "public_key", app->pub_b64,
                              "public_key_pem", app->pub_pem, "ephemeral", app->ephemeral));
}

/* The signing key: QM_AUDIT_SIGNING_KEY_FILE, or a new one for this run. */
static int load_key(audit_app_t *app, char *errstr, size_t errstr_size) {
  const char *path = qm_config_str(qm_service_config(app->svc), "QM_AUDIT_SIGNING_KEY_FILE");
  int rc;
  if (*path) {
    rc = chain_key_load_pem(path, &app->key, errstr, errstr_size);
    if (rc == QM_OK && !chain_key_is_private(app->key))
      rc = qm_err(errstr, errstr_size, QM_EINVAL,
                  "QM_AUDIT_SIGNING_KEY_FILE %s holds a public key: the service needs the "
                  "private key (make one with `qm-audit keygen FILE`)", path);
    if (rc != QM_OK) return rc;
  } else {
    rc = chain_key_generate(&app->key, errstr, errstr_size);
    if (rc != QM_OK) return rc;
    app->ephemeral = true;
  }
  chain_key_id(app->key, app->key_id);
  app->pub_pem = chain_key_public_pem(app->key);
  uint8_t raw[CHAIN_KEY_RAW_LEN];
  chain_key_public_raw(app->key, raw);
  app->pub_b64 = audit_b64_encode(raw, sizeof(raw));
  if (app->ephemeral)
    qm_log_warn("QM_AUDIT_SIGNING_KEY_FILE is not set: checkpoints are signed with key %s, made "
                "for this run only, so they prove nothing across restarts. Make a key with "
                "`qm-audit keygen FILE`, keep it in a secret, and set QM_AUDIT_SIGNING_KEY_FILE",
                app->key_id);
  else
    qm_log_info("checkpoints are signed with key %s from %s", app->key_id, path);
  return QM_OK;
}

/* Creates the head rows of chain-0..chain-<N-1> that do not exist yet. */
static int ensure_heads(audit_app_t *app, char *errstr, size_t errstr_size) {
  qm_pg_t *pg = NULL;
  if (qm_pg_pool_acquire(qm_service_pool(app->svc), 10000, &pg) != QM_OK)
    return qm_err(errstr, errstr_size, QM_ETRANSIENT, "no database connection for the chain heads");
  qm_pg_param_t p[] = {QM_PG_INT64(app->n_chains)};
  qm_pg_result_t *res = NULL;
  int rc = qm_pg_exec(pg,
                      "INSERT INTO chain_heads (chain_id, seq, hash) SELECT 'chain-' || g, 0,"
                      " decode(repeat('00', 32), 'hex') FROM generate_series(0, $1::int - 1) g"
                      " ON CONFLICT DO NOTHING",
                      p, 1, NULL, errstr, errstr_size);
  if (rc == QM_OK)
    rc = qm_pg_exec(pg, "SELECT count(*) FROM chain_heads", NULL, 0, &res, errstr, errstr_size);
  int64_t total = 0;
  if (rc == QM_OK) qm_pg_get_int64(res, 0, 0, &total);
  qm_pg_result_destroy(res);
  qm_pg_pool_release(qm_service_pool(app->svc), pg);
  if (rc == QM_OK && total > app->n_chains)
    qm_log_warn("the ledger has %lld chains but QM_AUDIT_CHAINS is %d: the chains beyond it "
                "receive nothing now (they stay valid); keep QM_AUDIT_CHAINS stable",
                (long long)total, app->n_chains);
  return rc;
}

static int init(qm_service_t *svc, void **app_out, char *errstr, size_t errstr_size) {
  static const char *const auditors[] = {"auditor", "security", "it_admin", NULL};
  audit_app_t *app = qm_calloc(1, sizeof(*app));
  *app_out = app; /* from here on stop() and fini() clean up */
  app->svc = svc;
  app->n_chains = (int)qm_config_int(qm_service_config(svc), "QM_AUDIT_CHAINS");
  app->heads = qm_calloc((size_t)app->n_chains, sizeof(*app->heads));
  int rc = load_key(app, errstr, errstr_size);
  if (rc == QM_OK) rc = ensure_heads(app, errstr, errstr_size);
  if (rc == QM_OK &&
      (qm_http_route(qm_service_http(svc), "GET", "/v1/ledger", list_ledger, app, 0, auditors) != QM_OK ||
       qm_http_route(qm_service_http(svc), "GET", "/v1/audit/key", get_key, app, 0, auditors) != QM_OK))
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot register audit routes");
  if (rc == QM_OK) {
    app->api.max_exports = (int)qm_config_int(qm_service_config(svc), "QM_AUDIT_MAX_EXPORTS");
    rc = audit_api_register(svc, &app->api, auditors, errstr, errstr_size);
  }
  if (rc == QM_OK)
    rc = audit_ckpt_start(svc, app->key,
                          qm_config_ms(qm_service_config(svc), "QM_AUDIT_CHECKPOINT_INTERVAL"),
                          &app->ckpt, errstr, errstr_size);
  if (rc == QM_OK)
    audit_ckpt_set_retention(app->ckpt,
                             qm_config_ms(qm_service_config(svc), "QM_AUDIT_RETENTION"),
                             qm_config_ms(qm_service_config(svc), "QM_AUDIT_PRUNE_INTERVAL"),
                             qm_config_int(qm_service_config(svc), "QM_AUDIT_PRUNE_BATCH"));
  if (rc == QM_OK)
    qm_log_info("ledger: %d chains, checkpoints every %lld ms", app->n_chains,
                (long long)qm_config_ms(qm_service_config(svc), "QM_AUDIT_CHECKPOINT_INTERVAL"));
  return rc;
}

/* After the consumer stopped: the signer signs the final heads and ends. */
static void stop(qm_service_t *svc, void *app_) {
  QM_UNUSED(svc);
  audit_app_t *app = app_;
  audit_ckpt_stop(app->ckpt);
  app->ckpt = NULL;
}

static void fini(qm_service_t *svc, void *app_) {
  QM_UNUSED(svc);
  audit_app_t *app = app_;
  audit_ckpt_stop(app->ckpt);
  chain_key_destroy(app->key);
  free(app->pub_pem);
  free(app->pub_b64);
  free(app->heads);
  free(app);
}

/* `qm-audit migrate`: applies the schema and exits (init containers, bench). */
static int migrate_main(void) {
  qm_log_init("audit", QM_LOG_INFO, NULL);
  char errstr[512];
  qm_pg_t *pg = audit_tool_connect("migrate");
  if (!pg) return 2;
  qm_migration_t migs[1 + QM_ARRAY_LEN(audit_migrations)];
  migs[0] = qm_outbox_migration;
  for (size_t i = 0; i < audit_n_migrations; i++) migs[i + 1] = audit_migrations[i];
  int rc = qm_pg_migrate(pg, "audit", migs, QM_ARRAY_LEN(migs), errstr, sizeof(errstr));
  qm_pg_destroy(pg);
  if (rc != QM_OK) {
    fprintf(stderr, "qm-audit migrate: %s\n", errstr);
    return 1;
  }
  printf("schema audit is up to date\n");
  return 0;
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: qm-audit [--help | --config-doc]   run the service (configured by environment)\n"
          "       qm-audit verify [--chain ID | --all] [--db | --export FILE | --topic] [--pubkey FILE]\n"
          "       qm-audit export [--chain ID | --all] > FILE\n"
          "       qm-audit keygen FILE\n"
          "       qm-audit pubkey [FILE]\n"
          "       qm-audit migrate\n"
          "       qm-audit reindex      rebuild the report facts from the ledger\n"
          "       qm-audit prune --older-than DURATION   retention by hand (the service does it too)\n"
          "  See docs/audit.md. The tools read QM_PG_DSN, QM_KAFKA_BROKERS, QM_TOPIC_PREFIX and\n"
          "  QM_AUDIT_SIGNING_KEY_FILE from the environment.\n");
}

static const char *const consumes[] = {
    QM_TOPIC_HR,         QM_TOPIC_REQUESTS,         QM_TOPIC_DECISIONS,         QM_TOPIC_ACCESS,
    QM_TOPIC_FULFILLMENT, QM_TOPIC_HR ".dlq",       QM_TOPIC_REQUESTS ".dlq",   QM_TOPIC_DECISIONS ".dlq",
    QM_TOPIC_ACCESS ".dlq", QM_TOPIC_FULFILLMENT ".dlq"};

int main(int argc, char **argv) {
  if (argc > 1) {
    const char *cmd = argv[1];
    if (!strcmp(cmd, "verify")) return audit_verify_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "export")) return audit_export_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "keygen")) return audit_keygen_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "pubkey")) return audit_pubkey_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "migrate")) return migrate_main();
    if (!strcmp(cmd, "reindex")) return audit_reindex_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "prune")) return audit_prune_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "help")) {
      usage(stdout);
      return 0;
    }
    if (cmd[0] != '-') {
      fprintf(stderr, "qm-audit: unknown command '%s'\n", cmd);
      usage(stderr);
      return 2;
    }
  }
  static const qm_service_def_t def = {
      .name = "audit",
      .default_port = 8085,
      .migrations = audit_migrations,
      .n_migrations = QM_ARRAY_LEN(audit_migrations),
      .consumes = consumes,
      .n_consumes = QM_ARRAY_LEN(consumes),
      .handle = handle,
      .config = audit_config,
      .n_config = QM_ARRAY_LEN(audit_config),
      .init = init,
      .stop = stop,
      .fini = fini,
  };
  return qm_service_main(argc, argv, &def);
}
