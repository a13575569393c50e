/*
 * recorder: the HTTP recorder of harness.h — a libmicrohttpd server on a free
 * loopback port that records every request and answers as configured, for
 * tests of services that call outside systems (webhooks, procurement,
 * carriers). One thread per connection, so a delayed answer does not hold up
 * the others; everything recorded is behind one mutex.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "harness.h"

#include <criterion/criterion.h>
#include <ctype.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IT_REC_MAX_PREFIXES 32
#define IT_REC_MAX_BODY (4 * 1024 * 1024)

typedef struct {
  char *prefix;
  int status;
  char *body;
} it_rec_response_t;

struct it_recorder {
  struct MHD_Daemon *daemon;
  int port;
  char url[64];
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int default_status;
  int delay_ms;
  volatile int stopping;
  it_rec_response_t responses[IT_REC_MAX_PREFIXES];
  size_t n_responses;
  json_t *requests; /* array of recorded requests, arrival order */
};

/* Per-request state while the body arrives. */
typedef struct {
  char *body;
  size_t len;
  bool too_big;
} it_rec_conn_t;

static enum MHD_Result it_rec_header_cb(void *cls, enum MHD_ValueKind kind, const char *key,
                            const char *value) {
  (void)kind;
  json_t *headers = cls;
  char name[128];
  size_t i = 0;
  for (; key[i] && i + 1 < sizeof(name); i++) name[i] = (char)tolower((unsigned char)key[i]);
  name[i] = '\0';
  json_object_set_new(headers, name, json_string(value ? value : ""));
  return MHD_YES;
}

static bool it_rec_prefix_match(const char *path, const char *prefix) {
  return prefix == NULL || strncmp(path, prefix, strlen(prefix)) == 0;
}

static enum MHD_Result it_rec_handler(void *cls, struct MHD_Connection *conn, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
  (void)version;
  it_recorder_t *r = cls;
  it_rec_conn_t *c = *con_cls;
  if (c == NULL) {
    c = calloc(1, sizeof(*c));
    if (c == NULL) return MHD_NO;
    *con_cls = c;
    return MHD_YES;
  }
  if (*upload_data_size > 0) {
    if (c->len + *upload_data_size > IT_REC_MAX_BODY) {
      c->too_big = true;
    } else {
      char *nb = realloc(c->body, c->len + *upload_data_size + 1);
      if (nb == NULL) return MHD_NO;
      c->body = nb;
      memcpy(c->body + c->len, upload_data, *upload_data_size);
      c->len += *upload_data_size;
      c->body[c->len] = '\0';
    }
    *upload_data_size = 0;
    return MHD_YES;
  }

  /* The whole request is here: record it. The path keeps its query string. */
  json_t *headers = json_object();
  MHD_get_connection_values(conn, MHD_HEADER_KIND, it_rec_header_cb, headers);
  char path[2048];
  snprintf(path, sizeof(path), "%s", url);
  json_t *query = json_object();
  MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, it_rec_header_cb, query);
  if (json_object_size(query) > 0) {
    size_t n = strlen(path);
    const char *k;
    json_t *v;
    char sep = '?';
    json_object_foreach(query, k, v) {
      n += (size_t)snprintf(path + n, n < sizeof(path) ? sizeof(path) - n : 0, "%c%s=%s", sep, k,
                            json_string_value(v));
      sep = '&';
      if (n >= sizeof(path)) break;
    }
  }
  json_decref(query);

  int status;
  char *body = NULL;
  int delay;
  pthread_mutex_lock(&r->mu);
  status = r->default_status;
  size_t best = 0;
  for (size_t i = 0; i < r->n_responses; i++) {
    size_t pl = strlen(r->responses[i].prefix);
    if (pl >= best && strncmp(url, r->responses[i].prefix, pl) == 0) {
      best = pl;
      status = r->responses[i].status;
      free(body);
      body = r->responses[i].body ? strdup(r->responses[i].body) : NULL;
    }
  }
  delay = r->delay_ms;
  if (c->too_big) status = 413;
  /* Recorded with how it is answered, so a test can tell a request answered
   * at once from one left hanging. */
  json_array_append_new(r->requests,
                        json_pack("{s:s, s:s, s:o, s:s, s:i, s:i}", "method", method, "path", path,
                                  "headers", headers, "body", c->body ? c->body : "", "status",
                                  status, "delay_ms", delay));
  pthread_cond_broadcast(&r->cv);
  pthread_mutex_unlock(&r->mu);

  for (int waited = 0; waited < delay && !r->stopping; waited += 10) it_sleep_ms(10);

  if (body == NULL) body = strdup("{}");
  struct MHD_Response *resp =
      MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
  MHD_add_response_header(resp, "Content-Type", "application/json");
  enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, resp);
  MHD_destroy_response(resp);
  return ret;
}

static void it_rec_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                             enum MHD_RequestTerminationCode toe) {
  (void)cls;
  (void)conn;
  (void)toe;
  it_rec_conn_t *c = *con_cls;
  if (c != NULL) {
    free(c->body);
    free(c);
    *con_cls = NULL;
  }
}

it_recorder_t *it_recorder_start(void) {
  it_recorder_t *r = calloc(1, sizeof(*r));
  cr_assert_not_null(r);
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->cv, NULL);
  r->default_status = 200;
  r->requests = json_array();
  r->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION,
                               0, NULL, NULL, it_rec_handler, r, MHD_OPTION_NOTIFY_COMPLETED,
                               it_rec_completed, r, MHD_OPTION_CONNECTION_TIMEOUT,
                               (unsigned)120, MHD_OPTION_END);
  cr_assert_not_null(r->daemon, "it_recorder_start: MHD_start_daemon failed");
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(r->daemon, MHD_DAEMON_INFO_BIND_PORT);
  cr_assert(info != NULL && info->port != 0, "it_recorder_start: no bound port");
  r->port = info->port;
  snprintf(r->url, sizeof(r->url), "http://127.0.0.1:%d", r->port);
  return r;
}

const char *it_recorder_url(const it_recorder_t *r) { return r->url; }
int it_recorder_port(const it_recorder_t *r) { return r->port; }

void it_recorder_set_status(it_recorder_t *r, int status) {
  pthread_mutex_lock(&r->mu);
  r->default_status = status;
  pthread_mutex_unlock(&r->mu);
}

void it_recorder_set_response(it_recorder_t *r, const char *path_prefix, int status,
                              const char *body) {
  pthread_mutex_lock(&r->mu);
  it_rec_response_t *slot = NULL;
  for (size_t i = 0; i < r->n_responses; i++)
    if (strcmp(r->responses[i].prefix, path_prefix) == 0) slot = &r->responses[i];
  if (slot == NULL) {
    if (r->n_responses == IT_REC_MAX_PREFIXES) {
      pthread_mutex_unlock(&r->mu);
      cr_assert_fail("it_recorder_set_response: more than %d prefixes", IT_REC_MAX_PREFIXES);
    }
    slot = &r->responses[r->n_responses++];
    slot->prefix = strdup(path_prefix);
  } else {
    free(slot->body);
  }
  slot->status = status;
  slot->body = body ? strdup(body) : NULL;
  pthread_mutex_unlock(&r->mu);
}

void it_recorder_set_delay_ms(it_recorder_t *r, int ms) {
  pthread_mutex_lock(&r->mu);
  r->delay_ms = ms;
  pthread_mutex_unlock(&r->mu);
}

/* Counts matching requests; r->mu held. */
static size_t it_rec_count_locked(it_recorder_t *r, const char *path_prefix) {
  size_t n = 0, i;
  json_t *req;
  json_array_foreach(r->requests, i, req) {
    if (it_rec_prefix_match(json_string_value(json_object_get(req, "path")), path_prefix)) n++;
  }
  return n;
}

size_t it_recorder_count(it_recorder_t *r, const char *path_prefix) {
  pthread_mutex_lock(&r->mu);
  size_t n = it_rec_count_locked(r, path_prefix);
  pthread_mutex_unlock(&r->mu);
  return n;
}

bool it_recorder_wait(it_recorder_t *r, const char *path_prefix, size_t n, int timeout_ms) {
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_ms / 1000;
  deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&r->mu);
  bool ok;
  while (!(ok = it_rec_count_locked(r, path_prefix) >= n)) {
    if (pthread_cond_timedwait(&r->cv, &r->mu, &deadline) != 0) {
      ok = it_rec_count_locked(r, path_prefix) >= n;
      break;
    }
  }
  pthread_mutex_unlock(&r->mu);
  return ok;
}

json_t *it_recorder_requests(it_recorder_t *r, const char *path_prefix) {
  json_t *out = json_array();
  size_t i;
  json_t *req;
  pthread_mutex_lock(&r->mu);
  json_array_foreach(r->requests, i, req) {
    if (it_rec_prefix_match(json_string_value(json_object_get(req, "path")), path_prefix))
      json_array_append_new(out, json_deep_copy(req));
  }
  pthread_mutex_unlock(&r->mu);
  return out;
}

char *it_recorder_body(it_recorder_t *r, const char *path_prefix, size_t i) {
  json_t *all = it_recorder_requests(r, path_prefix);
  json_t *req = json_array_get(all, i);
  char *body = req ? strdup(json_string_value(json_object_get(req, "body"))) : NULL;
  json_decref(all);
  return body;
}

void it_recorder_clear(it_recorder_t *r) {
  pthread_mutex_lock(&r->mu);
  json_array_clear(r->requests);
  pthread_mutex_unlock(&r->mu);
}

void it_recorder_stop(it_recorder_t *r) {
  if (r == NULL) return;
  r->stopping = 1;
  MHD_stop_daemon(r->daemon);
  for (size_t i = 0; i < r->n_responses; i++) {
    free(r->responses[i].prefix);
    free(r->responses[i].body);
  }
  json_decref(r->requests);
  pthread_cond_destroy(&r->cv);
  pthread_mutex_destroy(&r->mu);
  free(r);
}
