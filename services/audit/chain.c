/*
 * chain: the audit ledger's recomputable definitions — SHA-256 record hash,
 * chain assignment by CRC-32 of the key, checkpoint bytes — and Ed25519
 * checkpoint keys over OpenSSL's EVP interface (definitions in chain.h).
 * Nothing here touches a database or Kafka, so the unit tests pin it alone.
 */
#include "chain.h"

#include "qm_common.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct chain_key {
  EVP_PKEY *pkey;
  bool priv;
  uint8_t pub[CHAIN_KEY_RAW_LEN];
  char id[CHAIN_KEY_ID_LEN];
};

/* ------------------------------------------------------------ record hash */

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
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < CHAIN_HASH_LEN; i++) {
    out[2 * i] = digits[h[i] >> 4];
    out[2 * i + 1] = digits[h[i] & 15];
  }
  out[2 * CHAIN_HASH_LEN] = '\0';
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int chain_unhex(const char *hex, uint8_t out[CHAIN_HASH_LEN]) {
  uint8_t tmp[CHAIN_HASH_LEN];
  if (!hex || strlen(hex) != 2 * CHAIN_HASH_LEN) return QM_EINVAL;
  for (size_t i = 0; i < CHAIN_HASH_LEN; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return QM_EINVAL;
    tmp[i] = (uint8_t)(hi << 4 | lo);
  }
  memcpy(out, tmp, CHAIN_HASH_LEN);
  return QM_OK;
}

/* ------------------------------------------------------------ assignment */

uint32_t chain_crc32(const void *p, size_t n) {
  const uint8_t *b = p;
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) {
    crc ^= b[i];
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return crc ^ 0xFFFFFFFFu;
}

int chain_pick(const void *key, size_t key_len, int n_chains) {
  if (n_chains <= 1 || key_len == 0) return 0;
  return (int)(chain_crc32(key, key_len) % (uint32_t)n_chains);
}

void chain_name(int i, char out[CHAIN_ID_MAX]) { snprintf(out, CHAIN_ID_MAX, "chain-%d", i); }

/* ------------------------------------------------------------ checkpoints */

/* Appends F(x) to out when it fits; returns the new length either way. */
static size_t put_field(uint8_t *out, size_t cap, size_t at, const void *p, size_t n) {
  if (at + 4 + n <= cap) {
    out[at] = (uint8_t)(n >> 24);
    out[at + 1] = (uint8_t)(n >> 16);
    out[at + 2] = (uint8_t)(n >> 8);
    out[at + 3] = (uint8_t)n;
    if (n) memcpy(out + at + 4, p, n);
  }
  return at + 4 + n;
}

size_t chain_checkpoint_bytes(const chain_checkpoint_t *cp, uint8_t *out, size_t cap) {
  char seq[32], at[32];
  int nseq = snprintf(seq, sizeof(seq), "%lld", (long long)cp->seq);
  int nat = snprintf(at, sizeof(at), "%lld", (long long)cp->signed_at_ms);
  const char *id = cp->chain_id ? cp->chain_id : "";
  size_t len = 0;
  len = put_field(out, cap, len, CHAIN_CHECKPOINT_DOMAIN, strlen(CHAIN_CHECKPOINT_DOMAIN));
  len = put_field(out, cap, len, id, strlen(id));
  len = put_field(out, cap, len, seq, (size_t)nseq);
  len = put_field(out, cap, len, cp->head_hash, CHAIN_HASH_LEN);
  len = put_field(out, cap, len, at, (size_t)nat);
  return len;
}

/* Wraps pkey (taking ownership) with its raw public key and id. */
static int key_wrap(EVP_PKEY *pkey, bool priv, chain_key_t **out, char *errstr,
                    size_t errstr_size) {
  if (EVP_PKEY_get_id(pkey) != EVP_PKEY_ED25519) {
    EVP_PKEY_free(pkey);
    return qm_err(errstr, errstr_size, QM_EINVAL, "not an Ed25519 key");
  }
  chain_key_t *k = qm_calloc(1, sizeof(*k));
  size_t len = sizeof(k->pub);
  if (EVP_PKEY_get_raw_public_key(pkey, k->pub, &len) != 1 || len != CHAIN_KEY_RAW_LEN) {
    EVP_PKEY_free(pkey);
    free(k);
    return qm_err(errstr, errstr_size, QM_EINVAL, "cannot read the Ed25519 public key");
  }
  k->pkey = pkey;
  k->priv = priv;
  uint8_t digest[32];
  unsigned int dn = 0;
  EVP_Digest(k->pub, CHAIN_KEY_RAW_LEN, digest, &dn, EVP_sha256(), NULL);
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < 8; i++) {
    k->id[2 * i] = digits[digest[i] >> 4];
    k->id[2 * i + 1] = digits[digest[i] & 15];
  }
  k->id[16] = '\0';
  *out = k;
  return QM_OK;
}

/* The last OpenSSL error as text (empty when none), clearing the queue. */
static const char *ossl_reason(char *buf, size_t cap) {
  unsigned long e = ERR_get_error();
  buf[0] = '\0';
  if (e) ERR_error_string_n(e, buf, cap);
  ERR_clear_error();
  return buf;
}

int chain_key_generate(chain_key_t **out, char *errstr, size_t errstr_size) {
  EVP_PKEY *pkey = NULL;
  EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
  int ok = ctx && EVP_PKEY_keygen_init(ctx) == 1 && EVP_PKEY_keygen(ctx, &pkey) == 1;
  EVP_PKEY_CTX_free(ctx);
  if (!ok) {
    char why[256];
    EVP_PKEY_free(pkey);
    return qm_err(errstr, errstr_size, QM_EIO, "Ed25519 key generation failed: %s",
                  ossl_reason(why, sizeof(why)));
  }
  return key_wrap(pkey, true, out, errstr, errstr_size);
}

int chain_key_from_seed(const uint8_t seed[CHAIN_KEY_RAW_LEN], chain_key_t **out, char *errstr,
                        size_t errstr_size) {
  EVP_PKEY *pkey = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, CHAIN_KEY_RAW_LEN);
  if (!pkey) {
    char why[256];
    return qm_err(errstr, errstr_size, QM_EINVAL, "bad Ed25519 seed: %s",
                  ossl_reason(why, sizeof(why)));
  }
  return key_wrap(pkey, true, out, errstr, errstr_size);
}

int chain_key_from_public(const uint8_t pub[CHAIN_KEY_RAW_LEN], chain_key_t **out,
                          char *errstr, size_t errstr_size) {
  EVP_PKEY *pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, CHAIN_KEY_RAW_LEN);
  if (!pkey) {
    char why[256];
    return qm_err(errstr, errstr_size, QM_EINVAL, "bad Ed25519 public key: %s",
                  ossl_reason(why, sizeof(why)));
  }
  return key_wrap(pkey, false, out, errstr, errstr_size);
}

int chain_key_load_pem(const char *path, chain_key_t **out, char *errstr, size_t errstr_size) {
  int rc;
  BIO *bio = BIO_new_file(path, "r");
  if (!bio) {
    ERR_clear_error();
    return qm_err(errstr, errstr_size, QM_ENOTFOUND, "cannot open %s: %s", path, strerror(errno));
  }
  bool priv = true;
  EVP_PKEY *pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
  if (!pkey) {
    ERR_clear_error();
    priv = false;
    BIO_reset(bio);
    pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
  }
  BIO_free(bio);
  if (!pkey) {
    char why[256];
    rc = qm_err(errstr, errstr_size, QM_EINVAL,
                "%s holds no PEM private or public key (%s); make one with `qm-audit keygen`",
                path, ossl_reason(why, sizeof(why)));
    goto out;
  }
  rc = key_wrap(pkey, priv, out, errstr, errstr_size);
  if (rc != QM_OK) {
    char inner[256];
    qm_strlcpy(inner, errstr ? errstr : "", sizeof(inner));
    qm_err(errstr, errstr_size, rc, "%s: %s", path, inner);
  }
out:
  return rc;
}

int chain_key_write_pem(const chain_key_t *k, const char *path, char *errstr,
                        size_t errstr_size) {
  if (!k->priv) return qm_err(errstr, errstr_size, QM_EINVAL, "a public key cannot be written as private");
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    int e = errno;
    return qm_err(errstr, errstr_size, e == EEXIST ? QM_EDUP : QM_EIO, "cannot create %s: %s%s",
                  path, strerror(e), e == EEXIST ? " (an existing key is never overwritten)" : "");
  }
  FILE *f = fdopen(fd, "w");
  if (!f) {
    close(fd);
    return qm_err(errstr, errstr_size, QM_EIO, "cannot write %s: %s", path, strerror(errno));
  }
  int ok = PEM_write_PrivateKey(f, k->pkey, NULL, NULL, 0, NULL, NULL) == 1;
  ok = (fclose(f) == 0) && ok;
  if (!ok) {
    char why[256];
    unlink(path);
    return qm_err(errstr, errstr_size, QM_EIO, "writing %s failed: %s", path,
                  ossl_reason(why, sizeof(why)));
  }
  return QM_OK;
}

char *chain_key_public_pem(const chain_key_t *k) {
  BIO *bio = BIO_new(BIO_s_mem());
  char *pem = NULL;
  if (bio && PEM_write_bio_PUBKEY(bio, k->pkey) == 1) {
    char *data = NULL;
    long n = BIO_get_mem_data(bio, &data);
    if (n > 0) pem = qm_strndup(data, (size_t)n);
  }
  BIO_free(bio);
  return pem ? pem : qm_strdup("");
}

void chain_key_public_raw(const chain_key_t *k, uint8_t out[CHAIN_KEY_RAW_LEN]) {
  memcpy(out, k->pub, CHAIN_KEY_RAW_LEN);
}

void chain_key_id(const chain_key_t *k, char out[CHAIN_KEY_ID_LEN]) {
  memcpy(out, k->id, CHAIN_KEY_ID_LEN);
}

bool chain_key_is_private(const chain_key_t *k) { return k->priv; }

void chain_key_destroy(chain_key_t *k) {
  if (!k) return;
  EVP_PKEY_free(k->pkey);
  free(k);
}

int chain_checkpoint_sign(const chain_key_t *k, chain_checkpoint_t *cp, char *errstr,
                          size_t errstr_size) {
  if (!k->priv) return qm_err(errstr, errstr_size, QM_EINVAL, "a public key cannot sign");
  uint8_t tbs[256];
  size_t n = chain_checkpoint_bytes(cp, tbs, sizeof(tbs));
  if (n > sizeof(tbs)) return qm_err(errstr, errstr_size, QM_EINVAL, "chain id too long");
  uint8_t sig[CHAIN_SIG_LEN];
  size_t siglen = sizeof(sig);
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  int ok = md && EVP_DigestSignInit(md, NULL, NULL, NULL, k->pkey) == 1 &&
           EVP_DigestSign(md, sig, &siglen, tbs, n) == 1 && siglen == CHAIN_SIG_LEN;
  EVP_MD_CTX_free(md);
  if (!ok) {
    char why[256];
    return qm_err(errstr, errstr_size, QM_EIO, "Ed25519 signing failed: %s",
                  ossl_reason(why, sizeof(why)));
  }
  memcpy(cp->signature, sig, CHAIN_SIG_LEN);
  memcpy(cp->key_id, k->id, CHAIN_KEY_ID_LEN);
  return QM_OK;
}

bool chain_checkpoint_verify(const chain_key_t *k, const chain_checkpoint_t *cp) {
  uint8_t tbs[256];
  size_t n = chain_checkpoint_bytes(cp, tbs, sizeof(tbs));
  if (n > sizeof(tbs)) return false;
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  bool ok = md && EVP_DigestVerifyInit(md, NULL, NULL, NULL, k->pkey) == 1 &&
            EVP_DigestVerify(md, cp->signature, CHAIN_SIG_LEN, tbs, n) == 1;
  EVP_MD_CTX_free(md);
  ERR_clear_error();
  return ok;
}
