/*
 * chain: everything about the audit ledger that an auditor recomputes on
 * their own — the record hash, which chain an event goes to, and the bytes
 * a checkpoint signs — plus the Ed25519 keys that sign checkpoints. The
 * definitions here and in docs/audit.md must stay identical: the unit tests
 * (tests/unit/test_chain.c) pin them with known answers computed outside C.
 *
 * Record hash. A record's hash is
 *   SHA-256(prev_hash || canonical(record))
 * where canonical() is the concatenation, in this order, of each field as a
 * 4-byte big-endian length followed by its bytes: chain_id, sequence
 * (decimal), recorded_at_ms (decimal), topic, event_id, event_type,
 * event_source, subject, person_id, actor_id, request_id, event_time_ms
 * (decimal), dead_letter ("1" or "0"), event_bytes. The first record's
 * prev_hash is 32 zero bytes.
 *
 * Chain assignment. An event goes to chain "chain-<i>" with
 *   i = CRC-32(key) mod n_chains
 * where key is the Kafka key of the source event (the person id) and CRC-32
 * is the ISO-HDLC / zlib one (reflected polynomial 0xEDB88320, initial and
 * final XOR 0xFFFFFFFF). It is librdkafka's default ("consistent") key
 * partitioner, so with n_chains equal to the source topics' partition count
 * the events of source partition p all go to chain p and audit instances that
 * share the partitions never wait on each other's chain head. An empty key
 * goes to chain 0.
 *
 * Checkpoint. A checkpoint signs, with Ed25519 (RFC 8032, pure), the bytes
 *   F("qm-audit-checkpoint-v1") || F(chain_id) || F(sequence, decimal) ||
 *   F(head_hash, 32 raw bytes) || F(signed_at_ms, decimal)
 * with F(x) = 4-byte big-endian length || x, as in the record hash. Its key id
 * is the lower-case hex of the first 8 bytes of SHA-256(raw 32-byte public key).
 */
#ifndef QM_AUDIT_CHAIN_H
#define QM_AUDIT_CHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CHAIN_HASH_LEN 32
#define CHAIN_ID_MAX 32       /* "chain-<i>" and the NUL, with room to spare */
#define CHAIN_KEY_RAW_LEN 32  /* an Ed25519 public key or private seed */
#define CHAIN_SIG_LEN 64      /* an Ed25519 signature */
#define CHAIN_KEY_ID_LEN 17   /* 16 hex characters and the NUL */
#define CHAIN_CHECKPOINT_DOMAIN "qm-audit-checkpoint-v1"
#define CHAIN_SIG_ALGORITHM "ed25519"

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

/* Parses 64 hex digits into out. 0, or QM_EINVAL (out untouched). */
int chain_unhex(const char *hex, uint8_t out[CHAIN_HASH_LEN]);

/* ---- chain assignment ---------------------------------------------------- */

/* CRC-32 (zlib's) of n bytes of p. */
uint32_t chain_crc32(const void *p, size_t n);

/* The chain index of an event whose Kafka key is key (key_len bytes, may be
 * NULL when 0) among n_chains (>= 1): CRC-32(key) mod n_chains. */
int chain_pick(const void *key, size_t key_len, int n_chains);

/* The chain id of index i ("chain-<i>") into out (CHAIN_ID_MAX bytes). */
void chain_name(int i, char out[CHAIN_ID_MAX]);

/* ---- checkpoints ---------------------------------------------------------- */

/* A statement of a chain's head, and its signature once signed. */
typedef struct chain_checkpoint {
  const char *chain_id; /* borrowed */
  int64_t seq;
  uint8_t head_hash[CHAIN_HASH_LEN];
  int64_t signed_at_ms;
  char key_id[CHAIN_KEY_ID_LEN];   /* set by chain_checkpoint_sign() */
  uint8_t signature[CHAIN_SIG_LEN]; /* set by chain_checkpoint_sign() */
} chain_checkpoint_t;

/* Writes the canonical signed bytes of cp (defined above) into out when they
 * fit in cap bytes, and returns their length either way (call with cap 0 to
 * size a buffer). */
size_t chain_checkpoint_bytes(const chain_checkpoint_t *cp, uint8_t *out, size_t cap);

/* An Ed25519 key: a private key (signs and verifies) or a public key only
 * (verifies). Immutable once made, so it may be shared between threads. */
typedef struct chain_key chain_key_t;

/* A new random private key. Caller frees with chain_key_destroy(). QM_EIO
 * when OpenSSL cannot make one (errstr says why). */
int chain_key_generate(chain_key_t **out, char *errstr, size_t errstr_size);

/* The private key of a 32-byte RFC 8032 seed (test vectors, tools). */
int chain_key_from_seed(const uint8_t seed[CHAIN_KEY_RAW_LEN], chain_key_t **out, char *errstr,
                        size_t errstr_size);

/* A public-only key from its 32 raw bytes. */
int chain_key_from_public(const uint8_t pub[CHAIN_KEY_RAW_LEN], chain_key_t **out,
                          char *errstr, size_t errstr_size);

/* Reads a PEM file holding an Ed25519 private key (PKCS#8, "BEGIN PRIVATE
 * KEY") or public key ("BEGIN PUBLIC KEY"). QM_ENOTFOUND when the file
 * cannot be opened, QM_EINVAL when it holds no Ed25519 key. Caller frees
 * *out with chain_key_destroy(). */
int chain_key_load_pem(const char *path, chain_key_t **out, char *errstr, size_t errstr_size);

/* Writes the private key as PKCS#8 PEM to a new file path, mode 0600; an
 * existing file is never overwritten (QM_EDUP). QM_EINVAL for a public-only
 * key, QM_EIO when the file cannot be written. */
int chain_key_write_pem(const chain_key_t *k, const char *path, char *errstr,
                        size_t errstr_size);

/* The public key as PEM ("BEGIN PUBLIC KEY"). Caller frees with free(). */
char *chain_key_public_pem(const chain_key_t *k);

/* The raw 32-byte public key, and its key id (defined above). */
void chain_key_public_raw(const chain_key_t *k, uint8_t out[CHAIN_KEY_RAW_LEN]);
void chain_key_id(const chain_key_t *k, char out[CHAIN_KEY_ID_LEN]);
bool chain_key_is_private(const chain_key_t *k);

/* Frees k. NULL is a no-op. */
void chain_key_destroy(chain_key_t *k);

/* Signs cp's canonical bytes with k (a private key): sets cp->signature and
 * cp->key_id. QM_EINVAL for a public-only key, QM_EIO when signing fails. */
int chain_checkpoint_sign(const chain_key_t *k, chain_checkpoint_t *cp, char *errstr,
                          size_t errstr_size);

/* True when cp->signature is k's valid signature of cp's canonical bytes
 * (cp->key_id is not consulted: compare it with chain_key_id() first to pick
 * the key). */
bool chain_checkpoint_verify(const chain_key_t *k, const chain_checkpoint_t *cp);

#endif
