/*
 * Unit tests for qm_redis against the machine's real Redis at 127.0.0.1:6379
 * (other engineers share it: keys are prefixed qm-unit:<pid>: and deleted at
 * the end; only our own connections are ever killed, by CLIENT ID; never a
 * FLUSHALL/FLUSHDB). A Redis that is not reachable fails the tests loudly.
 *
 * Besides the wrapper itself, this proves the pattern the timer service needs:
 * a Lua script that atomically claims up to N due members of a sorted set
 * under a lease, run by EVALSHA, surviving SCRIPT FLUSH (NOSCRIPT recovery)
 * and a killed connection.
 */
#include "qm_common.h"
#include "qm_redis.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define REDIS_HOST "127.0.0.1"
#define REDIS_PORT 6379

static char prefix[64];
static char errstr[512];

static void setup(void) {
  signal(SIGPIPE, SIG_IGN);
  snprintf(prefix, sizeof(prefix), "qm-unit:%d:", (int)getpid());
}

static char *key(const char *name) { return qm_asprintf("%s%s", prefix, name); }

static qm_redis_t *must_connect(void) {
  qm_redis_t *r = qm_redis_connect(REDIS_HOST, REDIS_PORT, 1000, 2000, errstr, sizeof(errstr));
  cr_assert_not_null(r, "Redis at %s:%d is not reachable (%s): start it with "
                        "deploy/local/pg-redis.sh start",
                     REDIS_HOST, REDIS_PORT, errstr);
  return r;
}

/* Runs a command of NUL-terminated strings; asserts Redis answered. */
static qm_redis_reply_t *cmd(qm_redis_t *r, int argc, const char *const *argv) {
  qm_redis_reply_t *reply = NULL;
  int rc = qm_redis_command(r, QM_REDIS_IDEMPOTENT, argc, argv, NULL, &reply, errstr,
                            sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "%s: %s", argv[0], errstr);
  return reply;
}

static long long cmd_int(qm_redis_t *r, int argc, const char *const *argv) {
  qm_redis_reply_t *reply = cmd(r, argc, argv);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_INT, "%s did not answer an integer",
               argv[0]);
  long long v = qm_redis_reply_int(reply);
  qm_redis_reply_destroy(reply);
  return v;
}

/* Deletes every key of this test process (SCAN, never KEYS, on a shared server). */
static void teardown(void) {
  qm_redis_t *r = qm_redis_connect(REDIS_HOST, REDIS_PORT, 1000, 2000, errstr, sizeof(errstr));
  if (!r) return;
  char cursor[32] = "0";
  char *match = qm_asprintf("%s*", prefix);
  do {
    const char *argv[] = {"SCAN", cursor, "MATCH", match, "COUNT", "1000"};
    qm_redis_reply_t *reply = NULL;
    if (qm_redis_command(r, QM_REDIS_IDEMPOTENT, 6, argv, NULL, &reply, errstr,
                         sizeof(errstr)) != QM_OK)
      break;
    const qm_redis_reply_t *keys = qm_redis_reply_element(reply, 1);
    for (size_t i = 0; i < qm_redis_reply_len(keys); i++) {
      size_t len = 0;
      const char *k = qm_redis_reply_str(qm_redis_reply_element(keys, i), &len);
      const char *dv[] = {"DEL", k};
      size_t dl[] = {3, len};
      qm_redis_reply_t *d = NULL;
      if (qm_redis_command(r, QM_REDIS_IDEMPOTENT, 2, dv, dl, &d, errstr, sizeof(errstr)) == 0)
        qm_redis_reply_destroy(d);
    }
    qm_strlcpy(cursor, qm_redis_reply_str(qm_redis_reply_element(reply, 0), NULL),
               sizeof(cursor));
    qm_redis_reply_destroy(reply);
  } while (strcmp(cursor, "0") != 0);
  free(match);
  qm_redis_destroy(r);
}

/* Kills exactly r's connection from a second one (CLIENT ID, then CLIENT KILL
 * ID): other clients of the shared Redis are never touched. */
static void kill_own_connection(qm_redis_t *r) {
  static const char *const id_argv[] = {"CLIENT", "ID"};
  long long id = cmd_int(r, 2, id_argv);
  qm_redis_t *killer = must_connect();
  char ids[32];
  snprintf(ids, sizeof(ids), "%lld", id);
  const char *kill_argv[] = {"CLIENT", "KILL", "ID", ids};
  cr_assert_eq(cmd_int(killer, 4, kill_argv), 1, "CLIENT KILL ID %s did not kill one client", ids);
  qm_redis_destroy(killer);
}

TestSuite(redis, .init = setup, .fini = teardown);

Test(redis, ping_and_binary_safe_values) {
  qm_redis_t *r = must_connect();
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_OK, "%s", errstr);

  char *k = key("bin");
  const char value[] = "a\0b\r\nc";
  const char *set_argv[] = {"SET", k, value};
  size_t set_len[] = {3, strlen(k), sizeof(value) - 1};
  qm_redis_reply_t *reply = NULL;
  cr_assert_eq(qm_redis_command(r, 0, 3, set_argv, set_len, &reply, errstr, sizeof(errstr)), 0,
               "%s", errstr);
  size_t len = 0;
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_STATUS);
  cr_assert_str_eq(qm_redis_reply_str(reply, &len), "OK");
  qm_redis_reply_destroy(reply);

  const char *get_argv[] = {"GET", k};
  reply = cmd(r, 2, get_argv);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_STRING);
  const char *got = qm_redis_reply_str(reply, &len);
  cr_assert_eq(len, sizeof(value) - 1, "value truncated at the NUL: %zu bytes", len);
  cr_assert_eq(memcmp(got, value, len), 0);
  qm_redis_reply_destroy(reply);

  /* A missing key is NIL; a wrong-type operation is an error reply with status 0. */
  char *missing = key("missing");
  const char *miss_argv[] = {"GET", missing};
  reply = cmd(r, 2, miss_argv);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_NIL);
  cr_assert_null(qm_redis_reply_str(reply, &len));
  cr_assert_eq(len, 0);
  qm_redis_reply_destroy(reply);

  const char *wrong_argv[] = {"LPUSH", k, "x"};
  reply = cmd(r, 3, wrong_argv);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_ERROR);
  cr_assert(strncmp(qm_redis_reply_str(reply, NULL), "WRONGTYPE", 9) == 0);
  qm_redis_reply_destroy(reply);

  /* Arrays and their elements. */
  char *list = key("list");
  const char *push_argv[] = {"RPUSH", list, "one", "2", "three"};
  cr_assert_eq(cmd_int(r, 5, push_argv), 3);
  const char *range_argv[] = {"LRANGE", list, "0", "-1"};
  reply = cmd(r, 4, range_argv);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_ARRAY);
  cr_assert_eq(qm_redis_reply_len(reply), 3);
  cr_assert_str_eq(qm_redis_reply_str(qm_redis_reply_element(reply, 2), NULL), "three");
  cr_assert_null(qm_redis_reply_element(reply, 3));
  qm_redis_reply_destroy(reply);

  cr_assert_eq(qm_redis_command(r, 0, 0, get_argv, NULL, &reply, errstr, sizeof(errstr)),
               QM_EINVAL);

  qm_redis_stats_t st;
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 0);
  cr_assert_geq(st.commands, 6);
  free(k);
  free(missing);
  free(list);
  qm_redis_destroy(r);
}

Test(redis, connect_refused_fails_with_reason) {
  /* A port nobody listens on: bind one, note it, close it. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  socklen_t sl = sizeof(sa);
  getsockname(fd, (struct sockaddr *)&sa, &sl);
  close(fd);
  errstr[0] = '\0';
  qm_redis_t *r = qm_redis_connect("127.0.0.1", ntohs(sa.sin_port), 500, 500, errstr,
                                   sizeof(errstr));
  cr_assert_null(r);
  cr_assert(strstr(errstr, "connect") != NULL, "errstr: %s", errstr);
}

/* The timer pattern: KEYS[1] due set (score = due time in ms), KEYS[2] claimed
 * set (score = lease expiry in ms), KEYS[3] hash member -> lease owner.
 * ARGV: now_ms, max members, lease_ms, owner (binary). Returns the claimed
 * members, earliest first. */
static const char *const claim_lua =
    "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])\n"
    "if #due == 0 then return due end\n"
    "redis.call('ZREM', KEYS[1], unpack(due))\n"
    "local expires = tonumber(ARGV[1]) + tonumber(ARGV[3])\n"
    "for _, m in ipairs(due) do\n"
    "  redis.call('ZADD', KEYS[2], expires, m)\n"
    "  redis.call('HSET', KEYS[3], m, ARGV[4])\n"
    "end\n"
    "return due\n";

static qm_redis_reply_t *claim(qm_redis_t *r, const char *sha, char *const keys[3], int64_t now,
                               int max, const char *owner, size_t owner_len) {
  char now_s[24], max_s[16];
  snprintf(now_s, sizeof(now_s), "%lld", (long long)now);
  snprintf(max_s, sizeof(max_s), "%d", max);
  const char *args[] = {now_s, max_s, "30000", owner};
  size_t arglens[] = {strlen(now_s), strlen(max_s), 5, owner_len};
  qm_redis_reply_t *reply = NULL;
  int rc = qm_redis_evalsha(r, 0, sha, claim_lua, (const char *const *)keys, NULL, 3, args,
                            arglens, 4, &reply, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_OK, "evalsha: %s", errstr);
  cr_assert_eq(qm_redis_reply_type(reply), QM_REDIS_REPLY_ARRAY, "script answered type %d: %s",
               qm_redis_reply_type(reply), qm_redis_reply_str(reply, NULL));
  return reply;
}

Test(redis, lua_claim_due_timers_survives_script_flush_and_kill) {
  qm_redis_t *r = must_connect();
  char *keys[3] = {key("timers:due"), key("timers:claimed"), key("timers:owner")};
  int64_t now = 1700000000000LL;
  /* Members with NUL and CR LF bytes: ids must come back byte for byte. */
  const char m1[] = "t\0one", m2[] = "t\r\ntwo", m3[] = "t-three", late[] = "t-late";
  const char *members[] = {m1, m2, m3, late};
  size_t mlens[] = {sizeof(m1) - 1, sizeof(m2) - 1, sizeof(m3) - 1, sizeof(late) - 1};
  int64_t dues[] = {now - 3000, now - 2000, now - 1000, now + 60000};
  for (int i = 0; i < 4; i++) {
    char score[24];
    snprintf(score, sizeof(score), "%lld", (long long)dues[i]);
    const char *argv[] = {"ZADD", keys[0], score, members[i]};
    size_t lens[] = {4, strlen(keys[0]), strlen(score), mlens[i]};
    qm_redis_reply_t *reply = NULL;
    cr_assert_eq(qm_redis_command(r, 0, 4, argv, lens, &reply, errstr, sizeof(errstr)), 0);
    cr_assert_eq(qm_redis_reply_int(reply), 1);
    qm_redis_reply_destroy(reply);
  }

  char sha[QM_REDIS_SHA_LEN];
  cr_assert_eq(qm_redis_script_load(r, claim_lua, sha, errstr, sizeof(errstr)), 0, "%s", errstr);
  cr_assert_eq(strlen(sha), 40);

  /* Claim at most 2: the two earliest, in due order, binary intact. */
  const char owner[] = "node\0A";
  qm_redis_reply_t *reply = claim(r, sha, keys, now, 2, owner, sizeof(owner) - 1);
  cr_assert_eq(qm_redis_reply_len(reply), 2);
  for (size_t i = 0; i < 2; i++) {
    size_t len = 0;
    const char *m = qm_redis_reply_str(qm_redis_reply_element(reply, i), &len);
    cr_assert_eq(len, mlens[i]);
    cr_assert_eq(memcmp(m, members[i], len), 0, "member %zu differs", i);
  }
  qm_redis_reply_destroy(reply);

  const char *zcard_due[] = {"ZCARD", keys[0]};
  const char *zcard_claimed[] = {"ZCARD", keys[1]};
  cr_assert_eq(cmd_int(r, 2, zcard_due), 2);
  cr_assert_eq(cmd_int(r, 2, zcard_claimed), 2);
  /* Lease expiry = now + 30 s, owner stored byte for byte. */
  const char *zscore[] = {"ZSCORE", keys[1], members[0]};
  size_t zscore_len[] = {6, strlen(keys[1]), mlens[0]};
  cr_assert_eq(qm_redis_command(r, 0, 3, zscore, zscore_len, &reply, errstr, sizeof(errstr)), 0);
  char expect[24];
  snprintf(expect, sizeof(expect), "%lld", (long long)(now + 30000));
  cr_assert_str_eq(qm_redis_reply_str(reply, NULL), expect);
  qm_redis_reply_destroy(reply);
  const char *hget[] = {"HGET", keys[2], members[1]};
  size_t hget_len[] = {4, strlen(keys[2]), mlens[1]};
  cr_assert_eq(qm_redis_command(r, 0, 3, hget, hget_len, &reply, errstr, sizeof(errstr)), 0);
  size_t olen = 0;
  const char *o = qm_redis_reply_str(reply, &olen);
  cr_assert_eq(olen, sizeof(owner) - 1);
  cr_assert_eq(memcmp(o, owner, olen), 0);
  qm_redis_reply_destroy(reply);

  /* Redis forgets every script (as after a restart): EVALSHA recovers by
   * loading it again, and the claim goes on with the third member only. */
  static const char *const flush[] = {"SCRIPT", "FLUSH"};
  qm_redis_reply_destroy(cmd(r, 2, flush));
  const char *exists_argv[] = {"SCRIPT", "EXISTS", sha};
  reply = cmd(r, 3, exists_argv);
  cr_assert_eq(qm_redis_reply_int(qm_redis_reply_element(reply, 0)), 0, "SCRIPT FLUSH kept it");
  qm_redis_reply_destroy(reply);

  reply = claim(r, sha, keys, now, 10, owner, sizeof(owner) - 1);
  cr_assert_eq(qm_redis_reply_len(reply), 1);
  cr_assert_str_eq(qm_redis_reply_str(qm_redis_reply_element(reply, 0), NULL), m3);
  qm_redis_reply_destroy(reply);
  qm_redis_stats_t st;
  qm_redis_stats(r, &st);
  cr_assert_eq(st.script_reloads, 1);

  /* Nothing else is due; the late one stays put. */
  reply = claim(r, sha, keys, now, 10, owner, sizeof(owner) - 1);
  cr_assert_eq(qm_redis_reply_len(reply), 0);
  qm_redis_reply_destroy(reply);
  cr_assert_eq(cmd_int(r, 2, zcard_due), 1);
  cr_assert_eq(cmd_int(r, 2, zcard_claimed), 3);

  /* The connection is killed: the claim is not idempotent, so the call
   * reports QM_ETRANSIENT instead of re-sending, and the next one works over
   * the reopened connection. */
  kill_own_connection(r);
  char now_s[24];
  snprintf(now_s, sizeof(now_s), "%lld", (long long)(now + 120000));
  const char *args[] = {now_s, "10", "30000", "node-B"};
  reply = NULL;
  int rc = qm_redis_evalsha(r, 0, sha, claim_lua, (const char *const *)keys, NULL, 3, args, NULL,
                            4, &reply, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_ETRANSIENT, "expected QM_ETRANSIENT, got %s", qm_strerror(rc));
  cr_assert_null(reply);
  cr_assert(strstr(errstr, "not idempotent") != NULL, "errstr: %s", errstr);
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnects, 1);
  cr_assert_eq(st.retries, 0);

  reply = claim(r, sha, keys, now + 120000, 10, "node-B", 6);
  cr_assert_eq(qm_redis_reply_len(reply), 1, "the late timer was lost or claimed twice");
  cr_assert_str_eq(qm_redis_reply_str(qm_redis_reply_element(reply, 0), NULL), late);
  qm_redis_reply_destroy(reply);

  for (int i = 0; i < 3; i++) free(keys[i]);
  qm_redis_destroy(r);
}

Test(redis, idempotent_command_is_retried_after_kill) {
  qm_redis_t *r = must_connect();
  char *k = key("counter");
  const char *set_argv[] = {"SET", k, "41"};
  qm_redis_reply_destroy(cmd(r, 3, set_argv));

  kill_own_connection(r);
  const char *get_argv[] = {"GET", k};
  qm_redis_reply_t *reply = cmd(r, 2, get_argv); /* idempotent: reconnect + re-send */
  cr_assert_str_eq(qm_redis_reply_str(reply, NULL), "41");
  qm_redis_reply_destroy(reply);
  qm_redis_stats_t st;
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 1);
  cr_assert_eq(st.reconnects, 1);
  cr_assert_eq(st.retries, 1);

  /* Not idempotent: INCR after a kill is refused, not guessed. */
  kill_own_connection(r);
  const char *incr_argv[] = {"INCR", k};
  reply = NULL;
  int rc = qm_redis_command(r, 0, 2, incr_argv, NULL, &reply, errstr, sizeof(errstr));
  cr_assert_eq(rc, QM_ETRANSIENT, "got %s", qm_strerror(rc));
  cr_assert_null(reply);
  /* The connection was reopened by that call: the next goes straight through. */
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 2);
  cr_assert_eq(st.retries, 1);
  free(k);
  qm_redis_destroy(r);
}

Test(redis, command_timeout_breaks_and_recovers) {
  qm_redis_t *r = qm_redis_connect(REDIS_HOST, REDIS_PORT, 1000, 200, errstr, sizeof(errstr));
  cr_assert_not_null(r, "Redis not reachable: %s", errstr);
  char *k = key("never");
  /* BLPOP for 2 s on an empty list outlasts the 200 ms command timeout. */
  const char *argv[] = {"BLPOP", k, "2"};
  qm_redis_reply_t *reply = NULL;
  int64_t t0 = qm_mono_ms();
  int rc = qm_redis_command(r, 0, 3, argv, NULL, &reply, errstr, sizeof(errstr));
  int64_t took = qm_mono_ms() - t0;
  cr_assert_eq(rc, QM_ETRANSIENT, "got %s", qm_strerror(rc));
  cr_assert(strstr(errstr, "timed out") != NULL, "errstr: %s", errstr);
  cr_assert_lt(took, 1500, "the command timeout was not applied (%lld ms)", (long long)took);
  /* The late reply of the old connection cannot be mistaken for this one. */
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_OK, "%s", errstr);
  free(k);
  qm_redis_destroy(r);
}

Test(redis, dead_server_is_not_hammered) {
  /* A listener that never accepts: the connect completes from the backlog;
   * closing the listener then resets the connection and refuses new ones. */
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
  cr_assert_eq(listen(lfd, 8), 0);
  socklen_t sl = sizeof(sa);
  getsockname(lfd, (struct sockaddr *)&sa, &sl);
  qm_redis_t *r = qm_redis_connect("127.0.0.1", ntohs(sa.sin_port), 300, 300, errstr,
                                   sizeof(errstr));
  cr_assert_not_null(r, "%s", errstr);
  qm_redis_set_backoff(r, 400, 1000);
  close(lfd);

  /* First call: connection lost, one reconnect refused. */
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_redis_stats_t st;
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 1);
  cr_assert_eq(st.reconnects, 0);

  /* A burst of calls within the backoff costs no connect at all. */
  for (int i = 0; i < 50; i++)
    cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 1, "%llu connects during the backoff",
               (unsigned long long)st.reconnect_attempts);
  cr_assert(strstr(errstr, "next reconnect in") != NULL, "errstr: %s", errstr);

  /* After the backoff (400 ms ± 20%) one more attempt, then it doubles. */
  qm_sleep_ms(500);
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 2);
  qm_sleep_ms(500); /* < 800 ms * 0.8: still backing off */
  cr_assert_eq(qm_redis_ping(r, errstr, sizeof(errstr)), QM_ETRANSIENT);
  qm_redis_stats(r, &st);
  cr_assert_eq(st.reconnect_attempts, 2);
  qm_redis_destroy(r);
}
