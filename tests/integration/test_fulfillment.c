/*
 * test_fulfillment: qm-fulfillment against the real stack — inventory and the
 * all-or-nothing CSV import, reservation under concurrency (fifty at once
 * for three laptops), backorder to delivery through procurement, staging
 * routing, shipment and failed delivery (reship and reassign), the
 * check-out scan (match and mismatch), leaver recall, SLA breaches, the
 * loaner pool, and StockLevel reaching intake's catalog.
 *
 * Procurement and the carrier are the harness's HTTP recorder; the adapters
 * calling them are the service's real ones (libcurl). Carrier webhooks are
 * signed here with HMAC-SHA256 as a carrier would.
 */
#include "harness.h"

#include "qm_common.h"
#include "qm_topics.h"

#include "qm/v1/common.pb-c.h"
#include "qm/v1/decisions.pb-c.h"

#include <criterion/criterion.h>
#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WEBHOOK_SECRET "it-carrier-secret-0123456789"

typedef struct ff_ctx {
  it_recorder_t *rec;
  it_reader_t *events;
  char *admin; /* token: it_admin */
  int tracking;
} ff_ctx_t;

static ff_ctx_t *ctx_of(it_cases_t *cs) { return cs->ctx; }

/* A call as IT admin; the response is left in *r (clear it). */
static long admin(it_stack_t *st, it_cases_t *cs, const char *method, const char *path,
                  const char *body, it_resp_t *r) {
  return it_http(st, "fulfillment", method, path, ctx_of(cs)->admin, body, NULL, r);
}

static json_t *expect_json(it_cases_t *cs, it_stack_t *st, const char *method, const char *path,
                           const char *body, long want) {
  it_resp_t r;
  long got = admin(st, cs, method, path, body, &r);
  if (got != want) {
    char msg[600];
    snprintf(msg, sizeof(msg), "%s %s: %ld (want %ld): %.400s", method, path, got, want, r.body);
    it_resp_clear(&r);
    it_case_fail(cs, __FILE__, __LINE__, "%s", msg);
  }
  json_t *j = json_incref(r.json);
  it_resp_clear(&r);
  return j;
}

static const char *jstr(const json_t *o, const char *k) {
  const char *s = json_string_value(json_object_get(o, k));
  return s ? s : "";
}

static long import_csv(it_stack_t *st, it_cases_t *cs, const char *csv, it_resp_t *r) {
  const char *hdr[] = {"Content-Type: text/csv", NULL};
  return it_http(st, "fulfillment", "POST", "/v1/assets/import", ctx_of(cs)->admin, csv, hdr, r);
}

static void import_ok(it_stack_t *st, it_cases_t *cs, const char *csv, int n) {
  it_resp_t r;
  long got = import_csv(st, cs, csv, &r);
  IT_CHECK(cs, got == 201, "import: %ld %s", got, r.body);
  IT_CHECK(cs, json_integer_value(json_object_get(r.json, "imported")) == n, "imported: %s", r.body);
  it_resp_clear(&r);
}

static json_t *reserve(it_stack_t *st, it_cases_t *cs, const char *rid, const char *person,
                       const char *model, const char *location, const char *country) {
  char body[600];
  snprintf(body, sizeof(body),
           "{\"request_id\":\"%s\",\"line_no\":1,\"person_id\":\"%s\",\"model_id\":\"%s\","
           "\"location\":\"%s\",\"country\":\"%s\",\"item_id\":\"it-item\"}",
           rid, person, model, location, country);
  return expect_json(cs, st, "POST", "/v1/reservations", body, 201);
}

static json_t *task(it_stack_t *st, it_cases_t *cs, long long id) {
  char path[64];
  snprintf(path, sizeof(path), "/v1/tasks/%lld", id);
  return expect_json(cs, st, "GET", path, NULL, 200);
}

static long long task_id(const json_t *t) { return json_integer_value(json_object_get(t, "id")); }

/* Polls the task until its step is want. Returns it (caller frees). */
static json_t *wait_step(it_stack_t *st, it_cases_t *cs, long long id, const char *want,
                         int timeout_ms) {
  int64_t until = it_now_ms() + timeout_ms;
  for (;;) {
    json_t *t = task(st, cs, id);
    if (!strcmp(jstr(t, "step"), want)) return t;
    if (it_now_ms() > until) {
      char *txt = it_json_text(t);
      char msg[900];
      snprintf(msg, sizeof(msg), "task %lld never reached %s: %.700s", id, want, txt);
      free(txt);
      json_decref(t);
      it_case_fail(cs, __FILE__, __LINE__, "%s", msg);
    }
    json_decref(t);
    it_sleep_ms(100);
  }
}

static json_t *task_post(it_stack_t *st, it_cases_t *cs, long long id, const char *action,
                         const char *body, long want) {
  char path[96];
  snprintf(path, sizeof(path), "/v1/tasks/%lld/%s", id, action);
  return expect_json(cs, st, "POST", path, body, want);
}

/* The carrier will answer the next shipment with a fresh tracking number. */
static void next_tracking(it_cases_t *cs, char *out, size_t n) {
  snprintf(out, n, "TRK%06d", ++ctx_of(cs)->tracking);
  char body[200];
  snprintf(body, sizeof(body),
           "{\"tracking_number\":\"%s\",\"label_url\":\"https://carrier.test/labels/%s.pdf\"}", out,
           out);
  it_recorder_set_response(ctx_of(cs)->rec, "/shipments", 201, body);
}

/* A tracking update signed with secret, X-QM-Timestamp ts (as sent). */
static long webhook_ts(it_stack_t *st, const char *tracking, const char *status, const char *reason,
                       const char *secret, const char *ts, it_resp_t *r) {
  char body[300], sig[80], hdr_ts[64], hdr_sig[128];
  snprintf(body, sizeof(body), "{\"tracking_number\":\"%s\",\"status\":\"%s\",\"reason\":\"%s\"}",
           tracking, status, reason);
  char msg[400];
  snprintf(msg, sizeof(msg), "%s.%s", ts, body);
  unsigned char mac[32];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)msg, strlen(msg), mac, &len);
  strcpy(sig, "sha256=");
  for (int i = 0; i < 32; i++) snprintf(sig + 7 + 2 * i, 3, "%02x", mac[i]);
  snprintf(hdr_ts, sizeof(hdr_ts), "X-QM-Timestamp: %s", ts);
  snprintf(hdr_sig, sizeof(hdr_sig), "X-QM-Signature: %s", sig);
  const char *hdrs[] = {hdr_ts, hdr_sig, NULL};
  return it_http(st, "fulfillment", "POST", "/v1/webhooks/carrier", NULL, body, hdrs, r);
}

/* A tracking update signed with secret, its timestamp skew_s seconds off now. */
static long webhook_at(it_stack_t *st, const char *tracking, const char *status, const char *reason,
                       const char *secret, long skew_s, it_resp_t *r) {
  char ts[32];
  snprintf(ts, sizeof(ts), "%lld", (long long)time(NULL) + skew_s);
  return webhook_ts(st, tracking, status, reason, secret, ts, r);
}

static long webhook(it_stack_t *st, const char *tracking, const char *status, const char *reason,
                    const char *secret, it_resp_t *r) {
  return webhook_at(st, tracking, status, reason, secret, 0, r);
}

static char *po_status_of(it_stack_t *st, const char *po) {
  char sql[300];
  snprintf(sql, sizeof(sql), "SELECT status FROM fulfillment.purchase_orders WHERE po_id = '%s'", po);
  return it_pg_scalar(st, sql);
}

static int events_of(it_cases_t *cs, const char *type, const char *subject, int min, int timeout) {
  json_t *pat = subject ? json_pack("{s:s, s:s}", "ce_type", type, "ce_subject", subject)
                        : json_pack("{s:s}", "ce_type", type);
  int n = it_reader_wait(ctx_of(cs)->events, pat, min, timeout);
  json_decref(pat);
  return n;
}

/* ------------------------------------------------------------------ cases */

static void c_setup(it_stack_t *st, it_cases_t *cs) {
  json_t *j;
  j = expect_json(cs, st, "PUT", "/v1/sites/hq",
                  "{\"name\":\"Amsterdam HQ\",\"kind\":\"central\",\"country\":\"NL\","
                  "\"locations\":[\"Amsterdam\"]}", 200);
  json_decref(j);
  j = expect_json(cs, st, "PUT", "/v1/sites/lon",
                  "{\"name\":\"London office\",\"kind\":\"regional\",\"country\":\"GB\","
                  "\"locations\":[\"London\",\"Reading\"]}", 200);
  json_decref(j);
  static const char *const models[][2] = {
      {"lat-7450", "{\"name\":\"Latitude 7450\",\"item_type\":\"laptop\",\"cost\":1499,"
                   "\"attributes\":{\"ram\":\"16GB\"}}"},
      {"lat-conc", "{\"name\":\"Contended laptop\",\"item_type\":\"laptop\",\"cost\":1200}"},
      {"lat-ev", "{\"name\":\"Contended laptop, event path\",\"item_type\":\"laptop\",\"cost\":1200}"},
      {"mbp-16-m3", "{\"name\":\"MacBook Pro 16\",\"item_type\":\"laptop\",\"cost\":3199}"},
      {"iphone-15", "{\"name\":\"iPhone 15\",\"item_type\":\"phone\",\"cost\":799}"},
      {"pixel-9", "{\"name\":\"Pixel 9\",\"item_type\":\"phone\",\"cost\":699}"},
      {"u2723qe", "{\"name\":\"Dell U2723QE\",\"item_type\":\"monitor\",\"cost\":349}"},
      {"proj-1", "{\"name\":\"Projector\",\"item_type\":\"projector\",\"loaner\":true}"},
  };
  for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++) {
    char path[64];
    snprintf(path, sizeof(path), "/v1/models/%s", models[i][0]);
    j = expect_json(cs, st, "PUT", path, models[i][1], 200);
    json_decref(j);
  }
  /* Bad input changes nothing and names the field. */
  j = expect_json(cs, st, "PUT", "/v1/sites/x", "{\"name\":\"X\",\"kind\":\"moon\"}", 400);
  IT_CHECK(cs, strstr(json_dumps(j, 0), "kind") != NULL, "problem names kind");
  json_decref(j);
}

static void c_csv_bad_rows(it_stack_t *st, it_cases_t *cs) {
  /* Line 3: bad tag; line 4: serial repeats line 2; line 5: unknown model;
   * line 6: a quoted field with a comma in it is fine for the parser but
   * too few fields; the rest is good. Nothing may be imported. */
  const char *csv = "tag,serial,model_id,site_id\n"
                    "LT-000101,SN-A-0001,lat-7450,hq\n"
                    "bad tag,SN-A-0002,lat-7450,hq\n"
                    "LT-000103,SN-A-0001,lat-7450,hq\n"
                    "LT-000104,SN-A-0004,no-such-model,hq\n"
                    "\"LT-000105,x\",SN-A-0005\n"
                    "LT-000106,SN-A-0006,lat-7450,hq\n";
  it_resp_t r;
  long got = import_csv(st, cs, csv, &r);
  IT_CHECK(cs, got == 400, "bad import answered %ld: %s", got, r.body);
  IT_CHECK(cs, strstr(r.content_type, "application/problem+json") != NULL, "type %s", r.content_type);
  const char *want[] = {"line 3: tag", "line 4: serial", "line 5: model_id", "line 6: row"};
  for (size_t i = 0; i < 4; i++)
    IT_CHECK(cs, strstr(r.body, want[i]) != NULL, "problem lacks '%s': %s", want[i], r.body);
  IT_CHECK(cs, strstr(r.body, "line 2:") == NULL && strstr(r.body, "line 7:") == NULL,
           "good lines reported: %s", r.body);
  it_resp_clear(&r);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.assets") == 0,
           "a bad file imported something");
  /* Malformed CSV (an unterminated quote) is refused as a whole too. */
  got = import_csv(st, cs, "tag,serial,model_id,site_id\nLT-000201,\"SN-open,lat-7450,hq\n", &r);
  IT_CHECK(cs, got == 400, "malformed CSV answered %ld: %s", got, r.body);
  it_resp_clear(&r);
  /* The same rows fixed import, quoted fields included. */
  import_ok(st, cs,
            "serial,tag,model_id,site_id\r\n"
            "SN-A-0001,LT-000101,lat-7450,hq\r\n"
            "\"SN-A-0002\",LT-000102,lat-7450,\"hq\"\r\n", 2);
  json_t *a = expect_json(cs, st, "GET", "/v1/assets/LT-000102", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(a, "status"), "in_stock") && !strcmp(jstr(a, "serial"), "SN-A-0002"),
           "asset: %s", json_dumps(a, 0));
  IT_CHECK(cs, json_array_size(json_object_get(a, "history")) == 1, "history of an import");
  json_decref(a);
  /* A repeat of a tag already in the inventory is refused by line. */
  got = import_csv(st, cs, "tag,serial,model_id,site_id\nLT-000101,SN-Z-0009,lat-7450,hq\n", &r);
  IT_CHECK(cs, got == 400 && strstr(r.body, "line 2: tag"), "duplicate tag: %ld %s", got, r.body);
  it_resp_clear(&r);
}

typedef struct conc {
  it_stack_t *st;
  const char *token;
  int index;
  int port; /* 0: the stack's instance; else a second instance's port */
  long status;
  char outcome[32];
  char tag[64];
} conc_t;

static size_t conc_sink(char *p, size_t sz, size_t n, void *ud) {
  char *buf = ud;
  size_t have = strlen(buf), add = sz * n;
  if (have + add < 4096) {
    memcpy(buf + have, p, add);
    buf[have + add] = 0;
  }
  return sz * n;
}

/* POST to another instance's port (it_http knows the stack's only). */
static long post_port(int port, const char *token, const char *path, const char *body,
                      char *resp) {
  CURL *h = curl_easy_init();
  char url[128], auth[1200];
  snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", port, path);
  snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
  struct curl_slist *hl = curl_slist_append(NULL, auth);
  hl = curl_slist_append(hl, "Content-Type: application/json");
  resp[0] = 0;
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 60L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, conc_sink);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, resp);
  long code = 0;
  if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
  curl_slist_free_all(hl);
  curl_easy_cleanup(h);
  return code;
}

static void *conc_main(void *arg) {
  conc_t *c = arg;
  char body[400];
  snprintf(body, sizeof(body),
           "{\"request_id\":\"conc-%02d\",\"line_no\":1,\"person_id\":\"p-%04d\","
           "\"model_id\":\"lat-conc\",\"location\":\"Amsterdam\",\"country\":\"NL\"}",
           c->index, 200 + c->index);
  if (c->port) {
    char resp[4096];
    c->status = post_port(c->port, c->token, "/v1/reservations", body, resp);
    json_t *j = json_loads(resp, 0, NULL);
    snprintf(c->outcome, sizeof(c->outcome), "%s", jstr(j, "outcome"));
    snprintf(c->tag, sizeof(c->tag), "%s", jstr(j, "asset_tag"));
    json_decref(j);
    return NULL;
  }
  it_resp_t r;
  c->status = it_http(c->st, "fulfillment", "POST", "/v1/reservations", c->token, body, NULL, &r);
  snprintf(c->outcome, sizeof(c->outcome), "%s", jstr(r.json, "outcome"));
  snprintf(c->tag, sizeof(c->tag), "%s", jstr(r.json, "asset_tag"));
  it_resp_clear(&r);
  return NULL;
}

static void c_concurrency(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs,
            "tag,serial,model_id,site_id\n"
            "LC-000001,SN-C-0001,lat-conc,hq\nLC-000002,SN-C-0002,lat-conc,hq\n"
            "LC-000003,SN-C-0003,lat-conc,hq\n", 3);
  /* Two instances of the service share the work, as in production: odd
   * requests go to the second one. */
  const char *extra[] = {"QM_HTTP_THREADS=8", "QM_PG_POOL_SIZE=6", "QM_FULFILLMENT_WORKERS=1", NULL};
  it_instance_t *b = it_instance_start(st, "fulfillment", "b", extra);
  enum { N = 50 };
  conc_t c[N];
  pthread_t th[N];
  for (int i = 0; i < N; i++) {
    c[i] = (conc_t){.st = st, .token = ctx_of(cs)->admin, .index = i,
                    .port = i % 2 ? it_instance_port(b) : 0};
    pthread_create(&th[i], NULL, conc_main, &c[i]);
  }
  for (int i = 0; i < N; i++) pthread_join(th[i], NULL);
  it_instance_stop(b);
  int reserved = 0, backordered = 0;
  json_t *tags = json_object();
  for (int i = 0; i < N; i++) {
    IT_CHECK(cs, c[i].status == 201, "request %d answered %ld", i, c[i].status);
    if (!strcmp(c[i].outcome, "reserved")) {
      reserved++;
      IT_CHECK(cs, json_object_get(tags, c[i].tag) == NULL, "asset %s reserved twice", c[i].tag);
      json_object_set_new(tags, c[i].tag, json_true());
    } else if (!strcmp(c[i].outcome, "backordered")) {
      backordered++;
    }
  }
  json_decref(tags);
  IT_CHECK(cs, reserved == 3 && backordered == 47, "reserved %d, backordered %d", reserved,
           backordered);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.assets WHERE model_id = 'lat-conc'"
                             " AND status = 'reserved'") == 3, "3 assets reserved in the database");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(DISTINCT asset_id) FROM fulfillment.tasks"
                             " WHERE asset_model = 'lat-conc'") == 3, "3 distinct assets on tasks");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.purchase_orders"
                             " WHERE model_id = 'lat-conc'") == 47, "47 purchase orders");
  /* Every purchase order reaches procurement once, with its idempotency key. */
  IT_CHECK(cs, it_recorder_wait(ctx_of(cs)->rec, "/purchase-orders", 47, 60000),
           "procurement got %zu purchase orders", it_recorder_count(ctx_of(cs)->rec, "/purchase-orders"));
  json_t *reqs = it_recorder_requests(ctx_of(cs)->rec, "/purchase-orders");
  json_t *keys = json_object();
  size_t i;
  json_t *rq;
  json_array_foreach(reqs, i, rq) {
    const char *k = jstr(json_object_get(rq, "headers"), "idempotency-key");
    IT_CHECK(cs, !strncmp(k, "purchase_order-", 15), "idempotency key '%s'", k);
    json_object_set_new(keys, k, json_true());
  }
  IT_CHECK(cs, json_object_size(keys) == 47, "%zu distinct purchase orders sent", json_object_size(keys));
  json_decref(keys);
  json_decref(reqs);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.reserved.v1", NULL, 3, 30000) >= 3, "reserved events");
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.backordered.v1", NULL, 47, 30000) >= 47,
           "backordered events");
  /* Stock levels: the last one published for lat-conc@hq says none left. */
  json_t *st_resp = expect_json(cs, st, "GET", "/v1/stock?model_id=lat-conc", NULL, 200);
  json_t *row = json_array_get(json_object_get(st_resp, "items"), 0);
  IT_CHECK(cs, json_integer_value(json_object_get(row, "available")) == 0 &&
                   json_integer_value(json_object_get(row, "committed")) == 3 &&
                   json_integer_value(json_object_get(row, "on_order")) == 47,
           "stock: %s", json_dumps(st_resp, 0));
  json_decref(st_resp);
}

static void c_backorder_to_delivery(it_stack_t *st, it_cases_t *cs) {
  json_t *t = reserve(st, cs, "bo-1", "p-0301", "iphone-15", "London", "GB");
  IT_CHECK(cs, !strcmp(jstr(t, "outcome"), "backordered"), "outcome %s", jstr(t, "outcome"));
  long long id = task_id(t);
  char po[64];
  snprintf(po, sizeof(po), "%s", jstr(t, "purchase_order_id"));
  IT_CHECK(cs, po[0], "no purchase order");
  IT_CHECK(cs, !strcmp(jstr(t, "site_id"), "lon"), "PO for site %s", jstr(t, "site_id"));
  json_decref(t);
  /* Procurement receives it (the real libcurl adapter) and it is 'sent'. */
  int64_t until = it_now_ms() + 30000;
  char *body = NULL;
  while (!body && it_now_ms() < until) {
    json_t *reqs = it_recorder_requests(ctx_of(cs)->rec, "/purchase-orders");
    size_t i;
    json_t *rq;
    json_array_foreach(reqs, i, rq) if (strstr(jstr(rq, "body"), po)) body = strdup(jstr(rq, "body"));
    json_decref(reqs);
    if (!body) it_sleep_ms(100);
  }
  json_t *pob = body ? json_loads(body, 0, NULL) : NULL;
  IT_CHECK(cs, pob && !strcmp(jstr(pob, "model_id"), "iphone-15") && !strcmp(jstr(pob, "site_id"), "lon") &&
                   json_integer_value(json_object_get(pob, "quantity")) == 1,
           "PO body %s", body ? body : "none");
  json_decref(pob);
  free(body);
  char *s = NULL;
  until = it_now_ms() + 15000;
  while (it_now_ms() < until) {
    free(s);
    s = po_status_of(st, po);
    if (s && !strcmp(s, "sent")) break;
    it_sleep_ms(100);
  }
  IT_CHECK(cs, s && !strcmp(s, "sent"), "PO status %s", s ? s : "none");
  free(s);
  /* Procurement confirms with an ETA: the line shows it. */
  char path[128], req[600];
  snprintf(path, sizeof(path), "/v1/purchase-orders/%s/status", po);
  /* Assets listed on a status other than delivered are not received. */
  json_t *j = expect_json(cs, st, "POST", path,
                          "{\"status\":\"confirmed\",\"estimated_delivery\":\"2030-01-15T09:00:00Z\","
                          "\"assets\":[{\"tag\":\"PH-000901\",\"serial\":\"SN-P-0901\"}]}", 200);
  json_decref(j);
  snprintf(req, sizeof(req), "SELECT received FROM fulfillment.purchase_orders WHERE po_id = '%s'", po);
  IT_CHECK(cs, it_pg_int(st, req) == 0, "confirmed PO counts %lld received", it_pg_int(st, req));
  t = task(st, cs, id);
  IT_CHECK(cs, json_integer_value(json_object_get(t, "estimated_delivery_ms")) == 1894698000000LL,
           "eta %s", json_dumps(t, 0));
  json_decref(t);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.purchase_order_updated.v1", "bo-1", 1, 20000) >= 1,
           "PO update event");
  /* Bad delivery (bad serial) changes nothing. */
  j = expect_json(cs, st, "POST", path,
                  "{\"status\":\"delivered\",\"assets\":[{\"tag\":\"PH-000900\",\"serial\":\"x\"}]}", 400);
  json_decref(j);
  /* Delivered: the asset enters stock and goes to the waiting line. */
  j = expect_json(cs, st, "POST", path,
                  "{\"status\":\"delivered\",\"assets\":[{\"tag\":\"PH-000900\",\"serial\":\"SN-P-0900\"}]}", 200);
  json_decref(j);
  t = task(st, cs, id);
  IT_CHECK(cs, !strcmp(jstr(t, "step"), "queued") && !strcmp(jstr(t, "asset_tag"), "PH-000900"),
           "after delivery: %s", json_dumps(t, 0));
  json_decref(t);
  snprintf(req, sizeof(req), "SELECT received FROM fulfillment.purchase_orders WHERE po_id = '%s'", po);
  IT_CHECK(cs, it_pg_int(st, req) == 1, "delivered PO counts %lld received", it_pg_int(st, req));
  /* Staged, shipped through the carrier, delivered (signed webhook). */
  char trk[32];
  next_tracking(cs, trk, sizeof(trk));
  j = task_post(st, cs, id, "staging/start", NULL, 200);
  json_decref(j);
  j = task_post(st, cs, id, "staging/done", NULL, 200);
  json_decref(j);
  t = wait_step(st, cs, id, "shipped", 30000);
  IT_CHECK(cs, !strcmp(jstr(t, "tracking_number"), trk), "tracking %s", jstr(t, "tracking_number"));
  json_decref(t);
  it_resp_t r;
  long got = webhook(st, trk, "delivered", "", "wrong-secret", &r);
  IT_CHECK(cs, got == 401, "bad signature answered %ld", got);
  it_resp_clear(&r);
  got = webhook_at(st, trk, "delivered", "", WEBHOOK_SECRET, -3600, &r); /* a replay, an hour old */
  IT_CHECK(cs, got == 401, "stale signature answered %ld", got);
  it_resp_clear(&r);
  /* A timestamp whose milliseconds wrap a 64-bit integer round to about
   * now (2^64 / 1000 + now + 1 seconds): refused, never "within tolerance". */
  char wrap[40];
  snprintf(wrap, sizeof(wrap), "%llu", 18446744073709551ULL + (unsigned long long)time(NULL) + 1);
  got = webhook_ts(st, trk, "delivered", "", WEBHOOK_SECRET, wrap, &r);
  IT_CHECK(cs, got == 401, "timestamp %s answered %ld %s", wrap, got, r.body);
  it_resp_clear(&r);
  json_t *still = task(st, cs, id);
  IT_CHECK(cs, !strcmp(jstr(still, "step"), "shipped"), "a refused webhook changed the task");
  json_decref(still);
  got = webhook(st, trk, "delivered", "", WEBHOOK_SECRET, &r);
  IT_CHECK(cs, got == 200, "webhook %ld %s", got, r.body);
  it_resp_clear(&r);
  got = webhook(st, trk, "delivered", "", WEBHOOK_SECRET, &r); /* a repeat is harmless */
  IT_CHECK(cs, got == 200 && json_is_false(json_object_get(r.json, "applied")), "repeat %ld %s", got,
           r.body);
  it_resp_clear(&r);
  t = task(st, cs, id);
  IT_CHECK(cs, !strcmp(jstr(t, "state"), "done") && !strcmp(jstr(t, "step"), "delivered"),
           "after delivery %s", json_dumps(t, 0));
  json_decref(t);
  j = expect_json(cs, st, "GET", "/v1/assets/PH-000900", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(j, "status"), "assigned") && !strcmp(jstr(j, "assigned_to"), "p-0301"),
           "asset %s", json_dumps(j, 0));
  json_decref(j);
  snprintf(req, sizeof(req), "bo-1");
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.delivered.v1", req, 1, 20000) >= 1, "delivered event");
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.checked_out.v1", req, 1, 20000) >= 1, "assigned event");
}

static void c_staging_routing(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs,
            "tag,serial,model_id,site_id\n"
            "PX-000001,SN-X-0001,pixel-9,lon\nPX-000002,SN-X-0002,pixel-9,hq\n"
            "MB-000001,SN-M-0001,mbp-16-m3,hq\n", 3);
  /* London is served by the regional site: its team stages it there. */
  json_t *a = reserve(st, cs, "route-1", "p-0401", "pixel-9", "London", "GB");
  IT_CHECK(cs, !strcmp(jstr(a, "team"), "regional") && !strcmp(jstr(a, "site_id"), "lon") &&
                   !strcmp(jstr(a, "route"), "ship") && !strcmp(jstr(a, "asset_tag"), "PX-000001"),
           "London: %s", json_dumps(a, 0));
  /* Paris has no site of its own: central team, central stock. */
  json_t *b = reserve(st, cs, "route-2", "p-0402", "pixel-9", "Paris", "FR");
  IT_CHECK(cs, !strcmp(jstr(b, "team"), "central") && !strcmp(jstr(b, "site_id"), "hq") &&
                   !strcmp(jstr(b, "asset_tag"), "PX-000002"),
           "Paris: %s", json_dumps(b, 0));
  /* A high-value laptop gets an on-site appointment instead of shipping. */
  json_t *c = reserve(st, cs, "route-3", "p-0403", "mbp-16-m3", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(c, "route"), "onsite") && !strcmp(jstr(c, "team"), "central"),
           "high value: %s", json_dumps(c, 0));
  /* The queues show each team its own work. */
  json_t *qr = expect_json(cs, st, "GET", "/v1/queues/regional", NULL, 200);
  json_t *qc = expect_json(cs, st, "GET", "/v1/queues/central", NULL, 200);
  char *rt = json_dumps(qr, 0), *ct = json_dumps(qc, 0);
  IT_CHECK(cs, strstr(rt, "route-1") && !strstr(rt, "route-2") && !strstr(rt, "route-3"),
           "regional queue %s", rt);
  IT_CHECK(cs, strstr(ct, "route-2") && strstr(ct, "route-3") && !strstr(ct, "route-1"),
           "central queue %s", ct);
  free(rt);
  free(ct);
  json_decref(qr);
  json_decref(qc);
  /* Staging done on the on-site one schedules the appointment, no shipment. */
  size_t shipments = it_recorder_count(ctx_of(cs)->rec, "/shipments");
  json_t *d = task_post(st, cs, task_id(c), "staging/done",
                        "{\"appointment_at\":\"2030-02-01T10:00:00Z\"}", 200);
  IT_CHECK(cs, !strcmp(jstr(d, "step"), "appointment") &&
                   json_integer_value(json_object_get(d, "appointment_ms")) == 1896170400000LL,
           "appointment %s", json_dumps(d, 0));
  json_decref(d);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.appointment_scheduled.v1", "route-3", 1, 20000) >= 1,
           "appointment event");
  it_sleep_ms(300);
  IT_CHECK(cs, it_recorder_count(ctx_of(cs)->rec, "/shipments") == shipments, "on-site was shipped");
  json_decref(a);
  json_decref(b);
  json_decref(c);
}

static void c_scan(it_stack_t *st, it_cases_t *cs) {
  /* route-3 (the on-site MacBook MB-000001) is at its appointment. */
  char *id_s = it_pg_scalar(st, "SELECT seq FROM fulfillment.tasks WHERE request_id = 'route-3'");
  IT_CHECK(cs, id_s != NULL, "no task for route-3");
  long long id = atoll(id_s);
  free(id_s);
  import_ok(st, cs, "tag,serial,model_id,site_id\nMB-000002,SN-M-0002,mbp-16-m3,hq\n", 1);
  char path[64];
  snprintf(path, sizeof(path), "/v1/tasks/%lld/checkout", id);
  it_resp_t r;
  long got = admin(st, cs, "POST", path, "{\"tag\":\"MB-000002\"}", &r);
  IT_CHECK(cs, got == 409, "mismatch answered %ld %s", got, r.body);
  IT_CHECK(cs, strstr(r.content_type, "application/problem+json"), "type %s", r.content_type);
  IT_CHECK(cs, !strcmp(jstr(r.json, "type"), "https://quartermaster.dev/problems/asset-mismatch") &&
                   !strcmp(jstr(r.json, "expected_tag"), "MB-000001") &&
                   !strcmp(jstr(json_array_get(json_object_get(r.json, "errors"), 0), "field"), "tag"),
           "mismatch problem %s", r.body);
  it_resp_clear(&r);
  json_t *a = expect_json(cs, st, "GET", "/v1/assets/MB-000002", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(a, "status"), "in_stock"), "wrong asset changed: %s", json_dumps(a, 0));
  json_decref(a);
  json_t *t = task(st, cs, id);
  IT_CHECK(cs, !strcmp(jstr(t, "state"), "open"), "mismatch closed the task");
  json_decref(t);
  /* The right asset: assigned to the person, line done. */
  t = task_post(st, cs, id, "checkout", "{\"tag\":\"MB-000001\"}", 200);
  IT_CHECK(cs, !strcmp(jstr(t, "state"), "done") && !strcmp(jstr(t, "step"), "checked_out"),
           "checkout %s", json_dumps(t, 0));
  json_decref(t);
  a = expect_json(cs, st, "GET", "/v1/assets/MB-000001", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(a, "status"), "assigned") && !strcmp(jstr(a, "assigned_to"), "p-0403"),
           "asset %s", json_dumps(a, 0));
  json_decref(a);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.checked_out.v1", "route-3", 1, 20000) >= 1,
           "checked_out event");
  /* A second scan: the line is closed. */
  got = admin(st, cs, "POST", path, "{\"tag\":\"MB-000001\"}", &r);
  IT_CHECK(cs, got == 409, "second checkout %ld", got);
  it_resp_clear(&r);
}

static void ship_it(it_stack_t *st, it_cases_t *cs, long long id, char *trk, size_t n) {
  next_tracking(cs, trk, n);
  json_t *j = task_post(st, cs, id, "staging/done", NULL, 200);
  json_decref(j);
  j = wait_step(st, cs, id, "shipped", 30000);
  json_decref(j);
}

static void c_failed_delivery(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs, "tag,serial,model_id,site_id\nMO-000001,SN-O-0001,u2723qe,hq\n", 1);
  json_t *a = reserve(st, cs, "fail-1", "p-0501", "u2723qe", "Amsterdam", "NL");
  long long id = task_id(a);
  json_decref(a);
  char trk[32], trk2[32];
  size_t before = it_recorder_count(ctx_of(cs)->rec, "/shipments");
  ship_it(st, cs, id, trk, sizeof(trk));
  json_t *ship = it_recorder_requests(ctx_of(cs)->rec, "/shipments");
  json_t *last = json_array_get(ship, json_array_size(ship) - 1);
  IT_CHECK(cs, strstr(jstr(last, "body"), "MO-000001") && strstr(jstr(last, "body"), "p-0501"),
           "shipment body %s", jstr(last, "body"));
  json_decref(ship);
  /* Reship policy: back to stock, then shipped again with a new shipment. */
  next_tracking(cs, trk2, sizeof(trk2));
  it_resp_t r;
  long got = webhook(st, trk, "failed", "recipient not at home", WEBHOOK_SECRET, &r);
  IT_CHECK(cs, got == 200, "webhook %ld %s", got, r.body);
  it_resp_clear(&r);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.delivery_failed.v1", "fail-1", 1, 20000) >= 1,
           "delivery_failed event");
  json_t *t = wait_step(st, cs, id, "shipped", 30000);
  IT_CHECK(cs, !strcmp(jstr(t, "tracking_number"), trk2) && !strcmp(jstr(t, "asset_tag"), "MO-000001"),
           "reshipped %s", json_dumps(t, 0));
  json_decref(t);
  IT_CHECK(cs, it_recorder_count(ctx_of(cs)->rec, "/shipments") == before + 2, "two shipments");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.asset_history h JOIN fulfillment.assets a"
                             " USING (asset_id) WHERE a.tag = 'MO-000001' AND h.status = 'in_stock'"
                             " AND h.note LIKE 'delivery failed%'") == 1,
           "return to stock not in the history");
}

static void c_failed_delivery_reassign(it_stack_t *st, it_cases_t *cs) {
  it_service_setenv(st, "fulfillment", "QM_FAILED_DELIVERY=reassign");
  it_service_restart(st, "fulfillment");
  import_ok(st, cs, "tag,serial,model_id,site_id\nMO-000002,SN-O-0002,u2723qe,hq\n", 1);
  json_t *a = reserve(st, cs, "reas-1", "p-0601", "u2723qe", "Amsterdam", "NL");
  json_t *b = reserve(st, cs, "reas-2", "p-0602", "u2723qe", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(a, "asset_tag"), "MO-000002") && !strcmp(jstr(b, "outcome"), "backordered"),
           "setup %s / %s", json_dumps(a, 0), json_dumps(b, 0));
  long long ida = task_id(a), idb = task_id(b);
  json_decref(a);
  json_decref(b);
  char trk[32];
  ship_it(st, cs, ida, trk, sizeof(trk));
  it_resp_t r;
  long got = webhook(st, trk, "failed", "address unknown", WEBHOOK_SECRET, &r);
  IT_CHECK(cs, got == 200, "webhook %ld %s", got, r.body);
  it_resp_clear(&r);
  /* The returned asset went to the oldest backorder; the failed line waits. */
  json_t *ta = task(st, cs, ida), *tb = task(st, cs, idb);
  IT_CHECK(cs, !strcmp(jstr(ta, "step"), "delivery_failed") && json_is_null(json_object_get(ta, "asset_tag")),
           "failed line %s", json_dumps(ta, 0));
  IT_CHECK(cs, !strcmp(jstr(tb, "step"), "queued") && !strcmp(jstr(tb, "asset_tag"), "MO-000002"),
           "reassigned to %s", json_dumps(tb, 0));
  json_decref(ta);
  json_decref(tb);
  it_service_setenv(st, "fulfillment", "QM_FAILED_DELIVERY=reship");
  it_service_restart(st, "fulfillment");
}

static void c_leaver(it_stack_t *st, it_cases_t *cs) {
  /* p-0403 holds MB-000001 (the scan case); p-0401 has an open line. */
  char today[16];
  it_date(0, today, sizeof(today));
  it_hr_event_t ev = {.kind = "leaver", .effective_date = today,
                      .person = {.id = "p-0403", .name = "Leaver", .status = "terminated"}};
  it_hr_publish(st, &ev);
  int64_t until = it_now_ms() + 30000;
  json_t *ret = NULL;
  while (it_now_ms() < until) {
    json_decref(ret);
    ret = expect_json(cs, st, "GET", "/v1/returns?person_id=p-0403", NULL, 200);
    if (json_array_size(json_object_get(ret, "items")) > 0) break;
    it_sleep_ms(200);
  }
  json_t *item = json_array_get(json_object_get(ret, "items"), 0);
  IT_CHECK(cs, item && !strcmp(jstr(item, "asset_tag"), "MB-000001"), "returns %s", json_dumps(ret, 0));
  long long rid = json_integer_value(json_object_get(item, "id"));
  json_decref(ret);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.return_requested.v1", "route-3", 1, 20000) >= 1,
           "return_requested event");
  /* The same leaver event again opens nothing new. */
  it_hr_publish(st, &ev);
  char path[64];
  snprintf(path, sizeof(path), "/v1/returns/%lld/scan", rid);
  it_resp_t r;
  long got = admin(st, cs, "POST", path, "{\"tag\":\"MB-000002\",\"outcome\":\"stock\"}", &r);
  IT_CHECK(cs, got == 409 && strstr(r.body, "asset-mismatch"), "wrong return scan %ld %s", got, r.body);
  it_resp_clear(&r);
  json_t *j = expect_json(cs, st, "POST", path, "{\"tag\":\"MB-000001\",\"outcome\":\"stock\"}", 200);
  json_decref(j);
  j = expect_json(cs, st, "GET", "/v1/assets/MB-000001", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(j, "status"), "in_stock") && json_is_null(json_object_get(j, "assigned_to")),
           "returned asset %s", json_dumps(j, 0));
  {
    json_t *h = json_object_get(j, "history");
    size_t k = json_array_size(h);
    IT_CHECK(cs, k >= 2 && !strcmp(jstr(json_array_get(h, k - 2), "status"), "returned") &&
                     !strcmp(jstr(json_array_get(h, k - 1), "status"), "in_stock"),
             "history %s", json_dumps(h, 0));
  }
  json_decref(j);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.returned.v1", "route-3", 1, 20000) >= 1, "returned event");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.returns WHERE person_id = 'p-0403'") == 1,
           "duplicate leaver opened another return");
  /* A leaver whose line is still being staged: the line is cancelled. */
  ev.person.id = "p-0401";
  ev.source_event_id = NULL;
  it_hr_publish(st, &ev);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.cancelled.v1", "route-1", 1, 30000) >= 1,
           "open line not cancelled");
  j = expect_json(cs, st, "GET", "/v1/assets/PX-000001", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(j, "status"), "in_stock"), "released asset %s", json_dumps(j, 0));
  json_decref(j);
  /* A leaver dated tomorrow (p-0301 holds PH-000900): nothing until that
   * day, then the recall. The day is brought forward by moving the timer. */
  char tomorrow[16];
  it_date(1, tomorrow, sizeof(tomorrow));
  it_hr_event_t later = {.kind = "leaver", .effective_date = tomorrow,
                         .person = {.id = "p-0301", .name = "Later", .status = "active"}};
  it_hr_publish(st, &later);
  until = it_now_ms() + 20000;
  while (it_pg_int(st, "SELECT count(*) FROM fulfillment.timers WHERE kind = 'leaver'"
                       " AND owner_key = 'p-0301' AND status = 'pending'") == 0 &&
         it_now_ms() < until)
    it_sleep_ms(100);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.timers WHERE kind = 'leaver'"
                             " AND owner_key = 'p-0301' AND status = 'pending'") == 1,
           "no timer for the future leaver");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.returns WHERE person_id = 'p-0301'") == 0,
           "recalled before the effective date");
  it_pg_int(st, "WITH u AS (UPDATE fulfillment.timers SET due_ms = (extract(epoch FROM now()) * 1000)::bigint,"
                " synced = false WHERE kind = 'leaver' AND owner_key = 'p-0301' RETURNING 1)"
                " SELECT count(*) FROM u");
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.return_requested.v1", "bo-1", 1, 30000) >= 1,
           "future leaver never recalled");
}

static void c_sla(it_stack_t *st, it_cases_t *cs) {
  /* Phones have a 3 s SLA in this run: an unstaged line breaches it. */
  json_t *a = reserve(st, cs, "sla-1", "p-0701", "iphone-15", "Amsterdam", "NL");
  long long id = task_id(a);
  json_decref(a);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.sla_breached.v1", "sla-1", 1, 30000) >= 1,
           "no SLA breach published");
  json_t *t = task(st, cs, id);
  IT_CHECK(cs, json_is_true(json_object_get(t, "sla_breached")), "task %s", json_dumps(t, 0));
  json_decref(t);
  it_resp_t r;
  it_http(st, "fulfillment", "GET", "/metrics", NULL, NULL, NULL, &r);
  bool found = false;
  double n = it_metric(r.body, "qm_fulfillment_sla_breaches_total", "item_type=phone", &found);
  IT_CHECK(cs, found && n >= 1, "breach metric %g", n);
  it_resp_clear(&r);
}

static void c_loans(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs, "tag,serial,model_id,site_id\nPJ-000001,SN-J-0001,proj-1,hq\n", 1);
  char s1[40], e1[40], body[400];
  time_t now = time(NULL);
  struct tm tm;
  time_t a = now + 86400, b = now + 3 * 86400;
  strftime(s1, sizeof(s1), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&a, &tm));
  strftime(e1, sizeof(e1), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&b, &tm));
  snprintf(body, sizeof(body), "{\"model_id\":\"proj-1\",\"person_id\":\"p-0801\",\"starts_at\":\"%s\",\"ends_at\":\"%s\"}", s1, e1);
  json_t *l = expect_json(cs, st, "POST", "/v1/loans", body, 201);
  IT_CHECK(cs, !strcmp(jstr(l, "asset_tag"), "PJ-000001"), "loan %s", json_dumps(l, 0));
  json_decref(l);
  /* Loaners are booked, never reserved for a request line. */
  json_t *j = expect_json(cs, st, "POST", "/v1/reservations",
                  "{\"request_id\":\"loaner-line\",\"line_no\":1,\"person_id\":\"p-0801\","
                  "\"model_id\":\"proj-1\",\"location\":\"Amsterdam\",\"country\":\"NL\"}", 400);
  IT_CHECK(cs, strstr(json_dumps(j, 0), "loaner"), "loaner reservation %s", json_dumps(j, 0));
  json_decref(j);
  /* Overlapping booking of the only projector: a conflict. */
  time_t c = now + 2 * 86400, d = now + 4 * 86400;
  char s2[40], e2[40];
  strftime(s2, sizeof(s2), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&c, &tm));
  strftime(e2, sizeof(e2), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&d, &tm));
  snprintf(body, sizeof(body), "{\"model_id\":\"proj-1\",\"person_id\":\"p-0802\",\"starts_at\":\"%s\",\"ends_at\":\"%s\"}", s2, e2);
  j = expect_json(cs, st, "POST", "/v1/loans", body, 409);
  IT_CHECK(cs, strstr(jstr(j, "type"), "booking-conflict"), "conflict %s", json_dumps(j, 0));
  json_decref(j);
  /* Longer than the maximum loan period (14 days). */
  time_t f = now + 20 * 86400;
  strftime(e2, sizeof(e2), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&f, &tm));
  snprintf(body, sizeof(body), "{\"model_id\":\"proj-1\",\"starts_at\":\"%s\",\"ends_at\":\"%s\"}", s1, e2);
  j = expect_json(cs, st, "POST", "/v1/loans", body, 400);
  IT_CHECK(cs, strstr(json_dumps(j, 0), "max_loan_period"), "max period %s", json_dumps(j, 0));
  json_decref(j);
  /* A short loan now: handed out, not returned, the reminder fires. */
  time_t g = now + 3;
  strftime(s2, sizeof(s2), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
  strftime(e2, sizeof(e2), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&g, &tm));
  snprintf(body, sizeof(body), "{\"model_id\":\"proj-1\",\"person_id\":\"p-0803\",\"starts_at\":\"%s\",\"ends_at\":\"%s\"}", s2, e2);
  l = expect_json(cs, st, "POST", "/v1/loans", body, 201);
  char loan[64], path[128];
  snprintf(loan, sizeof(loan), "%s", jstr(l, "id"));
  json_decref(l);
  snprintf(path, sizeof(path), "/v1/loans/%s/checkout", loan);
  j = expect_json(cs, st, "POST", path, "{\"tag\":\"PJ-000001\"}", 200);
  IT_CHECK(cs, !strcmp(jstr(j, "state"), "out"), "checkout %s", json_dumps(j, 0));
  json_decref(j);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.loan_overdue.v1", loan, 1, 30000) >= 1, "no overdue reminder");
  snprintf(path, sizeof(path), "/v1/loans/%s/return", loan);
  j = expect_json(cs, st, "POST", path, "{\"tag\":\"PJ-000001\"}", 200);
  json_decref(j);
}

static void c_catalog_stock(it_stack_t *st, it_cases_t *cs) {
  /* intake's catalog shows fulfilment's StockLevel for laptop-standard (lat-7450). */
  char *tok = it_token("p-0002", "employee");
  int64_t until = it_now_ms() + 30000;
  bool ok = false;
  char last[600] = "";
  while (!ok && it_now_ms() < until) {
    it_resp_t r;
    it_http(st, "intake", "GET", "/v1/catalog/laptop-standard", tok, NULL, NULL, &r);
    json_t *stock = json_object_get(r.json, "stock");
    ok = stock && json_integer_value(json_object_get(stock, "available")) == 2;
    snprintf(last, sizeof(last), "%.500s", r.body);
    it_resp_clear(&r);
    if (!ok) it_sleep_ms(200);
  }
  free(tok);
  IT_CHECK(cs, ok, "catalog stock never showed 2 available: %s", last);
}


/* Publishes an approved asset line as approval does (RequestApproved on
 * qm.decisions.v1), standing in for approval. */
static void publish_approved_line(it_stack_t *st, const char *request_id, const char *person,
                                  const char *item, const char *model, const char *country,
                                  const char *location, Qm__V1__ItemKind kind) {
  Qm__V1__RequestLine line = QM__V1__REQUEST_LINE__INIT;
  line.line_no = 1;
  line.item_id = (char *)item;
  line.kind = kind;
  line.asset_model = (char *)model;
  Qm__V1__RequestApproved ap = QM__V1__REQUEST_APPROVED__INIT;
  ap.request_id = (char *)request_id;
  ap.line = &line;
  ap.subject_person_id = (char *)person;
  ap.subject_country = (char *)country;
  ap.subject_location = (char *)location;
  ap.approved_at_ms = (int64_t)time(NULL) * 1000;
  Qm__V1__DecisionEvent de = QM__V1__DECISION_EVENT__INIT;
  de.event_case = QM__V1__DECISION_EVENT__EVENT_APPROVED;
  de.approved = &ap;
  size_t len = qm__v1__decision_event__get_packed_size(&de);
  uint8_t *buf = malloc(len);
  qm__v1__decision_event__pack(&de, buf);
  it_publish(st, QM_TOPIC_DECISIONS, person, "/qm/approval", "qm.request.approved.v1", request_id,
             buf, len);
  free(buf);
}

static void publish_approved_asset(it_stack_t *st, const char *request_id, const char *person,
                                   const char *item, const char *model, const char *country,
                                   const char *location) {
  publish_approved_line(st, request_id, person, item, model, country, location,
                        QM__V1__ITEM_KIND__ITEM_KIND_ASSET);
}

static size_t grow_sink(char *p, size_t sz, size_t n, void *ud) {
  char **buf = ud;
  size_t have = *buf ? strlen(*buf) : 0, add = sz * n;
  char *nb = realloc(*buf, have + add + 1);
  if (!nb) return 0;
  memcpy(nb + have, p, add);
  nb[have + add] = '\0';
  *buf = nb;
  return add;
}

/* The events an instance on port has consumed (qm_consumer_events_total,
 * every topic and outcome). */
static double consumed_at_port(int port) {
  CURL *h = curl_easy_init();
  char url[96], *body = NULL;
  snprintf(url, sizeof(url), "http://127.0.0.1:%d/metrics", port);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT, 10L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, grow_sink);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
  double v = -1;
  if (curl_easy_perform(h) == CURLE_OK && body) v = it_metric(body, "qm_consumer_events_total", NULL, NULL);
  curl_easy_cleanup(h);
  free(body);
  return v;
}

/* Fifty approved laptop lines for three laptops through the event path:
 * two instances in one consumer group, each with its share of the
 * partitions, reserve at the same time. */
static void c_concurrency_events(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs,
            "tag,serial,model_id,site_id\n"
            "LE-000001,SN-E-0001,lat-ev,hq\nLE-000002,SN-E-0002,lat-ev,hq\n"
            "LE-000003,SN-E-0003,lat-ev,hq\n", 3);
  const char *extra[] = {"QM_PG_POOL_SIZE=4", "QM_FULFILLMENT_WORKERS=1", NULL};
  it_instance_t *b = it_instance_start(st, "fulfillment", "events", extra);
  /* Until the group has rebalanced, b consumes nothing: access lines (which
   * fulfilment ignores), keyed to many people, until b has seen some. */
  int64_t until = it_now_ms() + 45000;
  for (int i = 0; consumed_at_port(it_instance_port(b)) <= 0; i++) {
    IT_CHECK(cs, it_now_ms() < until, "the second instance was never given a partition");
    char rid[32], person[16];
    snprintf(rid, sizeof(rid), "ev-warm-%d", i);
    snprintf(person, sizeof(person), "p-%04d", 400 + i % 40);
    publish_approved_line(st, rid, person, "figma", "", "NL", "Amsterdam",
                          QM__V1__ITEM_KIND__ITEM_KIND_ACCESS);
    it_sleep_ms(200);
  }
  double b0 = consumed_at_port(it_instance_port(b));
  enum { N = 50 };
  for (int i = 0; i < N; i++) {
    char rid[32], person[16];
    snprintf(rid, sizeof(rid), "ev-conc-%02d", i);
    snprintf(person, sizeof(person), "p-%04d", 300 + i);
    publish_approved_asset(st, rid, person, "laptop", "lat-ev", "NL", "Amsterdam");
  }
  until = it_now_ms() + 60000;
  long long tasks = 0;
  while ((tasks = it_pg_int(st, "SELECT count(*) FROM fulfillment.tasks WHERE request_id LIKE"
                                " 'ev-conc-%'")) < N && it_now_ms() < until)
    it_sleep_ms(200);
  double b1 = consumed_at_port(it_instance_port(b));
  it_instance_stop(b);
  IT_CHECK(cs, tasks == N, "%lld tasks for %d approved lines", tasks, N);
  IT_CHECK(cs, b1 > b0, "the second instance took none of the fifty lines");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.assets WHERE model_id = 'lat-ev'"
                             " AND status = 'reserved'") == 3, "3 lat-ev assets reserved");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(DISTINCT asset_id) FROM fulfillment.tasks"
                             " WHERE request_id LIKE 'ev-conc-%' AND asset_id IS NOT NULL") == 3,
           "3 distinct assets on the fifty tasks");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.purchase_orders"
                             " WHERE model_id = 'lat-ev'") == N - 3, "47 purchase orders");
}

static bool timeline_has(const json_t *req, const char *type) {
  size_t i;
  json_t *e;
  json_array_foreach(json_object_get(req, "timeline"), i, e)
    if (!strcmp(jstr(e, "type"), type)) return true;
  return false;
}

static void c_approved_event_timeline(it_stack_t *st, it_cases_t *cs) {
  /* A real request on intake; its approval stands in for approval's. */
  import_ok(st, cs, "tag,serial,model_id,site_id\nPH-000500,SN-P-0500,iphone-15,hq\n", 1);
  char *tok = it_token("p-0002", "employee");
  char *id = it_request_submit(st, tok, "{\"reason\":\"new phone\",\"lines\":[{\"item_id\":\"phone\"}]}");
  publish_approved_asset(st, id, "p-0002", "phone", "iphone-15", "NL", "Amsterdam");
  publish_approved_asset(st, id, "p-0002", "phone", "iphone-15", "NL", "Amsterdam"); /* redelivery */
  int64_t until = it_now_ms() + 30000;
  json_t *req = NULL;
  bool seen = false;
  while (!seen && it_now_ms() < until) {
    json_decref(req);
    it_resp_t r;
    char path[128];
    snprintf(path, sizeof(path), "/v1/requests/%s", id);
    it_http(st, "intake", "GET", path, tok, NULL, NULL, &r);
    req = json_incref(r.json);
    it_resp_clear(&r);
    /* Reserved, or backordered when an older backorder took the phone. */
    seen = timeline_has(req, "qm.fulfillment.reserved.v1") ||
           timeline_has(req, "qm.fulfillment.backordered.v1");
    if (!seen) it_sleep_ms(200);
  }
  char *txt = it_json_text(req);
  IT_CHECK(cs, seen, "timeline lacks fulfilment's step: %s", txt);
  IT_CHECK(cs, !strcmp(jstr(json_array_get(json_object_get(req, "lines"), 0), "status"), "fulfilling"),
           "line status: %s", txt);
  free(txt);
  json_decref(req);
  char sql[200];
  snprintf(sql, sizeof(sql), "SELECT count(*) FROM fulfillment.tasks WHERE request_id = '%s'", id);
  IT_CHECK(cs, it_pg_int(st, sql) == 1, "one task per line whatever the redeliveries");
  free(id);
  free(tok);
  /* A model the inventory does not know: dead-lettered with the reason, no task. */
  it_reader_t *dlq = it_reader_open(st, QM_TOPIC_DECISIONS ".dlq");
  publish_approved_asset(st, "unknown-model-1", "p-0003", "phone", "no-such-model", "NL", "Amsterdam");
  json_t *pat = json_pack("{s:s}", "ce_subject", "unknown-model-1");
  int n = it_reader_wait(dlq, pat, 1, 30000);
  json_decref(pat);
  it_reader_close(dlq);
  IT_CHECK(cs, n == 1, "unknown model not dead-lettered");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.tasks WHERE request_id = 'unknown-model-1'") == 0,
           "a task for an unknown model");
}

static char *po_of(it_stack_t *st, const char *request_id) {
  char sql[200];
  snprintf(sql, sizeof(sql), "SELECT po_id FROM fulfillment.tasks WHERE request_id = '%s'", request_id);
  return it_pg_scalar(st, sql);
}

/* The requests procurement received for one purchase order, all with one key. */
static size_t po_requests(it_cases_t *cs, const char *po, bool *one_key) {
  json_t *reqs = it_recorder_requests(ctx_of(cs)->rec, "/purchase-orders");
  size_t n = 0, i;
  json_t *rq;
  char key[128] = "";
  *one_key = true;
  json_array_foreach(reqs, i, rq) {
    if (!strstr(jstr(rq, "body"), po)) continue;
    const char *k = jstr(json_object_get(rq, "headers"), "idempotency-key");
    if (!key[0]) snprintf(key, sizeof(key), "%s", k);
    else if (strcmp(key, k)) *one_key = false;
    n++;
  }
  json_decref(reqs);
  return n;
}

static void wait_po_sent(it_stack_t *st, it_cases_t *cs, const char *po) {
  int64_t until = it_now_ms() + 30000;
  char *s = NULL;
  while (it_now_ms() < until) {
    free(s);
    s = po_status_of(st, po);
    if (s && !strcmp(s, "sent")) break;
    it_sleep_ms(100);
  }
  IT_CHECK(cs, s && !strcmp(s, "sent"), "PO %s status %s", po, s ? s : "none");
  free(s);
}

static void c_po_retry_and_crash(it_stack_t *st, it_cases_t *cs) {
  it_recorder_t *rec = ctx_of(cs)->rec;
  /* Procurement down (503): retried with the same key until it answers. */
  it_recorder_set_response(rec, "/purchase-orders", 503, "{\"error\":\"maintenance\"}");
  json_t *t = reserve(st, cs, "po-retry", "p-0901", "lat-conc", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(t, "outcome"), "backordered"), "outcome %s", jstr(t, "outcome"));
  json_decref(t);
  char *po = po_of(st, "po-retry");
  IT_CHECK(cs, po != NULL, "no purchase order");
  bool one = false;
  int64_t until = it_now_ms() + 30000;
  while (po_requests(cs, po, &one) < 2 && it_now_ms() < until) it_sleep_ms(100);
  IT_CHECK(cs, po_requests(cs, po, &one) >= 2, "not retried");
  it_recorder_set_response(rec, "/purchase-orders", 200, "{\"id\":\"EXT-1\"}");
  wait_po_sent(st, cs, po);
  size_t n = po_requests(cs, po, &one);
  IT_CHECK(cs, one, "retries used different idempotency keys");
  it_sleep_ms(500);
  IT_CHECK(cs, po_requests(cs, po, &one) == n, "sent again after success");
  free(po);
  /* kill -9 while procurement is answering: after the restart the call is
   * repeated with the same key (the peer deduplicates), never lost, and the
   * purchase order exists once. */
  it_recorder_set_delay_ms(rec, 4000);
  t = reserve(st, cs, "po-crash", "p-0902", "lat-conc", "Amsterdam", "NL");
  json_decref(t);
  po = po_of(st, "po-crash");
  IT_CHECK(cs, po != NULL, "no purchase order");
  char sql[300];
  snprintf(sql, sizeof(sql), "SELECT attempts FROM fulfillment.outbound WHERE ref = '%s'", po);
  until = it_now_ms() + 20000;
  while (it_pg_int(st, sql) < 1 && it_now_ms() < until) it_sleep_ms(50);
  IT_CHECK(cs, it_pg_int(st, sql) >= 1, "never claimed");
  it_sleep_ms(500);
  it_service_kill9(st, "fulfillment");
  it_recorder_set_delay_ms(rec, 0);
  it_service_start(st, "fulfillment");
  wait_po_sent(st, cs, po);
  IT_CHECK(cs, it_pg_int(st, sql) >= 2, "the call was not repeated after the crash");
  po_requests(cs, po, &one);
  IT_CHECK(cs, one, "the repeat used another idempotency key");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.purchase_orders WHERE request_id = 'po-crash'") == 1,
           "purchase order doubled");
  free(po);
}

static void c_inventory_seed(it_stack_t *st, it_cases_t *cs) {
  /* The local stack's seed: added at start, only what is not known yet. */
  it_service_setenv(st, "fulfillment",
                    "QM_FULFILLMENT_INVENTORY_FILE=" QM_SOURCE_DIR "/deploy/local/seed/inventory.json");
  it_service_restart(st, "fulfillment");
  const char *q = "SELECT count(*) FROM fulfillment.asset_history WHERE actor = 'seed'";
  long long n = it_pg_int(st, q);
  IT_CHECK(cs, n == 55, "seeded %lld assets", n);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.sites WHERE site_id IN"
                             " ('ams', 'nyc', 'ber', 'par')") == 4, "sites not seeded");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.sites WHERE site_id = 'lon'"
                             " AND name = 'London office' AND 'London' = ANY (locations)") == 1,
           "the seed overwrote a site changed through the API");
  it_service_restart(st, "fulfillment");
  IT_CHECK(cs, it_pg_int(st, q) == 55, "a restart seeded again");
  /* A bad seed stops start-up with exit status 2, naming the line. */
  char dir[] = "/tmp/qm-it-seed-XXXXXX";
  IT_CHECK(cs, mkdtemp(dir) != NULL, "mkdtemp");
  it_file_write(dir, "inv.json", "{\"sites\": [], \"models\": [], \"assets_csv\": \"a.csv\"}");
  it_file_write(dir, "a.csv", "tag,serial,model_id,site_id\nLT-000001,x,lat-7450,ams\n");
  char *dsn = qm_asprintf("QM_PG_DSN=%s", it_stack_dsn(st));
  char *file = qm_asprintf("QM_FULFILLMENT_INVENTORY_FILE=%s/inv.json", dir);
  char *prefix = qm_asprintf("QM_TOPIC_PREFIX=%s", it_stack_prefix(st));
  const char *argv[] = {QM_BINARY_DIR "/services/qm-fulfillment", NULL};
  /* QM_DEV_INSECURE lets it start without a webhook secret: it gets as far
   * as the seed. */
  const char *envx[] = {dsn, file, prefix, "QM_HTTP_PORT=65011", "QM_DEV_INSECURE=1",
                        NULL}; /* never bound: the seed fails first */
  char *out = NULL, *err = NULL;
  int rc = it_run(argv, envx, 60000, &out, &err);
  IT_CHECK(cs, rc == 2 && ((err && strstr(err, "line 2: serial")) || (out && strstr(out, "line 2: serial"))),
           "bad seed: exit %d, %s %s", rc, out ? out : "", err ? err : "");
  free(out);
  free(err);
  /* Without a carrier webhook secret, or with the well-known development
   * one, it refuses to start (exit 2, naming the variable). */
  const char *nosecret[] = {dsn, prefix, "QM_HTTP_PORT=65011", NULL};
  const char *devsecret[] = {dsn, prefix, "QM_HTTP_PORT=65011",
                             "QM_CARRIER_WEBHOOK_SECRET=dev-carrier-webhook-secret", NULL};
  const char *const *runs[] = {nosecret, devsecret};
  static const char *const why[] = {"QM_CARRIER_WEBHOOK_SECRET is not set",
                                    "QM_CARRIER_WEBHOOK_SECRET is the well-known development value"};
  for (int k = 0; k < 2; k++) {
    out = err = NULL;
    rc = it_run(argv, runs[k], 60000, &out, &err);
    IT_CHECK(cs, rc == 2 && ((err && strstr(err, why[k])) || (out && strstr(out, why[k]))),
             "webhook secret run %d: exit %d, %s %s", k, rc, out ? out : "", err ? err : "");
    free(out);
    free(err);
  }
  free(dsn);
  free(file);
  free(prefix);
  it_dir_remove(dir);
}

/* One of ten people booking the same slot of the same loaner model. */
typedef struct book_race {
  it_stack_t *st;
  const char *token, *slot;
  int index;
  long status;
  char type[96];
} book_race_t;

static void *book_race_main(void *arg) {
  book_race_t *b = arg;
  char body[400];
  snprintf(body, sizeof(body), "{\"model_id\":\"proj-2\",\"person_id\":\"p-%04d\",%s}",
           900 + b->index, b->slot);
  it_resp_t r;
  b->status = it_http(b->st, "fulfillment", "POST", "/v1/loans", b->token, body, NULL, &r);
  snprintf(b->type, sizeof(b->type), "%s", jstr(r.json, "type"));
  it_resp_clear(&r);
  return NULL;
}

static void c_loans_concurrent(it_stack_t *st, it_cases_t *cs) {
  json_t *j = expect_json(cs, st, "PUT", "/v1/models/proj-2",
                          "{\"name\":\"Pocket projector\",\"item_type\":\"projector\",\"loaner\":true}",
                          200);
  json_decref(j);
  import_ok(st, cs,
            "tag,serial,model_id,site_id\nPJ-000101,SN-J-0101,proj-2,hq\nPJ-000102,SN-J-0102,proj-2,hq\n",
            2);
  char s1[40], e1[40], slot[120];
  time_t now = time(NULL), a = now + 5 * 86400, b = now + 6 * 86400;
  struct tm tm;
  strftime(s1, sizeof(s1), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&a, &tm));
  strftime(e1, sizeof(e1), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&b, &tm));
  snprintf(slot, sizeof(slot), "\"starts_at\":\"%s\",\"ends_at\":\"%s\"", s1, e1);
  enum { N = 10 };
  book_race_t br[N];
  pthread_t th[N];
  for (int i = 0; i < N; i++) {
    br[i] = (book_race_t){.st = st, .token = ctx_of(cs)->admin, .slot = slot, .index = i};
    pthread_create(&th[i], NULL, book_race_main, &br[i]);
  }
  for (int i = 0; i < N; i++) pthread_join(th[i], NULL);
  int booked = 0, refused = 0;
  for (int i = 0; i < N; i++) {
    if (br[i].status == 201) booked++;
    else if (br[i].status == 409 && strstr(br[i].type, "booking-conflict")) refused++;
    else IT_CHECK(cs, false, "booking %d answered %ld %s", i, br[i].status, br[i].type);
  }
  IT_CHECK(cs, booked == 2 && refused == 8, "%d booked, %d refused (want 2 and 8)", booked, refused);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.loans l JOIN fulfillment.assets a"
                             " USING (asset_id) WHERE a.model_id = 'proj-2' AND l.state = 'booked'") == 2,
           "bookings in the database");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(DISTINCT asset_id) FROM fulfillment.loans l JOIN"
                             " fulfillment.assets a USING (asset_id) WHERE a.model_id = 'proj-2'") == 2,
           "two bookings on one projector");
  /* The database refuses an overlap whatever the code does. */
  it_resp_t r;
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM pg_constraint WHERE conname = 'loans_no_overlap'") == 1,
           "no exclusion constraint");
  /* A period next to the booked one (it ends when the other begins) is free. */
  time_t c = now + 4 * 86400;
  char s0[40];
  strftime(s0, sizeof(s0), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&c, &tm));
  char body[300];
  snprintf(body, sizeof(body),
           "{\"model_id\":\"proj-2\",\"person_id\":\"p-0920\",\"starts_at\":\"%s\",\"ends_at\":\"%s\"}",
           s0, s1);
  long got = admin(st, cs, "POST", "/v1/loans", body, &r);
  IT_CHECK(cs, got == 201, "adjacent booking %ld %s", got, r.body);
  it_resp_clear(&r);
}

/* The person left while their monitor was with the carrier: the delivery
 * opens its return at once; a line approved after they left is cancelled
 * and nothing reserved for it. */
static void c_leaver_in_transit(it_stack_t *st, it_cases_t *cs) {
  import_ok(st, cs,
            "tag,serial,model_id,site_id\nMO-000101,SN-O-0101,u2723qe,hq\nMO-000103,SN-O-0103,u2723qe,hq\n",
            2);
  json_t *t = reserve(st, cs, "lvt-1", "p-0951", "u2723qe", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(t, "asset_tag"), "MO-000101"), "reserved %s", json_dumps(t, 0));
  long long id = task_id(t);
  json_decref(t);
  t = reserve(st, cs, "lvt-1b", "p-0951", "u2723qe", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(t, "asset_tag"), "MO-000103"), "reserved %s", json_dumps(t, 0));
  long long id_b = task_id(t);
  json_decref(t);
  char trk[32], trk_b[32];
  ship_it(st, cs, id, trk, sizeof(trk));
  ship_it(st, cs, id_b, trk_b, sizeof(trk_b));
  char today[16];
  it_date(0, today, sizeof(today));
  it_hr_event_t ev = {.kind = "leaver", .effective_date = today,
                      .person = {.id = "p-0951", .name = "Gone", .status = "terminated"}};
  it_hr_publish(st, &ev);
  const char *q = "SELECT count(*) FROM fulfillment.leavers WHERE person_id = 'p-0951'";
  int64_t until = it_now_ms() + 30000;
  while (it_pg_int(st, q) == 0 && it_now_ms() < until) it_sleep_ms(100);
  IT_CHECK(cs, it_pg_int(st, q) == 1, "leaver not recorded");
  t = task(st, cs, id);
  IT_CHECK(cs, !strcmp(jstr(t, "step"), "shipped"), "in-transit task %s", json_dumps(t, 0));
  json_decref(t);
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.returns WHERE person_id = 'p-0951'") == 0,
           "a return before the delivery");
  it_resp_t r;
  long got = webhook(st, trk, "delivered", "", WEBHOOK_SECRET, &r);
  IT_CHECK(cs, got == 200 && json_is_true(json_object_get(r.json, "applied")), "webhook %ld %s", got,
           r.body);
  it_resp_clear(&r);
  json_t *ret = expect_json(cs, st, "GET", "/v1/returns?person_id=p-0951", NULL, 200);
  json_t *item = json_array_get(json_object_get(ret, "items"), 0);
  IT_CHECK(cs, json_array_size(json_object_get(ret, "items")) == 1 && item &&
                   !strcmp(jstr(item, "asset_tag"), "MO-000101") && !strcmp(jstr(item, "state"), "open"),
           "returns after delivery %s", json_dumps(ret, 0));
  json_decref(ret);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.return_requested.v1", "lvt-1", 1, 20000) >= 1,
           "return_requested event");
  /* The other one fails to arrive: not shipped again (policy reship), the
   * line cancelled, the monitor back in stock. */
  size_t shipments = it_recorder_count(ctx_of(cs)->rec, "/shipments");
  got = webhook(st, trk_b, "failed", "recipient gone", WEBHOOK_SECRET, &r);
  IT_CHECK(cs, got == 200, "failed webhook %ld %s", got, r.body);
  it_resp_clear(&r);
  t = task(st, cs, id_b);
  IT_CHECK(cs, !strcmp(jstr(t, "state"), "cancelled") && json_is_null(json_object_get(t, "asset_tag")),
           "failed delivery to a leaver %s", json_dumps(t, 0));
  json_decref(t);
  json_t *mb = expect_json(cs, st, "GET", "/v1/assets/MO-000103", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(mb, "status"), "in_stock"), "failed delivery asset %s", json_dumps(mb, 0));
  json_decref(mb);
  /* A reshipment would have been queued in the webhook's transaction. */
  char sql[200];
  snprintf(sql, sizeof(sql),
           "SELECT count(*) FROM fulfillment.outbound WHERE kind = 'shipment' AND ref LIKE 'task-%lld-%%'",
           id_b);
  IT_CHECK(cs, it_pg_int(st, sql) == 1 && it_recorder_count(ctx_of(cs)->rec, "/shipments") == shipments,
           "shipped again to a leaver (%lld shipments queued)", it_pg_int(st, sql));
  /* An approved line after the leaver, with stock there: cancelled. */
  import_ok(st, cs, "tag,serial,model_id,site_id\nMO-000102,SN-O-0102,u2723qe,hq\n", 1);
  publish_approved_asset(st, "lvt-2", "p-0951", "monitor", "u2723qe", "NL", "Amsterdam");
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.cancelled.v1", "lvt-2", 1, 30000) >= 1,
           "line of a leaver not cancelled");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.tasks WHERE request_id = 'lvt-2'"
                             " AND state = 'cancelled' AND asset_id IS NULL AND po_id IS NULL") == 1,
           "cancelled task of the leaver's line");
  IT_CHECK(cs, it_pg_int(st, "SELECT count(*) FROM fulfillment.purchase_orders WHERE request_id = 'lvt-2'") == 0,
           "purchase order for a leaver");
  json_t *a = expect_json(cs, st, "GET", "/v1/assets/MO-000102", NULL, 200);
  IT_CHECK(cs, !strcmp(jstr(a, "status"), "in_stock"), "asset reserved for a leaver %s", json_dumps(a, 0));
  json_decref(a);
  IT_CHECK(cs, events_of(cs, "qm.fulfillment.reserved.v1", "lvt-2", 1, 2000) == 0,
           "reserved published for a leaver");
  /* The same through the staff API: answered, cancelled. */
  t = reserve(st, cs, "lvt-3", "p-0951", "u2723qe", "Amsterdam", "NL");
  IT_CHECK(cs, !strcmp(jstr(t, "outcome"), "cancelled") && !strcmp(jstr(t, "state"), "cancelled") &&
                   json_is_null(json_object_get(t, "asset_tag")),
           "staff reservation for a leaver %s", json_dumps(t, 0));
  json_decref(t);
}

Test(fulfillment, inventory_to_hand_over, .fini = it_fini, .timeout = 900) {
  it_recorder_t *rec = it_recorder_start();
  char *proc = qm_asprintf("QM_PROCUREMENT_URL=%s", it_recorder_url(rec));
  char *carr = qm_asprintf("QM_CARRIER_URL=%s", it_recorder_url(rec));
  const it_svc_env_t env[] = {{"fulfillment", proc},
                              {"fulfillment", carr},
                              {"fulfillment", "QM_CARRIER_WEBHOOK_SECRET=" WEBHOOK_SECRET},
                              {"fulfillment", "QM_HTTP_THREADS=8"},
                              {"fulfillment", "QM_PG_POOL_SIZE=6"},
                              {"fulfillment", "QM_FULFILLMENT_SLA=phone=3s,*=7d"},
                              {"fulfillment", "QM_FULFILLMENT_TICK=200ms"},
                              {"fulfillment", "QM_OUTBOUND_BACKOFF=200ms"},
                              {"fulfillment", "QM_OUTBOUND_LEASE=2s"},
                              {NULL, NULL}};
  static const char *const services[] = {"fulfillment", "intake", NULL};
  it_stack_t *st = it_stack_up_env("ff", services, env);
  ff_ctx_t cx = {.rec = rec, .events = it_reader_open(st, QM_TOPIC_FULFILLMENT),
                 .admin = it_token("p-0001", "it_admin")};
  it_cases_t cs;
  memset(&cs, 0, sizeof(cs));
  cs.ctx = &cx;
  it_case_run(&cs, st, "setup", c_setup);
  it_case_run(&cs, st, "csv_import_bad_rows", c_csv_bad_rows);
  it_case_run(&cs, st, "reservation_concurrency_50_for_3", c_concurrency);
  it_case_run(&cs, st, "reservation_concurrency_events_50_for_3", c_concurrency_events);
  it_case_run(&cs, st, "backorder_to_delivery", c_backorder_to_delivery);
  it_case_run(&cs, st, "staging_routing", c_staging_routing);
  it_case_run(&cs, st, "scan_match_and_mismatch", c_scan);
  it_case_run(&cs, st, "shipment_failed_delivery_reship", c_failed_delivery);
  it_case_run(&cs, st, "failed_delivery_reassign", c_failed_delivery_reassign);
  it_case_run(&cs, st, "leaver_recall", c_leaver);
  it_case_run(&cs, st, "leaver_in_transit_and_after", c_leaver_in_transit);
  it_case_run(&cs, st, "sla_breach", c_sla);
  it_case_run(&cs, st, "loaners", c_loans);
  it_case_run(&cs, st, "loaners_concurrent_same_slot_10_for_2", c_loans_concurrent);
  it_case_run(&cs, st, "catalog_stock_in_intake", c_catalog_stock);
  it_case_run(&cs, st, "approved_event_to_timeline", c_approved_event_timeline);
  it_case_run(&cs, st, "purchase_order_retry_and_kill9", c_po_retry_and_crash);
  it_case_run(&cs, st, "inventory_seed", c_inventory_seed);
  bool ok = it_cases_report(&cs, "fulfillment");
  it_reader_close(cx.events);
  free(cx.admin);
  cr_assert(ok, "some fulfillment cases failed (see above)");
  it_stack_down(st);
  it_recorder_stop(rec);
  free(proc);
  free(carr);
}
