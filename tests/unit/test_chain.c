/* Unit tests for the audit hash chain: known answers computed independently
 * (Python hashlib over the definition in docs/audit.md), so the C code and
 * the published definition cannot drift apart unnoticed. */
#include <criterion/criterion.h>
#include <string.h>

#include "chain.h"

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
