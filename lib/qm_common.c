/*
 * qm_common: status codes, checked allocation, clocks, UUIDs, bounded copies
 * and the shutdown flag. See qm_common.h for the contracts.
 */
#include "qm_common.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uuid/uuid.h>

static atomic_bool qm_shutdown_flag = false;
static atomic_bool qm_reload_flag = false;

const char *qm_strerror(int err) {
  switch (err) {
  case QM_OK: return "QM_OK";
  case QM_EINVAL: return "QM_EINVAL";
  case QM_EIO: return "QM_EIO";
  case QM_ETRANSIENT: return "QM_ETRANSIENT";
  case QM_ENOTFOUND: return "QM_ENOTFOUND";
  case QM_EDUP: return "QM_EDUP";
  case QM_ECONFLICT: return "QM_ECONFLICT";
  case QM_ETIMEOUT: return "QM_ETIMEOUT";
  case QM_EAUTH: return "QM_EAUTH";
  case QM_EFORBIDDEN: return "QM_EFORBIDDEN";
  case QM_ESHUTDOWN: return "QM_ESHUTDOWN";
  case QM_EPOISON: return "QM_EPOISON";
  default: return "QM_E?";
  }
}

/* Out of memory is not something a service can recover from sensibly: say so
 * on stderr (the logger may itself need memory) and abort for a core dump. */
static void qm_oom(size_t n) {
  fprintf(stderr, "{\"level\":\"fatal\",\"msg\":\"out of memory allocating %zu bytes; "
                  "raise the container memory limit\"}\n", n);
  abort();
}

void *qm_malloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) qm_oom(n);
  return p;
}

void *qm_calloc(size_t nmemb, size_t size) {
  void *p = calloc(nmemb ? nmemb : 1, size ? size : 1);
  if (!p) qm_oom(nmemb * size);
  return p;
}

void *qm_realloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) qm_oom(n);
  return q;
}

char *qm_strdup(const char *s) {
  size_t n = strlen(s);
  char *d = qm_malloc(n + 1);
  memcpy(d, s, n + 1);
  return d;
}

char *qm_strndup(const char *s, size_t n) {
  size_t len = strnlen(s, n);
  char *d = qm_malloc(len + 1);
  memcpy(d, s, len);
  d[len] = '\0';
  return d;
}

char *qm_asprintf(const char *fmt, ...) {
  va_list ap, ap2;
  va_start(ap, fmt);
  va_copy(ap2, ap);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  char *s = qm_malloc((size_t)n + 1);
  vsnprintf(s, (size_t)n + 1, fmt, ap2);
  va_end(ap2);
  return s;
}

size_t qm_strlcpy(char *dst, const char *src, size_t dst_size) {
  size_t n = strlen(src);
  if (dst_size > 0) {
    size_t c = n < dst_size - 1 ? n : dst_size - 1;
    memcpy(dst, src, c);
    dst[c] = '\0';
  }
  return n;
}

int qm_err(char *errstr, size_t errstr_size, int err, const char *fmt, ...) {
  if (errstr && errstr_size > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errstr, errstr_size, fmt, ap);
    va_end(ap);
  }
  return err;
}

int64_t qm_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t qm_mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t qm_mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void qm_time_format_rfc3339(int64_t unix_ms, char *out, size_t out_size) {
  time_t secs = (time_t)(unix_ms / 1000);
  int ms = (int)(unix_ms % 1000);
  if (ms < 0) { ms += 1000; secs -= 1; }
  struct tm tm;
  gmtime_r(&secs, &tm);
  char base[32];
  strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(out, out_size, "%s.%03dZ", base, ms);
}

int qm_time_parse_rfc3339(const char *s, int64_t *unix_ms) {
  struct tm tm;
  memset(&tm, 0, sizeof(tm));
  const char *p = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
  if (!p) return QM_EINVAL;
  int64_t ms = 0;
  if (*p == '.') {
    p++;
    int digits = 0;
    while (*p >= '0' && *p <= '9') {
      if (digits < 3) ms = ms * 10 + (*p - '0');
      digits++;
      p++;
    }
    if (digits == 0) return QM_EINVAL;
    for (; digits < 3; digits++) ms *= 10;
  }
  int64_t offset_s = 0;
  if (*p == 'Z' || *p == 'z') {
    p++;
  } else if (*p == '+' || *p == '-') {
    int sign = *p == '-' ? -1 : 1;
    int hh, mm;
    if (sscanf(p + 1, "%2d:%2d", &hh, &mm) != 2 || hh > 23 || mm > 59) return QM_EINVAL;
    offset_s = sign * (hh * 3600 + mm * 60);
    p += 6;
  } else {
    return QM_EINVAL;
  }
  if (*p != '\0') return QM_EINVAL;
  time_t secs = timegm(&tm);
  *unix_ms = ((int64_t)secs - offset_s) * 1000 + ms;
  return QM_OK;
}

void qm_sleep_ms(int64_t ms) {
  int64_t until = qm_mono_ms() + ms;
  while (!qm_shutdown_requested()) {
    int64_t left = until - qm_mono_ms();
    if (left <= 0) break;
    if (left > 50) left = 50;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = left * 1000000L};
    nanosleep(&ts, NULL);
  }
}

void qm_uuid_new(char out[QM_UUID_STR_LEN]) {
  uuid_t u;
  uuid_generate_random(u);
  uuid_unparse_lower(u, out);
}

bool qm_uuid_valid(const char *s) {
  if (!s || strlen(s) != 36) return false;
  uuid_t u;
  return uuid_parse(s, u) == 0;
}

static void qm_on_signal(int sig) {
  if (sig == SIGHUP)
    atomic_store(&qm_reload_flag, true);
  else
    atomic_store(&qm_shutdown_flag, true);
}

void qm_signals_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = qm_on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

bool qm_shutdown_requested(void) { return atomic_load(&qm_shutdown_flag); }
void qm_shutdown_request(void) { atomic_store(&qm_shutdown_flag, true); }
bool qm_reload_take(void) { return atomic_exchange(&qm_reload_flag, false); }
