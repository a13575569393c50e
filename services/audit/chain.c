/* chain: SHA-256 hash chain of the audit ledger (definition in chain.h). */
#include "chain.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

static void put(EVP_MD_CTX *md, const void *p, size_t n) {
  uint8_t len[4] = {(uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8), (uint8_t)n};
  EVP_DigestUpdate(md, len, 4);
  if (n) EVP_DigestUpdate(md, p, n);
}

static void put_str(EVP_MD_CTX *md, const char *s) { put(md, s ? s : "", s ? strlen(s) : 0); }

static void put_int(EVP_MD_CTX *md, int64_t v) {
  char buf[32];
  int n = snprintf(buf, sizeof(buf), "%lld", (long long)v);
  put(md, buf, (size_t)n);
}

void chain_hash(const uint8_t prev[CHAIN_HASH_LEN], const chain_record_t *r,
                uint8_t out[CHAIN_HASH_LEN]) {
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  EVP_DigestInit_ex(md, EVP_sha256(), NULL);
  EVP_DigestUpdate(md, prev, CHAIN_HASH_LEN);
  put_str(md, r->chain_id);
  put_int(md, r->seq);
  put_int(md, r->recorded_at_ms);
  put_str(md, r->topic);
  put_str(md, r->event_id);
  put_str(md, r->event_type);
  put_str(md, r->event_source);
  put_str(md, r->subject);
  put_str(md, r->person_id);
  put_str(md, r->actor_id);
  put_str(md, r->request_id);
  put_int(md, r->event_time_ms);
  put_str(md, r->dead_letter ? "1" : "0");
  put(md, r->event_bytes, r->event_len);
  unsigned int n = 0;
  EVP_DigestFinal_ex(md, out, &n);
  EVP_MD_CTX_free(md);
}

void chain_hex(const uint8_t h[CHAIN_HASH_LEN], char *out) {
  for (size_t i = 0; i < CHAIN_HASH_LEN; i++) snprintf(out + 2 * i, 3, "%02x", h[i]);
}
