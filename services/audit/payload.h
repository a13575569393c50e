/*
 * payload: what audit reads inside the events it records — the payload
 * decoded by topic, rendered as JSON (protobuf-c reflection, the proto3 JSON
 * mapping with .proto field names), the actor an event names, and the facts
 * the reports are built from.
 *
 * Facts are a projection of the ledger, never a source of truth: one row per
 * (record, fact kind, line) in `ledger_facts`, written in the transaction that
 * appends the record and rebuildable at any time from the ledger alone
 * (`qm-audit reindex`), so every report can be rebuilt from the hash-chained
 * records. See docs/audit.md for the kinds.
 */
#ifndef QM_AUDIT_PAYLOAD_H
#define QM_AUDIT_PAYLOAD_H

#include "qm_pg.h"

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One recorded event's payload, decoded. */
typedef struct audit_payload {
  const char *topic; /* the base topic ("qm.requests.v1"), "" when unknown */
  bool dead_letter;  /* from a .dlq topic */
  /* The decoded message (RequestEvent, DecisionEvent, AccessEvent,
   * FulfillmentEvent or HrEvent); NULL when the topic is unknown or the bytes
   * do not decode (dead letters often do not). Owned. */
  ProtobufCMessage *msg;
} audit_payload_t;

/* Decodes bytes recorded from topic (a full name: prefix and ".dlq" are
 * allowed). Never fails: an unknown topic or undecodable bytes leave msg
 * NULL. Caller clears with audit_payload_clear(). */
void audit_payload_decode(const char *topic, const uint8_t *bytes, size_t len,
                          audit_payload_t *out);
void audit_payload_clear(audit_payload_t *p);

/* The message as JSON (proto3 mapping: default values omitted, enums by
 * name, int64 as numbers, bytes in base64, .proto field names). NULL msg
 * gives NULL. Caller frees with json_decref(). */
json_t *audit_pb_json(const ProtobufCMessage *msg);

/* The person id of whoever acted in the event ("" when it names nobody or
 * only a service): the requester of a submission, who cancelled, decided,
 * rejected or revoked, who scanned an asset. Points into p. */
const char *audit_payload_actor(const audit_payload_t *p);

/* One fact for the reports. Strings are never NULL. */
typedef struct audit_fact {
  const char *kind;       /* "submitted", "approved", "rejected", "granted", … */
  int line_no;            /* request line, 0 when none */
  int64_t at_ms;          /* when it happened (the event's business time) */
  const char *request_id;
  const char *person_id;  /* the subject */
  const char *actor_id;
  const char *item_id;
  const char *department; /* the subject's, where the event says */
  const char *reason;     /* origin, rejection reason, revocation reason, … */
  const char *object_id;  /* grant id or asset tag */
  bool flag;              /* break-glass (approved), automatic (revoked), extension (granted) */
} audit_fact_t;

typedef int (*audit_fact_fn)(void *ctx, const audit_fact_t *f);

/* Calls fn for every fact of p (none for most kinds). request_id and
 * event_time_ms are the record's; fn's non-zero return stops and is
 * returned. */
int audit_payload_facts(const audit_payload_t *p, const char *request_id, int64_t event_time_ms,
                        audit_fact_fn fn, void *ctx);

/* Writes the facts of record (chain_id, seq) into ledger_facts on tx (in the
 * caller's transaction); a fact already there is left alone. */
int audit_facts_insert(qm_pg_t *tx, const char *chain_id, int64_t seq, const audit_payload_t *p,
                       const char *request_id, int64_t event_time_ms, char *errstr,
                       size_t errstr_size);

/* `qm-audit reindex`: rebuilds ledger_facts from the ledger (payload.c). */
int audit_reindex_main(int argc, char **argv);

#endif
