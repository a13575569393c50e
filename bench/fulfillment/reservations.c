/*
 * bench-fulfillment: reservations per second under contention. It prints
 * figures; it is not a test (bench/README.md has the results).
 *
 * It reuses the integration harness (an isolated database and topic prefix)
 * and runs qm-fulfillment alone, with STOCK assets of one model at one site,
 * so every reservation competes for the same rows (SKIP LOCKED) and the same
 * per-(model, site) stock-level lock:
 *
 *  1. HTTP: CLIENTS threads, each with its own keep-alive connection, POST
 *     /v1/reservations (IT staff's path) as fast as answers come, REQUESTS in
 *     all, for the one model. The first STOCK are reserved, the rest
 *     backordered (a purchase order and its outbound row each). Reported:
 *     answers per second, reserved and backordered counts (checked: exactly
 *     STOCK reserved, no asset twice), latency percentiles.
 *  2. Events: EVENTS approved asset lines (RequestApproved, as approval
 *     publishes them) are queued on qm.decisions.v1 while fulfillment is
 *     stopped, with as many assets in stock; then it starts and the clock
 *     runs from its readiness until every line has its task (counted in its
 *     database every 20 ms): the consumer's batched path.
 *
 * Usage: bench-fulfillment ; environment BENCH_STOCK (default 500),
 * BENCH_REQUESTS (2000), BENCH_CLIENTS (32), BENCH_EVENTS (2000),
 * BENCH_HTTP_THREADS (fulfillment's QM_HTTP_THREADS, 16), BENCH_ASYNC_COMMIT=1
 * (a diagnosis: fulfillment's sessions with synchronous_commit off, to see
 * how much of the time is the commit's WAL flush). Run it from the build
 * directory after building the services.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include "qm/v1/common.pb-c.h"
#include "qm/v1/decisions.pb-c.h"

#include <criterion/criterion.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int env_int(const char *name, int def) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : def;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

typedef struct client {
  int port;
  const char *token;
  int index, n_clients, n_total;
  double *lat_ms; /* shared, indexed by request number */
  atomic_int *next;
  int reserved, backordered, failed;
} client_t;

static size_t sink(char *p, size_t s, size_t n, void *ud) {
  char *buf = ud;
  size_t have = strlen(buf), add = s * n;
  if (have + add < 4096) {
    memcpy(buf + have, p, add);
    buf[have + add] = 0;
  }
  return s * n;
}

static void *client_main(void *arg) {
  client_t *c = arg;
  CURL *h = curl_easy_init();
  char url[128], auth[1200], body[400];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/v1/reservations", c->port);
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", c->token);
  struct curl_slist *hl = curl_slist_append(NULL, auth);
  hl = curl_slist_append(hl, "Content-Type: application/json");
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 30L);
  char resp[4096];
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, resp);
  for (;;) {
    int i = atomic_fetch_add(c->next, 1);
    if (i >= c->n_total) break;
    snprintf(body, sizeof(body),
             "{\"request_id\":\"bench-%06d\",\"line_no\":1,\"person_id\":\"p-%04d\","
             "\"model_id\":\"bench-lat\",\"location\":\"Amsterdam\",\"country\":\"NL\"}",
             i, 1 + i % 300);
    resp[0] = 0;
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    int64_t t0 = qm_mono_us();
    CURLcode cc = curl_easy_perform(h);
    c->lat_ms[i] = (double)(qm_mono_us() - t0) / 1000.0;
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (cc != CURLE_OK || code != 201) c->failed++;
    else if (strstr(resp, "\"outcome\": \"reserved\"") || strstr(resp, "\"outcome\":\"reserved\""))
      c->reserved++;
    else c->backordered++;
  }
  curl_slist_free_all(hl);
  curl_easy_cleanup(h);
  return NULL;
}

static void import_stock(it_stack_t *st, const char *token, const char *model, int n) {
  size_t cap = (size_t)n * 64 + 64;
  char *csv = qm_malloc(cap);
  size_t off = (size_t)snprintf(csv, cap, "tag,serial,model_id,site_id\n");
  for (int i = 0; i < n; i++)
    off += (size_t)snprintf(csv + off, cap - off, "%s-%06d,SN-%s-%06d,%s,hq\n",
                            !strcmp(model, "bench-lat") ? "BL" : "BE", i,
                            !strcmp(model, "bench-lat") ? "H" : "E", i, model);
  const char *hdr[] = {"Content-Type: text/csv", NULL};
  it_resp_t r;
  long got = it_http(st, "fulfillment", "POST", "/v1/assets/import", token, csv, hdr, &r);
  cr_assert_eq(got, 201, "import: %ld %s", got, r.body);
  it_resp_clear(&r);
  free(csv);
}

static void setup(it_stack_t *st, const char *token) {
  it_resp_t r;
  cr_assert_eq(it_http(st, "fulfillment", "PUT", "/v1/sites/hq", token,
                       "{\"name\":\"HQ\",\"kind\":\"central\",\"country\":\"NL\",\"locations\":[\"Amsterdam\"]}",
                       NULL, &r), 200);
  it_resp_clear(&r);
  cr_assert_eq(it_http(st, "fulfillment", "PUT", "/v1/models/bench-lat", token,
                       "{\"name\":\"Bench laptop\",\"item_type\":\"laptop\",\"cost\":1000}", NULL, &r), 200);
  it_resp_clear(&r);
  cr_assert_eq(it_http(st, "fulfillment", "PUT", "/v1/models/bench-ev", token,
                       "{\"name\":\"Bench laptop (events)\",\"item_type\":\"laptop\",\"cost\":1000}", NULL, &r), 200);
  it_resp_clear(&r);
}

static void bench_http(it_stack_t *st, const char *token, int stock, int total, int n_clients) {
  import_stock(st, token, "bench-lat", stock);
  double *lat = qm_calloc((size_t)total, sizeof(double));
  atomic_int next = 0;
  client_t *cl = qm_calloc((size_t)n_clients, sizeof(*cl));
  pthread_t *th = qm_calloc((size_t)n_clients, sizeof(*th));
  int64_t t0 = qm_mono_us();
  for (int i = 0; i < n_clients; i++) {
    cl[i] = (client_t){.port = it_service_port(st, "fulfillment"), .token = token, .index = i,
                       .n_clients = n_clients, .n_total = total, .lat_ms = lat, .next = &next};
    pthread_create(&th[i], NULL, client_main, &cl[i]);
  }
  int reserved = 0, backordered = 0, failed = 0;
  for (int i = 0; i < n_clients; i++) {
    pthread_join(th[i], NULL);
    reserved += cl[i].reserved;
    backordered += cl[i].backordered;
    failed += cl[i].failed;
  }
  double secs = (double)(qm_mono_us() - t0) / 1e6;
  qsort(lat, (size_t)total, sizeof(double), cmp_double);
  long long distinct = it_pg_int(st, "SELECT count(DISTINCT asset_id) FROM fulfillment.tasks"
                                     " WHERE asset_model = 'bench-lat' AND asset_id IS NOT NULL");
  long long reserved_db = it_pg_int(st, "SELECT count(*) FROM fulfillment.assets"
                                        " WHERE model_id = 'bench-lat' AND status = 'reserved'");
  printf("http   %d requests, %d clients, %d in stock: %.2f s -> %.0f reservations/s"
         " (reserved %d, backordered %d, failed %d); latency ms p50 %.1f p90 %.1f p99 %.1f max %.1f\n",
         total, n_clients, stock, secs, total / secs, reserved, backordered, failed,
         lat[total / 2], lat[total * 9 / 10], lat[total * 99 / 100], lat[total - 1]);
  fflush(stdout);
  cr_assert_eq(failed, 0, "%d reservations failed", failed);
  cr_assert_eq(reserved, stock < total ? stock : total, "reserved %d of %d in stock", reserved, stock);
  cr_assert_eq(reserved_db, reserved, "database: %lld reserved", reserved_db);
  cr_assert_eq(distinct, reserved, "an asset was reserved twice: %lld distinct", distinct);
  free(lat);
  free(cl);
  free(th);
}

static void publish_line(it_stack_t *st, int i) {
  char rid[32], person[16];
  snprintf(rid, sizeof(rid), "ev-%06d", i);
  snprintf(person, sizeof(person), "p-%04d", 1 + i % 300);
  Qm__V1__RequestLine line = QM__V1__REQUEST_LINE__INIT;
  line.line_no = 1;
  line.item_id = (char *)"laptop-standard";
  line.kind = QM__V1__ITEM_KIND__ITEM_KIND_ASSET;
  line.asset_model = (char *)"bench-ev";
  Qm__V1__RequestApproved ap = QM__V1__REQUEST_APPROVED__INIT;
  ap.request_id = rid;
  ap.line = &line;
  ap.subject_person_id = person;
  ap.subject_country = (char *)"NL";
  ap.subject_location = (char *)"Amsterdam";
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &ap;
  uint8_t buf[512];
  size_t len = qm__v1__decision_event__pack(&de, buf);
  it_publish(st, QM_TOPIC_DECISIONS, person, "/qm/approval", "qm.request.approved.v1", rid, buf, len);
}

static void bench_events(it_stack_t *st, const char *token, int n) {
  import_stock(st, token, "bench-ev", n);
  cr_assert_eq(it_service_term(st, "fulfillment", 15000), 0, "fulfillment did not stop cleanly");
  int64_t t_pub = it_now_ms();
  for (int i = 0; i < n; i++) publish_line(st, i);
  fprintf(stderr, "[bench] %d approvals queued in %.1f s; starting fulfillment\n", n,
          (double)(it_now_ms() - t_pub) / 1000.0);
  it_service_start(st, "fulfillment");
  int64_t t_ready = it_now_ms();
  const char *q = "SELECT count(*) FROM fulfillment.tasks WHERE asset_model = 'bench-ev'";
  long long done = 0;
  int64_t deadline = it_now_ms() + 600000;
  while ((done = it_pg_int(st, q)) < n && it_now_ms() < deadline) it_sleep_ms(20);
  double secs = (double)(it_now_ms() - t_ready) / 1000.0;
  long long reserved = it_pg_int(st, "SELECT count(*) FROM fulfillment.assets"
                                     " WHERE model_id = 'bench-ev' AND status = 'reserved'");
  printf("events %d approved lines from qm.decisions.v1, %d in stock: %.2f s from readiness"
         " -> %.0f reservations/s (reserved %lld)\n",
         n, n, secs, n / secs, reserved);
  fflush(stdout);
  cr_assert_eq(done, n, "only %lld of %d lines have a task", done, n);
  cr_assert_eq(reserved, n, "reserved %lld of %d", reserved, n);
}

Test(bench, fulfillment_reservations, .timeout = 1800) {
  int stock = env_int("BENCH_STOCK", 500), total = env_int("BENCH_REQUESTS", 2000);
  int clients = env_int("BENCH_CLIENTS", 32), events = env_int("BENCH_EVENTS", 2000);
  char threads[64];
  snprintf(threads, sizeof(threads), "QM_HTTP_THREADS=%d", env_int("BENCH_HTTP_THREADS", 16));
  char pool[64];
  snprintf(pool, sizeof(pool), "QM_PG_POOL_SIZE=%d", env_int("BENCH_HTTP_THREADS", 16));
  const it_svc_env_t env[] = {{"fulfillment", threads}, {"fulfillment", pool},
                              {"fulfillment", "QM_LOG_LEVEL=warn"}, {NULL, NULL}};
  static const char *const only[] = {"fulfillment", NULL};
  it_stack_t *st = it_stack_up_env("bench-ff", only, env);
  char *token = it_token("p-0001", "it_admin");
  if (env_int("BENCH_ASYNC_COMMIT", 0)) {
    char *dsn = qm_asprintf("QM_PG_DSN=%s options='-c synchronous_commit=off'", it_stack_dsn(st));
    it_service_setenv(st, "fulfillment", dsn);
    it_service_restart(st, "fulfillment");
    free(dsn);
    printf("(diagnosis: synchronous_commit off for fulfillment's sessions)\n");
  }
  setup(st, token);
  bench_http(st, token, stock, total, clients);
  if (events > 0) bench_events(st, token, events);
  free(token);
  it_stack_down(st);
}
