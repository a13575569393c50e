/*
 * Unit tests for qm_outbox (adding events, the relay) against the machine's
 * real PostgreSQL (127.0.0.1:5432, user postgres, trust), in the database
 * qm_unit (created when missing) and one fresh schema per test, dropped at the
 * end. Relays are driven step by step with qm_relay_run_once(), except where
 * the thread itself is under test. A PostgreSQL that is not reachable fails
 * the tests loudly.
 *
 * Note: the relay only reads rows older than every transaction still running
 * in the cluster, so a long writing transaction elsewhere (another engineer's
 * test) can delay publication; the helpers below wait for a bounded time.
 */
#include "qm_common.h"
#include "qm_outbox.h"
#include "qm_pg.h"
#include "pg_fixture.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define MAX_REC 256

static char schema[64];
static char errstr[1024];
static qm_pg_t *admin; /* on qm_unit, search path = schema */
/* must_connect()'s connections, closed by teardown() (not by the tests), so
 * a failed test never leaves a transaction open that blocks the DROP. */
static qm_pg_t *opened[8];
static size_t n_opened;

static void ensure_database(void) { pg_fixture_ensure_database(errstr, sizeof(errstr)); }

static void setup(void) {
  ensure_database();
  snprintf(schema, sizeof(schema), "qm_t_outbox_%d_%lld", (int)getpid(),
           (long long)(qm_mono_us() % 1000000000));
  admin = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(admin, "PostgreSQL database qm_unit is not reachable: %s", errstr);
  int rc = qm_pg_migrate(admin, schema, &qm_outbox_migration, 1, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "outbox migration: %s", errstr);
}

static void teardown(void) {
  for (size_t i = 0; i < n_opened; i++) qm_pg_destroy(opened[i]);
  n_opened = 0;
  if (!admin) return;
  qm_pg_ensure(admin, qm_mono_ms() + 5000);
  qm_pg_exec_simple(admin, "SET lock_timeout = '10s'", errstr, sizeof(errstr));
  char *sql = qm_asprintf("DROP SCHEMA IF EXISTS \"%s\" CASCADE", schema);
  qm_pg_exec_simple(admin, sql, errstr, sizeof(errstr));
  free(sql);
  qm_pg_destroy(admin);
  admin = NULL;
}

TestSuite(outbox, .init = setup, .fini = teardown, .timeout = 90);

/* ---- a recording publisher ------------------------------------------------- */

typedef struct {
  pthread_mutex_t mu;
  char ids[MAX_REC][40];
  size_t n;
  int calls;
  size_t max_batch;
  char fail_id[40]; /* this event fails ... */
  int fail_times;   /* ... this many times */
  int sleep_ms;     /* per call, to make batches take time */
  /* copies of the first event seen, for the round-trip test */
  bool have_first;
  qm_event_meta_t meta;
  char topic[64];
  unsigned char key[64], payload[64], hval[2][64];
  size_t key_len, payload_len, hval_len[2], n_headers;
  char hname[2][32];
  bool key_null, payload_null;
} rec_t;

static void rec_init(rec_t *rec) {
  memset(rec, 0, sizeof(*rec));
  pthread_mutex_init(&rec->mu, NULL);
}

static size_t rec_count(rec_t *rec) {
  pthread_mutex_lock(&rec->mu);
  size_t n = rec->n;
  pthread_mutex_unlock(&rec->mu);
  return n;
}

static int rec_publish(void *ctx, const qm_event_out_t *evs, size_t n, int *results) {
  rec_t *rec = ctx;
  if (rec->sleep_ms) usleep((useconds_t)rec->sleep_ms * 1000);
  pthread_mutex_lock(&rec->mu);
  rec->calls++;
  if (n > rec->max_batch) rec->max_batch = n;
  int rc = QM_OK;
  for (size_t i = 0; i < n; i++) {
    const qm_event_out_t *ev = &evs[i];
    if (rc != QM_OK) { /* a real producer fails the rest of a partition too */
      results[i] = QM_ETRANSIENT;
      continue;
    }
    if (rec->fail_times > 0 && strcmp(ev->meta.id, rec->fail_id) == 0) {
      rec->fail_times--;
      results[i] = QM_ETRANSIENT;
      rc = QM_ETRANSIENT;
      continue;
    }
    if (!rec->have_first) {
      rec->have_first = true;
      rec->meta = ev->meta;
      qm_strlcpy(rec->topic, ev->topic, sizeof(rec->topic));
      rec->key_null = ev->key == NULL;
      rec->key_len = ev->key_len < 64 ? ev->key_len : 64;
      if (ev->key) memcpy(rec->key, ev->key, rec->key_len);
      rec->payload_null = ev->payload == NULL;
      rec->payload_len = ev->payload_len < 64 ? ev->payload_len : 64;
      if (ev->payload) memcpy(rec->payload, ev->payload, rec->payload_len);
      rec->n_headers = ev->n_headers;
      for (size_t h = 0; h < ev->n_headers && h < 2; h++) {
        qm_strlcpy(rec->hname[h], ev->headers[h].name, sizeof(rec->hname[h]));
        rec->hval_len[h] = ev->headers[h].value_len < 64 ? ev->headers[h].value_len : 64;
        memcpy(rec->hval[h], ev->headers[h].value, rec->hval_len[h]);
      }
    }
    if (rec->n < MAX_REC) qm_strlcpy(rec->ids[rec->n++], ev->meta.id, 40);
    results[i] = QM_OK;
  }
  pthread_mutex_unlock(&rec->mu);
  return rc;
}

/* ---- helpers ----------------------------------------------------------------- */

static qm_pg_t *must_connect(void) {
  qm_pg_t *c = qm_pg_connect(UNIT_DSN, schema, errstr, sizeof(errstr));
  cr_assert_not_null(c, "%s", errstr);
  cr_assert_lt(n_opened, QM_ARRAY_LEN(opened));
  opened[n_opened++] = c;
  return c;
}

static int64_t query_int(qm_pg_t *c, const char *sql) {
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(c, sql, NULL, 0, &res, errstr, sizeof(errstr)), QM_OK, "%s: %s", sql,
               errstr);
  int64_t v = 0;
  cr_assert_eq(qm_pg_get_int64(res, 0, 0, &v), QM_OK, "%s: not an integer", sql);
  qm_pg_result_destroy(res);
  return v;
}

/* An event with ce_id = id, keyed by key. */
static qm_event_out_t make_event(const char *id, const char *key) {
  qm_event_out_t ev;
  memset(&ev, 0, sizeof(ev));
  ev.topic = "qm.requests.v1";
  qm_event_meta_init(&ev.meta, "unit", "qm.request.submitted.v1", "req-1", NULL);
  qm_strlcpy(ev.meta.id, id, sizeof(ev.meta.id));
  ev.key = key;
  ev.key_len = strlen(key);
  ev.payload = id;
  ev.payload_len = strlen(id);
  return ev;
}

static void add_in_tx(qm_pg_t *c, const char *id, const char *key) {
  qm_event_out_t ev = make_event(id, key);
  cr_assert_eq(qm_outbox_add(c, &ev, errstr, sizeof(errstr)), QM_OK, "add %s: %s", id, errstr);
}

static void add_committed(qm_pg_t *c, const char *id, const char *key) {
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  add_in_tx(c, id, key);
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
}

static qm_relay_t *make_relay(rec_t *rec, int batch, const char *app) {
  qm_relay_conf_t conf = {.batch = batch, .app_name = app, .lock_retry_ms = 100};
  qm_relay_t *r = qm_relay_new(UNIT_DSN, schema, rec_publish, rec, &conf);
  cr_assert_not_null(r);
  return r;
}

/* Steps the relay until rec holds want events (bounded wait). */
static void run_until(qm_relay_t *r, rec_t *rec, size_t want) {
  int64_t deadline = qm_mono_ms() + 15000;
  while (rec_count(rec) < want && qm_mono_ms() < deadline) {
    size_t n = 0;
    int rc = qm_relay_run_once(r, &n);
    if (rc != QM_OK || n == 0) usleep(20000);
  }
  cr_assert_eq(rec_count(rec), want, "published %zu events, expected %zu", rec_count(rec), want);
}

static int64_t unpublished(void) {
  return query_int(admin, "SELECT count(*) FROM outbox WHERE published_at IS NULL");
}

/* ---- tests --------------------------------------------------------------------- */

Test(outbox, event_round_trips_binary_safe) {
  qm_pg_t *c = must_connect();
  static const unsigned char key[] = {'p', 0, '1', 0xfe};
  static const unsigned char payload[] = {0x08, 0x00, 0x12, 0x00, 0xff, 0x0a};
  static const unsigned char hv[] = {0, 1, 2, '"', '\\', 0xc3};
  qm_header_t hdrs[] = {{"qm_dlq_error", hv, sizeof(hv)}, {"x-empty", "", 0}};
  qm_event_out_t ev;
  memset(&ev, 0, sizeof(ev));
  ev.topic = "qm.access.v1";
  qm_event_meta_init(&ev.meta, "unit", "qm.access.granted.v1", "req-42", NULL);
  ev.key = key;
  ev.key_len = sizeof(key);
  ev.payload = payload;
  ev.payload_len = sizeof(payload);
  ev.headers = hdrs;
  ev.n_headers = 2;
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_outbox_add(c, &ev, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);

  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  run_until(r, &rec, 1);
  cr_assert_str_eq(rec.topic, "qm.access.v1");
  cr_assert_str_eq(rec.meta.id, ev.meta.id);
  cr_assert_str_eq(rec.meta.source, "/qm/unit");
  cr_assert_str_eq(rec.meta.type, "qm.access.granted.v1");
  cr_assert_str_eq(rec.meta.subject, "req-42");
  cr_assert_eq(rec.meta.time_ms, ev.meta.time_ms);
  cr_assert_str_eq(rec.meta.content_type, QM_CONTENT_TYPE_PROTOBUF);
  cr_assert_str_eq(rec.meta.traceparent, ev.meta.traceparent);
  cr_assert_eq(rec.key_len, sizeof(key));
  cr_assert_eq(memcmp(rec.key, key, sizeof(key)), 0, "key must be byte-exact");
  cr_assert_eq(rec.payload_len, sizeof(payload));
  cr_assert_eq(memcmp(rec.payload, payload, sizeof(payload)), 0, "payload must be byte-exact");
  cr_assert_eq(rec.n_headers, 2);
  cr_assert_str_eq(rec.hname[0], "qm_dlq_error");
  cr_assert_eq(rec.hval_len[0], sizeof(hv));
  cr_assert_eq(memcmp(rec.hval[0], hv, sizeof(hv)), 0, "header value must be byte-exact");
  cr_assert_str_eq(rec.hname[1], "x-empty");
  cr_assert_eq(rec.hval_len[1], 0);
  cr_assert_eq(unpublished(), 0);
  qm_relay_stats_t st;
  qm_relay_stats(r, &st);
  cr_assert_eq(st.published_total, 1);
  cr_assert(st.leader);
  qm_relay_destroy(r);
}

/* Regression: a dead letter (qm_dlq_build() output: no meta of its own, the
 * original headers verbatim) must be accepted and published without ce_*
 * attributes of its own; refusing it stalled every consumer on one poison
 * message. */
Test(outbox, dead_letter_without_own_meta_round_trips) {
  qm_pg_t *c = must_connect();
  static const char orig_id[] = "6f1c2f4e-3d1b-4f7a-9a57-6e0f3b9d2c11";
  qm_header_t hdrs[] = {{"ce_id", orig_id, sizeof(orig_id) - 1},
                        {"qm_dlq_error", "payload is not a qm.v1.RequestEvent", 35}};
  qm_event_out_t ev;
  memset(&ev, 0, sizeof(ev));
  ev.topic = "qm.requests.v1.dlq";
  ev.key = "p-0007";
  ev.key_len = 6;
  ev.payload = "\xff\xfe";
  ev.payload_len = 2;
  ev.headers = hdrs;
  ev.n_headers = 2;
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_outbox_add(c, &ev, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  run_until(r, &rec, 1);
  cr_assert_str_eq(rec.topic, "qm.requests.v1.dlq");
  cr_assert_str_eq(rec.meta.id, "", "a dead letter gets no ce_id of its own");
  cr_assert_str_eq(rec.meta.type, "");
  cr_assert_eq(rec.n_headers, 2);
  cr_assert_str_eq(rec.hname[0], "ce_id");
  cr_assert_str_eq(rec.hname[1], "qm_dlq_error");
  qm_relay_destroy(r);
  /* Neither half-filled meta nor an empty event without headers is accepted. */
  ev.n_headers = 0;
  cr_assert_eq(qm_outbox_add(admin, &ev, errstr, sizeof(errstr)), QM_EINVAL);
  ev.n_headers = 2;
  qm_strlcpy(ev.meta.type, "qm.x.v1", sizeof(ev.meta.type));
  cr_assert_eq(qm_outbox_add(admin, &ev, errstr, sizeof(errstr)), QM_EINVAL);
}

Test(outbox, add_validates) {
  qm_event_out_t ev = make_event("", "k");
  cr_assert_eq(qm_outbox_add(admin, &ev, errstr, sizeof(errstr)), QM_EINVAL);
  ev = make_event("e1", "k");
  ev.topic = NULL;
  cr_assert_eq(qm_outbox_add(admin, &ev, errstr, sizeof(errstr)), QM_EINVAL);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM outbox"), 0);
}

Test(outbox, rolled_back_rows_are_never_published) {
  qm_pg_t *c = must_connect();
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  add_in_tx(c, "rolled-back", "k");
  cr_assert_eq(qm_pg_rollback(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  add_committed(c, "committed", "k");
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  run_until(r, &rec, 1);
  cr_assert_str_eq(rec.ids[0], "committed");
  for (int i = 0; i < 3; i++) {
    size_t n = 99;
    cr_assert_eq(qm_relay_run_once(r, &n), QM_OK);
    cr_assert_eq(n, 0);
  }
  cr_assert_eq(rec_count(&rec), 1, "the rolled-back row must never be published");
  qm_relay_destroy(r);
}

/* No gap: a row whose transaction commits after a later id's is still
 * published, exactly once; the committed one does not wait for it. */
Test(outbox, in_flight_lower_id_is_not_skipped) {
  qm_pg_t *a = must_connect();
  qm_pg_t *b = must_connect();
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);

  /* A takes the lower id and stays open; B commits a higher id. */
  cr_assert_eq(qm_pg_begin(a, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  add_in_tx(a, "a-lower", "k");
  add_committed(b, "b-higher", "k");
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM outbox"), 1, "only B is visible");
  run_until(r, &rec, 1);
  cr_assert_str_eq(rec.ids[0], "b-higher", "B committed first: it goes out first");

  cr_assert_eq(qm_pg_commit(a, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  run_until(r, &rec, 2);
  cr_assert_str_eq(rec.ids[1], "a-lower", "A's lower id is not skipped");
  for (int i = 0; i < 3; i++) {
    size_t n = 99;
    cr_assert_eq(qm_relay_run_once(r, &n), QM_OK);
    cr_assert_eq(n, 0);
  }
  cr_assert_eq(rec_count(&rec), 2, "each exactly once");
  cr_assert_eq(unpublished(), 0);
  qm_relay_destroy(r);
}

Test(outbox, per_key_order_across_batches) {
  qm_pg_t *c = must_connect();
  char id[16];
  for (int i = 0; i < 10; i++) {
    snprintf(id, sizeof(id), "e%02d", i);
    if (i % 3 == 0) {
      add_committed(c, id, "person-1");
    } else { /* several per transaction too */
      cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
      add_in_tx(c, id, "person-1");
      snprintf(id, sizeof(id), "o%02d", i);
      add_in_tx(c, id, "person-2");
      cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
    }
  }
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 3, NULL);
  run_until(r, &rec, 16);
  cr_assert_leq(rec.max_batch, 3, "batches are bounded");
  cr_assert_geq(rec.calls, 6);
  int next_e = 0, next_o = 1;
  for (size_t i = 0; i < rec.n; i++) {
    int num = (int)strtol(rec.ids[i] + 1, NULL, 10);
    if (rec.ids[i][0] == 'e') {
      cr_assert_eq(num, next_e, "person-1 out of order at %zu: %s", i, rec.ids[i]);
      next_e++;
    } else {
      cr_assert_eq(num, next_o, "person-2 out of order at %zu: %s", i, rec.ids[i]);
      next_o++;
      if (next_o % 3 == 0) next_o++;
    }
  }
  cr_assert_eq(next_e, 10);
  qm_relay_destroy(r);
}

Test(outbox, publish_failure_keeps_failed_and_later_rows) {
  qm_pg_t *c = must_connect();
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  const char *ids[] = {"f0", "f1", "f2", "f3", "f4", "f5"};
  for (int i = 0; i < 6; i++) add_in_tx(c, ids[i], i % 2 ? "k1" : "k2");
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);

  rec_t rec;
  rec_init(&rec);
  qm_strlcpy(rec.fail_id, "f3", sizeof(rec.fail_id));
  rec.fail_times = 1;
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  int64_t deadline = qm_mono_ms() + 15000;
  size_t n = 0;
  int rc;
  while ((rc = qm_relay_run_once(r, &n)) == QM_OK && n == 0 && qm_mono_ms() < deadline)
    usleep(20000);
  cr_assert_eq(rc, QM_ETRANSIENT, "the publisher's error is returned: %s", qm_strerror(rc));
  cr_assert_eq(n, 3, "rows before the failure are marked published");
  cr_assert_eq(unpublished(), 3, "the failed row and the ones after it stay unpublished");
  qm_relay_stats_t st;
  qm_relay_stats(r, &st);
  cr_assert_eq(st.publish_failures, 1);
  cr_assert_eq(st.published_total, 3);
  cr_assert_eq(st.last_batch_size, 6);

  cr_assert_eq(qm_relay_run_once(r, &n), QM_OK);
  cr_assert_eq(n, 3, "the retry publishes from the failed row on");
  cr_assert_eq(rec_count(&rec), 6);
  for (int i = 0; i < 6; i++) cr_assert_str_eq(rec.ids[i], ids[i], "order at %d", i);
  cr_assert_eq(unpublished(), 0);
  qm_relay_destroy(r);
}

Test(outbox, lag_gauge_reports_oldest_unpublished) {
  qm_pg_t *c = must_connect();
  add_committed(c, "slow", "k");
  usleep(300000);
  rec_t rec;
  rec_init(&rec);
  qm_strlcpy(rec.fail_id, "slow", sizeof(rec.fail_id));
  rec.fail_times = 1000;
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  size_t n = 0;
  int64_t deadline = qm_mono_ms() + 15000;
  qm_relay_stats_t st;
  do {
    qm_relay_run_once(r, &n);
    qm_relay_stats(r, &st);
  } while (st.last_batch_size == 0 && qm_mono_ms() < deadline);
  cr_assert_geq(st.oldest_unpublished_age_ms, 250, "age %lld",
                (long long)st.oldest_unpublished_age_ms);
  cr_assert_lt(st.oldest_unpublished_age_ms, 60000);
  rec.fail_times = 0;
  run_until(r, &rec, 1);
  cr_assert_eq(qm_relay_run_once(r, &n), QM_OK);
  qm_relay_stats(r, &st);
  cr_assert_eq(st.oldest_unpublished_age_ms, 0);
  qm_relay_destroy(r);
}

/* Regression: a long-running writing transaction elsewhere on the server
 * must not hold back publication (with an xmin rule it stalled every relay). */
Test(outbox, long_transaction_elsewhere_does_not_hold_back_publication) {
  qm_pg_t *c = must_connect();
  qm_pg_t *other = must_connect();
  cr_assert_eq(qm_pg_begin(other, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_pg_exec_simple(other, "SELECT pg_current_xact_id()", errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  add_committed(c, "not-held", "k");
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  run_until(r, &rec, 1);
  cr_assert_str_eq(rec.ids[0], "not-held");
  cr_assert_eq(qm_pg_rollback(other, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  qm_relay_destroy(r);
}

/* Terminates the backends whose application_name is app. */
static void kill_app(const char *app) {
  qm_pg_param_t p[] = {QM_PG_TEXT(app)};
  qm_pg_result_t *res = NULL;
  cr_assert_eq(qm_pg_exec(admin,
                          "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                          "pg_stat_activity WHERE application_name = $1) t",
                          p, 1, &res, errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_str_eq(qm_pg_get(res, 0, 0), "1", "exactly one backend of %s", app);
  qm_pg_result_destroy(res);
}

Test(outbox, one_leader_and_takeover) {
  qm_pg_t *c = must_connect();
  char app_a[80], app_b[80];
  snprintf(app_a, sizeof(app_a), "qm-unit-relay-a-%d", (int)getpid());
  snprintf(app_b, sizeof(app_b), "qm-unit-relay-b-%d", (int)getpid());
  rec_t ra, rb;
  rec_init(&ra);
  rec_init(&rb);
  qm_relay_t *a = make_relay(&ra, 10, app_a);
  qm_relay_t *b = make_relay(&rb, 10, app_b);

  add_committed(c, "x1", "k");
  run_until(a, &ra, 1);
  size_t n = 0;
  cr_assert_eq(qm_relay_run_once(b, &n), QM_ECONFLICT, "B must stand by while A leads");
  add_committed(c, "x2", "k");
  run_until(a, &ra, 2);
  cr_assert_eq(qm_relay_run_once(b, &n), QM_ECONFLICT);
  cr_assert_eq(rec_count(&rb), 0, "the standby publishes nothing");
  qm_relay_stats_t sa, sb;
  qm_relay_stats(a, &sa);
  qm_relay_stats(b, &sb);
  cr_assert(sa.leader);
  cr_assert(!sb.leader);

  /* A's session dies: its lock goes with it and B takes over. */
  kill_app(app_a);
  add_committed(c, "x3", "k");
  run_until(b, &rb, 1);
  cr_assert_str_eq(rb.ids[0], "x3");
  qm_relay_stats(b, &sb);
  cr_assert(sb.leader);
  int rc = qm_relay_run_once(a, &n);
  cr_assert(rc == QM_ETRANSIENT || rc == QM_ECONFLICT, "A: %s", qm_strerror(rc));
  rc = qm_relay_run_once(a, &n);
  cr_assert_eq(rc, QM_ECONFLICT, "A reconnected and now stands by: %s", qm_strerror(rc));
  qm_relay_stats(a, &sa);
  cr_assert(!sa.leader);
  add_committed(c, "x4", "k");
  run_until(b, &rb, 2);
  cr_assert_eq(rec_count(&ra), 2, "each event published exactly once across relays");
  cr_assert_str_eq(ra.ids[0], "x1");
  cr_assert_str_eq(ra.ids[1], "x2");
  cr_assert_str_eq(rb.ids[1], "x4");
  qm_relay_destroy(a);
  qm_relay_destroy(b);
}

Test(outbox, thread_wakes_on_notify_and_drains_on_stop) {
  qm_pg_t *c = must_connect();
  rec_t rec;
  rec_init(&rec);
  /* A long poll interval: only the NOTIFY can make publication fast. */
  qm_relay_conf_t conf = {.batch = 5, .poll_ms = 10000};
  qm_relay_t *r = qm_relay_new(UNIT_DSN, schema, rec_publish, &rec, &conf);
  cr_assert_not_null(r);
  cr_assert_eq(qm_relay_start(r), QM_OK);
  cr_assert_eq(qm_relay_start(r), QM_ECONFLICT);
  qm_relay_stats_t st;
  int64_t deadline = qm_mono_ms() + 10000;
  do {
    usleep(10000);
    qm_relay_stats(r, &st);
  } while (!st.leader && qm_mono_ms() < deadline);
  cr_assert(st.leader, "the only relay must lead");
  usleep(100000); /* let it reach its wait */

  int64_t t0 = qm_mono_ms();
  add_committed(c, "wake", "k");
  while (rec_count(&rec) < 1 && qm_mono_ms() - t0 < 5000) usleep(2000);
  cr_assert_eq(rec_count(&rec), 1);
  cr_assert_lt(qm_mono_ms() - t0, 3000, "NOTIFY must wake the relay well before poll_ms");

  /* Full batches loop at once; stop drains what is committed. */
  rec.sleep_ms = 30;
  cr_assert_eq(qm_pg_begin(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  char id[16];
  for (int i = 0; i < 40; i++) {
    snprintf(id, sizeof(id), "d%02d", i);
    add_in_tx(c, id, "k");
  }
  cr_assert_eq(qm_pg_commit(c, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_relay_stop(r, 20000), QM_OK);
  cr_assert_eq(rec_count(&rec), 41, "stop must drain the committed rows");
  for (int i = 0; i < 40; i++) {
    snprintf(id, sizeof(id), "d%02d", i);
    cr_assert_str_eq(rec.ids[i + 1], id);
  }
  qm_relay_stats(r, &st);
  cr_assert_eq(st.published_total, 41);
  cr_assert_eq(unpublished(), 0);
  qm_relay_destroy(r);
}

Test(outbox, purge_deletes_old_published_rows_only) {
  qm_pg_t *c = must_connect();
  add_committed(c, "p1", "k");
  add_committed(c, "p2", "k");
  rec_t rec;
  rec_init(&rec);
  qm_relay_t *r = make_relay(&rec, 10, NULL);
  run_until(r, &rec, 2);
  add_committed(c, "p3", "k"); /* unpublished */
  usleep(20000);
  cr_assert_eq(qm_outbox_purge(admin, 3600000, 100), 0, "recent rows are kept");
  cr_assert_eq(qm_outbox_purge(admin, 0, 1), 1, "limit is honoured");
  cr_assert_eq(qm_outbox_purge(admin, 0, 100), 1);
  cr_assert_eq(query_int(admin, "SELECT count(*) FROM outbox"), 1);
  cr_assert_eq(unpublished(), 1, "unpublished rows are never purged");
  qm_relay_destroy(r);
}
