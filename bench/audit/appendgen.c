/*
 * appendgen: the Kafka side of the audit append benchmark (bench/audit/run.sh).
 *
 *   appendgen topics create|delete --prefix P [--partitions N]
 *       creates (or deletes) every Quartermaster topic and its .dlq twin
 *       under the prefix, so a run leaves nothing behind;
 *   appendgen produce --prefix P -n N [--size BYTES] [--people K] [--random]
 *       produces N events straight to <P>qm.requests.v1, each a valid
 *       CloudEvent (fresh ce_id, source /qm/bench) keyed by the people
 *       p-0001..p-<K> in turn, through the same idempotent producer the
 *       services use (librdkafka's default partitioner: CRC-32 of the key).
 *       By default each is a real RequestSubmitted (type
 *       qm.request.submitted.v1, one line, its reason padded to about BYTES
 *       bytes), so audit decodes it and writes its report fact as it would
 *       in production; --random sends BYTES random bytes of type
 *       qm.bench.synthetic.v1 instead (no decoding, no facts).
 *
 * It speaks to Kafka only; the script starts qm-audit and measures the
 * ledger. QM_KAFKA_BROKERS selects the brokers (default 127.0.0.1:9092).
 */
#include "qm_common.h"
#include "qm_event.h"
#include "qm_kafka.h"
#include "qm_topics.h"

#include "qm/v1/requests.pb-c.h"

#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void) {
  fprintf(stderr, "usage: appendgen topics create|delete --prefix P [--partitions N]\n"
                  "       appendgen produce --prefix P -n N [--size BYTES] [--people K] [--random]\n");
}

static long arg_long(const char *s, long lo, long hi, const char *what) {
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (!*s || *end || v < lo || v > hi) {
    fprintf(stderr, "appendgen: %s must be an integer from %ld to %ld\n", what, lo, hi);
    exit(2);
  }
  return v;
}

/* Every topic name under prefix (caller frees each and the array). */
static char **topic_names(const char *prefix, size_t *n) {
  char **names = qm_calloc(2 * qm_topics_count, sizeof(char *));
  *n = 0;
  for (size_t i = 0; i < qm_topics_count; i++) {
    names[(*n)++] = qm_asprintf("%s%s", prefix, qm_topics_all[i]);
    names[(*n)++] = qm_asprintf("%s%s%s", prefix, qm_topics_all[i], QM_DLQ_SUFFIX);
  }
  return names;
}

static int delete_topics(const char *brokers, char **names, size_t n) {
  char err[512];
  rd_kafka_conf_t *conf = rd_kafka_conf_new();
  if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, err, sizeof(err))) {
    fprintf(stderr, "appendgen: %s\n", err);
    rd_kafka_conf_destroy(conf);
    return 1;
  }
  rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
  if (!rk) {
    fprintf(stderr, "appendgen: %s\n", err);
    return 1;
  }
  rd_kafka_DeleteTopic_t **dt = qm_calloc(n, sizeof(*dt));
  for (size_t i = 0; i < n; i++) dt[i] = rd_kafka_DeleteTopic_new(names[i]);
  rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
  rd_kafka_DeleteTopics(rk, dt, n, NULL, q);
  rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 30000);
  int rc = ev && !rd_kafka_event_error(ev) ? 0 : 1;
  if (rc) fprintf(stderr, "appendgen: deleting topics failed: %s\n",
                  ev ? rd_kafka_event_error_string(ev) : "timed out");
  if (ev) rd_kafka_event_destroy(ev);
  rd_kafka_DeleteTopic_destroy_array(dt, n);
  free(dt);
  rd_kafka_queue_destroy(q);
  rd_kafka_destroy(rk);
  return rc;
}

static int topics_main(int argc, char **argv, const char *brokers) {
  const char *prefix = NULL;
  long partitions = 3;
  for (int i = 2; i < argc; i++) {
    if (!strcmp(argv[i], "--prefix") && i + 1 < argc) prefix = argv[++i];
    else if (!strcmp(argv[i], "--partitions") && i + 1 < argc)
      partitions = arg_long(argv[++i], 1, 1000, "--partitions");
    else {
      usage();
      return 2;
    }
  }
  if (!prefix || !*prefix) {
    fprintf(stderr, "appendgen: --prefix is required (never touch the real topics)\n");
    return 2;
  }
  size_t n = 0;
  char **names = topic_names(prefix, &n);
  int rc;
  if (!strcmp(argv[1], "create")) {
    char errstr[1024];
    rc = qm_kafka_create_topics(brokers, (const char *const *)names, n, (int)partitions, 1, 30000,
                                errstr, sizeof(errstr)) == QM_OK ? 0 : 1;
    if (rc) fprintf(stderr, "appendgen: creating topics: %s\n", errstr);
  } else {
    rc = delete_topics(brokers, names, n);
  }
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  return rc;
}

typedef struct gen_stats {
  long delivered, failed;
} gen_stats_t;

static void on_delivery(void *ctx, void *opaque, int err, const char *reason) {
  QM_UNUSED(opaque);
  QM_UNUSED(reason);
  gen_stats_t *s = ctx;
  if (err == QM_OK) s->delivered++;
  else s->failed++;
}

static int produce_main(int argc, char **argv, const char *brokers) {
  const char *prefix = NULL;
  long n = 0, size = 200, people = 300;
  bool random_bytes = false;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--prefix") && i + 1 < argc) prefix = argv[++i];
    else if (!strcmp(argv[i], "--random")) random_bytes = true;
    else if (!strcmp(argv[i], "-n") && i + 1 < argc) n = arg_long(argv[++i], 1, 100000000, "-n");
    else if (!strcmp(argv[i], "--size") && i + 1 < argc)
      size = arg_long(argv[++i], 0, 60000, "--size");
    else if (!strcmp(argv[i], "--people") && i + 1 < argc)
      people = arg_long(argv[++i], 1, 9999, "--people");
    else {
      usage();
      return 2;
    }
  }
  if (!prefix || !*prefix || n == 0) {
    usage();
    return 2;
  }
  gen_stats_t stats = {0};
  qm_producer_t *p = NULL;
  char errstr[512];
  static const char *const props[] = {"linger.ms=20", "batch.num.messages=10000",
                                      "queue.buffering.max.messages=200000"};
  if (qm_producer_new(brokers, "qm-bench-appendgen", props, QM_ARRAY_LEN(props), on_delivery,
                      &stats, &p, errstr, sizeof(errstr)) != QM_OK) {
    fprintf(stderr, "appendgen: producer: %s\n", errstr);
    return 1;
  }
  char *topic = qm_asprintf("%s%s", prefix, QM_TOPIC_REQUESTS);
  uint8_t *payload = qm_malloc((size_t)size + 1);
  static uint8_t packed[65536];
  static const char *const items[] = {"slack", "zoom", "figma", "jira"};
  uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t)qm_now_ms();
  int64_t t0 = qm_mono_ms();
  int rc = 0;
  for (long i = 0; i < n; i++) {
    for (long b = 0; b < size; b++) { /* xorshift: cheap, incompressible enough */
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      payload[b] = (uint8_t)x;
    }
    char key[16], subject[QM_UUID_STR_LEN];
    int klen = snprintf(key, sizeof(key), "p-%04ld", i % people + 1);
    qm_uuid_new(subject);
    size_t len = (size_t)size;
    if (!random_bytes) { /* a real submission, its reason the random text */
      for (long b = 0; b < size; b++) payload[b] = (uint8_t)('a' + payload[b] % 26);
      payload[size > 120 ? size - 120 : 0] = '\0';
      Qm__V1__Actor req = QM__V1__ACTOR__INIT;
      req.person_id = key;
      Qm__V1__RequestLine line = QM__V1__REQUEST_LINE__INIT;
      Qm__V1__RequestLine *lines[] = {&line};
      line.line_no = 1;
      line.item_id = (char *)items[i % 4];
      line.role_id = "user";
      Qm__V1__RequestSubmitted sub = QM__V1__REQUEST_SUBMITTED__INIT;
      sub.request_id = subject;
      sub.requester = &req;
      sub.subject_person_id = key;
      sub.subject_department = "Engineering";
      sub.reason = (char *)payload;
      sub.n_lines = 1;
      sub.lines = lines;
      sub.submitted_at_ms = qm_now_ms();
      sub.origin = "self_service";
      Qm__V1__RequestEvent re = QM__V1__REQUEST_EVENT__INIT;
      re.event_case = QM__V1__REQUEST_EVENT__EVENT_SUBMITTED;
      re.submitted = &sub;
      len = protobuf_c_message_get_packed_size(&re.base);
      if (len > sizeof(packed)) len = 0;
      else protobuf_c_message_pack(&re.base, packed);
    }
    qm_event_out_t ev = {.topic = topic, .key = key, .key_len = (size_t)klen,
                         .payload = random_bytes ? payload : packed, .payload_len = len};
    qm_event_meta_init(&ev.meta, "bench",
                       random_bytes ? "qm.bench.synthetic.v1" : "qm.request.submitted.v1", subject,
                       NULL);
    if (qm_producer_send(p, &ev, NULL, 30000, errstr, sizeof(errstr)) != QM_OK) {
      fprintf(stderr, "appendgen: send %ld: %s\n", i, errstr);
      rc = 1;
      break;
    }
    if ((i & 1023) == 0) qm_producer_poll(p, 0);
  }
  if (qm_producer_flush(p, 60000) != QM_OK) rc = 1;
  double secs = (double)(qm_mono_ms() - t0) / 1000.0;
  qm_producer_destroy(p);
  printf("produced %ld events of %ld bytes to %s in %.2f s (%.0f/s), %ld failed\n",
         stats.delivered, size, topic, secs, secs > 0 ? (double)stats.delivered / secs : 0.0,
         stats.failed);
  free(payload);
  free(topic);
  return rc || stats.failed ? 1 : 0;
}

int main(int argc, char **argv) {
  const char *brokers = getenv("QM_KAFKA_BROKERS");
  if (!brokers || !*brokers) brokers = "127.0.0.1:9092";
  if (argc > 2 && !strcmp(argv[1], "topics") &&
      (!strcmp(argv[2], "create") || !strcmp(argv[2], "delete")))
    return topics_main(argc - 1, argv + 1, brokers);
  if (argc > 1 && !strcmp(argv[1], "produce")) return produce_main(argc - 1, argv + 1, brokers);
  usage();
  return 2;
}
