/*
 * qm_log: JSON-lines logger. Each line is built with jansson (so messages are
 * escaped correctly) and written with one fwrite under the stream's lock, so
 * lines from different threads never interleave.
 */
#include "qm_log.h"

#include "qm_common.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <string.h>

static char qm_log_service[64] = "qm";
static atomic_int qm_log_level = QM_LOG_INFO;
static FILE *qm_log_out = NULL;

void qm_log_init(const char *service, qm_log_level_t level, FILE *out) {
  qm_strlcpy(qm_log_service, service ? service : "qm", sizeof(qm_log_service));
  atomic_store(&qm_log_level, (int)level);
  qm_log_out = out;
}

void qm_log_set_level(qm_log_level_t level) { atomic_store(&qm_log_level, (int)level); }
qm_log_level_t qm_log_get_level(void) { return (qm_log_level_t)atomic_load(&qm_log_level); }

int qm_log_level_parse(const char *s, qm_log_level_t *level) {
  static const struct { const char *name; qm_log_level_t level; } names[] = {
      {"debug", QM_LOG_DEBUG}, {"info", QM_LOG_INFO}, {"warn", QM_LOG_WARN},
      {"warning", QM_LOG_WARN}, {"error", QM_LOG_ERROR}};
  for (size_t i = 0; i < QM_ARRAY_LEN(names); i++)
    if (strcasecmp(s, names[i].name) == 0) {
      *level = names[i].level;
      return QM_OK;
    }
  return QM_EINVAL;
}

static const char *qm_log_level_name(qm_log_level_t level) {
  switch (level) {
  case QM_LOG_DEBUG: return "debug";
  case QM_LOG_INFO: return "info";
  case QM_LOG_WARN: return "warn";
  case QM_LOG_ERROR: return "error";
  default: return "fatal";
  }
}

void qm_log_write(qm_log_level_t level, const char *file, int line, const char *request_id,
                  const char *trace_id, const char *fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);

  char ts[40];
  qm_time_format_rfc3339(qm_now_ms(), ts, sizeof(ts));
  const char *base = strrchr(file, '/');
  base = base ? base + 1 : file;
  char where[128];
  snprintf(where, sizeof(where), "%s:%d", base, line);

  json_t *o = json_object();
  json_object_set_new(o, "time", json_string(ts));
  json_object_set_new(o, "level", json_string(qm_log_level_name(level)));
  json_object_set_new(o, "service", json_string(qm_log_service));
  json_t *jmsg = json_string(msg);
  if (!jmsg) { /* not valid UTF-8: keep the line, mask the bytes */
    for (char *c = msg; *c; c++)
      if ((unsigned char)*c >= 0x80) *c = '?';
    jmsg = json_string(msg);
  }
  json_object_set_new(o, "msg", jmsg);
  if (request_id && *request_id) json_object_set_new(o, "request_id", json_string(request_id));
  if (trace_id && *trace_id) json_object_set_new(o, "trace_id", json_string(trace_id));
  json_object_set_new(o, "src", json_string(where));
  char *text = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
  json_decref(o);
  if (!text) return;
  FILE *out = qm_log_out ? qm_log_out : stderr;
  flockfile(out);
  fputs(text, out);
  fputc('\n', out);
  fflush(out);
  funlockfile(out);
  free(text);
}
