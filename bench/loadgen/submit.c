/*
 * submit.c: the HTTP half of qm-loadgen. One libcurl multi handle drives a
 * fixed pool of easy handles (one per allowed request in flight, reused so
 * keep-alive connections are reused too) against intake's POST /v1/requests.
 *
 * Pacing is a token bucket: tokens accrue at the target rate and a request
 * starts only with a token in hand and a free slot. The bucket holds at most
 * 20 ms worth of tokens (at least two, so a late wake-up is not lost), so when the service falls behind and
 * every slot is busy the generator does not save up a burst to "catch up":
 * the achieved rate simply drops below the target, and the report shows it.
 * Rate 0 means no bucket: a new request starts whenever a slot is free.
 *
 * Bodies: request i is for person p-(i mod P + 1) and for the auto-approved
 * role (i mod P + i div P) mod 6, P being --people (300, the local
 * directory), so load spreads over people and directory groups and a
 * (person, role) pair repeats only every 6 x P requests. With --extend, a pair its person
 * already holds names the request that granted it as extends_request_id,
 * which intake requires (it refuses a second grant of a held role).
 *
 * Each record's start time is taken when its transfer is handed to libcurl,
 * so end-to-end latencies measured from it include any time the request
 * waited for a connection, never time it waited for a free slot.
 */
#include "loadgen.h"

#include "qm_common.h"

#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LG_BODY_MAX (1024 * 1024) /* response bytes kept per request */
#define LG_BURST_S 0.020          /* the bucket holds this many seconds of tokens */

/* The auto-approved roles of deploy/local/catalog/apps.yaml. */
static const char *const lg_roles[][2] = {
    {"slack", "user"},      {"zoom", "user"},   {"jira", "user"},
    {"confluence", "user"}, {"github", "read"}, {"figma", "viewer"},
};
_Static_assert(QM_ARRAY_LEN(lg_roles) == LG_ROLES, "LG_ROLES counts lg_roles");

typedef struct {
  CURL *easy;
  struct curl_slist *headers; /* this transfer's headers; freed when it ends */
  size_t idx;                 /* which request the slot is carrying */
  bool busy;
  char *body; /* response bytes, NUL-terminated */
  size_t len;
  char errbuf[CURL_ERROR_SIZE];
} lg_slot_t;

/* CURLOPT_WRITEFUNCTION: keeps up to LG_BODY_MAX bytes of the response. */
static size_t lg_write(char *data, size_t size, size_t nmemb, void *userdata) {
  lg_slot_t *s = userdata;
  size_t n = size * nmemb;
  size_t take = s->len + n > LG_BODY_MAX ? LG_BODY_MAX - s->len : n;
  if (take > 0) {
    s->body = qm_realloc(s->body, s->len + take + 1);
    memcpy(s->body + s->len, data, take);
    s->len += take;
    s->body[s->len] = '\0';
  }
  return n;
}

/* Starts request idx on slot s. */
static int lg_launch(CURLM *multi, const lg_submit_conf_t *conf, lg_slot_t *s, size_t idx,
                     lg_req_t *r) {
  char body[320], ext[80] = "", hdr[2048], key[QM_UUID_STR_LEN];
  /* Consecutive requests go to different people and different roles (so
   * different directory groups, as real traffic does); person p gets every
   * role once per 6 x people requests before any pair repeats. */
  size_t person = idx % conf->people;
  size_t role = (person + idx / conf->people) % QM_ARRAY_LEN(lg_roles);
  const char *held = lg_held_find(conf->held, person, lg_roles[role][0], lg_roles[role][1]);
  if (held) snprintf(ext, sizeof(ext), "\"extends_request_id\":\"%s\",", held);
  snprintf(body, sizeof(body),
           "{\"subject_person_id\":\"p-%04zu\",\"reason\":\"benchmark\",%s"
           "\"lines\":[{\"item_id\":\"%s\",\"role_id\":\"%s\"}]}",
           person + 1, ext, lg_roles[role][0], lg_roles[role][1]);
  r->extends = held != NULL;
  curl_slist_free_all(s->headers);
  s->headers = NULL;
  snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s", conf->token);
  s->headers = curl_slist_append(s->headers, hdr);
  s->headers = curl_slist_append(s->headers, "Content-Type: application/json");
  s->headers = curl_slist_append(s->headers, "Accept: application/json");
  s->headers = curl_slist_append(s->headers, "Expect:");
  qm_uuid_new(key);
  snprintf(hdr, sizeof(hdr), "Idempotency-Key: %s", key);
  s->headers = curl_slist_append(s->headers, hdr);
  if (!s->headers) return QM_EIO;
  curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, s->headers);
  curl_easy_setopt(s->easy, CURLOPT_COPYPOSTFIELDS, body);
  s->len = 0;
  if (s->body) s->body[0] = '\0';
  s->errbuf[0] = '\0';
  s->idx = idx;
  r->start_us = qm_mono_us();
  r->start_ms = qm_now_ms();
  if (curl_multi_add_handle(multi, s->easy) != CURLM_OK) {
    r->start_us = 0;
    return QM_EIO;
  }
  s->busy = true;
  return QM_OK;
}

/* The id of a 201's JSON body, copied into id; false when there is none. */
static bool lg_created_id(const char *body, char *id, size_t id_size) {
  bool ok = false;
  json_t *root = body ? json_loads(body, 0, NULL) : NULL;
  const char *s = json_string_value(json_object_get(root, "id"));
  if (s && *s && strlen(s) < id_size) {
    qm_strlcpy(id, s, id_size);
    ok = true;
  }
  json_decref(root);
  return ok;
}

/* Records a finished transfer and frees its slot. */
static void lg_finish(CURLM *multi, const lg_submit_conf_t *conf, lg_slot_t *s, CURLcode res,
                      lg_req_t *reqs, lg_submit_info_t *info, size_t *n_failed) {
  lg_req_t *r = &reqs[s->idx];
  long code = 0;
  r->end_us = qm_mono_us();
  r->curl_error = (int)res;
  if (res == CURLE_OK) curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &code);
  r->status = (int)code;
  bool ok = r->status == 201 && lg_created_id(s->body, r->id, sizeof(r->id));
  if (ok && conf->on_created) conf->on_created(conf->cb_ctx, r->id);
  if (!ok && (*n_failed)++ == 0) {
    if (res != CURLE_OK) {
      qm_strlcpy(info->sample_status, "curl", sizeof(info->sample_status));
      qm_strlcpy(info->sample_body, s->errbuf[0] ? s->errbuf : curl_easy_strerror(res),
                 sizeof(info->sample_body));
    } else {
      snprintf(info->sample_status, sizeof(info->sample_status), "%d", r->status);
      qm_strlcpy(info->sample_body, s->body ? s->body : "", sizeof(info->sample_body));
    }
  }
  curl_multi_remove_handle(multi, s->easy);
  curl_slist_free_all(s->headers);
  s->headers = NULL;
  s->busy = false;
}

int lg_submit_run(const lg_submit_conf_t *conf, lg_req_t *reqs, lg_submit_info_t *info,
                  char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  size_t nslots = (size_t)conf->concurrency;
  lg_slot_t *slots = qm_calloc(nslots, sizeof(*slots));
  CURLM *multi = curl_multi_init();
  size_t next = 0, done = 0, in_flight = 0, n_failed = 0;
  double burst = conf->rate > 0 ? fmax(2.0, (double)conf->rate * LG_BURST_S) : 0;
  double tokens = conf->rate > 0 ? 1.0 : 0;
  int64_t refilled_us = qm_mono_us();

  memset(info, 0, sizeof(*info));
  memset(reqs, 0, conf->n * sizeof(*reqs));
  if (!multi) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "curl_multi_init failed");
    goto out;
  }
  curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)nslots);
  for (size_t i = 0; i < nslots; i++) {
    lg_slot_t *s = &slots[i];
    s->easy = curl_easy_init();
    if (!s->easy) {
      rc = qm_err(errstr, errstr_size, QM_EIO, "curl_easy_init failed");
      goto out;
    }
    curl_easy_setopt(s->easy, CURLOPT_URL, conf->url);
    curl_easy_setopt(s->easy, CURLOPT_POST, 1L);
    curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, lg_write);
    curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(s->easy, CURLOPT_ERRORBUFFER, s->errbuf);
    curl_easy_setopt(s->easy, CURLOPT_TIMEOUT_MS, conf->http_timeout_ms);
    curl_easy_setopt(s->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(s->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(s->easy, CURLOPT_PRIVATE, s);
  }

  while (done < conf->n) {
    if (qm_shutdown_requested()) {
      info->interrupted = true;
      rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "interrupted after %zu of %zu requests",
                  done, conf->n);
      goto out;
    }
    if (conf->rate > 0) {
      int64_t now = qm_mono_us();
      tokens = fmin(burst, tokens + (double)(now - refilled_us) * (double)conf->rate / 1e6);
      refilled_us = now;
    }
    for (size_t i = 0; i < nslots && next < conf->n; i++) {
      if (slots[i].busy) continue;
      if (conf->rate > 0 && tokens < 1.0) break;
      if (lg_launch(multi, conf, &slots[i], next, &reqs[next]) != QM_OK) {
        rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start request %zu", next);
        goto out;
      }
      tokens -= conf->rate > 0 ? 1.0 : 0;
      next++;
      in_flight++;
    }
    int running = 0;
    curl_multi_perform(multi, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(multi, &left))) {
      if (msg->msg != CURLMSG_DONE) continue;
      lg_slot_t *s = NULL;
      CURLcode res = msg->data.result; /* read before the handle is removed */
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
      lg_finish(multi, conf, s, res, reqs, info, &n_failed);
      done++;
      in_flight--;
    }
    if (done >= conf->n) break;
    /* Sleep in libcurl until a socket is ready, or until the next token when
     * a slot is free for it (at least 1 ms: the poll's resolution). */
    int wait_ms = 100;
    if (conf->rate > 0 && next < conf->n && in_flight < nslots) {
      double need_s = (1.0 - tokens) / (double)conf->rate;
      wait_ms = need_s <= 0 ? 0 : (int)fmin(100.0, ceil(need_s * 1000.0));
    } else if (conf->rate == 0 && next < conf->n && in_flight < nslots) {
      wait_ms = 0;
    }
    if (wait_ms > 0) curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
  }
out:
  for (size_t i = 0; i < nslots; i++) {
    if (slots[i].busy) curl_multi_remove_handle(multi, slots[i].easy);
    if (slots[i].easy) curl_easy_cleanup(slots[i].easy);
    curl_slist_free_all(slots[i].headers);
    free(slots[i].body);
  }
  if (multi) curl_multi_cleanup(multi);
  free(slots);
  return rc;
}
