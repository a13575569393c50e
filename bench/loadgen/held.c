/*
 * held.c: what the benchmark's people already hold, for qm-loadgen --extend.
 * Intake refuses a request for a role its subject already holds (409
 * already_held) unless it extends an earlier request of that subject
 * (extends_request_id). The local directory has 300 people, so after a few
 * runs every (person, role) pair the generator uses is held and every fresh
 * request would be refused. With --extend, qm-loadgen first asks intake,
 * for each person, which granted requests they have (GET
 * /v1/requests?subject=<person>&status=granted, newest first, every page)
 * and remembers the newest request per (item, role); a request for a held
 * pair then extends that one and goes the whole way through approval and
 * provisioning like a fresh one.
 *
 * The look-ups run over libcurl multi, a few at a time, before the first
 * submission; their time is not part of any figure.
 */
#include "loadgen.h"

#include "qm_common.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LG_HELD_PARALLEL 8    /* look-ups in flight */
#define LG_HELD_PAGE 200      /* intake's largest page */
#define LG_HELD_MAX_PAGES 50  /* per person: 10,000 granted requests is plenty */
#define LG_HELD_BODY_MAX (8 * 1024 * 1024)

typedef struct {
  char item[48];
  char role[48];
  char id[LG_ID_MAX];
} lg_held_entry_t;

typedef struct {
  lg_held_entry_t *v;
  size_t n, cap;
} lg_held_person_t;

struct lg_held {
  lg_held_person_t *people; /* index i is p-(i + 1) */
  size_t n_people;
  size_t n_entries;
};

/* One look-up in flight. */
typedef struct {
  CURL *easy;
  size_t person; /* 0-based */
  int pages;     /* pages already read for this person */
  bool busy;
  char *body;
  size_t len;
  char errbuf[CURL_ERROR_SIZE];
} lg_fetch_t;

/* CURLOPT_WRITEFUNCTION: keeps the page (bounded). */
static size_t lg_held_write_cb(char *data, size_t size, size_t nmemb, void *userdata) {
  lg_fetch_t *f = userdata;
  size_t n = size * nmemb;
  if (f->len + n > LG_HELD_BODY_MAX) return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
  f->body = qm_realloc(f->body, f->len + n + 1);
  memcpy(f->body + f->len, data, n);
  f->len += n;
  f->body[f->len] = '\0';
  return n;
}

/* Starts the look-up of one page of person's granted requests. */
static int lg_held_start(CURLM *multi, lg_fetch_t *f, const char *base, size_t person,
                         const char *after, struct curl_slist *headers) {
  char url[1024];
  int n = snprintf(url, sizeof(url), "%s/v1/requests?subject=p-%04zu&status=granted&limit=%d%s%s",
                   base, person + 1, LG_HELD_PAGE, after && *after ? "&after=" : "",
                   after && *after ? after : "");
  if (n < 0 || (size_t)n >= sizeof(url)) return QM_EINVAL;
  f->person = person;
  f->len = 0;
  if (f->body) f->body[0] = '\0';
  f->errbuf[0] = '\0';
  curl_easy_setopt(f->easy, CURLOPT_URL, url);
  curl_easy_setopt(f->easy, CURLOPT_HTTPHEADER, headers);
  if (curl_multi_add_handle(multi, f->easy) != CURLM_OK) return QM_EIO;
  f->busy = true;
  return QM_OK;
}

/* Remembers id for (item, role) of person unless a newer one is known. */
static void lg_held_add(lg_held_t *h, size_t person, const char *item, const char *role,
                        const char *id) {
  lg_held_person_t *p = &h->people[person];
  for (size_t i = 0; i < p->n; i++)
    if (!strcmp(p->v[i].item, item) && !strcmp(p->v[i].role, role)) return;
  if (strlen(item) >= sizeof(p->v[0].item) || strlen(role) >= sizeof(p->v[0].role) ||
      strlen(id) >= sizeof(p->v[0].id))
    return; /* never for the local catalog; such a pair is simply not extended */
  if (p->n == p->cap) {
    p->cap = p->cap ? p->cap * 2 : 8;
    p->v = qm_realloc(p->v, p->cap * sizeof(*p->v));
  }
  lg_held_entry_t *e = &p->v[p->n++];
  qm_strlcpy(e->item, item, sizeof(e->item));
  qm_strlcpy(e->role, role, sizeof(e->role));
  qm_strlcpy(e->id, id, sizeof(e->id));
  h->n_entries++;
}

/* Reads one page: records its granted lines; *next receives the cursor of
 * the next page ("" when this was the last). QM_EIO when it is not a list. */
static int lg_held_page(lg_held_t *h, size_t person, const char *body, char *next,
                        size_t next_size) {
  int rc = QM_OK;
  json_t *root = json_loads(body, 0, NULL);
  json_t *items = json_object_get(root, "items");
  next[0] = '\0';
  if (!json_is_array(items)) {
    rc = QM_EIO;
    goto out;
  }
  size_t i, j;
  json_t *req, *line;
  json_array_foreach(items, i, req) {
    const char *id = json_string_value(json_object_get(req, "id"));
    if (!id) continue;
    json_array_foreach(json_object_get(req, "lines"), j, line) {
      const char *item = json_string_value(json_object_get(line, "item_id"));
      const char *role = json_string_value(json_object_get(line, "role_id"));
      const char *status = json_string_value(json_object_get(line, "status"));
      if (item && role && status && !strcmp(status, "granted"))
        lg_held_add(h, person, item, role, id);
    }
  }
  const char *nx = json_string_value(json_object_get(root, "next"));
  if (nx) qm_strlcpy(next, nx, next_size);
out:
  json_decref(root);
  return rc;
}

int lg_held_load(const char *base, const char *token, size_t people, lg_held_t **out,
                 char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  lg_held_t *h = qm_calloc(1, sizeof(*h));
  lg_fetch_t fetch[LG_HELD_PARALLEL];
  CURLM *multi = curl_multi_init();
  struct curl_slist *headers = NULL;
  char hdr[2048];
  size_t next_person = 0, in_flight = 0;

  memset(fetch, 0, sizeof(fetch));
  h->people = qm_calloc(people, sizeof(*h->people));
  h->n_people = people;
  snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s", token);
  headers = curl_slist_append(headers, hdr);
  headers = curl_slist_append(headers, "Accept: application/json");
  if (!multi || !headers) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "cannot set up libcurl");
    goto out;
  }
  for (size_t i = 0; i < LG_HELD_PARALLEL; i++) {
    fetch[i].easy = curl_easy_init();
    if (!fetch[i].easy) {
      rc = qm_err(errstr, errstr_size, QM_EIO, "curl_easy_init failed");
      goto out;
    }
    curl_easy_setopt(fetch[i].easy, CURLOPT_WRITEFUNCTION, lg_held_write_cb);
    curl_easy_setopt(fetch[i].easy, CURLOPT_WRITEDATA, &fetch[i]);
    curl_easy_setopt(fetch[i].easy, CURLOPT_ERRORBUFFER, fetch[i].errbuf);
    curl_easy_setopt(fetch[i].easy, CURLOPT_TIMEOUT_MS, 30000L);
    curl_easy_setopt(fetch[i].easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(fetch[i].easy, CURLOPT_PRIVATE, &fetch[i]);
  }
  for (;;) {
    if (qm_shutdown_requested()) {
      rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "interrupted while looking up grants");
      goto out;
    }
    for (size_t i = 0; i < LG_HELD_PARALLEL && next_person < people; i++) {
      if (fetch[i].busy) continue;
      fetch[i].pages = 0;
      if (lg_held_start(multi, &fetch[i], base, next_person, NULL, headers) != QM_OK) {
        rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start the look-up of p-%04zu",
                    next_person + 1);
        goto out;
      }
      next_person++;
      in_flight++;
    }
    if (in_flight == 0) break;
    int running = 0;
    curl_multi_perform(multi, &running);
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(multi, &left))) {
      if (msg->msg != CURLMSG_DONE) continue;
      lg_fetch_t *f = NULL;
      CURLcode res = msg->data.result;
      long code = 0;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&f);
      if (res == CURLE_OK) curl_easy_getinfo(f->easy, CURLINFO_RESPONSE_CODE, &code);
      curl_multi_remove_handle(multi, f->easy);
      f->busy = false;
      in_flight--;
      if (res != CURLE_OK || code != 200) {
        rc = qm_err(errstr, errstr_size, QM_EIO, "GET /v1/requests?subject=p-%04zu: %s %.200s",
                    f->person + 1, res != CURLE_OK ? "transport error" : "status",
                    res != CURLE_OK ? (f->errbuf[0] ? f->errbuf : curl_easy_strerror(res))
                                    : (f->body ? f->body : ""));
        goto out;
      }
      char next[64];
      if (lg_held_page(h, f->person, f->body ? f->body : "", next, sizeof(next)) != QM_OK) {
        rc = qm_err(errstr, errstr_size, QM_EIO,
                    "GET /v1/requests?subject=p-%04zu did not answer a list", f->person + 1);
        goto out;
      }
      if (*next && ++f->pages < LG_HELD_MAX_PAGES) {
        if (lg_held_start(multi, f, base, f->person, next, headers) != QM_OK) {
          rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start the look-up of p-%04zu",
                      f->person + 1);
          goto out;
        }
        in_flight++;
      }
    }
    if (in_flight > 0) curl_multi_poll(multi, NULL, 0, 100, NULL);
  }
  *out = h;
  h = NULL;
out:
  for (size_t i = 0; i < LG_HELD_PARALLEL; i++) {
    if (fetch[i].busy) curl_multi_remove_handle(multi, fetch[i].easy);
    if (fetch[i].easy) curl_easy_cleanup(fetch[i].easy);
    free(fetch[i].body);
  }
  if (multi) curl_multi_cleanup(multi);
  curl_slist_free_all(headers);
  lg_held_destroy(h);
  return rc;
}

const char *lg_held_find(const lg_held_t *h, size_t person, const char *item, const char *role) {
  if (!h || person >= h->n_people) return NULL;
  const lg_held_person_t *p = &h->people[person];
  for (size_t i = 0; i < p->n; i++)
    if (!strcmp(p->v[i].item, item) && !strcmp(p->v[i].role, role)) return p->v[i].id;
  return NULL;
}

size_t lg_held_count(const lg_held_t *h) { return h ? h->n_entries : 0; }

int lg_held_write(const lg_held_t *h, const char *path, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  FILE *f = fopen(path, "w");
  if (!f) return qm_err(errstr, errstr_size, QM_EIO, "cannot write %s", path);
  for (size_t i = 0; i < h->n_people; i++)
    for (size_t j = 0; j < h->people[i].n; j++)
      fprintf(f, "p-%04zu %s %s %s\n", i + 1, h->people[i].v[j].item, h->people[i].v[j].role,
              h->people[i].v[j].id);
  if (fclose(f) != 0) rc = qm_err(errstr, errstr_size, QM_EIO, "cannot write %s", path);
  return rc;
}

void lg_held_destroy(lg_held_t *h) {
  if (!h) return;
  for (size_t i = 0; i < h->n_people; i++) free(h->people[i].v);
  free(h->people);
  free(h);
}
