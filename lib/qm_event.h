/*
 * qm_event: the shape of an event as it travels between services, independent
 * of Kafka and Postgres: the CloudEvents 1.0 attributes (binary mode: carried
 * as ce_* headers), the W3C traceparent, the key, the payload bytes and any
 * extra headers (the DLQ adds its error headers this way).
 *
 * Both qm_kafka (headers on the wire) and qm_outbox (columns in a table) speak
 * this type, so an event written to the outbox is published byte for byte.
 */
#ifndef QM_EVENT_H
#define QM_EVENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QM_CE_SPECVERSION "1.0"
#define QM_CONTENT_TYPE_PROTOBUF "application/protobuf"

/* CloudEvents attributes of one event. Fixed-size text fields: no ownership
 * questions, and every field has a bound that a producer must respect. */
typedef struct qm_event_meta {
  char id[40];           /* ce_id: a UUID (36 characters) */
  char source[64];       /* ce_source: "/qm/<service>" */
  char type[96];         /* ce_type: "qm.request.submitted.v1" */
  char subject[64];      /* ce_subject: the request id (or person id) */
  int64_t time_ms;       /* ce_time: unix milliseconds, sent as RFC 3339 */
  char content_type[48]; /* content-type header */
  char traceparent[64];  /* W3C traceparent (55 characters), "" when none */
} qm_event_meta_t;

/* One extra header (name and value bytes). Borrowed: valid while the struct
 * that holds it is. */
typedef struct qm_header {
  const char *name;
  const void *value;
  size_t value_len;
} qm_header_t;

/* An event to publish. Everything is borrowed for the duration of the call
 * that takes it; the callee copies what it keeps. */
typedef struct qm_event_out {
  const char *topic;
  const void *key; /* the subject person's id: orders one person's events */
  size_t key_len;
  qm_event_meta_t meta;
  const void *payload;
  size_t payload_len;
  const qm_header_t *headers; /* extra headers, e.g. qm_dlq_* on a dead letter */
  size_t n_headers;
} qm_event_out_t;

/* An event as consumed. Valid until the consumer's next poll or the end of
 * the handler call it is passed to. */
typedef struct qm_event_in {
  const char *topic;
  int32_t partition;
  int64_t offset;
  int64_t timestamp_ms; /* the Kafka message timestamp */
  const void *key;
  size_t key_len;
  qm_event_meta_t meta;
  bool meta_valid;     /* all required ce_* headers present and well-formed */
  char meta_error[160];/* when !meta_valid: which header is missing or bad */
  const void *payload;
  size_t payload_len;
  const qm_header_t *headers; /* every header as received (for DLQ copies) */
  size_t n_headers;
} qm_event_in_t;

/* Fills meta for a new event of this service: a fresh UUID, the time now,
 * source "/qm/<service>", content type protobuf, and a traceparent that is a
 * child of parent_traceparent (a new trace when NULL or invalid). type and
 * subject are copied (truncated to their bounds). */
void qm_event_meta_init(qm_event_meta_t *meta, const char *service, const char *type,
                        const char *subject, const char *parent_traceparent);

/* The value of the first header named name (case-sensitive) of ev, copied as
 * text into out (truncated, NUL-terminated). true when present. */
bool qm_event_header(const qm_event_in_t *ev, const char *name, char *out, size_t out_size);

/* True when topic names a dead-letter topic ("<topic>.dlq"). */
bool qm_event_topic_is_dlq(const char *topic);

/* W3C trace context. A traceparent is "00-<32 hex trace>-<16 hex span>-<2 hex flags>". */
bool qm_traceparent_valid(const char *tp);
/* A new traceparent: same trace id as parent (when valid), a new span id;
 * a new random trace when parent is NULL or invalid. out >= 56 bytes. */
void qm_traceparent_child(const char *parent, char *out, size_t out_size);
/* Copies the 32-hex trace id out of a traceparent (out >= 33), "" when invalid. */
void qm_traceparent_trace_id(const char *tp, char *out, size_t out_size);

#endif /* QM_EVENT_H */
