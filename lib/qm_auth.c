/*
 * qm_auth: bearer JWT verification on libjwt 1.10, RSA keys from a JWKS file
 * built with OpenSSL 3.
 *
 * libjwt's jwt_decode() takes the algorithm from the token's own header and
 * uses whatever key it is given with it, so on its own it is open to the
 * algorithm confusion attack (an RS256 verifier handed the RSA public key PEM
 * would accept an HS256 token whose HMAC secret is that PEM) and accepts
 * unsigned ("none") tokens when no key is given. We therefore split and decode
 * the token ourselves first, insist that the header's alg is exactly the
 * configured one and pick the key, and only then let libjwt check the
 * signature; afterwards jwt_get_alg() must still agree. The claims are checked
 * on our own parse of the payload segment libjwt has just verified.
 *
 * Keys: a JWKS is turned into one PEM (SubjectPublicKeyInfo) per usable RSA
 * key, because that is what libjwt 1.10 reads (PEM_read_bio_PUBKEY). The key
 * set is immutable once built; reload builds a new one and swaps the pointer
 * under a write lock, verification holds the read lock while it uses a key.
 */
#include "qm_auth.h"

#include "qm_common.h"

#include <errno.h>
#include <jansson.h>
#include <jwt.h>
#include <math.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QM_AUTH_MAX_TOKEN 16384        /* bytes; real tokens are well under 4 KiB */
#define QM_AUTH_MAX_JWKS (1024 * 1024) /* bytes in a JWKS file */
#define QM_AUTH_MAX_KEYS 64
#define QM_AUTH_MIN_RSA_BITS 2048
#define QM_AUTH_DEV_ISSUER "quartermaster-dev"

typedef struct {
  char *kid; /* NULL when the JWK has none */
  char *pem;
  size_t pem_len;
} qm_auth_key_t;

typedef struct {
  qm_auth_key_t *keys;
  size_t nkeys;
} qm_auth_keyset_t;

struct qm_auth {
  qm_auth_mode_t mode;
  jwt_alg_t alg;
  const char *alg_name;
  char *secret;
  size_t secret_len;
  char *jwks_path;
  char *issuer;   /* NULL = not checked */
  char *audience; /* NULL = not checked */
  int leeway_s;
  pthread_rwlock_t keys_lock;
  qm_auth_keyset_t *keyset; /* RS256 only; under keys_lock */
};

/* ---- base64url ---- */

static int qm_auth_b64_value(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

/* Decodes n characters of base64url (RFC 4648 §5; trailing '=' padding is
 * tolerated). Returns a new NUL-terminated buffer (caller frees with free())
 * and its length in *out_len, or NULL when the text is not base64url. */
static unsigned char *qm_auth_b64url_decode(const char *s, size_t n, size_t *out_len) {
  while (n > 0 && s[n - 1] == '=') n--;
  if (n % 4 == 1) return NULL;
  unsigned char *out = qm_malloc(n / 4 * 3 + 3);
  size_t o = 0;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n; i++) {
    int v = qm_auth_b64_value(s[i]);
    if (v < 0) {
      free(out);
      return NULL;
    }
    acc = (acc << 6) | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (unsigned char)(acc >> bits);
    }
  }
  out[o] = '\0';
  *out_len = o;
  return out;
}

/* Decodes a base64url segment holding a JSON object. NULL when it is not. */
static json_t *qm_auth_segment_json(const char *s, size_t n) {
  size_t len = 0;
  unsigned char *raw = qm_auth_b64url_decode(s, n, &len);
  if (!raw) return NULL;
  json_t *j = json_loadb((const char *)raw, len, JSON_REJECT_DUPLICATES, NULL);
  free(raw);
  if (j && !json_is_object(j)) {
    json_decref(j);
    j = NULL;
  }
  return j;
}

/* ---- JWKS ---- */

static void qm_auth_keyset_free(qm_auth_keyset_t *ks) {
  if (!ks) return;
  for (size_t i = 0; i < ks->nkeys; i++) {
    free(ks->keys[i].kid);
    free(ks->keys[i].pem);
  }
  free(ks->keys);
  free(ks);
}

static BIGNUM *qm_auth_jwk_bn(json_t *jwk, const char *member) {
  const char *txt = json_string_value(json_object_get(jwk, member));
  if (!txt || !*txt) return NULL;
  size_t len = 0;
  unsigned char *raw = qm_auth_b64url_decode(txt, strlen(txt), &len);
  if (!raw) return NULL;
  BIGNUM *bn = BN_bin2bn(raw, (int)len, NULL);
  free(raw);
  return bn;
}

/* Turns one RSA JWK (n, e) into a PEM public key. 0 or QM_EINVAL. */
static int qm_auth_jwk_to_pem(json_t *jwk, char **pem_out, size_t *pem_len,
                              char *errstr, size_t errstr_size) {
  int rc = QM_EINVAL;
  BIGNUM *n = qm_auth_jwk_bn(jwk, "n");
  BIGNUM *e = qm_auth_jwk_bn(jwk, "e");
  OSSL_PARAM_BLD *bld = NULL;
  OSSL_PARAM *params = NULL;
  EVP_PKEY_CTX *ctx = NULL;
  EVP_PKEY *pkey = NULL;
  BIO *bio = NULL;

  if (!n || !e) {
    qm_err(errstr, errstr_size, rc, "missing or malformed \"n\" or \"e\"");
    goto out;
  }
  bld = OSSL_PARAM_BLD_new();
  if (!bld || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) ||
      !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) ||
      !(params = OSSL_PARAM_BLD_to_param(bld))) {
    qm_err(errstr, errstr_size, rc, "cannot build RSA parameters");
    goto out;
  }
  ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
  if (!ctx || EVP_PKEY_fromdata_init(ctx) <= 0 ||
      EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
    qm_err(errstr, errstr_size, rc, "not a valid RSA public key");
    goto out;
  }
  if (EVP_PKEY_get_bits(pkey) < QM_AUTH_MIN_RSA_BITS) {
    qm_err(errstr, errstr_size, rc, "RSA key of %d bits; at least %d required",
           EVP_PKEY_get_bits(pkey), QM_AUTH_MIN_RSA_BITS);
    goto out;
  }
  bio = BIO_new(BIO_s_mem());
  if (!bio || !PEM_write_bio_PUBKEY(bio, pkey)) {
    qm_err(errstr, errstr_size, rc, "cannot encode the key as PEM");
    goto out;
  }
  char *data = NULL;
  long dlen = BIO_get_mem_data(bio, &data);
  if (dlen <= 0) {
    qm_err(errstr, errstr_size, rc, "cannot encode the key as PEM");
    goto out;
  }
  *pem_out = qm_strndup(data, (size_t)dlen);
  *pem_len = (size_t)dlen;
  rc = QM_OK;

out:
  BIO_free(bio);
  EVP_PKEY_free(pkey);
  EVP_PKEY_CTX_free(ctx);
  OSSL_PARAM_free(params);
  OSSL_PARAM_BLD_free(bld);
  BN_free(n);
  BN_free(e);
  return rc;
}

/* Reads path and builds a key set from its usable keys: kty RSA, use absent
 * or "sig", alg absent or "RS256". Keys of other types are skipped (a JWKS
 * may carry EC keys for other consumers); a malformed RSA key is an error,
 * because silently dropping it would turn a rotation into an outage later. */
static int qm_auth_jwks_load(const char *path, qm_auth_keyset_t **out, char *errstr,
                             size_t errstr_size) {
  int rc = QM_EINVAL;
  json_error_t jerr;
  json_t *root = NULL;
  qm_auth_keyset_t *ks = NULL;
  char *text = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    qm_err(errstr, errstr_size, rc, "cannot open JWKS file %s: %s", path, strerror(errno));
    goto out;
  }
  text = qm_malloc(QM_AUTH_MAX_JWKS + 1);
  size_t tlen = fread(text, 1, QM_AUTH_MAX_JWKS + 1, f);
  if (ferror(f)) {
    qm_err(errstr, errstr_size, rc, "cannot read JWKS file %s", path);
    goto out;
  }
  if (tlen > QM_AUTH_MAX_JWKS) {
    qm_err(errstr, errstr_size, rc, "JWKS file %s is larger than %d bytes", path,
           QM_AUTH_MAX_JWKS);
    goto out;
  }
  root = json_loadb(text, tlen, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) {
    qm_err(errstr, errstr_size, rc, "JWKS file %s is not JSON: %s at line %d column %d", path,
           jerr.text, jerr.line, jerr.column);
    goto out;
  }
  json_t *keys = json_object_get(root, "keys");
  if (!json_is_array(keys)) {
    qm_err(errstr, errstr_size, rc, "JWKS file %s has no \"keys\" array", path);
    goto out;
  }
  ks = qm_calloc(1, sizeof(*ks));
  ks->keys = qm_calloc(json_array_size(keys) ? json_array_size(keys) : 1, sizeof(*ks->keys));
  size_t i;
  json_t *jwk;
  json_array_foreach(keys, i, jwk) {
    const char *kty = json_string_value(json_object_get(jwk, "kty"));
    const char *use = json_string_value(json_object_get(jwk, "use"));
    const char *alg = json_string_value(json_object_get(jwk, "alg"));
    json_t *kid_j = json_object_get(jwk, "kid");
    if (!kty || strcmp(kty, "RSA") != 0) continue;
    if (use && strcmp(use, "sig") != 0) continue;
    if (alg && strcmp(alg, "RS256") != 0) continue;
    if (kid_j && !json_is_string(kid_j)) {
      qm_err(errstr, errstr_size, rc, "JWKS file %s: key %zu has a non-string \"kid\"", path, i);
      goto out;
    }
    if (ks->nkeys == QM_AUTH_MAX_KEYS) {
      qm_err(errstr, errstr_size, rc, "JWKS file %s has more than %d keys", path,
             QM_AUTH_MAX_KEYS);
      goto out;
    }
    char why[160];
    qm_auth_key_t *k = &ks->keys[ks->nkeys];
    if (qm_auth_jwk_to_pem(jwk, &k->pem, &k->pem_len, why, sizeof(why)) != QM_OK) {
      qm_err(errstr, errstr_size, rc, "JWKS file %s: key %zu (kid %s): %s", path, i,
             kid_j ? json_string_value(kid_j) : "none", why);
      goto out;
    }
    k->kid = kid_j ? qm_strdup(json_string_value(kid_j)) : NULL;
    ks->nkeys++;
  }
  if (ks->nkeys == 0) {
    qm_err(errstr, errstr_size, rc, "JWKS file %s holds no RSA signing key", path);
    goto out;
  }
  *out = ks;
  ks = NULL;
  rc = QM_OK;

out:
  qm_auth_keyset_free(ks);
  json_decref(root);
  free(text);
  if (f) fclose(f);
  return rc;
}

/* ---- lifecycle ---- */

int qm_auth_new(const qm_auth_conf_t *conf, qm_auth_t **out, char *errstr, size_t errstr_size) {
  int rc = QM_EINVAL;
  qm_auth_t *auth = NULL;
  if (!conf || !out) return qm_err(errstr, errstr_size, rc, "no configuration");
  if (conf->leeway_s < 0) {
    qm_err(errstr, errstr_size, rc, "leeway must be >= 0 seconds");
    goto out;
  }
  auth = qm_calloc(1, sizeof(*auth));
  pthread_rwlock_init(&auth->keys_lock, NULL);
  auth->mode = conf->mode;
  auth->leeway_s = conf->leeway_s;
  if (conf->issuer && *conf->issuer) auth->issuer = qm_strdup(conf->issuer);
  if (conf->audience && *conf->audience) auth->audience = qm_strdup(conf->audience);

  if (conf->mode == QM_AUTH_HS256) {
    auth->alg = JWT_ALG_HS256;
    auth->alg_name = "HS256";
    if (!conf->hs256_secret || strlen(conf->hs256_secret) < QM_AUTH_MIN_SECRET) {
      qm_err(errstr, errstr_size, rc, "HS256 secret must be at least %d bytes",
             QM_AUTH_MIN_SECRET);
      goto out;
    }
    auth->secret = qm_strdup(conf->hs256_secret);
    auth->secret_len = strlen(auth->secret);
  } else if (conf->mode == QM_AUTH_RS256) {
    auth->alg = JWT_ALG_RS256;
    auth->alg_name = "RS256";
    if (!conf->jwks_path || !*conf->jwks_path) {
      qm_err(errstr, errstr_size, rc, "RS256 needs a JWKS file path");
      goto out;
    }
    auth->jwks_path = qm_strdup(conf->jwks_path);
    rc = qm_auth_jwks_load(auth->jwks_path, &auth->keyset, errstr, errstr_size);
    if (rc != QM_OK) goto out;
  } else {
    qm_err(errstr, errstr_size, rc, "unknown token verification mode %d", (int)conf->mode);
    goto out;
  }
  *out = auth;
  auth = NULL;
  rc = QM_OK;

out:
  qm_auth_destroy(auth);
  return rc;
}

void qm_auth_destroy(qm_auth_t *auth) {
  if (!auth) return;
  if (auth->secret) {
    memset(auth->secret, 0, auth->secret_len);
    free(auth->secret);
  }
  free(auth->jwks_path);
  free(auth->issuer);
  free(auth->audience);
  qm_auth_keyset_free(auth->keyset);
  pthread_rwlock_destroy(&auth->keys_lock);
  free(auth);
}

int qm_auth_reload(qm_auth_t *auth, char *errstr, size_t errstr_size) {
  if (!auth) return QM_EINVAL;
  if (auth->mode != QM_AUTH_RS256) return QM_OK;
  qm_auth_keyset_t *ks = NULL;
  int rc = qm_auth_jwks_load(auth->jwks_path, &ks, errstr, errstr_size);
  if (rc != QM_OK) return rc;
  pthread_rwlock_wrlock(&auth->keys_lock);
  qm_auth_keyset_t *old = auth->keyset;
  auth->keyset = ks;
  pthread_rwlock_unlock(&auth->keys_lock);
  qm_auth_keyset_free(old);
  return QM_OK;
}

/* ---- verification ---- */

/* The RS256 key for a token's kid; with no kid, the only key if there is
 * exactly one. Called with keys_lock held for reading. */
static const qm_auth_key_t *qm_auth_key_find(const qm_auth_keyset_t *ks, const char *kid) {
  if (!kid) return ks->nkeys == 1 ? &ks->keys[0] : NULL;
  for (size_t i = 0; i < ks->nkeys; i++)
    if (ks->keys[i].kid && strcmp(ks->keys[i].kid, kid) == 0) return &ks->keys[i];
  return NULL;
}

static bool qm_auth_aud_matches(json_t *aud, const char *want) {
  if (json_is_string(aud)) return strcmp(json_string_value(aud), want) == 0;
  if (!json_is_array(aud)) return false;
  size_t i;
  json_t *a;
  json_array_foreach(aud, i, a) {
    if (json_is_string(a) && strcmp(json_string_value(a), want) == 0) return true;
  }
  return false;
}

/* Checks the registered claims and fills p. 0 or QM_EAUTH with the reason. */
static int qm_auth_claims(const qm_auth_t *auth, json_t *claims, qm_principal_t *p,
                          char *errstr, size_t errstr_size) {
  int rc = QM_EAUTH;
  char when[40];
  double now = (double)qm_now_ms() / 1000.0;

  json_t *exp = json_object_get(claims, "exp");
  if (!exp) return qm_err(errstr, errstr_size, rc, "token has no exp claim");
  if (!json_is_number(exp)) return qm_err(errstr, errstr_size, rc, "exp is not a number");
  double expv = json_number_value(exp);
  if (!isfinite(expv) || now - auth->leeway_s >= expv) {
    qm_time_format_rfc3339((int64_t)(expv * 1000.0), when, sizeof(when));
    return qm_err(errstr, errstr_size, rc, "token expired at %s", when);
  }
  json_t *nbf = json_object_get(claims, "nbf");
  if (nbf) {
    if (!json_is_number(nbf)) return qm_err(errstr, errstr_size, rc, "nbf is not a number");
    double nbfv = json_number_value(nbf);
    if (!isfinite(nbfv) || now + auth->leeway_s < nbfv) {
      qm_time_format_rfc3339((int64_t)(nbfv * 1000.0), when, sizeof(when));
      return qm_err(errstr, errstr_size, rc, "token not valid before %s", when);
    }
  }
  if (auth->issuer) {
    const char *iss = json_string_value(json_object_get(claims, "iss"));
    if (!iss) return qm_err(errstr, errstr_size, rc, "token has no iss claim");
    if (strcmp(iss, auth->issuer) != 0)
      return qm_err(errstr, errstr_size, rc, "token issuer is not the expected one");
  }
  if (auth->audience) {
    json_t *aud = json_object_get(claims, "aud");
    if (!aud) return qm_err(errstr, errstr_size, rc, "token has no aud claim");
    if (!qm_auth_aud_matches(aud, auth->audience))
      return qm_err(errstr, errstr_size, rc, "token audience does not include %s",
                    auth->audience);
  }
  const char *sub = json_string_value(json_object_get(claims, "sub"));
  if (!sub || !*sub) return qm_err(errstr, errstr_size, rc, "token has no sub claim");
  if (strlen(sub) > QM_AUTH_SUB_MAX)
    return qm_err(errstr, errstr_size, rc, "sub is longer than %d characters", QM_AUTH_SUB_MAX);

  qm_principal_t pr;
  memset(&pr, 0, sizeof(pr));
  qm_strlcpy(pr.sub, sub, sizeof(pr.sub));
  pr.exp = (int64_t)expv;
  json_t *roles = json_object_get(claims, "roles");
  if (roles && !json_is_null(roles)) {
    if (!json_is_array(roles))
      return qm_err(errstr, errstr_size, rc, "roles claim is not a list");
    if (json_array_size(roles) > QM_AUTH_MAX_ROLES)
      return qm_err(errstr, errstr_size, rc, "more than %d roles", QM_AUTH_MAX_ROLES);
    size_t i;
    json_t *r;
    json_array_foreach(roles, i, r) {
      const char *name = json_string_value(r);
      if (!name || !*name || strlen(name) > QM_AUTH_ROLE_MAX)
        return qm_err(errstr, errstr_size, rc,
                      "role %zu is not a string of 1 to %d characters", i, QM_AUTH_ROLE_MAX);
      qm_strlcpy(pr.roles[pr.nroles++], name, sizeof(pr.roles[0]));
    }
  }
  *p = pr;
  return QM_OK;
}

int qm_auth_verify(qm_auth_t *auth, const char *token, qm_principal_t *out, char *errstr,
                   size_t errstr_size) {
  int rc = QM_EAUTH;
  json_t *header = NULL;
  json_t *claims = NULL;
  jwt_t *jwt = NULL;
  bool locked = false;

  if (!auth || !token || !out) return qm_err(errstr, errstr_size, QM_EINVAL, "no token");
  size_t len = strnlen(token, QM_AUTH_MAX_TOKEN + 1);
  if (len == 0) {
    qm_err(errstr, errstr_size, rc, "empty token");
    goto out;
  }
  if (len > QM_AUTH_MAX_TOKEN) {
    qm_err(errstr, errstr_size, rc, "token longer than %d bytes", QM_AUTH_MAX_TOKEN);
    goto out;
  }
  const char *dot1 = memchr(token, '.', len);
  const char *dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token)) : NULL;
  if (!dot1 || !dot2 || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token))) {
    qm_err(errstr, errstr_size, rc, "not a compact JWS (header.payload.signature)");
    goto out;
  }

  header = qm_auth_segment_json(token, (size_t)(dot1 - token));
  if (!header) {
    qm_err(errstr, errstr_size, rc, "token header is not base64url JSON");
    goto out;
  }
  const char *alg = json_string_value(json_object_get(header, "alg"));
  if (!alg) {
    qm_err(errstr, errstr_size, rc, "token header has no alg");
    goto out;
  }
  if (strcmp(alg, "none") == 0) {
    qm_err(errstr, errstr_size, rc, "unsigned tokens (alg none) are not accepted");
    goto out;
  }
  if (strcmp(alg, auth->alg_name) != 0) {
    qm_err(errstr, errstr_size, rc, "token algorithm %.16s is not accepted (expected %s)", alg,
           auth->alg_name);
    goto out;
  }
  if (json_object_get(header, "crit")) {
    qm_err(errstr, errstr_size, rc, "token header has critical extensions we do not support");
    goto out;
  }
  if (dot2[1] == '\0') {
    qm_err(errstr, errstr_size, rc, "token has no signature");
    goto out;
  }
  claims = qm_auth_segment_json(dot1 + 1, (size_t)(dot2 - dot1 - 1));
  if (!claims) {
    qm_err(errstr, errstr_size, rc, "token payload is not base64url JSON");
    goto out;
  }

  const unsigned char *key = NULL;
  size_t key_len = 0;
  if (auth->mode == QM_AUTH_HS256) {
    key = (const unsigned char *)auth->secret;
    key_len = auth->secret_len;
  } else {
    json_t *kid_j = json_object_get(header, "kid");
    if (kid_j && !json_is_string(kid_j)) {
      qm_err(errstr, errstr_size, rc, "token kid is not a string");
      goto out;
    }
    const char *kid = json_string_value(kid_j);
    pthread_rwlock_rdlock(&auth->keys_lock);
    locked = true;
    const qm_auth_key_t *k = qm_auth_key_find(auth->keyset, kid);
    if (!k && kid) {
      qm_err(errstr, errstr_size, rc, "token key id %.64s is not in the key set", kid);
      goto out;
    }
    if (!k) {
      qm_err(errstr, errstr_size, rc, "token has no kid and the key set has several keys");
      goto out;
    }
    key = (const unsigned char *)k->pem;
    key_len = k->pem_len;
  }
  if (jwt_decode(&jwt, token, key, (int)key_len) != 0 || !jwt) {
    qm_err(errstr, errstr_size, rc, "token signature does not verify");
    goto out;
  }
  if (jwt_get_alg(jwt) != auth->alg) {
    qm_err(errstr, errstr_size, rc, "token algorithm is not accepted");
    goto out;
  }
  if (locked) {
    pthread_rwlock_unlock(&auth->keys_lock);
    locked = false;
  }
  rc = qm_auth_claims(auth, claims, out, errstr, errstr_size);

out:
  if (locked) pthread_rwlock_unlock(&auth->keys_lock);
  jwt_free(jwt);
  json_decref(claims);
  json_decref(header);
  return rc;
}

bool qm_principal_has_role(const qm_principal_t *p, const char *role) {
  if (!p || !role) return false;
  for (size_t i = 0; i < p->nroles && i < QM_AUTH_MAX_ROLES; i++)
    if (strcmp(p->roles[i], role) == 0) return true;
  return false;
}

/* ---- development tokens ---- */

int qm_auth_mint_hs256(const char *secret, const char *sub, const char *const *roles, size_t n,
                       int64_t ttl_s, char **token_out) {
  int rc = QM_EINVAL;
  jwt_t *jwt = NULL;
  json_t *extra = NULL;
  char *extra_txt = NULL;
  char *tok = NULL;

  if (!secret || strlen(secret) < QM_AUTH_MIN_SECRET || !sub || !*sub ||
      strlen(sub) > QM_AUTH_SUB_MAX || n > QM_AUTH_MAX_ROLES || (n > 0 && !roles) ||
      ttl_s <= 0 || !token_out)
    goto out;
  extra = json_object();
  json_t *list = json_array();
  json_object_set_new(extra, "roles", list);
  for (size_t i = 0; i < n; i++) {
    if (!roles[i] || !*roles[i] || strlen(roles[i]) > QM_AUTH_ROLE_MAX) goto out;
    json_array_append_new(list, json_string(roles[i]));
  }
  extra_txt = json_dumps(extra, JSON_COMPACT);
  int64_t now = qm_now_ms() / 1000;
  if (!extra_txt || jwt_new(&jwt) != 0 || jwt_add_grant(jwt, "sub", sub) != 0 ||
      jwt_add_grant(jwt, "iss", QM_AUTH_DEV_ISSUER) != 0 ||
      jwt_add_grant_int(jwt, "iat", (long)now) != 0 ||
      jwt_add_grant_int(jwt, "exp", (long)(now + ttl_s)) != 0 ||
      jwt_add_grants_json(jwt, extra_txt) != 0 ||
      jwt_set_alg(jwt, JWT_ALG_HS256, (const unsigned char *)secret, (int)strlen(secret)) != 0)
    goto out;
  tok = jwt_encode_str(jwt);
  if (!tok) goto out;
  *token_out = qm_strdup(tok);
  rc = QM_OK;

out:
  free(tok);
  free(extra_txt);
  json_decref(extra);
  jwt_free(jwt);
  return rc;
}
