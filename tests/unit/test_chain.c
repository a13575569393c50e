/* Unit tests for the audit chain's definitions: record hashes, chain
 * assignment and signed checkpoints, with known answers computed
 * independently (Python hashlib, zlib and `cryptography` over the definitions
 * in docs/audit.md), so the C code and the published definitions cannot
 * drift apart unnoticed. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain.h"
#include "qm_common.h"

static const uint8_t event[] = {0x0a, 0x03, 'a', 'b', 'c', 0x00, 0xff};

static chain_record_t record(int64_t seq, bool dead_letter) {
  chain_record_t r = {
      .chain_id = "chain-0",
      .seq = seq,
      .recorded_at_ms = 1795919400123LL,
      .topic = "qm.requests.v1",
      .event_id = "73c3490a-1c0f-4ee6-a312-0a373a5cb345",
      .event_type = "qm.request.submitted.v1",
      .event_source = "/qm/intake",
      .subject = "5f635925-f683-423d-a46b-86d0e0093816",
      .person_id = "p-0100",
      .actor_id = "",
      .request_id = "5f635925-f683-423d-a46b-86d0e0093816",
      .event_time_ms = 1795919400100LL,
      .dead_letter = dead_letter,
      .event_bytes = event,
      .event_len = sizeof(event),
  };
  return r;
}

Test(chain, known_answers) {
  uint8_t zero[CHAIN_HASH_LEN] = {0}, h1[CHAIN_HASH_LEN], h2[CHAIN_HASH_LEN];
  char hex[65];
  chain_record_t r1 = record(1, false);
  chain_hash(zero, &r1, h1);
  chain_hex(h1, hex);
  cr_assert_str_eq(hex, "e62e2fcdefec2f20745e34e601679f5d13d9a6708b84ab4ac0c8b76cde4c191b");
  chain_record_t r2 = record(2, true);
  chain_hash(h1, &r2, h2);
  chain_hex(h2, hex);
  cr_assert_str_eq(hex, "67745f1519093ec4db0eb658bac3a2575f12cad35f2b12bc513d25fd67251d84");
}

Test(chain, every_field_and_the_previous_hash_count) {
  uint8_t zero[CHAIN_HASH_LEN] = {0}, base[CHAIN_HASH_LEN], h[CHAIN_HASH_LEN];
  chain_record_t r = record(1, false);
  chain_hash(zero, &r, base);
  chain_record_t v;
  v = r; v.seq = 2; chain_hash(zero, &v, h); cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
  v = r; v.person_id = "p-0101"; chain_hash(zero, &v, h); cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
  v = r; v.event_len = sizeof(event) - 1; chain_hash(zero, &v, h); cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
  v = r; v.dead_letter = true; chain_hash(zero, &v, h); cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
  /* Length prefixes: moving a character between adjacent fields changes the hash. */
  v = r; v.topic = "qm.requests.v"; v.event_id = "173c3490a-1c0f-4ee6-a312-0a373a5cb345";
  chain_hash(zero, &v, h);
  cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
  uint8_t other_prev[CHAIN_HASH_LEN] = {1};
  chain_hash(other_prev, &r, h);
  cr_assert_neq(memcmp(h, base, CHAIN_HASH_LEN), 0);
}

/* ---- chain assignment ------------------------------------------------------
 * Known answers from Python's zlib.crc32 (the CRC-32 librdkafka's default
 * partitioner uses), so a chain keeps its people across releases. */

Test(chain, crc32_known_answers) {
  cr_assert_eq(chain_crc32("123456789", 9), 0xcbf43926u); /* the CRC-32 check value */
  cr_assert_eq(chain_crc32("p-0100", 6), 0xafac368eu);
  cr_assert_eq(chain_crc32("p-0002", 6), 0x40603d95u);
  cr_assert_eq(chain_crc32("", 0), 0u);
}

Test(chain, assignment_is_stable_and_bounded) {
  cr_assert_eq(chain_pick("p-0100", 6, 3), 0);
  cr_assert_eq(chain_pick("p-0002", 6, 3), 1);
  cr_assert_eq(chain_pick("123456789", 9, 3), 2);
  cr_assert_eq(chain_pick("", 0, 3), 0, "an empty key goes to chain 0");
  cr_assert_eq(chain_pick(NULL, 0, 3), 0);
  cr_assert_eq(chain_pick("p-0100", 6, 1), 0, "one chain takes everything");
  /* Same key, same chain, every time; every chain gets some of 300 people. */
  int seen[5] = {0};
  for (int i = 1; i <= 300; i++) {
    char key[16];
    int n = snprintf(key, sizeof(key), "p-%04d", i);
    int c = chain_pick(key, (size_t)n, 5);
    cr_assert(c >= 0 && c < 5);
    cr_assert_eq(chain_pick(key, (size_t)n, 5), c);
    seen[c]++;
  }
  for (int c = 0; c < 5; c++) cr_assert_gt(seen[c], 30, "chain %d got only %d of 300", c, seen[c]);
  char name[CHAIN_ID_MAX];
  chain_name(2, name);
  cr_assert_str_eq(name, "chain-2");
}

/* ---- checkpoints -----------------------------------------------------------
 * RFC 8032 test 1 key; expected bytes and signatures from Python's
 * `cryptography` package over the definition in docs/audit.md. */

static const uint8_t rfc8032_seed[32] = {
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60};

static void hex_of(const uint8_t *p, size_t n, char *out) {
  for (size_t i = 0; i < n; i++) snprintf(out + 2 * i, 3, "%02x", p[i]);
}

static chain_checkpoint_t sample_checkpoint(void) {
  chain_checkpoint_t cp = {.chain_id = "chain-1", .seq = 42, .signed_at_ms = 1795919400123LL};
  for (int i = 0; i < 32; i++) cp.head_hash[i] = (uint8_t)i;
  return cp;
}

Test(chain, checkpoint_bytes_known_answer) {
  chain_checkpoint_t cp = sample_checkpoint();
  uint8_t buf[256];
  size_t n = chain_checkpoint_bytes(&cp, buf, sizeof(buf));
  cr_assert_eq(chain_checkpoint_bytes(&cp, NULL, 0), n, "sizing call must agree");
  char hex[600];
  hex_of(buf, n, hex);
  cr_assert_str_eq(hex,
                   "00000016716d2d61756469742d636865636b706f696e742d763100000007636861696e2d3100"
                   "000002343200000020000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c"
                   "1d1e1f0000000d31373935393139343030313233");
}

Test(chain, checkpoint_signature_known_answer) {
  chain_key_t *k = NULL;
  char err[256];
  cr_assert_eq(chain_key_from_seed(rfc8032_seed, &k, err, sizeof(err)), 0, "%s", err);
  uint8_t pub[32];
  char hex[200], id[CHAIN_KEY_ID_LEN];
  chain_key_public_raw(k, pub);
  hex_of(pub, 32, hex);
  cr_assert_str_eq(hex, "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  chain_key_id(k, id);
  cr_assert_str_eq(id, "21fe31dfa154a261");
  cr_assert(chain_key_is_private(k));

  chain_checkpoint_t cp = sample_checkpoint();
  cr_assert_eq(chain_checkpoint_sign(k, &cp, err, sizeof(err)), 0, "%s", err);
  hex_of(cp.signature, 64, hex);
  cr_assert_str_eq(hex, "6610c4f87767e30d6ceead0dbecd0b224bb78823f0f40e8df9f3bc348b457d81"
                        "5ce5793dbfa9a03341f39e4c6adf235917424c51a61b0fc13815e81fe3aeaf08");
  cr_assert_str_eq(cp.key_id, "21fe31dfa154a261");
  cr_assert(chain_checkpoint_verify(k, &cp));
  chain_key_destroy(k);
}

Test(chain, checkpoint_verification_refuses_any_change) {
  chain_key_t *k = NULL, *pubk = NULL, *other = NULL;
  char err[256];
  cr_assert_eq(chain_key_from_seed(rfc8032_seed, &k, err, sizeof(err)), 0, "%s", err);
  uint8_t pub[32];
  chain_key_public_raw(k, pub);
  cr_assert_eq(chain_key_from_public(pub, &pubk, err, sizeof(err)), 0, "%s", err);
  cr_assert_not(chain_key_is_private(pubk));
  cr_assert_eq(chain_key_generate(&other, err, sizeof(err)), 0, "%s", err);

  chain_checkpoint_t cp = sample_checkpoint();
  cr_assert_eq(chain_checkpoint_sign(k, &cp, err, sizeof(err)), 0, "%s", err);
  cr_assert(chain_checkpoint_verify(pubk, &cp), "the public key alone verifies");
  cr_assert_not(chain_checkpoint_verify(other, &cp), "another key does not");
  chain_checkpoint_t v;
  v = cp; v.seq = 41; cr_assert_not(chain_checkpoint_verify(pubk, &v), "sequence is signed");
  v = cp; v.head_hash[31] ^= 1; cr_assert_not(chain_checkpoint_verify(pubk, &v), "head is signed");
  v = cp; v.signed_at_ms++; cr_assert_not(chain_checkpoint_verify(pubk, &v), "time is signed");
  v = cp; v.chain_id = "chain-2"; cr_assert_not(chain_checkpoint_verify(pubk, &v), "chain is signed");
  v = cp; v.signature[0] ^= 0x80; cr_assert_not(chain_checkpoint_verify(pubk, &v));
  cr_assert_neq(chain_checkpoint_sign(pubk, &v, err, sizeof(err)), 0, "a public key cannot sign");
  chain_key_destroy(other);
  chain_key_destroy(pubk);
  chain_key_destroy(k);
}

Test(chain, pem_round_trip_and_no_overwrite) {
  char dir[] = "/tmp/qm-chain-test-XXXXXX";
  cr_assert_not_null(mkdtemp(dir));
  char path[128], err[512];
  snprintf(path, sizeof(path), "%s/key.pem", dir);
  chain_key_t *k = NULL, *back = NULL, *again = NULL;
  cr_assert_eq(chain_key_generate(&k, err, sizeof(err)), 0, "%s", err);
  cr_assert_eq(chain_key_write_pem(k, path, err, sizeof(err)), 0, "%s", err);
  struct stat sb;
  cr_assert_eq(stat(path, &sb), 0);
  cr_assert_eq(sb.st_mode & 0777, 0600, "the private key file must be private");
  cr_assert_eq(chain_key_write_pem(k, path, err, sizeof(err)), QM_EDUP, "never overwrite: %s", err);
  cr_assert_eq(chain_key_load_pem(path, &back, err, sizeof(err)), 0, "%s", err);
  cr_assert(chain_key_is_private(back));
  char id1[CHAIN_KEY_ID_LEN], id2[CHAIN_KEY_ID_LEN];
  chain_key_id(k, id1);
  chain_key_id(back, id2);
  cr_assert_str_eq(id1, id2);

  /* The public PEM loads as a verify-only key with the same id. */
  char *pem = chain_key_public_pem(k);
  cr_assert(strstr(pem, "BEGIN PUBLIC KEY") != NULL, "%s", pem);
  char pub_path[128];
  snprintf(pub_path, sizeof(pub_path), "%s/pub.pem", dir);
  FILE *f = fopen(pub_path, "w");
  fputs(pem, f);
  fclose(f);
  cr_assert_eq(chain_key_load_pem(pub_path, &again, err, sizeof(err)), 0, "%s", err);
  cr_assert_not(chain_key_is_private(again));
  chain_key_id(again, id2);
  cr_assert_str_eq(id1, id2);
  chain_checkpoint_t cp = sample_checkpoint();
  cr_assert_eq(chain_checkpoint_sign(back, &cp, err, sizeof(err)), 0, "%s", err);
  cr_assert(chain_checkpoint_verify(again, &cp));

  /* Not a key: a clear error. */
  chain_key_t *none = NULL;
  cr_assert_eq(chain_key_load_pem("/nonexistent/key.pem", &none, err, sizeof(err)), QM_ENOTFOUND);
  f = fopen(pub_path, "w");
  fputs("hello\n", f);
  fclose(f);
  cr_assert_eq(chain_key_load_pem(pub_path, &none, err, sizeof(err)), QM_EINVAL);
  cr_assert_null(none);

  free(pem);
  chain_key_destroy(again);
  chain_key_destroy(back);
  chain_key_destroy(k);
  unlink(path);
  unlink(pub_path);
  rmdir(dir);
}

Test(chain, hex_round_trip) {
  uint8_t h[CHAIN_HASH_LEN], back[CHAIN_HASH_LEN];
  for (int i = 0; i < CHAIN_HASH_LEN; i++) h[i] = (uint8_t)(i * 7 + 3);
  char hex[65];
  chain_hex(h, hex);
  cr_assert_eq(chain_unhex(hex, back), 0);
  cr_assert_eq(memcmp(h, back, CHAIN_HASH_LEN), 0);
  cr_assert_neq(chain_unhex("abc", back), 0);
  hex[5] = 'g';
  cr_assert_neq(chain_unhex(hex, back), 0);
}
