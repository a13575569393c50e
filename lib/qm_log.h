/*
 * qm_log: structured logging, one JSON object per line on stderr (or a chosen
 * stream): time, level, service, message, and the request and trace ids the
 * line is about when there are any. The level is checked before the arguments
 * are evaluated, so debug lines cost nothing when off.
 *
 * The logger is set up once by qm_log_init() before any thread starts and is
 * read-only afterwards (level changes are atomic).
 */
#ifndef QM_LOG_H
#define QM_LOG_H

#include <stdio.h>

typedef enum {
  QM_LOG_DEBUG = 0,
  QM_LOG_INFO = 1,
  QM_LOG_WARN = 2,
  QM_LOG_ERROR = 3,
  QM_LOG_FATAL = 4
} qm_log_level_t;

/* service is copied. out NULL means stderr. */
void qm_log_init(const char *service, qm_log_level_t level, FILE *out);
void qm_log_set_level(qm_log_level_t level);
qm_log_level_t qm_log_get_level(void);
/* Parses "debug", "info", "warn", "error". 0 or QM_EINVAL. */
int qm_log_level_parse(const char *s, qm_log_level_t *level);

/* Writes one line. request_id and trace_id may be NULL or "" (then omitted). */
void qm_log_write(qm_log_level_t level, const char *file, int line, const char *request_id,
                  const char *trace_id, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

#define qm_log(level, req, trace, ...)                                                     \
  do {                                                                                     \
    if ((level) >= qm_log_get_level())                                                     \
      qm_log_write((level), __FILE__, __LINE__, (req), (trace), __VA_ARGS__);              \
  } while (0)

#define qm_log_debug(...) qm_log(QM_LOG_DEBUG, NULL, NULL, __VA_ARGS__)
#define qm_log_info(...) qm_log(QM_LOG_INFO, NULL, NULL, __VA_ARGS__)
#define qm_log_warn(...) qm_log(QM_LOG_WARN, NULL, NULL, __VA_ARGS__)
#define qm_log_error(...) qm_log(QM_LOG_ERROR, NULL, NULL, __VA_ARGS__)

#endif /* QM_LOG_H */
