/*
 * qm_common: what every module of libqm leans on — status codes, the checked
 * allocator, clocks, UUIDs, bounded string copies and the process-wide
 * shutdown flag (the only mutable global state the services keep).
 *
 * Conventions (see docs/architecture.md, "Code conventions"):
 *  - functions return int: QM_OK (0) or a negative QM_E* code; where a person
 *    needs the reason they also take `char *errstr, size_t errstr_size`;
 *  - a failed call leaves its outputs untouched and never calls its callback;
 *  - out of memory is fatal: qm_malloc() and friends log and abort.
 */
#ifndef QM_COMMON_H
#define QM_COMMON_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum {
  QM_OK = 0,
  QM_EINVAL = -1,     /* bad input: the caller's fault, retrying will not help */
  QM_EIO = -2,        /* a dependency failed (network, disk, broker, database) */
  QM_ETRANSIENT = -3, /* try again later: the dependency may recover */
  QM_ENOTFOUND = -4,  /* the thing asked for does not exist */
  QM_EDUP = -5,       /* already done (an event id seen before, a key reused) */
  QM_ECONFLICT = -6,  /* the state does not allow it */
  QM_ETIMEOUT = -7,   /* a bound ran out */
  QM_EAUTH = -8,      /* no or bad credentials */
  QM_EFORBIDDEN = -9, /* credentials fine, permission missing */
  QM_ESHUTDOWN = -10, /* refused because the process is shutting down */
  QM_EPOISON = -11    /* a message that can never be processed: dead-letter it */
};

/* A short constant name for a status code ("QM_EINVAL"). Never NULL. */
const char *qm_strerror(int err);

/* Checked allocation: never returns NULL; logs and aborts when memory runs out. */
void *qm_malloc(size_t n);
void *qm_calloc(size_t nmemb, size_t size);
void *qm_realloc(void *p, size_t n);
char *qm_strdup(const char *s);
char *qm_strndup(const char *s, size_t n);
/* A printf into a new string; caller frees with free(). */
char *qm_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Copies src into dst of size dst_size, always NUL-terminated (when
 * dst_size > 0). Returns strlen(src): a result >= dst_size means truncation. */
size_t qm_strlcpy(char *dst, const char *src, size_t dst_size);

/* Formats into errstr (if not NULL) and returns err, for one-line error exits:
 *   return qm_err(errstr, errstr_size, QM_EINVAL, "bad %s", name); */
int qm_err(char *errstr, size_t errstr_size, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Wall-clock milliseconds since the Unix epoch (UTC). */
int64_t qm_now_ms(void);
/* Monotonic milliseconds and microseconds, for durations and deadlines. */
int64_t qm_mono_ms(void);
int64_t qm_mono_us(void);
/* Formats unix milliseconds as RFC 3339 UTC with milliseconds
 * ("2026-11-24T02:30:00.123Z") into out (at least 25 bytes). */
void qm_time_format_rfc3339(int64_t unix_ms, char *out, size_t out_size);
/* Parses RFC 3339 (Z or +hh:mm offset, optional fraction). 0 or QM_EINVAL. */
int qm_time_parse_rfc3339(const char *s, int64_t *unix_ms);
/* Sleeps up to ms, waking early when shutdown is requested. */
void qm_sleep_ms(int64_t ms);

#define QM_UUID_STR_LEN 37 /* 36 characters and the NUL */
/* A random (version 4) UUID in lower-case text form. */
void qm_uuid_new(char out[QM_UUID_STR_LEN]);
/* True when s is a canonical UUID text (any version, any case). */
bool qm_uuid_valid(const char *s);

/* Installs SIGTERM/SIGINT handlers that set the shutdown flag, SIGHUP that
 * sets the reload flag, and ignores SIGPIPE. */
void qm_signals_install(void);
/* The shutdown flag: set by a signal or by qm_shutdown_request(). */
bool qm_shutdown_requested(void);
void qm_shutdown_request(void);
/* The reload flag (SIGHUP); qm_reload_take() reads and clears it. */
bool qm_reload_take(void);

#define QM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define QM_UNUSED(x) ((void)(x))

#endif /* QM_COMMON_H */
