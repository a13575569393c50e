/*
 * watch.c: the grant watcher of qm-loadgen. A Kafka consumer on its own
 * thread reads "<prefix>qm.access.v1", decodes each qm.v1.AccessEvent and
 * records, in a hash table keyed by request id, when the first AccessGranted
 * (or ProvisioningFailed) for that request arrived. The submitting thread
 * declares the ids it got back from intake (lg_watch_expect()); a grant may
 * be seen before its 201 has been read, so both sides meet in the table and
 * whichever comes second counts the request as settled.
 *
 * The same consumer reads "<prefix>qm.decisions.v1" and records when the
 * first RequestApproved (or RequestRejected) for each request arrived, so
 * the report can time our own event spine (intake → approval) apart from
 * provisioning and its SCIM peer. An approval does not settle a request (the
 * grant is still awaited); a rejection does, since no grant will follow.
 * It also reads "<prefix>qm.requests.v1", only for the Kafka timestamp of
 * each RequestSubmitted (its CloudEvents type; the subject is the request
 * id), and keeps the event time and Kafka timestamp of the first approval
 * and grant, so the report can split the path into legs: intake and its
 * outbox, approval, approval's outbox, provisioning, and so on.
 *
 * Readiness. The consumer starts at the end of the topics
 * (auto.offset.reset=latest, in a fresh group), so an event published before
 * its partitions are assigned and positioned would be missed. qm_kafka does
 * not expose the assignment, so the watcher proves it instead: it subscribes
 * to a private topic "<prefix>qm.bench.ready.v1" as well, and publishes a
 * marker there (subject: this run's id) every 500 ms until one comes back.
 * A marker can only come back once the group has joined and all the topics'
 * partitions, which the eager assignor hands out in one assignment, are being
 * fetched; a short settle time then covers the other topics' partitions'
 * own offset look-ups, which were issued at the same moment. The
 * private topic keeps the markers away from the services (they never
 * subscribe to it).
 *
 * Nothing is committed: offsets are never stored, so the group leaves no
 * trace but its (empty) registration.
 */
#include "loadgen.h"

#include "qm_common.h"
#include "qm_kafka.h"
#include "qm_log.h"
#include "qm_topics.h"
#include "qm/v1/access.pb-c.h"
#include "qm/v1/decisions.pb-c.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LG_READY_TOPIC "qm.bench.ready.v1"
#define LG_READY_TYPE "qm.bench.ready.v1"
#define LG_POLL_BATCH 512
#define LG_POLL_WAIT_MS 50

typedef struct {
  char id[LG_ID_MAX]; /* "" = free slot */
  bool expected;
  lg_outcome_t outcome;
} lg_entry_t;

struct lg_watch {
  qm_consumer_t *consumer; /* used by the thread only, once it runs */
  pthread_t thread;
  bool thread_started;
  char access_topic[256];
  char decisions_topic[256];
  char requests_topic[256];
  char ready_topic[256];
  char run_id[QM_UUID_STR_LEN];

  pthread_mutex_t mu; /* guards everything below */
  pthread_cond_t cv;  /* signalled on readiness, on each settled request, on exit */
  bool stop;
  bool ready;
  bool failed; /* the consumer hit a fatal error; the thread has ended */
  lg_entry_t *slots;
  size_t cap; /* a power of two */
  size_t used;
  size_t settled; /* expected entries that are granted or failed */
  lg_watch_stats_t stats;
};

/* FNV-1a: request ids are random UUIDs, anything simple spreads them. */
static size_t lg_hash(const char *s) {
  uint64_t h = 1469598103934665603ULL;
  for (; *s; s++) {
    h ^= (unsigned char)*s;
    h *= 1099511628211ULL;
  }
  return (size_t)h;
}

/* The slot holding id, or the free slot where it belongs (linear probing). */
static lg_entry_t *lg_slot(lg_entry_t *slots, size_t cap, const char *id) {
  size_t i = lg_hash(id) & (cap - 1);
  while (slots[i].id[0] && strcmp(slots[i].id, id) != 0) i = (i + 1) & (cap - 1);
  return &slots[i];
}

/* Finds or inserts id's entry, growing the table at half full. Called with
 * mu held. Ids longer than LG_ID_MAX - 1 are truncated (never a UUID). */
static lg_entry_t *lg_entry(lg_watch_t *w, const char *id) {
  char key[LG_ID_MAX];
  qm_strlcpy(key, id, sizeof(key));
  if ((w->used + 1) * 2 > w->cap) {
    size_t ncap = w->cap * 2;
    lg_entry_t *ns = qm_calloc(ncap, sizeof(*ns));
    for (size_t i = 0; i < w->cap; i++)
      if (w->slots[i].id[0]) *lg_slot(ns, ncap, w->slots[i].id) = w->slots[i];
    free(w->slots);
    w->slots = ns;
    w->cap = ncap;
  }
  lg_entry_t *e = lg_slot(w->slots, w->cap, key);
  if (!e->id[0]) {
    qm_strlcpy(e->id, key, sizeof(e->id));
    w->used++;
  }
  return e;
}

static bool lg_settled(const lg_entry_t *e) {
  return e->outcome.granted_us != 0 || e->outcome.failed_us != 0 || e->outcome.rejected_us != 0;
}

/* Counts e as settled when an event just settled it. mu held. */
static void lg_note_settled(lg_watch_t *w, const lg_entry_t *e, bool was) {
  if (e->expected && !was && lg_settled(e)) {
    w->settled++;
    pthread_cond_broadcast(&w->cv);
  }
}

/* Records one event of the access topic, received at now_us (monotonic)
 * and now_ms (wall clock). mu held. */
static void lg_record_access(lg_watch_t *w, const qm_event_in_t *ev, int64_t now_us,
                             int64_t now_ms) {
  w->stats.events++;
  Qm__V1__AccessEvent *ae =
      qm__v1__access_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!ae) {
    w->stats.undecodable++;
    return;
  }
  const char *rid = NULL;
  bool grant = false;
  if (ae->event_case == QM__V1__ACCESS_EVENT__EVENT_GRANTED && ae->granted) {
    rid = ae->granted->request_id;
    grant = true;
    w->stats.granted++;
  } else if (ae->event_case == QM__V1__ACCESS_EVENT__EVENT_FAILED && ae->failed) {
    rid = ae->failed->request_id;
  }
  if (rid && !*rid) rid = ev->meta.subject; /* the CloudEvents subject is the request id */
  if (rid && *rid) {
    lg_entry_t *e = lg_entry(w, rid);
    bool was = lg_settled(e);
    if (grant) {
      if (!e->outcome.granted_us) {
        e->outcome.granted_us = now_us;
        e->outcome.granted_ce_ms = ev->meta.time_ms;
        e->outcome.granted_kafka_ms = ev->timestamp_ms;
        e->outcome.granted_recv_ms = now_ms;
      }
      e->outcome.n_grants++;
    } else if (!e->outcome.failed_us) {
      e->outcome.failed_us = now_us;
    }
    lg_note_settled(w, e, was);
  }
  qm__v1__access_event__free_unpacked(ae, NULL);
}

/* Records one event of the decisions topic, received at now_us and now_ms:
 * the first RequestApproved and the first RequestRejected per request id;
 * approval's step events are counted and otherwise ignored. mu held. */
static void lg_record_decision(lg_watch_t *w, const qm_event_in_t *ev, int64_t now_us,
                               int64_t now_ms) {
  w->stats.decision_events++;
  Qm__V1__DecisionEvent *de =
      qm__v1__decision_event__unpack(NULL, ev->payload_len, (const uint8_t *)ev->payload);
  if (!de) {
    w->stats.decision_undecodable++;
    return;
  }
  const char *rid = NULL;
  bool approved = false;
  if (de->event_case == QM__V1__DECISION_EVENT__EVENT_APPROVED && de->approved) {
    rid = de->approved->request_id;
    approved = true;
    w->stats.approved++;
  } else if (de->event_case == QM__V1__DECISION_EVENT__EVENT_REJECTED && de->rejected) {
    rid = de->rejected->request_id;
  }
  if (rid && !*rid) rid = ev->meta.subject; /* the CloudEvents subject is the request id */
  if (rid && *rid) {
    lg_entry_t *e = lg_entry(w, rid);
    bool was = lg_settled(e);
    if (approved) {
      if (!e->outcome.approved_us) {
        e->outcome.approved_us = now_us;
        e->outcome.approved_ce_ms = ev->meta.time_ms;
        e->outcome.approved_kafka_ms = ev->timestamp_ms;
        e->outcome.approved_recv_ms = now_ms;
      }
    } else if (!e->outcome.rejected_us) {
      e->outcome.rejected_us = now_us;
    }
    lg_note_settled(w, e, was);
  }
  qm__v1__decision_event__free_unpacked(de, NULL);
}

/* Records one event of the requests topic: the Kafka timestamp of the first
 * RequestSubmitted per request id. mu held. */
static void lg_record_request(lg_watch_t *w, const qm_event_in_t *ev) {
  w->stats.request_events++;
  if (strcmp(ev->meta.type, "qm.request.submitted.v1") != 0 || !ev->meta.subject[0]) return;
  lg_entry_t *e = lg_entry(w, ev->meta.subject);
  if (!e->outcome.submitted_kafka_ms) e->outcome.submitted_kafka_ms = ev->timestamp_ms;
}

/* The consumer thread: polls until told to stop or the consumer fails. */
static void *lg_watch_main(void *arg) {
  lg_watch_t *w = arg;
  qm_kmsg_t *msgs[LG_POLL_BATCH];
  for (;;) {
    pthread_mutex_lock(&w->mu);
    bool stop = w->stop;
    pthread_mutex_unlock(&w->mu);
    if (stop) break;
    size_t n = 0;
    int rc = qm_consumer_poll_batch(w->consumer, msgs, LG_POLL_BATCH, LG_POLL_WAIT_MS, &n);
    int64_t now_us = qm_mono_us(), now_ms = qm_now_ms();
    pthread_mutex_lock(&w->mu);
    for (size_t i = 0; i < n; i++) {
      const qm_event_in_t *ev = qm_kmsg_event(msgs[i]);
      if (strcmp(ev->topic, w->access_topic) == 0) {
        lg_record_access(w, ev, now_us, now_ms);
      } else if (strcmp(ev->topic, w->decisions_topic) == 0) {
        lg_record_decision(w, ev, now_us, now_ms);
      } else if (strcmp(ev->topic, w->requests_topic) == 0) {
        lg_record_request(w, ev);
      } else if (strcmp(ev->topic, w->ready_topic) == 0 &&
                 strcmp(ev->meta.subject, w->run_id) == 0 && !w->ready) {
        w->ready = true;
        pthread_cond_broadcast(&w->cv);
      }
    }
    if (rc != QM_OK) w->failed = true;
    if (rc != QM_OK) pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (size_t i = 0; i < n; i++) qm_kmsg_destroy(msgs[i]);
    if (rc != QM_OK) {
      qm_log_error("loadgen: the grant consumer stopped: %s; grants after this are not seen",
                   qm_strerror(rc));
      break;
    }
  }
  return NULL;
}

/* Publishes markers until the consumer thread reports one back. */
static int lg_watch_await_ready(lg_watch_t *w, const char *brokers, int ready_timeout_ms,
                                char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  qm_producer_t *p = NULL;
  int64_t deadline = qm_mono_ms() + ready_timeout_ms;
  rc = qm_producer_new(brokers, "qm-loadgen", NULL, 0, NULL, NULL, &p, errstr, errstr_size);
  if (rc) goto out;
  for (;;) {
    qm_event_out_t ev;
    int result = 0;
    char perr[256];
    memset(&ev, 0, sizeof(ev));
    ev.topic = w->ready_topic;
    ev.key = w->run_id;
    ev.key_len = strlen(w->run_id);
    qm_event_meta_init(&ev.meta, "loadgen", LG_READY_TYPE, w->run_id, NULL);
    if (qm_producer_send_batch(p, &ev, 1, 5000, &result, perr, sizeof(perr)) != QM_OK)
      qm_log_warn("loadgen: readiness marker not delivered yet: %s", perr);

    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 500L * 1000 * 1000;
    if (until.tv_nsec >= 1000000000L) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->mu);
    while (!w->ready && !w->failed &&
           pthread_cond_timedwait(&w->cv, &w->mu, &until) == 0) {
    }
    bool ready = w->ready, failed = w->failed;
    pthread_mutex_unlock(&w->mu);
    if (ready) break;
    if (failed) {
      rc = qm_err(errstr, errstr_size, QM_EIO, "the grant consumer failed before it was ready");
      goto out;
    }
    if (qm_shutdown_requested()) {
      rc = qm_err(errstr, errstr_size, QM_ESHUTDOWN, "interrupted while waiting for Kafka");
      goto out;
    }
    if (qm_mono_ms() >= deadline) {
      rc = qm_err(errstr, errstr_size, QM_ETIMEOUT,
                  "the consumer was not assigned %s within %d ms (is Kafka at %s up?)",
                  w->access_topic, ready_timeout_ms, brokers);
      goto out;
    }
  }
out:
  qm_producer_destroy(p);
  return rc;
}

int lg_watch_start(const char *brokers, const char *prefix, int ready_timeout_ms, int settle_ms,
                   lg_watch_t **out, char *errstr, size_t errstr_size) {
  int rc = QM_OK;
  char group[64];
  lg_watch_t *w = qm_calloc(1, sizeof(*w));
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  w->cap = 1024;
  w->slots = qm_calloc(w->cap, sizeof(*w->slots));
  qm_uuid_new(w->run_id);
  if (strlen(prefix) > 200) {
    rc = qm_err(errstr, errstr_size, QM_EINVAL, "topic prefix too long");
    goto out;
  }
  snprintf(w->access_topic, sizeof(w->access_topic), "%s%s", prefix, QM_TOPIC_ACCESS);
  snprintf(w->decisions_topic, sizeof(w->decisions_topic), "%s%s", prefix, QM_TOPIC_DECISIONS);
  snprintf(w->requests_topic, sizeof(w->requests_topic), "%s%s", prefix, QM_TOPIC_REQUESTS);
  snprintf(w->ready_topic, sizeof(w->ready_topic), "%s%s", prefix, LG_READY_TOPIC);

  const char *ready_topic = w->ready_topic;
  rc = qm_kafka_create_topics(brokers, &ready_topic, 1, 1, 1, 10000, errstr, errstr_size);
  if (rc) goto out;

  snprintf(group, sizeof(group), "qm-loadgen-%s", w->run_id);
  const char *topics[] = {w->access_topic, w->decisions_topic, w->requests_topic,
                          w->ready_topic};
  const char *props[] = {"auto.offset.reset=latest", "fetch.wait.max.ms=10"};
  rc = qm_consumer_new(brokers, group, topics, QM_ARRAY_LEN(topics), props, QM_ARRAY_LEN(props),
                       &w->consumer, errstr, errstr_size);
  if (rc) goto out;
  if (pthread_create(&w->thread, NULL, lg_watch_main, w) != 0) {
    rc = qm_err(errstr, errstr_size, QM_EIO, "cannot start the consumer thread");
    goto out;
  }
  w->thread_started = true;
  rc = lg_watch_await_ready(w, brokers, ready_timeout_ms, errstr, errstr_size);
  if (rc) goto out;
  if (settle_ms > 0) qm_sleep_ms(settle_ms);
  *out = w;
  w = NULL;
out:
  lg_watch_destroy(w);
  return rc;
}

void lg_watch_expect(lg_watch_t *w, const char *id) {
  pthread_mutex_lock(&w->mu);
  lg_entry_t *e = lg_entry(w, id);
  if (!e->expected) {
    e->expected = true;
    if (lg_settled(e)) {
      w->settled++;
      pthread_cond_broadcast(&w->cv);
    }
  }
  pthread_mutex_unlock(&w->mu);
}

size_t lg_watch_wait(lg_watch_t *w, size_t n_expected, int64_t deadline_mono_ms) {
  size_t settled;
  pthread_mutex_lock(&w->mu);
  /* Wake up at least every 200 ms to notice a shutdown request. */
  while (w->settled < n_expected && !w->failed && !qm_shutdown_requested() &&
         qm_mono_ms() < deadline_mono_ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 200L * 1000 * 1000;
    if (until.tv_nsec >= 1000000000L) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&w->cv, &w->mu, &until);
  }
  settled = w->settled;
  pthread_mutex_unlock(&w->mu);
  return settled;
}

void lg_watch_outcome(lg_watch_t *w, const char *id, lg_outcome_t *out) {
  char key[LG_ID_MAX];
  qm_strlcpy(key, id, sizeof(key));
  memset(out, 0, sizeof(*out));
  pthread_mutex_lock(&w->mu);
  lg_entry_t *e = lg_slot(w->slots, w->cap, key);
  if (e->id[0]) *out = e->outcome;
  pthread_mutex_unlock(&w->mu);
}

void lg_watch_stats(lg_watch_t *w, lg_watch_stats_t *out) {
  pthread_mutex_lock(&w->mu);
  *out = w->stats;
  pthread_mutex_unlock(&w->mu);
}

void lg_watch_destroy(lg_watch_t *w) {
  if (!w) return;
  if (w->thread_started) {
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
  }
  qm_consumer_destroy(w->consumer); /* closes: leaves the group, nothing stored to commit */
  free(w->slots);
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
  free(w);
}
