/*
 * test_audit_integrity: the audit ledger's integrity on the real stack.
 *
 * A few requests run end to end; every event of each request's life must be
 * in the ledger exactly once (by event id), in its person's chain, in the
 * order of its source topic; an event produced again with the same ce_id is dropped; signed
 * checkpoints cover every head; a second audit instance shares the work on
 * chains both write to and the chains stay gapless; and `qm-audit verify`
 * agrees from the database, an export file and the qm.audit.v1 topic.
 *
 * Then, with audit stopped and the ledger copied aside, the ledger is
 * tampered with as a database superuser would (triggers disabled) — a record
 * changed, removed, swapped, forged and inserted, the end cut off (with and
 * without rewinding the head), the chain rewritten from some record on, a
 * checkpoint forged, the head altered — each on a fresh copy restored from
 * the saved one, and verify must exit 1 naming the right sequence and kind.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_event.h"
#include "qm_kafka.h"
#include "qm_topics.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define AUDIT_BIN QM_BINARY_DIR "/services/qm-audit"
#define N_CHAINS 3

/* One person per chain (CRC-32 of the id mod 3: p-0101 → 0, p-0104 → 1,
 * p-0102 → 2), each asking for two roles the local catalog auto-approves. */
static const char *const people[N_CHAINS] = {"p-0101", "p-0104", "p-0102"};
static const char *const roles[2][2] = {{"slack", "user"}, {"zoom", "user"}};

typedef struct audit_ctx {
  char dir[64];           /* temporary directory: keys, export files */
  char key_path[128];     /* the signing key (private) */
  char pub_path[128];     /* its public key, what an auditor gets */
  char key_id[32];
  char *request_ids[N_CHAINS * 2];
  char *env_dsn, *env_prefix;
  char chain[16];         /* the chain tampered with */
  long long len;          /* its length */
} audit_ctx_t;

/* CRC-32 (zlib's), written out again here so the test checks the service's
 * chain assignment independently of services/audit/chain.c. */
static unsigned crc32_of(const char *s) {
  unsigned crc = 0xFFFFFFFFu;
  for (; *s; s++) {
    crc ^= (unsigned char)*s;
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return crc ^ 0xFFFFFFFFu;
}

/* Runs qm-audit with args (NULL-terminated) against the run's database and
 * topics. Returns the exit status; *out gets stdout (caller frees). */
static int audit_run(audit_ctx_t *ctx, const char *const *args, char **out) {
  const char *argv[16] = {AUDIT_BIN};
  size_t n = 1;
  for (size_t i = 0; args[i] && n < 15; i++) argv[n++] = args[i];
  argv[n] = NULL;
  const char *env[] = {ctx->env_dsn, ctx->env_prefix, "QM_KAFKA_BROKERS=" IT_BROKERS, NULL};
  char *err = NULL;
  int rc = it_run(argv, env, 120000, out, &err);
  if (err && *err) fprintf(stderr, "[it audit] qm-audit %s stderr: %s", args[0], err);
  free(err);
  return rc;
}

/* The verify line of chain in out, copied into line ("" when absent). */
static void chain_line(const char *out, const char *chain, char *line, size_t cap) {
  char needle[64];
  snprintf(needle, sizeof(needle), "chain %s ", chain);
  line[0] = '\0';
  const char *p = out ? strstr(out, needle) : NULL;
  if (!p) return;
  while (p > out && p[-1] != '\n') p--;
  const char *e = strchr(p, '\n');
  size_t n = e ? (size_t)(e - p) : strlen(p);
  if (n >= cap) n = cap - 1;
  memcpy(line, p, n);
  line[n] = '\0';
}

/* "R records verified, head S HEX" of an OK line, for comparing sources. */
static void ok_summary(const char *line, char *out, size_t cap) {
  const char *p = strstr(line, "intact, ");
  const char *e = p ? strchr(p, ';') : NULL;
  out[0] = '\0';
  if (!p || !e) return;
  size_t n = (size_t)(e - p);
  if (n >= cap) n = cap - 1;
  memcpy(out, p, n);
  out[n] = '\0';
}

/* Runs a statement expecting PostgreSQL to refuse it; returns the error text
 * (caller frees) or NULL when it was accepted. */
static char *pg_refused(it_stack_t *st, const char *sql) {
  PGconn *c = PQconnectdb(it_stack_dsn(st));
  cr_assert(PQstatus(c) == CONNECTION_OK, "connect: %s", PQerrorMessage(c));
  PGresult *res = PQexec(c, sql);
  ExecStatusType es = PQresultStatus(res);
  char *e = (es == PGRES_COMMAND_OK || es == PGRES_TUPLES_OK) ? NULL
                                                              : qm_strdup(PQresultErrorMessage(res));
  PQclear(res);
  PQfinish(c);
  return e;
}

/* ---- the life of the requests -------------------------------------------- */

/* Every event of every request lands once, in its person's chain, in each
 * source topic's order. */
static void case_every_event_once(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  static const char *const topics[] = {QM_TOPIC_REQUESTS, QM_TOPIC_DECISIONS, QM_TOPIC_ACCESS};
  json_t *ids = json_object(); /* ce_id -> request id */
  for (size_t t = 0; t < QM_ARRAY_LEN(topics); t++) {
    it_reader_t *rd = it_reader_open(st, topics[t]);
    for (size_t r = 0; r < N_CHAINS * 2; r++) {
      json_t *pat = json_pack("{s:s}", "ce_subject", ctx->request_ids[r]);
      int got = it_reader_wait(rd, pat, 1, 30000);
      IT_CHECK(cs, got >= 1, "no event of request %s on %s", ctx->request_ids[r], topics[t]);
      json_decref(pat);
    }
    it_reader_poll(rd, 500);
    size_t i;
    json_t *e;
    json_array_foreach(it_reader_events(rd), i, e) {
      const char *subject = json_string_value(json_object_get(e, "ce_subject"));
      for (size_t r = 0; subject && r < N_CHAINS * 2; r++)
        if (!strcmp(subject, ctx->request_ids[r]))
          json_object_set_new(ids, json_string_value(json_object_get(e, "ce_id")),
                              json_string(subject));
    }
    it_reader_close(rd);
  }
  IT_CHECK(cs, json_object_size(ids) >= N_CHAINS * 2 * 3,
           "expected at least submitted, approved and granted per request, saw %zu events",
           json_object_size(ids));
  /* Each of them exactly once in the ledger (audit may lag: wait). */
  const char *id;
  json_t *v;
  int64_t deadline = it_now_ms() + 30000;
  json_object_foreach(ids, id, v) {
    char sql[256];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM audit.ledger WHERE event_id = '%s'", id);
    long long n;
    while ((n = it_pg_int(st, sql)) == 0 && it_now_ms() < deadline) it_sleep_ms(100);
    IT_CHECK(cs, n == 1, "event %s of request %s is in the ledger %lld times", id,
             json_string_value(v), n);
  }
  fprintf(stderr, "[it audit] %zu events of %d requests are each in the ledger once\n",
          json_object_size(ids), N_CHAINS * 2);
  json_decref(ids);
  /* One chain per person, the one CRC-32 names, and causal order in it. */
  for (size_t p = 0; p < N_CHAINS; p++) {
    char sql[512], want[16];
    snprintf(want, sizeof(want), "chain-%u", crc32_of(people[p]) % N_CHAINS);
    snprintf(sql, sizeof(sql),
             "SELECT string_agg(DISTINCT chain_id, ',') FROM audit.ledger WHERE person_id = '%s'",
             people[p]);
    char *chains = it_pg_scalar(st, sql);
    IT_CHECK(cs, chains && !strcmp(chains, want), "%s's events are in %s, expected only %s",
             people[p], chains ? chains : "(none)", want);
    free(chains);
    /* Kafka orders one key's events within a topic, not across topics, so
     * the chain keeps each topic's order: the first request's submitted
     * and approved events come before the second's. */
    static const char *const types[] = {"qm.request.submitted.v1", "qm.request.approved.v1"};
    for (size_t t = 0; t < QM_ARRAY_LEN(types); t++) {
      snprintf(sql, sizeof(sql),
               "SELECT (SELECT seq FROM audit.ledger WHERE request_id = '%s' AND event_type = '%s')"
               " < (SELECT seq FROM audit.ledger WHERE request_id = '%s' AND event_type = '%s')",
               ctx->request_ids[p * 2], types[t], ctx->request_ids[p * 2 + 1], types[t]);
      char *before = it_pg_scalar(st, sql);
      IT_CHECK(cs, before && !strcmp(before, "t"), "%s: %s of request %s is not before %s's",
               people[p], types[t], ctx->request_ids[p * 2], ctx->request_ids[p * 2 + 1]);
      free(before);
    }
  }
  /* Gapless from 1 in every chain, and each record links to the one before. */
  long long bad = it_pg_int(st,
                            "SELECT count(*) FROM (SELECT seq, row_number() OVER w AS rn,"
                            " prev_hash, lag(hash) OVER w AS lh FROM audit.ledger"
                            " WINDOW w AS (PARTITION BY chain_id ORDER BY seq)) x"
                            " WHERE seq <> rn OR (rn > 1 AND prev_hash <> lh)");
  IT_CHECK(cs, bad == 0, "%lld records out of place or unlinked", bad);
}

/* The same event (same ce_id) produced again is dropped by audit. */
static void case_duplicate_dropped(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  char sql[512];
  snprintf(sql, sizeof(sql),
           "SELECT topic, event_id, event_type, event_source, subject, person_id,"
           " encode(event_bytes, 'hex'), event_time_ms FROM audit.ledger"
           " WHERE request_id = '%s' AND event_type = 'qm.request.submitted.v1'",
           ctx->request_ids[0]);
  json_t *rows = it_pg_rows(st, sql);
  IT_CHECK(cs, json_array_size(rows) == 1, "submitted event of %s not found once",
           ctx->request_ids[0]);
  json_t *row = json_array_get(rows, 0);
#define COL(i) json_string_value(json_array_get(row, (i)))
  const char *topic = COL(0), *event_id = COL(1), *hex = COL(6);
  long long before = it_pg_int(st, "SELECT count(*) FROM audit.ledger");

  it_resp_t r;
  it_http(st, "audit", "GET", "/metrics", NULL, NULL, NULL, &r);
  char labels[512];
  snprintf(labels, sizeof(labels), "topic=%s,outcome=duplicate", topic);
  double dup0 = it_metric(r.body, "qm_consumer_events_total", labels, NULL);
  it_resp_clear(&r);

  size_t plen = strlen(hex) / 2;
  uint8_t *payload = qm_malloc(plen + 1);
  for (size_t i = 0; i < plen; i++) {
    unsigned b = 0;
    sscanf(hex + 2 * i, "%2x", &b);
    payload[i] = (uint8_t)b;
  }
  qm_event_out_t ev = {.topic = topic, .key = COL(5), .key_len = strlen(COL(5)),
                       .payload = payload, .payload_len = plen};
  qm_strlcpy(ev.meta.id, event_id, sizeof(ev.meta.id));
  qm_strlcpy(ev.meta.type, COL(2), sizeof(ev.meta.type));
  qm_strlcpy(ev.meta.source, COL(3), sizeof(ev.meta.source));
  qm_strlcpy(ev.meta.subject, COL(4), sizeof(ev.meta.subject));
  qm_strlcpy(ev.meta.content_type, QM_CONTENT_TYPE_PROTOBUF, sizeof(ev.meta.content_type));
  ev.meta.time_ms = strtoll(COL(7), NULL, 10);
  qm_producer_t *p = NULL;
  char errstr[512];
  int rc = qm_producer_new(IT_BROKERS, "it-audit-duplicate", NULL, 0, NULL, NULL, &p, errstr,
                           sizeof(errstr));
  IT_CHECK(cs, rc == QM_OK, "producer: %s", errstr);
  int result = 0;
  rc = qm_producer_send_batch(p, &ev, 1, 15000, &result, errstr, sizeof(errstr));
  qm_producer_destroy(p);
  free(payload);
  IT_CHECK(cs, rc == QM_OK, "re-producing %s: %s", event_id, errstr);

  /* Audit consumed it (its duplicate counter moved) and appended nothing. */
  double dup = dup0;
  int64_t deadline = it_now_ms() + 30000;
  while (dup <= dup0 && it_now_ms() < deadline) {
    it_sleep_ms(200);
    it_http(st, "audit", "GET", "/metrics", NULL, NULL, NULL, &r);
    dup = it_metric(r.body, "qm_consumer_events_total", labels, NULL);
    it_resp_clear(&r);
  }
  IT_CHECK(cs, dup > dup0, "audit never counted the repeated %s as a duplicate", event_id);
  snprintf(sql, sizeof(sql), "SELECT count(*) FROM audit.ledger WHERE event_id = '%s'", event_id);
  IT_CHECK(cs, it_pg_int(st, sql) == 1, "the repeated event %s was appended again", event_id);
  long long after = it_pg_int(st, "SELECT count(*) FROM audit.ledger");
  IT_CHECK(cs, after == before, "ledger grew from %lld to %lld on a duplicate", before, after);
#undef COL
  json_decref(rows);
}

/* GET /v1/audit/key serves the configured key to auditors only. */
static void case_key_endpoint(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  char *auditor = it_token("p-0200", "auditor"), *employee = it_token("p-0101", "employee");
  it_resp_t r;
  it_http(st, "audit", "GET", "/v1/audit/key", auditor, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 200, "GET /v1/audit/key: %ld %s", r.status, r.body);
  const char *kid = json_string_value(json_object_get(r.json, "key_id"));
  const char *pem = json_string_value(json_object_get(r.json, "public_key_pem"));
  IT_CHECK(cs, kid && !strcmp(kid, ctx->key_id), "key_id %s, keygen said %s", kid, ctx->key_id);
  IT_CHECK(cs, pem && strstr(pem, "BEGIN PUBLIC KEY"), "no PEM: %s", r.body);
  IT_CHECK(cs, json_is_false(json_object_get(r.json, "ephemeral")), "key reported ephemeral: %s",
           r.body);
  it_resp_clear(&r);
  it_http(st, "audit", "GET", "/v1/audit/key", employee, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 403, "an employee got %ld from /v1/audit/key", r.status);
  it_resp_clear(&r);
  it_http(st, "audit", "GET", "/v1/audit/key", NULL, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 401, "no token got %ld from /v1/audit/key", r.status);
  it_resp_clear(&r);
  free(auditor);
  free(employee);
}

/* Checkpoints cover every moved head, and audit events are keyed by chain. */
static void case_checkpoints(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  char sql[512];
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM audit.chain_heads h WHERE h.seq > COALESCE((SELECT max(seq)"
           " FROM audit.checkpoints c WHERE c.chain_id = h.chain_id AND c.key_id = '%s'), 0)",
           ctx->key_id);
  int64_t deadline = it_now_ms() + 15000;
  long long behind;
  while ((behind = it_pg_int(st, sql)) > 0 && it_now_ms() < deadline) it_sleep_ms(100);
  IT_CHECK(cs, behind == 0, "%lld chain heads not checkpointed after 15 s", behind);
  long long n_cp = it_pg_int(st, "SELECT count(*) FROM audit.checkpoints");
  long long n_heads = it_pg_int(st, "SELECT count(*) FROM audit.chain_heads");
  IT_CHECK(cs, n_heads == N_CHAINS, "%lld chain heads, expected %d", n_heads, N_CHAINS);
  it_reader_t *rd = it_reader_open(st, QM_TOPIC_AUDIT);
  json_t *pat = json_pack("{s:s}", "ce_type", "qm.audit.checkpoint_signed.v1");
  int got = it_reader_wait(rd, pat, (int)n_cp, 15000);
  IT_CHECK(cs, got >= n_cp, "%d checkpoint events on qm.audit.v1, %lld in the table", got, n_cp);
  json_decref(pat);
  size_t i;
  json_t *e;
  json_array_foreach(it_reader_events(rd), i, e) {
    const char *key = json_string_value(json_object_get(e, "key"));
    IT_CHECK(cs, key && !strncmp(key, "chain-", 6), "audit event keyed %s, not by chain",
             key ? key : "(none)");
  }
  it_reader_close(rd);
  fprintf(stderr, "[it audit] %lld checkpoints signed so far\n", n_cp);
}

/* verify from the database, an export and the topic: all intact, same heads. */
static void case_sources_agree(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  char *db = NULL, *exp = NULL, *topic = NULL, *file = NULL;
  const char *a_db[] = {"verify", "--all", "--db", "--pubkey", ctx->pub_path, NULL};
  int rc = audit_run(ctx, a_db, &db);
  fprintf(stderr, "[it audit] verify --db:\n%s", db);
  IT_CHECK(cs, rc == 0, "verify --db exited %d: %s", rc, db);
  const char *a_export[] = {"export", "--all", NULL};
  rc = audit_run(ctx, a_export, &file);
  IT_CHECK(cs, rc == 0, "export exited %d", rc);
  it_file_write(ctx->dir, "all.jsonl", file);
  char path[192];
  snprintf(path, sizeof(path), "%s/all.jsonl", ctx->dir);
  const char *a_exp[] = {"verify", "--export", path, "--pubkey", ctx->pub_path, NULL};
  rc = audit_run(ctx, a_exp, &exp);
  fprintf(stderr, "[it audit] verify --export:\n%s", exp);
  IT_CHECK(cs, rc == 0, "verify --export exited %d: %s", rc, exp);
  /* The topic may lag the database by the relay: retry until it agrees. */
  const char *a_topic[] = {"verify", "--topic", "--pubkey", ctx->pub_path, NULL};
  bool agree = false;
  int64_t deadline = it_now_ms() + 30000;
  while (!agree) {
    free(topic);
    topic = NULL;
    rc = audit_run(ctx, a_topic, &topic);
    agree = rc == 0;
    for (int c = 0; c < N_CHAINS && agree; c++) {
      char chain[16], l1[1024], l2[1024], l3[1024], s1[256], s2[256], s3[256];
      snprintf(chain, sizeof(chain), "chain-%d", c);
      chain_line(db, chain, l1, sizeof(l1));
      chain_line(exp, chain, l2, sizeof(l2));
      chain_line(topic, chain, l3, sizeof(l3));
      ok_summary(l1, s1, sizeof(s1));
      ok_summary(l2, s2, sizeof(s2));
      ok_summary(l3, s3, sizeof(s3));
      IT_CHECK(cs, s1[0] && !strcmp(s1, s2), "db and export disagree on %s:\n  %s\n  %s", chain,
               l1, l2);
      IT_CHECK(cs, strstr(l1, "checkpoints verified") || strstr(l1, "checkpoint verified"),
               "no checkpoint verified on %s: %s", chain, l1);
      agree = !strcmp(s1, s3);
    }
    if (agree || it_now_ms() > deadline) break;
    it_sleep_ms(500);
  }
  fprintf(stderr, "[it audit] verify --topic:\n%s", topic);
  IT_CHECK(cs, agree, "the topic never agreed with the database:\n%s\nvs\n%s", topic, db);
  free(db);
  free(exp);
  free(topic);
  free(file);
}

/* GET /v1/ledger pages through every chain with a "<chain>:<seq>" cursor. */
static void case_ledger_pages(it_stack_t *st, it_cases_t *cs) {
  char *auditor = it_token("p-0200", "auditor");
  long long total = it_pg_int(st, "SELECT count(*) FROM audit.ledger");
  char path[256] = "/v1/ledger?limit=7";
  long long seen = 0;
  char last_chain[32] = "";
  long long last_seq = 0;
  for (int page = 0; page < 1000; page++) {
    it_resp_t r;
    it_http(st, "audit", "GET", path, auditor, NULL, NULL, &r);
    IT_CHECK(cs, r.status == 200, "GET %s: %ld %s", path, r.status, r.body);
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(r.json, "items"), i, e) {
      const char *c = json_string_value(json_object_get(e, "chain_id"));
      long long q = json_integer_value(json_object_get(e, "sequence"));
      int order = strcmp(c, last_chain);
      IT_CHECK(cs, order > 0 || (order == 0 && q > last_seq), "page order broken at %s:%lld", c, q);
      qm_strlcpy(last_chain, c, sizeof(last_chain));
      last_seq = q;
      seen++;
    }
    const char *next = json_string_value(json_object_get(r.json, "next"));
    if (!next) {
      it_resp_clear(&r);
      break;
    }
    snprintf(path, sizeof(path), "/v1/ledger?limit=7&after=%s", next);
    it_resp_clear(&r);
  }
  IT_CHECK(cs, seen == total, "paged %lld records, the ledger holds %lld", seen, total);
  /* One chain with a bare sequence cursor; a bare sequence alone is refused. */
  it_resp_t r;
  it_http(st, "audit", "GET", "/v1/ledger?chain_id=chain-1&after=2&limit=1", auditor, NULL, NULL,
          &r);
  json_t *first = json_array_get(json_object_get(r.json, "items"), 0);
  IT_CHECK(cs, r.status == 200 && first &&
                   json_integer_value(json_object_get(first, "sequence")) == 3 &&
                   !strcmp(json_string_value(json_object_get(first, "chain_id")), "chain-1"),
           "chain_id=chain-1&after=2: %ld %s", r.status, r.body);
  it_resp_clear(&r);
  it_http(st, "audit", "GET", "/v1/ledger?after=2", auditor, NULL, NULL, &r);
  IT_CHECK(cs, r.status == 400 && strstr(r.body, "after"), "after=2 alone: %ld %s", r.status,
           r.body);
  it_resp_clear(&r);
  free(auditor);
}

/* ---- a second instance ------------------------------------------------------ */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(a);
  cr_assert(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
            getsockname(fd, (struct sockaddr *)&a, &len) == 0, "no free port");
  close(fd);
  return ntohs(a.sin_port);
}

/* Waits up to timeout_ms until the file at path contains needle. */
static bool file_wait(const char *path, const char *needle, int timeout_ms) {
  int64_t deadline = it_now_ms() + timeout_ms;
  do {
    FILE *f = fopen(path, "r");
    if (f) {
      char buf[8192];
      bool found = false;
      while (!found && fgets(buf, sizeof(buf), f)) found = strstr(buf, needle) != NULL;
      fclose(f);
      if (found) return true;
    }
    it_sleep_ms(100);
  } while (it_now_ms() < deadline);
  return false;
}

/* A second qm-audit in the same consumer group, and dead letters spread over
 * partitions at random (not by key), so both instances append to every
 * chain at once: the head's lock keeps each chain gapless. */
static void case_two_instances(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  enum { N_EVENTS = 1500 };
  char log_path[160], port_env[32];
  snprintf(log_path, sizeof(log_path), "%s/audit-2.log", ctx->dir);
  snprintf(port_env, sizeof(port_env), "QM_HTTP_PORT=%d", free_port());
  char *key_env = qm_asprintf("QM_AUDIT_SIGNING_KEY_FILE=%s", ctx->key_path);
  char *const envp[] = {ctx->env_dsn, ctx->env_prefix, "QM_KAFKA_BROKERS=" IT_BROKERS, port_env,
                        key_env, "QM_AUDIT_CHECKPOINT_INTERVAL=300ms", "QM_PG_POOL_SIZE=1",
                        "QM_SHUTDOWN_TIMEOUT=10s", NULL};
  char *const argv[] = {AUDIT_BIN, NULL};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, AUDIT_BIN, &fa, NULL, argv, envp);
  posix_spawn_file_actions_destroy(&fa);
  IT_CHECK(cs, rc == 0, "cannot start a second qm-audit: %s", strerror(rc));
  bool ready = file_wait(log_path, "assigned", 30000);
  if (!ready) kill(pid, SIGKILL);
  IT_CHECK(cs, ready, "the second qm-audit got no partitions within 30 s (log %s)", log_path);
  fprintf(stderr, "[it audit] second qm-audit (pid %d) joined the group\n", (int)pid);

  char *topic = it_topic(st, QM_TOPIC_FULFILLMENT QM_DLQ_SUFFIX);
  static const char *const props[] = {"partitioner=random"};
  qm_producer_t *p = NULL;
  char errstr[512];
  rc = qm_producer_new(IT_BROKERS, "it-audit-two", props, 1, NULL, NULL, &p, errstr,
                       sizeof(errstr));
  IT_CHECK(cs, rc == QM_OK, "producer: %s", errstr);
  for (int wave = 0; wave < 3; wave++) {
    qm_event_out_t evs[N_EVENTS / 3];
    qm_header_t hdrs[N_EVENTS / 3][2];
    char ids[N_EVENTS / 3][QM_UUID_STR_LEN], keys[N_EVENTS / 3][16];
    int results[N_EVENTS / 3];
    for (int i = 0; i < N_EVENTS / 3; i++) {
      qm_uuid_new(ids[i]);
      snprintf(keys[i], sizeof(keys[i]), "p-%04d", (wave * 500 + i) % 300 + 1);
      hdrs[i][0] = (qm_header_t){"qm_dlq_id", ids[i], strlen(ids[i])};
      hdrs[i][1] = (qm_header_t){"ce_type", "qm.test.two_instances.v1", 24};
      evs[i] = (qm_event_out_t){.topic = topic, .key = keys[i], .key_len = strlen(keys[i]),
                                .payload = ids[i], .payload_len = 36, .headers = hdrs[i],
                                .n_headers = 2};
    }
    rc = qm_producer_send_batch(p, evs, N_EVENTS / 3, 15000, results, errstr, sizeof(errstr));
    IT_CHECK(cs, rc == QM_OK, "producing dead letters: %s", errstr);
    it_sleep_ms(300);
  }
  qm_producer_destroy(p);

  char sql[512];
  snprintf(sql, sizeof(sql), "SELECT count(DISTINCT event_id) FROM audit.ledger WHERE topic = '%s'",
           topic);
  long long n = 0;
  int64_t deadline = it_now_ms() + 60000;
  while ((n = it_pg_int(st, sql)) < N_EVENTS && it_now_ms() < deadline) it_sleep_ms(200);
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  IT_CHECK(cs, n == N_EVENTS, "%lld of %d dead letters in the ledger after 60 s", n, N_EVENTS);
  IT_CHECK(cs, WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "the second qm-audit did not stop cleanly (status %d, log %s)", status, log_path);
  snprintf(sql, sizeof(sql), "SELECT count(*) FROM audit.ledger WHERE topic = '%s'", topic);
  IT_CHECK(cs, it_pg_int(st, sql) == N_EVENTS, "dead letters recorded more than once");

  /* Both did some of the work: the harness's instance applied fewer than all. */
  it_resp_t r;
  it_http(st, "audit", "GET", "/metrics", NULL, NULL, NULL, &r);
  char labels[300];
  snprintf(labels, sizeof(labels), "topic=%s,outcome=applied", topic);
  double mine = it_metric(r.body, "qm_consumer_events_total", labels, NULL);
  it_resp_clear(&r);
  fprintf(stderr, "[it audit] first instance applied %.0f of %d, the second the rest\n", mine,
          N_EVENTS);
  IT_CHECK(cs, mine < N_EVENTS, "the second instance applied nothing");
  /* Every chain took some, and every chain is still gapless and linked. */
  snprintf(sql, sizeof(sql), "SELECT count(DISTINCT chain_id) FROM audit.ledger WHERE topic = '%s'",
           topic);
  IT_CHECK(cs, it_pg_int(st, sql) == N_CHAINS, "the dead letters did not reach every chain");
  long long bad = it_pg_int(st,
                            "SELECT count(*) FROM (SELECT seq, row_number() OVER w AS rn,"
                            " prev_hash, lag(hash) OVER w AS lh FROM audit.ledger"
                            " WINDOW w AS (PARTITION BY chain_id ORDER BY seq)) x"
                            " WHERE seq <> rn OR (rn > 1 AND prev_hash <> lh)");
  IT_CHECK(cs, bad == 0, "%lld records out of place or unlinked after two instances", bad);
  char *out = NULL;
  const char *a[] = {"verify", "--pubkey", ctx->pub_path, NULL};
  rc = audit_run(ctx, a, &out);
  IT_CHECK(cs, rc == 0, "verify after two instances: %d %s", rc, out);
  free(out);
  free(topic);
  free(key_env);
}

/* ---- tampering ------------------------------------------------------------- */

/* Puts the saved ledger, heads and checkpoints back, as a superuser. */
static void restore(it_stack_t *st) {
  free(it_pg_scalar(st,
                    "ALTER TABLE audit.ledger DISABLE TRIGGER USER;"
                    "ALTER TABLE audit.checkpoints DISABLE TRIGGER USER;"
                    "DELETE FROM audit.ledger; INSERT INTO audit.ledger SELECT * FROM it_tamper.ledger;"
                    "DELETE FROM audit.checkpoints;"
                    "INSERT INTO audit.checkpoints SELECT * FROM it_tamper.checkpoints;"
                    "DELETE FROM audit.chain_heads;"
                    "INSERT INTO audit.chain_heads SELECT * FROM it_tamper.heads;"
                    "ALTER TABLE audit.ledger_anchors DISABLE TRIGGER USER;"
                    "DELETE FROM audit.ledger_anchors;"
                    "ALTER TABLE audit.ledger_anchors ENABLE TRIGGER USER;"
                    "ALTER TABLE audit.ledger ENABLE TRIGGER USER;"
                    "ALTER TABLE audit.checkpoints ENABLE TRIGGER USER;"));
}

/* Runs SQL (with %C for the chain id, %L for its length) with the ledger's
 * triggers disabled. */
static void tamper(it_stack_t *st, audit_ctx_t *ctx, const char *tmpl) {
  char sql[4096], len[32];
  snprintf(len, sizeof(len), "%lld", ctx->len);
  size_t o = 0;
  o += (size_t)snprintf(sql, sizeof(sql),
                        "ALTER TABLE audit.ledger DISABLE TRIGGER USER;"
                        "ALTER TABLE audit.checkpoints DISABLE TRIGGER USER;");
  for (const char *p = tmpl; *p && o < sizeof(sql) - 64; p++) {
    if (p[0] == '%' && (p[1] == 'C' || p[1] == 'L')) {
      o += (size_t)snprintf(sql + o, sizeof(sql) - o, "%s", p[1] == 'C' ? ctx->chain : len);
      p++;
    } else {
      sql[o++] = *p;
    }
  }
  snprintf(sql + o, sizeof(sql) - o,
           ";ALTER TABLE audit.ledger ENABLE TRIGGER USER;"
           "ALTER TABLE audit.checkpoints ENABLE TRIGGER USER;");
  free(it_pg_scalar(st, sql));
}

/* Restores, checks the chain is intact, applies the tampering. */
static void fresh_then(it_stack_t *st, it_cases_t *cs, const char *tmpl) {
  audit_ctx_t *ctx = cs->ctx;
  restore(st);
  char *out = NULL;
  const char *a[] = {"verify", "--chain", ctx->chain, "--pubkey", ctx->pub_path, NULL};
  int rc = audit_run(ctx, a, &out);
  IT_CHECK(cs, rc == 0, "the restored copy does not verify (%d): %s", rc, out);
  free(out);
  tamper(st, ctx, tmpl);
}

/* verify (db, with or without the key) must exit want_rc and, when broken,
 * name this sequence and kind. */
static void expect_verify(it_cases_t *cs, bool with_key, int want_rc, long long seq,
                          const char *kind) {
  audit_ctx_t *ctx = cs->ctx;
  const char *a_key[] = {"verify", "--chain", ctx->chain, "--pubkey", ctx->pub_path, NULL};
  const char *a_nokey[] = {"verify", "--chain", ctx->chain, NULL};
  char *out = NULL;
  int rc = audit_run(ctx, with_key ? a_key : a_nokey, &out);
  fprintf(stderr, "[it audit]   %s -> %d: %s", with_key ? "verify --pubkey" : "verify", rc, out);
  IT_CHECK(cs, rc == want_rc, "verify%s exited %d, expected %d: %s", with_key ? " --pubkey" : "",
           rc, want_rc, out);
  if (want_rc == 1) {
    char needle[128];
    snprintf(needle, sizeof(needle), "BROKEN: chain %s at sequence %lld (%s)", ctx->chain, seq, kind);
    IT_CHECK(cs, out && strstr(out, needle), "expected \"%s\" in: %s", needle, out);
  }
  free(out);
}

/* The same verdict from an export of the tampered database. */
static void expect_export(it_cases_t *cs, long long seq, const char *kind) {
  audit_ctx_t *ctx = cs->ctx;
  char *file = NULL, *out = NULL;
  const char *a_export[] = {"export", "--chain", ctx->chain, NULL};
  int rc = audit_run(ctx, a_export, &file);
  IT_CHECK(cs, rc == 0, "export exited %d", rc);
  it_file_write(ctx->dir, "tampered.jsonl", file);
  char path[192], needle[128];
  snprintf(path, sizeof(path), "%s/tampered.jsonl", ctx->dir);
  const char *a[] = {"verify", "--export", path, "--pubkey", ctx->pub_path, NULL};
  rc = audit_run(ctx, a, &out);
  snprintf(needle, sizeof(needle), "BROKEN: chain %s at sequence %lld (%s)", ctx->chain, seq, kind);
  IT_CHECK(cs, rc == 1 && out && strstr(out, needle), "verify --export: %d, expected \"%s\" in: %s",
           rc, needle, out);
  free(file);
  free(out);
}

static void case_refused(it_stack_t *st, it_cases_t *cs) {
  static const char *const sqls[] = {
      "UPDATE audit.ledger SET topic = 'x' WHERE seq = 1",
      "DELETE FROM audit.ledger WHERE seq = 1",
      "TRUNCATE audit.ledger",
      "UPDATE audit.checkpoints SET seq = seq + 1",
      "DELETE FROM audit.checkpoints",
      "TRUNCATE audit.checkpoints",
  };
  for (size_t i = 0; i < QM_ARRAY_LEN(sqls); i++) {
    char *e = pg_refused(st, sqls[i]);
    IT_CHECK(cs, e && strstr(e, "append-only"), "%s was not refused by the trigger: %s", sqls[i],
             e ? e : "(accepted)");
    free(e);
  }
}

static void case_changed(it_stack_t *st, it_cases_t *cs) {
  fresh_then(st, cs,
             "UPDATE audit.ledger SET event_bytes = event_bytes || '\\x01'::bytea"
             " WHERE chain_id = '%C' AND seq = 3");
  expect_verify(cs, false, 1, 3, "changed");
  expect_verify(cs, true, 1, 3, "changed");
  expect_export(cs, 3, "changed");
}

static void case_removed(it_stack_t *st, it_cases_t *cs) {
  fresh_then(st, cs, "DELETE FROM audit.ledger WHERE chain_id = '%C' AND seq = 3");
  expect_verify(cs, false, 1, 3, "removed");
  expect_export(cs, 3, "removed");
}

static void case_reordered(it_stack_t *st, it_cases_t *cs) {
  fresh_then(st, cs,
             "UPDATE audit.ledger SET seq = -3 WHERE chain_id = '%C' AND seq = 3;"
             "UPDATE audit.ledger SET seq = 3 WHERE chain_id = '%C' AND seq = 4;"
             "UPDATE audit.ledger SET seq = 4 WHERE chain_id = '%C' AND seq = -3");
  expect_verify(cs, false, 1, 3, "reordered");
  expect_export(cs, 3, "reordered");
}

/* A competent forgery: a record with a correct hash linked to record 2,
 * slid in at 3 with the rest renumbered. */
static void case_inserted(it_stack_t *st, it_cases_t *cs) {
  fresh_then(st, cs,
             "UPDATE audit.ledger SET seq = -(seq + 1) WHERE chain_id = '%C' AND seq >= 3;"
             "UPDATE audit.ledger SET seq = -seq WHERE chain_id = '%C' AND seq < 0;"
             "INSERT INTO audit.ledger SELECT chain_id, 3, recorded_at_ms, topic,"
             " 'forged-' || event_id, event_type, event_source, subject, person_id, actor_id,"
             " request_id, event_time_ms, dead_letter, event_bytes, hash, hash"
             " FROM audit.ledger WHERE chain_id = '%C' AND seq = 2;"
             "UPDATE audit.ledger l SET hash = it_tamper.rec_hash(l.prev_hash, l)"
             " WHERE chain_id = '%C' AND seq = 3;"
             "UPDATE audit.chain_heads SET seq = seq + 1 WHERE chain_id = '%C'");
  long long ok = it_pg_int(st, "SELECT count(*) FROM audit.ledger l WHERE event_id LIKE 'forged-%'"
                               " AND hash = it_tamper.rec_hash(prev_hash, l)");
  IT_CHECK(cs, ok == 1, "the forged record's hash is not valid (%lld)", ok);
  expect_verify(cs, false, 1, 3, "inserted");
  expect_export(cs, 3, "inserted");
}

static void case_truncated(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  fresh_then(st, cs, "DELETE FROM audit.ledger WHERE chain_id = '%C' AND seq >= %L - 1");
  expect_verify(cs, false, 1, ctx->len - 1, "truncated");
}

/* Cut the end and rewind the head too: only a signed checkpoint shows it. */
static void case_truncated_head_rewound(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  fresh_then(st, cs,
             "DELETE FROM audit.ledger WHERE chain_id = '%C' AND seq >= %L - 1;"
             "UPDATE audit.chain_heads h SET seq = l.seq, hash = l.hash FROM audit.ledger l"
             " WHERE h.chain_id = '%C' AND l.chain_id = '%C' AND l.seq = %L - 2");
  expect_verify(cs, false, 0, 0, NULL); /* the database alone cannot tell */
  expect_verify(cs, true, 1, ctx->len - 1, "truncated");
}

/* Change record 3 and recompute every later hash and the head: the chain is
 * self-consistent again; only a signed checkpoint shows it. */
static void case_rewritten(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  fresh_then(st, cs,
             "UPDATE audit.ledger SET event_bytes = event_bytes || '\\x01'::bytea"
             " WHERE chain_id = '%C' AND seq = 3;"
             "DO $$ DECLARE p bytea; BEGIN"
             " SELECT hash INTO p FROM audit.ledger WHERE chain_id = '%C' AND seq = 2;"
             " FOR s IN 3..%L LOOP"
             "  UPDATE audit.ledger SET prev_hash = p WHERE chain_id = '%C' AND seq = s;"
             "  UPDATE audit.ledger l SET hash = it_tamper.rec_hash(l.prev_hash, l)"
             "   WHERE chain_id = '%C' AND seq = s RETURNING hash INTO p;"
             " END LOOP;"
             " UPDATE audit.chain_heads SET hash = p WHERE chain_id = '%C';"
             "END $$");
  char sql[256];
  snprintf(sql, sizeof(sql), "SELECT min(seq) FROM audit.checkpoints WHERE chain_id = '%s' AND seq >= 3",
           ctx->chain);
  long long at = it_pg_int(st, sql);
  expect_verify(cs, false, 0, 0, NULL); /* the database alone cannot tell */
  expect_verify(cs, true, 1, at, "checkpoint");
  expect_export(cs, at, "checkpoint");
}

static void case_forged_checkpoint(it_stack_t *st, it_cases_t *cs) {
  fresh_then(st, cs,
             "INSERT INTO audit.checkpoints (chain_id, seq, head_hash, signed_at_ms, algorithm,"
             " key_id, public_key, signature) SELECT chain_id, 2, head_hash, signed_at_ms,"
             " algorithm, key_id, public_key, signature FROM audit.checkpoints"
             " WHERE chain_id = '%C' ORDER BY seq DESC LIMIT 1");
  expect_verify(cs, false, 0, 0, NULL); /* without the key, checkpoints are not checked */
  expect_verify(cs, true, 1, 2, "signature");
}

static void case_head_changed(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  fresh_then(st, cs, "UPDATE audit.chain_heads SET hash = sha256(hash) WHERE chain_id = '%C'");
  expect_verify(cs, false, 1, ctx->len, "head");
}

/* Retention: `qm-audit prune` with the signing key removes the start of
 * every chain up to a checkpoint signed before the cut-off and leaves an
 * anchor; the pruned chain verifies from the anchor. Returns the tampered
 * chain's anchor sequence. */
static long long prune_all(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  restore(st);
  char key_env[192];
  snprintf(key_env, sizeof(key_env), "QM_AUDIT_SIGNING_KEY_FILE=%s", ctx->key_path);
  const char *env[] = {ctx->env_dsn, key_env, NULL};
  /* Up to a checkpoint in the middle of the tampered chain: --before just
   * after it was signed, so later checkpoints stay (they sign later). */
  char sql0[512], before[32];
  snprintf(sql0, sizeof(sql0),
           "SELECT signed_at_ms + 1 FROM audit.checkpoints WHERE chain_id = '%s' AND seq <= %lld"
           " ORDER BY seq DESC, signed_at_ms DESC LIMIT 1", ctx->chain, ctx->len / 2);
  snprintf(before, sizeof(before), "%lld", it_pg_int(st, sql0));
  const char *argv[] = {AUDIT_BIN, "prune", "--before", before, "--batch", "2", NULL};
  char *out = NULL, *err = NULL;
  int rc = it_run(argv, env, 60000, &out, &err);
  fprintf(stderr, "[it audit]   prune -> %d: %s%s", rc, out, err);
  IT_CHECK(cs, rc == 0 && strstr(out, "pruned "), "qm-audit prune exited %d: %s %s", rc, out, err);
  free(out);
  free(err);
  char sql[256];
  snprintf(sql, sizeof(sql),
           "SELECT coalesce(max(seq), 0) FROM audit.ledger_anchors WHERE chain_id = '%s'", ctx->chain);
  long long anchor = it_pg_int(st, sql);
  snprintf(sql, sizeof(sql), "SELECT count(*) FROM audit.ledger WHERE chain_id = '%s' AND seq <= %lld",
           ctx->chain, anchor);
  IT_CHECK(cs, anchor > 0 && it_pg_int(st, sql) == 0,
           "chain %s: anchor at %lld, records at or below it remain", ctx->chain, anchor);
  return anchor;
}

static void case_pruned(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  prune_all(st, cs);
  /* Batches of 2: several anchors per chain; the latest counts. */
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM audit.ledger_anchors") > N_CHAINS,
           "expected several anchors per chain with --batch 2");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM audit.ledger_facts f WHERE NOT EXISTS (SELECT 1"
                             " FROM audit.ledger l WHERE l.chain_id = f.chain_id AND l.seq = f.seq)") == 0,
           "facts of pruned records remain");
  const char *a[] = {"verify", "--pubkey", ctx->pub_path, NULL};
  char *out = NULL;
  int rc = audit_run(ctx, a, &out);
  fprintf(stderr, "[it audit]   verify --pubkey after prune -> %d: %s", rc, out);
  IT_CHECK(cs, rc == 0 && strstr(out, "pruned by retention"), "a pruned ledger does not verify (%d): %s",
           rc, out);
  free(out);
  /* The service's trigger still refuses a DELETE outside a prune. */
  char *e = pg_refused(st, "DELETE FROM audit.ledger WHERE seq > 0");
  IT_CHECK(cs, e && strstr(e, "append-only"), "DELETE outside a prune accepted: %s", e ? e : "(accepted)");
  free(e);
}

static void case_anchor_removed(it_stack_t *st, it_cases_t *cs) {
  prune_all(st, cs);
  tamper(st, cs->ctx,
         "ALTER TABLE audit.ledger_anchors DISABLE TRIGGER USER;"
         "DELETE FROM audit.ledger_anchors WHERE chain_id = '%C';"
         "ALTER TABLE audit.ledger_anchors ENABLE TRIGGER USER");
  expect_verify(cs, true, 1, 1, "removed");
}

static void case_anchor_forged(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  long long anchor = prune_all(st, cs);
  /* Someone removes one more record and claims it was pruned, without a
   * checkpoint at that sequence to vouch for it. */
  long long s = anchor + 1;
  char tmpl[1024];
  snprintf(tmpl, sizeof(tmpl),
           "ALTER TABLE audit.ledger_anchors DISABLE TRIGGER USER;"
           "INSERT INTO audit.ledger_anchors (chain_id, seq, hash, checkpoint_id, pruned_at_ms, records)"
           " SELECT chain_id, seq, hash, (SELECT min(id) FROM audit.checkpoints), 0, 1"
           " FROM audit.ledger WHERE chain_id = '%%C' AND seq = %lld;"
           "DELETE FROM audit.checkpoints WHERE chain_id = '%%C' AND seq = %lld;"
           "DELETE FROM audit.ledger WHERE chain_id = '%%C' AND seq = %lld;"
           "ALTER TABLE audit.ledger_anchors ENABLE TRIGGER USER",
           s, s, s);
  IT_CHECK(cs, s < ctx->len, "chain %s is too short to forge an anchor past %lld", ctx->chain, anchor);
  tamper(st, ctx, tmpl);
  expect_verify(cs, true, 1, s, "anchor");
}

/* An export carrying a record twice verifies; two different records under
 * one sequence do not (what a topic reader must tell apart). */
static void case_export_repeats(it_stack_t *st, it_cases_t *cs) {
  audit_ctx_t *ctx = cs->ctx;
  restore(st);
  char *file = NULL, *out = NULL;
  const char *a_export[] = {"export", "--chain", ctx->chain, NULL};
  IT_CHECK(cs, audit_run(ctx, a_export, &file) == 0, "export failed");
  const char *l2 = strchr(file, '\n');
  const char *l3 = l2 ? strchr(l2 + 1, '\n') : NULL;
  IT_CHECK(cs, l3 != NULL, "export too short: %s", file);
  char *second = qm_strndup(l2 + 1, (size_t)(l3 - l2)); /* record 2 and its newline */
  char *twice = qm_asprintf("%s%s", file, second);
  it_file_write(ctx->dir, "repeat.jsonl", twice);
  char path[192];
  snprintf(path, sizeof(path), "%s/repeat.jsonl", ctx->dir);
  const char *a[] = {"verify", "--export", path, "--pubkey", ctx->pub_path, NULL};
  int rc = audit_run(ctx, a, &out);
  IT_CHECK(cs, rc == 0 && strstr(out, "1 identical repeats ignored"), "repeat: %d %s", rc, out);
  free(out);
  out = NULL;
  /* The same line with another event id: a conflicting record 2. */
  char *p = strstr(second, "\"event_id\":\"");
  IT_CHECK(cs, p != NULL, "no event_id in %s", second);
  p[12] = p[12] == 'f' ? 'e' : 'f';
  char *conflict = qm_asprintf("%s%s", file, second);
  it_file_write(ctx->dir, "repeat.jsonl", conflict);
  rc = audit_run(ctx, a, &out);
  char needle[128];
  snprintf(needle, sizeof(needle), "BROKEN: chain %s at sequence 2 (inserted)", ctx->chain);
  IT_CHECK(cs, rc == 1 && strstr(out, needle), "conflict: %d %s", rc, out);
  free(out);
  free(conflict);
  free(twice);
  free(second);
  free(file);
}

/* ---- the test ----------------------------------------------------------------- */

Test(audit_integrity, chains_checkpoints_and_tampering, .fini = it_fini) {
  audit_ctx_t ctx = {0};
  snprintf(ctx.dir, sizeof(ctx.dir), "/tmp/qm-it-audit-XXXXXX");
  cr_assert_not_null(mkdtemp(ctx.dir));
  snprintf(ctx.key_path, sizeof(ctx.key_path), "%s/signing.pem", ctx.dir);
  snprintf(ctx.pub_path, sizeof(ctx.pub_path), "%s/public.pem", ctx.dir);
  /* keygen: the private key to a file, the public key on stdout. */
  const char *kg[] = {AUDIT_BIN, "keygen", ctx.key_path, NULL};
  char *pub = NULL, *kg_err = NULL;
  int rc = it_run(kg, NULL, 10000, &pub, &kg_err);
  cr_assert_eq(rc, 0, "qm-audit keygen: %d %s", rc, kg_err);
  it_file_write(ctx.dir, "public.pem", pub);
  const char *kid = strstr(kg_err, "key id ");
  cr_assert(kid, "keygen printed no key id: %s", kg_err);
  sscanf(kid + 7, "%16s", ctx.key_id);
  /* pubkey prints the same public key. */
  const char *pk[] = {AUDIT_BIN, "pubkey", ctx.key_path, NULL};
  char *pub2 = NULL;
  cr_assert_eq(it_run(pk, NULL, 10000, &pub2, NULL), 0);
  cr_assert_str_eq(pub, pub2, "pubkey disagrees with keygen");

  char *key_env = qm_asprintf("QM_AUDIT_SIGNING_KEY_FILE=%s", ctx.key_path);
  const it_svc_env_t env[] = {
      {"audit", key_env},
      {"audit", "QM_AUDIT_CHECKPOINT_INTERVAL=300ms"},
      {"audit", "QM_AUDIT_CHAINS=3"},
      /* Small pools: other stacks share this PostgreSQL. */
      {"intake", "QM_PG_POOL_SIZE=2"}, {"approval", "QM_PG_POOL_SIZE=2"},
      {"provisioning", "QM_PG_POOL_SIZE=2"}, {"fulfillment", "QM_PG_POOL_SIZE=2"},
      {"audit", "QM_PG_POOL_SIZE=2"},
      {NULL, NULL}};
  it_stack_t *st = it_stack_up_env("auditint", NULL, env);
  ctx.env_dsn = qm_asprintf("QM_PG_DSN=%s", it_stack_dsn(st));
  ctx.env_prefix = qm_asprintf("QM_TOPIC_PREFIX=%s", it_stack_prefix(st));

  /* Two requests per person, one person per chain, all granted. */
  for (size_t p = 0; p < N_CHAINS; p++) {
    char *token = it_token(people[p], "employee");
    for (size_t k = 0; k < 2; k++) {
      char body[256];
      snprintf(body, sizeof(body),
               "{\"reason\":\"audit integrity\",\"lines\":[{\"item_id\":\"%s\",\"role_id\":\"%s\"}]}",
               roles[k][0], roles[k][1]);
      ctx.request_ids[p * 2 + k] = it_request_submit(st, token, body);
    }
    free(token);
  }
  for (size_t p = 0; p < N_CHAINS; p++) {
    char *token = it_token(people[p], "employee");
    for (size_t k = 0; k < 2; k++)
      json_decref(it_request_wait(st, ctx.request_ids[p * 2 + k], token, "granted", 60000));
    free(token);
  }

  it_cases_t cs = {0};
  cs.ctx = &ctx;
  it_case_run(&cs, st, "every event once, in its chain, in topic order", case_every_event_once);
  it_case_run(&cs, st, "a repeated event is dropped", case_duplicate_dropped);
  it_case_run(&cs, st, "GET /v1/audit/key", case_key_endpoint);
  it_case_run(&cs, st, "GET /v1/ledger pages across chains", case_ledger_pages);
  it_case_run(&cs, st, "two instances share the chains", case_two_instances);
  it_case_run(&cs, st, "checkpoints cover every head", case_checkpoints);
  it_case_run(&cs, st, "db, export and topic agree", case_sources_agree);

  /* Stop audit (its last checkpoint is signed at shutdown), save the ledger. */
  int term = it_service_term(st, "audit", 15000);
  cr_assert_eq(term, 0, "qm-audit after SIGTERM: %d\n%s", term, it_service_log_tail(st, "audit", 30));
  char *log = it_service_log_tail(st, "audit", 20);
  cr_assert(strstr(log, "checkpoint at shutdown"), "no checkpoint at shutdown:\n%s", log);
  free(log);
  free(it_pg_scalar(st,
                    "CREATE SCHEMA it_tamper;"
                    "CREATE TABLE it_tamper.ledger AS SELECT * FROM audit.ledger;"
                    "CREATE TABLE it_tamper.heads AS SELECT * FROM audit.chain_heads;"
                    "CREATE TABLE it_tamper.checkpoints AS SELECT * FROM audit.checkpoints;"
                    /* The record hash of docs/audit.md, in SQL: an independent check of
                     * the service's hashes, and the forger's tool. */
                    "CREATE FUNCTION it_tamper.f(t text) RETURNS bytea LANGUAGE sql IMMUTABLE AS"
                    " $$ SELECT int4send(octet_length(convert_to(t, 'UTF8'))) || convert_to(t, 'UTF8') $$;"
                    "CREATE FUNCTION it_tamper.fb(b bytea) RETURNS bytea LANGUAGE sql IMMUTABLE AS"
                    " $$ SELECT int4send(length(b)) || b $$;"
                    "CREATE FUNCTION it_tamper.rec_hash(p bytea, l audit.ledger) RETURNS bytea"
                    " LANGUAGE sql AS $$ SELECT sha256(p || it_tamper.f(l.chain_id)"
                    " || it_tamper.f(l.seq::text) || it_tamper.f(l.recorded_at_ms::text)"
                    " || it_tamper.f(l.topic) || it_tamper.f(l.event_id) || it_tamper.f(l.event_type)"
                    " || it_tamper.f(l.event_source) || it_tamper.f(l.subject)"
                    " || it_tamper.f(l.person_id) || it_tamper.f(l.actor_id)"
                    " || it_tamper.f(l.request_id) || it_tamper.f(l.event_time_ms::text)"
                    " || it_tamper.f(CASE WHEN l.dead_letter THEN '1' ELSE '0' END)"
                    " || it_tamper.fb(l.event_bytes)) $$;"));
  long long wrong = it_pg_int(st, "SELECT count(*) FROM audit.ledger l"
                                  " WHERE hash <> it_tamper.rec_hash(prev_hash, l)");
  cr_assert_eq(wrong, 0, "%lld ledger hashes differ from the SQL recomputation", wrong);
  char *chain = it_pg_scalar(st, "SELECT chain_id FROM audit.chain_heads ORDER BY seq DESC LIMIT 1");
  qm_strlcpy(ctx.chain, chain, sizeof(ctx.chain));
  free(chain);
  char sql[128];
  snprintf(sql, sizeof(sql), "SELECT seq FROM audit.chain_heads WHERE chain_id = '%s'", ctx.chain);
  ctx.len = it_pg_int(st, sql);
  cr_assert_geq(ctx.len, 6, "chain %s has only %lld records", ctx.chain, ctx.len);
  fprintf(stderr, "[it audit] tampering with %s (%lld records)\n", ctx.chain, ctx.len);

  it_case_run(&cs, st, "UPDATE/DELETE/TRUNCATE refused", case_refused);
  it_case_run(&cs, st, "changed record", case_changed);
  it_case_run(&cs, st, "removed record", case_removed);
  it_case_run(&cs, st, "reordered records", case_reordered);
  it_case_run(&cs, st, "forged record inserted", case_inserted);
  it_case_run(&cs, st, "last records removed", case_truncated);
  it_case_run(&cs, st, "last records removed, head rewound", case_truncated_head_rewound);
  it_case_run(&cs, st, "chain rewritten after a checkpoint", case_rewritten);
  it_case_run(&cs, st, "forged checkpoint", case_forged_checkpoint);
  it_case_run(&cs, st, "head changed", case_head_changed);
  it_case_run(&cs, st, "export repeats and conflicts", case_export_repeats);
  it_case_run(&cs, st, "retention prunes to a signed checkpoint", case_pruned);
  it_case_run(&cs, st, "a pruned chain's anchor removed", case_anchor_removed);
  it_case_run(&cs, st, "an anchor no checkpoint vouches for", case_anchor_forged);
  cr_assert(it_cases_report(&cs, "audit integrity"), "some cases failed (see above)");

  for (size_t i = 0; i < N_CHAINS * 2; i++) free(ctx.request_ids[i]);
  free(ctx.env_dsn);
  free(ctx.env_prefix);
  free(key_env);
  free(pub);
  free(pub2);
  free(kg_err);
  it_dir_remove(ctx.dir);
  it_stack_down(st);
}
