/*
 * Unit tests for qm_auth: RS256 against a JWKS generated here (OpenSSL
 * keygen, written to a temporary file), every rejection the verifier promises
 * (including the HS256-with-the-public-key "alg confusion" attack and alg
 * none), roles parsing, JWKS reload, and HS256 development tokens.
 */
#include "qm_auth.h"
#include "qm_common.h"
#include "qm_log.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <jwt.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SECRET "0123456789abcdef0123456789abcdef-dev-secret"
#define ISS "https://idp.example.com"
#define AUD "quartermaster"

/* ---- key material made by the test ---- */

static char *b64url(const unsigned char *in, size_t n) {
  char *out = qm_malloc(4 * ((n + 2) / 3) + 1);
  int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
  int t = 0;
  for (int i = 0; i < len; i++) {
    if (out[i] == '+')
      out[t++] = '-';
    else if (out[i] == '/')
      out[t++] = '_';
    else if (out[i] != '=')
      out[t++] = out[i];
  }
  out[t] = '\0';
  return out;
}

static char *b64url_str(const char *s) { return b64url((const unsigned char *)s, strlen(s)); }

static char *bio_text(BIO *bio) {
  char *data = NULL;
  long len = BIO_get_mem_data(bio, &data);
  char *s = qm_strndup(data, (size_t)len);
  BIO_free(bio);
  return s;
}

typedef struct {
  EVP_PKEY *pkey;
  char *priv_pem;
  char *pub_pem;
  char *n;
  char *e;
} rsa_key_t;

static void rsa_key_make(rsa_key_t *k, unsigned bits) {
  k->pkey = EVP_RSA_gen(bits);
  cr_assert_not_null(k->pkey);
  BIO *b = BIO_new(BIO_s_mem());
  cr_assert(PEM_write_bio_PrivateKey(b, k->pkey, NULL, NULL, 0, NULL, NULL));
  k->priv_pem = bio_text(b);
  b = BIO_new(BIO_s_mem());
  cr_assert(PEM_write_bio_PUBKEY(b, k->pkey));
  k->pub_pem = bio_text(b);
  BIGNUM *n = NULL, *e = NULL;
  cr_assert(EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_RSA_N, &n));
  cr_assert(EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_RSA_E, &e));
  unsigned char buf[1024];
  int len = BN_bn2bin(n, buf);
  k->n = b64url(buf, (size_t)len);
  len = BN_bn2bin(e, buf);
  k->e = b64url(buf, (size_t)len);
  BN_free(n);
  BN_free(e);
}

static void rsa_key_free(rsa_key_t *k) {
  EVP_PKEY_free(k->pkey);
  free(k->priv_pem);
  free(k->pub_pem);
  free(k->n);
  free(k->e);
}

/* Writes a JWKS with the given keys/kids (plus an EC key to be skipped) to a
 * temporary file; returns its path (caller frees and unlinks). */
static char *jwks_write(const rsa_key_t *const *keys, const char *const *kids, size_t n,
                        char *path) {
  json_t *arr = json_array();
  json_array_append_new(arr, json_pack("{s:s,s:s,s:s,s:s}", "kty", "EC", "crv", "P-256", "x",
                                       "AAAA", "y", "AAAA"));
  for (size_t i = 0; i < n; i++)
    json_array_append_new(arr, json_pack("{s:s,s:s,s:s,s:s,s:s,s:s}", "kty", "RSA", "use", "sig",
                                         "alg", "RS256", "kid", kids[i], "n", keys[i]->n, "e",
                                         keys[i]->e));
  json_t *root = json_pack("{s:o}", "keys", arr);
  cr_assert_eq(json_dump_file(root, path, 0), 0);
  json_decref(root);
  return path;
}

/* Signs claims (a JSON object text) with libjwt: alg, key, optional kid. */
static char *sign(jwt_alg_t alg, const char *key, const char *kid, const char *claims) {
  jwt_t *jwt = NULL;
  cr_assert_eq(jwt_new(&jwt), 0);
  cr_assert_eq(jwt_add_grants_json(jwt, claims), 0);
  if (kid) cr_assert_eq(jwt_add_header(jwt, "kid", kid), 0);
  cr_assert_eq(jwt_set_alg(jwt, alg, (const unsigned char *)key, (int)strlen(key)), 0);
  char *tok = jwt_encode_str(jwt);
  cr_assert_not_null(tok);
  jwt_free(jwt);
  return tok;
}

/* Standard claims with exp/nbf relative to now; extra is spliced in. */
static char *claims_text(long exp_rel, const char *extra) {
  long now = (long)(qm_now_ms() / 1000);
  return qm_asprintf("{\"sub\":\"p-123\",\"iss\":\"%s\",\"aud\":\"%s\",\"iat\":%ld,\"exp\":%ld%s%s}",
                     ISS, AUD, now, now + exp_rel, extra ? "," : "", extra ? extra : "");
}

/* ---- fixture: one RS256 verifier over a two-key JWKS ---- */

static rsa_key_t key1, key2, other;
static char jwks_path[64];
static qm_auth_t *rs;

static void rs_setup(void) {
  qm_log_init("test", QM_LOG_FATAL, NULL);
  rsa_key_make(&key1, 2048);
  rsa_key_make(&key2, 2048);
  rsa_key_make(&other, 2048);
  qm_strlcpy(jwks_path, "/tmp/qm_test_jwks_XXXXXX", sizeof(jwks_path));
  int fd = mkstemp(jwks_path);
  cr_assert_geq(fd, 0);
  close(fd);
  const rsa_key_t *keys[] = {&key1, &key2};
  const char *kids[] = {"k1", "k2"};
  jwks_write(keys, kids, 2, jwks_path);
  qm_auth_conf_t conf = {.mode = QM_AUTH_RS256, .jwks_path = jwks_path, .issuer = ISS,
                         .audience = AUD, .leeway_s = 30};
  char err[256] = "";
  cr_assert_eq(qm_auth_new(&conf, &rs, err, sizeof(err)), QM_OK, "%s", err);
}

static void rs_teardown(void) {
  qm_auth_destroy(rs);
  rs = NULL;
  unlink(jwks_path);
  rsa_key_free(&key1);
  rsa_key_free(&key2);
  rsa_key_free(&other);
}

/* Verifies tok and expects a rejection whose reason contains `why`. */
static void expect_reject(const char *tok, const char *why) {
  qm_principal_t p;
  memset(&p, 0x5a, sizeof(p));
  char err[256] = "";
  int rc = qm_auth_verify(rs, tok, &p, err, sizeof(err));
  cr_assert_eq(rc, QM_EAUTH, "token accepted, expected rejection for '%s'", why);
  cr_assert_not_null(strstr(err, why), "reason '%s' does not mention '%s'", err, why);
  cr_assert_eq(((unsigned char *)&p)[0], 0x5a, "output touched on failure");
}

static void expect_accept(const char *tok, qm_principal_t *p) {
  char err[256] = "";
  cr_assert_eq(qm_auth_verify(rs, tok, p, err, sizeof(err)), QM_OK, "rejected: %s", err);
}

TestSuite(auth_rs256, .init = rs_setup, .fini = rs_teardown, .timeout = 60);

Test(auth_rs256, valid_token_gives_principal_with_roles) {
  char *c = claims_text(300, "\"roles\":[\"employee\",\"it_admin\",\"brand_new_role\"]");
  char *tok = sign(JWT_ALG_RS256, key2.priv_pem, "k2", c);
  qm_principal_t p;
  expect_accept(tok, &p);
  cr_assert_str_eq(p.sub, "p-123");
  cr_assert_eq(p.nroles, 3);
  cr_assert_str_eq(p.roles[2], "brand_new_role", "unknown roles are kept");
  cr_assert(qm_principal_has_role(&p, "it_admin"));
  cr_assert(qm_principal_has_role(&p, "employee"));
  cr_assert_not(qm_principal_has_role(&p, "security"));
  cr_assert_not(qm_principal_has_role(&p, "IT_ADMIN"));
  cr_assert_geq(p.exp, qm_now_ms() / 1000 + 290);
  free(tok);
  free(c);
}

Test(auth_rs256, audience_list_and_leeway_accepted) {
  long now = (long)(qm_now_ms() / 1000);
  char *c = qm_asprintf("{\"sub\":\"p-1\",\"iss\":\"%s\",\"aud\":[\"other\",\"%s\"],"
                        "\"exp\":%ld,\"nbf\":%ld}",
                        ISS, AUD, now - 10, now + 10); /* both within the 30 s leeway */
  char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  qm_principal_t p;
  expect_accept(tok, &p);
  cr_assert_eq(p.nroles, 0, "no roles claim: no roles");
  free(tok);
  free(c);
}

Test(auth_rs256, alg_confusion_hs256_signed_with_public_key_rejected) {
  /* The attacker knows the public key (it is published in the JWKS) and signs
   * an HS256 token using its PEM as the HMAC secret. */
  char *c = claims_text(300, "\"roles\":[\"it_admin\"]");
  char *tok = sign(JWT_ALG_HS256, key1.pub_pem, "k1", c);
  /* The attack is real: libjwt alone, handed the PEM as key, accepts it. */
  jwt_t *jwt = NULL;
  cr_assert_eq(jwt_decode(&jwt, tok, (const unsigned char *)key1.pub_pem,
                          (int)strlen(key1.pub_pem)),
               0, "precondition: libjwt alone accepts the forged token");
  jwt_free(jwt);
  expect_reject(tok, "HS256 is not accepted");
  free(tok);
  free(c);
}

Test(auth_rs256, alg_none_rejected) {
  char *c = claims_text(300, "\"roles\":[\"it_admin\"]");
  char *h = b64url_str("{\"alg\":\"none\",\"typ\":\"JWT\"}");
  char *b = b64url_str(c);
  char *tok = qm_asprintf("%s.%s.", h, b);
  expect_reject(tok, "alg none");
  char *tok2 = qm_asprintf("%s.%s.c2ln", h, b);
  expect_reject(tok2, "alg none");
  free(tok);
  free(tok2);
  free(h);
  free(b);
  free(c);
}

Test(auth_rs256, bad_signatures_rejected) {
  char *c = claims_text(300, NULL);
  char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  /* Flip one character in the middle of the signature. */
  char *sig = strrchr(tok, '.') + 1;
  size_t mid = strlen(sig) / 2;
  sig[mid] = sig[mid] == 'A' ? 'B' : 'A';
  expect_reject(tok, "signature does not verify");
  /* Signed by a key not in the set, claiming a kid that is. */
  char *forged = sign(JWT_ALG_RS256, other.priv_pem, "k1", c);
  expect_reject(forged, "signature does not verify");
  /* Signed by key2 but naming k1. */
  char *swapped = sign(JWT_ALG_RS256, key2.priv_pem, "k1", c);
  expect_reject(swapped, "signature does not verify");
  /* Payload altered after signing (privilege escalation attempt). */
  char *good = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  char *d1 = strchr(good, '.');
  char *d2 = strrchr(good, '.');
  char *evil_claims = claims_text(300, "\"roles\":[\"it_admin\"]");
  char *evil_body = b64url_str(evil_claims);
  *d1 = '\0';
  char *spliced = qm_asprintf("%s.%s%s", good, evil_body, d2);
  expect_reject(spliced, "signature does not verify");
  free(spliced);
  free(evil_body);
  free(evil_claims);
  free(good);
  free(swapped);
  free(forged);
  free(tok);
  free(c);
}

Test(auth_rs256, kid_rules) {
  char *c = claims_text(300, NULL);
  char *unknown = sign(JWT_ALG_RS256, key1.priv_pem, "k9", c);
  expect_reject(unknown, "k9 is not in the key set");
  char *nokid = sign(JWT_ALG_RS256, key1.priv_pem, NULL, c);
  expect_reject(nokid, "no kid");
  free(unknown);
  free(nokid);
  free(c);
}

Test(auth_rs256, time_claims_enforced) {
  char *c = claims_text(-100, NULL); /* expired beyond the 30 s leeway */
  char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  expect_reject(tok, "token expired at");
  free(tok);
  free(c);

  long now = (long)(qm_now_ms() / 1000);
  c = qm_asprintf("{\"sub\":\"p-1\",\"iss\":\"%s\",\"aud\":\"%s\"}", ISS, AUD);
  tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  expect_reject(tok, "no exp");
  free(tok);
  free(c);

  c = qm_asprintf("{\"sub\":\"p-1\",\"iss\":\"%s\",\"aud\":\"%s\",\"exp\":\"tomorrow\"}", ISS,
                  AUD);
  tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  expect_reject(tok, "exp is not a number");
  free(tok);
  free(c);

  char *extra = qm_asprintf("\"nbf\":%ld", now + 300);
  c = claims_text(600, extra);
  tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  expect_reject(tok, "not valid before");
  free(tok);
  free(c);
  free(extra);
}

Test(auth_rs256, issuer_audience_subject_enforced) {
  long now = (long)(qm_now_ms() / 1000);
  struct {
    const char *claims; /* exp is added */
    const char *why;
  } cases[] = {
      {"{\"sub\":\"p\",\"iss\":\"https://evil.example\",\"aud\":\"" AUD "\"}", "issuer"},
      {"{\"sub\":\"p\",\"aud\":\"" AUD "\"}", "no iss"},
      {"{\"sub\":\"p\",\"iss\":\"" ISS "\",\"aud\":\"billing\"}", "audience"},
      {"{\"sub\":\"p\",\"iss\":\"" ISS "\",\"aud\":[\"billing\"]}", "audience"},
      {"{\"sub\":\"p\",\"iss\":\"" ISS "\"}", "no aud"},
      {"{\"iss\":\"" ISS "\",\"aud\":\"" AUD "\"}", "no sub"},
      {"{\"sub\":\"\",\"iss\":\"" ISS "\",\"aud\":\"" AUD "\"}", "no sub"},
      {"{\"sub\":42,\"iss\":\"" ISS "\",\"aud\":\"" AUD "\"}", "no sub"},
  };
  for (size_t i = 0; i < QM_ARRAY_LEN(cases); i++) {
    json_t *j = json_loads(cases[i].claims, 0, NULL);
    cr_assert_not_null(j, "case %zu", i);
    json_object_set_new(j, "exp", json_integer(now + 300));
    char *c = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
    expect_reject(tok, cases[i].why);
    free(tok);
    free(c);
  }
}

Test(auth_rs256, roles_claim_validated) {
  const char *bad[] = {
      "\"roles\":\"it_admin\"",
      "\"roles\":[\"employee\",7]",
      "\"roles\":[\"a_role_name_that_is_far_too_long_xx\"]",
      "\"roles\":[\"r1\",\"r2\",\"r3\",\"r4\",\"r5\",\"r6\",\"r7\",\"r8\",\"r9\",\"r10\","
      "\"r11\",\"r12\",\"r13\",\"r14\",\"r15\",\"r16\",\"r17\"]",
  };
  const char *why[] = {"not a list", "role 1", "role 0", "more than 16"};
  for (size_t i = 0; i < QM_ARRAY_LEN(bad); i++) {
    char *c = claims_text(300, bad[i]);
    char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
    expect_reject(tok, why[i]);
    free(tok);
    free(c);
  }
  /* Exactly 16 roles of 32 characters is fine. */
  char extra[1024] = "\"roles\":[";
  for (int i = 0; i < 16; i++) {
    char r[40];
    snprintf(r, sizeof(r), "%s\"role%02d_padded_to_32_characters__\"", i ? "," : "", i);
    strncat(extra, r, sizeof(extra) - strlen(extra) - 1);
  }
  strncat(extra, "]", sizeof(extra) - strlen(extra) - 1);
  char *c = claims_text(300, extra);
  char *tok = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  qm_principal_t p;
  expect_accept(tok, &p);
  cr_assert_eq(p.nroles, 16);
  cr_assert_eq(strlen(p.roles[15]), 32);
  cr_assert(qm_principal_has_role(&p, "role15_padded_to_32_characters__"));
  free(tok);
  free(c);
}

Test(auth_rs256, malformed_tokens_rejected) {
  expect_reject("", "empty");
  expect_reject("abc", "compact JWS");
  expect_reject("a.b.c.d", "compact JWS");
  expect_reject("!!!.e30.c2ln", "header");
  char *h = b64url_str("{\"alg\":\"RS256\",\"kid\":\"k1\"}");
  char *t1 = qm_asprintf("%s.%s.c2ln", h, "bm90IGpzb24"); /* "not json" */
  expect_reject(t1, "payload");
  char *t2 = qm_asprintf("%s.e30.", h);
  expect_reject(t2, "no signature");
  char *h2 = b64url_str("{\"alg\":\"RS256\",\"kid\":\"k1\",\"crit\":[\"exp\"]}");
  char *t3 = qm_asprintf("%s.e30.c2ln", h2);
  expect_reject(t3, "critical");
  char *h3 = b64url_str("{\"typ\":\"JWT\"}");
  char *t4 = qm_asprintf("%s.e30.c2ln", h3);
  expect_reject(t4, "no alg");
  free(t1);
  free(t2);
  free(t3);
  free(t4);
  free(h);
  free(h2);
  free(h3);
}

Test(auth_rs256, reload_swaps_keys_and_keeps_old_on_failure) {
  char *c = claims_text(300, NULL);
  char *tok_other = sign(JWT_ALG_RS256, other.priv_pem, "k3", c);
  expect_reject(tok_other, "k3 is not in the key set");

  const rsa_key_t *keys[] = {&other};
  const char *kids[] = {"k3"};
  jwks_write(keys, kids, 1, jwks_path);
  char err[256] = "";
  cr_assert_eq(qm_auth_reload(rs, err, sizeof(err)), QM_OK, "%s", err);
  qm_principal_t p;
  expect_accept(tok_other, &p);
  char *tok_k1 = sign(JWT_ALG_RS256, key1.priv_pem, "k1", c);
  expect_reject(tok_k1, "k1 is not in the key set");

  FILE *f = fopen(jwks_path, "w");
  fputs("{\"keys\": [", f);
  fclose(f);
  cr_assert_eq(qm_auth_reload(rs, err, sizeof(err)), QM_EINVAL);
  cr_assert_not_null(strstr(err, "not JSON"), "%s", err);
  expect_accept(tok_other, &p); /* old keys kept */
  free(tok_k1);
  free(tok_other);
  free(c);
}

Test(auth_rs256, rs256_verifier_rejects_hs256_dev_tokens) {
  char *tok = NULL;
  const char *roles[] = {"it_admin"};
  cr_assert_eq(qm_auth_mint_hs256(SECRET, "p-1", roles, 1, 300, &tok), QM_OK);
  expect_reject(tok, "HS256 is not accepted (expected RS256)");
  free(tok);
}

/* ---- configuration ---- */

Test(auth_conf, bad_configurations_refused) {
  qm_log_init("test", QM_LOG_FATAL, NULL);
  qm_auth_t *a = NULL;
  char err[256] = "";
  qm_auth_conf_t c1 = {.mode = QM_AUTH_HS256, .hs256_secret = "short"};
  cr_assert_eq(qm_auth_new(&c1, &a, err, sizeof(err)), QM_EINVAL);
  cr_assert_null(a);
  cr_assert_not_null(strstr(err, "at least 32"), "%s", err);
  qm_auth_conf_t c2 = {.mode = QM_AUTH_RS256, .jwks_path = "/nonexistent/jwks.json"};
  cr_assert_eq(qm_auth_new(&c2, &a, err, sizeof(err)), QM_EINVAL);
  cr_assert_not_null(strstr(err, "cannot open"), "%s", err);

  /* A 1024-bit key is refused. */
  rsa_key_t weak;
  rsa_key_make(&weak, 1024);
  char path[64];
  qm_strlcpy(path, "/tmp/qm_test_jwks_XXXXXX", sizeof(path));
  close(mkstemp(path));
  const rsa_key_t *keys[] = {&weak};
  const char *kids[] = {"w"};
  jwks_write(keys, kids, 1, path);
  qm_auth_conf_t c3 = {.mode = QM_AUTH_RS256, .jwks_path = path};
  cr_assert_eq(qm_auth_new(&c3, &a, err, sizeof(err)), QM_EINVAL);
  cr_assert_not_null(strstr(err, "1024 bits"), "%s", err);
  /* Only non-RSA keys: nothing usable. */
  jwks_write(keys, kids, 0, path);
  cr_assert_eq(qm_auth_new(&c3, &a, err, sizeof(err)), QM_EINVAL);
  cr_assert_not_null(strstr(err, "no RSA signing key"), "%s", err);
  unlink(path);
  rsa_key_free(&weak);
}

/* ---- HS256 development tokens ---- */

Test(auth_hs256, minted_token_verifies_and_others_do_not) {
  qm_log_init("test", QM_LOG_FATAL, NULL);
  qm_auth_conf_t conf = {.mode = QM_AUTH_HS256, .hs256_secret = SECRET,
                         .issuer = "quartermaster-dev"};
  qm_auth_t *a = NULL;
  char err[256] = "";
  cr_assert_eq(qm_auth_new(&conf, &a, err, sizeof(err)), QM_OK, "%s", err);

  const char *roles[] = {"manager", "approver"};
  char *tok = NULL;
  cr_assert_eq(qm_auth_mint_hs256(SECRET, "person-42", roles, 2, 600, &tok), QM_OK);
  qm_principal_t p;
  cr_assert_eq(qm_auth_verify(a, tok, &p, err, sizeof(err)), QM_OK, "%s", err);
  cr_assert_str_eq(p.sub, "person-42");
  cr_assert_eq(p.nroles, 2);
  cr_assert(qm_principal_has_role(&p, "approver"));
  int64_t now = qm_now_ms() / 1000;
  cr_assert(p.exp >= now + 598 && p.exp <= now + 601);

  /* Same claims, other secret. */
  char *tok2 = NULL;
  cr_assert_eq(qm_auth_mint_hs256("another-secret-of-at-least-32-bytes!!", "person-42", roles, 2,
                                  600, &tok2),
               QM_OK);
  cr_assert_eq(qm_auth_verify(a, tok2, &p, err, sizeof(err)), QM_EAUTH);
  cr_assert_not_null(strstr(err, "signature"), "%s", err);

  /* An RS256 token presented to an HS256 verifier. */
  rsa_key_t k;
  rsa_key_make(&k, 2048);
  char *c = claims_text(300, NULL);
  char *rs_tok = sign(JWT_ALG_RS256, k.priv_pem, NULL, c);
  cr_assert_eq(qm_auth_verify(a, rs_tok, &p, err, sizeof(err)), QM_EAUTH);
  cr_assert_not_null(strstr(err, "RS256 is not accepted"), "%s", err);

  /* Mint refuses bad input. */
  char *t = NULL;
  cr_assert_eq(qm_auth_mint_hs256("short", "p", roles, 2, 60, &t), QM_EINVAL);
  cr_assert_eq(qm_auth_mint_hs256(SECRET, "", roles, 2, 60, &t), QM_EINVAL);
  cr_assert_eq(qm_auth_mint_hs256(SECRET, "p", roles, 2, 0, &t), QM_EINVAL);
  cr_assert_null(t);

  free(rs_tok);
  free(c);
  rsa_key_free(&k);
  free(tok);
  free(tok2);
  qm_auth_destroy(a);
}
