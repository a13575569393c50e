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
 * Criterion runs every Test in a process of its own, so a stack cannot be
 * shared between Tests; a file that wants one stack for many checks runs
 * them as cases of one Test (it_case_run(), IT_CHECK: a failing case is
 * reported and the next one runs). Tests also get: per-service environment
 * overrides, restarts and signals (it_stack_up_env(), it_service_restart(),
 * it_service_signal()), HR events published like an HR system would
 * (it_hr_publish()), a decoding reader of a topic in a fresh group
 * (it_reader_*), and Prometheus samples (it_metric()).
 *
 * Threads: it_http(), it_token() and it_scim_members() may be called from
 * several threads at once; starting and stopping processes and it_pg_*()
 * belong to the test's main thread.
 */
#ifndef QM_IT_HARNESS_H
#define QM_IT_HARNESS_H

#include <jansson.h>
#include <setjmp.h>
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
/* The carrier webhook secret every stack's qm-fulfillment gets (it refuses
 * to start without one); a test may override QM_CARRIER_WEBHOOK_SECRET. */
#define IT_CARRIER_WEBHOOK_SECRET "it-stack-carrier-webhook-secret-0123456789"
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

/* Per-service environment: "NAME=value" put on top of the run's environment
 * every time that service starts ("NAME" without '=' removes the variable). */
typedef struct it_svc_env {
  const char *service; /* "intake", … */
  const char *kv;
} it_svc_env_t;

/* it_stack_up_only() with per-service environment overrides (an array ended
 * by {NULL, NULL}; may be NULL). The overrides stay for later restarts;
 * change them with it_service_setenv(). */
it_stack_t *it_stack_up_env(const char *run_name, const char *const *services,
                            const it_svc_env_t *env);

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

/* Sets ("NAME=value") or removes ("NAME") an environment override of the
 * service for its next starts; a running process is not affected. */
void it_service_setenv(it_stack_t *st, const char *name, const char *kv);

/* SIGTERM the service (it must exit 0 within 15 s, else the test fails with
 * its log tail) and start it again with its current overrides. */
void it_service_restart(it_stack_t *st, const char *name);

/* Sends sig (e.g. SIGHUP) to the service's process. Fails the test when it
 * is not running. */
void it_service_signal(it_stack_t *st, const char *name, int sig);

/* The size in bytes of the service's log now: a mark for it_service_log_since(). */
size_t it_service_log_size(const it_stack_t *st, const char *name);
/* What the service logged from byte offset on. Caller frees with free(). */
char *it_service_log_since(const it_stack_t *st, const char *name, size_t offset);
/* Waits up to timeout_ms until the service's log from offset on contains
 * needle. Returns that part of the log (caller frees with free()), or NULL
 * when the bound ran out. */
char *it_service_log_wait(const it_stack_t *st, const char *name, size_t offset,
                          const char *needle, int timeout_ms);

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
  char *headers;          /* every response header line as received, NULL when none */
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
/* Copies the value of response header name (case-insensitive) into out
 * (truncated, NUL-terminated). True when the header was present. */
bool it_resp_header(const it_resp_t *r, const char *name, char *out, size_t cap);

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

/* GET /v1/requests?subject=<subject>&limit=200 as the token's holder: the
 * subject's requests (newest first). Fails the test unless the answer is
 * 200 with an items array. Caller frees with json_decref(). */
json_t *it_requests_of(it_stack_t *st, const char *token, const char *subject);

/* The person with this id in deploy/local/seed/people.json (the directory
 * intake is seeded with), or NULL. Caller frees with json_decref(). */
json_t *it_seed_person(const char *id);

/* ---- files ---------------------------------------------------------------- */

/* A new directory /tmp/qm-it-<tag>-XXXXXX holding a copy of every *.yaml
 * and *.yml file of src_dir (e.g. the sample catalog). Caller frees the
 * returned path with free() and removes the directory with it_dir_remove(). */
char *it_dir_copy_yaml(const char *src_dir, const char *tag);
/* Writes text to dir/name (replacing it). Fails the test when it cannot. */
void it_file_write(const char *dir, const char *name, const char *text);
/* Removes the regular files of dir, then dir (best effort). */
void it_dir_remove(const char *dir);

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

/* ---- HR lifecycle events ------------------------------------------------- */

/* A person as carried in a qm.v1.HrEvent; NULL text fields are sent empty. */
typedef struct it_hr_person {
  const char *id, *name, *email, *manager_id, *department, *job_function, *country, *location;
  const char *employment_type; /* "employee" (NULL too), "contractor", "third_party" */
  const char *status;          /* "active" (NULL too), "pre_hire", "on_leave", "terminated" */
  const char *start_date, *end_date, *directory_username;
} it_hr_person_t;

typedef struct it_hr_event {
  const char *kind;            /* "joiner", "mover", "leaver", "updated" */
  const char *source;          /* NULL: "hr-test" */
  const char *source_event_id; /* NULL: a fresh UUID */
  const char *effective_date;  /* "YYYY-MM-DD" (see it_date()) */
  const char *previous_department, *previous_job_function;
  it_hr_person_t person;
} it_hr_event_t;

/* Publishes ev as a qm.v1.HrEvent on <prefix>qm.hr.lifecycle.v1, key = the
 * person id, CloudEvents type qm.hr.<kind>.v1 from source /qm/hr-test, and
 * waits for the broker's acknowledgement (fails the test otherwise). */
void it_hr_publish(it_stack_t *st, const it_hr_event_t *ev);

/* Publishes a leaver for the seeded person person_id (it_seed_person(): its
 * name, manager, department… as the HR system knows them), status
 * terminated, effective and ending today. Fails the test when the person is
 * not in the seed. */
void it_hr_leaver_today(it_stack_t *st, const char *person_id);

/* The UTC date days_from_today days from now as "YYYY-MM-DD" (out >= 11). */
void it_date(int days_from_today, char *out, size_t cap);

/* ---- reading a topic ------------------------------------------------------- */

/* A consumer of one topic of the run in a fresh group, from the earliest
 * offset, that decodes what it reads into JSON objects:
 *   {"ce_type", "ce_id", "ce_subject", "key", "topic"} for every event, and
 * for qm.requests.v1 also "event": "submitted" | "cancelled" |
 * "revocation_requested" with the message's fields: request_id,
 * subject_person_id, reason, origin, item_id, role_id, and for submitted
 * "lines": [{"item_id", "role_id", "risk"}]; for qm.decisions.v1 "event":
 * "step_pending" (request_id, line_no, step_id, stage, kind (StepKind
 * number), approver_ids, delegated_from, deadline_at_ms) | "step_decided"
 * (request_id, step_id, approved, decided_by [id], comment, break_glass) |
 * "approved" (request_id, subject_person_id, item_id, role_id, approvers
 * [ids, "approval" for the service], grant_duration_days, break_glass,
 * break_glass_justification) | "rejected" (request_id, subject_person_id,
 * reason, rejected_by [id]); for qm.access.v1 "event": "granted"
 * (request_id, grant_id, subject_person_id, item_id, role_id, group,
 * connector, granted_at_ms, expires_at_ms, extension) | "revoked" (request_id,
 * grant_id, subject_person_id, item_id, role_id, group, connector, reason,
 * actor_person_id, comment) | "failed" (request_id, subject_person_id, operation,
 * group, operation_id, error, attempts, retryable) | "expiry_notice"
 * (request_id, grant_id, subject_person_id, expires_at_ms) | "drift" (group,
 * connector, finding, directory_user_id, subject_person_id, grant_id,
 * repaired). */
typedef struct it_reader it_reader_t;

/* Opens a reader of <prefix><base_topic>. Caller frees with it_reader_close(). */
it_reader_t *it_reader_open(it_stack_t *st, const char *base_topic);
/* Reads what arrived, waiting up to wait_ms for the first message. Returns
 * how many events were added. */
size_t it_reader_poll(it_reader_t *rd, int wait_ms);
/* Every event read so far (array, in order of arrival). Valid until the next
 * poll or close. */
const json_t *it_reader_events(const it_reader_t *rd);
/* How many events read so far have every key of pattern with an equal value
 * (pattern is a JSON object; compared with json_equal()). */
int it_reader_count(const it_reader_t *rd, const json_t *pattern);
/* Polls until at least min_count events match pattern or timeout_ms passed;
 * returns the count then. */
int it_reader_wait(it_reader_t *rd, const json_t *pattern, int min_count, int timeout_ms);
/* Leaves the group and frees rd. NULL is accepted. */
void it_reader_close(it_reader_t *rd);

/* ---- Prometheus metrics ---------------------------------------------------- */

/* The sum of every sample of metric name in a text exposition whose labels
 * include each pair of labels_csv ("rule=unknown_item,origin=manager"; NULL
 * or "": any labels). *found (may be NULL) says whether any sample matched. */
double it_metric(const char *exposition, const char *name, const char *labels_csv, bool *found);

/* ---- cases: several checks on one stack ------------------------------------ */

/* One Criterion test that runs several independent cases on one stack
 * (Criterion runs each Test in its own process, so a stack cannot be shared
 * between Tests). A failing IT_CHECK marks the test failed (cr_expect), ends
 * the case at once and the run goes on with the next case. Harness helpers
 * still abort the whole test on infrastructure failures. */
typedef struct it_cases {
  jmp_buf jb;
  char current[96];
  int passed, failed;
  char summary[8192];
  size_t summary_len;
  int64_t t0_ms;
  void *ctx; /* the test's own state, for its cases */
} it_cases_t;

typedef void (*it_case_fn)(it_stack_t *st, it_cases_t *cs);

/* Runs fn as case name and records the outcome and its duration. */
void it_case_run(it_cases_t *cs, it_stack_t *st, const char *name, it_case_fn fn);
/* Records a failure of the current case and ends it (longjmp). */
void it_case_fail(it_cases_t *cs, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));
/* Prints every case with PASS/FAIL and its time; true when all passed. */
bool it_cases_report(it_cases_t *cs, const char *title);

#define IT_CHECK(cs, cond, ...)                                                                \
  do {                                                                                         \
    if (!(cond)) it_case_fail((cs), __FILE__, __LINE__, __VA_ARGS__);                          \
  } while (0)

/* Polls intake's GET /v1/requests/{id} until its status is want, and ends
 * the case (it_case_fail) when it reaches another final status or the bound
 * runs out. Returns the last answer; caller frees with json_decref(). */
json_t *it_case_wait_status(it_cases_t *cs, it_stack_t *st, const char *token, const char *id,
                            const char *want, int timeout_ms);

/* ---- HTTP recorder: a local peer that records what it receives ------------ */

/* A small HTTP server on 127.0.0.1 and a free port, standing in for the
 * outside systems a service calls (webhook receivers, procurement, carriers):
 * it records every request (method, path with query, headers, body) and
 * answers with a configurable status and body, optionally after a delay.
 * Thread-safe: the server runs on its own thread; every function may be
 * called from the test while requests arrive. */
typedef struct it_recorder it_recorder_t;

/* Starts a recorder; fails the test when it cannot listen. Every request is
 * answered 200 with body "{}" (application/json) until told otherwise.
 * Caller ends it with it_recorder_stop(). */
it_recorder_t *it_recorder_start(void);
/* "http://127.0.0.1:<port>", valid until it_recorder_stop(). */
const char *it_recorder_url(const it_recorder_t *r);
int it_recorder_port(const it_recorder_t *r);
/* The status for requests that match no it_recorder_set_response() prefix. */
void it_recorder_set_status(it_recorder_t *r, int status);
/* Requests whose path starts with path_prefix are answered with status and
 * body (JSON; NULL = "{}"); the longest matching prefix wins; setting a prefix
 * again replaces it. Up to 32 prefixes. */
void it_recorder_set_response(it_recorder_t *r, const char *path_prefix, int status,
                              const char *body);
/* Every answer waits this long first (0 = none): a peer that hangs. */
void it_recorder_set_delay_ms(it_recorder_t *r, int ms);
/* How many requests arrived whose path starts with path_prefix (NULL: all). */
size_t it_recorder_count(it_recorder_t *r, const char *path_prefix);
/* Waits until it_recorder_count(r, path_prefix) >= n or timeout_ms passed;
 * true when reached. */
bool it_recorder_wait(it_recorder_t *r, const char *path_prefix, size_t n, int timeout_ms);
/* The body of the i-th (0-based, in arrival order) request matching
 * path_prefix (NULL: all), or NULL when there are fewer. Caller frees. */
char *it_recorder_body(it_recorder_t *r, const char *path_prefix, size_t i);
/* Every request matching path_prefix (NULL: all) in arrival order, as an
 * array of {"method","path","headers":{lower-cased name: value},"body",
 * "status","delay_ms"} (status and delay: how it is answered).
 * Caller frees with json_decref(). */
json_t *it_recorder_requests(it_recorder_t *r, const char *path_prefix);
/* Forgets what was recorded (responses stay configured). */
void it_recorder_clear(it_recorder_t *r);
/* Stops the server and frees r. NULL is fine. */
void it_recorder_stop(it_recorder_t *r);

/* ---- publishing events ----------------------------------------------------- */

/* Publishes one event to <prefix><base_topic> as service `source` would:
 * key, CloudEvents type and subject, payload (protobuf bytes, len bytes);
 * waits for the broker's acknowledgement (fails the test otherwise). Lets a
 * test stand in for an upstream service (e.g. approval's RequestApproved). */
void it_publish(it_stack_t *st, const char *base_topic, const char *key, const char *source,
                const char *type, const char *subject, const void *payload, size_t len);

/* One approved access line, as approval publishes it (RequestApproved on
 * qm.decisions.v1): for tests of provisioning that need no intake or approval. */
typedef struct it_approved {
  const char *request_id;         /* required (a UUID, or any unique text) */
  int line_no;                    /* 0: 1 */
  const char *person_id;          /* required; also the Kafka key */
  const char *username;           /* directory login; NULL: person_id */
  const char *item_id, *role_id;  /* item required */
  const char *group;              /* required */
  const char *connector;          /* NULL: "scim-main" */
  int duration_days;              /* 0: open-ended */
  const char *extends_request_id; /* for an extension; NULL: none */
} it_approved_t;

/* Publishes a as a qm.v1.DecisionEvent{approved} (type qm.request.approved.v1). */
void it_publish_approved(it_stack_t *st, const it_approved_t *a);

/* Publishes a RevocationRequested on qm.requests.v1 as intake does for a
 * mover (reason "mover", "requested", "review"…). role_id NULL: any role. */
void it_publish_revocation(it_stack_t *st, const char *request_id, const char *person_id,
                           const char *item_id, const char *role_id, const char *reason);

/* ---- SCIM peer faults -------------------------------------------------------- */

/* Sets a fault on the run's private SCIM peer (POST /_fault, see
 * deploy/local/scim/server.js), e.g. {"mode":"status","status":500,"count":3},
 * {"mode":"status","status":429,"retry_after":1,"count":2},
 * {"mode":"hang","delay_ms":4000,"count":1}, {"mode":"down","down_ms":3000},
 * {"mode":"none"}; json_body NULL reads the current fault and how many
 * requests it hit ({"fault":…, "injected": n, "requests": n}). Returns the
 * peer's answer (caller frees with json_decref()); fails the test when the
 * peer refuses. */
json_t *it_scim_fault(it_stack_t *st, const char *json_body);

/* Adds (member true) or removes user_name to or from the SCIM peer's group
 * with this displayName directly, behind the services' back (drift). Fails
 * the test when the peer refuses. */
void it_scim_member_set(it_stack_t *st, const char *group, const char *user_name, bool member);

/* Creates an empty group with this displayName on the SCIM peer. Fails the
 * test unless the peer answers 201. */
void it_scim_group_create(it_stack_t *st, const char *display_name);

/* ---- slapd: a private LDAP directory ---------------------------------------- */

#define IT_LDAP_BASE "dc=qm,dc=test"
#define IT_LDAP_ADMIN "cn=admin,dc=qm,dc=test"
#define IT_LDAP_PASSWORD "it-secret"
/* The member an emptied groupOfNames keeps (the class requires one). */
#define IT_LDAP_PLACEHOLDER "cn=placeholder,dc=qm,dc=test"

typedef struct it_slapd it_slapd_t;

/* Starts OpenLDAP's slapd (Debian's, unprivileged, back_mdb) on a free port
 * of 127.0.0.1 with a fresh database: people uid=p-0001..p-<n_users> under
 * ou=people and a groupOfNames cn=<name> under ou=groups for each name of
 * the NULL-terminated groups, holding only IT_LDAP_PLACEHOLDER. Fails the
 * test when it cannot start. Caller ends it with it_slapd_stop(). */
it_slapd_t *it_slapd_start(const char *const *groups, int n_users);
/* it_slapd_start(), and slapd also listens with TLS (ldaps) on a second
 * free port, with a self-signed certificate for 127.0.0.1 made by openssl. */
it_slapd_t *it_slapd_start_tls(const char *const *groups, int n_users);
/* "ldap://127.0.0.1:<port>", valid until it_slapd_stop(). */
const char *it_slapd_url(const it_slapd_t *sl);
/* "ldaps://127.0.0.1:<port>" ("" unless started with TLS), and the PEM file
 * of its certificate, the CA to trust. Valid until it_slapd_stop(). */
const char *it_slapd_tls_url(const it_slapd_t *sl);
const char *it_slapd_ca_file(const it_slapd_t *sl);
/* A connector definition for QM_CONNECTORS_FILE pointing at this slapd (a
 * JSON object text). Caller frees with free(). */
char *it_slapd_connector_json(const it_slapd_t *sl);
/* The members of group cn=<group> read with ldapsearch, as a JSON object used
 * as a set: uids of people ("p-0001") and any other DN as itself (the
 * placeholder). Caller frees with json_decref(). */
json_t *it_slapd_members(it_slapd_t *sl, const char *group);
/* ldapmodify: op "add" or "delete" of member uid=<uid> on cn=<group>
 * (behind Quartermaster's back, as drift). Fails the test on an error. */
void it_slapd_modify(it_slapd_t *sl, const char *group, const char *op, const char *uid);
/* Stops slapd and removes its files. NULL is fine. */
void it_slapd_stop(it_slapd_t *sl);

/* ---- a private Redis -------------------------------------------------------- */

/* redis-server (Debian's) on a free port with no persistence, for tests that
 * flush, kill or restart Redis without touching the shared one on 6379. Point
 * a service at it with it_service_setenv(st, "approval", "QM_REDIS_PORT=<port>")
 * (or the overrides of it_stack_up_env()). Fails the test when it cannot start. */
typedef struct it_redis it_redis_t;
it_redis_t *it_redis_start(void);
int it_redis_port(const it_redis_t *rd);
/* Runs one command (argv strings) and returns the reply as text: a string or
 * status as is, an integer in decimal, nil as "", an error as "ERR: ...",
 * an array as its elements joined by '\n'. Fails the test when Redis does not
 * answer. Caller frees with free(). */
char *it_redis_cmd(it_redis_t *rd, const char *const *argv, int argc);
/* kill -9 and start again on the same port: every key is lost. */
void it_redis_restart(it_redis_t *rd);
/* Stops it (SIGKILL) and frees rd. NULL is fine. */
void it_redis_stop(it_redis_t *rd);

/* ---- more instances of a service -------------------------------------------- */

/* Another process of service name (e.g. a second qm-approval sharing the
 * work): the run's environment with the service's overrides, plus env_extra
 * ("NAME=value", NULL-terminated, may be NULL), its own free HTTP port and
 * log <log dir>/<name>-<tag>.log. Waits for GET /readyz 200 (fails the test
 * with its log tail otherwise). Stopped by it_instance_stop() or, when the
 * test process ends, by the parent-death signal. */
typedef struct it_instance it_instance_t;
it_instance_t *it_instance_start(it_stack_t *st, const char *name, const char *tag,
                                 const char *const *env_extra);
int it_instance_port(const it_instance_t *in);
bool it_instance_running(it_instance_t *in);
/* kill -9 it and reap it. */
void it_instance_kill9(it_instance_t *in);
/* SIGTERM (SIGKILL after 10 s) if running, then frees in. NULL is fine. */
void it_instance_stop(it_instance_t *in);

/* ---- small things --------------------------------------------------------- */

/* Milliseconds on the monotonic clock. */
int64_t it_now_ms(void);
/* Sleeps ms milliseconds. */
void it_sleep_ms(int ms);
/* A compact dump of j for messages. Caller frees with free(). */
char *it_json_text(const json_t *j);

#endif /* QM_IT_HARNESS_H */
