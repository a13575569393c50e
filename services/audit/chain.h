/*
 * chain: the audit ledger's hash chain. A record's hash is
 *   SHA-256(prev_hash || canonical(record))
 * where canonical() is the concatenation, in this order, of each field as a
 * 4-byte big-endian length followed by its bytes: chain_id, sequence
 * (decimal), recorded_at_ms (decimal), topic, event_id, event_type,
 * event_source, subject, person_id, actor_id, request_id, event_time_ms
 * (decimal), dead_letter ("1" or "0"), event_bytes. The first record's
 * prev_hash is 32 zero bytes. Anyone can recompute it from an export or
 * from qm.audit.v1 alone (docs/audit.md gives the same definition).
 */
#ifndef QM_AUDIT_CHAIN_H
#define QM_AUDIT_CHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CHAIN_HASH_LEN 32

typedef struct chain_record {
  const char *chain_id;
  int64_t seq;
  int64_t recorded_at_ms;
  const char *topic, *event_id, *event_type, *event_source, *subject, *person_id, *actor_id,
      *request_id;
  int64_t event_time_ms;
  bool dead_letter;
  const uint8_t *event_bytes;
  size_t event_len;
} chain_record_t;

/* Computes the record's hash from prev (CHAIN_HASH_LEN bytes) into out. */
void chain_hash(const uint8_t prev[CHAIN_HASH_LEN], const chain_record_t *r,
                uint8_t out[CHAIN_HASH_LEN]);

/* Lower-case hex of a hash into out (at least 65 bytes). */
void chain_hex(const uint8_t h[CHAIN_HASH_LEN], char *out);

#endif
