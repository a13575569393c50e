/*
 * qm_redis: a small blocking Redis client over hiredis 0.14 (Debian 12), for
 * the timer sorted sets and anything else a service keeps in Redis.
 *
 * What it adds to hiredis:
 *  - binary-safe commands from an argv/argvlen vector, with owned replies whose
 *    type and contents are read through accessors (no hiredis type leaks);
 *  - a broken connection (reset, EOF, command timeout) is reopened once per
 *    call; the command is sent again only when the caller declares it
 *    idempotent (QM_REDIS_IDEMPOTENT), since a lost reply does not say whether
 *    Redis ran it. Failed reconnects back off exponentially across calls, so a
 *    dead server is not hammered by a busy loop;
 *  - Lua scripts by SHA1 with recovery from NOSCRIPT (after a Redis restart or
 *    SCRIPT FLUSH the script is loaded again and the call repeated once).
 *
 * Thread safety: none inside. A qm_redis_t is one connection and must be used
 * by one thread at a time; give each thread its own (they are cheap). Replies
 * are independent of the connection and may be passed to another thread.
 *
 * The process must ignore SIGPIPE (qm_signals_install() does): hiredis writes
 * with write(2), and writing to a connection Redis closed raises SIGPIPE.
 */
#ifndef QM_REDIS_H
#define QM_REDIS_H

#include <stddef.h>
#include <stdint.h>

typedef struct qm_redis qm_redis_t;
typedef struct qm_redis_reply qm_redis_reply_t;

typedef enum {
  QM_REDIS_REPLY_NIL = 0,
  QM_REDIS_REPLY_INT,
  QM_REDIS_REPLY_STRING,
  QM_REDIS_REPLY_STATUS, /* simple string: "OK", "PONG" */
  QM_REDIS_REPLY_ERROR,  /* "-ERR ...", "-WRONGTYPE ...", "-NOSCRIPT ..." */
  QM_REDIS_REPLY_ARRAY
} qm_redis_reply_type_t;

/* Command flags. */
enum {
  /* Running the command twice has the same effect as running it once (GET,
   * SET k v, ZADD, DEL, PING, a read-only script). Only such commands are
   * re-sent after the connection broke while waiting for their reply. */
  QM_REDIS_IDEMPOTENT = 1u << 0
};

/* Counters for metrics; read with qm_redis_stats(). */
typedef struct qm_redis_stats {
  uint64_t commands;           /* calls of qm_redis_command() and friends */
  uint64_t reconnect_attempts; /* connects tried after a broken connection */
  uint64_t reconnects;         /* of which succeeded */
  uint64_t retries;            /* commands re-sent after a reconnect */
  uint64_t script_reloads;     /* SCRIPT LOADs done to recover from NOSCRIPT */
} qm_redis_stats_t;

/* Opens a connection to host:port. connect_timeout_ms bounds the TCP connect
 * (also on reconnects), command_timeout_ms each command's round trip (a command
 * that runs out of it breaks the connection: its reply may still arrive, so the
 * stream can no longer be trusted). 0 means no bound (not recommended).
 * Returns NULL with the reason in errstr when Redis cannot be reached.
 * Caller frees with qm_redis_destroy(). */
qm_redis_t *qm_redis_connect(const char *host, int port, int connect_timeout_ms,
                             int command_timeout_ms, char *errstr, size_t errstr_size);

/* Closes the connection and frees r. NULL is fine. */
void qm_redis_destroy(qm_redis_t *r);

/* Sets the reconnect backoff: after a failed reconnect the next one is not
 * tried before base_ms, doubling per further failure up to max_ms (with a
 * random ±20%); calls in between fail fast with QM_ETRANSIENT. The defaults
 * are 100 ms and 5000 ms. */
void qm_redis_set_backoff(qm_redis_t *r, int base_ms, int max_ms);

/* Sends one command, argv[0] being its name ("ZADD"), and waits for the
 * reply. argvlen gives each argument's length (binary safe); NULL means every
 * argument is a NUL-terminated string. flags: 0 or QM_REDIS_IDEMPOTENT.
 *
 * Returns 0 with *reply set whenever Redis answered — also when the answer is
 * an error reply (QM_REDIS_REPLY_ERROR): check the type. The caller frees
 * *reply with qm_redis_reply_destroy(). Otherwise *reply is untouched and:
 *  - QM_ETRANSIENT: Redis could not be reached, or the connection broke and
 *    the command was not idempotent (it may or may not have run), or a
 *    reconnect is still backing off. The next call tries again;
 *  - QM_EINVAL: argc < 1 or a NULL argument. */
int qm_redis_command(qm_redis_t *r, unsigned flags, int argc, const char *const *argv,
                     const size_t *argvlen, qm_redis_reply_t **reply, char *errstr,
                     size_t errstr_size);

/* PING for readiness probes: 0 when Redis answered PONG, else QM_ETRANSIENT
 * (a reconnect is tried as for any idempotent command). */
int qm_redis_ping(qm_redis_t *r, char *errstr, size_t errstr_size);

/* The counters so far. */
void qm_redis_stats(const qm_redis_t *r, qm_redis_stats_t *stats);

#define QM_REDIS_SHA_LEN 41 /* 40 hex digits and the NUL */

/* Loads a Lua script (SCRIPT LOAD) and writes its SHA1 into sha_out. Scripts
 * are usually loaded once at start-up; qm_redis_evalsha() loads them again
 * when Redis has forgotten them. 0, QM_ETRANSIENT, or QM_EINVAL when Redis
 * rejects the script (a compile error, in errstr). */
int qm_redis_script_load(qm_redis_t *r, const char *lua, char sha_out[QM_REDIS_SHA_LEN],
                         char *errstr, size_t errstr_size);

/* EVALSHA sha with nkeys keys and nargs arguments (keylens/arglens as argvlen
 * in qm_redis_command(): NULL for NUL-terminated strings). When Redis answers
 * NOSCRIPT (restarted, flushed, failed over) and lua is not NULL, the script
 * is loaded again and the call repeated once: NOSCRIPT means it did not run,
 * so this is safe for any script. lua must be the text sha was computed from
 * (QM_EINVAL if Redis computes another SHA). flags: QM_REDIS_IDEMPOTENT when
 * the script may safely run twice (see qm_redis_command()).
 * Returns as qm_redis_command(): 0 with *reply (possibly an error reply, e.g.
 * a script runtime error, or NOSCRIPT when lua is NULL). */
int qm_redis_evalsha(qm_redis_t *r, unsigned flags, const char *sha, const char *lua,
                     const char *const *keys, const size_t *keylens, size_t nkeys,
                     const char *const *args, const size_t *arglens, size_t nargs,
                     qm_redis_reply_t **reply, char *errstr, size_t errstr_size);

/* Reply accessors. They accept an element of an array reply as well as a top
 * reply; a NULL reply reads as NIL. */
qm_redis_reply_type_t qm_redis_reply_type(const qm_redis_reply_t *reply);
/* The integer of an INT reply; 0 for other types. */
long long qm_redis_reply_int(const qm_redis_reply_t *reply);
/* The bytes of a STRING, STATUS or ERROR reply and their count in *len (len
 * may be NULL). They are followed by a NUL, but may contain NULs too. NULL
 * (and *len 0) for other types. Valid until the top reply is destroyed. */
const char *qm_redis_reply_str(const qm_redis_reply_t *reply, size_t *len);
/* The number of elements of an ARRAY reply; 0 for other types. */
size_t qm_redis_reply_len(const qm_redis_reply_t *reply);
/* Element i of an ARRAY reply, or NULL when out of range. Valid until the top
 * reply is destroyed; never pass it to qm_redis_reply_destroy(). */
const qm_redis_reply_t *qm_redis_reply_element(const qm_redis_reply_t *reply, size_t i);
/* Frees a reply returned by qm_redis_command() or qm_redis_evalsha(), with
 * all its elements. NULL is fine. */
void qm_redis_reply_destroy(qm_redis_reply_t *reply);

#endif /* QM_REDIS_H */
