/*
 * qm_pg: PostgreSQL access for the services, over libpq, with no libpq type
 * in sight. It gives each service what its handlers need and nothing more:
 *
 *  - a connection (qm_pg_t) bound to the service's own schema: after every
 *    (re)connect it runs `SET search_path TO <schema>, public`, so service SQL
 *    is unqualified; a broken connection is reconnected by qm_pg_ensure() with
 *    exponential backoff and jitter (100 ms doubling to 5 s);
 *  - parameterised statements (text, bytea sent in binary, int64, NULL) with
 *    text-format results and small accessors;
 *  - errors classified into the QM_E* codes so callers know what to do:
 *    QM_ETRANSIENT means "retry the whole transaction" (connection lost,
 *    serialization failure, deadlock, server shutting down), QM_EDUP a unique
 *    violation, QM_EINVAL bad data (SQLSTATE classes 22 and 23), QM_EIO the
 *    rest; errstr always carries the SQLSTATE and the server's message;
 *  - transactions and savepoints, LISTEN/NOTIFY wake-ups, a readiness ping;
 *  - a small thread-safe pool for HTTP handler threads;
 *  - versioned, checksummed, advisory-locked schema migrations.
 *
 * A qm_pg_t is used by one thread at a time (the pool hands each out to one
 * thread); a qm_pg_pool_t is safe to share between threads.
 */
#ifndef QM_PG_H
#define QM_PG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct qm_pg qm_pg_t;
typedef struct qm_pg_result qm_pg_result_t;
typedef struct qm_pg_pool qm_pg_pool_t;

/* ---- parameters ------------------------------------------------------- */

typedef enum {
  QM_PG_P_NULL = 0, /* SQL NULL */
  QM_PG_P_TEXT,     /* a NUL-terminated string, type inferred by the server */
  QM_PG_P_BYTES,    /* bytes sent in binary format as bytea (NUL bytes fine) */
  QM_PG_P_INT64     /* an int64 sent as bigint */
} qm_pg_param_kind_t;

/* One statement parameter. Borrowed: value must stay valid for the call. */
typedef struct qm_pg_param {
  qm_pg_param_kind_t kind;
  const void *value; /* TEXT: the string (NULL means SQL NULL); BYTES: the bytes */
  size_t len;        /* BYTES: the number of bytes (value may be NULL when 0) */
  int64_t i64;       /* INT64: the value */
} qm_pg_param_t;

#define QM_PG_TEXT(s) ((qm_pg_param_t){.kind = QM_PG_P_TEXT, .value = (s)})
#define QM_PG_BYTES(p, n) ((qm_pg_param_t){.kind = QM_PG_P_BYTES, .value = (p), .len = (n)})
#define QM_PG_INT64(v) ((qm_pg_param_t){.kind = QM_PG_P_INT64, .i64 = (int64_t)(v)})
#define QM_PG_NULL ((qm_pg_param_t){.kind = QM_PG_P_NULL})

/* ---- connections ------------------------------------------------------ */

/* Opens a connection to dsn (a libpq conninfo string or URI) and sets the
 * search path to schema (quoted as an identifier; the schema need not exist
 * yet), then public; schema NULL or "" leaves the server's default search
 * path (for administrative connections). application_name is "qm-<schema>" unless the dsn sets
 * one. Returns NULL with the reason in errstr when the first connection
 * fails (callers retry or exit). Caller frees with qm_pg_destroy(). */
qm_pg_t *qm_pg_connect(const char *dsn, const char *schema, char *errstr, size_t errstr_size);

/* Same as qm_pg_connect(), with application_name set to app_name (the
 * service name, e.g. "qm-intake") when app_name is not NULL; it then wins
 * over the dsn's. */
qm_pg_t *qm_pg_connect_app(const char *dsn, const char *schema, const char *app_name,
                           char *errstr, size_t errstr_size);

/* Closes the connection (the server rolls back an open transaction) and
 * frees c. NULL is a no-op. */
void qm_pg_destroy(qm_pg_t *c);

/* Makes sure c is connected: when the connection is known to be broken it
 * reconnects, retrying with exponential backoff (100 ms doubling to 5 s, with
 * jitter) until deadline_ms (on the qm_mono_ms() clock; a deadline in the
 * past means "at most one attempt, and only if the backoff allows it now").
 * A reconnect restores the search path and the LISTENs of qm_pg_listen().
 * Returns QM_OK, QM_ETIMEOUT at the deadline, QM_ESHUTDOWN when shutdown was
 * requested. A connection that died silently is only known broken after a
 * statement failed on it with QM_ETRANSIENT: call this then. */
int qm_pg_ensure(qm_pg_t *c, int64_t deadline_ms);

/* True when the connection is believed usable (no failure seen yet). */
bool qm_pg_connected(const qm_pg_t *c);
/* The schema given at connect. Valid until qm_pg_destroy(). */
const char *qm_pg_schema(const qm_pg_t *c);
/* The server process id of the session (0 when not connected), for logs and
 * for tests that terminate a backend. */
int qm_pg_backend_pid(const qm_pg_t *c);
/* The SQLSTATE of the last failed statement on c ("" after a success; "08006"
 * when the connection was lost without one). Valid until the next call on c. */
const char *qm_pg_last_sqlstate(const qm_pg_t *c);

/* ---- statements -------------------------------------------------------- */

/* Runs one statement with nparams parameters ($1..$n). Results come in text
 * format. When res is not NULL it receives the result on success; caller
 * frees with qm_pg_result_destroy(); on failure *res is left untouched.
 * Never reconnects by itself (a silent reconnect inside a transaction would
 * run the rest of it outside): on a broken connection it returns
 * QM_ETRANSIENT; the caller calls qm_pg_ensure() and retries the whole
 * transaction. Returns QM_OK, QM_ETRANSIENT, QM_EDUP, QM_EINVAL or QM_EIO
 * (see the top of this file), with SQLSTATE and message in errstr. */
int qm_pg_exec(qm_pg_t *c, const char *sql, const qm_pg_param_t *params, int nparams,
               qm_pg_result_t **res, char *errstr, size_t errstr_size);

/* Runs parameterless SQL that may hold several statements separated by
 * semicolons (migrations, SET, LOCK ...). Same errors as qm_pg_exec(). */
int qm_pg_exec_simple(qm_pg_t *c, const char *sql, char *errstr, size_t errstr_size);

/* Result accessors. row and col are 0-based and must be in range. */
int qm_pg_ntuples(const qm_pg_result_t *res);
int qm_pg_nfields(const qm_pg_result_t *res);
/* The column number of a field name, -1 when absent. */
int qm_pg_fnumber(const qm_pg_result_t *res, const char *name);
/* The value as text ("" for NULL). Valid until qm_pg_result_destroy(). */
const char *qm_pg_get(const qm_pg_result_t *res, int row, int col);
bool qm_pg_is_null(const qm_pg_result_t *res, int row, int col);
/* The length in bytes of the text form of the value. */
size_t qm_pg_len(const qm_pg_result_t *res, int row, int col);
/* Decodes a bytea value into a new buffer (NUL-terminated for convenience,
 * the NUL not counted in *len). Caller frees *out with free(). A NULL value
 * gives *out = NULL, *len = 0 and QM_OK. QM_EINVAL when not bytea text. */
int qm_pg_get_bytes(const qm_pg_result_t *res, int row, int col, unsigned char **out,
                    size_t *len);
/* Parses an integer value. QM_EINVAL for NULL or not an integer. */
int qm_pg_get_int64(const qm_pg_result_t *res, int row, int col, int64_t *out);
/* Rows affected by INSERT/UPDATE/DELETE (0 for other statements). */
int64_t qm_pg_affected(const qm_pg_result_t *res);
/* Frees a result. NULL is a no-op. */
void qm_pg_result_destroy(qm_pg_result_t *res);

/* ---- transactions ------------------------------------------------------ */

/* BEGIN. If the connection is known broken it first makes one reconnect
 * attempt (when the backoff allows), since nothing is lost before BEGIN. */
int qm_pg_begin(qm_pg_t *c, char *errstr, size_t errstr_size);

/* COMMIT. QM_OK means durably committed. A COMMIT that fails because the
 * connection was lost is AMBIGUOUS: the transaction may or may not have
 * committed. It returns QM_ETRANSIENT like any other retryable failure, so
 * callers retry the whole transaction and must therefore be idempotent (the
 * inbox table, qm_inbox_claim(), makes event handlers so). A transaction that
 * had already failed (the server answers ROLLBACK) returns QM_EIO. */
int qm_pg_commit(qm_pg_t *c, char *errstr, size_t errstr_size);

/* ROLLBACK. QM_OK also when no transaction is open or the connection is
 * gone (the server discards the transaction with the session). */
int qm_pg_rollback(qm_pg_t *c, char *errstr, size_t errstr_size);

/* SAVEPOINT name / ROLLBACK TO SAVEPOINT name / RELEASE SAVEPOINT name; name
 * is quoted as an identifier. Rolling back to a savepoint is how a handler
 * recovers from an expected error (e.g. QM_EDUP) inside a transaction. */
int qm_pg_savepoint(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size);
int qm_pg_rollback_to(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size);
int qm_pg_release(qm_pg_t *c, const char *name, char *errstr, size_t errstr_size);

/* ---- readiness and notifications --------------------------------------- */

/* Readiness check: SELECT 1 with a 1 s timeout (one reconnect attempt first
 * when the connection is known broken). QM_OK, QM_ETIMEOUT (the connection is
 * then closed, to be reopened by qm_pg_ensure()) or QM_ETRANSIENT. Must not
 * be called inside a transaction. */
int qm_pg_ping(qm_pg_t *c);

/* LISTEN channel (quoted as an identifier: case is kept, as pg_notify()
 * sends it). Remembered and re-issued after every reconnect. */
int qm_pg_listen(qm_pg_t *c, const char *channel, char *errstr, size_t errstr_size);

/* Waits up to timeout_ms (0: just check) for a notification on a listened
 * channel and copies its channel name into channel_out (may be NULL).
 * Notifications are wake-up hints only: they are lost while disconnected, so
 * callers poll as well. QM_OK, QM_ETIMEOUT, or QM_ETRANSIENT when the
 * connection broke. Must not be called inside a transaction. */
int qm_pg_wait_notify(qm_pg_t *c, int timeout_ms, char *channel_out, size_t channel_out_size);

/* ---- pool --------------------------------------------------------------- */

/* size connections to dsn, each with the search path of schema and
 * application_name app_name (may be NULL). All are opened now; NULL with the
 * reason in errstr if one fails. Caller frees with qm_pg_pool_destroy(). */
qm_pg_pool_t *qm_pg_pool_new(const char *dsn, const char *schema, const char *app_name,
                             size_t size, char *errstr, size_t errstr_size);

/* Takes a free connection, waiting up to timeout_ms for one. A connection
 * known broken is reconnected first (within the same bound). *out is valid
 * until qm_pg_pool_release(); it must be released exactly once. Returns
 * QM_OK, QM_ETIMEOUT (none free or reconnect not possible in time) or
 * QM_ESHUTDOWN. Thread-safe. */
int qm_pg_pool_acquire(qm_pg_pool_t *pool, int timeout_ms, qm_pg_t **out);

/* Gives c back. A transaction left open is rolled back; a broken connection
 * is kept and reconnected lazily by a later acquire. Thread-safe. */
void qm_pg_pool_release(qm_pg_pool_t *pool, qm_pg_t *c);

/* Closes every connection. All must have been released. NULL is a no-op. */
void qm_pg_pool_destroy(qm_pg_pool_t *pool);

/* ---- migrations --------------------------------------------------------- */

/* One schema migration: SQL (several statements allowed, unqualified names:
 * it runs with the search path set to the target schema) applied once, in
 * its own transaction (so no CREATE INDEX CONCURRENTLY). The text of an
 * applied migration must never change: add a new one instead. */
typedef struct qm_migration {
  int version; /* > 0, strictly increasing within one array */
  const char *name;
  const char *sql;
} qm_migration_t;

/* Brings schema up to date: creates it when missing and a
 * schema_migrations(version, name, checksum, applied_at) table in it, then
 * applies each migration not yet recorded there, in version order, each in
 * its own transaction holding a transaction-level advisory lock for the
 * schema, so instances starting together apply each migration exactly once.
 * Refuses (QM_EINVAL, errstr naming the version) when versions are not
 * strictly increasing or when an applied migration's SHA-256 checksum no
 * longer matches its text. Other failures: the codes of qm_pg_exec(). Must
 * not be called inside a transaction. Versions recorded in the table but
 * absent from migs (a newer release ran) are left alone. */
int qm_pg_migrate(qm_pg_t *c, const char *schema, const qm_migration_t *migs, size_t n,
                  char *errstr, size_t errstr_size);

/* A stable 64-bit advisory-lock key for a name (the first 8 bytes of its
 * SHA-256), so every instance derives the same key for "qm.outbox.<schema>". */
int64_t qm_pg_advisory_key(const char *name);

#endif /* QM_PG_H */
