/*
 * qm_pg: PostgreSQL connections, statements, transactions, notifications, a
 * pool and migrations over libpq. See qm_pg.h for the contracts.
 *
 * Every statement is synchronous (PQexecParams/PQexec); only the readiness
 * ping and the notification wait use the socket directly, because they need
 * a bound. Error classification lives in pg_check(): every path that talks to
 * the server ends there, so the QM_E* mapping and the errstr format (SQLSTATE
 * and the server's message) are the same everywhere.
 */
#include "qm_pg.h"

#include "qm_common.h"
#include "qm_log.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <limits.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PG_BACKOFF_MIN_MS 100
#define PG_BACKOFF_MAX_MS 5000
#define PG_PING_TIMEOUT_MS 1000
#define PG_OID_BYTEA 17u
#define PG_OID_INT8 20u

struct qm_pg {
  PGconn *conn;
  char *dsn;
  char *schema;   /* NULL: leave the server's default search path */
  char *app_name; /* NULL: the fallback "qm-<schema>" unless the dsn names one */
  char sqlstate[6];
  int64_t backoff_ms;      /* the next reconnect delay (before jitter) */
  int64_t next_attempt_ms; /* qm_mono_ms() before which no reconnect is tried */
  unsigned int rng;        /* rand_r() state for jitter */
  char **channels;         /* LISTENed channels, re-issued on reconnect */
  size_t n_channels;
};

struct qm_pg_result {
  PGresult *r;
};

/* ---- helpers ------------------------------------------------------------ */

static bool pg_usable(const qm_pg_t *c) { return c->conn && PQstatus(c->conn) == CONNECTION_OK; }

/* Copies a libpq message onto one line (log lines and errstr are single
 * lines), without trailing blanks. */
static void pg_trim_copy(char *dst, size_t dst_size, const char *src) {
  qm_strlcpy(dst, src ? src : "", dst_size);
  for (char *p = dst; *p; p++)
    if (*p == '\n' || *p == '\r' || *p == '\t') *p = ' ';
  size_t n = strlen(dst);
  while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == '\r' || dst[n - 1] == ' ')) dst[--n] = '\0';
}

/* libpq prints NOTICEs (e.g. "schema already exists, skipping") on stderr by
 * default; they belong in our JSON log at debug level instead. */
static void pg_on_notice(void *arg, const char *message) {
  QM_UNUSED(arg);
  char msg[512];
  pg_trim_copy(msg, sizeof(msg), message);
  qm_log_debug("postgres notice: %s", msg);
}

/* Maps an SQLSTATE to a QM_E* code (see qm_pg.h for the meaning of each). */
static int pg_classify(const char *state) {
  static const char *const transient[] = {
      "40001", /* serialization_failure */
      "40P01", /* deadlock_detected */
      "57P01", /* admin_shutdown (pg_terminate_backend, fast shutdown) */
      "57P02", /* crash_shutdown */
      "57P03", /* cannot_connect_now (starting up, recovering) */
      "53300", /* too_many_connections */
      "55P03", /* lock_not_available (lock_timeout) */
  };
  if (!state || strlen(state) != 5) return QM_EIO;
  if (strncmp(state, "08", 2) == 0) return QM_ETRANSIENT; /* connection exception */
  for (size_t i = 0; i < QM_ARRAY_LEN(transient); i++)
    if (strcmp(state, transient[i]) == 0) return QM_ETRANSIENT;
  if (strcmp(state, "57014") == 0) return QM_ETIMEOUT; /* query_canceled (statement_timeout) */
  if (strcmp(state, "23505") == 0) return QM_EDUP;
  if (strncmp(state, "22", 2) == 0 || strncmp(state, "23", 2) == 0) return QM_EINVAL;
  return QM_EIO;
}

/* Turns a statement's outcome into a status code, recording the SQLSTATE on
 * c and describing the failure in errstr. Does not free r. */
static int pg_check(qm_pg_t *c, const PGresult *r, char *errstr, size_t errstr_size) {
  ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
    c->sqlstate[0] = '\0';
    return QM_OK;
  }
  bool lost = !pg_usable(c);
  const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
  char msg[512], detail[512];
  const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
  if (primary)
    pg_trim_copy(msg, sizeof(msg), primary);
  else if (c->conn)
    pg_trim_copy(msg, sizeof(msg), PQerrorMessage(c->conn));
  else
    qm_strlcpy(msg, "not connected", sizeof(msg));
  const char *det = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL) : NULL;
  pg_trim_copy(detail, sizeof(detail), det);

  if (!state || !*state) {
    if (lost) {
      state = "08006"; /* connection_failure */
    } else {
      state = "XX000"; /* internal_error: a client-side failure */
      if (st != PGRES_FATAL_ERROR && st != PGRES_NONFATAL_ERROR)
        qm_strlcpy(msg, "unexpected result status (COPY is not supported)", sizeof(msg));
    }
  }
  qm_strlcpy(c->sqlstate, state, sizeof(c->sqlstate));
  int err = lost ? QM_ETRANSIENT : pg_classify(state);
  if (detail[0])
    return qm_err(errstr, errstr_size, err, "SQLSTATE %s: %s (%s)", state, msg, detail);
  return qm_err(errstr, errstr_size, err, "SQLSTATE %s: %s%s", state, msg,
                lost ? " (connection lost)" : "");
}

/* The error for a statement attempted on a connection known to be broken. */
static int pg_not_connected(qm_pg_t *c, char *errstr, size_t errstr_size) {
  qm_strlcpy(c->sqlstate, "08003", sizeof(c->sqlstate)); /* connection_does_not_exist */
  return qm_err(errstr, errstr_size, QM_ETRANSIENT,
                "SQLSTATE 08003: not connected to PostgreSQL (call qm_pg_ensure and retry)");
}

/* Quotes an identifier; caller frees with free(). Needs a live connection. */
static char *pg_quote_ident(qm_pg_t *c, const char *name) {
  char *q = PQescapeIdentifier(c->conn, name, strlen(name));
  if (!q) return NULL;
  char *out = qm_strdup(q);
  PQfreemem(q);
  return out;
}

/* Runs a simple statement on a connection that is not yet c->conn. */
static int pg_exec_raw(PGconn *conn, const char *sql, char *errstr, size_t errstr_size) {
  PGresult *r = PQexec(conn, sql);
  int rc = QM_OK;
  ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
    char msg[512];
    pg_trim_copy(msg, sizeof(msg), PQerrorMessage(conn));
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT, "%s: %s", sql, msg);
  }
  PQclear(r);
  return rc;
}

/* One connection attempt: connect, set the search path, re-LISTEN. On
 * success c->conn is the new connection; on failure c->conn is NULL. */
static int pg_connect_once(qm_pg_t *c, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  char *fallback = NULL, *sql = NULL;
  PGconn *conn = NULL;
  if (c->conn) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  fallback = qm_asprintf("qm-%s", c->schema ? c->schema : "service");
  /* Defaults first: the expanded dsn overrides them; application_name last
   * so the caller's explicit service name wins over the dsn. */
  const char *keys[10], *vals[10];
  int k = 0;
  keys[k] = "connect_timeout", vals[k++] = "5";
  keys[k] = "keepalives", vals[k++] = "1";
  keys[k] = "keepalives_idle", vals[k++] = "30";
  keys[k] = "keepalives_interval", vals[k++] = "10";
  keys[k] = "keepalives_count", vals[k++] = "3";
  keys[k] = "fallback_application_name", vals[k++] = fallback;
  keys[k] = "dbname", vals[k++] = c->dsn;
  if (c->app_name) keys[k] = "application_name", vals[k++] = c->app_name;
  keys[k] = NULL, vals[k] = NULL;

  conn = PQconnectdbParams(keys, vals, 1);
  if (!conn || PQstatus(conn) != CONNECTION_OK) {
    char msg[512];
    pg_trim_copy(msg, sizeof(msg), conn ? PQerrorMessage(conn) : "out of memory");
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT, "cannot connect to PostgreSQL: %s", msg);
    goto out;
  }
  PQsetNoticeProcessor(conn, pg_on_notice, c);
  c->conn = conn; /* pg_quote_ident needs it */
  if (c->schema) {
    char *q = pg_quote_ident(c, c->schema);
    if (!q) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot quote schema name '%s'", c->schema);
      goto out;
    }
    sql = qm_asprintf("SET search_path TO %s, public", q);
    free(q);
    rc = pg_exec_raw(conn, sql, errstr, errstr_size);
    if (rc != QM_OK) goto out;
  }
  for (size_t i = 0; i < c->n_channels; i++) {
    char *q = pg_quote_ident(c, c->channels[i]);
    if (!q) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "cannot quote channel '%s'", c->channels[i]);
      goto out;
    }
    free(sql);
    sql = qm_asprintf("LISTEN %s", q);
    free(q);
    rc = pg_exec_raw(conn, sql, errstr, errstr_size);
    if (rc != QM_OK) goto out;
  }
  c->backoff_ms = PG_BACKOFF_MIN_MS;
  c->next_attempt_ms = 0;
  c->sqlstate[0] = '\0';
out:
  if (rc != QM_OK && conn) {
    PQfinish(conn);
    c->conn = NULL;
  }
  free(sql);
  free(fallback);
  return rc;
}

/* After a failed attempt: the next one waits backoff/2..backoff (jitter
 * spreads out instances that lost the server together), then doubles. */
static void pg_schedule_retry(qm_pg_t *c) {
  int64_t half = c->backoff_ms / 2;
  int64_t delay = half + (half > 0 ? (int64_t)(rand_r(&c->rng) % (unsigned)(half + 1)) : 0);
  c->next_attempt_ms = qm_mono_ms() + delay;
  c->backoff_ms *= 2;
  if (c->backoff_ms > PG_BACKOFF_MAX_MS) c->backoff_ms = PG_BACKOFF_MAX_MS;
}

/* ---- connections ------------------------------------------------------- */

qm_pg_t *qm_pg_connect_app(const char *dsn, const char *schema, const char *app_name,
                           char *errstr, size_t errstr_size) {
  if (!dsn) {
    qm_err(errstr, errstr_size, QM_EINVAL, "no PostgreSQL dsn given");
    return NULL;
  }
  qm_pg_t *c = qm_calloc(1, sizeof(*c));
  c->dsn = qm_strdup(dsn);
  c->schema = schema && *schema ? qm_strdup(schema) : NULL;
  c->app_name = app_name && *app_name ? qm_strdup(app_name) : NULL;
  c->backoff_ms = PG_BACKOFF_MIN_MS;
  c->rng = (unsigned int)(qm_mono_us() ^ (uintptr_t)c);
  if (pg_connect_once(c, errstr, errstr_size) != QM_OK) {
    qm_pg_destroy(c);
    return NULL;
  }
  return c;
}

qm_pg_t *qm_pg_connect(const char *dsn, const char *schema, char *errstr, size_t errstr_size) {
  return qm_pg_connect_app(dsn, schema, NULL, errstr, errstr_size);
}

void qm_pg_destroy(qm_pg_t *c) {
  if (!c) return;
  if (c->conn) PQfinish(c->conn);
  for (size_t i = 0; i < c->n_channels; i++) free(c->channels[i]);
  free(c->channels);
  free(c->dsn);
  free(c->schema);
  free(c->app_name);
  free(c);
}

int qm_pg_ensure(qm_pg_t *c, int64_t deadline_ms) {
  for (;;) {
    if (pg_usable(c)) return QM_OK;
    if (qm_shutdown_requested()) return QM_ESHUTDOWN;
    int64_t now = qm_mono_ms();
    if (now >= c->next_attempt_ms) {
      char err[512];
      if (pg_connect_once(c, err, sizeof(err)) == QM_OK) {
        qm_log_info("reconnected to PostgreSQL (schema %s, backend pid %d)",
                    c->schema ? c->schema : "-", PQbackendPID(c->conn));
        return QM_OK;
      }
      pg_schedule_retry(c);
      qm_log_warn("PostgreSQL reconnect failed, next attempt in %" PRId64
                  " ms; check that the server is up and the dsn is right: %s",
                  c->next_attempt_ms - qm_mono_ms(), err);
      continue;
    }
    if (now >= deadline_ms) return QM_ETIMEOUT;
    int64_t until = c->next_attempt_ms < deadline_ms ? c->next_attempt_ms : deadline_ms;
    qm_sleep_ms(until - now);
  }
}

bool qm_pg_connected(const qm_pg_t *c) { return pg_usable(c); }
const char *qm_pg_schema(const qm_pg_t *c) { return c->schema ? c->schema : ""; }
int qm_pg_backend_pid(const qm_pg_t *c) { return pg_usable(c) ? PQbackendPID(c->conn) : 0; }
const char *qm_pg_last_sqlstate(const qm_pg_t *c) { return c->sqlstate; }

/* ---- statements ---------------------------------------------------------- */

int qm_pg_exec(qm_pg_t *c, const char *sql, const qm_pg_param_t *params, int nparams,
               qm_pg_result_t **res, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  const char **values = NULL;
  int *lengths = NULL, *formats = NULL;
  Oid *types = NULL;
  char(*nums)[24] = NULL;
  PGresult *r = NULL;

  if (nparams < 0 || (nparams > 0 && !params) || !sql)
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_pg_exec: bad arguments");
  if (!pg_usable(c)) return pg_not_connected(c, errstr, errstr_size);
  if (nparams > 0) {
    values = qm_calloc((size_t)nparams, sizeof(*values));
    lengths = qm_calloc((size_t)nparams, sizeof(*lengths));
    formats = qm_calloc((size_t)nparams, sizeof(*formats));
    types = qm_calloc((size_t)nparams, sizeof(*types));
    nums = qm_calloc((size_t)nparams, sizeof(*nums));
    for (int i = 0; i < nparams; i++) {
      const qm_pg_param_t *p = &params[i];
      switch (p->kind) {
      case QM_PG_P_NULL: break;
      case QM_PG_P_TEXT: values[i] = p->value; break;
      case QM_PG_P_BYTES:
        if (p->len > (size_t)INT_MAX) {
          rc = qm_err(errstr, errstr_size, QM_EINVAL, "parameter $%d: %zu bytes is too large",
                      i + 1, p->len);
          goto out;
        }
        values[i] = p->value ? p->value : "";
        lengths[i] = (int)p->len;
        formats[i] = 1;
        types[i] = PG_OID_BYTEA;
        break;
      case QM_PG_P_INT64:
        snprintf(nums[i], sizeof(nums[i]), "%" PRId64, p->i64);
        values[i] = nums[i];
        types[i] = PG_OID_INT8;
        break;
      default:
        rc = qm_err(errstr, errstr_size, QM_EINVAL, "parameter $%d: unknown kind %d", i + 1,
                    (int)p->kind);
        goto out;
      }
    }
  }
  r = PQexecParams(c->conn, sql, nparams, types, values, lengths, formats, 0);
  rc = pg_check(c, r, errstr, errstr_size);
  if (rc == QM_OK && res) {
    qm_pg_result_t *w = qm_malloc(sizeof(*w));
    w->r = r;
    r = NULL;
    *res = w;
  }
out:
  PQclear(r);
  free(nums);
  free(types);
  free(formats);
  free(lengths);
  free(values);
  return rc;
}

int qm_pg_exec_simple(qm_pg_t *c, const char *sql, char *errstr, size_t errstr_size) {
  if (!sql) return qm_err(errstr, errstr_size, QM_EINVAL, "qm_pg_exec_simple: no SQL");
  if (!pg_usable(c)) return pg_not_connected(c, errstr, errstr_size);
  PGresult *r = PQexec(c->conn, sql);
  int rc = pg_check(c, r, errstr, errstr_size);
  PQclear(r);
  return rc;
}

int qm_pg_ntuples(const qm_pg_result_t *res) { return PQntuples(res->r); }
int qm_pg_nfields(const qm_pg_result_t *res) { return PQnfields(res->r); }
int qm_pg_fnumber(const qm_pg_result_t *res, const char *name) {
  return PQfnumber(res->r, name);
}
const char *qm_pg_get(const qm_pg_result_t *res, int row, int col) {
  return PQgetvalue(res->r, row, col);
}
bool qm_pg_is_null(const qm_pg_result_t *res, int row, int col) {
  return PQgetisnull(res->r, row, col) != 0;
}
size_t qm_pg_len(const qm_pg_result_t *res, int row, int col) {
  int n = PQgetlength(res->r, row, col);
  return n > 0 ? (size_t)n : 0;
}

int qm_pg_get_bytes(const qm_pg_result_t *res, int row, int col, unsigned char **out,
                    size_t *len) {
  if (PQgetisnull(res->r, row, col)) {
    *out = NULL;
    *len = 0;
    return QM_OK;
  }
  size_t n = 0;
  unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(res->r, row, col), &n);
  if (!raw) return QM_EINVAL;
  unsigned char *copy = qm_malloc(n + 1);
  memcpy(copy, raw, n);
  copy[n] = '\0';
  PQfreemem(raw);
  *out = copy;
  *len = n;
  return QM_OK;
}

int qm_pg_get_int64(const qm_pg_result_t *res, int row, int col, int64_t *out) {
  if (PQgetisnull(res->r, row, col)) return QM_EINVAL;
  const char *s = PQgetvalue(res->r, row, col);
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0') return QM_EINVAL;
  *out = (int64_t)v;
  return QM_OK;
}

int64_t qm_pg_affected(const qm_pg_result_t *res) {
  const char *s = PQcmdTuples(res->r);
  if (!s || !*s) return 0;
  return (int64_t)strtoll(s, NULL, 10);
}

void qm_pg_result_destroy(qm_pg_result_t *res) {
  if (!res) return;
  PQclear(res->r);
  free(res);
}

/* ---- transactions ---------------------------------------------------------- */

int qm_pg_begin(qm_pg_t *c, char *errstr, size_t errstr_size) {
  if (!pg_usable(c)) {
    int rc = qm_pg_ensure(c, qm_mono_ms());
    if (rc != QM_OK) return pg_not_connected(c, errstr, errstr_size);
  }
  return qm_pg_exec_simple(c, "BEGIN", errstr, errstr_size);
}

int qm_pg_commit(qm_pg_t *c, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  if (!pg_usable(c)) {
    pg_not_connected(c, NULL, 0);
    return qm_err(errstr, errstr_size, QM_ETRANSIENT,
                  "SQLSTATE 08003: COMMIT on a lost connection: the transaction was not "
                  "committed; retry it");
  }
  PGresult *r = PQexec(c->conn, "COMMIT");
  rc = pg_check(c, r, errstr, errstr_size);
  if (rc == QM_ETRANSIENT && !pg_usable(c)) {
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT,
                "SQLSTATE %s: connection lost during COMMIT: the outcome is unknown; retry "
                "the transaction (it must be idempotent)",
                c->sqlstate);
  } else if (rc == QM_OK && strcmp(PQcmdStatus(r), "ROLLBACK") == 0) {
    qm_strlcpy(c->sqlstate, "25P02", sizeof(c->sqlstate));
    rc = qm_err(errstr, errstr_size, QM_EIO,
                "SQLSTATE 25P02: the transaction had failed and was rolled back, not committed");
  }
  PQclear(r);
  return rc;
}

int qm_pg_rollback(qm_pg_t *c, char *errstr, size_t errstr_size) {
  if (!pg_usable(c) || PQtransactionStatus(c->conn) == PQTRANS_IDLE) return QM_OK;
  int rc = qm_pg_exec_simple(c, "ROLLBACK", errstr, errstr_size);
  if (rc != QM_OK && !pg_usable(c)) rc = QM_OK; /* the session and its transaction are gone */
  return rc;
}

/* Runs "<verb> <quoted name>" for the savepoint family. */
static int pg_savepoint_cmd(qm_pg_t *c, const char *verb, const char *name, char *errstr,
                            size_t errstr_size) {
  if (!name || !*name) return qm_err(errstr, errstr_size, QM_EINVAL, "no savepoint name");
  if (!pg_usable(c)) return pg_not_connected(c, errstr, errstr_size);
  char *q = pg_quote_ident(c, name);
  if (!q) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot quote savepoint '%s'", name);
  char *sql = qm_asprintf("%s %s", verb, q);
  int rc = qm_pg_exec_simple(c, sql, errstr, errstr_size);
  free(sql);
  free(q);
  return rc;
}

int qm_pg_savepoint(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size) {
  return pg_savepoint_cmd(c, "SAVEPOINT", name, errstr, errstr_size);
}
int qm_pg_rollback_to(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size) {
  return pg_savepoint_cmd(c, "ROLLBACK TO SAVEPOINT", name, errstr, errstr_size);
}
int qm_pg_release(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size) {
  return pg_savepoint_cmd(c, "RELEASE SAVEPOINT", name, errstr, errstr_size);
}

/* ---- readiness and notifications ------------------------------------------- */

/* Waits for readability of the connection's socket up to deadline (mono ms).
 * 1 readable, 0 timed out, -1 error. */
static int pg_poll_read(qm_pg_t *c, int64_t deadline) {
  for (;;) {
    int64_t left = deadline - qm_mono_ms();
    if (left <= 0) return 0;
    struct pollfd pfd = {.fd = PQsocket(c->conn), .events = POLLIN};
    if (pfd.fd < 0) return -1;
    int n = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
    if (n > 0) return 1;
    if (n == 0) return 0;
    if (errno != EINTR) return -1;
  }
}

int qm_pg_ping(qm_pg_t *c) {
  int rc = QM_OK;
  PGresult *last = NULL;
  if (!pg_usable(c) && qm_pg_ensure(c, qm_mono_ms()) != QM_OK) return pg_not_connected(c, NULL, 0);
  int64_t deadline = qm_mono_ms() + PG_PING_TIMEOUT_MS;
  if (!PQsendQuery(c->conn, "SELECT 1")) {
    rc = QM_ETRANSIENT;
    goto out;
  }
  for (;;) {
    while (!PQisBusy(c->conn)) {
      PGresult *r = PQgetResult(c->conn);
      if (!r) {
        rc = pg_check(c, last, NULL, 0);
        goto out;
      }
      PQclear(last);
      last = r;
    }
    int p = pg_poll_read(c, deadline);
    if (p == 0) {
      /* The server did not answer in time: drop the session (a reconnect
       * will tell whether it is alive) rather than leave a query pending. */
      qm_log_warn("PostgreSQL did not answer a ping within %d ms; closing the connection",
                  PG_PING_TIMEOUT_MS);
      PQfinish(c->conn);
      c->conn = NULL;
      rc = QM_ETIMEOUT;
      goto out;
    }
    if (p < 0 || !PQconsumeInput(c->conn)) {
      rc = QM_ETRANSIENT;
      goto out;
    }
  }
out:
  PQclear(last);
  return rc;
}

int qm_pg_listen(qm_pg_t *c, const char *channel, char *errstr, size_t errstr_size) {
  if (!channel || !*channel) return qm_err(errstr, errstr_size, QM_EINVAL, "no channel name");
  if (!pg_usable(c)) return pg_not_connected(c, errstr, errstr_size);
  char *q = pg_quote_ident(c, channel);
  if (!q) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot quote channel '%s'", channel);
  char *sql = qm_asprintf("LISTEN %s", q);
  int rc = qm_pg_exec_simple(c, sql, errstr, errstr_size);
  if (rc == QM_OK) {
    bool known = false;
    for (size_t i = 0; i < c->n_channels; i++)
      if (strcmp(c->channels[i], channel) == 0) known = true;
    if (!known) {
      c->channels = qm_realloc(c->channels, (c->n_channels + 1) * sizeof(*c->channels));
      c->channels[c->n_channels++] = qm_strdup(channel);
    }
  }
  free(sql);
  free(q);
  return rc;
}

int qm_pg_wait_notify(qm_pg_t *c, int timeout_ms, char *channel_out, size_t channel_out_size) {
  if (!pg_usable(c)) return pg_not_connected(c, NULL, 0);
  int64_t deadline = qm_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  if (!PQconsumeInput(c->conn)) return pg_not_connected(c, NULL, 0);
  for (;;) {
    PGnotify *n = PQnotifies(c->conn);
    if (n) {
      if (channel_out) qm_strlcpy(channel_out, n->relname, channel_out_size);
      PQfreemem(n);
      return QM_OK;
    }
    int p = pg_poll_read(c, deadline);
    if (p == 0) return QM_ETIMEOUT;
    if (p < 0 || !PQconsumeInput(c->conn)) return pg_not_connected(c, NULL, 0);
  }
}

/* ---- pool -------------------------------------------------------------------- */

struct qm_pg_pool {
  pthread_mutex_t mu;
  pthread_cond_t cv; /* signalled when a connection is released */
  size_t size;
  size_t n_free;
  qm_pg_t **conns;
  bool *busy;
};

qm_pg_pool_t *qm_pg_pool_new(const char *dsn, const char *schema, const char *app_name,
                             size_t size, char *errstr, size_t errstr_size) {
  if (size == 0) {
    qm_err(errstr, errstr_size, QM_EINVAL, "pool size must be at least 1");
    return NULL;
  }
  qm_pg_pool_t *pool = qm_calloc(1, sizeof(*pool));
  pool->size = size;
  pool->conns = qm_calloc(size, sizeof(*pool->conns));
  pool->busy = qm_calloc(size, sizeof(*pool->busy));
  pthread_mutex_init(&pool->mu, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&pool->cv, &attr);
  pthread_condattr_destroy(&attr);
  for (size_t i = 0; i < size; i++) {
    pool->conns[i] = qm_pg_connect_app(dsn, schema, app_name, errstr, errstr_size);
    if (!pool->conns[i]) {
      qm_pg_pool_destroy(pool);
      return NULL;
    }
  }
  pool->n_free = size;
  return pool;
}

int qm_pg_pool_acquire(qm_pg_pool_t *pool, int timeout_ms, qm_pg_t **out) {
  int64_t deadline = qm_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  struct timespec abs;
  clock_gettime(CLOCK_MONOTONIC, &abs);
  int64_t ns = abs.tv_nsec + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) % 1000 * 1000000;
  abs.tv_sec += (timeout_ms > 0 ? timeout_ms : 0) / 1000 + ns / 1000000000;
  abs.tv_nsec = (long)(ns % 1000000000);

  pthread_mutex_lock(&pool->mu);
  while (pool->n_free == 0) {
    if (qm_shutdown_requested()) {
      pthread_mutex_unlock(&pool->mu);
      return QM_ESHUTDOWN;
    }
    if (pthread_cond_timedwait(&pool->cv, &pool->mu, &abs) == ETIMEDOUT && pool->n_free == 0) {
      pthread_mutex_unlock(&pool->mu);
      return QM_ETIMEOUT;
    }
  }
  /* Prefer a connection that is known good; fall back to a broken one. */
  size_t pick = pool->size;
  for (size_t i = 0; i < pool->size; i++) {
    if (pool->busy[i]) continue;
    if (pick == pool->size) pick = i;
    if (pg_usable(pool->conns[i])) {
      pick = i;
      break;
    }
  }
  pool->busy[pick] = true;
  pool->n_free--;
  qm_pg_t *c = pool->conns[pick];
  pthread_mutex_unlock(&pool->mu);

  int rc = qm_pg_ensure(c, deadline);
  if (rc != QM_OK) {
    qm_pg_pool_release(pool, c);
    return rc;
  }
  *out = c;
  return QM_OK;
}

void qm_pg_pool_release(qm_pg_pool_t *pool, qm_pg_t *c) {
  if (!pool || !c) return;
  if (pg_usable(c) && PQtransactionStatus(c->conn) != PQTRANS_IDLE) {
    char err[256];
    qm_log_warn("a pooled PostgreSQL connection came back inside a transaction; rolling back");
    if (qm_pg_rollback(c, err, sizeof(err)) != QM_OK) {
      qm_log_warn("rollback of a released connection failed, closing it: %s", err);
      PQfinish(c->conn);
      c->conn = NULL;
    }
  }
  pthread_mutex_lock(&pool->mu);
  for (size_t i = 0; i < pool->size; i++) {
    if (pool->conns[i] == c && pool->busy[i]) {
      pool->busy[i] = false;
      pool->n_free++;
      pthread_cond_signal(&pool->cv);
      break;
    }
  }
  pthread_mutex_unlock(&pool->mu);
}

void qm_pg_pool_destroy(qm_pg_pool_t *pool) {
  if (!pool) return;
  for (size_t i = 0; i < pool->size; i++) qm_pg_destroy(pool->conns[i]);
  free(pool->conns);
  free(pool->busy);
  pthread_cond_destroy(&pool->cv);
  pthread_mutex_destroy(&pool->mu);
  free(pool);
}

/* ---- migrations --------------------------------------------------------------- */

static void pg_sha256_hex(const char *text, char out[65]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(text, strlen(text), md, &n, EVP_sha256(), NULL);
  for (unsigned int i = 0; i < n && i < 32; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
  out[64] = '\0';
}

int64_t qm_pg_advisory_key(const char *name) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(name, strlen(name), md, &n, EVP_sha256(), NULL);
  uint64_t k = 0;
  for (int i = 0; i < 8; i++) k = (k << 8) | md[i];
  int64_t key;
  memcpy(&key, &k, sizeof(key));
  return key;
}

/* BEGIN, then the schema's migration lock (held until COMMIT/ROLLBACK). */
static int pg_migrate_begin(qm_pg_t *c, int64_t key, char *errstr, size_t errstr_size) {
  int rc = qm_pg_begin(c, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  qm_pg_param_t p[] = {QM_PG_INT64(key)};
  rc = qm_pg_exec(c, "SELECT pg_advisory_xact_lock($1)", p, 1, NULL, errstr, errstr_size);
  if (rc != QM_OK) qm_pg_rollback(c, NULL, 0);
  return rc;
}

/* Compares the recorded checksum of one applied migration with its text. */
static int pg_migration_verify(const qm_migration_t *m, const char *recorded, char *errstr,
                               size_t errstr_size) {
  char sum[65];
  pg_sha256_hex(m->sql, sum);
  if (strcmp(sum, recorded) == 0) return QM_OK;
  return qm_err(errstr, errstr_size, QM_EINVAL,
                "migration %d (%s) was changed after it was applied (checksum %.12s in the "
                "database, %.12s in the code): restore its text and add a new migration instead",
                m->version, m->name, recorded, sum);
}

/* Applies one migration in its own transaction, unless another instance did
 * so while we waited for the lock. */
static int pg_migration_apply(qm_pg_t *c, const char *qschema, int64_t key,
                              const qm_migration_t *m, char *errstr, size_t errstr_size) {
  int rc;
  char *sql = NULL;
  qm_pg_result_t *res = NULL;
  char err[1024];
  if ((rc = pg_migrate_begin(c, key, errstr, errstr_size)) != QM_OK) return rc;
  sql = qm_asprintf("SET LOCAL search_path TO %s, public", qschema);
  if ((rc = qm_pg_exec_simple(c, sql, errstr, errstr_size)) != QM_OK) goto out;
  qm_pg_param_t pv[] = {QM_PG_INT64(m->version)};
  rc = qm_pg_exec(c, "SELECT checksum FROM schema_migrations WHERE version = $1", pv, 1, &res,
                  errstr, errstr_size);
  if (rc != QM_OK) goto out;
  if (qm_pg_ntuples(res) > 0) {
    rc = pg_migration_verify(m, qm_pg_get(res, 0, 0), errstr, errstr_size);
    goto out; /* applied meanwhile by another instance: nothing to do */
  }
  if ((rc = qm_pg_exec_simple(c, m->sql, err, sizeof(err))) != QM_OK) {
    rc = qm_err(errstr, errstr_size, rc, "migration %d (%s) failed: %s", m->version, m->name, err);
    goto out;
  }
  char sum[65];
  pg_sha256_hex(m->sql, sum);
  qm_pg_param_t pi[] = {QM_PG_INT64(m->version), QM_PG_TEXT(m->name), QM_PG_TEXT(sum)};
  rc = qm_pg_exec(c,
                  "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                  "VALUES ($1, $2, $3, now())",
                  pi, 3, NULL, errstr, errstr_size);
  if (rc != QM_OK) goto out;
  rc = qm_pg_commit(c, errstr, errstr_size);
  if (rc == QM_OK) qm_log_info("applied migration %d (%s)", m->version, m->name);
out:
  qm_pg_rollback(c, NULL, 0); /* no-op after a successful COMMIT */
  qm_pg_result_destroy(res);
  free(sql);
  return rc;
}

int qm_pg_migrate(qm_pg_t *c, const char *schema, const qm_migration_t *migs, size_t n,
                  char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  char *qschema = NULL, *lockname = NULL, *sql = NULL;
  qm_pg_result_t *res = NULL;
  bool *applied = NULL;

  if (!schema || !*schema || (n > 0 && !migs))
    return qm_err(errstr, errstr_size, QM_EINVAL, "qm_pg_migrate: no schema or migrations");
  for (size_t i = 0; i < n; i++) {
    if (migs[i].version <= 0 || !migs[i].sql || !migs[i].name)
      return qm_err(errstr, errstr_size, QM_EINVAL,
                    "migration %d: version must be > 0 with a name and SQL", migs[i].version);
    if (i > 0 && migs[i].version <= migs[i - 1].version)
      return qm_err(errstr, errstr_size, QM_EINVAL,
                    "migration %d (%s) follows version %d: versions must be strictly "
                    "increasing",
                    migs[i].version, migs[i].name, migs[i - 1].version);
  }
  if (!pg_usable(c)) return pg_not_connected(c, errstr, errstr_size);
  qschema = pg_quote_ident(c, schema);
  if (!qschema) return qm_err(errstr, errstr_size, QM_EINVAL, "cannot quote '%s'", schema);
  lockname = qm_asprintf("qm.migrate.%s", schema);
  int64_t key = qm_pg_advisory_key(lockname);
  applied = qm_calloc(n, sizeof(*applied));

  /* First transaction: the schema, the bookkeeping table, and what is
   * already applied. Under the lock, because concurrent CREATE ... IF NOT
   * EXISTS can still fail with a unique violation in the catalog. */
  if ((rc = pg_migrate_begin(c, key, errstr, errstr_size)) != QM_OK) goto out;
  sql = qm_asprintf("CREATE SCHEMA IF NOT EXISTS %s;"
                    "CREATE TABLE IF NOT EXISTS %s.schema_migrations ("
                    " version int PRIMARY KEY,"
                    " name text NOT NULL,"
                    " checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())",
                    qschema, qschema);
  if ((rc = qm_pg_exec_simple(c, sql, errstr, errstr_size)) != QM_OK) goto out_rollback;
  free(sql);
  sql = qm_asprintf("SELECT version, checksum FROM %s.schema_migrations", qschema);
  if ((rc = qm_pg_exec(c, sql, NULL, 0, &res, errstr, errstr_size)) != QM_OK) goto out_rollback;
  if ((rc = qm_pg_commit(c, errstr, errstr_size)) != QM_OK) goto out;

  for (int row = 0; row < qm_pg_ntuples(res); row++) {
    int64_t v = 0;
    if (qm_pg_get_int64(res, row, 0, &v) != QM_OK) continue;
    for (size_t i = 0; i < n; i++) {
      if (migs[i].version != v) continue;
      applied[i] = true;
      if ((rc = pg_migration_verify(&migs[i], qm_pg_get(res, row, 1), errstr, errstr_size)) !=
          QM_OK)
        goto out;
    }
  }
  for (size_t i = 0; i < n; i++) {
    if (applied[i]) continue;
    if ((rc = pg_migration_apply(c, qschema, key, &migs[i], errstr, errstr_size)) != QM_OK)
      goto out;
  }
  goto out;

out_rollback:
  qm_pg_rollback(c, NULL, 0);
out:
  qm_pg_result_destroy(res);
  free(applied);
  free(sql);
  free(lockname);
  free(qschema);
  return rc;
}
