/*
 * qm_kafka: the services' only door to Kafka. It wraps librdkafka (2.0.2) in
 * four small pieces and keeps every rd_kafka type behind opaque structs:
 *
 *  - qm_producer_t: the idempotent producer (acks=all) that the outbox relay
 *    publishes through. Events are written in CloudEvents 1.0 Kafka binary
 *    mode (ce_* headers, content-type, traceparent) plus any extra headers.
 *    A synchronous batch call tells the relay exactly which events were
 *    delivered, so it marks only those rows as published.
 *  - qm_consumer_t: a group consumer for at-least-once handling: offsets are
 *    stored only when the caller says its transaction committed
 *    (qm_consumer_store()), and auto commit writes stored offsets only.
 *    Consumed messages come back as owned qm_kmsg_t objects whose
 *    qm_event_in_t view carries the parsed and checked CloudEvents meta.
 *  - qm_dlq_build(): turns a poison message into its dead letter for
 *    "<topic>.dlq" (written through the outbox by the caller).
 *  - qm_kafka_create_topics(): idempotent topic creation for start-up and tests.
 *
 * Threads: a producer may be used from several threads (librdkafka is thread
 * safe); delivery callbacks run on whichever thread calls qm_producer_poll(),
 * qm_producer_flush(), qm_producer_send_batch() or qm_producer_destroy().
 * A consumer belongs to one thread.
 */
#ifndef QM_KAFKA_H
#define QM_KAFKA_H

#include "qm_common.h"
#include "qm_event.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- producer */

typedef struct qm_producer qm_producer_t;

/* Called once per message accepted by qm_producer_send(), with err QM_OK when
 * the broker acknowledged it (acks=all) or a negative QM_E* code and a short
 * reason (valid during the call) when it was not delivered: QM_ETIMEOUT
 * (message.timeout.ms ran out), QM_EINVAL (rejected: too large, bad topic),
 * QM_EIO (anything else, including a fatal producer error). Never called for a
 * send that failed. */
typedef void (*qm_delivery_cb_t)(void *cb_ctx, void *msg_opaque, int err, const char *reason);

/* Creates a producer for brokers ("host:port,...") named client_id, with
 * enable.idempotence=true and acks=all (these two cannot be overridden),
 * linger.ms=2 and message.timeout.ms=30000 by default. props are n_props
 * extra librdkafka properties as "key=value" strings (may be NULL when
 * n_props is 0), applied after the defaults; message.timeout.ms must stay
 * between 1 and 300000 so every message gets its delivery report in bounded
 * time. cb (may be NULL) receives delivery reports of qm_producer_send(),
 * with cb_ctx (borrowed; must outlive the producer).
 * On success *out is set; caller frees with qm_producer_destroy().
 * QM_EINVAL names the bad property in errstr. */
int qm_producer_new(const char *brokers, const char *client_id, const char *const *props,
                    size_t n_props, qm_delivery_cb_t cb, void *cb_ctx, qm_producer_t **out,
                    char *errstr, size_t errstr_size);

/* Enqueues one event asynchronously: ev and everything it points to are
 * copied before return. msg_opaque is handed back to the delivery callback.
 * When the local queue is full, serves delivery reports and retries for up
 * to timeout_ms (QM_ETIMEOUT after that). QM_EINVAL for an event that cannot
 * be sent (no topic, meta id without source or type), QM_EIO (with the
 * reason) when the producer hit a fatal error: create a new one. */
int qm_producer_send(qm_producer_t *p, const qm_event_out_t *ev, void *msg_opaque,
                     int timeout_ms, char *errstr, size_t errstr_size);

/* Serves queued delivery reports (calls the delivery callback), waiting up
 * to timeout_ms for the first one. Returns how many events were served.
 * Call it regularly when using qm_producer_send(). */
int qm_producer_poll(qm_producer_t *p, int timeout_ms);

/* Waits up to timeout_ms until every enqueued message has its delivery
 * report (served to the callback). QM_OK, QM_ETIMEOUT, or QM_EIO when the
 * producer hit a fatal error. */
int qm_producer_flush(qm_producer_t *p, int timeout_ms);

/* Sends n events and waits for every delivery report, for up to timeout_ms
 * in all. results (n entries, caller's array) receives per event QM_OK when
 * the broker acknowledged it, or the reason it is not known to be delivered:
 * the delivery error (as for qm_delivery_cb_t), QM_ETIMEOUT when no report
 * arrived within timeout_ms (it may still be delivered later: resend, and
 * consumers drop the duplicate), the enqueue error of the first event that
 * could not be enqueued, and QM_ETRANSIENT for the events after it, which
 * are not attempted (keeping each key's events in order).
 * Returns QM_OK only when all n were delivered; otherwise the status of the
 * first event not delivered, with errstr saying how many failed and why.
 * The delivery callback is not called for these events. */
int qm_producer_send_batch(qm_producer_t *p, const qm_event_out_t *evs, size_t n,
                           int timeout_ms, int *results, char *errstr, size_t errstr_size);

/* True once librdkafka reported a fatal error for this producer (then every
 * send fails with QM_EIO: destroy it and create a new one); copies the
 * reason into errstr when errstr is not NULL. */
bool qm_producer_fatal(qm_producer_t *p, char *errstr, size_t errstr_size);

/* Readiness probe: a metadata request. QM_OK when a broker answered within
 * timeout_ms, QM_ETIMEOUT or QM_EIO otherwise. */
int qm_producer_ping(qm_producer_t *p, int timeout_ms);

/* Flushes for up to QM_PRODUCER_DESTROY_FLUSH_MS, purges what is left
 * (their delivery callbacks report QM_EIO "purged"), and frees p. NULL is
 * accepted. */
#define QM_PRODUCER_DESTROY_FLUSH_MS 10000
void qm_producer_destroy(qm_producer_t *p);

/* ---------------------------------------------------------------- consumer */

typedef struct qm_consumer qm_consumer_t;
typedef struct qm_kmsg qm_kmsg_t;

/* Creates a consumer in group_id subscribed to n_topics topics, with
 * enable.auto.offset.store=false, enable.auto.commit=true,
 * auto.offset.reset=earliest, enable.partition.eof=false and the default
 * (eager) assignment strategy; client.id defaults to group_id. props as for
 * qm_producer_new(); group.id, enable.auto.offset.store, enable.auto.commit
 * and enable.partition.eof cannot be overridden. Assignments and
 * revocations are logged. On success *out is set; caller frees with
 * qm_consumer_close() then qm_consumer_destroy(). */
int qm_consumer_new(const char *brokers, const char *group_id, const char *const *topics,
                    size_t n_topics, const char *const *props, size_t n_props,
                    qm_consumer_t **out, char *errstr, size_t errstr_size);

/* Collects up to max messages into msgs: waits up to max_wait_ms for the
 * first, then takes what is already there without waiting. *n is set to the
 * count (0 when nothing arrived). Each msgs[i] is owned by the caller, who
 * frees it with qm_kmsg_destroy() (before qm_consumer_destroy()).
 * Non-fatal consumer errors (a broker down, an unknown topic) are logged at
 * warn and skipped. Returns QM_OK, QM_EINVAL (max 0, NULL arguments),
 * QM_ESHUTDOWN after qm_consumer_close(), or QM_EIO on a fatal consumer
 * error (logged with its reason; *n then counts the messages already
 * collected, which the caller still owns). */
int qm_consumer_poll_batch(qm_consumer_t *c, qm_kmsg_t **msgs, size_t max, int max_wait_ms,
                           size_t *n);

/* The event view of m: topic, partition, offset, timestamp, key, payload,
 * every header, and the parsed CloudEvents meta (meta_valid is true only
 * when ce_specversion is "1.0" and ce_id, ce_source and ce_type are present
 * and ce_time, when present, is RFC 3339; otherwise meta_error says which
 * header is missing or bad, e.g. "missing header ce_id"). meta.time_ms is 0
 * without ce_time. Valid until qm_kmsg_destroy(m). */
const qm_event_in_t *qm_kmsg_event(const qm_kmsg_t *m);

/* Frees a message from qm_consumer_poll_batch(). NULL is accepted. */
void qm_kmsg_destroy(qm_kmsg_t *m);

/* Marks m as done: stores offset+1 for its partition, which auto commit
 * (and qm_consumer_close()) will commit. Call it only after the handler's
 * database transaction committed, in offset order within a partition (a
 * lower offset stored after a higher one can only cause redelivery, never
 * loss). QM_ECONFLICT when the partition is no
 * longer assigned to this consumer (a rebalance moved it: another member
 * will see the message again and drop it as a duplicate). */
int qm_consumer_store(qm_consumer_t *c, const qm_kmsg_t *m);

/* Leaves the group, committing the stored offsets first. Safe to call more
 * than once; polls afterwards return QM_ESHUTDOWN. QM_OK or QM_EIO. */
int qm_consumer_close(qm_consumer_t *c);

/* Readiness probe as for qm_producer_ping(). */
int qm_consumer_ping(qm_consumer_t *c, int timeout_ms);

/* Closes c if not yet closed and frees it. Every qm_kmsg_t polled from it
 * must have been destroyed. NULL is accepted. */
void qm_consumer_destroy(qm_consumer_t *c);

/* ---------------------------------------------------------- dead letters */

/* How many headers qm_dlq_build() adds to the original ones. */
#define QM_DLQ_N_HEADERS 7

/* The text a dead letter's headers point at. Caller-provided (stack is fine). */
typedef struct qm_dlq_buf {
  char topic[256];            /* "<topic>.dlq" */
  char id[QM_UUID_STR_LEN];   /* qm_dlq_id: the dead letter's own id, for dedupe */
  char error[512];            /* qm_dlq_error, truncated */
  char service[64];           /* qm_dlq_service */
  char partition[16];         /* qm_dlq_partition, decimal */
  char offset[24];            /* qm_dlq_offset, decimal */
  char time[40];              /* qm_dlq_time, RFC 3339 */
} qm_dlq_buf_t;

/* Builds in *out the dead letter of in: topic "<in->topic>.dlq", in's key
 * and payload, in's headers verbatim followed by qm_dlq_id (a new UUID, also
 * in buf->id), qm_dlq_error (error), qm_dlq_service (service), qm_dlq_topic,
 * qm_dlq_partition, qm_dlq_offset and qm_dlq_time (now). out->meta is zeroed
 * (empty id) so the producer writes no new ce_* headers: the original ones
 * travel in the copied headers.
 * storage (storage_cap entries, at least in->n_headers + QM_DLQ_N_HEADERS)
 * receives the header array. *out is valid until the first of: in's message
 * is destroyed, storage or buf goes away. QM_EINVAL when storage is too
 * small or the topic name too long (outputs then untouched). */
int qm_dlq_build(const qm_event_in_t *in, const char *service, const char *error,
                 qm_event_out_t *out, qm_header_t *storage, size_t storage_cap,
                 qm_dlq_buf_t *buf, char *errstr, size_t errstr_size);

/* ----------------------------------------------------------------- admin */

/* Creates the n named topics with the Admin API (partitions and replication
 * factor as given) and waits up to timeout_ms; a topic that already exists
 * counts as created, so start-up can call this every time. QM_OK, or
 * QM_EIO / QM_ETIMEOUT / QM_EINVAL with every failing topic in errstr. */
int qm_kafka_create_topics(const char *brokers, const char *const *names, size_t n,
                           int partitions, int replication, int timeout_ms, char *errstr,
                           size_t errstr_size);

#endif /* QM_KAFKA_H */
