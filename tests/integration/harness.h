/*
 * harness: what every integration test needs to run Quartermaster for real —
 * the local stack (PostgreSQL, Redis, Kafka 3.9) brought up by
 * deploy/local/stack.sh, and per test run an isolated world on top of it: a
 * fresh database, a fresh topic prefix with every topic and dead-letter twin,
 * a private SCIM peer (so group memberships start empty) and the five
 * services started from the build tree on free ports.
 *
 * The harness never skips: anything that cannot start fails the test with
 * the reason and the tail of the log that explains it. Services write to
 * $QM_BINARY_DIR/it-logs/<run>/<service>.log (appended across restarts).
 *
 * Usage (Criterion):
 *
 *   Test(e2e, one_request, .fini = it_fini) {
 *     it_stack_t *st = it_stack_up("e2e");
 *     ... assertions ...
 *     it_stack_down(st);   // reached only when every assertion held
 *   }
 *
 * it_stack_down() drops the run's database; when an assertion fails the test
 * never reaches it and it_fini() stops the processes but keeps the database
 * (and the logs) for a post-mortem. Services are also started with a parent
 * death signal, so a crashed test process leaves nothing running.
 *
 * Threads: it_http(), it_token() and it_scim_members() may be called from
 * several threads at once; starting and stopping processes and it_pg_*()
 * belong to the test's main thread.
 */
#ifndef QM_IT_HARNESS_H
#define QM_IT_HARNESS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef QM_SOURCE_DIR
#error "QM_SOURCE_DIR must be defined by the build (tests/CMakeLists.txt)"
#endif
#ifndef QM_BINARY_DIR
#error "QM_BINARY_DIR must be defined by the build (tests/CMakeLists.txt)"
#endif

/* The development HS256 secret the services use when QM_AUTH_HS256_SECRET is unset. */
#define IT_DEV_SECRET "quartermaster-local-development-secret-do-not-use-in-production"
#define IT_SCIM_TOKEN "dev-scim-token"
#define IT_BROKERS "127.0.0.1:9092"

typedef struct it_stack it_stack_t;

/* ---- the stack ---------------------------------------------------------- */

/* Brings the world up for one test run named run_name ([a-z0-9_-], short):
 * stack.sh up, database qm_it_<name>_<pid>, topics under prefix
 * it-<name>-<pid>-<epoch>., a private SCIM peer, and all five services
 * (each answering GET /readyz with 200). Fails the test (cr_assert) with the
 * reason when anything cannot start. Caller ends it with it_stack_down() at
 * the end of a passing test; it_fini() cleans up after a failed one. */
it_stack_t *it_stack_up(const char *run_name);

/* Same, but starts only the services named in the NULL-terminated list
 * (NULL list: all five). Others can be started later with it_service_start(). */
it_stack_t *it_stack_up_only(const char *run_name, const char *const *services);

/* The test passed: SIGTERM every service (SIGKILL after 10 s), stop the
 * private SCIM peer, drop the database, print where the logs are, free st. */
void it_stack_down(it_stack_t *st);

/* For Test(..., .fini = it_fini): when a stack is still up (the test failed
 * before it_stack_down()), stop its processes but keep its database, and
 * print where the database and logs are. A no-op otherwise. */
void it_fini(void);

/* Accessors, valid until it_stack_down(). */
const char *it_stack_dsn(const it_stack_t *st);    /* libpq conninfo of the run's database */
const char *it_stack_db(const it_stack_t *st);     /* the database name */
const char *it_stack_prefix(const it_stack_t *st); /* topic prefix, ends with '.' */
const char *it_stack_log_dir(const it_stack_t *st);
int it_stack_scim_port(const it_stack_t *st);
/* The full name of a topic of qm_topics.h under the run's prefix. Caller frees with free(). */
char *it_topic(const it_stack_t *st, const char *base);

/* ---- services ------------------------------------------------------------ */

/* Starts qm-<name> with the run's environment (same port as before when it
 * ran already) and waits until GET /readyz answers 200 (bound 60 s; fails the
 * test with the last 30 log lines otherwise). */
void it_service_start(it_stack_t *st, const char *name);

/* kill -9 the service (its process only) and reap it. Fails the test when it
 * is not running. */
void it_service_kill9(it_stack_t *st, const char *name);

/* SIGTERM the service and wait up to timeout_ms for it to exit. Returns its
 * exit status (0..255), 128 + signal when a signal ended it, or -1 when it
 * was still running at the bound (it is then killed with SIGKILL). */
int it_service_term(it_stack_t *st, const char *name, int timeout_ms);

/* The HTTP port the service listens on (assigned at it_stack_up). */
int it_service_port(const it_stack_t *st, const char *name);
/* True while the service process is alive. */
bool it_service_running(it_stack_t *st, const char *name);
/* The last n lines of the service's log. Caller frees with free(). */
char *it_service_log_tail(const it_stack_t *st, const char *name, int n);

/* ---- running programs ---------------------------------------------------- */

/* Runs argv[0] (a path) with the test's environment (QM_* variables removed)
 * plus env_extra ("NAME=value", NULL-terminated, may be NULL) and waits up to
 * timeout_ms. When out/err are not NULL they receive its stdout/stderr text
 * (caller frees with free()). Returns the exit status (0..255), 128 + signal,
 * or -1 when it had to be killed at the bound. Fails the test when it cannot
 * be started at all. */
int it_run(const char *const *argv, const char *const *env_extra, int timeout_ms, char **out,
           char **err);

/* ---- HTTP ----------------------------------------------------------------- */

typedef struct it_resp {
  long status;            /* HTTP status; 0 when no answer came */
  json_t *json;           /* the body parsed as JSON, NULL when empty or not JSON */
  char *body;             /* the raw body, NUL-terminated ("" when empty) */
  char content_type[128]; /* Content-Type header ("" when absent) */
  char location[512];     /* Location header ("" when absent) */
  double seconds;         /* total time of the exchange */
} it_resp_t;

/* Sends method path to service svc ("intake"…) with "Authorization: Bearer
 * token" (token NULL: no Authorization header), body as application/json
 * (NULL: no body) and extra headers ("Name: value", NULL-terminated, may be
 * NULL). Fills *out (cleared first); release it with it_resp_clear().
 * Returns out->status (0 when the connection failed, out->body then says why). */
long it_http(it_stack_t *st, const char *svc, const char *method, const char *path,
             const char *token, const char *body, const char *const *headers, it_resp_t *out);
/* Frees what *r holds and zeroes it. */
void it_resp_clear(it_resp_t *r);

/* A development token (HS256, IT_DEV_SECRET, one hour) for person sub with
 * the comma-separated roles. Caller frees with free(). */
char *it_token(const char *sub, const char *roles_csv);

/* ---- requests (intake) ---------------------------------------------------- */

/* POSTs body to intake's /v1/requests as the token's holder and asserts 201
 * with an id. Returns the request id; caller frees with free(). */
char *it_request_submit(it_stack_t *st, const char *token, const char *body);

/* Polls GET /v1/requests/{id} until its status is want (bound timeout_ms);
 * fails the test with the last body when the bound runs out. Returns the
 * last body (caller frees with json_decref()). */
json_t *it_request_wait(it_stack_t *st, const char *id, const char *token, const char *want,
                        int timeout_ms);

/* ---- SCIM peer ------------------------------------------------------------ */

/* The userNames of the members of the group with this displayName on the
 * private SCIM peer, as a JSON object used as a set ({"p-0001": true, ...}).
 * Fails the test when the group does not exist or the peer does not answer.
 * Caller frees with json_decref(). */
json_t *it_scim_members(it_stack_t *st, const char *group_display_name);

/* ---- PostgreSQL (the run's database) -------------------------------------- */

/* The first column of the first row of sql as text; NULL when there is no
 * row or the value is NULL. Fails the test when the statement fails.
 * Caller frees with free(). */
char *it_pg_scalar(it_stack_t *st, const char *sql);
/* it_pg_scalar() parsed as an integer; fails the test when it is not one. */
long long it_pg_int(it_stack_t *st, const char *sql);
/* Every row of sql as a JSON array of arrays of strings (null for NULL).
 * Fails the test when the statement fails. Caller frees with json_decref(). */
json_t *it_pg_rows(it_stack_t *st, const char *sql);

/* ---- small things --------------------------------------------------------- */

/* Milliseconds on the monotonic clock. */
int64_t it_now_ms(void);
/* Sleeps ms milliseconds. */
void it_sleep_ms(int ms);
/* A compact dump of j for messages. Caller frees with free(). */
char *it_json_text(const json_t *j);

#endif /* QM_IT_HARNESS_H */
