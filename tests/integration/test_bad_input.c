/*
 * test_bad_input: "bad input gets a clear error and changes nothing"
 * (DESIGN.md, Guarantees), from the three doors bad input comes through:
 *  - the environment: a bad variable stops the service at once with exit
 *    status 2 and a message naming the variable and what is wrong;
 *  - HTTP: malformed JSON, invalid fields and a missing token are answered
 *    with RFC 9457 problems naming what is wrong, and nothing is created;
 *  - Kafka: an undecodable event and one without CloudEvents headers go to
 *    the topic's dead-letter twin with the reason in headers, the ledger
 *    records them, and the consumer moves on to the next, valid, request.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_event.h"
#include "qm_kafka.h"
#include "qm_topics.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs qm-intake with one bad variable and checks it refuses to start. */
static void expect_config_refused(const char *bad_kv, const char *var, const char *const *hints,
                                  size_t n_hints) {
  const char *argv[] = {QM_BINARY_DIR "/services/qm-intake", NULL};
  /* A DSN nobody answers on: if the bad variable were accepted, start-up
   * would fail later with status 1, not 2. */
  const char *env[] = {bad_kv, "QM_PG_DSN=host=127.0.0.1 port=1 user=postgres dbname=none",
                       "QM_KAFKA_BROKERS=127.0.0.1:1", "QM_HTTP_ADDR=127.0.0.1", NULL};
  char *out = NULL, *err = NULL;
  int64_t t0 = it_now_ms();
  int rc = it_run(argv, env, 5000, &out, &err);
  int64_t ms = it_now_ms() - t0;
  fprintf(stderr, "[it bad_env] %s -> status %d in %lld ms; stderr:\n%s", bad_kv, rc,
          (long long)ms, err);
  cr_assert_neq(rc, -1, "qm-intake with %s still ran after 5 s; stderr: %s", bad_kv, err);
  cr_assert_eq(rc, 2, "qm-intake with %s: expected exit status 2, got %d\nstderr: %s\nstdout: %s",
               bad_kv, rc, err, out);
  cr_assert(strstr(err, var) != NULL, "stderr does not name %s: %s", var, err);
  bool hinted = false;
  for (size_t i = 0; i < n_hints; i++) hinted = hinted || strstr(err, hints[i]) != NULL;
  cr_assert(hinted, "stderr names %s but does not say what is wrong with it: %s", var, err);
  free(out);
  free(err);
}

Test(bad_input, bad_environment_exits_2) {
  static const char *const port_hints[] = {"integer", "number", "'abc'", "\"abc\""};
  expect_config_refused("QM_HTTP_PORT=abc", "QM_HTTP_PORT", port_hints,
                        sizeof(port_hints) / sizeof(port_hints[0]));
  static const char *const batch_hints[] = {"10000", "between", "at least", "range", ">= 1",
                                            "minimum"};
  expect_config_refused("QM_CONSUMER_BATCH=0", "QM_CONSUMER_BATCH", batch_hints,
                        sizeof(batch_hints) / sizeof(batch_hints[0]));
}

/* Asserts r is an RFC 9457 problem with this status. */
static void assert_problem(const it_resp_t *r, long status, const char *what) {
  cr_assert_eq(r->status, status, "%s: expected %ld, got %ld %s", what, status, r->status, r->body);
  cr_assert(strncmp(r->content_type, "application/problem+json", 24) == 0,
            "%s: Content-Type is '%s', not application/problem+json", what, r->content_type);
  cr_assert(json_is_object(r->json), "%s: body is not a JSON object: %s", what, r->body);
  cr_assert_eq(json_integer_value(json_object_get(r->json, "status")), status,
               "%s: problem body's status is not %ld: %s", what, status, r->body);
  cr_assert(json_is_string(json_object_get(r->json, "title")), "%s: problem has no title: %s",
            what, r->body);
}

/* True when the problem's errors array names field. */
static bool problem_names_field(const json_t *pb, const char *field) {
  size_t i;
  json_t *e;
  json_array_foreach(json_object_get(pb, "errors"), i, e) {
    const char *f = json_string_value(json_object_get(e, "field"));
    if (f && !strcmp(f, field)) return true;
  }
  return false;
}

Test(bad_input, bad_http_requests_change_nothing, .fini = it_fini) {
  it_stack_t *st = it_stack_up("bad-http");
  char *token = it_token("p-0042", "employee");
  it_resp_t r;

  /* Malformed JSON: 400 naming line and column. */
  it_http(st, "intake", "POST", "/v1/requests", token, "{\"reason\": \"x\", \"lines\": [", NULL, &r);
  assert_problem(&r, 400, "malformed JSON");
  const char *detail = json_string_value(json_object_get(r.json, "detail"));
  cr_assert(detail && strstr(detail, "line") && strstr(detail, "column"),
            "malformed JSON: detail does not say where (line/column): %s", r.body);
  it_resp_clear(&r);

  /* Well-formed JSON, bad fields: 400 naming each field (a reason is needed
   * because the second line is sensitive). */
  it_http(st, "intake", "POST", "/v1/requests", token,
          "{\"reason\":\"\",\"lines\":[{\"item_id\":\"nope\"},"
          "{\"item_id\":\"github\",\"role_id\":\"write\"}]}",
          NULL, &r);
  assert_problem(&r, 400, "invalid fields");
  cr_assert(json_is_array(json_object_get(r.json, "errors")), "no errors array: %s", r.body);
  cr_assert(problem_names_field(r.json, "reason"), "errors do not name 'reason': %s", r.body);
  cr_assert(problem_names_field(r.json, "lines[0].item_id"),
            "errors do not name 'lines[0].item_id': %s", r.body);
  it_resp_clear(&r);

  /* No token, and a token that is not one: 401. */
  it_http(st, "intake", "POST", "/v1/requests", NULL,
          "{\"reason\":\"x\",\"lines\":[{\"item_id\":\"figma\",\"role_id\":\"viewer\"}]}", NULL, &r);
  assert_problem(&r, 401, "no token");
  it_resp_clear(&r);
  it_http(st, "intake", "POST", "/v1/requests", "not.a.token",
          "{\"reason\":\"x\",\"lines\":[{\"item_id\":\"figma\",\"role_id\":\"viewer\"}]}", NULL, &r);
  assert_problem(&r, 401, "garbage token");
  it_resp_clear(&r);

  /* Nothing was created: not on the API, not in the table, not in the outbox. */
  it_http(st, "intake", "GET", "/v1/requests?mine=true", token, NULL, NULL, &r);
  cr_assert_eq(r.status, 200, "GET /v1/requests?mine=true: %ld %s", r.status, r.body);
  json_t *items = json_object_get(r.json, "items");
  cr_assert(json_is_array(items) && json_array_size(items) == 0,
            "the caller's list should be empty after refused requests: %s", r.body);
  it_resp_clear(&r);
  cr_assert_eq(it_pg_int(st, "SELECT count(*) FROM intake.requests"), 0,
               "intake.requests is not empty");
  cr_assert_eq(it_pg_int(st, "SELECT count(*) FROM intake.timeline"), 0,
               "intake.timeline is not empty");

  free(token);
  it_stack_down(st);
}

/* What the DLQ reader found of our two poison messages. */
typedef struct dlq_seen {
  bool garbage, no_headers;
  char report[2048];
} dlq_seen_t;

static bool payload_is(const qm_event_in_t *ev, const void *p, size_t n) {
  return ev->payload_len == n && memcmp(ev->payload, p, n) == 0;
}

Test(bad_input, poison_kafka_messages_dead_lettered, .fini = it_fini) {
  it_stack_t *st = it_stack_up("bad-kafka");
  char *requests_topic = it_topic(st, QM_TOPIC_REQUESTS);
  char *dlq_topic = qm_asprintf("%s%s", requests_topic, QM_DLQ_SUFFIX);
  char errstr[512];

  /* Two poison messages: valid CloudEvents headers with an undecodable
   * payload, and a message without any ce_* header. */
  char marker[QM_UUID_STR_LEN];
  qm_uuid_new(marker);
  unsigned char garbage[64];
  memset(garbage, 0xff, 16); /* an over-long varint: no protobuf parser accepts it */
  size_t garbage_len = 16 + (size_t)snprintf((char *)garbage + 16, sizeof(garbage) - 16,
                                             "garbage-%s", marker);
  char *no_headers_payload = qm_asprintf("no-ce-headers-%s", marker);
  char subject[QM_UUID_STR_LEN];
  qm_uuid_new(subject);

  qm_event_out_t evs[2];
  memset(evs, 0, sizeof(evs));
  evs[0].topic = requests_topic;
  evs[0].key = "p-0007";
  evs[0].key_len = 6;
  qm_event_meta_init(&evs[0].meta, "it", "qm.request.submitted.v1", subject, NULL);
  evs[0].payload = garbage;
  evs[0].payload_len = garbage_len;
  evs[1].topic = requests_topic;
  evs[1].key = "p-0007";
  evs[1].key_len = 6;
  evs[1].payload = no_headers_payload;
  evs[1].payload_len = strlen(no_headers_payload);

  qm_producer_t *prod = NULL;
  int rc = qm_producer_new(IT_BROKERS, "it-poison", NULL, 0, NULL, NULL, &prod, errstr,
                           sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "qm_producer_new: %s", errstr);
  int results[2] = {0, 0};
  rc = qm_producer_send_batch(prod, evs, 2, 15000, results, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "producing the poison messages: %s (%d, %d)", errstr, results[0],
               results[1]);
  qm_producer_destroy(prod);

  /* Then a normal request: the consumers must have moved on. */
  char *token = it_token("p-0007", "employee");
  char *id = it_request_submit(st, token, "{\"reason\":\"after the poison\",\"lines\":"
                                          "[{\"item_id\":\"zoom\",\"role_id\":\"user\"}]}");
  json_t *done = it_request_wait(st, id, token, "granted", 60000);
  json_decref(done);

  /* Both poison messages are on the DLQ, dead-lettered by approval. */
  qm_consumer_t *cons = NULL;
  char *group = qm_asprintf("%sit-dlq-reader", it_stack_prefix(st));
  const char *topics[] = {dlq_topic};
  rc = qm_consumer_new(IT_BROKERS, group, topics, 1, NULL, 0, &cons, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "qm_consumer_new: %s", errstr);
  dlq_seen_t seen = {0};
  size_t report_len = 0;
  int64_t deadline = it_now_ms() + 60000;
  while (!(seen.garbage && seen.no_headers) && it_now_ms() < deadline) {
    qm_kmsg_t *msgs[32];
    size_t n = 0;
    rc = qm_consumer_poll_batch(cons, msgs, 32, 500, &n);
    cr_assert(rc == QM_OK, "polling %s: %s", dlq_topic, qm_strerror(rc));
    for (size_t i = 0; i < n; i++) {
      const qm_event_in_t *ev = qm_kmsg_event(msgs[i]);
      char svc[64] = "", err[512] = "";
      bool has_svc = qm_event_header(ev, "qm_dlq_service", svc, sizeof(svc));
      bool has_err = qm_event_header(ev, "qm_dlq_error", err, sizeof(err));
      bool is_garbage = payload_is(ev, garbage, garbage_len);
      bool is_no_headers = payload_is(ev, no_headers_payload, strlen(no_headers_payload));
      if (report_len < sizeof(seen.report) - 1)
        report_len += (size_t)snprintf(seen.report + report_len, sizeof(seen.report) - report_len,
                                       "  [%s] service=%s error=%s\n",
                                       is_garbage ? "garbage" : is_no_headers ? "no-headers" : "other",
                                       has_svc ? svc : "(none)", has_err ? err : "(none)");
      if (report_len >= sizeof(seen.report)) report_len = sizeof(seen.report) - 1;
      if ((is_garbage || is_no_headers) && has_svc && !strcmp(svc, "approval")) {
        cr_assert(has_err && err[0], "dead letter from approval without qm_dlq_error:\n%s",
                  seen.report);
        if (is_garbage) seen.garbage = true;
        if (is_no_headers) seen.no_headers = true;
      }
      qm_kmsg_destroy(msgs[i]);
    }
  }
  qm_consumer_close(cons);
  qm_consumer_destroy(cons);
  fprintf(stderr, "[it bad_kafka] dead letters seen on %s:\n%s", dlq_topic, seen.report);
  cr_assert(seen.garbage, "the undecodable message was not dead-lettered by approval on %s:\n%s",
            dlq_topic, seen.report);
  cr_assert(seen.no_headers,
            "the message without CloudEvents headers was not dead-lettered by approval on %s:\n%s",
            dlq_topic, seen.report);

  /* Audit's ledger keeps the dead letters: nothing is lost. */
  int64_t audit_deadline = it_now_ms() + 30000;
  long long dead = 0;
  while ((dead = it_pg_int(st, "SELECT count(*) FROM audit.ledger WHERE dead_letter")) < 2 &&
         it_now_ms() < audit_deadline)
    it_sleep_ms(200);
  json_t *rows = it_pg_rows(st, "SELECT topic, event_type, event_id FROM audit.ledger"
                                " WHERE dead_letter ORDER BY seq");
  char *rows_text = it_json_text(rows);
  fprintf(stderr, "[it bad_kafka] dead letters in the ledger: %s\n", rows_text);
  cr_assert_geq(dead, 2, "audit ledger holds %lld dead letters, expected at least 2: %s", dead,
                rows_text);
  free(rows_text);
  json_decref(rows);

  free(group);
  free(id);
  free(token);
  free(no_headers_payload);
  free(dlq_topic);
  free(requests_topic);
  it_stack_down(st);
}
