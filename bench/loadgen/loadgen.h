/*
 * loadgen: the pieces of qm-loadgen, the end-to-end benchmark that submits
 * auto-approvable access requests to intake and times each one until
 * approval announces the approval on qm.decisions.v1 and provisioning
 * announces the grant on qm.access.v1.
 *
 *  - lg_watch (watch.c): a Kafka consumer on its own thread that records,
 *    by request id, when the first RequestApproved (and RequestRejected)
 *    and each AccessGranted (and ProvisioningFailed) event arrived, and that
 *    proves it is positioned on the topics before the first request is
 *    submitted;
 *  - lg_held (held.c): for --extend, the requests that granted each person
 *    what they hold, so a request for a held role can extend one of them;
 *  - lg_submit (submit.c): submits the requests over HTTP with libcurl multi
 *    at a target rate (token bucket) with a bound on requests in flight;
 *  - main.c: options, the run, and the report.
 *
 * Times are microseconds of the monotonic clock (qm_mono_us()), so the two
 * threads' stamps can be subtracted.
 */
#ifndef QM_LOADGEN_H
#define QM_LOADGEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LG_ID_MAX 40 /* request ids are UUIDs: 36 characters and the NUL */
#define LG_ROLES 6   /* auto-approved roles the requests cycle through (submit.c) */

/* ------------------------------------------------------------ lg_watch */

typedef struct lg_watch lg_watch_t;

/* What the watcher saw for one request id. The *_us stamps are the
 * monotonic clock; the *_ms stamps are wall-clock unix milliseconds, for the
 * legs of the path (they compare with the services' event times). */
typedef struct {
  int64_t approved_us; /* receive time of the first RequestApproved; 0 = none */
  int64_t rejected_us; /* receive time of the first RequestRejected; 0 = none */
  int64_t granted_us;  /* receive time of the first AccessGranted; 0 = none */
  int64_t failed_us;   /* receive time of the first ProvisioningFailed; 0 = none */
  uint32_t n_grants;   /* AccessGranted events seen (more than 1 = duplicates) */
  int64_t submitted_kafka_ms; /* Kafka timestamp of the RequestSubmitted; 0 = not seen */
  int64_t approved_ce_ms;     /* the first RequestApproved: its ce_time (made by approval), */
  int64_t approved_kafka_ms;  /* its Kafka timestamp (published by approval's relay) */
  int64_t approved_recv_ms;   /* and when qm-loadgen received it */
  int64_t granted_ce_ms;      /* the same three for the first AccessGranted */
  int64_t granted_kafka_ms;
  int64_t granted_recv_ms;
} lg_outcome_t;

/* Counters of everything the watcher consumed. */
typedef struct {
  uint64_t events;      /* messages consumed from the access topic */
  uint64_t undecodable; /* of those, payloads that are not a qm.v1.AccessEvent */
  uint64_t granted;     /* AccessGranted events (any request, ours or not) */
  uint64_t decision_events;      /* messages consumed from the decisions topic */
  uint64_t decision_undecodable; /* of those, payloads that are not a qm.v1.DecisionEvent */
  uint64_t approved;             /* RequestApproved events (any request, ours or not) */
  uint64_t request_events;       /* messages consumed from the requests topic */
} lg_watch_stats_t;

/* Starts a consumer in a fresh group (unique id) on "<prefix>qm.access.v1",
 * "<prefix>qm.decisions.v1" and "<prefix>qm.requests.v1" (for the Kafka
 * timestamp of each RequestSubmitted) with auto.offset.reset=latest, plus
 * the private readiness topic "<prefix>qm.bench.ready.v1" (created here when
 * missing), on its own thread. Returns only once the consumer is positioned:
 * it publishes marker events to the readiness topic until one comes back
 * (all the topics are assigned in the same rebalance), then lets it settle
 * settle_ms more.
 * QM_ETIMEOUT when no marker came back within ready_timeout_ms.
 * On success *out is set; caller frees with lg_watch_destroy(). */
int lg_watch_start(const char *brokers, const char *prefix, int ready_timeout_ms, int settle_ms,
                   lg_watch_t **out, char *errstr, size_t errstr_size);

/* Declares that request id was submitted and its grant is awaited. Safe from
 * any thread; a grant that arrived before this call still counts. */
void lg_watch_expect(lg_watch_t *w, const char *id);

/* Waits until as many expected ids as n_expected are settled (granted,
 * provisioning failed, or rejected: no grant follows), until
 * deadline_mono_ms, or until shutdown is requested or the consumer failed.
 * Returns the number settled. */
size_t lg_watch_wait(lg_watch_t *w, size_t n_expected, int64_t deadline_mono_ms);

/* Copies what was seen for id into *out (zeros when nothing). */
void lg_watch_outcome(lg_watch_t *w, const char *id, lg_outcome_t *out);

/* Copies the counters into *out. */
void lg_watch_stats(lg_watch_t *w, lg_watch_stats_t *out);

/* Stops the thread, closes the consumer and frees w. NULL is accepted. */
void lg_watch_destroy(lg_watch_t *w);

/* ------------------------------------------------------------- lg_held */

typedef struct lg_held lg_held_t;

/* Asks intake (base URL, without the trailing slash) for the granted
 * requests of people p-0001..p-<people> with token (helpdesk may list anyone's),
 * every page, and keeps the newest request id per (person, item, role) of a
 * granted line. QM_EIO when a look-up fails (the message names the person),
 * QM_ESHUTDOWN when interrupted. On success *out is set; caller frees with
 * lg_held_destroy(). */
int lg_held_load(const char *base, const char *token, size_t people, lg_held_t **out,
                 char *errstr, size_t errstr_size);

/* The id of the request that granted item/role to person (0-based: 0 is
 * p-0001), or NULL when none is known or h is NULL. Valid until
 * lg_held_destroy(h). */
const char *lg_held_find(const lg_held_t *h, size_t person, const char *item, const char *role);

/* How many (person, item, role) grants were found. 0 for NULL. */
size_t lg_held_count(const lg_held_t *h);

/* Writes one line "<person> <item> <role> <request id>" per grant found to
 * path (for bench/intake.lua), replacing the file. QM_EIO when it cannot. */
int lg_held_write(const lg_held_t *h, const char *path, char *errstr, size_t errstr_size);

/* Frees h. NULL is accepted. */
void lg_held_destroy(lg_held_t *h);

/* ----------------------------------------------------------- lg_submit */

/* One submitted request: filled by lg_submit_run(). */
typedef struct {
  int64_t start_us; /* when the HTTP request was started; 0 = never started */
  int64_t start_ms; /* the same moment in wall-clock unix milliseconds */
  int64_t end_us;   /* when its response was complete */
  int status;       /* HTTP status; 0 = transport error (see curl_error) */
  int curl_error;   /* CURLcode, 0 when the transfer worked */
  char id[LG_ID_MAX]; /* request id from a 201 ("" otherwise) */
  bool extends;       /* the request extended an earlier one (--extend) */
} lg_req_t;

/* Called for each 201 with the new request's id (valid during the call). */
typedef void (*lg_created_cb_t)(void *ctx, const char *id);

typedef struct {
  const char *url;      /* full URL of POST /v1/requests */
  const char *token;    /* bearer JWT */
  size_t n;             /* requests to submit */
  long rate;            /* per second; 0 = as fast as the concurrency allows */
  long concurrency;     /* HTTP requests in flight, at least 1 */
  long http_timeout_ms; /* per HTTP request */
  size_t people;        /* persons p-0001..p-<people>, at least 1 */
  const lg_held_t *held; /* NULL, or: a held pair extends the request that granted it */
  lg_created_cb_t on_created;
  void *cb_ctx;
} lg_submit_conf_t;

/* How the HTTP side went, beyond the per-request records. */
typedef struct {
  char sample_status[8];  /* the first failure's status ("404", "curl") */
  char sample_body[240];  /* and the start of its body or curl's message */
  bool interrupted;       /* shutdown was requested before all were sent */
} lg_submit_info_t;

/* Submits conf->n requests; reqs (conf->n entries, caller's array) receives
 * one record each. Person ids cycle through p-0001..p-<conf->people> and, from
 * one request to the next, through the six auto-approved roles of the local
 * catalog (a person and role pair repeats every 6 x people requests: 1,800
 * with the local directory's 300); each request has a fresh Idempotency-Key
 * and, when conf->held knows a grant of its pair, an extends_request_id.
 * Returns QM_OK once every request has finished (whatever its status),
 * QM_ESHUTDOWN when interrupted, QM_EIO when libcurl could not be set up. */
int lg_submit_run(const lg_submit_conf_t *conf, lg_req_t *reqs, lg_submit_info_t *info,
                  char *errstr, size_t errstr_size);

#endif /* QM_LOADGEN_H */
