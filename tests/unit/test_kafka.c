/*
 * Unit tests of qm_kafka on librdkafka's in-process mock cluster
 * (rdkafka_mock.h): CloudEvents headers on the wire and their checks on the
 * way in, per-event batch results, batch polling bounds, at-least-once offset
 * storage across consumers of one group, dead letters, and configuration
 * guards. Each test starts its own mock cluster, so tests share nothing.
 *
 * librdkafka 2.0.2's mock cluster does not implement CreateTopics (the admin
 * request waits for a controller that never comes), so topic creation is
 * checked here only for its argument handling; its idempotence against a
 * real broker belongs to the integration tests.
 */
#include "qm_common.h"
#include "qm_event.h"
#include "qm_kafka.h"
#include "qm_log.h"

#include <criterion/criterion.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- helpers */

typedef struct mock {
  rd_kafka_t *rk;
  rd_kafka_mock_cluster_t *mc;
  const char *bootstraps;
} mock_t;

static void mock_start(mock_t *m, int brokers) {
  char err[256];
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "log_level", "0", err, sizeof(err));
  m->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
  cr_assert_not_null(m->rk, "mock owner: %s", err);
  m->mc = rd_kafka_mock_cluster_new(m->rk, brokers);
  cr_assert_not_null(m->mc);
  m->bootstraps = rd_kafka_mock_cluster_bootstraps(m->mc);
}

static void mock_topic(mock_t *m, const char *topic, int partitions) {
  cr_assert_eq(rd_kafka_mock_topic_create(m->mc, topic, partitions, 1),
               RD_KAFKA_RESP_ERR_NO_ERROR);
}

static void mock_stop(mock_t *m) {
  rd_kafka_mock_cluster_destroy(m->mc);
  rd_kafka_destroy(m->rk);
}

static qm_producer_t *producer(const mock_t *m, const char *const *props, size_t n) {
  qm_producer_t *p = NULL;
  char err[256] = "";
  int rc = qm_producer_new(m->bootstraps, "test", props, n, NULL, NULL, &p, err, sizeof(err));
  cr_assert_eq(rc, QM_OK, "producer: %s", err);
  return p;
}

static qm_consumer_t *consumer(const mock_t *m, const char *group, const char *topic) {
  qm_consumer_t *c = NULL;
  char err[256] = "";
  const char *topics[] = {topic};
  const char *props[] = {"session.timeout.ms=6000", "heartbeat.interval.ms=500"};
  int rc = qm_consumer_new(m->bootstraps, group, topics, 1, props, QM_ARRAY_LEN(props), &c, err,
                           sizeof(err));
  cr_assert_eq(rc, QM_OK, "consumer: %s", err);
  return c;
}

/* Polls until want messages arrived or timeout_ms passed; returns the count. */
static size_t consume(qm_consumer_t *c, qm_kmsg_t **msgs, size_t want, int timeout_ms) {
  size_t got = 0;
  int64_t until = qm_mono_ms() + timeout_ms;
  while (got < want && qm_mono_ms() < until) {
    size_t n = 0;
    cr_assert_eq(qm_consumer_poll_batch(c, msgs + got, want - got, 200, &n), QM_OK);
    got += n;
  }
  return got;
}

/* A raw event: no meta (so no ce_* headers are generated), just these headers. */
static qm_event_out_t raw_event(const char *topic, const qm_header_t *h, size_t n,
                                const char *payload) {
  qm_event_out_t ev;
  memset(&ev, 0, sizeof(ev));
  ev.topic = topic;
  ev.key = "k";
  ev.key_len = 1;
  ev.payload = payload;
  ev.payload_len = strlen(payload);
  ev.headers = h;
  ev.n_headers = n;
  return ev;
}

static qm_event_out_t meta_event(const char *topic, const char *payload) {
  qm_event_out_t ev = raw_event(topic, NULL, 0, payload);
  qm_event_meta_init(&ev.meta, "intake", "qm.request.submitted.v1", "req-1", NULL);
  return ev;
}

static size_t hdr_count(const qm_event_in_t *ev, const char *name) {
  size_t n = 0;
  for (size_t i = 0; i < ev->n_headers; i++)
    if (strcmp(ev->headers[i].name, name) == 0) n++;
  return n;
}

static const qm_header_t *hdr(const qm_event_in_t *ev, const char *name) {
  for (size_t i = 0; i < ev->n_headers; i++)
    if (strcmp(ev->headers[i].name, name) == 0) return &ev->headers[i];
  return NULL;
}

/* Asserts that header name exists with exactly the given bytes. */
static void assert_hdr(const qm_event_in_t *ev, const char *name, const void *value, size_t len) {
  const qm_header_t *h = hdr(ev, name);
  cr_assert_not_null(h, "header %s missing", name);
  cr_assert_eq(h->value_len, len, "header %s: %zu bytes, want %zu", name, h->value_len, len);
  cr_assert(len == 0 || memcmp(h->value, value, len) == 0, "header %s value differs", name);
}

static void assert_hdr_str(const qm_event_in_t *ev, const char *name, const char *value) {
  assert_hdr(ev, name, value, strlen(value));
}

static void quiet(void) {
  const char *lvl = getenv("QM_TEST_LOG");
  qm_log_init("test_kafka", lvl ? QM_LOG_DEBUG : QM_LOG_ERROR, NULL);
}

TestSuite(kafka, .init = quiet, .timeout = 60);

/* ------------------------------------------------------ producer config */

Test(kafka, producer_refuses_overrides_of_guarantees) {
  mock_t m;
  mock_start(&m, 1);
  const char *bad[][1] = {{"enable.idempotence=false"}, {"acks=1"},
                          {"request.required.acks=0"},  {"message.timeout.ms=0"},
                          {"message.timeout.ms=900000"}, {"linger.ms"},
                          {"no.such.property=1"}};
  const char *names[] = {"enable.idempotence", "acks", "request.required.acks",
                         "message.timeout.ms", "message.timeout.ms", "linger.ms",
                         "no.such.property"};
  for (size_t i = 0; i < QM_ARRAY_LEN(bad); i++) {
    qm_producer_t *p = (qm_producer_t *)&m; /* must stay untouched */
    char err[256] = "";
    int rc = qm_producer_new(m.bootstraps, "t", bad[i], 1, NULL, NULL, &p, err, sizeof(err));
    cr_assert_eq(rc, QM_EINVAL, "%s accepted", bad[i][0]);
    cr_assert_eq(p, (qm_producer_t *)&m, "output written on failure");
    cr_assert(strstr(err, names[i]) != NULL, "errstr '%s' does not name %s", err, names[i]);
  }
  const char *ok[] = {"linger.ms=5", "message.timeout.ms=5000"};
  qm_producer_t *p = producer(&m, ok, 2);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, consumer_refuses_overrides_of_guarantees) {
  mock_t m;
  mock_start(&m, 1);
  const char *topics[] = {"t"};
  const char *bad[] = {"enable.auto.commit=false", "enable.auto.offset.store=true",
                       "group.id=other"};
  for (size_t i = 0; i < QM_ARRAY_LEN(bad); i++) {
    qm_consumer_t *c = NULL;
    char err[256] = "";
    int rc = qm_consumer_new(m.bootstraps, "g", topics, 1, &bad[i], 1, &c, err, sizeof(err));
    cr_assert_eq(rc, QM_EINVAL, "%s accepted", bad[i]);
    cr_assert_null(c);
    cr_assert(strstr(err, "cannot be overridden") != NULL, "errstr: %s", err);
  }
  qm_consumer_t *c = NULL;
  char err[256];
  cr_assert_eq(qm_consumer_new(m.bootstraps, "g", topics, 0, NULL, 0, &c, err, sizeof(err)),
               QM_EINVAL, "no topics accepted");
  mock_stop(&m);
}

/* ------------------------------------------------------ headers on the wire */

Test(kafka, cloudevents_headers_round_trip) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "rt", 1);
  qm_producer_t *p = producer(&m, NULL, 0);

  static const unsigned char payload[] = {0x08, 0x00, 0x12, 0x00, 0xff, 'x', 0x00};
  static const char bin[] = {'a', '\0', 'b', '\x01'};
  qm_header_t extra[] = {{"x-tenant", "acme", 4}, {"x-bin", bin, sizeof(bin)}};
  qm_event_out_t evs[2];
  memset(evs, 0, sizeof(evs));
  evs[0].topic = "rt";
  evs[0].key = "person-42";
  evs[0].key_len = 9;
  evs[0].payload = payload;
  evs[0].payload_len = sizeof(payload);
  evs[0].headers = extra;
  evs[0].n_headers = 2;
  qm_event_meta_init(&evs[0].meta, "intake", "qm.request.submitted.v1", "req-123",
                     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
  evs[0].meta.time_ms = 1795000000123; /* milliseconds must survive */
  /* The second has no subject and no traceparent: those headers are omitted. */
  evs[1] = meta_event("rt", "second");
  evs[1].meta.subject[0] = '\0';
  evs[1].meta.traceparent[0] = '\0';

  int results[2] = {99, 99};
  char err[256] = "";
  cr_assert_eq(qm_producer_send_batch(p, evs, 2, 10000, results, err, sizeof(err)), QM_OK,
               "%s", err);
  cr_assert_eq(results[0], QM_OK);
  cr_assert_eq(results[1], QM_OK);

  qm_consumer_t *c = consumer(&m, "g-rt", "rt");
  qm_kmsg_t *msgs[2];
  cr_assert_eq(consume(c, msgs, 2, 20000), 2);
  const qm_event_in_t *in = qm_kmsg_event(msgs[0]);

  cr_assert_str_eq(in->topic, "rt");
  cr_assert_eq(in->partition, 0);
  cr_assert_eq(in->offset, 0);
  cr_assert_gt(in->timestamp_ms, 0);
  cr_assert_eq(in->key_len, 9);
  cr_assert(memcmp(in->key, "person-42", 9) == 0);
  cr_assert_eq(in->payload_len, sizeof(payload));
  cr_assert(memcmp(in->payload, payload, sizeof(payload)) == 0, "payload bytes differ");

  cr_assert(in->meta_valid, "meta invalid: %s", in->meta_error);
  cr_assert_str_eq(in->meta_error, "");
  cr_assert_str_eq(in->meta.id, evs[0].meta.id);
  cr_assert_str_eq(in->meta.source, "/qm/intake");
  cr_assert_str_eq(in->meta.type, "qm.request.submitted.v1");
  cr_assert_str_eq(in->meta.subject, "req-123");
  cr_assert_eq(in->meta.time_ms, 1795000000123);
  cr_assert_str_eq(in->meta.content_type, "application/protobuf");
  cr_assert_str_eq(in->meta.traceparent, evs[0].meta.traceparent);
  cr_assert(strncmp(in->meta.traceparent, "00-0af7651916cd43dd8448eb211c80319c-", 36) == 0);

  assert_hdr_str(in, "ce_specversion", "1.0");
  assert_hdr_str(in, "ce_id", evs[0].meta.id);
  assert_hdr_str(in, "ce_source", "/qm/intake");
  assert_hdr_str(in, "ce_type", "qm.request.submitted.v1");
  assert_hdr_str(in, "ce_time", "2026-11-18T11:06:40.123Z");
  assert_hdr_str(in, "ce_subject", "req-123");
  assert_hdr_str(in, "content-type", "application/protobuf");
  assert_hdr_str(in, "traceparent", evs[0].meta.traceparent);
  assert_hdr(in, "x-tenant", "acme", 4);
  assert_hdr(in, "x-bin", bin, sizeof(bin));
  cr_assert_eq(in->n_headers, 10, "got %zu headers", in->n_headers);

  const qm_event_in_t *in2 = qm_kmsg_event(msgs[1]);
  cr_assert(in2->meta_valid, "%s", in2->meta_error);
  cr_assert_eq(hdr_count(in2, "ce_subject"), 0);
  cr_assert_eq(hdr_count(in2, "traceparent"), 0);
  cr_assert_str_eq(in2->meta.subject, "");
  cr_assert_str_eq(in2->meta.traceparent, "");
  cr_assert_eq(in2->n_headers, 6);

  for (size_t i = 0; i < 2; i++) qm_kmsg_destroy(msgs[i]);
  qm_consumer_destroy(c);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, meta_invalid_names_the_header) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "bad", 1);
  qm_producer_t *p = producer(&m, NULL, 0);

  qm_header_t no_id[] = {{"ce_specversion", "1.0", 3}, {"ce_source", "/x", 2},
                         {"ce_type", "t", 1}};
  qm_header_t bad_time[] = {{"ce_specversion", "1.0", 3}, {"ce_id", "id-1", 4},
                            {"ce_source", "/x", 2},        {"ce_type", "t", 1},
                            {"ce_time", "24/11/2026", 10}};
  qm_header_t old_spec[] = {{"ce_specversion", "0.3", 3}, {"ce_id", "id-2", 4},
                            {"ce_source", "/x", 2},        {"ce_type", "t", 1}};
  qm_header_t offset_time[] = {{"ce_specversion", "1.0", 3}, {"ce_id", "id-3", 4},
                               {"ce_source", "/x", 2},        {"ce_type", "t", 1},
                               {"ce_time", "2026-11-24T04:30:00.5+02:00", 27},
                               {"traceparent", "garbage", 7}};
  qm_header_t empty_source[] = {{"ce_specversion", "1.0", 3}, {"ce_id", "id-4", 4},
                                {"ce_source", "", 0},          {"ce_type", "t", 1}};
  qm_event_out_t evs[] = {raw_event("bad", no_id, QM_ARRAY_LEN(no_id), "a"),
                          raw_event("bad", bad_time, QM_ARRAY_LEN(bad_time), "b"),
                          raw_event("bad", old_spec, QM_ARRAY_LEN(old_spec), "c"),
                          raw_event("bad", NULL, 0, "d"),
                          raw_event("bad", offset_time, QM_ARRAY_LEN(offset_time), "e"),
                          raw_event("bad", empty_source, QM_ARRAY_LEN(empty_source), "f")};
  const size_t n = QM_ARRAY_LEN(evs);
  int results[QM_ARRAY_LEN(evs)];
  char err[256] = "";
  cr_assert_eq(qm_producer_send_batch(p, evs, n, 10000, results, err, sizeof(err)), QM_OK,
               "%s", err);

  qm_consumer_t *c = consumer(&m, "g-bad", "bad");
  qm_kmsg_t *msgs[QM_ARRAY_LEN(evs)];
  cr_assert_eq(consume(c, msgs, n, 20000), n);
  const qm_event_in_t *e0 = qm_kmsg_event(msgs[0]), *e1 = qm_kmsg_event(msgs[1]),
                      *e2 = qm_kmsg_event(msgs[2]), *e3 = qm_kmsg_event(msgs[3]),
                      *e4 = qm_kmsg_event(msgs[4]), *e5 = qm_kmsg_event(msgs[5]);
  cr_assert_not(e0->meta_valid);
  cr_assert_str_eq(e0->meta_error, "missing header ce_id");
  cr_assert_str_eq(e0->meta.source, "/x", "readable fields are still filled");

  cr_assert_not(e1->meta_valid);
  cr_assert_str_eq(e1->meta_error, "bad header ce_time: '24/11/2026' is not RFC 3339");
  cr_assert_str_eq(e1->meta.id, "id-1");

  cr_assert_not(e2->meta_valid);
  cr_assert_str_eq(e2->meta_error, "bad header ce_specversion: '0.3', want 1.0");

  cr_assert_not(e3->meta_valid);
  cr_assert_str_eq(e3->meta_error, "missing header ce_specversion");
  cr_assert_eq(e3->n_headers, 0);

  cr_assert(e4->meta_valid, "%s", e4->meta_error);
  int64_t want;
  cr_assert_eq(qm_time_parse_rfc3339("2026-11-24T02:30:00.500Z", &want), QM_OK);
  cr_assert_eq(e4->meta.time_ms, want);
  cr_assert_str_eq(e4->meta.traceparent, "garbage", "traceparent copied as received");

  cr_assert_not(e5->meta_valid);
  cr_assert_str_eq(e5->meta_error, "empty header ce_source");

  for (size_t i = 0; i < n; i++) qm_kmsg_destroy(msgs[i]);
  qm_consumer_destroy(c);
  qm_producer_destroy(p);
  mock_stop(&m);
}

/* ---------------------------------------------------------- batch results */

Test(kafka, send_batch_stops_at_first_unsendable_event) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "sb", 1);
  qm_producer_t *p = producer(&m, NULL, 0);

  qm_event_out_t evs[4] = {meta_event("sb", "0"), meta_event("sb", "1"), meta_event(NULL, "2"),
                           meta_event("sb", "3")};
  evs[1].meta.source[0] = '\0'; /* an id without a source is not a CloudEvent */
  evs[2].topic = NULL;
  int results[4] = {99, 99, 99, 99};
  char err[256] = "";
  int rc = qm_producer_send_batch(p, evs, 4, 10000, results, err, sizeof(err));
  cr_assert_eq(rc, QM_EINVAL, "rc %s", qm_strerror(rc));
  cr_assert_eq(results[0], QM_OK);
  cr_assert_eq(results[1], QM_EINVAL);
  cr_assert_eq(results[2], QM_ETRANSIENT, "events after a failure are not attempted");
  cr_assert_eq(results[3], QM_ETRANSIENT);
  cr_assert(strstr(err, "3 of 4 events not delivered") != NULL, "errstr: %s", err);
  cr_assert(strstr(err, "ce_source") != NULL, "errstr: %s", err);

  /* Exactly the one reported delivered is on the topic. */
  qm_consumer_t *c = consumer(&m, "g-sb", "sb");
  qm_kmsg_t *msgs[4];
  cr_assert_eq(consume(c, msgs, 1, 20000), 1);
  cr_assert_str_eq(qm_kmsg_event(msgs[0])->meta.id, evs[0].meta.id);
  size_t more = consume(c, msgs + 1, 3, 1500);
  cr_assert_eq(more, 0, "%zu unexpected messages", more);
  qm_kmsg_destroy(msgs[0]);
  qm_consumer_destroy(c);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, send_batch_reports_per_topic_delivery_failures) {
  mock_t m;
  mock_start(&m, 2);
  mock_topic(&m, "okay", 1);
  mock_topic(&m, "denied", 1);
  /* "denied" lives on broker 2, which rejects the next produce requests. */
  rd_kafka_mock_partition_set_leader(m.mc, "okay", 0, 1);
  rd_kafka_mock_partition_set_leader(m.mc, "denied", 0, 2);
  rd_kafka_mock_broker_push_request_error_rtts(m.mc, 2, 0 /* Produce */, 3,
                                               RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 0,
                                               RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 0,
                                               RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 0);
  const char *props[] = {"message.timeout.ms=3000"};
  qm_producer_t *p = producer(&m, props, 1);

  qm_event_out_t evs[3] = {meta_event("okay", "0"), meta_event("denied", "1"),
                           meta_event("okay", "2")};
  int results[3] = {99, 99, 99};
  char err[256] = "";
  int rc = qm_producer_send_batch(p, evs, 3, 10000, results, err, sizeof(err));
  cr_assert_neq(rc, QM_OK);
  cr_assert_eq(results[0], QM_OK);
  cr_assert_eq(results[1], QM_EINVAL, "the rejected event: %s", qm_strerror(results[1]));
  cr_assert_eq(results[2], QM_OK);
  cr_assert_eq(rc, QM_EINVAL);
  cr_assert(strstr(err, "1 of 3 events not delivered; first: event 1 to denied: Broker: "
                        "Message size too large") != NULL,
            "errstr: %s", err);
  /* A rejected message does not break the producer. */
  cr_assert_not(qm_producer_fatal(p, NULL, 0));
  cr_assert_eq(qm_producer_send_batch(p, evs, 1, 10000, results, err, sizeof(err)), QM_OK,
               "%s", err);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, send_batch_times_out_per_event_when_broker_down) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "down", 1);
  const char *props[] = {"message.timeout.ms=500"};
  qm_producer_t *p = producer(&m, props, 1);
  rd_kafka_mock_broker_set_down(m.mc, 1);

  qm_event_out_t evs[2] = {meta_event("down", "0"), meta_event("down", "1")};
  int results[2] = {99, 99};
  char err[256] = "";
  int64_t t0 = qm_mono_ms();
  int rc = qm_producer_send_batch(p, evs, 2, 5000, results, err, sizeof(err));
  int64_t took = qm_mono_ms() - t0;
  cr_assert_eq(rc, QM_ETIMEOUT, "rc %s: %s", qm_strerror(rc), err);
  cr_assert_eq(results[0], QM_ETIMEOUT);
  cr_assert_eq(results[1], QM_ETIMEOUT);
  cr_assert_lt(took, 4000, "waited %lld ms: the message timeout should end it",
               (long long)took);

  /* A batch bound shorter than the message timeout also ends in time. */
  const char *props2[] = {"message.timeout.ms=20000"};
  qm_producer_t *p2 = producer(&m, props2, 1);
  t0 = qm_mono_ms();
  rc = qm_producer_send_batch(p2, evs, 2, 300, results, err, sizeof(err));
  took = qm_mono_ms() - t0;
  cr_assert_eq(rc, QM_ETIMEOUT);
  cr_assert_eq(results[0], QM_ETIMEOUT);
  cr_assert(strstr(err, "no delivery report within 300 ms") != NULL, "errstr: %s", err);
  cr_assert_lt(took, 1500);

  /* Destroying with messages still queued purges them within its bounds;
   * the broker comes back so the first producer's destroy is quick. */
  rd_kafka_mock_broker_set_up(m.mc, 1);
  qm_producer_destroy(p2);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, producer_fatal_error_is_reported_as_eio) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "fatal", 1);
  /* InitProducerId (ApiKey 22) refused: the idempotent producer cannot work. */
  rd_kafka_mock_push_request_errors(m.mc, 22, 1,
                                    RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED);
  qm_producer_t *p = producer(&m, NULL, 0);
  qm_event_out_t ev = meta_event("fatal", "x");
  int result = 99;
  char err[256] = "";
  int rc = qm_producer_send_batch(p, &ev, 1, 10000, &result, err, sizeof(err));
  cr_assert_eq(rc, QM_EIO, "rc %s: %s", qm_strerror(rc), err);
  cr_assert_eq(result, QM_EIO);
  cr_assert(strstr(err, "fatal") != NULL, "errstr: %s", err);
  char why[256] = "";
  cr_assert(qm_producer_fatal(p, why, sizeof(why)));
  cr_assert_neq(why[0], '\0');
  /* Later sends fail at once with the reason. */
  rc = qm_producer_send(p, &ev, NULL, 1000, err, sizeof(err));
  cr_assert_eq(rc, QM_EIO);
  cr_assert(strstr(err, "fatal producer error") != NULL, "errstr: %s", err);
  qm_producer_destroy(p);
  mock_stop(&m);
}

/* --------------------------------------------------------- async sending */

typedef struct dr_log {
  int count;
  int ok;
  int seen[3];
} dr_log_t;

static void on_delivery(void *cb_ctx, void *msg_opaque, int err, const char *reason) {
  dr_log_t *log = cb_ctx;
  log->count++;
  if (err == QM_OK) log->ok++;
  int *which = msg_opaque;
  if (which && *which >= 0 && *which < 3) log->seen[*which]++;
  (void)reason;
}

Test(kafka, async_send_reports_each_delivery_once) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "as", 1);
  dr_log_t log = {0};
  qm_producer_t *p = NULL;
  char err[256] = "";
  cr_assert_eq(qm_producer_new(m.bootstraps, "t", NULL, 0, on_delivery, &log, &p, err,
                               sizeof(err)),
               QM_OK, "%s", err);
  int ids[3] = {0, 1, 2};
  for (int i = 0; i < 3; i++) {
    qm_event_out_t ev = meta_event("as", "x");
    cr_assert_eq(qm_producer_send(p, &ev, &ids[i], 1000, err, sizeof(err)), QM_OK, "%s", err);
  }
  qm_event_out_t bad = meta_event(NULL, "x");
  cr_assert_eq(qm_producer_send(p, &bad, &ids[0], 1000, err, sizeof(err)), QM_EINVAL);
  cr_assert_eq(qm_producer_flush(p, 10000), QM_OK);
  cr_assert_eq(log.count, 3, "a failed send must not call back");
  cr_assert_eq(log.ok, 3);
  for (int i = 0; i < 3; i++) cr_assert_eq(log.seen[i], 1);
  cr_assert_eq(qm_producer_ping(p, 5000), QM_OK);
  qm_producer_destroy(p);
  mock_stop(&m);
}

/* ---------------------------------------------------------- consumption */

Test(kafka, poll_batch_returns_at_most_max) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "pb", 1);
  qm_producer_t *p = producer(&m, NULL, 0);
  qm_event_out_t evs[10];
  int results[10];
  char err[256] = "";
  for (int i = 0; i < 10; i++) evs[i] = meta_event("pb", "x");
  cr_assert_eq(qm_producer_send_batch(p, evs, 10, 10000, results, err, sizeof(err)), QM_OK);

  qm_consumer_t *c = consumer(&m, "g-pb", "pb");
  qm_kmsg_t *msgs[10] = {0};
  size_t total = 0, full = 0;
  int64_t until = qm_mono_ms() + 20000;
  while (total < 10 && qm_mono_ms() < until) {
    size_t n = 99;
    cr_assert_eq(qm_consumer_poll_batch(c, msgs + total, 4, 500, &n), QM_OK);
    cr_assert_leq(n, 4, "poll_batch returned %zu > max", n);
    for (size_t i = 0; i < n; i++)
      cr_assert_eq(qm_kmsg_event(msgs[total + i])->offset, (int64_t)(total + i));
    if (n == 4) full++;
    total += n;
  }
  cr_assert_eq(total, 10);
  cr_assert_geq(full, 1, "never a full batch");

  /* Nothing left: it waits about max_wait_ms and returns none. */
  size_t n = 99;
  int64_t t0 = qm_mono_ms();
  qm_kmsg_t *none[4];
  cr_assert_eq(qm_consumer_poll_batch(c, none, 4, 300, &n), QM_OK);
  int64_t took = qm_mono_ms() - t0;
  cr_assert_eq(n, 0);
  cr_assert_geq(took, 250);
  cr_assert_lt(took, 2000);
  cr_assert_eq(qm_consumer_poll_batch(c, none, 0, 10, &n), QM_EINVAL);
  cr_assert_eq(qm_consumer_ping(c, 5000), QM_OK);

  for (size_t i = 0; i < total; i++) qm_kmsg_destroy(msgs[i]);
  cr_assert_eq(qm_consumer_close(c), QM_OK);
  cr_assert_eq(qm_consumer_poll_batch(c, none, 4, 10, &n), QM_ESHUTDOWN);
  qm_consumer_destroy(c);
  qm_producer_destroy(p);
  mock_stop(&m);
}

Test(kafka, stored_offsets_resume_and_unstored_are_redelivered) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "off", 1);
  qm_producer_t *p = producer(&m, NULL, 0);
  qm_event_out_t evs[5];
  char payloads[5][4];
  int results[5];
  char err[256] = "";
  for (int i = 0; i < 5; i++) {
    snprintf(payloads[i], sizeof(payloads[i]), "m%d", i);
    evs[i] = meta_event("off", payloads[i]);
  }
  cr_assert_eq(qm_producer_send_batch(p, evs, 5, 10000, results, err, sizeof(err)), QM_OK);

  /* First member handles all five but commits (stores) only m0..m2: its
   * transaction for m3 and m4 "did not commit". */
  qm_consumer_t *a = consumer(&m, "g-off", "off");
  qm_kmsg_t *msgs[5];
  cr_assert_eq(consume(a, msgs, 5, 20000), 5);
  for (int i = 0; i < 3; i++) cr_assert_eq(qm_consumer_store(a, msgs[i]), QM_OK);
  for (int i = 0; i < 5; i++) qm_kmsg_destroy(msgs[i]);
  cr_assert_eq(qm_consumer_close(a), QM_OK);
  qm_consumer_destroy(a);

  /* The next member of the group resumes at m3. */
  qm_consumer_t *b = consumer(&m, "g-off", "off");
  cr_assert_eq(consume(b, msgs, 2, 20000), 2);
  const qm_event_in_t *first = qm_kmsg_event(msgs[0]);
  cr_assert_eq(first->offset, 3, "resumed at offset %lld", (long long)first->offset);
  cr_assert_eq(first->payload_len, 2);
  cr_assert(memcmp(first->payload, "m3", 2) == 0);
  cr_assert_eq(qm_kmsg_event(msgs[1])->offset, 4);
  qm_kmsg_t *extra[1];
  cr_assert_eq(consume(b, extra, 1, 1000), 0, "a stored message came back");
  /* Storing after close is refused, not silently lost. */
  cr_assert_eq(qm_consumer_store(b, msgs[1]), QM_OK);
  cr_assert_eq(qm_consumer_close(b), QM_OK);
  cr_assert_eq(qm_consumer_store(b, msgs[1]), QM_ECONFLICT);
  for (int i = 0; i < 2; i++) qm_kmsg_destroy(msgs[i]);
  qm_consumer_destroy(b);

  /* A third member starts after m4 (b stored it and close committed it):
   * the first thing it sees is a new m5. */
  evs[0] = meta_event("off", "m5");
  cr_assert_eq(qm_producer_send_batch(p, evs, 1, 10000, results, err, sizeof(err)), QM_OK);
  qm_consumer_t *c3 = consumer(&m, "g-off", "off");
  cr_assert_eq(consume(c3, extra, 1, 20000), 1);
  cr_assert_eq(qm_kmsg_event(extra[0])->offset, 5, "offset committed on close was lost");
  qm_kmsg_destroy(extra[0]);
  qm_consumer_destroy(c3);
  qm_producer_destroy(p);
  mock_stop(&m);
}

/* ----------------------------------------------------------- dead letters */

Test(kafka, dlq_event_carries_original_and_error_headers) {
  mock_t m;
  mock_start(&m, 1);
  mock_topic(&m, "src", 1);
  mock_topic(&m, "src.dlq", 1);
  qm_producer_t *p = producer(&m, NULL, 0);
  qm_header_t extra[] = {{"x-orig", "1", 1}};
  qm_event_out_t ev = meta_event("src", "not-protobuf");
  ev.headers = extra;
  ev.n_headers = 1;
  int result;
  char err[256] = "";
  cr_assert_eq(qm_producer_send_batch(p, &ev, 1, 10000, &result, err, sizeof(err)), QM_OK);

  qm_consumer_t *c = consumer(&m, "g-src", "src");
  qm_kmsg_t *msg;
  cr_assert_eq(consume(c, &msg, 1, 20000), 1);
  const qm_event_in_t *in = qm_kmsg_event(msg);

  /* Too little storage: refused, outputs untouched. */
  qm_event_out_t out;
  memset(&out, 0xab, sizeof(out));
  qm_header_t small[3];
  qm_dlq_buf_t buf;
  cr_assert_eq(qm_dlq_build(in, "approval", "x", &out, small, 3, &buf, err, sizeof(err)),
               QM_EINVAL);
  cr_assert_eq(((unsigned char *)&out)[0], 0xab);

  qm_header_t storage[32];
  int64_t before = qm_now_ms();
  cr_assert_eq(qm_dlq_build(in, "approval", "decode: bad protobuf", &out, storage, 32, &buf,
                            err, sizeof(err)),
               QM_OK, "%s", err);
  cr_assert_str_eq(out.topic, "src.dlq");
  cr_assert_eq(out.key_len, in->key_len);
  cr_assert(memcmp(out.key, in->key, in->key_len) == 0);
  cr_assert_eq(out.payload_len, in->payload_len);
  cr_assert(memcmp(out.payload, in->payload, in->payload_len) == 0);
  cr_assert_str_eq(out.meta.id, "", "a dead letter must not get new ce_* headers");
  cr_assert_eq(out.n_headers, in->n_headers + QM_DLQ_N_HEADERS);
  for (size_t i = 0; i < in->n_headers; i++) {
    cr_assert_str_eq(out.headers[i].name, in->headers[i].name);
    cr_assert_eq(out.headers[i].value_len, in->headers[i].value_len);
    cr_assert(memcmp(out.headers[i].value, in->headers[i].value, in->headers[i].value_len) ==
              0);
  }
  cr_assert(qm_uuid_valid(buf.id));
  cr_assert_str_neq(buf.id, in->meta.id);

  /* Published, the dead letter reads back with both header sets. */
  cr_assert_eq(qm_producer_send_batch(p, &out, 1, 10000, &result, err, sizeof(err)), QM_OK,
               "%s", err);
  qm_consumer_t *d = consumer(&m, "g-dlq", "src.dlq");
  qm_kmsg_t *dmsg;
  cr_assert_eq(consume(d, &dmsg, 1, 20000), 1);
  const qm_event_in_t *dl = qm_kmsg_event(dmsg);
  cr_assert_str_eq(dl->topic, "src.dlq");
  cr_assert_eq(dl->payload_len, strlen("not-protobuf"));
  cr_assert(memcmp(dl->payload, "not-protobuf", dl->payload_len) == 0);
  cr_assert_eq(hdr_count(dl, "ce_id"), 1, "ce_id duplicated");
  cr_assert(dl->meta_valid, "original CloudEvents meta kept: %s", dl->meta_error);
  cr_assert_str_eq(dl->meta.id, in->meta.id);
  assert_hdr_str(dl, "x-orig", "1");
  assert_hdr_str(dl, "qm_dlq_id", buf.id);
  assert_hdr_str(dl, "qm_dlq_error", "decode: bad protobuf");
  assert_hdr_str(dl, "qm_dlq_service", "approval");
  assert_hdr_str(dl, "qm_dlq_topic", "src");
  assert_hdr_str(dl, "qm_dlq_partition", "0");
  assert_hdr_str(dl, "qm_dlq_offset", "0");
  const qm_header_t *t = hdr(dl, "qm_dlq_time");
  cr_assert_not_null(t);
  char tbuf[64];
  snprintf(tbuf, sizeof(tbuf), "%.*s", (int)t->value_len, (const char *)t->value);
  int64_t when;
  cr_assert_eq(qm_time_parse_rfc3339(tbuf, &when), QM_OK, "qm_dlq_time '%s'", tbuf);
  cr_assert_geq(when, before - 1);
  cr_assert_leq(when, qm_now_ms() + 1);
  cr_assert_eq(dl->n_headers, in->n_headers + QM_DLQ_N_HEADERS);

  qm_kmsg_destroy(dmsg);
  qm_kmsg_destroy(msg);
  qm_consumer_destroy(d);
  qm_consumer_destroy(c);
  qm_producer_destroy(p);
  mock_stop(&m);
}

/* ----------------------------------------------------------- admin, ping */

Test(kafka, create_topics_checks_arguments) {
  char err[256] = "";
  const char *none[] = {NULL};
  const char *one[] = {"t"};
  cr_assert_eq(qm_kafka_create_topics("127.0.0.1:1", none, 0, 1, 1, 100, err, sizeof(err)),
               QM_OK, "nothing to create is done");
  cr_assert_eq(qm_kafka_create_topics("127.0.0.1:1", none, 1, 1, 1, 100, err, sizeof(err)),
               QM_EINVAL);
  cr_assert_eq(qm_kafka_create_topics("127.0.0.1:1", one, 1, 0, 1, 100, err, sizeof(err)),
               QM_EINVAL);
  cr_assert(strstr(err, "0 partitions") != NULL, "errstr: %s", err);
  /* No broker: a bounded failure, not a hang. */
  int64_t t0 = qm_mono_ms();
  int rc = qm_kafka_create_topics("127.0.0.1:1", one, 1, 1, 1, 500, err, sizeof(err));
  cr_assert(rc == QM_ETIMEOUT || rc == QM_EIO, "rc %s", qm_strerror(rc));
  cr_assert_lt(qm_mono_ms() - t0, 4000);
}

Test(kafka, ping_fails_without_broker) {
  qm_producer_t *p = NULL;
  char err[256] = "";
  cr_assert_eq(qm_producer_new("127.0.0.1:1", "t", NULL, 0, NULL, NULL, &p, err, sizeof(err)),
               QM_OK, "%s", err);
  int64_t t0 = qm_mono_ms();
  int rc = qm_producer_ping(p, 500);
  cr_assert_neq(rc, QM_OK);
  cr_assert_lt(qm_mono_ms() - t0, 3000);
  qm_producer_destroy(p);
}
