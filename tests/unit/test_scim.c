/*
 * Unit tests for qm_scim, in two parts.
 *
 * Real peer (suite scim_peer): the local SCIM 2.0 server (deploy/local/scim,
 * `deploy/local/scim.sh start`, 127.0.0.1:8090, token dev-scim-token, seeded
 * with users p-0001..p-0300). It covers lookups, the cache, idempotent adds
 * and removes, and authentication. Each test works on fresh groups with unique
 * names (other people use the same peer) and deletes them at the end. A peer
 * that is not up fails the tests loudly.
 *
 * Protocol behaviour (suite scim_protocol): what the real peer cannot be made
 * to do on demand — 429 with Retry-After, 503, timeouts, 409/noTarget
 * answers, paged members — is scripted by a tiny HTTP responder on a loopback
 * port inside the test. It also records the requests so the wire format
 * (filter encoding, PatchOp bodies, Entra dialect) can be checked.
 */
#include "qm_common.h"
#include "qm_scim.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <curl/curl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PEER "http://127.0.0.1:8090"
#define PEER_BASE PEER "/scim/v2"
#define PEER_TOKEN "dev-scim-token"

static char errstr[1024];

/* ================================================================ helpers */

typedef struct buf {
  char *data;
  size_t len;
} buf_t;

static size_t on_body(char *d, size_t sz, size_t n, void *ud) {
  buf_t *b = ud;
  b->data = qm_realloc(b->data, b->len + sz * n + 1);
  memcpy(b->data + b->len, d, sz * n);
  b->len += sz * n;
  b->data[b->len] = '\0';
  return sz * n;
}

/* A raw request to the real peer (for set-up: the client under test has no
 * group creation). Returns the HTTP status; *out (may be NULL) gets the body. */
static long peer_request(const char *method, const char *path, const char *body, char **out) {
  CURL *h = curl_easy_init();
  buf_t b = {0};
  char *url = qm_asprintf("%s%s", PEER_BASE, path);
  struct curl_slist *hd = NULL;
  hd = curl_slist_append(hd, "Authorization: Bearer " PEER_TOKEN);
  hd = curl_slist_append(hd, "Content-Type: application/scim+json");
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
  if (body) curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
  long status = 0;
  CURLcode cc = curl_easy_perform(h);
  cr_assert_eq(cc, CURLE_OK, "SCIM peer at %s: %s — start it with deploy/local/scim.sh start",
               PEER, curl_easy_strerror(cc));
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(hd);
  curl_easy_cleanup(h);
  free(url);
  if (out) *out = b.data;
  else free(b.data);
  return status;
}

static void peer_setup(void) {
  CURL *h = curl_easy_init();
  curl_easy_setopt(h, CURLOPT_URL, PEER "/healthz");
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 3000L);
  curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  CURLcode cc = curl_easy_perform(h);
  long status = 0;
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(h);
  cr_assert(cc == CURLE_OK && status == 200,
            "the SCIM peer is not up at %s (%s, HTTP %ld): start it with "
            "deploy/local/scim.sh start",
            PEER, curl_easy_strerror(cc), status);
}

/* Creates a group with a unique name; returns its id (caller frees). */
static char *peer_create_group(char *name_out, size_t name_size) {
  char uuid[QM_UUID_STR_LEN];
  qm_uuid_new(uuid);
  snprintf(name_out, name_size, "qm-unit-%d-%s", (int)getpid(), uuid);
  char *body = qm_asprintf("{\"schemas\":[\"urn:ietf:params:scim:schemas:core:2.0:Group\"],"
                           "\"displayName\":\"%s\"}", name_out);
  char *resp = NULL;
  long status = peer_request("POST", "/Groups", body, &resp);
  cr_assert_eq(status, 201, "POST /Groups: HTTP %ld %s", status, resp ? resp : "");
  json_t *doc = json_loads(resp, 0, NULL);
  char *id = qm_strdup(json_string_value(json_object_get(doc, "id")));
  json_decref(doc);
  free(resp);
  free(body);
  return id;
}

static void peer_delete_group(const char *id) {
  char *path = qm_asprintf("/Groups/%s", id);
  long status = peer_request("DELETE", path, NULL, NULL);
  cr_expect_eq(status, 204, "DELETE %s: HTTP %ld", path, status);
  free(path);
}

static qm_scim_t *client(const char *base, const char *token, qm_scim_dialect_t dialect) {
  qm_scim_config_t cfg = {.base_url = base,
                          .bearer_token = token,
                          .connect_timeout_ms = 1000,
                          .total_timeout_ms = 3000,
                          .max_attempts = 3,
                          .backoff_base_ms = 20,
                          .backoff_max_ms = 200,
                          .dialect = dialect};
  qm_scim_t *s = qm_scim_new(&cfg, errstr, sizeof(errstr));
  cr_assert_not_null(s, "%s", errstr);
  return s;
}

typedef struct members {
  char values[16][64];
  int n;
} members_t;

static int collect(void *ctx, const char *value, const char *display, const char *type) {
  QM_UNUSED(display);
  QM_UNUSED(type);
  members_t *m = ctx;
  cr_assert_lt(m->n, 16);
  qm_strlcpy(m->values[m->n++], value, sizeof(m->values[0]));
  return 0;
}

static int count_of(const members_t *m, const char *value) {
  int c = 0;
  for (int i = 0; i < m->n; i++) c += strcmp(m->values[i], value) == 0;
  return c;
}

/* ================================================================ real peer */

/* Deletes every group this test process created (names "qm-unit-<pid>-..."),
 * also when an assertion ended the test early. */
static void peer_teardown(void) {
  char *filter = qm_asprintf("/Groups?filter=displayName%%20sw%%20%%22qm-unit-%d-%%22", (int)getpid());
  char *body = NULL;
  if (peer_request("GET", filter, NULL, &body) == 200) {
    json_t *doc = json_loads(body, 0, NULL);
    size_t i;
    json_t *g;
    json_array_foreach(json_object_get(doc, "Resources"), i, g) {
      char *path = qm_asprintf("/Groups/%s", json_string_value(json_object_get(g, "id")));
      peer_request("DELETE", path, NULL, NULL);
      free(path);
    }
    json_decref(doc);
  }
  free(body);
  free(filter);
}

TestSuite(scim_peer, .init = peer_setup, .fini = peer_teardown);

Test(scim_peer, find_user_then_cache_hit) {
  qm_scim_t *s = client(PEER_BASE, PEER_TOKEN, QM_SCIM_DIALECT_GENERIC);
  char id[128] = "", id2[128] = "";
  cr_assert_eq(qm_scim_find_user(s, "p-0001", id, sizeof(id), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  cr_assert_gt(strlen(id), 0);
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 1);
  cr_assert_eq(st.cache_misses, 1);

  /* The same lookup again: answered from the cache, no HTTP request. */
  cr_assert_eq(qm_scim_find_user(s, "p-0001", id2, sizeof(id2), errstr, sizeof(errstr)), QM_OK);
  cr_assert_str_eq(id2, id);
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 1, "the second lookup went to the server");
  cr_assert_eq(st.cache_hits, 1);

  /* The id matches what the server says about that user. */
  char *body = NULL;
  char *path = qm_asprintf("/Users/%s", id);
  cr_assert_eq(peer_request("GET", path, NULL, &body), 200);
  json_t *doc = json_loads(body, 0, NULL);
  cr_assert_str_eq(json_string_value(json_object_get(doc, "userName")), "p-0001");
  json_decref(doc);
  free(body);
  free(path);

  /* A buffer too small for the id is refused, not truncated. */
  char tiny[4];
  qm_scim_cache_clear(s);
  cr_assert_eq(qm_scim_find_user(s, "p-0001", tiny, sizeof(tiny), errstr, sizeof(errstr)),
               QM_EINVAL);
  qm_scim_destroy(s);
}

Test(scim_peer, find_not_found_and_filter_injection) {
  qm_scim_t *s = client(PEER_BASE, PEER_TOKEN, QM_SCIM_DIALECT_GENERIC);
  char id[128] = "untouched";
  cr_assert_eq(qm_scim_find_user(s, "nobody-qm-unit", id, sizeof(id), errstr, sizeof(errstr)),
               QM_ENOTFOUND, "%s", errstr);
  cr_assert_str_eq(id, "untouched");
  /* A name that would widen the filter to every user if its quote were not
   * escaped. Escaped as RFC 7644 says (a JSON string), it matches nobody; the
   * peer's filter parser (scimmy) does not understand escaped quotes at all
   * and answers 400 invalidFilter, which is also safe. Not injected means:
   * no id comes back. */
  int rc = qm_scim_find_user(s, "x\" or userName pr or userName eq \"y", id, sizeof(id), errstr,
                             sizeof(errstr));
  cr_assert(rc == QM_ENOTFOUND || rc == QM_EINVAL, "the filter was injected: %s (%s)",
            qm_strerror(rc), errstr);
  cr_assert_str_eq(id, "untouched");
  /* Misses are not cached: each asked the server. */
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 2);
  cr_assert_eq(st.cache_hits, 0);

  cr_assert_eq(qm_scim_find_group(s, "app-figma-editor", id, sizeof(id), errstr, sizeof(errstr)),
               QM_OK, "%s", errstr);
  cr_assert_eq(qm_scim_find_group(s, "no-such-group-qm-unit", id, sizeof(id), errstr,
                                  sizeof(errstr)),
               QM_ENOTFOUND);
  qm_scim_destroy(s);
}

/* Adds twice and removes twice, in the given dialect, checking the group's
 * members after each step; a second member shows that a remove takes only
 * the one asked for. */
static void add_remove_twice(qm_scim_dialect_t dialect) {
  qm_scim_t *s = client(PEER_BASE, PEER_TOKEN, dialect);
  char name[96], gid[128], u1[128], u2[128];
  char *created = peer_create_group(name, sizeof(name));
  cr_assert_eq(qm_scim_find_group(s, name, gid, sizeof(gid), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  cr_assert_str_eq(gid, created);
  cr_assert_eq(qm_scim_find_user(s, "p-0002", u1, sizeof(u1), errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(qm_scim_find_user(s, "p-0003", u2, sizeof(u2), errstr, sizeof(errstr)), 0, "%s", errstr);

  members_t m = {0};
  cr_assert_eq(qm_scim_list_members(s, gid, collect, &m, errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(m.n, 0);

  cr_assert_eq(qm_scim_add_member(s, gid, u1, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_scim_add_member(s, gid, u1, errstr, sizeof(errstr)), QM_OK, "second add: %s",
               errstr);
  cr_assert_eq(qm_scim_add_member(s, gid, u2, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  m.n = 0;
  cr_assert_eq(qm_scim_list_members(s, gid, collect, &m, errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(m.n, 2, "members: %d", m.n);
  cr_assert_eq(count_of(&m, u1), 1, "added twice, listed %d times", count_of(&m, u1));
  cr_assert_eq(count_of(&m, u2), 1);

  cr_assert_eq(qm_scim_remove_member(s, gid, u1, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_scim_remove_member(s, gid, u1, errstr, sizeof(errstr)), QM_OK,
               "second remove: %s", errstr);
  m.n = 0;
  cr_assert_eq(qm_scim_list_members(s, gid, collect, &m, errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(count_of(&m, u1), 0, "removed member still listed");
  cr_assert_eq(count_of(&m, u2), 1, "the remove took another member with it");
  cr_assert_eq(m.n, 1);

  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.failures, 0);
  cr_assert_eq(st.retries, 0);

  peer_delete_group(created);
  /* The group is gone: listing says so, removing from it is still "not a member". */
  cr_assert_eq(qm_scim_list_members(s, gid, collect, &m, errstr, sizeof(errstr)), QM_ENOTFOUND);
  cr_assert_eq(qm_scim_add_member(s, gid, u2, errstr, sizeof(errstr)), QM_ENOTFOUND, "%s", errstr);
  cr_assert_eq(qm_scim_remove_member(s, gid, u2, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  free(created);
  qm_scim_destroy(s);
}

Test(scim_peer, add_and_remove_are_idempotent) { add_remove_twice(QM_SCIM_DIALECT_GENERIC); }

Test(scim_peer, entra_dialect_add_and_remove) { add_remove_twice(QM_SCIM_DIALECT_ENTRA); }

/* Several members in one PATCH, one of them already there: all end up members
 * once, in one request. */
Test(scim_peer, add_members_in_one_request) {
  qm_scim_t *s = client(PEER_BASE, PEER_TOKEN, QM_SCIM_DIALECT_GENERIC);
  char name[96], gid[128], u[3][128];
  char *created = peer_create_group(name, sizeof(name));
  cr_assert_eq(qm_scim_find_group(s, name, gid, sizeof(gid), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  const char *users[] = {"p-0004", "p-0005", "p-0006"};
  const char *ids[3];
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(qm_scim_find_user(s, users[i], u[i], sizeof(u[i]), errstr, sizeof(errstr)), 0,
                 "%s", errstr);
    ids[i] = u[i];
  }
  cr_assert_eq(qm_scim_add_member(s, gid, u[1], errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  qm_scim_stats_t before, after;
  qm_scim_stats(s, &before);
  cr_assert_eq(qm_scim_add_members(s, gid, ids, 3, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  qm_scim_stats(s, &after);
  cr_assert_eq(after.attempts - before.attempts, 1, "one PATCH for three members");
  members_t m = {0};
  cr_assert_eq(qm_scim_list_members(s, gid, collect, &m, errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(m.n, 3, "members: %d", m.n);
  for (int i = 0; i < 3; i++) cr_assert_eq(count_of(&m, u[i]), 1);
  peer_delete_group(created);
  free(created);
  qm_scim_destroy(s);
}

Test(scim_peer, wrong_token_is_eauth) {
  qm_scim_t *s = client(PEER_BASE, "not-the-token", QM_SCIM_DIALECT_GENERIC);
  char id[128];
  int rc = qm_scim_find_user(s, "p-0001", id, sizeof(id), errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EAUTH, "got %s: %s", qm_strerror(rc), errstr);
  cr_assert(strstr(errstr, "401") != NULL, "errstr: %s", errstr);
  cr_assert(strstr(errstr, "Invalid bearer token") != NULL, "no SCIM detail: %s", errstr);
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 1, "a 401 was retried");
  cr_assert_eq(st.failures, 1);
  qm_scim_destroy(s);
}

typedef struct lookup_job {
  qm_scim_t *s;
  int first;
  int ok;
  char ids[10][128];
} lookup_job_t;

static void *lookup_many(void *arg) {
  lookup_job_t *j = arg;
  char err[256];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 10; i++) {
      char name[16], id[128];
      snprintf(name, sizeof(name), "p-%04d", j->first + i);
      if (qm_scim_find_user(j->s, name, id, sizeof(id), err, sizeof(err)) != QM_OK) continue;
      if (round == 0) qm_strlcpy(j->ids[i], id, sizeof(j->ids[i]));
      if (strcmp(j->ids[i], id) == 0) j->ok++;
    }
  }
  return NULL;
}

/* One client shared by 8 threads: lookups overlap on the handle pool and the
 * cache (threads 0-3 and 4-7 ask for the same users). */
Test(scim_peer, one_client_many_threads) {
  qm_scim_t *s = client(PEER_BASE, PEER_TOKEN, QM_SCIM_DIALECT_GENERIC);
  pthread_t t[8];
  lookup_job_t jobs[8];
  for (int i = 0; i < 8; i++) {
    jobs[i] = (lookup_job_t){.s = s, .first = 100 + (i % 4) * 10};
    pthread_create(&t[i], NULL, lookup_many, &jobs[i]);
  }
  for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
  for (int i = 0; i < 8; i++) {
    cr_assert_eq(jobs[i].ok, 30, "thread %d: %d of 30 lookups consistent", i, jobs[i].ok);
    cr_assert_str_eq(jobs[i].ids[3], jobs[(i + 4) % 8].ids[3]);
  }
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.failures, 0);
  cr_assert_eq(st.cache_hits + st.cache_misses, 240);
  /* 40 distinct users: at most 80 requests even if both threads of a pair miss together. */
  cr_assert_leq(st.attempts, 80, "%llu requests for 40 users", (unsigned long long)st.attempts);
  cr_assert_geq(st.cache_hits, 160);
  qm_scim_destroy(s);
}

Test(scim_peer, bad_config_is_refused) {
  qm_scim_config_t cfg = {.base_url = "ftp://example.com/scim", .bearer_token = "t"};
  cr_assert_null(qm_scim_new(&cfg, errstr, sizeof(errstr)));
  cfg.base_url = PEER_BASE;
  cfg.bearer_token = "";
  cr_assert_null(qm_scim_new(&cfg, errstr, sizeof(errstr)));
  qm_scim_dialect_t d;
  cr_assert_eq(qm_scim_dialect_parse("Entra", &d), 0);
  cr_assert_eq(d, QM_SCIM_DIALECT_ENTRA);
  cr_assert_eq(qm_scim_dialect_parse("azure", &d), QM_EINVAL);
}

/* ================================================================ protocol behaviour
 * A scripted HTTP responder: the n-th request gets script[n] (the last entry
 * repeats). Each answer closes the connection. */

typedef struct fake_resp {
  int status;
  const char *headers; /* extra header lines, each ending in \r\n */
  const char *body;
  int hang_ms; /* > 0: read the request, answer nothing for this long, close */
} fake_resp_t;

typedef struct fake {
  int lfd;
  int port;
  pthread_t thread;
  atomic_bool stop;
  fake_resp_t script[8];
  int nscript;
  atomic_int nreq;
  char reqs[8][2048]; /* request line + body of the first 8 requests */
} fake_t;

/* Reads one request (headers and Content-Length body) into out. */
static void fake_read_request(int fd, char *out, size_t out_size) {
  char buf[8192];
  size_t len = 0;
  char *end = NULL;
  while (len < sizeof(buf) - 1) {
    ssize_t n = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);
    if (n <= 0) break;
    len += (size_t)n;
    buf[len] = '\0';
    end = strstr(buf, "\r\n\r\n");
    if (!end) continue;
    const char *cl = strcasestr(buf, "\r\nContent-Length:");
    size_t want = cl ? strtoul(cl + 17, NULL, 10) : 0;
    if (len >= (size_t)(end + 4 - buf) + want) break;
  }
  buf[len] = '\0';
  /* Keep the request line and the body. */
  size_t line = strcspn(buf, "\r\n");
  snprintf(out, out_size, "%.*s\n%s", (int)line, buf, end ? end + 4 : "");
}

static void *fake_run(void *arg) {
  fake_t *f = arg;
  while (!atomic_load(&f->stop)) {
    struct pollfd p = {.fd = f->lfd, .events = POLLIN};
    if (poll(&p, 1, 50) <= 0) continue;
    int fd = accept(f->lfd, NULL, NULL);
    if (fd < 0) continue;
    int n = atomic_fetch_add(&f->nreq, 1);
    char scratch[2048];
    fake_read_request(fd, n < 8 ? f->reqs[n] : scratch, sizeof(scratch));
    const fake_resp_t *r = &f->script[n < f->nscript ? n : f->nscript - 1];
    if (r->hang_ms > 0) {
      for (int waited = 0; waited < r->hang_ms && !atomic_load(&f->stop); waited += 10)
        usleep(10000);
    } else {
      const char *body = r->body ? r->body : "";
      char *resp = qm_asprintf("HTTP/1.1 %d Scripted\r\nContent-Type: application/scim+json\r\n"
                               "Content-Length: %zu\r\nConnection: close\r\n%s\r\n%s",
                               r->status, strlen(body), r->headers ? r->headers : "", body);
      ssize_t ignored = send(fd, resp, strlen(resp), MSG_NOSIGNAL);
      QM_UNUSED(ignored);
      free(resp);
    }
    close(fd);
  }
  return NULL;
}

static void fake_start(fake_t *f) {
  f->lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  cr_assert_eq(listen(f->lfd, 16), 0);
  socklen_t sl = sizeof(sa);
  getsockname(f->lfd, (struct sockaddr *)&sa, &sl);
  f->port = ntohs(sa.sin_port);
  atomic_store(&f->stop, false);
  atomic_store(&f->nreq, 0);
  pthread_create(&f->thread, NULL, fake_run, f);
}

static void fake_stop(fake_t *f) {
  atomic_store(&f->stop, true);
  pthread_join(f->thread, NULL);
  close(f->lfd);
}

static qm_scim_t *fake_client(const fake_t *f, const char *query, qm_scim_dialect_t dialect,
                              int max_attempts, int backoff_max_ms, int total_timeout_ms) {
  char base[128];
  snprintf(base, sizeof(base), "http://127.0.0.1:%d/scim/v2%s", f->port, query ? query : "");
  qm_scim_config_t cfg = {.base_url = base,
                          .bearer_token = "t0k",
                          .connect_timeout_ms = 1000,
                          .total_timeout_ms = total_timeout_ms,
                          .max_attempts = max_attempts,
                          .backoff_base_ms = 10,
                          .backoff_max_ms = backoff_max_ms,
                          .dialect = dialect};
  qm_scim_t *s = qm_scim_new(&cfg, errstr, sizeof(errstr));
  cr_assert_not_null(s, "%s", errstr);
  return s;
}

#define USER_LIST                                                                              \
  "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:ListResponse\"],\"totalResults\":1,"  \
  "\"Resources\":[{\"id\":\"u-1\",\"userName\":\"alice\"}]}"

Test(scim_protocol, retry_after_seconds_on_429_is_honoured) {
  fake_t f = {.nscript = 2,
              .script = {{.status = 429, .headers = "Retry-After: 1\r\n",
                          .body = "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:Error\"],"
                                  "\"status\":\"429\",\"detail\":\"slow down\"}"},
                         {.status = 200, .body = USER_LIST}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_OKTA, 5, 5000, 2000);
  char id[64];
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_scim_find_user(s, "alice", id, sizeof(id), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  int64_t took = qm_mono_ms() - t0;
  cr_assert_str_eq(id, "u-1");
  cr_assert_geq(took, 950, "Retry-After: 1 not honoured (%lld ms)", (long long)took);
  cr_assert_lt(took, 3000);
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 2);
  cr_assert_eq(st.retries, 1);
  cr_assert_eq(st.failures, 0);
  /* The filter went out URL-encoded, with the bearer token. */
  cr_assert(strstr(f.reqs[0], "GET /scim/v2/Users?filter=userName%20eq%20%22alice%22 ") != NULL,
            "request: %s", f.reqs[0]);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, retry_after_is_bounded_by_backoff_max) {
  fake_t f = {.nscript = 2,
              .script = {{.status = 503, .headers = "Retry-After: 30\r\n"},
                         {.status = 200, .body = USER_LIST}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 300, 2000);
  char id[64];
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_scim_find_user(s, "alice", id, sizeof(id), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  int64_t took = qm_mono_ms() - t0;
  cr_assert_geq(took, 280, "waited %lld ms", (long long)took);
  cr_assert_lt(took, 2000, "Retry-After: 30 was not bounded by backoff_max_ms (%lld ms)",
               (long long)took);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, retry_after_http_date) {
  /* An HTTP-date two seconds ahead (the format has whole seconds). */
  char hdr[96], when[64];
  time_t t = time(NULL) + 2;
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(when, sizeof(when), "%a, %d %b %Y %H:%M:%S GMT", &tm);
  snprintf(hdr, sizeof(hdr), "Retry-After: %s\r\n", when);
  fake_t f = {.nscript = 2, .script = {{.status = 429, .headers = hdr}, {.status = 200, .body = USER_LIST}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 10000, 2000);
  char id[64];
  int64_t t0 = qm_mono_ms();
  cr_assert_eq(qm_scim_find_user(s, "alice", id, sizeof(id), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  int64_t took = qm_mono_ms() - t0;
  cr_assert_geq(took, 900, "HTTP-date Retry-After not honoured (%lld ms)", (long long)took);
  cr_assert_lt(took, 3500);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, persistent_503_is_etransient_with_detail) {
  fake_t f = {.nscript = 1,
              .script = {{.status = 503,
                          .body = "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:Error\"],"
                                  "\"status\":503,\"detail\":\"directory maintenance\"}"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 3, 50, 2000);
  int rc = qm_scim_add_member(s, "g-1", "u-1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_ETRANSIENT, "got %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "503") && strstr(errstr, "directory maintenance"), "errstr: %s", errstr);
  cr_assert_eq(atomic_load(&f.nreq), 3, "max_attempts not respected: %d requests",
               atomic_load(&f.nreq));
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 3);
  cr_assert_eq(st.retries, 2);
  cr_assert_eq(st.failures, 1);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, timeout_is_retried_then_etransient) {
  fake_t f = {.nscript = 1, .script = {{.hang_ms = 2000}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 2, 50, 300);
  char id[64];
  int64_t t0 = qm_mono_ms();
  int rc = qm_scim_find_user(s, "alice", id, sizeof(id), errstr, sizeof(errstr));
  int64_t took = qm_mono_ms() - t0;
  cr_assert_eq(rc, QM_ETRANSIENT, "got %s: %s", qm_strerror(rc), errstr);
  cr_assert(strcasestr(errstr, "timeout") || strcasestr(errstr, "timed out"), "errstr: %s", errstr);
  qm_scim_stats_t st;
  qm_scim_stats(s, &st);
  cr_assert_eq(st.attempts, 2);
  cr_assert_eq(st.retries, 1);
  cr_assert_lt(took, 1500, "the total timeout was not applied (%lld ms)", (long long)took);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, client_errors_are_classified_and_not_retried) {
  fake_t f = {.nscript = 3,
              .script = {{.status = 400,
                          .body = "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:Error\"],"
                                  "\"status\":400,\"scimType\":\"invalidValue\","
                                  "\"detail\":\"bad member\"}"},
                         {.status = 403, .body = "{\"detail\":\"missing scope\",\"status\":\"403\"}"},
                         {.status = 422, .body = "not json"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 50, 2000);
  int rc = qm_scim_add_member(s, "g-1", "u-1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL, "got %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "invalidValue") && strstr(errstr, "bad member") && strstr(errstr, "400"),
            "errstr: %s", errstr);
  rc = qm_scim_add_member(s, "g-1", "u-1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EAUTH, "403 gave %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "missing scope"), "errstr: %s", errstr);
  rc = qm_scim_remove_member(s, "g-1", "u-1", errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_EINVAL);
  cr_assert(strstr(errstr, "not json"), "errstr: %s", errstr);
  cr_assert_eq(atomic_load(&f.nreq), 3, "a 4xx was retried");
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, already_member_and_not_member_are_success) {
  fake_t f = {.nscript = 5,
              .script = {{.status = 409,
                          .body = "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:Error\"],"
                                  "\"status\":\"409\",\"scimType\":\"uniqueness\"}"},
                         {.status = 400,
                          .body = "{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:Error\"],"
                                  "\"status\":\"400\",\"scimType\":\"noTarget\"}"},
                         {.status = 404, .body = "{\"status\":\"404\"}"},
                         {.status = 204},
                         {.status = 400,
                          .body = "{\"status\":\"400\",\"scimType\":\"invalidFilter\"}"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, "?aadOptscim062020", QM_SCIM_DIALECT_ENTRA, 5, 50, 2000);
  cr_assert_eq(qm_scim_add_member(s, "g/1", "u-1", errstr, sizeof(errstr)), QM_OK, "409: %s", errstr);
  cr_assert_eq(qm_scim_remove_member(s, "g/1", "u\"1", errstr, sizeof(errstr)), QM_OK,
               "noTarget: %s", errstr);
  cr_assert_eq(qm_scim_remove_member(s, "g/1", "u-1", errstr, sizeof(errstr)), QM_OK, "404: %s",
               errstr);
  cr_assert_eq(qm_scim_remove_member(s, "g/1", "u-1", errstr, sizeof(errstr)), QM_OK, "204: %s",
               errstr);
  cr_assert_eq(qm_scim_remove_member(s, "g/1", "u-1", errstr, sizeof(errstr)), QM_EINVAL,
               "invalidFilter is a real error");

  /* Wire format: the group id is path-encoded, the base URL's query kept,
   * Entra's capitalised ops, the remove filter with the id escaped. */
  cr_assert(strncmp(f.reqs[0], "PATCH /scim/v2/Groups/g%2F1?aadOptscim062020 HTTP/1.1\n", 54) == 0,
            "request: %s", f.reqs[0]);
  json_t *add = json_loads(strchr(f.reqs[0], '\n') + 1, 0, NULL);
  cr_assert_not_null(add, "body: %s", f.reqs[0]);
  json_t *op = json_array_get(json_object_get(add, "Operations"), 0);
  cr_assert_str_eq(json_string_value(json_array_get(json_object_get(add, "schemas"), 0)),
                   "urn:ietf:params:scim:api:messages:2.0:PatchOp");
  cr_assert_str_eq(json_string_value(json_object_get(op, "op")), "Add");
  cr_assert_str_eq(json_string_value(json_object_get(op, "path")), "members");
  cr_assert_str_eq(json_string_value(json_object_get(json_array_get(json_object_get(op, "value"), 0),
                                                     "value")),
                   "u-1");
  json_decref(add);
  json_t *rem = json_loads(strchr(f.reqs[1], '\n') + 1, 0, NULL);
  op = json_array_get(json_object_get(rem, "Operations"), 0);
  cr_assert_str_eq(json_string_value(json_object_get(op, "op")), "Remove");
  cr_assert_str_eq(json_string_value(json_object_get(op, "path")), "members[value eq \"u\\\"1\"]");
  cr_assert_null(json_object_get(op, "value"));
  json_decref(rem);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, generic_dialect_uses_lower_case_ops) {
  fake_t f = {.nscript = 1, .script = {{.status = 200, .body = "{}"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 50, 2000);
  cr_assert_eq(qm_scim_add_member(s, "g-1", "u-1", errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert_eq(qm_scim_remove_member(s, "g-1", "u-1", errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  cr_assert(strstr(f.reqs[0], "\"op\":\"add\""), "body: %s", f.reqs[0]);
  cr_assert(strstr(f.reqs[1], "\"op\":\"remove\""), "body: %s", f.reqs[1]);
  cr_assert(strstr(f.reqs[1], "\"path\":\"members[value eq \\\"u-1\\\"]\""), "body: %s", f.reqs[1]);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, filter_value_is_escaped_and_encoded) {
  fake_t f = {.nscript = 1,
              .script = {{.status = 200,
                          .body = "{\"totalResults\":1,\"Resources\":[{\"id\":\"u-9\","
                                  "\"userName\":\"a\\\"b\\\\c\"}]}"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 50, 2000);
  char id[64];
  cr_assert_eq(qm_scim_find_user(s, "a\"b\\c", id, sizeof(id), errstr, sizeof(errstr)), QM_OK,
               "%s", errstr);
  cr_assert_str_eq(id, "u-9");
  /* userName eq "a\"b\\c" */
  cr_assert(strstr(f.reqs[0], "filter=userName%20eq%20%22a%5C%22b%5C%5Cc%22 "), "request: %s",
            f.reqs[0]);
  qm_scim_destroy(s);
  fake_stop(&f);
}

Test(scim_protocol, members_are_paged_and_failure_calls_no_callback) {
  fake_t f = {.nscript = 3,
              .script = {{.status = 200,
                          .body = "{\"id\":\"g-1\",\"startIndex\":1,\"itemsPerPage\":2,"
                                  "\"totalResults\":3,\"members\":[{\"value\":\"a\"},"
                                  "{\"value\":\"b\",\"type\":\"User\"}]}"},
                         {.status = 200,
                          .body = "{\"id\":\"g-1\",\"startIndex\":3,\"itemsPerPage\":2,"
                                  "\"totalResults\":3,\"members\":[{\"value\":\"c\"}]}"},
                         {.status = 500}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_OKTA, 2, 20, 2000);
  members_t m = {0};
  cr_assert_eq(qm_scim_list_members(s, "g-1", collect, &m, errstr, sizeof(errstr)), QM_OK, "%s",
               errstr);
  cr_assert_eq(m.n, 3);
  cr_assert_str_eq(m.values[0], "a");
  cr_assert_str_eq(m.values[2], "c");
  cr_assert(strstr(f.reqs[1], "startIndex=3"), "request: %s", f.reqs[1]);

  /* Every further request answers 500: the walk fails and calls nothing. */
  m.n = 0;
  cr_assert_eq(qm_scim_list_members(s, "g-1", collect, &m, errstr, sizeof(errstr)), QM_ETRANSIENT);
  cr_assert_eq(m.n, 0, "the callback ran for a failed walk");
  qm_scim_destroy(s);
  fake_stop(&f);
}

static void *request_shutdown_later(void *arg) {
  QM_UNUSED(arg);
  usleep(300 * 1000);
  qm_shutdown_request();
  return NULL;
}

/* Runs in its own process (Criterion forks per test), so the process-wide
 * shutdown flag set here touches no other test. */
Test(scim_protocol, backoff_sleep_wakes_on_shutdown) {
  fake_t f = {.nscript = 1, .script = {{.status = 503, .headers = "Retry-After: 20\r\n"}}};
  fake_start(&f);
  qm_scim_t *s = fake_client(&f, NULL, QM_SCIM_DIALECT_GENERIC, 5, 30000, 2000);
  pthread_t t;
  pthread_create(&t, NULL, request_shutdown_later, NULL);
  char id[64];
  int64_t t0 = qm_mono_ms();
  int rc = qm_scim_find_user(s, "alice", id, sizeof(id), errstr, sizeof(errstr));
  int64_t took = qm_mono_ms() - t0;
  pthread_join(t, NULL);
  cr_assert_eq(rc, QM_ESHUTDOWN, "got %s: %s", qm_strerror(rc), errstr);
  cr_assert_lt(took, 2000, "the backoff sleep ignored shutdown (%lld ms)", (long long)took);
  cr_assert_eq(atomic_load(&f.nreq), 1);
  qm_scim_destroy(s);
  fake_stop(&f);
}
