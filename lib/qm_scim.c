/*
 * qm_scim: SCIM 2.0 group-membership client over libcurl and jansson. See
 * qm_scim.h for the contracts; this file holds the moving parts:
 *  - a pool of libcurl easy handles (a handle keeps its live connections
 *    across curl_easy_reset(), so borrowing one reuses keep-alive connections
 *    without holding a lock during a transfer);
 *  - one retry loop for every request: exponential backoff with full jitter,
 *    Retry-After honoured on 429/503, sleeps that wake on shutdown;
 *  - a small thread-safe name -> id cache with a TTL (chained hash map);
 *  - the mapping of HTTP statuses and SCIM error bodies to QM_E* codes.
 */
#include "qm_scim.h"

#include "qm_common.h"
#include "qm_log.h"

#include <ctype.h>
#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define QM_SCIM_POOL_MAX 8               /* idle easy handles kept */
#define QM_SCIM_BUCKETS 256              /* cache hash buckets */
#define QM_SCIM_CACHE_MAX 4096           /* cache entries before a sweep */
#define QM_SCIM_BODY_MAX (32u << 20)     /* largest response body accepted */
#define QM_SCIM_MAX_PAGES 10000          /* member pages before giving up */
#define QM_SCIM_PATCHOP "urn:ietf:params:scim:api:messages:2.0:PatchOp"

typedef struct qm_scim_entry {
  struct qm_scim_entry *next;
  char *key; /* "U\x1f<userName>" or "G\x1f<displayName>" */
  char *id;
  int64_t expires_ms; /* monotonic */
} qm_scim_entry_t;

struct qm_scim {
  char *base;       /* base URL without query and trailing slash */
  char *base_query; /* the base URL's query ("aadOptscim062020"), or NULL */
  char *ca_file;
  int connect_timeout_ms;
  int total_timeout_ms;
  int max_attempts;
  int backoff_base_ms;
  int backoff_max_ms;
  int cache_ttl_ms;
  qm_scim_dialect_t dialect;
  struct curl_slist *get_headers;   /* Authorization, Accept */
  struct curl_slist *patch_headers; /* + Content-Type, no Expect */

  pthread_mutex_t pool_mu;
  CURL *pool[QM_SCIM_POOL_MAX];
  int npool;

  pthread_mutex_t cache_mu;
  qm_scim_entry_t *buckets[QM_SCIM_BUCKETS];
  size_t ncache;

  atomic_uint_fast64_t attempts, retries, failures, cache_hits, cache_misses;
};

/* One HTTP response as far as we need it. */
typedef struct qm_scim_resp {
  long status;
  char *body; /* NUL-terminated; caller of qm_scim_call frees with free() */
  size_t len, cap;
  bool too_big;
  int64_t retry_after_ms; /* -1: no Retry-After header */
} qm_scim_resp_t;

/* ------------------------------------------------------------ set-up */

static pthread_once_t qm_scim_once = PTHREAD_ONCE_INIT;
static CURLcode qm_scim_global_rc = CURLE_OK;

/* curl_global_init is not thread-safe and must run once per process. */
static void qm_scim_global_init(void) { qm_scim_global_rc = curl_global_init(CURL_GLOBAL_DEFAULT); }

int qm_scim_dialect_parse(const char *s, qm_scim_dialect_t *dialect) {
  if (!s) return QM_EINVAL;
  if (strcasecmp(s, "generic") == 0 || strcasecmp(s, "rfc7644") == 0)
    *dialect = QM_SCIM_DIALECT_GENERIC;
  else if (strcasecmp(s, "okta") == 0) *dialect = QM_SCIM_DIALECT_OKTA;
  else if (strcasecmp(s, "entra") == 0) *dialect = QM_SCIM_DIALECT_ENTRA;
  else return QM_EINVAL;
  return QM_OK;
}

qm_scim_t *qm_scim_new(const qm_scim_config_t *cfg, char *errstr, size_t errstr_size) {
  pthread_once(&qm_scim_once, qm_scim_global_init);
  if (qm_scim_global_rc != CURLE_OK) {
    qm_err(errstr, errstr_size, QM_EIO, "scim: curl_global_init failed: %s",
           curl_easy_strerror(qm_scim_global_rc));
    return NULL;
  }
  if (!cfg || !cfg->base_url || !*cfg->base_url) {
    qm_err(errstr, errstr_size, QM_EINVAL, "scim: no base URL configured");
    return NULL;
  }
  if (strncasecmp(cfg->base_url, "http://", 7) != 0 &&
      strncasecmp(cfg->base_url, "https://", 8) != 0) {
    qm_err(errstr, errstr_size, QM_EINVAL, "scim: base URL '%s' is not http(s)", cfg->base_url);
    return NULL;
  }
  if (!cfg->bearer_token || !*cfg->bearer_token) {
    qm_err(errstr, errstr_size, QM_EINVAL, "scim: no bearer token configured");
    return NULL;
  }
  if (strpbrk(cfg->bearer_token, "\r\n")) {
    qm_err(errstr, errstr_size, QM_EINVAL, "scim: the bearer token contains a line break");
    return NULL;
  }
  if ((unsigned)cfg->dialect > QM_SCIM_DIALECT_ENTRA) {
    qm_err(errstr, errstr_size, QM_EINVAL, "scim: unknown dialect %d", (int)cfg->dialect);
    return NULL;
  }

  qm_scim_t *s = qm_calloc(1, sizeof(*s));
  const char *q = strchr(cfg->base_url, '?');
  size_t blen = q ? (size_t)(q - cfg->base_url) : strlen(cfg->base_url);
  while (blen > 0 && cfg->base_url[blen - 1] == '/') blen--;
  s->base = qm_strndup(cfg->base_url, blen);
  s->base_query = q && q[1] ? qm_strdup(q + 1) : NULL;
  s->ca_file = cfg->ca_file && *cfg->ca_file ? qm_strdup(cfg->ca_file) : NULL;
  s->connect_timeout_ms = cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms : 5000;
  s->total_timeout_ms = cfg->total_timeout_ms > 0 ? cfg->total_timeout_ms : 30000;
  s->max_attempts = cfg->max_attempts > 0 ? cfg->max_attempts : 5;
  s->backoff_base_ms = cfg->backoff_base_ms > 0 ? cfg->backoff_base_ms : 200;
  s->backoff_max_ms = cfg->backoff_max_ms > 0 ? cfg->backoff_max_ms : 10000;
  if (s->backoff_max_ms < s->backoff_base_ms) s->backoff_max_ms = s->backoff_base_ms;
  s->cache_ttl_ms = cfg->cache_ttl_ms == 0 ? 300000 : cfg->cache_ttl_ms;
  s->dialect = cfg->dialect;

  char *auth = qm_asprintf("Authorization: Bearer %s", cfg->bearer_token);
  const char *common[] = {auth, "Accept: application/scim+json, application/json"};
  for (size_t i = 0; i < QM_ARRAY_LEN(common); i++) {
    s->get_headers = curl_slist_append(s->get_headers, common[i]);
    s->patch_headers = curl_slist_append(s->patch_headers, common[i]);
  }
  s->patch_headers = curl_slist_append(s->patch_headers, "Content-Type: application/scim+json");
  s->patch_headers = curl_slist_append(s->patch_headers, "Expect:");
  /* Wipe the token copy: only the header lists keep it. */
  memset(auth, 0, strlen(auth));
  free(auth);
  if (!s->get_headers || !s->patch_headers) {
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory building SCIM headers\"}\n");
    abort();
  }
  pthread_mutex_init(&s->pool_mu, NULL);
  pthread_mutex_init(&s->cache_mu, NULL);
  return s;
}

void qm_scim_destroy(qm_scim_t *s) {
  if (!s) return;
  for (int i = 0; i < s->npool; i++) curl_easy_cleanup(s->pool[i]);
  qm_scim_cache_clear(s);
  pthread_mutex_destroy(&s->pool_mu);
  pthread_mutex_destroy(&s->cache_mu);
  curl_slist_free_all(s->get_headers);
  curl_slist_free_all(s->patch_headers);
  free(s->base);
  free(s->base_query);
  free(s->ca_file);
  free(s);
}

void qm_scim_stats(qm_scim_t *s, qm_scim_stats_t *st) {
  st->attempts = atomic_load(&s->attempts);
  st->retries = atomic_load(&s->retries);
  st->failures = atomic_load(&s->failures);
  st->cache_hits = atomic_load(&s->cache_hits);
  st->cache_misses = atomic_load(&s->cache_misses);
}

/* ------------------------------------------------------------ cache */

static uint32_t qm_scim_hash(const char *k) {
  uint32_t h = 2166136261u; /* FNV-1a */
  for (; *k; k++) h = (h ^ (unsigned char)*k) * 16777619u;
  return h;
}

static void qm_scim_entry_free(qm_scim_entry_t *e) {
  free(e->key);
  free(e->id);
  free(e);
}

/* Drops expired entries (all of them when all is true). Called with cache_mu held. */
static void qm_scim_cache_sweep(qm_scim_t *s, bool all) {
  int64_t now = qm_mono_ms();
  for (size_t b = 0; b < QM_SCIM_BUCKETS; b++) {
    qm_scim_entry_t **pp = &s->buckets[b];
    while (*pp) {
      qm_scim_entry_t *e = *pp;
      if (all || e->expires_ms <= now) {
        *pp = e->next;
        qm_scim_entry_free(e);
        s->ncache--;
      } else {
        pp = &e->next;
      }
    }
  }
}

/* Copies the cached id for key into out. False when absent, expired or too long. */
static bool qm_scim_cache_get(qm_scim_t *s, const char *key, char *out, size_t out_size) {
  bool hit = false;
  if (s->cache_ttl_ms < 0) return false;
  pthread_mutex_lock(&s->cache_mu);
  for (qm_scim_entry_t *e = s->buckets[qm_scim_hash(key) % QM_SCIM_BUCKETS]; e; e = e->next) {
    if (strcmp(e->key, key) != 0) continue;
    if (e->expires_ms > qm_mono_ms() && strlen(e->id) < out_size) {
      memcpy(out, e->id, strlen(e->id) + 1);
      hit = true;
    }
    break;
  }
  pthread_mutex_unlock(&s->cache_mu);
  return hit;
}

static void qm_scim_cache_put(qm_scim_t *s, const char *key, const char *id) {
  if (s->cache_ttl_ms < 0) return;
  pthread_mutex_lock(&s->cache_mu);
  qm_scim_entry_t **bucket = &s->buckets[qm_scim_hash(key) % QM_SCIM_BUCKETS];
  qm_scim_entry_t *e = *bucket;
  while (e && strcmp(e->key, key) != 0) e = e->next;
  if (!e) {
    /* Bounded: when full, drop what expired; if that is not enough, start over. */
    if (s->ncache >= QM_SCIM_CACHE_MAX) qm_scim_cache_sweep(s, false);
    if (s->ncache >= QM_SCIM_CACHE_MAX) qm_scim_cache_sweep(s, true);
    e = qm_calloc(1, sizeof(*e));
    e->key = qm_strdup(key);
    e->next = *bucket;
    *bucket = e;
    s->ncache++;
  } else {
    free(e->id);
  }
  e->id = qm_strdup(id);
  e->expires_ms = qm_mono_ms() + s->cache_ttl_ms;
  pthread_mutex_unlock(&s->cache_mu);
}

/* Forgets every name mapped to id (a resource the server says is gone). */
static void qm_scim_cache_forget_id(qm_scim_t *s, const char *id) {
  pthread_mutex_lock(&s->cache_mu);
  for (size_t b = 0; b < QM_SCIM_BUCKETS; b++) {
    qm_scim_entry_t **pp = &s->buckets[b];
    while (*pp) {
      qm_scim_entry_t *e = *pp;
      if (strcmp(e->id, id) == 0) {
        *pp = e->next;
        qm_scim_entry_free(e);
        s->ncache--;
      } else {
        pp = &e->next;
      }
    }
  }
  pthread_mutex_unlock(&s->cache_mu);
}

void qm_scim_cache_clear(qm_scim_t *s) {
  pthread_mutex_lock(&s->cache_mu);
  qm_scim_cache_sweep(s, true);
  pthread_mutex_unlock(&s->cache_mu);
}

/* ------------------------------------------------------------ text helpers */

/* Percent-encodes everything but RFC 3986 unreserved characters. Caller
 * frees with free(). */
static char *qm_scim_urlencode(const char *in) {
  static const char hex[] = "0123456789ABCDEF";
  size_t n = strlen(in);
  char *out = qm_malloc(3 * n + 1), *o = out;
  for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
    if (isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~') {
      *o++ = (char)*p;
    } else {
      *o++ = '%';
      *o++ = hex[*p >> 4];
      *o++ = hex[*p & 15];
    }
  }
  *o = '\0';
  return out;
}

/* A SCIM filter comparison value (RFC 7644 §3.4.2.2: a JSON string): the
 * text between the quotes, with quotes, backslashes and control characters
 * escaped so a name cannot end the string and inject filter syntax. Caller
 * frees with free(). */
static char *qm_scim_filter_escape(const char *in) {
  size_t n = strlen(in);
  char *out = qm_malloc(6 * n + 1), *o = out;
  for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
    if (*p == '"' || *p == '\\') {
      *o++ = '\\';
      *o++ = (char)*p;
    } else if (*p < 0x20) {
      o += snprintf(o, 7, "\\u%04x", *p);
    } else {
      *o++ = (char)*p;
    }
  }
  *o = '\0';
  return out;
}

/* "<base>/<path>?<base query>&<query>" for a request. Caller frees with free(). */
static char *qm_scim_url(const qm_scim_t *s, const char *path, const char *query) {
  bool bq = s->base_query != NULL, rq = query && *query;
  return qm_asprintf("%s%s%s%s%s%s", s->base, path, bq || rq ? "?" : "", bq ? s->base_query : "",
                     bq && rq ? "&" : "", rq ? query : "");
}

/* Appends "HTTP <status> (scimType <t>): <detail>" from a SCIM error body
 * (status may be a string or an integer; a body that is not SCIM JSON is
 * quoted, shortened). scim_type_out (may be NULL) receives the scimType. */
static void qm_scim_describe(const qm_scim_resp_t *resp, char *out, size_t out_size,
                             char *scim_type_out, size_t scim_type_size) {
  json_t *doc = resp->len ? json_loadb(resp->body, resp->len, 0, NULL) : NULL;
  const char *detail = NULL, *type = NULL;
  char body_status[16] = "";
  bool status_differs = false;
  if (scim_type_out && scim_type_size) scim_type_out[0] = '\0';
  if (json_is_object(doc)) {
    detail = json_string_value(json_object_get(doc, "detail"));
    type = json_string_value(json_object_get(doc, "scimType"));
    json_t *st = json_object_get(doc, "status");
    if (json_is_string(st)) qm_strlcpy(body_status, json_string_value(st), sizeof(body_status));
    else if (json_is_integer(st))
      snprintf(body_status, sizeof(body_status), "%lld", (long long)json_integer_value(st));
  }
  if (body_status[0]) status_differs = strtol(body_status, NULL, 10) != resp->status;
  if (type && scim_type_out) qm_strlcpy(scim_type_out, type, scim_type_size);
  if (detail || type) {
    snprintf(out, out_size, "HTTP %ld%s%s%s%s%s: %s", resp->status, type ? " (scimType " : "",
             type ? type : "", type ? ")" : "",
             status_differs ? ", body status " : "", status_differs ? body_status : "",
             detail ? detail : "no detail");
  } else if (resp->len) {
    char snippet[161];
    size_t n = resp->len < sizeof(snippet) - 1 ? resp->len : sizeof(snippet) - 1;
    for (size_t i = 0; i < n; i++)
      snippet[i] = isprint((unsigned char)resp->body[i]) ? resp->body[i] : ' ';
    snippet[n] = '\0';
    snprintf(out, out_size, "HTTP %ld: %s%s", resp->status, snippet,
             resp->len > n ? "..." : "");
  } else {
    snprintf(out, out_size, "HTTP %ld (empty body)", resp->status);
  }
  json_decref(doc);
}

/* ------------------------------------------------------------ HTTP */

static size_t qm_scim_on_body(char *data, size_t size, size_t nmemb, void *userdata) {
  qm_scim_resp_t *resp = userdata;
  size_t n = size * nmemb;
  if (resp->len + n > QM_SCIM_BODY_MAX) {
    resp->too_big = true;
    return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
  }
  if (resp->len + n + 1 > resp->cap) {
    size_t cap = resp->cap ? resp->cap : 4096;
    while (cap < resp->len + n + 1) cap *= 2;
    resp->body = qm_realloc(resp->body, cap);
    resp->cap = cap;
  }
  memcpy(resp->body + resp->len, data, n);
  resp->len += n;
  resp->body[resp->len] = '\0';
  return n;
}

/* Retry-After (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. -1 when unparsable. */
static int64_t qm_scim_parse_retry_after(const char *v) {
  while (*v == ' ' || *v == '\t') v++;
  if (isdigit((unsigned char)*v)) {
    int64_t secs = 0;
    for (; isdigit((unsigned char)*v); v++) {
      secs = secs * 10 + (*v - '0');
      if (secs > 86400) secs = 86400;
    }
    return secs * 1000;
  }
  time_t t = curl_getdate(v, NULL);
  if (t == (time_t)-1) return -1;
  int64_t ms = (int64_t)t * 1000 - qm_now_ms();
  return ms > 0 ? ms : 0;
}

static size_t qm_scim_on_header(char *data, size_t size, size_t nmemb, void *userdata) {
  qm_scim_resp_t *resp = userdata;
  size_t n = size * nmemb;
  static const char name[] = "retry-after:";
  if (n > sizeof(name) - 1 && n < 256 && strncasecmp(data, name, sizeof(name) - 1) == 0) {
    char value[256];
    size_t vlen = n - (sizeof(name) - 1);
    memcpy(value, data + sizeof(name) - 1, vlen);
    value[vlen] = '\0';
    value[strcspn(value, "\r\n")] = '\0';
    resp->retry_after_ms = qm_scim_parse_retry_after(value);
  }
  return n;
}

/* Aborts a transfer in flight when the process starts shutting down. */
static int qm_scim_on_progress(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
                               curl_off_t ultotal, curl_off_t ulnow) {
  QM_UNUSED(clientp);
  QM_UNUSED(dltotal);
  QM_UNUSED(dlnow);
  QM_UNUSED(ultotal);
  QM_UNUSED(ulnow);
  return qm_shutdown_requested() ? 1 : 0;
}

static CURL *qm_scim_handle_take(qm_scim_t *s) {
  CURL *h = NULL;
  pthread_mutex_lock(&s->pool_mu);
  if (s->npool > 0) h = s->pool[--s->npool];
  pthread_mutex_unlock(&s->pool_mu);
  if (!h) h = curl_easy_init();
  if (!h) {
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"curl_easy_init failed (out of memory)\"}\n");
    abort();
  }
  return h;
}

static void qm_scim_handle_give(qm_scim_t *s, CURL *h) {
  /* Drop the pointers into the caller's stack (error buffer, response);
   * the live connections stay. */
  curl_easy_reset(h);
  pthread_mutex_lock(&s->pool_mu);
  if (s->npool < QM_SCIM_POOL_MAX) {
    s->pool[s->npool++] = h;
    h = NULL;
  }
  pthread_mutex_unlock(&s->pool_mu);
  if (h) curl_easy_cleanup(h);
}

/* One HTTP exchange on h. The handle is reset first: only its connection
 * cache survives from the previous user. */
static CURLcode qm_scim_perform(qm_scim_t *s, CURL *h, const char *method, const char *url,
                                const char *body, qm_scim_resp_t *resp,
                                char curl_err[CURL_ERROR_SIZE]) {
  curl_easy_reset(h);
  curl_err[0] = '\0';
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)s->connect_timeout_ms);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)s->total_timeout_ms);
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
  if (s->ca_file) curl_easy_setopt(h, CURLOPT_CAINFO, s->ca_file);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "quartermaster-scim/1");
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, qm_scim_on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, resp);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, qm_scim_on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, resp);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, qm_scim_on_progress);
  if (body) {
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, s->patch_headers);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
  } else {
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, s->get_headers);
    curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
  }
  CURLcode cc = curl_easy_perform(h);
  if (cc == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp->status);
  return cc;
}

/* Errors of the configuration or of this build, not of the network: retrying
 * cannot help. */
static bool qm_scim_curl_permanent(CURLcode cc) {
  switch (cc) {
  case CURLE_UNSUPPORTED_PROTOCOL:
  case CURLE_URL_MALFORMAT:
  case CURLE_NOT_BUILT_IN:
  case CURLE_BAD_FUNCTION_ARGUMENT:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_LOGIN_DENIED:
    return true;
  default:
    return false;
  }
}

static bool qm_scim_status_retryable(long status) {
  return status == 429 || status == 408 || status >= 500;
}

/* Full jitter (a uniformly random wait in [0, min(max, base * 2^(n-1))]),
 * which spreads many clients retrying against one recovering server. */
static int64_t qm_scim_backoff(const qm_scim_t *s, int retry, uint64_t *rng) {
  int64_t cap = s->backoff_base_ms;
  for (int i = 1; i < retry && cap < s->backoff_max_ms; i++) cap *= 2;
  if (cap > s->backoff_max_ms) cap = s->backoff_max_ms;
  *rng += 0x9E3779B97F4A7C15ull; /* splitmix64 */
  uint64_t z = *rng;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (int64_t)(z % (uint64_t)(cap + 1));
}

/* Sends a request until it gets a final answer. Returns 0 with *resp holding
 * the last response when the server answered with a status that is not worth
 * retrying (2xx, 3xx, 4xx but 408/429 — the caller classifies it); otherwise
 * QM_ETRANSIENT (attempts exhausted), QM_ESHUTDOWN or QM_EINVAL (a permanent
 * transport error), with errstr set. resp->body: free with free() in all cases. */
static int qm_scim_call(qm_scim_t *s, const char *method, const char *path, const char *query,
                        const char *body, qm_scim_resp_t *resp, char *errstr, size_t errstr_size) {
  int rc = QM_ETRANSIENT;
  char *url = qm_scim_url(s, path, query);
  CURL *h = qm_scim_handle_take(s);
  char curl_err[CURL_ERROR_SIZE];
  char last[512] = "no attempt made";
  uint64_t rng = (uint64_t)qm_mono_us() ^ ((uint64_t)(uintptr_t)&rng << 16);

  for (int attempt = 1; attempt <= s->max_attempts; attempt++) {
    if (qm_shutdown_requested()) {
      rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "scim %s %s: shutting down (last: %s)",
                  method, path, last);
      goto out;
    }
    resp->status = 0;
    resp->len = 0;
    if (resp->body) resp->body[0] = '\0';
    resp->too_big = false;
    resp->retry_after_ms = -1;
    atomic_fetch_add(&s->attempts, 1);
    if (attempt > 1) atomic_fetch_add(&s->retries, 1);

    CURLcode cc = qm_scim_perform(s, h, method, url, body, resp, curl_err);
    if (cc == CURLE_ABORTED_BY_CALLBACK) {
      rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "scim %s %s: aborted: shutting down",
                  method, path);
      goto out;
    }
    if (cc == CURLE_WRITE_ERROR && resp->too_big) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim %s %s: response larger than %u bytes",
                  method, path, QM_SCIM_BODY_MAX);
      goto out;
    }
    if (cc != CURLE_OK) {
      snprintf(last, sizeof(last), "%s: %s", curl_easy_strerror(cc),
               curl_err[0] ? curl_err : "no detail");
      if (qm_scim_curl_permanent(cc)) {
        rc = qm_err(errstr, errstr_size, QM_EINVAL,
                    "scim %s %s: %s — check the base URL, CA file and TLS set-up", method, path,
                    last);
        goto out;
      }
    } else if (qm_scim_status_retryable(resp->status)) {
      qm_scim_describe(resp, last, sizeof(last), NULL, 0);
    } else {
      rc = QM_OK;
      goto out;
    }

    if (attempt == s->max_attempts) break;
    int64_t delay = qm_scim_backoff(s, attempt, &rng);
    if (cc == CURLE_OK && (resp->status == 429 || resp->status == 503) &&
        resp->retry_after_ms >= 0)
      delay = resp->retry_after_ms < s->backoff_max_ms ? resp->retry_after_ms : s->backoff_max_ms;
    qm_log_warn("scim %s %s: attempt %d of %d failed (%s); retrying in %lld ms", method, path,
                attempt, s->max_attempts, last, (long long)delay);
    qm_sleep_ms(delay);
  }
  rc = qm_err(errstr, errstr_size, QM_ETRANSIENT, "scim %s %s: failed after %d attempts: %s",
              method, path, s->max_attempts, last);

out:
  qm_scim_handle_give(s, h);
  free(url);
  return rc;
}

/* Maps a final non-2xx answer to a status code, with the reason in errstr. */
static int qm_scim_http_error(const qm_scim_resp_t *resp, const char *method, const char *path,
                              char *errstr, size_t errstr_size) {
  char why[512];
  qm_scim_describe(resp, why, sizeof(why), NULL, 0);
  int rc;
  const char *hint = "";
  if (resp->status == 401 || resp->status == 403) {
    rc = QM_EAUTH;
    hint = " — check the SCIM bearer token and its scopes";
  } else if (resp->status == 404) {
    rc = QM_ENOTFOUND;
  } else if (resp->status >= 300 && resp->status < 400) {
    rc = QM_EINVAL;
    hint = " — redirects are not followed: fix the base URL";
  } else {
    rc = QM_EINVAL;
  }
  return qm_err(errstr, errstr_size, rc, "scim %s %s: %s%s", method, path, why, hint);
}

static json_t *qm_scim_parse(const qm_scim_resp_t *resp, const char *method, const char *path,
                             char *errstr, size_t errstr_size) {
  json_error_t jerr;
  json_t *doc = json_loadb(resp->body ? resp->body : "", resp->len, 0, &jerr);
  if (!json_is_object(doc)) {
    qm_err(errstr, errstr_size, QM_EIO, "scim %s %s: HTTP %ld with a body that is not a JSON "
           "object (%s)", method, path, resp->status, doc ? "not an object" : jerr.text);
    json_decref(doc);
    return NULL;
  }
  return doc;
}

/* ------------------------------------------------------------ operations */

/* Shared by find_user and find_group: GET /<resource>?filter=<attr> eq "<name>". */
static int qm_scim_find(qm_scim_t *s, char kind, const char *resource, const char *attr,
                        const char *name, char *id_out, size_t id_size, char *errstr,
                        size_t errstr_size) {
  int rc = QM_OK;
  qm_scim_resp_t resp = {0};
  json_t *doc = NULL;
  char *key = NULL, *escaped = NULL, *filter = NULL, *encoded = NULL, *query = NULL;
  char path[64];
  snprintf(path, sizeof(path), "/%s", resource);

  if (!name || !*name || !id_out || id_size == 0) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim: find %s: empty name or no output", resource);
    goto out;
  }
  key = qm_asprintf("%c\x1f%s", kind, name);
  if (qm_scim_cache_get(s, key, id_out, id_size)) {
    atomic_fetch_add(&s->cache_hits, 1);
    goto out;
  }
  atomic_fetch_add(&s->cache_misses, 1);

  escaped = qm_scim_filter_escape(name);
  filter = qm_asprintf("%s eq \"%s\"", attr, escaped);
  encoded = qm_scim_urlencode(filter);
  query = qm_asprintf("filter=%s", encoded);
  rc = qm_scim_call(s, "GET", path, query, NULL, &resp, errstr, errstr_size);
  if (rc) goto out;
  if (resp.status != 200) {
    rc = qm_scim_http_error(&resp, "GET", path, errstr, errstr_size);
    if (rc == QM_ENOTFOUND)
      qm_err(errstr, errstr_size, rc, "scim: no %s with %s '%s' (HTTP 404)", resource, attr, name);
    goto out;
  }
  doc = qm_scim_parse(&resp, "GET", path, errstr, errstr_size);
  if (!doc) { rc = QM_EIO; goto out; }

  /* userName and displayName compare case-insensitively on most servers: take
   * the exact match when there is one, else a single case-insensitive one. */
  json_t *resources = json_object_get(doc, "Resources"), *found = NULL, *r;
  size_t i, candidates = 0;
  json_array_foreach(resources, i, r) {
    const char *v = json_string_value(json_object_get(r, attr));
    if (!v) continue;
    if (strcmp(v, name) == 0) { found = r; candidates = 1; break; }
    if (strcasecmp(v, name) == 0) { found = r; candidates++; }
  }
  if (!found && json_array_size(resources) == 1) {
    found = json_array_get(resources, 0);
    candidates = 1;
  }
  if (!found) {
    rc = qm_err(errstr, errstr_size, QM_ENOTFOUND, "scim: no %s with %s '%s'", resource, attr,
                name);
    goto out;
  }
  if (candidates > 1) {
    rc = qm_err(errstr, errstr_size, QM_ECONFLICT, "scim: %zu %s match %s '%s' ignoring case, "
                "none exactly", candidates, resource, attr, name);
    goto out;
  }
  const char *id = json_string_value(json_object_get(found, "id"));
  if (!id || !*id) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "scim: %s '%s' came back without an id", resource,
                name);
    goto out;
  }
  if (strlen(id) >= id_size) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim: id of %s '%s' needs %zu bytes, have %zu",
                resource, name, strlen(id) + 1, id_size);
    goto out;
  }
  memcpy(id_out, id, strlen(id) + 1);
  qm_scim_cache_put(s, key, id);

out:
  if (rc) atomic_fetch_add(&s->failures, 1);
  json_decref(doc);
  free(resp.body);
  free(query);
  free(encoded);
  free(filter);
  free(escaped);
  free(key);
  return rc;
}

int qm_scim_find_user(qm_scim_t *s, const char *user_name, char *id_out, size_t id_size,
                      char *errstr, size_t errstr_size) {
  return qm_scim_find(s, 'U', "Users", "userName", user_name, id_out, id_size, errstr,
                      errstr_size);
}

int qm_scim_find_group(qm_scim_t *s, const char *display_name, char *id_out, size_t id_size,
                       char *errstr, size_t errstr_size) {
  return qm_scim_find(s, 'G', "Groups", "displayName", display_name, id_out, id_size, errstr,
                      errstr_size);
}

/* PATCH /Groups/{group_id} with one member operation; add is true for add.
 * An add may carry n members in one operation; a remove always one. */
static int qm_scim_patch_member(qm_scim_t *s, bool add, const char *group_id,
                                const char *const *user_ids, size_t n, char *errstr,
                                size_t errstr_size) {
  int rc = QM_OK;
  qm_scim_resp_t resp = {0};
  json_t *op = NULL, *doc = NULL;
  char *gid = NULL, *path = NULL, *body = NULL, *escaped = NULL, *filter = NULL;
  const char *user_id = n > 0 ? user_ids[0] : NULL;
  bool ids_ok = group_id && *group_id && n > 0 && (add || n == 1);
  for (size_t i = 0; ids_ok && i < n; i++) ids_ok = user_ids[i] && *user_ids[i];
  if (!ids_ok) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim: %s member: empty group or user id",
                add ? "add" : "remove");
    goto out;
  }
  bool entra = s->dialect == QM_SCIM_DIALECT_ENTRA;
  if (add) {
    /* RFC 7644 §3.5.2.1: adding a value already present changes nothing. */
    json_t *values = json_array();
    for (size_t i = 0; i < n; i++)
      json_array_append_new(values, json_pack("{s:s}", "value", user_ids[i]));
    op = json_pack("{s:s, s:s, s:o}", "op", entra ? "Add" : "add", "path", "members", "value",
                   values);
  } else {
    /* RFC 7644 §3.5.2.2: a value filter removes exactly that member; a bare
     * "members" path would remove every member of the group. Entra ID accepts
     * this form only when the tenant URL carries ?aadOptscim062020 (otherwise
     * it expects path "members" with a value list); putting that flag into the
     * base URL is the operator's job — qm_scim_url() keeps it on every call. */
    escaped = qm_scim_filter_escape(user_id);
    filter = qm_asprintf("members[value eq \"%s\"]", escaped);
    op = json_pack("{s:s, s:s}", "op", entra ? "Remove" : "remove", "path", filter);
  }
  doc = json_pack("{s:[s], s:[o]}", "schemas", QM_SCIM_PATCHOP, "Operations", op);
  op = NULL; /* doc took ownership ("o") */
  if (!doc) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim: ids are not valid UTF-8");
    goto out;
  }
  body = json_dumps(doc, JSON_COMPACT);
  if (!body) {
    fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory encoding a SCIM PatchOp\"}\n");
    abort();
  }
  gid = qm_scim_urlencode(group_id);
  path = qm_asprintf("/Groups/%s", gid);
  rc = qm_scim_call(s, "PATCH", path, NULL, body, &resp, errstr, errstr_size);
  if (rc) goto out;
  /* 200 with the group or 204 without (Okta answers either). */
  if (resp.status >= 200 && resp.status < 300) goto out;

  char scim_type[64];
  char why[512];
  qm_scim_describe(&resp, why, sizeof(why), scim_type, sizeof(scim_type));
  if (add && resp.status == 409 && n > 1) {
    /* A server that refuses a duplicate refuses the whole operation, so the
     * others may not have been added: add them one by one. */
    for (size_t i = 0; i < n && rc == QM_OK; i++)
      rc = qm_scim_patch_member(s, true, group_id, &user_ids[i], 1, errstr, errstr_size);
    goto out;
  }
  if (add && resp.status == 409) {
    /* Servers that treat members as a uniqueness-checked list answer an add of
     * an existing member with 409 (scimType uniqueness): the member is there,
     * which is what was asked. */
    qm_log_debug("scim: %s already in group %s (%s)", user_id, group_id, why);
    goto out;
  }
  if (!add && (resp.status == 404 ||
               (resp.status == 400 && strcasecmp(scim_type, "noTarget") == 0))) {
    /* RFC 7644 §3.5.2.2 lets a server answer a remove whose filter matches no
     * member with 400 noTarget, and some answer 404 (no such member — or no
     * such group). Either way the user is not a member, which is what was
     * asked: removing is idempotent. */
    qm_log_debug("scim: %s not in group %s (%s)", user_id, group_id, why);
    goto out;
  }
  rc = qm_scim_http_error(&resp, "PATCH", path, errstr, errstr_size);
  if (rc == QM_ENOTFOUND) qm_scim_cache_forget_id(s, group_id);

out:
  if (rc) atomic_fetch_add(&s->failures, 1);
  free(resp.body);
  free(path);
  free(gid);
  free(body);
  json_decref(doc);
  json_decref(op);
  free(filter);
  free(escaped);
  return rc;
}

int qm_scim_add_member(qm_scim_t *s, const char *group_id, const char *user_id, char *errstr,
                       size_t errstr_size) {
  return qm_scim_patch_member(s, true, group_id, &user_id, 1, errstr, errstr_size);
}

int qm_scim_add_members(qm_scim_t *s, const char *group_id, const char *const *user_ids,
                        size_t n, char *errstr, size_t errstr_size) {
  return qm_scim_patch_member(s, true, group_id, user_ids, n, errstr, errstr_size);
}

int qm_scim_remove_member(qm_scim_t *s, const char *group_id, const char *user_id,
                          char *errstr, size_t errstr_size) {
  return qm_scim_patch_member(s, false, group_id, &user_id, 1, errstr, errstr_size);
}

/* Reads a top-level integer that a server may also send as a string. -1 when absent. */
static long long qm_scim_json_int(const json_t *obj, const char *name) {
  json_t *v = json_object_get(obj, name);
  if (json_is_integer(v)) return json_integer_value(v);
  if (json_is_string(v)) {
    char *end = NULL;
    long long n = strtoll(json_string_value(v), &end, 10);
    if (end && *end == '\0') return n;
  }
  return -1;
}

int qm_scim_list_members(qm_scim_t *s, const char *group_id, qm_scim_member_fn cb, void *ctx,
                         char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  json_t *all = json_array();
  char *gid = NULL, *path = NULL;
  if (!group_id || !*group_id || !cb) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "scim: list members: no group id or callback");
    goto out;
  }
  gid = qm_scim_urlencode(group_id);
  path = qm_asprintf("/Groups/%s", gid);

  long long start = 1;
  for (int page = 0; page < QM_SCIM_MAX_PAGES; page++) {
    qm_scim_resp_t resp = {0};
    char query[96];
    if (page == 0)
      snprintf(query, sizeof(query), "attributes=members");
    else
      snprintf(query, sizeof(query), "attributes=members&startIndex=%lld", start);
    rc = qm_scim_call(s, "GET", path, query, NULL, &resp, errstr, errstr_size);
    if (rc == QM_OK && resp.status != 200)
      rc = qm_scim_http_error(&resp, "GET", path, errstr, errstr_size);
    json_t *doc = rc ? NULL : qm_scim_parse(&resp, "GET", path, errstr, errstr_size);
    free(resp.body);
    if (!rc && !doc) rc = QM_EIO;
    if (rc) break;

    /* The group itself, or (some servers) a ListResponse holding it. */
    json_t *group = doc, *resources = json_object_get(doc, "Resources");
    if (json_is_array(resources)) group = json_array_get(resources, 0);
    json_t *members = json_object_get(group, "members");
    size_t got = json_array_size(members);
    json_array_extend(all, members);

    /* Member paging, when the server does it on the group resource. */
    long long st = qm_scim_json_int(doc, "startIndex");
    long long per = qm_scim_json_int(doc, "itemsPerPage");
    long long total = qm_scim_json_int(doc, "totalResults");
    bool paged = !json_is_array(resources) && st >= 1 && per > 0 && total >= 0 && got > 0 &&
                 st - 1 + per < total;
    json_decref(doc);
    if (!paged) break;
    start = st + per;
    if (page == QM_SCIM_MAX_PAGES - 1) {
      rc = qm_err(errstr, errstr_size, QM_EIO, "scim: group %s: more than %d member pages",
                  group_id, QM_SCIM_MAX_PAGES);
    }
  }

out:
  if (rc == QM_ENOTFOUND) qm_scim_cache_forget_id(s, group_id);
  if (rc) atomic_fetch_add(&s->failures, 1);
  else {
    /* Everything fetched: only now hand members out. */
    size_t i;
    json_t *m;
    json_array_foreach(all, i, m) {
      const char *value = json_string_value(json_object_get(m, "value"));
      if (!value) continue;
      rc = cb(ctx, value, json_string_value(json_object_get(m, "display")),
              json_string_value(json_object_get(m, "type")));
      if (rc) break;
    }
  }
  json_decref(all);
  free(path);
  free(gid);
  return rc;
}
