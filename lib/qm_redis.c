/*
 * qm_redis: blocking Redis connection with one reconnect per call, backoff
 * across calls, idempotency-aware retry and NOSCRIPT recovery. See qm_redis.h
 * for the contracts.
 *
 * Replies are hiredis's own redisReply trees, handed out as the opaque
 * qm_redis_reply_t (the pointer is converted, never dereferenced as anything
 * else), so reading a reply copies nothing.
 */
#include "qm_redis.h"

#include "qm_common.h"
#include "qm_log.h"

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>

#define QM_REDIS_BACKOFF_BASE_MS 100
#define QM_REDIS_BACKOFF_MAX_MS 5000

struct qm_redis {
  redisContext *ctx; /* NULL while disconnected */
  char *host;
  int port;
  int connect_timeout_ms;
  int command_timeout_ms;
  int backoff_base_ms;
  int backoff_max_ms;
  int backoff_ms;            /* current backoff; 0 after a successful connect */
  int64_t next_reconnect_ms; /* monotonic; no reconnect attempt before this */
  uint64_t rng;              /* xorshift state for the jitter */
  char last_error[160];      /* why the connection was last lost or refused */
  qm_redis_stats_t stats;
};

static inline redisReply *qm_redis_rr(const qm_redis_reply_t *reply) {
  return (redisReply *)(void *)(uintptr_t)reply;
}

static inline qm_redis_reply_t *qm_redis_wrap(redisReply *rr) {
  return (qm_redis_reply_t *)(void *)rr;
}

static struct timeval qm_redis_tv(int ms) {
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  return tv;
}

/* Opens a fresh hiredis context with the configured timeouts. Returns NULL
 * with the reason in errstr. */
static redisContext *qm_redis_open(const qm_redis_t *r, char *errstr, size_t errstr_size) {
  redisContext *ctx;
  if (r->connect_timeout_ms > 0)
    ctx = redisConnectWithTimeout(r->host, r->port, qm_redis_tv(r->connect_timeout_ms));
  else
    ctx = redisConnect(r->host, r->port);
  if (!ctx) {
    /* hiredis returns NULL only when it cannot allocate its context. */
    qm_err(errstr, errstr_size, QM_EIO, "redis %s:%d: out of memory", r->host, r->port);
    return NULL;
  }
  if (ctx->err) {
    qm_err(errstr, errstr_size, QM_EIO, "redis %s:%d: connect: %s", r->host, r->port,
           ctx->errstr);
    redisFree(ctx);
    return NULL;
  }
  if (r->command_timeout_ms > 0 &&
      redisSetTimeout(ctx, qm_redis_tv(r->command_timeout_ms)) != REDIS_OK) {
    qm_err(errstr, errstr_size, QM_EIO, "redis %s:%d: cannot set the command timeout: %s",
           r->host, r->port, ctx->errstr);
    redisFree(ctx);
    return NULL;
  }
  /* TCP keepalive finds a peer that vanished without a FIN (a dead node);
   * failing to set it is not worth refusing the connection. */
  (void)redisEnableKeepAlive(ctx);
  return ctx;
}

/* The next jittered delay: d ± 20%. */
static int64_t qm_redis_jitter(qm_redis_t *r, int d) {
  r->rng ^= r->rng << 13;
  r->rng ^= r->rng >> 7;
  r->rng ^= r->rng << 17;
  int64_t span = d / 5;
  if (span <= 0) return d;
  return d - span + (int64_t)(r->rng % (uint64_t)(2 * span + 1));
}

/* Drops a broken context, remembering why. */
static void qm_redis_drop(qm_redis_t *r, const char *why) {
  if (r->ctx) {
    redisFree(r->ctx);
    r->ctx = NULL;
  }
  qm_strlcpy(r->last_error, why, sizeof(r->last_error));
}

/* Reconnects when allowed by the backoff. A failed attempt pushes the next
 * one further out (doubling up to the maximum), so a loop of calls against a
 * dead server costs one connect per backoff period, not one per call.
 * 0 or QM_ETRANSIENT. */
static int qm_redis_reconnect(qm_redis_t *r, char *errstr, size_t errstr_size) {
  int64_t now = qm_mono_ms();
  if (now < r->next_reconnect_ms)
    return qm_err(errstr, errstr_size, QM_ETRANSIENT,
                  "redis %s:%d unavailable (%s); next reconnect in %lld ms", r->host, r->port,
                  r->last_error, (long long)(r->next_reconnect_ms - now));
  r->stats.reconnect_attempts++;
  char why[160];
  redisContext *ctx = qm_redis_open(r, why, sizeof(why));
  if (!ctx) {
    r->backoff_ms = r->backoff_ms ? r->backoff_ms * 2 : r->backoff_base_ms;
    if (r->backoff_ms > r->backoff_max_ms) r->backoff_ms = r->backoff_max_ms;
    r->next_reconnect_ms = qm_mono_ms() + qm_redis_jitter(r, r->backoff_ms);
    qm_strlcpy(r->last_error, why, sizeof(r->last_error));
    qm_log_warn("redis %s:%d reconnect failed (%s); retrying in about %d ms — check that "
                "Redis is running and reachable",
                r->host, r->port, why, r->backoff_ms);
    return qm_err(errstr, errstr_size, QM_ETRANSIENT, "%s", why);
  }
  r->ctx = ctx;
  r->backoff_ms = 0;
  r->next_reconnect_ms = 0;
  r->stats.reconnects++;
  qm_log_info("redis %s:%d reconnected after: %s", r->host, r->port, r->last_error);
  return QM_OK;
}

qm_redis_t *qm_redis_connect(const char *host, int port, int connect_timeout_ms,
                             int command_timeout_ms, char *errstr, size_t errstr_size) {
  if (!host || !*host || port <= 0 || port > 65535) {
    qm_err(errstr, errstr_size, QM_EINVAL, "redis: bad address %s:%d", host ? host : "(null)",
           port);
    return NULL;
  }
  qm_redis_t *r = qm_calloc(1, sizeof(*r));
  r->host = qm_strdup(host);
  r->port = port;
  r->connect_timeout_ms = connect_timeout_ms > 0 ? connect_timeout_ms : 0;
  r->command_timeout_ms = command_timeout_ms > 0 ? command_timeout_ms : 0;
  r->backoff_base_ms = QM_REDIS_BACKOFF_BASE_MS;
  r->backoff_max_ms = QM_REDIS_BACKOFF_MAX_MS;
  r->rng = (uint64_t)qm_mono_us() * 0x9E3779B97F4A7C15ull | 1u;
  r->ctx = qm_redis_open(r, errstr, errstr_size);
  if (!r->ctx) {
    qm_redis_destroy(r);
    return NULL;
  }
  return r;
}

void qm_redis_destroy(qm_redis_t *r) {
  if (!r) return;
  if (r->ctx) redisFree(r->ctx);
  free(r->host);
  free(r);
}

void qm_redis_set_backoff(qm_redis_t *r, int base_ms, int max_ms) {
  r->backoff_base_ms = base_ms > 0 ? base_ms : 1;
  r->backoff_max_ms = max_ms >= r->backoff_base_ms ? max_ms : r->backoff_base_ms;
  if (r->backoff_ms > r->backoff_max_ms) r->backoff_ms = r->backoff_max_ms;
}

void qm_redis_stats(const qm_redis_t *r, qm_redis_stats_t *stats) { *stats = r->stats; }

/* One round trip on the current context. NULL when the connection broke (the
 * context is then dropped and the reason kept in r->last_error). */
static redisReply *qm_redis_roundtrip(qm_redis_t *r, int argc, const char **argv,
                                      const size_t *argvlen) {
  redisReply *rr = redisCommandArgv(r->ctx, argc, argv, argvlen);
  if (!rr) {
    char why[160];
    snprintf(why, sizeof(why), "%s", r->ctx->err ? r->ctx->errstr : "no reply");
    if (why[0] == '\0' || strcmp(why, "Resource temporarily unavailable") == 0)
      snprintf(why, sizeof(why), "command timed out after %d ms", r->command_timeout_ms);
    qm_redis_drop(r, why);
  }
  return rr;
}

int qm_redis_command(qm_redis_t *r, unsigned flags, int argc, const char *const *argv,
                     const size_t *argvlen, qm_redis_reply_t **reply, char *errstr,
                     size_t errstr_size) {
  int rc = QM_OK;
  redisReply *rr = NULL;
  size_t *lens = NULL;
  if (argc < 1 || !argv) return qm_err(errstr, errstr_size, QM_EINVAL, "redis: no command");
  for (int i = 0; i < argc; i++)
    if (!argv[i]) return qm_err(errstr, errstr_size, QM_EINVAL, "redis: argument %d is NULL", i);
  r->stats.commands++;
  if (!argvlen) {
    lens = qm_malloc((size_t)argc * sizeof(*lens));
    for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
    argvlen = lens;
  }
  /* hiredis takes const char ** (no const on the pointers); it does not write. */
  const char **av = (const char **)(uintptr_t)argv;

  if (!r->ctx) {
    /* Lost on an earlier call: the command has not been sent, so after a
     * reconnect it may go out whatever its idempotency. */
    rc = qm_redis_reconnect(r, errstr, errstr_size);
    if (rc) goto out;
  }
  rr = qm_redis_roundtrip(r, argc, av, argvlen);
  if (rr) goto out;

  char lost[160];
  qm_strlcpy(lost, r->last_error, sizeof(lost));
  rc = qm_redis_reconnect(r, errstr, errstr_size);
  if (rc) {
    qm_err(errstr, errstr_size, QM_ETRANSIENT, "redis %s:%d: connection lost (%s); reconnect "
           "failed (%s)", r->host, r->port, lost, r->last_error);
    goto out;
  }
  if (!(flags & QM_REDIS_IDEMPOTENT)) {
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT,
                "redis %s:%d: connection lost waiting for the reply to %.*s (%s); it may or may "
                "not have run; reconnected, not re-sent since it is not idempotent",
                r->host, r->port, (int)(argvlen[0] < 32 ? argvlen[0] : 32), argv[0], lost);
    goto out;
  }
  r->stats.retries++;
  rr = qm_redis_roundtrip(r, argc, av, argvlen);
  if (!rr)
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT,
                "redis %s:%d: connection lost again after a reconnect (%s)", r->host, r->port,
                r->last_error);

out:
  if (rc == QM_OK) *reply = qm_redis_wrap(rr);
  free(lens);
  return rc;
}

int qm_redis_ping(qm_redis_t *r, char *errstr, size_t errstr_size) {
  static const char *const argv[] = {"PING"};
  qm_redis_reply_t *reply = NULL;
  int rc = qm_redis_command(r, QM_REDIS_IDEMPOTENT, 1, argv, NULL, &reply, errstr, errstr_size);
  if (rc) return rc;
  size_t len = 0;
  const char *s = qm_redis_reply_str(reply, &len);
  if (qm_redis_reply_type(reply) != QM_REDIS_REPLY_STATUS || len != 4 ||
      memcmp(s, "PONG", 4) != 0)
    rc = qm_err(errstr, errstr_size, QM_ETRANSIENT, "redis %s:%d: PING answered %.*s", r->host,
                r->port, s ? (int)(len < 120 ? len : 120) : 6, s ? s : "non-PONG");
  qm_redis_reply_destroy(reply);
  return rc;
}

int qm_redis_script_load(qm_redis_t *r, const char *lua, char sha_out[QM_REDIS_SHA_LEN],
                         char *errstr, size_t errstr_size) {
  const char *argv[] = {"SCRIPT", "LOAD", lua};
  qm_redis_reply_t *reply = NULL;
  if (!lua) return qm_err(errstr, errstr_size, QM_EINVAL, "redis: no script");
  int rc = qm_redis_command(r, QM_REDIS_IDEMPOTENT, 3, argv, NULL, &reply, errstr, errstr_size);
  if (rc) return rc;
  size_t len = 0;
  const char *s = qm_redis_reply_str(reply, &len);
  qm_redis_reply_type_t type = qm_redis_reply_type(reply);
  if (type == QM_REDIS_REPLY_STRING && len == QM_REDIS_SHA_LEN - 1) {
    memcpy(sha_out, s, len);
    sha_out[len] = '\0';
  } else if (type == QM_REDIS_REPLY_ERROR) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "redis: SCRIPT LOAD refused: %.*s",
                (int)(len < 300 ? len : 300), s);
  } else {
    rc = qm_err(errstr, errstr_size, QM_EIO, "redis: SCRIPT LOAD: unexpected reply type %d",
                (int)type);
  }
  qm_redis_reply_destroy(reply);
  return rc;
}

static bool qm_redis_is_noscript(const qm_redis_reply_t *reply) {
  size_t len = 0;
  const char *s = qm_redis_reply_str(reply, &len);
  return qm_redis_reply_type(reply) == QM_REDIS_REPLY_ERROR && len >= 8 &&
         memcmp(s, "NOSCRIPT", 8) == 0;
}

int qm_redis_evalsha(qm_redis_t *r, unsigned flags, const char *sha, const char *lua,
                     const char *const *keys, const size_t *keylens, size_t nkeys,
                     const char *const *args, const size_t *arglens, size_t nargs,
                     qm_redis_reply_t **reply, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  qm_redis_reply_t *rep = NULL;
  if (!sha || strlen(sha) != QM_REDIS_SHA_LEN - 1)
    return qm_err(errstr, errstr_size, QM_EINVAL, "redis: EVALSHA needs a 40-digit SHA1");
  if (nkeys > 100000 || nargs > 100000)
    return qm_err(errstr, errstr_size, QM_EINVAL, "redis: too many keys or arguments");
  if ((nkeys && !keys) || (nargs && !args))
    return qm_err(errstr, errstr_size, QM_EINVAL, "redis: keys or arguments missing");

  size_t argc = 3 + nkeys + nargs;
  const char **argv = qm_calloc(argc, sizeof(*argv));
  size_t *argvlen = qm_calloc(argc, sizeof(*argvlen));
  char numkeys[24];
  snprintf(numkeys, sizeof(numkeys), "%zu", nkeys);
  argv[0] = "EVALSHA";
  argv[1] = sha;
  argv[2] = numkeys;
  for (size_t i = 0; i < 3; i++) argvlen[i] = strlen(argv[i]);
  for (size_t i = 0; i < nkeys; i++) {
    if (!keys[i]) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "redis: key %zu is NULL", i);
      goto out;
    }
    argv[3 + i] = keys[i];
    argvlen[3 + i] = keylens ? keylens[i] : strlen(keys[i]);
  }
  for (size_t i = 0; i < nargs; i++) {
    if (!args[i]) {
      rc = qm_err(errstr, errstr_size, QM_EINVAL, "redis: argument %zu is NULL", i);
      goto out;
    }
    argv[3 + nkeys + i] = args[i];
    argvlen[3 + nkeys + i] = arglens ? arglens[i] : strlen(args[i]);
  }

  rc = qm_redis_command(r, flags, (int)argc, argv, argvlen, &rep, errstr, errstr_size);
  if (rc || !lua || !qm_redis_is_noscript(rep)) goto out;

  /* Redis forgot the script (restart, SCRIPT FLUSH, failover to a replica
   * that never saw it). NOSCRIPT means nothing ran: load and call again. */
  qm_redis_reply_destroy(rep);
  rep = NULL;
  char loaded[QM_REDIS_SHA_LEN];
  rc = qm_redis_script_load(r, lua, loaded, errstr, errstr_size);
  if (rc) goto out;
  if (strcasecmp(loaded, sha) != 0) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "redis: the script text hashes to %s, not %s: pass the text the SHA came from",
                loaded, sha);
    goto out;
  }
  r->stats.script_reloads++;
  qm_log_info("redis %s:%d had forgotten script %s; loaded it again", r->host, r->port, sha);
  rc = qm_redis_command(r, flags, (int)argc, argv, argvlen, &rep, errstr, errstr_size);

out:
  if (rc == QM_OK) *reply = rep;
  else qm_redis_reply_destroy(rep);
  free(argvlen);
  free(argv);
  return rc;
}

qm_redis_reply_type_t qm_redis_reply_type(const qm_redis_reply_t *reply) {
  if (!reply) return QM_REDIS_REPLY_NIL;
  switch (qm_redis_rr(reply)->type) {
  case REDIS_REPLY_INTEGER: return QM_REDIS_REPLY_INT;
  case REDIS_REPLY_STRING: return QM_REDIS_REPLY_STRING;
  case REDIS_REPLY_STATUS: return QM_REDIS_REPLY_STATUS;
  case REDIS_REPLY_ERROR: return QM_REDIS_REPLY_ERROR;
  case REDIS_REPLY_ARRAY: return QM_REDIS_REPLY_ARRAY;
  default: return QM_REDIS_REPLY_NIL;
  }
}

long long qm_redis_reply_int(const qm_redis_reply_t *reply) {
  return qm_redis_reply_type(reply) == QM_REDIS_REPLY_INT ? qm_redis_rr(reply)->integer : 0;
}

const char *qm_redis_reply_str(const qm_redis_reply_t *reply, size_t *len) {
  switch (qm_redis_reply_type(reply)) {
  case QM_REDIS_REPLY_STRING:
  case QM_REDIS_REPLY_STATUS:
  case QM_REDIS_REPLY_ERROR:
    if (len) *len = qm_redis_rr(reply)->len;
    return qm_redis_rr(reply)->str;
  default:
    if (len) *len = 0;
    return NULL;
  }
}

size_t qm_redis_reply_len(const qm_redis_reply_t *reply) {
  return qm_redis_reply_type(reply) == QM_REDIS_REPLY_ARRAY ? qm_redis_rr(reply)->elements : 0;
}

const qm_redis_reply_t *qm_redis_reply_element(const qm_redis_reply_t *reply, size_t i) {
  if (i >= qm_redis_reply_len(reply)) return NULL;
  return qm_redis_wrap(qm_redis_rr(reply)->element[i]);
}

void qm_redis_reply_destroy(qm_redis_reply_t *reply) {
  if (reply) freeReplyObject(qm_redis_rr(reply));
}
